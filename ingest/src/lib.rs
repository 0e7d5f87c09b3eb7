//! `agentmeter ingest`: the gateway agents send actions to.
//!
//! Layout (the same shape as the other stages):
//! * [`config`] — `[ingest]` settings with their limits, checked at start.
//! * [`auth`] — agent secret → agent instance → account → workspace. Identity never comes from
//!   the request body.
//! * [`body`] — request bodies within `ingest.max_body_bytes`, gzip decompressed within the same
//!   limit; shared by REST and OTLP/HTTP.
//! * [`normalize`] — turns client input (REST actions and outcome events) into [`RawAction`]s
//!   and says precisely what is wrong with bad input. Pure functions, unit-tested.
//! * [`admission`] — in-flight actions per workspace, per agent instance and in all, so a
//!   flooding agent is refused (429 / RESOURCE_EXHAUSTED) before it takes what others need.
//! * [`sink`] — the Kafka side: admission, encode, produce with acks=all, answer only after
//!   every record is acknowledged.
//! * [`connections`] — how every listener treats its connections: connection limit,
//!   first-request and header-read deadlines, idle timeout, graceful shutdown.
//! * [`otlp`] — OTLP/gRPC (`ingest.otlp_grpc_listen`, 4317) and OTLP/HTTP `POST /v1/traces`
//!   (`ingest.otlp_http_listen`, 4318): spans → actions (`docs/otlp.md`), partial success, the
//!   same auth, limits and sink as REST.
//! * [`telemetry`] — what ingest counts and logs, one type per event, the same for every
//!   listener.
//! * [`state`] — [`AppState`](state::AppState), what the handlers of every listener share.
//! * [`rest`] — the REST routes: `POST /v1/actions`, `POST /v1/outcomes`,
//!   `GET /api/v1/agent_instance/info`, `/metrics`, `/healthz`, `/readyz`.
//! * [`run`] (here) — the process: the config watcher, the sink, every listener, shutdown.
//!
//! [`RawAction`]: agentmeter_schemas::RawAction

pub mod admission;
pub mod auth;
pub mod body;
pub mod config;
pub mod connections;
pub mod normalize;
pub mod otlp;
pub mod producer_window;
pub mod rate_limit;
pub mod rest;
pub mod sink;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod test_support;

pub use config::IngestConfig;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentmeter_runtime::config_watch::spawn_config_watcher;
use agentmeter_runtime::kafka::KafkaSettings;
use agentmeter_runtime::observability::operations_router;
use agentmeter_runtime::shutdown::Shutdown;
use anyhow::Context;
use rdkafka::producer::{FutureProducer, Producer};

use crate::admission::AdmissionLimits;
use crate::connections::ListenerLimits;
use crate::rest::{api_router, with_early_admission, with_request_timeout};
use crate::sink::ActionSink;
use crate::state::AppState;

/// Runs ingest until shutdown: in-flight requests finish (and their records are acknowledged)
/// before the process exits.
pub async fn run(
    config: IngestConfig,
    kafka: KafkaSettings,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    config.validate()?;
    kafka.validate()?;
    let mut metering = spawn_config_watcher(&kafka, shutdown.clone())?;
    if !metering.wait_until_loaded(shutdown.clone()).await {
        return Ok(());
    }
    let producer: FutureProducer = kafka
        .producer_config(Duration::from_millis(config.produce_timeout_ms))
        .create()
        .context("cannot create the Kafka producer")?;
    let sink = Arc::new(
        ActionSink::with_admission(
            producer,
            kafka.topics().raw,
            AdmissionLimits::from_config(&config),
        )
        .with_producer_window(
            config.producer_window_actions,
            Duration::from_millis(config.produce_timeout_ms),
        ),
    );

    let broker_reachable = Arc::new(AtomicBool::new(true));
    spawn_broker_probe(sink.clone(), broker_reachable.clone(), shutdown.clone());
    let readiness = {
        let metering = metering.clone();
        let broker_reachable = broker_reachable.clone();
        Arc::new(move || {
            if !metering.is_caught_up() {
                return Err("metering configuration not loaded yet".to_string());
            }
            if !broker_reachable.load(Ordering::Relaxed) {
                return Err("Kafka broker not reachable".to_string());
            }
            Ok(())
        })
    };
    let state = AppState {
        config: Arc::new(config.clone()),
        metering,
        sink: sink.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    // All listeners are bound before anything is served, so a taken port fails the start.
    let otlp_grpc_listener = tokio::net::TcpListener::bind(config.otlp_grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (ingest.otlp_grpc_listen)",
                config.otlp_grpc_listen
            )
        })?;
    let otlp_http_listener = tokio::net::TcpListener::bind(config.otlp_http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (ingest.otlp_http_listen)",
                config.otlp_http_listen
            )
        })?;
    let operations_listener =
        match config.operations_listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.with_context(
                || format!("cannot listen on {address} (ingest.operations_listen)"),
            )?),
            None => None,
        };
    let limits = ListenerLimits::from_config(&config);
    let (rest_router, operations) = match operations_listener {
        Some(operations_listener) => {
            tracing::info!(listen = ?config.operations_listen, "ingest operations endpoints ready");
            let operations = connections::serve(
                "operations",
                operations_listener,
                with_request_timeout(operations_router(readiness), &config),
                limits,
                shutdown.clone(),
            );
            (
                with_early_admission(api_router(state.clone()), &state),
                Some(operations),
            )
        }
        None => (
            with_early_admission(api_router(state.clone()), &state)
                .merge(operations_router(readiness)),
            None,
        ),
    };
    tracing::info!(listen = %config.http_listen, "ingest HTTP API ready");
    let rest = async {
        connections::serve(
            "rest",
            listener,
            with_request_timeout(rest_router, &config),
            limits,
            shutdown.clone(),
        )
        .await
        .context("ingest HTTP server failed")
    };
    let otlp_http = async {
        tracing::info!(listen = %config.otlp_http_listen, "ingest OTLP/HTTP ready");
        connections::serve(
            "otlp_http",
            otlp_http_listener,
            with_request_timeout(
                with_early_admission(crate::otlp::http::router(state.clone()), &state),
                &config,
            ),
            limits,
            shutdown.clone(),
        )
        .await
        .context("OTLP/HTTP server failed")
    };
    let operations = async {
        match operations {
            Some(operations) => operations.await.context("ingest operations server failed"),
            None => Ok(()),
        }
    };
    // The servers stop on the same shutdown and each drains its in-flight requests; the
    // producer is flushed only after all of them have finished.
    tokio::try_join!(
        rest,
        crate::otlp::grpc::serve(state.clone(), otlp_grpc_listener, shutdown.clone()),
        otlp_http,
        operations,
    )?;
    shutdown.requested().await;
    let flushed =
        tokio::task::spawn_blocking(move || sink.producer().flush(Duration::from_secs(10))).await?;
    if let Err(error) = flushed {
        tracing::warn!(%error, "producer flush at shutdown incomplete");
    }
    tracing::info!("ingest stopped");
    Ok(())
}

fn spawn_broker_probe(sink: Arc<ActionSink>, reachable: Arc<AtomicBool>, shutdown: Shutdown) {
    tokio::spawn(async move {
        while !shutdown.is_requested() {
            let probe_sink = sink.clone();
            let answered = tokio::task::spawn_blocking(move || {
                probe_sink
                    .producer()
                    .client()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            reachable.store(answered, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}
