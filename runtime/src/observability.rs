//! Logs, metrics and health endpoints, the same for every stage.
//!
//! Every stage exposes `/metrics` (Prometheus text), `/healthz` (the process runs) and `/readyz`
//! (its dependencies answer and its configuration is loaded; 503 with the reason otherwise).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::shutdown::Shutdown;

/// Starts structured logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let latency_buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&latency_buckets)
                .expect("non-empty buckets")
                .install_recorder()
                .expect("the Prometheus recorder is installed once per process")
        })
        .clone()
}

/// Answers whether the stage is ready; `Err` carries the reason shown by `/readyz`.
pub type ReadinessCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct OperationsState {
    prometheus: PrometheusHandle,
    readiness: ReadinessCheck,
}

/// The `/metrics`, `/healthz` and `/readyz` routes, to merge into a stage's router.
pub fn operations_router(readiness: ReadinessCheck) -> Router {
    let state = OperationsState {
        prometheus: prometheus(),
        readiness,
    };
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

async fn render_metrics(State(state): State<OperationsState>) -> String {
    state.prometheus.render()
}

async fn ready(State(state): State<OperationsState>) -> (StatusCode, String) {
    match (state.readiness)() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Serves a router until shutdown; used by stages without an HTTP API of their own.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.requested().await })
        .await
        .context("operations server failed")
}
