//! `agentmeter-bench enrich` and `agentmeter-bench aggregate`: one stage alone against a topic
//! pre-loaded with N records.
//!
//! * enrich: N raw actions on a fresh `actions.raw`; `agentmeter enrich` starts (pinned) and the
//!   clock runs until `actions.enriched` holds N records (sum of high watermarks, polled).
//! * aggregate: N enriched actions on a fresh `actions.enriched`; `agentmeter aggregate` starts
//!   (pinned) and the clock runs until `SELECT sum(action_count) FROM usage_exact` = N.
//!
//! * aggregate-restart: as aggregate, then the aggregator is SIGKILLed, 1,000 more actions
//!   arrive, and the clock runs from its restart until they are in `usage_exact` — with the
//!   restart store (`aggregator.state_dir`) or without it.
//!
//! Two figures each: from the stage's start (includes config load, group join, first fetch),
//! and steady state from the first output seen to the last (the stage's throughput).

use std::time::{Duration, Instant};

use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::kafka::{metadata_consumer, produce_all, record_count, stage_producer};
use agentmeter_bench::measure::{CpuProbe, Throughput};
use agentmeter_bench::workload::{config_text, now_micros, Workload};
use agentmeter_schemas::{encode_enriched_action, encode_raw_action};

use super::Row;

#[derive(Debug, clap::Args)]
pub struct EnrichArgs {
    /// Raw actions pre-loaded and enriched.
    #[arg(long, default_value_t = 1_000_000)]
    pub actions: u64,
}

#[derive(Debug, clap::Args)]
pub struct AggregateArgs {
    /// Enriched actions pre-loaded and aggregated.
    #[arg(long, default_value_t = 1_000_000)]
    pub actions: u64,
}

#[derive(Debug, clap::Args)]
pub struct AggregateRestartArgs {
    /// Enriched actions of the sustained run before the kill.
    #[arg(long, default_value_t = 1_000_000)]
    pub actions: u64,
    /// Run without the restart store (`aggregator.state_dir` unset): a restart re-reads the
    /// duplicate horizon.
    #[arg(long)]
    pub without_store: bool,
}

/// Progress samples of a stage run: (time, outputs so far, stage CPU seconds).
struct Progress {
    started: Instant,
    first: Option<(Instant, u64, f64)>,
    done: Option<(Instant, u64, f64)>,
}

fn report(
    stage: &str,
    progress: &Progress,
    total: u64,
    others: &[(String, f64, f64)],
) -> (Throughput, Throughput) {
    let (first_at, first_count, first_cpu) = progress.first.expect("first output seen");
    let (done_at, done_count, done_cpu) = progress.done.expect("run finished");
    let whole = Throughput {
        what: format!("{stage}: from process start (incl. startup and group join)"),
        actions: total,
        seconds: (done_at - progress.started).as_secs_f64(),
        cpu: vec![(format!("{stage} (pinned)"), done_cpu)],
    };
    let mut steady_cpu = vec![(format!("{stage} (pinned)"), done_cpu - first_cpu)];
    for (label, at_first, at_done) in others {
        steady_cpu.push((label.clone(), at_done - at_first));
    }
    let steady = Throughput {
        what: format!(
            "{stage}: steady state (first output at +{:.2} s with {first_count} done)",
            (first_at - progress.started).as_secs_f64()
        ),
        actions: done_count - first_count,
        seconds: (done_at - first_at).as_secs_f64(),
        cpu: steady_cpu,
    };
    (whole, steady)
}

pub async fn run_enrich(options: &Options, args: EnrichArgs) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "enrich")?;
    env.apply_config(&config_text(0))?;
    let topics = env.topics();
    let workload = Workload::example();
    let run = env.unique.clone();
    let n = args.actions;

    println!("enrich: pre-loading {n} raw actions into {}", topics.raw);
    let producer = stage_producer(&options.brokers)?;
    let load_cpu = agentmeter_bench::measure::own_cpu_seconds();
    let mut bytes = 0usize;
    let elapsed = tokio::task::block_in_place(|| {
        produce_all(&producer, &topics.raw, n, |index| {
            let raw = workload.raw_action(&run, index, now_micros());
            let payload = encode_raw_action(&raw).expect("encodes");
            bytes += payload.len();
            (raw.message_key().into_bytes(), payload)
        })
    })?;
    drop(producer);
    println!(
        "    pre-load: {:.0} records/s from the load generator ({} B average, {:.1} CPU-s incl. encoding)",
        n as f64 / elapsed.as_secs_f64(),
        bytes / n.max(1) as usize,
        agentmeter_bench::measure::own_cpu_seconds() - load_cpu
    );
    let consumer = metadata_consumer(&options.brokers)?;
    anyhow::ensure!(record_count(&consumer, &topics.raw, 4)? as u64 == n);

    let tansu = options.service_pid("tansu");
    let pid = env.spawn("enrich", &[])?;
    let probe = CpuProbe::new("enrich", pid);
    let broker_probe = tansu.map(|pid| CpuProbe::new("tansu", pid));
    let mut progress = Progress {
        started: Instant::now(),
        first: None,
        done: None,
    };
    let mut broker_marks = (0.0, 0.0);
    let deadline = Instant::now() + Duration::from_secs(120 + n / 2_000);
    loop {
        env.check_stages()?;
        let count = record_count(&consumer, &topics.enriched, 4)? as u64;
        let now = Instant::now();
        let cpu = probe.used().unwrap_or(f64::NAN);
        let broker = broker_probe
            .as_ref()
            .and_then(CpuProbe::used)
            .unwrap_or(0.0);
        if count > 0 && progress.first.is_none() {
            progress.first = Some((now, count, cpu));
            broker_marks.0 = broker;
        }
        if count >= n {
            progress.done = Some((now, count, cpu));
            broker_marks.1 = broker;
            break;
        }
        anyhow::ensure!(
            now < deadline,
            "enrich: only {count} of {n} after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead_letters = record_count(&consumer, &topics.dead_letter, 4)?;
    let others = vec![("tansu broker".to_string(), broker_marks.0, broker_marks.1)];
    let (whole, steady) = report("enrich", &progress, n, &others);
    println!("{whole}\n{steady}\n    dead letters: {dead_letters}");
    let mut row = Row::new(format!("enrich ({n} pre-loaded raw actions)"));
    row.actions_per_second = Some(steady.per_second());
    row.cpu_per_million = steady.stage_cpu_per_million();
    row.note = format!(
        "steady state; {:.0}/s from process start; enricher at {:.0}% of its core, broker {:.0}% CPU",
        whole.per_second(),
        steady.cpu[0].1 / steady.seconds * 100.0,
        steady.cpu.get(1).map(|c| c.1 / steady.seconds * 100.0).unwrap_or(0.0),
    );
    env.cleanup();
    Ok(vec![row])
}

pub async fn run_aggregate(options: &Options, args: AggregateArgs) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "aggregate")?;
    env.migrate()?;
    let topics = env.topics();
    let workload = Workload::example();
    let run = env.unique.clone();
    let n = args.actions;

    println!(
        "aggregate: pre-loading {n} enriched actions into {}",
        topics.enriched
    );
    let producer = stage_producer(&options.brokers)?;
    let mut bytes = 0usize;
    let elapsed = tokio::task::block_in_place(|| {
        produce_all(&producer, &topics.enriched, n, |index| {
            let enriched = workload.enriched_action(&run, index, now_micros());
            let payload = encode_enriched_action(&enriched).expect("encodes");
            bytes += payload.len();
            (enriched.raw.message_key().into_bytes(), payload)
        })
    })?;
    drop(producer);
    println!(
        "    pre-load: {:.0} records/s ({} B average)",
        n as f64 / elapsed.as_secs_f64(),
        bytes / n.max(1) as usize
    );
    let consumer = metadata_consumer(&options.brokers)?;
    anyhow::ensure!(record_count(&consumer, &topics.enriched, 4)? as u64 == n);

    let tansu = options.service_pid("tansu");
    let clickhouse = options.service_pid("clickhouse");
    let pid = env.spawn("aggregate", &[])?;
    let probe = CpuProbe::new("aggregate", pid);
    let broker_probe = tansu.map(|pid| CpuProbe::new("tansu", pid));
    let clickhouse_probe = clickhouse.map(|pid| CpuProbe::new("clickhouse", pid));
    let mut progress = Progress {
        started: Instant::now(),
        first: None,
        done: None,
    };
    let mut marks = [(0.0, 0.0); 2];
    let deadline = Instant::now() + Duration::from_secs(120 + n / 2_000);
    loop {
        env.check_stages()?;
        let count = env
            .query_u64("SELECT sum(action_count) FROM usage_exact")
            .await?;
        let now = Instant::now();
        let cpu = probe.used().unwrap_or(f64::NAN);
        let broker = broker_probe
            .as_ref()
            .and_then(CpuProbe::used)
            .unwrap_or(0.0);
        let server = clickhouse_probe
            .as_ref()
            .and_then(CpuProbe::used)
            .unwrap_or(0.0);
        if count > 0 && progress.first.is_none() {
            progress.first = Some((now, count, cpu));
            marks[0].0 = broker;
            marks[1].0 = server;
        }
        if count >= n {
            progress.done = Some((now, count, cpu));
            marks[0].1 = broker;
            marks[1].1 = server;
            break;
        }
        anyhow::ensure!(
            now < deadline,
            "aggregate: only {count} of {n} after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows_in_actions = env.query_u64("SELECT count() FROM actions").await?;
    let usage_rows = env.query_u64("SELECT count() FROM usage").await?;
    let others = vec![
        ("tansu broker".to_string(), marks[0].0, marks[0].1),
        (
            "clickhouse-server (shared, incl. the poll queries)".to_string(),
            marks[1].0,
            marks[1].1,
        ),
    ];
    let (whole, steady) = report("aggregate", &progress, n, &others);
    println!(
        "{whole}\n{steady}\n    ClickHouse holds {rows_in_actions} rows in actions, {usage_rows} rows in usage"
    );
    let mut row = Row::new(format!("aggregate ({n} pre-loaded enriched actions)"));
    row.actions_per_second = Some(steady.per_second());
    row.cpu_per_million = steady.stage_cpu_per_million();
    row.note = format!(
        "steady state; {:.0}/s from process start; aggregator at {:.0}% of its core, broker {:.0}%, ClickHouse {:.0}% CPU",
        whole.per_second(),
        steady.cpu[0].1 / steady.seconds * 100.0,
        steady.cpu.get(1).map(|c| c.1 / steady.seconds * 100.0).unwrap_or(0.0),
        steady.cpu.get(2).map(|c| c.1 / steady.seconds * 100.0).unwrap_or(0.0),
    );
    env.cleanup();
    Ok(vec![row])
}

/// Waits until `usage_exact` holds `expected` actions; the time it took.
async fn wait_for_usage(env: &mut BenchEnv, expected: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300 + expected / 2_000);
    loop {
        env.check_stages()?;
        let count = env
            .query_u64("SELECT sum(action_count) FROM usage_exact")
            .await?;
        if count >= expected {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {count} of {expected} actions in usage_exact after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of `agentmeter_aggregator_records_total{outcome="…"}` of a running aggregator.
async fn records_with_outcome(env: &BenchEnv, outcome: &str) -> u64 {
    let url = format!(
        "http://127.0.0.1:{}/metrics",
        env.run.aggregator_metrics_port
    );
    let Ok(response) = env.http.get(url).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    let prefix = format!("agentmeter_aggregator_records_total{{outcome=\"{outcome}\"}}");
    text.lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

pub async fn run_aggregate_restart(
    options: &Options,
    args: AggregateRestartArgs,
) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "aggregate_restart")?;
    env.migrate()?;
    let topics = env.topics();
    let workload = Workload::example();
    let run = env.unique.clone();
    let n = args.actions;
    let extra = 1_000u64;
    let state_dir = env.dir.join("aggregator-state");
    let state_dir = state_dir.to_string_lossy().into_owned();
    let stage_env: Vec<(&str, &str)> = if args.without_store {
        Vec::new()
    } else {
        vec![("AGENTMETER__AGGREGATOR__STATE_DIR", state_dir.as_str())]
    };
    let store_note = if args.without_store {
        "without the restart store"
    } else {
        "with the restart store"
    };
    println!("aggregate-restart ({store_note}): pre-loading {n} enriched actions");
    let producer = stage_producer(&options.brokers)?;
    tokio::task::block_in_place(|| {
        produce_all(&producer, &topics.enriched, n, |index| {
            let enriched = workload.enriched_action(&run, index, now_micros());
            let payload = encode_enriched_action(&enriched).expect("encodes");
            (enriched.raw.message_key().into_bytes(), payload)
        })
    })?;
    let first = env.spawn("aggregate", &stage_env)?;
    let sustained = wait_for_usage(&mut env, n).await?;
    println!(
        "    sustained run: {n} actions in {:.1} s ({:.0}/s)",
        sustained.as_secs_f64(),
        n as f64 / sustained.as_secs_f64()
    );
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    for stage in &mut env.stages {
        let _ = stage.child.wait();
    }
    env.stages.clear();
    tokio::task::block_in_place(|| {
        produce_all(&producer, &topics.enriched, extra, |index| {
            let enriched = workload.enriched_action(&run, n + index, now_micros());
            let payload = encode_enriched_action(&enriched).expect("encodes");
            (enriched.raw.message_key().into_bytes(), payload)
        })
    })?;
    drop(producer);
    env.spawn("aggregate", &stage_env)?;
    let to_progress = wait_for_usage(&mut env, n + extra).await?;
    let rebuilt = records_with_outcome(&env, "rebuilt").await;
    let counted = records_with_outcome(&env, "counted").await;
    println!(
        "    restart to new progress ({store_note}): {:.2} s; re-read before the batch starts {rebuilt}, counted again or new {counted}",
        to_progress.as_secs_f64()
    );
    let mut row = Row::new(format!(
        "aggregate restart after {n} actions ({store_note})"
    ));
    row.latency = format!("{:.2} s restart → new progress", to_progress.as_secs_f64());
    row.note = format!(
        "SIGKILL, then {extra} new actions; records re-read before the batch starts: {rebuilt}; counted (re-counted batch + new): {counted}"
    );
    env.cleanup();
    Ok(vec![row])
}
