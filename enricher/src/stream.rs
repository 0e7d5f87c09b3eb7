//! The enricher's stream: consume a batch, produce every output, then store the input offsets.
//!
//! Contract (rust-rdkafka's `at_least_once` example, per batch): an input offset is stored only
//! after the output of that record — enriched action or dead letter — is acknowledged by Kafka
//! (acks=all). A crash or rebalance anywhere replays at most the unacknowledged batch, so an
//! action can appear twice on `actions.enriched` but never zero times; the aggregator removes
//! duplicates by event id. Outputs keep the input key, so duplicates stay in one partition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_runtime::config_watch::{ConfigHandle, MeteringState};
use agentmeter_runtime::group::{GroupMembership, GroupWatchdog};
use agentmeter_runtime::kafka::{KafkaSettings, Topics};
use agentmeter_runtime::partitions::{OwnedPartitions, OwnershipMode, StaticAssigner};
use agentmeter_runtime::shutdown::Shutdown;
use agentmeter_schemas::{decode_raw_action, encode_enriched_action};
use anyhow::Context;
use futures::future::join_all;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::EnricherConfig;
use crate::enrich::{enrich, DeadLetterReason, TimeWindow};
use crate::telemetry::{
    emit, BatchEnriched, ConsumerErrored, ConsumerLag, DeadLettered, OutputsRetried,
};

/// Header names on dead-letter records.
pub const DLQ_REASON_HEADER: &str = "agentmeter.dlq.reason";
pub const DLQ_MESSAGE_HEADER: &str = "agentmeter.dlq.message";
pub const DLQ_SOURCE_HEADER: &str = "agentmeter.dlq.source";

/// Consumes `actions.raw` until shutdown, once the metering configuration is loaded: takes up
/// this process's partitions (static ownership or the consumer group, ADR 0003), enriches each
/// batch and delivers it; at the end commits the stored offsets and, in group mode, leaves the
/// group.
pub async fn consume(
    config: EnricherConfig,
    kafka: KafkaSettings,
    metering: ConfigHandle,
    owned: OwnedPartitions,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let group_mode = config.ownership.mode == OwnershipMode::Group;
    let membership = Arc::new(Mutex::new(group_mode.then(|| {
        GroupMembership::new(
            &config.group_id,
            &topics.raw,
            config.ownership.group_watchdog,
        )
    })));
    let consumer: StreamConsumer<GroupContext> = kafka
        .group_consumer_config(&config.group_id, &config.group_instance_id)
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(GroupContext {
            membership: membership.clone(),
            owned: owned.clone(),
        })
        .context("cannot create the Kafka consumer")?;
    let static_ownership = if group_mode {
        consumer
            .subscribe(&[&topics.raw])
            .with_context(|| format!("cannot subscribe to {}", topics.raw))?;
        None
    } else {
        Some(config.ownership.static_ownership("enricher.ownership")?)
    };
    let metadata_client: Arc<BaseConsumer> = Arc::new(
        kafka
            .standalone_consumer_config()
            .create()
            .context("cannot create the Kafka metadata client")?,
    );
    let producer: FutureProducer = kafka
        .producer_config(Duration::from_millis(config.produce_timeout_ms))
        .create()
        .context("cannot create the Kafka producer")?;
    match static_ownership {
        None => tracing::info!(
            topic = %topics.raw,
            group = %config.group_id,
            group_instance_id = %config.group_instance_id,
            "enricher consuming (partitions assigned by the consumer group)"
        ),
        Some(ownership) => tracing::info!(
            topic = %topics.raw,
            replica = ownership.replica,
            replicas = ownership.replicas,
            "enricher consuming (static ownership: the partitions p with p mod replicas = replica)"
        ),
    }

    let topics_raw = topics.raw.clone();
    let mut stage = EnricherStage {
        config,
        topics,
        metering,
        consumer,
        producer,
        membership,
        static_assigner: static_ownership
            .map(|ownership| StaticAssigner::new(ownership, &topics_raw, "enricher.ownership")),
        metadata_client,
        owned,
    };
    let result = stage.consume_until(shutdown).await;
    if let Err(error) = stage.consumer.commit_consumer_state(CommitMode::Sync) {
        // NoOffset just means everything stored was already committed.
        tracing::debug!(%error, "final offset commit");
    }
    // librdkafka sends no LeaveGroup for a static member when the consumer closes: leave
    // explicitly so the group reassigns our partitions now (ADR 0001, "Consumer groups on tansu").
    stage.leave_group().await;
    result
}

/// The consumer context: tells the group membership and the owned set about rebalances.
struct GroupContext {
    membership: Arc<Mutex<Option<GroupMembership>>>,
    owned: OwnedPartitions,
}

/// How often librdkafka reports statistics, from which the consumer lag gauge is set.
const STATISTICS_INTERVAL_MS: &str = "5000";

impl ClientContext for GroupContext {
    /// Consumer lag per assigned partition: high watermark − the offset we stored, i.e. records
    /// not yet enriched and acknowledged downstream.
    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values() {
            for partition in topic.partitions.values() {
                if partition.partition >= 0 && partition.consumer_lag_stored >= 0 {
                    emit(ConsumerLag {
                        partition: partition.partition,
                        lag: partition.consumer_lag_stored,
                    });
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => self.owned.set(
                partitions
                    .elements()
                    .iter()
                    .map(|element| element.partition()),
            ),
            Rebalance::Revoke(_) => self.owned.set([]),
            Rebalance::Error(_) => {}
        }
        let mut membership = self.membership.lock().expect("membership lock");
        let Some(membership) = membership.as_mut() else {
            return;
        };
        match rebalance {
            Rebalance::Assign(_) => membership.on_assigned(consumer),
            Rebalance::Revoke(_) => membership.on_revoked(),
            Rebalance::Error(_) => {}
        }
    }
}

struct EnricherStage {
    config: EnricherConfig,
    topics: Topics,
    metering: ConfigHandle,
    consumer: StreamConsumer<GroupContext>,
    producer: FutureProducer,
    /// Group mode: the membership (`None` in static mode); shared with the rebalance callback.
    membership: Arc<Mutex<Option<GroupMembership>>>,
    /// Static mode: takes up this replica's partitions (`None` in group mode; taken out while
    /// it reads the topic on a blocking thread).
    static_assigner: Option<StaticAssigner>,
    /// A client for blocking metadata reads, run off the async threads.
    metadata_client: Arc<BaseConsumer>,
    owned: OwnedPartitions,
}

/// Splits `items` into consecutive runs whose `size` adds up to at most `max_size` (an item
/// larger than that forms a run alone).
///
/// Why the enricher hands librdkafka one run of outputs at a time: its idempotent producer
/// allows no new produce request for a partition while one is unacknowledged, and its broker
/// thread busy-polls while records it may not send yet are queued. With a whole batch queued
/// at once (≈1.5 MB), that polling cost five times as much CPU as everything else the enricher
/// does, on a broker that takes milliseconds to acknowledge (bench/README.md: 18 against 3 CPU-s
/// per million actions). A run that goes out at once leaves nothing queued while the enricher
/// waits for its acknowledgements.
fn runs_of_at_most<T>(
    items: &[T],
    max_size: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut run_size = size(&rest[0]);
        let mut end = 1;
        while end < rest.len() && run_size + size(&rest[end]) <= max_size {
            run_size += size(&rest[end]);
            end += 1;
        }
        let (run, remaining) = rest.split_at(end);
        rest = remaining;
        Some(run)
    })
}

/// One output record: where it goes, and the reason when it is a dead letter.
struct Output<'a> {
    message: &'a BorrowedMessage<'a>,
    payload: Vec<u8>,
    dead_letter: Option<DeadLetterReason>,
}

impl EnricherStage {
    async fn consume_until(&mut self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        loop {
            // Between batches (nothing in flight): leave and re-join the group if it is stuck;
            // in static mode, take up the owned partitions (at start, and any added later).
            self.check_group_membership()?;
            self.check_static_ownership().await?;
            let first = tokio::select! {
                biased;
                _ = shutdown.requested() => return Ok(()),
                received = self.consumer.recv() => received,
                // A member without partitions receives nothing: check the group (or, in static
                // mode, the topic) regularly.
                _ = tokio::time::sleep(self.idle_check_interval()) => continue,
            };
            let first = match first {
                Ok(message) => message,
                Err(error) => {
                    consumer_error(error)?;
                    // librdkafka reconnects by itself; do not spin while it does.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            let deadline = Instant::now() + Duration::from_millis(self.config.batch_max_wait_ms);
            while batch.len() < self.config.batch_max_records {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, self.consumer.recv()).await {
                    Ok(Ok(message)) => batch.push(message),
                    Ok(Err(error)) => {
                        consumer_error(error)?;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.process_batch(&batch, &shutdown).await?;
        }
    }

    /// Static mode: assigns the owned partitions not assigned yet (at start, and any added to
    /// the topic later), each from the group's committed offset (the beginning when there is
    /// none). The metadata read blocks, so it runs on a blocking thread.
    async fn check_static_ownership(&mut self) -> anyhow::Result<()> {
        let Some(mut assigner) = self.static_assigner.take() else {
            return Ok(());
        };
        if !assigner.time_until_due().is_zero() {
            self.static_assigner = Some(assigner);
            return Ok(());
        }
        let client = self.metadata_client.clone();
        let owned = self.owned.clone();
        let (assigner, new) = tokio::task::spawn_blocking(move || {
            let new = assigner.take_up(&*client, &owned);
            (assigner, new)
        })
        .await
        .context("metadata thread panicked")?;
        self.static_assigner = Some(assigner);
        if new.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for partition in &new {
            list.add_partition_offset(&self.topics.raw, *partition, Offset::Stored)?;
        }
        self.consumer
            .incremental_assign(&list)
            .context("cannot assign the owned partitions")
    }

    /// How long to wait for a record before the ownership checks run again.
    fn idle_check_interval(&self) -> Duration {
        if let Some(assigner) = &self.static_assigner {
            assigner.time_until_due().max(Duration::from_millis(100))
        } else {
            GroupWatchdog::CHECK_INTERVAL
        }
    }

    /// Group mode: leaves and re-joins the consumer group when the [`GroupWatchdog`] says it
    /// is stuck ([`GroupMembership::tick`]; the loop's `recv` serves the revocation).
    fn check_group_membership(&self) -> anyhow::Result<()> {
        // A due check makes blocking broker round trips: off the async worker's budget.
        tokio::task::block_in_place(|| {
            match self.membership.lock().expect("membership lock").as_mut() {
                Some(membership) => membership.tick(&self.consumer),
                None => Ok(()),
            }
        })
        .with_context(|| format!("cannot subscribe to {}", self.topics.raw))
    }

    /// Group mode: leaves the group ([`GroupMembership::leave`]), serving the consumer's events
    /// between steps. Stored offsets are committed on revocation.
    async fn leave_group(&self) {
        let leave = self
            .membership
            .lock()
            .expect("membership lock")
            .as_ref()
            .map(GroupMembership::leave);
        let Some(mut leave) = leave else {
            return;
        };
        while tokio::task::block_in_place(|| leave.step(&self.consumer)) {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.consumer.recv()).await;
        }
    }

    async fn process_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        shutdown: &Shutdown,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        // One configuration snapshot per batch: a batch is priced by one version.
        let state = self.metering.load();
        let now_micros = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let window = TimeWindow {
            max_late_micros: self.config.max_late_seconds * 1_000_000,
            max_future_micros: self.config.max_future_seconds * 1_000_000,
        };
        let outputs: Vec<Output> = batch
            .iter()
            .map(|message| enrich_message(message, &state, window, now_micros))
            .collect();

        let output_bytes =
            |output: &Output| output.payload.len() + output.message.key().map_or(0, <[u8]>::len);
        for run in runs_of_at_most(&outputs, self.config.produce_chunk_max_bytes, output_bytes) {
            self.deliver_all(run, shutdown).await?;
        }

        let mut enriched = 0;
        for output in &outputs {
            match &output.dead_letter {
                None => enriched += 1,
                Some(reason) => emit(DeadLettered {
                    reason: reason.code(),
                }),
            }
        }
        self.store_offsets(batch)?;
        emit(BatchEnriched {
            records: batch.len(),
            enriched,
            elapsed: started.elapsed(),
        });
        Ok(())
    }

    /// Sends `outputs` and waits until Kafka acknowledged every one, re-sending the failed ones.
    async fn deliver_all(&self, outputs: &[Output<'_>], shutdown: &Shutdown) -> anyhow::Result<()> {
        let mut pending: Vec<&Output> = outputs.iter().collect();
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let deliveries = pending.iter().map(|output| self.send(output));
            let results = join_all(deliveries).await;
            let mut failed = Vec::new();
            for (output, result) in pending.into_iter().zip(results) {
                if let Err(error) = result {
                    failed.push(output);
                    tracing::warn!(%error, "output not acknowledged; retrying");
                }
            }
            pending = failed;
            if !pending.is_empty() {
                anyhow::ensure!(
                    !shutdown.is_requested(),
                    "shutdown with {} unacknowledged outputs; their inputs will be replayed",
                    pending.len()
                );
                attempt += 1;
                emit(OutputsRetried {
                    count: pending.len(),
                });
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(50)))).await;
            }
        }
        Ok(())
    }

    async fn send(&self, output: &Output<'_>) -> Result<(), String> {
        let message = output.message;
        let key = message.key().unwrap_or_default();
        let result = match &output.dead_letter {
            None => {
                let record = FutureRecord::to(&self.topics.enriched)
                    .key(key)
                    .payload(&output.payload);
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(5)))
                    .await
            }
            Some(reason) => {
                let message_text = reason.to_string();
                let source = format!(
                    "{}/{}/{}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                );
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: DLQ_REASON_HEADER,
                        value: Some(reason.code()),
                    })
                    .insert(Header {
                        key: DLQ_MESSAGE_HEADER,
                        value: Some(&message_text),
                    })
                    .insert(Header {
                        key: DLQ_SOURCE_HEADER,
                        value: Some(&source),
                    });
                let record = FutureRecord::to(&self.topics.dead_letter)
                    .key(key)
                    .payload(&output.payload)
                    .headers(headers);
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(5)))
                    .await
            }
        };
        result.map(|_| ()).map_err(|(error, _)| error.to_string())
    }

    /// Stores, per partition, the offset after the last record of the batch.
    fn store_offsets(&self, batch: &[BorrowedMessage<'_>]) -> anyhow::Result<()> {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for message in batch {
            let entry = next
                .entry((message.topic(), message.partition()))
                .or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            offsets.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        if let Err(error) = self.consumer.store_offsets(&offsets) {
            // After a revocation the partition is no longer ours; its new owner replays.
            tracing::info!(%error, "offsets not stored (partition revoked?)");
        }
        Ok(())
    }
}

/// What a consumer error means for the stage: a broker outage, a failed fetch or a rebalance
/// in progress is transient (librdkafka reconnects and the stage goes on: the local broker is
/// restarted within seconds, and stopping would leave the stage down until started by hand);
/// only a fatal error (e.g. another process fenced our static member id) stops it.
fn consumer_error(error: KafkaError) -> anyhow::Result<()> {
    if let KafkaError::MessageConsumptionFatal(code) = error {
        anyhow::bail!(
            "fatal Kafka consumer error: {code} (is the group_instance_id used by another process?)"
        );
    }
    emit(ConsumerErrored { error: &error });
    Ok(())
}

fn enrich_message<'a>(
    message: &'a BorrowedMessage<'a>,
    state: &MeteringState,
    window: TimeWindow,
    now_micros: i64,
) -> Output<'a> {
    let original = message.payload().unwrap_or_default();
    let dead_letter = |reason: DeadLetterReason| Output {
        message,
        payload: original.to_vec(),
        dead_letter: Some(reason),
    };
    let raw = match decode_raw_action(original) {
        Ok(raw) => raw,
        Err(error) => return dead_letter(DeadLetterReason::Undecodable(error.to_string())),
    };
    let Some(snapshot) = state.workspace(&raw.workspace_id) else {
        return dead_letter(DeadLetterReason::UnknownWorkspace(raw.workspace_id));
    };
    match enrich(raw, snapshot, window, now_micros) {
        Ok(enriched) => match encode_enriched_action(&enriched) {
            Ok(payload) => Output {
                message,
                payload,
                dead_letter: None,
            },
            Err(error) => dead_letter(DeadLetterReason::Unencodable(error.to_string())),
        },
        Err(reason) => dead_letter(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::runs_of_at_most;

    fn runs(sizes: &[usize], max_size: usize) -> Vec<Vec<usize>> {
        runs_of_at_most(sizes, max_size, |size| *size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    #[test]
    fn runs_keep_order_and_stay_within_the_limit() {
        assert_eq!(
            runs(&[3, 4, 3, 5, 1, 1], 7),
            vec![vec![3, 4], vec![3], vec![5, 1, 1]]
        );
        assert_eq!(runs(&[7, 7], 7), vec![vec![7], vec![7]]);
        assert_eq!(runs(&[2, 2, 2], 100), vec![vec![2, 2, 2]]);
        assert!(runs(&[], 7).is_empty());
    }

    #[test]
    fn an_item_larger_than_the_limit_forms_a_run_alone() {
        assert_eq!(runs(&[1, 20, 1], 7), vec![vec![1], vec![20], vec![1]]);
    }
}
