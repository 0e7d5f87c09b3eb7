//! OTLP ingestion over the real broker and ClickHouse, with real OpenTelemetry clients:
//!
//! * the product's own Python SDK, value-python 0.1.6 (OTLP/gRPC), running the getting-started
//!   guide's research agent unchanged (`tests/python/research_agent.py`);
//! * OpenTelemetry's Python SDK with its OTLP/HTTP exporter (protobuf, gzip, `Authorization:
//!   Bearer`) emitting GenAI spans of every Gemini instrumentor generation
//!   (`tests/python/genai_spans.py`), plus OTLP/JSON sent from here;
//! * a table of bad OTLP/HTTP requests, each answered with its status and reason, none of which
//!   writes anything to Kafka.
//!
//! The Python packages (`tests/python/requirements-otlp.txt`) are installed once into
//! `$HOME/.cache/agentmeter/venv-otlp` and reused while the requirements are unchanged.
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentmeter_ingest::otlp::prost::Message;
use agentmeter_ingest::otlp::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use agentmeter_ingest::otlp::proto::common::v1::{any_value, AnyValue, KeyValue};
use agentmeter_ingest::otlp::proto::resource::v1::Resource;
use agentmeter_ingest::otlp::proto::trace::v1::{ResourceSpans, ScopeSpans, Span};
use agentmeter_ingest::otlp::rpc::RpcStatus;
use common::{metering_config, metrics_text, repo_root, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const ACME_SECRET: &str = "otlp-test-secret-acme-5d1e";
const GLOBEX_SECRET: &str = "otlp-test-secret-globex-2b7f";

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "delivery", "gemini_llm_gemini-2.5-flash", "retrieve_documents", "anthropic_llm_claude-sonnet-4"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.00004" }]

[[cost_allocations]]
action = "gemini_llm_gemini-2.5-flash"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.000002" }]

[[cost_allocations]]
action = "anthropic_llm_claude-sonnet-4"
measure = "output_token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.000015" }]

[[cost_allocations]]
action = "retrieve_documents"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.001" }]

[[outcomes]]
action = "delivery"
"#;

// ---------------------------------------------------------------------------------------------
// The Python side
// ---------------------------------------------------------------------------------------------

/// Progress lines that show even while libtest captures output.
fn progress(message: &str) {
    let _ = writeln!(std::io::stderr(), "[ingest_otlp] {message}");
}

/// The venv's python, created and filled from `tests/python/requirements-otlp.txt` on first use
/// (idempotent: a stamp file holds the requirements it was built from).
fn venv_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(build_venv).clone()
}

fn build_venv() -> PathBuf {
    let requirements_path = repo_root().join("tests/python/requirements-otlp.txt");
    let requirements = std::fs::read_to_string(&requirements_path).unwrap();
    let home = std::env::var("HOME").expect("HOME is set");
    let cache = PathBuf::from(home).join(".cache/agentmeter");
    std::fs::create_dir_all(&cache).unwrap();
    let venv = cache.join("venv-otlp");
    let python = venv.join("bin/python");
    let stamp = venv.join(".agentmeter-requirements");
    // Another test process may be building the same venv: one at a time.
    let lock = File::create(cache.join("venv-otlp.lock")).unwrap();
    lock.lock().expect("lock the venv");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&requirements) {
        return python;
    }
    let started = Instant::now();
    if !python.exists() {
        progress(&format!("creating the Python venv {}", venv.display()));
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is installed (value-python needs Python 3.9 to 3.13)");
        assert!(
            status.success(),
            "python3 -m venv {} failed",
            venv.display()
        );
    }
    progress(&format!(
        "installing {} into the venv (value-python 0.1.6, OpenTelemetry SDK and exporters)",
        requirements_path.display()
    ));
    // pip's own output goes straight to the terminal, so progress is visible.
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--timeout",
            "30",
            "--retries",
            "2",
            "-r",
        ])
        .arg(&requirements_path)
        .stdin(Stdio::null())
        .status()
        .expect("run pip");
    assert!(
        status.success(),
        "pip could not install {} ({status}). Is the Python package index (PyPI) reachable from \
         this machine? pip's output is above; rerun the test once it is.",
        requirements_path.display()
    );
    std::fs::write(&stamp, &requirements).unwrap();
    progress(&format!("venv ready in {:.0?}", started.elapsed()));
    python
}

/// Runs a script of `tests/python` with only the given OTel / value settings in its environment.
fn run_python(python: &Path, script: &str, vars: &[(&str, String)]) -> (bool, String, String) {
    let mut command = Command::new(python);
    command.arg(repo_root().join("tests/python").join(script));
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") || name.starts_with("VALUE_") {
            command.env_remove(name);
        }
    }
    command
        .envs(vars.iter().map(|(name, value)| (*name, value.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start python");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// The JSON summary a script prints as its last line.
fn summary(stdout: &str) -> Value {
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|_| panic!("no JSON summary in {stdout:?}"))
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap_or_else(|_| panic!("not a decimal: {text}"))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn start_pipeline(env: &mut TestEnv, ingest_env: &[(&str, &str)]) {
    env.apply_config(&metering_config(
        "ws_otlp",
        &[("acc_acme", ACME_SECRET), ("acc_globex", GLOBEX_SECRET)],
        METERING,
    ));
    env.spawn_with_env("ingest", "ingest", ingest_env);
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
}

/// The value of one Prometheus sample of ingest's `/metrics` (0 when absent).
fn metric(env: &TestEnv, sample: &str) -> f64 {
    let text = metrics_text(env.run.ingest_port).expect("ingest /metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An OTLP/HTTP answer.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Vec<u8>,
}

fn post_traces(
    env: &TestEnv,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{}/v1/traces", env.otlp_http_url()))
        .header("content-type", content_type)
        .timeout(Duration::from_secs(30))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().expect("OTLP/HTTP reachable");
    Answer {
        status: response.status().as_u16(),
        retry_after: response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_string()),
        body: response.bytes().unwrap().to_vec(),
    }
}

/// One OTLP/JSON span.
fn json_span(
    trace_id: &str,
    span_id: &str,
    name: &str,
    start_nanos: u64,
    attributes: Value,
) -> Value {
    json!({
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": 1,
        "startTimeUnixNano": start_nanos.to_string(),
        "endTimeUnixNano": (start_nanos + 1_000_000).to_string(),
        "attributes": attributes,
    })
}

/// An OTLP/JSON request of one resource.
fn json_request(resource: Value, spans: Vec<Value>) -> Vec<u8> {
    json!({"resourceSpans": [{
        "resource": {"attributes": resource},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}]
    }]})
    .to_string()
    .into_bytes()
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// A protobuf request with one `value.action` span per (span id byte, action name).
fn protobuf_request(agent_id: &str, actions: &[(u8, &str)]) -> Vec<u8> {
    let start = now_nanos();
    let spans = actions
        .iter()
        .map(|(id, name)| Span {
            trace_id: vec![*id; 16],
            span_id: vec![*id; 8],
            name: "value.action".to_string(),
            start_time_unix_nano: start,
            end_time_unix_nano: start + 1000,
            attributes: vec![
                kv("value.action.name", name),
                kv("value.action.anonymous_id", "anon_proto"),
                kv("value.action.user_attributes", "{}"),
            ],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "bad-input-test"),
                    kv("value.agent.id", agent_id),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn row_map(columns: &[&str], row: &[String]) -> BTreeMap<String, String> {
    columns
        .iter()
        .zip(row)
        .map(|(column, value)| (column.to_string(), value.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// a. The real SDK
// ---------------------------------------------------------------------------------------------

#[test]
fn value_python_research_agent_is_metered_over_otlp_grpc() {
    let python = venv_python();
    let mut env = TestEnv::new("otlp_sdk", "");
    start_pipeline(&mut env, &[]);
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");

    let started = Instant::now();
    let vars = [
        ("VALUE_AGENT_SECRET", ACME_SECRET.to_string()),
        ("VALUE_BACKEND_URL", env.ingest_url()),
        ("VALUE_OTEL_ENDPOINT", env.otlp_grpc_url()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            format!("x-agent-secret={ACME_SECRET}"),
        ),
    ];
    let (ok, stdout, stderr) = run_python(&python, "research_agent.py", &vars);
    assert!(
        ok,
        "research_agent.py failed:\n{stdout}\n{stderr}\n{}",
        env.logs()
    );
    let info = summary(&stdout);
    assert_eq!(info["agent_id"], "inst_acc_acme", "{info}");
    assert_eq!(info["workspace_id"], "ws_otlp", "{info}");
    assert_eq!(info["flushed"], true, "{info}");
    progress(&format!("research agent ran in {:.1?}", started.elapsed()));

    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        4,
        Duration::from_secs(90),
    );
    let columns = [
        "action_name",
        "kind",
        "user_id",
        "anonymous_id",
        "description",
        "attributes_json",
        "input_tokens",
        "output_tokens",
        "llm_model",
        "reported_cost",
        "source",
        "account_id",
        "agent_instance_id",
        "tracked",
        "outcome",
        "measure",
        "quantity",
        "cost",
        "event_id",
    ];
    let rows: Vec<BTreeMap<String, String>> = env
        .query(&format!(
            "SELECT {} FROM actions FINAL ORDER BY action_name, anonymous_id",
            columns.join(", ")
        ))
        .iter()
        .map(|row| row_map(&columns, row))
        .collect();
    let names: Vec<&str> = rows.iter().map(|row| row["action_name"].as_str()).collect();
    assert_eq!(names, ["delivery", "llm_call", "web_search", "web_search"]);
    for row in &rows {
        assert_eq!(row["kind"], "action");
        assert_eq!(row["source"], "otlp_grpc");
        assert_eq!(row["account_id"], "acc_acme");
        assert_eq!(row["agent_instance_id"], "inst_acc_acme");
        assert_eq!(row["tracked"], "1");
        // event_id = hex trace id - hex span id
        let (trace, span) = row["event_id"].split_once('-').unwrap();
        assert_eq!((trace.len(), span.len()), (32, 16), "{}", row["event_id"]);
        assert!(row["event_id"]
            .chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
    let attributes = |row: &BTreeMap<String, String>| -> Value {
        serde_json::from_str(&row["attributes_json"]).unwrap()
    };

    let delivery = &rows[0];
    assert_eq!(
        (
            delivery["user_id"].as_str(),
            delivery["anonymous_id"].as_str()
        ),
        ("user_acme_123", "session_acme_1")
    );
    assert_eq!(delivery["description"], "Sent summary to user");
    assert_eq!(attributes(delivery), json!({"delivery_method": "email"}));
    assert_eq!(delivery["outcome"], "1");

    let llm = &rows[1];
    assert_eq!(llm["user_id"], "user_acme_123");
    assert_eq!(llm["description"], "Summarized search results");
    assert_eq!(
        attributes(llm),
        json!({"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800, "cost_usd": 0.12})
    );
    assert_eq!(
        (llm["input_tokens"].as_str(), llm["output_tokens"].as_str()),
        ("2500", "800")
    );
    assert_eq!(llm["llm_model"], "gpt-4");
    assert_eq!(dec(&llm["reported_cost"]), dec("0.12"));
    assert_eq!(llm["measure"], "token");
    assert_eq!(dec(&llm["quantity"]), dec("3300"));
    assert_eq!(dec(&llm["cost"]), dec("0.132"));

    let search = &rows[2];
    assert_eq!(
        (search["user_id"].as_str(), search["anonymous_id"].as_str()),
        ("user_acme_123", "session_acme_1")
    );
    assert_eq!(search["description"], "Searched for: market trends in AI");
    assert_eq!(
        attributes(search),
        json!({"results_count": 2, "search_provider": "google"})
    );
    assert_eq!(dec(&search["cost"]), dec("0.005"));
    assert_eq!(search["input_tokens"], "\\N");

    let trial = &rows[3];
    assert_eq!(
        (trial["user_id"].as_str(), trial["anonymous_id"].as_str()),
        ("", "trial_session_abc")
    );
    assert_eq!(
        attributes(trial),
        json!({"results_count": 1, "search_provider": "google"})
    );

    // Windowed usage with the configured costs.
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        4,
        Duration::from_secs(60),
    );
    let usage: BTreeMap<String, (String, Decimal, Decimal, String)> = env
        .query(
            "SELECT action_name, sum(action_count), sum(quantity), sum(cost), sum(outcome_count) \
             FROM usage_exact GROUP BY action_name ORDER BY action_name",
        )
        .into_iter()
        .map(|row| {
            (
                row[0].clone(),
                (row[1].clone(), dec(&row[2]), dec(&row[3]), row[4].clone()),
            )
        })
        .collect();
    assert_eq!(
        usage["web_search"],
        ("2".to_string(), dec("2"), dec("0.01"), "0".to_string())
    );
    assert_eq!(
        usage["llm_call"],
        ("1".to_string(), dec("3300"), dec("0.132"), "0".to_string())
    );
    assert_eq!(usage["delivery"].0, "1");
    assert_eq!(usage["delivery"].3, "1");
    let users = env.query("SELECT uniqExact(user_key) FROM usage_exact");
    assert_eq!(users[0][0], "2");

    // The same agent without OTEL_EXPORTER_OTLP_HEADERS: initialize_sync still works (it sends
    // the secret itself), the export is refused as UNAUTHENTICATED, counted, logged with the fix,
    // and nothing reaches Kafka.
    let failures_before = metric(
        &env,
        "agentmeter_ingest_auth_failures_total{reason=\"missing_secret\"}",
    );
    let (ok, stdout, stderr) = run_python(&python, "research_agent.py", &vars[..3]);
    assert!(
        ok,
        "research_agent.py without headers failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("UNAUTHENTICATED"),
        "the exporter should log the refusal:\n{stderr}"
    );
    let failures_after = metric(
        &env,
        "agentmeter_ingest_auth_failures_total{reason=\"missing_secret\"}",
    );
    assert!(
        failures_after > failures_before,
        "{failures_before} -> {failures_after}"
    );
    let log = std::fs::read_to_string(env.dir.join("ingest.log")).unwrap();
    assert!(
        log.contains("set OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret="),
        "{log}"
    );
    assert_eq!(env.read_topic("actions.raw").len(), 4);

    // SIGTERM: the REST and both OTLP servers drain and ingest exits cleanly.
    let status = env.process(0).terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "ingest exited with {status}\n{}",
        env.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// b. OpenTelemetry's own SDK, GenAI spans
// ---------------------------------------------------------------------------------------------

#[test]
fn opentelemetry_genai_spans_become_llm_actions_with_auto_tags() {
    let python = venv_python();
    let mut env = TestEnv::new("otlp_genai", "");
    start_pipeline(&mut env, &[]);
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");

    let (ok, stdout, stderr) = run_python(
        &python,
        "genai_spans.py",
        &[
            (
                "OTLP_HTTP_TRACES_URL",
                format!("{}/v1/traces", env.otlp_http_url()),
            ),
            ("AGENT_SECRET", GLOBEX_SECRET.to_string()),
        ],
    );
    assert!(
        ok,
        "genai_spans.py failed:\n{stdout}\n{stderr}\n{}",
        env.logs()
    );
    assert_eq!(summary(&stdout)["flushed"], true);

    // OTLP/JSON from here: int64 spelled as strings, and the same request twice, as an
    // exporter's retry would send it. Both copies reach Kafka with one event id; it counts once.
    let body = json_request(
        json!([{"key": "value.agent.id", "value": {"stringValue": "inst_acc_globex"}}]),
        vec![json_span(
            "0af7651916cd43dd8448eb211c80319c",
            "b7ad6b7169203331",
            "chat claude-sonnet-4",
            now_nanos(),
            json!([
                {"key": "gen_ai.provider.name", "value": {"stringValue": "Anthropic"}},
                {"key": "gen_ai.request.model", "value": {"stringValue": "claude-sonnet-4"}},
                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "15"}},
                {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "5"}},
                {"key": "value.action.user_id", "value": {"stringValue": "user_json"}}
            ]),
        )],
    );
    for _ in 0..2 {
        let answer = post_traces(
            &env,
            "application/json",
            &[("x-agent-secret", GLOBEX_SECRET)],
            body.clone(),
        );
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let response: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(response, json!({}), "full success has no partialSuccess");
    }

    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        6,
        Duration::from_secs(90),
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        6,
        Duration::from_secs(60),
    );
    let raw: Vec<_> = env
        .read_topic("actions.raw")
        .iter()
        .map(|record| agentmeter_schemas::decode_raw_action(&record.payload).unwrap())
        .collect();
    assert_eq!(raw.len(), 7);
    let retried = raw
        .iter()
        .filter(|action| action.event_id == "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331")
        .count();
    assert_eq!(retried, 2);
    assert!(raw
        .iter()
        .all(|action| action.agent_instance_id == "inst_acc_globex"));

    let columns = [
        "action_name",
        "kind",
        "trace_event",
        "llm_provider",
        "llm_model",
        "user_id",
        "anonymous_id",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "tracked",
        "measure",
        "quantity",
        "cost",
        "source",
    ];
    let rows: Vec<BTreeMap<String, String>> = env
        .query(&format!(
            "SELECT {} FROM actions FINAL ORDER BY action_name, user_id, anonymous_id",
            columns.join(", ")
        ))
        .iter()
        .map(|row| row_map(&columns, row))
        .collect();
    let view: Vec<Vec<&str>> = rows
        .iter()
        .map(|row| {
            [
                "action_name",
                "kind",
                "trace_event",
                "llm_provider",
                "llm_model",
                "user_id",
                "anonymous_id",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "tracked",
                "source",
            ]
            .iter()
            .map(|column| row[*column].as_str())
            .collect()
        })
        .collect();
    assert_eq!(
        view,
        vec![
            vec![
                "anthropic_llm_claude-sonnet-4",
                "llm",
                "chat claude-sonnet-4",
                "anthropic",
                "claude-sonnet-4",
                "user_json",
                "",
                "15",
                "5",
                "\\N",
                "1",
                "otlp_http"
            ],
            vec![
                "gemini_llm_gemini-2.5-flash",
                "llm",
                "generate_content gemini-2.5-flash",
                "gemini",
                "gemini-2.5-flash",
                "user_current",
                "anon_current",
                "300",
                "60",
                "400",
                "1",
                "otlp_http"
            ],
            vec![
                "gemini_llm_gemini-2.5-flash",
                "llm",
                "gemini.generate_content",
                "gemini",
                "gemini-2.5-flash",
                "user_legacy",
                "anon_legacy",
                "100",
                "40",
                "140",
                "1",
                "otlp_http"
            ],
            vec![
                "gemini_llm_gemini-2.5-flash",
                "llm",
                "gemini.generate_content",
                "gemini",
                "gemini-2.5-flash",
                "user_middle",
                "anon_middle",
                "200",
                "50",
                "250",
                "1",
                "otlp_http"
            ],
            vec![
                "openai_llm_gpt-4o",
                "llm",
                "chat gpt-4o",
                "openai",
                "gpt-4o",
                "",
                "anon_openai",
                "12",
                "7",
                "\\N",
                "0",
                "otlp_http"
            ],
            vec![
                "retrieve_documents",
                "trace_event",
                "retrieve_documents",
                "",
                "",
                "",
                "anon_rag",
                "\\N",
                "\\N",
                "\\N",
                "1",
                "otlp_http"
            ],
        ]
    );
    // Token measure: input + output, where Gemini's thinking tokens (total − input − output,
    // 40 in the current generation's span) are billed as output.
    let quantities: Vec<Decimal> = rows[1..4].iter().map(|row| dec(&row["quantity"])).collect();
    assert_eq!(quantities, vec![dec("400"), dec("140"), dec("250")]);
    assert_eq!(dec(&rows[0]["quantity"]), dec("5"), "output_token measure");
    assert_eq!(dec(&rows[0]["cost"]), dec("0.000075"));

    let usage: BTreeMap<String, (String, Decimal, Decimal)> = env
        .query("SELECT action_name, sum(action_count), sum(quantity), sum(cost) FROM usage_exact GROUP BY action_name ORDER BY action_name")
        .into_iter()
        .map(|row| (row[0].clone(), (row[1].clone(), dec(&row[2]), dec(&row[3]))))
        .collect();
    assert_eq!(
        usage["gemini_llm_gemini-2.5-flash"],
        ("3".to_string(), dec("790"), dec("0.00158"))
    );
    assert_eq!(
        usage["anthropic_llm_claude-sonnet-4"],
        ("1".to_string(), dec("5"), dec("0.000075"))
    );
    assert_eq!(
        usage["retrieve_documents"],
        ("1".to_string(), dec("1"), dec("0.001"))
    );
    assert_eq!(
        usage["openai_llm_gpt-4o"],
        ("1".to_string(), dec("0"), dec("0"))
    );
}

// ---------------------------------------------------------------------------------------------
// c. Bad input
// ---------------------------------------------------------------------------------------------

/// One bad-input case: name, Content-Type, headers, body, expected answer.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, Expect);

/// What a bad-input case expects back.
enum Expect {
    /// The whole request refused: this status and a message containing the text.
    Refused(u16, &'static str),
    /// 200 with partial success: this many spans rejected, the message containing the text.
    Partial(i64, &'static str),
}

#[test]
fn bad_otlp_http_input_is_refused_with_a_reason_and_writes_nothing() {
    let mut env = TestEnv::new("otlp_bad", "");
    start_pipeline(
        &mut env,
        &[
            ("AGENTMETER__INGEST__MAX_BODY_BYTES", "65536"),
            ("AGENTMETER__INGEST__MAX_SPANS_PER_REQUEST", "50"),
        ],
    );
    const JSON: &str = "application/json";
    const PROTOBUF: &str = "application/x-protobuf";
    let acme = [("x-agent-secret", ACME_SECRET)];
    let now = now_nanos();
    let action_span = |span_id: &str, name: &str, start: u64, user_attributes: &str| {
        json_span(
            "4bf92f3577b34da6a3ce929d0e0e4736",
            span_id,
            "value.action",
            start,
            json!([
                {"key": "value.action.name", "value": {"stringValue": name}},
                {"key": "value.action.anonymous_id", "value": {"stringValue": "anon_bad"}},
                {"key": "value.action.user_attributes", "value": {"stringValue": user_attributes}}
            ]),
        )
    };
    let resource = json!([{"key": "value.agent.id", "value": {"stringValue": "inst_acc_acme"}}]);
    let good_json = json_request(
        resource.clone(),
        vec![action_span("00f067aa0ba902b7", "web_search", now, "{}")],
    );
    let many_spans: Vec<Value> = (0..51)
        .map(|index| action_span(&format!("{:016x}", index + 1), "web_search", now, "{}"))
        .collect();
    let old = now - 40 * 86_400 * 1_000_000_000;

    let cases: Vec<Case> = vec![
        ("malformed protobuf", PROTOBUF, acme.to_vec(), b"\x0a\xff\xff\xff\xff\x0f garbage".to_vec(),
            Expect::Refused(400, "invalid protobuf ExportTraceServiceRequest")),
        ("malformed JSON", JSON, acme.to_vec(), b"{\"resourceSpans\": [".to_vec(),
            Expect::Refused(400, "invalid OTLP/JSON ExportTraceServiceRequest")),
        ("not gzip", JSON, vec![("x-agent-secret", ACME_SECRET), ("content-encoding", "gzip")], good_json.clone(),
            Expect::Refused(400, "invalid gzip body")),
        ("unsupported content type", "text/plain", acme.to_vec(), good_json.clone(),
            Expect::Refused(415, "Content-Type must be application/x-protobuf or application/json")),
        ("missing secret", JSON, vec![], good_json.clone(),
            Expect::Refused(401, "missing agent secret")),
        ("missing secret (protobuf)", PROTOBUF, vec![], protobuf_request("inst_acc_acme", &[(1, "web_search")]),
            Expect::Refused(401, "OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret=")),
        ("wrong secret", JSON, vec![("x-agent-secret", "not-a-secret")], good_json.clone(),
            Expect::Refused(401, "unknown agent secret")),
        ("wrong bearer", PROTOBUF, vec![("authorization", "Bearer not-a-secret")], protobuf_request("inst_acc_acme", &[(1, "web_search")]),
            Expect::Refused(401, "unknown agent secret")),
        ("spoofed value.agent.id", PROTOBUF, acme.to_vec(), protobuf_request("inst_acc_globex", &[(1, "web_search")]),
            Expect::Refused(403, "value.agent.id=\"inst_acc_globex\"")),
        ("oversized body", JSON, acme.to_vec(), vec![b' '; 70_000],
            Expect::Refused(413, "larger than 65536 bytes")),
        ("too many spans", JSON, acme.to_vec(), json_request(resource.clone(), many_spans),
            Expect::Refused(400, "the request holds 51 spans; at most 50")),
        ("timestamp out of window", JSON, acme.to_vec(), json_request(resource.clone(), vec![action_span("00000000000000a1", "web_search", old, "{}")]),
            Expect::Partial(1, "days in the past")),
        ("timestamp in the future", JSON, acme.to_vec(), json_request(resource.clone(), vec![action_span("00000000000000a2", "web_search", now + 3_600_000_000_000, "{}")]),
            Expect::Partial(1, "in the future")),
        ("bad user_attributes JSON", JSON, acme.to_vec(), json_request(resource.clone(), vec![action_span("00000000000000a3", "llm_call", now, "{\"model\": gpt-4")]),
            Expect::Partial(1, "value.action.user_attributes is not valid JSON")),
        ("bad action name", JSON, acme.to_vec(), json_request(resource.clone(), vec![action_span("00000000000000a4", "bad\u{7}name", now, "{}")]),
            Expect::Partial(1, "is not a valid action name")),
        // Partial success: the good span is accepted, the bad one named in the message.
        ("one good, one bad", JSON, acme.to_vec(), json_request(resource.clone(), vec![
                action_span("00000000000000b1", "delivery", now, "{\"delivery_method\": \"email\"}"),
                action_span("00000000000000b2", "llm_call", now, "not json"),
            ]),
            Expect::Partial(1, "1 of 2 spans rejected: span \"value.action\" (4bf92f3577b34da6a3ce929d0e0e4736-00000000000000b2)")),
    ];

    for (name, content_type, headers, body, expect) in cases {
        let answer = post_traces(&env, content_type, &headers, body);
        match expect {
            Expect::Refused(status, text) => {
                // The body is a google.rpc.Status in the request's encoding (JSON if unknown).
                let message = if content_type == PROTOBUF {
                    RpcStatus::decode(answer.body.as_slice())
                        .unwrap_or_else(|error| panic!("{name}: not a google.rpc.Status: {error}"))
                        .message
                } else {
                    let status: Value = serde_json::from_slice(&answer.body)
                        .unwrap_or_else(|error| panic!("{name}: not JSON: {error}"));
                    status["message"].as_str().unwrap_or_default().to_string()
                };
                assert_eq!(answer.status, status, "{name}: {message}");
                assert!(
                    message.contains(text),
                    "{name}: {message:?} should contain {text:?}"
                );
                assert_eq!(
                    answer.retry_after, None,
                    "{name}: a permanent error has no Retry-After"
                );
            }
            Expect::Partial(rejected, text) => {
                assert_eq!(
                    answer.status,
                    200,
                    "{name}: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                let response: Value = serde_json::from_slice(&answer.body).unwrap();
                assert_eq!(
                    response["partialSuccess"]["rejectedSpans"], rejected,
                    "{name}: {response}"
                );
                let message = response["partialSuccess"]["errorMessage"].as_str().unwrap();
                assert!(
                    message.contains(text),
                    "{name}: {message:?} should contain {text:?}"
                );
            }
        }
    }

    // Protobuf partial success is a protobuf ExportTraceServiceResponse.
    let invalid = Span {
        trace_id: vec![7; 16],
        span_id: vec![7; 8],
        name: "no_time".to_string(),
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![invalid],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let answer = post_traces(&env, PROTOBUF, &acme, request.encode_to_vec());
    assert_eq!(answer.status, 200);
    let response = ExportTraceServiceResponse::decode(answer.body.as_slice()).unwrap();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial
            .error_message
            .contains("neither a start nor an end time"),
        "{}",
        partial.error_message
    );

    // Only the good span of the mixed request reached Kafka: nothing of any refused request,
    // and nothing of any rejected span.
    let raw: Vec<_> = env
        .read_topic("actions.raw")
        .iter()
        .map(|record| agentmeter_schemas::decode_raw_action(&record.payload).unwrap())
        .collect();
    let event_ids: Vec<&str> = raw.iter().map(|action| action.event_id.as_str()).collect();
    assert_eq!(
        event_ids,
        ["4bf92f3577b34da6a3ce929d0e0e4736-00000000000000b1"]
    );
    assert_eq!(raw[0].action_name, "delivery");
    assert_eq!(raw[0].source, "otlp_http");
    assert_eq!(raw[0].attributes_json, r#"{"delivery_method":"email"}"#);

    // Every refusal and rejection is counted.
    assert!(
        metric(
            &env,
            "agentmeter_ingest_requests_total{endpoint=\"otlp_http\",status=\"401\"}"
        ) >= 4.0
    );
    assert!(
        metric(
            &env,
            "agentmeter_ingest_actions_rejected_total{reason=\"bad_user_attributes\"}"
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &env,
            "agentmeter_ingest_actions_accepted_total{source=\"otlp_http\"}"
        ),
        1.0
    );
}
