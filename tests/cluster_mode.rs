//! Cluster mode (issue 13, ADR 0006) against the local cluster of `deploy/local/cluster.sh`:
//! ZooKeeper and two ClickHouse 18.16 replicas of one shard. `agentmeter migrate --cluster`
//! creates the replicated tables and views on both; the pipeline writes to replica r1 with an
//! insert quorum of 2; while actions flow, replica r2 is SIGKILLed and brought back and the
//! aggregator is SIGKILLed and restarted. The totals read from each replica must equal what the
//! test sent, and the views must answer the same on both.
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{metering_config, post_until_accepted, repo_root, Lcg, TestEnv};
use serde_json::json;

const SECRET_A: &str = "test-secret-cluster-a-7d21";
const SECRET_B: &str = "test-secret-cluster-b-93e0";
const REPLICAS: [&str; 2] = ["http://127.0.0.1:8131", "http://127.0.0.1:8132"];
const CLUSTER_ENV: [(&str, &str); 3] = [
    ("AGENTMETER__CLICKHOUSE__URL", "http://127.0.0.1:8131"),
    ("AGENTMETER__CLICKHOUSE__INSERT_QUORUM", "2"),
    (
        "AGENTMETER__CLICKHOUSE__SELECT_SEQUENTIAL_CONSISTENCY",
        "true",
    ),
];

fn cluster(args: &[&str]) {
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/local/cluster.sh"))
        .args(args)
        .status()
        .expect("run deploy/local/cluster.sh");
    assert!(status.success(), "cluster.sh {args:?} failed");
}

/// A query on one replica; rows of tab-separated columns.
fn replica_query(replica: &str, database: &str, sql: &str) -> Vec<Vec<String>> {
    let response = reqwest::blocking::Client::new()
        .post(format!("{replica}/?database={database}"))
        .body(sql.to_string())
        .timeout(Duration::from_secs(30))
        .send();
    match response {
        Ok(response) if response.status().is_success() => response
            .text()
            .unwrap_or_default()
            .lines()
            .map(|line| line.split('\t').map(str::to_string).collect())
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn replicas_hold_exact_totals_through_a_replica_crash_and_an_aggregator_crash() {
    cluster(&["up"]);
    let mut env = TestEnv::new("cluster_mode", "");
    let binary = Path::new(common::BINARY);
    let (migrated, text) = agentmeter_testkit::process::run_tool(
        binary,
        &env.settings_path,
        &["migrate", "--cluster", "agentmeter_local"],
        &CLUSTER_ENV,
    )
    .unwrap();
    assert!(migrated, "{text}");
    let database = env.run.database.clone();
    for replica in REPLICAS {
        let tables = replica_query(
            replica,
            &database,
            "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'usage'",
        );
        assert_eq!(tables, [["ReplicatedReplacingMergeTree"]], "{replica}");
    }
    env.apply_config(&metering_config(
        "ws_cluster",
        &[("acct_a", SECRET_A), ("acct_b", SECRET_B)],
        "[tagging]\ntracked = [\"web_search\"]\n\n[[cost_allocations]]\naction = \"web_search\"\nmeasure = \"unit\"\nrates = [{ effective_from = \"2020-01-01T00:00:00Z\", cost_per_unit = \"0.005\" }]\n",
    ));
    env.spawn("ingest", "ingest");
    env.spawn_with_env("enrich", "enricher", &CLUSTER_ENV);
    let mut aggregator = env.spawn_with_env("aggregate", "aggregator-0", &CLUSTER_ENV);
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );

    let client = reqwest::blocking::Client::new();
    let mut random = Lcg(13);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let batches = 30;
    for batch in 0..batches {
        let (account, secret) = if random.next(2) == 0 {
            ("acct_a", SECRET_A)
        } else {
            ("acct_b", SECRET_B)
        };
        let items: Vec<_> = (0..20)
            .map(|index| {
                json!({
                    "event_id": format!("cluster-{batch}-{index}"),
                    "action_name": "web_search",
                    "user_id": format!("user-{}", random.next(5)),
                })
            })
            .collect();
        *expected.entry(account.to_string()).or_default() += items.len() as u64;
        post_until_accepted(
            &client,
            &format!("{}/v1/actions", env.ingest_url()),
            secret,
            &json!({ "actions": items }),
            Duration::from_secs(60),
            Duration::from_millis(200),
        );
        match batch {
            // A replica crashes: quorum writes wait for it (the aggregator retries).
            8 => cluster(&["kill-replica", "2"]),
            // The aggregator crashes too, while the replica is down.
            12 => {
                env.process(aggregator).kill();
                aggregator = env.spawn_with_env("aggregate", "aggregator-1", &CLUSTER_ENV);
            }
            16 => cluster(&["start-replica", "2"]),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent: u64 = expected.values().sum();

    // Every replica holds every action once, and the usage views count each exactly.
    let expected_rows: Vec<Vec<String>> = expected
        .iter()
        .map(|(account, count)| {
            vec![
                account.clone(),
                count.to_string(),
                format!("{:.3}", *count as f64 * 0.005),
            ]
        })
        .collect();
    for replica in REPLICAS {
        env.wait_until(Duration::from_secs(180), Duration::from_millis(500), || {
            let stored = replica_query(
                replica,
                &database,
                "SELECT count() FROM (SELECT DISTINCT event_id FROM actions)",
            );
            let usage = replica_query(
                replica,
                &database,
                "SELECT account_id, toString(sum(actions)), toString(toDecimal64(sum(cost), 3)) \
                 FROM usage_by_account_day WHERE workspace_id = 'ws_cluster' \
                 GROUP BY account_id ORDER BY account_id",
            );
            if stored == [[sent.to_string()]] && usage == expected_rows {
                Ok(())
            } else {
                Err(format!(
                    "{replica}: {stored:?} actions, usage {usage:?}; expected {sent}, {expected_rows:?}"
                ))
            }
        });
    }
    let _ = aggregator;
    for process in 0..3 {
        env.process(process).kill();
    }
    replica_query(
        REPLICAS[0],
        "default",
        &format!("DROP DATABASE IF EXISTS {database} ON CLUSTER agentmeter_local"),
    );
}
