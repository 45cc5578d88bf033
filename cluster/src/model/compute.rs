//! Compute records: virtual machines, templates, affinity groups and the asynchronous
//! operations that track a user's request until the hosts have carried it out.
//!
//! A VM's life, as the state records it (desired state on the left of each arrow is what a
//! user or the leader wrote; what moves it on is a host's report of what it observed):
//!
//! ```text
//!  CreateVm ──► unplaced ──PlaceVm (leader)──► placed on host H ──► H's reconciler
//!                 │  ▲                          │                    defines/starts/stops
//!   SetVmPending  │  └── (nothing fits: reason) │                    and reports ReportVm
//!   (reason shown)▼                             ▼
//!              pending                   observed ≈ desired ──► operations succeed
//!
//!  DeleteVm ──► deleting ──► H destroys, undefines, removes disks, reports `absent`
//!                            ──► record removed, delete operation succeeds
//! ```
//!
//! Operations (CloudStack's async jobs): every user request that a host must carry out
//! creates an [`Operation`] with a goal. Applying a host's report settles the VM's running
//! operations: a goal met succeeds it, a reported error fails it, a newer contrary request
//! cancels it. Everything here is deterministic: it reads only the command and the tables.

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::{
    delete, list, next_counter, put, read, require_host, require_init, store_err, validate_name,
    CommandError, Health, Host, Outcome, Record, Setting,
};
use crate::types::NodeId;

/// Largest vCPU count a VM may ask for.
pub const MAX_VCPUS: u32 = 256;
/// Smallest memory a VM may have.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest cloud-init user data accepted (NoCloud's own limit is the seed disk; this keeps
/// raft entries small).
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Most SSH keys per VM.
pub const MAX_SSH_KEYS: usize = 32;
/// Most data disks per VM (besides the root disk).
pub const MAX_DATA_DISKS: usize = 16;
/// Most NICs per VM.
pub const MAX_NICS: usize = 8;

/// Settings read by placement, with their defaults.
pub mod settings {
    /// vCPUs placed per physical CPU.
    pub const CPU_OVERCOMMIT: &str = "compute.cpu-overcommit";
    pub const CPU_OVERCOMMIT_DEFAULT: f64 = 4.0;
    /// Memory placed per byte of physical memory (after the reservation).
    pub const MEMORY_OVERCOMMIT: &str = "compute.memory-overcommit";
    pub const MEMORY_OVERCOMMIT_DEFAULT: f64 = 1.0;
    /// Memory kept for the host itself (node service, libvirt, Ceph).
    pub const MEMORY_RESERVED_MIB: &str = "compute.memory-reserved-mib";
    pub const MEMORY_RESERVED_MIB_DEFAULT: u64 = 1024;
    /// `spread` (least loaded host first) or `pack` (most loaded host that fits first).
    pub const PLACEMENT_STRATEGY: &str = "compute.placement-strategy";
    /// How long a finished operation stays readable (CloudStack's `job.expire.minutes`).
    pub const OPERATION_RETENTION_MINUTES: &str = "compute.operation-retention-minutes";
    pub const OPERATION_RETENTION_MINUTES_DEFAULT: u64 = 24 * 60;
    /// Longest retention accepted: a year.
    pub const OPERATION_RETENTION_MINUTES_MAX: u64 = 366 * 24 * 60;
}

/// Checks the value of a `compute.*` setting; other keys pass.
pub fn validate_setting_value(key: &str, value: &str) -> Result<(), CommandError> {
    let invalid = |reason: String| CommandError::Invalid {
        field: format!("setting {key}"),
        reason,
    };
    match key {
        settings::CPU_OVERCOMMIT | settings::MEMORY_OVERCOMMIT => match value.parse::<f64>() {
            Ok(v) if v.is_finite() && (0.1..=64.0).contains(&v) => Ok(()),
            _ => Err(invalid(format!(
                "{value:?} must be a number between 0.1 and 64"
            ))),
        },
        settings::MEMORY_RESERVED_MIB => value
            .parse::<u64>()
            .map(|_| ())
            .map_err(|_| invalid(format!("{value:?} must be a whole number of MiB"))),
        settings::OPERATION_RETENTION_MINUTES => match value.parse::<u64>() {
            Ok(v) if (1..=settings::OPERATION_RETENTION_MINUTES_MAX).contains(&v) => Ok(()),
            _ => Err(invalid(format!(
                "{value:?} must be a whole number of minutes from 1 to {}",
                settings::OPERATION_RETENTION_MINUTES_MAX
            ))),
        },
        settings::PLACEMENT_STRATEGY => match value {
            "spread" | "pack" => Ok(()),
            _ => Err(invalid(format!("{value:?} must be `spread` or `pack`"))),
        },
        _ => super::network::validate_setting_value(key, value),
    }
}

// ---- records ----------------------------------------------------------------------------

/// What a user asks a VM to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: BootSource,
    /// Size of the root disk; at least the template's virtual size. `None`: the template's.
    #[serde(default)]
    pub root_disk_gib: Option<u64>,
    /// Extra empty disks.
    #[serde(default)]
    pub data_disks: Vec<DataDisk>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub cloud_init: CloudInit,
    #[serde(default)]
    pub affinity_group: Option<String>,
    /// Restart elsewhere when the host fails (carried out by the HA work).
    #[serde(default)]
    pub ha: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BootSource {
    /// Boot from a copy-on-write overlay of a disk template. In a command `template` may
    /// be a name or an id; the stored spec always holds the id.
    Template { template: String },
    /// Boot an installer ISO template, with an empty root disk of `root_disk_gib`.
    Iso { template: String },
    /// Boot a kernel template directly (with an initrd template and a command line); the
    /// root disk is empty and only there if `root_disk_gib` is given.
    Kernel {
        template: String,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: String,
    },
}

/// Longest kernel command line accepted (Linux's own limit on x86 is 2048).
pub const MAX_CMDLINE: usize = 2048;

impl BootSource {
    /// The main template: the disk, the ISO or the kernel.
    pub fn template(&self) -> &str {
        match self {
            BootSource::Template { template }
            | BootSource::Iso { template }
            | BootSource::Kernel { template, .. } => template,
        }
    }

    /// Every template the VM needs on its host.
    pub fn templates(&self) -> Vec<&str> {
        match self {
            BootSource::Kernel {
                template,
                initrd: Some(initrd),
                ..
            } => vec![template, initrd],
            other => vec![other.template()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDisk {
    pub size_gib: u64,
}

/// A NIC: on a guest network (`network`), or on an existing bridge of the host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NicSpec {
    /// The host bridge. For a NIC on a guest network it is the network's bridge, filled
    /// in when the NIC is created.
    #[serde(default)]
    pub bridge: String,
    /// Allocated when the VM is created if not given.
    #[serde(default)]
    pub mac: Option<String>,
    /// The guest network (a name or id in a command; the stored spec holds the id).
    #[serde(default)]
    pub network: Option<String>,
    /// The NIC's address on its guest network: asked for, or leased from IPAM.
    #[serde(default)]
    pub ip: Option<String>,
    /// Security groups (names or ids in a command; ids once stored).
    #[serde(default)]
    pub security_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CloudInit {
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

/// The power state a user wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerIntent {
    Running,
    Stopped,
}

/// The run state a host observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
    Stopped,
    Crashed,
    /// Not defined on the host (before the first define, or after delete).
    Absent,
    Unknown,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShuttingDown => "shutting_down",
            RunState::Stopped => "stopped",
            RunState::Crashed => "crashed",
            RunState::Absent => "absent",
            RunState::Unknown => "unknown",
        })
    }
}

/// What a host last reported about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObserved {
    pub host: NodeId,
    pub state: RunState,
    /// When `state` was first seen.
    pub since_ms: u64,
    /// The spec generation the domain is defined from (0: not defined).
    pub generation: u64,
    /// The last reboot request the host carried out.
    pub reboot_seq: u64,
    /// The last failure acting on the VM; cleared by the next success.
    pub last_error: Option<String>,
    pub reported_at_ms: u64,
}

/// A virtual machine: desired state plus the last observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub spec: VmSpec,
    /// Bumped by every change of `spec`.
    pub generation: u64,
    pub power: PowerIntent,
    /// Seconds a graceful stop may take before the VM is powered off.
    pub stop_timeout_s: u32,
    /// Bumped by every reboot request.
    pub reboot_seq: u64,
    /// A forced reboot (reset) rather than stop-then-start.
    #[serde(default)]
    pub reboot_forced: bool,
    pub deleting: bool,
    /// The host the leader placed the VM on.
    pub host: Option<NodeId>,
    /// Why the VM is not placed yet.
    pub pending_reason: Option<String>,
    pub observed: Option<VmObserved>,
    /// Operations not finished yet.
    pub active_ops: Vec<String>,
    pub created_at_ms: u64,
    /// A move to another host in progress.
    #[serde(default)]
    pub migration: Option<VmMigration>,
}
impl Record for Vm {
    const KIND: &'static str = "vm";
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// A move of a VM between hosts: live while it runs (the guest keeps running), cold
/// (disks copied, then re-placed) while it is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMigration {
    pub target: NodeId,
    pub live: bool,
    pub started_at_ms: u64,
}

/// Name → id index, so names are unique and lookups by name are cheap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmName {
    name: String,
    id: String,
}
impl Record for VmName {
    const KIND: &'static str = "vm_name";
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl super::NameIndex for VmName {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Qcow2,
    Raw,
    Iso,
    /// A Linux kernel (bzImage) for direct kernel boot.
    Kernel,
    /// An initial ramdisk for direct kernel boot.
    Initrd,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Iso => "iso",
            ImageFormat::Kernel => "kernel",
            ImageFormat::Initrd => "initrd",
        }
    }
}

/// A disk image VMs boot from. The file lives in the image store of every host in
/// `replicas`; a host that needs it fetches it from one of them and verifies `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub format: ImageFormat,
    /// Bytes of the file.
    pub size_bytes: u64,
    /// What the guest sees (qcow2 virtual size; the file size for raw and ISO).
    pub virtual_size_bytes: u64,
    pub sha256: String,
    pub replicas: Vec<NodeId>,
    pub created_at_ms: u64,
}
impl Record for Template {
    const KIND: &'static str = "template";
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AffinityPolicy {
    /// Every member on the same host.
    Affinity,
    /// Every member on a different host.
    AntiAffinity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityGroup {
    pub name: String,
    pub policy: AffinityPolicy,
    pub created_at_ms: u64,
}
impl Record for AffinityGroup {
    const KIND: &'static str = "affinity_group";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    VmCreate,
    VmStart,
    VmStop,
    VmReboot,
    VmResize,
    VmDelete,
    VmMigrate,
    NicAttach,
    NicDetach,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// What has to be observed for an operation to succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OpGoal {
    /// Running from at least this spec generation.
    Running { generation: u64 },
    /// Stopped (defined) from at least this spec generation.
    Stopped { generation: u64 },
    /// The reboot request `seq` carried out and the VM running.
    Rebooted { seq: u64 },
    /// The VM record is gone.
    Deleted,
    /// Placed on `host` with no migration in flight.
    OnHost { host: NodeId },
}

/// An asynchronous request (CloudStack's async job): poll it by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub kind: OpKind,
    pub vm_id: String,
    pub vm_name: String,
    pub goal: OpGoal,
    pub state: OpState,
    /// Progress or the reason it failed or was cancelled.
    pub detail: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}
impl Record for Operation {
    const KIND: &'static str = "operation";
    fn key(&self) -> String {
        self.id.clone()
    }
}

// ---- reads ------------------------------------------------------------------------------

/// Finds a VM by id or name.
pub fn find_vm(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<Vm>> {
    super::find_by_id_or_name::<Vm, VmName>(conn, id_or_name)
}

/// Finds a template by id or name.
pub fn find_template(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<Template>> {
    if let Some(t) = super::get::<Template>(conn, id_or_name)? {
        return Ok(Some(t));
    }
    Ok(list::<Template>(conn)?
        .into_iter()
        .find(|t| t.name == id_or_name))
}

fn setting(conn: &Connection, key: &str) -> Result<Option<String>, CommandError> {
    Ok(read::<Setting>(conn, key)?.map(|s| s.value))
}

/// The ids of the operations that finished before `finished_before_ms`.
pub fn expired_operations(
    conn: &Connection,
    finished_before_ms: u64,
) -> rusqlite::Result<Vec<String>> {
    Ok(list::<Operation>(conn)?
        .into_iter()
        .filter(|o| o.state != OpState::Running && o.updated_at_ms < finished_before_ms)
        .map(|o| o.id)
        .collect())
}

/// How long finished operations are kept, in milliseconds (the setting, or its default).
pub fn operation_retention_ms(conn: &Connection) -> rusqlite::Result<u64> {
    let minutes = super::get::<Setting>(conn, settings::OPERATION_RETENTION_MINUTES)?
        .and_then(|s| s.value.parse::<u64>().ok())
        .unwrap_or(settings::OPERATION_RETENTION_MINUTES_DEFAULT);
    Ok(minutes.saturating_mul(60_000))
}

/// The placement settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementSettings {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub memory_reserved_mib: u64,
    pub pack: bool,
}

pub fn placement_settings(conn: &Connection) -> Result<PlacementSettings, CommandError> {
    let f = |key, default| -> Result<f64, CommandError> {
        Ok(setting(conn, key)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(default))
    };
    Ok(PlacementSettings {
        cpu_overcommit: f(settings::CPU_OVERCOMMIT, settings::CPU_OVERCOMMIT_DEFAULT)?,
        memory_overcommit: f(
            settings::MEMORY_OVERCOMMIT,
            settings::MEMORY_OVERCOMMIT_DEFAULT,
        )?,
        memory_reserved_mib: setting(conn, settings::MEMORY_RESERVED_MIB)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(settings::MEMORY_RESERVED_MIB_DEFAULT),
        pack: setting(conn, settings::PLACEMENT_STRATEGY)?.as_deref() == Some("pack"),
    })
}

/// One host's capacity and what placed VMs already hold of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCapacity {
    pub host_id: NodeId,
    pub host_name: String,
    pub vcpus_total: u32,
    pub vcpus_used: u32,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    /// Why VMs cannot go there at all right now (`None`: eligible).
    pub ineligible: Option<String>,
}

impl HostCapacity {
    pub fn fits(&self, vcpus: u32, memory_mib: u64) -> bool {
        self.vcpus_used.saturating_add(vcpus) <= self.vcpus_total
            && self.memory_used_mib.saturating_add(memory_mib) <= self.memory_total_mib
    }
}

/// Capacity of every host. A placed VM holds its vCPUs and memory on its host whether it
/// runs or not, so starting a stopped VM never finds its host full.
pub fn host_capacities(conn: &Connection) -> Result<Vec<HostCapacity>, CommandError> {
    let settings = placement_settings(conn)?;
    let hosts: Vec<Host> = list(conn).map_err(store_err)?;
    let vms: Vec<Vm> = list(conn).map_err(store_err)?;
    Ok(hosts
        .iter()
        .map(|h| {
            let (vcpus_used, memory_used_mib) = vms
                .iter()
                .filter(|vm| {
                    vm.host == Some(h.id) || vm.migration.as_ref().is_some_and(|m| m.target == h.id)
                })
                .fold((0u32, 0u64), |(c, m), vm| {
                    (c + vm.spec.vcpus, m + vm.spec.memory_mib)
                });
            let (cpus, mem_mib) = h
                .inventory
                .as_ref()
                .map_or((0, 0), |inv| (inv.cpus, inv.memory_bytes / (1024 * 1024)));
            let ineligible = if h.witness {
                Some("a witness runs no workloads".to_string())
            } else if h.health != Health::Up {
                Some(format!("host is {}", h.health))
            } else if h.maintenance.is_some() {
                Some("host is in maintenance".to_string())
            } else {
                match h.inventory.as_ref().and_then(|i| i.hypervisor.as_ref()) {
                    None => Some("host has not reported a hypervisor".to_string()),
                    Some(hv) => hv
                        .error
                        .as_ref()
                        .map(|e| format!("host's hypervisor is unavailable: {e}")),
                }
            };
            HostCapacity {
                host_id: h.id,
                host_name: h.name.clone(),
                vcpus_total: (f64::from(cpus) * settings.cpu_overcommit).floor() as u32,
                vcpus_used,
                memory_total_mib: (mem_mib.saturating_sub(settings.memory_reserved_mib) as f64
                    * settings.memory_overcommit)
                    .floor() as u64,
                memory_used_mib,
                ineligible,
            }
        })
        .collect())
}

/// Hosts a VM may be placed on and, if none, why not. Ordered best first by the weigher.
pub fn candidate_hosts(
    conn: &Connection,
    vm: &Vm,
) -> Result<Result<Vec<NodeId>, String>, CommandError> {
    let settings = placement_settings(conn)?;
    let capacities = host_capacities(conn)?;
    let group = match &vm.spec.affinity_group {
        Some(name) => read::<AffinityGroup>(conn, name)?,
        None => None,
    };
    let peers: Vec<Vm> = match &group {
        Some(g) => list::<Vm>(conn)
            .map_err(store_err)?
            .into_iter()
            .filter(|other| {
                other.id != vm.id
                    && !other.deleting
                    && other.spec.affinity_group.as_deref() == Some(g.name.as_str())
            })
            .collect(),
        None => Vec::new(),
    };
    let mut reasons: Vec<String> = Vec::new();
    let mut fitting: Vec<&HostCapacity> = Vec::new();
    for cap in &capacities {
        if let Some(why) = &cap.ineligible {
            reasons.push(format!("{}: {why}", cap.host_name));
            continue;
        }
        if let Some(g) = &group {
            let peer_here = peers.iter().any(|p| p.host == Some(cap.host_id));
            let peer_elsewhere = peers
                .iter()
                .any(|p| p.host.is_some() && p.host != Some(cap.host_id));
            match g.policy {
                AffinityPolicy::AntiAffinity if peer_here => {
                    reasons.push(format!(
                        "{}: already runs a member of anti-affinity group {}",
                        cap.host_name, g.name
                    ));
                    continue;
                }
                AffinityPolicy::Affinity if peer_elsewhere => {
                    reasons.push(format!(
                        "{}: affinity group {} lives on another host",
                        cap.host_name, g.name
                    ));
                    continue;
                }
                _ => {}
            }
        }
        if !cap.fits(vm.spec.vcpus, vm.spec.memory_mib) {
            reasons.push(format!(
                "{}: needs {} vCPUs and {} MiB, has {} vCPUs and {} MiB free",
                cap.host_name,
                vm.spec.vcpus,
                vm.spec.memory_mib,
                cap.vcpus_total.saturating_sub(cap.vcpus_used),
                cap.memory_total_mib.saturating_sub(cap.memory_used_mib)
            ));
            continue;
        }
        fitting.push(cap);
    }
    if fitting.is_empty() {
        if reasons.is_empty() {
            reasons.push("the cluster has no hosts".into());
        }
        return Ok(Err(format!("no host fits: {}", reasons.join("; "))));
    }
    // Weigher: the share of memory in use after placing (memory is the scarce resource
    // that cannot be overcommitted safely); spread takes the lowest, pack the highest.
    // Ties go to the lower host id so every run decides the same way.
    let load = |c: &HostCapacity| -> u64 {
        (c.memory_used_mib + vm.spec.memory_mib) * 1_000_000 / c.memory_total_mib.max(1)
    };
    fitting.sort_by(|a, b| {
        let (la, lb) = (load(a), load(b));
        let by_load = if settings.pack {
            lb.cmp(&la)
        } else {
            la.cmp(&lb)
        };
        by_load.then(a.host_id.cmp(&b.host_id))
    });
    Ok(Ok(fitting.iter().map(|c| c.host_id).collect()))
}

// ---- validation -------------------------------------------------------------------------

fn invalid(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn validate_size(vcpus: u32, memory_mib: u64) -> Result<(), CommandError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(invalid(
            "vcpus",
            format!("{vcpus} must be between 1 and {MAX_VCPUS}"),
        ));
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(invalid(
            "memory",
            format!("{memory_mib} MiB is less than the {MIN_MEMORY_MIB} MiB minimum"),
        ));
    }
    Ok(())
}

/// Rejects a size no eligible-or-not host could ever hold (as opposed to "full right now",
/// which leaves the VM pending).
fn validate_fits_some_host(
    conn: &Connection,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), CommandError> {
    let caps = host_capacities(conn)?;
    let workload_hosts: Vec<&HostCapacity> = caps
        .iter()
        .filter(|c| c.vcpus_total > 0 && c.memory_total_mib > 0)
        .collect();
    if workload_hosts.is_empty() {
        // No host has reported its inventory yet: nothing to compare with.
        return Ok(());
    }
    let max_mem = workload_hosts
        .iter()
        .map(|c| c.memory_total_mib)
        .max()
        .unwrap_or(0);
    if memory_mib > max_mem {
        return Err(invalid(
            "memory",
            format!(
                "{memory_mib} MiB is more than any host can hold (the largest takes {max_mem} MiB); ask for less"
            ),
        ));
    }
    let max_cpu = workload_hosts
        .iter()
        .map(|c| c.vcpus_total)
        .max()
        .unwrap_or(0);
    if vcpus > max_cpu {
        return Err(invalid(
            "vcpus",
            format!(
                "{vcpus} vCPUs is more than any host can hold (the largest takes {max_cpu}); ask for fewer"
            ),
        ));
    }
    Ok(())
}

fn validate_mac(mac: &str) -> Result<(), CommandError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(invalid(
            "mac",
            format!("{mac:?} is not a MAC address like 52:54:00:12:34:56"),
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(invalid("mac", format!("{mac:?} is a multicast address")));
    }
    Ok(())
}

fn validate_bridge(name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "bridge",
            format!("{name:?} is not a Linux interface name (1-15 of a-z, 0-9, '-', '_', '.')"),
        ))
    }
}

fn validate_ssh_key(key: &str) -> Result<(), CommandError> {
    let mut words = key.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let body = words.next().unwrap_or_default();
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if !known || body.is_empty() || key.contains(['\n', '\r']) || key.len() > 16 * 1024 {
        return Err(invalid(
            "ssh key",
            "must be one line of an OpenSSH public key (`ssh-ed25519 AAAA… comment`)",
        ));
    }
    Ok(())
}

/// Normalises and validates a requested spec: resolves the template to its id, fills MACs.
fn validate_spec(conn: &Connection, spec: &VmSpec, vm_id: &str) -> Result<VmSpec, CommandError> {
    let mut spec = spec.clone();
    validate_size(spec.vcpus, spec.memory_mib)?;
    let template = find_template(conn, spec.boot.template())
        .map_err(store_err)?
        .ok_or_else(|| CommandError::TemplateUnknown {
            template: spec.boot.template().to_string(),
        })?;
    let kind_error = |want: &str| {
        Err(invalid(
            "boot",
            format!(
                "template {} is a {} image: {want}",
                template.name,
                template.format.as_str()
            ),
        ))
    };
    match (&spec.boot, template.format) {
        (BootSource::Template { .. }, ImageFormat::Qcow2 | ImageFormat::Raw) => {}
        (BootSource::Template { .. }, _) => {
            return kind_error(
                "boot a disk template (qcow2 or raw), or pick the matching boot source",
            )
        }
        (BootSource::Iso { .. }, ImageFormat::Iso) => {
            if spec.root_disk_gib.is_none() {
                return Err(invalid(
                    "root disk",
                    "an ISO boot needs a root disk size to install onto",
                ));
            }
        }
        (BootSource::Iso { .. }, _) => return kind_error("an ISO boot needs an iso template"),
        (BootSource::Kernel { .. }, ImageFormat::Kernel) => {}
        (BootSource::Kernel { .. }, _) => {
            return kind_error("a kernel boot needs a kernel template")
        }
    }
    spec.boot = match spec.boot {
        BootSource::Template { .. } => BootSource::Template {
            template: template.id.clone(),
        },
        BootSource::Iso { .. } => BootSource::Iso {
            template: template.id.clone(),
        },
        BootSource::Kernel {
            initrd, cmdline, ..
        } => {
            if cmdline.len() > MAX_CMDLINE || cmdline.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    "cmdline",
                    format!("must be one line of at most {MAX_CMDLINE} characters"),
                ));
            }
            let initrd = match initrd {
                None => None,
                Some(name) => {
                    let t = find_template(conn, &name)
                        .map_err(store_err)?
                        .ok_or(CommandError::TemplateUnknown { template: name })?;
                    if t.format != ImageFormat::Initrd {
                        return Err(invalid(
                            "initrd",
                            format!(
                                "template {} is a {} image, not an initrd",
                                t.name,
                                t.format.as_str()
                            ),
                        ));
                    }
                    Some(t.id)
                }
            };
            BootSource::Kernel {
                template: template.id.clone(),
                initrd,
                cmdline,
            }
        }
    };
    if let Some(gib) = spec.root_disk_gib {
        let bytes = gib.saturating_mul(1 << 30);
        if gib == 0 || gib > 64 * 1024 {
            return Err(invalid(
                "root disk",
                format!("{gib} GiB must be between 1 and 65536"),
            ));
        }
        let overlay = matches!(template.format, ImageFormat::Qcow2 | ImageFormat::Raw);
        if overlay && bytes < template.virtual_size_bytes {
            return Err(invalid(
                "root disk",
                format!(
                    "{gib} GiB is smaller than template {}'s {} bytes",
                    template.name, template.virtual_size_bytes
                ),
            ));
        }
    }
    if spec.data_disks.len() > MAX_DATA_DISKS {
        return Err(invalid(
            "data disks",
            format!("at most {MAX_DATA_DISKS} data disks"),
        ));
    }
    if let Some(d) = spec
        .data_disks
        .iter()
        .find(|d| d.size_gib == 0 || d.size_gib > 64 * 1024)
    {
        return Err(invalid(
            "data disk",
            format!("{} GiB must be between 1 and 65536", d.size_gib),
        ));
    }
    if spec.nics.len() > MAX_NICS {
        return Err(invalid("nics", format!("at most {MAX_NICS} NICs")));
    }
    for nic in &mut spec.nics {
        complete_nic(conn, nic, vm_id)?;
    }
    if let Some(ud) = &spec.cloud_init.user_data {
        if ud.len() > MAX_USER_DATA {
            return Err(invalid(
                "user data",
                format!(
                    "{} bytes is more than the {MAX_USER_DATA} allowed",
                    ud.len()
                ),
            ));
        }
    }
    if spec.cloud_init.ssh_keys.len() > MAX_SSH_KEYS {
        return Err(invalid("ssh keys", format!("at most {MAX_SSH_KEYS} keys")));
    }
    for key in &spec.cloud_init.ssh_keys {
        validate_ssh_key(key)?;
    }
    if let Some(group) = &spec.affinity_group {
        if read::<AffinityGroup>(conn, group)?.is_none() {
            return Err(CommandError::AffinityGroupUnknown {
                group: group.clone(),
            });
        }
    }
    validate_fits_some_host(conn, spec.vcpus, spec.memory_mib)?;
    Ok(spec)
}

/// Validates a NIC and fills in what the cluster chooses: its MAC, and on a guest network
/// its bridge and leased address.
fn complete_nic(conn: &Connection, nic: &mut NicSpec, vm_id: &str) -> Result<(), CommandError> {
    if nic.network.is_none() {
        validate_bridge(&nic.bridge)?;
    }
    match &nic.mac {
        Some(mac) => {
            validate_mac(mac)?;
            nic.mac = Some(mac.to_ascii_lowercase());
        }
        None => {
            // 52:54:00 is qemu's locally administered prefix; the counter keeps MACs
            // unique across the cluster for 16 million NICs.
            let n = next_counter(conn, "mac", 1)?;
            nic.mac = Some(format!(
                "52:54:00:{:02x}:{:02x}:{:02x}",
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ));
        }
    }
    super::network::prepare_nic(conn, nic, vm_id)?;
    Ok(())
}

fn require_vm(conn: &Connection, vm: &str) -> Result<Vm, CommandError> {
    find_vm(conn, vm)
        .map_err(store_err)?
        .ok_or_else(|| CommandError::VmUnknown { vm: vm.to_string() })
}

/// For spec changes a host applies only by redefining the domain (a resize): the VM must
/// be stopped.
fn require_stopped_for(vm: &Vm, what: &str) -> Result<(), CommandError> {
    require_not_deleting(vm)?;
    let running = vm.power == PowerIntent::Running
        || vm
            .observed
            .as_ref()
            .is_some_and(|o| !matches!(o.state, RunState::Stopped | RunState::Absent));
    if running {
        return Err(CommandError::VmState {
            vm: vm.name.clone(),
            reason: format!("{what} needs the VM stopped: stop it first"),
        });
    }
    Ok(())
}

/// The goal of a NIC change (after the generation bump): the host hot-plugs the NIC into
/// a running domain, or redefines a stopped one, and reports the new generation in the
/// power state the VM is meant to be in.
fn nic_change_goal(vm: &Vm) -> OpGoal {
    match vm.power {
        PowerIntent::Running => OpGoal::Running {
            generation: vm.generation,
        },
        PowerIntent::Stopped => OpGoal::Stopped {
            generation: vm.generation,
        },
    }
}

fn require_not_deleting(vm: &Vm) -> Result<(), CommandError> {
    if vm.deleting {
        return Err(CommandError::VmDeleting {
            vm: vm.name.clone(),
        });
    }
    if let Some(m) = &vm.migration {
        return Err(CommandError::VmState {
            vm: vm.name.clone(),
            reason: format!(
                "it is moving to host {}: wait for the migration to finish",
                m.target
            ),
        });
    }
    Ok(())
}

// ---- operations -------------------------------------------------------------------------

fn new_op(
    conn: &Connection,
    id: &str,
    kind: OpKind,
    vm: &mut Vm,
    goal: OpGoal,
    now_ms: u64,
) -> Result<(), CommandError> {
    if read::<Operation>(conn, id)?.is_some() {
        return Err(CommandError::NameTaken {
            kind: "operation".into(),
            name: id.into(),
        });
    }
    // A new request cancels running requests it contradicts (a stop cancels a pending
    // start); requests it agrees with keep running and succeed together.
    for other_id in vm.active_ops.clone() {
        let Some(mut other) = read::<Operation>(conn, &other_id)? else {
            continue;
        };
        let contradicts = !matches!(
            (&other.goal, &goal),
            (OpGoal::Running { .. }, OpGoal::Running { .. })
                | (OpGoal::Stopped { .. }, OpGoal::Stopped { .. })
                | (OpGoal::Rebooted { .. }, OpGoal::Rebooted { .. })
                | (OpGoal::Deleted, OpGoal::Deleted)
        );
        if contradicts {
            other.state = OpState::Cancelled;
            other.detail = Some(format!("superseded by operation {id}"));
            other.updated_at_ms = now_ms;
            put(conn, &other)?;
            vm.active_ops.retain(|o| o != &other_id);
        }
    }
    put(
        conn,
        &Operation {
            id: id.into(),
            kind,
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            goal,
            state: OpState::Running,
            detail: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        },
    )?;
    vm.active_ops.push(id.into());
    Ok(())
}

fn goal_met(vm: &Vm, goal: &OpGoal) -> bool {
    let Some(obs) = &vm.observed else {
        return false;
    };
    if vm.host != Some(obs.host) {
        return false;
    }
    match goal {
        OpGoal::Running { generation } => {
            obs.state == RunState::Running && obs.generation >= *generation
        }
        OpGoal::Stopped { generation } => {
            obs.state == RunState::Stopped && obs.generation >= *generation
        }
        OpGoal::Rebooted { seq } => obs.state == RunState::Running && obs.reboot_seq >= *seq,
        OpGoal::Deleted => false,
        OpGoal::OnHost { host } => vm.host == Some(*host) && vm.migration.is_none(),
    }
}

/// Settles a VM's running operations against its latest state.
fn settle_ops(
    conn: &Connection,
    vm: &mut Vm,
    error: Option<&str>,
    now_ms: u64,
) -> Result<(), CommandError> {
    for op_id in vm.active_ops.clone() {
        let Some(mut op) = read::<Operation>(conn, &op_id)? else {
            vm.active_ops.retain(|o| o != &op_id);
            continue;
        };
        let before = (op.state, op.detail.clone());
        if goal_met(vm, &op.goal) {
            op.state = OpState::Succeeded;
            op.detail = None;
        } else if let Some(e) = error {
            op.state = OpState::Failed;
            op.detail = Some(e.to_string());
        } else if vm.host.is_none() {
            op.detail = vm
                .pending_reason
                .as_ref()
                .map(|r| format!("waiting for placement: {r}"));
        }
        if (op.state, op.detail.clone()) != before {
            op.updated_at_ms = now_ms;
            put(conn, &op)?;
        }
        if op.state != OpState::Running {
            vm.active_ops.retain(|o| o != &op_id);
        }
    }
    Ok(())
}

fn finish_deleted(conn: &Connection, vm: &Vm, now_ms: u64) -> Result<(), CommandError> {
    super::network::release_vm(conn, vm)?;
    for op_id in &vm.active_ops {
        if let Some(mut op) = read::<Operation>(conn, op_id)? {
            if op.goal == OpGoal::Deleted {
                op.state = OpState::Succeeded;
                op.detail = None;
            } else {
                op.state = OpState::Cancelled;
                op.detail = Some("the VM was deleted".into());
            }
            op.updated_at_ms = now_ms;
            put(conn, &op)?;
        }
    }
    delete::<Vm>(conn, &vm.id)?;
    delete::<VmName>(conn, &vm.name)?;
    Ok(())
}

// ---- applying ---------------------------------------------------------------------------

/// Compute commands; see [`super::Command`] for how they are carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ComputeCommand {
    CreateVm {
        vm_id: String,
        name: String,
        spec: VmSpec,
        start: bool,
        stop_timeout_s: u32,
        op_id: String,
        now_ms: u64,
    },
    SetVmPower {
        vm: String,
        power: PowerIntent,
        op_id: String,
        now_ms: u64,
    },
    RebootVm {
        vm: String,
        force: bool,
        op_id: String,
        now_ms: u64,
    },
    ResizeVm {
        vm: String,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        op_id: String,
        now_ms: u64,
    },
    DeleteVm {
        vm: String,
        op_id: String,
        now_ms: u64,
    },
    /// The leader's placement decision.
    PlaceVm {
        vm_id: String,
        host_id: NodeId,
        now_ms: u64,
    },
    /// The leader found no host; `reason` is shown to the user.
    SetVmPending {
        vm_id: String,
        reason: String,
        now_ms: u64,
    },
    /// A host's observation of a VM it runs (or ran).
    ReportVm {
        vm_id: String,
        host_id: NodeId,
        state: RunState,
        generation: u64,
        reboot_seq: u64,
        error: Option<String>,
        now_ms: u64,
    },
    CreateAffinityGroup {
        name: String,
        policy: AffinityPolicy,
        now_ms: u64,
    },
    DeleteAffinityGroup {
        name: String,
    },
    RegisterTemplate {
        template: Template,
    },
    /// A host now holds a verified copy of the template.
    AddTemplateReplica {
        template_id: String,
        host_id: NodeId,
    },
    DeleteTemplate {
        template: String,
    },
    /// Moves a VM to another host (`target`: chosen by the placement rules if `None`).
    MigrateVm {
        vm: String,
        target: Option<NodeId>,
        op_id: String,
        now_ms: u64,
    },
    /// The source host's account of a migration: done (`error` is `None`) or failed.
    FinishMigration {
        vm_id: String,
        target: NodeId,
        error: Option<String>,
        now_ms: u64,
    },
    /// Adds a NIC to a VM: hot-plugged while it runs, in its definition either way.
    AttachNic {
        vm: String,
        nic: NicSpec,
        op_id: String,
        now_ms: u64,
    },
    /// Removes a VM's NIC (by MAC; hot-unplugged while it runs) and frees its address.
    DetachNic {
        vm: String,
        mac: String,
        op_id: String,
        now_ms: u64,
    },
    /// Takes a host out of placement (`keel node drain`) or puts it back.
    SetHostMaintenance {
        host_id: NodeId,
        maintenance: bool,
        now_ms: u64,
    },
    /// Deletes the operations that finished (succeeded, failed or were cancelled) before
    /// `finished_before_ms`; running ones stay whatever their age. The leader's duty
    /// computes the cutoff from the retention setting, so every replica deletes the same.
    PruneOperations {
        finished_before_ms: u64,
    },
}

impl ComputeCommand {
    pub fn kind(&self) -> &'static str {
        match self {
            ComputeCommand::CreateVm { .. } => "create_vm",
            ComputeCommand::SetVmPower { .. } => "set_vm_power",
            ComputeCommand::RebootVm { .. } => "reboot_vm",
            ComputeCommand::ResizeVm { .. } => "resize_vm",
            ComputeCommand::DeleteVm { .. } => "delete_vm",
            ComputeCommand::PlaceVm { .. } => "place_vm",
            ComputeCommand::SetVmPending { .. } => "set_vm_pending",
            ComputeCommand::ReportVm { .. } => "report_vm",
            ComputeCommand::CreateAffinityGroup { .. } => "create_affinity_group",
            ComputeCommand::DeleteAffinityGroup { .. } => "delete_affinity_group",
            ComputeCommand::RegisterTemplate { .. } => "register_template",
            ComputeCommand::AddTemplateReplica { .. } => "add_template_replica",
            ComputeCommand::DeleteTemplate { .. } => "delete_template",
            ComputeCommand::MigrateVm { .. } => "migrate_vm",
            ComputeCommand::FinishMigration { .. } => "finish_migration",
            ComputeCommand::SetHostMaintenance { .. } => "set_host_maintenance",
            ComputeCommand::AttachNic { .. } => "attach_nic",
            ComputeCommand::DetachNic { .. } => "detach_nic",
            ComputeCommand::PruneOperations { .. } => "prune_operations",
        }
    }
}

pub(super) fn apply(conn: &Connection, command: &ComputeCommand) -> Result<Outcome, CommandError> {
    require_init(conn)?;
    match command {
        ComputeCommand::CreateVm {
            vm_id,
            name,
            spec,
            start,
            stop_timeout_s,
            op_id,
            now_ms,
        } => {
            super::require_new_named::<Vm, VmName>(conn, "VM", vm_id, name)?;
            if *stop_timeout_s > 3600 {
                return Err(invalid("stop timeout", "at most 3600 seconds"));
            }
            let spec = validate_spec(conn, spec, vm_id)?;
            let power = if *start {
                PowerIntent::Running
            } else {
                PowerIntent::Stopped
            };
            let mut vm = Vm {
                id: vm_id.clone(),
                name: name.clone(),
                spec,
                generation: 1,
                power,
                stop_timeout_s: *stop_timeout_s,
                reboot_seq: 0,
                reboot_forced: false,
                deleting: false,
                host: None,
                pending_reason: None,
                observed: None,
                active_ops: Vec::new(),
                created_at_ms: *now_ms,
                migration: None,
            };
            let goal = match power {
                PowerIntent::Running => OpGoal::Running { generation: 1 },
                PowerIntent::Stopped => OpGoal::Stopped { generation: 1 },
            };
            new_op(conn, op_id, OpKind::VmCreate, &mut vm, goal, *now_ms)?;
            put(conn, &vm)?;
            put(
                conn,
                &VmName {
                    name: name.clone(),
                    id: vm_id.clone(),
                },
            )?;
            Ok(Outcome::Created { id: vm_id.clone() })
        }
        ComputeCommand::SetVmPower {
            vm,
            power,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_not_deleting(&vm)?;
            let (kind, goal) = match power {
                PowerIntent::Running => (
                    OpKind::VmStart,
                    OpGoal::Running {
                        generation: vm.generation,
                    },
                ),
                PowerIntent::Stopped => (
                    OpKind::VmStop,
                    OpGoal::Stopped {
                        generation: vm.generation,
                    },
                ),
            };
            vm.power = *power;
            new_op(conn, op_id, kind, &mut vm, goal, *now_ms)?;
            settle_ops(conn, &mut vm, None, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::RebootVm {
            vm,
            force,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_not_deleting(&vm)?;
            if vm.power != PowerIntent::Running {
                return Err(CommandError::VmState {
                    vm: vm.name.clone(),
                    reason: "it is stopped: start it instead".into(),
                });
            }
            vm.reboot_seq += 1;
            vm.reboot_forced = *force;
            let goal = OpGoal::Rebooted { seq: vm.reboot_seq };
            new_op(conn, op_id, OpKind::VmReboot, &mut vm, goal, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::ResizeVm {
            vm,
            vcpus,
            memory_mib,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_stopped_for(&vm, "resizing")?;
            let new_vcpus = vcpus.unwrap_or(vm.spec.vcpus);
            let new_mem = memory_mib.unwrap_or(vm.spec.memory_mib);
            if (new_vcpus, new_mem) == (vm.spec.vcpus, vm.spec.memory_mib) {
                return Err(invalid("resize", "the new size equals the current size"));
            }
            validate_size(new_vcpus, new_mem)?;
            validate_fits_some_host(conn, new_vcpus, new_mem)?;
            if let Some(host) = vm.host {
                let cap = host_capacities(conn)?
                    .into_iter()
                    .find(|c| c.host_id == host);
                if let Some(cap) = cap {
                    let grow_cpu = new_vcpus.saturating_sub(vm.spec.vcpus);
                    let grow_mem = new_mem.saturating_sub(vm.spec.memory_mib);
                    if !cap.fits(grow_cpu, grow_mem) {
                        return Err(CommandError::VmState {
                            vm: vm.name.clone(),
                            reason: format!(
                                "host {} has no room for {new_vcpus} vCPUs and {new_mem} MiB",
                                cap.host_name
                            ),
                        });
                    }
                }
            }
            vm.spec.vcpus = new_vcpus;
            vm.spec.memory_mib = new_mem;
            vm.generation += 1;
            let goal = OpGoal::Stopped {
                generation: vm.generation,
            };
            new_op(conn, op_id, OpKind::VmResize, &mut vm, goal, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::AttachNic {
            vm,
            nic,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_not_deleting(&vm)?;
            if vm.spec.nics.len() >= MAX_NICS {
                return Err(invalid("nics", format!("at most {MAX_NICS} NICs")));
            }
            let mut nic = nic.clone();
            complete_nic(conn, &mut nic, &vm.id)?;
            if vm.spec.nics.iter().any(|n| n.mac == nic.mac) {
                return Err(CommandError::NameTaken {
                    kind: "MAC address".into(),
                    name: nic.mac.clone().unwrap_or_default(),
                });
            }
            vm.spec.nics.push(nic);
            vm.generation += 1;
            let goal = nic_change_goal(&vm);
            new_op(conn, op_id, OpKind::NicAttach, &mut vm, goal, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::DetachNic {
            vm,
            mac,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_not_deleting(&vm)?;
            let Some(pos) = vm.spec.nics.iter().position(|n| {
                n.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            }) else {
                return Err(CommandError::NicUnknown {
                    vm: vm.name.clone(),
                    mac: mac.clone(),
                });
            };
            let nic = vm.spec.nics.remove(pos);
            super::network::release_nic(conn, &nic)?;
            vm.generation += 1;
            let goal = nic_change_goal(&vm);
            new_op(conn, op_id, OpKind::NicDetach, &mut vm, goal, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::DeleteVm { vm, op_id, now_ms } => {
            let mut vm = require_vm(conn, vm)?;
            if let Some(m) = &vm.migration {
                return Err(CommandError::VmState {
                    vm: vm.name.clone(),
                    reason: format!(
                        "it is moving to host {}: wait for the migration to finish",
                        m.target
                    ),
                });
            }
            if vm.deleting {
                // Deleting again joins the running delete.
                new_op(
                    conn,
                    op_id,
                    OpKind::VmDelete,
                    &mut vm,
                    OpGoal::Deleted,
                    *now_ms,
                )?;
                put(conn, &vm)?;
                return Ok(Outcome::Created { id: vm.id });
            }
            vm.deleting = true;
            new_op(
                conn,
                op_id,
                OpKind::VmDelete,
                &mut vm,
                OpGoal::Deleted,
                *now_ms,
            )?;
            if vm.host.is_none() {
                // Never placed: nothing exists on any host.
                finish_deleted(conn, &vm, *now_ms)?;
            } else {
                put(conn, &vm)?;
            }
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::PlaceVm {
            vm_id,
            host_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm_id)?;
            if vm.deleting || vm.host.is_some() {
                return Ok(Outcome::Unchanged);
            }
            require_host(conn, *host_id)?;
            match candidate_hosts(conn, &vm)? {
                Ok(hosts) if hosts.contains(host_id) => {}
                Ok(_) | Err(_) => {
                    return Err(CommandError::VmState {
                        vm: vm.name.clone(),
                        reason: format!("host {host_id} no longer fits it"),
                    })
                }
            }
            vm.host = Some(*host_id);
            vm.pending_reason = None;
            settle_ops(conn, &mut vm, None, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::SetVmPending {
            vm_id,
            reason,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm_id)?;
            if vm.host.is_some() || vm.pending_reason.as_deref() == Some(reason) {
                return Ok(Outcome::Unchanged);
            }
            vm.pending_reason = Some(reason.clone());
            settle_ops(conn, &mut vm, None, *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::ReportVm {
            vm_id,
            host_id,
            state,
            generation,
            reboot_seq,
            error,
            now_ms,
        } => {
            let Some(mut vm) = read::<Vm>(conn, vm_id)? else {
                return Ok(Outcome::Unchanged);
            };
            if vm.host != Some(*host_id) {
                // A report from a host the VM is no longer placed on.
                return Ok(Outcome::Unchanged);
            }
            if vm.deleting && *state == RunState::Absent && error.is_none() {
                finish_deleted(conn, &vm, *now_ms)?;
                return Ok(Outcome::Done);
            }
            let since_ms = match &vm.observed {
                Some(o) if o.state == *state && o.host == *host_id => o.since_ms,
                _ => *now_ms,
            };
            let observed = VmObserved {
                host: *host_id,
                state: *state,
                since_ms,
                generation: *generation,
                reboot_seq: *reboot_seq,
                last_error: error.clone(),
                reported_at_ms: *now_ms,
            };
            vm.observed = Some(observed);
            settle_ops(conn, &mut vm, error.as_deref(), *now_ms)?;
            put(conn, &vm)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::CreateAffinityGroup {
            name,
            policy,
            now_ms,
        } => {
            validate_name("affinity group name", name)?;
            if read::<AffinityGroup>(conn, name)?.is_some() {
                return Err(CommandError::NameTaken {
                    kind: "affinity group".into(),
                    name: name.clone(),
                });
            }
            put(
                conn,
                &AffinityGroup {
                    name: name.clone(),
                    policy: *policy,
                    created_at_ms: *now_ms,
                },
            )?;
            Ok(Outcome::Created { id: name.clone() })
        }
        ComputeCommand::DeleteAffinityGroup { name } => {
            if read::<AffinityGroup>(conn, name)?.is_none() {
                return Err(CommandError::AffinityGroupUnknown {
                    group: name.clone(),
                });
            }
            let members: Vec<String> = list::<Vm>(conn)
                .map_err(store_err)?
                .into_iter()
                .filter(|vm| vm.spec.affinity_group.as_deref() == Some(name.as_str()))
                .map(|vm| vm.name)
                .collect();
            if !members.is_empty() {
                return Err(CommandError::InUse {
                    what: format!("affinity group {name}"),
                    users: members,
                });
            }
            delete::<AffinityGroup>(conn, name)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::RegisterTemplate { template } => {
            validate_name("template name", &template.name)?;
            if find_template(conn, &template.name)
                .map_err(store_err)?
                .is_some()
            {
                return Err(CommandError::NameTaken {
                    kind: "template".into(),
                    name: template.name.clone(),
                });
            }
            if read::<Template>(conn, &template.id)?.is_some() {
                return Err(CommandError::NameTaken {
                    kind: "template id".into(),
                    name: template.id.clone(),
                });
            }
            if template.sha256.len() != 64
                || !template.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(invalid("sha256", "must be 64 hex digits"));
            }
            for host in &template.replicas {
                require_host(conn, *host)?;
            }
            put(conn, template)?;
            Ok(Outcome::Created {
                id: template.id.clone(),
            })
        }
        ComputeCommand::AddTemplateReplica {
            template_id,
            host_id,
        } => {
            let Some(mut t) = read::<Template>(conn, template_id)? else {
                return Err(CommandError::TemplateUnknown {
                    template: template_id.clone(),
                });
            };
            if t.replicas.contains(host_id) {
                return Ok(Outcome::Unchanged);
            }
            require_host(conn, *host_id)?;
            t.replicas.push(*host_id);
            t.replicas.sort_unstable();
            put(conn, &t)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::MigrateVm {
            vm,
            target,
            op_id,
            now_ms,
        } => {
            let mut vm = require_vm(conn, vm)?;
            require_not_deleting(&vm)?;
            let source = vm.host.ok_or_else(|| CommandError::VmState {
                vm: vm.name.clone(),
                reason: "it is not placed on any host yet".into(),
            })?;
            if let Some(m) = &vm.migration {
                return Err(CommandError::VmState {
                    vm: vm.name.clone(),
                    reason: format!("it is already moving to host {}", m.target),
                });
            }
            let observed = vm
                .observed
                .as_ref()
                .filter(|o| o.host == source)
                .map(|o| o.state);
            let live = match (vm.power, observed) {
                (PowerIntent::Running, Some(RunState::Running)) => true,
                (PowerIntent::Stopped, Some(RunState::Stopped)) => false,
                _ => {
                    return Err(CommandError::VmState {
                        vm: vm.name.clone(),
                        reason: "it is starting or stopping: wait until it is running or stopped"
                            .into(),
                    })
                }
            };
            let candidates = candidate_hosts(conn, &vm)?;
            let target = match (target, candidates) {
                (Some(t), _) if *t == source => {
                    return Err(invalid(
                        "target",
                        format!("the VM already runs on host {t}"),
                    ))
                }
                (Some(t), Ok(hosts)) if hosts.contains(t) => *t,
                (Some(t), _) => {
                    require_host(conn, *t)?;
                    let why = candidate_hosts(conn, &vm)?
                        .err()
                        .unwrap_or_else(|| "it does not pass the placement filters".into());
                    return Err(CommandError::VmState {
                        vm: vm.name.clone(),
                        reason: format!("host {t} cannot take it: {why}"),
                    });
                }
                (None, Ok(hosts)) => match hosts.into_iter().find(|h| *h != source) {
                    Some(h) => h,
                    None => {
                        return Err(CommandError::VmState {
                            vm: vm.name.clone(),
                            reason: "no other host can take it".into(),
                        })
                    }
                },
                (None, Err(why)) => {
                    return Err(CommandError::VmState {
                        vm: vm.name.clone(),
                        reason: format!("no other host can take it: {why}"),
                    })
                }
            };
            vm.migration = Some(VmMigration {
                target,
                live,
                started_at_ms: *now_ms,
            });
            new_op(
                conn,
                op_id,
                OpKind::VmMigrate,
                &mut vm,
                OpGoal::OnHost { host: target },
                *now_ms,
            )?;
            put(conn, &vm)?;
            Ok(Outcome::Created { id: vm.id })
        }
        ComputeCommand::FinishMigration {
            vm_id,
            target,
            error,
            now_ms,
        } => {
            let Some(mut vm) = read::<Vm>(conn, vm_id)? else {
                return Ok(Outcome::Unchanged);
            };
            if vm.migration.as_ref().map(|m| m.target) != Some(*target) {
                return Ok(Outcome::Unchanged);
            }
            let live = vm.migration.as_ref().is_some_and(|m| m.live);
            vm.migration = None;
            match error {
                None => {
                    vm.host = Some(*target);
                    vm.observed = Some(VmObserved {
                        host: *target,
                        state: if live {
                            RunState::Running
                        } else {
                            RunState::Absent
                        },
                        since_ms: *now_ms,
                        generation: if live { vm.generation } else { 0 },
                        reboot_seq: vm.reboot_seq,
                        last_error: None,
                        reported_at_ms: *now_ms,
                    });
                    settle_ops(conn, &mut vm, None, *now_ms)?;
                }
                Some(e) => {
                    settle_ops(
                        conn,
                        &mut vm,
                        Some(&format!("migration failed: {e}")),
                        *now_ms,
                    )?;
                }
            }
            put(conn, &vm)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::SetHostMaintenance {
            host_id,
            maintenance,
            now_ms,
        } => {
            let mut host = require_host(conn, *host_id)?;
            let want = maintenance.then_some(super::Maintenance { since_ms: *now_ms });
            if host.maintenance.is_some() == *maintenance {
                return Ok(Outcome::Unchanged);
            }
            host.maintenance = want;
            put(conn, &host)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::DeleteTemplate { template } => {
            let t = find_template(conn, template)
                .map_err(store_err)?
                .ok_or_else(|| CommandError::TemplateUnknown {
                    template: template.clone(),
                })?;
            let users: Vec<String> = list::<Vm>(conn)
                .map_err(store_err)?
                .into_iter()
                .filter(|vm| vm.spec.boot.templates().contains(&t.id.as_str()))
                .map(|vm| vm.name)
                .collect();
            if !users.is_empty() {
                return Err(CommandError::InUse {
                    what: format!("template {}", t.name),
                    users,
                });
            }
            delete::<Template>(conn, &t.id)?;
            Ok(Outcome::Done)
        }
        ComputeCommand::PruneOperations { finished_before_ms } => {
            let expired = expired_operations(conn, *finished_before_ms).map_err(store_err)?;
            for id in &expired {
                delete::<Operation>(conn, id)?;
            }
            Ok(if expired.is_empty() {
                Outcome::Unchanged
            } else {
                Outcome::Done
            })
        }
    }
}

/// Removes a deleted host's placements: its VMs become unplaced (the HA work restarts them
/// elsewhere; until then they wait for placement like new VMs).
pub(super) fn unplace_host_vms(conn: &Connection, host_id: NodeId) -> Result<(), CommandError> {
    for mut vm in list::<Vm>(conn).map_err(store_err)? {
        if vm.host == Some(host_id) {
            if vm.deleting {
                finish_deleted(conn, &vm, vm.created_at_ms)?;
                continue;
            }
            vm.host = None;
            vm.observed = None;
            put(conn, &vm)?;
        }
    }
    for mut t in list::<Template>(conn).map_err(store_err)? {
        if t.replicas.contains(&host_id) {
            t.replicas.retain(|h| *h != host_id);
            put(conn, &t)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{
        apply as apply_cmd, test_init_command, Command, HypervisorReport, Inventory, SCHEMA,
    };
    use super::*;

    fn db_with_hosts(n: u64) -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(SCHEMA).expect("schema");
        apply_cmd(&conn, &test_init_command()).expect("init");
        for id in 1..=n {
            let mut host = super::super::host(&conn, id)
                .expect("read")
                .unwrap_or_else(|| {
                    let mut h = super::super::host(&conn, 1).expect("read").expect("host 1");
                    h.id = id;
                    h.name = format!("n{id}");
                    h
                });
            host.inventory = Some(Inventory {
                cpus: 2,
                memory_bytes: 8 << 30,
                hypervisor: Some(HypervisorReport {
                    domain_type: "qemu".into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            put(&conn, &host).expect("put host");
        }
        template(&conn, "tiny");
        conn
    }

    fn template(conn: &Connection, name: &str) {
        run(
            conn,
            ComputeCommand::RegisterTemplate {
                template: Template {
                    id: format!("t-{name}"),
                    name: name.into(),
                    format: ImageFormat::Qcow2,
                    size_bytes: 10 << 20,
                    virtual_size_bytes: 64 << 20,
                    sha256: "a".repeat(64),
                    replicas: vec![1],
                    created_at_ms: 1,
                },
            },
        )
        .expect("template");
    }

    fn run(conn: &Connection, command: ComputeCommand) -> Result<Outcome, CommandError> {
        apply_cmd(conn, &Command::Compute { command })
    }

    fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
        VmSpec {
            vcpus,
            memory_mib,
            boot: BootSource::Template {
                template: "tiny".into(),
            },
            root_disk_gib: None,
            data_disks: vec![],
            nics: vec![],
            cloud_init: CloudInit::default(),
            affinity_group: None,
            ha: false,
        }
    }

    fn create(conn: &Connection, name: &str, spec: VmSpec) -> Result<Outcome, CommandError> {
        run(
            conn,
            ComputeCommand::CreateVm {
                vm_id: format!("id-{name}"),
                name: name.into(),
                spec,
                start: true,
                stop_timeout_s: 30,
                op_id: format!("op-create-{name}"),
                now_ms: 10,
            },
        )
    }

    /// Asks for VM `name` to be stopped, as operation `op_id`.
    fn stop(conn: &Connection, name: &str, op_id: &str, now_ms: u64) {
        run(
            conn,
            ComputeCommand::SetVmPower {
                vm: name.into(),
                power: PowerIntent::Stopped,
                op_id: op_id.into(),
                now_ms,
            },
        )
        .expect("stop");
    }

    fn vm(conn: &Connection, name: &str) -> Vm {
        find_vm(conn, name).expect("read").expect("vm exists")
    }

    fn op(conn: &Connection, id: &str) -> Operation {
        read::<Operation>(conn, id)
            .expect("read")
            .expect("op exists")
    }

    fn place_all(conn: &Connection) {
        let vms: Vec<Vm> = list(conn).expect("list");
        for vm in vms.into_iter().filter(|v| v.host.is_none() && !v.deleting) {
            match candidate_hosts(conn, &vm).expect("candidates") {
                Ok(hosts) => {
                    run(
                        conn,
                        ComputeCommand::PlaceVm {
                            vm_id: vm.id.clone(),
                            host_id: hosts[0],
                            now_ms: 20,
                        },
                    )
                    .expect("place");
                }
                Err(reason) => {
                    run(
                        conn,
                        ComputeCommand::SetVmPending {
                            vm_id: vm.id.clone(),
                            reason,
                            now_ms: 20,
                        },
                    )
                    .expect("pending");
                }
            }
        }
    }

    fn report(
        conn: &Connection,
        name: &str,
        state: RunState,
        generation: u64,
        error: Option<&str>,
    ) {
        let v = vm(conn, name);
        run(
            conn,
            ComputeCommand::ReportVm {
                vm_id: v.id.clone(),
                host_id: v.host.expect("placed"),
                state,
                generation,
                reboot_seq: v.reboot_seq,
                error: error.map(String::from),
                now_ms: 30,
            },
        )
        .expect("report");
    }

    fn vm_count(conn: &Connection) -> usize {
        list::<Vm>(conn).expect("list").len()
    }

    #[test]
    fn bad_specs_are_rejected_and_nothing_is_created() {
        let conn = db_with_hosts(3);
        let bad: Vec<(&str, VmSpec, &str)> = vec![
            ("zero", spec(0, 128), "vcpus"),
            ("huge", spec(1, 1 << 20), "more than any host"),
            (
                "notemplate",
                VmSpec {
                    boot: BootSource::Template {
                        template: "nope".into(),
                    },
                    ..spec(1, 128)
                },
                "template \"nope\" does not exist",
            ),
            ("a'/><evil", spec(1, 128), "may only contain"),
            (
                "badkey",
                VmSpec {
                    cloud_init: CloudInit {
                        user_data: None,
                        ssh_keys: vec!["not a key\nx".into()],
                    },
                    ..spec(1, 128)
                },
                "OpenSSH public key",
            ),
        ];
        for (name, s, want) in bad {
            let err = create(&conn, name, s).expect_err(name).to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        assert_eq!(vm_count(&conn), 0);
        assert!(list::<Operation>(&conn).expect("ops").is_empty());
        create(&conn, "web", spec(1, 128)).expect("first");
        let err = create(&conn, "web", spec(1, 128))
            .expect_err("dup")
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(vm_count(&conn), 1);
    }

    #[test]
    fn a_create_succeeds_when_the_host_reports_it_running() {
        let conn = db_with_hosts(1);
        create(&conn, "web", spec(1, 128)).expect("create");
        assert_eq!(op(&conn, "op-create-web").state, OpState::Running);
        place_all(&conn);
        assert_eq!(vm(&conn, "web").host, Some(1));
        report(&conn, "web", RunState::Stopped, 1, None);
        assert_eq!(op(&conn, "op-create-web").state, OpState::Running);
        report(&conn, "web", RunState::Running, 1, None);
        assert_eq!(op(&conn, "op-create-web").state, OpState::Succeeded);
        assert!(vm(&conn, "web").active_ops.is_empty());
    }

    #[test]
    fn a_reported_error_fails_the_operation_and_a_stop_cancels_a_start() {
        let conn = db_with_hosts(1);
        create(&conn, "a", spec(1, 128)).expect("create");
        place_all(&conn);
        report(&conn, "a", RunState::Absent, 0, Some("define failed: boom"));
        let o = op(&conn, "op-create-a");
        assert_eq!(o.state, OpState::Failed);
        assert!(o.detail.as_deref().unwrap_or("").contains("boom"));

        create(&conn, "b", spec(1, 128)).expect("create");
        stop(&conn, "b", "op-stop-b", 40);
        assert_eq!(op(&conn, "op-create-b").state, OpState::Cancelled);
        place_all(&conn);
        report(&conn, "b", RunState::Stopped, 1, None);
        assert_eq!(op(&conn, "op-stop-b").state, OpState::Succeeded);
    }

    #[test]
    fn finished_operations_are_pruned_by_age_and_running_ones_stay() {
        let conn = db_with_hosts(1);
        create(&conn, "a", spec(1, 128)).expect("create");
        place_all(&conn);
        report(&conn, "a", RunState::Absent, 0, Some("define failed")); // failed at 30
        create(&conn, "b", spec(1, 128)).expect("create");
        stop(&conn, "b", "op-stop-b", 40); // op-create-b cancelled at 40
        place_all(&conn);
        report(&conn, "b", RunState::Stopped, 1, None); // op-stop-b succeeded at 30
        create(&conn, "c", spec(1, 128)).expect("create"); // running, created at 10
        let ids = |conn: &Connection| -> Vec<String> {
            let mut ids: Vec<String> = list::<Operation>(conn)
                .expect("ops")
                .into_iter()
                .map(|o| o.id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(
            expired_operations(&conn, 35).expect("read"),
            vec!["op-create-a".to_string(), "op-stop-b".to_string()]
        );
        let prune = |before| {
            run(
                &conn,
                ComputeCommand::PruneOperations {
                    finished_before_ms: before,
                },
            )
            .expect("prune")
        };
        assert_eq!(prune(35), Outcome::Done);
        assert_eq!(ids(&conn), vec!["op-create-b", "op-create-c"]);
        assert_eq!(prune(35), Outcome::Unchanged);
        assert_eq!(prune(u64::MAX), Outcome::Done);
        assert_eq!(ids(&conn), vec!["op-create-c"]);
        assert_eq!(op(&conn, "op-create-c").state, OpState::Running);
        assert_eq!(vm(&conn, "c").active_ops, vec!["op-create-c".to_string()]);
    }

    #[test]
    fn operation_retention_is_a_validated_setting() {
        let key = settings::OPERATION_RETENTION_MINUTES;
        assert!(validate_setting_value(key, "1").is_ok());
        assert!(validate_setting_value(key, "1440").is_ok());
        for bad in ["0", "-5", "1.5", "forever", "527041"] {
            let err = validate_setting_value(key, bad).expect_err(bad).to_string();
            assert!(err.contains("whole number of minutes"), "{bad}: {err}");
        }
        let conn = db_with_hosts(1);
        assert_eq!(operation_retention_ms(&conn).expect("read"), 24 * 3_600_000);
    }

    #[test]
    fn anti_affinity_spreads_and_what_does_not_fit_stays_pending_with_a_reason() {
        let conn = db_with_hosts(3);
        run(
            &conn,
            ComputeCommand::CreateAffinityGroup {
                name: "web".into(),
                policy: AffinityPolicy::AntiAffinity,
                now_ms: 1,
            },
        )
        .expect("group");
        for i in 0..4 {
            let s = VmSpec {
                affinity_group: Some("web".into()),
                ..spec(1, 128)
            };
            create(&conn, &format!("w{i}"), s).expect("create");
            place_all(&conn);
        }
        let hosts: BTreeSetOf = (0..3).map(|i| vm(&conn, &format!("w{i}")).host).collect();
        assert_eq!(hosts.len(), 3, "three members on three hosts: {hosts:?}");
        let last = vm(&conn, "w3");
        assert_eq!(last.host, None);
        let reason = last.pending_reason.expect("reason");
        assert!(reason.contains("anti-affinity group web"), "{reason}");
        assert!(op(&conn, "op-create-w3")
            .detail
            .expect("detail")
            .contains("waiting for placement"));
        let err = run(
            &conn,
            ComputeCommand::DeleteAffinityGroup { name: "web".into() },
        )
        .expect_err("in use")
        .to_string();
        assert!(err.contains("w0"), "{err}");
    }

    type BTreeSetOf = std::collections::BTreeSet<Option<NodeId>>;

    #[test]
    fn capacity_is_held_by_placed_vms_and_overcommit_is_a_setting() {
        let conn = db_with_hosts(1);
        // 2 CPUs × 4.0 overcommit = 8 vCPUs.
        create(&conn, "big", spec(8, 128)).expect("create");
        create(&conn, "one-more", spec(1, 128)).expect("create");
        place_all(&conn);
        assert_eq!(vm(&conn, "big").host, Some(1));
        let reason = vm(&conn, "one-more").pending_reason.expect("pending");
        assert!(reason.contains("0 vCPUs"), "{reason}");
        apply_cmd(
            &conn,
            &Command::PutSetting {
                key: settings::CPU_OVERCOMMIT.into(),
                value: "5".into(),
                now_ms: 1,
            },
        )
        .expect("setting");
        place_all(&conn);
        assert_eq!(vm(&conn, "one-more").host, Some(1));
        let err = apply_cmd(
            &conn,
            &Command::PutSetting {
                key: settings::CPU_OVERCOMMIT.into(),
                value: "lots".into(),
                now_ms: 1,
            },
        )
        .expect_err("bad value");
        assert!(err.to_string().contains("number"), "{err}");
    }

    #[test]
    fn delete_removes_the_record_once_the_host_reports_the_domain_gone() {
        let conn = db_with_hosts(1);
        create(&conn, "gone", spec(1, 128)).expect("create");
        run(
            &conn,
            ComputeCommand::DeleteVm {
                vm: "gone".into(),
                op_id: "op-del-gone".into(),
                now_ms: 50,
            },
        )
        .expect("delete unplaced");
        assert_eq!(vm_count(&conn), 0, "never placed: removed at once");
        assert_eq!(op(&conn, "op-del-gone").state, OpState::Succeeded);
        assert_eq!(op(&conn, "op-create-gone").state, OpState::Cancelled);

        create(&conn, "web", spec(1, 128)).expect("create");
        place_all(&conn);
        report(&conn, "web", RunState::Running, 1, None);
        run(
            &conn,
            ComputeCommand::DeleteVm {
                vm: "web".into(),
                op_id: "op-del-web".into(),
                now_ms: 60,
            },
        )
        .expect("delete");
        assert!(vm(&conn, "web").deleting);
        let err = run(
            &conn,
            ComputeCommand::SetVmPower {
                vm: "web".into(),
                power: PowerIntent::Running,
                op_id: "op-x".into(),
                now_ms: 61,
            },
        )
        .expect_err("deleting");
        assert!(err.to_string().contains("being deleted"), "{err}");
        report(&conn, "web", RunState::Absent, 0, None);
        assert_eq!(vm_count(&conn), 0);
        assert_eq!(op(&conn, "op-del-web").state, OpState::Succeeded);
        // The name is free again.
        run(
            &conn,
            ComputeCommand::CreateVm {
                vm_id: "id-web-2".into(),
                name: "web".into(),
                spec: spec(1, 128),
                start: true,
                stop_timeout_s: 30,
                op_id: "op-create-web-2".into(),
                now_ms: 90,
            },
        )
        .expect("name reusable");
    }

    #[test]
    fn resize_needs_a_stopped_vm_and_bumps_the_generation() {
        let conn = db_with_hosts(1);
        create(&conn, "r", spec(1, 128)).expect("create");
        place_all(&conn);
        report(&conn, "r", RunState::Running, 1, None);
        let resize = |op_id: &str| ComputeCommand::ResizeVm {
            vm: "r".into(),
            vcpus: Some(2),
            memory_mib: Some(256),
            op_id: op_id.into(),
            now_ms: 70,
        };
        let err = run(&conn, resize("op-r1"))
            .expect_err("running")
            .to_string();
        assert!(err.contains("stop it first"), "{err}");
        stop(&conn, "r", "op-stop", 71);
        report(&conn, "r", RunState::Stopped, 1, None);
        run(&conn, resize("op-r2")).expect("resize");
        let v = vm(&conn, "r");
        assert_eq!((v.spec.vcpus, v.spec.memory_mib, v.generation), (2, 256, 2));
        assert_eq!(op(&conn, "op-r2").state, OpState::Running);
        report(&conn, "r", RunState::Stopped, 2, None);
        assert_eq!(op(&conn, "op-r2").state, OpState::Succeeded);
    }

    #[test]
    fn nics_attach_and_detach_on_a_running_vm_with_a_running_goal() {
        let conn = db_with_hosts(1);
        create(&conn, "n", spec(1, 128)).expect("create");
        place_all(&conn);
        report(&conn, "n", RunState::Running, 1, None);
        let nic = NicSpec {
            bridge: "br0".into(),
            mac: Some("52:54:00:aa:bb:01".into()),
            ..NicSpec::default()
        };
        run(
            &conn,
            ComputeCommand::AttachNic {
                vm: "n".into(),
                nic,
                op_id: "op-attach".into(),
                now_ms: 90,
            },
        )
        .expect("attach while running");
        let v = vm(&conn, "n");
        assert_eq!((v.generation, v.spec.nics.len()), (2, 1));
        assert_eq!(
            op(&conn, "op-attach").goal,
            OpGoal::Running { generation: 2 }
        );
        // Still running from the old definition: not done yet.
        report(&conn, "n", RunState::Running, 1, None);
        assert_eq!(op(&conn, "op-attach").state, OpState::Running);
        report(&conn, "n", RunState::Running, 2, None);
        assert_eq!(op(&conn, "op-attach").state, OpState::Succeeded);

        run(
            &conn,
            ComputeCommand::DetachNic {
                vm: "n".into(),
                mac: "52:54:00:AA:BB:01".into(),
                op_id: "op-detach".into(),
                now_ms: 91,
            },
        )
        .expect("detach while running");
        assert!(vm(&conn, "n").spec.nics.is_empty());
        assert_eq!(
            op(&conn, "op-detach").goal,
            OpGoal::Running { generation: 3 }
        );
        report(&conn, "n", RunState::Running, 3, None);
        assert_eq!(op(&conn, "op-detach").state, OpState::Succeeded);

        // A VM meant to be stopped gets a stopped goal, even while it is still shutting down.
        stop(&conn, "n", "op-stop", 92);
        run(
            &conn,
            ComputeCommand::AttachNic {
                vm: "n".into(),
                nic: NicSpec {
                    bridge: "br0".into(),
                    ..NicSpec::default()
                },
                op_id: "op-attach-2".into(),
                now_ms: 93,
            },
        )
        .expect("attach while stopping");
        assert_eq!(
            op(&conn, "op-attach-2").goal,
            OpGoal::Stopped { generation: 4 }
        );

        // Still refused while deleting.
        run(
            &conn,
            ComputeCommand::DeleteVm {
                vm: "n".into(),
                op_id: "op-del".into(),
                now_ms: 94,
            },
        )
        .expect("delete");
        let err = run(
            &conn,
            ComputeCommand::AttachNic {
                vm: "n".into(),
                nic: NicSpec {
                    bridge: "br0".into(),
                    ..NicSpec::default()
                },
                op_id: "op-attach-3".into(),
                now_ms: 95,
            },
        )
        .expect_err("deleting")
        .to_string();
        assert!(err.contains("being deleted"), "{err}");
    }

    #[test]
    fn reports_from_a_host_the_vm_is_not_placed_on_are_ignored() {
        let conn = db_with_hosts(2);
        create(&conn, "v", spec(1, 128)).expect("create");
        place_all(&conn);
        let placed = vm(&conn, "v").host.expect("placed");
        let other = if placed == 1 { 2 } else { 1 };
        let out = run(
            &conn,
            ComputeCommand::ReportVm {
                vm_id: "id-v".into(),
                host_id: other,
                state: RunState::Running,
                generation: 1,
                reboot_seq: 0,
                error: None,
                now_ms: 80,
            },
        )
        .expect("report");
        assert_eq!(out, Outcome::Unchanged);
        assert!(vm(&conn, "v").observed.is_none());
    }
}
