//! `agentmeter console`: the control-plane API (JSON over HTTP) that the console, scripts and
//! other tools use to read and change a workspace (docs/console.md, ADR 0007).
//!
//! * `mod.rs` — settings, and the process: a config topic watcher (reads), the audit follower,
//!   the HTTP server.
//! * `api.rs` — the routes; every write goes through [`crate::config_publish::publish_next`], the
//!   path `config apply` takes, with the caller's version (`If-Match`) for optimistic
//!   concurrency.
//! * `auth.rs` — the caller: an admin API key of one workspace (stored hashed on the config
//!   topic), its role; identity never comes from an id in the request.
//! * `edits.rs` — the changes themselves, pure functions of the configuration, shared by the
//!   API and the web console.
//! * `password.rs` — Argon2id hashes of console passwords.
//! * `write.rs` — the one write path, shared by the API and the web console.
//! * `web/` — the web console: server-rendered pages (maud), sessions, CSRF, login limits.
//! * `error.rs` — every refusal as a JSON body with a message naming the field and the problem.
//! * `reads.rs` — the ClickHouse reads: discovered actions, Live Data, usage, the audit log.
//!
//! It is a process of its own rather than a mode of ingest: it is not on the agents' hot path,
//! needs ClickHouse (ingest does not), runs as one replica, and can be kept off the public
//! network where ingest must be on it.

mod api;
mod auth;
mod edits;
mod error;
pub(crate) mod password;
mod reads;
mod web;
mod write;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmeter_runtime::config_watch::{spawn_config_watcher, ConfigHandle};
use agentmeter_runtime::shutdown::Shutdown;
use anyhow::Context;
use serde::Deserialize;

use crate::Settings;

/// `[console]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Address of the control-plane API, the web console (every path outside `/api/`), and
    /// `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// How long a rotated agent secret keeps working after the rotation (the product: 24 hours).
    #[serde(
        alias = "secret_grace_period",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub secret_grace_period_ms: u64,
    /// Most Live Data rows one page returns.
    pub live_data_page_max: u32,
    /// Mark the web console's session cookie `Secure` (browsers then send it over HTTPS only):
    /// set it when the console is served behind TLS.
    pub secure_cookies: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            listen: "127.0.0.1:9105".parse().expect("valid address"),
            secret_grace_period_ms: 24 * 3_600_000,
            live_data_page_max: 500,
            secure_cookies: false,
        }
    }
}

impl ConsoleSettings {
    /// Until when a secret replaced at `now` keeps working (`secret_grace_period` later).
    pub fn retired_secret_valid_until(&self, now: time::OffsetDateTime) -> time::OffsetDateTime {
        now + time::Duration::milliseconds(
            i64::try_from(self.secret_grace_period_ms).unwrap_or(i64::MAX),
        )
    }

    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.secret_grace_period_ms <= 30 * 24 * 3_600_000,
            "console.secret_grace_period must be at most 30 days"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.live_data_page_max),
            "console.live_data_page_max must be 1 to 10,000"
        );
        Ok(())
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub(crate) struct ConsoleState {
    pub settings: Arc<Settings>,
    pub config: ConfigHandle,
    pub clickhouse: clickhouse::Client,
    pub web: web::SharedWebState,
}

pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.console.validate()?;
    settings.kafka.validate()?;
    settings.clickhouse.validate()?;
    let config = spawn_config_watcher(&settings.kafka, shutdown.clone())?;
    let state = ConsoleState {
        clickhouse: settings
            .clickhouse
            .client()
            .with_database(&settings.clickhouse.database),
        settings: Arc::new(settings),
        config,
        web: Arc::default(),
    };
    let follower = tokio::spawn(follow_audit(state.clone(), shutdown.clone()));
    let listen = state.settings.console.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(%listen, "control-plane API listening");
    let mut stop = shutdown.clone();
    let app = api::router(state.clone())
        .merge(web::router(state))
        .fallback(not_found);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.requested().await })
    .await
    .context("console server failed")?;
    follower.abort();
    Ok(())
}

/// An unknown path: a JSON error under `/api/`, the console's page elsewhere (the same answer
/// whether or not the id exists in another workspace).
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if uri.path().starts_with("/api/") {
        error::ApiError::new(
            StatusCode::NOT_FOUND,
            "no such route; GET /api/v1/openapi.json lists them",
        )
        .into_response()
    } else {
        (StatusCode::NOT_FOUND, web::not_found_page()).into_response()
    }
}

/// Copies the change note of every configuration version this process sees into the audit
/// table, so versions published by `config apply` (or another console) are in the log too. The
/// console's own writes are copied at once by the write itself; a copy made twice collapses.
async fn follow_audit(state: ConsoleState, mut shutdown: Shutdown) {
    let mut copied: HashSet<(String, i64)> = HashSet::new();
    loop {
        let metering = state.config.load();
        for snapshot in metering.workspaces() {
            let key = (snapshot.workspace_id().to_string(), snapshot.version);
            if copied.contains(&key) {
                continue;
            }
            match reads::record_audit(&state, snapshot).await {
                Ok(()) => {
                    copied.insert(key);
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot copy a change to the audit log; trying again")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.requested() => return,
        }
    }
}
