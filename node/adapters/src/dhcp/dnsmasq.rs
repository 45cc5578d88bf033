//! The real [`Dhcp`]: one dnsmasq per guest network, inside the network's router namespace,
//! serving DHCP (static leases only) and DNS (local names only) on the gateway interface.
//!
//! Files of network V live in `<run_dir>/n<V>/`:
//! - `dnsmasq.conf`: everything except the host lists, rendered by the pure [`render`]. Its
//!   header names the namespace, so the file describes the running instance completely:
//!   same file (and the process still in that namespace) means same server.
//! - `hosts.dhcp` (`dhcp-hostsfile`, lines `mac,ip,hostname`, or `mac,ip` for a NIC without
//!   a name) and `hosts.dns` (`addn-hosts`, lines `ip hostname hostname.domain`): dnsmasq
//!   re-reads both on SIGHUP.
//! - `dnsmasq.pid`, `dnsmasq.leases`, `dnsmasq.log` (moved to `dnsmasq.log.old` beyond
//!   [`LOG_LIMIT`]) and `start.err` (what the last start printed on stderr).
//!
//! Process model:
//! - dnsmasq runs as a daemon (its default mode), started as `nsenter --net=<netns>
//!   <dnsmasq> --conf-file=<conf>` (nsenter enters the namespace and execs). dnsmasq's
//!   launcher exits only once the daemon has bound its sockets and written its pid file —
//!   or non-zero with dnsmasq's own message on stderr (unknown interface, address in use,
//!   bad option). A start is thus synchronous, and bounded by [`START_TIMEOUT`].
//! - The daemon is not a child of the node service: there is nothing to reap, and it keeps
//!   serving while the node service restarts. An instance is found through its pid file
//!   and recognised by `/proc/PID/cmdline` (which holds `--conf-file=<conf>`) and a state
//!   other than zombie (a killed daemon lingers as a zombie until PID 1 reaps it). A new
//!   adapter adopts a running instance whose configuration matches (and sends it one
//!   SIGHUP, in case host lists were written but not signalled before a crash); before any
//!   start, every other process running the same configuration file is killed, so there
//!   are never two.
//! - [`Dhcp::ensure`]: nothing running (or dead) → start; configuration file or namespace
//!   differ → stop and start; only host lists differ → atomic rewrite (temp file + rename)
//!   and SIGHUP; nothing differs → nothing happens.
//! - dnsmasq drops to `nobody:nogroup` after binding its sockets (it keeps only the
//!   capabilities DHCP needs). Neither user needs to exist beyond Debian's base system, and
//!   a compromised dnsmasq (it parses guests' packets) is not root. It re-reads the host
//!   lists as that user, so they are world-readable and the directories are searchable:
//!   the adapter makes `run_dir` and `n<V>` mode 0755 and refuses to run when a directory
//!   above `run_dir` is not searchable by others ([`DhcpError::RunDir`]).
//!
//! Air gap: no upstream servers (`no-resolv`, none configured), no `/etc/hosts`, and
//! `local=/#/`: every name that is not a host of the network is answered NXDOMAIN locally,
//! nothing is ever forwarded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::dhcp::{Dhcp, DhcpError, DhcpHost, DhcpNetwork};
use crate::links::MacAddr;

/// How long a start may take until dnsmasq's launcher has exited.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits after SIGTERM, and again after SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Size beyond which `dnsmasq.log` is moved to `dnsmasq.log.old` (checked on `ensure`).
pub const LOG_LIMIT: u64 = 4 << 20;
/// The user and group dnsmasq switches to after start (both in Debian's base system).
pub const USER: &str = "nobody";
pub const GROUP: &str = "nogroup";
/// dnsmasq's shortest lease.
pub const MIN_LEASE_SECS: u32 = 120;

const POLL: Duration = Duration::from_millis(10);

/// The files of one network's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPaths {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub dhcp_hosts: PathBuf,
    pub dns_hosts: PathBuf,
    pub pid: PathBuf,
    pub leases: PathBuf,
    pub log: PathBuf,
    pub start_err: PathBuf,
}

impl NetworkPaths {
    pub fn new(run_dir: &Path, vni: u32) -> Self {
        let dir = run_dir.join(format!("n{vni}"));
        NetworkPaths {
            conf: dir.join("dnsmasq.conf"),
            dhcp_hosts: dir.join("hosts.dhcp"),
            dns_hosts: dir.join("hosts.dns"),
            pid: dir.join("dnsmasq.pid"),
            leases: dir.join("dnsmasq.leases"),
            log: dir.join("dnsmasq.log"),
            start_err: dir.join("start.err"),
            dir,
        }
    }

    /// The argument that names this network's configuration, on the command line of its
    /// dnsmasq (how a process is recognised as this network's server).
    pub fn conf_arg(&self) -> String {
        format!("--conf-file={}", self.conf.display())
    }
}

/// The three files [`render`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// `dnsmasq.conf`.
    pub conf: String,
    /// `hosts.dhcp` (`dhcp-hostsfile`).
    pub dhcp_hosts: String,
    /// `hosts.dns` (`addn-hosts`).
    pub dns_hosts: String,
}

/// Why a network's values cannot go into dnsmasq's files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidNetwork {
    #[error("{name:?} is not an interface name")]
    Interface { name: String },
    #[error("prefix length /{prefix_len} leaves no room for hosts")]
    Prefix { prefix_len: u8 },
    #[error("gateway {gateway} is the network or broadcast address of /{prefix_len}")]
    Gateway { gateway: Ipv4Addr, prefix_len: u8 },
    #[error("domain {domain:?} is not a DNS name")]
    Domain { domain: String },
    #[error("MTU {mtu} is out of range (68-65535)")]
    Mtu { mtu: u32 },
    #[error("lease time {lease_secs} s is shorter than dnsmasq's minimum {MIN_LEASE_SECS} s")]
    Lease { lease_secs: u32 },
    #[error("hostname {name:?} (of {mac}) is not a DNS label")]
    Hostname { name: String, mac: MacAddr },
    #[error("address {ip} of {name} is not a host address of {network}/{prefix_len} other than the gateway")]
    HostAddress {
        ip: Ipv4Addr,
        name: String,
        network: Ipv4Addr,
        prefix_len: u8,
    },
    #[error("MAC {mac} appears twice")]
    DuplicateMac { mac: MacAddr },
    #[error("address {ip} appears twice")]
    DuplicateAddress { ip: Ipv4Addr },
    #[error("hostname {name} appears twice")]
    DuplicateHostname { name: String },
    #[error(
        "path {path:?} is not absolute or has characters other than letters, digits and /._-+"
    )]
    Path { path: std::path::PathBuf },
}

/// Renders a network's files; `Err` says why the network cannot be served (every value
/// that ends up in a file is checked first, so none can add a line or an option).
pub fn render(net: &DhcpNetwork, paths: &NetworkPaths) -> Result<Rendered, InvalidNetwork> {
    validate(net)?;
    for p in [
        &paths.conf,
        &paths.dhcp_hosts,
        &paths.dns_hosts,
        &paths.pid,
        &paths.leases,
        &paths.log,
    ] {
        check_path(p)?;
    }
    let netns = match &net.netns {
        Some(p) => {
            check_path(p)?;
            p.display().to_string()
        }
        None => "-".to_string(),
    };
    let mask = netmask(net.prefix_len);
    let network = Ipv4Addr::from(u32::from(net.gateway) & u32::from(mask));
    let (gw, domain, vni) = (net.gateway, &net.domain, net.vni);
    let mut c = String::new();
    let mut line = |s: String| {
        c.push_str(&s);
        c.push('\n');
    };
    line(format!(
        "# Guest network {vni}: written by keel on every change; do not edit."
    ));
    line(format!("# netns {netns}"));
    line(format!("interface={}", net.interface));
    line("bind-interfaces".into());
    line("except-interface=lo".into());
    line(format!("user={USER}"));
    line(format!("group={GROUP}"));
    line(format!("pid-file={}", paths.pid.display()));
    line(format!("log-facility={}", paths.log.display()));
    line("# DNS: the network's hosts only; nothing is ever forwarded (air gap).".into());
    line("port=53".into());
    line("no-resolv".into());
    line("no-hosts".into());
    line(format!("local=/{domain}/"));
    line("local=/#/".into());
    line(format!("domain={domain}"));
    line("expand-hosts".into());
    line(format!("addn-hosts={}", paths.dns_hosts.display()));
    line("# DHCP: static leases from IPAM only, never probed, client names ignored.".into());
    line(format!(
        "dhcp-range={network},static,{mask},{}",
        net.lease_secs
    ));
    line(format!("dhcp-hostsfile={}", paths.dhcp_hosts.display()));
    line(format!("dhcp-leasefile={}", paths.leases.display()));
    line("dhcp-authoritative".into());
    line("dhcp-ignore-names".into());
    line("no-ping".into());
    line(format!("dhcp-option=option:router,{gw}"));
    line(format!("dhcp-option=option:dns-server,{gw}"));
    line(format!("dhcp-option=option:domain-name,{domain}"));
    line(format!("dhcp-option=option:mtu,{}", net.mtu));

    let mut hosts: Vec<&DhcpHost> = net.hosts.iter().collect();
    hosts.sort();
    let mut dhcp_hosts = String::new();
    let mut dns_hosts = String::new();
    for h in hosts {
        match &h.hostname {
            Some(name) => {
                writeln!(dhcp_hosts, "{},{},{name}", h.mac, h.ip).unwrap();
                writeln!(dns_hosts, "{} {name} {name}.{domain}", h.ip).unwrap();
            }
            None => writeln!(dhcp_hosts, "{},{}", h.mac, h.ip).unwrap(),
        }
    }
    Ok(Rendered {
        conf: c,
        dhcp_hosts,
        dns_hosts,
    })
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

/// A DNS label: 1-63 ASCII letters, digits and hyphens, not starting or ending with one.
fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_path(p: &Path) -> Result<(), InvalidNetwork> {
    let ok = p.is_absolute()
        && p.to_str().is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidNetwork::Path {
            path: p.to_path_buf(),
        })
    }
}

fn validate(net: &DhcpNetwork) -> Result<(), InvalidNetwork> {
    let ifname = &net.interface;
    if ifname.is_empty()
        || ifname.len() > 15
        || !ifname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(InvalidNetwork::Interface {
            name: ifname.clone(),
        });
    }
    if !(1..=30).contains(&net.prefix_len) {
        return Err(InvalidNetwork::Prefix {
            prefix_len: net.prefix_len,
        });
    }
    let mask = u32::from(netmask(net.prefix_len));
    let network = u32::from(net.gateway) & mask;
    let broadcast = network | !mask;
    let usable = |ip: Ipv4Addr| {
        let ip = u32::from(ip);
        ip & mask == network && ip != network && ip != broadcast
    };
    if !usable(net.gateway) {
        return Err(InvalidNetwork::Gateway {
            gateway: net.gateway,
            prefix_len: net.prefix_len,
        });
    }
    let domain = &net.domain;
    if domain.len() > 253 || !domain.split('.').all(is_label) {
        return Err(InvalidNetwork::Domain {
            domain: domain.clone(),
        });
    }
    if !(68..=65535).contains(&net.mtu) {
        return Err(InvalidNetwork::Mtu { mtu: net.mtu });
    }
    if net.lease_secs < MIN_LEASE_SECS {
        return Err(InvalidNetwork::Lease {
            lease_secs: net.lease_secs,
        });
    }
    let (mut macs, mut ips, mut names) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for h in &net.hosts {
        let name = h.hostname.as_deref().unwrap_or("a nameless NIC");
        if let Some(name) = &h.hostname {
            if !is_label(name) || name.len() + 1 + domain.len() > 253 {
                return Err(InvalidNetwork::Hostname {
                    name: name.clone(),
                    mac: h.mac,
                });
            }
        }
        if !usable(h.ip) || h.ip == net.gateway {
            return Err(InvalidNetwork::HostAddress {
                ip: h.ip,
                name: name.to_string(),
                network: Ipv4Addr::from(network),
                prefix_len: net.prefix_len,
            });
        }
        if !macs.insert(h.mac) {
            return Err(InvalidNetwork::DuplicateMac { mac: h.mac });
        }
        if !ips.insert(h.ip) {
            return Err(InvalidNetwork::DuplicateAddress { ip: h.ip });
        }
        if h.hostname.is_some() && !names.insert(name.to_ascii_lowercase()) {
            return Err(InvalidNetwork::DuplicateHostname {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// A running dnsmasq: the pid and its start time (together they name one process, so a
/// reused pid is never mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Instance {
    pid: i32,
    start_time: u64,
}

/// State and start time of a process from `/proc/PID/stat`; `None` when it does not exist.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid … starttime(22) …"; comm may hold spaces and ')'.
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

fn cmdline_has(pid: i32, arg: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|raw| raw.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
}

/// `pid` if it is alive (not a zombie) and runs with `conf_arg`.
fn instance_at(pid: i32, conf_arg: &str) -> Option<Instance> {
    let (state, start_time) = proc_stat(pid)?;
    (state != 'Z' && cmdline_has(pid, conf_arg)).then_some(Instance { pid, start_time })
}

impl Instance {
    fn alive(self) -> bool {
        proc_stat(self.pid).is_some_and(|(state, start)| state != 'Z' && start == self.start_time)
    }
}

/// The instance named by the network's pid file, if it runs.
fn from_pid_file(paths: &NetworkPaths) -> Option<Instance> {
    let pid: i32 = fs::read_to_string(&paths.pid).ok()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    instance_at(pid, &paths.conf_arg())
}

/// Every live process that runs with the network's configuration file.
fn all_instances(paths: &NetworkPaths) -> Vec<Instance> {
    let arg = paths.conf_arg();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| instance_at(pid, &arg))
        .collect()
}

/// Whether `pid` lives in the network namespace `netns` (`None`: this process's).
fn in_netns(pid: i32, netns: Option<&Path>) -> bool {
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let want = id(netns.unwrap_or(Path::new("/proc/self/ns/net")));
    want.is_some() && want == id(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Waits until `inst` is gone (or a zombie), for at most `timeout`.
fn wait_gone(inst: Instance, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !inst.alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Writes `path` atomically (a temp file beside it, renamed over it), mode 0644.
fn write_atomic(path: &Path, content: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    // `mode` applies only when the file is created (and under the umask).
    f.set_permissions(fs::Permissions::from_mode(0o644))?;
    drop(f);
    fs::rename(&tmp, path)
}

/// Writes `path` when its content differs; true when it wrote.
fn write_if_changed(path: &Path, content: &str) -> io::Result<bool> {
    if fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    write_atomic(path, content)?;
    Ok(true)
}

/// What dnsmasq printed when a start failed: its stderr, else the end of its log.
fn start_failure(paths: &NetworkPaths, what: &str) -> String {
    let stderr = fs::read_to_string(&paths.start_err).unwrap_or_default();
    let mut detail = stderr.trim().to_string();
    if detail.is_empty() {
        let log = fs::read_to_string(&paths.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        detail = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
    }
    if detail.is_empty() {
        what.to_string()
    } else {
        format!("{detail} ({what})")
    }
}

/// One host's dnsmasq servers. See the module header.
#[derive(Debug)]
pub struct Dnsmasq {
    run_dir: PathBuf,
    binary: PathBuf,
    nsenter: PathBuf,
    /// Instances this adapter started or adopted and whose host lists it has sent.
    known: Mutex<BTreeMap<u32, Instance>>,
}

impl Dnsmasq {
    /// `run_dir` (e.g. `/run/keel/dnsmasq`) holds one directory per network; `binary` is
    /// dnsmasq (e.g. `/usr/sbin/dnsmasq`). A relative `run_dir` is made absolute.
    pub fn new(run_dir: PathBuf, binary: PathBuf) -> Self {
        let run_dir = std::path::absolute(&run_dir).unwrap_or(run_dir);
        Dnsmasq {
            run_dir,
            binary,
            nsenter: PathBuf::from("nsenter"),
            known: Mutex::new(BTreeMap::new()),
        }
    }

    /// The files of network `vni`.
    pub fn paths(&self, vni: u32) -> NetworkPaths {
        NetworkPaths::new(&self.run_dir, vni)
    }

    /// The pid of network `vni`'s running dnsmasq.
    pub fn pid(&self, vni: u32) -> Option<i32> {
        from_pid_file(&self.paths(vni)).map(|i| i.pid)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Instance>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `run_dir` and the network's directory, both 0755, after checking that every
    /// directory above is searchable by others.
    fn prepare_dir(&self, vni: u32, paths: &NetworkPaths) -> Result<(), DhcpError> {
        let files = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| DhcpError::Files { vni, dir, source }
        };
        for dir in self.run_dir.ancestors().skip(1) {
            let meta = fs::metadata(dir).map_err(files(dir))?;
            if meta.mode() & 0o001 == 0 {
                return Err(DhcpError::RunDir {
                    vni,
                    dir: dir.to_path_buf(),
                });
            }
        }
        for dir in [&self.run_dir, &paths.dir] {
            fs::create_dir_all(dir).map_err(files(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(files(dir))?;
        }
        Ok(())
    }

    /// SIGTERM, a bounded wait, SIGKILL, another bounded wait.
    fn terminate(&self, vni: u32, inst: Instance) -> Result<(), DhcpError> {
        for (signal, last) in [(Signal::SIGTERM, false), (Signal::SIGKILL, true)] {
            if !inst.alive() {
                return Ok(());
            }
            match kill(Pid::from_raw(inst.pid), signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => {
                    return Err(DhcpError::Signal {
                        vni,
                        pid: inst.pid,
                        source,
                    })
                }
            }
            if wait_gone(inst, STOP_TIMEOUT) {
                return Ok(());
            }
            if !last {
                tracing::warn!(vni, pid = inst.pid, "dnsmasq ignored SIGTERM; killing it");
            }
        }
        Err(DhcpError::NotStopped { vni, pid: inst.pid })
    }

    /// Stops every process running the network's configuration (the one in the pid file
    /// and any stray one).
    fn terminate_all(&self, vni: u32, paths: &NetworkPaths) -> Result<(), DhcpError> {
        let mut found = all_instances(paths);
        found.extend(from_pid_file(paths));
        found.sort_by_key(|i| i.pid);
        found.dedup();
        for inst in found {
            self.terminate(vni, inst)?;
        }
        Ok(())
    }

    fn start(
        &self,
        net: &DhcpNetwork,
        paths: &NetworkPaths,
        files: &Rendered,
    ) -> Result<Instance, DhcpError> {
        let vni = net.vni;
        self.terminate_all(vni, paths)?;
        let write = |path: &Path, content: &str| {
            write_atomic(path, content).map_err(|source| DhcpError::Files {
                vni,
                dir: paths.dir.clone(),
                source,
            })
        };
        write(&paths.dhcp_hosts, &files.dhcp_hosts)?;
        write(&paths.dns_hosts, &files.dns_hosts)?;
        write(&paths.conf, &files.conf)?;
        match fs::remove_file(&paths.pid) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DhcpError::Files {
                    vni,
                    dir: paths.dir.clone(),
                    source,
                })
            }
        }
        let stderr = File::create(&paths.start_err).map_err(|source| DhcpError::Files {
            vni,
            dir: paths.dir.clone(),
            source,
        })?;
        let mut cmd = match &net.netns {
            Some(ns) => {
                let mut c = Command::new(&self.nsenter);
                c.arg(format!("--net={}", ns.display())).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        cmd.arg(paths.conf_arg())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .map_err(|source| DhcpError::Spawn { vni, source })?;
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < START_TIMEOUT => std::thread::sleep(POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // A daemon may already have forked off.
                    let _ = self.terminate_all(vni, paths);
                    return Err(DhcpError::Exited {
                        vni,
                        detail: start_failure(
                            paths,
                            &format!("did not finish starting within {START_TIMEOUT:?}"),
                        ),
                    });
                }
                Err(source) => return Err(DhcpError::Spawn { vni, source }),
            }
        };
        if !status.success() {
            return Err(DhcpError::Exited {
                vni,
                detail: start_failure(paths, &status.to_string()),
            });
        }
        let Some(inst) = from_pid_file(paths) else {
            return Err(DhcpError::Exited {
                vni,
                detail: start_failure(paths, "started, but no process runs under its pid file"),
            });
        };
        tracing::info!(vni, pid = inst.pid, "dnsmasq started");
        Ok(inst)
    }

    /// Moves a log beyond [`LOG_LIMIT`] aside. dnsmasq appends (`O_APPEND`), so truncating
    /// the file it holds open is safe; lines written in between may be lost.
    fn rotate_log(paths: &NetworkPaths) {
        let Ok(meta) = fs::metadata(&paths.log) else {
            return;
        };
        if meta.len() <= LOG_LIMIT {
            return;
        }
        let mut old = paths.log.as_os_str().to_owned();
        old.push(".old");
        let result = fs::copy(&paths.log, PathBuf::from(old))
            .and_then(|_| OpenOptions::new().write(true).open(&paths.log)?.set_len(0));
        if let Err(e) = result {
            tracing::warn!(log = %paths.log.display(), error = %e, "cannot rotate a dnsmasq log");
        }
    }
}

impl Dhcp for Dnsmasq {
    fn ensure(&self, net: &DhcpNetwork) -> Result<(), DhcpError> {
        let vni = net.vni;
        let paths = self.paths(vni);
        let files = render(net, &paths).map_err(|source| DhcpError::Invalid { vni, source })?;
        let mut known = self.lock();
        self.prepare_dir(vni, &paths)?;
        if let Some(inst) = from_pid_file(&paths) {
            let same = fs::read_to_string(&paths.conf).is_ok_and(|c| c == files.conf)
                && in_netns(inst.pid, net.netns.as_deref());
            if same {
                let write = |path: &Path, content: &str| {
                    write_if_changed(path, content).map_err(|source| DhcpError::Files {
                        vni,
                        dir: paths.dir.clone(),
                        source,
                    })
                };
                let changed = write(&paths.dhcp_hosts, &files.dhcp_hosts)?
                    | write(&paths.dns_hosts, &files.dns_hosts)?;
                let adopted = known.get(&vni) != Some(&inst);
                if !changed && !adopted {
                    Self::rotate_log(&paths);
                    return Ok(());
                }
                match kill(Pid::from_raw(inst.pid), Signal::SIGHUP) {
                    Ok(()) => {
                        if adopted {
                            tracing::info!(vni, pid = inst.pid, "adopted a running dnsmasq");
                        } else {
                            tracing::info!(vni, pid = inst.pid, "dnsmasq host lists reloaded");
                        }
                        known.insert(vni, inst);
                        Self::rotate_log(&paths);
                        return Ok(());
                    }
                    // It died just now: start a new one below.
                    Err(Errno::ESRCH) => {}
                    Err(source) => {
                        return Err(DhcpError::Signal {
                            vni,
                            pid: inst.pid,
                            source,
                        })
                    }
                }
            } else {
                tracing::info!(
                    vni,
                    pid = inst.pid,
                    "dnsmasq configuration changed; restarting"
                );
            }
        } else if known.contains_key(&vni) {
            tracing::warn!(vni, "dnsmasq is no longer running; starting it again");
        }
        known.remove(&vni);
        let inst = self.start(net, &paths, &files)?;
        known.insert(vni, inst);
        Ok(())
    }

    fn stop(&self, vni: u32) -> Result<(), DhcpError> {
        let paths = self.paths(vni);
        let mut known = self.lock();
        self.terminate_all(vni, &paths)?;
        known.remove(&vni);
        match fs::remove_dir_all(&paths.dir) {
            Ok(()) => {
                tracing::info!(vni, "dnsmasq stopped");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DhcpError::Files {
                vni,
                dir: paths.dir,
                source,
            }),
        }
    }

    fn running(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.run_dir) else {
            return Vec::new();
        };
        let mut out: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix('n')?.parse().ok())
            .filter(|&vni| from_pid_file(&self.paths(vni)).is_some())
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::MacAddr;

    fn host(last: u8, ip: [u8; 4], name: &str) -> DhcpHost {
        DhcpHost {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, last]),
            ip: Ipv4Addr::from(ip),
            hostname: Some(name.into()),
        }
    }

    fn net() -> DhcpNetwork {
        DhcpNetwork {
            vni: 4242,
            netns: Some(PathBuf::from("/run/netns/kr4242")),
            interface: "kgn4242".into(),
            gateway: Ipv4Addr::new(10, 1, 2, 1),
            prefix_len: 24,
            domain: "tenant.example".into(),
            mtu: 1450,
            hosts: vec![
                host(2, [10, 1, 2, 11], "web"),
                host(1, [10, 1, 2, 10], "db"),
            ],
            lease_secs: 3600,
        }
    }

    fn paths() -> NetworkPaths {
        NetworkPaths::new(Path::new("/run/keel/dnsmasq"), 4242)
    }

    #[test]
    fn config_serves_one_interface_with_static_leases_and_local_names_only() {
        let r = render(&net(), &paths()).unwrap();
        let lines: Vec<&str> = r.conf.lines().collect();
        for want in [
            "# netns /run/netns/kr4242",
            "interface=kgn4242",
            "bind-interfaces",
            "except-interface=lo",
            "user=nobody",
            "group=nogroup",
            "pid-file=/run/keel/dnsmasq/n4242/dnsmasq.pid",
            "log-facility=/run/keel/dnsmasq/n4242/dnsmasq.log",
            "port=53",
            "no-resolv",
            "no-hosts",
            "local=/tenant.example/",
            "local=/#/",
            "domain=tenant.example",
            "expand-hosts",
            "addn-hosts=/run/keel/dnsmasq/n4242/hosts.dns",
            "dhcp-range=10.1.2.0,static,255.255.255.0,3600",
            "dhcp-hostsfile=/run/keel/dnsmasq/n4242/hosts.dhcp",
            "dhcp-leasefile=/run/keel/dnsmasq/n4242/dnsmasq.leases",
            "dhcp-authoritative",
            "dhcp-ignore-names",
            "no-ping",
            "dhcp-option=option:router,10.1.2.1",
            "dhcp-option=option:dns-server,10.1.2.1",
            "dhcp-option=option:domain-name,tenant.example",
            "dhcp-option=option:mtu,1450",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{}", r.conf);
        }
        // Nothing that could reach beyond the network.
        for bad in ["server=", "resolv-file=", "conf-dir=", "dhcp-script="] {
            assert!(!r.conf.contains(bad), "{bad} in\n{}", r.conf);
        }
        // Host lists are not in the configuration (they change by SIGHUP alone).
        assert!(!r.conf.contains("10.1.2.10"), "{}", r.conf);
    }

    #[test]
    fn host_lists_are_sorted_by_mac() {
        let r = render(&net(), &paths()).unwrap();
        assert_eq!(
            r.dhcp_hosts,
            "52:54:00:00:00:01,10.1.2.10,db\n52:54:00:00:00:02,10.1.2.11,web\n"
        );
        assert_eq!(
            r.dns_hosts,
            "10.1.2.10 db db.tenant.example\n10.1.2.11 web web.tenant.example\n"
        );
    }

    #[test]
    fn same_network_renders_the_same_and_host_changes_leave_the_config_alone() {
        let a = render(&net(), &paths()).unwrap();
        let mut n = net();
        n.hosts.reverse();
        assert_eq!(render(&n, &paths()).unwrap(), a);
        n.hosts.push(host(3, [10, 1, 2, 12], "cache"));
        let b = render(&n, &paths()).unwrap();
        assert_eq!(b.conf, a.conf);
        assert_ne!(b.dhcp_hosts, a.dhcp_hosts);
        let mut n = net();
        n.netns = None;
        let c = render(&n, &paths()).unwrap();
        assert!(c.conf.contains("# netns -\n"), "{}", c.conf);
        assert_ne!(c.conf, a.conf);
    }

    #[test]
    fn other_prefixes_give_the_right_network_and_mask() {
        let mut n = net();
        n.gateway = Ipv4Addr::new(172, 16, 5, 1);
        n.prefix_len = 22;
        n.hosts = vec![host(1, [172, 16, 6, 7], "a")];
        let r = render(&n, &paths()).unwrap();
        assert!(
            r.conf
                .contains("dhcp-range=172.16.4.0,static,255.255.252.0,3600\n"),
            "{}",
            r.conf
        );
    }

    #[test]
    fn values_that_could_inject_config_are_refused() {
        type Change = Box<dyn Fn(&mut DhcpNetwork)>;
        let bad: Vec<(&str, Change)> = vec![
            (
                "newline in hostname",
                Box::new(|n| n.hosts[0].hostname = Some("a\nserver=8.8.8.8".into())),
            ),
            (
                "dot in hostname",
                Box::new(|n| n.hosts[0].hostname = Some("a.b".into())),
            ),
            (
                "comma in hostname",
                Box::new(|n| n.hosts[0].hostname = Some("a,b".into())),
            ),
            (
                "space in hostname",
                Box::new(|n| n.hosts[0].hostname = Some("a b".into())),
            ),
            (
                "empty hostname",
                Box::new(|n| n.hosts[0].hostname = Some(String::new())),
            ),
            (
                "leading hyphen",
                Box::new(|n| n.hosts[0].hostname = Some("-a".into())),
            ),
            (
                "long label",
                Box::new(|n| n.hosts[0].hostname = Some("a".repeat(64))),
            ),
            (
                "newline in domain",
                Box::new(|n| n.domain = "x\nserver=1.1.1.1".into()),
            ),
            ("slash in domain", Box::new(|n| n.domain = "a/b".into())),
            (
                "empty label in domain",
                Box::new(|n| n.domain = "a..b".into()),
            ),
            ("trailing dot", Box::new(|n| n.domain = "a.b.".into())),
            ("empty domain", Box::new(|n| n.domain = String::new())),
            (
                "interface",
                Box::new(|n| n.interface = "kgn1\nport=0".into()),
            ),
            ("long interface", Box::new(|n| n.interface = "a".repeat(16))),
            (
                "netns",
                Box::new(|n| n.netns = Some("/run/netns/a\nport=0".into())),
            ),
            (
                "relative netns",
                Box::new(|n| n.netns = Some("netns/a".into())),
            ),
            (
                "ip outside",
                Box::new(|n| n.hosts[0].ip = Ipv4Addr::new(10, 1, 3, 5)),
            ),
            (
                "ip is gateway",
                Box::new(|n| n.hosts[0].ip = Ipv4Addr::new(10, 1, 2, 1)),
            ),
            (
                "ip is broadcast",
                Box::new(|n| n.hosts[0].ip = Ipv4Addr::new(10, 1, 2, 255)),
            ),
            (
                "ip is network",
                Box::new(|n| n.hosts[0].ip = Ipv4Addr::new(10, 1, 2, 0)),
            ),
            ("duplicate ip", Box::new(|n| n.hosts[0].ip = n.hosts[1].ip)),
            (
                "duplicate mac",
                Box::new(|n| n.hosts[0].mac = n.hosts[1].mac),
            ),
            (
                "duplicate name",
                Box::new(|n| n.hosts[1].hostname = Some("WEB".into())),
            ),
            (
                "gateway is network",
                Box::new(|n| n.gateway = Ipv4Addr::new(10, 1, 2, 0)),
            ),
            ("prefix /31", Box::new(|n| n.prefix_len = 31)),
            ("prefix /0", Box::new(|n| n.prefix_len = 0)),
            ("mtu", Box::new(|n| n.mtu = 20)),
            ("lease", Box::new(|n| n.lease_secs = 60)),
        ];
        for (what, change) in bad {
            let mut n = net();
            change(&mut n);
            assert!(render(&n, &paths()).is_err(), "{what} was accepted");
        }
        let p = NetworkPaths::new(Path::new("/run/my dir"), 1);
        assert!(render(&net(), &p).is_err(), "a space in the run dir");
    }

    #[test]
    fn a_nic_without_a_name_gets_a_lease_and_no_dns_entry() {
        let mut n = net();
        n.hosts[1].hostname = None;
        let mut third = n.hosts[0].clone();
        third.mac = MacAddr([0x52, 0x54, 0, 0, 0, 0x77]);
        third.ip = Ipv4Addr::new(10, 1, 2, 99);
        third.hostname = None;
        n.hosts.push(third);
        let r = render(&n, &paths()).unwrap();
        let (nameless, ip) = (n.hosts[1].clone(), n.hosts[1].ip);
        assert!(
            r.dhcp_hosts
                .lines()
                .any(|l| l == format!("{},{ip}", nameless.mac)),
            "{}",
            r.dhcp_hosts
        );
        assert!(r.dhcp_hosts.contains("52:54:00:00:00:77,10.1.2.99\n"));
        assert!(!r.dns_hosts.contains(&ip.to_string()), "{}", r.dns_hosts);
        assert_eq!(r.dns_hosts.lines().count(), n.hosts.len() - 2);
    }

    #[test]
    fn upper_case_and_digits_are_fine() {
        let mut n = net();
        n.domain = "Corp-1.example".into();
        n.hosts[0].hostname = Some("Web-01".into());
        assert!(render(&n, &paths()).is_ok());
    }

    #[test]
    fn relative_run_dir_is_made_absolute() {
        let d = Dnsmasq::new(PathBuf::from("rel/run"), PathBuf::from("/usr/sbin/dnsmasq"));
        assert!(d.paths(7).conf.is_absolute());
        assert!(d.paths(7).conf.ends_with("rel/run/n7/dnsmasq.conf"));
    }

    #[test]
    fn nothing_runs_in_an_empty_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dnsmasq::new(dir.path().to_path_buf(), PathBuf::from("/nonexistent"));
        fs::create_dir_all(dir.path().join("n5")).unwrap();
        // A pid file naming a live process that is not dnsmasq for this network.
        fs::write(
            dir.path().join("n5/dnsmasq.pid"),
            std::process::id().to_string(),
        )
        .unwrap();
        assert_eq!(d.running(), Vec::<u32>::new());
        assert_eq!(d.pid(5), None);
        d.stop(5).unwrap();
        assert!(!dir.path().join("n5").exists());
        d.stop(5).unwrap();
    }

    #[test]
    fn a_large_log_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let paths = NetworkPaths::new(dir.path(), 1);
        fs::create_dir_all(&paths.dir).unwrap();
        fs::write(&paths.log, "small\n").unwrap();
        Dnsmasq::rotate_log(&paths);
        assert_eq!(fs::read_to_string(&paths.log).unwrap(), "small\n");
        let big = vec![b'x'; LOG_LIMIT as usize + 1];
        fs::write(&paths.log, &big).unwrap();
        Dnsmasq::rotate_log(&paths);
        assert_eq!(fs::metadata(&paths.log).unwrap().len(), 0);
        assert_eq!(fs::read(paths.dir.join("dnsmasq.log.old")).unwrap(), big);
    }

    #[test]
    fn a_run_dir_below_a_private_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let d = Dnsmasq::new(dir.path().join("run"), PathBuf::from("/nonexistent"));
        let mut n = net();
        n.netns = None;
        let err = d.ensure(&n).unwrap_err();
        assert!(
            matches!(&err, DhcpError::RunDir { vni: 4242, dir: d } if d == dir.path()),
            "{err}"
        );
    }

    #[test]
    fn an_invalid_network_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dnsmasq::new(dir.path().join("run"), PathBuf::from("/nonexistent"));
        let mut n = net();
        n.domain = "bad domain".into();
        let err = d.ensure(&n).unwrap_err();
        assert!(matches!(err, DhcpError::Invalid { vni: 4242, .. }), "{err}");
        assert!(!dir.path().join("run").exists());
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dnsmasq::new(
            dir.path().to_path_buf(),
            PathBuf::from("/nonexistent/dnsmasq"),
        );
        let mut n = net();
        n.netns = None;
        let err = d.ensure(&n).unwrap_err();
        assert!(matches!(err, DhcpError::Spawn { vni: 4242, .. }), "{err}");
    }
}
