//! `agentmeter reset-input`: resume aggregating partitions whose input was reset.
//!
//! When a partition's Kafka high watermark is below the progress stored in ClickHouse, the
//! aggregator stops reading it (`/readyz` says so): the topic was deleted and re-created,
//! restored from an older backup, or points at another cluster. Only an operator knows which;
//! this command records the answer as a new input epoch (`migrations/0005_input_epochs.sql`):
//! * `--from earliest`: every record now in the partition is new (a re-created topic) and is
//!   counted, from the partition's first offset;
//! * `--from latest`: the records now in it were already counted (a restored backup); only
//!   records written from now on are.
//!
//! The running aggregator notices the epoch within seconds and resumes; nothing restarts.

use std::time::Duration;

use agentmeter_aggregator::service::ClickHouseService;
use agentmeter_aggregator::state::BatchSettings;
use agentmeter_aggregator::{AggregatorConfig, ClickHouseSettings};
use agentmeter_runtime::kafka::KafkaSettings;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Where the new epoch starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartFrom {
    /// The partition's first offset: everything in it is new.
    Earliest,
    /// The partition's current end: everything in it was already counted.
    Latest,
}

#[derive(Debug, clap::Args)]
pub struct ResetInputArgs {
    /// Partitions of the enriched topic to reset (repeat the flag); see the aggregator's /readyz.
    #[arg(long = "partition", required = true)]
    partitions: Vec<i32>,
    /// Where the new input epoch starts.
    #[arg(long, value_enum)]
    from: StartFrom,
    /// Start a new epoch even if the partition does not look reset (its high watermark is not
    /// below the stored progress). With `--from latest` this skips every record not yet read.
    #[arg(long)]
    force: bool,
}

pub async fn run(
    args: ResetInputArgs,
    kafka: &KafkaSettings,
    clickhouse: &ClickHouseSettings,
    aggregator: &AggregatorConfig,
) -> anyhow::Result<()> {
    clickhouse.validate()?;
    kafka.validate()?;
    let topic = kafka.topics().enriched;
    let service = ClickHouseService::new(clickhouse, &topic);
    let settings = BatchSettings {
        batch_size: aggregator.batch_offsets,
        window_seconds: aggregator.window_seconds,
        dedupe_horizon_ms: aggregator.dedupe_horizon_seconds * 1000,
    };
    let consumer: BaseConsumer = kafka
        .standalone_consumer_config()
        .create()
        .context("cannot create a Kafka client")?;
    for partition in args.partitions {
        let watermarks_topic = topic.clone();
        let (low, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&watermarks_topic, partition, Duration::from_secs(10))
        })
        .with_context(|| format!("cannot read the watermarks of {topic}/{partition}"))?;
        let epoch = service.load_epoch(partition).await?;
        let reached = service
            .load_resume(partition)
            .await?
            .map(|(_, reached)| epoch.physical(reached));
        let looks_reset = reached.is_some_and(|reached| high < reached);
        if !looks_reset && !args.force {
            anyhow::bail!(
                "{topic}/{partition} does not look reset: its high watermark is {high} and the stored progress reached Kafka offset {}; nothing was changed (--force starts a new epoch anyway)",
                reached.map_or("none".to_string(), |reached| reached.to_string())
            );
        }
        let physical_start = match args.from {
            StartFrom::Earliest => low,
            StartFrom::Latest => high,
        };
        let started = service
            .start_epoch(partition, physical_start, settings)
            .await?;
        println!(
            "{topic}/{partition}: new input epoch: Kafka offset {} is logical offset {} (above every batch already aggregated); the aggregator resumes within seconds",
            started.physical_start, started.logical_start
        );
    }
    Ok(())
}
