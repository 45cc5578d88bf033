//! Multi-host tests, by topic, plus helpers they share.
//!
//! * `plumbing` — the harness itself with stand-in processes: namespaces, bridge,
//!   partitions, heal, kill/stop/restart, cleanup.
//! * `cluster` — `TestCluster` against the real `keel` binary.
//! * `formation` — three nodes formed with tokens: voters, health, inventory, the HTTPS API.
//! * `voters` — five voters as the cluster grows; a lost voter replaced by a learner.
//! * `failover` — leader kill -9: a new leader, duties move, the old one rejoins.
//! * `partition` — a minority cannot commit, the majority goes on, healing converges.
//! * `durability` — restarting every node keeps every committed entry.
//! * `tokens` — reused, forged, garbage and foreign-CA join tokens change nothing.
//! * `peer_port` — the mTLS peer port refuses plain TCP, HTTP and foreign certificates.
//! * `bad_input` — `keel serve` refuses bad configs, busy ports, bad data dirs.
//! * `witness` — two servers and a witness survive losing a server.
//! * `disk_full` — a follower whose disk fills recovers when space returns.
//! * `dnsmasq_adapter` — the dnsmasq `Dhcp` adapter against real dnsmasq processes in
//!   namespaces: leases, local-only DNS, reload, restart, adoption, stop, failed starts.
//! * `firewall_adapter` — the nftables `Firewall` against real packets in namespace hosts:
//!   security groups, anti-spoofing, conntrack zones, the distributed gateway, apply cost.
//! * `libvirt_adapter` — the libvirt `Hypervisor` against real libvirtd daemons: lifecycle,
//!   console, reconnect after a daemon restart, live migration.
//! * `netlink_adapter` — the netlink `Links` in namespace hosts: VXLAN networks between
//!   stand-in VMs, local gateways, idempotence and repair, same-CIDR isolation, removal.
//! * `nat_adapter` — the uplink of the netlink `Links` and the nftables `Nat` with real
//!   packets: SNAT, 1:1 floating IPs, port forwards, hairpin, same-CIDR external networks.
//! * `network` — guest networks end to end with real guests on three hosts: DHCP leases,
//!   DNS names, cross-host traffic over VXLAN, same-CIDR isolation, security-group
//!   changes on real packets, anti-spoofing, rebuild after a restart with links flushed;
//!   external networks: SNAT to an outside namespace, floating IPs 1:1 and port forwards.

mod bad_input;
mod cluster;
mod compute;
mod disk_full;
mod dnsmasq_adapter;
mod durability;
mod failover;
mod firewall_adapter;
mod formation;
mod join_flood;
mod libvirt_adapter;
mod nat_adapter;
mod netlink_adapter;
mod network;
mod partition;
mod peer_authz;
mod peer_port;
mod plumbing;
mod removal;
mod tokens;
mod voters;
mod witness;

use keel_client::paths;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keel_adapters::links::netlink::Netlink;
use keel_adapters::links::{gateway_mac, GatewayLink, Links, NetworkLinks, Underlay};
use keel_tests::cluster::{ClusterOptions, TestCluster};
use keel_tests::process::{ManagedProcess, ProcessSpec};
use keel_tests::wait::{millis, wait_until};
use keel_tests::TestNet;
use serde_json::Value;

/// Port the stand-in servers listen on.
pub const STAND_IN_PORT: u16 = 8000;

/// A tiny TCP server: answers every connection with its name and closes. With `forks`,
/// it first forks a child that sleeps in the same process group (and prints the child's
/// pid as `child=PID`); with `ignore_term`, it ignores SIGTERM.
const STAND_IN: &str = r#"
import os, signal, socket, sys, time
name, port, forks, ignore_term = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if forks:
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(60)
    print(f"child={pid}", flush=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
print(f"{name} listening on {port}", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(name.encode() + b"\n")
    c.close()
"#;

pub fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        system
    } else {
        PathBuf::from("python3")
    }
}

/// Spawns the stand-in server in host `i` of `net`, logging into `log_dir`.
pub fn stand_in(
    net: &TestNet,
    i: usize,
    log_dir: &std::path::Path,
    forks: bool,
    ignore_term: bool,
) -> ManagedProcess {
    let name = format!("standin{}", i + 1);
    let spec = ProcessSpec::new(&name, python(), log_dir)
        .netns(net.ns(i))
        .args(["-u", "-c", STAND_IN, &name, &STAND_IN_PORT.to_string()])
        .arg(if forks { "1" } else { "0" })
        .arg(if ignore_term { "1" } else { "0" });
    ManagedProcess::spawn(spec).expect("spawn stand-in")
}

/// Network `vni` for the links adapter of host `h` of `net` (`netlink_adapter`,
/// `nat_adapter`): underlay `eth0`, tunnels to `peers`, gateway `gateway`/24 with Keel's
/// MAC for the VNI; no remote MACs, no taps, no uplink.
pub fn network_links(
    net: &TestNet,
    h: usize,
    vni: u32,
    mtu: u32,
    peers: &[usize],
    gateway: std::net::Ipv4Addr,
) -> NetworkLinks {
    NetworkLinks {
        local_taps: Default::default(),
        uplink: None,
        vni,
        mtu,
        underlay: Underlay {
            dev: "eth0".into(),
            ip: net.ip(h),
        },
        peers: peers.iter().map(|&p| net.ip(p)).collect(),
        remote_macs: Default::default(),
        gateway: GatewayLink {
            addr: gateway,
            prefix_len: 24,
            mac: gateway_mac(vni),
        },
    }
}

/// Runs `program args…` inside the router namespace of `vni` that `links` manages.
pub fn in_router(links: &Netlink, vni: u32, program: &str, args: &[&str]) -> Result<String> {
    let net_arg = format!("--net={}", links.router_netns(vni).display());
    let mut full = vec![net_arg.as_str(), program];
    full.extend_from_slice(args);
    Ok(keel_tests::cmd::run("nsenter", &full)?)
}

/// Unmounts the router namespaces under `<dir>/h<h>` for `hosts` hosts that a failed test
/// did not remove, so that the temporary directory can go.
pub fn unmount_routers(dir: &Path, hosts: usize) {
    for h in 0..hosts {
        let dir = dir.join(format!("h{h}"));
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Short duty timings for tests that watch health and voter changes happen.
pub const FAST_DUTIES: &str = "[duties]
heartbeat_interval_ms = 300
suspect_after_ms = 1000
down_after_ms = 2500
voter_replace_after_ms = 4000
tick_ms = 200
";

/// A `keel serve --config` file that lives as long as the returned guard, and cluster
/// options that pass it to every node.
pub fn with_config(toml: &str) -> Result<(tempfile::TempPath, ClusterOptions)> {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .prefix("keel-test-config-")
        .suffix(".toml")
        .tempfile()?;
    f.write_all(toml.as_bytes())?;
    let path = f.into_temp_path();
    let opts = ClusterOptions {
        config_toml: toml.to_string(),
        ..ClusterOptions::default()
    };
    Ok((path, opts))
}

/// A CLI call on host `i` that may fail without marking the test failed (for probes
/// inside waits); parses the JSON output.
pub async fn cli_quiet(c: &TestCluster, i: usize, args: &[&str]) -> Result<Value> {
    let out = c.cli_raw(i, args).await?;
    if !out.success() {
        bail!(
            "{} keel {}: {}",
            c.name(i),
            args.join(" "),
            out.stderr.trim()
        );
    }
    Ok(serde_json::from_str(&out.stdout)?)
}

/// `(voters, learners)` as host `i` sees them.
pub async fn roles(c: &TestCluster, i: usize) -> Result<(Vec<u64>, Vec<u64>)> {
    let s = cli_quiet(c, i, &["cluster", "status"]).await?;
    let ids = |k: &str| -> Vec<u64> {
        let mut v: Vec<u64> = s[k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    };
    Ok((ids("voters"), ids("learners")))
}

/// Waits until the leader's membership has exactly `n` voters; returns them.
pub async fn wait_voters(c: &TestCluster, n: usize, timeout: Duration) -> Result<Vec<u64>> {
    Ok(
        wait_until(format!("{n} voters"), timeout, millis(200), || async {
            let leader = c.leader().await?;
            let (voters, learners) = roles(c, leader).await?;
            if voters.len() == n {
                Ok(Some(voters))
            } else {
                Err(anyhow!("voters {voters:?}, learners {learners:?}"))
            }
        })
        .await?,
    )
}

/// The host named `name` in a `node list` answer.
pub fn host_named<'a>(nodes: &'a Value, name: &str) -> Result<&'a Value> {
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name))
        .ok_or_else(|| anyhow!("no host {name} in {nodes}"))
}

/// Every setting host `i` holds, as sorted `(key, value)` pairs, read over HTTPS.
pub async fn settings(c: &TestCluster, i: usize) -> Result<Vec<(String, String)>> {
    let list = c.api(i)?.get(paths::SETTINGS).await?;
    let mut out: Vec<(String, String)> = list
        .as_array()
        .ok_or_else(|| anyhow!("settings list is not an array: {list}"))?
        .iter()
        .map(|s| {
            (
                s["key"].as_str().unwrap_or_default().to_string(),
                s["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until host `i` holds setting `key` with `value`.
pub async fn wait_setting(
    c: &TestCluster,
    i: usize,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<()> {
    wait_until(
        format!("{} to hold setting {key}={value}", c.name(i)),
        timeout,
        millis(200),
        || async {
            let got = c.api(i)?.get_setting(key).await?;
            if got["value"] == value {
                Ok(Some(()))
            } else {
                Err(anyhow!("{got}"))
            }
        },
    )
    .await?;
    Ok(())
}

/// Writes a setting through host `i`, retrying for a few seconds while the cluster
/// settles (a leader elected a moment ago).
pub async fn put_setting_settled(c: &TestCluster, i: usize, key: &str, value: &str) -> Result<()> {
    let api = c.api(i)?;
    wait_until(
        format!("a write of {key} through {} to commit", c.name(i)),
        Duration::from_secs(15),
        millis(250),
        || async { api.put_setting(key, value).await.map(Some) },
    )
    .await?;
    Ok(())
}

/// An HTTP/1.1 request on a node's admin socket (unaffected by network partitions):
/// returns the status and the JSON body (`Null` when empty).
pub async fn socket_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connect {}", socket.display()))?;
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            anyhow!(
                "{method} {path} on {}: no answer within {timeout:?}",
                socket.display()
            )
        })??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer: {raw:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked answers are not handled: {raw:?}");
    }
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("body is not JSON: {body:?}"))?
    };
    Ok((status, json))
}
