//! Crash loops (issue 14): every stage SIGKILLed again and again while actions flow through
//! REST, each restarted 0–2 s after its kill, as a supervisor restarts a crash-looping pod.
//! Afterwards the stages must have come back on their own (static partition ownership, ADR
//! 0003: nothing waits for a group coordinator) and every total per account and action must be
//! exact. The time from the last restart to "caught up" is printed.
//!
//! `AGENTMETER_CRASH_LOOP_SEED` picks the kill schedule and the workload (default 1),
//! `AGENTMETER_CRASH_LOOP_ACTIONS` the number of distinct actions (default 100,000).
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dec, metering_config, post_until_accepted, Lcg, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const ACCOUNTS: [(&str, &str); 2] = [
    ("acc_loop_a", "crash-loop-secret-a"),
    ("acc_loop_b", "crash-loop-secret-b"),
];

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.00004" }]
"#;

/// SIGKILLs the test does (spread over the three stages).
const KILLS: usize = 30;
/// Actions per REST batch.
const BATCH: usize = 250;
/// How long the clients take to send everything (about as long as the crash loop lasts).
const SEND_FOR: Duration = Duration::from_secs(45);

/// What one distinct action must add to its account's totals.
#[derive(Debug, Clone)]
struct Expected {
    account: &'static str,
    action: &'static str,
    quantity: Decimal,
    cost: Decimal,
}

/// Totals per (account, action): actions, quantity, cost.
type Totals = BTreeMap<(String, String), (u64, Decimal, Decimal)>;

/// One client of one account: sends its share in batches, 5% of each batch re-sent items of an
/// earlier batch (same event id and body); a batch refused with 429 or 503, or whose connection
/// failed (ingest killed), is sent again as it was until it is accepted.
struct Client {
    url: String,
    account: &'static str,
    secret: &'static str,
    actions: usize,
    seed: u64,
    accepted: Arc<Mutex<BTreeMap<String, Expected>>>,
    sent_batches: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
    /// The client spreads its batches evenly over this time, so the kills hit a flowing stream.
    spread_over: Duration,
}

fn client(
    Client {
        url,
        account,
        secret,
        actions,
        seed,
        accepted,
        sent_batches,
        retries,
        spread_over,
    }: Client,
) {
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    let mut random = Lcg(seed);
    let mut earlier: Vec<Value> = Vec::new();
    let mut next = 0;
    while next < actions {
        let due = started + spread_over.mul_f64(next as f64 / actions as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let mut items = Vec::new();
        let mut expected = Vec::new();
        while items.len() < BATCH && next < actions {
            if !earlier.is_empty() && random.next(100) < 5 {
                let index = random.next(earlier.len() as u64) as usize;
                items.push(earlier[index].clone());
                continue;
            }
            let event_id = format!("loop-{account}-{next}");
            next += 1;
            let item = if random.next(2) == 0 {
                expected.push((
                    event_id.clone(),
                    Expected {
                        account,
                        action: "web_search",
                        quantity: Decimal::ONE,
                        cost: dec("0.005"),
                    },
                ));
                json!({"event_id": event_id, "action_name": "web_search", "user_id": "u1"})
            } else {
                let tokens = 1 + random.next(3000);
                let quantity = Decimal::from(tokens);
                expected.push((
                    event_id.clone(),
                    Expected {
                        account,
                        action: "llm_call",
                        quantity,
                        cost: quantity * dec("0.00004"),
                    },
                ));
                json!({"event_id": event_id, "action_name": "llm_call", "user_id": "u2",
                       "attributes": {"input_tokens": tokens, "output_tokens": 0}})
            };
            earlier.push(item.clone());
            items.push(item);
        }
        let body = json!({ "actions": items });
        let refused = post_until_accepted(
            &client,
            &url,
            secret,
            &body,
            Duration::from_secs(180),
            Duration::from_millis(100),
        );
        retries.fetch_add(refused, Ordering::Relaxed);
        accepted.lock().unwrap().extend(expected);
        sent_batches.fetch_add(1, Ordering::Relaxed);
    }
}

fn totals_in_clickhouse(env: &TestEnv) -> Totals {
    env.query(
        "SELECT account_id, action_name, sum(action_count), sum(quantity), sum(cost) \
         FROM usage_exact GROUP BY account_id, action_name",
    )
    .into_iter()
    .map(|row| {
        (
            (row[0].clone(), row[1].clone()),
            (row[2].parse().unwrap(), dec(&row[3]), dec(&row[4])),
        )
    })
    .collect()
}

#[test]
fn stages_crash_looping_under_sigkill_come_back_and_converge_to_exact_totals() {
    let seed: u64 = std::env::var("AGENTMETER_CRASH_LOOP_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1);
    let total: usize = std::env::var("AGENTMETER_CRASH_LOOP_ACTIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100_000);
    // The aggregator keeps its duplicate ids in the restart store, as a StatefulSet replica
    // does on its volume: every SIGKILL also tests that a resume from the store decides the
    // same duplicates.
    let state_dir = std::env::temp_dir().join(format!(
        "agentmeter-crash-loop-state-{}-{seed}",
        std::process::id()
    ));
    let mut env = TestEnv::new(
        "crash_loop",
        &format!(
            "batch_offsets = 5000\nstate_dir = {:?}\n",
            state_dir.display().to_string()
        ),
    );
    env.apply_config(&metering_config("ws_loop", &ACCOUNTS, METERING));
    const STAGES: [&str; 3] = ["ingest", "enrich", "aggregate"];
    let mut running: Vec<usize> = STAGES
        .iter()
        .map(|stage| env.spawn(stage, &format!("{stage}-0")))
        .collect();
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );

    let accepted = Arc::new(Mutex::new(BTreeMap::<String, Expected>::new()));
    let sent_batches = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = ACCOUNTS
        .iter()
        .enumerate()
        .map(|(index, (account, secret))| {
            let url = format!("{}/v1/actions", env.ingest_url());
            let (accepted, sent_batches, retries) =
                (accepted.clone(), sent_batches.clone(), retries.clone());
            let share = total / ACCOUNTS.len() + usize::from(index < total % ACCOUNTS.len());
            let client_seed = seed * 1000 + index as u64;
            std::thread::spawn(move || {
                client(Client {
                    url,
                    account,
                    secret,
                    actions: share,
                    seed: client_seed,
                    accepted,
                    sent_batches,
                    retries,
                    spread_over: SEND_FOR,
                })
            })
        })
        .collect();

    // Wait for the first accepted batches so that the kills hit a flowing pipeline.
    let started = Instant::now();
    while sent_batches.load(Ordering::Relaxed) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing accepted\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The crash loop: a random stage SIGKILLed every 0.1–0.9 s of uptime, restarted 0–2 s later.
    let mut random = Lcg(seed);
    let mut kills_per_stage = [0usize; 3];
    let chaos_started = Instant::now();
    let mut last_restart = Instant::now();
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(100 + random.next(800)));
        let stage = random.next(3) as usize;
        env.process(running[stage]).kill();
        kills_per_stage[stage] += 1;
        std::thread::sleep(Duration::from_millis(random.next(2000)));
        running[stage] = env.spawn(STAGES[stage], &format!("{}-{}", STAGES[stage], kill + 1));
        last_restart = Instant::now();
    }
    let chaos_took = chaos_started.elapsed();
    eprintln!(
        "seed {seed}: {KILLS} SIGKILLs in {chaos_took:?} (ingest {}, enricher {}, aggregator {}), {} batches accepted meanwhile",
        kills_per_stage[0],
        kills_per_stage[1],
        kills_per_stage[2],
        sent_batches.load(Ordering::Relaxed)
    );
    assert!(
        kills_per_stage.iter().all(|kills| *kills > 0),
        "every stage must be killed: {kills_per_stage:?}"
    );
    for client in clients {
        client.join().expect("client");
    }
    let all_accepted = Instant::now();
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), total);
    let mut expected = Totals::new();
    for action in accepted.values() {
        let entry = expected
            .entry((action.account.to_string(), action.action.to_string()))
            .or_insert((0, Decimal::ZERO, Decimal::ZERO));
        entry.0 += 1;
        entry.1 += action.quantity;
        entry.2 += action.cost;
    }

    // Converge on their own: no stage is touched after its last restart.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let counted = &env.query("SELECT sum(action_count) FROM usage_exact")[0][0];
        if counted.parse::<usize>().ok() == Some(total) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counted {counted} of {total} actions 300 s after the last restart\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "seed {seed}: {total} actions ({} client re-sends after refusals or lost connections) counted exactly; caught up {:?} after the last restart, {:?} after the last batch was accepted",
        retries.load(Ordering::Relaxed),
        last_restart.elapsed(),
        all_accepted.elapsed()
    );
    assert_eq!(totals_in_clickhouse(&env), expected);
    let stored = env.query("SELECT count(), uniqExact(event_id) FROM actions FINAL");
    assert_eq!(stored[0], vec![total.to_string(), total.to_string()]);
    for index in running {
        let process = env.process(index);
        let tag = process.tag.clone();
        let alive = process.is_running();
        assert!(alive, "{tag} exited\n{}", env.logs());
    }
    for port in [
        env.run.enricher_metrics_port,
        env.run.aggregator_metrics_port,
    ] {
        env.wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(30),
        );
    }
    let _ = std::fs::remove_dir_all(&state_dir);
}
