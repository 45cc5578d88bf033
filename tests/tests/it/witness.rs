//! A two-server site with a witness: all three vote, the witness is marked as such, and
//! losing a server (the leader, when a server leads) leaves the cluster writable.

use anyhow::Result;
use keel_tests::cluster::{ClusterOptions, TestCluster};
use keel_tests::wait::secs;

use super::{host_named, put_setting_settled, wait_setting, wait_voters};

#[tokio::test]
async fn two_servers_and_a_witness_stay_writable_when_a_server_dies() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let opts = ClusterOptions {
        witness: vec![2],
        ..ClusterOptions::default()
    };
    let c = TestCluster::form_with(3, opts).await?;
    let voters = wait_voters(&c, 3, secs(30)).await?;
    assert_eq!(voters.len(), 3);
    let nodes = c.nodes(0).await?;
    for (i, witness) in [(0, false), (1, false), (2, true)] {
        let h = host_named(&nodes, c.name(i))?;
        assert_eq!(h["witness"], witness, "{nodes}");
        assert_eq!(h["role"], "voter", "{nodes}");
    }

    let leader = c.leader().await?;
    let victim = if leader == 2 { 0 } else { leader };
    let server = 1 - victim;
    c.kill(victim).await?;
    let new_leader = c.leader_among(&[server, 2]).await?;
    eprintln!(
        "killed {}, leader now {}",
        c.name(victim),
        c.name(new_leader)
    );
    put_setting_settled(&c, server, "witness.after-loss", "ok").await?;
    wait_setting(&c, 2, "witness.after-loss", "ok", secs(10)).await?;
    Ok(())
}
