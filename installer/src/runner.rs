//! Executes a [`Plan`] on a [`Host`]: the real machine ([`RealHost`]) or a recording fake
//! ([`RecordingHost`]) for tests. Dry-run mode is [`Plan::render`], which prints every step
//! and action without running anything.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_base::FileError;

use crate::plan::{Action, Cmd, Plan};

/// Where actions take effect.
pub trait Host {
    fn run(&mut self, cmd: &Cmd) -> Result<(), HostError>;
    fn write(&mut self, path: &Path, contents: &str, mode: u32) -> Result<(), HostError>;
    fn mkdir(&mut self, path: &Path, mode: u32) -> Result<(), HostError>;
    fn remove(&mut self, path: &Path) -> Result<(), HostError>;
    fn exists(&self, path: &Path) -> bool;
    fn sleep(&mut self, d: Duration);
}

/// Why an action failed on the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot feed {program}")]
    Feed {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The command ran and failed; `output` is the tail of what it printed.
    #[error("{status} ({output})")]
    Failed { status: String, output: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{} did not appear within {seconds} s", .path.display())]
    Timeout { path: PathBuf, seconds: u64 },
}

/// The real machine.
#[derive(Debug, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn run(&mut self, cmd: &Cmd) -> Result<(), HostError> {
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HostError::Spawn {
                program: cmd.program.clone(),
                source,
            })?;
        if let (Some(secret), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
            stdin
                .write_all(secret.expose().as_bytes())
                .map_err(|source| HostError::Feed {
                    program: cmd.program.clone(),
                    source,
                })?;
        }
        let out = child.wait_with_output().map_err(|source| HostError::Wait {
            program: cmd.program.clone(),
            source,
        })?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).to_string();
        if text.trim().is_empty() {
            text = String::from_utf8_lossy(&out.stdout).to_string();
        }
        let tail: Vec<&str> = text.trim().lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(HostError::Failed {
            status: out.status.to_string(),
            output: tail.join(" | "),
        })
    }

    fn write(&mut self, path: &Path, contents: &str, mode: u32) -> Result<(), HostError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(FileError::on("mkdir", dir))?;
        }
        // write beside and rename: replaces a symlink (resolv.conf) instead of following it
        let tmp = path.with_extension("keel-tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(FileError::on("create", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
            .map_err(FileError::on("chmod", &tmp))?;
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(FileError::on("write", &tmp))?;
        fs::rename(&tmp, path).map_err(FileError::on("rename into", path))?;
        Ok(())
    }

    fn mkdir(&mut self, path: &Path, mode: u32) -> Result<(), HostError> {
        fs::create_dir_all(path).map_err(FileError::on("mkdir", path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(FileError::on("chmod", path))?;
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> Result<(), HostError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FileError::on("remove", path)(source).into()),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Records actions instead of doing them; `fail_on` makes the first command containing that
/// text fail.
#[derive(Debug, Default)]
pub struct RecordingHost {
    pub done: Vec<String>,
    pub fail_on: Option<String>,
}

impl Host for RecordingHost {
    fn run(&mut self, cmd: &Cmd) -> Result<(), HostError> {
        let text = cmd.to_string();
        self.done.push(text.clone());
        match &self.fail_on {
            Some(f) if text.contains(f.as_str()) => Err(HostError::Failed {
                status: "exit status: 1".into(),
                output: "simulated".into(),
            }),
            _ => Ok(()),
        }
    }
    fn write(&mut self, path: &Path, _contents: &str, mode: u32) -> Result<(), HostError> {
        self.done.push(format!("write {} {mode:o}", path.display()));
        Ok(())
    }
    fn mkdir(&mut self, path: &Path, _mode: u32) -> Result<(), HostError> {
        self.done.push(format!("mkdir {}", path.display()));
        Ok(())
    }
    fn remove(&mut self, path: &Path) -> Result<(), HostError> {
        self.done.push(format!("rm {}", path.display()));
        Ok(())
    }
    fn exists(&self, _path: &Path) -> bool {
        true
    }
    fn sleep(&mut self, _d: Duration) {}
}

#[derive(Debug, thiserror::Error)]
#[error("installation failed at step {number}/{total} ({step}):\n  {action}")]
pub struct InstallError {
    pub number: usize,
    pub total: usize,
    pub step: String,
    pub action: String,
    #[source]
    pub source: HostError,
}

fn short(action: &Action) -> String {
    match action {
        Action::Write { path, .. } => format!("write {}", path.display()),
        other => other.to_string(),
    }
}

/// Runs every step; on a failure it tries to unmount the target and stops.
pub fn execute(
    plan: &Plan,
    target: &Path,
    host: &mut dyn Host,
    progress: &mut dyn FnMut(&str),
) -> Result<(), InstallError> {
    let total = plan.steps.len();
    let started = Instant::now();
    for (i, step) in plan.steps.iter().enumerate() {
        let t = Instant::now();
        progress(&format!("[{:>2}/{total}] {}", i + 1, step.describe()));
        for action in step.actions() {
            let result = match &action {
                Action::Run(cmd) => match host.run(cmd) {
                    Err(e) if cmd.allow_fail => {
                        progress(&format!(
                            "        (tolerated) {cmd}: {}",
                            keel_base::error_chain(&e)
                        ));
                        Ok(())
                    }
                    r => r,
                },
                Action::Write {
                    path,
                    contents,
                    mode,
                    ..
                } => host.write(path, contents, *mode),
                Action::Mkdir { path, mode } => host.mkdir(path, *mode),
                Action::Remove { path } => host.remove(path),
                Action::WaitFor { path, seconds } => wait_for(host, path, *seconds),
            };
            if let Err(source) = result {
                let _ = host.run(&Cmd::new(
                    "umount",
                    &["--recursive", "--lazy", &target.display().to_string()],
                ));
                return Err(InstallError {
                    number: i + 1,
                    total,
                    step: step.describe(),
                    action: short(&action),
                    source,
                });
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if secs >= 2.0 {
            progress(&format!("        done in {secs:.1} s"));
        }
    }
    progress(&format!(
        "installation finished in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn wait_for(host: &mut dyn Host, path: &Path, seconds: u64) -> Result<(), HostError> {
    for _ in 0..seconds * 4 {
        if host.exists(path) {
            return Ok(());
        }
        host.sleep(Duration::from_millis(250));
    }
    if host.exists(path) {
        Ok(())
    } else {
        Err(HostError::Timeout {
            path: path.to_path_buf(),
            seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::{Answer, Bus};
    use crate::net::Nic;
    use crate::plan::{FsIds, PlanInput};

    fn plan() -> Plan {
        let answer = Answer::parse(
            "t",
            "[system]\nhostname = \"n1\"\nroot_password_hash = \"$6$s$h\"\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Plan::build(
            &answer,
            &PlanInput {
                disk: crate::disk::test_disk("vda", 20, Bus::Virtio, "", ""),
                nic: Nic {
                    name: "ens3".into(),
                    mac: "52:54:00:00:00:01".into(),
                },
                kernel_version: "6.1".into(),
                squashfs: "/sq".into(),
                target: "/target".into(),
                ids: FsIds::random(),
            },
        )
    }

    #[test]
    fn runs_every_action_in_order() {
        let mut host = RecordingHost::default();
        let mut lines = Vec::new();
        execute(&plan(), Path::new("/target"), &mut host, &mut |l| {
            lines.push(l.to_string());
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(host.done[0].starts_with("wipefs"), "{:?}", host.done);
        assert_eq!(
            host.done.last().map(String::as_str),
            Some("umount --recursive /target")
        );
        assert!(lines.iter().any(|l| l.contains("[ 1/")), "{lines:?}");
        assert!(
            host.done.iter().all(|l| !l.contains("$6$s$h")),
            "secret in {:?}",
            host.done
        );
    }

    #[test]
    fn a_failing_step_stops_and_unmounts() {
        let mut host = RecordingHost {
            fail_on: Some("unsquashfs".into()),
            ..Default::default()
        };
        let e = execute(&plan(), Path::new("/target"), &mut host, &mut |_| {}).unwrap_err();
        assert!(e.step.starts_with("Copy the system"), "{e}");
        assert!(keel_base::error_chain(&e).contains("simulated"), "{e}");
        assert_eq!(
            host.done.last().map(String::as_str),
            Some("umount --recursive --lazy /target")
        );
        assert!(!host.done.iter().any(|l| l.contains("grub-install")));
    }

    #[test]
    fn tolerated_failures_go_on() {
        let mut host = RecordingHost {
            fail_on: Some("udevadm settle".into()),
            ..Default::default()
        };
        execute(&plan(), Path::new("/target"), &mut host, &mut |_| {})
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn real_host_writes_files_with_mode_and_replaces_symlinks() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut host = RealHost;
        let link = dir.path().join("etc/resolv.conf");
        fs::create_dir_all(dir.path().join("etc")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("/nonexistent/stub", &link).unwrap_or_else(|e| panic!("{e}"));
        host.write(&link, "nameserver 10.0.0.1\n", 0o644)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read_to_string(&link).unwrap_or_default(),
            "nameserver 10.0.0.1\n"
        );
        let secret = dir.path().join("etc/keel/firstboot.toml");
        host.write(&secret, "x", 0o600)
            .unwrap_or_else(|e| panic!("{e}"));
        let mode = fs::metadata(&secret)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        assert!(host.run(&Cmd::new("true", &[])).is_ok());
        let e = host
            .run(&Cmd::new("sh", &["-c", "echo boom >&2; exit 3"]))
            .unwrap_err();
        let e = e.to_string();
        assert!(e.contains("boom") && e.contains('3'), "{e}");
        host.remove(&dir.path().join("missing"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
