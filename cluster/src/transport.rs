//! The peer transport: tonic over mTLS on the peer port.
//!
//! Every RPC carries JSON in a single `Payload` message (see `proto/peer.proto`). The server
//! requires a client certificate from the cluster CA, so plain TCP and certificates from
//! any other CA are refused during the handshake, before a byte of RPC is read.
//!
//! Client side: one lazily connected channel per target node, verified against the name
//! `node-<id>.keel`, so a node cannot impersonate another member even with a valid cert.
//!
//! Server side: every RPC is checked against the node its client certificate names and
//! raft's membership ([`crate::peer_auth`]); the host services get that caller to decide
//! what it may ask of this host. Streams end when their caller leaves the membership.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request as TonicRequest, Response as TonicResponse, Status};

use crate::peer_auth::{caller_of, PeerDenied, PeerMembers};
use crate::tls::NodeIdentity;
use crate::types::{KeelNode, NodeId, Raft, TypeConfig};

pub mod pb {
    tonic::include_proto!("keel.peer.v1");
}

use pb::peer_client::PeerClient;
use pb::peer_server::{Peer, PeerServer};
pub use pb::{Chunk, Payload};

/// Largest message accepted on the peer port (snapshots are sent in chunks well below it).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("could not encode or decode a peer message")]
    Codec(#[source] serde_json::Error),
    #[error("peer {addr} is unreachable")]
    Unreachable {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer call failed: {}", .0.message())]
    Status(#[source] Status),
    #[error("invalid peer address {addr:?}")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the peer server on {addr} stopped")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
}

pub fn encode<T: Serialize>(value: &T) -> Result<Payload, Status> {
    serde_json::to_vec(value)
        .map(|json| Payload { json })
        .map_err(|e| Status::internal(format!("encode: {e}")))
}

pub fn decode<T: DeserializeOwned>(payload: &Payload) -> Result<T, Status> {
    serde_json::from_slice(&payload.json)
        .map_err(|e| Status::invalid_argument(format!("malformed peer message: {e}")))
}

/// What the peer server needs besides raft: leader-only operations and heartbeats. Each
/// call comes from `caller`, a member (the server has checked its certificate and raft's
/// membership).
#[tonic::async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    /// Handles a forwarded leader operation; request and reply are JSON.
    async fn leader_op(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status>;
    /// Records a heartbeat from a member.
    async fn heartbeat(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status>;
    /// Handles a request for this node's host services.
    async fn host_op(&self, caller: NodeId, json: &[u8]) -> Result<Vec<u8>, Status>;
    /// Opens a blob this node holds for streaming to a member.
    async fn open_blob(&self, caller: NodeId, json: &[u8]) -> Result<BlobReader, Status>;
    /// Opens a two-way stream named by `header`; `inbound` carries the caller's bytes.
    async fn open_duplex(
        &self,
        caller: NodeId,
        header: &[u8],
        inbound: DuplexInbound,
    ) -> Result<DuplexOutbound, Status>;
}

/// Bytes from the remote side of a duplex stream.
pub type DuplexInbound = tokio::sync::mpsc::Receiver<Vec<u8>>;
/// Bytes to the remote side of a duplex stream; an `Err` ends it with that status.
pub type DuplexOutbound = tokio::sync::mpsc::Receiver<Result<Vec<u8>, Status>>;

/// A blob being streamed out.
pub type BlobReader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// Size of the chunks a blob is streamed in.
const BLOB_CHUNK_BYTES: usize = 256 * 1024;

struct PeerService {
    raft: Raft,
    handler: Arc<dyn PeerHandler>,
}

impl PeerService {
    fn members(&self) -> PeerMembers {
        PeerMembers::of(&self.raft.metrics().borrow().membership_config)
    }

    /// The caller of a non-raft RPC, which must be a member.
    fn member_caller<T>(&self, req: &TonicRequest<T>) -> Result<NodeId, Status> {
        let caller = caller_of(req)?;
        self.members().require_member(caller)?;
        Ok(caller)
    }

    /// Resolves once `caller` is no longer a member here (or raft stopped).
    fn removed(&self, caller: NodeId) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut metrics = self.raft.metrics();
        async move {
            loop {
                let member = metrics
                    .borrow_and_update()
                    .membership_config
                    .nodes()
                    .any(|(id, _)| *id == caller);
                if !member || metrics.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Forwards `out` until it ends or `removed` resolves; then the stream ends with the
/// caller's refusal, so a node removed from the cluster keeps no stream open.
fn end_on_removal(
    mut out: DuplexOutbound,
    removed: impl std::future::Future<Output = ()> + Send + 'static,
    caller: NodeId,
) -> DuplexOutbound {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut removed = std::pin::pin!(removed);
        loop {
            tokio::select! {
                () = &mut removed => {
                    let _ = tx.send(Err(PeerDenied::NotAMember { caller }.into())).await;
                    return;
                }
                item = out.recv() => match item {
                    Some(item) => if tx.send(item).await.is_err() { return },
                    None => return,
                },
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        req: TonicRequest<Payload>,
    ) -> Result<TonicResponse<Payload>, Status> {
        let caller = caller_of(&req)?;
        let members = self.members();
        // Who, before what: a stranger learns nothing from how its body would parse.
        members.allow_replication(caller, None)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        members.allow_replication(caller, rpc.vote.leader_id().voted_for())?;
        let result = self.raft.append_entries(rpc).await;
        Ok(TonicResponse::new(encode(&result)?))
    }

    async fn vote(&self, req: TonicRequest<Payload>) -> Result<TonicResponse<Payload>, Status> {
        let caller = caller_of(&req)?;
        let members = self.members();
        // Who, before what: a stranger learns nothing from how its body would parse.
        members.allow_vote(caller, None)?;
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        members.allow_vote(caller, rpc.vote.leader_id().voted_for())?;
        let result = self.raft.vote(rpc).await;
        Ok(TonicResponse::new(encode(&result)?))
    }

    async fn install_snapshot(
        &self,
        req: TonicRequest<Payload>,
    ) -> Result<TonicResponse<Payload>, Status> {
        let caller = caller_of(&req)?;
        let members = self.members();
        // Who, before what: a stranger learns nothing from how its body would parse.
        members.allow_replication(caller, None)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        members.allow_replication(caller, rpc.vote.leader_id().voted_for())?;
        let result = self.raft.install_snapshot(rpc).await;
        Ok(TonicResponse::new(encode(&result)?))
    }

    async fn leader(&self, req: TonicRequest<Payload>) -> Result<TonicResponse<Payload>, Status> {
        let caller = self.member_caller(&req)?;
        let json = self.handler.leader_op(caller, &req.get_ref().json).await?;
        Ok(TonicResponse::new(Payload { json }))
    }

    async fn heartbeat(
        &self,
        req: TonicRequest<Payload>,
    ) -> Result<TonicResponse<Payload>, Status> {
        let caller = self.member_caller(&req)?;
        let json = self.handler.heartbeat(caller, &req.get_ref().json).await?;
        Ok(TonicResponse::new(Payload { json }))
    }

    async fn host(&self, req: TonicRequest<Payload>) -> Result<TonicResponse<Payload>, Status> {
        let caller = self.member_caller(&req)?;
        let json = self.handler.host_op(caller, &req.get_ref().json).await?;
        Ok(TonicResponse::new(Payload { json }))
    }

    type DuplexStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Chunk, Status>> + Send>>;

    async fn duplex(
        &self,
        req: TonicRequest<tonic::Streaming<Chunk>>,
    ) -> Result<TonicResponse<Self::DuplexStream>, Status> {
        let caller = self.member_caller(&req)?;
        let mut inbound = req.into_inner();
        let header = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a duplex stream starts with a header"))?;
        let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let removed = self.removed(caller);
        tokio::spawn(async move {
            let mut removed = std::pin::pin!(removed);
            loop {
                tokio::select! {
                    () = &mut removed => return,
                    chunk = inbound.message() => match chunk {
                        Ok(Some(chunk)) => if in_tx.send(chunk.data).await.is_err() { return },
                        _ => return,
                    },
                }
            }
        });
        let out = self
            .handler
            .open_duplex(caller, &header.data, in_rx)
            .await?;
        let out = end_on_removal(out, self.removed(caller), caller);
        let stream =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(out), |r| {
                r.map(|data| Chunk { data })
            });
        Ok(TonicResponse::new(Box::pin(stream)))
    }

    type FetchBlobStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Chunk, Status>> + Send>>;

    async fn fetch_blob(
        &self,
        req: TonicRequest<Payload>,
    ) -> Result<TonicResponse<Self::FetchBlobStream>, Status> {
        use tokio::io::AsyncReadExt;
        let caller = self.member_caller(&req)?;
        let mut reader = self.handler.open_blob(caller, &req.get_ref().json).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Chunk, Status>>(4);
        let removed = self.removed(caller);
        tokio::spawn(async move {
            let mut removed = std::pin::pin!(removed);
            loop {
                let mut data = vec![0u8; BLOB_CHUNK_BYTES];
                let read = tokio::select! {
                    () = &mut removed => {
                        let _ = tx.send(Err(PeerDenied::NotAMember { caller }.into())).await;
                        return;
                    }
                    read = reader.read(&mut data) => read,
                };
                match read {
                    Ok(0) => return,
                    Ok(n) => {
                        data.truncate(n);
                        if tx.send(Ok(Chunk { data })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read failed: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(TonicResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the peer port on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    identity: &NodeIdentity,
    raft: Raft,
    handler: Arc<dyn PeerHandler>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &identity.cert_chain_pem,
            &identity.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&identity.ca_pem));
    let service = PeerServer::new(PeerService { raft, handler })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Server::builder()
        .tls_config(tls)
        .map_err(|source| TransportError::Serve { addr, source })?
        .timeout(Duration::from_secs(60))
        .add_service(service)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small h2 frames wait on delayed ACKs (~40 ms stalls).
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |stream| stream.and_then(|s| s.set_nodelay(true).map(|()| s)),
            ),
            shutdown,
        )
        .await
        .map_err(|source| TransportError::Serve { addr, source })
}

/// Opens mTLS channels to other members; shared by raft replication and forwarding.
#[derive(Clone)]
pub struct PeerConnector {
    tls_ca: Certificate,
    tls_identity: Identity,
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
}

impl PeerConnector {
    pub fn new(identity: &NodeIdentity) -> Self {
        Self {
            tls_ca: Certificate::from_pem(&identity.ca_pem),
            tls_identity: Identity::from_pem(&identity.cert_chain_pem, &identity.key_pem),
            channels: Arc::default(),
        }
    }

    /// A client for node `target` at `peer_addr`; the connection is opened on first use
    /// and reused after.
    pub fn client(
        &self,
        target: NodeId,
        peer_addr: &str,
    ) -> Result<PeerClient<Channel>, TransportError> {
        let key = (target, peer_addr.to_string());
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(&key) {
            Some(channel) => channel.clone(),
            None => {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(self.tls_ca.clone())
                    .identity(self.tls_identity.clone())
                    .domain_name(format!("node-{target}.keel"));
                let bad = |source| TransportError::BadAddress {
                    addr: peer_addr.to_string(),
                    source,
                };
                let channel = Endpoint::from_shared(format!("https://{peer_addr}"))
                    .map_err(bad)?
                    .tls_config(tls)
                    .map_err(bad)?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    // Notice a dead peer within about two seconds even when idle.
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(1))
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                channels.insert(key, channel.clone());
                channel
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Calls a non-raft RPC on `target` with a JSON request and returns its JSON reply.
    pub async fn call(
        &self,
        rpc: PeerRpc,
        target: NodeId,
        peer_addr: &str,
        json: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut client = self.client(target, peer_addr)?;
        let mut req = TonicRequest::new(Payload { json });
        req.set_timeout(timeout);
        let reply = match rpc {
            PeerRpc::Leader => client.leader(req).await,
            PeerRpc::Heartbeat => client.heartbeat(req).await,
            PeerRpc::Host => client.host(req).await,
        };
        reply
            .map(|r| r.into_inner().json)
            .map_err(TransportError::Status)
    }
}

impl PeerConnector {
    /// Opens a duplex stream to `target`: `header` first, then whatever `outbound` yields.
    pub async fn duplex(
        &self,
        target: NodeId,
        peer_addr: &str,
        header: Vec<u8>,
        outbound: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<tonic::Streaming<Chunk>, TransportError> {
        use tokio_stream::StreamExt;
        let mut client = self.client(target, peer_addr)?;
        let stream = tokio_stream::once(Chunk { data: header }).chain(
            tokio_stream::wrappers::ReceiverStream::new(outbound).map(|data| Chunk { data }),
        );
        client
            .duplex(TonicRequest::new(stream))
            .await
            .map(|r| r.into_inner())
            .map_err(TransportError::Status)
    }

    /// Opens a blob stream from `target`.
    pub async fn fetch_blob(
        &self,
        target: NodeId,
        peer_addr: &str,
        json: Vec<u8>,
    ) -> Result<tonic::Streaming<Chunk>, TransportError> {
        let mut client = self.client(target, peer_addr)?;
        client
            .fetch_blob(TonicRequest::new(Payload { json }))
            .await
            .map(|r| r.into_inner())
            .map_err(TransportError::Status)
    }
}

/// The peer RPCs besides raft's own.
#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    /// A forwarded leader-only operation.
    Leader,
    /// A member's liveness report.
    Heartbeat,
    /// A request for the target node's host services.
    Host,
}

impl RaftNetworkFactory<TypeConfig> for PeerConnector {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &KeelNode) -> Self::Network {
        RaftPeer {
            target,
            client: self.client(target, &node.peer_addr),
        }
    }
}

/// openraft's view of one remote member.
pub struct RaftPeer {
    target: NodeId,
    client: Result<PeerClient<Channel>, TransportError>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, KeelNode, RaftError<NodeId, E>>>;

impl RaftPeer {
    async fn call<Req, Resp, E>(
        &mut self,
        method: &'static str,
        rpc: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let payload = encode(rpc).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let mut req = TonicRequest::new(payload);
        req.set_timeout(option.hard_ttl());
        let reply = match method {
            "append_entries" => client.append_entries(req).await,
            "vote" => client.vote(req).await,
            _ => client.install_snapshot(req).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(reply.get_ref()).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call("append_entries", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call("install_snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call("vote", &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_ends_with_a_refusal_when_its_caller_is_removed() {
        let (tx, out) = tokio::sync::mpsc::channel(4);
        let (removed_tx, removed_rx) = tokio::sync::oneshot::channel::<()>();
        let mut relayed = end_on_removal(
            out,
            async move {
                let _ = removed_rx.await;
            },
            7,
        );
        tx.send(Ok(b"before".to_vec()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let first = relayed.recv().await.and_then(Result::ok);
        assert_eq!(first.as_deref(), Some(&b"before"[..]));

        removed_tx
            .send(())
            .unwrap_or_else(|()| panic!("removal not heard"));
        match relayed.recv().await {
            Some(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied);
                assert!(
                    status.message().contains("node 7 is not a member"),
                    "{status:?}"
                );
            }
            other => panic!("the stream went on after the removal: {other:?}"),
        }
        // Nothing more, even though the source of the stream is still open.
        let _ = tx.send(Ok(b"after".to_vec())).await;
        assert!(relayed.recv().await.is_none());
    }
}
