//! The ClickHouse side of the aggregator: writing a [`BatchWrite`] in its safe order, reading
//! back a partition's plan, and the retry rules.
//!
//! Order of one batch's INSERTs: `actions`, then `usage`, then the rollups `usage_daily` and
//! `users_daily` (ADR 0008), then `aggregator_progress` (this batch's offset reached, and the next
//! batch's plan). A crash between any two leaves rows that a replay
//! rewrites identically or supersedes; progress never claims data that is not written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentmeter_runtime::shutdown::Shutdown;

use crate::config::ClickHouseSettings;
use crate::rows::{
    ActionRow, DailyRow, EpochRow, EpochStartRow, PlanRow, PlannedRow, ProgressRow, UsageRow,
    UserDayRow,
};
use crate::state::{BatchPlan, BatchSettings, BatchWrite, InputEpoch};
use crate::telemetry::{emit, ClickHouseRetried};

/// Whether a failed ClickHouse call may succeed if tried again.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// Network trouble, timeouts, overload, server restarts: retry with backoff.
    #[error("ClickHouse unavailable (will retry): {0}")]
    Retriable(String),
    /// The schema or the data is wrong; retrying cannot help. The stage stops.
    #[error("ClickHouse rejected the write (permanent): {0}")]
    Permanent(String),
}

impl ClickHouseError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, ClickHouseError::Retriable(_))
    }
}

/// ClickHouse error codes that no retry can fix: schema, syntax, types, data, auth.
const PERMANENT_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA (row type mismatch)
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// Sorts a client error into retriable or permanent.
pub fn classify(error: clickhouse::error::Error) -> ClickHouseError {
    use clickhouse::error::Error;
    let text = error.to_string();
    match &error {
        Error::Network(_) | Error::TimedOut => ClickHouseError::Retriable(text),
        Error::BadResponse(message) => match error_code(message) {
            Some(code) if PERMANENT_CODES.contains(&code) => ClickHouseError::Permanent(text),
            _ => ClickHouseError::Retriable(text),
        },
        _ => ClickHouseError::Permanent(text),
    }
}

/// The `Code: N` of a ClickHouse exception message.
fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Writes batches and reads plans in one database.
#[derive(Clone)]
pub struct ClickHouseService {
    client: clickhouse::Client,
    database: String,
    topic: String,
}

impl ClickHouseService {
    /// The database the tables are in.
    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn new(settings: &ClickHouseSettings, topic: &str) -> ClickHouseService {
        ClickHouseService {
            // Inserts name bare tables (the crate quotes `db.table` as one identifier).
            client: settings.client().with_database(&settings.database),
            database: settings.database.clone(),
            topic: topic.to_string(),
        }
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{}", self.database, name)
    }

    /// One INSERT of `rows` into `table` (none when there are no rows).
    async fn insert_all<R>(
        &self,
        table: &str,
        rows: impl ExactSizeIterator<Item = R>,
    ) -> Result<(), ClickHouseError>
    where
        R: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.len() == 0 {
            return Ok(());
        }
        let mut insert = self.client.insert::<R>(table).await.map_err(classify)?;
        for row in rows {
            insert.write(&row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }

    /// Makes one batch write durable, in the safe order.
    pub async fn write(&self, partition: i32, write: &BatchWrite) -> Result<(), ClickHouseError> {
        if !write.actions.is_empty() {
            let mut insert = self
                .client
                .insert::<ActionRow>("actions")
                .await
                .map_err(classify)?;
            for counted in &write.actions {
                // Cannot fail: the aggregator counts only actions whose numbers are in range
                // (`check_enriched_numbers`), and every range fits Decimal(38, 12).
                let row = ActionRow::from_counted(counted)
                    .map_err(|error| ClickHouseError::Permanent(error.to_string()))?;
                insert.write(&row).await.map_err(classify)?;
            }
            insert.end().await.map_err(classify)?;
        }
        let version = write.end_offset;
        self.insert_all(
            "usage",
            write
                .usage
                .iter()
                .map(|(key, totals)| UsageRow::new(key, totals, partition, &write.plan, version)),
        )
        .await?;
        self.insert_all(
            "usage_daily",
            write
                .daily
                .iter()
                .map(|(key, totals)| DailyRow::new(key, totals, partition, &write.plan, version)),
        )
        .await?;
        self.insert_all(
            "users_daily",
            write
                .user_days
                .iter()
                .map(|(key, totals)| UserDayRow::new(key, totals, partition, &write.plan, version)),
        )
        .await?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
        let mut insert = self
            .client
            .insert::<ProgressRow>("aggregator_progress")
            .await
            .map_err(classify)?;
        insert
            .write(&ProgressRow::new(
                &self.topic,
                partition,
                &write.plan,
                write.end_offset,
                now,
            ))
            .await
            .map_err(classify)?;
        if let Some(next) = &write.next_plan {
            insert
                .write(&ProgressRow::new(
                    &self.topic,
                    partition,
                    next,
                    next.start,
                    now,
                ))
                .await
                .map_err(classify)?;
        }
        insert.end().await.map_err(classify)?;
        Ok(())
    }

    /// The latest batch plan of a partition, if it has any progress.
    pub async fn load_plan(&self, partition: i32) -> Result<Option<BatchPlan>, ClickHouseError> {
        Ok(self.load_resume(partition).await?.map(|(plan, _)| plan))
    }

    /// The latest batch plan of a partition and the logical offset its progress reached.
    pub async fn load_resume(
        &self,
        partition: i32,
    ) -> Result<Option<(BatchPlan, i64)>, ClickHouseError> {
        let query = format!(
            "SELECT batch_start, argMax(batch_size, end_offset), argMax(window_seconds, end_offset), \
             argMax(dedupe_from, end_offset), max(end_offset) \
             FROM {} WHERE topic = ? AND source_partition = ? \
             GROUP BY batch_start ORDER BY batch_start DESC LIMIT 1",
            self.table("aggregator_progress")
        );
        let rows = self
            .client
            .query(&query)
            .bind(&self.topic)
            .bind(partition as u32)
            .fetch_all::<PlanRow>()
            .await
            .map_err(classify)?;
        Ok(rows.first().map(|row| (row.plan(), row.end_offset as i64)))
    }

    /// The current input epoch of a partition (identity when none was started).
    pub async fn load_epoch(&self, partition: i32) -> Result<InputEpoch, ClickHouseError> {
        let query = format!(
            "SELECT logical_start, physical_start FROM {} WHERE topic = ? AND source_partition = ? \
             ORDER BY logical_start DESC LIMIT 1",
            self.table("aggregator_input_epochs")
        );
        let rows = self
            .client
            .query(&query)
            .bind(&self.topic)
            .bind(partition as u32)
            .fetch_all::<EpochStartRow>()
            .await
            .map_err(classify)?;
        Ok(rows
            .first()
            .map(|row| InputEpoch {
                logical_start: row.logical_start as i64,
                physical_start: row.physical_start as i64,
            })
            .unwrap_or_default())
    }

    /// Starts a new input epoch of a partition at Kafka offset `physical_start`: its logical
    /// start is the end of the highest batch ever planned for the partition, so no usage row or
    /// progress row of the new epoch can share a key with an old one. The epoch's first batch
    /// plan is written before the epoch itself, so a reader that sees the epoch sees its plan.
    pub async fn start_epoch(
        &self,
        partition: i32,
        physical_start: i64,
        default_settings: BatchSettings,
    ) -> Result<InputEpoch, ClickHouseError> {
        let query = format!(
            "SELECT max(batch_start + batch_size) AS planned_end, argMax(batch_size, batch_start) AS last_batch_size, \
             argMax(window_seconds, batch_start) AS last_window_seconds, count() AS batches \
             FROM {} WHERE topic = ? AND source_partition = ?",
            self.table("aggregator_progress")
        );
        let planned = self
            .client
            .query(&query)
            .bind(&self.topic)
            .bind(partition as u32)
            .fetch_one::<PlannedRow>()
            .await
            .map_err(classify)?;
        let epoch = InputEpoch {
            logical_start: planned.planned_end as i64,
            physical_start,
        };
        let plan = BatchPlan {
            start: epoch.logical_start,
            size: if planned.batches > 0 {
                planned.batch_size as i64
            } else {
                default_settings.batch_size
            },
            window_seconds: if planned.batches > 0 {
                planned.window_seconds
            } else {
                default_settings.window_seconds
            },
            dedupe_from: epoch.logical_start,
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
        let mut insert = self
            .client
            .insert::<ProgressRow>("aggregator_progress")
            .await
            .map_err(classify)?;
        insert
            .write(&ProgressRow::new(
                &self.topic,
                partition,
                &plan,
                plan.start,
                now,
            ))
            .await
            .map_err(classify)?;
        insert.end().await.map_err(classify)?;
        let mut insert = self
            .client
            .insert::<EpochRow>("aggregator_input_epochs")
            .await
            .map_err(classify)?;
        insert
            .write(&EpochRow {
                topic: self.topic.clone(),
                source_partition: partition as u32,
                logical_start: epoch.logical_start as u64,
                physical_start: epoch.physical_start as u64,
                created_at: now,
            })
            .await
            .map_err(classify)?;
        insert.end().await.map_err(classify)?;
        Ok(epoch)
    }

    /// Runs a statement (migrations, tests).
    pub async fn execute(&self, statement: &str) -> Result<(), ClickHouseError> {
        self.client
            .query(statement)
            .execute()
            .await
            .map_err(classify)
    }
}

/// The ClickHouse side of the aggregator's thread: the service, the runtime its futures run on,
/// the retry rule (retriable errors back off and retry until shutdown; a permanent one gives
/// up), and the health `/readyz` shows.
pub struct ClickHouseWriter {
    service: ClickHouseService,
    runtime: tokio::runtime::Runtime,
    initial_backoff: Duration,
    max_backoff: Duration,
    healthy: Arc<AtomicBool>,
    shutdown: Shutdown,
}

/// Why a ClickHouse call was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaveUp {
    /// ClickHouse refused it for good (e.g. the schema); the message names the call.
    Permanent(String),
    /// Shutdown was requested while it was failing; the next start replays it.
    Shutdown,
}

impl ClickHouseWriter {
    pub fn new(
        service: ClickHouseService,
        initial_backoff: Duration,
        max_backoff: Duration,
        healthy: Arc<AtomicBool>,
        shutdown: Shutdown,
    ) -> std::io::Result<ClickHouseWriter> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ClickHouseWriter {
            service,
            runtime,
            initial_backoff,
            max_backoff,
            healthy,
            shutdown,
        })
    }

    /// Runs `call` until it succeeds, fails permanently, or shutdown is requested.
    pub fn call<T>(
        &self,
        what: &str,
        mut call: impl FnMut(&ClickHouseService, &tokio::runtime::Runtime) -> Result<T, ClickHouseError>,
    ) -> Result<T, GaveUp> {
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        loop {
            match call(&self.service, &self.runtime) {
                Ok(value) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(error @ ClickHouseError::Permanent(_)) => {
                    tracing::error!(%error, "{what} failed permanently; stopping");
                    return Err(GaveUp::Permanent(format!("{what}: {error}")));
                }
                Err(error) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    if self.shutdown.is_requested() {
                        tracing::warn!(%error, "{what} abandoned at shutdown; the next start replays it");
                        return Err(GaveUp::Shutdown);
                    }
                    let delay = backoff.next_delay();
                    emit(ClickHouseRetried {
                        what,
                        error: &error,
                        delay,
                    });
                    std::thread::sleep(delay);
                }
            }
        }
    }
}

/// Exponential backoff between retries.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { next: initial, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_schema_errors_as_permanent_and_overload_as_retriable() {
        use clickhouse::error::Error;
        let unknown_table = Error::BadResponse(
            "Code: 60, e.displayText() = DB::Exception: Table x.usage doesn't exist.".into(),
        );
        assert!(!classify(unknown_table).is_retriable());
        let too_many_parts = Error::BadResponse("Code: 252. DB::Exception: Too many parts".into());
        assert!(classify(too_many_parts).is_retriable());
        assert!(classify(Error::TimedOut).is_retriable());
        let no_code = Error::BadResponse("502 Bad Gateway".into());
        assert!(classify(no_code).is_retriable());
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }
}
