//! What a charge model makes of a quantity, and how the lines of an invoice add up.
//!
//! The rules (docs/billing.md, "How amounts are computed"):
//! * A charge's amount is computed **exactly** in decimals from the period's quantity
//!   ([`price`]), then **rounded once, per line**, to the currency's minor unit, half away from
//!   zero ([`round_to_minor_unit`]). Nothing is rounded before, and sums of rounded lines are
//!   not rounded again, so the invoice total is the sum of the amounts it shows.
//! * A discount is a line of its own: a percentage of the rounded amount it applies to,
//!   rounded the same way, or a flat amount; either is at most what it is taken from.
//! * The total: each charge's amount less its discount, summed; plus the shortfall under the
//!   minimum commitment, if any; less the invoice discounts, each taken from what is left, in
//!   the order the rate plan lists them ([`totals`]).
//! * Fees (`flat`, the fee of `overage`) are prorated by the share of the period the
//!   subscription covers; usage is billed as counted, and an overage's included units are not
//!   prorated. A `one_time` fee is never prorated.
//!
//! Every operation is checked: an amount that leaves `Decimal`'s range is
//! [`PricingError::Overflow`], never a wrapped or silently rounded figure.

use agentmeter_schemas::catalog::{ChargeModel, Discount, Tier};
use rust_decimal::{Decimal, RoundingStrategy};

/// Why an amount could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("{what} leaves the range of exact decimals")]
    Overflow { what: &'static str },
    #[error("quantity {0} is negative")]
    NegativeQuantity(Decimal),
    #[error("the share of the period {0} must be between 0 and 1")]
    InvalidShare(Decimal),
    #[error("currency {0:?} is not an ISO 4217 code with a minor unit")]
    UnknownCurrency(String),
    #[error("the charge model has no tiers")]
    NoTiers,
}

/// One part of a charge's amount: the units billed at one price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierLine {
    /// The quantities above this bound…
    pub above: Decimal,
    /// …up to this one (inclusive); `None`: no upper bound.
    pub up_to: Option<Decimal>,
    /// Units billed in this part (for `package`: the number of packages).
    pub quantity: Decimal,
    /// Price of one unit (one package).
    pub unit_price: Decimal,
    /// `quantity × unit_price`, exact.
    pub amount: Decimal,
}

/// A charge's amount for one period, before rounding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeAmount {
    /// The quantity billed (0 for fees).
    pub quantity: Decimal,
    /// How the amount is made up (empty for fees).
    pub breakdown: Vec<TierLine>,
    /// The fee part (prorated), exact.
    pub fee: Decimal,
    /// The whole amount, exact: the fee plus every breakdown line.
    pub exact: Decimal,
}

/// The amount `model` bills for `quantity` in a period of which the subscription covers
/// `share` (1 for a whole period).
pub fn price(
    model: &ChargeModel,
    quantity: Decimal,
    share: Decimal,
) -> Result<ChargeAmount, PricingError> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(PricingError::NegativeQuantity(quantity));
    }
    if share < Decimal::ZERO || share > Decimal::ONE {
        return Err(PricingError::InvalidShare(share));
    }
    let (fee, breakdown, billed) = match model {
        ChargeModel::PerUnit { unit_price } => (
            Decimal::ZERO,
            vec![part(Decimal::ZERO, None, quantity, *unit_price)?],
            quantity,
        ),
        ChargeModel::Tiered { tiers } => (Decimal::ZERO, graduated(tiers, quantity)?, quantity),
        ChargeModel::Volume { tiers } => (Decimal::ZERO, vec![volume(tiers, quantity)?], quantity),
        ChargeModel::Package {
            package_size,
            package_price,
        } => {
            let packages = packages(quantity, *package_size)?;
            (
                Decimal::ZERO,
                vec![part(Decimal::ZERO, None, packages, *package_price)?],
                quantity,
            )
        }
        ChargeModel::Flat { fee } => (prorate(*fee, share)?, Vec::new(), Decimal::ZERO),
        ChargeModel::OneTime { fee } => (*fee, Vec::new(), Decimal::ZERO),
        ChargeModel::Overage {
            fee,
            included,
            unit_price,
        } => {
            let beyond = if quantity > *included {
                quantity - *included
            } else {
                Decimal::ZERO
            };
            (
                prorate(*fee, share)?,
                vec![part(*included, None, beyond, *unit_price)?],
                quantity,
            )
        }
    };
    let mut exact = fee;
    for line in &breakdown {
        exact = exact
            .checked_add(line.amount)
            .ok_or(PricingError::Overflow {
                what: "the charge's amount",
            })?;
    }
    Ok(ChargeAmount {
        quantity: billed,
        breakdown,
        fee,
        exact,
    })
}

fn part(
    above: Decimal,
    up_to: Option<Decimal>,
    quantity: Decimal,
    unit_price: Decimal,
) -> Result<TierLine, PricingError> {
    let amount = quantity
        .checked_mul(unit_price)
        .ok_or(PricingError::Overflow {
            what: "quantity × unit price",
        })?;
    Ok(TierLine {
        above,
        up_to,
        quantity,
        unit_price,
        amount,
    })
}

/// Graduated tiers: the units of each tier at its price; tiers the quantity does not reach
/// are left out (a zero quantity is billed in the first tier).
fn graduated(tiers: &[Tier], quantity: Decimal) -> Result<Vec<TierLine>, PricingError> {
    let mut lines = Vec::new();
    let mut below = Decimal::ZERO;
    for tier in tiers {
        let top = tier.up_to.map_or(quantity, |up_to| quantity.min(up_to));
        lines.push(part(below, tier.up_to, top - below, tier.unit_price)?);
        match tier.up_to {
            Some(up_to) if quantity > up_to => below = up_to,
            _ => return Ok(lines),
        }
    }
    Err(PricingError::NoTiers)
}

/// Volume tiers: every unit at the price of the tier the whole quantity falls in.
fn volume(tiers: &[Tier], quantity: Decimal) -> Result<TierLine, PricingError> {
    let mut below = Decimal::ZERO;
    for tier in tiers {
        match tier.up_to {
            Some(up_to) if quantity > up_to => below = up_to,
            up_to => return part(below, up_to, quantity, tier.unit_price),
        }
    }
    Err(PricingError::NoTiers)
}

/// Started packages: `quantity / size` rounded up (computed with a remainder, so exact).
fn packages(quantity: Decimal, size: Decimal) -> Result<Decimal, PricingError> {
    let overflow = PricingError::Overflow {
        what: "the number of packages",
    };
    let whole = quantity
        .checked_div(size)
        .ok_or_else(|| overflow.clone())?
        .trunc();
    let remainder = quantity.checked_rem(size).ok_or_else(|| overflow.clone())?;
    if remainder.is_zero() {
        Ok(whole)
    } else {
        whole.checked_add(Decimal::ONE).ok_or(overflow)
    }
}

fn prorate(fee: Decimal, share: Decimal) -> Result<Decimal, PricingError> {
    fee.checked_mul(share).ok_or(PricingError::Overflow {
        what: "the prorated fee",
    })
}

/// The number of decimals of `currency`'s minor unit (USD 2, JPY 0, KWD 3).
pub fn minor_unit_digits(currency: &str) -> Result<u32, PricingError> {
    iso_currency::Currency::from_code(currency)
        .and_then(|currency| currency.exponent())
        .map(u32::from)
        .ok_or_else(|| PricingError::UnknownCurrency(currency.to_string()))
}

/// `amount` rounded to `digits` decimals, half away from zero: the one rounding of a line.
/// The result carries exactly `digits` decimals (`1300.00`), as an invoice shows it.
pub fn round_to_minor_unit(amount: Decimal, digits: u32) -> Decimal {
    let mut rounded = amount.round_dp_with_strategy(digits, RoundingStrategy::MidpointAwayFromZero);
    rounded.rescale(digits);
    rounded
}

/// What `discount` takes from `amount` (already rounded), rounded, at most `amount`.
pub fn discount_amount(
    amount: Decimal,
    discount: &Discount,
    digits: u32,
) -> Result<Decimal, PricingError> {
    let taken = match discount {
        Discount::Percent(percent) => {
            let exact = amount
                .checked_mul(*percent)
                .and_then(|product| product.checked_div(Decimal::ONE_HUNDRED))
                .ok_or(PricingError::Overflow {
                    what: "a percentage discount",
                })?;
            round_to_minor_unit(exact, digits)
        }
        Discount::Amount(flat) => round_to_minor_unit(*flat, digits),
    };
    Ok(taken.min(amount).max(Decimal::ZERO))
}

/// One charge's line on an invoice: its rounded amount and the discount taken from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub amount: Decimal,
    pub discount: Decimal,
}

impl PricedLine {
    /// Rounds `charge` and takes its discount, if any.
    pub fn new(
        charge: &ChargeAmount,
        discount: Option<&Discount>,
        digits: u32,
    ) -> Result<PricedLine, PricingError> {
        let amount = round_to_minor_unit(charge.exact, digits);
        let discount = match discount {
            Some(discount) => discount_amount(amount, discount, digits)?,
            None => Decimal::ZERO,
        };
        Ok(PricedLine { amount, discount })
    }
}

/// How an invoice's lines add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    /// The charges less their own discounts.
    pub subtotal: Decimal,
    /// What the subtotal falls short of the minimum commitment (0 when it does not).
    pub minimum_shortfall: Decimal,
    /// Each invoice discount, in order.
    pub invoice_discounts: Vec<Decimal>,
    /// What is due.
    pub total: Decimal,
}

/// Adds up `lines`, tops them up to `minimum` (already prorated by the caller, if it must be)
/// and takes the invoice `discounts`, in order, each from what is left.
pub fn totals(
    lines: &[PricedLine],
    minimum: Option<Decimal>,
    discounts: &[Discount],
    digits: u32,
) -> Result<Totals, PricingError> {
    let overflow = PricingError::Overflow {
        what: "the invoice total",
    };
    let mut subtotal = Decimal::ZERO;
    for line in lines {
        let net = line
            .amount
            .checked_sub(line.discount)
            .ok_or_else(|| overflow.clone())?;
        subtotal = subtotal.checked_add(net).ok_or_else(|| overflow.clone())?;
    }
    let minimum_shortfall = match minimum {
        Some(minimum) => {
            let minimum = round_to_minor_unit(minimum, digits);
            if minimum > subtotal {
                minimum - subtotal
            } else {
                Decimal::ZERO
            }
        }
        None => Decimal::ZERO,
    };
    let mut left = subtotal
        .checked_add(minimum_shortfall)
        .ok_or_else(|| overflow.clone())?;
    let mut invoice_discounts = Vec::with_capacity(discounts.len());
    for discount in discounts {
        let taken = discount_amount(left, discount, digits)?;
        left -= taken;
        invoice_discounts.push(taken);
    }
    let shown = |mut amount: Decimal| {
        amount.rescale(digits);
        amount
    };
    Ok(Totals {
        subtotal: shown(subtotal),
        minimum_shortfall: shown(minimum_shortfall),
        invoice_discounts,
        total: shown(left),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn tier(up_to: Option<&str>, unit_price: &str) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(unit_price),
        }
    }

    /// PRODUCT.md: the first 100 at $50, the next 400 at $40, beyond that $30.
    fn product_tiers() -> Vec<Tier> {
        vec![
            tier(Some("100"), "50"),
            tier(Some("500"), "40"),
            tier(None, "30"),
        ]
    }

    fn whole(model: &ChargeModel, quantity: &str) -> Decimal {
        price(model, d(quantity), Decimal::ONE).unwrap().exact
    }

    #[test]
    fn the_examples_of_the_product_guide() {
        let outcome = ChargeModel::PerUnit {
            unit_price: d("500"),
        };
        assert_eq!(whole(&outcome, "3"), d("1500"));
        let tiered = ChargeModel::Tiered {
            tiers: product_tiers(),
        };
        // 100 × 50 + 400 × 40 + 100 × 30
        assert_eq!(whole(&tiered, "600"), d("24000"));
        assert_eq!(whole(&tiered, "100"), d("5000"));
        assert_eq!(whole(&tiered, "101"), d("5040"));
        let volume = ChargeModel::Volume {
            tiers: vec![
                tier(Some("500"), "50"),
                tier(Some("1000"), "40"),
                tier(None, "30"),
            ],
        };
        assert_eq!(whole(&volume, "500"), d("25000"));
        assert_eq!(whole(&volume, "501"), d("20040"));
        assert_eq!(whole(&volume, "1200"), d("36000"));
        // $99 per month including 10,000 actions, then $0.01.
        let overage = ChargeModel::Overage {
            fee: d("99"),
            included: d("10000"),
            unit_price: d("0.01"),
        };
        assert_eq!(whole(&overage, "9000"), d("99"));
        assert_eq!(whole(&overage, "12345"), d("122.45"));
    }

    /// docs/billing.md, "Worked example": plan `pro` of the example configuration.
    #[test]
    fn the_worked_example_of_the_billing_guide() {
        let platform = ChargeModel::Overage {
            fee: d("99"),
            included: d("10000"),
            unit_price: d("0.01"),
        };
        let seats = ChargeModel::PerUnit {
            unit_price: d("10"),
        };
        let twenty_percent = Discount::Percent(d("20"));
        let invoice = |actions: &str, seat_count: &str| {
            let lines = [
                PricedLine::new(
                    &price(&platform, d(actions), Decimal::ONE).unwrap(),
                    None,
                    2,
                )
                .unwrap(),
                PricedLine::new(
                    &price(&seats, d(seat_count), Decimal::ONE).unwrap(),
                    Some(&twenty_percent),
                    2,
                )
                .unwrap(),
            ];
            totals(&lines, Some(d("150")), &[], 2).unwrap()
        };
        let busy = invoice("12345", "4");
        assert_eq!(
            (busy.subtotal, busy.minimum_shortfall, busy.total),
            (d("154.45"), d("0"), d("154.45"))
        );
        let quiet = invoice("3000", "1");
        assert_eq!(
            (quiet.subtotal, quiet.minimum_shortfall, quiet.total),
            (d("107.00"), d("43.00"), d("150.00"))
        );
    }

    #[test]
    fn a_plan_changed_halfway_prorates_the_fees() {
        // Upgrading from a $100 to a $200 plan halfway through the month: $50 + $100.
        let half = d("0.5");
        let basic = price(&ChargeModel::Flat { fee: d("100") }, Decimal::ZERO, half).unwrap();
        let pro = price(&ChargeModel::Flat { fee: d("200") }, Decimal::ZERO, half).unwrap();
        assert_eq!(basic.exact + pro.exact, d("150"));
        // A one-time fee is never prorated.
        let setup = price(&ChargeModel::OneTime { fee: d("500") }, Decimal::ZERO, half).unwrap();
        assert_eq!(setup.exact, d("500"));
    }

    #[test]
    fn the_tier_breakdown_shows_each_tier_used() {
        let tiered = ChargeModel::Tiered {
            tiers: product_tiers(),
        };
        let amount = price(&tiered, d("150"), Decimal::ONE).unwrap();
        let parts: Vec<(Decimal, Decimal, Decimal)> = amount
            .breakdown
            .iter()
            .map(|line| (line.quantity, line.unit_price, line.amount))
            .collect();
        assert_eq!(
            parts,
            vec![
                (d("100"), d("50"), d("5000")),
                (d("50"), d("40"), d("2000"))
            ]
        );
    }

    #[test]
    fn packages_are_counted_up_exactly() {
        let model = ChargeModel::Package {
            package_size: d("1000"),
            package_price: d("5"),
        };
        assert_eq!(whole(&model, "0"), d("0"));
        assert_eq!(whole(&model, "1000"), d("5"));
        assert_eq!(whole(&model, "1000.000000000001"), d("10"));
        let tenths = ChargeModel::Package {
            package_size: d("0.1"),
            package_price: d("1"),
        };
        assert_eq!(whole(&tenths, "0.3"), d("3"));
    }

    #[test]
    fn lines_are_rounded_once_half_away_from_zero_to_the_minor_unit() {
        assert_eq!(minor_unit_digits("USD").unwrap(), 2);
        assert_eq!(minor_unit_digits("JPY").unwrap(), 0);
        assert_eq!(minor_unit_digits("KWD").unwrap(), 3);
        assert!(minor_unit_digits("XYZ").is_err());
        assert_eq!(round_to_minor_unit(d("0.125"), 2), d("0.13"));
        assert_eq!(round_to_minor_unit(d("0.135"), 2), d("0.14"));
        assert_eq!(round_to_minor_unit(d("0.124999"), 2), d("0.12"));
        assert_eq!(round_to_minor_unit(d("12.5"), 0), d("13"));
        // 3 × 0.333 tokens-priced charges: rounded per line, the total is their sum.
        let line = |exact: &str| {
            PricedLine::new(
                &ChargeAmount {
                    quantity: Decimal::ZERO,
                    breakdown: Vec::new(),
                    fee: Decimal::ZERO,
                    exact: d(exact),
                },
                None,
                2,
            )
            .unwrap()
        };
        let lines = [line("0.333"), line("0.333"), line("0.333")];
        assert_eq!(totals(&lines, None, &[], 2).unwrap().total, d("0.99"));
    }

    #[test]
    fn discounts_and_the_minimum_commitment_make_the_total() {
        let lines = [
            PricedLine {
                amount: d("120.00"),
                discount: discount_amount(d("120.00"), &Discount::Percent(d("10")), 2).unwrap(),
            },
            PricedLine {
                amount: d("5.00"),
                discount: discount_amount(d("5.00"), &Discount::Amount(d("8")), 2).unwrap(),
            },
        ];
        assert_eq!(lines[0].discount, d("12.00"));
        assert_eq!(lines[1].discount, d("5.00"), "at most the amount");
        let totals = totals(
            &lines,
            Some(d("200")),
            &[Discount::Percent(d("12.5")), Discount::Amount(d("1000"))],
            2,
        )
        .unwrap();
        assert_eq!(totals.subtotal, d("108.00"));
        assert_eq!(totals.minimum_shortfall, d("92.00"));
        assert_eq!(totals.invoice_discounts, vec![d("25.00"), d("175.00")]);
        assert_eq!(totals.total, d("0.00"));
    }

    #[test]
    fn out_of_range_figures_are_errors_not_wrapped_amounts() {
        let model = ChargeModel::PerUnit {
            unit_price: Decimal::MAX,
        };
        assert_eq!(
            price(&model, d("2"), Decimal::ONE),
            Err(PricingError::Overflow {
                what: "quantity × unit price"
            })
        );
        assert_eq!(
            price(&model, d("-1"), Decimal::ONE),
            Err(PricingError::NegativeQuantity(d("-1")))
        );
        assert!(matches!(
            price(&model, d("1"), d("1.5")),
            Err(PricingError::InvalidShare(_))
        ));
    }

    // The reference computations: deliberately simple, unit by unit, for whole quantities.

    fn reference_tier_index(tiers: &[Tier], unit: u64) -> usize {
        let unit = Decimal::from(unit);
        tiers
            .iter()
            .position(|tier| tier.up_to.is_none_or(|up_to| unit <= up_to))
            .unwrap()
    }

    fn reference_graduated(tiers: &[Tier], quantity: u64) -> Decimal {
        let mut amount = Decimal::ZERO;
        for unit in 1..=quantity {
            amount += tiers[reference_tier_index(tiers, unit)].unit_price;
        }
        amount
    }

    fn reference_volume(tiers: &[Tier], quantity: u64) -> Decimal {
        let price = tiers[reference_tier_index(tiers, quantity.max(1))].unit_price;
        let mut amount = Decimal::ZERO;
        for _ in 0..quantity {
            amount += price;
        }
        amount
    }

    fn reference_packages(quantity: u64, size: u64) -> u64 {
        let mut left = quantity;
        let mut packages = 0;
        while left > 0 {
            packages += 1;
            left = left.saturating_sub(size);
        }
        packages
    }

    /// Ascending whole bounds and cent prices, the last tier unbounded.
    fn tiers_strategy() -> impl Strategy<Value = Vec<Tier>> {
        (
            proptest::collection::vec((1u64..400, 0u64..10_000), 0..5),
            0u64..10_000,
        )
            .prop_map(|(steps, last_cents)| {
                let mut bound = 0;
                let mut tiers: Vec<Tier> = steps
                    .into_iter()
                    .map(|(step, cents)| {
                        bound += step;
                        Tier {
                            up_to: Some(Decimal::from(bound)),
                            unit_price: Decimal::new(cents as i64, 2),
                        }
                    })
                    .collect();
                tiers.push(Tier {
                    up_to: None,
                    unit_price: Decimal::new(last_cents as i64, 2),
                });
                tiers
            })
    }

    proptest! {
        #[test]
        fn graduated_tiers_agree_with_pricing_unit_by_unit(tiers in tiers_strategy(), quantity in 0u64..2_500) {
            let model = ChargeModel::Tiered { tiers: tiers.clone() };
            let amount = price(&model, Decimal::from(quantity), Decimal::ONE).unwrap();
            prop_assert_eq!(amount.exact, reference_graduated(&tiers, quantity));
            let units: Decimal = amount.breakdown.iter().map(|line| line.quantity).sum();
            prop_assert_eq!(units, Decimal::from(quantity));
        }

        #[test]
        fn volume_tiers_agree_with_the_simple_computation(tiers in tiers_strategy(), quantity in 0u64..2_500) {
            let model = ChargeModel::Volume { tiers: tiers.clone() };
            let amount = price(&model, Decimal::from(quantity), Decimal::ONE).unwrap();
            prop_assert_eq!(amount.exact, reference_volume(&tiers, quantity));
        }

        #[test]
        fn packages_agree_with_counting_them(quantity in 0u64..100_000, size in 1u64..5_000, cents in 0i64..100_000) {
            let model = ChargeModel::Package {
                package_size: Decimal::from(size),
                package_price: Decimal::new(cents, 2),
            };
            let amount = price(&model, Decimal::from(quantity), Decimal::ONE).unwrap();
            let packages = reference_packages(quantity, size);
            prop_assert_eq!(amount.exact, Decimal::from(packages) * Decimal::new(cents, 2));
        }

        #[test]
        fn overage_agrees_with_billing_each_unit_beyond_the_allowance(
            quantity in 0u64..3_000, included in 0u64..3_000, fee_cents in 0i64..100_000, cents in 0i64..1_000,
        ) {
            let model = ChargeModel::Overage {
                fee: Decimal::new(fee_cents, 2),
                included: Decimal::from(included),
                unit_price: Decimal::new(cents, 2),
            };
            let amount = price(&model, Decimal::from(quantity), Decimal::ONE).unwrap();
            let mut expected = Decimal::new(fee_cents, 2);
            for unit in 1..=quantity {
                if unit > included {
                    expected += Decimal::new(cents, 2);
                }
            }
            prop_assert_eq!(amount.exact, expected);
        }

        #[test]
        fn the_total_is_the_sum_of_the_rounded_lines_less_discounts(
            exacts in proptest::collection::vec(0i64..10_000_000, 0..8), percent in 0i64..=100,
        ) {
            let lines: Vec<PricedLine> = exacts.iter().map(|micros| {
                PricedLine::new(&ChargeAmount {
                    quantity: Decimal::ZERO,
                    breakdown: Vec::new(),
                    fee: Decimal::ZERO,
                    exact: Decimal::new(*micros, 6),
                }, Some(&Discount::Percent(Decimal::from(percent))), 2).unwrap()
            }).collect();
            let totals = totals(&lines, None, &[], 2).unwrap();
            let mut expected = Decimal::ZERO;
            for line in &lines {
                prop_assert_eq!(line.amount, line.amount.round_dp(2));
                prop_assert!(line.discount <= line.amount);
                expected += line.amount - line.discount;
            }
            prop_assert_eq!(totals.total, expected);
        }
    }
}
