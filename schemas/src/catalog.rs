//! The billing catalog of a workspace's metering configuration: products with their rate plans
//! and charges, and the subscriptions of accounts to rate plans (issue 10, docs/billing.md).
//!
//! It lives in the same file as the rest of the configuration, so it is validated by
//! `MeteringConfig::validate` (which hands [`check_catalog`] the names the rest of the file
//! defines), versioned on the same config topic and shown by the same `config apply` diff. Prices are quoted decimal
//! strings, never floats. The effective-dated exchange rates of margins are here too
//! ([`ExchangeRate`], [`check_exchange_rates`]). What a charge model computes is `agentmeter_billing::pricing`.

use std::collections::{HashMap, HashSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::text::is_valid_identifier;

/// The largest price, fee, commitment or package size accepted in a rate plan.
pub const MAX_PRICE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0); // 10^9
/// The largest number of units a tier bound or an included allowance may name.
pub const MAX_UNITS: Decimal = Decimal::from_parts(2_808_348_672, 232_830_643, 0, false, 0); // 10^18

/// What a builder sells, tied to an agent type, with the rate plans it is sold under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Stable id (letters, digits, `_`, `-`, `.`, `:`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Id of the agent type this product is.
    pub agent_type: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The plans this product is sold under (e.g. Basic, Pro, Enterprise).
    pub rate_plans: Vec<RatePlan>,
}

/// A price list: a currency, a billing cycle and the charges billed each period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatePlan {
    /// Stable id, unique within its product.
    pub id: String,
    /// Display name.
    pub name: String,
    /// ISO 4217 code every price of this plan is in; amounts are rounded to its minor unit.
    pub currency: String,
    /// How long a billing period is.
    pub billing_cycle: BillingCycle,
    /// Where periods start: on calendar boundaries, or on the subscription's start date.
    #[serde(default)]
    pub anchor: BillingAnchor,
    /// The line items billed each period.
    pub charges: Vec<Charge>,
    /// Discounts on the whole invoice (after every charge and the minimum commitment).
    #[serde(default)]
    pub discounts: Vec<Discount>,
    /// Least the charges of a period add up to; a shortfall is billed as its own line.
    #[serde(
        default,
        with = "optional_money",
        skip_serializing_if = "Option::is_none"
    )]
    pub minimum_commitment: Option<Decimal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingCycle {
    Monthly,
    Quarterly,
    Annual,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingAnchor {
    /// Periods start on the first day of a month, quarter or year.
    #[default]
    Calendar,
    /// Periods start on the day of the month (and month, for longer cycles) the subscription
    /// started.
    Anniversary,
}

/// One line item of a rate plan: a metric and how it is priced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// Stable id, unique within its rate plan.
    pub id: String,
    /// The line's text on the invoice.
    pub name: String,
    /// What is counted: `@action`, `@outcome`, `@user`, `@seat`, or `measure` (the quantity
    /// of one measure of one action, named by `action` and `measure`). None for fees
    /// (`flat`, `one_time`), which bill no metric.
    #[serde(default)]
    pub metric: Option<String>,
    /// `@action`: only these tracked actions (all tracked actions when empty).
    #[serde(default)]
    pub actions: Vec<String>,
    /// `@outcome`: only these outcomes (all when empty).
    #[serde(default)]
    pub outcomes: Vec<String>,
    /// `measure`: the priced action.
    #[serde(default)]
    pub action: Option<String>,
    /// `measure`: its measure, as in its cost allocation (`token`, `unit`, a custom name).
    #[serde(default)]
    pub measure: Option<String>,
    /// How the quantity becomes an amount.
    pub model: ChargeModel,
    /// A discount on this line.
    #[serde(default)]
    pub discount: Option<Discount>,
}

/// How a charge turns the period's quantity into an amount. Tier bounds are cumulative
/// quantities; a tier covers the quantities above the previous bound up to and including its
/// own `up_to`; the last tier has no bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ChargeModel {
    /// Every unit at one price.
    PerUnit {
        #[serde(with = "money")]
        unit_price: Decimal,
    },
    /// Graduated: each unit at the price of the tier it falls in.
    Tiered { tiers: Vec<Tier> },
    /// Every unit at the price of the tier the period's total falls in.
    Volume { tiers: Vec<Tier> },
    /// Per started package of `package_size` units.
    Package {
        #[serde(with = "money")]
        package_size: Decimal,
        #[serde(with = "money")]
        package_price: Decimal,
    },
    /// A recurring fee per period (prorated by time for a partial period).
    Flat {
        #[serde(with = "money")]
        fee: Decimal,
    },
    /// A recurring fee that includes `included` units, then each further unit at `unit_price`.
    Overage {
        #[serde(with = "money")]
        fee: Decimal,
        #[serde(with = "money")]
        included: Decimal,
        #[serde(with = "money")]
        unit_price: Decimal,
    },
    /// A single fee, billed in the subscription's first period.
    OneTime {
        #[serde(with = "money")]
        fee: Decimal,
    },
}

/// One tier of a tiered or volume charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// The highest cumulative quantity of this tier (inclusive); none for the last tier.
    #[serde(
        default,
        with = "optional_money",
        skip_serializing_if = "Option::is_none"
    )]
    pub up_to: Option<Decimal>,
    #[serde(with = "money")]
    pub unit_price: Decimal,
}

/// A discount on one charge or on a whole invoice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Discount {
    /// This percentage (0–100) of the amount.
    Percent(#[serde(with = "money")] Decimal),
    /// This amount, at most the amount it is taken from.
    Amount(#[serde(with = "money")] Decimal),
}

/// An account's subscription to a rate plan, effective-dated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Stable id.
    pub id: String,
    /// The subscribed account.
    pub account: String,
    /// The product and its rate plan.
    pub product: String,
    pub rate_plan: String,
    /// RFC 3339 instant from which the plan applies (inclusive).
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// RFC 3339 instant at which it stops applying (exclusive); open-ended when absent.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub end: Option<OffsetDateTime>,
}

/// The largest exchange rate accepted (units of the cost currency per unit of the plan's).
pub const MAX_EXCHANGE_RATE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0); // 10^9

/// The value of one unit of a rate plan's currency in the workspace's cost currency, from an
/// instant on: the margin of an invoice in `from` converts its total with the rate of its pair
/// in force at the invoice's period end (docs/billing.md, "Margin in another currency").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeRate {
    /// ISO 4217 code of the plan currency converted from (`"EUR"`).
    pub from: String,
    /// ISO 4217 code converted to: must be the workspace's cost currency (`workspace.currency`).
    pub to: String,
    /// Units of `to` one unit of `from` is worth, a quoted decimal (`"1.0842"`), above 0 and at
    /// most [`MAX_EXCHANGE_RATE`].
    #[serde(with = "money")]
    pub rate: Decimal,
    /// RFC 3339 instant from which this rate applies (inclusive), until the pair's next one.
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from: OffsetDateTime,
}

/// Adds every problem of `rates` (converting into `cost_currency`) to `problems`.
pub fn check_exchange_rates(
    rates: &[ExchangeRate],
    cost_currency: &str,
    problems: &mut Vec<String>,
) {
    let mut seen = HashSet::new();
    for rate in rates {
        let at = format!(
            "exchange rate {} → {} effective from {}",
            rate.from, rate.to, rate.effective_from
        );
        for (field, code) in [("from", &rate.from), ("to", &rate.to)] {
            if !is_iso_currency(code) {
                problems.push(format!(
                    "{at}: {field} {code:?} is not an ISO 4217 code such as \"EUR\""
                ));
            }
        }
        if rate.from == rate.to {
            problems.push(format!(
                "{at}: from and to are the same currency; a plan billing in the cost currency needs no rate, remove it"
            ));
        } else if rate.to != cost_currency {
            problems.push(format!(
                "{at}: to must be the workspace's cost currency {cost_currency:?} (margins convert a plan's currency into the currency costs are in); write to = {cost_currency:?}"
            ));
        }
        if rate.rate <= Decimal::ZERO {
            problems.push(format!(
                "{at}: rate {} must be above 0 (units of {} per unit of {})",
                rate.rate, rate.to, rate.from
            ));
        } else if rate.rate > MAX_EXCHANGE_RATE {
            problems.push(format!(
                "{at}: rate {} is above the largest accepted, {MAX_EXCHANGE_RATE}",
                rate.rate
            ));
        }
        if !seen.insert((rate.from.as_str(), rate.to.as_str(), rate.effective_from)) {
            problems.push(format!(
                "{at} is defined twice; keep one, or give the newer rate its own effective_from"
            ));
        }
    }
}

/// Every rate plan of `products`, with its product, in the order written.
pub fn rate_plans(products: &[Product]) -> impl Iterator<Item = (&Product, &RatePlan)> {
    products
        .iter()
        .flat_map(|product| product.rate_plans.iter().map(move |plan| (product, plan)))
}

/// What a charge counts, checked ([`Charge::metric`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    /// Tracked actions, all or only these names.
    Actions { only: Vec<String> },
    /// Outcomes, all or only these.
    Outcomes { only: Vec<String> },
    /// Distinct users active in the period.
    Users,
    /// Seats of the period (docs/billing.md: the trailing-30-days rule).
    Seats,
    /// The quantity of `measure` of `action`.
    Measure { action: String, measure: String },
    /// None: a fee.
    Fee,
}

impl Charge {
    /// What this charge counts, or why its fields do not fit together.
    pub fn metric(&self) -> Result<Metric, String> {
        let is_fee = matches!(
            self.model,
            ChargeModel::Flat { .. } | ChargeModel::OneTime { .. }
        );
        let stray = |names: &[&str]| -> Result<(), String> {
            let mut given = Vec::new();
            if !self.actions.is_empty() && !names.contains(&"actions") {
                given.push("actions");
            }
            if !self.outcomes.is_empty() && !names.contains(&"outcomes") {
                given.push("outcomes");
            }
            if self.action.is_some() && !names.contains(&"action") {
                given.push("action");
            }
            if self.measure.is_some() && !names.contains(&"measure") {
                given.push("measure");
            }
            if given.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} do(es) not apply to this metric",
                    given.join(", ")
                ))
            }
        };
        let metric = match (self.metric.as_deref(), is_fee) {
            (None, true) => {
                stray(&[])?;
                return Ok(Metric::Fee);
            }
            (Some(metric), true) => {
                return Err(format!(
                    "a {} fee bills no metric; remove metric = {metric:?}",
                    self.model.name()
                ))
            }
            (None, false) => {
                return Err(format!(
                    "a {} charge needs a metric: @action, @outcome, @user, @seat or measure",
                    self.model.name()
                ))
            }
            (Some(metric), false) => metric,
        };
        match metric {
            "@action" => {
                stray(&["actions"])?;
                Ok(Metric::Actions {
                    only: self.actions.clone(),
                })
            }
            "@outcome" => {
                stray(&["outcomes"])?;
                Ok(Metric::Outcomes {
                    only: self.outcomes.clone(),
                })
            }
            "@user" => stray(&[]).map(|()| Metric::Users),
            "@seat" => stray(&[]).map(|()| Metric::Seats),
            "measure" => {
                stray(&["action", "measure"])?;
                match (&self.action, &self.measure) {
                    (Some(action), Some(measure)) => Ok(Metric::Measure {
                        action: action.clone(),
                        measure: measure.clone(),
                    }),
                    _ => Err("metric \"measure\" needs both action and measure".to_string()),
                }
            }
            other => Err(format!(
                "unknown metric {other:?}: use @action, @outcome, @user, @seat or measure"
            )),
        }
    }
}

impl ChargeModel {
    /// The model's name as written in a configuration.
    pub fn name(&self) -> &'static str {
        match self {
            ChargeModel::PerUnit { .. } => "per_unit",
            ChargeModel::Tiered { .. } => "tiered",
            ChargeModel::Volume { .. } => "volume",
            ChargeModel::Package { .. } => "package",
            ChargeModel::Flat { .. } => "flat",
            ChargeModel::Overage { .. } => "overage",
            ChargeModel::OneTime { .. } => "one_time",
        }
    }

    /// Everything wrong with the model's numbers.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut price = |what: &str, value: Decimal| {
            if value.is_sign_negative() && !value.is_zero() {
                problems.push(format!("{what} {value} is negative"));
            } else if value > MAX_PRICE {
                problems.push(format!(
                    "{what} {value} is above the largest accepted, {MAX_PRICE}"
                ));
            }
        };
        match self {
            ChargeModel::PerUnit { unit_price } => price("unit_price", *unit_price),
            ChargeModel::Tiered { tiers } | ChargeModel::Volume { tiers } => {
                for (index, tier) in tiers.iter().enumerate() {
                    price(&format!("tier {} unit_price", index + 1), tier.unit_price);
                }
                problems.extend(tier_problems(tiers));
            }
            ChargeModel::Package {
                package_size,
                package_price,
            } => {
                price("package_price", *package_price);
                if *package_size <= Decimal::ZERO || *package_size > MAX_UNITS {
                    problems.push(format!(
                        "package_size {package_size} must be above 0 and at most {MAX_UNITS}"
                    ));
                }
            }
            ChargeModel::Flat { fee } | ChargeModel::OneTime { fee } => price("fee", *fee),
            ChargeModel::Overage {
                fee,
                included,
                unit_price,
            } => {
                price("fee", *fee);
                price("unit_price", *unit_price);
                if included.is_sign_negative() && !included.is_zero() || *included > MAX_UNITS {
                    problems.push(format!(
                        "included {included} must be between 0 and {MAX_UNITS}"
                    ));
                }
            }
        }
        problems
    }
}

/// Tiers must be ascending by bound, every bound above 0, and only the last unbounded.
fn tier_problems(tiers: &[Tier]) -> Vec<String> {
    let mut problems = Vec::new();
    if tiers.is_empty() {
        problems.push("has no tiers".to_string());
        return problems;
    }
    let mut previous = Decimal::ZERO;
    for (index, tier) in tiers.iter().enumerate() {
        let last = index + 1 == tiers.len();
        match (tier.up_to, last) {
            (None, true) => {}
            (None, false) => problems.push(format!(
                "tier {} has no up_to but is not the last: only the last tier is unbounded",
                index + 1
            )),
            (Some(up_to), true) => problems.push(format!(
                "the last tier (up to {up_to}) must have no up_to, so that every quantity has a price"
            )),
            (Some(up_to), false) => {
                if up_to <= previous {
                    problems.push(format!(
                        "tier {} up_to {up_to} must be above the previous bound {previous}: tiers are listed by ascending, non-overlapping bounds",
                        index + 1
                    ));
                } else if up_to > MAX_UNITS {
                    problems.push(format!(
                        "tier {} up_to {up_to} is above the largest accepted, {MAX_UNITS}",
                        index + 1
                    ));
                }
                previous = previous.max(up_to);
            }
        }
    }
    problems
}

impl Discount {
    fn problems(&self) -> Option<String> {
        match self {
            Discount::Percent(percent)
                if *percent < Decimal::ZERO || *percent > Decimal::ONE_HUNDRED =>
            {
                Some(format!(
                    "discount percent {percent} must be between 0 and 100"
                ))
            }
            Discount::Amount(amount) if *amount < Decimal::ZERO || *amount > MAX_PRICE => Some(
                format!("discount amount {amount} must be between 0 and {MAX_PRICE}"),
            ),
            _ => None,
        }
    }
}

/// Whether `code` is an ISO 4217 currency code.
pub fn is_iso_currency(code: &str) -> bool {
    iso_currency::Currency::from_code(code).is_some()
}

/// What the rest of the configuration defines, that the catalog refers to.
#[derive(Debug, Default)]
pub struct KnownNames<'a> {
    pub agent_types: HashSet<&'a str>,
    pub accounts: HashSet<&'a str>,
    /// Tracked action names, trace events and auto tags.
    pub tracked: HashSet<&'a str>,
    pub outcomes: HashSet<&'a str>,
    /// (action, measure) of every cost allocation.
    pub measures: HashSet<(&'a str, &'a str)>,
}

/// Adds every problem of `products` and `subscriptions` to `problems`.
pub fn check_catalog(
    products: &[Product],
    subscriptions: &[Subscription],
    known: &KnownNames<'_>,
    problems: &mut Vec<String>,
) {
    let KnownNames {
        agent_types,
        accounts,
        tracked,
        outcomes,
        measures,
    } = known;
    let mut product_ids = HashSet::new();
    let mut plans: HashMap<(&str, &str), &RatePlan> = HashMap::new();
    for product in products {
        let at = format!("product {:?}", product.id);
        if !is_valid_identifier(&product.id) {
            problems.push(format!(
                "{at}: the id must be 1-128 letters, digits, '_', '-', '.', ':'"
            ));
        }
        if !product_ids.insert(product.id.as_str()) {
            problems.push(format!("{at} is defined twice"));
        }
        if !agent_types.contains(product.agent_type.as_str()) {
            problems.push(format!(
                "{at}: agent_type {:?} is not an agent type of this workspace",
                product.agent_type
            ));
        }
        if product.rate_plans.is_empty() {
            problems.push(format!("{at} has no rate plans"));
        }
        for plan in &product.rate_plans {
            let at = format!("product {:?}, rate plan {:?}", product.id, plan.id);
            if !is_valid_identifier(&plan.id) {
                problems.push(format!(
                    "{at}: the id must be 1-128 letters, digits, '_', '-', '.', ':'"
                ));
            }
            if plans
                .insert((product.id.as_str(), plan.id.as_str()), plan)
                .is_some()
            {
                problems.push(format!("{at} is defined twice"));
            }
            if !is_iso_currency(&plan.currency) {
                problems.push(format!(
                    "{at}: currency {:?} is not an ISO 4217 code such as \"USD\"",
                    plan.currency
                ));
            }
            if plan.charges.is_empty() {
                problems.push(format!("{at} has no charges"));
            }
            let mut charge_ids = HashSet::new();
            for charge in &plan.charges {
                let at = format!("{at}, charge {:?}", charge.id);
                if !charge_ids.insert(charge.id.as_str()) {
                    problems.push(format!("{at} is defined twice"));
                }
                match charge.metric() {
                    Err(problem) => problems.push(format!("{at}: {problem}")),
                    Ok(Metric::Actions { only }) => {
                        for action in only.iter().filter(|a| !tracked.contains(a.as_str())) {
                            problems.push(format!(
                                "{at}: action {action:?} is not tracked (add it to tagging.tracked)"
                            ));
                        }
                    }
                    Ok(Metric::Outcomes { only }) => {
                        for outcome in only.iter().filter(|o| !outcomes.contains(o.as_str())) {
                            problems.push(format!(
                                "{at}: outcome {outcome:?} is not defined (add it to [[outcomes]])"
                            ));
                        }
                    }
                    Ok(Metric::Measure { action, measure }) => {
                        if !measures.contains(&(action.as_str(), measure.as_str())) {
                            problems.push(format!(
                                "{at}: no cost allocation measures {action:?} in {measure:?}; a measure charge bills a measure a cost allocation defines"
                            ));
                        }
                    }
                    Ok(Metric::Users | Metric::Seats | Metric::Fee) => {}
                }
                for problem in charge.model.problems() {
                    problems.push(format!("{at} ({}): {problem}", charge.model.name()));
                }
                if let Some(problem) = charge.discount.as_ref().and_then(Discount::problems) {
                    problems.push(format!("{at}: {problem}"));
                }
            }
            for problem in plan.discounts.iter().filter_map(Discount::problems) {
                problems.push(format!("{at}: {problem}"));
            }
            if let Some(minimum) = plan.minimum_commitment {
                if minimum < Decimal::ZERO || minimum > MAX_PRICE {
                    problems.push(format!(
                        "{at}: minimum_commitment {minimum} must be between 0 and {MAX_PRICE}"
                    ));
                }
            }
        }
    }

    let mut subscription_ids = HashSet::new();
    let mut by_account_product: HashMap<(&str, &str), Vec<&Subscription>> = HashMap::new();
    for subscription in subscriptions {
        let at = format!("subscription {:?}", subscription.id);
        if !subscription_ids.insert(subscription.id.as_str()) {
            problems.push(format!("{at} is defined twice"));
        }
        if !accounts.contains(subscription.account.as_str()) {
            problems.push(format!(
                "{at}: account {:?} is not an account of this workspace",
                subscription.account
            ));
        }
        if !plans.contains_key(&(
            subscription.product.as_str(),
            subscription.rate_plan.as_str(),
        )) {
            problems.push(format!(
                "{at}: product {:?} has no rate plan {:?}",
                subscription.product, subscription.rate_plan
            ));
        }
        if subscription
            .end
            .is_some_and(|end| end <= subscription.start)
        {
            problems.push(format!("{at}: end must be after start"));
        }
        by_account_product
            .entry((subscription.account.as_str(), subscription.product.as_str()))
            .or_default()
            .push(subscription);
    }
    for ((account, product), mut subscriptions) in by_account_product {
        subscriptions.sort_by_key(|subscription| subscription.start);
        for pair in subscriptions.windows(2) {
            let overlaps = pair[0].end.is_none_or(|end| end > pair[1].start);
            if overlaps {
                problems.push(format!(
                    "subscriptions {:?} and {:?} of account {account:?} to product {product:?} overlap in time; end the first (end = the second's start) to change plans",
                    pair[0].id, pair[1].id
                ));
            }
        }
    }
}

/// Prices are quoted decimal strings: a TOML or JSON float would already have been rounded to
/// binary before we see it.
mod money {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        rust_decimal::serde::str::serialize(value, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        let text = String::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "prices and quantities must be quoted decimal strings such as \"0.01\", never floats",
            )
        })?;
        text.trim().parse::<Decimal>().map_err(|error| {
            serde::de::Error::custom(format!("{text:?} is not a decimal: {error}"))
        })
    }
}

mod optional_money {
    use rust_decimal::Decimal;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Decimal>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::money::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Decimal>, D::Error> {
        super::money::deserialize(deserializer).map(Some)
    }
}
