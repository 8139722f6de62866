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
    /// This node's replicas, served to frontends on the cluster transport.
    pub replication: Option<crate::replication::service::ReplicaService>,
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
    let runtime = ClusterRuntime::init(
        &handle.data_dir,
        &handle.settings,
        handle.replication.clone(),
    )
    .await?;
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
        handle.replication.clone(),
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
