//! `agentmeter-bench console`: the latency of every read of `agentmeter console` — the JSON
//! control-plane API under `/api/v1/` and the pages of the web console — on the data set of
//! `monthly-view` (target: p95 under 300 ms).
//!
//! Loading: exactly `monthly-view`'s loader ([`super::monthly::load_month`]: the real enricher
//! code, aggregator state and ClickHouse writer, no Kafka) — N actions spread evenly over one
//! calendar month, the example workspace `ws_demo` plus `--extra-accounts` accounts, `--users`
//! users per account, the 8-action mix — into a fresh database. The month is by default the
//! calendar month before the current one, so the console's "last 30 days" reads (the
//! Profitability chart) cover most of it. The configuration the loader enriches with
//! ([`config_text`]) is published on the run's config topic with `agentmeter config apply`, and
//! an admin key is made with `agentmeter admin-key new`, so the console sees the workspace.
//!
//! Then `agentmeter console` is started (pinned to the stage CPUs, listening on a free port),
//! and, once `/readyz` answers 200, every read is timed from this process: one cold request (the
//! first of that route since the console started; the OS page cache is not dropped, and routes
//! that read the same tables warm each other's ClickHouse caches) and `--runs` warm ones, one
//! after another over one kept-alive connection; each time is from sending the request to the
//! last byte of the body. Every answer must be 200, or the run fails. The API's usage totals are
//! checked against ClickHouse, so the figures are of reads that saw the whole data set.
//!
//! This mode never deletes a topic: the run's topics are left on the broker (its database and
//! files are removed unless `--keep`).

use std::io::Write as _;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmeter_bench::env::{free_port, BenchEnv, Options};
use agentmeter_bench::measure::percentile;
use agentmeter_bench::workload::{config_text, Workload};
use anyhow::Context;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;

use super::monthly::{load_month, month_span, settle_merges};
use super::Row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Actions in the month.
    #[arg(long, default_value_t = 10_000_000)]
    pub actions: u64,
    /// The calendar month (UTC), YYYY-MM; by default the month before the current one.
    #[arg(long)]
    pub month: Option<String>,
    /// Accounts besides the example's two.
    #[arg(long, default_value_t = 8)]
    pub extra_accounts: usize,
    /// Users per account.
    #[arg(long, default_value_t = 50)]
    pub users: u64,
    /// Records per partition between two aggregator flushes (as `monthly-view`).
    #[arg(long, default_value_t = 10_000)]
    pub flush_every: u64,
    /// Warm requests per route (after the cold one).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// The account of the per-account reads.
    #[arg(long, default_value = "acc_acme")]
    pub account: String,
    /// The latency target of a read's p95, in milliseconds.
    #[arg(long, default_value_t = 300.0)]
    pub target_ms: f64,
}

const WORKSPACE: &str = "ws_demo";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The run's world. [`BenchEnv`]'s own clean-up deletes the run's topics when the broker looks
/// safe for it; this mode never deletes a topic, so the environment is never dropped: this
/// guard stops the console, drops the database and removes the run's files itself (on every
/// way out, errors and panics included), and leaves the topics on the broker.
struct ConsoleRun {
    env: ManuallyDrop<BenchEnv>,
    keep: bool,
    database_created: bool,
}

impl Drop for ConsoleRun {
    fn drop(&mut self) {
        self.env.stop_stages();
        self.env.stages.clear();
        let env = &self.env;
        if self.keep {
            eprintln!(
                "kept: topics {}*, database {}, settings and logs in {}",
                env.run.topic_prefix,
                env.run.database,
                env.dir.display()
            );
            return;
        }
        if self.database_created {
            let url = format!("{}/?database=default", env.options.clickhouse_url);
            let _ = std::process::Command::new("curl")
                .args(["-sf", "--max-time", "120", &url, "--data-binary"])
                .arg(format!("DROP DATABASE IF EXISTS {}", env.run.database))
                .status();
        }
        let _ = std::fs::remove_dir_all(&env.dir);
        eprintln!(
            "note: topics {}* left on the broker (this mode never deletes topics); database {} dropped",
            env.run.topic_prefix, env.run.database
        );
    }
}

/// How a route is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `Authorization: Bearer <admin key>`.
    Api,
    /// `Cookie: am_session=<token>` of a web console login.
    Web,
}

/// One timed route.
struct Timing {
    auth: Auth,
    path: String,
    bytes: usize,
    cold_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

/// The calendar month (UTC) before the current one, YYYY-MM.
fn previous_month() -> String {
    let today = time::OffsetDateTime::now_utc().date();
    let (year, month) = match today.month() {
        time::Month::January => (today.year() - 1, time::Month::December),
        month => (today.year(), month.previous()),
    };
    format!("{year:04}-{:02}", u8::from(month))
}

pub async fn run(options: &Options, args: Args) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let month = args.month.clone().unwrap_or_else(previous_month);
    let (start, end) = month_span(&month)?;
    // `keep` for BenchEnv itself, so that nothing of it ever deletes a topic (see ConsoleRun).
    let mut env_options = options.clone();
    env_options.keep = true;
    let mut world = ConsoleRun {
        env: ManuallyDrop::new(BenchEnv::new(&env_options, "console")?),
        keep: options.keep,
        database_created: false,
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    {
        let mut settings = std::fs::OpenOptions::new()
            .append(true)
            .open(&world.env.settings_path)?;
        write!(settings, "\n[console]\nlisten = \"127.0.0.1:{port}\"\n")?;
    }
    world.database_created = true;
    world.env.migrate()?;
    let env = &mut *world.env;

    // The configuration the loader enriches with, published so that the console sees it.
    let config = config_text(args.extra_accounts);
    env.apply_config(&config)?;
    let made = env.tool(&[
        "admin-key",
        "new",
        "--workspace",
        WORKSPACE,
        "--name",
        "bench",
    ])?;
    let key = made
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("amk_"))
        .with_context(|| format!("no amk_ key in the output of admin-key new:\n{made}"))?
        .to_string();

    let workload = Arc::new(Workload::new(args.extra_accounts, args.users));
    anyhow::ensure!(
        workload
            .senders
            .iter()
            .any(|(_, sender_account, _)| sender_account == &args.account),
        "--account {} is not an account of the workload",
        args.account
    );
    let n = args.actions;
    println!(
        "console: loading {n} actions over {month} ({} accounts × {} users, 8-action mix) into {}; \
         configuration and admin key published on {}",
        workload.senders.len(),
        args.users,
        env.run.database,
        env.topics().config
    );
    load_month(env, &workload, n, (start, end), args.flush_every, false).await?;
    settle_merges(env).await?;
    let exact = env
        .query_u64("SELECT sum(action_count) FROM usage_exact")
        .await?;
    anyhow::ensure!(
        exact == n,
        "usage_exact holds {exact} actions, expected {n}"
    );
    let tracked = env
        .query_u64("SELECT sum(action_count) FROM usage_exact WHERE tracked = 1")
        .await?;
    let tracked_of_account = env
        .query_u64(&format!(
            "SELECT sum(action_count) FROM usage_exact WHERE tracked = 1 AND account_id = '{}'",
            args.account
        ))
        .await?;
    let clickhouse_version = env.query("SELECT version()").await?;
    println!(
        "    ClickHouse {}; tracked actions: {tracked} in the workspace, {tracked_of_account} of {}",
        clickhouse_version.trim(),
        args.account
    );

    // The console.
    env.spawn("console", &[])?;
    let ready_started = Instant::now();
    env.wait_ready(&format!("{base}/readyz"), Duration::from_secs(120))
        .await?;
    println!(
        "    agentmeter console on {base} (pinned to CPUs {}), ready after {:.1} s",
        env.options.stage_cpus,
        ready_started.elapsed().as_secs_f64()
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let session = log_in(&http, &base, &key).await?;

    let account = &args.account;
    let routes: Vec<(Auth, String)> = [
        "/api/v1/workspace".to_string(),
        "/api/v1/accounts".to_string(),
        "/api/v1/agent-instances".to_string(),
        "/api/v1/actions".to_string(),
        "/api/v1/cost-allocations".to_string(),
        "/api/v1/outcomes".to_string(),
        "/api/v1/live-data?limit=100".to_string(),
        format!("/api/v1/live-data?account={account}&limit=100"),
        format!("/api/v1/usage?account={account}"),
        "/api/v1/usage".to_string(),
        "/api/v1/audit".to_string(),
    ]
    .into_iter()
    .map(|path| (Auth::Api, path))
    .chain(
        [
            "/metering/live-data".to_string(),
            "/metering/live-data/rows".to_string(),
            "/metering/tagging".to_string(),
            "/metering/costs".to_string(),
            "/metering/outcomes".to_string(),
            "/accounts".to_string(),
            format!("/accounts/{account}"),
            "/agents".to_string(),
            "/billing".to_string(),
            "/profitability".to_string(),
            "/audit".to_string(),
        ]
        .into_iter()
        .map(|path| (Auth::Web, path)),
    )
    .collect();
    println!(
        "    timing {} routes: 1 cold request, then {} warm ones each, sequentially",
        routes.len(),
        args.runs
    );

    let mut timings = Vec::new();
    for (auth, path) in &routes {
        let request = || {
            let builder = http.get(format!("{base}{path}"));
            match auth {
                Auth::Api => builder.header(AUTHORIZATION, format!("Bearer {key}")),
                Auth::Web => builder.header(COOKIE, format!("am_session={session}")),
            }
        };
        let (cold, body) = timed(request())
            .await
            .with_context(|| format!("GET {path}"))?;
        check_answer(path, &body, account, tracked, tracked_of_account)?;
        let mut warm = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            warm.push(
                timed(request())
                    .await
                    .with_context(|| format!("GET {path}"))?
                    .0,
            );
            env.check_stages()?;
        }
        warm.sort_by(f64::total_cmp);
        let timing = Timing {
            auth: *auth,
            path: path.clone(),
            bytes: body.len(),
            cold_ms: cold,
            p50_ms: percentile(&warm, 50.0),
            p95_ms: percentile(&warm, 95.0),
            max_ms: warm[warm.len() - 1],
        };
        println!(
            "    GET {path}: {} bytes; cold {:.1} ms; warm p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
            timing.bytes, timing.cold_ms, timing.p50_ms, timing.p95_ms, timing.max_ms
        );
        timings.push(timing);
    }

    let target = args.target_ms;
    println!(
        "\n## Console reads ({n} actions in {month}; {} warm runs each; p95 target {target:.0} ms)\n",
        args.runs
    );
    println!(
        "| route | auth | answer bytes | cold ms | p50 ms | p95 ms | max ms | meets {target:.0} ms (p95) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for timing in &timings {
        println!(
            "| `{}` | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            timing.path,
            match timing.auth {
                Auth::Api => "API key",
                Auth::Web => "session",
            },
            timing.bytes,
            timing.cold_ms,
            timing.p50_ms,
            timing.p95_ms,
            timing.max_ms,
            if timing.p95_ms < target {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    let over: Vec<&Timing> = timings.iter().filter(|t| t.p95_ms >= target).collect();
    println!(
        "\nconsole: {} of {} routes meet p95 < {target:.0} ms over {n} actions{}",
        timings.len() - over.len(),
        timings.len(),
        if over.is_empty() {
            String::new()
        } else {
            format!(
                "; over it: {}",
                over.iter()
                    .map(|t| format!("{} ({:.0} ms)", t.path, t.p95_ms))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );

    drop(world);
    // The table above is this mode's summary.
    Ok(Vec::new())
}

/// Logs in to the web console with `key`: the session token of the `am_session` cookie.
async fn log_in(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<String> {
    // The key is `amk_` and hex digits: nothing to escape in the form body.
    let response = http
        .post(format!("{base}/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .context("POST /login")?;
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let token = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|cookie| cookie.split(';').next())
        .find_map(|pair| pair.trim().strip_prefix("am_session="))
        .map(str::to_string);
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status == StatusCode::SEE_OTHER,
        "POST /login answered {status} (expected 303):\n{body}"
    );
    let token = token
        .filter(|token| !token.is_empty())
        .context("POST /login set no am_session cookie")?;
    println!("    logged in to the web console (303 to {location}, session cookie set)");
    Ok(token)
}

/// Sends `request`; the time to the last byte of the body (ms) and the body. Anything but 200
/// fails.
async fn timed(request: reqwest::RequestBuilder) -> anyhow::Result<(f64, bytes::Bytes)> {
    let started = Instant::now();
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        status == StatusCode::OK,
        "answered {status} (expected 200): {}",
        String::from_utf8_lossy(&body[..body.len().min(2000)])
    );
    Ok((millis, body))
}

/// Checks what the API's data reads answered: usage totals equal ClickHouse's, Live Data pages
/// are full and filtered.
fn check_answer(
    path: &str,
    body: &[u8],
    account: &str,
    tracked: u64,
    tracked_of_account: u64,
) -> anyhow::Result<()> {
    if !path.starts_with("/api/") {
        return Ok(());
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).with_context(|| format!("GET {path}: not JSON"))?;
    if path.starts_with("/api/v1/usage") {
        let items = value["usage"]
            .as_array()
            .with_context(|| format!("GET {path}: no usage array"))?;
        let total: u64 = items
            .iter()
            .filter_map(|item| item["actions"].as_u64())
            .sum();
        let expected = if path.contains("account=") {
            anyhow::ensure!(
                items.iter().all(|item| item["account"] == account),
                "GET {path}: usage of another account"
            );
            tracked_of_account
        } else {
            tracked
        };
        anyhow::ensure!(
            total == expected,
            "GET {path}: {total} actions, ClickHouse has {expected}"
        );
    } else if path.starts_with("/api/v1/live-data") {
        let items = value["items"]
            .as_array()
            .with_context(|| format!("GET {path}: no items array"))?;
        anyhow::ensure!(
            items.len() == 100,
            "GET {path}: {} items, expected 100",
            items.len()
        );
        if path.contains("account=") {
            anyhow::ensure!(
                items.iter().all(|item| item["account"] == account),
                "GET {path}: rows of another account"
            );
        }
    }
    Ok(())
}
