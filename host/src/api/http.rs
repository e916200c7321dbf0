//! The HTTP/JSON API (axum). Bodies are raw bytes (modules, job input and output, item values);
//! everything else is JSON. Errors are `{"error": "...", "code": "..."}` with a fitting status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use grex_client::http::{FLOCK_HEADER, NODE_HEADER, VERSION_HEADER};
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::Gate;
use crate::error::{ErrorCode, RemoteError, error};
use crate::node::Node;

/// HTTP connections served at once; further ones wait in the kernel's accept queue.
pub const CONNECTIONS_MAX: usize = 1024;

/// Bytes of JSON or headers around a body that the limits do not count.
const BODY_SLACK_BYTES: usize = 64 << 10;

/// A TCP listener that holds at most [`CONNECTIONS_MAX`] connections open: each accepted stream
/// carries a permit, given back when the connection closes.
struct LimitedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (LimitedStream { inner: stream, _permit: permit }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection and its permit.
struct LimitedStream {
    inner: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

struct ApiError(RemoteError);

impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(super) async fn start(
    node: Node,
    addr: SocketAddr,
    mut gate: Gate,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let listener = LimitedListener { inner: listener, permits: Arc::new(Semaphore::new(CONNECTIONS_MAX)) };
    let app = router(node);
    let task = tokio::spawn(async move {
        if !gate.opened().await {
            return;
        }
        let mut stop = gate.stopped;
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}

/// The API's routes.
pub(crate) fn router(node: Node) -> Router {
    Router::new()
        .route("/v1/modules", get(list_modules))
        .route("/v1/modules/{name}", put(put_module))
        .route("/v1/jobs/{bucket}", post(run_job))
        .route("/v1/buckets/{bucket}/items", get(list_items))
        .route("/v1/buckets/{bucket}/items/{item}", get(get_item))
        .route("/v1/canary/{bucket}", get(canary))
        .route("/v1/status", get(status))
        .route("/v1/flocks", get(flocks))
        .fallback(not_found)
        // Bodies are read with the node's own limits, so the errors are ours (JSON, named).
        .layer(DefaultBodyLimit::disable())
        .with_state(node)
}

async fn not_found() -> ApiError {
    ApiError(error(
        ErrorCode::BadRequest,
        "no such endpoint; see docs/wire.md (e.g. POST /v1/jobs/{bucket}?module=NAME, GET /v1/status)",
    ))
}

/// Path segment `index` (`/v1/jobs/{bucket}`: the bucket is segment 2), percent-decoded to bytes.
/// Read from the URI itself because bucket keys are bytes, not necessarily UTF-8.
fn segment_bytes(uri: &Uri, index: usize, name: &str) -> ApiResult<Vec<u8>> {
    let raw = uri
        .path()
        .split('/')
        .skip(1)
        .nth(index)
        .ok_or_else(|| error(ErrorCode::BadRequest, format!("missing `{name}` in the path")))?;
    Ok(percent_decode_str(raw).collect())
}

fn segment_text(uri: &Uri, index: usize, name: &str) -> ApiResult<String> {
    String::from_utf8(segment_bytes(uri, index, name)?)
        .map_err(|_| ApiError(error(ErrorCode::BadRequest, format!("`{name}` in the path must be UTF-8"))))
}

async fn read_body(body: Body, max: usize, what: &str, code: ErrorCode) -> ApiResult<Vec<u8>> {
    axum::body::to_bytes(body, max)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| ApiError(error(code, format!("the {what} is over the {max}-byte limit"))))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().unwrap_or("invalid");
    Some(value.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

fn require_content_type(headers: &HeaderMap, allowed: &[&str], hint: &str) -> ApiResult<()> {
    match content_type(headers) {
        None => Ok(()),
        Some(ct) if allowed.contains(&ct.as_str()) => Ok(()),
        Some(ct) => Err(ApiError(error(
            ErrorCode::UnsupportedMediaType,
            format!("content type `{ct}` is not accepted here; send {} ({hint})", allowed.join(" or ")),
        ))),
    }
}

async fn put_module(
    State(node): State<Node>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<grex_client::ModuleInfo>> {
    let name = segment_text(&uri, 2, "name")?;
    require_content_type(
        &headers,
        &["application/wasm", "application/octet-stream"],
        "curl: --data-binary @job.wasm -H 'content-type: application/wasm'",
    )?;
    let max = node.config().limits.module_bytes_max;
    let wasm = read_body(body, max, "module", ErrorCode::ModuleTooLarge).await?;
    Ok(Json(node.put_module(&name, wasm).await?))
}

async fn list_modules(State(node): State<Node>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "modules": node.modules() }))
}

async fn run_job(
    State(node): State<Node>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let module = query
        .get("module")
        .ok_or_else(|| error(ErrorCode::BadRequest, "say which module to run: POST /v1/jobs/{bucket}?module=NAME"))?;
    let read_only = match query.get("read_only").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError(error(
                ErrorCode::BadRequest,
                format!("read_only must be true or false, not `{other}`"),
            )));
        }
    };
    require_content_type(
        &headers,
        &["application/octet-stream", "text/plain", "application/json"],
        "curl -d sends form encoding: use --data-binary with -H 'content-type: application/octet-stream'",
    )?;
    let max = node.config().limits.input_bytes_max;
    let input = read_body(body, max + BODY_SLACK_BYTES, "job input", ErrorCode::InputTooLarge).await?;
    let out = node.run_job(&bucket, module, input, read_only).await?;
    let mut response = (StatusCode::OK, out.output).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(VERSION_HEADER, HeaderValue::from(out.bucket_version));
    headers.insert(FLOCK_HEADER, HeaderValue::from(out.flock));
    if let Ok(node) = HeaderValue::from_str(&out.node) {
        headers.insert(NODE_HEADER, node);
    }
    Ok(response)
}

async fn get_item(State(node): State<Node>, uri: Uri) -> ApiResult<Response> {
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let item = segment_text(&uri, 4, "item")?;
    let value = node.get_item(&bucket, &item).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
}

async fn list_items(
    State(node): State<Node>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<serde_json::Value>> {
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let prefix = query.get("prefix").map_or("", String::as_str);
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => text.parse().map_err(|_| {
            error(ErrorCode::BadRequest, format!("limit must be a number from 1 to 1000, not `{text}`"))
        })?,
    };
    let items = node.list_items(&bucket, prefix, query.get("start_after").map(String::as_str), limit).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn canary(
    State(node): State<Node>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<grex_client::Canary>> {
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let read_only = query.get("read_only").is_some_and(|v| v == "true" || v == "1");
    Ok(Json(node.canary(&bucket, read_only).await?))
}

async fn flocks(State(node): State<Node>) -> Json<grex_client::proto::FlockMapInfo> {
    Json(node.flocks())
}

async fn status(State(node): State<Node>) -> Json<grex_client::Status> {
    Json(node.status())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::serve::Listener;

    use super::*;

    #[tokio::test]
    async fn the_listener_holds_back_connections_beyond_its_limit_until_one_closes() {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut listener = LimitedListener { inner, permits: Arc::new(Semaphore::new(1)) };
        let _first_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (first, _) = listener.accept().await;
        let held_back = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(held_back.is_err(), "a second connection was accepted while the only permit was taken");
        drop(first);
        let (_second, _) = listener.accept().await;
    }
}
