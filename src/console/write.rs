//! The one write path of the console, for the API and the web console alike: the edit applied
//! to the workspace's current configuration, published by [`publish_next`] (the path
//! `config apply` takes) if the caller's version is still current, its audit row written, and the
//! answer held until this process has read its own write back.

use std::time::{Duration, Instant};

use agentmeter_schemas::MeteringConfig;

use super::auth::Caller;
use super::error::ApiError;
use super::reads;
use super::ConsoleState;
use crate::config_publish::{publish_next, Edited, PublishError};

/// Applies `edit` to the workspace's current configuration as of version `expected` and
/// publishes the result; returns the new version and what `edit` returned. The API takes
/// `expected` from `If-Match`, the web console's forms from a hidden field.
pub async fn write_at<T>(
    state: &ConsoleState,
    caller: &Caller,
    expected: i64,
    edit: impl FnOnce(&mut MeteringConfig) -> Result<T, PublishError>,
) -> Result<(i64, T), ApiError> {
    caller.require_admin()?;
    let workspace_id = caller.workspace.workspace_id().to_string();
    let mut answer = None;
    let published = publish_next(
        &state.settings.kafka,
        &workspace_id,
        Some(expected),
        &caller.actor(),
        |current| {
            let current = current.ok_or(PublishError::UnknownWorkspace)?;
            let mut config = current.config.clone();
            answer = Some(edit(&mut config)?);
            Ok(Edited {
                config,
                admin_keys: None,
            })
        },
    )
    .await?;
    let answer = answer.expect("the edit ran, or publish_next returned its error");
    let record = published.record;
    if published.changed {
        // The change note is in the published record, so the audit follower copies it should
        // this write fail: the change is made either way, and the answer says so.
        if let Err(error) = reads::record_change(
            state,
            &workspace_id,
            record.version,
            record.applied_at,
            record.change.as_ref(),
        )
        .await
        {
            tracing::warn!(error = %format!("{error:#}"), version = record.version, "cannot write the audit row now; the follower copies it later");
        }
        wait_to_see(state, &workspace_id, record.version).await;
    }
    Ok((record.version, answer))
}

/// Waits (up to 10 s) until this process's configuration has `version`, so the caller's next
/// read shows its write.
async fn wait_to_see(state: &ConsoleState, workspace_id: &str, version: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let seen = state
            .config
            .load()
            .workspace(workspace_id)
            .is_some_and(|snapshot| snapshot.version >= version);
        if seen {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
