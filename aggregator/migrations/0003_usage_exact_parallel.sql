-- usage_exact read as two parallel FINAL scans on ClickHouse 18.16. Same columns, types and rows as
-- in 0002. Every usage view built on it (usage_by_account_day/_month, usage_by_user_day,
-- outcomes_by_account_day, users_by_account_month, seats_by_account_day, cost_by_account_month)
-- looks it up by name when it runs, so they all get faster without being recreated.
--
-- Why: ClickHouse before 22 reads `usage FINAL` as one merging stream, on one core. On 18.16 the
-- FINAL merge is most of the time of a view over the whole table (bench/README.md, "Monthly view").
-- Here each branch is its own FINAL scan, and UNION ALL runs the branches in parallel. Servers from
-- 22 on (FINAL reads became parallel by key ranges in the 22.x series, ClickHouse PR 36396) get all
-- rows from the first branch and nothing from the second: there the split only cost 10-45%
-- (measured on 26.9). Only 18.16 and 26.9 were measured; for any version the result is the same.
--
-- Why it stays exact: the branches split the rows by the UTC day of month of `window_start`,
-- days 1-15 and days 16-31. Branch 1 keeps (day <= 15 OR new server); branch 2 keeps
-- (day >= 16 AND old server). For either server version every row goes to exactly one branch.
-- `window_start` is part of the sorting key, so all versions of a key have the same day and go to
-- the same branch, where FINAL keeps the highest version as before. The filter is a PREWHERE:
-- it drops rows before FINAL merges them. That is safe only because it uses a sorting-key column
-- (a PREWHERE on a non-key column can bring back an outdated version, docs/sql.md). A PREWHERE
-- also keeps the split cheap when many small accounts leave no whole granule to skip.
--
-- 18.16 has no CREATE OR REPLACE VIEW, so the view is dropped and created again. Both statements
-- can be run again. Queries on the usage views fail with "doesn't exist" for the moment between
-- them, while `agentmeter migrate` runs.

DROP TABLE IF EXISTS {database}.usage_exact;

CREATE VIEW IF NOT EXISTS {database}.usage_exact AS
SELECT
    window_start, window_seconds, workspace_id, account_id, agent_instance_id, user_key,
    action_name, measure, tracked, outcome, currency, source_partition, batch_start,
    action_count, quantity, cost, outcome_count, first_seen, last_seen
FROM {database}.usage FINAL
PREWHERE toDayOfMonth(window_start) <= 15
    OR NOT (toUInt32OrZero(splitByChar('.', version())[1]) < 22)
UNION ALL
SELECT
    window_start, window_seconds, workspace_id, account_id, agent_instance_id, user_key,
    action_name, measure, tracked, outcome, currency, source_partition, batch_start,
    action_count, quantity, cost, outcome_count, first_seen, last_seen
FROM {database}.usage FINAL
PREWHERE toDayOfMonth(window_start) >= 16
    AND toUInt32OrZero(splitByChar('.', version())[1]) < 22;
