//! A one-node minority partition: a write through the isolated node fails with
//! `no_quorum` after `raft.write_timeout_ms` and never becomes visible, while the
//! majority elects or keeps a leader and commits; after healing every node converges on
//! the same settings. Run twice: isolating a follower, and isolating the leader (whose
//! old leadership must not commit anything).

use keel_client::paths;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::json;

use super::{put_setting_settled, settings, socket_request, wait_voters};

const CONFIG: &str = "[raft]\nwrite_timeout_ms = 3000\n";

async fn minority_cannot_commit(isolate_leader: bool) -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let (_config, opts) = super::with_config(CONFIG)?;
    let c = TestCluster::form_with(3, opts).await?;
    wait_voters(&c, 3, secs(30)).await?;
    let leader = c.leader().await?;
    c.api(leader)?.put_setting("p.before", "1").await?;
    let isolated = if isolate_leader {
        leader
    } else {
        (leader + 1) % 3
    };
    let majority: Vec<usize> = (0..3).filter(|i| *i != isolated).collect();

    c.net().partition(&[isolated])?;
    // The test process cannot reach the island over the network either: the write goes
    // through the isolated node's admin socket (same handlers as the HTTPS API).
    let t = Instant::now();
    let (status, body) = socket_request(
        c.socket(isolated),
        "PUT",
        &paths::setting("p.minority"),
        Some(&json!({"value": "lost"})),
        Duration::from_secs(20),
    )
    .await?;
    let took = t.elapsed();
    eprintln!("minority write: {status} {body} after {took:.1?}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_quorum", "{body}");
    // The write fails at `write_timeout_ms`, neither before nor much after it (also when
    // the follower forwards to a leader it can no longer reach).
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
        "write_timeout_ms is 3000 but the write failed after {took:?}"
    );

    // The majority has (or elects) a leader and commits.
    let new_leader = c.leader_among(&majority).await?;
    if !isolate_leader {
        assert_eq!(
            new_leader, leader,
            "an isolated follower must not move the leader"
        );
    }
    let other = *majority.iter().find(|i| **i != new_leader).unwrap();
    put_setting_settled(&c, other, "p.majority", "2").await?;
    for &i in &majority {
        let status = c.api(i)?.status_of(&paths::setting("p.minority")).await?;
        assert_eq!(
            status,
            404,
            "the minority's write is visible on {}",
            c.name(i)
        );
    }

    c.net().heal()?;
    c.wait_converged().await?;
    let want = vec![
        ("p.before".to_string(), "1".to_string()),
        ("p.majority".to_string(), "2".to_string()),
    ];
    wait_until(
        "every node to hold exactly the committed settings",
        secs(30),
        millis(250),
        || async {
            let mut all = Vec::new();
            for i in 0..3 {
                all.push(settings(&c, i).await?);
            }
            if all.iter().all(|s| *s == want) {
                Ok(Some(()))
            } else {
                Err(anyhow!("settings per node: {all:?}"))
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_isolated_follower_cannot_commit_and_converges_after_healing() -> Result<()> {
    minority_cannot_commit(false).await
}

#[tokio::test]
async fn an_isolated_leader_cannot_commit_and_converges_after_healing() -> Result<()> {
    minority_cannot_commit(true).await
}
