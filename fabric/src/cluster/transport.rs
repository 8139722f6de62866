//! Raft RPCs over QUIC with mutual TLS.
//!
//! Every RPC is one bidirectional QUIC stream: the caller writes a one-byte
//! kind and a JSON body and finishes its side; the callee answers with the
//! JSON of `Result<response, RaftError>`. Streams of one connection are
//! independent, so a heartbeat never waits behind a snapshot on another
//! stream. Connections are opened lazily and reused; a failed one is
//! dropped and opened again by the next RPC.

// openraft's error types are large by design and the traits fix them.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::health::Health;
use super::metadata::{Command, NodeId};
use super::raft::{Member, MetadataRaft, TypeConfig};
use super::tls::{transport_config, NodeIdentity, TlsError};

/// Largest RPC message accepted, either way: a snapshot chunk plus JSON.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// UDP socket buffers of the cluster endpoint. The kernel default (about
/// 208 KiB) drops packets under load.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

const KIND_APPEND_ENTRIES: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_INSTALL_SNAPSHOT: u8 = 3;
/// A heartbeat; see [`Heartbeat`].
pub const KIND_HEARTBEAT: u8 = 4;
/// A metadata command for the leader to commit, from a follower.
pub const KIND_CLIENT_WRITE: u8 = 5;
/// A node to remove from the cluster, for the leader to carry out.
pub const KIND_REMOVE_NODE: u8 = 6;
/// A follower asks the leader for a read index (see
/// [`super::runtime::ClusterRuntime::read_barrier`]).
pub const KIND_READ_INDEX: u8 = 7;
/// The cluster CA for a new voter ([`super::tls::CaSlot::install`]).
pub const KIND_INSTALL_CA: u8 = 8;
/// A node to add, for the leader ([`super::runtime::Admissions::add_member`]).
pub const KIND_ADD_MEMBER: u8 = 9;
/// A long-lived replication stream: length-prefixed frames both ways
/// (see [`crate::replication`]).
pub const KIND_REPLICATION: u8 = 10;
/// Round trips for `fabctl node ping`: frames of a u32 little-endian
/// length and that many bytes, each answered by its length alone.
pub const KIND_PING: u8 = 11;
/// A request for this node's API, forwarded by another node
/// ([`ApiCall`], answered by an [`ApiAnswer`]).
pub const KIND_API: u8 = 12;
/// Largest ping message.
pub const PING_BYTES_MAX: usize = 1 << 20;

/// On the leader: takes node `id` out of the Raft membership (voter or
/// learner) and out of the metadata. Refuses to remove the leader itself.
pub async fn remove_member(raft: &MetadataRaft, id: NodeId) -> Result<(), String> {
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader == Some(id) {
        return Err(format!(
            "node {id} is the leader; stop it first so that another node leads, then remove it"
        ));
    }
    let membership = metrics.membership_config.membership().clone();
    let ids = std::collections::BTreeSet::from([id]);
    let change = if membership.voter_ids().any(|voter| voter == id) {
        Some(openraft::ChangeMembers::RemoveVoters(ids))
    } else if membership.learner_ids().any(|learner| learner == id) {
        Some(openraft::ChangeMembers::RemoveNodes(ids))
    } else {
        None
    };
    if let Some(change) = change {
        raft.change_membership(change, false)
            .await
            .map_err(|e| e.to_string())?;
    }
    match raft
        .client_write(Command::RemoveNode { id })
        .await
        .map_err(|e| e.to_string())?
        .data
    {
        super::metadata::Response::Applied => Ok(()),
        super::metadata::Response::Rejected { reason } => Err(reason),
    }
}

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind the cluster endpoint on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the node's QUIC endpoint: it accepts only peers with a certificate
/// from the cluster CA and uses this node's certificate for outgoing calls.
pub fn bind(
    address: SocketAddr,
    identity: &NodeIdentity,
) -> Result<quinn::Endpoint, TransportError> {
    let bind_error = |source| TransportError::Bind { address, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_error)?;
    socket
        .set_recv_buffer_size(UDP_BUFFER_BYTES)
        .map_err(bind_error)?;
    socket
        .set_send_buffer_size(UDP_BUFFER_BYTES)
        .map_err(bind_error)?;
    socket.bind(&address.into()).map_err(bind_error)?;
    let transport = transport_config();
    let mut endpoint_config = quinn::EndpointConfig::new(identity.reset_key());
    // Peers may send packets up to UDP_PAYLOAD_BYTES_MAX: the limit each
    // end announces caps what MTU discovery can find (quinn's default stops
    // at a 1,500-byte Ethernet MTU, so a 4 KiB write or a 1,500-byte frame
    // needed several packets even on loopback).
    endpoint_config
        .max_udp_payload_size(super::tls::UDP_PAYLOAD_BYTES_MAX)
        .expect("the largest payload is within QUIC's bounds");
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(identity.server_config(transport.clone())?),
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    endpoint.set_default_client_config(identity.client_config(transport)?);
    Ok(endpoint)
}

/// Links this node pretends are cut, for fault tests: traffic to and from
/// these peer addresses is dropped. Empty unless fault injection is on.
#[derive(Debug, Default)]
pub struct Faults {
    blocked: Mutex<std::collections::HashSet<SocketAddr>>,
    /// Connections open now, so that cutting a link also ends the streams
    /// already running on it (replication streams live long).
    connections: Mutex<Vec<quinn::Connection>>,
}

impl Faults {
    /// Replaces the set of blocked peers, and closes connections to them.
    pub fn block(&self, peers: impl IntoIterator<Item = SocketAddr>) {
        let blocked: std::collections::HashSet<SocketAddr> = peers.into_iter().collect();
        let mut connections = self.connections.lock().expect("faults lock poisoned");
        connections.retain(|connection| {
            if blocked.contains(&connection.remote_address()) {
                connection.close(3u32.into(), b"link cut by fault injection");
            }
            connection.close_reason().is_none()
        });
        *self.blocked.lock().expect("faults lock poisoned") = blocked;
    }

    /// Remembers a connection, if fault injection may cut it.
    fn track(&self, connection: &quinn::Connection) {
        let mut connections = self.connections.lock().expect("faults lock poisoned");
        connections.retain(|connection| connection.close_reason().is_none());
        connections.push(connection.clone());
    }

    fn is_blocked(&self, peer: &SocketAddr) -> bool {
        self.blocked
            .lock()
            .expect("faults lock poisoned")
            .contains(peer)
    }
}

/// What answers incoming requests: the Raft group, and the node's view of
/// its peers' health.
#[derive(Clone)]
pub struct Handler {
    pub raft: MetadataRaft,
    pub health: Arc<Mutex<Health>>,
    /// Origin of the health clock.
    pub origin: std::time::Instant,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// The leader's half of admissions; holds this node's copy of the CA.
    pub admissions: super::runtime::Admissions,
    /// What this node serves beyond the metadata.
    pub services: NodeServices,
}

/// What a node serves its peers beyond the metadata: its replicas, and its
/// own API for requests another node forwards (`fabctl ... --node`).
#[derive(Clone, Default)]
pub struct NodeServices {
    pub replication: Option<crate::replication::service::ReplicaService>,
    /// Set once the API is up.
    pub api: Arc<OnceLock<axum::Router>>,
    /// The switch, which takes frames other nodes send as datagrams.
    pub switch: Option<Arc<crate::switch::NodeSwitch>>,
}

impl std::fmt::Debug for NodeServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeServices")
            .field("replication", &self.replication.is_some())
            .field("api", &self.api.get().is_some())
            .field("switch", &self.switch.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").finish_non_exhaustive()
    }
}

/// A heartbeat: "I am alive".
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: NodeId,
}

/// Answers requests arriving on `endpoint` until it is closed.
pub async fn serve(endpoint: quinn::Endpoint, handler: Handler) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        if handler.faults.is_blocked(&incoming.remote_address()) {
            incoming.ignore();
            continue;
        }
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%remote, %error, "refused a cluster connection (no valid certificate from this cluster?)");
                    return;
                }
            };
            handler.faults.track(&connection);
            if let Some(switch) = &handler.services.switch {
                tokio::spawn(crate::switch::read_tunnel(
                    switch.clone(),
                    connection.clone(),
                ));
            }
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(answer(send, recv, handler.clone(), remote));
            }
        });
    }
}

async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Handler,
    remote: SocketAddr,
) {
    let mut kind = [0u8; 1];
    if let Err(error) = recv.read_exact(&mut kind).await {
        tracing::warn!(%remote, %error, "dropped an empty cluster request");
        return;
    }
    let kind = kind[0];
    if handler.faults.is_blocked(&remote) {
        let _ = send.reset(2u32.into());
        return;
    }
    if kind == KIND_REPLICATION {
        match &handler.services.replication {
            Some(service) => service.serve_stream(send, recv, remote).await,
            None => {
                tracing::warn!(%remote, "refused a replication stream: this node serves no replicas");
                let _ = send.reset(1u32.into());
            }
        }
        return;
    }
    if kind == KIND_PING {
        if let Err(error) = echo_pings(&mut send, &mut recv).await {
            tracing::warn!(%remote, %error, "ended a ping stream");
            let _ = send.reset(1u32.into());
        }
        return;
    }
    let request = match recv.read_to_end(MESSAGE_BYTES_MAX).await {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%remote, %error, "dropped a cluster request that could not be read");
            return;
        }
    };
    let body = &request[..];
    let raft = &handler.raft;
    let response = match kind {
        KIND_APPEND_ENTRIES => dispatch(body, |r| raft.append_entries(r)).await,
        KIND_VOTE => dispatch(body, |r| raft.vote(r)).await,
        KIND_INSTALL_SNAPSHOT => dispatch(body, |r| raft.install_snapshot(r)).await,
        KIND_HEARTBEAT => {
            let health = &handler.health;
            let origin = handler.origin;
            dispatch(body, |beat: Heartbeat| async move {
                health
                    .lock()
                    .expect("health lock poisoned")
                    .heard(beat.from, origin.elapsed());
            })
            .await
        }
        KIND_CLIENT_WRITE => {
            dispatch(body, |command: Command| async move {
                raft.client_write(command)
                    .await
                    .map(|written| written.data)
                    .map_err(|e| e.to_string())
            })
            .await
        }
        KIND_REMOVE_NODE => {
            dispatch(
                body,
                |id: NodeId| async move { remove_member(raft, id).await },
            )
            .await
        }
        KIND_READ_INDEX => {
            dispatch(body, |(): ()| async move {
                raft.ensure_linearizable()
                    .await
                    .map(|read| read.map(|log_id| log_id.index))
                    .map_err(|e| e.to_string())
            })
            .await
        }
        KIND_INSTALL_CA => {
            let slot = &handler.admissions.ca;
            dispatch(body, |bundle: super::tls::CaBundle| async move {
                let installed = slot.install(bundle).map_err(|e| e.to_string());
                if installed == Ok(true) {
                    tracing::info!(%remote, "received the cluster CA: this node can admit nodes");
                }
                installed
            })
            .await
        }
        KIND_ADD_MEMBER => {
            let admissions = &handler.admissions;
            dispatch(body, |new: super::runtime::NewMember| async move {
                admissions.add_member(new).await
            })
            .await
        }
        KIND_API => {
            let api = handler.services.api.get().cloned();
            dispatch(
                body,
                |call: ApiCall| async move { call_api(api, call).await },
            )
            .await
        }
        other => Err(format!("unknown request kind {other}")),
    };
    match response {
        Ok(bytes) => {
            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(reason) => {
            tracing::warn!(%remote, %reason, "refused a malformed cluster request");
            let _ = send.reset(1u32.into());
        }
    }
}

/// An API request forwarded to another node: `fabctl ... --node X` sent to
/// any node runs on X.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiCall {
    pub method: String,
    /// Path and query, e.g. `/v1/volumes/vm1/attach`.
    pub path: String,
    pub body: Option<serde_json::Value>,
}

/// The forwarded request's HTTP status and body: JSON, or (`text`) a
/// string the API answered as plain text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiAnswer {
    pub status: u16,
    pub body: serde_json::Value,
    #[serde(default)]
    pub text: bool,
}

async fn call_api(api: Option<axum::Router>, call: ApiCall) -> Result<ApiAnswer, String> {
    use tower::ServiceExt;
    let router = api.ok_or("the node's API is starting")?;
    let method = axum::http::Method::from_bytes(call.method.as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method", call.method))?;
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(&call.path);
    let body = match &call.body {
        Some(value) => {
            request = request.header(axum::http::header::CONTENT_TYPE, "application/json");
            axum::body::Body::from(serde_json::to_vec(value).map_err(|e| e.to_string())?)
        }
        None => axum::body::Body::empty(),
    };
    let request = request.body(body).map_err(|e| e.to_string())?;
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let text = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/"));
    let bytes = axum::body::to_bytes(response.into_body(), MESSAGE_BYTES_MAX)
        .await
        .map_err(|e| e.to_string())?;
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else if text {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("the API answered with non-JSON: {e}"))?
    };
    Ok(ApiAnswer { status, body, text })
}

/// Answers each ping frame with its length until the sender finishes.
async fn echo_pings(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), String> {
    let mut buffer = Vec::new();
    loop {
        let mut length = [0u8; 4];
        match recv.read_exact(&mut length).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => break,
            Err(error) => return Err(error.to_string()),
        }
        let bytes = u32::from_le_bytes(length) as usize;
        if bytes > PING_BYTES_MAX {
            return Err(format!(
                "a ping of {bytes} bytes is over the {PING_BYTES_MAX}-byte limit"
            ));
        }
        buffer.resize(bytes, 0);
        recv.read_exact(&mut buffer)
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(&length).await.map_err(|e| e.to_string())?;
    }
    send.finish().map_err(|e| e.to_string())
}

async fn dispatch<Req, Resp, F, Fut>(body: &[u8], handler: F) -> Result<Vec<u8>, String>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: std::future::Future<Output = Resp>,
{
    let request: Req =
        serde_json::from_slice(body).map_err(|e| format!("undecodable request: {e}"))?;
    let response = handler(request).await;
    serde_json::to_vec(&response).map_err(|e| format!("cannot encode the response: {e}"))
}

/// Outgoing RPCs of one node.
#[derive(Debug, Clone)]
pub struct QuicNetwork {
    endpoint: quinn::Endpoint,
    connections: Arc<Mutex<HashMap<NodeId, quinn::Connection>>>,
    faults: Arc<Faults>,
}

impl QuicNetwork {
    /// RPCs go out through `endpoint` (see [`bind`]), subject to `faults`.
    pub fn new(endpoint: quinn::Endpoint, faults: Arc<Faults>) -> QuicNetwork {
        QuicNetwork {
            endpoint,
            connections: Arc::default(),
            faults,
        }
    }
}

impl QuicConnection {
    /// A link to `member` that is not (yet) part of Raft's own connections,
    /// e.g. for heartbeats and forwarded writes.
    pub fn to(network: &QuicNetwork, target: NodeId, member: Member) -> QuicConnection {
        QuicConnection {
            network: network.clone(),
            target,
            member,
        }
    }
}

/// This node's link to one member.
#[derive(Debug, Clone)]
pub struct QuicConnection {
    network: QuicNetwork,
    target: NodeId,
    member: Member,
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = QuicConnection;

    async fn new_client(&mut self, target: NodeId, member: &Member) -> QuicConnection {
        QuicConnection::to(self, target, member.clone())
    }
}

type RpcError<E> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl QuicConnection {
    /// The QUIC connection to the member, opened if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, CallError> {
        let unreachable = |e: &dyn std::fmt::Display| {
            CallError::Unreachable(format!(
                "node {} at {}: {e}",
                self.target, self.member.address
            ))
        };
        let address: SocketAddr = self.member.address.parse().map_err(|e| unreachable(&e))?;
        if self.network.faults.is_blocked(&address) {
            return Err(unreachable(&"the link is cut by fault injection"));
        }
        let cached = self
            .network
            .connections
            .lock()
            .expect("connection cache poisoned")
            .get(&self.target)
            .cloned();
        if let Some(connection) = cached {
            if connection.close_reason().is_none() {
                return Ok(connection);
            }
        }
        let connecting = self
            .network
            .endpoint
            .connect(address, &self.member.name)
            .map_err(|e| unreachable(&e))?;
        let connection = connecting.await.map_err(|e| unreachable(&e))?;
        self.network.faults.track(&connection);
        self.network
            .connections
            .lock()
            .expect("connection cache poisoned")
            .insert(self.target, connection.clone());
        Ok(connection)
    }

    /// Drops the cached connection to the member (not closing it), so the
    /// next call connects anew: for a caller whose requests went
    /// unanswered, whose peer may have restarted.
    pub fn forget(&self) {
        self.network
            .connections
            .lock()
            .expect("connection cache poisoned")
            .remove(&self.target);
    }

    /// Sends one request of `kind` and decodes the reply.
    pub async fn request<Req, Resp>(&self, kind: u8, request: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let connection = self.connection().await?;
        let failed = |e: &dyn std::fmt::Display| CallError::Failed(e.to_string());
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                self.network
                    .connections
                    .lock()
                    .expect("connection cache poisoned")
                    .remove(&self.target);
                return Err(failed(&error));
            }
        };
        let mut message = vec![kind];
        serde_json::to_writer(&mut message, request).map_err(|e| failed(&e))?;
        send.write_all(&message).await.map_err(|e| failed(&e))?;
        send.finish().map_err(|e| failed(&e))?;
        let reply = recv
            .read_to_end(MESSAGE_BYTES_MAX)
            .await
            .map_err(|e| failed(&e))?;
        serde_json::from_slice(&reply).map_err(|e| failed(&e))
    }

    /// `count` round trips of a `bytes`-byte message and its 4-byte
    /// answer, one after another on one stream of the connection: what a
    /// replicated write costs on the wire. A first round, which opens the
    /// stream, is not counted.
    pub async fn ping(&self, count: usize, bytes: usize) -> Result<Vec<Duration>, CallError> {
        assert!(
            bytes <= PING_BYTES_MAX,
            "ping size is checked by the caller"
        );
        let connection = self.connection().await?;
        let failed = |e: &dyn std::fmt::Display| CallError::Failed(e.to_string());
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| failed(&e))?;
        let length = u32::try_from(bytes)
            .expect("at most PING_BYTES_MAX")
            .to_le_bytes();
        let mut message = Vec::with_capacity(1 + 4 + bytes);
        message.push(KIND_PING);
        message.extend_from_slice(&length);
        message.resize(1 + 4 + bytes, 0x5a);
        let mut times = Vec::with_capacity(count);
        for round in 0..=count {
            let frame = if round == 0 {
                &message[..]
            } else {
                &message[1..]
            };
            let start = Instant::now();
            send.write_all(frame).await.map_err(|e| failed(&e))?;
            let mut answer = [0u8; 4];
            recv.read_exact(&mut answer).await.map_err(|e| failed(&e))?;
            if round > 0 {
                times.push(start.elapsed());
            }
            if answer != length {
                return Err(failed(&"the peer answered a ping with the wrong length"));
            }
        }
        send.finish().map_err(|e| failed(&e))?;
        Ok(times)
    }

    async fn call<Req, Resp, E>(&self, kind: u8, request: &Req) -> Result<Resp, RpcError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> = self
            .request(kind, request)
            .await
            .map_err(|error| match error {
                CallError::Unreachable(reason) => {
                    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(reason)))
                }
                CallError::Failed(reason) => {
                    RPCError::Network(NetworkError::new(&std::io::Error::other(reason)))
                }
            })?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.member.clone(),
                e,
            ))
        })
    }
}

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("request failed: {0}")]
    Failed(String),
}

impl RaftNetwork<TypeConfig> for QuicConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError<openraft::error::Infallible>> {
        self.call(KIND_APPEND_ENTRIES, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        self.call(KIND_INSTALL_SNAPSHOT, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError<openraft::error::Infallible>> {
        self.call(KIND_VOTE, &rpc).await
    }
}
