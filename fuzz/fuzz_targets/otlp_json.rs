//! OTLP/HTTP JSON: arbitrary bytes → the OTLP/JSON decoder → `map_request` for Acme's research
//! agent, with the same invariants as `otlp_protobuf`.

#![no_main]

use agentmeter_fuzz::check_otlp_request;
use agentmeter_ingest::otlp::mapping::OtlpSource;
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

/// The OTLP/JSON decoder of `POST /v1/traces`, exactly as `ingest/src/otlp/http.rs` calls it.
///
/// TODO(issue 9 point 4): when `agentmeter_ingest::otlp::json::decode_export_request` lands
/// (lowerCamelCase and original proto field names, enum values by name), replace the body with
/// `agentmeter_ingest::otlp::json::decode_export_request(data)` — the rest of the target stays.
fn decode(data: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    serde_json::from_slice::<ExportTraceServiceRequest>(data).map_err(|error| error.to_string())
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode(data) else {
        return;
    };
    check_otlp_request(&request, OtlpSource::Http);
});
