//! The REST API of ingest: `POST /v1/actions`, `POST /v1/outcomes` (explicit outcome events: the
//! same batches, limits, idempotency and answers, docs/events.md) and
//! `GET /api/v1/agent_instance/info`, with the operations routes (`/metrics`, `/healthz`,
//! `/readyz`), early admission and the request timeout. The process's wiring (`run`) is in
//! `lib.rs`.
//!
//! Every listener is served by [`crate::connections::serve`] (connection limit, header-read,
//! first-request and idle deadlines); the axum routers also carry a request timeout
//! (`ingest.request_timeout_ms`, 408). With `ingest.operations_listen` set, `/metrics`,
//! `/healthz` and `/readyz` move from the public API listener to that address.

use std::time::Duration;

use agentmeter_runtime::observability::operations_router;
use agentmeter_schemas::rest::{RestAccepted, RestActionBatch, RestOutcomeBatch};
use agentmeter_schemas::RawAction;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{authenticate, AuthError};
use crate::body::{
    decode_content, read_limited, BodyError, ContentEncoding, MediaType, BLOCKING_DECODE_BYTES,
};
use crate::config::IngestConfig;
use crate::normalize::{now_micros, rest_action_to_raw, rest_outcome_to_raw, Limits};
use crate::sink::SinkError;
use crate::telemetry::{
    emit, ActionsAccepted, ActionsRejected, AdmissionRefused, AuthenticationFailed, RequestAnswered,
};

pub use crate::state::AppState;

/// The HTTP API of ingest with the operations routes (`/metrics`, `/healthz`, `/readyz`).
pub fn router(
    state: AppState,
    readiness: agentmeter_runtime::observability::ReadinessCheck,
) -> Router {
    api_router(state).merge(operations_router(readiness))
}

/// The HTTP API of ingest alone: `POST /v1/actions`, `POST /v1/outcomes`,
/// `GET /api/v1/agent_instance/info`.
pub fn api_router(state: AppState) -> Router {
    Router::new()
        .route(ACTIONS.path, post(post_actions))
        .route(OUTCOMES.path, post(post_outcomes))
        .route("/api/v1/agent_instance/info", get(agent_instance_info))
        .with_state(state)
}

/// `router` with the early admission check (see [`refuse_early`]).
pub(crate) fn with_early_admission(router: Router, state: &AppState) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        refuse_early,
    ))
}

/// Counts an authenticated request as in progress for its agent instance and workspace until it
/// is answered, and refuses it with 429 before its body is read when too many of theirs are in
/// progress or their share of in-flight actions is full (`admission::Admission::begin_request`).
/// Unauthenticated requests pass through: the handler answers them 401.
async fn refuse_early(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(identity) = authenticate(&state.metering, request.headers()) else {
        return next.run(request).await;
    };
    let sink = state.sink.clone();
    let in_progress = sink.admission().begin_request(
        &identity.workspace.config.workspace.id,
        &identity.instance.id,
    );
    match in_progress {
        Ok(in_progress) => {
            let response = next.run(request).await;
            drop(in_progress);
            response
        }
        Err(refusal) => {
            emit(AdmissionRefused {
                scope: refusal.metric_scope(),
            });
            let response = early_refusal_response(&state, &request, &refusal);
            // The body is received and dropped unparsed: answering with it unread would make
            // hyper close the connection while the client is still sending, and the client
            // would see a broken connection instead of the 429 and its Retry-After.
            discard_body(request.into_body(), state.config.max_body_bytes).await;
            delay_refusal(&state.config).await;
            response
        }
    }
}

/// Waits `refusal_delay_ms` before an early refusal is answered: a client that ignores
/// Retry-After then makes one attempt per delay per connection, not thousands per second.
pub(crate) async fn delay_refusal(config: &crate::config::IngestConfig) {
    if config.refusal_delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(config.refusal_delay_ms)).await;
    }
}

/// Reads and drops at most `limit` bytes of `body` (beyond it the connection is closed).
async fn discard_body(body: Body, limit: usize) {
    use futures::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        received += chunk.len();
        if received > limit {
            return;
        }
    }
}

/// 429 with Retry-After; on OTLP/HTTP a `google.rpc.Status` with a `RetryInfo` in the request's
/// encoding, elsewhere the REST error JSON.
fn early_refusal_response(
    state: &AppState,
    request: &axum::extract::Request,
    refusal: &crate::admission::EarlyRefusal,
) -> Response {
    use crate::otlp::rpc::{RetryInfo, RpcStatus, RETRY_INFO_TYPE_URL};
    use prost::Message as _;
    let message = refusal.to_string();
    let delay = Duration::from_secs(state.config.retry_after_seconds);
    let response = if request.uri().path() == crate::otlp::http::TRACES_PATH {
        count_request("otlp_http", StatusCode::TOO_MANY_REQUESTS);
        let protobuf = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.contains("protobuf"));
        let code = tonic::Code::ResourceExhausted as i32;
        if protobuf {
            let body = RpcStatus {
                code,
                message,
                details: vec![RetryInfo::after(delay).to_any()],
            }
            .encode_to_vec();
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                body,
            )
                .into_response()
        } else {
            let body = json!({"code": code, "message": message, "details": [{
                "@type": RETRY_INFO_TYPE_URL, "retryDelay": format!("{}s", delay.as_secs())}]});
            (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
        }
    } else {
        let endpoint = if request.uri().path() == OUTCOMES.path {
            OUTCOMES.endpoint
        } else {
            ACTIONS.endpoint
        };
        error_response(endpoint, StatusCode::TOO_MANY_REQUESTS, message, json!({}))
    };
    state.ask_to_retry(response)
}

/// `router` with the request timeout: a request not answered within it gets 408.
pub(crate) fn with_request_timeout(router: Router, config: &IngestConfig) -> Router {
    router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_millis(config.request_timeout_ms),
    ))
}

/// An error answer: JSON `{"error": ...}` plus optional details, counted by endpoint and status.
fn error_response(
    endpoint: &'static str,
    status: StatusCode,
    message: String,
    details: serde_json::Value,
) -> Response {
    count_request(endpoint, status);
    let mut body = json!({ "error": message });
    if let (Some(body), serde_json::Value::Object(details)) = (body.as_object_mut(), details) {
        body.extend(details);
    }
    (status, Json(body)).into_response()
}

fn count_request(endpoint: &'static str, status: StatusCode) {
    emit(RequestAnswered {
        endpoint,
        status: status.as_u16().to_string(),
    });
}

fn count_rejected(reason: &'static str, actions: usize) {
    emit(ActionsRejected {
        reason,
        count: actions,
    });
}

fn auth_error(endpoint: &'static str, error: AuthError) -> Response {
    emit(AuthenticationFailed {
        endpoint,
        reason: error.reason(),
        error: &error,
        otlp: false,
    });
    error_response(
        endpoint,
        StatusCode::UNAUTHORIZED,
        error.to_string(),
        json!({}),
    )
}

/// `GET /api/v1/agent_instance/info` — what value-python's `initialize_sync` reads.
async fn agent_instance_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    const ENDPOINT: &str = "agent_instance_info";
    let identity = match authenticate(&state.metering, &headers) {
        Ok(identity) => identity,
        Err(error) => return auth_error(ENDPOINT, error),
    };
    let config = &identity.workspace.config;
    let account = config
        .accounts
        .iter()
        .find(|account| account.id == identity.instance.account);
    count_request(ENDPOINT, StatusCode::OK);
    Json(json!({
        "id": identity.instance.id,
        "name": identity.instance.name,
        "description": identity.instance.description,
        "agent_type_id": identity.instance.agent_type,
        "organization_id": config.workspace.id,
        "workspace_id": config.workspace.id,
        "account_id": identity.instance.account,
        "account": account.map(|account| json!({"id": account.id, "name": account.name, "external_id": account.external_id})),
        "contact_id": identity.instance.contact,
    }))
    .into_response()
}

/// One of the two JSON batch endpoints: how it is counted and named in its answers.
struct BatchEndpoint {
    path: &'static str,
    /// The `endpoint` label of `agentmeter_ingest_requests_total`.
    endpoint: &'static str,
    /// What the batch holds, plural: `actions`, `outcomes`.
    items: &'static str,
    /// The shape of a body, for the message of one that is no valid JSON batch.
    example: &'static str,
}

const ACTIONS: BatchEndpoint = BatchEndpoint {
    path: "/v1/actions",
    endpoint: "rest_actions",
    items: "actions",
    example: r#"{"actions": [{"action_name": ...}]}"#,
};

const OUTCOMES: BatchEndpoint = BatchEndpoint {
    path: "/v1/outcomes",
    endpoint: "rest_outcomes",
    items: "outcomes",
    example: r#"{"outcomes": [{"outcome_type": ..., "value": ...}]}"#,
};

/// The body of `POST /v1/actions` and `POST /v1/outcomes`: `Content-Type: application/json`
/// (415 otherwise, also when absent; a `charset` must be UTF-8), `Content-Encoding` gzip or none
/// (415 otherwise), at most `ingest.max_body_bytes` as received and once decompressed (413).
async fn read_rest_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    endpoint: &'static str,
) -> Result<bytes::Bytes, Response> {
    let unsupported = |message: String| {
        count_rejected("unsupported_media_type", 1);
        error_response(
            endpoint,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message,
            json!({}),
        )
    };
    match MediaType::from_headers(headers) {
        None => {
            return Err(unsupported(
                "Content-Type is missing; send Content-Type: application/json".to_string(),
            ))
        }
        Some(media_type) if media_type.essence != "application/json" => {
            return Err(unsupported(format!(
                "Content-Type must be application/json, got {:?}",
                media_type.essence
            )))
        }
        Some(MediaType {
            charset: Some(charset),
            ..
        }) if charset != "utf-8" => {
            return Err(unsupported(format!(
                "Content-Type application/json must be UTF-8 (charset=utf-8 or none), got charset={charset:?}"
            )))
        }
        Some(_) => {}
    }
    let limit = state.config.max_body_bytes;
    let body_refused = |error: BodyError| match error {
        BodyError::TooLarge { .. } => {
            count_rejected("body_too_large", 1);
            error_response(
                endpoint,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{error}; send smaller batches"),
                json!({}),
            )
        }
        BodyError::UnsupportedEncoding(_) => unsupported(error.to_string()),
        BodyError::InvalidGzip(_) => {
            count_rejected("malformed", 1);
            error_response(
                endpoint,
                StatusCode::BAD_REQUEST,
                error.to_string(),
                json!({}),
            )
        }
    };
    let content_encoding = ContentEncoding::from_headers(headers).map_err(body_refused)?;
    let received = read_limited(body, headers, limit)
        .await
        .map_err(body_refused)?;
    let decoded =
        if content_encoding == ContentEncoding::Gzip && received.len() >= BLOCKING_DECODE_BYTES {
            tokio::task::spawn_blocking(move || decode_content(content_encoding, received, limit))
                .await
                .unwrap_or_else(|error| {
                    Err(BodyError::InvalidGzip(format!(
                        "decompression failed: {error}"
                    )))
                })
        } else {
            decode_content(content_encoding, received, limit)
        };
    decoded.map_err(body_refused)
}

/// `POST /v1/actions` — a JSON batch, accepted whole (202) or rejected whole.
async fn post_actions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (identity, bytes) = match receive_batch(&state, &headers, body, &ACTIONS).await {
        Ok(received) => received,
        Err(response) => return response,
    };
    let batch: RestActionBatch = match parse_batch(&bytes, &ACTIONS) {
        Ok(batch) => batch,
        Err(response) => return *response,
    };
    if let Some(response) = batch_size_refusal(&state, batch.actions.len(), &ACTIONS) {
        return response;
    }
    let limits = Limits::from_config(&state.config, now_micros());
    let items = batch
        .actions
        .into_iter()
        .map(|item| rest_action_to_raw(item, &identity, &limits, "rest"));
    publish_batch(&state, &ACTIONS, items).await
}

/// `POST /v1/outcomes` — a JSON batch of explicit outcome events, each a raw action of kind
/// `outcome`: the same authentication, limits, admission, idempotency by `event_id` and answers
/// as `POST /v1/actions`, accepted whole (202) or rejected whole.
async fn post_outcomes(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (identity, bytes) = match receive_batch(&state, &headers, body, &OUTCOMES).await {
        Ok(received) => received,
        Err(response) => return response,
    };
    let batch: RestOutcomeBatch = match parse_batch(&bytes, &OUTCOMES) {
        Ok(batch) => batch,
        Err(response) => return *response,
    };
    if let Some(response) = batch_size_refusal(&state, batch.outcomes.len(), &OUTCOMES) {
        return response;
    }
    let limits = Limits::from_config(&state.config, now_micros());
    let items = batch
        .outcomes
        .into_iter()
        .map(|item| rest_outcome_to_raw(item, &identity, &limits, "rest"));
    publish_batch(&state, &OUTCOMES, items).await
}

/// The authenticated agent and the body of a batch request (401, 413, 415 or 400 otherwise).
async fn receive_batch(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    batch: &BatchEndpoint,
) -> Result<(crate::auth::AgentIdentity, bytes::Bytes), Response> {
    let identity = authenticate(&state.metering, headers)
        .map_err(|error| auth_error(batch.endpoint, error))?;
    let bytes = read_rest_body(state, headers, body, batch.endpoint).await?;
    Ok((identity, bytes))
}

/// The JSON batch, or a 400 saying why the body is none.
fn parse_batch<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    batch: &BatchEndpoint,
) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|error| {
        count_rejected("malformed", 1);
        Box::new(error_response(
            batch.endpoint,
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {error} (expected {})", batch.example),
            json!({}),
        ))
    })
}

/// A 400 unless the batch holds 1 to `ingest.max_batch_actions` items.
fn batch_size_refusal(state: &AppState, total: usize, batch: &BatchEndpoint) -> Option<Response> {
    if total == 0 || total > state.config.max_batch_actions {
        count_rejected("batch_size", total.max(1));
        return Some(error_response(
            batch.endpoint,
            StatusCode::BAD_REQUEST,
            format!(
                "a batch holds 1 to {} {}; this one has {total}",
                state.config.max_batch_actions, batch.items
            ),
            json!({}),
        ));
    }
    None
}

/// Publishes the validated items of a batch, all or none: a 400 listing every invalid item by
/// index when any is invalid (nothing produced), else 202 once Kafka acknowledged every record.
async fn publish_batch(
    state: &AppState,
    batch: &BatchEndpoint,
    items: impl ExactSizeIterator<Item = Result<RawAction, String>>,
) -> Response {
    let total = items.len();
    let mut actions = Vec::with_capacity(total);
    let mut item_errors = Vec::new();
    for (index, item) in items.enumerate() {
        match item {
            Ok(action) => actions.push(action),
            Err(error) => item_errors.push(json!({"index": index, "error": error})),
        }
    }
    if !item_errors.is_empty() {
        count_rejected("invalid", total);
        return error_response(
            batch.endpoint,
            StatusCode::BAD_REQUEST,
            format!(
                "{} of {total} {} are invalid; nothing was accepted",
                item_errors.len(),
                batch.items
            ),
            json!({ "items": item_errors }),
        );
    }
    let event_ids: Vec<String> = actions
        .iter()
        .map(|action| action.event_id.clone())
        .collect();
    match state.sink.publish(&actions).await {
        Ok(()) => {
            count_request(batch.endpoint, StatusCode::ACCEPTED);
            emit(ActionsAccepted {
                source: "rest",
                count: total,
            });
            (
                StatusCode::ACCEPTED,
                Json(RestAccepted {
                    accepted: total,
                    event_ids,
                }),
            )
                .into_response()
        }
        Err(error) => {
            count_rejected(error.rejection_reason(), total);
            // Kafka may have some of them: the client re-sends these ids (counted once).
            let details = match error {
                SinkError::Kafka { .. } => json!({ "event_ids": event_ids }),
                _ => json!({}),
            };
            let response = error_response(
                batch.endpoint,
                error.http_status(),
                error.to_string(),
                details,
            );
            if error.is_retryable() {
                return state.ask_to_retry(response);
            }
            response
        }
    }
}

#[cfg(test)]
mod rest_body_tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    use rdkafka::mocking::MockCluster;

    use tonic::codegen::Service;

    use crate::test_support::{DEMO_SECRET as SECRET, RAW_TOPIC as TOPIC};
    const BATCH: &str = r#"{"actions": [{"action_name": "web_search"}]}"#;

    fn state(bootstrap: &str, max_body_bytes: usize) -> AppState {
        let config = IngestConfig {
            max_body_bytes,
            ..IngestConfig::default()
        };
        crate::test_support::demo_state(bootstrap, config, 100)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Posts to `/v1/actions` with the given headers (the secret is added) and returns the
    /// status and the JSON answer.
    async fn post(
        state: AppState,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, serde_json::Value) {
        post_to("/v1/actions", state, headers, body).await
    }

    /// Posts to `path` with the given headers (the secret is added).
    async fn post_to(
        path: &str,
        state: AppState,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, serde_json::Value) {
        send(path, Some(SECRET), state, headers, body).await
    }

    /// Posts to `path` with the given headers and secret, if any.
    async fn send(
        path: &str,
        secret: Option<&str>,
        state: AppState,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, serde_json::Value) {
        let mut builder = axum::http::Request::post(path);
        if let Some(secret) = secret {
            builder = builder.header("x-agent-secret", secret);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut service = router(state, Arc::new(|| Ok(())));
        std::future::poll_fn(|context| {
            <Router as Service<axum::http::Request<Body>>>::poll_ready(&mut service, context)
        })
        .await
        .unwrap();
        let response = service
            .call(builder.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    const JSON: [(&str, &str); 1] = [("content-type", "application/json")];

    #[tokio::test]
    async fn accepts_a_batch_of_outcome_events_whole() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let body = serde_json::json!({"outcomes": [
            {"event_id": "o-1", "outcome_type": "lead_converted", "value": "1250.50",
             "user_id": "u1", "metadata": {"lead_id": "L-1"}},
            {"event_id": "o-2", "outcome_type": "ticket_resolved"},
        ]});
        let (status, answer) = post_to(
            "/v1/outcomes",
            state(&cluster.bootstrap_servers(), 1 << 20),
            &JSON,
            body.to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(answer["accepted"], 2);
        assert_eq!(answer["event_ids"], serde_json::json!(["o-1", "o-2"]));
    }

    #[tokio::test]
    async fn refuses_a_batch_with_any_bad_outcome_event_whole_naming_index_and_field() {
        let cluster = MockCluster::new(1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let many: serde_json::Map<String, serde_json::Value> = (0..129)
            .map(|index| (format!("k{index}"), serde_json::json!(index)))
            .collect();
        let body = serde_json::json!({"outcomes": [
            {"outcome_type": "lead_converted", "value": 3},
            {"outcome_type": "lead_converted", "value": -3},
            {"outcome_type": "lead_converted", "value": "a lot"},
            {"outcome_type": "lead_converted", "metadata": many},
        ]});
        let (status, answer) = post_to(
            "/v1/outcomes",
            state(&bootstrap, 1 << 20),
            &JSON,
            body.to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(
            answer["error"],
            "3 of 4 outcomes are invalid; nothing was accepted"
        );
        let items = answer["items"].as_array().unwrap();
        let indexes: Vec<u64> = items.iter().map(|i| i["index"].as_u64().unwrap()).collect();
        assert_eq!(indexes, [1, 2, 3]);
        assert!(items[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("value -3 is negative"));
        assert!(items[1]["error"]
            .as_str()
            .unwrap()
            .starts_with(r#"value "a lot" is not a decimal number"#));
        assert_eq!(
            items[2]["error"],
            "129 metadata keys; at most 128 are accepted"
        );

        // The body's shape, the batch size and unknown fields are refused as for actions.
        for (body, expected) in [
            (
                r#"{"outcomes": []}"#.to_string(),
                "a batch holds 1 to 1000 outcomes; this one has 0",
            ),
            (
                r#"{"actions": [{"action_name": "a"}]}"#.to_string(),
                "invalid JSON body: unknown field `actions`",
            ),
            (
                r#"{"outcomes": [{"outcome_type": "o", "account_id": "acc_globex"}]}"#.to_string(),
                "invalid JSON body: unknown field `account_id`",
            ),
        ] {
            let (status, answer) = post_to(
                "/v1/outcomes",
                state(&bootstrap, 1 << 20),
                &JSON,
                body.into_bytes(),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            assert!(
                answer["error"].as_str().unwrap().starts_with(expected),
                "{answer}"
            );
        }
        // Same media type rules and authentication.
        let (status, _) = post_to(
            "/v1/outcomes",
            state(&bootstrap, 1 << 20),
            &[],
            br#"{"outcomes": [{"outcome_type": "o"}]}"#.to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let (status, answer) = send(
            "/v1/outcomes",
            None,
            state(&bootstrap, 1 << 20),
            &JSON,
            br#"{"outcomes": [{"outcome_type": "o"}]}"#.to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    }

    #[tokio::test]
    async fn refuses_a_missing_or_other_media_type_with_415() {
        let cluster = MockCluster::new(1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let cases = [
            (None, "Content-Type is missing; send Content-Type: application/json"),
            (
                Some("text/plain"),
                "Content-Type must be application/json, got \"text/plain\"",
            ),
            (
                Some("application/jsonl"),
                "Content-Type must be application/json, got \"application/jsonl\"",
            ),
            (
                Some("application/json-patch+json"),
                "Content-Type must be application/json, got \"application/json-patch+json\"",
            ),
            (
                Some("application/json; charset=latin1"),
                "Content-Type application/json must be UTF-8 (charset=utf-8 or none), got charset=\"latin1\"",
            ),
        ];
        for (content_type, message) in cases {
            let headers: Vec<(&str, &str)> = content_type
                .map(|value| ("content-type", value))
                .into_iter()
                .collect();
            let (status, answer) = post(state(&bootstrap, 1 << 20), &headers, BATCH.into()).await;
            assert_eq!(
                status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{content_type:?}"
            );
            assert_eq!(answer["error"], message, "{content_type:?}");
        }
    }

    #[tokio::test]
    async fn refuses_an_unknown_content_encoding_with_415() {
        let cluster = MockCluster::new(1).unwrap();
        for encoding in ["br", "deflate", "zstd"] {
            let (status, answer) = post(
                state(&cluster.bootstrap_servers(), 1 << 20),
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", encoding),
                ],
                BATCH.into(),
            )
            .await;
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{encoding}");
            assert_eq!(
                answer["error"],
                format!("Content-Encoding \"{encoding}\" is not supported; send gzip or no Content-Encoding")
            );
        }
    }

    #[tokio::test]
    async fn accepts_json_with_parameters_and_gzip_bodies() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        for (content_type, encoding, body) in [
            (
                "Application/JSON; charset=UTF-8",
                None,
                BATCH.as_bytes().to_vec(),
            ),
            ("application/json", Some("gzip"), gzip(BATCH.as_bytes())),
            ("application/json", Some("GZIP"), gzip(BATCH.as_bytes())),
        ] {
            let mut headers = vec![("content-type", content_type)];
            headers.extend(encoding.map(|encoding| ("content-encoding", encoding)));
            let (status, answer) =
                post(state(&cluster.bootstrap_servers(), 1 << 20), &headers, body).await;
            assert_eq!(
                status,
                StatusCode::ACCEPTED,
                "{content_type} {encoding:?}: {answer}"
            );
            assert_eq!(answer["accepted"], 1);
        }
    }

    #[tokio::test]
    async fn a_gzip_bomb_or_a_large_body_is_413_and_bad_gzip_is_400() {
        let cluster = MockCluster::new(1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        // A valid batch padded with 1 MiB of spaces: 1 KiB compressed, far over a 64 KiB limit.
        let padded = format!("{BATCH}{}", " ".repeat(1 << 20));
        let bomb = gzip(padded.as_bytes());
        assert!(bomb.len() < 4096, "{}", bomb.len());
        let json_gzip = [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ];
        let (status, answer) = post(state(&bootstrap, 64 * 1024), &json_gzip, bomb).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        assert_eq!(
            answer["error"],
            "decompressed request body is larger than 65536 bytes; send smaller batches"
        );
        let (status, answer) = post(
            state(&bootstrap, 64 * 1024),
            &[("content-type", "application/json")],
            padded.into_bytes(),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        assert_eq!(
            answer["error"],
            "the request body is larger than 65536 bytes; send smaller batches"
        );
        let (status, answer) = post(state(&bootstrap, 64 * 1024), &json_gzip, BATCH.into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid gzip body"));
    }
}

#[cfg(test)]
mod early_refusal_tests {
    //! The early refusal (before the body is read) on the HTTP listeners.

    use prost::Message as _;
    use rdkafka::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::admission::AdmissionLimits;
    use crate::connections::{self, ListenerLimits};
    use crate::otlp::rpc::{RpcStatus, RETRY_INFO_TYPE_URL};
    use crate::sink::ActionSink;
    use agentmeter_runtime::shutdown::Shutdown;
    use rdkafka::producer::FutureProducer;
    use std::sync::Arc;

    use crate::test_support::{demo_metering, DEMO_SECRET as ACME_SECRET};

    /// State whose Acme agent may have 1 request in progress and 10 actions in flight; no
    /// broker is needed: nothing here reaches the producer.
    fn state() -> AppState {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        AppState {
            config: Arc::new(IngestConfig::default()),
            metering: demo_metering(),
            sink: Arc::new(ActionSink::with_admission(
                producer,
                "unused".to_string(),
                AdmissionLimits {
                    global: 100,
                    per_workspace: 100,
                    per_agent_instance: 10,
                    requests_per_workspace: 8,
                    requests_per_agent_instance: 1,
                    rate_per_workspace: None,
                    rate_per_agent_instance: None,
                },
            )),
        }
    }

    /// One HTTP/1.1 request on a fresh connection; the whole answer.
    async fn exchange(address: std::net::SocketAddr, head: &str, body: &[u8]) -> Vec<u8> {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!(
            "{head}\r\nhost: ingest\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("no answer")
            .unwrap();
        answer
    }

    fn split(answer: &[u8]) -> (String, Vec<u8>) {
        let end = answer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("a complete head");
        (
            String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase(),
            answer[end + 4..].to_vec(),
        )
    }

    #[tokio::test]
    async fn a_request_beyond_its_agents_budget_is_refused_before_its_body_is_read() {
        let state = state();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_trigger, shutdown) = Shutdown::new();
        let router = with_early_admission(api_router(state.clone()), &state).merge(
            with_early_admission(crate::otlp::http::router(state.clone()), &state),
        );
        tokio::spawn(connections::serve(
            "test",
            listener,
            router,
            ListenerLimits::from_config(&state.config),
            shutdown,
        ));
        // The Acme agent's share of in-flight actions is full.
        let held = state
            .sink
            .admission()
            .admit_keys(vec![("ws_demo", "inst_acme_research"); 10])
            .unwrap();
        // OTLP/HTTP protobuf: 429, Retry-After, a google.rpc.Status with a RetryInfo. The body
        // is no valid protobuf: it is never read.
        let answer = exchange(
            address,
            &format!(
                "POST /v1/traces HTTP/1.1\r\nx-agent-secret: {ACME_SECRET}\r\ncontent-type: application/x-protobuf"
            ),
            b"\xff\xff\xff",
        )
        .await;
        let (head, body) = split(&answer);
        assert!(head.starts_with("http/1.1 429"), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        let status = RpcStatus::decode(body.as_slice()).unwrap();
        assert_eq!(status.code, tonic::Code::ResourceExhausted as i32);
        assert!(
            status.message.contains("inst_acme_research is saturated"),
            "{}",
            status.message
        );
        assert_eq!(status.details[0].type_url, RETRY_INFO_TYPE_URL);
        // REST: 429 with Retry-After and the error JSON, even for a body that is no JSON.
        let answer = exchange(
            address,
            &format!(
                "POST /v1/actions HTTP/1.1\r\nx-agent-secret: {ACME_SECRET}\r\ncontent-type: application/json"
            ),
            b"{not json",
        )
        .await;
        let (head, body) = split(&answer);
        assert!(head.starts_with("http/1.1 429"), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("saturated"),
            "{body}"
        );
        // With the share free again the same bad body reaches the handler (400).
        drop(held);
        let answer = exchange(
            address,
            &format!(
                "POST /v1/actions HTTP/1.1\r\nx-agent-secret: {ACME_SECRET}\r\ncontent-type: application/json"
            ),
            b"{not json",
        )
        .await;
        let (head, _) = split(&answer);
        assert!(head.starts_with("http/1.1 400"), "{head}");
    }
}
