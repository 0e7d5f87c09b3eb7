//! The JSON form of actions on ingest's REST endpoint `POST /v1/actions`.
//!
//! ```json
//! {"actions": [{"action_name": "llm_call", "user_id": "user_acme_123",
//!               "occurred_at": "2025-12-15T16:11:43Z",
//!               "attributes": {"model": "gpt-4", "input_tokens": 2500, "output_tokens": 800,
//!                              "cost_usd": 0.12}}]}
//! ```
//! Identity (workspace, account, agent instance) is never part of the body: it comes from the
//! `X-Agent-Secret` header.

use serde::{Deserialize, Serialize};

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

/// What ingest answers to an accepted batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestAccepted {
    pub accepted: usize,
    /// The event id of each action, in request order.
    pub event_ids: Vec<String>,
}
