//! One benchmark run's isolated world on the shared services (like `tests/common/mod.rs`): a
//! fresh topic prefix, ClickHouse database, consumer groups and ports, a settings file, and
//! `agentmeter` stage processes pinned to the stage CPUs with `taskset`. Dropping it stops the
//! stages it started (by pid) and removes its database and topics — never anything else.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where things are; shared by every subcommand.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `agentmeter` binary (release build).
    pub agentmeter: PathBuf,
    pub repo_root: PathBuf,
    pub brokers: String,
    pub clickhouse_url: String,
    /// taskset CPU list of the stage processes.
    pub stage_cpus: String,
    /// Keep topics, database and logs after the run.
    pub keep: bool,
    /// Extra librdkafka settings of the stages (`[kafka.client_overrides]`).
    pub kafka_client_overrides: Vec<(String, String)>,
}

impl Options {
    /// Runs `deploy/local/services.sh up` (idempotent; starts nothing that already answers).
    pub fn ensure_services(&self) -> anyhow::Result<()> {
        let status = Command::new("bash")
            .arg(self.repo_root.join("deploy/local/services.sh"))
            .arg("up")
            .stdout(Stdio::null())
            .status()
            .context("run deploy/local/services.sh up")?;
        anyhow::ensure!(status.success(), "deploy/local/services.sh up failed");
        anyhow::ensure!(
            self.agentmeter.exists(),
            "{} not found: run `cargo build --release` first",
            self.agentmeter.display()
        );
        Ok(())
    }

    /// Pid of a shared service from its PID file under `.local/` (for CPU accounting only).
    pub fn service_pid(&self, service: &str) -> Option<u32> {
        let state = std::env::var("AGENTMETER_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| self.repo_root.join(".local"));
        let file = match service {
            "tansu" => state.join("tansu/tansu.pid"),
            "clickhouse" => state.join("clickhouse/clickhouse.pid"),
            _ => return None,
        };
        let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

pub use agentmeter_testkit::free_port;

/// A stage process.
pub struct Stage {
    pub name: String,
    pub child: Child,
    pub log_path: PathBuf,
}

impl Stage {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// One run's topics, database, groups, ports and processes.
pub struct BenchEnv {
    pub options: Options,
    pub unique: String,
    /// Names and ports: topic prefix, database, and the port of every listener.
    pub run: agentmeter_testkit::settings::RunSettings,
    pub dir: PathBuf,
    pub settings_path: PathBuf,
    pub stages: Vec<Stage>,
    pub http: reqwest::Client,
    database_created: bool,
}

impl BenchEnv {
    /// A fresh world; creates its topics (not the database: see [`BenchEnv::migrate`]).
    pub fn new(options: &Options, name: &str) -> anyhow::Result<BenchEnv> {
        let run = agentmeter_testkit::settings::IsolatedRun::new(
            "bench",
            name,
            options.brokers.clone(),
            options.clickhouse_url.clone(),
        )?;
        let env = BenchEnv {
            options: options.clone(),
            settings_path: run.dir.join("agentmeter.toml"),
            dir: run.dir,
            unique: run.unique,
            run: run.settings,
            stages: Vec::new(),
            http: reqwest::Client::new(),
            database_created: false,
        };
        env.write_settings()?;
        env.tool(&["topics"])?;
        Ok(env)
    }

    fn write_settings(&self) -> anyhow::Result<()> {
        // Stage settings are the production defaults but for names and ports.
        let overrides: String = self
            .options
            .kafka_client_overrides
            .iter()
            .map(|(key, value)| format!("{key:?} = {value:?}\n"))
            .collect();
        let settings = format!(
            "# agentmeter-bench run {}\n{}",
            self.unique,
            self.run
                .to_toml("", "", &format!("[kafka.client_overrides]\n{overrides}"))
        );
        std::fs::write(&self.settings_path, settings)?;
        Ok(())
    }

    /// The Kafka settings of this run (for in-process clients).
    pub fn kafka_settings(&self) -> agentmeter_runtime::kafka::KafkaSettings {
        agentmeter_runtime::kafka::KafkaSettings {
            brokers: self.options.brokers.clone(),
            topic_prefix: self.run.topic_prefix.clone(),
            ..Default::default()
        }
    }

    pub fn topics(&self) -> agentmeter_runtime::kafka::Topics {
        self.kafka_settings().topics()
    }

    /// The ClickHouse settings of this run.
    pub fn clickhouse_settings(&self) -> agentmeter_aggregator::ClickHouseSettings {
        agentmeter_aggregator::ClickHouseSettings {
            url: self.options.clickhouse_url.clone(),
            database: self.run.database.clone(),
            ..Default::default()
        }
    }

    /// Runs an `agentmeter` tool to completion.
    pub fn tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let (succeeded, text) = agentmeter_testkit::process::run_tool(
            &self.options.agentmeter,
            &self.settings_path,
            args,
            &[("RUST_LOG", "warn")],
        )
        .with_context(|| format!("run {}", self.options.agentmeter.display()))?;
        anyhow::ensure!(succeeded, "agentmeter {args:?} failed:\n{text}");
        Ok(text)
    }

    /// Creates this run's database and tables.
    pub fn migrate(&mut self) -> anyhow::Result<()> {
        self.database_created = true;
        self.tool(&["migrate"])?;
        Ok(())
    }

    /// Publishes a metering configuration.
    pub fn apply_config(&self, text: &str) -> anyhow::Result<()> {
        let path = self.dir.join("metering.toml");
        std::fs::File::create(&path)?.write_all(text.as_bytes())?;
        self.tool(&["config", "apply", path.to_str().context("utf-8 path")?])?;
        Ok(())
    }

    /// Starts a stage pinned to the stage CPUs; returns its pid.
    /// Throughput benches measure what ingest can do, not the per-agent rate limit: they lift it.
    pub const NO_RATE_LIMIT: (&'static str, &'static str) = (
        "AGENTMETER__INGEST__MAX_ACTIONS_PER_SECOND_PER_AGENT_INSTANCE",
        "0",
    );

    pub fn spawn(&mut self, stage: &str, env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let log_path = self.dir.join(format!("{stage}.log"));
        // taskset execs agentmeter: the child's pid is the stage's pid.
        let child = agentmeter_testkit::process::spawn_stage(
            &["taskset", "-c", &self.options.stage_cpus],
            &self.options.agentmeter,
            &self.settings_path,
            stage,
            &log_path,
            env,
        )
        .context("spawn taskset agentmeter (is util-linux installed?)")?;
        let pid = child.id();
        self.stages.push(Stage {
            name: stage.to_string(),
            child,
            log_path,
        });
        Ok(pid)
    }

    /// Fails with the stage logs when a stage has exited.
    pub fn check_stages(&mut self) -> anyhow::Result<()> {
        for stage in &mut self.stages {
            if let Some(status) = stage.child.try_wait()? {
                anyhow::bail!(
                    "stage {} exited ({status}):\n{}",
                    stage.name,
                    tail(&stage.log_path, 30)
                );
            }
        }
        Ok(())
    }

    /// Waits until `url` answers 200.
    pub async fn wait_ready(&mut self, url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = self
                .http
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            self.check_stages()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{url} not ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a query in this run's database; the TabSeparated answer.
    pub async fn query(&self, sql: &str) -> anyhow::Result<String> {
        clickhouse_query(
            &self.http,
            &self.options.clickhouse_url,
            &self.run.database,
            sql,
        )
        .await
    }

    /// Runs a statement that answers no rows (SYSTEM, OPTIMIZE, DDL; up to 30 minutes).
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        clickhouse_post(
            &self.http,
            &self.options.clickhouse_url,
            &self.run.database,
            sql.to_string(),
            Duration::from_secs(1800),
        )
        .await
        .map(drop)
    }

    /// A query answering one number.
    pub async fn query_u64(&self, sql: &str) -> anyhow::Result<u64> {
        let text = self.query(sql).await?;
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed == "\\N" {
            return Ok(0);
        }
        trimmed
            .parse()
            .with_context(|| format!("`{sql}` answered {trimmed:?}"))
    }

    /// Stops the stages (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_stages(&mut self) {
        for stage in &mut self.stages {
            if stage.child.try_wait().ok().flatten().is_none() {
                // SAFETY: signalling our own child by pid.
                unsafe {
                    libc::kill(stage.child.id() as i32, libc::SIGTERM);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if stage.child.try_wait().ok().flatten().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = stage.child.kill();
                let _ = stage.child.wait();
            }
        }
    }

    /// Deletes this run's topics and database (unless `--keep`).
    pub fn cleanup(&mut self) {
        self.stop_stages();
        if self.options.keep {
            eprintln!(
                "kept: topics {}*, database {}, logs in {}",
                self.run.topic_prefix,
                self.run.database,
                self.dir.display()
            );
            return;
        }
        let topics = self.topics();
        let names = [
            topics.raw,
            topics.enriched,
            topics.dead_letter,
            topics.config,
            topics.finalizations,
        ];
        // tansu 0.6.0 from crates.io deletes every topic when asked to delete one: only a
        // broker built by services.sh with the fix is asked.
        let kafka_port = self
            .options
            .brokers
            .rsplit(':')
            .next()
            .and_then(|port| port.parse::<u16>().ok())
            .unwrap_or(9092);
        match agentmeter_testkit::broker::topic_deletion_is_safe(kafka_port) {
            Ok(()) => {
                if let Err(error) = crate::kafka::delete_topics(&self.options.brokers, &names) {
                    eprintln!(
                        "note: could not delete topics {}*: {error:#}",
                        self.run.topic_prefix
                    );
                }
            }
            Err(reason) => eprintln!(
                "note: topics {}* left on the broker, not deleted: {reason}",
                self.run.topic_prefix
            ),
        }
        if self.database_created {
            let url = format!("{}/?database=default", self.options.clickhouse_url);
            let _ = std::process::Command::new("curl")
                .args(["-sf", "--max-time", "60", &url, "--data-binary"])
                .arg(format!("DROP DATABASE IF EXISTS {}", self.run.database))
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        self.stages.clear();
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Runs a query over ClickHouse's HTTP interface; the TabSeparated answer.
pub async fn clickhouse_query(
    http: &reqwest::Client,
    url: &str,
    database: &str,
    sql: &str,
) -> anyhow::Result<String> {
    let query = format!("{sql} FORMAT TabSeparated");
    clickhouse_post(http, url, database, query, Duration::from_secs(600)).await
}

/// POSTs `body` to ClickHouse's HTTP interface in `database`; the answer, or its error.
async fn clickhouse_post(
    http: &reqwest::Client,
    url: &str,
    database: &str,
    body: String,
    timeout: Duration,
) -> anyhow::Result<String> {
    let response = http
        .post(format!("{url}/?database={database}"))
        .body(body.clone())
        .timeout(timeout)
        .send()
        .await
        .context("ClickHouse reachable")?;
    let status = response.status();
    let text = response.text().await?;
    anyhow::ensure!(status.is_success(), "ClickHouse error for `{body}`: {text}");
    Ok(text)
}

pub use agentmeter_testkit::settings::tail;
