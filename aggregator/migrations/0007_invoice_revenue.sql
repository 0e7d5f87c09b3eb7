-- Revenue, cost and margin columns on `invoices` (product, rate plan, agent type, cost, cost
-- currency, margin; see 0006 and docs/sql.md).
--
-- `invoices` is a projection of the finalization log (ADR 0004), nothing else writes it, and
-- ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`: the table is re-created, and the next
-- projection (`agentmeter invoices finalize | list | show | void`, or the `billing` stage)
-- writes every invoice again from the log, byte for byte what it would have been.
DROP TABLE IF EXISTS {database}.invoices;

CREATE TABLE IF NOT EXISTS {database}.invoices
(
    workspace_id String,
    invoice_id String,
    number UInt64,
    status String,
    account_id String,
    subscription_id String,
    product String,
    rate_plan String,
    agent_type String,
    period_start DateTime('UTC'),
    period_end DateTime('UTC'),
    currency String,
    total Decimal(38, 12),
    cost Decimal(38, 12),
    cost_currency String,
    margin Nullable(Decimal(38, 12)),
    config_version UInt64,
    finalized_at DateTime('UTC'),
    void_reason String,
    content String,
    log_offset UInt64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (workspace_id, invoice_id);
