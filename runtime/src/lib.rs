//! Plumbing every agentmeter stage shares, so that the three stages read alike.
//!
//! * [`settings`] — loads a stage's runtime settings: a TOML file (`--config`) plus environment
//!   overrides `AGENTMETER__SECTION__KEY`, into `deny_unknown_fields` structs.
//! * [`duration`] — durations in settings files (`"300ms"`, `"15m"`), the `*_ms` / `*_seconds`
//!   keys of earlier releases still accepted.
//! * [`kafka`] — the Kafka settings and topic names, client configurations with the
//!   safety-critical keys set *after* user overrides, and topic creation (`agentmeter topics`).
//! * [`group`] — consumer-group membership (group mode): the watchdog for tansu's stuck
//!   states, leave-and-re-join, and the LeaveGroup at shutdown, driven alike by both stages.
//! * [`config_watch`] — follows the log-compacted config topic on a blocking thread and publishes
//!   immutable [`config_watch::MeteringState`] snapshots through `arc-swap`; readers never lock.
//! * [`partitions`] — who owns which input partition (static by replica ordinal, or a consumer
//!   group) and the progress watch that makes a stalled stage not ready (ADR 0003).
//! * [`observability`] — tracing, the Prometheus recorder, and the `/metrics`, `/healthz`,
//!   `/readyz` routes.
//! * [`telemetry`] — telemetry as events: one type per event that logs and counts, and the
//!   events the stages share.
//! * [`shutdown`] — SIGTERM / Ctrl-C as a broadcast every task can await.

pub mod config_watch;
pub mod duration;
pub mod group;
pub mod kafka;
pub mod observability;
pub mod partitions;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
