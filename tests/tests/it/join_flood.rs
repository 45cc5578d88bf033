//! `/api/v1/join` is the one route a stranger on the network can reach. A flood of bad
//! join requests must leave the raft log as it was (only a valid, unconsumed token leads to
//! a write), be answered 429 past a per-source rate, and leave the API answering and the
//! cluster open to a real join from another address.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};
use serde_json::{json, Value};

/// The raft log length on `i`, once it has not moved for a second (the cluster settled).
async fn settled_log_index(c: &TestCluster, i: usize) -> Result<u64> {
    let last = std::cell::Cell::new(None);
    let index = wait_until("the raft log to settle", secs(30), millis(1000), || async {
        let index = c.status(i).await?["last_log_index"]
            .as_u64()
            .ok_or_else(|| anyhow!("no last_log_index"))?;
        let settled = last.replace(Some(index)) == Some(index);
        Ok(settled.then_some(index))
    })
    .await?;
    Ok(index)
}

fn join_body(token_id: &str, csr_pem: &str) -> Value {
    json!({
        "token_id": token_id,
        "secret_sha256": "00".repeat(32),
        "csr_pem": csr_pem,
        "name": "intruder",
        "peer_addr": "192.0.2.66:7400",
        "api_addr": "192.0.2.66:8443",
    })
}

#[tokio::test]
async fn ten_thousand_bad_join_requests_change_nothing() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::start(2).await?;
    c.init(0).await?;
    let real = c.token(0).await?;
    let (_key, csr) = keel_cluster::tls::generate_node_key()?;
    let api = c.api(0)?;
    let anonymous = api.anonymous();
    let before = settled_log_index(&c, 0).await?;

    // Below the rate: each bad request is refused with a clear error and no raft write.
    let cases: [(&str, Value, u16, &str); 4] = [
        (
            "unknown token",
            join_body("no-such-token", &csr),
            401,
            "unknown",
        ),
        (
            "wrong secret",
            join_body(&real.id, &csr),
            401,
            "does not match its secret",
        ),
        (
            "oversized CSR",
            join_body(&real.id, &"A".repeat(20 * 1024)),
            400,
            "more than the 16384",
        ),
        (
            "not a CSR",
            join_body(&real.id, "garbage"),
            400,
            "certificate signing request",
        ),
    ];
    for (what, body, status, says) in cases {
        let resp = anonymous
            .request(reqwest::Method::POST, keel_client::paths::JOIN)
            .json(&body)
            .send()
            .await?;
        let code = resp.status().as_u16();
        let text = resp.text().await?;
        assert!(
            code == status && text.contains(says),
            "{what}: {code} {text}"
        );
        tokio::time::sleep(Duration::from_millis(600)).await; // stay under the rate
    }
    assert_eq!(
        settled_log_index(&c, 0).await?,
        before,
        "a bad join wrote to raft"
    );

    // The flood: 10,000 requests, 32 at a time, malformed and well-formed alike.
    let sent = std::sync::atomic::AtomicU32::new(0);
    let mut by_status = std::collections::BTreeMap::<u16, u32>::new();
    let bodies: [Vec<u8>; 3] = [
        b"{not json".to_vec(),
        join_body(&real.id, &csr).to_string().into_bytes(),
        join_body("x", &csr).to_string().into_bytes(),
    ];
    let started = std::time::Instant::now();
    let results = futures::future::join_all((0..32).map(|_| {
        let (anonymous, sent, bodies) = (&anonymous, &sent, &bodies);
        async move {
            let mut codes = Vec::new();
            loop {
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= 10_000 {
                    return codes;
                }
                let body = bodies[n as usize % bodies.len()].clone();
                let code = anonymous
                    .request(reqwest::Method::POST, keel_client::paths::JOIN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                codes.push(code);
            }
        }
    }))
    .await;
    for code in results.into_iter().flatten() {
        *by_status.entry(code).or_default() += 1;
    }
    eprintln!(
        "10,000 bad join requests in {:.1?}: {by_status:?}",
        started.elapsed()
    );
    if by_status.keys().any(|code| *code == 0 || *code >= 500) {
        bail!("the flood got failures or server errors: {by_status:?}");
    }
    assert!(
        by_status.get(&429).copied().unwrap_or(0) > 9_000,
        "the flood was not rate limited: {by_status:?}"
    );

    // Nothing was written, the API answers, a 429 says what to do, and a real join from
    // another address still works.
    assert_eq!(
        settled_log_index(&c, 0).await?,
        before,
        "the flood wrote to raft"
    );
    api.healthz().await?;
    api.get(keel_client::paths::CLUSTER).await?;
    let resp = anonymous
        .request(reqwest::Method::POST, keel_client::paths::JOIN)
        .json(&join_body("x", &csr))
        .send()
        .await?;
    if resp.status().as_u16() == 429 {
        let text = resp.text().await?;
        assert!(text.contains("too many join requests from"), "{text}");
    }
    c.join(1, &real.token).await?;
    Ok(())
}
