//! `agentmeter-bench invoices`: the draft invoices of every account of a workspace with 1,000
//! accounts and 10 million actions in a month, as `agentmeter invoices preview --all` computes
//! them from the exact usage in ClickHouse — and, in the same run on the same data, the same
//! invoices computed the way OpenMeter and Lago do it, by aggregating the raw events table at
//! query time. Both are timed; every invoice of the two must be identical, or the run fails.
//!
//! Loading: as `monthly-view` (the real enricher, aggregator state and ClickHouse writer; no
//! Kafka), N actions over one month and `--accounts` accounts, each with one research agent
//! instance and `--users` users. The workspace's configuration is the example's plus a product
//! with four rate plans that use every usage charge model between them (per unit on
//! `@outcome` with a flat fee; volume tiers on `@action` with a charge discount; graduated tiers
//! on the tokens of `llm_call` with `@user`, a minimum commitment and an invoice discount;
//! packages of `web_search` actions with a one-time fee and `@seat`); the accounts take the plans
//! in turn, and every tenth subscription starts halfway through the month (a prorated period
//! of its own, so a second range of usage to read). It is published with `agentmeter config
//! apply`, like a builder's.
//!
//! Timed:
//!
//! * **agentmeter**: `agentmeter invoices preview --workspace ws_demo --all --period MONTH
//!   --json`, the whole process (it reads the configuration and the finalization log from the
//!   broker, then the usage: one `usage FINAL` query for every subscription and range of the
//!   workspace, `src/period_usage.rs`), `--runs` times;
//! * **raw events**: the same quantities read from the `actions` table — one row per action —
//!   with one `GROUP BY` per metric kind over the workspace's rows of the range (the grouping an
//!   OpenMeter meter query or a Lago charge aggregation does, here batched for the whole
//!   workspace, the most favourable way for it), then priced with the same
//!   `agentmeter_billing::invoice::draft`. It reads `actions` without `FINAL`, which is exact
//!   here because the loader writes each action once (stores that deduplicate at ingest, as those
//!   two do, need no `FINAL`; `actions` is only deduplicated by its merges).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Instant;

use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::workload::{config_text, Workload};
use agentmeter_billing::invoice::{draft, plan_of, DraftInvoice};
use agentmeter_billing::period::{coverage, time_zone, Coverage};
use agentmeter_schemas::catalog::{Metric, Subscription};
use agentmeter_schemas::MeteringConfig;
use anyhow::Context;
use rust_decimal::Decimal;
use time::OffsetDateTime;

use super::monthly::{load_month, settle_merges};
use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Actions in the month.
    #[arg(long, default_value_t = 10_000_000)]
    pub actions: u64,
    /// The calendar month (UTC), YYYY-MM.
    #[arg(long, default_value = "2026-11")]
    pub month: String,
    /// Accounts of the workspace (the example's two included).
    #[arg(long, default_value_t = 1_000)]
    pub accounts: usize,
    /// Users per account.
    #[arg(long, default_value_t = 50)]
    pub users: u64,
    /// Records per partition between two aggregator flushes.
    #[arg(long, default_value_t = 10_000)]
    pub flush_every: u64,
    /// Timed runs of each way (the first one is also reported on its own: cold).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

const WORKSPACE: &str = "ws_demo";

/// The bench's product: four plans on the research agent type, between them every usage
/// charge model.
const CATALOG: &str = r#"
[[products]]
id = "bench_research"
name = "Research Agent (bench plans)"
agent_type = "type_research"

[[products.rate_plans]]
id = "outcomes"
name = "Per result"
currency = "USD"
billing_cycle = "monthly"

[[products.rate_plans.charges]]
id = "results"
name = "Objects detected"
metric = "@outcome"
model = { per_unit = { unit_price = "500" } }

[[products.rate_plans.charges]]
id = "platform"
name = "Platform"
model = { flat = { fee = "20" } }

[[products.rate_plans]]
id = "volume"
name = "Volume"
currency = "USD"
billing_cycle = "monthly"

[[products.rate_plans.charges]]
id = "actions"
name = "Actions"
metric = "@action"
model = { volume = { tiers = [
  { up_to = "5000", unit_price = "0.05" },
  { up_to = "10000", unit_price = "0.04" },
  { unit_price = "0.03" },
] } }
discount = { percent = "10" }

[[products.rate_plans]]
id = "tokens"
name = "Tokens and users"
currency = "USD"
billing_cycle = "monthly"
minimum_commitment = "100"
discounts = [{ amount = "5" }]

[[products.rate_plans.charges]]
id = "llm_tokens"
name = "LLM tokens"
metric = "measure"
action = "llm_call"
measure = "token"
model = { tiered = { tiers = [
  { up_to = "1000000", unit_price = "0.00002" },
  { unit_price = "0.000015" },
] } }

[[products.rate_plans.charges]]
id = "users"
name = "Active users"
metric = "@user"
model = { per_unit = { unit_price = "2" } }

[[products.rate_plans]]
id = "package"
name = "Search packs"
currency = "USD"
billing_cycle = "monthly"

[[products.rate_plans.charges]]
id = "searches"
name = "Web searches, per 1,000"
metric = "@action"
actions = ["web_search"]
model = { package = { package_size = "1000", package_price = "5" } }

[[products.rate_plans.charges]]
id = "setup"
name = "Set-up"
model = { one_time = { fee = "50" } }

[[products.rate_plans.charges]]
id = "seats"
name = "Seats"
metric = "@seat"
model = { per_unit = { unit_price = "3" } }
"#;

const PLANS: [&str; 4] = ["outcomes", "volume", "tokens", "package"];

/// The example configuration with `accounts − 2` more accounts, the bench product and a
/// subscription of every extra account (the example's two keep theirs).
fn bench_config(accounts: usize, month_start: OffsetDateTime) -> anyhow::Result<String> {
    let extra = accounts
        .checked_sub(2)
        .context("--accounts must be at least 2")?;
    let mut text = config_text(extra);
    text.push_str(CATALOG);
    let halfway = month_start + time::Duration::days(15);
    for index in 0..extra {
        let start = if index % 10 == 9 {
            halfway
        } else {
            month_start
        };
        text.push_str(&format!(
            "\n[[subscriptions]]\nid = \"sub_bench_{index:02}\"\naccount = \"acc_bench_{index:02}\"\n\
             product = \"bench_research\"\nrate_plan = \"{}\"\nstart = \"{}\"\n",
            PLANS[index % PLANS.len()],
            start.format(&time::format_description::well_known::Rfc3339)?
        ));
    }
    Ok(text)
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "invoices")?;
    env.migrate()?;
    let (start_micros, end_micros) = super::monthly::month_span(&args.month)?;
    let month_start = OffsetDateTime::from_unix_timestamp(start_micros / 1_000_000)?;
    let config_toml = bench_config(args.accounts, month_start)?;
    let config = MeteringConfig::from_toml(&config_toml)
        .map_err(|error| anyhow::anyhow!("the bench configuration: {error}"))?;
    env.apply_config(&config_toml)?;
    let workload = std::sync::Arc::new(Workload::new(args.accounts - 2, args.users));
    let n = args.actions;
    println!(
        "invoices: loading {n} actions over {} ({} accounts × {} users, 8-action mix; {} subscriptions) into {}",
        args.month,
        workload.senders.len(),
        args.users,
        config.subscriptions.len(),
        env.run.database
    );
    load_month(
        &env,
        &workload,
        n,
        (start_micros, end_micros),
        args.flush_every,
        false,
    )
    .await?;
    settle_merges(&env).await?;

    let mut rows = Vec::new();
    let mut agentmeter_runs = Vec::new();
    let mut from_agentmeter = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let output = Command::new(&options.agentmeter)
            .arg("--config")
            .arg(&env.settings_path)
            .args([
                "invoices",
                "preview",
                "--workspace",
                WORKSPACE,
                "--all",
                "--period",
                &args.month,
                "--json",
            ])
            .env("RUST_LOG", "warn")
            .output()
            .context("run agentmeter invoices preview")?;
        agentmeter_runs.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            output.status.success(),
            "agentmeter invoices preview failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        from_agentmeter = serde_json::from_slice::<Vec<DraftInvoice>>(&output.stdout)
            .context("the preview's JSON")?;
    }
    let mut raw_runs = Vec::new();
    let mut from_raw = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        from_raw = raw_event_invoices(&env, &config, month_start).await?;
        raw_runs.push(started.elapsed().as_secs_f64());
    }

    // Agreement: the same invoices, line by line, in the same order.
    anyhow::ensure!(
        from_agentmeter.len() == from_raw.len(),
        "agentmeter drafted {} invoices, the raw events {}",
        from_agentmeter.len(),
        from_raw.len()
    );
    for (ours, theirs) in from_agentmeter.iter().zip(&from_raw) {
        anyhow::ensure!(
            ours == theirs,
            "the invoices of {} differ:\nagentmeter: {ours:?}\nraw events: {theirs:?}",
            ours.subscription_id
        );
    }
    let total: Decimal = from_agentmeter.iter().map(|invoice| invoice.total).sum();
    let lines: usize = from_agentmeter
        .iter()
        .map(|invoice| invoice.lines.len())
        .sum();
    println!(
        "    {} invoices ({lines} lines, total {total} USD): identical from both ways",
        from_agentmeter.len()
    );
    for (what, runs) in [
        (
            "agentmeter invoices preview --all (usage)",
            &agentmeter_runs,
        ),
        ("raw events aggregated at query time (actions)", &raw_runs),
    ] {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        println!(
            "    {what}: first {:.2} s, median {median:.2} s of {} runs ({})",
            runs[0],
            runs.len(),
            runs.iter()
                .map(|seconds| format!("{seconds:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut row = Row::new(format!(
            "invoices of {} accounts, {n} actions: {what}",
            args.accounts
        ));
        row.latency = format!("median {median:.2} s, first {:.2} s", runs[0]);
        row.note = format!("{} invoices, identical", from_agentmeter.len());
        rows.push(row);
    }
    env.cleanup();
    Ok(rows)
}

/// The sums of one account's raw events of one agent instance, action and measure.
#[derive(Debug, Default)]
struct RawSums {
    actions: Decimal,
    quantity: Decimal,
    outcomes: Decimal,
}

/// The draft invoices of `config`'s subscriptions for the month starting at `month_start`,
/// from the `actions` table, in configuration order (as `invoices preview` lists them).
async fn raw_event_invoices(
    env: &BenchEnv,
    config: &MeteringConfig,
    month_start: OffsetDateTime,
) -> anyhow::Result<Vec<DraftInvoice>> {
    let zone = time_zone(&config.workspace.time_zone)?;
    let mut covered: Vec<(&Subscription, Coverage)> = Vec::new();
    for subscription in &config.subscriptions {
        let plan = plan_of(config, subscription)?;
        if let Some(coverage) = coverage(plan, subscription, month_start, &zone)? {
            covered.push((subscription, coverage));
        }
    }
    let ranges: std::collections::BTreeSet<(OffsetDateTime, OffsetDateTime)> = covered
        .iter()
        .map(|(_, coverage)| (coverage.from, coverage.to))
        .collect();
    let mut by_range = BTreeMap::new();
    for (from, to) in ranges {
        by_range.insert((from, to), RawUsage::read(env, from, to).await?);
    }
    let mut invoices = Vec::with_capacity(covered.len());
    for (subscription, coverage) in covered {
        let usage = &by_range[&(coverage.from, coverage.to)];
        let plan = plan_of(config, subscription)?;
        let agent_type = config
            .products
            .iter()
            .find(|product| product.id == subscription.product)
            .map(|product| product.agent_type.as_str());
        let instances: Vec<&str> = config
            .agent_instances
            .iter()
            .filter(|instance| {
                instance.account == subscription.account
                    && Some(instance.agent_type.as_str()) == agent_type
            })
            .map(|instance| instance.id.as_str())
            .collect();
        // One instance per account and agent type here (checked), so distinct users of the
        // account's instances are those of its one instance.
        anyhow::ensure!(
            instances.len() <= 1,
            "the bench gives each account one instance per agent type"
        );
        let mut quantities = HashMap::new();
        for charge in &plan.charges {
            let metric = charge
                .metric()
                .map_err(|problem| anyhow::anyhow!(problem))?;
            let sum = |value: &dyn Fn(&str, &str, &RawSums) -> Option<Decimal>| -> Decimal {
                usage
                    .sums
                    .iter()
                    .filter(|((account, instance, _, _), _)| {
                        account == &subscription.account && instances.contains(&instance.as_str())
                    })
                    .filter_map(|((_, _, action, measure), sums)| value(action, measure, sums))
                    .sum()
            };
            let quantity = match &metric {
                Metric::Fee => continue,
                Metric::Actions { only } => sum(&|action, _, sums| {
                    (only.is_empty() || only.iter().any(|name| name == action))
                        .then_some(sums.actions)
                }),
                Metric::Outcomes { only } => sum(&|action, _, sums| {
                    (only.is_empty() || only.iter().any(|name| name == action))
                        .then_some(sums.outcomes)
                }),
                Metric::Measure { action, measure } => sum(&|name, unit, sums| {
                    (name == action && unit == measure).then_some(sums.quantity)
                }),
                Metric::Users => instances
                    .first()
                    .and_then(|instance| {
                        usage
                            .users
                            .get(&(subscription.account.clone(), instance.to_string()))
                    })
                    .copied()
                    .unwrap_or_default(),
                Metric::Seats => usage
                    .seats
                    .get(&subscription.account)
                    .copied()
                    .unwrap_or_default(),
            };
            quantities.insert(charge.id.clone(), quantity);
        }
        invoices.push(draft(config, subscription, &coverage, &quantities)?);
    }
    Ok(invoices)
}

/// The raw events of the workspace in one range, grouped as the charges need them.
struct RawUsage {
    /// (account, instance, action, measure) → sums.
    sums: HashMap<(String, String, String, String), RawSums>,
    /// (account, instance) → distinct users.
    users: HashMap<(String, String), Decimal>,
    /// account → peak trailing-30-days seats over the range's days.
    seats: HashMap<String, Decimal>,
}

impl RawUsage {
    async fn read(
        env: &BenchEnv,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> anyhow::Result<RawUsage> {
        let (from, to) = (from.unix_timestamp(), to.unix_timestamp());
        let range = format!(
            "workspace_id = '{WORKSPACE}' AND tracked = 1 \
             AND occurred_at >= toDateTime({from}, 'UTC') AND occurred_at < toDateTime({to}, 'UTC')"
        );
        let mut usage = RawUsage {
            sums: HashMap::new(),
            users: HashMap::new(),
            seats: HashMap::new(),
        };
        let sums = env
            .query(&format!(
                "SELECT account_id, agent_instance_id, action_name, measure, count(), \
                 toString(sum(quantity)), countIf(outcome = 1) FROM actions WHERE {range} \
                 GROUP BY account_id, agent_instance_id, action_name, measure"
            ))
            .await?;
        for line in sums.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            let [account, instance, action, measure, actions, quantity, outcomes] = fields[..]
            else {
                anyhow::bail!("unexpected row {line:?}");
            };
            usage.sums.insert(
                (
                    account.to_string(),
                    instance.to_string(),
                    action.to_string(),
                    measure.to_string(),
                ),
                RawSums {
                    actions: decimal(actions)?,
                    quantity: decimal(quantity)?,
                    outcomes: decimal(outcomes)?,
                },
            );
        }
        let users = env
            .query(&format!(
                "SELECT account_id, agent_instance_id, uniqExact(user_key) FROM actions \
                 WHERE {range} AND user_key != '' GROUP BY account_id, agent_instance_id"
            ))
            .await?;
        for line in users.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            let [account, instance, count] = fields[..] else {
                anyhow::bail!("unexpected row {line:?}");
            };
            usage
                .users
                .insert((account.to_string(), instance.to_string()), decimal(count)?);
        }
        // Seats of a day: distinct users of the 30 days ending that day (docs/billing.md).
        let seats = env
            .query(&format!(
                "SELECT account_id, max(seats) FROM ( \
                   SELECT account_id, day, uniqExact(user_key) AS seats FROM ( \
                     SELECT account_id, user_key, toDate(occurred_at) + arrayJoin(range(30)) AS day \
                     FROM actions WHERE workspace_id = '{WORKSPACE}' AND tracked = 1 AND user_key != '' \
                     AND occurred_at >= toDateTime({from}, 'UTC') - 2592000 AND occurred_at < toDateTime({to}, 'UTC')) \
                   WHERE day >= toDate(toDateTime({from}, 'UTC')) AND day <= toDate(toDateTime({to}, 'UTC') - 1) \
                   GROUP BY account_id, day) \
                 GROUP BY account_id"
            ))
            .await?;
        for line in seats.lines() {
            let (account, count) = line
                .split_once('\t')
                .with_context(|| format!("unexpected row {line:?}"))?;
            usage.seats.insert(account.to_string(), decimal(count)?);
        }
        Ok(usage)
    }
}

fn decimal(text: &str) -> anyhow::Result<Decimal> {
    let trimmed = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    };
    Decimal::from_str_exact(trimmed).with_context(|| format!("not a decimal: {text:?}"))
}
