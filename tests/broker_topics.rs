//! Topics are never lost by our own tools, and a reset input is never silent (issue 9).
//!
//! * The project's broker build (tansu 0.6.0 with `topic_delete_by.sql` fixed, built by
//!   `deploy/local/services.sh`) deletes only the topic it is asked to delete.
//! * The enriched topic deleted and re-created under a running aggregator: the aggregator stops
//!   reading the reset partitions and says so on `/readyz` and in a metric within seconds, and
//!   `agentmeter reset-input` makes it count the new records — without losing or recounting
//!   the old ones.
#![cfg(feature = "integration")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_enriched_action, CostSource, EnrichedAction};
use common::{brokers, dec, ensure_services, kafka_action, metrics_text, read_topic, TestEnv};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn kafka_port() -> u16 {
    brokers().rsplit(':').next().unwrap().parse().unwrap()
}

fn admin() -> AdminClient<DefaultClientContext> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Deletes one topic, after making sure the broker deletes only that one.
fn delete_topic(name: &str) {
    agentmeter_testkit::broker::topic_deletion_is_safe(kafka_port())
        .unwrap_or_else(|reason| panic!("refusing to delete {name}: {reason}"));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = block_on(admin().delete_topics(&[name], &options)).unwrap();
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("delete {topic}: {code}"));
    }
}

fn topic_names() -> Vec<String> {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    use rdkafka::consumer::Consumer;
    consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap()
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| topic.name().to_string())
        .collect()
}

#[test]
fn deleting_one_topic_leaves_every_other_topic_and_its_records() {
    ensure_services();
    let prefix = format!(
        "agentmeter.test.delete_{}_{}.",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 100_000_000
    );
    let names: Vec<String> = ["a.x", "a.y", "b.z"]
        .iter()
        .map(|suffix| format!("{prefix}{suffix}"))
        .collect();
    let new_topics: Vec<NewTopic> = names
        .iter()
        .map(|name| NewTopic::new(name, 2, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in block_on(admin().create_topics(&new_topics, &options)).unwrap() {
        result.unwrap();
    }
    let producer: BaseProducer = common::publisher_config().create().unwrap();
    for name in &names {
        for index in 0..10 {
            let key = format!("key-{index}");
            let payload = format!("{name} record {index}");
            producer
                .send(BaseRecord::to(name).key(&key).payload(&payload))
                .map_err(|(error, _)| error)
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let before = topic_names();

    delete_topic(&names[0]);

    let deadline = Instant::now() + Duration::from_secs(30);
    while topic_names().contains(&names[0]) {
        assert!(Instant::now() < deadline, "{} still listed", names[0]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = topic_names();
    let lost: Vec<&String> = before
        .iter()
        .filter(|name| *name != &names[0] && !after.contains(name))
        .collect();
    assert!(
        lost.is_empty(),
        "deleting {} also deleted {lost:?}",
        names[0]
    );
    for name in &names[1..] {
        let records = read_topic(name);
        assert_eq!(records.len(), 10, "{name}");
        assert!(records
            .iter()
            .all(|record| String::from_utf8_lossy(&record.payload).starts_with(name.as_str())));
    }
}

fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

fn enriched(event_id: String) -> EnrichedAction {
    let now = now_micros();
    EnrichedAction {
        raw: agentmeter_schemas::RawAction {
            occurred_at_micros: now,
            received_at_micros: now,
            user_id: Some("u1".into()),
            ..kafka_action("ws_reset", "acc_reset", event_id, "web_search")
        },
        tracked: true,
        outcome: false,
        measure: "unit".into(),
        quantity: dec("1"),
        unit_cost: dec("0.25"),
        cost: dec("0.25"),
        cost_source: CostSource::Allocated,
        currency: "USD".into(),
        config_version: 1,
        enriched_at_micros: now,
    }
}

fn publish_enriched(env: &TestEnv, ids: std::ops::Range<usize>) {
    for index in ids {
        let action = enriched(format!("reset-{index}"));
        env.produce(
            "actions.enriched",
            &action.raw.message_key(),
            &encode_enriched_action(&action).unwrap(),
        );
    }
}

/// `/readyz` of the aggregator: (status, body).
fn readiness(env: &TestEnv) -> (u16, String) {
    match reqwest::blocking::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/readyz",
            env.run.aggregator_metrics_port
        ))
        .timeout(Duration::from_secs(2))
        .send()
    {
        Ok(response) => (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

#[test]
fn a_recreated_enriched_topic_is_reported_within_seconds_and_resumed_by_reset_input() {
    let mut env = TestEnv::new("input_reset", "");
    env.spawn("aggregate", "aggregate");
    publish_enriched(&env, 0..40);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        40,
        Duration::from_secs(60),
    );
    env.wait_http_ok(
        &format!(
            "http://127.0.0.1:{}/readyz",
            env.run.aggregator_metrics_port
        ),
        Duration::from_secs(10),
    );
    let old_partitions: HashMap<i32, usize> =
        env.read_topic("actions.enriched")
            .iter()
            .fold(HashMap::new(), |mut counts, record| {
                *counts.entry(record.partition).or_default() += 1;
                counts
            });

    let topic = format!("{}actions.enriched", env.run.topic_prefix);
    delete_topic(&topic);
    env.tool(&["topics"]);
    publish_enriched(&env, 100..104);
    let reset_at = Instant::now();

    // The aggregator says what happened, within seconds.
    let (status, body) = loop {
        let (status, body) = readiness(&env);
        if status == 503 && body.contains("input reset") {
            break (status, body);
        }
        assert!(
            reset_at.elapsed() < Duration::from_secs(60),
            "no input reset reported: {status} {body}\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "input reset reported after {:?}: {body}",
        reset_at.elapsed()
    );
    assert_eq!(status, 503);
    assert!(body.contains("agentmeter reset-input"), "{body}");
    let metrics = metrics_text(env.run.aggregator_metrics_port).unwrap();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("agentmeter_aggregator_input_reset{") && line.ends_with(" 1")
        ),
        "{metrics}"
    );
    // Nothing new was counted as if it were old, nothing old was lost.
    std::thread::sleep(Duration::from_secs(2));
    let counted: u64 = env.query("SELECT sum(action_count) FROM usage_exact")[0][0]
        .parse()
        .unwrap();
    assert!(counted <= 44, "{counted}");
    assert!(counted >= 40, "{counted}");

    // Every partition that had progress is reported; reset them from the start of the new topic.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reported = loop {
        let (_, body) = readiness(&env);
        let reported: Vec<i32> = old_partitions
            .keys()
            .copied()
            .filter(|partition| body.contains(&format!("partition {partition} of")))
            .collect();
        if reported.len() == old_partitions.len() || Instant::now() > deadline {
            break reported;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        reported.len(),
        old_partitions.len(),
        "{:?}",
        readiness(&env)
    );
    let mut args = vec!["reset-input".to_string()];
    for partition in &reported {
        args.push("--partition".into());
        args.push(partition.to_string());
    }
    args.push("--from".into());
    args.push("earliest".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = env.tool(&args);
    assert!(output.contains("new input epoch"), "{output}");

    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        44,
        Duration::from_secs(60),
    );
    env.wait_http_ok(
        &format!(
            "http://127.0.0.1:{}/readyz",
            env.run.aggregator_metrics_port
        ),
        Duration::from_secs(30),
    );
    let ids = env.query("SELECT count(), countIf(event_id LIKE 'reset-10_') FROM actions FINAL");
    assert_eq!(ids[0], vec!["44".to_string(), "4".to_string()]);
    // A partition that is not reset is refused by the tool.
    let refused = env.tool_failing(&["reset-input", "--partition", "0", "--from", "latest"]);
    assert!(refused.contains("does not look reset"), "{refused}");
}
