//! `agentmeter-bench monthly-view`: query time of `usage_by_account_month` over a month of
//! 10 million actions.
//!
//! Loading: N actions spread evenly over one calendar month, over the example workspace plus
//! `--extra-accounts` accounts, `--users` users per account and the workload's action mix, go
//! through the real enricher code (`enrich`), the real aggregator state
//! (`PartitionAggregator`, 4 source partitions, batches of 50,000 offsets, 1-minute windows,
//! a flush every `--flush-every` records per partition) and the real ClickHouse writer
//! (`ClickHouseService::write`: `actions`, `usage`, `aggregator_progress`) into a fresh
//! database — the rows are exactly what `agentmeter aggregate` would have written, including
//! superseded versions of usage rows that flushes rewrote. No Kafka is involved.
//!
//! Then the view is queried for one account and whole, cold (first run; with `--drop-caches`
//! after dropping the OS page cache and ClickHouse's mark and uncompressed caches) and warm.

use std::time::{Duration, Instant};

use agentmeter_aggregator::service::ClickHouseService;
use agentmeter_aggregator::state::{BatchSettings, BatchWrite, PartitionAggregator};
use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::workload::Workload;
use agentmeter_enricher::enrich::enrich;
use anyhow::Context;

use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Actions in the month.
    #[arg(long, default_value_t = 10_000_000)]
    pub actions: u64,
    /// The calendar month (UTC), YYYY-MM.
    #[arg(long, default_value = "2025-11")]
    pub month: String,
    /// Accounts besides the example's two.
    #[arg(long, default_value_t = 8)]
    pub extra_accounts: usize,
    /// Users per account.
    #[arg(long, default_value_t = 50)]
    pub users: u64,
    /// Records per partition between two flushes (the aggregator flushes every second or
    /// every 50,000 pending actions).
    #[arg(long, default_value_t = 10_000)]
    pub flush_every: u64,
    /// Do not write the `actions` table (usage only).
    #[arg(long)]
    pub skip_actions: bool,
    /// Before each cold query: sync, drop the OS page cache and ClickHouse's mark and
    /// uncompressed caches (affects the whole machine briefly).
    #[arg(long)]
    pub drop_caches: bool,
    /// Warm runs per query.
    #[arg(long, default_value_t = 5)]
    pub warm_runs: usize,
    /// Also time the queries after `OPTIMIZE TABLE usage FINAL` (one part per month).
    #[arg(long)]
    pub optimize: bool,
}

const PARTITIONS: u64 = 4;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn month_span(month: &str) -> anyhow::Result<(i64, i64)> {
    let (year, number) = month.split_once('-').context("--month must be YYYY-MM")?;
    let year: i32 = year.parse()?;
    let number: u8 = number.parse()?;
    let start = time::Date::from_calendar_date(year, time::Month::try_from(number)?, 1)?;
    let next = if number == 12 {
        time::Date::from_calendar_date(year + 1, time::Month::January, 1)?
    } else {
        time::Date::from_calendar_date(year, time::Month::try_from(number + 1)?, 1)?
    };
    let micros = |date: time::Date| date.midnight().assume_utc().unix_timestamp() * 1_000_000;
    Ok((micros(start), micros(next)))
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "monthly")?;
    env.migrate()?;
    let (start, end) = month_span(&args.month)?;
    let workload = std::sync::Arc::new(Workload::new(args.extra_accounts, args.users));
    let service = ClickHouseService::new(&env.clickhouse_settings(), &env.topics().enriched);
    let n = args.actions;
    println!(
        "monthly-view: loading {n} actions over {} ({} accounts × {} users, 8-action mix) into {}",
        args.month,
        workload.senders.len(),
        args.users,
        env.database
    );

    // Generation on a thread; writes on the async side, one batch write at a time.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<(i32, BatchWrite)>(4);
    let generator = {
        let workload = workload.clone();
        let run = env.unique.clone();
        let (flush_every, skip_actions) = (args.flush_every, args.skip_actions);
        std::thread::spawn(move || {
            let settings = BatchSettings {
                batch_size: 50_000,
                window_seconds: 60,
                dedupe_horizon_ms: 15 * 60 * 1000,
            };
            let mut partitions: Vec<(PartitionAggregator, i64)> = (0..PARTITIONS as i32)
                .map(|p| (PartitionAggregator::new(p, settings, None), 0))
                .collect();
            let span = end - start;
            let send = |partition: i32, writes: Vec<BatchWrite>| {
                for mut write in writes {
                    if skip_actions {
                        write.actions.clear();
                    }
                    if sender.blocking_send((partition, write)).is_err() {
                        return false;
                    }
                }
                true
            };
            for i in 0..n {
                let at = start + ((i as i128 * span as i128) / n as i128) as i64;
                // A bijective mix: unique event ids, accounts/users/actions spread at random.
                let mixed = splitmix64(i);
                let raw = workload.raw_action(&run, mixed, at);
                let enriched =
                    enrich(raw, &workload.snapshot, workload.window, at).expect("enriches");
                let partition = (splitmix64(mixed) % PARTITIONS) as usize;
                let (aggregator, offset) = &mut partitions[partition];
                aggregator.handle(*offset, at / 1000, enriched);
                *offset += 1;
                if (*offset as u64).is_multiple_of(flush_every) {
                    let writes = aggregator.take_flush();
                    if !send(partition as i32, writes) {
                        return;
                    }
                }
            }
            for (partition, (aggregator, _)) in partitions.iter_mut().enumerate() {
                let writes = aggregator.take_flush();
                if !send(partition as i32, writes) {
                    return;
                }
            }
        })
    };
    let load_started = Instant::now();
    let mut written_actions = 0u64;
    let mut written_usage = 0u64;
    let mut inserts = 0u64;
    let mut last_report = Instant::now();
    while let Some((partition, write)) = receiver.recv().await {
        service
            .write(partition, &write)
            .await
            .map_err(|error| anyhow::anyhow!("ClickHouse write: {error}"))?;
        written_actions += write.actions.len() as u64;
        written_usage += write.usage.len() as u64;
        inserts += 1;
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "    … {written_usage} usage rows, {written_actions} action rows after {:.0} s",
                load_started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    println!(
        "    loaded in {load_seconds:.1} s ({:.0} actions/s through enrich + aggregator state + ClickHouse writer on the load-generator core): \
         {written_usage} usage rows and {written_actions} action rows written in {inserts} batch writes",
        n as f64 / load_seconds
    );

    // Let background merges settle so that every run sees the same parts.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(300) {
        let merges = env
            .query_u64(&format!(
                "SELECT count() FROM system.merges WHERE database = '{}'",
                env.database
            ))
            .await?;
        if merges == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = env
        .query(&format!(
            "SELECT table, count(), sum(rows), sum(bytes_on_disk) FROM system.parts \
             WHERE database = '{}' AND active GROUP BY table ORDER BY table",
            env.database
        ))
        .await?;
    println!("    merges settled after {:.0} s; active parts per table (table, parts, rows, bytes on disk):", settle.elapsed().as_secs_f64());
    for line in stats.lines() {
        println!("      {}", line.replace('\t', ", "));
    }
    let usage_final = env.query_u64("SELECT count() FROM usage FINAL").await?;
    let exact = env
        .query_u64("SELECT sum(action_count) FROM usage_exact")
        .await?;
    let billable = env
        .query_u64("SELECT sum(actions) FROM usage_by_account_month")
        .await?;
    println!(
        "    usage rows after FINAL: {usage_final}; sum(action_count) over usage_exact: {exact}; billable (tracked) actions in the view: {billable}"
    );
    anyhow::ensure!(
        exact == n,
        "usage_exact holds {exact} actions, expected {n}"
    );

    let account = "acc_acme";
    let queries = [
        (
            "one account",
            format!("SELECT * FROM usage_by_account_month WHERE account_id = '{account}'"),
        ),
        (
            "whole view",
            "SELECT * FROM usage_by_account_month".to_string(),
        ),
        (
            "one account, enable_optimize_predicate_expression=1",
            format!(
                "SELECT * FROM usage_by_account_month WHERE account_id = '{account}' \
                 SETTINGS enable_optimize_predicate_expression = 1"
            ),
        ),
    ];
    // Diagnostics (not views): where the time goes.
    let group_by = "workspace_id, account_id, month, action_name, measure, currency";
    let select = "workspace_id, account_id, toStartOfMonth(window_start) AS month, action_name, \
                  measure, currency, sum(action_count) AS actions, sum(quantity) AS quantity, \
                  sum(cost) AS cost, sum(outcome_count) AS outcomes";
    let diagnostics = [
        (
            "diagnostic: one account, filter written inside the FINAL scan (no view)",
            format!(
                "SELECT {select} FROM usage FINAL WHERE tracked = 1 AND account_id = '{account}' \
                 GROUP BY {group_by}"
            ),
        ),
        (
            "diagnostic: whole month without FINAL (not exact; FINAL's share)",
            format!("SELECT {select} FROM usage WHERE tracked = 1 GROUP BY {group_by}"),
        ),
        (
            "diagnostic: FINAL scan alone (count of usage FINAL)",
            "SELECT count() FROM usage FINAL".to_string(),
        ),
    ];
    let queries: Vec<(&str, String)> = queries.into_iter().chain(diagnostics).collect();
    let mut rows = Vec::new();
    for (label, sql) in &queries {
        let (cold, result_rows) = timed_query(&env, sql, args.drop_caches).await?;
        let mut warm = Vec::new();
        for _ in 0..args.warm_runs {
            warm.push(timed_query(&env, sql, false).await?.0);
        }
        warm.sort();
        let median = warm[warm.len() / 2];
        println!(
            "    {label}: {result_rows} result rows; cold {:.0} ms{}; warm median {:.0} ms (min {:.0}, max {:.0}) — `{sql}`",
            cold.as_secs_f64() * 1000.0,
            if args.drop_caches { " (caches dropped)" } else { " (first run)" },
            median.as_secs_f64() * 1000.0,
            warm[0].as_secs_f64() * 1000.0,
            warm[warm.len() - 1].as_secs_f64() * 1000.0,
        );
        let mut row = Row::new(format!("monthly view, {label} ({n} actions)"));
        row.latency = format!(
            "cold {:.0} ms / warm {:.0} ms",
            cold.as_secs_f64() * 1000.0,
            median.as_secs_f64() * 1000.0
        );
        row.note = format!(
            "{usage_final} usage rows after FINAL; {}",
            if args.drop_caches {
                "cold = OS page cache + mark cache dropped"
            } else {
                "cold = first run after loading"
            }
        );
        rows.push(row);
    }
    if args.optimize {
        let started = Instant::now();
        env.execute("OPTIMIZE TABLE usage FINAL").await?;
        println!(
            "    OPTIMIZE TABLE usage FINAL took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for (label, sql) in &queries[..2] {
            let mut warm = Vec::new();
            for _ in 0..args.warm_runs {
                warm.push(timed_query(&env, sql, false).await?.0);
            }
            warm.sort();
            let median = warm[warm.len() / 2];
            println!(
                "    after OPTIMIZE FINAL, {label}: warm median {:.0} ms",
                median.as_secs_f64() * 1000.0
            );
            let mut row = Row::new(format!("monthly view, {label}, after OPTIMIZE FINAL"));
            row.latency = format!("warm {:.0} ms", median.as_secs_f64() * 1000.0);
            rows.push(row);
        }
    }
    env.cleanup();
    Ok(rows)
}

async fn timed_query(
    env: &BenchEnv,
    sql: &str,
    drop_caches: bool,
) -> anyhow::Result<(Duration, usize)> {
    if drop_caches {
        let status = std::process::Command::new("sh")
            .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
            .status()?;
        anyhow::ensure!(status.success(), "cannot drop the page cache (needs root)");
        env.execute("SYSTEM DROP MARK CACHE").await?;
        env.execute("SYSTEM DROP UNCOMPRESSED CACHE").await?;
    }
    let started = Instant::now();
    let answer = env.query(sql).await?;
    Ok((started.elapsed(), answer.lines().count()))
}
