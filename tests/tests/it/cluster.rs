//! `TestCluster` itself: how it fails when the node cannot start, and a three-node cluster
//! formed with the real `keel` binary.

use keel_client::paths;
use keel_tests::cluster::{ClusterOptions, TestCluster};

#[tokio::test]
async fn a_node_that_cannot_start_fails_fast_with_its_log() {
    keel_tests::skip_unless_root!();
    let opts = ClusterOptions {
        keel_bin: Some("/nonexistent/keel".into()),
        keep_dir_on_failure: false,
        ..ClusterOptions::default()
    };
    let t = std::time::Instant::now();
    let err = TestCluster::start_with(1, opts).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "{msg}");
    assert!(
        msg.contains("gave up") && msg.contains("node1 exited"),
        "{msg}"
    );
    // The log tail names the real cause (`ip netns exec` could not run the binary).
    assert!(msg.contains("/nonexistent/keel"), "{msg}");
}

/// Needs a working `keel` (`cargo build -p keel-cli`; scripts/test builds it first).
#[tokio::test]
async fn three_nodes_form_one_cluster() -> anyhow::Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    use keel_tests::wait::{millis, secs, wait_until};
    let c = TestCluster::form(3).await?;
    let init = c.init_output().expect("form ran init");
    let leader = c.leader().await?;
    // Joiners start as learners; the leader promotes them to voters (3 by default).
    wait_until("three voters", secs(30), millis(200), || async {
        let s = c.status(leader).await?;
        let voters = s["voters"].as_array().map(Vec::len).unwrap_or(0);
        if voters == 3 {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("status: {s}"))
        }
    })
    .await?;
    for i in 0..3 {
        let api = c.api(i)?;
        api.healthz().await?;
        let cluster = api.get(paths::CLUSTER).await?;
        assert!(cluster.to_string().contains(&init.cluster_id), "{cluster}");
    }
    let nodes = c.nodes(0).await?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "{nodes}");

    // `keel node list | head`: a reader that is gone before the output is written is
    // not an error (and no panic), in both output formats.
    for format in ["table", "json"] {
        let (read_end, write_end) = nix::unistd::pipe()?;
        drop(read_end);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &c.net().ns(0)])
            .arg(c.keel_bin())
            .arg("--socket")
            .arg(c.socket(0))
            .args(["node", "list", "--output", format])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(write_end))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "keel node list --output {format} into a closed pipe: {}: {stderr}",
            out.status
        );
    }
    Ok(())
}

/// The stand-in `keel` (tests/fixtures/fake-keel.py), written out as an executable.
fn fake_keel(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-keel");
    let script = include_str!("../../fixtures/fake-keel.py").replacen(
        "#!/usr/bin/env python3",
        &format!("#!{}", super::python().display()),
        1,
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A CA that did not sign anything the cluster serves.
fn foreign_ca(dir: &std::path::Path) -> String {
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=foreign", "-keyout"])
        .arg(dir.join("foreign.key"))
        .arg("-out")
        .arg(dir.join("foreign.pem"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    std::fs::read_to_string(dir.join("foreign.pem")).unwrap()
}

/// TestCluster end to end against the stand-in node: forming, CLI JSON, the CA-only HTTPS
/// client, kill/restart, partitions seen through `leader_among`, graceful stop.
#[tokio::test]
async fn test_cluster_drives_a_stand_in_node() -> anyhow::Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    use keel_tests::netns::Endpoint;
    use keel_tests::wait::{millis, secs, wait_until};
    use keel_tests::{ApiClient, StopOutcome};
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl is not installed (scripts/install-deps installs it)");
        return Ok(());
    }
    let bin = tempfile::tempdir()?;
    let opts = ClusterOptions {
        keel_bin: Some(fake_keel(bin.path())),
        witness: vec![2],
        ..ClusterOptions::default()
    };
    let c = TestCluster::form_with(3, opts).await?;
    let init = c.init_output().expect("form ran init");
    assert_eq!(init.ca_fingerprint.len(), 64);
    assert!(init.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        (c.node_id(0), c.node_id(1), c.node_id(2)),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(c.index_of(3), Some(2));
    assert_eq!(c.leader().await?, 0);
    let nodes = c.nodes(1).await?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "{nodes}");
    assert_eq!(nodes[2]["witness"], true, "{nodes}");

    // HTTPS: every node's certificate chains to the cluster CA and names its IP.
    for i in 0..3 {
        let api = c.api(i)?;
        api.healthz().await?;
        let cluster = api.get(paths::CLUSTER).await?;
        assert_eq!(
            cluster["cluster_id"].as_str(),
            Some(init.cluster_id.as_str())
        );
        assert_eq!(api.anonymous().status_of(paths::CLUSTER).await?, 401);
    }
    // A client that trusts another CA refuses the node.
    let stranger = ApiClient::new(c.api_addr(0), &foreign_ca(bin.path()), None)?;
    let err = stranger.healthz().await.unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );

    // A CLI error: non-zero exit, one line on stderr.
    let out = c.cli_raw(0, &["cluster", "init"]).await?;
    assert!(!out.success());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    // Crash and restart a follower: it comes back from its data dir.
    let pid = c.pid(1).await.unwrap();
    c.kill(1).await?;
    assert!(!c.is_running(1).await);
    assert!(keel_tests::process::process_reaped(pid));
    assert!(!c.cli_raw(1, &["cluster", "status"]).await?.success());
    c.restart(1).await?;
    c.wait_converged().await?;
    c.api(1)?.healthz().await?;

    // Partition the witness away: it loses its leader; the majority side keeps one.
    c.net().partition(&[2])?;
    wait_until(
        "node3 to lose its leader",
        secs(10),
        millis(100),
        || async {
            let s = c.status(2).await?;
            Ok(s["leader_id"].is_null().then_some(()))
        },
    )
    .await?;
    assert_eq!(c.leader_among(&[0, 1]).await?, 0);
    assert!(!c
        .net()
        .can_connect(Endpoint::Test, c.api_addr(2), millis(300)));
    c.net().heal()?;
    c.wait_converged().await?;

    assert!(matches!(c.stop(0).await?, StopOutcome::Exited(_)));
    assert!(!c.is_running(0).await);
    Ok(())
}
