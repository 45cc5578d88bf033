//! The uplink of the netlink adapter and the nftables NAT adapter
//! (`keel_adapters::nat::nft::NftNat`) against real packets: three namespace hosts of
//! a [`TestNet`] on one bridge (10.213.S.0/24), hosts 0 and 1 running an external network
//! 4300 (10.90.0.0/24, gateway 10.90.0.1) with their `eth0` as public device, host 2
//! standing in for the outside world (a plain namespace with `eth0` 10.213.S.3), and
//! stand-in VMs (namespaces with a veth on the network's bridge, default route via the
//! gateway):
//!
//! ```text
//!  host 0 (10.213.S.1)                                        outside: host 2 (10.213.S.3)
//!  eth0 ── kuh4300 ═ kun4300 [router n4300: NAT] ── kbr4300 ── VM a 10.90.0.5, VM a2 .7
//!   │  └── kuh4301 ═ kun4301 [router n4301: NAT] ── kbr4301 ── VM c 10.90.0.5
//!   │ proxy ARP for the floating IPs 10.213.S.100 (4300), .101 (4301)
//!  host 1 (10.213.S.2): 4300 too (VXLAN to host 0), VM b 10.90.0.6, no floating IP
//! ```
//!
//! Addresses seen by the outside are read from TCP listeners (a socket bound inside a
//! namespace keeps belonging to it): SNAT gives the host's `eth0` address, a 1:1 floating
//! IP its own. The gateway isolation that the firewall provides in production is stood in
//! for by one bridge rule per host, as in `netlink_adapter`; nothing else filters.
//!
//! One test walks through:
//! * uplink links as configured (addresses, MTU, default route, forwarding, the floating
//!   IP's route and proxy entry marked with Keel's protocol); a second `ensure` and a
//!   second `apply_*` change nothing;
//! * SNAT: VMs on both hosts reach the outside, seen as their own host;
//! * 1:1: the outside reaches the VM on the floating IP (TCP, ICMP), the VM is seen as it;
//!   a VM on the other host and one beside it (hairpin) reach it too;
//! * port forwarding: 8080 → 80 reaches the VM, port 80 of the floating IP does not; the
//!   VM is seen as its host again;
//! * the floating IP moves to a VM on host 1 and back: the outside's ARP entry follows
//!   each move at once (gratuitous ARP), with no flush and no traffic from the outside;
//! * the floating IP dropped: ARP for it goes unanswered, its route and proxy entry are
//!   gone, SNAT still works;
//! * network 4301 with the same CIDR and a VM with the same address on host 0: both reach
//!   the outside at the same time, each with its own translation; a `kuh` device deleted
//!   behind the adapter's back loses its proxy entry at the next `ensure` of any network
//!   and gets everything back at its own;
//! * no uplink: `kuh`/`kun` gone, the VM is cut off; `remove` and an empty host state
//!   leave nothing behind.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_adapters::firewall::Cidr;
use keel_adapters::links::netlink::{Netlink, KEEL_RTPROT};
use keel_adapters::links::{
    uplink_addresses, uplink_host_name, uplink_ns_name, Links, NetworkLinks, Uplink, TRANSIT,
};
use keel_adapters::nat::nft::NftNat;
use keel_adapters::nat::{FloatingNat, Forward, ForwardProtocol, HostNat, Nat, RouterNat};
use keel_tests::cmd::{run, which};
use keel_tests::standin::{self, in_netns, StandIn, StandInSpec};
use keel_tests::wait::{millis, secs, wait_until_blocking};
use keel_tests::TestNet;

use super::{in_router, network_links, unmount_routers};
use serde_json::Value;

const NET: u32 = 4300;
const NET2: u32 = 4301;
const MTU: u32 = 1450;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
const CIDR: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 90, 0, 0),
    prefix_len: 24,
};
/// The outside host.
const OUTSIDE: usize = 2;
/// The port the outside listens on.
const OUTSIDE_PORT: u16 = 7000;

fn skipped() -> bool {
    match keel_tests::skip_reason_with(&["ping", "nsenter"]) {
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            true
        }
        None => false,
    }
}

fn nft_binary() -> PathBuf {
    which("nft").unwrap_or_else(|| PathBuf::from("/usr/sbin/nft"))
}

/// A VM stand-in: its namespace and address.
#[derive(Debug, Clone)]
struct Vm {
    ns: String,
    ip: Ipv4Addr,
}

impl Vm {
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }
}

struct Lab {
    net: TestNet,
    /// `<dir>/h<h>`: host h's router namespaces.
    dir: tempfile::TempDir,
    links: Vec<Netlink>,
    nat: Vec<NftNat>,
    vms: Vec<StandIn>,
}

impl Lab {
    fn new() -> Result<Self> {
        let net = TestNet::new(3)?;
        let dir = tempfile::Builder::new().prefix("keel-nat-").tempdir()?;
        let links = (0..2)
            .map(|h| Netlink::new(dir.path().join(format!("h{h}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let nat = (0..2).map(|_| NftNat::new(nft_binary())).collect();
        Ok(Lab {
            net,
            dir,
            links,
            nat,
            vms: Vec::new(),
        })
    }

    fn ns(&self, h: usize) -> String {
        self.net.ns(h)
    }

    /// The floating IPs: 10.213.S.100 + i.
    fn fip(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.net.subnet(), 100 + i)
    }

    fn outside(&self) -> Ipv4Addr {
        self.net.ip(OUTSIDE)
    }

    /// Runs `f` inside host `h`'s namespace.
    fn on<T: Send>(&self, h: usize, f: impl FnOnce() -> T + Send) -> T {
        self.net
            .in_host(h, f)
            .unwrap_or_else(|e| panic!("enter host {h}: {e}"))
    }

    /// Network `vni` on host `h`: peers `peers`, an uplink on `eth0` with `fips` unless
    /// `uplink` is false.
    fn spec(
        &self,
        vni: u32,
        h: usize,
        peers: &[usize],
        uplink: Option<&[Ipv4Addr]>,
    ) -> NetworkLinks {
        NetworkLinks {
            uplink: uplink.map(|fips| Uplink {
                public_dev: "eth0".into(),
                floating_ips: fips.iter().copied().collect(),
            }),
            ..network_links(&self.net, h, vni, MTU, peers, GATEWAY)
        }
    }

    fn ensure(&self, h: usize, spec: &NetworkLinks) -> Result<()> {
        let links = &self.links[h];
        self.on(h, || links.ensure(spec))
            .with_context(|| format!("ensure network {} on host {h}", spec.vni))
    }

    fn router_nat(&self, h: usize, vni: u32, floating: Vec<FloatingNat>) -> RouterNat {
        RouterNat {
            vni,
            netns: self.links[h].router_netns(vni),
            cidr: CIDR,
            uplink: uplink_ns_name(vni),
            uplink_ip: uplink_addresses(vni).1,
            floating,
        }
    }

    fn apply_router(&self, h: usize, nat: &RouterNat) -> Result<()> {
        let n = &self.nat[h];
        self.on(h, || n.apply_router(nat))
            .with_context(|| format!("NAT of network {} on host {h}", nat.vni))
    }

    fn apply_host(&self, h: usize, on: bool) -> Result<()> {
        let nat = HostNat {
            public_dev: "eth0".into(),
            transit: Cidr {
                addr: TRANSIT.0,
                prefix_len: TRANSIT.1,
            },
        };
        let n = &self.nat[h];
        self.on(h, || n.apply_host(on.then_some(&nat)))
            .with_context(|| format!("host NAT on host {h}"))
    }

    /// The MAC of `dev` in host `h`.
    fn mac(&self, h: usize, dev: &str) -> Result<String> {
        let out = self.host(h, "ip", &["-j", "link", "show", "dev", dev])?;
        let v: Value = serde_json::from_str(&out)?;
        v[0]["address"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no address for {dev} in host {h}: {out}"))
    }

    /// The MAC the outside's ARP cache holds for `ip`, if any.
    fn outside_lladdr(&self, ip: Ipv4Addr) -> Result<Option<String>> {
        let out = self.host(OUTSIDE, "ip", &["-j", "neigh", "show", &ip.to_string()])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v[0]["lladdr"].as_str().map(str::to_string))
    }

    /// Waits until the outside's ARP entry for `ip` names `mac`, with no traffic from it.
    fn wait_lladdr(&self, ip: Ipv4Addr, mac: &str) -> Result<()> {
        wait_until_blocking(
            format!("the outside's ARP entry for {ip} names {mac}"),
            secs(5),
            millis(50),
            || {
                let now = self.outside_lladdr(ip)?;
                if now.as_deref() == Some(mac) {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("entry: {now:?}"))
                }
            },
        )?;
        Ok(())
    }

    /// Runs `program args…` in host `h`.
    fn host(&self, h: usize, program: &str, args: &[&str]) -> Result<String> {
        Ok(self.net.exec(h, program, args)?)
    }

    /// Runs `program args…` inside the router namespace of `vni` on host `h`.
    fn router(&self, h: usize, vni: u32, program: &str, args: &[&str]) -> Result<String> {
        in_router(&self.links[h], vni, program, args)
    }

    /// `ip -j -d link show dev NAME` where `ip` runs via `exec`; `None` when absent.
    fn link_json(out: Result<String>) -> Result<Option<Value>> {
        match out {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text)?;
                Ok(v.as_array().and_then(|a| a.first()).cloned())
            }
            Err(e) if format!("{e:#}").contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn host_link(&self, h: usize, name: &str) -> Result<Option<Value>> {
        Self::link_json(self.host(h, "ip", &["-j", "-d", "addr", "show", "dev", name]))
    }

    fn router_link(&self, h: usize, vni: u32, name: &str) -> Result<Option<Value>> {
        Self::link_json(self.router(h, vni, "ip", &["-j", "-d", "addr", "show", "dev", name]))
    }

    /// The stand-in for the firewall's gateway isolation in hosts 0 and 1.
    fn isolate_gateways(&self) -> Result<()> {
        standin::isolate_gateways(&self.net, 0..2)
    }

    /// A VM on network `vni` of host `h` with address 10.90.0.`last`.
    fn add_vm(&mut self, h: usize, vni: u32, last: u8) -> Result<Vm> {
        let vm = StandIn::create(
            &self.net,
            &StandInSpec {
                slot: 900 + self.vms.len(),
                host: Some(h),
                port: &format!("vm{}x{}", vni, self.vms.len() + 1),
                bridge: &format!("kbr{vni}"),
                mac: None,
                mtu: Some(MTU),
                addr: Ipv4Addr::new(10, 90, 0, last),
                prefix_len: 24,
                gateway: Some(GATEWAY),
                no_ipv6: false,
            },
        )?;
        let handle = Vm {
            ns: vm.ns().to_string(),
            ip: vm.ip(),
        };
        self.vms.push(vm);
        Ok(handle)
    }

    /// A listener on `port` inside the namespace at `path`.
    fn listen(path: &Path, port: u16) -> Result<TcpListener> {
        let l = in_netns(path, || TcpListener::bind(("0.0.0.0", port)))??;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    fn outside_listener(&self) -> Result<TcpListener> {
        Self::listen(
            &PathBuf::from("/run/netns").join(self.ns(OUTSIDE)),
            OUTSIDE_PORT,
        )
    }

    /// Connects from the namespace at `from` to `to` until it works (and `listener`
    /// accepts it); returns the address the listener saw. Keeps the connection open
    /// until `hold` is dropped, when given.
    fn reach(
        from: &Path,
        to: SocketAddr,
        listener: &TcpListener,
        hold: Option<&mut Vec<TcpStream>>,
    ) -> Result<Ipv4Addr> {
        drain(listener);
        let stream = wait_until_blocking(
            format!("a connection from {} to {to}", from.display()),
            secs(20),
            millis(200),
            || {
                Ok(Some(in_netns(from, || {
                    TcpStream::connect_timeout(&to, secs(2))
                })??))
            },
        )?;
        let (conn, peer) = wait_until_blocking(
            format!("{to} to accept the connection"),
            secs(5),
            millis(20),
            || match listener.accept() {
                Ok(c) => Ok(Some(c)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e.into()),
            },
        )?;
        drop(conn);
        if let Some(hold) = hold {
            hold.push(stream);
        }
        match peer {
            SocketAddr::V4(v4) => Ok(*v4.ip()),
            SocketAddr::V6(v6) => Err(anyhow!("an IPv6 peer {v6}")),
        }
    }

    /// Asserts that a connection from the namespace at `from` to `to` fails (2 s), and
    /// that `listener` got nothing.
    fn assert_unreachable(from: &Path, to: SocketAddr, listener: &TcpListener) -> Result<()> {
        drain(listener);
        let r = in_netns(from, || TcpStream::connect_timeout(&to, secs(2)))?;
        ensure!(
            r.is_err(),
            "{} reached {to}, which it must not",
            from.display()
        );
        match listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            Ok((_, peer)) => bail!("{to}'s listener accepted {peer}"),
            Err(e) => Err(e.into()),
        }
    }

    fn outside_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(OUTSIDE))
    }

    fn to_outside(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.outside(), OUTSIDE_PORT))
    }

    /// One echo from namespace `ns` to `ip`: whether it was answered.
    fn ping(ns: &str, ip: Ipv4Addr) -> Result<bool> {
        standin::ping(ns, ip, 1)
    }

    fn wait_ping(ns: &str, ip: Ipv4Addr) -> Result<()> {
        standin::wait_ping(ns, ip)
    }

    /// Host `h`'s routes into uplinks: "DST via GW dev DEV proto P".
    fn uplink_routes(&self, h: usize) -> Result<BTreeSet<String>> {
        let v: Value = serde_json::from_str(&self.host(h, "ip", &["-j", "route", "show"])?)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["dev"].as_str().is_some_and(|d| d.starts_with("kuh")))
            .filter(|r| r["gateway"].is_string())
            .map(|r| {
                format!(
                    "{} via {} dev {} proto {}",
                    r["dst"].as_str().unwrap_or("?"),
                    r["gateway"].as_str().unwrap_or("?"),
                    r["dev"].as_str().unwrap_or("?"),
                    r["protocol"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| r["protocol"].to_string())
                )
            })
            .collect())
    }

    /// Host `h`'s proxy neighbour entries: "IP dev DEV".
    fn proxies(&self, h: usize) -> Result<BTreeSet<String>> {
        let out = self.host(h, "ip", &["neigh", "show", "proxy"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let dev = w.iter().position(|x| *x == "dev")?;
                Some(format!("{} dev {}", w.first()?, w.get(dev + 1)?))
            })
            .collect())
    }

    fn sysctl(out: Result<String>) -> Result<String> {
        Ok(out?.trim().to_string())
    }

    /// The handle of an nft table (changes whenever the table is created anew).
    fn table_handle(out: Result<String>) -> Result<Option<u64>> {
        let Ok(text) = out else { return Ok(None) };
        let v: Value = serde_json::from_str(&text)?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["table"]["handle"].as_u64()))
    }

    fn host_table(&self, h: usize) -> Result<Option<u64>> {
        Self::table_handle(self.host(
            h,
            "nft",
            &["-j", "-a", "list", "table", "ip", "keel_host_nat"],
        ))
    }

    fn router_table(&self, h: usize, vni: u32) -> Result<Option<u64>> {
        Self::table_handle(self.router(
            h,
            vni,
            "nft",
            &["-j", "-a", "list", "table", "ip", "keel_nat"],
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.vms.clear();
        unmount_routers(self.dir.path(), self.links.len());
    }
}

/// Accepts and drops whatever waits in `listener`'s queue.
fn drain(listener: &TcpListener) {
    while listener.accept().is_ok() {}
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn one_to_one(fip: Ipv4Addr, private: Ipv4Addr) -> FloatingNat {
    FloatingNat {
        floating_ip: fip,
        private_ip: private,
        forwards: vec![],
    }
}

/// The address (CIDR notation) of `link` (an `ip -j addr` object), IPv4 only.
fn addrs(link: &Value) -> Vec<String> {
    link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect()
}

#[test]
fn uplinks_snat_floating_ips_and_port_forwards() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let (ip0, ip1) = (lab.net.ip(0), lab.net.ip(1));
    let (fip, fip2) = (lab.fip(0), lab.fip(1));
    let outside_path = lab.outside_path();
    let outside_ns = lab.ns(OUTSIDE);
    let (host_end, router_end) = uplink_addresses(NET);

    // Network 4300 on hosts 0 and 1 with uplinks, no floating IP yet.
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[])))?;
    lab.ensure(1, &lab.spec(NET, 1, &[0], Some(&[])))?;
    lab.isolate_gateways()?;
    let vm_a = lab.add_vm(0, NET, 5)?;
    let vm_b = lab.add_vm(1, NET, 6)?;
    for h in 0..2 {
        lab.apply_router(h, &lab.router_nat(h, NET, vec![]))?;
        lab.apply_host(h, true)?;
    }

    // The uplink as configured.
    let kuh = lab
        .host_link(0, "kuh4300")?
        .ok_or_else(|| anyhow!("host 0 has no kuh4300"))?;
    assert_eq!(addrs(&kuh), vec![format!("{host_end}/30")], "{kuh}");
    assert_eq!(kuh["mtu"], MTU, "{kuh}");
    assert_eq!(kuh["linkinfo"]["info_kind"], "veth", "{kuh}");
    let kun = lab
        .router_link(0, NET, "kun4300")?
        .ok_or_else(|| anyhow!("router 4300 of host 0 has no kun4300"))?;
    assert_eq!(addrs(&kun), vec![format!("{router_end}/30")], "{kun}");
    assert_eq!(kun["mtu"], MTU, "{kun}");
    assert!(kun["flags"]
        .as_array()
        .is_some_and(|f| f.contains(&"UP".into())));
    let default = lab.router(0, NET, "ip", &["route", "show", "default"])?;
    assert_eq!(
        default.trim(),
        format!("default via {host_end} dev kun4300 proto static"),
        "{default}"
    );
    assert_eq!(
        Lab::sysctl(lab.router(0, NET, "cat", &["/proc/sys/net/ipv4/ip_forward"]))?,
        "1"
    );
    for dev in ["eth0", "kuh4300"] {
        let path = format!("/proc/sys/net/ipv4/conf/{dev}/forwarding");
        assert_eq!(Lab::sysctl(lab.host(0, "cat", &[&path]))?, "1", "{path}");
    }
    // Only the devices that need it forward: not the host as a whole.
    assert_eq!(
        Lab::sysctl(lab.host(0, "cat", &["/proc/sys/net/ipv4/conf/lo/forwarding"]))?,
        Lab::sysctl(lab.host(0, "cat", &["/proc/sys/net/ipv4/conf/default/forwarding"]))?,
    );
    assert!(lab.uplink_routes(0)?.is_empty());
    assert!(lab.proxies(0)?.is_empty());
    eprintln!("uplink 4300 on host 0: {host_end}/30 ⇄ {router_end}/30, MTU {MTU}, forwarding");

    // (a) SNAT: VMs on both hosts reach the outside, each seen as its own host.
    let outside = lab.outside_listener()?;
    Lab::wait_ping(&vm_a.ns, lab.outside())?;
    let seen = Lab::reach(&vm_a.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, ip0, "VM a on host 0 seen as");
    let seen = Lab::reach(&vm_b.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, ip1, "VM b on host 1 seen as");
    eprintln!("SNAT: VM a seen as {ip0}, VM b as {ip1}");

    // (b) A 1:1 floating IP for VM a.
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[fip])))?;
    let nat_1to1 = lab.router_nat(0, NET, vec![one_to_one(fip, vm_a.ip)]);
    lab.apply_router(0, &nat_1to1)?;
    assert_eq!(
        lab.uplink_routes(0)?,
        BTreeSet::from([format!(
            "{fip} via {router_end} dev kuh4300 proto {KEEL_RTPROT}"
        )])
    );
    assert_eq!(lab.proxies(0)?, BTreeSet::from([format!("{fip} dev eth0")]));
    assert!(lab.uplink_routes(1)?.is_empty() && lab.proxies(1)?.is_empty());

    // A second ensure and second applies change nothing.
    let index = |lab: &Lab| -> Result<(Value, Value)> {
        let kuh = lab.host_link(0, "kuh4300")?.unwrap_or_default();
        let kun = lab.router_link(0, NET, "kun4300")?.unwrap_or_default();
        Ok((kuh["ifindex"].clone(), kun["ifindex"].clone()))
    };
    let before = (
        index(&lab)?,
        lab.router_table(0, NET)?,
        lab.host_table(0)?,
        lab.uplink_routes(0)?,
        lab.proxies(0)?,
    );
    assert!(before.1.is_some() && before.2.is_some());
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[fip])))?;
    lab.apply_router(0, &nat_1to1)?;
    lab.apply_host(0, true)?;
    let after = (
        index(&lab)?,
        lab.router_table(0, NET)?,
        lab.host_table(0)?,
        lab.uplink_routes(0)?,
        lab.proxies(0)?,
    );
    assert_eq!(after, before, "a second ensure/apply changed something");

    let vm_a_80 = Lab::listen(&vm_a.path(), 80)?;
    let seen = Lab::reach(&outside_path, sock(fip, 80), &vm_a_80, None)?;
    assert_eq!(seen, lab.outside(), "the outside seen by VM a as");
    Lab::wait_ping(&outside_ns, fip)?;
    let seen = Lab::reach(&vm_a.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, fip, "VM a (1:1) seen as");
    // VM b on host 1 reaches VM a's floating IP through both uplinks.
    let seen = Lab::reach(&vm_b.path(), sock(fip, 80), &vm_a_80, None)?;
    assert_eq!(seen, ip1, "VM b seen by VM a (through host 1's SNAT) as");
    // A VM beside VM a reaches it through the floating IP too (hairpin), seen as the
    // gateway.
    let vm_a2 = lab.add_vm(0, NET, 7)?;
    let seen = Lab::reach(&vm_a2.path(), sock(fip, 80), &vm_a_80, None)?;
    assert_eq!(seen, GATEWAY, "VM a2 seen by VM a (hairpin) as");
    eprintln!("1:1: {fip} reaches VM a (TCP, ICMP), VM a sends as {fip}; hairpin and from host 1");

    // (c) Port forwarding only: 8080 → 80.
    let forwards = lab.router_nat(
        0,
        NET,
        vec![FloatingNat {
            floating_ip: fip,
            private_ip: vm_a.ip,
            forwards: vec![Forward {
                protocol: ForwardProtocol::Tcp,
                public_port: 8080,
                private_port: 80,
            }],
        }],
    );
    lab.apply_router(0, &forwards)?;
    let seen = Lab::reach(&outside_path, sock(fip, 8080), &vm_a_80, None)?;
    assert_eq!(seen, lab.outside());
    let vm_a_81 = Lab::listen(&vm_a.path(), 81)?;
    Lab::assert_unreachable(&outside_path, sock(fip, 80), &vm_a_80)?;
    Lab::assert_unreachable(&outside_path, sock(fip, 81), &vm_a_81)?;
    ensure!(
        !Lab::ping(&outside_ns, fip)?,
        "{fip} answers pings with forwards only"
    );
    let seen = Lab::reach(&vm_a.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, ip0, "VM a (forwards only) seen as");
    let seen = Lab::reach(&vm_a2.path(), sock(fip, 8080), &vm_a_80, None)?;
    assert_eq!(
        seen, GATEWAY,
        "VM a2 seen by VM a (hairpin, forwarded port) as"
    );
    eprintln!("forwards: {fip}:8080 reaches VM a:80, {fip}:80/81 do not; VM a sends as {ip0}");

    // (c') The floating IP moves to VM b on host 1 (a migration, an HA restart) and back.
    // The outside's ARP entry for it names host 0; host 1 announces the address
    // (gratuitous ARP), so the entry follows at once, with no flush and no traffic from
    // the outside, where it would otherwise wait for the entry to expire.
    let mac0 = lab.mac(0, "eth0")?;
    let mac1 = lab.mac(1, "eth0")?;
    ensure!(
        lab.outside_lladdr(fip)?.as_deref() == Some(mac0.as_str()),
        "the outside has no entry for {fip} at host 0 ({mac0}): {:?}",
        lab.outside_lladdr(fip)?
    );
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[])))?;
    lab.apply_router(0, &lab.router_nat(0, NET, vec![]))?;
    lab.ensure(1, &lab.spec(NET, 1, &[0], Some(&[fip])))?;
    lab.apply_router(1, &lab.router_nat(1, NET, vec![one_to_one(fip, vm_b.ip)]))?;
    lab.wait_lladdr(fip, &mac1)?;
    let vm_b_80 = Lab::listen(&vm_b.path(), 80)?;
    let seen = Lab::reach(&outside_path, sock(fip, 80), &vm_b_80, None)?;
    assert_eq!(seen, lab.outside(), "the outside seen by VM b as");
    lab.ensure(1, &lab.spec(NET, 1, &[0], Some(&[])))?;
    lab.apply_router(1, &lab.router_nat(1, NET, vec![]))?;
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[fip])))?;
    lab.apply_router(0, &forwards)?;
    lab.wait_lladdr(fip, &mac0)?;
    let seen = Lab::reach(&outside_path, sock(fip, 8080), &vm_a_80, None)?;
    assert_eq!(seen, lab.outside());
    eprintln!("{fip} moved to host 1 and back: the outside's ARP entry followed each move at once");

    // (d) The floating IP dropped: no answer for it any more, SNAT goes on.
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[])))?;
    lab.apply_router(0, &lab.router_nat(0, NET, vec![]))?;
    assert!(lab.uplink_routes(0)?.is_empty());
    assert!(lab.proxies(0)?.is_empty());
    run("ip", &["-n", &outside_ns, "neigh", "flush", "all"])?;
    Lab::assert_unreachable(&outside_path, sock(fip, 8080), &vm_a_80)?;
    let neigh = lab.host(OUTSIDE, "ip", &["neigh", "show", &fip.to_string()])?;
    ensure!(
        !neigh.contains("lladdr"),
        "somebody answered ARP for {fip}: {neigh}"
    );
    let seen = Lab::reach(&vm_a.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, ip0);
    eprintln!("{fip} dropped: ARP unanswered, route and proxy entry gone, SNAT still works");

    // Network 4301: the same CIDR on host 0, a VM with the same address, its own floating
    // IP; both networks reach the outside at once.
    lab.ensure(0, &lab.spec(NET2, 0, &[], Some(&[fip2])))?;
    let vm_c = lab.add_vm(0, NET2, 5)?;
    let nat2 = lab.router_nat(0, NET2, vec![one_to_one(fip2, vm_c.ip)]);
    lab.apply_router(0, &nat2)?;
    assert_eq!(vm_c.ip, vm_a.ip);
    let mut held = Vec::new();
    let seen_a = Lab::reach(&vm_a.path(), lab.to_outside(), &outside, Some(&mut held))?;
    let seen_c = Lab::reach(&vm_c.path(), lab.to_outside(), &outside, Some(&mut held))?;
    assert_eq!((seen_a, seen_c), (ip0, fip2));
    // Both connections are still up, each through its own uplink.
    for s in &mut held {
        use std::io::Write;
        s.write_all(b"x")?;
    }
    drop(held);
    let vm_c_80 = Lab::listen(&vm_c.path(), 80)?;
    let seen = Lab::reach(&outside_path, sock(fip2, 80), &vm_c_80, None)?;
    assert_eq!(seen, lab.outside());
    let (_, r2) = uplink_addresses(NET2);
    assert_eq!(
        lab.uplink_routes(0)?,
        BTreeSet::from([format!("{fip2} via {r2} dev kuh4301 proto {KEEL_RTPROT}")])
    );
    eprintln!("4301 (same CIDR, same VM address) beside 4300: seen as {fip2} and {ip0}");

    // kuh4301 deleted behind the adapter's back: its route goes with it, and the next
    // ensure of any network drops the orphaned proxy entry; 4301's own ensure repairs.
    lab.host(0, "ip", &["link", "del", &uplink_host_name(NET2)])?;
    assert_eq!(
        lab.proxies(0)?,
        BTreeSet::from([format!("{fip2} dev eth0")])
    );
    lab.ensure(0, &lab.spec(NET, 0, &[1], Some(&[])))?;
    assert!(lab.proxies(0)?.is_empty(), "{:?}", lab.proxies(0)?);
    lab.ensure(0, &lab.spec(NET2, 0, &[], Some(&[fip2])))?;
    assert_eq!(
        lab.proxies(0)?,
        BTreeSet::from([format!("{fip2} dev eth0")])
    );
    assert!(lab.router_link(0, NET2, "kun4301")?.is_some());
    let seen = Lab::reach(&outside_path, sock(fip2, 80), &vm_c_80, None)?;
    assert_eq!(seen, lab.outside());
    eprintln!("a deleted kuh4301: proxy entry swept by another network's ensure, repaired");

    // An nft table deleted behind the adapter's back is loaded again.
    lab.host(0, "nft", &["delete", "table", "ip", "keel_host_nat"])?;
    lab.apply_host(0, true)?;
    ensure!(
        lab.host_table(0)?.is_some(),
        "keel_host_nat was not restored"
    );
    lab.router(0, NET2, "nft", &["flush", "table", "ip", "keel_nat"])?;
    lab.apply_router(0, &nat2)?;
    let seen = Lab::reach(&vm_c.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, fip2, "after restoring the router table");

    // (e) No uplink for 4300: its veth pair is gone and VM a is cut off; 4301 goes on.
    lab.ensure(0, &lab.spec(NET, 0, &[1], None))?;
    ensure!(
        lab.host_link(0, "kuh4300")?.is_none(),
        "kuh4300 is still there"
    );
    ensure!(
        lab.router_link(0, NET, "kun4300")?.is_none(),
        "kun4300 is still there"
    );
    assert_eq!(
        Lab::sysctl(lab.router(0, NET, "cat", &["/proc/sys/net/ipv4/ip_forward"]))?,
        "0"
    );
    Lab::assert_unreachable(&vm_a.path(), lab.to_outside(), &outside)?;
    ensure!(
        !Lab::ping(&vm_a.ns, lab.outside())?,
        "VM a still pings the outside"
    );
    let seen = Lab::reach(&vm_c.path(), lab.to_outside(), &outside, None)?;
    assert_eq!(seen, fip2);
    // VM a still reaches VM b over VXLAN.
    Lab::wait_ping(&vm_a.ns, vm_b.ip)?;
    eprintln!("4300 without uplink: kuh4300/kun4300 gone, VM a cut off, 4301 unaffected");

    // remove and an empty host state leave nothing.
    let links = &lab.links[0];
    lab.on(0, || links.remove(NET2))?;
    ensure!(lab.host_link(0, "kuh4301")?.is_none());
    assert!(lab.uplink_routes(0)?.is_empty());
    assert!(lab.proxies(0)?.is_empty());
    lab.on(0, || links.remove(NET))?;
    lab.apply_host(0, false)?;
    ensure!(lab.host_table(0)?.is_none(), "keel_host_nat is still there");
    lab.apply_host(0, false)?;
    eprintln!("remove and apply_host(None) leave nothing behind");
    Ok(())
}
