//! Kafka settings, topic names and client configurations shared by the stages.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use serde::Deserialize;

/// `[kafka]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// Prefix of every topic name; tests use a fresh one per test.
    pub topic_prefix: String,
    /// Partitions of the action topics created by `agentmeter topics`. More partitions = more
    /// enricher / aggregator processes can share the work.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// Extra librdkafka settings for every client (e.g. security). Keys that agentmeter's
    /// delivery guarantees depend on (acks, idempotence, offset storing) cannot be overridden.
    pub client_overrides: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "agentmeter.".into(),
            partitions: 4,
            replication_factor: 1,
            client_overrides: BTreeMap::new(),
        }
    }
}

/// The topic names agentmeter uses, all under [`KafkaSettings::topic_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Raw actions from ingest or direct publishers.
    pub raw: String,
    /// Actions with cost and tags, for the aggregator.
    pub enriched: String,
    /// Records that could not be processed, with the reason in headers.
    pub dead_letter: String,
    /// Log-compacted: key = workspace id, value = that workspace's whole configuration.
    pub config: String,
}

impl KafkaSettings {
    pub fn topics(&self) -> Topics {
        let prefix = &self.topic_prefix;
        Topics {
            raw: format!("{prefix}actions.raw"),
            enriched: format!("{prefix}actions.enriched"),
            dead_letter: format!("{prefix}actions.dlq"),
            config: format!("{prefix}config"),
        }
    }

    /// Checks values that would otherwise fail late.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.brokers.trim().is_empty(), "kafka.brokers is empty");
        anyhow::ensure!(self.partitions >= 1, "kafka.partitions must be at least 1");
        anyhow::ensure!(
            self.replication_factor >= 1,
            "kafka.replication_factor must be at least 1"
        );
        Ok(())
    }

    fn base_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client_overrides {
            config.set(key, value);
        }
        config
    }

    /// A producer that answers only once every in-sync replica has the record, never duplicates
    /// on internal retries, and keeps per-partition order.
    pub fn producer_config(&self, message_timeout: Duration) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "200000")
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().to_string(),
            );
        // Set last so that client_overrides cannot weaken them.
        config.set("enable.idempotence", "true").set("acks", "all");
        config
    }

    /// A group consumer whose offsets advance only when the stage stores them explicitly after
    /// its output is durable (rust-rdkafka's at-least-once pattern).
    pub fn group_consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100");
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        config
    }

    /// A consumer with no group, for reading whole topics by assignment (config topic, tools).
    pub fn standalone_consumer_config(&self) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("group.id", "agentmeter-standalone-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100");
        config
    }
}

/// Creates the agentmeter topics that do not exist yet (the broker here does not auto-create).
/// Returns the names it created.
pub async fn create_topics(settings: &KafkaSettings) -> anyhow::Result<Vec<String>> {
    settings.validate()?;
    let admin: AdminClient<DefaultClientContext> = settings
        .base_config()
        .create()
        .context("cannot create a Kafka admin client")?;
    let topics = settings.topics();
    let replication = || TopicReplication::Fixed(settings.replication_factor);
    let new_topics = [
        NewTopic::new(&topics.raw, settings.partitions, replication()),
        NewTopic::new(&topics.enriched, settings.partitions, replication()),
        NewTopic::new(&topics.dead_letter, settings.partitions, replication()),
        NewTopic::new(&topics.config, 1, replication()).set("cleanup.policy", "compact"),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .with_context(|| {
            format!(
                "cannot reach Kafka at {} to create topics",
                settings.brokers
            )
        })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_cannot_weaken_delivery_guarantees() {
        let mut settings = KafkaSettings::default();
        settings.client_overrides.insert("acks".into(), "0".into());
        settings
            .client_overrides
            .insert("enable.auto.offset.store".into(), "true".into());
        let producer = settings.producer_config(Duration::from_secs(5));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = settings.group_consumer_config("g");
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn topic_names_share_the_prefix() {
        let settings = KafkaSettings {
            topic_prefix: "t1.".into(),
            ..KafkaSettings::default()
        };
        assert_eq!(settings.topics().raw, "t1.actions.raw");
        assert_eq!(settings.topics().config, "t1.config");
    }
}
