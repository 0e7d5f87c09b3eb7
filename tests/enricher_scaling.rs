//! Two enrichers in one consumer group over the real broker; one of them is killed with SIGKILL
//! while actions are flowing and is not restarted. The survivor must take over the dead member's
//! partitions (on tansu 0.6.0 after the 30 s session timeout and the group watchdog's re-join,
//! ADR 0001 "Consumer groups on tansu"), so that every action sent to `actions.raw` reaches
//! `actions.enriched`, correctly priced. Duplicates are allowed here (the enricher is
//! at-least-once; the aggregator removes them by event id) and are counted.
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_schemas::{decode_enriched_action, encode_raw_action, RawAction};
use common::{
    brokers, dec, free_port, kafka_action, metering_config, metrics_text, publisher_config, Lcg,
    TestEnv,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;

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
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.000037" }]
"#;

const WORKSPACE: &str = "ws_scale";
const ACCOUNTS: [&str; 2] = ["acc_a", "acc_b"];
/// Partitions of the action topics (TestEnv's `kafka.partitions`).
const PARTITIONS: i32 = 4;

/// Actions sent in all; override with `AGENTMETER_SCALING_TEST_ACTIONS`.
const DEFAULT_ACTIONS: usize = 20_000;
/// Pace of the generator: a chunk every tick. 1,000 actions/s before the kill, but past 60% of
/// the actions only a trickle until the kill happens, so that it always happens with records
/// flowing and plenty still to send; 300 actions/s after the kill, so that actions keep coming
/// through the takeover (about 35–45 s on tansu).
const TICK: Duration = Duration::from_millis(200);
const CHUNK_BEFORE_KILL: usize = 200;
const FULL_PACE_BEFORE_KILL: f64 = 0.6;
const TRICKLE: usize = 10;
const CHUNK_AFTER_KILL: usize = 60;
/// Consecutive looks (300 ms apart) at which both enrichers must have been enriching before the
/// kill: both own partitions and the group is settled.
const ACTIVE_LOOKS_BEFORE_KILL: usize = 5;

fn generate(count: usize, now_micros: i64) -> Vec<RawAction> {
    let mut random = Lcg(2024);
    (0..count)
        .map(|index| {
            let account = ACCOUNTS[random.next(2) as usize];
            let (name, input, output) = match random.next(10) {
                0..=4 => ("web_search", None, None),
                5..=8 => (
                    "llm_call",
                    Some(1 + random.next(4000) as i64),
                    Some(random.next(1000) as i64),
                ),
                _ => ("untracked_step", None, None),
            };
            RawAction {
                user_id: Some(format!("{account}_user_{}", random.next(20))),
                occurred_at_micros: now_micros - random.next(600) as i64 * 1_000_000,
                received_at_micros: now_micros,
                input_tokens: input,
                output_tokens: output,
                ..kafka_action(WORKSPACE, account, format!("scale-{index}"), name)
            }
        })
        .collect()
}

/// (tracked, measure, quantity, cost) the configuration above gives an action.
fn expected_price(action: &RawAction) -> (bool, &'static str, Decimal, Decimal) {
    match action.action_name.as_str() {
        "web_search" => (true, "unit", dec("1"), dec("0.005")),
        "llm_call" => {
            let tokens =
                Decimal::from(action.input_tokens.unwrap() + action.output_tokens.unwrap());
            (true, "token", tokens, tokens * dec("0.000037"))
        }
        _ => (false, "", Decimal::ZERO, Decimal::ZERO),
    }
}

/// `agentmeter_enricher_records_in_total` of the enricher serving metrics on `port` (0 before
/// its first batch; `None` when it does not answer).
fn records_in(port: u16) -> Option<u64> {
    let text = metrics_text(port)?;
    Some(
        text.lines()
            .find_map(|line| line.strip_prefix("agentmeter_enricher_records_in_total "))
            .map(|value| value.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or(0),
    )
}

/// The consumer group's committed offsets on `topic` (OffsetFetch only; this client never joins
/// the group). -1 where nothing is committed; `None` when the broker does not answer in time
/// (tansu holds group requests while a join is pending), as it is only reported.
fn committed_offsets(group_id: &str, topic: &str) -> Option<Vec<i64>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .ok()?;
    let offsets = (0..PARTITIONS)
        .map(|partition| {
            match committed
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(rdkafka::Offset::Offset(offset)) => offset,
                _ => -1,
            }
        })
        .collect();
    Some(offsets)
}

/// High watermarks (records so far) of every partition of `topic`; retried for up to a minute
/// (tansu can answer slowly while a group join is pending).
fn high_watermarks(consumer: &BaseConsumer, topic: &str) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let highs: Result<Vec<i64>, _> = (0..PARTITIONS)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .map(|(_, high)| high)
            })
            .collect();
        match highs {
            Ok(highs) => return highs,
            Err(error) if Instant::now() < deadline => {
                eprintln!("watermarks of {topic} not available yet: {error}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => panic!("no watermarks of {topic} for a minute: {error}"),
        }
    }
}

#[test]
fn every_action_reaches_enriched_topic_when_one_of_two_enrichers_is_killed() {
    let test_started = Instant::now();
    let total: usize = std::env::var("AGENTMETER_SCALING_TEST_ACTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ACTIONS);
    let mut env = TestEnv::new(
        "enrich_scaling",
        // Hand-over of a dead member's partitions is what a consumer group does (ADR 0003).
        "[enricher.ownership]\nmode = \"group\"\n",
    );
    let secrets: Vec<(&str, String)> = ACCOUNTS
        .iter()
        .map(|account| (*account, format!("secret-{account}")))
        .collect();
    let secret_refs: Vec<(&str, &str)> = secrets.iter().map(|(a, s)| (*a, s.as_str())).collect();
    env.apply_config(&metering_config(WORKSPACE, &secret_refs, METERING));

    // Two enrichers of one group on one host: each needs its own static member id (the default,
    // `enricher-<host name>`, would make them one member) and its own metrics port.
    let victim_port = env.run.enricher_metrics_port;
    let survivor_port = free_port();
    let victim_listen = format!("127.0.0.1:{victim_port}");
    let survivor_listen = format!("127.0.0.1:{survivor_port}");
    let victim = env.spawn_with_env(
        "enrich",
        "enrich-a",
        &[
            ("AGENTMETER__ENRICHER__GROUP_INSTANCE_ID", "enrich-a"),
            ("AGENTMETER__ENRICHER__METRICS_LISTEN", &victim_listen),
        ],
    );
    let survivor = env.spawn_with_env(
        "enrich",
        "enrich-b",
        &[
            ("AGENTMETER__ENRICHER__GROUP_INSTANCE_ID", "enrich-b"),
            ("AGENTMETER__ENRICHER__METRICS_LISTEN", &survivor_listen),
        ],
    );
    for port in [victim_port, survivor_port] {
        env.wait_http_ok(
            &format!("http://127.0.0.1:{port}/healthz"),
            Duration::from_secs(60),
        );
    }

    let now_micros = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    let actions = Arc::new(generate(total, now_micros));
    let raw_topic = format!("{}actions.raw", env.run.topic_prefix);
    let enriched_topic = format!("{}actions.enriched", env.run.topic_prefix);

    // The generator: straight to actions.raw, keyed like every publisher, each action once, at
    // the pace described at TICK (records keep flowing before, at and after the kill).
    let sent = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let raw_partitions = Arc::new(Mutex::new(BTreeMap::<i32, usize>::new()));
    let send_retries = Arc::new(AtomicUsize::new(0));
    let generator = {
        let (actions, sent, killed) = (actions.clone(), sent.clone(), killed.clone());
        let (raw_partitions, send_retries) = (raw_partitions.clone(), send_retries.clone());
        let topic = raw_topic.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let producer: FutureProducer = publisher_config().create().unwrap();
                let full_pace_limit = (actions.len() as f64 * FULL_PACE_BEFORE_KILL) as usize;
                let mut next = 0;
                while next < actions.len() {
                    let tick = tokio::time::sleep(TICK);
                    let size = if killed.load(Ordering::Relaxed) {
                        CHUNK_AFTER_KILL
                    } else if next < full_pace_limit {
                        CHUNK_BEFORE_KILL
                    } else {
                        TRICKLE
                    };
                    let end = (next + size).min(actions.len());
                    let deliveries = actions[next..end].iter().map(|action| {
                        let payload = encode_raw_action(action).unwrap();
                        let key = action.message_key();
                        let event_id = action.event_id.clone();
                        let producer = producer.clone();
                        let topic = topic.clone();
                        let send_retries = send_retries.clone();
                        async move {
                            // A publisher re-sends what the broker did not acknowledge (same event
                            // id; the shared broker answers errors at times under load).
                            let mut attempt = 0;
                            loop {
                                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                                match producer.send(record, Duration::from_secs(30)).await {
                                    Ok(delivery) => break delivery.partition,
                                    Err((error, _)) => {
                                        attempt += 1;
                                        send_retries.fetch_add(1, Ordering::Relaxed);
                                        assert!(attempt < 20, "{event_id} not sent: {error}");
                                        tokio::time::sleep(Duration::from_millis(500)).await;
                                    }
                                }
                            }
                        }
                    });
                    let partitions = futures::future::join_all(deliveries).await;
                    {
                        let mut counts = raw_partitions.lock().unwrap();
                        for partition in partitions {
                            *counts.entry(partition).or_default() += 1;
                        }
                    }
                    sent.store(end, Ordering::Relaxed);
                    next = end;
                    tick.await;
                }
            });
        })
    };

    // Both members must own partitions before the kill: both have enriched records, and the
    // victim's count has moved at each of the last looks (300 ms apart), up to the kill.
    let watermarks: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "agentmeter-test-watermarks")
        .create()
        .unwrap();
    let both_active_deadline = Instant::now() + Duration::from_secs(90);
    let mut previous_victim = 0;
    let mut active_looks = 0;
    let (victim_in, survivor_in) = loop {
        let victim_in = records_in(victim_port).unwrap_or(0);
        let survivor_in = records_in(survivor_port).unwrap_or(0);
        active_looks = match survivor_in > 0 && victim_in > previous_victim {
            true => active_looks + 1,
            false => 0,
        };
        if active_looks >= ACTIVE_LOOKS_BEFORE_KILL {
            break (victim_in, survivor_in);
        }
        previous_victim = victim_in;
        assert!(
            Instant::now() < both_active_deadline,
            "the two enrichers did not both enrich records within 90 s (enrich-a {victim_in}, enrich-b {survivor_in}, sent {})\n{}",
            sent.load(Ordering::Relaxed),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    // SIGKILL one of them, mid-stream; it is not restarted.
    let killed_at = Instant::now();
    env.process(victim).kill();
    killed.store(true, Ordering::Relaxed);
    let sent_at_kill = sent.load(Ordering::Relaxed);
    let enriched_at_kill = high_watermarks(&watermarks, &enriched_topic);
    let enriched_records_at_kill: i64 = enriched_at_kill.iter().sum();
    let group_id = format!("{}enricher", env.run.topic_prefix);
    let committed_at_kill = committed_offsets(&group_id, &raw_topic);
    eprintln!(
        "killed enrich-a after {:.1?}: sent {sent_at_kill} of {total}, enriched records so far {enriched_records_at_kill} {enriched_at_kill:?}; records in before the kill: enrich-a {victim_in}, enrich-b {survivor_in}; group's committed raw offsets {committed_at_kill:?}",
        test_started.elapsed()
    );
    assert!(!env.process(victim).is_running(), "enrich-a still runs");
    assert!(
        sent_at_kill < total,
        "the kill must happen while actions are still being sent"
    );
    assert!(
        enriched_records_at_kill > 0 && (enriched_records_at_kill as usize) < total,
        "the kill must happen mid-stream: {enriched_records_at_kill} enriched of {total}"
    );

    // The dead member's partitions: enriched partitions that stop growing although their raw
    // partitions keep receiving actions (keys keep their partition through the enricher).
    std::thread::sleep(Duration::from_secs(2));
    let (raw_before, enriched_before) = (
        high_watermarks(&watermarks, &raw_topic),
        high_watermarks(&watermarks, &enriched_topic),
    );
    std::thread::sleep(Duration::from_secs(4));
    let (raw_after, enriched_after) = (
        high_watermarks(&watermarks, &raw_topic),
        high_watermarks(&watermarks, &enriched_topic),
    );
    let orphaned: Vec<usize> = (0..PARTITIONS as usize)
        .filter(|p| raw_after[*p] > raw_before[*p] && enriched_after[*p] == enriched_before[*p])
        .collect();
    let progressing: Vec<usize> = (0..PARTITIONS as usize)
        .filter(|p| enriched_after[*p] > enriched_before[*p])
        .collect();
    eprintln!(
        "after the kill: partitions {orphaned:?} stalled (owned by the dead member), {progressing:?} enriched by the survivor"
    );
    if let Some(committed) = &committed_at_kill {
        let uncommitted: i64 = orphaned
            .iter()
            .map(|p| enriched_at_kill[*p] - committed[*p].max(0))
            .sum();
        eprintln!(
            "the dead member had enriched {uncommitted} records past its last committed offsets (they will be enriched again)"
        );
    }
    assert!(
        !orphaned.is_empty() && !progressing.is_empty(),
        "each enricher must have owned partitions at the kill: stalled {orphaned:?}, progressing {progressing:?} (raw {raw_before:?} → {raw_after:?}, enriched {enriched_before:?} → {enriched_after:?})\n{}",
        env.logs()
    );

    // Takeover: every stalled partition grows again (the survivor enriches its backlog).
    let takeover_deadline = killed_at + Duration::from_secs(150);
    let takeover = loop {
        let now = high_watermarks(&watermarks, &enriched_topic);
        if orphaned.iter().all(|p| now[*p] > enriched_after[*p]) {
            break killed_at.elapsed();
        }
        assert!(
            Instant::now() < takeover_deadline,
            "partitions {orphaned:?} of the killed enricher were not taken over within 150 s (enriched {now:?})\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "survivor took over partitions {orphaned:?} {takeover:.1?} after the kill (sent so far {})",
        sent.load(Ordering::Relaxed)
    );

    generator.join().unwrap();
    let raw_partitions = raw_partitions.lock().unwrap().clone();
    assert_eq!(
        raw_partitions.len(),
        PARTITIONS as usize,
        "actions spread over every partition: {raw_partitions:?}"
    );
    eprintln!(
        "generator done after {:.1?}: {total} actions, per raw partition {raw_partitions:?}, {} sends retried",
        test_started.elapsed(),
        send_retries.load(Ordering::Relaxed)
    );

    // Read actions.enriched until every event id is there (or the deadline says it never will).
    let sent_ids: BTreeSet<&str> = actions.iter().map(|a| a.event_id.as_str()).collect();
    assert_eq!(sent_ids.len(), total, "event ids are distinct");
    let complete_deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let available: i64 = high_watermarks(&watermarks, &enriched_topic).iter().sum();
        if available as usize >= total {
            let records = env.read_topic("actions.enriched");
            let present: BTreeSet<String> = records
                .iter()
                .filter_map(|r| decode_enriched_action(&r.payload).ok())
                .map(|a| a.raw.event_id)
                .collect();
            if sent_ids.iter().all(|id| present.contains(*id)) {
                break records;
            }
            if Instant::now() >= complete_deadline {
                break records;
            }
        }
        assert!(
            Instant::now() < complete_deadline,
            "only {available} enriched records of {total} actions after 60 s\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };

    // Every record decodes, belongs to a sent action, carries it unchanged and is priced right.
    let by_id: HashMap<&str, &RawAction> =
        actions.iter().map(|a| (a.event_id.as_str(), a)).collect();
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    let mut duplicates_by_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for record in &records {
        let enriched = decode_enriched_action(&record.payload).unwrap_or_else(|error| {
            panic!(
                "enriched record at partition {} offset {} does not decode: {error}",
                record.partition, record.offset
            )
        });
        let event_id = enriched.raw.event_id.clone();
        let Some(sent) = by_id.get(event_id.as_str()) else {
            panic!("enriched record of an action never sent: {event_id}");
        };
        assert_eq!(&enriched.raw, *sent, "raw part of {event_id}");
        assert_eq!(
            record.key.as_deref(),
            Some(sent.message_key().as_bytes()),
            "key of {event_id}"
        );
        let (tracked, measure, quantity, cost) = expected_price(sent);
        assert_eq!(
            (
                enriched.tracked,
                enriched.measure.as_str(),
                enriched.quantity,
                enriched.cost,
                enriched.outcome,
                enriched.config_version,
                enriched.currency.as_str()
            ),
            (tracked, measure, quantity, cost, false, 1, "USD"),
            "enrichment of {event_id} ({} {:?}+{:?} tokens)",
            sent.action_name,
            sent.input_tokens,
            sent.output_tokens
        );
        let seen = copies.entry(event_id).or_default();
        if *seen > 0 {
            *duplicates_by_partition.entry(record.partition).or_default() += 1;
        }
        *seen += 1;
    }
    // Two sampled actions, spelled out: a web search and an LLM call.
    for sample in ["web_search", "llm_call"] {
        let action = actions.iter().find(|a| a.action_name == sample).unwrap();
        let enriched = records
            .iter()
            .map(|r| decode_enriched_action(&r.payload).unwrap())
            .find(|e| e.raw.event_id == action.event_id)
            .unwrap();
        eprintln!(
            "sample {}: {} quantity {} cost {}",
            action.event_id, sample, enriched.quantity, enriched.cost
        );
    }

    let present: BTreeSet<&str> = copies.keys().map(String::as_str).collect();
    let missing: Vec<&&str> = sent_ids.difference(&present).collect();
    let duplicates = records.len() - present.len();
    let duplicated_ids = copies.values().filter(|n| **n > 1).count();
    eprintln!(
        "sent {total}, enriched records {}, distinct event ids present {}, missing {}, duplicates {duplicates} (of {duplicated_ids} actions; per partition {duplicates_by_partition:?}), takeover {takeover:.1?} after the kill, test time {:.1?}",
        records.len(),
        present.len(),
        missing.len(),
        test_started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "{} sent actions never reached actions.enriched, e.g. {:?}\n{}",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        env.logs()
    );
    assert_eq!(present, sent_ids);
    let dead_letters = env.read_topic("actions.dlq");
    assert!(
        dead_letters.is_empty(),
        "{} dead letters, e.g. {:?}",
        dead_letters.len(),
        dead_letters.first().map(|r| &r.headers)
    );
    assert!(
        env.process(survivor).is_running(),
        "the surviving enricher stopped\n{}",
        env.logs()
    );
    eprintln!(
        "group's committed raw offsets at the end {:?}, raw high watermarks {:?}",
        committed_offsets(&group_id, &raw_topic),
        high_watermarks(&watermarks, &raw_topic)
    );
    let survivor_log = std::fs::read_to_string(&env.process(survivor).log_path).unwrap();
    for line in survivor_log
        .lines()
        .filter(|l| l.contains("consumer group"))
    {
        // Without the terminal colours of the log.
        let mut plain = String::new();
        let mut in_escape = false;
        for c in line.chars() {
            match (in_escape, c) {
                (false, '\u{1b}') => in_escape = true,
                (false, c) => plain.push(c),
                (true, 'm') => in_escape = false,
                (true, _) => {}
            }
        }
        eprintln!("enrich-b: {plain}");
    }
}
