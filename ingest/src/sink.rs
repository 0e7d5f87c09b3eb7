//! The Kafka side of ingest: admit, encode, produce, and answer only after acknowledgement.
//!
//! Admission happens *before* anything is produced: a batch takes one permit per action from a
//! bounded pool ([`IngestConfig::max_in_flight_actions`]); when the pool is short the whole
//! batch is refused (429 + Retry-After) and nothing reaches Kafka. Once admitted, every record is
//! produced with acks=all by an idempotent producer, keyed by hash(workspace, event_id), and the
//! request succeeds only when all are acknowledged.
//!
//! [`IngestConfig::max_in_flight_actions`]: crate::config::IngestConfig::max_in_flight_actions

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_raw_action, RawAction};
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::Semaphore;

/// Why a batch was not (fully) written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Too many actions in flight; retry later. Nothing was produced.
    #[error("ingest is saturated ({in_flight} actions waiting for Kafka); retry after a moment")]
    Saturated { in_flight: usize },
    /// An action could not be encoded; nothing was produced.
    #[error("action {index}: {message}")]
    Encode { index: usize, message: String },
    /// Kafka did not acknowledge some records. Retrying with the same event ids is safe.
    #[error("Kafka did not acknowledge {failed} of {total} actions ({first_error}); retry with the same event ids")]
    Kafka {
        failed: usize,
        total: usize,
        first_error: String,
    },
}

/// Writes raw actions to `actions.raw`.
pub struct ActionSink {
    producer: FutureProducer,
    topic: String,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    enqueue_timeout: Duration,
}

impl ActionSink {
    pub fn new(producer: FutureProducer, topic: String, max_in_flight: usize) -> ActionSink {
        ActionSink {
            producer,
            topic,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            enqueue_timeout: Duration::from_secs(1),
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Actions accepted and not yet acknowledged by Kafka.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.permits.available_permits()
    }

    /// Produces every action and waits for all acknowledgements.
    pub async fn publish(&self, actions: &[RawAction]) -> Result<(), SinkError> {
        let mut encoded = Vec::with_capacity(actions.len());
        for (index, action) in actions.iter().enumerate() {
            let payload = encode_raw_action(action).map_err(|error| SinkError::Encode {
                index,
                message: error.to_string(),
            })?;
            encoded.push((action.message_key(), payload));
        }
        let wanted = u32::try_from(actions.len()).unwrap_or(u32::MAX);
        let _permit = self
            .permits
            .clone()
            .try_acquire_many_owned(wanted)
            .map_err(|_| SinkError::Saturated {
                in_flight: self.in_flight(),
            })?;
        metrics::gauge!("agentmeter_ingest_in_flight_actions").set(self.in_flight() as f64);
        let started = Instant::now();
        let deliveries = encoded.iter().map(|(key, payload)| {
            let record = FutureRecord::to(&self.topic).key(key).payload(payload);
            self.producer
                .send(record, Timeout::After(self.enqueue_timeout))
        });
        let results = join_all(deliveries).await;
        metrics::histogram!("agentmeter_ingest_produce_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut failed = 0;
        let mut first_error = None;
        for result in results {
            if let Err((error, _)) = result {
                failed += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
        metrics::gauge!("agentmeter_ingest_in_flight_actions")
            .set(self.in_flight().saturating_sub(actions.len()) as f64);
        match first_error {
            None => Ok(()),
            Some(first_error) => Err(SinkError::Kafka {
                failed,
                total: actions.len(),
                first_error,
            }),
        }
    }
}
