//! `agentmeter invoices preview`: the draft invoices of an account for the billing period that
//! contains an instant (default: now), computed from the exact usage in ClickHouse and the
//! workspace's configuration as last applied (docs/billing.md).
//!
//! `agentmeter invoices finalize | void | list | show`: finalized invoices (ADR 0004). Finalizing
//! appends each draft's whole content to the finalization log (`<prefix>billing.finalizations`,
//! one partition) unless the log already has that invoice; then the log is projected into the
//! `invoices` table, where the first record of an invoice wins and its number is its position
//! among the workspace's winning records (`agentmeter_billing::finalization`). A finalizer
//! killed at any instant, or two at once, leave no gap and no duplicate.
//!
//! Usage is attributed to a period by the start of its usage window (`aggregator.window_seconds`,
//! 60 s by default), so boundaries at whole minutes — periods always start at one — are exact.
//! A subscription to a product bills the usage of the account's agent instances of the
//! product's agent type (seats, which `seats_by_account_day` counts per account, excepted). Next
//! to each invoice the preview shows the cost of the same usage and, when the plan's currency is
//! the workspace's, the margin (total − cost).

use std::collections::HashMap;
use std::time::Duration;

use agentmeter_billing::finalization::{
    billed_periods, correction, invoice_id, project, CostAtFinalization, FinalizedInvoice,
    LogRecord,
};
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
    /// Finalize the invoices of an account (or of every account) for the period containing
    /// --at (default: the last period whose grace period is over), once its grace is over.
    Finalize(FinalizeArgs),
    /// Void a finalized invoice (it keeps its number; a corrected one is finalized anew).
    Void(VoidArgs),
    /// List the finalized invoices of a workspace.
    List(ListArgs),
    /// Print one finalized invoice, as it was frozen.
    Show(ShowArgs),
}

/// Whose invoices, and for which period.
#[derive(Debug, Args)]
pub struct Selection {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// The account.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    pub account: Option<String>,
    /// Every account of the workspace.
    #[arg(long)]
    pub all: bool,
    /// An RFC 3339 instant in the period (default: for `preview` now, for `finalize` the last
    /// period whose grace period is over).
    #[arg(long, value_parser = parse_instant, conflicts_with = "period")]
    pub at: Option<OffsetDateTime>,
    /// The period starting on (or containing) this date in the workspace's time zone:
    /// `YYYY-MM` or `YYYY-MM-DD`.
    #[arg(long)]
    pub period: Option<String>,
}

#[derive(Debug, Args)]
pub struct FinalizeArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// How long after a period's end its invoices stay drafts, so that late actions are still
    /// on them ([humantime](https://docs.rs/humantime) syntax).
    #[arg(long, default_value = "72h", value_parser = parse_grace)]
    pub grace: Duration,
}

#[derive(Debug, Args)]
pub struct VoidArgs {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// The invoice's number.
    #[arg(long)]
    pub number: u64,
    /// Why (kept with the invoice).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// The invoice's number.
    #[arg(long)]
    pub number: u64,
    /// Print the frozen JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the invoice as a printable HTML page to this file.
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
}

fn parse_grace(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        format!("{text:?} is not a duration ({error}); write e.g. \"72h\", \"3days\"")
    })
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub selection: Selection,
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
    match command {
        InvoicesCommand::Preview(args) => preview(args, settings).await,
        InvoicesCommand::Finalize(args) => finalize(args, settings).await,
        InvoicesCommand::Void(args) => void(args, settings).await,
        InvoicesCommand::List(args) => list(args, settings).await,
        InvoicesCommand::Show(args) => show(args, settings).await,
    }
}

/// The first instant of `--period` in the workspace's time zone.
fn period_start(config: &MeteringConfig, period: &str) -> anyhow::Result<OffsetDateTime> {
    let zone = agentmeter_billing::period::time_zone(&config.workspace.time_zone)?;
    Ok(agentmeter_billing::period::start_of_day(period, &zone)?)
}

pub(crate) fn check_ids(workspace: &str, account: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_valid_identifier(workspace) && account.is_none_or(is_valid_identifier),
        "--workspace and --account must be ids (letters, digits, '_', '-', '.', ':')"
    );
    Ok(())
}

/// The workspace's configuration as last applied.
pub(crate) async fn workspace_config(
    settings: &Settings,
    workspace: &str,
) -> anyhow::Result<agentmeter_schemas::metering::ConfigRecord> {
    let kafka = settings.kafka.clone();
    let mut configurations =
        tokio::task::spawn_blocking(move || read_config_topic(&kafka, Duration::from_secs(30)))
            .await??;
    let (record, _) = configurations.remove(workspace).with_context(|| {
        format!("workspace {workspace:?} has no configuration on the config topic")
    })?;
    Ok(record)
}

async fn preview(args: PreviewArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.selection.workspace, args.selection.account.as_deref())?;
    let record = workspace_config(settings, &args.selection.workspace).await?;
    let instant = match (&args.selection.period, args.selection.at) {
        (Some(period), _) => period_start(&record.config, period)?,
        (None, at) => at.unwrap_or_else(OffsetDateTime::now_utc),
    };
    let previews = drafts(
        settings,
        &record.config,
        args.selection.account.as_deref(),
        instant,
    )
    .await?;
    let kafka = settings.kafka.clone();
    let log = tokio::task::spawn_blocking(move || {
        crate::invoice_log::read_log(&kafka, Duration::from_secs(60))
    })
    .await??;
    let finalized = project(log);
    let mut corrected = Vec::with_capacity(previews.len());
    for preview in previews {
        corrected
            .push(with_pending_corrections(settings, &record.config, &finalized, preview).await?);
    }
    let previews = corrected;
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
            args.selection
                .account
                .as_deref()
                .map_or("no account".to_string(), |account| format!(
                    "account {account:?}"
                )),
            args.selection.workspace
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

async fn finalize(args: FinalizeArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.selection.workspace, args.selection.account.as_deref())?;
    let grace = time::Duration::try_from(args.grace).context("--grace is too long")?;
    let record = workspace_config(settings, &args.selection.workspace).await?;
    let which = match (&args.selection.period, args.selection.at) {
        (Some(period), _) => Periods::Containing(period_start(&record.config, period)?),
        (None, Some(at)) => Periods::Containing(at),
        (None, None) => Periods::LastClosed { lookback: 1 },
    };
    let outcomes = finalize_closed_periods(
        settings,
        &record,
        args.selection.account.as_deref(),
        which,
        grace,
        OffsetDateTime::now_utc(),
    )
    .await?;
    for outcome in &outcomes {
        println!("{outcome}");
    }
    if outcomes.is_empty() {
        println!("no subscription in force in the periods asked for");
    }
    Ok(())
}

/// Which periods of each subscription to finalize.
#[derive(Debug, Clone, Copy)]
pub enum Periods {
    /// The period containing this instant.
    Containing(OffsetDateTime),
    /// The last `lookback` periods whose grace period is over, oldest first.
    LastClosed { lookback: usize },
}

/// What finalizing one period of one subscription came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Finalization {
    Finalized {
        number: u64,
        account: String,
        subscription: String,
        period_start: OffsetDateTime,
        total: Decimal,
        currency: String,
        corrections: usize,
    },
    AlreadyFinalized {
        subscription: String,
        period_start: OffsetDateTime,
    },
    NotClosed {
        subscription: String,
        period_start: OffsetDateTime,
        closes: OffsetDateTime,
    },
}

impl std::fmt::Display for Finalization {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finalization::Finalized {
                number,
                account,
                subscription,
                period_start,
                total,
                currency,
                corrections,
            } => write!(
                formatter,
                "finalized invoice {number} — {account} {subscription} {}: {total} {currency}{}",
                period_start.date(),
                if *corrections > 0 {
                    format!(" ({corrections} corrections of earlier periods)")
                } else {
                    String::new()
                }
            ),
            Finalization::AlreadyFinalized {
                subscription,
                period_start,
            } => write!(
                formatter,
                "{subscription} {}: already finalized",
                period_start.date()
            ),
            Finalization::NotClosed {
                subscription,
                period_start,
                closes,
            } => write!(
                formatter,
                "{subscription} {}: its grace period ends {closes}; not finalized yet",
                period_start.date()
            ),
        }
    }
}

/// Finalizes the `which` periods of the subscriptions of `account` (every account's when
/// `None`) in the workspace of `record`, each once its grace period is over (ADR 0004). Periods
/// are finalized one at a time, oldest first, each against the log as it is then, so a later
/// period's corrections see the earlier one's invoice.
pub async fn finalize_closed_periods(
    settings: &Settings,
    record: &agentmeter_schemas::metering::ConfigRecord,
    account: Option<&str>,
    which: Periods,
    grace: time::Duration,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<Finalization>> {
    let config = &record.config;
    let zone = agentmeter_billing::period::time_zone(&config.workspace.time_zone)?;
    let mut outcomes = Vec::new();
    for subscription in config
        .subscriptions
        .iter()
        .filter(|subscription| account.is_none_or(|account| account == subscription.account))
    {
        let plan = plan_of(config, subscription)?;
        let mut starts = Vec::new();
        match which {
            Periods::Containing(instant) => {
                if let Some(covered) = coverage(plan, subscription, instant, &zone)? {
                    starts.push(covered.period.start);
                }
            }
            Periods::LastClosed { lookback } => {
                // The period containing now − grace is not closed yet (it ends after now −
                // grace); the ones before it are.
                let mut instant = now
                    .checked_sub(grace)
                    .context("the grace period is too long")?;
                if let Some(open) = coverage(plan, subscription, instant, &zone)? {
                    instant = open.period.start - time::Duration::seconds(1);
                    for _ in 0..lookback {
                        let Some(covered) = coverage(plan, subscription, instant, &zone)? else {
                            break;
                        };
                        starts.push(covered.period.start);
                        instant = covered.period.start - time::Duration::seconds(1);
                    }
                }
                starts.reverse();
            }
        }
        for start in starts {
            if let Some(outcome) =
                finalize_one(settings, record, subscription, start, grace, now).await?
            {
                outcomes.push(outcome);
            }
        }
    }
    Ok(outcomes)
}

/// Finalizes the period of `subscription` that starts at `period_start` (see
/// [`finalize_closed_periods`]); `None` when the subscription bills nothing in it.
async fn finalize_one(
    settings: &Settings,
    record: &agentmeter_schemas::metering::ConfigRecord,
    subscription: &agentmeter_schemas::catalog::Subscription,
    period_start: OffsetDateTime,
    grace: time::Duration,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Finalization>> {
    // The log first: an already finalized period (every run of the billing stage meets its
    // last ones again) costs no draft.
    let id = invoice_id(
        &record.config.workspace.id,
        &subscription.account,
        &subscription.id,
        period_start,
    );
    let kafka = settings.kafka.clone();
    let log = tokio::task::spawn_blocking(move || {
        crate::invoice_log::read_log(&kafka, Duration::from_secs(60))
    })
    .await??;
    if log.iter().any(|(_, record)| record.invoice_id() == id) {
        return Ok(Some(Finalization::AlreadyFinalized {
            subscription: subscription.id.clone(),
            period_start,
        }));
    }
    let Some(preview) = drafts(
        settings,
        &record.config,
        Some(&subscription.account),
        period_start,
    )
    .await?
    .into_iter()
    .find(|preview| preview.invoice.subscription_id == subscription.id) else {
        return Ok(None);
    };
    let invoice = &preview.invoice;
    let closes = invoice
        .period_end
        .checked_add(grace)
        .context("the grace period is too long")?;
    if closes > now {
        return Ok(Some(Finalization::NotClosed {
            subscription: subscription.id.clone(),
            period_start: invoice.period_start,
            closes,
        }));
    }
    // Usage of earlier finalized periods that changed since: corrections, frozen with it.
    let finalized = project(log);
    let preview = with_pending_corrections(settings, &record.config, &finalized, preview).await?;
    let agent_type = record
        .config
        .products
        .iter()
        .find(|product| product.id == subscription.product)
        .map(|product| product.agent_type.clone())
        .unwrap_or_default();
    let appended = LogRecord::Finalize {
        invoice_id: id.clone(),
        config_version: u64::try_from(record.version).unwrap_or(0),
        finalized_at: now,
        cost: CostAtFinalization {
            agent_type,
            cost: preview.cost,
            cost_currency: preview.cost_currency,
        },
        invoice: Box::new(preview.invoice),
    };
    crate::invoice_log::append(&settings.kafka, std::slice::from_ref(&appended)).await?;
    // Whatever this process appended, and whatever others did, the log decides: project it.
    let invoices = crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    let winner = invoices
        .iter()
        .find(|finalized| finalized.invoice_id == id)
        .context("the finalization record is not in the log after appending it")?;
    Ok(Some(Finalization::Finalized {
        number: winner.invoice.number.unwrap_or(0),
        account: winner.invoice.bill_to.account_id.clone(),
        subscription: winner.invoice.subscription_id.clone(),
        period_start: winner.invoice.period_start,
        total: winner.invoice.total,
        currency: winner.invoice.currency.clone(),
        corrections: winner.invoice.corrections.len(),
    }))
}

/// `preview` with the corrections of its subscription's earlier finalized periods whose usage,
/// priced now with the configuration in force, differs from what was billed for them
/// (`agentmeter_billing::finalization::billed_periods`).
async fn with_pending_corrections(
    settings: &Settings,
    config: &MeteringConfig,
    finalized: &[FinalizedInvoice],
    mut preview: Preview,
) -> anyhow::Result<Preview> {
    let invoice = &preview.invoice;
    let billed = billed_periods(
        finalized,
        &invoice.workspace_id,
        &invoice.subscription_id,
        invoice.period_start,
    )?;
    let mut fixes = Vec::new();
    for period in &billed {
        let now = drafts(
            settings,
            config,
            Some(&invoice.bill_to.account_id),
            period.period_start,
        )
        .await?
        .into_iter()
        .find(|draft| draft.invoice.subscription_id == invoice.subscription_id);
        // A subscription no longer in force in that period (its dates changed) is not priced.
        let Some(now) = now else { continue };
        if let Some(fix) = correction(period, &now.invoice)? {
            fixes.push(fix);
        }
    }
    let corrected = fixes
        .iter()
        .try_fold(Decimal::ZERO, |sum, fix| sum.checked_add(fix.amount))
        .context("the corrections' sum overflows")?;
    preview.invoice = preview.invoice.with_corrections(fixes)?;
    if let Some(margin) = preview.margin {
        preview.margin = Some(
            margin
                .checked_add(corrected)
                .context("the margin with corrections overflows")?,
        );
    }
    Ok(preview)
}

/// The finalized invoice `number` of `workspace`, from the log.
async fn finalized_invoice(
    settings: &Settings,
    workspace: &str,
    number: u64,
) -> anyhow::Result<FinalizedInvoice> {
    let invoices = crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    invoices
        .into_iter()
        .find(|finalized| {
            finalized.invoice.workspace_id == workspace && finalized.invoice.number == Some(number)
        })
        .with_context(|| format!("workspace {workspace:?} has no finalized invoice {number}"))
}

async fn void(args: VoidArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.workspace, None)?;
    anyhow::ensure!(
        !args.reason.trim().is_empty() && !args.reason.chars().any(char::is_control),
        "--reason must be a line of text"
    );
    let finalized = finalized_invoice(settings, &args.workspace, args.number).await?;
    if let Some(reason) = &finalized.void_reason {
        println!("invoice {} is already void ({reason})", args.number);
        return Ok(());
    }
    let record = LogRecord::Void {
        invoice_id: finalized.invoice_id,
        workspace_id: args.workspace.clone(),
        reason: args.reason,
        voided_at: OffsetDateTime::now_utc(),
    };
    crate::invoice_log::append(&settings.kafka, std::slice::from_ref(&record)).await?;
    crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    println!("voided invoice {} of {}", args.number, args.workspace);
    Ok(())
}

async fn list(args: ListArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.workspace, None)?;
    // The log is the truth: project it first (a finalizer that died after appending, or a
    // re-created table after a migration), then read the table.
    crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    let rows = settings
        .clickhouse
        .client()
        .with_database(&settings.clickhouse.database)
        .query("SELECT ?fields FROM invoices FINAL WHERE workspace_id = ? ORDER BY number")
        .bind(&args.workspace)
        .fetch_all::<crate::invoice_log::InvoiceRow>()
        .await
        .context("cannot read the invoices table")?;
    if args.json {
        let invoices: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| serde_json::from_str(&row.content))
            .collect::<Result<_, _>>()?;
        println!("{}", serde_json::to_string_pretty(&invoices)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("workspace {:?} has no finalized invoice", args.workspace);
    }
    for row in rows {
        let invoice: DraftInvoice = serde_json::from_str(&row.content)?;
        println!(
            "{:>6}  {:<9} {:<24} {:<24} {} – {}  {:>14} {}",
            row.number,
            row.status,
            row.account_id,
            row.subscription_id,
            invoice.period_start.date(),
            invoice.period_end.date(),
            invoice.total,
            invoice.currency
        );
    }
    Ok(())
}

async fn show(args: ShowArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.workspace, None)?;
    let finalized = finalized_invoice(settings, &args.workspace, args.number).await?;
    let invoice = &finalized.invoice;
    if let Some(path) = &args.html {
        std::fs::write(path, invoice.to_html())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(invoice)?);
    } else {
        print!("{}", invoice.to_text());
        if let Some(reason) = &finalized.void_reason {
            println!("  void: {reason}");
        }
        println!(
            "  finalized {} with configuration version {}",
            finalized.finalized_at, finalized.config_version
        );
    }
    Ok(())
}

/// The drafts of `account`'s subscriptions (every account's when `None`) for the periods
/// containing `instant`, with the cost of the usage they bill.
pub(crate) async fn drafts(
    settings: &Settings,
    config: &MeteringConfig,
    account: Option<&str>,
    instant: OffsetDateTime,
) -> anyhow::Result<Vec<Preview>> {
    let zone = agentmeter_billing::period::time_zone(&config.workspace.time_zone)?;
    let mut previews = Vec::new();
    for subscription in config
        .subscriptions
        .iter()
        .filter(|subscription| account.is_none_or(|account| account == subscription.account))
    {
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
    Ok(previews)
}

/// A draft invoice with the cost of the usage it bills.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Preview {
    #[serde(flatten)]
    pub(crate) invoice: DraftInvoice,
    /// The allocated cost of the same usage (exact), in the workspace's currency.
    pub(crate) cost: Decimal,
    pub(crate) cost_currency: String,
    /// `total − cost`, when both are in one currency.
    pub(crate) margin: Option<Decimal>,
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
