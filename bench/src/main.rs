//! `agentmeter-bench`: load harness of agentmeter against the real broker and ClickHouse.
//!
//! Every subcommand works in a fresh world (topic prefix, database, consumer groups, ports),
//! runs the release `agentmeter` stages pinned with `taskset -c <stage cpus>` while the load
//! generator itself runs on `<loadgen cpus>`, and prints actions/s, CPU seconds per million
//! actions (from `/proc/<pid>/stat` of the stage) and latencies where they apply. `bench/README.md`
//! explains each one and holds the measured figures.

mod modes;

use std::path::PathBuf;

use agentmeter_bench::env::Options;
use agentmeter_bench::measure::{parse_cpus, pin_current_thread};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentmeter-bench",
    about = "Load harness of agentmeter (benchmarks, not tests)"
)]
struct Cli {
    /// The agentmeter binary to run (build it with `cargo build --release`).
    #[arg(long, global = true)]
    agentmeter: Option<PathBuf>,
    /// Kafka bootstrap servers (the shared tansu by default).
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// ClickHouse HTTP URL (the shared ClickHouse by default).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    /// CPUs the stage processes are pinned to (taskset list).
    #[arg(long, global = true, default_value = "1")]
    stage_cpus: String,
    /// CPUs the load generator (this process) is pinned to.
    #[arg(long, global = true, default_value = "0")]
    loadgen_cpus: String,
    /// Keep topics, database and logs afterwards.
    #[arg(long, global = true)]
    keep: bool,
    /// An extra librdkafka setting for the stages, `KEY=VALUE` (repeatable): written to
    /// `[kafka.client_overrides]` of the run's settings, to measure client tuning.
    #[arg(long = "kafka-setting", global = true, value_parser = parse_kafka_setting)]
    kafka_settings: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// REST and OTLP/HTTP batches into `agentmeter ingest`.
    Ingest(modes::ingest::Args),
    /// Pre-loaded `actions.raw` through `agentmeter enrich`.
    Enrich(modes::pipeline::EnrichArgs),
    /// Pre-loaded `actions.enriched` through `agentmeter aggregate` into ClickHouse.
    Aggregate(modes::pipeline::AggregateArgs),
    /// `agentmeter aggregate` SIGKILLed after a sustained run and restarted: the time from the
    /// restart to new progress, with the restart store or without it.
    AggregateRestart(modes::pipeline::AggregateRestartArgs),
    /// REST → ingest → enrich → aggregate → ClickHouse, with action-to-queryable latency.
    EndToEnd(modes::e2e::Args),
    /// Agent A floods ingest from many connections while agent B of another workspace sends at
    /// a steady rate: B's latency and refusals, unloaded and under the flood.
    Fairness(modes::fairness::Args),
    /// Query time of `usage_by_account_month` over 10 million actions.
    MonthlyView(modes::monthly::Args),
    /// The draft invoices of every account of a workspace of 1,000 accounts and 10 million
    /// actions, from the usage and from the raw events: both times, and that they agree.
    Invoices(modes::invoices::Args),
    /// p95 latency of every read of `agentmeter console` (API and web pages) over the 10 million
    /// actions of `monthly-view` (target: under 300 ms).
    Console(modes::console::Args),
    /// The same messages through plain rdkafka (and plain ClickHouse inserts).
    Baseline(modes::baseline::Args),
    /// baseline, ingest, enrich, aggregate and end-to-end in one run, with a summary table.
    All(modes::AllArgs),
}

fn parse_kafka_setting(setting: &str) -> Result<(String, String), String> {
    match setting.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {setting:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf();
    let options = Options {
        agentmeter: cli
            .agentmeter
            .clone()
            .unwrap_or_else(|| repo_root.join("target/release/agentmeter")),
        repo_root,
        brokers: cli.brokers.clone(),
        clickhouse_url: cli.clickhouse_url.clone(),
        stage_cpus: cli.stage_cpus.clone(),
        keep: cli.keep,
        kafka_client_overrides: cli.kafka_settings.clone(),
    };
    // Before any thread exists, so every thread (tokio, librdkafka) inherits the pinning.
    let loadgen_cpus = parse_cpus(&cli.loadgen_cpus)?;
    let stage_cpus = parse_cpus(&cli.stage_cpus)?;
    pin_current_thread(&loadgen_cpus)?;
    options.ensure_services()?;
    print_machine(&options, &loadgen_cpus);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(async {
        match cli.command {
            Command::Ingest(args) => modes::ingest::run(&options, args).await,
            Command::Enrich(args) => modes::pipeline::run_enrich(&options, args).await,
            Command::Aggregate(args) => modes::pipeline::run_aggregate(&options, args).await,
            Command::AggregateRestart(args) => {
                modes::pipeline::run_aggregate_restart(&options, args).await
            }
            Command::EndToEnd(args) => modes::e2e::run(&options, args).await,
            Command::Fairness(args) => modes::fairness::run(&options, args).await,
            Command::MonthlyView(args) => modes::monthly::run(&options, args).await,
            Command::Invoices(args) => modes::invoices::run(&options, args).await,
            Command::Console(args) => modes::console::run(&options, args).await,
            Command::Baseline(args) => modes::baseline::run(&options, args, &stage_cpus).await,
            Command::All(args) => modes::run_all(&options, args, &stage_cpus).await,
        }
    })?;
    modes::print_summary(&rows);
    Ok(())
}

fn print_machine(options: &Options, loadgen_cpus: &[usize]) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# agentmeter-bench: stages on CPUs {} (taskset), load generator on CPUs {:?} ({} usable here); \
         broker {}, ClickHouse {}; load average {}",
        options.stage_cpus,
        loadgen_cpus,
        cpus,
        options.brokers,
        options.clickhouse_url,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}
