//! `agentmeter admin-key new | list | revoke`: the control plane's API keys of a workspace
//! (docs/console.md). A key is shown once, when made; the config topic keeps only its SHA-256,
//! in the workspace's record, so a new key or a revocation is a new configuration version (the
//! metering configuration itself unchanged) and a deleted workspace takes its keys with it.
//!
//! `admin-key new --login EMAIL` makes a console login by password instead: the password is
//! read from `AGENTMETER_CONSOLE_PASSWORD` or the first line of standard input, and only its
//! Argon2id hash is kept (`crate::console::password`). A login is listed, revoked and audited
//! like a key.

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
        /// Make a console login by password (an email as its login name) instead of a key.
        #[arg(long)]
        login: Option<String>,
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
            login,
        } => {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 128,
                "--name must be 1-128 characters"
            );
            let role = match role {
                Role::Admin => AdminRole::Admin,
                Role::ReadOnly => AdminRole::ReadOnly,
            };
            let created_at = time::OffsetDateTime::now_utc();
            let (admin_key, key) = match login {
                None => {
                    let key = format!("amk_{}", crate::new_secret().trim_start_matches("am_sk_"));
                    let admin_key = AdminKey {
                        id: format!("key_{}", &hash_secret(&key)[..12]),
                        name,
                        role,
                        key_sha256: hash_secret(&key),
                        login: None,
                        password_phc: None,
                        created_at,
                        revoked_at: None,
                    };
                    (admin_key, Some(key))
                }
                Some(login) => {
                    let login = login.trim().to_lowercase();
                    anyhow::ensure!(
                        (3..=254).contains(&login.len())
                            && login.contains('@')
                            && !login.chars().any(char::is_whitespace),
                        "--login must be an email address (3-254 characters, no spaces)"
                    );
                    let password = read_password()?;
                    let phc = tokio::task::spawn_blocking(move || {
                        crate::console::password::hash(&password)
                    })
                    .await??;
                    let admin_key = AdminKey {
                        id: format!("key_{}", &hash_secret(&crate::new_secret())[..12]),
                        name,
                        role,
                        key_sha256: String::new(),
                        login: Some(login),
                        password_phc: Some(phc),
                        created_at,
                        revoked_at: None,
                    };
                    (admin_key, None)
                }
            };
            let id = admin_key.id.clone();
            let login = admin_key.login.clone();
            let published = publish_next(kafka, &workspace, None, "cli", |current| {
                let current = current.ok_or(PublishError::UnknownWorkspace)?;
                if let Some(login) = &admin_key.login {
                    let taken = current
                        .admin_keys
                        .iter()
                        .any(|key| key.login.as_ref() == Some(login) && key.is_active(created_at));
                    if taken {
                        return Err(PublishError::Refused {
                            field: Some("login".to_string()),
                            message: format!(
                                "{login:?} already logs in to this workspace; revoke it first"
                            ),
                        });
                    }
                }
                let mut keys = current.admin_keys.clone();
                keys.push(admin_key);
                Ok(Edited {
                    config: current.config.clone(),
                    admin_keys: Some(keys),
                })
            })
            .await
            .map_err(|error| anyhow::anyhow!("workspace {workspace:?}: {error}"))?;
            match (key, login) {
                (Some(key), _) => {
                    println!(
                        "admin key {id} for workspace {workspace} (version {}):",
                        published.record.version
                    );
                    println!("{key}");
                    println!(
                        "Shown once: only its SHA-256 is kept. Send it as Authorization: Bearer <key>."
                    );
                }
                (None, login) => println!(
                    "console login {} ({id}) for workspace {workspace} (version {}): log in with the workspace id, this login and the password; only its Argon2id hash is kept",
                    login.unwrap_or_default(),
                    published.record.version
                ),
            }
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
                "{:<18} {:<10} {:<24} {:<26} name (login)",
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
                    match &key.login {
                        Some(login) => format!("{} ({login})", key.name),
                        None => key.name.clone(),
                    }
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

/// The new login's password: `AGENTMETER_CONSOLE_PASSWORD`, or the first line of standard input
/// (so it is never an argument, which other users of the machine could read).
fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("AGENTMETER_CONSOLE_PASSWORD") {
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
