//! The HTTP/JSON API that `fabctl` uses. See `docs/api.md`.
//!
//! Every error is a JSON body `{"error": {"code": ..., "message": ...}}`
//! with a status that says whose fault it was.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::cluster::metadata::VolumeMeta;
use crate::cluster::runtime::Consistency;
use crate::cluster_api::ClusterHandle;
use crate::node::{Node, NodeError};

/// Largest request body accepted.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with its status, stable code and message.
    pub fn new(status: StatusCode, code: &'static str, message: String) -> ApiError {
        ApiError {
            status,
            code,
            message,
        }
    }

    pub(crate) fn bad_request(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> ApiError {
        use blockstore::Error as E;
        let (status, code) = match &error {
            NodeError::Store(E::NoSuchVolume(_)) => (StatusCode::NOT_FOUND, "volume_not_found"),
            NodeError::Store(E::VolumeExists(_)) => (StatusCode::CONFLICT, "volume_exists"),
            NodeError::Store(E::InvalidName { .. }) => (StatusCode::BAD_REQUEST, "invalid_name"),
            NodeError::Store(E::InvalidSize { .. }) => (StatusCode::BAD_REQUEST, "invalid_size"),
            NodeError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            NodeError::Attached(_) => (StatusCode::CONFLICT, "volume_attached"),
            NodeError::InUse(_) => (StatusCode::CONFLICT, "volume_in_use"),
            NodeError::NotAttached(_) => (StatusCode::CONFLICT, "volume_not_attached"),
            NodeError::Serve { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "serve_failed"),
        };
        if status.is_server_error() {
            tracing::error!(%error, "API request failed");
        }
        ApiError {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("invalid query: {}", rejection.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        ApiError::bad_request(format!("invalid request body: {}", rejection.body_text()))
    }
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    /// Replicas to place (in a cluster); 1 if absent.
    #[serde(default)]
    pub replicas: Option<usize>,
    /// In-sync replicas a write needs, at least; the default for the
    /// replica count if absent.
    #[serde(default)]
    pub min_replicas: Option<u32>,
}

/// Body of `POST /v1/volumes/{name}/attach`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachVolume {
    /// Take a replicated volume over from a frontend that is up.
    pub force: bool,
    /// Attach on this node (id or name) rather than the one asked; the
    /// request is forwarded to it over the cluster transport.
    pub node: Option<String>,
}

/// What the volume routes need: the node, and its cluster membership.
#[derive(Debug, Clone)]
struct ApiState {
    node: Arc<Node>,
    cluster: Arc<ClusterHandle>,
}

impl axum::extract::FromRef<ApiState> for Arc<Node> {
    fn from_ref(state: &ApiState) -> Arc<Node> {
        state.node.clone()
    }
}

impl axum::extract::FromRef<ApiState> for Arc<ClusterHandle> {
    fn from_ref(state: &ApiState) -> Arc<ClusterHandle> {
        state.cluster.clone()
    }
}

/// Body of `POST /v1/volumes/{name}/replicas/{node}/replace`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaceReplica {
    /// The node to put the new replica on (id or name); placement picks
    /// one if absent.
    pub to: Option<String>,
}

/// Body of `POST /v1/volumes/{name}/detach`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetachVolume {
    pub force: bool,
}

/// Runs blocking node work off the async executor.
async fn blocking<T: Send + 'static>(
    node: &Arc<Node>,
    work: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || work(&node))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("request handler failed: {e}"),
        })?
        .map_err(ApiError::from)
}

/// The API's routes.
pub fn router(node: Arc<Node>, cluster: Arc<ClusterHandle>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/scrub", post(scrub_volume))
        .route(
            "/v1/volumes/{name}/replicas/{node}/replace",
            post(replace_replica),
        )
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(ApiState { node, cluster })
}

async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "no_such_endpoint",
        message: "no such API endpoint; see docs/api.md".into(),
    }
}

async fn list_volumes(State(node): State<Arc<Node>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(&node, |node| node.list()).await?))
}

async fn create_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    let replicas = request.replicas.unwrap_or(1);
    if let Some(min) = request.min_replicas {
        if min == 0 || min as usize > replicas {
            return Err(ApiError::bad_request(format!(
                "min_replicas {min} must be 1 to the replica count ({replicas})"
            )));
        }
    }
    if replicas > 1 && request.size_bytes > crate::replication::REPLICATED_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "a replicated volume holds at most {} bytes (8 TiB)",
            crate::replication::REPLICATED_BYTES_MAX
        )));
    }
    let runtime = cluster.runtime.read().await;
    // In a cluster, the name must be free cluster-wide and the replicas
    // are placed first; the volume is then created here and recorded
    // with its placement.
    let placement = match runtime.as_ref() {
        Some(runtime) => Some(runtime.place_volume(&request.name, request.size_bytes, replicas)?),
        None if replicas != 1 => {
            return Err(ApiError::bad_request(
                "a node outside a cluster holds volumes with exactly one replica".into(),
            ))
        }
        None => None,
    };
    let (name, size) = (request.name.clone(), request.size_bytes);
    let view = blocking(&node, move |node| node.create(&name, size)).await?;
    if let (Some(runtime), Some(replicas)) = (runtime.as_ref(), placement) {
        let mut volume = VolumeMeta::new(
            view.id.clone(),
            view.name.clone(),
            view.size_bytes,
            replicas,
            view.created_unix,
        );
        if let Some(min) = request.min_replicas {
            volume.min_replicas = min;
        }
        if let Err(error) = runtime.record_volume(volume).await {
            let name = view.name.clone();
            let _ = blocking(&node, move |node| node.delete(&name)).await;
            return Err(error.into());
        }
        let name = view.name.clone();
        blocking(&node, move |node| node.set_cluster(&name)).await?;
    }
    Ok((StatusCode::CREATED, Json(view)))
}

async fn show_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path(name): Path<String>,
    params: Result<Query<crate::cluster_api::ReadParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    // The driver first: an attachment registers its server before its
    // driver, so a volume shown with a driver is shown with its attachment.
    let driver = node.driver(&name);
    let lookup = name.clone();
    let view = blocking(&node, move |node| node.show(&lookup)).await?;
    let mut value = serde_json::to_value(view).expect("a volume view always serializes");
    // In a cluster, the placement recorded in the cluster metadata.
    if cluster.runtime.read().await.is_some() {
        let runtime = crate::cluster_api::read_runtime(&cluster, params).await?;
        if let Some(volume) = runtime.metadata().volumes.get(&name) {
            value["placement"] = json!(volume.replicas);
            if volume.replicas.len() > 1 {
                let mut replication = json!({
                    "generation": volume.generation,
                    "frontend": volume.frontend,
                    "stale": volume.stale,
                    "min_replicas": volume.min_replicas,
                });
                if let Some(driver) = &driver {
                    let status = driver.status();
                    let lower = |text: String| text.to_lowercase();
                    replication["phase"] = json!(lower(format!("{:?}", status.phase)));
                    replication["states"] = json!(status
                        .states
                        .iter()
                        .map(|state| lower(format!("{state:?}")))
                        .collect::<Vec<_>>());
                    replication["dirty_regions"] = json!(status.dirty);
                    replication["region_bytes"] = json!(crate::replication::REGION_BYTES);
                    if let Some(scrub) = status.scrub {
                        replication["scrub"] = json!(scrub);
                    }
                }
                value["replication"] = replication;
            }
        }
    }
    Ok(Json(value))
}

/// After a restart: attaches again the replicated volumes the cluster
/// metadata says this node serves (each with a new generation), so guests
/// that reconnect to their sockets find them. Waits for the cluster to
/// answer a current read first.
pub async fn resume_replicated(node: Arc<Node>, cluster: Arc<ClusterHandle>) {
    let mut tries = 0u32;
    let volumes = loop {
        {
            let guard = cluster.runtime.read().await;
            let Some(runtime) = guard.as_ref() else {
                return;
            };
            match runtime.read_barrier(Consistency::Current).await {
                Ok(()) => {
                    let me = runtime.id();
                    break runtime
                        .metadata()
                        .volumes
                        .values()
                        .filter(|volume| volume.replicas.len() > 1 && volume.frontend == Some(me))
                        .cloned()
                        .collect::<Vec<_>>();
                }
                Err(error) if tries % 20 == 0 => {
                    tracing::info!(%error, "waiting for the cluster to attach replicated volumes again");
                }
                Err(_) => {}
            }
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    for volume in volumes {
        let name = volume.name.clone();
        match attach_replicated(node.clone(), cluster.clone(), volume, false).await {
            Ok(_) => {
                tracing::info!(volume = %name, "replicated volume attached again after a restart")
            }
            Err(error) => tracing::warn!(
                volume = %name, error = %error.message,
                "cannot attach a replicated volume again after a restart"
            ),
        }
    }
}

/// Commits a replication driver's change to its volume's replicas.
async fn record_replica_change(
    runtime: &crate::cluster::runtime::ClusterRuntime,
    name: String,
    generation: u64,
    request: crate::replication::driver::MetaRequest,
) -> crate::replication::driver::MetaReply {
    use crate::cluster::metadata::{Command, NodeId, Response};
    use crate::replication::driver::{MetaReply, MetaRequest};
    use blockstore::replication::frontend::MetaOutcome;

    let command = match request {
        MetaRequest::MarkStale { node } => Command::MarkStale {
            name,
            generation,
            node,
        },
        MetaRequest::MarkInSync { node } => Command::MarkInSync {
            name,
            generation,
            node,
        },
        MetaRequest::Replace { old, to } => {
            let new = match to.map_or_else(|| runtime.place_replacement(&name), Ok) {
                Ok(new) => new,
                Err(error) => {
                    tracing::warn!(%error, volume = %name, old, "cannot replace the replica");
                    return MetaReply::Outcome(MetaOutcome::Refused);
                }
            };
            Command::ReplaceReplica {
                name,
                generation,
                old,
                new,
            }
        }
    };
    let retry = || async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        MetaReply::Outcome(MetaOutcome::Retry)
    };
    // The replica now on `new`, reached at its recorded address; a node
    // removed from the cluster in between leaves the slot to a later
    // replacement.
    let replaced = |new: NodeId| match runtime.metadata().nodes.get(&new) {
        Some(record) => MetaReply::Replaced {
            node: new,
            member: record.into(),
        },
        None => MetaReply::Outcome(MetaOutcome::Committed),
    };
    match runtime.write(command.clone()).await {
        Ok(Response::Applied) => {
            tracing::info!(?command, "replica change recorded");
            match command {
                Command::ReplaceReplica { new, .. } => replaced(new),
                _ => MetaReply::Outcome(MetaOutcome::Committed),
            }
        }
        Ok(Response::Rejected { reason })
            if reason.starts_with("fenced") || reason.contains("does not exist") =>
        {
            tracing::warn!(%reason, "this attachment is fenced");
            MetaReply::Outcome(MetaOutcome::Fenced)
        }
        Ok(Response::Rejected { reason }) if matches!(command, Command::ReplaceReplica { .. }) => {
            // A retry of a replacement whose first try committed unseen (a
            // timeout) is refused: the metadata shows whether it happened.
            if let Command::ReplaceReplica { name, old, new, .. } = &command {
                let placed = runtime
                    .metadata()
                    .volumes
                    .get(name)
                    .map(|volume| volume.replicas.clone())
                    .unwrap_or_default();
                if placed.contains(new) && !placed.contains(old) {
                    return replaced(*new);
                }
            }
            tracing::warn!(%reason, ?command, "replica replacement refused");
            MetaReply::Outcome(MetaOutcome::Refused)
        }
        Ok(Response::Rejected { reason }) => {
            tracing::warn!(%reason, ?command, "replica state change refused; retrying");
            retry().await
        }
        Err(error) => {
            tracing::warn!(%error, ?command, "replica change not committed; retrying");
            retry().await
        }
    }
}

/// Replaces the replica of a volume on one node by a full copy on another
/// (given, or picked by placement). Attached here: the replication driver
/// does it and resyncs the new copy at once. Not attached: the metadata
/// records it, and the next attachment copies to the new node.
async fn replace_replica(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path((name, old)): Path<(String, String)>,
    body: Result<Json<ReplaceReplica>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    use crate::cluster::metadata::{Command, NodeState, Response};

    let to = match body {
        Ok(Json(request)) => request.to,
        Err(JsonRejection::MissingJsonContentType(_)) => None,
        Err(rejection) => return Err(rejection.into()),
    };
    let guard = cluster.runtime.read().await;
    let runtime = guard
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("not in a cluster".into()))?;
    runtime.read_barrier(Consistency::Current).await?;
    let volume = runtime
        .metadata()
        .volumes
        .get(&name)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "volume_not_found",
                format!("no volume named {name:?} in the cluster"),
            )
        })?;
    if volume.replicas.len() < 2 {
        return Err(ApiError::bad_request(format!(
            "volume {name:?} has one replica: there is no copy to make a new one from"
        )));
    }
    // The old node may have left the cluster: its id is enough.
    let old = match old.parse::<u64>() {
        Ok(id) if volume.replicas.contains(&id) => id,
        _ => crate::cluster_api::find_node(runtime, &old)?.record.id,
    };
    if !volume.replicas.contains(&old) {
        return Err(ApiError::bad_request(format!(
            "node {old} holds no replica of {name:?} (its replicas are on nodes {:?})",
            volume.replicas
        )));
    }
    let to = match to {
        Some(to) => {
            let view = crate::cluster_api::find_node(runtime, &to)?;
            if volume.replicas.contains(&view.record.id) {
                return Err(ApiError::bad_request(format!(
                    "node {} already holds a replica of {name:?}",
                    view.record.id
                )));
            }
            if view.state != NodeState::Up {
                return Err(ApiError::bad_request(format!(
                    "node {} is {:?}, not up",
                    view.record.id, view.state
                )));
            }
            Some(view.record.id)
        }
        None => None,
    };
    if let Some(driver) = node.driver(&name) {
        if !driver.replace(old, to).await {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replacing",
                format!(
                    "the replica of {name:?} on node {old} is already being replaced, is the only in-sync replica that answers, or this attachment is fenced"
                ),
            ));
        }
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "volume": name, "old": old, "to": to, "attached": true })),
        ));
    }
    if let Some(frontend) = volume.frontend {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_attached_here",
            format!(
                "volume {name:?} is attached on node {frontend}; a replica is replaced by the node the volume is attached on: ask that node's API"
            ),
        ));
    }
    let new = match to {
        Some(to) => to,
        None => runtime.place_replacement(&name)?,
    };
    match runtime
        .write_retrying(Command::ReplaceReplica {
            name: name.clone(),
            generation: volume.generation,
            old,
            new,
        })
        .await?
    {
        Response::Applied => Ok((
            StatusCode::OK,
            Json(json!({ "volume": name, "old": old, "to": new, "attached": false })),
        )),
        Response::Rejected { reason } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "replace_refused",
            reason,
        )),
    }
}

/// Starts a scrub of a replicated volume attached on this node; its
/// progress and result are in `GET /v1/volumes/{name}`.
async fn scrub_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(driver) = node.driver(&name) else {
        let volume = {
            let guard = cluster.runtime.read().await;
            guard
                .as_ref()
                .and_then(|runtime| runtime.metadata().volumes.get(&name).cloned())
        };
        let (code, message) = match volume {
            Some(volume) if volume.replicas.len() > 1 => (
                "not_attached_here",
                match volume.frontend {
                    Some(frontend) => format!(
                        "volume {name:?} is attached on node {frontend}; a scrub runs where the volume is attached: ask that node's API"
                    ),
                    None => format!(
                        "volume {name:?} is not attached; attach it on a node holding a replica, then scrub it there"
                    ),
                },
            ),
            volume => {
                if volume.is_none() {
                    // Not in the cluster: a local volume, or none at all (404).
                    let lookup = name.clone();
                    blocking(&node, move |node| node.show(&lookup)).await?;
                }
                (
                    "not_replicated",
                    format!(
                        "volume {name:?} has one replica: nothing to compare it with (its reads verify every block's checksum)"
                    ),
                )
            }
        };
        return Err(ApiError::new(StatusCode::CONFLICT, code, message));
    };
    let fenced = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "fenced",
            format!("volume {name:?} is no longer served here (fenced by a newer attachment)"),
        )
    };
    let (started, report) = driver.scrub().await.ok_or_else(fenced)?;
    if !started && report.as_ref().is_none_or(|scrub| scrub.finished) {
        return Err(fenced());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "started": started, "scrub": report })),
    ))
}

async fn delete_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let local = name.clone();
    let here = match blocking(&node, move |node| node.show(&local)).await {
        Ok(view) => Some(view),
        Err(ApiError {
            code: "volume_not_found",
            ..
        }) => None,
        Err(error) => return Err(error),
    };
    if here.as_ref().is_some_and(|view| view.attachment.is_some()) {
        return Err(NodeError::Attached(name).into());
    }
    // A volume of the cluster goes from the metadata first (refused while
    // a node serves it); every node holding a copy then deletes it
    // (`replication::reclaim`), this one at once.
    let guard = cluster.runtime.read().await;
    let in_cluster = match guard.as_ref() {
        Some(runtime) => {
            runtime.read_barrier(Consistency::Current).await?;
            match runtime.metadata().volumes.get(&name) {
                Some(volume) => {
                    if let Some(frontend) = volume.frontend {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            "volume_attached",
                            format!("volume {name:?} is attached on node {frontend}; detach it there first (`fabctl volume detach {name}` on that node)"),
                        ));
                    }
                    runtime.forget_volume(&name).await?;
                    true
                }
                None => false,
            }
        }
        None => false,
    };
    drop(guard);
    match here {
        Some(_) => blocking(&node, move |node| node.delete(&name)).await?,
        None if in_cluster => {}
        None => return Err(NodeError::Store(blockstore::Error::NoSuchVolume(name)).into()),
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn attach_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path(name): Path<String>,
    body: Result<Json<AttachVolume>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let request = match body {
        Ok(Json(request)) => request,
        Err(JsonRejection::MissingJsonContentType(_)) => AttachVolume::default(),
        Err(rejection) => return Err(rejection.into()),
    };
    let force = request.force;
    if let Some(target) = &request.node {
        // A valid name needs no escaping in a path.
        blockstore::store::validate_name(&name).map_err(NodeError::Store)?;
        let path = format!("/v1/volumes/{name}/attach");
        let body = serde_json::json!({ "force": force });
        if let Some(answer) =
            crate::cluster_api::forward(&cluster, target, "POST", path, Some(body)).await?
        {
            return Ok(answer.into_response());
        }
    }
    let replicated = match cluster.runtime.read().await.as_ref() {
        Some(runtime) => {
            runtime.read_barrier(Consistency::Current).await?;
            runtime
                .metadata()
                .volumes
                .get(&name)
                .filter(|volume| volume.replicas.len() > 1)
                .cloned()
        }
        None => None,
    };
    let view = match replicated {
        Some(volume) => attach_replicated(node, cluster, volume, force).await?,
        None => blocking(&node, move |node| node.attach(&name)).await?,
    };
    Ok(Json(view).into_response())
}

/// Attaches a replicated volume here: a new generation through Raft (which
/// fences any earlier attachment), a replication driver over its replicas,
/// and a vhost-user-blk device whose queues go through the driver.
async fn attach_replicated(
    node: Arc<Node>,
    cluster: Arc<ClusterHandle>,
    volume: VolumeMeta,
    force: bool,
) -> Result<crate::node::VolumeView, ApiError> {
    use crate::cluster::metadata::{Command, Response};
    use crate::replication::driver::{self, MetaReply, ReplicaEndpoint};
    use blockstore::replication::frontend::{Config, MetaOutcome, Phase, ReplicaState};

    let name = volume.name.clone();
    if node.driver(&name).is_some() {
        return blocking(&node, move |node| node.show(&name)).await;
    }
    let guard = cluster.runtime.read().await;
    let runtime = guard
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("not in a cluster".into()))?;
    let me = runtime.id();
    if !volume.replicas.contains(&me) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_a_replica",
            format!(
                "volume {name:?} has its replicas on nodes {:?}; attach it on one of them",
                volume.replicas
            ),
        ));
    }
    // Another node serving it now, and up: taking over fences its guest.
    if let Some(frontend) = volume.frontend.filter(|&frontend| frontend != me) {
        let up = runtime.nodes().iter().any(|view| {
            view.record.id == frontend && view.state == crate::cluster::metadata::NodeState::Up
        });
        if up && !force {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "attached_elsewhere",
                format!(
                    "volume {name:?} is attached on node {frontend}, which is up; detach it there, or attach with --force to take it over (that guest then sees I/O errors)"
                ),
            ));
        }
    }
    match runtime
        .write_retrying(Command::AttachVolume {
            name: name.clone(),
            node: me,
        })
        .await?
    {
        Response::Applied => {}
        Response::Rejected { reason } => {
            return Err(crate::cluster::runtime::ClusterError::Rejected(reason).into())
        }
    }
    runtime.read_barrier(Consistency::Current).await?;
    let metadata = runtime.metadata();
    let volume = metadata
        .volumes
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError::bad_request(format!("volume {name:?} was deleted")))?;
    if volume.frontend != Some(me) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "attached_elsewhere",
            format!(
                "volume {name:?} was attached on node {:?} at the same time; it serves it now",
                volume.frontend
            ),
        ));
    }
    let id = crate::replication::volume_id(&volume).ok_or_else(|| {
        ApiError::bad_request(format!(
            "volume {name:?} has a malformed id {:?}",
            volume.id
        ))
    })?;
    let service = cluster
        .services
        .replication
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this node serves no replicas".into()))?;
    let mut endpoints = Vec::new();
    for replica in &volume.replicas {
        if *replica == me {
            let local = service.replica(id).map_err(|reason| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "replica_unavailable",
                    reason,
                )
            })?;
            endpoints.push(ReplicaEndpoint::Local {
                node: me,
                replica: local,
            });
        } else {
            let record = metadata.nodes.get(replica).ok_or_else(|| {
                ApiError::bad_request(format!("replica node {replica} is not a member"))
            })?;
            endpoints.push(ReplicaEndpoint::Remote {
                node: *replica,
                member: record.into(),
            });
        }
    }
    let states = volume
        .replicas
        .iter()
        .map(|replica| {
            if volume.stale.contains(replica) {
                ReplicaState::Stale
            } else {
                ReplicaState::InSync
            }
        })
        .collect();
    let config = Config {
        volume_blocks: volume.size_bytes / blockstore::BLOCK_SIZE,
        region_blocks: crate::replication::REGION_BLOCKS,
        min_replicas: volume.min_replicas as usize,
        replica_timeout: cluster.replication_settings.replica_timeout,
        io_timeout: cluster.replication_settings.io_timeout,
        probe_interval: cluster.replication_settings.retry,
        resync_bytes_per_second: cluster.replication_settings.resync_bytes_per_second,
        replace_after: cluster.replication_settings.replace_after,
    };
    let handle = cluster.clone();
    let changes_of = name.clone();
    let metadata_fn: driver::MetadataFn = Arc::new(move |generation, request| {
        let handle = handle.clone();
        let name = changes_of.clone();
        Box::pin(async move {
            let guard = handle.runtime.read().await;
            let Some(runtime) = guard.as_ref() else {
                return MetaReply::Outcome(MetaOutcome::Retry);
            };
            record_replica_change(runtime, name, generation, request).await
        })
    });
    let (handle, _task) = driver::spawn(
        config,
        id,
        volume.generation,
        states,
        endpoints,
        runtime.network().clone(),
        metadata_fn,
    );
    drop(guard);
    if handle
        .wait_for(std::time::Duration::from_secs(10), |s| {
            s.phase == Phase::Serving
        })
        .await
        .is_err()
    {
        tracing::warn!(volume = %name, "replicas not ready yet; guest I/O waits for them");
    }
    let runtime_handle = tokio::runtime::Handle::current();
    let engines = (0..node.queues().max(1))
        .map(|_| {
            crate::replication::engine::ReplicatedEngine::new(
                &name,
                volume.size_bytes,
                blockstore::vhost_user::device::QUEUE_SIZE_MAX,
                handle.clone(),
                runtime_handle.clone(),
            )
            .map(|engine| Box::new(engine) as Box<dyn blockstore::BlockEngine>)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "engine", e.to_string()))?;
    let backend = blockstore::vhost_user::BlkBackend::with_engines(
        blockstore::vhost_user::DeviceInfo {
            name: name.clone(),
            capacity: volume.size_bytes,
            serial: volume.id.clone(),
        },
        engines,
    );
    tracing::info!(volume = %name, generation = volume.generation, "attached, replicated");
    blocking(&node, move |node| {
        node.attach_replicated(&name, backend, handle)
    })
    .await
}

async fn detach_volume(
    State(node): State<Arc<Node>>,
    State(cluster): State<Arc<ClusterHandle>>,
    Path(name): Path<String>,
    body: Result<Json<DetachVolume>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let force = match body {
        Ok(Json(request)) => request.force,
        // No body at all means the defaults.
        Err(JsonRejection::MissingJsonContentType(_)) => false,
        Err(rejection) => return Err(rejection.into()),
    };
    let replicated = node.driver(&name).is_some();
    let local = name.clone();
    let view = blocking(&node, move |node| node.detach(&local, force)).await?;
    if replicated {
        // Let the metadata know no frontend serves it here any more. A
        // newer attachment elsewhere has already taken over if this is
        // refused as fenced.
        if let Some(runtime) = cluster.runtime.read().await.as_ref() {
            let me = runtime.id();
            let attached_here = runtime
                .metadata()
                .volumes
                .get(&name)
                .filter(|volume| volume.frontend == Some(me))
                .map(|volume| volume.generation);
            if let Some(generation) = attached_here {
                let command = crate::cluster::metadata::Command::DetachVolume {
                    name: name.clone(),
                    generation,
                };
                if let Err(error) = runtime.write_retrying(command).await {
                    tracing::warn!(volume = %name, %error, "detach not recorded in the metadata");
                }
            }
        }
    }
    Ok(Json(view))
}
