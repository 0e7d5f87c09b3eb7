//! `agentmeter enrich`: turns raw actions into priced, tagged actions.
//!
//! Layout (the same shape as the other stages):
//! * [`config`] — `[enricher]` settings, checked at start.
//! * [`enrich`] — the pure join: tagging, the rate in force at `occurred_at`, quantity, cost,
//!   `@action`/`@outcome`; or the reason a record must go to the dead-letter topic.
//! * [`stream`] — the stream: consume `actions.raw` in batches, produce each result to
//!   `actions.enriched` (same key) or `actions.dlq`, and store input offsets only after every
//!   output of the batch is acknowledged (at-least-once; the aggregator removes duplicates).
//! * [`telemetry`] — what the enricher counts and logs, one type per event.
//!
//! The enricher holds no state but the configuration snapshot, so any number of processes can
//! share the partitions of `actions.raw` as one consumer group.

pub mod config;
pub mod enrich;
pub mod stream;
pub mod telemetry;

pub use config::EnricherConfig;
pub use stream::run;
