//! keel-cluster: the cluster database every Keel node runs.
//!
//! * [`model`] — the desired-state records, the commands that change them and how they apply.
//! * [`store`] — openraft's log and state machine on SQLite.
//! * [`token`] — join tokens.

pub mod model;
pub mod peer_auth;
pub mod store;
pub mod tls;
pub mod token;
pub mod transport;
pub mod types;

pub use types::{KeelNode, NodeId, Request, Response, TypeConfig};

pub mod db;
pub mod local;

pub use db::{ClusterDb, ClusterDbConfig, ClusterError};

pub use keel_base::error_chain;
