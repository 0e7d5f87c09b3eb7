//! Kafka settings, topic names and client configurations shared by the stages.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
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

/// The group generation and member id librdkafka currently holds for `consumer`, or `None`
/// when it is not in a group (yet).
pub fn group_membership<C: ConsumerContext, K: Consumer<C>>(consumer: &K) -> Option<(i32, String)> {
    use rdkafka::bindings as rd;
    // SAFETY: the client pointer is valid while `consumer` lives. librdkafka returns a new
    // metadata object (or null) that we own; the member id string belongs to that object and
    // is copied before the object is destroyed.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if metadata.is_null() {
            return None;
        }
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(metadata);
        let member = rd::rd_kafka_consumer_group_metadata_member_id(metadata);
        let member_id = if member.is_null() {
            String::new()
        } else {
            CStr::from_ptr(member).to_string_lossy().into_owned()
        };
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        Some((generation, member_id))
    }
}

/// Watches this process's consumer-group membership for the stuck states tansu 0.6.0's group
/// coordinator leaves behind after a member died without leaving (ADR 0001, "Consumer groups
/// on tansu"), and says when to leave and re-join the group:
///
/// * **same generation after a revocation** (fast path): a member expired while the group was
///   stable; tansu answers the survivor's re-join with the *old* generation and the *old*
///   assignment, so the dead member's partitions belong to nobody. Kafka always starts a new
///   generation after a revocation, so there this never fires.
/// * **stalled partitions** (any cause, also after the survivor itself restarted): a partition
///   this member does not own has records waiting and the group's committed offset for it has
///   not moved for [`Self::STALL`] — longer than Kafka takes to reassign a dead member's
///   partitions (session timeout plus a rebalance) — while none of this member's own
///   partitions is stalled (when they are too, the cause is likely shared, e.g. ClickHouse
///   down, and re-joining would not help). That is also how tansu's other stuck state shows:
///   a generation completed with a follower's empty assignment (its leader expired between
///   JoinGroup and SyncGroup), where every member owns nothing. On Kafka it needs an owner
///   that is alive but stuck; a re-join then costs one rebalance, backing off.
///
/// Leaving (LeaveGroup) is the membership change tansu handles correctly: it starts a new
/// generation whose leader is a live member, which assigns every partition. Exactly-once does
/// not depend on any of this: whoever gets a partition resumes from ClickHouse progress.
///
/// The stages store an offset for every record they are done with, so a partition's committed
/// offset moves whenever its owner makes progress. (DescribeGroups would name the members
/// directly, but tansu 0.6.0 with sqlite storage fails it and drops the connection.)
pub struct GroupWatchdog {
    group_id: String,
    topic: String,
    last_check: Instant,
    next_rejoin_allowed: Instant,
    stall_rejoin_backoff: Duration,
    assigned_generation: Option<i32>,
    revoked_since_assignment: bool,
    stale_assignment: bool,
    /// Per partition: the group's committed offset, and since when it has not moved while
    /// records were waiting.
    committed: HashMap<i32, (i64, Instant)>,
}

impl GroupWatchdog {
    /// Time between two checks of the group's offsets (one OffsetFetch, one ListOffsets per
    /// partition).
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
    /// How long a partition's committed offset must stand still, with records waiting, before
    /// it counts as orphaned: two session timeouts.
    pub const STALL: Duration = Duration::from_secs(60);
    /// Least time between two re-joins; for stall re-joins it doubles (up to 10 min) while
    /// partitions stay stalled.
    pub const MIN_REJOIN_INTERVAL: Duration = Duration::from_secs(30);

    pub fn new(group_id: &str, topic: &str) -> GroupWatchdog {
        GroupWatchdog {
            group_id: group_id.to_string(),
            topic: topic.to_string(),
            last_check: Instant::now(),
            next_rejoin_allowed: Instant::now(),
            stall_rejoin_backoff: Self::MIN_REJOIN_INTERVAL,
            assigned_generation: None,
            revoked_since_assignment: false,
            stale_assignment: false,
            committed: HashMap::new(),
        }
    }

    /// To be called by the rebalance callback after partitions were assigned, with the
    /// generation from [`group_membership`].
    pub fn on_assigned(&mut self, generation: Option<i32>) {
        if self.revoked_since_assignment
            && generation.is_some()
            && generation == self.assigned_generation
        {
            tracing::warn!(
                group = %self.group_id,
                ?generation,
                "re-assigned in the same generation after a revocation (a member expired and the broker kept the old assignment); will leave and re-join the group"
            );
            self.stale_assignment = true;
        }
        self.assigned_generation = generation;
        self.revoked_since_assignment = false;
    }

    /// To be called by the rebalance callback when partitions were revoked.
    pub fn on_revoked(&mut self) {
        self.revoked_since_assignment = true;
    }

    /// Whether the process should leave and re-join the group now, with the reason. Cheap
    /// between checks; a check makes a few broker round trips (blocking, bounded by timeouts).
    pub fn rejoin_reason<C: ConsumerContext, K: Consumer<C>>(
        &mut self,
        consumer: &K,
    ) -> Option<String> {
        let now = Instant::now();
        if self.stale_assignment && now >= self.next_rejoin_allowed {
            self.next_rejoin_allowed = now + Self::MIN_REJOIN_INTERVAL;
            return Some(
                "the broker re-assigned the previous generation after a revocation".into(),
            );
        }
        if now.duration_since(self.last_check) < Self::CHECK_INTERVAL {
            return None;
        }
        self.last_check = now;
        let orphaned = self.orphaned_partitions(consumer)?;
        if orphaned.is_empty() {
            self.stall_rejoin_backoff = Self::MIN_REJOIN_INTERVAL;
            return None;
        }
        if now < self.next_rejoin_allowed {
            return None;
        }
        self.next_rejoin_allowed = now + self.stall_rejoin_backoff;
        self.stall_rejoin_backoff = (self.stall_rejoin_backoff * 2).min(Duration::from_secs(600));
        Some(format!(
            "partitions {orphaned:?} of {} have records waiting and no committed progress for {}s, while this member's own partitions progress",
            self.topic,
            Self::STALL.as_secs()
        ))
    }

    /// Records that the process left the group to re-join it.
    pub fn rejoined(&mut self) {
        crate::telemetry::emit(crate::telemetry::GroupRejoined);
        self.stale_assignment = false;
        self.assigned_generation = None;
        self.revoked_since_assignment = false;
    }

    /// Partitions not owned by this member that are stalled, or `None` when nothing can be
    /// judged now (not in the group, a broker call failed, or an owned partition is stalled).
    fn orphaned_partitions<C: ConsumerContext, K: Consumer<C>>(
        &mut self,
        consumer: &K,
    ) -> Option<Vec<i32>> {
        let in_group = group_membership(consumer).is_some_and(|(_, member)| !member.is_empty());
        if !in_group {
            self.committed.clear();
            return None;
        }
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(&self.topic), timeout).ok()?;
        let partitions: Vec<i32> = metadata
            .topics()
            .first()?
            .partitions()
            .iter()
            .map(|partition| partition.id())
            .collect();
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition(&self.topic, *partition);
        }
        let committed = consumer.committed_offsets(list, timeout).ok()?;
        let owned = consumer.assignment().ok()?;
        let now = Instant::now();
        let mut orphaned = Vec::new();
        let mut own_stalled = false;
        for partition in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, partition, timeout)
                .ok()?;
            let offset = match committed
                .find_partition(&self.topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => low,
            };
            let entry = self.committed.entry(partition).or_insert((offset, now));
            if entry.0 != offset || high <= offset {
                *entry = (offset, now);
            }
            if now.duration_since(entry.1) < Self::STALL {
                continue;
            }
            tracing::debug!(group = %self.group_id, partition, offset, high, "partition stalled");
            if owned.find_partition(&self.topic, partition).is_some() {
                own_stalled = true;
            } else {
                orphaned.push(partition);
            }
        }
        (!own_stalled).then_some(orphaned)
    }
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
    fn watchdog_rejoins_when_a_revocation_keeps_the_generation() {
        // Not connected: the generation rule needs no broker, and the offset check is not due.
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .create()
            .unwrap();
        let mut watchdog = GroupWatchdog::new("g", "t");
        watchdog.on_assigned(Some(3));
        watchdog.on_revoked();
        watchdog.on_assigned(Some(4)); // Kafka: a new generation after every revocation
        assert_eq!(watchdog.rejoin_reason(&consumer), None);
        watchdog.on_revoked();
        watchdog.on_assigned(Some(4)); // tansu after a member expired: the old generation
        assert!(watchdog.rejoin_reason(&consumer).is_some());
        watchdog.rejoined();
        assert_eq!(watchdog.rejoin_reason(&consumer), None);
        // A first assignment (a restarted process) compares with nothing.
        let mut fresh = GroupWatchdog::new("g", "t");
        fresh.on_revoked();
        fresh.on_assigned(Some(4));
        assert_eq!(fresh.rejoin_reason(&consumer), None);
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
