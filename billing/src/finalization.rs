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
//! * the first `Void` of a finalized invoice marks it void; it keeps its number and its content.
//!
//! The projection is a pure function of the log, so the rows written from it are identical on
//! every replay. The I/O (the topic, the ClickHouse table) is in `src/invoices_cmd.rs`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::invoice::DraftInvoice;

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
            } => {
                if position_by_id.contains_key(&invoice_id) {
                    continue;
                }
                let mut invoice = *invoice;
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
    }
}
