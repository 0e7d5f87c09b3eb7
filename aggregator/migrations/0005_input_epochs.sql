-- Input epochs: how the Kafka offsets of an input partition map to the aggregator's logical
-- offsets (the offsets of aggregator_progress and of the usage rows' batch_start).
--
-- A topic that was deleted and re-created, restored from an older backup, or read from another
-- cluster starts over at offsets the aggregator has already counted. The aggregator then stops
-- reading that partition and says so (`/readyz`, `agentmeter_aggregator_input_reset`), until an
-- operator runs `agentmeter reset-input`, which starts a new epoch here: Kafka offset
-- `physical_start` becomes logical offset `logical_start`, a batch boundary above every batch
-- of the partition already planned, so new records can never collide with the rows of the old
-- ones. A partition without a row here reads logical = Kafka offset.
CREATE TABLE IF NOT EXISTS {database}.aggregator_input_epochs
(
    topic String,
    source_partition UInt32,
    logical_start UInt64,
    physical_start UInt64,
    created_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(created_at)
ORDER BY (topic, source_partition, logical_start);
