//! What the compute side of a host shares: the host context ([`ComputeHost`]) that the
//! reconciler, migration and template transfer all work from, the domain a VM gets here
//! ([`build_domain`]), and the readiness of guest-network bridges ([`Bridges`]), which the
//! network reconciler publishes on a `watch` channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_adapters::hypervisor::domain_xml::{
    self, BootMode, DiskAttachment, DiskBus, DiskCache, DiskDevice, DiskFormat, DomainSpec,
    DomainType, KeelMetadata, NicAttachment, VncSpec,
};
use keel_adapters::hypervisor::seed::NoCloudSeed;
use keel_adapters::hypervisor::Hypervisor;
use keel_adapters::links::{tap_name, MacAddr};
use keel_cluster::model::compute::{BootSource, ImageFormat, NicSpec, Template, Vm};
use keel_cluster::model::{HypervisorReport, NetworkReport};
use keel_cluster::types::NodeId;
use keel_cluster::ClusterDb;
use tokio::sync::watch;
use uuid::Uuid;

use super::images::{DiskRequest, ImageError, Volumes};

/// What the host's reconciler needs; shared by the manager and every actor.
pub struct ComputeHost {
    pub db: ClusterDb,
    pub hv: Arc<dyn Hypervisor>,
    pub volumes: Arc<dyn Volumes>,
    pub templates: Arc<dyn TemplateSource>,
    pub resync: Duration,
    /// The hypervisor report, refreshed by the manager; the agent folds it into the
    /// host's inventory.
    pub report: watch::Sender<Option<HypervisorReport>>,
    /// The domain type VMs get here.
    pub domain_type: DomainType,
    /// The stream ports of the live migrations this host prepared to receive, by VM id:
    /// the only loopback ports a peer may open a migration stream to.
    pub incoming_streams:
        Mutex<std::collections::HashMap<String, crate::peer::protocol::StreamPorts>>,
    /// Runtime sockets (migration tunnels).
    pub run_dir: std::path::PathBuf,
    /// This host's libvirtd socket, for tunnelled control connections from other hosts.
    pub libvirt_socket: std::path::PathBuf,
    /// The guest the KVM probe boots.
    pub probe_guest: super::kvm_probe::ProbeGuest,
    /// The guest-network bridges the network reconciler has built here.
    pub bridges: Bridges,
    /// The KVM probe's verdict once it ran.
    pub kvm: Mutex<Option<super::kvm_probe::KvmVerdict>>,
}

/// The facts about this host that shape a VM's domain.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub node_id: NodeId,
    pub domain_type: DomainType,
}

/// Fetches templates this host lacks from a host that has them.
#[async_trait::async_trait]
pub trait TemplateSource: Send + Sync + 'static {
    async fn fetch(&self, template: &Template) -> Result<(), super::transfer::TemplateFetchError>;
}

/// Why a VM's domain could not be built here.
#[derive(Debug, thiserror::Error)]
pub enum DomainBuildError {
    #[error("preparing the disks and the seed of VM {vm_id}")]
    Disks {
        vm_id: String,
        #[source]
        source: ImageError,
    },
    #[error("VM id {vm_id} is not a UUID")]
    BadId {
        vm_id: String,
        #[source]
        source: uuid::Error,
    },
    #[error("rendering the domain XML of VM {vm_id}")]
    Render {
        vm_id: String,
        #[source]
        source: domain_xml::DomainXmlError,
    },
}

/// How long a start waits for the network reconciler to build a guest network's bridge.
pub const BRIDGE_WAIT: Duration = Duration::from_secs(20);
/// The guest-network bridges the network reconciler has built on this host: its last
/// report, published on a `watch` channel after every pass.
#[derive(Debug, Clone)]
pub struct Bridges(watch::Receiver<Option<NetworkReport>>);

/// A VM's network is not built on this host in time.
#[derive(Debug, thiserror::Error)]
#[error("the bridge {bridge} of its network is not on this host after {} s: see the host's network errors in `keel node list -o json`", .waited.as_secs())]
pub struct BridgeWaitError {
    pub bridge: String,
    pub waited: Duration,
}

impl Bridges {
    pub fn new(network_report: watch::Receiver<Option<NetworkReport>>) -> Self {
        Self(network_report)
    }

    /// Waits (blocking; call it on a blocking thread) until the bridges of a VM's
    /// guest-network NICs are built here, at most `limit`: the network reconciler builds
    /// them when the VM is placed here, and libvirt cannot start a domain whose bridge is
    /// missing.
    pub fn wait(&self, nics: &[NicSpec], limit: Duration) -> Result<(), BridgeWaitError> {
        let wanted: Vec<&str> = nics
            .iter()
            .filter(|n| n.network.is_some())
            .map(|n| n.bridge.as_str())
            .collect();
        let missing = |report: &Option<NetworkReport>| -> Option<String> {
            let built = report.as_ref().map_or(&[][..], |r| r.vnis.as_slice());
            wanted
                .iter()
                .find(|b| {
                    !built
                        .iter()
                        .any(|v| keel_base::names::bridge_name(*v) == **b)
                })
                .map(|b| b.to_string())
        };
        let Some(first_missing) = missing(&self.0.borrow()) else {
            return Ok(());
        };
        let mut rx = self.0.clone();
        let waited = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.block_on(async {
                tokio::time::timeout(limit, rx.wait_for(|r| missing(r).is_none())).await
            }),
            // No runtime (a unit test driving the reconciler by hand): what is built now
            // is all there will be.
            Err(_) => {
                return Err(BridgeWaitError {
                    bridge: first_missing,
                    waited: Duration::ZERO,
                })
            }
        };
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BridgeWaitError {
                bridge: missing(&self.0.borrow()).unwrap_or(first_missing),
                waited: limit,
            }),
        }
    }
}

/// The libvirt domain name of a VM: recognisable in `virsh list` and unique per host.
pub fn domain_name(vm: &Vm) -> String {
    format!("keel-{}", vm.name)
}

/// The VM's NICs as the domain carries them (a full definition and a hot-plug alike).
pub fn nic_attachments(vm: &Vm) -> Vec<NicAttachment> {
    vm.spec
        .nics
        .iter()
        .map(|n| NicAttachment {
            mac: n.mac.clone().unwrap_or_default().to_ascii_lowercase(),
            bridge: n.bridge.clone(),
            model: "virtio".into(),
            // Taps on guest networks get a name the firewall can match on.
            target_dev: n
                .network
                .as_ref()
                .and_then(|_| n.mac.as_deref()?.parse::<MacAddr>().ok())
                .map(tap_name),
        })
        .collect()
}

/// Whether the VM has a root disk (`vda`): always, except a kernel boot without a root
/// disk size.
pub fn has_root_disk(vm: &Vm, template: &Template) -> bool {
    template.format != ImageFormat::Kernel || vm.spec.root_disk_gib.is_some()
}

/// Creates the VM's disks and seed and renders its domain XML.
pub fn build_domain(
    volumes: &dyn Volumes,
    facts: &HostFacts,
    vm: &Vm,
    template: &Template,
) -> Result<String, DomainBuildError> {
    let seed = NoCloudSeed {
        instance_id: vm.id.clone(),
        hostname: vm.name.clone(),
        user_data: vm.spec.cloud_init.user_data.clone(),
        ssh_authorized_keys: vm.spec.cloud_init.ssh_keys.clone(),
        network_config: None,
    };
    let disks = volumes
        .ensure_vm_disks(&DiskRequest {
            vm_id: &vm.id,
            template_id: &template.id,
            template_format: template.format,
            root_size_bytes: vm.spec.root_disk_gib.map(|g| g << 30),
            data_disk_bytes: vm
                .spec
                .data_disks
                .iter()
                .map(|d| d.size_gib << 30)
                .collect(),
            seed: &seed,
        })
        .map_err(|source| DomainBuildError::Disks {
            vm_id: vm.id.clone(),
            source,
        })?;
    let disk =
        |path: &std::path::Path, format: DiskFormat, target: &str, device: DiskDevice, ro: bool| {
            DiskAttachment {
                path: path.to_path_buf(),
                format,
                target: target.into(),
                bus: if device == DiskDevice::Cdrom {
                    DiskBus::Sata
                } else {
                    DiskBus::Virtio
                },
                device,
                read_only: ro,
                cache: DiskCache::None_,
            }
        };
    let mut attachments = Vec::new();
    if has_root_disk(vm, template) {
        attachments.push(disk(
            &disks.root,
            DiskFormat::Qcow2,
            "vda",
            DiskDevice::Disk,
            false,
        ));
    }
    attachments.push(disk(
        &disks.seed,
        DiskFormat::Raw,
        "vdb",
        DiskDevice::Disk,
        true,
    ));
    for (i, path) in disks.data.iter().enumerate() {
        let target = format!("vd{}", (b'c' + i as u8) as char);
        attachments.push(disk(
            path,
            DiskFormat::Qcow2,
            &target,
            DiskDevice::Disk,
            false,
        ));
    }
    if let Some(iso) = &disks.cdrom {
        attachments.push(disk(iso, DiskFormat::Raw, "sda", DiskDevice::Cdrom, true));
    }
    let boot = match &vm.spec.boot {
        BootSource::Iso { .. } => BootMode::Cdrom,
        BootSource::Kernel {
            initrd, cmdline, ..
        } => BootMode::Kernel {
            kernel: volumes.template_path(&template.id, ImageFormat::Kernel),
            initrd: initrd
                .as_ref()
                .map(|id| volumes.template_path(id, ImageFormat::Initrd)),
            cmdline: cmdline.clone(),
        },
        BootSource::Template { .. } => BootMode::Disk,
    };
    let spec = DomainSpec {
        uuid: Uuid::parse_str(&vm.id).map_err(|source| DomainBuildError::BadId {
            vm_id: vm.id.clone(),
            source,
        })?,
        name: domain_name(vm),
        domain_type: facts.domain_type,
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        disks: attachments,
        boot,
        nics: nic_attachments(vm),
        serial_log: Some(disks.console_log.clone()),
        vnc: Some(VncSpec {
            listen: std::net::IpAddr::from([127, 0, 0, 1]),
        }),
        metadata: KeelMetadata {
            vm_id: vm.id.clone(),
            generation: vm.generation,
        },
    };
    domain_xml::render(&spec).map_err(|source| DomainBuildError::Render {
        vm_id: vm.id.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_cluster::model::compute::NicSpec;
    use keel_cluster::model::NetworkReport;
    use tokio::sync::watch;

    use super::Bridges;

    /// NICs on the guest networks whose bridges are `bridges`.
    fn on(bridges: &[&str]) -> Vec<NicSpec> {
        bridges
            .iter()
            .map(|b| NicSpec {
                bridge: b.to_string(),
                network: Some(format!("net-{b}")),
                ..Default::default()
            })
            .collect()
    }

    fn built(vnis: &[u32]) -> Option<NetworkReport> {
        Some(NetworkReport {
            vnis: vnis.to_vec(),
            errors: vec![],
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_waits_for_the_network_reconciler_to_build_the_bridges() {
        let (tx, rx) = watch::channel(built(&[4096]));
        let bridges = Bridges::new(rx);
        let nics = on(&["kbr4096", "kbr4097"]);
        let waiting =
            tokio::task::spawn_blocking(move || bridges.wait(&nics, Duration::from_secs(30)));
        // The waiter subscribes (a second receiver) once it found kbr4097 missing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tx.receiver_count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the waiter never waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!waiting.is_finished(), "kbr4097 is not built yet");
        // Another pass of the network reconciler builds the second network.
        tx.send_replace(built(&[4096, 4097]));
        let result = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the report")
            .expect("no panic");
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bridge_never_built_is_an_error_naming_it() {
        let (_tx, rx) = watch::channel(built(&[4096]));
        let bridges = Bridges::new(rx);
        let nics = on(&["kbr4096", "kbr4098"]);
        let err =
            tokio::task::spawn_blocking(move || bridges.wait(&nics, Duration::from_millis(200)))
                .await
                .expect("no panic")
                .expect_err("kbr4098 is never built");
        assert_eq!(err.bridge, "kbr4098");
        assert!(err.to_string().contains("kbr4098"), "{err}");
    }

    #[test]
    fn a_vm_without_guest_networks_never_waits() {
        let (_tx, rx) = watch::channel(None);
        let host_bridge = NicSpec {
            bridge: "br-host".into(),
            ..Default::default()
        };
        assert!(Bridges::new(rx)
            .wait(&[host_bridge], Duration::from_secs(60))
            .is_ok());
    }
}
