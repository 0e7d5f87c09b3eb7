//! Membership of a consumer group (group mode, ADR 0003), in one place for every consuming
//! stage: what librdkafka holds ([`group_membership`]), the [`GroupWatchdog`] that spots the
//! stuck states tansu 0.6.0's group coordinator leaves behind, the leave-and-re-join that
//! repairs them ([`GroupMembership::tick`]), and the LeaveGroup at shutdown ([`GroupLeave`]).
//!
//! The stages drive it the same way whatever their consumer: after handling a rebalance they
//! call [`GroupMembership::on_assigned`] / [`GroupMembership::on_revoked`]; in their loop,
//! between batches, [`GroupMembership::tick`]; at shutdown they step a [`GroupLeave`] and serve
//! the consumer's events between steps (`poll` on the aggregator's blocking thread, `recv` in
//! the enricher's task). Everything that talks to the broker blocks (bounded by timeouts), so
//! async callers wrap it in `block_in_place`. With `ownership.group_watchdog = false` (a real
//! Kafka cluster) the watchdog is off and only the leave at shutdown remains.

use std::collections::HashMap;
use std::ffi::CStr;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// A stage's membership of its consumer group: the watchdog (when on) and a leave-and-re-join
/// in progress.
pub struct GroupMembership {
    topic: String,
    watchdog: Option<GroupWatchdog>,
    /// Set while the consumer has left the group to re-join it.
    rejoining_since: Option<Instant>,
}

impl GroupMembership {
    /// How long a re-join waits for the LeaveGroup to go out before it subscribes anyway.
    pub const REJOIN_WAIT: Duration = Duration::from_secs(5);

    /// Membership of `group_id` for `topic`; `watchdog` switches the repair of tansu's stuck
    /// states on (`ownership.group_watchdog`).
    pub fn new(group_id: &str, topic: &str, watchdog: bool) -> GroupMembership {
        GroupMembership {
            topic: topic.to_string(),
            watchdog: watchdog.then(|| GroupWatchdog::new(group_id, topic)),
            rejoining_since: None,
        }
    }

    /// To be called when an assignment was handled.
    pub fn on_assigned<C: ConsumerContext, K: Consumer<C>>(&mut self, consumer: &K) {
        if let Some(watchdog) = self.watchdog.as_mut() {
            watchdog.on_assigned(group_membership(consumer).map(|(generation, _)| generation));
        }
    }

    /// To be called when a revocation was handled.
    pub fn on_revoked(&mut self) {
        if let Some(watchdog) = self.watchdog.as_mut() {
            watchdog.on_revoked();
        }
    }

    /// Between batches: leaves the group when the watchdog says it is stuck (the revocation
    /// follows through the consumer's events; the new owners resume from their progress, as
    /// after any rebalance), and subscribes again once the LeaveGroup is out. Blocks for broker
    /// round trips when a watchdog check is due.
    pub fn tick<C: ConsumerContext, K: Consumer<C>>(&mut self, consumer: &K) -> KafkaResult<()> {
        if let Some(since) = self.rejoining_since {
            // librdkafka clears the member id once the LeaveGroup is out.
            if has_left(consumer) || since.elapsed() > Self::REJOIN_WAIT {
                consumer.subscribe(&[&self.topic])?;
                tracing::info!(topic = %self.topic, "re-joined the consumer group");
                self.rejoining_since = None;
            }
            return Ok(());
        }
        let Some(watchdog) = self.watchdog.as_mut() else {
            return Ok(());
        };
        if let Some(reason) = watchdog.rejoin_reason(consumer) {
            tracing::warn!(%reason, "leaving the consumer group to re-join it");
            consumer.unsubscribe();
            watchdog.rejoined();
            self.rejoining_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Whether a leave-and-re-join is in progress (the consumer is not subscribed).
    pub fn is_rejoining(&self) -> bool {
        self.rejoining_since.is_some()
    }

    /// The LeaveGroup at shutdown. librdkafka sends none for a static member when the consumer
    /// closes, and the group would wait for the session timeout (on tansu 0.6.0 an expired
    /// member can even strand its partitions): ADR 0001, "Consumer groups on tansu".
    pub fn leave(&self) -> GroupLeave {
        let now = Instant::now();
        GroupLeave {
            phase: if self.is_rejoining() {
                // Already unsubscribed: only the LeaveGroup may still be going out.
                LeavePhase::Leaving(now + GroupLeave::LEAVE_WAIT)
            } else {
                LeavePhase::Joining(now + GroupLeave::JOIN_WAIT)
            },
        }
    }
}

/// Leaving the group at shutdown, step by step, so that each stage serves its consumer's
/// events between steps its own way: a join still in flight is let finish first (else there is
/// no member id to leave with), then the consumer unsubscribes, then the revocation is served
/// until librdkafka has sent LeaveGroup (it clears the member id then). Each wait is bounded.
/// Records received meanwhile are dropped unprocessed (their offsets are not stored): the next
/// owner reads them.
pub struct GroupLeave {
    phase: LeavePhase,
}

enum LeavePhase {
    Joining(Instant),
    Leaving(Instant),
    Done,
}

impl GroupLeave {
    /// How long a join in flight may take to finish before the consumer unsubscribes anyway.
    pub const JOIN_WAIT: Duration = Duration::from_secs(10);
    /// How long the LeaveGroup may take to go out.
    pub const LEAVE_WAIT: Duration = Duration::from_secs(5);

    /// Advances the leave; `true` while the caller must serve the consumer's events (about
    /// 50 ms of `poll` or `recv`) and call again.
    pub fn step<C: ConsumerContext, K: Consumer<C>>(&mut self, consumer: &K) -> bool {
        loop {
            match self.phase {
                LeavePhase::Joining(deadline) => {
                    if has_left(consumer) && Instant::now() < deadline {
                        return true;
                    }
                    consumer.unsubscribe();
                    self.phase = LeavePhase::Leaving(Instant::now() + Self::LEAVE_WAIT);
                }
                LeavePhase::Leaving(deadline) => {
                    if !has_left(consumer) && Instant::now() < deadline {
                        return true;
                    }
                    self.phase = LeavePhase::Done;
                }
                LeavePhase::Done => return false,
            }
        }
    }
}

/// Whether `consumer` holds no member id (not joined yet, or left).
fn has_left<C: ConsumerContext, K: Consumer<C>>(consumer: &K) -> bool {
    group_membership(consumer).is_none_or(|(_, member)| member.is_empty())
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

    /// To be called when an assignment was handled (after the rebalance callback), with the
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

    /// To be called when a revocation was handled (after the rebalance callback).
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

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;

    use super::*;

    fn unconnected_consumer() -> rdkafka::consumer::BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .create()
            .unwrap()
    }

    #[test]
    fn watchdog_rejoins_when_a_revocation_keeps_the_generation() {
        // Not connected: the generation rule needs no broker, and the offset check is not due.
        let consumer = unconnected_consumer();
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
    fn a_stuck_group_is_left_and_joined_again_once_the_leave_is_out() {
        let consumer = unconnected_consumer();
        let mut membership = GroupMembership::new("g", "t", true);
        membership.tick(&consumer).unwrap();
        assert!(!membership.is_rejoining());
        // tansu's stale assignment: same generation after a revocation.
        membership.watchdog.as_mut().unwrap().on_assigned(Some(4));
        membership.on_revoked();
        membership.watchdog.as_mut().unwrap().on_assigned(Some(4));
        membership.tick(&consumer).unwrap();
        assert!(membership.is_rejoining());
        // Never joined, so no member id: the re-join subscribes at the next tick.
        membership.tick(&consumer).unwrap();
        assert!(!membership.is_rejoining());
    }

    #[test]
    fn without_the_watchdog_the_membership_never_leaves_on_its_own() {
        let consumer = unconnected_consumer();
        let mut membership = GroupMembership::new("g", "t", false);
        membership.on_revoked();
        membership.on_assigned(&consumer);
        membership.tick(&consumer).unwrap();
        assert!(!membership.is_rejoining());
    }

    #[test]
    fn a_leave_waits_at_most_the_join_wait_for_a_member_id() {
        let consumer = unconnected_consumer();
        let membership = GroupMembership::new("g", "t", true);
        let started = Instant::now();
        let mut leave = membership.leave();
        // Not in the group (never joined): the join wait lasts until its deadline, then the
        // consumer unsubscribes and, with no member id, there is nothing to wait for.
        let mut steps = 0;
        while leave.step(&consumer) {
            steps += 1;
            std::thread::sleep(Duration::from_millis(50));
            if steps > 1000 {
                panic!("the leave never finished");
            }
        }
        assert!(started.elapsed() >= GroupLeave::JOIN_WAIT);
        assert!(!leave.step(&consumer));
    }
}
