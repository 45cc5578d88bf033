//! The host-RPC protocol between nodes: what one node may ask of another's host over the
//! peer port (mTLS). Three kinds of call, each a JSON header the peer transport carries:
//!
//! * [`HostOp`] — a request with one answer (`Host` RPC): prepare an incoming
//!   migration, report what this host has of a VM;
//! * [`DuplexRequest`] — a two-way byte stream (`Duplex` RPC): a VM console, the libvirt
//!   control connection of a live migration, one of its data streams;
//! * [`BlobRequest`] — a one-way stream of a file (`FetchBlob` RPC): a template, a disk
//!   of a stopped VM being moved.

use serde::{Deserialize, Serialize};

/// The JSON header of a request. The requests are enums of strings, numbers and flags, for
/// which serde_json cannot fail (no maps with non-string keys, no non-finite floats), so
/// the header is infallible and no caller carries an error it can never see.
fn header(request: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(request).unwrap_or_else(|e| unreachable!("a peer request serializes: {e}"))
}

impl HostOp {
    pub fn to_json(&self) -> Vec<u8> {
        header(self)
    }
}

impl DuplexRequest {
    pub fn to_json(&self) -> Vec<u8> {
        header(self)
    }
}

impl BlobRequest {
    pub fn to_json(&self) -> Vec<u8> {
        header(self)
    }
}

/// Requests a node answers for its own host services (the `Host` peer RPC).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostOp {
    /// Get ready to receive `vm_id` from `source`.
    PrepareMigration {
        vm_id: String,
        source: u64,
        live: bool,
        /// Live: the loopback ports the source relays (migration stream, disks); the
        /// target's qemu listens on the same ports of its own loopback.
        #[serde(default)]
        stream_ports: Option<StreamPorts>,
    },
    /// What this host has of `vm_id`.
    VmPresence { vm_id: String },
}

/// The loopback ports of a live migration's two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPorts {
    /// qemu's migration stream (memory, device state).
    pub migration: u16,
    /// The destination's NBD server (the disks being copied).
    pub disks: u16,
}

impl StreamPorts {
    pub fn contains(&self, port: u16) -> bool {
        port == self.migration || port == self.disks
    }
}

/// The target's answer to `PrepareMigration`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedMigration {
    pub dest_xml: String,
    pub migrate_uri: String,
    /// Where the target's qemu listens (live): loopback.
    #[serde(default)]
    pub listen_address: Option<String>,
    #[serde(default)]
    pub disks_port: Option<u16>,
    pub disks: Vec<String>,
}

/// The target's answer to `VmPresence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmPresence {
    pub running: bool,
    pub defined: bool,
    pub disks_present: bool,
}

/// Which console of a VM: its serial port or its screen (VNC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleKind {
    #[default]
    Serial,
    Vnc,
}

/// The header of a duplex stream between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "duplex", rename_all = "snake_case")]
pub enum DuplexRequest {
    Console {
        vm_id: String,
        kind: ConsoleKind,
    },
    /// A control connection to this host's libvirtd (live migration from another host).
    Libvirt {},
    /// One of the streams of a live migration to this host that it prepared: a
    /// connection to `port` on its loopback, where qemu listens.
    MigrationStream {
        vm_id: String,
        port: u16,
    },
}

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
pub fn is_vm_disk_file(file: &str) -> bool {
    file == "root.qcow2"
        || file
            .strip_prefix("data-")
            .and_then(|rest| rest.strip_suffix(".qcow2"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
