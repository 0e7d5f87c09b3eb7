//! The Kafka side of ingest: admit, encode, produce, and answer only after acknowledgement.
//!
//! Admission happens *before* anything is produced ([`crate::admission`]): a batch is counted
//! against its workspace's share, its agent instance's share and the global pool
//! ([`IngestConfig::max_in_flight_actions`]); when any of them is short the whole batch is
//! refused (429 + Retry-After / RESOURCE_EXHAUSTED) and nothing reaches Kafka. So one flooding
//! agent holds at most its share of the producer's queue and cannot delay another workspace's
//! records behind its own. An admitted batch then waits for room in the producer window
//! ([`crate::producer_window`]), granted round robin by workspace, so that it is handed to
//! librdkafka's first-in first-out queue behind at most the window, not behind another
//! workspace's whole share. Then every record is produced with acks=all by an idempotent
//! producer, keyed by hash(workspace, event_id), and the request succeeds only when all are
//! acknowledged.
//!
//! [`IngestConfig::max_in_flight_actions`]: crate::config::IngestConfig::max_in_flight_actions

use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_raw_action, RawAction};
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::admission::{Admission, AdmissionLimits, AdmissionScope};
use crate::config::{DEFAULT_PRODUCER_WINDOW_ACTIONS, ENQUEUE_ALLOWANCE_MS};
use crate::producer_window::ProducerWindow;
use crate::telemetry::{emit, AdmissionRefused, BatchProduced, InFlightActions, WindowWaiting};

/// Why a batch was not (fully) written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Too many actions in flight (globally, or of the caller's workspace or agent instance);
    /// retry later. Nothing was produced.
    #[error("{scope} is saturated ({in_flight} actions waiting for Kafka, at most {limit}); retry after a moment")]
    Saturated {
        scope: AdmissionScope,
        in_flight: usize,
        limit: usize,
    },
    /// An action could not be encoded; nothing was produced.
    #[error("action {index}: {message}")]
    Encode { index: usize, message: String },
    /// The batch was admitted but found no room in the producer window in time (Kafka is slow
    /// or away); nothing was produced. Retry later.
    #[error("{actions} actions waited {waited_ms} ms for room to be handed to Kafka; retry after a moment")]
    WindowTimeout { actions: usize, waited_ms: u128 },
    /// Kafka did not acknowledge some records. Retrying with the same event ids is safe.
    #[error("Kafka did not acknowledge {failed} of {total} actions ({first_error}); retry with the same event ids")]
    Kafka {
        failed: usize,
        total: usize,
        first_error: String,
    },
}

/// What a [`SinkError`] means for the client, in one place for REST and both OTLP receivers:
/// the status, whether to retry the same batch, and the rejection reason counted.
impl SinkError {
    /// The `reason` of `agentmeter_ingest_actions_rejected_total`.
    pub fn rejection_reason(&self) -> &'static str {
        match self {
            SinkError::Saturated { .. } => "saturated",
            SinkError::Encode { .. } => "invalid",
            SinkError::WindowTimeout { .. } | SinkError::Kafka { .. } => "kafka_unavailable",
        }
    }

    /// The HTTP status (REST and OTLP/HTTP); gRPC's code follows from the OTLP export error.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            SinkError::Saturated { .. } => StatusCode::TOO_MANY_REQUESTS,
            SinkError::Encode { .. } => StatusCode::BAD_REQUEST,
            SinkError::WindowTimeout { .. } | SinkError::Kafka { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Whether the client should send the same batch again after `Retry-After`.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SinkError::Encode { .. })
    }
}

/// Writes raw actions to `actions.raw`.
pub struct ActionSink {
    producer: FutureProducer,
    topic: String,
    admission: Admission,
    window: ProducerWindow,
    /// How long an admitted batch may wait for room in the window.
    window_wait: Duration,
    enqueue_timeout: Duration,
}

impl ActionSink {
    /// A sink with one global budget of `max_in_flight` actions and no per-workspace or
    /// per-agent-instance share below it.
    pub fn new(producer: FutureProducer, topic: String, max_in_flight: usize) -> ActionSink {
        ActionSink::with_admission(producer, topic, AdmissionLimits::global_only(max_in_flight))
    }

    /// A sink whose admission has a global budget and a share per workspace and agent instance.
    pub fn with_admission(
        producer: FutureProducer,
        topic: String,
        limits: AdmissionLimits,
    ) -> ActionSink {
        ActionSink {
            producer,
            topic,
            admission: Admission::new(limits),
            window: ProducerWindow::new(DEFAULT_PRODUCER_WINDOW_ACTIONS),
            window_wait: Duration::from_millis(
                crate::config::IngestConfig::default().produce_timeout_ms,
            ),
            enqueue_timeout: Duration::from_millis(ENQUEUE_ALLOWANCE_MS),
        }
    }

    /// The same sink with a producer window of `actions`, waited for at most `wait`.
    pub fn with_producer_window(mut self, actions: usize, wait: Duration) -> ActionSink {
        self.window = ProducerWindow::new(actions);
        self.window_wait = wait;
        self
    }

    /// The producer window (how much is handed to librdkafka, and who waits for room).
    pub fn window(&self) -> &ProducerWindow {
        &self.window
    }

    /// The in-flight counters (also used to refuse requests before their body is read).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Actions accepted and not yet acknowledged by Kafka.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
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
        let _admitted = self.admission.admit(actions).map_err(|refusal| {
            emit(AdmissionRefused {
                scope: refusal.scope.as_str(),
            });
            SinkError::Saturated {
                scope: refusal.scope,
                in_flight: refusal.in_flight,
                limit: refusal.limit,
            }
        })?;
        emit(InFlightActions {
            count: self.in_flight(),
        });
        let waiting_since = Instant::now();
        // One request carries one identity, so its first action names the workspace.
        let workspace = actions
            .first()
            .map(|action| action.workspace_id.as_str())
            .unwrap_or_default();
        let entered = tokio::time::timeout(
            self.window_wait,
            self.window.enter(workspace, actions.len()),
        )
        .await;
        emit(WindowWaiting {
            actions: self.window.waiting_actions(),
        });
        let _room = entered.map_err(|_| SinkError::WindowTimeout {
            actions: actions.len(),
            waited_ms: waiting_since.elapsed().as_millis(),
        })?;
        let started = Instant::now();
        let deliveries = encoded.iter().map(|(key, payload)| {
            let record = FutureRecord::to(&self.topic).key(key).payload(payload);
            self.producer
                .send(record, Timeout::After(self.enqueue_timeout))
        });
        let results = join_all(deliveries).await;
        emit(BatchProduced {
            elapsed: started.elapsed(),
        });
        let mut failed = 0;
        let mut first_error = None;
        for result in results {
            if let Err((error, _)) = result {
                failed += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
        emit(InFlightActions {
            count: self.in_flight().saturating_sub(actions.len()),
        });
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
