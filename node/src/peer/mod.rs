//! The host-RPC protocol between nodes ([`protocol`]) and its inbound router
//! ([`NodeHostServices`]): the peer transport hands every host call it accepted here, and
//! this module sends it to the part of the node that answers it (migration, consoles,
//! the image store).

pub mod protocol;

use std::sync::Arc;

use keel_cluster::db::HostServices;
use keel_cluster::model;
use keel_cluster::model::compute::Template;
use keel_cluster::model::compute::Vm;
use keel_cluster::peer_auth::PeerDenied;
use keel_cluster::transport::{BlobReader, DuplexInbound, DuplexOutbound};
use keel_cluster::types::NodeId;
use keel_cluster::{error_chain, ClusterDb};
use tonic::Status;

use crate::compute::console::Consoles;
use crate::compute::host::ComputeHost;
use crate::compute::images::{ImageStore, Volumes};
use crate::compute::migration;
use protocol::{is_vm_disk_file, BlobRequest, DuplexRequest, HostOp};

/// Serves this node's host services on the peer port.
pub struct NodeHostServices {
    pub db: ClusterDb,
    pub images: Arc<ImageStore>,
    pub consoles: Arc<Consoles>,
    /// `None` on a witness.
    pub compute: Option<Arc<ComputeHost>>,
}

/// Whether raft has `vm` moving live from `from` to `to`.
fn moving_live(vm: &Vm, from: NodeId, to: Option<NodeId>) -> bool {
    vm.host == Some(from)
        && vm
            .migration
            .as_ref()
            .is_some_and(|m| m.live && Some(m.target) == to)
}

impl NodeHostServices {
    /// Refuses `caller` unless raft holds a VM for which `involved(vm, this node)` is true:
    /// what a member may ask of this host follows from its part in a VM's life.
    fn require_involved(
        &self,
        caller: NodeId,
        involved: impl Fn(&Vm, Option<NodeId>) -> bool,
        what: impl FnOnce() -> String,
    ) -> Result<(), Status> {
        let me = self.db.node_id();
        let vms = self
            .db
            .reader()
            .read(model::list::<Vm>)
            .map_err(|e| Status::internal(error_chain(&e)))?;
        if vms.iter().any(|vm| involved(vm, me)) {
            Ok(())
        } else {
            Err(PeerDenied::NotInvolved {
                caller,
                what: what(),
            }
            .into())
        }
    }

    /// A live migration's libvirt connection comes only from the host of a VM that raft
    /// says is moving here live.
    fn require_live_migration_from(&self, caller: NodeId) -> Result<(), Status> {
        self.require_involved(
            caller,
            |vm, me| moving_live(vm, caller, me),
            || "open a libvirt connection here: no VM is moving live from it to this host".into(),
        )
    }

    /// A live migration's data streams come only from the host of that VM, and only while
    /// raft has it moving here live.
    fn require_live_migration_of(&self, caller: NodeId, vm_id: &str) -> Result<(), Status> {
        self.require_involved(
            caller,
            |vm, me| vm.id == vm_id && moving_live(vm, caller, me),
            || format!("open a migration stream of VM {vm_id}: it is not moving live from it to this host"),
        )
    }

    /// A template goes only to a host that raft says needs it: one that runs, or is
    /// receiving, a VM booting from it.
    fn require_needs_template(&self, caller: NodeId, template_id: &str) -> Result<(), Status> {
        self.require_involved(
            caller,
            |vm, _| {
                let on_caller = vm.host == Some(caller)
                    || vm.migration.as_ref().is_some_and(|m| m.target == caller);
                on_caller && vm.spec.boot.templates().contains(&template_id)
            },
            || format!("fetch template {template_id}: no VM of it uses that template"),
        )
    }

    /// A stopped VM's disk goes only to the host raft says it is moving to, from the host
    /// it is on.
    fn require_cold_migration_to(&self, caller: NodeId, vm_id: &str) -> Result<(), Status> {
        self.require_involved(
            caller,
            |vm, me| {
                vm.id == vm_id
                    && vm.host.is_some()
                    && vm.host == me
                    && vm.migration.as_ref().is_some_and(|m| m.target == caller)
            },
            || format!("fetch the disks of VM {vm_id}: it is not moving from here to it"),
        )
    }
}

#[async_trait::async_trait]
impl HostServices for NodeHostServices {
    async fn host_op(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status> {
        let compute = self
            .compute
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this node runs no VMs (a witness)"))?;
        handle_host_op(compute, caller, json).await
    }

    async fn open_duplex(
        &self,
        caller: NodeId,
        header: &[u8],
        mut inbound: DuplexInbound,
    ) -> Result<DuplexOutbound, Status> {
        let request: DuplexRequest = serde_json::from_slice(header)
            .map_err(|e| Status::invalid_argument(format!("malformed duplex header: {e}")))?;
        match request {
            DuplexRequest::Libvirt {} => {
                self.require_live_migration_from(caller)?;
                let compute = self
                    .compute
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this node runs no VMs"))?;
                migration::open_libvirt_socket(&compute.libvirt_socket, inbound)
                    .await
                    .map_err(|e| Status::unavailable(error_chain(&e)))
            }
            DuplexRequest::MigrationStream { vm_id, port } => {
                self.require_live_migration_of(caller, &vm_id)?;
                let compute = self
                    .compute
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this node runs no VMs"))?;
                migration::open_migration_stream(compute, &vm_id, port, inbound)
                    .await
                    .map_err(|e| Status::failed_precondition(error_chain(&e)))
            }
            DuplexRequest::Console { vm_id, kind } => {
                let pipe = self
                    .consoles
                    .open_local(&vm_id, kind)
                    .await
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                let to_vm = pipe.to_vm;
                tokio::spawn(async move {
                    while let Some(data) = inbound.recv().await {
                        if to_vm.send(data).await.is_err() {
                            return;
                        }
                    }
                });
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                let mut from_vm = pipe.from_vm;
                tokio::spawn(async move {
                    while let Some(item) = from_vm.recv().await {
                        let item = item.map_err(|e| Status::unavailable(e.to_string()));
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(rx)
            }
        }
    }

    async fn open_blob(&self, caller: NodeId, json: &[u8]) -> Result<BlobReader, Status> {
        let request: BlobRequest = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("malformed blob request: {e}")))?;
        match request {
            BlobRequest::Template { id } => {
                self.require_needs_template(caller, &id)?;
                let template = self
                    .db
                    .reader()
                    .read(|c| model::get::<Template>(c, &id))
                    .map_err(|e| Status::internal(error_chain(&e)))?
                    .ok_or_else(|| Status::not_found(format!("template {id} is unknown")))?;
                if !self.images.has_template(&template.id, template.format) {
                    return Err(Status::not_found(format!(
                        "template {} is not stored on this node",
                        template.name
                    )));
                }
                let path = self.images.template_path(&template.id, template.format);
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Status::internal(format!("open {}: {e}", path.display())))?;
                Ok(Box::new(file))
            }
            BlobRequest::VmDisk { vm_id, file } => {
                if uuid::Uuid::parse_str(&vm_id).is_err() || !is_vm_disk_file(&file) {
                    return Err(Status::invalid_argument("not a VM disk"));
                }
                self.require_cold_migration_to(caller, &vm_id)?;
                let path = self.images.root().join("vms").join(&vm_id).join(&file);
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Status::not_found(format!("{}: {e}", path.display())))?;
                Ok(Box::new(file))
            }
        }
    }
}

/// Answers a `Host` peer request: the reply's JSON, or the status the caller sees (the
/// whole error chain as its message).
async fn handle_host_op(
    host: &Arc<ComputeHost>,
    caller: NodeId,
    json: &[u8],
) -> Result<Vec<u8>, Status> {
    let op: HostOp = serde_json::from_slice(json)
        .map_err(|e| Status::failed_precondition(format!("malformed host request: {e}")))?;
    let failed = |e: migration::MigrationError| Status::failed_precondition(error_chain(&e));
    let reply = match op {
        // The source is the caller (its certificate), never what the request says.
        HostOp::PrepareMigration {
            vm_id,
            source: _,
            live,
            stream_ports,
        } => serde_json::to_vec(
            &migration::prepare(host, &vm_id, caller, live, stream_ports)
                .await
                .map_err(failed)?,
        ),
        HostOp::VmPresence { vm_id } => serde_json::to_vec(
            &migration::vm_presence(host, caller, &vm_id)
                .await
                .map_err(failed)?,
        ),
    };
    reply.map_err(|e| Status::internal(format!("encoding the reply: {e}")))
}
