//! Moving templates between hosts over the peer port (mTLS, the same channel raft uses).
//!
//! A host that must run a VM whose template it lacks fetches the template from a host that
//! holds a verified copy (the template's `replicas`), checks the SHA-256 recorded in raft,
//! and then records itself as a replica. One fetch per template at a time: VMs that need
//! the same template wait for the first fetch instead of downloading it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_base::FileError;
use keel_cluster::model::compute::{ComputeCommand, Template};
use keel_cluster::model::Command;
use keel_cluster::{error_chain, ClusterDb, ClusterError};
use tokio::io::AsyncWriteExt;

use super::host::TemplateSource;
use super::images::{ImageError, ImageStore, Volumes};
use crate::peer::protocol::BlobRequest;

/// Why a template could not be fetched to this host.
#[derive(Debug, thiserror::Error)]
pub enum TemplateFetchError {
    #[error("this node is not a member of a cluster")]
    NotMember,
    #[error("no other host holds a copy of template {template}")]
    NoReplica { template: String },
    /// Every replica was tried; each attempt's error chain, by node.
    #[error("no host could send template {template}: {}", failed_attempts(.attempts))]
    AllReplicasFailed {
        template: String,
        attempts: Vec<(u64, String)>,
    },
    #[error("asking node {node} for the template")]
    Request {
        node: u64,
        #[source]
        source: ClusterError,
    },
    #[error("node {node} stopped sending")]
    Stream {
        node: u64,
        #[source]
        source: tonic::Status,
    },
    #[error("node {node} sent more than the template's {limit} bytes")]
    Oversized { node: u64, limit: u64 },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("storing the fetched template")]
    Store(#[source] ImageError),
    #[error("the template store's task stopped")]
    Task(#[source] tokio::task::JoinError),
    #[error("recording this host as a replica of template {template}")]
    Record {
        template: String,
        #[source]
        source: ClusterError,
    },
}

fn failed_attempts(attempts: &[(u64, String)]) -> String {
    attempts
        .iter()
        .map(|(node, e)| format!("from node {node}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
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

    async fn fetch_from(&self, template: &Template, node: u64) -> Result<(), TemplateFetchError> {
        let request = BlobRequest::Template {
            id: template.id.clone(),
        };
        let mut stream = self
            .db
            .fetch_blob(node, request.to_json())
            .await
            .map_err(|source| TemplateFetchError::Request { node, source })?;
        let part = self
            .images
            .incoming_path()
            .map_err(TemplateFetchError::Store)?;
        let result = async {
            let mut file = tokio::fs::File::create(&part)
                .await
                .map_err(FileError::on("create", &part))?;
            let mut received = 0u64;
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|source| TemplateFetchError::Stream { node, source })?
            {
                received += chunk.data.len() as u64;
                if received > template.size_bytes {
                    return Err(TemplateFetchError::Oversized {
                        node,
                        limit: template.size_bytes,
                    });
                }
                file.write_all(&chunk.data)
                    .await
                    .map_err(FileError::on("write", &part))?;
            }
            file.sync_all()
                .await
                .map_err(FileError::on("sync", &part))?;
            let images = self.images.clone();
            let (part2, t) = (part.clone(), template.clone());
            tokio::task::spawn_blocking(move || {
                images.adopt_fetched(&part2, &t.id, t.format, &t.sha256)
            })
            .await
            .map_err(TemplateFetchError::Task)?
            .map_err(TemplateFetchError::Store)?;
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
    async fn fetch(&self, template: &Template) -> Result<(), TemplateFetchError> {
        let lock = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(template.id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let me = self.db.node_id().ok_or(TemplateFetchError::NotMember)?;
        if !self.images.has_template(&template.id, template.format) {
            let sources: Vec<u64> = template
                .replicas
                .iter()
                .copied()
                .filter(|r| *r != me)
                .collect();
            if sources.is_empty() {
                return Err(TemplateFetchError::NoReplica {
                    template: template.name.clone(),
                });
            }
            let mut attempts = Vec::new();
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
                    Err(e) => attempts.push((source, error_chain(&e))),
                }
            }
            if !fetched {
                return Err(TemplateFetchError::AllReplicasFailed {
                    template: template.name.clone(),
                    attempts,
                });
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
                .map_err(|source| TemplateFetchError::Record {
                    template: template.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}
