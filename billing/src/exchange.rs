//! Margin in the cost currency (docs/billing.md, "Margin in another currency").
//!
//! An invoice bills in its rate plan's currency; its cost is allocated in the workspace's cost
//! currency. Its margin is
//! * `total − cost` when the two are one currency;
//! * else `round(total × rate) − cost`, with the rate of the pair (plan currency → cost
//!   currency) **in force at the invoice's period end** — the configured rate with the latest
//!   `effective_from` not after it — rounded once to the cost currency's minor unit, half away
//!   from zero ([`crate::pricing::round_to_minor_unit`]);
//! * none when no such rate is configured.
//!
//! A finalized invoice freezes the rate it used (`CostAtFinalization::exchange_rate`), so a rate
//! changed later never changes its margin.

use agentmeter_schemas::catalog::ExchangeRate;
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::pricing::{minor_unit_digits, round_to_minor_unit, PricingError};

/// The rate converting `from` into `to` in force at `at` (the one with the latest
/// `effective_from` ≤ `at`); `None` when the currencies are one (no rate is needed) or no rate
/// of the pair is in force.
pub fn rate_at(
    rates: &[ExchangeRate],
    from: &str,
    to: &str,
    at: OffsetDateTime,
) -> Option<Decimal> {
    if from == to {
        return None;
    }
    rates
        .iter()
        .filter(|rate| rate.from == from && rate.to == to && rate.effective_from <= at)
        .max_by_key(|rate| rate.effective_from)
        .map(|rate| rate.rate)
}

/// The margin of an invoice of `total` in `currency` whose usage cost `cost` in
/// `cost_currency`, converting with `rate` (units of `cost_currency` per unit of `currency`)
/// when the currencies differ; `None` when they differ and there is no rate.
pub fn margin(
    total: Decimal,
    currency: &str,
    cost: Decimal,
    cost_currency: &str,
    rate: Option<Decimal>,
) -> Result<Option<Decimal>, PricingError> {
    let revenue = if currency == cost_currency {
        total
    } else {
        let Some(rate) = rate else {
            return Ok(None);
        };
        let exact = total.checked_mul(rate).ok_or(PricingError::Overflow {
            what: "the total in the cost currency",
        })?;
        round_to_minor_unit(exact, minor_unit_digits(cost_currency)?)
    };
    revenue
        .checked_sub(cost)
        .map(Some)
        .ok_or(PricingError::Overflow { what: "the margin" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rate(from: &str, to: &str, rate: &str, effective_from: OffsetDateTime) -> ExchangeRate {
        ExchangeRate {
            from: from.to_string(),
            to: to.to_string(),
            rate: rate.parse().unwrap(),
            effective_from,
        }
    }

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn the_rate_in_force_at_the_period_end_is_the_latest_effective_from_not_after_it() {
        let rates = vec![
            rate("EUR", "USD", "1.10", datetime!(2026-07-01 0:00 UTC)),
            rate("EUR", "USD", "1.05", datetime!(2026-01-01 0:00 UTC)),
            rate("GBP", "USD", "1.30", datetime!(2026-01-01 0:00 UTC)),
            rate("EUR", "USD", "1.20", datetime!(2026-12-01 0:00 UTC)),
        ];
        let at = |instant| rate_at(&rates, "EUR", "USD", instant);
        assert_eq!(at(datetime!(2025-12-31 23:59 UTC)), None);
        assert_eq!(at(datetime!(2026-01-01 0:00 UTC)), Some(d("1.05")));
        assert_eq!(at(datetime!(2026-06-30 23:59 UTC)), Some(d("1.05")));
        assert_eq!(at(datetime!(2026-11-01 0:00 UTC)), Some(d("1.10")));
        // Inclusive: a November invoice (ending 2026-12-01) takes the rate effective then.
        assert_eq!(at(datetime!(2026-12-01 0:00 UTC)), Some(d("1.20")));
        assert_eq!(
            rate_at(&rates, "GBP", "USD", datetime!(2026-11-01 0:00 UTC)),
            Some(d("1.30"))
        );
        assert_eq!(
            rate_at(&rates, "JPY", "USD", datetime!(2026-11-01 0:00 UTC)),
            None
        );
        assert_eq!(
            rate_at(&rates, "USD", "USD", datetime!(2026-11-01 0:00 UTC)),
            None
        );
    }

    #[test]
    fn the_total_is_converted_and_rounded_once_to_the_cost_currency_then_the_cost_taken() {
        // Same currency: no rate, total − cost (the cost is exact).
        assert_eq!(
            margin(d("100.00"), "USD", d("12.345678"), "USD", None),
            Ok(Some(d("87.654322")))
        );
        assert_eq!(
            margin(d("100.00"), "USD", d("12"), "USD", Some(d("2"))),
            Ok(Some(d("88.00")))
        );
        // Another currency without a rate: no margin.
        assert_eq!(margin(d("100.00"), "EUR", d("1"), "USD", None), Ok(None));
        // 154.45 EUR × 1.0842 = 167.454690 → 167.45 USD.
        assert_eq!(
            margin(d("154.45"), "EUR", d("20"), "USD", Some(d("1.0842"))),
            Ok(Some(d("147.45")))
        );
        // Half away from zero: 10.00 × 1.0125 = 10.125 → 10.13; −10.125 → −10.13.
        assert_eq!(
            margin(d("10.00"), "EUR", d("0"), "USD", Some(d("1.0125"))),
            Ok(Some(d("10.13")))
        );
        assert_eq!(
            margin(d("-10.00"), "EUR", d("0"), "USD", Some(d("1.0125"))),
            Ok(Some(d("-10.13")))
        );
        // Into a currency without decimals: 1,234.56 EUR × 161.5 = 199,381.44 → 199,381 JPY.
        assert_eq!(
            margin(d("1234.56"), "EUR", d("381"), "JPY", Some(d("161.5"))),
            Ok(Some(d("199000")))
        );
        // An overflow is an error, never a wrapped figure.
        assert!(margin(Decimal::MAX, "EUR", d("0"), "USD", Some(d("2"))).is_err());
        assert!(margin(d("1"), "EUR", d("0"), "XYZ", Some(d("2"))).is_err());
    }
}
