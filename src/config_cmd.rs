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
