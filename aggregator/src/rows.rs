//! Row types of the ClickHouse tables, field for field in the column order of
//! `migrations/0001_tables.sql` (checked against the real server by the integration tests).

use agentmeter_schemas::decimal::{to_scaled_i128, DecimalError};
use serde::{Deserialize, Serialize};

use crate::state::{BatchPlan, CountedAction, DailyKey, UsageKey, UsageTotals, UserDayKey};

fn seconds(micros: i64) -> u32 {
    u32::try_from(micros.div_euclid(1_000_000)).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct ActionRow {
    pub event_id: String,
    pub workspace_id: String,
    pub account_id: String,
    pub agent_instance_id: String,
    pub kind: String,
    pub action_name: String,
    pub trace_event: String,
    pub user_id: String,
    pub anonymous_id: String,
    pub user_key: String,
    pub occurred_at: u32,
    pub occurred_at_micros: i64,
    pub received_at: u32,
    pub description: String,
    pub llm_provider: String,
    pub llm_model: String,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub reported_cost: Option<i128>,
    pub attributes_json: String,
    pub source: String,
    pub tracked: u8,
    pub outcome: u8,
    pub measure: String,
    pub quantity: i128,
    pub unit_cost: i128,
    pub cost: i128,
    pub cost_source: String,
    pub currency: String,
    pub config_version: i64,
    pub enriched_at: u32,
    pub source_partition: u32,
    pub source_offset: u64,
}

impl ActionRow {
    pub fn from_counted(counted: &CountedAction) -> Result<ActionRow, DecimalError> {
        let enriched = &counted.action;
        let raw = &enriched.raw;
        Ok(ActionRow {
            event_id: raw.event_id.clone(),
            workspace_id: raw.workspace_id.clone(),
            account_id: raw.account_id.clone(),
            agent_instance_id: raw.agent_instance_id.clone(),
            kind: raw.kind.as_str().to_string(),
            action_name: raw.action_name.clone(),
            trace_event: raw.trace_event.clone().unwrap_or_default(),
            user_id: raw.user_id.clone().unwrap_or_default(),
            anonymous_id: raw.anonymous_id.clone().unwrap_or_default(),
            user_key: raw.user_key().to_string(),
            occurred_at: seconds(raw.occurred_at_micros),
            occurred_at_micros: raw.occurred_at_micros,
            received_at: seconds(raw.received_at_micros),
            description: raw.description.clone().unwrap_or_default(),
            llm_provider: raw.llm_provider.clone().unwrap_or_default(),
            llm_model: raw.llm_model.clone().unwrap_or_default(),
            input_tokens: raw.input_tokens,
            output_tokens: raw.output_tokens,
            total_tokens: raw.total_tokens,
            reported_cost: raw.reported_cost.map(to_scaled_i128).transpose()?,
            attributes_json: raw.attributes_json.clone(),
            source: raw.source.clone(),
            tracked: u8::from(enriched.tracked),
            outcome: u8::from(enriched.outcome),
            measure: enriched.measure.clone(),
            quantity: to_scaled_i128(enriched.quantity)?,
            unit_cost: to_scaled_i128(enriched.unit_cost)?,
            cost: to_scaled_i128(enriched.cost)?,
            cost_source: enriched.cost_source.as_str().to_string(),
            currency: enriched.currency.clone(),
            config_version: enriched.config_version,
            enriched_at: seconds(enriched.enriched_at_micros),
            source_partition: counted.partition as u32,
            source_offset: counted.offset as u64,
        })
    }
}

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct UsageRow {
    pub window_start: u32,
    pub window_seconds: u32,
    pub workspace_id: String,
    pub account_id: String,
    pub agent_instance_id: String,
    pub user_key: String,
    pub action_name: String,
    pub measure: String,
    pub tracked: u8,
    pub outcome: u8,
    pub currency: String,
    pub source_partition: u32,
    pub batch_start: u64,
    pub action_count: u64,
    pub quantity: i128,
    pub cost: i128,
    pub outcome_count: u64,
    pub first_seen: u32,
    pub last_seen: u32,
    pub version: u64,
}

impl UsageRow {
    pub fn new(
        key: &UsageKey,
        totals: &UsageTotals,
        partition: i32,
        plan: &BatchPlan,
        version: i64,
    ) -> UsageRow {
        UsageRow {
            window_start: u32::try_from(key.window_start_seconds).unwrap_or(0),
            window_seconds: plan.window_seconds,
            workspace_id: key.workspace_id.clone(),
            account_id: key.account_id.clone(),
            agent_instance_id: key.agent_instance_id.clone(),
            user_key: key.user_key.clone(),
            action_name: key.action_name.clone(),
            measure: key.measure.clone(),
            tracked: u8::from(key.tracked),
            outcome: u8::from(key.outcome),
            currency: key.currency.clone(),
            source_partition: partition as u32,
            batch_start: plan.start as u64,
            action_count: totals.action_count,
            quantity: totals.quantity_scaled,
            cost: totals.cost_scaled,
            outcome_count: totals.outcome_count,
            first_seen: seconds(totals.first_seen_micros),
            last_seen: seconds(totals.last_seen_micros),
            version: version as u64,
        }
    }
}

/// One `usage_daily` row (migration 0010, ADR 0008).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct DailyRow {
    pub day: u32,
    pub workspace_id: String,
    pub account_id: String,
    pub action_name: String,
    pub trace_event: String,
    pub measure: String,
    pub tracked: u8,
    pub outcome: u8,
    pub currency: String,
    pub source_partition: u32,
    pub batch_start: u64,
    pub action_count: u64,
    pub quantity: i128,
    pub cost: i128,
    pub outcome_count: u64,
    pub last_seen: u32,
    pub version: u64,
}

impl DailyRow {
    pub fn new(
        key: &DailyKey,
        totals: &UsageTotals,
        partition: i32,
        plan: &BatchPlan,
        version: i64,
    ) -> DailyRow {
        DailyRow {
            day: u32::try_from(key.day_start_seconds).unwrap_or(0),
            workspace_id: key.workspace_id.clone(),
            account_id: key.account_id.clone(),
            action_name: key.action_name.clone(),
            trace_event: key.trace_event.clone(),
            measure: key.measure.clone(),
            tracked: u8::from(key.tracked),
            outcome: u8::from(key.outcome),
            currency: key.currency.clone(),
            source_partition: partition as u32,
            batch_start: plan.start as u64,
            action_count: totals.action_count,
            quantity: totals.quantity_scaled,
            cost: totals.cost_scaled,
            outcome_count: totals.outcome_count,
            last_seen: seconds(totals.last_seen_micros),
            version: version as u64,
        }
    }
}

/// One `users_daily` row (migration 0010, ADR 0008).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct UserDayRow {
    pub day: u32,
    pub workspace_id: String,
    pub account_id: String,
    pub user_key: String,
    pub tracked: u8,
    pub currency: String,
    pub source_partition: u32,
    pub batch_start: u64,
    pub action_count: u64,
    pub quantity: i128,
    pub cost: i128,
    pub outcome_count: u64,
    pub last_seen: u32,
    pub version: u64,
}

impl UserDayRow {
    pub fn new(
        key: &UserDayKey,
        totals: &UsageTotals,
        partition: i32,
        plan: &BatchPlan,
        version: i64,
    ) -> UserDayRow {
        UserDayRow {
            day: u32::try_from(key.day_start_seconds).unwrap_or(0),
            workspace_id: key.workspace_id.clone(),
            account_id: key.account_id.clone(),
            user_key: key.user_key.clone(),
            tracked: u8::from(key.tracked),
            currency: key.currency.clone(),
            source_partition: partition as u32,
            batch_start: plan.start as u64,
            action_count: totals.action_count,
            quantity: totals.quantity_scaled,
            cost: totals.cost_scaled,
            outcome_count: totals.outcome_count,
            last_seen: seconds(totals.last_seen_micros),
            version: version as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct ProgressRow {
    pub topic: String,
    pub source_partition: u32,
    pub batch_start: u64,
    pub batch_size: u64,
    pub window_seconds: u32,
    pub dedupe_from: u64,
    pub end_offset: u64,
    pub written_at: u32,
}

impl ProgressRow {
    pub fn new(
        topic: &str,
        partition: i32,
        plan: &BatchPlan,
        end_offset: i64,
        written_at: u32,
    ) -> ProgressRow {
        ProgressRow {
            topic: topic.to_string(),
            source_partition: partition as u32,
            batch_start: plan.start as u64,
            batch_size: plan.size as u64,
            window_seconds: plan.window_seconds,
            dedupe_from: plan.dedupe_from as u64,
            end_offset: end_offset as u64,
            written_at,
        }
    }
}

/// The latest batch plan of a partition, as read back on assignment.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct PlanRow {
    pub batch_start: u64,
    pub batch_size: u64,
    pub window_seconds: u32,
    pub dedupe_from: u64,
    pub end_offset: u64,
}

impl PlanRow {
    pub fn plan(&self) -> BatchPlan {
        BatchPlan {
            start: self.batch_start as i64,
            size: self.batch_size as i64,
            window_seconds: self.window_seconds,
            dedupe_from: self.dedupe_from as i64,
        }
    }
}

/// One input epoch (`aggregator_input_epochs`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EpochRow {
    pub topic: String,
    pub source_partition: u32,
    pub logical_start: u64,
    pub physical_start: u64,
    pub created_at: u32,
}

/// An input epoch as read back: where it starts.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EpochStartRow {
    pub logical_start: u64,
    pub physical_start: u64,
}

/// What a partition's progress has planned so far, for starting an input epoch.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct PlannedRow {
    pub planned_end: u64,
    pub batch_size: u64,
    pub window_seconds: u32,
    pub batches: u64,
}
