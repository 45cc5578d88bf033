//! The installation as a plan of typed steps.
//!
//! [`Plan::build`] turns a validated answer, the selected disk and network card into
//! [`Step`]s; each step expands into [`Action`]s (run a program, write a file, ...) that the
//! runner executes or, in dry-run mode, prints. Everything the plan writes (fstab, GRUB
//! configuration, network and node configuration) is decided here, including the filesystem
//! UUIDs, so the plan can be printed and tested in full before any disk is touched.
//!
//! Disk layout (GPT):
//!
//! | # | name        | size        | type                 | use                          |
//! |---|-------------|-------------|----------------------|------------------------------|
//! | 1 | bios-boot   | 1 MiB       | BIOS boot (EF02)     | GRUB core for BIOS           |
//! | 2 | keel-esp    | 512 MiB     | EFI system (EF00)    | GRUB for UEFI, `/boot/efi`   |
//! | 3 | keel-root-a | `root_size` | Linux x86-64 root    | the running system, `/`      |
//! | 4 | keel-root-b | `root_size` | Linux x86-64 root    | the next version (updates)   |
//! | 5 | keel-data   | the rest    | Linux filesystem     | node state, `/var/lib/keel`  |

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::answer::{Answer, ByteSize, ClusterSpec, IpConfig, Secret};
use crate::disk::Disk;
use crate::net::Nic;
use crate::node::NodeConfig;

/// Space the layout needs besides the root and data partitions (alignment, BIOS boot, ESP,
/// backup GPT).
pub const FIXED_OVERHEAD: u64 = 516 << 20;
/// Smallest data partition.
pub const MIN_DATA_SIZE: u64 = 1 << 30;
pub const ESP_SIZE_MIB: u64 = 512;

/// Files of the live system that must not reach the installed one.
pub const LIVE_ONLY_PATHS: &[&str] = &[
    "etc/systemd/system/keel-installer.service",
    "etc/systemd/system/multi-user.target.wants/keel-installer.service",
    "etc/systemd/system/getty@tty1.service.d/keel-live.conf",
    "etc/systemd/system/serial-getty@ttyS0.service.d/keel-live.conf",
    "etc/profile.d/keel-live.sh",
    "etc/systemd/network/99-keel-live.network",
];

/// Units the installer enables on the target.
pub const ENABLED_UNITS: &[&str] = &[
    "keel.service",
    "keel-firstboot.service",
    "keel-banner.service",
    "keel-ssh-hostkeys.service",
    "systemd-networkd.service",
];

/// Filesystem identities, chosen when the plan is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsIds {
    /// FAT volume serial of the ESP (`XXXX-XXXX` in fstab).
    pub esp_serial: u32,
    pub root_a: String,
    pub root_b: String,
    pub data: String,
}

impl FsIds {
    pub fn random() -> Self {
        let u = uuid::Uuid::new_v4();
        let b = u.as_bytes();
        Self {
            esp_serial: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            root_a: uuid::Uuid::new_v4().to_string(),
            root_b: uuid::Uuid::new_v4().to_string(),
            data: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn esp_uuid(&self) -> String {
        format!(
            "{:04X}-{:04X}",
            self.esp_serial >> 16,
            self.esp_serial & 0xffff
        )
    }
}

/// What a plan is made from besides the answer.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub disk: Disk,
    pub nic: Nic,
    /// Kernel version of the image (the live system's `uname -r`).
    pub kernel_version: String,
    /// The live root filesystem image to copy.
    pub squashfs: PathBuf,
    /// Where the new root is mounted while installing.
    pub target: PathBuf,
    pub ids: FsIds,
}

/// A program to run.
#[derive(Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    /// Fed on standard input; never shown.
    pub stdin: Option<Secret>,
    /// A failure is reported but does not stop the installation.
    pub allow_fail: bool,
}

impl Cmd {
    pub fn new(program: &str, args: &[&str]) -> Self {
        Self {
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: None,
            allow_fail: false,
        }
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+@,%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", shell_quote(&self.program))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        if self.stdin.is_some() {
            write!(f, " < (secret on standard input, not shown)")?;
        }
        if self.allow_fail {
            write!(f, "   # failure tolerated")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cmd({self})")
    }
}

/// The smallest things the runner does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Cmd),
    Write {
        path: PathBuf,
        contents: String,
        mode: u32,
        /// The contents are never printed.
        secret: bool,
    },
    Mkdir {
        path: PathBuf,
        mode: u32,
    },
    Remove {
        path: PathBuf,
    },
    /// Wait until a path (a device node) exists.
    WaitFor {
        path: PathBuf,
        seconds: u64,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Run(c) => write!(f, "$ {c}"),
            Action::Write {
                path,
                contents,
                mode,
                secret,
            } => {
                write!(f, "write {} (mode {mode:04o}", path.display())?;
                if *secret {
                    write!(f, ", contents not shown: secret)")
                } else {
                    writeln!(f, ")")?;
                    let lines: Vec<String> =
                        contents.lines().map(|l| format!("    | {l}")).collect();
                    write!(f, "{}", lines.join("\n"))
                }
            }
            Action::Mkdir { path, mode } => write!(f, "mkdir -p -m {mode:04o} {}", path.display()),
            Action::Remove { path } => write!(f, "rm -f {}", path.display()),
            Action::WaitFor { path, seconds } => {
                write!(f, "wait up to {seconds} s for {}", path.display())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Vfat,
    Ext4,
}

/// One step of the installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Partition {
        disk: String,
        root_size: ByteSize,
        partitions: Vec<String>,
    },
    Format {
        device: String,
        fs: FsKind,
        label: String,
        id: String,
    },
    Mount {
        device: String,
        at: PathBuf,
        fs: FsKind,
    },
    CopyRootfs {
        squashfs: PathBuf,
        target: PathBuf,
    },
    WriteFiles {
        what: String,
        files: Vec<Action>,
    },
    SetRootPassword {
        target: PathBuf,
        hash: Secret,
    },
    RemoveLiveOnly {
        target: PathBuf,
    },
    EnableUnits {
        target: PathBuf,
        units: Vec<String>,
    },
    BindSystemMounts {
        target: PathBuf,
    },
    InstallGrub {
        target: PathBuf,
        firmware: Firmware,
        disk: String,
    },
    Unmount {
        target: PathBuf,
    },
}

fn p(target: &Path, rel: &str) -> PathBuf {
    target.join(rel.trim_start_matches('/'))
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

impl Step {
    /// One line for progress output and the dry-run listing.
    pub fn describe(&self) -> String {
        match self {
            Step::Partition {
                disk, root_size, ..
            } => format!(
                "Partition {disk} (GPT): bios-boot 1MiB, ESP {ESP_SIZE_MIB}MiB, root A {root_size}, root B {root_size}, data (the rest)"
            ),
            Step::Format {
                device, fs, label, ..
            } => format!(
                "Format {device} as {} ({label})",
                match fs {
                    FsKind::Vfat => "FAT32",
                    FsKind::Ext4 => "ext4",
                }
            ),
            Step::Mount { device, at, .. } => format!("Mount {device} on {}", at.display()),
            Step::CopyRootfs { squashfs, target } => format!(
                "Copy the system from {} to {}",
                squashfs.display(),
                target.display()
            ),
            Step::WriteFiles { what, .. } => format!("Write {what}"),
            Step::SetRootPassword { .. } => "Set the root password (hash not shown)".to_string(),
            Step::RemoveLiveOnly { .. } => "Remove the live installer's own files".to_string(),
            Step::EnableUnits { units, .. } => format!("Enable {}", units.join(", ")),
            Step::BindSystemMounts { target } => {
                format!("Mount /dev, /proc, /sys into {}", target.display())
            }
            Step::InstallGrub {
                firmware, disk, ..
            } => match firmware {
                Firmware::Bios => format!("Install GRUB for BIOS on {disk}"),
                Firmware::Uefi => "Install GRUB for UEFI in the ESP (removable path)".to_string(),
            },
            Step::Unmount { target } => format!("Unmount {}", target.display()),
        }
    }

    /// The actions that carry the step out.
    pub fn actions(&self) -> Vec<Action> {
        match self {
            Step::Partition {
                disk,
                root_size,
                partitions,
            } => {
                let root_mib = (root_size.0 >> 20).to_string();
                let mut args: Vec<String> = vec!["--clear".into()];
                for (n, size, code, name) in [
                    (1, "+1M".to_string(), "EF02", "bios-boot"),
                    (2, format!("+{ESP_SIZE_MIB}M"), "EF00", "keel-esp"),
                    (3, format!("+{root_mib}M"), "8304", "keel-root-a"),
                    (4, format!("+{root_mib}M"), "8304", "keel-root-b"),
                    (5, "0".to_string(), "8300", "keel-data"),
                ] {
                    args.push(format!("--new={n}:0:{size}"));
                    args.push(format!("--typecode={n}:{code}"));
                    args.push(format!("--change-name={n}:{name}"));
                }
                args.push(disk.clone());
                let mut out = vec![
                    Action::Run(Cmd::new("wipefs", &["--all", "--force", disk])),
                    Action::Run(Cmd::new("sgdisk", &["--zap-all", disk])),
                    Action::Run(Cmd {
                        program: "sgdisk".into(),
                        args,
                        stdin: None,
                        allow_fail: false,
                    }),
                    Action::Run(Cmd::new("partx", &["--update", disk])).tolerated(),
                    Action::Run(Cmd::new("udevadm", &["settle", "--timeout=30"])).tolerated(),
                ];
                out.extend(partitions.iter().map(|d| Action::WaitFor {
                    path: PathBuf::from(d),
                    seconds: 30,
                }));
                out
            }
            Step::Format {
                device,
                fs,
                label,
                id,
            } => vec![Action::Run(match fs {
                FsKind::Vfat => Cmd::new("mkfs.vfat", &["-F", "32", "-n", label, "-i", id, device]),
                FsKind::Ext4 => Cmd::new("mkfs.ext4", &["-q", "-F", "-L", label, "-U", id, device]),
            })],
            Step::Mount { device, at, fs } => vec![
                Action::Mkdir {
                    path: at.clone(),
                    mode: 0o755,
                },
                Action::Run(Cmd::new(
                    "mount",
                    &[
                        "-t",
                        match fs {
                            FsKind::Vfat => "vfat",
                            FsKind::Ext4 => "ext4",
                        },
                        device,
                        &s(at),
                    ],
                )),
            ],
            Step::CopyRootfs { squashfs, target } => vec![Action::Run(Cmd::new(
                "unsquashfs",
                &["-f", "-no-progress", "-d", &s(target), &s(squashfs)],
            ))],
            Step::WriteFiles { files, .. } => files.clone(),
            Step::SetRootPassword { target, hash } => vec![Action::Run(Cmd {
                program: "chroot".into(),
                args: vec![s(target), "chpasswd".into(), "--encrypted".into()],
                stdin: Some(Secret::new(format!("root:{}\n", hash.expose()))),
                allow_fail: false,
            })],
            Step::RemoveLiveOnly { target } => LIVE_ONLY_PATHS
                .iter()
                .map(|rel| Action::Remove {
                    path: p(target, rel),
                })
                .collect(),
            Step::EnableUnits { target, units } => {
                let root = format!("--root={}", s(target));
                let mut args = vec![root.as_str(), "enable"];
                args.extend(units.iter().map(String::as_str));
                vec![Action::Run(Cmd::new("systemctl", &args))]
            }
            Step::BindSystemMounts { target } => vec![
                // not --rbind: unmounting a recursive bind of /dev can propagate to the live
                // system's own /dev/pts and /dev/shm
                Action::Run(Cmd::new(
                    "mount",
                    &["--bind", "/dev", &s(&p(target, "dev"))],
                )),
                Action::Run(Cmd::new(
                    "mount",
                    &["-t", "proc", "proc", &s(&p(target, "proc"))],
                )),
                Action::Run(Cmd::new(
                    "mount",
                    &["-t", "sysfs", "sysfs", &s(&p(target, "sys"))],
                )),
            ],
            Step::InstallGrub {
                target,
                firmware,
                disk,
            } => {
                let t = s(target);
                vec![Action::Run(match firmware {
                    Firmware::Bios => Cmd::new(
                        "chroot",
                        &[
                            &t,
                            "grub-install",
                            "--target=i386-pc",
                            "--boot-directory=/boot",
                            disk,
                        ],
                    ),
                    Firmware::Uefi => Cmd::new(
                        "chroot",
                        &[
                            &t,
                            "grub-install",
                            "--target=x86_64-efi",
                            "--efi-directory=/boot/efi",
                            "--boot-directory=/boot",
                            "--removable",
                            "--no-nvram",
                            "--no-uefi-secure-boot",
                        ],
                    ),
                })]
            }
            Step::Unmount { target } => vec![
                Action::Run(Cmd::new("sync", &[])),
                Action::Run(Cmd::new("umount", &["--recursive", &s(target)])),
            ],
        }
    }
}

impl Action {
    fn tolerated(self) -> Self {
        match self {
            Action::Run(mut c) => {
                c.allow_fail = true;
                Action::Run(c)
            }
            other => other,
        }
    }
}

/// The whole installation.
#[derive(Debug, Clone)]
pub struct Plan {
    pub disk: Disk,
    pub steps: Vec<Step>,
}

/// What first boot does, written to `/etc/keel/firstboot.toml` (mode 0600: may hold the
/// join token; deleted once the cluster is joined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstBoot {
    pub cluster: ClusterSpec,
}

impl Plan {
    pub fn build(answer: &Answer, input: &PlanInput) -> Plan {
        let t = input.target.as_path();
        let disk = input.disk.path();
        let part = |n| input.disk.partition_path(n);
        let ids = &input.ids;
        let mut steps = vec![
            Step::Partition {
                disk: disk.clone(),
                root_size: answer.disk.root_size,
                partitions: (1..=5).map(part).collect(),
            },
            Step::Format {
                device: part(2),
                fs: FsKind::Vfat,
                label: "KEEL-ESP".into(),
                id: format!("{:08X}", ids.esp_serial),
            },
        ];
        for (n, label, id) in [
            (3, "keel-root-a", &ids.root_a),
            (4, "keel-root-b", &ids.root_b),
            (5, "keel-data", &ids.data),
        ] {
            steps.push(Step::Format {
                device: part(n),
                fs: FsKind::Ext4,
                label: label.into(),
                id: id.clone(),
            });
        }
        steps.push(Step::Mount {
            device: part(3),
            at: t.to_path_buf(),
            fs: FsKind::Ext4,
        });
        steps.push(Step::CopyRootfs {
            squashfs: input.squashfs.clone(),
            target: t.to_path_buf(),
        });
        steps.push(Step::Mount {
            device: part(2),
            at: p(t, "boot/efi"),
            fs: FsKind::Vfat,
        });
        steps.push(Step::Mount {
            device: part(5),
            at: p(t, "var/lib/keel"),
            fs: FsKind::Ext4,
        });
        steps.push(Step::RemoveLiveOnly {
            target: t.to_path_buf(),
        });
        steps.push(Step::WriteFiles {
            what: "fstab, host name, network, GRUB and node configuration".into(),
            files: system_files(answer, input),
        });
        if let Some(hash) = &answer.system.root_password_hash {
            steps.push(Step::SetRootPassword {
                target: t.to_path_buf(),
                hash: hash.clone(),
            });
        }
        steps.push(Step::EnableUnits {
            target: t.to_path_buf(),
            units: ENABLED_UNITS.iter().map(|u| u.to_string()).collect(),
        });
        steps.push(Step::BindSystemMounts {
            target: t.to_path_buf(),
        });
        for firmware in [Firmware::Bios, Firmware::Uefi] {
            steps.push(Step::InstallGrub {
                target: t.to_path_buf(),
                firmware,
                disk: disk.clone(),
            });
        }
        steps.push(Step::Unmount {
            target: t.to_path_buf(),
        });
        Plan {
            disk: input.disk.clone(),
            steps,
        }
    }

    /// The dry-run listing: every step with its actions, secrets hidden.
    pub fn render(&self) -> String {
        let mut out = format!("Install plan for {}\n", self.disk);
        for (i, step) in self.steps.iter().enumerate() {
            out.push_str(&format!("{:>3}. {}\n", i + 1, step.describe()));
            for a in step.actions() {
                for line in a.to_string().lines() {
                    out.push_str(&format!("       {line}\n"));
                }
            }
        }
        out
    }
}

fn write(target: &Path, rel: &str, contents: String, mode: u32) -> Action {
    Action::Write {
        path: p(target, rel),
        contents,
        mode,
        secret: false,
    }
}

/// The files the installer writes into the new system.
fn system_files(answer: &Answer, input: &PlanInput) -> Vec<Action> {
    let t = input.target.as_path();
    let host = &answer.system.hostname;
    let node = NodeConfig::new(host, &input.nic.mac, &answer.network.config);
    let mut files = vec![
        write(t, "etc/fstab", fstab(&input.ids), 0o644),
        write(t, "etc/hostname", format!("{host}\n"), 0o644),
        write(
            t,
            "etc/hosts",
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"),
            0o644,
        ),
        write(t, "etc/machine-id", String::new(), 0o444),
        write(
            t,
            "etc/systemd/network/10-keel-mgmt.network",
            network_unit(&input.nic, &answer.network.config),
            0o644,
        ),
        write(
            t,
            "boot/grub/grub.cfg",
            grub_cfg(&input.ids, &input.kernel_version),
            0o644,
        ),
        write(t, "etc/keel/node.toml", node.to_toml(), 0o644),
        Action::Write {
            path: p(t, "etc/keel/firstboot.toml"),
            contents: toml::to_string(&FirstBoot {
                cluster: answer.cluster.clone(),
            })
            .unwrap_or_default(),
            mode: 0o600,
            secret: matches!(answer.cluster, ClusterSpec::Join { .. }),
        },
        write(t, "etc/keel/answer.toml", answer.to_redacted_toml(), 0o600),
    ];
    if let IpConfig::Static { dns, .. } = &answer.network.config {
        if !dns.is_empty() {
            let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
            files.push(write(t, "etc/resolv.conf", text, 0o644));
        }
    }
    if !answer.system.ssh_authorized_keys.is_empty() {
        files.push(Action::Mkdir {
            path: p(t, "root/.ssh"),
            mode: 0o700,
        });
        let keys: String = answer
            .system
            .ssh_authorized_keys
            .iter()
            .map(|k| format!("{}\n", k.trim()))
            .collect();
        files.push(write(t, "root/.ssh/authorized_keys", keys, 0o600));
    }
    files
}

/// `/etc/fstab`: every mount by UUID.
pub fn fstab(ids: &FsIds) -> String {
    format!(
        "# Keel (written by keel-installer): mounts by filesystem UUID.\n\
         # keel-root-b (UUID={}) holds the next version during an update; it is not mounted.\n\
         UUID={}\t/\text4\terrors=remount-ro\t0\t1\n\
         UUID={}\t/boot/efi\tvfat\tumask=0077\t0\t2\n\
         UUID={}\t/var/lib/keel\text4\tdefaults,nodev,nosuid\t0\t2\n",
        ids.root_b,
        ids.root_a,
        ids.esp_uuid(),
        ids.data
    )
}

/// `/boot/grub/grub.cfg` on root A, used by both the BIOS and the UEFI GRUB.
pub fn grub_cfg(ids: &FsIds, kernel: &str) -> String {
    format!(
        "# Keel (written by keel-installer). Root A runs; root B takes updates later.\n\
         serial --unit=0 --speed=115200\n\
         terminal_input console serial\n\
         terminal_output console serial\n\
         set timeout=3\n\
         set default=0\n\
         search --no-floppy --fs-uuid --set=root {a}\n\
         menuentry \"Keel (root A)\" {{\n\
         \x20   linux /boot/vmlinuz-{kernel} root=UUID={a} ro console=tty0 console=ttyS0,115200n8\n\
         \x20   initrd /boot/initrd.img-{kernel}\n\
         }}\n",
        a = ids.root_a
    )
}

/// The systemd-networkd unit of the management interface, matched by MAC address.
pub fn network_unit(nic: &Nic, cfg: &IpConfig) -> String {
    let mut s = format!(
        "# Keel management network (written by keel-installer; installed as {}).\n[Match]\nMACAddress={}\n\n[Network]\n",
        nic.name, nic.mac
    );
    match cfg {
        IpConfig::Dhcp => s.push_str("DHCP=yes\n"),
        IpConfig::Static {
            address,
            prefix,
            gateway,
            dns,
        } => {
            s.push_str(&format!("Address={address}/{prefix}\n"));
            if let Some(g) = gateway {
                s.push_str(&format!("Gateway={g}\n"));
            }
            for d in dns {
                s.push_str(&format!("DNS={d}\n"));
            }
        }
    }
    s.push_str("\n[Link]\nRequiredForOnline=yes\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Bus;

    pub(crate) const ANSWER: &str = r#"
[disk]
serial = "KEEL0"
[system]
hostname = "node1"
root_password_hash = "$6$salt$abcdefghijklmnopqrstuvwxyz"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3m3c0V2cmdTOw0Tz3IYQfOYeMRhKXnU3MDyNkd4bk9 admin@site"]
[network]
mode = "static"
address = "192.168.10.11/24"
gateway = "192.168.10.1"
dns = ["192.168.10.1"]
[cluster]
mode = "join"
token = "keel-join-v1.eyJpZCI6IjEifQ"
"#;

    fn input() -> PlanInput {
        PlanInput {
            disk: crate::disk::test_disk("nvme0n1", 100, Bus::Nvme, "Samsung", "KEEL0"),
            nic: Nic {
                name: "enp1s0".into(),
                mac: "52:54:00:12:34:56".into(),
            },
            kernel_version: "6.1.0-50-amd64".into(),
            squashfs: "/run/live/medium/live/filesystem.squashfs".into(),
            target: "/target".into(),
            ids: FsIds {
                esp_serial: 0x1a2b3c4d,
                root_a: "aaaaaaaa-0000-4000-8000-000000000001".into(),
                root_b: "bbbbbbbb-0000-4000-8000-000000000002".into(),
                data: "dddddddd-0000-4000-8000-000000000003".into(),
            },
        }
    }

    fn plan() -> Plan {
        let answer = Answer::parse("t", ANSWER).unwrap_or_else(|e| panic!("{e}"));
        Plan::build(&answer, &input())
    }

    fn all_actions(plan: &Plan) -> Vec<Action> {
        plan.steps.iter().flat_map(Step::actions).collect()
    }

    fn written(plan: &Plan, rel: &str) -> String {
        all_actions(plan)
            .into_iter()
            .find_map(|a| match a {
                Action::Write { path, contents, .. } if path == Path::new("/target").join(rel) => {
                    Some(contents)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{rel} not written"))
    }

    #[test]
    fn steps_come_in_a_safe_order() {
        let plan = plan();
        let kinds: Vec<String> = plan
            .steps
            .iter()
            .map(|s| {
                format!("{s:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Partition",
                "Format",
                "Format",
                "Format",
                "Format",
                "Mount",
                "CopyRootfs",
                "Mount",
                "Mount",
                "RemoveLiveOnly",
                "WriteFiles",
                "SetRootPassword",
                "EnableUnits",
                "BindSystemMounts",
                "InstallGrub",
                "InstallGrub",
                "Unmount"
            ]
        );
    }

    #[test]
    fn partitions_and_formats_the_selected_disk() {
        let actions = all_actions(&plan());
        let cmds: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Run(c) => Some(c.to_string()),
                _ => None,
            })
            .collect();
        let sg = cmds
            .iter()
            .find(|c| c.starts_with("sgdisk --clear"))
            .cloned()
            .unwrap_or_default();
        assert!(sg.contains("--new=1:0:+1M --typecode=1:EF02"), "{sg}");
        assert!(sg.contains("--new=2:0:+512M --typecode=2:EF00"), "{sg}");
        assert!(
            sg.contains("--new=3:0:+4096M --typecode=3:8304 --change-name=3:keel-root-a"),
            "{sg}"
        );
        assert!(
            sg.contains("--new=5:0:0 --typecode=5:8300 --change-name=5:keel-data /dev/nvme0n1"),
            "{sg}"
        );
        assert!(
            cmds.contains(&"mkfs.vfat -F 32 -n KEEL-ESP -i 1A2B3C4D /dev/nvme0n1p2".to_string())
        );
        assert!(cmds.contains(
            &"mkfs.ext4 -q -F -L keel-root-a -U aaaaaaaa-0000-4000-8000-000000000001 /dev/nvme0n1p3".to_string()
        ));
        assert!(cmds.contains(
            &"chroot /target grub-install --target=i386-pc --boot-directory=/boot /dev/nvme0n1"
                .to_string()
        ));
        assert!(cmds
            .iter()
            .any(|c| c.contains("--target=x86_64-efi") && c.contains("--removable")));
        assert!(actions.contains(&Action::WaitFor {
            path: "/dev/nvme0n1p5".into(),
            seconds: 30
        }));
    }

    #[test]
    fn fstab_and_grub_use_uuids() {
        let plan = plan();
        let fstab = written(&plan, "etc/fstab");
        assert!(
            fstab.contains("UUID=aaaaaaaa-0000-4000-8000-000000000001\t/\text4"),
            "{fstab}"
        );
        assert!(fstab.contains("UUID=1A2B-3C4D\t/boot/efi\tvfat"), "{fstab}");
        assert!(
            fstab.contains("UUID=dddddddd-0000-4000-8000-000000000003\t/var/lib/keel"),
            "{fstab}"
        );
        assert!(!fstab.contains("/dev/"), "{fstab}");
        let grub = written(&plan, "boot/grub/grub.cfg");
        assert!(
            grub.contains("search --no-floppy --fs-uuid --set=root aaaaaaaa-"),
            "{grub}"
        );
        assert!(grub.contains("linux /boot/vmlinuz-6.1.0-50-amd64 root=UUID=aaaaaaaa-0000-4000-8000-000000000001 ro"), "{grub}");
        assert!(grub.contains("console=ttyS0"), "{grub}");
    }

    #[test]
    fn network_and_node_configuration() {
        let plan = plan();
        let net = written(&plan, "etc/systemd/network/10-keel-mgmt.network");
        assert!(net.contains("MACAddress=52:54:00:12:34:56"), "{net}");
        assert!(
            net.contains("Address=192.168.10.11/24\nGateway=192.168.10.1\nDNS=192.168.10.1"),
            "{net}"
        );
        assert_eq!(
            written(&plan, "etc/resolv.conf"),
            "nameserver 192.168.10.1\n"
        );
        assert_eq!(written(&plan, "etc/hostname"), "node1\n");
        let node = written(&plan, "etc/keel/node.toml");
        let parsed: NodeConfig = toml::from_str(&node).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.interface_mac, "52:54:00:12:34:56");
        assert_eq!(parsed.static_address.as_deref(), Some("192.168.10.11"));
        assert!(written(&plan, "root/.ssh/authorized_keys").starts_with("ssh-ed25519 "));
        let dhcp = network_unit(&input().nic, &IpConfig::Dhcp);
        assert!(dhcp.contains("DHCP=yes"));
    }

    #[test]
    fn live_only_files_are_removed_and_units_enabled() {
        let actions = all_actions(&plan());
        for rel in LIVE_ONLY_PATHS {
            assert!(actions.contains(&Action::Remove {
                path: Path::new("/target").join(rel)
            }));
        }
        assert!(actions.iter().any(|a| matches!(a, Action::Run(c) if c.to_string().starts_with("systemctl --root=/target enable keel.service keel-firstboot.service"))));
    }

    #[test]
    fn the_rendered_plan_never_shows_secrets() {
        let plan = plan();
        let text = plan.render();
        assert!(!text.contains("$6$salt"), "password hash leaked");
        assert!(!text.contains("keel-join-v1.eyJ"), "join token leaked");
        assert!(
            text.contains("firstboot.toml (mode 0600, contents not shown: secret)"),
            "{text}"
        );
        assert!(
            text.contains("chpasswd --encrypted < (secret on standard input, not shown)"),
            "{text}"
        );
        assert!(text.contains("Install plan for /dev/nvme0n1"), "{text}");
        // the redacted answer kept on the node has neither
        let kept = written(&plan, "etc/keel/answer.toml");
        assert!(!kept.contains("$6$") && !kept.contains("eyJ"), "{kept}");
        // but the secrets do reach their destinations
        let secret_in = all_actions(&plan).into_iter().any(|a| matches!(a, Action::Run(c) if c.stdin.as_ref().is_some_and(|s| s.expose().starts_with("root:$6$salt$"))));
        assert!(secret_in);
        let fb: FirstBoot = toml::from_str(&written(&plan, "etc/keel/firstboot.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(fb.cluster, ClusterSpec::Join { token } if token.expose().starts_with("keel-join-v1."))
        );
    }

    #[test]
    fn the_image_overlay_has_the_live_only_files_and_units() {
        let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/rootfs");
        for rel in LIVE_ONLY_PATHS.iter().filter(|r| !r.contains(".wants/")) {
            assert!(
                overlay.join(rel).exists(),
                "{rel} missing from image/rootfs"
            );
        }
        for unit in ENABLED_UNITS.iter().filter(|u| u.starts_with("keel")) {
            assert!(
                overlay.join("etc/systemd/system").join(unit).exists(),
                "{unit} missing"
            );
        }
    }

    #[test]
    fn esp_uuid_format() {
        assert_eq!(input().ids.esp_uuid(), "1A2B-3C4D");
        let r = FsIds::random();
        assert_ne!(r.root_a, r.root_b);
    }
}
