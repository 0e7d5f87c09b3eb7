//! `agentmeter config …`: validate, publish and show metering configurations.

use std::path::PathBuf;
use std::time::Duration;

use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_schemas::metering::ConfigFileError;
use agentmeter_schemas::MeteringConfig;
use anyhow::Context;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE and publish it as the workspace's next configuration version.
    Apply {
        /// A metering configuration (TOML), e.g. deploy/local/metering.example.toml.
        file: PathBuf,
    },
    /// Validate FILE without publishing.
    Validate { file: PathBuf },
    /// Print the current configuration of every workspace on the config topic (JSON).
    Show,
    /// Print a workspace's current configuration as a TOML file `config apply` accepts.
    Export {
        /// The workspace to export.
        workspace: String,
    },
    /// Delete a workspace: its configuration is tombstoned on the config topic, so its agent
    /// secrets and admin keys are refused at once; its data in ClickHouse is kept.
    Delete {
        /// The workspace to delete.
        workspace: String,
        /// Confirms the deletion.
        #[arg(long)]
        yes: bool,
    },
}

fn load(file: &PathBuf) -> anyhow::Result<MeteringConfig> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match MeteringConfig::from_toml(&text) {
        Ok(config) => Ok(config),
        Err(ConfigFileError::Invalid(problems)) => {
            anyhow::bail!(
                "{} is invalid; nothing was applied.\n{problems}",
                file.display()
            )
        }
        Err(error @ ConfigFileError::Parse(_)) => {
            anyhow::bail!("{}: {error}; nothing was applied.", file.display())
        }
    }
}

pub async fn run(command: ConfigCommand, kafka: &KafkaSettings) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Validate { file } => {
            let config = load(&file)?;
            println!(
                "{}: valid (workspace {})",
                file.display(),
                config.workspace.id
            );
            Ok(())
        }
        ConfigCommand::Show => {
            let kafka = kafka.clone();
            let records = tokio::task::spawn_blocking(move || {
                read_config_topic(&kafka, Duration::from_secs(30))
            })
            .await??;
            let mut workspaces: Vec<_> = records.into_values().map(|(record, _)| record).collect();
            workspaces.sort_by(|a, b| a.config.workspace.id.cmp(&b.config.workspace.id));
            println!("{}", serde_json::to_string_pretty(&workspaces)?);
            Ok(())
        }
        ConfigCommand::Export { workspace } => {
            let kafka = kafka.clone();
            let mut records = tokio::task::spawn_blocking(move || {
                read_config_topic(&kafka, Duration::from_secs(30))
            })
            .await??;
            let (record, _) = records.remove(&workspace).with_context(|| {
                format!("workspace {workspace:?} has no configuration on the config topic")
            })?;
            println!(
                "# workspace {workspace}, version {}, applied {}",
                record.version, record.applied_at
            );
            print!(
                "{}",
                toml::to_string(&record.config)
                    .context("cannot write the configuration as TOML")?
            );
            Ok(())
        }
        ConfigCommand::Apply { file } => {
            let config = load(&file)?;
            let workspace_id = config.workspace.id.clone();
            let published = crate::config_publish::publish_next(
                kafka,
                &workspace_id,
                None,
                "cli",
                |_| {
                    Ok(crate::config_publish::Edited {
                        config,
                        admin_keys: None,
                    })
                },
            )
            .await
            .map_err(|error| {
                use crate::config_publish::PublishError;
                let file = file.display();
                match error {
                    PublishError::Failed(error) => error,
                    PublishError::Invalid(problems) => {
                        anyhow::anyhow!("{file} is invalid; nothing was applied.\n{problems}")
                    }
                    PublishError::FinalizedPeriods(problems) => anyhow::anyhow!(
                        "{file} would change what finalized invoices billed; nothing was applied.\n{}",
                        problems
                            .iter()
                            .map(|problem| format!("  - {problem}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    ),
                    refused => anyhow::anyhow!("{file}: {refused}; nothing was applied."),
                }
            })?;
            let version = published.record.version;
            if !published.changed {
                println!("workspace {workspace_id}: unchanged (version {version})");
                return Ok(());
            }
            println!("workspace {workspace_id}: applied version {version}");
            for line in published.summary {
                println!("  {line}");
            }
            Ok(())
        }
        ConfigCommand::Delete { workspace, yes } => {
            anyhow::ensure!(
                yes,
                "deleting workspace {workspace:?} refuses its agent secrets and admin keys at once; run again with --yes"
            );
            crate::config_publish::delete_workspace(kafka, &workspace).await?;
            println!("workspace {workspace}: deleted (a tombstone on the config topic; its data in ClickHouse is kept)");
            Ok(())
        }
    }
}

/// Every rate plan as `product/plan`, with its whole content (to tell a changed price).
fn rate_plans(
    config: &MeteringConfig,
) -> std::collections::BTreeMap<String, &agentmeter_schemas::catalog::RatePlan> {
    agentmeter_schemas::catalog::rate_plans(&config.products)
        .map(|(product, plan)| (format!("{}/{}", product.id, plan.id), plan))
        .collect()
}

/// An outcome definition with its condition, so that a changed `when` shows as a change.
fn describe_outcome(outcome: &agentmeter_schemas::metering::OutcomeDefinition) -> String {
    match &outcome.when {
        Some(when) => format!(
            "{} when {}",
            outcome.action,
            serde_json::to_string(when).unwrap_or_default()
        ),
        None => outcome.action.clone(),
    }
}

/// One line per changed part of the configuration.
pub fn describe_changes(before: Option<&MeteringConfig>, after: &MeteringConfig) -> Vec<String> {
    let Some(before) = before else {
        return vec![format!(
            "new workspace: {} accounts, {} agent instances, {} tracked actions, {} cost allocations, {} outcomes, {} rate plans, {} subscriptions",
            after.accounts.len(),
            after.agent_instances.len(),
            after.tagging.tracked.len(),
            after.cost_allocations.len(),
            after.outcomes.len(),
            rate_plans(after).len(),
            after.subscriptions.len()
        )];
    };
    let mut lines = Vec::new();
    let mut compare = |name: &str, before: Vec<String>, after: Vec<String>| {
        let added: Vec<_> = after
            .iter()
            .filter(|item| !before.contains(item))
            .cloned()
            .collect();
        let removed: Vec<_> = before
            .iter()
            .filter(|item| !after.contains(item))
            .cloned()
            .collect();
        if !added.is_empty() {
            lines.push(format!("{name} added: {}", added.join(", ")));
        }
        if !removed.is_empty() {
            lines.push(format!("{name} removed: {}", removed.join(", ")));
        }
    };
    let ids = |items: Vec<String>| items;
    compare(
        "accounts",
        ids(before.accounts.iter().map(|a| a.id.clone()).collect()),
        ids(after.accounts.iter().map(|a| a.id.clone()).collect()),
    );
    compare(
        "agent instances",
        before
            .agent_instances
            .iter()
            .map(|i| {
                format!(
                    "{} (secret {}…)",
                    i.id,
                    &i.secret_sha256[..8.min(i.secret_sha256.len())]
                )
            })
            .collect(),
        after
            .agent_instances
            .iter()
            .map(|i| {
                format!(
                    "{} (secret {}…)",
                    i.id,
                    &i.secret_sha256[..8.min(i.secret_sha256.len())]
                )
            })
            .collect(),
    );
    compare(
        "tracked",
        before.tagging.tracked.clone(),
        after.tagging.tracked.clone(),
    );
    let allocation = |config: &MeteringConfig| {
        config
            .cost_allocations
            .iter()
            .map(|allocation| {
                let rates: Vec<String> = allocation
                    .rates
                    .iter()
                    .map(|rate| {
                        format!("{} from {}", rate.cost_per_unit, rate.effective_from.date())
                    })
                    .collect();
                format!(
                    "{} [{}: {}]",
                    allocation.action,
                    allocation.measure,
                    rates.join("; ")
                )
            })
            .collect::<Vec<_>>()
    };
    compare("cost allocation", allocation(before), allocation(after));
    compare(
        "outcomes",
        before.outcomes.iter().map(describe_outcome).collect(),
        after.outcomes.iter().map(describe_outcome).collect(),
    );
    let plans_before = rate_plans(before);
    let plans_after = rate_plans(after);
    compare(
        "rate plans",
        plans_before.keys().cloned().collect(),
        plans_after.keys().cloned().collect(),
    );
    let changed: Vec<&str> = plans_after
        .iter()
        .filter(|(key, plan)| plans_before.get(*key).is_some_and(|old| old != *plan))
        .map(|(key, _)| key.as_str())
        .collect();
    let subscription = |config: &MeteringConfig| {
        config
            .subscriptions
            .iter()
            .map(|s| {
                let end = s.end.map(|end| format!(" to {end}")).unwrap_or_default();
                format!(
                    "{} ({} on {}/{} from {}{end})",
                    s.id, s.account, s.product, s.rate_plan, s.start
                )
            })
            .collect::<Vec<_>>()
    };
    compare("subscriptions", subscription(before), subscription(after));
    let exchange_rates = |config: &MeteringConfig| {
        config
            .exchange_rates
            .iter()
            .map(|rate| {
                format!(
                    "{} → {} {} from {}",
                    rate.from, rate.to, rate.rate, rate.effective_from
                )
            })
            .collect::<Vec<_>>()
    };
    compare(
        "exchange rates",
        exchange_rates(before),
        exchange_rates(after),
    );
    if !changed.is_empty() {
        lines.push(format!("rate plans changed: {}", changed.join(", ")));
    }
    if lines.is_empty() {
        lines.push("descriptive fields changed (names, contacts, descriptions)".into());
    }
    lines
}
