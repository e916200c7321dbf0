//! The HTTP/JSON transport: the same calls as QUIC, mapped onto the node's REST API. Each call uses
//! a fresh HTTP/1.1 connection, which suits command-line use; applications that care about
//! latency use QUIC.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::ClientError;
use crate::proto::{FRAME_BYTES_MAX, JobOutput, RemoteError, Request, Response, ScanEvent};

/// Bytes escaped in a path segment or query value: all but RFC 3986's unreserved characters.
pub const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Header carrying the bucket's version after a job.
pub const VERSION_HEADER: &str = "grex-bucket-version";
/// Header carrying the bucket's flock.
pub const FLOCK_HEADER: &str = "grex-flock";
/// Header carrying the id of the node that ran a job.
pub const NODE_HEADER: &str = "grex-node";

pub(crate) struct HttpTransport {
    host_port: String,
    /// TLS (`https://`): trusting the cluster's CA.
    tls: Option<tokio_rustls::TlsConnector>,
    /// Sent with every request as `Authorization: Bearer TOKEN`.
    token: Option<String>,
}

/// Percent-encodes arbitrary bytes (a bucket key) for a URL path segment.
pub fn encode_bytes(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, SEGMENT).to_string()
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

struct HttpCall {
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

impl HttpTransport {
    /// Plain HTTP to `host_port`, or HTTPS trusting `https_ca` (the cluster's `ca.pem`).
    pub(crate) fn new(host_port: &str, token: Option<&str>, https_ca: Option<&Path>) -> Result<Self, ClientError> {
        if host_port.is_empty() || !host_port.contains(':') {
            return Err(ClientError::Config(format!("`http://{host_port}` needs HOST:PORT")));
        }
        let tls = match https_ca {
            Some(ca) => {
                let config = crate::quic::tls_config(ca, b"http/1.1")?;
                Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))
            }
            None => None,
        };
        Ok(HttpTransport { host_port: host_port.to_owned(), tls, token: token.map(str::to_owned) })
    }

    pub(crate) async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let call = to_http(request)?;
        // `Authenticate` checks the token it carries.
        let token = match request {
            Request::Authenticate { token } => Some(token.as_str()),
            _ => self.token.as_deref(),
        };
        let (status, headers, body) = self.send(call, token).await?;
        if !status.is_success() {
            let error: RemoteError = serde_json::from_slice(&body)
                .map_err(|_| ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&body))))?;
            return Ok(Response::Error(error));
        }
        from_http(request, &headers, body)
    }

    /// Sends one request; answers the response with its body still to be read.
    async fn open(
        &self,
        call: HttpCall,
        token: Option<&str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable(format!("{}: {e}", self.host_port));
        let no_answer = |e: &dyn std::fmt::Display| ClientError::NoAnswer(format!("{}: {e}", self.host_port));
        let stream = tokio::net::TcpStream::connect(&self.host_port).await.map_err(|e| unreachable(&e))?;
        let mut sender = match &self.tls {
            None => handshake(stream).await.map_err(|e| unreachable(&e))?,
            Some(tls) => {
                let host = self
                    .host_port
                    .rsplit_once(':')
                    .map_or("", |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| ClientError::Config(format!("`{host}` is not a host name: {e}")))?;
                let stream = tls.connect(name, stream).await.map_err(|e| unreachable(&e))?;
                handshake(stream).await.map_err(|e| unreachable(&e))?
            }
        };
        let mut builder = hyper::Request::builder().method(call.method).uri(call.path).header(HOST, &self.host_port);
        if let Some(content_type) = call.content_type {
            builder = builder.header(CONTENT_TYPE, content_type);
        }
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request =
            builder.body(Full::new(Bytes::from(call.body))).map_err(|e| ClientError::Config(e.to_string()))?;
        sender.send_request(request).await.map_err(|e| no_answer(&e))
    }

    async fn send(
        &self,
        call: HttpCall,
        token: Option<&str>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let response = self.open(call, token).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = Limited::new(response.into_body(), FRAME_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| ClientError::NoAnswer(format!("{}: {e}", self.host_port)))?
            .to_bytes();
        Ok((status, headers, body))
    }

    /// Runs a scan (`POST /v1/scan`), handing each event of the answer's JSON lines to
    /// `on_event` as it arrives; returns the last one.
    pub(crate) async fn scan(
        &self,
        request: &Request,
        on_event: &mut (dyn FnMut(&ScanEvent) + Send),
    ) -> Result<Option<ScanEvent>, ClientError> {
        let no_answer = |e: &dyn std::fmt::Display| ClientError::NoAnswer(format!("{}: {e}", self.host_port));
        let response = self.open(to_http(request)?, self.token.as_deref()).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let body = Limited::new(body, FRAME_BYTES_MAX).collect().await.map_err(|e| no_answer(&e))?.to_bytes();
            let error: RemoteError = serde_json::from_slice(&body)
                .map_err(|_| ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&body))))?;
            return Err(ClientError::Remote(error));
        }
        let (mut line, mut last) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| no_answer(&e))?;
            let Some(data) = frame.data_ref() else { continue };
            for piece in data.split_inclusive(|b| *b == b'\n') {
                line.extend_from_slice(piece);
                if line.len() > FRAME_BYTES_MAX {
                    return Err(ClientError::Protocol(format!("a scan event line over {FRAME_BYTES_MAX} bytes")));
                }
                if line.ends_with(b"\n") {
                    let event: ScanEvent = serde_json::from_slice(&line)
                        .map_err(|e| ClientError::Protocol(format!("a scan event line: {e}")))?;
                    on_event(&event);
                    last = Some(event);
                    line.clear();
                }
            }
        }
        Ok(last)
    }
}

/// An HTTP/1.1 connection over `stream`, driven by a task of its own.
async fn handshake<S>(stream: S) -> hyper::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn to_http(request: &Request) -> Result<HttpCall, ClientError> {
    let get = |path: String| HttpCall { method: Method::GET, path, content_type: None, body: Vec::new() };
    let post = |path: String| HttpCall { method: Method::POST, path, content_type: None, body: Vec::new() };
    Ok(match request {
        Request::PutModule { name, wasm } => HttpCall {
            method: Method::PUT,
            path: format!("/v1/modules/{}", encode(name)),
            content_type: Some("application/wasm"),
            body: wasm.clone(),
        },
        Request::RunJob { bucket, module, input, read_only } => HttpCall {
            method: Method::POST,
            path: format!(
                "/v1/jobs/{}?module={}{}",
                encode_bytes(bucket),
                encode(module),
                if *read_only { "&read_only=true" } else { "" }
            ),
            content_type: Some("application/octet-stream"),
            body: input.clone(),
        },
        Request::GetItem { bucket, item } => {
            get(format!("/v1/buckets/{}/items/{}", encode_bytes(bucket), encode(item)))
        }
        Request::ListItems { bucket, prefix, start_after, limit } => {
            let mut path =
                format!("/v1/buckets/{}/items?prefix={}&limit={limit}", encode_bytes(bucket), encode(prefix));
            if let Some(after) = start_after {
                path.push_str(&format!("&start_after={}", encode(after)));
            }
            get(path)
        }
        Request::Canary { bucket } => get(format!("/v1/canary/{}", encode_bytes(bucket))),
        Request::Status => get("/v1/status".to_owned()),
        Request::ListModules => get("/v1/modules".to_owned()),
        Request::Flocks => get("/v1/flocks".to_owned()),
        Request::Nodes => get("/v1/cluster/nodes".to_owned()),
        Request::RecentJobs => get("/v1/jobs/recent".to_owned()),
        Request::ClusterStats => get("/v1/cluster/stats".to_owned()),
        Request::DeleteModule { name } => HttpCall {
            method: Method::DELETE,
            path: format!("/v1/modules/{}", encode(name)),
            content_type: None,
            body: Vec::new(),
        },
        Request::DrainNode { node } => post(format!("/v1/cluster/nodes/{}/drain", encode(node))),
        Request::RemoveNode { node } => post(format!("/v1/cluster/nodes/{}/remove", encode(node))),
        Request::Authenticate { .. } => get("/v1/whoami".to_owned()),
        Request::Users => get("/v1/users".to_owned()),
        Request::AddUser { name, permissions } | Request::SetUser { name, permissions } => HttpCall {
            method: if matches!(request, Request::AddUser { .. }) { Method::POST } else { Method::PUT },
            path: format!("/v1/users/{}", encode(name)),
            content_type: Some("application/json"),
            body: serde_json::to_vec(permissions).expect("permissions encode as JSON"),
        },
        Request::DeleteUser { name } => HttpCall {
            method: Method::DELETE,
            path: format!("/v1/users/{}", encode(name)),
            content_type: None,
            body: Vec::new(),
        },
        Request::Scan(scan) => {
            let mut path = format!("/v1/scan?module={}", encode(&scan.module));
            if !scan.prefix.is_empty() {
                path.push_str(&format!("&prefix={}", encode_bytes(&scan.prefix)));
            }
            if let Some(reduce) = &scan.reduce {
                path.push_str(&format!("&reduce={}", encode(reduce)));
            }
            HttpCall {
                method: Method::POST,
                path,
                content_type: Some("application/octet-stream"),
                body: scan.input.clone(),
            }
        }
        Request::Session => {
            return Err(ClientError::Config("a session is a QUIC stream; over HTTP every request is its own".into()));
        }
    })
}

fn from_http(request: &Request, headers: &hyper::HeaderMap, body: Bytes) -> Result<Response, ClientError> {
    let json_error = |e: serde_json::Error| ClientError::Protocol(e.to_string());
    Ok(match request {
        Request::PutModule { .. } | Request::DeleteModule { .. } => {
            Response::Module(serde_json::from_slice(&body).map_err(json_error)?)
        }
        Request::RunJob { .. } => Response::Job(JobOutput {
            output: body.to_vec(),
            bucket_version: header_number(headers, VERSION_HEADER)?,
            flock: header_number(headers, FLOCK_HEADER)? as u32,
            node: headers.get(NODE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned(),
        }),
        Request::GetItem { .. } => Response::Item(body.to_vec()),
        Request::Flocks => Response::Flocks(serde_json::from_slice(&body).map_err(json_error)?),
        Request::Nodes | Request::DrainNode { .. } | Request::RemoveNode { .. } => {
            Response::Nodes(serde_json::from_slice(&body).map_err(json_error)?)
        }
        Request::ListItems { .. } => {
            #[derive(serde::Deserialize)]
            struct Items {
                items: Vec<String>,
            }
            Response::Items(serde_json::from_slice::<Items>(&body).map_err(json_error)?.items)
        }
        Request::Canary { .. } => Response::Canary(serde_json::from_slice(&body).map_err(json_error)?),
        Request::Status => Response::Status(serde_json::from_slice(&body).map_err(json_error)?),
        Request::RecentJobs => Response::RecentJobs(serde_json::from_slice(&body).map_err(json_error)?),
        Request::ClusterStats => Response::ClusterStats(serde_json::from_slice(&body).map_err(json_error)?),
        Request::Authenticate { .. } | Request::SetUser { .. } | Request::DeleteUser { .. } => {
            Response::User(serde_json::from_slice(&body).map_err(json_error)?)
        }
        Request::AddUser { .. } => Response::NewUser(serde_json::from_slice(&body).map_err(json_error)?),
        Request::Users => {
            #[derive(serde::Deserialize)]
            struct Users {
                users: Vec<crate::proto::UserInfo>,
            }
            Response::Users(serde_json::from_slice::<Users>(&body).map_err(json_error)?.users)
        }
        Request::Scan(_) => {
            return Err(ClientError::Config("a scan answers a stream of events: use `Client::scan`".into()));
        }
        Request::Session => return Err(ClientError::Protocol("an HTTP answer to a session".into())),
        Request::ListModules => {
            #[derive(serde::Deserialize)]
            struct Modules {
                modules: Vec<crate::proto::ModuleInfo>,
            }
            Response::Modules(serde_json::from_slice::<Modules>(&body).map_err(json_error)?.modules)
        }
    })
}

fn header_number(headers: &hyper::HeaderMap, name: &str) -> Result<u64, ClientError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("missing or malformed `{name}` header")))
}
