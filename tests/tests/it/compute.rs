//! Compute end to end: real libvirtd per namespace host, real TCG guests booted from the
//! tiny template (`scripts/guest-images tiny`), driven through the `keel` CLI.

use keel_client::paths;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keel_tests::cluster::{ClusterOptions, TestCluster};
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::Value;

use super::cli_quiet;

/// The tiny test template; `scripts/test` builds it before the suite runs.
pub fn tiny_image() -> Result<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-images/keel-tiny.qcow2");
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `scripts/guest-images tiny` (scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A formed cluster of `n` hosts with a libvirtd each and the tiny template imported.
pub async fn compute_cluster(n: usize) -> Result<TestCluster> {
    compute_cluster_with(n, "").await
}

/// [`compute_cluster`] with more configuration for every node (TOML).
pub async fn compute_cluster_with(n: usize, extra_toml: &str) -> Result<TestCluster> {
    let opts = ClusterOptions {
        libvirt: true,
        config_toml: format!("[duties]\nheartbeat_interval_ms = 300\nsuspect_after_ms = 1500\ndown_after_ms = 4000\nvoter_replace_after_ms = 60000\ntick_ms = 200\n{extra_toml}"),
        ..ClusterOptions::default()
    };
    let c = TestCluster::form_with(n, opts).await?;
    let image = tiny_image()?;
    cli_quiet(
        &c,
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
    // Every host has reported a working hypervisor before VMs are placed.
    wait_until(
        "every host reports its hypervisor",
        secs(60),
        millis(300),
        || async {
            let hosts = cli_quiet(&c, 0, &["node", "list"]).await?;
            let ready = hosts.as_array().is_some_and(|a| {
                a.len() == n
                    && a.iter().all(|h| {
                        let hv = &h["inventory"]["hypervisor"];
                        hv.is_object() && hv["error"].is_null()
                    })
            });
            Ok(ready.then_some(()))
        },
    )
    .await?;
    Ok(c)
}

pub async fn vm_show(c: &TestCluster, i: usize, vm: &str) -> Result<Value> {
    cli_quiet(c, i, &["vm", "show", vm]).await
}

/// The host index a VM is placed on.
pub async fn vm_host(c: &TestCluster, vm: &str) -> Result<usize> {
    let v = vm_show(c, 0, vm).await?;
    let id = v["host_id"]
        .as_u64()
        .ok_or_else(|| anyhow!("{vm} is not placed: {v}"))?;
    c.index_of(id)
        .ok_or_else(|| anyhow!("no host with id {id}"))
}

/// What the guest printed on its serial console so far (the log virtlogd keeps).
pub async fn console_log(c: &TestCluster, vm: &str) -> Result<String> {
    let v = vm_show(c, 0, vm).await?;
    let id = v["id"].as_str().ok_or_else(|| anyhow!("no id: {v}"))?;
    let host = vm_host(c, vm).await?;
    let path = c
        .data_dir(host)
        .join("images/vms")
        .join(id)
        .join("console.log");
    Ok(std::fs::read(&path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default())
}

/// Waits until the VM's console log contains `marker`.
pub async fn wait_console(
    c: &TestCluster,
    vm: &str,
    marker: &str,
    timeout: Duration,
) -> Result<()> {
    wait_until(
        format!("{vm} prints {marker:?} on its console"),
        timeout,
        millis(500),
        || async { Ok(console_log(c, vm).await?.contains(marker).then_some(())) },
    )
    .await?;
    Ok(())
}

/// A domain of a Keel VM (not the KVM probe's short-lived one).
fn is_vm_domain(name: &str) -> bool {
    name.starts_with("keel-") && name != "keel-kvm-probe"
}

/// Every domain on every host: (host index, name, state).
pub fn domains(c: &TestCluster) -> Result<Vec<(usize, String, String)>> {
    c.domains()
}

async fn vm_count(c: &TestCluster) -> Result<usize> {
    Ok(cli_quiet(c, 0, &["vm", "list"])
        .await?
        .as_array()
        .map_or(0, |a| a.len()))
}

#[tokio::test]
async fn a_vm_lives_its_whole_life_through_the_cli() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;

    // Create on a follower; the CLI waits for the operation.
    let leader = c.leader().await?;
    let follower = (0..3).find(|i| *i != leader).unwrap_or(1);
    let op = cli_quiet(
        &c,
        follower,
        &[
            "vm",
            "create",
            "web",
            "--template",
            "tiny",
            "--memory",
            "128M",
        ],
    )
    .await?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let v = vm_show(&c, 0, "web").await?;
    assert_eq!(v["status"], "running", "{v}");
    wait_console(&c, "web", "KEEL-TINY-SEED hostname=web", secs(90)).await?;
    wait_console(&c, "web", "KEEL-TINY-READY", secs(60)).await?;
    let keel_domains: Vec<_> = domains(&c)?
        .into_iter()
        .filter(|(_, n, _)| n == "keel-web")
        .collect();
    assert_eq!(keel_domains.len(), 1, "{keel_domains:?}");
    assert_eq!(keel_domains[0].2, "running");

    // Stop (the guest powers off on ACPI), resize while stopped, start, reboot.
    cli_quiet(&c, 0, &["vm", "stop", "web"]).await?;
    assert_eq!(vm_show(&c, 0, "web").await?["status"], "stopped");
    assert!(console_log(&c, "web").await?.contains("KEEL-TINY-POWEROFF"));
    cli_quiet(
        &c,
        0,
        &["vm", "resize", "web", "--vcpus", "2", "--memory", "192M"],
    )
    .await?;
    cli_quiet(&c, 0, &["vm", "start", "web"]).await?;
    let v = vm_show(&c, 0, "web").await?;
    assert_eq!(
        (v["vcpus"].as_u64(), v["memory_mib"].as_u64()),
        (Some(2), Some(192)),
        "{v}"
    );
    let host = vm_host(&c, "web").await?;
    let lv = c.libvirt(host).ok_or_else(|| anyhow!("no libvirtd"))?;
    let info = lv.virsh(&["dominfo", "keel-web"])?;
    assert!(info.contains("CPU(s):         2"), "{info}");
    assert!(info.contains("196608 KiB"), "{info}");
    wait_console(&c, "web", "KEEL-TINY-READY", secs(60)).await?;
    let boots_before = console_log(&c, "web")
        .await?
        .matches("KEEL-TINY-BOOT")
        .count();
    cli_quiet(&c, 0, &["vm", "reboot", "web"]).await?;
    wait_until("the guest boots again", secs(90), millis(500), || async {
        let boots = console_log(&c, "web")
            .await?
            .matches("KEEL-TINY-BOOT")
            .count();
        Ok((boots > boots_before).then_some(()))
    })
    .await?;

    // Delete: the domain and its files are gone.
    let id = vm_show(&c, 0, "web").await?["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("no id"))?;
    cli_quiet(&c, 0, &["vm", "delete", "web"]).await?;
    assert_eq!(vm_count(&c).await?, 0);
    assert!(domains(&c)?.iter().all(|(_, n, _)| n != "keel-web"));
    assert!(!c.data_dir(host).join("images/vms").join(&id).exists());
    Ok(())
}

#[tokio::test]
async fn bad_specs_are_refused_and_placement_honours_capacity_and_anti_affinity() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;

    // Bad specs: one clear line each, nothing created anywhere.
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "dup",
            "--template",
            "tiny",
            "--memory",
            "64M",
            "--no-start",
        ],
    )
    .await?;
    let cases: [(&[&str], &str); 5] = [
        (
            &["vm", "create", "zero", "--template", "tiny", "--vcpus", "0"],
            "vcpus",
        ),
        (
            &[
                "vm",
                "create",
                "huge",
                "--template",
                "tiny",
                "--memory",
                "4096G",
            ],
            "more than any host",
        ),
        (
            &["vm", "create", "nope", "--template", "no-such-template"],
            "does not exist",
        ),
        (
            &["vm", "create", "a'/><x", "--template", "tiny"],
            "may only contain",
        ),
        (
            &["vm", "create", "dup", "--template", "tiny"],
            "already exists",
        ),
    ];
    for (args, want) in cases {
        let out = c.cli_raw(0, args).await?;
        assert!(!out.success(), "{args:?} succeeded");
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
    assert_eq!(vm_count(&c).await?, 1);
    cli_quiet(&c, 0, &["vm", "delete", "dup"]).await?;
    assert!(domains(&c)?.iter().all(|(_, n, _)| !is_vm_domain(n)));

    // Anti-affinity: three members land on three hosts; a fourth waits with a reason.
    cli_quiet(
        &c,
        0,
        &["vm", "group", "create", "web", "--policy", "anti-affinity"],
    )
    .await?;
    for i in 0..3 {
        let name = format!("w{i}");
        cli_quiet(
            &c,
            0,
            &[
                "vm",
                "create",
                &name,
                "--template",
                "tiny",
                "--memory",
                "64M",
                "--affinity-group",
                "web",
                "--no-start",
            ],
        )
        .await?;
    }
    let mut hosts = Vec::new();
    for i in 0..3 {
        hosts.push(vm_host(&c, &format!("w{i}")).await?);
    }
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let accepted = cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "w3",
            "--template",
            "tiny",
            "--memory",
            "64M",
            "--affinity-group",
            "web",
            "--no-start",
            "--no-wait",
        ],
    )
    .await?;
    let op_id = accepted["operation"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let reason = wait_until(
        "w3 shows why it is pending",
        secs(20),
        millis(200),
        || async {
            let v = vm_show(&c, 0, "w3").await?;
            Ok(v["pending_reason"].as_str().map(String::from))
        },
    )
    .await?;
    assert!(reason.contains("anti-affinity group web"), "{reason}");
    assert_eq!(vm_show(&c, 0, "w3").await?["status"], "pending");
    let op = cli_quiet(&c, 0, &["op", "show", &op_id]).await?;
    assert_eq!(op["state"], "running");
    assert!(
        op["detail"]
            .as_str()
            .unwrap_or("")
            .contains("waiting for placement"),
        "{op}"
    );
    cli_quiet(&c, 0, &["vm", "delete", "w3"]).await?;

    // Capacity: with no CPU overcommit each host holds as many vCPUs as it has CPUs.
    let cpus = cli_quiet(&c, 0, &["node", "list"]).await?[0]["inventory"]["cpus"]
        .as_u64()
        .ok_or_else(|| anyhow!("no cpu count"))?;
    c.api(0)?.put_setting("compute.cpu-overcommit", "1").await?;
    let per_host = cpus.to_string();
    // w0..w2 hold one vCPU per host; a VM of all CPUs fits nowhere now.
    let out = c
        .cli_raw(
            0,
            &[
                "vm",
                "create",
                "big",
                "--template",
                "tiny",
                "--memory",
                "64M",
                "--vcpus",
                &per_host,
                "--no-start",
                "--no-wait",
            ],
        )
        .await?;
    assert!(out.success(), "{}", out.stderr);
    let reason = wait_until(
        "big shows why it is pending",
        secs(20),
        millis(200),
        || async {
            let v = vm_show(&c, 0, "big").await?;
            Ok(v["pending_reason"].as_str().map(String::from))
        },
    )
    .await?;
    assert!(reason.contains("vCPUs"), "{reason}");
    // Freeing one host lets it in.
    cli_quiet(&c, 0, &["vm", "delete", "w0"]).await?;
    wait_until("big is placed", secs(30), millis(200), || async {
        Ok(vm_show(&c, 0, "big").await?["host_id"].as_u64())
    })
    .await?;

    // Direct kernel boot: kernel and initrd templates, a command line, no root disk.
    let guests = tiny_image()?.with_file_name("keel-tiny.vmlinuz");
    let initrd = guests.with_file_name("keel-tiny.initrd");
    for (path, name, format) in [
        (&guests, "tiny-kernel", "kernel"),
        (&initrd, "tiny-initrd", "initrd"),
    ] {
        cli_quiet(
            &c,
            0,
            &[
                "template",
                "import",
                &path.display().to_string(),
                "--name",
                name,
                "--format",
                format,
            ],
        )
        .await?;
    }
    let out = c
        .cli_raw(
            0,
            &[
                "vm",
                "create",
                "direct",
                "--template",
                "tiny",
                "--initrd",
                "tiny-initrd",
            ],
        )
        .await?;
    assert!(
        !out.success() && out.stderr.contains("kernel"),
        "{}",
        out.stderr
    );
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "direct",
            "--template",
            "tiny-kernel",
            "--initrd",
            "tiny-initrd",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "128M",
        ],
    )
    .await?;
    wait_console(&c, "direct", "KEEL-TINY-SEED hostname=direct", secs(90)).await?;
    assert_eq!(vm_show(&c, 0, "direct").await?["boot"], "kernel");
    Ok(())
}

#[tokio::test]
async fn a_node_killed_during_create_converges_to_exactly_one_vm() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;
    // Create without waiting, then kill -9 the service of whichever host it lands on as
    // soon as it is placed (typically while it is defining or starting the domain).
    let accepted = cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "phoenix",
            "--template",
            "tiny",
            "--memory",
            "128M",
            "--no-wait",
        ],
    )
    .await?;
    let op_id = accepted["operation"]["id"]
        .as_str()
        .context("operation id")?
        .to_string();
    let host = wait_until("phoenix is placed", secs(20), millis(20), || async {
        Ok(vm_show(&c, 0, "phoenix").await?["host_id"].as_u64())
    })
    .await?;
    let host = c.index_of(host).context("host index")?;
    c.kill_service(host).await?;
    c.start_host(host).await?;
    let ask = if host == 0 { 1 } else { 0 };
    wait_until(
        "the create operation succeeds",
        secs(120),
        millis(300),
        || async {
            let op = cli_quiet(&c, ask, &["op", "show", &op_id]).await?;
            match op["state"].as_str() {
                Some("succeeded") => Ok(Some(())),
                Some("running") => Ok(None),
                _ => Err(keel_tests::wait::abort(format!(
                    "operation ended badly: {op}"
                ))),
            }
        },
    )
    .await?;
    let copies: Vec<_> = domains(&c)?
        .into_iter()
        .filter(|(_, n, _)| n == "keel-phoenix")
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].0, host);
    assert_eq!(copies[0].2, "running");
    wait_console(&c, "phoenix", "KEEL-TINY-READY", secs(90)).await?;
    Ok(())
}

/// `keel vm console VM` with a pipe on stdin, as a user would script it.
pub struct Console {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    pub seen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Console {
    pub async fn attach(c: &TestCluster, i: usize, vm: &str) -> Result<Self> {
        use tokio::io::AsyncReadExt;
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &c.net().ns(i)])
            .arg(c.keel_bin())
            .arg("--socket")
            .arg(c.socket(i))
            .args(["vm", "console", vm])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn keel vm console")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&text);
            }
        });
        Ok(Self { child, stdin, seen })
    }

    /// Types `command` and waits for `expect` in the output after it.
    pub async fn ask(&mut self, command: &str, expect: &str, timeout: Duration) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let start = self.seen.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let seen = self.seen.clone();
        wait_until(
            format!("the guest answers {expect:?}"),
            timeout,
            millis(100),
            || {
                let seen = seen.clone();
                async move {
                    let all = seen.lock().unwrap_or_else(|e| e.into_inner());
                    Ok(all
                        .get(start..)
                        .unwrap_or("")
                        .contains(expect)
                        .then_some(()))
                }
            },
        )
        .await?;
        Ok(())
    }

    async fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

/// The guest's uptime in seconds, read through its console.
async fn guest_uptime(console: &mut Console, tag: &str) -> Result<f64> {
    console
        .ask(
            &format!("echo {tag}=$(cut -d' ' -f1 /proc/uptime)"),
            &format!("{tag}="),
            secs(20),
        )
        .await?;
    // Wait for the number after the marker to be complete (the newline after it).
    let text = wait_until("the uptime line", secs(10), millis(100), || async {
        let all = console
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let line = all
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{tag}=")))
            .map(String::from);
        Ok(line.filter(|l| l.len() > tag.len() + 1))
    })
    .await?;
    text[tag.len() + 1..]
        .trim()
        .parse()
        .with_context(|| format!("uptime in {text:?}"))
}

#[tokio::test]
async fn live_migration_keeps_the_guest_and_drain_empties_a_host() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "mover",
            "--template",
            "tiny",
            "--memory",
            "128M",
        ],
    )
    .await?;
    wait_console(&c, "mover", "KEEL-TINY-READY", secs(90)).await?;

    // The serial console answers through any node's CLI.
    let mut console = Console::attach(&c, 0, "mover").await?;
    console
        .ask("echo ping-$((40+2))", "ping-42", secs(20))
        .await?;
    let before = guest_uptime(&mut console, "up1").await?;

    // Live migration to a named host; the guest keeps its memory (no new boot, uptime
    // goes on) and answers on its console on the new host.
    let source = vm_host(&c, "mover").await?;
    let target = (0..3).find(|i| *i != source).unwrap_or(0);
    let op = cli_quiet(&c, 0, &["vm", "migrate", "mover", "--to", c.name(target)]).await?;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(vm_host(&c, "mover").await?, target);
    let copies: Vec<_> = domains(&c)?
        .into_iter()
        .filter(|(_, n, _)| n == "keel-mover")
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "exactly one domain after the move: {copies:?}"
    );
    assert_eq!((copies[0].0, copies[0].2.as_str()), (target, "running"));
    // Both streams (memory, and the disk over NBD) reached the target's qemu, which
    // listened on loopback only, through the target node's mTLS relay.
    let id = vm_show(&c, 0, "mover").await?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id"))?
        .to_string();
    let target_log = c
        .dir()
        .join(c.name(target))
        .join(format!("{}.stderr.log", c.name(target)));
    let relayed = std::fs::read_to_string(&target_log)?
        .lines()
        .filter(|l| l.contains("incoming migration stream relayed") && l.contains(&id))
        .count();
    assert_eq!(
        relayed,
        2,
        "migration streams relayed by {}",
        c.name(target)
    );
    if !console.running().await {
        console = Console::attach(&c, 0, "mover").await?;
    }
    let mut console = match console.ask("echo pong-$((6*7))", "pong-42", secs(10)).await {
        Ok(()) => console,
        // The old console stream ended with the source domain: attach again.
        Err(_) => {
            let mut fresh = Console::attach(&c, 0, "mover").await?;
            fresh.ask("echo pong-$((6*7))", "pong-42", secs(20)).await?;
            fresh
        }
    };
    let after = guest_uptime(&mut console, "up2").await?;
    assert!(
        after > before,
        "uptime went from {before} to {after}: the guest restarted"
    );
    assert!(
        !console_log(&c, "mover").await?.contains("KEEL-TINY-BOOT"),
        "the guest booted again on the target"
    );
    drop(console);

    // A stopped VM moves cold; it then starts on its new host.
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "sleeper",
            "--template",
            "tiny",
            "--memory",
            "128M",
            "--no-start",
        ],
    )
    .await?;
    let from = vm_host(&c, "sleeper").await?;
    let op = cli_quiet(&c, 0, &["vm", "migrate", "sleeper"]).await?;
    assert_eq!(op["state"], "succeeded", "{op}");
    let to = vm_host(&c, "sleeper").await?;
    assert_ne!(from, to);
    cli_quiet(&c, 0, &["vm", "start", "sleeper"]).await?;
    wait_console(&c, "sleeper", "KEEL-TINY-READY", secs(90)).await?;

    // Drain the host that runs `mover`: everything moves off, nothing lands there.
    let drained = vm_host(&c, "mover").await?;
    let out = cli_quiet(
        &c,
        0,
        &["node", "drain", c.name(drained), "--timeout", "3m"],
    )
    .await?;
    assert_eq!(out["maintenance"], true, "{out}");
    for vm in ["mover", "sleeper"] {
        assert_ne!(
            vm_host(&c, vm).await?,
            drained,
            "{vm} is still on the drained host"
        );
    }
    assert!(domains(&c)?
        .iter()
        .all(|(i, n, _)| *i != drained || !is_vm_domain(n)));
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "newcomer",
            "--template",
            "tiny",
            "--memory",
            "64M",
            "--no-start",
        ],
    )
    .await?;
    assert_ne!(vm_host(&c, "newcomer").await?, drained);
    let out = cli_quiet(&c, 0, &["node", "undrain", c.name(drained)]).await?;
    assert_eq!(out["maintenance"], false, "{out}");
    Ok(())
}

#[tokio::test]
async fn a_node_killed_during_migration_converges_to_exactly_one_vm() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "nomad",
            "--template",
            "tiny",
            "--memory",
            "128M",
        ],
    )
    .await?;
    wait_console(&c, "nomad", "KEEL-TINY-READY", secs(90)).await?;
    let source = vm_host(&c, "nomad").await?;
    let target = (0..3).find(|i| *i != source).unwrap_or(0);
    let ask = (0..3).find(|i| *i != source).unwrap_or(0);
    let accepted = cli_quiet(
        &c,
        ask,
        &[
            "vm",
            "migrate",
            "nomad",
            "--to",
            c.name(target),
            "--no-wait",
        ],
    )
    .await?;
    let op_id = accepted["operation"]["id"]
        .as_str()
        .context("operation id")?
        .to_string();
    // Kill the source's service once the target has the incoming domain: mid-migration.
    wait_until(
        "the incoming domain on the target",
        secs(60),
        millis(20),
        || async {
            let there = domains(&c)?
                .iter()
                .any(|(i, n, _)| *i == target && n == "keel-nomad");
            Ok(there.then_some(()))
        },
    )
    .await?;
    c.kill_service(source).await?;
    c.start_host(source).await?;

    let op = wait_until(
        "the migration operation ends",
        secs(180),
        millis(300),
        || async {
            let op = cli_quiet(&c, ask, &["op", "show", &op_id]).await?;
            Ok((op["state"] != "running").then_some(op))
        },
    )
    .await?;
    assert!(
        op["state"] == "succeeded" || op["state"] == "failed",
        "{op}"
    );
    // Whatever the outcome: one domain, running, on the host the cluster says.
    wait_until(
        "exactly one running copy where the cluster places it",
        secs(120),
        millis(500),
        || async {
            let copies: Vec<_> = domains(&c)?
                .into_iter()
                .filter(|(_, n, _)| n == "keel-nomad")
                .collect();
            let placed = vm_host(&c, "nomad").await?;
            let v = vm_show(&c, 0, "nomad").await?;
            let ok = copies.len() == 1
                && copies[0].0 == placed
                && copies[0].2 == "running"
                && v["status"] == "running";
            Ok(ok.then_some(()))
        },
    )
    .await?;
    let placed = vm_host(&c, "nomad").await?;
    let mut console = Console::attach(&c, placed, "nomad").await?;
    console
        .ask("echo alive-$((6*7))", "alive-42", secs(30))
        .await?;
    Ok(())
}

/// A console WebSocket over HTTPS, as a browser (noVNC, xterm.js) would open it.
async fn console_ws(
    c: &TestCluster,
    i: usize,
    vm: &str,
    kind: &str,
    token: Option<&str>,
) -> Result<
    std::result::Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        u16,
    >,
> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let init = c.init_output().context("cluster not initialised")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(init.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = c.api_addr(i);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut request =
        format!("wss://{addr}{}", paths::vm_console(vm, kind)).into_client_request()?;
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(Ok(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok(Err(resp.status().as_u16())),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn consoles_stream_over_authenticated_websockets_from_any_node() -> Result<()> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    keel_tests::skip_unless_root!(Ok(()));
    let c = compute_cluster(3).await?;
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "screen",
            "--template",
            "tiny",
            "--memory",
            "128M",
        ],
    )
    .await?;
    wait_console(&c, "screen", "KEEL-TINY-READY", secs(90)).await?;
    let host = vm_host(&c, "screen").await?;
    let other = (0..3).find(|i| *i != host).unwrap_or(0);
    let token = c.init_output().context("init")?.admin_token;

    // No token, a wrong token: refused before any upgrade.
    assert_eq!(
        console_ws(&c, other, "screen", "serial", None).await?.err(),
        Some(401)
    );
    assert_eq!(
        console_ws(&c, other, "screen", "serial", Some("keel-admin-wrong"))
            .await?
            .err(),
        Some(401)
    );
    assert_eq!(
        console_ws(&c, other, "no-such-vm", "serial", Some(&token))
            .await?
            .err(),
        Some(404)
    );

    // Serial console through a node that does not run the VM (relayed over the peer port).
    let mut ws = console_ws(&c, other, "screen", "serial", Some(&token))
        .await?
        .map_err(|s| anyhow!("serial console refused: {s}"))?;
    ws.send(Message::Binary(b"echo ws-$((6*7))\n".to_vec().into()))
        .await?;
    let mut seen = String::new();
    tokio::time::timeout(secs(30), async {
        while let Some(msg) = ws.next().await {
            if let Message::Binary(b) = msg? {
                seen.push_str(&String::from_utf8_lossy(&b));
                if seen.contains("ws-42") {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        }
        bail!("the console closed")
    })
    .await
    .map_err(|_| anyhow!("no answer on the serial console; saw {seen:?}"))??;
    drop(ws);

    // VNC: the RFB greeting arrives as a binary frame, as noVNC expects.
    let mut ws = console_ws(&c, other, "screen", "vnc", Some(&token))
        .await?
        .map_err(|s| anyhow!("VNC console refused: {s}"))?;
    let first = tokio::time::timeout(secs(20), ws.next())
        .await
        .map_err(|_| anyhow!("no RFB greeting"))?
        .context("closed")??;
    match first {
        Message::Binary(b) => assert!(b.starts_with(b"RFB 003."), "{b:?}"),
        other => bail!("unexpected first message {other:?}"),
    }
    Ok(())
}

/// The Debian 12 cloud template; `scripts/test` builds it before the suite runs.
fn debian_image() -> Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest-images/keel-debian-12.qcow2");
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `scripts/guest-images debian` (scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

#[tokio::test]
async fn a_debian_cloud_vm_gets_its_user_data_hostname_and_keys() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let image = debian_image()?;
    let c = compute_cluster(1).await?;
    // Streamed upload with the checksum the CLI computes; the node verifies both.
    let t = cli_quiet(
        &c,
        0,
        &[
            "template",
            "upload",
            &image.display().to_string(),
            "--name",
            "debian-12",
            "--format",
            "qcow2",
        ],
    )
    .await?;
    assert_eq!(t["format"], "qcow2", "{t}");
    let dir = tempfile::tempdir()?;
    let user_data = dir.path().join("user-data.yaml");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - echo \"KEEL-CLOUD-RUNCMD host=$(hostname) keys=$(grep -c keel-test-key /home/debian/.ssh/authorized_keys)\" > /dev/ttyS0\n",
    )?;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeelKeelKeelKeelKeelKeelKeelKeelKeelKeelKeel keel-test-key";
    cli_quiet(
        &c,
        0,
        &[
            "vm",
            "create",
            "deb",
            "--template",
            "debian-12",
            "--memory",
            "512M",
            "--user-data",
            &user_data.display().to_string(),
            "--ssh-key",
            key,
        ],
    )
    .await?;
    // cloud-init ran the user data, set the hostname from the seed and installed the key.
    wait_console(&c, "deb", "KEEL-CLOUD-RUNCMD host=deb keys=1", secs(300)).await?;
    cli_quiet(&c, 0, &["vm", "delete", "deb"]).await?;
    Ok(())
}
