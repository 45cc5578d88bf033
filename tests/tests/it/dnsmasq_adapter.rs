//! The dnsmasq adapter (`keel_adapters::dhcp::dnsmasq::Dnsmasq`) against real dnsmasq
//! processes. Two namespaces stand in for a guest network on one host:
//!
//! ```text
//!  router namespace kdns<pid>-<run>-r          client namespace kdns<pid>-<run>-c
//!  kgn<V> 10.88.0.1/24 + dnsmasq  ═══ veth ═══  eth0 (the "guest", MAC fixed)
//! ```
//!
//! One test walks the whole life of a network's server: the guest's DHCP lease (address,
//! router, DNS server, domain, MTU) from busybox udhcpc; DNS for the network's hosts (bare
//! and qualified), NXDOMAIN for everything else and not one packet towards an upstream
//! server (nftables counters in the router namespace); a host added (reloaded with SIGHUP:
//! same process), an unchanged network (no signal at all), the domain changed (restarted);
//! dnsmasq killed with SIGKILL (started again); a new adapter, as after a restart of the
//! node service (the running dnsmasq adopted, never a second one); an unknown MAC (no
//! lease); stop (process gone, files removed, a second stop fine); a network whose
//! interface does not exist (dnsmasq's own message, at once).
//!
//! Namespace and temporary directory names carry the test process's pid: a run killed
//! with SIGKILL leaves them behind, and the next run removes them (and the dnsmasq daemons
//! in them).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use keel_adapters::dhcp::dnsmasq::Dnsmasq;
use keel_adapters::dhcp::{Dhcp, DhcpError, DhcpHost, DhcpNetwork};
use keel_adapters::links::MacAddr;
use keel_tests::cmd::{run, which};
use keel_tests::process::{proc_stat, process_alive};
use keel_tests::wait::{millis, secs, wait_until_blocking};

const VNI: u32 = 4711;
/// A network whose interface does not exist in the router namespace.
const VNI_MISSING: u32 = 4712;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const CLIENT_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x88, 0x00, 0x23]);
const PREFIX: &str = "kdns";

fn skipped() -> Option<(PathBuf, PathBuf)> {
    match keel_tests::skip_reason_with(&["dnsmasq", "busybox", "nsenter"]) {
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            None
        }
        None => Some((which("dnsmasq")?, which("busybox")?)),
    }
}

/// Removes the namespaces of earlier runs whose process is gone, with whatever runs in
/// them (dnsmasq daemons outlive the test that started them).
fn cleanup_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
            for p in pids.split_whitespace() {
                let _ = run("kill", &["-9", p]);
            }
        }
        let _ = run("ip", &["netns", "del", ns]);
    }
    // Their run and output directories.
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix("keel-dnsmasq-")
                    .or(n.strip_prefix("keel-udhcpc-"))
            })
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The two namespaces, the run directory and the adapter; `Drop` stops every server the
/// test may have started and removes the namespaces.
struct Lab {
    router: String,
    client: String,
    run_dir: tempfile::TempDir,
    dnsmasq_bin: PathBuf,
    busybox: PathBuf,
    out_dir: tempfile::TempDir,
}

impl Lab {
    fn new(dnsmasq_bin: PathBuf, busybox: PathBuf) -> Result<Self> {
        cleanup_stale();
        let run_id = format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff);
        let base = format!("{PREFIX}{}-{run_id}", std::process::id());
        let lab = Lab {
            router: format!("{base}-r"),
            client: format!("{base}-c"),
            run_dir: tempfile::Builder::new()
                .prefix(&format!("keel-dnsmasq-{}-", std::process::id()))
                .tempdir()?,
            dnsmasq_bin,
            busybox,
            out_dir: tempfile::Builder::new()
                .prefix(&format!("keel-udhcpc-{}-", std::process::id()))
                .tempdir()?,
        };
        run("ip", &["netns", "add", &lab.client])?;
        run("ip", &["-n", &lab.client, "link", "set", "lo", "up"])?;
        lab.build_router()?;
        Ok(lab)
    }

    /// Creates the router namespace, the veth pair between it and the client (the
    /// client's end with [`CLIENT_MAC`]) and the gateway address, and installs the
    /// outbound counters.
    fn build_router(&self) -> Result<()> {
        let (r, c) = (&self.router, &self.client);
        let gw = format!("{GATEWAY}/24");
        let kgn = format!("kgn{VNI}");
        let mac = CLIENT_MAC.to_string();
        for args in [
            vec!["netns", "add", r],
            vec![
                "link", "add", &kgn, "netns", r, "type", "veth", "peer", "name", "eth0", "netns",
                c, "address", &mac,
            ],
            vec!["-n", r, "addr", "add", &gw, "dev", &kgn],
            vec!["-n", r, "link", "set", &kgn, "up"],
            vec!["-n", r, "link", "set", "lo", "up"],
            vec!["-n", c, "link", "set", "eth0", "up"],
        ] {
            run("ip", &args)?;
        }
        // Counters for anything dnsmasq might send beyond the network: DNS queries to
        // any server, and any IPv4 packet leaving for another network.
        let counters = "table inet keelcount {
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport 53 counter
    tcp dport 53 counter
    ip daddr != 10.88.0.0/24 counter
  }
}
";
        let rules = self.out_dir.path().join("counters.nft");
        std::fs::write(&rules, counters)?;
        run(
            "ip",
            &["netns", "exec", r, "nft", "-f", rules.to_str().unwrap()],
        )?;
        Ok(())
    }

    fn adapter(&self) -> Dnsmasq {
        Dnsmasq::new(self.run_dir.path().to_path_buf(), self.dnsmasq_bin.clone())
    }

    fn router_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.router)
    }

    fn conf(&self, vni: u32) -> PathBuf {
        self.run_dir.path().join(format!("n{vni}/dnsmasq.conf"))
    }

    /// Live (non-zombie) processes running network `vni`'s configuration.
    fn processes(&self, vni: u32) -> Vec<u32> {
        let arg = format!("--conf-file={}", self.conf(vni).display());
        let mut out: Vec<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|&pid| process_alive(pid))
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|raw| raw.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// The one dnsmasq of network `vni`.
    fn the_process(&self, vni: u32) -> Result<u32> {
        match self.processes(vni).as_slice() {
            [pid] => Ok(*pid),
            other => bail!("expected exactly one dnsmasq for network {vni}, found {other:?}"),
        }
    }

    /// How often dnsmasq has (re)read the network's DNS host list (once at start, once
    /// per SIGHUP), from its log.
    fn host_list_reads(&self, vni: u32) -> usize {
        let dir = self.run_dir.path().join(format!("n{vni}"));
        let needle = format!("read {}/hosts.dns", dir.display());
        std::fs::read_to_string(dir.join("dnsmasq.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Runs busybox's DHCP client once in the client namespace: the variables of the
    /// lease it got (`ip`, `router`, `dns`, `domain`, `mtu`, …), or an error when it got
    /// none (`-n`: exit after 3 discovers, 1 s apart).
    fn dhcp_lease(&self) -> Result<BTreeMap<String, String>> {
        let out = self.out_dir.path().join("lease.out");
        let script = self.out_dir.path().join("udhcpc.sh");
        let _ = std::fs::remove_file(&out);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
                 for v in ip subnet router dns domain mtu hostname lease serverid; do\n\
                 eval \"echo $v=\\$$v\" >> {}\ndone\n",
                out.display()
            ),
        )?;
        run("chmod", &["755", script.to_str().unwrap()])?;
        let busybox = self.busybox.to_str().unwrap();
        let script = script.to_str().unwrap();
        #[rustfmt::skip]
        let args = [
            "netns", "exec", &self.client, busybox, "udhcpc", "-i", "eth0", "-n", "-q", "-f",
            "-t", "3", "-T", "1", "-A", "1", "-O", "mtu", "-s", script,
        ];
        run("ip", &args)?;
        let text = std::fs::read_to_string(&out).context("udhcpc wrote no lease")?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Asks the gateway for `name`'s A records from the client: the addresses, or the
    /// error code (`NXDOMAIN`, `REFUSED`, …) busybox printed.
    fn resolve(&self, name: &str) -> Result<std::result::Result<Vec<Ipv4Addr>, String>> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client])
            .arg(&self.busybox)
            .args(["nslookup", "-type=a", name, &GATEWAY.to_string()])
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(code) = ["NXDOMAIN", "REFUSED", "SERVFAIL"]
            .into_iter()
            .find(|c| text.contains(c))
        {
            return Ok(Err(code.to_string()));
        }
        if !out.status.success() {
            bail!("nslookup {name} failed ({}): {text}", out.status);
        }
        // "Address: 10.88.0.24" lines; the server's own line carries a port and does not
        // parse.
        Ok(Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("Address:"))
            .filter_map(|a| a.trim().parse().ok())
            .collect()))
    }

    /// Waits until `name` resolves to exactly `ip`.
    fn wait_resolves(&self, name: &str, ip: Ipv4Addr) -> Result<()> {
        wait_until_blocking(
            format!("{name} to resolve to {ip}"),
            secs(10),
            millis(100),
            || match self.resolve(name)? {
                Ok(addrs) if addrs == [ip] => Ok(Some(())),
                other => Err(anyhow!("{other:?}")),
            },
        )?;
        Ok(())
    }

    /// The counters of the router namespace's output chain (queries to DNS servers,
    /// packets to other networks).
    fn outbound_packets(&self) -> Result<Vec<u64>> {
        let text = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.router,
                "nft",
                "list",
                "table",
                "inet",
                "keelcount",
            ],
        )?;
        let counts: Vec<u64> = text
            .split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect();
        if counts.len() != 3 {
            bail!("cannot read the counters from {text}");
        }
        Ok(counts)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let d = self.adapter();
        for vni in [VNI, VNI_MISSING] {
            if let Err(e) = d.stop(vni) {
                eprintln!("dnsmasq_adapter cleanup: stop {vni}: {e}");
            }
        }
        for ns in [&self.router, &self.client] {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

fn host(mac: MacAddr, last: u8, name: &str) -> DhcpHost {
    DhcpHost {
        mac,
        ip: Ipv4Addr::new(10, 88, 0, last),
        hostname: Some(name.into()),
    }
}

/// The inode of a network namespace (a `/proc/PID/ns/net` link or a bind mount of one).
fn netns_ino(path: &str) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, last)
}

#[test]
fn dnsmasq_serves_a_network_through_its_whole_life() -> Result<()> {
    let Some((dnsmasq_bin, busybox)) = skipped() else {
        return Ok(());
    };
    let lab = Lab::new(dnsmasq_bin, busybox)?;
    let d = lab.adapter();
    let mut net = DhcpNetwork {
        vni: VNI,
        netns: Some(lab.router_path()),
        interface: format!("kgn{VNI}"),
        gateway: GATEWAY,
        prefix_len: 24,
        domain: "tenant.test".into(),
        mtu: 1400,
        hosts: vec![
            host(CLIENT_MAC, 23, "alpha"),
            host(MacAddr([0x52, 0x54, 0, 0x88, 0, 0x24]), 24, "beta"),
        ],
        lease_secs: 600,
    };
    net.hosts.sort();

    // Start.
    d.ensure(&net)?;
    let first = lab.the_process(VNI)?;
    assert_eq!(d.pid(VNI), Some(first as i32));
    assert_eq!(d.running(), vec![VNI]);
    assert_eq!(
        netns_ino(&format!("/proc/{first}/ns/net"))?,
        netns_ino(&lab.router_path().display().to_string())?,
        "dnsmasq does not run in the router namespace"
    );

    // DHCP: exactly the static lease, with the network's options.
    let lease = lab.dhcp_lease()?;
    let want = [
        ("ip", "10.88.0.23"),
        ("subnet", "255.255.255.0"),
        ("router", "10.88.0.1"),
        ("dns", "10.88.0.1"),
        ("domain", "tenant.test"),
        ("mtu", "1400"),
        ("hostname", "alpha"),
        ("lease", "600"),
        ("serverid", "10.88.0.1"),
    ];
    for (k, v) in want {
        assert_eq!(
            lease.get(k).map(String::as_str),
            Some(v),
            "{k} in lease {lease:?}"
        );
    }
    run(
        "ip",
        &[
            "-n",
            &lab.client,
            "addr",
            "add",
            "10.88.0.23/24",
            "dev",
            "eth0",
        ],
    )?;

    // DNS: the network's hosts, bare and qualified (and the guest's own name); nothing
    // else, and nothing asked of anyone else.
    for (name, want) in [
        ("beta", 24),
        ("beta.tenant.test", 24),
        ("alpha.tenant.test", 23),
    ] {
        assert_eq!(lab.resolve(name)?, Ok(vec![ip(want)]), "{name}");
    }
    for name in ["example.com", "nothere.tenant.test", "gamma"] {
        assert_eq!(lab.resolve(name)?, Err("NXDOMAIN".into()), "{name}");
    }
    assert_eq!(
        lab.outbound_packets()?,
        vec![0, 0, 0],
        "dnsmasq sent packets beyond its network"
    );

    // A host added: host lists rewritten and reloaded by SIGHUP, same process.
    let reads = lab.host_list_reads(VNI);
    net.hosts
        .push(host(MacAddr([0x52, 0x54, 0, 0x88, 0, 0x25]), 25, "gamma"));
    net.hosts.sort();
    d.ensure(&net)?;
    lab.wait_resolves("gamma", ip(25))?;
    lab.wait_resolves("gamma.tenant.test", ip(25))?;
    assert_eq!(
        lab.the_process(VNI)?,
        first,
        "a host change restarted dnsmasq"
    );
    let reads_after_reload = lab.host_list_reads(VNI);
    assert!(
        reads_after_reload > reads,
        "no reload in the log ({reads} → {reads_after_reload})"
    );

    // Unchanged: no signal at all (dnsmasq logs each re-read; a query afterwards makes
    // sure its log is flushed).
    d.ensure(&net)?;
    d.ensure(&net)?;
    assert_eq!(lab.resolve("beta")?, Ok(vec![ip(24)]));
    assert_eq!(
        lab.host_list_reads(VNI),
        reads_after_reload,
        "a no-op ensure signalled dnsmasq"
    );
    assert_eq!(lab.the_process(VNI)?, first);

    // The domain changed: restarted.
    net.domain = "other.test".into();
    d.ensure(&net)?;
    let second = lab.the_process(VNI)?;
    assert_ne!(second, first, "a domain change did not restart dnsmasq");
    assert!(!process_alive(first), "the old dnsmasq still runs");
    assert_eq!(lab.resolve("beta.other.test")?, Ok(vec![ip(24)]));
    assert_eq!(lab.resolve("beta.tenant.test")?, Err("NXDOMAIN".into()));

    // Killed with SIGKILL: the next ensure starts a new one. (It lingers as a zombie for
    // a few seconds; the adapter must not take that for a live server.)
    run("kill", &["-9", &second.to_string()])?;
    wait_until_blocking("the killed dnsmasq to die", secs(5), millis(20), || {
        Ok((!process_alive(second)).then_some(()))
    })?;
    assert_eq!(d.running(), Vec::<u32>::new());
    d.ensure(&net)?;
    let third = lab.the_process(VNI)?;
    assert_ne!(third, second);
    assert_eq!(d.running(), vec![VNI]);
    assert_eq!(lab.resolve("beta")?, Ok(vec![ip(24)]));

    // A new adapter (the node service restarted): the running dnsmasq is adopted.
    let d2 = lab.adapter();
    assert_eq!(d2.running(), vec![VNI]);
    d2.ensure(&net)?;
    assert_eq!(
        lab.the_process(VNI)?,
        third,
        "a new adapter did not adopt dnsmasq"
    );
    net.hosts.retain(|h| h.hostname.as_deref() != Some("gamma"));
    d2.ensure(&net)?;
    assert_eq!(lab.the_process(VNI)?, third);
    wait_until_blocking("gamma to be gone", secs(10), millis(100), || {
        match lab.resolve("gamma")? {
            Err(code) if code == "NXDOMAIN" => Ok(Some(())),
            other => Err(anyhow!("{other:?}")),
        }
    })?;

    // The router namespace recreated (as the links adapter does when it finds it
    // missing): the running dnsmasq serves the old, orphaned namespace, so the same
    // configuration is started again in the new one.
    run("ip", &["netns", "del", &lab.router])?;
    run("ip", &["-n", &lab.client, "link", "del", "eth0"])?;
    lab.build_router()?;
    run(
        "ip",
        &[
            "-n",
            &lab.client,
            "addr",
            "add",
            "10.88.0.23/24",
            "dev",
            "eth0",
        ],
    )?;
    d2.ensure(&net)?;
    let fourth = lab.the_process(VNI)?;
    assert_ne!(fourth, third, "dnsmasq was left in the old namespace");
    assert_eq!(
        netns_ino(&format!("/proc/{fourth}/ns/net"))?,
        netns_ino(&lab.router_path().display().to_string())?,
        "dnsmasq does not run in the new router namespace"
    );
    assert_eq!(lab.resolve("beta")?, Ok(vec![ip(24)]));

    // A MAC the network does not know gets no lease.
    run(
        "ip",
        &[
            "-n",
            &lab.client,
            "link",
            "set",
            "eth0",
            "address",
            "52:54:00:ee:ee:ee",
        ],
    )?;
    let err = lab.dhcp_lease().expect_err("an unknown MAC got a lease");
    eprintln!("unknown MAC: {err:#}");
    assert_eq!(lab.the_process(VNI)?, fourth);

    // Stop: process gone, files gone; a second stop is fine.
    d2.stop(VNI)?;
    assert!(!process_alive(fourth), "dnsmasq survived stop");
    assert!(proc_stat(fourth).is_none_or(|s| s.state == 'Z'));
    assert!(lab.processes(VNI).is_empty());
    assert!(!lab.run_dir.path().join(format!("n{VNI}")).exists());
    assert_eq!(d2.running(), Vec::<u32>::new());
    d2.stop(VNI)?;
    d.stop(VNI)?;

    // An interface that does not exist: dnsmasq's own message, at once.
    let mut missing = net.clone();
    missing.vni = VNI_MISSING;
    missing.interface = format!("kgn{VNI_MISSING}");
    let started = Instant::now();
    let err = d
        .ensure(&missing)
        .expect_err("dnsmasq started without its interface");
    let took = started.elapsed();
    eprintln!("missing interface ({took:.1?}): {err}");
    match &err {
        DhcpError::Exited { vni, detail } => {
            assert_eq!(*vni, VNI_MISSING);
            assert!(
                detail.contains(&format!("unknown interface kgn{VNI_MISSING}")),
                "{detail}"
            );
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(5),
        "the failed start took {took:?}"
    );
    assert!(lab.processes(VNI_MISSING).is_empty());
    assert_eq!(d.running(), Vec::<u32>::new());
    d.stop(VNI_MISSING)?;
    assert!(!lab.run_dir.path().join(format!("n{VNI_MISSING}")).exists());

    // A router namespace that does not exist: nsenter's message.
    let mut no_ns = missing.clone();
    no_ns.netns = Some(PathBuf::from("/run/netns/keel-no-such-namespace"));
    let err = d
        .ensure(&no_ns)
        .expect_err("started in a missing namespace");
    assert!(
        matches!(&err, DhcpError::Exited { detail, .. } if detail.contains("keel-no-such-namespace")),
        "{err:?}"
    );
    d.stop(VNI_MISSING)?;
    Ok(())
}
