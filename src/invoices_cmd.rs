//! `agentmeter invoices preview`: the draft invoices of an account for the billing period that
//! contains an instant (default: now), computed from the exact usage in ClickHouse and the
//! workspace's configuration as last applied (docs/billing.md).
//!
//! `agentmeter invoices finalize | void | reissue | list | show`: finalized invoices (ADR 0004). Finalizing
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
//! to each invoice the preview shows the cost of the same usage and the margin (total − cost),
//! through the exchange rate in force at the period end when the plan bills in another
//! currency than the workspace's costs (`agentmeter_billing::exchange`).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use agentmeter_billing::finalization::{
    billed_periods, correction, invoice_id, project, reissue_id, reissue_takeback,
    CostAtFinalization, FinalizedInvoice, LogRecord,
};
use agentmeter_billing::invoice::{draft, plan_of, DraftInvoice};
use agentmeter_billing::period::coverage;
use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_schemas::metering::{is_valid_identifier, MeteringConfig};
use anyhow::Context;
use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::period_usage::{Needed, PeriodUsage};
use crate::Settings;

#[derive(Debug, Subcommand)]
pub enum InvoicesCommand {
    /// Print the draft invoices of an account (or of every account) for the period containing
    /// --at (default now).
    Preview(PreviewArgs),
    /// Finalize the invoices of an account (or of every account) for the period containing
    /// --at (default: the last period whose grace period is over), once its grace is over.
    Finalize(FinalizeArgs),
    /// Void a finalized invoice (it keeps its number; `reissue` finalizes a corrected one).
    Void(VoidArgs),
    /// Replace a void invoice by a new one of the same subscription and period, drafted anew
    /// (usage and configuration now), with the workspace's next number.
    Reissue(ReissueArgs),
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
pub struct ReissueArgs {
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// The number of the void invoice to replace.
    #[arg(long)]
    pub number: u64,
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
        InvoicesCommand::Reissue(args) => reissue(args, settings).await,
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
    let mut earlier_drafts =
        DraftCache::new(settings, &record.config, args.selection.account.as_deref());
    let mut corrected = Vec::with_capacity(previews.len());
    for preview in previews {
        corrected.push(with_pending_corrections(&mut earlier_drafts, &finalized, preview).await?);
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
            let margin = match (preview.margin, preview.exchange_rate) {
                (Some(margin), None) => format!("margin {margin} {}", preview.cost_currency),
                (Some(margin), Some(rate)) => format!(
                    "margin {margin} {cost} (the total converted at {rate} {cost} per {currency}, the rate in force at the period's end)",
                    cost = preview.cost_currency,
                    currency = preview.invoice.currency
                ),
                (None, _) => format!(
                    "no margin: the plan bills in {currency}, costs are in {cost}, and no exchange rate {currency} → {cost} is in force at the period's end (add one to [[exchange_rates]])",
                    currency = preview.invoice.currency,
                    cost = preview.cost_currency
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
/// `None`) in the workspace of `record`, each once its grace period is over (ADR 0004).
///
/// Periods are finalized in rounds, oldest first: round *k* takes the *k*-th oldest period of
/// every subscription, against the log as it is after round *k − 1*, so a later period's
/// corrections see the earlier one's invoice. Within a round the subscriptions do not depend on
/// each other (corrections are per subscription), so a round reads the log once, drafts from
/// one usage read per period ([`DraftCache`]), appends all its records at once and projects
/// once — a month-end run over 1,000 accounts is a few ClickHouse queries and one append, not
/// thousands. A run killed in the middle of an append leaves some records in the log and not
/// others; the next run finds the first finalized and finalizes the rest.
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
    let mut periods_of_subscriptions = Vec::new();
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
        periods_of_subscriptions.push((subscription, starts));
    }
    let rounds = periods_of_subscriptions
        .iter()
        .map(|(_, starts)| starts.len())
        .max()
        .unwrap_or(0);
    let mut drafts = DraftCache::new(settings, config, account);
    // (subscription's position, round, outcome): reported per subscription, oldest first.
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        let kafka = settings.kafka.clone();
        let log = tokio::task::spawn_blocking(move || {
            crate::invoice_log::read_log(&kafka, Duration::from_secs(60))
        })
        .await??;
        let in_log: std::collections::HashSet<String> = log
            .iter()
            .map(|(_, record)| record.invoice_id().to_string())
            .collect();
        let finalized = project(log);
        // The records this round appends, and (subscription's position, invoice id) of each.
        let mut records = Vec::new();
        let mut appended = Vec::new();
        for (position, (subscription, starts)) in periods_of_subscriptions.iter().enumerate() {
            let Some(&period_start) = starts.get(round) else {
                continue;
            };
            let id = invoice_id(
                &config.workspace.id,
                &subscription.account,
                &subscription.id,
                period_start,
            );
            // The log first: an already finalized period (every run of the billing stage meets
            // its last ones again) costs no draft.
            if in_log.contains(&id) {
                outcomes.push((
                    position,
                    round,
                    Finalization::AlreadyFinalized {
                        subscription: subscription.id.clone(),
                        period_start,
                    },
                ));
                continue;
            }
            let Some(preview) = drafts.draft(&subscription.id, period_start).await? else {
                continue;
            };
            let closes = preview
                .invoice
                .period_end
                .checked_add(grace)
                .context("the grace period is too long")?;
            if closes > now {
                outcomes.push((
                    position,
                    round,
                    Finalization::NotClosed {
                        subscription: subscription.id.clone(),
                        period_start: preview.invoice.period_start,
                        closes,
                    },
                ));
                continue;
            }
            // Usage of earlier finalized periods that changed since: corrections, frozen with it.
            let preview = with_pending_corrections(&mut drafts, &finalized, preview).await?;
            records.push(finalize_record(
                record,
                subscription,
                preview,
                &id,
                now,
                None,
            ));
            appended.push((position, id));
        }
        if records.is_empty() {
            continue;
        }
        crate::invoice_log::append(&settings.kafka, &records).await?;
        // Whatever this process appended, and whatever others did, the log decides: project it.
        let invoices =
            crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
        for (position, id) in appended {
            let winner = invoices
                .iter()
                .find(|finalized| finalized.invoice_id == id)
                .context("a finalization record is not in the log after appending it")?;
            outcomes.push((
                position,
                round,
                Finalization::Finalized {
                    number: winner.invoice.number.unwrap_or(0),
                    account: winner.invoice.bill_to.account_id.clone(),
                    subscription: winner.invoice.subscription_id.clone(),
                    period_start: winner.invoice.period_start,
                    total: winner.invoice.total,
                    currency: winner.invoice.currency.clone(),
                    corrections: winner.invoice.corrections.len(),
                },
            ));
        }
    }
    outcomes.sort_by_key(|(position, round, _)| (*position, *round));
    Ok(outcomes
        .into_iter()
        .map(|(_, _, outcome)| outcome)
        .collect())
}

/// The drafts of one scope (an account, or every account when `None`) by the instant whose
/// periods they are for, each drafted once per run. A draft is a function of the configuration
/// and the usage, not of the finalization log, so every subscription finalized, and every earlier
/// period re-priced for corrections, in one run can share it.
pub(crate) struct DraftCache<'a> {
    settings: &'a Settings,
    config: &'a MeteringConfig,
    scope: Option<&'a str>,
    drafts_at: HashMap<OffsetDateTime, Vec<Preview>>,
}

impl<'a> DraftCache<'a> {
    pub(crate) fn new(
        settings: &'a Settings,
        config: &'a MeteringConfig,
        scope: Option<&'a str>,
    ) -> DraftCache<'a> {
        DraftCache {
            settings,
            config,
            scope,
            drafts_at: HashMap::new(),
        }
    }

    /// The draft of `subscription` for its period containing `instant`, if it is in force then.
    pub(crate) async fn draft(
        &mut self,
        subscription: &str,
        instant: OffsetDateTime,
    ) -> anyhow::Result<Option<Preview>> {
        if !self.drafts_at.contains_key(&instant) {
            let previews = drafts(self.settings, self.config, self.scope, instant).await?;
            self.drafts_at.insert(instant, previews);
        }
        Ok(self.drafts_at[&instant]
            .iter()
            .find(|preview| preview.invoice.subscription_id == subscription)
            .cloned())
    }
}

/// The record finalizing `preview` of `subscription` as the invoice `id` (a reissue of the void
/// invoice `reissues`), with its cost and exchange rate frozen.
fn finalize_record(
    record: &agentmeter_schemas::metering::ConfigRecord,
    subscription: &agentmeter_schemas::catalog::Subscription,
    preview: Preview,
    id: &str,
    now: OffsetDateTime,
    reissues: Option<String>,
) -> LogRecord {
    let agent_type = record
        .config
        .products
        .iter()
        .find(|product| product.id == subscription.product)
        .map(|product| product.agent_type.clone())
        .unwrap_or_default();
    LogRecord::Finalize {
        invoice_id: id.to_string(),
        config_version: u64::try_from(record.version).unwrap_or(0),
        finalized_at: now,
        cost: CostAtFinalization {
            agent_type,
            cost: preview.cost,
            cost_currency: preview.cost_currency,
            exchange_rate: preview.exchange_rate,
        },
        invoice: Box::new(preview.invoice),
        reissues,
    }
}

/// `preview` with the corrections of its subscription's earlier finalized periods whose usage,
/// priced now with the configuration in force, differs from what was billed for them
/// (`agentmeter_billing::finalization::billed_periods`).
async fn with_pending_corrections(
    drafts: &mut DraftCache<'_>,
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
        let now = drafts
            .draft(&invoice.subscription_id, period.period_start)
            .await?;
        // A subscription no longer in force in that period (its dates changed) is not priced.
        let Some(now) = now else { continue };
        if let Some(fix) = correction(period, &now.invoice)? {
            fixes.push(fix);
        }
    }
    preview.invoice = preview.invoice.with_corrections(fixes)?;
    preview.margin = preview.margin_now()?;
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

/// Reissues the void invoice `--number` (ADR 0004, "Void and reissue"): its subscription and
/// period drafted anew, with the pending corrections of earlier periods and the take-back of
/// the period's corrections still billed on standing invoices, appended under the reissue's
/// deterministic id — so racing reissuers make one invoice.
async fn reissue(args: ReissueArgs, settings: &Settings) -> anyhow::Result<()> {
    check_ids(&args.workspace, None)?;
    let invoices = crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    let voided = invoices
        .iter()
        .find(|finalized| {
            finalized.invoice.workspace_id == args.workspace
                && finalized.invoice.number == Some(args.number)
        })
        .with_context(|| {
            format!(
                "workspace {:?} has no finalized invoice {}",
                args.workspace, args.number
            )
        })?;
    anyhow::ensure!(
        voided.void_reason.is_some(),
        "invoice {} of {} is not void (it is {}); only a void invoice can be reissued: void it first with `agentmeter invoices void --workspace {} --number {} --reason ...`",
        args.number,
        args.workspace,
        voided.invoice.status,
        args.workspace,
        args.number
    );
    let id = reissue_id(&voided.invoice_id);
    if let Some(reissued) = invoices.iter().find(|finalized| finalized.invoice_id == id) {
        println!(
            "invoice {} was already reissued as invoice {}",
            args.number,
            reissued.invoice.number.unwrap_or(0)
        );
        return Ok(());
    }
    let record = workspace_config(settings, &args.workspace).await?;
    let config = &record.config;
    let old = &voided.invoice;
    let subscription = config
        .subscriptions
        .iter()
        .find(|subscription| subscription.id == old.subscription_id)
        .with_context(|| {
            format!(
                "invoice {}'s subscription {:?} is no longer in the configuration, so its period cannot be drafted anew; finalize the subscription that replaced it instead",
                args.number, old.subscription_id
            )
        })?;
    let mut drafts = DraftCache::new(settings, config, Some(&subscription.account));
    let preview = drafts
        .draft(&subscription.id, old.period_start)
        .await?
        .filter(|preview| preview.invoice.period_start == old.period_start)
    .with_context(|| {
        format!(
            "subscription {:?} no longer has a period starting {} (its dates or plan changed since invoice {}); finalize its periods as they are now instead",
            subscription.id, old.period_start, args.number
        )
    })?;
    let mut preview = with_pending_corrections(&mut drafts, &invoices, preview).await?;
    if let Some(takeback) = reissue_takeback(&invoices, voided)? {
        preview.invoice = preview.invoice.with_corrections(vec![takeback])?;
        preview.margin = preview.margin_now()?;
    }
    preview.invoice.reissues = old.number;
    let appended = finalize_record(
        &record,
        subscription,
        preview,
        &id,
        OffsetDateTime::now_utc(),
        Some(voided.invoice_id.clone()),
    );
    crate::invoice_log::append(&settings.kafka, std::slice::from_ref(&appended)).await?;
    // Whoever else reissued it meanwhile, the first record in the log is the reissue.
    let invoices = crate::invoice_log::project_log(&settings.kafka, &settings.clickhouse).await?;
    let winner = invoices
        .iter()
        .find(|finalized| finalized.invoice_id == id)
        .context("the reissue is not in the log after appending it")?;
    println!(
        "reissued invoice {} of {} as invoice {}: {} {} {} {}",
        args.number,
        args.workspace,
        winner.invoice.number.unwrap_or(0),
        winner.invoice.subscription_id,
        winner.invoice.period_start.date(),
        winner.invoice.total,
        winner.invoice.currency
    );
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
/// containing `instant`, with the cost of the usage they bill. The usage of all of them is read
/// in one query ([`PeriodUsage`]).
pub(crate) async fn drafts(
    settings: &Settings,
    config: &MeteringConfig,
    account: Option<&str>,
    instant: OffsetDateTime,
) -> anyhow::Result<Vec<Preview>> {
    let zone = agentmeter_billing::period::time_zone(&config.workspace.time_zone)?;
    let mut covered_subscriptions = Vec::new();
    let mut ranges = BTreeSet::new();
    let mut needed = Needed::default();
    for subscription in config
        .subscriptions
        .iter()
        .filter(|subscription| account.is_none_or(|account| account == subscription.account))
    {
        let plan = plan_of(config, subscription)?;
        let Some(covered) = coverage(plan, subscription, instant, &zone)? else {
            continue;
        };
        ranges.insert((covered.from, covered.to));
        needed = needed
            .with_plan(plan)
            .with_context(|| format!("subscription {:?}", subscription.id))?;
        covered_subscriptions.push((subscription, plan, covered));
    }
    let ranges: Vec<_> = ranges.into_iter().collect();
    let usage = PeriodUsage::read(settings, config, account, &ranges, needed).await?;
    let mut previews = Vec::new();
    for (subscription, plan, covered) in covered_subscriptions {
        let billed = usage
            .billed_to(config, subscription, (covered.from, covered.to))
            .with_context(|| format!("subscription {:?}", subscription.id))?;
        let quantities = billed
            .quantities(plan)
            .with_context(|| format!("subscription {:?}", subscription.id))?;
        let invoice = draft(config, subscription, &covered, &quantities)?;
        let cost = billed
            .cost()
            .with_context(|| format!("subscription {:?}: cost", subscription.id))?;
        let exchange_rate = agentmeter_billing::exchange::rate_at(
            &config.exchange_rates,
            &invoice.currency,
            &config.workspace.currency,
            invoice.period_end,
        );
        let mut preview = Preview {
            invoice,
            cost,
            cost_currency: config.workspace.currency.clone(),
            exchange_rate,
            margin: None,
        };
        preview.margin = preview.margin_now()?;
        previews.push(preview);
    }
    Ok(previews)
}

/// A draft invoice with the cost of the usage it bills.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Preview {
    #[serde(flatten)]
    pub(crate) invoice: DraftInvoice,
    /// The allocated cost of the same usage (exact), in the workspace's currency.
    pub(crate) cost: Decimal,
    pub(crate) cost_currency: String,
    /// The rate of the plan's currency into the cost currency in force at the period end,
    /// when they differ and one is configured (`agentmeter_billing::exchange`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exchange_rate: Option<Decimal>,
    /// `total − cost`, the total converted with `exchange_rate` when the currencies differ;
    /// none when they differ and no rate is in force.
    pub(crate) margin: Option<Decimal>,
}

impl Preview {
    /// The margin of the invoice as it is now (its corrections included).
    fn margin_now(&self) -> anyhow::Result<Option<Decimal>> {
        agentmeter_billing::exchange::margin(
            self.invoice.total,
            &self.invoice.currency,
            self.cost,
            &self.cost_currency,
            self.exchange_rate,
        )
        .with_context(|| {
            format!(
                "the margin of subscription {:?}",
                self.invoice.subscription_id
            )
        })
    }
}
