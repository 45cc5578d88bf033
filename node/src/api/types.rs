//! Wire types of the HTTP API, kept apart from the cluster model so that the model can
//! change without changing the API by accident. Every type here appears in the OpenAPI
//! document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `token_expired`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// Whether this node belongs to a cluster yet.
    pub member: bool,
    pub leader: bool,
    /// Whether this node runs the management duties right now.
    pub duties: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    pub cluster_id: Option<String>,
    pub name: Option<String>,
    /// The node that answered.
    pub node_id: Option<u64>,
    /// `leader`, `follower`, `candidate`, `learner`, `shutdown` or `uninitialized`.
    pub state: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: Vec<MemberView>,
    pub ca_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub id: u64,
    pub name: String,
    /// `voter` or `learner`.
    pub role: String,
    pub peer_addr: String,
    pub api_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: u64,
    pub name: String,
    pub zone: String,
    pub compute_cluster: String,
    pub peer_addr: String,
    pub api_addr: String,
    pub witness: bool,
    /// `up`, `suspect` or `down`.
    pub health: String,
    pub health_since_ms: u64,
    /// `voter`, `learner`, or `none` (not in the raft membership).
    pub role: String,
    pub leader: bool,
    pub joined_at_ms: u64,
    pub inventory: Option<InventoryView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InventoryView {
    pub hostname: String,
    pub kernel: String,
    pub cpus: u32,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub disks: Vec<DiskView>,
    pub nics: Vec<NicView>,
    pub kvm_device_present: bool,
    /// `null` until a boot probe has run.
    pub kvm_usable: Option<bool>,
    pub kvm_detail: String,
    pub keel_version: String,
    pub reported_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub rotational: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NicView {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
    pub up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateTokenRequest {
    /// How long the token stays valid, e.g. `10m`, `1h` (default `1h`, at most `7d`).
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// The whole token; shown once.
    pub token: String,
    pub id: String,
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for TokenView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenView")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Sent by a joining node; authenticated by the token's secret.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinApiRequest {
    pub token_id: String,
    /// SHA-256 (hex) of the token secret.
    pub secret_sha256: String,
    /// PEM certificate signing request for the joining node's key.
    pub csr_pem: String,
    pub name: String,
    pub peer_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub witness: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinApiReply {
    pub node_id: u64,
    pub cluster_id: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SettingView {
    pub key: String,
    pub value: String,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PutSettingRequest {
    pub value: String,
}

// ---- local (admin socket) only -------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InitRequest {
    #[serde(default = "default_cluster_name")]
    pub name: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    #[serde(default = "default_compute_cluster")]
    pub compute_cluster: String,
}

fn default_cluster_name() -> String {
    "keel".into()
}
fn default_zone() -> String {
    "zone1".into()
}
fn default_compute_cluster() -> String {
    "cluster1".into()
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct InitReply {
    pub cluster_id: String,
    pub node_id: u64,
    /// The admin bearer token; shown once, stored only as a hash.
    pub admin_token: String,
    pub ca_fingerprint: String,
    pub ca_pem: String,
    pub api_addr: String,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LocalJoinRequest {
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LocalJoinReply {
    pub node_id: u64,
    pub cluster_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RaftBenchRequest {
    pub count: u32,
    pub concurrency: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RaftBenchReply {
    /// Per-write latencies in microseconds, in completion order.
    pub latencies_us: Vec<u64>,
    pub elapsed_us: u64,
    pub errors: u32,
}
