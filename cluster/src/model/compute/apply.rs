//! Applying compute commands: validation, operations, and one function per command.

use super::*;

// ---- validation -------------------------------------------------------------------------

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
    crate::model::nic::prepare_nic(conn, nic, vm_id)?;
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
    crate::model::nic::release_vm(conn, vm)?;
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
    crate::model::delete_named(conn, vm)?;
    Ok(())
}

pub(in crate::model) fn apply(
    conn: &Connection,
    command: &ComputeCommand,
) -> Result<Outcome, CommandError> {
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
        } => create_vm(
            conn,
            vm_id,
            name,
            spec,
            *start,
            *stop_timeout_s,
            op_id,
            *now_ms,
        ),
        ComputeCommand::SetVmPower {
            vm,
            power,
            op_id,
            now_ms,
        } => set_vm_power(conn, vm, power, op_id, *now_ms),
        ComputeCommand::RebootVm {
            vm,
            force,
            op_id,
            now_ms,
        } => reboot_vm(conn, vm, *force, op_id, *now_ms),
        ComputeCommand::ResizeVm {
            vm,
            vcpus,
            memory_mib,
            op_id,
            now_ms,
        } => resize_vm(conn, vm, vcpus, memory_mib, op_id, *now_ms),
        ComputeCommand::AttachNic {
            vm,
            nic,
            op_id,
            now_ms,
        } => attach_nic(conn, vm, nic, op_id, *now_ms),
        ComputeCommand::DetachNic {
            vm,
            mac,
            op_id,
            now_ms,
        } => detach_nic(conn, vm, mac, op_id, *now_ms),
        ComputeCommand::DeleteVm { vm, op_id, now_ms } => delete_vm(conn, vm, op_id, *now_ms),
        ComputeCommand::PlaceVm {
            vm_id,
            host_id,
            now_ms,
        } => place_vm(conn, vm_id, *host_id, *now_ms),
        ComputeCommand::SetVmPending {
            vm_id,
            reason,
            now_ms,
        } => set_vm_pending(conn, vm_id, reason, *now_ms),
        ComputeCommand::ReportVm {
            vm_id,
            host_id,
            state,
            generation,
            reboot_seq,
            error,
            now_ms,
        } => report_vm(
            conn,
            vm_id,
            *host_id,
            state,
            *generation,
            *reboot_seq,
            error,
            *now_ms,
        ),
        ComputeCommand::CreateAffinityGroup {
            name,
            policy,
            now_ms,
        } => create_affinity_group(conn, name, policy, *now_ms),
        ComputeCommand::DeleteAffinityGroup { name } => delete_affinity_group(conn, name),
        ComputeCommand::RegisterTemplate { template } => register_template(conn, template),
        ComputeCommand::AddTemplateReplica {
            template_id,
            host_id,
        } => add_template_replica(conn, template_id, *host_id),
        ComputeCommand::MigrateVm {
            vm,
            target,
            op_id,
            now_ms,
        } => migrate_vm(conn, vm, target, op_id, *now_ms),
        ComputeCommand::FinishMigration {
            vm_id,
            target,
            error,
            now_ms,
        } => finish_migration(conn, vm_id, *target, error, *now_ms),
        ComputeCommand::SetHostMaintenance {
            host_id,
            maintenance,
            now_ms,
        } => set_host_maintenance(conn, *host_id, *maintenance, *now_ms),
        ComputeCommand::DeleteTemplate { template } => delete_template(conn, template),
        ComputeCommand::PruneOperations { finished_before_ms } => {
            prune_operations(conn, *finished_before_ms)
        }
    }
}

// One parameter per field of the command, as the dispatch destructures it.
#[allow(clippy::too_many_arguments)]
fn create_vm(
    conn: &Connection,
    vm_id: &str,
    name: &str,
    spec: &VmSpec,
    start: bool,
    stop_timeout_s: u32,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    crate::model::require_new_named::<Vm>(conn, "VM", vm_id, name)?;
    if stop_timeout_s > 3600 {
        return Err(invalid("stop timeout", "at most 3600 seconds"));
    }
    let spec = validate_spec(conn, spec, vm_id)?;
    let power = if start {
        PowerIntent::Running
    } else {
        PowerIntent::Stopped
    };
    let mut vm = Vm {
        id: vm_id.to_owned(),
        name: name.to_owned(),
        spec,
        generation: 1,
        power,
        stop_timeout_s,
        reboot_seq: 0,
        reboot_forced: false,
        deleting: false,
        host: None,
        pending_reason: None,
        observed: None,
        active_ops: Vec::new(),
        created_at_ms: now_ms,
        migration: None,
    };
    let goal = match power {
        PowerIntent::Running => OpGoal::Running { generation: 1 },
        PowerIntent::Stopped => OpGoal::Stopped { generation: 1 },
    };
    new_op(conn, op_id, OpKind::VmCreate, &mut vm, goal, now_ms)?;
    crate::model::put_named(conn, &vm)?;
    Ok(Outcome::Created {
        id: vm_id.to_owned(),
    })
}

fn set_vm_power(
    conn: &Connection,
    vm: &str,
    power: &PowerIntent,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
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
    new_op(conn, op_id, kind, &mut vm, goal, now_ms)?;
    settle_ops(conn, &mut vm, None, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn reboot_vm(
    conn: &Connection,
    vm: &str,
    force: bool,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut vm = require_vm(conn, vm)?;
    require_not_deleting(&vm)?;
    if vm.power != PowerIntent::Running {
        return Err(CommandError::VmState {
            vm: vm.name.clone(),
            reason: "it is stopped: start it instead".into(),
        });
    }
    vm.reboot_seq += 1;
    vm.reboot_forced = force;
    let goal = OpGoal::Rebooted { seq: vm.reboot_seq };
    new_op(conn, op_id, OpKind::VmReboot, &mut vm, goal, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn resize_vm(
    conn: &Connection,
    vm: &str,
    vcpus: &Option<u32>,
    memory_mib: &Option<u64>,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
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
    new_op(conn, op_id, OpKind::VmResize, &mut vm, goal, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn attach_nic(
    conn: &Connection,
    vm: &str,
    nic: &NicSpec,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
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
    new_op(conn, op_id, OpKind::NicAttach, &mut vm, goal, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn detach_nic(
    conn: &Connection,
    vm: &str,
    mac: &str,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut vm = require_vm(conn, vm)?;
    require_not_deleting(&vm)?;
    let Some(pos) = vm.spec.nics.iter().position(|n| {
        n.mac
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(mac))
    }) else {
        return Err(CommandError::NicUnknown {
            vm: vm.name.clone(),
            mac: mac.to_owned(),
        });
    };
    let nic = vm.spec.nics.remove(pos);
    crate::model::nic::release_nic(conn, &nic)?;
    vm.generation += 1;
    let goal = nic_change_goal(&vm);
    new_op(conn, op_id, OpKind::NicDetach, &mut vm, goal, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn delete_vm(
    conn: &Connection,
    vm: &str,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
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
            now_ms,
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
        now_ms,
    )?;
    if vm.host.is_none() {
        // Never placed: nothing exists on any host.
        finish_deleted(conn, &vm, now_ms)?;
    } else {
        put(conn, &vm)?;
    }
    Ok(Outcome::Created { id: vm.id })
}

fn place_vm(
    conn: &Connection,
    vm_id: &str,
    host_id: NodeId,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut vm = require_vm(conn, vm_id)?;
    if vm.deleting || vm.host.is_some() {
        return Ok(Outcome::Unchanged);
    }
    require_host(conn, host_id)?;
    if !candidate_hosts(conn, &vm)?.allows(host_id) {
        return Err(CommandError::VmState {
            vm: vm.name.clone(),
            reason: format!("host {host_id} no longer fits it"),
        });
    }
    vm.host = Some(host_id);
    vm.pending_reason = None;
    settle_ops(conn, &mut vm, None, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Done)
}

fn set_vm_pending(
    conn: &Connection,
    vm_id: &str,
    reason: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut vm = require_vm(conn, vm_id)?;
    if vm.host.is_some() || vm.pending_reason.as_deref() == Some(reason) {
        return Ok(Outcome::Unchanged);
    }
    vm.pending_reason = Some(reason.to_owned());
    settle_ops(conn, &mut vm, None, now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Done)
}

// One parameter per field of the command, as the dispatch destructures it.
#[allow(clippy::too_many_arguments)]
fn report_vm(
    conn: &Connection,
    vm_id: &str,
    host_id: NodeId,
    state: &RunState,
    generation: u64,
    reboot_seq: u64,
    error: &Option<String>,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let Some(mut vm) = read::<Vm>(conn, vm_id)? else {
        return Ok(Outcome::Unchanged);
    };
    if vm.host != Some(host_id) {
        // A report from a host the VM is no longer placed on.
        return Ok(Outcome::Unchanged);
    }
    if vm.deleting && *state == RunState::Absent && error.is_none() {
        finish_deleted(conn, &vm, now_ms)?;
        return Ok(Outcome::Done);
    }
    let since_ms = match &vm.observed {
        Some(o) if o.state == *state && o.host == host_id => o.since_ms,
        _ => now_ms,
    };
    let observed = VmObserved {
        host: host_id,
        state: *state,
        since_ms,
        generation,
        reboot_seq,
        last_error: error.clone(),
        reported_at_ms: now_ms,
    };
    vm.observed = Some(observed);
    settle_ops(conn, &mut vm, error.as_deref(), now_ms)?;
    put(conn, &vm)?;
    Ok(Outcome::Done)
}

fn create_affinity_group(
    conn: &Connection,
    name: &str,
    policy: &AffinityPolicy,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    validate_name("affinity group name", name)?;
    if read::<AffinityGroup>(conn, name)?.is_some() {
        return Err(CommandError::NameTaken {
            kind: "affinity group".into(),
            name: name.to_owned(),
        });
    }
    put(
        conn,
        &AffinityGroup {
            name: name.to_owned(),
            policy: *policy,
            created_at_ms: now_ms,
        },
    )?;
    Ok(Outcome::Created {
        id: name.to_owned(),
    })
}

fn delete_affinity_group(conn: &Connection, name: &str) -> Result<Outcome, CommandError> {
    if read::<AffinityGroup>(conn, name)?.is_none() {
        return Err(CommandError::AffinityGroupUnknown {
            group: name.to_owned(),
        });
    }
    let members: Vec<String> = list::<Vm>(conn)
        .map_err(store_err)?
        .into_iter()
        .filter(|vm| vm.spec.affinity_group.as_deref() == Some(name))
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

fn register_template(conn: &Connection, template: &Template) -> Result<Outcome, CommandError> {
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
    if template.sha256.len() != 64 || !template.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
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

fn add_template_replica(
    conn: &Connection,
    template_id: &str,
    host_id: NodeId,
) -> Result<Outcome, CommandError> {
    let Some(mut t) = read::<Template>(conn, template_id)? else {
        return Err(CommandError::TemplateUnknown {
            template: template_id.to_owned(),
        });
    };
    if t.replicas.contains(&host_id) {
        return Ok(Outcome::Unchanged);
    }
    require_host(conn, host_id)?;
    t.replicas.push(host_id);
    t.replicas.sort_unstable();
    put(conn, &t)?;
    Ok(Outcome::Done)
}

fn migrate_vm(
    conn: &Connection,
    vm: &str,
    target: &Option<NodeId>,
    op_id: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
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
                reason: "it is starting or stopping: wait until it is running or stopped".into(),
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
        (Some(t), candidates) if candidates.allows(*t) => *t,
        (Some(t), candidates) => {
            require_host(conn, *t)?;
            let why = match candidates {
                Placement::Nowhere { reason } => reason,
                Placement::Hosts(_) => "it does not pass the placement filters".into(),
            };
            return Err(CommandError::VmState {
                vm: vm.name.clone(),
                reason: format!("host {t} cannot take it: {why}"),
            });
        }
        (None, Placement::Hosts(hosts)) => match hosts.into_iter().find(|h| *h != source) {
            Some(h) => h,
            None => {
                return Err(CommandError::VmState {
                    vm: vm.name.clone(),
                    reason: "no other host can take it".into(),
                })
            }
        },
        (None, Placement::Nowhere { reason: why }) => {
            return Err(CommandError::VmState {
                vm: vm.name.clone(),
                reason: format!("no other host can take it: {why}"),
            })
        }
    };
    vm.migration = Some(VmMigration {
        target,
        live,
        started_at_ms: now_ms,
    });
    new_op(
        conn,
        op_id,
        OpKind::VmMigrate,
        &mut vm,
        OpGoal::OnHost { host: target },
        now_ms,
    )?;
    put(conn, &vm)?;
    Ok(Outcome::Created { id: vm.id })
}

fn finish_migration(
    conn: &Connection,
    vm_id: &str,
    target: NodeId,
    error: &Option<String>,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let Some(mut vm) = read::<Vm>(conn, vm_id)? else {
        return Ok(Outcome::Unchanged);
    };
    if vm.migration.as_ref().map(|m| m.target) != Some(target) {
        return Ok(Outcome::Unchanged);
    }
    let live = vm.migration.as_ref().is_some_and(|m| m.live);
    vm.migration = None;
    match error {
        None => {
            vm.host = Some(target);
            vm.observed = Some(VmObserved {
                host: target,
                state: if live {
                    RunState::Running
                } else {
                    RunState::Absent
                },
                since_ms: now_ms,
                generation: if live { vm.generation } else { 0 },
                reboot_seq: vm.reboot_seq,
                last_error: None,
                reported_at_ms: now_ms,
            });
            settle_ops(conn, &mut vm, None, now_ms)?;
        }
        Some(e) => {
            settle_ops(
                conn,
                &mut vm,
                Some(&format!("migration failed: {e}")),
                now_ms,
            )?;
        }
    }
    put(conn, &vm)?;
    Ok(Outcome::Done)
}

fn set_host_maintenance(
    conn: &Connection,
    host_id: NodeId,
    maintenance: bool,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let mut host = require_host(conn, host_id)?;
    let want = maintenance.then_some(crate::model::Maintenance { since_ms: now_ms });
    if host.maintenance.is_some() == maintenance {
        return Ok(Outcome::Unchanged);
    }
    host.maintenance = want;
    put(conn, &host)?;
    Ok(Outcome::Done)
}

fn delete_template(conn: &Connection, template: &str) -> Result<Outcome, CommandError> {
    let t = find_template(conn, template)
        .map_err(store_err)?
        .ok_or_else(|| CommandError::TemplateUnknown {
            template: template.to_owned(),
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

fn prune_operations(conn: &Connection, finished_before_ms: u64) -> Result<Outcome, CommandError> {
    let expired = expired_operations(conn, finished_before_ms).map_err(store_err)?;
    for id in &expired {
        delete::<Operation>(conn, id)?;
    }
    Ok(if expired.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Done
    })
}

/// Removes a deleted host's placements: its VMs become unplaced (the HA work restarts them
/// elsewhere; until then they wait for placement like new VMs).
pub(in crate::model) fn unplace_host_vms(
    conn: &Connection,
    host_id: NodeId,
) -> Result<(), CommandError> {
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
