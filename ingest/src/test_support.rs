//! What the in-crate tests share: an [`AppState`] over the demo metering configuration, whose
//! producer points at a test's (mock) cluster.

use std::sync::Arc;

use agentmeter_runtime::config_watch::{ConfigHandle, MeteringState};
use agentmeter_schemas::metering::MeteringConfig;
use agentmeter_schemas::WorkspaceSnapshot;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use crate::config::IngestConfig;
use crate::sink::ActionSink;
use crate::state::AppState;

/// The demo secret of `inst_acme_research` (deploy/local/demo-secrets.env).
pub const DEMO_SECRET: &str = "am_demo_acme_research_secret";
/// The raw topic the test producers write to.
pub const RAW_TOPIC: &str = "agentmeter.actions.raw";

/// The state of an ingest with `config`, the demo workspace and a budget of `max_in_flight`
/// actions, producing (idempotently, acks=all, 1.5 s timeout) to `bootstrap`.
pub fn demo_state(bootstrap: &str, config: IngestConfig, max_in_flight: usize) -> AppState {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "1500")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    AppState {
        config: Arc::new(config),
        metering: demo_metering(),
        sink: Arc::new(ActionSink::new(
            producer,
            RAW_TOPIC.to_string(),
            max_in_flight,
        )),
    }
}

/// The demo metering configuration (`deploy/local/metering.example.toml`) as a fixed handle.
pub fn demo_metering() -> ConfigHandle {
    let metering =
        MeteringConfig::from_toml(include_str!("../../deploy/local/metering.example.toml"))
            .unwrap();
    ConfigHandle::fixed(MeteringState::from_snapshots([WorkspaceSnapshot::build(
        1, metering,
    )
    .unwrap()]))
}
