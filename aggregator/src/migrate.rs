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

/// Applies every migration not yet applied; returns the names applied now.
pub async fn migrate(settings: &ClickHouseSettings) -> anyhow::Result<Vec<String>> {
    settings.validate()?;
    let client = settings.client();
    let database = &settings.database;
    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await
        .with_context(|| {
            format!(
                "cannot reach ClickHouse at {} to create database {database}",
                settings.url
            )
        })?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {database}.schema_migrations \
             (version UInt32, name String, applied_at DateTime('UTC')) ENGINE = MergeTree ORDER BY version"
        ))
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
    fn splits_statements_and_fills_the_database() {
        let statements = statements(MIGRATIONS[0].2, "db1");
        assert_eq!(statements.len(), 3);
        assert!(statements
            .iter()
            .all(|statement| statement.contains("db1.") && !statement.contains("{database}")));
    }
}
