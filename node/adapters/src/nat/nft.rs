//! The real [`Nat`]: nftables through the `nft` binary, one table per namespace.
//!
//! * Router namespace of an external network: `table ip keel_nat` ([`render_router`]),
//!   replaced as a whole by one `nft -f -` transaction (declare, delete, define):
//!   - `prerouting` (nat, dstnat): per floating IP `ip daddr FIP dnat to PRIVATE` (1:1),
//!     or per forwarded port `ip daddr FIP tcp dport P dnat to PRIVATE:Q`. Not limited to
//!     packets from the uplink: a VM reaching a floating IP of its own network is
//!     translated too (hairpin), see `postrouting`.
//!   - `postrouting` (nat, srcnat): out the uplink, a 1:1 VM's address becomes its
//!     floating IP, every other address of the network the uplink's router address (the
//!     host then masquerades that); back into the network, a translated connection from
//!     inside it (hairpin) leaves with the gateway's address
//!     (`ct status dnat … masquerade`), so the answer comes back through the router.
//!   - `forward` (filter): nothing goes back out the uplink it came in on. A packet for a
//!     floating IP that no rule translated (a port that is not forwarded) would otherwise
//!     bounce between the host, which routes the floating IP into the uplink, and the
//!     router, whose default route is the uplink, until its TTL ran out.
//! * Host namespace: `table ip keel_host_nat` ([`render_host`]): `oifname PUBLIC ip saddr
//!   100.64.0.0/10 masquerade`. Floating IPs leave as they are (the router has already
//!   put them in).
//!
//! Router rules run in the router namespace: `apply_router` enters it with `setns` on a
//! thread of its own that starts `nft` (a child starts in the namespace of the thread that
//! spawns it) and ends with the call. Host rules act on the caller's namespace.
//!
//! # Cost
//!
//! The reconciler applies on every pass; `nft` is only started when something changed:
//! * a router namespace is Keel's alone, so its nf_tables generation (`NFT_MSG_GETGEN`,
//!   a few µs) tells whether anyone committed since the last load; a recreated namespace
//!   (another nsfs inode) always loads;
//! * the host namespace is shared with the firewall ([`crate::firewall::nft::Nftables`]), which
//!   commits there too: comparing generations would make the two reload each other on
//!   every pass. Instead the table's handle and use count (`NFT_MSG_GETTABLE`) are
//!   compared: a deleted, recreated or flushed table (or a removed chain) loads again; a
//!   single rule deleted by hand inside it goes unnoticed until the next change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use crate::firewall::{Cidr, FirewallError};
use crate::nat::{FloatingNat, Forward, ForwardProtocol, HostNat, Nat, RouterNat};

/// The table in every router namespace.
pub const ROUTER_TABLE: &str = "keel_nat";
/// The table in the host namespace.
pub const HOST_TABLE: &str = "keel_host_nat";

/// [`Nat`] through `nft`.
#[derive(Debug)]
pub struct NftNat {
    binary: PathBuf,
    /// The last successful load per router namespace (by VNI).
    routers: Mutex<BTreeMap<u32, RouterApplied>>,
    /// The last successful host apply (`None` before it or after a failure).
    host: Mutex<Option<HostApplied>>,
}

#[derive(Debug)]
struct RouterApplied {
    /// (device, inode) of the namespace file: another namespace, another identity.
    ns: (u64, u64),
    script: String,
    /// The namespace's generation right after our load, when exactly our commit happened.
    generation: Option<u32>,
}

#[derive(Debug)]
struct HostApplied {
    script: String,
    /// The table as read right after the load (`None`: absent).
    table: Option<TableState>,
}

impl NftNat {
    /// An adapter running `nft_binary` (production: [`crate::firewall::nft::DEFAULT_BINARY`]).
    pub fn new(nft_binary: PathBuf) -> Self {
        NftNat {
            binary: nft_binary,
            routers: Mutex::new(BTreeMap::new()),
            host: Mutex::new(None),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Runs `nft -f -` with `script` in the calling thread's namespace.
    fn load(&self, script: &str) -> Result<(), FirewallError> {
        let mut child = Command::new(&self.binary)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FirewallError::Spawn)?;
        let pipe = child.stdin.take();
        let out = std::thread::scope(|s| {
            // From a thread of its own: a long script never deadlocks on full pipes. A
            // write error (nft died early) shows in its exit status and stderr.
            if let Some(mut pipe) = pipe {
                s.spawn(move || {
                    let _ = pipe.write_all(script.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(FirewallError::Spawn)?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(FirewallError::Rejected {
            stderr: if stderr.is_empty() {
                format!("nft exited with {}", out.status)
            } else {
                stderr
            },
        })
    }

    fn routers(&self) -> MutexGuard<'_, BTreeMap<u32, RouterApplied>> {
        self.routers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Nat for NftNat {
    fn apply_router(&self, nat: &RouterNat) -> Result<(), FirewallError> {
        let script = render_router(nat)?;
        let enter_err = |e: std::io::Error| {
            FirewallError::Spawn(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot enter the router namespace {}: {e}",
                    nat.netns.display()
                ),
            ))
        };
        let meta = std::fs::metadata(&nat.netns).map_err(enter_err)?;
        let ns = (meta.dev(), meta.ino());
        let mut guard = self.routers();
        let routers: &mut BTreeMap<u32, RouterApplied> = &mut guard;
        in_netns(&nat.netns, || {
            let before = crate::nf_tables::ruleset_generation().ok();
            if let (Some(last), Some(now)) = (routers.get(&nat.vni), before) {
                if last.ns == ns && last.script == script && last.generation == Some(now) {
                    return Ok(());
                }
            }
            routers.remove(&nat.vni);
            self.load(&script)?;
            let generation = match (before, crate::nf_tables::ruleset_generation().ok()) {
                (Some(b), Some(a)) if a == b.wrapping_add(1) => Some(a),
                // Someone else committed meanwhile: load again next time.
                _ => None,
            };
            routers.insert(
                nat.vni,
                RouterApplied {
                    ns,
                    script,
                    generation,
                },
            );
            Ok(())
        })
        .map_err(enter_err)?
    }

    fn apply_host(&self, nat: Option<&HostNat>) -> Result<(), FirewallError> {
        let script = render_host(nat)?;
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        let now = table_state(NFPROTO_IPV4, HOST_TABLE).ok();
        if let (Some(last), Some(now)) = (host.as_ref(), now) {
            if last.script == script && last.table == now {
                return Ok(());
            }
        }
        *host = None;
        self.load(&script)?;
        if let Ok(table) = table_state(NFPROTO_IPV4, HOST_TABLE) {
            *host = Some(HostApplied { script, table });
        }
        Ok(())
    }
}

/// Runs `f` on a fresh thread inside the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("keel-nat".into())
            .spawn_scoped(s, move || {
                // This thread alone moves into the namespace, and ends right after.
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(f())
            })?;
        match spawned.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn invalid(msg: impl Into<String>) -> FirewallError {
    FirewallError::Invalid(msg.into())
}

/// A link name that is safe inside an nft string: 1..=15 bytes of `[A-Za-z0-9_.-]`.
fn check_ifname(what: &str, name: &str) -> Result<(), FirewallError> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("{what} {name:?} is not a valid link name")))
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

/// `addr/len` with the host bits cleared.
fn prefix(c: &Cidr) -> Result<String, FirewallError> {
    if c.prefix_len > 32 {
        return Err(invalid(format!("{c} has a prefix longer than 32")));
    }
    let addr = Ipv4Addr::from(u32::from(c.addr) & mask(c.prefix_len));
    Ok(format!("{addr}/{}", c.prefix_len))
}

fn contains(c: &Cidr, ip: Ipv4Addr) -> bool {
    let m = mask(c.prefix_len);
    u32::from(ip) & m == u32::from(c.addr) & m
}

fn proto(p: ForwardProtocol) -> &'static str {
    match p {
        ForwardProtocol::Tcp => "tcp",
        ForwardProtocol::Udp => "udp",
    }
}

/// Checks one floating IP; returns its forwards sorted.
fn checked_forwards(f: &FloatingNat, cidr: &Cidr) -> Result<Vec<Forward>, FirewallError> {
    if !contains(cidr, f.private_ip) {
        return Err(invalid(format!(
            "floating IP {}: {} is not in the network {cidr}",
            f.floating_ip, f.private_ip
        )));
    }
    let mut forwards = f.forwards.clone();
    forwards.sort();
    let mut seen = BTreeSet::new();
    for fw in &forwards {
        if fw.public_port == 0 || fw.private_port == 0 {
            return Err(invalid(format!(
                "floating IP {}: port 0 in a forward",
                f.floating_ip
            )));
        }
        if !seen.insert((fw.protocol, fw.public_port)) {
            return Err(invalid(format!(
                "floating IP {}: {} port {} is forwarded twice",
                f.floating_ip,
                proto(fw.protocol),
                fw.public_port
            )));
        }
    }
    Ok(forwards)
}

/// The script that replaces `table ip keel_nat` of a router namespace. Pure and
/// deterministic (floating IPs and forwards in any order give the same text).
pub fn render_router(nat: &RouterNat) -> Result<String, FirewallError> {
    check_ifname("uplink", &nat.uplink)?;
    let cidr = prefix(&nat.cidr)?;
    let mut floating: Vec<&FloatingNat> = nat.floating.iter().collect();
    floating.sort_by_key(|f| f.floating_ip);
    let mut one_to_one = BTreeSet::new();
    let mut dnat = Vec::new();
    let mut snat = Vec::new();
    for pair in floating.windows(2) {
        if pair[0].floating_ip == pair[1].floating_ip {
            return Err(invalid(format!(
                "floating IP {} appears twice",
                pair[0].floating_ip
            )));
        }
    }
    for f in floating {
        let forwards = checked_forwards(f, &nat.cidr)?;
        let (fip, private) = (f.floating_ip, f.private_ip);
        if forwards.is_empty() {
            if !one_to_one.insert(private) {
                return Err(invalid(format!(
                    "{private} has two 1:1 floating IPs (which one would it send from?)"
                )));
            }
            dnat.push(format!("ip daddr {fip} dnat to {private}"));
            snat.push(format!(
                "oifname \"{}\" ip saddr {private} snat to {fip}",
                nat.uplink
            ));
        }
        for fw in forwards {
            let p = proto(fw.protocol);
            dnat.push(format!(
                "ip daddr {fip} {p} dport {} dnat to {private}:{}",
                fw.public_port, fw.private_port
            ));
        }
    }
    let up = &nat.uplink;
    let mut s = format!(
        "# Keel: address translation of network {} (generated, replaced as a whole).\n",
        nat.vni
    );
    writeln!(
        s,
        "table ip {ROUTER_TABLE} {{}}\ndelete table ip {ROUTER_TABLE}"
    )
    .unwrap();
    writeln!(s, "table ip {ROUTER_TABLE} {{").unwrap();
    writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;"
    )
    .unwrap();
    for line in &dnat {
        writeln!(s, "\t\t{line}").unwrap();
    }
    writeln!(s, "\t}}").unwrap();
    writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;"
    )
    .unwrap();
    for line in &snat {
        writeln!(s, "\t\t{line}").unwrap();
    }
    writeln!(
        s,
        "\t\toifname \"{up}\" ip saddr {cidr} snat to {}",
        nat.uplink_ip
    )
    .unwrap();
    writeln!(
        s,
        "\t\toifname != \"{up}\" ip saddr {cidr} ct status dnat masquerade\n\t}}"
    )
    .unwrap();
    writeln!(
        s,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;"
    )
    .unwrap();
    writeln!(s, "\t\tiifname \"{up}\" oifname \"{up}\" drop\n\t}}").unwrap();
    writeln!(s, "}}").unwrap();
    Ok(s)
}

/// The script that replaces (or, for `None`, removes) `table ip keel_host_nat`.
pub fn render_host(nat: Option<&HostNat>) -> Result<String, FirewallError> {
    let mut s = String::from(
        "# Keel: masquerade of the uplinks' transit addresses (generated, replaced as a whole).\n",
    );
    // Declaring the table first makes its deletion succeed when it does not exist.
    writeln!(
        s,
        "table ip {HOST_TABLE} {{}}\ndelete table ip {HOST_TABLE}"
    )
    .unwrap();
    let Some(nat) = nat else {
        return Ok(s);
    };
    check_ifname("public device", &nat.public_dev)?;
    let transit = prefix(&nat.transit)?;
    writeln!(s, "table ip {HOST_TABLE} {{").unwrap();
    writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;"
    )
    .unwrap();
    writeln!(
        s,
        "\t\toifname \"{}\" ip saddr {transit} masquerade\n\t}}\n}}",
        nat.public_dev
    )
    .unwrap();
    Ok(s)
}

// ---- nf_tables over netlink: two tiny read-only requests -----------------------------

const NFPROTO_IPV4: u8 = 2;

/// What a table looks like: its handle (new for every creation) and use count (chains,
/// sets and objects in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableState {
    handle: u64,
    uses: u32,
}

/// Table `name` of `family` in the calling thread's namespace; `None` when absent.
fn table_state(family: u8, name: &str) -> std::io::Result<Option<TableState>> {
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFTA_TABLE_USE: u16 = 3;
    const NFTA_TABLE_HANDLE: u16 = 4;
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    let attrs = match crate::nf_tables::request(
        NFT_MSG_GETTABLE,
        NFT_MSG_NEWTABLE,
        family,
        &[(NFTA_TABLE_NAME, &cname)],
    ) {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut state = TableState { handle: 0, uses: 0 };
    for (t, v) in attrs {
        match t {
            NFTA_TABLE_USE if v.len() >= 4 => {
                state.uses = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            }
            NFTA_TABLE_HANDLE if v.len() >= 8 => {
                state.handle = u64::from_be_bytes(v[..8].try_into().unwrap_or([0; 8]));
            }
            _ => {}
        }
    }
    Ok(Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::{uplink_addresses, uplink_ns_name, TRANSIT};

    fn cidr(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix_len: l.parse().unwrap(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn router() -> RouterNat {
        RouterNat {
            vni: 4300,
            netns: PathBuf::from("/run/keel/netns/n4300"),
            cidr: cidr("10.90.0.0/24"),
            uplink: uplink_ns_name(4300),
            uplink_ip: uplink_addresses(4300).1,
            floating: vec![
                FloatingNat {
                    floating_ip: ip("203.0.113.11"),
                    private_ip: ip("10.90.0.6"),
                    forwards: vec![
                        Forward {
                            protocol: ForwardProtocol::Udp,
                            public_port: 53,
                            private_port: 5353,
                        },
                        Forward {
                            protocol: ForwardProtocol::Tcp,
                            public_port: 8080,
                            private_port: 80,
                        },
                    ],
                },
                FloatingNat {
                    floating_ip: ip("203.0.113.10"),
                    private_ip: ip("10.90.0.5"),
                    forwards: vec![],
                },
            ],
        }
    }

    #[test]
    fn router_script_is_exact() {
        let (_, r) = uplink_addresses(4300);
        let expected = format!(
            "# Keel: address translation of network 4300 (generated, replaced as a whole).
table ip keel_nat {{}}
delete table ip keel_nat
table ip keel_nat {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr 203.0.113.10 dnat to 10.90.0.5
\t\tip daddr 203.0.113.11 tcp dport 8080 dnat to 10.90.0.6:80
\t\tip daddr 203.0.113.11 udp dport 53 dnat to 10.90.0.6:5353
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"kun4300\" ip saddr 10.90.0.5 snat to 203.0.113.10
\t\toifname \"kun4300\" ip saddr 10.90.0.0/24 snat to {r}
\t\toifname != \"kun4300\" ip saddr 10.90.0.0/24 ct status dnat masquerade
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"kun4300\" oifname \"kun4300\" drop
\t}}
}}
"
        );
        assert_eq!(render_router(&router()).unwrap(), expected);
        assert_eq!(r, ip("100.64.67.50"));
    }

    #[test]
    fn router_script_is_deterministic() {
        let a = router();
        let mut b = router();
        b.floating.reverse();
        b.floating[1].forwards.reverse();
        assert_eq!(render_router(&a).unwrap(), render_router(&b).unwrap());
        // No floating IPs: only the network's own translation.
        let mut plain = router();
        plain.floating.clear();
        let s = render_router(&plain).unwrap();
        assert!(!s.contains("dnat to"), "{s}");
        assert!(
            s.contains("ip saddr 10.90.0.0/24 snat to 100.64.67.50"),
            "{s}"
        );
        // Host bits of the CIDR are cleared.
        plain.cidr = cidr("10.90.0.77/24");
        assert_eq!(render_router(&plain).unwrap(), s);
    }

    #[test]
    fn router_input_is_validated() {
        let bad = |f: &dyn Fn(&mut RouterNat), what: &str| {
            let mut n = router();
            f(&mut n);
            let err = render_router(&n).unwrap_err();
            assert!(
                matches!(&err, FirewallError::Invalid(m) if m.contains(what)),
                "{what}: {err:?}"
            );
        };
        bad(
            &|n| n.uplink = "kun\"; flush ruleset".into(),
            "not a valid link name",
        );
        bad(&|n| n.uplink = String::new(), "not a valid link name");
        bad(
            &|n| n.uplink = "a-very-long-interface".into(),
            "not a valid link name",
        );
        bad(&|n| n.cidr.prefix_len = 33, "longer than 32");
        bad(
            &|n| n.floating[0].private_ip = ip("10.91.0.6"),
            "not in the network",
        );
        bad(
            &|n| n.floating[1].floating_ip = n.floating[0].floating_ip,
            "appears twice",
        );
        bad(
            &|n| {
                let mut again = n.floating[1].clone();
                again.floating_ip = ip("203.0.113.12");
                n.floating.push(again);
            },
            "two 1:1 floating IPs",
        );
        bad(&|n| n.floating[0].forwards[0].public_port = 0, "port 0");
        bad(
            &|n| {
                let mut twice = n.floating[0].forwards[1];
                twice.private_port = 81;
                n.floating[0].forwards.push(twice);
            },
            "forwarded twice",
        );
        // The same public port over TCP and UDP is fine.
        let mut n = router();
        n.floating[0].forwards.push(Forward {
            protocol: ForwardProtocol::Tcp,
            public_port: 53,
            private_port: 53,
        });
        assert!(render_router(&n).is_ok());
    }

    #[test]
    fn host_script() {
        let nat = HostNat {
            public_dev: "eth0".into(),
            transit: Cidr {
                addr: TRANSIT.0,
                prefix_len: TRANSIT.1,
            },
        };
        assert_eq!(
            render_host(Some(&nat)).unwrap(),
            "# Keel: masquerade of the uplinks' transit addresses (generated, replaced as a whole).
table ip keel_host_nat {}
delete table ip keel_host_nat
table ip keel_host_nat {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"eth0\" ip saddr 100.64.0.0/10 masquerade
\t}
}
"
        );
        let none = render_host(None).unwrap();
        assert!(
            none.ends_with("table ip keel_host_nat {}\ndelete table ip keel_host_nat\n"),
            "{none}"
        );
        let mut bad = nat.clone();
        bad.public_dev = "eth0 *".into();
        assert!(matches!(
            render_host(Some(&bad)),
            Err(FirewallError::Invalid(_))
        ));
        // Names the firewall accepts (bridges, VLANs) are fine.
        bad.public_dev = "br-ext.7".into();
        assert!(render_host(Some(&bad)).is_ok());
    }

    #[test]
    fn missing_router_namespace_fails_before_nft() {
        let nat = NftNat::new(PathBuf::from("/nonexistent/nft"));
        let mut r = router();
        r.netns = PathBuf::from("/nonexistent/netns/n4300");
        let err = nat.apply_router(&r).unwrap_err();
        assert!(
            matches!(&err, FirewallError::Spawn(e) if e.to_string().contains("router namespace")),
            "{err:?}"
        );
    }
}
