//! Every node killed with -9 and started again: every committed entry is still there, on
//! every node.

use anyhow::{anyhow, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};

use super::{settings, wait_voters};

#[tokio::test]
async fn restarting_every_node_keeps_every_committed_entry() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::form(3).await?;
    wait_voters(&c, 3, secs(30)).await?;
    let mut want = Vec::new();
    for n in 0..30 {
        // Through every node in turn: leader and forwarded writes alike.
        let (key, value) = (format!("d.{n:02}"), format!("value-{n}"));
        c.api(n % 3)?.put_setting(&key, &value).await?;
        want.push((key, value));
    }
    want.sort();

    for i in 0..3 {
        c.kill(i).await?;
    }
    for i in 0..3 {
        c.start_host(i).await?;
    }
    c.wait_converged().await?;
    wait_until(
        "every node to hold all 30 settings",
        secs(30),
        millis(250),
        || async {
            for i in 0..3 {
                let got = settings(&c, i).await?;
                if got != want {
                    return Err(anyhow!("{}: {} settings: {got:?}", c.name(i), got.len()));
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(())
}
