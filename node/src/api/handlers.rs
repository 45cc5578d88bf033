//! Route handlers. Each one parses, calls the cluster database, and maps the result.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use keel_cluster::db::{now_ms, JoinRequest};
use keel_cluster::model::{self, Command, Host, NewHost, Setting};
use keel_cluster::token::JoinTokenBody;
use keel_cluster::ClusterError;

use super::views;
use super::{ApiError, AppState, Principal};
use keel_api_types::*;

const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

/// Reads this node's replica of the state.
pub(super) fn read<T>(
    state: &AppState,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
) -> Result<T, ApiError> {
    state.db.reader().read(f).map_err(ApiError::from)
}

#[utoipa::path(get, path = "/healthz", tag = "cluster",
    responses((status = 200, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        member: state.db.node_id().is_some(),
        leader: state.db.is_leader(),
        duties: state.duties.running(),
    })
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterView), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_cluster(State(state): State<AppState>) -> ApiResult<ClusterView> {
    let info = state.db.cluster_info().map_err(ApiError::from)?;
    Ok(Json(views::cluster_view(&state.db, info)))
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    responses((status = 200, body = [HostView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_hosts(State(state): State<AppState>) -> ApiResult<Vec<HostView>> {
    let hosts = read(&state, model::list::<Host>)?;
    Ok(Json(views::host_views(&state.db, hosts)))
}

#[utoipa::path(get, path = "/api/v1/hosts/{id}", tag = "hosts",
    params(("id" = u64, Path, description = "host (raft node) id")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_host(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<HostView> {
    let id = parse_host_id(&id)?;
    let host = read(&state, |c| model::host(c, id))?
        .ok_or_else(|| ApiError::from(model::CommandError::HostUnknown { host_id: id }))?;
    let mut views = views::host_views(&state.db, vec![host]);
    Ok(Json(views.remove(0)))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{id}", tag = "hosts",
    params(("id" = u64, Path, description = "host (raft node) id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_host(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_host_id(&id)?;
    read(&state, |c| model::host(c, id))?
        .ok_or_else(|| ApiError::from(model::CommandError::HostUnknown { host_id: id }))?;
    tracing::info!(host_id = id, principal = ?who, "removing host");
    state.db.remove_node(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn parse_host_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{id:?} is not a host id: use the numeric id from `keel node list`"
        ))
    })
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "cluster",
    request_body = CreateTokenRequest,
    responses((status = 201, body = TokenView), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Option<Json<CreateTokenRequest>>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    let ttl = match body.and_then(|Json(b)| b.ttl) {
        None => DEFAULT_TOKEN_TTL,
        Some(text) => humantime::parse_duration(&text).map_err(|e| {
            ApiError::bad_request(format!(
                "ttl {text:?} is not a duration like 10m or 2h: {e}"
            ))
        })?,
    };
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(ApiError::bad_request(
            "ttl must be more than 0 and at most 7d",
        ));
    }
    let body = state.db.create_join_token(ttl).await?;
    tracing::info!(token_id = %body.id, principal = ?who, ttl_s = ttl.as_secs(), "join token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenView {
            token: body.encode(),
            id: body.id.clone(),
            expires_at_ms: body.expires_at_ms,
        }),
    ))
}

/// The joining node's request; the token secret is its authentication.
#[utoipa::path(post, path = "/api/v1/join", tag = "cluster",
    request_body = JoinApiRequest,
    responses((status = 200, body = JoinApiReply), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, description = "the request is larger than 64 KiB"),
        (status = 429, body = ErrorBody, description = "too many join requests from this address")))]
pub async fn join(
    State(state): State<AppState>,
    Json(req): Json<JoinApiRequest>,
) -> ApiResult<JoinApiReply> {
    let reply = state
        .db
        .join_on_leader(JoinRequest {
            token_id: req.token_id,
            secret_sha256: req.secret_sha256,
            csr_pem: req.csr_pem,
            host: NewHost {
                name: req.name,
                peer_addr: req.peer_addr,
                api_addr: req.api_addr,
                witness: req.witness,
            },
        })
        .await?;
    Ok(Json(JoinApiReply {
        node_id: reply.node_id,
        cluster_id: reply.cluster_id,
        cert_pem: reply.cert_pem,
        ca_pem: reply.ca_pem,
    }))
}

#[utoipa::path(get, path = "/api/v1/settings", tag = "settings",
    responses((status = 200, body = [SettingView])), security(("bearer" = [])))]
pub async fn list_settings(State(state): State<AppState>) -> ApiResult<Vec<SettingView>> {
    let settings = read(&state, model::list::<Setting>)?;
    Ok(Json(settings.into_iter().map(setting_view).collect()))
}

#[utoipa::path(get, path = "/api/v1/settings/{key}", tag = "settings",
    params(("key" = String, Path)),
    responses((status = 200, body = SettingView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_setting(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> ApiResult<SettingView> {
    let setting = read(&state, |c| model::get::<Setting>(c, &key))?
        .ok_or_else(|| ApiError::from(model::CommandError::SettingUnknown { key }))?;
    Ok(Json(setting_view(setting)))
}

#[utoipa::path(put, path = "/api/v1/settings/{key}", tag = "settings",
    params(("key" = String, Path)), request_body = PutSettingRequest,
    responses((status = 200, body = SettingView), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_setting(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<PutSettingRequest>,
) -> ApiResult<SettingView> {
    let now = now_ms();
    state
        .db
        .write(Command::PutSetting {
            key: key.clone(),
            value: body.value.clone(),
            now_ms: now,
        })
        .await?;
    Ok(Json(SettingView {
        key,
        value: body.value,
        updated_at_ms: now,
    }))
}

#[utoipa::path(delete, path = "/api/v1/settings/{key}", tag = "settings",
    params(("key" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_setting(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.db.write(Command::DeleteSetting { key }).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn setting_view(s: Setting) -> SettingView {
    SettingView {
        key: s.key,
        value: s.value,
        updated_at_ms: s.updated_at_ms,
    }
}

#[utoipa::path(get, path = "/api/v1/ca.pem", tag = "cluster",
    responses((status = 200, description = "the cluster CA certificate (PEM), for pinning", content_type = "application/x-pem-file")),
    security(("bearer" = [])))]
pub async fn get_ca(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let info = state
        .db
        .cluster_info()?
        .ok_or(ApiError::from(ClusterError::NotMember))?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        info.ca_cert_pem,
    ))
}

#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition")), security(("bearer" = [])))]
pub async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.db, state.started),
    )
}

// ---- local (admin socket) routes ---------------------------------------------------------

pub async fn local_init(
    State(state): State<AppState>,
    body: Option<Json<InitRequest>>,
) -> ApiResult<InitReply> {
    let req = match body {
        Some(Json(b)) => b,
        None => serde_json::from_str("{}").map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    require_routable(&state)?;
    let out = state
        .db
        .init(keel_cluster::db::InitParams {
            cluster_name: req.name,
            zone: req.zone,
            compute_cluster: req.compute_cluster,
        })
        .await?;
    Ok(Json(InitReply {
        cluster_id: out.cluster_id,
        node_id: out.node_id,
        admin_token: out.admin_token,
        ca_fingerprint: out.ca_fingerprint,
        ca_pem: out.ca_pem,
        api_addr: state.db.config().api_addr.to_string(),
    }))
}

/// The addresses a node advertises must be reachable by other servers.
fn require_routable(state: &AppState) -> Result<(), ApiError> {
    let c = state.db.config();
    for (flag, addr) in [("--peer-addr", c.peer_addr), ("--api-addr", c.api_addr)] {
        if addr.ip().is_unspecified() {
            return Err(ApiError::bad_request(format!(
                "{flag} is {addr}: other servers cannot reach an unspecified address; restart `keel serve` with {flag} set to this server's address on the management network"
            )));
        }
    }
    Ok(())
}

pub async fn local_join(
    State(state): State<AppState>,
    Json(req): Json<LocalJoinRequest>,
) -> ApiResult<LocalJoinReply> {
    let token =
        JoinTokenBody::decode(&req.token).map_err(|e| ApiError::bad_request(e.to_string()))?;
    require_routable(&state)?;
    let draft = state.db.prepare_join().await?;
    let reply = keel_client::join::request_join(&token, draft).await?;
    let node_id = reply.node_id;
    let cluster_id = reply.cluster_id.clone();
    state.db.complete_join(reply).await?;
    Ok(Json(LocalJoinReply {
        node_id,
        cluster_id,
    }))
}
