//! The accepted range of every value an action carries, and why no accepted action can make a
//! total leave its column type (`docs/adr/0002-value-ranges.md`).
//!
//! Every stage that can see a value first checks it here — ingest for REST and OTLP (a 400 or a
//! rejected span), the enricher for records published straight to Kafka (a dead letter), the
//! aggregator for whatever reaches it anyway (a dead letter) — so a value refused in one place
//! is refused everywhere and no stage meets a value that can stop it.
//!
//! The bounds, and the totals they allow:
//!
//! | value | range |
//! |---|---|
//! | token counts (`input_tokens`, `output_tokens`, `total_tokens`) | integers 0 to 10^9 |
//! | a quantity (`unit` or custom measure attribute; a token measure's sum; an outcome event's `outcome_value`) | 0 to 10^12, at most 12 fractional digits |
//! | a reported cost (`cost_usd`), a computed cost | 0 to 10^9, at most 12 fractional digits |
//! | a cost per unit (configuration) | 0 to 10^9, at most 12 fractional digits |
//! | `occurred_at`, `received_at` | 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z (ingest's window is narrower) |
//!
//! ClickHouse stores quantities and costs as `Decimal(38, 12)`: at most 10^26 − 10^−12. A usage
//! row totals at most one batch of [`MAX_BATCH_OFFSETS`] records, so its quantity stays below
//! 10^7 × 10^12 = 10^19 and its cost below 10^16. A sum over rows (a billing period) leaves the
//! type only past 10^14 actions of the largest quantity in one query's groups.

use std::borrow::Cow;

use rust_decimal::Decimal;

use crate::action::{EnrichedAction, RawAction};
use crate::decimal::{to_scaled_i128, STORAGE_SCALE};
use crate::text::{check_attributes_json, check_free_text, check_name, shorten, MaxLength};

/// Largest token count of one field of one action.
pub const MAX_TOKEN_COUNT: i64 = 1_000_000_000;
/// Largest quantity of one action, 10^12.
pub const MAX_QUANTITY: Decimal = Decimal::from_parts(0xD4A5_1000, 0xE8, 0, false, 0);
/// Largest cost of one action (reported or computed), 10^9.
pub const MAX_ACTION_COST: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Largest cost per unit in a configuration, 10^9.
pub const MAX_COST_PER_UNIT: Decimal = MAX_ACTION_COST;
/// Most offsets in one aggregator batch (its `batch_offsets` setting): the most records one
/// usage row can total.
pub const MAX_BATCH_OFFSETS: i64 = 10_000_000;
/// Earliest accepted `occurred_at` / `received_at`: 2000-01-01T00:00:00Z, in µs.
pub const EARLIEST_INSTANT_MICROS: i64 = 946_684_800_000_000;
/// First instant no longer accepted: 2100-01-01T00:00:00Z, in µs (ClickHouse `DateTime` ends in 2106).
pub const END_OF_INSTANTS_MICROS: i64 = 4_102_444_800_000_000;

/// Longest event id, user id or anonymous id, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest action name, trace event, model or provider, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4096;

/// A value outside its accepted range; `Display` is the message for the client or dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{field} {value} is outside the accepted range 0 to {max}")]
    OutOfRange {
        field: Cow<'static, str>,
        value: String,
        max: String,
    },
    #[error("{field} {value} has more than {STORAGE_SCALE} fractional digits; agentmeter never rounds a value it is sent")]
    TooPrecise {
        field: Cow<'static, str>,
        value: String,
    },
    #[error("{field} {value} µs is not between 2000-01-01 and 2100-01-01")]
    OutsideInstants {
        field: Cow<'static, str>,
        value: i64,
    },
    #[error("{field} {value:?} {problem}")]
    Text {
        field: Cow<'static, str>,
        value: String,
        problem: String,
    },
}

impl ValueError {
    /// The field the problem is in.
    pub fn field(&self) -> &str {
        match self {
            ValueError::OutOfRange { field, .. }
            | ValueError::TooPrecise { field, .. }
            | ValueError::OutsideInstants { field, .. }
            | ValueError::Text { field, .. } => field.as_ref(),
        }
    }

    /// Whether this is a text problem (not a number or time out of range).
    pub fn is_text(&self) -> bool {
        matches!(self, ValueError::Text { .. })
    }
}

/// A token count in `0..=MAX_TOKEN_COUNT`.
pub fn check_token_count(
    field: impl Into<Cow<'static, str>>,
    count: i64,
) -> Result<(), ValueError> {
    if (0..=MAX_TOKEN_COUNT).contains(&count) {
        Ok(())
    } else {
        Err(ValueError::OutOfRange {
            field: field.into(),
            value: count.to_string(),
            max: MAX_TOKEN_COUNT.to_string(),
        })
    }
}

/// A decimal in `0..=max` with at most 12 fractional digits.
pub fn check_decimal(
    field: impl Into<Cow<'static, str>>,
    value: Decimal,
    max: Decimal,
) -> Result<(), ValueError> {
    let field = field.into();
    if value < Decimal::ZERO || value > max {
        return Err(ValueError::OutOfRange {
            field,
            value: value.to_string(),
            max: max.to_string(),
        });
    }
    if value.normalize().scale() > STORAGE_SCALE {
        return Err(ValueError::TooPrecise {
            field,
            value: value.to_string(),
        });
    }
    debug_assert!(
        to_scaled_i128(value).is_ok(),
        "every bound fits Decimal(38, 12)"
    );
    Ok(())
}

/// A quantity of one action.
pub fn check_quantity(
    field: impl Into<Cow<'static, str>>,
    value: Decimal,
) -> Result<(), ValueError> {
    check_decimal(field, value, MAX_QUANTITY)
}

/// A cost of one action.
pub fn check_action_cost(
    field: impl Into<Cow<'static, str>>,
    value: Decimal,
) -> Result<(), ValueError> {
    check_decimal(field, value, MAX_ACTION_COST)
}

/// An instant in `[2000-01-01, 2100-01-01)`.
pub fn check_instant(field: impl Into<Cow<'static, str>>, micros: i64) -> Result<(), ValueError> {
    if (EARLIEST_INSTANT_MICROS..END_OF_INSTANTS_MICROS).contains(&micros) {
        Ok(())
    } else {
        Err(ValueError::OutsideInstants {
            field: field.into(),
            value: micros,
        })
    }
}

/// A name (see [`crate::text`]).
pub fn check_name_field(
    field: impl Into<Cow<'static, str>>,
    value: &str,
    max: MaxLength,
) -> Result<(), ValueError> {
    check_name(value, max).map_err(|problem| ValueError::Text {
        field: field.into(),
        value: shorten(value),
        problem: problem.to_string(),
    })
}

/// Everything of a raw action that a client chose: numbers, instants, names, texts and the
/// attributes. Identity fields (workspace, account, agent instance) are checked against the
/// configuration by the enricher, not here.
pub fn check_raw_action(raw: &RawAction) -> Result<(), ValueError> {
    check_raw_numbers(raw)?;
    check_name_field("event_id", &raw.event_id, MaxLength::Chars(MAX_ID_CHARS))?;
    check_name_field(
        "action_name",
        &raw.action_name,
        MaxLength::Bytes(MAX_NAME_BYTES),
    )?;
    let optional_names = [
        (
            "trace_event",
            &raw.trace_event,
            MaxLength::Bytes(MAX_NAME_BYTES),
        ),
        ("user_id", &raw.user_id, MaxLength::Chars(MAX_ID_CHARS)),
        (
            "anonymous_id",
            &raw.anonymous_id,
            MaxLength::Chars(MAX_ID_CHARS),
        ),
        (
            "llm_provider",
            &raw.llm_provider,
            MaxLength::Bytes(MAX_NAME_BYTES),
        ),
        (
            "llm_model",
            &raw.llm_model,
            MaxLength::Bytes(MAX_NAME_BYTES),
        ),
    ];
    for (field, value, max) in optional_names {
        if let Some(value) = value {
            check_name_field(field, value, max)?;
        }
    }
    if let Some(description) = &raw.description {
        check_free_text(description, Some(MaxLength::Chars(MAX_DESCRIPTION_CHARS))).map_err(
            |problem| ValueError::Text {
                field: "description".into(),
                value: shorten(description),
                problem: problem.to_string(),
            },
        )?;
    }
    check_name_field("source", &raw.source, MaxLength::Bytes(64))?;
    check_attributes_json(&raw.attributes_json).map_err(|problem| ValueError::Text {
        field: "attributes".into(),
        value: shorten(&raw.attributes_json),
        problem,
    })?;
    Ok(())
}

/// The numbers and instants of a raw action (cheap: no text is scanned).
pub fn check_raw_numbers(raw: &RawAction) -> Result<(), ValueError> {
    check_instant("occurred_at", raw.occurred_at_micros)?;
    check_instant("received_at", raw.received_at_micros)?;
    let tokens = [
        ("input_tokens", raw.input_tokens),
        ("output_tokens", raw.output_tokens),
        ("total_tokens", raw.total_tokens),
    ];
    for (field, count) in tokens {
        if let Some(count) = count {
            check_token_count(field, count)?;
        }
    }
    if let Some(reported) = raw.reported_cost {
        check_action_cost("reported_cost", reported)?;
    }
    // An outcome event's value becomes its quantity (measure `value`), so it is held to the
    // range of a quantity whatever the kind says.
    if let Some(value) = raw.outcome_value {
        check_quantity("outcome_value", value)?;
    }
    Ok(())
}

/// What the aggregator needs of an enriched action before it adds it to a total: its numbers
/// and instants in range.
pub fn check_enriched_numbers(action: &EnrichedAction) -> Result<(), ValueError> {
    check_raw_numbers(&action.raw)?;
    check_quantity("quantity", action.quantity)?;
    check_decimal("unit_cost", action.unit_cost, MAX_COST_PER_UNIT)?;
    check_action_cost("cost", action.cost)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decimal::to_scaled_i128;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[test]
    fn the_constants_are_the_documented_powers_of_ten() {
        assert_eq!(MAX_QUANTITY, dec("1000000000000"));
        assert_eq!(MAX_ACTION_COST, dec("1000000000"));
        assert_eq!(
            time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(EARLIEST_INSTANT_MICROS) * 1000
            )
            .unwrap()
            .year(),
            2000
        );
        let end = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(END_OF_INSTANTS_MICROS) * 1000,
        )
        .unwrap();
        assert_eq!((end.year(), end.ordinal(), end.hour()), (2100, 1, 0));
    }

    #[test]
    fn a_full_batch_of_maximal_actions_fits_decimal_38_12() {
        // The bound the aggregator relies on, in exact integer arithmetic (scale 12).
        let column_max = 10i128.pow(38) - 1;
        let quantity = to_scaled_i128(MAX_QUANTITY).unwrap();
        let cost = to_scaled_i128(MAX_ACTION_COST).unwrap();
        let batch = i128::from(MAX_BATCH_OFFSETS);
        assert!(quantity.checked_mul(batch).unwrap() <= column_max);
        assert!(cost.checked_mul(batch).unwrap() <= column_max);
        // And 10^14 of them is where a period total could first leave it.
        assert!(quantity * 10i128.pow(14) >= column_max);
    }

    #[test]
    fn ranges_refuse_negative_huge_and_too_precise_values() {
        assert!(check_token_count("input_tokens", 1_000_000_000).is_ok());
        assert!(check_token_count("input_tokens", 1_000_000_001).is_err());
        assert!(check_token_count("input_tokens", -1).is_err());
        assert!(check_token_count("input_tokens", i64::MAX).is_err());
        assert!(check_action_cost("cost_usd", dec("0.12")).is_ok());
        assert!(check_action_cost("cost_usd", dec("-0.01")).is_err());
        assert!(check_action_cost("cost_usd", dec("-0")).is_ok());
        assert!(check_action_cost("cost_usd", dec("1000000000.000000000001")).is_err());
        assert!(check_action_cost("cost_usd", Decimal::MAX).is_err());
        let error = check_quantity("pages", dec("0.0000000000001")).unwrap_err();
        assert!(matches!(error, ValueError::TooPrecise { .. }), "{error}");
        assert!(check_quantity("pages", dec("1.5000000000000")).is_ok());
        assert!(check_instant("occurred_at", 0).is_err());
        assert!(check_instant("occurred_at", i64::MIN).is_err());
        assert!(check_instant("occurred_at", END_OF_INSTANTS_MICROS).is_err());
    }

    #[test]
    fn an_outcome_value_is_held_to_the_range_of_a_quantity() {
        let event = |value: &str| RawAction {
            kind: crate::ActionKind::Outcome,
            occurred_at_micros: EARLIEST_INSTANT_MICROS,
            received_at_micros: EARLIEST_INSTANT_MICROS,
            outcome_value: Some(dec(value)),
            ..RawAction::minimal("ws", "acc", "inst", "e1", "lead_converted")
        };
        for accepted in ["0", "1", "2.5", "1000000000000", "0.000000000001"] {
            assert!(check_raw_numbers(&event(accepted)).is_ok(), "{accepted}");
        }
        for (refused, expected) in [
            (
                "-1",
                "outcome_value -1 is outside the accepted range 0 to 1000000000000",
            ),
            ("1000000000000.000000000001", "outside the accepted range"),
            ("0.0000000000001", "more than 12 fractional digits"),
        ] {
            let error = check_raw_numbers(&event(refused)).unwrap_err();
            assert_eq!(error.field(), "outcome_value");
            assert!(error.to_string().contains(expected), "{refused}: {error}");
        }
        let none = RawAction {
            outcome_value: None,
            ..event("1")
        };
        assert!(check_raw_action(&none).is_ok());
        assert_eq!(none.outcome_quantity(), Decimal::ONE);
    }
}
