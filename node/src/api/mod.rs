//! The HTTP API, served two ways from one set of handlers:
//!
//! * HTTPS on the API address (axum + rustls): every route except `/healthz` and the
//!   token-authenticated `/api/v1/join` needs `Authorization: Bearer <token>`.
//! * The local admin socket (root-only Unix socket) for the `keel` CLI on the same server:
//!   file permissions are the authentication, and a few local-only routes (`/local/v1/…`:
//!   init, join) exist only there.
//!
//! Handlers translate, never decide: parse → typed command → `ClusterDb` → map the error.

#[cfg(feature = "bench")]
mod bench;
pub mod console;
pub mod error;
pub mod extract;
pub mod floating_ips;
mod handlers;
mod networks;
pub mod openapi;
pub mod rate_limit;
mod templates;
mod views;
mod vms;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use keel_cluster::model::{self, Credential};
use keel_cluster::token::{digests_equal, sha256_hex};
use keel_cluster::ClusterDb;

pub use console::CONSOLE_PROTOCOL;
pub use error::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: ClusterDb,
    pub started: std::time::Instant,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub duties: Arc<crate::duties::DutyStatus>,
    /// This host's image store (template uploads and imports land here).
    pub images: Arc<crate::compute::images::ImageStore>,
    /// Opens VM consoles here or on the VM's host.
    pub consoles: Arc<crate::compute::console::Consoles>,
    /// Join requests per source address (the route anyone on the network can reach).
    pub join_limiter: Arc<rate_limit::RateLimiter>,
}

/// A source may send this many join requests a second…
pub const JOIN_RATE_PER_SECOND: f64 = 2.0;
/// …after a burst of this many (a rack joining at once comes from as many addresses).
pub const JOIN_BURST: u32 = 10;
/// A join request is a token, a CSR and a few names: far below this.
pub const JOIN_BODY_LIMIT: usize = 64 * 1024;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Root on this server, through the admin socket.
    LocalRoot,
    /// A bearer-token credential.
    Credential { name: String },
}

fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/cluster", get(handlers::get_cluster))
        .route("/api/v1/hosts", get(handlers::list_hosts))
        .route(
            "/api/v1/hosts/{id}",
            get(handlers::get_host).delete(handlers::remove_host),
        )
        .route("/api/v1/tokens", post(handlers::create_token))
        .route("/api/v1/settings", get(handlers::list_settings))
        .route(
            "/api/v1/settings/{key}",
            put(handlers::put_setting)
                .get(handlers::get_setting)
                .delete(handlers::delete_setting),
        )
        .route("/api/v1/vms", get(vms::list_vms).post(vms::create_vm))
        .route("/api/v1/vms/{vm}", get(vms::get_vm).delete(vms::delete_vm))
        .route("/api/v1/vms/{vm}/start", post(vms::start_vm))
        .route("/api/v1/vms/{vm}/stop", post(vms::stop_vm))
        .route("/api/v1/vms/{vm}/reboot", post(vms::reboot_vm))
        .route("/api/v1/vms/{vm}/resize", post(vms::resize_vm))
        .route("/api/v1/vms/{vm}/console", get(console::vm_console))
        .route("/api/v1/vms/{vm}/migrate", post(vms::migrate_vm))
        .route("/api/v1/vms/{vm}/nics", post(vms::attach_nic))
        .route(
            "/api/v1/vms/{vm}/nics/{mac}",
            axum::routing::delete(vms::detach_nic),
        )
        .route("/api/v1/hosts/{host}/drain", post(vms::drain_host))
        .route("/api/v1/hosts/{host}/undrain", post(vms::undrain_host))
        .route(
            "/api/v1/hosts/{host}/networks",
            get(networks::get_host_networks),
        )
        .route(
            "/api/v1/hosts/{host}/networks/{role}",
            put(networks::set_host_network).delete(networks::clear_host_network),
        )
        .route(
            "/api/v1/networks",
            get(networks::list_networks).post(networks::create_network),
        )
        .route(
            "/api/v1/networks/{network}",
            get(networks::get_network).delete(networks::delete_network),
        )
        .route(
            "/api/v1/security-groups",
            get(networks::list_security_groups).post(networks::create_security_group),
        )
        .route(
            "/api/v1/security-groups/{group}",
            get(networks::get_security_group).delete(networks::delete_security_group),
        )
        .route(
            "/api/v1/security-groups/{group}/rules",
            post(networks::add_security_rule),
        )
        .route(
            "/api/v1/security-groups/{group}/rules/{rule}",
            axum::routing::delete(networks::delete_security_rule),
        )
        .route(
            "/api/v1/floating-ips",
            get(floating_ips::list_floating_ips).post(floating_ips::allocate_floating_ip),
        )
        .route(
            "/api/v1/floating-ips/{ip}",
            get(floating_ips::get_floating_ip).delete(floating_ips::release_floating_ip),
        )
        .route(
            "/api/v1/floating-ips/{ip}/target",
            put(floating_ips::attach_floating_ip).delete(floating_ips::detach_floating_ip),
        )
        .route("/api/v1/operations", get(vms::list_operations))
        .route("/api/v1/operations/{id}", get(vms::get_operation))
        .route(
            "/api/v1/templates",
            get(templates::list_templates).post(
                // The body is the image (gigabytes), streamed to disk: no size limit here.
                templates::upload_template.layer(DefaultBodyLimit::disable()),
            ),
        )
        .route("/api/v1/templates/import", post(templates::import_template))
        .route(
            "/api/v1/templates/{template}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route(
            "/api/v1/affinity-groups",
            get(vms::list_affinity_groups).post(vms::create_affinity_group),
        )
        .route(
            "/api/v1/affinity-groups/{name}",
            axum::routing::delete(vms::delete_affinity_group),
        )
        .route("/api/v1/ca.pem", get(handlers::get_ca))
        .route("/api/v1/openapi.json", get(openapi::get_openapi))
        .route("/metrics", get(handlers::get_metrics))
}

/// The router for the HTTPS listener.
pub fn https_router(state: AppState) -> Router {
    let authed = api_routes().layer(middleware::from_fn_with_state(
        state.clone(),
        require_bearer,
    ));
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route(
            "/api/v1/join",
            post(handlers::join)
                .layer(DefaultBodyLimit::max(JOIN_BODY_LIMIT))
                .layer(middleware::from_fn_with_state(state.clone(), limit_joins)),
        )
        .merge(authed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The router for the admin socket.
pub fn local_router(state: AppState) -> Router {
    let router = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/local/v1/init", post(handlers::local_init))
        .route("/local/v1/join", post(handlers::local_join));
    #[cfg(feature = "bench")]
    let router = router.route("/local/v1/bench/raft", post(bench::local_raft_bench));
    router
        .merge(api_routes())
        .layer(Extension(Principal::LocalRoot))
        .with_state(state)
}

/// Answers 429 to a source that sends join requests faster than [`JOIN_RATE_PER_SECOND`].
async fn limit_joins(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(source) = source {
        if let Err(wait) = state.join_limiter.take(source, std::time::Instant::now()) {
            tracing::debug!(%source, "join request over the rate limit");
            return error::ApiError::too_many_requests(format!(
                "too many join requests from {source}: wait {} ms and try again",
                wait.as_millis().max(1)
            ))
            .into_response();
        }
    }
    next.run(req).await
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.record_http(resp.status().as_u16());
    resp
}

async fn require_bearer(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header_token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Browsers cannot set headers on a WebSocket: they offer `bearer.<token>` as a
    // subprotocol instead (see api::console).
    let protocol_token = req
        .headers()
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .map(str::trim)
                .find_map(|p| p.strip_prefix("bearer."))
        });
    let token = header_token
        .or(protocol_token)
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "missing credentials: send `Authorization: Bearer <token>` (the admin token from `keel cluster init`)",
            )
        })?;
    let digest = sha256_hex(token.as_bytes());
    drop(token);
    let credentials = state.db.reader().read(model::list::<Credential>)?;
    let found = credentials
        .into_iter()
        .find(|c| digests_equal(&c.token_sha256, &digest))
        .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid for this cluster"))?;
    req.extensions_mut()
        .insert(Principal::Credential { name: found.name });
    Ok(next.run(req).await)
}
