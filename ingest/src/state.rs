//! What every handler of every listener shares. A module of its own so that the REST routes
//! (`rest`) and the OTLP services (`otlp`) both use it without importing each other.

use std::sync::Arc;

use agentmeter_runtime::config_watch::ConfigHandle;

use crate::config::IngestConfig;
use crate::sink::ActionSink;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<IngestConfig>,
    pub metering: ConfigHandle,
    pub sink: Arc<ActionSink>,
}

impl AppState {
    /// Adds `Retry-After` (the configured seconds) to an HTTP answer that asks for a retry.
    pub fn ask_to_retry(&self, mut response: axum::response::Response) -> axum::response::Response {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(self.config.retry_after_seconds),
        );
        response
    }
}
