//! Aggregation: a sequence of arbitrary enriched actions (extreme quantities and costs, few
//! distinct keys so that totals pile up, repeated event ids, increasing offsets, small batches,
//! flushes at arbitrary points) → `PartitionAggregator::handle` / `take_flush` → the ClickHouse
//! rows (`UsageRow::new`, `ActionRow::from_counted`).
//!
//! Invariants: nothing panics; every row of every flush converts (a failing conversion is a
//! *permanent* ClickHouse error: the aggregator exits and replays into the same error after a
//! restart, stopping usage for every workspace); and the rows, read as the ReplacingMergeTree
//! reads them (highest version per key and batch), count each counted record exactly once, and
//! their quantity and cost are the *exact* sums of the counted records' (as ClickHouse adds
//! `Decimal(38, 12)`: integers scaled by 10^12, no rounding).

#![no_main]

use std::collections::{BTreeSet, HashMap};

use agentmeter_aggregator::rows::{ActionRow, UsageRow};
use agentmeter_aggregator::state::{
    BatchSettings, BatchWrite, PartitionAggregator, RecordOutcome, UsageKey,
};
use agentmeter_fuzz::structured::{edgy_i64, storable_decimal};
use agentmeter_fuzz::FIXED_NOW_MICROS;
use agentmeter_schemas::decimal::to_scaled_i128;
use agentmeter_schemas::limits::check_enriched_numbers;
use agentmeter_schemas::{
    encode_enriched_action, ActionKind, CostSource, EnrichedAction, RawAction,
};
use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;

const PARTITION: i32 = 3;

/// Whether a record was counted into usage (and queued for the `actions` table).
///
/// The one place that interprets `handle`'s answer: only `Counted` actions are in the totals.
/// A `Refused` one (out of range, dead-lettered by the stream) must have had a value out of
/// its range — checked by the caller.
fn is_counted(outcome: &RecordOutcome) -> bool {
    match outcome {
        RecordOutcome::Counted => true,
        RecordOutcome::Rebuilt
        | RecordOutcome::Duplicate
        | RecordOutcome::AlreadyHandled
        | RecordOutcome::Refused(_) => false,
        // Only a restart store answers "prior ids"; this target runs without one.
        RecordOutcome::PriorIdsFailed(error) => panic!("no restart store here, yet: {error}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(case) = Case::generate(&mut input) else {
        return;
    };
    let mut aggregator = PartitionAggregator::new(PARTITION, case.settings, None);
    let mut tables = TableModel::default();
    let mut counted = Vec::new();
    for record in case.records {
        let outcome = aggregator.handle(record.offset, record.timestamp_ms, record.action.clone());
        if let RecordOutcome::Refused(error) = &outcome {
            // Refused only for a value out of range — never for a total of valid values.
            assert!(
                check_enriched_numbers(&record.action).is_err(),
                "refused an in-range action: {error}"
            );
        }
        if is_counted(&outcome) {
            counted.push(record.action);
        }
        if record.flush_after {
            tables.apply(&aggregator.take_flush());
        }
    }
    tables.apply(&aggregator.take_flush());

    assert_eq!(
        tables.action_offsets.len(),
        counted.len(),
        "actions rows != counted records"
    );
    let rows = tables.totals();
    assert_eq!(
        rows.actions,
        counted.len() as u64,
        "usage action_count != counted records"
    );
    let outcomes = counted.iter().filter(|action| action.outcome).count() as u64;
    assert_eq!(
        rows.outcomes, outcomes,
        "usage outcome_count != counted outcomes"
    );
    // Exact sums, as ClickHouse's Decimal(38, 12) columns add them: integers scaled by 10^12.
    if let (Some(rows_quantity), Some(quantity)) = (
        rows.quantity,
        exact_sum(counted.iter().map(|action| action.quantity)),
    ) {
        assert_eq!(
            rows_quantity, quantity,
            "usage quantity != exact sum of counted quantities (×10^12)"
        );
    }
    if let (Some(rows_cost), Some(cost)) = (
        rows.cost,
        exact_sum(counted.iter().map(|action| action.cost)),
    ) {
        assert_eq!(
            rows_cost, cost,
            "usage cost != exact sum of counted costs (×10^12)"
        );
    }
});

/// The exact sum of decimals as ×10^12 integers, `None` when it leaves i128.
fn exact_sum(values: impl Iterator<Item = Decimal>) -> Option<i128> {
    values.into_iter().try_fold(0i128, |sum, value| {
        sum.checked_add(to_scaled_i128(value).expect("a decoded record's decimal fits"))
    })
}

/// What one flush sequence leaves in ClickHouse, as `FINAL` reads it.
#[derive(Default)]
struct TableModel {
    /// (usage key, batch start) → (version, row) of the highest version written.
    usage: HashMap<(UsageKey, i64), (i64, UsageRow)>,
    /// Offsets of the rows of the `actions` table.
    action_offsets: BTreeSet<i64>,
}

/// Sums over the latest version of every usage row; the decimal columns as ClickHouse holds
/// them (×10^12 integers), `None` when the sum leaves i128.
struct RowTotals {
    actions: u64,
    outcomes: u64,
    quantity: Option<i128>,
    cost: Option<i128>,
}

impl TableModel {
    /// Converts every row as `service.rs` does before its INSERTs, and records them.
    fn apply(&mut self, writes: &[BatchWrite]) {
        for write in writes {
            for counted in &write.actions {
                if let Err(error) = ActionRow::from_counted(counted) {
                    panic!(
                        "actions row of a counted record fails: {error}\n{:#?}",
                        counted.action
                    );
                }
                self.action_offsets.insert(counted.offset);
            }
            for (key, totals) in &write.usage {
                let row = UsageRow::new(key, totals, PARTITION, &write.plan, write.end_offset);
                for (column, value) in [("quantity", row.quantity), ("cost", row.cost)] {
                    assert!(
                        value.unsigned_abs() < 10u128.pow(38),
                        "usage {column} {value} does not fit Decimal(38, 12)\nkey {key:?}\ntotals {totals:?}"
                    );
                }
                let slot = self
                    .usage
                    .entry((key.clone(), write.plan.start))
                    .or_insert((i64::MIN, row.clone()));
                if write.end_offset >= slot.0 {
                    *slot = (write.end_offset, row);
                }
            }
        }
    }

    fn totals(&self) -> RowTotals {
        let mut totals = RowTotals {
            actions: 0,
            outcomes: 0,
            quantity: Some(0),
            cost: Some(0),
        };
        for (_, row) in self.usage.values() {
            totals.actions += row.action_count;
            totals.outcomes += row.outcome_count;
            totals.quantity = totals
                .quantity
                .and_then(|sum| sum.checked_add(row.quantity));
            totals.cost = totals.cost.and_then(|sum| sum.checked_add(row.cost));
        }
        totals
    }
}

struct Record {
    offset: i64,
    timestamp_ms: i64,
    action: EnrichedAction,
    flush_after: bool,
}

struct Case {
    settings: BatchSettings,
    records: Vec<Record>,
}

impl Case {
    fn generate(u: &mut Unstructured) -> Result<Case> {
        let settings = BatchSettings {
            batch_size: u.int_in_range(1..=8)?,
            window_seconds: match u.int_in_range(0u8..=4)? {
                0 => 1,
                1 => 60,
                2 => 3600,
                3 => 86_400,
                _ => u.int_in_range(1..=u32::MAX)?,
            },
            dedupe_horizon_ms: match u.int_in_range(0u8..=3)? {
                0 => 0,
                1 => 1000,
                2 => 15 * 60 * 1000,
                _ => edgy_i64(u)?.max(0),
            },
        };
        let mut offset = u.int_in_range(0..=1i64 << 40)?;
        let mut timestamp_ms = FIXED_NOW_MICROS / 1000;
        let mut records = Vec::new();
        for _ in 0..u.int_in_range(1..=48)? {
            if u.is_empty() {
                break;
            }
            let action = generate_action(u)?;
            if encode_enriched_action(&action).is_err() {
                continue; // could not have been read from actions.enriched
            }
            records.push(Record {
                offset,
                timestamp_ms,
                action,
                flush_after: u.ratio(1, 4)?,
            });
            offset += u.int_in_range(1..=3)?;
            timestamp_ms = match u.int_in_range(0u8..=7)? {
                0 => edgy_i64(u)?,
                _ => timestamp_ms.saturating_add(u.int_in_range(0..=20 * 60 * 1000)?),
            };
        }
        Ok(Case { settings, records })
    }
}

/// An enriched action from a few keys only, so that records meet in the same usage rows.
fn generate_action(u: &mut Unstructured) -> Result<EnrichedAction> {
    let (account_id, agent_instance_id) = *u.choose(&[
        ("acc_acme", "inst_acme_research"),
        ("acc_globex", "inst_globex_support"),
    ])?;
    let tracked = u.ratio(7, 8)?;
    let outcome = tracked && bool::arbitrary(u)?;
    let occurred_at_micros = match u.int_in_range(0u8..=7)? {
        0 => edgy_i64(u)?,
        _ => FIXED_NOW_MICROS - u.int_in_range(0..=2 * 3_600_000_000)?,
    };
    let optional = |u: &mut Unstructured| -> Result<Option<i64>> {
        Ok(if u.ratio(1, 4)? {
            Some(edgy_i64(u)?)
        } else {
            None
        })
    };
    let raw = RawAction {
        event_id: format!("e{}", u.int_in_range(0u8..=7)?),
        workspace_id: u.choose(&["ws_demo", "ws_other"])?.to_string(),
        account_id: account_id.into(),
        agent_instance_id: agent_instance_id.into(),
        kind: ActionKind::Action,
        action_name: u
            .choose(&["web_search", "llm_call", "gemini_llm_gemini-2.5-flash"])?
            .to_string(),
        trace_event: None,
        user_id: u
            .choose(&[Some("u1"), Some("u2"), None])?
            .map(str::to_string),
        anonymous_id: Some("anon".into()),
        occurred_at_micros,
        received_at_micros: occurred_at_micros,
        description: None,
        llm_provider: None,
        llm_model: None,
        input_tokens: optional(u)?,
        output_tokens: optional(u)?,
        total_tokens: optional(u)?,
        reported_cost: if u.ratio(1, 4)? {
            Some(storable_decimal(u)?)
        } else {
            None
        },
        attributes_json: "{}".into(),
        source: "rest".into(),
        outcome_value: None,
    };
    Ok(EnrichedAction {
        raw,
        tracked,
        outcome,
        measure: u.choose(&["unit", "token", ""])?.to_string(),
        quantity: storable_decimal(u)?,
        unit_cost: storable_decimal(u)?,
        cost: storable_decimal(u)?,
        cost_source: *u.choose(&[
            CostSource::Allocated,
            CostSource::Reported,
            CostSource::None,
        ])?,
        currency: u.choose(&["USD", "EUR"])?.to_string(),
        config_version: 1,
        enriched_at_micros: FIXED_NOW_MICROS,
    })
}
