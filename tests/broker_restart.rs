//! The local broker (durable sqlite storage) SIGKILLed three times and restarted while actions
//! flow through REST (issue 9), then once for longer than ingest's produce timeout: nothing
//! ingest acknowledged is lost, nothing is counted twice, and no stage exits; the enricher and
//! the aggregator report the long outage on `/readyz` and are ready again afterwards.
//!
//! The test runs a broker of its own (`deploy/local/services.sh up` with its own state
//! directory and port), so killing it disturbs no other test; ClickHouse is the shared one.
//! Clients behave as the README asks: a batch refused with 503 (Kafka unavailable) or 429, or
//! whose connection failed, is sent again with the same event ids until it is accepted.
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dec, metering_config, post_until_accepted, repo_root, Lcg, TestEnv};
use rust_decimal::Decimal;
use serde_json::json;

const SECRET: &str = "broker-restart-secret";

/// `deploy/local/services.sh` with the state directory and port of this test's broker.
fn services(command: &str, state: &std::path::Path, port: u16) {
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/local/services.sh"))
        .arg(command)
        .env("AGENTMETER_STATE", state)
        .env("AGENTMETER_KAFKA_PORT", port.to_string())
        .status()
        .expect("run services.sh");
    assert!(status.success(), "services.sh {command} failed");
}

fn kill_broker(state: &std::path::Path) {
    let pid = std::fs::read_to_string(state.join("tansu/tansu.pid")).unwrap();
    let status = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid}");
    // Until it is gone, `services.sh up` would see it answer.
    let proc_dir = format!("/proc/{}", pid.trim());
    while std::path::Path::new(&proc_dir).exists() {
        let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn broker_killed_and_restarted_while_actions_flow_loses_nothing_and_counts_nothing_twice() {
    let port = common::free_port();
    let state = std::env::temp_dir().join(format!("agentmeter-broker-restart-{port}"));
    std::fs::create_dir_all(&state).unwrap();
    // Everything of this test (its TestEnv and the stages it starts) uses this broker.
    std::env::set_var("AGENTMETER_KAFKA_PORT", port.to_string());
    std::env::set_var("AGENTMETER_STATE", &state);
    let stopper = StopBroker {
        state: state.clone(),
        port,
    };

    let mut env = TestEnv::new("broker_restart", "");
    env.apply_config(&metering_config(
        "ws_restart",
        &[("acc_restart", SECRET)],
        r#"
[tagging]
tracked = ["web_search", "llm_call"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.00004" }]
"#,
    ));
    let stages = [
        env.spawn("ingest", "ingest"),
        env.spawn("enrich", "enrich"),
        env.spawn("aggregate", "aggregate"),
    ];
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );

    // One client sends batches of 50 until told to stop, each retried until accepted.
    let accepted = Arc::new(Mutex::new(Vec::<(String, Decimal, Decimal)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let retries = Arc::new(Mutex::new(0u64));
    let sender = {
        let (accepted, stop, retries) = (accepted.clone(), stop.clone(), retries.clone());
        let url = format!("{}/v1/actions", env.ingest_url());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let mut random = Lcg(17);
            let mut batch_index = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut items = Vec::new();
                let mut expected = Vec::new();
                for item_index in 0..50 {
                    let event_id = format!("restart-{batch_index}-{item_index}");
                    if random.next(2) == 0 {
                        items.push(json!({"event_id": event_id, "action_name": "web_search", "user_id": "u"}));
                        expected.push((event_id, Decimal::ONE, dec("0.005")));
                    } else {
                        let tokens = 1 + random.next(3000);
                        items.push(json!({"event_id": event_id, "action_name": "llm_call", "user_id": "u",
                                          "attributes": {"input_tokens": tokens, "output_tokens": 0}}));
                        let quantity = Decimal::from(tokens);
                        expected.push((event_id, quantity, quantity * dec("0.00004")));
                    }
                }
                let body = json!({ "actions": items });
                // A broker that never comes back fails the test here rather than hanging it.
                let refused = post_until_accepted(
                    &client,
                    &url,
                    SECRET,
                    &body,
                    Duration::from_secs(180),
                    Duration::from_millis(200),
                );
                *retries.lock().unwrap() += refused as u64;
                accepted.lock().unwrap().extend(expected);
                batch_index += 1;
            }
        })
    };

    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(5));
        kill_broker(&state);
        std::thread::sleep(Duration::from_millis(700));
        services("up", &state, port);
    }
    // One outage longer than ingest's produce timeout (10 s): its messages time out, ingest
    // answers 503, and librdkafka bumps the idempotent producer's epoch on its own, which the
    // broker must accept once it is back (tansu fix idempotent-epoch-bump, services.sh).
    std::thread::sleep(Duration::from_secs(5));
    kill_broker(&state);
    // Meanwhile the consuming stages wait the outage out and say so (ADR 0003).
    let outage_ends = Instant::now() + Duration::from_secs(15);
    let mut not_ready_during_outage = [false, false];
    while Instant::now() < outage_ends {
        for (seen, port) in not_ready_during_outage.iter_mut().zip([
            env.run.enricher_metrics_port,
            env.run.aggregator_metrics_port,
        ]) {
            let status = reqwest::blocking::Client::new()
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .timeout(Duration::from_secs(1))
                .send()
                .map(|response| response.status().as_u16());
            *seen |= matches!(status, Ok(503));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    services("up", &state, port);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    // The batch in flight may wait for a broker whose storage task panicked after its restart;
    // `services.sh up` restarts such a broker, as an operator's watchdog would.
    while !sender.is_finished() {
        services("up", &state, port);
        std::thread::sleep(Duration::from_secs(2));
    }
    sender.join().expect("sender");

    let accepted = accepted.lock().unwrap().clone();
    let ids: BTreeSet<&str> = accepted.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids.len(), accepted.len());
    let expected_quantity: Decimal = accepted.iter().map(|(_, quantity, _)| *quantity).sum();
    let expected_cost: Decimal = accepted.iter().map(|(_, _, cost)| *cost).sum();
    eprintln!(
        "{} actions accepted, {} batches re-sent after a refusal",
        accepted.len(),
        retries.lock().unwrap()
    );
    assert!(
        accepted.len() >= 500,
        "the run sent too little to mean anything"
    );
    assert!(
        *retries.lock().unwrap() > 0,
        "the long outage refused nothing: it did not test what it should"
    );

    // Converge: every accepted action counted once. (A broker whose storage task panicked after a
    // restart is restarted by `services.sh up`, as an operator's watchdog would.)
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let row =
            &env.query("SELECT sum(action_count), sum(quantity), sum(cost) FROM usage_exact")[0];
        if row[0].parse::<usize>().ok() == Some(accepted.len()) {
            assert_eq!(dec(&row[1]), expected_quantity);
            assert_eq!(dec(&row[2]), expected_cost);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counted {row:?}, expected {} actions\n{}",
            accepted.len(),
            env.logs()
        );
        services("up", &state, port);
        std::thread::sleep(Duration::from_secs(2));
    }
    let stored = env.query("SELECT count(), uniqExact(event_id) FROM actions FINAL");
    assert_eq!(
        stored[0],
        vec![accepted.len().to_string(), accepted.len().to_string()]
    );
    assert_eq!(
        not_ready_during_outage,
        [true, true],
        "the enricher and the aggregator must report the outage on /readyz"
    );
    for port in [
        env.run.enricher_metrics_port,
        env.run.aggregator_metrics_port,
    ] {
        env.wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(60),
        );
    }
    for stage in stages {
        let running = env.process(stage).is_running();
        let tag = env.process(stage).tag.clone();
        assert!(running, "{tag} exited\n{}", env.logs());
    }
    drop(env);
    drop(stopper);
}

/// Stops this test's broker when the test ends, however it ends.
struct StopBroker {
    state: std::path::PathBuf,
    port: u16,
}

impl Drop for StopBroker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("deploy/local/services.sh"))
            .arg("down")
            .env("AGENTMETER_STATE", &self.state)
            .env("AGENTMETER_KAFKA_PORT", self.port.to_string())
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}
