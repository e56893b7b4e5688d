//! The dashboard: one page, its script and its style, built into the binary (no CDN, works
//! offline), served at `/`, `/app.js` and `/app.css` behind the token's guard. Every answer
//! of the API carries the headers of [`security_headers`]: a Content-Security-Policy that
//! lets the page load only the node's own script and style and talk only to the node.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page; `{{CSRF}}` is replaced by the value of the guard's `X-Teia-Csrf` header.
const INDEX: &str = include_str!("../web/index.html");
/// The page's script.
const APP_JS: &str = include_str!("../web/app.js");
/// The page's style.
const APP_CSS: &str = include_str!("../web/app.css");

/// The Content-Security-Policy of every answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The dashboard's routes; `csrf` goes into the page.
pub(crate) fn routes<S>(csrf: Arc<str>) -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/app.css", get(style))
        .with_state(csrf)
}

async fn index(State(csrf): State<Arc<str>>) -> Response {
    let page = INDEX.replace("{{CSRF}}", &csrf);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
        .into_response()
}

/// Adds the Content-Security-Policy, `nosniff`, no referrer and no framing to an answer.
pub(crate) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
