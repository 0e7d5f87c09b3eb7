//! Writes the generated part of the seed corpus, `fuzz/corpus/<target>/gen_*`, from the
//! project's own encoders and message types: OTLP requests shaped as value-python and
//! OpenTelemetry's exporters send them (protobuf and OTLP/JSON), REST batches of the README,
//! Avro records of `encode_raw_action` / `encode_enriched_action`, the example configuration as
//! a config-topic record, and a few starting inputs of the structured targets.
//!
//! Run it with `fuzz/seeds.sh` after a schema or mapping change; the files are checked in. The
//! captured requests of real exporters (`captured_*`, from `fuzz/capture/`) are not written here.
//!
//! Every span starts shortly before the fuzz targets' fixed clock (`FIXED_NOW_MICROS` in
//! `fuzz/src/lib.rs`), so ingest's time window accepts it and the fuzzer starts deep in the
//! mapping instead of at the time check.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use agentmeter_schemas::metering::{ConfigRecord, MeteringConfig};
use agentmeter_schemas::{
    encode_enriched_action, encode_raw_action, ActionKind, CostSource, EnrichedAction, RawAction,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use rust_decimal::Decimal;
use serde_json::json;

/// Must equal `FIXED_NOW_MICROS` of `fuzz/src/lib.rs` (2026-12-02T00:00:00Z).
const FIXED_NOW_MICROS: i64 = 1_796_169_600_000_000;
/// One minute before the fixed clock, in nanoseconds, as spans carry it.
const START_NANOS: u64 = (FIXED_NOW_MICROS as u64 - 60_000_000) * 1000;
const EXAMPLE_CONFIG_TOML: &str = include_str!("../../../deploy/local/metering.example.toml");

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut written = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| {
        let directory = corpus.join(target);
        fs::create_dir_all(&directory).expect("create the corpus directory");
        let path: PathBuf = directory.join(format!("gen_{name}"));
        fs::write(&path, bytes).expect("write a seed");
        written += 1;
    };

    for (name, request) in otlp_requests() {
        write(
            "otlp_protobuf",
            &format!("{name}.pb"),
            &request.encode_to_vec(),
        );
        let json = serde_json::to_vec(&request).expect("OTLP/JSON serializes");
        write("otlp_json", &format!("{name}.json"), &json);
    }
    // The requests real exporters sent (fuzz/capture/capture.sh), in OTLP/JSON as JSON
    // exporters and the Collector spell them: hex ids, int64 as strings, lowerCamelCase.
    let mut captured: Vec<PathBuf> = fs::read_dir(corpus.join("otlp_protobuf"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .collect()
        })
        .unwrap_or_default();
    captured.retain(|path| {
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("captured_") && name.ends_with(".pb"))
    });
    captured.sort();
    for path in captured {
        let bytes = fs::read(&path).expect("read a captured request");
        let request = ExportTraceServiceRequest::decode(bytes.as_slice())
            .unwrap_or_else(|error| panic!("{} is not an OTLP request: {error}", path.display()));
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .expect("a UTF-8 name");
        let json = serde_json::to_vec(&request).expect("OTLP/JSON serializes");
        fs::write(corpus.join("otlp_json").join(format!("{stem}.json")), json)
            .expect("write a seed");
    }
    for (name, body) in otlp_json_bodies() {
        write("otlp_json", &format!("{name}.json"), body.as_bytes());
    }
    for (name, body) in rest_batches() {
        write(
            "rest_json",
            &format!("{name}.json"),
            body.to_string().as_bytes(),
        );
    }
    for (name, action) in raw_actions() {
        let bytes = encode_raw_action(&action).expect("seed raw action encodes");
        write("avro_raw", &format!("{name}.avro"), &bytes);
    }
    for (name, action) in enriched_actions() {
        let bytes = encode_enriched_action(&action).expect("seed enriched action encodes");
        write("avro_enriched", &format!("{name}.avro"), &bytes);
    }
    for (name, text) in config_seeds() {
        write("config", &name, text.as_bytes());
    }
    // The structured targets read their input as a stream of choices; these are only starting
    // points of different lengths and textures, the fuzzer finds its own way from there.
    for target in ["pricing", "aggregation"] {
        write(target, "zeros_64", &[0u8; 64]);
        write(target, "ones_256", &[0xFFu8; 256]);
        let counting: Vec<u8> = (0..=255u8).collect();
        write(target, "counting_256", &counting);
        let pattern: Vec<u8> = (0..512u32).map(|index| (index * 37 % 251) as u8).collect();
        write(target, "pattern_512", &pattern);
    }
    println!("wrote {written} seeds under {}", corpus.display());
}

fn string(key: &str, value: &str) -> KeyValue {
    attribute(key, OtlpValue::StringValue(value.to_string()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, OtlpValue::IntValue(value))
}

fn attribute(key: &str, value: OtlpValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn span(name: &str, id: u8, kind: span::SpanKind, attributes: Vec<KeyValue>) -> Span {
    Span {
        trace_id: [
            [0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03],
            [0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, id],
        ]
        .concat(),
        span_id: vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, id],
        name: name.to_string(),
        kind: kind as i32,
        start_time_unix_nano: START_NANOS + u64::from(id) * 1_000_000,
        end_time_unix_nano: START_NANOS + u64::from(id) * 1_000_000 + 350_000,
        attributes,
        status: Some(Status::default()),
        flags: 0x100,
        ..Default::default()
    }
}

fn request(resource: Vec<KeyValue>, scope: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: scope.to_string(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

/// The resource value-python 0.1.6 sets (with the OpenTelemetry SDK's own attributes).
fn value_python_resource() -> Vec<KeyValue> {
    vec![
        string("telemetry.sdk.language", "python"),
        string("telemetry.sdk.name", "opentelemetry"),
        string("telemetry.sdk.version", "1.45.2"),
        string("service.name", "value-control-agent"),
        string("value.client.sdk", "value-python"),
        string("value.agent.id", "inst_acme_research"),
        string("value.agent.name", "Acme Research Agent"),
        string("value.agent.organization_id", "acc_acme"),
        string("value.agent.workspace_id", "ws_demo"),
    ]
}

fn otlp_requests() -> Vec<(&'static str, ExportTraceServiceRequest)> {
    use span::SpanKind::{Client, Internal};
    let research_agent = request(
        value_python_resource(),
        "value-python",
        vec![
            span(
                "value.action",
                1,
                Internal,
                vec![
                    string("value.action.name", "web_search"),
                    string("value.action.user_id", "user_acme_123"),
                    string("value.action.anonymous_id", "anon_1"),
                    string(
                        "value.action.description",
                        "Searched for: quantum computing",
                    ),
                    string(
                        "value.action.user_attributes",
                        r#"{"results_count": 2, "search_provider": "google"}"#,
                    ),
                ],
            ),
            span(
                "value.action",
                2,
                Internal,
                vec![
                    string("value.action.name", "llm_call"),
                    string("value.action.user_id", "user_acme_123"),
                    string("value.action.anonymous_id", "anon_1"),
                    string("value.action.description", "Summarized search results"),
                    string(
                        "value.action.user_attributes",
                        r#"{"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800, "cost_usd": 0.12}"#,
                    ),
                ],
            ),
            span(
                "value.action",
                3,
                Internal,
                vec![
                    string("value.action.name", "llm_call"),
                    string("value.action.anonymous_id", "anon_2"),
                    string("value.action.llm.model", "gemini-2.5-pro"),
                    int("value.action.llm.input_tokens", 10),
                    string("value.action.llm.output_tokens", "20"),
                    attribute(
                        "value.action.llm.total_tokens",
                        OtlpValue::DoubleValue(35.0),
                    ),
                    string("value.action.llm.prompt", "Summarize the results"),
                    string("value.action.type", "llm"),
                    string("value.action.status", "ok"),
                    attribute("value.action.duration", OtlpValue::DoubleValue(0.35)),
                    string(
                        "value.action.user_attributes",
                        r#"{"model": "other", "input_tokens": "1"}"#,
                    ),
                ],
            ),
        ],
    );
    let genai_user = |user: &str| string("value.action.user_id", user);
    let genai = request(
        vec![
            string("service.name", "genai-test-agent"),
            string("telemetry.sdk.language", "python"),
        ],
        "opentelemetry.instrumentation.google_generativeai",
        vec![
            // OpenLLMetry's Gemini instrumentor <= 0.47.
            span(
                "gemini.generate_content",
                4,
                Client,
                vec![
                    string("gen_ai.system", "Google"),
                    string("gen_ai.request.model", "gemini-2.5-flash"),
                    int("gen_ai.usage.prompt_tokens", 100),
                    int("gen_ai.usage.completion_tokens", 40),
                    int("llm.usage.total_tokens", 140),
                    genai_user("user_legacy"),
                    string("value.action.anonymous_id", "anon_legacy"),
                    string("gen_ai.prompt.0.content", "a prompt that is never stored"),
                ],
            ),
            // 0.48 - 0.57.
            span(
                "gemini.generate_content",
                5,
                Client,
                vec![
                    string("gen_ai.system", "Google"),
                    string("gen_ai.request.model", "models/gemini-2.5-flash"),
                    int("gen_ai.usage.input_tokens", 200),
                    int("gen_ai.usage.output_tokens", 50),
                    int("llm.usage.total_tokens", 250),
                    genai_user("user_middle"),
                ],
            ),
            // >= 0.58, with thinking tokens (total above input + output).
            span(
                "generate_content gemini-2.5-flash",
                6,
                Client,
                vec![
                    string("gen_ai.provider.name", "gcp.gen_ai"),
                    string("gen_ai.operation.name", "generate_content"),
                    string("gen_ai.request.model", "gemini-2.5-flash"),
                    int("gen_ai.usage.input_tokens", 300),
                    int("gen_ai.usage.output_tokens", 60),
                    int("gen_ai.usage.total_tokens", 400),
                    genai_user("user_current"),
                ],
            ),
            // Another provider; integers as a string and as a double.
            span(
                "chat gpt-4o",
                7,
                Client,
                vec![
                    string("gen_ai.system", "openai"),
                    string("gen_ai.operation.name", "chat"),
                    string("gen_ai.response.model", "gpt-4o-2024-08-06"),
                    string("gen_ai.usage.input_tokens", "12"),
                    attribute("gen_ai.usage.output_tokens", OtlpValue::DoubleValue(7.0)),
                    string("value.action.anonymous_id", "anon_openai"),
                ],
            ),
            // A plain span: a trace event named by the span.
            span(
                "retrieve_documents",
                8,
                Internal,
                vec![
                    int("docs", 3),
                    attribute("ok", OtlpValue::BoolValue(true)),
                    attribute("blob", OtlpValue::BytesValue(vec![0, 1, 2, 0xff])),
                    attribute(
                        "list",
                        OtlpValue::ArrayValue(ArrayValue {
                            values: vec![AnyValue {
                                value: Some(OtlpValue::StringValue("a".into())),
                            }],
                        }),
                    ),
                    attribute(
                        "map",
                        OtlpValue::KvlistValue(KeyValueList {
                            values: vec![int("nested", 1)],
                        }),
                    ),
                ],
            ),
        ],
    );
    let user_attributes_as_kvlist = request(
        value_python_resource(),
        "value-python",
        vec![span(
            "value.action",
            9,
            Internal,
            vec![
                string("value.action.name", "object_detection"),
                string("value.action.anonymous_id", "anon_3"),
                attribute(
                    "value.action.user_attributes",
                    OtlpValue::KvlistValue(KeyValueList {
                        values: vec![int("objects", 4), string("cost_usd", "0.5")],
                    }),
                ),
            ],
        )],
    );
    vec![
        ("value_python_research_agent", research_agent),
        ("genai_three_generations", genai),
        ("user_attributes_kvlist", user_attributes_as_kvlist),
    ]
}

/// OTLP/JSON as other exporters and hand-written clients spell it.
fn otlp_json_bodies() -> Vec<(&'static str, String)> {
    let start = START_NANOS;
    vec![
        // int64 as strings and as numbers, enums as integers, an unknown field (http.rs tests).
        (
            "mixed_integers",
            format!(
                r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"agent"}}}}]}},
"scopeSpans":[{{"scope":{{"name":"manual"}},"spans":[{{"traceId":"5b8efff798038103d269b633813fc60c",
"spanId":"eee19b7ec3c1b174","name":"chat gpt-4o","kind":3,"startTimeUnixNano":"{start}",
"endTimeUnixNano":{end},"attributes":[
{{"key":"gen_ai.system","value":{{"stringValue":"openai"}}}},
{{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"12"}}}},
{{"key":"gen_ai.usage.output_tokens","value":{{"intValue":7}}}},
{{"key":"ratio","value":{{"doubleValue":0.5}}}}],
"status":{{"code":1}},"unknownField":true}}]}}]}}]}}"#,
                end = start + 1_000_000
            ),
        ),
        // The original proto field names and enum names, which protobuf's JSON mapping lets
        // parsers accept (issue 9 point 4).
        (
            "proto_field_names",
            format!(
                r#"{{"resource_spans":[{{"scope_spans":[{{"spans":[{{"trace_id":"5b8efff798038103d269b633813fc60d",
"span_id":"eee19b7ec3c1b175","name":"value.action","kind":"SPAN_KIND_INTERNAL",
"start_time_unix_nano":"{start}","attributes":[{{"key":"value.action.name","value":{{"string_value":"web_search"}}}},
{{"key":"value.action.anonymous_id","value":{{"string_value":"anon_json"}}}}],
"status":{{"code":"STATUS_CODE_OK"}}}}]}}]}}]}}"#
            ),
        ),
    ]
}

fn rest_batches() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "readme_llm_call",
            json!({"actions": [{"action_name": "llm_call", "user_id": "user_acme_123",
                "attributes": {"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800, "cost_usd": 0.12}}]}),
        ),
        (
            "every_field",
            json!({"actions": [
                {"event_id": "019ac0c4-8d2e-7000-8000-000000000001", "action_name": "web_search",
                 "user_id": "user_acme_123", "anonymous_id": "anon_1",
                 "occurred_at": "2026-12-01T23:58:00Z", "description": "Searched for: rust fuzzing",
                 "attributes": {"results_count": 2, "search_provider": "google"}},
                {"action_name": "gemini_llm_gemini-2.5-flash", "anonymous_id": "anon_2",
                 "occurred_at": "2026-12-01T23:59:59.999999+00:00",
                 "attributes": {"input_tokens": "300", "output_tokens": "60", "total_tokens": 400, "cost_usd": "0.0021"}},
                {"action_name": "object_detection", "user_id": "user_globex_7",
                 "attributes": {"objects": 4, "nested": {"a": [1, 2.5, null, true]}}}
            ]}),
        ),
        (
            "refused_items",
            json!({"actions": [
                {"action_name": ""},
                {"action_name": "a", "occurred_at": "2020-01-01T00:00:00Z"},
                {"action_name": "a", "attributes": {"input_tokens": -1, "cost_usd": "1e30"}}
            ]}),
        ),
        (
            "outcomes_every_field",
            json!({"outcomes": [
                {"event_id": "lead-42-converted", "outcome_type": "lead_converted",
                 "value": "1250.000000000001", "user_id": "user_acme_123",
                 "occurred_at": "2026-12-01T23:58:00Z", "metadata": {"lead_id": "L-42"}},
                {"outcome_type": "ticket_resolved", "anonymous_id": "anon_1", "value": 2.5},
                {"outcome_type": "meeting_booked", "value": null}
            ]}),
        ),
        (
            "outcomes_refused",
            json!({"outcomes": [
                {"outcome_type": "lead_converted", "value": -1},
                {"outcome_type": "lead_converted", "value": "12,5"},
                {"outcome_type": "lead_converted", "value": 1e13},
                {"outcome_type": ""}
            ]}),
        ),
    ]
}

fn raw_action() -> RawAction {
    RawAction {
        event_id: "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174".into(),
        workspace_id: "ws_demo".into(),
        account_id: "acc_acme".into(),
        agent_instance_id: "inst_acme_research".into(),
        kind: ActionKind::Llm,
        action_name: "gemini_llm_gemini-2.5-flash".into(),
        trace_event: Some("generate_content gemini-2.5-flash".into()),
        user_id: Some("user_acme_123".into()),
        anonymous_id: Some("anon_1".into()),
        occurred_at_micros: FIXED_NOW_MICROS - 60_000_000,
        received_at_micros: FIXED_NOW_MICROS,
        description: Some("Summarized search results".into()),
        llm_provider: Some("gemini".into()),
        llm_model: Some("gemini-2.5-flash".into()),
        input_tokens: Some(300),
        output_tokens: Some(60),
        total_tokens: Some(400),
        reported_cost: Some(Decimal::from_str("0.12").unwrap()),
        attributes_json: r#"{"gen_ai.request.model":"gemini-2.5-flash"}"#.into(),
        source: "otlp_grpc".into(),
        outcome_value: None,
    }
}

fn raw_actions() -> Vec<(&'static str, RawAction)> {
    let minimal = RawAction {
        kind: ActionKind::Action,
        action_name: "web_search".into(),
        trace_event: None,
        user_id: None,
        description: None,
        llm_provider: None,
        llm_model: None,
        input_tokens: None,
        output_tokens: None,
        total_tokens: None,
        reported_cost: None,
        attributes_json: "{}".into(),
        source: "rest".into(),
        ..raw_action()
    };
    let extremes = RawAction {
        kind: ActionKind::TraceEvent,
        occurred_at_micros: i64::MIN,
        received_at_micros: i64::MAX,
        input_tokens: Some(i64::MAX),
        output_tokens: Some(i64::MIN),
        total_tokens: Some(-1),
        // The largest magnitude rust_decimal and Decimal(38, 12) both hold.
        reported_cost: Some(-Decimal::from_str("99999999999999999999999999.99").unwrap()),
        description: Some("ünïcödé \u{202e} bidi".into()),
        ..raw_action()
    };
    let outcome_event = RawAction {
        kind: ActionKind::Outcome,
        action_name: "lead_converted".into(),
        outcome_value: Some(Decimal::from_str("1250.000000000001").unwrap()),
        attributes_json: r#"{"lead_id":"L-42"}"#.into(),
        source: "kafka".into(),
        ..minimal.clone()
    };
    vec![
        ("llm_every_field", raw_action()),
        ("action_minimal", minimal),
        ("extremes", extremes),
        ("outcome_event", outcome_event),
    ]
}

fn enriched_actions() -> Vec<(&'static str, EnrichedAction)> {
    let priced = EnrichedAction {
        raw: raw_action(),
        tracked: true,
        outcome: true,
        measure: "token".into(),
        quantity: Decimal::from(400),
        unit_cost: Decimal::from_str("0.006").unwrap(),
        cost: Decimal::from_str("2.4").unwrap(),
        cost_source: CostSource::Allocated,
        currency: "USD".into(),
        config_version: 7,
        enriched_at_micros: FIXED_NOW_MICROS + 1000,
    };
    let untracked = EnrichedAction {
        tracked: false,
        outcome: false,
        measure: String::new(),
        quantity: Decimal::ZERO,
        unit_cost: Decimal::ZERO,
        cost: Decimal::ZERO,
        cost_source: CostSource::None,
        raw: RawAction {
            reported_cost: None,
            ..raw_action()
        },
        ..priced.clone()
    };
    let extremes = EnrichedAction {
        quantity: Decimal::from_str("99999999999999999999999999").unwrap(),
        unit_cost: Decimal::from_str("0.000000000001").unwrap(),
        cost: -Decimal::from_str("79228162514264337.593543950335").unwrap(),
        cost_source: CostSource::Reported,
        config_version: i64::MIN,
        enriched_at_micros: i64::MAX,
        ..priced.clone()
    };
    vec![
        ("priced", priced),
        ("untracked", untracked),
        ("extremes", extremes),
    ]
}

fn config_seeds() -> Vec<(String, String)> {
    let config = MeteringConfig::from_toml(EXAMPLE_CONFIG_TOML).expect("the example is valid");
    let record = ConfigRecord {
        version: 3,
        ..ConfigRecord::next(None, config, time_from_rfc3339("2026-12-01T12:00:00Z"))
    };
    let minimal = r#"[workspace]
id = "ws"
name = "W"
currency = "EUR"

[[accounts]]
id = "a1"
name = "A1"

[[agent_types]]
id = "t1"
name = "T1"

[[agent_instances]]
id = "i1"
name = "I1"
agent_type = "t1"
account = "a1"
secret_sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"

[tagging]
tracked = ["llm_call", "pages_printed"]

[[cost_allocations]]
action = "llm_call"
measure = "output_token"
rates = [
  { effective_from = "2025-01-01T00:00:00Z", cost_per_unit = "0.001" },
  { effective_from = "2025-06-01T00:00:00+02:00", cost_per_unit = "0.002" },
]

[[cost_allocations]]
action = "pages_printed"
measure = "pages"
quantity_attribute = "page_count"
rates = [{ effective_from = "2025-01-01T00:00:00Z", cost_per_unit = "99999999999999.999999999999" }]

[[outcomes]]
action = "pages_printed"
"#;
    vec![
        ("example.toml".into(), EXAMPLE_CONFIG_TOML.into()),
        ("minimal.toml".into(), minimal.into()),
        (
            "example_record.json".into(),
            serde_json::to_string(&record).expect("a config record serializes"),
        ),
    ]
}

fn time_from_rfc3339(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("a valid RFC 3339 instant")
}
