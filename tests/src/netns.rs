//! A per-test virtual network of namespace "hosts" joined by one bridge.
//!
//! ```text
//!  root namespace: the test process, bridge kb<run> = 10.213.S.254/24
//!      │                        │                        │
//!  kv<run>-1 (veth)         kv<run>-2                kv<run>-3        <- bridge ports
//!      │                        │                        │
//!  eth0 10.213.S.1          eth0 10.213.S.2          eth0 10.213.S.3
//!  netns kn<run>-1          netns kn<run>-2          netns kn<run>-3  (lo up in each)
//! ```
//!
//! * `<run>` is 6 random hex digits, unique per [`TestNet`]; `S` (1..=250) is chosen so that
//!   no address or route of this machine and no other live `TestNet` (of any process) uses
//!   10.213.S.0/24. Host index `i` is 0-based: namespace `kn<run>-<i+1>`, address
//!   `10.213.S.<i+1>`.
//! * Faults are bridge-level filters in one nftables table `bridge keeltest_<run>` in the
//!   root namespace, rebuilt atomically on every change:
//!   [`TestNet::partition`] puts a group of hosts on an island (members still reach each
//!   other; nothing crosses the island's edge, the test process included — its traffic
//!   passes the bridge's input/output hooks), [`TestNet::block`] drops one direction
//!   between two hosts, [`TestNet::heal`] removes every filter and flushes ARP caches so
//!   traffic resumes at once. Dropped packets vanish silently, like a cut cable.
//! * [`TestNet::delay`] uses `tc qdisc netem`, which this lab's kernel lacks
//!   (`CONFIG_NET_SCH_NETEM` unset): it then returns [`NetError::NetemUnavailable`].
//!   [`TestNet::throttle`] (token bucket, `sch_tbf`) works here.
//! * Ownership: before creating anything a `TestNet` writes a marker
//!   `/run/keel-tests/net-<S>.json` (pid, process start time, run id); the marker is also
//!   the lock on subnet S. `Drop` (which also runs while a test panics) kills whatever still
//!   runs in the namespaces and removes veths, namespaces, bridge, nft table and marker.
//!   [`TestNet::cleanup_stale`] (called by every [`TestNet::new`]) removes the leftovers of
//!   runs whose process is gone (killed with SIGKILL, machine crash of the test runner).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cmd::{self, CmdError};
use crate::process::{proc_stat, process_alive};

/// The first two octets of every test subnet.
pub const NET_PREFIX: [u8; 2] = [10, 213];
/// The host part of the bridge (test process) address.
pub const GATEWAY_HOST: u8 = 254;
/// Largest number of hosts one [`TestNet`] can have.
pub const MAX_HOSTS: usize = 200;

/// Errors of the virtual network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error(
        "tc qdisc netem is not available on this kernel (CONFIG_NET_SCH_NETEM is not set): {0}"
    )]
    NetemUnavailable(String),
    #[error("no free subnet 10.213.x.0/24 (all 250 are in use or locked under {0})")]
    NoFreeSubnet(PathBuf),
    #[error("host index {index} is out of range: this network has {hosts} hosts")]
    NoSuchHost { index: usize, hosts: usize },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Io { context, source }
}

/// Who opens a connection: the test process (root namespace) or a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The test process, on the bridge address 10.213.S.254.
    Test,
    /// Host `i` (0-based), inside its namespace.
    Host(usize),
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    run: String,
    pid: u32,
    start_time: u64,
    subnet: u8,
    hosts: usize,
}

#[derive(Debug, Default, Clone)]
struct Filters {
    /// Disjoint islands of hosts.
    groups: Vec<Vec<usize>>,
    /// One-way drops (from, to).
    blocks: Vec<(usize, usize)>,
}

impl Filters {
    fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.blocks.is_empty()
    }
}

/// One test's virtual network. See the module header for the topology.
#[derive(Debug)]
pub struct TestNet {
    run: String,
    subnet: u8,
    hosts: usize,
    marker: PathBuf,
    filters: Mutex<Filters>,
    torn_down: bool,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn bridge_name(run: &str) -> String {
    format!("kb{run}")
}
fn ns_name(run: &str, i: usize) -> String {
    format!("kn{run}-{}", i + 1)
}
fn veth_name(run: &str, i: usize) -> String {
    format!("kv{run}-{}", i + 1)
}
fn nft_table(run: &str) -> String {
    format!("keeltest_{run}")
}

/// Where ownership markers live: `/run/keel-tests` (tmpfs: gone after a reboot, like the
/// namespaces), or the temp dir when there is no `/run`.
pub fn marker_dir() -> PathBuf {
    if Path::new("/run").is_dir() {
        PathBuf::from("/run/keel-tests")
    } else {
        std::env::temp_dir().join("keel-tests")
    }
}

impl TestNet {
    /// Creates a network of `hosts` namespaces. Removes stale leftovers of dead runs first.
    pub fn new(hosts: usize) -> Result<Self, NetError> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(NetError::Invalid(format!(
                "a TestNet has 1..={MAX_HOSTS} hosts, not {hosts}"
            )));
        }
        let dir = marker_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        if let Err(e) = Self::cleanup_stale() {
            eprintln!("keel-tests: cleaning up stale test networks failed: {e}");
        }
        let run = format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff);
        let (subnet, marker) = claim_subnet(&dir, &run, hosts)?;
        let mut net = TestNet {
            run,
            subnet,
            hosts,
            marker,
            filters: Mutex::new(Filters::default()),
            torn_down: false,
        };
        // On error `net` is dropped here, which removes whatever was created.
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), NetError> {
        let br = bridge_name(&self.run);
        let mut batch = String::new();
        let gw = self.gateway();
        writeln!(batch, "link add {br} type bridge").unwrap();
        writeln!(batch, "addr add {gw}/24 dev {br}").unwrap();
        writeln!(batch, "link set {br} up").unwrap();
        for i in 0..self.hosts {
            let (ns, veth) = (self.ns(i), self.veth(i));
            writeln!(batch, "netns add {ns}").unwrap();
            writeln!(batch, "link add {veth} type veth peer name eth0 netns {ns}").unwrap();
            writeln!(batch, "link set {veth} master {br} up").unwrap();
        }
        cmd::run_with_input("ip", &["-batch", "-"], Some(&batch))?;
        for i in 0..self.hosts {
            let script = format!(
                "addr add {}/24 dev eth0\nlink set eth0 up\nlink set lo up\n",
                self.ip(i)
            );
            cmd::run_with_input("ip", &["-n", &self.ns(i), "-batch", "-"], Some(&script))?;
        }
        Ok(())
    }

    /// The run id (6 hex digits) in every name of this network.
    pub fn run_id(&self) -> &str {
        &self.run
    }
    /// The third octet S of 10.213.S.0/24.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }
    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts
    }
    /// Always false: a network has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts == 0
    }
    /// The bridge in the root namespace.
    pub fn bridge(&self) -> String {
        bridge_name(&self.run)
    }
    /// The nftables table (family `bridge`) that carries partitions and blocks.
    pub fn nft_table(&self) -> String {
        nft_table(&self.run)
    }
    /// Namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        ns_name(&self.run, i)
    }
    /// Root-side veth (bridge port) of host `i`.
    pub fn veth(&self, i: usize) -> String {
        veth_name(&self.run, i)
    }
    /// Address of host `i` (on its `eth0`).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        assert!(
            i < self.hosts,
            "host index {i} out of range (0..{})",
            self.hosts
        );
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.subnet, i as u8 + 1)
    }
    /// The bridge address: where hosts reach the test process.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.subnet, GATEWAY_HOST)
    }
    /// The ownership marker file of this network.
    pub fn marker_path(&self) -> &Path {
        &self.marker
    }

    fn check(&self, i: usize) -> Result<(), NetError> {
        if i < self.hosts {
            Ok(())
        } else {
            Err(NetError::NoSuchHost {
                index: i,
                hosts: self.hosts,
            })
        }
    }

    /// A `std::process::Command` that runs `program` inside host `i`'s namespace
    /// (`ip netns exec NS program`; `ip` execs, so the child's pid is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Runs `program args…` in host `i` and returns its stdout; non-zero exit is an error.
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> Result<String, NetError> {
        self.check(i)?;
        let ns = self.ns(i);
        let mut full = vec!["netns", "exec", &ns, program];
        full.extend_from_slice(args);
        Ok(cmd::run("ip", &full)?)
    }

    /// Runs `f` on a fresh thread that has entered host `i`'s network namespace; sockets
    /// it creates belong to that host (and keep doing so when handed back).
    pub fn in_host<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        self.check(i)?;
        let path = PathBuf::from("/run/netns").join(self.ns(i));
        let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io_err("setns into a test host")(io::Error::from(e)))?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Opens a TCP connection from `from` to `to` within `timeout`.
    pub fn connect(
        &self,
        from: Endpoint,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        match from {
            Endpoint::Test => TcpStream::connect_timeout(&to, timeout),
            Endpoint::Host(i) => self
                .in_host(i, || TcpStream::connect_timeout(&to, timeout))
                .map_err(|e| io::Error::other(e.to_string()))?,
        }
    }

    /// Whether a TCP connection from `from` to `to` is accepted within `timeout`.
    pub fn can_connect(&self, from: Endpoint, to: SocketAddr, timeout: Duration) -> bool {
        self.connect(from, to, timeout).is_ok()
    }

    /// Isolates `group` from every other host and from the test process; members still
    /// reach each other. Hosts already on another island move to this one; earlier islands
    /// stay. Undo with [`TestNet::heal`].
    pub fn partition(&self, group: &[usize]) -> Result<(), NetError> {
        for &i in group {
            self.check(i)?;
        }
        let group: BTreeSet<usize> = group.iter().copied().collect();
        if group.is_empty() {
            return Err(NetError::Invalid("partition of an empty group".into()));
        }
        let mut f = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = f.clone();
        for g in &mut next.groups {
            g.retain(|h| !group.contains(h));
        }
        next.groups.retain(|g| !g.is_empty());
        next.groups.push(group.into_iter().collect());
        self.apply(&next)?;
        *f = next;
        Ok(())
    }

    /// Drops every IP packet from host `from` to host `to` (one direction only: TCP between
    /// them then fails both ways, since it needs answers; UDP still flows `to` → `from`).
    /// ARP passes.
    pub fn block(&self, from: usize, to: usize) -> Result<(), NetError> {
        self.check(from)?;
        self.check(to)?;
        let mut f = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = f.clone();
        if !next.blocks.contains(&(from, to)) {
            next.blocks.push((from, to));
        }
        self.apply(&next)?;
        *f = next;
        Ok(())
    }

    /// Removes every partition and block and flushes ARP caches, so traffic resumes at once.
    pub fn heal(&self) -> Result<(), NetError> {
        let mut f = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        self.apply(&Filters::default())?;
        *f = Filters::default();
        drop(f);
        // Failed ARP entries would otherwise hold traffic back for up to a few seconds.
        let _ = cmd::run("ip", &["neigh", "flush", "dev", &self.bridge()]);
        for i in 0..self.hosts {
            let _ = cmd::run("ip", &["-n", &self.ns(i), "neigh", "flush", "dev", "eth0"]);
        }
        Ok(())
    }

    /// The nft script that replaces this network's table with one implementing `f`.
    fn ruleset(&self, f: &Filters) -> String {
        let table = self.nft_table();
        // Declaring the table first makes the delete succeed even when it does not exist.
        let mut s = format!("table bridge {table} {{}}\ndelete table bridge {table}\n");
        if f.is_empty() {
            return s;
        }
        writeln!(s, "table bridge {table} {{").unwrap();
        for (k, g) in f.groups.iter().enumerate() {
            let elems: Vec<String> = g.iter().map(|&i| format!("\"{}\"", self.veth(i))).collect();
            writeln!(
                s,
                "  set island{k} {{ type ifname; elements = {{ {} }}; }}",
                elems.join(", ")
            )
            .unwrap();
        }
        writeln!(
            s,
            "  chain c_forward {{\n    type filter hook forward priority -10; policy accept;"
        )
        .unwrap();
        for k in 0..f.groups.len() {
            writeln!(s, "    iifname @island{k} oifname != @island{k} drop").unwrap();
            writeln!(s, "    iifname != @island{k} oifname @island{k} drop").unwrap();
        }
        for &(a, b) in &f.blocks {
            // IP only: ARP must pass, or the reverse direction would lose its neighbour
            // entries and the block would turn into a two-way cut.
            writeln!(
                s,
                "    iifname \"{}\" oifname \"{}\" ether type {{ ip, ip6 }} drop",
                self.veth(a),
                self.veth(b)
            )
            .unwrap();
        }
        writeln!(s, "  }}").unwrap();
        // Traffic between a host and the test process crosses the bridge's input/output hooks.
        writeln!(
            s,
            "  chain c_input {{\n    type filter hook input priority -10; policy accept;"
        )
        .unwrap();
        for k in 0..f.groups.len() {
            writeln!(s, "    iifname @island{k} drop").unwrap();
        }
        writeln!(s, "  }}").unwrap();
        writeln!(
            s,
            "  chain c_output {{\n    type filter hook output priority -10; policy accept;"
        )
        .unwrap();
        for k in 0..f.groups.len() {
            writeln!(s, "    oifname @island{k} drop").unwrap();
        }
        writeln!(s, "  }}\n}}").unwrap();
        s
    }

    fn apply(&self, f: &Filters) -> Result<(), NetError> {
        cmd::run_with_input("nft", &["-f", "-"], Some(&self.ruleset(f)))?;
        Ok(())
    }

    /// Delays every packet host `i` sends by `ms` milliseconds (`0` removes the delay).
    /// Needs `sch_netem`; without it returns [`NetError::NetemUnavailable`].
    pub fn delay(&self, i: usize, ms: u32) -> Result<(), NetError> {
        self.check(i)?;
        if ms == 0 {
            return self.clear_qdisc(i);
        }
        let delay = format!("{ms}ms");
        match self.exec(
            i,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", &delay,
            ],
        ) {
            Err(NetError::Command(e)) if e.stderr.contains("qdisc kind is unknown") => {
                Err(NetError::NetemUnavailable(e.stderr))
            }
            r => r.map(drop),
        }
    }

    /// Whether [`TestNet::delay`] can work here (probes `netem` on host 0's loopback).
    pub fn netem_supported(&self) -> bool {
        let ok = self
            .exec(
                0,
                "tc",
                &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            )
            .is_ok();
        if ok {
            let _ = self.exec(0, "tc", &["qdisc", "del", "dev", "lo", "root"]);
        }
        ok
    }

    /// Limits what host `i` sends to `kbit` kilobits per second (token bucket, `sch_tbf`).
    pub fn throttle(&self, i: usize, kbit: u32) -> Result<(), NetError> {
        self.check(i)?;
        let rate = format!("{kbit}kbit");
        self.exec(
            i,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "32kbit",
                "latency", "400ms",
            ],
        )
        .map(drop)
    }

    /// Removes delay and throttling from host `i`.
    pub fn clear_qdisc(&self, i: usize) -> Result<(), NetError> {
        self.check(i)?;
        match self.exec(i, "tc", &["qdisc", "del", "dev", "eth0", "root"]) {
            // Nothing was installed.
            Err(NetError::Command(e))
                if e.stderr.contains("No such file")
                    || e.stderr.contains("Cannot delete qdisc with handle of zero") =>
            {
                Ok(())
            }
            r => r.map(drop),
        }
    }

    /// Pids of every process running inside host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Result<Vec<u32>, NetError> {
        self.check(i)?;
        Ok(ns_pids(&self.ns(i)))
    }

    /// Removes everything now (also done by `Drop`). Returns what could not be removed.
    pub fn cleanup(&mut self) -> Result<(), NetError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let leftovers = teardown_run(&self.run);
        let _ = std::fs::remove_file(&self.marker);
        if leftovers.is_empty() {
            Ok(())
        } else {
            Err(NetError::Invalid(format!(
                "test network {} left behind: {}",
                self.run,
                leftovers.join(", ")
            )))
        }
    }

    /// Removes the namespaces, links, nft tables and markers of test networks whose owning
    /// process is gone. Returns the run ids it cleaned.
    pub fn cleanup_stale() -> Result<Vec<String>, NetError> {
        // Order matters against a concurrent `new` in another process: list resources
        // first, markers second. A live run writes its marker before creating anything, so
        // every resource listed here has its marker visible below.
        let resources = Resources::list()?;
        let dir = marker_dir();
        let mut live = BTreeSet::new();
        let mut stale = BTreeSet::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(format!("read {}", dir.display()))(e)),
        };
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("net-") && name.ends_with(".json")) {
                continue;
            }
            match read_marker(&path) {
                Some(m) if owner_alive(&m) => {
                    live.insert(m.run);
                }
                Some(m) => {
                    stale.insert(m.run);
                    let _ = std::fs::remove_file(&path);
                }
                // Claimed by hard link from a complete file, so an unreadable marker is
                // damaged, never half-written.
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        stale.extend(resources.runs().into_iter().filter(|r| !live.contains(r)));
        let mut cleaned = Vec::new();
        for run in stale {
            let left = teardown_run(&run);
            if !left.is_empty() {
                eprintln!(
                    "keel-tests: stale test network {run} left behind: {}",
                    left.join(", ")
                );
            }
            cleaned.push(run);
        }
        Ok(cleaned)
    }

    /// Test support: forgets this network without cleaning it up and rewrites its marker
    /// as if its owner had died, so `cleanup_stale` has something real to remove.
    #[doc(hidden)]
    pub fn leak_as_dead_for_test(mut self) -> String {
        let m = Marker {
            run: self.run.clone(),
            // Pid 0 is never a test process: the owner counts as dead.
            pid: 0,
            start_time: 0,
            subnet: self.subnet,
            hosts: self.hosts,
        };
        std::fs::write(&self.marker, serde_json::to_vec(&m).unwrap()).unwrap();
        self.torn_down = true;
        self.run.clone()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("keel-tests: {e}");
        }
    }
}

fn read_marker(path: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn owner_alive(m: &Marker) -> bool {
    m.pid != 0
        && process_alive(m.pid)
        && proc_stat(m.pid).map(|s| s.start_time) == Some(m.start_time)
}

/// Picks a free S and claims it with a marker, atomically across processes.
fn claim_subnet(dir: &Path, run: &str, hosts: usize) -> Result<(u8, PathBuf), NetError> {
    let pid = std::process::id();
    let me =
        proc_stat(pid).ok_or_else(|| NetError::Invalid("cannot read /proc/self/stat".into()))?;
    let used = used_subnets()?;
    let first = (pid as usize)
        .wrapping_mul(7919)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) as usize * 37);
    for k in 0..250usize {
        let s = ((first + k) % 250 + 1) as u8;
        if used.contains(&s) {
            continue;
        }
        let marker = dir.join(format!("net-{s}.json"));
        let tmp = dir.join(format!(".{run}.tmp"));
        let m = Marker {
            run: run.into(),
            pid,
            start_time: me.start_time,
            subnet: s,
            hosts,
        };
        std::fs::write(&tmp, serde_json::to_vec(&m).unwrap())
            .map_err(io_err(format!("write {}", tmp.display())))?;
        // A hard link fails if the target exists: the claim is atomic and the file is
        // complete the moment it appears.
        let claimed = std::fs::hard_link(&tmp, &marker);
        let _ = std::fs::remove_file(&tmp);
        match claimed {
            Ok(()) => return Ok((s, marker)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("create {}", marker.display()))(e)),
        }
    }
    Err(NetError::NoFreeSubnet(dir.to_path_buf()))
}

/// Third octets of 10.213.x.0/24 already used by an address or route on this machine.
fn used_subnets() -> Result<BTreeSet<u8>, NetError> {
    let mut used = BTreeSet::new();
    let prefix = format!("{}.{}.", NET_PREFIX[0], NET_PREFIX[1]);
    let addrs = cmd::run("ip", &["-4", "-o", "addr", "show"])?;
    let routes = cmd::run("ip", &["-4", "route", "show", "table", "all"])?;
    for word in addrs.split_whitespace().chain(routes.split_whitespace()) {
        if let Some(rest) = word.strip_prefix(&prefix) {
            if let Some(Ok(s)) = rest.split(['.', '/']).next().map(str::parse::<u8>) {
                used.insert(s);
            }
        }
    }
    Ok(used)
}

/// Names on this machine that look like a test network's.
#[derive(Debug, Default)]
struct Resources {
    netns: Vec<String>,
    links: Vec<String>,
    tables: Vec<String>,
}

fn is_run(s: &str) -> bool {
    s.len() == 6
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The run id in a harness-made name, if it is one.
fn run_of(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_prefix("kn").or_else(|| name.strip_prefix("kv")) {
        if let Some((run, idx)) = rest.split_once('-') {
            if is_run(run) && !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) {
                return Some(run);
            }
        }
    }
    if let Some(rest) = name.strip_prefix("kb") {
        if is_run(rest) {
            return Some(rest);
        }
    }
    if let Some(rest) = name.strip_prefix("keeltest_") {
        if is_run(rest) {
            return Some(rest);
        }
    }
    None
}

impl Resources {
    fn list() -> Result<Self, NetError> {
        let mut r = Resources::default();
        for line in cmd::run("ip", &["netns", "list"])?.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if run_of(name).is_some() {
                    r.netns.push(name.to_string());
                }
            }
        }
        for line in cmd::run("ip", &["-o", "link", "show"])?.lines() {
            // "12: kvabcdef-1@if2: <BROADCAST,...>"
            if let Some(name) = line
                .split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n))
            {
                if run_of(name).is_some() {
                    r.links.push(name.to_string());
                }
            }
        }
        if cmd::which("nft").is_some() {
            for line in cmd::run("nft", &["list", "tables", "bridge"])?.lines() {
                if let Some(name) = line.strip_prefix("table bridge ") {
                    if run_of(name.trim()).is_some() {
                        r.tables.push(name.trim().to_string());
                    }
                }
            }
        }
        Ok(r)
    }

    fn runs(&self) -> BTreeSet<String> {
        self.netns
            .iter()
            .chain(&self.links)
            .chain(&self.tables)
            .filter_map(|n| run_of(n).map(str::to_string))
            .collect()
    }

    fn of_run(self, run: &str) -> Self {
        let keep = |v: Vec<String>| v.into_iter().filter(|n| run_of(n) == Some(run)).collect();
        Resources {
            netns: keep(self.netns),
            links: keep(self.links),
            tables: keep(self.tables),
        }
    }

    fn names(&self) -> Vec<String> {
        self.netns
            .iter()
            .map(|n| format!("netns {n}"))
            .chain(self.links.iter().map(|n| format!("link {n}")))
            .chain(self.tables.iter().map(|n| format!("nft table bridge {n}")))
            .collect()
    }
}

/// Pids whose network namespace is `ns` (`ip netns pids`; zombies are not listed).
fn ns_pids(ns: &str) -> Vec<u32> {
    cmd::run("ip", &["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes everything of run `run`; returns the names that are still there afterwards.
fn teardown_run(run: &str) -> Vec<String> {
    let found = match Resources::list() {
        Ok(r) => r.of_run(run),
        Err(e) => return vec![format!("(cannot list resources: {e})")],
    };
    // A namespace with a process in it outlives `ip netns del` (and keeps its veth): kill
    // what still runs there first. Only harness-named namespaces get here.
    for ns in &found.netns {
        for pid in ns_pids(ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for ns in &found.netns {
        let _ = crate::wait::wait_until_blocking(
            format!("processes in {ns} to exit"),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || Ok(ns_pids(ns).is_empty().then_some(())),
        );
    }
    for t in &found.tables {
        let _ = cmd::run("nft", &["delete", "table", "bridge", t]);
    }
    let mut batch = String::new();
    // Deleting the root-side veth deletes its peer; then the namespaces; the bridge last.
    for l in found.links.iter().filter(|l| l.starts_with("kv")) {
        writeln!(batch, "link del {l}").unwrap();
    }
    for ns in &found.netns {
        writeln!(batch, "netns del {ns}").unwrap();
    }
    for l in found.links.iter().filter(|l| l.starts_with("kb")) {
        writeln!(batch, "link del {l}").unwrap();
    }
    if !batch.is_empty() {
        let _ = cmd::run_with_input("ip", &["-force", "-batch", "-"], Some(&batch));
    }
    match Resources::list() {
        Ok(r) => r.of_run(run).names(),
        Err(e) => vec![format!("(cannot list resources: {e})")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_ifnamsiz_and_parse_back() {
        let run = "0a1b2c";
        for name in [
            bridge_name(run),
            ns_name(run, 0),
            veth_name(run, MAX_HOSTS - 1),
            nft_table(run),
        ] {
            assert_eq!(run_of(&name), Some(run), "{name}");
        }
        assert!(veth_name(run, MAX_HOSTS - 1).len() <= 15);
        assert!(bridge_name(run).len() <= 15);
        for other in [
            "eth0",
            "kbabc",
            "kn0a1b2c",
            "kv0a1b2c-",
            "kn0a1b2g-1",
            "keeltest_xyz123",
            "kb0a1b2c1",
        ] {
            assert_eq!(run_of(other), None, "{other}");
        }
    }

    #[test]
    fn ruleset_islands_and_blocks() {
        let net = TestNet {
            run: "abcdef".into(),
            subnet: 9,
            hosts: 4,
            marker: PathBuf::new(),
            filters: Mutex::new(Filters::default()),
            torn_down: true,
        };
        let empty = net.ruleset(&Filters::default());
        assert_eq!(
            empty,
            "table bridge keeltest_abcdef {}\ndelete table bridge keeltest_abcdef\n"
        );
        let f = Filters {
            groups: vec![vec![2, 3]],
            blocks: vec![(0, 1)],
        };
        let s = net.ruleset(&f);
        assert!(
            s.contains(
                "set island0 { type ifname; elements = { \"kvabcdef-3\", \"kvabcdef-4\" }; }"
            ),
            "{s}"
        );
        assert!(
            s.contains("iifname @island0 oifname != @island0 drop"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"kvabcdef-1\" oifname \"kvabcdef-2\" ether type { ip, ip6 } drop"),
            "{s}"
        );
        assert!(s.contains("hook input") && s.contains("hook output"), "{s}");
    }
}
