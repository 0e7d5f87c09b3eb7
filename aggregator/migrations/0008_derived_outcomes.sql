-- Composite outcomes derived by `agentmeter outcomes` (ADR 0005, section 3).
--
-- A firing is an `actions` row of kind `derived_outcome` under source partition 4294967295 (no
-- topic has it), with `source_offset` = its context's 64-bit id; a firing that a later
-- derivation no longer produces is written again under the same sorting key with kind
-- `retracted_outcome`, and `actions FINAL` keeps the last write. Its usage rows are `usage` rows
-- of the same source partition with `batch_start` = the context id, versioned by the snapshot
-- (the sum of the aggregator's progress offsets), so `usage FINAL` and every view built on it
-- count the current firings of every context.

-- The snapshot the stage finished last: one row per input partition (`key` = `partition:N`,
-- `value` = the aggregator's progress offset it derived up to) and per workspace
-- (`key` = `workspace:ID`, `value` = the fingerprint of its composite definitions), all written
-- in one INSERT after the rows they cover. `generation` counts definition changes.
CREATE TABLE IF NOT EXISTS {database}.outcomes_progress
(
    topic String,
    key String,
    value UInt64,
    snapshot_version UInt64,
    written_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(snapshot_version)
ORDER BY (topic, key);

-- Live Data leaves retracted firings out. 18.16 has no CREATE OR REPLACE VIEW: dropped and
-- created again (both statements can run again).
DROP TABLE IF EXISTS {database}.live_data;

CREATE VIEW IF NOT EXISTS {database}.live_data AS
SELECT
    workspace_id, account_id, agent_instance_id, event_id,
    occurred_at AS created_at,
    if(outcome = 1, '@outcome', if(tracked = 1, '@action', '-')) AS measure,
    if(kind = 'llm', action_name, '-') AS tag,
    action_name AS value_action_name,
    attributes_json AS value_action_user_attributes,
    user_key, tracked, outcome, quantity, cost, currency
FROM {database}.actions FINAL
WHERE kind != 'retracted_outcome';
