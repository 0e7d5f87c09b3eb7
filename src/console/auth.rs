//! The caller of the control-plane API: `Authorization: Bearer <admin key>`. The key alone says
//! which workspace the caller acts on (keys are stored as SHA-256 on the config topic and
//! compared in constant time, `MeteringState::authenticate_admin`); no id in a request can
//! widen it.

use std::sync::Arc;

use agentmeter_schemas::metering::{AdminKey, AdminRole};
use agentmeter_schemas::WorkspaceSnapshot;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::error::ApiError;
use super::ConsoleState;

/// An authenticated caller: one workspace's admin key.
pub struct Caller {
    /// The workspace as this process last read it.
    pub workspace: Arc<WorkspaceSnapshot>,
    pub key: AdminKey,
}

impl Caller {
    /// Who made a change, for the audit log.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key.id)
    }

    /// Refuses read-only keys.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.key.role {
            AdminRole::Admin => Ok(()),
            AdminRole::ReadOnly => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "admin key {:?} is read-only; changes need a key with the admin role (agentmeter admin-key new --role admin)",
                    self.key.id
                ),
            )),
        }
    }
}

impl FromRequestParts<ConsoleState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Caller, ApiError> {
        let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, message);
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                unauthorized("missing admin key: send Authorization: Bearer <admin key> (make one with `agentmeter admin-key new`)")
            })?
            .to_str()
            .map_err(|_| unauthorized("malformed Authorization header: not visible ASCII"))?;
        let key = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                unauthorized("malformed Authorization header: send 'Bearer <admin key>'")
            })?;
        let (workspace, key) = state
            .config
            .load()
            .authenticate_admin(key, time::OffsetDateTime::now_utc())
            .ok_or_else(|| unauthorized("unknown or revoked admin key"))?;
        Ok(Caller { workspace, key })
    }
}
