//! Client input → [`RawAction`], with a precise message for everything that is wrong: REST
//! actions ([`rest_action_to_raw`]) and REST outcome events ([`rest_outcome_to_raw`], kind
//! `outcome`, docs/adr/0005-derived-outcomes.md section 1).
//!
//! Token counts, model and the caller's own cost are read from the well-known attribute names
//! (`input_tokens`, `output_tokens`, `total_tokens`, `model`, `cost_usd`) so that the guide's
//! `ctx.send(action_name="llm_call", model=..., input_tokens=...)` meters tokens without any
//! special field. Integers may arrive as JSON numbers or as strings of digits.
//!
//! Every value is held to its documented range and every text to the text rules
//! (`agentmeter_schemas::limits` and `::text`, `docs/metering.md` "Accepted values"): what is
//! refused here with a message would be dead-lettered by the enricher, so a client learns of it
//! at once instead.

use std::str::FromStr;

use agentmeter_schemas::condition::exact_decimal;
use agentmeter_schemas::limits::{
    check_action_cost, check_name_field, check_quantity, check_raw_action, check_token_count,
    MAX_DESCRIPTION_CHARS, MAX_ID_CHARS, MAX_QUANTITY, MAX_TOKEN_COUNT,
};
use agentmeter_schemas::metering::check_action_name;
use agentmeter_schemas::rest::{RestAction, RestOutcome};
use agentmeter_schemas::text::{check_attributes_json, check_free_text, MaxLength};
use agentmeter_schemas::{ActionKind, RawAction};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::auth::AgentIdentity;
use crate::config::IngestConfig;

/// The limits an action is checked against, and the clock it is checked at.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_attributes: usize,
    pub max_attributes_bytes: usize,
    pub max_late_micros: i64,
    pub max_future_micros: i64,
    pub now_micros: i64,
}

impl Limits {
    pub fn from_config(config: &IngestConfig, now_micros: i64) -> Limits {
        Limits {
            max_attributes: config.max_attributes,
            max_attributes_bytes: config.max_attributes_bytes,
            max_late_micros: config.max_late_seconds * 1_000_000,
            max_future_micros: config.max_future_seconds * 1_000_000,
            now_micros,
        }
    }
}

/// Most characters in an event id, user id or anonymous id.
pub const MAX_ID_LENGTH: usize = MAX_ID_CHARS;
/// Most characters in a description.
pub const MAX_DESCRIPTION_LENGTH: usize = MAX_DESCRIPTION_CHARS;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// Checks one REST action and builds the raw action for the authenticated agent.
pub fn rest_action_to_raw(
    item: RestAction,
    identity: &AgentIdentity,
    limits: &Limits,
    source: &str,
) -> Result<RawAction, String> {
    if let Err(problem) = check_action_name(&item.action_name) {
        return Err(format!(
            "action_name {:?} {problem}; an action name is 1-256 bytes of visible characters",
            truncate_for_message(&item.action_name)
        ));
    }
    let event_id = checked_event_ids(item.event_id, &item.user_id, &item.anonymous_id)?;
    if let Some(description) = &item.description {
        check_description(description)?;
    }
    let occurred_at_micros = occurred_at(item.occurred_at.as_deref(), limits)?;
    let attributes = item.attributes;
    let llm = LlmFields::from_attributes(&attributes)?;
    let attributes_json = check_attributes(&attributes, limits)?;
    let raw = RawAction {
        event_id,
        workspace_id: identity.workspace.workspace_id().to_string(),
        account_id: identity.instance.account.clone(),
        agent_instance_id: identity.instance.id.clone(),
        kind: ActionKind::Action,
        action_name: item.action_name,
        trace_event: None,
        user_id: item.user_id.filter(|id| !id.is_empty()),
        anonymous_id: item.anonymous_id.filter(|id| !id.is_empty()),
        occurred_at_micros,
        received_at_micros: limits.now_micros,
        description: item.description,
        llm_provider: None,
        llm_model: llm.model,
        input_tokens: llm.input_tokens,
        output_tokens: llm.output_tokens,
        total_tokens: llm.total_tokens,
        reported_cost: llm.reported_cost,
        attributes_json,
        source: source.to_string(),
        outcome_value: None,
    };
    // Everything above was checked with a message of its own; this is the rule the enricher
    // applies, so nothing accepted here can be dead-lettered there for its values.
    check_raw_action(&raw).map_err(|error| error.to_string())?;
    Ok(raw)
}

/// The ids an action and an outcome event share: the client's `event_id` (checked) or a new
/// UUIDv7, and the optional `user_id` and `anonymous_id`, checked by the same rule.
fn checked_event_ids(
    event_id: Option<String>,
    user_id: &Option<String>,
    anonymous_id: &Option<String>,
) -> Result<String, String> {
    let event_id = match event_id {
        Some(event_id) => {
            check_id("event_id", &event_id)?;
            event_id
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    if let Some(user_id) = user_id {
        check_id("user_id", user_id)?;
    }
    if let Some(anonymous_id) = anonymous_id {
        check_id("anonymous_id", anonymous_id)?;
    }
    Ok(event_id)
}

/// Checks one REST outcome event and builds the raw action of kind `outcome` for the
/// authenticated agent: `action_name` = `outcome_type`, the metadata as the attributes, the
/// value in `outcome_value` (absent when the client gave none: 1). The same rules as an action
/// for ids, times and attributes; nothing is read from the metadata (no tokens, model or cost).
pub fn rest_outcome_to_raw(
    item: RestOutcome,
    identity: &AgentIdentity,
    limits: &Limits,
    source: &str,
) -> Result<RawAction, String> {
    if let Err(problem) = check_action_name(&item.outcome_type) {
        return Err(format!(
            "outcome_type {:?} {problem}; an outcome type is 1-256 bytes of visible characters",
            truncate_for_message(&item.outcome_type)
        ));
    }
    let event_id = checked_event_ids(item.event_id, &item.user_id, &item.anonymous_id)?;
    let outcome_value = item.value.as_deref().map(outcome_value).transpose()?;
    let occurred_at_micros = occurred_at(item.occurred_at.as_deref(), limits)?;
    let attributes_json = check_object("metadata", "metadata keys", &item.metadata, limits)?;
    let raw = RawAction {
        event_id,
        workspace_id: identity.workspace.workspace_id().to_string(),
        account_id: identity.instance.account.clone(),
        agent_instance_id: identity.instance.id.clone(),
        kind: ActionKind::Outcome,
        action_name: item.outcome_type,
        trace_event: None,
        user_id: item.user_id.filter(|id| !id.is_empty()),
        anonymous_id: item.anonymous_id.filter(|id| !id.is_empty()),
        occurred_at_micros,
        received_at_micros: limits.now_micros,
        description: None,
        llm_provider: None,
        llm_model: None,
        input_tokens: None,
        output_tokens: None,
        total_tokens: None,
        reported_cost: None,
        attributes_json,
        source: source.to_string(),
        outcome_value,
    };
    // As for actions: the enricher's own rule, so nothing accepted here is dead-lettered there.
    check_raw_action(&raw).map_err(|error| error.to_string())?;
    Ok(raw)
}

/// The `value` of an outcome event: a JSON number or a decimal string, read exactly from its
/// digits (a number never goes through a float), 0 to 10^12 with at most 12 fractional digits.
pub fn outcome_value(json: &RawValue) -> Result<Decimal, String> {
    let text = json.get().trim();
    let shown = truncate_for_message(text);
    let parsed = match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text)
            .ok()
            .and_then(|string| exact_decimal(string.trim(), false)),
        Some(b'-' | b'0'..=b'9') => exact_decimal(text, true),
        _ => {
            return Err(format!(
                "value {shown} is not a decimal: send a number or a decimal string such as \"2.5\" (absent: 1)"
            ))
        }
    };
    let value = parsed.ok_or_else(|| {
        format!(
            "value {shown} is not a decimal number (digits with an optional fraction, at most 28 significant digits)"
        )
    })?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(format!(
            "value {shown} is negative; an outcome's value is a count or an amount, 0 or more"
        ));
    }
    // -0 is 0; trailing zeros say nothing about the amount.
    let value = if value.is_zero() {
        Decimal::ZERO
    } else {
        value.normalize()
    };
    check_quantity("value", value).map_err(|error| {
        format!("{error}; an outcome's value is a decimal from 0 to {MAX_QUANTITY}")
    })?;
    Ok(value)
}

/// `occurred_at` as RFC 3339 (receipt time when absent), in µs, within the accepted window.
fn occurred_at(text: Option<&str>, limits: &Limits) -> Result<i64, String> {
    let occurred_at_micros = match text {
        None => limits.now_micros,
        Some(text) => {
            let instant = OffsetDateTime::parse(text, &Rfc3339).map_err(|error| {
                format!("occurred_at {text:?} is not an RFC 3339 time: {error}")
            })?;
            (instant.unix_timestamp_nanos() / 1000) as i64
        }
    };
    check_occurred_at(occurred_at_micros, limits)?;
    Ok(occurred_at_micros)
}

/// An event id, user id or anonymous id: a name of at most 256 characters.
pub fn check_id(field: &'static str, value: &str) -> Result<(), String> {
    check_name_field(field, value, MaxLength::Chars(MAX_ID_LENGTH))
        .map_err(|error| format!("{error}; an id is 1-{MAX_ID_LENGTH} visible characters"))
}

/// A description: free text of at most 4096 characters.
pub fn check_description(description: &str) -> Result<(), String> {
    check_free_text(description, Some(MaxLength::Chars(MAX_DESCRIPTION_LENGTH)))
        .map_err(|problem| format!("description {problem}"))
}

/// `occurred_at` must fall in [now − max_late, now + max_future].
pub fn check_occurred_at(occurred_at_micros: i64, limits: &Limits) -> Result<(), String> {
    let earliest = limits.now_micros - limits.max_late_micros;
    let latest = limits.now_micros + limits.max_future_micros;
    if occurred_at_micros < earliest {
        return Err(format!(
            "occurred_at {} is more than {} days in the past; late actions are accepted up to that",
            format_micros(occurred_at_micros),
            limits.max_late_micros / 86_400_000_000
        ));
    }
    if occurred_at_micros > latest {
        return Err(format!(
            "occurred_at {} is more than {} seconds in the future (check the agent's clock)",
            format_micros(occurred_at_micros),
            limits.max_future_micros / 1_000_000
        ));
    }
    Ok(())
}

/// Checks count and size of the attributes and returns them as JSON text.
pub fn check_attributes(
    attributes: &Map<String, Value>,
    limits: &Limits,
) -> Result<String, String> {
    check_object("attributes", "attributes", attributes, limits)
}

/// Checks count and size of a free object (`attributes` of an action, `metadata` of an outcome
/// event: the same limits) and returns it as JSON text. `keys` names its entries in messages.
fn check_object(
    field: &str,
    keys: &str,
    object: &Map<String, Value>,
    limits: &Limits,
) -> Result<String, String> {
    if object.len() > limits.max_attributes {
        return Err(format!(
            "{} {keys}; at most {} are accepted",
            object.len(),
            limits.max_attributes
        ));
    }
    let text = serde_json::to_string(object).expect("a JSON map serializes");
    if text.len() > limits.max_attributes_bytes {
        // "attributes take", "metadata takes"
        let verb = if field.ends_with('s') {
            "take"
        } else {
            "takes"
        };
        return Err(format!(
            "{field} {verb} {} bytes as JSON; at most {} are accepted",
            text.len(),
            limits.max_attributes_bytes
        ));
    }
    check_attributes_json(&text).map_err(|problem| {
        if field == "attributes" {
            problem
        } else {
            format!("{field}: {problem}")
        }
    })?;
    Ok(text)
}

/// LLM facts found among free attributes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LlmFields {
    pub model: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub reported_cost: Option<Decimal>,
}

impl LlmFields {
    /// Reads `model`, `input_tokens`, `output_tokens`, `total_tokens` and `cost_usd`.
    pub fn from_attributes(attributes: &Map<String, Value>) -> Result<LlmFields, String> {
        let model = attributes
            .get("model")
            .and_then(Value::as_str)
            .filter(|model| !model.is_empty())
            .map(str::to_string);
        if let Some(model) = &model {
            check_action_name(model).map_err(|problem| {
                format!(
                    "attribute model {:?} {problem}",
                    truncate_for_message(model)
                )
            })?;
        }
        Ok(LlmFields {
            model,
            input_tokens: token_count(attributes, "input_tokens")?,
            output_tokens: token_count(attributes, "output_tokens")?,
            total_tokens: token_count(attributes, "total_tokens")?,
            reported_cost: attributes
                .get("cost_usd")
                .map(|value| decimal_attribute("cost_usd", value))
                .transpose()?,
        })
    }
}

/// A non-negative integer attribute given as a JSON integer or a string of digits.
pub fn token_count(attributes: &Map<String, Value>, name: &str) -> Result<Option<i64>, String> {
    let Some(value) = attributes.get(name) else {
        return Ok(None);
    };
    let parsed = match value {
        Value::Null => return Ok(None),
        Value::Number(number) => number.as_i64().or_else(|| {
            number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(text) => text.trim().parse::<i64>().ok(),
        _ => None,
    };
    match parsed {
        Some(count) if check_token_count(name.to_string(), count).is_ok() => Ok(Some(count)),
        Some(count) => Err(format!(
            "attribute {name} must be a non-negative integer of at most {MAX_TOKEN_COUNT}, got {count}"
        )),
        None => Err(format!(
            "attribute {name} must be a non-negative integer, got {}",
            truncate_for_message(&value.to_string())
        )),
    }
}

/// A decimal attribute given as a JSON number or a decimal string. JSON numbers are read from
/// their shortest decimal form, so `0.12` is exactly 0.12.
pub fn decimal_attribute(name: &str, value: &Value) -> Result<Decimal, String> {
    let parsed = match value {
        Value::Number(number) => Decimal::from_str(&number.to_string())
            .or_else(|_| Decimal::from_scientific(&number.to_string()))
            .ok(),
        Value::String(text) => Decimal::from_str(text.trim()).ok(),
        _ => None,
    };
    let decimal = parsed.ok_or_else(|| {
        format!(
            "attribute {name} must be a decimal number, got {}",
            truncate_for_message(&value.to_string())
        )
    })?;
    check_action_cost(name.to_string(), decimal).map_err(|error| format!("attribute {error}"))?;
    Ok(decimal)
}

fn format_micros(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|instant| instant.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{micros}µs"))
}

fn truncate_for_message(text: &str) -> String {
    if text.chars().count() <= 64 {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(64).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_765_815_103_000_000;

    fn identity() -> AgentIdentity {
        crate::auth::example_identity()
    }

    fn limits() -> Limits {
        Limits::from_config(&IngestConfig::default(), NOW)
    }

    fn item(value: Value) -> RestAction {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn takes_identity_from_the_secret_and_tokens_from_attributes() {
        let raw = rest_action_to_raw(
            item(json!({"action_name": "llm_call", "user_id": "u1",
                "attributes": {"model": "gpt-4", "input_tokens": 2500, "output_tokens": "800", "cost_usd": 0.12}})),
            &identity(),
            &limits(),
            "rest",
        )
        .unwrap();
        assert_eq!(raw.workspace_id, "ws_demo");
        assert_eq!(raw.account_id, "acc_acme");
        assert_eq!(raw.agent_instance_id, "inst_acme_research");
        assert_eq!(raw.input_tokens, Some(2500));
        assert_eq!(raw.output_tokens, Some(800));
        assert_eq!(raw.reported_cost, Some(Decimal::from_str("0.12").unwrap()));
        assert_eq!(raw.llm_model.as_deref(), Some("gpt-4"));
        assert_eq!(raw.occurred_at_micros, NOW);
        assert!(!raw.event_id.is_empty());
    }

    #[test]
    fn rejects_bad_items_with_a_message_naming_the_problem() {
        let cases = [
            (json!({"action_name": ""}), "action_name"),
            (
                json!({"action_name": "a", "occurred_at": "yesterday"}),
                "RFC 3339",
            ),
            (
                json!({"action_name": "a", "occurred_at": "2020-01-01T00:00:00Z"}),
                "in the past",
            ),
            (
                json!({"action_name": "a", "occurred_at": "2099-01-01T00:00:00Z"}),
                "in the future",
            ),
            (
                json!({"action_name": "a", "attributes": {"input_tokens": -1}}),
                "input_tokens",
            ),
            (
                json!({"action_name": "a", "attributes": {"input_tokens": "many"}}),
                "input_tokens",
            ),
            (
                json!({"action_name": "a", "attributes": {"cost_usd": "cheap"}}),
                "cost_usd",
            ),
            (json!({"action_name": "a", "user_id": ""}), "user_id"),
            (
                json!({"action_name": "a", "event_id": "x".repeat(300)}),
                "event_id",
            ),
        ];
        for (value, expected) in cases {
            let error = rest_action_to_raw(item(value.clone()), &identity(), &limits(), "rest")
                .unwrap_err();
            assert!(error.contains(expected), "{value}: {error}");
        }
    }

    #[test]
    fn rejects_too_many_and_too_large_attributes() {
        let many: Map<String, Value> = (0..200)
            .map(|index| (format!("k{index}"), json!(index)))
            .collect();
        let error = check_attributes(&many, &limits()).unwrap_err();
        assert!(error.contains("200 attributes"), "{error}");
        let mut large = Map::new();
        large.insert("blob".into(), json!("x".repeat(20_000)));
        assert!(check_attributes(&large, &limits())
            .unwrap_err()
            .contains("bytes"));
    }

    fn outcome(json: &str) -> Result<RawAction, String> {
        let item: RestOutcome = serde_json::from_str(json).unwrap();
        rest_outcome_to_raw(item, &identity(), &limits(), "rest")
    }

    #[test]
    fn an_outcome_event_is_an_action_of_kind_outcome_for_the_secrets_identity() {
        let raw = outcome(
            r#"{"event_id": "lead-42", "outcome_type": "lead_converted", "value": "1250.50",
                "user_id": "u1", "occurred_at": "2025-12-15T16:11:43Z",
                "metadata": {"lead_id": "L-42", "input_tokens": 5, "cost_usd": 3}}"#,
        )
        .unwrap();
        assert_eq!(raw.kind, ActionKind::Outcome);
        assert_eq!(raw.action_name, "lead_converted");
        assert_eq!(raw.event_id, "lead-42");
        assert_eq!(
            (
                raw.workspace_id.as_str(),
                raw.account_id.as_str(),
                raw.agent_instance_id.as_str()
            ),
            ("ws_demo", "acc_acme", "inst_acme_research")
        );
        assert_eq!(raw.user_id.as_deref(), Some("u1"));
        assert_eq!(
            raw.outcome_value,
            Some(Decimal::from_str("1250.5").unwrap())
        );
        assert_eq!(raw.occurred_at_micros, 1_765_815_103_000_000);
        assert_eq!(raw.received_at_micros, NOW);
        assert_eq!(
            raw.attributes_json,
            r#"{"cost_usd":3,"input_tokens":5,"lead_id":"L-42"}"#
        );
        // Metadata is metadata: no tokens, model or cost are read from it.
        assert_eq!(
            (
                raw.input_tokens,
                raw.reported_cost,
                raw.llm_model.as_deref()
            ),
            (None, None, None)
        );
        assert_eq!(raw.source, "rest");
        // What ingest produces reads back unchanged.
        let bytes = agentmeter_schemas::encode_raw_action(&raw).unwrap();
        assert_eq!(agentmeter_schemas::decode_raw_action(&bytes).unwrap(), raw);

        let minimal = outcome(r#"{"outcome_type": "ticket_resolved"}"#).unwrap();
        assert_eq!(minimal.outcome_value, None);
        assert_eq!(minimal.outcome_quantity(), Decimal::ONE);
        assert_eq!(minimal.occurred_at_micros, NOW);
        assert!(!minimal.event_id.is_empty());
        assert_eq!(minimal.attributes_json, "{}");
    }

    #[test]
    fn an_outcome_value_is_read_exactly_as_a_number_or_a_string() {
        let value = |json: &str| {
            outcome(&format!(r#"{{"outcome_type": "o", "value": {json}}}"#))
                .map(|raw| raw.outcome_value)
        };
        let d = |text: &str| Some(Decimal::from_str(text).unwrap());
        assert_eq!(value("null"), Ok(None));
        assert_eq!(value("2.5"), Ok(d("2.5")));
        assert_eq!(value(r#""2.5""#), Ok(d("2.5")));
        assert_eq!(value(r#"" 7 ""#), Ok(d("7")));
        assert_eq!(value("1250"), Ok(d("1250")));
        assert_eq!(value("1e3"), Ok(d("1000")));
        assert_eq!(value("0"), Ok(d("0")));
        assert_eq!(value("-0"), Ok(d("0")));
        assert_eq!(value("0.1"), Ok(d("0.1")));
        assert_eq!(value("1000000000000"), Ok(d("1000000000000")));
        // 24 significant digits: a float would have kept 17.
        assert_eq!(
            value("123456789012.123456789012"),
            Ok(d("123456789012.123456789012"))
        );
        assert_eq!(value("0.000000000001"), Ok(d("0.000000000001")));
        assert_eq!(value("1.500000000000000"), Ok(d("1.5")));
    }

    #[test]
    fn refuses_bad_outcome_events_with_a_message_naming_the_field() {
        let cases = [
            (
                r#"{"outcome_type": "o", "value": -1}"#,
                "value -1 is negative",
            ),
            (r#"{"outcome_type": "o", "value": "-0.5"}"#, "is negative"),
            (
                r#"{"outcome_type": "o", "value": "many"}"#,
                r#"value "many" is not a decimal number"#,
            ),
            (
                r#"{"outcome_type": "o", "value": "1,5"}"#,
                "is not a decimal number",
            ),
            (
                r#"{"outcome_type": "o", "value": ""}"#,
                "is not a decimal number",
            ),
            (
                r#"{"outcome_type": "o", "value": true}"#,
                "value true is not a decimal",
            ),
            (
                r#"{"outcome_type": "o", "value": {"amount": 1}}"#,
                "is not a decimal",
            ),
            (r#"{"outcome_type": "o", "value": [1]}"#, "is not a decimal"),
            (
                r#"{"outcome_type": "o", "value": 0.0000000000001}"#,
                "value 0.0000000000001 has more than 12 fractional digits",
            ),
            (
                r#"{"outcome_type": "o", "value": "1000000000000.5"}"#,
                "value 1000000000000.5 is outside the accepted range 0 to 1000000000000",
            ),
            (
                r#"{"outcome_type": "o", "value": 1e13}"#,
                "outside the accepted range",
            ),
            (
                r#"{"outcome_type": "o", "value": 123456789012345678901234567890}"#,
                "at most 28 significant digits",
            ),
            (r#"{"outcome_type": ""}"#, "outcome_type"),
            (r#"{"outcome_type": "lead\u200bconverted"}"#, "outcome_type"),
            (r#"{"outcome_type": "o", "user_id": ""}"#, "user_id"),
            (
                r#"{"outcome_type": "o", "anonymous_id": " a"}"#,
                "anonymous_id",
            ),
            (
                r#"{"outcome_type": "o", "occurred_at": "yesterday"}"#,
                "RFC 3339",
            ),
            (
                r#"{"outcome_type": "o", "occurred_at": "2020-01-01T00:00:00Z"}"#,
                "in the past",
            ),
            (
                r#"{"outcome_type": "o", "occurred_at": "2099-01-01T00:00:00Z"}"#,
                "in the future",
            ),
            (
                r#"{"outcome_type": "o", "metadata": {"k": "bell\u0007"}}"#,
                "metadata",
            ),
        ];
        for (json, expected) in cases {
            let error = outcome(json).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
        let event_id = format!(
            r#"{{"outcome_type": "o", "event_id": "{}"}}"#,
            "x".repeat(300)
        );
        assert!(outcome(&event_id).unwrap_err().contains("event_id"));
    }

    #[test]
    fn outcome_metadata_has_the_limits_of_action_attributes() {
        let keys = |count: usize| {
            let metadata: Map<String, Value> = (0..count)
                .map(|index| (format!("k{index}"), json!(index)))
                .collect();
            json!({"outcome_type": "o", "metadata": metadata}).to_string()
        };
        assert!(outcome(&keys(128)).is_ok());
        let error = outcome(&keys(129)).unwrap_err();
        assert_eq!(error, "129 metadata keys; at most 128 are accepted");
        let large = json!({"outcome_type": "o", "metadata": {"blob": "x".repeat(20_000)}});
        let error = outcome(&large.to_string()).unwrap_err();
        assert!(
            error.starts_with("metadata takes 20011 bytes as JSON; at most 16384"),
            "{error}"
        );
    }

    #[test]
    fn an_outcome_body_cannot_name_an_identity_or_unknown_fields() {
        for field in [
            "workspace_id",
            "account_id",
            "agent_instance_id",
            "kind",
            "outcome_value",
        ] {
            let json = format!(r#"{{"outcome_type": "o", "{field}": "x"}}"#);
            let error = serde_json::from_str::<RestOutcome>(&json).unwrap_err();
            assert!(
                error.to_string().contains("unknown field"),
                "{field}: {error}"
            );
        }
        assert!(serde_json::from_str::<RestOutcome>(r#"{"value": 1}"#)
            .unwrap_err()
            .to_string()
            .contains("outcome_type"));
    }

    #[test]
    fn accepts_the_edges_of_the_time_window() {
        let limits = limits();
        assert!(check_occurred_at(NOW - limits.max_late_micros, &limits).is_ok());
        assert!(check_occurred_at(NOW + limits.max_future_micros, &limits).is_ok());
        assert!(check_occurred_at(NOW + limits.max_future_micros + 1, &limits).is_err());
    }
}
