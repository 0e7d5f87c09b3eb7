//! The synthetic workload every benchmark sends: the product guide's research agent
//! (`deploy/local/metering.example.toml` and `agentmeter demo`), repeated.
//!
//! Action `i` takes slot `i % 8` of [`SLOTS`]: 2× `web_search` (unit, 0.005), 2× `llm_call`
//! (token-priced, tokens and `cost_usd` in the attributes, as the guide sends them), 2× `delivery`
//! (tracked, no cost allocation), 1× `object_detection` (unit, an outcome), 1× `step_1`
//! (untracked, Live Data only). Every 8 actions the next agent instance (account) of the
//! configuration sends; users cycle through `users_per_account` ids per account.
//!
//! Raw actions are made by ingest's own [`rest_action_to_raw`] (once per slot and account, then
//! cloned with a new event id, user and time), so they are byte for byte what `POST /v1/actions`
//! would put on `actions.raw`.

use std::sync::Arc;

use agentmeter_enricher::enrich::{enrich, TimeWindow};
use agentmeter_ingest::auth::AgentIdentity;
use agentmeter_ingest::normalize::{rest_action_to_raw, Limits};
use agentmeter_ingest::IngestConfig;
use agentmeter_schemas::metering::hash_secret;
use agentmeter_schemas::rest::{RestAction, RestActionBatch};
use agentmeter_schemas::{EnrichedAction, MeteringConfig, RawAction, WorkspaceSnapshot};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use serde_json::{json, Map, Value};

/// The product guide's example configuration (workspace `ws_demo`, two accounts).
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/local/metering.example.toml");
/// The demo secrets of the two example agent instances (`deploy/local/demo-secrets.env`).
pub const DEMO_SECRETS: [(&str, &str); 2] = [
    ("inst_acme_research", "am_demo_acme_research_secret"),
    ("inst_globex_support", "am_demo_globex_support_secret"),
];

/// One action of the research-agent flow.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub action_name: &'static str,
    pub description: &'static str,
}

/// The 8-action cycle (see the module documentation).
pub const SLOTS: [Slot; 8] = [
    Slot {
        action_name: "web_search",
        description: "Searched for: market trends in AI",
    },
    Slot {
        action_name: "llm_call",
        description: "Summarized search results",
    },
    Slot {
        action_name: "delivery",
        description: "Sent summary to user",
    },
    Slot {
        action_name: "web_search",
        description: "Searched for: competitor pricing",
    },
    Slot {
        action_name: "llm_call",
        description: "Drafted the report",
    },
    Slot {
        action_name: "delivery",
        description: "Sent report to user",
    },
    Slot {
        action_name: "object_detection",
        description: "Detected 4 objects in invoice",
    },
    Slot {
        action_name: "step_1",
        description: "An untracked step (Live Data only)",
    },
];

/// The attributes the guide's agent sends with slot `slot` (varied a little by `index`).
pub fn slot_attributes(slot: usize, index: u64) -> Map<String, Value> {
    let value = match slot % SLOTS.len() {
        0 | 3 => json!({"results_count": 2 + index % 5, "search_provider": "google"}),
        1 | 4 => json!({
            "model": "gpt-4",
            "input_tokens": 2000 + (index % 10) * 50,
            "output_tokens": 600 + (index % 4) * 100,
            "cost_usd": 0.12
        }),
        2 | 5 => json!({"delivery_method": "email"}),
        6 => json!({"detected_boxes": 4, "model": "yolov8-invoice"}),
        _ => json!({}),
    };
    value.as_object().cloned().unwrap_or_default()
}

/// A metering configuration: the example, plus `extra_accounts` accounts with one agent
/// instance each (secret `bench_secret_<account>`), for workloads with more tenants.
pub fn config_text(extra_accounts: usize) -> String {
    let mut text = EXAMPLE_CONFIG.to_string();
    for index in 0..extra_accounts {
        let account = format!("acc_bench_{index:02}");
        text.push_str(&format!(
            "\n[[accounts]]\nid = \"{account}\"\nname = \"Bench account {index}\"\n\n\
             [[agent_instances]]\nid = \"inst_{account}\"\nname = \"Agent of {account}\"\n\
             agent_type = \"type_research\"\naccount = \"{account}\"\nsecret_sha256 = \"{}\"\n",
            hash_secret(&format!("bench_secret_{account}"))
        ));
    }
    text
}

/// Prototypes of raw actions and the identities that send them.
pub struct Workload {
    pub snapshot: Arc<WorkspaceSnapshot>,
    /// (agent instance id, account id, secret) in configuration order.
    pub senders: Vec<(String, String, String)>,
    pub users_per_account: u64,
    /// prototypes[sender][slot]
    prototypes: Vec<Vec<RawAction>>,
    pub window: TimeWindow,
}

impl Workload {
    /// The example configuration (2 accounts), 7 users per account like `agentmeter demo`.
    pub fn example() -> Workload {
        Workload::new(0, 7)
    }

    pub fn new(extra_accounts: usize, users_per_account: u64) -> Workload {
        let config = MeteringConfig::from_toml(&config_text(extra_accounts))
            .expect("the bench configuration is valid");
        let snapshot =
            Arc::new(WorkspaceSnapshot::build(1, config.clone()).expect("valid configuration"));
        let senders: Vec<(String, String, String)> = config
            .agent_instances
            .iter()
            .map(|instance| {
                let secret = DEMO_SECRETS
                    .iter()
                    .find(|(id, _)| *id == instance.id)
                    .map(|(_, secret)| secret.to_string())
                    .unwrap_or_else(|| format!("bench_secret_{}", instance.account));
                (instance.id.clone(), instance.account.clone(), secret)
            })
            .collect();
        let ingest = IngestConfig::default();
        let now = now_micros();
        let prototypes = senders
            .iter()
            .map(|(instance_id, _, _)| {
                let identity = AgentIdentity {
                    workspace: snapshot.clone(),
                    instance: snapshot
                        .instance(instance_id)
                        .cloned()
                        .expect("configured instance"),
                };
                let limits = Limits::from_config(&ingest, now);
                (0..SLOTS.len())
                    .map(|slot| {
                        let item = rest_action(slot, 0, "prototype", "user");
                        rest_action_to_raw(item, &identity, &limits, "rest")
                            .expect("the workload is valid REST input")
                    })
                    .collect()
            })
            .collect();
        Workload {
            snapshot,
            senders,
            users_per_account,
            prototypes,
            window: TimeWindow {
                max_late_micros: ingest.max_late_seconds * 1_000_000,
                max_future_micros: ingest.max_future_seconds * 1_000_000,
            },
        }
    }

    /// Which sender action `index` belongs to.
    /// Slot, sender and user vary independently: slot = i mod 8, sender = (i / 8) mod senders,
    /// user = (i / (8 · senders)) mod users.
    pub fn sender_of(&self, index: u64) -> usize {
        ((index / SLOTS.len() as u64) % self.senders.len() as u64) as usize
    }

    pub fn user_of(&self, sender: usize, index: u64) -> String {
        let per_user = SLOTS.len() as u64 * self.senders.len() as u64;
        format!(
            "user_{}_{}",
            self.senders[sender].1,
            (index / per_user) % self.users_per_account
        )
    }

    /// Raw action number `index` of run `run`, as ingest would have produced it at `at_micros`.
    pub fn raw_action(&self, run: &str, index: u64, at_micros: i64) -> RawAction {
        let sender = self.sender_of(index);
        let slot = (index % SLOTS.len() as u64) as usize;
        let mut raw = self.prototypes[sender][slot].clone();
        raw.event_id = event_id(run, index);
        raw.user_id = Some(self.user_of(sender, index));
        raw.occurred_at_micros = at_micros;
        raw.received_at_micros = at_micros;
        raw
    }

    /// The same action enriched by the real enricher code.
    pub fn enriched_action(&self, run: &str, index: u64, at_micros: i64) -> EnrichedAction {
        let raw = self.raw_action(run, index, at_micros);
        enrich(raw, &self.snapshot, self.window, at_micros).expect("the workload enriches")
    }

    /// A REST batch of `count` actions starting at `first`, all from `sender`.
    pub fn rest_batch(&self, run: &str, sender: usize, first: u64, count: usize) -> Vec<u8> {
        let actions = (0..count as u64)
            .map(|offset| {
                let index = first + offset;
                let slot = (index % SLOTS.len() as u64) as usize;
                let mut item = rest_action(slot, index, run, &self.user_of(sender, index));
                item.event_id = Some(event_id(run, index));
                item
            })
            .collect();
        serde_json::to_vec(&RestActionBatch { actions }).expect("serializable")
    }

    /// An OTLP export request of `count` `value.action` spans from `sender`, as value-python
    /// sends them (the attributes JSON in `value.action.user_attributes`).
    pub fn otlp_request(
        &self,
        run_hash: u64,
        sender: usize,
        first: u64,
        count: usize,
        start_nanos: u64,
    ) -> ExportTraceServiceRequest {
        let spans = (0..count as u64)
            .map(|offset| {
                let index = first + offset;
                let slot = (index % SLOTS.len() as u64) as usize;
                let mut trace_id = Vec::with_capacity(16);
                trace_id.extend_from_slice(&run_hash.to_be_bytes());
                trace_id.extend_from_slice(&(index / 8 + 1).to_be_bytes());
                let span_id = (index + 1).to_be_bytes().to_vec();
                let attributes = Value::Object(slot_attributes(slot, index)).to_string();
                Span {
                    trace_id,
                    span_id,
                    name: "value.action".to_string(),
                    kind: 1,
                    start_time_unix_nano: start_nanos,
                    end_time_unix_nano: start_nanos + 1_000_000,
                    attributes: vec![
                        kv("value.action.name", SLOTS[slot].action_name),
                        kv("value.action.user_id", &self.user_of(sender, index)),
                        kv("value.action.description", SLOTS[slot].description),
                        kv("value.action.user_attributes", &attributes),
                    ],
                    ..Default::default()
                }
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", "agentmeter-bench"),
                        kv("value.client.sdk", "value-python"),
                        kv("value.agent.id", &self.senders[sender].0),
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
    }
}

fn rest_action(slot: usize, index: u64, run: &str, user: &str) -> RestAction {
    RestAction {
        event_id: Some(event_id(run, index)),
        action_name: SLOTS[slot].action_name.to_string(),
        user_id: Some(user.to_string()),
        anonymous_id: None,
        occurred_at: None,
        description: Some(SLOTS[slot].description.to_string()),
        attributes: slot_attributes(slot, index),
    }
}

/// Event id of action `index` of a run: unique, sortable, recognisable.
pub fn event_id(run: &str, index: u64) -> String {
    format!("bench-{run}-{index:010}")
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

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_raw_actions_are_what_ingest_makes_and_enrich() {
        let workload = Workload::example();
        let now = now_micros();
        for index in 0..16u64 {
            let raw = workload.raw_action("t", index, now);
            let sender = workload.sender_of(index);
            let identity = AgentIdentity {
                workspace: workload.snapshot.clone(),
                instance: workload
                    .snapshot
                    .instance(&workload.senders[sender].0)
                    .cloned()
                    .unwrap(),
            };
            let slot = (index % 8) as usize;
            let mut item = rest_action(slot, 0, "t", &workload.user_of(sender, index));
            item.event_id = Some(event_id("t", index));
            let limits = Limits::from_config(&IngestConfig::default(), now);
            let expected = rest_action_to_raw(item, &identity, &limits, "rest").unwrap();
            assert_eq!(raw, expected);
            let enriched = workload.enriched_action("t", index, now);
            assert_eq!(enriched.tracked, slot != 7);
            assert_eq!(enriched.outcome, slot == 6);
        }
    }
}
