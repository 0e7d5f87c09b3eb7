//! The aggregator's failure modes against the real ClickHouse and broker:
//! a zombie member rewriting a partition, a restart resumed from the restart store, ClickHouse
//! down for a minute, and a permanent (schema) error.
#![cfg(feature = "integration")]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use agentmeter_aggregator::config::ClickHouseSettings;
use agentmeter_aggregator::service::ClickHouseService;
use agentmeter_aggregator::state::{BatchSettings, PartitionAggregator};
use agentmeter_schemas::{decode_enriched_action, RawAction};
use common::{kafka_action, metering_config, repo_root, TestEnv};

const SECRET: &str = "aggregator-failure-secret";
const METERING: &str = r#"
[tagging]
tracked = ["web_search", "object_detection"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.0031" }]

[[outcomes]]
action = "object_detection"
"#;

fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

fn raw(index: usize) -> RawAction {
    let now = now_micros();
    let account = if index.is_multiple_of(2) {
        "acc_even"
    } else {
        "acc_odd"
    };
    let action_name = if index.is_multiple_of(5) {
        "object_detection"
    } else {
        "web_search"
    };
    RawAction {
        user_id: Some(format!("user_{}", index % 11)),
        occurred_at_micros: now - (index as i64 % 7_200) * 1_000_000,
        received_at_micros: now,
        ..kafka_action("ws_agg", account, format!("agg-{index}"), action_name)
    }
}

fn publish(env: &TestEnv, range: std::ops::Range<usize>) {
    let actions: Vec<RawAction> = range.map(raw).collect();
    env.publish_raw_actions(&actions);
}

/// Totals per account: (actions, cost, outcomes), as billing reads them.
fn totals(query: impl Fn(&str) -> Vec<Vec<String>>) -> Vec<Vec<String>> {
    query(
        "SELECT account_id, sum(action_count), sum(cost), sum(outcome_count), count() FROM usage_exact \
         GROUP BY account_id ORDER BY account_id",
    )
    .into_iter()
    .map(|row| row[..4].to_vec())
    .collect()
}

/// Every record of a topic with its partition, offset and timestamp.
fn read_with_timestamps(topic: &str) -> HashMap<i32, Vec<(i64, i64, Vec<u8>)>> {
    let mut by_partition: HashMap<i32, Vec<(i64, i64, Vec<u8>)>> = HashMap::new();
    for record in common::read_topic(topic) {
        by_partition
            .entry(record.partition)
            .or_default()
            .push((record.offset, 0, record.payload));
    }
    for records in by_partition.values_mut() {
        records.sort_by_key(|(offset, _, _)| *offset);
    }
    by_partition
}

#[test]
fn a_zombie_rewriting_partitions_leaves_the_totals_unchanged() {
    let mut env = TestEnv::new("agg_zombie", "batch_offsets = 700\n");
    env.apply_config(&metering_config(
        "ws_agg",
        &[("acc_even", SECRET), ("acc_odd", "other-secret")],
        METERING,
    ));
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");
    publish(&env, 0..5_000);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        5_000,
        Duration::from_secs(120),
    );
    let before = totals(|sql| env.query(sql));
    assert_eq!(before.len(), 2);

    // A member that lost the partitions long ago and never saw the progress: it re-reads every
    // partition from the beginning and writes everything again, once fully and once stopping
    // half-way (an older, partial view).
    let settings = ClickHouseSettings {
        url: "http://127.0.0.1:8123".into(),
        database: env.run.database.clone(),
        ..ClickHouseSettings::default()
    };
    let enriched_topic = format!("{}actions.enriched", env.run.topic_prefix);
    let service = ClickHouseService::new(&settings, &enriched_topic);
    let batch_settings = BatchSettings {
        batch_size: 700,
        window_seconds: 60,
        dedupe_horizon_ms: 15 * 60 * 1000,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (partition, records) in read_with_timestamps(&enriched_topic) {
        for fraction in [2, 1] {
            let mut zombie = PartitionAggregator::new(partition, batch_settings, None);
            for (offset, timestamp, payload) in records.iter().take(records.len() / fraction) {
                zombie.handle(
                    *offset,
                    *timestamp,
                    decode_enriched_action(payload).unwrap(),
                );
            }
            for write in zombie.take_flush() {
                runtime.block_on(service.write(partition, &write)).unwrap();
            }
        }
    }
    assert_eq!(totals(|sql| env.query(sql)), before);
    assert_eq!(env.query("SELECT count() FROM actions FINAL")[0][0], "5000");
}

/// A private ClickHouse (and broker) on other ports, so stopping it disturbs nobody.
struct PrivateServices {
    state: std::path::PathBuf,
    clickhouse_port: u16,
    envs: Vec<(String, String)>,
}

impl PrivateServices {
    fn start(name: &str) -> PrivateServices {
        let state =
            std::env::temp_dir().join(format!("agentmeter-private-{name}-{}", std::process::id()));
        let clickhouse_port = common::free_port();
        let envs = vec![
            ("AGENTMETER_STATE".to_string(), state.display().to_string()),
            (
                "AGENTMETER_CLICKHOUSE_HTTP_PORT".to_string(),
                clickhouse_port.to_string(),
            ),
            (
                "AGENTMETER_CLICKHOUSE_TCP_PORT".to_string(),
                common::free_port().to_string(),
            ),
            (
                "AGENTMETER_KAFKA_PORT".to_string(),
                common::free_port().to_string(),
            ),
            (
                "AGENTMETER_BROKER_STORAGE".to_string(),
                "memory".to_string(),
            ),
        ];
        let services = PrivateServices {
            state,
            clickhouse_port,
            envs,
        };
        services.run("up");
        services
    }

    fn run(&self, command: &str) {
        let status = Command::new("bash")
            .arg(repo_root().join("deploy/local/services.sh"))
            .arg(command)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .status()
            .unwrap();
        assert!(status.success(), "private services.sh {command} failed");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.clickhouse_port)
    }

    /// SIGKILL the ClickHouse server: no goodbye to its clients.
    fn kill_clickhouse(&self) {
        let pid = std::fs::read_to_string(self.state.join("clickhouse/clickhouse.pid")).unwrap();
        let status = Command::new("kill")
            .arg("-KILL")
            .arg(pid.trim())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::blocking::get(format!("{}/ping", self.url())).is_ok() {
            assert!(
                Instant::now() < deadline,
                "ClickHouse still answers after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn query(&self, database: &str, sql: &str) -> Vec<Vec<String>> {
        let text = reqwest::blocking::Client::new()
            .post(format!("{}/?database={database}", self.url()))
            .body(format!("{sql} FORMAT TabSeparated"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }
}

impl Drop for PrivateServices {
    fn drop(&mut self) {
        self.run("down");
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The value of a counter with one label in a `/metrics` text (0 when absent).
fn counter_value(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{{label}}}")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// `text` without its ANSI colour sequences (the stages log in colour).
fn without_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut in_escape = false;
    for character in text.chars() {
        match (in_escape, character) {
            (false, '\u{1b}') => in_escape = true,
            (false, _) => plain.push(character),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    plain
}

#[test]
fn a_restart_with_the_restart_store_re_reads_no_horizon_and_counts_resends_once() {
    // Small batches: most of what the first aggregator read lies before its batches' starts, in
    // the duplicate horizon a restart without the store would re-read.
    let mut env = TestEnv::new("agg_restart_store", "batch_offsets = 200\n");
    env.apply_config(&metering_config(
        "ws_agg",
        &[("acc_even", SECRET), ("acc_odd", "other-secret")],
        METERING,
    ));
    let state_dir = env.dir.join("aggregator-state");
    let state_dir = state_dir.to_str().unwrap().to_string();
    let with_store = [("AGENTMETER__AGGREGATOR__STATE_DIR", state_dir.as_str())];
    env.spawn("enrich", "enrich");
    let first = env.spawn_with_env("aggregate", "aggregate", &with_store);
    publish(&env, 0..4_000);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        4_000,
        Duration::from_secs(120),
    );
    env.process(first).kill();

    // 1,000 of the next actions re-send event ids the killed aggregator already counted (their
    // first copies before the batch starts, answered from the store after the restart).
    publish(&env, 3_000..6_000);
    let second = env.spawn_with_env("aggregate", "aggregate-again", &with_store);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        6_000,
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        env.query("SELECT count(), uniqExact(event_id) FROM actions FINAL")[0],
        vec!["6000".to_string(), "6000".to_string()]
    );
    let priced = (0..6_000).filter(|index| index % 5 != 0).count();
    let expected_cost =
        rust_decimal::Decimal::from(priced) * "0.0031".parse::<rust_decimal::Decimal>().unwrap();
    let cost = env.query("SELECT sum(cost) FROM usage_exact");
    assert_eq!(
        cost[0][0].parse::<rust_decimal::Decimal>().unwrap(),
        expected_cost
    );
    let metrics = common::metrics_text(env.run.aggregator_metrics_port).expect("metrics");
    let name = "agentmeter_aggregator_records_total";
    assert_eq!(
        counter_value(&metrics, name, "outcome=\"duplicate\""),
        1_000,
        "{metrics}"
    );
    // Every partition resumed at its batch start: nothing before it was read again.
    assert_eq!(
        counter_value(&metrics, name, "outcome=\"rebuilt\""),
        0,
        "{metrics}"
    );
    assert!(env.process(second).is_running(), "{}", env.logs());
    // Every partition of the second process was resumed from the store.
    let logs = without_colours(&env.logs());
    assert_eq!(
        logs.matches("ids_from_restart_store=true").count(),
        4,
        "{logs}"
    );
}

#[test]
fn clickhouse_down_for_a_minute_loses_nothing() {
    let private = PrivateServices::start("outage");
    let mut env = TestEnv::new("agg_outage", "retry_max_backoff_ms = 2000\n");
    env.apply_config(&metering_config(
        "ws_agg",
        &[("acc_even", SECRET), ("acc_odd", "other-secret")],
        METERING,
    ));
    let url = private.url();
    let overrides = [("AGENTMETER__CLICKHOUSE__URL", url.as_str())];
    let migrate = Command::new(common::BINARY)
        .args(["--config", env.settings_path.to_str().unwrap(), "migrate"])
        .env("AGENTMETER__CLICKHOUSE__URL", &url)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    env.spawn("enrich", "enrich");
    let aggregator = env.spawn_with_env("aggregate", "aggregate", &overrides);
    publish(&env, 0..2_000);
    let database = env.run.database.clone();
    let count = |private: &PrivateServices| -> u64 {
        private
            .query(&database, "SELECT sum(action_count) FROM usage_exact")
            .first()
            .and_then(|row| row[0].parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&private) < 2_000 {
        assert!(
            Instant::now() < deadline,
            "first 2000 not written\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // ClickHouse dies; actions keep coming for a minute; the aggregator retries and must neither
    // lose them nor skip past them. Its readiness reports the trouble.
    private.kill_clickhouse();
    publish(&env, 2_000..5_000);
    let outage_started = Instant::now();
    let readiness_url = format!(
        "http://127.0.0.1:{}/readyz",
        env.run.aggregator_metrics_port
    );
    let mut saw_not_ready = false;
    while outage_started.elapsed() < Duration::from_secs(60) {
        if let Ok(response) = reqwest::blocking::get(&readiness_url) {
            saw_not_ready |= response.status().as_u16() == 503;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        saw_not_ready,
        "readiness never reported the ClickHouse outage"
    );
    assert!(
        env.process(aggregator).is_running(),
        "the aggregator gave up during the outage\n{}",
        env.logs()
    );
    private.run("up");

    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&private) < 5_000 {
        assert!(
            Instant::now() < deadline,
            "only {} of 5000 after the outage\n{}",
            count(&private),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&private), 5_000);
    let rows = private.query(
        &env.run.database,
        "SELECT count(), uniqExact(event_id) FROM actions FINAL",
    );
    assert_eq!(rows[0], vec!["5000".to_string(), "5000".to_string()]);
    let priced = (0..5_000).filter(|index| index % 5 != 0).count();
    let expected_cost =
        rust_decimal::Decimal::from(priced) * "0.0031".parse::<rust_decimal::Decimal>().unwrap();
    let cost = private.query(&env.run.database, "SELECT sum(cost) FROM usage_exact");
    assert_eq!(
        cost[0][0].parse::<rust_decimal::Decimal>().unwrap(),
        expected_cost
    );
}

#[test]
fn a_schema_error_stops_the_aggregator_with_the_clickhouse_message() {
    let mut env = TestEnv::new("agg_schema", "");
    env.apply_config(&metering_config(
        "ws_agg",
        &[("acc_even", SECRET), ("acc_odd", "other-secret")],
        METERING,
    ));
    env.query("ALTER TABLE usage DROP COLUMN outcome_count");
    env.spawn("enrich", "enrich");
    let aggregator = env.spawn("aggregate", "aggregate");
    publish(&env, 0..10);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = env.process(aggregator).child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator did not stop on a permanent error\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(&env.process(aggregator).log_path).unwrap();
    assert!(log.contains("permanent"), "{log}");
    assert!(log.contains("outcome_count"), "{log}");
    // Nothing was claimed as done: no progress row beyond what was written.
    assert_eq!(
        env.query("SELECT count() FROM aggregator_progress WHERE end_offset > batch_start")[0][0],
        "0"
    );
}
