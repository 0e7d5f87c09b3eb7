//! The pure enrichment path per action (issue 4: target ≥ 1M actions/s per core):
//! `decode_raw_action` → `enrich` against the example's `WorkspaceSnapshot` →
//! `encode_enriched_action`, over the workload's 8-action mix (bench/src/workload.rs).
//!
//! Besides the whole path, each step alone (and the per-record work around it that ingest and
//! the aggregator do: the SHA-256 message key, the token lookup in the attributes JSON), so the
//! cost of each is visible. Criterion reports time per action and actions/s ("elem/s").
//!
//! Run: `cargo bench -p agentmeter-bench --bench enrich_path` (pin with `taskset -c 1`).

use std::hint::black_box;

use agentmeter_bench::workload::{now_micros, Workload};
use agentmeter_enricher::enrich::{enrich, TokenCounts};
use agentmeter_schemas::{
    decode_raw_action, encode_enriched_action, encode_raw_action, message_key, RawAction,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const POOL: usize = 1024;

fn enrich_path(c: &mut Criterion) {
    let workload = Workload::example();
    let snapshot = workload.snapshot.clone();
    let window = workload.window;
    let now = now_micros();
    let raws: Vec<RawAction> = (0..POOL as u64)
        .map(|index| workload.raw_action("bench", index, now))
        .collect();
    let encoded: Vec<Vec<u8>> = raws
        .iter()
        .map(|raw| encode_raw_action(raw).unwrap())
        .collect();
    let enriched: Vec<_> = raws
        .iter()
        .map(|raw| enrich(raw.clone(), &snapshot, window, now).unwrap())
        .collect();
    println!(
        "raw record {} B, enriched record {} B on average",
        encoded.iter().map(Vec::len).sum::<usize>() / POOL,
        enriched
            .iter()
            .map(|e| encode_enriched_action(e).unwrap().len())
            .sum::<usize>()
            / POOL
    );

    let mut group = c.benchmark_group("enrich_path");
    group.throughput(Throughput::Elements(1));

    group.bench_function("decode_enrich_encode", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let bytes = &encoded[i % POOL];
            i += 1;
            let raw = decode_raw_action(black_box(bytes)).unwrap();
            let enriched = enrich(raw, &snapshot, window, now).unwrap();
            black_box(encode_enriched_action(&enriched).unwrap())
        })
    });

    group.bench_function("step/decode_raw_action", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let bytes = &encoded[i % POOL];
            i += 1;
            black_box(decode_raw_action(black_box(bytes)).unwrap())
        })
    });

    group.bench_function("step/enrich", |b| {
        let mut i = 0usize;
        b.iter_batched(
            || {
                i += 1;
                raws[i % POOL].clone()
            },
            |raw| black_box(enrich(raw, &snapshot, window, now).unwrap()),
            BatchSize::SmallInput,
        )
    });

    group.bench_function("step/encode_enriched_action", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let action = &enriched[i % POOL];
            i += 1;
            black_box(encode_enriched_action(black_box(action)).unwrap())
        })
    });

    // Pieces of the steps above, for the hot-spot list.
    group.bench_function(
        "piece/token_counts_from_attributes_json (llm_call only)",
        |b| {
            let llm_call = &raws[1];
            assert_eq!(llm_call.action_name, "llm_call");
            b.iter(|| black_box(TokenCounts::of(black_box(llm_call)).ok()))
        },
    );
    group.bench_function("piece/raw_action_clone", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let raw = &raws[i % POOL];
            i += 1;
            black_box(raw.clone())
        })
    });
    group.bench_function("piece/encode_raw_action (ingest side)", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let raw = &raws[i % POOL];
            i += 1;
            black_box(encode_raw_action(black_box(raw)).unwrap())
        })
    });
    group.bench_function("piece/message_key_sha256 (ingest side)", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let raw = &raws[i % POOL];
            i += 1;
            black_box(message_key(&raw.workspace_id, &raw.event_id))
        })
    });
    group.finish();
}

criterion_group!(benches, enrich_path);
criterion_main!(benches);
