//! One libvirtd (with its virtlogd) per simulated host: [`LibvirtHost`].
//!
//! libvirtd in privileged mode has compiled-in paths (`/etc/libvirt`, `/run/libvirt`,
//! `/var/lib/libvirt`, `/var/log/libvirt`, `/var/cache/libvirt`). Several daemons on one
//! machine therefore each get a private copy of those directories, bind-mounted over the
//! real paths inside the host's namespace:
//!
//! ```text
//!  ip netns exec kn<run>-<i+1> sh -c '
//!      mount --bind <dir>/etc   /etc/libvirt        (libvirtd.conf: own host_uuid)
//!      mount --bind <dir>/run   /run/libvirt        (sockets, pid and status files)
//!      mount --bind <dir>/lib   /var/lib/libvirt    (definitions, qemu monitor sockets)
//!      mount --bind <dir>/log   /var/log/libvirt
//!      mount --bind <dir>/cache /var/cache/libvirt  (QEMU capability cache)
//!      virtlogd -p <dir>/virtlogd.pid &
//!      exec libvirtd -p <dir>/libvirtd.pid'
//!
//!  test process ── qemu:///system?socket=<dir>/run/libvirt-sock ──> that libvirtd
//! ```
//!
//! * `ip netns exec` gives the shell a private mount namespace (slave of the host's), so
//!   the bind mounts are seen by that shell and what it starts, and nowhere else; they
//!   vanish with the last process in it, so nothing is ever unmounted. virtlogd and
//!   libvirtd start from the same shell so that they share the mounts (libvirtd finds
//!   virtlogd's socket in its `/run/libvirt`). The test process reaches the daemon through
//!   the socket's real path under `<dir>`. Both daemons get `-p` pid files under `<dir>`:
//!   the default ones (`/run/libvirtd.pid`) are shared by every namespace and locked.
//! * libvirtd's unix socket (`libvirt-sock` in `unix_sock_dir`, `/run/libvirt` by default
//!   in libvirt 9.0) is its only listener: `listen_tcp`/`listen_tls` stay off. Migration
//!   between two such hosts is driven by the client, which holds a connection to each
//!   daemon's socket; qemu itself streams the guest to the `migrate_uri` it is given.
//!   The node gives explicit loopback ports (`tcp://127.0.0.1:PORT`, `listen_address`
//!   127.0.0.1, `disks_port`) and relays them between the hosts itself; libvirt uses
//!   explicit ports as given, so qemu.conf's migration settings stay at their defaults.
//! * qemu runs as root (`qemu.conf`): tests keep disks and logs in root-only temp dirs.
//!   Debian's libvirt nevertheless resolves its compiled-in qemu user `libvirt-qemu` at
//!   start-up, before reading qemu.conf, and fails without it; Debian creates that user
//!   (and group `kvm`) in `libvirt-daemon-system`, which this machine kind does not
//!   install. [`prepare_machine`] creates them once, like that package's postinst, and
//!   makes `/dev/kvm` `root:kvm 0660` — without that libvirt re-probes QEMU on every
//!   lookup (45-50 s for one domain start instead of ~1 s).
//! * Start time is dominated by the QEMU capability probe: 8-12 s cold, ~0.3 s with a
//!   filled `/var/cache/libvirt/qemu/capabilities`. Every host starts with a copy of a
//!   shared warm cache (`<marker dir>/libvirt-caps`, i.e. `/run/keel-tests/libvirt-caps`,
//!   or the machine's own libvirtd cache while that is empty); a host that had to probe
//!   refreshes it. libvirt validates the cache against the qemu
//!   binary and kernel itself, so a stale copy only costs one cold start.
//! * qemu processes are daemonized by libvirtd (their own session), so killing the
//!   daemons leaves the guests running — as on a real host whose libvirtd restarts.
//!   [`LibvirtHost::stop`] (and `Drop`) kill the daemons, then the qemu processes named
//!   in this host's pid files. The [`TestNet`] teardown kills whatever else is left in
//!   the namespace.
//!
//! All calls block (libvirt's are blocking too); async tests call them from
//! `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::{marker_dir, TestNet};
use crate::process::{proc_stat, process_alive, tail_file, ManagedProcess, ProcessSpec};
use crate::wait::{abort, millis, wait_until_blocking};

/// How long a libvirtd may take to answer after its start (a cold capability probe on a
/// busy two-core machine included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The private directories and the real paths they are mounted over.
const MOUNTS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// The shell run in the namespace: `$1` is the host's directory.
const START_SCRIPT: &str = r#"set -eu
R="$1"
for m in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt; do
  mkdir -p "${m#*:}"
  mount --bind "$R/${m%%:*}" "${m#*:}"
done
# Sockets of a previous run (a restart) would make the wait below pass at once.
rm -f /run/libvirt/virtlogd-sock /run/libvirt/virtlogd-admin-sock
LIBVIRT_LOG_OUTPUTS="2:file:$R/virtlogd.log" virtlogd -p "$R/virtlogd.pid" &
# libvirtd needs virtlogd's socket only when a domain starts; wait for it (bounded) so
# that the first start cannot race it.
i=0
while [ ! -S /run/libvirt/virtlogd-sock ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
LIBVIRT_LOG_OUTPUTS="2:file:$R/libvirtd.log" exec libvirtd -p "$R/libvirtd.pid"
"#;

/// Why libvirt tests cannot run here, or `None` when they can: root, the harness's own
/// tools ([`crate::skip_reason`]) and the libvirt and qemu binaries.
pub fn skip_reason() -> Option<String> {
    if let Some(r) = crate::skip_reason() {
        return Some(r);
    }
    for tool in [
        "libvirtd",
        "virtlogd",
        "virsh",
        "qemu-system-x86_64",
        "mount",
    ] {
        if crate::cmd::which(tool).is_none() {
            return Some(format!(
                "`{tool}` is not installed (run scripts/install-deps as root)"
            ));
        }
    }
    None
}

/// One-time machine setup for libvirtd (see the module header): the `kvm` group, the
/// `libvirt-qemu` user and group, and `/dev/kvm` as `root:kvm 0660`. Idempotent; the
/// result of the first call is kept.
pub fn prepare_machine() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| prepare_machine_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("preparing the machine for libvirtd: {e}"))
}

fn prepare_machine_once() -> Result<()> {
    // The same users Debian's libvirt-daemon-system creates (uid/gid 64055 when free).
    // A concurrent test process may create them at the same time: check again after.
    const SCRIPT: &str = r#"
getent group kvm >/dev/null || groupadd --system kvm || getent group kvm >/dev/null
if ! getent passwd libvirt-qemu >/dev/null; then
  uid=""; getent passwd 64055 >/dev/null || uid="--uid 64055"
  useradd --system $uid --gid kvm --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu \
    || getent passwd libvirt-qemu >/dev/null
fi
if ! getent group libvirt-qemu >/dev/null; then
  gid=""; getent group 64055 >/dev/null || gid="--gid 64055"
  groupadd --system $gid libvirt-qemu || getent group libvirt-qemu >/dev/null
fi
id -nG libvirt-qemu | grep -qw libvirt-qemu || usermod -a -G libvirt-qemu libvirt-qemu
if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
"#;
    crate::cmd::run("sh", &["-c", SCRIPT])?;
    Ok(())
}

/// The shared warm QEMU capability cache.
fn shared_cache_dir() -> PathBuf {
    marker_dir().join("libvirt-caps")
}

/// `*.xml` files of a capability cache directory, sorted by name, with their contents.
fn cache_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !name.ends_with(".xml") {
                return None;
            }
            Some((name, std::fs::read(e.path()).ok()?))
        })
        .collect();
    files.sort();
    files
}

/// Replaces the shared cache with `files` (new directory, then two renames, so a reader
/// never sees half of it).
fn publish_cache(files: &[(String, Vec<u8>)]) -> Result<()> {
    let shared = shared_cache_dir();
    let parent = shared.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)?;
    let tag = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let tmp = parent.join(format!(".libvirt-caps.new-{tag}"));
    std::fs::create_dir_all(&tmp)?;
    for (name, data) in files {
        std::fs::write(tmp.join(name), data)?;
    }
    let old = parent.join(format!(".libvirt-caps.old-{tag}"));
    let had_old = std::fs::rename(&shared, &old).is_ok();
    let placed = std::fs::rename(&tmp, &shared);
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    if placed.is_err() {
        // Another process published at the same moment; theirs is as good.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

/// A random version-4 UUID (keel-tests has no uuid crate outside its tests).
pub fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    // Version 4, RFC 4122 variant.
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        8 | (b[8] & 0x3),
        &hex[17..20],
        &hex[20..32]
    )
}

/// A libvirtd + virtlogd pair for one host of a [`TestNet`]. See the module header.
#[derive(Debug)]
pub struct LibvirtHost {
    index: usize,
    ns: String,
    root: PathBuf,
    host_uuid: String,
    process: ManagedProcess,
    last_start: Duration,
    warm: bool,
    stopped: bool,
    // Last: removed after the processes are gone.
    dir: Option<tempfile::TempDir>,
}

impl LibvirtHost {
    /// Starts libvirtd for host `i` of `net` and waits until it answers.
    pub fn start(net: &TestNet, i: usize) -> Result<Self> {
        prepare_machine()?;
        if i >= net.len() {
            bail!(
                "host index {i} out of range: the network has {} hosts",
                net.len()
            );
        }
        let ns = net.ns(i);
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-libvirt-{ns}-"))
            .tempdir()
            .context("create the libvirt host's temp dir")?;
        let root = dir.path().to_path_buf();
        for (sub, _) in MOUNTS {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let host_uuid = random_uuid();
        write_config(&root, &host_uuid, &ns)?;
        let warm = seed_cache(&root)?;
        let spec = ProcessSpec::new(format!("libvirtd{}", i + 1), "/bin/sh", &root)
            .netns(&ns)
            .args(["-c", START_SCRIPT, "keel-libvirt"])
            .arg(&root)
            .cwd(&root);
        let process = ManagedProcess::spawn(spec)?;
        let mut host = LibvirtHost {
            index: i,
            ns,
            root,
            host_uuid,
            process,
            last_start: Duration::ZERO,
            warm,
            stopped: false,
            dir: Some(dir),
        };
        host.wait_ready()?;
        Ok(host)
    }

    /// Host index in the [`TestNet`].
    pub fn index(&self) -> usize {
        self.index
    }
    /// The network namespace the daemons run in.
    pub fn ns(&self) -> &str {
        &self.ns
    }
    /// The host's private tree (`etc/`, `run/`, `lib/`, `log/`, `cache/`, daemon logs);
    /// tests may keep their own files (serial logs, kernels) here too.
    pub fn dir(&self) -> &Path {
        &self.root
    }
    /// `host_uuid` of this libvirtd (distinct per host: libvirt refuses to migrate to a
    /// host with its own UUID).
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }
    /// Connection URI from the test process.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket_path().display())
    }
    /// libvirtd's read-write unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir().join("libvirt-sock")
    }
    /// The directory mounted as `/run/libvirt` inside the namespace.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// libvirtd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("libvirtd.log")
    }
    /// virtlogd's own log file (guests' serial logs are wherever their XML says).
    pub fn virtlogd_log_path(&self) -> PathBuf {
        self.root.join("virtlogd.log")
    }
    /// How long the last start took until libvirtd answered.
    pub fn last_start(&self) -> Duration {
        self.last_start
    }
    /// Whether the last start found a warm capability cache to copy in.
    pub fn started_warm(&self) -> bool {
        self.warm
    }
    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The last lines of libvirtd's log and of the start shell's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {} ---\n{}\n{}",
            self.log_path().display(),
            tail_file(&self.log_path(), lines),
            self.process.log_tail(lines)
        )
    }

    /// Runs `virsh -c URI args…` from the test process; returns stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .context("run virsh")?;
        if !out.status.success() {
            bail!(
                "virsh {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let desc = format!(
            "libvirtd of host {} to answer on {}",
            self.index,
            self.uri()
        );
        let process = &mut self.process;
        let uri = format!(
            "qemu:///system?socket={}",
            self.root.join("run/libvirt-sock").display()
        );
        let log = self.root.join("libvirtd.log");
        wait_until_blocking(desc, READY_TIMEOUT, millis(100), || {
            if !process.is_running() {
                return Err(abort(format!(
                    "the daemons exited ({:?}); {}\n--- {} ---\n{}",
                    process.exit_status(),
                    process.log_tail(20),
                    log.display(),
                    tail_file(&log, 20)
                )));
            }
            let out = Command::new("virsh")
                .args(["-c", &uri, "version"])
                .output()?;
            if out.status.success() {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                        .trim()
                        .replace('\n', " ")
                ))
            }
        })?;
        self.last_start = t0.elapsed();
        self.stopped = false;
        // A host that had to probe QEMU (or found a stale copy) refreshes the shared cache.
        let mine = cache_files(&self.root.join("cache/qemu/capabilities"));
        if !mine.is_empty() && mine != cache_files(&shared_cache_dir()) {
            if let Err(e) = publish_cache(&mine) {
                eprintln!("keel-tests: cannot publish the QEMU capability cache: {e:#}");
            }
        }
        Ok(())
    }

    /// `kill -9` of libvirtd and virtlogd (their guests keep running), waiting until both
    /// are reaped.
    pub fn kill_daemons(&mut self) -> Result<()> {
        self.process.kill_blocking()
    }

    /// Kills the daemons and starts them again (same directories, same host UUID); waits
    /// until libvirtd answers. Running guests are picked up again by the new libvirtd.
    pub fn restart(&mut self) -> Result<()> {
        self.kill_daemons()?;
        self.warm = seed_cache(&self.root)?;
        self.process.start()?;
        self.wait_ready()
    }

    /// Kills the daemons and every qemu they started. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.kill_daemons()?;
        let pids = self.qemu_pids();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Orphans are reaped by PID 1, slowly: a zombie no longer runs, which is enough.
        wait_until_blocking(
            format!("the qemu processes of host {} to die", self.index),
            Duration::from_secs(20),
            millis(20),
            || {
                let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
                if alive.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("still alive: {alive:?}"))
                }
            },
        )?;
        self.stopped = true;
        Ok(())
    }

    /// Pids of running qemu processes named in this host's pid files
    /// (`/run/libvirt/qemu/<name>.pid` inside).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.run_dir().join("qemu")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .filter(|&pid: &u32| {
                proc_stat(pid).is_some_and(|s| s.state != 'Z')
                    && std::fs::read(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.starts_with(b"qemu"))
            })
            .collect()
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Err(e) = self.stop() {
            eprintln!(
                "keel-tests: stopping libvirtd of host {}: {e:#}",
                self.index
            );
        }
        let keep = failed || std::env::var_os("KEEL_TEST_KEEP_DIR").is_some_and(|v| v == "1");
        if failed {
            eprintln!(
                "keel-tests: libvirt host {} ({}) log tail:\n{}",
                self.index,
                self.ns,
                self.log_tail(40)
            );
        }
        if keep {
            if let Some(dir) = self.dir.take() {
                eprintln!("keel-tests: kept {}", dir.keep().display());
            }
        }
    }
}

/// Writes libvirtd.conf and qemu.conf (and the host's client configs) into `<root>/etc`.
fn write_config(root: &Path, host_uuid: &str, ns: &str) -> Result<()> {
    let etc = root.join("etc");
    // The distribution's client configs, if any (libvirt.conf, libvirt-admin.conf).
    if let Ok(entries) = std::fs::read_dir("/etc/libvirt") {
        for e in entries.flatten() {
            if e.path().is_file() {
                let _ = std::fs::copy(e.path(), etc.join(e.file_name()));
            }
        }
    }
    std::fs::write(
        etc.join("libvirtd.conf"),
        format!(
            "# keel-tests: libvirtd of the simulated host in netns {ns}.\n\
             # Each host needs its own UUID (libvirt refuses to migrate to \"itself\").\n\
             host_uuid = \"{host_uuid}\"\n\
             # Unix socket only (unix_sock_dir is the private /run/libvirt); migration is\n\
             # driven by the client over each daemon's socket.\n\
             listen_tls = 0\n\
             listen_tcp = 0\n\
             unix_sock_dir = \"/run/libvirt\"\n"
        ),
    )?;
    std::fs::write(
        etc.join("qemu.conf"),
        "# keel-tests: guests run as root (their files live in root-only temp dirs), with\n\
         # no security driver (no AppArmor/SELinux profiles on this machine kind).\n\
         # Migration: explicit loopback ports from the caller (the defaults otherwise).\n\
         user = \"root\"\n\
         group = \"root\"\n\
         security_driver = \"none\"\n",
    )?;
    Ok(())
}

/// Copies the shared warm capability cache (else the machine's own libvirtd cache, if it
/// has one) into `<root>/cache`; says whether there was one.
fn seed_cache(root: &Path) -> Result<bool> {
    let mut files = cache_files(&shared_cache_dir());
    if files.is_empty() {
        files = cache_files(Path::new("/var/cache/libvirt/qemu/capabilities"));
    }
    if files.is_empty() {
        return Ok(false);
    }
    let dst = root.join("cache/qemu/capabilities");
    std::fs::create_dir_all(&dst)?;
    for (name, data) in &files {
        std::fs::write(dst.join(name), data)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_uuids_are_valid_and_distinct() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        for u in [&a, &b] {
            let parts: Vec<&str> = u.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{u}"
            );
            assert!(parts[2].starts_with('4'), "{u}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{u}");
            assert!(u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{u}");
        }
    }
}
