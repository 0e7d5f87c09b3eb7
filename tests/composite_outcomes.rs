//! Composite and conditional outcomes end to end (issue 11, ADR 0005): REST → ingest → enricher
//! → aggregator → ClickHouse → `agentmeter outcomes`, each its own process, against the real
//! broker and ClickHouse. The expected firings are computed here from what the test sends,
//! session by session, never by the matcher under test.
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::{clickhouse_query, free_port, metering_config, post_until_accepted, Lcg, TestEnv};
use serde_json::{json, Value};

const SECRET_A: &str = "test-secret-composite-a-51c2";
const SECRET_B: &str = "test-secret-composite-b-09de";

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "delivery", "lead_qualified", "contract_signed"]

[[outcomes]]
action = "contract_signed"
when = { field = "attributes.amount", ge = "1000" }

[[composite_outcomes]]
name = "research_completed"
steps = [
    { action = "web_search" },
    { action = "llm_call" },
    { action = "delivery", when = { field = "attributes.status", eq = "success" } },
]
ordered = true
within = "15m"
context = "user"

[[composite_outcomes]]
name = "lead_converted"
steps = [{ action = "lead_qualified" }, { action = "contract_signed" }]
within = "30days"
context = "attributes.lead_id"
"#;

/// One action the test sends, and whether it is held back to arrive late.
#[derive(Debug, Clone)]
struct Sent {
    account: &'static str,
    item: Value,
    late: bool,
}

/// What the test expects, per (account, outcome name).
#[derive(Debug, Default)]
struct Expected {
    outcomes: BTreeMap<(String, String), u64>,
    /// Firings that a late constituent replaces by another of the same session.
    replaced: u64,
}

impl Expected {
    fn add(&mut self, account: &str, name: &str) {
        *self
            .outcomes
            .entry((account.to_string(), name.to_string()))
            .or_default() += 1;
    }
}

fn item(event_id: String, name: &str, user: &str, at: i64, attributes: Value) -> Value {
    let occurred_at = time::OffsetDateTime::from_unix_timestamp(at)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json!({
        "event_id": event_id,
        "action_name": name,
        "user_id": user,
        "occurred_at": occurred_at,
        "attributes": attributes,
    })
}

/// Research sessions (an hour apart, so no two can pair) and leads of two accounts, with the
/// outcomes each must make.
fn workload(now: i64) -> (Vec<Sent>, Expected) {
    let mut random = Lcg(20261204);
    let mut sent = Vec::new();
    let mut expected = Expected::default();
    let base = now - 3 * 86_400 - now % 3_600;
    for account in ["a", "b"] {
        for user in 0..4 {
            let user_id = format!("user-{user}");
            for session in 0..6 {
                let start = base + (user * 7 + session) * 3_600;
                let id = |step: &str| format!("{account}-{user}-{session}-{step}");
                let mut push = |step: &str, name: &str, offset: i64, attributes: Value, late| {
                    sent.push(Sent {
                        account,
                        item: item(id(step), name, &user_id, start + offset, attributes),
                        late,
                    })
                };
                match random.next(7) {
                    // In order: fires once. Every third session's llm_call arrives late.
                    0 | 1 => {
                        push("ws", "web_search", 0, json!({}), false);
                        push("llm", "llm_call", 60, json!({}), session % 3 == 0);
                        push("del", "delivery", 120, json!({"status": "success"}), false);
                        expected.add(account, "research_completed");
                    }
                    // A failed delivery is no instance of the step; the later successful one
                    // completes the firing.
                    2 => {
                        push("ws", "web_search", 0, json!({}), false);
                        push("llm", "llm_call", 60, json!({}), false);
                        push("del1", "delivery", 120, json!({"status": "failed"}), false);
                        push("del2", "delivery", 300, json!({"status": "success"}), false);
                        expected.add(account, "research_completed");
                    }
                    // No llm_call: never fires.
                    3 => {
                        push("ws", "web_search", 0, json!({}), false);
                        push("del", "delivery", 120, json!({"status": "success"}), false);
                    }
                    // Out of order (llm_call before web_search): an ordered outcome never fires.
                    4 => {
                        push("llm", "llm_call", 0, json!({}), false);
                        push("ws", "web_search", 60, json!({}), false);
                        push("del", "delivery", 120, json!({"status": "success"}), false);
                    }
                    // Fires; a second successful delivery arrives late: the session's
                    // web_search and llm_call are consumed, so it makes no second firing.
                    5 => {
                        push("ws", "web_search", 0, json!({}), false);
                        push("llm", "llm_call", 60, json!({}), false);
                        push("del", "delivery", 120, json!({"status": "success"}), false);
                        push("del9", "delivery", 400, json!({"status": "success"}), true);
                        expected.add(account, "research_completed");
                    }
                    // Fires, then an earlier web_search arrives late and takes the first one's
                    // place: the firing is replaced (one retraction), still one outcome.
                    _ => {
                        push("ws0", "web_search", -60, json!({}), true);
                        push("ws", "web_search", 0, json!({}), false);
                        push("llm", "llm_call", 60, json!({}), false);
                        push("del", "delivery", 120, json!({"status": "success"}), false);
                        expected.add(account, "research_completed");
                        expected.replaced += 1;
                    }
                }
            }
        }
        for lead in 0..8 {
            let lead_id = format!("lead-{account}-{lead}");
            let qualifier = format!("user-{}", random.next(4));
            let signer = format!("user-{}", random.next(4));
            let amount = if random.next(2) == 0 { 1_500 } else { 400 };
            let id = |step: &str| format!("{lead_id}-{step}");
            let attributes = |amount: Option<i64>| match amount {
                Some(amount) => json!({"lead_id": lead_id, "amount": amount}),
                None => json!({"lead_id": lead_id}),
            };
            let qualified_at = now - 20 * 86_400 + lead * 600;
            let mut signed = |at: i64, late: bool, sent: &mut Vec<Sent>| {
                sent.push(Sent {
                    account,
                    item: item(
                        id("signed"),
                        "contract_signed",
                        &signer,
                        at,
                        attributes(Some(amount)),
                    ),
                    late,
                });
                if amount >= 1_000 {
                    expected.add(account, "contract_signed");
                }
            };
            match random.next(4) {
                // Signed two days later (by another user, perhaps): converted. Half of them
                // arrive before the qualification they complete.
                0 | 1 => {
                    signed(qualified_at + 2 * 86_400, false, &mut sent);
                    sent.push(Sent {
                        account,
                        item: item(
                            id("qualified"),
                            "lead_qualified",
                            &qualifier,
                            qualified_at,
                            attributes(None),
                        ),
                        late: lead % 2 == 0,
                    });
                    expected.add(account, "lead_converted");
                }
                // Qualified only.
                2 => sent.push(Sent {
                    account,
                    item: item(
                        id("qualified"),
                        "lead_qualified",
                        &qualifier,
                        qualified_at,
                        attributes(None),
                    ),
                    late: false,
                }),
                // Signed 33 days after qualifying: outside the 30-day window.
                _ => {
                    sent.push(Sent {
                        account,
                        item: item(
                            id("qualified"),
                            "lead_qualified",
                            &qualifier,
                            now - 34 * 86_400 + lead * 60,
                            attributes(None),
                        ),
                        late: false,
                    });
                    signed(now - 86_400, false, &mut sent);
                }
            }
        }
    }
    // Arrival order: shuffled, so users, accounts and partitions interleave.
    for index in (1..sent.len()).rev() {
        let other = random.next(index as u64 + 1) as usize;
        sent.swap(index, other);
    }
    (sent, expected)
}

fn send(env: &TestEnv, client: &reqwest::blocking::Client, batch: &[&Sent]) {
    for account in ["a", "b"] {
        let items: Vec<Value> = batch
            .iter()
            .filter(|sent| sent.account == account)
            .map(|sent| sent.item.clone())
            .collect();
        if items.is_empty() {
            continue;
        }
        let secret = if account == "a" { SECRET_A } else { SECRET_B };
        post_until_accepted(
            client,
            &format!("{}/v1/actions", env.ingest_url()),
            secret,
            &json!({ "actions": items }),
            Duration::from_secs(60),
            Duration::from_millis(200),
        );
    }
}

/// Waits until the outcomes stage's progress covers, on every partition, every action the
/// aggregator has stored.
fn wait_until_every_stored_action_is_derived(env: &TestEnv) {
    let per_partition = |sql: &str| -> BTreeMap<String, u64> {
        env.query(sql)
            .into_iter()
            .map(|row| (row[0].clone(), row[1].parse().unwrap()))
            .collect()
    };
    env.wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        let stored = per_partition(
            "SELECT toString(source_partition), max(source_offset) + 1 FROM actions \
             WHERE source_partition != 4294967295 GROUP BY source_partition",
        );
        let derived = per_partition(
            "SELECT replaceOne(key, 'partition:', ''), value FROM outcomes_progress FINAL \
             WHERE key LIKE 'partition:%'",
        );
        if stored
            .iter()
            .all(|(partition, end)| derived.get(partition).is_some_and(|at| at >= end))
        {
            Ok(())
        } else {
            Err(format!(
                "the outcomes stage derived up to {derived:?} of {stored:?}"
            ))
        }
    });
}

/// (account, outcome) → count, from a query answering those three columns.
fn counts(rows: Vec<Vec<String>>) -> BTreeMap<(String, String), u64> {
    rows.into_iter()
        .map(|row| ((row[0].clone(), row[1].clone()), row[2].parse().unwrap()))
        .collect()
}

const FIRINGS_BY_ACCOUNT: &str =
    "SELECT replaceOne(account_id, 'acct_', ''), action_name, count() \
     FROM actions FINAL WHERE kind = 'derived_outcome' GROUP BY account_id, action_name \
     ORDER BY account_id, action_name";
const OUTCOMES_IN_USAGE: &str =
    "SELECT replaceOne(account_id, 'acct_', ''), action_name, toUInt64(sum(outcomes)) \
     FROM outcomes_by_account_day GROUP BY account_id, action_name HAVING sum(outcomes) > 0 \
     ORDER BY account_id, action_name";
const FIRING_ROWS: &str = "SELECT event_id, account_id, agent_instance_id, action_name, user_key, \
     occurred_at_micros, attributes_json FROM actions FINAL WHERE kind = 'derived_outcome' ORDER BY event_id";
const FIRING_USAGE: &str = "SELECT window_start, account_id, agent_instance_id, user_key, action_name, \
     batch_start, outcome_count FROM usage FINAL WHERE source_partition = 4294967295 AND outcome_count > 0 \
     ORDER BY window_start, account_id, agent_instance_id, user_key, action_name, batch_start";

#[test]
fn composite_outcomes_equal_the_sessions_sent_despite_late_constituents_duplicates_and_kills() {
    let outcomes_port = free_port();
    let mut env = TestEnv::new(
        "composite_outcomes",
        &format!(
            // Few contexts per query: a run derives its contexts in several chunks.
            "\n[outcomes]\nmetrics_listen = \"127.0.0.1:{outcomes_port}\"\ninterval = \"200ms\"\ncontexts_per_query = 7\n"
        ),
    );
    let config = metering_config(
        "ws_composite",
        &[("acct_a", SECRET_A), ("acct_b", SECRET_B)],
        METERING,
    );
    env.apply_config(&config);
    env.spawn("ingest", "ingest");
    env.spawn("enrich", "enricher");
    env.spawn("aggregate", "aggregator");
    let mut outcomes = env.spawn("outcomes", "outcomes-0");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (sent, expected) = workload(now);
    let on_time: Vec<&Sent> = sent.iter().filter(|sent| !sent.late).collect();
    let late: Vec<&Sent> = sent.iter().filter(|sent| sent.late).collect();
    assert!(
        late.len() >= 4 && expected.replaced >= 2,
        "the workload has late actions"
    );
    let client = reqwest::blocking::Client::new();

    // Phase 1, with the outcomes stage SIGKILLed and restarted between batches.
    for (index, batch) in on_time.chunks(15).enumerate() {
        send(&env, &client, batch);
        if index % 3 == 2 {
            std::thread::sleep(Duration::from_millis(150 * (index as u64 % 4)));
            env.process(outcomes).kill();
            outcomes = env.spawn("outcomes", &format!("outcomes-{index}"));
        }
    }
    let stored_actions = "SELECT count() FROM (SELECT DISTINCT event_id FROM actions \
         WHERE source_partition != 4294967295)";
    env.wait_for_count(
        stored_actions,
        on_time.len() as u64,
        Duration::from_secs(120),
    );
    // Wait until the outcomes stage has derived every stored action, so that the late actions
    // below really change firings already written.
    wait_until_every_stored_action_is_derived(&env);
    let phase_one_firings: u64 = env
        .query("SELECT count() FROM actions FINAL WHERE kind = 'derived_outcome'")[0][0]
        .parse()
        .unwrap();
    let total_expected: u64 = expected
        .outcomes
        .iter()
        .filter(|((_, name), _)| name != "contract_signed")
        .map(|(_, n)| n)
        .sum();
    assert!(
        phase_one_firings < total_expected,
        "the late actions still have firings to complete ({phase_one_firings} of {total_expected})"
    );

    // Explicit outcome events beside them (POST /v1/outcomes), each batch sent twice.
    let mut expected = expected;
    for (account, secret, events) in [("a", SECRET_A, 3), ("b", SECRET_B, 5)] {
        let items: Vec<Value> = (0..events)
            .map(|index| {
                json!({
                    "event_id": format!("deal-{account}-{index}"),
                    "outcome_type": "deal_won",
                    "value": format!("{}.50", 100 * (index + 1)),
                    "user_id": format!("user-{index}"),
                    "metadata": {"lead_id": format!("lead-{account}-{index}")},
                })
            })
            .collect();
        for _ in 0..2 {
            post_until_accepted(
                &client,
                &format!("{}/v1/outcomes", env.ingest_url()),
                secret,
                &json!({ "outcomes": items }),
                Duration::from_secs(60),
                Duration::from_millis(200),
            );
        }
        for _ in 0..events {
            expected.add(account, "deal_won");
        }
    }
    let outcome_events = 8;

    // Phase 2: the late constituents, and every phase 1 batch re-sent (duplicates), with one
    // more kill.
    for (index, batch) in late.chunks(5).enumerate() {
        send(&env, &client, batch);
        if index == 1 {
            env.process(outcomes).kill();
            outcomes = env.spawn("outcomes", "outcomes-late");
        }
    }
    for batch in on_time.chunks(40) {
        send(&env, &client, batch);
    }
    env.wait_for_count(
        stored_actions,
        sent.len() as u64 + outcome_events,
        Duration::from_secs(120),
    );

    // A replaced firing and its replacement count the same, so the counts below can agree
    // before the last late action is derived: wait for the stage to cover everything stored.
    wait_until_every_stored_action_is_derived(&env);
    let mut firings_expected = expected.outcomes.clone();
    firings_expected.retain(|(_, name), _| name != "contract_signed" && name != "deal_won");
    env.wait_until(Duration::from_secs(90), Duration::from_millis(300), || {
        let found = counts(env.query(FIRINGS_BY_ACCOUNT));
        if found == firings_expected {
            Ok(())
        } else {
            Err(format!("firings {found:?}, expected {firings_expected:?}"))
        }
    });
    // Every outcome view counts them, beside the conditional outcome of the enricher.
    env.wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        let found = counts(env.query(OUTCOMES_IN_USAGE));
        if found == expected.outcomes {
            Ok(())
        } else {
            Err(format!(
                "@outcome usage {found:?}, expected {:?}",
                expected.outcomes
            ))
        }
    });
    eprintln!(
        "sent {} actions ({} late), firings after phase 1 {phase_one_firings}, expected {:?}, {} replaced",
        sent.len(),
        late.len(),
        expected.outcomes,
        expected.replaced
    );
    let retracted = env.query("SELECT count() FROM actions FINAL WHERE kind = 'retracted_outcome'");
    assert_eq!(
        retracted[0][0],
        expected.replaced.to_string(),
        "one retraction per replaced firing"
    );
    let live = env.query(
        "SELECT count() FROM live_data WHERE value_action_name IN ('research_completed', 'lead_converted')",
    );
    assert_eq!(
        live[0][0],
        firings_expected.values().sum::<u64>().to_string(),
        "Live Data shows current firings only"
    );

    // Every research firing is one session's web_search, llm_call and successful delivery, in order.
    let sent_by_id: HashMap<&str, &Value> = sent
        .iter()
        .map(|sent| (sent.item["event_id"].as_str().unwrap(), &sent.item))
        .collect();
    for row in env.query(FIRING_ROWS) {
        let attributes: Value = serde_json::from_str(&row[6]).unwrap();
        let constituents: Vec<&Value> = attributes["constituents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| sent_by_id[id.as_str().unwrap()])
            .collect();
        let names: Vec<&str> = constituents
            .iter()
            .map(|c| c["action_name"].as_str().unwrap())
            .collect();
        if row[3] == "research_completed" {
            assert_eq!(names, ["web_search", "llm_call", "delivery"], "{row:?}");
            assert_eq!(constituents[2]["attributes"]["status"], "success");
            let users: BTreeSet<&str> = constituents
                .iter()
                .map(|c| c["user_id"].as_str().unwrap())
                .collect();
            assert_eq!(users, BTreeSet::from([row[4].as_str()]));
        } else {
            assert_eq!(row[3], "lead_converted");
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, ["contract_signed", "lead_qualified"], "{row:?}");
            let leads: BTreeSet<&str> = constituents
                .iter()
                .map(|c| c["attributes"]["lead_id"].as_str().unwrap())
                .collect();
            assert_eq!(leads.len(), 1, "{row:?}");
        }
    }

    // The same stream replayed from the beginning into a fresh database gives the same rows.
    let original_rows = env.query(FIRING_ROWS);
    let original_usage = env.query(FIRING_USAGE);
    let replay_database = format!("{}_replay", env.run.database);
    let settings = std::fs::read_to_string(&env.settings_path)
        .unwrap()
        .replace(
            &format!("\"{}\"", env.run.database),
            &format!("\"{replay_database}\""),
        )
        .replace("aggregator\"", "aggregator-replay\"")
        .replace(
            &format!("127.0.0.1:{}\"", env.run.aggregator_metrics_port),
            &format!("127.0.0.1:{}\"", free_port()),
        )
        .replace(
            &format!("127.0.0.1:{outcomes_port}\""),
            &format!("127.0.0.1:{}\"", free_port()),
        );
    let replay_settings = env.dir.join("replay.toml");
    std::fs::write(&replay_settings, settings).unwrap();
    let binary = Path::new(common::BINARY);
    let (migrated, text) =
        agentmeter_testkit::process::run_tool(binary, &replay_settings, &["migrate"], &[]).unwrap();
    assert!(migrated, "{text}");
    let mut replay: Vec<std::process::Child> = ["aggregate", "outcomes"]
        .iter()
        .map(|stage| {
            agentmeter_testkit::process::spawn_stage(
                &[],
                binary,
                &replay_settings,
                stage,
                &env.dir.join(format!("replay-{stage}.log")),
                &[],
            )
            .unwrap()
        })
        .collect();
    let mut replayed = Vec::new();
    env.wait_until(Duration::from_secs(120), Duration::from_millis(500), || {
        replayed = clickhouse_query(&replay_database, FIRING_ROWS);
        if replayed == original_rows {
            Ok(())
        } else {
            Err(format!(
                "the replay has {} firing rows of {}",
                replayed.len(),
                original_rows.len()
            ))
        }
    });
    env.wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        if clickhouse_query(&replay_database, FIRING_USAGE) == original_usage {
            Ok(())
        } else {
            Err("the replay's firing usage differs".into())
        }
    });
    for child in &mut replay {
        let _ = child.kill();
        let _ = child.wait();
    }
    clickhouse_query(
        "default",
        &format!("DROP DATABASE IF EXISTS {replay_database}"),
    );

    // `agentmeter actions` lists the composites, and warns about a context attribute that no
    // stored constituent carries.
    let listed = env.tool(&["actions", "--workspace", "ws_composite"]);
    assert!(
        listed
            .lines()
            .any(|line| line.contains("composite") && line.contains("research_completed")),
        "{listed}"
    );
    assert!(!listed.contains("warning"), "{listed}");
    let unseen = r#"
[[composite_outcomes]]
name = "order_shipped"
steps = [{ action = "web_search" }, { action = "delivery" }]
within = "1h"
context = "attributes.order_id"
"#;
    env.apply_config(&format!("{config}{unseen}"));
    // A definition change derives the workspace again (the generation counts the definitions
    // seen: the first ones, then this change): the firings stay what they were.
    env.wait_for_count(
        "SELECT value FROM outcomes_progress FINAL WHERE key = 'generation'",
        2,
        Duration::from_secs(30),
    );
    assert_eq!(counts(env.query(FIRINGS_BY_ACCOUNT)), firings_expected);
    let listed = env.tool(&["actions", "--workspace", "ws_composite"]);
    assert!(
        listed.contains("warning: composite outcome \"order_shipped\""),
        "{listed}"
    );
    // A definition that could never fire is refused, and nothing is applied.
    let never = unseen
        .replace("\"1h\"", "\"0s\"")
        .replace("\"delivery\"", "\"refund\"");
    let path = env.dir.join("never.toml");
    std::fs::write(&path, format!("{config}{never}")).unwrap();
    let refused = env.tool_failing(&["config", "apply", path.to_str().unwrap()]);
    assert!(
        refused.contains("within is zero") && refused.contains("\"refund\" is not tracked"),
        "{refused}"
    );
    let _ = outcomes;
}
