//! Shared harness of the integration tests: real services, real processes, fresh names.
//!
//! * [`ensure_services`] runs `deploy/local/services.sh up` (idempotent) once per test binary, so
//!   the tests talk to the project's own real broker (tansu) and ClickHouse.
//! * [`TestEnv`] gives each test its own topic prefix, ClickHouse database, consumer groups and
//!   ports, writes a settings file for them, and runs `agentmeter` tools and stages as separate
//!   processes (killed when the test ends).
//! * ClickHouse is queried over HTTP in TabSeparated, so decimals are parsed from their text and
//!   compared exactly.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_agentmeter");

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn clickhouse_url() -> String {
    let port = std::env::var("AGENTMETER_CLICKHOUSE_HTTP_PORT").unwrap_or_else(|_| "8123".into());
    format!("http://127.0.0.1:{port}")
}

/// `host:port` of the broker the tests use (`AGENTMETER_KAFKA_PORT`, default 9092), for clients
/// a test creates itself.
pub fn brokers() -> String {
    let port = std::env::var("AGENTMETER_KAFKA_PORT").unwrap_or_else(|_| "9092".into());
    format!("127.0.0.1:{port}")
}

/// Client settings of a test publisher: idempotent, acks=all, like the stages' producers.
pub fn publisher_config() -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    config
}

/// Starts the broker and ClickHouse through the project's script (once per test binary).
pub fn ensure_services() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo_root().join("deploy/local/services.sh"))
            .arg("up")
            .status()
            .expect("run deploy/local/services.sh up");
        assert!(
            status.success(),
            "deploy/local/services.sh up failed (run `deploy/local/services.sh install` first)"
        );
    });
}

pub use agentmeter_testkit::free_port;

/// One test's isolated world: topics, database, groups, ports, settings file, processes.
pub struct TestEnv {
    pub name: String,
    /// Names and ports: topic prefix, database, and the port of every listener.
    pub run: agentmeter_testkit::settings::RunSettings,
    pub dir: PathBuf,
    pub settings_path: PathBuf,
    processes: Vec<StageProcess>,
}

impl TestEnv {
    /// A fresh environment; `extra_settings` is appended to the settings TOML (e.g. an
    /// `[aggregator]` override). Creates the topics and the database.
    pub fn new(name: &str, extra_settings: &str) -> TestEnv {
        ensure_services();
        let run = agentmeter_testkit::settings::IsolatedRun::new(
            "test",
            name,
            brokers(),
            clickhouse_url(),
        )
        .expect("create the test's directory");
        let env = TestEnv {
            name: name.to_string(),
            settings_path: run.dir.join("agentmeter.toml"),
            dir: run.dir,
            run: run.settings,
            processes: Vec::new(),
        };
        env.write_settings(extra_settings);
        env.tool(&["topics"]);
        env.tool(&["migrate"]);
        env
    }

    fn write_settings(&self, extra: &str) {
        // Short batch waits and flushes, so that the tests see results soon.
        let aggregator = format!("flush_interval = \"300ms\"\n{extra}");
        std::fs::write(
            &self.settings_path,
            self.run
                .to_toml("batch_max_wait = \"20ms\"\n", &aggregator, ""),
        )
        .unwrap();
    }

    /// Runs an `agentmeter` tool to completion; panics with its output when it fails.
    pub fn tool(&self, args: &[&str]) -> String {
        let (succeeded, text) = self.run_tool(args);
        assert!(succeeded, "agentmeter {args:?} failed:\n{text}");
        text
    }

    /// Runs a tool expected to fail; returns its output.
    pub fn tool_failing(&self, args: &[&str]) -> String {
        let (succeeded, text) = self.run_tool(args);
        assert!(
            !succeeded,
            "agentmeter {args:?} unexpectedly succeeded:\n{text}"
        );
        text
    }

    /// Runs `agentmeter --config <this test's settings> ARGS`: whether it succeeded, and its
    /// stdout followed by its stderr.
    fn run_tool(&self, args: &[&str]) -> (bool, String) {
        self.run_tool_with_env(args, &[])
    }

    /// [`TestEnv::run_tool`] with extra environment variables.
    pub fn run_tool_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        agentmeter_testkit::process::run_tool(Path::new(BINARY), &self.settings_path, args, env)
            .expect("run agentmeter")
    }

    /// Writes a metering configuration file and applies it.
    pub fn apply_config(&self, toml: &str) -> String {
        let path = self.dir.join(format!("metering-{}.toml", free_port()));
        std::fs::write(&path, toml).unwrap();
        self.tool(&["config", "apply", path.to_str().unwrap()])
    }

    /// Starts a stage (`ingest`, `enrich`, `aggregate`) as its own process; `tag` names its log.
    pub fn spawn(&mut self, stage: &str, tag: &str) -> usize {
        self.spawn_with_env(stage, tag, &[])
    }

    pub fn spawn_with_env(&mut self, stage: &str, tag: &str, env: &[(&str, &str)]) -> usize {
        let log_path = self.dir.join(format!("{tag}.log"));
        let child = agentmeter_testkit::process::spawn_stage(
            &[],
            Path::new(BINARY),
            &self.settings_path,
            stage,
            &log_path,
            env,
        )
        .expect("spawn agentmeter stage");
        self.processes.push(StageProcess {
            child,
            tag: tag.to_string(),
            log_path,
        });
        self.processes.len() - 1
    }

    pub fn process(&mut self, index: usize) -> &mut StageProcess {
        &mut self.processes[index]
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.run.ingest_port)
    }

    /// `http://127.0.0.1:<port>` of ingest's OTLP/gRPC receiver (value-python's
    /// `VALUE_OTEL_ENDPOINT`).
    pub fn otlp_grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.run.otlp_grpc_port)
    }

    /// `http://127.0.0.1:<port>` of ingest's OTLP/HTTP receiver (traces at `/v1/traces`).
    pub fn otlp_http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.run.otlp_http_port)
    }

    /// Waits until `url` answers 200.
    pub fn wait_http_ok(&self, url: &str, timeout: Duration) {
        let client = reqwest::blocking::Client::new();
        self.wait_until(timeout, Duration::from_millis(100), || {
            let answered = client.get(url).timeout(Duration::from_secs(2)).send();
            match answered {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("{url} answered {}", response.status())),
                Err(error) => Err(format!("{url} not ready: {error}")),
            }
        });
    }

    /// Calls `check` every `pause` until it succeeds; panics with its last message and the
    /// stage logs after `timeout`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        pause: Duration,
        mut check: impl FnMut() -> Result<(), String>,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check() {
                Ok(()) => return,
                Err(last) => last,
            };
            assert!(
                Instant::now() < deadline,
                "{last} after {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(pause);
        }
    }

    /// All stage logs, for assertion messages.
    pub fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|process| {
                format!(
                    "--- {} (last lines) ---\n{}",
                    process.tag,
                    agentmeter_testkit::settings::tail(&process.log_path, 30)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs a query in this test's database; rows of TabSeparated columns.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        clickhouse_query(&self.run.database, sql)
    }

    /// Polls `sql` (one number) until it equals `expected`.
    pub fn wait_for_count(&self, sql: &str, expected: u64, timeout: Duration) {
        let mut last = String::new();
        self.wait_until(timeout, Duration::from_millis(200), || {
            if let Some(row) = self.query(sql).first() {
                last = row[0].clone();
                if last.parse::<u64>().ok() == Some(expected) {
                    return Ok(());
                }
            }
            Err(format!("`{sql}` was {last}, expected {expected}"))
        });
    }

    /// Reads every record of a topic of this test (from the beginning to the current end).
    pub fn read_topic(&self, suffix: &str) -> Vec<KafkaRecord> {
        read_topic(&format!("{}{suffix}", self.run.topic_prefix))
    }

    /// Publishes raw actions to this test's `actions.raw` as a direct publisher does (Avro,
    /// keyed as ingest keys them, waiting while the producer's queue is full) and waits until
    /// the broker acknowledged them all.
    pub fn publish_raw_actions<'a>(
        &self,
        actions: impl IntoIterator<Item = &'a agentmeter_schemas::RawAction>,
    ) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = publisher_config().create().unwrap();
        let topic = format!("{}actions.raw", self.run.topic_prefix);
        for action in actions {
            let payload = agentmeter_schemas::encode_raw_action(action).unwrap();
            while producer
                .send(
                    BaseRecord::to(&topic)
                        .key(&action.message_key())
                        .payload(&payload),
                )
                .is_err()
            {
                producer.poll(Duration::from_millis(50));
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Produces raw bytes to a topic of this test (a direct publisher, or poison).
    pub fn produce(&self, suffix: &str, key: &str, payload: &[u8]) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = publisher_config().create().unwrap();
        let topic = format!("{}{suffix}", self.run.topic_prefix);
        producer
            .send(BaseRecord::to(&topic).key(key).payload(payload))
            .map_err(|(error, _)| error)
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        if !std::thread::panicking() {
            let _ = clickhouse_query(
                "default",
                &format!("DROP DATABASE IF EXISTS {}", self.run.database),
            );
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "test {} failed; logs and settings kept in {}",
                self.name,
                self.dir.display()
            );
        }
    }
}

/// A stage running as its own process.
pub struct StageProcess {
    pub child: Child,
    pub tag: String,
    pub log_path: PathBuf,
}

impl StageProcess {
    /// SIGKILL: no flush, no commit, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?} of SIGTERM",
                self.tag
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Runs a query against ClickHouse over HTTP; rows of TabSeparated columns.
pub fn clickhouse_query(database: &str, sql: &str) -> Vec<Vec<String>> {
    let text = clickhouse_post(database, sql, &format!("{sql} FORMAT TabSeparated"));
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.split('\t').map(str::to_string).collect())
        .collect()
}

/// Runs a statement that answers no rows (an INSERT … SELECT, a TRUNCATE) against ClickHouse.
pub fn clickhouse_execute(database: &str, sql: &str) {
    clickhouse_post(database, sql, sql);
}

/// Posts `body` (the statement `sql`, perhaps with a FORMAT) to ClickHouse; panics with the
/// statement and ClickHouse's answer unless it succeeded.
fn clickhouse_post(database: &str, sql: &str, body: &str) -> String {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/?database={database}", clickhouse_url()))
        .body(body.to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .expect("ClickHouse reachable");
    let status = response.status();
    let text = response.text().unwrap();
    assert!(status.is_success(), "ClickHouse error for `{sql}`: {text}");
    text
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads a whole topic (every partition, from the beginning to the end at call time).
pub fn read_topic(topic: &str) -> Vec<KafkaRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "agentmeter-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(10))
            .unwrap();
        ends.insert(*partition, high);
        assignment
            .add_partition_offset(topic, *partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let mut next: HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends.iter().any(|(partition, end)| next[partition] < *end) {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            next.insert(message.partition(), message.offset() + 1);
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            (
                                header.key.to_string(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(KafkaRecord {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    records
}

/// A metering configuration for tests: `accounts` × one agent instance each, with the given
/// secrets; `body` adds tagging, cost allocations and outcomes.
/// The text of `/metrics` served on loopback `port`, or `None` when nothing answers within 2 s.
pub fn metrics_text(port: u16) -> Option<String> {
    reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .ok()?
        .text()
        .ok()
}

pub fn metering_config(workspace: &str, accounts: &[(&str, &str)], body: &str) -> String {
    let mut text = format!(
        "[workspace]\nid = \"{workspace}\"\nname = \"Test workspace\"\ncurrency = \"USD\"\n\n\
         [[agent_types]]\nid = \"type_test\"\nname = \"Test Agent\"\n\n"
    );
    for (account, secret) in accounts {
        text.push_str(&format!(
            "[[accounts]]\nid = \"{account}\"\nname = \"Account {account}\"\n\n\
             [[agent_instances]]\nid = \"inst_{account}\"\nname = \"Agent of {account}\"\nagent_type = \"type_test\"\n\
             account = \"{account}\"\nsecret_sha256 = \"{}\"\n\n",
            sha256_hex(secret)
        ));
    }
    text.push_str(body);
    text
}

pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Writes text to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    path
}

/// A small deterministic generator, so a failing test can be replayed exactly.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next number in `0..bound`.
    pub fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

/// A decimal from its text; panics with the text when it is not one.
pub fn dec(text: &str) -> rust_decimal::Decimal {
    text.parse()
        .unwrap_or_else(|_| panic!("not a decimal: {text}"))
}

/// A plain action as a direct Kafka publisher sends it for agent instance `inst_<account>`: no
/// user, tokens or cost, empty attributes, times 0. Tests set what matters to them with struct
/// update syntax: `RawAction { user_id: Some(..), ..kafka_action(..) }`.
pub fn kafka_action(
    workspace: &str,
    account: &str,
    event_id: String,
    action_name: &str,
) -> agentmeter_schemas::RawAction {
    agentmeter_schemas::RawAction::minimal(
        workspace,
        account,
        &format!("inst_{account}"),
        &event_id,
        action_name,
    )
}

/// Sends one REST batch with the agent secret; the HTTP status, 0 when the connection failed.
pub fn post_status(
    client: &reqwest::blocking::Client,
    url: &str,
    secret: &str,
    body: &serde_json::Value,
) -> u16 {
    client
        .post(url)
        .header("X-Agent-Secret", secret)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

/// Sends a REST batch until ingest accepts it (202), as the README asks clients to: a batch
/// refused with 429 or 503, or whose connection failed (ingest restarting), is sent again as it
/// was, after `pause`. Panics on any other status, and when the batch is not accepted within
/// `give_up_after` of the first try (a test fails rather than hangs). Returns the refused tries.
pub fn post_until_accepted(
    client: &reqwest::blocking::Client,
    url: &str,
    secret: &str,
    body: &serde_json::Value,
    give_up_after: Duration,
    pause: Duration,
) -> usize {
    let give_up_at = Instant::now() + give_up_after;
    let mut refused = 0;
    loop {
        assert!(
            Instant::now() < give_up_at,
            "a batch was not accepted within {give_up_after:?} of its first try"
        );
        let status = post_status(client, url, secret, body);
        match status {
            202 => return refused,
            0 | 429 | 503 => {
                refused += 1;
                std::thread::sleep(pause);
            }
            other => panic!("unexpected status {other}"),
        }
    }
}
