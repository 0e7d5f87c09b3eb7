//! Protocol conformance of ingest (issue 9, point 4) against the real broker, read back from
//! the raw actions topic:
//!
//! * OTLP/JSON as protobuf's JSON mapping allows it: original proto field names
//!   (`resource_spans`, `start_time_unix_nano`), enum values by name (`"SPAN_KIND_CLIENT"`),
//!   64-bit integers as JSON numbers — stored like the lowerCamelCase form;
//! * REST `POST /v1/actions`: exact media type (415 otherwise, also when absent), gzip bodies
//!   decoded within the body limit (a gzip bomb is 413), 415 for other encodings;
//! * authentication: `authorization: bearer <secret>` in any case, an empty `X-Agent-Secret`
//!   next to a valid `Authorization`, and messages that name the wrong header.
#![cfg(feature = "integration")]

mod common;

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentmeter_schemas::{decode_raw_action, RawAction};
use common::{metering_config, TestEnv};
use serde_json::{json, Value};

const SECRET: &str = "protocol-test-secret-acme-81c4";
const METERING: &str = "[tagging]\ntracked = [\"web_search\", \"llm_call\"]\n";

fn start_ingest(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name, "");
    env.apply_config(&metering_config(
        "ws_protocol",
        &[("acc_acme", SECRET)],
        METERING,
    ));
    env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    env
}

/// The actions on the raw topic, by event id.
fn raw_actions(env: &TestEnv) -> Vec<RawAction> {
    let mut actions: Vec<RawAction> = env
        .read_topic("actions.raw")
        .iter()
        .map(|record| decode_raw_action(&record.payload).expect("a raw action record"))
        .collect();
    actions.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    actions
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Status and JSON answer of a POST with exactly these headers and body.
fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let mut request = reqwest::blocking::Client::new()
        .post(url)
        .timeout(Duration::from_secs(30))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().expect("ingest reachable");
    let status = response.status().as_u16();
    let bytes = response.bytes().unwrap();
    let answer = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).to_string()));
    (status, answer)
}

fn rest_batch(event_ids: &[&str]) -> Vec<u8> {
    let actions: Vec<Value> = event_ids
        .iter()
        .map(|id| json!({"event_id": id, "action_name": "web_search"}))
        .collect();
    json!({ "actions": actions }).to_string().into_bytes()
}

#[test]
fn otlp_json_with_proto_field_names_and_enum_names_is_stored() {
    let env = start_ingest("protocol_otlp_json");
    let url = format!("{}/v1/traces", env.otlp_http_url());
    let start = now_nanos();
    let json_headers = [
        ("content-type", "application/json"),
        ("x-agent-secret", SECRET),
    ];

    // The original proto field names, enum names, 64-bit integers as plain JSON numbers.
    let snake_case = json!({"resource_spans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"string_value": "agent"}}]},
        "schema_url": "",
        "scope_spans": [{"scope": {"name": "manual"}, "spans": [{
            "trace_id": "5B8EFFF798038103D269B633813FC60C",
            "span_id": "eee19b7ec3c1b174",
            "name": "value.action",
            "kind": "SPAN_KIND_CLIENT",
            "start_time_unix_nano": start,
            "end_time_unix_nano": start + 1_000_000,
            "attributes": [
                {"key": "value.action.name", "value": {"string_value": "web_search"}},
                {"key": "value.action.anonymous_id", "value": {"string_value": "anon_snake"}}
            ],
            "dropped_attributes_count": 0,
            "status": {"code": "STATUS_CODE_ERROR", "message": "x"}
        }]}]
    }]});
    let (status, answer) = post(&url, &json_headers, snake_case.to_string().into_bytes());
    assert_eq!((status, &answer), (200, &json!({})), "{}", env.logs());

    // lowerCamelCase with enum names and an unknown field: the same treatment.
    let camel_case = json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b175",
        "name": "value.action",
        "kind": "SPAN_KIND_INTERNAL",
        "startTimeUnixNano": start.to_string(),
        "attributes": [{"key": "value.action.name", "value": {"stringValue": "llm_call"}},
                       {"key": "value.action.llm.input_tokens", "value": {"intValue": 12}}],
        "status": {"code": "STATUS_CODE_OK"},
        "fieldOfANewerOtlp": {"anything": [1, 2]}
    }]}]}]});
    let (status, answer) = post(&url, &json_headers, camel_case.to_string().into_bytes());
    assert_eq!((status, &answer), (200, &json!({})), "{}", env.logs());

    let actions = raw_actions(&env);
    let stored: Vec<(&str, &str, &str)> = actions
        .iter()
        .map(|action| {
            (
                action.event_id.as_str(),
                action.action_name.as_str(),
                action.source.as_str(),
            )
        })
        .collect();
    assert_eq!(
        stored,
        [
            (
                "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174",
                "web_search",
                "otlp_http"
            ),
            (
                "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b175",
                "llm_call",
                "otlp_http"
            ),
        ]
    );
    assert_eq!(actions[0].anonymous_id.as_deref(), Some("anon_snake"));
    assert_eq!(actions[0].agent_instance_id, "inst_acc_acme");
    assert_eq!(actions[0].occurred_at_micros, (start / 1000) as i64);
    assert_eq!(actions[1].input_tokens, Some(12));
}

#[test]
fn rest_refuses_other_media_types_and_encodings_with_415() {
    let env = start_ingest("protocol_rest_415");
    let url = format!("{}/v1/actions", env.ingest_url());
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[],
            "Content-Type is missing; send Content-Type: application/json",
        ),
        (
            &[("content-type", "text/plain")],
            "Content-Type must be application/json, got \"text/plain\"",
        ),
        (
            &[("content-type", "application/x-www-form-urlencoded")],
            "Content-Type must be application/json, got \"application/x-www-form-urlencoded\"",
        ),
        (
            &[
                ("content-type", "application/json"),
                ("content-encoding", "br"),
            ],
            "Content-Encoding \"br\" is not supported; send gzip or no Content-Encoding",
        ),
    ];
    for (index, (headers, message)) in cases.iter().enumerate() {
        let mut headers = headers.to_vec();
        headers.push(("x-agent-secret", SECRET));
        let event_id = format!("refused-{index}");
        let (status, answer) = post(&url, &headers, rest_batch(&[&event_id]));
        assert_eq!(status, 415, "{headers:?}: {answer}");
        assert_eq!(answer["error"], *message, "{headers:?}");
    }
    // The media type is case-insensitive and may carry parameters.
    let (status, answer) = post(
        &url,
        &[
            ("content-type", "Application/JSON; charset=UTF-8"),
            ("x-agent-secret", SECRET),
        ],
        rest_batch(&["accepted-0"]),
    );
    assert_eq!(status, 202, "{answer}");
    let stored: Vec<String> = raw_actions(&env)
        .into_iter()
        .map(|action| action.event_id)
        .collect();
    assert_eq!(stored, ["accepted-0"], "a refused batch reached the topic");
}

#[test]
fn rest_accepts_gzip_bodies_and_stops_a_gzip_bomb_at_the_body_limit() {
    let env = start_ingest("protocol_rest_gzip");
    let url = format!("{}/v1/actions", env.ingest_url());
    let gzip_headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("x-agent-secret", SECRET),
    ];
    let (status, answer) = post(
        &url,
        &gzip_headers,
        gzip(&rest_batch(&["gzip-0", "gzip-1"])),
    );
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 2);

    // A valid batch followed by 64 MiB of spaces: about 64 KiB compressed, 16 times the
    // default 4 MiB limit once decompressed.
    let mut bomb_text = String::from_utf8(rest_batch(&["bomb-0"])).unwrap();
    bomb_text.push_str(&" ".repeat(64 << 20));
    let bomb = gzip(bomb_text.as_bytes());
    drop(bomb_text);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    let (status, answer) = post(&url, &gzip_headers, bomb);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer["error"],
        "decompressed request body is larger than 4194304 bytes; send smaller batches"
    );

    // Not gzip at all, though declared so.
    let (status, answer) = post(&url, &gzip_headers, rest_batch(&["plain-0"]));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid gzip body"),
        "{answer}"
    );

    let stored: Vec<String> = raw_actions(&env)
        .into_iter()
        .map(|action| action.event_id)
        .collect();
    assert_eq!(stored, ["gzip-0", "gzip-1"]);
}

#[test]
fn bearer_in_any_case_and_an_empty_agent_secret_header_authenticate() {
    let env = start_ingest("protocol_auth");
    let rest = format!("{}/v1/actions", env.ingest_url());
    let lowercase_bearer = format!("bearer {SECRET}");
    let bearer = format!("Bearer {SECRET}");
    let json = ("content-type", "application/json");

    let (status, answer) = post(
        &rest,
        &[json, ("authorization", &lowercase_bearer)],
        rest_batch(&["auth-lowercase-bearer"]),
    );
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = post(
        &rest,
        &[json, ("x-agent-secret", ""), ("authorization", &bearer)],
        rest_batch(&["auth-empty-agent-secret"]),
    );
    assert_eq!(status, 202, "{answer}");

    // OTLP/HTTP and the info endpoint share the rules.
    let start = now_nanos();
    let span = json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
        "name": "value.action", "startTimeUnixNano": start.to_string(),
        "attributes": [{"key": "value.action.name", "value": {"stringValue": "web_search"}}]
    }]}]}]});
    let (status, answer) = post(
        &format!("{}/v1/traces", env.otlp_http_url()),
        &[
            json,
            ("x-agent-secret", " "),
            ("authorization", &lowercase_bearer),
        ],
        span.to_string().into_bytes(),
    );
    assert_eq!((status, &answer), (200, &json!({})), "{}", env.logs());
    let info = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/agent_instance/info", env.ingest_url()))
        .header("authorization", format!("BEARER {SECRET}"))
        .send()
        .unwrap();
    assert_eq!(info.status().as_u16(), 200);

    // Refusals name the header and say why.
    let (status, answer) = post(
        &rest,
        &[json, ("authorization", "Basic dXNlcjpwYXNz")],
        rest_batch(&["auth-basic"]),
    );
    assert_eq!(status, 401);
    assert_eq!(
        answer["error"],
        "Authorization header uses scheme 'Basic'; send 'Bearer <secret>' (or the secret in the X-Agent-Secret header)"
    );
    let (status, answer) = post(
        &rest,
        &[json, ("x-agent-secret", "")],
        rest_batch(&["auth-empty"]),
    );
    assert_eq!(status, 401);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed X-Agent-Secret header: it is empty"),
        "{answer}"
    );
    let (status, answer) = post(
        &rest,
        &[json, ("authorization", "Bearer no-such-secret")],
        rest_batch(&["auth-unknown"]),
    );
    assert_eq!(status, 401);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("sent in the Authorization header"),
        "{answer}"
    );

    let stored: Vec<String> = raw_actions(&env)
        .into_iter()
        .map(|action| action.event_id)
        .collect();
    assert_eq!(
        stored,
        [
            "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "auth-empty-agent-secret",
            "auth-lowercase-bearer",
        ]
    );
}
