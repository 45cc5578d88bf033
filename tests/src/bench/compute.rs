//! `keel-bench compute`: VMs on a 3-node cluster whose hosts each run their own libvirtd
//! (guests booted from the tiny template; under TCG unless the nodes' KVM probe found KVM
//! usable). Prints a table and writes JSON.
//!
//! 1. **create → running**: `keel vm create` (the CLI waits for the operation) timed from
//!    the call to its success, each VM deleted before the next; in the same run the same
//!    domain XML started with plain `virsh create` against the same libvirtd. Both p50,
//!    min, max and the ratio keel/virsh.
//! 2. **VMs per minute**: N VMs submitted with `--no-wait` as fast as the API accepts
//!    them, timed until every operation succeeded.
//! 3. **node service RSS** idle and with 50 VMs across the 3 hosts, and the time the
//!    cluster took to converge all 50.
//!
//! Every VM the bench created is deleted before it returns, also when a phase fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use keel_tests::cluster::{ApiClient, ClusterOptions, TestCluster};
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::{json, Value};

/// What the tiny guest prints once its shell runs.
const READY: &str = "KEEL-TINY-READY";
/// Memory of the VMs of the create → running comparison.
const LATENCY_MEMORY_MIB: u64 = 128;
/// Smallest memory size the 50-VM phase may use; sizes are tried upwards until one boots.
/// (The tiny guest's initramfs is unpacked into RAM: below about 80 MiB its kernel stays
/// silent or panics "deadlocked on memory".)
const BOOT_PROBE_MIB: [u64; 6] = [48, 64, 72, 80, 96, 128];
/// Pause before every timed create of the create → running comparison (the previous
/// round's qemu has just exited).
const ROUND_PAUSE: Duration = Duration::from_secs(1);
/// How long a probe VM may take to print `KEEL-TINY-READY` (it takes 5-10 s).
const BOOT_PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// The VMs/min phase uses at least this much memory per VM.
const RATE_MIN_MEMORY_MIB: u64 = 64;
/// Placement's CPU overcommit for the bench: 2 CPUs × 16 = 32 vCPUs per host.
const CPU_OVERCOMMIT: &str = "16";
/// Host memory kept free on top of the estimated need before 50 guests are started.
const MEMORY_MARGIN_MIB: u64 = 2048;

struct Sizes {
    latency_rounds: usize,
    rate_vms: usize,
    rss_vms: usize,
}

/// min / p50 / max of a set of samples in ms.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) samples: Vec<f64>,
    pub(crate) p50: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn summary(samples: Vec<f64>) -> Summary {
    let mut s = samples.clone();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let p50 = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    };
    Summary {
        samples,
        p50,
        min: s.first().copied().unwrap_or(f64::NAN),
        max: s.last().copied().unwrap_or(f64::NAN),
    }
}

pub(crate) fn summary_json(s: &Summary) -> Value {
    json!({"p50": s.p50, "min": s.min, "max": s.max, "samples": s.samples})
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The tiny template: `$KEEL_TINY_IMAGE`, else `target/guest-images/keel-tiny.qcow2`.
pub(crate) fn tiny_image() -> Result<PathBuf> {
    let path = std::env::var_os("KEEL_TINY_IMAGE").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-images/keel-tiny.qcow2"),
        PathBuf::from,
    );
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `scripts/guest-images tiny` (scripts/bench compute does)",
            path.display()
        );
    }
    Ok(path)
}

/// `MemAvailable` of this machine in MiB.
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// VmRSS of every node service, in host order (0 for a node that is not running).
async fn node_rss_kib(c: &TestCluster) -> Vec<u64> {
    let mut rss = Vec::new();
    for i in 0..c.len() {
        let kib = match c.pid(i).await {
            Some(pid) => crate::rss_kib(pid).unwrap_or(0),
            None => 0,
        };
        rss.push(kib);
    }
    rss
}

/// Number and summed VmRSS of the qemu processes on every host.
fn qemu_rss(c: &TestCluster) -> (usize, u64) {
    let pids: Vec<u32> = (0..c.len())
        .filter_map(|i| c.libvirt(i))
        .flat_map(|lv| lv.qemu_pids())
        .collect();
    let total = pids.iter().filter_map(|p| crate::rss_kib(*p)).sum();
    (pids.len(), total)
}

/// Every domain on every host: (host index, name, state).
fn domains(c: &TestCluster) -> Result<Vec<(usize, String, String)>> {
    c.domains()
}

/// Replaces the text of the first `<tag>…</tag>` in `xml`.
fn replace_element(xml: &str, tag: &str, value: &str) -> Result<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml
        .find(&open)
        .ok_or_else(|| anyhow!("no <{tag}> in the domain XML"))?
        + open.len();
    let end = start
        + xml[start..]
            .find(&close)
            .ok_or_else(|| anyhow!("no </{tag}> in the domain XML"))?;
    Ok(format!("{}{value}{}", &xml[..start], &xml[end..]))
}

/// A 3-node cluster with a libvirtd per host, the tiny template imported, every host
/// up with a working hypervisor, and CPU overcommit raised for 50 VMs; and how the hosts
/// run guests (TCG or KVM, with the KVM probe's word).
async fn form() -> Result<(TestCluster, Accel)> {
    let image = tiny_image()?;
    let opts = ClusterOptions {
        libvirt: true,
        // The node's default resync interval (the harness's default is 1 s for tests).
        compute_resync_ms: 5000,
        // `vm create` waits for its operation; 50 guests booting under TCG on two cores
        // slow everything down.
        cli_timeout: Duration::from_secs(900),
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
    // Every host up, with a working hypervisor whose KVM boot probe has decided (the
    // probe boots a guest of its own at start: nothing is measured beside it, and the
    // domain type is known).
    let domain_types = wait_until(
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
            if !ready {
                return Err(anyhow!("not yet: {}", Value::Array(hosts)));
            }
            let mut types: Vec<String> = hosts
                .iter()
                .map(|h| {
                    match h["inventory"]["hypervisor"]["domain_type"].as_str() {
                        Some("qemu") => "TCG",
                        Some("kvm") => "KVM",
                        _ => "?",
                    }
                    .to_string()
                })
                .collect();
            types.dedup();
            let mut details: Vec<String> = hosts
                .iter()
                .map(|h| {
                    h["inventory"]["kvm_detail"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            details.dedup();
            Ok(Some(Accel {
                name: types.join("/"),
                kvm_probe: details.join("; "),
            }))
        },
    )
    .await?;
    c.api(0)?
        .put_setting("compute.cpu-overcommit", CPU_OVERCOMMIT)
        .await?;
    Ok((c, domain_types))
}

/// How the hosts run guests.
struct Accel {
    /// `TCG` or `KVM` (`TCG/KVM` if the hosts differ).
    name: String,
    /// The nodes' KVM boot probe's verdict.
    kvm_probe: String,
}

/// `keel vm create NAME --template tiny --memory M [extra…]` on host `i`.
async fn vm_create(
    c: &TestCluster,
    i: usize,
    name: &str,
    memory_mib: u64,
    extra: &[&str],
) -> Result<Value> {
    let memory = format!("{memory_mib}M");
    let mut args = vec![
        "vm",
        "create",
        name,
        "--template",
        "tiny",
        "--memory",
        &memory,
    ];
    args.extend_from_slice(extra);
    c.cli(i, &args).await
}

/// (VM id, host index) of a VM.
pub(crate) async fn vm_place(c: &TestCluster, i: usize, name: &str) -> Result<(String, usize)> {
    let v = c.cli(i, &["vm", "show", name]).await?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| anyhow!("{name} has no id: {v}"))?
        .to_string();
    let host = v["host_id"]
        .as_u64()
        .and_then(|h| c.index_of(h))
        .ok_or_else(|| anyhow!("{name} is not placed on a known host: {v}"))?;
    Ok((id, host))
}

fn vm_dir(c: &TestCluster, host: usize, id: &str) -> PathBuf {
    c.data_dir(host).join("images/vms").join(id)
}

fn console_has(c: &TestCluster, host: usize, id: &str, marker: &str) -> bool {
    std::fs::read(vm_dir(c, host, id).join("console.log"))
        .is_ok_and(|b| String::from_utf8_lossy(&b).contains(marker))
}

/// Waits until every operation in `ops` succeeded (polling the API of the host they were
/// submitted to); returns each one's completion time on the server's clock (ms since the
/// epoch; the cluster runs on this machine, so it is the same clock as ours). A failed or
/// cancelled operation is an error.
async fn wait_ops(api: &ApiClient, ops: &[String], timeout: Duration) -> Result<Vec<u64>> {
    let mut done: BTreeMap<&str, u64> = BTreeMap::new();
    let t0 = Instant::now();
    loop {
        for id in ops {
            if done.contains_key(id.as_str()) {
                continue;
            }
            // Just accepted: this node's replica may not have applied it yet.
            let Ok(op) = api.get(&keel_client::paths::operation(id)).await else {
                continue;
            };
            match op["state"].as_str() {
                Some("succeeded") => {
                    done.insert(id, op["updated_at_ms"].as_u64().unwrap_or(0));
                }
                Some("running") | None => {}
                Some(other) => bail!(
                    "operation {id} ({}) {other}: {}",
                    op["vm_name"],
                    op["detail"]
                ),
            }
        }
        if done.len() == ops.len() {
            return Ok(ops
                .iter()
                .filter_map(|o| done.get(o.as_str()).copied())
                .collect());
        }
        if t0.elapsed() > timeout {
            bail!(
                "{} of {} operations not done after {timeout:?}",
                ops.len() - done.len(),
                ops.len()
            );
        }
        tokio::time::sleep(millis(200)).await;
    }
}

/// Submits `names` with `--no-wait` one after the other on host `i`; returns the
/// operation ids.
async fn submit_creates(
    c: &TestCluster,
    i: usize,
    names: &[String],
    memory_mib: u64,
    no_start: bool,
) -> Result<Vec<String>> {
    let mut ops = Vec::new();
    let mut extra = vec!["--no-wait"];
    if no_start {
        extra.push("--no-start");
    }
    for name in names {
        let accepted = vm_create(c, i, name, memory_mib, &extra).await?;
        ops.push(
            accepted["operation"]["id"]
                .as_str()
                .ok_or_else(|| anyhow!("no operation id in {accepted}"))?
                .to_string(),
        );
    }
    Ok(ops)
}

/// Deletes every VM of the cluster (without waiting for each) and waits until none is
/// left, on the cluster nor on any libvirtd.
pub(crate) async fn delete_all(c: &TestCluster, i: usize) -> Result<()> {
    let vms = c.cli(i, &["vm", "list"]).await?;
    for vm in vms.as_array().into_iter().flatten() {
        if let Some(name) = vm["name"].as_str() {
            if vm["status"] != "deleting" {
                c.cli(i, &["vm", "delete", name, "--no-wait"]).await?;
            }
        }
    }
    wait_until("every VM deleted", secs(600), millis(500), || async {
        let left = c.cli(i, &["vm", "list"]).await?;
        let left = left.as_array().map_or(0, Vec::len);
        let doms = domains(c)?
            .into_iter()
            .filter(|(_, n, _)| n.starts_with("keel-") && n != "keel-kvm-probe")
            .count();
        if left == 0 && doms == 0 {
            Ok(Some(()))
        } else {
            Err(anyhow!("{left} VMs and {doms} keel domains left"))
        }
    })
    .await?;
    Ok(())
}

/// Destroys the transient domains the virsh baseline started (they are not Keel's).
fn destroy_baseline_domains(c: &TestCluster) {
    if let Ok(doms) = domains(c) {
        for (i, name, _) in doms {
            if name.starts_with("bench-virsh-") {
                if let Some(lv) = c.libvirt(i) {
                    let _ = lv.virsh(&["destroy", &name]);
                }
            }
        }
    }
}

struct Latency {
    rounds: usize,
    keel_cli: Summary,
    keel_server: Summary,
    virsh: Summary,
    overlay: Summary,
    keel_hosts: Vec<usize>,
    virsh_host: usize,
}

/// Phase 1: `keel vm create` (waiting) against `virsh create` of the same domain XML.
///
/// What the difference contains — everything Keel does between the API call and a
/// running domain that a bare `virsh create` of a ready-made XML and disk does not:
/// * the CLI: its own start-up and its request over the admin socket (virsh starts a
///   process too, so that part is on both sides), then polling the operation every
///   250 ms — up to 250 ms of the keel figure is that poll interval (the second row is
///   the operation's own times, without it: from the API handler accepting the request
///   to the host reporting the domain running, i.e. all of the below but the commit of
///   that report);
/// * raft: the create is validated and committed (a round trip to a majority, fsync of
///   the log), placement picks a host (a second committed write), the chosen host's
///   reconciler wakes on the apply;
/// * the disks: `qemu-img create` of the root overlay on the template and the NoCloud
///   seed image (written in Rust) — the baseline's overlay is made before its timer
///   starts (its time is reported apart), its seed is a copy made once;
/// * define + start instead of create: Keel defines a persistent domain, looks it up,
///   starts it and looks it up again (several libvirt calls; libvirt writes the
///   persistent definition to disk), while `virsh create` starts a transient domain in
///   one call;
/// * reporting: the host writes "running" through raft (another commit, forwarded to the
///   leader when that host is a follower), and only that marks the operation succeeded.
///
/// The CLI runs on the leader's host; placement (spread, no VM left between rounds) then
/// picks the same host every round, and the baseline uses that host's libvirtd.
async fn latency(c: &TestCluster, cli_host: usize, rounds: usize) -> Result<Latency> {
    let mut keel_cli = Vec::new();
    let mut keel_server = Vec::new();
    let mut keel_hosts = Vec::new();
    let mut virsh = Vec::new();
    let mut overlay = Vec::new();
    let bench_dir = c.dir().join("bench-virsh");
    std::fs::create_dir_all(&bench_dir)?;
    // Taken from the first Keel VM.
    let mut base: Option<Baseline> = None;
    // Rounds alternate keel, virsh, keel, … so that both see the machine in the same
    // state; each starts after the same pause.
    for r in 0..rounds {
        tokio::time::sleep(ROUND_PAUSE).await;
        let name = format!("lat-{r}");
        let t0 = Instant::now();
        let op = vm_create(c, cli_host, &name, LATENCY_MEMORY_MIB, &[]).await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if op["state"] != "succeeded" {
            bail!("vm create {name}: the operation did not succeed: {op}");
        }
        let server = op["updated_at_ms"].as_u64().unwrap_or(0) as f64
            - op["created_at_ms"].as_u64().unwrap_or(0) as f64;
        let (id, host) = vm_place(c, cli_host, &name).await?;
        let lv = c
            .libvirt(host)
            .ok_or_else(|| anyhow!("host {host} has no libvirtd"))?;
        let state = lv.virsh(&["domstate", &format!("keel-{name}")])?;
        if state.trim() != "running" {
            bail!(
                "keel-{name} is {:?} after its create succeeded",
                state.trim()
            );
        }
        eprintln!(
            "keel-bench: create → running round {r}: keel {ms:.0} ms (operation {server:.0} ms) on {}",
            c.name(host)
        );
        keel_cli.push(ms);
        keel_server.push(server);
        keel_hosts.push(host);
        if base.is_none() {
            base = Some(Baseline::take(c, host, &name, &id, &bench_dir)?);
        }
        c.cli(cli_host, &["vm", "delete", &name]).await?;

        tokio::time::sleep(ROUND_PAUSE).await;
        let b = base.as_ref().ok_or_else(|| anyhow!("no baseline XML"))?;
        let (ms, overlay_ms) = b.round(c, r)?;
        eprintln!(
            "keel-bench: create → running round {r}: virsh {ms:.0} ms on {}",
            c.name(b.host)
        );
        virsh.push(ms);
        overlay.push(overlay_ms);
    }
    std::fs::remove_dir_all(&bench_dir).ok();
    let virsh_host = base.map_or(cli_host, |b| b.host);
    Ok(Latency {
        rounds,
        keel_cli: summary(keel_cli),
        keel_server: summary(keel_server),
        virsh: summary(virsh),
        overlay: summary(overlay),
        keel_hosts,
        virsh_host,
    })
}

/// Live migrations of one running guest, host to host in turn.
struct Migrations {
    rounds: usize,
    /// `keel vm migrate … --to …`, waiting, as the CLI saw it.
    keel_cli: Summary,
    /// The operation's own duration (accepted → the guest runs on the target).
    keel_server: Summary,
}

/// Phase 1b: `keel vm migrate` of a running `LATENCY_MEMORY_MIB` guest, `rounds` times
/// around the hosts. Each move is live (memory and the root overlay stream qemu → qemu,
/// both relayed by the nodes over mTLS).
async fn migrations(c: &TestCluster, cli_host: usize, rounds: usize) -> Result<Migrations> {
    const NAME: &str = "mig";
    vm_create(c, cli_host, NAME, LATENCY_MEMORY_MIB, &[]).await?;
    let (id, first) = vm_place(c, cli_host, NAME).await?;
    wait_until("the migration guest's shell", secs(90), millis(200), || {
        let ready = console_has(c, first, &id, READY);
        async move {
            if ready {
                Ok(Some(()))
            } else {
                Err(anyhow!("{READY} not printed yet"))
            }
        }
    })
    .await?;
    let mut keel_cli = Vec::new();
    let mut keel_server = Vec::new();
    for r in 0..rounds {
        tokio::time::sleep(ROUND_PAUSE).await;
        let (_, host) = vm_place(c, cli_host, NAME).await?;
        let target = (host + 1) % c.len();
        let t0 = Instant::now();
        let op = c
            .cli(cli_host, &["vm", "migrate", NAME, "--to", c.name(target)])
            .await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if op["state"] != "succeeded" {
            bail!("vm migrate {NAME}: the operation did not succeed: {op}");
        }
        let server = op["updated_at_ms"].as_u64().unwrap_or(0) as f64
            - op["created_at_ms"].as_u64().unwrap_or(0) as f64;
        eprintln!(
            "keel-bench: live migration round {r}: {} → {}: {ms:.0} ms (operation {server:.0} ms)",
            c.name(host),
            c.name(target)
        );
        keel_cli.push(ms);
        keel_server.push(server);
    }
    c.cli(cli_host, &["vm", "delete", NAME]).await?;
    Ok(Migrations {
        rounds,
        keel_cli: summary(keel_cli),
        keel_server: summary(keel_server),
    })
}

/// The virsh side of the comparison: a Keel-created domain's definition, re-pointed at
/// files of its own.
struct Baseline {
    /// The host whose libvirtd ran the Keel domain.
    host: usize,
    /// `virsh dumpxml --inactive` of the Keel domain: what Keel defined.
    xml: String,
    /// The Keel VM's directory (root disk, seed, console log) as the XML names it.
    vm_dir: String,
    /// The template file the Keel root disk is an overlay of.
    backing: PathBuf,
    /// Where the baseline's files go (a copy of the seed, the overlays, the console log).
    dir: PathBuf,
}

impl Baseline {
    /// Takes the definition and files of the running Keel domain `keel-NAME`.
    fn take(c: &TestCluster, host: usize, name: &str, id: &str, dir: &Path) -> Result<Self> {
        let lv = c
            .libvirt(host)
            .ok_or_else(|| anyhow!("host {host} has no libvirtd"))?;
        let vm_dir = vm_dir(c, host, id);
        let xml = lv.virsh(&["dumpxml", "--inactive", &format!("keel-{name}")])?;
        let root = vm_dir.join("root.qcow2");
        // -U: qemu holds the image's lock.
        let info = qemu_img(&["info", "-U", "--output=json"], &root)?;
        let info: Value = serde_json::from_str(&info).context("qemu-img info output")?;
        let backing = info["full-backing-filename"]
            .as_str()
            .or_else(|| info["backing-filename"].as_str())
            .ok_or_else(|| anyhow!("the Keel root disk has no backing file: {info}"))?;
        std::fs::copy(vm_dir.join("seed.img"), dir.join("seed.img"))
            .context("copy the seed image")?;
        if !xml.contains(&root.display().to_string()) {
            bail!("the domain XML does not name {}:\n{xml}", root.display());
        }
        Ok(Baseline {
            host,
            xml,
            vm_dir: vm_dir.display().to_string(),
            backing: PathBuf::from(backing),
            dir: dir.to_path_buf(),
        })
    }

    /// One round: a fresh overlay (timed apart), then `virsh create` of the XML with a new
    /// name and UUID, timed; the domain is destroyed after. Returns (create ms, overlay ms).
    fn round(&self, c: &TestCluster, r: usize) -> Result<(f64, f64)> {
        let lv = c
            .libvirt(self.host)
            .ok_or_else(|| anyhow!("host {} has no libvirtd", self.host))?;
        let name = format!("bench-virsh-{r}");
        let root = self.dir.join(format!("root-{r}.qcow2"));
        let t0 = Instant::now();
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.backing)
            .arg(&root)
            .output()
            .context("run qemu-img create")?;
        if !out.status.success() {
            bail!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let overlay_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let doc = replace_element(&self.xml, "name", &name)?;
        let doc = replace_element(&doc, "uuid", &keel_tests::libvirt::random_uuid())?;
        let doc = doc
            .replace(
                &format!("{}/root.qcow2", self.vm_dir),
                &root.display().to_string(),
            )
            .replace(&self.vm_dir, &self.dir.display().to_string());
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, &doc)?;
        let file = file.display().to_string();
        let t0 = Instant::now();
        lv.virsh(&["create", &file])?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let state = lv.virsh(&["domstate", &name])?;
        lv.virsh(&["destroy", &name])?;
        std::fs::remove_file(&root).ok();
        if state.trim() != "running" {
            bail!("{name} was {:?} after virsh create", state.trim());
        }
        Ok((ms, overlay_ms))
    }
}

/// `qemu-img ARGS… PATH`; stdout.
fn qemu_img(args: &[&str], path: &Path) -> Result<String> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .context("run qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img {} {}: {}",
            args.join(" "),
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The smallest memory size (of [`BOOT_PROBE_MIB`]) at which the tiny guest reaches
/// `KEEL-TINY-READY`, and what every tried size did.
async fn boot_probe(c: &TestCluster, cli_host: usize) -> Result<(u64, Vec<(u64, bool, String)>)> {
    let mut tried = Vec::new();
    for size in BOOT_PROBE_MIB {
        let name = format!("boot-{size}");
        vm_create(c, cli_host, &name, size, &[]).await?;
        let (id, host) = vm_place(c, cli_host, &name).await?;
        let t0 = Instant::now();
        let r = wait_until(
            format!("{name} to print {READY}"),
            BOOT_PROBE_TIMEOUT,
            millis(500),
            || async {
                let log = std::fs::read(vm_dir(c, host, &id).join("console.log"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
                    .unwrap_or_default();
                if log.contains(READY) {
                    return Ok(Some(()));
                }
                if let Some(line) = log.lines().find(|l| l.contains("Kernel panic")) {
                    return Err(keel_tests::wait::abort(line.trim().to_string()));
                }
                // What the guest printed last, for the report.
                let last: String = log
                    .lines()
                    .rev()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && l.chars().all(|ch| !ch.is_control()))
                    .unwrap_or("nothing")
                    .chars()
                    .take(80)
                    .collect();
                Err(anyhow!("no {READY}; the console's last line: {last}"))
            },
        )
        .await;
        c.cli(cli_host, &["vm", "delete", &name]).await?;
        let ok = r.is_ok();
        let note = match r {
            Ok(()) => format!("{READY} after {:.1} s", t0.elapsed().as_secs_f64()),
            Err(e) if e.aborted => e.last,
            Err(e) => format!("after {:.0} s: {}", e.elapsed.as_secs_f64(), e.last),
        };
        eprintln!("keel-bench: tiny guest with {size} MiB: {note}");
        tried.push((size, ok, note));
        if ok {
            return Ok((size, tried));
        }
    }
    bail!("the tiny guest booted at none of {BOOT_PROBE_MIB:?} MiB: {tried:?}")
}

struct Rate {
    vms: usize,
    memory_mib: u64,
    accepted_s: f64,
    all_running_s: f64,
    per_min: f64,
    per_host: Vec<usize>,
    qemu_rss_per_guest_mib: f64,
}

/// Phase 2: N VMs submitted back to back; time until every create succeeded.
async fn rate(c: &TestCluster, cli_host: usize, n: usize, memory_mib: u64) -> Result<Rate> {
    let names: Vec<String> = (0..n).map(|i| format!("rate-{i}")).collect();
    let start_ms = now_ms();
    let t0 = Instant::now();
    let ops = submit_creates(c, cli_host, &names, memory_mib, false).await?;
    let accepted_s = t0.elapsed().as_secs_f64();
    let done = wait_ops(&c.api(cli_host)?, &ops, secs(900)).await?;
    let last = done.iter().copied().max().unwrap_or(start_ms);
    let all_running_s = last.saturating_sub(start_ms) as f64 / 1000.0;
    let mut per_host = vec![0; c.len()];
    for name in &names {
        per_host[vm_place(c, cli_host, name).await?.1] += 1;
    }
    let running = domains(c)?
        .iter()
        .filter(|(_, n, s)| n.starts_with("keel-rate-") && s == "running")
        .count();
    if running != n {
        bail!("{running} of {n} rate-* domains are running after their creates succeeded");
    }
    // What one of these guests costs the machine, for the 50-VM phase's fit check (let
    // them boot first: most of a TCG guest's memory is touched while it boots).
    let _ = wait_until(
        "the rate-* guests to boot",
        secs(180),
        millis(1000),
        || async {
            let mut ready = 0;
            for name in &names {
                let (id, host) = vm_place(c, cli_host, name).await?;
                ready += usize::from(console_has(c, host, &id, READY));
            }
            Ok((ready == n).then_some(()))
        },
    )
    .await;
    let (count, total_kib) = qemu_rss(c);
    let qemu_rss_per_guest_mib = mib(total_kib) / count.max(1) as f64;
    delete_all(c, cli_host).await?;
    Ok(Rate {
        vms: n,
        memory_mib,
        accepted_s,
        all_running_s,
        per_min: n as f64 / (all_running_s / 60.0),
        per_host,
        qemu_rss_per_guest_mib,
    })
}

struct Fleet {
    vms: usize,
    memory_mib: u64,
    started: bool,
    note: Option<String>,
    converge_s: f64,
    rss_at_converge_kib: Vec<u64>,
    rss_kib: Vec<u64>,
    per_host: Vec<usize>,
    guests_ready: usize,
    guests_ready_after_s: f64,
    qemu_count: usize,
    qemu_rss_kib: u64,
    mem_available_mib: u64,
}

/// Phase 3: `n` VMs across the hosts; the node services' RSS once they converged.
async fn fleet(
    c: &TestCluster,
    cli_host: usize,
    n: usize,
    memory_mib: u64,
    per_guest_mib: f64,
) -> Result<Fleet> {
    let need = (n as f64 * per_guest_mib * 1.25) as u64 + MEMORY_MARGIN_MIB;
    let avail = mem_available_mib();
    let mut note = None;
    let mut started = need <= avail;
    if !started {
        note = Some(format!(
            "{n} running guests need about {need} MiB ({per_guest_mib:.0} MiB of qemu each, \
             +25 %, + {MEMORY_MARGIN_MIB} MiB), only {avail} MiB available: created with --no-start"
        ));
    }
    loop {
        let names: Vec<String> = (0..n).map(|i| format!("fleet-{i}")).collect();
        let start_ms = now_ms();
        let t0 = Instant::now();
        let r = async {
            let ops = submit_creates(c, cli_host, &names, memory_mib, !started).await?;
            wait_ops(&c.api(cli_host)?, &ops, secs(1200)).await
        }
        .await;
        let done = match r {
            Ok(done) => done,
            Err(e) if started => {
                let why = format!("{e:#}");
                eprintln!(
                    "keel-bench: {n} running VMs did not converge ({why}); again with --no-start"
                );
                note = Some(format!(
                    "{n} running guests did not converge on this machine ({why}): created with --no-start"
                ));
                delete_all(c, cli_host).await?;
                started = false;
                continue;
            }
            Err(e) => return Err(e),
        };
        let last = done.iter().copied().max().unwrap_or(start_ms);
        let converge_s = last.saturating_sub(start_ms) as f64 / 1000.0;
        eprintln!(
            "keel-bench: {n} VMs converged in {converge_s:.1} s (seen after {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        let rss_at_converge_kib = node_rss_kib(c).await;
        let mut per_host = vec![0; c.len()];
        let mut placed = Vec::new();
        for name in &names {
            let (id, host) = vm_place(c, cli_host, name).await?;
            per_host[host] += 1;
            placed.push((id, host));
        }
        // Running guests: wait (bounded) until they all booted, so that the RSS below is
        // taken with the fleet settled, and to show they really run at this size.
        let mut guests_ready = 0;
        let t_boot = Instant::now();
        if started {
            let _ = wait_until(
                format!("{n} guests to print {READY}"),
                secs(600),
                millis(2000),
                || {
                    guests_ready = placed
                        .iter()
                        .filter(|(id, host)| console_has(c, *host, id, READY))
                        .count();
                    let all = guests_ready == n;
                    async move { Ok(all.then_some(())) }
                },
            )
            .await;
        }
        let guests_ready_after_s = t_boot.elapsed().as_secs_f64();
        // A few resync rounds (5 s each) with every VM in place.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let rss_kib = node_rss_kib(c).await;
        let (qemu_count, qemu_rss_kib) = qemu_rss(c);
        let mem_available_mib = mem_available_mib();
        delete_all(c, cli_host).await?;
        return Ok(Fleet {
            vms: n,
            memory_mib,
            started,
            note,
            converge_s,
            rss_at_converge_kib,
            rss_kib,
            per_host,
            guests_ready,
            guests_ready_after_s,
            qemu_count,
            qemu_rss_kib,
            mem_available_mib,
        });
    }
}

/// Runs the compute benchmark, prints the table and writes the JSON report to `out_path`.
pub async fn run(quick: bool, out_path: &str) -> Result<()> {
    let sizes = if quick {
        Sizes {
            latency_rounds: 3,
            rate_vms: 6,
            rss_vms: 12,
        }
    } else {
        Sizes {
            latency_rounds: 10,
            rate_vms: 15,
            rss_vms: 50,
        }
    };
    eprintln!("keel-bench: forming a 3-node cluster with a libvirtd per host");
    let (c, accel) = form().await?;
    let r = phases(&c, &sizes, quick, &accel, out_path).await;
    if r.is_err() {
        c.mark_failed();
    }
    // Whatever happened, leave no VM behind (the cluster's drop then kills the nodes,
    // the libvirtds and any qemu left).
    destroy_baseline_domains(&c);
    if let Ok(leader) = c.leader().await {
        if let Err(e) = delete_all(&c, leader).await {
            eprintln!("keel-bench: cleanup: {e:#}");
            c.mark_failed();
        }
    }
    drop(c);
    r
}

async fn phases(
    c: &TestCluster,
    sizes: &Sizes,
    quick: bool,
    accel: &Accel,
    out_path: &str,
) -> Result<()> {
    let cli_host = c.leader().await?;
    // Idle: the cluster formed, template imported, no VM created yet.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_kib = node_rss_kib(c).await;

    // Warm-up, not measured: one VM per host, so that every host has fetched the
    // template and opened its libvirt connection before the timed rounds.
    let warm: Vec<String> = (0..c.len()).map(|i| format!("warm-{i}")).collect();
    for name in &warm {
        vm_create(c, cli_host, name, LATENCY_MEMORY_MIB, &[]).await?;
    }
    delete_all(c, cli_host).await?;

    let lat = latency(c, cli_host, sizes.latency_rounds).await?;
    let mig = migrations(c, cli_host, sizes.latency_rounds).await?;
    let (boot_mib, boot_tried) = boot_probe(c, cli_host).await?;
    let rate_mib = boot_mib.max(RATE_MIN_MEMORY_MIB);
    let rate = rate(c, cli_host, sizes.rate_vms, rate_mib).await?;
    let fleet = fleet(
        c,
        cli_host,
        sizes.rss_vms,
        boot_mib,
        rate.qemu_rss_per_guest_mib,
    )
    .await?;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nKeel compute benchmark (3 nodes in network namespaces, a libvirtd each, {cores} cores; \
         guests from the tiny template under {})",
        accel.name
    );
    println!(
        "\n{:<48} {:>8} {:>8} {:>8}",
        format!(
            "create → running, {} MiB, {} rounds",
            LATENCY_MEMORY_MIB, lat.rounds
        ),
        "p50 ms",
        "min ms",
        "max ms"
    );
    let row = |name: &str, s: &Summary| {
        println!("{:<48} {:>8.0} {:>8.0} {:>8.0}", name, s.p50, s.min, s.max);
    };
    row(
        &format!("keel vm create on {} (leader), waits", c.name(cli_host)),
        &lat.keel_cli,
    );
    row("  API accepted → host reported running", &lat.keel_server);
    row(
        &format!(
            "virsh create, same XML, {}'s libvirtd",
            c.name(lat.virsh_host)
        ),
        &lat.virsh,
    );
    row("  (qemu-img create of its overlay, untimed)", &lat.overlay);
    let ratio = lat.keel_cli.p50 / lat.virsh.p50;
    let ratio_server = lat.keel_server.p50 / lat.virsh.p50;
    println!(
        "keel / virsh, p50: {ratio:.1}x (operation alone: {ratio_server:.1}x); keel VMs ran on {}",
        lat.keel_hosts
            .iter()
            .map(|h| c.name(*h).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "\n{:<48} {:>8} {:>8} {:>8}",
        format!(
            "live migration, {} MiB guest, {} rounds",
            LATENCY_MEMORY_MIB, mig.rounds
        ),
        "p50 ms",
        "min ms",
        "max ms"
    );
    row("keel vm migrate --to (next host), waits", &mig.keel_cli);
    row("  API accepted → running on the target", &mig.keel_server);
    println!(
        "\nVMs created per minute, {} VMs × {} MiB on 3 hosts: {:.1}/min  (all accepted after \
         {:.1} s, all running after {:.1} s; per host {})",
        rate.vms,
        rate.memory_mib,
        rate.per_min,
        rate.accepted_s,
        rate.all_running_s,
        rate.per_host
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/")
    );
    println!(
        "tiny guest memory: {}",
        boot_tried
            .iter()
            .map(|(m, ok, note)| format!("{m} MiB {}", if *ok { "boots" } else { note }))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let fleet_label = format!(
        "{} VMs × {} MiB {}",
        fleet.vms,
        fleet.memory_mib,
        if fleet.started {
            "running"
        } else {
            "defined (--no-start)"
        }
    );
    println!(
        "\n{:<34} {}  {:>8}",
        "node service RSS, MiB",
        (0..c.len())
            .map(|i| format!("{:>8}", c.name(i)))
            .collect::<String>(),
        "max"
    );
    let rss_row = |name: &str, kib: &[u64]| {
        println!(
            "{:<34} {}  {:>8.1}",
            name,
            kib.iter()
                .map(|k| format!("{:>8.1}", mib(*k)))
                .collect::<String>(),
            mib(kib.iter().copied().max().unwrap_or(0))
        );
    };
    rss_row("idle, no VM yet", &idle_kib);
    rss_row(
        &format!("{fleet_label}, converged"),
        &fleet.rss_at_converge_kib,
    );
    rss_row(&format!("{fleet_label}, settled"), &fleet.rss_kib);
    println!(
        "{} VMs converged (every create succeeded) in {:.1} s; per host {}",
        fleet.vms,
        fleet.converge_s,
        fleet
            .per_host
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/")
    );
    if fleet.started {
        println!(
            "{}/{} guests printed {READY} within {:.0} s of converging; {} qemu processes, \
             {:.0} MiB RSS in all; {} MiB of memory still available",
            fleet.guests_ready,
            fleet.vms,
            fleet.guests_ready_after_s,
            fleet.qemu_count,
            mib(fleet.qemu_rss_kib),
            fleet.mem_available_mib
        );
    }
    if let Some(note) = &fleet.note {
        println!("NOTE: {note}");
    }

    let names: Vec<String> = (0..c.len()).map(|i| c.name(i).to_string()).collect();
    let mibs = |kib: &[u64]| kib.iter().map(|k| mib(*k)).collect::<Vec<_>>();
    let max_mib = |kib: &[u64]| mib(kib.iter().copied().max().unwrap_or(0));
    let report = json!({
        "bench": "compute",
        "quick": quick,
        "nodes": c.len(),
        "node_names": names,
        "cores": cores,
        "guest": {"template": "keel-tiny", "accel": accel.name, "kvm_probe": accel.kvm_probe},
        "cpu_overcommit": CPU_OVERCOMMIT.parse::<f64>().unwrap_or(0.0),
        "create_to_running_ms": {
            "rounds": lat.rounds,
            "memory_mib": LATENCY_MEMORY_MIB,
            "keel_cli": summary_json(&lat.keel_cli),
            "keel_operation_server": summary_json(&lat.keel_server),
            "virsh_create": summary_json(&lat.virsh),
            "virsh_overlay_qemu_img": summary_json(&lat.overlay),
            "ratio_keel_virsh_p50": ratio,
            "ratio_keel_operation_virsh_p50": ratio_server,
            "keel_hosts": lat.keel_hosts.iter().map(|h| c.name(*h)).collect::<Vec<_>>(),
            "virsh_host": c.name(lat.virsh_host),
        },
        "live_migration_ms": {
            "rounds": mig.rounds,
            "memory_mib": LATENCY_MEMORY_MIB,
            "keel_cli": summary_json(&mig.keel_cli),
            "keel_operation_server": summary_json(&mig.keel_server),
            "streams": "qemu on loopback, relayed by the nodes over mTLS",
        },
        "boot_probe": boot_tried
            .iter()
            .map(|(m, ok, note)| json!({"memory_mib": m, "boots": ok, "note": note}))
            .collect::<Vec<_>>(),
        "create_rate": {
            "vms": rate.vms,
            "memory_mib": rate.memory_mib,
            "accepted_s": rate.accepted_s,
            "all_running_s": rate.all_running_s,
            "vms_per_min": rate.per_min,
            "per_host": rate.per_host,
            "qemu_rss_per_guest_mib": rate.qemu_rss_per_guest_mib,
        },
        "rss": {
            "idle_mib": mibs(&idle_kib),
            "idle_max_mib": max_mib(&idle_kib),
            "vms": fleet.vms,
            "memory_mib": fleet.memory_mib,
            "started": fleet.started,
            "note": fleet.note,
            "converge_s": fleet.converge_s,
            "per_host": fleet.per_host,
            "at_converge_mib": mibs(&fleet.rss_at_converge_kib),
            "at_converge_max_mib": max_mib(&fleet.rss_at_converge_kib),
            "settled_mib": mibs(&fleet.rss_kib),
            "settled_max_mib": max_mib(&fleet.rss_kib),
            "guests_ready": fleet.guests_ready,
            "guests_ready_after_s": fleet.guests_ready_after_s,
            "qemu_processes": fleet.qemu_count,
            "qemu_rss_total_mib": mib(fleet.qemu_rss_kib),
            "mem_available_mib": fleet.mem_available_mib,
        },
    });
    crate::write_report(out_path, &report)?;
    println!("\nwrote {out_path}");
    Ok(())
}
