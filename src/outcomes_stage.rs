//! `agentmeter outcomes`: the stage that derives composite outcomes from the stored actions and
//! writes their firings as rows (ADR 0005, section 3; docs/metering-config.md).
//!
//! Every `[outcomes] interval` one **run**:
//!
//! 1. takes a **snapshot**: the aggregator's progress offset of every partition (everything
//!    below it is completely in `actions` and `usage`, ADR 0001);
//! 2. reads the snapshot it finished last (`outcomes_progress`) and, per workspace, the
//!    fingerprint of the composite definitions it derived with;
//! 3. finds the **touched contexts**: those of the constituents stored between the two
//!    snapshots — or, for a workspace whose definitions changed, every context it has;
//! 4. derives every touched context again from all its stored constituents below the snapshot
//!    (`agentmeter_outcomes::derivation`, a pure function of them);
//! 5. writes, in this order, the `actions` rows of the current firings (and `retracted_outcome`
//!    rows for firings no longer derived), the `usage` rows of every window the context has or
//!    had firings in (zero included), and last its progress.
//!
//! A crash at any instant leaves progress at the last finished snapshot: the next run touches
//! those contexts again and rewrites what the crashed one may have half written. Usage rows are
//! versioned by the snapshot (the sum of its offsets, with the count of definition changes in
//! the low bits), so `usage FINAL` keeps the newest; `actions FINAL` keeps the last write of a
//! firing's sorting key, which is the newest because one stage writes at a time (the stage is a
//! singleton, like `billing`: run one replica).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_aggregator::rows::{ActionRow, UsageRow};
use agentmeter_aggregator::ClickHouseSettings;
use agentmeter_outcomes::composite::Firing;
use agentmeter_outcomes::derivation::{
    contexts_of, firings_of_context_from, ContextKey, DerivedFiring, StoredAction,
};
use agentmeter_runtime::config_watch::spawn_config_watcher;
use agentmeter_runtime::observability::{operations_router, serve};
use agentmeter_runtime::shutdown::Shutdown;
use agentmeter_runtime::telemetry::{emit, InternalEvent};
use agentmeter_schemas::action::{ActionKind, RawAction};
use agentmeter_schemas::decimal::from_scaled_i128;
use agentmeter_schemas::metering::WorkspaceSnapshot;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::Settings;

/// The source partition of every row the stage writes: no topic has it.
pub const DERIVED_PARTITION: u32 = u32::MAX;
/// `actions.kind` of a firing, and of a firing a later derivation no longer produces.
pub const DERIVED_KIND: &str = "derived_outcome";
pub const RETRACTED_KIND: &str = "retracted_outcome";
/// Low bits of a usage version that count definition changes (see the module header).
const GENERATION_BITS: u32 = 20;

/// `[outcomes]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomesSettings {
    /// `/metrics`, `/healthz` and `/readyz` of `agentmeter outcomes`.
    pub metrics_listen: SocketAddr,
    /// Time between two runs: a firing is written at most this long after the aggregator's
    /// progress covers its completing action.
    #[serde(
        alias = "interval",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub interval_ms: u64,
    /// Most touched contexts derived with one set of queries: their ids are listed in the SQL,
    /// which must stay below ClickHouse's `max_query_size` (256 KiB by default).
    pub contexts_per_query: usize,
}

impl Default for OutcomesSettings {
    fn default() -> Self {
        OutcomesSettings {
            metrics_listen: "127.0.0.1:9104".parse().expect("valid address"),
            interval_ms: 1_000,
            contexts_per_query: 2_000,
        }
    }
}

impl OutcomesSettings {
    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (10..=3_600_000).contains(&self.interval_ms),
            "outcomes.interval must be 10 ms to 1 hour"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.contexts_per_query),
            "outcomes.contexts_per_query must be 1 to 10,000 (the ids of one query must fit ClickHouse's max_query_size)"
        );
        Ok(())
    }
}

/// One finished run.
struct RunFinished<'a> {
    elapsed: Duration,
    summary: &'a RunSummary,
}

impl InternalEvent for RunFinished<'_> {
    fn emit(self) {
        let summary = self.summary;
        metrics::counter!("agentmeter_outcomes_runs_total", "result" => "ok").increment(1);
        metrics::histogram!("agentmeter_outcomes_run_seconds").record(self.elapsed.as_secs_f64());
        metrics::counter!("agentmeter_outcomes_contexts_derived_total")
            .increment(summary.contexts as u64);
        metrics::counter!("agentmeter_outcomes_firings_written_total")
            .increment(summary.firings as u64);
        metrics::counter!("agentmeter_outcomes_retractions_total")
            .increment(summary.retractions as u64);
        metrics::gauge!("agentmeter_outcomes_snapshot_offset").set(summary.snapshot_total as f64);
        metrics::gauge!("agentmeter_outcomes_last_success_timestamp_seconds")
            .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
        if summary.contexts > 0 {
            tracing::info!(
                contexts = summary.contexts,
                firings = summary.firings,
                retractions = summary.retractions,
                snapshot = summary.snapshot_total,
                elapsed_ms = self.elapsed.as_millis() as u64,
                "outcomes derived"
            );
        }
    }
}

/// A run that failed; the next one starts again from the last finished snapshot.
struct RunFailed<'a> {
    error: &'a anyhow::Error,
}

impl InternalEvent for RunFailed<'_> {
    fn emit(self) {
        metrics::counter!("agentmeter_outcomes_runs_total", "result" => "error").increment(1);
        tracing::error!(error = format!("{:#}", self.error), "outcomes run failed");
    }
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunSummary {
    pub contexts: usize,
    pub firings: usize,
    pub retractions: usize,
    pub snapshot_total: u64,
}

/// Runs until shutdown.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.outcomes.validate()?;
    settings.kafka.validate()?;
    settings.clickhouse.validate()?;
    let mut config = spawn_config_watcher(&settings.kafka, shutdown.clone())?;
    let last_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(Some(
        "the metering configuration is not loaded yet".into(),
    )));
    let readiness = {
        let last_error = last_error.clone();
        Arc::new(move || match last_error.lock() {
            Ok(error) => error.clone().map_or(Ok(()), Err),
            Err(_) => Err("the outcomes state is poisoned".to_string()),
        })
    };
    let operations = tokio::spawn(serve(
        settings.outcomes.metrics_listen,
        operations_router(readiness),
        shutdown.clone(),
    ));
    if config.wait_until_loaded(shutdown.clone()).await {
        let deriver = Deriver::new(
            &settings.clickhouse,
            &settings.kafka.topics().enriched,
            settings.aggregator.window_seconds,
            settings.outcomes.contexts_per_query,
        );
        let interval = Duration::from_millis(settings.outcomes.interval_ms);
        let mut waiting = shutdown.clone();
        while !shutdown.is_requested() {
            let started = Instant::now();
            let state = config.load();
            let workspaces: Vec<Arc<WorkspaceSnapshot>> = state.workspaces().cloned().collect();
            let result = deriver.run_once(&workspaces).await;
            let reason = match &result {
                Ok(summary) => {
                    emit(RunFinished {
                        elapsed: started.elapsed(),
                        summary,
                    });
                    None
                }
                Err(error) => {
                    emit(RunFailed { error });
                    Some(format!("the last outcomes run failed: {error:#}"))
                }
            };
            if let Ok(mut slot) = last_error.lock() {
                *slot = reason;
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = waiting.requested() => {}
            }
        }
    }
    operations.await.context("operations server task")??;
    Ok(())
}

/// An `actions` row as the stage reads it back: what a condition or a context can look at.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct StoredRow {
    event_id: String,
    workspace_id: String,
    account_id: String,
    agent_instance_id: String,
    kind: String,
    action_name: String,
    trace_event: String,
    user_id: String,
    anonymous_id: String,
    occurred_at_micros: i64,
    received_at: u32,
    description: String,
    llm_provider: String,
    llm_model: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    total_tokens: Option<i64>,
    reported_cost: Option<i128>,
    attributes_json: String,
    source: String,
    source_partition: u32,
    source_offset: u64,
}

const STORED_COLUMNS: &str = "event_id, workspace_id, account_id, agent_instance_id, kind, \
    action_name, trace_event, user_id, anonymous_id, occurred_at_micros, toUInt32(received_at), \
    description, llm_provider, llm_model, input_tokens, output_tokens, total_tokens, \
    reported_cost, attributes_json, source, source_partition, source_offset";

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

impl StoredRow {
    /// The action as the enricher saw it; `None` for a kind this version does not know.
    fn into_stored(self) -> Option<StoredAction> {
        let kind = ActionKind::parse(&self.kind)?;
        let reported_cost = match self.reported_cost {
            Some(scaled) => Some(from_scaled_i128(scaled).ok()?),
            None => None,
        };
        let raw = RawAction {
            kind,
            trace_event: non_empty(self.trace_event),
            user_id: non_empty(self.user_id),
            anonymous_id: non_empty(self.anonymous_id),
            occurred_at_micros: self.occurred_at_micros,
            received_at_micros: i64::from(self.received_at) * 1_000_000,
            description: non_empty(self.description),
            llm_provider: non_empty(self.llm_provider),
            llm_model: non_empty(self.llm_model),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_tokens: self.total_tokens,
            reported_cost,
            attributes_json: self.attributes_json,
            source: self.source,
            ..RawAction::minimal(
                &self.workspace_id,
                &self.account_id,
                &self.agent_instance_id,
                &self.event_id,
                &self.action_name,
            )
        };
        Some(StoredAction {
            raw,
            partition: self.source_partition,
            offset: self.source_offset,
        })
    }
}

#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct PartitionOffsetRow {
    source_partition: u32,
    end_offset: u64,
}

#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct ProgressEntryRow {
    key: String,
    value: u64,
    snapshot_version: u64,
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
struct ProgressWriteRow {
    topic: String,
    key: String,
    value: u64,
    snapshot_version: u64,
    written_at: u32,
}

/// The key columns of a usage row the stage wrote before.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, clickhouse::Row, Deserialize)]
struct UsageKeyRow {
    window_start: u32,
    workspace_id: String,
    account_id: String,
    agent_instance_id: String,
    user_key: String,
    action_name: String,
    currency: String,
    batch_start: u64,
}

/// The finished state of the stage: offsets per partition, fingerprint per workspace.
#[derive(Debug, Clone, Default, PartialEq)]
struct Finished {
    partitions: BTreeMap<u32, u64>,
    fingerprints: BTreeMap<String, u64>,
    generation: u64,
}

/// The fingerprint of a workspace's composite definitions: when it changes, every context of
/// the workspace is derived again.
fn fingerprint(snapshot: Option<&WorkspaceSnapshot>) -> u64 {
    let definitions = snapshot.map_or_else(
        || "[]".to_string(),
        |snapshot| {
            serde_json::to_string(&snapshot.config.composite_outcomes)
                .unwrap_or_else(|_| "[]".to_string())
        },
    );
    let digest = Sha256::digest(definitions.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes) >> 1
}

/// `has([...], column)` for a list of names, quoted for ClickHouse.
fn has_any(column: &str, names: &BTreeSet<String>) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|name| format!("'{}'", name.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    format!("has([{}], {column})", quoted.join(", "))
}

fn ids_list(ids: &BTreeSet<u64>) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ClickHouse side of the stage.
pub struct Deriver {
    client: clickhouse::Client,
    database: String,
    topic: String,
    window_seconds: u32,
    contexts_per_query: usize,
}

impl Deriver {
    pub fn new(
        settings: &ClickHouseSettings,
        topic: &str,
        window_seconds: u32,
        contexts_per_query: usize,
    ) -> Deriver {
        Deriver {
            client: settings.client().with_database(&settings.database),
            database: settings.database.clone(),
            topic: topic.to_string(),
            window_seconds: window_seconds.max(1),
            contexts_per_query: contexts_per_query.max(1),
        }
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{}", self.database, name)
    }

    async fn snapshot(&self) -> anyhow::Result<BTreeMap<u32, u64>> {
        let query = format!(
            "SELECT source_partition, max(end_offset) AS reached FROM {} WHERE topic = ? \
             GROUP BY source_partition",
            self.table("aggregator_progress")
        );
        let rows = self
            .client
            .query(&query)
            .bind(&self.topic)
            .fetch_all::<PartitionOffsetRow>()
            .await
            .context("reading the aggregator's progress")?;
        Ok(rows
            .into_iter()
            .map(|row| (row.source_partition, row.end_offset))
            .collect())
    }

    async fn finished(&self) -> anyhow::Result<Finished> {
        let query = format!(
            "SELECT key, argMax(value, snapshot_version) AS latest_value, max(snapshot_version) AS latest_version \
             FROM {} WHERE topic = ? GROUP BY key",
            self.table("outcomes_progress")
        );
        let rows = self
            .client
            .query(&query)
            .bind(&self.topic)
            .fetch_all::<ProgressEntryRow>()
            .await
            .context("reading outcomes_progress")?;
        let mut finished = Finished::default();
        for row in rows {
            if let Some(partition) = row.key.strip_prefix("partition:") {
                if let Ok(partition) = partition.parse() {
                    finished.partitions.insert(partition, row.value);
                }
            } else if let Some(workspace) = row.key.strip_prefix("workspace:") {
                finished
                    .fingerprints
                    .insert(workspace.to_string(), row.value);
            } else if row.key == "generation" {
                finished.generation = row.value;
            }
            let _ = row.snapshot_version;
        }
        Ok(finished)
    }

    async fn stored_actions(&self, condition: &str) -> anyhow::Result<Vec<StoredAction>> {
        let query = format!(
            "SELECT {STORED_COLUMNS} FROM {} WHERE source_partition != {DERIVED_PARTITION} \
             AND tracked = 1 AND {condition}",
            self.table("actions")
        );
        let rows = self
            .client
            .query(&query)
            .fetch_all::<StoredRow>()
            .await
            .context("reading stored actions")?;
        Ok(rows
            .into_iter()
            .filter_map(StoredRow::into_stored)
            .collect())
    }

    /// One run over every workspace; what it did.
    pub async fn run_once(
        &self,
        workspaces: &[Arc<WorkspaceSnapshot>],
    ) -> anyhow::Result<RunSummary> {
        let snapshot = self.snapshot().await?;
        let finished = self.finished().await?;
        let by_id: HashMap<&str, &WorkspaceSnapshot> = workspaces
            .iter()
            .map(|snapshot| (snapshot.workspace_id(), snapshot.as_ref()))
            .collect();
        // Every workspace with definitions now, or with rows written under earlier ones.
        let mut names: BTreeSet<&str> = by_id
            .iter()
            .filter(|(_, snapshot)| !snapshot.composite_outcomes().is_empty())
            .map(|(id, _)| *id)
            .collect();
        names.extend(finished.fingerprints.keys().map(String::as_str));
        let fingerprints: BTreeMap<String, u64> = names
            .iter()
            .map(|id| (id.to_string(), fingerprint(by_id.get(id).copied())))
            .collect();
        let below_snapshot = |stored: &StoredAction| {
            snapshot
                .get(&stored.partition)
                .is_some_and(|end| stored.offset < *end)
        };
        let snapshot_total = snapshot
            .values()
            .fold(0u64, |sum, end| sum.saturating_add(*end));
        let changed: Vec<&String> = fingerprints
            .iter()
            .filter(|(id, fingerprint)| finished.fingerprints.get(*id) != Some(fingerprint))
            .map(|(id, _)| id)
            .collect();
        let mut summary = RunSummary {
            snapshot_total,
            ..RunSummary::default()
        };
        if snapshot == finished.partitions && changed.is_empty() {
            return Ok(summary);
        }
        let generation = finished.generation + u64::from(!changed.is_empty());
        let version =
            (snapshot_total << GENERATION_BITS) | (generation & ((1 << GENERATION_BITS) - 1));

        // The new constituents of workspaces whose definitions did not change.
        let ranges: Vec<String> = snapshot
            .iter()
            .filter_map(|(partition, end)| {
                let from = finished.partitions.get(partition).copied().unwrap_or(0);
                (from < *end).then(|| {
                    format!(
                        "(source_partition = {partition} AND source_offset >= {from} AND source_offset < {end})"
                    )
                })
            })
            .collect();
        // Per workspace: the touched contexts with the earliest time of their new constituents,
        // and whether every context is to be derived (the definitions changed).
        let mut touched: BTreeMap<String, (BTreeMap<ContextKey, i64>, bool)> = BTreeMap::new();
        for id in &changed {
            touched.insert((*id).clone(), (BTreeMap::new(), true));
        }
        let steady: Vec<&WorkspaceSnapshot> = names
            .iter()
            .filter(|id| !changed.contains(&&id.to_string()))
            .filter_map(|id| by_id.get(id).copied())
            .filter(|snapshot| !snapshot.composite_outcomes().is_empty())
            .collect();
        if !ranges.is_empty() && !steady.is_empty() {
            let workspace_ids: BTreeSet<String> = steady
                .iter()
                .map(|s| s.workspace_id().to_string())
                .collect();
            let step_names: BTreeSet<String> = steady
                .iter()
                .flat_map(|s| s.composite_outcomes().iter().flat_map(|c| c.step_names()))
                .collect();
            let new_actions = self
                .stored_actions(&format!(
                    "{} AND {} AND ({})",
                    has_any("workspace_id", &workspace_ids),
                    has_any("action_name", &step_names),
                    ranges.join(" OR ")
                ))
                .await?;
            for stored in new_actions.iter().filter(|stored| below_snapshot(stored)) {
                let Some(workspace) = by_id.get(stored.raw.workspace_id.as_str()) else {
                    continue;
                };
                for key in contexts_of(workspace.composite_outcomes(), &stored.raw) {
                    let from = touched
                        .entry(key.workspace_id.clone())
                        .or_default()
                        .0
                        .entry(key)
                        .or_insert(i64::MAX);
                    *from = (*from).min(stored.raw.occurred_at_micros);
                }
            }
        }

        let window_micros = i64::from(self.window_seconds) * 1_000_000;
        let mut action_rows: Vec<ActionRow> = Vec::new();
        let mut usage_rows: Vec<UsageRow> = Vec::new();
        // Touched contexts in chunks, so that no query's id list grows past ClickHouse's query
        // size limit however many contexts one run touches.
        let mut units: Vec<(&String, BTreeMap<ContextKey, i64>, bool)> = Vec::new();
        for (workspace_id, (contexts, everything)) in &touched {
            if *everything {
                units.push((workspace_id, BTreeMap::new(), true));
                continue;
            }
            let keys: Vec<(&ContextKey, &i64)> = contexts.iter().collect();
            for chunk in keys.chunks(self.contexts_per_query) {
                let chunk = chunk
                    .iter()
                    .map(|(key, from)| ((*key).clone(), **from))
                    .collect();
                units.push((workspace_id, chunk, false));
            }
        }
        for (workspace_id, contexts, everything) in &units {
            let snapshot_of = by_id.get(workspace_id.as_str()).copied();
            let composites = snapshot_of.map_or(&[][..], |s| s.composite_outcomes());
            // Each context is derived from `from` on (its earliest new constituent), with the
            // firings of [from − within, from) kept; a context whose look-back reaches before
            // its version's start is derived whole (`firings_of_context_from`).
            let mut plans: BTreeMap<ContextKey, Span> = contexts
                .iter()
                .map(|(key, from)| {
                    let composite = &composites[key.version];
                    let lower = from.saturating_sub(composite.within_micros);
                    let span = if lower < composite.effective_from_micros {
                        Span::WHOLE
                    } else {
                        Span {
                            from: *from,
                            lower,
                            window_floor: from.div_euclid(window_micros) * window_micros,
                        }
                    };
                    (key.clone(), span)
                })
                .collect();
            let step_names: BTreeSet<String> =
                composites.iter().flat_map(|c| c.step_names()).collect();
            let single = BTreeSet::from([workspace_id.to_string()]);
            let constituents: Vec<StoredAction> = if step_names.is_empty() {
                Vec::new()
            } else if *everything {
                self.stored_actions(&format!(
                    "{} AND {}",
                    has_any("workspace_id", &single),
                    has_any("action_name", &step_names)
                ))
                .await?
            } else {
                let instances: BTreeSet<String> = plans
                    .keys()
                    .map(|key| key.agent_instance_id.clone())
                    .collect();
                // (No stored action is from before 1970: `occurred_at` is a DateTime.)
                let earliest = plans
                    .values()
                    .map(|span| span.lower)
                    .min()
                    .unwrap_or(0)
                    .max(0);
                self.stored_actions(&format!(
                    "{} AND {} AND {} AND occurred_at_micros >= {earliest}",
                    has_any("workspace_id", &single),
                    has_any("agent_instance_id", &instances),
                    has_any("action_name", &step_names)
                ))
                .await?
            };
            let constituents: Vec<StoredAction> = constituents
                .into_iter()
                .filter(|stored| below_snapshot(stored))
                .collect();
            if *everything {
                for stored in &constituents {
                    for key in contexts_of(composites, &stored.raw) {
                        plans.insert(key, Span::WHOLE);
                    }
                }
            }
            // The constituents of each instance, so a context looks only at its own.
            let mut by_instance: HashMap<&str, Vec<StoredAction>> = HashMap::new();
            for stored in &constituents {
                by_instance
                    .entry(stored.raw.agent_instance_id.as_str())
                    .or_default()
                    .push(stored.clone());
            }
            let ids: BTreeMap<u64, &ContextKey> = plans
                .keys()
                .map(|key| (key.id(&composites[key.version]), key))
                .collect();
            let (firings_filter, usage_filter) = if *everything {
                (String::new(), String::new())
            } else {
                let list = ids_list(&ids.keys().copied().collect());
                let earliest = plans
                    .values()
                    .map(|span| span.lower.min(span.window_floor))
                    .min()
                    .unwrap_or(0)
                    .max(0);
                (
                    format!(" AND source_offset IN ({list}) AND occurred_at_micros >= {earliest}"),
                    format!(
                        " AND batch_start IN ({list}) AND window_start >= {}",
                        earliest.div_euclid(1_000_000)
                    ),
                )
            };
            let previous_firings: Vec<ActionRow> = self
                .client
                .query(&format!(
                    "SELECT * FROM {} FINAL WHERE workspace_id = ? AND source_partition = {DERIVED_PARTITION}{firings_filter}",
                    self.table("actions"),
                ))
                .bind(workspace_id)
                .fetch_all::<ActionRow>()
                .await
                .context("reading the firings written before")?;
            let previous_usage: Vec<UsageKeyRow> = self
                .client
                .query(&format!(
                    "SELECT DISTINCT window_start, workspace_id, account_id, agent_instance_id, user_key, action_name, currency, batch_start \
                     FROM {} WHERE workspace_id = ? AND source_partition = {DERIVED_PARTITION}{usage_filter}",
                    self.table("usage"),
                ))
                .bind(workspace_id)
                .fetch_all::<UsageKeyRow>()
                .await
                .context("reading the usage written before")?;
            let mut previous_by_context: HashMap<u64, Vec<ActionRow>> = HashMap::new();
            for row in previous_firings {
                previous_by_context
                    .entry(row.source_offset)
                    .or_default()
                    .push(row);
            }

            let currency = snapshot_of.map_or("", |s| s.currency()).to_string();
            let config_version = snapshot_of.map_or(0, |s| s.version);
            let mut windows: BTreeMap<UsageKeyRow, (u64, u32, u32)> = BTreeMap::new();
            let mut count_in_window = |row: &ActionRow, context_id: u64| {
                let window_start = row.occurred_at - row.occurred_at % self.window_seconds;
                let entry = windows
                    .entry(UsageKeyRow {
                        window_start,
                        workspace_id: row.workspace_id.clone(),
                        account_id: row.account_id.clone(),
                        agent_instance_id: row.agent_instance_id.clone(),
                        user_key: row.user_key.clone(),
                        action_name: row.action_name.clone(),
                        currency: currency.clone(),
                        batch_start: context_id,
                    })
                    .or_insert((0, u32::MAX, 0));
                entry.0 += 1;
                entry.1 = entry.1.min(row.occurred_at);
                entry.2 = entry.2.max(row.occurred_at);
            };
            // Contexts of the previous rows that are not derived now (a removed definition).
            let orphans: Vec<u64> = previous_by_context
                .keys()
                .filter(|id| !ids.contains_key(id))
                .copied()
                .collect();
            for (context_id, key) in &ids {
                let composite = &composites[key.version];
                let span = plans[*key];
                let previous = previous_by_context.remove(context_id).unwrap_or_default();
                let live_before = |row: &&ActionRow| {
                    row.kind == DERIVED_KIND && row.occurred_at_micros < span.from
                };
                let kept: Vec<Firing> = previous
                    .iter()
                    .filter(live_before)
                    .filter(|row| row.occurred_at_micros >= span.lower)
                    .filter_map(firing_of_row)
                    .collect();
                let actions: Vec<StoredAction> = by_instance
                    .get(key.agent_instance_id.as_str())
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .filter(|stored| stored.raw.occurred_at_micros >= span.lower)
                    .cloned()
                    .collect();
                let firings = firings_of_context_from(composite, key, &actions, &kept, span.from);
                summary.contexts += 1;
                // Usage from the window of `from` on: the kept firings there, and the new ones.
                for row in previous
                    .iter()
                    .filter(live_before)
                    .filter(|row| row.occurred_at_micros >= span.window_floor)
                {
                    count_in_window(row, *context_id);
                }
                let mut live_ids = BTreeSet::new();
                for derived in &firings {
                    live_ids.insert(derived.id.clone());
                    let row = firing_row(
                        derived,
                        &composite.name,
                        *context_id,
                        &currency,
                        config_version,
                    )?;
                    count_in_window(&row, *context_id);
                    action_rows.push(row);
                    summary.firings += 1;
                }
                for row in previous {
                    if row.kind == DERIVED_KIND
                        && row.occurred_at_micros >= span.from
                        && !live_ids.contains(&row.event_id)
                    {
                        action_rows.push(retracted(row));
                        summary.retractions += 1;
                    }
                }
            }
            for context_id in orphans {
                for row in previous_by_context.remove(&context_id).unwrap_or_default() {
                    if row.kind == DERIVED_KIND {
                        action_rows.push(retracted(row));
                        summary.retractions += 1;
                    }
                }
            }
            // Every window a derived context had rows in, from its window of `from` on, is
            // written again: zero where no firing is left.
            for key in previous_usage {
                let from_window = ids.get(&key.batch_start).map_or(0, |context| {
                    plans[*context].window_floor.div_euclid(1_000_000)
                });
                if i64::from(key.window_start) >= from_window {
                    windows.entry(key).or_insert((0, 0, 0));
                }
            }
            for (key, (count, first, last)) in windows {
                usage_rows.push(usage_row(
                    key,
                    count,
                    first,
                    last,
                    self.window_seconds,
                    version,
                ));
            }
        }

        if !action_rows.is_empty() {
            let mut insert = self.client.insert::<ActionRow>("actions").await?;
            for row in &action_rows {
                insert.write(row).await?;
            }
            insert
                .end()
                .await
                .context("writing the firings to actions")?;
        }
        if !usage_rows.is_empty() {
            let mut insert = self.client.insert::<UsageRow>("usage").await?;
            for row in &usage_rows {
                insert.write(row).await?;
            }
            insert.end().await.context("writing the firings' usage")?;
        }
        let written_at = u32::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        let mut insert = self
            .client
            .insert::<ProgressWriteRow>("outcomes_progress")
            .await?;
        let entries = snapshot
            .iter()
            .map(|(partition, end)| (format!("partition:{partition}"), *end))
            .chain(
                fingerprints
                    .iter()
                    .map(|(id, fingerprint)| (format!("workspace:{id}"), *fingerprint)),
            )
            .chain([("generation".to_string(), generation)]);
        for (key, value) in entries {
            insert
                .write(&ProgressWriteRow {
                    topic: self.topic.clone(),
                    key,
                    value,
                    snapshot_version: version,
                    written_at,
                })
                .await?;
        }
        insert.end().await.context("writing outcomes_progress")?;
        Ok(summary)
    }
}

/// What a run derives of one context: the firings completing from `from` on, with the written
/// firings of `[lower, from)` kept (`lower` = `from − within`), and its usage from the window
/// of `from` (`window_floor`) on. [`Span::WHOLE`]: everything.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    from: i64,
    lower: i64,
    window_floor: i64,
}

impl Span {
    const WHOLE: Span = Span {
        from: i64::MIN,
        lower: i64::MIN,
        window_floor: i64::MIN,
    };
}

/// The firing a written row holds (its constituents are in `attributes_json`).
fn firing_of_row(row: &ActionRow) -> Option<Firing> {
    let attributes: serde_json::Value = serde_json::from_str(&row.attributes_json).ok()?;
    let event_ids = attributes["constituents"]
        .as_array()?
        .iter()
        .map(|id| id.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()?;
    Some(Firing {
        at_micros: row.occurred_at_micros,
        event_ids,
    })
}

/// A written firing, rewritten as retracted: the same sorting key, out of Live Data and of
/// every count.
fn retracted(row: ActionRow) -> ActionRow {
    ActionRow {
        kind: RETRACTED_KIND.to_string(),
        tracked: 0,
        outcome: 0,
        ..row
    }
}

/// The `actions` row of a firing: the completing action's account, instance, user and time,
/// the constituents in `attributes_json`, `@outcome` 1.
fn firing_row(
    derived: &DerivedFiring,
    name: &str,
    context_id: u64,
    currency: &str,
    config_version: i64,
) -> anyhow::Result<ActionRow> {
    let completing = &derived.completed_by;
    let at_seconds = u32::try_from(derived.firing.at_micros.div_euclid(1_000_000)).unwrap_or(0);
    let attributes = serde_json::json!({
        "constituents": derived.firing.event_ids,
        "completed_by": completing.event_id,
    });
    Ok(ActionRow {
        event_id: derived.id.clone(),
        workspace_id: completing.workspace_id.clone(),
        account_id: completing.account_id.clone(),
        agent_instance_id: completing.agent_instance_id.clone(),
        kind: DERIVED_KIND.to_string(),
        action_name: name.to_string(),
        trace_event: String::new(),
        user_id: completing.user_id.clone().unwrap_or_default(),
        anonymous_id: completing.anonymous_id.clone().unwrap_or_default(),
        user_key: completing.user_key().to_string(),
        occurred_at: at_seconds,
        occurred_at_micros: derived.firing.at_micros,
        received_at: at_seconds,
        description: String::new(),
        llm_provider: String::new(),
        llm_model: String::new(),
        input_tokens: None,
        output_tokens: None,
        total_tokens: None,
        reported_cost: None,
        attributes_json: attributes.to_string(),
        source: "derived".to_string(),
        tracked: 1,
        outcome: 1,
        measure: "unit".to_string(),
        quantity: agentmeter_schemas::decimal::to_scaled_i128(rust_decimal::Decimal::ONE)?,
        unit_cost: 0,
        cost: 0,
        cost_source: "none".to_string(),
        currency: currency.to_string(),
        config_version,
        enriched_at: at_seconds,
        source_partition: DERIVED_PARTITION,
        source_offset: context_id,
    })
}

/// The `usage` row of one context's firings in one window: `count` of them in `outcome_count`
/// and `quantity` (zero when a derivation no longer finds any there); `action_count` 0.
fn usage_row(
    key: UsageKeyRow,
    count: u64,
    first_seen: u32,
    last_seen: u32,
    window_seconds: u32,
    version: u64,
) -> UsageRow {
    let (first_seen, last_seen) = if count == 0 {
        (key.window_start, key.window_start)
    } else {
        (first_seen, last_seen)
    };
    let scaled_count = i128::from(count) * 10i128.pow(agentmeter_schemas::decimal::STORAGE_SCALE);
    UsageRow {
        window_start: key.window_start,
        window_seconds,
        workspace_id: key.workspace_id,
        account_id: key.account_id,
        agent_instance_id: key.agent_instance_id,
        user_key: key.user_key,
        action_name: key.action_name,
        measure: "unit".to_string(),
        tracked: 1,
        outcome: 1,
        currency: key.currency,
        source_partition: DERIVED_PARTITION,
        batch_start: key.batch_start,
        // A firing is an outcome, not an action the agent took: `@action` does not count it.
        action_count: 0,
        quantity: scaled_count,
        cost: 0,
        outcome_count: count,
        first_seen,
        last_seen,
        version,
    }
}
