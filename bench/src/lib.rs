//! agentmeter's benchmark harness (benchmarks, not tests).
//!
//! * [`workload`] — the synthetic research-agent workload shared by the criterion benches
//!   (`benches/`) and the load harness (`src/main.rs`, binary `agentmeter-bench`).
//! * [`env`] — a fresh, isolated world per run on the shared broker and ClickHouse: topic
//!   prefix, database, consumer groups, ports, settings file, stage processes pinned to a core.
//! * [`measure`] — CPU time from `/proc/<pid>/stat`, percentiles, affinity, formatting.
//! * [`kafka`] — plain rdkafka helpers: preload, watermarks, topic cleanup.

pub mod env;
pub mod kafka;
pub mod measure;
pub mod workload;
