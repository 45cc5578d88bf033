//! The openraft type configuration: what travels through the log and what applying it returns.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use crate::model::NodeId;
use crate::model::{Command, CommandError, Outcome};

/// What every member of the raft group needs to know about another member.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeelNode {
    /// Human name of the server (its hostname unless configured).
    pub name: String,
    /// `host:port` of the mTLS peer (raft) endpoint.
    pub peer_addr: String,
    /// `host:port` of the HTTPS API endpoint.
    pub api_addr: String,
}

impl fmt::Display for KeelNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_addr)
    }
}

/// One entry in the replicated log: a typed command plus the id of the request that
/// proposed it, so that logs and errors can be traced back to an API call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: String,
    pub command: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.request_id, self.command.kind())
    }
}

/// The deterministic result of applying one entry on every replica. A rejected command is
/// still a successfully applied entry: every replica rejects it the same way.
pub type Response = Result<Outcome, CommandError>;

openraft::declare_raft_types!(
    /// Keel's raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = KeelNode,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, KeelNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, KeelNode>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, KeelNode>;
