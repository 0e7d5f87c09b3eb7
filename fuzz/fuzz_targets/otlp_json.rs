//! OTLP/HTTP JSON: arbitrary bytes → the OTLP/JSON decoder → `map_request` for Acme's research
//! agent, with the same invariants as `otlp_protobuf`; and a round trip: the decoded request,
//! written back as OTLP/JSON by opentelemetry-proto's serializer (lowerCamelCase, hex ids, int64
//! strings), decodes to the same protobuf bytes.

#![no_main]

use agentmeter_fuzz::check_otlp_request;
use agentmeter_ingest::otlp::json::decode_export_request;
use agentmeter_ingest::otlp::mapping::OtlpSource;
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

/// The OTLP/JSON decoder of `POST /v1/traces`, exactly as `ingest/src/otlp/http.rs` calls it:
/// both field-name spellings, enum names or numbers, int64 strings or numbers, hex ids.
fn decode(data: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    decode_export_request(data).map_err(|error| error.to_string())
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode(data) else {
        return;
    };
    check_otlp_request(&request, OtlpSource::Http);
    // NaN and the infinities have no JSON number: the serializer refuses them, nothing to check.
    if let Ok(reencoded) = serde_json::to_vec(&request) {
        let redecoded = decode(&reencoded).unwrap_or_else(|error| {
            panic!(
                "the serializer's OTLP/JSON does not decode: {error}: {}",
                String::from_utf8_lossy(&reencoded)
            )
        });
        assert_eq!(
            redecoded.encode_to_vec(),
            request.encode_to_vec(),
            "OTLP/JSON round trip changed the request: {}",
            String::from_utf8_lossy(&reencoded)
        );
    }
});
