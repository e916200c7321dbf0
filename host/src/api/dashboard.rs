//! The dashboard: a page every node serves at `/ui`, built into the binary (no build step, no
//! outside script). It reads the same JSON API as any client (`/v1/cluster/stats`,
//! `/v1/cluster/nodes`, `/v1/flocks`, `/v1/modules`, `/v1/jobs/recent`) every two seconds, with
//! the token it is given when the cluster has users, and draws the cluster from them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The dashboard's files: name, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("dashboard/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("dashboard/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("dashboard/style.css")),
];

/// The page's scripts and styles come from this node alone, and it talks to no other origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
     frame-ancestors 'none'";

/// One of the dashboard's files, or 404.
pub(super) fn page(name: &str) -> Response {
    let Some((_, content_type, text)) = FILES.iter().find(|(file, _, _)| *file == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file; the dashboard is at /ui\n").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        *text,
    )
        .into_response()
}
