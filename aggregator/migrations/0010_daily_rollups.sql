-- Daily rollups the aggregator keeps beside `usage`, exact like it (ADR 0008): one row per UTC
-- day and coarse dimensions *per input batch* (source_partition, batch_start), versioned by the
-- offset after the last record read, so a replayed batch rewrites identical rows and FINAL keeps
-- each key's newest total. The console reads them with FINAL and a PREWHERE on sorting-key
-- columns only (docs/sql.md).
CREATE TABLE IF NOT EXISTS {database}.usage_daily
(
    day DateTime('UTC'),
    workspace_id String,
    account_id String,
    action_name String,
    trace_event String,
    measure String,
    tracked UInt8,
    outcome UInt8,
    currency String,
    source_partition UInt32,
    batch_start UInt64,
    action_count UInt64,
    quantity Decimal(38, 12),
    cost Decimal(38, 12),
    outcome_count UInt64,
    last_seen DateTime('UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (workspace_id, account_id, day, tracked, action_name, trace_event, measure, outcome, currency, source_partition, batch_start);

CREATE TABLE IF NOT EXISTS {database}.users_daily
(
    day DateTime('UTC'),
    workspace_id String,
    account_id String,
    user_key String,
    tracked UInt8,
    currency String,
    source_partition UInt32,
    batch_start UInt64,
    action_count UInt64,
    quantity Decimal(38, 12),
    cost Decimal(38, 12),
    outcome_count UInt64,
    last_seen DateTime('UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (workspace_id, account_id, day, tracked, user_key, currency, source_partition, batch_start);

-- The batches written before this migration, from `usage FINAL`: per rollup key and batch, the
-- sum of the newest usage rows with the highest of their versions — the row the aggregator would
-- have written at that version (a usage key is written only when it changes). The batch each
-- partition is in is left out: an aggregator resuming it counts it again from its start and
-- writes its rollups itself. `usage` has no trace event, so these rows have none (the Action
-- Tagging tab discovers trace events from the actions counted after the upgrade). Running this
-- again writes identical rows with identical versions.
INSERT INTO {database}.usage_daily
SELECT toStartOfDay(window_start) AS day_start, workspace_id, account_id, action_name, '' AS trace_event,
       measure, tracked, outcome, currency, source_partition, batch_start,
       sum(action_count), sum(quantity), sum(cost), sum(outcome_count), max(last_seen), max(version)
FROM {database}.usage FINAL
WHERE source_partition != 4294967295
  AND (source_partition, batch_start) NOT IN
      (SELECT source_partition, max(batch_start) FROM {database}.aggregator_progress GROUP BY source_partition)
GROUP BY day_start, workspace_id, account_id, action_name, measure, tracked, outcome, currency, source_partition, batch_start;

INSERT INTO {database}.users_daily
SELECT toStartOfDay(window_start) AS day_start, workspace_id, account_id, user_key, tracked, currency,
       source_partition, batch_start,
       sum(action_count), sum(quantity), sum(cost), sum(outcome_count), max(last_seen), max(version)
FROM {database}.usage FINAL
WHERE source_partition != 4294967295
  AND (source_partition, batch_start) NOT IN
      (SELECT source_partition, max(batch_start) FROM {database}.aggregator_progress GROUP BY source_partition)
GROUP BY day_start, workspace_id, account_id, user_key, tracked, currency, source_partition, batch_start;
