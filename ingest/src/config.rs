//! `[ingest]` settings.

use std::net::SocketAddr;

use serde::Deserialize;

/// Settings of `agentmeter ingest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Address of the HTTP API (REST, agent info, metrics, health).
    pub http_listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most actions in one REST batch.
    pub max_batch_actions: usize,
    /// Most attributes on one action.
    pub max_attributes: usize,
    /// Largest attributes object of one action, as JSON text, in bytes.
    pub max_attributes_bytes: usize,
    /// How far in the past `occurred_at` may be, in seconds (default 35 days).
    pub max_late_seconds: i64,
    /// How far in the future `occurred_at` may be, in seconds (clock skew; default 5 minutes).
    pub max_future_seconds: i64,
    /// Actions accepted but not yet acknowledged by Kafka, at most. Beyond it requests get 429
    /// with Retry-After before anything is produced.
    pub max_in_flight_actions: usize,
    /// How long Kafka may take to acknowledge a record before the request fails with 503.
    pub produce_timeout_ms: u64,
    /// Seconds a client is asked to wait (Retry-After) when ingest is saturated.
    pub retry_after_seconds: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            http_listen: "127.0.0.1:8080".parse().expect("valid address"),
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_actions: 1000,
            max_attributes: 128,
            max_attributes_bytes: 16 * 1024,
            max_late_seconds: 35 * 24 * 3600,
            max_future_seconds: 300,
            max_in_flight_actions: 100_000,
            produce_timeout_ms: 10_000,
            retry_after_seconds: 1,
        }
    }
}

impl IngestConfig {
    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_batch_actions >= 1,
            "ingest.max_batch_actions must be at least 1"
        );
        anyhow::ensure!(
            self.max_in_flight_actions >= self.max_batch_actions,
            "ingest.max_in_flight_actions ({}) must be at least max_batch_actions ({}), or a full batch could never be admitted",
            self.max_in_flight_actions,
            self.max_batch_actions
        );
        anyhow::ensure!(
            self.max_late_seconds >= 0 && self.max_future_seconds >= 0,
            "ingest time windows must not be negative"
        );
        anyhow::ensure!(
            self.max_body_bytes >= 1024,
            "ingest.max_body_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.produce_timeout_ms >= 100,
            "ingest.produce_timeout_ms must be at least 100"
        );
        Ok(())
    }
}
