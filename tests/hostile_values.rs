//! Hostile values against the whole pipeline (issue 9): normal traffic of two workspaces,
//! interleaved with actions of every extreme class — refused at ingest with a 400, accepted by
//! ingest but dead-lettered by the enricher (it knows the measures), published straight to
//! `actions.raw` past ingest, and straight to `actions.enriched` past the enricher. No stage
//! exits, every extreme action is refused or dead-lettered with its reason, and the normal
//! traffic's totals in ClickHouse are exactly what the test computes from what it sent.
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_enriched_action, encode_raw_action, CostSource, EnrichedAction};
use common::{dec, kafka_action, metering_config, Lcg, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const SECRET_A1: &str = "hostile-a1-secret";
const SECRET_A2: &str = "hostile-a2-secret";
const SECRET_B1: &str = "hostile-b1-secret";

/// Tracking and prices shared by both workspaces; `scan` has a custom measure.
const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "scan"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.00004" }]

[[cost_allocations]]
action = "scan"
measure = "pages"
quantity_attribute = "page_count"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.5" }]
"#;

fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// What one normal action adds to its (workspace, account, action) totals.
#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    actions: u64,
    quantity: Decimal,
    cost: Decimal,
}

/// A normal action and what it adds.
fn normal_action(random: &mut Lcg, index: usize) -> (Value, &'static str, Decimal, Decimal) {
    let id = format!("normal-{index}");
    match random.next(3) {
        0 => (
            json!({"event_id": id, "action_name": "web_search", "user_id": "u1"}),
            "web_search",
            Decimal::ONE,
            dec("0.005"),
        ),
        1 => {
            let (input, output) = (1 + random.next(5000), random.next(2000));
            let tokens = Decimal::from(input + output);
            (
                json!({"event_id": id, "action_name": "llm_call", "user_id": "u2",
                       "attributes": {"model": "gpt-4", "input_tokens": input, "output_tokens": output}}),
                "llm_call",
                tokens,
                tokens * dec("0.00004"),
            )
        }
        _ => {
            let pages = Decimal::new(random.next(100_000) as i64, 2);
            (
                json!({"event_id": id, "action_name": "scan", "anonymous_id": "anon",
                       "attributes": {"page_count": pages.to_string()}}),
                "scan",
                pages,
                pages * dec("0.5"),
            )
        }
    }
}

/// Requests ingest must refuse whole (400), each with the field its message must name.
fn refused_at_ingest() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"action_name": "llm_call", "attributes": {"input_tokens": i64::MAX, "output_tokens": 1}}),
            "input_tokens",
        ),
        (
            json!({"action_name": "llm_call", "attributes": {"input_tokens": 1_000_000_000_000_000i64}}),
            "input_tokens",
        ),
        (
            json!({"action_name": "llm_call", "attributes": {"total_tokens": "-1"}}),
            "total_tokens",
        ),
        (
            json!({"action_name": "web_search", "attributes": {"cost_usd": -0.5}}),
            "cost_usd",
        ),
        (
            json!({"action_name": "web_search", "attributes": {"cost_usd": "79228162514264337593543950335"}}),
            "cost_usd",
        ),
        (
            json!({"action_name": "web_search", "attributes": {"cost_usd": 1e300}}),
            "cost_usd",
        ),
        (json!({"action_name": "web\u{200B}search"}), "U+200B"),
        (json!({"action_name": "web_search "}), "whitespace"),
        (
            json!({"action_name": "web_search", "description": "bell\u{7}"}),
            "U+0007",
        ),
        (
            json!({"action_name": "web_search", "user_id": "admin\u{202E}"}),
            "U+202E",
        ),
        (
            json!({"action_name": "web_search", "attributes": {"ke\u{200D}y": 1}}),
            "U+200D",
        ),
        (
            json!({"action_name": "web_search", "occurred_at": "9999-12-31T23:59:59Z"}),
            "future",
        ),
    ]
}

fn post(url: &str, secret: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .post(url)
        .header("X-Agent-Secret", secret)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .expect("ingest reachable");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn extreme_values_never_stop_a_stage_and_normal_totals_stay_exact() {
    let mut env = TestEnv::new("hostile", "");
    env.apply_config(&metering_config(
        "ws_hostile_a",
        &[("acc_a1", SECRET_A1), ("acc_a2", SECRET_A2)],
        METERING,
    ));
    env.apply_config(&metering_config(
        "ws_hostile_b",
        &[("acc_b1", SECRET_B1)],
        METERING,
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
    let url = format!("{}/v1/actions", env.ingest_url());
    let agents = [
        ("ws_hostile_a", "acc_a1", SECRET_A1),
        ("ws_hostile_a", "acc_a2", SECRET_A2),
        ("ws_hostile_b", "acc_b1", SECRET_B1),
    ];

    let mut random = Lcg(9);
    let mut expected: BTreeMap<(String, String, String), Totals> = BTreeMap::new();
    let mut index = 0;
    let refusals = refused_at_ingest();
    let mut expected_dead_letters: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tried = 0;
    for _round in 0..12 {
        for (workspace, account, secret) in agents {
            // A normal batch, accepted whole.
            let mut items = Vec::new();
            for _ in 0..40 {
                let (item, name, quantity, cost) = normal_action(&mut random, index);
                index += 1;
                items.push(item);
                let totals = expected
                    .entry((workspace.into(), account.into(), name.into()))
                    .or_default();
                totals.actions += 1;
                totals.quantity += quantity;
                totals.cost += cost;
            }
            let (status, answer) = post(&url, secret, &json!({ "actions": items }));
            assert_eq!(status, 202, "{answer}");

            // A hostile item next to a normal one: the whole batch is refused, with the reason.
            let (hostile, field) = &refusals[tried % refusals.len()];
            tried += 1;
            let (normal, _, _, _) = normal_action(&mut random, 1_000_000 + index);
            let (status, answer) = post(&url, secret, &json!({ "actions": [normal, hostile] }));
            assert_eq!(status, 400, "{hostile}: {answer}");
            let message = answer["items"][0]["error"].as_str().unwrap_or_default();
            assert!(message.contains(field), "{hostile}: {answer}");
            assert_eq!(answer["items"][0]["index"], 1, "{answer}");
        }
    }
    assert!(tried >= refusals.len(), "every refusal class was tried");

    // Accepted by ingest (it does not know the measures), dead-lettered by the enricher.
    for (item, reason) in [
        (
            json!({"action_name": "scan", "attributes": {"page_count": "12345678901234567890123456"}}),
            "value_out_of_range",
        ),
        (
            json!({"action_name": "scan", "attributes": {"page_count": 1_000_000_000_000i64}}),
            "value_out_of_range",
        ),
        (
            json!({"action_name": "scan", "attributes": {"page_count": "-3"}}),
            "value_out_of_range",
        ),
    ] {
        let (status, answer) = post(&url, SECRET_A1, &json!({ "actions": [item] }));
        assert_eq!(status, 202, "{answer}");
        *expected_dead_letters.entry(reason).or_default() += 1;
    }

    // Published straight to actions.raw, past ingest's checks.
    let now = now_micros();
    let direct = |event_id: &str, name: &str| agentmeter_schemas::RawAction {
        occurred_at_micros: now,
        received_at_micros: now,
        ..kafka_action("ws_hostile_b", "acc_b1", event_id.into(), name)
    };
    let raw_extremes = [
        (
            agentmeter_schemas::RawAction {
                input_tokens: Some(i64::MAX),
                output_tokens: Some(i64::MAX),
                ..direct("raw-tokens", "llm_call")
            },
            "value_out_of_range",
        ),
        (
            agentmeter_schemas::RawAction {
                reported_cost: Some(dec("10000000000000000000000000")),
                ..direct("raw-cost", "web_search")
            },
            "value_out_of_range",
        ),
        (
            agentmeter_schemas::RawAction {
                occurred_at_micros: i64::MIN,
                ..direct("raw-time", "web_search")
            },
            "value_out_of_range",
        ),
        (
            agentmeter_schemas::RawAction {
                attributes_json: r#"{"input_tokens": 1000000000000000, "output_tokens": 5}"#.into(),
                ..direct("raw-attribute-tokens", "llm_call")
            },
            "value_out_of_range",
        ),
        (direct("raw-name", "web\0search"), "invalid_text"),
    ];
    for (action, reason) in &raw_extremes {
        env.produce(
            "actions.raw",
            &action.message_key(),
            &encode_raw_action(action).unwrap(),
        );
        *expected_dead_letters.entry(reason).or_default() += 1;
    }

    // Published straight to actions.enriched, past the enricher: the aggregator refuses them.
    let enriched = |event_id: &str, quantity: &str, cost: &str| EnrichedAction {
        raw: direct(event_id, "web_search"),
        tracked: true,
        outcome: false,
        measure: "unit".into(),
        quantity: dec(quantity),
        unit_cost: Decimal::ZERO,
        cost: dec(cost),
        cost_source: CostSource::Allocated,
        currency: "USD".into(),
        config_version: 1,
        enriched_at_micros: now,
    };
    for action in [
        enriched("enriched-quantity", "100000000000000000000", "0"),
        enriched("enriched-cost", "1", "-7"),
    ] {
        env.produce(
            "actions.enriched",
            &action.raw.message_key(),
            &encode_enriched_action(&action).unwrap(),
        );
        *expected_dead_letters
            .entry("value_out_of_range")
            .or_default() += 1;
    }

    // The normal traffic's totals are exact, per workspace, account and action.
    let expected_count: u64 = expected.values().map(|totals| totals.actions).sum();
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        expected_count,
        Duration::from_secs(120),
    );
    let rows = env.query(
        "SELECT workspace_id, account_id, action_name, sum(action_count), sum(quantity), sum(cost) \
         FROM usage_exact GROUP BY workspace_id, account_id, action_name \
         ORDER BY workspace_id, account_id, action_name",
    );
    let actual: BTreeMap<(String, String, String), Totals> = rows
        .iter()
        .map(|row| {
            (
                (row[0].clone(), row[1].clone(), row[2].clone()),
                Totals {
                    actions: row[3].parse().unwrap(),
                    quantity: dec(&row[4]),
                    cost: dec(&row[5]),
                },
            )
        })
        .collect();
    assert_eq!(actual, expected);

    // Every dead letter arrives, with its reason.
    let wanted: usize = expected_dead_letters.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = env.read_topic("actions.dlq");
        if dead.len() >= wanted || Instant::now() > deadline {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for record in &dead {
        *reasons
            .entry(match record.headers["agentmeter.dlq.reason"].as_str() {
                "value_out_of_range" => "value_out_of_range",
                "invalid_text" => "invalid_text",
                other => panic!("unexpected dead letter {other}: {:?}", record.headers),
            })
            .or_default() += 1;
    }
    assert_eq!(
        reasons,
        expected_dead_letters,
        "{:?}",
        dead.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    assert!(dead
        .iter()
        .any(|record| record.headers["agentmeter.dlq.message"].contains("page_count")));
    assert!(dead.iter().any(
        |record| record.headers["agentmeter.dlq.message"].contains("refused by the aggregator")
    ));

    // Nothing stopped, and nothing of the extremes reached ClickHouse.
    for stage in stages {
        let running = env.process(stage).is_running();
        let tag = env.process(stage).tag.clone();
        assert!(running, "{tag} exited\n{}", env.logs());
    }
    let leaked = env.query(
        "SELECT count() FROM actions FINAL WHERE event_id LIKE 'raw-%' OR event_id LIKE 'enriched-%' \
         OR quantity > 1000000000000 OR cost < 0 OR cost > 1000000000",
    );
    assert_eq!(leaked[0][0], "0");
    let readiness = reqwest::blocking::get(format!(
        "http://127.0.0.1:{}/readyz",
        env.run.aggregator_metrics_port
    ))
    .unwrap();
    assert_eq!(readiness.status().as_u16(), 200);
}
