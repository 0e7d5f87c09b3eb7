//! `agentmeter-bench end-to-end`: REST → ingest → enrich → aggregate → ClickHouse.
//!
//! The three stages run as separate processes, all pinned to the stage CPUs. Clients post REST
//! batches at a fixed rate (batch k is due at k·batch/rate; 0 = as fast as possible). The first
//! action of every batch is a sample with a known event id: a poller asks ClickHouse every
//! 100 ms which pending samples `actions` holds, and a sample's action-to-queryable latency is
//! the start of the query that first found it minus the start of its request (resolution about
//! the poll interval). The run ends when `actions` holds every action sent.
//!
//! The outcomes stage runs beside them (the example's `research_completed` composite outcome,
//! ADR 0005); its CPU is reported on its own, measured until it has derived every action.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_bench::env::{clickhouse_query, BenchEnv, Options};
use agentmeter_bench::measure::{CpuProbe, Latency, Throughput};
use agentmeter_bench::workload::{config_text, event_id, Workload};

use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Actions sent.
    #[arg(long, default_value_t = 100_000)]
    pub actions: u64,
    /// Actions per second offered (0 = as fast as the clients can).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Actions per REST batch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "e2e")?;
    env.migrate()?;
    env.apply_config(&config_text(0))?;
    let ingest = env.spawn("ingest", &[BenchEnv::NO_RATE_LIMIT])?;
    let enrich = env.spawn("enrich", &[])?;
    let aggregate = env.spawn("aggregate", &[])?;
    let outcomes_port = agentmeter_testkit::free_port();
    let outcomes_listen = format!("127.0.0.1:{outcomes_port}");
    let outcomes = env.spawn(
        "outcomes",
        &[(
            "AGENTMETER__OUTCOMES__METRICS_LISTEN",
            outcomes_listen.as_str(),
        )],
    )?;
    for url in [
        format!("http://127.0.0.1:{outcomes_port}/readyz"),
        format!("http://127.0.0.1:{}/readyz", env.run.ingest_port),
        format!("http://127.0.0.1:{}/readyz", env.run.enricher_metrics_port),
        format!(
            "http://127.0.0.1:{}/readyz",
            env.run.aggregator_metrics_port
        ),
    ] {
        env.wait_ready(&url, Duration::from_secs(120)).await?;
    }
    let workload = Arc::new(Workload::example());
    let run = env.unique.clone();
    let client = reqwest::Client::new();
    let rest_url = format!("http://127.0.0.1:{}/v1/actions", env.run.ingest_port);

    // Warm-up: one batch through the whole pipeline (consumer groups joined, tables warm).
    let warmup_run = format!("{run}w");
    let body = workload.rest_batch(&warmup_run, 0, 0, 10);
    let response = client
        .post(&rest_url)
        .header("x-agent-secret", &workload.senders[0].2)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "warm-up batch refused");
    let warm_started = Instant::now();
    loop {
        env.check_stages()?;
        if env.query_u64("SELECT count() FROM actions").await? >= 10 {
            break;
        }
        anyhow::ensure!(
            warm_started.elapsed() < Duration::from_secs(120),
            "warm-up batch not queryable after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "end-to-end: warm-up batch queryable after {:.2} s; sending {} actions in batches of {} at {}",
        warm_started.elapsed().as_secs_f64(),
        args.actions,
        args.batch,
        if args.rate == 0 {
            "full speed".to_string()
        } else {
            format!("{} actions/s", args.rate)
        }
    );

    let mut probes = vec![
        CpuProbe::new("ingest", ingest),
        CpuProbe::new("enrich", enrich),
        CpuProbe::new("aggregate", aggregate),
        CpuProbe::new("outcomes", outcomes),
    ];
    if let Some(pid) = options.service_pid("tansu") {
        probes.push(CpuProbe::new("tansu broker", pid));
    }
    if let Some(pid) = options.service_pid("clickhouse") {
        probes.push(CpuProbe::new("clickhouse-server", pid));
    }
    let batches = args.actions.div_ceil(args.batch as u64);
    let total = batches * args.batch as u64;
    let started = Instant::now();
    let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..args.clients {
        let (workload, client, url, run) = (
            workload.clone(),
            client.clone(),
            rest_url.clone(),
            run.clone(),
        );
        let (pending, next, failures) = (pending.clone(), next.clone(), failures.clone());
        let (batch, rate) = (args.batch, args.rate);
        senders.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= batches {
                    return;
                }
                if rate > 0 {
                    let due =
                        started + Duration::from_secs_f64((k * batch as u64) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let sender = (k % workload.senders.len() as u64) as usize;
                let first = k * batch as u64;
                let body = workload.rest_batch(&run, sender, first, batch);
                loop {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("x-agent-secret", &workload.senders[sender].2)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    match response {
                        Ok(response) if response.status().is_success() => {
                            pending.lock().unwrap().insert(event_id(&run, first), sent);
                            break;
                        }
                        _ => {
                            // 429/503/network: retry with the same event ids (counted once).
                            failures.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }));
    }

    let mut latencies = Vec::new();
    let mut sending_done_at = None;
    let done_at;
    loop {
        env.check_stages()?;
        if sending_done_at.is_none() && senders.iter().all(|task| task.is_finished()) {
            sending_done_at = Some(Instant::now());
        }
        let ids: Vec<String> = {
            let pending = pending.lock().unwrap();
            let mut oldest: Vec<(&String, &Instant)> = pending.iter().collect();
            oldest.sort_by_key(|(_, sent)| **sent);
            oldest
                .into_iter()
                .take(2000)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let asked = Instant::now();
        if !ids.is_empty() {
            let list = ids
                .iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(",");
            let found = clickhouse_query(
                &env.http,
                &options.clickhouse_url,
                &env.run.database,
                &format!("SELECT event_id FROM actions WHERE event_id IN ({list})"),
            )
            .await?;
            let mut pending = pending.lock().unwrap();
            for id in found.lines() {
                if let Some(sent) = pending.remove(id) {
                    latencies.push(asked.saturating_duration_since(sent));
                }
            }
        }
        if sending_done_at.is_some() && pending.lock().unwrap().is_empty() {
            let count = env
                .query_u64(&format!(
                    "SELECT count() FROM actions WHERE event_id LIKE 'bench-{run}-%'"
                ))
                .await?;
            if count >= total {
                done_at = Instant::now();
                break;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300 + total / 500),
            "end-to-end: not every action queryable in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = (done_at - started).as_secs_f64();
    // The outcomes stage: until it has derived everything the aggregator stored.
    let derived_query = "SELECT toUInt64((SELECT count() FROM (SELECT source_partition, max(source_offset) + 1 AS reached \
         FROM actions WHERE source_partition != 4294967295 GROUP BY source_partition) AS stored \
         ANY INNER JOIN (SELECT toUInt32(replaceOne(key, 'partition:', '')) AS source_partition, value \
         FROM outcomes_progress FINAL WHERE key LIKE 'partition:%') AS derived USING source_partition \
         WHERE value >= reached) = (SELECT uniqExact(source_partition) FROM actions WHERE source_partition != 4294967295))";
    loop {
        env.check_stages()?;
        if env.query_u64(derived_query).await? == 1 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600 + total / 500),
            "end-to-end: the outcomes stage did not derive every action in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let derived_after = started.elapsed().as_secs_f64();
    let firings = env
        .query_u64("SELECT count() FROM actions FINAL WHERE kind = 'derived_outcome'")
        .await?;
    let usage_total = env
        .query_u64("SELECT sum(action_count) FROM usage_exact")
        .await?;
    let latency = Latency::of(&mut latencies);
    let throughput = Throughput {
        what: format!(
            "end-to-end REST batches of {} → actions queryable ({} actions offered at {})",
            args.batch,
            total,
            if args.rate == 0 {
                "full speed".into()
            } else {
                format!("{}/s", args.rate)
            }
        ),
        actions: total,
        seconds,
        cpu: probes
            .iter()
            .map(|probe| (probe.label.clone(), probe.used().unwrap_or(f64::NAN)))
            .collect(),
    };
    println!(
        "{throughput}\n    sending took {:.2} s; {} retried requests; usage_exact total {} (incl. the 10 warm-up actions)\n    action-to-queryable latency: {latency}\n    outcomes stage: every action derived {:.2} s after the start ({firings} research_completed firings)",
        sending_done_at.map(|at| (at - started).as_secs_f64()).unwrap_or(f64::NAN),
        failures.load(Ordering::Relaxed),
        usage_total,
        derived_after
    );
    let stage_cpu: f64 = throughput.cpu.iter().take(3).map(|(_, cpu)| cpu).sum();
    let mut row = Row::new(format!(
        "end-to-end REST→ClickHouse ({total} actions, batches of {}, offered {})",
        args.batch,
        if args.rate == 0 {
            "at full speed".into()
        } else {
            format!("{}/s", args.rate)
        }
    ));
    row.actions_per_second = Some(throughput.per_second());
    row.cpu_per_million = Some(stage_cpu / total as f64 * 1e6);
    row.latency = format!(
        "action→queryable p50 {:.0} ms / p99 {:.0} ms",
        latency.p50_ms, latency.p99_ms
    );
    row.note = format!(
        "CPU = ingest+enrich+aggregate, all on the stage core (per 1M: {}; outcomes measured until it derived everything)",
        throughput
            .cpu
            .iter()
            .map(|(label, cpu)| format!("{label} {:.1}", cpu / total as f64 * 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    env.cleanup();
    Ok(vec![row])
}
