//! Rates of admitted actions per agent instance and per workspace, so that an agent that floods
//! ingest is held to a sustained rate — the in-flight shares of [`crate::admission`] bound how
//! much of it waits for Kafka at once, not how much it sends per second, and every action it
//! gets through loads the broker that the other workspaces' records go through too.
//!
//! The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one instant per
//! key): each key has a *theoretical arrival time* `tat`; admitting `n` actions moves it to
//! `max(tat, now) + n × interval`; a request is refused while `tat` is more than the burst
//! tolerance ahead of `now`. The check is made before a request's body is read (its size is not
//! known yet) and the charge after, so a batch may take its key into debt by its own size — the
//! sustained rate is still exact: every admitted action moves `tat` by one interval, and nothing
//! is admitted while `tat` is ahead by more than the burst.
//!
//! Why not the `governor` crate: its `check_n` refuses a batch whose size it must know up front
//! and offers no check that takes nothing, so a flood could be refused only after ingest had
//! read and parsed each body — the CPU that refusing before the body saves.
//!
//! Because the charge comes after the check, requests that pass the check at about the same time
//! would all be admitted before the first of them is charged: a flooding client with 16 requests
//! in progress took 16 batches at once each time its bucket reopened, and the other workspaces'
//! records waited behind that clump in the producer's window. So the check counts the key's
//! requests already in progress as charged, each at the size of the key's last batch — the
//! bucket reopens for one batch at a time, and the sustained rate is unchanged (the real charge
//! is still the one that moves `tat`).
//!
//! A key whose `tat` is in the past is the same as no key, so entries are swept from time to
//! time (amortised: when the map has doubled since the last sweep) and idle workspaces take no
//! memory.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// A sustained rate with a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Actions per second, sustained.
    pub per_second: NonZeroU32,
    /// Seconds of the rate that may be taken at once after a quiet time.
    pub burst_seconds: NonZeroU32,
}

impl Rate {
    fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.per_second.get()
    }

    fn burst_tolerance(&self) -> Duration {
        Duration::from_secs(u64::from(self.burst_seconds.get()))
    }

    /// The time `actions` take of the rate (capped at an hour, far beyond any burst).
    fn cost(&self, actions: u32) -> Duration {
        self.interval()
            .checked_mul(actions)
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// The rate state of one kind of key (workspaces, or agent instances).
#[derive(Debug)]
pub struct RateTable<K> {
    rate: Option<Rate>,
    keys: HashMap<K, KeyState>,
    sweep_above: usize,
}

/// The state of one key.
#[derive(Debug, Clone, Copy)]
struct KeyState {
    /// The theoretical arrival time.
    tat: Instant,
    /// Actions of the key's last charged batch: the estimate for its requests in progress.
    last_batch: u32,
}

/// How long a refused key has to wait until it is admitted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverRate {
    pub per_second: u32,
    pub wait: Duration,
}

const MIN_SWEEP_ENTRIES: usize = 1024;

impl<K: std::hash::Hash + Eq + Clone> RateTable<K> {
    /// A table enforcing `rate`; `None` admits everything and keeps no state.
    pub fn new(rate: Option<Rate>) -> RateTable<K> {
        RateTable {
            rate,
            keys: HashMap::new(),
            sweep_above: MIN_SWEEP_ENTRIES,
        }
    }

    /// Whether `key` may send now: refused while it is more than its burst ahead of its rate,
    /// counting its `requests_in_progress` (not charged yet) at the size of its last batch.
    pub fn check(
        &self,
        key: &K,
        now: Instant,
        requests_in_progress: usize,
    ) -> Result<(), OverRate> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let Some(state) = self.keys.get(key) else {
            return Ok(());
        };
        let pending_actions = u32::try_from(requests_in_progress)
            .unwrap_or(u32::MAX)
            .saturating_mul(state.last_batch);
        let pending = rate.cost(pending_actions);
        let tat_with_pending = state.tat.checked_add(pending).unwrap_or(state.tat);
        let allowed_from = tat_with_pending
            .checked_sub(rate.burst_tolerance())
            .unwrap_or(now);
        if allowed_from <= now {
            Ok(())
        } else {
            Err(OverRate {
                per_second: rate.per_second.get(),
                wait: allowed_from - now,
            })
        }
    }

    /// Counts `actions` admitted for `key` at `now`.
    pub fn charge(&mut self, key: &K, actions: usize, now: Instant) {
        let Some(rate) = self.rate else {
            return;
        };
        // A batch is at most a few thousand actions; the cap only keeps the arithmetic checked.
        let actions = u32::try_from(actions).unwrap_or(u32::MAX);
        let cost = rate.cost(actions);
        let advance = |start: Instant| start.checked_add(cost).unwrap_or(start);
        // The key is cloned only when it is new (a flooding agent's key is always there).
        match self.keys.get_mut(key) {
            Some(state) => {
                state.tat = advance(state.tat.max(now));
                state.last_batch = actions;
            }
            None => {
                let state = KeyState {
                    tat: advance(now),
                    last_batch: actions,
                };
                self.keys.insert(key.clone(), state);
            }
        }
        if self.keys.len() > self.sweep_above {
            self.sweep(now);
        }
    }

    /// Drops the keys that are back at a full bucket (their `tat` is past).
    pub fn sweep(&mut self, now: Instant) {
        self.keys.retain(|_, state| state.tat > now);
        self.sweep_above = (2 * self.keys.len()).max(MIN_SWEEP_ENTRIES);
    }

    /// Keys with state (those whose `tat` was ahead of the clock at the last charge or sweep).
    pub fn entries(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst_seconds: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst_seconds: NonZeroU32::new(burst_seconds).unwrap(),
        })
    }

    #[test]
    fn a_key_is_refused_once_it_is_a_burst_ahead_of_its_rate() {
        let mut table = RateTable::new(rate(1000, 1));
        let start = Instant::now();
        assert_eq!(table.check(&"a", start, 0), Ok(()));
        table.charge(&"a", 1000, start);
        // Exactly one burst ahead: still allowed.
        assert_eq!(table.check(&"a", start, 0), Ok(()));
        table.charge(&"a", 500, start);
        let refused = table.check(&"a", start, 0).unwrap_err();
        assert_eq!(refused.per_second, 1000);
        assert_eq!(refused.wait, Duration::from_millis(500));
        // Another key is not affected.
        assert_eq!(table.check(&"b", start, 0), Ok(()));
        // After the debt has drained, the key is admitted again.
        assert!(table
            .check(&"a", start + Duration::from_millis(499), 0)
            .is_err());
        assert_eq!(
            table.check(&"a", start + Duration::from_millis(500), 0),
            Ok(())
        );
    }

    #[test]
    fn the_sustained_rate_is_the_configured_one_whatever_the_batch_size() {
        // A client sending as fast as it is allowed, batches of 300, for 10 simulated seconds.
        let mut table = RateTable::new(rate(2000, 2));
        let start = Instant::now();
        let mut admitted = 0usize;
        let mut now = start;
        while now < start + Duration::from_secs(10) {
            if table.check(&"flood", now, 0).is_ok() {
                table.charge(&"flood", 300, now);
                admitted += 300;
            }
            now += Duration::from_millis(1);
        }
        // 10 s × 2,000/s plus the burst (2 s × 2,000) plus at most one batch of debt.
        assert!(admitted <= 20_000 + 4_000 + 300, "admitted {admitted}");
        assert!(admitted >= 20_000 + 4_000 - 300, "admitted {admitted}");
    }

    #[test]
    fn requests_in_progress_count_at_the_size_of_the_last_batch() {
        let mut table = RateTable::new(rate(1000, 1));
        let start = Instant::now();
        // 500 actions charged: half a second of the rate, within the burst of one second.
        table.charge(&"a", 500, start);
        assert_eq!(table.check(&"a", start, 0), Ok(()));
        // One request of ~500 in progress still fits the burst exactly …
        assert_eq!(table.check(&"a", start, 1), Ok(()));
        // … a second one would not: it waits for the first's share to drain.
        let refused = table.check(&"a", start, 2).unwrap_err();
        assert_eq!(refused.wait, Duration::from_millis(500));
        // A key with no charge yet has no estimate: its first requests all pass.
        assert_eq!(table.check(&"new", start, 16), Ok(()));
    }

    #[test]
    fn a_reopened_bucket_admits_one_batch_at_a_time_to_concurrent_requests() {
        // 16 requests in progress at all times, each checked then charged 500 actions 2 ms later
        // (the time to read its body): without counting the ones in progress, every check in
        // those 2 ms passes when the bucket reopens.
        let mut table = RateTable::new(rate(5000, 1));
        let start = Instant::now();
        table.charge(&"flood", 5000, start);
        let mut in_progress: Vec<Instant> = Vec::new();
        let mut largest_clump = 0usize;
        let mut now = start;
        while now < start + Duration::from_secs(5) {
            let due: Vec<Instant> = in_progress
                .iter()
                .copied()
                .filter(|at| *at <= now)
                .collect();
            in_progress.retain(|at| *at > now);
            for _ in &due {
                table.charge(&"flood", 500, now);
            }
            if in_progress.len() < 16 && table.check(&"flood", now, in_progress.len()).is_ok() {
                in_progress.push(now + Duration::from_millis(2));
            }
            largest_clump = largest_clump.max(in_progress.len());
            now += Duration::from_micros(250);
        }
        assert!(
            largest_clump <= 1,
            "{largest_clump} batches admitted at once"
        );
    }

    #[test]
    fn no_rate_admits_everything_and_keeps_no_state() {
        let mut table = RateTable::new(None);
        let now = Instant::now();
        table.charge(&"a", 1_000_000, now);
        assert_eq!(table.check(&"a", now, 0), Ok(()));
        assert_eq!(table.entries(), 0);
    }

    #[test]
    fn keys_back_at_a_full_bucket_are_swept() {
        let mut table = RateTable::new(rate(1000, 1));
        let now = Instant::now();
        for key in 0..3000 {
            table.charge(&key, 10, now);
        }
        // Sweeps ran on the way (above 1,024 entries) but every key was still in debt.
        assert_eq!(table.entries(), 3000);
        table.sweep(now + Duration::from_millis(11));
        assert_eq!(table.entries(), 0);
    }

    #[test]
    fn huge_batches_keep_the_arithmetic_checked() {
        let mut table = RateTable::new(rate(1, 1));
        let now = Instant::now();
        table.charge(&"a", usize::MAX, now);
        table.charge(&"a", usize::MAX, now);
        assert!(table.check(&"a", now, 0).is_err());
    }
}
