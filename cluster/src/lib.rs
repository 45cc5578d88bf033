//! keel-cluster: the cluster database every Keel node runs.
//!
//! * [`model`] — the desired-state records, the commands that change them and how they apply.
//! * [`store`] — openraft's log and state machine on SQLite.
//! * [`token`] — join tokens.

pub mod model;
pub mod store;
pub mod tls;
pub mod token;
pub mod transport;
pub mod types;

pub use types::{KeelNode, NodeId, Request, Response, TypeConfig};

pub mod db;
pub mod local;

pub use db::{ClusterDb, ClusterDbConfig, ClusterError};

/// Formats an error with its whole `source()` chain, for logs and one-line CLI errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
