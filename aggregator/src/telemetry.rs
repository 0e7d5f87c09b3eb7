//! The aggregator's telemetry as events (Vector's `internal_events`): one type per event, which
//! counts it with fixed label names and logs it where a log line helps.

use std::time::Duration;

pub use agentmeter_runtime::telemetry::{emit, InternalEvent};

/// A record of `actions.enriched` was handled (`outcome`: `counted`, `duplicate`, `rebuilt`,
/// `already_handled`, `refused`).
pub struct RecordHandled {
    pub outcome: &'static str,
}

impl InternalEvent for RecordHandled {
    fn emit(self) {
        metrics::counter!("agentmeter_aggregator_records_total", "outcome" => self.outcome)
            .increment(1);
    }
}

/// A poison record was skipped and queued on the dead-letter topic (`code`: `undecodable`,
/// `invalid_text`, `value_out_of_range`).
pub struct PoisonSkipped<'a> {
    pub code: &'static str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl InternalEvent for PoisonSkipped<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_aggregator_dead_letters_total", "reason" => self.code)
            .increment(1);
        tracing::warn!(
            partition = self.partition,
            offset = self.offset,
            reason = %self.reason,
            "poison record skipped"
        );
    }
}

/// One batch write (`actions`, `usage`, `aggregator_progress`) reached ClickHouse.
pub struct BatchWritten {
    pub actions: usize,
    pub usage_rows: usize,
}

impl InternalEvent for BatchWritten {
    fn emit(self) {
        metrics::counter!("agentmeter_aggregator_actions_written_total")
            .increment(self.actions as u64);
        metrics::counter!("agentmeter_aggregator_usage_rows_written_total")
            .increment(self.usage_rows as u64);
        metrics::counter!("agentmeter_aggregator_batches_flushed_total").increment(1);
    }
}

/// A flush ended after `elapsed`; `remembered_ids` event ids are kept for duplicate detection.
pub struct FlushFinished {
    pub elapsed: Duration,
    pub remembered_ids: usize,
}

impl InternalEvent for FlushFinished {
    fn emit(self) {
        metrics::histogram!("agentmeter_aggregator_flush_seconds")
            .record(self.elapsed.as_secs_f64());
        metrics::gauge!("agentmeter_aggregator_dedupe_ids").set(self.remembered_ids as f64);
    }
}

/// A ClickHouse call failed with a retriable error and is retried after `delay`.
pub struct ClickHouseRetried<'a> {
    pub what: &'a str,
    pub error: &'a dyn std::fmt::Display,
    pub delay: Duration,
}

impl InternalEvent for ClickHouseRetried<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_aggregator_clickhouse_retries_total").increment(1);
        tracing::warn!(error = %self.error, delay = ?self.delay, "{} failed; retrying", self.what);
    }
}

/// Records of a partition not yet read (high watermark − the next offset to read).
pub struct ConsumerLag {
    pub partition: i32,
    pub lag: i64,
}

impl InternalEvent for ConsumerLag {
    fn emit(self) {
        metrics::gauge!("agentmeter_aggregator_consumer_lag", "partition" => self.partition.to_string())
            .set(self.lag.max(0) as f64);
    }
}

/// A partition is paused because its input was reset (or reads again).
pub struct InputResetState {
    pub partition: i32,
    pub paused: bool,
}

impl InternalEvent for InputResetState {
    fn emit(self) {
        metrics::gauge!("agentmeter_aggregator_input_reset", "partition" => self.partition.to_string())
            .set(if self.paused { 1.0 } else { 0.0 });
    }
}
