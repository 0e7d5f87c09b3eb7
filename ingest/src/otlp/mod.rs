//! OTLP trace ingestion: what OpenTelemetry exporters (value-python's among them) send.
//!
//! Layout:
//! * [`mapping`] — span → [`RawAction`]; pure functions, unit-tested (`docs/otlp.md` has the
//!   table).
//! * [`grpc`] — the OTLP/gRPC `TraceService` on `ingest.otlp_grpc_listen` (default 4317).
//! * [`http`] — OTLP/HTTP `POST /v1/traces` (protobuf or JSON, optionally gzip) on
//!   `ingest.otlp_http_listen` (default 4318), an axum router of its own.
//! * [`json`] — OTLP/JSON decoding as protobuf's JSON mapping tells parsers to read it (both
//!   field-name spellings, enum names or numbers, hex ids), into the same prost types.
//! * [`rpc`] — the `google.rpc` messages used to explain errors.
//!
//! Both transports authenticate by the agent secret (`x-agent-secret`, or
//! `Authorization: Bearer`), decode, and hand the request to [`export`], which maps the spans,
//! produces the actions through the same [`ActionSink`] as REST and builds the OTLP answer:
//! full success, or partial success naming the rejected spans. Errors are classified once, in
//! [`ExportError`], and each transport turns them into its own status: the permanent ones
//! (UNAUTHENTICATED/401, PERMISSION_DENIED/403, INVALID_ARGUMENT/400) make exporters drop the
//! batch, the retryable ones (RESOURCE_EXHAUSTED/429, UNAVAILABLE/503) come with a retry delay.
//!
//! [`RawAction`]: agentmeter_schemas::RawAction
//! [`ActionSink`]: crate::sink::ActionSink

pub mod grpc;
pub mod http;
pub mod json;
pub mod mapping;
pub mod rpc;

use std::time::Duration;

use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::auth::{AgentIdentity, AuthError};
use crate::normalize::{now_micros, Limits};
use crate::sink::SinkError;
use crate::state::AppState;
use crate::telemetry::{
    emit, ActionsAccepted, ActionsRejected, AuthenticationFailed, RequestAnswered,
};
use mapping::{map_request, span_count, OtlpSource, RequestError};

/// The OTLP message types (prost, with OTLP/JSON serde), for clients and tests.
pub use opentelemetry_proto::tonic as proto;
/// The protobuf runtime the message types implement, for clients and tests.
pub use prost;

/// How many rejected spans the partial-success message describes.
const REJECTIONS_SHOWN: usize = 5;

/// Why an export request failed as a whole. The message is shown to the exporter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error("{0}. OpenTelemetry exporters send it with OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret=<agent secret>")]
    Unauthenticated(AuthError),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Saturated(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<SinkError> for ExportError {
    fn from(error: SinkError) -> ExportError {
        match error {
            SinkError::Saturated { .. } => ExportError::Saturated(error.to_string()),
            SinkError::Encode { .. } => ExportError::InvalidArgument(error.to_string()),
            SinkError::WindowTimeout { .. } | SinkError::Kafka { .. } => {
                ExportError::Unavailable(error.to_string())
            }
        }
    }
}

impl ExportError {
    /// The OTLP/HTTP status.
    pub fn http_status(&self) -> StatusCode {
        match self {
            ExportError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ExportError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            ExportError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ExportError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ExportError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ExportError::Saturated(_) => StatusCode::TOO_MANY_REQUESTS,
            ExportError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OTLP/gRPC status code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ExportError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            ExportError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            ExportError::InvalidArgument(_)
            | ExportError::PayloadTooLarge(_)
            | ExportError::UnsupportedMediaType(_) => tonic::Code::InvalidArgument,
            ExportError::Saturated(_) => tonic::Code::ResourceExhausted,
            ExportError::Unavailable(_) => tonic::Code::Unavailable,
        }
    }

    /// Whether the exporter should retry, after the configured delay.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ExportError::Saturated(_) | ExportError::Unavailable(_)
        )
    }
}

/// Counts and logs a refused authentication. The log says how to fix it, because the exporter
/// drops the batch without retry and the agent otherwise runs on, unmetered, in silence.
pub(crate) fn auth_failed(source: OtlpSource, error: AuthError) -> ExportError {
    emit(AuthenticationFailed {
        endpoint: source.as_str(),
        reason: error.reason(),
        error: &error,
        otlp: true,
    });
    ExportError::Unauthenticated(error)
}

/// Counts a request by endpoint and status (an HTTP status number, or a gRPC code name).
pub(crate) fn count_request(source: OtlpSource, status: String) {
    emit(RequestAnswered {
        endpoint: source.as_str(),
        status,
    });
}

/// Counts actions (spans) that were not accepted, by reason.
pub(crate) fn count_rejected(reason: &'static str, spans: usize) {
    emit(ActionsRejected {
        reason,
        count: spans,
    });
}

/// The retry delay given to exporters with 429/503, RESOURCE_EXHAUSTED/UNAVAILABLE.
pub(crate) fn retry_delay(state: &AppState) -> Duration {
    Duration::from_secs(state.config.retry_after_seconds)
}

/// Maps and produces the spans of one authenticated request; answers only after Kafka
/// acknowledged every accepted action. Nothing is produced when the request fails as a whole.
pub(crate) async fn export(
    state: &AppState,
    identity: &AgentIdentity,
    request: &ExportTraceServiceRequest,
    source: OtlpSource,
) -> Result<ExportTraceServiceResponse, ExportError> {
    let limits = Limits::from_config(&state.config, now_micros());
    let mapped = map_request(
        request,
        identity,
        &limits,
        state.config.max_spans_per_request,
        source,
    )
    .map_err(|error| {
        count_rejected(error.code(), span_count(request).max(1));
        match error {
            RequestError::TooManySpans { .. } => ExportError::InvalidArgument(error.to_string()),
            RequestError::AgentMismatch { .. } => ExportError::PermissionDenied(error.to_string()),
        }
    })?;
    for rejection in &mapped.rejected {
        count_rejected(rejection.error.code(), 1);
    }
    let error_message = mapped.error_message(REJECTIONS_SHOWN);
    if !mapped.rejected.is_empty() {
        tracing::warn!(
            endpoint = source.as_str(),
            agent_instance = %identity.instance.id,
            rejected = mapped.rejected.len(),
            accepted = mapped.actions.len(),
            "OTLP spans rejected: {error_message}"
        );
    }
    let accepted = mapped.actions.len();
    if accepted > 0 {
        state.sink.publish(&mapped.actions).await.map_err(|error| {
            count_rejected(error.rejection_reason(), accepted);
            ExportError::from(error)
        })?;
        emit(ActionsAccepted {
            source: source.as_str(),
            count: accepted,
        });
    }
    let partial_success = (!mapped.rejected.is_empty()).then(|| ExportTracePartialSuccess {
        rejected_spans: i64::try_from(mapped.rejected.len()).unwrap_or(i64::MAX),
        error_message,
    });
    Ok(ExportTraceServiceResponse { partial_success })
}
