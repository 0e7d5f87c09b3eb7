//! The pure enrichment of one raw action against its workspace's configuration snapshot.
//!
//! Decisions (documented in `docs/metering.md`):
//! * Untracked names pass through with `tracked = false`, quantity 0 and cost 0: visible in
//!   Live Data, never billed.
//! * `token` = input + output tokens; `input_token` = input; `output_token` = output. When a
//!   provider reports `total_tokens` above input + output (Gemini 2.5 "thinking" tokens), the
//!   difference is billed by the provider as output, so it is counted as output here too.
//! * Tokens missing from the typed fields are looked up in the attributes JSON
//!   (`input_tokens`, `output_tokens`, `total_tokens`), as direct Kafka publishers may send them
//!   there.
//! * `cost` is what billing uses: quantity × the rate in force at `occurred_at` when a cost
//!   allocation applies (`cost_source = allocated`), else the cost the caller reported
//!   (`reported`), else 0 (`none`). The reported cost is always kept beside it.
//! * Cost is quantity × rate rounded once, half-even, to 12 fractional digits (the storage
//!   scale), in exact integer arithmetic ([`mul_round_half_even`]).
//! * An action named by an `[[outcomes]]` definition is `@outcome` only when the definition's
//!   `when` condition holds for it (`agentmeter_schemas::condition`); otherwise just `@action`.
//! * An explicit outcome event (kind `outcome`, docs/adr/0005-derived-outcomes.md section 1) is
//!   always tracked and always `@outcome` (it was sent as a result: there is nothing to tag and no
//!   `when` to hold), measure `value`, quantity = its `outcome_value` (1 when absent). Its cost is
//!   0, unless a cost allocation names its type: then the allocation's rate in force at
//!   `occurred_at` prices each unit of the value (cost = value × rate, `allocated`, whatever
//!   measure the allocation names; with the default value 1 that is the rate per event). Without
//!   an allocation a cost the publisher reported applies, as for any tracked action.
//! * Every value is first checked against its accepted range and the text rules
//!   ([`check_raw_action`]: ingest checks the same, so this catches direct Kafka publishers), and
//!   every computation on it is checked: a quantity above 10^12, a cost above 10^9 or anything
//!   that would overflow is a dead letter with the reason (`docs/adr/0002-value-ranges.md`) —
//!   never a panic, a wrap-around or a rounding.

use std::str::FromStr;

use agentmeter_schemas::action::OUTCOME_VALUE_MEASURE;
use agentmeter_schemas::decimal::mul_round_half_even;
use agentmeter_schemas::limits::{
    check_action_cost, check_quantity, check_raw_action, check_token_count, ValueError,
};
use agentmeter_schemas::metering::Measure;
use agentmeter_schemas::{ActionKind, CostSource, EnrichedAction, RawAction, WorkspaceSnapshot};
use rust_decimal::Decimal;

/// Why a record goes to the dead-letter topic instead of downstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterReason {
    #[error("undecodable record: {0}")]
    Undecodable(String),
    #[error("unknown workspace {0:?}")]
    UnknownWorkspace(String),
    #[error("unknown agent instance {instance:?} in workspace {workspace:?}")]
    UnknownAgentInstance { workspace: String, instance: String },
    #[error("agent instance {instance:?} belongs to account {configured:?}, but the record says {claimed:?}")]
    AccountMismatch {
        instance: String,
        configured: String,
        claimed: String,
    },
    #[error("occurred_at is outside the accepted window: {0}")]
    OutsideTimeWindow(String),
    #[error("cannot measure {measure}: {problem}")]
    Unmeasurable { measure: String, problem: String },
    #[error("{0}")]
    InvalidValue(ValueError),
    #[error("cannot encode the enriched action: {0}")]
    Unencodable(String),
}

impl DeadLetterReason {
    /// A short, stable code for metrics and the `agentmeter.dlq.reason` header.
    pub fn code(&self) -> &'static str {
        match self {
            DeadLetterReason::Undecodable(_) => "undecodable",
            DeadLetterReason::UnknownWorkspace(_) => "unknown_workspace",
            DeadLetterReason::UnknownAgentInstance { .. } => "unknown_agent_instance",
            DeadLetterReason::AccountMismatch { .. } => "account_mismatch",
            DeadLetterReason::OutsideTimeWindow(_) => "outside_time_window",
            DeadLetterReason::Unmeasurable { .. } => "unmeasurable",
            DeadLetterReason::InvalidValue(error) if error.is_text() => "invalid_text",
            DeadLetterReason::InvalidValue(_) => "value_out_of_range",
            DeadLetterReason::Unencodable(_) => "unencodable",
        }
    }
}

/// The accepted span of `occurred_at` around `received_at`.
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub max_late_micros: i64,
    pub max_future_micros: i64,
}

/// Enriches one action. `now_micros` stamps `enriched_at`.
pub fn enrich(
    mut raw: RawAction,
    snapshot: &WorkspaceSnapshot,
    window: TimeWindow,
    now_micros: i64,
) -> Result<EnrichedAction, DeadLetterReason> {
    check_raw_action(&raw).map_err(DeadLetterReason::InvalidValue)?;
    let instance = snapshot.instance(&raw.agent_instance_id).ok_or_else(|| {
        DeadLetterReason::UnknownAgentInstance {
            workspace: raw.workspace_id.clone(),
            instance: raw.agent_instance_id.clone(),
        }
    })?;
    if raw.account_id.is_empty() {
        // Direct publishers may leave the account to the configuration.
        raw.account_id = instance.account.clone();
    } else if raw.account_id != instance.account {
        return Err(DeadLetterReason::AccountMismatch {
            instance: instance.id.clone(),
            configured: instance.account.clone(),
            claimed: raw.account_id.clone(),
        });
    }
    // Both instants are within 2000–2100 (checked above): the difference cannot overflow.
    let late_by = raw.received_at_micros - raw.occurred_at_micros;
    if late_by > window.max_late_micros || -late_by > window.max_future_micros {
        return Err(DeadLetterReason::OutsideTimeWindow(format!(
            "occurred_at is {} s before received_at; accepted: {} s late to {} s early",
            late_by / 1_000_000,
            window.max_late_micros / 1_000_000,
            window.max_future_micros / 1_000_000
        )));
    }

    if raw.kind == ActionKind::Outcome {
        return enrich_outcome_event(raw, snapshot, now_micros);
    }
    let rule = snapshot.rule_for(&raw.action_name, raw.trace_event.as_deref());
    let rate = rule.pricing.as_ref().and_then(|pricing| {
        pricing
            .rate_at(raw.occurred_at_micros)
            .map(|rate| (pricing, rate))
    });
    let (measure, quantity, unit_cost, cost, cost_source) = match (rule.tracked, rate) {
        (false, _) => (
            String::new(),
            Decimal::ZERO,
            Decimal::ZERO,
            Decimal::ZERO,
            CostSource::None,
        ),
        (true, Some((pricing, rate))) => {
            let quantity = measure_quantity(&pricing.measure, &raw)?;
            check_quantity("quantity", quantity).map_err(DeadLetterReason::InvalidValue)?;
            let cost = allocated_cost(quantity, rate)?;
            (
                pricing.measure.name().to_string(),
                quantity,
                rate,
                cost,
                CostSource::Allocated,
            )
        }
        (true, None) => match raw.reported_cost {
            Some(reported) => (
                String::new(),
                Decimal::ZERO,
                Decimal::ZERO,
                reported,
                CostSource::Reported,
            ),
            None => (
                String::new(),
                Decimal::ZERO,
                Decimal::ZERO,
                Decimal::ZERO,
                CostSource::None,
            ),
        },
    };
    // An outcome definition's `when` is evaluated here, on the action as accepted (with the
    // account filled in): compiled once per snapshot, allocation-free per action.
    let outcome = rule.is_outcome(&raw);
    Ok(EnrichedAction {
        tracked: rule.tracked,
        outcome,
        measure,
        quantity,
        unit_cost,
        cost,
        cost_source,
        currency: snapshot.currency().to_string(),
        config_version: snapshot.version,
        enriched_at_micros: now_micros,
        raw,
    })
}

/// quantity × rate, rounded once, within the range of a cost.
fn allocated_cost(quantity: Decimal, rate: Decimal) -> Result<Decimal, DeadLetterReason> {
    mul_round_half_even(quantity, rate)
        .ok_or_else(|| ValueError::OutOfRange {
            field: "cost".into(),
            value: format!("{quantity} × {rate}"),
            max: agentmeter_schemas::limits::MAX_ACTION_COST.to_string(),
        })
        .and_then(|cost| check_action_cost("cost", cost).map(|()| cost))
        .map_err(DeadLetterReason::InvalidValue)
}

/// An explicit outcome event, already checked (values, identity, time window): tracked,
/// `@outcome`, measure `value` with its value as the quantity, priced only by a cost allocation
/// of its type (else a reported cost, else 0).
fn enrich_outcome_event(
    raw: RawAction,
    snapshot: &WorkspaceSnapshot,
    now_micros: i64,
) -> Result<EnrichedAction, DeadLetterReason> {
    let quantity = raw.outcome_quantity();
    // check_raw_action held outcome_value to this already; the default 1 is within it too.
    check_quantity("outcome_value", quantity).map_err(DeadLetterReason::InvalidValue)?;
    let rule = snapshot.rule(&raw.action_name);
    let rate = rule
        .pricing
        .as_ref()
        .and_then(|pricing| pricing.rate_at(raw.occurred_at_micros));
    let (unit_cost, cost, cost_source) = match (rate, raw.reported_cost) {
        (Some(rate), _) => (rate, allocated_cost(quantity, rate)?, CostSource::Allocated),
        (None, Some(reported)) => (Decimal::ZERO, reported, CostSource::Reported),
        (None, None) => (Decimal::ZERO, Decimal::ZERO, CostSource::None),
    };
    Ok(EnrichedAction {
        tracked: true,
        outcome: true,
        measure: OUTCOME_VALUE_MEASURE.to_string(),
        quantity,
        unit_cost,
        cost,
        cost_source,
        currency: snapshot.currency().to_string(),
        config_version: snapshot.version,
        enriched_at_micros: now_micros,
        raw,
    })
}

/// Token counts of an action: typed fields first, then the attributes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCounts {
    pub input: Option<i64>,
    pub output: Option<i64>,
    pub total: Option<i64>,
}

impl TokenCounts {
    /// The counts of `raw`; counts found in the attributes are held to the same range as the
    /// typed fields (which [`check_raw_action`] checked).
    pub fn of(raw: &RawAction) -> Result<TokenCounts, ValueError> {
        let mut counts = TokenCounts {
            input: raw.input_tokens,
            output: raw.output_tokens,
            total: raw.total_tokens,
        };
        if counts.input.is_none() || counts.output.is_none() || counts.total.is_none() {
            if let Ok(serde_json::Value::Object(attributes)) =
                serde_json::from_str(&raw.attributes_json)
            {
                let read = |name: &'static str| -> Result<Option<i64>, ValueError> {
                    let Some(count) = attributes.get(name).and_then(integer_of) else {
                        return Ok(None);
                    };
                    check_token_count(name, count)?;
                    Ok(Some(count))
                };
                if counts.input.is_none() {
                    counts.input = read("input_tokens")?;
                }
                if counts.output.is_none() {
                    counts.output = read("output_tokens")?;
                }
                if counts.total.is_none() {
                    counts.total = read("total_tokens")?;
                }
            }
        }
        Ok(counts)
    }

    /// Output tokens including those the provider bills as output but does not report there
    /// (total − input − output, when positive). Counts are at most 10^9 each, so no sum or
    /// difference here can overflow; they are checked all the same.
    pub fn billed_output(&self) -> Option<i64> {
        let unreported = match (self.total, self.input, self.output) {
            (Some(total), Some(input), Some(output)) => {
                total.checked_sub(input)?.checked_sub(output)?.max(0)
            }
            (Some(total), Some(input), None) => return Some(total.checked_sub(input)?.max(0)),
            _ => 0,
        };
        self.output?.checked_add(unreported)
    }
}

fn integer_of(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(number) => number.as_i64(),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// The quantity of an action under a measure.
pub fn measure_quantity(measure: &Measure, raw: &RawAction) -> Result<Decimal, DeadLetterReason> {
    let missing = |problem: &str| DeadLetterReason::Unmeasurable {
        measure: measure.name().to_string(),
        problem: problem.to_string(),
    };
    match measure {
        Measure::Unit {
            quantity_attribute: None,
        } => Ok(Decimal::ONE),
        Measure::Unit {
            quantity_attribute: Some(attribute),
        }
        | Measure::Custom {
            quantity_attribute: attribute,
            ..
        } => {
            let quantity =
                attribute_quantity(raw, attribute).map_err(|problem| missing(&problem))?;
            check_quantity(format!("attribute {attribute:?}"), quantity)
                .map_err(DeadLetterReason::InvalidValue)?;
            Ok(quantity)
        }
        Measure::Token => {
            let counts = TokenCounts::of(raw).map_err(DeadLetterReason::InvalidValue)?;
            let overflow = || missing("the token counts overflow");
            match (counts.input, counts.billed_output()) {
                (Some(input), Some(output)) => input
                    .checked_add(output)
                    .map(Decimal::from)
                    .ok_or_else(overflow),
                (None, Some(output)) => Ok(Decimal::from(output)),
                (Some(input), None) => Ok(Decimal::from(input)),
                (None, None) => counts
                    .total
                    .map(Decimal::from)
                    .ok_or_else(|| missing("the action carries no token counts (input_tokens / output_tokens / total_tokens)")),
            }
        }
        Measure::InputToken => TokenCounts::of(raw)
            .map_err(DeadLetterReason::InvalidValue)?
            .input
            .map(Decimal::from)
            .ok_or_else(|| missing("the action carries no input_tokens")),
        Measure::OutputToken => TokenCounts::of(raw)
            .map_err(DeadLetterReason::InvalidValue)?
            .billed_output()
            .map(Decimal::from)
            .ok_or_else(|| missing("the action carries no output_tokens")),
    }
}

fn attribute_quantity(raw: &RawAction, attribute: &str) -> Result<Decimal, String> {
    let attributes: serde_json::Value = serde_json::from_str(&raw.attributes_json)
        .map_err(|error| format!("attributes are not JSON: {error}"))?;
    let value = attributes.get(attribute).ok_or_else(|| {
        format!("the action has no attribute {attribute:?} to take the quantity from")
    })?;
    let quantity = match value {
        serde_json::Value::Number(number) => Decimal::from_str(&number.to_string()).ok(),
        serde_json::Value::String(text) => Decimal::from_str(text.trim()).ok(),
        _ => None,
    }
    .ok_or_else(|| format!("attribute {attribute:?} = {value} is not a decimal number"))?;
    Ok(quantity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmeter_schemas::metering::MeteringConfig;
    use agentmeter_schemas::ActionKind;

    const JAN_2026: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
    const WINDOW: TimeWindow = TimeWindow {
        max_late_micros: 35 * 86_400_000_000,
        max_future_micros: 300_000_000,
    };

    fn snapshot() -> WorkspaceSnapshot {
        let config =
            MeteringConfig::from_toml(include_str!("../../deploy/local/metering.example.toml"))
                .unwrap();
        WorkspaceSnapshot::build(3, config).unwrap()
    }

    fn raw(action_name: &str, occurred_at_micros: i64) -> RawAction {
        RawAction {
            user_id: Some("u1".into()),
            occurred_at_micros,
            received_at_micros: occurred_at_micros,
            source: "rest".into(),
            ..RawAction::minimal(
                "ws_demo",
                "acc_acme",
                "inst_acme_research",
                "e1",
                action_name,
            )
        }
    }

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[test]
    fn prices_a_unit_action_and_tags_outcomes() {
        let enriched = enrich(raw("object_detection", JAN_2026), &snapshot(), WINDOW, 0).unwrap();
        assert!(enriched.tracked && enriched.outcome);
        assert_eq!(enriched.tags(), &["@action", "@outcome"]);
        assert_eq!(
            (enriched.measure.as_str(), enriched.quantity, enriched.cost),
            ("unit", dec("1"), dec("0.01"))
        );
        assert_eq!(enriched.config_version, 3);
    }

    #[test]
    fn prices_tokens_found_only_in_attributes_with_the_rate_of_the_action_time() {
        let mut action = raw("llm_call", JAN_2026 - 1);
        action.attributes_json =
            r#"{"model":"gpt-4","input_tokens":2500,"output_tokens":800,"cost_usd":0.12}"#.into();
        action.reported_cost = Some(dec("0.12"));
        let before = enrich(action.clone(), &snapshot(), WINDOW, 0).unwrap();
        assert_eq!(before.quantity, dec("3300"));
        assert_eq!(before.cost, dec("0.132")); // 3300 × 0.00004
        assert_eq!(before.cost_source, CostSource::Allocated);
        assert_eq!(before.raw.reported_cost, Some(dec("0.12")));
        action.occurred_at_micros = JAN_2026;
        action.received_at_micros = JAN_2026;
        let after = enrich(action, &snapshot(), WINDOW, 0).unwrap();
        assert_eq!(after.cost, dec("0.099")); // 3300 × 0.00003
    }

    #[test]
    fn counts_thinking_tokens_as_output() {
        let mut action = raw("gemini_llm_gemini-2.5-flash", JAN_2026);
        (
            action.input_tokens,
            action.output_tokens,
            action.total_tokens,
        ) = (Some(100), Some(50), Some(400));
        let enriched = enrich(action, &snapshot(), WINDOW, 0).unwrap();
        assert_eq!(enriched.quantity, dec("400"));
        assert_eq!(enriched.cost, dec("2.4"));
    }

    #[test]
    fn a_tracked_trace_event_meters_the_llm_call_it_names() {
        let mut config = snapshot().config;
        config
            .tagging
            .tracked
            .push("gemini.generate_content".into());
        config
            .cost_allocations
            .push(agentmeter_schemas::metering::CostAllocation {
                action: "gemini.generate_content".into(),
                measure: "input_token".into(),
                quantity_attribute: None,
                rates: vec![agentmeter_schemas::metering::Rate {
                    effective_from: time::OffsetDateTime::UNIX_EPOCH,
                    cost_per_unit: dec("0.5"),
                }],
            });
        let snapshot = WorkspaceSnapshot::build(1, config).unwrap();
        let mut call = raw("gemini_llm_gemini-2.0-pro", JAN_2026);
        call.kind = ActionKind::Llm;
        call.trace_event = Some("gemini.generate_content".into());
        (call.input_tokens, call.output_tokens) = (Some(10), Some(5));
        let enriched = enrich(call.clone(), &snapshot, WINDOW, 0).unwrap();
        assert!(enriched.tracked);
        assert_eq!(
            (enriched.measure.as_str(), enriched.cost),
            ("input_token", dec("5"))
        );
        // The auto tag's own rule wins when both are configured.
        call.action_name = "gemini_llm_gemini-2.5-flash".into();
        let enriched = enrich(call, &snapshot, WINDOW, 0).unwrap();
        assert_eq!(
            (enriched.measure.as_str(), enriched.cost),
            ("token", dec("0.09"))
        );
    }

    #[test]
    fn an_outcome_condition_decides_between_action_and_outcome() {
        let mut config = snapshot().config;
        let detection = config
            .outcomes
            .iter_mut()
            .find(|outcome| outcome.action == "object_detection")
            .unwrap();
        detection.when = Some(
            serde_json::from_str(
                r#"{"all": [
                    {"field": "attributes.status", "eq": "success"},
                    {"field": "attributes.confidence_score", "ge": "0.9"},
                    {"any": [
                        {"field": "llm_model", "in": ["gpt-4o", "gemini-2.5-flash"]},
                        {"not": {"field": "attributes.draft", "exists": true}}
                    ]}
                ]}"#,
            )
            .unwrap(),
        );
        let snapshot = WorkspaceSnapshot::build(4, config).unwrap();
        let detect = |attributes: &str, llm_model: Option<&str>| {
            let mut action = raw("object_detection", JAN_2026);
            action.attributes_json = attributes.into();
            action.llm_model = llm_model.map(str::to_string);
            enrich(action, &snapshot, WINDOW, 0).unwrap()
        };

        let passing = detect(r#"{"status":"success","confidence_score":0.95}"#, None);
        assert_eq!(passing.tags(), &["@action", "@outcome"]);
        // Priced exactly as before: the condition only decides @outcome.
        assert_eq!((passing.quantity, passing.cost), (dec("1"), dec("0.01")));
        let numeric_text = detect(
            r#"{"status":"success","confidence_score":"0.9","draft":true}"#,
            Some("gpt-4o"),
        );
        assert_eq!(numeric_text.tags(), &["@action", "@outcome"]);

        for (attributes, llm_model) in [
            (r#"{"status":"failed","confidence_score":0.99}"#, None),
            (r#"{"status":"success","confidence_score":0.8999}"#, None),
            (r#"{"status":"success"}"#, None),
            (r#"{"status":"success","confidence_score":"high"}"#, None),
            (
                r#"{"status":"success","confidence_score":1,"draft":false}"#,
                Some("gpt-4"),
            ),
        ] {
            let failing = detect(attributes, llm_model);
            assert!(failing.tracked && !failing.outcome, "{attributes}");
            assert_eq!(failing.tags(), &["@action"], "{attributes}");
            assert_eq!(failing.cost, dec("0.01"), "{attributes}");
        }

        // The shipped example's condition: a detection of zero boxes is no outcome.
        let mut empty = raw("object_detection", JAN_2026);
        empty.attributes_json = r#"{"detected_boxes":0,"model":"yolov8-invoice"}"#.into();
        assert_eq!(
            enrich(empty, &self::snapshot(), WINDOW, 0).unwrap().tags(),
            &["@action"]
        );
    }

    /// An outcome event of `outcome_type` with `value` (none: the default 1).
    fn outcome_event(outcome_type: &str, value: Option<&str>) -> RawAction {
        RawAction {
            kind: ActionKind::Outcome,
            outcome_value: value.map(dec),
            attributes_json: r#"{"lead_id":"L-1"}"#.into(),
            ..raw(outcome_type, JAN_2026)
        }
    }

    /// The example workspace plus `lead_converted`: tracked, an outcome whose condition never
    /// holds for an action, and priced at `rate` per unit of a `value` measure.
    fn snapshot_with_lead_price(rate: &str) -> WorkspaceSnapshot {
        let mut config = snapshot().config;
        config.tagging.tracked.push("lead_converted".into());
        config
            .cost_allocations
            .push(agentmeter_schemas::metering::CostAllocation {
                action: "lead_converted".into(),
                measure: "value".into(),
                quantity_attribute: Some("value".into()),
                rates: vec![agentmeter_schemas::metering::Rate {
                    effective_from: time::OffsetDateTime::UNIX_EPOCH,
                    cost_per_unit: dec(rate),
                }],
            });
        config
            .outcomes
            .push(agentmeter_schemas::metering::OutcomeDefinition {
                action: "lead_converted".into(),
                when: Some(
                    serde_json::from_str(r#"{"field": "attributes.never_set", "exists": true}"#)
                        .unwrap(),
                ),
                effective_from: None,
            });
        WorkspaceSnapshot::build(5, config).unwrap()
    }

    #[test]
    fn an_outcome_event_is_always_a_tracked_outcome_measured_by_its_value() {
        // A type the configuration has never heard of: discovered, tracked, @outcome, cost 0.
        for (value, quantity) in [(Some("2.5"), "2.5"), (None, "1"), (Some("0"), "0")] {
            let enriched = enrich(
                outcome_event("ticket_resolved", value),
                &snapshot(),
                WINDOW,
                7,
            )
            .unwrap();
            assert!(enriched.tracked && enriched.outcome, "{value:?}");
            assert_eq!(enriched.tags(), &["@action", "@outcome"]);
            assert_eq!(enriched.measure, "value");
            assert_eq!(enriched.quantity, dec(quantity));
            assert_eq!(
                (enriched.unit_cost, enriched.cost, enriched.cost_source),
                (Decimal::ZERO, Decimal::ZERO, CostSource::None)
            );
            assert_eq!(enriched.config_version, 3);
            assert_eq!(enriched.raw.kind, ActionKind::Outcome);
            assert_eq!(enriched.raw.outcome_value, value.map(dec));
        }
        // The largest value is its quantity exactly.
        let enriched = enrich(
            outcome_event("ticket_resolved", Some("999999999999.999999999999")),
            &snapshot(),
            WINDOW,
            0,
        )
        .unwrap();
        assert_eq!(enriched.quantity, dec("999999999999.999999999999"));
        assert!(agentmeter_schemas::encode_enriched_action(&enriched).is_ok());
    }

    #[test]
    fn a_cost_allocation_of_the_outcome_type_prices_each_unit_of_its_value() {
        let snapshot = snapshot_with_lead_price("0.02");
        let enriched = enrich(
            outcome_event("lead_converted", Some("1250")),
            &snapshot,
            WINDOW,
            0,
        )
        .unwrap();
        // The `when` of its [[outcomes]] definition is for actions: the event is an outcome.
        assert_eq!(enriched.tags(), &["@action", "@outcome"]);
        assert_eq!(
            (
                enriched.measure.as_str(),
                enriched.quantity,
                enriched.unit_cost,
                enriched.cost,
                enriched.cost_source
            ),
            (
                "value",
                dec("1250"),
                dec("0.02"),
                dec("25"),
                CostSource::Allocated
            )
        );
        let one = enrich(outcome_event("lead_converted", None), &snapshot, WINDOW, 0).unwrap();
        assert_eq!((one.quantity, one.cost), (dec("1"), dec("0.02")));
        // The same name sent as an action is an action whose condition decides @outcome.
        let mut action = raw("lead_converted", JAN_2026);
        action.attributes_json = r#"{"value":"1250"}"#.into();
        let enriched = enrich(action, &snapshot, WINDOW, 0).unwrap();
        assert_eq!(enriched.tags(), &["@action"]);
        // A rate that starts after the event does not apply: a reported cost does, else none.
        let mut config = snapshot.config.clone();
        config.cost_allocations.last_mut().unwrap().rates[0].effective_from =
            time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let later = WorkspaceSnapshot::build(6, config).unwrap();
        let enriched = enrich(
            outcome_event("lead_converted", Some("1250")),
            &later,
            WINDOW,
            0,
        )
        .unwrap();
        assert_eq!(
            (enriched.cost, enriched.cost_source),
            (Decimal::ZERO, CostSource::None)
        );
        let mut reported = outcome_event("lead_converted", Some("1250"));
        reported.reported_cost = Some(dec("3.5"));
        let enriched = enrich(reported, &later, WINDOW, 0).unwrap();
        assert_eq!(
            (enriched.cost, enriched.cost_source),
            (dec("3.5"), CostSource::Reported)
        );
    }

    #[test]
    fn an_outcome_value_out_of_range_or_a_cost_beyond_a_billion_is_a_dead_letter() {
        for value in [
            "-1",
            "1000000000000.000000000001",
            "0.0000000000001",
            "79228162514264337593543950335",
        ] {
            let error = enrich(
                outcome_event("ticket_resolved", Some(value)),
                &snapshot(),
                WINDOW,
                0,
            )
            .unwrap_err();
            assert_eq!(error.code(), "value_out_of_range", "{value}: {error}");
            assert!(error.to_string().contains("outcome_value"), "{error}");
        }
        // 10^12 at 0.02 each is 2·10^10: beyond the largest cost of one action.
        let error = enrich(
            outcome_event("lead_converted", Some("1000000000000")),
            &snapshot_with_lead_price("0.02"),
            WINDOW,
            0,
        )
        .unwrap_err();
        assert_eq!(error.code(), "value_out_of_range", "{error}");
        assert!(error.to_string().contains("cost"), "{error}");
        // The identity and time checks apply as to any action.
        let mut spoofed = outcome_event("ticket_resolved", None);
        spoofed.account_id = "acc_globex".into();
        assert_eq!(
            enrich(spoofed, &snapshot(), WINDOW, 0).unwrap_err().code(),
            "account_mismatch"
        );
    }

    proptest::proptest! {
        /// Whatever value and rate, an outcome event gives storable values or a dead letter.
        #[test]
        fn any_outcome_value_gives_storable_values_or_a_dead_letter(
            value in proptest::option::of((proptest::num::i128::ANY, 0u32..=28)),
            rate in "[0-9]{1,9}(\\.[0-9]{1,12})?",
            priced in proptest::bool::ANY,
        ) {
            let snapshot = if priced { snapshot_with_lead_price(&rate) } else { snapshot() };
            let mut event = outcome_event("lead_converted", None);
            event.outcome_value = value.and_then(|(mantissa, scale)| {
                Decimal::try_from_i128_with_scale(mantissa % (1i128 << 95), scale).ok()
            });
            match enrich(event, &snapshot, WINDOW, 0) {
                Ok(enriched) => {
                    proptest::prop_assert!(enriched.outcome && enriched.tracked);
                    proptest::prop_assert!(agentmeter_schemas::limits::check_enriched_numbers(&enriched).is_ok());
                    proptest::prop_assert!(agentmeter_schemas::encode_enriched_action(&enriched).is_ok());
                }
                Err(reason) => proptest::prop_assert_eq!(reason.code(), "value_out_of_range"),
            }
        }
    }

    #[test]
    fn untracked_actions_pass_through_unbilled() {
        let mut action = raw("step_1", JAN_2026);
        action.reported_cost = Some(dec("5"));
        let enriched = enrich(action, &snapshot(), WINDOW, 0).unwrap();
        assert!(!enriched.tracked && !enriched.outcome);
        assert_eq!(
            (enriched.quantity, enriched.cost),
            (Decimal::ZERO, Decimal::ZERO)
        );
        assert!(enriched.tags().is_empty());
    }

    #[test]
    fn tracked_without_allocation_uses_the_reported_cost() {
        let mut config = snapshot().config;
        config.tagging.tracked.push("translate".into());
        let snapshot = WorkspaceSnapshot::build(1, config).unwrap();
        let mut action = raw("translate", JAN_2026);
        action.reported_cost = Some(dec("0.5"));
        let enriched = enrich(action, &snapshot, WINDOW, 0).unwrap();
        assert_eq!(
            (enriched.cost, enriched.cost_source),
            (dec("0.5"), CostSource::Reported)
        );
    }

    #[test]
    fn dead_letters_name_the_reason() {
        let mut unknown = raw("web_search", JAN_2026);
        unknown.agent_instance_id = "inst_other".into();
        assert_eq!(
            enrich(unknown, &snapshot(), WINDOW, 0).unwrap_err().code(),
            "unknown_agent_instance"
        );
        let mut spoofed = raw("web_search", JAN_2026);
        spoofed.account_id = "acc_globex".into();
        assert_eq!(
            enrich(spoofed, &snapshot(), WINDOW, 0).unwrap_err().code(),
            "account_mismatch"
        );
        let mut late = raw("web_search", JAN_2026);
        late.received_at_micros = JAN_2026 + 36 * 86_400_000_000;
        assert_eq!(
            enrich(late, &snapshot(), WINDOW, 0).unwrap_err().code(),
            "outside_time_window"
        );
        let no_tokens = raw("llm_call", JAN_2026);
        let error = enrich(no_tokens, &snapshot(), WINDOW, 0).unwrap_err();
        assert_eq!(error.code(), "unmeasurable");
        assert!(error.to_string().contains("no token counts"), "{error}");
    }

    #[test]
    fn fills_the_account_of_a_direct_publisher_from_the_configuration() {
        let mut direct = raw("web_search", JAN_2026);
        direct.account_id = String::new();
        assert_eq!(
            enrich(direct, &snapshot(), WINDOW, 0)
                .unwrap()
                .raw
                .account_id,
            "acc_acme"
        );
    }

    /// The example workspace plus a custom measure (`pages`) priced at the largest rate.
    fn snapshot_with_pages(rate: &str) -> WorkspaceSnapshot {
        let mut config = snapshot().config;
        config.tagging.tracked.push("scan".into());
        config
            .cost_allocations
            .push(agentmeter_schemas::metering::CostAllocation {
                action: "scan".into(),
                measure: "pages".into(),
                quantity_attribute: Some("page_count".into()),
                rates: vec![agentmeter_schemas::metering::Rate {
                    effective_from: time::OffsetDateTime::UNIX_EPOCH,
                    cost_per_unit: dec(rate),
                }],
            });
        WorkspaceSnapshot::build(1, config).unwrap()
    }

    /// A named change that makes a valid action extreme.
    type Mutation = (&'static str, Box<dyn Fn(&mut RawAction)>);

    #[test]
    fn extreme_values_of_a_direct_publisher_are_dead_letters_not_panics() {
        let cases: Vec<Mutation> = vec![
            (
                "tokens near i64::MAX",
                Box::new(|a: &mut RawAction| {
                    a.action_name = "llm_call".into();
                    (a.input_tokens, a.output_tokens) = (Some(i64::MAX), Some(i64::MAX));
                }),
            ),
            (
                "negative tokens",
                Box::new(|a: &mut RawAction| {
                    a.action_name = "llm_call".into();
                    a.input_tokens = Some(-5);
                }),
            ),
            (
                "absurd tokens in attributes",
                Box::new(|a: &mut RawAction| {
                    a.action_name = "llm_call".into();
                    a.attributes_json =
                        r#"{"input_tokens":1000000000000000,"output_tokens":1}"#.into();
                }),
            ),
            (
                "reported cost near the top of Decimal",
                Box::new(|a: &mut RawAction| {
                    a.action_name = "translate_untracked".into();
                    a.reported_cost = Some(Decimal::MAX);
                }),
            ),
            (
                "negative reported cost",
                Box::new(|a: &mut RawAction| {
                    a.reported_cost = Some(dec("-100"));
                }),
            ),
            (
                "occurred_at at i64::MIN",
                Box::new(|a: &mut RawAction| {
                    a.occurred_at_micros = i64::MIN;
                }),
            ),
            (
                "received_at at i64::MAX",
                Box::new(|a: &mut RawAction| {
                    a.received_at_micros = i64::MAX;
                }),
            ),
            (
                "a zero-width space in the name",
                Box::new(|a: &mut RawAction| {
                    a.action_name = "web\u{200B}search".into();
                }),
            ),
            (
                "a control character in the description",
                Box::new(|a: &mut RawAction| {
                    a.description = Some("bell\u{7}".into());
                }),
            ),
            (
                "attributes that are no object",
                Box::new(|a: &mut RawAction| {
                    a.attributes_json = "[1]".into();
                }),
            ),
        ];
        for (what, change) in cases {
            let mut action = raw("web_search", JAN_2026);
            change(&mut action);
            let error = enrich(action, &snapshot(), WINDOW, 0).expect_err(what);
            assert!(
                matches!(error.code(), "value_out_of_range" | "invalid_text"),
                "{what}: {error}"
            );
        }
    }

    #[test]
    fn a_quantity_of_26_digits_or_a_cost_beyond_a_billion_is_a_dead_letter() {
        let snapshot = snapshot_with_pages("1000000000");
        let mut scan = raw("scan", JAN_2026);
        scan.attributes_json = r#"{"page_count":"12345678901234567890123456"}"#.into();
        let error = enrich(scan.clone(), &snapshot, WINDOW, 0).unwrap_err();
        assert_eq!(error.code(), "value_out_of_range", "{error}");
        assert!(error.to_string().contains("page_count"), "{error}");
        // 10^12 pages is accepted as a quantity, but at 10^9 per page costs too much.
        scan.attributes_json = r#"{"page_count":1000000000000}"#.into();
        let error = enrich(scan.clone(), &snapshot, WINDOW, 0).unwrap_err();
        assert_eq!(error.code(), "value_out_of_range", "{error}");
        assert!(error.to_string().contains("cost"), "{error}");
        // One page at the largest rate is exactly the largest cost.
        scan.attributes_json = r#"{"page_count":1}"#.into();
        let enriched = enrich(scan, &snapshot, WINDOW, 0).unwrap();
        assert_eq!(enriched.cost, dec("1000000000"));
    }

    #[test]
    fn the_largest_token_counts_are_priced_exactly() {
        let mut action = raw("gemini_llm_gemini-2.5-flash", JAN_2026);
        (
            action.input_tokens,
            action.output_tokens,
            action.total_tokens,
        ) = (
            Some(1_000_000_000),
            Some(1_000_000_000),
            Some(1_000_000_000),
        );
        let enriched = enrich(action, &snapshot(), WINDOW, 0).unwrap();
        assert_eq!(enriched.quantity, dec("2000000000"));
        assert_eq!(enriched.cost, dec("12000000")); // × 0.006
    }

    proptest::proptest! {
        /// Whatever numbers a publisher puts in a raw action, the enricher answers with an
        /// enriched action whose values fit their columns, or a dead letter — never a panic.
        #[test]
        fn any_numbers_give_storable_values_or_a_dead_letter(
            input in proptest::option::of(proptest::prop_oneof![proptest::num::i64::ANY, 0i64..=2_000_000_000]),
            output in proptest::option::of(proptest::prop_oneof![proptest::num::i64::ANY, 0i64..=2_000_000_000]),
            total in proptest::option::of(proptest::num::i64::ANY),
            reported in proptest::option::of((proptest::num::i128::ANY, 0u32..=28)),
            pages in "[0-9]{1,30}(\\.[0-9]{1,14})?",
            rate in "[0-9]{1,9}(\\.[0-9]{1,12})?",
            name in proptest::sample::select(vec!["llm_call", "scan", "web_search", "gemini_llm_gemini-2.5-flash", "untracked"]),
        ) {
            let snapshot = snapshot_with_pages(&rate);
            let mut action = raw(name, JAN_2026);
            (action.input_tokens, action.output_tokens, action.total_tokens) = (input, output, total);
            action.reported_cost = reported.and_then(|(mantissa, scale)| {
                Decimal::try_from_i128_with_scale(mantissa % (1i128 << 95), scale).ok()
            });
            action.attributes_json = format!(r#"{{"page_count":"{pages}"}}"#);
            match enrich(action, &snapshot, WINDOW, 0) {
                Ok(enriched) => {
                    for value in [enriched.quantity, enriched.unit_cost, enriched.cost] {
                        proptest::prop_assert!(agentmeter_schemas::decimal::to_scaled_i128(value).is_ok());
                    }
                    proptest::prop_assert!(agentmeter_schemas::limits::check_enriched_numbers(&enriched).is_ok());
                    proptest::prop_assert!(agentmeter_schemas::encode_enriched_action(&enriched).is_ok());
                }
                Err(reason) => proptest::prop_assert!(
                    matches!(reason.code(), "value_out_of_range" | "unmeasurable"), "{reason}"
                ),
            }
        }
    }
}
