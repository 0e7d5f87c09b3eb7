//! Ingest's telemetry as events (Vector's `internal_events`): one type per event, which counts
//! it with fixed label names and logs it where a log line helps. REST and both OTLP receivers
//! emit the same events, so a request is counted the same way whichever door it came through.

use std::time::Duration;

pub use agentmeter_runtime::telemetry::{emit, InternalEvent};

/// A request was answered. `endpoint`: `rest_actions`, `rest_outcomes`, `agent_instance_info`,
/// `otlp_grpc`, `otlp_http`;
/// `status`: the HTTP status number, or the gRPC code name.
pub struct RequestAnswered {
    pub endpoint: &'static str,
    pub status: String,
}

impl InternalEvent for RequestAnswered {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_requests_total", "endpoint" => self.endpoint, "status" => self.status)
            .increment(1);
    }
}

/// Actions were acknowledged by Kafka. `source`: `rest`, `otlp_grpc`, `otlp_http`.
pub struct ActionsAccepted {
    pub source: &'static str,
    pub count: usize,
}

impl InternalEvent for ActionsAccepted {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_actions_accepted_total", "source" => self.source)
            .increment(self.count as u64);
    }
}

/// Actions were not accepted, by reason.
pub struct ActionsRejected {
    pub reason: &'static str,
    pub count: usize,
}

impl InternalEvent for ActionsRejected {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_actions_rejected_total", "reason" => self.reason)
            .increment(self.count as u64);
    }
}

/// A request's agent secret was missing or refused. On OTLP the log says how to fix it, because
/// the exporter drops the batch without retry and the agent otherwise runs on, unmetered, in
/// silence.
pub struct AuthenticationFailed<'a> {
    pub endpoint: &'static str,
    pub reason: &'static str,
    pub error: &'a dyn std::fmt::Display,
    pub otlp: bool,
}

impl InternalEvent for AuthenticationFailed<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_auth_failures_total", "reason" => self.reason)
            .increment(1);
        if self.otlp {
            tracing::warn!(
                endpoint = self.endpoint,
                reason = self.reason,
                "OTLP export refused: {}; the exporter drops these spans and the agent is not metered. \
                 Fix: set OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret=<agent secret> in the agent's environment",
                self.error
            );
        } else {
            tracing::debug!(
                endpoint = self.endpoint,
                reason = self.reason,
                "request refused: {}",
                self.error
            );
        }
    }
}

/// A request was refused because a budget was short (`scope`: `global`, `workspace`,
/// `agent_instance`, `workspace_requests`, `agent_instance_requests`).
pub struct AdmissionRefused {
    pub scope: &'static str,
}

impl InternalEvent for AdmissionRefused {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_admission_refused_total", "scope" => self.scope)
            .increment(1);
    }
}

/// Actions handed to the producer and not yet acknowledged.
pub struct InFlightActions {
    pub count: usize,
}

impl InternalEvent for InFlightActions {
    fn emit(self) {
        metrics::gauge!("agentmeter_ingest_in_flight_actions").set(self.count as f64);
    }
}

/// Actions admitted and waiting for room in the producer window (`ingest::producer_window`).
pub struct WindowWaiting {
    pub actions: usize,
}

impl InternalEvent for WindowWaiting {
    fn emit(self) {
        metrics::gauge!("agentmeter_ingest_window_waiting_actions").set(self.actions as f64);
    }
}

/// A batch was produced (acknowledged or failed) after `elapsed`.
pub struct BatchProduced {
    pub elapsed: Duration,
}

impl InternalEvent for BatchProduced {
    fn emit(self) {
        metrics::histogram!("agentmeter_ingest_produce_seconds").record(self.elapsed.as_secs_f64());
    }
}

/// A listener accepted a connection (`listener`: `rest`, `otlp_grpc`, `otlp_http`,
/// `operations`).
pub struct ConnectionAccepted {
    pub listener: &'static str,
}

impl InternalEvent for ConnectionAccepted {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_connections_accepted_total", "listener" => self.listener)
            .increment(1);
        metrics::gauge!("agentmeter_ingest_connections_open", "listener" => self.listener)
            .increment(1.0);
    }
}

/// An accepted connection ended, however.
pub struct ConnectionEnded {
    pub listener: &'static str,
}

impl InternalEvent for ConnectionEnded {
    fn emit(self) {
        metrics::gauge!("agentmeter_ingest_connections_open", "listener" => self.listener)
            .decrement(1.0);
    }
}

/// A connection was closed at once: the listener was at `max_connections_per_listener`.
pub struct ConnectionRefused {
    pub listener: &'static str,
}

impl InternalEvent for ConnectionRefused {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_connections_refused_total", "listener" => self.listener)
            .increment(1);
    }
}

/// Ingest closed a connection itself (`reason`: `header_timeout`, `idle`, `shutdown_overdue`).
pub struct ConnectionClosed {
    pub listener: &'static str,
    pub reason: &'static str,
}

impl InternalEvent for ConnectionClosed {
    fn emit(self) {
        metrics::counter!("agentmeter_ingest_connections_closed_total", "listener" => self.listener, "reason" => self.reason)
            .increment(1);
    }
}
