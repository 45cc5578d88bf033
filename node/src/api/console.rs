//! WebSocket consoles: `GET /api/v1/vms/{vm}/console?kind=serial|vnc` upgrades to a
//! WebSocket that carries the console's bytes as binary frames both ways (noVNC speaks
//! RFB over exactly this). Authentication is the usual bearer token; browsers, which
//! cannot set headers on a WebSocket, may offer it as the subprotocol `bearer.<token>`
//! next to `keel.console` instead.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::compute::console::{ConsoleError, ConsoleKind, ConsolePipe};

pub use keel_api_types::CONSOLE_PROTOCOL;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// `serial` (default) or `vnc`.
    #[param(value_type = Option<String>)]
    pub kind: Option<ConsoleKind>,
}

impl From<ConsoleError> for ApiError {
    fn from(e: ConsoleError) -> Self {
        let (status, code) = match &e {
            ConsoleError::UnknownVm { .. } => (StatusCode::NOT_FOUND, "vm_unknown"),
            ConsoleError::NotRunning { .. } => (StatusCode::CONFLICT, "vm_state"),
            ConsoleError::NoHypervisor | ConsoleError::NoVnc { .. } => {
                (StatusCode::CONFLICT, "console_unavailable")
            }
            ConsoleError::Open { .. } => (StatusCode::BAD_GATEWAY, "console_unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Attaches to a VM's serial console or VNC display over a WebSocket.
#[utoipa::path(
    get,
    path = "/api/v1/vms/{vm}/console",
    params(("vm" = String, Path, description = "VM id or name"), ConsoleQuery),
    responses(
        (status = 101, description = "WebSocket with the console's bytes as binary frames"),
        (status = 404, description = "No such VM", body = keel_api_types::ErrorBody),
        (status = 409, description = "The VM is not running", body = keel_api_types::ErrorBody),
    ),
    tag = "vms"
)]
pub async fn vm_console(
    State(state): State<AppState>,
    Path(vm): Path<String>,
    Query(query): Query<ConsoleQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let vm = state.consoles.running_vm(&vm)?;
    let kind = query.kind.unwrap_or_default();
    let pipe = state.consoles.open(&vm, kind).await?;
    tracing::info!(vm = %vm.name, ?kind, "console attached");
    Ok(ws
        .protocols([CONSOLE_PROTOCOL])
        .on_upgrade(move |socket| bridge(socket, pipe)))
}

async fn bridge(socket: WebSocket, pipe: ConsolePipe) {
    let (mut sink, mut stream) = socket.split();
    let ConsolePipe { to_vm, mut from_vm } = pipe;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if to_vm.send(b.to_vec()).await.is_err() { break; }
                }
                Some(Ok(Message::Text(t))) => {
                    if to_vm.send(t.as_bytes().to_vec()).await.is_err() { break; }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
            data = from_vm.recv() => match data {
                Some(Ok(bytes)) => {
                    if sink.send(Message::Binary(bytes.into())).await.is_err() { break; }
                }
                Some(Err(reason)) => {
                    let _ = sink.send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1011,
                        reason: reason.to_string().chars().take(120).collect::<String>().into(),
                    }))).await;
                    break;
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            },
        }
    }
}
