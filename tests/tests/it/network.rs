//! Guest networks end to end: real libvirtd, dnsmasq, nftables and VXLAN per namespace
//! host, real TCG guests (the tiny template: `udhcpc` on eth0, busybox `ping`), driven
//! through the `keel` CLI.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::standin::{StandIn, StandInSpec};
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::Value;

use super::cli_quiet;
use super::compute::{
    compute_cluster, compute_cluster_with, vm_host, vm_show, wait_console, Console,
};

/// A guest's serial console, for running checks inside it.
struct Guest {
    name: String,
    console: Console,
    seq: u32,
}

impl Guest {
    async fn attach(c: &TestCluster, name: &str) -> Result<Self> {
        let mut console = Console::attach(c, 0, name).await?;
        // A prompt proves the shell is there (the console may attach mid-boot).
        console.ask("echo at''tached", "attached", secs(60)).await?;
        Ok(Self {
            name: name.into(),
            console,
            seq: 0,
        })
    }

    /// Runs `cmd` in the guest: `true` if it exited 0. The markers are split in the typed
    /// line so that the echo of the command itself never matches.
    async fn check(&mut self, cmd: &str, timeout: Duration) -> Result<bool> {
        self.seq += 1;
        let tag = format!("{}-{}", self.name, self.seq);
        let start = self
            .console
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        self.console
            .ask(
                &format!(
                    "if {cmd} >/dev/null 2>&1; then echo Y''ES-{tag}; else echo N''O-{tag}; fi"
                ),
                "",
                secs(5),
            )
            .await?;
        let seen = self.console.seen.clone();
        let (yes, no) = (format!("YES-{tag}"), format!("NO-{tag}"));
        let answer = wait_until(
            format!("{}: `{cmd}` finishes", self.name),
            timeout,
            millis(100),
            || {
                let seen = seen.clone();
                let (yes, no) = (yes.clone(), no.clone());
                async move {
                    let all = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let out = all.get(start..).unwrap_or("");
                    Ok(if out.contains(&yes) {
                        Some(true)
                    } else if out.contains(&no) {
                        Some(false)
                    } else {
                        None
                    })
                }
            },
        )
        .await?;
        Ok(answer)
    }

    /// Waits until `cmd` succeeds in the guest (e.g. after a rule change propagates).
    async fn eventually(&mut self, cmd: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.check(cmd, secs(15)).await? {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("{}: `{cmd}` still fails after {timeout:?}", self.name);
            }
        }
    }
}

/// The address IPAM gave the VM's first NIC.
async fn vm_ip(c: &TestCluster, vm: &str) -> Result<String> {
    let v = vm_show(c, 0, vm).await?;
    v["nics"][0]["ip"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("{vm} has no address: {v}"))
}

async fn create_vm(c: &TestCluster, name: &str, nic: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--template",
        "tiny",
        "--memory",
        "128M",
        "--nic",
        nic,
    ];
    args.extend_from_slice(extra);
    cli_quiet(c, 0, &args).await
}

fn vni_of(net: &Value) -> Result<u64> {
    net["vni"].as_u64().ok_or_else(|| anyhow!("no vni: {net}"))
}

#[tokio::test]
async fn guests_on_three_hosts_get_leases_resolve_and_reach_each_other() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;
    let blue = cli_quiet(&c, 0, &["net", "create", "blue", "--cidr", "10.60.0.0/24"]).await?;
    // A second tenant's network with the same CIDR.
    let red = cli_quiet(&c, 1, &["net", "create", "red", "--cidr", "10.60.0.0/24"]).await?;
    assert_ne!(vni_of(&blue)?, vni_of(&red)?);
    assert_eq!(
        blue["mtu"].as_u64(),
        Some(1450),
        "underlay 1500 − 50: {blue}"
    );
    let e = c
        .cli_raw(
            0,
            &[
                "net",
                "create",
                "big",
                "--cidr",
                "10.61.0.0/24",
                "--mtu",
                "1500",
            ],
        )
        .await?;
    assert!(!e.success() && e.stderr.contains("mtu"), "{}", e.stderr);

    cli_quiet(&c, 0, &["sg", "create", "pingable"]).await?;
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "group",
            "create",
            "spread",
            "--policy",
            "anti-affinity",
        ],
    )
    .await?;
    for vm in ["a", "b", "c"] {
        create_vm(
            &c,
            vm,
            "blue,sg=pingable",
            &["--affinity-group", "spread", "--no-wait"],
        )
        .await?;
    }
    // On red, the same address as b.
    create_vm(&c, "r", "red,ip=10.60.0.3,sg=pingable", &["--no-wait"]).await?;

    let mut ips = std::collections::BTreeMap::new();
    for vm in ["a", "b", "c", "r"] {
        let ip = vm_ip(&c, vm).await?;
        wait_console(&c, vm, &format!("KEEL-TINY-IP {ip}"), secs(180))
            .await
            .with_context(|| format!("{vm} gets its lease {ip} by DHCP"))?;
        ips.insert(vm, ip);
    }
    assert_eq!(ips["b"], "10.60.0.3");
    assert_eq!(ips["r"], "10.60.0.3");
    let hosts: std::collections::BTreeSet<usize> = [
        vm_host(&c, "a").await?,
        vm_host(&c, "b").await?,
        vm_host(&c, "c").await?,
    ]
    .into();
    assert_eq!(hosts.len(), 3, "a, b and c run on three hosts");
    // Every host reports the networks it built, without errors.
    let vni = vni_of(&blue)?;
    wait_until(
        "every host reports blue built",
        secs(90),
        millis(500),
        || async {
            let nodes = cli_quiet(&c, 0, &["node", "list"]).await?;
            let ok = nodes.as_array().is_some_and(|a| {
                a.iter().all(|h| {
                    let n = &h["inventory"]["network"];
                    n["vnis"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(vni)))
                        && n["errors"].as_array().is_some_and(|e| e.is_empty())
                })
            });
            Ok(ok.then_some(()))
        },
    )
    .await?;

    // Deleting a network that VMs use is refused, and says which.
    let e = c.cli_raw(0, &["net", "delete", "blue"]).await?;
    assert!(
        !e.success() && e.stderr.contains("VM a"),
        "delete blue: {}",
        e.stderr
    );

    let mut a = Guest::attach(&c, "a").await?;
    // Names resolve through the host's dnsmasq, but no group rule lets ICMP in yet.
    assert!(
        a.check("nslookup -type=a b", secs(15)).await?,
        "a resolves b"
    );
    assert!(
        !a.check("ping -c1 -W2 b", secs(15)).await?,
        "ingress is denied by default"
    );
    cli_quiet(
        &c,
        0,
        &["sg", "rule", "add", "pingable", "--protocol", "icmp"],
    )
    .await?;
    a.eventually("ping -c1 -W2 b", secs(30)).await?;
    a.eventually("ping -c1 -W2 c.blue.internal", secs(30))
        .await?;
    let mut b = Guest::attach(&c, "b").await?;
    b.eventually("ping -c1 -W2 c", secs(30)).await?;
    b.eventually("ping -c1 -W2 a", secs(30)).await?;

    // red is another segment: from r, blue's a (10.60.0.2) does not exist.
    let mut r = Guest::attach(&c, "r").await?;
    r.eventually("ping -c1 -W2 10.60.0.1", secs(30)).await?;
    assert!(
        !r.check("ping -c1 -W2 10.60.0.2", secs(15)).await?,
        "red reaches a VM of blue"
    );

    // Anti-spoofing: a second address on a's NIC gets nowhere; its own still works.
    assert!(
        a.check("ip addr add 10.60.0.99/24 dev eth0", secs(10))
            .await?,
        "adding an address in the guest"
    );
    assert!(
        !a.check(
            &format!("ping -c1 -W2 -I 10.60.0.99 {}", ips["b"]),
            secs(15)
        )
        .await?,
        "a spoofed source address is dropped"
    );
    assert!(
        a.check(
            &format!("ping -c1 -W2 -I {} {}", ips["a"], ips["b"]),
            secs(15)
        )
        .await?,
        "the NIC's own address passes"
    );

    // Removing the rule blocks again.
    let sg = cli_quiet(&c, 0, &["sg", "show", "pingable"]).await?;
    let rule = sg["rules"][0]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no rule id: {sg}"))?
        .to_string();
    cli_quiet(&c, 0, &["sg", "rule", "delete", "pingable", &rule]).await?;
    let deadline = std::time::Instant::now() + secs(30);
    while a.check("ping -c1 -W1 b", secs(15)).await? {
        if std::time::Instant::now() >= deadline {
            bail!("removing the ICMP rule did not take effect within 30 s");
        }
    }
    assert!(!a.check("ping -c1 -W2 b", secs(15)).await?, "blocked again");
    cli_quiet(
        &c,
        0,
        &["sg", "rule", "add", "pingable", "--protocol", "icmp"],
    )
    .await?;
    a.eventually("ping -c1 -W2 b", secs(30)).await?;

    // NICs come and go on a running VM (hot-plug): a gets a second NIC, sees it as eth1
    // and gets its fixed address there by DHCP, then loses it again.
    let hot_plug_started = std::time::Instant::now();
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "nic",
            "attach",
            "a",
            "--nic",
            "blue,ip=10.60.0.60,sg=pingable",
        ],
    )
    .await?;
    let a_view = vm_show(&c, 0, "a").await?;
    assert_eq!(
        a_view["nics"][1]["ip"].as_str(),
        Some("10.60.0.60"),
        "{a_view}"
    );
    let hot_mac = a_view["nics"][1]["mac"]
        .as_str()
        .ok_or_else(|| anyhow!("a's second NIC has no MAC: {a_view}"))?
        .to_string();
    a.eventually(
        &format!("grep -qx {hot_mac} /sys/class/net/eth1/address"),
        secs(30),
    )
    .await?;
    assert!(
        a.check(
            "printf '#!/bin/sh\\n[ \"$1\" = bound ] && echo \"$ip\" > /tmp/eth1.ip\\nexit 0\\n' > /tmp/show-ip && chmod +x /tmp/show-ip",
            secs(10)
        )
        .await?,
        "writing a udhcpc hook in the guest"
    );
    a.eventually(
        "ip link set eth1 up && udhcpc -i eth1 -n -q -t 3 -T 2 -s /tmp/show-ip && grep -qx 10.60.0.60 /tmp/eth1.ip",
        secs(30),
    )
    .await?;
    cli_quiet(&c, 0, &["vm", "nic", "detach", "a", &hot_mac]).await?;
    assert!(
        !a.check("test -e /sys/class/net/eth1", secs(10)).await?,
        "eth1 is gone from the guest once the detach finished"
    );
    eprintln!(
        "NIC hot-plug, DHCP on it and hot-unplug took {:.1?}",
        hot_plug_started.elapsed()
    );

    // NICs come and go on a stopped VM: c's NIC is detached (its lease is freed), a new
    // one with a fixed address is attached, and c comes back on it.
    let c_mac = vm_show(&c, 0, "c").await?["nics"][0]["mac"]
        .as_str()
        .ok_or_else(|| anyhow!("c has no MAC"))?
        .to_string();
    cli_quiet(&c, 0, &["vm", "stop", "c"]).await?;
    cli_quiet(&c, 0, &["vm", "nic", "detach", "c", &c_mac]).await?;
    let leases = cli_quiet(&c, 0, &["net", "show", "blue"]).await?;
    assert!(
        !leases.to_string().contains(&c_mac),
        "c's lease is gone: {leases}"
    );
    let e = c.cli_raw(0, &["vm", "nic", "detach", "c", &c_mac]).await?;
    assert!(
        !e.success() && e.stderr.contains("has no NIC with MAC"),
        "{}",
        e.stderr
    );
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "nic",
            "attach",
            "c",
            "--nic",
            "blue,ip=10.60.0.50,sg=pingable",
        ],
    )
    .await?;
    cli_quiet(&c, 0, &["vm", "start", "c"]).await?;
    wait_console(&c, "c", "KEEL-TINY-IP 10.60.0.50", secs(120)).await?;
    a.eventually("ping -c1 -W2 10.60.0.50", secs(30)).await?;
    a.eventually("ping -c1 -W2 c", secs(30)).await?;

    // The node service on b's host restarts with its network links flushed behind its
    // back: it rebuilds them and b is reachable again.
    let bh = vm_host(&c, "b").await?;
    c.kill_service(bh).await?;
    for link in [
        format!("kbr{vni}"),
        format!("kvx{vni}"),
        format!("kgh{vni}"),
    ] {
        let _ = c.net().exec(bh, "ip", &["link", "del", &link]);
    }
    assert!(
        !a.check("ping -c1 -W2 b", secs(15)).await?,
        "b is cut off while its host's links are gone"
    );
    c.start_host(bh).await?;
    a.eventually("ping -c1 -W2 b", secs(60)).await?;
    // b's console was relayed by the node service that was killed: attach again.
    drop(b);
    let mut b = Guest::attach(&c, "b").await?;
    b.eventually("nslookup -type=a a", secs(30)).await?;
    b.eventually("ping -c1 -W2 a.blue.internal", secs(30))
        .await?;
    Ok(())
}
/// A namespace outside the cluster on the hosts' public segment (the test bridge), with a
/// TCP service that answers every connection with the address it came from.
struct Outside {
    ns: StandIn,
    ip: String,
    server: std::process::Child,
}

impl Outside {
    fn start(c: &TestCluster) -> Result<Self> {
        let net = c.net();
        // Named like the harness's own hosts (and its veth like theirs), so its stale-run
        // cleanup finds them too.
        let addr = Ipv4Addr::new(10, 213, net.subnet(), 200);
        let ns = StandIn::create(
            net,
            &StandInSpec {
                slot: 250,
                host: None,
                port: &format!("kv{}-250", net.run_id()),
                bridge: &net.bridge(),
                mac: None,
                mtu: None,
                addr,
                prefix_len: 24,
                gateway: None,
                no_ipv6: false,
            },
        )?;
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", ns.ns(), "socat"])
            .args([
                "TCP-LISTEN:9000,fork,reuseaddr",
                "SYSTEM:echo peer=$SOCAT_PEERADDR",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("socat in the outside namespace")?;
        Ok(Self {
            ns,
            ip: addr.to_string(),
            server,
        })
    }

    /// Connects from outside to `addr:port` and returns what the service there said
    /// (empty: nothing answered within 4 s).
    fn fetch(&self, addr: &str, port: u16) -> String {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns.ns(),
                "timeout",
                "4",
                "socat",
                "-T3",
                "-",
            ])
            .arg(format!("TCP:{addr}:{port},connect-timeout=3"))
            .stdin(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // Then `self.ns` goes with its veth.
    }
}

#[tokio::test]
async fn external_networks_reach_out_through_snat_and_floating_ips_reach_in() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    // The public role comes from each node's configuration (the installer writes it from
    // the answer file); the address defaults to the interface's own.
    let c = compute_cluster_with(2, "[network.roles.public]\ninterface = \"eth0\"\n").await?;
    let outside = Outside::start(&c)?;
    let s = c.net().subnet();
    for i in 0..c.len() {
        let want = format!("10.213.{s}.{}/24", i + 1);
        wait_until(
            format!(
                "{} reports its public network from its configuration",
                c.name(i)
            ),
            secs(30),
            millis(300),
            || async {
                let v = cli_quiet(&c, 0, &["node", "network", "list", c.name(i)]).await?;
                Ok(v.to_string().contains(&want).then_some(()))
            },
        )
        .await?;
    }
    // An address that is not on the host is refused, and says what the host has.
    let e = c
        .cli_raw(
            0,
            &[
                "node",
                "network",
                "set",
                c.name(0),
                "public",
                "--interface",
                "eth0",
                "--address",
                "192.0.2.7/24",
            ],
        )
        .await?;
    assert!(
        !e.success() && e.stderr.contains("is not configured on eth0"),
        "{}",
        e.stderr
    );
    c.api(0)?
        .put_setting(
            "network.floating-ip-range",
            &format!("10.213.{s}.100-10.213.{s}.109"),
        )
        .await?;
    cli_quiet(
        &c,
        0,
        &[
            "net",
            "create",
            "dmz",
            "--cidr",
            "10.70.0.0/24",
            "--external",
        ],
    )
    .await?;
    cli_quiet(&c, 0, &["sg", "create", "web"]).await?;
    cli_quiet(
        &c,
        0,
        &[
            "sg",
            "rule",
            "add",
            "web",
            "--protocol",
            "tcp",
            "--port",
            "80",
        ],
    )
    .await?;
    create_vm(&c, "w", "dmz,sg=web", &["--no-wait"]).await?;
    let ip = vm_ip(&c, "w").await?;
    wait_console(&c, "w", &format!("KEEL-TINY-IP {ip}"), secs(180)).await?;
    let host = vm_host(&c, "w").await?;
    let host_ip = c.net().ip(host).to_string();

    // SNAT: the outside sees the host's public address.
    let mut w = Guest::attach(&c, "w").await?;
    w.eventually(
        &format!("nc -w 3 {} 9000 | grep -q peer={host_ip}", outside.ip),
        secs(30),
    )
    .await?;

    // A floating IP, 1:1: the VM's own connections leave with it, and it reaches the VM.
    let fip = cli_quiet(&c, 0, &["fip", "allocate"]).await?;
    let fip = fip["ip"]
        .as_str()
        .ok_or_else(|| anyhow!("no ip: {fip}"))?
        .to_string();
    cli_quiet(&c, 0, &["fip", "attach", &fip, "w"]).await?;
    w.eventually(
        &format!("nc -w 3 {} 9000 | grep -q peer={fip}", outside.ip),
        secs(30),
    )
    .await?;
    assert!(
        w.check(
            "printf '#!/bin/sh\\necho keel-hello\\n' > /tmp/hi && chmod +x /tmp/hi && (nc -ll -p 80 -e /tmp/hi &)",
            secs(10)
        )
        .await?,
        "starting a listener in the guest"
    );
    wait_until(
        "the floating IP reaches the VM",
        secs(30),
        millis(500),
        || async { Ok(outside.fetch(&fip, 80).contains("keel-hello").then_some(())) },
    )
    .await?;
    // Port 81 is not allowed by the security group.
    assert!(!outside.fetch(&fip, 81).contains("keel-hello"));

    // Port forwarding instead of 1:1: FIP:8080 → VM:80, and nothing else.
    cli_quiet(
        &c,
        0,
        &["fip", "attach", &fip, "w", "--port", "tcp:8080:80"],
    )
    .await?;
    wait_until(
        "the forwarded port reaches the VM",
        secs(30),
        millis(500),
        || async {
            Ok(outside
                .fetch(&fip, 8080)
                .contains("keel-hello")
                .then_some(()))
        },
    )
    .await?;
    wait_until("1:1 NAT is gone", secs(30), millis(500), || async {
        Ok((!outside.fetch(&fip, 80).contains("keel-hello")).then_some(()))
    })
    .await?;

    // Detached and released: the address answers nothing; SNAT still works.
    cli_quiet(&c, 0, &["fip", "detach", &fip]).await?;
    wait_until(
        "the detached floating IP stops answering",
        secs(30),
        millis(500),
        || async { Ok((!outside.fetch(&fip, 8080).contains("keel-hello")).then_some(())) },
    )
    .await?;
    cli_quiet(&c, 0, &["fip", "release", &fip]).await?;
    w.eventually(
        &format!("nc -w 3 {} 9000 | grep -q peer={host_ip}", outside.ip),
        secs(30),
    )
    .await?;
    Ok(())
}
