//! Node-local state: who this node is in its cluster, and its TLS identity. Written
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash leaves either
//! the old or the new file, never a torn one. Private keys are created 0600.
//!
//! Files under the data directory:
//! * `node.json` — [`LocalState`]; present once the node is a member.
//! * `tls/node.key`, `tls/node.pem` (leaf + CA), `tls/ca.pem`.
//! * `pending-init.json`, `pending-join.json` — an init or join in progress, so that a
//!   crash half-way resumes with the same keys instead of leaving a half-made member.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::tls::NodeIdentity;
use crate::types::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged; move it away only if you know this node never joined a cluster")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub node_id: NodeId,
    pub cluster_id: String,
}

pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), LocalError> {
    let err = |source| LocalError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err)?;
        file.write_all(data).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, LocalError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LocalError::Parse {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LocalError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), LocalError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| LocalError::Parse {
        path: path.to_path_buf(),
        source: e,
    })?;
    write_atomic(path, &json, mode)
}

/// The node's files under its data directory.
#[derive(Debug, Clone)]
pub struct LocalFiles {
    dir: PathBuf,
}

impl LocalFiles {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn load_state(&self) -> Result<Option<LocalState>, LocalError> {
        read_json(&self.path("node.json"))
    }

    pub fn save_state(&self, state: &LocalState) -> Result<(), LocalError> {
        write_json(&self.path("node.json"), state, 0o644)
    }

    pub fn load_identity(&self) -> Result<Option<NodeIdentity>, LocalError> {
        let read = |name: &str| -> Result<Option<String>, LocalError> {
            let path = self.path(name);
            match fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(LocalError::Read { path, source }),
            }
        };
        match (
            read("tls/node.pem")?,
            read("tls/node.key")?,
            read("tls/ca.pem")?,
        ) {
            (Some(cert_chain_pem), Some(key_pem), Some(ca_pem)) => Ok(Some(NodeIdentity {
                cert_chain_pem,
                key_pem,
                ca_pem,
            })),
            _ => Ok(None),
        }
    }

    pub fn save_identity(&self, id: &NodeIdentity) -> Result<(), LocalError> {
        write_atomic(&self.path("tls/node.key"), id.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.path("tls/ca.pem"), id.ca_pem.as_bytes(), 0o644)?;
        write_atomic(
            &self.path("tls/node.pem"),
            id.cert_chain_pem.as_bytes(),
            0o644,
        )
    }

    pub fn load_pending<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, LocalError> {
        read_json(&self.path(name))
    }

    /// Pending files hold keys and the one-time admin token: root-only.
    pub fn save_pending<T: Serialize>(&self, name: &str, value: &T) -> Result<(), LocalError> {
        write_json(&self.path(name), value, 0o600)
    }

    pub fn clear_pending(&self, name: &str) -> Result<(), LocalError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LocalError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_keys_are_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = LocalFiles::new(dir.path());
        assert_eq!(files.load_state().expect("load"), None);
        let state = LocalState {
            node_id: 3,
            cluster_id: "c".into(),
        };
        files.save_state(&state).expect("save");
        assert_eq!(files.load_state().expect("load"), Some(state));
        files
            .save_identity(&NodeIdentity {
                cert_chain_pem: "c".into(),
                key_pem: "k".into(),
                ca_pem: "a".into(),
            })
            .expect("id");
        let mode = fs::metadata(dir.path().join("tls/node.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(files.load_identity().expect("load").is_some());
    }

    #[test]
    fn damaged_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("node.json"), b"{garbage").expect("write");
        let err = LocalFiles::new(dir.path()).load_state().unwrap_err();
        assert!(matches!(err, LocalError::Parse { .. }));
        assert_eq!(
            fs::read(dir.path().join("node.json")).expect("read"),
            b"{garbage"
        );
    }
}
