//! What every handler of every listener shares. A module of its own so that the REST routes
//! (`server`) and the OTLP services (`otlp`) both use it without importing each other.

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
