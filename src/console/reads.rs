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
use crate::outcomes_stage::DERIVED_PARTITION;

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

/// Every name seen, with how often and when last (the Action Tagging tab's discovery): the
/// action names, and the trace events of LLM calls, counted in `usage_daily` (ADR 0008).
pub async fn seen_actions(
    state: &ConsoleState,
    workspace_id: &str,
) -> anyhow::Result<Vec<SeenRow>> {
    state
        .clickhouse
        .query(
            "SELECT name, sum(seen) AS seen_total, max(last) AS last_seen FROM ( \
               SELECT action_name AS name, sum(action_count) AS seen, toUInt32(max(last_seen)) AS last \
               FROM usage_daily FINAL PREWHERE workspace_id = ? \
               GROUP BY name \
               UNION ALL \
               SELECT trace_event AS name, sum(action_count) AS seen, toUInt32(max(last_seen)) AS last \
               FROM usage_daily FINAL PREWHERE workspace_id = ? WHERE trace_event != '' \
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

/// The first look-back of a Live Data page: the hour before the newest action of the filter.
const LIVE_DATA_FIRST_LOOK_BACK_SECONDS: i64 = 3_600;
/// How much each further look-back widens the previous one.
const LIVE_DATA_LOOK_BACK_GROWTH: i64 = 16;

/// A page of Live Data, newest first. `from_micros`/`to_micros` are the parsed time filters.
///
/// `actions FINAL` over a whole workspace merges every row it has (seconds on a month of ten
/// million), so the page is looked for in a window that ends at the newest action of the
/// filter and widens (an hour, then 16 times more each time) until it holds the whole page or
/// reaches `from`. The window's lower bound is a PREWHERE on `occurred_at` — a sorting-key
/// column, so every version of a row is kept or dropped together and FINAL stays exact — and a
/// window holding a full page holds the newest rows of the whole range, because every row
/// outside it is older than every row inside. The last window is the whole range, so the answer
/// is always the one the unbounded query gives.
pub async fn live_data(
    state: &ConsoleState,
    workspace_id: &str,
    filter: &LiveDataFilter,
    from_micros: i64,
    to_micros: i64,
    limit: u32,
) -> anyhow::Result<Vec<LiveRow>> {
    // `occurred_at` is `occurred_at_micros` in whole seconds, clamped to a DateTime.
    let from_seconds = from_micros
        .div_euclid(1_000_000)
        .clamp(0, i64::from(u32::MAX));
    let to_seconds = to_micros
        .div_euclid(1_000_000)
        .clamp(0, i64::from(u32::MAX));
    let mut key_conditions = String::from(
        "workspace_id = ? AND occurred_at >= toDateTime(?) AND occurred_at <= toDateTime(?)",
    );
    if filter.account.is_some() {
        key_conditions.push_str(" AND account_id = ?");
    }
    let bind_key = |query: clickhouse::query::Query, lower: i64| {
        let query = query.bind(workspace_id).bind(lower).bind(to_seconds);
        match &filter.account {
            Some(account) => query.bind(account.as_str()),
            None => query,
        }
    };
    // An upper bound of the newest second (no FINAL: every version of a row has its time).
    let newest: u32 = bind_key(
        state.clickhouse.query(&format!(
            "SELECT toUInt32(max(occurred_at)) FROM actions PREWHERE {key_conditions}"
        )),
        from_seconds,
    )
    .fetch_one()
    .await
    .context("cannot read Live Data")?;
    let mut sql = format!(
        "SELECT event_id, occurred_at_micros, account_id, agent_instance_id, user_id, kind, action_name, \
                tracked, outcome, measure, toString(quantity) AS quantity_text, toString(cost) AS cost_text, currency \
         FROM actions FINAL PREWHERE {key_conditions} \
         WHERE kind != 'retracted_outcome' AND occurred_at_micros >= ? AND occurred_at_micros < ?"
    );
    for (value, column) in [(&filter.user, "user_id"), (&filter.action, "action_name")] {
        if value.is_some() {
            sql.push_str(&format!(" AND {column} = ?"));
        }
    }
    sql.push_str(" ORDER BY occurred_at_micros DESC, event_id LIMIT ? OFFSET ?");
    let mut look_back = LIVE_DATA_FIRST_LOOK_BACK_SECONDS;
    loop {
        let lower = (i64::from(newest) - look_back).max(from_seconds);
        let mut query = bind_key(state.clickhouse.query(&sql), lower)
            .bind(from_micros)
            .bind(to_micros);
        for value in [&filter.user, &filter.action].into_iter().flatten() {
            query = query.bind(value.as_str());
        }
        let rows = query
            .bind(limit)
            .bind(filter.offset.unwrap_or(0))
            .fetch_all::<LiveRow>()
            .await
            .context("cannot read Live Data")?;
        if rows.len() >= limit as usize || lower <= from_seconds {
            return Ok(rows);
        }
        look_back = look_back.saturating_mul(LIVE_DATA_LOOK_BACK_GROWTH);
    }
}

/// The whole UTC days `[from, to)` of a usage read (seconds since the epoch, `from` a day's
/// start; `to` a day's start or [`Days::UNBOUNDED`]). The rollups hold whole days only, so a
/// read never asks for less (ADR 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days {
    from: i64,
    to: i64,
}

impl Days {
    /// No upper bound.
    pub const UNBOUNDED: i64 = u32::MAX as i64;

    /// Every day there is.
    pub const ALL: Days = Days {
        from: 0,
        to: Days::UNBOUNDED,
    };

    /// The days from the one starting at `from` (inclusive) to the one starting at `to`
    /// (exclusive, or [`Days::UNBOUNDED`]), clamped to what a DateTime holds; `None` when a bound
    /// is not the start of a UTC day.
    pub fn new(from: i64, to: i64) -> Option<Days> {
        let from = from.clamp(0, Days::UNBOUNDED);
        let to = to.clamp(0, Days::UNBOUNDED);
        let day_start = |seconds: i64| seconds.rem_euclid(86_400) == 0;
        (day_start(from) && (day_start(to) || to == Days::UNBOUNDED)).then_some(Days { from, to })
    }

    /// From the day starting at `from` on.
    pub fn since(from: i64) -> Option<Days> {
        Days::new(from, Days::UNBOUNDED)
    }
}

/// Which rollup a read adds up.
#[derive(Debug, Clone, Copy)]
enum Rollup {
    /// `usage_daily`: per day, account and action.
    Actions,
    /// `users_daily`: per day, account and user.
    Users,
}

impl Rollup {
    /// The rows a read adds up, as a subquery: the rollup's and, when `derived`, the derived
    /// outcomes' usage (ADR 0005), which `agentmeter outcomes` writes into `usage` only, shaped
    /// like them. Every condition is a PREWHERE on sorting-key columns (workspace, account, day
    /// or window, source partition), so FINAL keeps or drops every version of a key together and
    /// stays exact (docs/sql.md). Bind with [`rollup_query`].
    fn source(self, account: bool, derived: bool) -> String {
        let (table, columns, derived_columns) = match self {
            Rollup::Actions => (
                "usage_daily",
                "day, account_id, action_name, trace_event, measure, tracked, outcome, \
                 action_count, quantity, cost, outcome_count, last_seen",
                "toStartOfDay(window_start) AS day, account_id, action_name, '' AS trace_event, measure, \
                 tracked, outcome, action_count, quantity, cost, outcome_count, last_seen",
            ),
            Rollup::Users => (
                "users_daily",
                "day, account_id, user_key, tracked, action_count, quantity, cost, outcome_count, last_seen",
                "toStartOfDay(window_start) AS day, account_id, user_key, tracked, action_count, \
                 quantity, cost, outcome_count, last_seen",
            ),
        };
        let account = if account { " AND account_id = ?" } else { "" };
        let rollup = format!(
            "SELECT {columns} FROM {table} FINAL \
               PREWHERE workspace_id = ? AND day >= toDateTime(?) AND day < toDateTime(?){account}"
        );
        if !derived {
            return format!("({rollup})");
        }
        format!(
            "({rollup} \
             UNION ALL \
             SELECT {derived_columns} FROM usage FINAL \
               PREWHERE workspace_id = ? AND source_partition = {DERIVED_PARTITION} \
                 AND window_start >= toDateTime(?) AND window_start < toDateTime(?){account})"
        )
    }
}

/// Whether `agentmeter outcomes` has derived for the workspace: it records a fingerprint of
/// every workspace that has or had composite definitions with each run's progress, after the
/// rows. Without one there are no derived rows to add (bar those of a first run that crashed
/// before its progress, which the next run writes again), and a read skips the scan of
/// `usage` for them — on a month of ten million rows, most of a read's time.
async fn derived_outcomes_written(
    state: &ConsoleState,
    workspace_id: &str,
) -> anyhow::Result<bool> {
    let count: u64 = state
        .clickhouse
        .query("SELECT count() FROM outcomes_progress WHERE key = ?")
        .bind(format!("workspace:{workspace_id}"))
        .fetch_one()
        .await
        .context("cannot read the outcomes stage's progress")?;
    Ok(count > 0)
}

/// `sql` with `{source}` replaced by [`Rollup::source`] for the workspace (the derived
/// outcomes' rows included when [`derived_outcomes_written`]), its parameters bound; `{source}`
/// must come before any other `?` of `sql`.
async fn rollup_query(
    state: &ConsoleState,
    rollup: Rollup,
    sql: &str,
    workspace_id: &str,
    account: Option<&str>,
    days: Days,
) -> anyhow::Result<clickhouse::query::Query> {
    let derived = derived_outcomes_written(state, workspace_id).await?;
    let sql = sql.replace("{source}", &rollup.source(account.is_some(), derived));
    let mut query = state.clickhouse.query(&sql);
    for _branch in 0..(1 + usize::from(derived)) {
        query = query.bind(workspace_id).bind(days.from).bind(days.to);
        if let Some(account) = account {
            query = query.bind(account);
        }
    }
    Ok(query)
}

/// Usage of one account (or every account) per action, over whole days.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct UsageRow {
    pub account_id: String,
    pub action_name: String,
    pub measure: String,
    pub actions: u64,
    pub quantity: String,
    pub cost: String,
    pub outcomes: u64,
}

pub async fn usage(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
    days: Days,
) -> anyhow::Result<Vec<UsageRow>> {
    rollup_query(
        state,
        Rollup::Actions,
        "SELECT account_id, action_name, measure, sum(action_count) AS actions_total, \
                toString(sum(quantity)) AS quantity_total, toString(sum(cost)) AS cost_total, \
                sum(outcome_count) AS outcomes_total \
         FROM {source} WHERE tracked = 1 \
         GROUP BY account_id, action_name, measure ORDER BY account_id, action_name",
        workspace_id,
        account,
        days,
    )
    .await?
    .fetch_all::<UsageRow>()
    .await
    .context("cannot read usage")
}

/// The users with tracked actions of one account (or every account) over whole days.
#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct AccountUsersRow {
    pub account_id: String,
    pub users: u64,
}

pub async fn users_per_account(
    state: &ConsoleState,
    workspace_id: &str,
    account: Option<&str>,
    days: Days,
) -> anyhow::Result<Vec<AccountUsersRow>> {
    rollup_query(
        state,
        Rollup::Users,
        "SELECT account_id, uniqExact(user_key) AS users_total \
         FROM {source} WHERE tracked = 1 AND user_key != '' \
         GROUP BY account_id ORDER BY account_id",
        workspace_id,
        account,
        days,
    )
    .await?
    .fetch_all::<AccountUsersRow>()
    .await
    .context("cannot read the users per account")
}

/// The query `head` [`AND account_id = ?`] `tail`: `bind` binds the parameters of `head`, and
/// the account, when given, is bound after them.
fn narrowed_to_account(
    state: &ConsoleState,
    head: &str,
    account: Option<&str>,
    tail: &str,
    bind: impl FnOnce(clickhouse::query::Query) -> clickhouse::query::Query,
) -> clickhouse::query::Query {
    let mut sql = head.to_string();
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

/// Cost and actions per day, tracked actions only (the Profitability chart).
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
    days: Days,
) -> anyhow::Result<Vec<DayRow>> {
    rollup_query(
        state,
        Rollup::Actions,
        "SELECT toUInt32(day) AS day_start, sum(action_count) AS actions_total, \
                toString(sum(cost)) AS cost_total \
         FROM {source} WHERE tracked = 1 GROUP BY day_start ORDER BY day_start",
        workspace_id,
        account,
        days,
    )
    .await?
    .fetch_all::<DayRow>()
    .await
    .context("cannot read cost per day")
}

/// The heaviest users (by billable actions) over whole days, with their cost.
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
    days: Days,
) -> anyhow::Result<Vec<UserRow>> {
    rollup_query(
        state,
        Rollup::Users,
        "SELECT account_id, user_key, sum(action_count) AS actions_total, toString(sum(cost)) AS cost_total \
         FROM {source} WHERE tracked = 1 AND user_key != '' \
         GROUP BY account_id, user_key ORDER BY actions_total DESC, user_key LIMIT 10",
        workspace_id,
        account,
        days,
    )
    .await?
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
    // The 31 days before today cover this month and the last 30 days.
    let today = time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .div_euclid(86_400)
        * 86_400;
    let days = Days::since(today - 31 * 86_400).context("a day's start is one")?;
    rollup_query(
        state,
        Rollup::Users,
        "SELECT uniqExactIf(user_key, day >= toStartOfMonth(now())) AS users_month, \
                uniqExactIf(user_key, toDate(day) >= today() - 29) AS seats_day \
         FROM {source} WHERE tracked = 1 AND user_key != ''",
        workspace_id,
        Some(account),
        days,
    )
    .await?
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
