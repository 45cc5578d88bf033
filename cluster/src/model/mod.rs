//! The desired-state model: records, the commands that change them, and how every replica
//! applies a command. Applying is deterministic: it reads nothing but the command and the
//! tables (never the clock, never the host), so every replica reaches the same state.
//!
//! Records are stored as JSON bodies in one SQLite table keyed by `(kind, id)`; the store
//! opens a transaction per log entry and calls [`apply`] inside it, so a crash between two
//! entries leaves either all or none of an entry's effects.
//!
//! Hierarchy: zone → compute cluster → host. Hosts carry their last reported inventory and
//! the health the leader's heartbeat duty assigned (`up` → `suspect` → `down`).

pub mod compute;
pub mod network;
mod nic;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A host's id: raft's node id, allocated by the state machine (`node_id` counter),
/// starting at 1. The model owns it; the raft type configuration uses it.
pub type NodeId = u64;

/// Grace applied to join-token expiry so that a small clock skew between the node that
/// created a token and the node that consumes it does not reject a valid join.
pub const TOKEN_EXPIRY_SKEW_MS: u64 = 60_000;

/// SQL that creates the model's tables. Idempotent.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
";

/// A record type stored in the `objects` table.
pub trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    fn key(&self) -> String;
}

/// Cluster-wide facts fixed at `cluster init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub name: String,
    pub created_at_ms: u64,
    /// PEM of the cluster CA certificate (public).
    pub ca_cert_pem: String,
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub ca_fingerprint: String,
}
impl Record for ClusterInfo {
    const KIND: &'static str = "cluster_info";
    fn key(&self) -> String {
        "cluster".into()
    }
}

/// The cluster CA's private key. Replicated so that whichever node leads can sign the
/// certificate of a joining node; never served by any API and never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKey {
    pub key_pem: String,
}
impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaKey(<redacted>)")
    }
}
impl Record for CaKey {
    const KIND: &'static str = "secret";
    fn key(&self) -> String {
        "ca_key".into()
    }
}

/// An API credential. Only a SHA-256 of the bearer token is stored: the token itself has
/// 256 bits of entropy, so a slow password hash adds nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub name: String,
    pub role: Role,
    pub token_sha256: String,
    pub created_at_ms: u64,
}
impl Record for Credential {
    const KIND: &'static str = "credential";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub name: String,
}
impl Record for Zone {
    const KIND: &'static str = "zone";
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// A group of hosts sharing hypervisor type and networks (CloudStack's "cluster").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeCluster {
    pub name: String,
    pub zone: String,
}
impl Record for ComputeCluster {
    const KIND: &'static str = "compute_cluster";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Suspect,
    Down,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        })
    }
}

/// A server in the cluster. `id` is also its raft node id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub id: NodeId,
    pub name: String,
    pub zone: String,
    pub compute_cluster: String,
    pub peer_addr: String,
    pub api_addr: String,
    /// A witness votes but never runs workloads.
    pub witness: bool,
    pub joined_at_ms: u64,
    pub health: Health,
    pub health_since_ms: u64,
    pub inventory: Option<Inventory>,
    pub inventory_at_ms: Option<u64>,
    /// Set while the host is drained for maintenance: placement skips it.
    #[serde(default)]
    pub maintenance: Option<Maintenance>,
}

/// A host taken out of placement by `keel node drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    pub since_ms: u64,
}
impl Record for Host {
    const KIND: &'static str = "host";
    fn key(&self) -> String {
        host_key(self.id)
    }
}

fn host_key(id: NodeId) -> String {
    format!("{id:020}")
}

/// What a host reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    pub kernel: String,
    pub cpus: u32,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub kvm: KvmStatus,
    pub keel_version: String,
    /// The hypervisor as the host's compute service sees it (`None`: not reported).
    #[serde(default)]
    pub hypervisor: Option<HypervisorReport>,
    /// The host's guest networks as its network service last converged them (`None`: not
    /// reported).
    #[serde(default)]
    pub network: Option<NetworkReport>,
    /// The host's systemd units the node service keeps running (`None`: it does not
    /// manage any here — no systemd, or `[host] systemd = "off"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_units: Option<Vec<HostUnitReport>>,
}

/// One systemd unit of the host the node service keeps running, as it last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostUnitReport {
    /// The unit's name, e.g. `libvirtd.service`.
    pub unit: String,
    /// systemd's `LoadState` (`loaded`, `not-found`, `masked`, …; empty: not read).
    pub load_state: String,
    /// systemd's `ActiveState` (`active`, `activating`, `inactive`, `failed`, …).
    pub active_state: String,
    /// systemd's `SubState` (`running`, `dead`, …).
    pub sub_state: String,
    /// Why the unit is not running, or why its state could not be read (`None`: fine).
    #[serde(default)]
    pub error: Option<String>,
}

/// What a host's network reconciler built, and what it could not.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkReport {
    /// VNIs of the guest networks present on the host.
    pub vnis: Vec<u32>,
    /// Problems of the last pass (empty: converged).
    pub errors: Vec<String>,
}

/// The host's hypervisor connection and what it can run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HypervisorReport {
    /// libvirt domain type VMs get: `kvm` when a probe guest booted under KVM, else `qemu`.
    pub domain_type: String,
    pub libvirt_version: String,
    pub hypervisor_version: String,
    /// Why the hypervisor cannot take VMs right now (`None`: it can).
    pub error: Option<String>,
    /// Domains on the host that the cluster does not know: reported, never destroyed.
    #[serde(default)]
    pub unmanaged_domains: Vec<String>,
    /// The KVM boot probe's verdict (`None`: not probed yet).
    #[serde(default)]
    pub kvm_usable: Option<bool>,
    #[serde(default)]
    pub kvm_detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub rotational: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
    pub up: bool,
}

/// Whether hardware virtualisation really works on the host. `/dev/kvm` existing proves
/// nothing (nested PVM hosts have one that cannot boot stock kernels), so the verdict comes
/// from a probe that runs guest code.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvmStatus {
    pub device_present: bool,
    /// `None` until a probe has run.
    pub usable: Option<bool>,
    pub detail: String,
}

/// A cluster-wide setting (CloudStack's "global settings"): a validated key and a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub updated_at_ms: u64,
}
impl Record for Setting {
    const KIND: &'static str = "setting";
    fn key(&self) -> String {
        self.key.clone()
    }
}

/// Largest setting value accepted, in bytes.
pub const MAX_SETTING_VALUE: usize = 64 * 1024;

/// Checks a setting key: dotted lowercase words, e.g. `placement.overcommit.cpu`.
pub fn validate_setting_key(key: &str) -> Result<(), CommandError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(CommandError::Invalid {
            field: "setting key".into(),
            reason: format!(
                "{key:?} must be dot-separated words of lowercase letters, digits, '-' and '_' (at most 128 characters)"
            ),
        })
    }
}

/// A one-time join token. Only the SHA-256 of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub consumed: Option<TokenUse>,
}
impl Record for JoinToken {
    const KIND: &'static str = "join_token";
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub host_id: NodeId,
    /// Fingerprint of the joining node's public key: a retry of the same join (same key)
    /// gets the same host id back instead of a "token already used" error.
    pub key_fingerprint: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    name: String,
    value: u64,
}
impl Record for Counter {
    const KIND: &'static str = "counter";
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// A server asking to become a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewHost {
    pub name: String,
    pub peer_addr: String,
    pub api_addr: String,
    pub witness: bool,
}

/// Every change to the desired state. Times are supplied by the proposer so that applying
/// stays deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    InitCluster {
        info: ClusterInfo,
        ca_key: CaKey,
        admin: Credential,
        zone: String,
        compute_cluster: String,
        first_host: NewHost,
        now_ms: u64,
    },
    CreateJoinToken {
        token_id: String,
        secret_sha256: String,
        now_ms: u64,
        expires_at_ms: u64,
    },
    ConsumeJoinToken {
        token_id: String,
        secret_sha256: String,
        key_fingerprint: String,
        host: NewHost,
        now_ms: u64,
    },
    ReportInventory {
        host_id: NodeId,
        inventory: Inventory,
        now_ms: u64,
    },
    SetHealth {
        host_id: NodeId,
        health: Health,
        now_ms: u64,
    },
    RemoveHost {
        host_id: NodeId,
    },
    PutSetting {
        key: String,
        value: String,
        now_ms: u64,
    },
    DeleteSetting {
        key: String,
    },
    /// VMs, templates, affinity groups (see [`compute`]).
    Compute {
        command: compute::ComputeCommand,
    },
    /// Host networks, guest networks, security groups (see [`network`]).
    Network {
        command: network::NetworkCommand,
    },
}

impl Command {
    /// A short name for logs and metrics; never includes secrets.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init_cluster",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::ConsumeJoinToken { .. } => "consume_join_token",
            Command::ReportInventory { .. } => "report_inventory",
            Command::SetHealth { .. } => "set_health",
            Command::RemoveHost { .. } => "remove_host",
            Command::PutSetting { .. } => "put_setting",
            Command::DeleteSetting { .. } => "delete_setting",
            Command::Compute { command } => command.kind(),
            Command::Network { command } => command.kind(),
        }
    }
}

/// What an applied command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    /// The entry changed nothing because the state already matched.
    Unchanged,
    HostJoined {
        host_id: NodeId,
    },
    /// A record was created (or an operation started on one): its id.
    Created {
        id: String,
    },
}

/// Why a command was rejected. Every replica rejects the same command the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum CommandError {
    #[error("the cluster is not initialised yet: run `keel cluster init` on one node first")]
    NotInitialized,
    #[error("the cluster is already initialised (cluster id {cluster_id})")]
    AlreadyInitialized { cluster_id: String },
    #[error("join token {token_id} is unknown: create a new one with `keel cluster token create`")]
    TokenUnknown { token_id: String },
    #[error("join token {token_id} does not match its secret: copy the whole token again")]
    TokenSecretMismatch { token_id: String },
    #[error(
        "join token {token_id} expired at {expired_at_ms} ms since the epoch: create a new one"
    )]
    TokenExpired {
        token_id: String,
        expired_at_ms: u64,
    },
    #[error("join token {token_id} was already used by host {host_id}: tokens are single-use, create a new one")]
    TokenUsed { token_id: String, host_id: NodeId },
    #[error("host {host_id} is unknown")]
    HostUnknown { host_id: NodeId },
    #[error("setting {key:?} does not exist")]
    SettingUnknown { key: String },
    #[error("a {kind} named {name:?} already exists")]
    NameTaken { kind: String, name: String },
    #[error("VM {vm:?} does not exist: `keel vm list` shows the VMs")]
    VmUnknown { vm: String },
    #[error("VM {vm} is being deleted")]
    VmDeleting { vm: String },
    #[error("VM {vm} cannot do that now: {reason}")]
    VmState { vm: String, reason: String },
    #[error("template {template:?} does not exist: `keel template list` shows the templates")]
    TemplateUnknown { template: String },
    #[error("affinity group {group:?} does not exist: create it with `keel vm group create`")]
    AffinityGroupUnknown { group: String },
    #[error("{what} is still used by {}: remove those first", users.join(", "))]
    InUse { what: String, users: Vec<String> },
    #[error("network {network:?} does not exist: `keel net list` shows the networks")]
    NetworkUnknown { network: String },
    #[error("security group {group:?} does not exist: `keel sg list` shows the groups")]
    SecurityGroupUnknown { group: String },
    #[error("security group {group} has no rule {rule:?}: `keel sg show {group}` lists its rules")]
    RuleUnknown { group: String, rule: String },
    #[error(
        "address {ip} of network {network} is already in use: pick another or let Keel choose"
    )]
    AddressInUse { network: String, ip: String },
    #[error("network {network} ({cidr}) has no free address left: delete VMs or NICs on it, or create a larger network")]
    NetworkFull { network: String, cidr: String },
    #[error("VM {vm} has no NIC with MAC {mac}: `keel vm show {vm}` lists its NICs")]
    NicUnknown { vm: String, mac: String },
    #[error("floating IP {ip} is not allocated: `keel fip list` shows the allocated ones")]
    FloatingIpUnknown { ip: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("the state store failed while applying: {detail}")]
    Store { detail: String },
}

/// Checks a DNS-label style name: 1-63 characters of `a-z`, `0-9` and `-`, not starting or
/// ending with `-`.
pub fn validate_name(field: &str, name: &str) -> Result<(), CommandError> {
    keel_base::names::check_name(name).map_err(|e| CommandError::Invalid {
        field: field.to_string(),
        reason: e.to_string(),
    })
}

/// A deterministic rejection of one field's value.
pub(crate) fn invalid(field: &str, reason: impl std::fmt::Display) -> CommandError {
    CommandError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

fn validate_addr(field: &str, addr: &str) -> Result<(), CommandError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|e| CommandError::Invalid {
            field: field.to_string(),
            reason: format!("{addr:?} is not an ip:port address ({e})"),
        })
}

fn validate_new_host(host: &NewHost) -> Result<(), CommandError> {
    validate_name("host name", &host.name)?;
    validate_addr("peer address", &host.peer_addr)?;
    validate_addr("api address", &host.api_addr)
}

// ---- typed table access -------------------------------------------------------------

fn store_err(e: impl std::fmt::Display) -> CommandError {
    CommandError::Store {
        detail: e.to_string(),
    }
}

pub fn get<T: Record>(conn: &Connection, key: &str) -> rusqlite::Result<Option<T>> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM objects WHERE kind = ?1 AND id = ?2",
            params![T::KIND, key],
            |row| row.get(0),
        )
        .optional()?;
    body.map(|b| serde_json::from_str(&b).map_err(json_to_sql))
        .transpose()
}

/// A record kind whose names are unique. Its name → id index lives beside it in the
/// objects table as [`NameEntry`] records of kind `NAME_KIND`, so names stay unique and a
/// lookup by name is one read.
pub(crate) trait Named: Record {
    /// The index's kind in the objects table (e.g. `vm_name`).
    const NAME_KIND: &'static str;
    fn id(&self) -> &str;
    fn name(&self) -> &str;
}

/// One entry of the name index of `T`: `{"name": …, "id": …}` under `T::NAME_KIND`.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) struct NameEntry<T> {
    name: String,
    id: String,
    #[serde(skip)]
    of: std::marker::PhantomData<fn() -> T>,
}

impl<T: Named> Record for NameEntry<T> {
    const KIND: &'static str = T::NAME_KIND;
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// Stores a named record together with its name index entry.
pub(crate) fn put_named<T: Named>(conn: &Connection, record: &T) -> Result<(), CommandError> {
    put(conn, record)?;
    put(
        conn,
        &NameEntry::<T> {
            name: record.name().to_owned(),
            id: record.id().to_owned(),
            of: std::marker::PhantomData,
        },
    )
}

/// Deletes a named record and its name index entry.
pub(crate) fn delete_named<T: Named>(conn: &Connection, record: &T) -> Result<(), CommandError> {
    delete::<NameEntry<T>>(conn, record.name())?;
    delete::<T>(conn, record.id())?;
    Ok(())
}

/// Finds a record by id, else by name through its name index.
pub(crate) fn find_by_id_or_name<T: Named>(
    conn: &Connection,
    id_or_name: &str,
) -> rusqlite::Result<Option<T>> {
    if let Some(found) = get::<T>(conn, id_or_name)? {
        return Ok(Some(found));
    }
    match get::<NameEntry<T>>(conn, id_or_name)? {
        Some(entry) => get::<T>(conn, &entry.id),
        None => Ok(None),
    }
}

/// Checks that a new record of kind `T` may take this id and name: the name is a DNS
/// label and neither is in use. `kind` names it in errors ("VM").
pub(crate) fn require_new_named<T: Named>(
    conn: &Connection,
    kind: &str,
    id: &str,
    name: &str,
) -> Result<(), CommandError> {
    validate_name(&format!("{kind} name"), name)?;
    if read::<NameEntry<T>>(conn, name)?.is_some() {
        return Err(CommandError::NameTaken {
            kind: kind.into(),
            name: name.into(),
        });
    }
    if read::<T>(conn, id)?.is_some() {
        return Err(CommandError::NameTaken {
            kind: format!("{kind} id"),
            name: id.into(),
        });
    }
    Ok(())
}

pub fn list<T: Record>(conn: &Connection) -> rusqlite::Result<Vec<T>> {
    let mut stmt = conn.prepare_cached("SELECT body FROM objects WHERE kind = ?1 ORDER BY id")?;
    let rows = stmt.query_map(params![T::KIND], |row| row.get::<_, String>(0))?;
    rows.map(|body| serde_json::from_str(&body?).map_err(json_to_sql))
        .collect()
}

fn put<T: Record>(conn: &Connection, record: &T) -> Result<(), CommandError> {
    let body = serde_json::to_string(record).map_err(store_err)?;
    conn.execute(
        "INSERT INTO objects (kind, id, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
        params![T::KIND, record.key(), body],
    )
    .map_err(store_err)?;
    Ok(())
}

fn delete<T: Record>(conn: &Connection, key: &str) -> Result<bool, CommandError> {
    conn.execute(
        "DELETE FROM objects WHERE kind = ?1 AND id = ?2",
        params![T::KIND, key],
    )
    .map(|n| n > 0)
    .map_err(store_err)
}

fn json_to_sql(e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn read<T: Record>(conn: &Connection, key: &str) -> Result<Option<T>, CommandError> {
    get(conn, key).map_err(store_err)
}

fn next_counter(conn: &Connection, name: &str, first: u64) -> Result<u64, CommandError> {
    let value = read::<Counter>(conn, name)?.map_or(first, |c| c.value);
    put(
        conn,
        &Counter {
            name: name.into(),
            value: value + 1,
        },
    )?;
    Ok(value)
}

pub fn host(conn: &Connection, id: NodeId) -> rusqlite::Result<Option<Host>> {
    get(conn, &host_key(id))
}

pub fn cluster_info(conn: &Connection) -> rusqlite::Result<Option<ClusterInfo>> {
    get(conn, "cluster")
}

// ---- applying ---------------------------------------------------------------------

/// Applies one command. Must be called inside the transaction that also records the entry
/// as applied. An `Err` is a deterministic rejection, not a storage failure; a storage
/// failure inside is reported as [`CommandError::Store`] and the caller must roll back and
/// fail the apply instead of recording it.
pub fn apply(conn: &Connection, command: &Command) -> Result<Outcome, CommandError> {
    match command {
        Command::InitCluster {
            info,
            ca_key,
            admin,
            zone,
            compute_cluster,
            first_host,
            now_ms,
        } => init_cluster(
            conn,
            info,
            ca_key,
            admin,
            zone,
            compute_cluster,
            first_host,
            *now_ms,
        ),
        Command::CreateJoinToken {
            token_id,
            secret_sha256,
            now_ms,
            expires_at_ms,
        } => create_join_token(conn, token_id, secret_sha256, *now_ms, *expires_at_ms),
        Command::ConsumeJoinToken {
            token_id,
            secret_sha256,
            key_fingerprint,
            host,
            now_ms,
        } => consume_join_token(
            conn,
            token_id,
            secret_sha256,
            key_fingerprint,
            host,
            *now_ms,
        ),
        Command::ReportInventory {
            host_id,
            inventory,
            now_ms,
        } => report_inventory(conn, *host_id, inventory, *now_ms),
        Command::SetHealth {
            host_id,
            health,
            now_ms,
        } => set_health(conn, *host_id, health, *now_ms),
        Command::RemoveHost { host_id } => remove_host(conn, *host_id),
        Command::PutSetting { key, value, now_ms } => put_setting(conn, key, value, *now_ms),
        Command::Compute { command } => compute(conn, command),
        Command::Network { command } => network(conn, command),
        Command::DeleteSetting { key } => delete_setting(conn, key),
    }
}

// One parameter per field of the command, as the dispatch destructures it.
#[allow(clippy::too_many_arguments)]
fn init_cluster(
    conn: &Connection,
    info: &ClusterInfo,
    ca_key: &CaKey,
    admin: &Credential,
    zone: &str,
    compute_cluster: &str,
    first_host: &NewHost,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    if let Some(existing) = read::<ClusterInfo>(conn, "cluster")? {
        return Err(CommandError::AlreadyInitialized {
            cluster_id: existing.cluster_id,
        });
    }
    validate_name("cluster name", &info.name)?;
    validate_name("zone name", zone)?;
    validate_name("compute cluster name", compute_cluster)?;
    validate_new_host(first_host)?;
    put(conn, info)?;
    put(conn, ca_key)?;
    put(conn, admin)?;
    put(
        conn,
        &Zone {
            name: zone.to_owned(),
        },
    )?;
    put(
        conn,
        &ComputeCluster {
            name: compute_cluster.to_owned(),
            zone: zone.to_owned(),
        },
    )?;
    let host_id = next_counter(conn, "node_id", 1)?;
    put(
        conn,
        &new_host_record(host_id, first_host, zone, compute_cluster, now_ms),
    )?;
    Ok(Outcome::HostJoined { host_id })
}

fn create_join_token(
    conn: &Connection,
    token_id: &str,
    secret_sha256: &str,
    now_ms: u64,
    expires_at_ms: u64,
) -> Result<Outcome, CommandError> {
    require_init(conn)?;
    if read::<JoinToken>(conn, token_id)?.is_some() {
        return Err(CommandError::NameTaken {
            kind: "join token".into(),
            name: token_id.to_owned(),
        });
    }
    if expires_at_ms <= now_ms {
        return Err(CommandError::Invalid {
            field: "ttl".into(),
            reason: "a join token must expire in the future".into(),
        });
    }
    put(
        conn,
        &JoinToken {
            id: token_id.to_owned(),
            secret_sha256: secret_sha256.to_owned(),
            created_at_ms: now_ms,
            expires_at_ms,
            consumed: None,
        },
    )?;
    Ok(Outcome::Done)
}

/// The most a join request's fields may hold; anything longer is refused before any work.
pub const MAX_TOKEN_ID_BYTES: usize = 64;
/// A PEM CSR for one EC or RSA key is well under this.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// What a valid join token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinCheck {
    /// The token is unused and the host may join.
    Fresh(JoinToken),
    /// The same key already joined with it (a retried join): that host.
    AlreadyJoined { host_id: u64 },
}

/// Checks a join request against the state without changing it: the leader runs this
/// before it proposes anything (so only a valid, unconsumed token leads to a raft write),
/// and the apply runs it again on the state it applies to.
pub fn check_join(
    conn: &Connection,
    token_id: &str,
    secret_sha256: &str,
    key_fingerprint: &str,
    host: &NewHost,
    now_ms: u64,
) -> Result<JoinCheck, CommandError> {
    require_init(conn)?;
    if token_id.is_empty() || token_id.len() > MAX_TOKEN_ID_BYTES {
        return Err(invalid(
            "token",
            format!("the token id must have 1 to {MAX_TOKEN_ID_BYTES} characters: copy the whole token again"),
        ));
    }
    let token = read::<JoinToken>(conn, token_id)?.ok_or_else(|| CommandError::TokenUnknown {
        token_id: token_id.to_owned(),
    })?;
    if !crate::token::digests_equal(&token.secret_sha256, secret_sha256) {
        return Err(CommandError::TokenSecretMismatch {
            token_id: token_id.to_owned(),
        });
    }
    if let Some(used) = &token.consumed {
        if used.key_fingerprint == *key_fingerprint {
            return Ok(JoinCheck::AlreadyJoined {
                host_id: used.host_id,
            });
        }
        return Err(CommandError::TokenUsed {
            token_id: token_id.to_owned(),
            host_id: used.host_id,
        });
    }
    if now_ms > token.expires_at_ms.saturating_add(TOKEN_EXPIRY_SKEW_MS) {
        return Err(CommandError::TokenExpired {
            token_id: token_id.to_owned(),
            expired_at_ms: token.expires_at_ms,
        });
    }
    validate_new_host(host)?;
    let hosts: Vec<Host> = list(conn).map_err(store_err)?;
    if hosts.iter().any(|h| h.name == host.name) {
        return Err(CommandError::NameTaken {
            kind: "host".into(),
            name: host.name.clone(),
        });
    }
    Ok(JoinCheck::Fresh(token))
}

fn consume_join_token(
    conn: &Connection,
    token_id: &str,
    secret_sha256: &str,
    key_fingerprint: &str,
    host: &NewHost,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut token = match check_join(conn, token_id, secret_sha256, key_fingerprint, host, now_ms)?
    {
        JoinCheck::AlreadyJoined { host_id } => return Ok(Outcome::HostJoined { host_id }),
        JoinCheck::Fresh(token) => token,
    };
    // A new host lands in the first zone and compute cluster; moving hosts between
    // them comes with the placement work.
    let zone = list::<Zone>(conn)
        .map_err(store_err)?
        .into_iter()
        .next()
        .map(|z| z.name)
        .ok_or(CommandError::NotInitialized)?;
    let cc = list::<ComputeCluster>(conn)
        .map_err(store_err)?
        .into_iter()
        .find(|c| c.zone == zone)
        .map(|c| c.name)
        .ok_or(CommandError::NotInitialized)?;
    let host_id = next_counter(conn, "node_id", 1)?;
    put(conn, &new_host_record(host_id, host, &zone, &cc, now_ms))?;
    token.consumed = Some(TokenUse {
        host_id,
        key_fingerprint: key_fingerprint.to_owned(),
        at_ms: now_ms,
    });
    put(conn, &token)?;
    Ok(Outcome::HostJoined { host_id })
}

fn report_inventory(
    conn: &Connection,
    host_id: NodeId,
    inventory: &Inventory,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut host = require_host(conn, host_id)?;
    if host.inventory.as_ref() == Some(inventory) {
        return Ok(Outcome::Unchanged);
    }
    host.inventory = Some(inventory.clone());
    host.inventory_at_ms = Some(now_ms);
    put(conn, &host)?;
    Ok(Outcome::Done)
}

fn set_health(
    conn: &Connection,
    host_id: NodeId,
    health: &Health,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut host = require_host(conn, host_id)?;
    if host.health == *health {
        return Ok(Outcome::Unchanged);
    }
    host.health = *health;
    host.health_since_ms = now_ms;
    put(conn, &host)?;
    Ok(Outcome::Done)
}

fn remove_host(conn: &Connection, host_id: NodeId) -> Result<Outcome, CommandError> {
    require_host(conn, host_id)?;
    compute::unplace_host_vms(conn, host_id)?;
    delete::<Host>(conn, &host_key(host_id))?;
    Ok(Outcome::Done)
}

fn put_setting(
    conn: &Connection,
    key: &str,
    value: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    require_init(conn)?;
    validate_setting_key(key)?;
    compute::validate_setting_value(key, value)?;
    network::validate_setting_value(key, value)?;
    if value.len() > MAX_SETTING_VALUE {
        return Err(CommandError::Invalid {
            field: "setting value".into(),
            reason: format!(
                "{} bytes is more than the {MAX_SETTING_VALUE} allowed",
                value.len()
            ),
        });
    }
    put(
        conn,
        &Setting {
            key: key.to_owned(),
            value: value.to_owned(),
            updated_at_ms: now_ms,
        },
    )?;
    Ok(Outcome::Done)
}

fn compute(conn: &Connection, command: &compute::ComputeCommand) -> Result<Outcome, CommandError> {
    compute::apply(conn, command)
}

fn network(conn: &Connection, command: &network::NetworkCommand) -> Result<Outcome, CommandError> {
    network::apply(conn, command)
}

fn delete_setting(conn: &Connection, key: &str) -> Result<Outcome, CommandError> {
    if delete::<Setting>(conn, key)? {
        Ok(Outcome::Done)
    } else {
        Err(CommandError::SettingUnknown {
            key: key.to_owned(),
        })
    }
}

fn require_init(conn: &Connection) -> Result<ClusterInfo, CommandError> {
    read::<ClusterInfo>(conn, "cluster")?.ok_or(CommandError::NotInitialized)
}

fn require_host(conn: &Connection, host_id: NodeId) -> Result<Host, CommandError> {
    read::<Host>(conn, &host_key(host_id))?.ok_or(CommandError::HostUnknown { host_id })
}

fn new_host_record(id: NodeId, host: &NewHost, zone: &str, cc: &str, now_ms: u64) -> Host {
    Host {
        id,
        name: host.name.clone(),
        zone: zone.to_string(),
        compute_cluster: cc.to_string(),
        peer_addr: host.peer_addr.clone(),
        api_addr: host.api_addr.clone(),
        witness: host.witness,
        joined_at_ms: now_ms,
        health: Health::Up,
        health_since_ms: now_ms,
        inventory: None,
        inventory_at_ms: None,
        maintenance: None,
    }
}

/// A fixed `InitCluster` command for the crate's unit tests.
#[cfg(test)]
pub(crate) fn test_init_command() -> Command {
    Command::InitCluster {
        info: ClusterInfo {
            cluster_id: "c1".into(),
            name: "lab".into(),
            created_at_ms: 1,
            ca_cert_pem: "pem".into(),
            ca_fingerprint: "fp".into(),
        },
        ca_key: CaKey {
            key_pem: "key".into(),
        },
        admin: Credential {
            name: "admin".into(),
            role: Role::Admin,
            token_sha256: "h".into(),
            created_at_ms: 1,
        },
        zone: "zone1".into(),
        compute_cluster: "cluster1".into(),
        first_host: NewHost {
            name: "n1".into(),
            peer_addr: "10.0.0.1:7400".into(),
            api_addr: "10.0.0.1:8443".into(),
            witness: false,
        },
        now_ms: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(SCHEMA).expect("schema");
        conn
    }

    fn new_host(name: &str, last: u8) -> NewHost {
        NewHost {
            name: name.into(),
            peer_addr: format!("10.0.0.{last}:7400"),
            api_addr: format!("10.0.0.{last}:8443"),
            witness: false,
        }
    }

    fn init(conn: &Connection) {
        assert_eq!(
            apply(conn, &test_init_command()),
            Ok(Outcome::HostJoined { host_id: 1 })
        );
    }

    fn token(conn: &Connection, id: &str, expires_at_ms: u64) {
        apply(
            conn,
            &Command::CreateJoinToken {
                token_id: id.into(),
                secret_sha256: "aa".into(),
                now_ms: 10,
                expires_at_ms,
            },
        )
        .expect("token");
    }

    fn consume(conn: &Connection, id: &str, key: &str, name: &str, now_ms: u64) -> Response {
        apply(
            conn,
            &Command::ConsumeJoinToken {
                token_id: id.into(),
                secret_sha256: "aa".into(),
                key_fingerprint: key.into(),
                host: new_host(name, 2),
                now_ms,
            },
        )
    }

    type Response = Result<Outcome, CommandError>;

    #[test]
    fn init_twice_is_rejected() {
        let conn = db();
        init(&conn);
        assert_eq!(
            apply(&conn, &test_init_command()),
            Err(CommandError::AlreadyInitialized {
                cluster_id: "c1".into()
            })
        );
        assert_eq!(list::<Host>(&conn).expect("hosts").len(), 1);
        let info = cluster_info(&conn).expect("read").expect("present");
        assert_eq!(info.cluster_id, "c1");
    }

    #[test]
    fn token_is_single_use_but_a_retry_by_the_same_key_is_idempotent() {
        let conn = db();
        init(&conn);
        token(&conn, "t1", 1_000);
        assert_eq!(
            consume(&conn, "t1", "k1", "n2", 20),
            Ok(Outcome::HostJoined { host_id: 2 })
        );
        assert_eq!(
            consume(&conn, "t1", "k1", "n2", 30),
            Ok(Outcome::HostJoined { host_id: 2 })
        );
        assert_eq!(
            consume(&conn, "t1", "k2", "n3", 30),
            Err(CommandError::TokenUsed {
                token_id: "t1".into(),
                host_id: 2
            })
        );
        assert_eq!(list::<Host>(&conn).expect("hosts").len(), 2);
    }

    #[test]
    fn expired_token_is_rejected_after_the_skew_grace_only() {
        let conn = db();
        init(&conn);
        token(&conn, "t1", 1_000);
        token(&conn, "t2", 1_000);
        // Within the grace: a clock a few seconds ahead still joins.
        assert!(consume(&conn, "t1", "k1", "n2", 1_000 + 5_000).is_ok());
        assert_eq!(
            consume(&conn, "t2", "k2", "n3", 1_000 + TOKEN_EXPIRY_SKEW_MS + 1),
            Err(CommandError::TokenExpired {
                token_id: "t2".into(),
                expired_at_ms: 1_000
            })
        );
        let t2: JoinToken = get(&conn, "t2").expect("read").expect("present");
        assert!(t2.consumed.is_none(), "a rejected join changes nothing");
    }

    #[test]
    fn wrong_secret_and_unknown_token_change_nothing() {
        let conn = db();
        init(&conn);
        token(&conn, "t1", 1_000);
        let wrong = apply(
            &conn,
            &Command::ConsumeJoinToken {
                token_id: "t1".into(),
                secret_sha256: "bb".into(),
                key_fingerprint: "k".into(),
                host: new_host("n2", 2),
                now_ms: 20,
            },
        );
        assert_eq!(
            wrong,
            Err(CommandError::TokenSecretMismatch {
                token_id: "t1".into()
            })
        );
        assert_eq!(
            consume(&conn, "nope", "k", "n2", 20),
            Err(CommandError::TokenUnknown {
                token_id: "nope".into()
            })
        );
        assert_eq!(list::<Host>(&conn).expect("hosts").len(), 1);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("n", "node-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a b", "a<b>", &"x".repeat(64)] {
            assert!(validate_name("n", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn settings_are_validated() {
        let conn = db();
        let put = |key: &str, value: &str| {
            apply(
                &conn,
                &Command::PutSetting {
                    key: key.into(),
                    value: value.into(),
                    now_ms: 5,
                },
            )
        };
        assert_eq!(put("a.b", "1"), Err(CommandError::NotInitialized));
        init(&conn);
        assert_eq!(put("placement.overcommit.cpu", "4"), Ok(Outcome::Done));
        assert!(matches!(
            put("Bad Key", "1"),
            Err(CommandError::Invalid { .. })
        ));
        assert!(matches!(
            put("a..b", "1"),
            Err(CommandError::Invalid { .. })
        ));
        let big = "x".repeat(MAX_SETTING_VALUE + 1);
        assert!(matches!(
            put("a.b", &big),
            Err(CommandError::Invalid { .. })
        ));
        let s: Setting = get(&conn, "placement.overcommit.cpu")
            .expect("read")
            .expect("present");
        assert_eq!(s.value, "4");
        assert_eq!(
            apply(&conn, &Command::DeleteSetting { key: "nope".into() }),
            Err(CommandError::SettingUnknown { key: "nope".into() })
        );
    }

    #[test]
    fn duplicate_host_name_is_rejected() {
        let conn = db();
        init(&conn);
        token(&conn, "t1", 1_000);
        assert_eq!(
            consume(&conn, "t1", "k1", "n1", 20),
            Err(CommandError::NameTaken {
                kind: "host".into(),
                name: "n1".into()
            })
        );
    }

    #[test]
    fn health_changes_are_recorded_once() {
        let conn = db();
        init(&conn);
        let set = |h| {
            apply(
                &conn,
                &Command::SetHealth {
                    host_id: 1,
                    health: h,
                    now_ms: 50,
                },
            )
        };
        assert_eq!(set(Health::Suspect), Ok(Outcome::Done));
        assert_eq!(set(Health::Suspect), Ok(Outcome::Unchanged));
        let h = host(&conn, 1).expect("read").expect("present");
        assert_eq!((h.health, h.health_since_ms), (Health::Suspect, 50));
    }
}
