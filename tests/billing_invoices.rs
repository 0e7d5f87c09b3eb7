//! Draft invoices from the real pipeline: REST actions → broker → stages → ClickHouse →
//! `agentmeter invoices preview`, whose totals must equal what the test computes itself from
//! what it sent, with plain arithmetic (issue 10).

#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{dec, metering_config, post_until_accepted, Lcg, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const USAGE_SECRET: &str = "test-secret-billing-usage-51aa";
const BASE_SECRET: &str = "test-secret-billing-base-93c0";

/// acc_usage: outcomes at $50, graduated tiers on actions, $5 per user, token packages, a $99
/// fee with 10% off. acc_base: $99 including 20 actions then $0.25, at least $150, 5% off the
/// invoice.
const METERING: &str = r#"
[tagging]
tracked = ["web_search", "llm_call", "lead_converted"]

[[cost_allocations]]
action = "llm_call"
measure = "token"
rates = [{ effective_from = "2025-01-01T00:00:00Z", cost_per_unit = "0.00002" }]

[[outcomes]]
action = "lead_converted"

[[products]]
id = "agent"
name = "Test agent"
agent_type = "type_test"

[[products.rate_plans]]
id = "usage"
name = "Usage"
currency = "USD"
billing_cycle = "monthly"

[[products.rate_plans.charges]]
id = "leads"
name = "Converted leads"
metric = "@outcome"
model = { per_unit = { unit_price = "50" } }

[[products.rate_plans.charges]]
id = "searches"
name = "Searches"
metric = "@action"
actions = ["web_search"]
model = { tiered = { tiers = [{ up_to = "10", unit_price = "1" }, { unit_price = "0.5" }] } }

[[products.rate_plans.charges]]
id = "users"
name = "Users"
metric = "@user"
model = { per_unit = { unit_price = "5" } }

[[products.rate_plans.charges]]
id = "tokens"
name = "LLM tokens"
metric = "measure"
action = "llm_call"
measure = "token"
model = { package = { package_size = "1000", package_price = "2" } }

[[products.rate_plans.charges]]
id = "platform"
name = "Platform"
model = { flat = { fee = "99" } }
discount = { percent = "10" }

[[products.rate_plans]]
id = "base"
name = "Base"
currency = "USD"
billing_cycle = "monthly"
minimum_commitment = "150"
discounts = [{ percent = "5" }]

[[products.rate_plans.charges]]
id = "actions"
name = "Actions"
metric = "@action"
model = { overage = { fee = "99", included = "20", unit_price = "0.25" } }

[[subscriptions]]
id = "sub_usage"
account = "acc_usage"
product = "agent"
rate_plan = "usage"
start = "2025-01-01T00:00:00Z"

[[subscriptions]]
id = "sub_base"
account = "acc_base"
product = "agent"
rate_plan = "base"
start = "2025-01-01T00:00:00Z"
"#;

struct Sent {
    searches: u64,
    llm_tokens: u64,
    leads: u64,
    users: BTreeSet<String>,
    tracked: u64,
}

fn preview(env: &TestEnv, account: &str, at: &str) -> Value {
    let output = env.tool(&[
        "invoices",
        "preview",
        "--workspace",
        "ws_billing",
        "--account",
        account,
        "--at",
        at,
        "--json",
    ]);
    let start = output.find('[').expect("a JSON array");
    serde_json::from_str(&output[start..]).unwrap_or_else(|error| panic!("{error}: {output}"))
}

fn amount(value: &Value) -> Decimal {
    dec(value
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {value}")))
}

#[test]
fn draft_invoices_equal_what_the_test_computes_from_what_it_sent() {
    let env = billing_pipeline("billing", false);

    // Every action at one instant, so that all of them fall in the period previewed.
    let now = time::OffsetDateTime::now_utc();
    let at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut random = Lcg(7);
    let client = reqwest::blocking::Client::new();
    let mut sent = Vec::new();
    for (account, secret, count) in [
        ("acc_usage", USAGE_SECRET, 230),
        ("acc_base", BASE_SECRET, 57),
    ] {
        let mut totals = Sent {
            searches: 0,
            llm_tokens: 0,
            leads: 0,
            users: BTreeSet::new(),
            tracked: 0,
        };
        let mut items = Vec::new();
        for index in 0..count {
            let user = format!("user_{}", random.next(9));
            let (name, attributes) = match random.next(6) {
                0..=2 => ("web_search", json!({})),
                3 => {
                    let input = 1 + random.next(900);
                    let output = random.next(700);
                    totals.llm_tokens += input + output;
                    (
                        "llm_call",
                        json!({"model": "gpt-4", "input_tokens": input, "output_tokens": output}),
                    )
                }
                4 => ("lead_converted", json!({})),
                _ => ("untracked_step", json!({})),
            };
            match name {
                "web_search" => totals.searches += 1,
                "lead_converted" => totals.leads += 1,
                _ => {}
            }
            if name != "untracked_step" {
                totals.tracked += 1;
                totals.users.insert(user.clone());
            }
            items.push(json!({
                "event_id": format!("{account}-{index}"),
                "action_name": name,
                "occurred_at": at,
                "user_id": user,
                "attributes": attributes,
            }));
        }
        post_in_batches(&client, &env, secret, &items);
        sent.push((account, totals));
    }
    env.wait_for_count(
        "SELECT count() FROM actions FINAL",
        230 + 57,
        Duration::from_secs(120),
    );
    let tracked: u64 = sent.iter().map(|(_, totals)| totals.tracked).sum();
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact WHERE tracked = 1",
        tracked,
        Duration::from_secs(60),
    );

    // acc_usage, by hand: 50 per lead; searches 1 each up to 10, then 0.5; 5 per user; 2 per
    // started 1,000 tokens; 99 less 10%.
    let usage = &sent[0].1;
    let searches = Decimal::from(usage.searches.min(10))
        + Decimal::from(usage.searches.saturating_sub(10)) * dec("0.5");
    let packages = usage.llm_tokens.div_ceil(1000);
    let expected_usage = Decimal::from(usage.leads * 50)
        + searches
        + Decimal::from(usage.users.len() as u64 * 5)
        + Decimal::from(packages * 2)
        + dec("99")
        - dec("9.90");
    let invoices = preview(&env, "acc_usage", &at);
    let invoice = &invoices.as_array().unwrap()[0];
    assert_eq!(invoice["status"], "draft", "{invoice:#}");
    assert_eq!(amount(&invoice["total"]), expected_usage, "{invoice:#}");
    let quantity_of = |charge: &str| {
        let line = invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["charge_id"] == charge)
            .unwrap_or_else(|| panic!("no line {charge}: {invoice:#}"));
        amount(&line["quantity"])
    };
    assert_eq!(quantity_of("leads"), Decimal::from(usage.leads));
    assert_eq!(quantity_of("searches"), Decimal::from(usage.searches));
    assert_eq!(
        quantity_of("users"),
        Decimal::from(usage.users.len() as u64)
    );
    assert_eq!(quantity_of("tokens"), Decimal::from(usage.llm_tokens));
    // Next to it, the cost of the same usage (only llm_call has a cost allocation) and the margin.
    let cost = Decimal::from(usage.llm_tokens) * dec("0.00002");
    assert_eq!(amount(&invoice["cost"]), cost, "{invoice:#}");
    assert_eq!(
        amount(&invoice["margin"]),
        expected_usage - cost,
        "{invoice:#}"
    );

    // acc_base: 99 + 0.25 per action beyond 20, at least 150, then 5% off (rounded to cents).
    let base = &sent[1].1;
    let charges = dec("99") + Decimal::from(base.tracked.saturating_sub(20)) * dec("0.25");
    let before_discount = charges.max(dec("150"));
    let discount = (before_discount * dec("0.05"))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    let invoices = preview(&env, "acc_base", &at);
    let invoice = &invoices.as_array().unwrap()[0];
    assert_eq!(
        amount(&invoice["total"]),
        before_discount - discount,
        "{invoice:#}"
    );
    assert_eq!(
        amount(&invoice["minimum_shortfall"]),
        (dec("150") - charges).max(Decimal::ZERO)
    );

    // Every account at once, and the printable pages.
    let html_dir = env.dir.join("invoices");
    let output = env.tool(&[
        "invoices",
        "preview",
        "--workspace",
        "ws_billing",
        "--all",
        "--at",
        &at,
        "--json",
        "--html",
        html_dir.to_str().unwrap(),
    ]);
    let all: Value =
        serde_json::from_str(&output[output.find('[').unwrap()..output.rfind(']').unwrap() + 1])
            .unwrap_or_else(|error| panic!("{error}: {output}"));
    let accounts: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|invoice| invoice["bill_to"]["account_id"].as_str().unwrap())
        .collect();
    assert_eq!(accounts, vec!["acc_usage", "acc_base"]);
    let pages: Vec<String> = std::fs::read_dir(&html_dir)
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect();
    assert_eq!(pages.len(), 2);
    assert!(
        pages
            .iter()
            .any(|page| page.contains(&format!("{} USD", amount(&invoice["total"])))),
        "no page shows acc_base's total"
    );

    // config apply shows a changed price as a changed rate plan, and the next draft uses it.
    let cheaper = METERING.replace(
        r#"model = { overage = { fee = "99", included = "20", unit_price = "0.25" } }"#,
        r#"model = { overage = { fee = "99", included = "20", unit_price = "0.10" } }"#,
    );
    assert_ne!(cheaper, METERING);
    let applied = env.apply_config(&metering_config(
        "ws_billing",
        &[("acc_usage", USAGE_SECRET), ("acc_base", BASE_SECRET)],
        &cheaper,
    ));
    assert!(
        applied.contains("rate plans changed: agent/base"),
        "{applied}"
    );
    let charges = dec("99") + Decimal::from(base.tracked.saturating_sub(20)) * dec("0.10");
    let invoices = preview(&env, "acc_base", &at);
    assert_eq!(
        amount(&invoices[0]["subtotal"]),
        charges,
        "{:#}",
        invoices[0]
    );

    // plans simulate: acc_usage's real usage this month priced with the (now cheaper) base plan,
    // which nobody subscribed it to.
    let this_month = this_month_start();
    let next_month = (this_month + time::Duration::days(32))
        .replace_day(1)
        .unwrap();
    let simulated = env.tool(&[
        "plans",
        "simulate",
        "agent/base",
        "--workspace",
        "ws_billing",
        "--from",
        &format!("{}-{:02}", this_month.year(), u8::from(this_month.month())),
        "--to",
        &rfc3339(next_month),
        "--account",
        "acc_usage",
        "--json",
    ]);
    let simulated: Value = serde_json::from_str(&simulated[simulated.find('[').unwrap()..])
        .unwrap_or_else(|error| panic!("{error}: {simulated}"));
    let usage_tracked = sent[0].1.tracked;
    let charges = dec("99") + Decimal::from(usage_tracked.saturating_sub(20)) * dec("0.10");
    let before_discount = charges.max(dec("150"));
    let discount = (before_discount * dec("0.05"))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    assert_eq!(simulated.as_array().unwrap().len(), 1, "{simulated:#}");
    assert_eq!(
        amount(&simulated[0]["revenue"]),
        before_discount - discount,
        "{simulated:#}"
    );
    let cost = Decimal::from(usage.llm_tokens) * dec("0.00002");
    assert_eq!(amount(&simulated[0]["cost"]), cost, "{simulated:#}");
    let refused = env.tool_failing(&[
        "plans",
        "simulate",
        "agent/nope",
        "--workspace",
        "ws_billing",
        "--from",
        "2026-01",
        "--to",
        "2026-02",
    ]);
    assert!(refused.contains("no rate plan agent/nope"), "{refused}");

    // An account without a subscription gets no invoice; a bad id is refused.
    assert_eq!(preview(&env, "acc_nobody", &at), json!([]));
    let refused = env.tool_failing(&[
        "invoices",
        "preview",
        "--workspace",
        "ws_billing",
        "--account",
        "x' OR 1=1",
    ]);
    assert!(refused.contains("must be ids"), "{refused}");
}

/// ws_billing's pipeline (ingest, enrich, aggregate) on the test configuration, ready for
/// actions; `late_bound` lets ingest and the enricher accept actions up to 80 days old.
fn billing_pipeline(name: &str, late_bound: bool) -> TestEnv {
    let mut env = TestEnv::new(name, "");
    env.apply_config(&metering_config(
        "ws_billing",
        &[("acc_usage", USAGE_SECRET), ("acc_base", BASE_SECRET)],
        METERING,
    ));
    type Overrides<'a> = &'a [(&'a str, &'a str)];
    let (ingest, enrich): (Overrides, Overrides) = if late_bound {
        (
            &[("AGENTMETER__INGEST__MAX_LATE_SECONDS", "6912000")],
            &[("AGENTMETER__ENRICHER__MAX_LATE_SECONDS", "6912000")],
        )
    } else {
        (&[], &[])
    };
    env.spawn_with_env("ingest", "ingest", ingest);
    env.spawn_with_env("enrich", "enrich", enrich);
    env.spawn("aggregate", "aggregate");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    env
}

/// The first instant of this month (UTC, the test workspace's zone).
fn this_month_start() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
        .replace_day(1)
        .unwrap()
        .replace_time(time::Time::MIDNIGHT)
}

fn rfc3339(instant: time::OffsetDateTime) -> String {
    instant
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The invoices are numbered 1 and 2, one per account, with the totals of their drafts
/// (`drafts`: acc_usage's, acc_base's).
fn assert_numbered_once_with_the_drafts_totals(invoices: &[Value], drafts: [Decimal; 2]) {
    let numbers: Vec<u64> = invoices
        .iter()
        .map(|invoice| invoice["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2], "{invoices:#?}");
    assert_eq!(
        totals_by_account(invoices),
        vec![
            ("acc_base".to_string(), drafts[1]),
            ("acc_usage".to_string(), drafts[0])
        ]
    );
}

/// (account, total) of each invoice, sorted by account.
fn totals_by_account(invoices: &[Value]) -> Vec<(String, Decimal)> {
    let mut totals: Vec<(String, Decimal)> = invoices
        .iter()
        .map(|invoice| {
            (
                invoice["bill_to"]["account_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                amount(&invoice["total"]),
            )
        })
        .collect();
    totals.sort();
    totals
}

/// `items` posted to `/v1/actions` with `secret`, 100 per request, each until accepted.
fn post_in_batches(
    client: &reqwest::blocking::Client,
    env: &TestEnv,
    secret: &str,
    items: &[Value],
) {
    let url = format!("{}/v1/actions", env.ingest_url());
    for chunk in items.chunks(100) {
        post_until_accepted(
            client,
            &url,
            secret,
            &json!({ "actions": chunk }),
            Duration::from_secs(60),
            Duration::from_millis(200),
        );
    }
}

/// `count` actions of `account` at `at`, event ids `{prefix}-{index}`.
fn send_actions(env: &TestEnv, secret: &str, prefix: &str, count: usize, at: &str) {
    let client = reqwest::blocking::Client::new();
    let items: Vec<Value> = (0..count)
        .map(|index| {
            let name = if index % 4 == 0 {
                "lead_converted"
            } else {
                "web_search"
            };
            json!({
                "event_id": format!("{prefix}-{index}"),
                "action_name": name,
                "occurred_at": at,
                "user_id": format!("user_{}", index % 3),
            })
        })
        .collect();
    post_in_batches(&client, env, secret, &items);
}

/// The finalized invoices of ws_billing, as `invoices list --json` prints them.
fn finalized(env: &TestEnv) -> Vec<Value> {
    let output = env.tool(&["invoices", "list", "--workspace", "ws_billing", "--json"]);
    let start = output.find('[').expect("a JSON array");
    serde_json::from_str::<Value>(&output[start..])
        .unwrap_or_else(|error| panic!("{error}: {output}"))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn finalized_invoices_are_numbered_once_without_gaps_through_kills_and_racing_finalizers() {
    let env = billing_pipeline("billing_final", false);
    // The last hour of last month: a closed period, well within the enricher's lateness bound.
    let month_start = this_month_start();
    let at = rfc3339(month_start - time::Duration::hours(1));
    send_actions(&env, USAGE_SECRET, "usage", 40, &at);
    send_actions(&env, BASE_SECRET, "base", 25, &at);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        65,
        Duration::from_secs(120),
    );
    let draft_total = |account: &str| amount(&preview(&env, account, &at)[0]["total"]);
    let drafts = [draft_total("acc_usage"), draft_total("acc_base")];

    // The period has not been over for 72 hours yet on the first days of a month: with the
    // default grace the finalizer may refuse; with none it must finalize.
    let finalize_args = [
        "--config",
        env.settings_path.to_str().unwrap(),
        "invoices",
        "finalize",
        "--workspace",
        "ws_billing",
        "--all",
        "--at",
        &at,
        "--grace",
        "0s",
    ];
    // Finalizers SIGKILLed at once or a little later, then three racing each other.
    let mut random = Lcg(11);
    for _ in 0..4 {
        let mut child = std::process::Command::new(common::BINARY)
            .args(finalize_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + random.next(500)));
        let _ = child.kill();
        let _ = child.wait();
    }
    let racing: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(common::BINARY)
                .args(finalize_args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let racing: Vec<_> = racing
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    for output in &racing {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let invoices = finalized(&env);
    assert_numbered_once_with_the_drafts_totals(&invoices, drafts);
    assert!(invoices
        .iter()
        .all(|invoice| invoice["status"] == "finalized"));
    // Revenue, cost and margin are frozen with the invoice, for the views of docs/sql.md.
    let usage_preview = preview(&env, "acc_usage", &at)[0].clone();
    let frozen = env.query(
        "SELECT toString(total), toString(cost), toString(assumeNotNull(margin)), agent_type, product, rate_plan \
         FROM invoices FINAL WHERE account_id = 'acc_usage'",
    );
    assert_eq!(dec(&frozen[0][0]), amount(&usage_preview["total"]));
    assert_eq!(dec(&frozen[0][1]), amount(&usage_preview["cost"]));
    assert_eq!(dec(&frozen[0][2]), amount(&usage_preview["margin"]));
    assert_eq!(frozen[0][3..], ["type_test", "agent", "usage"]);
    // A second finalize is a no-op.
    let again = env.tool(&finalize_args[2..]);
    assert!(again.contains("already finalized"), "{again}");
    assert_eq!(finalized(&env), invoices);
    // The table is only the log's projection: emptied (as migration 0007 re-creates it), the
    // next `list` writes it again, the same.
    env.query("TRUNCATE TABLE invoices");
    assert!(env.query("SELECT number FROM invoices").is_empty());
    assert_eq!(finalized(&env), invoices);

    // A late action: the draft grows, the finalized invoice stays byte for byte what it was.
    let content_before = env.query("SELECT content FROM invoices FINAL ORDER BY number");
    send_actions(&env, BASE_SECRET, "late", 1, &at);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        66,
        Duration::from_secs(120),
    );
    let actions_line = |invoice: &Value| {
        invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["charge_id"] == "actions")
            .map(|line| amount(&line["quantity"]))
    };
    assert_eq!(
        actions_line(&preview(&env, "acc_base", &at)[0]),
        Some(Decimal::from(26))
    );
    env.tool(&finalize_args[2..]);
    assert_eq!(
        env.query("SELECT content FROM invoices FINAL ORDER BY number"),
        content_before
    );
    let base_invoice = finalized(&env)
        .into_iter()
        .find(|invoice| invoice["bill_to"]["account_id"] == "acc_base")
        .unwrap();
    assert_eq!(actions_line(&base_invoice), Some(Decimal::from(25)));
    let log = env.read_topic("billing.finalizations");
    eprintln!(
        "finalization log: {} records for 2 invoices (killed and racing finalizers)",
        log.len()
    );
    assert!(log.len() >= 2);

    // A finalized period holds back what it billed: repricing its plan is refused with what to
    // do instead; a change elsewhere is applied.
    let repriced = METERING.replace(
        r#"model = { overage = { fee = "99", included = "20", unit_price = "0.25" } }"#,
        r#"model = { overage = { fee = "99", included = "20", unit_price = "0.10" } }"#,
    );
    let path = common::write_file(
        &env.dir,
        "repriced.toml",
        &metering_config(
            "ws_billing",
            &[("acc_usage", USAGE_SECRET), ("acc_base", BASE_SECRET)],
            &repriced,
        ),
    );
    let refused = env.tool_failing(&["config", "apply", path.to_str().unwrap()]);
    assert!(
        refused.contains("rate plan agent/base") && refused.contains("add a new rate plan instead"),
        "{refused}"
    );
    let retagged = METERING.replace(
        r#"tracked = ["web_search", "llm_call", "lead_converted"]"#,
        r#"tracked = ["web_search", "llm_call", "lead_converted", "delivery"]"#,
    );
    assert_ne!(retagged, METERING);
    env.apply_config(&metering_config(
        "ws_billing",
        &[("acc_usage", USAGE_SECRET), ("acc_base", BASE_SECRET)],
        &retagged,
    ));

    // Void keeps the number; show prints the frozen invoice; a printable page.
    env.tool(&[
        "invoices",
        "void",
        "--workspace",
        "ws_billing",
        "--number",
        "1",
        "--reason",
        "wrong contact",
    ]);
    let after_void = finalized(&env);
    assert_eq!(after_void[0]["status"], "void");
    assert_eq!(after_void[0]["number"], 1);
    assert_eq!(after_void[1]["status"], "finalized");
    let page = env.dir.join("invoice-2.html");
    let shown = env.tool(&[
        "invoices",
        "show",
        "--workspace",
        "ws_billing",
        "--number",
        "2",
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(shown.contains("INVOICE 2"), "{shown}");
    assert!(std::fs::read_to_string(&page)
        .unwrap()
        .contains("INVOICE 2"));
    // Another workspace's number is not this one's.
    let missing = env.tool_failing(&[
        "invoices",
        "show",
        "--workspace",
        "ws_other",
        "--number",
        "2",
    ]);
    assert!(missing.contains("no finalized invoice 2"), "{missing}");
}

#[test]
fn late_usage_after_finalization_is_corrected_once_on_the_next_invoice() {
    // Actions of the month before last: up to 62 days old, beyond the default 35-day bound.
    let env = billing_pipeline("billing_late", true);
    let month_start = this_month_start();
    let last_month_start = (month_start - time::Duration::days(1))
        .replace_day(1)
        .unwrap();
    let in_earlier = rfc3339(last_month_start - time::Duration::hours(1));
    let in_later = rfc3339(month_start - time::Duration::hours(1));
    // Leads are every 4th action: 5 in the earlier period, 2 in the later one.
    send_actions(&env, USAGE_SECRET, "earlier", 20, &in_earlier);
    send_actions(&env, USAGE_SECRET, "later", 8, &in_later);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        28,
        Duration::from_secs(120),
    );
    let finalize = |at: &str| {
        env.tool(&[
            "invoices",
            "finalize",
            "--workspace",
            "ws_billing",
            "--account",
            "acc_usage",
            "--at",
            at,
            "--grace",
            "0s",
        ])
    };
    finalize(&in_earlier);
    let first = finalized(&env);
    assert_eq!(first.len(), 1, "{first:#?}");
    let first_total = amount(&first[0]["total"]);

    // Late: 1 lead and 3 searches of the earlier, finalized period.
    send_actions(&env, USAGE_SECRET, "late", 4, &in_earlier);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        32,
        Duration::from_secs(120),
    );
    let earlier_now = amount(&preview(&env, "acc_usage", &in_earlier)[0]["total"]);
    assert!(earlier_now > first_total);
    // --period names the same period by its month, in the workspace's time zone.
    let month = format!(
        "{}-{:02}",
        (last_month_start - time::Duration::days(1)).year(),
        u8::from((last_month_start - time::Duration::days(1)).month())
    );
    let by_month = env.tool(&[
        "invoices",
        "preview",
        "--workspace",
        "ws_billing",
        "--account",
        "acc_usage",
        "--period",
        &month,
        "--json",
    ]);
    let by_month: Value = serde_json::from_str(&by_month[by_month.find('[').unwrap()..])
        .unwrap_or_else(|error| panic!("{error}: {by_month}"));
    assert_eq!(amount(&by_month[0]["total"]), earlier_now);
    // The later period's draft shows the correction pending; finalizing freezes it.
    let later_draft = preview(&env, "acc_usage", &in_later)[0].clone();
    assert_eq!(later_draft["corrections"].as_array().map(Vec::len), Some(1));
    finalize(&in_later);
    let invoices = finalized(&env);
    assert_eq!(invoices.len(), 2, "{invoices:#?}");
    assert_eq!(invoices[0], first[0], "the first invoice never changes");
    let second = &invoices[1];
    assert_eq!(second["number"], 2);
    let fix = &second["corrections"][0];
    assert_eq!(fix["corrects_invoice"], 1);
    assert_eq!(amount(&fix["total_before"]), first_total);
    assert_eq!(amount(&fix["total_after"]), earlier_now);
    assert_eq!(amount(&fix["amount"]), earlier_now - first_total);
    assert_eq!(amount(&second["total"]), amount(&later_draft["total"]));
    // Summed over the invoices, the earlier period's leads are what was sent: 5 + 1.
    let billed_leads = |invoice: &Value| {
        invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["charge_id"] == "leads")
            .map(|line| amount(&line["quantity"]))
            .unwrap()
    };
    let lead_fix = fix["quantities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|quantity| quantity["charge_id"] == "leads")
        .expect("the leads changed");
    assert_eq!(amount(&lead_fix["before"]), billed_leads(&first[0]));
    assert_eq!(
        billed_leads(&first[0]) + amount(&lead_fix["after"]) - amount(&lead_fix["before"]),
        Decimal::from(6)
    );
    assert_eq!(billed_leads(second), Decimal::from(2));
    // Nothing is billed twice: finalizing both periods again changes nothing, and the next
    // draft has no correction left.
    finalize(&in_earlier);
    finalize(&in_later);
    assert_eq!(finalized(&env), invoices);
    let next = preview(&env, "acc_usage", &rfc3339(month_start))[0].clone();
    assert!(next["corrections"].is_null(), "{next:#}");
}

#[test]
fn the_billing_stage_finalizes_closed_periods_by_itself_through_sigkills() {
    let mut env = billing_pipeline("billing_stage", false);
    let month_start = this_month_start();
    let at = (month_start - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    send_actions(&env, USAGE_SECRET, "usage", 30, &at);
    send_actions(&env, BASE_SECRET, "base", 22, &at);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        52,
        Duration::from_secs(120),
    );
    let drafts = [
        amount(&preview(&env, "acc_usage", &at)[0]["total"]),
        amount(&preview(&env, "acc_base", &at)[0]["total"]),
    ];
    let port = agentmeter_testkit::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let stage_env = [
        ("AGENTMETER__BILLING__METRICS_LISTEN", listen.as_str()),
        ("AGENTMETER__BILLING__INTERVAL", "1s"),
        ("AGENTMETER__BILLING__GRACE", "0s"),
        ("AGENTMETER__BILLING__LOOKBACK_PERIODS", "1"),
    ];
    // Killed at random instants, restarted at once: a run may die anywhere in finalization.
    let mut random = Lcg(5);
    for round in 0..4 {
        let stage = env.spawn_with_env("billing", &format!("billing-{round}"), &stage_env);
        std::thread::sleep(Duration::from_millis(200 + random.next(1200)));
        env.process(stage).kill();
    }
    let stage = env.spawn_with_env("billing", "billing-last", &stage_env);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while finalized(&env).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the billing stage finalized {} invoices\n{}",
            finalized(&env).len(),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Later runs find nothing more to do.
    std::thread::sleep(Duration::from_secs(3));
    let invoices = finalized(&env);
    assert_numbered_once_with_the_drafts_totals(&invoices, drafts);
    assert!(env.process(stage).is_running(), "{}", env.logs());
    env.wait_http_ok(&format!("http://{listen}/readyz"), Duration::from_secs(10));
    let metrics = common::metrics_text(port.parse().unwrap()).expect("metrics");
    assert!(
        metrics.contains("agentmeter_billing_runs_total{result=\"ok\"}"),
        "{metrics}"
    );
    // Each invoice a stage finalizes is logged and counted. (Which stage finalizes them is a
    // race: a stage SIGKILLed right after appending leaves its invoices to be found, already
    // finalized, by the next — so the last stage's own log and counter must agree.)
    let last_log = std::fs::read_to_string(env.dir.join("billing-last.log")).unwrap();
    let logged = last_log.matches("finalized invoice").count();
    let counted = metrics
        .lines()
        .find(|line| line.starts_with("agentmeter_billing_invoices_finalized_total"))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |value| value.parse::<f64>().unwrap() as usize);
    assert_eq!(logged, counted, "{last_log}\n{metrics}");
    let logged_by_all: usize = std::fs::read_dir(&env.dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("billing-") && name.ends_with(".log"))
        })
        .map(|path| {
            std::fs::read_to_string(path)
                .unwrap()
                .matches("finalized invoice")
                .count()
        })
        .sum();
    assert!(
        logged_by_all <= 2,
        "two invoices, each logged by the one stage that finalized it: {logged_by_all}"
    );
    eprintln!(
        "billing stage: {} finalization records for 2 invoices after 4 SIGKILLs",
        env.read_topic("billing.finalizations").len()
    );
}

#[test]
fn a_void_invoice_is_reissued_once_as_the_next_number_and_its_period_billed_once() {
    let env = billing_pipeline("billing_reissue", true);
    let month_start = this_month_start();
    let last_month_start = (month_start - time::Duration::days(1))
        .replace_day(1)
        .unwrap();
    let in_earlier = rfc3339(last_month_start - time::Duration::hours(1));
    let in_later = rfc3339(month_start - time::Duration::hours(1));
    // Leads are every 4th action: 5 in the earlier period, 2 in the later one.
    send_actions(&env, USAGE_SECRET, "earlier", 20, &in_earlier);
    send_actions(&env, USAGE_SECRET, "later", 8, &in_later);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        28,
        Duration::from_secs(120),
    );
    let finalize = |at: &str| {
        env.tool(&[
            "invoices",
            "finalize",
            "--workspace",
            "ws_billing",
            "--account",
            "acc_usage",
            "--at",
            at,
            "--grace",
            "0s",
        ])
    };
    let reissue = |number: &str| {
        env.tool(&[
            "invoices",
            "reissue",
            "--workspace",
            "ws_billing",
            "--number",
            number,
        ])
    };
    let void = |number: &str| {
        env.tool(&[
            "invoices",
            "void",
            "--workspace",
            "ws_billing",
            "--number",
            number,
            "--reason",
            "redo",
        ])
    };
    finalize(&in_earlier);
    // A late lead of the earlier period, corrected on the later period's invoice (2).
    send_actions(&env, USAGE_SECRET, "late", 4, &in_earlier);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        32,
        Duration::from_secs(120),
    );
    let earlier_now = amount(&preview(&env, "acc_usage", &in_earlier)[0]["total"]);
    finalize(&in_later);
    let before = finalized(&env);
    assert_eq!(before.len(), 2, "{before:#?}");
    let fix_amount = amount(&before[1]["corrections"][0]["amount"]);

    // Only a void invoice is reissued.
    let refused = env.tool_failing(&[
        "invoices",
        "reissue",
        "--workspace",
        "ws_billing",
        "--number",
        "1",
    ]);
    assert!(refused.contains("is not void"), "{refused}");
    void("1");
    // Finalizing the voided period again does nothing by itself.
    assert!(finalize(&in_earlier).contains("already finalized"));
    assert_eq!(finalized(&env).len(), 2);

    // Two reissuers at once: one new invoice, number 3.
    let outputs: Vec<String> = std::thread::scope(|scope| {
        let racing: Vec<_> = (0..2).map(|_| scope.spawn(|| reissue("1"))).collect();
        racing
            .into_iter()
            .map(|racer| racer.join().unwrap())
            .collect()
    });
    assert!(
        outputs.iter().all(|output| output.contains("as invoice 3")),
        "{outputs:#?}"
    );
    assert!(reissue("1").contains("already reissued as invoice 3"));
    let invoices = finalized(&env);
    assert_eq!(invoices.len(), 3, "{invoices:#?}");
    assert_eq!(invoices[0]["status"], "void");
    assert_eq!(invoices[1], before[1], "invoice 2 never changes");
    let third = &invoices[2];
    assert_eq!(third["number"], 3);
    assert_eq!(third["status"], "finalized");
    assert_eq!(third["reissues"], 1);
    assert_eq!(third["period_start"], before[0]["period_start"]);
    // It bills the period anew (6 leads now) and takes back invoice 2's correction of it.
    let leads = |invoice: &Value| {
        invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["charge_id"] == "leads")
            .map(|line| amount(&line["quantity"]))
            .unwrap()
    };
    assert_eq!(leads(third), Decimal::from(6));
    let takeback = &third["corrections"][0];
    assert_eq!(takeback["corrects_invoice"], 1);
    assert_eq!(amount(&takeback["amount"]), -fix_amount);
    assert_eq!(amount(&third["total"]), earlier_now - fix_amount);
    let shown = env.tool(&[
        "invoices",
        "show",
        "--workspace",
        "ws_billing",
        "--number",
        "3",
    ]);
    assert!(shown.contains("replaces void invoice 1"), "{shown}");
    // The next draft has nothing left to correct: the period is billed once.
    let next = preview(&env, "acc_usage", &rfc3339(month_start))[0].clone();
    assert!(next["corrections"].is_null(), "{next:#}");

    // A reissue can be voided and reissued in turn.
    void("3");
    assert!(reissue("3").contains("as invoice 4"));
    let invoices = finalized(&env);
    assert_eq!(invoices.len(), 4, "{invoices:#?}");
    assert_eq!(invoices[2]["status"], "void");
    assert_eq!(invoices[3]["reissues"], 3);
    assert_eq!(amount(&invoices[3]["total"]), earlier_now - fix_amount);
    let next = preview(&env, "acc_usage", &rfc3339(month_start))[0].clone();
    assert!(next["corrections"].is_null(), "{next:#}");
}

/// acc_base moves from the base plan to the usage plan on the 16th of last month: two drafts
/// of that month, each with its fees prorated by its share of the month and billing only the
/// usage that occurred under it — together every action once.
#[test]
fn a_plan_change_mid_cycle_prorates_fees_and_splits_usage_by_the_plan_in_force() {
    let env = billing_pipeline("billing_plan_change", true);
    let month_start = this_month_start();
    let last_month_start = (month_start - time::Duration::days(1))
        .replace_day(1)
        .unwrap();
    let change = last_month_start + time::Duration::days(15);
    let changed = METERING.replace(
        "rate_plan = \"base\"\nstart = \"2025-01-01T00:00:00Z\"\n",
        &format!(
            "rate_plan = \"base\"\nstart = \"2025-01-01T00:00:00Z\"\nend = \"{change}\"\n\n\
             [[subscriptions]]\nid = \"sub_base_usage\"\naccount = \"acc_base\"\nproduct = \"agent\"\n\
             rate_plan = \"usage\"\nstart = \"{change}\"\n",
            change = rfc3339(change)
        ),
    );
    assert_ne!(changed, METERING);
    env.apply_config(&metering_config(
        "ws_billing",
        &[("acc_usage", USAGE_SECRET), ("acc_base", BASE_SECRET)],
        &changed,
    ));
    // 30 actions in the hour before the change, 12 in the hour after (a quarter of each are
    // lead_converted outcomes, the rest web searches; users user_0..user_2).
    send_actions(
        &env,
        BASE_SECRET,
        "before",
        30,
        &rfc3339(change - time::Duration::minutes(30)),
    );
    send_actions(
        &env,
        BASE_SECRET,
        "after",
        12,
        &rfc3339(change + time::Duration::minutes(30)),
    );
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        42,
        Duration::from_secs(120),
    );

    let drafts = preview(&env, "acc_base", &rfc3339(change));
    assert_eq!(drafts.as_array().unwrap().len(), 2, "{drafts:#}");
    let of = |subscription: &str| {
        drafts
            .as_array()
            .unwrap()
            .iter()
            .find(|draft| draft["subscription_id"] == subscription)
            .unwrap_or_else(|| panic!("no draft of {subscription}: {drafts:#}"))
            .clone()
    };
    let line = |draft: &Value, charge: &str| {
        draft["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["charge_id"] == charge)
            .unwrap_or_else(|| panic!("no line {charge}: {draft:#}"))
            .clone()
    };
    let (base, usage) = (of("sub_base"), of("sub_base_usage"));
    assert_eq!(base["from"], rfc3339(last_month_start));
    assert_eq!(base["to"], rfc3339(change));
    assert_eq!(usage["from"], rfc3339(change));
    assert_eq!(usage["to"], rfc3339(month_start));
    let days = Decimal::from((month_start - last_month_start).whole_days());
    let (base_share, usage_share) = (amount(&base["share"]), amount(&usage["share"]));
    assert_eq!(base_share.round_dp(12), (dec("15") / days).round_dp(12));
    assert_eq!(
        usage_share.round_dp(12),
        ((days - dec("15")) / days).round_dp(12)
    );

    // Each plan bills the usage that occurred under it: all 30 earlier actions on base…
    assert_eq!(amount(&line(&base, "actions")["quantity"]), dec("30"));
    // …and on the usage plan only the 12 later ones: 9 searches, 3 leads, 3 users.
    assert_eq!(amount(&line(&usage, "searches")["quantity"]), dec("9"));
    assert_eq!(amount(&line(&usage, "leads")["quantity"]), dec("3"));
    assert_eq!(amount(&line(&usage, "users")["quantity"]), dec("3"));
    // Fees prorated by the share: the usage plan's flat $99, base's $99 overage fee (its
    // included 20 actions are not prorated: 10 over at $0.25).
    let round = |value: Decimal| {
        value.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    };
    assert_eq!(
        amount(&line(&usage, "platform")["amount"]),
        round(dec("99") * usage_share)
    );
    assert_eq!(
        amount(&line(&base, "actions")["amount"]),
        round(dec("99") * base_share + dec("10") * dec("0.25"))
    );
    // acc_usage is unaffected: its draft bills none of acc_base's actions.
    let other = preview(&env, "acc_usage", &rfc3339(change));
    assert_eq!(amount(&line(&other[0], "searches")["quantity"]), dec("0"));
}
