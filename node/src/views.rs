//! Builds API views from the cluster database and raft's metrics.

use keel_cluster::model::{ClusterInfo, Host};
use keel_cluster::ClusterDb;
use openraft::ServerState;

use crate::api::types::{ClusterView, DiskView, HostView, InventoryView, MemberView, NicView};

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Voter and learner ids of the membership raft last reported.
fn roles(m: &keel_cluster::types::RaftMetrics) -> (Vec<u64>, Vec<u64>) {
    let membership = m.membership_config.membership();
    (
        membership.voter_ids().collect(),
        membership.learner_ids().collect(),
    )
}

pub fn cluster_view(db: &ClusterDb, info: Option<ClusterInfo>) -> ClusterView {
    let Some(m) = db.metrics() else {
        return ClusterView {
            cluster_id: None,
            name: None,
            node_id: None,
            state: "uninitialized".into(),
            leader_id: None,
            term: 0,
            last_log_index: None,
            last_applied: None,
            voters: vec![],
            learners: vec![],
            members: vec![],
            ca_fingerprint: None,
        };
    };
    let (voters, learners) = roles(&m);
    let members = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| MemberView {
            id: *id,
            name: node.name.clone(),
            role: if voters.contains(id) {
                "voter"
            } else {
                "learner"
            }
            .into(),
            peer_addr: node.peer_addr.clone(),
            api_addr: node.api_addr.clone(),
        })
        .collect();
    ClusterView {
        cluster_id: db.cluster_id(),
        name: info.as_ref().map(|i| i.name.clone()),
        node_id: Some(m.id),
        state: state_name(m.state).into(),
        leader_id: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        voters,
        learners,
        members,
        ca_fingerprint: info.map(|i| i.ca_fingerprint),
    }
}

pub fn host_views(db: &ClusterDb, hosts: Vec<Host>) -> Vec<HostView> {
    let metrics = db.metrics();
    let (voters, learners) = metrics.as_ref().map(roles).unwrap_or_default();
    let leader = metrics.and_then(|m| m.current_leader);
    hosts
        .into_iter()
        .map(|h| {
            let role = if voters.contains(&h.id) {
                "voter"
            } else if learners.contains(&h.id) {
                "learner"
            } else {
                "none"
            };
            let inventory = h.inventory.map(|i| InventoryView {
                hostname: i.hostname,
                kernel: i.kernel,
                cpus: i.cpus,
                cpu_model: i.cpu_model,
                memory_bytes: i.memory_bytes,
                disks: i
                    .disks
                    .into_iter()
                    .map(|d| DiskView {
                        name: d.name,
                        size_bytes: d.size_bytes,
                        model: d.model,
                        rotational: d.rotational,
                    })
                    .collect(),
                nics: i
                    .nics
                    .into_iter()
                    .map(|n| NicView {
                        name: n.name,
                        mac: n.mac,
                        mtu: n.mtu,
                        addresses: n.addresses,
                        up: n.up,
                    })
                    .collect(),
                kvm_device_present: i.kvm.device_present,
                kvm_usable: i.kvm.usable,
                kvm_detail: i.kvm.detail,
                keel_version: i.keel_version,
                reported_at_ms: h.inventory_at_ms,
            });
            HostView {
                id: h.id,
                name: h.name,
                zone: h.zone,
                compute_cluster: h.compute_cluster,
                peer_addr: h.peer_addr,
                api_addr: h.api_addr,
                witness: h.witness,
                health: h.health.to_string(),
                health_since_ms: h.health_since_ms,
                role: role.into(),
                leader: leader == Some(h.id),
                joined_at_ms: h.joined_at_ms,
                inventory,
            }
        })
        .collect()
}
