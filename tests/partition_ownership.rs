//! Static partition ownership (ADR 0003) over the real broker and ClickHouse: replicas split
//! the partitions by ordinal, a replica that can own nothing while records wait says so on
//! `/readyz`, and a survivor told it is alone takes every partition and the totals stay exact.
#![cfg(feature = "integration")]

mod common;

use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_raw_action, RawAction};
use common::{free_port, kafka_action, metering_config, metrics_text, publisher_config, TestEnv};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const METERING: &str = r#"
[tagging]
tracked = ["web_search"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]
"#;

/// Publishes actions `range` of account `acc_own` straight to `actions.raw`, keyed as ingest
/// keys them (so they spread over the partitions).
fn publish(env: &TestEnv, range: std::ops::Range<usize>) {
    let producer: BaseProducer = publisher_config().create().unwrap();
    let topic = format!("{}actions.raw", env.run.topic_prefix);
    let now_micros = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    for index in range {
        let action = RawAction {
            occurred_at_micros: now_micros,
            received_at_micros: now_micros,
            ..kafka_action("ws_own", "acc_own", format!("own-{index}"), "web_search")
        };
        let payload = encode_raw_action(&action).unwrap();
        let key = action.message_key();
        loop {
            match producer.send(BaseRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(()) => break,
                Err((_, _)) => {
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// `/readyz` of the process serving operations on `port`: (status, body).
fn readyz(port: u16) -> Option<(u16, String)> {
    let response = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().unwrap_or_default()))
}

/// Waits until `/readyz` on `port` answers `status` with a body containing `needle`.
fn wait_readyz(env: &TestEnv, port: u16, status: u16, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some((seen, body)) = readyz(port) {
            if seen == status && body.contains(needle) {
                return body;
            }
            last = Some((seen, body));
        }
        assert!(
            Instant::now() < deadline,
            "/readyz on {port} never answered {status} with {needle:?} (last {last:?})\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of an unlabelled gauge in `/metrics` on `port`.
fn gauge(port: u16, name: &str) -> Option<f64> {
    metrics_text(port)?
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

#[test]
fn a_replica_owning_no_partition_while_records_wait_is_not_ready_until_they_move() {
    let mut env = TestEnv::new(
        "own_stall",
        "[aggregator.ownership]\nstall_after_seconds = 5\n",
    );
    env.apply_config(&metering_config(
        "ws_own",
        &[("acc_own", "own-secret")],
        METERING,
    ));
    env.spawn("enrich", "enrich");
    // Replica 4 of 5 on a topic of 4 partitions: it owns nothing, and nobody else runs yet.
    let idle_port = env.run.aggregator_metrics_port;
    env.spawn_with_env(
        "aggregate",
        "aggregate-idle",
        &[
            ("AGENTMETER__AGGREGATOR__OWNERSHIP__REPLICAS", "5"),
            ("AGENTMETER__AGGREGATOR__OWNERSHIP__REPLICA", "4"),
        ],
    );
    publish(&env, 0..2_000);
    let reason = wait_readyz(
        &env,
        idle_port,
        503,
        "holds no partition of",
        Duration::from_secs(90),
    );
    assert!(reason.contains("records wait"), "{reason}");
    assert_eq!(gauge(idle_port, "agentmeter_input_stalled"), Some(1.0));
    assert_eq!(gauge(idle_port, "agentmeter_partitions_owned"), Some(0.0));

    // The replica that owns them starts: the records move, and the idle one is ready again.
    let owner_listen = format!("127.0.0.1:{}", free_port());
    env.spawn_with_env(
        "aggregate",
        "aggregate-owner",
        &[("AGENTMETER__AGGREGATOR__METRICS_LISTEN", &owner_listen)],
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        2_000,
        Duration::from_secs(120),
    );
    wait_readyz(&env, idle_port, 200, "ready", Duration::from_secs(60));
    assert_eq!(gauge(idle_port, "agentmeter_input_stalled"), Some(0.0));
}

#[test]
fn replicas_split_the_partitions_and_a_survivor_told_it_is_alone_takes_them_all() {
    let mut env = TestEnv::new("own_split", "");
    env.apply_config(&metering_config(
        "ws_own",
        &[("acc_own", "own-secret")],
        METERING,
    ));
    let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
    let mut replicas = Vec::new();
    for (replica, (enricher_port, aggregator_port)) in ports.iter().enumerate() {
        let ordinal = replica.to_string();
        let enricher_listen = format!("127.0.0.1:{enricher_port}");
        let aggregator_listen = format!("127.0.0.1:{aggregator_port}");
        let enricher = env.spawn_with_env(
            "enrich",
            &format!("enrich-{replica}"),
            &[
                ("AGENTMETER__ENRICHER__OWNERSHIP__REPLICAS", "2"),
                ("AGENTMETER__ENRICHER__OWNERSHIP__REPLICA", &ordinal),
                ("AGENTMETER__ENRICHER__METRICS_LISTEN", &enricher_listen),
            ],
        );
        let aggregator = env.spawn_with_env(
            "aggregate",
            &format!("aggregate-{replica}"),
            &[
                ("AGENTMETER__AGGREGATOR__OWNERSHIP__REPLICAS", "2"),
                ("AGENTMETER__AGGREGATOR__OWNERSHIP__REPLICA", &ordinal),
                ("AGENTMETER__AGGREGATOR__METRICS_LISTEN", &aggregator_listen),
            ],
        );
        replicas.push((enricher, aggregator));
    }
    publish(&env, 0..4_000);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        4_000,
        Duration::from_secs(120),
    );
    // Each replica of each stage owns two of the four partitions, and they wrote both halves.
    for (enricher_port, aggregator_port) in &ports {
        assert_eq!(
            gauge(*enricher_port, "agentmeter_partitions_owned"),
            Some(2.0)
        );
        assert_eq!(
            gauge(*aggregator_port, "agentmeter_partitions_owned"),
            Some(2.0)
        );
    }
    let by_partition = env.query(
        "SELECT source_partition, count() FROM aggregator_progress GROUP BY source_partition ORDER BY source_partition",
    );
    assert_eq!(by_partition.len(), 4, "{by_partition:?}");

    // Replica 1 of each stage is gone for good; replica 0 is restarted as the only one.
    let (dead_enricher, dead_aggregator) = replicas[1];
    env.process(dead_enricher).kill();
    env.process(dead_aggregator).kill();
    publish(&env, 4_000..8_000);
    let (enricher, aggregator) = replicas[0];
    env.process(enricher).terminate(Duration::from_secs(60));
    env.process(aggregator).terminate(Duration::from_secs(60));
    let handover = Instant::now();
    let (enricher_port, aggregator_port) = ports[0];
    let enricher_listen = format!("127.0.0.1:{enricher_port}");
    let aggregator_listen = format!("127.0.0.1:{aggregator_port}");
    env.spawn_with_env(
        "enrich",
        "enrich-0-alone",
        &[
            ("AGENTMETER__ENRICHER__OWNERSHIP__REPLICAS", "1"),
            ("AGENTMETER__ENRICHER__METRICS_LISTEN", &enricher_listen),
        ],
    );
    env.spawn_with_env(
        "aggregate",
        "aggregate-0-alone",
        &[
            ("AGENTMETER__AGGREGATOR__OWNERSHIP__REPLICAS", "1"),
            ("AGENTMETER__AGGREGATOR__METRICS_LISTEN", &aggregator_listen),
        ],
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        8_000,
        Duration::from_secs(120),
    );
    eprintln!(
        "the survivor took all partitions and caught up {:?} after its restart",
        handover.elapsed()
    );
    let stored = &env.query("SELECT count(), uniqExact(event_id), sum(cost) FROM actions FINAL")[0];
    assert_eq!((stored[0].as_str(), stored[1].as_str()), ("8000", "8000"));
    assert_eq!(common::dec(&stored[2]), common::dec("40"));
    assert_eq!(
        gauge(enricher_port, "agentmeter_partitions_owned"),
        Some(4.0)
    );
    assert_eq!(
        gauge(aggregator_port, "agentmeter_partitions_owned"),
        Some(4.0)
    );
}
