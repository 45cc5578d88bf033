//! What a host reports about itself, read from /proc and /sys.

use std::fs;
use std::path::Path;

use keel_cluster::model::{Disk, Inventory, KvmStatus, Nic};

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

pub fn probe() -> Inventory {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u32;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let memory_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let uname = nix::sys::utsname::uname().ok();
    Inventory {
        hostname: uname
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus,
        cpu_model,
        memory_bytes,
        disks: disks(),
        nics: nics(),
        kvm: KvmStatus {
            device_present: Path::new("/dev/kvm").exists(),
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

fn disks() -> Vec<Disk> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return vec![];
    };
    let mut out: Vec<Disk> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "sr"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                return None;
            }
            let base = e.path();
            let sectors: u64 = read_trim(base.join("size"))?.parse().ok()?;
            Some(Disk {
                size_bytes: sectors * 512,
                model: read_trim(base.join("device/model")).unwrap_or_default(),
                rotational: read_trim(base.join("queue/rotational")).as_deref() == Some("1"),
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn nics() -> Vec<Nic> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else {
        return vec![];
    };
    let addrs = nix::ifaddrs::getifaddrs()
        .map(|it| it.collect::<Vec<_>>())
        .unwrap_or_default();
    let mut out: Vec<Nic> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                return None;
            }
            let base = e.path();
            let addresses = addrs
                .iter()
                .filter(|a| a.interface_name == name)
                .filter_map(|a| {
                    // `address/prefix`, as `ip addr` shows it: the prefix says which
                    // network the address is on (validated host network roles need it).
                    let addr = a.address.as_ref()?;
                    let mask = a.netmask.as_ref();
                    if let Some(v4) = addr.as_sockaddr_in() {
                        let len = mask
                            .and_then(|m| m.as_sockaddr_in())
                            .map_or(32, |m| u32::from(m.ip()).count_ones());
                        Some(format!("{}/{len}", v4.ip()))
                    } else {
                        let v6 = addr.as_sockaddr_in6()?;
                        let len = mask
                            .and_then(|m| m.as_sockaddr_in6())
                            .map_or(128, |m| u128::from(m.ip()).count_ones());
                        Some(format!("{}/{len}", v6.ip()))
                    }
                })
                .collect();
            Some(Nic {
                mac: read_trim(base.join("address")).unwrap_or_default(),
                mtu: read_trim(base.join("mtu"))
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0),
                up: read_trim(base.join("operstate")).as_deref() == Some("up"),
                addresses,
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reads_this_machine() {
        let inv = super::probe();
        assert!(inv.cpus >= 1, "{inv:?}");
        assert!(inv.memory_bytes > 0, "{inv:?}");
        assert!(!inv.kernel.is_empty());
        assert_eq!(inv.kvm.usable, None, "usability is never guessed");
    }
}
