//! `[enricher]` settings.

use std::net::SocketAddr;

use agentmeter_runtime::partitions::OwnershipSettings;
use serde::Deserialize;

/// Settings of `agentmeter enrich`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnricherConfig {
    /// Consumer group of the enricher processes: it keeps their committed input offsets, and in
    /// group ownership mode it also assigns the partitions.
    pub group_id: String,
    /// This process's static membership id in the group (Kafka `group.instance.id`); unique per
    /// process, stable across its restarts. Default `enricher-<host name>`; empty = dynamic
    /// membership. See ADR 0001, "Consumer groups on tansu".
    pub group_instance_id: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Most records handled per batch (one offset store per batch).
    pub batch_max_records: usize,
    /// Longest wait to fill a batch, in milliseconds.
    #[serde(
        alias = "batch_max_wait",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub batch_max_wait_ms: u64,
    /// Most bytes (keys and payloads) of output handed to the Kafka producer at once; a batch is
    /// sent in runs of this size, each acknowledged before the next. Keep it below the
    /// producer's `batch.size` and `message.max.bytes` (1,000,000 unless overridden), so that a
    /// run goes out at once: librdkafka's idempotent producer busy-polls while records wait
    /// behind an unacknowledged produce request (bench/README.md).
    pub produce_chunk_max_bytes: usize,
    /// How long Kafka may take to acknowledge an output record before it is retried.
    #[serde(
        alias = "produce_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub produce_timeout_ms: u64,
    /// Actions older than this (seconds before they were received) are dead-lettered.
    #[serde(
        alias = "max_late",
        deserialize_with = "agentmeter_runtime::duration::seconds_i64"
    )]
    pub max_late_seconds: i64,
    /// Actions further in the future than this (seconds after they were received) are
    /// dead-lettered.
    #[serde(
        alias = "max_future",
        deserialize_with = "agentmeter_runtime::duration::seconds_i64"
    )]
    pub max_future_seconds: i64,
    /// `[enricher.ownership]`: which partitions of `actions.raw` this process owns (static by
    /// replica ordinal, or a consumer group) and when it counts as stalled (ADR 0003).
    pub ownership: OwnershipSettings,
}

impl Default for EnricherConfig {
    fn default() -> Self {
        EnricherConfig {
            group_id: "agentmeter-enricher".into(),
            group_instance_id: agentmeter_runtime::kafka::default_group_instance_id("enricher"),
            metrics_listen: "127.0.0.1:9101".parse().expect("valid address"),
            batch_max_records: 5000,
            batch_max_wait_ms: 50,
            produce_chunk_max_bytes: 768 * 1024,
            produce_timeout_ms: 30_000,
            max_late_seconds: 35 * 24 * 3600,
            max_future_seconds: 300,
            ownership: OwnershipSettings::default(),
        }
    }
}

impl EnricherConfig {
    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.group_id.is_empty(), "enricher.group_id is empty");
        self.ownership.validate("enricher.ownership")?;
        agentmeter_runtime::kafka::validate_group_instance_id(
            "enricher.group_instance_id",
            &self.group_instance_id,
        )?;
        anyhow::ensure!(
            self.batch_max_records >= 1,
            "enricher.batch_max_records must be at least 1"
        );
        anyhow::ensure!(
            self.produce_chunk_max_bytes >= 1,
            "enricher.produce_chunk_max_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.produce_timeout_ms >= 100,
            "enricher.produce_timeout_ms must be at least 100"
        );
        anyhow::ensure!(
            self.max_late_seconds >= 0 && self.max_future_seconds >= 0,
            "enricher time windows must not be negative"
        );
        Ok(())
    }
}
