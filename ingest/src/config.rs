//! `[ingest]` settings.

use std::net::SocketAddr;

use serde::Deserialize;

/// What the sink adds to `produce_timeout_ms` at most: the wait for room in the producer's
/// queue before a record is enqueued (see `sink.rs`).
pub const ENQUEUE_ALLOWANCE_MS: u64 = 1000;

/// The default of [`IngestConfig::producer_window_actions`].
pub const DEFAULT_PRODUCER_WINDOW_ACTIONS: usize = 2000;

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
    #[serde(
        alias = "max_late",
        deserialize_with = "agentmeter_runtime::duration::seconds_i64"
    )]
    pub max_late_seconds: i64,
    /// How far in the future `occurred_at` may be, in seconds (clock skew; default 5 minutes).
    #[serde(
        alias = "max_future",
        deserialize_with = "agentmeter_runtime::duration::seconds_i64"
    )]
    pub max_future_seconds: i64,
    /// Actions accepted but not yet acknowledged by Kafka, at most. Beyond it requests get 429
    /// with Retry-After before anything is produced.
    pub max_in_flight_actions: usize,
    /// How long Kafka may take to acknowledge a record before the request fails with 503.
    #[serde(
        alias = "produce_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub produce_timeout_ms: u64,
    /// Seconds a client is asked to wait (Retry-After) when ingest is saturated.
    #[serde(
        alias = "retry_after",
        deserialize_with = "agentmeter_runtime::duration::seconds_u64"
    )]
    pub retry_after_seconds: u64,
    /// Actions of one workspace in flight at most (its share of `max_in_flight_actions`).
    /// Beyond it that workspace's requests get 429 / RESOURCE_EXHAUSTED while other workspaces
    /// are still admitted.
    pub max_in_flight_actions_per_workspace: usize,
    /// Actions of one agent instance in flight at most (its share of its workspace's). A request
    /// larger than a share is still admitted when its agent instance (workspace) has nothing in
    /// flight.
    pub max_in_flight_actions_per_agent_instance: usize,
    /// Requests of one agent instance in progress at once at most; more are refused (429 /
    /// RESOURCE_EXHAUSTED) before their body is read, so a flood costs little CPU.
    pub max_concurrent_requests_per_agent_instance: usize,
    /// Requests of one workspace in progress at once at most (all its agent instances).
    pub max_concurrent_requests_per_workspace: usize,
    /// Sustained actions per second one agent instance may send (0: no limit). Beyond it (and
    /// its burst) its requests get 429 / RESOURCE_EXHAUSTED before their body is read, so a
    /// flooding agent cannot load the broker the other workspaces' records go through.
    pub max_actions_per_second_per_agent_instance: u32,
    /// Sustained actions per second one workspace may send, all its agent instances together
    /// (0: no limit, the default).
    pub max_actions_per_second_per_workspace: u32,
    /// The burst of both rates, in seconds of the rate: after a quiet time an agent instance may
    /// send this many seconds' worth of actions at once.
    pub rate_burst_seconds: u32,
    /// How long a request refused before its body was read (rate, requests in progress or a full
    /// share) waits before it is answered. A client that ignores Retry-After and retries at once
    /// is slowed to one attempt per this delay per connection instead of costing ingest CPU for
    /// thousands of refusals per second; the delay holds no budget (0: answer at once).
    #[serde(
        alias = "refusal_delay",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub refusal_delay_ms: u64,
    /// Actions handed to the Kafka producer and not yet acknowledged, at most. Admitted batches
    /// beyond it wait in ingest and are handed over round robin by workspace, so a batch of a
    /// quiet workspace waits behind at most this many records of a flooding one, not behind
    /// the flood's whole share (`ingest::producer_window`). Smaller isolates workspaces better;
    /// too small leaves the broker idle between acknowledgements (docs/ingest-security.md).
    pub producer_window_actions: usize,
    /// Time a client has to send a complete request head: from connecting until its first
    /// request has arrived (any protocol), and on a keep-alive HTTP/1 connection from the end of
    /// one response until the next request head is complete. Beyond it the connection is closed.
    #[serde(
        alias = "header_read_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in progress for this long is closed (HTTP/2: GOAWAY).
    #[serde(
        alias = "idle_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub idle_timeout_ms: u64,
    /// Time one request may take from its head to its answer (reading the body included);
    /// beyond it the client gets 408 (gRPC: DEADLINE_EXCEEDED). Longer than
    /// `produce_timeout_ms`, so a request waiting for Kafka is answered 503 by the sink first.
    #[serde(
        alias = "request_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub request_timeout_ms: u64,
    /// Open connections per listener at most (REST, OTLP/gRPC and OTLP/HTTP each); a connection
    /// beyond it is closed as soon as it is accepted.
    pub max_connections_per_listener: usize,
    /// Concurrent HTTP/2 streams (requests) per connection at most.
    pub max_concurrent_streams_per_connection: u32,
    /// Interval of HTTP/2 keep-alive pings on a connection; a peer that does not answer within
    /// `http2_keepalive_timeout_ms` is disconnected.
    #[serde(
        alias = "http2_keepalive_interval",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub http2_keepalive_interval_ms: u64,
    /// How long the answer to an HTTP/2 keep-alive ping may take.
    #[serde(
        alias = "http2_keepalive_timeout",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub http2_keepalive_timeout_ms: u64,
    /// When set, `/metrics`, `/healthz` and `/readyz` are served on this address only (a
    /// private interface) instead of on `http_listen` next to the public API.
    pub operations_listen: Option<SocketAddr>,
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
            max_in_flight_actions_per_workspace: 10_000,
            max_in_flight_actions_per_agent_instance: 5_000,
            max_concurrent_requests_per_agent_instance: 16,
            max_concurrent_requests_per_workspace: 64,
            max_actions_per_second_per_agent_instance: 2_000,
            max_actions_per_second_per_workspace: 0,
            rate_burst_seconds: 2,
            refusal_delay_ms: 100,
            producer_window_actions: DEFAULT_PRODUCER_WINDOW_ACTIONS,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 30_000,
            max_connections_per_listener: 1024,
            max_concurrent_streams_per_connection: 100,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            operations_listen: None,
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
        anyhow::ensure!(
            self.max_in_flight_actions_per_workspace <= self.max_in_flight_actions,
            "ingest.max_in_flight_actions_per_workspace ({}) must be at most max_in_flight_actions ({})",
            self.max_in_flight_actions_per_workspace,
            self.max_in_flight_actions
        );
        anyhow::ensure!(
            self.max_in_flight_actions_per_agent_instance <= self.max_in_flight_actions_per_workspace,
            "ingest.max_in_flight_actions_per_agent_instance ({}) must be at most max_in_flight_actions_per_workspace ({})",
            self.max_in_flight_actions_per_agent_instance,
            self.max_in_flight_actions_per_workspace
        );
        anyhow::ensure!(
            self.max_in_flight_actions_per_agent_instance >= 1,
            "ingest.max_in_flight_actions_per_agent_instance must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_requests_per_agent_instance >= 1
                && self.max_concurrent_requests_per_agent_instance
                    <= self.max_concurrent_requests_per_workspace,
            "ingest.max_concurrent_requests_per_agent_instance ({}) must be at least 1 and at most max_concurrent_requests_per_workspace ({})",
            self.max_concurrent_requests_per_agent_instance,
            self.max_concurrent_requests_per_workspace
        );
        anyhow::ensure!(
            self.rate_burst_seconds >= 1,
            "ingest.rate_burst_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.max_actions_per_second_per_workspace == 0
                || self.max_actions_per_second_per_agent_instance != 0
                    && self.max_actions_per_second_per_agent_instance
                        <= self.max_actions_per_second_per_workspace,
            "ingest.max_actions_per_second_per_agent_instance ({}) must be set and at most max_actions_per_second_per_workspace ({}) when the workspace rate is set",
            self.max_actions_per_second_per_agent_instance,
            self.max_actions_per_second_per_workspace
        );
        anyhow::ensure!(
            self.refusal_delay_ms < self.request_timeout_ms,
            "ingest.refusal_delay_ms ({}) must be less than request_timeout_ms ({})",
            self.refusal_delay_ms,
            self.request_timeout_ms
        );
        anyhow::ensure!(
            self.producer_window_actions >= 1,
            "ingest.producer_window_actions must be at least 1"
        );
        anyhow::ensure!(
            self.header_read_timeout_ms >= 100 && self.idle_timeout_ms >= 100,
            "ingest.header_read_timeout_ms and idle_timeout_ms must be at least 100"
        );
        // A batch may wait up to `produce_timeout_ms` for room in the producer window, then as
        // long again for its acknowledgements.
        let sink_answers_within = 2 * self.produce_timeout_ms + ENQUEUE_ALLOWANCE_MS;
        anyhow::ensure!(
            self.request_timeout_ms > sink_answers_within,
            "ingest.request_timeout_ms ({}) must be more than 2 × produce_timeout_ms + {ENQUEUE_ALLOWANCE_MS} ({sink_answers_within}), so that a request waiting for Kafka is answered by the sink rather than cut",
            self.request_timeout_ms,
        );
        anyhow::ensure!(
            self.max_connections_per_listener >= 1,
            "ingest.max_connections_per_listener must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_streams_per_connection >= 1,
            "ingest.max_concurrent_streams_per_connection must be at least 1"
        );
        anyhow::ensure!(
            self.http2_keepalive_interval_ms >= 1000 && self.http2_keepalive_timeout_ms >= 100,
            "ingest.http2_keepalive_interval_ms must be at least 1000 and http2_keepalive_timeout_ms at least 100"
        );
        let mut listeners = vec![
            ("http_listen", self.http_listen),
            ("otlp_grpc_listen", self.otlp_grpc_listen),
            ("otlp_http_listen", self.otlp_http_listen),
        ];
        if let Some(operations_listen) = self.operations_listen {
            listeners.push(("operations_listen", operations_listen));
        }
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

    #[test]
    fn admission_shares_and_timeouts_are_checked_at_start() {
        let share_above_global = IngestConfig {
            max_in_flight_actions_per_workspace: 200_000,
            ..IngestConfig::default()
        };
        let error = share_above_global.validate().unwrap_err().to_string();
        assert!(
            error.contains("max_in_flight_actions_per_workspace"),
            "{error}"
        );
        let agent_above_workspace = IngestConfig {
            max_in_flight_actions_per_agent_instance: 30_000,
            max_in_flight_actions_per_workspace: 20_000,
            ..IngestConfig::default()
        };
        let error = agent_above_workspace.validate().unwrap_err().to_string();
        assert!(
            error.contains("per_agent_instance (30000) must be at most"),
            "{error}"
        );
        let no_agent_share = IngestConfig {
            max_in_flight_actions_per_agent_instance: 0,
            ..IngestConfig::default()
        };
        let error = no_agent_share.validate().unwrap_err().to_string();
        assert!(error.contains("at least 1"), "{error}");
        let request_shorter_than_produce = IngestConfig {
            request_timeout_ms: 10_500,
            ..IngestConfig::default()
        };
        let error = request_shorter_than_produce
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("request_timeout_ms"), "{error}");
        let operations_on_the_api_port = IngestConfig {
            operations_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..IngestConfig::default()
        };
        let error = operations_on_the_api_port
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("operations_listen"), "{error}");
    }
}
