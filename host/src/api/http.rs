//! The HTTP/JSON API (axum). Bodies are raw bytes (modules, job input and output, item values);
//! everything else is JSON. Errors are `{"error": "...", "code": "..."}` with a fitting status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use grex_client::http::{FLOCK_HEADER, NODE_HEADER, VERSION_HEADER};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::Gate;
use super::budget::ReadBudget;
use super::conns::{ClientStream, Conn, ConnTable, accept_loop, secure};
use crate::access::{Action, Caller};
use crate::error::{ErrorCode, RemoteError, error};
use crate::metrics::Protocol;
use crate::node::{Node, NodeChange, Service};
use grex_client::{Permissions, UserInfo};

/// HTTP connections open at once; when all are taken, the longest-idle one is closed for a new
/// client, and while all are busy new ones wait in the kernel's accept queue (see `conns`).
pub const CONNECTIONS_MAX: usize = 1024;

/// Bytes of JSON or headers around a body that the limits do not count.
const BODY_SLACK_BYTES: usize = 64 << 10;

/// How long a client may take over things that should be quick.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HttpTimeouts {
    /// From a connection's start, or the end of its last response, to the end of the next
    /// request's head; a connection that misses it is closed (half-sent heads and idle
    /// keep-alive connections alike).
    pub head: Duration,
    /// From the end of a request's head to the end of its body; a body that misses it is answered
    /// `request_timeout`.
    pub body: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts { head: Duration::from_secs(10), body: Duration::from_secs(30) }
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

/// Binds the HTTP listener (HTTPS with `tls`) and serves from when `gate` opens until it stops.
pub(super) async fn start(
    node: Node,
    addr: SocketAddr,
    mut gate: Gate,
    budget: Arc<ReadBudget>,
    tls: Option<TlsAcceptor>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener =
        TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let timeouts = HttpTimeouts::default();
    let task = tokio::spawn(async move {
        let Some(service) = gate.opened().await else { return };
        let table = ConnTable::counted(CONNECTIONS_MAX, node.metrics(), Protocol::Http);
        let app = router(node, service, timeouts, budget);
        serve(listener, app, table, timeouts, gate.stopped, tls).await;
    });
    Ok((bound, task))
}

/// Accepts and serves connections until `stopped`, then lets the requests in progress finish.
async fn serve(
    listener: TcpListener,
    app: Router,
    table: Arc<ConnTable>,
    timeouts: HttpTimeouts,
    stopped: watch::Receiver<bool>,
    tls: Option<TlsAcceptor>,
) {
    accept_loop(&listener, &table, stopped.clone(), "HTTP", |stream, remote, conn| {
        let (app, stopped, tls) = (app.clone(), stopped.clone(), tls.clone());
        tokio::spawn(async move {
            match secure(stream, tls.as_ref()).await {
                Ok(stream) => serve_connection(stream, conn, app, timeouts, stopped, remote).await,
                Err(e) => tracing::debug!(%remote, error = %e, "HTTPS handshake failed"),
            }
        });
    })
    .await;
    table.closed().await;
}

async fn serve_connection(
    stream: Box<dyn ClientStream>,
    conn: Conn,
    app: Router,
    timeouts: HttpTimeouts,
    mut stopped: watch::Receiver<bool>,
    remote: SocketAddr,
) {
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn({
        let conn = conn.clone();
        move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(Caller::from(remote));
            let busy = conn.busy();
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await?;
                // Busy until hyper has sent the body and drops it.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &busy;
                        frame
                    }))
                }))
            }
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(timeouts.head);
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        _ = conn.evicted() => {
            tracing::debug!(%remote, "closing an idle HTTP connection for a new one");
            None
        }
        _ = stopped.wait_for(|s| *s) => None,
    };
    // Asked to close: at once if no request is in progress (hyper's graceful shutdown would wait
    // for a half-sent head), else after the response. The connection is not being polled here, so
    // no request can start between the check and the close.
    let result = match finished {
        Some(result) => result,
        None if !conn.is_busy() => Ok(()),
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "HTTP connection ended");
    }
}

/// What the handlers answer with: the node for what it answers itself, the service for what a
/// cluster routes.
#[derive(Clone)]
struct App {
    node: Node,
    service: Arc<dyn Service>,
}

/// The API's routes.
fn router(node: Node, service: Arc<dyn Service>, timeouts: HttpTimeouts, budget: Arc<ReadBudget>) -> Router {
    Router::new()
        .route("/v1/modules", get(list_modules))
        .route("/v1/modules/{name}", put(put_module).delete(delete_module))
        .route("/v1/jobs/{bucket}", post(run_job))
        .route("/v1/scan", post(scan))
        .route("/v1/buckets/{bucket}/items", get(list_items))
        .route("/v1/buckets/{bucket}/items/{item}", get(get_item))
        .route("/v1/canary/{bucket}", get(canary))
        .route("/v1/status", get(status))
        .route("/v1/jobs/recent", get(recent_jobs))
        .route("/v1/flocks", get(flocks))
        .route("/v1/cluster/stats", get(cluster_stats))
        .route("/v1/cluster/nodes", get(nodes))
        .route("/v1/cluster/nodes/{node}/drain", post(drain_node))
        .route("/v1/cluster/nodes/{node}/remove", post(remove_node))
        .route("/v1/users", get(list_users))
        .route("/v1/users/{name}", post(write_user).put(write_user).delete(delete_user))
        .route("/v1/whoami", get(whoami))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { axum::response::Redirect::to("/ui") }))
        .route("/ui", get(|| async { super::dashboard::page("index.html") }))
        .route("/ui/{file}", get(|Path(file): Path<String>| async move { super::dashboard::page(&file) }))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(service.clone(), sign_in))
        // Bodies are read with the node's own limits, so the errors are ours (JSON, named).
        .layer(DefaultBodyLimit::disable())
        .layer(Extension(timeouts))
        .layer(Extension(budget))
        .with_state(App { node, service })
}

/// Signs the request in with its bearer token, if it has one (`Authorization: Bearer TOKEN`):
/// the handlers find the [`Caller`] in the request's extensions. A token that matches no user is
/// refused here.
async fn sign_in(
    State(service): State<Arc<dyn Service>>,
    mut request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    // Inserted for every request by `serve_connection`; without it the caller is remote.
    let caller = request.extensions().get::<Caller>().cloned().unwrap_or(Caller { user: None, loopback: false });
    let caller = match request.headers().get(header::AUTHORIZATION) {
        None => caller,
        Some(value) => {
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
            let Some(token) = token else {
                return ApiError(error(
                    ErrorCode::Unauthenticated,
                    "the Authorization header must be `Bearer TOKEN`, with a token from `grex user add`",
                ))
                .into_response();
            };
            match service.authenticate(token) {
                Ok(identity) => Caller { user: Some(identity), ..caller },
                Err(e) => return ApiError(e).into_response(),
            }
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

impl App {
    /// Refuses the request unless its caller may do `action`.
    fn allow(&self, caller: &Caller, action: Action<'_>) -> ApiResult<()> {
        Ok(self.service.authorize(caller, action)?)
    }
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

/// A request's body, at most `max` bytes, within the body timeout, holding a claim on the node's
/// budget for large requests while it arrives. A declared length over the limit is refused before
/// any of the body is read.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    (timeouts, budget): (HttpTimeouts, &Arc<ReadBudget>),
    max: usize,
    what: &str,
    code: ErrorCode,
) -> ApiResult<Vec<u8>> {
    let too_large = || ApiError(error(code, format!("the {what} is over the {max}-byte limit")));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = body;
        let mut claim = budget.claim();
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError(error(ErrorCode::BadRequest, format!("the {what} could not be read: {e}"))))?;
            let Ok(data) = frame.into_data() else { continue };
            if bytes.len() + data.len() > max {
                return Err(too_large());
            }
            claim.set(bytes.len() + data.len())?;
            bytes.extend_from_slice(&data);
        }
        Ok(bytes)
    };
    match tokio::time::timeout(timeouts.body, read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError(error(
            ErrorCode::RequestTimeout,
            format!(
                "the {what} did not arrive within {} s of the request's head; send the whole body at once",
                timeouts.body.as_secs_f64()
            ),
        ))),
    }
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
    State(app): State<App>,
    Extension(timeouts): Extension<HttpTimeouts>,
    Extension(budget): Extension<Arc<ReadBudget>>,
    uri: Uri,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult<Json<grex_client::ModuleInfo>> {
    app.allow(&caller, Action::Admin)?;
    let App { node, service } = &app;
    let name = segment_text(&uri, 2, "name")?;
    require_content_type(
        &headers,
        &["application/wasm", "application/octet-stream"],
        "curl: --data-binary @job.wasm -H 'content-type: application/wasm'",
    )?;
    let max = node.config().limits.module_bytes_max;
    let wasm = read_body(body, &headers, (timeouts, &budget), max, "module", ErrorCode::ModuleTooLarge).await?;
    Ok(Json(service.put_module(name, wasm).await?))
}

async fn delete_module(
    State(app): State<App>,
    uri: Uri,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::ModuleInfo>> {
    app.allow(&caller, Action::Admin)?;
    let App { service, .. } = &app;
    let name = segment_text(&uri, 2, "name")?;
    Ok(Json(service.delete_module(name).await?))
}

async fn list_modules(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    app.allow(&caller, Action::See)?;
    Ok(Json(serde_json::json!({ "modules": app.node.modules() })))
}

/// A job's input, the body of a job or a scan: raw bytes of an accepted content type, at most
/// `--input-bytes-max`.
async fn read_input(
    node: &Node,
    body: Body,
    headers: &HeaderMap,
    limits: (HttpTimeouts, &Arc<ReadBudget>),
    what: &str,
) -> ApiResult<Vec<u8>> {
    require_content_type(
        headers,
        &["application/octet-stream", "text/plain", "application/json"],
        "curl -d sends form encoding: use --data-binary with -H 'content-type: application/octet-stream'",
    )?;
    let max = node.config().limits.input_bytes_max;
    read_body(body, headers, limits, max + BODY_SLACK_BYTES, what, ErrorCode::InputTooLarge).await
}

// An axum handler takes each part of the request it reads as an argument.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    State(App { node, service }): State<App>,
    Extension(timeouts): Extension<HttpTimeouts>,
    Extension(budget): Extension<Arc<ReadBudget>>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let module = query
        .get("module")
        .ok_or_else(|| error(ErrorCode::BadRequest, "say which module to run: POST /v1/jobs/{bucket}?module=NAME"))?;
    // Before the body is read.
    service.authorize(&caller, Action::Run(module))?;
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
    let input = read_input(&node, body, &headers, (timeouts, &budget), "job input").await?;
    let out = service.run_job(bucket, module.clone(), input, read_only).await?;
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

/// `POST /v1/scan?module=NAME[&prefix=P][&reduce=NAME]` with the input as the body: the scan's
/// events as JSON lines, sent as they come (`grex_client::proto::ScanEvent`).
async fn scan(
    State(App { node, service }): State<App>,
    Extension(timeouts): Extension<HttpTimeouts>,
    Extension(budget): Extension<Arc<ReadBudget>>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let mut request = grex_client::proto::ScanRequest::default();
    for (key, value) in uri.query().unwrap_or_default().split('&').filter_map(|pair| pair.split_once('=')) {
        let value: Vec<u8> = percent_decode_str(value).collect();
        let text = || {
            String::from_utf8(value.clone())
                .map_err(|_| ApiError(error(ErrorCode::BadRequest, format!("`{key}` must be UTF-8"))))
        };
        match key {
            "module" => request.module = text()?,
            "reduce" => request.reduce = Some(text()?),
            "prefix" => request.prefix = value,
            other => {
                return Err(ApiError(error(
                    ErrorCode::BadRequest,
                    format!("unknown scan parameter `{other}`; a scan takes module, prefix and reduce"),
                )));
            }
        }
    }
    if request.module.is_empty() {
        return Err(ApiError(error(ErrorCode::BadRequest, "say which module to run: POST /v1/scan?module=NAME")));
    }
    // Before the body is read.
    super::authorize_scan(service.as_ref(), &caller, &request)?;
    request.input = read_input(&node, body, &headers, (timeouts, &budget), "scan input").await?;
    let events = service.scan(request);
    let lines = futures::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        let mut line = serde_json::to_vec(&event).expect("scan events encode as JSON");
        line.push(b'\n');
        Some((Ok::<_, Infallible>(bytes::Bytes::from(line)), events))
    });
    let mut response = Body::from_stream(lines).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

async fn get_item(State(app): State<App>, uri: Uri, Extension(caller): Extension<Caller>) -> ApiResult<Response> {
    app.allow(&caller, Action::Read)?;
    let App { node, .. } = &app;
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let item = segment_text(&uri, 4, "item")?;
    let value = node.get_item(&bucket, &item).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
}

async fn list_items(
    State(app): State<App>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    app.allow(&caller, Action::Read)?;
    let App { node, .. } = &app;
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
    State(app): State<App>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::Canary>> {
    app.allow(&caller, Action::See)?;
    let App { service, .. } = &app;
    let bucket = segment_bytes(&uri, 2, "bucket")?;
    let read_only = query.get("read_only").is_some_and(|v| v == "true" || v == "1");
    Ok(Json(service.canary(bucket, read_only).await?))
}

async fn flocks(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::proto::FlockMapInfo>> {
    app.allow(&caller, Action::See)?;
    Ok(Json(app.service.flocks()))
}

async fn nodes(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::proto::NodesInfo>> {
    app.allow(&caller, Action::See)?;
    let App { service, .. } = &app;
    Ok(Json(service.nodes()?))
}

async fn cluster_stats(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::ClusterStats>> {
    app.allow(&caller, Action::See)?;
    Ok(Json(app.service.cluster_stats().await))
}

async fn drain_node(
    State(app): State<App>,
    Path(node): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::proto::NodesInfo>> {
    app.allow(&caller, Action::Admin)?;
    let App { service, .. } = &app;
    Ok(Json(service.change_node(node, NodeChange::Drain).await?))
}

async fn remove_node(
    State(app): State<App>,
    Path(node): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::proto::NodesInfo>> {
    app.allow(&caller, Action::Admin)?;
    let App { service, .. } = &app;
    Ok(Json(service.change_node(node, NodeChange::Remove).await?))
}

async fn status(State(app): State<App>, Extension(caller): Extension<Caller>) -> ApiResult<Json<grex_client::Status>> {
    app.allow(&caller, Action::See)?;
    Ok(Json(app.node.status()))
}

/// Every metric of this node, as Prometheus text (`crate::metrics`).
async fn metrics(State(app): State<App>, Extension(caller): Extension<Caller>) -> ApiResult<Response> {
    app.allow(&caller, Action::See)?;
    let text = app.node.metrics().render();
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE))], text).into_response())
}

async fn recent_jobs(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<grex_client::RecentJobs>> {
    app.allow(&caller, Action::See)?;
    Ok(Json(app.node.recent_jobs()))
}

async fn whoami(State(app): State<App>, Extension(caller): Extension<Caller>) -> ApiResult<Json<UserInfo>> {
    app.allow(&caller, Action::See)?;
    let user = caller.user.as_ref().and_then(|identity| super::user_named(app.service.as_ref(), &identity.name));
    user.map(Json).ok_or_else(|| {
        ApiError(error(ErrorCode::Unauthenticated, "no user signed in: send `Authorization: Bearer TOKEN`"))
    })
}

async fn list_users(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    app.allow(&caller, Action::Admin)?;
    Ok(Json(serde_json::json!({ "users": app.service.users() })))
}

/// A user's permissions from a request's JSON body.
async fn permissions_body(
    headers: &HeaderMap,
    body: Body,
    (timeouts, budget): (HttpTimeouts, &Arc<ReadBudget>),
) -> ApiResult<Permissions> {
    require_content_type(headers, &["application/json"], "send the permissions as JSON, e.g. {\"read\": true}")?;
    let bytes = read_body(body, headers, (timeouts, budget), 64 << 10, "permissions", ErrorCode::BadRequest).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(error(
            ErrorCode::BadRequest,
            format!("the permissions must be JSON such as {{\"admin\": false, \"read\": true, \"write\": false, \"run\": [\"counter\"]}}: {e}"),
        ))
    })
}

/// `POST /v1/users/{name}` adds a user (answering its token), `PUT` replaces its permissions.
// An axum handler takes each part of the request it reads as an argument.
#[allow(clippy::too_many_arguments)]
async fn write_user(
    State(app): State<App>,
    Extension(timeouts): Extension<HttpTimeouts>,
    Extension(budget): Extension<Arc<ReadBudget>>,
    Extension(caller): Extension<Caller>,
    method: axum::http::Method,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    app.allow(&caller, Action::Admin)?;
    let permissions = permissions_body(&headers, body, (timeouts, &budget)).await?;
    let service = app.service.as_ref();
    Ok(if method == axum::http::Method::POST {
        Json(super::add_user(service, name, permissions).await?).into_response()
    } else {
        Json(super::set_user(service, name, permissions).await?).into_response()
    })
}

async fn delete_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<UserInfo>> {
    app.allow(&caller, Action::Admin)?;
    Ok(Json(super::delete_user(app.service.as_ref(), name).await?))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    const QUICK: HttpTimeouts = HttpTimeouts { head: Duration::from_millis(300), body: Duration::from_millis(300) };
    const PATIENT: HttpTimeouts = HttpTimeouts { head: Duration::from_secs(60), body: Duration::from_secs(60) };

    /// A node's HTTP server on a real socket; it stops when the sender is dropped.
    async fn serve_test_node(
        dir: &std::path::Path,
        connections: usize,
        timeouts: HttpTimeouts,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let node = Node::open(crate::NodeConfig::new(dir)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            router(node.clone(), Arc::new(node), timeouts, ReadBudget::new(256 << 20)),
            ConnTable::new(connections),
            timeouts,
            stopped,
            None,
        ));
        (addr, stop)
    }

    /// Everything the server sends until it closes the connection, or `None` if it is still open
    /// after 5 s.
    async fn read_until_closed(stream: &mut TcpStream) -> Option<String> {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        read.ok().map(|_| String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn a_half_sent_head_and_an_idle_keep_alive_connection_are_closed_after_the_head_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = serve_test_node(dir.path(), 16, QUICK).await;
        let mut half_sent = TcpStream::connect(addr).await.unwrap();
        half_sent.write_all(b"GET /v1/status HTTP/1.1\r\nhost: grex\r\n").await.unwrap();
        let mut keep_alive = TcpStream::connect(addr).await.unwrap();
        keep_alive.write_all(b"GET /v1/status HTTP/1.1\r\nhost: grex\r\n\r\n").await.unwrap();

        assert!(read_until_closed(&mut half_sent).await.is_some(), "a half-sent head kept its connection open");
        let answer = read_until_closed(&mut keep_alive).await.expect("an idle keep-alive connection stayed open");
        assert!(answer.starts_with("HTTP/1.1 200"), "the complete request was not answered: {answer}");
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = serve_test_node(dir.path(), 16, PATIENT).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head = "POST /v1/jobs/b?module=m HTTP/1.1\r\nhost: grex\r\nconnection: close\r\n\
                    content-length: 1000000000000\r\n\r\n";
        client.write_all(head.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut client).await.expect("no answer to a 1 TB content-length");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("input_too_large"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_answered_request_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = serve_test_node(dir.path(), 16, QUICK).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head =
            "POST /v1/jobs/b?module=m HTTP/1.1\r\nhost: grex\r\nconnection: close\r\ncontent-length: 100\r\n\r\n";
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(&[b'x'; 10]).await.unwrap();
        let answer = read_until_closed(&mut client).await.expect("a stalled body kept its connection open");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }

    #[tokio::test]
    async fn with_every_connection_taken_by_idle_clients_a_new_client_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = serve_test_node(dir.path(), 4, PATIENT).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"GET /v1/status HTTP/1.1\r\nhost: grex\r\n").await.unwrap();
            idle.push(client);
        }
        for _ in 0..3 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"GET /v1/status HTTP/1.1\r\nhost: grex\r\nconnection: close\r\n\r\n").await.unwrap();
            let answer = read_until_closed(&mut client).await.expect("a new client was not served");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        // The longest-idle connection made room for the first newcomer (the others found its
        // place free), and nothing was answered on it; the rest stay open.
        let answer = read_until_closed(&mut idle[0]).await.expect("the longest-idle connection was not closed");
        assert_eq!(answer, "", "an idle connection got an answer to its half-sent request");
        let still_open = tokio::time::timeout(Duration::from_millis(200), idle[1].read(&mut [0; 16])).await;
        assert!(still_open.is_err(), "a second idle connection was closed: {still_open:?}");
    }
}
