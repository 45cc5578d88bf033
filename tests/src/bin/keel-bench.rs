//! `keel-bench`: measures a 3-node cluster of real `keel serve` processes in network
//! namespaces, prints a table and writes the figures as JSON.
//!
//! `cluster` (the default; `target/bench/cluster.json`):
//!
//! * write latency (p50/p99) and throughput through the HTTPS API, sequential and
//!   concurrent, sent to a follower (so they include forwarding) and to the leader;
//! * the same straight on raft inside the leader (`keel debug bench-raft`: no HTTP/TLS);
//! * leader failover: kill -9 of the leader → first write accepted by a survivor
//!   (median of 5 rounds);
//! * idle RSS of every node service.
//!
//! `compute` (`target/bench/compute.json`): VMs through the API against plain `virsh`,
//! VMs created per minute, node service RSS with 50 VMs; see `bench/compute.rs`.
//!
//! `network` (`target/bench/network.json`): guest-network throughput over the VXLAN
//! overlay against the underlay (iperf3 between namespaces that stand in for two VMs'
//! NICs on different hosts), and how long a security-group rule takes from the API to
//! every host's nftables and to the first packet it lets through; see `bench/network.rs`.
//!
//! Usage: `keel-bench [cluster|compute|network|all] [--out FILE] [--quick]` (root; `KEEL_BIN`
//! names the keel binary, `./scripts/bench` builds release binaries and runs this;
//! `--out` only with a single benchmark).

#[path = "../bench/compute.rs"]
mod compute;
#[path = "../bench/network.rs"]
mod network;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, wait_until};
use serde_json::{json, Value};

struct Stats {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    throughput: f64,
    errors: usize,
}

fn stats(mut lat_us: Vec<u64>, elapsed: Duration, errors: usize) -> Stats {
    lat_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_us.is_empty() {
            return f64::NAN;
        }
        let idx = ((lat_us.len() as f64 - 1.0) * p).round() as usize;
        lat_us[idx] as f64 / 1000.0
    };
    Stats {
        n: lat_us.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        throughput: lat_us.len() as f64 / elapsed.as_secs_f64(),
        errors,
    }
}

fn stats_json(s: &Stats) -> Value {
    json!({"writes": s.n, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "writes_per_s": s.throughput, "errors": s.errors})
}

async fn api_writes(
    cluster: &TestCluster,
    host: usize,
    count: usize,
    concurrency: usize,
) -> Result<Stats> {
    let api = cluster.api(host)?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let api = api.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                match api
                    .put_setting(&format!("bench.api.k{}", i % 64), &i.to_string())
                    .await
                {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    Ok(stats(lat, start.elapsed(), errors))
}

async fn raft_writes(
    cluster: &TestCluster,
    host: usize,
    count: usize,
    concurrency: usize,
) -> Result<Stats> {
    let out = cluster
        .cli(
            host,
            &[
                "debug",
                "bench-raft",
                "--count",
                &count.to_string(),
                "--concurrency",
                &concurrency.to_string(),
            ],
        )
        .await?;
    let lat: Vec<u64> = out["latencies_us"]
        .as_array()
        .context("latencies_us")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let elapsed = Duration::from_micros(out["elapsed_us"].as_u64().unwrap_or(1));
    Ok(stats(
        lat,
        elapsed,
        out["errors"].as_u64().unwrap_or(0) as usize,
    ))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// kill -9 the leader; time from the signal until a write through a survivor's API
/// succeeds. Attempts start right after the signal, each cut at 300 ms so that one sent
/// into the election does not hide the moment the cluster is writable again.
async fn failover_once(cluster: &TestCluster) -> Result<f64> {
    let leader = cluster.leader().await?;
    let survivor = (leader + 1) % cluster.len();
    let api = cluster.api(survivor)?;
    api.put_setting("bench.failover.warmup", "1").await?;
    let pid = cluster.pid(leader).await.context("the leader has no pid")?;
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("kill -9 the leader")?;
    let mut i = 0u64;
    wait_until(
        "a write accepted after the leader was killed",
        Duration::from_secs(30),
        millis(5),
        || {
            i += 1;
            let api = api.clone();
            let key = format!("bench.failover.k{i}");
            async move {
                match tokio::time::timeout(Duration::from_millis(300), api.put_setting(&key, "1"))
                    .await
                {
                    Ok(Ok(_)) => Ok(Some(())),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(anyhow::anyhow!("attempt timed out")),
                }
            }
        },
    )
    .await?;
    let failover = t0.elapsed();
    // Reap it through the harness, then bring it back for the next round.
    cluster.kill(leader).await?;
    let new_leader = cluster.leader().await?;
    anyhow::ensure!(
        new_leader != leader,
        "the killed node is still reported as leader"
    );
    cluster.restart(leader).await?;
    cluster.wait_converged().await?;
    // Start the next round from a settled cluster: every node has applied the same log.
    wait_until(
        "every node to apply the same log",
        Duration::from_secs(30),
        millis(50),
        || async {
            let mut applied = Vec::new();
            for i in 0..cluster.len() {
                applied.push(cluster.status(i).await?["last_applied"].as_u64());
            }
            Ok((applied.iter().all(|a| a.is_some() && *a == applied[0])).then_some(()))
        },
    )
    .await?;
    Ok(failover.as_secs_f64() * 1000.0)
}

/// Writes `report` as pretty JSON to `path`, creating its directory.
fn write_report(path: &str, report: &Value) -> Result<()> {
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("write {path}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut quick = false;
    let mut out: Option<String> = None;
    let mut which: Option<String> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(it.next().context("--out needs a file")?),
            "cluster" | "compute" | "network" | "all" if which.is_none() => which = Some(a),
            _ => anyhow::bail!(
                "unknown argument {a:?}; usage: keel-bench [cluster|compute|network|all] [--out FILE] [--quick]"
            ),
        }
    }
    let which = which.unwrap_or_else(|| "cluster".into());
    if which == "all" && out.is_some() {
        anyhow::bail!(
            "--out names the file of one benchmark: use it with cluster, compute or network"
        );
    }
    if which == "cluster" || which == "all" {
        let path = out
            .clone()
            .unwrap_or_else(|| "target/bench/cluster.json".into());
        cluster_bench(quick, &path).await?;
    }
    if which == "compute" || which == "all" {
        let path = out
            .clone()
            .unwrap_or_else(|| "target/bench/compute.json".into());
        compute::run(quick, &path).await?;
    }
    if which == "network" || which == "all" {
        let path = out.unwrap_or_else(|| "target/bench/network.json".into());
        network::run(quick, &path).await?;
    }
    Ok(())
}

/// The cluster benchmark (see the header).
async fn cluster_bench(quick: bool, out_path: &str) -> Result<()> {
    let (seq_n, conc_n, conc, rounds) = if quick {
        (50, 200, 16, 2)
    } else {
        (300, 2000, 16, 5)
    };

    eprintln!("keel-bench: forming a 3-node cluster in network namespaces");
    let cluster = TestCluster::form(3).await?;
    let leader = cluster.leader().await?;
    let follower = (leader + 1) % 3;

    // Idle RSS first, after the cluster has settled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut rss = Vec::new();
    for i in 0..3 {
        if let Some(pid) = cluster.pid(i).await {
            rss.push(rss_kib(pid).unwrap_or(0));
        }
    }

    let mut rows: Vec<(String, Stats)> = Vec::new();
    for (name, host) in [("api → follower", follower), ("api → leader", leader)] {
        rows.push((
            format!("{name}, sequential"),
            api_writes(&cluster, host, seq_n, 1).await?,
        ));
        rows.push((
            format!("{name}, {conc} concurrent"),
            api_writes(&cluster, host, conc_n, conc).await?,
        ));
    }
    rows.push((
        "raft on leader, sequential".into(),
        raft_writes(&cluster, leader, seq_n, 1).await?,
    ));
    rows.push((
        format!("raft on leader, {conc} concurrent"),
        raft_writes(&cluster, leader, conc_n, conc).await?,
    ));

    let mut failovers = Vec::new();
    for round in 0..rounds {
        let ms = failover_once(&cluster)
            .await
            .with_context(|| format!("failover round {round}"))?;
        eprintln!("keel-bench: failover round {round}: {ms:.0} ms");
        failovers.push(ms);
    }
    let mut sorted = failovers.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let failover_median = sorted[sorted.len() / 2];

    println!(
        "\nKeel cluster benchmark (3 nodes in network namespaces, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>10} {:>6}",
        "write path", "writes", "p50 ms", "p99 ms", "writes/s", "errors"
    );
    for (name, s) in &rows {
        println!(
            "{:<34} {:>7} {:>9.2} {:>9.2} {:>10.0} {:>6}",
            name, s.n, s.p50_ms, s.p99_ms, s.throughput, s.errors
        );
    }
    println!(
        "\nleader failover (kill -9 → write accepted), median of {}: {:.0} ms  (rounds: {})",
        failovers.len(),
        failover_median,
        failovers
            .iter()
            .map(|f| format!("{f:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rss_mib: Vec<f64> = rss.iter().map(|k| *k as f64 / 1024.0).collect();
    println!(
        "node service RSS idle: {} MiB",
        rss_mib
            .iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    let report = json!({
        "bench": "cluster",
        "nodes": 3,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "writes": rows.iter().map(|(n, s)| (n.clone(), stats_json(s))).collect::<serde_json::Map<_, _>>(),
        "failover_ms": {"median": failover_median, "rounds": failovers},
        "rss_idle_mib": rss_mib,
    });
    write_report(out_path, &report)?;
    println!("\nwrote {out_path}");
    Ok(())
}
