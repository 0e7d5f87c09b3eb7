//! Plain rdkafka helpers: preloading topics, watermarks, topic cleanup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmeter_runtime::kafka::KafkaSettings;
use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

/// Counts delivery reports.
#[derive(Default, Clone)]
pub struct Deliveries {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The stages' Kafka settings with these brokers.
fn stage_settings(brokers: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_string(),
        ..KafkaSettings::default()
    }
}

/// Producer settings exactly as the stages use them (`KafkaSettings::producer_config`: acks=all,
/// idempotent, linger 5 ms, 200,000 queued messages at most), with a 120 s delivery timeout.
pub fn stage_like_producer_config(brokers: &str) -> ClientConfig {
    stage_settings(brokers).producer_config(Duration::from_secs(120))
}

/// Group consumer settings exactly as the stages use them
/// (`KafkaSettings::group_consumer_config`), with dynamic membership.
pub fn stage_like_consumer_config(brokers: &str, group_id: &str) -> ClientConfig {
    stage_settings(brokers).group_consumer_config(group_id, "")
}

/// A producer with the stages' settings that counts delivery reports.
pub fn stage_producer(brokers: &str) -> anyhow::Result<BaseProducer<Deliveries>> {
    stage_like_producer_config(brokers)
        .create_with_context(Deliveries::default())
        .context("create producer")
}

/// The same with another `linger.ms` (baseline experiments only).
pub fn producer_with_linger(
    brokers: &str,
    linger_ms: u64,
) -> anyhow::Result<BaseProducer<Deliveries>> {
    stage_like_producer_config(brokers)
        .set("linger.ms", linger_ms.to_string())
        .create_with_context(Deliveries::default())
        .context("create producer")
}

/// Produces `count` records made by `record(i) -> (key, payload)` to `topic`; waits for every
/// acknowledgement. Returns the elapsed time.
pub fn produce_all(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    count: u64,
    mut record: impl FnMut(u64) -> (Vec<u8>, Vec<u8>),
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let context = producer.context().clone();
    let ok_before = context.ok.load(Ordering::Relaxed);
    for index in 0..count {
        let (key, payload) = record(index);
        let mut pending = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    pending = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(error).context("produce"),
            }
        }
        if index % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .context("flush producer")?;
    let delivered = context.ok.load(Ordering::Relaxed) - ok_before;
    let failed = context.failed.load(Ordering::Relaxed);
    anyhow::ensure!(
        delivered == count && failed == 0,
        "produced {count}, acknowledged {delivered}, failed {failed}"
    );
    Ok(started.elapsed())
}

/// A group-less consumer for metadata and watermarks.
pub fn metadata_consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "agentmeter-bench-watermarks")
        .set("enable.auto.commit", "false")
        .create()
        .context("create consumer")
}

/// Records in a topic: the sum of its partitions' high watermarks (no transactions here, so no
/// control records).
pub fn record_count(consumer: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{partition}"))?;
        total += high - low.max(0);
    }
    Ok(total)
}

/// Deletes topics (this run's own only). Runs on a thread of its own, so it may be called from
/// inside an async runtime.
pub fn delete_topics(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let brokers = brokers.to_string();
    let names = names.to_vec();
    std::thread::spawn(move || delete_topics_blocking(&brokers, &names))
        .join()
        .map_err(|_| anyhow::anyhow!("delete_topics panicked"))?
}

fn delete_topics_blocking(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = runtime.block_on(admin.delete_topics(
        &refs,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))?;
    for result in results {
        if let Err((name, code)) = result {
            if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                anyhow::bail!("delete {name}: {code}");
            }
        }
    }
    Ok(())
}

/// Creates extra topics with `partitions` partitions (on a thread of its own).
pub fn create_topics(brokers: &str, names: &[String], partitions: i32) -> anyhow::Result<()> {
    let brokers = brokers.to_string();
    let names = names.to_vec();
    std::thread::spawn(move || create_topics_blocking(&brokers, &names, partitions))
        .join()
        .map_err(|_| anyhow::anyhow!("create_topics panicked"))?
}

fn create_topics_blocking(brokers: &str, names: &[String], partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{NewTopic, TopicReplication};
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = runtime.block_on(admin.create_topics(
        &topics,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))?;
    for result in results {
        if let Err((name, code)) = result {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("create {name}: {code}");
            }
        }
    }
    Ok(())
}
