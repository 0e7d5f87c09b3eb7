-- The audit log of configuration changes (docs/console.md): one row per published version of a
-- workspace's configuration, copied by `agentmeter console` from the version's change note (who
-- and what, carried in the config record itself). Copying a version twice writes an identical
-- row, which the engine collapses; read with FINAL.
CREATE TABLE IF NOT EXISTS {database}.config_audit
(
    workspace_id String,
    version Int64,
    applied_at DateTime('UTC'),
    changed_by String,
    summary_json String
)
ENGINE = ReplacingMergeTree
ORDER BY (workspace_id, version);
