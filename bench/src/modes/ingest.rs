//! `agentmeter-bench ingest`: concurrent clients post REST batches and OTLP/HTTP protobuf
//! exports of `value.action` spans to one `agentmeter ingest` pinned to the stage CPUs.
//!
//! Per mode: a warm-up, then a fixed window; requests that complete inside the window count
//! (their actions and their latency). CPU is read from `/proc/<pid>/stat` of ingest (and of the
//! shared broker, for context) at the window's start and end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::kafka::{metadata_consumer, record_count};
use agentmeter_bench::measure::{CpuProbe, Latency, Throughput};
use agentmeter_bench::workload::{config_text, Workload};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::Row;

pub const ALL_MODES: [&str; 4] = ["rest-100", "rest-1000", "otlp-100", "otlp-1000"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Modes to run: rest-<batch> and/or otlp-<batch>.
    #[arg(long, value_delimiter = ',', default_values_t = ALL_MODES.iter().map(|m| m.to_string()))]
    pub modes: Vec<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Measured seconds per mode.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Warm-up seconds per mode (not measured).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Rest,
    Otlp,
}

/// Distinct request bodies per mode (reused round robin; ingest does not deduplicate).
const BODY_POOL: usize = 32;

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    actions: u64,
    requests: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "ingest")?;
    env.apply_config(&config_text(0))?;
    let pid = env.spawn("ingest", &[BenchEnv::NO_RATE_LIMIT])?;
    let ready = format!("http://127.0.0.1:{}/readyz", env.run.ingest_port);
    env.wait_ready(&ready, Duration::from_secs(120)).await?;
    let tansu = options.service_pid("tansu");
    let workload = Arc::new(Workload::example());
    let run_hash = {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for byte in env.unique.bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        hash
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;
    let accepted_total = Arc::new(AtomicU64::new(0));
    let mut rows = Vec::new();
    let mut next_first = 0u64;

    for mode in &args.modes {
        let (protocol, batch) = parse_mode(mode)?;
        // Bodies: each batch from one sender (secret), alternating.
        let now_nanos = (workload_now_micros() as u64) * 1000;
        let mut pool = Vec::with_capacity(BODY_POOL);
        for k in 0..BODY_POOL {
            let sender = k % workload.senders.len();
            let first = next_first;
            next_first += batch as u64;
            let body = match protocol {
                Protocol::Rest => workload.rest_batch(&env.unique, sender, first, batch),
                Protocol::Otlp => workload
                    .otlp_request(run_hash, sender, first, batch, now_nanos)
                    .encode_to_vec(),
            };
            pool.push((workload.senders[sender].2.clone(), bytes::Bytes::from(body)));
        }
        let average_body = pool.iter().map(|(_, body)| body.len()).sum::<usize>() / pool.len();
        let pool = Arc::new(pool);
        let (url, content_type) = match protocol {
            Protocol::Rest => (
                format!("http://127.0.0.1:{}/v1/actions", env.run.ingest_port),
                "application/json",
            ),
            Protocol::Otlp => (
                format!("http://127.0.0.1:{}/v1/traces", env.run.otlp_http_port),
                "application/x-protobuf",
            ),
        };

        let started = Instant::now();
        let window_start = started + Duration::from_secs(args.warmup);
        let window_end = window_start + Duration::from_secs(args.duration);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let counter = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.clients {
            let client = client.clone();
            let pool = pool.clone();
            let url = url.clone();
            let tally = tally.clone();
            let counter = counter.clone();
            let accepted_total = accepted_total.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < window_end {
                    let k = counter.fetch_add(1, Ordering::Relaxed) as usize % pool.len();
                    let (secret, body) = &pool[k];
                    let sent = Instant::now();
                    let result = client
                        .post(&url)
                        .header("x-agent-secret", secret)
                        .header("content-type", content_type)
                        .body(body.clone())
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    let outcome = match result {
                        Ok(response) => {
                            let status = response.status();
                            let bytes = response.bytes().await.unwrap_or_default();
                            if status.is_success() {
                                let rejected = match protocol {
                                    Protocol::Otlp => ExportTraceServiceResponse::decode(bytes)
                                        .ok()
                                        .and_then(|r| r.partial_success)
                                        .map(|p| p.rejected_spans)
                                        .unwrap_or(0),
                                    Protocol::Rest => 0,
                                };
                                if rejected > 0 {
                                    Err(format!("partial success, {rejected} spans rejected"))
                                } else {
                                    Ok(())
                                }
                            } else {
                                Err(format!(
                                    "HTTP {status}: {}",
                                    String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
                                ))
                            }
                        }
                        Err(error) => Err(format!("client error: {error}")),
                    };
                    let finished = Instant::now();
                    if outcome.is_ok() {
                        accepted_total.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    if finished >= window_start && finished <= window_end {
                        let mut tally = tally.lock().unwrap();
                        tally.requests += 1;
                        match outcome {
                            Ok(()) => {
                                tally.actions += batch as u64;
                                tally.latencies.push(finished - sent);
                            }
                            Err(error) => *tally.errors.entry(error).or_insert(0) += 1,
                        }
                    }
                }
            }));
        }
        tokio::time::sleep_until(window_start.into()).await;
        let mut stage_probe = CpuProbe::new("ingest", pid);
        let mut broker_probe = tansu.map(|pid| CpuProbe::new("tansu broker (shared)", pid));
        stage_probe.reset();
        if let Some(probe) = broker_probe.as_mut() {
            probe.reset();
        }
        tokio::time::sleep_until(window_end.into()).await;
        let stage_cpu = stage_probe.used().unwrap_or(f64::NAN);
        let broker_cpu = broker_probe.as_ref().and_then(CpuProbe::used);
        for task in tasks {
            task.await?;
        }
        env.check_stages()?;
        let mut tally = std::mem::take(&mut *tally.lock().unwrap());
        let latency = Latency::of(&mut tally.latencies);
        let mut cpu = vec![("ingest (pinned)".to_string(), stage_cpu)];
        if let Some(broker) = broker_cpu {
            cpu.push(("tansu broker".to_string(), broker));
        }
        let throughput = Throughput {
            what: format!(
                "ingest {mode} ({} clients, {} B bodies)",
                args.clients, average_body
            ),
            actions: tally.actions,
            seconds: args.duration as f64,
            cpu,
        };
        println!("{throughput}\n    request latency: {latency}");
        if !tally.errors.is_empty() {
            println!("    errors: {:?}", tally.errors);
        }
        let mut row = Row::new(format!("ingest {mode}"));
        row.actions_per_second = Some(throughput.per_second());
        row.cpu_per_million = throughput.stage_cpu_per_million();
        row.latency = format!(
            "request p50 {:.1} ms / p99 {:.1} ms",
            latency.p50_ms, latency.p99_ms
        );
        row.note = format!(
            "{} clients; ingest at {:.0}% of its core; broker {}",
            args.clients,
            stage_cpu / args.duration as f64 * 100.0,
            broker_cpu
                .map(|cpu| format!("{:.0}% CPU", cpu / args.duration as f64 * 100.0))
                .unwrap_or_else(|| "?".into())
        );
        if !tally.errors.is_empty() {
            row.note.push_str(&format!(
                "; {} failed requests",
                tally.errors.values().sum::<u64>()
            ));
        }
        rows.push(row);
    }

    // Sanity: everything acknowledged is on the topic.
    let consumer = metadata_consumer(&options.brokers)?;
    let on_topic = record_count(&consumer, &env.topics().raw, 4)?;
    let accepted = accepted_total.load(Ordering::Relaxed);
    println!(
        "check: {accepted} actions acknowledged to clients, {on_topic} records on actions.raw"
    );
    anyhow::ensure!(
        on_topic as u64 >= accepted,
        "acknowledged actions missing from Kafka"
    );
    env.cleanup();
    Ok(rows)
}

fn parse_mode(mode: &str) -> anyhow::Result<(Protocol, usize)> {
    let (protocol, batch) = mode
        .split_once('-')
        .ok_or_else(|| anyhow::anyhow!("mode {mode:?}: expected rest-<n> or otlp-<n>"))?;
    let protocol = match protocol {
        "rest" => Protocol::Rest,
        "otlp" => Protocol::Otlp,
        other => anyhow::bail!("unknown protocol {other:?} in mode {mode:?}"),
    };
    Ok((protocol, batch.parse()?))
}

fn workload_now_micros() -> i64 {
    agentmeter_bench::workload::now_micros()
}
