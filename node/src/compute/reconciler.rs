//! The per-host compute reconciler: makes this host's hypervisor match the VMs the cluster
//! placed here, and reports what it observed back through raft.
//!
//! One owning task per VM (its actor) does every hypervisor call for that VM, so two
//! actions on one VM never race. The manager loop wakes on every raft apply and on a timer,
//! reads the VMs placed on this host and hands each actor the latest record through a
//! watch channel (an actor always acts on the newest desired state, never on a backlog).
//!
//! ```text
//!  actor loop (one per VM):
//!    ┌──────────────────────────────────────────────────────────────────────┐
//!    ▼                                                                      │
//!  desired ──deleting──► destroy → undefine → remove disks → report absent ─┘ (ends)
//!    │
//!    ├─ not defined, or defined from an older generation while shut off:
//!    │      fetch template if missing → create disks/seed → define
//!    ├─ running from an older generation, power=running (NIC attach/detach):
//!    │      live XML: vCPUs/memory differ from the spec? → leave it (applied by the
//!    │        redefine above once the domain is shut off)
//!    │      else, NICs compared by MAC: wait for the bridges of new ones → attach the
//!    │        missing (live+config) → detach the extra (live+config) → poll the live XML
//!    │        until the guest released them (≤ 20 s, else error naming the NIC)
//!    │        → set the metadata generation (live+config)
//!    ├─ power=running: reboot requested? (stop-then-start, or reset if forced)
//!    │                 not running? start
//!    ├─ power=stopped: running? ACPI shutdown, wait ≤ stop timeout, then power off
//!    └─ report state/generation/reboot/error if it differs from the last report
//!       then wait for a new desired state or the resync timer (sooner after an error)
//! ```
//!
//! Idempotence: every step checks the hypervisor first, so running the loop again after a
//! crash at any point (node service or libvirtd) converges to one domain in the desired
//! state. A hot-plug interrupted before the metadata update finds the live NICs already
//! matching and only records the generation; a detach the guest has not finished is asked
//! again. Domains the cluster does not know are listed in the host's hypervisor report and
//! left alone; a domain of a VM that the cluster placed on another host is removed here
//! only once that host reports it running (so a VM is never lost between two hosts).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_cluster::db::now_ms;
use keel_cluster::error_chain;
use keel_cluster::model::compute::{
    find_template, ComputeCommand, PowerIntent, RunState, Template, Vm,
};
use keel_cluster::model::{self, Command, HypervisorReport};
use keel_cluster::types::NodeId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use keel_adapters::hypervisor::domain_xml::{self, DomainType, KeelMetadata, NicAttachment};
use keel_adapters::hypervisor::{DomainState, Hypervisor, HypervisorError};

use super::host::{
    build_domain, nic_attachments, BridgeWaitError, Bridges, ComputeHost, DomainBuildError,
    HostFacts, BRIDGE_WAIT,
};
use super::images::{ImageError, Volumes};
use crate::wake::Wakeups;

/// How often a graceful stop checks whether the guest is off.
const STOP_POLL: Duration = Duration::from_millis(250);
/// How long the KVM probe guest may take to print its boot marker.
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// How often a graceful stop presses the ACPI power button again.
const ACPI_REPEAT: Duration = Duration::from_secs(3);
/// How long a NIC hot-unplug waits for the guest to release the device.
#[cfg(not(test))]
pub const UNPLUG_WAIT: Duration = Duration::from_secs(20);
#[cfg(test)]
pub const UNPLUG_WAIT: Duration = Duration::from_millis(600);
/// How often the live XML is read while waiting for a hot-unplug.
const UNPLUG_POLL: Duration = Duration::from_millis(200);
/// Retry delay after a failed step.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(2);

/// One observation of a VM, as reported through raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub state: RunState,
    pub generation: u64,
    pub reboot_seq: u64,
    pub error: Option<String>,
}

struct ActorHandle {
    desired: watch::Sender<Option<Vm>>,
}

impl ComputeHost {
    /// Runs the manager until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some((node_id, mut wakeups)) = Wakeups::when_member(&self.db, &stop).await else {
            return;
        };
        tokio::spawn(self.clone().probe_kvm(stop.clone()));
        let mut actors: HashMap<String, ActorHandle> = HashMap::new();
        let mut last_probe: Option<Instant> = None;
        let mut facts: Option<HostFacts> = None;
        loop {
            if last_probe.is_none_or(|t| t.elapsed() >= self.resync) || facts.is_none() {
                facts = Some(self.probe(node_id).await);
                last_probe = Some(Instant::now());
            }
            let host_facts = facts.clone().unwrap_or(HostFacts {
                node_id,
                domain_type: DomainType::Qemu,
            });
            self.dispatch(&host_facts, &mut actors, &stop).await;
            if !wakeups.next(self.resync).await {
                break;
            }
        }
    }

    /// Reads the VMs placed here and feeds their actors; ends actors of VMs that left.
    async fn dispatch(
        self: &Arc<Self>,
        facts: &HostFacts,
        actors: &mut HashMap<String, ActorHandle>,
        stop: &CancellationToken,
    ) {
        let vms = match self.db.reader().read(model::list::<Vm>) {
            Ok(vms) => vms,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "compute: cannot read the VMs");
                return;
            }
        };
        let mine: HashMap<String, Vm> = vms
            .iter()
            .filter(|vm| vm.host == Some(facts.node_id))
            .map(|vm| (vm.id.clone(), vm.clone()))
            .collect();
        for (id, vm) in &mine {
            match actors.get(id) {
                Some(handle) if !handle.desired.is_closed() => {
                    handle.desired.send_replace(Some(vm.clone()));
                }
                _ => {
                    let (tx, rx) = watch::channel(Some(vm.clone()));
                    tokio::spawn(actor(self.clone(), facts.clone(), rx, stop.child_token()));
                    actors.insert(id.clone(), ActorHandle { desired: tx });
                }
            }
        }
        actors.retain(|id, handle| {
            if mine.contains_key(id) {
                return !handle.desired.is_closed();
            }
            // No longer placed here (deleted, or moved by the leader): the actor stops;
            // leftovers are handled by the orphan sweep below.
            handle.desired.send_replace(None);
            false
        });
        self.sweep_orphans(facts, &vms).await;
    }

    /// Lists domains the cluster does not place here. Unknown domains are reported (in the
    /// hypervisor report) and left alone; a Keel domain whose VM now runs elsewhere is
    /// removed here.
    async fn sweep_orphans(&self, facts: &HostFacts, vms: &[Vm]) {
        let hv = self.hv.clone();
        let Ok(Ok(domains)) = tokio::task::spawn_blocking(move || hv.list()).await else {
            return;
        };
        let by_id: HashMap<&str, &Vm> = vms.iter().map(|vm| (vm.id.as_str(), vm)).collect();
        let mut unknown = BTreeSet::new();
        for dom in domains {
            let id = dom.uuid.to_string();
            match by_id.get(id.as_str()) {
                Some(vm) if vm.host == Some(facts.node_id) => {}
                // An incoming migration: the source still owns it.
                Some(vm)
                    if vm
                        .migration
                        .as_ref()
                        .is_some_and(|m| m.target == facts.node_id) => {}
                Some(vm) => {
                    let running_elsewhere = vm
                        .observed
                        .as_ref()
                        .is_some_and(|o| Some(o.host) == vm.host && o.host != facts.node_id);
                    if running_elsewhere {
                        tracing::info!(vm = %vm.name, "compute: removing a stale copy of a VM that runs on another host");
                        let hv = self.hv.clone();
                        let volumes = self.volumes.clone();
                        let uuid = dom.uuid;
                        let vm_id = vm.id.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            hv.destroy(uuid)?;
                            hv.undefine(uuid)?;
                            let _ = volumes.delete_vm(&vm_id);
                            Ok::<_, keel_adapters::hypervisor::HypervisorError>(())
                        })
                        .await;
                    }
                }
                None if dom.name == "keel-kvm-probe" => {}
                None => {
                    unknown.insert(dom.name.clone());
                }
            }
        }
        self.report
            .send_if_modified(|report| match report.as_mut() {
                Some(r) if r.unmanaged_domains.iter().ne(unknown.iter()) => {
                    r.unmanaged_domains = unknown.into_iter().collect();
                    true
                }
                _ => false,
            });
    }

    /// Runs the KVM boot probe once libvirt answers. It runs beside the reconciler (a
    /// guest that hangs under KVM takes the whole deadline): VMs defined before the verdict
    /// run under TCG.
    async fn probe_kvm(self: Arc<Self>, stop: CancellationToken) {
        let caps = loop {
            let hv = self.hv.clone();
            if let Ok(Ok(caps)) = tokio::task::spawn_blocking(move || hv.capabilities()).await {
                break caps;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.resync) => {}
            }
        };
        let advertises = caps.domain_types.iter().any(|t| t == "kvm");
        let (hv, guest, run_dir) = (
            self.hv.clone(),
            self.probe_guest.clone(),
            self.run_dir.clone(),
        );
        let verdict = tokio::task::spawn_blocking(move || {
            super::kvm_probe::probe(
                hv.as_ref(),
                advertises,
                &guest,
                &run_dir,
                KVM_PROBE_DEADLINE,
            )
        })
        .await;
        if let Ok(v) = verdict {
            tracing::info!(usable = ?v.usable, detail = %v.detail, "compute: KVM probe");
            *self
                .kvm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v);
        }
    }

    /// Asks the hypervisor what it offers; the result goes into the host's inventory.
    async fn probe(&self, node_id: NodeId) -> HostFacts {
        let hv = self.hv.clone();
        let caps = tokio::task::spawn_blocking(move || hv.capabilities()).await;
        let previous_unmanaged = self
            .report
            .borrow()
            .as_ref()
            .map(|r| r.unmanaged_domains.clone())
            .unwrap_or_default();
        // KVM only when a guest has been seen to boot under it; advertising `kvm` proves
        // nothing on nested hosts.
        let kvm = self
            .kvm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let kvm_usable = kvm.as_ref().and_then(|v| v.usable);
        let kvm_detail = kvm.map_or_else(|| "probe running".to_string(), |v| v.detail);
        let domain_type = if kvm_usable == Some(true) {
            DomainType::Kvm
        } else {
            DomainType::Qemu
        };
        let type_name = if domain_type == DomainType::Kvm {
            "kvm"
        } else {
            "qemu"
        };
        let report = match caps {
            Ok(Ok(caps)) => HypervisorReport {
                domain_type: type_name.into(),
                libvirt_version: caps.libvirt_version,
                hypervisor_version: caps.hypervisor_version,
                error: (!caps.domain_types.iter().any(|t| t == "qemu"))
                    .then(|| "libvirt offers no qemu domain type".to_string()),
                unmanaged_domains: previous_unmanaged,
                kvm_usable,
                kvm_detail,
            },
            Ok(Err(e)) => HypervisorReport {
                domain_type: type_name.into(),
                error: Some(error_chain(&e)),
                unmanaged_domains: previous_unmanaged,
                kvm_usable,
                kvm_detail,
                ..Default::default()
            },
            Err(e) => HypervisorReport {
                domain_type: type_name.into(),
                error: Some(format!("probe task failed: {e}")),
                kvm_usable,
                kvm_detail,
                ..Default::default()
            },
        };
        self.report.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&report);
            *current = Some(report);
            changed
        });
        HostFacts {
            node_id,
            domain_type,
        }
    }
}

/// One VM's owning task.
async fn actor(
    host: Arc<ComputeHost>,
    facts: HostFacts,
    mut desired: watch::Receiver<Option<Vm>>,
    stop: CancellationToken,
) {
    let mut reboot_done: Option<u64> = None;
    loop {
        let Some(vm) = desired.borrow_and_update().clone() else {
            return;
        };
        if let Some(m) = vm.migration.clone() {
            // While a move is recorded, the migration is the only thing done with the VM.
            super::migration::migrate_out(&host, &vm, &m).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                r = desired.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
            }
            continue;
        }
        // A reboot is owed only if requested after what this host last carried out.
        let done = *reboot_done.get_or_insert(match &vm.observed {
            Some(o) if o.host == facts.node_id => o.reboot_seq,
            _ => vm.reboot_seq,
        });
        let needed: Vec<Template> = vm
            .spec
            .boot
            .templates()
            .into_iter()
            .filter_map(|id| {
                host.db
                    .reader()
                    .read(|c| find_template(c, id))
                    .ok()
                    .flatten()
            })
            .collect();
        let template = needed.first().cloned();
        let mut fetch_error = None;
        for t in &needed {
            if !vm.deleting && !host.volumes.has_template(&t.id, t.format) {
                if let Err(e) = host.templates.fetch(t).await {
                    fetch_error = Some(format!(
                        "template {} is not available here: {}",
                        t.name,
                        error_chain(&e)
                    ));
                    break;
                }
            }
        }
        let observation = match fetch_error {
            Some(error) => Observation {
                state: RunState::Absent,
                generation: 0,
                reboot_seq: done,
                error: Some(error),
            },
            None => {
                let (hv, volumes, bridges, facts2, vm2) = (
                    host.hv.clone(),
                    host.volumes.clone(),
                    host.bridges.clone(),
                    facts.clone(),
                    vm.clone(),
                );
                let mut done2 = done;
                match tokio::task::spawn_blocking(move || {
                    let obs = converge(
                        hv.as_ref(),
                        volumes.as_ref(),
                        &bridges,
                        &facts2,
                        &vm2,
                        template.as_ref(),
                        &mut done2,
                    );
                    (obs, done2)
                })
                .await
                {
                    Ok((obs, d)) => {
                        reboot_done = Some(d);
                        obs
                    }
                    Err(e) => Observation {
                        state: RunState::Unknown,
                        generation: 0,
                        reboot_seq: done,
                        error: Some(format!("reconcile task failed: {e}")),
                    },
                }
            }
        };
        let failed = observation.error.is_some();
        report(&host, &facts, &vm, &observation).await;
        if vm.deleting && observation.state == RunState::Absent && !failed {
            return;
        }
        let wait = if failed {
            RETRY_AFTER_ERROR
        } else {
            host.resync
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Writes the observation to raft unless the state already says the same.
async fn report(host: &ComputeHost, facts: &HostFacts, vm: &Vm, obs: &Observation) {
    let same = vm.observed.as_ref().is_some_and(|o| {
        o.host == facts.node_id
            && o.state == obs.state
            && o.generation == obs.generation
            && o.reboot_seq == obs.reboot_seq
            && o.last_error == obs.error
    });
    if same && !(vm.deleting && obs.state == RunState::Absent) {
        return;
    }
    if let Some(e) = &obs.error {
        tracing::warn!(vm = %vm.name, error = %e, "compute: VM not converged");
    } else {
        tracing::info!(vm = %vm.name, state = %obs.state, generation = obs.generation, "compute: VM state");
    }
    let command = Command::Compute {
        command: ComputeCommand::ReportVm {
            vm_id: vm.id.clone(),
            host_id: facts.node_id,
            state: obs.state,
            generation: obs.generation,
            reboot_seq: obs.reboot_seq,
            error: obs.error.clone(),
            now_ms: now_ms(),
        },
    };
    if let Err(e) = host.db.write(command).await {
        tracing::debug!(vm = %vm.name, error = %error_chain(&e), "compute: report not written; will retry");
    }
}

fn run_state(state: DomainState) -> RunState {
    match state {
        DomainState::Running => RunState::Running,
        DomainState::Paused => RunState::Paused,
        DomainState::ShuttingDown => RunState::ShuttingDown,
        DomainState::ShutOff => RunState::Stopped,
        DomainState::Crashed => RunState::Crashed,
        DomainState::Other => RunState::Unknown,
    }
}

/// Brings one VM's domain to its desired state. Blocking; returns what it then observes.
pub fn converge(
    hv: &dyn Hypervisor,
    volumes: &dyn Volumes,
    bridges: &Bridges,
    facts: &HostFacts,
    vm: &Vm,
    template: Option<&Template>,
    reboot_done: &mut u64,
) -> Observation {
    let mut generation = 0;
    let result = (|| -> Result<RunState, ConvergeError> {
        let uuid = Uuid::parse_str(&vm.id).map_err(ConvergeError::BadId)?;
        if vm.deleting {
            hv.destroy(uuid)?;
            hv.undefine(uuid)?;
            volumes.delete_vm(&vm.id)?;
            return Ok(RunState::Absent);
        }
        let mut dom = hv.lookup(uuid)?;
        if let Some(d) = &dom {
            generation = defined_generation(hv, uuid);
            let _ = d;
        }
        let stale = dom
            .as_ref()
            .is_some_and(|d| d.state == DomainState::ShutOff && generation != vm.generation);
        if dom.is_none() || stale {
            let template = template
                .ok_or_else(|| ConvergeError::TemplateGone(vm.spec.boot.template().to_string()))?;
            let xml = build_domain(volumes, facts, vm, template)?;
            hv.define(&xml)?;
            generation = vm.generation;
            dom = hv.lookup(uuid)?;
        }
        let state = dom.map_or(DomainState::ShutOff, |d| d.state);
        if vm.power == PowerIntent::Running
            && state == DomainState::Running
            && generation != vm.generation
        {
            if let Some(g) = hot_plug_nics(hv, bridges, uuid, vm)? {
                generation = g;
            }
        }
        match vm.power {
            PowerIntent::Running => {
                if vm.reboot_seq > *reboot_done && state == DomainState::Running {
                    if vm.reboot_forced {
                        hv.reset(uuid)?;
                    } else {
                        graceful_stop(hv, uuid, vm.stop_timeout_s)?;
                        hv.start(uuid)?;
                    }
                    *reboot_done = vm.reboot_seq;
                } else if matches!(state, DomainState::ShutOff | DomainState::Crashed) {
                    if state == DomainState::Crashed {
                        hv.destroy(uuid)?;
                    }
                    bridges.wait(&vm.spec.nics, BRIDGE_WAIT)?;
                    hv.start(uuid)?;
                    *reboot_done = vm.reboot_seq;
                }
            }
            PowerIntent::Stopped => {
                if !matches!(state, DomainState::ShutOff) {
                    graceful_stop(hv, uuid, vm.stop_timeout_s)?;
                }
                *reboot_done = vm.reboot_seq;
            }
        }
        let now = hv.lookup(uuid)?;
        Ok(now.map_or(RunState::Absent, |d| run_state(d.state)))
    })();
    match result {
        Ok(state) => Observation {
            state,
            generation: if state == RunState::Absent {
                0
            } else {
                generation
            },
            reboot_seq: *reboot_done,
            error: None,
        },
        Err(error) => {
            let state = Uuid::parse_str(&vm.id)
                .ok()
                .and_then(|u| hv.lookup(u).ok().flatten())
                .map_or(RunState::Absent, |d| run_state(d.state));
            Observation {
                state,
                generation,
                reboot_seq: *reboot_done,
                error: Some(error_chain(&error)),
            }
        }
    }
}

/// Why a pass over one VM failed; its chain is the error the VM's observation carries.
#[derive(Debug, thiserror::Error)]
enum ConvergeError {
    #[error("VM id is not a UUID")]
    BadId(#[source] uuid::Error),
    #[error("template {0} no longer exists")]
    TemplateGone(String),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Disks(#[from] ImageError),
    #[error(transparent)]
    Domain(#[from] DomainBuildError),
    #[error(transparent)]
    Bridges(#[from] BridgeWaitError),
    #[error(transparent)]
    DomainXml(#[from] domain_xml::DomainXmlError),
    #[error("hot-plugging NIC {mac}")]
    HotPlug {
        mac: String,
        #[source]
        source: HypervisorError,
    },
    #[error("NIC {mac} of the running domain")]
    RunningNic {
        mac: String,
        #[source]
        source: domain_xml::DomainXmlError,
    },
    #[error("hot-unplugging NIC {mac}")]
    HotUnplug {
        mac: String,
        #[source]
        source: HypervisorError,
    },
    #[error("the guest did not release NIC {macs} within {} s of the hot-unplug request (does it handle ACPI PCI hot-unplug?); the NIC is gone from the domain's definition and leaves the guest at its next stop", .waited.as_secs_f32())]
    NotReleased { macs: String, waited: Duration },
}

/// The spec generation a defined domain was built from (0 when it carries no Keel
/// metadata, which forces a redefine).
fn defined_generation(hv: &dyn Hypervisor, uuid: Uuid) -> u64 {
    hv.xml(uuid)
        .ok()
        .and_then(|xml| domain_xml::read_metadata(&xml).ok().flatten())
        .map_or(0, |m| m.generation)
}

/// ACPI shutdown, wait up to `timeout_s`, then power off.
fn graceful_stop(hv: &dyn Hypervisor, uuid: Uuid, timeout_s: u32) -> Result<(), ConvergeError> {
    if timeout_s > 0 {
        hv.shutdown(uuid)?;
        let deadline = Instant::now() + Duration::from_secs(u64::from(timeout_s));
        let mut last_request = Instant::now();
        while Instant::now() < deadline {
            match hv.lookup(uuid)? {
                None => return Ok(()),
                Some(d) if d.state == DomainState::ShutOff => return Ok(()),
                Some(_) => std::thread::sleep(STOP_POLL),
            }
            // A guest still booting drops an ACPI press it gets before its handler runs;
            // pressing again now and then is what an operator would do.
            if last_request.elapsed() >= ACPI_REPEAT {
                let _ = hv.shutdown(uuid);
                last_request = Instant::now();
            }
        }
        tracing::info!(%uuid, timeout_s, "compute: guest did not power off in time; forcing");
    }
    Ok(hv.destroy(uuid)?)
}

/// Makes a running domain's NICs match the VM's spec without a restart: attaches the NICs
/// its live XML lacks, detaches those the spec no longer has (and waits, bounded, for the
/// guest to release them), then records the spec generation in the domain's metadata.
/// Returns that generation, or `None` when the spec differs from the running domain in
/// more than its NICs (vCPUs, memory): such changes wait for the domain's next start.
/// Every step reads the live XML first, so a pass interrupted anywhere converges on the
/// next one.
fn hot_plug_nics(
    hv: &dyn Hypervisor,
    bridges: &Bridges,
    uuid: Uuid,
    vm: &Vm,
) -> Result<Option<u64>, ConvergeError> {
    let xml = hv.xml(uuid)?;
    let size = domain_xml::summarize(&xml)?;
    if size.vcpus != vm.spec.vcpus || size.memory_kib != vm.spec.memory_mib * 1024 {
        return Ok(None);
    }
    let live = domain_xml::read_nics(&xml)?;
    let wanted = nic_attachments(vm);
    let has =
        |list: &[NicAttachment], mac: &str| list.iter().any(|n| n.mac.eq_ignore_ascii_case(mac));
    let missing: Vec<&NicAttachment> = wanted.iter().filter(|n| !has(&live, &n.mac)).collect();
    let extra: Vec<NicAttachment> = live
        .iter()
        .filter(|n| !has(&wanted, &n.mac))
        .map(|n| NicAttachment {
            // libvirt finds the device to remove by its MAC.
            target_dev: None,
            model: if n.model.is_empty() {
                "virtio".into()
            } else {
                n.model.clone()
            },
            ..n.clone()
        })
        .collect();
    if !missing.is_empty() {
        bridges.wait(&vm.spec.nics, BRIDGE_WAIT)?;
    }
    for nic in &missing {
        let device = domain_xml::render_nic(nic)?;
        hv.attach_device(uuid, &device)
            .map_err(|source| ConvergeError::HotPlug {
                mac: nic.mac.clone(),
                source,
            })?;
        tracing::info!(vm = %vm.name, mac = %nic.mac, "compute: NIC hot-plugged");
    }
    for nic in &extra {
        let device = domain_xml::render_nic(nic).map_err(|source| ConvergeError::RunningNic {
            mac: nic.mac.clone(),
            source,
        })?;
        hv.detach_device(uuid, &device)
            .map_err(|source| ConvergeError::HotUnplug {
                mac: nic.mac.clone(),
                source,
            })?;
    }
    if !extra.is_empty() {
        let deadline = Instant::now() + UNPLUG_WAIT;
        loop {
            let xml = hv.xml(uuid)?;
            let now = domain_xml::read_nics(&xml)?;
            let left: Vec<&str> = extra
                .iter()
                .filter(|n| has(&now, &n.mac))
                .map(|n| n.mac.as_str())
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ConvergeError::NotReleased {
                    macs: left.join(", "),
                    waited: UNPLUG_WAIT,
                });
            }
            std::thread::sleep(UNPLUG_POLL);
        }
        for nic in &extra {
            tracing::info!(vm = %vm.name, mac = %nic.mac, "compute: NIC hot-unplugged");
        }
    }
    hv.set_metadata(
        uuid,
        &KeelMetadata {
            vm_id: vm.id.clone(),
            generation: vm.generation,
        },
    )?;
    Ok(Some(vm.generation))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use std::sync::Mutex;

    use keel_cluster::model::compute::{BootSource, CloudInit, ImageFormat, VmSpec};

    use super::*;
    use crate::compute::images::{DiskRequest, ImageError, VmDisks};
    use keel_adapters::hypervisor::fake::{FakeHypervisor, FakeOp};

    /// Volumes that only remember what was asked of them.
    #[derive(Default)]
    struct FakeVolumes {
        created: Mutex<Vec<String>>,
        deleted: Mutex<Vec<String>>,
    }

    impl Volumes for FakeVolumes {
        fn has_template(&self, _: &str, _: ImageFormat) -> bool {
            true
        }
        fn template_path(&self, id: &str, _: ImageFormat) -> PathBuf {
            PathBuf::from(format!("/images/templates/{id}.qcow2"))
        }
        fn ensure_vm_disks(&self, req: &DiskRequest<'_>) -> Result<VmDisks, ImageError> {
            self.created
                .lock()
                .expect("lock")
                .push(req.vm_id.to_string());
            Ok(self.vm_paths(req.vm_id, req.data_disk_bytes.len(), None))
        }
        fn delete_vm(&self, vm_id: &str) -> Result<(), ImageError> {
            self.deleted.lock().expect("lock").push(vm_id.to_string());
            Ok(())
        }
        fn vm_paths(&self, vm_id: &str, data: usize, cdrom: Option<PathBuf>) -> VmDisks {
            let dir = PathBuf::from(format!("/images/vms/{vm_id}"));
            VmDisks {
                root: dir.join("root.qcow2"),
                cdrom,
                data: (0..data)
                    .map(|i| dir.join(format!("data-{i}.qcow2")))
                    .collect(),
                seed: dir.join("seed.img"),
                console_log: dir.join("console.log"),
            }
        }
    }

    fn template() -> Template {
        Template {
            id: "t1".into(),
            name: "tiny".into(),
            format: ImageFormat::Qcow2,
            size_bytes: 1,
            virtual_size_bytes: 1,
            sha256: "0".repeat(64),
            replicas: vec![1],
            created_at_ms: 1,
        }
    }

    fn vm() -> Vm {
        Vm {
            id: "6f1c1d8e-8a8e-4c47-9d1e-3a1f6a0c2b11".into(),
            name: "web".into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 128,
                boot: BootSource::Template {
                    template: "t1".into(),
                },
                root_disk_gib: None,
                data_disks: vec![],
                nics: vec![],
                cloud_init: CloudInit::default(),
                affinity_group: None,
                ha: false,
            },
            generation: 1,
            power: PowerIntent::Running,
            stop_timeout_s: 1,
            reboot_seq: 0,
            reboot_forced: false,
            deleting: false,
            host: Some(1),
            pending_reason: None,
            observed: None,
            active_ops: vec![],
            created_at_ms: 1,
            migration: None,
        }
    }

    fn facts() -> HostFacts {
        HostFacts {
            node_id: 1,
            domain_type: DomainType::Qemu,
        }
    }

    fn step(hv: &FakeHypervisor, vols: &FakeVolumes, vm: &Vm, done: &mut u64) -> Observation {
        let no_networks_built = Bridges::new(tokio::sync::watch::channel(None).1);
        converge(
            hv,
            vols,
            &no_networks_built,
            &facts(),
            vm,
            Some(&template()),
            done,
        )
    }

    #[test]
    fn a_new_vm_is_defined_and_started_once() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut done = 0;
        let obs = step(&hv, &vols, &vm(), &mut done);
        assert_eq!(obs.state, RunState::Running, "{obs:?}");
        assert_eq!(obs.generation, 1);
        assert_eq!(obs.error, None);
        // Converging again changes nothing on the hypervisor.
        let again = step(&hv, &vols, &vm(), &mut done);
        assert_eq!(again, obs);
        assert_eq!(hv.calls(FakeOp::Define), 1);
        assert_eq!(hv.calls(FakeOp::Start), 1);
        assert_eq!(hv.domains().len(), 1);
        let dom = hv.domains().into_values().next().expect("domain");
        assert_eq!(dom.current().name, "keel-web");
    }

    #[test]
    fn a_stop_the_guest_ignores_is_forced_after_the_timeout() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        let mut done = 0;
        step(&hv, &vols, &v, &mut done);
        let uuid = Uuid::parse_str(&v.id).expect("uuid");
        hv.set_ignores_acpi(uuid, true);
        v.power = PowerIntent::Stopped;
        let started = Instant::now();
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(obs.state, RunState::Stopped, "{obs:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "waited for the guest first"
        );
        assert!(hv.calls(FakeOp::Shutdown) >= 1);
        assert_eq!(hv.calls(FakeOp::Destroy), 1);
    }

    #[test]
    fn a_resize_redefines_the_stopped_domain_and_a_delete_removes_everything() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        v.power = PowerIntent::Stopped;
        let mut done = 0;
        assert_eq!(step(&hv, &vols, &v, &mut done).state, RunState::Stopped);
        v.spec.vcpus = 2;
        v.generation = 2;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.generation), (RunState::Stopped, 2));
        assert_eq!(hv.calls(FakeOp::Define), 2);
        let dom = hv.domains().into_values().next().expect("domain");
        assert_eq!(dom.current().vcpus, 2);

        v.deleting = true;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(obs.state, RunState::Absent);
        assert!(hv.domains().is_empty());
        assert_eq!(
            vols.deleted.lock().expect("lock").as_slice(),
            [v.id.clone()]
        );
        // Deleting again (a retry after a crash) succeeds too.
        assert_eq!(step(&hv, &vols, &v, &mut done).error, None);
    }

    #[test]
    fn reboots_are_carried_out_once_and_forced_ones_reset() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        let mut done = 0;
        step(&hv, &vols, &v, &mut done);
        v.reboot_seq = 1;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.reboot_seq), (RunState::Running, 1));
        assert_eq!(hv.calls(FakeOp::Shutdown), 1);
        assert_eq!(hv.calls(FakeOp::Start), 2);
        step(&hv, &vols, &v, &mut done);
        assert_eq!(hv.calls(FakeOp::Start), 2, "a reboot is not repeated");
        v.reboot_seq = 2;
        v.reboot_forced = true;
        step(&hv, &vols, &v, &mut done);
        assert_eq!(hv.calls(FakeOp::Reset), 1);
    }

    #[test]
    fn a_hypervisor_failure_is_reported_and_the_next_pass_recovers() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        hv.fail_next(FakeOp::Start);
        let mut done = 0;
        let obs = step(&hv, &vols, &vm(), &mut done);
        assert_eq!(obs.state, RunState::Stopped);
        let error = obs.error.expect("error");
        assert!(error.contains("start"), "{error}");
        let obs = step(&hv, &vols, &vm(), &mut done);
        assert_eq!((obs.state, obs.error), (RunState::Running, None));
        assert_eq!(hv.calls(FakeOp::Define), 1, "defined once across the retry");
    }

    fn nic(mac: &str) -> keel_cluster::model::compute::NicSpec {
        keel_cluster::model::compute::NicSpec {
            bridge: "br-test".into(),
            mac: Some(mac.into()),
            ..Default::default()
        }
    }

    /// The MACs of the live and the persistent definition, and their metadata generation.
    fn nics_of(hv: &FakeHypervisor, vm: &Vm) -> (Vec<String>, Vec<String>, u64, u64) {
        let dom = hv
            .domain(Uuid::parse_str(&vm.id).expect("uuid"))
            .expect("domain");
        let live = dom.live.as_ref().expect("running");
        let macs = |xml: &str| -> Vec<String> {
            domain_xml::read_nics(xml)
                .expect("nics")
                .into_iter()
                .map(|n| n.mac)
                .collect()
        };
        let generation = |xml: &str| {
            domain_xml::read_metadata(xml)
                .expect("metadata")
                .expect("keel metadata")
                .generation
        };
        (
            macs(&live.xml),
            macs(&dom.config.xml),
            generation(&live.xml),
            generation(&dom.config.xml),
        )
    }

    const MAC_A: &str = "52:54:00:00:00:0a";
    const MAC_B: &str = "52:54:00:00:00:0b";
    const MAC_C: &str = "52:54:00:00:00:0c";

    #[test]
    fn nics_are_hot_plugged_into_a_running_domain_once() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        v.spec.nics = vec![nic(MAC_A)];
        let mut done = 0;
        assert_eq!(step(&hv, &vols, &v, &mut done).state, RunState::Running);

        v.spec.nics.push(nic(MAC_B));
        v.generation = 2;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(
            (obs.state, obs.generation, obs.error.as_deref()),
            (RunState::Running, 2, None)
        );
        let both = vec![MAC_A.to_string(), MAC_B.to_string()];
        assert_eq!(nics_of(&hv, &v), (both.clone(), both, 2, 2));
        // The attached device is what a full definition has for that NIC.
        let dom = hv.domains().into_values().next().expect("domain");
        let live = domain_xml::read_nics(&dom.live.expect("live").xml).expect("nics");
        assert_eq!(live[1], nic_attachments(&v)[1]);
        assert_eq!(
            (hv.calls(FakeOp::Define), hv.calls(FakeOp::Start)),
            (1, 1),
            "no redefine, no restart"
        );
        assert_eq!(hv.calls(FakeOp::AttachDevice), 1);
        // Running again changes nothing.
        hv.reset_calls();
        assert_eq!(step(&hv, &vols, &v, &mut done), obs);
        let changed: Vec<FakeOp> = hv
            .all_calls()
            .into_keys()
            .filter(|op| !matches!(op, FakeOp::Lookup | FakeOp::Xml))
            .collect();
        assert!(changed.is_empty(), "{changed:?}");

        // Detach while running: gone from both definitions once the guest let go.
        v.spec.nics.remove(0);
        v.generation = 3;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(
            (obs.state, obs.generation, obs.error.as_deref()),
            (RunState::Running, 3, None)
        );
        let b = vec![MAC_B.to_string()];
        assert_eq!(nics_of(&hv, &v), (b.clone(), b, 3, 3));
        assert_eq!(hv.calls(FakeOp::DetachDevice), 1);
        hv.reset_calls();
        assert_eq!(step(&hv, &vols, &v, &mut done), obs);
        assert_eq!(hv.calls(FakeOp::DetachDevice), 0);
        assert_eq!(hv.calls(FakeOp::SetMetadata), 0);

        // Stopped and started again, the domain keeps the NICs (no redefine needed).
        v.power = PowerIntent::Stopped;
        step(&hv, &vols, &v, &mut done);
        v.power = PowerIntent::Running;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.generation), (RunState::Running, 3));
        assert_eq!(hv.calls(FakeOp::Define), 0);
    }

    #[test]
    fn a_hot_plug_interrupted_before_the_metadata_update_converges() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        v.spec.nics = vec![nic(MAC_A)];
        let mut done = 0;
        step(&hv, &vols, &v, &mut done);
        v.spec.nics.push(nic(MAC_C));
        v.generation = 2;
        // The node service dies after the attach: modelled by the metadata update failing.
        hv.fail_next(FakeOp::SetMetadata);
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.generation), (RunState::Running, 1));
        assert!(obs.error.is_some());
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(
            (obs.state, obs.generation, obs.error.as_deref()),
            (RunState::Running, 2, None)
        );
        assert_eq!(hv.calls(FakeOp::AttachDevice), 1, "not attached twice");
        let both = vec![MAC_A.to_string(), MAC_C.to_string()];
        assert_eq!(nics_of(&hv, &v), (both.clone(), both, 2, 2));
        // A failed attach is retried on the next pass.
        v.spec.nics.push(nic(MAC_B));
        v.generation = 3;
        hv.fail_next(FakeOp::AttachDevice);
        let obs = step(&hv, &vols, &v, &mut done);
        let error = obs.error.expect("error");
        assert!(error.contains(MAC_B), "{error}");
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.generation, obs.error), (3, None));
    }

    #[test]
    fn a_guest_that_keeps_a_nic_gets_an_error_naming_it_and_a_later_pass_finishes() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        v.spec.nics = vec![nic(MAC_A), nic(MAC_B)];
        let mut done = 0;
        step(&hv, &vols, &v, &mut done);
        let uuid = Uuid::parse_str(&v.id).expect("uuid");
        hv.set_ignores_unplug(uuid, true);
        v.spec.nics.truncate(1);
        v.generation = 2;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.generation), (RunState::Running, 1));
        let error = obs.error.expect("error");
        assert!(
            error.contains(MAC_B) && error.contains("did not release"),
            "{error}"
        );
        // Out of the persistent definition already, still in the guest.
        let (live, config, _, _) = nics_of(&hv, &v);
        assert_eq!((live.len(), config), (2, vec![MAC_A.to_string()]));
        // A pass while it still holds on asks again, with the same error.
        hv.reset_calls();
        let obs = step(&hv, &vols, &v, &mut done);
        assert!(obs.error.is_some_and(|e| e.contains(MAC_B)));
        assert_eq!(hv.calls(FakeOp::DetachDevice), 1);
        // The guest lets go at last: the next pass finishes.
        hv.set_ignores_unplug(uuid, false);
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.generation, obs.error), (2, None));
        let a = vec![MAC_A.to_string()];
        assert_eq!(nics_of(&hv, &v), (a.clone(), a, 2, 2));
    }

    #[test]
    fn other_changes_to_a_running_domain_wait_for_its_next_start() {
        let (hv, vols) = (FakeHypervisor::new(), FakeVolumes::default());
        let mut v = vm();
        let mut done = 0;
        step(&hv, &vols, &v, &mut done);
        v.spec.vcpus = 2;
        v.spec.nics = vec![nic(MAC_A)];
        v.generation = 2;
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!(
            (obs.state, obs.generation, obs.error),
            (RunState::Running, 1, None)
        );
        assert_eq!(hv.calls(FakeOp::AttachDevice), 0);
        v.power = PowerIntent::Stopped;
        step(&hv, &vols, &v, &mut done);
        let obs = step(&hv, &vols, &v, &mut done);
        assert_eq!((obs.state, obs.generation), (RunState::Stopped, 2));
        assert_eq!(hv.calls(FakeOp::Define), 2);
    }
}
