//! The harness's own plumbing, proven with stand-in processes (no `keel` needed):
//! three namespace hosts, a stand-in TCP server in each, reachability both ways,
//! partitions, heal, one-way blocks, kill/stop/restart, and cleanup.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use keel_tests::netns::Endpoint::{self, Host, Test};
use keel_tests::process::{group_members, process_alive, process_reaped, tail_file};
use keel_tests::wait::{millis, secs, wait_until};
use keel_tests::{NetError, StopOutcome, TestNet};

use super::{stand_in, STAND_IN_PORT};

const YES: Duration = Duration::from_millis(1500);
const NO: Duration = Duration::from_millis(300);

fn server(net: &TestNet, i: usize) -> SocketAddr {
    (net.ip(i), STAND_IN_PORT).into()
}

/// Connects and reads the stand-in's greeting (its name).
fn greeting(net: &TestNet, from: Endpoint, to: SocketAddr, timeout: Duration) -> Option<String> {
    let mut s = net.connect(from, to, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.trim().to_string())
}

fn name(i: usize) -> String {
    format!("standin{}", i + 1)
}

/// Every host and the test process reach every (other) host, and every host reaches the
/// test process; `Err` names the first pair that does not.
fn full_mesh(net: &TestNet, gateway: SocketAddr) -> Result<()> {
    let mut from = vec![Test];
    from.extend((0..net.len()).map(Host));
    for &a in &from {
        for b in 0..net.len() {
            if a == Host(b) {
                continue;
            }
            let got = greeting(net, a, server(net, b), YES);
            if got != Some(name(b)) {
                return Err(anyhow!("{a:?} -> host {b}: {got:?}"));
            }
        }
        if a != Test && !net.can_connect(a, gateway, YES) {
            return Err(anyhow!("{a:?} -> test process {gateway}: no connection"));
        }
    }
    Ok(())
}

async fn wait_full_mesh(net: &TestNet, gateway: SocketAddr) {
    wait_until(
        "every host and the test process to reach each other",
        secs(15),
        millis(100),
        || async { full_mesh(net, gateway).map(Some) },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn three_hosts_reach_each_other_and_partitions_cut_both_ways() {
    keel_tests::skip_unless_root!();
    let net = TestNet::new(3).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let _servers: Vec<_> = (0..3)
        .map(|i| stand_in(&net, i, logs.path(), false, false))
        .collect();
    // Something of the test process's own that hosts can connect to.
    let listener = TcpListener::bind((net.gateway(), 0)).unwrap();
    let gw = listener.local_addr().unwrap();

    wait_full_mesh(&net, gw).await;
    assert_eq!(net.ip(0).octets(), [10, 213, net.subnet(), 1]);
    assert_eq!(net.gateway().octets(), [10, 213, net.subnet(), 254]);

    // Host 3 alone: unreachable both ways, from hosts and from the test process.
    net.partition(&[2]).unwrap();
    assert_eq!(greeting(&net, Host(0), server(&net, 1), YES), Some(name(1)));
    assert_eq!(greeting(&net, Host(1), server(&net, 0), YES), Some(name(0)));
    assert_eq!(greeting(&net, Test, server(&net, 0), YES), Some(name(0)));
    assert!(net.can_connect(Host(0), gw, YES));
    for (from, to) in [(Host(0), 2), (Host(1), 2), (Test, 2)] {
        assert!(
            !net.can_connect(from, server(&net, to), NO),
            "{from:?} reached host {to}"
        );
    }
    for to in [0, 1] {
        assert!(
            !net.can_connect(Host(2), server(&net, to), NO),
            "host 2 reached host {to}"
        );
    }
    assert!(
        !net.can_connect(Host(2), gw, NO),
        "host 2 reached the test process"
    );
    // Inside the island, host 3 still reaches itself.
    assert_eq!(greeting(&net, Host(2), server(&net, 2), YES), Some(name(2)));

    net.heal().unwrap();
    let t = Instant::now();
    wait_full_mesh(&net, gw).await;
    eprintln!("full mesh back {:?} after heal", t.elapsed());

    // A group of two: its members see each other, nothing else.
    net.partition(&[1, 2]).unwrap();
    assert_eq!(greeting(&net, Host(1), server(&net, 2), YES), Some(name(2)));
    assert_eq!(greeting(&net, Host(2), server(&net, 1), YES), Some(name(1)));
    assert_eq!(greeting(&net, Test, server(&net, 0), YES), Some(name(0)));
    for (from, to) in [
        (Host(0), 1),
        (Host(0), 2),
        (Host(1), 0),
        (Host(2), 0),
        (Test, 1),
        (Test, 2),
    ] {
        assert!(
            !net.can_connect(from, server(&net, to), NO),
            "{from:?} reached host {to}"
        );
    }
    // A second island: host 1 is now cut off from the test process too.
    net.partition(&[0]).unwrap();
    assert!(!net.can_connect(Test, server(&net, 0), NO));
    assert_eq!(greeting(&net, Host(1), server(&net, 2), YES), Some(name(2)));
    // Moving host 2 out of {1, 2} onto its own island leaves host 1 alone.
    net.partition(&[1]).unwrap();
    assert!(!net.can_connect(Host(2), server(&net, 1), NO));
    net.heal().unwrap();
    wait_full_mesh(&net, gw).await;
}

#[tokio::test]
async fn block_drops_one_direction_only() {
    keel_tests::skip_unless_root!();
    let net = TestNet::new(2).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let _servers: Vec<_> = (0..2)
        .map(|i| stand_in(&net, i, logs.path(), false, false))
        .collect();
    let gw = TcpListener::bind((net.gateway(), 0)).unwrap();
    wait_full_mesh(&net, gw.local_addr().unwrap()).await;

    let sock = |i: usize| {
        let port = 9000 + i as u16;
        let s = net
            .in_host(i, || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(NO)).unwrap();
        s
    };
    let (s0, s1) = (sock(0), sock(1));
    let to0: SocketAddr = (net.ip(0), 9000).into();
    let to1: SocketAddr = (net.ip(1), 9001).into();
    let mut buf = [0u8; 16];

    net.block(0, 1).unwrap();
    // 1 -> 0 still flows.
    s1.send_to(b"up", to0).unwrap();
    let (n, from) = s0.recv_from(&mut buf).expect("1 -> 0 must still arrive");
    assert_eq!((&buf[..n], from), (&b"up"[..], to1));
    // 0 -> 1 is dropped.
    s0.send_to(b"down", to1).unwrap();
    assert!(
        s1.recv_from(&mut buf).is_err(),
        "0 -> 1 arrived despite the block"
    );
    // TCP needs both directions: fails either way.
    assert!(!net.can_connect(Host(0), server(&net, 1), NO));
    assert!(!net.can_connect(Host(1), server(&net, 0), NO));
    // Others are untouched.
    assert!(net.can_connect(Test, server(&net, 1), YES));

    net.heal().unwrap();
    s0.send_to(b"down", to1).unwrap();
    let (n, _) = s1.recv_from(&mut buf).expect("0 -> 1 after heal");
    assert_eq!(&buf[..n], b"down");
}

#[tokio::test]
async fn kill_reaps_the_process_and_what_it_forked_then_restart_runs_it_again() {
    keel_tests::skip_unless_root!();
    let net = TestNet::new(1).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut p = stand_in(&net, 0, logs.path(), true, false);
    let pid = p.pid().unwrap();
    let child: u32 = wait_until(
        "the stand-in to print its child's pid",
        secs(10),
        millis(20),
        || async {
            let out = std::fs::read_to_string(p.stdout_log())?;
            Ok(out
                .lines()
                .find_map(|l| l.strip_prefix("child=")?.parse().ok()))
        },
    )
    .await
    .unwrap();
    wait_until("the stand-in to answer", secs(10), millis(20), || async {
        Ok(net.can_connect(Test, server(&net, 0), YES).then_some(()))
    })
    .await
    .unwrap();
    assert!(process_alive(pid) && process_alive(child));
    assert_eq!(group_members(pid).len(), 2, "{:?}", group_members(pid));
    assert_eq!(net.pids(0).unwrap().len(), 2);

    let t = Instant::now();
    p.kill().await.unwrap();
    eprintln!(
        "kill -9 and reap of parent and orphaned child took {:?}",
        t.elapsed()
    );
    // Reaped means gone from /proc altogether, not a zombie.
    assert!(process_reaped(pid), "parent {pid} still in /proc");
    assert!(process_reaped(child), "child {child} still in /proc");
    assert!(group_members(pid).is_empty());
    assert!(net.pids(0).unwrap().is_empty());
    assert!(!p.is_running());
    assert_eq!(p.pid(), None);
    // The port is free at once: refused, not timing out.
    let err = net.connect(Test, server(&net, 0), YES).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    p.start().unwrap();
    let pid2 = p.pid().unwrap();
    assert_ne!(pid, pid2);
    wait_until(
        "the restarted stand-in to answer",
        secs(10),
        millis(20),
        || async { Ok(greeting(&net, Test, server(&net, 0), YES).filter(|g| g == "standin1")) },
    )
    .await
    .unwrap();
    p.restart().await.unwrap();
    assert!(process_reaped(pid2));
    assert_eq!(p.starts(), 3);
    let log = std::fs::read_to_string(p.stdout_log()).unwrap();
    assert_eq!(log.matches("==== keel-tests: start #").count(), 3, "{log}");
    assert!(tail_file(&p.stdout_log(), 5).contains("start #3"));
}

#[tokio::test]
async fn stop_is_graceful_and_escalates_to_kill() {
    keel_tests::skip_unless_root!();
    use std::os::unix::process::ExitStatusExt;
    let net = TestNet::new(2).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut polite = stand_in(&net, 0, logs.path(), false, false);
    let mut stubborn = stand_in(&net, 1, logs.path(), false, true);
    for i in 0..2 {
        wait_until(
            format!("stand-in {i} to answer"),
            secs(10),
            millis(20),
            || async { Ok(net.can_connect(Test, server(&net, i), YES).then_some(())) },
        )
        .await
        .unwrap();
    }
    let pid = polite.pid().unwrap();
    match polite.stop(secs(5)).await.unwrap() {
        StopOutcome::Exited(Some(status)) => assert_eq!(status.signal(), Some(15)),
        other => panic!("SIGTERM should end the stand-in: {other:?}"),
    }
    assert!(process_reaped(pid));

    let pid = stubborn.pid().unwrap();
    let t = Instant::now();
    assert_eq!(
        stubborn.stop(millis(500)).await.unwrap(),
        StopOutcome::Killed
    );
    assert!(t.elapsed() >= millis(500));
    assert!(process_reaped(pid));
    // Stopping something stopped is a no-op.
    assert!(matches!(
        stubborn.stop(secs(1)).await.unwrap(),
        StopOutcome::Exited(_)
    ));
}

/// Everything named after `run` on this machine, for leak checks.
fn leftovers(run: &str, marker: &std::path::Path) -> Vec<String> {
    let mut left = Vec::new();
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let tables = std::process::Command::new("nft")
        .args(["list", "tables", "bridge"])
        .output()
        .unwrap();
    for out in [netns, links, tables] {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains(run) {
                left.push(line.to_string());
            }
        }
    }
    if marker.exists() {
        left.push(marker.display().to_string());
    }
    left
}

#[test]
fn drop_cleans_up_everything_even_when_the_test_panics() {
    keel_tests::skip_unless_root!();
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let net = TestNet::new(2).unwrap();
        net.partition(&[1]).unwrap();
        // A process nobody manages keeps a namespace alive unless cleanup kills it.
        let stray = net.command(0, "sleep").arg("600").spawn().unwrap();
        tx.send((
            net.run_id().to_string(),
            net.marker_path().to_path_buf(),
            stray.id(),
        ))
        .unwrap();
        std::mem::forget(stray);
        assert!(!leftovers(net.run_id(), net.marker_path()).is_empty());
        panic!("deliberate panic: TestNet must still clean up");
    })
    .join();
    assert!(joined.is_err());
    let (run, marker, stray) = rx.recv().unwrap();
    assert_eq!(leftovers(&run, &marker), Vec::<String>::new());
    assert!(
        !process_alive(stray),
        "the stray process in the namespace survived"
    );
}

#[test]
fn cleanup_stale_removes_networks_of_dead_runs() {
    keel_tests::skip_unless_root!();
    let net = TestNet::new(2).unwrap();
    net.partition(&[0]).unwrap();
    let marker = net.marker_path().to_path_buf();
    let run = net.leak_as_dead_for_test();
    assert!(
        leftovers(&run, &marker).len() >= 6,
        "{:?}",
        leftovers(&run, &marker)
    );
    // Another test's TestNet::new may have cleaned it already; either way it must go.
    TestNet::cleanup_stale().unwrap();
    assert_eq!(leftovers(&run, &marker), Vec::<String>::new());
}

#[test]
fn live_networks_are_distinct_and_not_stale() {
    keel_tests::skip_unless_root!();
    let a = TestNet::new(1).unwrap();
    let b = TestNet::new(1).unwrap();
    assert_ne!(a.subnet(), b.subnet());
    assert_ne!(a.run_id(), b.run_id());
    let cleaned = TestNet::cleanup_stale().unwrap();
    assert!(!cleaned.iter().any(|r| r == a.run_id() || r == b.run_id()));
    assert!(a.marker_path().exists() && b.marker_path().exists());
    assert!(a.bridge().len() <= 15 && a.veth(0).len() <= 15 && a.ns(0).len() <= 15);
    assert!(matches!(
        a.pids(5),
        Err(NetError::NoSuchHost { index: 5, hosts: 1 })
    ));
}

#[tokio::test]
async fn delay_needs_netem_and_throttle_installs_tbf() {
    keel_tests::skip_unless_root!();
    let net = TestNet::new(2).unwrap();
    if net.netem_supported() {
        let logs = tempfile::tempdir().unwrap();
        let _s = stand_in(&net, 1, logs.path(), false, false);
        wait_until("stand-in to answer", secs(10), millis(20), || async {
            Ok(net.can_connect(Host(0), server(&net, 1), YES).then_some(()))
        })
        .await
        .unwrap();
        net.delay(0, 200).unwrap();
        let t = Instant::now();
        assert!(net.can_connect(Host(0), server(&net, 1), secs(3)));
        assert!(t.elapsed() >= millis(200), "{:?}", t.elapsed());
        net.delay(0, 0).unwrap();
    } else {
        eprintln!("this kernel has no sch_netem: delay() must say so");
        match net.delay(0, 100) {
            Err(NetError::NetemUnavailable(msg)) => assert!(msg.contains("unknown"), "{msg}"),
            other => panic!("expected NetemUnavailable, got {other:?}"),
        }
    }
    net.throttle(1, 1000).unwrap();
    let q = net
        .exec(1, "tc", &["qdisc", "show", "dev", "eth0"])
        .unwrap();
    assert!(q.contains("tbf") && q.contains("rate 1Mbit"), "{q}");
    net.clear_qdisc(1).unwrap();
    net.clear_qdisc(1).unwrap();
    let q = net
        .exec(1, "tc", &["qdisc", "show", "dev", "eth0"])
        .unwrap();
    assert!(!q.contains("tbf"), "{q}");
}
