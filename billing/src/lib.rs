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
//! Not here yet (docs/billing.md, "What is built"): periods and proration from subscriptions,
//! invoices from ClickHouse usage, finalization (ADR 0004), revenue and margin.

pub mod pricing;
