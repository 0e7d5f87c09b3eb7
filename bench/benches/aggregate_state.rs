//! The aggregator's pure per-action work: `PartitionAggregator::handle` (duplicate check with
//! SHA-256 ids, usage key, cumulative totals) and `take_flush` (changed keys, sorted), with
//! the production settings (batches of 50,000 offsets, 1-minute windows, 15-minute dedupe
//! horizon) and a flush every 10,000 records (the stage flushes every second or every 50,000
//! pending actions). No I/O.
//!
//! Also, for the hot-spot list, what the stage does per record around it: decoding the Avro
//! record, and turning a counted action into its ClickHouse `ActionRow`.
//!
//! Run: `cargo bench -p agentmeter-bench --bench aggregate_state` (pin with `taskset -c 1`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentmeter_aggregator::rows::ActionRow;
use agentmeter_aggregator::state::{dedupe_id, BatchSettings, CountedAction, PartitionAggregator};
use agentmeter_bench::workload::{event_id, now_micros, Workload};
use agentmeter_schemas::{decode_enriched_action, encode_enriched_action, EnrichedAction};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const POOL: usize = 4096;
const FLUSH_EVERY: u64 = 10_000;

fn aggregate_state(c: &mut Criterion) {
    let workload = Workload::example();
    let now = now_micros();
    let pool: Vec<EnrichedAction> = (0..POOL as u64)
        .map(|index| workload.enriched_action("bench", index, now + index as i64 * 1000))
        .collect();
    let encoded: Vec<Vec<u8>> = pool
        .iter()
        .map(|action| encode_enriched_action(action).unwrap())
        .collect();
    let settings = BatchSettings {
        batch_size: 50_000,
        window_seconds: 60,
        dedupe_horizon_ms: 15 * 60 * 1000,
    };

    let mut group = c.benchmark_group("aggregate_state");
    group.throughput(Throughput::Elements(1));

    // handle + take_flush: inputs are made (cloned, with unique event ids) outside the timing.
    group.bench_function("handle_and_take_flush", |b| {
        let mut run = 0u64;
        b.iter_custom(|iters| {
            run += 1;
            let actions: Vec<EnrichedAction> = (0..iters)
                .map(|index| {
                    let mut action = pool[(index % POOL as u64) as usize].clone();
                    action.raw.event_id = event_id(&run.to_string(), index);
                    action
                })
                .collect();
            let mut aggregator = PartitionAggregator::new(0, settings, None);
            let mut flushed_rows = 0usize;
            let started = Instant::now();
            for (offset, action) in actions.into_iter().enumerate() {
                let timestamp_ms = action.raw.received_at_micros / 1000;
                black_box(aggregator.handle(offset as i64, timestamp_ms, action));
                if (offset as u64 + 1).is_multiple_of(FLUSH_EVERY) {
                    let writes = aggregator.take_flush();
                    flushed_rows += writes.iter().map(|w| w.actions.len()).sum::<usize>();
                    // Dropping the flushed actions is part of the real cost too.
                    drop(black_box(writes));
                }
            }
            let writes = aggregator.take_flush();
            flushed_rows += writes.iter().map(|w| w.actions.len()).sum::<usize>();
            drop(black_box(writes));
            let elapsed = started.elapsed();
            assert_eq!(flushed_rows as u64, iters);
            elapsed
        })
    });

    group.bench_function("piece/dedupe_id_sha256", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let action = &pool[i % POOL];
            i += 1;
            black_box(dedupe_id(&action.raw.workspace_id, &action.raw.event_id))
        })
    });

    group.bench_function("piece/decode_enriched_action (stage, per record)", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let bytes = &encoded[i % POOL];
            i += 1;
            black_box(decode_enriched_action(black_box(bytes)).unwrap())
        })
    });

    group.bench_function("piece/action_row_from_counted (sink, per record)", |b| {
        let counted: Vec<CountedAction> = pool
            .iter()
            .enumerate()
            .map(|(offset, action)| CountedAction {
                action: action.clone(),
                partition: 0,
                offset: offset as i64,
            })
            .collect();
        let mut i = 0usize;
        b.iter(|| {
            let action = &counted[i % POOL];
            i += 1;
            black_box(ActionRow::from_counted(black_box(action)).unwrap())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    targets = aggregate_state
}
criterion_main!(benches);
