//! `agentmeter aggregate` and `agentmeter migrate`: exact usage in ClickHouse.
//!
//! Layout (the same shape as the other stages):
//! * [`config`] — `[aggregator]` and `[clickhouse]` settings, checked at start.
//! * [`state`] — the pure, deterministic part: batch plans, the duplicate window, cumulative
//!   usage per window and dimensions. Its unit tests replay every crash point.
//! * [`stream`] — the Kafka consumer on a blocking thread; every partition it takes (by replica
//!   ordinal or from the consumer group, ADR 0003) resumes from the progress stored in ClickHouse.
//! * [`service`] — the ClickHouse writes in their safe order, plan reads, and the
//!   [`ClickHouseWriter`](service::ClickHouseWriter) that runs them with the retry rules and health.
//! * [`restart_store`] — the duplicate check's ids on local disk (optional), so that a restart
//!   re-reads at most one batch instead of the whole duplicate horizon.
//! * [`dead_letters`] — the dead-letter producer for poison records.
//! * [`telemetry`] — what the aggregator counts and logs, one type per event.
//! * [`rows`] — row types of the tables; [`migrate`] — the versioned DDL.
//!
//! Why the totals are exact is explained in `docs/adr/0001-exactly-once-aggregation.md`.

pub mod config;
pub mod dead_letters;
pub mod migrate;
pub mod restart_store;
pub mod rows;
pub mod service;
pub mod state;
pub mod stream;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_runtime::observability::{operations_router, serve};
use agentmeter_runtime::partitions::{OwnedPartitions, ProgressWatch};
use agentmeter_runtime::shutdown::Shutdown;
use anyhow::Context;

pub use config::{AggregatorConfig, ClickHouseSettings};

/// Runs the aggregator until shutdown: a final flush makes everything read durable.
pub async fn run(
    config: AggregatorConfig,
    clickhouse: ClickHouseSettings,
    kafka: KafkaSettings,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    config.validate()?;
    clickhouse.validate()?;
    kafka.validate()?;
    let service = service::ClickHouseService::new(&clickhouse, &kafka.topics().enriched);
    let clickhouse_healthy = Arc::new(AtomicBool::new(true));
    let input_resets = stream::InputResets::default();
    let owned = OwnedPartitions::default();
    let progress = ProgressWatch::spawn(
        &kafka,
        &config.group_id,
        &kafka.topics().enriched,
        owned.clone(),
        config.ownership.stall_after(),
        shutdown.clone(),
    )?;
    let readiness = {
        let clickhouse_healthy = clickhouse_healthy.clone();
        let input_resets = input_resets.clone();
        Arc::new(move || {
            if !clickhouse_healthy.load(Ordering::Relaxed) {
                return Err("ClickHouse writes are failing; retrying".to_string());
            }
            progress.readiness()?;
            let resets = input_resets.lock().expect("input resets lock");
            if !resets.is_empty() {
                let messages: Vec<&str> = resets.values().map(String::as_str).collect();
                return Err(format!("input reset: {}", messages.join(" | ")));
            }
            Ok(())
        })
    };
    let operations = tokio::spawn(serve(
        config.metrics_listen,
        operations_router(readiness),
        shutdown.clone(),
    ));
    let result = tokio::task::spawn_blocking(move || {
        stream::run_blocking(
            config,
            kafka,
            service,
            shutdown,
            clickhouse_healthy,
            input_resets,
            owned,
        )
    })
    .await
    .context("aggregator thread panicked")?;
    operations.abort();
    tracing::info!("aggregator stopped");
    result
}
