//! keel-image: the Rust side of the ISO build that `scripts/iso-build` drives.
//!
//! The shell script runs the real tools (mmdebstrap, mksquashfs, grub-mkimage, xorriso);
//! this crate holds the parts worth testing: the package list format, the package manifest
//! written onto the ISO (name, version, architecture and the SHA-256 of the pinned `.deb`),
//! and the checks a finished root filesystem must pass before it is squashed (no baked-in
//! machine identity or SSH host keys, the Keel binaries and units present).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors of the image helpers.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("package list {path}:{line}: {message}")]
    PackageList {
        path: String,
        line: usize,
        message: String,
    },
    #[error("package list {0} names no package")]
    EmptyPackageList(String),
    #[error("{path}: malformed dpkg status paragraph {index}: {message}")]
    DpkgStatus {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("the guest opened outbound connections:\n  - {}", .0.join("\n  - "))]
    AirGap(Vec<String>),
    #[error("the offline repository {dir} is inconsistent:\n  - {}", problems.join("\n  - "))]
    Repo { dir: PathBuf, problems: Vec<String> },
    #[error("the root filesystem {root} is not ready for the image:\n  - {}", problems.join("\n  - "))]
    Rootfs {
        root: PathBuf,
        problems: Vec<String>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a package list: one Debian package name a line, `#` comments, blank lines ignored.
/// Names are checked against Debian policy (lower case letters, digits, `+ - .`, at least two
/// characters, starting with a letter or digit) and may not repeat.
pub fn parse_package_list(origin: &str, text: &str) -> Result<Vec<String>, ImageError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ImageError::PackageList {
            path: origin.to_string(),
            line: i + 1,
            message,
        };
        if line.split_whitespace().count() != 1 {
            return Err(err(format!(
                "'{line}': one package name a line (no versions, no spaces)"
            )));
        }
        if !is_debian_package_name(line) {
            return Err(err(format!(
                "'{line}' is not a Debian package name (lower case letters, digits, '+', '-', '.')"
            )));
        }
        if !seen.insert(line.to_string()) {
            return Err(err(format!("'{line}' is listed twice")));
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        return Err(ImageError::EmptyPackageList(origin.to_string()));
    }
    Ok(out)
}

fn is_debian_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && name.len() >= 2
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

/// One installed package, from a dpkg status database.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
}

impl InstalledPackage {
    /// The file name apt gives this package's `.deb` in its cache (`:` of an epoch as `%3a`).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// The non-empty paragraphs (stanzas) of a Debian control-format file, numbered from 0 as
/// they come.
fn stanzas(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split("\n\n")
        .enumerate()
        .filter(|(_, para)| !para.trim().is_empty())
}

/// A single-line field of a stanza (`Name: value`), trimmed.
fn stanza_field(para: &str, name: &str) -> Option<String> {
    para.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Parses a dpkg `status` file and returns the packages whose status is `install ok installed`,
/// sorted by name.
pub fn parse_dpkg_status(path: &Path, text: &str) -> Result<Vec<InstalledPackage>, ImageError> {
    let mut out = Vec::new();
    for (index, para) in stanzas(text) {
        let field = |name: &str| stanza_field(para, name);
        let missing = |f: &str| ImageError::DpkgStatus {
            path: path.to_path_buf(),
            index,
            message: format!("no {f} field"),
        };
        let name = field("Package").ok_or_else(|| missing("Package"))?;
        let status = field("Status").ok_or_else(|| missing("Status"))?;
        if status != "install ok installed" {
            continue;
        }
        let version = field("Version").ok_or_else(|| missing("Version"))?;
        let arch = field("Architecture").ok_or_else(|| missing("Architecture"))?;
        out.push(InstalledPackage {
            name,
            version,
            arch,
        });
    }
    out.sort();
    Ok(out)
}

/// One manifest line: a package and the SHA-256 of the pinned `.deb` it was installed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub package: InstalledPackage,
    /// `None` when the `.deb` is not in the cache (the manifest then says `-`).
    pub sha256: Option<String>,
}

impl fmt::Display for ManifestEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{}",
            self.package.name,
            self.package.version,
            self.package.arch,
            self.sha256.as_deref().unwrap_or("-")
        )
    }
}

/// Builds the package manifest of a root filesystem; `debs` is the pinned `.deb` cache.
pub fn manifest(root: &Path, debs: Option<&Path>) -> Result<Vec<ManifestEntry>, ImageError> {
    let status_path = root.join("var/lib/dpkg/status");
    let text = fs::read_to_string(&status_path).map_err(io_err(&status_path))?;
    let packages = parse_dpkg_status(&status_path, &text)?;
    packages
        .into_iter()
        .map(|package| {
            let sha256 = match debs {
                Some(dir) => {
                    let deb = dir.join(package.deb_file_name());
                    if deb.exists() {
                        Some(sha256_file(&deb)?)
                    } else {
                        None
                    }
                }
                None => None,
            };
            Ok(ManifestEntry { package, sha256 })
        })
        .collect()
}

/// The SHA-256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Files that must be in the image's root filesystem.
pub const REQUIRED_FILES: &[&str] = &[
    "usr/bin/keel-installer",
    "etc/systemd/system/keel.service",
    "etc/systemd/system/keel-env.service",
    "etc/systemd/system/keel-firstboot.service",
    "etc/systemd/system/keel-banner.service",
    "etc/systemd/system/keel-installer.service",
    "usr/sbin/sgdisk",
    "usr/bin/unsquashfs",
    "usr/sbin/mkfs.vfat",
    "usr/sbin/mkfs.ext4",
    "usr/sbin/grub-install",
    "usr/lib/grub/i386-pc/boot_hybrid.img",
    "usr/lib/grub/x86_64-efi/linux.mod",
    "usr/bin/openssl",
    "usr/bin/curl",
    "usr/bin/ceph-mon",
    "usr/bin/ceph-osd",
    "usr/bin/ceph-mgr",
    "usr/bin/rbd",
    "usr/sbin/nft",
    "usr/sbin/dnsmasq",
    "usr/sbin/libvirtd",
    "usr/bin/qemu-system-x86_64",
    "usr/bin/apt-get",
    "usr/share/keel/repo/Packages",
    "usr/share/keel/repo/Release",
    "etc/apt/sources.list.d/keel-offline.sources",
];

/// URL schemes an apt source in the image may not use: an installed node has no network.
const NETWORK_SOURCE_SCHEMES: &[&str] = &["http://", "https://", "ftp://", "copy:", "cdrom:"];

/// Builds the manifest of the offline repository in `dir` from its `Packages` index and
/// checks the index against the files: every entry's `.deb` exists with the SHA-256 the index
/// gives, and every `.deb` in `dir` is indexed. Sorted by package name.
pub fn repo_manifest(dir: &Path) -> Result<Vec<ManifestEntry>, ImageError> {
    let index = dir.join("Packages");
    let text = fs::read_to_string(&index).map_err(io_err(&index))?;
    let mut problems = Vec::new();
    let mut entries = Vec::new();
    let mut indexed = BTreeSet::new();
    for (n, para) in stanzas(&text) {
        let field = |name: &str| stanza_field(para, name);
        let (Some(name), Some(version), Some(arch), Some(file), Some(sha256)) = (
            field("Package"),
            field("Version"),
            field("Architecture"),
            field("Filename"),
            field("SHA256"),
        ) else {
            problems.push(format!(
                "Packages entry {n} lacks one of Package, Version, Architecture, Filename, SHA256"
            ));
            continue;
        };
        let path = dir.join(&file);
        match sha256_file(&path) {
            Ok(actual) if actual == sha256 => {}
            Ok(actual) => problems.push(format!(
                "{file}: SHA-256 {actual}, but the index says {sha256}"
            )),
            Err(e) => problems.push(e.to_string()),
        }
        indexed.insert(file.trim_start_matches("./").to_string());
        entries.push(ManifestEntry {
            package: InstalledPackage {
                name,
                version,
                arch,
            },
            sha256: Some(sha256),
        });
    }
    let on_disk = fs::read_dir(dir).map_err(io_err(dir))?;
    for e in on_disk.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".deb") && !indexed.contains(&name) {
            problems.push(format!("{name} is not in the Packages index"));
        }
    }
    if entries.is_empty() {
        problems.push("the Packages index lists no package".into());
    }
    if !problems.is_empty() {
        return Err(ImageError::Repo {
            dir: dir.to_path_buf(),
            problems,
        });
    }
    entries.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(entries)
}

/// The apt source files of a root filesystem that name a network location, with the line.
fn network_apt_sources(root: &Path) -> Vec<String> {
    let mut files = vec![root.join("etc/apt/sources.list")];
    if let Ok(d) = fs::read_dir(root.join("etc/apt/sources.list.d")) {
        let mut more: Vec<PathBuf> = d.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if NETWORK_SOURCE_SCHEMES.iter().any(|s| line.contains(s)) {
                let rel = f.strip_prefix(root).unwrap_or(&f);
                found.push(format!(
                    "/{}: apt source '{line}' needs a network or a build-host path; an installed node has neither (only file: sources)",
                    rel.display()
                ));
            }
        }
    }
    found
}

/// Checks a finished root filesystem: required files present, no machine identity and no SSH
/// host keys baked in, no apt cache left behind, exactly one kernel and initrd.
pub fn verify_rootfs(root: &Path, with_node: bool) -> Result<(), ImageError> {
    let mut problems = Vec::new();
    let mut required: Vec<&str> = REQUIRED_FILES.to_vec();
    if with_node {
        required.push("usr/bin/keel");
    }
    for rel in required {
        if !root.join(rel).exists() {
            problems.push(format!("/{rel} is missing"));
        }
    }
    match fs::metadata(root.join("etc/machine-id")) {
        Ok(m) if m.len() == 0 => {}
        Ok(_) => problems.push(
            "/etc/machine-id is not empty: every node must make its own on first boot".into(),
        ),
        Err(_) => problems
            .push("/etc/machine-id is missing (it must exist and be empty for first boot)".into()),
    }
    problems.extend(network_apt_sources(root));
    for identity in ["etc/nvme/hostid", "etc/nvme/hostnqn"] {
        if root.join(identity).exists() {
            problems.push(format!(
                "/{identity} is baked in: an NVMe host identity must differ per node"
            ));
        }
    }
    if root.join("var/lib/dbus/machine-id").exists() {
        problems.push("/var/lib/dbus/machine-id is baked in".into());
    }
    for (dir, prefix, suffix, what) in [
        (
            "etc/ssh",
            "ssh_host_",
            "",
            "SSH host key (made per node on first boot)",
        ),
        (
            "var/cache/apt/archives",
            "",
            ".deb",
            "cached .deb left in the image",
        ),
    ] {
        if let Ok(entries) = fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(prefix) && name.ends_with(suffix) {
                    problems.push(format!("/{dir}/{name}: {what}"));
                }
            }
        }
    }
    for (prefix, what) in [("vmlinuz-", "kernel"), ("initrd.img-", "initrd")] {
        let count = fs::read_dir(root.join("boot"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .count()
            })
            .unwrap_or(0);
        if count != 1 {
            problems.push(format!(
                "/boot has {count} {what} files (/boot/{prefix}*), expected exactly one"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ImageError::Rootfs {
            root: root.to_path_buf(),
            problems,
        })
    }
}

/// One packet in which the guest started talking to something outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub packet: usize,
    pub what: String,
}

impl fmt::Display for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packet {}: {}", self.packet, self.what)
    }
}

/// Why a capture cannot be scanned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("not a pcap file (too short)")]
    TooShort,
    #[error("not a pcap file (bad magic)")]
    BadMagic,
    #[error("pcap link type is not Ethernet")]
    NotEthernet,
}

/// What a capture held.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    pub packets: usize,
    pub from_guest: usize,
    pub outbound: Vec<Outbound>,
}

/// Scans a pcap capture (Ethernet) for connections the guest opened: TCP SYNs without ACK
/// from the guest to a destination (`ip:port`) not in `allowed_tcp`, and UDP datagrams from
/// the guest to a port not in `allowed_udp` (DHCP is fine). The guest is every sender whose
/// MAC starts with `guest_mac_prefix` (qemu's 52:54:00); inbound connections (the test's
/// port forward) are not counted.
pub fn outbound_attempts(
    capture: &[u8],
    guest_mac_prefix: &[u8],
    allowed_udp: &[u16],
    allowed_tcp: &[String],
) -> Result<Scan, CaptureError> {
    if capture.len() < 24 {
        return Err(CaptureError::TooShort);
    }
    let magic = u32::from_le_bytes([capture[0], capture[1], capture[2], capture[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(CaptureError::BadMagic),
    };
    let u32at = |b: &[u8], o: usize| -> u32 {
        let x = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        }
    };
    if u32at(capture, 20) != 1 {
        return Err(CaptureError::NotEthernet);
    }
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let mut out = Vec::new();
    let mut off = 24;
    let mut n = 0;
    let mut from_guest = 0;
    while off + 16 <= capture.len() {
        let incl = u32at(capture, off + 8) as usize;
        let start = off + 16;
        let end = (start + incl).min(capture.len());
        let pkt = &capture[start..end];
        off = start + incl;
        n += 1;
        if pkt.len() < 14 || !pkt[6..12].starts_with(guest_mac_prefix) {
            continue;
        }
        from_guest += 1;
        let (proto, l4, src, dst) = match be16(pkt, 12) {
            0x0800 if pkt.len() >= 34 => {
                let ihl = usize::from(pkt[14] & 0x0f) * 4;
                let ip =
                    |o: usize| format!("{}.{}.{}.{}", pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]);
                (pkt[23], 14 + ihl, ip(26), ip(30))
            }
            0x86dd if pkt.len() >= 54 => {
                let ip = |o: usize| {
                    let a: [u8; 16] = pkt[o..o + 16].try_into().unwrap_or([0; 16]);
                    std::net::Ipv6Addr::from(a).to_string()
                };
                (pkt[20], 54, ip(22), ip(38))
            }
            _ => continue,
        };
        if pkt.len() < l4 + 14 {
            continue;
        }
        let (sport, dport) = (be16(pkt, l4), be16(pkt, l4 + 2));
        match proto {
            6 => {
                let flags = pkt[l4 + 13];
                if flags & 0x02 != 0
                    && flags & 0x10 == 0
                    && !allowed_tcp.contains(&format!("{dst}:{dport}"))
                {
                    out.push(Outbound {
                        packet: n,
                        what: format!("TCP connection {src}:{sport} -> {dst}:{dport}"),
                    });
                }
            }
            17 if !allowed_udp.contains(&dport) => out.push(Outbound {
                packet: n,
                what: format!("UDP {src}:{sport} -> {dst}:{dport}"),
            }),
            _ => {}
        }
    }
    Ok(Scan {
        packets: n,
        from_guest,
        outbound: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_parses_comments_and_blank_lines() {
        let list = parse_package_list("t", "# c\n\nlinux-image-amd64\n  gdisk # tools\nc++\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(list, ["linux-image-amd64", "gdisk", "c++"]);
    }

    #[test]
    fn package_list_rejects_bad_names_duplicates_and_empty() {
        let e = parse_package_list("p", "gdisk\nGdisk\n").unwrap_err();
        assert!(e.to_string().contains("p:2"), "{e}");
        let e = parse_package_list("p", "gdisk\ngdisk\n").unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = parse_package_list("p", "gdisk=1.0\n").unwrap_err();
        assert!(e.to_string().contains("not a Debian package name"), "{e}");
        let e = parse_package_list("p", "gdisk 1.0\n").unwrap_err();
        assert!(e.to_string().contains("one package name a line"), "{e}");
        assert!(matches!(
            parse_package_list("p", "# nothing\n"),
            Err(ImageError::EmptyPackageList(_))
        ));
    }

    #[test]
    fn the_shipped_package_list_is_valid_and_has_the_essentials() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipe/packages.txt");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let list = parse_package_list("packages.txt", &text).unwrap_or_else(|e| panic!("{e}"));
        for must in [
            "linux-image-amd64",
            "systemd-sysv",
            "live-boot",
            "gdisk",
            "grub-pc-bin",
            "grub-efi-amd64-bin",
            "libvirt-daemon-system",
            "qemu-system-x86",
            "dnsmasq-base",
            "nftables",
            "ceph-mon",
            "ceph-osd",
            "ceph-mgr",
            "ceph-common",
            "apt",
            "qemu-block-extra",
        ] {
            assert!(list.iter().any(|p| p == must), "{must} missing");
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipe/optional.txt");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let optional = parse_package_list("optional.txt", &text).unwrap_or_else(|e| panic!("{e}"));
        let twice: Vec<&String> = optional.iter().filter(|p| list.contains(p)).collect();
        assert!(twice.is_empty(), "in both lists: {twice:?}");
        assert!(optional.iter().any(|p| p == "tcpdump"));
    }

    fn write(path: &Path, bytes: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
        }
        fs::write(path, bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn repo_manifest_checks_the_index_against_the_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let repo = dir.path();
        write(&repo.join("tcpdump_4.99.3-1_amd64.deb"), b"abc");
        write(&repo.join("jq_1.6-2.1_amd64.deb"), b"abc");
        let stanza = |name: &str, version: &str, sha: &str| {
            format!(
                "Package: {name}\nVersion: {version}\nArchitecture: amd64\nFilename: {name}_{version}_amd64.deb\nSHA256: {sha}\nDescription: x\n continued\n\n"
            )
        };
        let good = stanza("tcpdump", "4.99.3-1", ABC_SHA256) + &stanza("jq", "1.6-2.1", ABC_SHA256);
        write(&repo.join("Packages"), good.as_bytes());
        let m = repo_manifest(repo).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].to_string(),
            format!("jq\t1.6-2.1\tamd64\t{ABC_SHA256}")
        );

        // a corrupted file, a file missing from the index, an entry without its file
        write(&repo.join("jq_1.6-2.1_amd64.deb"), b"abd");
        write(&repo.join("stray_1_amd64.deb"), b"abc");
        let bad = good + &stanza("gone", "1", ABC_SHA256);
        write(&repo.join("Packages"), bad.as_bytes());
        let e = repo_manifest(repo).unwrap_err().to_string();
        for needle in [
            "jq_1.6-2.1_amd64.deb: SHA-256",
            "stray_1_amd64.deb is not in the Packages index",
            "gone_1_amd64.deb",
        ] {
            assert!(e.contains(needle), "{needle} not in {e}");
        }
        write(&repo.join("Packages"), b"");
        let e = repo_manifest(repo).unwrap_err().to_string();
        assert!(e.contains("lists no package"), "{e}");
    }

    const STATUS: &str = "Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13.dfsg-1\nArchitecture: amd64\nDescription: x\n continued\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: amd64\n\nPackage: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b2\n";

    #[test]
    fn dpkg_status_keeps_installed_packages_sorted() {
        let p = parse_dpkg_status(Path::new("status"), STATUS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "bash");
        assert_eq!(p[1].deb_file_name(), "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb");
        let e = parse_dpkg_status(Path::new("s"), "Package: x\nVersion: 1\n").unwrap_err();
        assert!(e.to_string().contains("no Status field"), "{e}");
    }

    #[test]
    fn manifest_hashes_pinned_debs() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path().join("root");
        let debs = dir.path().join("debs");
        fs::create_dir_all(root.join("var/lib/dpkg")).unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir_all(&debs).unwrap_or_else(|e| panic!("{e}"));
        fs::write(root.join("var/lib/dpkg/status"), STATUS).unwrap_or_else(|e| panic!("{e}"));
        fs::write(debs.join("bash_5.2.15-2+b2_amd64.deb"), b"abc")
            .unwrap_or_else(|e| panic!("{e}"));
        let m = manifest(&root, Some(&debs)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m[0].to_string(),
            "bash\t5.2.15-2+b2\tamd64\tba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(m[1].to_string(), "zlib1g\t1:1.2.13.dfsg-1\tamd64\t-");
    }

    #[test]
    fn verify_rootfs_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        fs::create_dir_all(root.join("etc/ssh")).unwrap_or_else(|e| panic!("{e}"));
        fs::write(root.join("etc/machine-id"), "abc\n").unwrap_or_else(|e| panic!("{e}"));
        fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "k").unwrap_or_else(|e| panic!("{e}"));
        write(
            &root.join("etc/nvme/hostnqn"),
            b"nqn.2014-08.org.nvmexpress:uuid:x\n",
        );
        write(
            &root.join("etc/apt/sources.list"),
            b"# built from\ndeb [trusted=yes] copy:///var/cache/keel-image/debs ./\n",
        );
        let e = verify_rootfs(root, true).unwrap_err().to_string();
        for needle in [
            "/usr/bin/keel is missing",
            "/usr/bin/keel-installer is missing",
            "machine-id is not empty",
            "ssh_host_ed25519_key",
            "0 kernel files",
            "/usr/bin/ceph-osd is missing",
            "/etc/nvme/hostnqn is baked in",
            "/usr/share/keel/repo/Packages is missing",
            "apt source 'deb [trusted=yes] copy:///var/cache/keel-image/debs ./'",
        ] {
            assert!(e.contains(needle), "{needle} not in {e}");
        }
    }

    #[test]
    fn verify_rootfs_accepts_a_clean_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        for rel in REQUIRED_FILES.iter().chain(&["usr/bin/keel"]) {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap_or(root)).unwrap_or_else(|e| panic!("{e}"));
            fs::write(&p, "x").unwrap_or_else(|e| panic!("{e}"));
        }
        fs::write(root.join("etc/machine-id"), "").unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir_all(root.join("boot")).unwrap_or_else(|e| panic!("{e}"));
        fs::write(root.join("boot/vmlinuz-6.1"), "k").unwrap_or_else(|e| panic!("{e}"));
        fs::write(root.join("boot/initrd.img-6.1"), "i").unwrap_or_else(|e| panic!("{e}"));
        verify_rootfs(root, true).unwrap_or_else(|e| panic!("{e}"));
    }

    fn pcap(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        v.extend([0u8; 8]);
        v.extend(65535u32.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        for p in packets {
            v.extend([0u8; 8]);
            v.extend((p.len() as u32).to_le_bytes());
            v.extend((p.len() as u32).to_le_bytes());
            v.extend(p);
        }
        v
    }

    fn ipv4(src_mac: [u8; 6], proto: u8, dport: u16, tcp_flags: u8) -> Vec<u8> {
        let mut p = vec![0x52, 0x55, 0x0a, 0, 2, 2];
        p.extend(src_mac);
        p.extend([0x08, 0x00]);
        p.extend([
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 2, 15, 192, 0, 2, 1,
        ]);
        p.extend(40000u16.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0, 0, 0, 0, 0, 0, 0, 0, 0x50, tcp_flags, 0, 0, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn pcap_outbound_finds_guest_syns_and_udp_only() {
        let guest = [0x52, 0x54, 0, 0x4b, 0x45, 1];
        let host = [0x52, 0x55, 0x0a, 0, 2, 2];
        let cap = pcap(&[
            ipv4(guest, 6, 443, 0x02),  // guest SYN: outbound
            ipv4(guest, 6, 8443, 0x12), // guest SYN-ACK to the port forward: inbound
            ipv4(host, 6, 8443, 0x02),  // host SYN: inbound
            ipv4(guest, 17, 67, 0),     // DHCP: allowed
            ipv4(guest, 17, 53, 0),     // DNS: outbound
        ]);
        let scan = outbound_attempts(&cap, &[0x52, 0x54, 0x00], &[67], &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((scan.packets, scan.from_guest), (5, 4));
        let text: Vec<String> = scan.outbound.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            text,
            [
                "packet 1: TCP connection 10.0.2.15:40000 -> 192.0.2.1:443",
                "packet 5: UDP 10.0.2.15:40000 -> 192.0.2.1:53"
            ]
        );
        // an explicitly allowed destination (the test's answer-file server) is not counted
        let allowed =
            outbound_attempts(&cap, &[0x52, 0x54, 0x00], &[67], &["192.0.2.1:443".into()])
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(allowed.outbound.len(), 1, "{:?}", allowed.outbound);
        assert!(outbound_attempts(b"nope", &[], &[], &[]).is_err());
    }
}
