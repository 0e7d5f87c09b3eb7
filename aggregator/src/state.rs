//! The deterministic heart of the aggregator: what one input partition turns into, as a pure
//! function of the records it reads. No I/O here.
//!
//! A partition is cut into **batches** of consecutive offsets. A batch's [`BatchPlan`] (start,
//! size, window length, and where its duplicate check begins) is written to ClickHouse before any
//! of its data, so a replay after a crash cuts and aggregates exactly the same way even if the
//! settings changed meanwhile. For the batch so far the aggregator keeps **cumulative** usage per
//! key; a flush writes the keys changed since the last flush with `version` = the offset after
//! the last record read. Every key's highest-version row is therefore the exact total of a prefix
//! of the batch, and replays, retries and zombie members only rewrite rows that are identical or
//! superseded (`docs/adr/0001-exactly-once-aggregation.md`).
//!
//! **Duplicates**: a record is a duplicate when the same (workspace, event_id) appeared earlier in
//! the partition at an offset ≥ the batch's `dedupe_from`. When a batch starts, `dedupe_from` is
//! set to the smallest remembered offset whose record timestamp is within the horizon of the
//! batch's first record, and older ids are forgotten. Because the rule refers only to offsets
//! and the plan is persisted, a replay rebuilds exactly the same set by re-reading
//! `[dedupe_from, batch start)` — or, when the restart store has them
//! (`crate::restart_store`), answers for `[dedupe_from, resume point)` from the store through
//! [`PriorIds`] and re-reads only from the resume point: the same decisions, without a re-read
//! that grows with rate × horizon.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use agentmeter_schemas::action::ActionKind;
use agentmeter_schemas::decimal::{checked_add_scaled, to_scaled_i128};
use agentmeter_schemas::limits::{check_enriched_numbers, ValueError};
use agentmeter_schemas::EnrichedAction;
use sha2::{Digest, Sha256};

/// How a batch of one partition is cut and aggregated; persisted before its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    /// First offset of the batch.
    pub start: i64,
    /// Offsets in the batch: it covers `[start, start + size)`.
    pub size: i64,
    /// Length of the usage windows, in seconds.
    pub window_seconds: u32,
    /// Duplicates are looked for among records at offsets `[dedupe_from, current)`.
    pub dedupe_from: i64,
}

impl BatchPlan {
    pub fn end(&self) -> i64 {
        self.start + self.size
    }
}

/// How the Kafka offsets of an input partition map to the logical offsets the aggregator plans,
/// counts and stores progress in. Identity (`0 → 0`) until an operator starts a new epoch after
/// the topic was reset (`migrations/0005_input_epochs.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputEpoch {
    /// The logical offset of the epoch's first Kafka offset.
    pub logical_start: i64,
    /// The first Kafka offset of the epoch; earlier ones belong to an older epoch.
    pub physical_start: i64,
}

impl InputEpoch {
    /// The logical offset of a Kafka offset; `None` before the epoch's first Kafka offset.
    pub fn logical(&self, physical: i64) -> Option<i64> {
        (physical >= self.physical_start)
            .then(|| self.logical_start + (physical - self.physical_start))
    }

    /// The Kafka offset of a logical offset (the epoch's first one for earlier offsets).
    pub fn physical(&self, logical: i64) -> i64 {
        (logical - self.logical_start).max(0) + self.physical_start
    }
}

/// The usage dimensions of one row of the `usage` table (besides partition and batch).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub window_start_seconds: i64,
    pub workspace_id: String,
    pub account_id: String,
    pub agent_instance_id: String,
    pub user_key: String,
    pub action_name: String,
    pub measure: String,
    pub tracked: bool,
    pub outcome: bool,
    pub currency: String,
}

/// The dimensions of one `usage_daily` row (besides partition and batch): those of [`UsageKey`]
/// with the UTC day for the window, without agent instance and user, with the trace event
/// (ADR 0008).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DailyKey {
    pub day_start_seconds: i64,
    pub workspace_id: String,
    pub account_id: String,
    pub action_name: String,
    pub trace_event: String,
    pub measure: String,
    pub tracked: bool,
    pub outcome: bool,
    pub currency: String,
}

/// The dimensions of one `users_daily` row (besides partition and batch): the UTC day, the
/// account and the user of an action (ADR 0008).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserDayKey {
    pub day_start_seconds: i64,
    pub workspace_id: String,
    pub account_id: String,
    pub user_key: String,
    pub tracked: bool,
    pub currency: String,
}

/// Cumulative totals of one [`UsageKey`] within a batch.
///
/// Quantity and cost are kept as ClickHouse stores them, integers scaled by 10^12: sums of
/// 12-digit decimals are exact in integers, while `Decimal` holds only 28 digits (7.9·10^16 at
/// scale 12) and would round a large total silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTotals {
    pub action_count: u64,
    /// Sum of the quantities × 10^12.
    pub quantity_scaled: i128,
    /// Sum of the costs × 10^12.
    pub cost_scaled: i128,
    pub outcome_count: u64,
    pub first_seen_micros: i64,
    pub last_seen_micros: i64,
}

/// An enriched action accepted for counting, with where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct CountedAction {
    pub action: EnrichedAction,
    pub partition: i32,
    pub offset: i64,
}

/// Everything a flush must make durable for one batch, in order: actions, usage, then progress.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchWrite {
    pub plan: BatchPlan,
    /// Offset after the last record read: the version of the usage rows and of the progress row.
    pub end_offset: i64,
    pub actions: Vec<CountedAction>,
    pub usage: Vec<(UsageKey, UsageTotals)>,
    /// The `usage_daily` keys changed since the last flush, with their totals in the batch so
    /// far (same version as `usage`).
    pub daily: Vec<(DailyKey, UsageTotals)>,
    /// The `users_daily` keys changed since the last flush, with their totals in the batch so
    /// far (same version as `usage`).
    pub user_days: Vec<(UserDayKey, UsageTotals)>,
    /// The plan of the batch that follows, written after this batch's data (its intent row).
    pub next_plan: Option<BatchPlan>,
}

/// What happened to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// A value out of its accepted range (only a record that bypassed the enricher's checks):
    /// not counted, dead-lettered by the caller. The decision depends on the record alone, so
    /// every replay makes it again.
    Refused(ValueError),
    /// Before the batch start: only remembered for the duplicate check.
    Rebuilt,
    /// Counted into usage and queued for the `actions` table.
    Counted,
    /// Same (workspace, event_id) seen within the horizon: not counted.
    Duplicate,
    /// Before an offset already handled (a re-delivery): ignored.
    AlreadyHandled,
    /// The restart store could not answer: nothing can be decided for this partition any more;
    /// the caller must abandon its state (it replays from the persisted plan).
    PriorIdsFailed(String),
}

/// The ids of a partition seen before this process resumed it, in the restart store: they
/// cover the offsets `[dedupe_from of the plan, until)`.
pub trait PriorIds: std::fmt::Debug + Send {
    /// The offset where the stored ids end and reading resumed.
    fn until(&self) -> i64;
    /// Whether `id` was seen at an offset in `[from, until)`.
    fn seen(&self, id: &[u8; 16], from: i64) -> Result<bool, String>;
    /// The smallest offset in `[from, until)` whose record timestamp is at least
    /// `threshold_ms`.
    fn first_at_or_after(&self, from: i64, threshold_ms: i64) -> Result<Option<i64>, String>;
}

/// What was observed at one offset, as the restart store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedId {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub id: [u8; 16],
}

/// Ids seen in a partition, by offset, for the duplicate check: in memory from where this
/// process began reading, and before that (after a restart) in the restart store.
#[derive(Debug, Default)]
pub struct DedupeWindow {
    /// id → offset of its latest occurrence.
    latest_offset_by_id: HashMap<[u8; 16], i64>,
    /// (offset, record timestamp ms, id), ascending by offset.
    seen: VecDeque<(i64, i64, [u8; 16])>,
    /// The ids before the first one in memory, until the duplicate check has moved past them.
    prior: Option<Box<dyn PriorIds>>,
    /// Ids before this offset are forgotten (the current `dedupe_from`).
    forgotten_before: i64,
}

impl DedupeWindow {
    /// A window whose ids of `[dedupe_from, prior.until())` are in the restart store.
    pub fn resuming(dedupe_from: i64, prior: Box<dyn PriorIds>) -> DedupeWindow {
        DedupeWindow {
            prior: Some(prior),
            forgotten_before: dedupe_from,
            ..DedupeWindow::default()
        }
    }

    /// Remembers `id` at `offset`; true when it had already been seen (a duplicate).
    pub fn observe(
        &mut self,
        id: [u8; 16],
        offset: i64,
        timestamp_ms: i64,
    ) -> Result<bool, String> {
        debug_assert!(self.seen.back().is_none_or(|(last, _, _)| *last < offset));
        let seen_in_memory = match self.latest_offset_by_id.entry(id) {
            Entry::Occupied(mut entry) => {
                entry.insert(offset);
                true
            }
            Entry::Vacant(entry) => {
                entry.insert(offset);
                false
            }
        };
        self.seen.push_back((offset, timestamp_ms, id));
        if seen_in_memory {
            return Ok(true);
        }
        match &self.prior {
            Some(prior) => prior.seen(&id, self.forgotten_before),
            None => Ok(false),
        }
    }

    /// Where the next batch's duplicate check begins: the smallest remembered offset whose
    /// timestamp is within `horizon_ms` of `first_timestamp_ms`, else `first_offset`.
    /// Forgets everything before it.
    pub fn cut(
        &mut self,
        first_offset: i64,
        first_timestamp_ms: i64,
        horizon_ms: i64,
    ) -> Result<i64, String> {
        let threshold = first_timestamp_ms.saturating_sub(horizon_ms);
        if let Some(prior) = &self.prior {
            // Every stored offset is below every offset in memory.
            if let Some(dedupe_from) = prior.first_at_or_after(self.forgotten_before, threshold)? {
                self.forget_before(dedupe_from);
                return Ok(dedupe_from);
            }
            self.prior = None;
        }
        let dedupe_from = self
            .seen
            .iter()
            .find(|(_, timestamp, _)| *timestamp >= threshold)
            .map(|(offset, _, _)| *offset)
            .unwrap_or(first_offset);
        self.forget_before(dedupe_from);
        Ok(dedupe_from)
    }

    /// Forgets ids seen before `offset`.
    pub fn forget_before(&mut self, offset: i64) {
        self.forgotten_before = self.forgotten_before.max(offset);
        if self
            .prior
            .as_ref()
            .is_some_and(|prior| prior.until() <= self.forgotten_before)
        {
            self.prior = None;
        }
        while let Some(&(seen_offset, _, id)) = self.seen.front() {
            if seen_offset >= offset {
                break;
            }
            self.seen.pop_front();
            if self.latest_offset_by_id.get(&id) == Some(&seen_offset) {
                self.latest_offset_by_id.remove(&id);
            }
        }
    }

    /// Ids in memory (those in the restart store are not counted).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether ids before the memory's are still answered by the restart store.
    pub fn has_prior(&self) -> bool {
        self.prior.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The identity used for duplicates: the first 16 bytes of SHA-256(workspace ␟ event_id).
pub fn dedupe_id(workspace_id: &str, event_id: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(workspace_id.as_bytes());
    hasher.update([0x1f]);
    hasher.update(event_id.as_bytes());
    let digest = hasher.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// Settings that apply to batches started from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub batch_size: i64,
    pub window_seconds: u32,
    pub dedupe_horizon_ms: i64,
}

/// The aggregation state of one input partition.
#[derive(Debug)]
pub struct PartitionAggregator {
    pub partition: i32,
    settings: BatchSettings,
    /// The current batch; `None` until the first record of a partition with no progress.
    plan: Option<BatchPlan>,
    /// Offset after the last record handled.
    next_offset: i64,
    /// Cumulative totals of the current batch, with whether they changed since the last flush,
    /// and where the key's rollup totals are.
    totals: HashMap<UsageKey, FineTotals>,
    /// The same for the rollup keys of the batch (ADR 0008).
    daily: RollupTotals<DailyKey>,
    user_days: RollupTotals<UserDayKey>,
    pending_actions: Vec<CountedAction>,
    /// Sealed batches and intents waiting for the next flush, in order.
    sealed: Vec<BatchWrite>,
    dedupe: DedupeWindow,
    /// With a restart store: what was observed since the last [`Self::take_journal`].
    journal: Option<Vec<ObservedId>>,
}

impl PartitionAggregator {
    /// State for a partition, resuming `plan` (from ClickHouse) or starting fresh.
    pub fn new(
        partition: i32,
        settings: BatchSettings,
        plan: Option<BatchPlan>,
    ) -> PartitionAggregator {
        PartitionAggregator {
            partition,
            settings,
            next_offset: plan.map(|plan| plan.dedupe_from).unwrap_or(0),
            plan,
            totals: HashMap::new(),
            daily: RollupTotals::default(),
            user_days: RollupTotals::default(),
            pending_actions: Vec::new(),
            sealed: Vec::new(),
            dedupe: DedupeWindow::default(),
            journal: None,
        }
    }

    /// Keeps a journal of what is observed, for the restart store ([`Self::take_journal`]).
    pub fn with_journal(mut self) -> PartitionAggregator {
        self.journal = Some(Vec::new());
        self
    }

    /// Resumes with the ids of `[plan.dedupe_from, prior.until())` in the restart store:
    /// reading starts at `prior.until()` instead of the plan's `dedupe_from`.
    pub fn with_prior_ids(mut self, prior: Box<dyn PriorIds>) -> PartitionAggregator {
        if let Some(plan) = self.plan {
            self.next_offset = prior.until().max(plan.dedupe_from);
            self.dedupe = DedupeWindow::resuming(plan.dedupe_from, prior);
        }
        self
    }

    /// What was observed since the last call, in offset order, for the restart store (empty
    /// without [`Self::with_journal`]).
    pub fn take_journal(&mut self) -> Vec<ObservedId> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether ids from before this process are still answered by the restart store.
    pub fn has_prior_ids(&self) -> bool {
        self.dedupe.has_prior()
    }

    /// Where the consumer must start reading this partition (`None`: from the beginning).
    pub fn start_offset(&self) -> Option<i64> {
        self.plan.map(|_| self.next_offset)
    }

    /// Offset after the last record handled.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub fn plan(&self) -> Option<BatchPlan> {
        self.plan
    }

    /// Actions waiting for the next flush.
    pub fn pending_rows(&self) -> usize {
        self.pending_actions.len()
            + self
                .sealed
                .iter()
                .map(|write| write.actions.len())
                .sum::<usize>()
    }

    pub fn remembered_ids(&self) -> usize {
        self.dedupe.len()
    }

    /// Handles one record of this partition, in offset order.
    pub fn handle(
        &mut self,
        offset: i64,
        timestamp_ms: i64,
        action: EnrichedAction,
    ) -> RecordOutcome {
        if offset < self.next_offset && self.plan.is_some() {
            return RecordOutcome::AlreadyHandled;
        }
        let plan = match self.plan {
            None => {
                // First record of a partition without progress: batches align to the size.
                let start = offset - offset.rem_euclid(self.settings.batch_size);
                let plan = BatchPlan {
                    start,
                    size: self.settings.batch_size,
                    window_seconds: self.settings.window_seconds,
                    dedupe_from: start,
                };
                self.plan = Some(plan);
                self.sealed.push(BatchWrite {
                    plan,
                    end_offset: start,
                    actions: Vec::new(),
                    usage: Vec::new(),
                    daily: Vec::new(),
                    user_days: Vec::new(),
                    next_plan: None,
                });
                plan
            }
            Some(plan) if offset >= plan.end() => match self.roll(plan, offset, timestamp_ms) {
                Ok(next) => next,
                Err(error) => return RecordOutcome::PriorIdsFailed(error),
            },
            Some(plan) => plan,
        };
        self.next_offset = offset + 1;
        // Before the duplicate check, so that a rebuild of the ids skips the same records.
        if let Err(error) = check_enriched_numbers(&action) {
            return RecordOutcome::Refused(error);
        }
        let id = dedupe_id(&action.raw.workspace_id, &action.raw.event_id);
        let seen_before = match self.dedupe.observe(id, offset, timestamp_ms) {
            Ok(seen_before) => seen_before,
            Err(error) => return RecordOutcome::PriorIdsFailed(error),
        };
        if let Some(journal) = &mut self.journal {
            journal.push(ObservedId {
                offset,
                timestamp_ms,
                id,
            });
        }
        if offset < plan.start {
            return RecordOutcome::Rebuilt;
        }
        if seen_before {
            return RecordOutcome::Duplicate;
        }
        if let Err(error) = self.count(&action, plan.window_seconds) {
            return RecordOutcome::Refused(error);
        }
        self.pending_actions.push(CountedAction {
            action,
            partition: self.partition,
            offset,
        });
        RecordOutcome::Counted
    }

    /// Seals the current batch and starts the one `offset` falls in.
    fn roll(
        &mut self,
        plan: BatchPlan,
        offset: i64,
        timestamp_ms: i64,
    ) -> Result<BatchPlan, String> {
        let size = self.settings.batch_size;
        // Skip whole empty batches (offset gaps) so that `offset` falls in the new batch.
        let start = plan.end() + (offset - plan.end()) / size * size;
        let dedupe_from = self
            .dedupe
            .cut(offset, timestamp_ms, self.settings.dedupe_horizon_ms)?;
        let next = BatchPlan {
            start,
            size,
            window_seconds: self.settings.window_seconds,
            dedupe_from: dedupe_from.min(start),
        };
        let mut sealed = self.take_write(plan);
        sealed.next_plan = Some(next);
        self.sealed.push(sealed);
        self.totals.clear();
        self.daily.clear();
        self.user_days.clear();
        self.plan = Some(next);
        Ok(next)
    }

    /// Adds an action to its key's totals and to those of its rollup keys. Its numbers are in
    /// range ([`check_enriched_numbers`]), so no total of a batch can leave `Decimal(38, 12)`
    /// (`agentmeter_schemas::limits`); the sums are checked all the same, every one before any
    /// is stored, so a failed one changes nothing.
    fn count(&mut self, action: &EnrichedAction, window_seconds: u32) -> Result<(), ValueError> {
        let out_of_range = |field: &'static str| ValueError::OutOfRange {
            field: field.into(),
            value: "the window total".to_string(),
            max: "Decimal(38, 12)".to_string(),
        };
        let quantity = to_scaled_i128(action.quantity).map_err(|_| out_of_range("quantity"))?;
        let cost = to_scaled_i128(action.cost).map_err(|_| out_of_range("cost"))?;
        let raw = &action.raw;
        let occurred_seconds = raw.occurred_at_micros.div_euclid(1_000_000);
        let window = i64::from(window_seconds);
        let key = UsageKey {
            window_start_seconds: occurred_seconds - occurred_seconds.rem_euclid(window),
            workspace_id: raw.workspace_id.clone(),
            account_id: raw.account_id.clone(),
            agent_instance_id: raw.agent_instance_id.clone(),
            user_key: raw.user_key().to_string(),
            action_name: raw.action_name.clone(),
            measure: action.measure.clone(),
            tracked: action.tracked,
            outcome: action.outcome,
            currency: action.currency.clone(),
        };
        let occurred = raw.occurred_at_micros;
        // Only LLM calls' trace events are listed beside action names (Action Tagging).
        let trace_event = match raw.kind {
            ActionKind::Llm => raw.trace_event.as_deref().unwrap_or(""),
            _ => "",
        };
        let day_start_seconds = occurred_seconds - occurred_seconds.rem_euclid(86_400);
        // The rollup rows of a usage key are found once per batch and remembered with it, so a
        // key seen again costs one lookup (the rollup keys are built from the action only when
        // its usage key, or its trace event under that key, is new).
        let fine = self.totals.entry(key).or_insert_with(|| FineTotals {
            totals: UsageTotals::EMPTY,
            changed: false,
            user_day: self.user_days.slot(UserDayKey {
                day_start_seconds,
                workspace_id: raw.workspace_id.clone(),
                account_id: raw.account_id.clone(),
                user_key: raw.user_key().to_string(),
                tracked: action.tracked,
                currency: action.currency.clone(),
            }),
            daily: Vec::new(),
        });
        let daily = match fine.daily.iter().find(|(event, _)| event == trace_event) {
            Some((_, slot)) => *slot,
            None => {
                let slot = self.daily.slot(DailyKey {
                    day_start_seconds,
                    workspace_id: raw.workspace_id.clone(),
                    account_id: raw.account_id.clone(),
                    action_name: raw.action_name.clone(),
                    trace_event: trace_event.to_string(),
                    measure: action.measure.clone(),
                    tracked: action.tracked,
                    outcome: action.outcome,
                    currency: action.currency.clone(),
                });
                fine.daily.push((trace_event.to_string(), slot));
                slot
            }
        };
        let add = |before: &UsageTotals| {
            before
                .added(quantity, cost, action.outcome, occurred)
                .map_err(out_of_range)
        };
        let totals = add(&fine.totals)?;
        let daily_totals = add(self.daily.totals(daily))?;
        let user_day_totals = add(self.user_days.totals(fine.user_day))?;
        fine.totals = totals;
        fine.changed = true;
        self.daily.set(daily, daily_totals);
        self.user_days.set(fine.user_day, user_day_totals);
        Ok(())
    }

    /// The batch so far: queued actions and the keys changed since the last flush.
    fn take_write(&mut self, plan: BatchPlan) -> BatchWrite {
        let mut usage: Vec<(UsageKey, UsageTotals)> = self
            .totals
            .iter_mut()
            .filter(|(_, fine)| fine.changed)
            .map(|(key, fine)| {
                fine.changed = false;
                (key.clone(), fine.totals.clone())
            })
            .collect();
        // Sorted rows make inserts cheaper for ClickHouse and flushes reproducible in tests.
        usage.sort_unstable_by(|(a, _), (b, _)| {
            (
                a.window_start_seconds,
                &a.account_id,
                &a.user_key,
                &a.action_name,
                &a.measure,
            )
                .cmp(&(
                    b.window_start_seconds,
                    &b.account_id,
                    &b.user_key,
                    &b.action_name,
                    &b.measure,
                ))
        });
        BatchWrite {
            plan,
            end_offset: self.next_offset.max(plan.start),
            actions: std::mem::take(&mut self.pending_actions),
            usage,
            daily: self.daily.take_changed(),
            user_days: self.user_days.take_changed(),
            next_plan: None,
        }
    }

    /// Everything to make durable now, in order. After they are all written, call nothing else:
    /// the state already reflects them. If writing fails, the caller abandons this state and
    /// replays from the persisted plan.
    pub fn take_flush(&mut self) -> Vec<BatchWrite> {
        let mut writes = std::mem::take(&mut self.sealed);
        if let Some(plan) = self.plan {
            let current = self.take_write(plan);
            if !current.actions.is_empty() || !current.usage.is_empty() || writes.is_empty() {
                writes.push(current);
            }
        }
        writes
    }

    /// True when a flush would write something.
    pub fn has_unflushed(&self) -> bool {
        !self.sealed.is_empty()
            || !self.pending_actions.is_empty()
            || self.totals.values().any(|fine| fine.changed)
    }
}

impl UsageTotals {
    /// Nothing counted yet.
    const EMPTY: UsageTotals = UsageTotals {
        action_count: 0,
        quantity_scaled: 0,
        cost_scaled: 0,
        outcome_count: 0,
        first_seen_micros: i64::MAX,
        last_seen_micros: i64::MIN,
    };

    /// These totals with one more action: `Err` names the sum that would leave `i128` at
    /// scale 12.
    fn added(
        &self,
        quantity_scaled: i128,
        cost_scaled: i128,
        outcome: bool,
        occurred_micros: i64,
    ) -> Result<UsageTotals, &'static str> {
        Ok(UsageTotals {
            action_count: self.action_count + 1,
            quantity_scaled: checked_add_scaled(self.quantity_scaled, quantity_scaled)
                .ok_or("quantity")?,
            cost_scaled: checked_add_scaled(self.cost_scaled, cost_scaled).ok_or("cost")?,
            outcome_count: self.outcome_count + u64::from(outcome),
            first_seen_micros: self.first_seen_micros.min(occurred_micros),
            last_seen_micros: self.last_seen_micros.max(occurred_micros),
        })
    }
}

/// A usage key's totals in the batch, whether they changed since the last flush, and the slots
/// of its rollup keys in [`RollupTotals`]: one `users_daily` key, and one `usage_daily` key per
/// trace event seen under it (almost always one).
#[derive(Debug)]
struct FineTotals {
    totals: UsageTotals,
    changed: bool,
    user_day: usize,
    daily: Vec<(String, usize)>,
}

/// The totals of a rollup's keys in the batch, in slots, each with whether it changed since the
/// last flush (ADR 0008).
#[derive(Debug)]
struct RollupTotals<K> {
    slots: Vec<(K, UsageTotals, bool)>,
    index: HashMap<K, usize>,
}

impl<K> Default for RollupTotals<K> {
    fn default() -> Self {
        RollupTotals {
            slots: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + std::hash::Hash + Ord> RollupTotals<K> {
    /// The slot of `key`, empty when new.
    fn slot(&mut self, key: K) -> usize {
        match self.index.entry(key) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let slot = self.slots.len();
                self.slots
                    .push((entry.key().clone(), UsageTotals::EMPTY, false));
                entry.insert(slot);
                slot
            }
        }
    }

    fn totals(&self, slot: usize) -> &UsageTotals {
        &self.slots[slot].1
    }

    fn set(&mut self, slot: usize, totals: UsageTotals) {
        self.slots[slot].1 = totals;
        self.slots[slot].2 = true;
    }

    /// The keys changed since the last flush, with their totals, sorted (reproducible flushes);
    /// they are marked unchanged.
    fn take_changed(&mut self) -> Vec<(K, UsageTotals)> {
        let mut rows: Vec<(K, UsageTotals)> = self
            .slots
            .iter_mut()
            .filter(|(_, _, changed)| *changed)
            .map(|(key, totals, changed)| {
                *changed = false;
                (key.clone(), totals.clone())
            })
            .collect();
        rows.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        rows
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmeter_schemas::{CostSource, RawAction};
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;
    use std::str::FromStr;

    /// 2026-01-01T00:00:00Z: test actions happen this many seconds after the epoch and more.
    const BASE_SECONDS: i64 = 1_767_225_600;

    const SETTINGS: BatchSettings = BatchSettings {
        batch_size: 10,
        window_seconds: 60,
        dedupe_horizon_ms: 15 * 60 * 1000,
    };

    fn action(
        event_id: &str,
        user: &str,
        name: &str,
        cost: &str,
        occurred_seconds: i64,
    ) -> EnrichedAction {
        EnrichedAction {
            raw: RawAction {
                user_id: Some(user.into()),
                occurred_at_micros: (BASE_SECONDS + occurred_seconds) * 1_000_000,
                received_at_micros: (BASE_SECONDS + occurred_seconds) * 1_000_000,
                source: "rest".into(),
                ..RawAction::minimal("ws", "acc", "inst", event_id, name)
            },
            tracked: true,
            outcome: name == "object_detection",
            measure: "unit".into(),
            quantity: Decimal::ONE,
            unit_cost: Decimal::from_str(cost).unwrap(),
            cost: Decimal::from_str(cost).unwrap(),
            cost_source: CostSource::Allocated,
            currency: "USD".into(),
            config_version: 1,
            enriched_at_micros: BASE_SECONDS * 1_000_000,
        }
    }

    /// The stream of the tests: (offset, timestamp ms, action); ids repeat to make duplicates.
    fn stream() -> Vec<(i64, i64, EnrichedAction)> {
        (0..35)
            .map(|offset| {
                let event = format!("e{}", if offset % 7 == 6 { offset - 3 } else { offset });
                let user = format!("u{}", offset % 3);
                let name = if offset % 5 == 0 {
                    "object_detection"
                } else {
                    "web_search"
                };
                (
                    offset,
                    offset * 1000,
                    action(&event, &user, name, "0.25", 1_000 + offset * 13),
                )
            })
            .collect()
    }

    /// Replays flush writes into a model of the ReplacingMergeTree: highest version per key.
    #[derive(Default)]
    struct TableModel {
        usage: HashMap<(UsageKey, i64), (i64, UsageTotals)>,
        daily: HashMap<(DailyKey, i64), (i64, UsageTotals)>,
        user_days: HashMap<(UserDayKey, i64), (i64, UsageTotals)>,
        plans: HashMap<i64, (i64, BatchPlan)>,
        actions: std::collections::BTreeMap<i64, String>,
    }

    impl TableModel {
        fn apply(&mut self, writes: &[BatchWrite]) {
            self.apply_parts(writes, usize::MAX);
        }

        /// Applies the first `parts` INSERTs of a flush (5 per write: actions, usage, the two
        /// rollups, progress), as a crash in the middle of a flush leaves them.
        fn apply_parts(&mut self, writes: &[BatchWrite], parts: usize) {
            let mut applied = 0;
            for write in writes {
                if applied == parts {
                    return;
                }
                for counted in &write.actions {
                    self.actions
                        .insert(counted.offset, counted.action.raw.event_id.clone());
                }
                applied += 1;
                if applied == parts {
                    return;
                }
                replace_newest(&mut self.usage, &write.usage, write);
                applied += 1;
                if applied == parts {
                    return;
                }
                replace_newest(&mut self.daily, &write.daily, write);
                applied += 1;
                if applied == parts {
                    return;
                }
                replace_newest(&mut self.user_days, &write.user_days, write);
                applied += 1;
                if applied == parts {
                    return;
                }
                let progress = self
                    .plans
                    .entry(write.plan.start)
                    .or_insert((i64::MIN, write.plan));
                if write.end_offset >= progress.0 {
                    *progress = (write.end_offset, write.plan);
                }
                if let Some(next) = write.next_plan {
                    self.plans.entry(next.start).or_insert((next.start, next));
                }
                applied += 1;
            }
        }

        /// Whether each rollup, read as FINAL reads it, holds what grouping `usage` (read the
        /// same way) by the rollup's key gives (ADR 0008).
        fn rollups_agree_with_usage(&self) -> Result<(), String> {
            type Sums = (u64, i128, i128, u64, i64);
            fn add(sums: &mut Sums, totals: &UsageTotals) {
                sums.0 += totals.action_count;
                sums.1 += totals.quantity_scaled;
                sums.2 += totals.cost_scaled;
                sums.3 += totals.outcome_count;
                sums.4 = sums.4.max(totals.last_seen_micros);
            }
            let day = |seconds: i64| seconds - seconds.rem_euclid(86_400);
            let mut daily_from_usage: BTreeMap<_, Sums> = BTreeMap::new();
            let mut users_from_usage: BTreeMap<_, Sums> = BTreeMap::new();
            for ((key, batch), (_, totals)) in &self.usage {
                let coarse = (
                    day(key.window_start_seconds),
                    key.account_id.clone(),
                    key.action_name.clone(),
                    key.measure.clone(),
                    key.tracked,
                    key.outcome,
                    *batch,
                );
                add(daily_from_usage.entry(coarse).or_default(), totals);
                let user = (
                    day(key.window_start_seconds),
                    key.account_id.clone(),
                    key.user_key.clone(),
                    key.tracked,
                    *batch,
                );
                add(users_from_usage.entry(user).or_default(), totals);
            }
            let mut daily: BTreeMap<_, Sums> = BTreeMap::new();
            for ((key, batch), (_, totals)) in &self.daily {
                let coarse = (
                    key.day_start_seconds,
                    key.account_id.clone(),
                    key.action_name.clone(),
                    key.measure.clone(),
                    key.tracked,
                    key.outcome,
                    *batch,
                );
                add(daily.entry(coarse).or_default(), totals);
            }
            let mut users: BTreeMap<_, Sums> = BTreeMap::new();
            for ((key, batch), (_, totals)) in &self.user_days {
                let user = (
                    key.day_start_seconds,
                    key.account_id.clone(),
                    key.user_key.clone(),
                    key.tracked,
                    *batch,
                );
                add(users.entry(user).or_default(), totals);
            }
            if daily != daily_from_usage {
                return Err(format!(
                    "usage_daily {daily:?} != usage grouped {daily_from_usage:?}"
                ));
            }
            if users != users_from_usage {
                return Err(format!(
                    "users_daily {users:?} != usage grouped {users_from_usage:?}"
                ));
            }
            Ok(())
        }

        fn latest_plan(&self) -> Option<BatchPlan> {
            self.plans
                .iter()
                .max_by_key(|(start, _)| **start)
                .map(|(_, (_, plan))| *plan)
        }

        fn totals(&self) -> (u64, Decimal, u64) {
            let (count, cost_scaled, outcomes) =
                self.usage
                    .values()
                    .fold((0, 0i128, 0), |(count, cost, outcomes), (_, totals)| {
                        (
                            count + totals.action_count,
                            cost + totals.cost_scaled,
                            outcomes + totals.outcome_count,
                        )
                    });
            let cost = agentmeter_schemas::decimal::from_scaled_i128(cost_scaled).unwrap();
            (count, cost, outcomes)
        }
    }

    /// One INSERT into a `ReplacingMergeTree(version)` model: the highest version per key wins.
    fn replace_newest<K: Clone + Eq + std::hash::Hash>(
        table: &mut HashMap<(K, i64), (i64, UsageTotals)>,
        rows: &[(K, UsageTotals)],
        write: &BatchWrite,
    ) {
        for (key, totals) in rows {
            let slot = table
                .entry((key.clone(), write.plan.start))
                .or_insert((i64::MIN, totals.clone()));
            if write.end_offset >= slot.0 {
                *slot = (write.end_offset, totals.clone());
            }
        }
    }

    fn expected_totals() -> (u64, Decimal, u64) {
        let mut seen = std::collections::HashSet::new();
        let mut totals = (0u64, Decimal::ZERO, 0u64);
        for (_, _, action) in stream() {
            if seen.insert(action.raw.event_id.clone()) {
                totals.0 += 1;
                totals.1 += action.cost;
                totals.2 += u64::from(action.outcome);
            }
        }
        totals
    }

    /// Reads the stream from the persisted plan up to offset `to`, flushing every `flush_every`
    /// records; the last flush applies only `last_flush_parts` of its INSERTs (a crash).
    fn run(model: &mut TableModel, to: usize, flush_every: usize, last_flush_parts: usize) {
        let plan = model.latest_plan();
        let mut aggregator = PartitionAggregator::new(0, SETTINGS, plan);
        let start = aggregator.start_offset().unwrap_or(0) as usize;
        for (offset, timestamp, action) in stream()
            .into_iter()
            .skip(start)
            .take(to.saturating_sub(start))
        {
            aggregator.handle(offset, timestamp, action);
            if offset as usize % flush_every == flush_every - 1 {
                model.apply(&aggregator.take_flush());
            }
        }
        model.apply_parts(&aggregator.take_flush(), last_flush_parts);
    }

    #[test]
    fn counts_each_event_once_and_sums_decimals_exactly() {
        let mut model = TableModel::default();
        run(&mut model, 35, 4, usize::MAX);
        assert_eq!(model.totals(), expected_totals());
        assert_eq!(expected_totals().0, 30, "the stream holds 5 duplicates");
        assert_eq!(model.actions.len(), 30);
    }

    #[test]
    fn replays_after_crash_without_double_counting() {
        // Crash points: the process reads up to `crash_at`, flushes now and then, dies in the
        // middle of a flush after `parts` INSERTs, restarts from the persisted plan (twice, the
        // second time dying again) and reads to the end. Every crash gives the same totals.
        for crash_at in 0..35 {
            for flush_every in [1, 3, 7, 100] {
                for parts in 0..11 {
                    let mut model = TableModel::default();
                    run(&mut model, crash_at, flush_every, parts);
                    run(&mut model, (crash_at + 9).min(35), flush_every, parts / 2);
                    run(&mut model, 35, flush_every, usize::MAX);
                    assert_eq!(
                        model.totals(),
                        expected_totals(),
                        "crash at {crash_at}, flush every {flush_every}, {parts} INSERTs of the last flush"
                    );
                    assert_eq!(model.actions.len(), 30);
                    model.rollups_agree_with_usage().unwrap_or_else(|error| {
                        panic!("crash at {crash_at}, flush every {flush_every}, {parts} INSERTs: {error}")
                    });
                }
            }
        }
    }

    #[test]
    fn a_zombie_rewriting_the_same_batches_changes_nothing() {
        let mut model = TableModel::default();
        run(&mut model, 35, 5, usize::MAX);
        let before = model.totals();
        // A second member that never saw the progress re-reads everything from the start.
        let mut zombie = PartitionAggregator::new(0, SETTINGS, None);
        for (offset, timestamp, action) in stream() {
            zombie.handle(offset, timestamp, action);
        }
        model.apply(&zombie.take_flush());
        assert_eq!(model.totals(), before);
        model.rollups_agree_with_usage().unwrap();
    }

    #[test]
    fn resumed_batch_keeps_its_plan_when_settings_change() {
        let mut model = TableModel::default();
        run(&mut model, 14, 2, usize::MAX);
        let plan = model.latest_plan().unwrap();
        let changed = BatchSettings {
            batch_size: 4,
            window_seconds: 3600,
            ..SETTINGS
        };
        let mut aggregator = PartitionAggregator::new(0, changed, Some(plan));
        for (offset, timestamp, action) in stream().into_iter().skip(plan.dedupe_from as usize) {
            aggregator.handle(offset, timestamp, action);
        }
        model.apply(&aggregator.take_flush());
        assert_eq!(model.totals(), expected_totals());
        assert_eq!(model.latest_plan().unwrap().size, 4);
    }

    /// The restart store of the tests: what the journal appended, and how far it is complete.
    #[derive(Debug, Default, Clone)]
    struct StoreModel {
        observed: Vec<ObservedId>,
        complete_up_to: i64,
    }

    #[derive(Debug)]
    struct PriorInModel {
        observed: Vec<ObservedId>,
        until: i64,
    }

    impl PriorIds for PriorInModel {
        fn until(&self) -> i64 {
            self.until
        }
        fn seen(&self, id: &[u8; 16], from: i64) -> Result<bool, String> {
            Ok(self
                .observed
                .iter()
                .any(|seen| seen.id == *id && (from..self.until).contains(&seen.offset)))
        }
        fn first_at_or_after(&self, from: i64, threshold_ms: i64) -> Result<Option<i64>, String> {
            Ok(self
                .observed
                .iter()
                .filter(|seen| (from..self.until).contains(&seen.offset))
                .find(|seen| seen.timestamp_ms >= threshold_ms)
                .map(|seen| seen.offset))
        }
    }

    const SHORT_HORIZON: BatchSettings = BatchSettings {
        batch_size: 10,
        window_seconds: 60,
        dedupe_horizon_ms: 5_000,
    };

    /// 60 records a second apart; an id repeats 3 offsets later (within the 5 s horizon) or 6
    /// later (beyond it from some batch starts, within it from others).
    fn horizon_stream() -> Vec<(i64, i64, EnrichedAction)> {
        (0..60)
            .map(|offset| {
                let event = match offset % 11 {
                    4 => format!("e{}", offset - 3),
                    9 => format!("e{}", offset - 6),
                    _ => format!("e{offset}"),
                };
                (
                    offset,
                    offset * 1000,
                    action(&event, "u", "web_search", "0.5", 1_000 + offset),
                )
            })
            .collect()
    }

    /// Like `run` on `horizon_stream`, with or without the restart store; the store is written
    /// before each flush reaches the model, and a crash may come between the two. Returns
    /// where reading began.
    fn run_with_store(
        model: &mut TableModel,
        store: Option<&mut StoreModel>,
        to: usize,
        flush_every: usize,
        last_flush_parts: usize,
    ) -> i64 {
        let plan = model.latest_plan();
        let mut aggregator = PartitionAggregator::new(0, SHORT_HORIZON, plan);
        let mut store = store;
        if let (Some(store), Some(plan)) = (store.as_deref_mut(), plan) {
            aggregator = aggregator.with_journal();
            if store.complete_up_to >= plan.dedupe_from {
                let until = store.complete_up_to.clamp(plan.dedupe_from, plan.start);
                aggregator = aggregator.with_prior_ids(Box::new(PriorInModel {
                    observed: store.observed.clone(),
                    until,
                }));
            }
        } else if store.is_some() {
            aggregator = aggregator.with_journal();
        }
        let start = aggregator.start_offset().unwrap_or(0);
        let mut flush = |aggregator: &mut PartitionAggregator, model: &mut TableModel, parts| {
            if let Some(store) = store.as_deref_mut() {
                for observed in aggregator.take_journal() {
                    if !store.observed.contains(&observed) {
                        store.observed.push(observed);
                    }
                }
                store.complete_up_to = store.complete_up_to.max(aggregator.next_offset());
            }
            model.apply_parts(&aggregator.take_flush(), parts);
        };
        for (offset, timestamp, action) in horizon_stream()
            .into_iter()
            .skip(start as usize)
            .take(to.saturating_sub(start as usize))
        {
            let outcome = aggregator.handle(offset, timestamp, action);
            assert!(!matches!(outcome, RecordOutcome::PriorIdsFailed(_)));
            if offset as usize % flush_every == flush_every - 1 {
                flush(&mut aggregator, model, usize::MAX);
            }
        }
        flush(&mut aggregator, model, last_flush_parts);
        start
    }

    #[test]
    fn resuming_from_the_restart_store_decides_every_duplicate_as_a_full_re_read_does() {
        let mut reference = TableModel::default();
        run_with_store(&mut reference, None, 60, 1, usize::MAX);
        let expected = (reference.totals(), reference.actions.clone());
        // 10 duplicates; e14 again at 20 is beyond the horizon of batch 20 (dedupe_from 15).
        assert_eq!(expected.1.len(), 50);
        assert_eq!(expected.1.get(&20).map(String::as_str), Some("e14"));
        let mut resumed_past_dedupe_from = 0;
        for crash_at in 0..60 {
            for flush_every in [1, 4, 100] {
                for parts in [0, 1, 2, 4, usize::MAX] {
                    for with_store in [false, true] {
                        let mut model = TableModel::default();
                        let mut store = StoreModel::default();
                        run_with_store(
                            &mut model,
                            with_store.then_some(&mut store),
                            crash_at,
                            flush_every,
                            parts,
                        );
                        let plan = model.latest_plan();
                        let started = run_with_store(
                            &mut model,
                            with_store.then_some(&mut store),
                            60,
                            flush_every,
                            usize::MAX,
                        );
                        if plan.is_some_and(|plan| started > plan.dedupe_from) {
                            resumed_past_dedupe_from += 1;
                        }
                        assert_eq!(
                            (model.totals(), model.actions.clone()),
                            expected,
                            "crash at {crash_at}, flush every {flush_every}, {parts} parts, store {with_store}"
                        );
                    }
                }
            }
        }
        // The store shortened most restarts (not those before the first batch roll).
        assert!(resumed_past_dedupe_from > 300, "{resumed_past_dedupe_from}");
    }

    #[test]
    fn duplicates_outside_the_horizon_count_again() {
        let mut window = DedupeWindow::default();
        let id = dedupe_id("ws", "e");
        assert!(!window.observe(id, 0, 0).unwrap());
        assert!(window.observe(id, 1, 1_000).unwrap());
        let from = window.cut(2, 20 * 60 * 1000, 15 * 60 * 1000).unwrap();
        assert_eq!(from, 2);
        assert!(window.is_empty());
        assert!(!window.observe(id, 2, 20 * 60 * 1000).unwrap());
    }

    #[test]
    fn windows_follow_occurred_at_so_late_actions_land_in_old_windows() {
        let mut aggregator = PartitionAggregator::new(0, SETTINGS, None);
        aggregator.handle(0, 0, action("a", "u", "web_search", "1", 3_600));
        aggregator.handle(1, 0, action("b", "u", "web_search", "1", 59));
        let writes = aggregator.take_flush();
        let windows: Vec<i64> = writes
            .iter()
            .flat_map(|write| write.usage.iter().map(|(key, _)| key.window_start_seconds))
            .collect();
        assert_eq!(windows, vec![BASE_SECONDS, BASE_SECONDS + 3_600]);
    }

    #[test]
    fn an_out_of_range_action_is_refused_and_the_partition_goes_on() {
        let mut aggregator = PartitionAggregator::new(0, SETTINGS, None);
        let mut huge = action("huge", "u", "web_search", "1", 10);
        huge.quantity = Decimal::from_str("12345678901234567890123456").unwrap();
        assert!(matches!(
            aggregator.handle(0, 0, huge),
            RecordOutcome::Refused(ValueError::OutOfRange { .. })
        ));
        let mut negative = action("negative", "u", "web_search", "-5", 10);
        negative.raw.input_tokens = Some(-1);
        assert!(matches!(
            aggregator.handle(1, 0, negative),
            RecordOutcome::Refused(_)
        ));
        assert_eq!(
            aggregator.handle(2, 0, action("fine", "u", "web_search", "1", 10)),
            RecordOutcome::Counted
        );
        let writes = aggregator.take_flush();
        let counted: Vec<&str> = writes
            .iter()
            .flat_map(|write| &write.actions)
            .map(|counted| counted.action.raw.event_id.as_str())
            .collect();
        assert_eq!(counted, vec!["fine"]);
        assert_eq!(
            aggregator.next_offset(),
            3,
            "refused records still advance the offset"
        );
    }

    proptest::proptest! {
        /// Any mix of the extreme values the limits allow (and some beyond them), any keys,
        /// any batch size: every counted action makes a storable row, every usage total stays
        /// inside Decimal(38, 12), and only out-of-range actions are refused.
        #[test]
        fn no_accepted_input_makes_a_window_total_leave_its_column_type(
            values in proptest::collection::vec(
                (0usize..3, 0u8..6, 0u8..6, 0usize..4), 1..300),
            batch_size in 1i64..64,
        ) {
            let settings = BatchSettings { batch_size, ..SETTINGS };
            let mut aggregator = PartitionAggregator::new(0, settings, None);
            let quantities = ["0", "1", "0.000000000001", "999999999999.999999999999", "1000000000000", "1000000000000.000000000001"];
            let costs = ["0", "0.5", "999999999.999999999999", "1000000000", "1000000000.1", "-1"];
            let mut expected_refused = 0;
            let mut refused = 0;
            for (offset, (user, quantity, cost, event)) in values.into_iter().enumerate() {
                let mut candidate = action(&format!("e{offset}_{event}"), &format!("u{user}"), "scan", "0", 10);
                candidate.quantity = Decimal::from_str(quantities[quantity as usize]).unwrap();
                candidate.cost = Decimal::from_str(costs[cost as usize]).unwrap();
                let in_range = quantity < 5 && cost < 4;
                expected_refused += usize::from(!in_range);
                match aggregator.handle(offset as i64, 0, candidate) {
                    RecordOutcome::Refused(_) => refused += 1,
                    outcome => proptest::prop_assert_eq!(outcome, RecordOutcome::Counted),
                }
                if offset % 17 == 0 {
                    for write in aggregator.take_flush() {
                        check_storable(&write)?;
                    }
                }
            }
            for write in aggregator.take_flush() {
                check_storable(&write)?;
            }
            proptest::prop_assert_eq!(refused, expected_refused);
        }
    }

    fn check_storable(write: &BatchWrite) -> Result<(), proptest::test_runner::TestCaseError> {
        for counted in &write.actions {
            proptest::prop_assert!(crate::rows::ActionRow::from_counted(counted).is_ok());
        }
        for (key, totals) in &write.usage {
            let row = crate::rows::UsageRow::new(key, totals, 0, &write.plan, write.end_offset);
            let column_max = 10i128.pow(38);
            proptest::prop_assert!(row.quantity.abs() < column_max && row.cost.abs() < column_max);
            proptest::prop_assert!(row.quantity >= 0 && row.cost >= 0);
        }
        Ok(())
    }

    #[test]
    fn an_input_epoch_maps_new_kafka_offsets_above_every_old_batch() {
        let identity = InputEpoch::default();
        assert_eq!((identity.logical(7), identity.physical(7)), (Some(7), 7));
        // A topic re-created after 157,000 offsets: its offset 0 becomes logical 200,000.
        let epoch = InputEpoch {
            logical_start: 200_000,
            physical_start: 0,
        };
        assert_eq!(epoch.logical(0), Some(200_000));
        assert_eq!(epoch.physical(200_350), 350);
        // Starting at the current end skips what was already there.
        let latest = InputEpoch {
            logical_start: 200_000,
            physical_start: 350,
        };
        assert_eq!(latest.logical(349), None);
        assert_eq!(latest.logical(351), Some(200_001));
        assert_eq!(latest.physical(5), 350);
    }
}
