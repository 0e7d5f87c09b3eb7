//! `agentmeter billing`: the long-running stage that finalizes every closed billing period once
//! its grace period is over, without anyone running a command (ADR 0004).
//!
//! Every `[billing] interval` it reads every workspace's configuration from the config topic and,
//! for each subscription, finalizes the last `lookback_periods` periods whose grace period is
//! over (`invoices_cmd::finalize_closed_periods`, the same code as `agentmeter invoices
//! finalize`). Finalizing is idempotent and numbered by the finalization log, so a stage killed at
//! any instant, restarted, or run twice at once finalizes each invoice once, without gaps.
//!
//! What it did is in its logs (one line per invoice finalized) and metrics
//! (`agentmeter_billing_*`, docs/settings.md); `/readyz` answers 503 while the last run failed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_runtime::observability::{operations_router, serve};
use agentmeter_runtime::shutdown::Shutdown;
use agentmeter_runtime::telemetry::{emit, InternalEvent};
use anyhow::Context;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::invoices_cmd::{finalize_closed_periods, Finalization, Periods};
use crate::Settings;

/// `[billing]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingSettings {
    /// `/metrics`, `/healthz` and `/readyz` of `agentmeter billing`.
    pub metrics_listen: SocketAddr,
    /// Time between two finalization runs.
    #[serde(
        alias = "interval",
        deserialize_with = "agentmeter_runtime::duration::seconds_u64"
    )]
    pub interval_seconds: u64,
    /// How long after a period's end its invoices stay drafts (late actions still reach them).
    #[serde(
        alias = "grace",
        deserialize_with = "agentmeter_runtime::duration::seconds_u64"
    )]
    pub grace_seconds: u64,
    /// How many closed periods back each run looks (a stage that was down for longer than a
    /// period catches up on the ones it missed, oldest first).
    pub lookback_periods: usize,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            metrics_listen: "127.0.0.1:9103".parse().expect("valid address"),
            interval_seconds: 300,
            grace_seconds: 72 * 3600,
            lookback_periods: 3,
        }
    }
}

impl BillingSettings {
    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.interval_seconds >= 1,
            "billing.interval must be at least 1 s"
        );
        anyhow::ensure!(
            self.grace_seconds <= 366 * 24 * 3600,
            "billing.grace must be at most a year"
        );
        anyhow::ensure!(
            (1..=36).contains(&self.lookback_periods),
            "billing.lookback_periods must be 1 to 36"
        );
        Ok(())
    }
}

/// One invoice finalized by the stage.
struct InvoiceFinalized<'a> {
    workspace: &'a str,
    outcome: &'a Finalization,
}

impl InternalEvent for InvoiceFinalized<'_> {
    fn emit(self) {
        if let Finalization::Finalized { corrections, .. } = self.outcome {
            metrics::counter!("agentmeter_billing_invoices_finalized_total").increment(1);
            metrics::counter!("agentmeter_billing_corrections_total")
                .increment(*corrections as u64);
            tracing::info!(workspace = self.workspace, "{}", self.outcome);
        }
    }
}

/// A finalization run ended.
struct RunFinished<'a> {
    elapsed: Duration,
    finalized: usize,
    error: Option<&'a anyhow::Error>,
}

impl InternalEvent for RunFinished<'_> {
    fn emit(self) {
        let result = if self.error.is_some() { "error" } else { "ok" };
        metrics::counter!("agentmeter_billing_runs_total", "result" => result).increment(1);
        metrics::histogram!("agentmeter_billing_run_seconds").record(self.elapsed.as_secs_f64());
        match self.error {
            Some(error) => tracing::error!(error = format!("{error:#}"), "billing run failed"),
            None => {
                metrics::gauge!("agentmeter_billing_last_success_timestamp_seconds")
                    .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
                tracing::info!(
                    finalized = self.finalized,
                    elapsed_ms = self.elapsed.as_millis() as u64,
                    "billing run done"
                );
            }
        }
    }
}

/// One run over every workspace; how many invoices it finalized.
async fn run_once(settings: &Settings) -> anyhow::Result<usize> {
    let kafka = settings.kafka.clone();
    let configurations =
        tokio::task::spawn_blocking(move || read_config_topic(&kafka, Duration::from_secs(30)))
            .await??;
    let grace = time::Duration::seconds(
        i64::try_from(settings.billing.grace_seconds).context("billing.grace is too long")?,
    );
    let which = Periods::LastClosed {
        lookback: settings.billing.lookback_periods,
    };
    let mut workspaces: Vec<_> = configurations
        .into_values()
        .map(|(record, _)| record)
        .collect();
    workspaces.sort_by(|a, b| a.config.workspace.id.cmp(&b.config.workspace.id));
    let mut finalized = 0;
    for record in &workspaces {
        if record.config.subscriptions.is_empty() {
            continue;
        }
        let workspace = &record.config.workspace.id;
        let outcomes = finalize_closed_periods(
            settings,
            record,
            None,
            which,
            grace,
            OffsetDateTime::now_utc(),
        )
        .await
        .with_context(|| format!("workspace {workspace}"))?;
        for outcome in &outcomes {
            emit(InvoiceFinalized { workspace, outcome });
            finalized += usize::from(matches!(outcome, Finalization::Finalized { .. }));
        }
    }
    Ok(finalized)
}

/// Runs until shutdown.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.billing.validate()?;
    settings.kafka.validate()?;
    settings.clickhouse.validate()?;
    let last_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let readiness = {
        let last_error = last_error.clone();
        Arc::new(move || match last_error.lock() {
            Ok(error) => error.clone().map_or(Ok(()), Err),
            Err(_) => Err("the billing state is poisoned".to_string()),
        })
    };
    let operations = tokio::spawn(serve(
        settings.billing.metrics_listen,
        operations_router(readiness),
        shutdown.clone(),
    ));
    let interval = Duration::from_secs(settings.billing.interval_seconds);
    let mut waiting = shutdown.clone();
    while !shutdown.is_requested() {
        let started = Instant::now();
        let result = run_once(&settings).await;
        let error = result.as_ref().err();
        emit(RunFinished {
            elapsed: started.elapsed(),
            finalized: *result.as_ref().unwrap_or(&0),
            error,
        });
        let reason = error.map(|error| format!("the last billing run failed: {error:#}"));
        if let Ok(mut slot) = last_error.lock() {
            *slot = reason;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = waiting.requested() => {}
        }
    }
    operations.await.context("operations server task")??;
    Ok(())
}
