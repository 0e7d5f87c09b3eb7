//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on
//! `ingest.otlp_grpc_listen` — what value-python's exporter talks to.
//!
//! The service is written out instead of using the generated `TraceServiceServer` for one
//! reason: the generated codec answers a malformed protobuf with INTERNAL, while OTLP wants
//! INVALID_ARGUMENT with the decode error. So the codec here hands over the raw message bytes and
//! the handler decodes them itself.
//!
//! Hostile clients (`docs/ingest-security.md`):
//! * The secret is checked from the request headers *before* tonic reads or decompresses the
//!   body: an unauthenticated caller gets UNAUTHENTICATED without costing a gzip inflate.
//! * gzip-compressed requests are accepted; a message above `ingest.max_body_bytes`, compressed
//!   or decompressed, is refused by tonic before it is buffered whole. Tonic answers those with
//!   OUT_OF_RANGE and RESOURCE_EXHAUSTED, which OTLP exporters retry (the same batch, forever
//!   too large); this service turns them into INVALID_ARGUMENT, which they drop.
//! * A call that takes longer than `ingest.request_timeout_ms` (a body trickled in slowly) is
//!   answered DEADLINE_EXCEEDED.
//! * Connections are served by [`crate::connections`] (HTTP/2 only; limit, deadlines, pings).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::mapping::OtlpSource;
use super::rpc::{RetryInfo, RpcStatus};
use super::{auth_failed, count_request, export, retry_delay, ExportError};
use crate::auth::{authenticate, AgentIdentity};
use crate::connections::{self, ListenerLimits};
use crate::state::AppState;
use agentmeter_runtime::shutdown::Shutdown;

/// The gRPC service name of OTLP traces.
pub const SERVICE_NAME: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
/// The one method path it serves.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Serves OTLP/gRPC on `listener` until shutdown; in-flight exports finish first.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listen = listener.local_addr().ok();
    tracing::info!(listen = ?listen, "ingest OTLP/gRPC ready");
    let limits = ListenerLimits::from_config(&state.config).http2_only();
    connections::serve(
        "otlp_grpc",
        listener,
        TraceServiceServer { state },
        limits,
        shutdown,
    )
    .await
}

/// The `TraceService` as a tower service (what tonic's router takes).
#[derive(Clone)]
pub struct TraceServiceServer {
    state: AppState,
}

impl TraceServiceServer {
    pub fn new(state: AppState) -> TraceServiceServer {
        TraceServiceServer { state }
    }
}

impl NamedService for TraceServiceServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for TraceServiceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != EXPORT_PATH {
            let status = Status::unimplemented(format!(
                "{} is not served here; only {EXPORT_PATH} (traces) is",
                request.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let state = self.state.clone();
        Box::pin(async move {
            // Before the body is read: an unknown caller must not make us inflate its gzip.
            let identity = match authenticate(&state.metering, request.headers()) {
                Ok(identity) => identity,
                Err(error) => {
                    let error = auth_failed(OtlpSource::Grpc, error);
                    count_request(OtlpSource::Grpc, format!("{:?}", error.grpc_code()));
                    return Ok(to_status(&state, error).into_http());
                }
            };
            // Before the body is read, too: a flood's surplus costs no decoding.
            let admission = state.sink.clone();
            let in_progress = match admission.admission().begin_request(
                &identity.workspace.config.workspace.id,
                &identity.instance.id,
            ) {
                Ok(in_progress) => in_progress,
                Err(refusal) => {
                    crate::telemetry::emit(crate::telemetry::AdmissionRefused {
                        scope: refusal.metric_scope(),
                    });
                    super::count_rejected("saturated", 1);
                    count_request(OtlpSource::Grpc, "ResourceExhausted".to_string());
                    let error = ExportError::Saturated(refusal.to_string());
                    crate::rest::delay_refusal(&state.config).await;
                    return Ok(to_status(&state, error).into_http());
                }
            };
            let max_message_bytes = state.config.max_body_bytes;
            let request_timeout = Duration::from_millis(state.config.request_timeout_ms);
            let mut grpc = Grpc::new(RawRequestCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_message_bytes);
            let handler_called = Arc::new(AtomicBool::new(false));
            let handler = ExportHandler {
                state: state.clone(),
                identity,
                called: handler_called.clone(),
            };
            let response =
                match tokio::time::timeout(request_timeout, grpc.unary(handler, request)).await {
                    Ok(response) => response,
                    Err(_) => {
                        count_request(OtlpSource::Grpc, "DeadlineExceeded".to_string());
                        return Ok(Status::deadline_exceeded(format!(
                            "the request was not complete within {} ms (ingest.request_timeout_ms)",
                            state.config.request_timeout_ms
                        ))
                        .into_http());
                    }
                };
            drop(in_progress);
            if handler_called.load(Ordering::Relaxed) {
                return Ok(response);
            }
            Ok(size_limit_as_invalid_argument(response, max_message_bytes))
        })
    }
}

/// Tonic refuses a message above the decoding limit with OUT_OF_RANGE (declared length) or
/// RESOURCE_EXHAUSTED (decompressed length) before the handler runs; exporters retry both, so
/// they become INVALID_ARGUMENT. Only called when the handler did not run, so the handler's own
/// RESOURCE_EXHAUSTED (saturation, retryable) is never touched.
fn size_limit_as_invalid_argument(
    response: http::Response<tonic::body::Body>,
    max_message_bytes: usize,
) -> http::Response<tonic::body::Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            super::count_rejected("body_too_large", 1);
            count_request(OtlpSource::Grpc, "InvalidArgument".to_string());
            Status::invalid_argument(format!(
                "the message is larger than {max_message_bytes} bytes (compressed or not): {}; \
                 lower the exporter's batch size (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
                status.message()
            ))
            .into_http()
        }
        _ => response,
    }
}

/// Handles one `Export` call whose message is still undecoded.
struct ExportHandler {
    state: AppState,
    /// Who is calling (authenticated from the headers before the body was read).
    identity: AgentIdentity,
    /// Set when tonic decoded the message and called the handler.
    called: Arc<AtomicBool>,
}

impl UnaryService<Bytes> for ExportHandler {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        self.called.store(true, Ordering::Relaxed);
        let state = self.state.clone();
        let identity = self.identity.clone();
        Box::pin(async move {
            let result = handle(&state, &identity, request).await;
            match &result {
                Ok(_) => count_request(OtlpSource::Grpc, "Ok".to_string()),
                Err(error) => count_request(OtlpSource::Grpc, format!("{:?}", error.grpc_code())),
            }
            result
                .map(Response::new)
                .map_err(|error| to_status(&state, error))
        })
    }
}

async fn handle(
    state: &AppState,
    identity: &AgentIdentity,
    request: Request<Bytes>,
) -> Result<ExportTraceServiceResponse, ExportError> {
    let message = request.into_inner();
    let decoded = ExportTraceServiceRequest::decode(message).map_err(|error| {
        super::count_rejected("malformed", 1);
        ExportError::InvalidArgument(format!(
            "invalid protobuf ExportTraceServiceRequest: {error}"
        ))
    })?;
    export(state, identity, &decoded, OtlpSource::Grpc).await
}

/// The gRPC status of an error; retryable ones carry a `RetryInfo` (in the status details and
/// in the `google.rpc.retryinfo-bin` trailer that OpenTelemetry's Python exporter reads).
fn to_status(state: &AppState, error: ExportError) -> Status {
    let code = error.grpc_code();
    let message = error.to_string();
    if !error.is_retryable() {
        return Status::new(code, message);
    }
    let retry = RetryInfo::after(retry_delay(state).max(Duration::from_millis(1)));
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![retry.to_any()],
    };
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(
        "google.rpc.retryinfo-bin",
        MetadataValue::from_bytes(&retry.encode_to_vec()),
    );
    Status::with_details_and_metadata(
        code,
        message,
        Bytes::from(details.encode_to_vec()),
        metadata,
    )
}

/// A codec that decodes nothing (the handler decodes, to answer INVALID_ARGUMENT) and encodes
/// the response with prost.
#[derive(Debug, Clone, Copy, Default)]
struct RawRequestCodec;

impl Codec for RawRequestCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buffer.reserve(item.encoded_len());
        item.encode(buffer)
            .map_err(|error| Status::internal(format!("cannot encode the response: {error}")))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buffer.copy_to_bytes(buffer.remaining())))
    }
}

#[cfg(test)]
mod tests {
    //! The gRPC statuses OTel exporters act on, against an in-process broker (`MockCluster`).

    use std::sync::Arc;

    use agentmeter_runtime::shutdown::ShutdownTrigger;

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use rdkafka::ClientConfig;
    use tonic::codec::Codec;
    use tonic::transport::Channel;

    use super::*;
    use crate::config::IngestConfig;
    use crate::normalize::now_micros;
    use crate::sink::ActionSink;

    use crate::test_support::{DEMO_SECRET as SECRET, RAW_TOPIC as TOPIC};

    fn state(bootstrap: &str, max_in_flight: usize) -> AppState {
        let config = IngestConfig {
            retry_after_seconds: 2,
            ..IngestConfig::default()
        };
        crate::test_support::demo_state(bootstrap, config, max_in_flight)
    }

    /// Serves on a free port; the server runs while the returned trigger lives.
    async fn start(state: AppState) -> (Channel, ShutdownTrigger) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(serve(state, listener, shutdown));
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (channel, trigger)
    }

    fn text(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_string())),
            }),
            ..Default::default()
        }
    }

    fn request(agent_id: &str, actions: &[(u8, &str)]) -> ExportTraceServiceRequest {
        let start = u64::try_from(now_micros()).unwrap() * 1000;
        let spans = actions
            .iter()
            .map(|(id, user_attributes)| Span {
                trace_id: vec![*id; 16],
                span_id: vec![*id; 8],
                name: "value.action".to_string(),
                start_time_unix_nano: start,
                end_time_unix_nano: start + 1000,
                attributes: vec![
                    text("value.action.name", "web_search"),
                    text("value.action.anonymous_id", "anon"),
                    text("value.action.user_attributes", user_attributes),
                ],
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("value.agent.id", agent_id)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn with_secret<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("x-agent-secret", SECRET.parse().unwrap());
        request
    }

    #[tokio::test]
    async fn answers_the_statuses_exporters_act_on() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let (channel, _server) = start(state(&cluster.bootstrap_servers(), 100)).await;
        let mut client = TraceServiceClient::new(channel.clone());

        // Accepted, gzip-compressed, with the secret as a Bearer token.
        let mut compressed =
            TraceServiceClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
        let mut bearer = Request::new(request("inst_acme_research", &[(1, "{}")]));
        bearer
            .metadata_mut()
            .insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
        let answer = compressed.export(bearer).await.unwrap().into_inner();
        assert_eq!(answer.partial_success, None);

        // Partial success: one span has bad user_attributes.
        let answer = client
            .export(with_secret(request(
                "inst_acme_research",
                &[(2, "{}"), (3, "{oops")],
            )))
            .await
            .unwrap()
            .into_inner();
        let partial = answer.partial_success.unwrap();
        assert_eq!(partial.rejected_spans, 1);
        assert!(
            partial.error_message.contains("not valid JSON"),
            "{}",
            partial.error_message
        );

        // No secret: UNAUTHENTICATED, with the fix in the message.
        let status = client
            .export(Request::new(request("inst_acme_research", &[(4, "{}")])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("OTEL_EXPORTER_OTLP_HEADERS"),
            "{}",
            status.message()
        );

        // Another agent's id in the resource: PERMISSION_DENIED.
        let status = client
            .export(with_secret(request("inst_globex_support", &[(5, "{}")])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);

        // Bytes that are no ExportTraceServiceRequest: INVALID_ARGUMENT with the decode error.
        let mut raw = tonic::client::Grpc::new(channel);
        raw.ready().await.unwrap();
        let status = raw
            .unary(
                with_secret(Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0f")),
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                RawBytesClientCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("invalid protobuf"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn backpressure_answers_retryable_statuses_with_a_delay() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();

        // One action may be in flight; a request of two is refused before anything is produced.
        let (channel, _saturated_server) = start(state(&cluster.bootstrap_servers(), 1)).await;
        let mut client = TraceServiceClient::new(channel);
        let status = client
            .export(with_secret(request(
                "inst_acme_research",
                &[(1, "{}"), (2, "{}")],
            )))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let retry = status
            .metadata()
            .get_bin("google.rpc.retryinfo-bin")
            .expect("RetryInfo trailer")
            .to_bytes()
            .unwrap();
        let retry = RetryInfo::decode(retry).unwrap();
        assert_eq!(retry.retry_delay.unwrap().seconds, 2);
        let details = RpcStatus::decode(status.details()).unwrap();
        assert_eq!(details.details.len(), 1);

        // The broker is down: Kafka does not acknowledge in time → UNAVAILABLE.
        let (channel, _server) = start(state(&cluster.bootstrap_servers(), 100)).await;
        let mut client = TraceServiceClient::new(channel);
        cluster.broker_down(1).unwrap();
        let status = client
            .export(with_secret(request("inst_acme_research", &[(3, "{}")])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status
            .metadata()
            .get_bin("google.rpc.retryinfo-bin")
            .is_some());
    }

    #[tokio::test]
    async fn an_agent_whose_share_is_full_is_refused_with_a_retry_delay_while_another_is_served() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let base = state(&cluster.bootstrap_servers(), 100);
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("message.timeout.ms", "1500")
            .create()
            .unwrap();
        let limits = crate::admission::AdmissionLimits {
            global: 100,
            per_workspace: 100,
            per_agent_instance: 10,
            requests_per_workspace: 8,
            requests_per_agent_instance: 4,
            rate_per_workspace: None,
            rate_per_agent_instance: None,
        };
        let sink = Arc::new(ActionSink::with_admission(
            producer,
            TOPIC.to_string(),
            limits,
        ));
        let state = AppState {
            sink: sink.clone(),
            ..base
        };
        let (channel, _server) = start(state).await;
        // The Acme agent's share is taken (as by its own requests still waiting for Kafka).
        let _held = sink
            .admission()
            .admit_keys(vec![("ws_demo", "inst_acme_research"); 10])
            .unwrap();
        let mut client = TraceServiceClient::new(channel);
        let status = client
            .export(with_secret(request("inst_acme_research", &[(1, "{}")])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("agent instance inst_acme_research is saturated"),
            "{}",
            status.message()
        );
        assert!(status
            .metadata()
            .get_bin("google.rpc.retryinfo-bin")
            .is_some());
        // The other agent instance is served.
        let mut globex = Request::new(request("inst_globex_support", &[(2, "{}")]));
        globex.metadata_mut().insert(
            "x-agent-secret",
            "am_demo_globex_support_secret".parse().unwrap(),
        );
        let answer = client.export(globex).await.unwrap().into_inner();
        assert_eq!(answer.partial_success, None);
    }

    /// Sends `message` as raw bytes to Export, gzip-compressed when asked.
    async fn export_raw(
        channel: Channel,
        request: Request<Bytes>,
        gzip: bool,
    ) -> Result<ExportTraceServiceResponse, Status> {
        let mut raw = tonic::client::Grpc::new(channel);
        if gzip {
            raw = raw.send_compressed(CompressionEncoding::Gzip);
        }
        raw.ready().await.unwrap();
        raw.unary(
            request,
            http::uri::PathAndQuery::from_static(EXPORT_PATH),
            RawBytesClientCodec,
        )
        .await
        .map(Response::into_inner)
    }

    #[tokio::test]
    async fn an_unauthenticated_call_is_refused_before_its_body_is_decompressed() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let (channel, _server) = start(state(&cluster.bootstrap_servers(), 100)).await;
        // 64 MiB of zeros, gzip-compressed to a few hundred KiB: inflated it would pass the
        // 4 MiB limit. Without a secret the answer is UNAUTHENTICATED, not a size error: the
        // body was not inflated.
        let bomb = Bytes::from(vec![0u8; 64 * 1024 * 1024]);
        let status = export_raw(channel.clone(), Request::new(bomb), true)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let mut wrong_secret = Request::new(Bytes::from_static(b"not even protobuf"));
        wrong_secret
            .metadata_mut()
            .insert("x-agent-secret", "no-such-secret".parse().unwrap());
        let status = export_raw(channel, wrong_secret, true).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }

    #[tokio::test]
    async fn a_too_large_message_gets_a_status_exporters_do_not_retry() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let state = state(&cluster.bootstrap_servers(), 100);
        let limit = state.config.max_body_bytes;
        let (channel, _server) = start(state).await;
        // Declared length above the limit (tonic: OUT_OF_RANGE).
        let plain = Bytes::from(vec![0u8; limit + 1]);
        let status = export_raw(channel.clone(), with_secret(plain), false)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("larger than"),
            "{}",
            status.message()
        );
        // Small compressed, above the limit once inflated (tonic: RESOURCE_EXHAUSTED).
        let inflates_too_large = Bytes::from(vec![0u8; limit * 2]);
        let status = export_raw(channel.clone(), with_secret(inflates_too_large), true)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status
            .metadata()
            .get_bin("google.rpc.retryinfo-bin")
            .is_none());
        // The service still answers normally afterwards.
        let mut client = TraceServiceClient::new(channel);
        let answer = client
            .export(with_secret(request("inst_acme_research", &[(9, "{}")])))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.partial_success, None);
    }

    /// A client codec that sends raw bytes (to send what is no protobuf message).
    #[derive(Debug, Clone, Copy, Default)]
    struct RawBytesClientCodec;

    impl Codec for RawBytesClientCodec {
        type Encode = Bytes;
        type Decode = ExportTraceServiceResponse;
        type Encoder = RawBytesEncoder;
        type Decoder = ResponseDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            RawBytesEncoder
        }

        fn decoder(&mut self) -> Self::Decoder {
            ResponseDecoder
        }
    }

    #[derive(Debug, Clone, Copy, Default)]
    struct RawBytesEncoder;

    impl Encoder for RawBytesEncoder {
        type Item = Bytes;
        type Error = Status;

        fn encode(&mut self, item: Bytes, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
            bytes::BufMut::put(buffer, item);
            Ok(())
        }
    }

    #[derive(Debug, Clone, Copy, Default)]
    struct ResponseDecoder;

    impl Decoder for ResponseDecoder {
        type Item = ExportTraceServiceResponse;
        type Error = Status;

        fn decode(
            &mut self,
            buffer: &mut DecodeBuf<'_>,
        ) -> Result<Option<ExportTraceServiceResponse>, Status> {
            ExportTraceServiceResponse::decode(buffer)
                .map(Some)
                .map_err(|error| Status::internal(error.to_string()))
        }
    }
}
