//! The nftables `Firewall` (`keel_adapters::firewall::nft::Nftables`) against real packets.
//! A namespace "host" gets the bridges, VXLAN ports and gateway ports of the real layout;
//! stand-in VMs are namespaces whose veth peers sit on the bridge named like taps
//! (`kt<mac>`), and stand-in gateways are namespaces behind `kgh<V>`. The adapter runs
//! `nft` from a thread that entered the host namespace, as the node service does.
//!
//! * `security_groups` — default-deny ingress, live rule changes, port ranges, group
//!   remotes, stateful replies, egress rules with the gateway's DHCP/DNS/ICMP always open,
//!   anti-spoofing (IP, ARP, MAC), unknown taps, a flushed ruleset restored, clear.
//! * `same_cidr_networks` — two networks with the same CIDR on one host: both work, and a
//!   reply-shaped packet in one is not let through by a flow of the other (conntrack zones).
//! * `distributed_gateway` — two hosts joined by VXLAN: VMs reach each other, but ARP for
//!   the gateway and DHCP never cross (each host's gateway answers its own VMs).
//! * `apply_cost` — how long applying ~200 ports takes (printed, for the benchmark).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_adapters::firewall::nft::{render, Nftables, DEFAULT_BINARY};
use keel_adapters::firewall::{
    Cidr, Firewall, FirewallState, NetworkPolicy, PortPolicy, Protocol, Remote, Rule,
};
use keel_adapters::links::{
    bridge_name, gateway_host_name, gateway_mac, tap_name, vxlan_name, MacAddr,
};
use keel_tests::process::{ManagedProcess, ProcessSpec};
use keel_tests::wait::{millis, secs, wait_until_blocking};
use keel_tests::{Endpoint, TestNet};

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The stand-in VM's side of its veth.
const VM_DEV: &str = "vm0";

fn skipped() -> bool {
    if let Some(reason) = keel_tests::skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return true;
    }
    if !std::path::Path::new("/usr/bin/busybox").exists() {
        eprintln!("SKIPPED: /usr/bin/busybox is missing (udhcpc, udhcpd, arping)");
        return true;
    }
    false
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    let (a, l) = s.split_once('/').unwrap();
    Cidr {
        addr: ip(a),
        prefix_len: l.parse().unwrap(),
    }
}

fn rule(protocol: Protocol, ports: Option<(u16, u16)>, remote: Remote) -> Rule {
    Rule {
        protocol,
        ports,
        remote,
    }
}

fn sa(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(addr, port))
}

/// `ip args…` inside test host `i`.
fn ipn(net: &TestNet, i: usize, args: &[&str]) -> Result<String> {
    net.exec(i, "ip", args)
        .with_context(|| format!("in {}: ip {}", net.ns(i), args.join(" ")))
}

/// A stand-in VM (or gateway): namespace `ns` of the test net, its veth peer `port` on
/// the bridge of `vni` in the host namespace.
#[derive(Debug, Clone)]
struct Vm {
    ns: usize,
    port: String,
    vni: u32,
    mac: MacAddr,
    ip: Ipv4Addr,
}

impl Vm {
    fn new(ns: usize, vni: u32, last: u8) -> Self {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x00, vni as u8, last]);
        Vm {
            ns,
            port: tap_name(mac),
            vni,
            mac,
            ip: Ipv4Addr::new(10, 0, 0, last),
        }
    }

    fn gateway(ns: usize, vni: u32) -> Self {
        Vm {
            ns,
            port: gateway_host_name(vni),
            vni,
            mac: gateway_mac(vni),
            ip: GW,
        }
    }

    fn policy(&self) -> PortPolicy {
        PortPolicy {
            tap: self.port.clone(),
            vni: self.vni,
            mac: self.mac,
            ip: self.ip,
            ingress: vec![],
            egress: None,
        }
    }

    /// Creates the veth pair and plugs it into the bridge of `host`.
    fn plug(&self, net: &TestNet, host: usize) -> Result<()> {
        let ns = net.ns(self.ns);
        let br = bridge_name(self.vni);
        let (mac, addr) = (self.mac.to_string(), format!("{}/24", self.ip));
        ipn(
            net,
            host,
            &[
                "link", "add", &self.port, "type", "veth", "peer", "name", VM_DEV, "netns", &ns,
            ],
        )?;
        ipn(net, host, &["link", "set", &self.port, "master", &br, "up"])?;
        ipn(net, self.ns, &["link", "set", VM_DEV, "address", &mac])?;
        ipn(net, self.ns, &["addr", "add", &addr, "dev", VM_DEV])?;
        ipn(net, self.ns, &["link", "set", VM_DEV, "up"])?;
        // The harness's underlay link of this namespace plays no part here.
        ipn(net, self.ns, &["link", "set", "eth0", "down"])?;
        Ok(())
    }
}

/// A network's bridge and VXLAN port in `host` (peers: the other hosts' underlay
/// addresses, head-end replication).
fn make_network(net: &TestNet, host: usize, vni: u32, peers: &[Ipv4Addr]) -> Result<()> {
    let (br, vx, id) = (bridge_name(vni), vxlan_name(vni), vni.to_string());
    let local = net.ip(host).to_string();
    ipn(net, host, &["link", "add", &br, "type", "bridge"])?;
    ipn(net, host, &["link", "set", &br, "up"])?;
    ipn(
        net,
        host,
        &[
            "link",
            "add",
            &vx,
            "type",
            "vxlan",
            "id",
            &id,
            "dstport",
            "4789",
            "local",
            &local,
            "dev",
            "eth0",
            "nolearning",
        ],
    )?;
    ipn(net, host, &["link", "set", &vx, "master", &br, "up"])?;
    for p in peers {
        let p = p.to_string();
        net.exec(
            host,
            "bridge",
            &["fdb", "append", "00:00:00:00:00:00", "dev", &vx, "dst", &p],
        )?;
    }
    Ok(())
}

fn network_policy(vni: u32) -> NetworkPolicy {
    NetworkPolicy {
        vni,
        vxlan: vxlan_name(vni),
        gateway_port: gateway_host_name(vni),
        gateway_ip: GW,
        gateway_mac: gateway_mac(vni),
    }
}

/// Applies `state` in host `host` (a thread that entered its namespace runs `nft`).
fn apply(net: &TestNet, host: usize, fw: &Nftables, state: &FirewallState) -> Result<()> {
    net.in_host(host, || fw.apply(state))?
        .map_err(|e| anyhow!("apply: {e:#}"))
}

/// One `ping -c1 -W1` from test host `from` (optionally from source address `src`).
fn ping_once(net: &TestNet, from: usize, to: Ipv4Addr, src: Option<Ipv4Addr>) -> bool {
    let mut c = net.command(from, "ping");
    c.args(["-c1", "-W1", "-n", "-q"]);
    if let Some(s) = src {
        c.args(["-I", &s.to_string()]);
    }
    c.arg(to.to_string());
    c.output().map(|o| o.status.success()).unwrap_or(false)
}

fn assert_ping(net: &TestNet, from: &Vm, to: Ipv4Addr, what: &str) -> Result<()> {
    wait_until_blocking(
        format!("{what}: ping {} -> {to}", from.ip),
        secs(10),
        millis(100),
        || Ok(ping_once(net, from.ns, to, None).then_some(())),
    )?;
    Ok(())
}

fn assert_no_ping(net: &TestNet, from: &Vm, to: Ipv4Addr, what: &str) -> Result<()> {
    ensure!(
        !ping_once(net, from.ns, to, None),
        "{what}: ping {} -> {to} passed but must be dropped",
        from.ip
    );
    Ok(())
}

/// A TCP server in a test host: answers every connection with `greeting` and closes.
struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(net: &TestNet, host: usize, addr: SocketAddr, greeting: &str) -> Result<Self> {
        let listener = net
            .in_host(host, || TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", net.ns(host)))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, greeting) = (stop.clone(), greeting.as_bytes().to_vec());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(&greeting);
                    }
                    // Polls so that `Drop` can stop it (std cannot interrupt accept()).
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(TcpServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server in a test host.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start(net: &TestNet, host: usize, addr: SocketAddr) -> Result<Self> {
        let sock = net
            .in_host(host, || UdpSocket::bind(addr))?
            .with_context(|| format!("bind udp {addr} in {}", net.ns(host)))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from test host `from` to `to` and reads the greeting (1 s to connect).
fn tcp_greeting(net: &TestNet, from: usize, to: SocketAddr) -> Result<String> {
    let mut s = net.connect(Endpoint::Host(from), to, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn assert_tcp(net: &TestNet, from: &Vm, to: SocketAddr, greeting: &str, what: &str) -> Result<()> {
    wait_until_blocking(
        format!("{what}: TCP {} -> {to}", from.ip),
        secs(10),
        millis(100),
        || {
            let got = tcp_greeting(net, from.ns, to)?;
            ensure!(got == greeting, "greeting {got:?}, expected {greeting:?}");
            Ok(Some(()))
        },
    )?;
    Ok(())
}

fn assert_no_tcp(net: &TestNet, from: &Vm, to: SocketAddr, what: &str) -> Result<()> {
    if let Ok(g) = tcp_greeting(net, from.ns, to) {
        bail!(
            "{what}: TCP {} -> {to} answered {g:?} but must be dropped",
            from.ip
        );
    }
    Ok(())
}

/// Sends one datagram from `bind` in host `from` to `to`; returns the answer, if one
/// comes within a second.
fn udp_exchange(net: &TestNet, from: usize, bind: SocketAddr, to: SocketAddr) -> Result<bool> {
    let sock = net.in_host(from, || UdpSocket::bind(bind))??;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    sock.send_to(b"keel", to)?;
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Ok(&buf[..n] == b"keel"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A lease for `vm` from a busybox udhcpc run in its namespace (3 discovers, 1 s apart).
fn dhcp_lease(net: &TestNet, vm: &Vm) -> Result<bool> {
    let out = net
        .command(vm.ns, "busybox")
        .args([
            "udhcpc", "-i", VM_DEV, "-f", "-q", "-n", "-t", "3", "-T", "1",
        ])
        .args(["-s", "/bin/true"])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.status.success() && text.contains(&format!("lease of {}", vm.ip)))
}

/// busybox udhcpd in the gateway namespace, with a static lease for each of `vms`.
fn dhcp_server(
    net: &TestNet,
    gw: &Vm,
    vms: &[&Vm],
    dir: &std::path::Path,
) -> Result<ManagedProcess> {
    let conf = dir.join(format!("udhcpd-{}.conf", gw.ns));
    let leases = dir.join(format!("udhcpd-{}.leases", gw.ns));
    std::fs::write(&leases, "")?;
    let mut text = format!(
        "start 10.0.0.2\nend 10.0.0.254\ninterface {VM_DEV}\nlease_file {}\npidfile {}\n\
         option subnet 255.255.255.0\noption router {GW}\n",
        leases.display(),
        dir.join(format!("udhcpd-{}.pid", gw.ns)).display()
    );
    for vm in vms {
        text.push_str(&format!("static_lease {} {}\n", vm.mac, vm.ip));
    }
    std::fs::write(&conf, text)?;
    let spec = ProcessSpec::new(format!("udhcpd-{}", gw.ns), "/usr/bin/busybox", dir)
        .netns(net.ns(gw.ns))
        .arg("udhcpd")
        .arg("-f")
        .arg(&conf);
    ManagedProcess::spawn(spec)
}

/// The tables of nft in host `host`.
fn nft_tables(net: &TestNet, host: usize) -> Result<String> {
    Ok(net.exec(host, DEFAULT_BINARY, &["list", "tables"])?)
}

fn sysctl_bridge_nf(net: &TestNet, host: usize) -> Result<String> {
    Ok(net
        .exec(
            host,
            "cat",
            &["/proc/sys/net/bridge/bridge-nf-call-iptables"],
        )?
        .trim()
        .to_string())
}

fn log_dir(test: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("keel-fw-{test}-"))
        .tempdir()?)
}

#[test]
fn security_groups() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    const HOST: usize = 0;
    let net = TestNet::new(6)?;
    let logs = log_dir("sg")?;
    make_network(&net, HOST, 5, &[])?;
    let a = Vm::new(1, 5, 2);
    let b = Vm::new(2, 5, 3);
    let c = Vm::new(3, 5, 4);
    let g = Vm::gateway(4, 5);
    for vm in [&a, &b, &c, &g] {
        vm.plug(&net, HOST)?;
    }
    // Without a firewall everything flows (the stand-ins are wired right).
    assert_ping(&net, &a, b.ip, "no firewall")?;

    // The adapter turns br_netfilter on in its own namespace.
    let root_before = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")?;
    net.in_host(HOST, || {
        std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "0\n")
    })??;
    assert_eq!(sysctl_bridge_nf(&net, HOST)?, "0");
    let fw = Nftables::new(PathBuf::from(DEFAULT_BINARY));
    let mut state = FirewallState {
        networks: vec![network_policy(5)],
        ports: vec![a.policy(), b.policy(), c.policy()],
        groups: Default::default(),
    };
    let (ia, ib, ic) = (0, 1, 2);
    apply(&net, HOST, &fw, &state)?;
    assert_eq!(sysctl_bridge_nf(&net, HOST)?, "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")?,
        root_before,
        "the root namespace's setting is untouched"
    );
    let tables = nft_tables(&net, HOST)?;
    ensure!(
        tables.contains("table bridge keel") && tables.contains("table inet keel"),
        "{tables}"
    );

    // Default deny ingress; the gateway always answers ICMP.
    assert_ping(&net, &a, GW, "gateway with no rules")?;
    assert_no_ping(&net, &a, b.ip, "default deny")?;
    assert_no_ping(&net, &b, a.ip, "default deny")?;

    // An ICMP rule on B from A's CIDR, live; then removed again.
    state.ports[ib].ingress = vec![rule(
        Protocol::Icmp,
        None,
        Remote::Cidr(cidr("10.0.0.0/24")),
    )];
    apply(&net, HOST, &fw, &state)?;
    assert_ping(&net, &a, b.ip, "icmp rule on B")?;
    assert_no_ping(&net, &b, a.ip, "A still has no rule")?;
    state.ports[ib].ingress.clear();
    apply(&net, HOST, &fw, &state)?;
    assert_no_ping(&net, &a, b.ip, "icmp rule removed")?;

    // TCP port range: 22 open (range 20-22), 23 not; a group remote: B's ingress from
    // group "web" = {A}; C is not in it.
    let _b22 = TcpServer::start(&net, b.ns, sa(b.ip, 22), "b22")?;
    let _b23 = TcpServer::start(&net, b.ns, sa(b.ip, 23), "b23")?;
    let _b80 = TcpServer::start(&net, b.ns, sa(b.ip, 80), "b80")?;
    state.ports[ib].ingress = vec![
        rule(
            Protocol::Tcp,
            Some((20, 22)),
            Remote::Cidr(cidr("10.0.0.0/24")),
        ),
        rule(Protocol::Tcp, Some((80, 80)), Remote::Group("web".into())),
    ];
    state.groups.insert("web".into(), vec![a.ip]);
    apply(&net, HOST, &fw, &state)?;
    assert_tcp(&net, &a, sa(b.ip, 22), "b22", "port range")?;
    assert_no_tcp(&net, &a, sa(b.ip, 23), "outside the port range")?;
    assert_tcp(&net, &a, sa(b.ip, 80), "b80", "group member")?;
    assert_no_tcp(&net, &c, sa(b.ip, 80), "not a group member")?;
    assert_tcp(&net, &c, sa(b.ip, 22), "b22", "C by CIDR")?;
    // Group membership changes take effect live.
    state.groups.insert("web".into(), vec![a.ip, c.ip]);
    apply(&net, HOST, &fw, &state)?;
    assert_tcp(&net, &c, sa(b.ip, 80), "b80", "C joined the group")?;

    // Stateful: A allows TCP 8080 from B only; B (no rule for A) gets the answers.
    let _a8080 = TcpServer::start(&net, a.ns, sa(a.ip, 8080), "a8080")?;
    let _b8080 = TcpServer::start(&net, b.ns, sa(b.ip, 8080), "b8080")?;
    state.ports[ia].ingress = vec![rule(
        Protocol::Tcp,
        Some((8080, 8080)),
        Remote::Cidr(cidr(&format!("{}/32", b.ip))),
    )];
    apply(&net, HOST, &fw, &state)?;
    assert_tcp(&net, &b, sa(a.ip, 8080), "a8080", "replies to B")?;
    assert_no_tcp(&net, &a, sa(b.ip, 8080), "B has no rule for 8080")?;
    assert_no_tcp(&net, &c, sa(a.ip, 8080), "A allows only B")?;

    // Egress: Some([]) lets A reach only its gateway's DHCP, DNS and ICMP.
    state.ports[ib]
        .ingress
        .push(rule(Protocol::Any, None, Remote::Cidr(cidr("0.0.0.0/0"))));
    state.ports[ia].egress = Some(vec![]);
    let _dns_udp = UdpEcho::start(&net, g.ns, sa(GW, 53))?;
    let _dns_tcp = TcpServer::start(&net, g.ns, sa(GW, 53), "dns")?;
    let _g80 = TcpServer::start(&net, g.ns, sa(GW, 80), "g80")?;
    let _dhcpd = dhcp_server(&net, &g, &[&a, &b, &c], logs.path())?;
    apply(&net, HOST, &fw, &state)?;
    assert_ping(&net, &a, GW, "egress none: gateway ICMP")?;
    assert_tcp(&net, &a, sa(GW, 53), "dns", "egress none: DNS over TCP")?;
    wait_until_blocking("egress none: DNS over UDP", secs(10), millis(100), || {
        Ok(udp_exchange(&net, a.ns, sa(a.ip, 0), sa(GW, 53))?.then_some(()))
    })?;
    wait_until_blocking("egress none: a DHCP lease", secs(20), millis(100), || {
        Ok(dhcp_lease(&net, &a)?.then_some(()))
    })?;
    assert_no_tcp(&net, &a, sa(GW, 80), "egress none: other gateway ports")?;
    assert_no_ping(&net, &a, b.ip, "egress none: B allows everything")?;
    assert_no_tcp(&net, &a, sa(b.ip, 22), "egress none: B allows everything")?;
    assert_ping(&net, &c, b.ip, "C has no egress rules")?;
    // An egress rule opens exactly that.
    state.ports[ia].egress = Some(vec![rule(
        Protocol::Tcp,
        Some((22, 22)),
        Remote::Cidr(cidr("10.0.0.0/24")),
    )]);
    apply(&net, HOST, &fw, &state)?;
    assert_tcp(&net, &a, sa(b.ip, 22), "b22", "egress tcp 22")?;
    assert_no_tcp(&net, &a, sa(b.ip, 80), "egress tcp 22 only")?;
    assert_no_ping(&net, &a, b.ip, "egress tcp 22 only")?;
    // DHCP answers reach a VM with no ingress rules and no egress rules too.
    assert!(state.ports[ic].ingress.is_empty());
    wait_until_blocking("C gets a DHCP lease", secs(20), millis(100), || {
        Ok(dhcp_lease(&net, &c)?.then_some(()))
    })?;
    state.ports[ia].egress = None;

    // Anti-spoofing: a second address on A (B allows everything from anywhere).
    apply(&net, HOST, &fw, &state)?;
    let spoofed = ip("10.0.0.50");
    ipn(&net, a.ns, &["addr", "add", "10.0.0.50/24", "dev", VM_DEV])?;
    assert_ping(&net, &a, b.ip, "A's own address")?;
    ensure!(
        !ping_once(&net, a.ns, b.ip, Some(spoofed)),
        "a ping from a spoofed source address passed"
    );
    // ARP with a spoofed sender address is dropped; with A's own it is answered.
    let arping = |src: Ipv4Addr| {
        net.command(a.ns, "busybox")
            .args(["arping", "-c1", "-w1", "-I", VM_DEV, "-s", &src.to_string()])
            .arg(b.ip.to_string())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    wait_until_blocking("ARP from A's own address", secs(10), millis(100), || {
        Ok(arping(a.ip).then_some(()))
    })?;
    ensure!(
        !arping(spoofed),
        "ARP with a spoofed sender address was answered"
    );
    ipn(&net, a.ns, &["addr", "del", "10.0.0.50/24", "dev", VM_DEV])?;
    // A new MAC on A: nothing passes; the right one again: traffic resumes.
    ipn(
        &net,
        a.ns,
        &["link", "set", VM_DEV, "address", "52:54:00:00:05:99"],
    )?;
    ipn(&net, a.ns, &["neigh", "flush", "dev", VM_DEV])?;
    assert_no_ping(&net, &a, b.ip, "spoofed MAC")?;
    assert_no_ping(&net, &a, GW, "spoofed MAC")?;
    ipn(
        &net,
        a.ns,
        &["link", "set", VM_DEV, "address", &a.mac.to_string()],
    )?;
    assert_ping(&net, &a, b.ip, "MAC restored")?;

    // A tap the firewall does not know yet (a VM that started before the reconciler
    // caught up) is cut off.
    let d = Vm::new(5, 5, 9);
    d.plug(&net, HOST)?;
    assert_no_ping(&net, &d, GW, "unknown tap")?;
    assert_no_ping(&net, &d, c.ip, "unknown tap")?;

    // Someone flushes the ruleset: the next apply (same state) restores it.
    net.exec(HOST, DEFAULT_BINARY, &["flush", "ruleset"])?;
    assert_ping(&net, &c, a.ip, "flushed ruleset: unfiltered")?;
    apply(&net, HOST, &fw, &state)?;
    let tables = nft_tables(&net, HOST)?;
    ensure!(tables.contains("table inet keel"), "not restored: {tables}");
    assert_no_ping(&net, &c, a.ip, "restored ruleset")?;
    // So are rules removed inside Keel's own table (the tables themselves still exist).
    net.exec(HOST, DEFAULT_BINARY, &["flush", "table", "inet", "keel"])?;
    assert_ping(&net, &c, a.ip, "flushed inet table: unfiltered")?;
    apply(&net, HOST, &fw, &state)?;
    assert_no_ping(&net, &c, a.ip, "restored rules")?;

    // Clear: tables gone, traffic unfiltered.
    net.in_host(HOST, || fw.clear())??;
    let tables = nft_tables(&net, HOST)?;
    ensure!(
        !tables.contains("keel"),
        "tables left after clear: {tables}"
    );
    assert_ping(&net, &c, a.ip, "cleared")?;
    assert_ping(&net, &d, GW, "cleared: the unknown tap")?;
    // Clearing twice is fine.
    net.in_host(HOST, || fw.clear())??;
    Ok(())
}

#[test]
fn same_cidr_networks() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    const HOST: usize = 0;
    let net = TestNet::new(7)?;
    make_network(&net, HOST, 5, &[])?;
    make_network(&net, HOST, 6, &[])?;
    // The same addresses in both networks (MACs differ: they embed the VNI).
    let (a5, b5, g5) = (Vm::new(1, 5, 2), Vm::new(2, 5, 3), Vm::gateway(3, 5));
    let (a6, b6, g6) = (Vm::new(4, 6, 2), Vm::new(5, 6, 3), Vm::gateway(6, 6));
    for vm in [&a5, &b5, &g5, &a6, &b6, &g6] {
        vm.plug(&net, HOST)?;
    }
    let fw = Nftables::new(PathBuf::from(DEFAULT_BINARY));
    let allow_a = rule(Protocol::Any, None, Remote::Cidr(cidr("10.0.0.2/32")));
    let mut b5p = b5.policy();
    b5p.ingress = vec![allow_a.clone()];
    let mut b6p = b6.policy();
    b6p.ingress = vec![rule(
        Protocol::Icmp,
        None,
        Remote::Cidr(cidr("10.0.0.2/32")),
    )];
    let mut state = FirewallState {
        networks: vec![network_policy(5), network_policy(6)],
        ports: vec![a5.policy(), b5p, a6.policy(), b6p],
        groups: Default::default(),
    };
    apply(&net, HOST, &fw, &state)?;
    for (a, b) in [(&a5, &b5), (&a6, &b6)] {
        assert_ping(&net, a, GW, "own gateway")?;
        assert_ping(&net, a, b.ip, "same CIDR, both networks")?;
    }

    // A flow A5:5000 -> B5:6000 (allowed, answered) in network 5 ...
    let _echo = UdpEcho::start(&net, b5.ns, sa(b5.ip, 6000))?;
    wait_until_blocking("UDP A5 -> B5 answered", secs(10), millis(100), || {
        Ok(udp_exchange(&net, a5.ns, sa(a5.ip, 5000), sa(b5.ip, 6000))?.then_some(()))
    })?;
    // ... must not let B6:6000 -> A6:5000 (its reply tuple) into A6, which has no rules.
    let a6_sock = net.in_host(a6.ns, || UdpSocket::bind(sa(a6.ip, 5000)))??;
    a6_sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let b6_sock = net.in_host(b6.ns, || UdpSocket::bind(sa(b6.ip, 6000)))??;
    let mut buf = [0u8; 64];
    b6_sock.send_to(b"reply-shaped", sa(a6.ip, 5000))?;
    match a6_sock.recv_from(&mut buf) {
        Ok((n, _)) => bail!(
            "network 6 let {:?} through on network 5's conntrack entry",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(e) => return Err(e.into()),
    }
    // With a rule on A6 the same packet passes (the path itself works).
    state.ports[2].ingress = vec![rule(
        Protocol::Udp,
        Some((5000, 5000)),
        Remote::Cidr(cidr("10.0.0.3/32")),
    )];
    apply(&net, HOST, &fw, &state)?;
    a6_sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    wait_until_blocking("B6 -> A6 with a rule", secs(10), millis(10), || {
        b6_sock.send_to(b"allowed", sa(a6.ip, 5000))?;
        match a6_sock.recv_from(&mut buf) {
            Ok((n, _)) => Ok((&buf[..n] == b"allowed").then_some(())),
            Err(e) => Err(anyhow!("{e}")),
        }
    })?;
    net.in_host(HOST, || fw.clear())??;
    Ok(())
}

#[test]
fn distributed_gateway() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    // Hosts 0 and 1 (underlay on the harness bridge), a VM and a gateway on each.
    let net = TestNet::new(6)?;
    let logs = log_dir("dgw")?;
    let (h1, h2) = (0, 1);
    make_network(&net, h1, 5, &[net.ip(h2)])?;
    make_network(&net, h2, 5, &[net.ip(h1)])?;
    let (vm1, g1) = (Vm::new(2, 5, 2), Vm::gateway(3, 5));
    let (vm2, g2) = (Vm::new(4, 5, 3), Vm::gateway(5, 5));
    for vm in [&vm1, &g1] {
        vm.plug(&net, h1)?;
    }
    for vm in [&vm2, &g2] {
        vm.plug(&net, h2)?;
    }
    let neigh = |vm: &Vm, of: Ipv4Addr| -> Result<String> {
        Ok(ipn(&net, vm.ns, &["neigh", "show", &of.to_string()])?
            .trim()
            .to_string())
    };
    let flush = || -> Result<()> {
        for vm in [&vm1, &g1, &vm2, &g2] {
            ipn(&net, vm.ns, &["neigh", "flush", "all"])?;
        }
        for h in [h1, h2] {
            ipn(
                &net,
                h,
                &[
                    "link",
                    "set",
                    &bridge_name(5),
                    "type",
                    "bridge",
                    "fdb_flush",
                ],
            )?;
        }
        Ok(())
    };

    // Without the firewall the VXLAN carries VM1's ARP for the gateway to host 2's gateway.
    assert_ping(&net, &vm1, vm2.ip, "across the VXLAN, no firewall")?;
    assert_ping(&net, &vm1, GW, "gateway, no firewall")?;
    wait_until_blocking(
        "host 2's gateway to hear VM1 (no firewall)",
        secs(5),
        millis(50),
        || {
            let n = neigh(&g2, vm1.ip)?;
            Ok((!n.is_empty()).then_some(()))
        },
    )?;

    let (fw1, fw2) = (
        Nftables::new(PathBuf::from(DEFAULT_BINARY)),
        Nftables::new(PathBuf::from(DEFAULT_BINARY)),
    );
    let icmp = vec![rule(
        Protocol::Icmp,
        None,
        Remote::Cidr(cidr("10.0.0.0/24")),
    )];
    let state = |vm: &Vm| FirewallState {
        networks: vec![network_policy(5)],
        ports: vec![PortPolicy {
            ingress: icmp.clone(),
            ..vm.policy()
        }],
        groups: Default::default(),
    };
    apply(&net, h1, &fw1, &state(&vm1))?;
    apply(&net, h2, &fw2, &state(&vm2))?;
    flush()?;
    assert_ping(&net, &vm1, GW, "own gateway")?;
    assert_ping(&net, &vm2, GW, "own gateway")?;
    assert_ping(&net, &vm1, vm2.ip, "across the VXLAN")?;
    assert_ping(&net, &vm2, vm1.ip, "across the VXLAN")?;
    ensure!(neigh(&g2, vm1.ip)?.is_empty(), "host 2's gateway heard VM1");
    ensure!(neigh(&g1, vm2.ip)?.is_empty(), "host 1's gateway heard VM2");
    // VM1 knows the gateway MAC from its own host's gateway.
    let n = neigh(&vm1, GW)?;
    ensure!(n.contains(&gateway_mac(5).to_string()), "{n}");

    // DHCP: VM1 gets its lease from host 1's server; host 2's never sees the discover.
    let g2_dhcp = net.in_host(g2.ns, || UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 67)))??;
    g2_dhcp.set_nonblocking(true)?;
    let _dhcpd = dhcp_server(&net, &g1, &[&vm1], logs.path())?;
    wait_until_blocking("VM1's DHCP lease", secs(20), millis(100), || {
        Ok(dhcp_lease(&net, &vm1)?.then_some(()))
    })?;
    let mut buf = [0u8; 1500];
    match g2_dhcp.recv_from(&mut buf) {
        Ok((n, from)) => bail!("host 2's gateway got a {n}-byte DHCP datagram from {from}"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.into()),
    }
    for (h, fw) in [(h1, &fw1), (h2, &fw2)] {
        net.in_host(h, || fw.clear())??;
    }
    Ok(())
}

/// A state like a busy host's: `ports` NICs over 10 networks, 3 ingress rules each
/// (one with a group), egress rules on every other NIC, 10 groups of 50 addresses.
fn big_state(ports: usize) -> FirewallState {
    let networks: Vec<NetworkPolicy> = (0..10).map(|i| network_policy(100 + i)).collect();
    let mut state = FirewallState {
        networks,
        ..Default::default()
    };
    for g in 0..10u8 {
        let members = (0..50u8).map(|i| Ipv4Addr::new(10, 1, g, i + 1)).collect();
        state.groups.insert(format!("group-{g}"), members);
    }
    for i in 0..ports {
        let mac = MacAddr([0x52, 0x54, 0, 1, (i >> 8) as u8, i as u8]);
        let ingress = vec![
            rule(
                Protocol::Tcp,
                Some((22, 22)),
                Remote::Cidr(cidr("10.0.0.0/8")),
            ),
            rule(
                Protocol::Tcp,
                Some((8000, 8100)),
                Remote::Group(format!("group-{}", i % 10)),
            ),
            rule(Protocol::Icmp, None, Remote::Cidr(cidr("0.0.0.0/0"))),
        ];
        let egress = (i % 2 == 0).then(|| {
            vec![rule(
                Protocol::Udp,
                Some((53, 53)),
                Remote::Cidr(cidr("10.0.0.0/8")),
            )]
        });
        state.ports.push(PortPolicy {
            tap: tap_name(mac),
            vni: 100 + (i % 10) as u32,
            mac,
            ip: Ipv4Addr::new(10, 2, (i >> 8) as u8, i as u8),
            ingress,
            egress,
        });
    }
    state
}

#[test]
fn apply_cost() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(1)?;
    let fw = Nftables::new(PathBuf::from(DEFAULT_BINARY));
    let state = big_state(200);
    let t = Instant::now();
    let script = render(&state)?;
    let render_time = t.elapsed();
    let timed = |s: &FirewallState| -> Result<Duration> {
        let t = Instant::now();
        apply(&net, 0, &fw, s)?;
        Ok(t.elapsed())
    };
    let first = timed(&state)?;
    let unchanged = timed(&state)?;
    let mut changed = state.clone();
    changed.ports[7].ingress.pop();
    let mut changes = Vec::new();
    for _ in 0..3 {
        changes.push(timed(&changed)?);
        changes.push(timed(&state)?);
    }
    changes.sort();
    let t = Instant::now();
    net.in_host(0, || fw.clear())??;
    let clear = t.elapsed();
    println!(
        "firewall apply, 200 ports / 10 networks / 10 groups of 50 ({} bytes, {} lines): \
         render {render_time:.1?}, first apply {first:.1?}, changed state median {:.1?} \
         (min {:.1?}, max {:.1?}), unchanged state {unchanged:.1?}, clear {clear:.1?}",
        script.len(),
        script.lines().count(),
        changes[changes.len() / 2],
        changes[0],
        changes[changes.len() - 1],
    );
    ensure!(
        unchanged < first,
        "an unchanged state is not cheaper to apply"
    );
    Ok(())
}
