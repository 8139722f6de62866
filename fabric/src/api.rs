//! The HTTP/JSON API that `fabctl` uses. See `docs/api.md`.
//!
//! Every error is a JSON body `{"error": {"code": ..., "message": ...}}`
//! with a status that says whose fault it was.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

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

    fn bad_request(message: String) -> ApiError {
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
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(node)
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
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
    let view = blocking(&node, move |node| {
        node.create(&request.name, request.size_bytes)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn show_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(&node, move |node| node.show(&name)).await?))
}

async fn delete_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    blocking(&node, move |node| node.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(&node, move |node| node.attach(&name)).await?))
}

async fn detach_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<DetachVolume>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let force = match body {
        Ok(Json(request)) => request.force,
        // No body at all means the defaults.
        Err(JsonRejection::MissingJsonContentType(_)) => false,
        Err(rejection) => return Err(rejection.into()),
    };
    Ok(Json(
        blocking(&node, move |node| node.detach(&name, force)).await?,
    ))
}
