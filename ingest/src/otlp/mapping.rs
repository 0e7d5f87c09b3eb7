//! OTLP spans → [`RawAction`]s: the pure mapping, with no I/O (the table is in `docs/otlp.md`).
//!
//! Three kinds of spans, recognised in this order:
//! * **`value.action`** (span name `value.action`, or any span with `value.action.name`): what
//!   value-python's `ctx.send` emits → kind `action`. The name, user, description come from the
//!   standard `value.action.*` keys; `value.action.user_attributes` is a JSON *string* parsed into
//!   the attributes object; model, tokens and reported cost come from `value.action.llm.*`, else
//!   from `model` / `input_tokens` / `output_tokens` / `total_tokens` / `cost_usd` inside the
//!   user attributes.
//! * **GenAI** (any span with `gen_ai.provider.name` or `gen_ai.system`, whatever its name) → kind
//!   `llm`, action name = the auto tag `<provider>_llm_<model>`, the span name kept as
//!   `trace_event`. Current and legacy token names are read, so every generation of OpenLLMetry's
//!   Gemini instrumentor gives the same action.
//! * **anything else** → kind `trace_event`, action name = the span name (counted only when the
//!   workspace tracks that name).
//!
//! Identity never comes from the spans: workspace, account and agent instance are those of the
//! agent secret, and a resource that claims another `value.agent.id` fails the whole request.
//! A problem with one span rejects that span only ([`SpanError`]); the caller reports it through
//! OTLP's partial success.

use agentmeter_schemas::limits::{check_raw_action, check_token_count, MAX_TOKEN_COUNT};
use agentmeter_schemas::metering::check_action_name as check_action_name_rules;
use agentmeter_schemas::text::{check_free_text, check_name, MaxLength, MAX_ATTRIBUTE_KEY_BYTES};
use agentmeter_schemas::{ActionKind, RawAction};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Map, Value};

use crate::auth::AgentIdentity;
use crate::normalize::{
    check_attributes, check_description, check_id, check_occurred_at, Limits, LlmFields,
};

/// Name of the spans value-python's `ctx.send` emits.
pub const VALUE_ACTION_SPAN: &str = "value.action";
/// Resource attribute in which value-python states the agent instance id.
pub const RESOURCE_AGENT_ID: &str = "value.agent.id";
/// Longest text kept for one attribute of a GenAI or trace-event span (characters).
pub const MAX_SPAN_ATTRIBUTE_CHARS: usize = 256;
/// Longest `value.action.llm.prompt` / `value.action.llm.response` kept (characters).
pub const MAX_LLM_TEXT_CHARS: usize = 1024;

/// Attribute-name prefixes that carry prompt or completion *content*. Metering needs none of it,
/// and it is large and often sensitive, so it is never copied into the attributes.
const CONTENT_PREFIXES: &[&str] = &[
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.definitions",
    "llm.prompts",
    "llm.completions",
    "llm.request.functions",
    "traceloop.entity.input",
    "traceloop.entity.output",
];

/// Which OTLP transport a request came in on; it becomes the action's `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpSource {
    Grpc,
    Http,
}

impl OtlpSource {
    /// The `source` of the actions and the `endpoint` label of the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpSource::Grpc => "otlp_grpc",
            OtlpSource::Http => "otlp_http",
        }
    }
}

/// Why one span did not become an action. The message is shown to the agent's developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("{0}")]
    InvalidIds(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidUser(String),
    #[error("value.action.user_attributes {0}")]
    UserAttributes(String),
    #[error("{0}")]
    InvalidAttribute(String),
    #[error("{0}")]
    AttributeLimits(String),
    #[error("span has neither a start nor an end time")]
    MissingTime,
    #[error("{0}")]
    OutsideTimeWindow(String),
}

impl SpanError {
    /// A short, stable code: the `reason` label of `agentmeter_ingest_actions_rejected_total`.
    pub fn code(&self) -> &'static str {
        match self {
            SpanError::InvalidIds(_) => "invalid_span_ids",
            SpanError::InvalidName(_) => "invalid_name",
            SpanError::InvalidUser(_) => "invalid_user",
            SpanError::UserAttributes(_) => "bad_user_attributes",
            SpanError::InvalidAttribute(_) => "invalid_attribute",
            SpanError::AttributeLimits(_) => "attribute_limits",
            SpanError::MissingTime | SpanError::OutsideTimeWindow(_) => "outside_time_window",
        }
    }
}

/// A span that was not accepted, for the partial-success message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRejection {
    pub span_name: String,
    /// `trace_id-span_id` in hex (as far as the ids could be read).
    pub span_ref: String,
    pub error: SpanError,
}

impl std::fmt::Display for SpanRejection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "span {:?} ({}): {}",
            truncate_chars(&self.span_name, 64),
            self.span_ref,
            self.error
        )
    }
}

/// Why a whole request is refused: nothing of it is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the request holds {count} spans; at most {max} are accepted in one request (lower the exporter's batch size, e.g. OTEL_BSP_MAX_EXPORT_BATCH_SIZE)")]
    TooManySpans { count: usize, max: usize },
    #[error("the resource says value.agent.id={claimed:?}, but the agent secret belongs to agent instance {actual:?}; nothing was accepted (is the agent using another agent's secret?)")]
    AgentMismatch { claimed: String, actual: String },
}

impl RequestError {
    /// The `reason` label of `agentmeter_ingest_actions_rejected_total`.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::TooManySpans { .. } => "too_many_spans",
            RequestError::AgentMismatch { .. } => "agent_mismatch",
        }
    }
}

/// The outcome of mapping one request: the accepted actions and the rejected spans.
#[derive(Debug, Clone, Default)]
pub struct MappedRequest {
    pub actions: Vec<RawAction>,
    pub rejected: Vec<SpanRejection>,
}

impl MappedRequest {
    /// The OTLP partial-success message: how many spans were rejected, and the first few
    /// problems with their span names. Empty when every span was accepted.
    pub fn error_message(&self, shown: usize) -> String {
        if self.rejected.is_empty() {
            return String::new();
        }
        let total = self.actions.len() + self.rejected.len();
        let mut message = format!(
            "{} of {total} spans rejected: {}",
            self.rejected.len(),
            self.rejected
                .iter()
                .take(shown)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
        if self.rejected.len() > shown {
            message.push_str(&format!("; and {} more", self.rejected.len() - shown));
        }
        message
    }
}

/// Number of spans in a request.
pub fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|resource_spans| &resource_spans.scope_spans)
        .map(|scope_spans| scope_spans.spans.len())
        .sum()
}

/// Maps every span of a request for the authenticated agent. Request-wide problems (too many
/// spans, a resource claiming another agent) fail it whole; span problems reject single spans.
pub fn map_request(
    request: &ExportTraceServiceRequest,
    identity: &AgentIdentity,
    limits: &Limits,
    max_spans: usize,
    source: OtlpSource,
) -> Result<MappedRequest, RequestError> {
    let count = span_count(request);
    if count > max_spans {
        return Err(RequestError::TooManySpans {
            count,
            max: max_spans,
        });
    }
    for resource_spans in &request.resource_spans {
        let claimed = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| text_attribute(&resource.attributes, RESOURCE_AGENT_ID));
        if let Some(claimed) = claimed.filter(|claimed| !claimed.is_empty()) {
            if claimed != identity.instance.id {
                return Err(RequestError::AgentMismatch {
                    claimed,
                    actual: identity.instance.id.clone(),
                });
            }
        }
    }
    let mut mapped = MappedRequest {
        actions: Vec::with_capacity(count),
        rejected: Vec::new(),
    };
    let spans = request
        .resource_spans
        .iter()
        .flat_map(|resource_spans| &resource_spans.scope_spans)
        .flat_map(|scope_spans| &scope_spans.spans);
    for span in spans {
        match span_to_action(span, identity, limits, source) {
            Ok(action) => mapped.actions.push(action),
            Err(error) => mapped.rejected.push(SpanRejection {
                span_name: span.name.clone(),
                span_ref: span_ref(span),
                error,
            }),
        }
    }
    Ok(mapped)
}

/// Maps one span to an action of the authenticated agent.
pub fn span_to_action(
    span: &Span,
    identity: &AgentIdentity,
    limits: &Limits,
    source: OtlpSource,
) -> Result<RawAction, SpanError> {
    let event_id = event_id(span)?;
    let occurred_at_micros = occurred_at_micros(span)?;
    check_occurred_at(occurred_at_micros, limits).map_err(SpanError::OutsideTimeWindow)?;
    let attributes = &span.attributes;
    let user_id = user_attribute(attributes, "value.action.user_id")?;
    let anonymous_id = user_attribute(attributes, "value.action.anonymous_id")?;
    let shape = if span.name == VALUE_ACTION_SPAN || has_attribute(attributes, "value.action.name")
    {
        value_action(attributes, limits)?
    } else if let Some(provider) = genai_provider(attributes) {
        genai_call(span, &provider, attributes, limits)?
    } else {
        trace_event(span, attributes, limits)?
    };
    let action = RawAction {
        event_id,
        workspace_id: identity.workspace.workspace_id().to_string(),
        account_id: identity.instance.account.clone(),
        agent_instance_id: identity.instance.id.clone(),
        kind: shape.kind,
        action_name: shape.action_name,
        trace_event: shape.trace_event,
        user_id,
        anonymous_id,
        occurred_at_micros,
        received_at_micros: limits.now_micros,
        description: shape.description,
        llm_provider: shape.llm_provider,
        llm_model: shape.llm.model,
        input_tokens: shape.llm.input_tokens,
        output_tokens: shape.llm.output_tokens,
        total_tokens: shape.llm.total_tokens,
        reported_cost: shape.llm.reported_cost,
        attributes_json: shape.attributes_json,
        source: source.as_str().to_string(),
        outcome_value: None,
    };
    // The enricher's rule for every value; the checks above already explained any problem.
    check_raw_action(&action).map_err(|error| SpanError::InvalidAttribute(error.to_string()))?;
    Ok(action)
}

/// What distinguishes the three kinds of spans; the rest of the action is common.
struct ActionShape {
    kind: ActionKind,
    action_name: String,
    trace_event: Option<String>,
    description: Option<String>,
    llm_provider: Option<String>,
    llm: LlmFields,
    attributes_json: String,
}

/// Standard `value.action.*` keys that become columns rather than attributes.
const VALUE_ACTION_COLUMNS: &[&str] = &[
    "value.action.name",
    "value.action.user_id",
    "value.action.anonymous_id",
    "value.action.description",
    "value.action.user_attributes",
    "value.action.llm.model",
    "value.action.llm.input_tokens",
    "value.action.llm.output_tokens",
    "value.action.llm.total_tokens",
];

fn value_action(attributes: &[KeyValue], limits: &Limits) -> Result<ActionShape, SpanError> {
    let action_name = text_attribute(attributes, "value.action.name")
        .filter(|name| !name.is_empty())
        .ok_or_else(|| {
            SpanError::InvalidName(
                "a value.action span needs a value.action.name attribute".to_string(),
            )
        })?;
    check_action_name("value.action.name", &action_name)?;
    let description = text_attribute(attributes, "value.action.description")
        .filter(|description| !description.is_empty());
    if let Some(description) = &description {
        check_description(description)
            .map_err(|problem| SpanError::InvalidAttribute(format!("value.action.{problem}")))?;
    }
    let mut object = user_attributes(attributes)?;
    let from_user_attributes =
        LlmFields::from_attributes(&object).map_err(SpanError::InvalidAttribute)?;
    // The other standard keys (type, status, error, duration, ...) join the attributes under
    // their short name; on a clash the user's own attribute wins.
    for pair in attributes {
        let Some(short) = pair.key.strip_prefix("value.action.") else {
            continue;
        };
        if VALUE_ACTION_COLUMNS.contains(&pair.key.as_str()) || object.contains_key(short) {
            continue;
        }
        let mut value = any_to_json(pair.value.as_ref());
        if short == "llm.prompt" || short == "llm.response" {
            value = truncate_json_text(value, MAX_LLM_TEXT_CHARS);
        }
        object.insert(short.to_string(), value);
    }
    let llm = LlmFields {
        model: text_attribute(attributes, "value.action.llm.model")
            .filter(|model| !model.is_empty())
            .or(from_user_attributes.model),
        input_tokens: integer_attribute(attributes, "value.action.llm.input_tokens")?
            .or(from_user_attributes.input_tokens),
        output_tokens: integer_attribute(attributes, "value.action.llm.output_tokens")?
            .or(from_user_attributes.output_tokens),
        total_tokens: integer_attribute(attributes, "value.action.llm.total_tokens")?
            .or(from_user_attributes.total_tokens),
        reported_cost: from_user_attributes.reported_cost,
    };
    let attributes_json = check_attributes(&object, limits).map_err(SpanError::AttributeLimits)?;
    Ok(ActionShape {
        kind: ActionKind::Action,
        action_name,
        trace_event: None,
        description,
        llm_provider: None,
        llm,
        attributes_json,
    })
}

/// `value.action.user_attributes`: a JSON object in a string (value-python's `json.dumps` of the
/// non-standard kwargs). A key-value list is accepted as the object itself.
fn user_attributes(attributes: &[KeyValue]) -> Result<Map<String, Value>, SpanError> {
    let Some(value) = attribute(attributes, "value.action.user_attributes") else {
        return Ok(Map::new());
    };
    match value {
        OtlpValue::StringValue(text) if text.trim().is_empty() => Ok(Map::new()),
        OtlpValue::StringValue(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => Ok(object),
            Ok(other) => Err(SpanError::UserAttributes(format!(
                "must be a JSON object, got {}",
                truncate_chars(&other.to_string(), 64)
            ))),
            Err(error) => Err(SpanError::UserAttributes(format!(
                "is not valid JSON ({error}): {:?}",
                truncate_chars(text, 64)
            ))),
        },
        OtlpValue::KvlistValue(_) => match any_value_to_json(value) {
            Value::Object(object) => Ok(object),
            _ => Ok(Map::new()),
        },
        _ => Err(SpanError::UserAttributes(
            "must be a string holding a JSON object".to_string(),
        )),
    }
}

/// The normalised provider of a GenAI span, if it is one.
fn genai_provider(attributes: &[KeyValue]) -> Option<String> {
    text_attribute(attributes, "gen_ai.provider.name")
        .filter(|provider| !provider.trim().is_empty())
        .or_else(|| {
            text_attribute(attributes, "gen_ai.system")
                .filter(|provider| !provider.trim().is_empty())
        })
        .map(|provider| normalize_provider(&provider))
}

/// One name per provider, whatever the instrumentation generation calls it.
pub fn normalize_provider(raw: &str) -> String {
    let lower = raw.trim().to_ascii_lowercase();
    match lower.as_str() {
        "google"
        | "gemini"
        | "gcp.gen_ai"
        | "gcp.gemini"
        | "gcp.vertex_ai"
        | "vertex_ai"
        | "vertexai"
        | "google_genai"
        | "google.genai"
        | "google_generativeai" => "gemini".to_string(),
        "openai" | "azure.ai.openai" | "az.ai.openai" | "azure_openai" => "openai".to_string(),
        "anthropic" => "anthropic".to_string(),
        "aws.bedrock" | "bedrock" => "bedrock".to_string(),
        _ => lower,
    }
}

/// The model without a resource path: `models/gemini-2.5-flash` and
/// `publishers/google/models/gemini-2.5-flash` are `gemini-2.5-flash`.
pub fn normalize_model(raw: &str) -> String {
    let trimmed = raw.trim();
    match trimmed.rfind("models/") {
        Some(index) => trimmed[index + "models/".len()..].to_string(),
        None => trimmed.to_string(),
    }
}

fn genai_call(
    span: &Span,
    provider: &str,
    attributes: &[KeyValue],
    limits: &Limits,
) -> Result<ActionShape, SpanError> {
    let model = text_attribute(attributes, "gen_ai.request.model")
        .map(|model| normalize_model(&model))
        .filter(|model| !model.is_empty())
        .or_else(|| {
            text_attribute(attributes, "gen_ai.response.model")
                .map(|model| normalize_model(&model))
                .filter(|model| !model.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let action_name = format!("{provider}_llm_{model}");
    check_action_name("auto tag", &action_name)?;
    let input_tokens = first_integer(
        attributes,
        &["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"],
    )?;
    let output_tokens = first_integer(
        attributes,
        &[
            "gen_ai.usage.output_tokens",
            "gen_ai.usage.completion_tokens",
        ],
    )?;
    let total_tokens = first_integer(
        attributes,
        &["gen_ai.usage.total_tokens", "llm.usage.total_tokens"],
    )?;
    Ok(ActionShape {
        kind: ActionKind::Llm,
        action_name,
        trace_event: Some(span.name.clone()),
        description: None,
        llm_provider: Some(provider.to_string()),
        llm: LlmFields {
            model: Some(model),
            input_tokens,
            output_tokens,
            total_tokens,
            reported_cost: None,
        },
        attributes_json: span_attributes_json(attributes, limits)?,
    })
}

fn trace_event(
    span: &Span,
    attributes: &[KeyValue],
    limits: &Limits,
) -> Result<ActionShape, SpanError> {
    check_action_name("span name", &span.name)?;
    Ok(ActionShape {
        kind: ActionKind::TraceEvent,
        action_name: span.name.clone(),
        trace_event: Some(span.name.clone()),
        description: None,
        llm_provider: None,
        llm: LlmFields::default(),
        attributes_json: span_attributes_json(attributes, limits)?,
    })
}

/// The attributes of a GenAI or trace-event span, best effort: the agent's developer does not
/// choose what an instrumentation records, so instead of rejecting the span for it, content keys
/// are skipped, long texts cut, and attributes beyond the count and size limits dropped (their
/// number is kept in `otlp.dropped_attributes`).
fn span_attributes_json(attributes: &[KeyValue], limits: &Limits) -> Result<String, SpanError> {
    let mut object = Map::new();
    let mut dropped = 0usize;
    // One slot and some bytes stay free for `otlp.dropped_attributes`.
    let max_count = limits.max_attributes.saturating_sub(1);
    let max_bytes = limits.max_attributes_bytes.saturating_sub(64);
    let mut bytes = 2usize;
    for pair in attributes {
        if pair.key == "value.action.user_id"
            || pair.key == "value.action.anonymous_id"
            || CONTENT_PREFIXES
                .iter()
                .any(|prefix| pair.key.starts_with(prefix))
        {
            continue;
        }
        let value = truncate_json_text(any_to_json(pair.value.as_ref()), MAX_SPAN_ATTRIBUTE_CHARS);
        // An instrumentation's attribute that breaks the text rules is dropped, not the span.
        if check_name(&pair.key, MaxLength::Bytes(MAX_ATTRIBUTE_KEY_BYTES)).is_err()
            || !json_text_is_clean(&value)
        {
            dropped += 1;
            continue;
        }
        let size = pair.key.len() + value.to_string().len() + 4;
        let too_large = matches!(value, Value::Array(_) | Value::Object(_))
            && value.to_string().len() > MAX_SPAN_ATTRIBUTE_CHARS;
        if too_large || object.len() >= max_count || bytes + size > max_bytes {
            dropped += 1;
            continue;
        }
        bytes += size;
        object.insert(pair.key.clone(), value);
    }
    if dropped > 0 {
        object.insert("otlp.dropped_attributes".to_string(), Value::from(dropped));
    }
    check_attributes(&object, limits).map_err(SpanError::AttributeLimits)
}

/// Whether every key and string inside `value` passes the text rules (names and free texts).
fn json_text_is_clean(value: &Value) -> bool {
    match value {
        Value::String(text) => check_free_text(text, None).is_ok(),
        Value::Array(items) => items.iter().all(json_text_is_clean),
        Value::Object(object) => object.iter().all(|(key, value)| {
            check_name(key, MaxLength::Bytes(MAX_ATTRIBUTE_KEY_BYTES)).is_ok()
                && json_text_is_clean(value)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
    }
}

fn check_action_name(what: &str, name: &str) -> Result<(), SpanError> {
    check_action_name_rules(name).map_err(|problem| {
        SpanError::InvalidName(format!(
            "{what} {:?} is not a valid action name: it {problem} (an action name is 1-256 bytes of visible characters)",
            truncate_chars(name, 64)
        ))
    })
}

/// `event_id` = lowercase hex trace id + `-` + hex span id: an exporter's retry of the same span
/// carries the same id, so it is counted once.
fn event_id(span: &Span) -> Result<String, SpanError> {
    if span.trace_id.len() != 16 || span.trace_id.iter().all(|byte| *byte == 0) {
        return Err(SpanError::InvalidIds(format!(
            "trace_id must be 16 bytes, not all zero (got {} bytes)",
            span.trace_id.len()
        )));
    }
    if span.span_id.len() != 8 || span.span_id.iter().all(|byte| *byte == 0) {
        return Err(SpanError::InvalidIds(format!(
            "span_id must be 8 bytes, not all zero (got {} bytes)",
            span.span_id.len()
        )));
    }
    Ok(span_ref(span))
}

fn span_ref(span: &Span) -> String {
    format!(
        "{}-{}",
        hex::encode(&span.trace_id),
        hex::encode(&span.span_id)
    )
}

/// The span's start time (its end time when the start is missing), in microseconds.
fn occurred_at_micros(span: &Span) -> Result<i64, SpanError> {
    let nanos = if span.start_time_unix_nano != 0 {
        span.start_time_unix_nano
    } else {
        span.end_time_unix_nano
    };
    if nanos == 0 {
        return Err(SpanError::MissingTime);
    }
    // u64::MAX / 1000 fits in i64.
    Ok((nanos / 1000) as i64)
}

fn user_attribute(attributes: &[KeyValue], key: &str) -> Result<Option<String>, SpanError> {
    let Some(value) = text_attribute(attributes, key).filter(|value| !value.is_empty()) else {
        return Ok(None);
    };
    check_id("user id", &value)
        .map_err(|problem| SpanError::InvalidUser(format!("{key}: {problem}")))?;
    Ok(Some(value))
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a OtlpValue> {
    attributes
        .iter()
        .find(|pair| pair.key == key)
        .and_then(|pair| pair.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn has_attribute(attributes: &[KeyValue], key: &str) -> bool {
    attribute(attributes, key).is_some()
}

/// A scalar attribute as text (numbers and booleans in their usual spelling).
fn text_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        OtlpValue::StringValue(text) => Some(text.clone()),
        OtlpValue::IntValue(number) => Some(number.to_string()),
        OtlpValue::DoubleValue(number) => Some(number.to_string()),
        OtlpValue::BoolValue(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// A non-negative integer attribute: OTLP `intValue`, an integral `doubleValue`, or a string of
/// digits (OTLP/JSON spells int64 as a string; some instrumentations send strings).
fn integer_attribute(attributes: &[KeyValue], key: &str) -> Result<Option<i64>, SpanError> {
    let Some(value) = attribute(attributes, key) else {
        return Ok(None);
    };
    let parsed = match value {
        OtlpValue::IntValue(number) => Some(*number),
        OtlpValue::DoubleValue(number) if number.fract() == 0.0 && number.abs() < 9.0e15 => {
            Some(*number as i64)
        }
        OtlpValue::StringValue(text) => {
            let text = text.trim();
            text.parse::<i64>().ok().or_else(|| {
                text.parse::<f64>()
                    .ok()
                    .filter(|number| number.fract() == 0.0 && number.abs() < 9.0e15)
                    .map(|number| number as i64)
            })
        }
        _ => None,
    };
    match parsed {
        Some(count) if check_token_count(key.to_string(), count).is_ok() => Ok(Some(count)),
        Some(count) => Err(SpanError::InvalidAttribute(format!(
            "attribute {key} must be a non-negative integer of at most {MAX_TOKEN_COUNT}, got {count}"
        ))),
        None => Err(SpanError::InvalidAttribute(format!(
            "attribute {key} must be a non-negative integer, got {}",
            truncate_chars(&any_value_to_json(value).to_string(), 64)
        ))),
    }
}

fn first_integer(attributes: &[KeyValue], keys: &[&str]) -> Result<Option<i64>, SpanError> {
    for key in keys {
        if let Some(count) = integer_attribute(attributes, key)? {
            return Ok(Some(count));
        }
    }
    Ok(None)
}

fn any_to_json(value: Option<&AnyValue>) -> Value {
    value
        .and_then(|value| value.value.as_ref())
        .map(any_value_to_json)
        .unwrap_or(Value::Null)
}

/// An OTLP value as JSON. Bytes become lowercase hex; non-finite doubles their text.
fn any_value_to_json(value: &OtlpValue) -> Value {
    match value {
        OtlpValue::StringValue(text) => Value::String(text.clone()),
        OtlpValue::BoolValue(flag) => Value::Bool(*flag),
        OtlpValue::IntValue(number) => Value::from(*number),
        OtlpValue::DoubleValue(number) => serde_json::Number::from_f64(*number)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(number.to_string())),
        OtlpValue::ArrayValue(array) => Value::Array(
            array
                .values
                .iter()
                .map(|item| any_to_json(Some(item)))
                .collect(),
        ),
        OtlpValue::KvlistValue(list) => Value::Object(
            list.values
                .iter()
                .map(|pair| (pair.key.clone(), any_to_json(pair.value.as_ref())))
                .collect(),
        ),
        OtlpValue::BytesValue(bytes) => Value::String(hex::encode(bytes)),
        OtlpValue::StringValueStrindex(_) => Value::Null,
    }
}

fn truncate_json_text(value: Value, max_chars: usize) -> Value {
    match value {
        Value::String(text) if text.chars().count() > max_chars => {
            Value::String(truncate_chars(&text, max_chars))
        }
        other => other,
    }
}

fn truncate_chars(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max_chars).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use opentelemetry_proto::tonic::common::v1::KeyValueList;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
    use rust_decimal::Decimal;
    use serde_json::json;

    use super::*;
    use crate::config::IngestConfig;

    const NOW_MICROS: i64 = 1_765_815_103_000_000;
    const START_NANOS: u64 = 1_765_815_100_000_000_000;

    fn identity() -> AgentIdentity {
        crate::auth::example_identity()
    }

    fn limits() -> Limits {
        Limits::from_config(&IngestConfig::default(), NOW_MICROS)
    }

    fn string(key: &str, value: &str) -> KeyValue {
        attr(key, OtlpValue::StringValue(value.to_string()))
    }

    fn int(key: &str, value: i64) -> KeyValue {
        attr(key, OtlpValue::IntValue(value))
    }

    fn double(key: &str, value: f64) -> KeyValue {
        attr(key, OtlpValue::DoubleValue(value))
    }

    fn attr(key: &str, value: OtlpValue) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn span(name: &str, span_byte: u8, attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![0xab; 16],
            span_id: vec![span_byte; 8],
            name: name.to_string(),
            start_time_unix_nano: START_NANOS,
            end_time_unix_nano: START_NANOS + 1_000_000,
            attributes,
            ..Default::default()
        }
    }

    fn map(span: &Span) -> Result<RawAction, SpanError> {
        span_to_action(span, &identity(), &limits(), OtlpSource::Grpc)
    }

    fn attributes_of(action: &RawAction) -> Value {
        serde_json::from_str(&action.attributes_json).unwrap()
    }

    fn request(resource: Vec<KeyValue>, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource,
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

    #[test]
    fn all_three_gemini_instrumentor_generations_give_the_same_action() {
        let common = |mut extra: Vec<KeyValue>| {
            extra.push(string("value.action.user_id", "user_acme_123"));
            extra.push(string("value.action.anonymous_id", "anon_1"));
            extra.push(string("gen_ai.request.model", "gemini-2.5-flash"));
            extra
        };
        // <= 0.47: legacy token names and llm.usage.total_tokens.
        let legacy = span(
            "gemini.generate_content",
            1,
            common(vec![
                string("gen_ai.system", "Google"),
                int("gen_ai.usage.prompt_tokens", 100),
                int("gen_ai.usage.completion_tokens", 40),
                int("llm.usage.total_tokens", 150),
            ]),
        );
        // 0.48 - 0.57: same name and system, current token names.
        let middle = span(
            "gemini.generate_content",
            2,
            common(vec![
                string("gen_ai.system", "Google"),
                int("gen_ai.usage.input_tokens", 100),
                int("gen_ai.usage.output_tokens", 40),
                int("llm.usage.total_tokens", 150),
            ]),
        );
        // >= 0.58: new span name, gen_ai.provider.name and no gen_ai.system.
        let current = span(
            "generate_content gemini-2.5-flash",
            3,
            common(vec![
                string("gen_ai.provider.name", "gcp.gen_ai"),
                string("gen_ai.operation.name", "generate_content"),
                int("gen_ai.usage.input_tokens", 100),
                int("gen_ai.usage.output_tokens", 40),
                int("gen_ai.usage.total_tokens", 150),
            ]),
        );
        for (generation, span) in [legacy, middle, current].iter().enumerate() {
            let action = map(span).unwrap();
            assert_eq!(action.kind, ActionKind::Llm, "generation {generation}");
            assert_eq!(action.action_name, "gemini_llm_gemini-2.5-flash");
            assert_eq!(action.llm_provider.as_deref(), Some("gemini"));
            assert_eq!(action.llm_model.as_deref(), Some("gemini-2.5-flash"));
            assert_eq!(action.input_tokens, Some(100), "generation {generation}");
            assert_eq!(action.output_tokens, Some(40), "generation {generation}");
            assert_eq!(action.total_tokens, Some(150), "generation {generation}");
            assert_eq!(action.trace_event.as_deref(), Some(span.name.as_str()));
            assert_eq!(action.user_id.as_deref(), Some("user_acme_123"));
            assert_eq!(action.anonymous_id.as_deref(), Some("anon_1"));
            assert_eq!(action.source, "otlp_grpc");
            assert_eq!(action.occurred_at_micros, (START_NANOS / 1000) as i64);
            let attributes = attributes_of(&action);
            assert!(attributes.get("value.action.user_id").is_none());
            assert_eq!(attributes["gen_ai.request.model"], "gemini-2.5-flash");
        }
    }

    #[test]
    fn provider_spellings_map_to_one_name() {
        for (raw, expected) in [
            ("Google", "gemini"),
            ("google", "gemini"),
            ("gemini", "gemini"),
            ("gcp.gen_ai", "gemini"),
            ("gcp.vertex_ai", "gemini"),
            ("vertex_ai", "gemini"),
            ("google_genai", "gemini"),
            ("openai", "openai"),
            ("OpenAI", "openai"),
            ("azure.ai.openai", "openai"),
            ("Anthropic", "anthropic"),
            ("aws.bedrock", "bedrock"),
            ("Mistral_AI", "mistral_ai"),
        ] {
            assert_eq!(normalize_provider(raw), expected, "{raw}");
        }
        assert_eq!(
            normalize_model("publishers/google/models/gemini-2.5-flash"),
            "gemini-2.5-flash"
        );
        assert_eq!(normalize_model("models/gemini-2.5-pro"), "gemini-2.5-pro");
        assert_eq!(normalize_model("gpt-4o"), "gpt-4o");
    }

    #[test]
    fn genai_spans_fall_back_to_the_response_model_and_keep_no_content() {
        let action = map(&span(
            "chat gpt-4o",
            1,
            vec![
                string("gen_ai.system", "openai"),
                string("gen_ai.response.model", "gpt-4o-2024-08-06"),
                string("gen_ai.prompt.0.content", "a secret prompt"),
                string("gen_ai.completion.0.content", "a long answer"),
                string("http.url", &"x".repeat(1000)),
            ],
        ))
        .unwrap();
        assert_eq!(action.action_name, "openai_llm_gpt-4o-2024-08-06");
        let attributes = attributes_of(&action);
        assert!(attributes.get("gen_ai.prompt.0.content").is_none());
        assert!(attributes.get("gen_ai.completion.0.content").is_none());
        let url = attributes["http.url"].as_str().unwrap();
        assert_eq!(url.chars().count(), MAX_SPAN_ATTRIBUTE_CHARS + 1);
        assert!(url.ends_with('…'));
        let unknown = map(&span("chat", 2, vec![string("gen_ai.system", "openai")])).unwrap();
        assert_eq!(unknown.action_name, "openai_llm_unknown");
    }

    #[test]
    fn value_action_spans_take_user_attributes_json_and_standard_keys() {
        let action = map(&span(
            VALUE_ACTION_SPAN,
            1,
            vec![
                string("value.action.name", "llm_call"),
                string("value.action.user_id", "user_acme_123"),
                string("value.action.anonymous_id", "anon_1"),
                string("value.action.description", "Summarized search results"),
                string("value.action.type", "llm"),
                string(
                    "value.action.user_attributes",
                    r#"{"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800, "cost_usd": 0.12}"#,
                ),
            ],
        ))
        .unwrap();
        assert_eq!(action.kind, ActionKind::Action);
        assert_eq!(action.action_name, "llm_call");
        assert_eq!(action.trace_event, None);
        assert_eq!(
            action.description.as_deref(),
            Some("Summarized search results")
        );
        assert_eq!(action.user_id.as_deref(), Some("user_acme_123"));
        assert_eq!(action.anonymous_id.as_deref(), Some("anon_1"));
        assert_eq!(action.llm_model.as_deref(), Some("gpt-4"));
        assert_eq!(action.input_tokens, Some(2500));
        assert_eq!(action.output_tokens, Some(800));
        assert_eq!(action.total_tokens, None);
        assert_eq!(
            action.reported_cost,
            Some(Decimal::from_str("0.12").unwrap())
        );
        assert_eq!(
            attributes_of(&action),
            json!({"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800, "cost_usd": 0.12, "type": "llm"})
        );
        assert_eq!(
            action.event_id,
            format!("{}-{}", "ab".repeat(16), "01".repeat(8))
        );
        assert_eq!(action.workspace_id, "ws_demo");
        assert_eq!(action.account_id, "acc_acme");
        assert_eq!(action.agent_instance_id, "inst_acme_research");
    }

    #[test]
    fn value_action_llm_keys_win_over_user_attributes() {
        let action = map(&span(
            VALUE_ACTION_SPAN,
            1,
            vec![
                string("value.action.name", "llm_call"),
                string("value.action.llm.model", "gemini-2.5-pro"),
                int("value.action.llm.input_tokens", 10),
                string("value.action.llm.output_tokens", "20"),
                double("value.action.llm.total_tokens", 35.0),
                string("value.action.llm.prompt", &"p".repeat(5000)),
                string(
                    "value.action.user_attributes",
                    r#"{"model": "other", "input_tokens": 1, "output_tokens": 2}"#,
                ),
            ],
        ))
        .unwrap();
        assert_eq!(action.llm_model.as_deref(), Some("gemini-2.5-pro"));
        assert_eq!(action.input_tokens, Some(10));
        assert_eq!(action.output_tokens, Some(20));
        assert_eq!(action.total_tokens, Some(35));
        let prompt = attributes_of(&action)["llm.prompt"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(prompt.chars().count(), MAX_LLM_TEXT_CHARS + 1);
    }

    #[test]
    fn integers_may_be_ints_integral_doubles_or_strings() {
        for (value, expected) in [
            (OtlpValue::IntValue(42), Ok(Some(42))),
            (OtlpValue::DoubleValue(42.0), Ok(Some(42))),
            (OtlpValue::StringValue(" 42 ".into()), Ok(Some(42))),
            (OtlpValue::StringValue("42.0".into()), Ok(Some(42))),
        ] {
            assert_eq!(
                integer_attribute(&[attr("n", value.clone())], "n"),
                expected,
                "{value:?}"
            );
        }
        for value in [
            OtlpValue::DoubleValue(4.5),
            OtlpValue::IntValue(-1),
            OtlpValue::StringValue("many".into()),
            OtlpValue::BoolValue(true),
        ] {
            let error = integer_attribute(&[attr("n", value.clone())], "n").unwrap_err();
            assert!(
                error.to_string().contains("non-negative integer"),
                "{error}"
            );
        }
        let action = map(&span(
            "chat gpt-4o",
            1,
            vec![
                string("gen_ai.system", "openai"),
                string("gen_ai.request.model", "gpt-4o"),
                string("gen_ai.usage.input_tokens", "12"),
                double("gen_ai.usage.output_tokens", 7.0),
            ],
        ))
        .unwrap();
        assert_eq!(
            (action.input_tokens, action.output_tokens),
            (Some(12), Some(7))
        );
    }

    #[test]
    fn bad_user_attributes_json_rejects_the_span_with_a_message() {
        for (text, expected) in [
            ("{not json", "is not valid JSON"),
            ("[1, 2]", "must be a JSON object"),
        ] {
            let error = map(&span(
                VALUE_ACTION_SPAN,
                1,
                vec![
                    string("value.action.name", "web_search"),
                    string("value.action.user_attributes", text),
                ],
            ))
            .unwrap_err();
            assert_eq!(error.code(), "bad_user_attributes");
            assert!(error.to_string().contains(expected), "{error}");
            assert!(
                error
                    .to_string()
                    .starts_with("value.action.user_attributes"),
                "{error}"
            );
        }
        let list = attr(
            "value.action.user_attributes",
            OtlpValue::KvlistValue(KeyValueList {
                values: vec![int("results_count", 2)],
            }),
        );
        let action = map(&span(
            VALUE_ACTION_SPAN,
            1,
            vec![string("value.action.name", "web_search"), list],
        ))
        .unwrap();
        assert_eq!(attributes_of(&action), json!({"results_count": 2}));
    }

    #[test]
    fn other_spans_are_trace_events_named_by_the_span() {
        let action = map(&span(
            "retrieve_documents",
            1,
            vec![
                string("value.action.anonymous_id", "anon_1"),
                int("docs", 3),
            ],
        ))
        .unwrap();
        assert_eq!(action.kind, ActionKind::TraceEvent);
        assert_eq!(action.action_name, "retrieve_documents");
        assert_eq!(action.trace_event.as_deref(), Some("retrieve_documents"));
        assert_eq!(action.anonymous_id.as_deref(), Some("anon_1"));
        assert_eq!(attributes_of(&action), json!({"docs": 3}));
    }

    #[test]
    fn span_problems_name_what_is_wrong() {
        let mut no_ids = span("x", 1, vec![]);
        no_ids.trace_id = vec![0; 16];
        assert_eq!(map(&no_ids).unwrap_err().code(), "invalid_span_ids");
        let mut no_time = span("x", 1, vec![]);
        no_time.start_time_unix_nano = 0;
        no_time.end_time_unix_nano = 0;
        assert_eq!(map(&no_time).unwrap_err(), SpanError::MissingTime);
        let mut only_end = span("x", 1, vec![]);
        only_end.start_time_unix_nano = 0;
        assert_eq!(
            map(&only_end).unwrap().occurred_at_micros,
            ((START_NANOS + 1_000_000) / 1000) as i64
        );
        let mut old = span("x", 1, vec![]);
        old.start_time_unix_nano = 1_600_000_000_000_000_000;
        let error = map(&old).unwrap_err();
        assert_eq!(error.code(), "outside_time_window");
        assert!(error.to_string().contains("in the past"), "{error}");
        assert_eq!(
            map(&span("", 1, vec![])).unwrap_err().code(),
            "invalid_name"
        );
        let error = map(&span(VALUE_ACTION_SPAN, 1, vec![])).unwrap_err();
        assert!(error.to_string().contains("value.action.name"), "{error}");
        let error = map(&span(
            "x",
            1,
            vec![string("value.action.user_id", &"u".repeat(300))],
        ))
        .unwrap_err();
        assert_eq!(error.code(), "invalid_user");
        let many = format!(
            "{{{}}}",
            (0..200)
                .map(|index| format!("\"k{index}\": {index}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let error = map(&span(
            VALUE_ACTION_SPAN,
            1,
            vec![
                string("value.action.name", "a"),
                string("value.action.user_attributes", &many),
            ],
        ))
        .unwrap_err();
        assert_eq!(error.code(), "attribute_limits");
    }

    #[test]
    fn auto_instrumented_spans_drop_attributes_beyond_the_limits() {
        let attributes = (0..300)
            .map(|index| int(&format!("k{index}"), index))
            .collect();
        let action = map(&span("busy", 1, attributes)).unwrap();
        let attributes = attributes_of(&action);
        let limits = limits();
        assert_eq!(attributes.as_object().unwrap().len(), limits.max_attributes);
        assert_eq!(
            attributes["otlp.dropped_attributes"],
            300 - (limits.max_attributes - 1)
        );
    }

    #[test]
    fn requests_map_valid_spans_and_report_the_rest() {
        let good = span(
            VALUE_ACTION_SPAN,
            1,
            vec![string("value.action.name", "delivery")],
        );
        let bad = span(
            VALUE_ACTION_SPAN,
            2,
            vec![
                string("value.action.name", "web_search"),
                string("value.action.user_attributes", "{oops"),
            ],
        );
        let mapped = map_request(
            &request(
                vec![string(RESOURCE_AGENT_ID, "inst_acme_research")],
                vec![good, bad],
            ),
            &identity(),
            &limits(),
            10,
            OtlpSource::Http,
        )
        .unwrap();
        assert_eq!(mapped.actions.len(), 1);
        assert_eq!(mapped.actions[0].source, "otlp_http");
        assert_eq!(mapped.rejected.len(), 1);
        let message = mapped.error_message(5);
        assert!(
            message.starts_with("1 of 2 spans rejected: span \"value.action\" ("),
            "{message}"
        );
        assert!(
            message.contains("value.action.user_attributes is not valid JSON"),
            "{message}"
        );
    }

    #[test]
    fn requests_fail_whole_for_a_spoofed_agent_or_too_many_spans() {
        let spans = vec![span("a", 1, vec![]), span("b", 2, vec![])];
        let error = map_request(
            &request(
                vec![string(RESOURCE_AGENT_ID, "inst_globex_support")],
                spans.clone(),
            ),
            &identity(),
            &limits(),
            10,
            OtlpSource::Grpc,
        )
        .unwrap_err();
        assert_eq!(error.code(), "agent_mismatch");
        assert!(error.to_string().contains("inst_globex_support"), "{error}");
        let error = map_request(
            &request(vec![], spans),
            &identity(),
            &limits(),
            1,
            OtlpSource::Grpc,
        )
        .unwrap_err();
        assert_eq!(error, RequestError::TooManySpans { count: 2, max: 1 });
    }
}
