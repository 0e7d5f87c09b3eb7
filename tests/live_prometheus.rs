//! A real Prometheus (Debian's `prometheus` 2.42, started by this test) scrapes ingest, the
//! enricher and the aggregator while actions flow, and evaluates the production rules of
//! `deploy/prometheus/rules.yml`. Stopping the aggregator must make
//! `AgentmeterAggregatorNotProgressing` (the lag alert of a stopped consumer) and
//! `AgentmeterStageDown` go pending and then fire, no sooner than their `for` windows;
//! restarting it must clear both; and the actions sent meanwhile must all be counted once.
//!
//! Why `AgentmeterAggregatorNotProgressing` rather than `AgentmeterConsumerLagGrowing`: the lag
//! gauges are exported by the consumer itself, so they vanish with a stopped aggregator — the
//! alert that sees a stopped consumer's lag compares what the enricher writes with what the
//! aggregator reads (rules.yml says so too).
//!
//! The production windows are minutes long (`for: 5m`, `rate(…[2m])`). The test loads the same
//! file with every duration divided by [`TIME_SCALE`] (5m → 15s, 2m → 6s), scrapes and evaluates
//! every second, so the expressions, labels and `for` logic under test are the production ones
//! and the test takes about a minute. `promtool test rules` (deploy/prometheus/check.sh) checks
//! the unscaled windows.
#![cfg(feature = "integration")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, metering_config, post_until_accepted, repo_root, TestEnv};
use serde_json::{json, Value};

/// Every duration of rules.yml is divided by this (one production minute is 3 test seconds).
const TIME_SCALE: u64 = 20;
/// Scrape and rule evaluation interval of the test's Prometheus.
const SCRAPE_INTERVAL: &str = "1s";

const SECRET: &str = "live-prometheus-secret";
const ACCOUNT: &str = "acc_prom";

const METERING: &str = r#"
[tagging]
tracked = ["web_search"]

[[cost_allocations]]
action = "web_search"
measure = "unit"
rates = [{ effective_from = "2020-01-01T00:00:00Z", cost_per_unit = "0.005" }]
"#;

const NOT_PROGRESSING: &str = "AgentmeterAggregatorNotProgressing";
const STAGE_DOWN: &str = "AgentmeterStageDown";

/// `text` with every Prometheus duration — a range selector `[5m]` and a `for: 5m` — divided by
/// `scale` and written in milliseconds. Nothing else changes.
fn scaled_durations(text: &str, scale: u64) -> String {
    let scale_one = |duration: &str| -> Option<String> {
        let digits_end = duration.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = duration.split_at(digits_end);
        let number: u64 = number.parse().ok()?;
        let unit_ms = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        Some(format!("{}ms", (number * unit_ms / scale).max(1)))
    };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(duration) = trimmed.strip_prefix("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            let duration = duration.trim();
            let scaled = scale_one(duration)
                .unwrap_or_else(|| panic!("unreadable `for` duration {duration:?} in rules.yml"));
            out.push_str(&format!("{indent}for: {scaled}\n"));
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            let Some(close) = rest[open..].find(']').map(|close| open + close) else {
                break;
            };
            out.push_str(&rest[..=open]);
            let inside = &rest[open + 1..close];
            out.push_str(&scale_one(inside).unwrap_or_else(|| inside.to_string()));
            out.push(']');
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
    }
    out
}

#[test]
fn scaling_divides_ranges_and_for_windows_only() {
    let rules = "      - alert: A\n        expr: rate(x[2m]) > 0 and deriv(y[10m]) > 0 unless z{a=\"[b]\"}\n        for: 5m\n";
    assert_eq!(
        scaled_durations(rules, 20),
        "      - alert: A\n        expr: rate(x[6000ms]) > 0 and deriv(y[30000ms]) > 0 unless z{a=\"[b]\"}\n        for: 15000ms\n"
    );
}

/// The Prometheus process; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping the three stages of `env`, with the scaled rules.
    fn start(env: &TestEnv, dir: &Path) -> Prometheus {
        let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/rules.yml"))
            .expect("read deploy/prometheus/rules.yml");
        std::fs::write(dir.join("rules.yml"), scaled_durations(&rules, TIME_SCALE)).unwrap();
        let job = |name: &str, port: u16| {
            format!(
                "  - job_name: {name}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n"
            )
        };
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: 900ms\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
             rule_files:\n  - rules.yml\nscrape_configs:\n{}{}{}",
            job("agentmeter-ingest", env.run.ingest_port),
            job("agentmeter-enricher", env.run.enricher_metrics_port),
            job("agentmeter-aggregator", env.run.aggregator_metrics_port),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect(
                "start prometheus (Debian package prometheus: deploy/local/services.sh install)",
            );
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.url))
            .timeout(Duration::from_secs(2))
            .send()
            .map_err(|error| format!("prometheus not answering: {error}"))?;
        let body: Value = response
            .json()
            .map_err(|error| format!("prometheus answer: {error}"))?;
        if body["status"] != "success" {
            return Err(format!("prometheus answered {body}"));
        }
        Ok(body["data"].clone())
    }

    /// The state (`pending` or `firing`) of the active alert `name` whose labels include
    /// `labels`, if it is active.
    fn alert_state(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<String>, String> {
        let alerts = self.get("/api/v1/alerts")?;
        Ok(alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|alert| alert["labels"]["alertname"] == name)
            .find(|alert| {
                labels
                    .iter()
                    .all(|(key, value)| alert["labels"][*key] == *value)
            })
            .and_then(|alert| alert["state"].as_str().map(str::to_string)))
    }

    /// The value of instant query `promql` (a single number), if it has a result.
    fn scalar(&self, promql: &str) -> Result<Option<f64>, String> {
        let data = self.get(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        Ok(data["result"]
            .as_array()
            .and_then(|result| result.first())
            .and_then(|sample| sample["value"][1].as_str())
            .and_then(|value| value.parse().ok()))
    }

    fn log_tail(&self) -> String {
        agentmeter_testkit::settings::tail(&self.log, 30)
    }
}

/// `text` percent-encoded for a query string (everything but unreserved characters).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// A client thread sending a batch of 10 web searches every 100 ms until `stop`; counts what
/// ingest accepted.
fn start_sending(
    url: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::new();
        let mut batch = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let items: Vec<Value> = (0..10)
                .map(|index| json!({"event_id": format!("prom-{batch}-{index}"), "action_name": "web_search", "user_id": "u1"}))
                .collect();
            post_until_accepted(
                &client,
                &url,
                SECRET,
                &json!({ "actions": items }),
                Duration::from_secs(60),
                Duration::from_millis(100),
            );
            accepted.fetch_add(10, Ordering::Relaxed);
            batch += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn lag_alert_fires_when_the_aggregator_stops_and_clears_when_it_restarts() {
    let mut env = TestEnv::new("live_prometheus", "");
    env.apply_config(&metering_config("ws_prom", &[(ACCOUNT, SECRET)], METERING));
    env.spawn("ingest", "ingest");
    env.spawn("enrich", "enrich");
    let aggregator = env.spawn("aggregate", "aggregate");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let prometheus_dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = Prometheus::start(&env, &prometheus_dir);

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = start_sending(
        format!("{}/v1/actions", env.ingest_url()),
        stop.clone(),
        accepted.clone(),
    );

    // 1. All three targets up, the aggregator's reads seen by Prometheus, and then a quiet
    // stretch as long as the alert's `for` window: a healthy pipeline does not alert.
    let for_window = Duration::from_millis(5 * 60_000 / TIME_SCALE);
    env.wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        let up = prometheus.scalar(r#"sum(up{job=~"agentmeter-.*"})"#)?;
        let reading = prometheus.scalar(&format!(
            "sum(rate(agentmeter_aggregator_records_total[{}ms]))",
            2 * 60_000 / TIME_SCALE
        ))?;
        // Before the aggregator's first reads the alert may be pending; wait for it to clear.
        let active = [NOT_PROGRESSING, STAGE_DOWN]
            .iter()
            .map(|name| prometheus.alert_state(name, &[]))
            .collect::<Result<Vec<_>, _>>()?;
        match (up, reading) {
            (Some(up), Some(reading))
                if up == 3.0 && reading > 0.0 && active.iter().all(Option::is_none) =>
            {
                Ok(())
            }
            other => Err(format!(
                "(targets up, aggregator records/s) = {other:?}; prometheus log:\n{}",
                prometheus.log_tail()
            )),
        }
    });
    let quiet_until = Instant::now() + for_window + Duration::from_secs(3);
    while Instant::now() < quiet_until {
        for name in [NOT_PROGRESSING, STAGE_DOWN] {
            assert_eq!(
                prometheus.alert_state(name, &[]).unwrap(),
                None,
                "{name} is active while every stage runs"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // 2. Stop the aggregator while actions flow: pending first, firing after the `for` window.
    env.process(aggregator).kill();
    let stopped_at = Instant::now();
    let mut seen_pending = false;
    env.wait_until(Duration::from_secs(90), Duration::from_millis(250), || {
        let state = prometheus.alert_state(NOT_PROGRESSING, &[("stage", "aggregator")])?;
        seen_pending |= state.as_deref() == Some("pending");
        match state.as_deref() {
            Some("firing") => Ok(()),
            other => Err(format!("{NOT_PROGRESSING} is {other:?}")),
        }
    });
    let fired_after = stopped_at.elapsed();
    println!("{NOT_PROGRESSING} fired {fired_after:?} after the aggregator was stopped (for window {for_window:?})");
    assert!(
        seen_pending,
        "{NOT_PROGRESSING} was never seen pending before it fired"
    );
    assert!(
        fired_after >= for_window,
        "{NOT_PROGRESSING} fired after {fired_after:?}, before its for window of {for_window:?}"
    );
    env.wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || match prometheus
            .alert_state(STAGE_DOWN, &[("job", "agentmeter-aggregator")])?
            .as_deref()
        {
            Some("firing") => Ok(()),
            other => Err(format!("{STAGE_DOWN} for the aggregator is {other:?}")),
        },
    );
    println!(
        "{STAGE_DOWN} fired {:?} after the aggregator was stopped",
        stopped_at.elapsed()
    );

    // 3. Restart it: both alerts clear while actions keep flowing.
    env.spawn("aggregate", "aggregate-restarted");
    let restarted_at = Instant::now();
    env.wait_until(Duration::from_secs(90), Duration::from_millis(250), || {
        let not_progressing = prometheus.alert_state(NOT_PROGRESSING, &[])?;
        let down = prometheus.alert_state(STAGE_DOWN, &[])?;
        match (not_progressing, down) {
            (None, None) => Ok(()),
            other => Err(format!(
                "still active (not progressing, stage down): {other:?}"
            )),
        }
    });
    println!(
        "both alerts cleared {:?} after the aggregator restarted",
        restarted_at.elapsed()
    );

    // 4. Nothing sent while the aggregator was down was lost or counted twice.
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let sent = accepted.load(Ordering::Relaxed);
    env.wait_for_count(
        "SELECT sum(action_count) FROM usage_exact",
        sent,
        Duration::from_secs(120),
    );
    let distinct = env.query("SELECT uniqExact(event_id) FROM actions FINAL");
    assert_eq!(distinct, vec![vec![sent.to_string()]]);
    println!("{sent} actions sent, {sent} counted once each");
}
