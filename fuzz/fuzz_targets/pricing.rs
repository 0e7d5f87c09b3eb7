//! Pricing: a structured case (a cost allocation with arbitrary decimal rates and any measure,
//! and a raw action with token counts over the whole `i64` range, custom quantities of up to
//! 30 digits as JSON numbers or strings, a reported cost; sometimes an explicit outcome event
//! with an arbitrary storable `outcome_value`) → `enrich`, as the enricher runs it on
//! every record of `actions.raw` — including records of agents that publish straight to Kafka,
//! so every field may hold anything its Avro type allows.
//!
//! Invariants: `enrich` never panics (a panic stops the enricher for every workspace, and it
//! replays the same record after a restart); when it returns an action, quantity, unit cost and
//! cost fit ClickHouse `Decimal(38, 12)`, the quantity is not negative, an allocated cost is the
//! rounded quantity × rate and not negative, an outcome event is a tracked `@outcome` measured
//! by its value, and the enriched record reads back unchanged.

#![no_main]

use agentmeter_enricher::enrich::{enrich, TimeWindow};
use agentmeter_fuzz::structured::{any_decimal, edgy_i64, storable_decimal, AttributeValue};
use agentmeter_fuzz::{
    check_enriched_round_trip, EXAMPLE_INSTANCE_ID, EXAMPLE_SNAPSHOT, FIXED_NOW_MICROS,
};
use agentmeter_schemas::decimal::{to_scaled_i128, STORAGE_SCALE};
use agentmeter_schemas::metering::{CostAllocation, OutcomeDefinition, Rate};
use agentmeter_schemas::{ActionKind, CostSource, RawAction, WorkspaceSnapshot};
use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rust_decimal::{Decimal, RoundingStrategy};

/// The action the generated cost allocation prices.
const PRICED_ACTION: &str = "fuzz_priced";
/// A tracked action without a cost allocation: its cost is the reported one.
const REPORTED_ACTION: &str = "fuzz_reported";
/// The attribute unit and custom measures take their quantity from.
const QUANTITY_ATTRIBUTE: &str = "fuzz_quantity";
/// 2025-01-01T00:00:00Z: the first generated rate starts here.
const RATES_FROM_SECONDS: i64 = 1_735_689_600;
/// The enricher's default window (`[enricher] max_late_seconds`, `max_future_seconds`).
const WINDOW: TimeWindow = TimeWindow {
    max_late_micros: 35 * 86_400_000_000,
    max_future_micros: 300_000_000,
};

/// Issue 9 saw negative reported costs accepted and billed. Whether the enricher or only ingest
/// refuses them is being decided with the fix; set this to true once the enricher must refuse
/// them, and the target then also requires a non-negative reported cost.
const ENRICHER_REFUSES_NEGATIVE_REPORTED_COST: bool = true;

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(Some((snapshot, raw))) = generate(&mut input) else {
        return;
    };
    let rule = snapshot
        .rule_for(&raw.action_name, raw.trace_event.as_deref())
        .clone();
    let reported = raw.reported_cost;
    let outcome_event = raw.kind == ActionKind::Outcome;
    let outcome_quantity = raw.outcome_quantity();
    let Ok(enriched) = enrich(raw, &snapshot, WINDOW, FIXED_NOW_MICROS) else {
        return; // a dead letter with a reason: the stream goes on
    };
    for (field, value) in [
        ("quantity", enriched.quantity),
        ("unit_cost", enriched.unit_cost),
        ("cost", enriched.cost),
    ] {
        if let Err(error) = to_scaled_i128(value) {
            panic!("enriched {field} does not fit Decimal(38, 12): {error}");
        }
    }
    assert!(
        !enriched.quantity.is_sign_negative() || enriched.quantity.is_zero(),
        "negative quantity {}",
        enriched.quantity
    );
    if outcome_event {
        assert!(enriched.tracked && enriched.outcome, "an outcome event is a tracked outcome");
        assert_eq!(enriched.measure, "value");
        assert_eq!(enriched.quantity, outcome_quantity, "quantity is not the value");
    } else {
        assert_eq!(enriched.tracked, rule.tracked);
    }
    match enriched.cost_source {
        CostSource::Allocated => {
            assert!(
                !enriched.cost.is_sign_negative() || enriched.cost.is_zero(),
                "negative allocated cost {}",
                enriched.cost
            );
            // The reference: Decimal's own product when it is exact (it kept every fractional
            // digit), rounded once. Beyond 28 digits Decimal rounds the product itself, and a
            // second rounding would not be a reference for the single one the enricher does.
            if let Some(product) = enriched.quantity.checked_mul(enriched.unit_cost) {
                if product.scale() == enriched.quantity.scale() + enriched.unit_cost.scale() {
                    let rounded = product
                        .round_dp_with_strategy(STORAGE_SCALE, RoundingStrategy::MidpointNearestEven);
                    assert_eq!(enriched.cost, rounded, "cost is not quantity × unit cost");
                }
            }
        }
        CostSource::Reported => {
            assert_eq!(Some(enriched.cost), reported);
            if ENRICHER_REFUSES_NEGATIVE_REPORTED_COST {
                assert!(enriched.cost >= Decimal::ZERO, "negative reported cost billed");
            }
        }
        CostSource::None => assert!(enriched.cost.is_zero()),
    }
    check_enriched_round_trip(&enriched);
});

/// A workspace snapshot with one generated cost allocation, and a raw action to price with it.
/// `None` when the generated configuration is one `config apply` would refuse.
fn generate(u: &mut Unstructured) -> Result<Option<(WorkspaceSnapshot, RawAction)>> {
    let mut config = EXAMPLE_SNAPSHOT.config.clone();
    config.tagging.tracked.push(PRICED_ACTION.into());
    config.tagging.tracked.push(REPORTED_ACTION.into());
    if bool::arbitrary(u)? {
        config.outcomes.push(OutcomeDefinition {
            action: PRICED_ACTION.into(),
            when: None,
            effective_from: None,
        });
    }
    let (measure, quantity_attribute) = match u.int_in_range(0u8..=5)? {
        0 => ("unit", None),
        1 => ("unit", Some(QUANTITY_ATTRIBUTE)),
        2 => ("token", None),
        3 => ("input_token", None),
        4 => ("output_token", None),
        _ => ("pages", Some(QUANTITY_ATTRIBUTE)),
    };
    let mut rates = Vec::new();
    let mut effective_from = RATES_FROM_SECONDS;
    for _ in 0..u.int_in_range(1..=3)? {
        let Ok(instant) = time::OffsetDateTime::from_unix_timestamp(effective_from) else {
            break;
        };
        // Negative rates are refused by validation (the config target covers that path).
        rates.push(Rate {
            effective_from: instant,
            cost_per_unit: any_decimal(u)?.abs(),
        });
        effective_from += i64::from(u.int_in_range(1u32..=u32::MAX)?);
    }
    config.cost_allocations.push(CostAllocation {
        action: PRICED_ACTION.into(),
        measure: measure.into(),
        quantity_attribute: quantity_attribute.map(str::to_string),
        rates,
    });
    let Ok(snapshot) = WorkspaceSnapshot::build(1, config) else {
        return Ok(None); // e.g. a rate beyond Decimal(38, 12): `config apply` refuses it
    };

    let (action_name, trace_event) = match u.int_in_range(0u8..=7)? {
        0..=2 => (PRICED_ACTION, None),
        3 => (REPORTED_ACTION, None),
        4 => ("llm_call", None),
        5 => ("gemini_llm_gemini-2.5-flash", None),
        // An LLM call whose auto tag is untracked but whose span name is.
        6 => ("openai_llm_gpt-4o", Some(PRICED_ACTION)),
        _ => ("never_tracked", None),
    };
    let mut attributes = Vec::new();
    for name in [
        "input_tokens",
        "output_tokens",
        "total_tokens",
        QUANTITY_ATTRIBUTE,
        "cost_usd",
    ] {
        if bool::arbitrary(u)? {
            let value = AttributeValue::generate(u)?.to_json();
            attributes.push(format!("{}:{value}", serde_json::Value::from(name)));
        }
    }
    let attributes_json = match u.int_in_range(0u8..=15)? {
        0 => "not JSON".to_string(),
        _ => format!("{{{}}}", attributes.join(",")),
    };
    let occurred_at_micros = match u.int_in_range(0u8..=3)? {
        0 => edgy_i64(u)?,
        _ => {
            RATES_FROM_SECONDS * 1_000_000
                + u.int_in_range(-100_000_000_000_000..=1_000_000_000_000_000)?
        }
    };
    let received_at_micros = match u.int_in_range(0u8..=3)? {
        0 => edgy_i64(u)?,
        _ => occurred_at_micros.wrapping_add(u.int_in_range(-400_000_000..=36 * 86_400_000_000)?),
    };
    let optional_count = |u: &mut Unstructured| -> Result<Option<i64>> {
        Ok(if bool::arbitrary(u)? {
            Some(edgy_i64(u)?)
        } else {
            None
        })
    };
    let raw = RawAction {
        event_id: "fuzz-event".into(),
        workspace_id: "ws_demo".into(),
        // Direct publishers may leave the account to the configuration.
        account_id: if bool::arbitrary(u)? {
            "acc_acme".into()
        } else {
            String::new()
        },
        agent_instance_id: EXAMPLE_INSTANCE_ID.into(),
        kind: if trace_event.is_some() {
            ActionKind::Llm
        } else {
            ActionKind::Action
        },
        action_name: action_name.into(),
        trace_event: trace_event.map(str::to_string),
        user_id: Some("user_fuzz".into()),
        anonymous_id: None,
        occurred_at_micros,
        received_at_micros,
        description: None,
        llm_provider: None,
        llm_model: None,
        input_tokens: optional_count(u)?,
        output_tokens: optional_count(u)?,
        total_tokens: optional_count(u)?,
        // A decoded record's decimals always fit Decimal(38, 12).
        reported_cost: if bool::arbitrary(u)? {
            Some(storable_decimal(u)?)
        } else {
            None
        },
        attributes_json,
        source: "kafka".into(),
        outcome_value: None,
    };
    // An explicit outcome event (read last, so that older inputs keep their meaning): tracked
    // and @outcome whatever its name, measure `value`, quantity its value.
    let mut raw = raw;
    if raw.trace_event.is_none() && u.ratio(1, 4)? {
        raw.kind = ActionKind::Outcome;
        raw.outcome_value = if bool::arbitrary(u)? {
            Some(storable_decimal(u)?)
        } else {
            None
        };
    }
    Ok(Some((snapshot, raw)))
}
