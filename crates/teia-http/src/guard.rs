//! The guard against requests a web page makes: a page the user visits can make the browser
//! POST a form to `http://127.0.0.1:PORT/evaluation` (no preflight for a multipart form) or,
//! by DNS rebinding, read answers under another `Host`. Every route needs the node's token
//! (`Authorization: Bearer TOKEN`), except a request that only a program on this machine
//! makes: from a loopback address, to a loopback `Host`, with no `Origin` and no
//! cross-site `Sec-Fetch-Site` (so the course statement's `curl -X POST
//! http://127.0.0.1:PORT/evaluation -F file=@all_projects.zip` works as written).
//!
//! The token is made at the first start, 32 random bytes in hex, in the data directory's
//! `http-token` (mode 0600); `teia token` prints it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The token file's name in the data directory.
pub const TOKEN_FILE: &str = "http-token";

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
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
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
    let fetched_by_a_page = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| site != "none" && site != "same-origin");
    peer.ip().is_loopback()
        && host_is_loopback
        && !headers.contains_key(header::ORIGIN)
        && !fetched_by_a_page
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
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

/// The middleware: a request without the token that a local program would not make is
/// answered 401 (403 when it came from a web page), before any route sees it.
pub(crate) async fn require_token(
    State(token): State<std::sync::Arc<str>>,
    ConnectInfo(crate::limits::Peer(peer)): ConnectInfo<crate::limits::Peer>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if has_token(headers, &token) || local_program(peer, headers) {
        return next.run(request).await;
    }
    let from_a_page =
        headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site");
    let (status, error) = if from_a_page {
        (
            StatusCode::FORBIDDEN,
            "requests from web pages need the node's token (Authorization: Bearer TOKEN; `teia token` prints it)",
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
