//! Three nodes formed with join tokens: three voters, every host up with its inventory,
//! an HTTPS API on every node that verifies against the cluster CA and demands the admin
//! token, metrics, and a write through a follower that every node reads back.

use anyhow::{anyhow, Result};
use keel_client::paths;
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};
use keel_tests::ApiClient;
use serde_json::Value;

use super::{cli_quiet, wait_setting, wait_voters};

/// GET `path` with `client`; returns the status and the JSON body.
async fn status_and_json(client: &ApiClient, path: &str) -> Result<(u16, Value)> {
    let resp = client.request(reqwest::Method::GET, path).send().await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    Ok((status, body))
}

#[tokio::test]
async fn three_nodes_formed_with_tokens_serve_an_authenticated_api() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::form(3).await?;
    let init = c.init_output().expect("form ran init");
    let voters = wait_voters(&c, 3, secs(30)).await?;
    let mut ids: Vec<u64> = (0..3).filter_map(|i| c.node_id(i)).collect();
    ids.sort_unstable();
    assert_eq!(voters, ids);

    // Every host `up`, a voter, with its inventory reported.
    wait_until(
        "every host up with inventory",
        secs(30),
        millis(250),
        || async {
            let nodes = cli_quiet(&c, 1, &["node", "list"]).await?;
            let hosts = nodes.as_array().cloned().unwrap_or_default();
            let ready = hosts.len() == 3
                && hosts.iter().all(|h| {
                    h["health"] == "up"
                        && h["role"] == "voter"
                        && h["inventory"]["cpus"].as_u64().unwrap_or(0) > 0
                });
            if ready {
                Ok(Some(()))
            } else {
                Err(anyhow!("{nodes}"))
            }
        },
    )
    .await?;

    let stranger_ca = keel_cluster::tls::generate_ca("stranger")?.cert_pem;
    for i in 0..3 {
        // The client trusts only the CA printed by init: success means the node's
        // certificate chains to it.
        let api = c.api(i)?;
        let cluster = api.get(paths::CLUSTER).await?;
        assert_eq!(cluster["cluster_id"], init.cluster_id.as_str(), "{cluster}");
        let ca = api.get_text(paths::CA_PEM).await?;
        assert_eq!(ca.trim(), init.ca_pem.trim(), "ca.pem of {}", c.name(i));
        // A client trusting another CA refuses the node.
        let stranger = ApiClient::new(c.api_addr(i), &stranger_ca, Some(init.admin_token.clone()))?;
        let err = stranger.healthz().await.expect_err("foreign CA accepted");
        assert!(
            format!("{err:#}").to_lowercase().contains("certificate"),
            "{err:#}"
        );

        // No token, a wrong token: 401 with a JSON error.
        for (what, client) in [
            ("no token", api.anonymous()),
            ("a wrong token", api.with_token("not-the-admin-token")),
        ] {
            let (status, body) = status_and_json(&client, paths::HOSTS).await?;
            assert_eq!(status, 401, "{what} on {}: {body}", c.name(i));
            assert!(
                body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                "{what}: {body}"
            );
        }
        // /healthz needs no token.
        let health = api.anonymous().get(paths::HEALTHZ).await?;
        assert_eq!(health["member"], true, "{health}");

        // (A follower learns the last promotion a moment after the leader.)
        wait_until(
            format!("keel_raft_voters 3 in /metrics of {}", c.name(i)),
            secs(5),
            millis(100),
            || async {
                let metrics = api.get_text(paths::METRICS).await?;
                if metrics.lines().any(|l| l.trim() == "keel_raft_voters 3") {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("{metrics}"))
                }
            },
        )
        .await?;
    }

    // A write through a follower is forwarded to the leader and read back everywhere.
    let leader = c.leader().await?;
    let follower = (leader + 1) % 3;
    c.api(follower)?
        .put_setting("formation.via-follower", "hello")
        .await?;
    for i in 0..3 {
        wait_setting(&c, i, "formation.via-follower", "hello", secs(10)).await?;
    }
    Ok(())
}
