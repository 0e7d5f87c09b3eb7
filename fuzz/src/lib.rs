//! What the fuzz targets share: the fixed identity, clock and limits every decoder is checked
//! with, the invariants that must hold for every action a stage accepts, and apache-avro's
//! generic reader as a reference for the schema-specific Avro decoder.
//!
//! The targets themselves are in `fuzz_targets/`; `fuzz/README.md` lists them with their
//! invariants. Everything here panics on a broken invariant: a panic is what libFuzzer reports
//! as a crash, with the input that caused it.

pub mod reference_avro;
pub mod structured;

use std::sync::{Arc, LazyLock};

use agentmeter_ingest::auth::AgentIdentity;
use agentmeter_ingest::normalize::Limits;
use agentmeter_ingest::otlp::mapping::{map_request, span_count, OtlpSource};
use agentmeter_ingest::IngestConfig;
use agentmeter_schemas::{
    decode_enriched_action, decode_raw_action, encode_enriched_action, encode_raw_action,
    EnrichedAction, MeteringConfig, RawAction, WorkspaceSnapshot,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

/// The product guide's example configuration (Acme Corp, Globex), as `demo.sh` applies it.
pub const EXAMPLE_CONFIG_TOML: &str = include_str!("../../deploy/local/metering.example.toml");

/// The agent instance every decoded request is attributed to (its secret is the demo secret).
pub const EXAMPLE_INSTANCE_ID: &str = "inst_acme_research";

/// The "now" of every fuzz run: 2026-12-02T00:00:00Z, in microseconds since the epoch.
///
/// Why fixed: ingest refuses actions more than 35 days old or 5 minutes ahead of its clock, so
/// with the real clock the seed corpus (captured exporter requests with their own timestamps)
/// would age out and every span would stop at the time check, far from the interesting code.
/// `fuzz/seeds` writes its requests with times just before this instant.
pub const FIXED_NOW_MICROS: i64 = 1_796_169_600_000_000;

/// The example configuration compiled, as ingest and the enricher hold it (version 1).
pub static EXAMPLE_SNAPSHOT: LazyLock<Arc<WorkspaceSnapshot>> = LazyLock::new(|| {
    let config = MeteringConfig::from_toml(EXAMPLE_CONFIG_TOML).expect("the example is valid");
    Arc::new(WorkspaceSnapshot::build(1, config).expect("the example compiles"))
});

/// The authenticated caller of every decoded request: Acme's research agent.
pub static EXAMPLE_IDENTITY: LazyLock<AgentIdentity> = LazyLock::new(|| {
    let workspace = EXAMPLE_SNAPSHOT.clone();
    let instance = workspace
        .instance(EXAMPLE_INSTANCE_ID)
        .expect("the example has the research agent")
        .clone();
    AgentIdentity {
        workspace,
        instance,
    }
});

/// Ingest's default limits at [`FIXED_NOW_MICROS`].
pub static FIXED_LIMITS: LazyLock<Limits> =
    LazyLock::new(|| Limits::from_config(&IngestConfig::default(), FIXED_NOW_MICROS));

/// Invariants of an action ingest accepted: identity from the secret only, and the Avro record
/// ingest produces for it reads back as the same action.
pub fn check_accepted_raw_action(action: &RawAction) {
    let identity = &*EXAMPLE_IDENTITY;
    assert_eq!(action.workspace_id, identity.workspace.workspace_id());
    assert_eq!(action.account_id, identity.instance.account);
    assert_eq!(action.agent_instance_id, identity.instance.id);
    assert_eq!(action.received_at_micros, FIXED_NOW_MICROS);
    check_raw_round_trip(action);
}

/// The record of an action ingest accepted must encode (else the sink fails the whole request
/// with a 400 after validation said yes) and decode back to the same action.
pub fn check_raw_round_trip(action: &RawAction) -> Vec<u8> {
    let bytes = encode_raw_action(action)
        .unwrap_or_else(|error| panic!("accepted action does not encode: {error}\n{action:#?}"));
    let decoded = decode_raw_action(&bytes)
        .unwrap_or_else(|error| panic!("encoded action does not decode: {error}\n{action:#?}"));
    assert_eq!(&decoded, action, "raw action changed through Avro");
    bytes
}

/// The same for an enriched action.
pub fn check_enriched_round_trip(action: &EnrichedAction) -> Vec<u8> {
    let bytes = encode_enriched_action(action)
        .unwrap_or_else(|error| panic!("enriched action does not encode: {error}\n{action:#?}"));
    let decoded = decode_enriched_action(&bytes).unwrap_or_else(|error| {
        panic!("encoded enriched action does not decode: {error}\n{action:#?}")
    });
    assert_eq!(&decoded, action, "enriched action changed through Avro");
    bytes
}

/// Maps a decoded OTLP request for the example agent, as both OTLP transports do, and checks
/// every accepted action.
pub fn check_otlp_request(request: &ExportTraceServiceRequest, source: OtlpSource) {
    let max_spans = IngestConfig::default().max_spans_per_request;
    let Ok(mapped) = map_request(request, &EXAMPLE_IDENTITY, &FIXED_LIMITS, max_spans, source)
    else {
        // The whole request is refused (too many spans, another agent's id): a clean 4xx.
        return;
    };
    assert_eq!(
        mapped.actions.len() + mapped.rejected.len(),
        span_count(request),
        "every span is either accepted or rejected"
    );
    // Built for the partial-success answer of every request with a rejected span.
    let _ = mapped.error_message(5);
    for action in &mapped.actions {
        assert_eq!(action.source, source.as_str());
        check_accepted_raw_action(action);
    }
}
