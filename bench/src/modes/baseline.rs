//! `agentmeter-bench baseline`: what the broker (and ClickHouse) allow without agentmeter.
//!
//! The same N raw-action records the enrich benchmark pre-loads (same keys, same bytes) go
//! through plain rdkafka clients with the stages' own client settings, on a thread pinned to the
//! stage CPUs (librdkafka's threads inherit the pinning):
//! 1. produce N to a fresh topic (acks=all, idempotent, linger 5 ms) — what ingest can reach;
//! 2. consume N with a group consumer — what the aggregator's input side can reach;
//! 3. pipe: consume N and produce each record unchanged to a second topic, waiting for every
//!    acknowledgement — the enricher's I/O without decode/enrich/encode;
//! 4. insert N enriched actions as `actions` rows straight into ClickHouse with the `clickhouse`
//!    crate (what the aggregator's sink can reach; `--skip-clickhouse` to leave out).
//!
//! CPU is this process's own (`/proc/self/stat`; nothing else runs in it meanwhile).

use std::time::{Duration, Instant};

use agentmeter_aggregator::rows::ActionRow;
use agentmeter_aggregator::state::CountedAction;
use agentmeter_bench::env::{BenchEnv, Options};
use agentmeter_bench::kafka::{
    metadata_consumer, produce_all, producer_with_linger, record_count, stage_like_consumer_config,
};
use agentmeter_bench::measure::{own_cpu_seconds, pin_current_thread, CpuProbe, Throughput};
use agentmeter_bench::workload::{now_micros, Workload};
use agentmeter_schemas::encode_raw_action;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;

use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records.
    #[arg(long, default_value_t = 1_000_000)]
    pub actions: u64,
    /// Leave out the ClickHouse insert baseline.
    #[arg(long)]
    pub skip_clickhouse: bool,
    /// Producer `linger.ms` of the baseline clients (the stages use 5).
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// Only the produce baseline.
    #[arg(long)]
    pub produce_only: bool,
}

pub async fn run(options: &Options, args: Args, stage_cpus: &[usize]) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(options, "baseline")?;
    if !args.skip_clickhouse {
        env.migrate()?;
    }
    let topics = env.topics();
    let source = topics.raw.clone();
    let target = topics.enriched.clone();
    let n = args.actions;
    let workload = Workload::example();
    let run = env.unique.clone();
    println!("baseline: generating {n} raw-action records (in memory)");
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|index| {
            let raw = workload.raw_action(&run, index, now_micros());
            let payload = encode_raw_action(&raw).expect("encodes");
            (raw.message_key().into_bytes(), payload)
        })
        .collect();
    let average = records.iter().map(|(_, p)| p.len()).sum::<usize>() / n.max(1) as usize;
    let tansu = options.service_pid("tansu");
    let clickhouse = options.service_pid("clickhouse");
    let brokers = options.brokers.clone();
    let cpus = stage_cpus.to_vec();
    let group = format!("{}baseline", env.run.topic_prefix);
    let (linger_ms, produce_only) = (args.linger_ms, args.produce_only);

    let kafka_results = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> anyhow::Result<Vec<Throughput>> {
            pin_current_thread(&cpus)?;
            let mut results = Vec::new();
            let consumer_meta = metadata_consumer(&brokers)?;

            // 1. produce
            let broker = tansu.map(|pid| CpuProbe::new("tansu", pid));
            let cpu = own_cpu_seconds();
            let producer = producer_with_linger(&brokers, linger_ms)?;
            let elapsed = produce_all(&producer, &source, n, |index| {
                records[index as usize].clone()
            })?;
            results.push(Throughput {
                what: format!(
                    "baseline produce ({average} B records, acks=all, idempotent, linger.ms={linger_ms})"
                ),
                actions: n,
                seconds: elapsed.as_secs_f64(),
                cpu: with_broker(own_cpu_seconds() - cpu, &broker),
            });
            drop(producer);
            anyhow::ensure!(record_count(&consumer_meta, &source, 4)? as u64 == n);
            if produce_only {
                return Ok(results);
            }

            // 2. consume
            let consumer: BaseConsumer =
                stage_like_consumer_config(&brokers, &format!("{group}.consume")).create()?;
            consumer.subscribe(&[&source])?;
            let (seconds, cpu_used, broker_used) = consume_n(&consumer, n, &tansu, |_| Ok(()))?;
            results.push(Throughput {
                what: "baseline consume (group consumer, from first record)".into(),
                actions: n,
                seconds,
                cpu: vec![
                    ("baseline client (pinned)".into(), cpu_used),
                    ("tansu broker".into(), broker_used),
                ],
            });
            drop(consumer);

            // 3. pipe
            let consumer: BaseConsumer =
                stage_like_consumer_config(&brokers, &format!("{group}.pipe")).create()?;
            consumer.subscribe(&[&source])?;
            let producer = producer_with_linger(&brokers, linger_ms)?;
            let started_cpu_broker = std::cell::Cell::new(None::<(Instant, f64, f64)>);
            consume_n(&consumer, n, &tansu, |message| {
                if started_cpu_broker.get().is_none() {
                    started_cpu_broker.set(Some((
                        Instant::now(),
                        own_cpu_seconds(),
                        tansu.and_then(agentmeter_bench::measure::cpu_seconds).unwrap_or(0.0),
                    )));
                }
                let mut record = BaseRecord::to(&target)
                    .key(message.key().unwrap_or_default())
                    .payload(message.payload().unwrap_or_default());
                loop {
                    match producer.send(record) {
                        Ok(()) => return Ok(()),
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(1));
                        }
                        Err((error, _)) => return Err(error).context("pipe produce"),
                    }
                }
            })?;
            producer.flush(Duration::from_secs(300))?;
            let (started, cpu0, broker0) = started_cpu_broker.get().expect("piped something");
            let delivered = producer.context().ok.load(std::sync::atomic::Ordering::Relaxed);
            anyhow::ensure!(delivered == n, "pipe: {delivered} of {n} acknowledged");
            results.push(Throughput {
                what: "baseline pipe (consume → produce unchanged, all acknowledged)".into(),
                actions: n,
                seconds: started.elapsed().as_secs_f64(),
                cpu: vec![
                    ("baseline client (pinned)".into(), own_cpu_seconds() - cpu0),
                    (
                        "tansu broker".into(),
                        tansu
                            .and_then(agentmeter_bench::measure::cpu_seconds)
                            .unwrap_or(0.0)
                            - broker0,
                    ),
                ],
            });
            Ok(results)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("baseline thread panicked"))?
    })
    .await??;

    let mut rows = Vec::new();
    for result in &kafka_results {
        println!("{result}");
        let mut row = Row::new(result.what.clone());
        row.actions_per_second = Some(result.per_second());
        row.cpu_per_million = result.stage_cpu_per_million();
        row.note = format!(
            "plain rdkafka on the stage core; broker {:.0}% CPU",
            result
                .cpu
                .get(1)
                .map(|c| c.1 / result.seconds * 100.0)
                .unwrap_or(0.0)
        );
        rows.push(row);
    }

    if !args.skip_clickhouse && !args.produce_only {
        // 4. ClickHouse inserts of `actions` rows (the aggregator's biggest write).
        let settings = env.clickhouse_settings();
        let cpus = stage_cpus.to_vec();
        let actions: Vec<ActionRow> = (0..n)
            .map(|index| {
                let counted = CountedAction {
                    action: workload.enriched_action(&run, index, now_micros()),
                    partition: (index % 4) as i32,
                    offset: (index / 4) as i64,
                };
                ActionRow::from_counted(&counted).expect("row")
            })
            .collect();
        let result = tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || -> anyhow::Result<Throughput> {
                pin_current_thread(&cpus)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let client = settings.client().with_database(&settings.database);
                let server = clickhouse.map(|pid| CpuProbe::new("clickhouse", pid));
                let cpu = own_cpu_seconds();
                let started = Instant::now();
                runtime.block_on(async {
                    for chunk in actions.chunks(50_000) {
                        let mut insert = client.insert::<ActionRow>("actions").await?;
                        for row in chunk {
                            insert.write(row).await?;
                        }
                        insert.end().await?;
                    }
                    anyhow::Ok(())
                })?;
                let seconds = started.elapsed().as_secs_f64();
                let mut cpu = vec![("baseline client (pinned)".to_string(), own_cpu_seconds() - cpu)];
                if let Some(server) = server {
                    cpu.push(("clickhouse-server".into(), server.used().unwrap_or(0.0)));
                }
                Ok(Throughput {
                    what: "baseline ClickHouse insert of `actions` rows (clickhouse crate, 50k rows per INSERT)".into(),
                    actions: n,
                    seconds,
                    cpu,
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("insert thread panicked"))?
        })
        .await??;
        println!("{result}");
        let mut row = Row::new(result.what.clone());
        row.actions_per_second = Some(result.per_second());
        row.cpu_per_million = result.stage_cpu_per_million();
        row.note = format!(
            "client on the stage core; clickhouse-server {:.0}% CPU",
            result
                .cpu
                .get(1)
                .map(|c| c.1 / result.seconds * 100.0)
                .unwrap_or(0.0)
        );
        rows.push(row);
    }
    env.cleanup();
    Ok(rows)
}

fn with_broker(own: f64, broker: &Option<CpuProbe>) -> Vec<(String, f64)> {
    let mut cpu = vec![("baseline client (pinned)".to_string(), own)];
    if let Some(broker) = broker {
        cpu.push(("tansu broker".into(), broker.used().unwrap_or(0.0)));
    }
    cpu
}

/// Reads `n` records; returns (seconds from the first record, own CPU, broker CPU) over that span.
fn consume_n(
    consumer: &BaseConsumer,
    n: u64,
    tansu: &Option<u32>,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(120 + n / 2_000);
    let mut read = 0u64;
    let mut first: Option<(Instant, f64, f64)> = None;
    while read < n {
        anyhow::ensure!(Instant::now() < deadline, "consumed only {read} of {n}");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if first.is_none() {
                    first = Some((
                        Instant::now(),
                        own_cpu_seconds(),
                        tansu
                            .and_then(agentmeter_bench::measure::cpu_seconds)
                            .unwrap_or(0.0),
                    ));
                }
                each(&message)?;
                read += 1;
            }
            Some(Err(error)) => anyhow::bail!("consume: {error}"),
            None => {}
        }
    }
    let (started, cpu, broker) = first.expect("read something");
    Ok((
        started.elapsed().as_secs_f64(),
        own_cpu_seconds() - cpu,
        tansu
            .and_then(agentmeter_bench::measure::cpu_seconds)
            .unwrap_or(0.0)
            - broker,
    ))
}
