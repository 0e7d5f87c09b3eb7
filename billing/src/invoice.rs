//! A draft invoice: one subscription's lines for one billing period, from the period's
//! quantities per charge (read from ClickHouse by the caller) and the rules of [`crate::pricing`].
//!
//! A draft is recomputed whenever it is asked for, so it includes late actions; finalizing it
//! exactly once is ADR 0004's design and not built yet.

use std::collections::HashMap;

use agentmeter_schemas::catalog::{
    rate_plans, Charge, ChargeModel, Metric, RatePlan, Subscription,
};
use agentmeter_schemas::metering::MeteringConfig;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::period::Coverage;
use crate::pricing::{self, PricedLine, PricingError, TierLine};

/// Why a draft could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error("subscription {subscription:?}: product {product:?} has no rate plan {rate_plan:?}")]
    UnknownPlan {
        subscription: String,
        product: String,
        rate_plan: String,
    },
    #[error("charge {charge:?}: {source}")]
    Pricing {
        charge: String,
        #[source]
        source: PricingError,
    },
    #[error("charge {0:?}: no quantity was read for it")]
    MissingQuantity(String),
    #[error("charge {charge:?}: {problem}")]
    InvalidCharge { charge: String, problem: String },
}

/// One part of a line: units at one price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierPart {
    pub above: Decimal,
    pub up_to: Option<Decimal>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

impl From<&TierLine> for TierPart {
    fn from(line: &TierLine) -> TierPart {
        TierPart {
            above: line.above,
            up_to: line.up_to,
            quantity: line.quantity,
            unit_price: line.unit_price,
            amount: line.amount,
        }
    }
}

/// One charge on the invoice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub charge_id: String,
    pub name: String,
    /// `@action`, `@outcome`, `@user`, `@seat`, `measure`, or `fee`.
    pub metric: String,
    /// What one unit of `quantity` is: the metric, or for `measure` the measure's name.
    pub unit: String,
    pub model: String,
    /// The period's quantity of the metric (0 for fees).
    pub quantity: Decimal,
    /// How the usage part of the amount is made up (exact).
    pub breakdown: Vec<TierPart>,
    /// The fee part, prorated (exact).
    pub fee: Decimal,
    /// The line's amount, rounded once to the currency's minor unit.
    pub amount: Decimal,
    /// Taken from `amount` by the charge's discount (rounded).
    pub discount: Decimal,
}

/// Who the invoice is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillTo {
    pub account_id: String,
    pub name: String,
    pub email: Option<String>,
    pub address: Option<String>,
}

/// A draft invoice of one subscription for one period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftInvoice {
    /// `draft`; `finalized` or `void` once finalized (ADR 0004).
    pub status: String,
    /// The workspace's invoice number, once finalized (1, 2, 3, … without gaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    /// The number of the void invoice this one replaces, when it is a reissue (ADR 0004).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissues: Option<u64>,
    pub workspace_id: String,
    pub bill_to: BillTo,
    pub subscription_id: String,
    pub product: String,
    pub rate_plan: String,
    pub currency: String,
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// The part of the period the subscription covers: usage is counted in `[from, to)`.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// `(to − from) / (period_end − period_start)`: fees and the minimum are prorated by it.
    pub share: Decimal,
    pub lines: Vec<InvoiceLine>,
    pub subtotal: Decimal,
    pub minimum_shortfall: Decimal,
    pub invoice_discounts: Vec<Decimal>,
    /// Usage of earlier, finalized periods that changed after they were finalized (ADR 0004):
    /// their amounts are in `total`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corrections: Vec<Correction>,
    pub total: Decimal,
}

/// What changed in an earlier, finalized period of the subscription since it was billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Correction {
    /// The invoice that billed the period first.
    pub corrects_invoice: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// Per charge whose quantity changed: what was billed so far and what the usage is now.
    pub quantities: Vec<CorrectedQuantity>,
    /// The period's total as billed so far (its invoice and earlier corrections) and as the
    /// usage prices it now; `amount = after − before`.
    pub total_before: Decimal,
    pub total_after: Decimal,
    pub amount: Decimal,
}

/// One charge's quantity in a [`Correction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectedQuantity {
    pub charge_id: String,
    pub name: String,
    pub unit: String,
    pub before: Decimal,
    pub after: Decimal,
}

impl DraftInvoice {
    /// Adds `corrections` to the invoice and their amounts to its total.
    pub fn with_corrections(
        mut self,
        corrections: Vec<Correction>,
    ) -> Result<DraftInvoice, InvoiceError> {
        for correction in &corrections {
            self.total =
                self.total
                    .checked_add(correction.amount)
                    .ok_or(InvoiceError::Pricing {
                        charge: "a correction".into(),
                        source: PricingError::Overflow {
                            what: "the invoice total with its corrections",
                        },
                    })?;
        }
        self.corrections.extend(corrections);
        Ok(self)
    }

    /// The total of the invoice's own period, without its corrections of earlier ones.
    pub fn total_before_corrections(&self) -> Result<Decimal, InvoiceError> {
        self.corrections
            .iter()
            .try_fold(self.total, |total, correction| {
                total.checked_sub(correction.amount)
            })
            .ok_or(InvoiceError::Pricing {
                charge: "a correction".into(),
                source: PricingError::Overflow {
                    what: "the invoice total without its corrections",
                },
            })
    }

    /// The quantity of each usage line, by charge id.
    pub fn quantities(&self) -> HashMap<&str, Decimal> {
        self.lines
            .iter()
            .filter(|line| line.metric != "fee")
            .map(|line| (line.charge_id.as_str(), line.quantity))
            .collect()
    }
}

/// The rate plan `subscription` is on.
pub fn plan_of<'c>(
    config: &'c MeteringConfig,
    subscription: &Subscription,
) -> Result<&'c RatePlan, InvoiceError> {
    rate_plans(&config.products)
        .find(|(product, plan)| {
            product.id == subscription.product && plan.id == subscription.rate_plan
        })
        .map(|(_, plan)| plan)
        .ok_or_else(|| InvoiceError::UnknownPlan {
            subscription: subscription.id.clone(),
            product: subscription.product.clone(),
            rate_plan: subscription.rate_plan.clone(),
        })
}

/// The metric's name as shown on a line.
pub fn metric_name(metric: &Metric) -> &'static str {
    match metric {
        Metric::Actions { .. } => "@action",
        Metric::Outcomes { .. } => "@outcome",
        Metric::Users => "@user",
        Metric::Seats => "@seat",
        Metric::Measure { .. } => "measure",
        Metric::Fee => "fee",
    }
}

/// The draft of `subscription` for `coverage`, with `quantities` by charge id (every usage
/// charge of the plan must have one; fees need none).
pub fn draft(
    config: &MeteringConfig,
    subscription: &Subscription,
    coverage: &Coverage,
    quantities: &HashMap<String, Decimal>,
) -> Result<DraftInvoice, InvoiceError> {
    let plan = plan_of(config, subscription)?;
    let digits =
        pricing::minor_unit_digits(&plan.currency).map_err(|source| InvoiceError::Pricing {
            charge: String::new(),
            source,
        })?;
    let mut lines = Vec::with_capacity(plan.charges.len());
    let mut priced = Vec::with_capacity(plan.charges.len());
    for charge in &plan.charges {
        if matches!(charge.model, ChargeModel::OneTime { .. }) && !coverage.first {
            continue;
        }
        let (line, priced_line) = price_line(charge, coverage, quantities, digits)?;
        lines.push(line);
        priced.push(priced_line);
    }
    let minimum = match plan.minimum_commitment {
        Some(minimum) => Some(minimum.checked_mul(coverage.share).ok_or(
            InvoiceError::Pricing {
                charge: "minimum_commitment".into(),
                source: PricingError::Overflow {
                    what: "the prorated minimum commitment",
                },
            },
        )?),
        None => None,
    };
    let totals = pricing::totals(&priced, minimum, &plan.discounts, digits).map_err(|source| {
        InvoiceError::Pricing {
            charge: "the invoice total".into(),
            source,
        }
    })?;
    let account = config
        .accounts
        .iter()
        .find(|account| account.id == subscription.account);
    Ok(DraftInvoice {
        status: "draft".to_string(),
        number: None,
        reissues: None,
        workspace_id: config.workspace.id.clone(),
        bill_to: BillTo {
            account_id: subscription.account.clone(),
            name: account.map(|a| a.name.clone()).unwrap_or_default(),
            email: account.and_then(|a| a.email.clone()),
            address: account.and_then(|a| a.address.clone()),
        },
        subscription_id: subscription.id.clone(),
        product: subscription.product.clone(),
        rate_plan: plan.id.clone(),
        currency: plan.currency.clone(),
        period_start: coverage.period.start,
        period_end: coverage.period.end,
        from: coverage.from,
        to: coverage.to,
        share: coverage.share,
        lines,
        subtotal: totals.subtotal,
        minimum_shortfall: totals.minimum_shortfall,
        invoice_discounts: totals.invoice_discounts,
        corrections: Vec::new(),
        total: totals.total,
    })
}

fn price_line(
    charge: &Charge,
    coverage: &Coverage,
    quantities: &HashMap<String, Decimal>,
    digits: u32,
) -> Result<(InvoiceLine, PricedLine), InvoiceError> {
    let metric = charge
        .metric()
        .map_err(|problem| InvoiceError::InvalidCharge {
            charge: charge.id.clone(),
            problem,
        })?;
    let quantity = match metric {
        Metric::Fee => Decimal::ZERO,
        _ => *quantities
            .get(&charge.id)
            .ok_or_else(|| InvoiceError::MissingQuantity(charge.id.clone()))?,
    };
    let pricing_error = |source| InvoiceError::Pricing {
        charge: charge.id.clone(),
        source,
    };
    let amount = pricing::price(&charge.model, quantity, coverage.share).map_err(pricing_error)?;
    let priced =
        PricedLine::new(&amount, charge.discount.as_ref(), digits).map_err(pricing_error)?;
    let line = InvoiceLine {
        charge_id: charge.id.clone(),
        name: charge.name.clone(),
        metric: metric_name(&metric).to_string(),
        unit: match &metric {
            Metric::Measure { measure, .. } => measure.clone(),
            other => metric_name(other).to_string(),
        },
        model: charge.model.name().to_string(),
        quantity,
        breakdown: amount.breakdown.iter().map(TierPart::from).collect(),
        fee: amount.fee,
        amount: priced.amount,
        discount: priced.discount,
    };
    Ok((line, priced))
}

impl DraftInvoice {
    /// "DRAFT invoice", "INVOICE 7" or "VOID invoice 7".
    pub fn heading(&self) -> String {
        match (self.status.as_str(), self.number) {
            ("finalized", Some(number)) => format!("INVOICE {number}"),
            ("void", Some(number)) => format!("VOID invoice {number}"),
            _ => "DRAFT invoice".to_string(),
        }
    }

    /// The invoice as text, for a terminal.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let date = |instant: OffsetDateTime| instant.date().to_string();
        let rfc3339 = |instant: OffsetDateTime| {
            instant
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| instant.to_string())
        };
        text.push_str(&format!(
            "{} — {} ({}), subscription {} to {} / {}\n",
            self.heading(),
            self.bill_to.name,
            self.bill_to.account_id,
            self.subscription_id,
            self.product,
            self.rate_plan
        ));
        if let Some(replaced) = self.reissues {
            text.push_str(&format!("replaces void invoice {replaced}\n"));
        }
        text.push_str(&format!(
            "period {} to {} (exclusive); billed {} to {}, share {}\n",
            date(self.period_start),
            date(self.period_end),
            rfc3339(self.from),
            rfc3339(self.to),
            self.share.round_dp(6).normalize()
        ));
        for line in &self.lines {
            let quantity = if line.metric == "fee" {
                String::new()
            } else {
                format!("{} {}", line.quantity.normalize(), line.unit)
            };
            text.push_str(&format!(
                "  {:<40} {:>22} {:>14} {}\n",
                line.name, quantity, line.amount, self.currency
            ));
            for part in &line.breakdown {
                let telling = line.breakdown.len() > 1
                    || (part.quantity != line.quantity && !part.quantity.is_zero());
                if telling {
                    text.push_str(&format!(
                        "      {} × {} = {}\n",
                        part.quantity.normalize(),
                        part.unit_price.normalize(),
                        part.amount.normalize()
                    ));
                }
            }
            if !line.discount.is_zero() {
                text.push_str(&format!(
                    "  {:<40} {:>22} {:>14} {}\n",
                    "  discount", "", -line.discount, self.currency
                ));
            }
        }
        text.push_str(&format!(
            "  {:<63} {:>14} {}\n",
            "subtotal", self.subtotal, self.currency
        ));
        if !self.minimum_shortfall.is_zero() {
            text.push_str(&format!(
                "  {:<63} {:>14} {}\n",
                "minimum commitment shortfall", self.minimum_shortfall, self.currency
            ));
        }
        for discount in &self.invoice_discounts {
            text.push_str(&format!(
                "  {:<63} {:>14} {}\n",
                "invoice discount", -*discount, self.currency
            ));
        }
        for correction in &self.corrections {
            text.push_str(&format!(
                "  {:<63} {:>14} {}\n",
                format!(
                    "correction of invoice {} ({} to {})",
                    correction.corrects_invoice,
                    date(correction.period_start),
                    date(correction.period_end)
                ),
                correction.amount,
                self.currency
            ));
            for quantity in &correction.quantities {
                text.push_str(&format!(
                    "      {}: {} → {} {}\n",
                    quantity.name,
                    quantity.before.normalize(),
                    quantity.after.normalize(),
                    quantity.unit
                ));
            }
        }
        text.push_str(&format!(
            "  {:<63} {:>14} {}\n",
            "TOTAL", self.total, self.currency
        ));
        text
    }
}

impl DraftInvoice {
    /// The invoice as a printable HTML page (one file, no scripts, no external resources).
    /// Every text from the configuration is escaped.
    pub fn to_html(&self) -> String {
        let date = |instant: OffsetDateTime| escape(&instant.date().to_string());
        let money = |amount: Decimal| format!("{} {}", amount, escape(&self.currency));
        let mut rows = String::new();
        for line in &self.lines {
            let quantity = if line.metric == "fee" {
                String::new()
            } else {
                format!("{} {}", line.quantity.normalize(), escape(&line.unit))
            };
            rows.push_str(&format!(
                "<tr><td>{}</td><td class=\"n\">{quantity}</td><td class=\"n\">{}</td></tr>\n",
                escape(&line.name),
                money(line.amount)
            ));
            if line.breakdown.len() > 1 {
                for part in &line.breakdown {
                    rows.push_str(&format!(
                        "<tr class=\"part\"><td>{} × {}</td><td></td><td class=\"n\">{}</td></tr>\n",
                        part.quantity.normalize(),
                        part.unit_price.normalize(),
                        part.amount.normalize()
                    ));
                }
            }
            if !line.discount.is_zero() {
                rows.push_str(&format!(
                    "<tr class=\"part\"><td>discount</td><td></td><td class=\"n\">{}</td></tr>\n",
                    money(-line.discount)
                ));
            }
        }
        let mut totals = format!(
            "<tr class=\"sum\"><td>Subtotal</td><td></td><td class=\"n\">{}</td></tr>\n",
            money(self.subtotal)
        );
        if !self.minimum_shortfall.is_zero() {
            totals.push_str(&format!(
                "<tr><td>Minimum commitment</td><td></td><td class=\"n\">{}</td></tr>\n",
                money(self.minimum_shortfall)
            ));
        }
        for discount in &self.invoice_discounts {
            totals.push_str(&format!(
                "<tr><td>Discount</td><td></td><td class=\"n\">{}</td></tr>\n",
                money(-*discount)
            ));
        }
        for correction in &self.corrections {
            let changes = correction
                .quantities
                .iter()
                .map(|quantity| {
                    format!(
                        "{}: {} → {} {}",
                        escape(&quantity.name),
                        quantity.before.normalize(),
                        quantity.after.normalize(),
                        escape(&quantity.unit)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            totals.push_str(&format!(
                "<tr><td>Correction of invoice {} ({} to {})<br><small>{changes}</small></td><td></td><td class=\"n\">{}</td></tr>\n",
                correction.corrects_invoice,
                date(correction.period_start),
                date(correction.period_end),
                money(correction.amount)
            ));
        }
        totals.push_str(&format!(
            "<tr class=\"sum\"><td>Total</td><td></td><td class=\"n\">{}</td></tr>\n",
            money(self.total)
        ));
        let contact = [
            self.bill_to.email.as_deref(),
            self.bill_to.address.as_deref(),
        ]
        .into_iter()
        .flatten()
        .map(escape)
        .collect::<Vec<_>>()
        .join("<br>");
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{heading} {subscription} {start}</title>\n\
             <style>body{{font-family:sans-serif;max-width:48em;margin:2em auto}}table{{width:100%;border-collapse:collapse}}\
             td{{padding:.3em;border-bottom:1px solid #ddd}}.n{{text-align:right;white-space:nowrap}}.part td{{color:#555;font-size:.9em;padding-left:1.5em}}\
             .sum td{{font-weight:bold}}@media print{{.draft{{color:#999}}}}</style></head>\n\
             <body><h1>{heading}</h1>\n{replaces}\
             <p><b>Bill to:</b> {name} ({account})<br>{contact}</p>\n\
             <p>{product} / {plan}, subscription {subscription}<br>Period {start} to {end} (exclusive); billed from {from} to {to}</p>\n\
             <table>\n<tr><th>Charge</th><th class=\"n\">Quantity</th><th class=\"n\">Amount</th></tr>\n{rows}{totals}</table>\n</body></html>\n",
            heading = escape(&self.heading()),
            replaces = self
                .reissues
                .map(|replaced| format!("<p>Replaces void invoice {replaced}.</p>\n"))
                .unwrap_or_default(),
            subscription = escape(&self.subscription_id),
            start = date(self.period_start),
            end = date(self.period_end),
            from = date(self.from),
            to = date(self.to),
            name = escape(&self.bill_to.name),
            account = escape(&self.bill_to.account_id),
            product = escape(&self.product),
            plan = escape(&self.rate_plan),
        )
    }
}

/// `text` with HTML's special characters escaped.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use agentmeter_schemas::metering::MeteringConfig;
    use time::macros::datetime;

    use super::*;
    use crate::period::coverage;

    const EXAMPLE: &str = include_str!("../../deploy/local/metering.example.toml");

    fn quantities(pairs: &[(&str, &str)]) -> HashMap<String, Decimal> {
        pairs
            .iter()
            .map(|(charge, quantity)| (charge.to_string(), quantity.parse().unwrap()))
            .collect()
    }

    /// The draft of the example's subscription `index` for November 2026 (UTC).
    fn november_draft(
        config: &MeteringConfig,
        index: usize,
        pairs: &[(&str, &str)],
    ) -> Result<DraftInvoice, InvoiceError> {
        let subscription = &config.subscriptions[index];
        let plan = plan_of(config, subscription).unwrap();
        let november = coverage(
            plan,
            subscription,
            datetime!(2026-11-15 0:00 UTC),
            &jiff::tz::TimeZone::UTC,
        )
        .unwrap()
        .unwrap();
        draft(config, subscription, &november, &quantities(pairs))
    }

    #[test]
    fn the_example_accounts_get_the_drafts_of_their_plans() {
        let config = MeteringConfig::from_toml(EXAMPLE).unwrap();
        let invoice = november_draft(&config, 0, &[("platform", "12345"), ("seats", "4")]).unwrap();
        assert_eq!(
            invoice.total,
            Decimal::new(15445, 2),
            "{}",
            invoice.to_text()
        );
        assert_eq!(invoice.bill_to.name, "Acme Corp");
        let invoice = november_draft(
            &config,
            1,
            &[("detections", "7"), ("gemini_tokens", "1500000")],
        )
        .unwrap();
        // 7 × 5 + 1,000,000 × 0.00001 + 500,000 × 0.000008
        assert_eq!(
            invoice.total,
            Decimal::from(35 + 10 + 4),
            "{}",
            invoice.to_text()
        );
        assert!(invoice.to_text().contains("TOTAL"));
    }

    #[test]
    fn the_html_rendering_shows_every_line_and_escapes_names() {
        let mut config = MeteringConfig::from_toml(EXAMPLE).unwrap();
        config.accounts[0].name = "Acme <script>alert(1)</script> & Co".into();
        let invoice = november_draft(&config, 0, &[("platform", "12345"), ("seats", "4")]).unwrap();
        let html = invoice.to_html();
        assert!(
            html.contains("Acme &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co"),
            "{html}"
        );
        assert!(!html.contains("<script>"));
        for text in [
            "Platform fee with 10,000 actions",
            "122.45 USD",
            "40.00 USD",
            "-8.00 USD",
            "154.45 USD",
        ] {
            assert!(html.contains(text), "no {text:?} in {html}");
        }
    }

    #[test]
    fn a_usage_charge_without_its_quantity_is_an_error_not_a_zero() {
        let config = MeteringConfig::from_toml(EXAMPLE).unwrap();
        let error = november_draft(&config, 0, &[("platform", "1")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"seats\""), "{error}");
    }
}
