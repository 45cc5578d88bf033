//! [`ClusterDb`]: the one handle the node service holds on the cluster database.
//!
//! ```text
//!            open()                 init() / join()
//!   (files) ───────► NotMember ─────────────────────► Member ──► shutdown()
//!                      │  ▲                              │
//!                      │  └── crash half-way: the pending file resumes the same step
//!                      └── node.json present: straight to Member
//! ```
//!
//! * Writes go through [`ClusterDb::write`]: proposed locally when this node leads,
//!   otherwise forwarded over the peer port to the leader (a follower never guesses).
//!   A write that no leader commits within the write timeout fails with
//!   [`ClusterError::NoQuorum`]; its outcome is then unknown, and the message says so.
//! * Operations only a leader can do (joins, membership changes) travel the same way as
//!   [`LeaderOp`]s.
//! * Heartbeats from members land in a [`HeartbeatBook`] that the leader's health duty
//!   reads; they are not replicated, only health transitions are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::local::{LocalError, LocalFiles, LocalState};
use crate::model::{
    self, CaKey, ClusterInfo, Command, CommandError, Credential, NewHost, Outcome, Role,
};
use crate::store::{self, LogStore, StateMachineStore, StateReader, StoreError};
use crate::tls::{self, CaMaterial, NodeIdentity, TlsError};
use crate::token::{random_hex, sha256_hex, JoinTokenBody};
use crate::transport::{self, PeerConnector, PeerHandler, PeerRpc, TransportError};
use crate::types::{KeelNode, NodeId, Raft, RaftMetrics, Request, Response};

const PENDING_INIT: &str = "pending-init.json";
const PENDING_JOIN: &str = "pending-join.json";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Raft timing. openraft's leader lease equals `election_timeout_max_ms`: a follower
/// refuses to vote until that long after the last heartbeat, so a first candidate usually
/// loses and the election completes on its second timeout. Failover therefore takes
/// roughly `2 × election_timeout_min_ms` to `election_timeout_min_ms + election_timeout_max_ms`;
/// the defaults aim at about one second while tolerating half-second stalls of a busy host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and allow purging the log) after this many applied entries.
    pub snapshot_every: u64,
    pub write_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 800,
            snapshot_every: 5000,
            write_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterDbConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub peer_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub witness: bool,
    pub tuning: RaftTuning,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("this node is not a member of a cluster yet: run `keel cluster init` on the first node or `keel cluster join TOKEN` here")]
    NotMember,
    #[error("this node is already a member of cluster {cluster_id} (node {node_id})")]
    AlreadyMember { cluster_id: String, node_id: NodeId },
    #[error(transparent)]
    Rejected(#[from] CommandError),
    #[error("no leader committed the request within {timeout_ms} ms: a majority of voters is probably unreachable. The outcome is unknown; check `keel cluster status` and retry")]
    NoQuorum { timeout_ms: u64 },
    #[error("the cluster database failed while {op}")]
    Store {
        op: &'static str,
        #[source]
        source: Box<StoreError>,
    },
    #[error("node-local state failed while {op}")]
    Local {
        op: &'static str,
        #[source]
        source: Box<LocalError>,
    },
    #[error("certificate handling failed while {op}")]
    Tls {
        op: &'static str,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the peer transport failed while {op}")]
    Transport {
        op: &'static str,
        #[source]
        source: Box<TransportError>,
    },
    #[error("node {node_id} did not answer")]
    Peer {
        node_id: NodeId,
        #[source]
        source: Box<TransportError>,
    },
    #[error("raft stopped on this node: {detail}")]
    Fatal { detail: String },
    #[error("raft refused the request: {detail}")]
    Raft { detail: String },
    #[error("the leader answered with an error: {detail}")]
    Remote { detail: String },
    #[error("invalid request: {detail}")]
    Invalid { detail: String },
}

impl ClusterError {
    /// `map_err` helpers that say what the failing step was doing.
    pub fn store(op: &'static str) -> impl FnOnce(StoreError) -> ClusterError {
        move |source| ClusterError::Store {
            op,
            source: Box::new(source),
        }
    }
    pub fn local(op: &'static str) -> impl FnOnce(LocalError) -> ClusterError {
        move |source| ClusterError::Local {
            op,
            source: Box::new(source),
        }
    }
    pub fn tls(op: &'static str) -> impl FnOnce(TlsError) -> ClusterError {
        move |source| ClusterError::Tls {
            op,
            source: Box::new(source),
        }
    }
    pub fn transport(op: &'static str) -> impl FnOnce(TransportError) -> ClusterError {
        move |source| ClusterError::Transport {
            op,
            source: Box::new(source),
        }
    }
}

/// Operations only the leader may carry out; followers forward them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LeaderOp {
    /// Boxed: a command (an inventory report, say) is far larger than the other variants.
    Write {
        request: Box<Request>,
    },
    Join {
        request: JoinRequest,
    },
    RemoveNode {
        node_id: NodeId,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaderReply {
    Written { response: Response },
    Joined { reply: JoinReply },
    Removed,
}

/// Errors that cross the wire in a forwarded operation's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OpError {
    NotLeader { leader: Option<(NodeId, KeelNode)> },
    Rejected { error: CommandError },
    Failed { detail: String },
}

/// What a joining node sends (inside the join API call).
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token_id: String,
    pub secret_sha256: String,
    pub csr_pem: String,
    pub host: NewHost,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token_id", &self.token_id)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// The result of `cluster init`, shown once.
#[derive(Clone, Serialize, Deserialize)]
pub struct InitOutput {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub admin_token: String,
    pub ca_fingerprint: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for InitOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitOutput")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitParams {
    pub cluster_name: String,
    pub zone: String,
    pub compute_cluster: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct PendingInit {
    output: InitOutput,
    command: Command,
    identity_key_pem: String,
    identity_cert_pem: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct PendingJoin {
    key_pem: String,
    csr_pem: String,
}

/// A member's liveness report to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: NodeId,
    pub sent_at_ms: u64,
}

/// When the leader last heard from each member (not replicated: a new leader starts with
/// an empty book and gives every member a full grace period).
#[derive(Debug, Default)]
pub struct HeartbeatBook {
    seen: Mutex<HashMap<NodeId, Instant>>,
}

impl HeartbeatBook {
    pub fn record(&self, node: NodeId) {
        self.lock().insert(node, Instant::now());
    }
    pub fn last_seen(&self, node: NodeId) -> Option<Instant> {
        self.lock().get(&node).copied()
    }
    pub fn clear(&self) {
        self.lock().clear();
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Member {
    node_id: NodeId,
    cluster_id: String,
    raft: Raft,
    connector: PeerConnector,
    identity: NodeIdentity,
}

struct Inner {
    config: ClusterDbConfig,
    files: LocalFiles,
    reader: StateReader,
    /// The stores until raft takes them (on init, join, or at open for a member).
    unstarted: Mutex<Option<(LogStore, StateMachineStore)>>,
    /// The bound peer listener until the peer server takes it.
    peer_listener: Mutex<Option<tokio::net::TcpListener>>,
    member: RwLock<Option<Arc<Member>>>,
    member_tx: tokio::sync::watch::Sender<Option<NodeId>>,
    /// Serialises init and join attempts.
    membership_change: tokio::sync::Mutex<()>,
    /// Serialises the leader's voter decisions: the voter duty's read-decide-change and
    /// `node remove`'s whole sequence. Interleaved, the duty once re-promoted a node that
    /// `node remove` had just demoted (its host record was still there), and the removal's
    /// next step then failed with "Learner N not found".
    voter_changes: tokio::sync::Mutex<()>,
    heartbeats: HeartbeatBook,
    host_services: RwLock<Option<Arc<dyn HostServices>>>,
    shutdown: CancellationToken,
}

/// Why the leader's check of a join request before proposing it failed.
#[derive(Debug, thiserror::Error)]
enum JoinPrecheckError {
    #[error("the request is refused")]
    Refused(#[source] CommandError),
    #[error("reading the join token")]
    Store(#[from] crate::store::StoreError),
}

/// What the node service offers other members on the peer port besides the cluster
/// database: its host services (compute, storage). Registered with
/// [`ClusterDb::set_host_services`]; requests arriving before that are refused as
/// unavailable. `caller` is the member asking (named by its certificate); the services
/// decide from raft's state whether it may ask that of this host.
#[tonic::async_trait]
pub trait HostServices: Send + Sync + 'static {
    async fn host_op(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status>;
    async fn open_blob(&self, caller: NodeId, json: &[u8])
        -> Result<transport::BlobReader, Status>;
    async fn open_duplex(
        &self,
        caller: NodeId,
        header: &[u8],
        inbound: transport::DuplexInbound,
    ) -> Result<transport::DuplexOutbound, Status>;
}

/// The cluster database handle. Cheap to clone.
#[derive(Clone)]
pub struct ClusterDb {
    inner: Arc<Inner>,
}

impl ClusterDb {
    /// Opens the stores (refusing foreign or damaged files) and, if this node is already a
    /// member, starts raft and the peer server on `peer_listener`.
    pub async fn open(
        config: ClusterDbConfig,
        peer_listener: tokio::net::TcpListener,
    ) -> Result<Self, ClusterError> {
        let (log, sm, reader) = store::open(&config.data_dir).map_err(ClusterError::store(
            "opening the raft log and state machine",
        ))?;
        let files = LocalFiles::new(&config.data_dir);
        let (member_tx, _) = tokio::sync::watch::channel(None);
        let db = ClusterDb {
            inner: Arc::new(Inner {
                files,
                reader,
                unstarted: Mutex::new(Some((log, sm))),
                peer_listener: Mutex::new(Some(peer_listener)),
                member: RwLock::new(None),
                member_tx,
                membership_change: tokio::sync::Mutex::new(()),
                voter_changes: tokio::sync::Mutex::new(()),
                heartbeats: HeartbeatBook::default(),
                host_services: RwLock::new(None),
                shutdown: CancellationToken::new(),
                config,
            }),
        };
        if let (Some(state), Some(identity)) = (
            db.inner
                .files
                .load_state()
                .map_err(ClusterError::local("loading this node's state"))?,
            db.inner
                .files
                .load_identity()
                .map_err(ClusterError::local("loading this node's identity"))?,
        ) {
            db.start_member(state, identity).await?;
            // An init that crashed after node.json was written resumes here.
            if let Some(pending) = db
                .inner
                .files
                .load_pending::<PendingInit>(PENDING_INIT)
                .map_err(ClusterError::local("loading an interrupted init"))?
            {
                if db.cluster_info()?.is_none() {
                    tracing::info!("resuming an interrupted cluster init");
                    let db2 = db.clone();
                    tokio::spawn(async move {
                        if let Err(e) = db2.finish_init(&pending).await {
                            tracing::error!(error = %crate::error_chain(&e), "resuming cluster init failed; run `keel cluster init` again");
                        }
                    });
                }
            }
        }
        Ok(db)
    }

    pub fn config(&self) -> &ClusterDbConfig {
        &self.inner.config
    }

    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    pub fn heartbeats(&self) -> &HeartbeatBook {
        &self.inner.heartbeats
    }

    /// This node's id once it is a member.
    pub fn node_id(&self) -> Option<NodeId> {
        self.member().map(|m| m.node_id)
    }

    /// Resolves each time this node becomes a member (once, in practice).
    pub fn membership_watch(&self) -> tokio::sync::watch::Receiver<Option<NodeId>> {
        self.inner.member_tx.subscribe()
    }

    /// Waits until this node is a member and returns its raft handle.
    pub async fn wait_for_raft(&self) -> Raft {
        let mut membership = self.membership_watch();
        loop {
            if let Some(raft) = self.raft() {
                return raft;
            }
            if membership.changed().await.is_err() {
                // The database is gone: nothing will ever start.
                return std::future::pending().await;
            }
        }
    }

    pub fn raft(&self) -> Option<Raft> {
        self.member().map(|m| m.raft.clone())
    }

    pub fn metrics(&self) -> Option<RaftMetrics> {
        self.member().map(|m| m.raft.metrics().borrow().clone())
    }

    pub fn identity(&self) -> Option<NodeIdentity> {
        self.member().map(|m| m.identity.clone())
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.member().map(|m| m.cluster_id.clone())
    }

    pub fn cluster_info(&self) -> Result<Option<ClusterInfo>, ClusterError> {
        self.inner
            .reader
            .read(model::cluster_info)
            .map_err(ClusterError::store("reading the cluster info"))
    }

    fn member(&self) -> Option<Arc<Member>> {
        self.inner
            .member
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn require_member(&self) -> Result<Arc<Member>, ClusterError> {
        self.member().ok_or(ClusterError::NotMember)
    }

    fn this_node(&self) -> KeelNode {
        let c = &self.inner.config;
        KeelNode {
            name: c.name.clone(),
            peer_addr: c.peer_addr.to_string(),
            api_addr: c.api_addr.to_string(),
        }
    }

    fn new_host(&self) -> NewHost {
        let c = &self.inner.config;
        NewHost {
            name: c.name.clone(),
            peer_addr: c.peer_addr.to_string(),
            api_addr: c.api_addr.to_string(),
            witness: c.witness,
        }
    }

    async fn start_member(
        &self,
        state: LocalState,
        identity: NodeIdentity,
    ) -> Result<Arc<Member>, ClusterError> {
        if let Some(m) = self.member() {
            return Ok(m);
        }
        let (log, sm) = self
            .inner
            .unstarted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| ClusterError::Fatal {
                detail: "raft storage was already handed to an earlier start".into(),
            })?;
        let t = &self.inner.config.tuning;
        let config = openraft::Config {
            cluster_name: state.cluster_id.clone(),
            heartbeat_interval: t.heartbeat_interval_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Invalid {
            detail: format!("raft tuning: {e}"),
        })?;
        let connector = PeerConnector::new(&identity);
        let raft = Raft::new(state.node_id, Arc::new(config), connector.clone(), log, sm)
            .await
            .map_err(|e| ClusterError::Fatal {
                detail: e.to_string(),
            })?;
        let member = Arc::new(Member {
            node_id: state.node_id,
            cluster_id: state.cluster_id.clone(),
            raft: raft.clone(),
            connector,
            identity: identity.clone(),
        });
        *self
            .inner
            .member
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(member.clone());
        let listener = self
            .inner
            .peer_listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(listener) = listener {
            let handler: Arc<dyn PeerHandler> = Arc::new(self.clone());
            let shutdown = self.inner.shutdown.clone();
            tokio::spawn(async move {
                let stop = async move { shutdown.cancelled().await };
                if let Err(e) = transport::serve(listener, &identity, raft, handler, stop).await {
                    tracing::error!(error = %crate::error_chain(&e), "peer server stopped");
                }
            });
        }
        self.inner.member_tx.send_replace(Some(state.node_id));
        tracing::info!(node_id = state.node_id, cluster_id = %state.cluster_id, "raft started");
        Ok(member)
    }

    /// Creates a new cluster with this node as its only voter.
    pub async fn init(&self, params: InitParams) -> Result<InitOutput, ClusterError> {
        let _guard = self.inner.membership_change.lock().await;
        // A previous attempt that crashed or whose answer was lost: finish and answer it.
        if let Some(pending) = self
            .inner
            .files
            .load_pending::<PendingInit>(PENDING_INIT)
            .map_err(ClusterError::local("loading an interrupted init"))?
        {
            if self.member().is_none() {
                let identity = NodeIdentity {
                    cert_chain_pem: pending.identity_cert_pem.clone(),
                    key_pem: pending.identity_key_pem.clone(),
                    ca_pem: pending.output.ca_pem.clone(),
                };
                self.inner
                    .files
                    .save_identity(&identity)
                    .map_err(ClusterError::local("saving this node's identity"))?;
                let state = LocalState {
                    node_id: 1,
                    cluster_id: pending.output.cluster_id.clone(),
                };
                self.inner
                    .files
                    .save_state(&state)
                    .map_err(ClusterError::local("saving this node's state"))?;
                self.start_member(state, identity).await?;
            }
            return self.finish_init(&pending).await;
        }
        if let Some(m) = self.member() {
            return Err(ClusterError::AlreadyMember {
                cluster_id: m.cluster_id.clone(),
                node_id: m.node_id,
            });
        }
        for (field, value) in [
            ("cluster name", &params.cluster_name),
            ("zone name", &params.zone),
            ("compute cluster name", &params.compute_cluster),
        ] {
            model::validate_name(field, value)?;
        }
        let now = now_ms();
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let ca = tls::generate_ca(&params.cluster_name)
            .map_err(ClusterError::tls("creating the cluster CA"))?;
        let ca_fingerprint = tls::cert_fingerprint(&ca.cert_pem)
            .map_err(ClusterError::tls("fingerprinting the cluster CA"))?;
        let (key_pem, csr_pem) =
            tls::generate_node_key().map_err(ClusterError::tls("creating this node's key"))?;
        let cert_pem = tls::sign_node_cert(&ca, &csr_pem, 1, &self.node_ips())
            .map_err(ClusterError::tls("signing this node's certificate"))?;
        let admin_token = format!("keel-admin-{}", random_hex(32));
        let output = InitOutput {
            cluster_id: cluster_id.clone(),
            node_id: 1,
            admin_token: admin_token.clone(),
            ca_fingerprint: ca_fingerprint.clone(),
            ca_pem: ca.cert_pem.clone(),
        };
        let command = Command::InitCluster {
            info: ClusterInfo {
                cluster_id: cluster_id.clone(),
                name: params.cluster_name.clone(),
                created_at_ms: now,
                ca_cert_pem: ca.cert_pem.clone(),
                ca_fingerprint,
            },
            ca_key: CaKey {
                key_pem: ca.key_pem.clone(),
            },
            admin: Credential {
                name: "admin".into(),
                role: Role::Admin,
                token_sha256: sha256_hex(admin_token.as_bytes()),
                created_at_ms: now,
            },
            zone: params.zone.clone(),
            compute_cluster: params.compute_cluster.clone(),
            first_host: self.new_host(),
            now_ms: now,
        };
        let pending = PendingInit {
            output,
            command,
            identity_key_pem: key_pem.clone(),
            identity_cert_pem: format!("{cert_pem}{}", ca.cert_pem),
        };
        self.inner
            .files
            .save_pending(PENDING_INIT, &pending)
            .map_err(ClusterError::local("recording the init in progress"))?;
        let identity = NodeIdentity {
            cert_chain_pem: pending.identity_cert_pem.clone(),
            key_pem,
            ca_pem: ca.cert_pem,
        };
        self.inner
            .files
            .save_identity(&identity)
            .map_err(ClusterError::local("saving this node's identity"))?;
        let state = LocalState {
            node_id: 1,
            cluster_id,
        };
        self.inner
            .files
            .save_state(&state)
            .map_err(ClusterError::local("saving this node's state"))?;
        self.start_member(state, identity).await?;
        self.finish_init(&pending).await
    }

    async fn finish_init(&self, pending: &PendingInit) -> Result<InitOutput, ClusterError> {
        let member = self.require_member()?;
        let initialized = member
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Fatal {
                detail: e.to_string(),
            })?;
        if !initialized {
            let mut nodes = BTreeMap::new();
            nodes.insert(1, self.this_node());
            member
                .raft
                .initialize(nodes)
                .await
                .map_err(|e| ClusterError::Raft {
                    detail: e.to_string(),
                })?;
        }
        match self.write(pending.command.clone()).await {
            Ok(_) => {}
            Err(ClusterError::Rejected(CommandError::AlreadyInitialized { cluster_id }))
                if cluster_id == pending.output.cluster_id => {}
            Err(e) => return Err(e),
        }
        self.inner
            .files
            .clear_pending(PENDING_INIT)
            .map_err(ClusterError::local("finishing the init"))?;
        tracing::info!(cluster_id = %pending.output.cluster_id, "cluster initialised");
        Ok(pending.output.clone())
    }

    fn node_ips(&self) -> Vec<IpAddr> {
        let c = &self.inner.config;
        let mut ips = vec![c.peer_addr.ip(), c.api_addr.ip()];
        ips.dedup();
        ips
    }

    /// Creates a join token valid for `ttl`.
    pub async fn create_join_token(&self, ttl: Duration) -> Result<JoinTokenBody, ClusterError> {
        let info = self.cluster_info()?.ok_or(ClusterError::NotMember)?;
        let member = self.require_member()?;
        let now = now_ms();
        let expires_at_ms = now.saturating_add(ttl.as_millis() as u64);
        // Every voter's API address, this node first: the joiner tries them in order.
        let mut addrs = vec![self.inner.config.api_addr.to_string()];
        let metrics = member.raft.metrics().borrow().clone();
        for (_, node) in metrics.membership_config.membership().nodes() {
            if !addrs.contains(&node.api_addr) {
                addrs.push(node.api_addr.clone());
            }
        }
        let body = JoinTokenBody::generate(info.ca_fingerprint, addrs, expires_at_ms);
        self.write(Command::CreateJoinToken {
            token_id: body.id.clone(),
            secret_sha256: body.secret_sha256(),
            now_ms: now,
            expires_at_ms,
        })
        .await?;
        Ok(body)
    }

    /// Step one of joining: the key and CSR this node will join with. Reused across retries
    /// so the leader recognises a repeated join of the same node.
    pub async fn prepare_join(&self) -> Result<JoinRequestDraft, ClusterError> {
        let _guard = self.inner.membership_change.lock().await;
        if let Some(m) = self.member() {
            return Err(ClusterError::AlreadyMember {
                cluster_id: m.cluster_id.clone(),
                node_id: m.node_id,
            });
        }
        let pending = match self
            .inner
            .files
            .load_pending::<PendingJoin>(PENDING_JOIN)
            .map_err(ClusterError::local("loading an interrupted join"))?
        {
            Some(p) => p,
            None => {
                let (key_pem, csr_pem) = tls::generate_node_key()
                    .map_err(ClusterError::tls("creating this node's key"))?;
                let p = PendingJoin { key_pem, csr_pem };
                self.inner
                    .files
                    .save_pending(PENDING_JOIN, &p)
                    .map_err(ClusterError::local("recording the join in progress"))?;
                p
            }
        };
        Ok(JoinRequestDraft {
            csr_pem: pending.csr_pem,
            host: self.new_host(),
        })
    }

    /// Step two of joining: install what the leader sent and start raft as a learner.
    pub async fn complete_join(&self, reply: JoinReply) -> Result<(), ClusterError> {
        let _guard = self.inner.membership_change.lock().await;
        if self.member().is_some() {
            return Ok(());
        }
        let pending = self
            .inner
            .files
            .load_pending::<PendingJoin>(PENDING_JOIN)
            .map_err(ClusterError::local("loading the join in progress"))?
            .ok_or_else(|| ClusterError::Invalid {
                detail: "no join in progress on this node".into(),
            })?;
        let identity = NodeIdentity {
            cert_chain_pem: format!("{}{}", reply.cert_pem, reply.ca_pem),
            key_pem: pending.key_pem,
            ca_pem: reply.ca_pem.clone(),
        };
        // Check the pieces fit before persisting anything.
        tls::peer_server_config(&identity).map_err(ClusterError::tls(
            "checking the certificate the cluster signed",
        ))?;
        self.inner
            .files
            .save_identity(&identity)
            .map_err(ClusterError::local("saving this node's identity"))?;
        let state = LocalState {
            node_id: reply.node_id,
            cluster_id: reply.cluster_id.clone(),
        };
        self.inner
            .files
            .save_state(&state)
            .map_err(ClusterError::local("saving this node's state"))?;
        self.start_member(state, identity).await?;
        self.inner
            .files
            .clear_pending(PENDING_JOIN)
            .map_err(ClusterError::local("finishing the join"))?;
        Ok(())
    }

    /// Proposes a command; forwards it to the leader when this node does not lead.
    pub async fn write(&self, command: Command) -> Result<Outcome, ClusterError> {
        let request = Request {
            request_id: uuid::Uuid::new_v4().to_string(),
            command,
        };
        match self
            .leader_op(LeaderOp::Write {
                request: Box::new(request),
            })
            .await?
        {
            LeaderReply::Written { response } => Ok(response?),
            other => Err(ClusterError::Remote {
                detail: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Handles a join on the leader (forwarded there if needed).
    pub async fn join_on_leader(&self, request: JoinRequest) -> Result<JoinReply, ClusterError> {
        match self.leader_op(LeaderOp::Join { request }).await? {
            LeaderReply::Joined { reply } => Ok(reply),
            other => Err(ClusterError::Remote {
                detail: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Removes a node from the raft membership and the host table.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<(), ClusterError> {
        self.leader_op(LeaderOp::RemoveNode { node_id }).await?;
        Ok(())
    }

    /// Runs `op` on the leader: here if this node leads, else forwarded (following
    /// redirects) until the write timeout.
    async fn leader_op(&self, op: LeaderOp) -> Result<LeaderReply, ClusterError> {
        let member = self.require_member()?;
        let timeout_ms = self.inner.config.tuning.write_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let no_quorum = ClusterError::NoQuorum { timeout_ms };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_quorum);
            }
            let leader = member.raft.metrics().borrow().current_leader;
            let result = match leader {
                Some(id) if id == member.node_id => {
                    match tokio::time::timeout(
                        remaining,
                        self.execute_as_leader(&member, op.clone()),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => return Err(no_quorum),
                    }
                }
                Some(id) => {
                    let node = member
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .cloned();
                    match node {
                        Some(node) => {
                            // A dead leader's connection can hang until a timeout; abandon
                            // the forward as soon as raft names another leader. (The
                            // abandoned call may still have committed on a live old
                            // leader: writes are retried, so commands must tolerate a
                            // repeat.)
                            let mut metrics = member.raft.metrics();
                            tokio::select! {
                                r = self.forward(&member, id, &node, &op, remaining) => r,
                                _ = metrics.wait_for(|m| m.current_leader != Some(id)) => {
                                    Err(OpError::NotLeader { leader: None })
                                }
                            }
                        }
                        None => Err(OpError::NotLeader { leader: None }),
                    }
                }
                None => Err(OpError::NotLeader { leader: None }),
            };
            match result {
                Ok(reply) => return Ok(reply),
                Err(OpError::Rejected { error }) => return Err(ClusterError::Rejected(error)),
                Err(OpError::Failed { detail }) => return Err(ClusterError::Remote { detail }),
                Err(OpError::NotLeader { .. }) => {
                    // No leader yet, or it moved: wait for raft's view to change (an
                    // election, a new leader) but no longer than a short tick, and never
                    // spin faster than 20 ms.
                    let mut metrics = member.raft.metrics();
                    let wait = Duration::from_millis(100).min(remaining);
                    tokio::time::sleep(Duration::from_millis(20).min(wait)).await;
                    let _ = tokio::time::timeout(wait, metrics.changed()).await;
                }
            }
        }
    }

    async fn forward(
        &self,
        member: &Member,
        leader: NodeId,
        node: &KeelNode,
        op: &LeaderOp,
        timeout: Duration,
    ) -> Result<LeaderReply, OpError> {
        let json = serde_json::to_vec(op).map_err(|e| OpError::Failed {
            detail: e.to_string(),
        })?;
        match member
            .connector
            .call(PeerRpc::Leader, leader, &node.peer_addr, json, timeout)
            .await
        {
            Ok(reply) => {
                serde_json::from_slice::<Result<LeaderReply, OpError>>(&reply).map_err(|e| {
                    OpError::Failed {
                        detail: format!("malformed reply from the leader: {e}"),
                    }
                })?
            }
            Err(e) => {
                tracing::debug!(leader, error = %crate::error_chain(&e), "forwarding to the leader failed; retrying");
                // The leader may be gone; let the retry loop wait for a new one.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(OpError::NotLeader { leader: None })
            }
        }
    }

    async fn execute_as_leader(
        &self,
        member: &Member,
        op: LeaderOp,
    ) -> Result<LeaderReply, OpError> {
        match op {
            LeaderOp::Write { request } => {
                let response = member
                    .raft
                    .client_write(*request)
                    .await
                    .map_err(client_write_error)?;
                Ok(LeaderReply::Written {
                    response: response.data,
                })
            }
            LeaderOp::Join { request } => self.join_as_leader(member, request).await,
            LeaderOp::RemoveNode { node_id } => {
                // Held until the host record is gone too, so that the voter duty never
                // decides from a state in the middle of the removal.
                let _voter_changes = self.voter_changes().await;
                let metrics = member.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                if membership.voter_ids().all(|v| v == node_id) {
                    return Err(OpError::Rejected {
                        error: CommandError::Invalid {
                            field: "node".into(),
                            reason: "the last voter cannot be removed".into(),
                        },
                    });
                }
                // Both changes are relative to the membership raft holds when it applies
                // them, not to the snapshot above: that one can be stale (a removal a
                // moment ago, the voter duty promoting a learner), and a whole voter set
                // computed from it once named a node that had already left ("Learner N
                // not found"). Either change is a no-op when the node is not there.
                // `retain` on the voter change: without it openraft drops every node that
                // is a voter only in the *old* half of a joint config, so a voter the duty
                // was demoting to learner at that moment vanished from raft with this one.
                for (change, retain) in [
                    (ChangeMembers::RemoveVoters(BTreeSet::from([node_id])), true),
                    (ChangeMembers::RemoveNodes(BTreeSet::from([node_id])), false),
                ] {
                    retry_membership(|| member.raft.change_membership(change.clone(), retain))
                        .await
                        .map_err(client_write_error)?;
                }
                let response = member
                    .raft
                    .client_write(Request {
                        request_id: uuid::Uuid::new_v4().to_string(),
                        command: Command::RemoveHost { host_id: node_id },
                    })
                    .await
                    .map_err(client_write_error)?;
                response.data.map_err(|error| OpError::Rejected { error })?;
                Ok(LeaderReply::Removed)
            }
        }
    }

    async fn join_as_leader(
        &self,
        member: &Member,
        request: JoinRequest,
    ) -> Result<LeaderReply, OpError> {
        let failed = |detail: String| OpError::Failed { detail };
        // Bounded before any work: nothing large is parsed for a stranger.
        if request.csr_pem.len() > model::MAX_CSR_BYTES {
            return Err(OpError::Rejected {
                error: CommandError::Invalid {
                    field: "certificate signing request".into(),
                    reason: format!(
                        "it has {} bytes, more than the {} a node's request has",
                        request.csr_pem.len(),
                        model::MAX_CSR_BYTES
                    ),
                },
            });
        }
        let key_fingerprint =
            tls::csr_key_fingerprint(&request.csr_pem).map_err(|e| OpError::Rejected {
                error: CommandError::Invalid {
                    field: "certificate signing request".into(),
                    reason: crate::error_chain(&e),
                },
            })?;
        // Only a valid, unconsumed token (or a retry by the host that used it) leads to a
        // raft write: a flood of bad requests leaves the log as it was. The apply checks
        // again against the state it applies to.
        let now = now_ms();
        let precheck = self.inner.reader.read_with(|conn| {
            model::check_join(
                conn,
                &request.token_id,
                &request.secret_sha256,
                &key_fingerprint,
                &request.host,
                now,
            )
            .map_err(JoinPrecheckError::Refused)
        });
        match precheck {
            Ok(_) => {}
            Err(JoinPrecheckError::Refused(error)) => {
                tracing::info!(token = %request.token_id, error = %error, "join refused before any write");
                return Err(OpError::Rejected { error });
            }
            Err(JoinPrecheckError::Store(e)) => return Err(failed(crate::error_chain(&e))),
        }
        let response = member
            .raft
            .client_write(Request {
                request_id: uuid::Uuid::new_v4().to_string(),
                command: Command::ConsumeJoinToken {
                    token_id: request.token_id.clone(),
                    secret_sha256: request.secret_sha256.clone(),
                    key_fingerprint,
                    host: request.host.clone(),
                    now_ms: now,
                },
            })
            .await
            .map_err(client_write_error)?;
        let node_id = match response.data {
            Ok(Outcome::HostJoined { host_id }) => host_id,
            Ok(other) => return Err(failed(format!("unexpected outcome {other:?}"))),
            Err(error) => return Err(OpError::Rejected { error }),
        };
        let (info, ca_key) = self
            .inner
            .reader
            .read(|conn| {
                Ok((
                    model::cluster_info(conn)?,
                    model::get::<CaKey>(conn, "ca_key")?,
                ))
            })
            .map_err(|e| failed(crate::error_chain(&e)))?;
        let (Some(info), Some(ca_key)) = (info, ca_key) else {
            return Err(failed("the cluster CA is missing from the state".into()));
        };
        let ca = CaMaterial {
            cert_pem: info.ca_cert_pem.clone(),
            key_pem: ca_key.key_pem,
        };
        let mut ips = Vec::new();
        for addr in [&request.host.peer_addr, &request.host.api_addr] {
            if let Ok(sa) = addr.parse::<SocketAddr>() {
                if !ips.contains(&sa.ip()) {
                    ips.push(sa.ip());
                }
            }
        }
        let cert_pem = tls::sign_node_cert(&ca, &request.csr_pem, node_id, &ips)
            .map_err(|e| failed(crate::error_chain(&e)))?;
        let node = KeelNode {
            name: request.host.name.clone(),
            peer_addr: request.host.peer_addr.clone(),
            api_addr: request.host.api_addr.clone(),
        };
        let known = member
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node_id)
            .is_some();
        if !known {
            // Not blocking: the new node starts its peer server only after this reply.
            retry_membership(|| member.raft.add_learner(node_id, node.clone(), false))
                .await
                .map_err(client_write_error)?;
        }
        tracing::info!(node_id, name = %request.host.name, "node joined as a learner");
        Ok(LeaderReply::Joined {
            reply: JoinReply {
                node_id,
                cluster_id: info.cluster_id,
                cert_pem,
                ca_pem: info.ca_cert_pem,
            },
        })
    }

    /// Sends this node's heartbeat to the leader (or records it, on the leader).
    pub async fn send_heartbeat(&self) -> Result<(), ClusterError> {
        let member = self.require_member()?;
        let metrics = member.raft.metrics().borrow().clone();
        match metrics.current_leader {
            Some(leader) if leader == member.node_id => {
                self.inner.heartbeats.record(member.node_id);
                Ok(())
            }
            Some(leader) => {
                let Some(node) = metrics
                    .membership_config
                    .membership()
                    .get_node(&leader)
                    .cloned()
                else {
                    return Ok(());
                };
                let hb = Heartbeat {
                    node_id: member.node_id,
                    sent_at_ms: now_ms(),
                };
                let json = serde_json::to_vec(&hb).map_err(|e| ClusterError::Invalid {
                    detail: e.to_string(),
                })?;
                member
                    .connector
                    .call(
                        PeerRpc::Heartbeat,
                        leader,
                        &node.peer_addr,
                        json,
                        Duration::from_secs(1),
                    )
                    .await
                    .map_err(ClusterError::transport("sending a heartbeat to the leader"))?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Holds off other voter decisions on this node (the leader) while the guard lives:
    /// the voter duty takes it around reading the state, deciding and [`Self::set_voters`];
    /// `node remove` around its whole sequence.
    pub async fn voter_changes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.voter_changes.lock().await
    }

    /// Replaces the voter set (leader only; used by the voter duty). A voter left out stays
    /// a learner (it is still a host of the cluster and may vote again later) unless it is
    /// in `leave`: those (lost voters) also leave the raft membership, so the leader stops
    /// replicating to them; their host records stay. (Dropping every voter left out once
    /// made a healthy voter, demoted because members were removed, vanish from raft while
    /// its host record stayed.)
    pub async fn set_voters(
        &self,
        voters: BTreeSet<NodeId>,
        leave: BTreeSet<NodeId>,
    ) -> Result<(), ClusterError> {
        let member = self.require_member()?;
        let raft_error =
            |e: RaftError<NodeId, ClientWriteError<NodeId, KeelNode>>| ClusterError::Raft {
                detail: e.to_string(),
            };
        member
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), true)
            .await
            .map_err(raft_error)?;
        let leave: BTreeSet<NodeId> = leave.difference(&voters).copied().collect();
        if !leave.is_empty() {
            retry_membership(|| {
                member
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(leave.clone()), false)
            })
            .await
            .map_err(raft_error)?;
        }
        Ok(())
    }

    /// Stops raft and the peer server.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        if let Some(m) = self.member() {
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!(error = %e, "raft shutdown");
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.metrics()
            .is_some_and(|m| m.state == ServerState::Leader && m.current_leader == Some(m.id))
    }
}

/// What the node's API layer fills in before calling the leader.
#[derive(Debug, Clone)]
pub struct JoinRequestDraft {
    pub csr_pem: String,
    pub host: NewHost,
}

/// How long a membership change waits for an earlier one to commit.
const MEMBERSHIP_RETRY: Duration = Duration::from_secs(10);

/// openraft allows one membership change at a time: one proposed while the previous (a
/// voter promotion by the voter duty, say) is still uncommitted is refused as
/// `InProgress`. A join's `add_learner` is retried for a bounded time instead of failing.
/// Only changes that stay right after a wait may be retried: a voter set computed before
/// the wait (the voter duty's, a removal's) could be stale and would drop a member — those
/// fail and are decided again.
async fn retry_membership<T, F, Fut>(
    mut change: F,
) -> Result<T, RaftError<NodeId, ClientWriteError<NodeId, KeelNode>>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
        Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, KeelNode>>>,
    >,
{
    let deadline = Instant::now() + MEMBERSHIP_RETRY;
    loop {
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, KeelNode>>) -> OpError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => OpError::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => OpError::Failed {
            detail: c.to_string(),
        },
        RaftError::Fatal(f) => OpError::Failed {
            detail: format!("raft stopped on the leader: {f}"),
        },
    }
}

#[tonic::async_trait]
impl PeerHandler for ClusterDb {
    async fn leader_op(&self, _caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status> {
        let op: LeaderOp = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("malformed leader op: {e}")))?;
        let member = self
            .member()
            .ok_or_else(|| Status::unavailable("not a member"))?;
        let result = if self.is_leader() {
            self.execute_as_leader(&member, op).await
        } else {
            Err(OpError::NotLeader { leader: None })
        };
        serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))
    }

    async fn heartbeat(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status> {
        let hb: Heartbeat = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("malformed heartbeat: {e}")))?;
        // A heartbeat says the sender is alive, so it counts for the node that sent it:
        // a member cannot keep another one "up".
        if hb.node_id != caller {
            tracing::warn!(
                caller,
                claimed = hb.node_id,
                "peer: heartbeat in another node's name refused"
            );
            return Err(crate::peer_auth::PeerDenied::Impersonation {
                caller,
                claimed: hb.node_id,
            }
            .into());
        }
        self.inner.heartbeats.record(caller);
        Ok(b"{}".to_vec())
    }

    async fn host_op(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status> {
        self.host_services()?.host_op(caller, json).await
    }

    async fn open_blob(
        &self,
        caller: NodeId,
        json: &[u8],
    ) -> Result<transport::BlobReader, Status> {
        self.host_services()?.open_blob(caller, json).await
    }

    async fn open_duplex(
        &self,
        caller: NodeId,
        header: &[u8],
        inbound: transport::DuplexInbound,
    ) -> Result<transport::DuplexOutbound, Status> {
        self.host_services()?
            .open_duplex(caller, header, inbound)
            .await
    }
}

impl ClusterDb {
    /// Registers the node's host services for peer requests.
    pub fn set_host_services(&self, services: Arc<dyn HostServices>) {
        *self
            .inner
            .host_services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(services);
    }

    fn host_services(&self) -> Result<Arc<dyn HostServices>, Status> {
        self.inner
            .host_services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Status::unavailable("host services are not running yet"))
    }

    fn peer_of(&self, target: NodeId) -> Result<(Arc<Member>, String), ClusterError> {
        let member = self.member().ok_or(ClusterError::NotMember)?;
        let host = self
            .reader()
            .read(|c| model::host(c, target))
            .map_err(ClusterError::store("reading the target host"))?
            .ok_or(ClusterError::Rejected(model::CommandError::HostUnknown {
                host_id: target,
            }))?;
        Ok((member, host.peer_addr))
    }

    /// Calls host services on member `target` with a JSON request.
    pub async fn host_call(
        &self,
        target: NodeId,
        json: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let (member, addr) = self.peer_of(target)?;
        member
            .connector
            .call(PeerRpc::Host, target, &addr, json, timeout)
            .await
            .map_err(|source| ClusterError::Peer {
                node_id: target,
                source: Box::new(source),
            })
    }

    /// Opens a duplex stream to member `target`'s host services.
    pub async fn duplex(
        &self,
        target: NodeId,
        header: Vec<u8>,
        outbound: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<tonic::Streaming<transport::Chunk>, ClusterError> {
        let (member, addr) = self.peer_of(target)?;
        member
            .connector
            .duplex(target, &addr, header, outbound)
            .await
            .map_err(|source| ClusterError::Peer {
                node_id: target,
                source: Box::new(source),
            })
    }

    /// Opens a blob stream from member `target`.
    pub async fn fetch_blob(
        &self,
        target: NodeId,
        json: Vec<u8>,
    ) -> Result<tonic::Streaming<transport::Chunk>, ClusterError> {
        let (member, addr) = self.peer_of(target)?;
        member
            .connector
            .fetch_blob(target, &addr, json)
            .await
            .map_err(|source| ClusterError::Peer {
                node_id: target,
                source: Box::new(source),
            })
    }
}
