//! Finalized invoices as a function of the finalization log (ADR 0004).
//!
//! Finalizing appends a [`LogRecord::Finalize`] carrying the invoice's whole content to the
//! single-partition topic `<prefix>billing.finalizations`; voiding appends a
//! [`LogRecord::Void`]. Everything else follows from the log, read in order by [`project`]:
//!
//! * the **first** `Finalize` of an `invoice_id` wins; later ones (a retry, a second finalizer,
//!   a zombie) are ignored, whatever their content;
//! * a workspace's invoice number is the position of the winning record among that workspace's
//!   winning records: 1, 2, 3, … — no gap and no duplicate, since a log position is taken once;
//! * the first `Void` of a finalized invoice marks it void; it keeps its number and its content;
//! * a void invoice may be **reissued**: a `Finalize` of id [`reissue_id`] of the voided id,
//!   naming it in `reissues`, is a new invoice of the same period with the next number — taken
//!   only while the invoice it names is void, and only once (the first record wins, as for every
//!   id). A reissue can be voided and reissued in turn.
//!
//! Late usage: [`billed_periods`] says what the finalized invoices billed so far for each
//! earlier period of a subscription (its invoice, then the newest correction of it on a later
//! invoice that is not void), and [`correction`] compares that with the period priced anew —
//! the difference is a correction line on the next invoice, frozen with it. So after every
//! finalization, what was billed for each earlier period equals its usage at that moment.
//!
//! The projection is a pure function of the log, so the rows written from it are identical on
//! every replay. The I/O (the topic, the ClickHouse table) is in `src/invoices_cmd.rs`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::invoice::{CorrectedQuantity, Correction, DraftInvoice, InvoiceError};
use crate::pricing::PricingError;

/// One record of the finalization log (JSON, keyed by `invoice_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogRecord {
    /// Freezes `invoice` (a draft's content) as the invoice `invoice_id`.
    Finalize {
        invoice_id: String,
        /// The configuration version the invoice was computed with.
        config_version: u64,
        #[serde(with = "time::serde::rfc3339")]
        finalized_at: OffsetDateTime,
        invoice: Box<DraftInvoice>,
        /// What the invoice's usage cost (allocated cost, exact) when it was finalized.
        #[serde(default)]
        cost: CostAtFinalization,
        /// The id of the void invoice this one reissues ([`reissue_id`] of it is `invoice_id`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reissues: Option<String>,
    },
    /// Voids the finalized invoice `invoice_id` (it keeps its number).
    Void {
        invoice_id: String,
        workspace_id: String,
        reason: String,
        #[serde(with = "time::serde::rfc3339")]
        voided_at: OffsetDateTime,
    },
}

impl LogRecord {
    pub fn invoice_id(&self) -> &str {
        match self {
            LogRecord::Finalize { invoice_id, .. } | LogRecord::Void { invoice_id, .. } => {
                invoice_id
            }
        }
    }
}

/// The allocated cost of an invoice's usage, and what it is billed for, frozen with it: the
/// revenue, cost and margin views read these (docs/sql.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostAtFinalization {
    /// The product's agent type.
    pub agent_type: String,
    pub cost: rust_decimal::Decimal,
    /// The workspace's cost currency.
    pub cost_currency: String,
    /// The exchange rate (units of `cost_currency` per unit of the invoice's currency) in force
    /// at the period end when it was finalized, when the currencies differ and one was
    /// configured: the margin is computed with it, never with a rate configured later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_rate: Option<rust_decimal::Decimal>,
}

/// The id of the invoice of one subscription and period: the same whoever computes it, so that
/// two finalizers of one period append records of one id.
pub fn invoice_id(
    workspace: &str,
    account: &str,
    subscription: &str,
    period_start: OffsetDateTime,
) -> String {
    let mut hasher = Sha256::new();
    for part in [
        workspace,
        account,
        subscription,
        &period_start.unix_timestamp().to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    let digest = hasher.finalize();
    digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The id of the reissue of the void invoice `voided`: the same whoever reissues it, so that two
/// reissuers append records of one id and the first wins, as for [`invoice_id`].
pub fn reissue_id(voided: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [voided, "reissue"] {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    let digest = hasher.finalize();
    digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A finalized invoice as the log makes it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalizedInvoice {
    pub invoice_id: String,
    /// The frozen content, with `status` (`finalized` or `void`) and `number` set.
    pub invoice: DraftInvoice,
    pub config_version: u64,
    pub finalized_at: OffsetDateTime,
    /// Log offset of the winning `Finalize`.
    pub log_offset: i64,
    /// Log offset of the last record that changed the invoice (its `Finalize` or `Void`): the
    /// version of its row.
    pub version: i64,
    pub void_reason: Option<String>,
    pub cost: CostAtFinalization,
    /// The id of the void invoice this one reissues.
    pub reissues: Option<String>,
}

/// Every finalized invoice of the log `records` ((offset, record), in log order), in log order.
pub fn project(records: impl IntoIterator<Item = (i64, LogRecord)>) -> Vec<FinalizedInvoice> {
    let mut invoices: Vec<FinalizedInvoice> = Vec::new();
    let mut position_by_id: HashMap<String, usize> = HashMap::new();
    let mut last_number: HashMap<String, u64> = HashMap::new();
    for (offset, record) in records {
        match record {
            LogRecord::Finalize {
                invoice_id,
                config_version,
                finalized_at,
                invoice,
                cost,
                reissues,
            } => {
                if position_by_id.contains_key(&invoice_id) {
                    continue;
                }
                let mut invoice = *invoice;
                // A reissue counts only while what it replaces is void (a record appended in a
                // race with nothing to replace, or of a forged id, is ignored like a loser).
                invoice.reissues = None;
                if let Some(voided) = &reissues {
                    let replaced = position_by_id
                        .get(voided)
                        .map(|&position| &invoices[position])
                        .filter(|replaced| {
                            replaced.void_reason.is_some()
                                && invoice_id == reissue_id(voided)
                                && replaced.invoice.workspace_id == invoice.workspace_id
                                && replaced.invoice.subscription_id == invoice.subscription_id
                                && replaced.invoice.period_start == invoice.period_start
                        });
                    let Some(replaced) = replaced else {
                        continue;
                    };
                    invoice.reissues = replaced.invoice.number;
                }
                let number = last_number.entry(invoice.workspace_id.clone()).or_insert(0);
                *number += 1;
                invoice.status = "finalized".to_string();
                invoice.number = Some(*number);
                position_by_id.insert(invoice_id.clone(), invoices.len());
                invoices.push(FinalizedInvoice {
                    invoice_id,
                    invoice,
                    config_version,
                    finalized_at,
                    log_offset: offset,
                    version: offset,
                    void_reason: None,
                    cost,
                    reissues,
                });
            }
            LogRecord::Void {
                invoice_id,
                workspace_id,
                reason,
                ..
            } => {
                let Some(&position) = position_by_id.get(&invoice_id) else {
                    continue;
                };
                let finalized = &mut invoices[position];
                // A void names its workspace: one workspace cannot void another's invoice.
                if finalized.invoice.workspace_id != workspace_id || finalized.void_reason.is_some()
                {
                    continue;
                }
                finalized.invoice.status = "void".to_string();
                finalized.void_reason = Some(reason);
                finalized.version = offset;
            }
        }
    }
    invoices
}

/// What the finalized invoices billed so far for one earlier period of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct BilledPeriod {
    /// The invoice that billed the period first.
    pub number: u64,
    pub period_start: OffsetDateTime,
    pub period_end: OffsetDateTime,
    /// Per usage charge: (name, unit, quantity billed).
    pub quantities: Vec<(String, String, String, rust_decimal::Decimal)>,
    pub total: rust_decimal::Decimal,
}

/// The periods of `subscription` (of `workspace`) before `before` that a finalized invoice
/// billed, with what was billed for each so far. A void invoice bills nothing: neither its
/// period nor its corrections count. A standing reissue is its period's invoice like any other:
/// the period is billed by its lines, then by the corrections naming its number.
pub fn billed_periods(
    invoices: &[FinalizedInvoice],
    workspace: &str,
    subscription: &str,
    before: OffsetDateTime,
) -> Result<Vec<BilledPeriod>, InvoiceError> {
    let standing: Vec<&FinalizedInvoice> = invoices
        .iter()
        .filter(|finalized| {
            finalized.void_reason.is_none()
                && finalized.invoice.workspace_id == workspace
                && finalized.invoice.subscription_id == subscription
        })
        .collect();
    let mut periods = Vec::new();
    for original in &standing {
        let invoice = &original.invoice;
        if invoice.period_start >= before {
            continue;
        }
        let number = invoice.number.unwrap_or(0);
        let mut billed = BilledPeriod {
            number,
            period_start: invoice.period_start,
            period_end: invoice.period_end,
            quantities: invoice
                .lines
                .iter()
                .filter(|line| line.metric != "fee")
                .map(|line| {
                    (
                        line.charge_id.clone(),
                        line.name.clone(),
                        line.unit.clone(),
                        line.quantity,
                    )
                })
                .collect(),
            total: invoice.total_before_corrections()?,
        };
        // The newest correction of the period (in log order) is what is billed now.
        for later in &standing {
            for correction in &later.invoice.corrections {
                if correction.corrects_invoice == number
                    && correction.period_start == invoice.period_start
                {
                    for quantity in &correction.quantities {
                        if let Some(entry) = billed
                            .quantities
                            .iter_mut()
                            .find(|(charge, ..)| *charge == quantity.charge_id)
                        {
                            entry.3 = quantity.after;
                        }
                    }
                    billed.total = correction.total_after;
                }
            }
        }
        periods.push(billed);
    }
    Ok(periods)
}

/// What a reissue of `voided` takes back so that its period is billed once: the corrections of
/// that period on standing (not void) invoices stay billed, while the reissue bills the whole
/// period anew from its usage now. So the reissue carries this correction of the period: their
/// amounts summed and negated, and per charge the quantity they added (`before`) down to 0
/// (`after`). `None` when no standing invoice bills a correction of the period.
pub fn reissue_takeback(
    invoices: &[FinalizedInvoice],
    voided: &FinalizedInvoice,
) -> Result<Option<Correction>, InvoiceError> {
    let overflow = |what: &'static str| InvoiceError::Pricing {
        charge: "a reissue".into(),
        source: PricingError::Overflow { what },
    };
    let period = &voided.invoice;
    let mut billed = rust_decimal::Decimal::ZERO;
    let mut added: Vec<CorrectedQuantity> = Vec::new();
    let standing = invoices.iter().filter(|finalized| {
        finalized.void_reason.is_none()
            && finalized.invoice.workspace_id == period.workspace_id
            && finalized.invoice.subscription_id == period.subscription_id
    });
    for finalized in standing {
        for correction in &finalized.invoice.corrections {
            if correction.period_start != period.period_start {
                continue;
            }
            billed = billed
                .checked_add(correction.amount)
                .ok_or_else(|| overflow("the corrections of the period"))?;
            for quantity in &correction.quantities {
                let delta = quantity
                    .after
                    .checked_sub(quantity.before)
                    .ok_or_else(|| overflow("a corrected quantity"))?;
                match added
                    .iter_mut()
                    .find(|entry| entry.charge_id == quantity.charge_id)
                {
                    Some(entry) => {
                        entry.before = entry
                            .before
                            .checked_add(delta)
                            .ok_or_else(|| overflow("a corrected quantity"))?;
                    }
                    None => added.push(CorrectedQuantity {
                        charge_id: quantity.charge_id.clone(),
                        name: quantity.name.clone(),
                        unit: quantity.unit.clone(),
                        before: delta,
                        after: rust_decimal::Decimal::ZERO,
                    }),
                }
            }
        }
    }
    added.retain(|entry| !entry.before.is_zero());
    if added.is_empty() && billed.is_zero() {
        return Ok(None);
    }
    Ok(Some(Correction {
        corrects_invoice: period.number.unwrap_or(0),
        period_start: period.period_start,
        period_end: period.period_end,
        quantities: added,
        total_before: billed,
        total_after: rust_decimal::Decimal::ZERO,
        amount: -billed,
    }))
}

/// The correction of `billed` when the period, priced anew from its usage now (`now`), differs.
pub fn correction(
    billed: &BilledPeriod,
    now: &DraftInvoice,
) -> Result<Option<Correction>, InvoiceError> {
    let current = now.quantities();
    let quantities: Vec<CorrectedQuantity> = billed
        .quantities
        .iter()
        .filter_map(|(charge, name, unit, before)| {
            let after = current.get(charge.as_str()).copied().unwrap_or_default();
            (after != *before).then(|| CorrectedQuantity {
                charge_id: charge.clone(),
                name: name.clone(),
                unit: unit.clone(),
                before: *before,
                after,
            })
        })
        .collect();
    let total_after = now.total_before_corrections()?;
    if quantities.is_empty() && total_after == billed.total {
        return Ok(None);
    }
    let amount = total_after
        .checked_sub(billed.total)
        .ok_or(InvoiceError::Pricing {
            charge: "a correction".into(),
            source: PricingError::Overflow {
                what: "a correction's amount",
            },
        })?;
    Ok(Some(Correction {
        corrects_invoice: billed.number,
        period_start: billed.period_start,
        period_end: billed.period_end,
        quantities,
        total_before: billed.total,
        total_after,
        amount,
    }))
}

/// Why the configuration `after` may not replace `before`: every change that would alter what
/// a finalized (not void) invoice billed, each with what to do instead. Empty when none.
///
/// A finalized invoice froze its content, but a later invoice prices its period anew to correct
/// late usage — with the configuration then in force. So the rate plan it billed, its
/// subscription's account, product, plan and the part of the period it covered, and the
/// workspace's time zone (which places the periods) must stay as they were.
pub fn changes_to_finalized_periods(
    finalized: &[FinalizedInvoice],
    before: &agentmeter_schemas::metering::MeteringConfig,
    after: &agentmeter_schemas::metering::MeteringConfig,
) -> Vec<String> {
    use agentmeter_schemas::catalog::rate_plans;
    let standing: Vec<&DraftInvoice> = finalized
        .iter()
        .filter(|finalized| {
            finalized.void_reason.is_none() && finalized.invoice.workspace_id == after.workspace.id
        })
        .map(|finalized| &finalized.invoice)
        .collect();
    let Some(last) = standing.iter().map(|invoice| invoice.period_end).max() else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    if before.workspace.time_zone != after.workspace.time_zone {
        problems.push(format!(
            "workspace.time_zone: {:?} places the periods of finalized invoices; it cannot change to {:?} (keep it, or void those invoices first)",
            before.workspace.time_zone, after.workspace.time_zone
        ));
    }
    let plan_in =
        |config: &agentmeter_schemas::metering::MeteringConfig, product: &str, plan: &str| {
            rate_plans(&config.products)
                .find(|(p, r)| p.id == product && r.id == plan)
                .map(|(_, r)| r.clone())
        };
    let mut reported_plans = std::collections::BTreeSet::new();
    for invoice in &standing {
        let number = invoice.number.unwrap_or(0);
        let plan_key = (invoice.product.clone(), invoice.rate_plan.clone());
        if plan_in(before, &invoice.product, &invoice.rate_plan)
            != plan_in(after, &invoice.product, &invoice.rate_plan)
            && reported_plans.insert(plan_key)
        {
            problems.push(format!(
                "rate plan {}/{}: finalized invoice {number} (period {} to {}) billed with it, so it cannot change; add a new rate plan instead, end the subscriptions on this one at or after {} and start new ones on the new plan",
                invoice.product,
                invoice.rate_plan,
                invoice.period_start.date(),
                invoice.period_end.date(),
                last.date()
            ));
        }
    }
    // Per subscription: what its finalized invoices billed, from the first to the last.
    let mut billed: std::collections::BTreeMap<&str, Vec<&DraftInvoice>> =
        std::collections::BTreeMap::new();
    for invoice in &standing {
        billed
            .entry(invoice.subscription_id.as_str())
            .or_default()
            .push(invoice);
    }
    for (id, invoices) in billed {
        let first = invoices[0];
        let from = invoices
            .iter()
            .map(|invoice| invoice.from)
            .min()
            .unwrap_or(first.from);
        let to = invoices
            .iter()
            .map(|invoice| invoice.to)
            .max()
            .unwrap_or(first.to);
        let numbers = invoices
            .iter()
            .map(|invoice| invoice.number.unwrap_or(0).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let subscription = after
            .subscriptions
            .iter()
            .find(|subscription| subscription.id == id);
        let problem = match subscription {
            None => Some("it is removed".to_string()),
            Some(subscription) if subscription.account != first.bill_to.account_id => {
                Some(format!("its account becomes {:?}", subscription.account))
            }
            Some(subscription)
                if subscription.product != first.product
                    || subscription.rate_plan != first.rate_plan =>
            {
                Some(format!(
                    "its plan becomes {}/{}",
                    subscription.product, subscription.rate_plan
                ))
            }
            Some(subscription) if subscription.start > from => Some(format!(
                "its start moves to {}, after {from}",
                subscription.start
            )),
            Some(subscription) if subscription.end.is_some_and(|end| end < to) => {
                Some(format!("its end moves before {to}"))
            }
            Some(_) => None,
        };
        if let Some(problem) = problem {
            problems.push(format!(
                "subscription {id}: {problem}, but finalized invoices {numbers} billed it from {from} to {to}; keep it as it was up to {to} and add a new subscription for what changes after that",
            ));
        }
    }
    // Composite outcomes derive what finalized periods billed: their versions in force before
    // the last finalized period's end stay as they were (ADR 0005, "Definition changes").
    let versions_before = |config: &agentmeter_schemas::metering::MeteringConfig, name: &str| {
        config
            .composite_outcomes
            .iter()
            .filter(|composite| {
                composite.name == name && composite.effective_from.is_none_or(|from| from < last)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    // The same for the versions of single-action outcome definitions (their conditions).
    let outcome_versions_before = |config: &agentmeter_schemas::metering::MeteringConfig,
                                   action: &str| {
        config
            .outcomes
            .iter()
            .filter(|outcome| {
                outcome.action == action && outcome.effective_from.is_none_or(|from| from < last)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let actions: std::collections::BTreeSet<&str> = before
        .outcomes
        .iter()
        .chain(&after.outcomes)
        .map(|outcome| outcome.action.as_str())
        .collect();
    for action in actions {
        if outcome_versions_before(before, action) != outcome_versions_before(after, action) {
            problems.push(format!(
                "outcome {action:?}: finalized invoices billed periods up to {last}, so its definition in force before then cannot change; add a version with effective_from at or after {last} instead"
            ));
        }
    }
    let names: std::collections::BTreeSet<&str> = before
        .composite_outcomes
        .iter()
        .chain(&after.composite_outcomes)
        .map(|composite| composite.name.as_str())
        .collect();
    for name in names {
        if versions_before(before, name) != versions_before(after, name) {
            problems.push(format!(
                "composite outcome {name:?}: finalized invoices billed periods up to {last}, so its versions in force before then cannot change; add a version with effective_from at or after {last} instead"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::BillTo;
    use rust_decimal::Decimal;
    use time::macros::datetime;

    fn content(workspace: &str, account: &str, total: i64) -> DraftInvoice {
        DraftInvoice {
            status: "draft".to_string(),
            number: None,
            reissues: None,
            workspace_id: workspace.to_string(),
            bill_to: BillTo {
                account_id: account.to_string(),
                name: account.to_string(),
                email: None,
                address: None,
            },
            subscription_id: format!("sub_{account}"),
            product: "p".to_string(),
            rate_plan: "r".to_string(),
            currency: "USD".to_string(),
            period_start: datetime!(2026-11-01 0:00 UTC),
            period_end: datetime!(2026-12-01 0:00 UTC),
            from: datetime!(2026-11-01 0:00 UTC),
            to: datetime!(2026-12-01 0:00 UTC),
            share: Decimal::ONE,
            lines: Vec::new(),
            subtotal: Decimal::from(total),
            minimum_shortfall: Decimal::ZERO,
            invoice_discounts: Vec::new(),
            corrections: Vec::new(),
            total: Decimal::from(total),
        }
    }

    fn finalize(workspace: &str, account: &str, total: i64) -> LogRecord {
        let invoice = content(workspace, account, total);
        LogRecord::Finalize {
            invoice_id: invoice_id(
                workspace,
                account,
                &invoice.subscription_id,
                invoice.period_start,
            ),
            config_version: 1,
            finalized_at: datetime!(2026-12-04 0:00 UTC),
            invoice: Box::new(invoice),
            cost: CostAtFinalization::default(),
            reissues: None,
        }
    }

    fn numbers(invoices: &[FinalizedInvoice]) -> Vec<(String, String, u64, Decimal)> {
        invoices
            .iter()
            .map(|finalized| {
                (
                    finalized.invoice.workspace_id.clone(),
                    finalized.invoice.bill_to.account_id.clone(),
                    finalized.invoice.number.unwrap(),
                    finalized.invoice.total,
                )
            })
            .collect()
    }

    #[test]
    fn the_first_record_of_an_invoice_wins_and_numbers_have_no_gaps_per_workspace() {
        let log = vec![
            (0, finalize("ws_a", "acme", 10)),
            (1, finalize("ws_b", "zeta", 7)),
            // A second finalizer that computed later (more usage): ignored.
            (2, finalize("ws_a", "acme", 12)),
            (3, finalize("ws_a", "beta", 20)),
            (4, finalize("ws_b", "zeta", 8)),
            (5, finalize("ws_b", "yota", 9)),
        ];
        let invoices = project(log.clone());
        let d = |n: i64| Decimal::from(n);
        assert_eq!(
            numbers(&invoices),
            vec![
                ("ws_a".into(), "acme".into(), 1, d(10)),
                ("ws_b".into(), "zeta".into(), 1, d(7)),
                ("ws_a".into(), "beta".into(), 2, d(20)),
                ("ws_b".into(), "yota".into(), 2, d(9)),
            ]
        );
        assert!(invoices
            .iter()
            .all(|finalized| finalized.invoice.status == "finalized"));
        // A replay gives the same invoices.
        assert_eq!(project(log), invoices);
    }

    #[test]
    fn a_void_keeps_the_number_and_only_the_first_void_of_the_owning_workspace_counts() {
        let acme = finalize("ws_a", "acme", 10);
        let id = acme.invoice_id().to_string();
        let void = |workspace: &str, reason: &str| LogRecord::Void {
            invoice_id: id.clone(),
            workspace_id: workspace.to_string(),
            reason: reason.to_string(),
            voided_at: datetime!(2026-12-05 0:00 UTC),
        };
        let invoices = project(vec![
            (0, acme),
            (1, void("ws_other", "not theirs")),
            (2, void("ws_a", "wrong address")),
            (3, void("ws_a", "again")),
            (4, finalize("ws_a", "beta", 3)),
        ]);
        assert_eq!(invoices[0].invoice.status, "void");
        assert_eq!(invoices[0].invoice.number, Some(1));
        assert_eq!(invoices[0].void_reason.as_deref(), Some("wrong address"));
        assert_eq!((invoices[0].log_offset, invoices[0].version), (0, 2));
        assert_eq!(invoices[1].invoice.number, Some(2));
    }

    fn with_leads(mut invoice: DraftInvoice, leads: i64, start: OffsetDateTime) -> DraftInvoice {
        invoice.period_start = start;
        invoice.period_end = start + time::Duration::days(30);
        invoice.lines = vec![crate::invoice::InvoiceLine {
            charge_id: "leads".into(),
            name: "Leads".into(),
            metric: "@outcome".into(),
            unit: "@outcome".into(),
            model: "per_unit".into(),
            quantity: Decimal::from(leads),
            breakdown: Vec::new(),
            fee: Decimal::ZERO,
            amount: Decimal::from(leads * 50),
            discount: Decimal::ZERO,
        }];
        invoice.total = Decimal::from(leads * 50);
        invoice
    }

    fn finalize_invoice(invoice: DraftInvoice) -> LogRecord {
        LogRecord::Finalize {
            invoice_id: invoice_id(
                &invoice.workspace_id,
                &invoice.bill_to.account_id,
                &invoice.subscription_id,
                invoice.period_start,
            ),
            config_version: 1,
            finalized_at: datetime!(2026-12-04 0:00 UTC),
            invoice: Box::new(invoice),
            cost: CostAtFinalization::default(),
            reissues: None,
        }
    }

    #[test]
    fn late_usage_is_corrected_once_on_the_next_invoice_and_again_only_if_it_changes() {
        let september = datetime!(2026-09-01 0:00 UTC);
        let october = datetime!(2026-10-01 0:00 UTC);
        let november = datetime!(2026-11-01 0:00 UTC);
        let base = content("ws_a", "acme", 0);
        // September billed 2 leads; a late lead arrived; October's invoice corrects September.
        let september_invoice = with_leads(base.clone(), 2, september);
        let mut log = vec![(0, finalize_invoice(september_invoice))];
        let invoices = project(log.clone());
        let billed = billed_periods(&invoices, "ws_a", "sub_acme", october).unwrap();
        assert_eq!(billed.len(), 1);
        assert_eq!(billed[0].total, Decimal::from(100));
        let september_now = with_leads(base.clone(), 3, september);
        let fix = correction(&billed[0], &september_now).unwrap().unwrap();
        assert_eq!((fix.corrects_invoice, fix.amount), (1, Decimal::from(50)));
        assert_eq!(
            (fix.quantities[0].before, fix.quantities[0].after),
            (Decimal::from(2), Decimal::from(3))
        );
        let october_invoice = with_leads(base.clone(), 1, october)
            .with_corrections(vec![fix])
            .unwrap();
        assert_eq!(october_invoice.total, Decimal::from(100));
        assert_eq!(
            october_invoice.total_before_corrections().unwrap(),
            Decimal::from(50)
        );
        log.push((1, finalize_invoice(october_invoice)));
        let invoices = project(log.clone());
        // November: September is billed at 3 now, so nothing more for it unless it changes.
        let billed = billed_periods(&invoices, "ws_a", "sub_acme", november).unwrap();
        assert_eq!(billed.len(), 2);
        assert_eq!(billed[0].quantities[0].3, Decimal::from(3));
        assert_eq!(billed[0].total, Decimal::from(150));
        assert_eq!(
            billed[1].total,
            Decimal::from(50),
            "October without its correction"
        );
        assert_eq!(correction(&billed[0], &september_now).unwrap(), None);
        let again = correction(&billed[0], &with_leads(base.clone(), 4, september))
            .unwrap()
            .unwrap();
        assert_eq!(again.amount, Decimal::from(50));
        // Voiding October's invoice takes its correction back: September is billed at 2 again.
        let october_id = log[1].1.invoice_id().to_string();
        log.push((
            2,
            LogRecord::Void {
                invoice_id: october_id,
                workspace_id: "ws_a".into(),
                reason: "redo".into(),
                voided_at: datetime!(2026-12-05 0:00 UTC),
            },
        ));
        let billed = billed_periods(&project(log), "ws_a", "sub_acme", november).unwrap();
        assert_eq!(billed.len(), 1);
        assert_eq!(billed[0].quantities[0].3, Decimal::from(2));
    }

    #[test]
    fn changes_that_would_alter_a_finalized_period_are_refused_and_others_are_not() {
        use agentmeter_schemas::metering::MeteringConfig;
        let before =
            MeteringConfig::from_toml(include_str!("../../deploy/local/metering.example.toml"))
                .unwrap();
        let subscription = &before.subscriptions[0];
        let plan = crate::invoice::plan_of(&before, subscription).unwrap();
        let november = crate::period::coverage(
            plan,
            subscription,
            datetime!(2026-11-15 0:00 UTC),
            &jiff::tz::TimeZone::UTC,
        )
        .unwrap()
        .unwrap();
        let quantities = plan
            .charges
            .iter()
            .map(|charge| (charge.id.clone(), Decimal::from(3)))
            .collect();
        let invoice = crate::invoice::draft(&before, subscription, &november, &quantities).unwrap();
        let mut log = vec![(0, finalize_invoice(invoice))];
        let finalized = project(log.clone());
        let problems =
            |after: &MeteringConfig| changes_to_finalized_periods(&finalized, &before, after);
        assert!(problems(&before).is_empty());

        let billed_plan = (subscription.product.clone(), subscription.rate_plan.clone());
        let mut repriced = before.clone();
        for product in &mut repriced.products {
            for plan in &mut product.rate_plans {
                if (product.id.clone(), plan.id.clone()) == billed_plan {
                    plan.charges[0].name.push_str(" (renamed)");
                }
            }
        }
        let refused = problems(&repriced);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("add a new rate plan instead"),
            "{refused:?}"
        );

        // Another plan, never billed, may change.
        let mut other = before.clone();
        for product in &mut other.products {
            for plan in &mut product.rate_plans {
                if (product.id.clone(), plan.id.clone()) != billed_plan {
                    plan.charges[0].name.push_str(" (renamed)");
                }
            }
        }
        assert!(problems(&other).is_empty());

        let mut ended = before.clone();
        ended.subscriptions[0].end = Some(datetime!(2026-11-10 0:00 UTC));
        let refused = problems(&ended);
        assert!(refused[0].contains("its end moves before"), "{refused:?}");
        // Ending it after what was billed is how a plan change is made.
        ended.subscriptions[0].end = Some(datetime!(2026-12-01 0:00 UTC));
        assert!(problems(&ended).is_empty());

        let mut moved = before.clone();
        moved.workspace.time_zone = "Europe/Paris".into();
        assert!(problems(&moved)[0].contains("time_zone"));
        let mut removed = before.clone();
        removed.subscriptions.remove(0);
        assert!(problems(&removed)[0].contains("it is removed"));

        // A composite outcome's version in force in the billed period cannot change; a new
        // version from the end of the billed periods on can be added.
        let mut redefined = before.clone();
        redefined.composite_outcomes[0].within = "30m".into();
        let refused = problems(&redefined);
        assert!(
            refused[0].contains("composite outcome \"research_completed\"")
                && refused[0].contains("add a version with effective_from at or after"),
            "{refused:?}"
        );
        let mut versioned = before.clone();
        let mut next = versioned.composite_outcomes[0].clone();
        next.within = "30m".into();
        next.effective_from = Some(datetime!(2026-12-01 0:00 UTC));
        versioned.composite_outcomes.push(next.clone());
        assert!(
            problems(&versioned).is_empty(),
            "{:?}",
            problems(&versioned)
        );
        next.effective_from = Some(datetime!(2026-11-20 0:00 UTC));
        versioned.composite_outcomes[1] = next;
        assert!(!problems(&versioned).is_empty());
        // So is an outcome's condition.
        let mut reconditioned = before.clone();
        reconditioned.outcomes[0].when = None;
        let refused = problems(&reconditioned);
        assert!(
            refused[0].contains("outcome \"object_detection\""),
            "{refused:?}"
        );
        let mut outcome_versioned = before.clone();
        let mut next = outcome_versioned.outcomes[0].clone();
        next.when = None;
        next.effective_from = Some(datetime!(2026-12-01 0:00 UTC));
        outcome_versioned.outcomes.push(next);
        assert!(problems(&outcome_versioned).is_empty());

        // A void invoice bills nothing: nothing is held back by it.
        let id = log[0].1.invoice_id().to_string();
        log.push((
            1,
            LogRecord::Void {
                invoice_id: id,
                workspace_id: before.workspace.id.clone(),
                reason: "test".into(),
                voided_at: datetime!(2026-12-05 0:00 UTC),
            },
        ));
        let voided = project(log);
        assert!(changes_to_finalized_periods(&voided, &before, &repriced).is_empty());
    }

    fn void_of(invoice_id: &str, workspace: &str) -> LogRecord {
        LogRecord::Void {
            invoice_id: invoice_id.to_string(),
            workspace_id: workspace.to_string(),
            reason: "redo".into(),
            voided_at: datetime!(2026-12-05 0:00 UTC),
        }
    }

    /// A reissue of `voided` (an invoice id) with `invoice` as its content.
    fn reissue_of(voided: &str, invoice: DraftInvoice) -> LogRecord {
        LogRecord::Finalize {
            invoice_id: reissue_id(voided),
            config_version: 2,
            finalized_at: datetime!(2026-12-06 0:00 UTC),
            invoice: Box::new(invoice),
            cost: CostAtFinalization::default(),
            reissues: Some(voided.to_string()),
        }
    }

    fn summary(invoices: &[FinalizedInvoice]) -> Vec<(u64, String, Option<u64>, Decimal)> {
        invoices
            .iter()
            .map(|finalized| {
                (
                    finalized.invoice.number.unwrap(),
                    finalized.invoice.status.clone(),
                    finalized.invoice.reissues,
                    finalized.invoice.total,
                )
            })
            .collect()
    }

    #[test]
    fn a_reissue_is_a_new_invoice_with_the_next_number_and_no_gap() {
        let acme = finalize("ws_a", "acme", 10);
        let acme_id = acme.invoice_id().to_string();
        let log = vec![
            (0, acme),
            (1, finalize("ws_a", "beta", 20)),
            (2, finalize("ws_b", "zeta", 7)),
            (3, void_of(&acme_id, "ws_a")),
            (4, reissue_of(&acme_id, content("ws_a", "acme", 11))),
            (5, finalize("ws_b", "yota", 9)),
            (6, finalize("ws_a", "gamma", 30)),
        ];
        let invoices = project(log.clone());
        let d = |n: i64| Decimal::from(n);
        assert_eq!(
            numbers(&invoices),
            vec![
                ("ws_a".into(), "acme".into(), 1, d(10)),
                ("ws_a".into(), "beta".into(), 2, d(20)),
                ("ws_b".into(), "zeta".into(), 1, d(7)),
                ("ws_a".into(), "acme".into(), 3, d(11)),
                ("ws_b".into(), "yota".into(), 2, d(9)),
                ("ws_a".into(), "gamma".into(), 4, d(30)),
            ]
        );
        assert_eq!(invoices[0].invoice.status, "void");
        assert_eq!(invoices[3].invoice.status, "finalized");
        assert_eq!(invoices[3].invoice.reissues, Some(1));
        assert_eq!(invoices[3].reissues.as_deref(), Some(acme_id.as_str()));
        assert_eq!(invoices[3].invoice_id, reissue_id(&acme_id));
        assert!(invoices[3]
            .invoice
            .to_text()
            .contains("replaces void invoice 1"));
        assert!(invoices[3]
            .invoice
            .to_html()
            .contains("Replaces void invoice 1."));
        assert_eq!(project(log), invoices, "a replay gives the same invoices");
    }

    #[test]
    fn a_reissue_of_an_invoice_that_is_not_void_is_ignored() {
        let acme = finalize("ws_a", "acme", 10);
        let acme_id = acme.invoice_id().to_string();
        let beta = finalize("ws_a", "beta", 20);
        let beta_id = beta.invoice_id().to_string();
        let mut forged = reissue_of(&acme_id, content("ws_a", "acme", 13));
        if let LogRecord::Finalize { invoice_id, .. } = &mut forged {
            *invoice_id = "0123456789abcdef0123456789abcdef".into();
        }
        let log = vec![
            // Not finalized yet, then finalized but standing: ignored.
            (0, reissue_of(&acme_id, content("ws_a", "acme", 11))),
            (1, acme),
            (2, reissue_of(&acme_id, content("ws_a", "acme", 12))),
            (3, beta),
            (4, void_of(&acme_id, "ws_a")),
            // Void now, but an id that is not its reissue's, or another period's content.
            (5, forged),
            (6, reissue_of(&acme_id, content("ws_a", "beta", 14))),
            // A void of another workspace does not make beta reissuable.
            (7, void_of(&beta_id, "ws_other")),
            (8, reissue_of(&beta_id, content("ws_a", "beta", 21))),
            // The reissue of acme, appended after the void: taken.
            (9, reissue_of(&acme_id, content("ws_a", "acme", 15))),
        ];
        let invoices = project(log);
        assert_eq!(
            summary(&invoices),
            vec![
                (1, "void".into(), None, Decimal::from(10)),
                (2, "finalized".into(), None, Decimal::from(20)),
                (3, "finalized".into(), Some(1), Decimal::from(15)),
            ]
        );
    }

    #[test]
    fn racing_reissues_of_one_void_invoice_make_one_invoice() {
        let acme = finalize("ws_a", "acme", 10);
        let acme_id = acme.invoice_id().to_string();
        let invoices = project(vec![
            (0, acme),
            (1, void_of(&acme_id, "ws_a")),
            (2, reissue_of(&acme_id, content("ws_a", "acme", 11))),
            // A second reissuer that drafted later (more usage), a retry: both lose.
            (3, reissue_of(&acme_id, content("ws_a", "acme", 12))),
            (4, reissue_of(&acme_id, content("ws_a", "acme", 11))),
            (5, finalize("ws_a", "beta", 20)),
        ]);
        assert_eq!(
            summary(&invoices),
            vec![
                (1, "void".into(), None, Decimal::from(10)),
                (2, "finalized".into(), Some(1), Decimal::from(11)),
                (3, "finalized".into(), None, Decimal::from(20)),
            ]
        );
    }

    #[test]
    fn a_reissue_can_be_voided_and_reissued_in_turn() {
        let acme = finalize("ws_a", "acme", 10);
        let first = acme.invoice_id().to_string();
        let second = reissue_id(&first);
        let third = reissue_id(&second);
        assert_ne!(third, first);
        let invoices = project(vec![
            (0, acme),
            (1, void_of(&first, "ws_a")),
            (2, reissue_of(&first, content("ws_a", "acme", 11))),
            // The first is replaced already: a second reissue of it loses.
            (3, reissue_of(&first, content("ws_a", "acme", 99))),
            (4, void_of(&second, "ws_a")),
            (5, reissue_of(&second, content("ws_a", "acme", 12))),
        ]);
        assert_eq!(
            summary(&invoices),
            vec![
                (1, "void".into(), None, Decimal::from(10)),
                (2, "void".into(), Some(1), Decimal::from(11)),
                (3, "finalized".into(), Some(2), Decimal::from(12)),
            ]
        );
        assert_eq!(invoices[2].invoice_id, third);
        let billed = billed_periods(
            &invoices,
            "ws_a",
            "sub_acme",
            datetime!(2026-12-01 0:00 UTC),
        )
        .unwrap();
        assert_eq!(billed.len(), 1, "one standing invoice of the period");
        assert_eq!((billed[0].number, billed[0].total), (3, Decimal::from(12)));
    }

    /// What the standing invoices of `sub_acme` bill for the period starting at `start`, summed:
    /// (quantity of leads, amount).
    fn billed_for(invoices: &[FinalizedInvoice], start: OffsetDateTime) -> (Decimal, Decimal) {
        let mut quantity = Decimal::ZERO;
        let mut amount = Decimal::ZERO;
        for finalized in invoices.iter().filter(|f| f.void_reason.is_none()) {
            let invoice = &finalized.invoice;
            if invoice.period_start == start {
                quantity += invoice.quantities()["leads"];
                amount += invoice.total_before_corrections().unwrap();
            }
            for fix in invoice
                .corrections
                .iter()
                .filter(|c| c.period_start == start)
            {
                for corrected in &fix.quantities {
                    quantity += corrected.after - corrected.before;
                }
                amount += fix.amount;
            }
        }
        (quantity, amount)
    }

    #[test]
    fn after_a_reissue_its_period_is_billed_once_and_corrected_against_the_reissue() {
        let september = datetime!(2026-09-01 0:00 UTC);
        let october = datetime!(2026-10-01 0:00 UTC);
        let november = datetime!(2026-11-01 0:00 UTC);
        let base = content("ws_a", "acme", 0);
        // September billed 2 leads (#1); October (#2) corrected it to 3.
        let mut log = vec![(0, finalize_invoice(with_leads(base.clone(), 2, september)))];
        let september_id = log[0].1.invoice_id().to_string();
        let billed = billed_periods(&project(log.clone()), "ws_a", "sub_acme", october).unwrap();
        let fix = correction(&billed[0], &with_leads(base.clone(), 3, september))
            .unwrap()
            .unwrap();
        let october_invoice = with_leads(base.clone(), 1, october)
            .with_corrections(vec![fix])
            .unwrap();
        log.push((1, finalize_invoice(october_invoice)));
        assert_eq!(
            billed_for(&project(log.clone()), september),
            (Decimal::from(3), Decimal::from(150))
        );
        // Void September's invoice; nothing bills its own lines now, October's correction stays.
        log.push((2, void_of(&september_id, "ws_a")));
        let invoices = project(log.clone());
        assert_eq!(
            billed_for(&invoices, september),
            (Decimal::from(1), Decimal::from(50))
        );
        // The reissue bills September anew (4 leads now) and takes October's correction back.
        let voided = invoices[0].clone();
        let takeback = reissue_takeback(&invoices, &voided).unwrap().unwrap();
        assert_eq!(
            (
                takeback.corrects_invoice,
                takeback.amount,
                takeback.quantities[0].before,
                takeback.quantities[0].after
            ),
            (1, Decimal::from(-50), Decimal::ONE, Decimal::ZERO)
        );
        let mut reissued = with_leads(base.clone(), 4, september)
            .with_corrections(vec![takeback])
            .unwrap();
        reissued.reissues = Some(1);
        assert_eq!(reissued.total, Decimal::from(150));
        log.push((3, reissue_of(&september_id, reissued)));
        let invoices = project(log.clone());
        assert_eq!(invoices[2].invoice.number, Some(3));
        // Summed over the standing invoices, September is billed exactly its usage now.
        assert_eq!(
            billed_for(&invoices, september),
            (Decimal::from(4), Decimal::from(200))
        );
        // The reissue is September's invoice for the corrections that follow.
        let billed = billed_periods(&invoices, "ws_a", "sub_acme", november).unwrap();
        assert_eq!(billed.len(), 2);
        let september_billed = billed
            .iter()
            .find(|period| period.period_start == september)
            .unwrap();
        assert_eq!(september_billed.number, 3);
        assert_eq!(september_billed.quantities[0].3, Decimal::from(4));
        assert_eq!(september_billed.total, Decimal::from(200));
        let october_billed = billed
            .iter()
            .find(|period| period.period_start == october)
            .unwrap();
        assert_eq!(
            (october_billed.number, october_billed.total),
            (2, Decimal::from(50))
        );
        assert_eq!(
            correction(september_billed, &with_leads(base.clone(), 4, september)).unwrap(),
            None
        );
        let late = correction(september_billed, &with_leads(base.clone(), 5, september))
            .unwrap()
            .unwrap();
        assert_eq!((late.corrects_invoice, late.amount), (3, Decimal::from(50)));
        let november_invoice = with_leads(base.clone(), 0, november)
            .with_corrections(vec![late])
            .unwrap();
        log.push((4, finalize_invoice(november_invoice)));
        let invoices = project(log.clone());
        assert_eq!(
            billed_for(&invoices, september),
            (Decimal::from(5), Decimal::from(250))
        );
        // Void and reissue the reissue: the new one takes back both standing corrections.
        let reissue = invoices[2].invoice_id.clone();
        log.push((5, void_of(&reissue, "ws_a")));
        let invoices = project(log.clone());
        let takeback = reissue_takeback(&invoices, &invoices[2]).unwrap().unwrap();
        assert_eq!(
            (takeback.corrects_invoice, takeback.amount),
            (3, Decimal::from(-100))
        );
        let again = with_leads(base.clone(), 5, september)
            .with_corrections(vec![takeback])
            .unwrap();
        log.push((6, reissue_of(&reissue, again)));
        let invoices = project(log);
        assert_eq!(invoices[4].invoice.number, Some(5));
        assert_eq!(invoices[4].invoice.reissues, Some(3));
        assert_eq!(
            billed_for(&invoices, september),
            (Decimal::from(5), Decimal::from(250))
        );
        // A period without standing corrections has nothing to take back.
        assert_eq!(reissue_takeback(&invoices, &invoices[1]).unwrap(), None);
    }

    #[test]
    fn records_written_before_reissues_and_exchange_rates_read_and_write_byte_for_byte() {
        let old = r#"{"kind":"finalize","invoice_id":"00112233445566778899aabbccddeeff","config_version":3,"finalized_at":"2026-12-04T00:00:00Z","invoice":{"status":"draft","workspace_id":"ws_a","bill_to":{"account_id":"acme","name":"Acme","email":null,"address":null},"subscription_id":"sub_acme","product":"p","rate_plan":"r","currency":"EUR","period_start":"2026-11-01T00:00:00Z","period_end":"2026-12-01T00:00:00Z","from":"2026-11-01T00:00:00Z","to":"2026-12-01T00:00:00Z","share":"1","lines":[],"subtotal":"10","minimum_shortfall":"0","invoice_discounts":[],"total":"10"},"cost":{"agent_type":"t","cost":"1.5","cost_currency":"USD"}}"#;
        let record: LogRecord = serde_json::from_str(old).unwrap();
        let LogRecord::Finalize { cost, reissues, .. } = &record else {
            panic!("{record:?}");
        };
        assert_eq!((cost.exchange_rate, reissues.as_deref()), (None, None));
        assert_eq!(serde_json::to_string(&record).unwrap(), old);
        // With a frozen rate and a reissue, both are written and read back.
        let acme_id = "00112233445566778899aabbccddeeff";
        let mut new = reissue_of(acme_id, content("ws_a", "acme", 10));
        if let LogRecord::Finalize { cost, .. } = &mut new {
            cost.exchange_rate = Some("1.0842".parse().unwrap());
        }
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""exchange_rate":"1.0842""#), "{text}");
        assert!(
            text.contains(&format!(r#""reissues":"{acme_id}""#)),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<LogRecord>(&text).unwrap(), new);
    }

    #[test]
    fn log_records_round_trip_as_json() {
        let record = finalize("ws_a", "acme", 10);
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<LogRecord>(&text).unwrap(), record);
        assert!(serde_json::from_str::<LogRecord>(r#"{"kind":"refund"}"#).is_err());
    }

    #[test]
    fn invoice_ids_differ_by_every_part() {
        let start = datetime!(2026-11-01 0:00 UTC);
        let base = invoice_id("w", "a", "s", start);
        assert_eq!(base.len(), 32);
        assert_ne!(base, invoice_id("w2", "a", "s", start));
        assert_ne!(base, invoice_id("w", "a2", "s", start));
        assert_ne!(base, invoice_id("w", "a", "s2", start));
        assert_ne!(
            base,
            invoice_id("w", "a", "s", datetime!(2026-12-01 0:00 UTC))
        );
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            invoice_id("ab", "c", "s", start),
            invoice_id("a", "bc", "s", start)
        );
        assert_eq!(reissue_id(&base).len(), 32);
        assert_ne!(reissue_id(&base), base);
        assert_ne!(reissue_id(&base), reissue_id(&reissue_id(&base)));
    }
}
