-- usage_by_user_day grouped by measure too. In 0002 it summed the quantity of one action over
-- measures: after a configuration change re-priced an action by another measure (say `token`, then
-- `output_token`) on the same day, a user's quantity added tokens of both kinds. Costs were right.
-- Same columns as before plus `measure` after `action_name`, as in usage_by_account_day.
--
-- 18.16 has no CREATE OR REPLACE VIEW: the view is dropped and created again (both statements can
-- run again); queries on it fail with "doesn't exist" for that moment while `agentmeter migrate` runs.

DROP TABLE IF EXISTS {database}.usage_by_user_day;

CREATE VIEW IF NOT EXISTS {database}.usage_by_user_day AS
SELECT
    workspace_id, account_id, user_key, toDate(window_start) AS day, action_name, measure, currency,
    sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
    sum(outcome_count) AS outcomes
FROM {database}.usage_exact
WHERE tracked = 1
GROUP BY workspace_id, account_id, user_key, day, action_name, measure, currency;
