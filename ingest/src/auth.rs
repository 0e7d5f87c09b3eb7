//! Agent authentication: the secret alone says who is calling.

use std::sync::Arc;

use agentmeter_runtime::config_watch::ConfigHandle;
use agentmeter_schemas::metering::AgentInstance;
use agentmeter_schemas::WorkspaceSnapshot;
use axum::http::HeaderMap;

/// Header the value-python SDK and REST clients send the agent secret in.
pub const AGENT_SECRET_HEADER: &str = "x-agent-secret";

/// The authenticated caller: an agent instance of one workspace.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub workspace: Arc<WorkspaceSnapshot>,
    pub instance: AgentInstance,
}

/// Why a request is not authenticated; the message is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing agent secret: send it in the X-Agent-Secret header (or Authorization: Bearer)"
    )]
    Missing,
    #[error("unknown agent secret: no agent instance has this secret (was it rotated?)")]
    Unknown,
}

/// The secret from `X-Agent-Secret`, else from `Authorization: Bearer`.
pub fn secret_from_headers(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(AGENT_SECRET_HEADER) {
        return value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|secret| !secret.is_empty());
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|secret| !secret.is_empty())
}

/// Authenticates a request by its headers against the current configuration.
pub fn authenticate(
    config: &ConfigHandle,
    headers: &HeaderMap,
) -> Result<AgentIdentity, AuthError> {
    let secret = secret_from_headers(headers).ok_or(AuthError::Missing)?;
    let (workspace, instance) = config
        .load()
        .authenticate(secret)
        .ok_or(AuthError::Unknown)?;
    Ok(AgentIdentity {
        workspace,
        instance,
    })
}

/// Authenticates a gRPC call by its metadata (`x-agent-secret`, or `authorization: Bearer`),
/// with the same rules as [`authenticate`].
pub fn authenticate_grpc(
    config: &ConfigHandle,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<AgentIdentity, AuthError> {
    authenticate(config, metadata.as_ref())
}

/// The Acme Research Agent of `deploy/local/metering.example.toml`, for unit tests.
#[cfg(test)]
pub(crate) fn example_identity() -> AgentIdentity {
    let config = agentmeter_schemas::MeteringConfig::from_toml(include_str!(
        "../../deploy/local/metering.example.toml"
    ))
    .expect("the shipped example is valid");
    let workspace = Arc::new(WorkspaceSnapshot::build(1, config).expect("valid"));
    let instance = workspace
        .instance("inst_acme_research")
        .expect("in the example")
        .clone();
    AgentIdentity {
        workspace,
        instance,
    }
}
