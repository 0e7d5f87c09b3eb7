//! The cost of outcome evaluation per action (issue 11: target ≥ 500k actions/s per core with a
//! configuration of 50 definitions, 10 of them composite).
//!
//! The configuration: 40 tracked actions, each an `[[outcomes]]` definition with a condition
//! (a status, a decimal score, a model list), and 10 composite outcomes over them — 5 ordered
//! 3-step sequences by user within 15 minutes, 5 two-step sets by a `lead_id` attribute within
//! 30 days, their last steps conditional.
//!
//! * `evaluate_per_action` — what every action costs: the enricher's rule lookup and condition
//!   (`ActionRule::is_outcome`), and the outcomes stage's test of which composite contexts it
//!   touches (`derivation::contexts_of`, which reads the context attribute from the JSON).
//! * `derive_per_constituent` — the matcher's share: one context of 1,000 constituents (a
//!   user's sessions) derived whole, reported per constituent.
//!
//! Run: `cargo bench -p agentmeter-bench --bench outcomes_path` (pin with `taskset -c 1`).

use std::hint::black_box;

use agentmeter_outcomes::derivation::{contexts_of, firings_of_context, StoredAction};
use agentmeter_schemas::{MeteringConfig, RawAction, WorkspaceSnapshot};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const POOL: usize = 1024;
const NAMES: usize = 40;

fn configuration() -> WorkspaceSnapshot {
    let names: Vec<String> = (0..NAMES).map(|index| format!("action_{index}")).collect();
    let mut text = format!(
        "[workspace]\nid = \"ws_bench\"\nname = \"Bench\"\ncurrency = \"USD\"\n\n[tagging]\ntracked = [{}]\n\n",
        names
            .iter()
            .map(|name| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (index, name) in names.iter().enumerate() {
        let when = match index % 3 {
            0 => r#"{ field = "attributes.status", eq = "success" }"#,
            1 => {
                r#"{ all = [{ field = "attributes.score", ge = "0.9" }, { field = "attributes.status", ne = "failed" }] }"#
            }
            _ => {
                r#"{ any = [{ field = "llm_model", in = ["gpt-4o", "gemini-2.5-flash"] }, { field = "attributes.draft", exists = false }] }"#
            }
        };
        text.push_str(&format!(
            "[[outcomes]]\naction = \"{name}\"\nwhen = {when}\n\n"
        ));
    }
    for index in 0..5 {
        let [a, b, c] = [index * 3, index * 3 + 1, index * 3 + 2].map(|n| &names[n]);
        text.push_str(&format!(
            "[[composite_outcomes]]\nname = \"sequence_{index}\"\nsteps = [{{ action = \"{a}\" }}, {{ action = \"{b}\" }}, {{ action = \"{c}\", when = {{ field = \"attributes.status\", eq = \"success\" }} }}]\nordered = true\nwithin = \"15m\"\ncontext = \"user\"\n\n"
        ));
    }
    for index in 0..5 {
        let [a, b] = [20 + index * 2, 21 + index * 2].map(|n| &names[n]);
        text.push_str(&format!(
            "[[composite_outcomes]]\nname = \"converted_{index}\"\nsteps = [{{ action = \"{a}\" }}, {{ action = \"{b}\", when = {{ field = \"attributes.score\", ge = \"0.5\" }} }}]\nwithin = \"30days\"\ncontext = \"attributes.lead_id\"\n\n"
        ));
    }
    let config = MeteringConfig::from_toml(&text).expect("the bench configuration parses");
    WorkspaceSnapshot::build(1, config).expect("the bench configuration is valid")
}

fn action(index: usize) -> RawAction {
    let status = ["success", "failed", "pending"][index % 3];
    RawAction {
        user_id: Some(format!("user_{}", index % 97)),
        llm_model: Some(["gpt-4o", "claude", "gemini-2.5-flash"][index % 3].to_string()),
        occurred_at_micros: 1_780_000_000_000_000 + index as i64 * 20_000_000,
        attributes_json: format!(
            r#"{{"status":"{status}","score":"0.{}","lead_id":"lead_{}","results_count":{}}}"#,
            index % 10,
            index % 211,
            index % 7
        ),
        ..RawAction::minimal(
            "ws_bench",
            "acc_bench",
            "inst_bench",
            &format!("event-{index}"),
            &format!("action_{}", index % NAMES),
        )
    }
}

fn outcomes_path(c: &mut Criterion) {
    let snapshot = configuration();
    assert_eq!(
        snapshot.config.outcomes.len() + snapshot.composite_outcomes().len(),
        50
    );
    let actions: Vec<RawAction> = (0..POOL).map(action).collect();
    let mut group = c.benchmark_group("outcomes_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("evaluate_per_action", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let raw = &actions[i % POOL];
            i += 1;
            let outcome = snapshot.rule(&raw.action_name).is_outcome(black_box(raw));
            let contexts = contexts_of(snapshot.composite_outcomes(), black_box(raw));
            black_box((outcome, contexts))
        })
    });

    // One user's 1,000 constituents of sequence_0: sessions of its three steps.
    let composite = &snapshot.composite_outcomes()[0];
    let context: Vec<StoredAction> = (0..1000)
        .map(|index| {
            let step = index % 3;
            let mut raw = action(index);
            raw.action_name = format!("action_{step}");
            raw.user_id = Some("user_heavy".to_string());
            raw.attributes_json = r#"{"status":"success"}"#.to_string();
            StoredAction {
                raw,
                partition: (index % 4) as u32,
                offset: index as u64,
            }
        })
        .collect();
    let key = contexts_of(snapshot.composite_outcomes(), &context[2].raw)
        .into_iter()
        .find(|key| key.version == 0)
        .expect("a context of sequence_0");
    let firings = firings_of_context(composite, &key, &context).len();
    println!("a context of 1,000 constituents makes {firings} firings");
    group.throughput(Throughput::Elements(context.len() as u64));
    group.bench_function("derive_per_constituent", |b| {
        b.iter(|| black_box(firings_of_context(composite, &key, black_box(&context))))
    });
    group.finish();
}

criterion_group!(benches, outcomes_path);
criterion_main!(benches);
