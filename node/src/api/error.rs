//! Maps typed errors onto HTTP answers. Handlers return `Result<_, ApiError>`; the mapping
//! from cluster errors to status codes lives here and only here.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_cluster::model::CommandError;
use keel_cluster::store::StoreError;
use keel_cluster::{error_chain, ClusterError};

use keel_client::join::JoinError;

use crate::compute::images::ImageError;

use keel_api_types::{ErrorBody, ErrorDetail};

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

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request body as JSON with `Content-Type: application/json`",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
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
            C::NetworkUnknown { .. } => (StatusCode::NOT_FOUND, "network_unknown"),
            C::SecurityGroupUnknown { .. } => (StatusCode::NOT_FOUND, "security_group_unknown"),
            C::RuleUnknown { .. } => (StatusCode::NOT_FOUND, "rule_unknown"),
            C::AddressInUse { .. } => (StatusCode::CONFLICT, "address_in_use"),
            C::NetworkFull { .. } => (StatusCode::CONFLICT, "network_full"),
            C::FloatingIpUnknown { .. } => (StatusCode::NOT_FOUND, "floating_ip_unknown"),
            C::NicUnknown { .. } => (StatusCode::NOT_FOUND, "nic_unknown"),
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

impl From<StoreError> for ApiError {
    /// A read of the cluster state failed (the database, not the request).
    fn from(source: StoreError) -> Self {
        ClusterError::store("reading the cluster state")(source).into()
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        use ImageError as I;
        let (status, code) = match &e {
            I::ChecksumMismatch { .. } => (StatusCode::BAD_REQUEST, "checksum_mismatch"),
            I::FormatMismatch { .. } => (StatusCode::BAD_REQUEST, "format_mismatch"),
            I::HasBackingFile { .. } => (StatusCode::BAD_REQUEST, "backing_file"),
            I::UnsupportedFormat { .. } => (StatusCode::BAD_REQUEST, "unsupported_format"),
            I::Empty => (StatusCode::BAD_REQUEST, "empty_image"),
            // qemu-img ran but could not read the image: a damaged or truncated file.
            I::QemuImg { .. } => (StatusCode::BAD_REQUEST, "image_unreadable"),
            I::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                (StatusCode::INSUFFICIENT_STORAGE, "no_space")
            }
            I::Io { .. } | I::QemuImgSpawn { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "image_store")
            }
        };
        ApiError::new(status, code, error_chain(&e))
    }
}

/// A JSON body axum could not take: the project's error body instead of axum's plain text.
impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::unsupported_media_type(),
            // axum's text names the field and the position, e.g. "Failed to deserialize the
            // JSON body into the target type: cpus: unknown field `cpus`, expected one of …".
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text())
            }
            other => ApiError::new(other.status(), "invalid_body", other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::Refused { status, .. } => ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                "join_refused",
                e.to_string(),
            ),
            JoinError::Unreachable { .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "cluster_unreachable",
                e.to_string(),
            ),
            JoinError::Pin(_) | JoinError::Client(_) | JoinError::MalformedReply { .. } => {
                ApiError::bad_request(error_chain(&e))
            }
        }
    }
}
