//! keel-api-types: the wire types of the HTTP API, kept apart from the cluster model so that the model can
//! change without changing the API by accident. Every type here appears in the OpenAPI
//! document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The subprotocol a console WebSocket (`/api/v1/vms/{vm}/console`) speaks.
pub const CONSOLE_PROTOCOL: &str = "keel.console";

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
    /// Drained for maintenance (`keel node drain`): no VMs are placed here.
    pub maintenance: bool,
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
    /// The host's hypervisor as its compute service last saw it.
    pub hypervisor: Option<HypervisorView>,
    /// The host's guest networks as its network service last converged them.
    pub network: Option<NetworkReportView>,
    /// The host's systemd units its node service keeps running (`null`: it manages none
    /// there: no systemd, or `[host] systemd = "off"`).
    pub host_units: Option<Vec<HostUnitView>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostUnitView {
    /// The unit's name, e.g. `libvirtd.service`.
    pub unit: String,
    /// systemd's LoadState (`loaded`, `not-found`, `masked`, …; empty: not read).
    pub load_state: String,
    /// systemd's ActiveState (`active`, `activating`, `inactive`, `failed`, …).
    pub active_state: String,
    /// systemd's SubState (`running`, `dead`, …).
    pub sub_state: String,
    /// Why the unit is not running, or its state could not be read (`null`: fine).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetworkReportView {
    /// VNIs of the guest networks built on the host.
    pub vnis: Vec<u32>,
    /// Problems of the last pass (empty: converged).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HypervisorView {
    /// libvirt domain type VMs get here (`qemu`: TCG, `kvm`).
    pub domain_type: String,
    pub libvirt_version: String,
    pub hypervisor_version: String,
    /// Why the host cannot take VMs now (`null`: it can).
    pub error: Option<String>,
    /// Domains on the host the cluster does not know: reported, never touched.
    pub unmanaged_domains: Vec<String>,
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

// ---- compute: VMs, operations, templates, affinity groups ------------------------------

/// How a VM boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmBoot {
    /// A copy-on-write overlay of a disk template (qcow2 or raw).
    #[default]
    Disk,
    /// An installer ISO template attached as a CD-ROM, with an empty root disk.
    Iso,
    /// A kernel template booted directly, with `initrd` and `cmdline`.
    Kernel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNicRequest {
    /// A guest network (name or id): the NIC gets an address on it by DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// An existing bridge on the hosts, e.g. `br0` (instead of a network).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge: String,
    /// Allocated from 52:54:00:… when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A fixed address on the network; leased from the network's free addresses when not
    /// given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Security groups (names or ids). None: every inbound packet is dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

fn default_true() -> bool {
    true
}

fn default_stop_timeout_s() -> u32 {
    60
}

/// `POST /api/v1/vms`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreateRequest {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Template name or id.
    pub template: String,
    #[serde(default)]
    pub boot: VmBoot,
    /// Kernel boot: the initrd template (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel boot: the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Root disk size; default the template's virtual size. Required for ISO boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk_gib: Option<u64>,
    /// Sizes of extra empty disks.
    #[serde(default)]
    pub data_disks_gib: Vec<u64>,
    #[serde(default)]
    pub nics: Vec<VmNicRequest>,
    /// cloud-init user data (at most 64 KiB). Never returned by any read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// OpenSSH public keys, one per entry.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_group: Option<String>,
    /// Restart elsewhere when its host fails.
    #[serde(default)]
    pub ha: bool,
    /// Start the VM once created (default true).
    #[serde(default = "default_true")]
    pub start: bool,
    /// Seconds a graceful stop may take before the VM is powered off (default 60).
    #[serde(default = "default_stop_timeout_s")]
    pub stop_timeout_s: u32,
}

impl std::fmt::Debug for VmCreateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // User data may hold secrets: only its size is shown.
        f.debug_struct("VmCreateRequest")
            .field("name", &self.name)
            .field("vcpus", &self.vcpus)
            .field("memory_mib", &self.memory_mib)
            .field("template", &self.template)
            .field("boot", &self.boot)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("root_disk_gib", &self.root_disk_gib)
            .field("data_disks_gib", &self.data_disks_gib)
            .field("nics", &self.nics)
            .field(
                "user_data_bytes",
                &self.user_data.as_ref().map_or(0, String::len),
            )
            .field("ssh_keys", &self.ssh_keys.len())
            .field("affinity_group", &self.affinity_group)
            .field("ha", &self.ha)
            .field("start", &self.start)
            .field("stop_timeout_s", &self.stop_timeout_s)
            .finish()
    }
}

/// `POST /api/v1/vms/{vm}/reboot` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRebootRequest {
    /// Reset the VM instead of a guest reboot.
    #[serde(default)]
    pub force: bool,
}

/// A host's maintenance state after `drain` or `undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostMaintenanceView {
    pub host_id: u64,
    pub maintenance: bool,
}

/// `POST /api/v1/vms/{vm}/migrate`: live if the VM runs, cold if it is stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrateRequest {
    /// Host name or id; omitted: the placement rules choose.
    #[serde(default)]
    pub target: Option<String>,
}

/// `POST /api/v1/vms/{vm}/resize`; the VM must be stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmResizeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// An asynchronous request; poll `GET /api/v1/operations/{id}` until `state` is not
/// `running`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationView {
    pub id: String,
    /// `vm-create`, `vm-start`, `vm-stop`, `vm-reboot`, `vm-resize`, `vm-delete`,
    /// `vm-migrate`, `nic-attach` or `nic-detach`.
    pub kind: String,
    pub vm_id: String,
    pub vm_name: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Progress while running; the reason when failed or cancelled.
    pub detail: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// The answer to every VM request that a host carries out (`202 Accepted`, with
/// `Location: /api/v1/operations/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationAccepted {
    pub operation: OperationView,
    pub vm_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNicView {
    /// The host bridge (`kbr<vni>` for a NIC on a guest network).
    pub bridge: String,
    pub mac: String,
    /// The guest network's name (`null`: a NIC on a host bridge).
    pub network: Option<String>,
    pub network_id: Option<String>,
    /// The NIC's address on its guest network.
    pub ip: Option<String>,
    /// Names of the NIC's security groups.
    pub security_groups: Vec<String>,
}

/// What the VM's host last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmObservedView {
    pub host_id: u64,
    /// `running`, `paused`, `shutting_down`, `stopped`, `crashed`, `absent` or `unknown`.
    pub state: String,
    /// Since when the host has seen `state`.
    pub since_ms: u64,
    /// The spec generation the host's domain is defined from (0: not defined yet).
    pub generation: u64,
    pub reported_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: String,
    pub name: String,
    /// One word: `pending` (not placed yet), `starting`, `running`, `stopping`,
    /// `stopped`, `error` (the host's last action failed) or `deleting`.
    pub status: String,
    /// The desired power state: `running` or `stopped`.
    pub power: String,
    pub host_id: Option<u64>,
    pub host_name: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub template_id: String,
    pub template_name: Option<String>,
    pub boot: VmBoot,
    pub root_disk_gib: Option<u64>,
    pub data_disks_gib: Vec<u64>,
    pub nics: Vec<VmNicView>,
    pub affinity_group: Option<String>,
    pub ha: bool,
    pub stop_timeout_s: u32,
    /// Why the VM is not placed yet.
    pub pending_reason: Option<String>,
    /// The host's last failure acting on the VM.
    pub last_error: Option<String>,
    pub observed: Option<VmObservedView>,
    /// Bumped by every change of the VM's spec.
    pub generation: u64,
    pub created_at_ms: u64,
    /// Ids of the operations not finished yet.
    pub active_operations: Vec<String>,
}

/// `GET /api/v1/vms/{vm}`: the list view plus the cloud-init inputs that are safe to show
/// (the user data itself is never returned: it may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmDetailView {
    #[serde(flatten)]
    pub vm: VmView,
    pub ssh_keys: Vec<String>,
    /// Size of the cloud-init user data (0: none).
    pub user_data_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateFormat {
    Qcow2,
    Raw,
    Iso,
    /// A Linux kernel (bzImage) for direct kernel boot.
    Kernel,
    /// An initial ramdisk for direct kernel boot.
    Initrd,
}

impl TemplateFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateFormat::Qcow2 => "qcow2",
            TemplateFormat::Raw => "raw",
            TemplateFormat::Iso => "iso",
            TemplateFormat::Kernel => "kernel",
            TemplateFormat::Initrd => "initrd",
        }
    }
}

/// Query of `POST /api/v1/templates`; the request body is the image itself.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TemplateUploadQuery {
    /// The template's name (lowercase letters, digits and '-').
    pub name: String,
    /// The image's format; the server checks it with `qemu-img info`.
    #[param(inline)]
    pub format: TemplateFormat,
    /// SHA-256 (hex) of the image; the upload is refused when the received bytes differ.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// `POST /api/v1/templates/import`: a file already on the server that answers (admin
/// socket only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateImportRequest {
    pub name: String,
    /// Absolute path of the image on this server; it is copied, not moved.
    pub path: String,
    pub format: TemplateFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    pub id: String,
    pub name: String,
    pub format: TemplateFormat,
    /// Bytes of the image file.
    pub size_bytes: u64,
    /// What the guest sees (the qcow2 virtual size; the file size for raw and ISO).
    pub virtual_size_bytes: u64,
    pub sha256: String,
    /// Hosts holding a verified copy.
    pub replicas: Vec<u64>,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    /// Every member on the same host.
    Affinity,
    /// Every member on a different host.
    AntiAffinity,
}

impl GroupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupPolicy::Affinity => "affinity",
            GroupPolicy::AntiAffinity => "anti-affinity",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AffinityGroupCreateRequest {
    pub name: String,
    pub policy: GroupPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AffinityGroupView {
    pub name: String,
    pub policy: GroupPolicy,
    /// Names of the VMs in the group.
    pub members: Vec<String>,
    pub created_at_ms: u64,
}

// ---- networking: guest networks, security groups, host networks -------------------------

/// `POST /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreateRequest {
    /// Lowercase letters, digits and '-'.
    pub name: String,
    /// The network's prefix, `a.b.c.d/len` without host bits, /8 to /29.
    pub cidr: String,
    /// Default: the first host address of the CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Guests get `<vm name>.<dns_domain>`; default `<name>.internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain: Option<String>,
    /// Default (and most): the guest underlay's MTU minus 50 bytes of VXLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Guests may reach the outside through SNAT on the hosts' public network.
    #[serde(default)]
    pub external: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    pub id: String,
    pub name: String,
    pub cidr: String,
    /// Answered on every host that runs a VM of the network.
    pub gateway: String,
    pub dns_domain: String,
    /// The VXLAN segment id.
    pub vni: u32,
    pub mtu: u32,
    pub external: bool,
    /// VM NICs on the network (addresses leased).
    pub ports: usize,
    pub created_at_ms: u64,
}

/// One address of a network, held by a VM NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkLeaseView {
    pub ip: String,
    pub mac: String,
    pub vm_id: String,
    pub vm_name: Option<String>,
    /// Where the VM is placed (`null`: not placed yet).
    pub host_id: Option<u64>,
    pub host_name: Option<String>,
}

/// `GET /api/v1/networks/{network}`: the network and its leases, in address order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkDetailView {
    #[serde(flatten)]
    pub network: NetworkView,
    pub leases: Vec<NetworkLeaseView>,
}

/// `POST /api/v1/security-groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupCreateRequest {
    pub name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleDirection {
    /// Traffic to the NIC.
    #[default]
    Ingress,
    /// Traffic from the NIC.
    Egress,
}

impl RuleDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleDirection::Ingress => "ingress",
            RuleDirection::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl RuleProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Icmp => "icmp",
            RuleProtocol::Any => "any",
        }
    }
}

/// `POST /api/v1/security-groups/{group}/rules`: one allow rule. At most one of
/// `remote_cidr` and `remote_group`; neither means `0.0.0.0/0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityRuleCreateRequest {
    pub direction: RuleDirection,
    pub protocol: RuleProtocol,
    /// First port (tcp and udp only); without it the rule covers every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_min: Option<u16>,
    /// Last port; default `port_min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_max: Option<u16>,
    /// The other end's addresses, `a.b.c.d/len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_cidr: Option<String>,
    /// The other end: every NIC in this security group (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityRuleView {
    pub id: String,
    pub direction: RuleDirection,
    pub protocol: RuleProtocol,
    pub port_min: Option<u16>,
    pub port_max: Option<u16>,
    /// Set when the other end is an address range.
    pub remote_cidr: Option<String>,
    /// Set when the other end is a security group: its name.
    pub remote_group: Option<String>,
    pub remote_group_id: Option<String>,
}

/// A security group: allow rules for the NICs in it. Ingress is denied unless a rule
/// allows it; egress is allowed unless the group has egress rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroupView {
    pub id: String,
    pub name: String,
    pub rules: Vec<SecurityRuleView>,
    /// Names of the VMs with a NIC in the group.
    pub vms: Vec<String>,
    /// Bumped by every rule change.
    pub revision: u64,
    pub created_at_ms: u64,
}

/// `PUT /api/v1/hosts/{host}/networks/{role}`: gives a host interface a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostNetworkSetRequest {
    pub interface: String,
    /// The host's address on it, `a.b.c.d/len`; must already be configured there.
    pub address: String,
    /// The next hop to the outside (public role only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostNetworkView {
    /// `management`, `storage`, `guest-underlay` or `public`.
    pub role: String,
    pub interface: String,
    pub address: String,
    pub gateway: Option<String>,
    /// Not given a role explicitly: the interface carrying the host's peer address.
    pub derived: bool,
}

/// `GET /api/v1/hosts/{host}/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostNetworksView {
    pub host_id: u64,
    pub host_name: String,
    pub networks: Vec<HostNetworkView>,
}

// ---- floating IPs -------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpAllocateRequest {
    /// A specific address of the range; the lowest free one when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpAttachRequest {
    /// The VM (name or id).
    pub vm: String,
    /// The VM's external network (name or id); needed only when it has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `tcp:PUBLIC:PRIVATE` or `udp:PORT`; empty: 1:1 NAT (every port, both ways).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortForwardView {
    /// `protocol:public port:VM port`.
    pub forward: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FloatingIpView {
    pub ip: String,
    pub vm_id: Option<String>,
    pub vm_name: Option<String>,
    pub network: Option<String>,
    pub private_ip: Option<String>,
    /// Empty while attached: 1:1 NAT.
    pub ports: Vec<PortForwardView>,
    /// The host that answers for the address (the VM's).
    pub host_name: Option<String>,
    pub allocated_at_ms: u64,
}
