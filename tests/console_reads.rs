//! The console's reads against the real broker and ClickHouse, with real enricher, aggregator
//! and console processes: the usage, users and action names it reads from the aggregator's daily
//! rollups (ADR 0008), with the derived outcomes of `agentmeter outcomes` added from `usage`, equal
//! the same questions asked of `usage FINAL` and `actions FINAL` — after
//! the aggregator was SIGKILLed mid-stream, and after the rollups were emptied and refilled by the
//! migration's backfill — and Live Data's widening look-back answers every page as the unbounded
//! query does.
#![cfg(feature = "integration")]

mod common;

use std::time::Duration;

use agentmeter_schemas::action::ActionKind;
use agentmeter_schemas::RawAction;
use common::{free_port, kafka_action, metering_config, Lcg, TestEnv};
use reqwest::blocking::Client;
use serde_json::Value;

const WORKSPACE: &str = "ws_reads";
const DAY: i64 = 86_400;

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "delivery"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.00003" }]

[[outcomes]]
action = "delivery"

[[composite_outcomes]]
name = "research_done"
steps = [{ action = "web_search" }, { action = "llm_call" }]
within = "15m"
context = "user"
"#;

/// The actions of the test: three accounts, a dozen users (and anonymous ones), four names, LLM
/// calls with tokens and trace events, spread over the last 20 days with a dense last hour, and
/// every 17th one sent twice.
fn workload(now_seconds: i64, count: usize) -> Vec<RawAction> {
    let mut random = Lcg(20261204);
    let mut actions = Vec::new();
    for index in 0..count {
        let account = ["acc_a", "acc_b", "acc_c"][random.next(3) as usize];
        let name =
            ["web_search", "llm_call", "delivery", "untracked_step"][random.next(4) as usize];
        let age = if index % 5 == 0 {
            random.next(3_600) as i64
        } else {
            random.next(20 * DAY as u64) as i64
        };
        let mut action = RawAction {
            user_id: (random.next(6) != 0).then(|| format!("user-{}", random.next(12))),
            occurred_at_micros: (now_seconds - age) * 1_000_000 - random.next(1_000_000) as i64,
            received_at_micros: now_seconds * 1_000_000,
            ..kafka_action(WORKSPACE, account, format!("reads-{index}"), name)
        };
        if name == "llm_call" {
            action.kind = ActionKind::Llm;
            action.input_tokens = Some(random.next(2_000) as i64);
            action.output_tokens = Some(random.next(500) as i64);
            action.total_tokens =
                Some(action.input_tokens.unwrap_or(0) + action.output_tokens.unwrap_or(0));
            action.trace_event = Some(format!("generate_content model-{}", random.next(2)));
        }
        actions.push(action.clone());
        if index % 17 == 0 {
            actions.push(action);
        }
    }
    actions
}

/// GET with the admin key; panics unless 200.
fn get(client: &Client, url: &str, key: &str) -> Value {
    let response = client.get(url).bearer_auth(key).send().unwrap();
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert_eq!(status, 200, "{url}: {body}");
    body
}

/// Usage rows and users-per-account rows, as text.
type UsageAndUsers = (Vec<Vec<String>>, Vec<Vec<String>>);

/// The console's usage and users of `query`, and the same from `usage FINAL`, as rows of text.
fn usage_both_ways(
    env: &TestEnv,
    client: &Client,
    base: &str,
    key: &str,
    query: &str,
    conditions: &str,
) -> (UsageAndUsers, UsageAndUsers) {
    let body = get(client, &format!("{base}/api/v1/usage?{query}"), key);
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let console_usage: Vec<Vec<String>> = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            [
                "account", "action", "measure", "actions", "quantity", "cost", "outcomes",
            ]
            .iter()
            .map(|field| text(&row[field]))
            .collect()
        })
        .collect();
    let console_users: Vec<Vec<String>> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| vec![text(&row["account"]), text(&row["users"])])
        .collect();
    let normalized = |rows: Vec<Vec<String>>| -> Vec<Vec<String>> {
        rows.into_iter()
            .map(|mut row| {
                for cell in &mut row[4..6] {
                    *cell = common::dec(cell).normalize().to_string();
                }
                row
            })
            .collect()
    };
    let stored_usage = normalized(env.query(&format!(
        "SELECT account_id, action_name, measure, sum(action_count), toString(sum(quantity)), \
                toString(sum(cost)), sum(outcome_count) \
         FROM usage FINAL WHERE workspace_id = '{WORKSPACE}' AND tracked = 1{conditions} \
         GROUP BY account_id, action_name, measure ORDER BY account_id, action_name"
    )));
    let stored_users = env.query(&format!(
        "SELECT account_id, uniqExact(user_key) FROM usage FINAL \
         WHERE workspace_id = '{WORKSPACE}' AND tracked = 1 AND user_key != ''{conditions} \
         GROUP BY account_id ORDER BY account_id"
    ));
    ((console_usage, console_users), (stored_usage, stored_users))
}

/// The console's action names seen, and the same from `actions FINAL`.
fn seen_both_ways(
    env: &TestEnv,
    client: &Client,
    base: &str,
    key: &str,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let body = get(client, &format!("{base}/api/v1/actions"), key);
    let console: Vec<Vec<String>> = body["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            vec![
                row["name"].as_str().unwrap().to_string(),
                row["seen"].to_string(),
            ]
        })
        .collect();
    let stored = env.query(&format!(
        "SELECT name, sum(seen) FROM ( \
           SELECT action_name AS name, count() AS seen FROM actions FINAL \
           WHERE workspace_id = '{WORKSPACE}' AND kind NOT IN ('derived_outcome', 'retracted_outcome') \
           GROUP BY name \
           UNION ALL \
           SELECT trace_event AS name, count() AS seen FROM actions FINAL \
           WHERE workspace_id = '{WORKSPACE}' AND kind = 'llm' AND trace_event != '' GROUP BY name) \
         GROUP BY name ORDER BY name"
    ));
    (console, stored)
}

/// Waits until every read the console answers from the rollups equals the stored truth.
fn wait_until_rollup_reads_agree(env: &TestEnv, client: &Client, base: &str, key: &str, now: i64) {
    let today = now - now % DAY;
    let date = |seconds: i64| {
        time::OffsetDateTime::from_unix_timestamp(seconds)
            .unwrap()
            .date()
            .to_string()
    };
    let window = format!(
        "from={}&to={}",
        date(today - 9 * DAY),
        date(today - 2 * DAY)
    );
    let window_sql = format!(
        " AND window_start >= toDateTime({}) AND window_start < toDateTime({})",
        today - 9 * DAY,
        today - 2 * DAY
    );
    let reads: [(String, String); 3] = [
        (String::new(), String::new()),
        (
            "account=acc_b".to_string(),
            " AND account_id = 'acc_b'".to_string(),
        ),
        (
            format!("account=acc_a&{window}"),
            format!(" AND account_id = 'acc_a'{window_sql}"),
        ),
    ];
    env.wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        let firings = env.query(
            "SELECT count() FROM usage FINAL WHERE source_partition = 4294967295 AND outcome_count > 0",
        );
        if firings[0][0] == "0" {
            return Err("no derived outcome yet".to_string());
        }
        for (query, conditions) in &reads {
            let (console, stored) = usage_both_ways(env, client, base, key, query, conditions);
            if console != stored || stored.0.is_empty() {
                return Err(format!(
                    "usage?{query}: console {console:?}, usage FINAL {stored:?}"
                ));
            }
        }
        let (console, stored) = seen_both_ways(env, client, base, key);
        if console != stored {
            return Err(format!(
                "actions seen: console {console:?}, actions FINAL {stored:?}"
            ));
        }
        Ok(())
    });
}

#[test]
fn rollup_reads_equal_the_stored_actions_after_aggregator_kills_and_a_backfill() {
    let port = free_port();
    let outcomes_port = free_port();
    // Small batches: many batches, and kills land inside them.
    let mut env = TestEnv::new(
        "console_reads",
        &format!(
            "batch_offsets = 97\n\n[console]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [outcomes]\nmetrics_listen = \"127.0.0.1:{outcomes_port}\"\ninterval = \"200ms\"\n"
        ),
    );
    let base = format!("http://127.0.0.1:{port}");
    env.apply_config(&metering_config(
        WORKSPACE,
        &[
            ("acc_a", "reads-a"),
            ("acc_b", "reads-b"),
            ("acc_c", "reads-c"),
        ],
        METERING,
    ));
    let key = env
        .tool(&[
            "admin-key",
            "new",
            "--workspace",
            WORKSPACE,
            "--name",
            "test",
            "--role",
            "read-only",
        ])
        .lines()
        .find(|line| line.starts_with("amk_"))
        .unwrap()
        .to_string();
    env.spawn("enrich", "enricher");
    let mut aggregator = env.spawn("aggregate", "aggregator");
    env.spawn("console", "console");
    env.spawn("outcomes", "outcomes");
    env.wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(60));
    let client = Client::new();

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let actions = workload(now, 2_400);
    let distinct = actions
        .iter()
        .map(|action| action.event_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    for (index, chunk) in actions.chunks(700).enumerate() {
        env.publish_raw_actions(chunk);
        std::thread::sleep(Duration::from_millis(200 + 150 * index as u64));
        env.process(aggregator).kill();
        aggregator = env.spawn("aggregate", &format!("aggregator-{index}"));
    }
    env.wait_for_count(
        &format!(
            "SELECT count() FROM (SELECT DISTINCT event_id FROM actions \
             WHERE workspace_id = '{WORKSPACE}' AND source_partition != 4294967295)"
        ),
        distinct,
        Duration::from_secs(120),
    );
    wait_until_rollup_reads_agree(&env, &client, &base, &key, now);
    let batches = env.query("SELECT uniqExact(source_partition, batch_start) FROM usage_daily")[0]
        [0]
    .parse::<u64>()
    .unwrap();
    assert!(batches > 8, "the rollups come from {batches} batches");
    eprintln!(
        "{distinct} actions ({} sent), rollups of {batches} batches agree",
        actions.len()
    );

    // The upgrade path: rollups emptied, refilled by the migration's backfill from `usage`, and
    // the aggregator restarted (it counts the batch it is in again and writes its rollups).
    env.process(aggregator).kill();
    for table in ["usage_daily", "users_daily"] {
        common::clickhouse_execute(&env.run.database, &format!("TRUNCATE TABLE {table}"));
    }
    let backfill = agentmeter_aggregator::migrate::statements(
        include_str!("../aggregator/migrations/0010_daily_rollups.sql"),
        &env.run.database,
    );
    let inserts: Vec<&String> = backfill
        .iter()
        .filter(|s| s.starts_with("INSERT "))
        .collect();
    assert_eq!(inserts.len(), 2);
    for statement in inserts {
        common::clickhouse_execute(&env.run.database, statement);
    }
    let restarted_at = time::OffsetDateTime::now_utc().unix_timestamp();
    env.spawn("aggregate", "aggregator-after-backfill");
    // It has counted the batch each partition is in again once it wrote that batch's progress.
    env.wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        let rows = env.query(&format!(
            "SELECT source_partition, max(written_at) >= toDateTime({restarted_at}) FROM aggregator_progress \
             WHERE (source_partition, batch_start) IN \
                   (SELECT source_partition, max(batch_start) FROM aggregator_progress GROUP BY source_partition) \
             GROUP BY source_partition"
        ));
        if !rows.is_empty() && rows.iter().all(|row| row[1] == "1") {
            Ok(())
        } else {
            Err(format!("the restarted aggregator has not rewritten every current batch: {rows:?}"))
        }
    });
    // The backfill has no trace events (`usage` has none): names are compared without them.
    env.wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        for (query, conditions) in [("", ""), ("account=acc_c", " AND account_id = 'acc_c'")] {
            let (console, stored) = usage_both_ways(&env, &client, &base, &key, query, conditions);
            if console != stored {
                return Err(format!(
                    "after the backfill, usage?{query}: console {console:?}, usage FINAL {stored:?}"
                ));
            }
        }
        Ok(())
    });

    // Live Data: every page the look-back finds equals the unbounded query's.
    let reference = |conditions: &str, limit: u32, offset: u64| -> Vec<String> {
        env.query(&format!(
            "SELECT event_id FROM actions FINAL WHERE workspace_id = '{WORKSPACE}' \
             AND kind != 'retracted_outcome'{conditions} \
             ORDER BY occurred_at_micros DESC, event_id LIMIT {limit} OFFSET {offset}"
        ))
        .into_iter()
        .map(|row| row[0].clone())
        .collect()
    };
    let from = now - 6 * DAY;
    let from_text = time::OffsetDateTime::from_unix_timestamp(from)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let pages: Vec<(String, String, u32, u64)> = vec![
        (String::new(), String::new(), 100, 0),
        (String::new(), String::new(), 500, 0),
        (String::new(), String::new(), 500, 1_000),
        (String::new(), String::new(), 50, 2_300),
        (
            "&account=acc_b".into(),
            " AND account_id = 'acc_b'".into(),
            300,
            100,
        ),
        (
            "&user=user-3".into(),
            " AND user_id = 'user-3'".into(),
            120,
            0,
        ),
        (
            "&action=delivery&account=acc_c".into(),
            " AND action_name = 'delivery' AND account_id = 'acc_c'".into(),
            500,
            0,
        ),
        (
            format!("&from={from_text}"),
            format!(" AND occurred_at_micros >= {}", from * 1_000_000),
            500,
            200,
        ),
    ];
    for (filter, conditions, limit, offset) in pages {
        let body = get(
            &client,
            &format!("{base}/api/v1/live-data?limit={limit}&offset={offset}{filter}"),
            &key,
        );
        let shown: Vec<String> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["event_id"].as_str().unwrap().to_string())
            .collect();
        let expected = reference(&conditions, limit, offset);
        assert!(!expected.is_empty(), "{filter} {offset}: the page has rows");
        assert_eq!(
            shown, expected,
            "live-data?limit={limit}&offset={offset}{filter}"
        );
    }
}
