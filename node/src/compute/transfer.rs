//! Moving templates between hosts over the peer port (mTLS, the same channel raft uses).
//!
//! A host that must run a VM whose template it lacks fetches the template from a host that
//! holds a verified copy (the template's `replicas`), checks the SHA-256 recorded in raft,
//! and then records itself as a replica. One fetch per template at a time: VMs that need
//! the same template wait for the first fetch instead of downloading it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_cluster::model::compute::{ComputeCommand, Template};
use keel_cluster::model::Command;
use keel_cluster::{error_chain, ClusterDb};
use tokio::io::AsyncWriteExt;

use super::host::TemplateSource;
use super::images::{ImageStore, Volumes};
use crate::peer::protocol::BlobRequest;

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
