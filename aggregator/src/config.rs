//! `[aggregator]` and `[clickhouse]` settings.

use std::net::SocketAddr;

use agentmeter_runtime::partitions::OwnershipSettings;
use serde::Deserialize;

/// Settings of `agentmeter aggregate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Consumer group of the aggregator processes: in group ownership mode it assigns the
    /// partitions; in static mode it only names the offsets stored for lag dashboards.
    pub group_id: String,
    /// This process's static membership id in the group (Kafka `group.instance.id`); unique per
    /// process, stable across its restarts. Default `aggregator-<host name>`; empty = dynamic
    /// membership. See ADR 0001, "Consumer groups on tansu".
    pub group_instance_id: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Length of the tumbling usage windows, in seconds; must divide a day.
    #[serde(
        alias = "window",
        deserialize_with = "agentmeter_runtime::duration::seconds_u32"
    )]
    pub window_seconds: u32,
    /// Offsets per input batch. A crash replays at most the current batch of each partition;
    /// usage keeps one row per key per batch, so larger batches mean fewer rows.
    pub batch_offsets: i64,
    /// Longest time between flushes to ClickHouse, in milliseconds.
    #[serde(
        alias = "flush_interval",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub flush_interval_ms: u64,
    /// Flush early when this many actions wait.
    pub max_pending_actions: usize,
    /// An event id seen again within this many seconds (by record time) counts once.
    #[serde(
        alias = "dedupe_horizon",
        deserialize_with = "agentmeter_runtime::duration::seconds_i64"
    )]
    pub dedupe_horizon_seconds: i64,
    /// First delay before retrying a failed ClickHouse write, in milliseconds (doubles up to
    /// `retry_max_backoff_ms`).
    #[serde(
        alias = "retry_initial_backoff",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub retry_initial_backoff_ms: u64,
    /// Longest delay between ClickHouse retries, in milliseconds.
    #[serde(
        alias = "retry_max_backoff",
        deserialize_with = "agentmeter_runtime::duration::millis"
    )]
    pub retry_max_backoff_ms: u64,
    /// Directory of the restart store (the duplicate check's ids on local disk), so that a
    /// restart re-reads at most one batch instead of the whole `dedupe_horizon_seconds`; the
    /// replica's own volume (a StatefulSet's). Unset: no store, a restart re-reads the horizon.
    pub state_dir: Option<std::path::PathBuf>,
    /// `[aggregator.ownership]`: which partitions of `actions.enriched` this process owns
    /// (static by replica ordinal, or a consumer group) and when it counts as stalled (ADR 0003).
    pub ownership: OwnershipSettings,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            group_id: "agentmeter-aggregator".into(),
            group_instance_id: agentmeter_runtime::kafka::default_group_instance_id("aggregator"),
            metrics_listen: "127.0.0.1:9102".parse().expect("valid address"),
            window_seconds: 60,
            batch_offsets: 50_000,
            flush_interval_ms: 1000,
            max_pending_actions: 50_000,
            dedupe_horizon_seconds: 15 * 60,
            retry_initial_backoff_ms: 200,
            retry_max_backoff_ms: 10_000,
            state_dir: None,
            ownership: OwnershipSettings::default(),
        }
    }
}

impl AggregatorConfig {
    /// Cross-field checks, run at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.group_id.is_empty(), "aggregator.group_id is empty");
        self.ownership.validate("aggregator.ownership")?;
        agentmeter_runtime::kafka::validate_group_instance_id(
            "aggregator.group_instance_id",
            &self.group_instance_id,
        )?;
        anyhow::ensure!(
            self.window_seconds > 0 && 86_400 % self.window_seconds == 0,
            "aggregator.window_seconds ({}) must divide a day (86400) so windows align with days",
            self.window_seconds
        );
        anyhow::ensure!(
            (1..=agentmeter_schemas::limits::MAX_BATCH_OFFSETS).contains(&self.batch_offsets),
            "aggregator.batch_offsets must be 1 to {} (a usage row totals at most one batch, which keeps every total inside Decimal(38, 12))",
            agentmeter_schemas::limits::MAX_BATCH_OFFSETS
        );
        anyhow::ensure!(
            self.flush_interval_ms >= 10,
            "aggregator.flush_interval_ms must be at least 10"
        );
        anyhow::ensure!(
            self.max_pending_actions >= 1,
            "aggregator.max_pending_actions must be at least 1"
        );
        anyhow::ensure!(
            self.dedupe_horizon_seconds >= 0,
            "aggregator.dedupe_horizon_seconds must not be negative"
        );
        anyhow::ensure!(
            self.retry_initial_backoff_ms >= 1
                && self.retry_initial_backoff_ms <= self.retry_max_backoff_ms,
            "aggregator.retry_initial_backoff_ms must be between 1 and retry_max_backoff_ms"
        );
        Ok(())
    }
}

/// `[clickhouse]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// HTTP endpoint of ClickHouse.
    pub url: String,
    /// Database holding agentmeter's tables; tests use a fresh one per test.
    pub database: String,
    /// ClickHouse user.
    pub user: String,
    /// ClickHouse password.
    pub password: String,
    /// Cluster mode (ADR 0006): how many replicas must have written each INSERT before it
    /// succeeds (ClickHouse's `insert_quorum`); 0 = off (one server, or replication without a
    /// quorum).
    pub insert_quorum: u32,
    /// Cluster mode: read replicated tables only up to the last quorum write
    /// (`select_sequential_consistency`), so progress read back after a failover never claims
    /// rows the replica does not have. Needs `insert_quorum`.
    pub select_sequential_consistency: bool,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        ClickHouseSettings {
            url: "http://127.0.0.1:8123".into(),
            database: "agentmeter".into(),
            user: "default".into(),
            password: String::new(),
            insert_quorum: 0,
            select_sequential_consistency: false,
        }
    }
}

impl ClickHouseSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            agentmeter_schemas::metering::is_valid_identifier(&self.database)
                && !self.database.contains(['.', ':', '-']),
            "clickhouse.database {:?} must be letters, digits and '_'",
            self.database
        );
        anyhow::ensure!(
            !self.select_sequential_consistency || self.insert_quorum > 0,
            "clickhouse.select_sequential_consistency needs clickhouse.insert_quorum (reads would see no quorum write)"
        );
        anyhow::ensure!(
            self.url.starts_with("http://") || self.url.starts_with("https://"),
            "clickhouse.url {:?} must be an http(s) URL",
            self.url
        );
        Ok(())
    }

    /// A client for this server. Row validation is off: ClickHouse 18.16 lacks the
    /// `RowBinaryWithNamesAndTypes` format it needs, so the row types in `rows.rs` are tested
    /// against the real tables instead.
    pub fn client(&self) -> clickhouse::Client {
        let mut client = clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_validation(false);
        if self.insert_quorum > 0 {
            client = client.with_setting("insert_quorum", self.insert_quorum.to_string());
        }
        if self.select_sequential_consistency {
            client = client.with_setting("select_sequential_consistency", "1");
        }
        client
    }
}
