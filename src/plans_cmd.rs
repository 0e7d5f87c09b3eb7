//! `agentmeter plans simulate`: what a rate plan would have earned against the real usage
//! history, next to its cost, before anyone is subscribed to it (docs/billing.md).
//!
//! Each account (or the one asked for) gets a simulated subscription to the plan from `--from`
//! to `--to`; every billing period of it in between is drafted exactly as `invoices preview`
//! drafts a real one (same quantities from ClickHouse, same pricing, same proration of the first
//! and last periods), and nothing is written anywhere. A plan in another currency than the
//! costs has a margin through the exchange rate in force at each period's end.

use std::collections::HashMap;

use agentmeter_billing::period::{start_of_day, time_zone, TimeZone};
use agentmeter_schemas::catalog::{rate_plans, Subscription};
use anyhow::Context;
use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::invoices_cmd::{check_ids, drafts, workspace_config};
use crate::Settings;

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Price the usage history of the workspace's accounts with a rate plan, period by period.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The rate plan, as `product/plan`.
    pub plan: String,
    /// The workspace.
    #[arg(long)]
    pub workspace: String,
    /// Start: an RFC 3339 instant, or a date (`YYYY-MM` or `YYYY-MM-DD`) in the workspace's
    /// time zone.
    #[arg(long)]
    pub from: String,
    /// End (exclusive), like `--from`.
    #[arg(long)]
    pub to: String,
    /// Only this account (default: every account of the workspace).
    #[arg(long)]
    pub account: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One simulated period of one account.
#[derive(Debug, serde::Serialize)]
struct SimulatedPeriod {
    account: String,
    #[serde(with = "time::serde::rfc3339")]
    from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    to: OffsetDateTime,
    revenue: Decimal,
    currency: String,
    cost: Decimal,
    cost_currency: String,
    /// The plan's currency in the cost currency, in force at the period's end, when they differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange_rate: Option<Decimal>,
    /// Revenue (converted with `exchange_rate` when the currencies differ) less cost; none
    /// when they differ and no rate is in force.
    margin: Option<Decimal>,
}

fn instant(text: &str, zone: &TimeZone) -> anyhow::Result<OffsetDateTime> {
    if let Ok(instant) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(instant);
    }
    Ok(start_of_day(text, zone)?)
}

pub async fn run(command: PlansCommand, settings: &Settings) -> anyhow::Result<()> {
    let PlansCommand::Simulate(args) = command;
    check_ids(&args.workspace, args.account.as_deref())?;
    let record = workspace_config(settings, &args.workspace).await?;
    let mut config = record.config;
    let (product, plan) = args
        .plan
        .split_once('/')
        .context("the plan is written product/plan, e.g. research/pro")?;
    let (currency, agent_type) = rate_plans(&config.products)
        .find(|(p, r)| p.id == product && r.id == plan)
        .map(|(p, r)| (r.currency.clone(), p.agent_type.clone()))
        .with_context(|| {
            format!(
                "workspace {:?} has no rate plan {}",
                args.workspace, args.plan
            )
        })?;
    let zone = time_zone(&config.workspace.time_zone)?;
    let from = instant(&args.from, &zone).context("--from")?;
    let to = instant(&args.to, &zone).context("--to")?;
    anyhow::ensure!(from < to, "--from must be before --to");
    anyhow::ensure!(
        to - from <= time::Duration::days(5 * 366),
        "simulate at most five years at once"
    );
    let accounts: Vec<String> = match &args.account {
        Some(account) => {
            anyhow::ensure!(
                config.accounts.iter().any(|known| &known.id == account),
                "workspace {:?} has no account {account:?}",
                args.workspace
            );
            vec![account.clone()]
        }
        None => config
            .accounts
            .iter()
            .map(|account| account.id.clone())
            .collect(),
    };
    config.subscriptions = accounts
        .iter()
        .map(|account| Subscription {
            id: format!("simulated_{account}"),
            account: account.clone(),
            product: product.to_string(),
            rate_plan: plan.to_string(),
            start: from,
            end: Some(to),
        })
        .collect();
    // Every simulated subscription starts at --from on the same plan, so all accounts share
    // the periods: each is drafted for all of them from one read of its usage.
    let mut periods = Vec::new();
    let mut at = from;
    while at < to {
        let previews = drafts(settings, &config, args.account.as_deref(), at).await?;
        let Some(period_to) = previews.first().map(|preview| preview.invoice.to) else {
            break;
        };
        for preview in previews {
            let invoice = &preview.invoice;
            periods.push(SimulatedPeriod {
                account: invoice.bill_to.account_id.clone(),
                from: invoice.from,
                to: invoice.to,
                revenue: invoice.total,
                currency: invoice.currency.clone(),
                cost: preview.cost,
                cost_currency: preview.cost_currency.clone(),
                exchange_rate: preview.exchange_rate,
                margin: preview.margin,
            });
        }
        anyhow::ensure!(period_to > at, "a billing period did not advance");
        at = period_to;
    }
    // Per account in the configuration's order, then by period.
    let position: HashMap<&str, usize> = accounts
        .iter()
        .enumerate()
        .map(|(position, account)| (account.as_str(), position))
        .collect();
    periods.sort_by_key(|period| (position.get(period.account.as_str()).copied(), period.from));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&periods)?);
        return Ok(());
    }
    let rfc3339 = |instant: OffsetDateTime| {
        instant
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| instant.to_string())
    };
    println!(
        "rate plan {} ({currency}) against the usage of the {agent_type} agents of {}, {} to {}:",
        args.plan,
        args.account.as_deref().unwrap_or("every account"),
        rfc3339(from),
        rfc3339(to)
    );
    let mut revenue = Decimal::ZERO;
    let mut cost = Decimal::ZERO;
    for period in &periods {
        println!(
            "  {:<24} {} – {}  revenue {:>14} {}  cost {:>14} {}  margin {}",
            period.account,
            period.from.date(),
            period.to.date(),
            period.revenue,
            period.currency,
            period.cost.round_dp(2),
            period.cost_currency,
            match (period.margin, period.exchange_rate) {
                (Some(margin), None) => margin.round_dp(2).to_string(),
                (Some(margin), Some(rate)) => format!(
                    "{} (at {rate} {} per {})",
                    margin.round_dp(2),
                    period.cost_currency,
                    period.currency
                ),
                (None, _) => "— (no exchange rate in force)".to_string(),
            }
        );
        revenue = revenue
            .checked_add(period.revenue)
            .context("the revenue sum overflows")?;
        cost = cost
            .checked_add(period.cost)
            .context("the cost sum overflows")?;
    }
    println!(
        "  total revenue {revenue} {currency}, cost {} {}",
        cost.round_dp(2),
        config.workspace.currency
    );
    Ok(())
}
