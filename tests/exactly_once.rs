//! Exactly-once under crashes, over the real broker and ClickHouse.
//!
//! A generator publishes raw actions straight to `actions.raw` (the direct-Kafka path), 5% of them
//! re-sent with the same event id a little later, some of them late (for windows hours ago). While
//! it runs, the enricher and the aggregator are each killed with SIGKILL at random moments and
//! restarted, and a second aggregator joins the group and leaves it. Afterwards every view's totals
//! per account, user and action must equal what this test computed from what it sent.
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmeter_schemas::{encode_raw_action, RawAction};
use common::{dec, kafka_action, metering_config, publisher_config, Lcg, TestEnv};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;

const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "object_detection"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.000037" }]

[[cost_allocations]]
action = "object_detection"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.0125" }]

[[outcomes]]
action = "object_detection"
"#;

const ACCOUNTS: [&str; 3] = ["acc_a", "acc_b", "acc_c"];

/// Required chaos steps: 5 enricher kills, 5 aggregator kills, and a second aggregator joining
/// and leaving twice.
const CHAOS_STEPS: usize = 5 + 5 + 4;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    actions: u64,
    quantity: Decimal,
    cost: Decimal,
    outcomes: u64,
}

/// The actions to send, each once; the generator re-sends some of them.
fn generate(count: usize, now_micros: i64) -> Vec<RawAction> {
    let mut random = Lcg(7);
    (0..count)
        .map(|index| {
            let account = ACCOUNTS[random.next(3) as usize];
            let user = format!("{account}_user_{}", random.next(25));
            // 3% are late: hours to days ago; the rest within the last ten minutes.
            let age_micros = if random.next(100) < 3 {
                (3_600 + random.next(3 * 86_400) as i64) * 1_000_000
            } else {
                random.next(600) as i64 * 1_000_000
            };
            let (name, input, output) = match random.next(10) {
                0..=3 => ("web_search", None, None),
                4..=7 => (
                    "llm_call",
                    Some(100 + random.next(3000) as i64),
                    Some(random.next(900) as i64),
                ),
                8 => ("object_detection", None, None),
                _ => ("untracked_step", None, None),
            };
            RawAction {
                user_id: Some(user),
                occurred_at_micros: now_micros - age_micros,
                received_at_micros: now_micros,
                input_tokens: input,
                output_tokens: output,
                ..kafka_action("ws_crash", account, format!("crash-{index}"), name)
            }
        })
        .collect()
}

fn expected_of(actions: &[RawAction]) -> BTreeMap<(String, String, String), Totals> {
    let mut expected: BTreeMap<(String, String, String), Totals> = BTreeMap::new();
    for action in actions {
        let (quantity, cost) = match action.action_name.as_str() {
            "web_search" => (dec("1"), dec("0.005")),
            "llm_call" => {
                let tokens =
                    Decimal::from(action.input_tokens.unwrap() + action.output_tokens.unwrap());
                (tokens, tokens * dec("0.000037"))
            }
            "object_detection" => (dec("1"), dec("0.0125")),
            _ => (Decimal::ZERO, Decimal::ZERO),
        };
        let key = (
            action.account_id.clone(),
            action.user_key().to_string(),
            action.action_name.clone(),
        );
        let totals = expected.entry(key).or_default();
        totals.actions += 1;
        totals.quantity += quantity;
        totals.cost += cost;
        totals.outcomes += u64::from(action.action_name == "object_detection");
    }
    expected
}

#[test]
fn totals_stay_exact_through_crashes_rebalances_and_resends() {
    let test_started = Instant::now();
    let total: usize = std::env::var("AGENTMETER_CRASH_TEST_ACTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut env = TestEnv::new(
        "exactly_once",
        // Consumer groups, with members joining and leaving (ADR 0003, group mode).
        "batch_offsets = 5000\nmax_pending_actions = 20000\n\
         [aggregator.ownership]\nmode = \"group\"\n[enricher.ownership]\nmode = \"group\"\n",
    );
    let accounts: Vec<(&str, String)> = ACCOUNTS
        .iter()
        .map(|account| (*account, format!("secret-{account}")))
        .collect();
    let account_refs: Vec<(&str, &str)> = accounts.iter().map(|(a, s)| (*a, s.as_str())).collect();
    env.apply_config(&metering_config("ws_crash", &account_refs, METERING));

    let now_micros = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    let actions = Arc::new(generate(total, now_micros));
    let expected = expected_of(&actions);

    // Each process has its own static group membership id, kept across its restarts (as a
    // supervisor restarting it on the same host or pod would): a restarted process takes over
    // its predecessor's place in the group at once (ADR 0001, "Consumer groups on tansu").
    const ENRICHER_ID: [(&str, &str); 1] =
        [("AGENTMETER__ENRICHER__GROUP_INSTANCE_ID", "enrich-main")];
    const AGGREGATOR_ID: [(&str, &str); 1] = [(
        "AGENTMETER__AGGREGATOR__GROUP_INSTANCE_ID",
        "aggregate-main",
    )];
    let mut enricher = env.spawn_with_env("enrich", "enrich-0", &ENRICHER_ID);
    let mut aggregator = env.spawn_with_env("aggregate", "aggregate-0", &AGGREGATOR_ID);

    // The generator: paced so that the kills below happen while data flows; 5% re-sent later.
    // It never runs ahead of the chaos: chunk i of n is sent only once the chaos has done at
    // least i / n of its required steps (minus one), and the last chunk only after all of them,
    // so every required kill, join and leave happens while actions are still being sent.
    let sent = Arc::new(AtomicUsize::new(0));
    let generator_done = Arc::new(AtomicBool::new(false));
    let chaos_steps_done = Arc::new(AtomicUsize::new(0));
    let generator = {
        let actions = actions.clone();
        let sent = sent.clone();
        let done = generator_done.clone();
        let chaos_steps_done = chaos_steps_done.clone();
        let topic = format!("{}actions.raw", env.run.topic_prefix);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let producer: FutureProducer = publisher_config().create().unwrap();
                let mut random = Lcg(99);
                let mut resend_queue: Vec<usize> = Vec::new();
                let chunk = 2_000;
                let chunks = actions.len().div_ceil(chunk);
                for start in (0..actions.len()).step_by(chunk) {
                    let index = start / chunk;
                    let may_send = |steps: usize| {
                        steps >= CHAOS_STEPS
                            || (index + 1 < chunks && index * CHAOS_STEPS <= (steps + 1) * chunks)
                    };
                    while !may_send(chaos_steps_done.load(Ordering::Relaxed)) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let end = (start + chunk).min(actions.len());
                    let mut indexes: Vec<usize> = (start..end).collect();
                    // Re-send 5% of earlier actions (same event id, same bytes) within the horizon.
                    indexes.append(&mut resend_queue);
                    for index in start..end {
                        if random.next(100) < 5 {
                            resend_queue.push(index);
                        }
                    }
                    let deliveries: Vec<_> = indexes
                        .iter()
                        .map(|index| {
                            let action = &actions[*index];
                            let payload = encode_raw_action(action).unwrap();
                            let key = action.message_key();
                            let producer = producer.clone();
                            let topic = topic.clone();
                            async move {
                                producer
                                    .send(
                                        FutureRecord::to(&topic).key(&key).payload(&payload),
                                        Duration::from_secs(30),
                                    )
                                    .await
                                    .map_err(|(error, _)| error)
                                    .unwrap();
                            }
                        })
                        .collect();
                    futures::future::join_all(deliveries).await;
                    sent.fetch_add(indexes.len(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                let leftovers = std::mem::take(&mut resend_queue);
                for index in leftovers {
                    let action = &actions[index];
                    producer
                        .send(
                            FutureRecord::to(&topic)
                                .key(&action.message_key())
                                .payload(&encode_raw_action(action).unwrap()),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(error, _)| error)
                        .unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
            done.store(true, Ordering::Relaxed);
        })
    };

    // Chaos: SIGKILL each stage at least five times at random moments while data flows; a second
    // aggregator joins the group and later leaves it — twice: once cleanly (SIGTERM) and once by
    // SIGKILL for good (its partitions must then be taken over), in random order, each time
    // under a new group instance id.
    let mut random = Lcg(1234);
    let mut enricher_kills = 0;
    let mut aggregator_kills = 0;
    let (mut enricher_kills_while_sending, mut aggregator_kills_while_sending) = (0, 0);
    let mut second_aggregator: Option<usize> = None;
    let mut second_cycles = 0; // joins and leaves done
    let kill_second_first = random.next(2) == 0;
    let steps = |enricher_kills: usize, aggregator_kills: usize, second_steps: usize| {
        enricher_kills.min(5) + aggregator_kills.min(5) + second_steps
    };
    let chaos_started = Instant::now();
    while enricher_kills < 5
        || aggregator_kills < 5
        || second_cycles < 2
        || !generator_done.load(Ordering::Relaxed)
    {
        assert!(
            chaos_started.elapsed() < Duration::from_secs(600),
            "chaos phase too long\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(700 + random.next(2300)));
        match random.next(4) {
            0 | 1 if enricher_kills < 5 || random.next(2) == 0 => {
                let sending = !generator_done.load(Ordering::Relaxed);
                env.process(enricher).kill();
                enricher_kills += 1;
                enricher_kills_while_sending += usize::from(sending);
                enricher =
                    env.spawn_with_env("enrich", &format!("enrich-{enricher_kills}"), &ENRICHER_ID);
            }
            2 if aggregator_kills < 5 || random.next(2) == 0 => {
                let sending = !generator_done.load(Ordering::Relaxed);
                env.process(aggregator).kill();
                aggregator_kills += 1;
                aggregator_kills_while_sending += usize::from(sending);
                aggregator = env.spawn_with_env(
                    "aggregate",
                    &format!("aggregate-{aggregator_kills}"),
                    &AGGREGATOR_ID,
                );
            }
            _ => match second_aggregator.take() {
                None if second_cycles < 2 => {
                    let id = format!("aggregate-second-{}", second_cycles + 1);
                    second_aggregator = Some(env.spawn_with_env(
                        "aggregate",
                        &format!("aggregate-second-{}", second_cycles + 1),
                        &[("AGENTMETER__AGGREGATOR__GROUP_INSTANCE_ID", &id)],
                    ))
                }
                None => {}
                Some(second) => {
                    // Leaves the group: once cleanly, once by SIGKILL (never restarted).
                    if kill_second_first == (second_cycles == 0) {
                        env.process(second).kill();
                    } else {
                        env.process(second).terminate(Duration::from_secs(60));
                    }
                    second_cycles += 1;
                }
            },
        }
        let second_steps = 2 * second_cycles + usize::from(second_aggregator.is_some());
        chaos_steps_done.store(
            steps(enricher_kills, aggregator_kills, second_steps),
            Ordering::Relaxed,
        );
        eprintln!(
            "chaos: sent {} / {}, enricher kills {enricher_kills}, aggregator kills {aggregator_kills}, second aggregator: {second_cycles} of 2 joins and leaves done{}",
            sent.load(Ordering::Relaxed),
            total,
            if second_aggregator.is_some() { ", one in the group" } else { "" }
        );
    }
    eprintln!("chaos done after {:?}", test_started.elapsed());
    assert!(
        enricher_kills_while_sending >= 5 && aggregator_kills_while_sending >= 5,
        "kills while actions were being sent: enricher {enricher_kills_while_sending}, aggregator {aggregator_kills_while_sending}"
    );
    generator.join().unwrap();
    assert!(
        env.process(enricher).is_running() && env.process(aggregator).is_running(),
        "{}",
        env.logs()
    );

    let unique = actions.len() as u64;
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        unique,
        Duration::from_secs(600),
    );
    eprintln!("usage totals complete after {:?}", test_started.elapsed());
    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        unique,
        Duration::from_secs(120),
    );
    assert_eq!(
        env.query("SELECT count() - uniqExact(event_id) FROM actions FINAL")[0][0],
        "0"
    );

    // usage per account × user × action: counts, quantities, decimal costs, outcomes.
    let rows = env.query(
        "SELECT account_id, user_key, action_name, sum(action_count), sum(quantity), sum(cost), sum(outcome_count) \
         FROM usage_exact GROUP BY account_id, user_key, action_name",
    );
    let actual: BTreeMap<(String, String, String), Totals> = rows
        .iter()
        .map(|row| {
            let totals = Totals {
                actions: row[3].parse().unwrap(),
                quantity: dec(&row[4]),
                cost: dec(&row[5]),
                outcomes: row[6].parse().unwrap(),
            };
            ((row[0].clone(), row[1].clone(), row[2].clone()), totals)
        })
        .collect();
    assert_eq!(actual.len(), expected.len());
    for (key, totals) in &expected {
        assert_eq!(actual.get(key), Some(totals), "usage of {key:?}");
    }

    // The billing views agree: per account and action (billable only), per user, outcomes.
    let billable = |account: &str, action: &str| -> Totals {
        expected
            .iter()
            .filter(|((a, _, n), _)| a == account && n == action && n != "untracked_step")
            .fold(Totals::default(), |mut sum, (_, t)| {
                sum.actions += t.actions;
                sum.quantity += t.quantity;
                sum.cost += t.cost;
                sum.outcomes += t.outcomes;
                sum
            })
    };
    for row in env.query(
        "SELECT account_id, action_name, sum(actions), sum(quantity), sum(cost), sum(outcomes) \
         FROM usage_by_account_day GROUP BY account_id, action_name",
    ) {
        let totals = Totals {
            actions: row[2].parse().unwrap(),
            quantity: dec(&row[3]),
            cost: dec(&row[4]),
            outcomes: row[5].parse().unwrap(),
        };
        assert_eq!(
            totals,
            billable(&row[0], &row[1]),
            "usage_by_account_day {} {}",
            row[0],
            row[1]
        );
    }
    for row in env
        .query("SELECT account_id, sum(outcomes) FROM outcomes_by_account_day GROUP BY account_id")
    {
        let expected_outcomes = billable(&row[0], "object_detection").outcomes;
        assert_eq!(
            row[1].parse::<u64>().unwrap(),
            expected_outcomes,
            "outcomes of {}",
            row[0]
        );
    }
    for row in env.query("SELECT account_id, user_key, sum(cost) FROM usage_by_user_day GROUP BY account_id, user_key") {
        let expected_cost: Decimal = expected
            .iter()
            .filter(|((a, u, _), _)| *a == row[0] && *u == row[1])
            .map(|(_, t)| t.cost)
            .sum();
        assert_eq!(dec(&row[2]), expected_cost, "cost of user {} {}", row[0], row[1]);
    }

    // @user this month and @seat today: distinct users with billable actions.
    let today = time::OffsetDateTime::now_utc().date();
    let users_by_account: BTreeMap<String, BTreeSet<String>> = actions
        .iter()
        .filter(|a| a.action_name != "untracked_step")
        .fold(BTreeMap::new(), |mut map, a| {
            map.entry(a.account_id.clone())
                .or_insert_with(BTreeSet::new)
                .insert(a.user_key().to_string());
            map
        });
    for row in env.query(&format!(
        "SELECT account_id, seats FROM seats_by_account_day WHERE day = toDate('{today}')"
    )) {
        assert_eq!(
            row[1].parse::<usize>().unwrap(),
            users_by_account[&row[0]].len(),
            "@seat of {}",
            row[0]
        );
    }
    let this_month: BTreeMap<String, BTreeSet<String>> = actions
        .iter()
        .filter(|a| a.action_name != "untracked_step")
        .filter(|a| {
            let occurred =
                time::OffsetDateTime::from_unix_timestamp(a.occurred_at_micros / 1_000_000)
                    .unwrap();
            (occurred.year(), occurred.month()) == (today.year(), today.month())
        })
        .fold(BTreeMap::new(), |mut map, a| {
            map.entry(a.account_id.clone())
                .or_insert_with(BTreeSet::new)
                .insert(a.user_key().to_string());
            map
        });
    for row in env.query(&format!(
        "SELECT account_id, users FROM users_by_account_month WHERE month = toStartOfMonth(toDate('{today}'))"
    )) {
        assert_eq!(row[1].parse::<usize>().unwrap(), this_month[&row[0]].len(), "@user of {}", row[0]);
    }
    eprintln!(
        "exact after {enricher_kills} enricher kills, {aggregator_kills} aggregator kills, a second aggregator joining and leaving twice ({}); {} actions sent ({} unique) in {:?}",
        if kill_second_first { "SIGKILL, then SIGTERM" } else { "SIGTERM, then SIGKILL" },
        sent.load(Ordering::Relaxed),
        unique,
        test_started.elapsed()
    );
}
