//! `keel node remove`: a learner and then a voter leave the cluster; the voter duty keeps
//! three voters by promoting the remaining learner; an unknown node is a clear error that
//! changes nothing.

use anyhow::{anyhow, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::Value;

use super::{cli_quiet, roles, FAST_DUTIES};

async fn host_ids(c: &TestCluster, i: usize) -> Result<Vec<u64>> {
    let hosts = cli_quiet(c, i, &["node", "list"]).await?;
    Ok(hosts
        .as_array()
        .map(|a| a.iter().filter_map(|h| h["id"].as_u64()).collect())
        .unwrap_or_default())
}

#[tokio::test]
async fn removed_nodes_leave_and_three_voters_remain() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let (_config, opts) = super::with_config(FAST_DUTIES)?;
    let c = TestCluster::start_with(5, opts).await?;
    c.init(0).await?;
    for i in 1..5 {
        let t = c.token(0).await?;
        c.join(i, &t.token).await?;
    }
    c.wait_converged().await?;
    wait_until("five voters", secs(30), millis(200), || async {
        let (v, _) = roles(&c, 0).await?;
        Ok((v.len() == 5).then_some(()))
    })
    .await?;

    // An unknown node: one clear line, nothing removed.
    let out = c.cli_raw(0, &["node", "remove", "no-such-node"]).await?;
    assert!(!out.success());
    assert!(
        out.stderr.contains("no node named \"no-such-node\""),
        "{}",
        out.stderr
    );
    let out = c.cli_raw(0, &["node", "remove", "99"]).await?;
    assert!(!out.success());
    assert!(out.stderr.contains("host 99 is unknown"), "{}", out.stderr);
    assert_eq!(host_ids(&c, 0).await?.len(), 5);

    // Remove two non-leader voters by name and by id: 3 members remain, all voters.
    let leader = c.leader().await?;
    let others: Vec<usize> = (0..5).filter(|i| *i != leader).collect();
    let by_name = others[0];
    let by_id = others[1];
    cli_quiet(&c, leader, &["node", "remove", c.name(by_name)]).await?;
    let id = c
        .node_id(by_id)
        .ok_or_else(|| anyhow!("no id for host {by_id}"))?;
    cli_quiet(&c, leader, &["node", "remove", &id.to_string()]).await?;

    let gone = [c.node_id(by_name), c.node_id(by_id)];
    wait_until(
        "3 members, all voters, the removed ones gone",
        secs(30),
        millis(200),
        || async {
            let (v, l) = roles(&c, leader).await?;
            let hosts = host_ids(&c, leader).await?;
            let ok = v.len() == 3
                && l.is_empty()
                && hosts.len() == 3
                && gone
                    .iter()
                    .flatten()
                    .all(|g| !v.contains(g) && !hosts.contains(g));
            if ok {
                Ok(Some(()))
            } else {
                Err(anyhow!("voters {v:?}, learners {l:?}, hosts {hosts:?}"))
            }
        },
    )
    .await?;

    // The cluster still commits, through a remaining follower.
    let follower = (0..5)
        .find(|i| *i != leader && *i != by_name && *i != by_id)
        .ok_or_else(|| anyhow!("no follower left"))?;
    c.api(follower)?.put_setting("after.removal", "yes").await?;
    let v: Value = c.api(leader)?.get_setting("after.removal").await?;
    assert_eq!(v["value"], "yes");
    Ok(())
}
