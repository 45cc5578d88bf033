//! The joining side of `keel cluster join`: reach a member named in the token over HTTPS,
//! pinning the cluster CA by the token's fingerprint, and send the join request.

use std::time::Duration;

use keel_cluster::db::{JoinReply, JoinRequestDraft};
use keel_cluster::token::JoinTokenBody;
use keel_cluster::{error_chain, tls};

use keel_api_types::{ErrorBody, JoinApiReply, JoinApiRequest};

/// Why a join request got no certificate.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token's CA fingerprint cannot be pinned.
    #[error(transparent)]
    Pin(tls::TlsError),
    #[error(transparent)]
    Client(reqwest::Error),
    #[error("{addr} sent a malformed join reply")]
    MalformedReply {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    /// The cluster answered: its verdict stands, other addresses would agree.
    #[error("the cluster refused the join: {message}")]
    Refused { status: u16, message: String },
    #[error("no cluster member named in the token could be reached or verified ({failures}). Check the network path and that the token is for this cluster")]
    Unreachable { failures: String },
}

pub async fn request_join(
    token: &JoinTokenBody,
    draft: JoinRequestDraft,
) -> Result<JoinReply, JoinError> {
    let tls = tls::pinned_client_config(&token.ca_fingerprint).map_err(JoinError::Pin)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .map_err(JoinError::Client)?;
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
                let reply: JoinApiReply =
                    resp.json()
                        .await
                        .map_err(|source| JoinError::MalformedReply {
                            addr: addr.clone(),
                            source,
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
                return Err(JoinError::Refused {
                    status: status.as_u16(),
                    message,
                });
            }
            Err(e) => failures.push(format!("{addr}: {}", error_chain(&e))),
        }
    }
    Err(JoinError::Unreachable {
        failures: failures.join("; "),
    })
}
