//! `agentmeter`: one binary, a subcommand per stage and per tool.
//!
//! * `ingest`, `enrich`, `aggregate` — the three stages; each its own process, scaled on its own.
//! * `migrate` — ClickHouse DDL; `topics` — creates the Kafka topics; `reset-input` — resumes
//!   aggregating a partition whose topic was reset (deleted and re-created, restored).
//! * `config apply FILE` / `config show` / `config validate FILE` — the metering configuration on
//!   the config topic.
//! * `actions` — every action name, auto tag and trace event seen, with its tracking status.
//! * `secret new` — a fresh agent secret and the hash to put in the configuration.
//! * `demo` — a small workload through the REST API and a usage summary from ClickHouse.
//! * `invoices preview | finalize | void | list | show` — draft and finalized invoices
//!   (docs/billing.md, ADR 0004); `billing` — the stage that finalizes closed periods by itself;
//!   `plans simulate` — what a rate plan would have earned against the usage history.
//! * `outcomes` — the stage that derives composite outcomes from the stored actions
//!   (ADR 0005).
//! * `console` — the control-plane API (docs/console.md, ADR 0007); `admin-key new | list |
//!   revoke` — its API keys.
//!
//! Runtime settings come from `--config FILE` (TOML) and `AGENTMETER__SECTION__KEY` environment
//! overrides; see `deploy/local/agentmeter.toml`.

mod actions_cmd;
mod admin_key_cmd;
mod billing_stage;
mod config_changes;
mod config_cmd;
mod config_publish;
mod console;
mod demo;
mod invoice_log;
mod invoices_cmd;
mod outcomes_stage;
mod period_usage;
mod plans_cmd;
mod reset_input_cmd;

use std::path::PathBuf;

use agentmeter_aggregator::{AggregatorConfig, ClickHouseSettings};
use agentmeter_enricher::EnricherConfig;
use agentmeter_ingest::IngestConfig;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_runtime::observability::{init_tracing, prometheus};
use agentmeter_runtime::settings::load_settings;
use agentmeter_runtime::shutdown::on_signals;
use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

/// Every section of the runtime settings file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Brokers, topic names, client overrides.
    pub kafka: KafkaSettings,
    /// Where usage is written and read.
    pub clickhouse: ClickHouseSettings,
    /// `agentmeter ingest`.
    pub ingest: IngestConfig,
    /// `agentmeter enrich`.
    pub enricher: EnricherConfig,
    /// `agentmeter aggregate`.
    pub aggregator: AggregatorConfig,
    /// `agentmeter billing`.
    pub billing: billing_stage::BillingSettings,
    /// `agentmeter outcomes`.
    pub outcomes: outcomes_stage::OutcomesSettings,
    /// `agentmeter console`.
    pub console: console::ConsoleSettings,
}

#[derive(Debug, Parser)]
#[command(
    name = "agentmeter",
    version,
    about = "Metering pipeline for AI agents"
)]
struct Cli {
    /// Runtime settings (TOML). Environment variables AGENTMETER__SECTION__KEY override it.
    #[arg(long, global = true, env = "AGENTMETER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// `agentmeter migrate`.
#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// Cluster mode (ADR 0006): create the database, replicated tables and views on every
    /// replica of this cluster of the server's `remote_servers` (`ON CLUSTER`).
    #[arg(long)]
    cluster: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ingest gateway (REST, agent info).
    Ingest,
    /// Run the enricher (actions.raw → actions.enriched).
    Enrich,
    /// Run the aggregator (actions.enriched → ClickHouse).
    Aggregate,
    /// Apply the ClickHouse migrations (idempotent).
    Migrate(MigrateArgs),
    /// Create the Kafka topics (idempotent).
    Topics,
    /// Resume aggregating partitions whose input was reset (the aggregator's /readyz names them).
    ResetInput(reset_input_cmd::ResetInputArgs),
    /// Manage the metering configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// List every action name, auto tag and trace event seen, with its tracking and cost status.
    Actions(actions_cmd::ActionsArgs),
    /// Agent secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Send a demo workload through ingest and print usage and cost per account.
    Demo(demo::DemoArgs),
    /// Run the billing stage: finalizes every closed period after its grace period
    /// (docs/billing.md).
    Billing,
    /// Run the outcomes stage: derives composite outcomes from the stored actions
    /// (docs/metering-config.md, ADR 0005).
    Outcomes,
    /// Run the control-plane API of the console (docs/console.md).
    Console,
    /// The console's API keys of a workspace.
    #[command(subcommand)]
    AdminKey(admin_key_cmd::AdminKeyCommand),
    /// Rate plans against the real usage history (docs/billing.md).
    #[command(subcommand)]
    Plans(plans_cmd::PlansCommand),
    /// Invoices from the exact usage in ClickHouse (docs/billing.md).
    #[command(subcommand)]
    Invoices(invoices_cmd::InvoicesCommand),
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Print a new random agent secret and the secret_sha256 to configure for it.
    New,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let settings: Settings = load_settings(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, settings))
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Ingest => {
            prometheus();
            agentmeter_ingest::run(settings.ingest, settings.kafka, on_signals()).await
        }
        Command::Enrich => {
            prometheus();
            agentmeter_enricher::run(settings.enricher, settings.kafka, on_signals()).await
        }
        Command::Aggregate => {
            prometheus();
            agentmeter_aggregator::run(
                settings.aggregator,
                settings.clickhouse,
                settings.kafka,
                on_signals(),
            )
            .await
        }
        Command::Migrate(args) => {
            let applied = agentmeter_aggregator::migrate::migrate_on(
                &settings.clickhouse,
                args.cluster.as_deref(),
            )
            .await?;
            if applied.is_empty() {
                println!("database {}: up to date", settings.clickhouse.database);
            } else {
                println!(
                    "database {}: applied {}",
                    settings.clickhouse.database,
                    applied.join(", ")
                );
            }
            Ok(())
        }
        Command::Topics => {
            let created = agentmeter_runtime::kafka::create_topics(&settings.kafka).await?;
            let topics = settings.kafka.topics();
            println!(
                "topics ready: {}, {}, {}, {}, {} (created now: {})",
                topics.raw,
                topics.enriched,
                topics.dead_letter,
                topics.config,
                topics.finalizations,
                if created.is_empty() {
                    "none".to_string()
                } else {
                    created.join(", ")
                }
            );
            Ok(())
        }
        Command::ResetInput(args) => {
            reset_input_cmd::run(
                args,
                &settings.kafka,
                &settings.clickhouse,
                &settings.aggregator,
            )
            .await
        }
        Command::Config(command) => config_cmd::run(command, &settings.kafka).await,
        Command::Actions(args) => actions_cmd::run(args, &settings).await,
        Command::Secret(SecretCommand::New) => {
            let secret = new_secret();
            println!("secret:        {secret}");
            println!(
                "secret_sha256: {}",
                agentmeter_schemas::metering::hash_secret(&secret)
            );
            println!("Give the secret to the agent (VALUE_AGENT_SECRET); put only secret_sha256 in the configuration.");
            Ok(())
        }
        Command::Demo(args) => demo::run(args, &settings).await,
        Command::Invoices(command) => invoices_cmd::run(command, &settings).await,
        Command::Plans(command) => plans_cmd::run(command, &settings).await,
        Command::Billing => {
            prometheus();
            billing_stage::run(settings, on_signals()).await
        }
        Command::Outcomes => {
            prometheus();
            outcomes_stage::run(settings, on_signals()).await
        }
        Command::Console => {
            prometheus();
            console::run(settings, on_signals()).await
        }
        Command::AdminKey(command) => admin_key_cmd::run(command, &settings.kafka).await,
    }
}

/// 256 random bits, hex, with a recognisable prefix (so leaked secrets can be scanned for).
pub(crate) fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("am_sk_{hex}")
}

#[cfg(test)]
mod tests {
    use super::Settings;

    fn load(text: &str) -> anyhow::Result<Settings> {
        let path = std::env::temp_dir().join(format!(
            "agentmeter-settings-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let settings = agentmeter_runtime::settings::load_settings(Some(&path));
        let _ = std::fs::remove_file(&path);
        settings
    }

    #[test]
    fn durations_read_as_texts_and_the_old_unit_keys_still_work() {
        let new = load(
            "[ingest]\nproduce_timeout = \"12s\"\nmax_late = \"2days\"\n\
             [enricher]\nbatch_max_wait = \"20ms\"\n\
             [aggregator]\nflush_interval = \"300ms\"\ndedupe_horizon = \"15m\"\nwindow = \"5m\"\n\
             [aggregator.ownership]\nstall_after = \"90s\"\n",
        )
        .unwrap();
        let old = load(
            "[ingest]\nproduce_timeout_ms = 12000\nmax_late_seconds = 172800\n\
             [enricher]\nbatch_max_wait_ms = 20\n\
             [aggregator]\nflush_interval_ms = 300\ndedupe_horizon_seconds = 900\nwindow_seconds = 300\n\
             [aggregator.ownership]\nstall_after_seconds = 90\n",
        )
        .unwrap();
        for settings in [&new, &old] {
            assert_eq!(settings.ingest.produce_timeout_ms, 12_000);
            assert_eq!(settings.ingest.max_late_seconds, 172_800);
            assert_eq!(settings.enricher.batch_max_wait_ms, 20);
            assert_eq!(settings.aggregator.flush_interval_ms, 300);
            assert_eq!(settings.aggregator.dedupe_horizon_seconds, 900);
            assert_eq!(settings.aggregator.window_seconds, 300);
            assert_eq!(settings.aggregator.ownership.stall_after_seconds, 90);
        }
        let error = format!(
            "{:#}",
            load("[aggregator]\nwindow = \"1.5s\"\n").unwrap_err()
        );
        assert!(error.contains("whole number of seconds"), "{error}");
    }
}
