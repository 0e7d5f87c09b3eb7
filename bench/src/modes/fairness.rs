//! `agentmeter-bench fairness`: does one flooding agent hurt an agent of another workspace?
//!
//! Two workspaces with one agent instance each. Agent B (workspace B) sends REST batches at a
//! steady rate (open loop: a request every `1/rate` s, whatever the answers take). First B runs
//! alone ("unloaded"); then agent A (workspace A) floods ingest from `flood-connections`
//! concurrent connections, each sending its next batch as soon as the previous one is answered
//! and ignoring Retry-After, while B goes on at the same rate ("under the flood"). Printed: B's
//! p50/p99/max latency in both phases, B's refused requests (the target is none, and p99 within
//! 2× unloaded), and what A got (accepted actions/s, 429s).
//!
//! `--setting KEY=VALUE` sets an `[ingest]` setting (e.g. `--setting
//! max_in_flight_actions_per_workspace=100000` to measure without the per-workspace share).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::measure::{CpuProbe, Latency};
use agentmeter_schemas::metering::hash_secret;
use serde_json::json;

use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent connections of the flooding agent A.
    #[arg(long, default_value_t = 64)]
    pub flood_connections: usize,
    /// Actions per batch of agent A.
    #[arg(long, default_value_t = 500)]
    pub flood_batch: usize,
    /// Requests per second of the steady agent B.
    #[arg(long, default_value_t = 20)]
    pub steady_rate: u64,
    /// Actions per batch of agent B.
    #[arg(long, default_value_t = 20)]
    pub steady_batch: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// An `[ingest]` setting for this run, `KEY=VALUE` (repeatable), passed to ingest as
    /// `AGENTMETER__INGEST__KEY`.
    #[arg(long = "setting", value_parser = parse_setting)]
    pub settings: Vec<(String, String)>,
}

fn parse_setting(setting: &str) -> Result<(String, String), String> {
    match setting.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((
            format!("AGENTMETER__INGEST__{}", key.trim().to_ascii_uppercase()),
            value.trim().to_string(),
        )),
        _ => Err(format!("expected KEY=VALUE, got {setting:?}")),
    }
}

const SECRET_A: &str = "bench_fairness_flooding_agent_secret";
const SECRET_B: &str = "bench_fairness_steady_agent_secret";

fn workspace_config(workspace: &str, account: &str, secret: &str) -> String {
    format!(
        "[workspace]\nid = \"{workspace}\"\nname = \"Fairness {workspace}\"\ncurrency = \"USD\"\n\n\
         [[agent_types]]\nid = \"type_fair\"\nname = \"Fairness agent\"\n\n\
         [[accounts]]\nid = \"{account}\"\nname = \"Account {account}\"\n\n\
         [[agent_instances]]\nid = \"inst_{account}\"\nname = \"Agent of {account}\"\n\
         agent_type = \"type_fair\"\naccount = \"{account}\"\nsecret_sha256 = \"{}\"\n\n\
         [tagging]\ntracked = [\"web_search\"]\n",
        hash_secret(secret)
    )
}

fn batch_body(run: &str, agent: &str, first: u64, count: usize) -> bytes::Bytes {
    let actions: Vec<_> = (0..count as u64)
        .map(|offset| {
            json!({
                "event_id": format!("{run}-{agent}-{}", first + offset),
                "action_name": "web_search",
                "user_id": format!("user_{}", (first + offset) % 7),
                "attributes": {"query": "fairness", "results": 10}
            })
        })
        .collect();
    bytes::Bytes::from(serde_json::to_vec(&json!({ "actions": actions })).expect("serializable"))
}

/// What the steady agent saw in one phase.
#[derive(Debug, Default)]
struct SteadyTally {
    latencies: Vec<Duration>,
    refused: std::collections::BTreeMap<String, u64>,
}

/// Agent B at `rate` requests per second for `seconds`: each request is sent on schedule.
async fn steady_phase(
    url: &str,
    args: &Args,
    seconds: u64,
    run: &str,
    first: &AtomicU64,
) -> SteadyTally {
    let client = reqwest::Client::new();
    let tally = Arc::new(Mutex::new(SteadyTally::default()));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.steady_rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut requests = Vec::new();
    while Instant::now() < end {
        ticker.tick().await;
        let start = first.fetch_add(args.steady_batch as u64, Ordering::Relaxed);
        let body = batch_body(run, "b", start, args.steady_batch);
        let (client, url, tally) = (client.clone(), url.to_string(), tally.clone());
        requests.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = client
                .post(&url)
                .header("x-agent-secret", SECRET_B)
                .header("content-type", "application/json")
                .body(body)
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            let status = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let _ = response.bytes().await;
                    status.as_u16().to_string()
                }
                Err(error) => format!("client error: {error}"),
            };
            let mut tally = tally.lock().unwrap();
            if status == "202" {
                tally.latencies.push(sent.elapsed());
            } else {
                *tally.refused.entry(status).or_insert(0) += 1;
            }
        }));
    }
    for request in requests {
        let _ = request.await;
    }
    Arc::try_unwrap(tally)
        .map(|tally| tally.into_inner().unwrap_or_default())
        .unwrap_or_default()
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(args.steady_rate >= 1, "--steady-rate must be at least 1");
    let mut env = BenchEnv::new(options, "fairness")?;
    env.apply_config(&workspace_config("ws_fair_a", "acc_fair_a", SECRET_A))?;
    env.apply_config(&workspace_config("ws_fair_b", "acc_fair_b", SECRET_B))?;
    let overrides: Vec<(&str, &str)> = args
        .settings
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let pid = env.spawn("ingest", &overrides)?;
    let ready = format!("http://127.0.0.1:{}/readyz", env.run.ingest_port);
    env.wait_ready(&ready, Duration::from_secs(120)).await?;
    let url = format!("http://127.0.0.1:{}/v1/actions", env.run.ingest_port);
    let run = env.unique.clone();
    let first = AtomicU64::new(0);
    let settings_note = if args.settings.is_empty() {
        "default settings".to_string()
    } else {
        args.settings
            .iter()
            .map(|(key, value)| {
                format!(
                    "{}={value}",
                    key.trim_start_matches("AGENTMETER__INGEST__")
                        .to_ascii_lowercase()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };

    // Warm-up: connections, producer metadata.
    let _ = steady_phase(&url, &args, 2, &run, &first).await;

    let mut probe = CpuProbe::new("ingest", pid);
    probe.reset();
    let mut unloaded = steady_phase(&url, &args, args.seconds, &run, &first).await;
    let unloaded_cpu = probe.used().unwrap_or(f64::NAN);
    env.check_stages()?;

    // The flood: A's connections, each closed-loop as fast as ingest answers.
    let stop = Arc::new(AtomicBool::new(false));
    let flood_accepted = Arc::new(AtomicU64::new(0));
    let flood_throttled = Arc::new(AtomicU64::new(0));
    let flood_other = Arc::new(AtomicU64::new(0));
    let flood_bodies: Arc<Vec<bytes::Bytes>> = Arc::new(
        (0..16u64)
            .map(|k| batch_body(&run, "a", k * args.flood_batch as u64, args.flood_batch))
            .collect(),
    );
    let flood_client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.flood_connections)
        .build()?;
    let mut flood = Vec::new();
    for connection in 0..args.flood_connections {
        let (client, url, bodies, stop) = (
            flood_client.clone(),
            url.clone(),
            flood_bodies.clone(),
            stop.clone(),
        );
        let (accepted, throttled, other) = (
            flood_accepted.clone(),
            flood_throttled.clone(),
            flood_other.clone(),
        );
        let batch = args.flood_batch as u64;
        flood.push(tokio::spawn(async move {
            let mut k = connection;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let outcome = client
                    .post(&url)
                    .header("x-agent-secret", SECRET_A)
                    .header("content-type", "application/json")
                    .body(bodies[k % bodies.len()].clone())
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                match outcome {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        match status {
                            202 => accepted.fetch_add(batch, Ordering::Relaxed),
                            429 => throttled.fetch_add(1, Ordering::Relaxed),
                            _ => other.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Err(_) => {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Let the flood reach its steady state before B is measured again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted_before = flood_accepted.load(Ordering::Relaxed);
    let throttled_before = flood_throttled.load(Ordering::Relaxed);
    probe.reset();
    let measured = Instant::now();
    let mut flooded = steady_phase(&url, &args, args.seconds, &run, &first).await;
    let flood_seconds = measured.elapsed().as_secs_f64();
    let flooded_cpu = probe.used().unwrap_or(f64::NAN);
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        let _ = task.await;
    }
    env.check_stages()?;
    let flood_accepted_per_second =
        (flood_accepted.load(Ordering::Relaxed) - accepted_before) as f64 / flood_seconds;
    let flood_throttled_count = flood_throttled.load(Ordering::Relaxed) - throttled_before;

    let unloaded_latency = Latency::of(&mut unloaded.latencies);
    let flooded_latency = Latency::of(&mut flooded.latencies);
    let refused_unloaded: u64 = unloaded.refused.values().sum();
    let refused_flooded: u64 = flooded.refused.values().sum();
    let ratio = flooded_latency.p99_ms / unloaded_latency.p99_ms;
    println!(
        "fairness ({settings_note}): B = {} req/s × {} actions; A = {} connections × {} actions",
        args.steady_rate, args.steady_batch, args.flood_connections, args.flood_batch
    );
    println!("    B unloaded:        {unloaded_latency}; refused {refused_unloaded} {:?}; ingest {:.0}% CPU",
        unloaded.refused, unloaded_cpu / args.seconds as f64 * 100.0);
    println!("    B under the flood: {flooded_latency}; refused {refused_flooded} {:?}; ingest {:.0}% CPU",
        flooded.refused, flooded_cpu / flood_seconds * 100.0);
    println!(
        "    A: {flood_accepted_per_second:.0} actions/s accepted, {flood_throttled_count} requests throttled (429), {} other failures",
        flood_other.load(Ordering::Relaxed)
    );
    let target_met = refused_flooded == 0 && ratio <= 2.0;
    println!(
        "    target (B: no refusals, p99 ≤ 2× unloaded): {} (p99 ratio {ratio:.2})",
        if target_met { "met" } else { "MISSED" }
    );
    let mut row = Row::new(format!("fairness, B under A's flood ({settings_note})"));
    row.actions_per_second = Some(flood_accepted_per_second);
    row.latency = format!(
        "B p50 {:.1}/{:.1} ms, p99 {:.1}/{:.1} ms (unloaded/flood)",
        unloaded_latency.p50_ms,
        flooded_latency.p50_ms,
        unloaded_latency.p99_ms,
        flooded_latency.p99_ms
    );
    row.note = format!(
        "B refused {refused_flooded} of {}; A throttled {flood_throttled_count}; actions/s is A's accepted rate; target {}",
        flooded.latencies.len() as u64 + refused_flooded,
        if target_met { "met" } else { "missed" }
    );
    env.cleanup();
    Ok(vec![row])
}
