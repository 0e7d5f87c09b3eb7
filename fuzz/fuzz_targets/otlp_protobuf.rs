//! OTLP/gRPC and OTLP/HTTP protobuf: arbitrary bytes → prost `ExportTraceServiceRequest` →
//! `map_request` for Acme's research agent, as both transports do after authentication.
//!
//! Invariants: nothing panics; every span is accepted or rejected; every accepted action carries
//! the identity of the secret (never of the body), and its Avro record reads back unchanged.

#![no_main]

use agentmeter_fuzz::check_otlp_request;
use agentmeter_ingest::otlp::mapping::OtlpSource;
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ExportTraceServiceRequest::decode(data) else {
        return;
    };
    check_otlp_request(&request, OtlpSource::Grpc);
});
