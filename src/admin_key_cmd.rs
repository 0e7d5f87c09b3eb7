//! `agentmeter admin-key new | list | revoke`: the control plane's API keys of a workspace
//! (docs/console.md). A key is shown once, when made; the config topic keeps only its SHA-256,
//! in the workspace's record, so a new key or a revocation is a new configuration version (the
//! metering configuration itself unchanged) and a deleted workspace takes its keys with it.

use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_schemas::metering::{hash_secret, AdminKey, AdminRole};
use anyhow::Context;
use clap::{Subcommand, ValueEnum};

use crate::config_publish::{publish_next, Edited, PublishError};

#[derive(Debug, Subcommand)]
pub enum AdminKeyCommand {
    /// Make a key; it is printed once.
    New {
        /// The workspace the key acts on.
        #[arg(long)]
        workspace: String,
        /// What the key is for ("ci", "alice").
        #[arg(long)]
        name: String,
        /// `admin` reads and changes; `read-only` only reads.
        #[arg(long, value_enum, default_value = "admin")]
        role: Role,
    },
    /// List a workspace's keys (ids, names, roles, revoked or not; never the keys).
    List {
        #[arg(long)]
        workspace: String,
    },
    /// Revoke a key at once.
    Revoke {
        #[arg(long)]
        workspace: String,
        /// The key's id (`key_…`, from `admin-key list`).
        id: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    Admin,
    ReadOnly,
}

pub async fn run(command: AdminKeyCommand, kafka: &KafkaSettings) -> anyhow::Result<()> {
    match command {
        AdminKeyCommand::New {
            workspace,
            name,
            role,
        } => {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 128,
                "--name must be 1-128 characters"
            );
            let key = format!("amk_{}", crate::new_secret().trim_start_matches("am_sk_"));
            let id = format!("key_{}", &hash_secret(&key)[..12]);
            let admin_key = AdminKey {
                id: id.clone(),
                name,
                role: match role {
                    Role::Admin => AdminRole::Admin,
                    Role::ReadOnly => AdminRole::ReadOnly,
                },
                key_sha256: hash_secret(&key),
                created_at: time::OffsetDateTime::now_utc(),
                revoked_at: None,
            };
            let published = publish_next(kafka, &workspace, None, "cli", |current| {
                let current = current.ok_or(PublishError::UnknownWorkspace)?;
                let mut keys = current.admin_keys.clone();
                keys.push(admin_key);
                Ok(Edited {
                    config: current.config.clone(),
                    admin_keys: Some(keys),
                })
            })
            .await
            .map_err(|error| anyhow::anyhow!("workspace {workspace:?}: {error}"))?;
            println!(
                "admin key {id} for workspace {workspace} (version {}):",
                published.record.version
            );
            println!("{key}");
            println!(
                "Shown once: only its SHA-256 is kept. Send it as Authorization: Bearer <key>."
            );
            Ok(())
        }
        AdminKeyCommand::List { workspace } => {
            let kafka = kafka.clone();
            let mut records = tokio::task::spawn_blocking(move || {
                agentmeter_runtime::config_watch::read_config_topic(
                    &kafka,
                    std::time::Duration::from_secs(30),
                )
            })
            .await??;
            let (record, _) = records
                .remove(&workspace)
                .with_context(|| format!("workspace {workspace:?} has no configuration"))?;
            println!(
                "{:<18} {:<10} {:<24} {:<26} name",
                "id", "role", "created", "revoked"
            );
            for key in &record.admin_keys {
                println!(
                    "{:<18} {:<10} {:<24} {:<26} {}",
                    key.id,
                    match key.role {
                        AdminRole::Admin => "admin",
                        AdminRole::ReadOnly => "read-only",
                    },
                    key.created_at.date().to_string(),
                    key.revoked_at.map(|at| at.to_string()).unwrap_or_default(),
                    key.name
                );
            }
            Ok(())
        }
        AdminKeyCommand::Revoke { workspace, id } => {
            let now = time::OffsetDateTime::now_utc();
            publish_next(kafka, &workspace, None, "cli", |current| {
                let current = current.ok_or(PublishError::UnknownWorkspace)?;
                let mut keys = current.admin_keys.clone();
                let key = keys
                    .iter_mut()
                    .find(|key| key.id == id)
                    .ok_or_else(|| PublishError::NotFound(format!("admin key {id:?}")))?;
                key.revoked_at.get_or_insert(now);
                Ok(Edited {
                    config: current.config.clone(),
                    admin_keys: Some(keys),
                })
            })
            .await
            .map_err(|error| anyhow::anyhow!("workspace {workspace:?}: {error}"))?;
            println!("admin key {id} of workspace {workspace}: revoked");
            Ok(())
        }
    }
}
