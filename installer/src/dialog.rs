//! The interactive installer: a line-based dialog, chosen over a full-screen TUI because it
//! works the same on a VGA console, a serial console (any terminal type, any size, no
//! cursor addressing) and a BMC's serial-over-LAN. It asks the questions of the answer file
//! and produces the same [`Answer`], which then goes through the same validation, plan and
//! runner as an unattended install.

use std::io::{self, BufRead, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::answer::ByteSize;
use crate::answer::{
    check_hostname, check_join_token, check_ssh_key, parse_cidr, Answer, ClusterSpec, DiskSpec,
    InstallSpec, IpConfig, NetworkSpec, Secret, SystemSpec, DEFAULT_ROOT_SIZE,
};
use crate::disk::Disk;
use crate::net::Nic;

/// What the dialog talks through.
pub trait Terminal {
    /// One line of input, without its newline; `None` at end of input.
    fn line(&mut self, prompt: &str) -> io::Result<Option<String>>;
    /// Like [`Terminal::line`] but not echoed.
    fn secret(&mut self, prompt: &str) -> io::Result<Option<String>>;
    fn say(&mut self, text: &str) -> io::Result<()>;
}

/// Standard input and output; secrets are read with echo off (`stty -echo`) on a terminal.
pub struct StdTerminal {
    stdin: io::StdinLock<'static>,
}

impl Default for StdTerminal {
    fn default() -> Self {
        Self {
            stdin: io::stdin().lock(),
        }
    }
}

fn stty(arg: &str) -> bool {
    Command::new("stty")
        .arg(arg)
        .stdin(Stdio::inherit())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Terminal for StdTerminal {
    fn line(&mut self, prompt: &str) -> io::Result<Option<String>> {
        let mut out = io::stdout();
        write!(out, "{prompt}")?;
        out.flush()?;
        let mut s = String::new();
        if self.stdin.read_line(&mut s)? == 0 {
            return Ok(None);
        }
        Ok(Some(s.trim_end_matches(['\n', '\r']).to_string()))
    }

    fn secret(&mut self, prompt: &str) -> io::Result<Option<String>> {
        let echo_off = stty("-echo");
        let r = self.line(prompt);
        if echo_off {
            stty("echo");
            println!();
        }
        r
    }

    fn say(&mut self, text: &str) -> io::Result<()> {
        println!("{text}");
        Ok(())
    }
}

/// Why a password could not be hashed (the password never appears in it).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot run openssl")]
    Spawn(#[source] io::Error),
    #[error("cannot hand the password to openssl")]
    Feed(#[source] io::Error),
    #[error("openssl could not hash the password")]
    Failed,
}

/// Hashes a password with `openssl passwd -6` (SHA-512 crypt); the password goes on stdin.
pub fn openssl_hash(password: &str) -> Result<Secret, HashError> {
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(HashError::Spawn)?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(format!("{password}\n").as_bytes())
            .map_err(HashError::Feed)?;
    }
    let out = child.wait_with_output().map_err(HashError::Feed)?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && hash.starts_with("$6$") {
        Ok(Secret::new(hash))
    } else {
        Err(HashError::Failed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialogError {
    #[error("terminal")]
    Io(#[from] io::Error),
    #[error("no disk to install on: {0}")]
    NoDisk(String),
    #[error("no network card found: the node needs one for its management network")]
    NoNic,
}

type Res<T> = Result<Option<T>, DialogError>;

/// Asks until `parse` accepts the answer; an empty line takes `default` when there is one.
fn ask<T>(
    t: &mut dyn Terminal,
    prompt: &str,
    default: Option<&str>,
    parse: &dyn Fn(&str) -> Result<T, String>,
) -> Res<T> {
    let shown = match default {
        Some(d) if !d.is_empty() => format!("{prompt} [{d}]: "),
        _ => format!("{prompt}: "),
    };
    loop {
        let Some(line) = t.line(&shown)? else {
            return Ok(None);
        };
        let line = line.trim();
        let value = if line.is_empty() {
            default.unwrap_or("")
        } else {
            line
        };
        match parse(value) {
            Ok(v) => return Ok(Some(v)),
            Err(e) => t.say(&format!("  ! {e}"))?,
        }
    }
}

fn choose(t: &mut dyn Terminal, prompt: &str, n: usize) -> Res<usize> {
    ask(t, &format!("{prompt} (1-{n})"), Some("1"), &|s| {
        s.parse::<usize>()
            .ok()
            .filter(|i| (1..=n).contains(i))
            .map(|i| i - 1)
            .ok_or_else(|| format!("type a number from 1 to {n}"))
    })
}

fn one_of(t: &mut dyn Terminal, prompt: &str, choices: &[&str]) -> Res<String> {
    let list = choices.join("/");
    ask(
        t,
        &format!("{prompt} ({list})"),
        choices.first().copied(),
        &|s| {
            let s = s.to_lowercase();
            choices
                .iter()
                .find(|c| **c == s)
                .map(|c| c.to_string())
                .ok_or_else(|| format!("type one of: {list}"))
        },
    )
}

fn ip_list(s: &str) -> Result<Vec<IpAddr>, String> {
    s.split([',', ' '])
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().map_err(|_| format!("'{x}' is not an IP address")))
        .collect()
}

/// Runs the dialog; `Ok(None)` when the operator quits or input ends.
pub fn run(
    t: &mut dyn Terminal,
    disks: &[Disk],
    nics: &[Nic],
    hash: &dyn Fn(&str) -> Result<Secret, HashError>,
) -> Res<Answer> {
    let usable: Vec<&Disk> = disks
        .iter()
        .filter(|d| !d.live_medium && !d.read_only)
        .collect();
    if usable.is_empty() {
        let all: Vec<String> = disks.iter().map(|d| d.to_string()).collect();
        return Err(DialogError::NoDisk(if all.is_empty() {
            "none was found".into()
        } else {
            format!(
                "only the live medium or read-only disks: {}",
                all.join("; ")
            )
        }));
    }
    if nics.is_empty() {
        return Err(DialogError::NoNic);
    }
    loop {
        t.say("\n=== Keel installer ===\nAnswer each question; an empty line takes the value in [brackets].\n")?;
        t.say("Disks:")?;
        for (i, d) in usable.iter().enumerate() {
            t.say(&format!("  {}) {d}", i + 1))?;
        }
        let Some(i) = choose(t, "Install on disk", usable.len())? else {
            return Ok(None);
        };
        let disk = usable[i];
        let Some(hostname) = ask(t, "Host name", Some("keel-1"), &|s| {
            check_hostname(s)
                .map(|()| s.to_string())
                .map_err(|e| e.to_string())
        })?
        else {
            return Ok(None);
        };

        let nic = if nics.len() == 1 {
            nics[0].clone()
        } else {
            t.say("Network cards:")?;
            for (i, n) in nics.iter().enumerate() {
                t.say(&format!("  {}) {} ({})", i + 1, n.name, n.mac))?;
            }
            let Some(i) = choose(t, "Management network card", nics.len())? else {
                return Ok(None);
            };
            nics[i].clone()
        };
        let Some(mode) = one_of(t, "Management network", &["dhcp", "static"])? else {
            return Ok(None);
        };
        let config = if mode == "dhcp" {
            IpConfig::Dhcp
        } else {
            let Some((address, prefix)) = ask(
                t,
                "  Address/prefix (e.g. 192.168.1.10/24)",
                None,
                &|s| match parse_cidr(s).map_err(|e| e.to_string())? {
                    (ip, Some(p)) => Ok((ip, p)),
                    (_, None) => Err("add the prefix length, such as /24".into()),
                },
            )?
            else {
                return Ok(None);
            };
            let Some(gateway) = ask(t, "  Gateway (empty for none)", Some(""), &|s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse::<IpAddr>()
                        .map(Some)
                        .map_err(|_| format!("'{s}' is not an IP address"))
                }
            })?
            else {
                return Ok(None);
            };
            let Some(dns) = ask(
                t,
                "  DNS servers, comma-separated (empty for none)",
                Some(""),
                &ip_list,
            )?
            else {
                return Ok(None);
            };
            IpConfig::Static {
                address,
                prefix,
                gateway,
                dns,
            }
        };
        let network = NetworkSpec {
            interface: Some(nic.mac.clone()),
            config,
        };
        let mut net_problems = Vec::new();
        crate::answer::check_network(&network, &mut net_problems);
        if !net_problems.is_empty() {
            for p in &net_problems {
                t.say(&format!("  ! {p}"))?;
            }
            t.say("Let's start over.")?;
            continue;
        }

        let root_password_hash = loop {
            let Some(pw) = t.secret("Root password (empty: SSH key login only): ")? else {
                return Ok(None);
            };
            if pw.is_empty() {
                break None;
            }
            let Some(again) = t.secret("Root password again: ")? else {
                return Ok(None);
            };
            if pw != again {
                t.say("  ! the passwords differ; try again")?;
                continue;
            }
            match hash(&pw) {
                Ok(h) => break Some(h),
                Err(e) => t.say(&format!("  ! {}", keel_base::error_chain(&e)))?,
            }
        };
        let Some(ssh_key) = ask(
            t,
            "SSH public key for root (one line; empty for none)",
            Some(""),
            &|s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    check_ssh_key(s)
                        .map(|()| Some(s.to_string()))
                        .map_err(|e| e.to_string())
                }
            },
        )?
        else {
            return Ok(None);
        };
        if root_password_hash.is_none() && ssh_key.is_none() {
            t.say(
                "  ! give a root password or an SSH key, or nobody can log in. Let's start over.",
            )?;
            continue;
        }

        let Some(cluster_mode) =
            one_of(t, "Cluster: create a new one or join one", &["new", "join"])?
        else {
            return Ok(None);
        };
        let cluster = if cluster_mode == "new" {
            let Some(name) = ask(t, "  Cluster name", Some("keel"), &|s| {
                let mut p = Vec::new();
                crate::answer::check_cluster_spec(
                    &ClusterSpec::Init {
                        name: s.to_string(),
                    },
                    &mut p,
                );
                p.first()
                    .map_or(Ok(s.to_string()), |p| Err(p.message.clone()))
            })?
            else {
                return Ok(None);
            };
            ClusterSpec::Init { name }
        } else {
            let token = loop {
                let Some(tok) =
                    t.secret("  Join token (from `keel cluster token create`; not shown): ")?
                else {
                    return Ok(None);
                };
                match check_join_token(tok.trim()) {
                    Ok(()) => break Secret::new(tok.trim()),
                    Err(e) => t.say(&format!("  ! {e}"))?,
                }
            };
            ClusterSpec::Join { token }
        };

        let answer = Answer {
            disk: DiskSpec {
                path: Some(disk.path()),
                serial: disk.serial.clone(),
                wipe: disk.partitions > 0,
                allow_removable: disk.removable,
                root_size: ByteSize(DEFAULT_ROOT_SIZE),
                ..DiskSpec::default()
            },
            system: SystemSpec {
                hostname,
                root_password_hash,
                ssh_authorized_keys: ssh_key.into_iter().collect(),
            },
            network,
            cluster,
            install: InstallSpec::default(),
        };
        t.say("\nSummary (secrets not shown):")?;
        for line in answer.to_redacted_toml().lines() {
            t.say(&format!("  {line}"))?;
        }
        let Some(go) = ask(
            t,
            &format!("Type 'install' to ERASE {} and install Keel, 'again' to start over, 'quit' to leave", disk.path()),
            None,
            &|s| match s {
                "install" | "again" | "quit" => Ok(s.to_string()),
                _ => Err("type install, again or quit".into()),
            },
        )?
        else {
            return Ok(None);
        };
        match go.as_str() {
            "install" => return Ok(Some(answer)),
            "quit" => return Ok(None),
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Bus;
    use std::collections::VecDeque;

    struct Script {
        input: VecDeque<String>,
        output: String,
    }

    impl Script {
        fn new(lines: &[&str]) -> Self {
            Self {
                input: lines.iter().map(|s| s.to_string()).collect(),
                output: String::new(),
            }
        }
    }

    impl Terminal for Script {
        fn line(&mut self, prompt: &str) -> io::Result<Option<String>> {
            self.output.push_str(prompt);
            let l = self.input.pop_front();
            if let Some(l) = &l {
                self.output.push_str(l);
            }
            self.output.push('\n');
            Ok(l)
        }
        fn secret(&mut self, prompt: &str) -> io::Result<Option<String>> {
            self.output.push_str(prompt);
            self.output.push_str("(hidden)\n");
            Ok(self.input.pop_front())
        }
        fn say(&mut self, text: &str) -> io::Result<()> {
            self.output.push_str(text);
            self.output.push('\n');
            Ok(())
        }
    }

    fn fake_hash(pw: &str) -> Result<Secret, HashError> {
        Ok(Secret::new(format!("$6$fake${}", pw.len())))
    }

    fn disks() -> Vec<Disk> {
        let mut live = crate::disk::test_disk("sr0", 1, Bus::Sata, "CD", "");
        live.live_medium = true;
        vec![
            live,
            crate::disk::test_disk("vda", 20, Bus::Virtio, "", "KEEL0"),
            crate::disk::test_disk("vdb", 40, Bus::Virtio, "", "KEEL1"),
        ]
    }

    fn nics() -> Vec<Nic> {
        vec![Nic {
            name: "ens3".into(),
            mac: "52:54:00:00:00:01".into(),
        }]
    }

    #[test]
    fn static_network_join_cluster() {
        let mut t = Script::new(&[
            "2",      // vdb
            "Node_1", // rejected host name
            "node1",
            "static",
            "10.1.0.5", // no prefix: asked again
            "10.1.0.5/24",
            "10.1.0.1",
            "10.1.0.1, 10.1.0.2",
            "secret1",
            "secret2", // mismatch
            "secret1",
            "secret1",
            "", // no ssh key
            "join",
            "not-a-token",
            "keel-join-v1.eyJpZCI6IjEifQ",
            "install",
        ]);
        let a = run(&mut t, &disks(), &nics(), &fake_hash)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("aborted:\n{}", t.output));
        assert_eq!(a.disk.path.as_deref(), Some("/dev/vdb"));
        assert_eq!(a.disk.serial.as_deref(), Some("KEEL1"));
        assert_eq!(a.system.hostname, "node1");
        assert!(
            matches!(a.network.config, IpConfig::Static { prefix: 24, ref dns, .. } if dns.len() == 2)
        );
        assert_eq!(a.system.root_password_hash, Some(Secret::new("$6$fake$7")));
        assert!(matches!(a.cluster, ClusterSpec::Join { .. }));
        assert!(a.validate().is_empty(), "{:?}", a.validate());
        // the live medium was not offered, the errors were explained, secrets never shown
        assert!(!t.output.contains("/dev/sr0"), "{}", t.output);
        assert!(t.output.contains("! 'Node_1'"), "{}", t.output);
        assert!(t.output.contains("the passwords differ"), "{}", t.output);
        assert!(t.output.contains("add the prefix length"), "{}", t.output);
        assert!(!t.output.contains("eyJpZCI6"), "{}", t.output);
        assert!(!t.output.contains("secret1"), "{}", t.output);
    }

    #[test]
    fn defaults_dhcp_new_cluster_with_ssh_key() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3m3c0V2cmdTOw0Tz3IYQfOYeMRhKXnU3MDyNkd4bk9 me";
        let mut t = Script::new(&["", "", "", "", key, "", "", "install"]);
        let a = run(&mut t, &disks(), &nics(), &fake_hash)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("aborted:\n{}", t.output));
        assert_eq!(a.disk.path.as_deref(), Some("/dev/vda"));
        assert_eq!(a.system.hostname, "keel-1");
        assert_eq!(a.network.config, IpConfig::Dhcp);
        assert_eq!(a.network.interface.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(
            a.cluster,
            ClusterSpec::Init {
                name: "keel".into()
            }
        );
        assert_eq!(a.system.ssh_authorized_keys.len(), 1);
        assert!(a.validate().is_empty());
    }

    #[test]
    fn no_login_method_starts_over_and_quit_aborts() {
        let mut t = Script::new(&["", "", "", "", "", "", "", "", "", "", "", "", "quit"]);
        let r = run(&mut t, &disks(), &nics(), &fake_hash).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.is_none());
        assert!(t.output.contains("nobody can log in"), "{}", t.output);
    }

    #[test]
    fn end_of_input_aborts_and_no_disk_is_an_error() {
        let mut t = Script::new(&["1"]);
        assert!(run(&mut t, &disks(), &nics(), &fake_hash)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        let e = run(&mut t, &disks()[..1], &nics(), &fake_hash).unwrap_err();
        assert!(e.to_string().contains("only the live medium"), "{e}");
    }

    #[test]
    fn openssl_hashes_when_available() {
        if Command::new("openssl").arg("version").output().is_err() {
            return;
        }
        let h = openssl_hash("pw").unwrap_or_else(|e| panic!("{e}"));
        assert!(h.expose().starts_with("$6$"));
        assert!(crate::answer::check_password_hash(h.expose()).is_ok());
    }
}
