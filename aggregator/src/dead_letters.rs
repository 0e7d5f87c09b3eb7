//! The aggregator's dead-letter producer: a record that cannot be decoded, or whose values are
//! out of range, is counted, queued on `actions.dlq` with its reason in headers, and skipped.

use std::time::Duration;

use agentmeter_runtime::kafka::KafkaSettings;
use anyhow::Context;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Message;

use crate::telemetry::{emit, PoisonSkipped};

/// Queues poison records on the dead-letter topic (a producer thread of its own delivers them).
pub struct DeadLetterSink {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl DeadLetterSink {
    pub fn new(kafka: &KafkaSettings) -> anyhow::Result<DeadLetterSink> {
        let producer = kafka
            .producer_config(Duration::from_secs(30))
            .create()
            .context("cannot create the dead-letter producer")?;
        Ok(DeadLetterSink {
            producer,
            topic: kafka.topics().dead_letter,
        })
    }

    /// Counts a poison record and queues it with its reason; the partition goes on (the skip is
    /// deterministic, so replays skip it too).
    pub fn send(&self, message: &BorrowedMessage<'_>, code: &'static str, reason: &str) {
        let partition = message.partition();
        emit(PoisonSkipped {
            code,
            partition,
            offset: message.offset(),
            reason,
        });
        let source = format!("{}/{}/{}", message.topic(), partition, message.offset());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "agentmeter.dlq.reason",
                value: Some(code),
            })
            .insert(Header {
                key: "agentmeter.dlq.message",
                value: Some(reason),
            })
            .insert(Header {
                key: "agentmeter.dlq.source",
                value: Some(&source),
            });
        let record = BaseRecord::to(&self.topic)
            .payload(message.payload().unwrap_or_default())
            .key(message.key().unwrap_or_default())
            .headers(headers);
        if let Err((error, _)) = self.producer.send(record) {
            tracing::error!(%error, "cannot queue the dead letter");
        }
    }

    /// Waits (at most `timeout`) until the queued dead letters are delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "dead letters not all delivered at shutdown");
        }
    }
}
