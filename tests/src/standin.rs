//! Stand-in VMs: a network namespace whose `eth0` is one end of a veth pair and whose
//! other end, named like a VM's tap, is a port of a bridge, either in a [`TestNet`] host
//! or in the test process's own namespace:
//!
//! ```text
//!  host namespace kn<run>-<h> (or the test process's)    stand-in namespace kn<run>-<slot>
//!  <bridge> ── <port> ═══════════ veth ═══════════════════ eth0 <addr>/<prefix> [MAC]
//!                                                          default via <gateway>
//! ```
//!
//! Stand-in namespaces are named like the harness's hosts (`kn<run>-<slot>`, with a slot
//! above the host count), so [`TestNet`]'s cleanup, and that of stale runs, removes them
//! too. [`StandIn`]'s `Drop` kills what still runs in it and deletes the namespace and the
//! port.
//!
//! Also here: [`load_nft`] (an nftables script into a host), [`isolate_gateways`] (the
//! stand-in for the firewall's gateway isolation), [`ping`]/[`wait_ping`] from a
//! namespace, and [`in_netns`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};

use crate::cmd;
use crate::wait::{millis, secs, wait_until_blocking};
use crate::TestNet;

/// What a [`StandIn`] looks like.
#[derive(Debug, Clone)]
pub struct StandInSpec<'a> {
    /// The namespace is `kn<run>-<slot>`; keep it above the host count.
    pub slot: usize,
    /// The host whose namespace gets the port; `None`: the test process's namespace.
    pub host: Option<usize>,
    /// The name of the host end (a VM's tap name).
    pub port: &'a str,
    /// The bridge the port is enslaved to.
    pub bridge: &'a str,
    /// `eth0`'s MAC address; the kernel picks one when `None`.
    pub mac: Option<&'a str>,
    /// The MTU of both ends; the default when `None`.
    pub mtu: Option<u32>,
    /// `eth0`'s address and prefix length.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The default route's gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Disables IPv6 in the namespace before `eth0` comes up (a Keel tap lets only IPv4
    /// and ARP out).
    pub no_ipv6: bool,
}

/// A stand-in VM (see the module header); removed when dropped.
#[derive(Debug)]
pub struct StandIn {
    ns: String,
    /// `None`: the port is in the test process's namespace.
    host_ns: Option<String>,
    port: String,
    ip: Ipv4Addr,
}

/// `ip [-n NS] args…`.
fn ip_in(ns: Option<&str>, args: &[&str]) -> Result<String, cmd::CmdError> {
    let mut full: Vec<&str> = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = ns {
        full.extend(["-n", ns]);
    }
    full.extend_from_slice(args);
    cmd::run("ip", &full)
}

impl StandIn {
    /// Creates the namespace `kn<run>-<slot>` of `net`'s run and wires it up as `spec`
    /// says. On error, whatever was created is removed again.
    pub fn create(net: &TestNet, spec: &StandInSpec<'_>) -> Result<Self> {
        let ns = format!("kn{}-{}", net.run_id(), spec.slot);
        let host_ns = spec.host.map(|h| net.ns(h));
        cmd::run("ip", &["netns", "add", &ns])?;
        // From here on, Drop removes it.
        let s = StandIn {
            ns: ns.clone(),
            host_ns: host_ns.clone(),
            port: spec.port.to_string(),
            ip: spec.addr,
        };
        let mtu = spec.mtu.map(|m| m.to_string());
        let mut add = vec!["link", "add", spec.port];
        if let Some(mtu) = &mtu {
            add.extend(["mtu", mtu]);
        }
        add.extend(["type", "veth", "peer", "name", "eth0"]);
        if let Some(mac) = spec.mac {
            add.extend(["address", mac]);
        }
        if let Some(mtu) = &mtu {
            add.extend(["mtu", mtu]);
        }
        add.extend(["netns", &ns]);
        let host = host_ns.as_deref();
        ip_in(host, &add)?;
        ip_in(
            host,
            &["link", "set", spec.port, "master", spec.bridge, "up"],
        )?;
        if spec.no_ipv6 {
            for key in [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.eth0.disable_ipv6=1",
            ] {
                let _ = s.exec("sysctl", &["-qw", key]);
            }
        }
        let mut script = format!(
            "addr add {}/{} dev eth0\nlink set eth0 up\nlink set lo up\n",
            spec.addr, spec.prefix_len
        );
        if let Some(gw) = spec.gateway {
            script.push_str(&format!("route add default via {gw}\n"));
        }
        cmd::run_with_input("ip", &["-n", &ns, "-batch", "-"], Some(&script))
            .with_context(|| format!("configuring eth0 in {ns}"))?;
        Ok(s)
    }

    /// The namespace's name, `kn<run>-<slot>`.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// `/run/netns/<ns>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.ns)
    }

    /// `eth0`'s address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host end's name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// Runs `program args…` in the namespace; its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, cmd::CmdError> {
        let mut full = vec!["netns", "exec", &self.ns, program];
        full.extend_from_slice(args);
        cmd::run("ip", &full)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Whatever still runs in it was started by the test (normally nothing).
        let pids = || cmd::run("ip", &["netns", "pids", &self.ns]).unwrap_or_default();
        let running = pids();
        for pid in running
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !running.trim().is_empty() {
            let _ = wait_until_blocking(
                format!("processes in {} to exit", self.ns),
                secs(5),
                millis(20),
                || Ok(pids().trim().is_empty().then_some(())),
            );
        }
        // Deleting the namespace deletes eth0 and with it its peer, the port.
        let _ = cmd::run("ip", &["netns", "del", &self.ns]);
        let _ = ip_in(self.host_ns.as_deref(), &["link", "del", &self.port]);
    }
}

/// Loads the nftables `script` (`nft -f -`) in host `host` of `net`.
pub fn load_nft(net: &TestNet, host: usize, script: &str) -> Result<()> {
    cmd::run_with_input(
        "ip",
        &["netns", "exec", &net.ns(host), "nft", "-f", "-"],
        Some(script),
    )
    .with_context(|| format!("nft in host {host}"))?;
    Ok(())
}

/// The nftables table (family bridge) standing in for the firewall's gateway isolation.
pub const ISOLATION_TABLE: &str = "keel_gw_isolation";

/// The stand-in for the firewall's gateway isolation (no frame between a bridge's gateway
/// port `kgh*` and its VXLAN device `kvx*`: every host answers for the same gateway address
/// and MAC) in each of `hosts`.
pub fn isolate_gateways(net: &TestNet, hosts: impl IntoIterator<Item = usize>) -> Result<()> {
    let script = format!(
        "table bridge {ISOLATION_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"kgh*\" oifname \"kvx*\" drop\n    iifname \"kvx*\" oifname \"kgh*\" drop\n  }}\n}}\n"
    );
    for h in hosts {
        load_nft(net, h, &script)?;
    }
    Ok(())
}

/// `ping` of `ip` from namespace `ns`: `count` echoes 0.2 s apart, 1 s timeout each.
pub fn ping_output(ns: &str, ip: Ipv4Addr, count: u32) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-q", "-n", "-c"])
        .arg(count.to_string())
        .args(["-i", "0.2", "-W", "1"])
        .arg(ip.to_string())
        .output()
        .context("start ip netns exec … ping")
}

/// [`ping_output`]: whether every echo was answered.
pub fn ping(ns: &str, ip: Ipv4Addr, count: u32) -> Result<bool> {
    Ok(ping_output(ns, ip, count)?.status.success())
}

/// Waits (15 s) until one echo from namespace `ns` to `ip` is answered.
pub fn wait_ping(ns: &str, ip: Ipv4Addr) -> Result<()> {
    wait_until_blocking(
        format!("{ns} to reach {ip} (ping)"),
        secs(15),
        millis(100),
        || Ok(ping(ns, ip, 1)?.then_some(())),
    )?;
    Ok(())
}

/// Runs `f` on a fresh thread inside the network namespace at `path` (sockets it opens
/// belong to that namespace and keep doing so when handed back).
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
