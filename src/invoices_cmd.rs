//! `agentmeter invoices preview`: the draft invoices of an account for the billing period that
//! contains an instant (default: now), computed from the exact usage in ClickHouse and the
//! workspace's configuration as last applied (docs/billing.md).
//!
//! Usage is attributed to a period by the start of its usage window (`aggregator.window_seconds`,
//! 60 s by default), so boundaries at whole minutes — periods always start at one — are exact.
//! A subscription to a product bills the usage of the account's agent instances of the
//! product's agent type (seats, which `seats_by_account_day` counts per account, excepted). Next
//! to each invoice the preview shows the cost of the same usage and, when the plan's currency is
//! the workspace's, the margin (total − cost).

use std::collections::HashMap;
use std::time::Duration;

use agentmeter_billing::invoice::{draft, plan_of, DraftInvoice};
use agentmeter_billing::period::coverage;
use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_schemas::catalog::Metric;
use agentmeter_schemas::metering::{is_valid_identifier, MeteringConfig};
use anyhow::Context;
use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::Settings;

#[derive(Debug, Subcommand)]
pub enum InvoicesCommand {
    /// Print the draft invoices of an account (or of every account) for the period containing
    /// --at (default now).
    Preview(PreviewArgs),
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// The account.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    pub account: Option<String>,
    /// Every account of the workspace.
    #[arg(long)]
    pub all: bool,
    /// An RFC 3339 instant in the period to preview (default: now).
    #[arg(long, value_parser = parse_instant)]
    pub at: Option<OffsetDateTime>,
    /// Print JSON (one array of invoices) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write each draft as a printable HTML page into this directory.
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
}

fn parse_instant(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|error| format!("{text:?} is not an RFC 3339 instant: {error}"))
}

pub async fn run(command: InvoicesCommand, settings: &Settings) -> anyhow::Result<()> {
    let InvoicesCommand::Preview(args) = command;
    anyhow::ensure!(
        is_valid_identifier(&args.workspace)
            && args.account.as_deref().is_none_or(is_valid_identifier),
        "--workspace and --account must be ids (letters, digits, '_', '-', '.', ':')"
    );
    let kafka = settings.kafka.clone();
    let configurations =
        tokio::task::spawn_blocking(move || read_config_topic(&kafka, Duration::from_secs(30)))
            .await??;
    let (record, _) = configurations.get(&args.workspace).with_context(|| {
        format!(
            "workspace {:?} has no configuration on the config topic",
            args.workspace
        )
    })?;
    let config = &record.config;
    let instant = args.at.unwrap_or_else(OffsetDateTime::now_utc);
    let zone = agentmeter_billing::period::time_zone(&config.workspace.time_zone)?;
    let mut previews = Vec::new();
    for subscription in config.subscriptions.iter().filter(|subscription| {
        args.all || args.account.as_deref() == Some(subscription.account.as_str())
    }) {
        let plan = plan_of(config, subscription)?;
        let Some(covered) = coverage(plan, subscription, instant, &zone)? else {
            continue;
        };
        let usage = UsageOf {
            workspace: &config.workspace.id,
            account: &subscription.account,
            instances: instances_of(config, subscription),
            from: clickhouse_time(covered.from),
            to: clickhouse_time(covered.to),
        };
        let quantities = read_quantities(settings, plan, &usage)
            .await
            .with_context(|| format!("subscription {:?}", subscription.id))?;
        let invoice = draft(config, subscription, &covered, &quantities)?;
        let cost = read_cost(settings, &usage)
            .await
            .with_context(|| format!("subscription {:?}: cost", subscription.id))?;
        let margin = (invoice.currency == config.workspace.currency).then(|| invoice.total - cost);
        previews.push(Preview {
            invoice,
            cost,
            cost_currency: config.workspace.currency.clone(),
            margin,
        });
    }
    if let Some(directory) = &args.html {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
        for preview in &previews {
            let invoice = &preview.invoice;
            let path = directory.join(format!(
                "{}-{}.html",
                invoice.subscription_id,
                invoice.period_start.date()
            ));
            std::fs::write(&path, invoice.to_html())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&previews)?);
    } else if previews.is_empty() {
        println!(
            "{} of workspace {:?} has no subscription in force at {instant}",
            args.account
                .as_deref()
                .map_or("no account".to_string(), |account| format!(
                    "account {account:?}"
                )),
            args.workspace
        );
    } else {
        for preview in &previews {
            print!("{}", DraftInvoice::to_text(&preview.invoice));
            let margin = match preview.margin {
                Some(margin) => format!("margin {margin} {}", preview.cost_currency),
                None => format!(
                    "no margin: the plan bills in {}, costs are in {} (no exchange rate configured)",
                    preview.invoice.currency, preview.cost_currency
                ),
            };
            println!(
                "  cost of this usage {} {}; {margin}",
                preview.cost.round_dp(2),
                preview.cost_currency
            );
        }
    }
    Ok(())
}

/// A draft invoice with the cost of the usage it bills.
#[derive(Debug, serde::Serialize)]
struct Preview {
    #[serde(flatten)]
    invoice: DraftInvoice,
    /// The allocated cost of the same usage (exact), in the workspace's currency.
    cost: Decimal,
    cost_currency: String,
    /// `total − cost`, when both are in one currency.
    margin: Option<Decimal>,
}

/// Whose usage, and when: the account's agent instances of the product's agent type, in
/// `[from, to)`.
struct UsageOf<'a> {
    workspace: &'a str,
    account: &'a str,
    instances: Vec<String>,
    from: String,
    to: String,
}

fn instances_of(
    config: &MeteringConfig,
    subscription: &agentmeter_schemas::catalog::Subscription,
) -> Vec<String> {
    let agent_type = config
        .products
        .iter()
        .find(|product| product.id == subscription.product)
        .map(|product| product.agent_type.as_str());
    config
        .agent_instances
        .iter()
        .filter(|instance| {
            instance.account == subscription.account
                && Some(instance.agent_type.as_str()) == agent_type
        })
        .map(|instance| instance.id.clone())
        .collect()
}

async fn read_cost(settings: &Settings, usage: &UsageOf<'_>) -> anyhow::Result<Decimal> {
    if usage.instances.is_empty() {
        return Ok(Decimal::ZERO);
    }
    let query = format!(
        "SELECT toString(sum(cost)) AS quantity {}",
        usage_clause(&settings.clickhouse.database)
    );
    let row = bind_usage(settings.clickhouse.client().query(&query), usage)
        .fetch_one::<QuantityRow>()
        .await?;
    exact_decimal(&row.quantity)
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct QuantityRow {
    quantity: String,
}

/// The period's quantity of every usage charge of `plan`, from ClickHouse.
async fn read_quantities(
    settings: &Settings,
    plan: &agentmeter_schemas::catalog::RatePlan,
    usage: &UsageOf<'_>,
) -> anyhow::Result<HashMap<String, Decimal>> {
    let database = &settings.clickhouse.database;
    let client = settings.clickhouse.client();
    let from_usage = usage_clause(database);
    let mut quantities = HashMap::new();
    for charge in &plan.charges {
        let metric = charge
            .metric()
            .map_err(|problem| anyhow::anyhow!("charge {:?}: {problem}", charge.id))?;
        if usage.instances.is_empty() && !matches!(metric, Metric::Seats) {
            // No agent of the product's type: nothing to count (and 18.16 cannot `has` an
            // empty array).
            quantities.insert(charge.id.clone(), Decimal::ZERO);
            continue;
        }
        // A sum over the usage rows, of all action names or only some.
        let sum_of_names = |sum: &str, condition: &str, only: &[String]| {
            let sql = format!(
                "SELECT toString({sum}) AS quantity {from_usage}{condition}{}",
                names_clause(only)
            );
            bind_names(bind_usage(client.query(&sql), usage), only)
        };
        let query = match &metric {
            Metric::Fee => continue,
            Metric::Actions { only } => sum_of_names("sum(action_count)", "", only),
            Metric::Outcomes { only } => sum_of_names("sum(outcome_count)", " AND outcome = 1", only),
            Metric::Measure { action, measure } => bind_usage(
                client.query(&format!(
                    "SELECT toString(sum(quantity)) AS quantity {from_usage} AND action_name = ? AND measure = ?"
                )),
                usage,
            )
            .bind(action)
            .bind(measure),
            Metric::Users => bind_usage(
                client.query(&format!(
                    "SELECT toString(uniqExact(user_key)) AS quantity {from_usage} AND user_key != ''"
                )),
                usage,
            ),
            // The period's peak of the trailing-30-days seats of the account (docs/billing.md).
            Metric::Seats => client
                .query(&format!(
                    "SELECT toString(max(seats)) AS quantity FROM {database}.seats_by_account_day \
                     WHERE workspace_id = ? AND account_id = ? \
                     AND day >= toDate(toDateTime(?, 'UTC')) AND day <= toDate(toDateTime(?, 'UTC') - 1)"
                ))
                .bind(usage.workspace)
                .bind(usage.account)
                .bind(&usage.from)
                .bind(&usage.to),
        };
        let row = query
            .fetch_one::<QuantityRow>()
            .await
            .with_context(|| format!("cannot read the quantity of charge {:?}", charge.id))?;
        let quantity =
            exact_decimal(&row.quantity).with_context(|| format!("charge {:?}", charge.id))?;
        quantities.insert(charge.id.clone(), quantity);
    }
    Ok(quantities)
}

/// The billable usage of [`UsageOf`]; binds workspace, account, instances, from, to.
fn usage_clause(database: &str) -> String {
    format!(
        "FROM {database}.usage_exact WHERE workspace_id = ? AND account_id = ? \
         AND has(?, agent_instance_id) AND tracked = 1 \
         AND window_start >= toDateTime(?, 'UTC') AND window_start < toDateTime(?, 'UTC')"
    )
}

fn bind_usage(query: clickhouse::query::Query, usage: &UsageOf<'_>) -> clickhouse::query::Query {
    query
        .bind(usage.workspace)
        .bind(usage.account)
        .bind(&usage.instances)
        .bind(&usage.from)
        .bind(&usage.to)
}

/// A decimal of ClickHouse's text, exactly, or an error: trailing zeros of the scale-12 text
/// are not digits to keep.
fn exact_decimal(text: &str) -> anyhow::Result<Decimal> {
    let trimmed = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    };
    Decimal::from_str_exact(trimmed)
        .with_context(|| format!("ClickHouse answered {text:?}, not an exact decimal"))
}

/// ` AND has(?, action_name)` when only some names count. (ClickHouse 18.16 cannot `has` an
/// empty array literal against a string, so no names means no clause.)
fn names_clause(only: &[String]) -> &'static str {
    if only.is_empty() {
        ""
    } else {
        " AND has(?, action_name)"
    }
}

fn bind_names(query: clickhouse::query::Query, only: &[String]) -> clickhouse::query::Query {
    if only.is_empty() {
        query
    } else {
        query.bind(only)
    }
}

/// `YYYY-MM-DD hh:mm:ss` in UTC, as ClickHouse's `toDateTime` reads it.
fn clickhouse_time(instant: OffsetDateTime) -> String {
    let utc = instant.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        utc.year(),
        utc.month() as u8,
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    )
}
