//! The routes of the control-plane API (docs/console.md; docs/openapi.json lists them and
//! tests/console_api.rs checks the two agree).
//!
//! Reads answer from the configuration this process follows on the config topic, with its
//! `version` (also the `ETag`). A write names the version it was made against in `If-Match`;
//! it is applied to the *current* configuration read from the topic, the whole result is
//! checked as `config apply` checks a file, and it is published as the next version — or
//! refused with 409 when the version is stale, 422 naming the field when it would make the
//! configuration invalid; nothing is changed then. The answer comes once this process has read
//! its own write back, so the next read shows it.

use agentmeter_billing::invoice::DraftInvoice;
use agentmeter_schemas::catalog::{Product, Subscription};
use agentmeter_schemas::metering::{hash_secret, Account, AgentInstance, AgentType, Contact};
use agentmeter_schemas::MeteringConfig;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::auth::Caller;
use super::edits::{self, AccountPatch, NewInstance, NewRate};
use super::error::ApiError;
use super::reads::{self, normalized, Days, LiveDataFilter, RevenueGroup};
use super::ConsoleState;
use crate::config_publish::PublishError;

/// The OpenAPI document of these routes, served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub fn router(state: ConsoleState) -> Router {
    let readiness_state = state.clone();
    let readiness = std::sync::Arc::new(move || {
        if readiness_state.config.is_caught_up() {
            Ok(())
        } else {
            Err("the configuration is not loaded yet".to_string())
        }
    });
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/workspace", get(workspace))
        .route("/api/v1/accounts", get(list_accounts).post(create_account))
        .route(
            "/api/v1/accounts/{id}",
            get(get_account).patch(update_account),
        )
        .route("/api/v1/accounts/{id}/archive", post(archive_account))
        .route("/api/v1/contacts", get(list_contacts).post(create_contact))
        .route(
            "/api/v1/agent-types",
            get(list_agent_types).post(create_agent_type),
        )
        .route(
            "/api/v1/agent-instances",
            get(list_instances).post(create_instance),
        )
        .route(
            "/api/v1/agent-instances/{id}/rotate-secret",
            post(rotate_secret),
        )
        .route(
            "/api/v1/agent-instances/{id}/archive",
            post(archive_instance),
        )
        .route("/api/v1/actions", get(list_actions))
        .route("/api/v1/tagging/{action}", put(set_tracked))
        .route("/api/v1/cost-allocations", get(list_cost_allocations))
        .route(
            "/api/v1/cost-allocations/{action}/rates",
            post(schedule_rate),
        )
        .route("/api/v1/outcomes", get(list_outcomes))
        .route("/api/v1/outcomes/{action}", put(set_outcome))
        .route("/api/v1/products", get(list_products))
        .route("/api/v1/products/{id}", put(put_product))
        .route(
            "/api/v1/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route("/api/v1/subscriptions/{id}/end", post(end_subscription))
        .route("/api/v1/invoices", get(list_invoices))
        .route("/api/v1/invoices/{id}", get(get_invoice))
        .route("/api/v1/revenue", get(revenue))
        .route("/api/v1/live-data", get(live_data))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/audit", get(audit))
        .with_state(state)
        .merge(agentmeter_runtime::observability::operations_router(
            readiness,
        ))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A JSON answer carrying the configuration version it reflects (body and `ETag`).
fn versioned(status: StatusCode, version: i64, mut body: Value) -> Response {
    body["version"] = json!(version);
    (
        status,
        [(header::ETAG, format!("\"{version}\""))],
        Json(body),
    )
        .into_response()
}

/// A request body as `T`, or 400 with serde's message (which names an unknown or wrong field).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not what this route takes: {error}"),
        )
    })
}

/// The version a write was made against, from `If-Match: "12"` (or `12`).
fn expected_version(headers: &HeaderMap) -> Result<i64, ApiError> {
    let value = headers.get(header::IF_MATCH).ok_or_else(|| {
        ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "a change needs If-Match: <version> — the version your change is based on (every read returns it as `version` and in ETag), so that two admins never overwrite each other",
        )
    })?;
    value
        .to_str()
        .ok()
        .map(|text| text.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|text| text.parse::<i64>().ok())
        .filter(|version| *version >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                "If-Match",
                "If-Match must be a configuration version such as \"12\"",
            )
        })
}

/// Applies `edit` to the workspace's current configuration and publishes the result (see the
/// module header); returns the new version and what `edit` returned.
async fn write<T>(
    state: &ConsoleState,
    caller: &Caller,
    headers: &HeaderMap,
    edit: impl FnOnce(&mut MeteringConfig) -> Result<T, PublishError>,
) -> Result<(i64, T), ApiError> {
    caller.require_admin()?;
    let expected = expected_version(headers)?;
    super::write::write_at(state, caller, expected, edit).await
}

async fn workspace(caller: Caller) -> Response {
    let workspace = &caller.workspace.config.workspace;
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "workspace": workspace, "role": caller.key.role }),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Include archived entries.
    #[serde(default)]
    archived: bool,
}

/// A query string as `T`, or 400 with serde's message (which names the unknown or wrong field).
fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, error.body_text()))
}

// ---- accounts

async fn list_accounts(
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let accounts: Vec<&Account> = caller
        .workspace
        .config
        .accounts
        .iter()
        .filter(|account| query.archived || !account.archived)
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "accounts": accounts }),
    ))
}

async fn get_account(caller: Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let config = &caller.workspace.config;
    let account = config
        .accounts
        .iter()
        .find(|account| account.id == id)
        .ok_or_else(|| ApiError::not_found(format!("account {id:?}")))?;
    let contacts: Vec<&Contact> = config
        .contacts
        .iter()
        .filter(|contact| contact.account == id)
        .collect();
    let agents: Vec<Value> = config
        .agent_instances
        .iter()
        .filter(|instance| instance.account == id)
        .map(instance_view)
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "account": account, "contacts": contacts, "agent_instances": agents }),
    ))
}

async fn create_account(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let account: Account = body(&bytes)?;
    let (version, account) = write(&state, &caller, &headers, |config| {
        edits::create_account(config, account)
    })
    .await?;
    Ok(versioned(
        StatusCode::CREATED,
        version,
        json!({ "account": account }),
    ))
}

async fn update_account(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let patch: AccountPatch = body(&bytes)?;
    let (version, account) = write(&state, &caller, &headers, |config| {
        edits::update_account(config, &id, patch)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "account": account }),
    ))
}

async fn archive_account(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (version, account) = write(&state, &caller, &headers, |config| {
        edits::archive_account(config, &id)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "account": account }),
    ))
}

// ---- contacts and agent types

async fn list_contacts(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "contacts": caller.workspace.config.contacts }),
    )
}

async fn create_contact(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let contact: Contact = body(&bytes)?;
    let (version, contact) = write(&state, &caller, &headers, |config| {
        edits::create_contact(config, contact)
    })
    .await?;
    Ok(versioned(
        StatusCode::CREATED,
        version,
        json!({ "contact": contact }),
    ))
}

async fn list_agent_types(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "agent_types": caller.workspace.config.agent_types }),
    )
}

async fn create_agent_type(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let agent_type: AgentType = body(&bytes)?;
    let (version, agent_type) = write(&state, &caller, &headers, |config| {
        edits::create_agent_type(config, agent_type)
    })
    .await?;
    Ok(versioned(
        StatusCode::CREATED,
        version,
        json!({ "agent_type": agent_type }),
    ))
}

// ---- agent instances and their secrets

/// An agent instance as the API shows it: never a secret, not even its hash.
pub(super) fn instance_view(instance: &AgentInstance) -> Value {
    json!({
        "id": instance.id,
        "name": instance.name,
        "description": instance.description,
        "agent_type": instance.agent_type,
        "account": instance.account,
        "contact": instance.contact,
        "archived": instance.archived,
        "retired_secrets_valid_until": instance
            .retired_secrets
            .iter()
            .map(|retired| retired.valid_until.format(&Rfc3339).unwrap_or_default())
            .collect::<Vec<_>>(),
    })
}

/// What a new secret is shown with, once: the environment value-python and any OpenTelemetry
/// exporter need.
pub(super) fn secret_answer(secret: &str) -> Value {
    json!({
        "secret": secret,
        "environment": {
            "VALUE_AGENT_SECRET": secret,
            "OTEL_EXPORTER_OTLP_HEADERS": format!("x-agent-secret={secret}"),
        },
        "shown_once": "store the secret now: only its SHA-256 is kept, so it cannot be shown again",
    })
}

async fn list_instances(
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let instances: Vec<Value> = caller
        .workspace
        .config
        .agent_instances
        .iter()
        .filter(|instance| query.archived || !instance.archived)
        .map(instance_view)
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "agent_instances": instances }),
    ))
}

async fn create_instance(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let new: NewInstance = body(&bytes)?;
    let secret = crate::new_secret();
    let (version, instance) = write(&state, &caller, &headers, |config| {
        edits::create_instance(config, new, hash_secret(&secret))
    })
    .await?;
    let mut answer = secret_answer(&secret);
    answer["agent_instance"] = instance_view(&instance);
    Ok(versioned(StatusCode::CREATED, version, answer))
}

async fn rotate_secret(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let secret = crate::new_secret();
    let now = OffsetDateTime::now_utc();
    let valid_until = state.settings.console.retired_secret_valid_until(now);
    let (version, instance) = write(&state, &caller, &headers, |config| {
        edits::rotate_secret(config, &id, hash_secret(&secret), now, valid_until)
    })
    .await?;
    let mut answer = secret_answer(&secret);
    answer["agent_instance"] = instance_view(&instance);
    answer["previous_secret_valid_until"] = json!(valid_until.format(&Rfc3339).unwrap_or_default());
    Ok(versioned(StatusCode::OK, version, answer))
}

async fn archive_instance(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (version, instance) = write(&state, &caller, &headers, |config| {
        edits::archive_instance(config, &id)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "agent_instance": instance_view(&instance) }),
    ))
}

// ---- action tagging, cost allocation, outcome definitions

async fn list_actions(
    State(state): State<ConsoleState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let snapshot = &caller.workspace;
    let seen = reads::seen_actions(&state, snapshot.workspace_id())
        .await
        .map_err(ApiError::unavailable)?;
    let mut names: Vec<Value> = seen
        .iter()
        .map(|row| {
            let rule = snapshot.rule(&row.name);
            json!({
                "name": row.name,
                "seen": row.seen,
                "last_seen": OffsetDateTime::from_unix_timestamp(i64::from(row.last_seen))
                    .ok()
                    .and_then(|at| at.format(&Rfc3339).ok()),
                "tracked": rule.tracked,
                "outcome": rule.outcome,
            })
        })
        .collect();
    // Tracked names not seen yet are listed too, so they can be untracked.
    for name in &snapshot.config.tagging.tracked {
        if !seen.iter().any(|row| &row.name == name) {
            names.push(
                json!({ "name": name, "seen": 0, "last_seen": null, "tracked": true,
                               "outcome": snapshot.rule(name).outcome }),
            );
        }
    }
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        json!({ "actions": names }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tracked {
    tracked: bool,
}

async fn set_tracked(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(action): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Tracked { tracked } = body(&bytes)?;
    let (version, ()) = write(&state, &caller, &headers, |config| {
        edits::set_tracked(config, &action, tracked)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "action": action, "tracked": tracked }),
    ))
}

async fn list_cost_allocations(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "cost_allocations": caller.workspace.config.cost_allocations }),
    )
}

async fn schedule_rate(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(action): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let new: NewRate = body(&bytes)?;
    let rate = new.rate()?;
    let (version, allocation) = write(&state, &caller, &headers, |config| {
        edits::schedule_rate(config, &action, new.measure, new.quantity_attribute, rate)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "cost_allocation": allocation }),
    ))
}

async fn list_outcomes(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({
            "outcomes": caller.workspace.config.outcomes,
            "composite_outcomes": caller.workspace.config.composite_outcomes,
        }),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IsOutcome {
    outcome: bool,
}

async fn set_outcome(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(action): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let IsOutcome { outcome } = body(&bytes)?;
    let (version, ()) = write(&state, &caller, &headers, |config| {
        edits::set_outcome(config, &action, outcome)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "action": action, "outcome": outcome }),
    ))
}

// ---- billing: products and rate plans, subscriptions, invoices, revenue and margin

async fn list_products(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "products": caller.workspace.config.products }),
    )
}

async fn put_product(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let product: Product = body(&bytes)?;
    let (version, (product, created)) = write(&state, &caller, &headers, |config| {
        edits::put_product(config, &id, product)
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(versioned(status, version, json!({ "product": product })))
}

async fn list_subscriptions(caller: Caller) -> Response {
    versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "subscriptions": caller.workspace.config.subscriptions }),
    )
}

async fn create_subscription(
    State(state): State<ConsoleState>,
    caller: Caller,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let subscription: Subscription = body(&bytes)?;
    let (version, subscription) = write(&state, &caller, &headers, |config| {
        edits::create_subscription(config, subscription)
    })
    .await?;
    Ok(versioned(
        StatusCode::CREATED,
        version,
        json!({ "subscription": subscription }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionEnd {
    /// RFC 3339, exclusive.
    end: String,
}

async fn end_subscription(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let SubscriptionEnd { end } = body(&bytes)?;
    let end = OffsetDateTime::parse(end.trim(), &Rfc3339).map_err(|error| {
        ApiError::invalid(
            "end",
            format!("end {end:?} is not an RFC 3339 instant: {error}"),
        )
    })?;
    let (version, subscription) = write(&state, &caller, &headers, |config| {
        edits::end_subscription(config, &id, end)
    })
    .await?;
    Ok(versioned(
        StatusCode::OK,
        version,
        json!({ "subscription": subscription }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoicesQuery {
    account: Option<String>,
}

async fn list_invoices(
    State(state): State<ConsoleState>,
    caller: Caller,
    query: Result<Query<InvoicesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let rows = reads::invoices(
        &state,
        caller.workspace.workspace_id(),
        query.account.as_deref(),
    )
    .await
    .map_err(ApiError::unavailable)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.invoice_id,
                "number": row.number,
                "status": row.status,
                "account": row.account_id,
                "rate_plan": row.rate_plan,
                "agent_type": row.agent_type,
                "period_start": OffsetDateTime::from_unix_timestamp(i64::from(row.period_start))
                    .ok()
                    .and_then(|at| at.format(&Rfc3339).ok()),
                "currency": row.currency,
                "total": normalized(&row.total),
                "cost": normalized(&row.cost),
                "margin": (!row.margin.is_empty()).then(|| normalized(&row.margin)),
            })
        })
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "invoices": items }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    /// `json` (default) or `html` (the printable page).
    format: Option<String>,
}

async fn get_invoice(
    State(state): State<ConsoleState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<InvoiceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let html = match query.format.as_deref() {
        None | Some("json") => false,
        Some("html") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "format",
                format!("format {other:?} is not json or html"),
            ))
        }
    };
    let content = reads::invoice_content(&state, caller.workspace.workspace_id(), &id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::not_found(format!("invoice {id:?}")))?;
    let invoice: DraftInvoice = serde_json::from_str(&content).map_err(|error| {
        ApiError::unavailable(anyhow::anyhow!(
            "the stored invoice cannot be read: {error}"
        ))
    })?;
    if html {
        return Ok(axum::response::Html(invoice.to_html()).into_response());
    }
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "invoice": invoice }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevenueQuery {
    group_by: Option<RevenueGroup>,
}

async fn revenue(
    State(state): State<ConsoleState>,
    caller: Caller,
    query: Result<Query<RevenueQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|error| {
        ApiError::invalid(
            "group_by",
            format!(
                "{}; group_by is account, agent_type, rate_plan or month",
                error.body_text()
            ),
        )
    })?;
    let group = query.group_by.unwrap_or(RevenueGroup::Account);
    let rows = reads::revenue(&state, caller.workspace.workspace_id(), group)
        .await
        .map_err(ApiError::unavailable)?;
    let groups: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "key": row.group_key,
                "currency": row.currency,
                "invoices": row.invoices,
                "revenue": normalized(&row.revenue),
                "cost": normalized(&row.cost),
                "margin": (!row.margin.is_empty()).then(|| normalized(&row.margin)),
                "invoices_without_margin": row.without_margin,
            })
        })
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "groups": groups, "cost_currency": caller.workspace.currency() }),
    ))
}

// ---- reads from ClickHouse

fn time_bound(field: &str, text: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => OffsetDateTime::parse(text, &Rfc3339)
            .map(|at| (at.unix_timestamp_nanos() / 1_000) as i64)
            .map_err(|error| {
                ApiError::invalid(
                    field,
                    format!("{field} {text:?} is not an RFC 3339 instant: {error}"),
                )
            }),
    }
}

/// A usage read's day: `YYYY-MM-DD` (UTC) as the seconds of its start; `default` when absent.
fn day_bound(field: &str, text: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => edits::utc_day(field, text).map(OffsetDateTime::unix_timestamp),
    }
}

async fn live_data(
    State(state): State<ConsoleState>,
    caller: Caller,
    query: Result<Query<LiveDataFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filter = query_of(query)?;
    let page_max = state.settings.console.live_data_page_max;
    let limit = filter.limit.unwrap_or(100);
    if !(1..=page_max).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit {limit} must be 1 to {page_max}"),
        ));
    }
    let from = time_bound("from", filter.from.as_deref(), i64::MIN)?;
    let to = time_bound("to", filter.to.as_deref(), i64::MAX)?;
    let rows = reads::live_data(
        &state,
        caller.workspace.workspace_id(),
        &filter,
        from,
        to,
        limit,
    )
    .await
    .map_err(ApiError::unavailable)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            let occurred_at = OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(row.occurred_at_micros) * 1_000,
            )
            .ok()
            .and_then(|at| at.format(&Rfc3339).ok());
            let label = row.label();
            json!({
                "event_id": row.event_id,
                "occurred_at": occurred_at,
                "account": row.account_id,
                "agent_instance": row.agent_instance_id,
                "user_id": row.user_id,
                "kind": row.kind,
                "action": row.action_name,
                "tracked": row.tracked == 1,
                "label": label,
                "measure": row.measure,
                "quantity": normalized(&row.quantity),
                "cost": normalized(&row.cost),
                "currency": row.currency,
            })
        })
        .collect();
    let next_offset =
        (items.len() as u32 == limit).then(|| filter.offset.unwrap_or(0) + u64::from(limit));
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "items": items, "next_offset": next_offset }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    account: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    State(state): State<ConsoleState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let from = day_bound("from", query.from.as_deref(), 0)?;
    let to = day_bound("to", query.to.as_deref(), Days::UNBOUNDED)?;
    if to < from {
        return Err(ApiError::invalid(
            "to",
            format!(
                "to {:?} is before from {:?}",
                query.to.unwrap_or_default(),
                query.from.unwrap_or_default()
            ),
        ));
    }
    let days = Days::new(from, to)
        .ok_or_else(|| ApiError::invalid("from", "from and to must be dates".to_string()))?;
    if let Some(account) = &query.account {
        if !caller
            .workspace
            .config
            .accounts
            .iter()
            .any(|known| known.id == *account)
        {
            return Err(ApiError::not_found(format!("account {account:?}")));
        }
    }
    let workspace_id = caller.workspace.workspace_id();
    let account = query.account.as_deref();
    let (rows, users) = tokio::join!(
        reads::usage(&state, workspace_id, account, days),
        reads::users_per_account(&state, workspace_id, account, days),
    );
    let rows = rows.map_err(ApiError::unavailable)?;
    let users = users.map_err(ApiError::unavailable)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "account": row.account_id,
                "action": row.action_name,
                "measure": row.measure,
                "actions": row.actions,
                "quantity": normalized(&row.quantity),
                "cost": normalized(&row.cost),
                "outcomes": row.outcomes,
            })
        })
        .collect();
    let users: Vec<Value> = users
        .iter()
        .map(|row| json!({"account": row.account_id, "users": row.users}))
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "usage": items, "users": users, "currency": caller.workspace.currency() }),
    ))
}

async fn audit(State(state): State<ConsoleState>, caller: Caller) -> Result<Response, ApiError> {
    let rows = reads::audit_log(&state, caller.workspace.workspace_id())
        .await
        .map_err(ApiError::unavailable)?;
    let entries: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "version": row.version,
                "applied_at": OffsetDateTime::from_unix_timestamp(i64::from(row.applied_at))
                    .ok()
                    .and_then(|at| at.format(&Rfc3339).ok()),
                "changed_by": row.changed_by,
                "changes": serde_json::from_str::<Value>(&row.summary_json).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(versioned(
        StatusCode::OK,
        caller.workspace.version,
        json!({ "entries": entries }),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// (method, path) of every `.route(…)` of [`super::router`], read from this file's source,
    /// so a route added or removed without docs/openapi.json fails the test below.
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let source = include_str!("api.rs");
        let start = source.find("pub fn router").expect("router in source");
        let end = source[start..]
            .find(".with_state(state)")
            .expect("with_state")
            + start;
        let mut routes = BTreeSet::new();
        for chunk in source[start..end].split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).expect("a quoted path").to_string();
            for method in ["get", "post", "put", "patch", "delete"] {
                let call = format!("{method}(");
                let found = chunk.match_indices(&call).any(|(at, _)| {
                    at == 0
                        || !chunk.as_bytes()[at - 1].is_ascii_alphanumeric()
                            && chunk.as_bytes()[at - 1] != b'_'
                });
                if found {
                    routes.insert((method.to_string(), path.clone()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_of_the_router() {
        let document: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert_eq!(document["openapi"], "3.0.3");
        let mut documented = BTreeSet::new();
        for (path, operations) in document["paths"].as_object().unwrap() {
            for (method, operation) in operations.as_object().unwrap() {
                assert!(
                    operation["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path} has no summary"
                );
                // axum writes path parameters as {id}, as OpenAPI does.
                documented.insert((method.clone(), path.clone()));
            }
        }
        let routed = routes_in_source();
        assert!(routed.len() > 15, "the route parser found only {routed:?}");
        assert_eq!(routed, documented);
    }
}
