//! Who owns which input partition, and whether the owner makes progress (ADR 0003).
//!
//! * [`OwnershipSettings`] — the `[enricher.ownership]` / `[aggregator.ownership]` table:
//!   `mode = "static"` (replica *i* of *M* owns the partitions *p* with *p mod M = i*; no group
//!   coordinator involved, the default) or `mode = "group"` (a Kafka consumer group, with the
//!   watchdog of [`crate::group::GroupWatchdog`] for the local broker, switchable off).
//! * [`StaticOwnership`] — the ordinal rule, pure.
//! * [`OwnedPartitions`] — the set the stage owns right now, shared with the progress watch.
//! * [`ProgressWatch`] — a blocking thread that reads the input topic's high watermarks and the
//!   stage's committed offsets every few seconds and says, for `/readyz`, the log and the
//!   `agentmeter_input_stalled` gauge, when the stage holds no partition while records wait, or
//!   an owned partition has records waiting and no progress for `stall_after_seconds`, or the
//!   broker cannot be reached. The verdict itself is the pure [`judge`].
//!
//! Both stages store an offset for every record they are done with (the aggregator after the
//! flush that made it durable), so a partition's committed offset is its progress.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::kafka::KafkaSettings;
use crate::shutdown::Shutdown;
use crate::telemetry::{emit, InputObserved, InputProgressJudged, PartitionsOwned};

/// How the processes of a stage divide the partitions of its input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnershipMode {
    /// Replica `replica` of `replicas` owns the partitions `p` with `p mod replicas = replica`.
    Static,
    /// A Kafka consumer group assigns the partitions (for a real Kafka cluster).
    Group,
}

/// `[<stage>.ownership]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipSettings {
    /// `"static"` (default): partitions by replica ordinal, no group coordinator needed.
    /// `"group"`: a Kafka consumer group (`group_id`, `group_instance_id`) assigns them.
    pub mode: OwnershipMode,
    /// Static mode: how many processes of this stage run. Every process must be given the same
    /// number; to scale, change it on all of them (ADR 0003, "Scaling").
    pub replicas: u32,
    /// Static mode: this process's ordinal, `0..replicas`. Default: the number after the last
    /// `-` of the host name (a Kubernetes StatefulSet names its pods `<name>-0`, `<name>-1`, …),
    /// else 0 when `replicas` is 1.
    pub replica: Option<u32>,
    /// A partition with records waiting whose committed offset has not moved for this long
    /// makes the stage not ready (`/readyz` 503, `agentmeter_input_stalled` 1).
    #[serde(
        alias = "stall_after",
        deserialize_with = "crate::duration::seconds_u64"
    )]
    pub stall_after_seconds: u64,
    /// Group mode: leave and re-join the group when the local broker's coordinator left it
    /// stuck (ADR 0001, "Consumer groups on tansu"). Switch off for a real Kafka cluster.
    pub group_watchdog: bool,
}

impl Default for OwnershipSettings {
    fn default() -> Self {
        OwnershipSettings {
            mode: OwnershipMode::Static,
            replicas: 1,
            replica: None,
            stall_after_seconds: 60,
            group_watchdog: true,
        }
    }
}

impl OwnershipSettings {
    /// Checks the settings and resolves this process's ordinal (`what` names the table).
    pub fn validate(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.replicas >= 1, "{what}.replicas must be at least 1");
        anyhow::ensure!(
            self.stall_after_seconds >= 1,
            "{what}.stall_after_seconds must be at least 1"
        );
        if self.mode == OwnershipMode::Static {
            self.static_ownership(what)?;
        }
        Ok(())
    }

    /// The static rule for this process (checked: the ordinal is known and below `replicas`).
    pub fn static_ownership(&self, what: &str) -> anyhow::Result<StaticOwnership> {
        let replica = match self.replica {
            Some(replica) => replica,
            None => match host_ordinal() {
                Some(ordinal) => ordinal,
                None if self.replicas == 1 => 0,
                None => anyhow::bail!(
                    "{what}.replica is not set and the host name ends in no -<number>: with {what}.replicas = {} every process needs its ordinal (0 to {})",
                    self.replicas,
                    self.replicas - 1
                ),
            },
        };
        anyhow::ensure!(
            replica < self.replicas,
            "{what}.replica ({replica}) must be below {what}.replicas ({})",
            self.replicas
        );
        Ok(StaticOwnership {
            replica,
            replicas: self.replicas,
        })
    }

    pub fn stall_after(&self) -> Duration {
        Duration::from_secs(self.stall_after_seconds)
    }
}

/// The ordinal at the end of the host name (`aggregator-2` → 2), as a StatefulSet gives it.
fn host_ordinal() -> Option<u32> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())?;
    ordinal_of(host.trim())
}

fn ordinal_of(host: &str) -> Option<u32> {
    let (_, digits) = host.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Replica `replica` of `replicas` owns the partitions `p` with `p mod replicas = replica`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticOwnership {
    pub replica: u32,
    pub replicas: u32,
}

impl StaticOwnership {
    pub fn owns(&self, partition: i32) -> bool {
        partition >= 0 && partition as u32 % self.replicas == self.replica
    }

    /// The partitions of `partitions` this replica owns, in order.
    pub fn owned(&self, partitions: &[i32]) -> Vec<i32> {
        let mut owned: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| self.owns(*p))
            .collect();
        owned.sort_unstable();
        owned
    }
}

/// Static mode's side of the consumer: which owned partitions of the input topic still have to
/// be assigned. It reads the topic's partitions at start (retrying, with back-off, while the
/// broker or the topic is not there: an outage to wait out) and every 30 s afterwards, so that
/// partitions added to the topic are taken up. The enricher and the aggregator both use it.
#[derive(Debug)]
pub struct StaticAssigner {
    ownership: StaticOwnership,
    topic: String,
    /// What `stage.ownership` is called in messages (`aggregator.ownership`).
    setting: &'static str,
    started: Vec<i32>,
    next_check: Instant,
    failures: u32,
}

impl StaticAssigner {
    /// How often the topic's partitions are read again once known.
    pub const RECHECK_INTERVAL: Duration = Duration::from_secs(30);

    pub fn new(ownership: StaticOwnership, topic: &str, setting: &'static str) -> StaticAssigner {
        StaticAssigner {
            ownership,
            topic: topic.to_string(),
            setting,
            started: Vec::new(),
            next_check: Instant::now(),
            failures: 0,
        }
    }

    pub fn ownership(&self) -> StaticOwnership {
        self.ownership
    }

    /// How long until the next read of the topic's partitions is due.
    pub fn time_until_due(&self) -> Duration {
        self.next_check.saturating_duration_since(Instant::now())
    }

    /// When due, reads the topic's partitions (blocking, bounded) and returns the owned ones
    /// not taken up yet, recording them in `owned`; they must be assigned by the caller. Empty
    /// when not due, nothing is new, or the read failed (logged on the first failure and every
    /// 30th).
    pub fn take_up<C: rdkafka::consumer::ConsumerContext, K: Consumer<C>>(
        &mut self,
        consumer: &K,
        owned: &OwnedPartitions,
    ) -> Vec<i32> {
        if Instant::now() < self.next_check {
            return Vec::new();
        }
        let partitions = match topic_partitions(consumer, &self.topic, Duration::from_secs(5)) {
            Ok(partitions) => partitions,
            Err(error) => {
                self.failures += 1;
                self.next_check =
                    Instant::now() + Duration::from_millis(500 * u64::from(self.failures.min(10)));
                if self.failures == 1 || self.failures.is_multiple_of(30) {
                    tracing::warn!(error = %format!("{error:#}"), "cannot read the input topic's partitions; retrying");
                }
                return Vec::new();
            }
        };
        self.failures = 0;
        self.next_check = Instant::now() + Self::RECHECK_INTERVAL;
        let new: Vec<i32> = self
            .ownership
            .owned(&partitions)
            .into_iter()
            .filter(|partition| !self.started.contains(partition))
            .collect();
        if self.started.is_empty() {
            // Known even when it is nothing (more replicas than partitions).
            owned.add([]);
            if new.is_empty() {
                tracing::error!(
                    replica = self.ownership.replica,
                    replicas = self.ownership.replicas,
                    partitions = partitions.len(),
                    "this replica owns no partition of {}: lower {}.replicas",
                    self.topic,
                    self.setting
                );
            }
        }
        if !new.is_empty() {
            tracing::info!(partitions = ?new, topic = %self.topic, "owned partitions taken up");
            owned.add(new.iter().copied());
            self.started.extend(new.iter().copied());
        }
        new
    }
}

/// The partition ids of `topic`, from the broker's metadata (blocking, bounded by `timeout`).
/// An error when the topic is unknown or has no partitions.
pub fn topic_partitions<C: rdkafka::consumer::ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|error| anyhow::anyhow!("cannot read the metadata of {topic}: {error}"))?;
    let topic_metadata = metadata
        .topics()
        .first()
        .ok_or_else(|| anyhow::anyhow!("topic {topic} unknown to the broker"))?;
    if let Some(error) = topic_metadata.error() {
        anyhow::bail!("topic {topic}: {error:?}");
    }
    let mut partitions: Vec<i32> = topic_metadata
        .partitions()
        .iter()
        .map(|partition| partition.id())
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    partitions.sort_unstable();
    Ok(partitions)
}

/// The partitions a stage owns now; written by the stage on (re)assignment, read by the watch.
#[derive(Debug, Clone, Default)]
pub struct OwnedPartitions(Arc<Mutex<Option<BTreeSet<i32>>>>);

impl OwnedPartitions {
    /// Records the owned set (`None` until the stage has an assignment at all).
    pub fn set(&self, partitions: impl IntoIterator<Item = i32>) {
        let set: BTreeSet<i32> = partitions.into_iter().collect();
        emit(PartitionsOwned { count: set.len() });
        *self.0.lock().expect("owned partitions lock") = Some(set);
    }

    pub fn add(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut guard = self.0.lock().expect("owned partitions lock");
        let set = guard.get_or_insert_with(BTreeSet::new);
        set.extend(partitions);
        emit(PartitionsOwned { count: set.len() });
    }

    pub fn remove(&self, partitions: &[i32]) {
        let mut guard = self.0.lock().expect("owned partitions lock");
        let set = guard.get_or_insert_with(BTreeSet::new);
        for partition in partitions {
            set.remove(partition);
        }
        emit(PartitionsOwned { count: set.len() });
    }

    pub fn get(&self) -> Option<BTreeSet<i32>> {
        self.0.lock().expect("owned partitions lock").clone()
    }
}

/// One observation of a partition: the group's committed offset (`None`: nothing committed,
/// read from the low watermark) and the high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionObservation {
    pub low: i64,
    pub high: i64,
    pub committed: Option<i64>,
}

impl PartitionObservation {
    fn position(&self) -> i64 {
        self.committed.unwrap_or(self.low).max(self.low)
    }

    fn waiting(&self) -> i64 {
        (self.high - self.position()).max(0)
    }
}

/// What the watch remembers between observations: per partition, the position and since when
/// it has not moved while records were waiting.
#[derive(Debug, Default)]
pub struct StallTracker {
    since: HashMap<i32, (i64, Instant)>,
}

impl StallTracker {
    /// Records an observation; returns, per partition, how long it has stood still with records
    /// waiting (zero when it moved or nothing waits).
    pub fn observe(
        &mut self,
        now: Instant,
        observations: &BTreeMap<i32, PartitionObservation>,
    ) -> BTreeMap<i32, Duration> {
        self.since
            .retain(|partition, _| observations.contains_key(partition));
        observations
            .iter()
            .map(|(partition, observation)| {
                let position = observation.position();
                let entry = self.since.entry(*partition).or_insert((position, now));
                if entry.0 != position || observation.waiting() == 0 {
                    *entry = (position, now);
                }
                (*partition, now.duration_since(entry.1))
            })
            .collect()
    }
}

/// The readiness verdict of a consuming stage from what it owns and what the topic holds:
/// `Err` with the reason when it owns no partition while records wait anywhere, or an owned
/// partition has records waiting and no progress for `stall_after`.
pub fn judge(
    topic: &str,
    owned: Option<&BTreeSet<i32>>,
    observations: &BTreeMap<i32, PartitionObservation>,
    standing_still: &BTreeMap<i32, Duration>,
    stall_after: Duration,
) -> Result<(), String> {
    let waiting: i64 = observations
        .values()
        .map(PartitionObservation::waiting)
        .sum();
    let owned = match owned {
        Some(owned) if !owned.is_empty() => owned,
        Some(_) | None => {
            // Records waiting that nobody moves: this process should own some of them.
            let orphaned: Vec<i32> = observations
                .iter()
                .filter(|(partition, observation)| {
                    observation.waiting() > 0
                        && standing_still
                            .get(partition)
                            .is_some_and(|still| *still >= stall_after)
                })
                .map(|(partition, _)| *partition)
                .collect();
            if orphaned.is_empty() {
                return Ok(());
            }
            return Err(format!(
                "this process holds no partition of {topic} while {waiting} records wait (partitions {orphaned:?} have not moved for {}s or more)",
                stall_after.as_secs()
            ));
        }
    };
    let stalled: Vec<String> = owned
        .iter()
        .filter_map(|partition| {
            let observation = observations.get(partition)?;
            let still = standing_still.get(partition)?;
            (observation.waiting() > 0 && *still >= stall_after).then(|| {
                format!(
                    "partition {partition}: {} records wait at offset {}, no progress for {}s",
                    observation.waiting(),
                    observation.position(),
                    still.as_secs()
                )
            })
        })
        .collect();
    if stalled.is_empty() {
        Ok(())
    } else {
        Err(format!("{topic}: {}", stalled.join("; ")))
    }
}

/// The readiness of a consuming stage's input, kept up to date by a blocking thread.
#[derive(Clone)]
pub struct ProgressWatch {
    verdict: Arc<Mutex<Result<(), String>>>,
}

impl ProgressWatch {
    /// How often the watch reads the topic and the committed offsets.
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(3);
    /// How long the broker may be unreachable before the stage reports it.
    pub const BROKER_GRACE: Duration = Duration::from_secs(5);
    /// Least time between two log lines about the same not-ready state.
    pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

    /// Starts watching `topic` for the consumer group `group_id` (read only: this client never
    /// joins the group) until shutdown.
    pub fn spawn(
        kafka: &KafkaSettings,
        group_id: &str,
        topic: &str,
        owned: OwnedPartitions,
        stall_after: Duration,
        shutdown: Shutdown,
    ) -> anyhow::Result<ProgressWatch> {
        let mut config = kafka.standalone_consumer_config();
        config.set("group.id", group_id);
        let consumer: BaseConsumer = config.create().map_err(|error| {
            anyhow::anyhow!("cannot create the progress watch's client: {error}")
        })?;
        let watch = ProgressWatch {
            verdict: Arc::new(Mutex::new(Ok(()))),
        };
        let verdict = watch.verdict.clone();
        let topic = topic.to_string();
        std::thread::Builder::new()
            .name("progress-watch".into())
            .spawn(move || watch_loop(&consumer, &topic, &owned, stall_after, &verdict, &shutdown))
            .map_err(|error| anyhow::anyhow!("cannot start the progress watch: {error}"))?;
        Ok(watch)
    }

    /// `Err` with the reason while the stage's input is not progressing.
    pub fn readiness(&self) -> Result<(), String> {
        self.verdict.lock().expect("verdict lock").clone()
    }
}

fn watch_loop(
    consumer: &BaseConsumer,
    topic: &str,
    owned: &OwnedPartitions,
    stall_after: Duration,
    verdict: &Mutex<Result<(), String>>,
    shutdown: &Shutdown,
) {
    let mut tracker = StallTracker::default();
    let mut unreachable_since: Option<Instant> = None;
    let mut last_logged: Option<(String, Instant)> = None;
    while !shutdown.is_requested() {
        let judged = match observe(consumer, topic) {
            Ok(observations) => {
                unreachable_since = None;
                let standing_still = tracker.observe(Instant::now(), &observations);
                let lag: i64 = observations
                    .values()
                    .map(PartitionObservation::waiting)
                    .sum();
                emit(InputObserved {
                    records_waiting: lag,
                });
                judge(
                    topic,
                    owned.get().as_ref(),
                    &observations,
                    &standing_still,
                    stall_after,
                )
            }
            Err(error) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ProgressWatch::BROKER_GRACE {
                    Err(format!(
                        "cannot read {topic} from the broker for {}s: {error}",
                        since.elapsed().as_secs()
                    ))
                } else {
                    // A moment without the broker is no verdict: keep the last one.
                    verdict.lock().expect("verdict lock").clone()
                }
            }
        };
        emit(InputProgressJudged {
            stalled: judged.is_err(),
        });
        match &judged {
            Ok(()) => {
                if last_logged.take().is_some() {
                    tracing::info!(topic, "input progresses again; ready");
                }
            }
            Err(reason) => {
                let due = last_logged.as_ref().is_none_or(|(logged, at)| {
                    at.elapsed() >= ProgressWatch::LOG_INTERVAL
                        || kind_of(logged) != kind_of(reason)
                });
                if due {
                    tracing::warn!(%reason, "not ready: input not progressing");
                    last_logged = Some((reason.clone(), Instant::now()));
                }
            }
        }
        *verdict.lock().expect("verdict lock") = judged;
        let deadline = Instant::now() + ProgressWatch::CHECK_INTERVAL;
        while Instant::now() < deadline && !shutdown.is_requested() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The reason up to its first number, so that a changing count does not make a new log line.
fn kind_of(reason: &str) -> &str {
    let end = reason
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(reason.len());
    &reason[..end]
}

/// Watermarks and committed offsets of every partition of `topic` (blocking, bounded).
fn observe(
    consumer: &BaseConsumer,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, PartitionObservation>> {
    let timeout = Duration::from_secs(3);
    let partitions = topic_partitions(consumer, topic, timeout)?;
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(list, timeout)
        .map_err(|error| anyhow::anyhow!("cannot read committed offsets: {error}"))?;
    let mut observations = BTreeMap::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|error| {
                anyhow::anyhow!("cannot read watermarks of partition {partition}: {error}")
            })?;
        let committed = match committed
            .find_partition(topic, partition)
            .map(|element| element.offset())
        {
            Some(Offset::Offset(offset)) => Some(offset),
            _ => None,
        };
        observations.insert(
            partition,
            PartitionObservation {
                low,
                high,
                committed,
            },
        );
    }
    // Dropped before the consumer is used again (SERVICES.md: a live list from `committed()`
    // can block the consumer's drop).
    drop(committed);
    Ok(observations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observations(entries: &[(i32, i64, Option<i64>)]) -> BTreeMap<i32, PartitionObservation> {
        entries
            .iter()
            .map(|(partition, high, committed)| {
                (
                    *partition,
                    PartitionObservation {
                        low: 0,
                        high: *high,
                        committed: *committed,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn static_ownership_splits_partitions_by_ordinal() {
        let partitions = [0, 1, 2, 3, 4];
        let first = StaticOwnership {
            replica: 0,
            replicas: 2,
        };
        let second = StaticOwnership {
            replica: 1,
            replicas: 2,
        };
        assert_eq!(first.owned(&partitions), vec![0, 2, 4]);
        assert_eq!(second.owned(&partitions), vec![1, 3]);
        let alone = StaticOwnership {
            replica: 0,
            replicas: 1,
        };
        assert_eq!(alone.owned(&partitions), partitions.to_vec());
    }

    #[test]
    fn the_ordinal_comes_from_a_statefulset_pod_name() {
        assert_eq!(ordinal_of("aggregator-2"), Some(2));
        assert_eq!(ordinal_of("agentmeter-enricher-10"), Some(10));
        assert_eq!(ordinal_of("laptop"), None);
        assert_eq!(ordinal_of("host-a1"), None);
        assert_eq!(ordinal_of("host-"), None);
    }

    #[test]
    fn settings_refuse_an_ordinal_outside_the_replicas() {
        let settings = OwnershipSettings {
            replicas: 2,
            replica: Some(2),
            ..OwnershipSettings::default()
        };
        let error = settings.validate("aggregator.ownership").unwrap_err();
        assert!(error.to_string().contains("must be below"), "{error}");
        let fine = OwnershipSettings {
            replicas: 2,
            replica: Some(1),
            ..OwnershipSettings::default()
        };
        assert_eq!(
            fine.static_ownership("x").unwrap(),
            StaticOwnership {
                replica: 1,
                replicas: 2
            }
        );
        let group = OwnershipSettings {
            mode: OwnershipMode::Group,
            replicas: 0,
            ..OwnershipSettings::default()
        };
        assert!(group.validate("x").is_err());
    }

    #[test]
    fn a_partition_standing_still_under_waiting_records_is_stalled() {
        let stall_after = Duration::from_secs(60);
        let start = Instant::now();
        let mut tracker = StallTracker::default();
        let owned: BTreeSet<i32> = [0, 1].into();
        let first = observations(&[(0, 100, Some(40)), (1, 50, Some(50))]);
        let still = tracker.observe(start, &first);
        assert_eq!(
            judge("t", Some(&owned), &first, &still, stall_after),
            Ok(())
        );
        // 61 s later partition 0 has not moved with 60 records waiting; 1 has nothing waiting.
        let later = observations(&[(0, 120, Some(40)), (1, 50, Some(50))]);
        let still = tracker.observe(start + Duration::from_secs(61), &later);
        let verdict = judge("t", Some(&owned), &later, &still, stall_after).unwrap_err();
        assert!(
            verdict.contains("partition 0: 80 records wait at offset 40"),
            "{verdict}"
        );
        assert!(!verdict.contains("partition 1"), "{verdict}");
        // It moves: ready again.
        let moved = observations(&[(0, 120, Some(41)), (1, 50, Some(50))]);
        let still = tracker.observe(start + Duration::from_secs(62), &moved);
        assert_eq!(
            judge("t", Some(&owned), &moved, &still, stall_after),
            Ok(())
        );
    }

    #[test]
    fn holding_no_partition_while_records_wait_is_not_ready() {
        let stall_after = Duration::from_secs(60);
        let start = Instant::now();
        let mut tracker = StallTracker::default();
        let waiting = observations(&[(0, 100, None), (1, 0, None)]);
        tracker.observe(start, &waiting);
        let still = tracker.observe(start + Duration::from_secs(61), &waiting);
        for owned in [None, Some(BTreeSet::new())] {
            let verdict = judge("t", owned.as_ref(), &waiting, &still, stall_after).unwrap_err();
            assert!(
                verdict.contains("holds no partition of t while 100 records wait"),
                "{verdict}"
            );
        }
        // Another member's partition that progresses is no reason.
        let progressing = observations(&[(0, 100, Some(90)), (1, 0, None)]);
        let still = tracker.observe(start + Duration::from_secs(62), &progressing);
        assert_eq!(judge("t", None, &progressing, &still, stall_after), Ok(()));
        // Owning a partition that progresses: ready even if another one stands still.
        let owned: BTreeSet<i32> = [1].into();
        assert_eq!(
            judge("t", Some(&owned), &waiting, &still, stall_after),
            Ok(())
        );
    }

    #[test]
    fn log_lines_repeat_only_when_the_kind_of_reason_changes() {
        assert_eq!(
            kind_of("t: partition 0: 80 records wait"),
            kind_of("t: partition 0: 95 records wait")
        );
        assert_ne!(kind_of("cannot read t"), kind_of("t: partition 0"));
    }
}
