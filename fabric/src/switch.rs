//! The node's switch: serves the vhost-user-net ports the cluster
//! metadata places on this node, and the `/v1/segments` and `/v1/ports`
//! routes that define them (see `docs/api.md`).
//!
//! Segments and ports live in the metadata; this node serves the ports
//! whose `node` is this node. [`NodeSwitch::reconcile`] makes the served
//! set match the metadata: after each port change made here, and every
//! second for changes made elsewhere.
//!
//! A segment with ports on several nodes is joined across them by tunnels:
//! one per other node, carrying the segments both nodes have ports in.
//! Frames go to the other node as QUIC datagrams on the cluster's
//! (mutually authenticated) connection to it, and come in through
//! [`read_tunnel`] on the connections other nodes open to this one. A
//! datagram is unreliable and unordered, like an Ethernet link, so a lost
//! frame is never retransmitted behind newer ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vswitch::port::{Fabric, Scratch, Tunnel};
use vswitch::server::NetServer;
use vswitch::switch::{
    DropReason, PortConfig, PortCounters, PortId, RateLimit, SegmentId, Switch,
    VlanMode as PortVlan,
};
use vswitch::tap::{HostPort, Tap};
use vswitch::tunnel::{pieces, Reassembly, TunnelHeader, TUNNEL_HEADER_BYTES};

use crate::api::ApiError;
use crate::cluster::metadata::{
    Command, Link, Mac, Metadata, NodeId, PortMeta, RateLimit as MetaRate, VlanMode,
};
use crate::cluster::raft::Member;
use crate::cluster::transport::{QuicConnection, QuicNetwork};
use crate::cluster_api::ClusterHandle;

/// How often the served ports are compared with the metadata.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long opening a tunnel's connection may take before the next try.
const TUNNEL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A port served here.
#[derive(Debug)]
struct Served {
    id: PortId,
    meta: PortMeta,
    endpoint: Endpoint,
}

/// What a served port's frames come from and go to.
#[derive(Debug)]
enum Endpoint {
    /// A guest's NIC, through a vhost-user socket.
    Socket(NetServer),
    /// A TAP interface on this node.
    Host(HostPort),
}

impl Endpoint {
    /// Whether a guest is connected, or a host port's interface is still
    /// there.
    fn connected(&self) -> bool {
        match self {
            Endpoint::Socket(server) => server.connected(),
            Endpoint::Host(host) => host.alive(),
        }
    }

    /// A host port whose interface went away.
    fn gone(&self) -> bool {
        matches!(self, Endpoint::Host(host) if !host.alive())
    }
}

/// This node's end of the tunnel to one other node.
#[derive(Debug)]
struct QuicTunnel {
    me: NodeId,
    peer: NodeId,
    /// The cluster connection to the peer, once open.
    connection: Mutex<Option<quinn::Connection>>,
    sequence: AtomicU32,
}

impl QuicTunnel {
    /// The connection as last set, live or not.
    fn current(&self) -> Option<quinn::Connection> {
        self.connection
            .lock()
            .expect("tunnel connection poisoned")
            .clone()
    }

    /// The connection, if it is still open.
    fn connection(&self) -> Option<quinn::Connection> {
        self.current()
            .filter(|connection| connection.close_reason().is_none())
    }
}

impl Tunnel for QuicTunnel {
    /// Sends the frame as one datagram, or as several pieces while the
    /// path's datagram size is below a frame's (before MTU discovery has
    /// run, or on a path without jumbo frames).
    fn send(&self, segment: SegmentId, vlan: u16, frame: &[u8]) -> Result<(), DropReason> {
        // No liveness check per frame: a closed connection refuses the
        // datagram, and the reconcile loop opens a new one.
        let connection = self.current().ok_or(DropReason::Unreachable)?;
        let datagram_bytes_max = connection
            .max_datagram_size()
            .ok_or(DropReason::Unreachable)?;
        let total = u16::try_from(frame.len()).map_err(|_| DropReason::Oversize)?;
        // A full send buffer (the path is congested): drop this frame here
        // rather than queue it and push out an older one (or its own first
        // piece).
        let room = datagram_bytes_max
            .saturating_sub(TUNNEL_HEADER_BYTES)
            .max(1);
        let needed = frame.len() + frame.len().div_ceil(room) * TUNNEL_HEADER_BYTES;
        if connection.datagram_send_buffer_space() < needed {
            return Err(DropReason::NoRoom);
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let mut sent = 0;
        for (offset, piece) in pieces(frame, datagram_bytes_max) {
            let header = TunnelHeader {
                segment,
                vlan,
                sender: self.me,
                sequence,
                offset,
                total,
            };
            let mut datagram = bytes::BytesMut::with_capacity(TUNNEL_HEADER_BYTES + piece.len());
            datagram.extend_from_slice(&header.encode());
            datagram.extend_from_slice(piece);
            connection
                .send_datagram(datagram.freeze())
                .map_err(|_| DropReason::Unreachable)?;
            sent += 1;
        }
        if sent == 0 {
            return Err(DropReason::Unreachable);
        }
        Ok(())
    }
}

/// A tunnel and the segments it carries.
#[derive(Debug)]
struct TunnelEnd {
    id: PortId,
    tunnel: Arc<QuicTunnel>,
    segments: BTreeSet<SegmentId>,
}

/// This node's switch and the ports it serves.
#[derive(Debug)]
pub struct NodeSwitch {
    fabric: Arc<Fabric>,
    socket_dir: PathBuf,
    served: Mutex<HashMap<String, Served>>,
    /// By the node at the other end.
    tunnels: Mutex<BTreeMap<NodeId, TunnelEnd>>,
    /// Each other node's cluster address: datagrams are taken from a node
    /// only on a connection from its address.
    addresses: Mutex<HashMap<std::net::SocketAddr, NodeId>>,
    next_id: AtomicU32,
    /// The log index of the metadata last reconciled: an older snapshot
    /// (taken by the loop before a change made here was applied, and
    /// reconciled after it) is not reconciled, so it cannot undo the
    /// change.
    reconciled_index: std::sync::atomic::AtomicU64,
    /// Why each port placed here that is not served could not be (its
    /// socket or interface could not be made).
    failures: Mutex<HashMap<String, String>>,
    /// Datagrams from other nodes that were not taken (unknown sender,
    /// bad header).
    tunnel_refused: std::sync::atomic::AtomicU64,
}

impl NodeSwitch {
    pub fn new(socket_dir: PathBuf) -> Arc<NodeSwitch> {
        let switch = Switch::default();
        Arc::new(NodeSwitch {
            fabric: Fabric::new(switch, vswitch::frame::FRAME_BYTES_MAX_DEFAULT),
            socket_dir,
            served: Mutex::default(),
            tunnels: Mutex::default(),
            addresses: Mutex::default(),
            next_id: AtomicU32::new(1),
            reconciled_index: Default::default(),
            failures: Mutex::default(),
            tunnel_refused: Default::default(),
        })
    }

    /// The socket a port is served on.
    pub fn socket(&self, port: &str) -> PathBuf {
        self.socket_dir.join(format!("port-{port}.sock"))
    }

    /// Serves the ports `metadata` (as of log index `index`) places on
    /// node `me` and stops the others; nothing, for metadata older than
    /// the last reconciled.
    pub fn reconcile(&self, metadata: &Metadata, index: u64, me: NodeId) {
        let mut served = self.served.lock().expect("served ports poisoned");
        if index < self.reconciled_index.load(Ordering::SeqCst) {
            return;
        }
        self.reconciled_index.store(index, Ordering::SeqCst);
        let wanted: HashMap<&String, &PortMeta> = metadata
            .ports
            .iter()
            .filter(|(_, port)| port.node == me)
            .collect();
        // Ports no longer wanted as they are (other than their link), and
        // host ports whose interface went away (made again below).
        let gone: Vec<String> = served
            .iter()
            .filter(|(name, port)| {
                wanted
                    .get(name)
                    .is_none_or(|meta| !same_but_link(meta, &port.meta))
                    || port.endpoint.gone()
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(port) = served.remove(&name) {
                // The worker first, then the port (a host port's interface
                // goes with it).
                drop(port.endpoint);
                let _ = self.fabric.remove_port(port.id);
                tracing::info!(port = %name, "stopped serving a switch port");
            }
        }
        // A link set up or down changes the port in place: its guest stays
        // attached. A port whose link cannot be set (the switch lost it) is
        // served anew below, with its link.
        let mut lost = Vec::new();
        for (name, port) in served.iter_mut() {
            let Some(meta) = wanted.get(name) else {
                continue;
            };
            if meta.link != port.meta.link {
                match self.fabric.set_link(port.id, meta.link == Link::Up) {
                    Ok(()) => {
                        tracing::info!(port = %name, link = ?meta.link, "a switch port's link was set");
                        port.meta.link = meta.link;
                    }
                    Err(error) => {
                        tracing::error!(port = %name, %error, "cannot set a switch port's link; serving it anew");
                        lost.push(name.clone());
                    }
                }
            }
        }
        for name in lost {
            if let Some(port) = served.remove(&name) {
                drop(port.endpoint);
                let _ = self.fabric.remove_port(port.id);
            }
        }
        let mut failures = self.failures.lock().expect("port failures poisoned");
        failures.retain(|name, _| wanted.contains_key(name));
        for (name, meta) in wanted {
            if served.contains_key(name) {
                continue;
            }
            let Some(segment) = metadata.segments.get(&meta.segment) else {
                continue;
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let config = PortConfig {
                segment: segment.vni,
                mac: Some(meta.mac),
                security: meta.port_security,
                vlan: port_vlan(&meta.vlan),
                rate: RateLimit {
                    packets_per_second: meta.rate.packets_per_second,
                    bytes_per_second: meta.rate.bytes_per_second,
                },
                link_up: meta.link == Link::Up,
            };
            match self.serve(id, meta, config) {
                Ok(endpoint) => {
                    match &endpoint {
                        Endpoint::Socket(server) => {
                            tracing::info!(port = %name, socket = %server.path().display(), "serving a switch port");
                        }
                        Endpoint::Host(host) => {
                            tracing::info!(port = %name, interface = host.name(), "serving a host port");
                        }
                    }
                    failures.remove(name);
                    served.insert(
                        name.clone(),
                        Served {
                            id,
                            meta: meta.clone(),
                            endpoint,
                        },
                    );
                }
                Err(error) => {
                    // Tried again every reconcile; said once per new reason.
                    if failures.get(name) != Some(&error) {
                        tracing::error!(port = %name, %error, "cannot serve a switch port");
                        failures.insert(name.clone(), error);
                    }
                }
            }
        }
        drop(failures);
        drop(served);
        self.reconcile_tunnels(metadata, me);
    }

    /// Adds port `id` to the switch and serves it: on its socket, or on
    /// its host interface.
    fn serve(&self, id: PortId, meta: &PortMeta, config: PortConfig) -> Result<Endpoint, String> {
        if let Some(interface) = &meta.tap {
            let tap = Tap::create(interface, meta.mac).map_err(|error| error.to_string())?;
            return HostPort::start(&self.fabric, id, config, tap)
                .map(Endpoint::Host)
                .map_err(|error| error.to_string());
        }
        let backend = self
            .fabric
            .add_port(id, config)
            .map_err(|error| error.to_string())?;
        let started = std::fs::create_dir_all(&self.socket_dir)
            .map_err(|error| {
                format!(
                    "cannot create the socket directory {}: {error}",
                    self.socket_dir.display()
                )
            })
            .and_then(|()| {
                NetServer::start(backend, &self.socket(&meta.name)).map_err(|e| e.to_string())
            });
        match started {
            Ok(server) => Ok(Endpoint::Socket(server)),
            Err(error) => {
                let _ = self.fabric.remove_port(id);
                Err(error)
            }
        }
    }

    /// Keeps one tunnel per other node, carrying the segments that both
    /// this node and that one have ports in.
    fn reconcile_tunnels(&self, metadata: &Metadata, me: NodeId) {
        let mine: BTreeSet<&String> = metadata
            .ports
            .values()
            .filter(|port| port.node == me)
            .map(|port| &port.segment)
            .collect();
        let mut shared: BTreeMap<NodeId, BTreeSet<SegmentId>> = BTreeMap::new();
        for port in metadata.ports.values() {
            if port.node == me || !mine.contains(&port.segment) {
                continue;
            }
            if let Some(segment) = metadata.segments.get(&port.segment) {
                shared.entry(port.node).or_default().insert(segment.vni);
            }
        }
        *self.addresses.lock().expect("addresses poisoned") = metadata
            .nodes
            .iter()
            .filter(|(&node, _)| node != me)
            .filter_map(|(&node, record)| {
                let address: std::net::SocketAddr = record.cluster_address.parse().ok()?;
                Some((canonical(address), node))
            })
            .collect();
        let mut tunnels = self.tunnels.lock().expect("tunnels poisoned");
        let gone: Vec<NodeId> = tunnels
            .keys()
            .filter(|node| !metadata.nodes.contains_key(node))
            .copied()
            .collect();
        for node in gone {
            if let Some(end) = tunnels.remove(&node) {
                let _ = self.fabric.remove_port(end.id);
            }
        }
        for &node in metadata.nodes.keys().filter(|&&node| node != me) {
            let segments = shared.remove(&node).unwrap_or_default();
            let end = match tunnels.entry(node) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let tunnel = Arc::new(QuicTunnel {
                        me,
                        peer: node,
                        connection: Mutex::default(),
                        sequence: AtomicU32::new(0),
                    });
                    if let Err(error) = self.fabric.add_tunnel(id, tunnel.clone()) {
                        tracing::error!(node, %error, "cannot add a tunnel");
                        continue;
                    }
                    entry.insert(TunnelEnd {
                        id,
                        tunnel,
                        segments: BTreeSet::new(),
                    })
                }
            };
            if end.segments != segments {
                tracing::info!(node, ?segments, "a tunnel's segments changed");
                if let Err(error) = self.fabric.set_tunnel_segments(end.id, segments.clone()) {
                    tracing::error!(node, %error, "cannot set a tunnel's segments");
                }
                end.segments = segments;
            }
        }
    }

    /// Opens the cluster connection of every tunnel that carries a
    /// segment and has none (or lost it).
    async fn connect_tunnels(&self, metadata: &Metadata, network: &QuicNetwork) {
        let idle: Vec<Arc<QuicTunnel>> = self
            .tunnels
            .lock()
            .expect("tunnels poisoned")
            .values()
            .filter(|end| !end.segments.is_empty() && end.tunnel.connection().is_none())
            .map(|end| end.tunnel.clone())
            .collect();
        for tunnel in idle {
            let Some(record) = metadata.nodes.get(&tunnel.peer) else {
                continue;
            };
            let link = QuicConnection::to(network, tunnel.peer, Member::from(record));
            match tokio::time::timeout(TUNNEL_CONNECT_TIMEOUT, link.connection()).await {
                Ok(Ok(connection)) => {
                    tracing::info!(node = tunnel.peer, "a tunnel is connected");
                    *tunnel
                        .connection
                        .lock()
                        .expect("tunnel connection poisoned") = Some(connection);
                }
                Ok(Err(error)) => {
                    tracing::debug!(node = tunnel.peer, %error, "a tunnel cannot connect yet");
                }
                Err(_) => {
                    tracing::debug!(node = tunnel.peer, "a tunnel's connection timed out");
                }
            }
        }
    }

    /// The tunnel port for frames from `node`.
    fn tunnel_from(&self, node: NodeId) -> Option<PortId> {
        self.tunnels
            .lock()
            .expect("tunnels poisoned")
            .get(&node)
            .map(|end| end.id)
    }

    /// Each tunnel's other node, whether it is connected, its segments and
    /// counters.
    fn tunnel_views(&self) -> Vec<TunnelView> {
        let tunnels = self.tunnels.lock().expect("tunnels poisoned");
        tunnels
            .iter()
            .map(|(&node, end)| {
                let connection = end.tunnel.connection();
                TunnelView {
                    node,
                    connected: connection.is_some(),
                    segments: end.segments.iter().copied().collect(),
                    counters: self.fabric.counters(end.id).as_ref().map(Into::into),
                    path: connection.as_ref().map(PathView::of),
                }
            })
            .collect()
    }

    /// A served port's counters and whether a frontend is connected.
    fn local(&self, name: &str) -> Option<(PortCounters, bool)> {
        let served = self.served.lock().expect("served ports poisoned");
        let port = served.get(name)?;
        Some((self.fabric.counters(port.id)?, port.endpoint.connected()))
    }

    /// Why a port placed here is not served, if it could not be.
    fn failure(&self, name: &str) -> Option<String> {
        self.failures
            .lock()
            .expect("port failures poisoned")
            .get(name)
            .cloned()
    }
}

/// Whether two versions of a port differ in their link at most (which is
/// changed in place).
fn same_but_link(a: &PortMeta, b: &PortMeta) -> bool {
    PortMeta {
        link: b.link,
        ..a.clone()
    } == *b
}

fn port_vlan(vlan: &VlanMode) -> PortVlan {
    match vlan {
        VlanMode::Native => PortVlan::Native,
        VlanMode::Access { vlan } => PortVlan::Access(*vlan),
        VlanMode::Trunk { vlans } => PortVlan::Trunk(vlans.clone()),
    }
}

/// Serves, every [`RECONCILE_INTERVAL`], the ports the metadata places
/// here (changes made through other nodes), and keeps the tunnels to
/// other nodes connected.
pub async fn reconcile_loop(switch: Arc<NodeSwitch>, cluster: Arc<ClusterHandle>) {
    let mut ticker = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        ticker.tick().await;
        refresh(&switch, &cluster).await;
    }
}

/// Reconciles with the metadata as applied here now, on a blocking
/// thread (stopping a port waits for its vhost-user worker, which must not
/// hold up the async runtime), then connects the tunnels that need it.
async fn refresh(switch: &Arc<NodeSwitch>, cluster: &ClusterHandle) {
    let wanted = cluster.runtime.read().await.as_ref().map(|runtime| {
        let (metadata, index) = runtime.metadata_at();
        (metadata, index, runtime.id(), runtime.network().clone())
    });
    let Some((metadata, index, me, network)) = wanted else {
        return;
    };
    let metadata = Arc::new(metadata);
    let reconciled = {
        let switch = switch.clone();
        let metadata = metadata.clone();
        tokio::task::spawn_blocking(move || switch.reconcile(&metadata, index, me)).await
    };
    if let Err(error) = reconciled {
        tracing::error!(%error, "reconciling the switch ports failed");
    }
    switch.connect_tunnels(&metadata, &network).await;
}

/// Takes the frames another node sends on `connection` (datagrams) until
/// it closes.
pub async fn read_tunnel(switch: Arc<NodeSwitch>, connection: quinn::Connection) {
    let mut reassembly = Reassembly::new(vswitch::frame::FRAME_BYTES_MAX_DEFAULT);
    let mut scratch = switch.fabric.scratch();
    let remote = canonical(connection.remote_address());
    // The node this connection comes from, once the metadata names it.
    let mut peer = None;
    let mut run = 0;
    loop {
        // Datagrams already here are taken without waiting (up to a batch,
        // then the task lets others run); the guests they went to are told
        // once, before waiting for more.
        let now = if run < TUNNEL_RX_BATCH {
            ready_now(connection.read_datagram())
        } else {
            None
        };
        let datagram = match now {
            Some(datagram) => {
                run += 1;
                datagram
            }
            None => {
                switch.fabric.signal(&mut scratch);
                if run >= TUNNEL_RX_BATCH {
                    tokio::task::yield_now().await;
                }
                run = 0;
                connection.read_datagram().await
            }
        };
        let Ok(datagram) = datagram else {
            break;
        };
        if peer.is_none() {
            peer = switch.node_at(remote);
        }
        switch.receive(&datagram, peer, &mut reassembly, &mut scratch);
    }
    switch.fabric.signal(&mut scratch);
}

/// Datagrams a tunnel's reader takes in a row before it tells the guests
/// and lets other tasks run.
const TUNNEL_RX_BATCH: usize = 16;

/// Polls `future` once: its output if it is ready now. (Reading a
/// connection's datagram is cancel-safe: a datagram not taken stays
/// queued.)
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// An address as the socket reports it (IPv4 rather than IPv4-mapped).
fn canonical(address: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(address.ip().to_canonical(), address.port())
}

impl NodeSwitch {
    fn node_at(&self, address: std::net::SocketAddr) -> Option<NodeId> {
        self.addresses
            .lock()
            .expect("addresses poisoned")
            .get(&address)
            .copied()
    }

    /// Takes one datagram from the node `peer` (the one at the
    /// connection's address), which must be the sender it names.
    fn receive(
        &self,
        datagram: &[u8],
        peer: Option<NodeId>,
        reassembly: &mut Reassembly,
        scratch: &mut Scratch,
    ) {
        let refuse = |why: &dyn std::fmt::Display| {
            let refused = self.tunnel_refused.fetch_add(1, Ordering::Relaxed);
            // The first few say why; the rest are counted.
            if refused < 10 {
                tracing::warn!(%why, "refused a frame from another node");
            }
        };
        let (header, piece) = match TunnelHeader::decode(datagram) {
            Ok(decoded) => decoded,
            Err(error) => return refuse(&error),
        };
        if peer != Some(header.sender) {
            return refuse(&format!(
                "a frame naming node {} as its sender came on a connection from {}",
                header.sender,
                peer.map_or("an address no node has".to_owned(), |p| format!("node {p}"))
            ));
        }
        let Some(tunnel) = self.tunnel_from(header.sender) else {
            return refuse(&format!("node {} has no tunnel here (yet)", header.sender));
        };
        match reassembly.accept(&header, piece) {
            Ok(Some(frame)) => {
                self.fabric
                    .receive(tunnel, header.segment, header.vlan, frame, scratch)
            }
            Ok(None) => {}
            Err(error) => refuse(&error),
        }
    }
}

#[derive(Clone)]
struct SwitchState {
    switch: Arc<NodeSwitch>,
    cluster: Arc<ClusterHandle>,
}

/// The switch routes.
pub fn router(switch: Arc<NodeSwitch>, cluster: Arc<ClusterHandle>) -> Router {
    Router::new()
        .route("/v1/segments", get(list_segments).post(create_segment))
        .route("/v1/segments/{name}", axum::routing::delete(delete_segment))
        .route("/v1/ports", get(list_ports).post(add_port))
        .route("/v1/ports/{name}", get(show_port).delete(delete_port))
        .route("/v1/ports/{name}/link", axum::routing::put(set_link))
        .route("/v1/tunnels", get(list_tunnels))
        .with_state(SwitchState { switch, cluster })
}

/// Segment and port names follow the rules of volume names.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    match blockstore::store::validate_name(name) {
        Ok(()) => Ok(()),
        Err(blockstore::Error::InvalidName { reason, .. }) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("invalid {what} name {name:?}: {reason}"),
        )),
        Err(error) => Err(ApiError::bad_request(error.to_string())),
    }
}

/// Applies a change made here at once, not at the next tick (the commit
/// waited until this node applied it).
async fn refresh_now(state: &SwitchState) {
    refresh(&state.switch, &state.cluster).await;
}

/// What the switch keeps in the metadata, for errors outside a cluster.
const SWITCH_METADATA: &str = "segments and ports";

/// Commits `command`, or says why not.
async fn commit(cluster: &ClusterHandle, command: Command) -> Result<Metadata, ApiError> {
    crate::cluster_api::commit_metadata(cluster, SWITCH_METADATA, command).await
}

async fn current(cluster: &ClusterHandle) -> Result<(Metadata, NodeId), ApiError> {
    crate::cluster_api::current_metadata(cluster, SWITCH_METADATA).await
}

/// Body of `POST /v1/segments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSegment {
    name: String,
}

async fn create_segment(
    State(state): State<SwitchState>,
    body: Result<Json<CreateSegment>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    check_name("segment", &request.name)?;
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let metadata = commit(
        &state.cluster,
        Command::CreateSegment {
            name: request.name.clone(),
            created_unix,
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(metadata.segments.get(&request.name).cloned()),
    ))
}

async fn list_segments(State(state): State<SwitchState>) -> Result<impl IntoResponse, ApiError> {
    let (metadata, _) = current(&state.cluster).await?;
    let segments: Vec<_> = metadata
        .segments
        .values()
        .map(|segment| {
            let ports = metadata.ports.values().filter(|p| p.segment == segment.name).count();
            serde_json::json!({ "name": segment.name, "vni": segment.vni, "created_unix": segment.created_unix, "ports": ports })
        })
        .collect();
    Ok(Json(segments))
}

async fn delete_segment(
    State(state): State<SwitchState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    commit(&state.cluster, Command::DeleteSegment { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/ports`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AddPort {
    name: String,
    segment: String,
    mac: Mac,
    #[serde(default)]
    vlan: Option<u16>,
    #[serde(default)]
    trunk: Option<Vec<u16>>,
    #[serde(default)]
    packets_per_second: Option<u64>,
    #[serde(default)]
    bytes_per_second: Option<u64>,
    /// The node to serve the port (default: this one); the request is
    /// passed on to it.
    #[serde(default)]
    node: Option<String>,
    /// Port security (default on).
    #[serde(default)]
    port_security: Option<bool>,
    /// A host port: the TAP interface to make on the node.
    #[serde(default)]
    tap: Option<String>,
}

/// A port, with its counters where it is served (this node).
#[derive(Debug, Serialize)]
struct PortView {
    #[serde(flatten)]
    meta: PortMeta,
    /// Its socket, on its node (a guest's port).
    socket: Option<String>,
    qemu_args: Option<Vec<String>>,
    connected: Option<bool>,
    counters: Option<CountersView>,
    /// Why its node cannot serve it, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A tunnel to another node, as `GET /v1/tunnels` shows it.
#[derive(Debug, Serialize)]
struct TunnelView {
    node: NodeId,
    connected: bool,
    /// The VNIs of the segments it carries.
    segments: Vec<SegmentId>,
    counters: Option<CountersView>,
    /// The connection's path, while connected.
    path: Option<PathView>,
}

/// What the QUIC connection under a tunnel knows of its path.
#[derive(Debug, Serialize)]
struct PathView {
    rtt_us: u64,
    congestion_window_bytes: u64,
    congestion_events: u64,
    sent_packets: u64,
    lost_packets: u64,
    /// The largest datagram the path takes now (MTU discovery).
    datagram_bytes_max: Option<usize>,
}

impl PathView {
    fn of(connection: &quinn::Connection) -> PathView {
        let stats = connection.stats();
        PathView {
            rtt_us: u64::try_from(stats.path.rtt.as_micros()).unwrap_or(u64::MAX),
            congestion_window_bytes: stats.path.cwnd,
            congestion_events: stats.path.congestion_events,
            sent_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            datagram_bytes_max: connection.max_datagram_size(),
        }
    }
}

/// Body of `GET /v1/tunnels`.
#[derive(Debug, Serialize)]
struct TunnelsView {
    tunnels: Vec<TunnelView>,
    /// Datagrams from other nodes that were not taken.
    refused_datagrams: u64,
}

async fn list_tunnels(State(state): State<SwitchState>) -> Result<impl IntoResponse, ApiError> {
    current(&state.cluster).await?;
    Ok(Json(TunnelsView {
        tunnels: state.switch.tunnel_views(),
        refused_datagrams: state.switch.tunnel_refused.load(Ordering::Relaxed),
    }))
}

#[derive(Debug, Serialize)]
struct CountersView {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    drops: std::collections::BTreeMap<&'static str, u64>,
}

impl From<&PortCounters> for CountersView {
    fn from(counters: &PortCounters) -> CountersView {
        CountersView {
            rx_packets: counters.rx_packets,
            rx_bytes: counters.rx_bytes,
            tx_packets: counters.tx_packets,
            tx_bytes: counters.tx_bytes,
            drops: counters
                .all_drops()
                .map(|(reason, count)| (reason.name(), count))
                .collect(),
        }
    }
}

fn view(switch: &NodeSwitch, me: NodeId, meta: &PortMeta) -> PortView {
    let here = meta.node == me;
    let local = here.then(|| switch.local(&meta.name)).flatten();
    let socket =
        (here && meta.tap.is_none()).then(|| switch.socket(&meta.name).display().to_string());
    let qemu_args = socket.as_ref().map(|socket| {
        let id = format!("port-{}", meta.name);
        vec![
            "-chardev".into(),
            format!("socket,id={id},path={socket},reconnect=1"),
            "-netdev".into(),
            format!("vhost-user,chardev={id},id={id}"),
            "-device".into(),
            format!("virtio-net-pci,netdev={id},mac={}", meta.mac),
        ]
    });
    PortView {
        meta: meta.clone(),
        socket,
        qemu_args,
        connected: local.as_ref().map(|(_, connected)| *connected),
        counters: local.as_ref().map(|(counters, _)| counters.into()),
        error: here.then(|| switch.failure(&meta.name)).flatten(),
    }
}

async fn add_port(
    State(state): State<SwitchState>,
    body: Result<Json<AddPort>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(mut request) = body?;
    check_name("port", &request.name)?;
    if let Some(target) = request.node.take() {
        let body = serde_json::to_value(&request)
            .map_err(|error| ApiError::bad_request(error.to_string()))?;
        if let Some(answer) = crate::cluster_api::forward(
            &state.cluster,
            &target,
            "POST",
            "/v1/ports".into(),
            Some(body),
        )
        .await?
        {
            return Ok(answer.into_response());
        }
    }
    let vlan = match (request.vlan, request.trunk) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "a port is an access port (vlan) or a trunk, not both".into(),
            ))
        }
        (Some(vlan), None) => VlanMode::Access { vlan },
        (None, Some(vlans)) => VlanMode::Trunk { vlans },
        (None, None) => VlanMode::Native,
    };
    if request.packets_per_second == Some(0) || request.bytes_per_second == Some(0) {
        return Err(ApiError::bad_request(
            "a rate limit must be above 0 (leave it out for no limit)".into(),
        ));
    }
    let me = current(&state.cluster).await?.1;
    let port = PortMeta {
        name: request.name.clone(),
        segment: request.segment,
        node: me,
        mac: request.mac,
        vlan,
        rate: MetaRate {
            packets_per_second: request.packets_per_second,
            bytes_per_second: request.bytes_per_second,
        },
        port_security: request.port_security.unwrap_or(true),
        tap: request.tap,
        link: Link::Up,
    };
    let metadata = commit(&state.cluster, Command::AddPort { port }).await?;
    refresh_now(&state).await;
    // A port this node cannot serve (its interface or socket cannot be
    // made) is taken back out, and the request fails saying why.
    if let Some(failure) = state.switch.failure(&request.name) {
        commit(
            &state.cluster,
            Command::RemovePort {
                name: request.name.clone(),
            },
        )
        .await?;
        refresh_now(&state).await;
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "port_not_served",
            format!("port {:?} cannot be served: {failure}", request.name),
        ));
    }
    let meta = metadata
        .ports
        .get(&request.name)
        .ok_or_else(|| ApiError::bad_request(format!("port {:?} was deleted", request.name)))?;
    Ok((StatusCode::CREATED, Json(view(&state.switch, me, meta))).into_response())
}

async fn list_ports(State(state): State<SwitchState>) -> Result<impl IntoResponse, ApiError> {
    let (metadata, me) = current(&state.cluster).await?;
    let ports: Vec<PortView> = metadata
        .ports
        .values()
        .map(|meta| view(&state.switch, me, meta))
        .collect();
    Ok(Json(ports))
}

async fn show_port(
    State(state): State<SwitchState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (metadata, me) = current(&state.cluster).await?;
    let meta = metadata
        .ports
        .get(&name)
        .ok_or_else(|| port_not_found(&name))?;
    Ok(Json(view(&state.switch, me, meta)))
}

fn port_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "port_not_found",
        format!("no port {name:?}; `fabctl switch port list` shows the ports"),
    )
}

/// Body of `PUT /v1/ports/{name}/link`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLink {
    link: Link,
}

/// Sets a port's link up or down; its guest stays attached. Answers the
/// port as it is then.
async fn set_link(
    State(state): State<SwitchState>,
    Path(name): Path<String>,
    body: Result<Json<SetLink>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    let (metadata, me) = current(&state.cluster).await?;
    if !metadata.ports.contains_key(&name) {
        return Err(port_not_found(&name));
    }
    let metadata = commit(
        &state.cluster,
        Command::SetPortLink {
            name: name.clone(),
            link: request.link,
        },
    )
    .await?;
    refresh_now(&state).await;
    let meta = metadata
        .ports
        .get(&name)
        .ok_or_else(|| ApiError::bad_request(format!("port {name:?} was deleted")))?;
    Ok(Json(view(&state.switch, me, meta)))
}

async fn delete_port(
    State(state): State<SwitchState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    current(&state.cluster).await?;
    commit(&state.cluster, Command::RemovePort { name }).await?;
    refresh_now(&state).await;
    Ok(StatusCode::NO_CONTENT)
}
