//! Maps typed errors onto HTTP answers. Handlers return `Result<_, ApiError>`; the mapping
//! from cluster errors to status codes lives here and only here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_cluster::model::CommandError;
use keel_cluster::{error_chain, ClusterError};

use super::types::{ErrorBody, ErrorDetail};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        use CommandError as C;
        let (status, code) = match &e {
            C::NotInitialized => (StatusCode::CONFLICT, "not_initialized"),
            C::AlreadyInitialized { .. } => (StatusCode::CONFLICT, "already_initialized"),
            C::TokenUnknown { .. } => (StatusCode::UNAUTHORIZED, "token_unknown"),
            C::TokenSecretMismatch { .. } => (StatusCode::UNAUTHORIZED, "token_invalid"),
            C::TokenExpired { .. } => (StatusCode::UNAUTHORIZED, "token_expired"),
            C::TokenUsed { .. } => (StatusCode::UNAUTHORIZED, "token_used"),
            C::HostUnknown { .. } => (StatusCode::NOT_FOUND, "host_unknown"),
            C::SettingUnknown { .. } => (StatusCode::NOT_FOUND, "setting_unknown"),
            C::NameTaken { .. } => (StatusCode::CONFLICT, "name_taken"),
            C::VmUnknown { .. } => (StatusCode::NOT_FOUND, "vm_unknown"),
            C::VmDeleting { .. } => (StatusCode::CONFLICT, "vm_deleting"),
            C::VmState { .. } => (StatusCode::CONFLICT, "vm_state"),
            C::TemplateUnknown { .. } => (StatusCode::NOT_FOUND, "template_unknown"),
            C::AffinityGroupUnknown { .. } => (StatusCode::NOT_FOUND, "affinity_group_unknown"),
            C::InUse { .. } => (StatusCode::CONFLICT, "in_use"),
            C::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            C::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Rejected(c) => c.into(),
            ClusterError::NotMember => {
                ApiError::new(StatusCode::CONFLICT, "not_member", e.to_string())
            }
            ClusterError::AlreadyMember { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_member", e.to_string())
            }
            ClusterError::NoQuorum { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", e.to_string())
            }
            ClusterError::Invalid { .. } => ApiError::bad_request(e.to_string()),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                error_chain(&other),
            ),
        }
    }
}
