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
    /// One partition, every record kept: the finalization log of invoices (ADR 0004).
    pub finalizations: String,
}

impl KafkaSettings {
    pub fn topics(&self) -> Topics {
        let prefix = &self.topic_prefix;
        Topics {
            raw: format!("{prefix}actions.raw"),
            enriched: format!("{prefix}actions.enriched"),
            dead_letter: format!("{prefix}actions.dlq"),
            config: format!("{prefix}config"),
            finalizations: format!("{prefix}billing.finalizations"),
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

    /// `bootstrap.servers`, then agentmeter's `tunable_defaults`, then `client_overrides` over
    /// them. Callers set what delivery depends on after this, so overrides cannot change it.
    fn client_config(&self, tunable_defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in tunable_defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.client_overrides {
            config.set(key, value);
        }
        config
    }

    /// A producer that answers only once every in-sync replica has the record, never duplicates
    /// on internal retries, and keeps per-partition order. `linger.ms` and
    /// `queue.buffering.max.messages` may be overridden.
    pub fn producer_config(&self, message_timeout: Duration) -> ClientConfig {
        let mut config = self.client_config(&[
            ("linger.ms", "5"),
            ("queue.buffering.max.messages", "200000"),
        ]);
        config
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().to_string(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all");
        config
    }

    /// A group consumer whose offsets advance only when the stage stores them explicitly after
    /// its output is durable (rust-rdkafka's at-least-once pattern). `session.timeout.ms`,
    /// `heartbeat.interval.ms` and `fetch.wait.max.ms` may be overridden.
    ///
    /// `group_instance_id` (non-empty) makes the process a *static* member (KIP-345): a process
    /// restarted with the same id takes over its predecessor's membership and partitions at
    /// once, instead of joining as a new member while the dead one is still in the group. That
    /// is what keeps groups on tansu 0.6.0 working through crashes (ADR 0001, "Consumer groups
    /// on tansu"); on Kafka it spares a rebalance per restart. Every process of a group needs
    /// its own id; empty means dynamic membership.
    pub fn group_consumer_config(&self, group_id: &str, group_instance_id: &str) -> ClientConfig {
        let session_timeout_ms = GROUP_SESSION_TIMEOUT.as_millis().to_string();
        let mut config = self.client_config(&[
            ("session.timeout.ms", &session_timeout_ms),
            ("heartbeat.interval.ms", "1000"),
            ("fetch.wait.max.ms", "100"),
        ]);
        config
            .set("auto.offset.reset", "earliest")
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        // Per process, never from client_overrides (which every process of a group shares:
        // one id for all of them would make them one member).
        if group_instance_id.is_empty() {
            config.remove("group.instance.id");
        } else {
            config.set("group.instance.id", group_instance_id);
        }
        config
    }

    /// A consumer with no group, for reading whole topics by assignment (config topic, tools).
    pub fn standalone_consumer_config(&self) -> ClientConfig {
        let mut config = self.client_config(&[("fetch.wait.max.ms", "100")]);
        config
            .set("group.id", "agentmeter-standalone-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        config
    }
}

/// Session timeout of group members: how long a member that stopped without leaving (crash,
/// network loss) keeps its partitions before the group moves them. A restarted static member
/// takes its partitions back before that. 30 s leaves a restart in a debug build on a loaded
/// machine (about 7 s on tansu, which pauses static joins 3 s) far from expiring its own
/// membership. tansu keeps the session timeout of the request that created the group.
pub const GROUP_SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `group_instance_id` of a stage: `<stage>-<host name>` (the `HOSTNAME` variable, which
/// Docker and Kubernetes set to the container or pod name, else the kernel's host name), so a
/// process restarted on the same host or pod resumes as the same group member. Empty (dynamic
/// membership) when no host name is known.
pub fn default_group_instance_id(stage: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|host| host.trim().to_string())
        .unwrap_or_default();
    let id: String = format!("{stage}-{host}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if host.is_empty() {
        String::new()
    } else {
        id
    }
}

/// Checks a `group_instance_id` setting (`what` names it in the error).
pub fn validate_group_instance_id(what: &str, id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        id.len() <= 249
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "{what} {id:?} must be at most 249 letters, digits, '.', '_' or '-' (empty: dynamic membership)"
    );
    Ok(())
}

/// Creates the agentmeter topics that do not exist yet (the broker here does not auto-create).
/// Returns the names it created.
pub async fn create_topics(settings: &KafkaSettings) -> anyhow::Result<Vec<String>> {
    settings.validate()?;
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config(&[])
        .create()
        .context("cannot create a Kafka admin client")?;
    let topics = settings.topics();
    let replication = || TopicReplication::Fixed(settings.replication_factor);
    let new_topics = [
        NewTopic::new(&topics.raw, settings.partitions, replication()),
        NewTopic::new(&topics.enriched, settings.partitions, replication()),
        NewTopic::new(&topics.dead_letter, settings.partitions, replication()),
        NewTopic::new(&topics.config, 1, replication()).set("cleanup.policy", "compact"),
        // Invoice numbers are positions in this log: it is one partition and nothing expires.
        NewTopic::new(&topics.finalizations, 1, replication())
            .set("cleanup.policy", "delete")
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1"),
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

    fn settings_with_overrides(overrides: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            client_overrides: overrides
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            ..KafkaSettings::default()
        }
    }

    #[test]
    fn overrides_cannot_weaken_delivery_guarantees() {
        let settings =
            settings_with_overrides(&[("acks", "0"), ("enable.auto.offset.store", "true")]);
        let producer = settings.producer_config(Duration::from_secs(5));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = settings.group_consumer_config("g", "");
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn overrides_replace_tuning_defaults() {
        let settings =
            settings_with_overrides(&[("linger.ms", "20"), ("session.timeout.ms", "45000")]);
        assert_eq!(
            settings
                .producer_config(Duration::from_secs(5))
                .get("linger.ms"),
            Some("20")
        );
        let consumer = settings.group_consumer_config("g", "");
        assert_eq!(consumer.get("session.timeout.ms"), Some("45000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("1000"));
    }

    #[test]
    fn static_membership_is_per_process_and_not_overridable() {
        let settings = settings_with_overrides(&[("group.instance.id", "shared")]);
        let consumer = settings.group_consumer_config("g", "aggregator-host-1");
        assert_eq!(consumer.get("group.instance.id"), Some("aggregator-host-1"));
        let dynamic = settings.group_consumer_config("g", "");
        assert_eq!(dynamic.get("group.instance.id"), None);
        assert_eq!(
            consumer.get("session.timeout.ms"),
            Some(GROUP_SESSION_TIMEOUT.as_millis().to_string().as_str())
        );
    }

    #[test]
    fn group_instance_ids_are_checked() {
        let default = default_group_instance_id("enricher");
        assert!(default.is_empty() || default.starts_with("enricher-"));
        validate_group_instance_id("x", &default).unwrap();
        validate_group_instance_id("x", "").unwrap();
        validate_group_instance_id("x", "aggregate-second.2_b").unwrap();
        assert!(validate_group_instance_id("x", "has space").is_err());
        assert!(validate_group_instance_id("x", &"a".repeat(250)).is_err());
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
