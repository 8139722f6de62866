//! The node's switch: serves the vhost-user-net ports the cluster
//! metadata places on this node, and the `/v1/segments` and `/v1/ports`
//! routes that define them (see `docs/api.md`).
//!
//! Segments and ports live in the metadata; this node serves the ports
//! whose `node` is this node. [`NodeSwitch::reconcile`] makes the served
//! set match the metadata: after each port change made here, and every
//! second for changes made elsewhere.

use std::collections::HashMap;
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
use vswitch::port::Fabric;
use vswitch::server::NetServer;
use vswitch::switch::{PortConfig, PortCounters, PortId, RateLimit, Switch, VlanMode as PortVlan};

use crate::api::ApiError;
use crate::cluster::metadata::{
    Command, Mac, Metadata, NodeId, PortMeta, RateLimit as MetaRate, Response, VlanMode,
};
use crate::cluster::runtime::{ClusterError, Consistency};
use crate::cluster_api::ClusterHandle;

/// How often the served ports are compared with the metadata.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A port served here.
#[derive(Debug)]
struct Served {
    id: PortId,
    meta: PortMeta,
    server: NetServer,
}

/// This node's switch and the ports it serves.
#[derive(Debug)]
pub struct NodeSwitch {
    fabric: Arc<Fabric>,
    socket_dir: PathBuf,
    served: Mutex<HashMap<String, Served>>,
    next_id: AtomicU32,
}

impl NodeSwitch {
    pub fn new(socket_dir: PathBuf) -> Arc<NodeSwitch> {
        let switch = Switch::default();
        Arc::new(NodeSwitch {
            fabric: Fabric::new(switch, vswitch::frame::FRAME_BYTES_MAX_DEFAULT),
            socket_dir,
            served: Mutex::default(),
            next_id: AtomicU32::new(1),
        })
    }

    /// The socket a port is served on.
    pub fn socket(&self, port: &str) -> PathBuf {
        self.socket_dir.join(format!("port-{port}.sock"))
    }

    /// Serves the ports `metadata` places on node `me` and stops the others.
    pub fn reconcile(&self, metadata: &Metadata, me: NodeId) {
        let mut served = self.served.lock().expect("served ports poisoned");
        let wanted: HashMap<&String, &PortMeta> = metadata
            .ports
            .iter()
            .filter(|(_, port)| port.node == me)
            .collect();
        let gone: Vec<String> = served
            .iter()
            .filter(|(name, port)| wanted.get(name).is_none_or(|meta| **meta != port.meta))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(port) = served.remove(&name) {
                drop(port.server);
                let _ = self.fabric.remove_port(port.id);
                tracing::info!(port = %name, "stopped serving a switch port");
            }
        }
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
                vlan: port_vlan(&meta.vlan),
                rate: RateLimit {
                    packets_per_second: meta.rate.packets_per_second,
                    bytes_per_second: meta.rate.bytes_per_second,
                },
            };
            let backend = match self.fabric.add_port(id, config) {
                Ok(backend) => backend,
                Err(error) => {
                    tracing::error!(port = %name, %error, "cannot add a switch port");
                    continue;
                }
            };
            if let Err(error) = std::fs::create_dir_all(&self.socket_dir) {
                tracing::error!(dir = %self.socket_dir.display(), %error, "cannot create the socket directory");
            }
            match NetServer::start(backend, &self.socket(name)) {
                Ok(server) => {
                    tracing::info!(port = %name, socket = %server.path().display(), "serving a switch port");
                    served.insert(
                        name.clone(),
                        Served {
                            id,
                            meta: meta.clone(),
                            server,
                        },
                    );
                }
                Err(error) => {
                    tracing::error!(port = %name, %error, "cannot serve a switch port");
                    let _ = self.fabric.remove_port(id);
                }
            }
        }
    }

    /// A served port's counters and whether a frontend is connected.
    fn local(&self, name: &str) -> Option<(PortCounters, bool)> {
        let served = self.served.lock().expect("served ports poisoned");
        let port = served.get(name)?;
        Some((self.fabric.counters(port.id)?, port.server.connected()))
    }
}

fn port_vlan(vlan: &VlanMode) -> PortVlan {
    match vlan {
        VlanMode::Native => PortVlan::Native,
        VlanMode::Access { vlan } => PortVlan::Access(*vlan),
        VlanMode::Trunk { vlans } => PortVlan::Trunk(vlans.clone()),
    }
}

/// Serves, every [`RECONCILE_INTERVAL`], the ports the metadata places
/// here (changes made through other nodes).
pub async fn reconcile_loop(switch: Arc<NodeSwitch>, cluster: Arc<ClusterHandle>) {
    let mut ticker = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        ticker.tick().await;
        let wanted = cluster
            .runtime
            .read()
            .await
            .as_ref()
            .map(|runtime| (runtime.metadata(), runtime.id()));
        if let Some((metadata, me)) = wanted {
            reconcile_off_runtime(&switch, metadata, me).await;
        }
    }
}

/// Reconciles on a blocking thread: stopping a port waits for its
/// vhost-user worker, which must not hold up the async runtime.
async fn reconcile_off_runtime(switch: &Arc<NodeSwitch>, metadata: Metadata, me: NodeId) {
    let switch = switch.clone();
    if let Err(error) = tokio::task::spawn_blocking(move || switch.reconcile(&metadata, me)).await {
        tracing::error!(%error, "reconciling the switch ports failed");
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

/// Commits `command`, or says why not.
async fn commit(cluster: &ClusterHandle, command: Command) -> Result<Metadata, ApiError> {
    let guard = cluster.runtime.read().await;
    let runtime = guard.as_ref().ok_or_else(not_in_cluster)?;
    match runtime.write_retrying(command).await? {
        Response::Applied => {}
        Response::Rejected { reason } => return Err(ClusterError::Rejected(reason).into()),
    }
    runtime.read_barrier(Consistency::Current).await?;
    Ok(runtime.metadata())
}

fn not_in_cluster() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_in_cluster",
        "segments and ports live in the cluster metadata; `fabctl cluster init` makes a one-node cluster".into(),
    )
}

async fn current(cluster: &ClusterHandle) -> Result<(Metadata, NodeId), ApiError> {
    let guard = cluster.runtime.read().await;
    let runtime = guard.as_ref().ok_or_else(not_in_cluster)?;
    runtime.read_barrier(Consistency::Current).await?;
    Ok((runtime.metadata(), runtime.id()))
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
#[derive(Debug, Deserialize)]
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
}

/// A port, with its counters where it is served (this node).
#[derive(Debug, Serialize)]
struct PortView {
    #[serde(flatten)]
    meta: PortMeta,
    /// Its socket, on its node.
    socket: Option<String>,
    qemu_args: Option<Vec<String>>,
    connected: Option<bool>,
    counters: Option<CountersView>,
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
    let socket = here.then(|| switch.socket(&meta.name).display().to_string());
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
    }
}

async fn add_port(
    State(state): State<SwitchState>,
    body: Result<Json<AddPort>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    check_name("port", &request.name)?;
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
    };
    let metadata = commit(&state.cluster, Command::AddPort { port }).await?;
    reconcile_off_runtime(&state.switch, metadata.clone(), me).await;
    let meta = metadata
        .ports
        .get(&request.name)
        .ok_or_else(|| ApiError::bad_request(format!("port {:?} was deleted", request.name)))?;
    Ok((StatusCode::CREATED, Json(view(&state.switch, me, meta))))
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
    let meta = metadata.ports.get(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "port_not_found",
            format!("no port {name:?}; `fabctl switch port list` shows the ports"),
        )
    })?;
    Ok(Json(view(&state.switch, me, meta)))
}

async fn delete_port(
    State(state): State<SwitchState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (_, me) = current(&state.cluster).await?;
    let metadata = commit(&state.cluster, Command::RemovePort { name }).await?;
    reconcile_off_runtime(&state.switch, metadata, me).await;
    Ok(StatusCode::NO_CONTENT)
}
