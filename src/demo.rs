//! `agentmeter demo`: the guide's research-agent flow for two customer accounts, sent through
//! ingest's REST API with the demo agent secrets, then a usage summary read back from ClickHouse.

use std::time::{Duration, Instant};

use agentmeter_schemas::decimal::from_scaled_i128;
use agentmeter_schemas::rest::{RestAction, RestActionBatch};
use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::Settings;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Research sessions to run per account (each sends web_search, llm_call, delivery, ...).
    #[arg(long, default_value_t = 200)]
    pub sessions: usize,
    /// Base URL of ingest.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,
    /// Agent secret of the first demo account (Acme Corp).
    #[arg(
        long,
        env = "ACME_AGENT_SECRET",
        default_value = "am_demo_acme_research_secret"
    )]
    pub acme_secret: String,
    /// Agent secret of the second demo account (Globex).
    #[arg(
        long,
        env = "GLOBEX_AGENT_SECRET",
        default_value = "am_demo_globex_support_secret"
    )]
    pub globex_secret: String,
    /// How long to wait for the actions to be queryable in ClickHouse.
    #[arg(long, default_value_t = 120)]
    pub wait_seconds: u64,
}

/// One session of the guide's research agent for one user; its steps a second apart, the
/// sessions of one run in the last minutes before `now`.
fn session(
    run_id: &str,
    account: &str,
    index: usize,
    now: time::OffsetDateTime,
) -> Vec<RestAction> {
    let user = format!("user_{account}_{}", index % 7);
    let event = |step: &str| Some(format!("demo-{run_id}-{account}-{index}-{step}"));
    let session_start = now - time::Duration::seconds(5 * (1 + index as i64 % 60));
    let mut step_number = 0i64;
    let mut action = |step: &str, name: &str, description: &str, attributes: serde_json::Value| {
        let occurred_at = session_start + time::Duration::seconds(step_number);
        step_number += 1;
        RestAction {
            event_id: event(step),
            action_name: name.to_string(),
            user_id: Some(user.clone()),
            anonymous_id: None,
            occurred_at: occurred_at
                .format(&time::format_description::well_known::Rfc3339)
                .ok(),
            description: Some(description.to_string()),
            attributes: attributes.as_object().cloned().unwrap_or_default(),
        }
    };
    let mut actions = vec![
        action(
            "search",
            "web_search",
            "Searched for: market trends in AI",
            json!({"results_count": 2 + index % 5, "search_provider": "google"}),
        ),
        action(
            "llm",
            "llm_call",
            "Summarized search results",
            json!({"model": "gpt-4", "input_tokens": 2000 + (index % 10) * 50, "output_tokens": 600 + (index % 4) * 100, "cost_usd": 0.12}),
        ),
        action(
            "delivery",
            "delivery",
            "Sent summary to user",
            json!({"delivery_method": "email"}),
        ),
    ];
    if index.is_multiple_of(3) {
        actions.push(action(
            "detect",
            "object_detection",
            "Detected 4 objects in invoice",
            json!({"detected_boxes": 4, "model": "yolov8-invoice"}),
        ));
    }
    if index.is_multiple_of(4) {
        actions.push(action(
            "step",
            "step_1",
            "An untracked step (Live Data only)",
            json!({}),
        ));
    }
    actions
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct CountRow {
    count: u64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SummaryRow {
    account_id: String,
    action_name: String,
    actions: u64,
    quantity: i128,
    cost: i128,
    outcomes: u64,
}

pub async fn run(args: DemoArgs, settings: &Settings) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_string();
    let now = time::OffsetDateTime::now_utc();
    let http = reqwest::Client::new();
    let mut sent = 0usize;
    let started = Instant::now();
    for (account, secret) in [("acme", &args.acme_secret), ("globex", &args.globex_secret)] {
        let actions: Vec<RestAction> = (0..args.sessions)
            .flat_map(|index| session(&run_id, account, index, now))
            .collect();
        for chunk in actions.chunks(500) {
            let batch = RestActionBatch {
                actions: chunk.to_vec(),
            };
            let response = http
                .post(format!("{}/v1/actions", args.ingest_url))
                .header("X-Agent-Secret", secret.as_str())
                .json(&batch)
                .send()
                .await
                .with_context(|| format!("cannot reach ingest at {}", args.ingest_url))?;
            let status = response.status();
            anyhow::ensure!(
                status.is_success(),
                "ingest answered {status}: {}",
                response.text().await.unwrap_or_default()
            );
            sent += chunk.len();
        }
    }
    println!(
        "sent {sent} actions for 2 accounts in {:.2}s (run {run_id})",
        started.elapsed().as_secs_f64()
    );

    let database = &settings.clickhouse.database;
    let client = settings.clickhouse.client();
    let deadline = Instant::now() + Duration::from_secs(args.wait_seconds);
    let count_query = format!("SELECT count() AS count FROM {database}.actions FINAL WHERE event_id LIKE 'demo-{run_id}-%'");
    loop {
        let arrived = client
            .query(&count_query)
            .fetch_one::<CountRow>()
            .await
            .map(|row| row.count)
            .unwrap_or(0);
        if arrived as usize >= sent {
            println!(
                "all {sent} actions queryable in ClickHouse after {:.2}s (right after the stages \
                 start, this includes the aggregator's first flush and the enricher's first batch)",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {arrived} of {sent} actions reached ClickHouse within {}s",
            args.wait_seconds
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Usage is flushed at the same time as the actions, but wait one flush interval to be sure.
    tokio::time::sleep(Duration::from_millis(
        settings.aggregator.flush_interval_ms + 500,
    ))
    .await;
    // The outcomes stage derives research_completed from what the aggregator wrote: wait until
    // its progress covers the aggregator's.
    let caught_up_query = format!(
        "SELECT toUInt64(ifNull((SELECT sum(value) FROM {database}.outcomes_progress FINAL WHERE key LIKE 'partition:%'), 0) \
         >= (SELECT sum(m) FROM (SELECT max(end_offset) AS m FROM {database}.aggregator_progress GROUP BY source_partition))) AS count"
    );
    loop {
        let caught_up = client
            .query(&caught_up_query)
            .fetch_one::<CountRow>()
            .await
            .map(|row| row.count == 1)
            .unwrap_or(false);
        if caught_up {
            println!(
                "composite outcomes derived after {:.2}s (agentmeter outcomes)",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        if Instant::now() >= deadline {
            println!("the outcomes stage has not caught up within {}s; research_completed may be missing below", args.wait_seconds);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let summary = client
        .query(&format!(
            "SELECT account_id, action_name, sum(actions) AS actions, sum(quantity) AS quantity, sum(cost) AS cost, \
             sum(outcomes) AS outcomes FROM {database}.usage_by_account_month \
             WHERE workspace_id = 'ws_demo' GROUP BY account_id, action_name ORDER BY account_id, action_name"
        ))
        .fetch_all::<SummaryRow>()
        .await
        .context("cannot read usage_by_account_month")?;
    println!();
    println!("Billable usage per account (workspace ws_demo, all runs so far; USD):");
    println!(
        "{:<12} {:<30} {:>9} {:>14} {:>14} {:>9}",
        "account", "action", "actions", "quantity", "cost", "outcomes"
    );
    let mut current_account = String::new();
    let mut account_cost = rust_decimal::Decimal::ZERO;
    let print_total = |account: &str, cost: rust_decimal::Decimal| {
        if !account.is_empty() {
            println!(
                "{:<12} {:<30} {:>9} {:>14} {:>14}",
                account,
                "TOTAL",
                "",
                "",
                cost.to_string()
            );
        }
    };
    for row in &summary {
        if row.account_id != current_account {
            print_total(&current_account, account_cost);
            current_account = row.account_id.clone();
            account_cost = rust_decimal::Decimal::ZERO;
        }
        let cost = from_scaled_i128(row.cost)?;
        account_cost += cost;
        println!(
            "{:<12} {:<30} {:>9} {:>14} {:>14} {:>9}",
            row.account_id,
            row.action_name,
            row.actions,
            from_scaled_i128(row.quantity)?.to_string(),
            cost.to_string(),
            row.outcomes
        );
    }
    print_total(&current_account, account_cost);
    println!();
    println!("Try: clickhouse-client --query \"SELECT * FROM {database}.live_data ORDER BY created_at DESC LIMIT 5 FORMAT PrettyCompact\"");
    Ok(())
}
