//! The leader killed with -9: a new leader is elected, writes commit on the survivors,
//! the management duties run on the new leader only, the dead host turns suspect/down,
//! and after a restart it rejoins and catches up.

use anyhow::{anyhow, Result};
use keel_client::paths;
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};

use super::{cli_quiet, host_named, put_setting_settled, wait_setting, wait_voters, FAST_DUTIES};

/// Waits until `/healthz` reports `duties: true` on `on` and false on every other host in
/// `hosts`.
async fn wait_duties_only_on(c: &TestCluster, on: usize, hosts: &[usize]) -> Result<()> {
    wait_until(
        format!("duties on {} only", c.name(on)),
        secs(10),
        millis(100),
        || async {
            let mut seen = Vec::new();
            for &i in hosts {
                let h = c.api(i)?.get(paths::HEALTHZ).await?;
                seen.push((i, h["duties"] == true));
            }
            if seen.iter().all(|(i, d)| *d == (*i == on)) {
                Ok(Some(()))
            } else {
                Err(anyhow!("duties per host: {seen:?}"))
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn leader_kill_elects_a_new_leader_and_moves_the_duties() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let (_config, opts) = super::with_config(FAST_DUTIES)?;
    let c = TestCluster::form_with(3, opts).await?;
    wait_voters(&c, 3, secs(30)).await?;
    let old = c.leader().await?;
    wait_duties_only_on(&c, old, &[0, 1, 2]).await?;
    c.api(old)?.put_setting("failover.before", "1").await?;

    c.kill(old).await?;
    let killed_at = std::time::Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let new = c.leader_among(&survivors).await?;
    eprintln!(
        "new leader {} after {:.1?}",
        c.name(new),
        killed_at.elapsed()
    );
    assert_ne!(new, old);
    let follower = *survivors.iter().find(|i| **i != new).unwrap();
    // A write through the surviving follower (forwarded to the new leader).
    put_setting_settled(&c, follower, "failover.after", "2").await?;
    wait_duties_only_on(&c, new, &survivors).await?;

    // The dead host goes suspect, then down (leader duty, missed heartbeats).
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    wait_until(
        format!("{} down", c.name(old)),
        secs(20),
        millis(100),
        || async {
            let nodes = cli_quiet(&c, new, &["node", "list"]).await?;
            let health = host_named(&nodes, c.name(old))?["health"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut seen = seen.lock().unwrap();
            if seen.last() != Some(&health) {
                seen.push(health.clone());
            }
            Ok((health == "down").then_some(()))
        },
    )
    .await?;
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().any(|h| h == "suspect"),
        "health of the dead host went {seen:?}"
    );
    let nodes = c.nodes(follower).await?;
    assert_eq!(host_named(&nodes, c.name(old))?["health"], "down");
    assert_eq!(host_named(&nodes, c.name(new))?["leader"], true, "{nodes}");

    // Back from its data dir: it rejoins, sees the new writes, is up again, and does
    // not take the duties back unless it became leader.
    c.restart(old).await?;
    c.wait_converged().await?;
    wait_setting(&c, old, "failover.after", "2", secs(20)).await?;
    wait_setting(&c, old, "failover.before", "1", secs(5)).await?;
    wait_until(
        format!("{} up again", c.name(old)),
        secs(20),
        millis(200),
        || async {
            let nodes = cli_quiet(&c, new, &["node", "list"]).await?;
            Ok((host_named(&nodes, c.name(old))?["health"] == "up").then_some(()))
        },
    )
    .await?;
    let leader = c.leader().await?;
    wait_duties_only_on(&c, leader, &[0, 1, 2]).await?;
    Ok(())
}
