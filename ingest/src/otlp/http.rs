//! OTLP/HTTP: `POST /v1/traces` on `ingest.otlp_http_listen`, an axum router of its own.
//!
//! * Body: `application/x-protobuf` (also `application/protobuf`) or `application/json`
//!   (OTLP/JSON as ProtoJSON parsers read it, with hex ids: [`super::json`]), optionally
//!   `Content-Encoding: gzip`. Both the received and the decompressed body are limited to
//!   `ingest.max_body_bytes` (413 beyond; [`crate::body`]).
//! * Success: 200 with an `ExportTraceServiceResponse` in the request's encoding (with
//!   `partialSuccess` when spans were rejected).
//! * Failure: the status of [`ExportError::http_status`] and a `google.rpc.Status` body in the
//!   request's encoding (JSON when the encoding is unknown); 429 and 503 carry `Retry-After`.

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde_json::json;

use super::json::decode_export_request;
use super::mapping::OtlpSource;
use super::rpc::{RetryInfo, RpcStatus, RETRY_INFO_TYPE_URL};
use super::{auth_failed, count_rejected, count_request, export, retry_delay, ExportError};
use crate::auth::authenticate;
use crate::body::{
    decode_content, read_limited, BodyError, ContentEncoding, BLOCKING_DECODE_BYTES,
};
use crate::state::AppState;
use agentmeter_runtime::shutdown::Shutdown;

/// The OTLP/HTTP traces path.
pub const TRACES_PATH: &str = "/v1/traces";

/// The OTLP/HTTP router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(TRACES_PATH, post(export_traces))
        .with_state(state)
}

/// Serves OTLP/HTTP on `listener` until shutdown; in-flight exports finish first.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listen = listener.local_addr().ok();
    tracing::info!(listen = ?listen, "ingest OTLP/HTTP ready");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.requested().await })
        .await
        .context("OTLP/HTTP server failed")
}

/// The two OTLP/HTTP encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn from_headers(headers: &HeaderMap) -> Result<Encoding, String> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media_type.as_str() {
            "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
            "application/json" => Ok(Encoding::Json),
            _ => Err(format!(
                "Content-Type must be application/x-protobuf or application/json, got {content_type:?}"
            )),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

async fn export_traces(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    // Error bodies use the request's encoding when it is known.
    let encoding = Encoding::from_headers(&headers).unwrap_or(Encoding::Json);
    match handle(&state, &headers, body).await {
        Ok(response) => {
            count_request(OtlpSource::Http, StatusCode::OK.as_u16().to_string());
            let body = match encoding {
                Encoding::Protobuf => response.encode_to_vec(),
                Encoding::Json => json_response(&response),
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, encoding.content_type())],
                body,
            )
                .into_response()
        }
        Err(error) => error_response(&state, encoding, error),
    }
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<ExportTraceServiceResponse, ExportError> {
    let identity = authenticate(&state.metering, headers)
        .map_err(|error| auth_failed(OtlpSource::Http, error))?;
    let encoding = Encoding::from_headers(headers).map_err(ExportError::UnsupportedMediaType)?;
    let limit = state.config.max_body_bytes;
    let content_encoding =
        ContentEncoding::from_headers(headers).map_err(|error| body_refused(error, limit))?;
    let bytes = read_limited(body, headers, limit)
        .await
        .map_err(|error| body_refused(error, limit))?;
    let request = if bytes.len() >= BLOCKING_DECODE_BYTES {
        tokio::task::spawn_blocking(move || decode_body(encoding, content_encoding, bytes, limit))
            .await
            .map_err(|error| ExportError::Unavailable(format!("decoding failed: {error}")))?
    } else {
        decode_body(encoding, content_encoding, bytes, limit)
    }?;
    export(state, &identity, &request, OtlpSource::Http).await
}

/// The answer to a body that could not be read: 413, 415 or 400, counted as rejected.
fn body_refused(error: BodyError, limit: usize) -> ExportError {
    match error {
        BodyError::TooLarge { .. } => {
            count_rejected("body_too_large", 1);
            // Exporters do not retry a 413: the message says what to change.
            ExportError::PayloadTooLarge(format!(
                "{error}; lower the exporter's batch size (OTEL_BSP_MAX_EXPORT_BATCH_SIZE) or raise ingest.max_body_bytes ({limit})"
            ))
        }
        BodyError::UnsupportedEncoding(_) => ExportError::UnsupportedMediaType(error.to_string()),
        BodyError::InvalidGzip(_) => {
            count_rejected("malformed", 1);
            ExportError::InvalidArgument(error.to_string())
        }
    }
}

/// Decompresses (bounded by `limit`) and decodes a request body.
fn decode_body(
    encoding: Encoding,
    content_encoding: ContentEncoding,
    bytes: Bytes,
    limit: usize,
) -> Result<ExportTraceServiceRequest, ExportError> {
    let bytes = decode_content(content_encoding, bytes, limit)
        .map_err(|error| body_refused(error, limit))?;
    let decoded = match encoding {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(bytes)
            .map_err(|error| format!("invalid protobuf ExportTraceServiceRequest: {error}")),
        Encoding::Json => decode_export_request(&bytes).map_err(|error| error.to_string()),
    };
    decoded.map_err(|message| {
        count_rejected("malformed", 1);
        ExportError::InvalidArgument(message)
    })
}

/// OTLP/JSON of the response: `{}` on full success, else `{"partialSuccess": {...}}`.
fn json_response(response: &ExportTraceServiceResponse) -> Vec<u8> {
    let body = match &response.partial_success {
        Some(partial) => json!({
            "partialSuccess": {
                "rejectedSpans": partial.rejected_spans,
                "errorMessage": partial.error_message,
            }
        }),
        None => json!({}),
    };
    body.to_string().into_bytes()
}

/// A `google.rpc.Status` body with the error's HTTP status (and Retry-After when retryable).
fn error_response(state: &AppState, encoding: Encoding, error: ExportError) -> Response {
    let status = error.http_status();
    count_request(OtlpSource::Http, status.as_u16().to_string());
    let code = error.grpc_code() as i32;
    let message = error.to_string();
    let delay = retry_delay(state);
    let body = match encoding {
        Encoding::Protobuf => RpcStatus {
            code,
            message,
            details: if error.is_retryable() {
                vec![RetryInfo::after(delay).to_any()]
            } else {
                Vec::new()
            },
        }
        .encode_to_vec(),
        Encoding::Json => {
            let mut body = json!({ "code": code, "message": message });
            if error.is_retryable() {
                body["details"] = json!([{
                    "@type": RETRY_INFO_TYPE_URL,
                    "retryDelay": format!("{}s", delay.as_secs()),
                }]);
            }
            body.to_string().into_bytes()
        }
    };
    let response = (
        status,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response();
    if error.is_retryable() {
        return state.ask_to_retry(response);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use rdkafka::mocking::MockCluster;

    use tonic::codegen::Service;

    use crate::config::IngestConfig;
    use crate::normalize::now_micros;

    use crate::test_support::{DEMO_SECRET as SECRET, RAW_TOPIC as TOPIC};

    fn state(bootstrap: &str, max_in_flight: usize) -> AppState {
        let config = IngestConfig {
            retry_after_seconds: 3,
            ..IngestConfig::default()
        };
        crate::test_support::demo_state(bootstrap, config, max_in_flight)
    }

    /// An OTLP/JSON body with `count` value.action spans.
    fn body(count: usize) -> String {
        let start = now_micros() * 1000;
        let spans: Vec<serde_json::Value> = (0..count)
            .map(|index| {
                json!({"traceId": "5b8efff798038103d269b633813fc60c",
                       "spanId": format!("{:016x}", index + 1), "name": "value.action",
                       "startTimeUnixNano": start.to_string(),
                       "attributes": [{"key": "value.action.name", "value": {"stringValue": "web_search"}}]})
            })
            .collect();
        json!({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).to_string()
    }

    async fn post(state: AppState, content_type: &str, body: Vec<u8>, gzip: bool) -> Response {
        let mut builder = axum::http::Request::post(TRACES_PATH)
            .header(header::CONTENT_TYPE, content_type)
            .header("x-agent-secret", SECRET);
        if gzip {
            builder = builder.header(header::CONTENT_ENCODING, "gzip");
        }
        let mut service = router(state);
        std::future::poll_fn(|context| {
            <Router as Service<axum::http::Request<Body>>>::poll_ready(&mut service, context)
        })
        .await
        .unwrap();
        service
            .call(builder.body(Body::from(body)).unwrap())
            .await
            .unwrap()
    }

    async fn body_bytes(response: Response) -> Bytes {
        axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn answers_protobuf_in_protobuf_and_backpressure_with_retry_after() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();

        // gzip-compressed protobuf, accepted: an empty ExportTraceServiceResponse.
        let json_request: ExportTraceServiceRequest = serde_json::from_str(&body(2)).unwrap();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&json_request.encode_to_vec()).unwrap();
        let response = post(
            state(&cluster.bootstrap_servers(), 100),
            "application/x-protobuf",
            encoder.finish().unwrap(),
            true,
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/x-protobuf"
        );
        let answer = ExportTraceServiceResponse::decode(body_bytes(response).await).unwrap();
        assert_eq!(answer.partial_success, None);

        // Three spans, one action may be in flight: 429 with Retry-After and a RetryInfo.
        let response = post(
            state(&cluster.bootstrap_servers(), 1),
            "application/json",
            body(3).into_bytes(),
            false,
        )
        .await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let status: serde_json::Value =
            serde_json::from_slice(&body_bytes(response).await).unwrap();
        assert_eq!(status["code"], 8, "{status}");
        assert!(status["message"].as_str().unwrap().contains("saturated"));
        assert_eq!(status["details"][0]["retryDelay"], "3s");

        // The broker is down: 503 with Retry-After; in protobuf, a google.rpc.Status.
        let down = state(&cluster.bootstrap_servers(), 100);
        cluster.broker_down(1).unwrap();
        let response = post(
            down,
            "application/x-protobuf",
            json_request.encode_to_vec(),
            false,
        )
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let status = RpcStatus::decode(body_bytes(response).await).unwrap();
        assert_eq!(status.code, tonic::Code::Unavailable as i32);
        assert!(
            status.message.contains("Kafka did not acknowledge"),
            "{}",
            status.message
        );
        assert_eq!(status.details.len(), 1);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_with_a_status_that_says_what_to_change() {
        let cluster = MockCluster::new(1).unwrap();
        let limit = IngestConfig::default().max_body_bytes;
        let response = post(
            state(&cluster.bootstrap_servers(), 100),
            "application/json",
            vec![b' '; limit + 1],
            false,
        )
        .await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let status: serde_json::Value =
            serde_json::from_slice(&body_bytes(response).await).unwrap();
        assert_eq!(
            status["code"],
            tonic::Code::InvalidArgument as i32,
            "{status}"
        );
        let message = status["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "the request body is larger than {limit} bytes; lower the exporter's batch size"
            )),
            "{message}"
        );
    }

    #[test]
    fn reads_the_encoding_from_the_content_type() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(Encoding::from_headers(&headers), Ok(Encoding::Json));
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-protobuf".parse().unwrap(),
        );
        assert_eq!(Encoding::from_headers(&headers), Ok(Encoding::Protobuf));
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(Encoding::from_headers(&headers)
            .unwrap_err()
            .contains("text/plain"));
    }

    #[test]
    fn a_body_too_large_once_decompressed_is_payload_too_large() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&vec![b' '; 10_000]).unwrap();
        let compressed = Bytes::from(encoder.finish().unwrap());
        let decoded = decode_body(
            Encoding::Json,
            ContentEncoding::Gzip,
            compressed.clone(),
            10_000,
        );
        assert!(
            matches!(decoded, Err(ExportError::InvalidArgument(_))),
            "{decoded:?}"
        );
        let refused = decode_body(Encoding::Json, ContentEncoding::Gzip, compressed, 9_999);
        assert!(
            matches!(&refused, Err(ExportError::PayloadTooLarge(message)) if message.contains("decompressed request body is larger than 9999 bytes")),
            "{refused:?}"
        );
        assert_eq!(
            refused.unwrap_err().http_status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(matches!(
            decode_body(Encoding::Json, ContentEncoding::Gzip, Bytes::from_static(b"not gzip"), 100),
            Err(ExportError::InvalidArgument(message)) if message.contains("invalid gzip body")
        ));
    }

    #[test]
    fn decodes_otlp_json_with_hex_ids_and_string_integers() {
        let body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"agent"}}]},
            "scopeSpans":[{"scope":{"name":"manual"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","name":"chat gpt-4o","kind":3,"startTimeUnixNano":"1765815103000000000",
            "endTimeUnixNano":1765815104000000000,"attributes":[
              {"key":"gen_ai.usage.input_tokens","value":{"intValue":"12"}},
              {"key":"gen_ai.usage.output_tokens","value":{"intValue":7}},
              {"key":"ratio","value":{"doubleValue":0.5}}],
            "status":{"code":1},"unknownField":true}]}]}]}"#;
        let request = decode_body(
            Encoding::Json,
            ContentEncoding::Identity,
            Bytes::from(body),
            1 << 20,
        )
        .unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            hex::encode(&span.trace_id),
            "5b8efff798038103d269b633813fc60c"
        );
        assert_eq!(span.start_time_unix_nano, 1_765_815_103_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_765_815_104_000_000_000);
        assert_eq!(span.attributes.len(), 3);
        assert!(matches!(
            decode_body(Encoding::Json, ContentEncoding::Identity, Bytes::from("{\"resourceSpans\": 1}"), 1 << 20),
            Err(ExportError::InvalidArgument(message)) if message.contains("OTLP/JSON")
        ));
        assert!(matches!(
            decode_body(Encoding::Protobuf, ContentEncoding::Identity, Bytes::from_static(b"\xff\xff\xff"), 1 << 20),
            Err(ExportError::InvalidArgument(message)) if message.contains("protobuf")
        ));
    }
}
