//! Disk full on a follower: its data dir is a 96 MiB tmpfs, filled to the last byte while
//! the cluster keeps committing through the other two nodes. The follower's raft fails on
//! append (nothing it acknowledged is lost), the node waits for free space, and once the
//! filler is deleted it re-executes itself and catches up with every setting.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::process::tail_file;
use keel_tests::wait::{millis, secs, wait_until};

use super::{settings, wait_voters};

/// Unmounts (lazily) on drop, also when the test panics; then removes what the cluster's
/// own cleanup could not (it stops at the mount point).
#[derive(Default)]
struct MountGuard(Option<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&p)
                .status();
            // The cluster's temp dir: when its own cleanup ran (the test passed), only
            // what it could not remove is left, all under this host's dir; when it was
            // kept (the test failed), other hosts' dirs are there too: keep it all.
            let (Some(host), Some(root)) = (p.parent(), p.parent().and_then(Path::parent)) else {
                return;
            };
            let only_this_host = std::fs::read_dir(root)
                .map(|d| d.filter_map(Result::ok).all(|e| e.path() == host))
                .unwrap_or(false);
            if only_this_host {
                let _ = std::fs::remove_dir_all(root);
            }
        }
    }
}

fn mount_tmpfs(path: &std::path::Path, size: &str) -> Result<()> {
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "keel-test-full",
        ])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!(
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes a file until the file system is full; returns its size.
fn fill(path: &std::path::Path) -> Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512, 1] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

#[tokio::test]
async fn a_follower_with_a_full_disk_recovers_when_space_returns() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let mut mount = MountGuard::default();
    let c = TestCluster::start_with(3, Default::default()).await?;
    let f = 2;
    // Give node3 a small file system of its own before it holds anything.
    c.kill(f).await?;
    let data = c.data_dir(f).to_path_buf();
    mount_tmpfs(&data, "96m")?;
    mount.0 = Some(data.clone());
    c.start_host(f).await?;
    c.init(0).await?;
    for i in 1..3 {
        let t = c.token(0).await?;
        c.join(i, &t.token).await?;
    }
    c.wait_converged().await?;
    wait_voters(&c, 3, secs(30)).await?;
    let leader = c.leader().await?;
    assert_ne!(leader, f, "node1 initialised the cluster and should lead");
    let api = c.api(leader)?;
    api.put_setting("full.00", "before").await?;

    let filler = data.join("filler");
    let filled = fill(&filler)?;
    eprintln!("filled {} with {filled} bytes", data.display());

    // Write until node3's raft fails on a full disk; every write commits meanwhile.
    let log = c.host_dir(f).join(format!("{}.stderr.log", c.name(f)));
    let value = "x".repeat(60 * 1024);
    let mut n = 1;
    loop {
        api.put_setting(&format!("full.{n:02}"), &value).await?;
        n += 1;
        if std::fs::read_to_string(&log)?.contains("raft stopped on a storage failure") {
            break;
        }
        if n > 300 {
            bail!(
                "node3's raft did not fail after {n} writes of 60 KiB on a full disk; log:\n{}",
                tail_file(&log, 30)
            );
        }
    }
    eprintln!("node3's raft failed after {n} writes");
    // A few more while node3 is out.
    for m in n..n + 5 {
        api.put_setting(&format!("full.{m:02}"), "while-out")
            .await?;
    }

    std::fs::remove_file(&filler)?;
    wait_until("node3 to restart itself", secs(30), millis(250), || async {
        let text = std::fs::read_to_string(&log)?;
        Ok(text.contains("restarting the node service").then_some(()))
    })
    .await?;
    c.wait_converged().await?;
    let want = settings(&c, leader).await?;
    assert_eq!(want.len(), n + 5, "settings on the leader");
    wait_until(
        "node3 to hold every setting",
        secs(60),
        millis(500),
        || async {
            let got = settings(&c, f).await?;
            if got == want {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "node3 holds {} of {} settings",
                    got.len(),
                    want.len()
                ))
            }
        },
    )
    .await?;
    Ok(())
}
