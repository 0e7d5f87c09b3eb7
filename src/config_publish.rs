//! Publishing the next configuration version of a workspace — the one path `config apply`,
//! `admin-key` and the console's writes all take, so every change is checked by the same rules:
//!
//! 1. the workspace's current record is read from the config topic itself (not a cache);
//! 2. when the caller names the version its change was made against, a different current
//!    version refuses the change ([`PublishError::Stale`]: optimistic concurrency, ADR 0007);
//! 3. the whole resulting configuration is validated, its secrets must be in no other workspace,
//!    and it must not change what a finalized invoice billed (ADR 0004);
//! 4. only then is it published as version current + 1, with who changed it.
//!
//! Writes of one process are serialized by [`WRITE_LOCK`], so two console requests never both
//! publish version n + 1. Two *processes* publishing at the same instant could still both read
//! version n; ADR 0007 says why that window is accepted and how it is kept small.

use std::time::Duration;

use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_schemas::metering::{AdminKey, ValidationErrors};
use agentmeter_schemas::{ConfigRecord, MeteringConfig};
use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::Mutex;

/// Serializes this process's writes to the config topic.
static WRITE_LOCK: Mutex<()> = Mutex::const_new(());

/// What a change makes of the current record (`None`: the workspace has none yet).
pub struct Edited {
    pub config: MeteringConfig,
    /// The admin keys of the next version; `None` keeps the current ones.
    pub admin_keys: Option<Vec<AdminKey>>,
}

/// Why a change was not published. Everything but `Failed` is the caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the change was made against version {expected}, but the workspace is at version {current}; reload and make it again")]
    Stale { expected: i64, current: i64 },
    #[error("the workspace has no configuration")]
    UnknownWorkspace,
    /// The change itself is wrong: `field` is the request field at fault, when one is.
    #[error("{message}")]
    Refused {
        field: Option<String>,
        message: String,
    },
    /// The change names something the workspace does not have (`account "acc_x"`).
    #[error("{0} not found")]
    NotFound(String),
    #[error("the resulting configuration is invalid; nothing was changed.\n{0}")]
    Invalid(ValidationErrors),
    #[error("the change would alter what finalized invoices billed; nothing was changed.\n{}", .0.iter().map(|problem| format!("  - {problem}")).collect::<Vec<_>>().join("\n"))]
    FinalizedPeriods(Vec<String>),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A published (or unchanged) version.
pub struct Published {
    pub record: ConfigRecord,
    /// False when the edit changed nothing (no version was published).
    pub changed: bool,
    /// One line per change, as `config apply` prints them.
    pub summary: Vec<String>,
}

/// Reads `workspace_id`'s current record, applies `edit`, checks and publishes the result as
/// the next version by `changed_by`. `expected_version`: the version the change was made
/// against (`Some(0)` for "the workspace must not exist yet"), `None` to take whatever is
/// current (`config apply`).
pub async fn publish_next(
    kafka: &KafkaSettings,
    workspace_id: &str,
    expected_version: Option<i64>,
    changed_by: &str,
    edit: impl FnOnce(Option<&ConfigRecord>) -> Result<Edited, PublishError>,
) -> Result<Published, PublishError> {
    let _writer = WRITE_LOCK.lock().await;
    let reader_settings = kafka.clone();
    let mut records = tokio::task::spawn_blocking(move || {
        read_config_topic(&reader_settings, Duration::from_secs(30))
    })
    .await
    .context("the config topic reader panicked")??;
    let current = records.remove(workspace_id).map(|(record, _)| record);
    let current_version = current.as_ref().map_or(0, |record| record.version);
    if let Some(expected) = expected_version {
        if expected != current_version {
            return Err(PublishError::Stale {
                expected,
                current: current_version,
            });
        }
    }
    let Edited { config, admin_keys } = edit(current.as_ref())?;
    if config.workspace.id != workspace_id {
        return Err(PublishError::Refused {
            field: Some("workspace.id".into()),
            message: format!(
                "workspace.id {:?}: a change cannot move the configuration to another workspace ({workspace_id:?})",
                config.workspace.id
            ),
        });
    }
    config.validate().map_err(PublishError::Invalid)?;
    let shared = config.secrets_used_elsewhere(records.values().map(|(record, _)| &record.config));
    if !shared.is_empty() {
        return Err(PublishError::Invalid(ValidationErrors(shared)));
    }
    if let Some(current) = &current {
        let keys_unchanged = admin_keys
            .as_ref()
            .is_none_or(|keys| *keys == current.admin_keys);
        if current.config == config && keys_unchanged {
            return Ok(Published {
                record: current.clone(),
                changed: false,
                summary: Vec::new(),
            });
        }
        if current.config != config {
            // Finalized invoices hold back what they billed (ADR 0004).
            let log_settings = kafka.clone();
            let log = tokio::task::spawn_blocking(move || {
                crate::invoice_log::read_log_if_exists(&log_settings, Duration::from_secs(60))
            })
            .await
            .context("the invoice log reader panicked")??;
            let finalized = agentmeter_billing::finalization::project(log);
            let problems = agentmeter_billing::finalization::changes_to_finalized_periods(
                &finalized,
                &current.config,
                &config,
            );
            if !problems.is_empty() {
                return Err(PublishError::FinalizedPeriods(problems));
            }
        }
    }
    let mut summary = crate::config_changes::describe_changes(
        current.as_ref().map(|record| &record.config),
        &config,
    );
    if let Some(keys) = &admin_keys {
        let before = current
            .as_ref()
            .map(|record| record.admin_keys.as_slice())
            .unwrap_or_default();
        for key in keys {
            match before.iter().find(|old| old.id == key.id) {
                None => summary.push(format!(
                    "admin key {} ({:?}, {:?}) added",
                    key.id, key.name, key.role
                )),
                Some(old) if old.revoked_at.is_none() && key.revoked_at.is_some() => {
                    summary.push(format!("admin key {} revoked", key.id))
                }
                Some(_) => {}
            }
        }
    }
    let mut record = ConfigRecord::next(current.as_ref(), config, time::OffsetDateTime::now_utc());
    if let Some(admin_keys) = admin_keys {
        record.admin_keys = admin_keys;
    }
    record.change = Some(agentmeter_schemas::metering::ChangeNote {
        by: changed_by.to_string(),
        summary: summary.clone(),
    });
    let payload = serde_json::to_vec(&record).context("cannot write the record as JSON")?;
    send(kafka, workspace_id, Some(&payload)).await?;
    Ok(Published {
        record,
        changed: true,
        summary,
    })
}

/// Deletes a workspace: a tombstone on the compacted config topic. Every stage drops the
/// workspace when it reads it, so its agent secrets and admin keys are refused from then on.
pub async fn delete_workspace(kafka: &KafkaSettings, workspace_id: &str) -> anyhow::Result<()> {
    let _writer = WRITE_LOCK.lock().await;
    send(kafka, workspace_id, None).await
}

async fn send(kafka: &KafkaSettings, key: &str, payload: Option<&[u8]>) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .producer_config(Duration::from_secs(30))
        .create()
        .context("cannot create the Kafka producer")?;
    let topic = kafka.topics().config;
    let mut record = FutureRecord::<str, [u8]>::to(&topic).key(key);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Timeout::After(Duration::from_secs(5)))
        .await
        .map_err(|(error, _)| error)
        .with_context(|| format!("cannot publish to {topic}"))?;
    Ok(())
}
