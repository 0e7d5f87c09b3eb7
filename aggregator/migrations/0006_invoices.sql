-- Finalized invoices (docs/adr/0004-exactly-once-invoices.md): the projection of the
-- finalization log, the single-partition topic `<prefix>billing.finalizations`.
--
-- A row is a function of the log alone — the invoice's content is frozen in its finalization
-- record, its number is its position among the workspace's winning records — so re-projecting
-- writes identical rows, and `version` (the log offset of the last record that changed the
-- invoice: its finalization, or its void) keeps the newest state. Read it through FINAL.
-- Amounts are exact: `total` is the invoice's total, `content` the whole invoice as JSON.
CREATE TABLE IF NOT EXISTS {database}.invoices
(
    workspace_id String,
    invoice_id String,
    number UInt64,
    status String,
    account_id String,
    subscription_id String,
    period_start DateTime('UTC'),
    period_end DateTime('UTC'),
    currency String,
    total Decimal(38, 12),
    config_version UInt64,
    finalized_at DateTime('UTC'),
    void_reason String,
    content String,
    log_offset UInt64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (workspace_id, invoice_id);
