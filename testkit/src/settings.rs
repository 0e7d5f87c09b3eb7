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
