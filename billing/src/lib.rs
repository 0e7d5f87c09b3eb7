//! Billing: what the charges of a rate plan make of a period's exact usage (issue 10,
//! docs/billing.md).
//!
//! Layout:
//! * [`pricing`] — the pure part: each charge model of `agentmeter_schemas::catalog` turns a
//!   quantity into an exact amount with its tier breakdown; a line is rounded once, to the
//!   currency's minor unit; charge discounts, the minimum commitment and invoice discounts make
//!   the total. Every operation on amounts is checked: an overflow is an error, never a
//!   wrap-around or a silent rounding.
//!
//! * [`period`] — billing periods of a subscription (calendar or anniversary, monthly to
//!   annual, in the workspace time zone) and the share of a period it covers, which prorates fees.
//!
//! * [`invoice`] — a draft invoice of one subscription and period from the period's quantity
//!   per charge (read from ClickHouse by `agentmeter invoices preview`), as JSON or text.
//!
//! * [`finalization`] — finalized invoices as a pure function of the finalization log (ADR 0004):
//!   the first record of an invoice wins, numbers are log positions per workspace, voids keep
//!   the number; and late usage of finalized periods as corrections on the next invoice. The
//!   topic and the ClickHouse table around it are in `src/invoice_log.rs`. A void invoice may
//!   be reissued: a new invoice of the same period, with the next number.
//!
//! * [`exchange`] — the margin of an invoice in the cost currency, through the effective-dated
//!   exchange rate of its plan's currency in force at its period end.

pub mod exchange;
pub mod finalization;
pub mod invoice;
pub mod period;
pub mod pricing;
