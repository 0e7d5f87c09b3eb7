//! Explicit outcome events end to end over the real broker and ClickHouse (ADR 0005, section 1):
//! `POST /v1/outcomes` → ingest → actions.raw → enricher → actions.enriched → aggregator →
//! ClickHouse, each stage its own `agentmeter` process, plus a direct Kafka publisher. Bad
//! batches are refused whole with the item and field named, and write nothing; re-sent events
//! count once. The expected counts, quantities and costs are computed here from what was sent.
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{dec, kafka_action, metering_config, Lcg, TestEnv};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

const ACME_SECRET: &str = "test-secret-outcomes-acme-51d2";
const GLOBEX_SECRET: &str = "test-secret-outcomes-globex-0be8";
const WORKSPACE: &str = "ws_outcomes";

/// `lead_converted` is configured: tracked, an outcome definition (whose `when` never holds for
/// an action: it does not apply to outcome events), and a cost of 0.02 per unit of its value
/// (the measure a charge would bill it by). Every other outcome type is unknown to the
/// configuration and discovered. `web_search` is an ordinary priced action beside them.
const METERING: &str = r#"
[tagging]
tracked = ["web_search", "lead_converted"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "lead_converted"
measure = "value"
quantity_attribute = "value"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.02" }]

[[outcomes]]
action = "lead_converted"
when = { field = "attributes.never_set", exists = true }
"#;

const LEAD_RATE: &str = "0.02";
const WEB_SEARCH_RATE: &str = "0.005";

/// Expected totals of one (account, action name).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    actions: u64,
    quantity: Decimal,
    cost: Decimal,
    outcomes: u64,
}

/// One generated event: who sends it, its JSON item, and what it must count as.
struct Sent {
    account: &'static str,
    secret: &'static str,
    /// The JSON text of the item (numbers with more digits than a float holds are written as
    /// text, so the body is assembled from these texts).
    item: String,
    event_id: String,
    name: &'static str,
    user: String,
    quantity: Decimal,
    cost: Decimal,
    outcome: bool,
}

fn rfc3339(seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// `quantity × rate` rounded once, half to even, to 12 fractional digits (the enricher's rule).
fn priced(quantity: Decimal, rate: &str) -> Decimal {
    (quantity * dec(rate)).round_dp_with_strategy(12, RoundingStrategy::MidpointNearestEven)
}

fn generate(count: usize, now_seconds: i64) -> Vec<Sent> {
    let mut random = Lcg(11);
    (0..count)
        .map(|index| {
            let (account, secret) = if random.next(3) == 0 {
                ("acc_globex", GLOBEX_SECRET)
            } else {
                ("acc_acme", ACME_SECRET)
            };
            let user_number = random.next(5);
            let (user_field, user) = if user_number == 4 {
                ("anonymous_id", format!("anon_{account}_{}", random.next(2)))
            } else {
                ("user_id", format!("user_{account}_{user_number}"))
            };
            let occurred_at = rfc3339(now_seconds - random.next(3 * 3600) as i64);
            let event_id = format!("out-{index}");
            // The value as JSON text, and what it is exactly (None: absent, 1).
            let (value_json, value): (Option<String>, Decimal) = match random.next(7) {
                0 => (None, Decimal::ONE),
                1 => (Some("null".into()), Decimal::ONE),
                2 => {
                    let whole = 1 + random.next(5000);
                    (Some(whole.to_string()), Decimal::from(whole))
                }
                3 => {
                    // A decimal string with all 12 fractional digits.
                    let text = format!(
                        "{}.{:012}",
                        random.next(100_000),
                        random.next(1_000_000_000_000)
                    );
                    (Some(format!("\"{text}\"")), dec(&text))
                }
                4 => {
                    // A JSON number with 21 significant digits: a float would keep 17.
                    let text = format!(
                        "{}.{:012}",
                        100_000_000 + random.next(1 << 20),
                        random.next(1_000_000_000_000)
                    );
                    (Some(text.clone()), dec(&text))
                }
                5 => (Some("0".into()), Decimal::ZERO),
                _ => (Some("12.5".into()), dec("12.5")),
            };
            let (name, quantity, cost, outcome) = match random.next(4) {
                0 | 1 => ("lead_converted", value, priced(value, LEAD_RATE), true),
                2 => ("ticket_resolved", value, Decimal::ZERO, true),
                _ => ("web_search", Decimal::ONE, dec(WEB_SEARCH_RATE), false),
            };
            let item = if outcome {
                let mut item = json!({
                    "event_id": event_id,
                    "outcome_type": name,
                    "occurred_at": occurred_at,
                    "metadata": {"lead_id": format!("L-{index}"), "channel": "web"},
                });
                item[user_field] = json!(user);
                let text = item.to_string();
                match value_json {
                    // Splice the value's own text in: `{...,"value":<text>}`.
                    Some(value) => format!("{},\"value\":{value}}}", &text[..text.len() - 1]),
                    None => text,
                }
            } else {
                let mut item = json!({
                    "event_id": event_id,
                    "action_name": name,
                    "occurred_at": occurred_at,
                    "attributes": {"results_count": 3},
                });
                item[user_field] = json!(user);
                item.to_string()
            };
            Sent {
                account,
                secret,
                item,
                event_id,
                name,
                user,
                quantity,
                cost,
                outcome,
            }
        })
        .collect()
}

/// Posts a JSON body given as text; the status and the JSON answer.
fn post_text(url: &str, secret: Option<&str>, body: String) -> (u16, Value) {
    let mut request = reqwest::blocking::Client::new()
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(30));
    if let Some(secret) = secret {
        request = request.header("X-Agent-Secret", secret);
    }
    let response = request.send().expect("ingest reachable");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn batch(key: &str, items: &[&str]) -> String {
    format!("{{\"{key}\":[{}]}}", items.join(","))
}

fn error_of(answer: &Value, item: usize) -> (u64, String) {
    let entry = &answer["items"][item];
    (
        entry["index"].as_u64().unwrap_or(u64::MAX),
        entry["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn outcome_events_count_once_as_outcomes_with_their_exact_values() {
    let mut env = TestEnv::new("outcome_events", "");
    env.apply_config(&metering_config(
        WORKSPACE,
        &[("acc_acme", ACME_SECRET), ("acc_globex", GLOBEX_SECRET)],
        METERING,
    ));
    env.spawn("ingest", "ingest");
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let outcomes_url = format!("{}/v1/outcomes", env.ingest_url());
    let actions_url = format!("{}/v1/actions", env.ingest_url());

    // Bad batches: refused whole (400), the item's index and field named; nothing reaches Kafka
    // (checked below: the raw topic holds exactly the accepted events).
    let good = r#"{"event_id": "never-1", "outcome_type": "lead_converted", "value": 5}"#;
    let many_keys: serde_json::Map<String, Value> = (0..129)
        .map(|key| (format!("k{key}"), json!(key)))
        .collect();
    let too_many =
        json!({"event_id": "never-2", "outcome_type": "lead_converted", "metadata": many_keys})
            .to_string();
    let refusals: [(&str, String, &str); 5] = [
        (
            "negative value",
            r#"{"event_id": "never-3", "outcome_type": "lead_converted", "value": -5}"#.into(),
            "value -5 is negative",
        ),
        (
            "malformed value",
            r#"{"event_id": "never-4", "outcome_type": "lead_converted", "value": "12,5"}"#.into(),
            r#"value "12,5" is not a decimal number"#,
        ),
        (
            "too many metadata keys",
            too_many,
            "129 metadata keys; at most 128 are accepted",
        ),
        (
            "a value beyond the largest quantity",
            r#"{"event_id": "never-5", "outcome_type": "lead_converted", "value": "1000000000000.5"}"#.into(),
            "value 1000000000000.5 is outside the accepted range 0 to 1000000000000",
        ),
        (
            "a value of 13 fractional digits",
            r#"{"event_id": "never-6", "outcome_type": "ticket_resolved", "value": 0.0000000000001}"#.into(),
            "value 0.0000000000001 has more than 12 fractional digits",
        ),
    ];
    for (what, bad, message) in &refusals {
        let (status, answer) = post_text(
            &outcomes_url,
            Some(ACME_SECRET),
            batch("outcomes", &[good, bad]),
        );
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(
            answer["error"], "1 of 2 outcomes are invalid; nothing was accepted",
            "{what}"
        );
        let (index, error) = error_of(&answer, 0);
        assert_eq!(index, 1, "{what}: {answer}");
        assert!(error.starts_with(message), "{what}: {error}");
    }
    // The identity comes from the secret only; unknown fields are refused as on /v1/actions.
    let (status, answer) = post_text(
        &outcomes_url,
        Some(ACME_SECRET),
        batch(
            "outcomes",
            &[
                r#"{"event_id": "never-7", "outcome_type": "lead_converted", "account_id": "acc_globex"}"#,
            ],
        ),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body: unknown field `account_id`"),
        "{answer}"
    );
    let (status, answer) = post_text(
        &outcomes_url,
        Some("not-a-secret"),
        batch("outcomes", &[good]),
    );
    assert_eq!(status, 401, "{answer}");

    // The good events, in batches per account (outcomes and actions on their own endpoints).
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let sent = generate(600, now);
    let mut posted = 0usize;
    let mut first_outcome_batch: Option<(&str, String, usize)> = None;
    for account in ["acc_acme", "acc_globex"] {
        for (outcome, url, key) in [
            (true, &outcomes_url, "outcomes"),
            (false, &actions_url, "actions"),
        ] {
            let items: Vec<&Sent> = sent
                .iter()
                .filter(|s| s.account == account && s.outcome == outcome)
                .collect();
            for chunk in items.chunks(70) {
                let texts: Vec<&str> = chunk.iter().map(|s| s.item.as_str()).collect();
                let body = batch(key, &texts);
                let (status, answer) = post_text(url, Some(chunk[0].secret), body.clone());
                assert_eq!(status, 202, "{answer}");
                let ids: Vec<&str> = chunk.iter().map(|s| s.event_id.as_str()).collect();
                assert_eq!(answer["event_ids"], json!(ids));
                posted += chunk.len();
                if outcome && first_outcome_batch.is_none() {
                    first_outcome_batch = Some((chunk[0].secret, body, chunk.len()));
                }
            }
        }
    }
    // A client that did not see the answer re-sends a whole batch: counted once.
    let (secret, body, resent) = first_outcome_batch.unwrap();
    let (status, answer) = post_text(&outcomes_url, Some(secret), body);
    assert_eq!(status, 202, "{answer}");
    posted += resent;

    // A direct Kafka publisher sets kind outcome and outcome_value itself.
    let now_micros = now * 1_000_000;
    let direct = agentmeter_schemas::RawAction {
        kind: agentmeter_schemas::ActionKind::Outcome,
        user_id: Some("user_acc_globex_direct".into()),
        occurred_at_micros: now_micros,
        received_at_micros: now_micros,
        attributes_json: r#"{"lead_id":"L-direct"}"#.into(),
        outcome_value: Some(dec("2.75")),
        ..kafka_action(
            WORKSPACE,
            "acc_globex",
            "direct-outcome-1".into(),
            "lead_converted",
        )
    };
    env.produce(
        "actions.raw",
        &direct.message_key(),
        &agentmeter_schemas::encode_raw_action(&direct).unwrap(),
    );
    posted += 1;
    // Values a direct publisher may put in the record but ingest would have refused: dead
    // letters with the reason, and the stream goes on.
    for (event_id, value) in [
        ("direct-negative", "-1"),
        ("direct-huge", "1000000000000.000000000001"),
    ] {
        let hostile = agentmeter_schemas::RawAction {
            event_id: event_id.into(),
            outcome_value: Some(dec(value)),
            ..direct.clone()
        };
        env.produce(
            "actions.raw",
            &hostile.message_key(),
            &agentmeter_schemas::encode_raw_action(&hostile).unwrap(),
        );
        posted += 1;
    }

    // Expected, from what was sent.
    let mut expected: BTreeMap<(String, String), Totals> = BTreeMap::new();
    let mut add = |account: &str, name: &str, quantity: Decimal, cost: Decimal, outcome: bool| {
        let totals = expected
            .entry((account.to_string(), name.to_string()))
            .or_default();
        totals.actions += 1;
        totals.quantity += quantity;
        totals.cost += cost;
        totals.outcomes += u64::from(outcome);
    };
    for s in &sent {
        add(s.account, s.name, s.quantity, s.cost, s.outcome);
    }
    add(
        "acc_globex",
        "lead_converted",
        dec("2.75"),
        priced(dec("2.75"), LEAD_RATE),
        true,
    );
    let outcome_events = sent.iter().filter(|s| s.outcome).count() as u64 + 1;
    let unique = sent.len() as u64 + 1;

    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        unique,
        Duration::from_secs(120),
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        unique,
        Duration::from_secs(60),
    );

    // Exactly the accepted records reached Kafka (the refused batches added nothing), and only
    // the two hostile direct records were dead-lettered, for their value.
    assert_eq!(env.read_topic("actions.raw").len(), posted);
    let mut dead: Vec<(String, String)> = Vec::new();
    env.wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        dead = env
            .read_topic("actions.dlq")
            .iter()
            .map(|record| {
                let raw = agentmeter_schemas::decode_raw_action(&record.payload).unwrap();
                let reason = record.headers.get("agentmeter.dlq.reason").cloned();
                (raw.event_id, reason.unwrap_or_default())
            })
            .collect();
        dead.sort();
        (dead.len() == 2).then_some(()).ok_or(format!("{dead:?}"))
    });
    assert_eq!(
        dead,
        vec![
            ("direct-huge".to_string(), "value_out_of_range".to_string()),
            (
                "direct-negative".to_string(),
                "value_out_of_range".to_string()
            ),
        ]
    );
    let never = env.query(
        "SELECT count() FROM actions \
         WHERE event_id LIKE 'never-%' OR event_id IN ('direct-negative', 'direct-huge')",
    );
    assert_eq!(never[0][0], "0");

    // `actions`: one row per event, of kind outcome, measured by its value.
    let kinds = env.query(
        "SELECT kind, count(), countIf(tracked = 1), countIf(outcome = 1), countIf(measure = 'value') \
         FROM actions FINAL GROUP BY kind ORDER BY kind",
    );
    let web_searches = sent.len() as u64 + 1 - outcome_events;
    assert_eq!(
        kinds,
        vec![
            vec![
                "action".to_string(),
                web_searches.to_string(),
                web_searches.to_string(),
                "0".into(),
                "0".into()
            ],
            vec![
                "outcome".to_string(),
                outcome_events.to_string(),
                outcome_events.to_string(),
                outcome_events.to_string(),
                outcome_events.to_string()
            ],
        ]
    );
    // One event as it was sent: identity from the secret, metadata as attributes, exact value.
    let first_lead = sent
        .iter()
        .find(|s| s.name == "lead_converted" && s.quantity > dec("100000000"))
        .expect("a lead with a value of 21 digits");
    let row = env.query(&format!(
        "SELECT account_id, agent_instance_id, user_key, quantity, cost, cost_source, attributes_json \
         FROM actions FINAL WHERE event_id = '{}'",
        first_lead.event_id
    ));
    assert_eq!(row.len(), 1);
    assert_eq!(row[0][0], first_lead.account);
    assert_eq!(row[0][1], format!("inst_{}", first_lead.account));
    assert_eq!(row[0][2], first_lead.user);
    assert_eq!(dec(&row[0][3]), first_lead.quantity);
    assert_eq!(dec(&row[0][4]), first_lead.cost);
    assert_eq!(row[0][5], "allocated");
    assert!(row[0][6].contains("\"lead_id\""), "{}", row[0][6]);
    let direct_row = env.query(
        "SELECT kind, source, quantity, outcome FROM actions FINAL WHERE event_id = 'direct-outcome-1'",
    );
    assert_eq!(direct_row[0][0], "outcome");
    assert_eq!(direct_row[0][1], "kafka");
    assert_eq!(dec(&direct_row[0][2]), dec("2.75"));
    assert_eq!(direct_row[0][3], "1");

    // usage: every event once, @outcome once per outcome event, quantity the sum of values.
    let actual: BTreeMap<(String, String), Totals> = env
        .query(
            "SELECT account_id, action_name, sum(action_count), sum(quantity), sum(cost), sum(outcome_count) \
             FROM usage_exact GROUP BY account_id, action_name ORDER BY account_id, action_name",
        )
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

    // The billing views: @outcome of each type with quantity = the sum of its values (measure
    // `value`), the outcome view, and cost per month.
    let by_day: BTreeMap<(String, String, String), Totals> = env
        .query(
            "SELECT account_id, action_name, measure, sum(actions), sum(quantity), sum(cost), sum(outcomes) \
             FROM usage_by_account_day GROUP BY account_id, action_name, measure",
        )
        .iter()
        .map(|row| {
            let totals = Totals {
                actions: row[3].parse().unwrap(),
                quantity: dec(&row[4]),
                cost: dec(&row[5]),
                outcomes: row[6].parse().unwrap(),
            };
            ((row[0].clone(), row[1].clone(), row[2].clone()), totals)
        })
        .collect();
    let expected_by_day: BTreeMap<(String, String, String), Totals> = expected
        .iter()
        .map(|((account, name), totals)| {
            let measure = if name == "web_search" {
                "unit"
            } else {
                "value"
            };
            (
                (account.clone(), name.clone(), measure.to_string()),
                totals.clone(),
            )
        })
        .collect();
    assert_eq!(by_day, expected_by_day);
    let outcome_view: BTreeMap<(String, String), (u64, Decimal)> = env
        .query(
            "SELECT account_id, action_name, sum(outcomes), sum(cost) FROM outcomes_by_account_day \
             GROUP BY account_id, action_name",
        )
        .iter()
        .map(|row| ((row[0].clone(), row[1].clone()), (row[2].parse().unwrap(), dec(&row[3]))))
        .collect();
    let expected_outcome_view: BTreeMap<(String, String), (u64, Decimal)> = expected
        .iter()
        .filter(|(_, totals)| totals.outcomes > 0)
        .map(|(key, totals)| (key.clone(), (totals.outcomes, totals.cost)))
        .collect();
    assert_eq!(outcome_view, expected_outcome_view);
    for account in ["acc_acme", "acc_globex"] {
        let month = env.query(&format!(
            "SELECT sum(outcomes), sum(cost) FROM cost_by_account_month WHERE account_id = '{account}'"
        ));
        let outcomes: u64 = expected
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|(_, t)| t.outcomes)
            .sum();
        let cost: Decimal = expected
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|(_, t)| t.cost)
            .sum();
        assert_eq!(month[0][0], outcomes.to_string(), "{account}");
        assert_eq!(dec(&month[0][1]), cost, "{account}");
    }
    // Per user: the users the outcome events named, with their values.
    let mut expected_users: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.outcome) {
        *expected_users
            .entry((s.account.to_string(), s.user.clone()))
            .or_default() += s.quantity;
    }
    *expected_users
        .entry(("acc_globex".into(), "user_acc_globex_direct".into()))
        .or_default() += dec("2.75");
    let users: BTreeMap<(String, String), Decimal> = env
        .query(
            "SELECT account_id, user_key, sum(quantity) FROM usage_by_user_day \
             WHERE action_name != 'web_search' GROUP BY account_id, user_key",
        )
        .iter()
        .map(|row| ((row[0].clone(), row[1].clone()), dec(&row[2])))
        .collect();
    assert_eq!(users, expected_users);
    // Live Data shows them as @outcome.
    let live: BTreeSet<(String, String)> = env
        .query("SELECT DISTINCT value_action_name, measure FROM live_data")
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect();
    assert_eq!(
        live,
        BTreeSet::from([
            ("lead_converted".to_string(), "@outcome".to_string()),
            ("ticket_resolved".to_string(), "@outcome".to_string()),
            ("web_search".to_string(), "@action".to_string()),
        ])
    );
}
