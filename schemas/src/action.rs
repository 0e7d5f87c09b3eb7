//! The two event types that travel between the stages: [`RawAction`] on `actions.raw` and
//! [`EnrichedAction`] on `actions.enriched`. Field for field they follow `avro/*.avsc`.

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

/// Where an action came from, as its `kind` field says it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// An explicit action: a `value.action` span or a REST action.
    Action,
    /// An LLM call seen as a GenAI span; `action_name` is the auto tag `<provider>_llm_<model>`.
    Llm,
    /// Any other span; counts only when its name is tracked.
    TraceEvent,
    /// An explicit outcome event (`POST /v1/outcomes`, or a direct publisher): `action_name` is
    /// the outcome type, `outcome_value` its value. Always tracked and always `@outcome`
    /// (docs/adr/0005-derived-outcomes.md, section 1).
    Outcome,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Action => "action",
            ActionKind::Llm => "llm",
            ActionKind::TraceEvent => "trace_event",
            ActionKind::Outcome => "outcome",
        }
    }

    pub fn parse(text: &str) -> Option<ActionKind> {
        match text {
            "action" => Some(ActionKind::Action),
            "llm" => Some(ActionKind::Llm),
            "trace_event" => Some(ActionKind::TraceEvent),
            "outcome" => Some(ActionKind::Outcome),
            _ => None,
        }
    }
}

/// The measure of every outcome event (kind `outcome`): its quantity is the event's value.
pub const OUTCOME_VALUE_MEASURE: &str = "value";

/// One action as ingest accepted it. Identity fields (`workspace_id`, `account_id`,
/// `agent_instance_id`) come from the authenticated agent secret, never from the request body.
#[derive(Debug, Clone, PartialEq)]
pub struct RawAction {
    pub event_id: String,
    pub workspace_id: String,
    pub account_id: String,
    pub agent_instance_id: String,
    pub kind: ActionKind,
    pub action_name: String,
    pub trace_event: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// When the action happened, microseconds since the Unix epoch (UTC).
    pub occurred_at_micros: i64,
    /// When ingest accepted it, microseconds since the Unix epoch (UTC).
    pub received_at_micros: i64,
    pub description: Option<String>,
    pub llm_provider: Option<String>,
    pub llm_model: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    /// A cost the caller reported (the guide's `cost_usd`).
    pub reported_cost: Option<Decimal>,
    /// The free attributes as one JSON object text.
    pub attributes_json: String,
    /// `rest`, `otlp_grpc`, `otlp_http` or `kafka`.
    pub source: String,
    /// The value of an outcome event (kind `outcome`): a count or an amount, 0 to 10^12 with at
    /// most 12 fractional digits; absent means 1. Not read for any other kind.
    pub outcome_value: Option<Decimal>,
}

impl RawAction {
    /// A plain action of `agent_instance_id` (of `account_id` in `workspace_id`) with nothing
    /// else set: no user, tokens, cost or description, empty attributes, times 0, source
    /// `kafka`. Tests, fuzz seeds and benches set what matters to them with struct update syntax:
    /// `RawAction { user_id: Some(..), ..RawAction::minimal(..) }`.
    pub fn minimal(
        workspace_id: &str,
        account_id: &str,
        agent_instance_id: &str,
        event_id: &str,
        action_name: &str,
    ) -> RawAction {
        RawAction {
            event_id: event_id.into(),
            workspace_id: workspace_id.into(),
            account_id: account_id.into(),
            agent_instance_id: agent_instance_id.into(),
            kind: ActionKind::Action,
            action_name: action_name.into(),
            trace_event: None,
            user_id: None,
            anonymous_id: None,
            occurred_at_micros: 0,
            received_at_micros: 0,
            description: None,
            llm_provider: None,
            llm_model: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: None,
            reported_cost: None,
            attributes_json: "{}".into(),
            source: "kafka".into(),
            outcome_value: None,
        }
    }

    /// The end user the action is attributed to: `user_id`, else `anonymous_id`, else empty.
    pub fn user_key(&self) -> &str {
        self.user_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .or(self.anonymous_id.as_deref())
            .unwrap_or("")
    }

    /// The quantity of an outcome event: its `outcome_value`, 1 when absent.
    pub fn outcome_quantity(&self) -> Decimal {
        self.outcome_value.unwrap_or(Decimal::ONE)
    }

    /// The Kafka message key: duplicates of one action always land in one partition.
    pub fn message_key(&self) -> String {
        message_key(&self.workspace_id, &self.event_id)
    }
}

/// Kafka message key of an action: hex of the first 16 bytes of SHA-256(workspace ␟ event_id).
/// Hashing keeps keys short and evenly spread; the separator keeps (`a`, `bc`) apart from (`ab`, `c`).
pub fn message_key(workspace_id: &str, event_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(workspace_id.as_bytes());
    hasher.update([0x1f]);
    hasher.update(event_id.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// Where the `cost` of an enriched action came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostSource {
    /// quantity × the cost-per-unit in force at `occurred_at`.
    Allocated,
    /// No cost allocation applies; the cost the caller reported.
    Reported,
    /// Neither exists: cost 0.
    None,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Allocated => "allocated",
            CostSource::Reported => "reported",
            CostSource::None => "none",
        }
    }

    pub fn parse(text: &str) -> Option<CostSource> {
        match text {
            "allocated" => Some(CostSource::Allocated),
            "reported" => Some(CostSource::Reported),
            "none" => Some(CostSource::None),
            _ => None,
        }
    }
}

/// A raw action with the workspace's metering configuration applied.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedAction {
    pub raw: RawAction,
    pub tracked: bool,
    pub outcome: bool,
    /// Empty when no cost allocation applies.
    pub measure: String,
    pub quantity: Decimal,
    pub unit_cost: Decimal,
    pub cost: Decimal,
    pub cost_source: CostSource,
    pub currency: String,
    pub config_version: i64,
    pub enriched_at_micros: i64,
}

impl EnrichedAction {
    /// `@action` for every tracked action, plus `@outcome` for outcomes.
    pub fn tags(&self) -> &'static [&'static str] {
        match (self.tracked, self.outcome) {
            (true, true) => &["@action", "@outcome"],
            (true, false) => &["@action"],
            (false, _) => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_key_separates_workspace_from_event_id() {
        assert_ne!(message_key("a", "bc"), message_key("ab", "c"));
        assert_eq!(message_key("ws", "e1"), message_key("ws", "e1"));
        assert_eq!(message_key("ws", "e1").len(), 32);
    }
}
