//! Builds API views from the cluster database and raft's metrics.

use std::collections::HashMap;

use keel_cluster::model::compute::{
    AffinityGroup, AffinityPolicy, BootSource, ImageFormat, OpKind, OpState, Operation,
    PowerIntent, RunState, Template, Vm,
};
use keel_cluster::model::network::{
    Direction, HostNetworks, IpLease, NetRole, Network, RuleProtocol as ModelProtocol, RuleRemote,
    SecurityGroup, SecurityRule,
};
use keel_cluster::model::{ClusterInfo, Host};
use keel_cluster::ClusterDb;
use openraft::ServerState;

use keel_api_types::{
    AffinityGroupView, ClusterView, DiskView, GroupPolicy, HostNetworkView, HostNetworksView,
    HostUnitView, HostView, HypervisorView, InventoryView, MemberView, NetworkDetailView,
    NetworkLeaseView, NetworkReportView, NetworkView, NicView, OperationView, RuleDirection,
    RuleProtocol, SecurityGroupView, SecurityRuleView, TemplateFormat, TemplateView, VmBoot,
    VmDetailView, VmNicView, VmObservedView, VmView,
};

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
                hypervisor: i.hypervisor.map(|hv| HypervisorView {
                    domain_type: hv.domain_type,
                    libvirt_version: hv.libvirt_version,
                    hypervisor_version: hv.hypervisor_version,
                    error: hv.error,
                    unmanaged_domains: hv.unmanaged_domains,
                }),
                network: i.network.map(|n| NetworkReportView {
                    vnis: n.vnis,
                    errors: n.errors,
                }),
                host_units: i.host_units.map(|units| {
                    units
                        .into_iter()
                        .map(|u| HostUnitView {
                            unit: u.unit,
                            load_state: u.load_state,
                            active_state: u.active_state,
                            sub_state: u.sub_state,
                            error: u.error,
                        })
                        .collect()
                }),
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
                maintenance: h.maintenance.is_some(),
                inventory,
            }
        })
        .collect()
}

// ---- compute ----------------------------------------------------------------------------

/// The one-word status of a VM, derived from its desired and observed state:
///
/// * `deleting` while a delete is under way;
/// * `pending` until the leader has placed it on a host;
/// * `error` when the host's last action on it failed;
/// * `running` / `stopped` when the host observed the desired power state;
/// * otherwise `starting` (desired running) or `stopping` (desired stopped).
pub fn vm_status(vm: &Vm) -> &'static str {
    if vm.deleting {
        return "deleting";
    }
    let Some(host) = vm.host else {
        return "pending";
    };
    // An observation from a host the VM is no longer placed on says nothing about it.
    let observed = vm.observed.as_ref().filter(|o| o.host == host);
    if observed.is_some_and(|o| o.last_error.is_some()) {
        return "error";
    }
    let state = observed.map(|o| o.state);
    match (vm.power, state) {
        (PowerIntent::Running, Some(RunState::Running)) => "running",
        (PowerIntent::Stopped, Some(RunState::Stopped)) => "stopped",
        (PowerIntent::Running, _) => "starting",
        (PowerIntent::Stopped, _) => "stopping",
    }
}

fn power_name(p: PowerIntent) -> &'static str {
    match p {
        PowerIntent::Running => "running",
        PowerIntent::Stopped => "stopped",
    }
}

pub fn op_kind_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::VmCreate => "vm-create",
        OpKind::VmStart => "vm-start",
        OpKind::VmStop => "vm-stop",
        OpKind::VmReboot => "vm-reboot",
        OpKind::VmResize => "vm-resize",
        OpKind::VmDelete => "vm-delete",
        OpKind::VmMigrate => "vm-migrate",
        OpKind::NicAttach => "nic-attach",
        OpKind::NicDetach => "nic-detach",
    }
}

pub fn op_state_name(state: OpState) -> &'static str {
    match state {
        OpState::Running => "running",
        OpState::Succeeded => "succeeded",
        OpState::Failed => "failed",
        OpState::Cancelled => "cancelled",
    }
}

pub fn operation_view(op: Operation) -> OperationView {
    OperationView {
        id: op.id,
        kind: op_kind_name(op.kind).into(),
        vm_id: op.vm_id,
        vm_name: op.vm_name,
        state: op_state_name(op.state).into(),
        detail: op.detail,
        created_at_ms: op.created_at_ms,
        updated_at_ms: op.updated_at_ms,
    }
}

/// The most recent `limit` operations, newest first.
pub fn recent_operations(mut ops: Vec<Operation>, limit: usize) -> Vec<OperationView> {
    ops.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    ops.truncate(limit);
    ops.into_iter().map(operation_view).collect()
}

/// Names the views show next to ids.
#[derive(Debug, Default)]
pub struct ComputeNames {
    hosts: HashMap<u64, String>,
    templates: HashMap<String, String>,
    networks: HashMap<String, String>,
    groups: HashMap<String, String>,
}

impl ComputeNames {
    pub fn new(hosts: &[Host], templates: &[Template]) -> Self {
        Self {
            hosts: hosts.iter().map(|h| (h.id, h.name.clone())).collect(),
            templates: templates
                .iter()
                .map(|t| (t.id.clone(), t.name.clone()))
                .collect(),
            networks: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    /// Adds the names of guest networks and security groups (for the VMs' NICs).
    pub fn with_networking(mut self, networks: &[Network], groups: &[SecurityGroup]) -> Self {
        self.networks = networks
            .iter()
            .map(|n| (n.id.clone(), n.name.clone()))
            .collect();
        self.groups = groups
            .iter()
            .map(|g| (g.id.clone(), g.name.clone()))
            .collect();
        self
    }
}

/// The list view of a VM: no SSH keys and no user data.
pub fn vm_view(vm: &Vm, names: &ComputeNames) -> VmView {
    let status = vm_status(vm);
    let (boot, template_id) = match &vm.spec.boot {
        BootSource::Template { template } => (VmBoot::Disk, template.clone()),
        BootSource::Iso { template } => (VmBoot::Iso, template.clone()),
        BootSource::Kernel { template, .. } => (VmBoot::Kernel, template.clone()),
    };
    VmView {
        id: vm.id.clone(),
        name: vm.name.clone(),
        status: status.into(),
        power: power_name(vm.power).into(),
        host_id: vm.host,
        host_name: vm.host.and_then(|h| names.hosts.get(&h).cloned()),
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        template_name: names.templates.get(&template_id).cloned(),
        template_id,
        boot,
        root_disk_gib: vm.spec.root_disk_gib,
        data_disks_gib: vm.spec.data_disks.iter().map(|d| d.size_gib).collect(),
        nics: vm
            .spec
            .nics
            .iter()
            .map(|n| VmNicView {
                bridge: n.bridge.clone(),
                mac: n.mac.clone().unwrap_or_default(),
                network: n.network.as_ref().map(|id| {
                    names
                        .networks
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| id.clone())
                }),
                network_id: n.network.clone(),
                ip: n.ip.clone(),
                security_groups: n
                    .security_groups
                    .iter()
                    .map(|id| names.groups.get(id).cloned().unwrap_or_else(|| id.clone()))
                    .collect(),
            })
            .collect(),
        affinity_group: vm.spec.affinity_group.clone(),
        ha: vm.spec.ha,
        stop_timeout_s: vm.stop_timeout_s,
        pending_reason: vm.pending_reason.clone(),
        last_error: vm.observed.as_ref().and_then(|o| o.last_error.clone()),
        observed: vm.observed.as_ref().map(|o| VmObservedView {
            host_id: o.host,
            state: o.state.to_string(),
            since_ms: o.since_ms,
            generation: o.generation,
            reported_at_ms: o.reported_at_ms,
        }),
        generation: vm.generation,
        created_at_ms: vm.created_at_ms,
        active_operations: vm.active_ops.clone(),
    }
}

/// The single-VM view: adds the SSH keys and the size (never the text) of the user data.
pub fn vm_detail_view(vm: &Vm, names: &ComputeNames) -> VmDetailView {
    VmDetailView {
        vm: vm_view(vm, names),
        ssh_keys: vm.spec.cloud_init.ssh_keys.clone(),
        user_data_bytes: vm.spec.cloud_init.user_data.as_ref().map_or(0, String::len),
    }
}

pub fn template_format(f: ImageFormat) -> TemplateFormat {
    match f {
        ImageFormat::Qcow2 => TemplateFormat::Qcow2,
        ImageFormat::Raw => TemplateFormat::Raw,
        ImageFormat::Iso => TemplateFormat::Iso,
        ImageFormat::Kernel => TemplateFormat::Kernel,
        ImageFormat::Initrd => TemplateFormat::Initrd,
    }
}

pub fn image_format(f: TemplateFormat) -> ImageFormat {
    match f {
        TemplateFormat::Qcow2 => ImageFormat::Qcow2,
        TemplateFormat::Raw => ImageFormat::Raw,
        TemplateFormat::Iso => ImageFormat::Iso,
        TemplateFormat::Kernel => ImageFormat::Kernel,
        TemplateFormat::Initrd => ImageFormat::Initrd,
    }
}

pub fn template_view(t: Template) -> TemplateView {
    TemplateView {
        id: t.id,
        name: t.name,
        format: template_format(t.format),
        size_bytes: t.size_bytes,
        virtual_size_bytes: t.virtual_size_bytes,
        sha256: t.sha256,
        replicas: t.replicas,
        created_at_ms: t.created_at_ms,
    }
}

pub fn group_policy(p: AffinityPolicy) -> GroupPolicy {
    match p {
        AffinityPolicy::Affinity => GroupPolicy::Affinity,
        AffinityPolicy::AntiAffinity => GroupPolicy::AntiAffinity,
    }
}

pub fn affinity_policy(p: GroupPolicy) -> AffinityPolicy {
    match p {
        GroupPolicy::Affinity => AffinityPolicy::Affinity,
        GroupPolicy::AntiAffinity => AffinityPolicy::AntiAffinity,
    }
}

/// Affinity groups with the names of their member VMs.
pub fn affinity_group_views(groups: Vec<AffinityGroup>, vms: &[Vm]) -> Vec<AffinityGroupView> {
    groups
        .into_iter()
        .map(|g| {
            let mut members: Vec<String> = vms
                .iter()
                .filter(|vm| vm.spec.affinity_group.as_deref() == Some(g.name.as_str()))
                .map(|vm| vm.name.clone())
                .collect();
            members.sort();
            AffinityGroupView {
                policy: group_policy(g.policy),
                name: g.name,
                members,
                created_at_ms: g.created_at_ms,
            }
        })
        .collect()
}

// ---- networking -------------------------------------------------------------------------

/// A network with the number of its leases.
pub fn network_view(n: &Network, ports: usize) -> NetworkView {
    NetworkView {
        id: n.id.clone(),
        name: n.name.clone(),
        cidr: n.cidr.to_string(),
        gateway: n.gateway.to_string(),
        dns_domain: n.dns_domain.clone(),
        vni: n.vni,
        mtu: n.mtu,
        external: n.external,
        ports,
        created_at_ms: n.created_at_ms,
    }
}

/// Every network, by name, with how many addresses it has leased.
pub fn network_views(networks: &[Network], leases: &[IpLease]) -> Vec<NetworkView> {
    let mut ports: HashMap<&str, usize> = HashMap::new();
    for l in leases {
        *ports.entry(l.network_id.as_str()).or_default() += 1;
    }
    let mut views: Vec<NetworkView> = networks
        .iter()
        .map(|n| network_view(n, ports.get(n.id.as_str()).copied().unwrap_or(0)))
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

/// A network with its leases (in address order), each with its VM and the VM's host.
pub fn network_detail_view(
    n: &Network,
    leases: &[IpLease],
    vms: &[Vm],
    hosts: &[Host],
) -> NetworkDetailView {
    let vms: HashMap<&str, &Vm> = vms.iter().map(|v| (v.id.as_str(), v)).collect();
    let hosts: HashMap<u64, &str> = hosts.iter().map(|h| (h.id, h.name.as_str())).collect();
    NetworkDetailView {
        network: network_view(n, leases.len()),
        leases: leases
            .iter()
            .map(|l| {
                let vm = vms.get(l.vm_id.as_str());
                let host_id = vm.and_then(|v| v.host);
                NetworkLeaseView {
                    ip: l.ip.to_string(),
                    mac: l.mac.clone(),
                    vm_id: l.vm_id.clone(),
                    vm_name: vm.map(|v| v.name.clone()),
                    host_id,
                    host_name: host_id.and_then(|h| hosts.get(&h).map(|n| n.to_string())),
                }
            })
            .collect(),
    }
}

pub fn rule_direction(d: Direction) -> RuleDirection {
    match d {
        Direction::Ingress => RuleDirection::Ingress,
        Direction::Egress => RuleDirection::Egress,
    }
}

pub fn model_direction(d: RuleDirection) -> Direction {
    match d {
        RuleDirection::Ingress => Direction::Ingress,
        RuleDirection::Egress => Direction::Egress,
    }
}

pub fn rule_protocol(p: ModelProtocol) -> RuleProtocol {
    match p {
        ModelProtocol::Tcp => RuleProtocol::Tcp,
        ModelProtocol::Udp => RuleProtocol::Udp,
        ModelProtocol::Icmp => RuleProtocol::Icmp,
        ModelProtocol::Any => RuleProtocol::Any,
    }
}

pub fn model_protocol(p: RuleProtocol) -> ModelProtocol {
    match p {
        RuleProtocol::Tcp => ModelProtocol::Tcp,
        RuleProtocol::Udp => ModelProtocol::Udp,
        RuleProtocol::Icmp => ModelProtocol::Icmp,
        RuleProtocol::Any => ModelProtocol::Any,
    }
}

/// A rule, its remote group named by `group_names` (id → name).
pub fn security_rule_view(r: &SecurityRule, group_names: &HashMap<&str, &str>) -> SecurityRuleView {
    let (remote_cidr, remote_group, remote_group_id) = match &r.remote {
        RuleRemote::Cidr { cidr } => (Some(cidr.to_string()), None, None),
        RuleRemote::Group { group } => (
            None,
            Some(
                group_names
                    .get(group.as_str())
                    .map_or_else(|| group.clone(), |n| n.to_string()),
            ),
            Some(group.clone()),
        ),
    };
    SecurityRuleView {
        id: r.id.clone(),
        direction: rule_direction(r.direction),
        protocol: rule_protocol(r.protocol),
        port_min: r.port_min,
        port_max: r.port_max,
        remote_cidr,
        remote_group,
        remote_group_id,
    }
}

/// Security groups by name, with their rules and the VMs that have a NIC in them. `all`
/// names the remote groups of the rules.
pub fn security_group_views(
    groups: &[SecurityGroup],
    all: &[SecurityGroup],
    vms: &[Vm],
) -> Vec<SecurityGroupView> {
    let names: HashMap<&str, &str> = all
        .iter()
        .map(|g| (g.id.as_str(), g.name.as_str()))
        .collect();
    let mut views: Vec<SecurityGroupView> = groups
        .iter()
        .map(|g| {
            let mut members: Vec<String> = vms
                .iter()
                .filter(|vm| {
                    vm.spec
                        .nics
                        .iter()
                        .any(|n| n.security_groups.contains(&g.id))
                })
                .map(|vm| vm.name.clone())
                .collect();
            members.sort();
            SecurityGroupView {
                id: g.id.clone(),
                name: g.name.clone(),
                rules: g
                    .rules
                    .iter()
                    .map(|r| security_rule_view(r, &names))
                    .collect(),
                vms: members,
                revision: g.revision,
                created_at_ms: g.created_at_ms,
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

/// How a role is written in paths and views: `guest-underlay`.
pub fn net_role_name(role: NetRole) -> String {
    role.as_str().replace('_', "-")
}

/// A host's physical networks (`nets`, as `host_networks` computes them); roles missing
/// from the stored record (`stored`) are marked derived.
pub fn host_networks_view(
    host: &Host,
    nets: &HostNetworks,
    stored: Option<&HostNetworks>,
) -> HostNetworksView {
    HostNetworksView {
        host_id: host.id,
        host_name: host.name.clone(),
        networks: nets
            .roles
            .iter()
            .map(|(role, net)| HostNetworkView {
                role: net_role_name(*role),
                interface: net.interface.clone(),
                address: net.address.to_string(),
                gateway: net.gateway.map(|g| g.to_string()),
                derived: !stored.is_some_and(|s| s.roles.contains_key(role)),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_cluster::model::compute::{CloudInit, VmObserved, VmSpec};

    fn vm() -> Vm {
        Vm {
            id: "id-1".into(),
            name: "web-1".into(),
            spec: VmSpec {
                vcpus: 2,
                memory_mib: 1024,
                boot: BootSource::Template {
                    template: "t-1".into(),
                },
                root_disk_gib: None,
                data_disks: vec![],
                nics: vec![],
                cloud_init: CloudInit {
                    user_data: Some("#cloud-config\npassword: hunter2\n".into()),
                    ssh_keys: vec!["ssh-ed25519 AAAA me".into()],
                },
                affinity_group: None,
                ha: false,
            },
            generation: 1,
            power: PowerIntent::Running,
            stop_timeout_s: 60,
            reboot_seq: 0,
            reboot_forced: false,
            deleting: false,
            host: None,
            pending_reason: None,
            observed: None,
            active_ops: vec![],
            created_at_ms: 5,
            migration: None,
        }
    }

    fn observed(host: u64, state: RunState, error: Option<&str>) -> Option<VmObserved> {
        Some(VmObserved {
            host,
            state,
            since_ms: 10,
            generation: 1,
            reboot_seq: 0,
            last_error: error.map(String::from),
            reported_at_ms: 11,
        })
    }

    #[test]
    fn status_is_derived_from_desired_and_observed_state() {
        let mut v = vm();
        assert_eq!(vm_status(&v), "pending");
        v.host = Some(2);
        assert_eq!(vm_status(&v), "starting", "placed, nothing observed yet");
        v.observed = observed(2, RunState::Stopped, None);
        assert_eq!(vm_status(&v), "starting");
        v.observed = observed(2, RunState::Running, None);
        assert_eq!(vm_status(&v), "running");
        v.power = PowerIntent::Stopped;
        assert_eq!(vm_status(&v), "stopping");
        v.observed = observed(2, RunState::ShuttingDown, None);
        assert_eq!(vm_status(&v), "stopping");
        v.observed = observed(2, RunState::Stopped, None);
        assert_eq!(vm_status(&v), "stopped");
        v.observed = observed(2, RunState::Stopped, Some("qemu-img failed"));
        assert_eq!(vm_status(&v), "error");
        // A stale observation from another host counts as none.
        v.observed = observed(3, RunState::Stopped, Some("old"));
        assert_eq!(vm_status(&v), "stopping");
        v.deleting = true;
        assert_eq!(vm_status(&v), "deleting");
    }

    #[test]
    fn views_never_carry_user_data_and_lists_carry_no_keys() {
        let hosts = vec![];
        let templates = vec![Template {
            id: "t-1".into(),
            name: "debian".into(),
            format: ImageFormat::Qcow2,
            size_bytes: 1,
            virtual_size_bytes: 2,
            sha256: "0".repeat(64),
            replicas: vec![1],
            created_at_ms: 1,
        }];
        let names = ComputeNames::new(&hosts, &templates);
        let list = serde_json::to_string(&vm_view(&vm(), &names)).expect("json");
        assert!(!list.contains("hunter2") && !list.contains("ssh-ed25519"));
        let detail = vm_detail_view(&vm(), &names);
        assert_eq!(detail.vm.template_name.as_deref(), Some("debian"));
        assert_eq!(detail.user_data_bytes, 32);
        let json = serde_json::to_value(&detail).expect("json");
        assert!(!json.to_string().contains("hunter2"));
        assert_eq!(
            json["name"], "web-1",
            "the VM view is flattened into the detail"
        );
        assert_eq!(json["ssh_keys"][0], "ssh-ed25519 AAAA me");
    }

    #[test]
    fn nics_leases_and_rules_are_shown_by_name() {
        use keel_cluster::model::compute::NicSpec;
        use keel_cluster::model::network::{Ipv4Cidr, PhysicalNetwork};
        let blue = Network {
            id: "n-1".into(),
            name: "blue".into(),
            cidr: Ipv4Cidr::parse("10.0.0.0/24", true).unwrap(),
            gateway: "10.0.0.1".parse().unwrap(),
            dns_domain: "blue.internal".into(),
            vni: 4096,
            mtu: 1450,
            external: false,
            created_at_ms: 1,
        };
        let group = |id: &str, name: &str, rules| SecurityGroup {
            id: id.into(),
            name: name.into(),
            rules,
            created_at_ms: 1,
            revision: 1,
        };
        let web = group("g-1", "web", vec![]);
        let db = group(
            "g-2",
            "db",
            vec![SecurityRule {
                id: "r-1".into(),
                direction: Direction::Ingress,
                protocol: ModelProtocol::Tcp,
                port_min: Some(5432),
                port_max: Some(5432),
                remote: RuleRemote::Group {
                    group: "g-1".into(),
                },
            }],
        );
        let mut v = vm();
        v.host = Some(2);
        v.spec.nics = vec![NicSpec {
            bridge: "kbr4096".into(),
            mac: Some("52:54:00:00:00:01".into()),
            network: Some("n-1".into()),
            ip: Some("10.0.0.2".into()),
            security_groups: vec!["g-1".into()],
        }];
        let names = ComputeNames::new(&[], &[])
            .with_networking(std::slice::from_ref(&blue), std::slice::from_ref(&web));
        let nic = &vm_view(&v, &names).nics[0];
        assert_eq!(nic.network.as_deref(), Some("blue"));
        assert_eq!(nic.network_id.as_deref(), Some("n-1"));
        assert_eq!(nic.ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(nic.security_groups, ["web"]);

        let lease = IpLease {
            network_id: "n-1".into(),
            ip: "10.0.0.2".parse().unwrap(),
            vm_id: "id-1".into(),
            mac: "52:54:00:00:00:01".into(),
        };
        let list = network_views(std::slice::from_ref(&blue), std::slice::from_ref(&lease));
        assert_eq!((list[0].ports, list[0].cidr.as_str()), (1, "10.0.0.0/24"));
        let d = network_detail_view(&blue, &[lease], std::slice::from_ref(&v), &[]);
        assert_eq!(d.leases[0].vm_name.as_deref(), Some("web-1"));
        assert_eq!(d.leases[0].host_id, Some(2));
        assert_eq!(d.leases[0].host_name, None, "host 2 unknown here");

        let all = [web.clone(), db.clone()];
        let views = security_group_views(&all, &all, &[v]);
        assert_eq!(views[0].name, "db", "sorted by name");
        assert_eq!(views[0].rules[0].remote_group.as_deref(), Some("web"));
        assert_eq!(views[0].rules[0].remote_group_id.as_deref(), Some("g-1"));
        assert_eq!(views[1].vms, ["web-1"]);

        let pn = |iface: &str| PhysicalNetwork {
            interface: iface.into(),
            address: Ipv4Cidr::parse("192.0.2.10/24", false).unwrap(),
            gateway: None,
        };
        let stored = HostNetworks {
            host_id: 1,
            roles: [(NetRole::Public, pn("eth1"))].into(),
        };
        let mut nets = stored.clone();
        nets.roles.insert(NetRole::GuestUnderlay, pn("eth0"));
        let host: Host = serde_json::from_value(serde_json::json!({
            "id": 1, "name": "node-1", "zone": "z", "compute_cluster": "c",
            "peer_addr": "192.0.2.10:7400", "api_addr": "192.0.2.10:8443",
            "witness": false, "health": "up", "health_since_ms": 0, "joined_at_ms": 0,
        }))
        .expect("host");
        let view = host_networks_view(&host, &nets, Some(&stored));
        let roles: Vec<(&str, bool)> = view
            .networks
            .iter()
            .map(|n| (n.role.as_str(), n.derived))
            .collect();
        assert_eq!(roles, [("guest-underlay", true), ("public", false)]);
    }

    #[test]
    fn recent_operations_are_newest_first_and_bounded() {
        let op = |id: &str, at: u64| Operation {
            id: id.into(),
            kind: OpKind::VmStart,
            vm_id: "v".into(),
            vm_name: "web-1".into(),
            goal: keel_cluster::model::compute::OpGoal::Deleted,
            state: OpState::Running,
            detail: None,
            created_at_ms: at,
            updated_at_ms: at,
        };
        let views = recent_operations(vec![op("a", 1), op("b", 3), op("c", 2)], 2);
        let ids: Vec<&str> = views.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(views[0].kind, "vm-start");
        assert_eq!(views[0].state, "running");
    }
}
