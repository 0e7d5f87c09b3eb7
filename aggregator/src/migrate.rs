//! `agentmeter migrate`: versioned, idempotent ClickHouse DDL.
//!
//! Migrations are the numbered files in `aggregator/migrations/`, compiled into the binary. Each
//! statement is idempotent (`IF NOT EXISTS`), and applied versions are recorded in
//! `schema_migrations`, so running `migrate` again — or from two processes — changes nothing.

use anyhow::Context;

use crate::config::ClickHouseSettings;

/// (version, name, SQL with `{database}` placeholders), in order.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "tables", include_str!("../migrations/0001_tables.sql")),
    (2, "views", include_str!("../migrations/0002_views.sql")),
    (
        3,
        "usage_exact_parallel",
        include_str!("../migrations/0003_usage_exact_parallel.sql"),
    ),
    (
        4,
        "usage_by_user_day_measure",
        include_str!("../migrations/0004_usage_by_user_day_measure.sql"),
    ),
    (
        5,
        "input_epochs",
        include_str!("../migrations/0005_input_epochs.sql"),
    ),
    (
        6,
        "invoices",
        include_str!("../migrations/0006_invoices.sql"),
    ),
    (
        7,
        "invoice_revenue",
        include_str!("../migrations/0007_invoice_revenue.sql"),
    ),
    (
        8,
        "derived_outcomes",
        include_str!("../migrations/0008_derived_outcomes.sql"),
    ),
    (
        9,
        "config_audit",
        include_str!("../migrations/0009_config_audit.sql"),
    ),
    (
        10,
        "daily_rollups",
        include_str!("../migrations/0010_daily_rollups.sql"),
    ),
];

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct AppliedRow {
    version: u32,
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct MigrationRow {
    version: u32,
    name: String,
    applied_at: u32,
}

/// The statements of a migration file, for one database.
pub fn statements(sql: &str, database: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(|statement| statement.replace("{database}", database))
        .collect()
}

/// A statement of [`statements`] for cluster mode (ADR 0006): `ON CLUSTER cluster` on every
/// CREATE and DROP, and every `…MergeTree` engine replicated under
/// `/clickhouse/tables/{shard}/DATABASE/TABLE` with the server's `{replica}` macro.
pub fn on_cluster(statement: &str, cluster: &str) -> String {
    // Data statements run on the one server `migrate` talks to; replication copies their rows.
    if statement.starts_with("INSERT ") {
        return statement.to_string();
    }
    let on = format!(" ON CLUSTER {cluster}");
    let head_end = statement.find(['\n', '(']).unwrap_or(statement.len());
    let head = statement[..head_end].trim_end();
    let rest = &statement[head.len()..];
    let (head, object) = if let Some(view) = head.strip_suffix(" AS") {
        (
            format!("{view}{on} AS"),
            view.rsplit(' ').next().unwrap_or(""),
        )
    } else {
        (format!("{head}{on}"), head.rsplit(' ').next().unwrap_or(""))
    };
    let mut statement = format!("{head}{rest}");
    // The engine: `ENGINE = [Replacing]MergeTree[(version)]`.
    if let Some(at) = statement.find("ENGINE = ") {
        let engine_start = at + "ENGINE = ".len();
        let engine_end = statement[engine_start..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(statement.len(), |end| engine_start + end);
        let engine = statement[engine_start..engine_end].to_string();
        if engine.ends_with("MergeTree") && !engine.starts_with("Replicated") {
            let (database, table) = object.split_once('.').unwrap_or(("", object));
            let path = format!("'/clickhouse/tables/{{shard}}/{database}/{table}', '{{replica}}'");
            let after = &statement[engine_end..];
            let replaced = if let Some(arguments) = after.strip_prefix('(') {
                format!("Replicated{engine}({path}, {arguments}")
            } else {
                format!("Replicated{engine}({path}){after}")
            };
            statement = format!("{}{replaced}", &statement[..engine_start]);
        }
    }
    statement
}

/// Applies every migration not yet applied; returns the names applied now.
pub async fn migrate(settings: &ClickHouseSettings) -> anyhow::Result<Vec<String>> {
    migrate_on(settings, None).await
}

/// [`migrate`], on one server or — with `cluster` — on every replica of that cluster
/// (`remote_servers`), with replicated tables (ADR 0006).
pub async fn migrate_on(
    settings: &ClickHouseSettings,
    cluster: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    settings.validate()?;
    let client = settings.client();
    let database = &settings.database;
    let for_server = |statement: String| match cluster {
        Some(cluster) => on_cluster(&statement, cluster),
        None => statement,
    };
    if let Some(cluster) = cluster {
        anyhow::ensure!(
            agentmeter_schemas::metering::is_valid_identifier(cluster)
                && !cluster.contains(['.', ':', '-']),
            "cluster {cluster:?} must be letters, digits and '_'"
        );
    }
    client
        .query(&for_server(format!(
            "CREATE DATABASE IF NOT EXISTS {database}"
        )))
        .execute()
        .await
        .with_context(|| {
            format!(
                "cannot reach ClickHouse at {} to create database {database}",
                settings.url
            )
        })?;
    client
        .query(&for_server(format!(
            "CREATE TABLE IF NOT EXISTS {database}.schema_migrations \
             (version UInt32, name String, applied_at DateTime('UTC')) ENGINE = MergeTree ORDER BY version"
        )))
        .execute()
        .await
        .context("cannot create schema_migrations")?;
    let applied: Vec<u32> = client
        .query(&format!(
            "SELECT DISTINCT version FROM {database}.schema_migrations"
        ))
        .fetch_all::<AppliedRow>()
        .await
        .context("cannot read schema_migrations")?
        .into_iter()
        .map(|row| row.version)
        .collect();
    let mut applied_now = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        for statement in statements(sql, database) {
            let statement = for_server(statement);
            client.query(&statement).execute().await.with_context(|| {
                format!("migration {version:04}_{name} failed on:\n{statement}")
            })?;
        }
        let mut insert = client
            .clone()
            .with_database(database)
            .insert::<MigrationRow>("schema_migrations")
            .await?;
        insert
            .write(&MigrationRow {
                version: *version,
                name: name.to_string(),
                applied_at: time::OffsetDateTime::now_utc().unix_timestamp() as u32,
            })
            .await?;
        insert.end().await?;
        applied_now.push(format!("{version:04}_{name}"));
    }
    Ok(applied_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_registered_in_order() {
        let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let registered: Vec<String> = MIGRATIONS
            .iter()
            .map(|(version, name, _)| format!("{version:04}_{name}.sql"))
            .collect();
        assert_eq!(files, registered, "add new migration files to MIGRATIONS");
    }

    #[test]
    fn cluster_statements_run_on_every_replica_with_replicated_engines() {
        let tables = statements(MIGRATIONS[0].2, "db1");
        let actions = on_cluster(&tables[0], "c1");
        assert!(
            actions.starts_with("CREATE TABLE IF NOT EXISTS db1.actions ON CLUSTER c1\n("),
            "{actions}"
        );
        assert!(actions.contains("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db1/actions', '{replica}')\nPARTITION BY"), "{actions}");
        let usage = on_cluster(&tables[1], "c1");
        assert!(usage.contains("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db1/usage', '{replica}', version)"), "{usage}");
        let views = statements(MIGRATIONS[1].2, "db1");
        let view = on_cluster(&views[0], "c1");
        assert!(
            view.starts_with("CREATE VIEW IF NOT EXISTS db1.usage_exact ON CLUSTER c1 AS\n"),
            "{view}"
        );
        assert_eq!(
            on_cluster("DROP TABLE IF EXISTS db1.usage_exact", "c1"),
            "DROP TABLE IF EXISTS db1.usage_exact ON CLUSTER c1"
        );
        assert_eq!(
            on_cluster("CREATE DATABASE IF NOT EXISTS db1", "c1"),
            "CREATE DATABASE IF NOT EXISTS db1 ON CLUSTER c1"
        );
        assert!(on_cluster(
            "CREATE TABLE IF NOT EXISTS db1.schema_migrations (version UInt32) ENGINE = MergeTree ORDER BY version",
            "c1"
        )
        .ends_with("ON CLUSTER c1 (version UInt32) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/db1/schema_migrations', '{replica}') ORDER BY version"));
        // Every DDL statement of every migration gets ON CLUSTER, no engine stays local, and a
        // data statement (the rollups' backfill) runs unchanged on one server.
        let backfill = "INSERT INTO db1.usage_daily SELECT 1";
        assert_eq!(on_cluster(backfill, "c1"), backfill);
        for (_, _, sql) in MIGRATIONS {
            for statement in statements(sql, "db1") {
                let clustered = on_cluster(&statement, "c1");
                if statement.starts_with("INSERT ") {
                    assert_eq!(clustered, statement);
                    continue;
                }
                assert!(clustered.contains(" ON CLUSTER c1"), "{clustered}");
                assert!(
                    !clustered.contains("= ReplacingMergeTree")
                        && !clustered.contains("= MergeTree"),
                    "{clustered}"
                );
            }
        }
    }

    #[test]
    fn splits_statements_and_fills_the_database() {
        let statements = statements(MIGRATIONS[0].2, "db1");
        assert_eq!(statements.len(), 3);
        assert!(statements
            .iter()
            .all(|statement| statement.contains("db1.") && !statement.contains("{database}")));
    }
}
