//! The settings file a test or a bench run gives its `agentmeter` processes: the production
//! defaults but for this run's names (topic prefix, database, consumer groups) and ports.

/// Names and ports of one isolated run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub brokers: String,
    pub topic_prefix: String,
    pub clickhouse_url: String,
    pub database: String,
    pub ingest_port: u16,
    pub otlp_grpc_port: u16,
    pub otlp_http_port: u16,
    pub enricher_metrics_port: u16,
    pub aggregator_metrics_port: u16,
}

/// A run's unique name, its directory and its [`RunSettings`], all fresh.
#[derive(Debug, Clone)]
pub struct IsolatedRun {
    /// `{name}_{process id}_{milliseconds}`: in every name below.
    pub unique: String,
    /// `agentmeter-{kind}-{unique}` in the temporary directory (created): settings, logs.
    pub dir: std::path::PathBuf,
    /// Topics `agentmeter.{kind}.{unique}.*`, database `agentmeter_{kind}_{unique}`, and a
    /// [`crate::free_port`] for every listener.
    pub settings: RunSettings,
}

impl IsolatedRun {
    /// A fresh run of `kind` (`test`, `bench`) called `name`, against these services.
    pub fn new(
        kind: &str,
        name: &str,
        brokers: String,
        clickhouse_url: String,
    ) -> std::io::Result<IsolatedRun> {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(std::io::Error::other)?
            .as_millis();
        let unique = format!("{name}_{}_{}", std::process::id(), millis % 100_000_000);
        let dir = std::env::temp_dir().join(format!("agentmeter-{kind}-{unique}"));
        std::fs::create_dir_all(&dir)?;
        let settings = RunSettings {
            brokers,
            topic_prefix: format!("agentmeter.{kind}.{unique}."),
            clickhouse_url,
            database: format!("agentmeter_{kind}_{unique}"),
            ingest_port: crate::free_port(),
            otlp_grpc_port: crate::free_port(),
            otlp_http_port: crate::free_port(),
            enricher_metrics_port: crate::free_port(),
            aggregator_metrics_port: crate::free_port(),
        };
        Ok(IsolatedRun {
            unique,
            dir,
            settings,
        })
    }
}

impl RunSettings {
    /// The TOML text. `enricher_extra` and `aggregator_extra` are appended to those tables
    /// (keys, or sub-tables such as `[aggregator.ownership]` last); `trailer` after everything
    /// (e.g. a `[kafka.client_overrides]` table).
    pub fn to_toml(&self, enricher_extra: &str, aggregator_extra: &str, trailer: &str) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = 4

[clickhouse]
url = "{clickhouse}"
database = "{database}"

[ingest]
http_listen = "127.0.0.1:{ingest}"
otlp_grpc_listen = "127.0.0.1:{otlp_grpc}"
otlp_http_listen = "127.0.0.1:{otlp_http}"

[enricher]
group_id = "{prefix}enricher"
metrics_listen = "127.0.0.1:{enricher}"
{enricher_extra}
[aggregator]
group_id = "{prefix}aggregator"
metrics_listen = "127.0.0.1:{aggregator}"
{aggregator_extra}
{trailer}"#,
            brokers = self.brokers,
            prefix = self.topic_prefix,
            clickhouse = self.clickhouse_url,
            database = self.database,
            ingest = self.ingest_port,
            otlp_grpc = self.otlp_grpc_port,
            otlp_http = self.otlp_http_port,
            enricher = self.enricher_metrics_port,
            aggregator = self.aggregator_metrics_port,
        )
    }
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
