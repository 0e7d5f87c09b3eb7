//! What the control plane reads from ClickHouse, always for the caller's workspace only (the
//! workspace id is bound into every query, never taken from the request): the action names seen
//! (Action Tagging), Live Data, usage per account and per user, and the audit log it also
//! writes.

use agentmeter_schemas::metering::ChangeNote;
use agentmeter_schemas::WorkspaceSnapshot;
use anyhow::Context;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::ConsoleState;

/// One configuration version in the audit log.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct AuditRow {
    pub workspace_id: String,
    pub version: i64,
    /// Seconds since the epoch (UTC).
    pub applied_at: u32,
    pub changed_by: String,
    pub summary_json: String,
}

/// Copies a version's change note into `config_audit` (idempotent: same key, same row).
pub async fn record_audit(
    state: &ConsoleState,
    snapshot: &WorkspaceSnapshot,
) -> anyhow::Result<()> {
    record_change(
        state,
        snapshot.workspace_id(),
        snapshot.version,
        snapshot.applied_at,
        snapshot.change.as_ref(),
    )
    .await
}

/// Writes the audit row of one version.
pub async fn record_change(
    state: &ConsoleState,
    workspace_id: &str,
    version: i64,
    applied_at: time::OffsetDateTime,
    change: Option<&ChangeNote>,
) -> anyhow::Result<()> {
    let (changed_by, summary) = match change {
        Some(change) => (change.by.clone(), change.summary.clone()),
        // Versions published before change notes existed.
        None => ("unknown".to_string(), Vec::new()),
    };
    let row = AuditRow {
        workspace_id: workspace_id.to_string(),
        version,
        applied_at: u32::try_from(applied_at.unix_timestamp()).unwrap_or(0),
        changed_by,
        summary_json: serde_json::to_string(&summary)?,
    };
    let mut insert = state
        .clickhouse
        .insert::<AuditRow>("config_audit")
        .await
        .context("cannot write the audit log")?;
    insert
        .write(&row)
        .await
        .context("cannot write the audit log")?;
    insert.end().await.context("cannot write the audit log")?;
    Ok(())
}

/// The workspace's audit log, newest first.
pub async fn audit_log(state: &ConsoleState, workspace_id: &str) -> anyhow::Result<Vec<AuditRow>> {
    state
        .clickhouse
        .query(
            "SELECT workspace_id, version, toUInt32(applied_at) AS applied_at, changed_by, summary_json \
             FROM config_audit FINAL WHERE workspace_id = ? ORDER BY version DESC LIMIT 1000",
        )
        .bind(workspace_id)
        .fetch_all::<AuditRow>()
        .await
        .context("cannot read the audit log")
}

/// An action name (or auto tag, or trace event) seen in the workspace.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct SeenRow {
    pub name: String,
    pub seen: u64,
    pub last_seen: u32,
}

/// Every name seen, with how often and when last (the Action Tagging tab's discovery).
pub async fn seen_actions(
    state: &ConsoleState,
    workspace_id: &str,
) -> anyhow::Result<Vec<SeenRow>> {
    state
        .clickhouse
        .query(
            "SELECT name, sum(seen) AS seen, max(last) AS last_seen FROM ( \
               SELECT action_name AS name, count() AS seen, toUInt32(max(occurred_at)) AS last \
               FROM actions FINAL WHERE workspace_id = ? AND kind NOT IN ('derived_outcome', 'retracted_outcome') \
               GROUP BY name \
               UNION ALL \
               SELECT trace_event AS name, count() AS seen, toUInt32(max(occurred_at)) AS last \
               FROM actions FINAL WHERE workspace_id = ? AND kind = 'llm' AND trace_event != '' \
               GROUP BY name) \
             GROUP BY name ORDER BY name",
        )
        .bind(workspace_id)
        .bind(workspace_id)
        .fetch_all::<SeenRow>()
        .await
        .context("cannot read the actions seen")
}

/// Live Data filters; every one optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveDataFilter {
    pub account: Option<String>,
    pub user: Option<String>,
    pub action: Option<String>,
    /// RFC 3339, inclusive.
    pub from: Option<String>,
    /// RFC 3339, exclusive.
    pub to: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

/// One Live Data row: the product's columns.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct LiveRow {
    pub event_id: String,
    pub occurred_at_micros: i64,
    pub account_id: String,
    pub agent_instance_id: String,
    pub user_id: String,
    pub kind: String,
    pub action_name: String,
    pub tracked: u8,
    pub outcome: u8,
    pub measure: String,
    pub quantity: String,
    pub cost: String,
    pub currency: String,
}

impl LiveRow {
    /// The product's tag of the row: `@outcome` (an outcome, or a derived one), `@action` (a
    /// tracked action), or nothing (untracked).
    pub fn label(&self) -> &'static str {
        match (self.kind.as_str(), self.tracked, self.outcome) {
            ("derived_outcome", _, _) | (_, 1, 1) => "@outcome",
            (_, 1, _) => "@action",
            _ => "",
        }
    }
}

/// A page of Live Data, newest first. `from_micros`/`to_micros` are the parsed time filters.
pub async fn live_data(
    state: &ConsoleState,
    workspace_id: &str,
    filter: &LiveDataFilter,
    from_micros: i64,
    to_micros: i64,
    limit: u32,
) -> anyhow::Result<Vec<LiveRow>> {
    let mut sql = String::from(
        "SELECT event_id, occurred_at_micros, account_id, agent_instance_id, user_id, kind, action_name, \
                tracked, outcome, measure, toString(quantity) AS quantity_text, toString(cost) AS cost_text, currency \
         FROM actions FINAL \
         WHERE workspace_id = ? AND kind != 'retracted_outcome' AND occurred_at_micros >= ? AND occurred_at_micros < ?",
    );
    for (value, column) in [
        (&filter.account, "account_id"),
        (&filter.user, "user_id"),
        (&filter.action, "action_name"),
    ] {
        if value.is_some() {
            sql.push_str(&format!(" AND {column} = ?"));
        }
    }
    sql.push_str(" ORDER BY occurred_at_micros DESC, event_id LIMIT ? OFFSET ?");
    let mut query = state
        .clickhouse
        .query(&sql)
        .bind(workspace_id)
        .bind(from_micros)
        .bind(to_micros);
    for value in [&filter.account, &filter.user, &filter.action]
        .into_iter()
        .flatten()
    {
        query = query.bind(value.as_str());
    }
    let rows = query
        .bind(limit)
        .bind(filter.offset.unwrap_or(0))
        .fetch_all::<LiveRow>()
        .await
        .context("cannot read Live Data")?;
    Ok(rows)
}

/// Usage of one account (or every account) per action, over [from, to).
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct UsageRow {
    pub account_id: String,
    pub action_name: String,
    pub measure: String,
    pub actions: u64,
    pub quantity: String,
    pub cost: String,
    pub outcomes: u64,
    pub users: u64,
}

pub async fn usage(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
    from_seconds: i64,
    to_seconds: i64,
) -> anyhow::Result<Vec<UsageRow>> {
    narrowed_to_account(
        state,
        "SELECT account_id, action_name, measure, sum(action_count) AS actions_total, \
                toString(sum(quantity)) AS quantity_total, toString(sum(cost)) AS cost_total, \
                sum(outcome_count) AS outcomes_total, uniqExactIf(user_key, user_key != '') AS users_total \
         FROM {usage} workspace_id = ? AND tracked = 1 AND window_start >= toDateTime(?) AND window_start < toDateTime(?)",
        account,
        " GROUP BY account_id, action_name, measure ORDER BY account_id, action_name",
        |query| query.bind(workspace_id).bind(from_seconds).bind(to_seconds),
    )
        .fetch_all::<UsageRow>()
        .await
        .context("cannot read usage")
}

/// Where a usage read scans, put in place of `{usage}` (followed by its conditions). For one
/// account: `usage FINAL` with the conditions as a PREWHERE, so that only the account's rows are
/// read and merged — exact because every condition of these reads is on a sorting-key column
/// (`workspace_id`, `account_id`, `window_start`, `tracked`, `user_key`), so all versions of a
/// key are kept or dropped together (docs/sql.md). For a whole workspace: the `usage_exact`
/// view, whose two FINAL scans run in parallel on 18.16 (migration 0003).
fn usage_scan(account: Option<&str>) -> &'static str {
    match account {
        Some(_) => "usage FINAL PREWHERE",
        None => "usage_exact WHERE",
    }
}

/// The query `head` [`AND account_id = ?`] `tail` (with `{usage}` in `head` replaced by
/// [`usage_scan`]): `bind` binds the parameters of `head`, and the account, when given, is bound
/// after them.
fn narrowed_to_account(
    state: &ConsoleState,
    head: &str,
    account: Option<&str>,
    tail: &str,
    bind: impl FnOnce(clickhouse::query::Query) -> clickhouse::query::Query,
) -> clickhouse::query::Query {
    let mut sql = head.replace("{usage}", usage_scan(account));
    if account.is_some() {
        sql.push_str(" AND account_id = ?");
    }
    sql.push_str(tail);
    let mut query = bind(state.clickhouse.query(&sql));
    if let Some(account) = account {
        query = query.bind(account);
    }
    query
}

/// A decimal as ClickHouse's `toString` writes it, without trailing zeros ("0.005000000000" →
/// "0.005"); the text itself when it is not one.
pub fn normalized(text: &str) -> String {
    text.parse::<Decimal>()
        .map(|value| value.normalize().to_string())
        .unwrap_or_else(|_| text.to_string())
}

/// Cost and actions per day over [from, to), tracked actions only (the Profitability chart).
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct DayRow {
    /// Seconds since the epoch of the day's start (UTC).
    pub day: u32,
    pub actions: u64,
    pub cost: String,
}

pub async fn cost_per_day(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
    from_seconds: i64,
) -> anyhow::Result<Vec<DayRow>> {
    narrowed_to_account(
        state,
        "SELECT toUInt32(toStartOfDay(window_start)) AS day_start, sum(action_count) AS actions_total, \
                toString(sum(cost)) AS cost_total \
         FROM {usage} workspace_id = ? AND tracked = 1 AND window_start >= toDateTime(?)",
        account,
        " GROUP BY day_start ORDER BY day_start",
        |query| query.bind(workspace_id).bind(from_seconds),
    )
        .fetch_all::<DayRow>()
        .await
        .context("cannot read cost per day")
}

/// The heaviest users (by billable actions) since `from`, with their cost.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct UserRow {
    pub account_id: String,
    pub user_key: String,
    pub actions: u64,
    pub cost: String,
}

pub async fn heaviest_users(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
    from_seconds: i64,
) -> anyhow::Result<Vec<UserRow>> {
    narrowed_to_account(
        state,
        "SELECT account_id, user_key, sum(action_count) AS actions_total, toString(sum(cost)) AS cost_total \
         FROM {usage} workspace_id = ? AND tracked = 1 AND user_key != '' AND window_start >= toDateTime(?)",
        account,
        " GROUP BY account_id, user_key ORDER BY actions_total DESC, user_key LIMIT 10",
        |query| query.bind(workspace_id).bind(from_seconds),
    )
        .fetch_all::<UserRow>()
        .await
        .context("cannot read the heaviest users")
}

/// An invoice as the Billing page lists it.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct InvoiceListRow {
    pub invoice_id: String,
    pub number: u64,
    pub status: String,
    pub account_id: String,
    pub rate_plan: String,
    pub agent_type: String,
    pub period_start: u32,
    pub currency: String,
    pub total: String,
    pub cost: String,
    pub margin: String,
}

pub async fn invoices(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
) -> anyhow::Result<Vec<InvoiceListRow>> {
    narrowed_to_account(
        state,
        "SELECT invoice_id, number, status, account_id, rate_plan, agent_type, toUInt32(period_start) AS start_seconds, currency, \
                toString(total) AS total_text, toString(cost) AS cost_text, ifNull(toString(margin), '') AS margin_text \
         FROM invoices FINAL WHERE workspace_id = ?",
        account,
        " ORDER BY start_seconds DESC, number DESC LIMIT 500",
        |query| query.bind(workspace_id),
    )
        .fetch_all::<InvoiceListRow>()
        .await
        .context("cannot read invoices")
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ContentRow {
    content: String,
}

/// The stored invoice document (JSON of the billing crate's invoice) of one invoice.
pub async fn invoice_content(
    state: &ConsoleState,
    workspace_id: &str,
    invoice_id: &str,
) -> anyhow::Result<Option<String>> {
    let rows = state
        .clickhouse
        .query(
            "SELECT content FROM invoices FINAL WHERE workspace_id = ? AND invoice_id = ? LIMIT 1",
        )
        .bind(workspace_id)
        .bind(invoice_id)
        .fetch_all::<ContentRow>()
        .await
        .context("cannot read the invoice")?;
    Ok(rows.into_iter().next().map(|row| row.content))
}

/// An account's @user of this calendar month and @seat of today (UTC), as the
/// `users_by_account_month` and `seats_by_account_day` views count them.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct UsersAndSeats {
    pub users_this_month: u64,
    pub seats_today: u64,
}

pub async fn users_and_seats(
    state: &ConsoleState,
    workspace_id: &str,
    account: &str,
) -> anyhow::Result<UsersAndSeats> {
    state
        .clickhouse
        .query(
            "SELECT uniqExactIf(user_key, window_start >= toStartOfMonth(now())) AS users_month, \
                    uniqExactIf(user_key, toDate(window_start) >= today() - 29) AS seats_day \
             FROM usage FINAL \
             PREWHERE workspace_id = ? AND account_id = ? AND tracked = 1 AND user_key != '' \
               AND toDate(window_start) >= today() - 31",
        )
        .bind(workspace_id)
        .bind(account)
        .fetch_one::<UsersAndSeats>()
        .await
        .context("cannot read users and seats")
}

/// Revenue, cost and margin of the finalized invoices, per group and currency (exact sums in
/// ClickHouse; revenue is in the invoice's currency, cost and margin in the workspace's).
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct RevenueRow {
    pub group_key: String,
    pub currency: String,
    pub invoices: u64,
    pub revenue: String,
    pub cost: String,
    /// Of the invoices whose margin is known; empty when none is.
    pub margin: String,
    /// Invoices whose margin is unknown (no exchange rate for their currency).
    pub without_margin: u64,
}

/// How [`revenue`] groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevenueGroup {
    Account,
    AgentType,
    RatePlan,
    Month,
}

impl RevenueGroup {
    /// The column expression (one of four fixed texts, never from the request).
    fn expression(self) -> &'static str {
        match self {
            RevenueGroup::Account => "account_id",
            RevenueGroup::AgentType => "agent_type",
            RevenueGroup::RatePlan => "rate_plan",
            RevenueGroup::Month => "substring(toString(toStartOfMonth(period_start)), 1, 7)",
        }
    }
}

pub async fn revenue(
    state: &ConsoleState,
    workspace_id: &str,
    group: RevenueGroup,
) -> anyhow::Result<Vec<RevenueRow>> {
    let sql = format!(
        "SELECT {} AS group_value, currency, count() AS invoice_count, toString(sum(total)) AS revenue_total, \
                toString(sum(cost)) AS cost_total, ifNull(toString(sum(margin)), '') AS margin_total, \
                countIf(isNull(margin)) AS unknown_margins \
         FROM invoices FINAL WHERE workspace_id = ? AND status = 'finalized' \
         GROUP BY group_value, currency ORDER BY group_value, currency",
        group.expression()
    );
    let rows = state
        .clickhouse
        .query(&sql)
        .bind(workspace_id)
        .fetch_all::<RevenueRow>()
        .await
        .context("cannot read revenue")?;
    Ok(rows)
}
