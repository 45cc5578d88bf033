//! Builds API views from the cluster database and raft's metrics.

use std::collections::HashMap;

use keel_cluster::model::compute::{
    AffinityGroup, AffinityPolicy, BootSource, ImageFormat, OpKind, OpState, Operation,
    PowerIntent, RunState, Template, Vm,
};
use keel_cluster::model::{ClusterInfo, Host};
use keel_cluster::ClusterDb;
use openraft::ServerState;

use crate::api::types::{
    AffinityGroupView, ClusterView, DiskView, GroupPolicy, HostView, HypervisorView, InventoryView,
    MemberView, NicView, OperationView, TemplateFormat, TemplateView, VmBoot, VmDetailView,
    VmNicView, VmObservedView, VmView,
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
}

impl ComputeNames {
    pub fn new(hosts: &[Host], templates: &[Template]) -> Self {
        Self {
            hosts: hosts.iter().map(|h| (h.id, h.name.clone())).collect(),
            templates: templates
                .iter()
                .map(|t| (t.id.clone(), t.name.clone()))
                .collect(),
        }
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
