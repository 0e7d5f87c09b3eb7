//! Client input → [`RawAction`], with a precise message for everything that is wrong.
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

use agentmeter_schemas::limits::{
    check_action_cost, check_name_field, check_raw_action, check_token_count,
    MAX_DESCRIPTION_CHARS, MAX_ID_CHARS, MAX_TOKEN_COUNT,
};
use agentmeter_schemas::metering::check_action_name;
use agentmeter_schemas::rest::RestAction;
use agentmeter_schemas::text::{check_attributes_json, check_free_text, MaxLength};
use agentmeter_schemas::{ActionKind, RawAction};
use rust_decimal::Decimal;
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
    let event_id = match item.event_id {
        Some(event_id) => {
            check_id("event_id", &event_id)?;
            event_id
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    if let Some(user_id) = &item.user_id {
        check_id("user_id", user_id)?;
    }
    if let Some(anonymous_id) = &item.anonymous_id {
        check_id("anonymous_id", anonymous_id)?;
    }
    if let Some(description) = &item.description {
        check_description(description)?;
    }
    let occurred_at_micros = match &item.occurred_at {
        None => limits.now_micros,
        Some(text) => {
            let instant = OffsetDateTime::parse(text, &Rfc3339).map_err(|error| {
                format!("occurred_at {text:?} is not an RFC 3339 time: {error}")
            })?;
            (instant.unix_timestamp_nanos() / 1000) as i64
        }
    };
    check_occurred_at(occurred_at_micros, limits)?;
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
    };
    // Everything above was checked with a message of its own; this is the rule the enricher
    // applies, so nothing accepted here can be dead-lettered there for its values.
    check_raw_action(&raw).map_err(|error| error.to_string())?;
    Ok(raw)
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
    if attributes.len() > limits.max_attributes {
        return Err(format!(
            "{} attributes; at most {} are accepted",
            attributes.len(),
            limits.max_attributes
        ));
    }
    let text = serde_json::to_string(attributes).expect("a JSON map serializes");
    if text.len() > limits.max_attributes_bytes {
        return Err(format!(
            "attributes take {} bytes as JSON; at most {} are accepted",
            text.len(),
            limits.max_attributes_bytes
        ));
    }
    check_attributes_json(&text)?;
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

    #[test]
    fn accepts_the_edges_of_the_time_window() {
        let limits = limits();
        assert!(check_occurred_at(NOW - limits.max_late_micros, &limits).is_ok());
        assert!(check_occurred_at(NOW + limits.max_future_micros, &limits).is_ok());
        assert!(check_occurred_at(NOW + limits.max_future_micros + 1, &limits).is_err());
    }
}
