//! Moving templates between hosts over the peer port (mTLS, the same channel raft uses).
//!
//! A host that must run a VM whose template it lacks fetches the template from a host that
//! holds a verified copy (the template's `replicas`), checks the SHA-256 recorded in raft,
//! and then records itself as a replica. One fetch per template at a time: VMs that need
//! the same template wait for the first fetch instead of downloading it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_cluster::db::HostServices;
use keel_cluster::model::compute::{ComputeCommand, Template};
use keel_cluster::model::{self, Command};
use keel_cluster::transport::{BlobReader, DuplexInbound, DuplexOutbound};
use keel_cluster::{error_chain, ClusterDb};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tonic::Status;

use super::images::{ImageStore, Volumes};
use super::reconciler::TemplateSource;

/// What a member may ask to stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "blob", rename_all = "snake_case")]
pub enum BlobRequest {
    Template {
        id: String,
    },
    /// A disk file of a stopped VM on this host (cold migration).
    VmDisk {
        vm_id: String,
        file: String,
    },
}

/// Whether `file` names a VM disk file (never a path: the name comes from another node).
fn is_vm_disk_file(file: &str) -> bool {
    file == "root.qcow2"
        || file
            .strip_prefix("data-")
            .and_then(|rest| rest.strip_suffix(".qcow2"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Serves this node's host services on the peer port.
pub struct NodeHostServices {
    pub db: ClusterDb,
    pub images: Arc<ImageStore>,
    pub consoles: Arc<super::console::Consoles>,
    /// `None` on a witness.
    pub compute: Option<Arc<super::reconciler::ComputeHost>>,
}

#[async_trait::async_trait]
impl HostServices for NodeHostServices {
    async fn host_op(&self, json: &[u8]) -> Result<Vec<u8>, Status> {
        let compute = self
            .compute
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this node runs no VMs (a witness)"))?;
        super::migration::handle_host_op(compute, json)
            .await
            .map_err(Status::failed_precondition)
    }

    async fn open_duplex(
        &self,
        header: &[u8],
        mut inbound: DuplexInbound,
    ) -> Result<DuplexOutbound, Status> {
        let request: super::console::DuplexRequest = serde_json::from_slice(header)
            .map_err(|e| Status::invalid_argument(format!("malformed duplex header: {e}")))?;
        match request {
            super::console::DuplexRequest::Libvirt {} => {
                let compute = self
                    .compute
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this node runs no VMs"))?;
                super::migration::open_libvirt_socket(&compute.libvirt_socket, inbound)
                    .await
                    .map_err(Status::unavailable)
            }
            super::console::DuplexRequest::MigrationStream { vm_id, port } => {
                let compute = self
                    .compute
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this node runs no VMs"))?;
                super::migration::open_migration_stream(compute, &vm_id, port, inbound)
                    .await
                    .map_err(Status::failed_precondition)
            }
            super::console::DuplexRequest::Console { vm_id, kind } => {
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
                        let item = item.map_err(Status::unavailable);
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

/// Fetches templates from the members that hold them.
pub struct PeerTemplateSource {
    pub db: ClusterDb,
    pub images: Arc<ImageStore>,
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl PeerTemplateSource {
    pub fn new(db: ClusterDb, images: Arc<ImageStore>) -> Self {
        Self {
            db,
            images,
            in_flight: Mutex::default(),
        }
    }

    async fn fetch_from(&self, template: &Template, source: u64) -> Result<(), String> {
        let json = serde_json::to_vec(&BlobRequest::Template {
            id: template.id.clone(),
        })
        .map_err(|e| e.to_string())?;
        let mut stream = self
            .db
            .fetch_blob(source, json)
            .await
            .map_err(|e| error_chain(&e))?;
        let part = self.images.incoming_path().map_err(|e| error_chain(&e))?;
        let result = async {
            let mut file = tokio::fs::File::create(&part)
                .await
                .map_err(|e| format!("create {}: {e}", part.display()))?;
            let mut received = 0u64;
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|e| format!("node {source} stopped sending: {}", e.message()))?
            {
                received += chunk.data.len() as u64;
                if received > template.size_bytes {
                    return Err(format!(
                        "node {source} sent more than the template's {} bytes",
                        template.size_bytes
                    ));
                }
                file.write_all(&chunk.data)
                    .await
                    .map_err(|e| format!("write {}: {e}", part.display()))?;
            }
            file.sync_all()
                .await
                .map_err(|e| format!("sync {}: {e}", part.display()))?;
            let images = self.images.clone();
            let (part2, t) = (part.clone(), template.clone());
            tokio::task::spawn_blocking(move || {
                images.adopt_fetched(&part2, &t.id, t.format, &t.sha256)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| error_chain(&e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        result
    }
}

#[async_trait::async_trait]
impl TemplateSource for PeerTemplateSource {
    async fn fetch(&self, template: &Template) -> Result<(), String> {
        let lock = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(template.id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let me = self.db.node_id().ok_or("this node is not a member")?;
        if !self.images.has_template(&template.id, template.format) {
            let sources: Vec<u64> = template
                .replicas
                .iter()
                .copied()
                .filter(|r| *r != me)
                .collect();
            if sources.is_empty() {
                return Err("no other host holds a copy".into());
            }
            let mut errors = Vec::new();
            let started = std::time::Instant::now();
            let mut fetched = false;
            for source in sources {
                match self.fetch_from(template, source).await {
                    Ok(()) => {
                        tracing::info!(template = %template.name, from = source, bytes = template.size_bytes,
                            ms = started.elapsed().as_millis() as u64, "compute: template fetched");
                        fetched = true;
                        break;
                    }
                    Err(e) => errors.push(format!("from node {source}: {e}")),
                }
            }
            if !fetched {
                return Err(errors.join("; "));
            }
        }
        if !template.replicas.contains(&me) {
            self.db
                .write(Command::Compute {
                    command: ComputeCommand::AddTemplateReplica {
                        template_id: template.id.clone(),
                        host_id: me,
                    },
                })
                .await
                .map_err(|e| error_chain(&e))?;
        }
        Ok(())
    }
}
