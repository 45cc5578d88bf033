//! The host's hardware as the kernel shows it: CPUs, memory, block devices and network
//! interfaces. The real [`ProcSys`] reads procfs and sysfs (and `getifaddrs` for
//! addresses); [`fake::FakeProbe`] answers fixed facts for unit tests of the inventory
//! built from them. Nothing here guesses: KVM's usability is not a fact the kernel states
//! (a `/dev/kvm` that cannot boot a guest exists on nested hosts), so only the device's
//! presence is reported; the compute probe decides by booting.

pub mod fake;

use std::fs;
use std::path::{Path, PathBuf};

/// What the kernel says about the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub kernel: String,
    pub cpus: u32,
    pub cpu_model: String,
    pub memory_bytes: u64,
    /// Block devices, by name, without loop, RAM, zram, device-mapper and optical devices.
    pub disks: Vec<ProbedDisk>,
    /// Network interfaces, by name, without `lo`.
    pub nics: Vec<ProbedNic>,
    pub kvm_device_present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbedDisk {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub rotational: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbedNic {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// `address/prefix`, as `ip addr` shows it.
    pub addresses: Vec<String>,
    pub up: bool,
}

/// Reads the host's facts. Blocking (file reads): async callers use `spawn_blocking`.
pub trait HostProbe: Send + Sync {
    fn facts(&self) -> HostFacts;
}

/// The real probe: procfs and sysfs under the given roots (`/proc`, `/sys` on a host).
#[derive(Debug, Clone)]
pub struct ProcSys {
    proc: PathBuf,
    sys: PathBuf,
    dev: PathBuf,
}

impl Default for ProcSys {
    fn default() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

impl HostProbe for ProcSys {
    fn facts(&self) -> HostFacts {
        let cpuinfo = fs::read_to_string(self.proc.join("cpuinfo")).unwrap_or_default();
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
        let memory_bytes = fs::read_to_string(self.proc.join("meminfo"))
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024);
        let uname = nix::sys::utsname::uname().ok();
        HostFacts {
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
            disks: self.disks(),
            nics: self.nics(),
            kvm_device_present: self.dev.join("kvm").exists(),
        }
    }
}

impl ProcSys {
    fn disks(&self) -> Vec<ProbedDisk> {
        let Ok(entries) = fs::read_dir(self.sys.join("block")) else {
            return vec![];
        };
        let mut out: Vec<ProbedDisk> = entries
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
                Some(ProbedDisk {
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

    fn nics(&self) -> Vec<ProbedNic> {
        let Ok(entries) = fs::read_dir(self.sys.join("class/net")) else {
            return vec![];
        };
        let addrs = nix::ifaddrs::getifaddrs()
            .map(|it| it.collect::<Vec<_>>())
            .unwrap_or_default();
        let mut out: Vec<ProbedNic> = entries
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
                Some(ProbedNic {
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
}

#[cfg(test)]
mod tests {
    use super::{HostProbe, ProcSys};

    #[test]
    fn the_real_probe_reads_this_machine() {
        let facts = ProcSys::default().facts();
        assert!(facts.cpus >= 1, "{facts:?}");
        assert!(facts.memory_bytes > 0, "{facts:?}");
        assert!(!facts.kernel.is_empty(), "{facts:?}");
        assert!(facts.nics.iter().all(|n| n.name != "lo"), "{facts:?}");
    }
}
