//! `agentmeter actions`: what the product's Action Tagging tab shows — every action name, auto
//! tag (`<provider>_llm_<model>`) and trace event (span name) seen per workspace in ClickHouse,
//! with its status in the *current* configuration: tracked, outcome, measure and rate in force.
//! Composite outcomes (ADR 0005) show as `composite`; a composite whose context attribute no
//! stored constituent carries is warned about (it cannot fire until actions send it).

use std::collections::HashMap;
use std::time::Duration;

use agentmeter_runtime::config_watch::read_config_topic;
use agentmeter_schemas::decimal::from_scaled_i128;
use agentmeter_schemas::metering::CompositeContext;
use anyhow::Context;
use clap::Args;

use crate::Settings;

#[derive(Debug, Args)]
pub struct ActionsArgs {
    /// Only this workspace.
    #[arg(long)]
    pub workspace: Option<String>,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SeenRow {
    workspace_id: String,
    kind: String,
    name: String,
    seen: u64,
    last_seen: u32,
    cost: i128,
}

pub async fn run(args: ActionsArgs, settings: &Settings) -> anyhow::Result<()> {
    let kafka = settings.kafka.clone();
    let configurations: HashMap<_, _> =
        tokio::task::spawn_blocking(move || read_config_topic(&kafka, Duration::from_secs(30)))
            .await??;
    let database = &settings.clickhouse.database;
    let filter = match &args.workspace {
        Some(workspace) => {
            anyhow::ensure!(
                agentmeter_schemas::metering::is_valid_identifier(workspace),
                "workspace {workspace:?} is not a valid id"
            );
            format!("WHERE workspace_id = '{workspace}' AND kind != 'retracted_outcome'")
        }
        None => "WHERE kind != 'retracted_outcome'".to_string(),
    };
    // Auto tags and plain action names come from action_name; trace events from trace_event.
    let query = format!(
        "SELECT workspace_id, multiIf(kind = 'llm', 'auto_tag', kind = 'trace_event', 'trace_event', \
                kind = 'derived_outcome', 'composite', 'action') AS kind, \
                action_name AS name, count() AS seen, max(occurred_at) AS last_seen, sum(cost) AS cost \
         FROM {database}.actions FINAL {filter} GROUP BY workspace_id, kind, name \
         UNION ALL \
         SELECT workspace_id, 'trace_event' AS kind, trace_event AS name, count() AS seen, max(occurred_at) AS last_seen, \
                sum(cost) AS cost \
         FROM {database}.actions FINAL {filter} {and_trace} GROUP BY workspace_id, kind, name",
        and_trace = "AND kind = 'llm' AND trace_event != ''",
    );
    let mut rows = settings
        .clickhouse
        .client()
        .query(&query)
        .fetch_all::<SeenRow>()
        .await
        .context("cannot read the actions table")?;
    rows.sort_by(|a, b| {
        (&a.workspace_id, &a.kind, &a.name).cmp(&(&b.workspace_id, &b.kind, &b.name))
    });
    println!(
        "{:<14} {:<12} {:<36} {:>9} {:<20} {:<8} {:<8} {:<13} {:>14} {:>14}",
        "workspace",
        "source",
        "name",
        "seen",
        "last seen (UTC)",
        "tracked",
        "outcome",
        "measure",
        "rate now",
        "cost so far"
    );
    let now_micros = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    for row in rows {
        let snapshot = configurations
            .get(&row.workspace_id)
            .map(|(_, snapshot)| snapshot);
        let rule = snapshot.map(|snapshot| snapshot.rule(&row.name));
        let pricing = rule.and_then(|rule| rule.pricing.as_ref());
        let last_seen = time::OffsetDateTime::from_unix_timestamp(i64::from(row.last_seen))
            .map(|instant| {
                format!(
                    "{} {:02}:{:02}",
                    instant.date(),
                    instant.hour(),
                    instant.minute()
                )
            })
            .unwrap_or_default();
        println!(
            "{:<14} {:<12} {:<36} {:>9} {:<20} {:<8} {:<8} {:<13} {:>14} {:>14}",
            row.workspace_id,
            row.kind,
            row.name,
            row.seen,
            last_seen,
            if rule.is_some_and(|rule| rule.tracked) || row.kind == "composite" {
                "yes"
            } else {
                "no"
            },
            if rule.is_some_and(|rule| rule.outcome) || row.kind == "composite" {
                "yes"
            } else {
                "no"
            },
            pricing
                .map(|pricing| pricing.measure.name().to_string())
                .unwrap_or_else(|| "-".into()),
            pricing
                .and_then(|pricing| pricing.rate_at(now_micros))
                .map(|rate| rate.to_string())
                .unwrap_or_else(|| "-".into()),
            from_scaled_i128(row.cost)?.to_string(),
        );
    }
    warn_about_unseen_context_attributes(&args, settings, &configurations).await
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct CountRow {
    count: u64,
}

/// A composite outcome whose context attribute no stored constituent carries cannot fire yet:
/// fine for a definition written ahead of the agents, but worth a look (a misspelt key?).
async fn warn_about_unseen_context_attributes(
    args: &ActionsArgs,
    settings: &Settings,
    configurations: &HashMap<
        String,
        (
            agentmeter_schemas::metering::ConfigRecord,
            std::sync::Arc<agentmeter_schemas::metering::WorkspaceSnapshot>,
        ),
    >,
) -> anyhow::Result<()> {
    let database = &settings.clickhouse.database;
    let client = settings.clickhouse.client();
    let mut workspaces: Vec<_> = configurations
        .iter()
        .filter(|(id, _)| args.workspace.as_ref().is_none_or(|only| only == *id))
        .collect();
    workspaces.sort_by(|a, b| a.0.cmp(b.0));
    for (workspace, (_, snapshot)) in workspaces {
        for composite in snapshot.composite_outcomes() {
            let CompositeContext::Attribute(key) = &composite.context else {
                continue;
            };
            let steps: Vec<String> = composite.step_names();
            let seen = client
                .query(&format!(
                    "SELECT count() AS count FROM {database}.actions WHERE workspace_id = ? \
                     AND has(?, action_name) AND visitParamHas(attributes_json, ?)"
                ))
                .bind(workspace)
                .bind(&steps)
                .bind(key)
                .fetch_one::<CountRow>()
                .await
                .context("cannot read the actions table")?;
            if seen.count == 0 {
                println!(
                    "warning: composite outcome {:?} of workspace {workspace} puts actions together by attribute {key:?}, which no stored {} action carries yet: it cannot fire until actions send it",
                    composite.name,
                    steps.join(" / ")
                );
            }
        }
    }
    Ok(())
}
