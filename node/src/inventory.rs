//! What a host reports about itself: the kernel's facts from the host probe adapter, put
//! into the cluster model's inventory record.

use keel_adapters::probe::{HostFacts, HostProbe};
use keel_cluster::model::{Disk, Inventory, KvmStatus, Nic};

/// The host's inventory as far as the kernel knows it; the agent adds what its own
/// adapters observe (hypervisor, network, host units).
pub fn probe(probe: &dyn HostProbe) -> Inventory {
    from_facts(probe.facts())
}

fn from_facts(facts: HostFacts) -> Inventory {
    Inventory {
        hostname: facts.hostname,
        kernel: facts.kernel,
        cpus: facts.cpus,
        cpu_model: facts.cpu_model,
        memory_bytes: facts.memory_bytes,
        disks: facts
            .disks
            .into_iter()
            .map(|d| Disk {
                name: d.name,
                size_bytes: d.size_bytes,
                model: d.model,
                rotational: d.rotational,
            })
            .collect(),
        nics: facts
            .nics
            .into_iter()
            .map(|n| Nic {
                name: n.name,
                mac: n.mac,
                mtu: n.mtu,
                addresses: n.addresses,
                up: n.up,
            })
            .collect(),
        kvm: KvmStatus {
            device_present: facts.kvm_device_present,
            usable: None,
            detail:
                "not probed yet: KVM is judged by booting a guest (compute probe), not by /dev/kvm"
                    .into(),
        },
        keel_version: env!("CARGO_PKG_VERSION").to_string(),
        hypervisor: None,
        network: None,
        host_units: None,
    }
}

#[cfg(test)]
mod tests {
    use keel_adapters::probe::fake::FakeProbe;
    use keel_adapters::probe::{HostFacts, ProbedNic};

    #[test]
    fn inventory_carries_the_facts_and_never_guesses_kvm() {
        let probe = FakeProbe::new(HostFacts {
            hostname: "h1".into(),
            kernel: "6.1.0".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            nics: vec![ProbedNic {
                name: "eth0".into(),
                mac: "52:54:00:00:00:01".into(),
                mtu: 1500,
                addresses: vec!["10.0.0.11/24".into()],
                up: true,
            }],
            kvm_device_present: true,
            ..HostFacts::default()
        });
        let inv = super::probe(&probe);
        assert_eq!((inv.hostname.as_str(), inv.cpus), ("h1", 4), "{inv:?}");
        assert_eq!(inv.memory_bytes, 8 << 30);
        assert_eq!(inv.nics[0].addresses, ["10.0.0.11/24"]);
        assert!(inv.kvm.device_present);
        assert_eq!(inv.kvm.usable, None, "usability is never guessed");
    }

    #[test]
    fn probe_reads_this_machine() {
        let inv = super::probe(&keel_adapters::probe::ProcSys::default());
        assert!(inv.cpus >= 1, "{inv:?}");
        assert!(inv.memory_bytes > 0, "{inv:?}");
        assert!(!inv.kernel.is_empty());
        assert_eq!(inv.kvm.usable, None, "usability is never guessed");
    }
}
