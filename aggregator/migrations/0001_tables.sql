-- agentmeter tables. `{database}` is replaced by the configured database name.
-- Runs on ClickHouse 18.16 (Debian) and current ClickHouse: no LowCardinality, Map, DateTime64,
-- JSONExtract*, TTL or CODEC.

-- Every enriched action (tracked or not), for Live Data and audit. The aggregator writes each
-- event once per dedupe horizon; a replay writes identical rows, which the engine collapses.
CREATE TABLE IF NOT EXISTS {database}.actions
(
    event_id String,
    workspace_id String,
    account_id String,
    agent_instance_id String,
    kind String,
    action_name String,
    trace_event String,
    user_id String,
    anonymous_id String,
    user_key String,
    occurred_at DateTime('UTC'),
    occurred_at_micros Int64,
    received_at DateTime('UTC'),
    description String,
    llm_provider String,
    llm_model String,
    input_tokens Nullable(Int64),
    output_tokens Nullable(Int64),
    total_tokens Nullable(Int64),
    reported_cost Nullable(Decimal(38, 12)),
    attributes_json String,
    source String,
    tracked UInt8,
    outcome UInt8,
    measure String,
    quantity Decimal(38, 12),
    unit_cost Decimal(38, 12),
    cost Decimal(38, 12),
    cost_source String,
    currency String,
    config_version Int64,
    enriched_at DateTime('UTC'),
    source_partition UInt32,
    source_offset UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (workspace_id, account_id, occurred_at, event_id, source_partition, source_offset);

-- Windowed usage. One row per window and dimensions *per input batch* (source_partition,
-- batch_start), holding the batch's cumulative totals up to offset `version`; the highest version
-- of a key wins (read with FINAL). Sum over batches for totals: the views below do.
CREATE TABLE IF NOT EXISTS {database}.usage
(
    window_start DateTime('UTC'),
    window_seconds UInt32,
    workspace_id String,
    account_id String,
    agent_instance_id String,
    user_key String,
    action_name String,
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
    first_seen DateTime('UTC'),
    last_seen DateTime('UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (workspace_id, account_id, window_start, agent_instance_id, user_key, action_name, measure, tracked, outcome, currency, source_partition, batch_start);

-- The aggregator's progress, written with the data it covers: per input partition and batch, the
-- batch plan and the offset reached. On partition assignment the aggregator resumes the latest
-- batch from here; Kafka's committed offsets are only a hint for lag monitoring.
CREATE TABLE IF NOT EXISTS {database}.aggregator_progress
(
    topic String,
    source_partition UInt32,
    batch_start UInt64,
    batch_size UInt64,
    window_seconds UInt32,
    dedupe_from UInt64,
    end_offset UInt64,
    written_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(end_offset)
ORDER BY (topic, source_partition, batch_start);
