//! `keel-bench network`: guest networks on a 3-node cluster whose hosts each run a
//! libvirtd. Prints a table and writes JSON.
//!
//! **Setup.** Network `bench` (10.80.0.0/24), security group `bench` (TCP 5201 and ICMP
//! from anywhere), and two VMs `x` and `y` from the tiny template, created stopped
//! (`--no-start`) in an anti-affinity group: placed on two different hosts, each of which
//! builds the network for its VM (bridge `kbr<VNI>`, VXLAN `kvx<VNI>`, router namespace,
//! firewall rules for the VM's tap) although no guest runs.
//!
//! **Stand-ins.** Guests run under TCG here: iperf3 in them would measure the emulator, not
//! the network. So for each VM a namespace takes over its NIC's identity: a veth whose
//! host end has the VM's tap name (`kt<mac>`) and is a port of the network's bridge, and
//! whose inner end `eth0` has the VM's MAC, address, the network's MTU and a default route
//! via the gateway. Its packets take a VM NIC's path: tap → bridge → firewall
//! (br_netfilter: anti-spoofing for that MAC and address, conntrack, the security group)
//! → VXLAN → the other host, and the same on the way in.
//!
//! 1. **Throughput**: iperf3 (TCP, one stream), stand-in x → stand-in y (overlay) and
//!    host of x → host of y on their underlay addresses (underlay), alternating, N rounds
//!    each, in the same run; medians and overlay/underlay, and the MTUs.
//! 2. **Security-group change → nftables**: a TCP rule on a fresh port added through
//!    the HTTPS API of the leader (`POST /api/v1/security-groups/bench/rules`, not the CLI:
//!    no process start in the figure), timed from just before the request until each host
//!    of x and y has it in its ruleset; the max over both hosts per round is "on every
//!    host". Listing the ruleset (`nft list table inet keel`) costs milliseconds of CPU
//!    per call: polling with it every 15 ms on two cores slows the very reconcile it
//!    waits for and adds up to a poll period to each figure. So each host's poller reads
//!    the namespace's nf_tables generation (`NFT_MSG_GETGEN`, a few µs, bumped by every
//!    committed transaction) every millisecond and runs `nft list` only when it changed;
//!    the time is the moment the first generation whose listing has the rule's `dport`
//!    was seen. The cost of one `nft list` (the floor of a plain polling loop) is
//!    reported beside it. The third host runs no VM of the network and never gets the
//!    rule (checked each round).
//! 3. **… → packets**: the same, timed until a TCP connect from stand-in x to a
//!    listener in stand-in y on the new port first succeeds (10 ms attempts; a SYN the
//!    old ruleset drops is simply lost, the next attempt sends a new one).
//!
//! Stand-in namespaces are named `kn<run>-241`/`-242` (the cluster's network run id), so
//! the harness's cleanup of its own network, and of stale runs, removes them too. VMs,
//! the network, the group and the security group are deleted at the end, also when a phase
//! fails.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use keel_adapters::nf_tables;
use keel_tests::cluster::{ApiClient, ClusterOptions, TestCluster};
use keel_tests::standin::{StandIn, StandInSpec};
use keel_tests::wait::{abort, millis, secs, wait_until, wait_until_blocking};
use serde_json::{json, Value};

use crate::compute::{delete_all, summary, summary_json, tiny_image, vm_place, Summary};

const NET: &str = "bench";
const CIDR: &str = "10.80.0.0/24";
const SG: &str = "bench";
const GROUP: &str = "bench-spread";
const IPERF_PORT: u16 = 5201;
/// Ports of the rules the propagation rounds add (one fresh port per round).
const RULE_PORT_BASE: u16 = 20000;
const CONNECT_PORT_BASE: u16 = 21000;
/// How often a host's nf_tables generation is read while waiting for a rule.
const GEN_POLL: Duration = Duration::from_millis(1);
/// One TCP connect attempt while waiting for a rule (a dropped SYN is lost: the next
/// attempt sends a new one).
const CONNECT_ATTEMPT: Duration = Duration::from_millis(10);
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before every propagation round (the previous round's reconciles settle).
const ROUND_PAUSE: Duration = Duration::from_millis(500);
/// Slots of the stand-in namespaces: `kn<run>-241` (x) and `kn<run>-242` (y).
const STANDIN_SLOTS: [usize; 2] = [241, 242];

struct Sizes {
    iperf_secs: u32,
    iperf_rounds: usize,
    sg_rounds: usize,
    connect_rounds: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `args[0] args[1..]`; its stdout, or an error with its stderr.
fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec NS args…`.
fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// The MTU of link `dev` in namespace `ns`.
fn link_mtu(ns: &str, dev: &str) -> Result<u32> {
    let out = sh(&["ip", "-n", ns, "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out).context("ip -j link show")?;
    v[0]["mtu"]
        .as_u64()
        .map(|m| m as u32)
        .ok_or_else(|| anyhow!("no mtu for {dev} in {ns}: {out}"))
}

/// Whether an nft listing has a rule matching destination port `port` exactly.
fn has_dport(listing: &str, port: u16) -> bool {
    let p = port.to_string();
    listing.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w[0] == "dport" && w[1] == p)
    })
}

/// Runs `f` on a new thread inside the network namespace `ns` (`/run/netns/<ns>`):
/// sockets it opens and processes it spawns belong to that namespace.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> tokio::sync::oneshot::Receiver<Result<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let r = (|| {
            let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            f()
        })();
        let _ = tx.send(r);
    });
    rx
}

async fn joined<T>(rx: tokio::sync::oneshot::Receiver<Result<T>>) -> Result<T> {
    rx.await
        .map_err(|_| anyhow!("a namespace thread ended without an answer"))?
}

/// A process this bench started; killed (by its pid) when dropped.
struct Proc {
    what: String,
    child: Child,
}

impl Proc {
    /// `ip netns exec NS args…`, output to `log`.
    fn spawn(what: &str, ns: &str, args: &[&str], log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {what}"))?;
        Ok(Proc {
            what: what.to_string(),
            child,
        })
    }

    /// Waits until something listens on TCP `port` in `ns` (without connecting to it).
    async fn wait_listening(&mut self, ns: &str, port: u16) -> Result<()> {
        let what = self.what.clone();
        let filter = format!("sport = :{port}");
        wait_until(
            format!("{what} to listen on port {port}"),
            secs(10),
            millis(50),
            || {
                let exited = self.child.try_wait().ok().flatten();
                let ns = ns.to_string();
                let filter = filter.clone();
                async move {
                    if let Some(status) = exited {
                        return Err(abort(format!("it exited with {status}")));
                    }
                    let out = ns_exec(&ns, &["ss", "-Hltn", &filter])?;
                    Ok((!out.trim().is_empty()).then_some(()))
                }
            },
        )
        .await?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VM as the cluster placed it.
struct Vm {
    name: String,
    host: usize,
    mac: String,
    ip: Ipv4Addr,
    /// The tap libvirt would create for its NIC: `kt` and the MAC's 12 hex digits.
    tap: String,
}

/// The guest network as the cluster made it.
struct Net {
    vni: u64,
    mtu: u32,
    prefix_len: u8,
    gateway: Ipv4Addr,
}

/// A namespace that takes over a stopped VM's NIC (see the module header).
fn stand_in(c: &TestCluster, slot: usize, vm: &Vm, net: &Net) -> Result<StandIn> {
    StandIn::create(
        c.net(),
        &StandInSpec {
            slot,
            host: Some(vm.host),
            port: &vm.tap,
            bridge: &format!("kbr{}", net.vni),
            mac: Some(&vm.mac),
            mtu: Some(net.mtu),
            addr: vm.ip,
            prefix_len: net.prefix_len,
            gateway: Some(net.gateway),
            // The firewall lets a tap send only IPv4 and ARP.
            no_ipv6: true,
        },
    )
}

/// A 3-node cluster with a libvirtd per host, the tiny template imported, and every host
/// up with a working hypervisor whose KVM probe is done (its probe guest would share the
/// CPUs with the measurements).
async fn form() -> Result<TestCluster> {
    let image = tiny_image()?;
    let opts = ClusterOptions {
        libvirt: true,
        // The node's default resync interval (the harness's default is 1 s for tests).
        compute_resync_ms: 5000,
        cli_timeout: Duration::from_secs(300),
        ..ClusterOptions::default()
    };
    let c = TestCluster::form_with(3, opts).await?;
    c.cli(
        0,
        &[
            "template",
            "import",
            &image.display().to_string(),
            "--name",
            "tiny",
            "--format",
            "qcow2",
        ],
    )
    .await?;
    wait_until(
        "every host up with a working hypervisor and its KVM probe done",
        secs(120),
        millis(300),
        || async {
            let hosts = c.nodes(0).await?;
            let hosts = hosts.as_array().cloned().unwrap_or_default();
            let ready = hosts.len() == c.len()
                && hosts.iter().all(|h| {
                    let inv = &h["inventory"];
                    let hv = &inv["hypervisor"];
                    let detail = inv["kvm_detail"].as_str().unwrap_or("");
                    let probed = !inv["kvm_usable"].is_null()
                        || (!detail.is_empty() && detail != "probe running");
                    h["health"] == "up" && hv.is_object() && hv["error"].is_null() && probed
                });
            if ready {
                Ok(Some(()))
            } else {
                Err(anyhow!("not yet: {}", Value::Array(hosts)))
            }
        },
    )
    .await?;
    Ok(c)
}

/// Runs the network benchmark, prints the table and writes the JSON report to `out_path`.
pub async fn run(quick: bool, out_path: &str) -> Result<()> {
    let sizes = if quick {
        Sizes {
            iperf_secs: 2,
            iperf_rounds: 3,
            sg_rounds: 3,
            connect_rounds: 1,
        }
    } else {
        Sizes {
            iperf_secs: 5,
            iperf_rounds: 3,
            sg_rounds: 10,
            connect_rounds: 3,
        }
    };
    eprintln!("keel-bench: forming a 3-node cluster with a libvirtd per host");
    let c = form().await?;
    // The stand-ins and servers live inside `phases`: gone before the cleanup below.
    let r = phases(&c, &sizes, quick, out_path).await;
    if r.is_err() {
        c.mark_failed();
    }
    if let Err(e) = cleanup(&c).await {
        eprintln!("keel-bench: cleanup: {e:#}");
        c.mark_failed();
    }
    drop(c);
    r
}

/// Deletes the VMs, then whichever of the network, security group and affinity group
/// exist.
async fn cleanup(c: &TestCluster) -> Result<()> {
    let i = c.leader().await?;
    delete_all(c, i).await?;
    let has = |list: &Value, name: &str| {
        list.as_array()
            .is_some_and(|a| a.iter().any(|o| o["name"] == name))
    };
    if has(&c.cli(i, &["net", "list"]).await?, NET) {
        c.cli(i, &["net", "delete", NET]).await?;
    }
    if has(&c.cli(i, &["sg", "list"]).await?, SG) {
        c.cli(i, &["sg", "delete", SG]).await?;
    }
    if has(&c.cli(i, &["vm", "group", "list"]).await?, GROUP) {
        c.cli(i, &["vm", "group", "delete", GROUP]).await?;
    }
    Ok(())
}

/// `vm show`: where the VM is and its first NIC.
async fn vm_info(c: &TestCluster, i: usize, name: &str) -> Result<Vm> {
    let (_, host) = vm_place(c, i, name).await?;
    let v = c.cli(i, &["vm", "show", name]).await?;
    let nic = &v["nics"][0];
    let mac = nic["mac"]
        .as_str()
        .ok_or_else(|| anyhow!("{name} has no NIC: {v}"))?
        .to_lowercase();
    let ip: Ipv4Addr = nic["ip"]
        .as_str()
        .ok_or_else(|| anyhow!("{name}'s NIC has no address: {v}"))?
        .parse()?;
    let tap = format!("kt{}", mac.replace(':', ""));
    Ok(Vm {
        name: name.to_string(),
        host,
        mac,
        ip,
        tap,
    })
}

struct Mtus {
    underlay: u32,
    network: u32,
    vxlan: u32,
    bridge: u32,
    standin: u32,
}

struct Iperf {
    gbps: f64,
    retransmits: u64,
}

/// `iperf3 -c ADDR -t SECS -J` in namespace `ns`: the receiver's rate.
async fn iperf(ns: &str, addr: &str, t: u32) -> Result<Iperf> {
    let t_s = t.to_string();
    let port = IPERF_PORT.to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(u64::from(t) + 30),
        tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-c", addr, "-p", &port])
            .args(["-t", &t_s, "-J"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("iperf3 -c {addr} in {ns} did not finish"))?
    .context("run iperf3")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).map_err(|_| {
        anyhow!(
            "iperf3 -c {addr} in {ns}: no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 -c {addr} in {ns}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 -c {addr} in {ns}: no end.sum_received"))?;
    Ok(Iperf {
        gbps: bps / 1e9,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// What one host's poller saw.
struct Seen {
    /// From the start of the request to the moment the poller first saw the generation
    /// whose ruleset has the rule.
    ms: f64,
    /// Commits seen before that one (other transactions in the namespace).
    other_commits: u32,
    /// Duration of every `nft list` it ran.
    list_ms: Vec<f64>,
}

/// In a host's namespace: reads the nf_tables generation, says it is ready, waits for
/// the start instant, then reads the generation every [`GEN_POLL`] and, whenever it
/// changed, lists `inet keel`, until a rule with `dport PORT` is there. Nothing costly
/// runs between the start and the first change.
fn poll_nft(
    ready: tokio::sync::oneshot::Sender<()>,
    start: std::sync::mpsc::Receiver<Instant>,
    port: u16,
) -> Result<Seen> {
    let mut last = nf_tables::ruleset_generation()?;
    let _ = ready.send(());
    let t0 = start.recv().context("no start")?;
    let mut list_ms = Vec::new();
    let mut changes = 0u32;
    let seen_ms = wait_until_blocking(
        format!("a rule with dport {port} in table inet keel"),
        PROPAGATION_TIMEOUT,
        GEN_POLL,
        || {
            let generation = nf_tables::ruleset_generation()?;
            if generation == last {
                return Ok(None);
            }
            let seen = Instant::now();
            last = generation;
            changes += 1;
            let out = Command::new("nft")
                .args(["list", "table", "inet", "keel"])
                .stdin(Stdio::null())
                .output()
                .context("run nft")?;
            list_ms.push(ms(seen.elapsed()));
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(has_dport(&text, port).then(|| ms(seen - t0)))
        },
    )?;
    Ok(Seen {
        ms: seen_ms,
        // The last change is the one with the rule.
        other_commits: changes.saturating_sub(1),
        list_ms,
    })
}

/// `POST /api/v1/security-groups/bench/rules`: allow TCP `port` from anywhere.
async fn add_rule(api: &ApiClient, port: u16) -> Result<()> {
    let path = keel_client::paths::security_group_rules(SG);
    let resp = api
        .request(reqwest::Method::POST, &path)
        .json(
            &json!({"direction": "ingress", "protocol": "tcp", "port_min": port, "port_max": port}),
        )
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("POST {path}: HTTP {status}: {body}");
    }
    Ok(())
}

/// One propagation round through nftables.
struct SgRound {
    port: u16,
    api_ms: f64,
    /// Per host of x and y (in `hosts` order).
    seen: Vec<Seen>,
    /// What the third host's `inet keel` had after the others got the rule.
    third: &'static str,
}

impl SgRound {
    fn every_host_ms(&self) -> f64 {
        self.seen.iter().map(|s| s.ms).fold(0.0, f64::max)
    }
}

async fn sg_round(
    c: &TestCluster,
    api: &ApiClient,
    hosts: &[usize],
    third: Option<usize>,
    port: u16,
) -> Result<SgRound> {
    let mut starts = Vec::new();
    let mut pollers = Vec::new();
    for &h in hosts {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        starts.push(tx);
        let poller = in_ns(&c.net().ns(h), move || poll_nft(ready_tx, rx, port));
        // A poller that could not start: its answer says why.
        if ready_rx.await.is_err() {
            joined(poller)
                .await
                .with_context(|| format!("on {}", c.name(h)))?;
            bail!("the poller on {} ended early", c.name(h));
        }
        pollers.push(poller);
    }
    let t0 = Instant::now();
    for s in &starts {
        let _ = s.send(t0);
    }
    add_rule(api, port).await?;
    let api_ms = ms(t0.elapsed());
    let mut seen = Vec::new();
    for (p, h) in pollers.into_iter().zip(hosts) {
        seen.push(
            joined(p)
                .await
                .with_context(|| format!("on {}", c.name(*h)))?,
        );
    }
    let third = match third {
        None => "none",
        Some(h) => match ns_exec(&c.net().ns(h), &["nft", "list", "table", "inet", "keel"]) {
            Err(_) => "no table",
            Ok(t) if has_dport(&t, port) => "HAS THE RULE",
            Ok(_) => "table without the rule",
        },
    };
    Ok(SgRound {
        port,
        api_ms,
        seen,
        third,
    })
}

/// One propagation round measured with packets: ms from the request until a TCP connect
/// from stand-in x to a listener in stand-in y on the rule's port first succeeded, and
/// the number of attempts.
async fn connect_round(
    api: &ApiClient,
    x: &StandIn,
    y: &StandIn,
    y_ip: Ipv4Addr,
    port: u16,
) -> Result<(f64, u32)> {
    // A listener in y (the kernel completes handshakes into its backlog: no accept needed).
    let listener: TcpListener = joined(in_ns(y.ns(), move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).context("listen in stand-in y")
    }))
    .await?;
    let dst = SocketAddr::V4(SocketAddrV4::new(y_ip, port));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (start_tx, start_rx) = std::sync::mpsc::channel::<Instant>();
    let prober = in_ns(x.ns(), move || {
        // Without the rule the SYN is dropped: the port must be closed now.
        if TcpStream::connect_timeout(&dst, millis(300)).is_ok() {
            bail!("{dst} answered before its rule was added: the security group does not filter");
        }
        let _ = ready_tx.send(());
        let t0 = start_rx.recv().context("no start")?;
        let mut attempts = 0u32;
        let ms_ok = wait_until_blocking(
            format!("a TCP connect to {dst}"),
            PROPAGATION_TIMEOUT,
            millis(1),
            || {
                attempts += 1;
                match TcpStream::connect_timeout(&dst, CONNECT_ATTEMPT) {
                    Ok(_) => Ok(Some(ms(t0.elapsed()))),
                    Err(e) => Err(e.into()),
                }
            },
        )?;
        Ok((ms_ok, attempts))
    });
    // The prober's check failed (or its thread died): its answer says why.
    if ready_rx.await.is_err() {
        return joined(prober).await;
    }
    let t0 = Instant::now();
    let _ = start_tx.send(t0);
    add_rule(api, port).await?;
    let r = joined(prober).await;
    drop(listener);
    r
}

async fn phases(c: &TestCluster, sizes: &Sizes, quick: bool, out_path: &str) -> Result<()> {
    let leader = c.leader().await?;
    let cli = move |args: &'static [&'static str]| c.cli(leader, args);

    // ---- setup ------------------------------------------------------------------------
    cli(&["net", "create", NET, "--cidr", CIDR]).await?;
    cli(&["sg", "create", SG]).await?;
    cli(&[
        "sg",
        "rule",
        "add",
        SG,
        "--protocol",
        "tcp",
        "--port",
        "5201",
    ])
    .await?;
    cli(&["sg", "rule", "add", SG, "--protocol", "icmp"]).await?;
    cli(&["vm", "group", "create", GROUP, "--policy", "anti-affinity"]).await?;
    let nic = format!("{NET},sg={SG}");
    for name in ["x", "y"] {
        c.cli(
            leader,
            &[
                "vm",
                "create",
                name,
                "--template",
                "tiny",
                "--memory",
                "128M",
                "--nic",
                &nic,
                "--affinity-group",
                GROUP,
                "--no-start",
            ],
        )
        .await?;
    }
    let nv = cli(&["net", "show", NET]).await?;
    let net = Net {
        vni: nv["vni"].as_u64().ok_or_else(|| anyhow!("no vni: {nv}"))?,
        mtu: nv["mtu"].as_u64().ok_or_else(|| anyhow!("no mtu: {nv}"))? as u32,
        prefix_len: nv["cidr"]
            .as_str()
            .and_then(|s| s.split_once('/'))
            .and_then(|(_, l)| l.parse().ok())
            .ok_or_else(|| anyhow!("no cidr: {nv}"))?,
        gateway: nv["gateway"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| anyhow!("no gateway: {nv}"))?,
    };
    let x = vm_info(c, leader, "x").await?;
    let y = vm_info(c, leader, "y").await?;
    if x.host == y.host {
        bail!(
            "x and y are both on {} despite their anti-affinity group",
            c.name(x.host)
        );
    }
    let third = (0..c.len()).find(|h| *h != x.host && *h != y.host);
    eprintln!(
        "keel-bench: network {NET} VNI {} MTU {}; x ({}, {}) on {}, y ({}, {}) on {}",
        net.vni,
        net.mtu,
        x.ip,
        x.mac,
        c.name(x.host),
        y.ip,
        y.mac,
        c.name(y.host)
    );
    let bridge = format!("kbr{}", net.vni);
    for vm in [&x, &y] {
        let ns = c.net().ns(vm.host);
        let (bridge, tap) = (bridge.clone(), vm.tap.clone());
        wait_until(
            format!(
                "{bridge} and the firewall of {}'s tap on {}",
                vm.name,
                c.name(vm.host)
            ),
            secs(60),
            millis(100),
            || {
                let (ns, bridge, tap) = (ns.clone(), bridge.clone(), tap.clone());
                async move {
                    sh(&["ip", "-n", &ns, "link", "show", &bridge])?;
                    let fw = ns_exec(&ns, &["nft", "list", "table", "bridge", "keel"])?;
                    Ok(fw.contains(&tap).then_some(()))
                }
            },
        )
        .await?;
    }

    // ---- stand-ins ----------------------------------------------------------------------
    let sx = stand_in(c, STANDIN_SLOTS[0], &x, &net)?;
    let sy = stand_in(c, STANDIN_SLOTS[1], &y, &net)?;
    for (from, to) in [(("x", &sx), &y), (("y", &sy), &x)] {
        let ns = from.1.ns().to_string();
        let ip = to.ip.to_string();
        wait_until(
            format!("a ping from {}'s stand-in to {} ({ip})", from.0, to.name),
            secs(30),
            millis(200),
            || {
                let (ns, ip) = (ns.clone(), ip.clone());
                async move { ns_exec(&ns, &["ping", "-c1", "-W1", &ip]).map(|_| Some(())) }
            },
        )
        .await?;
    }
    let host_x_ns = c.net().ns(x.host);
    let host_y_ns = c.net().ns(y.host);
    let mtus = Mtus {
        underlay: link_mtu(&host_x_ns, "eth0")?,
        network: net.mtu,
        vxlan: link_mtu(&host_x_ns, &format!("kvx{}", net.vni))?,
        bridge: link_mtu(&host_x_ns, &bridge)?,
        standin: link_mtu(sx.ns(), "eth0")?,
    };

    // ---- 1. throughput ------------------------------------------------------------------
    let load_start = loadavg();
    let logs = c.dir().join("bench-network");
    std::fs::create_dir_all(&logs)?;
    let port = IPERF_PORT.to_string();
    let underlay_y = c.net().ip(y.host).to_string();
    let mut overlay_server = Proc::spawn(
        "iperf3 -s in y's stand-in",
        sy.ns(),
        &["iperf3", "-s", "-p", &port],
        &logs.join("iperf3-overlay.log"),
    )?;
    overlay_server.wait_listening(sy.ns(), IPERF_PORT).await?;
    let mut underlay_server = Proc::spawn(
        &format!("iperf3 -s on {}", c.name(y.host)),
        &host_y_ns,
        &["iperf3", "-s", "-p", &port, "-B", &underlay_y],
        &logs.join("iperf3-underlay.log"),
    )?;
    underlay_server
        .wait_listening(&host_y_ns, IPERF_PORT)
        .await?;
    let mut overlay = Vec::new();
    let mut underlay = Vec::new();
    for r in 0..sizes.iperf_rounds {
        let o = iperf(sx.ns(), &y.ip.to_string(), sizes.iperf_secs).await?;
        eprintln!(
            "keel-bench: throughput round {r}: overlay {:.2} Gbit/s ({} retransmits)",
            o.gbps, o.retransmits
        );
        overlay.push(o);
        let u = iperf(&host_x_ns, &underlay_y, sizes.iperf_secs).await?;
        eprintln!(
            "keel-bench: throughput round {r}: underlay {:.2} Gbit/s ({} retransmits)",
            u.gbps, u.retransmits
        );
        underlay.push(u);
    }
    drop(overlay_server);
    drop(underlay_server);
    let overlay_s = summary(overlay.iter().map(|i| i.gbps).collect());
    let underlay_s = summary(underlay.iter().map(|i| i.gbps).collect());
    let ratio = overlay_s.p50 / underlay_s.p50;

    // ---- 2. security-group change → nftables on every host ---------------------------
    let api = c.api(leader)?;
    let hosts = [x.host, y.host];
    // The floor: `nft list table inet keel` on an idle host of the network.
    let mut idle_list = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        ns_exec(&host_x_ns, &["nft", "list", "table", "inet", "keel"])?;
        idle_list.push(ms(t.elapsed()));
    }
    let mut rounds = Vec::new();
    for r in 0..sizes.sg_rounds {
        tokio::time::sleep(ROUND_PAUSE).await;
        let port = RULE_PORT_BASE + r as u16;
        let round = sg_round(c, &api, &hosts, third, port)
            .await
            .with_context(|| format!("propagation round {r} (port {port})"))?;
        eprintln!(
            "keel-bench: rule round {r} (tcp {port}): API {:.0} ms; {}; third host: {}",
            round.api_ms,
            round
                .seen
                .iter()
                .zip(&hosts)
                .map(|(s, h)| format!("{} {:.1} ms", c.name(*h), s.ms))
                .collect::<Vec<_>>()
                .join(", "),
            round.third
        );
        rounds.push(round);
    }
    let per_host: Vec<Summary> = (0..hosts.len())
        .map(|k| summary(rounds.iter().map(|r| r.seen[k].ms).collect()))
        .collect();
    let every = summary(rounds.iter().map(SgRound::every_host_ms).collect());
    let api_s = summary(rounds.iter().map(|r| r.api_ms).collect());
    let polling_list = summary(
        rounds
            .iter()
            .flat_map(|r| r.seen.iter().flat_map(|s| s.list_ms.iter().copied()))
            .collect(),
    );
    let idle_list = summary(idle_list);
    let third_states: Vec<&str> = rounds.iter().map(|r| r.third).collect();
    let third_ok = third_states.iter().all(|s| *s != "HAS THE RULE");

    // ---- 3. … → packets -------------------------------------------------------------
    let mut connects = Vec::new();
    let mut attempts = Vec::new();
    for r in 0..sizes.connect_rounds {
        tokio::time::sleep(ROUND_PAUSE).await;
        let port = CONNECT_PORT_BASE + r as u16;
        let (t, n) = connect_round(&api, &sx, &sy, y.ip, port)
            .await
            .with_context(|| format!("connect round {r} (port {port})"))?;
        eprintln!("keel-bench: connect round {r} (tcp {port}): {t:.0} ms, {n} attempts");
        connects.push(t);
        attempts.push(n);
    }
    let connect_s = summary(connects);
    drop(sx);
    drop(sy);

    // ---- report -------------------------------------------------------------------------
    let load_end = loadavg();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = sh(&["uname", "-r"]).unwrap_or_default().trim().to_string();
    println!(
        "\nKeel network benchmark (3 nodes in network namespaces, a libvirtd each, {cores} cores, \
         kernel {kernel}; load average {} before the measurements, {} after)",
        load_start.join(" "),
        load_end.join(" ")
    );
    println!(
        "network {NET} {CIDR}, VNI {}; VMs x ({}) on {} and y ({}) on {}, stopped; stand-in \
         namespaces on their taps",
        net.vni,
        x.ip,
        c.name(x.host),
        y.ip,
        c.name(y.host)
    );
    println!(
        "MTU: underlay eth0 {}, network {} (bridge {}, VXLAN {}, stand-in eth0 {})",
        mtus.underlay, mtus.network, mtus.bridge, mtus.vxlan, mtus.standin
    );
    println!(
        "\n{:<58} {:>8} {:>8} {:>8}",
        format!(
            "iperf3 TCP, 1 stream, {} s × {} rounds, Gbit/s",
            sizes.iperf_secs, sizes.iperf_rounds
        ),
        "median",
        "min",
        "max"
    );
    let grow = |name: &str, s: &Summary| {
        println!("{:<58} {:>8.2} {:>8.2} {:>8.2}", name, s.p50, s.min, s.max);
    };
    grow(
        "overlay: stand-in x → stand-in y (tap, nft, VXLAN)",
        &overlay_s,
    );
    grow(
        &format!(
            "underlay: {} eth0 → {} eth0",
            c.name(x.host),
            c.name(y.host)
        ),
        &underlay_s,
    );
    println!("overlay / underlay (medians): {ratio:.2}");

    println!(
        "\n{:<58} {:>8} {:>8} {:>8}",
        format!(
            "rule added (API on {}, leader) → in nftables, {} rounds, ms",
            c.name(leader),
            rounds.len()
        ),
        "p50",
        "min",
        "max"
    );
    let row = |name: &str, s: &Summary| {
        println!("{:<58} {:>8.1} {:>8.1} {:>8.1}", name, s.p50, s.min, s.max);
    };
    for (k, h) in hosts.iter().enumerate() {
        let vm = if k == 0 { "x" } else { "y" };
        row(&format!("  on {} (host of {vm})", c.name(*h)), &per_host[k]);
    }
    row("  on every host (max per round)", &every);
    row("  API request alone (POST → 201)", &api_s);
    row(
        "  one `nft list table inet keel` (a poll's floor), idle",
        &idle_list,
    );
    row("  … the same during the rounds", &polling_list);
    if let Some(t) = third {
        println!(
            "third host {} (no VM of {NET}): {} ({})",
            c.name(t),
            if third_ok {
                "did not get the rule in any round"
            } else {
                "GOT THE RULE"
            },
            dedup(&third_states).join(", ")
        );
    }
    row(
        &format!(
            "\nrule added → first TCP connect x → y on its port, {} round{}",
            connect_s.samples.len(),
            if connect_s.samples.len() == 1 {
                ""
            } else {
                "s"
            }
        ),
        &connect_s,
    );

    let per_host_json: serde_json::Map<String, Value> = hosts
        .iter()
        .enumerate()
        .map(|(k, h)| {
            (
                c.name(*h).to_string(),
                json!({
                    "vm": if k == 0 { "x" } else { "y" },
                    "seen_ms": summary_json(&per_host[k]),
                    "other_commits_before": rounds.iter().map(|r| r.seen[k].other_commits).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    let names: Vec<String> = (0..c.len()).map(|i| c.name(i).to_string()).collect();
    let report = json!({
        "bench": "network",
        "quick": quick,
        "nodes": c.len(),
        "node_names": names,
        "cores": cores,
        "kernel": kernel,
        "mem_total_mib": mem_total_mib(),
        "loadavg": {"before": load_start, "after": load_end},
        "network": {"name": NET, "cidr": CIDR, "vni": net.vni},
        "vms": {
            "x": {"host": c.name(x.host), "ip": x.ip.to_string(), "mac": x.mac, "tap": x.tap},
            "y": {"host": c.name(y.host), "ip": y.ip.to_string(), "mac": y.mac, "tap": y.tap},
        },
        "mtu": {
            "underlay": mtus.underlay,
            "network": mtus.network,
            "bridge": mtus.bridge,
            "vxlan": mtus.vxlan,
            "standin_eth0": mtus.standin,
        },
        "throughput_gbps": {
            "tool": "iperf3 TCP, 1 stream",
            "seconds": sizes.iperf_secs,
            "rounds": sizes.iperf_rounds,
            "overlay": summary_json(&overlay_s),
            "overlay_retransmits": overlay.iter().map(|i| i.retransmits).collect::<Vec<_>>(),
            "underlay": summary_json(&underlay_s),
            "underlay_retransmits": underlay.iter().map(|i| i.retransmits).collect::<Vec<_>>(),
            "ratio_overlay_underlay": ratio,
        },
        "sg_rule_to_nftables_ms": {
            "via": format!("HTTPS API of {} (leader)", c.name(leader)),
            "rounds": rounds.len(),
            "method": "nf_tables generation read every 1 ms; on each change `nft list table inet keel`",
            "per_host": per_host_json,
            "every_host": summary_json(&every),
            "api_request": summary_json(&api_s),
            "nft_list_idle": summary_json(&idle_list),
            "nft_list_while_polling": summary_json(&polling_list),
            "third_host": third.map(|t| c.name(t)),
            "third_host_rounds": third_states,
            "third_host_never_had_rule": third_ok,
            "ports": rounds.iter().map(|r| r.port).collect::<Vec<_>>(),
        },
        "sg_rule_to_tcp_connect_ms": {
            "attempt_timeout_ms": ms(CONNECT_ATTEMPT),
            "result": summary_json(&connect_s),
            "attempts": attempts,
        },
    });
    crate::write_report(out_path, &report)?;
    println!("\nwrote {out_path}");
    Ok(())
}

/// `items` without repeats, in first-seen order.
fn dedup<'a>(items: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(i) {
            out.push(i);
        }
    }
    out
}

/// The 1, 5 and 15 minute load averages (other work on the machine skews every figure).
fn loadavg() -> Vec<String> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .map(str::to_string)
        .collect()
}

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dport_matches_whole_ports_only() {
        let t = "\tchain ingress_3 {\n\t\ttcp dport 5201 accept\n\t\ttcp dport 20001 accept\n";
        assert!(has_dport(t, 5201));
        assert!(has_dport(t, 20001));
        assert!(!has_dport(t, 2000));
        assert!(!has_dport(t, 520));
    }
}
