//! The console's pages. Every page is rendered from the configuration version this process
//! follows and from ClickHouse reads of the caller's workspace; every form carries that
//! version and the session's CSRF token. A successful form redirects back with `?saved=1`
//! (Post/Redirect/Get, so a reload never posts twice) and the page shows "Saved"; a refused one
//! renders the same page again with the status and the message that names the field.

use agentmeter_billing::invoice::DraftInvoice;
use agentmeter_schemas::catalog::{Product, Subscription};
use agentmeter_schemas::metering::{hash_secret, Account, AgentType};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup, DOCTYPE};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::chart::{self, Bar};
use super::{web_caller, web_writer, WebCaller};
use crate::console::edits::{self, NewInstance, NewRate};
use crate::console::error::ApiError;
use crate::console::reads::{self, normalized, Days, LiveDataFilter, LiveRow, RevenueGroup};
use crate::console::write::write_at;
use crate::console::ConsoleState;

/// Live Data rows per page (and per refresh).
const LIVE_DATA_ROWS: u32 = 50;

/// What a page says above its content.
pub enum Notice {
    None,
    Saved,
    Error(String),
}

impl Notice {
    fn from_query(query: &PageQuery) -> Notice {
        if query.saved.is_some() {
            Notice::Saved
        } else {
            Notice::None
        }
    }
}

/// The query string every page accepts.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    saved: Option<String>,
}

/// The sections of the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    LiveData,
    Tagging,
    Costs,
    Outcomes,
    Accounts,
    Agents,
    Billing,
    Profitability,
    Audit,
}

impl Section {
    fn is_metering(self) -> bool {
        matches!(
            self,
            Section::LiveData | Section::Tagging | Section::Costs | Section::Outcomes
        )
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · agentmeter" }
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

fn layout(
    title: &str,
    web: &WebCaller,
    section: Section,
    notice: &Notice,
    content: Markup,
) -> Markup {
    let workspace = &web.caller.workspace.config.workspace;
    let nav = [
        (Section::LiveData, "/metering/live-data", "Metering"),
        (Section::Accounts, "/accounts", "Accounts"),
        (Section::Agents, "/agents", "Agents"),
        (Section::Billing, "/billing", "Billing"),
        (Section::Profitability, "/profitability", "Profitability"),
        (Section::Audit, "/audit", "Audit log"),
    ];
    let tabs = [
        (Section::LiveData, "/metering/live-data", "Live Data"),
        (Section::Tagging, "/metering/tagging", "Action Tagging"),
        (Section::Costs, "/metering/costs", "Cost Allocation"),
        (
            Section::Outcomes,
            "/metering/outcomes",
            "Outcome Definitions",
        ),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/" { "agentmeter" }
                    nav {
                        @for (target, href, label) in nav {
                            @let active = target == section || (target == Section::LiveData && section.is_metering());
                            a href=(href) class=[active.then_some("active")] { (label) }
                        }
                    }
                    div.who {
                        span.workspace title=(workspace.id) { (workspace.name) }
                        span.key { (web.caller.key.name) " · " (role_name(web)) }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(web.csrf);
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    @if section.is_metering() {
                        h1 { "Metering" }
                        nav.tabs {
                            @for (target, href, label) in tabs {
                                a href=(href) class=[(target == section).then_some("active")] { (label) }
                            }
                        }
                    } @else {
                        h1 { (title) }
                    }
                    @match notice {
                        Notice::None => {},
                        Notice::Saved => p.notice.saved role="status" { "Saved" },
                        Notice::Error(message) => p.notice.error role="alert" { (message) },
                    }
                    (content)
                }
            }
        }
    }
}

fn role_name(web: &WebCaller) -> &'static str {
    match web.caller.key.role {
        agentmeter_schemas::metering::AdminRole::Admin => "admin",
        agentmeter_schemas::metering::AdminRole::ReadOnly => "read-only",
    }
}

/// The hidden fields of every form: the version it was rendered from and the CSRF token.
fn form_guard(web: &WebCaller) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(web.csrf);
        input type="hidden" name="version" value=(web.caller.workspace.version);
    }
}

/// A page outside the session (login, errors).
fn bare(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare {
                main.narrow {
                    p.brand { "agentmeter" }
                    (content)
                }
            }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    bare(
        "Log in",
        html! {
            h1 { "Log in to your workspace" }
            @if let Some(error) = error {
                p.notice.error role="alert" { (error) }
            }
            form #key-form method="post" action="/login" {
                label for="key" { "Admin key" }
                input #key type="password" name="key" autocomplete="current-password" required placeholder="amk_…";
                button type="submit" { "Log in" }
            }
            p.or { "or" }
            form #password-form method="post" action="/login" {
                label for="workspace" { "Workspace id" }
                input #workspace type="text" name="workspace" autocomplete="organization" required;
                label for="login" { "Email" }
                input #login type="email" name="login" autocomplete="username" required;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button type="submit" { "Log in with a password" }
            }
            p.hint {
                "An admin key or a login belongs to one workspace. An admin makes a key with "
                code { "agentmeter admin-key new --workspace <id> --name <you>" }
                " (printed once), or a login with "
                code { "… --login <email>" }
                " (the password read from standard input)."
            }
        },
    )
}

pub fn message_page(title: &str, text: &str) -> Markup {
    bare(
        title,
        html! {
            h1 { (title) }
            p { (text) }
            p { a href="/" { "Back to the console" } }
        },
    )
}

pub fn not_found_page() -> Markup {
    message_page(
        "Not found",
        "There is no such page, or nothing with that id in your workspace.",
    )
}

fn when(seconds: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(at) => format!(
            "{} {:02}:{:02}:{:02}",
            at.date(),
            at.hour(),
            at.minute(),
            at.second()
        ),
        Err(_) => String::new(),
    }
}

fn day(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map(|at| at.date().to_string())
        .unwrap_or_default()
}

/// A decimal ClickHouse wrote. The pages add such amounts up for display only (saturating, so
/// no value can make a page fail); the exact sums billing uses are computed where it bills.
fn decimal(text: &str) -> Decimal {
    text.parse().unwrap_or_default()
}

/// A read that failed: shown where its content would have been.
fn unavailable(what: &str, error: &anyhow::Error) -> Markup {
    html! { p.notice.error role="alert" { "Cannot read " (what) " right now: " (format!("{error:#}")) } }
}

macro_rules! logged_in {
    ($state:expr, $headers:expr) => {
        match web_caller(&$state, &$headers) {
            Ok(web) => web,
            Err(response) => return *response,
        }
    };
}

macro_rules! writer {
    ($state:expr, $headers:expr, $csrf:expr) => {
        match web_writer(&$state, &$headers, $csrf) {
            Ok(web) => web,
            Err(response) => return *response,
        }
    };
}

/// The answer to a form: back to `page` with "Saved", or the page again with the error.
async fn after_write<T, F, Fut>(result: Result<T, ApiError>, page: &str, rerender: F) -> Response
where
    F: FnOnce(Notice) -> Fut,
    Fut: std::future::Future<Output = Markup>,
{
    match result {
        Ok(_) => Redirect::to(&format!("{page}?saved=1")).into_response(),
        Err(error) => (error.status, rerender(Notice::Error(error.message)).await).into_response(),
    }
}

// ---- Metering: Live Data

#[derive(Debug, Default, Deserialize)]
pub struct LiveDataQuery {
    #[serde(default)]
    account: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    action: String,
    saved: Option<String>,
}

impl LiveDataQuery {
    fn filter(&self) -> LiveDataFilter {
        let given = |text: &str| Some(text.trim().to_string()).filter(|text| !text.is_empty());
        LiveDataFilter {
            account: given(&self.account),
            user: given(&self.user),
            action: given(&self.action),
            limit: Some(LIVE_DATA_ROWS),
            ..LiveDataFilter::default()
        }
    }
}

async fn live_rows(state: &ConsoleState, web: &WebCaller, query: &LiveDataQuery) -> Markup {
    let rows = reads::live_data(
        state,
        web.caller.workspace.workspace_id(),
        &query.filter(),
        i64::MIN,
        i64::MAX,
        LIVE_DATA_ROWS,
    )
    .await;
    match rows {
        Err(error) => html! { tr { td colspan="9" { (unavailable("Live Data", &error)) } } },
        Ok(rows) if rows.is_empty() => html! {
            tr.empty { td colspan="9" {
                "No actions yet. Create an agent instance on the "
                a href="/agents" { "Agents" } " page and send actions with its secret; they appear here within seconds."
            } }
        },
        Ok(rows) => html! { @for row in &rows { (live_row(row)) } },
    }
}

fn live_row(row: &LiveRow) -> Markup {
    let label = row.label();
    html! {
        tr data-event=(row.event_id) {
            td.time { (when(row.occurred_at_micros.div_euclid(1_000_000))) }
            td { (row.account_id) }
            td { (row.agent_instance_id) }
            td { (row.user_id) }
            td { (row.action_name) }
            td { @if !label.is_empty() { span.label { (label) } } }
            td { (row.measure) }
            td.number { @if row.tracked == 1 { (normalized(&row.quantity)) } }
            td.number.cost { @if row.tracked == 1 { (normalized(&row.cost)) " " (row.currency) } }
        }
    }
}

pub async fn live_data(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<LiveDataQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    let notice = if query.saved.is_some() {
        Notice::Saved
    } else {
        Notice::None
    };
    let rows = live_rows(&state, &web, &query).await;
    let accounts = &web.caller.workspace.config.accounts;
    let content = html! {
        form.filters method="get" action="/metering/live-data" {
            label { "Account "
                select name="account" {
                    option value="" { "All" }
                    @for account in accounts {
                        option value=(account.id) selected[account.id == query.account] { (account.name) }
                    }
                }
            }
            label { "User " input type="text" name="user" value=(query.user); }
            label { "Action " input type="text" name="action" value=(query.action); }
            button type="submit" { "Filter" }
        }
        p.hint { "The newest " (LIVE_DATA_ROWS) " events; this table refreshes itself every 3 seconds. Cost is shown for tracked actions." }
        table.data #live-data {
            thead { tr {
                th { "Time (UTC)" } th { "Account" } th { "Agent" } th { "User" } th { "Action" }
                th { "Tag" } th { "Measure" } th.number { "Quantity" } th.number { "Cost" }
            } }
            tbody data-refresh="/metering/live-data/rows" { (rows) }
        }
    };
    layout("Live Data", &web, Section::LiveData, &notice, content).into_response()
}

/// The rows of the Live Data table alone, for the page's script to swap in.
pub async fn live_data_rows(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<LiveDataQuery>,
) -> Response {
    let Ok(web) = web_caller(&state, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    Html(live_rows(&state, &web, &query).await.into_string()).into_response()
}

// ---- Metering: Action Tagging

async fn render_tagging(state: &ConsoleState, web: &WebCaller, notice: Notice) -> Markup {
    let snapshot = &web.caller.workspace;
    let seen = reads::seen_actions(state, snapshot.workspace_id()).await;
    let content = match seen {
        Err(error) => unavailable("the actions seen", &error),
        Ok(seen) => {
            let mut names: Vec<(String, u64, Option<u32>)> = seen
                .iter()
                .map(|row| (row.name.clone(), row.seen, Some(row.last_seen)))
                .collect();
            for name in &snapshot.config.tagging.tracked {
                if !names.iter().any(|(seen, _, _)| seen == name) {
                    names.push((name.clone(), 0, None));
                }
            }
            html! {
                p.hint { "Every action name, trace event and auto tag your agents sent. Only tracked ones are metered, priced and billed; the rest stay in Live Data." }
                @if names.is_empty() {
                    p.empty { "Nothing seen yet. Send actions from an agent (see " a href="/agents" { "Agents" } ") and their names show up here to be tracked." }
                } @else {
                    table.data #tagging {
                        thead { tr { th { "Action" } th.number { "Seen" } th { "Last seen (UTC)" } th { "Tracked" } } }
                        tbody { @for (name, count, last) in &names {
                            @let tracked = snapshot.rule(name).tracked;
                            tr {
                                td { (name) }
                                td.number { (count) }
                                td { @if let Some(last) = last { (when(i64::from(*last))) } @else { "—" } }
                                td {
                                    form.inline method="post" action="/metering/tagging" {
                                        (form_guard(web))
                                        input type="hidden" name="action" value=(name);
                                        input type="hidden" name="tracked" value=(!tracked);
                                        button.toggle type="submit" id=(format!("track-{name}"))
                                            aria-pressed=(tracked) title=(if tracked { "Stop tracking" } else { "Track" }) {
                                            span.knob {}
                                            span.text { @if tracked { "On" } @else { "Off" } }
                                        }
                                    }
                                }
                            }
                        } }
                    }
                }
            }
        }
    };
    layout("Action Tagging", web, Section::Tagging, &notice, content)
}

pub async fn tagging(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_tagging(&state, &web, Notice::from_query(&query))
        .await
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct ToggleForm {
    csrf: String,
    version: i64,
    action: String,
    #[serde(default)]
    tracked: Option<bool>,
    #[serde(default)]
    outcome: Option<bool>,
}

pub async fn set_tracked(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<ToggleForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let tracked = form.tracked.unwrap_or(false);
    let action = form.action.clone();
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::set_tracked(config, &action, tracked)
    })
    .await;
    after_write(result, "/metering/tagging", |notice| {
        render_tagging(&state, &web, notice)
    })
    .await
}

// ---- Metering: Cost Allocation

async fn render_costs(web: &WebCaller, notice: Notice, typed: Option<&CostForm>) -> Markup {
    let config = &web.caller.workspace.config;
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let default_from = now.format(&Rfc3339).unwrap_or_default();
    let currency = web.caller.workspace.currency();
    let content = html! {
        p.hint { "What each tracked action costs you, per unit of its measure, from a date on. A new rate applies to actions that happen from its date; earlier actions keep the rate they were priced with." }
        @if config.cost_allocations.is_empty() {
            p.empty { "No costs yet. Track an action on " a href="/metering/tagging" { "Action Tagging" } ", then give it a cost below." }
        } @else {
            table.data #costs {
                thead { tr { th { "Action" } th { "Measure" } th { "Quantity from" } th { "Rates (from → per unit)" } } }
                tbody { @for allocation in &config.cost_allocations {
                    tr {
                        td { (allocation.action) }
                        td { (allocation.measure) }
                        td { (allocation.quantity_attribute.as_deref().unwrap_or("—")) }
                        td { ul.rates { @for rate in &allocation.rates {
                            li { (rate.effective_from.format(&Rfc3339).unwrap_or_default()) " → " (rate.cost_per_unit.normalize()) " " (currency) }
                        } } }
                    }
                } }
            }
        }
        h2 { "Schedule a cost" }
        form.card method="post" action="/metering/costs" #cost-form {
            (form_guard(web))
            label { "Action"
                input type="text" name="action" list="tracked-actions" required value=(typed.map(|form| form.action.as_str()).unwrap_or(""));
                datalist #tracked-actions { @for name in &config.tagging.tracked { option value=(name) {} } }
            }
            label { "Measure"
                select name="measure" {
                    @for measure in ["unit", "token", "input_token", "output_token"] {
                        option value=(measure) selected[typed.is_some_and(|form| form.measure == measure)] { (measure) }
                    }
                }
            }
            label { "Quantity attribute (custom measures; optional for unit)"
                input type="text" name="quantity_attribute" value=(typed.map(|form| form.quantity_attribute.as_str()).unwrap_or(""));
            }
            label { "Effective from (RFC 3339, UTC)"
                input type="text" name="effective_from" required value=(typed.map(|form| form.effective_from.as_str()).unwrap_or(&default_from));
            }
            label { "Cost per unit (" (currency) ")"
                input type="text" name="cost_per_unit" inputmode="decimal" required placeholder="0.005" value=(typed.map(|form| form.cost_per_unit.as_str()).unwrap_or(""));
            }
            button type="submit" { "Save" }
        }
    };
    layout("Cost Allocation", web, Section::Costs, &notice, content)
}

pub async fn costs(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_costs(&web, Notice::from_query(&query), None)
        .await
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct CostForm {
    csrf: String,
    version: i64,
    action: String,
    #[serde(default)]
    measure: String,
    #[serde(default)]
    quantity_attribute: String,
    effective_from: String,
    cost_per_unit: String,
}

pub async fn schedule_rate(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<CostForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let new = NewRate {
        measure: Some(form.measure.clone()),
        quantity_attribute: Some(form.quantity_attribute.clone()),
        effective_from: form.effective_from.clone(),
        cost_per_unit: form.cost_per_unit.clone(),
    };
    let action = form.action.trim().to_string();
    let result = match new.rate() {
        Err(error) => Err(error),
        Ok(rate) => {
            // A measure chosen for an action that already has one is the same measure unless
            // the builder changed it; only a change is refused.
            write_at(&state, &web.caller, form.version, |config| {
                let measure = match config
                    .cost_allocations
                    .iter()
                    .find(|cost| cost.action == action)
                {
                    Some(_) if new.measure.as_deref() == Some("unit") => None,
                    _ => new.measure.clone(),
                };
                edits::schedule_rate(
                    config,
                    &action,
                    measure,
                    new.quantity_attribute.clone(),
                    rate,
                )
            })
            .await
        }
    };
    after_write(result, "/metering/costs", |notice| {
        render_costs(&web, notice, Some(&form))
    })
    .await
}

// ---- Metering: Outcome Definitions

async fn render_outcomes(web: &WebCaller, notice: Notice) -> Markup {
    let snapshot = &web.caller.workspace;
    let config = &snapshot.config;
    let content = html! {
        p.hint { "A tracked action marked as an outcome is counted as @outcome: a result your customer values (a ticket solved, a lead qualified), which a rate plan can charge for." }
        @if config.tagging.tracked.is_empty() {
            p.empty { "Track an action first on " a href="/metering/tagging" { "Action Tagging" } "; tracked actions can be marked as outcomes here." }
        } @else {
            table.data #outcomes {
                thead { tr { th { "Tracked action" } th { "Condition" } th { "Outcome" } } }
                tbody { @for name in &config.tagging.tracked {
                    @let definitions: Vec<_> = config.outcomes.iter().filter(|definition| &definition.action == name).collect();
                    @let is_outcome = !definitions.is_empty();
                    tr {
                        td { (name) }
                        td { @if definitions.iter().any(|definition| definition.when.is_some()) { "conditional (set in the configuration file)" } @else if is_outcome { "always" } @else { "—" } }
                        td {
                            form.inline method="post" action="/metering/outcomes" {
                                (form_guard(web))
                                input type="hidden" name="action" value=(name);
                                input type="hidden" name="outcome" value=(!is_outcome);
                                button.toggle type="submit" id=(format!("outcome-{name}")) aria-pressed=(is_outcome) {
                                    span.knob {} span.text { @if is_outcome { "On" } @else { "Off" } }
                                }
                            }
                        }
                    }
                } }
            }
        }
        @if !config.composite_outcomes.is_empty() {
            h2 { "Outcomes derived from several actions" }
            p.hint { "Defined in the configuration file ([[composite_outcomes]]); docs/outcomes.md." }
            ul { @for composite in &config.composite_outcomes { li { code { (composite.name) } } } }
        }
    };
    layout(
        "Outcome Definitions",
        web,
        Section::Outcomes,
        &notice,
        content,
    )
}

pub async fn outcomes(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_outcomes(&web, Notice::from_query(&query))
        .await
        .into_response()
}

pub async fn set_outcome(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<ToggleForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let outcome = form.outcome.unwrap_or(false);
    let action = form.action.clone();
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::set_outcome(config, &action, outcome)
    })
    .await;
    after_write(result, "/metering/outcomes", |notice| {
        render_outcomes(&web, notice)
    })
    .await
}

// ---- Accounts

async fn render_accounts(web: &WebCaller, notice: Notice) -> Markup {
    let config = &web.caller.workspace.config;
    let accounts: Vec<&Account> = config
        .accounts
        .iter()
        .filter(|account| !account.archived)
        .collect();
    let content = html! {
        @if accounts.is_empty() {
            p.empty { "No accounts yet. An account is a customer of yours; create one below, then give it an agent instance on the " a href="/agents" { "Agents" } " page." }
        } @else {
            table.data #accounts {
                thead { tr { th { "Account" } th { "Id" } th { "Email" } th.number { "Agents" } } }
                tbody { @for account in &accounts {
                    tr {
                        td { a href=(format!("/accounts/{}", account.id)) { (account.name) } }
                        td { code { (account.id) } }
                        td { (account.email.as_deref().unwrap_or("")) }
                        td.number { (config.agent_instances.iter().filter(|instance| instance.account == account.id && !instance.archived).count()) }
                    }
                } }
            }
        }
        h2 { "New account" }
        form.card method="post" action="/accounts" #account-form {
            (form_guard(web))
            label { "Id (letters, digits, _ and -)" input type="text" name="id" required; }
            label { "Name" input type="text" name="name" required; }
            label { "Email" input type="email" name="email"; }
            button type="submit" { "Create account" }
        }
    };
    layout("Accounts", web, Section::Accounts, &notice, content)
}

pub async fn accounts(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_accounts(&web, Notice::from_query(&query))
        .await
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct AccountForm {
    csrf: String,
    version: i64,
    id: String,
    name: String,
    #[serde(default)]
    email: String,
}

pub async fn create_account(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<AccountForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let account = Account {
        id: form.id.trim().to_string(),
        name: form.name.trim().to_string(),
        email: Some(form.email.trim().to_string()).filter(|email| !email.is_empty()),
        phone: None,
        address: None,
        description: None,
        external_id: None,
        archived: false,
    };
    let id = account.id.clone();
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::create_account(config, account)
    })
    .await;
    match result {
        Ok(_) => Redirect::to(&format!("/accounts/{id}?saved=1")).into_response(),
        Err(error) => (
            error.status,
            render_accounts(&web, Notice::Error(error.message)).await,
        )
            .into_response(),
    }
}

pub async fn account(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    let config = &web.caller.workspace.config;
    let Some(account) = config.accounts.iter().find(|account| account.id == id) else {
        return (StatusCode::NOT_FOUND, not_found_page()).into_response();
    };
    let workspace_id = web.caller.workspace.workspace_id();
    let currency = web.caller.workspace.currency();
    // Independent reads, run at once: the page takes as long as the slowest.
    let (usage, users, seats, invoices) = tokio::join!(
        reads::usage(&state, workspace_id, Some(&id), Days::ALL),
        reads::heaviest_users(&state, workspace_id, Some(&id), Days::ALL),
        reads::users_and_seats(&state, workspace_id, &id),
        reads::invoices(&state, workspace_id, Some(&id)),
    );
    let content = html! {
        dl.facts {
            dt { "Id" } dd { code { (account.id) } }
            @if let Some(email) = &account.email { dt { "Email" } dd { (email) } }
            @if let Some(external) = &account.external_id { dt { "External id" } dd { (external) } }
            @if account.archived { dt { "Status" } dd { "archived" } }
            @if let Ok(seats) = &seats {
                dt { "@user this month" } dd #users-this-month { (seats.users_this_month) }
                dt { "@seat today" } dd #seats-today { (seats.seats_today) " (users active in the last 30 days)" }
            }
        }
        h2 { "Usage" }
        @match &usage {
            Err(error) => (unavailable("usage", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No tracked usage yet. Actions this account's agents send appear here once their names are tracked." },
            Ok(rows) => {
                table.data #usage {
                    thead { tr { th { "Action" } th { "Measure" } th.number { "Actions" } th.number { "Quantity" } th.number { "Outcomes" } th.number { "Cost" } } }
                    tbody { @for row in rows {
                        tr {
                            td { (row.action_name) } td { (row.measure) }
                            td.number { (row.actions) } td.number { (normalized(&row.quantity)) }
                            td.number { (row.outcomes) }
                            td.number.cost { (normalized(&row.cost)) " " (currency) }
                        }
                    } }
                    @let total = rows.iter().fold(Decimal::ZERO, |total, row| total.saturating_add(decimal(&row.cost)));
                    tfoot { tr { th colspan="5" { "Total cost" } th.number #usage-total { (total.normalize()) " " (currency) } } }
                }
            }
        }
        h2 { "Users" }
        @match &users {
            Err(error) => (unavailable("users", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No users yet: actions that carry a user_id are counted per user (@user)." },
            Ok(rows) => table.data #users {
                thead { tr { th { "User" } th.number { "Actions" } th.number { "Cost" } } }
                tbody { @for row in rows { tr { td { (row.user_key) } td.number { (row.actions) } td.number { (normalized(&row.cost)) " " (currency) } } } }
            },
        }
        h2 { "Contacts" }
        @let contacts: Vec<_> = config.contacts.iter().filter(|contact| contact.account == id).collect();
        @if contacts.is_empty() { p.empty { "No contacts. Add them with the API (POST /api/v1/contacts) or the configuration file." } }
        @else { ul { @for contact in contacts { li { (contact.name) @if let Some(email) = &contact.email { " — " (email) } } } } }
        h2 { "Agents" }
        @let instances: Vec<_> = config.agent_instances.iter().filter(|instance| instance.account == id).collect();
        @if instances.is_empty() { p.empty { "No agents yet. Create an agent instance for this account on the " a href="/agents" { "Agents" } " page." } }
        @else { ul { @for instance in instances { li { code { (instance.id) } " " (instance.name) " (" (instance.agent_type) ")" @if instance.archived { " — archived" } } } } }
        h2 { "Invoices" }
        (invoice_table(&invoices))
    };
    layout(
        &account.name,
        &web,
        Section::Accounts,
        &Notice::from_query(&query),
        content,
    )
    .into_response()
}

fn invoice_table(invoices: &anyhow::Result<Vec<reads::InvoiceListRow>>) -> Markup {
    html! {
        @match invoices {
            Err(error) => (unavailable("invoices", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No finalized invoices yet. Invoices are finalized by the billing stage (or `agentmeter invoices finalize`) once a period closes." },
            Ok(rows) => table.data.invoices {
                thead { tr { th { "Number" } th { "Account" } th { "Plan" } th { "Period from" } th { "Status" } th.number { "Total" } th.number { "Cost" } th.number { "Margin" } } }
                tbody { @for row in rows {
                    tr {
                        td { a href=(format!("/billing/invoices/{}", row.invoice_id)) { (row.number) } }
                        td { (row.account_id) } td { (row.rate_plan) } td { (day(i64::from(row.period_start))) }
                        td { (row.status) }
                        td.number { (normalized(&row.total)) " " (row.currency) }
                        td.number { (normalized(&row.cost)) }
                        td.number { @if row.margin.is_empty() { "—" } @else { (normalized(&row.margin)) } }
                    }
                } }
            },
        }
    }
}

// ---- Agents

async fn render_agents(web: &WebCaller, notice: Notice, shown: Option<Markup>) -> Markup {
    let config = &web.caller.workspace.config;
    let types: Vec<&AgentType> = config
        .agent_types
        .iter()
        .filter(|kind| !kind.archived)
        .collect();
    let content = html! {
        @if let Some(shown) = shown { (shown) }
        h2 { "Agent types" }
        @if types.is_empty() {
            p.empty { "No agent types yet. An agent type is one of your products (a support agent, a research agent); create one, then its instances per account." }
        } @else {
            table.data #agent-types {
                thead { tr { th { "Type" } th { "Id" } th { "Kind" } th.number { "Instances" } } }
                tbody { @for kind in &types { tr {
                    td { (kind.name) } td { code { (kind.id) } } td { (kind.kind) }
                    td.number { (config.agent_instances.iter().filter(|instance| instance.agent_type == kind.id && !instance.archived).count()) }
                } } }
            }
        }
        form.card method="post" action="/agents/types" #agent-type-form {
            (form_guard(web))
            label { "Id" input type="text" name="id" required; }
            label { "Name" input type="text" name="name" required; }
            label { "Kind (custom, langgraph, crewai, …)" input type="text" name="kind" value="custom"; }
            button type="submit" { "Create agent type" }
        }
        h2 { "Agent instances" }
        @if config.agent_instances.is_empty() {
            p.empty { "No agent instances yet. An instance is one agent serving one account, with its own secret; create one below and give its secret to the agent." }
        } @else {
            table.data #agent-instances {
                thead { tr { th { "Instance" } th { "Id" } th { "Type" } th { "Account" } th { "Status" } th {} } }
                tbody { @for instance in &config.agent_instances { tr {
                    td { (instance.name) } td { code { (instance.id) } } td { (instance.agent_type) } td { (instance.account) }
                    td { @if instance.archived { "archived" } @else if !instance.retired_secrets.is_empty() { "rotated (old secret in its grace period)" } @else { "active" } }
                    td { @if !instance.archived {
                        form.inline method="post" action=(format!("/agents/instances/{}/rotate", instance.id)) {
                            (form_guard(web))
                            button.secondary type="submit" { "Rotate secret" }
                        }
                    } }
                } } }
            }
        }
        @if types.is_empty() || config.accounts.is_empty() {
            p.empty { "To create an instance you need an agent type (above) and an account (" a href="/accounts" { "Accounts" } ")." }
        } @else {
            form.card method="post" action="/agents/instances" #instance-form {
                (form_guard(web))
                label { "Id" input type="text" name="id" required; }
                label { "Name" input type="text" name="name" required; }
                label { "Agent type" select name="agent_type" { @for kind in &types { option value=(kind.id) { (kind.name) } } } }
                label { "Account" select name="account" { @for account in config.accounts.iter().filter(|account| !account.archived) { option value=(account.id) { (account.name) } } } }
                button type="submit" { "Create agent instance" }
            }
        }
    };
    layout("Agents", web, Section::Agents, &notice, content)
}

/// The one time a secret is shown, with the environment value-python and OpenTelemetry need.
fn secret_shown(state: &ConsoleState, instance_id: &str, secret: &str, note: &str) -> Markup {
    let ingest = &state.settings.ingest;
    html! {
        section.secret #secret {
            h2 { "Secret of " code { (instance_id) } }
            p { strong { "Copy it now: " } "only its SHA-256 is kept, so it cannot be shown again. " (note) }
            pre #agent-env { (format!(
                "export VALUE_AGENT_SECRET={secret}\nexport VALUE_BACKEND_URL=http://{}\nexport VALUE_OTEL_ENDPOINT=http://{}\n# any other OpenTelemetry exporter:\nexport OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret={secret}",
                ingest.http_listen, ingest.otlp_grpc_listen
            )) }
            p.hint { "The addresses are this deployment's ingest listeners; behind a load balancer, use its address." }
        }
    }
}

pub async fn agents(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_agents(&web, Notice::from_query(&query), None)
        .await
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct AgentTypeForm {
    csrf: String,
    version: i64,
    id: String,
    name: String,
    #[serde(default)]
    kind: String,
}

pub async fn create_agent_type(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<AgentTypeForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let kind = Some(form.kind.trim().to_string())
        .filter(|kind| !kind.is_empty())
        .unwrap_or_else(|| "custom".to_string());
    let agent_type = AgentType {
        id: form.id.trim().to_string(),
        name: form.name.trim().to_string(),
        description: None,
        kind,
        archived: false,
    };
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::create_agent_type(config, agent_type)
    })
    .await;
    after_write(result, "/agents", |notice| {
        render_agents(&web, notice, None)
    })
    .await
}

#[derive(Debug, Deserialize)]
pub struct InstanceForm {
    csrf: String,
    version: i64,
    id: String,
    name: String,
    agent_type: String,
    account: String,
}

pub async fn create_instance(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<InstanceForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let secret = crate::new_secret();
    let new = NewInstance {
        id: form.id.trim().to_string(),
        name: form.name.trim().to_string(),
        agent_type: form.agent_type.clone(),
        account: form.account.clone(),
        contact: None,
        description: None,
    };
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::create_instance(config, new, hash_secret(&secret))
    })
    .await;
    // Not a redirect: the secret is in this answer only.
    match result {
        Ok((_, instance)) => {
            let web = logged_in!(state, headers);
            let shown = secret_shown(&state, &instance.id, &secret, "");
            render_agents(&web, Notice::Saved, Some(shown))
                .await
                .into_response()
        }
        Err(error) => (
            error.status,
            render_agents(&web, Notice::Error(error.message), None).await,
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct GuardForm {
    csrf: String,
    version: i64,
}

pub async fn rotate_secret(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<GuardForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let secret = crate::new_secret();
    let now = OffsetDateTime::now_utc();
    let valid_until = state.settings.console.retired_secret_valid_until(now);
    let result = write_at(&state, &web.caller, form.version, |config| {
        edits::rotate_secret(config, &id, hash_secret(&secret), now, valid_until)
    })
    .await;
    match result {
        Ok((_, instance)) => {
            let web = logged_in!(state, headers);
            let note = format!(
                "The previous secret keeps working until {}.",
                valid_until.format(&Rfc3339).unwrap_or_default()
            );
            let shown = secret_shown(&state, &instance.id, &secret, &note);
            render_agents(&web, Notice::Saved, Some(shown))
                .await
                .into_response()
        }
        Err(error) => (
            error.status,
            render_agents(&web, Notice::Error(error.message), None).await,
        )
            .into_response(),
    }
}

// ---- Billing

/// What was typed into a refused billing form, shown again with the message.
#[derive(Debug, Default)]
pub struct BillingTyped {
    product_json: Option<String>,
    subscription: Option<SubscriptionForm>,
}

async fn render_billing(
    state: &ConsoleState,
    web: &WebCaller,
    notice: Notice,
    typed: BillingTyped,
) -> Markup {
    let config = &web.caller.workspace.config;
    let invoices = reads::invoices(state, web.caller.workspace.workspace_id(), None).await;
    let typed_subscription = typed.subscription.unwrap_or_default();
    let today = OffsetDateTime::now_utc().date().to_string();
    let product_example = r#"{"id": "prod_research", "name": "Research Agent", "agent_type": "…",
 "rate_plans": [{"id": "basic", "name": "Basic", "currency": "USD", "billing_cycle": "monthly",
   "charges": [{"id": "platform", "name": "Platform fee", "model": {"flat": {"fee": "49"}}}]}]}"#;
    let content = html! {
        h2 { "Products and rate plans" }
        @if config.products.is_empty() {
            p.empty { "No products yet. Describe one below (a product, its rate plans and their charges, as docs/billing.md explains), or in the configuration file ([[products]])." }
        } @else {
            table.data #plans {
                thead { tr { th { "Product" } th { "Agent type" } th { "Rate plan" } th { "Cycle" } th { "Currency" } th { "Charges" } } }
                tbody { @for product in &config.products { @for plan in &product.rate_plans { tr {
                    td { (product.name) " " code { (product.id) } } td { (product.agent_type) } td { (plan.name) " " code { (plan.id) } }
                    td { (format!("{:?}", plan.billing_cycle).to_lowercase()) } td { (plan.currency) }
                    td { (plan.charges.iter().map(|charge| charge.name.as_str()).collect::<Vec<_>>().join(", ")) }
                } } } }
            }
        }
        details #product-editor open[typed.product_json.is_some()] {
            summary { "Create or replace a product" }
            form.card method="post" action="/billing/products" #product-form {
                (form_guard(web))
                label {
                    "The product as JSON (the body of PUT /api/v1/products/{id}; a product with the same id is replaced)"
                    textarea name="product" rows="8" placeholder=(product_example) required { (typed.product_json.as_deref().unwrap_or("")) }
                }
                @if let Some(product) = config.products.first() {
                    p.hint { "To change " code { (product.id) } ", start from its current definition: " code { (serde_json::to_string(product).unwrap_or_default()) } }
                }
                button type="submit" { "Save product" }
            }
        }
        h2 { "Subscriptions" }
        @if config.subscriptions.is_empty() {
            p.empty { "No subscriptions yet: subscribe an account to a rate plan below." }
        } @else {
            table.data #subscriptions {
                thead { tr { th { "Id" } th { "Account" } th { "Product" } th { "Plan" } th { "From" } th { "Until" } th {} } }
                tbody { @for subscription in &config.subscriptions { tr {
                    td { code { (subscription.id) } } td { (subscription.account) } td { (subscription.product) } td { (subscription.rate_plan) }
                    td { (subscription.start.date().to_string()) }
                    td { (subscription.end.map(|end| end.date().to_string()).unwrap_or_else(|| "open".to_string())) }
                    td {
                        @if subscription.end.is_none() {
                            form.inline method="post" action=(format!("/billing/subscriptions/{}/end", subscription.id)) {
                                (form_guard(web))
                                input type="date" name="end" value=(today) required aria-label="End on";
                                button type="submit" { "End" }
                            }
                        }
                    }
                } } }
            }
        }
        @let plans: Vec<(String, String)> = config.products.iter().flat_map(|product| product.rate_plans.iter().map(move |plan| (format!("{}/{}", product.id, plan.id), format!("{} — {}", product.name, plan.name)))).collect();
        @let accounts: Vec<&Account> = config.accounts.iter().filter(|account| !account.archived).collect();
        @if plans.is_empty() || accounts.is_empty() {
            p.hint { "A subscription needs an account (" a href="/accounts" { "Accounts" } ") and a product with a rate plan (above)." }
        } @else {
            h3 { "New subscription" }
            form.card method="post" action="/billing/subscriptions" #subscription-form {
                (form_guard(web))
                label { "Id" input type="text" name="id" required value=(typed_subscription.id); }
                label { "Account" select name="account" {
                    @for account in &accounts { option value=(account.id) selected[account.id == typed_subscription.account] { (account.name) " (" (account.id) ")" } }
                } }
                label { "Rate plan" select name="plan" {
                    @for (value, name) in &plans { option value=(value) selected[*value == typed_subscription.plan] { (name) } }
                } }
                label { "From (UTC, inclusive)" input type="date" name="start" required value=(if typed_subscription.start.is_empty() { today.clone() } else { typed_subscription.start.clone() }); }
                button type="submit" { "Subscribe" }
            }
        }
        h2 { "Invoices" }
        (invoice_table(&invoices))
    };
    layout("Billing", web, Section::Billing, &notice, content)
}

pub async fn billing(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    render_billing(
        &state,
        &web,
        Notice::from_query(&query),
        BillingTyped::default(),
    )
    .await
    .into_response()
}

#[derive(Debug, Deserialize)]
pub struct ProductForm {
    csrf: String,
    version: i64,
    product: String,
}

pub async fn save_product(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<ProductForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let result = match serde_json::from_str::<Product>(&form.product) {
        Err(error) => Err(ApiError::invalid(
            "product",
            format!("the product is not what PUT /api/v1/products/{{id}} takes: {error}"),
        )),
        Ok(product) => {
            write_at(&state, &web.caller, form.version, |config| {
                let id = product.id.clone();
                edits::put_product(config, &id, product)
            })
            .await
        }
    };
    let typed = BillingTyped {
        product_json: Some(form.product.clone()),
        subscription: None,
    };
    after_write(result, "/billing", |notice| {
        render_billing(&state, &web, notice, typed)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscriptionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    version: i64,
    #[serde(default)]
    id: String,
    #[serde(default)]
    account: String,
    /// `product/rate plan`.
    #[serde(default)]
    plan: String,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    start: String,
}

pub async fn create_subscription(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<SubscriptionForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let (product, rate_plan) = form
        .plan
        .split_once('/')
        .unwrap_or((form.plan.as_str(), ""));
    let result = match edits::utc_day("start", form.start.trim()) {
        Err(error) => Err(error),
        Ok(start) => {
            let subscription = Subscription {
                id: form.id.trim().to_string(),
                account: form.account.clone(),
                product: product.to_string(),
                rate_plan: rate_plan.to_string(),
                start,
                end: None,
            };
            write_at(&state, &web.caller, form.version, |config| {
                edits::create_subscription(config, subscription)
            })
            .await
        }
    };
    let typed = BillingTyped {
        product_json: None,
        subscription: Some(form),
    };
    after_write(result, "/billing", |notice| {
        render_billing(&state, &web, notice, typed)
    })
    .await
}

#[derive(Debug, Deserialize)]
pub struct EndForm {
    csrf: String,
    version: i64,
    end: String,
}

pub async fn end_subscription(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<EndForm>,
) -> Response {
    let web = writer!(state, headers, &form.csrf);
    let result = match edits::utc_day("end", form.end.trim()) {
        Err(error) => Err(error),
        Ok(end) => {
            write_at(&state, &web.caller, form.version, |config| {
                edits::end_subscription(config, &id, end)
            })
            .await
        }
    };
    after_write(result, "/billing", |notice| {
        render_billing(&state, &web, notice, BillingTyped::default())
    })
    .await
}

/// An invoice's printable view (the billing crate's HTML, the same as `invoices show --html`).
pub async fn invoice(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let web = logged_in!(state, headers);
    match reads::invoice_content(&state, web.caller.workspace.workspace_id(), &id).await {
        Ok(Some(content)) => match serde_json::from_str::<DraftInvoice>(&content) {
            Ok(invoice) => Html(invoice.to_html()).into_response(),
            Err(error) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                message_page(
                    "Invoice unreadable",
                    &format!("The stored invoice cannot be read: {error}"),
                ),
            )
                .into_response(),
        },
        Ok(None) => (StatusCode::NOT_FOUND, not_found_page()).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            message_page("Invoice unavailable", &format!("{error:#}")),
        )
            .into_response(),
    }
}

// ---- Profitability

/// The margin per month of finalized invoices (the month rows of every currency added up: the
/// margin is in the workspace's currency), as bars.
fn monthly_margin_bars(rows: &[reads::RevenueRow], currency: &str) -> Vec<Bar> {
    let mut per_month: BTreeMap<&str, Decimal> = BTreeMap::new();
    for row in rows {
        let margin = per_month.entry(row.group_key.as_str()).or_default();
        *margin = margin.saturating_add(decimal(&row.margin));
    }
    per_month
        .into_iter()
        .map(|(month, margin)| Bar {
            label: month.to_string(),
            value: margin.max(Decimal::ZERO),
            title: format!("{month}: margin {} {currency}", margin.normalize()),
        })
        .collect()
}

/// One bar per day of the 30 from `first_day` (seconds), days without cost included.
fn daily_bars(rows: &[reads::DayRow], first_day: i64, currency: &str) -> Vec<Bar> {
    (0..30)
        .map(|offset| {
            let start = first_day + offset * 86_400;
            let row = rows.iter().find(|row| i64::from(row.day) == start);
            let cost = row.map(|row| decimal(&row.cost)).unwrap_or_default();
            let actions = row.map(|row| row.actions).unwrap_or(0);
            Bar {
                label: day(start).get(5..).unwrap_or("").to_string(),
                value: cost,
                title: format!(
                    "{}: {} {currency}, {actions} actions",
                    day(start),
                    cost.normalize()
                ),
            }
        })
        .collect()
}

/// Tracked actions by cost, the most expensive first (at most 12): (name, actions, cost).
fn most_expensive(rows: &[reads::UsageRow]) -> Vec<(String, u64, Decimal)> {
    let mut per_action: BTreeMap<String, (u64, Decimal)> = BTreeMap::new();
    for row in rows {
        let entry = per_action.entry(row.action_name.clone()).or_default();
        entry.0 += row.actions;
        entry.1 = entry.1.saturating_add(decimal(&row.cost));
    }
    let mut ranked: Vec<(String, u64, Decimal)> = per_action
        .into_iter()
        .map(|(name, (count, cost))| (name, count, cost))
        .collect();
    ranked.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(12);
    ranked
}

pub async fn profitability(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    let workspace_id = web.caller.workspace.workspace_id();
    let currency = web.caller.workspace.currency().to_string();
    let today = OffsetDateTime::now_utc()
        .unix_timestamp()
        .div_euclid(86_400)
        * 86_400;
    let first_day = today - 29 * 86_400;
    let last_30_days = Days::since(first_day).unwrap_or(Days::ALL);
    // Independent reads, run at once: the page takes as long as the slowest.
    let (days, usage, users, per_month, per_account, per_agent_type, per_rate_plan) = tokio::join!(
        reads::cost_per_day(&state, workspace_id, None, last_30_days),
        reads::usage(&state, workspace_id, None, Days::ALL),
        reads::heaviest_users(&state, workspace_id, None, Days::ALL),
        reads::revenue(&state, workspace_id, RevenueGroup::Month),
        reads::revenue(&state, workspace_id, RevenueGroup::Account),
        reads::revenue(&state, workspace_id, RevenueGroup::AgentType),
        reads::revenue(&state, workspace_id, RevenueGroup::RatePlan),
    );
    let revenue = [
        ("Per month", per_month),
        ("Per account", per_account),
        ("Per agent type", per_agent_type),
        ("Per rate plan", per_rate_plan),
    ];
    let content = html! {
        h2 { "Cost per day, last 30 days" }
        @match &days {
            Err(error) => (unavailable("cost per day", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No tracked actions in the last 30 days. Track actions and give them a cost on the Metering page." },
            Ok(rows) => {
                (chart::bars(&format!("Cost per day ({currency})"), &daily_bars(rows, first_day, &currency)))
            }
        }
        @match &revenue[0].1 {
            Err(error) => (unavailable("revenue", error)),
            Ok(rows) if rows.is_empty() => p.empty { "Revenue and margin appear here once invoices are finalized (Billing)." },
            Ok(rows) => {
                h2 { "Margin per month" }
                (chart::bars(&format!("Margin per month ({currency}, finalized invoices)"), &monthly_margin_bars(rows, &currency)))
                @for (heading, rows) in &revenue {
                    @if let Ok(rows) = rows {
                        h3 { (heading) }
                        table.data.margins {
                            thead { tr { th {} th { "Currency" } th.number { "Invoices" } th.number { "Revenue" } th.number { "Cost" } th.number { "Margin" } } }
                            tbody { @for row in rows { tr {
                                td { (row.group_key) } td { (row.currency) } td.number { (row.invoices) }
                                td.number { (normalized(&row.revenue)) } td.number { (normalized(&row.cost)) }
                                td.number { @if row.margin.is_empty() { "—" } @else { (normalized(&row.margin)) } @if row.without_margin > 0 { " (" (row.without_margin) " without)" } }
                            } } }
                        }
                    }
                }
                p.hint { "Finalized invoices only, summed exactly in ClickHouse. Revenue in each invoice's currency; cost and margin in " (currency) " (converted as docs/billing.md says)." }
            }
        }
        h2 { "Most expensive actions" }
        @match &usage {
            Err(error) => (unavailable("usage", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No tracked usage yet." },
            Ok(rows) => {
                @let ranked = most_expensive(rows);
                (chart::bars(&format!("Cost per action ({currency})"), &ranked.iter().map(|(name, count, cost)| Bar {
                    label: name.clone(), value: *cost, title: format!("{name}: {} {currency}, {count} actions", cost.normalize()),
                }).collect::<Vec<_>>()))
                table.data #expensive-actions {
                    thead { tr { th { "Action" } th.number { "Actions" } th.number { "Cost" } } }
                    tbody { @for (name, count, cost) in &ranked { tr { td { (name) } td.number { (count) } td.number { (cost.normalize()) " " (currency) } } } }
                }
            }
        }
        h2 { "Heaviest users" }
        @match &users {
            Err(error) => (unavailable("users", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No users yet: actions that carry a user_id are counted per user." },
            Ok(rows) => table.data #heaviest-users {
                thead { tr { th { "User" } th { "Account" } th.number { "Actions" } th.number { "Cost" } } }
                tbody { @for row in rows { tr { td { (row.user_key) } td { (row.account_id) } td.number { (row.actions) } td.number { (normalized(&row.cost)) " " (currency) } } } }
            },
        }
    };
    layout(
        "Profitability",
        &web,
        Section::Profitability,
        &Notice::from_query(&query),
        content,
    )
    .into_response()
}

// ---- Audit log

pub async fn audit(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let web = logged_in!(state, headers);
    let rows = reads::audit_log(&state, web.caller.workspace.workspace_id()).await;
    let content = html! {
        p.hint { "Every version of this workspace's configuration: who published it (an admin key, or the CLI) and what changed." }
        @match &rows {
            Err(error) => (unavailable("the audit log", error)),
            Ok(rows) if rows.is_empty() => p.empty { "No changes recorded yet." },
            Ok(rows) => table.data #audit {
                thead { tr { th.number { "Version" } th { "When (UTC)" } th { "By" } th { "Changes" } } }
                tbody { @for row in rows { tr {
                    td.number { (row.version) } td { (when(i64::from(row.applied_at))) } td { code { (row.changed_by) } }
                    td { ul { @for change in serde_json::from_str::<Vec<String>>(&row.summary_json).unwrap_or_default() { li { (change) } } } }
                } } }
            },
        }
    };
    layout(
        "Audit log",
        &web,
        Section::Audit,
        &Notice::from_query(&query),
        content,
    )
    .into_response()
}
