//! `agentmeter ingest`: the gateway agents send actions to.
//!
//! Layout (the same shape as the other stages):
//! * [`config`] — `[ingest]` settings with their limits, checked at start.
//! * [`auth`] — agent secret → agent instance → account → workspace. Identity never comes from
//!   the request body.
//! * [`body`] — request bodies within `ingest.max_body_bytes`, gzip decompressed within the same
//!   limit; shared by REST and OTLP/HTTP.
//! * [`normalize`] — turns client input (REST items) into [`RawAction`]s and says precisely what
//!   is wrong with bad input. Pure functions, unit-tested.
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
//! * [`server`] — the HTTP routes: `POST /v1/actions`, `GET /api/v1/agent_instance/info`,
//!   `/metrics`, `/healthz`, `/readyz`.
//!
//! [`RawAction`]: agentmeter_schemas::RawAction

pub mod admission;
pub mod auth;
pub mod body;
pub mod config;
pub mod connections;
pub mod normalize;
pub mod otlp;
pub mod server;
pub mod sink;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod test_support;

pub use config::IngestConfig;
pub use server::run;
