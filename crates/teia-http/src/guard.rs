//! The guard against requests a web page makes: a page the user visits can make the browser
//! POST a form to `http://127.0.0.1:PORT/evaluation` (no preflight for a multipart form) or,
//! by DNS rebinding, read answers under another `Host`. Every route needs the node's token
//! (`Authorization: Bearer TOKEN`), except a request that only a program on this machine
//! makes outside the node's services ([`SERVICE_ROUTES`]): from a loopback address, to a
//! loopback `Host`, with no `Origin` and no `Sec-Fetch-*` header (a browser sends those; so
//! the course statement's `curl -X POST http://127.0.0.1:PORT/evaluation -F
//! file=@all_projects.zip` works as written, and a browser always needs the token). The
//! node's other services (`/api/...`, `/events`, `/metrics`, the dashboard) always need the
//! token: another account of the machine must not share its user's files.
//!
//! The dashboard's browser holds a session in a cookie: opening the link the node prints,
//! `http://ADDR/?token=TOKEN`, sets `teia_session_PORT` to a secret random at each start
//! (not the token: a browser sends a host's cookies to all its ports), `HttpOnly` (no script
//! reads it), `SameSite=Strict` (no other site's page sends it) and for the browser's
//! session only, and redirects to `/`, without the token in the address. A request with the
//! cookie may read; one that changes anything (any method but `GET` and `HEAD`) also needs
//! the `X-Teia-Csrf` header with the value the node put in its page, which another site's
//! page cannot read.
//!
//! The token is made at the first start, 32 random bytes in hex, in the data directory's
//! `http-token` (mode 0600); `teia token` prints it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The token file's name in the data directory.
pub const TOKEN_FILE: &str = "http-token";

/// The header a dashboard's request that changes something carries.
pub const CSRF_HEADER: &str = "x-teia-csrf";

/// The node's services and the dashboard, by path prefix (and `/` itself): even a program
/// on this machine needs the token for them. The rest (seed 000's and seed 001's routes, as
/// their course statements use them) it may call without.
pub const SERVICE_ROUTES: [&str; 4] = ["/api/", "/events", "/metrics", "/app."];

/// Whether `path` is one of the node's services or the dashboard.
fn service_route(path: &str) -> bool {
    path == "/" || SERVICE_ROUTES.iter().any(|route| path.starts_with(route))
}

/// What the guard checks requests against.
pub(crate) struct Keys {
    /// The node's token.
    pub(crate) token: String,
    /// The dashboard's session: the cookie's value, random at each start.
    pub(crate) session: String,
    /// The value of [`CSRF_HEADER`], random at each start, written in the dashboard's page.
    pub(crate) csrf: String,
    /// The cookie's name (`teia_session_PORT`: cookies are per host, not per port, and two
    /// nodes on one machine each keep theirs).
    pub(crate) cookie: String,
}

impl Keys {
    /// The keys of a node with `token`, serving on `port`.
    pub(crate) fn new(token: String, port: u16) -> std::io::Result<Self> {
        Ok(Self {
            token,
            session: random_hex()?,
            csrf: random_hex()?,
            cookie: format!("teia_session_{port}"),
        })
    }
}

/// 32 random bytes, in hex.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The data directory's token, made (mode 0600) if it has none.
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if token.trim().len() >= 32 => return Ok(token.trim().to_owned()),
        Ok(_) => std::fs::remove_file(&path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let token = random_hex()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

/// Whether `host` (a `Host` header's value) names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a request from `peer` with `headers` is one only a program on this machine
/// makes (no token needed).
fn local_program(peer: SocketAddr, headers: &HeaderMap) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host_is_loopback = text(header::HOST).is_some_and(loopback_host);
    peer.ip().is_loopback()
        && host_is_loopback
        && !headers.contains_key(header::ORIGIN)
        && !from_a_browser(headers)
}

/// Whether a browser sent the request (browsers send `Sec-Fetch-*` on every request to a
/// loopback address).
fn from_a_browser(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().starts_with("sec-fetch-"))
}

/// Compares two secrets in constant time.
fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.trim().as_bytes(), expected.as_bytes());
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

/// The value of cookie `name` in `headers`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// `?token=T` in a query.
fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "token")
        .map(|(_, value)| value)
}

/// Whether `headers` carry `Authorization: Bearer TOKEN` (compared in constant time).
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    same_secret(given, token)
}

/// What the cookie allows `request`: nothing (no cookie, or not the token's), reading, or
/// changing too (it also carries the page's [`CSRF_HEADER`]).
fn cookie_allows(keys: &Keys, request: &Request) -> Option<bool> {
    let headers = request.headers();
    let given = cookie(headers, &keys.cookie)?;
    if !same_secret(given, &keys.session) {
        return None;
    }
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    let csrf = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| same_secret(v, &keys.csrf));
    Some(safe || csrf)
}

/// The answer to the printed link opened in a browser (`GET /?token=TOKEN`): the session's
/// cookie, and the dashboard without the token in its address.
fn log_in(keys: &Keys, request: &Request) -> Option<Response> {
    let given = query_token(request.uri().query())?;
    if request.method() != Method::GET
        || !from_a_browser(request.headers())
        || !same_secret(given, &keys.token)
    {
        return None;
    }
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/",
        keys.cookie, keys.session
    );
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(response)
}

/// The middleware: a request without the token that a local program would not make is
/// answered 401 (403 when it came from a web page), before any route sees it.
pub(crate) async fn require_token(
    State(keys): State<std::sync::Arc<Keys>>,
    ConnectInfo(crate::limits::Peer(peer)): ConnectInfo<crate::limits::Peer>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(logged_in) = log_in(&keys, &request) {
        return logged_in;
    }
    let headers = request.headers();
    let course_route = !service_route(request.uri().path());
    if has_token(headers, &keys.token) || (course_route && local_program(peer, headers)) {
        return next.run(request).await;
    }
    match cookie_allows(&keys, &request) {
        Some(true) => return next.run(request).await,
        Some(false) => {
            let error =
                "a change from the dashboard needs its page's X-Teia-Csrf header; reload the page";
            return (
                StatusCode::FORBIDDEN,
                axum::Json(serde_json::json!({ "error": error })),
            )
                .into_response();
        }
        None => {}
    }
    let headers = request.headers();
    let from_a_page = headers.contains_key(header::ORIGIN) || from_a_browser(headers);
    let (status, error) = if from_a_page {
        (
            StatusCode::FORBIDDEN,
            "requests from web pages need the node's token: open the dashboard's link that the node printed at start (http://ADDR/?token=TOKEN; `teia token` prints the token)",
        )
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "this request needs the node's token (Authorization: Bearer TOKEN; `teia token` on the node's machine prints it)",
        )
    };
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_a_local_program_goes_without_the_token() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let curl = headers(&[("host", "127.0.0.1:8000")]);
        assert!(local_program(local, &curl));
        assert!(local_program(
            local,
            &headers(&[("host", "localhost:8000")])
        ));
        assert!(local_program(local, &headers(&[("host", "[::1]:8000")])));
        assert!(!local_program(remote, &curl), "from another machine");
        assert!(
            !local_program(local, &headers(&[("host", "attacker.example:8000")])),
            "DNS rebinding"
        );
        assert!(
            !local_program(
                local,
                &headers(&[
                    ("host", "127.0.0.1:8000"),
                    ("origin", "https://evil.example")
                ])
            ),
            "a page's form"
        );
        assert!(
            !local_program(
                local,
                &headers(&[("host", "127.0.0.1:8000"), ("sec-fetch-site", "cross-site")])
            ),
            "a page's navigation"
        );
        assert!(
            !local_program(
                local,
                &headers(&[("host", "127.0.0.1:8000"), ("sec-fetch-site", "none")])
            ),
            "an address typed in a browser"
        );
        let token = "ab".repeat(32);
        assert!(has_token(
            &headers(&[("authorization", &format!("Bearer {token}"))]),
            &token
        ));
        assert!(!has_token(
            &headers(&[("authorization", "Bearer ab")]),
            &token
        ));
        assert!(!has_token(&headers(&[]), &token));
    }

    #[test]
    fn the_token_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), token);
    }
}
