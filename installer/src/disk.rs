//! Disk discovery (sysfs) and selection by the answer file's filters.
//!
//! [`SysfsProbe`] reads `/sys/block` (or a copy of it rooted elsewhere, which is how its
//! tests run on a fabricated tree); [`FakeProbe`] returns a fixed list. Selection is
//! [`select_disk`]: the eligible disks (not read-only, not the live medium, not removable
//! unless allowed) that pass every filter; zero or several matches is an error that lists
//! the candidates so the operator can tighten or loosen the filters.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::answer::{Bus, ByteSize, DiskSpec};

/// One whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name, such as `vda` or `nvme0n1`.
    pub name: String,
    pub size: ByteSize,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub bus: Bus,
    pub removable: bool,
    pub read_only: bool,
    /// Number of partitions the kernel sees on it now.
    pub partitions: usize,
    /// The live system was booted from this disk.
    pub live_medium: bool,
}

impl Disk {
    pub fn path(&self) -> String {
        format!("/dev/{}", self.name)
    }

    /// The device path of partition `n` (`/dev/vda3`, `/dev/nvme0n1p3`).
    pub fn partition_path(&self, n: u32) -> String {
        partition_path(&self.path(), n)
    }
}

/// The device path of partition `n` of `disk`: a `p` goes between when the name ends in a
/// digit (`/dev/nvme0n1p1`, `/dev/mmcblk0p1`, `/dev/loop0p1`).
pub fn partition_path(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<14} {:>10}  {:<7} model={:<20} serial={}",
            self.path(),
            self.size.to_string(),
            self.bus.name(),
            self.model.as_deref().unwrap_or("-"),
            self.serial.as_deref().unwrap_or("-"),
        )?;
        let mut notes = Vec::new();
        if self.removable {
            notes.push("removable".to_string());
        }
        if self.read_only {
            notes.push("read-only".to_string());
        }
        if self.live_medium {
            notes.push("live medium".to_string());
        }
        if self.partitions > 0 {
            notes.push(format!("{} partition(s)", self.partitions));
        }
        if !notes.is_empty() {
            write!(f, "  [{}]", notes.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot list disks in {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where disks come from.
pub trait DiskProbe {
    fn disks(&self) -> Result<Vec<Disk>, ProbeError>;
}

/// A fixed list of disks, for tests and the dry-run plan of a made-up machine.
#[derive(Debug, Clone, Default)]
pub struct FakeProbe(pub Vec<Disk>);

impl DiskProbe for FakeProbe {
    fn disks(&self) -> Result<Vec<Disk>, ProbeError> {
        Ok(self.0.clone())
    }
}

/// Reads disks from sysfs. `sys` is normally `/sys`; `live_medium` names the disk the live
/// system runs from (see [`live_medium_disk`]).
#[derive(Debug, Clone)]
pub struct SysfsProbe {
    pub sys: PathBuf,
    pub live_medium: Option<String>,
}

impl SysfsProbe {
    pub fn new() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            live_medium: live_medium_disk(Path::new("/proc/self/mountinfo"), Path::new("/sys")),
        }
    }
}

impl Default for SysfsProbe {
    fn default() -> Self {
        Self::new()
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Kernel names that are never install targets.
fn skipped(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd", "rbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

impl DiskProbe for SysfsProbe {
    fn disks(&self) -> Result<Vec<Disk>, ProbeError> {
        let block = self.sys.join("block");
        let entries = fs::read_dir(&block).map_err(|source| ProbeError::Io {
            path: block.clone(),
            source,
        })?;
        let mut disks = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if skipped(&name) {
                continue;
            }
            let dir = block.join(&name);
            let sectors: u64 = read_trim(&dir.join("size"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            // the link target tells the bus: .../virtio2/block/vda, .../ata1/..., .../usb1/...
            let link = fs::canonicalize(&dir)
                .or_else(|_| fs::read_link(&dir))
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default();
            let transport = read_trim(&dir.join("device/transport")).unwrap_or_default();
            let bus = bus_from_path(&name, &link, &transport);
            let serial = read_trim(&dir.join("device/serial"))
                .or_else(|| read_trim(&dir.join("serial")))
                .or_else(|| read_trim(&dir.join("device/wwid")).filter(|_| bus == Bus::Nvme));
            let partitions = fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|p| p.path().join("partition").exists())
                        .count()
                })
                .unwrap_or(0);
            disks.push(Disk {
                live_medium: self.live_medium.as_deref() == Some(name.as_str()),
                model: read_trim(&dir.join("device/model")),
                serial,
                bus,
                removable: read_trim(&dir.join("removable")).as_deref() == Some("1"),
                read_only: read_trim(&dir.join("ro")).as_deref() == Some("1"),
                size: ByteSize(sectors * 512),
                partitions,
                name,
            });
        }
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(disks)
    }
}

/// Derives the bus from the kernel name, the resolved sysfs path and the transport file.
pub fn bus_from_path(name: &str, link: &str, transport: &str) -> Bus {
    if name.starts_with("nvme") || link.contains("/nvme") {
        Bus::Nvme
    } else if link.contains("/usb") {
        Bus::Usb
    } else if name.starts_with("vd") || link.contains("/virtio") && !link.contains("/host") {
        Bus::Virtio
    } else if name.starts_with("mmcblk") {
        Bus::Mmc
    } else if link.contains("/ata") || transport == "sata" {
        Bus::Sata
    } else if name.starts_with("hd") {
        Bus::Ide
    } else if link.contains("/host") || name.starts_with("sd") {
        Bus::Scsi
    } else {
        Bus::Unknown
    }
}

/// The disk holding the live medium (`/run/live/medium`), found from mountinfo's major:minor.
pub fn live_medium_disk(mountinfo: &Path, sys: &Path) -> Option<String> {
    let text = fs::read_to_string(mountinfo).ok()?;
    let devno = text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&"/run/live/medium")).then(|| f.get(2).map(|s| s.to_string()))?
    })?;
    // /sys/dev/block/MAJ:MIN -> .../block/sdb/sdb1 or .../block/sr0
    let target = fs::canonicalize(sys.join("dev/block").join(&devno)).ok()?;
    let parts: Vec<String> = target
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    let i = parts.iter().position(|c| c == "block")?;
    parts.get(i + 1).cloned()
}

/// Case-insensitive glob with `*` and `?`, over the whole (trimmed) string.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.trim().to_lowercase().chars().collect();
    let t: Vec<char> = text.trim().to_lowercase().chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no disk found at all: is the storage controller's driver missing?")]
    NoDisks,
    #[error("no disk matches {filters}; the disks are:\n{}\nLoosen or fix the [disk] filters.", list(.candidates))]
    NoMatch {
        filters: String,
        candidates: Vec<Disk>,
    },
    #[error("{} disks match {filters}:\n{}\nAdd a filter that tells them apart (serial is unique; or path).", .matches.len(), list(.matches))]
    Several { filters: String, matches: Vec<Disk> },
    #[error("{disk} already has {partitions} partition(s): set disk.wipe = true to erase it (everything on it is lost)")]
    NotEmpty { disk: String, partitions: usize },
    #[error("{disk} has {size}; Keel needs at least {need} with root_size = {root}")]
    TooSmall {
        disk: String,
        size: ByteSize,
        need: ByteSize,
        root: ByteSize,
    },
}

fn list(disks: &[Disk]) -> String {
    disks
        .iter()
        .map(|d| format!("    {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A readable summary of the filters in a disk spec.
pub fn describe_filters(spec: &DiskSpec) -> String {
    let mut f = Vec::new();
    if let Some(p) = &spec.path {
        f.push(format!("path = {p}"));
    }
    if let Some(s) = spec.min_size {
        f.push(format!("min_size = {s}"));
    }
    if let Some(s) = spec.max_size {
        f.push(format!("max_size = {s}"));
    }
    if let Some(m) = &spec.model {
        f.push(format!("model = \"{m}\""));
    }
    if let Some(s) = &spec.serial {
        f.push(format!("serial = \"{s}\""));
    }
    if let Some(b) = spec.bus {
        f.push(format!("bus = {b}"));
    }
    if f.is_empty() {
        "the [disk] section (no filters: any one eligible disk)".to_string()
    } else {
        format!("[disk] {}", f.join(", "))
    }
}

/// Why a disk is not a candidate at all, if it is not.
fn ineligible(d: &Disk, spec: &DiskSpec) -> Option<&'static str> {
    if d.live_medium {
        Some("the live medium")
    } else if d.read_only {
        Some("read-only")
    } else if d.removable && !spec.allow_removable {
        Some("removable (set disk.allow_removable = true to allow it)")
    } else {
        None
    }
}

fn matches(d: &Disk, spec: &DiskSpec) -> bool {
    spec.path.as_deref().is_none_or(|p| p == d.path())
        && spec.min_size.is_none_or(|m| d.size >= m)
        && spec.max_size.is_none_or(|m| d.size <= m)
        && spec
            .model
            .as_deref()
            .is_none_or(|m| d.model.as_deref().is_some_and(|dm| glob_match(m, dm)))
        && spec
            .serial
            .as_deref()
            .is_none_or(|s| d.serial.as_deref().is_some_and(|ds| glob_match(s, ds)))
        && spec.bus.is_none_or(|b| d.bus == b)
}

/// The smallest disk for a layout with this root size.
pub fn minimum_disk_size(root_size: ByteSize) -> ByteSize {
    ByteSize(crate::plan::FIXED_OVERHEAD + 2 * root_size.0 + crate::plan::MIN_DATA_SIZE)
}

/// Picks the one disk the spec means.
pub fn select_disk(disks: &[Disk], spec: &DiskSpec) -> Result<Disk, SelectError> {
    if disks.is_empty() {
        return Err(SelectError::NoDisks);
    }
    let filters = describe_filters(spec);
    let found: Vec<Disk> = disks
        .iter()
        .filter(|d| ineligible(d, spec).is_none() && matches(d, spec))
        .cloned()
        .collect();
    match found.len() {
        0 => Err(SelectError::NoMatch {
            filters,
            candidates: disks.to_vec(),
        }),
        1 => {
            let d = found.into_iter().next().ok_or(SelectError::NoDisks)?;
            let need = minimum_disk_size(spec.root_size);
            if d.size < need {
                return Err(SelectError::TooSmall {
                    disk: d.path(),
                    size: d.size,
                    need,
                    root: spec.root_size,
                });
            }
            if d.partitions > 0 && !spec.wipe {
                return Err(SelectError::NotEmpty {
                    disk: d.path(),
                    partitions: d.partitions,
                });
            }
            Ok(d)
        }
        _ => Err(SelectError::Several {
            filters,
            matches: found,
        }),
    }
}

#[cfg(test)]
pub(crate) fn test_disk(name: &str, gib: u64, bus: Bus, model: &str, serial: &str) -> Disk {
    Disk {
        name: name.into(),
        size: ByteSize(gib << 30),
        model: (!model.is_empty()).then(|| model.into()),
        serial: (!serial.is_empty()).then(|| serial.into()),
        bus,
        removable: false,
        read_only: false,
        partitions: 0,
        live_medium: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Vec<Disk> {
        let mut usb = test_disk("sdc", 16, Bus::Usb, "Flash Disk", "USB1");
        usb.removable = true;
        vec![
            test_disk("nvme0n1", 960, Bus::Nvme, "Samsung SSD 980", "S1"),
            test_disk("nvme1n1", 960, Bus::Nvme, "Samsung SSD 980", "S2"),
            test_disk("sda", 4000, Bus::Sata, "ST4000NM", "Z1"),
            usb,
        ]
    }

    fn spec() -> DiskSpec {
        DiskSpec {
            root_size: ByteSize(crate::answer::DEFAULT_ROOT_SIZE),
            ..DiskSpec::default()
        }
    }

    #[test]
    fn partition_paths() {
        assert_eq!(partition_path("/dev/vda", 3), "/dev/vda3");
        assert_eq!(partition_path("/dev/nvme0n1", 1), "/dev/nvme0n1p1");
        assert_eq!(partition_path("/dev/mmcblk0", 2), "/dev/mmcblk0p2");
    }

    #[test]
    fn glob() {
        assert!(glob_match("Samsung*", "SAMSUNG SSD 980"));
        assert!(glob_match("*ssd*", "Samsung SSD 980"));
        assert!(glob_match("s?", "S1"));
        assert!(glob_match("QEMU HARDDISK", "  QEMU HARDDISK  "));
        assert!(!glob_match("Samsung", "Samsung SSD"));
        assert!(!glob_match("s?", "S12"));
    }

    #[test]
    fn selects_by_serial_and_by_bus_and_size() {
        let disks = machine();
        let d = select_disk(
            &disks,
            &DiskSpec {
                serial: Some("S2".into()),
                ..spec()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.name, "nvme1n1");
        let d = select_disk(
            &disks,
            &DiskSpec {
                bus: Some(Bus::Sata),
                ..spec()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.name, "sda");
        let d = select_disk(
            &disks,
            &DiskSpec {
                min_size: Some("2TB".parse().unwrap_or(ByteSize(0))),
                ..spec()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.name, "sda");
    }

    #[test]
    fn several_matches_list_them() {
        let e = select_disk(
            &machine(),
            &DiskSpec {
                model: Some("samsung*".into()),
                ..spec()
            },
        )
        .unwrap_err();
        assert!(matches!(&e, SelectError::Several { matches, .. } if matches.len() == 2));
        let text = e.to_string();
        assert!(
            text.contains("2 disks match [disk] model = \"samsung*\""),
            "{text}"
        );
        assert!(
            text.contains("/dev/nvme0n1") && text.contains("/dev/nvme1n1"),
            "{text}"
        );
        assert!(text.contains("serial"), "{text}");
    }

    #[test]
    fn no_filters_with_several_disks_is_an_error() {
        assert!(matches!(
            select_disk(&machine(), &spec()),
            Err(SelectError::Several { .. })
        ));
    }

    #[test]
    fn no_match_lists_all_candidates_with_reasons() {
        let e = select_disk(
            &machine(),
            &DiskSpec {
                bus: Some(Bus::Virtio),
                ..spec()
            },
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("no disk matches [disk] bus = virtio"),
            "{text}"
        );
        for d in ["/dev/nvme0n1", "/dev/nvme1n1", "/dev/sda", "/dev/sdc"] {
            assert!(text.contains(d), "{d} missing in {text}");
        }
        assert!(text.contains("removable"), "{text}");
    }

    #[test]
    fn removable_needs_permission_and_live_medium_never_matches() {
        let mut disks = machine();
        let usb_only = DiskSpec {
            bus: Some(Bus::Usb),
            ..spec()
        };
        assert!(matches!(
            select_disk(&disks, &usb_only),
            Err(SelectError::NoMatch { .. })
        ));
        let allowed = DiskSpec {
            allow_removable: true,
            ..usb_only.clone()
        };
        assert_eq!(
            select_disk(&disks, &allowed).map(|d| d.name),
            Ok("sdc".to_string())
        );
        disks[3].live_medium = true;
        assert!(select_disk(&disks, &allowed).is_err());
        assert!(ineligible(&disks[3], &allowed).is_some());
    }

    #[test]
    fn partitioned_disk_needs_wipe_and_small_disk_is_refused() {
        let mut disks = vec![test_disk("vda", 12, Bus::Virtio, "", "")];
        disks[0].partitions = 2;
        let e = select_disk(&disks, &spec()).unwrap_err();
        assert!(e.to_string().contains("set disk.wipe = true"), "{e}");
        let ok = select_disk(
            &disks,
            &DiskSpec {
                wipe: true,
                ..spec()
            },
        );
        assert!(ok.is_ok());
        let small = vec![test_disk("vda", 6, Bus::Virtio, "", "")];
        let e = select_disk(&small, &spec()).unwrap_err();
        assert!(matches!(e, SelectError::TooSmall { .. }), "{e}");
        assert!(e.to_string().contains("needs at least"), "{e}");
    }

    #[test]
    fn empty_machine() {
        assert_eq!(select_disk(&[], &spec()), Err(SelectError::NoDisks));
    }

    #[test]
    fn bus_detection() {
        assert_eq!(
            bus_from_path(
                "vda",
                "/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda",
                ""
            ),
            Bus::Virtio
        );
        assert_eq!(
            bus_from_path(
                "sda",
                "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
                ""
            ),
            Bus::Sata
        );
        assert_eq!(bus_from_path("sdb", "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb", ""), Bus::Usb);
        assert_eq!(
            bus_from_path(
                "sda",
                "/sys/devices/pci0000:00/0000:00:05.0/virtio3/host2/target2:0:0/2:0:0:0/block/sda",
                ""
            ),
            Bus::Scsi
        );
        assert_eq!(
            bus_from_path(
                "nvme0n1",
                "/sys/devices/pci0000:00/0000:00:06.0/nvme/nvme0/nvme0n1",
                ""
            ),
            Bus::Nvme
        );
    }

    /// The real probe over a fabricated sysfs tree.
    #[test]
    fn sysfs_probe_reads_a_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sys = dir.path();
        let w = |rel: &str, v: &str| {
            let p = sys.join(rel);
            fs::create_dir_all(p.parent().unwrap_or(sys)).unwrap_or_else(|e| panic!("{e}"));
            fs::write(p, v).unwrap_or_else(|e| panic!("{e}"));
        };
        w("block/vda/size", "25165824\n");
        w("block/vda/serial", "KEEL0\n");
        w("block/vda/removable", "0\n");
        w("block/vda/ro", "0\n");
        w("block/vda/vda1/partition", "1\n");
        w("block/sda/size", "8388608\n");
        w("block/sda/device/model", "QEMU HARDDISK   \n");
        w("block/sda/device/serial", "QM0001\n");
        w("block/sda/removable", "1\n");
        w("block/loop0/size", "100\n");
        w("block/sr0/size", "100\n");
        w("block/vdb/size", "0\n");
        let probe = SysfsProbe {
            sys: sys.to_path_buf(),
            live_medium: Some("sda".into()),
        };
        let disks = probe.disks().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(disks.len(), 2, "{disks:?}");
        assert_eq!(disks[0].name, "sda");
        assert_eq!(disks[0].model.as_deref(), Some("QEMU HARDDISK"));
        assert_eq!(disks[0].serial.as_deref(), Some("QM0001"));
        assert!(disks[0].removable && disks[0].live_medium);
        assert_eq!(disks[0].size, ByteSize(4 << 30));
        assert_eq!(disks[1].name, "vda");
        assert_eq!(disks[1].bus, Bus::Virtio);
        assert_eq!(disks[1].serial.as_deref(), Some("KEEL0"));
        assert_eq!(disks[1].partitions, 1);
        assert_eq!(disks[1].size, ByteSize(12 << 30));
    }
}
