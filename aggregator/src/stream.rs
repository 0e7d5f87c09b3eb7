//! The aggregator's stream: a Kafka consumer on a blocking thread that feeds
//! [`PartitionAggregator`]s and flushes them to ClickHouse.
//!
//! * The consumer, the partition states and the ClickHouse writes all live on one thread. The
//!   rebalance callback (which librdkafka runs inside `poll`) only turns a rebalance into a
//!   [`Rebalance`] message; the poll loop handles it right after `poll` returns, before the
//!   next record (Quickwit's kafka source does the same): on **assignment** it reads each
//!   partition's plan from ClickHouse and assigns the partition at the plan's `dedupe_from`
//!   offset — never at Kafka's committed offset; on **revocation** it flushes what it can,
//!   forgets the partition (the next owner replays from the plan) and unassigns. librdkafka
//!   waits for that `assign` / `unassign` call before it goes on with the group protocol, so
//!   the callback holds no lock and does no I/O.
//! * Offsets are stored (for lag dashboards only) after a flush made them durable.
//! * Ownership (ADR 0003): in the default static mode the process assigns itself the partitions
//!   of its replica ordinal and never asks a group coordinator; in group mode a consumer group
//!   assigns them, with static membership (`group_instance_id`), a [`GroupMembership`] that leaves
//!   and re-joins the group when tansu left it stuck, and a LeaveGroup on shutdown — see ADR
//!   0001, "Consumer groups on tansu". Either way a partition starts where ClickHouse progress
//!   says, so two owners at once write the same rows.
//! * A record that cannot be decoded, or whose values are out of range, is counted, sent to the
//!   dead-letter topic, and skipped; the skip is deterministic, so replays skip it too.
//! * **Input resets.** A partition whose Kafka high watermark is below the progress stored in
//!   ClickHouse was reset (the topic deleted and re-created, a restored backup, another
//!   cluster): reading on would skip every new record as already counted. The partition is
//!   paused, `/readyz` and `agentmeter_aggregator_input_reset` say so, until an operator starts
//!   a new [`InputEpoch`] with `agentmeter reset-input`; the aggregator then resumes on its own.
//!   Offsets inside the aggregator are logical (the epoch's mapping of Kafka offsets).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_runtime::group::GroupMembership;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_runtime::partitions::{OwnedPartitions, OwnershipMode, StaticAssigner};
use agentmeter_runtime::shutdown::Shutdown;
use agentmeter_schemas::decode_enriched_action;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::AggregatorConfig;
use crate::dead_letters::DeadLetterSink;
use crate::restart_store::RestartStore;
use crate::service::{ClickHouseError, ClickHouseService, ClickHouseWriter, GaveUp};
use crate::state::{BatchPlan, BatchSettings, InputEpoch, PartitionAggregator, RecordOutcome};
use crate::telemetry::{
    emit, BatchWritten, ConsumerLag, FlushFinished, InputResetState, RecordHandled,
};

/// Partitions whose input was reset, with the message for `/readyz`; shared with the readiness
/// check.
pub type InputResets = Arc<Mutex<BTreeMap<i32, String>>>;

/// How an assigned partition is to be read.
enum PartitionStart {
    /// From this Kafka offset.
    ReadFrom(Offset),
    /// Not at all: its input was reset (the message says how).
    Paused,
    /// Not at all: shutdown, or ClickHouse failed permanently.
    Abandoned,
}

/// A rebalance of the consumer group, as a message from the rebalance callback to the poll
/// loop.
enum Rebalance {
    /// These partitions are ours now; they must be assigned (with their start offsets).
    Assigned(TopicPartitionList),
    /// These partitions are no longer ours; they must be flushed, forgotten and unassigned.
    Revoked(TopicPartitionList),
}

/// What the poll loop owns: the partition states and what they write to — the ClickHouse
/// writer (with its retry rule and health) and the dead-letter sink.
struct Worker {
    config: AggregatorConfig,
    settings: BatchSettings,
    topic: String,
    clickhouse: ClickHouseWriter,
    dead_letters: DeadLetterSink,
    partitions: HashMap<i32, PartitionAggregator>,
    shutdown: Shutdown,
    /// Set when ClickHouse rejected a write permanently; the stage stops with it.
    fatal: Option<String>,
    last_flush: Instant,
    /// Group mode: the membership (with the watchdog for the local broker's stuck states).
    membership: Option<GroupMembership>,
    /// What this process owns now, for the progress watch.
    owned: OwnedPartitions,
    /// Offset hint last returned per partition (see `flush`).
    hints: HashMap<i32, i64>,
    /// Offset after the last record read per partition, poison included.
    read_up_to: HashMap<i32, i64>,
    /// The input epoch of every partition being read (logical ↔ Kafka offsets).
    epochs: HashMap<i32, InputEpoch>,
    /// Partitions paused because their input was reset.
    input_resets: InputResets,
    /// Set when a record arrived below a partition's read position: check the inputs now.
    check_inputs_now: bool,
    /// The duplicate check's ids on local disk (`aggregator.state_dir`), if any.
    restart_store: Option<RestartStore>,
    /// Per partition, the `dedupe_from` of the last plan ClickHouse acknowledged: the restart
    /// store may forget the ids below it.
    store_forget_below: HashMap<i32, i64>,
}

impl Worker {
    /// Runs a ClickHouse call with the writer's retry rule; a permanent failure stops the
    /// stage (`fatal`).
    fn with_retries<T>(
        &mut self,
        what: &str,
        call: impl FnMut(&ClickHouseService, &tokio::runtime::Runtime) -> Result<T, ClickHouseError>,
    ) -> Option<T> {
        match self.clickhouse.call(what, call) {
            Ok(value) => Some(value),
            Err(GaveUp::Permanent(message)) => {
                self.fatal = Some(message);
                None
            }
            Err(GaveUp::Shutdown) => None,
        }
    }

    /// Reads where a newly assigned (or recovered) partition resumes, from ClickHouse: its
    /// input epoch and its latest batch plan. `high_watermark` (Kafka's, if known) below the
    /// progress already stored means the input was reset: the partition is not read.
    fn open_partition(&mut self, partition: i32, high_watermark: Option<i64>) -> PartitionStart {
        let loaded = self.with_retries("reading aggregator progress", |service, runtime| {
            runtime.block_on(async {
                let epoch = service.load_epoch(partition).await?;
                let resume = service.load_resume(partition).await?;
                Ok((epoch, resume))
            })
        });
        let Some((epoch, resume)) = loaded else {
            return PartitionStart::Abandoned;
        };
        if let (Some((_, reached)), Some(high)) = (resume, high_watermark) {
            let reached_physical = epoch.physical(reached);
            if high < reached_physical {
                self.mark_input_reset(partition, high, reached_physical);
                return PartitionStart::Paused;
            }
        }
        let plan = resume.map(|(plan, _)| plan);
        let aggregator = PartitionAggregator::new(partition, self.settings, plan);
        let aggregator = self.attach_restart_store(partition, epoch, plan, aggregator);
        let offset = aggregator
            .start_offset()
            .map(|logical| Offset::Offset(epoch.physical(logical)))
            .unwrap_or(if epoch == InputEpoch::default() {
                Offset::Beginning
            } else {
                Offset::Offset(epoch.physical_start)
            });
        tracing::info!(
            partition,
            ?plan,
            ?epoch,
            ?offset,
            ids_from_restart_store = aggregator.has_prior_ids(),
            "partition assigned; resuming from ClickHouse progress"
        );
        self.partitions.insert(partition, aggregator);
        self.epochs.insert(partition, epoch);
        self.clear_input_reset(partition);
        PartitionStart::ReadFrom(offset)
    }

    /// With a restart store: resumes `aggregator` with the stored ids when they cover its plan
    /// (reading then starts at the resume point, not at `dedupe_from`), else starts the
    /// partition's coverage afresh where reading starts; journals what it observes either way.
    fn attach_restart_store(
        &mut self,
        partition: i32,
        epoch: InputEpoch,
        plan: Option<BatchPlan>,
        aggregator: PartitionAggregator,
    ) -> PartitionAggregator {
        let Some(store) = self.restart_store.clone() else {
            return aggregator;
        };
        let resume_point = store.coverage(partition).map(|coverage| {
            plan.zip(coverage)
                .and_then(|(plan, coverage)| coverage.resume_point(epoch, &plan))
        });
        let attached = match resume_point {
            Ok(Some(until)) => Ok(aggregator
                .with_journal()
                .with_prior_ids(store.prior_ids(partition, until))),
            Ok(None) => {
                let reading_from = plan.map_or(epoch.logical_start, |plan| plan.dedupe_from);
                store
                    .reset(partition, epoch, reading_from)
                    .map(|()| aggregator.with_journal())
            }
            Err(error) => Err(error),
        };
        match attached {
            Ok(aggregator) => aggregator,
            Err(error) => {
                self.restart_store_failed(error.to_string());
                // Reading from the plan's dedupe_from is right without a store.
                PartitionAggregator::new(partition, self.settings, plan)
            }
        }
    }

    /// The restart store failed: its file is removed (the next start re-reads the horizon,
    /// which is always right) and the stage stops, since a partition resumed from the store
    /// cannot decide its duplicates without it.
    fn restart_store_failed(&mut self, error: String) {
        tracing::error!(%error, "the restart store failed; removing it");
        if let Some(store) = self.restart_store.take() {
            store.remove_file();
        }
        if self
            .partitions
            .values()
            .any(PartitionAggregator::has_prior_ids)
        {
            self.fatal.get_or_insert(format!(
                "restart store failed ({error}); it is removed and the next start re-reads the duplicate horizon"
            ));
        }
    }

    /// Opens every partition of `partitions` (an assignment) and sets its start offset in the
    /// list; returns the ones to pause because their input was reset. A partition abandoned
    /// (shutdown, permanent error) keeps no offset; the loop stops anyway.
    fn start_partitions<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &mut TopicPartitionList,
    ) -> TopicPartitionList {
        let assigned: Vec<i32> = partitions
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        let topic = self.topic.clone();
        let mut paused = TopicPartitionList::new();
        for partition in &assigned {
            let high = consumer
                .fetch_watermarks(&topic, *partition, Duration::from_secs(5))
                .ok()
                .map(|(_, high)| high);
            let offset = match self.open_partition(*partition, high) {
                PartitionStart::ReadFrom(offset) => offset,
                PartitionStart::Paused => {
                    paused.add_partition(&topic, *partition);
                    Offset::End
                }
                PartitionStart::Abandoned => continue,
            };
            if let Err(error) = partitions.set_partition_offset(&topic, *partition, offset) {
                tracing::error!(%error, partition, "cannot set the start offset");
            }
        }
        self.owned.add(assigned);
        paused
    }

    fn mark_input_reset(&mut self, partition: i32, high_watermark: i64, reached: i64) {
        let message = format!(
            "partition {partition} of {topic}: Kafka's high watermark {high_watermark} is below offset {reached}, \
             which the progress in ClickHouse says was already aggregated. The topic was deleted and re-created, \
             restored from an older backup, or this is another Kafka cluster; reading on would skip every new \
             record as already counted, so nothing more is read from this partition. When you know which: \
             `agentmeter reset-input --partition {partition} --from earliest` if every record now in the topic \
             is new, `--from latest` if they were already counted (docs/operations.md, \"Input reset\")",
            topic = self.topic
        );
        self.mark_paused(partition, message);
    }

    /// Records why a partition is not read (logged once, shown by `/readyz` until cleared).
    fn mark_paused(&mut self, partition: i32, message: String) {
        emit(InputResetState {
            partition,
            paused: true,
        });
        let previous = self
            .input_resets
            .lock()
            .expect("input resets lock")
            .insert(partition, message.clone());
        if previous.as_ref() != Some(&message) {
            tracing::error!(partition, "{message}");
        }
    }

    fn clear_input_reset(&mut self, partition: i32) {
        let removed = self
            .input_resets
            .lock()
            .expect("input resets lock")
            .remove(&partition);
        if removed.is_some() {
            tracing::info!(
                partition,
                "input reset resolved; reading the partition again"
            );
        }
        emit(InputResetState {
            partition,
            paused: false,
        });
    }

    fn handle_message(&mut self, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let Some(aggregator) = self.partitions.get_mut(&partition) else {
            // Not (or no longer) ours: a message fetched before a revocation.
            return;
        };
        let epoch = self.epochs.get(&partition).copied().unwrap_or_default();
        let Some(offset) = epoch.logical(message.offset()) else {
            // Before the current input epoch: already counted in the one before.
            return;
        };
        self.read_up_to.insert(partition, offset + 1);
        let timestamp_ms = message.timestamp().to_millis().unwrap_or(0);
        let payload = message.payload().unwrap_or_default();
        match decode_enriched_action(payload) {
            Ok(action) => {
                let outcome = aggregator.handle(offset, timestamp_ms, action);
                if let RecordOutcome::PriorIdsFailed(error) = &outcome {
                    // Nothing more can be decided for this partition: its state is dropped
                    // unflushed (ClickHouse keeps the last complete flush) and the stage stops.
                    let error = error.clone();
                    emit(RecordHandled {
                        outcome: "restart_store_failed",
                    });
                    self.partitions.remove(&partition);
                    self.fatal.get_or_insert(format!(
                        "partition {partition}: the restart store failed ({error})"
                    ));
                    self.restart_store_failed(error);
                    return;
                }
                if outcome == RecordOutcome::AlreadyHandled {
                    // Kafka went back below what was read (e.g. an offset reset after the
                    // topic was re-created): find out at once whether the input was reset.
                    self.check_inputs_now = true;
                }
                let label = match &outcome {
                    RecordOutcome::Counted => "counted",
                    RecordOutcome::Duplicate => "duplicate",
                    RecordOutcome::Rebuilt => "rebuilt",
                    RecordOutcome::AlreadyHandled => "already_handled",
                    RecordOutcome::Refused(_) => "refused",
                    RecordOutcome::PriorIdsFailed(_) => "restart_store_failed",
                };
                emit(RecordHandled { outcome: label });
                if let RecordOutcome::Refused(error) = outcome {
                    let code = if error.is_text() {
                        "invalid_text"
                    } else {
                        "value_out_of_range"
                    };
                    self.dead_letter(
                        message,
                        code,
                        &format!("refused by the aggregator: {error}"),
                    );
                }
            }
            Err(error) => {
                let reason = format!("undecodable enriched action: {error}");
                self.dead_letter(message, "undecodable", &reason);
            }
        }
    }

    /// Counts a poison record and queues it on the dead-letter topic with its reason.
    fn dead_letter(&self, message: &BorrowedMessage<'_>, code: &'static str, reason: &str) {
        self.dead_letters.send(message, code, reason);
    }

    fn pending_actions(&self) -> usize {
        self.partitions
            .values()
            .map(PartitionAggregator::pending_rows)
            .sum()
    }

    fn flush_due(&self) -> bool {
        self.last_flush.elapsed() >= Duration::from_millis(self.config.flush_interval_ms)
            || self.pending_actions() >= self.config.max_pending_actions
    }

    /// Flushes the given partitions (all when `None`); returns (partition, Kafka offset reached)
    /// of each partition fully flushed.
    fn flush(&mut self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let started = Instant::now();
        let mut flushed = Vec::new();
        let mut partitions: Vec<i32> = self.partitions.keys().copied().collect();
        partitions.sort_unstable();
        for partition in partitions {
            if only.is_some_and(|only| !only.contains(&partition)) {
                continue;
            }
            let Some(aggregator) = self.partitions.get_mut(&partition) else {
                continue;
            };
            if !aggregator.has_unflushed() {
                continue;
            }
            let writes = aggregator.take_flush();
            let offset_reached = aggregator.next_offset();
            let journal = aggregator.take_journal();
            let acknowledged_plan = aggregator.plan();
            // The store before ClickHouse: a restart then never finds the store behind the
            // progress it resumes from (one ahead is harmless).
            if let Some(store) = &self.restart_store {
                let forget_below = self.store_forget_below.get(&partition).copied();
                if let Err(error) = store.append(partition, &journal, offset_reached, forget_below)
                {
                    self.restart_store_failed(error.to_string());
                }
            }
            let mut all_written = true;
            for write in &writes {
                let rows = write.actions.len();
                let done = self.with_retries("ClickHouse write", |service, runtime| {
                    runtime.block_on(service.write(partition, write))
                });
                if done.is_none() {
                    all_written = false;
                    break;
                }
                emit(BatchWritten {
                    actions: rows,
                    usage_rows: write.usage.len(),
                });
            }
            if all_written {
                flushed.push((partition, offset_reached));
                if let Some(plan) = acknowledged_plan {
                    self.store_forget_below.insert(partition, plan.dedupe_from);
                }
            } else {
                // The in-memory state is ahead of ClickHouse now; it must not write again.
                // Dropping it makes the partition unusable until reassigned, which replays.
                self.partitions.remove(&partition);
                if self.fatal.is_none() && !self.shutdown.is_requested() {
                    self.fatal = Some(format!("partition {partition}: flush abandoned"));
                }
            }
        }
        // Partitions with nothing to write (their last records were duplicates, replays or
        // skipped poison) are done up to the last record read as well: hint that too, so that
        // the group's committed offset moves whenever the partition does (the GroupWatchdog of
        // every member reads a committed offset that stands still under waiting records as an
        // orphaned partition).
        for (partition, aggregator) in &self.partitions {
            if only.is_some_and(|only| !only.contains(partition))
                || aggregator.has_unflushed()
                || flushed.iter().any(|(flushed, _)| flushed == partition)
            {
                continue;
            }
            let read = self.read_up_to.get(partition).copied().unwrap_or(0);
            let offset = aggregator.next_offset().max(read);
            if offset > 0 && self.hints.get(partition) != Some(&offset) {
                flushed.push((*partition, offset));
            }
        }
        for (partition, offset) in &flushed {
            self.hints.insert(*partition, *offset);
        }
        // Kafka is told Kafka offsets.
        let flushed = flushed
            .into_iter()
            .map(|(partition, logical)| {
                let epoch = self.epochs.get(&partition).copied().unwrap_or_default();
                (partition, epoch.physical(logical))
            })
            .collect();
        self.last_flush = Instant::now();
        let remembered_ids: usize = self
            .partitions
            .values()
            .map(PartitionAggregator::remembered_ids)
            .sum();
        emit(FlushFinished {
            elapsed: started.elapsed(),
            remembered_ids,
        });
        flushed
    }
}

impl Worker {
    /// Handles the rebalances the callback queued during the last `poll`, in order.
    fn handle_rebalances(&mut self, consumer: &BaseConsumer<AggregatorContext>) {
        while let Some(rebalance) = consumer.context().next_rebalance() {
            match rebalance {
                Rebalance::Assigned(mut partitions) => {
                    let paused = self.start_partitions(consumer, &mut partitions);
                    if let Err(error) = consumer.assign(&partitions) {
                        tracing::error!(%error, "assignment failed");
                        self.fatal = Some(format!("assignment failed: {error}"));
                    }
                    pause(consumer, &paused);
                    if let Some(membership) = self.membership.as_mut() {
                        membership.on_assigned(consumer);
                    }
                }
                Rebalance::Revoked(partitions) => {
                    let revoked: Vec<i32> = partitions
                        .elements()
                        .iter()
                        .map(|element| element.partition())
                        .collect();
                    tracing::info!(?revoked, "partitions revoked; flushing them");
                    self.flush(Some(&revoked));
                    for partition in revoked {
                        self.forget_partition(partition);
                        // The next owner finds out about a reset input on its own.
                        self.clear_input_reset(partition);
                    }
                    if let Err(error) = consumer.unassign() {
                        tracing::warn!(%error, "unassign failed");
                    }
                    self.owned.set([]);
                    if let Some(membership) = self.membership.as_mut() {
                        membership.on_revoked();
                    }
                }
            }
        }
    }

    /// Drops what this process knew of a partition it no longer reads.
    fn forget_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.hints.remove(&partition);
        self.read_up_to.remove(&partition);
        self.epochs.remove(&partition);
        self.store_forget_below.remove(&partition);
    }
}

/// The consumer context: a rebalance becomes a [`Rebalance`] message for the poll loop.
#[derive(Default)]
struct AggregatorContext {
    /// Filled by the callback inside `poll`, drained by the loop right after it; the lock is
    /// held for one push or pop.
    rebalances: Mutex<VecDeque<Rebalance>>,
}

impl AggregatorContext {
    fn next_rebalance(&self) -> Option<Rebalance> {
        self.rebalances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop_front()
    }
}

impl ClientContext for AggregatorContext {}

impl ConsumerContext for AggregatorContext {
    fn rebalance(
        &self,
        _consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let rebalance = match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                Rebalance::Assigned(partitions.clone())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                Rebalance::Revoked(partitions.clone())
            }
            other => {
                tracing::error!(?other, "rebalance error");
                return;
            }
        };
        self.rebalances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push_back(rebalance);
    }
}

/// Runs the consumer loop on the current (blocking) thread until shutdown or a fatal error.
pub fn run_blocking(
    config: AggregatorConfig,
    kafka: KafkaSettings,
    service: ClickHouseService,
    shutdown: Shutdown,
    clickhouse_healthy: Arc<AtomicBool>,
    input_resets: InputResets,
    owned: OwnedPartitions,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let service_database = &service.database().to_string();
    let group_mode = config.ownership.mode == OwnershipMode::Group;
    let clickhouse = ClickHouseWriter::new(
        service,
        Duration::from_millis(config.retry_initial_backoff_ms),
        Duration::from_millis(config.retry_max_backoff_ms),
        clickhouse_healthy,
        shutdown.clone(),
    )
    .context("cannot start the ClickHouse runtime")?;
    let dead_letters = DeadLetterSink::new(&kafka)?;
    let restart_store = config.state_dir.as_ref().and_then(|dir| {
        RestartStore::open(dir, service_database, &topics.enriched)
            .inspect(|store| {
                tracing::info!(path = %store.path().display(), "restart store open");
            })
            .inspect_err(|error| {
                tracing::warn!(%error, "no restart store: a restart re-reads the duplicate horizon");
            })
            .ok()
    });
    let mut worker = Worker {
        settings: BatchSettings {
            batch_size: config.batch_offsets,
            window_seconds: config.window_seconds,
            dedupe_horizon_ms: config.dedupe_horizon_seconds * 1000,
        },
        config: config.clone(),
        topic: topics.enriched.clone(),
        clickhouse,
        dead_letters,
        partitions: HashMap::new(),
        shutdown: shutdown.clone(),
        fatal: None,
        last_flush: Instant::now(),
        membership: group_mode.then(|| {
            GroupMembership::new(
                &config.group_id,
                &topics.enriched,
                config.ownership.group_watchdog,
            )
        }),
        owned,
        hints: HashMap::new(),
        read_up_to: HashMap::new(),
        epochs: HashMap::new(),
        input_resets,
        check_inputs_now: false,
        restart_store,
        store_forget_below: HashMap::new(),
    };
    let mut client_config =
        kafka.group_consumer_config(&config.group_id, &config.group_instance_id);
    // Eager assignment: the loop assigns every partition with an explicit start offset.
    client_config.set("partition.assignment.strategy", "range");
    let consumer: BaseConsumer<AggregatorContext> = client_config
        .create_with_context(AggregatorContext::default())
        .context("cannot create the Kafka consumer")?;
    let static_ownership = if group_mode {
        consumer
            .subscribe(&[&topics.enriched])
            .with_context(|| format!("cannot subscribe to {}", topics.enriched))?;
        tracing::info!(
            topic = %topics.enriched,
            group = %config.group_id,
            group_instance_id = %config.group_instance_id,
            "aggregator consuming (partitions assigned by the consumer group)"
        );
        None
    } else {
        let ownership = config.ownership.static_ownership("aggregator.ownership")?;
        tracing::info!(
            topic = %topics.enriched,
            replica = ownership.replica,
            replicas = ownership.replicas,
            "aggregator consuming (static ownership: the partitions p with p mod replicas = replica)"
        );
        Some(ownership)
    };
    let owned = worker.owned.clone();
    let mut static_assigner = static_ownership
        .map(|ownership| StaticAssigner::new(ownership, &topics.enriched, "aggregator.ownership"));

    let mut last_lag_report = Instant::now();
    let result = loop {
        if let Some(fatal) = worker.fatal.clone() {
            break Err(anyhow::anyhow!(fatal));
        }
        if shutdown.is_requested() {
            break Ok(());
        }
        if let Some(assigner) = static_assigner.as_mut() {
            let new = assigner.take_up(&consumer, &owned);
            if !new.is_empty() {
                let mut list = TopicPartitionList::new();
                for partition in &new {
                    list.add_partition(&topics.enriched, *partition);
                }
                let paused = worker.start_partitions(&consumer, &mut list);
                consumer
                    .incremental_assign(&list)
                    .context("cannot assign the owned partitions")?;
                pause(&consumer, &paused);
            }
        }
        let polled = consumer.poll(Duration::from_millis(50));
        // Before the polled record: it was fetched under the assignment the rebalance ends.
        worker.handle_rebalances(&consumer);
        match polled {
            Some(Ok(message)) => worker.handle_message(&message),
            // E.g. another live process uses this group_instance_id (Kafka fences it).
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                break Err(anyhow::anyhow!(
                    "fatal Kafka consumer error: {code} (is group_instance_id {:?} used by another process?)",
                    config.group_instance_id
                ));
            }
            Some(Err(error)) => tracing::warn!(%error, "consumer error"),
            None => {}
        }
        if let Some(membership) = worker.membership.as_mut() {
            membership
                .tick(&consumer)
                .with_context(|| format!("cannot subscribe to {}", topics.enriched))?;
        }
        let flushed = if worker.flush_due() {
            worker.flush(None)
        } else {
            Vec::new()
        };
        store_offset_hints(&consumer, &topics.enriched, &flushed);
        let check_now = std::mem::take(&mut worker.check_inputs_now);
        if check_now || last_lag_report.elapsed() >= INPUT_CHECK_INTERVAL {
            check_inputs(&consumer, &topics.enriched, &mut worker);
            last_lag_report = Instant::now();
        }
    };
    // Final flush, then leave the group (the revocation flushes nothing more).
    let flushed = worker.flush(None);
    store_offset_hints(&consumer, &topics.enriched, &flushed);
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    // Leave the group explicitly (`GroupMembership::leave`). Polling serves the rebalance
    // callbacks, whose messages are handled as in the loop (librdkafka waits for the assign /
    // unassign); records polled here are dropped unhandled, the next owner reads them.
    if let Some(mut leave) = worker.membership.as_ref().map(GroupMembership::leave) {
        while leave.step(&consumer) {
            let _ = consumer.poll(Duration::from_millis(50));
            worker.handle_rebalances(&consumer);
        }
    }
    worker.dead_letters.flush(Duration::from_secs(5));
    result
}

fn store_offset_hints<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    flushed: &[(i32, i64)],
) {
    for (partition, offset) in flushed {
        let stored: KafkaResult<()> = consumer.store_offset(topic, *partition, *offset - 1);
        if let Err(error) = stored {
            tracing::debug!(%error, partition, "offset hint not stored");
        }
    }
}

/// How often the inputs are checked: consumer lag, reset inputs, recovered ones.
const INPUT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Reports each partition's consumer lag, pauses a partition whose input was reset under it
/// (its high watermark fell below what was read), and resumes a paused one once an operator
/// started a new input epoch for it.
fn check_inputs<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, worker: &mut Worker) {
    let (positions, paused): (Vec<(i32, i64)>, Vec<i32>) = {
        let positions = worker
            .partitions
            .values()
            .map(|aggregator| {
                let epoch = worker
                    .epochs
                    .get(&aggregator.partition)
                    .copied()
                    .unwrap_or_default();
                let read = worker
                    .read_up_to
                    .get(&aggregator.partition)
                    .copied()
                    .unwrap_or(0)
                    .max(aggregator.next_offset());
                (aggregator.partition, epoch.physical(read))
            })
            .collect();
        let paused = worker
            .input_resets
            .lock()
            .expect("input resets lock")
            .keys()
            .copied()
            .collect();
        (positions, paused)
    };
    for (partition, next_physical) in positions {
        let high = match consumer.fetch_watermarks(topic, partition, Duration::from_secs(2)) {
            Ok((_, high)) => high,
            Err(error) => {
                tracing::debug!(%error, partition, "cannot read the high watermark");
                continue;
            }
        };
        tracing::trace!(partition, high, next_physical, "input position");
        emit(ConsumerLag {
            partition,
            lag: high - next_physical,
        });
        if high < next_physical {
            // What was read before the reset is real: make it durable, then stop reading.
            worker.flush(Some(&[partition]));
            worker.forget_partition(partition);
            worker.mark_input_reset(partition, high, next_physical);
            pause_partition(consumer, topic, partition);
        }
    }
    for partition in paused {
        let high = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(1))
            .ok()
            .map(|(_, high)| high);
        let start = worker.open_partition(partition, high);
        if let PartitionStart::ReadFrom(offset) = start {
            if let Err(error) = consumer.seek(topic, partition, offset, Duration::from_secs(5)) {
                worker.partitions.remove(&partition);
                worker.epochs.remove(&partition);
                worker.mark_paused(
                    partition,
                    format!("partition {partition}: the new input epoch is recorded, but seeking to it failed ({error}); retrying"),
                );
                continue;
            }
            let mut resumed = TopicPartitionList::new();
            resumed.add_partition(topic, partition);
            if let Err(error) = consumer.resume(&resumed) {
                tracing::error!(%error, partition, "cannot resume the recovered partition");
            }
        }
    }
}

fn pause<C: ConsumerContext>(consumer: &BaseConsumer<C>, paused: &TopicPartitionList) {
    if paused.count() > 0 {
        if let Err(error) = consumer.pause(paused) {
            tracing::error!(%error, "cannot pause the partitions whose input was reset");
        }
    }
}

fn pause_partition<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) {
    let mut paused = TopicPartitionList::new();
    paused.add_partition(topic, partition);
    if let Err(error) = consumer.pause(&paused) {
        tracing::error!(%error, partition, "cannot pause the partition whose input was reset");
    }
}
