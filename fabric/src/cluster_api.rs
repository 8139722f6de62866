//! The cluster half of the API: `/v1/cluster`, `/v1/nodes`, `/v1/pool`.
//! See `docs/api.md`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::api::ApiError;
use crate::cluster::metadata::NodeState;
use crate::cluster::runtime::{
    ClusterError, ClusterRuntime, ClusterSettings, Consistency, JoinGrant, JoinRequest, NodeView,
};

/// This node's cluster membership, if any, and what creating one needs.
#[derive(Debug)]
pub struct ClusterHandle {
    pub data_dir: PathBuf,
    pub settings: ClusterSettings,
    pub runtime: RwLock<Option<ClusterRuntime>>,
    /// This node's replicas and API, served to other nodes on the cluster
    /// transport.
    pub services: crate::cluster::transport::NodeServices,
    /// Timings of the replication drivers of volumes attached here.
    pub replication_settings: crate::replication::ReplicationSettings,
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> ApiError {
        let (status, code) = match &error {
            ClusterError::AlreadyMember(_) => (StatusCode::CONFLICT, "already_member"),
            ClusterError::NoAdvertiseAddress(_) | ClusterError::Settings(_) => {
                (StatusCode::BAD_REQUEST, "bad_settings")
            }
            ClusterError::Rejected(_) => (StatusCode::CONFLICT, "rejected"),
            ClusterError::Write(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_committed"),
            ClusterError::Read(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_current"),
            ClusterError::JoinRefused(_) => (StatusCode::FORBIDDEN, "join_refused"),
            ClusterError::Tls(_) => (StatusCode::BAD_REQUEST, "bad_certificate_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "cluster_error"),
        };
        if status.is_server_error() {
            tracing::error!(%error, "cluster API request failed");
        }
        ApiError::new(status, code, error.to_string())
    }
}

fn not_in_cluster() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_in_cluster",
        "this node is not in a cluster; `fabctl cluster init` creates one".into(),
    )
}

/// Query of the metadata reads: `?consistency=current` (the default) or
/// `?consistency=local`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    #[serde(default)]
    pub consistency: Consistency,
}

/// This node's runtime once its metadata is as current as `params` asks.
pub async fn read_runtime(
    handle: &ClusterHandle,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<RwLockReadGuard<'_, ClusterRuntime>, ApiError> {
    let Query(params) = params?;
    let runtime = RwLockReadGuard::try_map(handle.runtime.read().await, Option::as_ref)
        .map_err(|_| not_in_cluster())?;
    runtime.read_barrier(params.consistency).await?;
    Ok(runtime)
}

/// The cluster routes.
pub fn router(handle: Arc<ClusterHandle>) -> Router {
    Router::new()
        .route("/v1/cluster", get(status))
        .route("/v1/cluster/init", post(init))
        .route("/v1/cluster/tokens", post(token))
        .route("/v1/cluster/join-request", post(join_request))
        .route("/v1/cluster/join-prepare", post(join_prepare))
        .route("/v1/cluster/join-complete", post(join_complete))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}", get(node).delete(remove_node))
        .route(
            "/v1/nodes/{id}/labels/{key}",
            axum::routing::put(set_label).delete(remove_label),
        )
        .route("/v1/nodes/{id}/ping", post(ping))
        .route("/v1/cluster/faults", axum::routing::put(set_faults))
        .route("/v1/pool", get(pool))
        .with_state(handle)
}

async fn status(State(handle): State<Arc<ClusterHandle>>) -> Result<impl IntoResponse, ApiError> {
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    Ok(Json(runtime.status()))
}

async fn init(State(handle): State<Arc<ClusterHandle>>) -> Result<impl IntoResponse, ApiError> {
    let mut slot = handle.runtime.write().await;
    if slot.is_some() {
        return Err(ClusterError::AlreadyMember(handle.data_dir.join("cluster/node.json")).into());
    }
    let runtime =
        ClusterRuntime::init(&handle.data_dir, &handle.settings, handle.services.clone()).await?;
    let status = runtime.status();
    *slot = Some(runtime);
    Ok((StatusCode::CREATED, Json(status)))
}

async fn token(State(handle): State<Arc<ClusterHandle>>) -> Result<impl IntoResponse, ApiError> {
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    let (token, expires_unix) = runtime.issue_token().await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "token": token, "expires_unix": expires_unix })),
    ))
}

async fn join_request(
    State(handle): State<Arc<ClusterHandle>>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    tracing::info!(name = %request.name, address = %request.address, "join requested");
    let grant = runtime
        .admit(request)
        .await
        .inspect_err(|error| tracing::warn!(%error, "join refused"))?;
    Ok(Json(grant))
}

async fn join_prepare(
    State(handle): State<Arc<ClusterHandle>>,
) -> Result<impl IntoResponse, ApiError> {
    if handle.runtime.read().await.is_some() {
        return Err(ClusterError::AlreadyMember(handle.data_dir.join("cluster/node.json")).into());
    }
    Ok(Json(ClusterRuntime::prepare_join(
        &handle.data_dir,
        &handle.settings,
    )?))
}

/// Body of `POST /v1/cluster/join-complete`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinComplete {
    token: String,
    grant: JoinGrant,
}

async fn join_complete(
    State(handle): State<Arc<ClusterHandle>>,
    body: Result<Json<JoinComplete>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    let mut slot = handle.runtime.write().await;
    if slot.is_some() {
        return Err(ClusterError::AlreadyMember(handle.data_dir.join("cluster/node.json")).into());
    }
    let runtime = ClusterRuntime::complete_join(
        &handle.data_dir,
        &handle.settings,
        handle.services.clone(),
        &request.token,
        request.grant,
    )
    .await?;
    let status = runtime.status();
    *slot = Some(runtime);
    Ok(Json(status))
}

async fn nodes(
    State(handle): State<Arc<ClusterHandle>>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let runtime = read_runtime(&handle, params).await?;
    Ok(Json(runtime.nodes()))
}

/// The node named by `id` (its id or its name).
pub(crate) fn find_node(runtime: &ClusterRuntime, id: &str) -> Result<NodeView, ApiError> {
    runtime
        .nodes()
        .into_iter()
        .find(|node| node.record.id.to_string() == id || node.record.name == id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "node_not_found",
                format!("no node with id or name {id:?}; `fabctl node list` shows the nodes"),
            )
        })
}

async fn node(
    State(handle): State<Arc<ClusterHandle>>,
    Path(id): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let runtime = read_runtime(&handle, params).await?;
    Ok(Json(find_node(&runtime, &id)?))
}

async fn remove_node(
    State(handle): State<Arc<ClusterHandle>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    let node = find_node(runtime, &id)?;
    runtime.remove_node(node.record.id).await?;
    tracing::info!(node = node.record.id, name = %node.record.name, "node removed from the cluster");
    Ok(Json(serde_json::json!({ "removed": node.record.id })))
}

/// Longest label key or value.
const LABEL_BYTES_MAX: usize = 63;

fn check_label(what: &str, text: &str) -> Result<(), ApiError> {
    let ok = !text.is_empty()
        && text.len() <= LABEL_BYTES_MAX
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_label",
            format!("label {what} {text:?} must be 1 to 63 characters of letters, digits, '.', '_', '-', '/'"),
        ))
    }
}

/// Body of `PUT /v1/nodes/{id}/labels/{key}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelValue {
    value: String,
}

async fn set_label(
    State(handle): State<Arc<ClusterHandle>>,
    Path((id, key)): Path<(String, String)>,
    body: Result<Json<LabelValue>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(LabelValue { value }) = body?;
    check_label("key", &key)?;
    check_label("value", &value)?;
    label(handle, id, key, Some(value)).await
}

async fn remove_label(
    State(handle): State<Arc<ClusterHandle>>,
    Path((id, key)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    check_label("key", &key)?;
    label(handle, id, key, None).await
}

async fn label(
    handle: Arc<ClusterHandle>,
    id: String,
    key: String,
    value: Option<String>,
) -> Result<Json<NodeView>, ApiError> {
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    let node = find_node(runtime, &id)?;
    let command = crate::cluster::metadata::Command::SetLabel {
        id: node.record.id,
        key,
        value,
    };
    match runtime.write(command).await? {
        crate::cluster::metadata::Response::Applied => {}
        crate::cluster::metadata::Response::Rejected { reason } => {
            return Err(ClusterError::Rejected(reason).into())
        }
    }
    // Read back from this node: it applied the change if it is the leader,
    // and otherwise soon will.
    Ok(Json(find_node(runtime, &id).unwrap_or(node)))
}

/// Runs an API request on the node `target` names (id or name) if that is
/// another node, and returns its answer; `None` if `target` is this node.
pub async fn forward(
    handle: &ClusterHandle,
    target: &str,
    method: &str,
    path: String,
    body: Option<serde_json::Value>,
) -> Result<Option<axum::response::Response>, ApiError> {
    let link = {
        let runtime = handle.runtime.read().await;
        let runtime = runtime.as_ref().ok_or_else(|| {
            ApiError::bad_request("--node needs a cluster: this node is in none".into())
        })?;
        let node = find_node(runtime, target)?;
        if node.record.id == runtime.id() {
            return Ok(None);
        }
        crate::cluster::transport::QuicConnection::to(
            runtime.network(),
            node.record.id,
            crate::cluster::raft::Member::from(&node.record),
        )
    };
    let call = crate::cluster::transport::ApiCall {
        method: method.into(),
        path,
        body,
    };
    let answer: Result<crate::cluster::transport::ApiAnswer, String> = link
        .request(crate::cluster::transport::KIND_API, &call)
        .await
        .map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "node_unreachable",
                format!("cannot reach node {target:?}: {error}"),
            )
        })?;
    let answer = answer.map_err(|reason| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "forward_failed",
            format!("node {target:?} could not run the request: {reason}"),
        )
    })?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok(Some(match answer.body {
        serde_json::Value::String(text) if answer.text => (status, text).into_response(),
        serde_json::Value::Null if status == StatusCode::NO_CONTENT => status.into_response(),
        body => (status, Json(body)).into_response(),
    }))
}

/// Body of `POST /v1/nodes/{id}/ping`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PingSpec {
    /// Round trips to time.
    #[serde(default = "PingSpec::default_count")]
    count: usize,
    /// Bytes sent per round trip (the answer is 4 bytes).
    #[serde(default = "PingSpec::default_bytes")]
    bytes: usize,
}

impl PingSpec {
    const COUNT_MAX: usize = 100_000;

    fn default_count() -> usize {
        100
    }

    fn default_bytes() -> usize {
        4096
    }
}

/// Round-trip times of a ping, in microseconds.
#[derive(Debug, Serialize)]
struct PingView {
    node: crate::cluster::metadata::NodeId,
    name: String,
    count: usize,
    bytes: usize,
    min_us: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    mean_us: f64,
}

/// Times round trips to a node over the cluster transport, on the same
/// kind of QUIC stream replication uses.
async fn ping(
    State(handle): State<Arc<ClusterHandle>>,
    Path(id): Path<String>,
    body: Result<Json<PingSpec>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(spec) = body?;
    if !(1..=PingSpec::COUNT_MAX).contains(&spec.count) {
        return Err(ApiError::bad_request(format!(
            "count {} is outside 1..={}",
            spec.count,
            PingSpec::COUNT_MAX
        )));
    }
    let bytes_max = crate::cluster::transport::PING_BYTES_MAX;
    if spec.bytes > bytes_max {
        return Err(ApiError::bad_request(format!(
            "bytes {} is over the {bytes_max}-byte limit",
            spec.bytes
        )));
    }
    let (node, link) = {
        let runtime = handle.runtime.read().await;
        let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
        let node = find_node(runtime, &id)?;
        let member = crate::cluster::raft::Member::from(&node.record);
        let link = crate::cluster::transport::QuicConnection::to(
            runtime.network(),
            node.record.id,
            member,
        );
        (node, link)
    };
    let mut times = link.ping(spec.count, spec.bytes).await.map_err(|error| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!("cannot ping node {:?}: {error}", node.record.name),
        )
    })?;
    times.sort_unstable();
    let micros = |d: &std::time::Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| micros(&times[((times.len() - 1) as f64 * q).round() as usize]);
    let mean = times.iter().map(micros).sum::<f64>() / times.len() as f64;
    Ok(Json(PingView {
        node: node.record.id,
        name: node.record.name,
        count: spec.count,
        bytes: spec.bytes,
        min_us: at(0.0),
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: at(1.0),
        mean_us: mean,
    }))
}

/// Body of `PUT /v1/cluster/faults`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    /// Peer cluster addresses to cut this node off from.
    blocked: Vec<std::net::SocketAddr>,
}

async fn set_faults(
    State(handle): State<Arc<ClusterHandle>>,
    body: Result<Json<FaultSpec>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(spec) = body?;
    if !handle.settings.fault_injection {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "fault_injection_disabled",
            "fault injection is off; it is for tests: set `[cluster] fault_injection = true`"
                .into(),
        ));
    }
    let runtime = handle.runtime.read().await;
    let runtime = runtime.as_ref().ok_or_else(not_in_cluster)?;
    runtime.cut_links(spec.blocked.clone());
    Ok(Json(serde_json::json!({ "blocked": spec.blocked })))
}

/// Pooled totals over the nodes that are up.
#[derive(Debug, Serialize)]
struct PoolTotals {
    nodes: usize,
    nodes_up: usize,
    cpu_cores: u64,
    memory_bytes: u64,
    disk_bytes: u64,
    disk_free_bytes: u64,
}

#[derive(Debug, Serialize)]
struct PoolView {
    totals: PoolTotals,
    nodes: Vec<NodeView>,
}

async fn pool(
    State(handle): State<Arc<ClusterHandle>>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let runtime = read_runtime(&handle, params).await?;
    let nodes = runtime.nodes();
    let up: Vec<&NodeView> = nodes
        .iter()
        .filter(|node| node.state == NodeState::Up)
        .collect();
    let totals = PoolTotals {
        nodes: nodes.len(),
        nodes_up: up.len(),
        cpu_cores: up
            .iter()
            .map(|n| u64::from(n.record.resources.cpu_cores))
            .sum(),
        memory_bytes: up.iter().map(|n| n.record.resources.memory_bytes).sum(),
        disk_bytes: up.iter().map(|n| n.record.resources.disk_bytes).sum(),
        disk_free_bytes: up.iter().map(|n| n.record.resources.disk_free_bytes).sum(),
    };
    Ok(Json(PoolView { totals, nodes }))
}

/// The error for a request about something that lives in the cluster
/// metadata (`what`), on a node in no cluster.
pub(crate) fn outside_cluster(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_in_cluster",
        format!(
            "{what} live in the cluster metadata; `fabctl cluster init` makes a one-node cluster"
        ),
    )
}

/// The metadata as of now (a read-index read) and this node's id.
pub(crate) async fn current_metadata(
    cluster: &ClusterHandle,
    what: &str,
) -> Result<
    (
        crate::cluster::metadata::Metadata,
        crate::cluster::metadata::NodeId,
    ),
    ApiError,
> {
    let guard = cluster.runtime.read().await;
    let runtime = guard.as_ref().ok_or_else(|| outside_cluster(what))?;
    runtime
        .read_barrier(crate::cluster::runtime::Consistency::Current)
        .await?;
    Ok((runtime.metadata(), runtime.id()))
}

/// Commits `command` and returns the metadata after it, or says why not.
pub(crate) async fn commit_metadata(
    cluster: &ClusterHandle,
    what: &str,
    command: crate::cluster::metadata::Command,
) -> Result<crate::cluster::metadata::Metadata, ApiError> {
    let guard = cluster.runtime.read().await;
    let runtime = guard.as_ref().ok_or_else(|| outside_cluster(what))?;
    match runtime.write_retrying(command).await? {
        crate::cluster::metadata::Response::Applied => {}
        crate::cluster::metadata::Response::Rejected { reason } => {
            return Err(ClusterError::Rejected(reason).into())
        }
    }
    runtime
        .read_barrier(crate::cluster::runtime::Consistency::Current)
        .await?;
    Ok(runtime.metadata())
}
