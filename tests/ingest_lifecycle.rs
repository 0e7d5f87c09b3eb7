//! Ingest's life cycle against the real broker: secrets rotated and instances added while it runs
//! (no restart), and SIGTERM draining in-flight requests before exit.
#![cfg(feature = "integration")]

mod common;

use std::time::{Duration, Instant};

use common::{metering_config, TestEnv};
use serde_json::json;

fn post(url: &str, secret: &str, body: &serde_json::Value) -> u16 {
    common::post_status(&reqwest::blocking::Client::new(), url, secret, body)
}

/// Polls until `secret` gets `expected` from ingest; returns how long it took.
fn wait_for_status(url: &str, secret: &str, expected: u16) -> Duration {
    let started = Instant::now();
    let body = json!({"actions": [{"action_name": "probe"}]});
    loop {
        if post(url, secret, &body) == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{secret} never got {expected}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rotated_secrets_and_new_instances_apply_without_restart() {
    let mut env = TestEnv::new("ingest_rotate", "");
    let body = "[tagging]\ntracked = [\"probe\"]\n";
    env.apply_config(&metering_config(
        "ws_rotate",
        &[("acc_one", "old-secret")],
        body,
    ));
    env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let url = format!("{}/v1/actions", env.ingest_url());
    wait_for_status(&url, "old-secret", 202);
    assert_eq!(
        post(
            &url,
            "new-secret",
            &json!({"actions": [{"action_name": "probe"}]})
        ),
        401
    );

    // Rotate the secret of acc_one and add a second account with its own instance.
    env.apply_config(&metering_config(
        "ws_rotate",
        &[("acc_one", "new-secret"), ("acc_two", "second-secret")],
        body,
    ));
    let rotated_after = wait_for_status(&url, "new-secret", 202);
    wait_for_status(&url, "second-secret", 202);
    wait_for_status(&url, "old-secret", 401);
    assert!(
        rotated_after < Duration::from_secs(2),
        "new configuration applied after {rotated_after:?}"
    );

    let info: serde_json::Value = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/agent_instance/info", env.ingest_url()))
        .header("X-Agent-Secret", "second-secret")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["id"], "inst_acc_two");
    assert_eq!(info["workspace_id"], "ws_rotate");
    assert_eq!(info["account_id"], "acc_two");
}

#[test]
fn sigterm_drains_in_flight_requests_before_exit() {
    let mut env = TestEnv::new("ingest_drain", "");
    env.apply_config(&metering_config(
        "ws_drain",
        &[("acc_one", "drain-secret")],
        "[tagging]\ntracked = [\"probe\"]\n",
    ));
    let ingest = env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let url = format!("{}/v1/actions", env.ingest_url());

    // Clients keep sending batches of 500 while the process is told to stop; every batch that
    // was answered 202 must be on the topic, and the process must exit cleanly.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let url = url.clone();
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                for batch in 0..40 {
                    let actions: Vec<_> = (0..500)
                        .map(|index| json!({"action_name": "probe", "event_id": format!("c{client}-b{batch}-{index}")}))
                        .collect();
                    let body = json!({ "actions": actions });
                    // 429: the agent's share of in-flight actions is taken by its other clients.
                    loop {
                        match post(&url, "drain-secret", &body) {
                            202 => {
                                accepted.fetch_add(500, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                            429 => std::thread::sleep(Duration::from_millis(20)),
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let status = env.process(ingest).terminate(Duration::from_secs(30));
    for client in clients {
        client.join().unwrap();
    }
    assert!(
        status.success(),
        "ingest exited with {status}\n{}",
        env.logs()
    );
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(accepted > 0, "no batch was accepted before the signal");
    let on_topic = env.read_topic("actions.raw").len();
    assert!(
        on_topic >= accepted,
        "{accepted} actions were acknowledged but only {on_topic} are on the topic"
    );
}
