//! The netlink adapter (`keel_adapters::links::netlink::Netlink`) against real links: three
//! namespace hosts of a [`TestNet`] (underlay `eth0` 10.213.S.i), one `Netlink` per host
//! running inside that host's namespace ([`TestNet::in_host`]; the test process's own
//! namespace never gets a guest-network link), and stand-in VMs:
//!
//! ```text
//!  host namespace kn<run>-<h>                              VM namespace kn<run>-<9hv>
//!  kbr<V> ── kvx<V> (VXLAN to the other hosts' eth0)
//!    ├── kgh<V> ═══ kgn<V> 10.77.0.1 in <dir>/h<h>/n<V>
//!    └── vm<V> ═══════════════════════════════════════════ eth0 10.77.0.x/24
//! ```
//!
//! A VM is a namespace of its own with a veth whose host end is a port of the bridge (as
//! libvirt's tap would be). VM namespaces are named like the harness's hosts (`kn<run>-N`,
//! N ≥ 900), so a run killed with SIGKILL leaves nothing the next run's stale cleanup
//! misses. The gateway isolation that the firewall adapter provides in production (no
//! frame between a bridge's gateway port and its VXLAN device: every host answers for the
//! same gateway address and MAC) is stood in for by one nftables rule per host.
//!
//! One test walks the life of two networks with the same CIDR:
//! * VMs on three hosts reach each other across VXLAN, and each reaches the gateway,
//!   answered by its own host's router namespace (ICMP counters of every router
//!   namespace); MTU 1450 on bridge, VXLAN and veth; `list` reads peers and ports back;
//! * a second `ensure` changes nothing (link indexes, FDB); changed peers and remote MACs
//!   change only the FDB (`bridge fdb show`); a deleted VXLAN device and a deleted veth
//!   pair are recreated and traffic flows again; a missing underlay fails; a VM's tap
//!   that is down with no bridge (libvirt plugging it) is left alone, one that lost its
//!   bridge is put back;
//! * network 4243 (same 10.77.0.0/24) works beside 4242 and cannot reach its VMs;
//! * `remove` leaves no link and no namespace file; a second `remove` succeeds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_adapters::links::netlink::Netlink;
use keel_adapters::links::{
    gateway_mac, LinkError, Links, MacAddr, NetworkLinks, NetworkLinksState,
};
use keel_tests::cmd::run;

use super::{in_router, network_links, unmount_routers};
use keel_tests::standin::{self, StandIn, StandInSpec};
use keel_tests::TestNet;
use serde_json::Value;

const NET_A: u32 = 4242;
const NET_B: u32 = 4243;
const MTU: u32 = 1450;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn skipped() -> bool {
    match keel_tests::skip_reason_with(&["ping", "nsenter", "bridge"]) {
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            true
        }
        None => false,
    }
}

/// A VM stand-in: its namespace and its address.
#[derive(Debug, Clone)]
struct Vm {
    ns: String,
    ip: Ipv4Addr,
    mac: MacAddr,
}

struct Lab {
    net: TestNet,
    /// `<dir>/h<h>`: host h's router namespaces.
    dir: tempfile::TempDir,
    links: Vec<Netlink>,
    vms: Vec<StandIn>,
}

impl Lab {
    fn new(hosts: usize) -> Result<Self> {
        let net = TestNet::new(hosts)?;
        let dir = tempfile::Builder::new().prefix("keel-netlink-").tempdir()?;
        let links = (0..hosts)
            .map(|h| Netlink::new(dir.path().join(format!("h{h}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Lab {
            net,
            dir,
            links,
            vms: Vec::new(),
        })
    }

    fn ns(&self, h: usize) -> String {
        self.net.ns(h)
    }

    /// Runs `f` with host `h`'s adapter, inside host `h`'s namespace.
    fn on<T: Send>(&self, h: usize, f: impl FnOnce(&Netlink) -> T + Send) -> T {
        let links = &self.links[h];
        self.net
            .in_host(h, || f(links))
            .unwrap_or_else(|e| panic!("enter host {h}: {e}"))
    }

    fn ensure(&self, h: usize, spec: &NetworkLinks) -> Result<()> {
        self.on(h, |l| l.ensure(spec))
            .with_context(|| format!("ensure network {} on host {h}", spec.vni))
    }

    fn list(&self, h: usize) -> Result<Vec<NetworkLinksState>> {
        Ok(self.on(h, |l| l.list())?)
    }

    /// Network `vni` on host `h` with the given hosts as peers.
    fn spec(&self, vni: u32, h: usize, peers: &[usize]) -> NetworkLinks {
        network_links(&self.net, h, vni, MTU, peers, GATEWAY)
    }

    /// Every other host of `hosts`.
    fn others(h: usize, hosts: &[usize]) -> Vec<usize> {
        hosts.iter().copied().filter(|&o| o != h).collect()
    }

    /// `ip -j -d link show dev NAME` in host `h`; `None` when the link does not exist.
    fn link(&self, h: usize, name: &str) -> Result<Option<Value>> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.ns(h), "-j", "-d", "link", "show", "dev", name])
            .output()
            .context("start ip")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("does not exist") {
                return Ok(None);
            }
            bail!("ip link show {name} in host {h}: {err}");
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array().and_then(|a| a.first()).cloned())
    }

    fn must_link(&self, h: usize, name: &str) -> Result<Value> {
        self.link(h, name)?
            .ok_or_else(|| anyhow!("host {h} has no link {name}"))
    }

    fn ifindex(&self, h: usize, name: &str) -> Result<u64> {
        self.must_link(h, name)?["ifindex"]
            .as_u64()
            .ok_or_else(|| anyhow!("{name} on host {h} has no ifindex"))
    }

    /// Runs `program args…` inside the router namespace of `vni` on host `h`.
    fn in_router(&self, h: usize, vni: u32, program: &str, args: &[&str]) -> Result<String> {
        in_router(&self.links[h], vni, program, args)
    }

    /// Echo requests the router namespace of `vni` on host `h` has received.
    fn echos(&self, h: usize, vni: u32) -> Result<u64> {
        let snmp = self.in_router(h, vni, "cat", &["/proc/net/snmp"])?;
        let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
        let (names, values) = (icmp.next(), icmp.next());
        let (Some(names), Some(values)) = (names, values) else {
            bail!("no Icmp lines in /proc/net/snmp: {snmp}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InEchos")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| anyhow!("no InEchos in {names} / {values}"))
    }

    /// `bridge fdb show dev kvx<V>` in host `h`, as "MAC dst IP" entries.
    fn fdb(&self, h: usize, vni: u32) -> Result<BTreeSet<String>> {
        let out = run(
            "bridge",
            &[
                "-n",
                &self.ns(h),
                "fdb",
                "show",
                "dev",
                &format!("kvx{vni}"),
            ],
        )?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let dst = w.iter().position(|x| *x == "dst")?;
                Some(format!("{} dst {}", w[0], w.get(dst + 1)?))
            })
            .collect())
    }

    /// The stand-in for the firewall's gateway isolation in every host.
    fn isolate_gateways(&self) -> Result<()> {
        standin::isolate_gateways(&self.net, 0..self.net.len())
    }

    /// A VM on network `vni` in host `h` with address 10.77.0.`last`.
    fn add_vm(&mut self, h: usize, vni: u32, last: u8) -> Result<Vm> {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x77, vni as u8, last]);
        let vm = StandIn::create(
            &self.net,
            &StandInSpec {
                slot: 900 + self.vms.len(),
                host: Some(h),
                port: &format!("vm{vni}"),
                bridge: &format!("kbr{vni}"),
                mac: Some(&mac.to_string()),
                mtu: Some(MTU),
                addr: Ipv4Addr::new(10, 77, 0, last),
                prefix_len: 24,
                gateway: None,
                no_ipv6: false,
            },
        )?;
        let handle = Vm {
            ns: vm.ns().to_string(),
            ip: vm.ip(),
            mac,
        };
        self.vms.push(vm);
        Ok(handle)
    }

    /// One `ping` (`count` echoes, 1 s timeout each) from `vm` to `ip`: whether all
    /// were answered.
    fn ping(&self, vm: &Vm, ip: Ipv4Addr, count: u32) -> Result<bool> {
        standin::ping(&vm.ns, ip, count)
    }

    /// Waits until `vm` reaches `ip`.
    fn wait_ping(&self, vm: &Vm, ip: Ipv4Addr) -> Result<()> {
        standin::wait_ping(&vm.ns, ip)
    }

    /// Asserts that `vm` cannot reach `ip` (two echoes, none answered).
    fn assert_no_ping(&self, vm: &Vm, ip: Ipv4Addr) -> Result<()> {
        let out = standin::ping_output(&vm.ns, ip, 2)?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !out.status.success() && text.contains(" 0 received"),
            "{} reached {ip}, which it must not: {text}",
            vm.ip
        );
        Ok(())
    }

    /// Pings the gateway from the VM on `vm_host` and checks that only that host's router
    /// namespace (of `vni`) answered, among `hosts`.
    fn assert_local_gateway(
        &self,
        vm: &Vm,
        vm_host: usize,
        vni: u32,
        hosts: &[usize],
    ) -> Result<()> {
        self.wait_ping(vm, GATEWAY)?;
        let before: Vec<u64> = hosts
            .iter()
            .map(|&h| self.echos(h, vni))
            .collect::<Result<_>>()?;
        ensure!(
            self.ping(vm, GATEWAY, 3)?,
            "{} lost echoes to the gateway",
            vm.ip
        );
        for (k, &h) in hosts.iter().enumerate() {
            let delta = self.echos(h, vni)? - before[k];
            if h == vm_host {
                ensure!(
                    delta >= 3,
                    "the gateway of host {h} answered {delta} of 3 echoes from its own VM"
                );
            } else {
                ensure!(
                    delta == 0,
                    "the gateway of host {h} saw {delta} echoes from the VM on host {vm_host}"
                );
            }
        }
        Ok(())
    }

    /// Asserts that host `h` has no link of network `vni` and no namespace file.
    fn assert_gone(&self, h: usize, vni: u32) -> Result<()> {
        for name in [
            format!("kbr{vni}"),
            format!("kvx{vni}"),
            format!("kgh{vni}"),
        ] {
            ensure!(self.link(h, &name)?.is_none(), "host {h} still has {name}");
        }
        let path = self.links[h].router_netns(vni);
        ensure!(!path.exists(), "{} is still there", path.display());
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.vms.clear();
        // Router namespaces the test did not remove (it failed half-way).
        unmount_routers(self.dir.path(), self.links.len());
    }
}

/// The test process's own namespace must never get a guest-network link.
fn assert_root_clean() -> Result<()> {
    let links = run("ip", &["-o", "link", "show"])?;
    for name in ["kbr", "kvx", "kgh"] {
        ensure!(
            !links.contains(&format!(": {name}{NET_A}"))
                && !links.contains(&format!(": {name}{NET_B}")),
            "the test process's namespace got a {name} link:\n{links}"
        );
    }
    Ok(())
}

fn mtu(link: &Value) -> u64 {
    link["mtu"].as_u64().unwrap_or_default()
}

#[test]
fn overlay_networks_on_three_hosts() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    let all = [0, 1, 2];
    let ip = |h: usize| lab.net.ip(h);
    let (ip0, ip1, ip2) = (ip(0), ip(1), ip(2));
    let subnet = lab.net.subnet();

    // The host's addresses: its underlay.
    let addresses = lab.on(0, |l| l.addresses())?;
    let eth0: Vec<_> = addresses.iter().filter(|a| a.dev == "eth0").collect();
    assert_eq!(eth0.len(), 1, "{addresses:?}");
    assert_eq!((eth0[0].addr, eth0[0].prefix_len), (ip0, 24));
    assert!(eth0[0].up && eth0[0].mtu == 1500, "{addresses:?}");
    assert!(addresses
        .iter()
        .any(|a| a.dev == "lo" && a.addr == Ipv4Addr::LOCALHOST));
    assert_eq!(ip0.octets()[2], subnet);

    // A missing underlay fails before anything is created.
    let mut bad = lab.spec(NET_A, 0, &[1]);
    bad.underlay.dev = "nope0".into();
    let err = lab.on(0, |l| l.ensure(&bad)).unwrap_err();
    assert!(
        matches!(&err, LinkError::NoUnderlay { dev } if dev == "nope0"),
        "{err:?}"
    );
    assert!(lab.link(0, "kbr4242")?.is_none());
    assert!(!lab.links[0].router_netns(NET_A).exists());

    // Network A on three hosts, VMs .11 .12 .13.
    for h in all {
        lab.ensure(h, &lab.spec(NET_A, h, &Lab::others(h, &all)))?;
    }
    assert_root_clean()?;
    lab.isolate_gateways()?;
    let mut vms_a = Vec::new();
    for h in all {
        vms_a.push(lab.add_vm(h, NET_A, 11 + h as u8)?);
    }
    lab.wait_ping(&vms_a[0], vms_a[1].ip)?;
    lab.wait_ping(&vms_a[1], vms_a[0].ip)?;
    lab.wait_ping(&vms_a[2], vms_a[0].ip)?;
    lab.wait_ping(&vms_a[1], vms_a[2].ip)?;
    for h in all {
        lab.assert_local_gateway(&vms_a[h], h, NET_A, &all)?;
    }
    eprintln!("network {NET_A}: VMs on three hosts reach each other and their own gateway");

    // Links as configured.
    for h in all {
        let br = lab.must_link(h, "kbr4242")?;
        let vx = lab.must_link(h, "kvx4242")?;
        let gh = lab.must_link(h, "kgh4242")?;
        assert_eq!(
            (mtu(&br), mtu(&vx), mtu(&gh)),
            (1450, 1450, 1450),
            "host {h}"
        );
        assert_eq!(vx["master"], "kbr4242", "{vx}");
        assert_eq!(gh["master"], "kbr4242", "{gh}");
        let info = &vx["linkinfo"]["info_data"];
        assert_eq!(info["id"], 4242, "{vx}");
        assert_eq!(info["port"], 4789, "{vx}");
        assert_eq!(info["local"], lab.net.ip(h).to_string(), "{vx}");
        assert_eq!(info["link"], "eth0", "{vx}");
        assert_eq!(info["learning"], false, "{vx}");
        let gn = lab.in_router(h, NET_A, "ip", &["-j", "addr", "show", "dev", "kgn4242"])?;
        let gn: Value = serde_json::from_str(&gn)?;
        assert_eq!(gn[0]["address"], gateway_mac(NET_A).to_string(), "{gn}");
        assert_eq!(gn[0]["mtu"], 1450, "{gn}");
        let addrs: Vec<String> = gn[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
            .collect();
        assert_eq!(addrs, vec!["10.77.0.1/24".to_string()], "{gn}");
    }
    let listed = lab.list(0)?;
    assert_eq!(
        listed,
        vec![NetworkLinksState {
            vni: NET_A,
            mtu: MTU,
            peers: BTreeSet::from([ip1, ip2]),
            remote_macs: BTreeMap::new(),
            ports: BTreeSet::from(["vm4242".to_string()]),
        }]
    );

    // A second ensure changes nothing.
    let snapshot = |lab: &Lab| -> Result<(Vec<u64>, String, BTreeSet<String>)> {
        let idx = ["kbr4242", "kvx4242", "kgh4242"]
            .iter()
            .map(|n| lab.ifindex(0, n))
            .collect::<Result<_>>()?;
        let gn = lab.in_router(0, NET_A, "ip", &["-o", "link", "show", "kgn4242"])?;
        let gn = gn.split(':').next().unwrap_or_default().to_string();
        Ok((idx, gn, lab.fdb(0, NET_A)?))
    };
    let before = snapshot(&lab)?;
    lab.ensure(0, &lab.spec(NET_A, 0, &[1, 2]))?;
    assert_eq!(snapshot(&lab)?, before, "a second ensure changed something");
    assert_eq!(
        before.2,
        BTreeSet::from([
            format!("00:00:00:00:00:00 dst {ip1}"),
            format!("00:00:00:00:00:00 dst {ip2}"),
        ])
    );

    // Changed peers and remote MACs change only the FDB.
    let mut narrowed = lab.spec(NET_A, 0, &[1]);
    narrowed.remote_macs.insert(vms_a[1].mac, ip1);
    lab.ensure(0, &narrowed)?;
    assert_eq!(
        lab.fdb(0, NET_A)?,
        BTreeSet::from([
            format!("00:00:00:00:00:00 dst {ip1}"),
            format!("{} dst {ip1}", vms_a[1].mac),
        ])
    );
    let after = snapshot(&lab)?;
    assert_eq!((&after.0, &after.1), (&before.0, &before.1));
    let listed = lab.list(0)?;
    assert_eq!(listed[0].peers, BTreeSet::from([ip1]));
    assert_eq!(listed[0].remote_macs, BTreeMap::from([(vms_a[1].mac, ip1)]));
    lab.wait_ping(&vms_a[0], vms_a[1].ip)?;
    lab.ensure(0, &lab.spec(NET_A, 0, &[1, 2]))?;
    assert_eq!(lab.fdb(0, NET_A)?, before.2);
    lab.wait_ping(&vms_a[0], vms_a[2].ip)?;
    eprintln!("network {NET_A}: a second ensure is a no-op; peers and MACs change the FDB only");

    // Deleted behind the adapter's back: recreated.
    run("ip", &["-n", &lab.ns(0), "link", "del", "kvx4242"])?;
    assert!(!lab.ping(&vms_a[0], vms_a[1].ip, 1)?);
    lab.ensure(0, &lab.spec(NET_A, 0, &[1, 2]))?;
    let vx = lab.must_link(0, "kvx4242")?;
    assert_eq!(vx["master"], "kbr4242", "{vx}");
    assert_eq!(mtu(&vx), 1450);
    assert_eq!(lab.fdb(0, NET_A)?, before.2);
    lab.wait_ping(&vms_a[0], vms_a[1].ip)?;

    run("ip", &["-n", &lab.ns(0), "link", "del", "kgh4242"])?;
    lab.ensure(0, &lab.spec(NET_A, 0, &[1, 2]))?;
    assert_eq!(lab.must_link(0, "kgh4242")?["master"], "kbr4242");
    lab.assert_local_gateway(&vms_a[0], 0, NET_A, &all)?;
    eprintln!("network {NET_A}: a deleted VXLAN device and veth pair are recreated");

    // A VM's tap: one that is down with no bridge is being plugged by libvirt (which adds
    // it to its bridge before bringing it up) and is left alone; one that is up and lost
    // its bridge is put back.
    const TAP: &str = "kt4242test";
    let ns0 = lab.ns(0);
    run(
        "ip",
        &["-n", &ns0, "tuntap", "add", "dev", TAP, "mode", "tap"],
    )?;
    let mut with_tap = lab.spec(NET_A, 0, &[1, 2]);
    with_tap.local_taps.insert(TAP.to_string());
    lab.ensure(0, &with_tap)?;
    let tap = lab.must_link(0, TAP)?;
    assert!(
        tap.get("master").is_none(),
        "a tap being plugged was taken: {tap}"
    );
    run("ip", &["-n", &ns0, "link", "set", "dev", TAP, "up"])?;
    lab.ensure(0, &with_tap)?;
    let tap = lab.must_link(0, TAP)?;
    assert_eq!(tap["master"], "kbr4242", "{tap}");
    run("ip", &["-n", &ns0, "link", "set", "dev", TAP, "nomaster"])?;
    lab.ensure(0, &with_tap)?;
    assert_eq!(lab.must_link(0, TAP)?["master"], "kbr4242");
    run("ip", &["-n", &ns0, "link", "del", "dev", TAP])?;
    eprintln!("network {NET_A}: a tap being plugged is left to libvirt; a lost one is put back");

    // Network B: the same CIDR on hosts 0 and 1, isolated from A.
    let pair = [0, 1];
    for h in pair {
        lab.ensure(h, &lab.spec(NET_B, h, &Lab::others(h, &pair)))?;
    }
    let vms_b = [lab.add_vm(0, NET_B, 21)?, lab.add_vm(1, NET_B, 22)?];
    lab.wait_ping(&vms_b[0], vms_b[1].ip)?;
    lab.assert_local_gateway(&vms_b[0], 0, NET_B, &pair)?;
    lab.assert_local_gateway(&vms_b[1], 1, NET_B, &pair)?;
    let a_echos = lab.echos(0, NET_A)?;
    lab.assert_no_ping(&vms_b[0], vms_a[0].ip)?;
    lab.assert_no_ping(&vms_b[0], vms_a[1].ip)?;
    lab.assert_no_ping(&vms_a[0], vms_b[1].ip)?;
    ensure!(lab.echos(0, NET_A)? == a_echos);
    let vnis: Vec<u32> = lab.list(0)?.iter().map(|s| s.vni).collect();
    assert_eq!(vnis, vec![NET_A, NET_B]);
    eprintln!("network {NET_B}: same CIDR, works beside {NET_A} and cannot reach it");

    // Remove A everywhere; B goes on.
    for h in all {
        lab.on(h, |l| l.remove(NET_A))?;
        lab.assert_gone(h, NET_A)?;
        lab.on(h, |l| l.remove(NET_A))?;
    }
    let listed = lab.list(0)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].vni, NET_B);
    assert_eq!(listed[0].peers, BTreeSet::from([ip1]));
    assert_eq!(listed[0].ports, BTreeSet::from(["vm4243".to_string()]));
    lab.wait_ping(&vms_b[0], vms_b[1].ip)?;
    for h in pair {
        lab.on(h, |l| l.remove(NET_B))?;
        lab.assert_gone(h, NET_B)?;
        assert!(lab.list(h)?.is_empty());
    }
    assert_root_clean()?;
    let leftover: Vec<PathBuf> = (0..3)
        .flat_map(|h| {
            std::fs::read_dir(lab.links[h].netns_dir())
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftover.is_empty(), "namespace files left: {leftover:?}");
    eprintln!("remove leaves nothing behind; a second remove succeeds");
    Ok(())
}
