//! The enricher against the real broker: live configuration changes, effective-dated rates, and
//! dead letters that do not stop the stream. Raw actions are published straight to
//! `actions.raw` (the direct-Kafka path); results are read back from `actions.enriched` and
//! `actions.dlq`.
#![cfg(feature = "integration")]

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use agentmeter_schemas::{decode_enriched_action, encode_raw_action, EnrichedAction, RawAction};
use common::{kafka_action, metering_config, metrics_text, TestEnv};
use rust_decimal::Decimal;

const SECRET: &str = "enricher-test-secret";

fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

fn rfc3339(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(micros / 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn raw(event_id: &str, action_name: &str, occurred_at_micros: i64) -> RawAction {
    RawAction {
        user_id: Some("u1".into()),
        occurred_at_micros,
        received_at_micros: now_micros(),
        ..kafka_action("ws_enrich", "acc_one", event_id.into(), action_name)
    }
}

fn publish(env: &TestEnv, action: &RawAction) {
    env.produce(
        "actions.raw",
        &action.message_key(),
        &encode_raw_action(action).unwrap(),
    );
}

/// Waits until `actions.enriched` holds `count` records; returns them by event id order.
fn enriched(env: &TestEnv, count: usize) -> Vec<EnrichedAction> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = env.read_topic("actions.enriched");
        if records.len() >= count {
            let mut actions: Vec<EnrichedAction> = records
                .iter()
                .map(|record| decode_enriched_action(&record.payload).unwrap())
                .collect();
            actions.sort_by(|a, b| a.raw.event_id.cmp(&b.raw.event_id));
            return actions;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} enriched\n{}",
            records.len(),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

fn pricing(rates: &str) -> String {
    format!(
        "[tagging]\ntracked = [\"web_search\"]\n\n[[cost_allocations]]\naction = \"web_search\"\nmeasure = \"unit\"\nrates = [{rates}]\n"
    )
}

#[test]
fn config_change_mid_stream_prices_later_actions_only() {
    let mut env = TestEnv::new("enrich_live", "");
    let first = pricing(r#"{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.01" }"#);
    env.apply_config(&metering_config(
        "ws_enrich",
        &[("acc_one", SECRET)],
        &first,
    ));
    env.spawn("enrich", "enrich");
    let now = now_micros();
    for index in 0..5 {
        publish(&env, &raw(&format!("a-{index}"), "web_search", now));
    }
    let before = enriched(&env, 5);
    assert!(before
        .iter()
        .all(|action| action.cost == dec("0.01") && action.config_version == 1));

    // A new version (a higher price, and a new outcome) applies without restart, within 2 s.
    let second = format!(
        "{}\n[[outcomes]]\naction = \"web_search\"\n",
        pricing(r#"{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.02" }"#)
    );
    let output = env.apply_config(&metering_config(
        "ws_enrich",
        &[("acc_one", SECRET)],
        &second,
    ));
    assert!(output.contains("applied version 2"), "{output}");
    assert!(output.contains("outcomes added: web_search"), "{output}");
    std::thread::sleep(Duration::from_secs(2));
    for index in 0..5 {
        publish(&env, &raw(&format!("b-{index}"), "web_search", now));
    }
    let all = enriched(&env, 10);
    for action in &all {
        let later = action.raw.event_id.starts_with("b-");
        let (cost, version) = if later {
            (dec("0.02"), 2)
        } else {
            (dec("0.01"), 1)
        };
        assert_eq!(
            (action.cost, action.config_version, action.outcome),
            (cost, version, later),
            "{}",
            action.raw.event_id
        );
    }
    // Applying the same file again changes nothing.
    let again = env.apply_config(&metering_config(
        "ws_enrich",
        &[("acc_one", SECRET)],
        &second,
    ));
    assert!(again.contains("unchanged (version 2)"), "{again}");
}

#[test]
fn rate_effective_between_two_actions_prices_each_by_its_own_time() {
    let mut env = TestEnv::new("enrich_rates", "");
    let now = now_micros();
    let change = now - 3_600_000_000;
    let rates = format!(
        r#"{{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.01" }}, {{ effective_from = "{}", cost_per_unit = "0.05" }}"#,
        rfc3339(change)
    );
    env.apply_config(&metering_config(
        "ws_enrich",
        &[("acc_one", SECRET)],
        &pricing(&rates),
    ));
    env.spawn("enrich", "enrich");
    // Sent in the "wrong" order: the late action arrives after the recent one.
    publish(&env, &raw("1-after", "web_search", change + 1_000_000));
    publish(&env, &raw("2-before", "web_search", change - 1_000_000));
    publish(
        &env,
        &raw("3-exactly", "web_search", change - change % 1_000_000),
    );
    let actions = enriched(&env, 3);
    let cost_of = |id: &str| actions.iter().find(|a| a.raw.event_id == id).unwrap().cost;
    assert_eq!(cost_of("1-after"), dec("0.05"));
    assert_eq!(cost_of("2-before"), dec("0.01"));
    assert_eq!(
        cost_of("3-exactly"),
        dec("0.05"),
        "a rate applies from its effective_from, inclusive"
    );
}

#[test]
fn poison_and_unknown_instance_are_dead_lettered_and_the_stream_goes_on() {
    let mut env = TestEnv::new("enrich_dlq", "");
    env.apply_config(&metering_config(
        "ws_enrich",
        &[("acc_one", SECRET)],
        &pricing(r#"{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.01" }"#),
    ));
    env.spawn("enrich", "enrich");
    let now = now_micros();
    let poison = b"{\"not\": \"avro\"}".to_vec();
    env.produce("actions.raw", "poison-key", &poison);
    let mut stranger = raw("stranger", "web_search", now);
    stranger.agent_instance_id = "inst_unknown".into();
    publish(&env, &stranger);
    let mut other_workspace = raw("other-ws", "web_search", now);
    other_workspace.workspace_id = "ws_nobody".into();
    publish(&env, &other_workspace);
    let mut too_old = raw("too-old", "web_search", now - 40 * 86_400_000_000);
    too_old.received_at_micros = now;
    publish(&env, &too_old);
    publish(&env, &raw("good", "web_search", now));

    let good = enriched(&env, 1);
    assert_eq!(good.len(), 1);
    assert_eq!(
        (good[0].raw.event_id.as_str(), good[0].cost),
        ("good", dec("0.01"))
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = env.read_topic("actions.dlq");
        if dead.len() >= 4 || Instant::now() > deadline {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .map(|record| {
            (
                record.headers["agentmeter.dlq.reason"].clone(),
                record.headers["agentmeter.dlq.message"].clone(),
            )
        })
        .collect();
    reasons.sort();
    let codes: Vec<&str> = reasons.iter().map(|(code, _)| code.as_str()).collect();
    assert_eq!(
        codes,
        vec![
            "outside_time_window",
            "undecodable",
            "unknown_agent_instance",
            "unknown_workspace"
        ],
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(_, message)| message.contains("inst_unknown")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(_, message)| message.contains("C3 01")),
        "{reasons:?}"
    );
    // The dead letter keeps the original bytes and says where they came from.
    let poison_record = dead
        .iter()
        .find(|record| record.headers["agentmeter.dlq.reason"] == "undecodable")
        .unwrap();
    assert_eq!(poison_record.payload, poison);
    assert!(poison_record.headers["agentmeter.dlq.source"].contains("actions.raw/"));
    let metrics = metrics_text(env.run.enricher_metrics_port).expect("enricher /metrics");
    assert!(
        metrics.lines().any(|line| line
            .starts_with("agentmeter_enricher_dead_letters_total{reason=\"undecodable\"} 1")),
        "{metrics}"
    );
    // Consumer lag comes from librdkafka statistics every 5 s: once everything is handled, the
    // partitions that had records report 0.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = metrics_text(env.run.enricher_metrics_port).expect("enricher /metrics");
        let lags: Vec<&str> = metrics
            .lines()
            .filter(|line| line.starts_with("agentmeter_enricher_consumer_lag{partition="))
            .collect();
        if !lags.is_empty() && lags.iter().all(|line| line.ends_with(" 0")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer lag never reported 0: {lags:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
