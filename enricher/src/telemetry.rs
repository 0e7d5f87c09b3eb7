//! The enricher's telemetry as events (Vector's `internal_events`): one type per event, which
//! counts it with fixed label names and logs it where a log line helps.

use std::time::Duration;

pub use agentmeter_runtime::telemetry::{emit, InternalEvent};

/// A batch was done: every output acknowledged and the input offsets stored.
pub struct BatchEnriched {
    pub records: usize,
    pub enriched: usize,
    pub elapsed: Duration,
}

impl InternalEvent for BatchEnriched {
    fn emit(self) {
        metrics::counter!("agentmeter_enricher_records_in_total").increment(self.records as u64);
        metrics::counter!("agentmeter_enricher_actions_enriched_total")
            .increment(self.enriched as u64);
        metrics::histogram!("agentmeter_enricher_batch_seconds").record(self.elapsed.as_secs_f64());
    }
}

/// A record went to the dead-letter topic (`reason`: the code in its header).
pub struct DeadLettered {
    pub reason: &'static str,
}

impl InternalEvent for DeadLettered {
    fn emit(self) {
        metrics::counter!("agentmeter_enricher_dead_letters_total", "reason" => self.reason)
            .increment(1);
    }
}

/// Outputs Kafka did not acknowledge, about to be sent again.
pub struct OutputsRetried {
    pub count: usize,
}

impl InternalEvent for OutputsRetried {
    fn emit(self) {
        metrics::counter!("agentmeter_enricher_produce_retries_total").increment(self.count as u64);
    }
}

/// A transient consumer error (a broker outage, a failed fetch, a rebalance in progress); the
/// enricher goes on.
pub struct ConsumerErrored<'a> {
    pub error: &'a rdkafka::error::KafkaError,
}

impl InternalEvent for ConsumerErrored<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_enricher_consumer_errors_total").increment(1);
        tracing::warn!(error = %self.error, "Kafka consumer error; going on (librdkafka retries)");
    }
}

/// librdkafka's statistics: records of an assigned partition not yet enriched and acknowledged.
pub struct ConsumerLag {
    pub partition: i32,
    pub lag: i64,
}

impl InternalEvent for ConsumerLag {
    fn emit(self) {
        metrics::gauge!("agentmeter_enricher_consumer_lag", "partition" => self.partition.to_string())
            .set(self.lag as f64);
    }
}
