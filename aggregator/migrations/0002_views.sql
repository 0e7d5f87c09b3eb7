-- Views analysts and billing read (documented in docs/sql.md). They read only exact data: the
-- usage table through FINAL (highest version per key), summed over input batches.

CREATE VIEW IF NOT EXISTS {database}.usage_exact AS
SELECT
    window_start, window_seconds, workspace_id, account_id, agent_instance_id, user_key,
    action_name, measure, tracked, outcome, currency, source_partition, batch_start,
    action_count, quantity, cost, outcome_count, first_seen, last_seen
FROM {database}.usage FINAL;

-- Billable usage per account per day (tracked actions only).
CREATE VIEW IF NOT EXISTS {database}.usage_by_account_day AS
SELECT
    workspace_id, account_id, toDate(window_start) AS day, action_name, measure, currency,
    sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
    sum(outcome_count) AS outcomes
FROM {database}.usage_exact
WHERE tracked = 1
GROUP BY workspace_id, account_id, day, action_name, measure, currency;

-- Billable usage per account per calendar month (UTC).
CREATE VIEW IF NOT EXISTS {database}.usage_by_account_month AS
SELECT
    workspace_id, account_id, toStartOfMonth(window_start) AS month, action_name, measure, currency,
    sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
    sum(outcome_count) AS outcomes
FROM {database}.usage_exact
WHERE tracked = 1
GROUP BY workspace_id, account_id, month, action_name, measure, currency;

-- Billable usage per end user (user_id, else anonymous_id) per day.
CREATE VIEW IF NOT EXISTS {database}.usage_by_user_day AS
SELECT
    workspace_id, account_id, user_key, toDate(window_start) AS day, action_name, currency,
    sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
    sum(outcome_count) AS outcomes
FROM {database}.usage_exact
WHERE tracked = 1
GROUP BY workspace_id, account_id, user_key, day, action_name, currency;

-- Outcomes (@outcome) per account per day.
CREATE VIEW IF NOT EXISTS {database}.outcomes_by_account_day AS
SELECT
    workspace_id, account_id, toDate(window_start) AS day, action_name,
    sum(outcome_count) AS outcomes, sum(cost) AS cost
FROM {database}.usage_exact
WHERE tracked = 1 AND outcome = 1
GROUP BY workspace_id, account_id, day, action_name;

-- @user: distinct end users with at least one billable action, per account per calendar month.
CREATE VIEW IF NOT EXISTS {database}.users_by_account_month AS
SELECT
    workspace_id, account_id, toStartOfMonth(window_start) AS month,
    uniqExact(user_key) AS users
FROM {database}.usage_exact
WHERE tracked = 1 AND user_key != ''
GROUP BY workspace_id, account_id, month;

-- @seat: per account and day D, the distinct end users active in the 30 days up to D
-- (D-29 .. D, UTC). Each active user-day counts toward the 30 days that follow it.
CREATE VIEW IF NOT EXISTS {database}.seats_by_account_day AS
SELECT
    workspace_id, account_id, as_of AS day, uniqExact(user_key) AS seats
FROM
(
    SELECT workspace_id, account_id, user_key, toDate(window_start) + arrayJoin(range(30)) AS as_of
    FROM {database}.usage_exact
    WHERE tracked = 1 AND user_key != ''
    GROUP BY workspace_id, account_id, user_key, toDate(window_start)
)
GROUP BY workspace_id, account_id, as_of;

-- Cost per account per calendar month, and its split by where the cost came from.
CREATE VIEW IF NOT EXISTS {database}.cost_by_account_month AS
SELECT
    workspace_id, account_id, toStartOfMonth(window_start) AS month, currency,
    sum(action_count) AS actions, sum(outcome_count) AS outcomes, sum(cost) AS cost
FROM {database}.usage_exact
WHERE tracked = 1
GROUP BY workspace_id, account_id, month, currency;

-- Live Data, with the columns the product shows, newest first per workspace.
CREATE VIEW IF NOT EXISTS {database}.live_data AS
SELECT
    workspace_id, account_id, agent_instance_id, event_id,
    occurred_at AS created_at,
    if(outcome = 1, '@outcome', if(tracked = 1, '@action', '-')) AS measure,
    if(kind = 'llm', action_name, '-') AS tag,
    action_name AS value_action_name,
    attributes_json AS value_action_user_attributes,
    user_key, tracked, outcome, quantity, cost, currency
FROM {database}.actions FINAL;
