//! VM consoles — the serial console and the VNC display — as byte pipes that any node can
//! hand to a WebSocket.
//!
//! ```text
//!  client ─WS─► any node ──(VM's host is this node)──► libvirt console stream / VNC socket
//!                  │
//!                  └──(another node)──► peer port, Duplex RPC (mTLS) ──► that node ─► same
//! ```
//!
//! The serial console comes from libvirt (`virDomainOpenConsole`, taking the console over
//! from any earlier client); VNC is qemu's VNC server, which listens on the host's
//! loopback only, so the only way in from outside is this authenticated relay.

use std::sync::Arc;

use keel_cluster::model::compute::{find_vm, RunState, Vm};
use keel_cluster::{error_chain, ClusterDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use keel_adapters::hypervisor::Hypervisor;

pub use crate::peer::protocol::ConsoleKind;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("VM {vm:?} does not exist")]
    UnknownVm { vm: String },
    #[error("VM {vm} is not running (it is {state}): start it first")]
    NotRunning { vm: String, state: String },
    #[error("this node runs no VMs (it is a witness)")]
    NoHypervisor,
    #[error("VM {vm} has no VNC display")]
    NoVnc { vm: String },
    #[error("cannot open the console of VM {vm}: {detail}")]
    Open { vm: String, detail: String },
}

/// Why an open console stopped carrying bytes (its text is what the client is told).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleBreak {
    /// The node that runs the VM ended the relayed console; its message says why.
    #[error("{}", .0.message())]
    Remote(tonic::Status),
    /// Reading the VM's console on this node failed.
    #[error(transparent)]
    Read(std::io::Error),
}

/// Bytes to and from a console.
pub struct ConsolePipe {
    pub to_vm: mpsc::Sender<Vec<u8>>,
    /// Ends (`None`) when the console closes; an `Err` says why it broke.
    pub from_vm: mpsc::Receiver<Result<Vec<u8>, ConsoleBreak>>,
}

/// Opens consoles of VMs on this node or, through the peer port, on others.
pub struct Consoles {
    pub db: ClusterDb,
    pub hv: Option<Arc<dyn Hypervisor>>,
}

impl Consoles {
    /// Looks a VM up and checks that it has a console to open.
    pub fn running_vm(&self, vm: &str) -> Result<Vm, ConsoleError> {
        let found = self
            .db
            .reader()
            .read(|c| find_vm(c, vm))
            .map_err(|e| ConsoleError::Open {
                vm: vm.into(),
                detail: error_chain(&e),
            })?
            .ok_or_else(|| ConsoleError::UnknownVm { vm: vm.into() })?;
        let state = found
            .observed
            .as_ref()
            .filter(|o| Some(o.host) == found.host)
            .map(|o| o.state);
        if state != Some(RunState::Running) && state != Some(RunState::Paused) {
            return Err(ConsoleError::NotRunning {
                vm: found.name.clone(),
                state: state.map_or("not placed yet".into(), |s| s.to_string()),
            });
        }
        Ok(found)
    }

    /// Opens a console of `vm` wherever it runs.
    pub async fn open(&self, vm: &Vm, kind: ConsoleKind) -> Result<ConsolePipe, ConsoleError> {
        let host = vm.host.ok_or_else(|| ConsoleError::NotRunning {
            vm: vm.name.clone(),
            state: "not placed yet".into(),
        })?;
        if Some(host) == self.db.node_id() {
            return self.open_local(&vm.id, kind).await;
        }
        let header = crate::peer::protocol::DuplexRequest::Console {
            vm_id: vm.id.clone(),
            kind,
        }
        .to_json();
        let (to_vm, outbound) = mpsc::channel(16);
        let mut remote =
            self.db
                .duplex(host, header, outbound)
                .await
                .map_err(|e| ConsoleError::Open {
                    vm: vm.name.clone(),
                    detail: error_chain(&e),
                })?;
        let (from_tx, from_vm) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                match remote.message().await {
                    Ok(Some(chunk)) => {
                        if from_tx.send(Ok(chunk.data)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = from_tx.send(Err(ConsoleBreak::Remote(status))).await;
                        return;
                    }
                }
            }
        });
        Ok(ConsolePipe { to_vm, from_vm })
    }

    /// Opens a console of a VM running on this node.
    pub async fn open_local(
        &self,
        vm_id: &str,
        kind: ConsoleKind,
    ) -> Result<ConsolePipe, ConsoleError> {
        let hv = self.hv.clone().ok_or(ConsoleError::NoHypervisor)?;
        let uuid = Uuid::parse_str(vm_id).map_err(|e| ConsoleError::Open {
            vm: vm_id.into(),
            detail: e.to_string(),
        })?;
        let open_err = |detail: String| ConsoleError::Open {
            vm: vm_id.into(),
            detail,
        };
        match kind {
            ConsoleKind::Serial => {
                let hv2 = hv.clone();
                let stream = tokio::task::spawn_blocking(move || hv2.open_console(uuid))
                    .await
                    .map_err(|e| open_err(e.to_string()))?
                    .map_err(|e| open_err(error_chain(&e)))?;
                let stream: Arc<dyn keel_adapters::hypervisor::ConsoleStream> = Arc::from(stream);
                let (to_vm, mut to_rx) = mpsc::channel::<Vec<u8>>(16);
                let (from_tx, from_vm) = mpsc::channel(16);
                let reader = stream.clone();
                std::thread::Builder::new()
                    .name("keel-console".into())
                    .spawn(move || {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match reader.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if from_tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    let _ = from_tx.blocking_send(Err(ConsoleBreak::Read(e)));
                                    return;
                                }
                            }
                        }
                    })
                    .map_err(|e| open_err(e.to_string()))?;
                tokio::spawn(async move {
                    while let Some(data) = to_rx.recv().await {
                        let writer = stream.clone();
                        let ok = tokio::task::spawn_blocking(move || writer.write_all(&data))
                            .await
                            .is_ok_and(|r| r.is_ok());
                        if !ok {
                            break;
                        }
                    }
                    // The client went away: release the console (this also ends the reader).
                    stream.close();
                });
                Ok(ConsolePipe { to_vm, from_vm })
            }
            ConsoleKind::Vnc => {
                let hv2 = hv.clone();
                let xml = tokio::task::spawn_blocking(move || hv2.xml(uuid))
                    .await
                    .map_err(|e| open_err(e.to_string()))?
                    .map_err(|e| open_err(error_chain(&e)))?;
                let port =
                    vnc_port(&xml).ok_or_else(|| ConsoleError::NoVnc { vm: vm_id.into() })?;
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| open_err(format!("VNC server on port {port}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let (rd, wr) = tcp.into_split();
                let (to_vm, to_rx) = mpsc::channel::<Vec<u8>>(16);
                let (from_tx, from_vm) = mpsc::channel(16);
                relay(rd, wr, to_rx, from_tx, ConsoleBreak::Read);
                Ok(ConsolePipe { to_vm, from_vm })
            }
        }
    }
}

/// Pumps a byte stream both ways through channels: what `rd` yields goes to `out` (a read
/// error ends it as `Err(on_error(e))`), what arrives on `inbound` is written to `wr`.
pub(crate) fn relay<R, W, E>(
    mut rd: R,
    mut wr: W,
    mut inbound: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Result<Vec<u8>, E>>,
    on_error: fn(std::io::Error) -> E,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    E: Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if out.send(Ok(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(on_error(e))).await;
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(data) = inbound.recv().await {
            if wr.write_all(&data).await.is_err() {
                return;
            }
        }
    });
}

/// The TCP port of a running domain's VNC display, from its live XML
/// (`<graphics type='vnc' port='5900' …>`; `-1` until qemu has started).
fn vnc_port(xml: &str) -> Option<u16> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if e.name().as_ref() == b"graphics" => {
                let attr = |name: &[u8]| {
                    e.attributes()
                        .flatten()
                        .find(|a| a.key.as_ref() == name)
                        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
                };
                if attr(b"type").as_deref() == Some("vnc") {
                    return attr(b"port").and_then(|p| p.parse::<u16>().ok());
                }
            }
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::vnc_port;

    #[test]
    fn vnc_port_is_read_from_live_xml() {
        let xml = "<domain><devices><serial type='pty'/><graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics></devices></domain>";
        assert_eq!(vnc_port(xml), Some(5901));
        assert_eq!(
            vnc_port("<domain><devices><graphics type='vnc' port='-1'/></devices></domain>"),
            None
        );
        assert_eq!(vnc_port("<domain/>"), None);
    }
}
