//! End to end over the real broker and ClickHouse: REST → ingest → actions.raw → enricher →
//! actions.enriched → aggregator → ClickHouse, each stage its own `agentmeter` process.
//! Expected totals are computed here, independently, from what the test sends.
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{dec, metering_config, Lcg, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const ACME_SECRET: &str = "test-secret-acme-3f9a";
const GLOBEX_SECRET: &str = "test-secret-globex-77c1";

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "object_detection", "delivery"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.000041" }]

[[cost_allocations]]
action = "object_detection"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.0125" }]

[[outcomes]]
action = "object_detection"
"#;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    actions: u64,
    quantity: Decimal,
    cost: Decimal,
    outcomes: u64,
}

/// One generated action: (account, secret, JSON body item, expected key, quantity, cost, outcome).
struct Generated {
    account: &'static str,
    secret: &'static str,
    item: Value,
    action_name: &'static str,
    user: String,
    quantity: Decimal,
    cost: Decimal,
    outcome: bool,
    tracked: bool,
}

fn generate(count: usize, now_seconds: i64) -> Vec<Generated> {
    let mut random = Lcg(42);
    (0..count)
        .map(|index| {
            let (account, secret) = if random.next(3) == 0 { ("acc_globex", GLOBEX_SECRET) } else { ("acc_acme", ACME_SECRET) };
            let user_number = random.next(6);
            // Some users are anonymous: user_id absent, anonymous_id set.
            let (user_field, user) = if user_number == 5 {
                ("anonymous_id", format!("anon_{account}_{}", random.next(3)))
            } else {
                ("user_id", format!("user_{account}_{user_number}"))
            };
            let occurred = now_seconds - random.next(3 * 3600) as i64;
            let occurred_at = time::OffsetDateTime::from_unix_timestamp(occurred)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let event_id = format!("e2e-{index}");
            let (action_name, attributes, quantity, cost, tracked) = match random.next(10) {
                0..=2 => ("web_search", json!({"results_count": 3}), dec("1"), dec("0.005"), true),
                3..=5 => {
                    let input = 100 + random.next(4000);
                    let output = random.next(1500);
                    // Token counts as numbers or as strings of digits: both are accepted.
                    let attributes = if index % 2 == 0 {
                        json!({"model": "gpt-4", "input_tokens": input, "output_tokens": output, "cost_usd": 0.12})
                    } else {
                        json!({"model": "gpt-4", "input_tokens": input.to_string(), "output_tokens": output.to_string()})
                    };
                    let tokens = Decimal::from(input + output);
                    ("llm_call", attributes, tokens, tokens * dec("0.000041"), true)
                }
                6 => ("object_detection", json!({"detected_boxes": 4}), dec("1"), dec("0.0125"), true),
                7..=8 => ("delivery", json!({"delivery_method": "email"}), Decimal::ZERO, Decimal::ZERO, true),
                _ => ("step_1", json!({}), Decimal::ZERO, Decimal::ZERO, false),
            };
            let mut item = json!({
                "event_id": event_id,
                "action_name": action_name,
                "occurred_at": occurred_at,
                "description": format!("generated action {index}"),
                "attributes": attributes,
            });
            item[user_field] = json!(user);
            Generated {
                account,
                secret,
                item,
                action_name,
                user,
                quantity,
                cost,
                outcome: action_name == "object_detection",
                tracked,
            }
        })
        .collect()
}

fn post(url: &str, secret: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::blocking::Client::new()
        .post(url)
        .json(body)
        .timeout(Duration::from_secs(30));
    if let Some(secret) = secret {
        request = request.header("X-Agent-Secret", secret);
    }
    let response = request.send().expect("ingest reachable");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn rest_actions_reach_clickhouse_with_exact_counts_and_costs() {
    let mut env = TestEnv::new("e2e", "");
    env.apply_config(&metering_config(
        "ws_e2e",
        &[("acc_acme", ACME_SECRET), ("acc_globex", GLOBEX_SECRET)],
        METERING,
    ));
    env.spawn("ingest", "ingest");
    // Small output runs: each enricher batch goes to Kafka in several runs, one acknowledged
    // after the other (enricher.produce_chunk_max_bytes), and the totals below must still hold.
    env.spawn_with_env(
        "enrich",
        "enrich",
        &[("AGENTMETER__ENRICHER__PRODUCE_CHUNK_MAX_BYTES", "16384")],
    );
    env.spawn("aggregate", "aggregate");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let generated = generate(3000, now);
    let url = format!("{}/v1/actions", env.ingest_url());

    // A wrong secret is refused and nothing of it reaches Kafka (checked below by the count).
    let (status, body) = post(
        &url,
        Some("not-a-secret"),
        &json!({"actions": [generated[0].item.clone()]}),
    );
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown agent secret"),
        "{body}"
    );
    let (status, body) = post(&url, None, &json!({"actions": [generated[0].item.clone()]}));
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("X-Agent-Secret"),
        "{body}"
    );

    for account in ["acc_acme", "acc_globex"] {
        let items: Vec<&Generated> = generated.iter().filter(|g| g.account == account).collect();
        for chunk in items.chunks(400) {
            let body = json!({"actions": chunk.iter().map(|g| g.item.clone()).collect::<Vec<_>>()});
            let (status, answer) = post(&url, Some(chunk[0].secret), &body);
            assert_eq!(status, 202, "{answer}");
            assert_eq!(answer["accepted"].as_u64(), Some(chunk.len() as u64));
        }
    }

    // Expected totals, computed from what was sent.
    let mut expected: BTreeMap<(String, String), Totals> = BTreeMap::new();
    let mut expected_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for g in &generated {
        let totals = expected
            .entry((g.account.to_string(), g.action_name.to_string()))
            .or_default();
        totals.actions += 1;
        if g.tracked {
            totals.quantity += g.quantity;
            totals.cost += g.cost;
            totals.outcomes += u64::from(g.outcome);
            expected_users
                .entry(g.account.to_string())
                .or_default()
                .insert(g.user.clone());
        }
    }

    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        3000,
        Duration::from_secs(120),
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        3000,
        Duration::from_secs(60),
    );

    // Exactly the accepted actions reached Kafka: the 401s added nothing.
    assert_eq!(env.read_topic("actions.raw").len(), 3000);
    assert!(
        env.read_topic("actions.dlq").is_empty(),
        "unexpected dead letters"
    );

    let rows = env.query(
        "SELECT account_id, action_name, sum(action_count), sum(quantity), sum(cost), sum(outcome_count) \
         FROM usage_exact GROUP BY account_id, action_name ORDER BY account_id, action_name",
    );
    let actual: BTreeMap<(String, String), Totals> = rows
        .iter()
        .map(|row| {
            let totals = Totals {
                actions: row[2].parse().unwrap(),
                quantity: dec(&row[3]),
                cost: dec(&row[4]),
                outcomes: row[5].parse().unwrap(),
            };
            ((row[0].clone(), row[1].clone()), totals)
        })
        .collect();
    assert_eq!(actual, expected);

    // Billing views see only tracked actions, with the same exact costs.
    let billable_cost: BTreeMap<String, Decimal> = env
        .query("SELECT account_id, sum(cost) FROM cost_by_account_month GROUP BY account_id ORDER BY account_id")
        .iter()
        .map(|row| (row[0].clone(), dec(&row[1])))
        .collect();
    for account in ["acc_acme", "acc_globex"] {
        let expected_cost: Decimal = expected
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|(_, totals)| totals.cost)
            .sum();
        assert_eq!(billable_cost[account], expected_cost, "cost of {account}");
        assert!(expected_cost > Decimal::ZERO);
    }
    let untracked_in_billing =
        env.query("SELECT count() FROM usage_by_account_day WHERE action_name = 'step_1'");
    assert_eq!(untracked_in_billing[0][0], "0");

    // @user: distinct users (user_id, else anonymous_id) with billable actions.
    let users: BTreeMap<String, u64> = env
        .query("SELECT account_id, sum(users) FROM users_by_account_month GROUP BY account_id ORDER BY account_id")
        .iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect();
    for (account, names) in &expected_users {
        assert_eq!(users[account], names.len() as u64, "@user of {account}");
    }

    // Every action is in `actions` with its own cost, tokens from attributes, and identity from
    // the secret.
    let llm = env.query(
        "SELECT count(), sum(input_tokens + output_tokens), sum(cost), countIf(reported_cost IS NOT NULL) \
         FROM actions FINAL WHERE action_name = 'llm_call'",
    );
    let expected_llm_tokens: Decimal = expected
        .iter()
        .filter(|((_, a), _)| a == "llm_call")
        .map(|(_, t)| t.quantity)
        .sum();
    let expected_llm_cost: Decimal = expected
        .iter()
        .filter(|((_, a), _)| a == "llm_call")
        .map(|(_, t)| t.cost)
        .sum();
    assert_eq!(dec(&llm[0][1]), expected_llm_tokens);
    assert_eq!(dec(&llm[0][2]), expected_llm_cost);
    let with_reported_cost = generated
        .iter()
        .filter(|g| g.action_name == "llm_call" && g.item["attributes"].get("cost_usd").is_some())
        .count();
    assert_eq!(llm[0][3], with_reported_cost.to_string());
    let identities = env.query("SELECT DISTINCT workspace_id, account_id, agent_instance_id FROM actions FINAL ORDER BY account_id");
    assert_eq!(
        identities,
        vec![
            vec![
                "ws_e2e".to_string(),
                "acc_acme".into(),
                "inst_acc_acme".into()
            ],
            vec![
                "ws_e2e".to_string(),
                "acc_globex".into(),
                "inst_acc_globex".into()
            ],
        ]
    );
}

#[test]
fn rejected_requests_write_nothing_to_kafka() {
    let mut env = TestEnv::new("e2e_reject", "");
    env.apply_config(&metering_config(
        "ws_reject",
        &[("acc_acme", ACME_SECRET)],
        "[tagging]\ntracked = [\"web_search\"]\n",
    ));
    env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let url = format!("{}/v1/actions", env.ingest_url());

    // One bad item rejects the whole batch, with the item's index and what is wrong.
    let batch = json!({"actions": [
        {"action_name": "web_search", "user_id": "u1"},
        {"action_name": "web_search", "user_id": "u1", "occurred_at": "2001-01-01T00:00:00Z"},
        {"action_name": "web_search", "user_id": "u1", "attributes": {"input_tokens": "lots"}},
    ]});
    let (status, body) = post(&url, Some(ACME_SECRET), &batch);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["items"][0]["index"], 1);
    assert!(
        body["items"][0]["error"]
            .as_str()
            .unwrap()
            .contains("in the past"),
        "{body}"
    );
    assert_eq!(body["items"][1]["index"], 2);
    assert!(
        body["items"][1]["error"]
            .as_str()
            .unwrap()
            .contains("input_tokens"),
        "{body}"
    );

    let (status, body) = post(&url, Some(ACME_SECRET), &json!({"actions": []}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&url, Some(ACME_SECRET), &json!({"nothing": true}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid JSON body"),
        "{body}"
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"action_name": "web_search"}))
        .collect();
    let (status, body) = post(&url, Some(ACME_SECRET), &json!({"actions": too_many}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("1 to 1000"),
        "{body}"
    );
    let (status, _) = post(
        &url,
        Some("wrong"),
        &json!({"actions": [{"action_name": "web_search"}]}),
    );
    assert_eq!(status, 401);

    // The one good request after them is the only thing on the topic.
    let (status, body) = post(
        &url,
        Some(ACME_SECRET),
        &json!({"actions": [{"action_name": "web_search", "event_id": "only-one"}]}),
    );
    assert_eq!(status, 202, "{body}");
    let records = env.read_topic("actions.raw");
    assert_eq!(records.len(), 1);
    let action = agentmeter_schemas::decode_raw_action(&records[0].payload).unwrap();
    assert_eq!(
        (action.event_id.as_str(), action.account_id.as_str()),
        ("only-one", "acc_acme")
    );
}
