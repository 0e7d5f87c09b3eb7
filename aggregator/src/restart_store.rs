//! The restart store: the duplicate check's ids kept on the replica's local disk, so that a
//! restarted aggregator re-reads at most the batch it was in instead of the whole duplicate
//! horizon of every partition (`docs/adr/0003-partition-ownership.md`, "Restart cost").
//!
//! One [redb](https://docs.rs/redb) file per (ClickHouse database, enriched topic) under
//! `aggregator.state_dir`. Per partition it holds
//! * `by_id`: (partition, id, offset) → (), the point lookups of "seen in `[from, until)`";
//! * `by_offset`: (partition, offset) → (timestamp, id), the ordered scan that finds the next
//!   batch's `dedupe_from`, and the index for deleting what fell out of the horizon;
//! * `coverage`: partition → the offsets `[covered_from, complete_up_to)` whose every observed
//!   id is stored, and the input epoch they were read in.
//!
//! Each flush appends what it observed **before** its ClickHouse writes, in one durable redb
//! transaction. Offsets of a Kafka partition never change their record, so whatever the store
//! holds is true of the partition (an epoch change — the topic re-created — clears it); a store
//! ahead of ClickHouse's progress is harmless because lookups stop at the resume point, and one
//! behind it only moves the resume point back. Entries are deleted below the `dedupe_from` of
//! the last plan ClickHouse acknowledged, never below what a restart may still need.
//!
//! The store only saves reading: without it (no `state_dir`, a fresh volume, a file that does
//! not open, a coverage that does not reach the plan) the aggregator re-reads from the plan's
//! `dedupe_from` as before, and every decision is the same.

// `redb::Error` is large (160 bytes); it travels only on the failure path, once per flush.
#![allow(clippy::result_large_err)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use crate::state::{BatchPlan, InputEpoch, ObservedId, PriorIds};

const BY_ID: TableDefinition<&[u8], ()> = TableDefinition::new("by_id");
const BY_OFFSET: TableDefinition<&[u8], &[u8]> = TableDefinition::new("by_offset");
const COVERAGE: TableDefinition<u32, &[u8]> = TableDefinition::new("coverage");

/// A failure of the local store (an I/O error or a damaged file).
#[derive(Debug, thiserror::Error)]
#[error("restart store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

/// What the store covers for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Every id observed at an offset in `[covered_from, complete_up_to)` is stored.
    pub covered_from: i64,
    pub complete_up_to: i64,
    /// The input epoch the offsets were read in.
    pub epoch: InputEpoch,
}

impl Coverage {
    fn encode(&self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        bytes[0..8].copy_from_slice(&self.covered_from.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.complete_up_to.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.epoch.logical_start.to_be_bytes());
        bytes[24..32].copy_from_slice(&self.epoch.physical_start.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Coverage> {
        let field = |at: usize| -> Option<i64> {
            Some(i64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        Some(Coverage {
            covered_from: field(0)?,
            complete_up_to: field(8)?,
            epoch: InputEpoch {
                logical_start: field(16)?,
                physical_start: field(24)?,
            },
        })
    }

    /// Where a partition resumed with `plan` may start reading (`None`: the store does not
    /// cover `[plan.dedupe_from, plan.start)` far enough to help). The ids of
    /// `[plan.dedupe_from, resume point)` are then answered by the store.
    pub fn resume_point(&self, epoch: InputEpoch, plan: &BatchPlan) -> Option<i64> {
        let usable = self.epoch == epoch
            && self.covered_from <= plan.dedupe_from
            && self.complete_up_to > plan.dedupe_from;
        usable.then(|| self.complete_up_to.clamp(plan.dedupe_from, plan.start))
    }
}

/// The open store of one (database, topic).
#[derive(Clone)]
pub struct RestartStore {
    database: Arc<Database>,
    path: Arc<PathBuf>,
}

impl fmt::Debug for RestartStore {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RestartStore")
            .field("path", &self.path)
            .finish()
    }
}

fn id_key(partition: i32, id: &[u8; 16], offset: i64) -> [u8; 28] {
    let mut key = [0u8; 28];
    key[0..4].copy_from_slice(&partition.to_be_bytes());
    key[4..20].copy_from_slice(id);
    key[20..28].copy_from_slice(&offset.to_be_bytes());
    key
}

fn offset_key(partition: i32, offset: i64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[0..4].copy_from_slice(&partition.to_be_bytes());
    key[4..12].copy_from_slice(&offset.to_be_bytes());
    key
}

fn offset_of(key: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
}

/// (timestamp ms, id) of a `by_offset` value.
fn decode_seen(value: &[u8]) -> Option<(i64, [u8; 16])> {
    let timestamp = i64::from_be_bytes(value.get(0..8)?.try_into().ok()?);
    let id = value.get(8..24)?.try_into().ok()?;
    Some((timestamp, id))
}

// Offsets are never negative, so their big-endian bytes sort as the numbers do; partitions
// likewise.
fn coverage_key(partition: i32) -> u32 {
    u32::try_from(partition).unwrap_or(0)
}

impl RestartStore {
    /// Opens (or creates) the store of `database` and `topic` in `dir`.
    pub fn open(dir: &Path, database: &str, topic: &str) -> Result<RestartStore, StoreError> {
        let path = dir.join(format!("{database}.{topic}.redb"));
        let failed = |message: String| StoreError {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|error| failed(error.to_string()))?;
        let database = Database::create(&path).map_err(|error| failed(error.to_string()))?;
        let store = RestartStore {
            database: Arc::new(database),
            path: Arc::new(path.clone()),
        };
        store.write(|transaction| {
            transaction.open_table(BY_ID)?;
            transaction.open_table(BY_OFFSET)?;
            transaction.open_table(COVERAGE)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn failed(&self, error: impl fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: error.to_string(),
        }
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.failed(error))?;
        body(&transaction).map_err(|error| self.failed(error))?;
        transaction.commit().map_err(|error| self.failed(error))
    }

    /// What the store covers for `partition`.
    pub fn coverage(&self, partition: i32) -> Result<Option<Coverage>, StoreError> {
        let read = || -> Result<Option<Coverage>, redb::Error> {
            let transaction = self.database.begin_read()?;
            let table = transaction.open_table(COVERAGE)?;
            let value = table.get(coverage_key(partition))?;
            Ok(value.and_then(|value| Coverage::decode(value.value())))
        };
        read().map_err(|error| self.failed(error))
    }

    /// Forgets everything of `partition` and starts its coverage at `from` (where this process
    /// begins reading it).
    pub fn reset(&self, partition: i32, epoch: InputEpoch, from: i64) -> Result<(), StoreError> {
        self.write(|transaction| {
            delete_below(transaction, partition, i64::MAX)?;
            let coverage = Coverage {
                covered_from: from,
                complete_up_to: from,
                epoch,
            };
            transaction
                .open_table(COVERAGE)?
                .insert(coverage_key(partition), coverage.encode().as_slice())?;
            Ok(())
        })
    }

    /// Appends what a flush observed (in offset order), marks the partition complete up to
    /// `complete_up_to`, and deletes the ids below `delete_below` (the `dedupe_from` of the last
    /// plan ClickHouse acknowledged) — one durable transaction.
    pub fn append(
        &self,
        partition: i32,
        observed: &[ObservedId],
        complete_up_to: i64,
        delete_below_offset: Option<i64>,
    ) -> Result<(), StoreError> {
        self.write(|transaction| {
            let coverage = {
                let table = transaction.open_table(COVERAGE)?;
                let value = table.get(coverage_key(partition))?;
                value.and_then(|value| Coverage::decode(value.value()))
            };
            {
                let mut by_id = transaction.open_table(BY_ID)?;
                let mut by_offset = transaction.open_table(BY_OFFSET)?;
                for seen in observed {
                    by_id.insert(id_key(partition, &seen.id, seen.offset).as_slice(), ())?;
                    let mut value = [0u8; 24];
                    value[0..8].copy_from_slice(&seen.timestamp_ms.to_be_bytes());
                    value[8..24].copy_from_slice(&seen.id);
                    by_offset.insert(
                        offset_key(partition, seen.offset).as_slice(),
                        value.as_slice(),
                    )?;
                }
            }
            let Some(mut coverage) = coverage else {
                // Not reset at assignment (cannot happen): record nothing as covered.
                return Ok(());
            };
            if let Some(below) = delete_below_offset {
                if below > coverage.covered_from {
                    delete_below(transaction, partition, below)?;
                    coverage.covered_from = below;
                }
            }
            coverage.complete_up_to = coverage.complete_up_to.max(complete_up_to);
            transaction
                .open_table(COVERAGE)?
                .insert(coverage_key(partition), coverage.encode().as_slice())?;
            Ok(())
        })
    }

    /// The stored ids of `partition` below `until`, for [`crate::state::DedupeWindow`].
    pub fn prior_ids(&self, partition: i32, until: i64) -> Box<dyn PriorIds> {
        Box::new(StoredPriorIds {
            store: self.clone(),
            partition,
            until,
        })
    }

    /// Removes the store's file (after a failure; the next start re-reads instead).
    pub fn remove_file(&self) {
        if let Err(error) = std::fs::remove_file(self.path.as_path()) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove the restart store");
        }
    }
}

/// Deletes the ids of `partition` at offsets below `below`.
fn delete_below(
    transaction: &redb::WriteTransaction,
    partition: i32,
    below: i64,
) -> Result<(), redb::Error> {
    let mut by_id = transaction.open_table(BY_ID)?;
    let mut by_offset = transaction.open_table(BY_OFFSET)?;
    let start = offset_key(partition, 0);
    let end = offset_key(partition, below);
    let mut doomed = Vec::new();
    for entry in by_offset.range(start.as_slice()..end.as_slice())? {
        let (key, value) = entry?;
        if let (Some(offset), Some((_, id))) = (offset_of(key.value()), decode_seen(value.value()))
        {
            doomed.push((offset, id));
        }
    }
    for (offset, id) in doomed {
        by_id.remove(id_key(partition, &id, offset).as_slice())?;
        by_offset.remove(offset_key(partition, offset).as_slice())?;
    }
    Ok(())
}

/// [`PriorIds`] answered by the store.
#[derive(Debug)]
struct StoredPriorIds {
    store: RestartStore,
    partition: i32,
    until: i64,
}

impl PriorIds for StoredPriorIds {
    fn until(&self) -> i64 {
        self.until
    }

    fn seen(&self, id: &[u8; 16], from: i64) -> Result<bool, String> {
        if from >= self.until {
            return Ok(false);
        }
        let lookup = || -> Result<bool, redb::Error> {
            let transaction = self.store.database.begin_read()?;
            let table = transaction.open_table(BY_ID)?;
            let start = id_key(self.partition, id, from.max(0));
            let end = id_key(self.partition, id, self.until);
            let found = table.range(start.as_slice()..end.as_slice())?.next();
            Ok(found.transpose()?.is_some())
        };
        lookup().map_err(|error| self.store.failed(error).to_string())
    }

    fn first_at_or_after(&self, from: i64, threshold_ms: i64) -> Result<Option<i64>, String> {
        if from >= self.until {
            return Ok(None);
        }
        let scan = || -> Result<Option<i64>, redb::Error> {
            let transaction = self.store.database.begin_read()?;
            let table = transaction.open_table(BY_OFFSET)?;
            let start = offset_key(self.partition, from.max(0));
            let end = offset_key(self.partition, self.until);
            for entry in table.range(start.as_slice()..end.as_slice())? {
                let (key, value) = entry?;
                let timestamp = decode_seen(value.value()).map(|(timestamp, _)| timestamp);
                if timestamp.is_some_and(|timestamp| timestamp >= threshold_ms) {
                    return Ok(offset_of(key.value()));
                }
            }
            Ok(None)
        };
        scan().map_err(|error| self.store.failed(error).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::dedupe_id;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "agentmeter-restart-store-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn observed(offset: i64, event: &str) -> ObservedId {
        ObservedId {
            offset,
            timestamp_ms: offset * 1000,
            id: dedupe_id("ws", event),
        }
    }

    #[test]
    fn stored_ids_answer_lookups_within_their_range_and_survive_a_reopen() {
        let dir = temp_dir("lookups");
        let epoch = InputEpoch::default();
        {
            let store = RestartStore::open(&dir, "db", "topic").unwrap();
            store.reset(3, epoch, 0).unwrap();
            let first: Vec<ObservedId> = (0..10).map(|o| observed(o, &format!("e{o}"))).collect();
            store.append(3, &first, 10, None).unwrap();
            // Another partition's ids are separate.
            store.reset(4, epoch, 0).unwrap();
            store.append(4, &[observed(0, "other")], 1, None).unwrap();
        }
        let store = RestartStore::open(&dir, "db", "topic").unwrap();
        let coverage = store.coverage(3).unwrap().unwrap();
        assert_eq!((coverage.covered_from, coverage.complete_up_to), (0, 10));
        let prior = store.prior_ids(3, 8);
        assert!(prior.seen(&dedupe_id("ws", "e5"), 0).unwrap());
        assert!(
            !prior.seen(&dedupe_id("ws", "e5"), 6).unwrap(),
            "below from"
        );
        assert!(
            !prior.seen(&dedupe_id("ws", "e9"), 0).unwrap(),
            "at or after until"
        );
        assert!(
            !prior.seen(&dedupe_id("ws", "other"), 0).unwrap(),
            "other partition"
        );
        assert_eq!(prior.first_at_or_after(2, 4_500).unwrap(), Some(5));
        assert_eq!(prior.first_at_or_after(2, 8_000).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn deleting_below_an_acknowledged_dedupe_from_moves_the_coverage() {
        let dir = temp_dir("delete");
        let store = RestartStore::open(&dir, "db", "topic").unwrap();
        let epoch = InputEpoch::default();
        store.reset(0, epoch, 0).unwrap();
        let all: Vec<ObservedId> = (0..20).map(|o| observed(o, &format!("e{o}"))).collect();
        store.append(0, &all, 20, None).unwrap();
        store.append(0, &[], 20, Some(12)).unwrap();
        let coverage = store.coverage(0).unwrap().unwrap();
        assert_eq!(coverage.covered_from, 12);
        let prior = store.prior_ids(0, 20);
        assert!(!prior.seen(&dedupe_id("ws", "e3"), 0).unwrap());
        assert!(prior.seen(&dedupe_id("ws", "e13"), 0).unwrap());
        assert_eq!(prior.first_at_or_after(0, 0).unwrap(), Some(12));
        let plan = |dedupe_from, start| BatchPlan {
            start,
            size: 10,
            window_seconds: 60,
            dedupe_from,
        };
        // A plan that still needs offsets below the coverage cannot use the store.
        assert_eq!(coverage.resume_point(epoch, &plan(10, 20)), None);
        assert_eq!(coverage.resume_point(epoch, &plan(12, 20)), Some(20));
        // The store behind the plan's start: reading resumes where it ends.
        assert_eq!(coverage.resume_point(epoch, &plan(12, 30)), Some(20));
        // Ahead of the plan (a flush whose ClickHouse writes died): from the plan's start.
        assert_eq!(coverage.resume_point(epoch, &plan(12, 15)), Some(15));
        // Another input epoch (the topic was re-created): unusable.
        let other_epoch = InputEpoch {
            logical_start: 20,
            physical_start: 0,
        };
        assert_eq!(coverage.resume_point(other_epoch, &plan(12, 20)), None);
        store.reset(0, other_epoch, 20).unwrap();
        assert!(!store
            .prior_ids(0, 20)
            .seen(&dedupe_id("ws", "e13"), 0)
            .unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
