//! The joining side of `keel cluster join`: reach a member named in the token over HTTPS,
//! pinning the cluster CA by the token's fingerprint, and send the join request.

use std::time::Duration;

use keel_cluster::db::{JoinReply, JoinRequestDraft};
use keel_cluster::token::JoinTokenBody;
use keel_cluster::{error_chain, tls};

use crate::api::types::{ErrorBody, JoinApiReply, JoinApiRequest};
use crate::api::ApiError;

pub async fn request_join(
    token: &JoinTokenBody,
    draft: JoinRequestDraft,
) -> Result<JoinReply, ApiError> {
    let tls = tls::pinned_client_config(&token.ca_fingerprint)
        .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
    let body = JoinApiRequest {
        token_id: token.id.clone(),
        secret_sha256: token.secret_sha256(),
        csr_pem: draft.csr_pem,
        name: draft.host.name,
        peer_addr: draft.host.peer_addr,
        api_addr: draft.host.api_addr,
        witness: draft.host.witness,
    };
    let mut failures = Vec::new();
    for addr in &token.addrs {
        let url = format!("https://{addr}/api/v1/join");
        match client.post(&url).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => {
                let reply: JoinApiReply = resp.json().await.map_err(|e| {
                    ApiError::bad_request(format!("{addr} sent a malformed join reply: {e}"))
                })?;
                return Ok(JoinReply {
                    node_id: reply.node_id,
                    cluster_id: reply.cluster_id,
                    cert_pem: reply.cert_pem,
                    ca_pem: reply.ca_pem,
                });
            }
            Ok(resp) => {
                let status = resp.status();
                let message = resp
                    .json::<ErrorBody>()
                    .await
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| status.to_string());
                // The cluster answered: its verdict stands, other addresses would agree.
                return Err(ApiError::new(
                    status,
                    "join_refused",
                    format!("the cluster refused the join: {message}"),
                ));
            }
            Err(e) => failures.push(format!("{addr}: {}", error_chain(&e))),
        }
    }
    Err(ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "cluster_unreachable",
        format!(
            "no cluster member named in the token could be reached or verified ({}). Check the network path and that the token is for this cluster",
            failures.join("; ")
        ),
    ))
}
