//! The host-RPC protocol between nodes ([`protocol`]) and its inbound router
//! ([`NodeHostServices`]): the peer transport hands every host call it accepted here, and
//! this module sends it to the part of the node that answers it (migration, consoles,
//! the image store).

pub mod protocol;

use std::sync::Arc;

use keel_cluster::db::HostServices;
use keel_cluster::model;
use keel_cluster::model::compute::Template;
use keel_cluster::transport::{BlobReader, DuplexInbound, DuplexOutbound};
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

#[async_trait::async_trait]
impl HostServices for NodeHostServices {
    async fn host_op(&self, json: &[u8]) -> Result<Vec<u8>, Status> {
        let compute = self
            .compute
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this node runs no VMs (a witness)"))?;
        handle_host_op(compute, json).await
    }

    async fn open_duplex(
        &self,
        header: &[u8],
        mut inbound: DuplexInbound,
    ) -> Result<DuplexOutbound, Status> {
        let request: DuplexRequest = serde_json::from_slice(header)
            .map_err(|e| Status::invalid_argument(format!("malformed duplex header: {e}")))?;
        match request {
            DuplexRequest::Libvirt {} => {
                let compute = self
                    .compute
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this node runs no VMs"))?;
                migration::open_libvirt_socket(&compute.libvirt_socket, inbound)
                    .await
                    .map_err(|e| Status::unavailable(error_chain(&e)))
            }
            DuplexRequest::MigrationStream { vm_id, port } => {
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

    async fn open_blob(&self, json: &[u8]) -> Result<BlobReader, Status> {
        let request: BlobRequest = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("malformed blob request: {e}")))?;
        match request {
            BlobRequest::Template { id } => {
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
async fn handle_host_op(host: &Arc<ComputeHost>, json: &[u8]) -> Result<Vec<u8>, Status> {
    let op: HostOp = serde_json::from_slice(json)
        .map_err(|e| Status::failed_precondition(format!("malformed host request: {e}")))?;
    let failed = |e: migration::MigrationError| Status::failed_precondition(error_chain(&e));
    let reply = match op {
        HostOp::PrepareMigration {
            vm_id,
            source,
            live,
            stream_ports,
        } => serde_json::to_vec(
            &migration::prepare(host, &vm_id, source, live, stream_ports)
                .await
                .map_err(failed)?,
        ),
        HostOp::VmPresence { vm_id } => {
            serde_json::to_vec(&migration::vm_presence(host, &vm_id).await.map_err(failed)?)
        }
    };
    reply.map_err(|e| Status::internal(format!("encoding the reply: {e}")))
}
