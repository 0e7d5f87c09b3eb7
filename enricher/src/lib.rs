//! `agentmeter enrich`: turns raw actions into priced, tagged actions.
//!
//! Layout (the same shape as the other stages):
//! * [`config`] — `[enricher]` settings, checked at start.
//! * [`enrich`] — the pure join: tagging, the rate in force at `occurred_at`, quantity, cost,
//!   `@action`/`@outcome`; or the reason a record must go to the dead-letter topic.
//! * [`stream`] — the stream: consume `actions.raw` in batches, produce each result to
//!   `actions.enriched` (same key) or `actions.dlq`, and store input offsets only after every
//!   output of the batch is acknowledged (at-least-once; the aggregator removes duplicates).
//! * [`telemetry`] — what the enricher counts and logs, one type per event.
//! * [`run`] (here) — the wiring: settings checked, the configuration watcher, the progress
//!   watch and `/readyz`, then [`stream::consume`] until shutdown.
//!
//! The enricher holds no state but the configuration snapshot, so any number of processes can
//! share the partitions of `actions.raw` as one consumer group.

pub mod config;
pub mod enrich;
pub mod stream;
pub mod telemetry;

use std::sync::Arc;

use agentmeter_runtime::config_watch::spawn_config_watcher;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_runtime::observability::{operations_router, serve};
use agentmeter_runtime::partitions::{OwnedPartitions, ProgressWatch};
use agentmeter_runtime::shutdown::Shutdown;

pub use config::EnricherConfig;

/// Runs the enricher until shutdown.
pub async fn run(
    config: EnricherConfig,
    kafka: KafkaSettings,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    config.validate()?;
    kafka.validate()?;
    let metering = spawn_config_watcher(&kafka, shutdown.clone())?;
    let owned = OwnedPartitions::default();
    let progress = ProgressWatch::spawn(
        &kafka,
        &config.group_id,
        &kafka.topics().raw,
        owned.clone(),
        config.ownership.stall_after(),
        shutdown.clone(),
    )?;
    let readiness = {
        let metering = metering.clone();
        Arc::new(move || {
            if !metering.is_caught_up() {
                return Err("metering configuration not loaded yet".to_string());
            }
            progress.readiness()
        })
    };
    let operations = tokio::spawn(serve(
        config.metrics_listen,
        operations_router(readiness),
        shutdown.clone(),
    ));
    // A broker that is not there yet is an outage to wait out (not ready meanwhile).
    let result = if metering.clone().wait_until_loaded(shutdown.clone()).await {
        stream::consume(config, kafka, metering, owned, shutdown).await
    } else {
        Ok(())
    };
    operations.abort();
    tracing::info!("enricher stopped");
    result
}
