//! Moving a VM between hosts. The source host's VM actor drives it; the target prepares
//! on request over the peer port; raft records the start (`MigrateVm`, written by a user
//! or by the drain duty) and the end (`FinishMigration`, written by the source).
//!
//! ```text
//!  live (running VM):
//!    source actor ──PrepareMigration──► target: fetch template, create an empty overlay
//!         │                             on it, data disks and seed, render its XML
//!         │ ◄──────── dest XML, tcp://target:port, disks to copy
//!         ├─ libvirt control connection to the target's libvirtd, tunnelled through
//!         │  the peer port (mTLS) by a per-migration Unix socket on the source
//!         ├─ virDomainMigrate3(LIVE | PERSIST_DEST | UNDEFINE_SOURCE | NON_SHARED_INC):
//!         │  memory and the overlay stream qemu → qemu while the guest keeps running,
//!         │  tunnelled through the peer port (mTLS) too:
//!         │    source qemu → 127.0.0.1:P (source node) ═ mTLS ═ target node → 127.0.0.1:P
//!         │    (target qemu, listening on loopback only); the same for the NBD port of
//!         │    the disks. Guest memory never crosses the network in the clear.
//!         └─ remove the local disks → FinishMigration { error: None } → placement = target
//!  cold (stopped VM):
//!    source actor ──PrepareMigration──► target pulls the VM's disk files (FetchBlob)
//!         └─ undefine here, remove the local disks → FinishMigration → target defines it
//! ```
//!
//! Crash safety: the migration stays recorded in raft until `FinishMigration` commits, and
//! the source's actor resumes it after a restart by looking at both hosts: domain still
//! here → (re)run the migration; gone here but running (or, cold, its disks present) on
//! the target → it finished, record that. Until then the target's reconciler leaves the
//! incoming domain alone and the source's reconciler does nothing else with the VM, so
//! there is never a second copy started.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_base::FileError;
use keel_cluster::db::now_ms;
use keel_cluster::model::compute::{find_template, ComputeCommand, Template, Vm, VmMigration};
use keel_cluster::model::{self, Command};
use keel_cluster::store::StoreError;
use keel_cluster::{error_chain, ClusterDb, ClusterError};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::host::{
    build_domain, has_root_disk, BridgeWaitError, ComputeHost, DomainBuildError, HostFacts,
    BRIDGE_WAIT,
};
use super::images::ImageError;
use super::transfer::TemplateFetchError;
use crate::peer::protocol::{
    BlobRequest, DuplexRequest, HostOp, PreparedMigration, StreamPorts, VmPresence,
};
use keel_adapters::hypervisor::{DomainState, HypervisorError, MigrationRequest};

/// Why a step of a migration failed, on either host. The source records the chain in
/// raft when it gives up (`FinishMigration { error }`); the target answers it to the
/// source's host request.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("a live migration needs the source's stream ports")]
    NoStreamPorts,
    #[error("this node is not a member of a cluster")]
    NotMember,
    #[error("VM {vm_id} is unknown here")]
    UnknownVm { vm_id: String },
    #[error("VM {vm} is not moving to this host")]
    NotMovingHere { vm: String },
    #[error("VM {vm} is not on node {caller}, which asked to move it")]
    NotTheSource { vm: String, caller: u64 },
    #[error("VM id {vm_id} is not a UUID")]
    BadId {
        vm_id: String,
        #[source]
        source: uuid::Error,
    },
    #[error("template {template} of the VM no longer exists")]
    TemplateGone { template: String },
    #[error("the VM is on neither host any more")]
    Lost,
    #[error("no live migration of VM {vm_id} was prepared here with stream port {port}")]
    StreamNotPrepared { vm_id: String, port: u16 },
    #[error("reading the cluster state")]
    State(#[source] StoreError),
    #[error("waiting for the VM's networks")]
    Bridges(#[source] BridgeWaitError),
    #[error("fetching the VM's template")]
    Template(#[source] TemplateFetchError),
    #[error("building the VM's domain here")]
    Domain(#[source] DomainBuildError),
    #[error("the VM's disks on this host")]
    Disks(#[source] ImageError),
    #[error("the hypervisor could not {op}")]
    Hypervisor {
        op: &'static str,
        #[source]
        source: HypervisorError,
    },
    #[error("a blocking task stopped")]
    Task(#[source] tokio::task::JoinError),
    #[error("{op} on node {node}")]
    Peer {
        node: u64,
        op: &'static str,
        #[source]
        source: ClusterError,
    },
    #[error("malformed reply from node {node}")]
    Reply {
        node: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("node {node} stopped sending")]
    Stream {
        node: u64,
        #[source]
        source: tonic::Status,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{op} {address}")]
    Socket {
        op: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
}

impl MigrationError {
    fn hypervisor(op: &'static str) -> impl FnOnce(HypervisorError) -> Self {
        move |source| Self::Hypervisor { op, source }
    }
}

fn vm_uuid(vm_id: &str) -> Result<Uuid, MigrationError> {
    Uuid::parse_str(vm_id).map_err(|source| MigrationError::BadId {
        vm_id: vm_id.to_string(),
        source,
    })
}

/// Looks a VM's domain up on this host (off the async threads: libvirt blocks).
async fn lookup_domain(
    host: &ComputeHost,
    uuid: Uuid,
) -> Result<Option<keel_adapters::hypervisor::DomainInfo>, MigrationError> {
    let hv = host.hv.clone();
    tokio::task::spawn_blocking(move || hv.lookup(uuid))
        .await
        .map_err(MigrationError::Task)?
        .map_err(MigrationError::hypervisor("look the domain up"))
}

fn read_template(host: &ComputeHost, id: &str) -> Result<Template, MigrationError> {
    host.db
        .reader()
        .read(|c| find_template(c, id))
        .map_err(MigrationError::State)?
        .ok_or_else(|| MigrationError::TemplateGone {
            template: id.to_string(),
        })
}

/// Where a live migration's streams meet qemu on either host: loopback only, so the
/// only way between the hosts is the nodes' mTLS relay.
const STREAM_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::LOCALHOST;

/// How long a target may take to prepare (a template fetch, a cold disk copy).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads VM `vm_id` and checks that raft has it moving from `source` to this host: the
/// only node that may ask this host about receiving it.
fn incoming_from(host: &ComputeHost, source: u64, vm_id: &str) -> Result<Vm, MigrationError> {
    let me = host.db.node_id().ok_or(MigrationError::NotMember)?;
    let vm = host
        .db
        .reader()
        .read(|c| model::get::<Vm>(c, vm_id))
        .map_err(MigrationError::State)?
        .ok_or_else(|| MigrationError::UnknownVm {
            vm_id: vm_id.to_string(),
        })?;
    if vm.migration.as_ref().map(|m| m.target) != Some(me) {
        return Err(MigrationError::NotMovingHere { vm: vm.name });
    }
    if vm.host != Some(source) {
        return Err(MigrationError::NotTheSource {
            vm: vm.name,
            caller: source,
        });
    }
    Ok(vm)
}

/// What this host has of `vm_id` (the `VmPresence` host request from `source`).
pub async fn vm_presence(
    host: &ComputeHost,
    source: u64,
    vm_id: &str,
) -> Result<VmPresence, MigrationError> {
    incoming_from(host, source, vm_id)?;
    let dom = lookup_domain(host, vm_uuid(vm_id)?).await?;
    let disks_present = host.volumes.vm_paths(vm_id, 0, None).root.exists();
    Ok(VmPresence {
        running: dom
            .as_ref()
            .is_some_and(|d| d.state == DomainState::Running),
        defined: dom.is_some(),
        disks_present,
    })
}

/// Target side: everything the VM needs here before the source sends it (the
/// `PrepareMigration` host request).
pub async fn prepare(
    host: &Arc<ComputeHost>,
    vm_id: &str,
    source: u64,
    live: bool,
    stream_ports: Option<StreamPorts>,
) -> Result<PreparedMigration, MigrationError> {
    let ports = match (live, stream_ports) {
        (true, Some(p)) => Some(p),
        (true, None) => return Err(MigrationError::NoStreamPorts),
        (false, _) => None,
    };
    let me = host.db.node_id().ok_or(MigrationError::NotMember)?;
    let vm = incoming_from(host, source, vm_id)?;
    if live {
        // The incoming domain plugs its taps into the networks' bridges at once.
        let (bridges, vm2) = (host.bridges.clone(), vm.clone());
        tokio::task::spawn_blocking(move || bridges.wait(&vm2.spec.nics, BRIDGE_WAIT))
            .await
            .map_err(MigrationError::Task)?
            .map_err(MigrationError::Bridges)?;
    }
    let template = read_template(host, vm.spec.boot.template())?;
    for id in vm.spec.boot.templates() {
        let t = read_template(host, id)?;
        if !host.volumes.has_template(&t.id, t.format) {
            host.templates
                .fetch(&t)
                .await
                .map_err(MigrationError::Template)?;
        }
    }
    if !live {
        let paths = host
            .volumes
            .vm_paths(&vm.id, vm.spec.data_disks.len(), None);
        let mut files = Vec::new();
        if has_root_disk(&vm, &template) {
            files.push(paths.root.clone());
        }
        files.extend(paths.data.iter().cloned());
        for file in files {
            if !file.exists() {
                pull_disk(&host.db, source, &vm.id, &file).await?;
            }
        }
    }
    if live {
        // Leftovers of an earlier attempt that died half-way (no domain here): start the
        // copy from fresh disks.
        let defined = lookup_domain(host, vm_uuid(&vm.id)?).await?.is_some();
        if !defined {
            host.volumes
                .delete_vm(&vm.id)
                .map_err(MigrationError::Disks)?;
        }
    }
    let facts = HostFacts {
        node_id: me,
        domain_type: host.domain_type,
    };
    let (volumes, vm2, t2) = (host.volumes.clone(), vm.clone(), template.clone());
    let dest_xml =
        tokio::task::spawn_blocking(move || build_domain(volumes.as_ref(), &facts, &vm2, &t2))
            .await
            .map_err(MigrationError::Task)?
            .map_err(MigrationError::Domain)?;
    let mut disks = Vec::new();
    if has_root_disk(&vm, &template) {
        disks.push("vda".to_string());
    }
    disks.extend((0..vm.spec.data_disks.len()).map(|i| format!("vd{}", (b'c' + i as u8) as char)));
    if let Some(p) = ports {
        let mut streams = host
            .incoming_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Forget the ports of migrations that ended since.
        streams.retain(|id, _| moving_here(host, id));
        streams.insert(vm.id.clone(), p);
    }
    Ok(PreparedMigration {
        dest_xml,
        migrate_uri: ports
            .map(|p| format!("tcp://{STREAM_ADDRESS}:{}", p.migration))
            .unwrap_or_default(),
        listen_address: ports.map(|_| STREAM_ADDRESS.to_string()),
        disks_port: ports.map(|p| p.disks),
        disks,
    })
}

/// Copies one of a stopped VM's disk files from `source` (cold migration).
async fn pull_disk(
    db: &ClusterDb,
    source: u64,
    vm_id: &str,
    dest: &Path,
) -> Result<(), MigrationError> {
    // The volume layout names every disk file; a path without one is a bug here.
    let file = dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let request = BlobRequest::VmDisk {
        vm_id: vm_id.into(),
        file,
    };
    let mut stream = db
        .fetch_blob(source, request.to_json())
        .await
        .map_err(|e| MigrationError::Peer {
            node: source,
            op: "fetching a disk",
            source: e,
        })?;
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(FileError::on("create", dir))?;
    }
    let part = dest.with_extension("part");
    let mut out = tokio::fs::File::create(&part)
        .await
        .map_err(FileError::on("create", &part))?;
    while let Some(chunk) = stream.message().await.map_err(|e| MigrationError::Stream {
        node: source,
        source: e,
    })? {
        out.write_all(&chunk.data)
            .await
            .map_err(FileError::on("write", &part))?;
    }
    out.sync_all().await.map_err(FileError::on("sync", &part))?;
    tokio::fs::rename(&part, dest)
        .await
        .map_err(FileError::on("rename into place", dest))?;
    Ok(())
}

/// Source side: carries out (or resumes) the migration recorded for `vm`, then records
/// how it ended.
pub async fn migrate_out(host: &Arc<ComputeHost>, vm: &Vm, m: &VmMigration) {
    let result = run_migration(host, vm, m).await;
    if let Err(e) = &result {
        tracing::warn!(vm = %vm.name, target = m.target, error = %error_chain(e), "compute: migration failed");
    } else {
        tracing::info!(vm = %vm.name, target = m.target, "compute: migration finished");
    }
    let command = Command::Compute {
        command: ComputeCommand::FinishMigration {
            vm_id: vm.id.clone(),
            target: m.target,
            error: result.err().map(|e| error_chain(&e)),
            now_ms: now_ms(),
        },
    };
    if let Err(e) = host.db.write(command).await {
        tracing::warn!(vm = %vm.name, error = %error_chain(&e), "compute: migration result not recorded; will retry");
    }
}

async fn host_call<T: for<'de> Deserialize<'de>>(
    db: &ClusterDb,
    target: u64,
    op: &HostOp,
    timeout: Duration,
) -> Result<T, MigrationError> {
    let what = match op {
        HostOp::PrepareMigration { .. } => "preparing the migration",
        HostOp::VmPresence { .. } => "asking what it has of the VM",
    };
    let reply = db
        .host_call(target, op.to_json(), timeout)
        .await
        .map_err(|source| MigrationError::Peer {
            node: target,
            op: what,
            source,
        })?;
    serde_json::from_slice(&reply).map_err(|source| MigrationError::Reply {
        node: target,
        source,
    })
}

async fn run_migration(
    host: &Arc<ComputeHost>,
    vm: &Vm,
    m: &VmMigration,
) -> Result<(), MigrationError> {
    let uuid = vm_uuid(&vm.id)?;
    let here = lookup_domain(host, uuid).await?;
    if here.is_none() {
        // Resuming after a crash: did it finish?
        let there: VmPresence = host_call(
            &host.db,
            m.target,
            &HostOp::VmPresence {
                vm_id: vm.id.clone(),
            },
            Duration::from_secs(10),
        )
        .await?;
        let done = if m.live {
            there.running
        } else {
            there.disks_present
        };
        if done {
            let _ = host.volumes.delete_vm(&vm.id);
            return Ok(());
        }
        return Err(MigrationError::Lost);
    }
    // Live: the relays of the two streams listen before the target is asked, so their
    // ports are known to be free here; the target listens on the same ports.
    let streams = if m.live {
        Some(StreamRelays::open(&host.db, m.target, &vm.id).await?)
    } else {
        None
    };
    let prepared: PreparedMigration = host_call(
        &host.db,
        m.target,
        &HostOp::PrepareMigration {
            vm_id: vm.id.clone(),
            source: host.db.node_id().unwrap_or_default(),
            live: m.live,
            stream_ports: streams.as_ref().map(|s| s.ports),
        },
        PREPARE_TIMEOUT,
    )
    .await?;
    if m.live {
        let tunnel = LibvirtTunnel::open(&host.db, m.target, &host.run_dir, &vm.id).await?;
        let request = MigrationRequest {
            dest_uri: format!("qemu+unix:///system?socket={}", tunnel.path.display()),
            migrate_uri: prepared.migrate_uri,
            listen_address: prepared.listen_address,
            disks_port: prepared.disks_port,
            dest_xml: prepared.dest_xml,
            copy_storage: true,
            disks: prepared.disks,
        };
        let hv = host.hv.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || hv.migrate(uuid, &request))
            .await
            .map_err(MigrationError::Task)?;
        drop(tunnel);
        drop(streams);
        result.map_err(MigrationError::hypervisor("migrate the VM"))?;
        tracing::info!(vm = %vm.name, ms = started.elapsed().as_millis() as u64, "compute: live migration done");
    } else {
        let hv = host.hv.clone();
        tokio::task::spawn_blocking(move || hv.undefine(uuid))
            .await
            .map_err(MigrationError::Task)?
            .map_err(MigrationError::hypervisor("undefine the VM here"))?;
    }
    host.volumes
        .delete_vm(&vm.id)
        .map_err(MigrationError::Disks)?;
    Ok(())
}

/// A Unix socket on the source whose connections are relayed to the target's libvirtd
/// over the peer port, so a migration needs no libvirt TLS or TCP listener.
struct LibvirtTunnel {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl LibvirtTunnel {
    async fn open(
        db: &ClusterDb,
        target: u64,
        run_dir: &Path,
        vm_id: &str,
    ) -> Result<Self, MigrationError> {
        tokio::fs::create_dir_all(run_dir)
            .await
            .map_err(FileError::on("create", run_dir))?;
        // Unix socket paths are limited to 108 bytes: keep the name short.
        let path = run_dir.join(format!("mig-{}.sock", &vm_id[..8.min(vm_id.len())]));
        let _ = tokio::fs::remove_file(&path).await;
        let listener =
            tokio::net::UnixListener::bind(&path).map_err(FileError::on("listen on", &path))?;
        let task = serve_relay(
            db,
            target,
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            DuplexRequest::Libvirt {},
        );
        Ok(Self { path, task })
    }
}

impl Drop for LibvirtTunnel {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The two loopback listeners on the source whose connections (qemu's migration stream,
/// its NBD client) are relayed to the same ports of the target's loopback over the peer
/// port. They listen while the value lives.
struct StreamRelays {
    ports: StreamPorts,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StreamRelays {
    async fn open(db: &ClusterDb, target: u64, vm_id: &str) -> Result<Self, MigrationError> {
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let socket_error = |source| MigrationError::Socket {
                op: "listen for a migration stream on",
                address: STREAM_ADDRESS.to_string(),
                source,
            };
            let listener = tokio::net::TcpListener::bind((STREAM_ADDRESS, 0))
                .await
                .map_err(socket_error)?;
            let port = listener.local_addr().map_err(socket_error)?.port();
            ports.push(port);
            // qemu's small control writes must not wait behind Nagle.
            let incoming = futures::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    conn.inspect(|c| {
                        let _ = c.set_nodelay(true);
                    })
                },
            );
            tasks.push(serve_relay(
                db,
                target,
                incoming,
                DuplexRequest::MigrationStream {
                    vm_id: vm_id.to_string(),
                    port,
                },
            ));
        }
        Ok(Self {
            ports: StreamPorts {
                migration: ports[0],
                disks: ports[1],
            },
            tasks,
        })
    }
}

impl Drop for StreamRelays {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Relays every connection `incoming` yields to `target` over the peer port, each in a
/// `Duplex` RPC opened with `request`, until the returned task is aborted.
fn serve_relay<S>(
    db: &ClusterDb,
    target: u64,
    incoming: impl futures::Stream<Item = std::io::Result<S>> + Send + 'static,
    request: DuplexRequest,
) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use futures::StreamExt;
    let db = db.clone();
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(Ok(conn)) = incoming.next().await {
            let (db, request) = (db.clone(), request.clone());
            tokio::spawn(async move {
                if let Err(e) = relay(db, target, &request, conn).await {
                    tracing::warn!(?request, error = %error_chain(&e), "compute: relay to node {target} failed");
                }
            });
        }
    })
}

/// Relays one local connection to `target` over the peer port (a `Duplex` RPC opened with
/// `request`), until either side closes.
async fn relay<S>(
    db: ClusterDb,
    target: u64,
    request: &DuplexRequest,
    conn: S,
) -> Result<(), MigrationError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let mut remote = db
        .duplex(target, request.to_json(), rx)
        .await
        .map_err(|source| MigrationError::Peer {
            node: target,
            op: "opening a relayed stream",
            source,
        })?;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Ok(Some(chunk)) = remote.message().await {
        if wr.write_all(&chunk.data).await.is_err() {
            break;
        }
    }
    up.abort();
    Ok(())
}

/// Target side of the tunnel: a connection to this host's own libvirtd socket.
pub async fn open_libvirt_socket(
    socket: &Path,
    inbound: keel_cluster::transport::DuplexInbound,
) -> Result<keel_cluster::transport::DuplexOutbound, MigrationError> {
    let conn = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(FileError::on("connect to libvirtd at", socket))?;
    let (rd, wr) = conn.into_split();
    Ok(relay_local(rd, wr, inbound))
}

/// The target's end of a relayed connection: `inbound` written to `wr`, `rd` read into
/// the returned outbound stream.
fn relay_local(
    rd: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    wr: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
    inbound: keel_cluster::transport::DuplexInbound,
) -> keel_cluster::transport::DuplexOutbound {
    let (tx, rx) = mpsc::channel(16);
    super::console::relay(rd, wr, inbound, tx, |e| {
        tonic::Status::unavailable(e.to_string())
    });
    rx
}

/// Whether raft records VM `vm_id` as moving to this host.
fn moving_here(host: &ComputeHost, vm_id: &str) -> bool {
    let me = host.db.node_id();
    host.db
        .reader()
        .read(|c| model::get::<Vm>(c, vm_id))
        .ok()
        .flatten()
        .and_then(|vm| vm.migration)
        .is_some_and(|m| Some(m.target) == me)
}

/// Target side of a migration stream: a connection to `port` on this host's loopback,
/// where qemu listens for an incoming migration this host prepared for `vm_id`. Any other
/// port is refused: the peer port is no way into arbitrary local services. Who may ask
/// (the VM's host, while raft has it moving here live) the peer router has checked.
pub async fn open_migration_stream(
    host: &ComputeHost,
    vm_id: &str,
    port: u16,
    inbound: keel_cluster::transport::DuplexInbound,
) -> Result<keel_cluster::transport::DuplexOutbound, MigrationError> {
    let prepared = host
        .incoming_streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(vm_id)
        .copied();
    if !prepared.is_some_and(|p| p.contains(port)) {
        return Err(MigrationError::StreamNotPrepared {
            vm_id: vm_id.to_string(),
            port,
        });
    }
    let conn = tokio::net::TcpStream::connect((STREAM_ADDRESS, port))
        .await
        .map_err(|source| MigrationError::Socket {
            op: "connect to the incoming migration on",
            address: format!("{STREAM_ADDRESS}:{port}"),
            source,
        })?;
    let _ = conn.set_nodelay(true);
    tracing::info!(
        vm_id,
        port,
        "compute: incoming migration stream relayed to qemu"
    );
    let (rd, wr) = conn.into_split();
    Ok(relay_local(rd, wr, inbound))
}

/// The Unix socket of the libvirtd a `qemu:///system[?socket=PATH]` URI names.
pub fn libvirt_socket_of(uri: &str) -> PathBuf {
    uri.split_once('?')
        .and_then(|(_, query)| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/run/libvirt/libvirt-sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libvirt_socket_comes_from_the_uri() {
        assert_eq!(
            libvirt_socket_of("qemu:///system"),
            PathBuf::from("/run/libvirt/libvirt-sock")
        );
        assert_eq!(
            libvirt_socket_of("qemu:///system?socket=/x/run/libvirt-sock"),
            PathBuf::from("/x/run/libvirt-sock")
        );
    }
}
