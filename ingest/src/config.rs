//! `[ingest]` settings.

use std::net::SocketAddr;

use serde::Deserialize;

/// Settings of `agentmeter ingest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Address of the HTTP API (REST, agent info, metrics, health).
    pub http_listen: SocketAddr,
    /// Address of the OTLP/gRPC trace receiver (value-python's `VALUE_OTEL_ENDPOINT`).
    pub otlp_grpc_listen: SocketAddr,
    /// Address of the OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf or JSON).
    pub otlp_http_listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most actions in one REST batch.
    pub max_batch_actions: usize,
    /// Most spans in one OTLP export request; a larger request is refused whole (400 /
    /// INVALID_ARGUMENT). OpenTelemetry's batch processors send at most 512 by default.
    pub max_spans_per_request: usize,
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
            otlp_grpc_listen: "127.0.0.1:4317".parse().expect("valid address"),
            otlp_http_listen: "127.0.0.1:4318".parse().expect("valid address"),
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_actions: 1000,
            max_spans_per_request: 5000,
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
            self.max_spans_per_request >= 1,
            "ingest.max_spans_per_request must be at least 1"
        );
        anyhow::ensure!(
            self.max_in_flight_actions >= self.max_spans_per_request,
            "ingest.max_in_flight_actions ({}) must be at least max_spans_per_request ({}), or a full OTLP request could never be admitted",
            self.max_in_flight_actions,
            self.max_spans_per_request
        );
        let listeners = [
            ("http_listen", self.http_listen),
            ("otlp_grpc_listen", self.otlp_grpc_listen),
            ("otlp_http_listen", self.otlp_http_listen),
        ];
        for (index, (name, address)) in listeners.iter().enumerate() {
            for (other_name, other_address) in &listeners[index + 1..] {
                anyhow::ensure!(
                    address.port() == 0 || address != other_address,
                    "ingest.{name} and ingest.{other_name} are both {address}; each needs its own port"
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_settings_are_checked_at_start() {
        assert!(IngestConfig::default().validate().is_ok());
        let same_port = IngestConfig {
            otlp_http_listen: "127.0.0.1:4317".parse().unwrap(),
            ..IngestConfig::default()
        };
        let error = same_port.validate().unwrap_err().to_string();
        assert!(
            error.contains("otlp_grpc_listen and ingest.otlp_http_listen"),
            "{error}"
        );
        let too_many_spans = IngestConfig {
            max_spans_per_request: 200_000,
            ..IngestConfig::default()
        };
        let error = too_many_spans.validate().unwrap_err().to_string();
        assert!(error.contains("max_spans_per_request"), "{error}");
        let any_port = IngestConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            otlp_grpc_listen: "127.0.0.1:0".parse().unwrap(),
            otlp_http_listen: "127.0.0.1:0".parse().unwrap(),
            ..IngestConfig::default()
        };
        assert!(any_port.validate().is_ok());
    }
}
