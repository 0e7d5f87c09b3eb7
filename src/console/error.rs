//! Every refusal of the control-plane API: a status and a JSON body
//! `{"error": {"status": 422, "message": "…", "field": "…"}}` whose message names the field and
//! the problem. Unknown ids answer 404 the same way whether they exist in another workspace or
//! not at all.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config_publish::PublishError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    /// 422: the request is well-formed, but `field` cannot be that.
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }

    /// 404 for `what` (`account "acc_x"`), the same answer whether it exists elsewhere or not.
    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }

    pub fn unavailable(error: anyhow::Error) -> ApiError {
        tracing::warn!(error = %format!("{error:#}"), "console request failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the control plane cannot answer now: {error:#}; try again"),
        )
    }
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> ApiError {
        let status = match error {
            PublishError::Failed(error) => return ApiError::unavailable(error),
            PublishError::Refused { field, message } => {
                return ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    message,
                    field,
                }
            }
            PublishError::NotFound(what) => return ApiError::not_found(what),
            ref error @ (PublishError::Stale { .. } | PublishError::FinalizedPeriods(_)) => {
                (StatusCode::CONFLICT, error.to_string())
            }
            ref error @ PublishError::UnknownWorkspace => {
                (StatusCode::NOT_FOUND, error.to_string())
            }
            ref error @ PublishError::Invalid(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, error.to_string())
            }
        };
        ApiError::new(status.0, status.1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "status": self.status.as_u16(),
                "message": self.message,
                "field": self.field,
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}
