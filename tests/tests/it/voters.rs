//! Voter policy as the cluster grows to six nodes: 3 voters with 3-4 members, 5 at 5, the
//! sixth a learner; a voter killed with -9 is replaced by that learner once it has been
//! down for `voter_replace_after_ms` (short duties, see [`super::FAST_DUTIES`]).

use anyhow::{anyhow, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};

use super::{cli_quiet, host_named, put_setting_settled, roles, wait_setting, FAST_DUTIES};

#[tokio::test]
async fn voters_grow_to_five_and_a_lost_voter_is_replaced_by_a_learner() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let (_config, opts) = super::with_config(FAST_DUTIES)?;
    let c = TestCluster::start_with(6, opts).await?;
    c.init(0).await?;
    // (members after the join, voters expected, learners expected)
    for (i, voters, learners) in [(1, 2, 0), (2, 3, 0), (3, 3, 1), (4, 5, 0), (5, 5, 1)] {
        let t = c.token(0).await?;
        c.join(i, &t.token).await?;
        let want_members = i + 1;
        wait_until(
            format!("{voters} voters and {learners} learners with {want_members} members"),
            secs(30),
            millis(200),
            || async {
                let (v, l) = roles(&c, 0).await?;
                if v.len() == voters && l.len() == learners {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("voters {v:?}, learners {l:?}"))
                }
            },
        )
        .await?;
    }
    c.wait_converged().await?;
    let leader = c.leader().await?;
    let (voters, learners) = roles(&c, leader).await?;
    let learner = learners[0];
    assert_eq!(c.index_of(learner), Some(5), "the 6th node is the learner");

    // The learner must be up (heartbeating) to be a candidate.
    wait_until("node6 up", secs(20), millis(200), || async {
        let nodes = cli_quiet(&c, leader, &["node", "list"]).await?;
        let h = host_named(&nodes, "node6")?;
        Ok((h["health"] == "up").then_some(()))
    })
    .await?;

    // Kill -9 a voter that is not the leader.
    let victim_id = *voters
        .iter()
        .find(|v| c.index_of(**v) != Some(leader))
        .expect("a non-leader voter");
    let victim = c.index_of(victim_id).expect("victim index");
    c.kill(victim).await?;
    let t0 = std::time::Instant::now();
    let (v, l) = wait_until(
        format!(
            "{} (node {victim_id}) replaced by node6 (node {learner}) and out of raft",
            c.name(victim)
        ),
        secs(40),
        millis(200),
        || async {
            // Two raft changes: the voters replaced, then the lost voter out of the
            // membership (it must not linger as a learner).
            let (v, l) = roles(&c, leader).await?;
            if v.len() == 5
                && v.contains(&learner)
                && !v.contains(&victim_id)
                && !l.contains(&victim_id)
            {
                Ok(Some((v, l)))
            } else {
                Err(anyhow!("voters {v:?}, learners {l:?}"))
            }
        },
    )
    .await?;
    eprintln!(
        "voter {victim_id} replaced after {:.1?}: voters {v:?}, learners {l:?}",
        t0.elapsed()
    );
    // The lost voter left the raft membership but stays listed as a host, down.
    let nodes = c.nodes(leader).await?;
    let lost = host_named(&nodes, c.name(victim))?;
    assert_eq!(lost["health"], "down", "{nodes}");
    assert_ne!(lost["role"], "voter", "{nodes}");
    assert_eq!(host_named(&nodes, "node6")?["role"], "voter", "{nodes}");

    // The new voter set commits.
    put_setting_settled(&c, 5, "voters.after-replacement", "ok").await?;
    wait_setting(&c, leader, "voters.after-replacement", "ok", secs(10)).await?;
    Ok(())
}
