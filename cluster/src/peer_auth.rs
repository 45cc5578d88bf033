//! Who may call what on the peer port.
//!
//! The TLS handshake only proves that a caller holds a certificate of the cluster CA. Every
//! RPC then checks *which* node the certificate names (its `node-<id>.keel` name) against
//! raft's membership as this node sees it:
//!
//! ```text
//!  RPC                     caller must be                         and
//!  ─────────────────────   ────────────────────────────────────   ─────────────────────────────
//!  AppendEntries,          a member                               the leader the message names
//!  InstallSnapshot
//!  Vote                    a voter                                the candidate it names
//!  Leader (forwarding)     a member
//!  Heartbeat               a member                               the node the heartbeat names
//!  Host, Duplex, FetchBlob a member                               what the host services ask
//!                                                                 (the other end of a migration,
//!                                                                 a host that needs the blob)
//! ```
//!
//! A node that has not joined a cluster yet has no membership to check against: it takes
//! raft messages from whichever leader the cluster CA vouches for, since those messages
//! are how it learns the membership, and refuses everything else. A removed node is out
//! of the membership from the moment its removal is appended here, so its calls are
//! refused from then on, and the streams it holds open are ended
//! ([`PeerMembers::wait_removed`]).

use std::collections::BTreeSet;

use openraft::StoredMembership;
use tonic::Status;

use crate::types::{KeelNode, NodeId};

/// Why a peer call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerDenied {
    #[error("the caller presented no client certificate")]
    NoCertificate,
    #[error("the client certificate names no Keel node (node-<id>.keel)")]
    NotANode,
    #[error("node {caller} is not a member of this cluster")]
    NotAMember { caller: NodeId },
    #[error("node {caller} is not a voter of this cluster")]
    NotAVoter { caller: NodeId },
    #[error("node {caller} sent a message in the name of node {claimed}")]
    Impersonation { caller: NodeId, claimed: NodeId },
    #[error("this node has not joined a cluster yet")]
    NotJoined,
    #[error("node {caller} may not {what}")]
    NotInvolved { caller: NodeId, what: String },
}

impl From<PeerDenied> for Status {
    fn from(e: PeerDenied) -> Self {
        match e {
            PeerDenied::NoCertificate | PeerDenied::NotANode => {
                Status::unauthenticated(e.to_string())
            }
            PeerDenied::NotJoined => Status::failed_precondition(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}

/// The node a peer certificate (DER) was issued to: the id in its `node-<id>.keel` name.
pub fn node_of_certificate(der: &[u8]) -> Result<NodeId, PeerDenied> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| PeerDenied::NotANode)?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or(PeerDenied::NotANode)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => node_of_dns_name(dns),
            _ => None,
        })
        .ok_or(PeerDenied::NotANode)
}

/// `node-7.keel` → 7.
fn node_of_dns_name(name: &str) -> Option<NodeId> {
    let id = name.strip_prefix("node-")?.strip_suffix(".keel")?;
    // Digits only: "+7" or "07" would name node 7 too.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || id.starts_with('0') {
        return None;
    }
    id.parse().ok()
}

/// The caller of a peer RPC, from the client certificate of its TLS session.
pub fn caller_of<T>(req: &tonic::Request<T>) -> Result<NodeId, PeerDenied> {
    let certs = req.peer_certs().ok_or(PeerDenied::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerDenied::NoCertificate)?;
    node_of_certificate(leaf.as_ref())
}

/// Raft's membership as this node sees it (the latest configuration it has appended,
/// joint or not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMembers {
    pub voters: BTreeSet<NodeId>,
    /// Voters and learners.
    pub nodes: BTreeSet<NodeId>,
}

impl PeerMembers {
    pub fn of(membership: &StoredMembership<NodeId, KeelNode>) -> Self {
        Self {
            voters: membership.voter_ids().collect(),
            nodes: membership.nodes().map(|(id, _)| *id).collect(),
        }
    }

    /// Whether this node has a membership to check callers against.
    pub fn joined(&self) -> bool {
        !self.nodes.is_empty()
    }

    pub fn require_member(&self, caller: NodeId) -> Result<(), PeerDenied> {
        if !self.joined() {
            return Err(PeerDenied::NotJoined);
        }
        if self.nodes.contains(&caller) {
            Ok(())
        } else {
            Err(PeerDenied::NotAMember { caller })
        }
    }

    /// A replication message (entries, a snapshot) from `caller` in the name of leader
    /// `claimed`.
    pub fn allow_replication(
        &self,
        caller: NodeId,
        claimed: Option<NodeId>,
    ) -> Result<(), PeerDenied> {
        same_node(caller, claimed)?;
        if !self.joined() {
            // Joining: the first entries are what tell this node who the members are.
            return Ok(());
        }
        self.require_member(caller)
    }

    /// A vote request from `caller` as candidate `claimed`.
    pub fn allow_vote(&self, caller: NodeId, claimed: Option<NodeId>) -> Result<(), PeerDenied> {
        same_node(caller, claimed)?;
        self.require_member(caller)?;
        if self.voters.contains(&caller) {
            Ok(())
        } else {
            Err(PeerDenied::NotAVoter { caller })
        }
    }
}

fn same_node(caller: NodeId, claimed: Option<NodeId>) -> Result<(), PeerDenied> {
    match claimed {
        Some(claimed) if claimed != caller => Err(PeerDenied::Impersonation { caller, claimed }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[NodeId], learners: &[NodeId]) -> PeerMembers {
        PeerMembers {
            voters: voters.iter().copied().collect(),
            nodes: voters.iter().chain(learners).copied().collect(),
        }
    }

    #[test]
    fn only_node_names_name_a_node() {
        assert_eq!(node_of_dns_name("node-7.keel"), Some(7));
        assert_eq!(node_of_dns_name("node-123456.keel"), Some(123_456));
        for bad in [
            "keel",
            "node-.keel",
            "node-07.keel",
            "node-+7.keel",
            "node-7.keel.evil",
            "xnode-7.keel",
            "node-7",
        ] {
            assert_eq!(node_of_dns_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_signed_node_certificate_names_its_node() {
        let ca = crate::tls::generate_ca("c").unwrap_or_else(|e| panic!("{e}"));
        let (_key, csr) = crate::tls::generate_node_key().unwrap_or_else(|e| panic!("{e}"));
        let pem = crate::tls::sign_node_cert(&ca, &csr, 42, &[]).unwrap_or_else(|e| panic!("{e}"));
        let der = crate::tls::parse_certs(&pem, "node").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(node_of_certificate(der[0].as_ref()), Ok(42));
        let ca_der = crate::tls::parse_certs(&ca.cert_pem, "ca").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            node_of_certificate(ca_der[0].as_ref()),
            Err(PeerDenied::NotANode)
        );
    }

    #[test]
    fn replication_only_from_a_member_in_its_own_name() {
        let m = members(&[1, 2, 3], &[4]);
        assert_eq!(m.allow_replication(1, Some(1)), Ok(()));
        assert_eq!(m.allow_replication(4, Some(4)), Ok(()));
        assert_eq!(
            m.allow_replication(5, Some(5)),
            Err(PeerDenied::NotAMember { caller: 5 })
        );
        assert_eq!(
            m.allow_replication(2, Some(1)),
            Err(PeerDenied::Impersonation {
                caller: 2,
                claimed: 1
            })
        );
        // Before joining, any leader the CA vouches for: but still in its own name.
        let fresh = PeerMembers::default();
        assert_eq!(fresh.allow_replication(9, Some(9)), Ok(()));
        assert!(fresh.allow_replication(9, Some(1)).is_err());
    }

    #[test]
    fn votes_only_from_voters_in_their_own_name() {
        let m = members(&[1, 2, 3], &[4]);
        assert_eq!(m.allow_vote(2, Some(2)), Ok(()));
        assert_eq!(
            m.allow_vote(4, Some(4)),
            Err(PeerDenied::NotAVoter { caller: 4 })
        );
        assert_eq!(
            m.allow_vote(5, Some(5)),
            Err(PeerDenied::NotAMember { caller: 5 })
        );
        assert!(m.allow_vote(3, Some(2)).is_err());
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        let code = |e: PeerDenied| Status::from(e).code();
        assert_eq!(
            code(PeerDenied::NoCertificate),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(PeerDenied::NotAMember { caller: 1 }),
            tonic::Code::PermissionDenied
        );
        assert_eq!(code(PeerDenied::NotJoined), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn other_calls_only_from_members() {
        let m = members(&[1], &[2]);
        assert_eq!(m.require_member(2), Ok(()));
        assert_eq!(
            m.require_member(3),
            Err(PeerDenied::NotAMember { caller: 3 })
        );
        assert_eq!(
            PeerMembers::default().require_member(1),
            Err(PeerDenied::NotJoined)
        );
    }
}
