//! Telemetry as events (Vector's `internal_events`): each thing worth counting is one type
//! whose [`InternalEvent::emit`] both logs it (where a log line helps an operator) and counts it,
//! with fixed label names. The stages keep theirs in a `telemetry` module; the events the stages
//! share (the config watcher, the group watchdog, partition ownership) are here.
//!
//! `tests/metrics_catalogue.rs` checks that docs/settings.md names exactly the metrics these
//! modules register.

/// Something that happened, to be logged and counted.
pub trait InternalEvent {
    fn emit(self);
}

/// Emits an event: `emit(ConfigRecordRejected { .. })`.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

/// A new metering state was published by the config watcher.
pub struct ConfigStatePublished {
    pub workspaces: usize,
    pub secret_conflicts: usize,
}

impl InternalEvent for ConfigStatePublished {
    fn emit(self) {
        metrics::gauge!("agentmeter_config_workspaces").set(self.workspaces as f64);
        metrics::gauge!("agentmeter_config_secret_conflicts").set(self.secret_conflicts as f64);
    }
}

/// A record on the config topic was ignored (no UTF-8 key, or an invalid configuration).
pub struct ConfigRecordRejected<'a> {
    pub workspace: Option<&'a str>,
    pub offset: i64,
    pub error: String,
}

impl InternalEvent for ConfigRecordRejected<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_config_records_rejected_total").increment(1);
        match self.workspace {
            None => tracing::error!(
                offset = self.offset,
                "config record without a UTF-8 key ignored"
            ),
            Some(workspace) => tracing::error!(
                workspace,
                offset = self.offset,
                error = %self.error,
                "invalid configuration record ignored; the workspace keeps its previous version"
            ),
        }
    }
}

/// The group watchdog left the consumer group to re-join it.
pub struct GroupRejoined;

impl InternalEvent for GroupRejoined {
    fn emit(self) {
        metrics::counter!("agentmeter_kafka_group_rejoins_total").increment(1);
    }
}

/// The number of input partitions this process owns changed.
pub struct PartitionsOwned {
    pub count: usize,
}

impl InternalEvent for PartitionsOwned {
    fn emit(self) {
        metrics::gauge!("agentmeter_partitions_owned").set(self.count as f64);
    }
}

/// The progress watch observed the input topic.
pub struct InputObserved {
    pub records_waiting: i64,
}

impl InternalEvent for InputObserved {
    fn emit(self) {
        metrics::gauge!("agentmeter_input_records_waiting").set(self.records_waiting as f64);
    }
}

/// The progress watch's verdict: stalled (with the reason) or progressing.
pub struct InputProgressJudged {
    pub stalled: bool,
}

impl InternalEvent for InputProgressJudged {
    fn emit(self) {
        metrics::gauge!("agentmeter_input_stalled").set(if self.stalled { 1.0 } else { 0.0 });
    }
}
