//! The real [`Firewall`]: nftables, driven through the `nft` binary of the host.
//!
//! [`render`] turns a [`FirewallState`] into one `nft -f` script that replaces two tables,
//! `bridge keel` and `inet keel`, in a single transaction (so a change is never half
//! applied and the host is never unfiltered in between). [`Nftables`] runs it in the
//! network namespace of the calling thread (the node service runs in the host namespace,
//! where the bridges are).
//!
//! # Why two tables
//!
//! This kernel has no bridge-family conntrack (`ct` in a `bridge` table fails) and no
//! `meta ibrname`/`obrname`. It has `br_netfilter`: with
//! `net.bridge.bridge-nf-call-iptables=1` (a per network namespace sysctl, 1 by default in a
//! new namespace; [`Nftables::apply`] sets it) bridged IPv4 also traverses the `inet`
//! family's hooks, where conntrack works. There, though, `iifname`/`oifname` are the bridge,
//! not its ports. So the ports are carried in the packet mark:
//!
//! * `table bridge keel`, stateless, L2:
//!   - `prerouting` (priority -200, before br_netfilter's 0): every known port gets a
//!     [port id](#port-ids); its chain `from_<id>` sets `meta mark` to the id (low 16 bits)
//!     and applies the port's L2 checks. VM taps: anti-spoofing (`ether saddr` must be the
//!     NIC's MAC; only IPv4 and ARP; ARP only as Ethernet/IPv4 with the NIC's MAC and IP as
//!     sender, or sender IP 0.0.0.0 for probes; IPv4 only from the NIC's IP, or from
//!     0.0.0.0 UDP 68→67 for DHCP; a NIC whose `ip` is 0.0.0.0, no address yet, sends
//!     only those and ARP probes). VXLAN ports: distributed-gateway isolation (nothing
//!     from or to the gateway MAC, no ARP about the gateway address, no DHCP).
//!   - `forward` (priority -200, before br_netfilter's -1): the out port's chain `to_<id>`
//!     puts its id in the high 16 bits of the mark; taps accept only IPv4 and ARP; VXLAN
//!     ports get the same gateway isolation as on the way in.
//!   - A `kt*` port that is not in the state (a VM that started before the reconciler
//!     caught up) is dropped both ways: nothing unfiltered ever reaches a VM or leaves one.
//! * `table inet keel`, stateful (IPv4 via br_netfilter):
//!   - `prerouting` (priority raw, before conntrack): `ct zone set` by bridge, one zone
//!     per network, so that two tenants' networks with the same CIDR never share conntrack
//!     entries (a reply in one must not open the other).
//!   - `forward`: only frames bridged on Keel's bridges (`iifname` is the bridge here);
//!     established/related accept, invalid drop; then, by out port, the always-open
//!     gateway services (`to_gateway_<id>`: DHCP, DNS and ICMP to the gateway address);
//!     by in port, the NIC's egress rules (`egress_<id>`: `return` when allowed, `drop`
//!     otherwise; absent when egress is `None`) or, from the gateway port, DHCP answers
//!     (`from_gateway_<id>`); then, by out port, the NIC's ingress rules (`ingress_<id>`:
//!     `accept` when allowed, `drop` otherwise). Frames leaving through a VXLAN port get
//!     only the sender's egress check (the receiving host checks ingress); frames arriving
//!     from one get only the receiver's ingress check.
//!   - Group remotes are named sets of IPv4 addresses, `group_<name>` (names outside
//!     `[A-Za-z0-9_-]{1,64}` become `grouph_<sha256 prefix>`).
//!
//! IPv6 is not supported yet: taps send and receive only IPv4 and ARP.
//!
//! # Port ids
//!
//! Ids are 1..=65535, assigned afresh on every render in a deterministic order: per
//! network (by VNI) its VXLAN port and gateway port, then the taps by (VNI, name). They
//! live only in marks of packets in flight, so renumbering on a change is harmless.
//!
//! # Conntrack zones
//!
//! A network's zone is `VNI & 0xffff`, or, when that is 0 or taken by a network with a
//! smaller VNI on this host, the next free one. Zones must be stable (conntrack entries
//! outlive a ruleset), which VNI-derived numbers are as long as no two networks on a host
//! collide modulo 65536.
//!
//! # Cost
//!
//! `apply` renders the script (a few ms for 200 ports in a debug build, under 1 ms
//! optimized) and reads the ruleset generation of the namespace (`NFT_MSG_GETGEN` over
//! netlink, ~4 µs). When the script equals the last one applied and the generation is
//! still the one that load produced (nobody committed anything since: no flush, no
//! deleted rule), it stops there. Otherwise it loads the script: for 200 ports in 10
//! networks (a 220 KB script) ~100 ms of `nft`, ~110 ms when replacing an existing one.
//! So a reconcile tick every few seconds costs next to nothing while nothing changes.
//! One `Nftables` per namespace: two would see each other's commits and reload every time.
//!
//! # Namespaces
//!
//! `nft` and the sysctl act on the network namespace of the calling thread. The node
//! service runs in the host namespace; tests call it from a thread that entered one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::firewall::{
    Cidr, Firewall, FirewallError, FirewallState, NetworkPolicy, PortPolicy, Protocol, Remote, Rule,
};
use crate::links;

/// Where Debian puts `nft`.
pub const DEFAULT_BINARY: &str = "/usr/sbin/nft";
/// The name of both tables Keel owns (`bridge keel`, `inet keel`).
pub const TABLE: &str = "keel";
/// The sysctl that sends bridged IPv4 through the `inet` hooks (per network namespace).
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
/// Port ids are 16 bits, 0 meaning "unknown".
pub const MAX_PORTS: usize = 0xffff;

const IN_MASK: u32 = 0x0000_ffff;
const OUT_MASK: u32 = 0xffff_0000;

/// The nftables firewall of the network namespace it is called in.
#[derive(Debug)]
pub struct Nftables {
    binary: PathBuf,
    /// The last successful apply (`None` after a failure or a clear).
    applied: Mutex<Option<Applied>>,
}

#[derive(Debug)]
struct Applied {
    script: String,
    /// The ruleset generation right after our transaction, when it is known to be ours
    /// (exactly one commit happened while nft ran).
    generation: Option<u32>,
}

impl Default for Nftables {
    fn default() -> Self {
        Self::new(PathBuf::from(DEFAULT_BINARY))
    }
}

impl Nftables {
    pub fn new(binary: PathBuf) -> Self {
        Nftables {
            binary,
            applied: Mutex::new(None),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Runs `nft args…` with `stdin`; returns stdout, or `Rejected` with stderr.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        let mut child = Command::new(&self.binary)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FirewallError::Spawn)?;
        let pipe = child.stdin.take();
        let out = std::thread::scope(|s| {
            // Written from a thread of its own while the output is read: a big script
            // never deadlocks on full pipes. A write error (nft died early) shows in its
            // exit status and stderr.
            if let (Some(input), Some(mut pipe)) = (stdin, pipe) {
                s.spawn(move || {
                    let _ = pipe.write_all(input.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(FirewallError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(FirewallError::Rejected {
                stderr: if stderr.is_empty() {
                    format!("nft exited with {}", out.status)
                } else {
                    stderr
                },
            })
        }
    }

    /// Loads `script` unless it is what was applied last and nobody has changed the
    /// ruleset of this namespace since (its generation is still the one our transaction
    /// made). When the generation cannot be read, it always loads.
    fn load(&self, script: &str) -> Result<(), FirewallError> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let before = ruleset_generation().ok();
        if let (Some(last), Some(now)) = (applied.as_ref(), before) {
            if last.script == script && last.generation == Some(now) {
                return Ok(());
            }
        }
        *applied = None;
        self.nft(&["-f", "-"], Some(script))?;
        let after = ruleset_generation().ok();
        let generation = match (before, after) {
            (Some(b), Some(a)) if a == b.wrapping_add(1) => Some(a),
            // Someone else committed meanwhile: load again next time.
            _ => None,
        };
        *applied = Some(Applied {
            script: script.to_string(),
            generation,
        });
        Ok(())
    }
}

pub use crate::nf_tables::ruleset_generation;

/// Makes bridged IPv4 traverse the `inet` hooks in the caller's network namespace.
fn enable_bridge_netfilter() -> Result<(), FirewallError> {
    let path = Path::new(BRIDGE_NF_CALL_IPTABLES);
    let err = |source| FirewallError::BridgeNetfilter {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::read_to_string(path).map_err(err)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1\n").map_err(err)
}

impl Firewall for Nftables {
    fn apply(&self, state: &FirewallState) -> Result<(), FirewallError> {
        let script = render(state)?;
        enable_bridge_netfilter()?;
        self.load(&script)
    }

    fn clear(&self) -> Result<(), FirewallError> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        *applied = None;
        self.nft(&["-f", "-"], Some(&clear_script())).map(drop)
    }
}

/// The script that removes both Keel tables (and succeeds when they do not exist).
pub fn clear_script() -> String {
    let mut s = String::new();
    for family in ["bridge", "inet"] {
        // Declaring a table first makes its deletion succeed when it does not exist.
        writeln!(
            s,
            "table {family} {TABLE} {{}}\ndelete table {family} {TABLE}"
        )
        .unwrap();
    }
    s
}

/// Whether `name` is a link name that is safe inside an nft string: 1..=15 bytes of
/// `[A-Za-z0-9_.-]` (no quotes, spaces or the `*` wildcard).
fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The nft set holding the members of security group `name`.
pub fn group_set_name(name: &str) -> String {
    let plain = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if plain {
        format!("group_{name}")
    } else {
        let digest = Sha256::digest(name.as_bytes());
        format!("grouph_{}", hex::encode(&digest[..12]))
    }
}

fn invalid(msg: impl Into<String>) -> FirewallError {
    FirewallError::Invalid(msg.into())
}

fn mac(m: links::MacAddr) -> String {
    m.to_string()
}

/// `addr/len` with the host bits cleared, or the bare address for a /32.
fn network(c: &Cidr) -> Result<String, FirewallError> {
    if c.prefix_len > 32 {
        return Err(invalid(format!("{c} has a prefix longer than 32")));
    }
    let mask = if c.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(c.prefix_len))
    };
    let addr = Ipv4Addr::from(u32::from(c.addr) & mask);
    Ok(if c.prefix_len == 32 {
        addr.to_string()
    } else {
        format!("{addr}/{}", c.prefix_len)
    })
}

#[derive(Clone, Copy)]
enum Direction {
    /// Into the VM: the remote is the source.
    Ingress,
    /// Out of the VM: the remote is the destination.
    Egress,
}

/// The match part of an allow rule (without its verdict).
fn rule_match(rule: &Rule, dir: Direction) -> Result<String, FirewallError> {
    let mut parts = Vec::new();
    let addr = match dir {
        Direction::Ingress => "ip saddr",
        Direction::Egress => "ip daddr",
    };
    match &rule.remote {
        Remote::Cidr(c) if c.prefix_len == 0 => {
            network(c)?;
        }
        Remote::Cidr(c) => parts.push(format!("{addr} {}", network(c)?)),
        Remote::Group(g) => parts.push(format!("{addr} @{}", group_set_name(g))),
    }
    let l4 = match rule.protocol {
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
        Protocol::Icmp | Protocol::Any => None,
    };
    match (l4, rule.ports) {
        (Some(p), Some((lo, hi))) if lo == hi => parts.push(format!("{p} dport {lo}")),
        (Some(p), Some((lo, hi))) if lo < hi => parts.push(format!("{p} dport {lo}-{hi}")),
        (Some(_), Some((lo, hi))) => {
            return Err(invalid(format!("port range {lo}-{hi} is empty")));
        }
        (Some(p), None) => parts.push(format!("meta l4proto {p}")),
        (None, Some(_)) => {
            return Err(invalid(format!(
                "ports on a {:?} rule (only TCP and UDP have ports)",
                rule.protocol
            )));
        }
        (None, None) => {
            if rule.protocol == Protocol::Icmp {
                parts.push("meta l4proto icmp".into());
            }
        }
    }
    if parts.is_empty() {
        parts.push("meta nfproto ipv4".into());
    }
    Ok(parts.join(" "))
}

/// Sorted, deduplicated rule lines `<match> <verdict>`.
fn rule_lines(rules: &[Rule], dir: Direction, verdict: &str) -> Result<Vec<String>, FirewallError> {
    let mut lines = BTreeSet::new();
    for r in rules {
        lines.insert(format!("{} {verdict}", rule_match(r, dir)?));
    }
    Ok(lines.into_iter().collect())
}

struct Net<'a> {
    p: &'a NetworkPolicy,
    bridge: String,
    vx_id: u32,
    gh_id: u32,
    zone: u16,
}

struct Tap<'a> {
    p: &'a PortPolicy,
    id: u32,
    ingress: Vec<String>,
    egress: Option<Vec<String>>,
}

/// Validates `state` and assigns port ids and zones.
fn plan(state: &FirewallState) -> Result<(Vec<Net<'_>>, Vec<Tap<'_>>), FirewallError> {
    let mut networks: Vec<&NetworkPolicy> = state.networks.iter().collect();
    networks.sort_by_key(|n| n.vni);
    let mut ports: Vec<&PortPolicy> = state.ports.iter().collect();
    ports.sort_by(|a, b| (a.vni, &a.tap).cmp(&(b.vni, &b.tap)));
    let count = networks.len() * 2 + ports.len();
    if count > MAX_PORTS {
        return Err(invalid(format!(
            "{count} bridge ports; port ids allow at most {MAX_PORTS}"
        )));
    }

    let mut names = BTreeSet::new();
    let mut name = |what: &str, n: &str| {
        if !valid_ifname(n) {
            return Err(invalid(format!(
                "{what} name {n:?} is not a valid link name"
            )));
        }
        if !names.insert(n.to_string()) {
            return Err(invalid(format!("link name {n:?} appears twice")));
        }
        Ok(())
    };
    let mut next_id = 0u32;
    let mut id = || {
        next_id += 1;
        next_id
    };
    let mut zones = BTreeSet::new();
    let mut nets = Vec::new();
    for n in networks {
        if nets.last().is_some_and(|l: &Net<'_>| l.p.vni == n.vni) {
            return Err(invalid(format!("network {} appears twice", n.vni)));
        }
        let bridge = links::bridge_name(n.vni);
        name("bridge", &bridge)?;
        name("VXLAN", &n.vxlan)?;
        name("gateway port", &n.gateway_port)?;
        let mut zone = (n.vni & 0xffff) as u16;
        while zone == 0 || zones.contains(&zone) {
            zone = zone.wrapping_add(1);
        }
        zones.insert(zone);
        nets.push(Net {
            p: n,
            bridge,
            vx_id: id(),
            gh_id: id(),
            zone,
        });
    }
    let mut taps = Vec::new();
    for p in ports {
        name("tap", &p.tap)?;
        if !nets.iter().any(|n| n.p.vni == p.vni) {
            return Err(invalid(format!(
                "port {} is on network {}, which is not in the state",
                p.tap, p.vni
            )));
        }
        let ingress = rule_lines(&p.ingress, Direction::Ingress, "accept")
            .map_err(|e| invalid(format!("ingress of {}: {e}", p.tap)))?;
        let egress = match &p.egress {
            None => None,
            Some(rules) => Some(
                rule_lines(rules, Direction::Egress, "return")
                    .map_err(|e| invalid(format!("egress of {}: {e}", p.tap)))?,
            ),
        };
        taps.push(Tap {
            p,
            id: id(),
            ingress,
            egress,
        });
    }
    Ok((nets, taps))
}

/// `{ a, b, c }`, or `None` for an empty list (nft has no empty anonymous sets).
fn set_of(items: impl IntoIterator<Item = String>) -> Option<String> {
    let items: Vec<String> = items.into_iter().collect();
    (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
}

/// L2 gateway isolation on a VXLAN port, both directions.
fn gateway_isolation(s: &mut String, n: &NetworkPolicy) {
    let (gw_mac, gw_ip) = (mac(n.gateway_mac), n.gateway_ip);
    writeln!(s, "\t\tether saddr {gw_mac} drop").unwrap();
    writeln!(s, "\t\tether daddr {gw_mac} drop").unwrap();
    writeln!(s, "\t\tarp saddr ip {gw_ip} drop").unwrap();
    writeln!(s, "\t\tarp daddr ip {gw_ip} drop").unwrap();
    writeln!(s, "\t\tudp sport 68 udp dport 67 drop").unwrap();
    writeln!(s, "\t\tudp sport 67 udp dport 68 drop").unwrap();
}

fn chain_head(s: &mut String, name: &str, comment: &str) {
    // `comment` is built from validated names only.
    writeln!(s, "\tchain {name} {{\n\t\tcomment \"{comment}\"").unwrap();
}

fn set_out_mark(s: &mut String, id: u32) {
    writeln!(
        s,
        "\t\tmeta mark set meta mark & {IN_MASK:#010x} | {:#010x}",
        id << 16
    )
    .unwrap();
}

/// The whole nft script for `state`: replaces `table bridge keel` and `table inet keel`
/// in one transaction. Pure and deterministic (the same state, in any order, gives the
/// same text). See the module documentation for what the tables do.
pub fn render(state: &FirewallState) -> Result<String, FirewallError> {
    let (nets, taps) = plan(state)?;
    let mut s = String::from("# Keel's packet filter: generated, replaced as a whole.\n");
    s.push_str(&clear_script());

    // ---- bridge: port marks, anti-spoofing, gateway isolation -----------------------
    writeln!(s, "table bridge {TABLE} {{").unwrap();
    // `goto`, not `jump`: a port's chain that ends without a verdict ends the base chain
    // with its policy (accept), and does not fall through to the unknown-tap drop.
    let mut from = Vec::new();
    let mut to = Vec::new();
    for n in &nets {
        from.push(format!("\"{}\" : goto from_{}", n.p.vxlan, n.vx_id));
        from.push(format!("\"{}\" : goto from_{}", n.p.gateway_port, n.gh_id));
        to.push(format!("\"{}\" : goto to_{}", n.p.vxlan, n.vx_id));
        to.push(format!("\"{}\" : goto to_{}", n.p.gateway_port, n.gh_id));
    }
    for t in &taps {
        from.push(format!("\"{}\" : goto from_{}", t.p.tap, t.id));
        to.push(format!("\"{}\" : goto to_{}", t.p.tap, t.id));
    }
    writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority -200; policy accept;"
    )
    .unwrap();
    if let Some(m) = set_of(from) {
        writeln!(s, "\t\tiifname vmap {m}").unwrap();
    }
    writeln!(s, "\t\tiifname \"kt*\" drop\n\t}}").unwrap();
    writeln!(
        s,
        "\tchain forward {{\n\t\ttype filter hook forward priority -200; policy accept;"
    )
    .unwrap();
    if let Some(m) = set_of(to) {
        writeln!(s, "\t\toifname vmap {m}").unwrap();
    }
    writeln!(s, "\t\toifname \"kt*\" drop\n\t}}").unwrap();

    for n in &nets {
        let vni = n.p.vni;
        let vx = &n.p.vxlan;
        chain_head(
            &mut s,
            &format!("from_{}", n.vx_id),
            &format!("{vx}: VXLAN of network {vni}"),
        );
        writeln!(s, "\t\tmeta mark set {:#010x}", n.vx_id).unwrap();
        gateway_isolation(&mut s, n.p);
        writeln!(s, "\t}}").unwrap();
        chain_head(
            &mut s,
            &format!("to_{}", n.vx_id),
            &format!("{vx}: VXLAN of network {vni}"),
        );
        set_out_mark(&mut s, n.vx_id);
        gateway_isolation(&mut s, n.p);
        writeln!(s, "\t}}").unwrap();

        let gh = &n.p.gateway_port;
        chain_head(
            &mut s,
            &format!("from_{}", n.gh_id),
            &format!("{gh}: gateway of network {vni}"),
        );
        writeln!(s, "\t\tmeta mark set {:#010x}\n\t}}", n.gh_id).unwrap();
        chain_head(
            &mut s,
            &format!("to_{}", n.gh_id),
            &format!("{gh}: gateway of network {vni}"),
        );
        set_out_mark(&mut s, n.gh_id);
        writeln!(s, "\t}}").unwrap();
    }
    for t in &taps {
        let p = t.p;
        let comment = format!("{}: {} {} on network {}", p.tap, p.mac, p.ip, p.vni);
        let m = mac(p.mac);
        chain_head(&mut s, &format!("from_{}", t.id), &comment);
        writeln!(s, "\t\tmeta mark set {:#010x}", t.id).unwrap();
        writeln!(s, "\t\tether saddr != {m} drop").unwrap();
        writeln!(s, "\t\tether type != {{ ip, arp }} drop").unwrap();
        writeln!(s, "\t\tarp htype != 1 drop").unwrap();
        writeln!(s, "\t\tarp ptype != ip drop").unwrap();
        writeln!(s, "\t\tarp hlen != 6 drop").unwrap();
        writeln!(s, "\t\tarp plen != 4 drop").unwrap();
        writeln!(s, "\t\tarp saddr ether != {m} drop").unwrap();
        writeln!(s, "\t\tarp saddr ip 0.0.0.0 accept").unwrap();
        writeln!(s, "\t\tarp saddr ip != {} drop", p.ip).unwrap();
        writeln!(s, "\t\tip saddr 0.0.0.0 udp sport 68 udp dport 67 accept").unwrap();
        writeln!(s, "\t\tip saddr != {} drop", p.ip).unwrap();
        writeln!(s, "\t}}").unwrap();
        chain_head(&mut s, &format!("to_{}", t.id), &comment);
        set_out_mark(&mut s, t.id);
        writeln!(s, "\t\tether type != {{ ip, arp }} drop\n\t}}").unwrap();
    }
    writeln!(s, "}}").unwrap();

    // ---- inet: conntrack zones and security groups ----------------------------------
    writeln!(s, "table inet {TABLE} {{").unwrap();
    let mut groups: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for (name, members) in &state.groups {
        groups
            .entry(group_set_name(name))
            .or_default()
            .extend(members.iter().copied());
    }
    // A rule may name a group without members (absent from `groups`): an empty set.
    for t in &taps {
        let rules = t.p.ingress.iter().chain(t.p.egress.iter().flatten());
        for r in rules {
            if let Remote::Group(g) = &r.remote {
                groups.entry(group_set_name(g)).or_default();
            }
        }
    }
    for (set, members) in &groups {
        write!(s, "\tset {set} {{\n\t\ttype ipv4_addr\n").unwrap();
        if let Some(e) = set_of(members.iter().map(Ipv4Addr::to_string)) {
            writeln!(s, "\t\telements = {e}").unwrap();
        }
        writeln!(s, "\t}}").unwrap();
    }
    if !nets.is_empty() {
        let zones = set_of(
            nets.iter()
                .map(|n| format!("\"{}\" : {}", n.bridge, n.zone)),
        );
        let bridges = set_of(nets.iter().map(|n| format!("\"{}\"", n.bridge)));
        let (zones, bridges) = (zones.unwrap_or_default(), bridges.unwrap_or_default());
        writeln!(
            s,
            "\tchain prerouting {{\n\t\ttype filter hook prerouting priority raw; policy accept;"
        )
        .unwrap();
        writeln!(s, "\t\tct zone set iifname map {zones}\n\t}}").unwrap();
        writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;"
        )
        .unwrap();
        writeln!(s, "\t\tiifname != {bridges} accept").unwrap();
        writeln!(s, "\t\tct state established,related accept").unwrap();
        writeln!(s, "\t\tct state invalid drop").unwrap();
        let to_gw = nets
            .iter()
            .map(|n| format!("{:#010x} : jump to_gateway_{}", n.gh_id << 16, n.gh_id));
        if let Some(m) = set_of(to_gw) {
            writeln!(s, "\t\tmeta mark & {OUT_MASK:#010x} vmap {m}").unwrap();
        }
        let by_in = nets
            .iter()
            .map(|n| (n.gh_id, format!("jump from_gateway_{}", n.gh_id)))
            .chain(
                taps.iter()
                    .filter(|t| t.egress.is_some())
                    .map(|t| (t.id, format!("jump egress_{}", t.id))),
            )
            .map(|(id, v)| format!("{id:#06x} : {v}"));
        if let Some(m) = set_of(by_in) {
            writeln!(s, "\t\tmeta mark & {IN_MASK:#010x} vmap {m}").unwrap();
        }
        let by_out = taps
            .iter()
            .map(|t| format!("{:#010x} : jump ingress_{}", t.id << 16, t.id));
        if let Some(m) = set_of(by_out) {
            writeln!(s, "\t\tmeta mark & {OUT_MASK:#010x} vmap {m}").unwrap();
        }
        writeln!(s, "\t}}").unwrap();
    }
    for n in &nets {
        let (gh, vni, gw) = (&n.p.gateway_port, n.p.vni, n.p.gateway_ip);
        chain_head(
            &mut s,
            &format!("to_gateway_{}", n.gh_id),
            &format!("{gh}: DHCP, DNS and ICMP to the gateway of network {vni}"),
        );
        writeln!(s, "\t\tudp sport 68 udp dport 67 accept").unwrap();
        writeln!(s, "\t\tip daddr {gw} udp dport 53 accept").unwrap();
        writeln!(s, "\t\tip daddr {gw} tcp dport 53 accept").unwrap();
        writeln!(s, "\t\tip daddr {gw} meta l4proto icmp accept\n\t}}").unwrap();
        chain_head(
            &mut s,
            &format!("from_gateway_{}", n.gh_id),
            &format!("{gh}: DHCP answers of the gateway of network {vni}"),
        );
        writeln!(s, "\t\tudp sport 67 udp dport 68 accept\n\t}}").unwrap();
    }
    for t in &taps {
        let tap = &t.p.tap;
        if let Some(egress) = &t.egress {
            chain_head(
                &mut s,
                &format!("egress_{}", t.id),
                &format!("{tap}: egress"),
            );
            for line in egress {
                writeln!(s, "\t\t{line}").unwrap();
            }
            writeln!(s, "\t\tdrop\n\t}}").unwrap();
        }
        chain_head(
            &mut s,
            &format!("ingress_{}", t.id),
            &format!("{tap}: ingress"),
        );
        for line in &t.ingress {
            writeln!(s, "\t\t{line}").unwrap();
        }
        writeln!(s, "\t\tdrop\n\t}}").unwrap();
    }
    writeln!(s, "}}").unwrap();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::{gateway_host_name, gateway_mac, tap_name, vxlan_name, MacAddr};

    fn cidr(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix_len: l.parse().unwrap(),
        }
    }

    fn net(vni: u32) -> NetworkPolicy {
        NetworkPolicy {
            vni,
            vxlan: vxlan_name(vni),
            gateway_port: gateway_host_name(vni),
            gateway_ip: Ipv4Addr::new(10, 0, 0, 1),
            gateway_mac: gateway_mac(vni),
        }
    }

    fn port(vni: u32, last: u8) -> PortPolicy {
        let mac = MacAddr([0x52, 0x54, 0, 0, vni as u8, last]);
        PortPolicy {
            tap: tap_name(mac),
            vni,
            mac,
            ip: Ipv4Addr::new(10, 0, 0, last),
            ingress: vec![],
            egress: None,
        }
    }

    fn state() -> FirewallState {
        let mut a = port(5, 2);
        a.ingress = vec![
            Rule {
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                remote: Remote::Cidr(cidr("10.0.0.77/24")),
            },
            Rule {
                protocol: Protocol::Icmp,
                ports: None,
                remote: Remote::Group("web".into()),
            },
        ];
        let mut b = port(5, 3);
        b.egress = Some(vec![Rule {
            protocol: Protocol::Udp,
            ports: Some((1000, 2000)),
            remote: Remote::Cidr(cidr("0.0.0.0/0")),
        }]);
        b.ingress = vec![Rule {
            protocol: Protocol::Any,
            ports: None,
            remote: Remote::Group("db servers".into()),
        }];
        FirewallState {
            networks: vec![net(7), net(5)],
            ports: vec![b, a, port(7, 2)],
            groups: BTreeMap::from([(
                "web".to_string(),
                vec![Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 0, 8)],
            )]),
        }
    }

    fn line_of<'a>(script: &'a str, needle: &str) -> &'a str {
        script
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{script}"))
    }

    #[test]
    fn nft_render_key_lines() {
        let s = render(&state()).unwrap();
        // Both tables replaced in one script.
        assert!(
            s.contains("table bridge keel {}\ndelete table bridge keel\n"),
            "{s}"
        );
        assert!(
            s.contains("table inet keel {}\ndelete table inet keel\n"),
            "{s}"
        );
        // Ids: network 5 (kvx5=1, kgh5=2), network 7 (3, 4), then taps by (vni, name).
        let a = tap_name(MacAddr([0x52, 0x54, 0, 0, 5, 2]));
        assert!(s.contains(&format!("\"{a}\" : goto from_5")), "{s}");
        assert!(s.contains("\"kvx5\" : goto from_1"), "{s}");
        assert!(s.contains("\"kgh7\" : goto to_4"), "{s}");
        // Anti-spoofing of A.
        assert!(
            s.contains("\t\tmeta mark set 0x00000005\n\t\tether saddr != 52:54:00:00:05:02 drop\n"),
            "{s}"
        );
        assert!(s.contains("arp saddr ip != 10.0.0.2 drop"), "{s}");
        assert!(s.contains("ip saddr != 10.0.0.2 drop"), "{s}");
        assert!(
            s.contains("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept"),
            "{s}"
        );
        // Out marks.
        assert!(
            s.contains("meta mark set meta mark & 0x0000ffff | 0x00050000"),
            "{s}"
        );
        // Gateway isolation on the VXLAN port.
        assert!(s.contains("ether saddr 02:6b:67:00:00:05 drop"), "{s}");
        assert!(s.contains("arp daddr ip 10.0.0.1 drop"), "{s}");
        // Zones by bridge, filtering only on Keel's bridges.
        assert!(
            s.contains("ct zone set iifname map { \"kbr5\" : 5, \"kbr7\" : 7 }"),
            "{s}"
        );
        assert!(
            s.contains("iifname != { \"kbr5\", \"kbr7\" } accept"),
            "{s}"
        );
        // Gateway services before egress, egress before ingress.
        let fwd = &s[s
            .find("chain forward {\n\t\ttype filter hook forward priority filter")
            .unwrap()..];
        let to_gw = fwd.find("vmap { 0x00020000 : jump to_gateway_2").unwrap();
        let egress = fwd.find("0x0006 : jump egress_6").unwrap();
        let ingress = fwd.find("0x00050000 : jump ingress_5").unwrap();
        assert!(to_gw < egress && egress < ingress, "{fwd}");
        // A has no egress rules: no egress chain.
        assert!(!s.contains("chain egress_5"), "{s}");
        // Rules: normalized CIDR, port ranges, groups (sorted, deduplicated members).
        assert!(
            s.contains("ip saddr 10.0.0.0/24 tcp dport 22 accept"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @group_web meta l4proto icmp accept"),
            "{s}"
        );
        assert!(s.contains("udp dport 1000-2000 return\n\t\tdrop\n"), "{s}");
        assert!(s.contains("elements = { 10.0.0.8, 10.0.0.9 }"), "{s}");
        let db = group_set_name("db servers");
        assert!(db.starts_with("grouph_") && !db.contains(' '), "{db}");
        assert!(
            s.contains(&format!("set {db} {{\n\t\ttype ipv4_addr\n\t}}")),
            "{s}"
        );
        assert!(s.contains(&format!("ip saddr @{db} accept")), "{s}");
        assert_eq!(line_of(&s, "chain ingress_5").trim(), "chain ingress_5 {");
    }

    #[test]
    fn nft_render_is_deterministic() {
        let a = render(&state()).unwrap();
        let mut shuffled = state();
        shuffled.ports.reverse();
        shuffled.networks.reverse();
        for p in &mut shuffled.ports {
            p.ingress.reverse();
        }
        assert_eq!(a, render(&shuffled).unwrap());
        assert_eq!(a, render(&state()).unwrap());
    }

    #[test]
    fn nft_render_empty_state() {
        let s = render(&FirewallState::default()).unwrap();
        assert!(s.contains("table bridge keel {"), "{s}");
        assert!(!s.contains("vmap"), "{s}");
        assert!(s.contains("iifname \"kt*\" drop"), "{s}");
    }

    #[test]
    fn nft_render_refuses_bad_names_and_rules() {
        let bad_names = [
            "kt\"; flush ruleset",
            "kt*",
            "",
            "a-name-that-is-too-long",
            "kt 1",
            "kt\n1",
        ];
        for bad in bad_names {
            let mut s = state();
            s.ports[0].tap = bad.to_string();
            assert!(
                matches!(render(&s), Err(FirewallError::Invalid(_))),
                "{bad:?}"
            );
            let mut s = state();
            s.networks[0].vxlan = bad.to_string();
            assert!(
                matches!(render(&s), Err(FirewallError::Invalid(_))),
                "{bad:?}"
            );
        }
        let mut s = state();
        s.ports[1].tap = s.ports[0].tap.clone();
        assert!(matches!(render(&s), Err(FirewallError::Invalid(_))));
        let mut s = state();
        s.ports[0].vni = 99;
        assert!(matches!(render(&s), Err(FirewallError::Invalid(_))));
        let mut s = state();
        s.networks.push(net(5));
        assert!(matches!(render(&s), Err(FirewallError::Invalid(_))));
        for rule in [
            Rule {
                protocol: Protocol::Tcp,
                ports: Some((30, 20)),
                remote: Remote::Cidr(cidr("10.0.0.0/8")),
            },
            Rule {
                protocol: Protocol::Icmp,
                ports: Some((1, 2)),
                remote: Remote::Cidr(cidr("10.0.0.0/8")),
            },
            Rule {
                protocol: Protocol::Any,
                ports: None,
                remote: Remote::Cidr(cidr("10.0.0.0/33")),
            },
        ] {
            let mut s = state();
            s.ports[0].ingress.push(rule.clone());
            assert!(
                matches!(render(&s), Err(FirewallError::Invalid(_))),
                "{rule:?}"
            );
        }
    }

    #[test]
    fn nft_group_names_cannot_inject() {
        assert_eq!(group_set_name("web"), "group_web");
        assert_eq!(group_set_name("web-1_a"), "group_web-1_a");
        for evil in [
            "a } ; flush ruleset ; set b {",
            "x\ny",
            "",
            "élan",
            &"g".repeat(65),
        ] {
            let n = group_set_name(evil);
            assert!(n.starts_with("grouph_"), "{n}");
            assert!(
                n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{n}"
            );
        }
        assert_ne!(group_set_name("a b"), group_set_name("a c"));
        let mut s = state();
        s.groups.insert(
            "a } ; flush ruleset".into(),
            vec![Ipv4Addr::new(1, 2, 3, 4)],
        );
        let out = render(&s).unwrap();
        assert!(!out.contains("flush"), "{out}");
    }

    #[test]
    fn nft_zones_avoid_collisions() {
        let s = FirewallState {
            networks: vec![net(0x10005), net(5), net(0x10000)],
            ..FirewallState::default()
        };
        let out = render(&s).unwrap();
        // 5 → 5; 0x10000 → 0 is reserved → 1; 0x10005 → 5 is taken → 6.
        assert!(
            out.contains(
                "ct zone set iifname map { \"kbr5\" : 5, \"kbr65536\" : 1, \"kbr65541\" : 6 }"
            ),
            "{out}"
        );
    }

    /// Runs `f` on a thread in a network namespace of its own (gone when it returns).
    fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn nft_usable() -> bool {
        let ok = Path::new(DEFAULT_BINARY).exists() && nix::unistd::geteuid().is_root();
        if !ok {
            eprintln!("SKIPPED: {DEFAULT_BINARY} missing or not root");
        }
        ok
    }

    /// Applies in a private namespace: the generation moves once per real load; an
    /// unchanged state loads nothing; a ruleset changed behind the adapter's back (even
    /// inside its own table) is loaded again.
    #[test]
    fn nft_apply_loads_only_when_needed() {
        if !nft_usable() || !Path::new(BRIDGE_NF_CALL_IPTABLES).exists() {
            return;
        }
        in_private_netns(|| {
            let fw = Nftables::default();
            let g0 = ruleset_generation().unwrap();
            fw.apply(&state()).unwrap();
            let g1 = ruleset_generation().unwrap();
            assert_eq!(g1, g0.wrapping_add(1));
            fw.apply(&state()).unwrap();
            assert_eq!(
                ruleset_generation().unwrap(),
                g1,
                "unchanged: nothing loaded"
            );
            let mut changed = state();
            changed.ports[0].ingress.clear();
            fw.apply(&changed).unwrap();
            let g2 = ruleset_generation().unwrap();
            assert_eq!(g2, g1.wrapping_add(1));
            fw.nft(&["flush", "table", "inet", TABLE], None).unwrap();
            fw.apply(&changed).unwrap();
            assert_eq!(ruleset_generation().unwrap(), g2.wrapping_add(2));
            let listed = fw.nft(&["list", "table", "inet", TABLE], None).unwrap();
            assert!(listed.contains("ct zone set"), "{listed}");
            assert_eq!(
                std::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES)
                    .unwrap()
                    .trim(),
                "1"
            );
            fw.clear().unwrap();
            let tables = fw.nft(&["list", "tables"], None).unwrap();
            assert!(!tables.contains(TABLE), "{tables}");
            fw.clear().unwrap();
        });
    }

    /// `nft -c` (check only, nothing changes) accepts the script, when nft is installed
    /// and usable (it needs CAP_NET_ADMIN even to check).
    #[test]
    fn nft_check_accepts_rendered_scripts() {
        if !nft_usable() {
            return;
        }
        let fw = Nftables::default();
        for st in [state(), FirewallState::default()] {
            let script = render(&st).unwrap();
            if let Err(e) = fw.nft(&["-c", "-f", "-"], Some(&script)) {
                panic!("{e}\n{script}");
            }
        }
        fw.nft(&["-c", "-f", "-"], Some(&clear_script())).unwrap();
    }
}
