//! Processes the harness runs: a node (`keel serve`) or a stand-in, usually inside a test
//! host's namespace (`ip netns exec NS program args…`; `ip` execs, so the child's pid is
//! the program's own).
//!
//! * Each process leads its own process group, so a kill reaches whatever it forked.
//! * stdout and stderr are appended to `<log_dir>/<name>.stdout.log` and
//!   `<log_dir>/<name>.stderr.log`; every start writes a `==== keel-tests:` header line to
//!   both, so a restarted node's log reads as one story.
//! * [`ManagedProcess::kill`] is `kill -9` of the whole group, then waits until the
//!   process is *reaped* — its `/proc/PID` entry is gone, not merely a zombie — and until
//!   no member of the group is left in `/proc` (orphans are reaped by PID 1, which takes
//!   2-5 s on this machine kind). A kill that returned means the ports are free and the
//!   data dir is no longer written to.
//! * [`ManagedProcess::stop`] is SIGTERM, a bounded wait, then the kill above.
//! * [`ManagedProcess::restart`] starts the same command line again.
//! * `Drop` kills (blocking), so a panicking test leaves no process behind.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::wait::{millis, wait_until, wait_until_blocking};

/// How long a kill may take until every process of the group is reaped.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(20);

/// The fields of `/proc/PID/stat` the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z` (zombie), `T`, …
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Start time in clock ticks after boot; with the pid it names a process uniquely.
    pub start_time: u64,
}

/// Reads `/proc/PID/stat`; `None` when there is no such process (reaped or never was).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp … starttime(22) …"; comm may hold spaces and ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// True when `pid` exists and is not a zombie. (`kill -0` also says yes for a zombie.)
pub fn process_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z')
}

/// True when `pid` has no `/proc` entry at all: it exited *and* was reaped.
pub fn process_reaped(pid: u32) -> bool {
    proc_stat(pid).is_none()
}

/// Pids (with their stat) of every process in process group `pgid`, zombies included.
pub fn group_members(pgid: u32) -> Vec<(u32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .filter(|(_, st)| st.pgrp == pgid)
        .collect()
}

/// The last `lines` lines of a file (at most its last 64 KiB), or a note why not.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("({}: {e})", path.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name for log files and messages, e.g. `node1`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Namespace to run in (`ip netns exec`); `None` runs in the test's own namespace.
    pub netns: Option<String>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    pub log_dir: PathBuf,
}

impl ProcessSpec {
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        log_dir: impl Into<PathBuf>,
    ) -> Self {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            netns: None,
            env: Vec::new(),
            cwd: None,
            log_dir: log_dir.into(),
        }
    }
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    pub fn netns(mut self, ns: impl Into<String>) -> Self {
        self.netns = Some(ns.into());
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    pub fn stdout_log(&self) -> PathBuf {
        self.log_dir.join(format!("{}.stdout.log", self.name))
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.log_dir.join(format!("{}.stderr.log", self.name))
    }
    /// The command line as run, for messages.
    pub fn command_line(&self) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.netns {
            s.push_str(&format!("ip netns exec {ns} "));
        }
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            let a = a.to_string_lossy();
            s.push(' ');
            // One line per command: quote (and escape newlines in) anything unusual.
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(&a);
            }
        }
        s
    }
}

/// How [`ManagedProcess::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It exited by itself after SIGTERM (or had already exited).
    Exited(Option<ExitStatus>),
    /// It ignored SIGTERM for the whole timeout and was killed.
    Killed,
}

/// A spawned process with its logs. See the module header.
#[derive(Debug)]
pub struct ManagedProcess {
    spec: ProcessSpec,
    child: Option<Child>,
    last_status: Option<ExitStatus>,
    starts: u32,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl ManagedProcess {
    /// Starts `spec`.
    pub fn spawn(spec: ProcessSpec) -> Result<Self> {
        let mut p = ManagedProcess {
            spec,
            child: None,
            last_status: None,
            starts: 0,
        };
        p.start()?;
        Ok(p)
    }

    /// Starts the process again when it is not running (same command line, same logs).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(anyhow!("{} is already running", self.spec.name));
        }
        std::fs::create_dir_all(&self.spec.log_dir)
            .with_context(|| format!("create {}", self.spec.log_dir.display()))?;
        self.starts += 1;
        let header = format!(
            "==== keel-tests: start #{} of {} at unix_ms={}: {}\n",
            self.starts,
            self.spec.name,
            unix_ms(),
            self.spec.command_line()
        );
        let open = |path: PathBuf| -> Result<File> {
            let mut f = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            f.write_all(header.as_bytes())?;
            Ok(f)
        };
        let stdout = open(self.spec.stdout_log())?;
        let stderr = open(self.spec.stderr_log())?;
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let ip = crate::cmd::which("ip").unwrap_or_else(|| "ip".into());
                let mut c = Command::new(ip);
                c.args(["netns", "exec", ns]).arg(&self.spec.program);
                c
            }
            None => Command::new(&self.spec.program),
        };
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        if let Some(dir) = &self.spec.cwd {
            cmd.current_dir(dir);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", self.spec.command_line()))?;
        self.child = Some(child);
        self.last_status = None;
        Ok(())
    }

    pub fn spec(&self) -> &ProcessSpec {
        &self.spec
    }
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }
    /// The pid while it runs (or until its exit was noticed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running; notices (and reaps) an exit.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.last_status = Some(status);
                self.child = None;
                false
            }
            Err(_) => false,
        }
    }

    /// The exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.last_status
    }

    pub fn stdout_log(&self) -> PathBuf {
        self.spec.stdout_log()
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.spec.stderr_log()
    }

    /// The last `lines` lines of both logs, labelled.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {} ({}) ---\n{}\n--- {} ---\n{}",
            self.spec.stderr_log().display(),
            self.spec.command_line(),
            tail_file(&self.spec.stderr_log(), lines),
            self.spec.stdout_log().display(),
            tail_file(&self.spec.stdout_log(), lines),
        )
    }

    /// One step of the reap loop: reaps the child, re-kills stragglers of the group, and
    /// says what is still there.
    fn reap_step(&mut self, pgid: u32) -> Result<Option<()>> {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.last_status = Some(status);
                    self.child = None;
                }
                Ok(None) => return Err(anyhow!("pid {pgid} has not exited yet")),
                Err(e) => return Err(anyhow!("waiting for pid {pgid}: {e}")),
            }
        }
        let left = group_members(pgid);
        if left.is_empty() {
            return Ok(Some(()));
        }
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        let list: Vec<String> = left
            .iter()
            .map(|(pid, st)| format!("{pid} state {}", st.state))
            .collect();
        Err(anyhow!("group {pgid} still has {}", list.join(", ")))
    }

    fn begin_kill(&mut self) -> Option<u32> {
        let pgid = self.pid()?;
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        Some(pgid)
    }

    /// `kill -9` of the process group, then waits until it is reaped (see module header).
    pub async fn kill(&mut self) -> Result<()> {
        let Some(pgid) = self.begin_kill() else {
            return Ok(());
        };
        let desc = format!(
            "{} (pid {pgid}) and its group to be reaped after SIGKILL",
            self.spec.name
        );
        wait_until(desc, REAP_TIMEOUT, millis(10), || {
            let r = self.reap_step(pgid);
            async move { r }
        })
        .await?;
        Ok(())
    }

    /// [`ManagedProcess::kill`] without a runtime (used by `Drop`).
    pub fn kill_blocking(&mut self) -> Result<()> {
        let Some(pgid) = self.begin_kill() else {
            return Ok(());
        };
        let desc = format!(
            "{} (pid {pgid}) and its group to be reaped after SIGKILL",
            self.spec.name
        );
        wait_until_blocking(desc, REAP_TIMEOUT, millis(10), || self.reap_step(pgid))?;
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for it to exit; kills it if it does not.
    /// Whatever it left in its process group is killed and reaped either way.
    pub async fn stop(&mut self, timeout: Duration) -> Result<StopOutcome> {
        let Some(pid) = self.pid() else {
            return Ok(StopOutcome::Exited(self.last_status));
        };
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let desc = format!("{} (pid {pid}) to exit after SIGTERM", self.spec.name);
        let exited = wait_until(desc, timeout, millis(20), || {
            let running = self.is_running();
            async move { Ok((!running).then_some(())) }
        })
        .await;
        match exited {
            Ok(()) => {
                // Reap helpers it may have left behind in its group.
                let status = self.last_status;
                let left = group_members(pid);
                if !left.is_empty() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    wait_until(
                        format!(
                            "the rest of {}'s process group to be reaped",
                            self.spec.name
                        ),
                        REAP_TIMEOUT,
                        millis(10),
                        || {
                            let r = self.reap_step(pid);
                            async move { r }
                        },
                    )
                    .await?;
                }
                Ok(StopOutcome::Exited(status))
            }
            Err(_) => {
                self.kill().await?;
                Ok(StopOutcome::Killed)
            }
        }
    }

    /// Kills it if it runs, then starts the same command line again.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.start()
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill_blocking() {
            eprintln!("keel-tests: {e:#}");
        }
    }
}
