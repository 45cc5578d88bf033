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

use super::NodeId;
use super::{
    delete, invalid, list, next_counter, put, read, require_host, require_init, store_err,
    validate_name, CommandError, Health, Host, Outcome, Record, Setting,
};

/// Largest vCPU count a VM may ask for.
pub const MAX_VCPUS: u32 = 256;
/// Smallest memory a VM may have.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest cloud-init user data accepted (NoCloud's own limit is the seed disk; this keeps
/// raft entries small).
pub use keel_base::MAX_USER_DATA;
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
        _ => Ok(()),
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
impl super::Named for Vm {
    const NAME_KIND: &'static str = "vm_name";
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
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
    super::find_by_id_or_name::<Vm>(conn, id_or_name)
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

/// Where a VM may go, as the placement filters and weigher decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The hosts that fit it, best first.
    Hosts(Vec<NodeId>),
    /// No host fits; why not, for the user.
    Nowhere { reason: String },
}

impl Placement {
    pub fn allows(&self, host: NodeId) -> bool {
        matches!(self, Placement::Hosts(hosts) if hosts.contains(&host))
    }
}

/// Hosts a VM may be placed on and, if none, why not. Ordered best first by the weigher.
pub fn candidate_hosts(conn: &Connection, vm: &Vm) -> Result<Placement, CommandError> {
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
        return Ok(Placement::Nowhere {
            reason: format!("no host fits: {}", reasons.join("; ")),
        });
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
    Ok(Placement::Hosts(
        fitting.iter().map(|c| c.host_id).collect(),
    ))
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

mod apply;
pub(super) use apply::{apply, unplace_host_vms};

#[cfg(test)]
mod tests;
