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
//! With `--extra-months K`, the month's usage rows (superseded versions included) are copied K
//! times into the preceding months (shifted by 31, 62, … days, so no copy overlaps the month or
//! another copy): a table holding more than the month queried.
//!
//! Then, cold (first run; with `--drop-caches` after dropping the OS page cache and ClickHouse's
//! mark and uncompressed caches) and warm (median of `--warm-runs`):
//!
//! * `usage_by_account_month` as migrated now (0003: `usage_exact` read in two parallel FINAL
//!   scans on 18.16) and as migration 0002 made it (re-created here as `before_usage_exact` and
//!   `before_usage_by_account_month`): whole, one account and month, one workspace and month;
//! * the billing queries of docs/sql.md that filter inside the `usage FINAL` scan;
//! * diagnostics: FINAL alone, the month without FINAL, predicate push-down on 18.16.
//!
//! Every query of one case (whole / account-month / workspace-month) must answer the same rows:
//! the harness compares them and fails otherwise.

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
    /// Copies of the month's usage rows to put into the months before it (see above).
    #[arg(long, default_value_t = 0)]
    pub extra_months: u32,
}

const PARTITIONS: u64 = 4;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub fn month_span(month: &str) -> anyhow::Result<(i64, i64)> {
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
    let n = args.actions;
    println!(
        "monthly-view: loading {n} actions over {} ({} accounts × {} users, 8-action mix) into {}",
        args.month,
        workload.senders.len(),
        args.users,
        env.run.database
    );

    load_month(
        &env,
        &workload,
        n,
        (start, end),
        args.flush_every,
        args.skip_actions,
    )
    .await?;

    if args.extra_months > 0 {
        let columns = "window_start, window_seconds, workspace_id, account_id, agent_instance_id, \
                       user_key, action_name, measure, tracked, outcome, currency, source_partition, \
                       batch_start, action_count, quantity, cost, outcome_count, first_seen, \
                       last_seen, version";
        let copied = columns.replacen("window_start", "window_start - {shift}", 1);
        for copy in 1..=args.extra_months {
            let started = Instant::now();
            let shift = u64::from(copy) * 31 * 86_400;
            env.execute(&format!(
                "INSERT INTO usage ({columns}) SELECT {} FROM usage \
                 WHERE window_start >= toDateTime({}, 'UTC') AND window_start < toDateTime({}, 'UTC')",
                copied.replace("{shift}", &shift.to_string()),
                start / 1_000_000,
                end / 1_000_000
            ))
            .await?;
            println!(
                "    copied the month's usage rows {} days back in {:.1} s",
                shift / 86_400,
                started.elapsed().as_secs_f64()
            );
        }
    }

    settle_merges(&env).await?;
    let month = format!("{}-01", args.month);
    let in_month = format!("toStartOfMonth(window_start) = '{month}'");
    let usage_final = env.query_u64("SELECT count() FROM usage FINAL").await?;
    let exact = env
        .query_u64(&format!(
            "SELECT sum(action_count) FROM usage_exact WHERE {in_month}"
        ))
        .await?;
    let billable = env
        .query_u64(&format!(
            "SELECT sum(actions) FROM usage_by_account_month WHERE month = '{month}'"
        ))
        .await?;
    println!(
        "    usage rows after FINAL: {usage_final}; sum(action_count) of {} over usage_exact: {exact}; billable (tracked) actions of the month in the view: {billable}",
        args.month
    );
    anyhow::ensure!(
        exact == n,
        "usage_exact holds {exact} actions in {}, expected {n}",
        args.month
    );

    // The views as migration 0002 made them (one FINAL scan), beside the migrated ones.
    env.execute(
        "CREATE VIEW before_usage_exact AS SELECT window_start, window_seconds, workspace_id, \
         account_id, agent_instance_id, user_key, action_name, measure, tracked, outcome, currency, \
         source_partition, batch_start, action_count, quantity, cost, outcome_count, first_seen, \
         last_seen FROM usage FINAL",
    )
    .await?;
    env.execute(
        "CREATE VIEW before_usage_by_account_month AS SELECT workspace_id, account_id, \
         toStartOfMonth(window_start) AS month, action_name, measure, currency, \
         sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost, \
         sum(outcome_count) AS outcomes FROM before_usage_exact WHERE tracked = 1 \
         GROUP BY workspace_id, account_id, month, action_name, measure, currency",
    )
    .await?;

    let workspace = "ws_demo";
    let account = "acc_acme";
    let order = "ORDER BY workspace_id, account_id, month, action_name, measure, currency";
    let group_by = "GROUP BY workspace_id, account_id, month, action_name, measure, currency";
    let sums = "sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost, \
                sum(outcome_count) AS outcomes";
    let select = format!(
        "workspace_id, account_id, toStartOfMonth(window_start) AS month, action_name, measure, \
         currency, {sums}"
    );
    let one_account =
        format!("workspace_id = '{workspace}' AND account_id = '{account}' AND month = '{month}'");
    let one_workspace = format!("workspace_id = '{workspace}' AND month = '{month}'");
    // docs/sql.md's billing queries (with the view's columns, to compare the answers).
    let direct = |filter: &str| {
        format!("SELECT {select} FROM usage FINAL WHERE {filter} AND {in_month} AND tracked = 1 {group_by} {order}")
    };
    let halves = |filter: &str| {
        let branch = |slice: &str| {
            format!(
                "SELECT workspace_id, account_id, toStartOfMonth(window_start) AS month, action_name, \
                 measure, currency, action_count, quantity, cost, outcome_count FROM usage FINAL \
                 PREWHERE {slice} WHERE {filter} AND {in_month} AND tracked = 1"
            )
        };
        format!(
            "SELECT workspace_id, account_id, month, action_name, measure, currency, {sums} FROM ({} UNION ALL {}) {group_by} {order}",
            branch("toDayOfMonth(window_start) <= 15"),
            branch("toDayOfMonth(window_start) >= 16")
        )
    };
    let account_filter = format!("workspace_id = '{workspace}' AND account_id = '{account}'");
    let workspace_filter = format!("workspace_id = '{workspace}'");
    // (case, label, SQL); the queries of a case must answer the same rows.
    let queries: Vec<(&str, &str, String)> = vec![
        ("whole", "view (0003), whole", format!("SELECT * FROM usage_by_account_month {order}")),
        ("account", "view (0003), one account and month", format!("SELECT * FROM usage_by_account_month WHERE {one_account} {order}")),
        ("workspace", "view (0003), one workspace and month", format!("SELECT * FROM usage_by_account_month WHERE {one_workspace} {order}")),
        ("whole", "view before (0002), whole", format!("SELECT * FROM before_usage_by_account_month {order}")),
        ("account", "view before (0002), one account and month", format!("SELECT * FROM before_usage_by_account_month WHERE {one_account} {order}")),
        ("workspace", "view before (0002), one workspace and month", format!("SELECT * FROM before_usage_by_account_month WHERE {one_workspace} {order}")),
        ("account", "docs/sql.md billing query, one account and month (filter inside usage FINAL)", direct(&account_filter)),
        ("workspace", "docs/sql.md billing query, one workspace and month (filter inside usage FINAL)", direct(&workspace_filter)),
        ("workspace", "docs/sql.md billing query, one workspace and month, two halves of the month in parallel", halves(&workspace_filter)),
        ("account", "one account and month, two halves of the month in parallel", halves(&account_filter)),
        ("account", "diagnostic: view before (0002), one account and month, enable_optimize_predicate_expression = 1", format!("SELECT * FROM before_usage_by_account_month WHERE {one_account} {order} SETTINGS enable_optimize_predicate_expression = 1")),
        ("", "diagnostic: whole table without FINAL (not exact; FINAL's share)", format!("SELECT {select} FROM usage WHERE tracked = 1 {group_by} {order}")),
        ("", "diagnostic: FINAL scan alone (count of usage FINAL)", "SELECT count() FROM usage FINAL".to_string()),
        ("", "diagnostic: usage_exact (0003) alone (count)", "SELECT count() FROM usage_exact".to_string()),
    ];
    let mut rows = Vec::new();
    let mut answers: Vec<(&str, &str, String)> = Vec::new();
    for (case, label, sql) in &queries {
        let (cold, answer) = timed_query(&env, sql, args.drop_caches).await?;
        let mut warm = Vec::new();
        for _ in 0..args.warm_runs {
            warm.push(timed_query(&env, sql, false).await?.0);
        }
        warm.sort();
        let median = warm[warm.len() / 2];
        println!(
            "    {label}: {} result rows; cold {:.0} ms{}; warm median {:.0} ms (min {:.0}, max {:.0}) — `{sql}`",
            answer.lines().count(),
            cold.as_secs_f64() * 1000.0,
            if args.drop_caches { " (caches dropped)" } else { " (first run)" },
            median.as_secs_f64() * 1000.0,
            warm[0].as_secs_f64() * 1000.0,
            warm[warm.len() - 1].as_secs_f64() * 1000.0,
        );
        if !case.is_empty() {
            answers.push((case, label, answer));
        }
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
    for case in ["whole", "account", "workspace"] {
        let of_case: Vec<&(&str, &str, String)> =
            answers.iter().filter(|(c, _, _)| *c == case).collect();
        let (_, first_label, first) = of_case[0];
        anyhow::ensure!(!first.trim().is_empty(), "`{first_label}` answered no rows");
        for (_, label, answer) in &of_case[1..] {
            anyhow::ensure!(
                answer == first,
                "`{label}` answered differently from `{first_label}`:\n{answer}\nvs\n{first}"
            );
        }
        println!(
            "    {case}: the {} queries answered the same {} rows",
            of_case.len(),
            first.lines().count()
        );
    }
    if args.optimize {
        let started = Instant::now();
        env.execute("OPTIMIZE TABLE usage FINAL").await?;
        println!(
            "    OPTIMIZE TABLE usage FINAL took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for (_, label, sql) in &queries[..9] {
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
) -> anyhow::Result<(Duration, String)> {
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
    Ok((started.elapsed(), answer))
}

/// Writes `n` actions spread evenly over `[start, end)` (µs) into `env`'s database, exactly as
/// `agentmeter aggregate` would have: the real enricher code, the real aggregator state (4
/// source partitions, batches of 50,000 offsets, 1-minute windows, a flush every
/// `flush_every` records per partition) and the real ClickHouse writer.
pub async fn load_month(
    env: &BenchEnv,
    workload: &std::sync::Arc<Workload>,
    n: u64,
    (start, end): (i64, i64),
    flush_every: u64,
    skip_actions: bool,
) -> anyhow::Result<()> {
    let service = ClickHouseService::new(&env.clickhouse_settings(), &env.topics().enriched);
    // Generation on a thread; writes on the async side, one batch write at a time.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<(i32, BatchWrite)>(4);
    let generator = {
        let workload = workload.clone();
        let run = env.unique.clone();
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

    Ok(())
}

/// Waits (up to 10 minutes) until ClickHouse runs no merge in `env`'s database, then prints its
/// active parts: every measurement sees the same parts.
pub async fn settle_merges(env: &BenchEnv) -> anyhow::Result<()> {
    // Let background merges settle so that every run sees the same parts.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(600) {
        let merges = env
            .query_u64(&format!(
                "SELECT count() FROM system.merges WHERE database = '{}'",
                env.run.database
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
            env.run.database
        ))
        .await?;
    println!("    merges settled after {:.0} s; active parts per table (table, parts, rows, bytes on disk):", settle.elapsed().as_secs_f64());
    for line in stats.lines() {
        println!("      {}", line.replace('\t', ", "));
    }
    Ok(())
}
