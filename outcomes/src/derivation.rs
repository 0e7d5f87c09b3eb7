//! Which contexts stored actions belong to, and the firings of one context (ADR 0005, section 3).
//!
//! The `outcomes` stage reads actions from ClickHouse and hands them here as [`StoredAction`]s;
//! everything in this module is a pure function of them and of the workspace's compiled
//! composite definitions ([`CompiledComposite`]), so two stages, a restart or a replay compute
//! the same contexts, the same firings and the same ids.
//!
//! * A **context** ([`ContextKey`]) is one version of one composite definition, one agent
//!   instance and one context value (the user key, or an attribute's value). Its 64-bit
//!   [`ContextKey::id`] keys the rows written for it.
//! * [`contexts_of`] — the contexts a new action touches: those of every version it is a
//!   constituent of whose firings it could change (a constituent at *t* can only change firings
//!   completing in `[t, t + within]`).
//! * [`firings_of_context`] — the firings of one context from all of its constituents, those
//!   completing inside the version's effective range.

use std::collections::HashSet;

use agentmeter_schemas::action::RawAction;
use agentmeter_schemas::metering::{CompiledComposite, CompositeContext};
use sha2::{Digest, Sha256};

use crate::composite::{derive_from, Constituent, Firing, Pattern};

/// One action as stored in `actions`, with where the aggregator read it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAction {
    pub raw: RawAction,
    pub partition: u32,
    pub offset: u64,
}

/// One context of one composite version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextKey {
    pub workspace_id: String,
    /// The index of the version in the workspace's `composite_outcomes`.
    pub version: usize,
    pub agent_instance_id: String,
    pub value: String,
}

impl ContextKey {
    /// The context's id: the same for the same definition version (name, start, context kind),
    /// instance and value, whoever computes it.
    pub fn id(&self, composite: &CompiledComposite) -> u64 {
        let mut hasher = Sha256::new();
        for part in [
            self.workspace_id.as_str(),
            composite.name.as_str(),
            &composite.effective_from_micros.to_string(),
            &composite.context.describe(),
            self.agent_instance_id.as_str(),
            self.value.as_str(),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0x1f]);
        }
        let digest = hasher.finalize();
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        // Never the all-ones id: nothing may look like a missing value.
        u64::from_be_bytes(bytes) & (u64::MAX >> 1)
    }
}

/// The value of `context` for an action: its user key, or the attribute's value as text (a
/// string as it is, a number or boolean as written). `None`: the action has no such context.
pub fn context_value(context: &CompositeContext, raw: &RawAction) -> Option<String> {
    match context {
        CompositeContext::User => {
            let key = raw.user_key();
            (!key.is_empty()).then(|| key.to_string())
        }
        CompositeContext::Attribute(key) => attribute_text(&raw.attributes_json, key),
    }
}

fn attribute_text(attributes_json: &str, key: &str) -> Option<String> {
    let attributes: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(attributes_json).ok()?;
    match attributes.get(key)? {
        serde_json::Value::String(text) if !text.is_empty() => Some(text.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        serde_json::Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// The contexts (of the workspace's versions `composites`) whose firings `raw`, a newly stored
/// action, can change.
pub fn contexts_of(composites: &[CompiledComposite], raw: &RawAction) -> Vec<ContextKey> {
    let at = raw.occurred_at_micros;
    composites
        .iter()
        .enumerate()
        .filter(|(_, composite)| {
            // Firings it could change complete in [at, at + within].
            at.saturating_add(composite.within_micros) >= composite.effective_from_micros
                && at < composite.effective_until_micros
                && composite.is_constituent(raw)
        })
        .filter_map(|(version, composite)| {
            context_value(&composite.context, raw).map(|value| ContextKey {
                workspace_id: raw.workspace_id.clone(),
                version,
                agent_instance_id: raw.agent_instance_id.clone(),
                value,
            })
        })
        .collect()
}

/// One firing of a context, with the action that completed it.
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedFiring {
    /// [`Firing::id`]: from the definition's name and the constituents' event ids.
    pub id: String,
    pub firing: Firing,
    /// The completing action (its account, user and time are the firing's).
    pub completed_by: RawAction,
}

/// Every firing of `key`'s context, from `actions` — any stored actions; those that are not
/// constituents of the version in this context are left out, and a re-sent event id counts
/// once (the lowest offset wins, as in the aggregator). Firings completing outside the
/// version's effective range are left out: another version owns them.
pub fn firings_of_context(
    composite: &CompiledComposite,
    key: &ContextKey,
    actions: &[StoredAction],
) -> Vec<DerivedFiring> {
    firings_of_context_from(composite, key, actions, &[], i64::MIN)
}

/// The firings of `key`'s context completing at or after `from_micros`, given `kept`: the
/// firings it has completing in `[from − within, from)` (their constituents stay consumed).
/// `actions` needs only the constituents from `from − within` on: no firing completing at or
/// after `from` can reach further back. This is what the stage re-derives when new
/// constituents arrive from `from` on; with `from` = `i64::MIN` it is [`firings_of_context`].
///
/// Exact only when no firing outside the version's range could have consumed a constituent
/// from `from − within` on, i.e. when `from − within` is not before the version's
/// `effective_from` (the caller derives the whole context otherwise): a firing completing
/// before `effective_from` is never written, so it cannot be among `kept`.
pub fn firings_of_context_from(
    composite: &CompiledComposite,
    key: &ContextKey,
    actions: &[StoredAction],
    kept: &[Firing],
    from_micros: i64,
) -> Vec<DerivedFiring> {
    let mut members: Vec<&StoredAction> = actions
        .iter()
        .filter(|stored| {
            let raw = &stored.raw;
            raw.workspace_id == key.workspace_id
                && raw.agent_instance_id == key.agent_instance_id
                && composite.is_constituent(raw)
                && context_value(&composite.context, raw).as_deref() == Some(key.value.as_str())
        })
        .collect();
    members.sort_by(|a, b| {
        (&a.raw.event_id, a.partition, a.offset).cmp(&(&b.raw.event_id, b.partition, b.offset))
    });
    let mut seen = HashSet::new();
    members.retain(|stored| seen.insert(stored.raw.event_id.as_str()));
    let constituents: Vec<Constituent> = members
        .iter()
        .map(|stored| Constituent {
            event_id: stored.raw.event_id.clone(),
            action_name: stored.raw.action_name.clone(),
            occurred_at_micros: stored.raw.occurred_at_micros,
        })
        .collect();
    let pattern = Pattern {
        steps: composite.step_names(),
        ordered: composite.ordered,
        within_micros: composite.within_micros,
    };
    derive_from(&pattern, &constituents, kept, from_micros)
        .into_iter()
        .filter(|firing| {
            (composite.effective_from_micros..composite.effective_until_micros)
                .contains(&firing.at_micros)
        })
        .filter_map(|firing| {
            let completing = members
                .iter()
                .find(|stored| stored.raw.event_id == firing.completed_by())?;
            Some(DerivedFiring {
                id: firing.id(&key.workspace_id, &composite.name),
                completed_by: completing.raw.clone(),
                firing,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use agentmeter_schemas::metering::{MeteringConfig, WorkspaceSnapshot};

    use super::*;

    fn snapshot(composites: &str) -> WorkspaceSnapshot {
        let text = format!(
            r#"
[workspace]
id = "ws"
name = "W"
currency = "USD"

[tagging]
tracked = ["web_search", "llm_call", "delivery", "lead_qualified", "contract_signed"]

{composites}
"#
        );
        WorkspaceSnapshot::build(1, MeteringConfig::from_toml(&text).unwrap()).unwrap()
    }

    fn action(id: &str, name: &str, user: &str, at_seconds: i64, attributes: &str) -> StoredAction {
        StoredAction {
            raw: RawAction {
                user_id: (!user.is_empty()).then(|| user.to_string()),
                occurred_at_micros: at_seconds * 1_000_000,
                attributes_json: attributes.to_string(),
                ..RawAction::minimal("ws", "acme", "bot-1", id, name)
            },
            partition: 0,
            offset: 0,
        }
    }

    const RESEARCH: &str = r#"
[[composite_outcomes]]
name = "research_completed"
steps = [{ action = "web_search" }, { action = "llm_call" }, { action = "delivery" }]
ordered = true
within = "15m"
context = "user"
"#;

    #[test]
    fn a_sequence_of_one_user_fires_once_and_another_users_actions_do_not_join_it() {
        let snapshot = snapshot(RESEARCH);
        let composite = &snapshot.composite_outcomes()[0];
        let actions = vec![
            action("a", "web_search", "ann", 10, "{}"),
            action("b", "llm_call", "bob", 20, "{}"),
            action("c", "llm_call", "ann", 30, "{}"),
            action("d", "delivery", "ann", 40, "{}"),
            action("e", "delivery", "bob", 50, "{}"),
        ];
        let contexts = contexts_of(snapshot.composite_outcomes(), &actions[3].raw);
        assert_eq!(contexts.len(), 1);
        assert_eq!(contexts[0].value, "ann");
        let firings = firings_of_context(composite, &contexts[0], &actions);
        assert_eq!(firings.len(), 1);
        assert_eq!(firings[0].firing.event_ids, ["a", "c", "d"]);
        assert_eq!(firings[0].completed_by.event_id, "d");
        let bob = ContextKey {
            value: "bob".into(),
            ..contexts[0].clone()
        };
        assert!(firings_of_context(composite, &bob, &actions).is_empty());
        assert_ne!(bob.id(composite), contexts[0].id(composite));
    }

    #[test]
    fn an_attribute_context_joins_actions_of_different_users_and_skips_actions_without_it() {
        let snapshot = snapshot(
            r#"
[[composite_outcomes]]
name = "lead_converted"
steps = [{ action = "lead_qualified" }, { action = "contract_signed" }]
within = "30days"
context = "attributes.lead_id"
"#,
        );
        let composite = &snapshot.composite_outcomes()[0];
        let actions = vec![
            action("s", "contract_signed", "ann", 100, r#"{"lead_id": 7}"#),
            action("q", "lead_qualified", "bob", 200, r#"{"lead_id": "7"}"#),
            action("x", "lead_qualified", "bob", 300, r#"{"other": 7}"#),
        ];
        assert!(contexts_of(snapshot.composite_outcomes(), &actions[2].raw).is_empty());
        let key = &contexts_of(snapshot.composite_outcomes(), &actions[1].raw)[0];
        assert_eq!(key.value, "7");
        let firings = firings_of_context(composite, key, &actions);
        assert_eq!(firings.len(), 1, "a set: any order");
        assert_eq!(firings[0].completed_by.event_id, "q");
    }

    #[test]
    fn a_step_condition_decides_which_actions_are_instances_of_the_step() {
        let snapshot = snapshot(
            r#"
[[composite_outcomes]]
name = "research_completed"
steps = [{ action = "web_search" }, { action = "delivery", when = { field = "attributes.status", eq = "success" } }]
ordered = true
within = "15m"
context = "user"
"#,
        );
        let composite = &snapshot.composite_outcomes()[0];
        let failed = action("d1", "delivery", "ann", 20, r#"{"status": "failed"}"#);
        assert!(contexts_of(snapshot.composite_outcomes(), &failed.raw).is_empty());
        let actions = vec![
            action("w", "web_search", "ann", 10, "{}"),
            failed,
            action("d2", "delivery", "ann", 30, r#"{"status": "success"}"#),
        ];
        let key = &contexts_of(snapshot.composite_outcomes(), &actions[2].raw)[0];
        let firings = firings_of_context(composite, key, &actions);
        assert_eq!(firings.len(), 1);
        assert_eq!(firings[0].firing.event_ids, ["w", "d2"]);
    }

    #[test]
    fn deriving_from_an_instant_with_the_firings_kept_gives_what_deriving_the_whole_context_gives()
    {
        let snapshot = snapshot(RESEARCH);
        let composite = &snapshot.composite_outcomes()[0];
        let mut random = 7u64;
        let mut next = |bound: u64| {
            random = random
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (random >> 33) % bound
        };
        let names = ["web_search", "llm_call", "delivery"];
        let actions: Vec<StoredAction> = (0..300)
            .map(|index| {
                let name = names[next(3) as usize];
                action(&format!("e{index}"), name, "ann", next(20_000) as i64, "{}")
            })
            .collect();
        let key = &contexts_of(snapshot.composite_outcomes(), &actions[0].raw)[0];
        let whole = firings_of_context(composite, key, &actions);
        assert!(whole.len() > 10, "{}", whole.len());
        for from_seconds in [0, 500, 3_333, 10_000, 19_999] {
            let from = from_seconds * 1_000_000;
            let lower = from - composite.within_micros;
            let kept: Vec<Firing> = whole
                .iter()
                .filter(|f| (lower..from).contains(&f.firing.at_micros))
                .map(|f| f.firing.clone())
                .collect();
            let recent: Vec<StoredAction> = actions
                .iter()
                .filter(|a| a.raw.occurred_at_micros >= lower)
                .cloned()
                .collect();
            let later = firings_of_context_from(composite, key, &recent, &kept, from);
            let expected: Vec<&DerivedFiring> = whole
                .iter()
                .filter(|f| f.firing.at_micros >= from)
                .collect();
            assert_eq!(
                later.iter().collect::<Vec<_>>(),
                expected,
                "from {from_seconds} s"
            );
        }
    }

    #[test]
    fn versions_split_firings_at_their_effective_from_and_a_resent_action_counts_once() {
        let snapshot = snapshot(
            r#"
[[composite_outcomes]]
name = "research_completed"
steps = [{ action = "web_search" }, { action = "delivery" }]
ordered = true
within = "15m"
context = "user"

[[composite_outcomes]]
name = "research_completed"
steps = [{ action = "web_search" }, { action = "llm_call" }, { action = "delivery" }]
ordered = true
within = "15m"
context = "user"
effective_from = "1970-01-01T01:00:00Z"
"#,
        );
        let [old, new] = snapshot.composite_outcomes() else {
            panic!("two versions")
        };
        assert_eq!(old.effective_until_micros, new.effective_from_micros);
        let mut resent = action("d1", "delivery", "ann", 20, "{}");
        resent.offset = 9;
        let actions = vec![
            action("w1", "web_search", "ann", 10, "{}"),
            action("d1", "delivery", "ann", 20, "{}"),
            resent,
            // After 01:00 the old version's firings are the new one's to make.
            action("w2", "web_search", "ann", 3_590, "{}"),
            action("d2", "delivery", "ann", 3_610, "{}"),
            action("w3", "web_search", "ann", 4_000, "{}"),
            action("l3", "llm_call", "ann", 4_010, "{}"),
            action("d3", "delivery", "ann", 4_020, "{}"),
        ];
        let old_key = &contexts_of(snapshot.composite_outcomes(), &actions[1].raw)[0];
        assert_eq!(old_key.version, 0);
        let old_firings = firings_of_context(old, old_key, &actions);
        assert_eq!(
            old_firings
                .iter()
                .map(|f| f.firing.event_ids.clone())
                .collect::<Vec<_>>(),
            [vec!["w1".to_string(), "d1".to_string()]]
        );
        let new_key = ContextKey {
            version: 1,
            ..old_key.clone()
        };
        // Each version derives on its own: w2, whose pair with d2 completed after the switch and
        // so is no firing of the old version, is the new version's earliest web_search.
        let new_firings = firings_of_context(new, &new_key, &actions);
        assert_eq!(new_firings.len(), 1);
        assert_eq!(new_firings[0].firing.event_ids, ["w2", "l3", "d3"]);
        // A web_search just before the switch can still complete a firing of the new version.
        let early = action("w9", "web_search", "ann", 3_599, "{}");
        let touched = contexts_of(snapshot.composite_outcomes(), &early.raw);
        assert_eq!(
            touched.iter().map(|k| k.version).collect::<Vec<_>>(),
            [0, 1]
        );
    }
}
