//! The JSON form of actions on ingest's REST endpoints `POST /v1/actions` and
//! `POST /v1/outcomes`.
//!
//! ```json
//! {"actions": [{"action_name": "llm_call", "user_id": "user_acme_123",
//!               "occurred_at": "2025-12-15T16:11:43Z",
//!               "attributes": {"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800,
//!                              "cost_usd": 0.12}}]}
//! ```
//! ```json
//! {"outcomes": [{"event_id": "lead-42-converted", "outcome_type": "lead_converted",
//!                "value": "1250.00", "user_id": "user_acme_123",
//!                "occurred_at": "2025-12-15T16:11:43Z", "metadata": {"lead_id": "L-42"}}]}
//! ```
//! Identity (workspace, account, agent instance) is never part of the body: it comes from the
//! `X-Agent-Secret` header.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A batch of actions; accepted whole or rejected whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestActionBatch {
    pub actions: Vec<RestAction>,
}

/// One action as a REST client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestAction {
    /// Client-chosen id; a retry with the same id is counted once. Assigned (UUIDv7) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub action_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// RFC 3339; the time of receipt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free attributes. `input_tokens`, `output_tokens`, `total_tokens`, `model` and `cost_usd`
    /// here are read as the LLM token counts, model and reported cost.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// A batch of explicit outcome events (`POST /v1/outcomes`); accepted whole or rejected whole,
/// like a batch of actions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestOutcomeBatch {
    pub outcomes: Vec<RestOutcome>,
}

/// One outcome event as a REST client sends it: a business result the agent reports itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestOutcome {
    /// Client-chosen id; a retry with the same id is counted once. Assigned (UUIDv7) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The outcome's name (an action name); unknown names are accepted and discovered.
    pub outcome_type: String,
    /// A count or an amount, a decimal ≥ 0 given as a JSON number or a decimal string; 1 when
    /// absent or null. Kept as the JSON text it was sent as, so that a number is read exactly
    /// from its digits, never through a float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// RFC 3339; the time of receipt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    /// Free metadata, kept as the action's attributes (same limits).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// What ingest answers to an accepted batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestAccepted {
    pub accepted: usize,
    /// The event id of each action, in request order.
    pub event_ids: Vec<String>,
}
