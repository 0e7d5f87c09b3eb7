//! The subcommands of `agentmeter-bench` and the summary table they share.

pub mod baseline;
pub mod console;
pub mod e2e;
pub mod fairness;
pub mod ingest;
pub mod invoices;
pub mod monthly;
pub mod pipeline;

use agentmeter_bench::env::Options;

/// One line of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub actions_per_second: Option<f64>,
    /// CPU seconds per million actions of the measured process(es).
    pub cpu_per_million: Option<f64>,
    pub latency: String,
    pub note: String,
}

impl Row {
    pub fn new(what: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            actions_per_second: None,
            cpu_per_million: None,
            latency: String::new(),
            note: String::new(),
        }
    }
}

pub fn print_summary(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!("\n## Summary\n");
    println!(
        "| what | actions/s | CPU-s per 1M actions | actions per CPU-second | latency | notes |"
    );
    println!("|---|---:|---:|---:|---|---|");
    for row in rows {
        let rate = row
            .actions_per_second
            .map(|rate| format!("{rate:.0}"))
            .unwrap_or_else(|| "—".into());
        let cpu = row
            .cpu_per_million
            .map(|cpu| format!("{cpu:.2}"))
            .unwrap_or_else(|| "—".into());
        let per_cpu = row
            .cpu_per_million
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| format!("{:.0}", 1e6 / cpu))
            .unwrap_or_else(|| "—".into());
        println!(
            "| {} | {rate} | {cpu} | {per_cpu} | {} | {} |",
            row.what, row.latency, row.note
        );
    }
}

#[derive(Debug, clap::Args)]
pub struct AllArgs {
    /// Actions for baseline, enrich and aggregate.
    #[arg(long, default_value_t = 1_000_000)]
    pub actions: u64,
    /// Actions for end-to-end.
    #[arg(long, default_value_t = 100_000)]
    pub e2e_actions: u64,
    /// Seconds per ingest mode.
    #[arg(long, default_value_t = 10)]
    pub ingest_seconds: u64,
}

/// Baseline first, then every stage, in one run.
pub async fn run_all(
    options: &Options,
    args: AllArgs,
    stage_cpus: &[usize],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    rows.extend(
        baseline::run(
            options,
            baseline::Args {
                actions: args.actions,
                skip_clickhouse: false,
                linger_ms: 5,
                produce_only: false,
            },
            stage_cpus,
        )
        .await?,
    );
    rows.extend(
        ingest::run(
            options,
            ingest::Args {
                modes: ingest::ALL_MODES.iter().map(|m| m.to_string()).collect(),
                clients: 8,
                duration: args.ingest_seconds,
                warmup: 2,
            },
        )
        .await?,
    );
    rows.extend(
        pipeline::run_enrich(
            options,
            pipeline::EnrichArgs {
                actions: args.actions,
            },
        )
        .await?,
    );
    rows.extend(
        pipeline::run_aggregate(
            options,
            pipeline::AggregateArgs {
                actions: args.actions,
            },
        )
        .await?,
    );
    rows.extend(
        e2e::run(
            options,
            e2e::Args {
                actions: args.e2e_actions,
                rate: 5000,
                batch: 100,
                clients: 8,
            },
        )
        .await?,
    );
    Ok(rows)
}
