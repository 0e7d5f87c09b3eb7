//! The aggregator's stream: a Kafka consumer on a blocking thread that feeds
//! [`PartitionAggregator`]s and flushes them to ClickHouse.
//!
//! * The consumer, the partition states and the ClickHouse writes all live on one thread, so the
//!   rebalance callback (which librdkafka runs inside `poll`) can act synchronously: on
//!   **assignment** it reads each partition's plan from ClickHouse and assigns the partition at
//!   the plan's `dedupe_from` offset — never at Kafka's committed offset; on **revocation** it
//!   flushes what it can and forgets the partition (the next owner replays from the plan).
//! * Offsets are stored (for lag dashboards only) after a flush made them durable.
//! * Group membership: static (`group_instance_id`), a [`GroupWatchdog`] that leaves and re-joins
//!   the group when tansu left it stuck, and a LeaveGroup on shutdown — see ADR 0001,
//!   "Consumer groups on tansu".
//! * A record that cannot be decoded is counted, sent to the dead-letter topic, and skipped; the
//!   skip is deterministic, so replays skip it too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_runtime::kafka::{group_membership, GroupWatchdog, KafkaSettings};
use agentmeter_runtime::shutdown::Shutdown;
use agentmeter_schemas::decode_enriched_action;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::AggregatorConfig;
use crate::service::{Backoff, ClickHouseError, ClickHouseService};
use crate::state::{BatchSettings, PartitionAggregator, RecordOutcome};

/// What the poll thread and the rebalance callback share.
struct Worker {
    config: AggregatorConfig,
    settings: BatchSettings,
    topic: String,
    dead_letter_topic: String,
    service: ClickHouseService,
    runtime: tokio::runtime::Runtime,
    partitions: HashMap<i32, PartitionAggregator>,
    shutdown: Shutdown,
    /// Set when ClickHouse rejected a write permanently; the stage stops with it.
    fatal: Option<String>,
    clickhouse_healthy: Arc<AtomicBool>,
    dead_letters: ThreadedProducer<DefaultProducerContext>,
    last_flush: Instant,
    watchdog: GroupWatchdog,
    /// Offset hint last returned per partition (see `flush`).
    hints: HashMap<i32, i64>,
    /// Offset after the last record read per partition, poison included.
    read_up_to: HashMap<i32, i64>,
}

impl Worker {
    /// Runs a ClickHouse call until it succeeds, fails permanently, or shutdown is requested.
    fn with_retries<T>(
        &mut self,
        what: &str,
        mut call: impl FnMut(&ClickHouseService, &tokio::runtime::Runtime) -> Result<T, ClickHouseError>,
    ) -> Option<T> {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.retry_initial_backoff_ms),
            Duration::from_millis(self.config.retry_max_backoff_ms),
        );
        loop {
            match call(&self.service, &self.runtime) {
                Ok(value) => {
                    self.clickhouse_healthy.store(true, Ordering::Relaxed);
                    return Some(value);
                }
                Err(error @ ClickHouseError::Permanent(_)) => {
                    tracing::error!(%error, "{what} failed permanently; stopping");
                    self.fatal = Some(format!("{what}: {error}"));
                    return None;
                }
                Err(error) => {
                    self.clickhouse_healthy.store(false, Ordering::Relaxed);
                    metrics::counter!("agentmeter_aggregator_clickhouse_retries_total")
                        .increment(1);
                    if self.shutdown.is_requested() {
                        tracing::warn!(%error, "{what} abandoned at shutdown; the next start replays it");
                        return None;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, ?delay, "{what} failed; retrying");
                    std::thread::sleep(delay);
                }
            }
        }
    }

    fn handle_message(&mut self, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let Some(aggregator) = self.partitions.get_mut(&partition) else {
            // Not (or no longer) ours: a message fetched before a revocation.
            return;
        };
        self.read_up_to.insert(partition, message.offset() + 1);
        let timestamp_ms = message.timestamp().to_millis().unwrap_or(0);
        let payload = message.payload().unwrap_or_default();
        match decode_enriched_action(payload) {
            Ok(action) => {
                let outcome = aggregator.handle(message.offset(), timestamp_ms, action);
                let label = match outcome {
                    RecordOutcome::Counted => "counted",
                    RecordOutcome::Duplicate => "duplicate",
                    RecordOutcome::Rebuilt => "rebuilt",
                    RecordOutcome::AlreadyHandled => "already_handled",
                };
                metrics::counter!("agentmeter_aggregator_records_total", "outcome" => label)
                    .increment(1);
            }
            Err(error) => {
                metrics::counter!("agentmeter_aggregator_dead_letters_total", "reason" => "undecodable").increment(1);
                let reason = format!("undecodable enriched action: {error}");
                tracing::warn!(partition, offset = message.offset(), %reason, "poison record skipped");
                let source = format!("{}/{}/{}", message.topic(), partition, message.offset());
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "agentmeter.dlq.reason",
                        value: Some("undecodable"),
                    })
                    .insert(Header {
                        key: "agentmeter.dlq.message",
                        value: Some(&reason),
                    })
                    .insert(Header {
                        key: "agentmeter.dlq.source",
                        value: Some(&source),
                    });
                let record = BaseRecord::to(&self.dead_letter_topic)
                    .payload(payload)
                    .key(message.key().unwrap_or_default())
                    .headers(headers);
                if let Err((error, _)) = self.dead_letters.send(record) {
                    tracing::error!(%error, "cannot queue the dead letter");
                }
            }
        }
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

    /// Flushes the given partitions (all when `None`); returns (partition, offset reached) of
    /// each partition fully flushed.
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
                metrics::counter!("agentmeter_aggregator_actions_written_total")
                    .increment(rows as u64);
                metrics::counter!("agentmeter_aggregator_usage_rows_written_total")
                    .increment(write.usage.len() as u64);
                metrics::counter!("agentmeter_aggregator_batches_flushed_total").increment(1);
            }
            if all_written {
                flushed.push((partition, offset_reached));
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
        self.last_flush = Instant::now();
        metrics::histogram!("agentmeter_aggregator_flush_seconds")
            .record(started.elapsed().as_secs_f64());
        let remembered: usize = self
            .partitions
            .values()
            .map(PartitionAggregator::remembered_ids)
            .sum();
        metrics::gauge!("agentmeter_aggregator_dedupe_ids").set(remembered as f64);
        flushed
    }
}

/// The consumer context: rebalances act on the worker synchronously.
struct AggregatorContext {
    worker: Arc<Mutex<Worker>>,
}

impl ClientContext for AggregatorContext {}

impl ConsumerContext for AggregatorContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let mut worker = self.worker.lock().expect("worker lock");
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned: Vec<i32> = partitions
                    .elements()
                    .iter()
                    .map(|element| element.partition())
                    .collect();
                for partition in assigned {
                    let plan = worker
                        .with_retries("reading aggregator progress", |service, runtime| {
                            runtime.block_on(service.load_plan(partition))
                        });
                    let Some(plan) = plan else {
                        // Shutdown or a permanent error: assign nothing usable; the loop stops.
                        continue;
                    };
                    let aggregator = PartitionAggregator::new(partition, worker.settings, plan);
                    let offset = aggregator
                        .start_offset()
                        .map(Offset::Offset)
                        .unwrap_or(Offset::Beginning);
                    tracing::info!(
                        partition,
                        ?plan,
                        ?offset,
                        "partition assigned; resuming from ClickHouse progress"
                    );
                    let topic = worker.topic.clone();
                    if let Err(error) = partitions.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(%error, partition, "cannot set the start offset");
                    }
                    worker.partitions.insert(partition, aggregator);
                }
                if let Err(error) = consumer.assign(partitions) {
                    tracing::error!(%error, "assignment failed");
                    worker.fatal = Some(format!("assignment failed: {error}"));
                }
                let generation = group_membership(consumer).map(|(generation, _)| generation);
                worker.watchdog.on_assigned(generation);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = partitions
                    .elements()
                    .iter()
                    .map(|element| element.partition())
                    .collect();
                tracing::info!(?revoked, "partitions revoked; flushing them");
                worker.flush(Some(&revoked));
                for partition in revoked {
                    worker.partitions.remove(&partition);
                    worker.hints.remove(&partition);
                    worker.read_up_to.remove(&partition);
                }
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(%error, "unassign failed");
                }
                worker.watchdog.on_revoked();
            }
            other => tracing::error!(?other, "rebalance error"),
        }
    }
}

/// Runs the consumer loop on the current (blocking) thread until shutdown or a fatal error.
pub fn run_blocking(
    config: AggregatorConfig,
    kafka: KafkaSettings,
    service: ClickHouseService,
    shutdown: Shutdown,
    clickhouse_healthy: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the ClickHouse runtime")?;
    let dead_letters: ThreadedProducer<DefaultProducerContext> = kafka
        .producer_config(Duration::from_secs(30))
        .create()
        .context("cannot create the dead-letter producer")?;
    let worker = Arc::new(Mutex::new(Worker {
        settings: BatchSettings {
            batch_size: config.batch_offsets,
            window_seconds: config.window_seconds,
            dedupe_horizon_ms: config.dedupe_horizon_seconds * 1000,
        },
        config: config.clone(),
        topic: topics.enriched.clone(),
        dead_letter_topic: topics.dead_letter.clone(),
        service,
        runtime,
        partitions: HashMap::new(),
        shutdown: shutdown.clone(),
        fatal: None,
        clickhouse_healthy,
        dead_letters,
        last_flush: Instant::now(),
        watchdog: GroupWatchdog::new(&config.group_id, &topics.enriched),
        hints: HashMap::new(),
        read_up_to: HashMap::new(),
    }));
    let mut client_config =
        kafka.group_consumer_config(&config.group_id, &config.group_instance_id);
    // Eager assignment: the rebalance callback assigns explicit start offsets itself.
    client_config.set("partition.assignment.strategy", "range");
    let consumer: BaseConsumer<AggregatorContext> = client_config
        .create_with_context(AggregatorContext {
            worker: worker.clone(),
        })
        .context("cannot create the Kafka consumer")?;
    consumer
        .subscribe(&[&topics.enriched])
        .with_context(|| format!("cannot subscribe to {}", topics.enriched))?;
    tracing::info!(
        topic = %topics.enriched,
        group = %config.group_id,
        group_instance_id = %config.group_instance_id,
        "aggregator consuming"
    );

    let mut last_lag_report = Instant::now();
    // Set while the consumer has left the group to re-join it (GroupWatchdog).
    let mut rejoining_since: Option<Instant> = None;
    let result = loop {
        if let Some(fatal) = worker.lock().expect("worker lock").fatal.clone() {
            break Err(anyhow::anyhow!(fatal));
        }
        if shutdown.is_requested() {
            break Ok(());
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => worker.lock().expect("worker lock").handle_message(&message),
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
        match rejoining_since {
            // Re-join once the LeaveGroup is out (librdkafka clears the member id then).
            Some(since) => {
                let left = group_membership(&consumer).is_none_or(|(_, member)| member.is_empty());
                if left || since.elapsed() > Duration::from_secs(5) {
                    consumer
                        .subscribe(&[&topics.enriched])
                        .with_context(|| format!("cannot subscribe to {}", topics.enriched))?;
                    tracing::info!("re-joined the consumer group");
                    rejoining_since = None;
                }
            }
            None => {
                let reason = worker
                    .lock()
                    .expect("worker lock")
                    .watchdog
                    .rejoin_reason(&consumer);
                if let Some(reason) = reason {
                    tracing::warn!(%reason, "leaving the consumer group to re-join it");
                    // The revoke callback (next poll) flushes; the new owners resume from
                    // ClickHouse progress, as after any rebalance.
                    consumer.unsubscribe();
                    worker.lock().expect("worker lock").watchdog.rejoined();
                    rejoining_since = Some(Instant::now());
                }
            }
        }
        let flushed = {
            let mut worker = worker.lock().expect("worker lock");
            if worker.flush_due() {
                worker.flush(None)
            } else {
                Vec::new()
            }
        };
        store_offset_hints(&consumer, &topics.enriched, &flushed);
        if last_lag_report.elapsed() >= Duration::from_secs(10) {
            report_lag(&consumer, &topics.enriched, &worker);
            last_lag_report = Instant::now();
        }
    };
    // Final flush, then leave the group (the revoke callback flushes nothing more).
    let flushed = worker.lock().expect("worker lock").flush(None);
    store_offset_hints(&consumer, &topics.enriched, &flushed);
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    // Leave the group explicitly: librdkafka does not send LeaveGroup for a static member when
    // the consumer closes, and the group would then wait for the session timeout (on tansu
    // 0.6.0, an expired member can even strand its partitions). A join still in flight is let
    // finish first (bounded), else there is no member id to leave with. Polling serves the
    // rebalance callbacks; records polled here are dropped unhandled (their offsets are not
    // stored), the next owner reads them.
    let join_deadline = Instant::now() + Duration::from_secs(10);
    while rejoining_since.is_none()
        && Instant::now() < join_deadline
        && group_membership(&consumer).is_none_or(|(_, member)| member.is_empty())
    {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    consumer.unsubscribe();
    let leave_deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < leave_deadline
        && group_membership(&consumer).is_some_and(|(_, member)| !member.is_empty())
    {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let _ = worker
        .lock()
        .expect("worker lock")
        .dead_letters
        .flush(Duration::from_secs(5));
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

fn report_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    worker: &Arc<Mutex<Worker>>,
) {
    let positions: Vec<(i32, i64)> = worker
        .lock()
        .expect("worker lock")
        .partitions
        .values()
        .map(|aggregator| (aggregator.partition, aggregator.next_offset()))
        .collect();
    for (partition, next_offset) in positions {
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(1)) {
            metrics::gauge!("agentmeter_aggregator_consumer_lag", "partition" => partition.to_string())
                .set((high - next_offset).max(0) as f64);
        }
    }
}
