//! The node's services over HTTP, beside seed 000's routes: peers and links, the chat, shared
//! folders, searches, downloads and approvals (`/api/...`), and the live events
//! (`GET /events`, server-sent events: the same objects as `teia node --json`). Every route
//! is behind the token's guard ([`crate::guard`]); docs/HTTP.md has each with a curl example.
//!
//! **Bounds**: a chat text of [`MAX_CHAT_TEXT`] bytes (more is a 413), a destination, path,
//! search or target of [`MAX_TEXT`] bytes (more is a 400); [`MAX_FILES_LISTED`] shared files
//! listed; the `/events`
//! streams as [`crate::live`] says, each sending a keep-alive comment every
//! [`KEEP_ALIVE`] (under the connections' idle timeout) and ending when the node stops.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use teia_files::proto::tree::Hash;
use teia_files::{Files, FilesError};
use teia_node::chat::Chat;
use teia_node::node::{NodeError, NodeHandle};
use tokio::sync::{broadcast, watch};

use crate::live::Live;
use crate::Problem;

/// Bytes of one chat text at most.
pub const MAX_CHAT_TEXT: usize = 16 * 1024;
/// Bytes of a path or a search's text at most.
pub const MAX_TEXT: usize = 4096;
/// Shared files `GET /api/shares` lists at most (the count says how many there are).
pub const MAX_FILES_LISTED: usize = 1000;
/// Time between two keep-alive comments on an `/events` stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The node's services the API drives.
#[derive(Clone)]
pub struct NodeServices {
    /// This node's id (`name@namespace`).
    pub peer_id: String,
    /// The node (links, peers, counters).
    pub node: NodeHandle,
    /// The chat.
    pub chat: Chat,
    /// File sharing.
    pub files: Files,
    /// The live events.
    pub live: Arc<Live>,
}

#[derive(Clone)]
struct ApiState {
    services: NodeServices,
    stopping: watch::Receiver<bool>,
}

/// The routes, for a node whose API stops streaming events once `stopping` turns true.
pub(crate) fn routes<S>(services: NodeServices, stopping: watch::Receiver<bool>) -> Router<S> {
    Router::new()
        .route("/api/node", get(node))
        .route("/api/peers", get(peers))
        .route("/api/chat", get(chat_history).post(chat_send))
        .route("/api/shares", get(shares).post(share).delete(unshare))
        .route("/api/search", post(search))
        .route("/api/downloads", get(downloads).post(download))
        .route("/api/downloads/{hash}", axum::routing::delete(cancel))
        .route("/api/approvals", get(approvals))
        .route("/api/approvals/{id}", post(answer))
        .route("/events", get(events))
        .with_state(ApiState { services, stopping })
}

impl From<NodeError> for Problem {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Api(teia_core::overlay::ApiError::Busy(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            NodeError::Api(teia_core::overlay::ApiError::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Api(_) => StatusCode::BAD_REQUEST,
            NodeError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Bind { .. } | NodeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl From<FilesError> for Problem {
    fn from(e: FilesError) -> Self {
        let status = match &e {
            FilesError::Invalid(_) | FilesError::Share { .. } | FilesError::Path { .. } => {
                StatusCode::BAD_REQUEST
            }
            FilesError::Stopped | FilesError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            FilesError::Store(_) | FilesError::DownloadDir { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self(status, e.to_string())
    }
}

fn bad(detail: impl Into<String>) -> Problem {
    Problem(StatusCode::BAD_REQUEST, detail.into())
}

/// A JSON body whose rejection (not JSON, a field missing) is answered as every error is,
/// `{"error": ...}`.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(body)| Self(body))
            .map_err(|e| Problem(e.status(), e.body_text()))
    }
}

/// A query whose rejection is answered as every error is.
struct Params<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(query)| Self(query))
            .map_err(|e| Problem(e.status(), e.body_text()))
    }
}

/// A text field of at most `max` bytes (more is `too_long`), not empty.
fn bounded<'a>(
    name: &str,
    text: &'a str,
    max: usize,
    too_long: StatusCode,
) -> Result<&'a str, Problem> {
    let text = text.trim();
    if text.is_empty() {
        return Err(bad(format!("`{name}` is empty")));
    }
    if text.len() > max {
        return Err(Problem(
            too_long,
            format!("`{name}` has {} bytes; at most {max}", text.len()),
        ));
    }
    Ok(text)
}

/// A destination, path, search or target: [`MAX_TEXT`] bytes at most.
fn short_text<'a>(name: &str, text: &'a str) -> Result<&'a str, Problem> {
    bounded(name, text, MAX_TEXT, StatusCode::BAD_REQUEST)
}

async fn node(State(state): State<ApiState>) -> Result<Json<Value>, Problem> {
    let snapshot = state.services.node.snapshot().await?;
    let c = snapshot.counters;
    Ok(Json(json!({
        "peer_id": state.services.peer_id,
        "key": snapshot.key.map(|k| k.to_string()),
        "listen": state.services.node.listen_addr().map(|a| a.to_string()),
        "links": snapshot.neighbours.len(),
        "counters": {"sent":c.sent,"received":c.received,"forwarded":c.forwarded,
                     "duplicates":c.duplicates,"errors":c.errors,"delivered":c.delivered,
                     "dropped":c.dropped,"forged":c.forged},
    })))
}

async fn peers(State(state): State<ApiState>) -> Result<Json<Value>, Problem> {
    let snapshot = state.services.node.snapshot().await?;
    let links: Vec<Value> = snapshot
        .neighbours
        .iter()
        .map(|n| {
            json!({"peer":n.peer,"addr":n.addr.to_string(),"inbound":n.inbound,
                   "encrypted":n.encrypted,"teia":n.teia,
                   "key":n.key.map(|k| k.to_string()),
                   "fingerprint":n.key.map(|k| k.fingerprint()),
                   "rtt_ms":n.rtt.map(|r| r.as_secs_f64() * 1000.0),
                   "sent":n.sent,"received":n.received})
        })
        .collect();
    let linked: Vec<&str> = snapshot
        .neighbours
        .iter()
        .map(|n| n.peer.as_str())
        .collect();
    let known: Vec<Value> = snapshot
        .known
        .iter()
        .filter(|(peer, _)| !linked.contains(&peer.as_str()))
        .map(|(peer, addr)| json!({"peer":peer,"addr":addr.to_string()}))
        .collect();
    let routes: Vec<Value> = snapshot
        .routes
        .iter()
        .map(|r| json!({"dst":r.dst,"next_hop":r.next_hop,"hops":r.hops,"age_s":r.age.as_secs()}))
        .collect();
    Ok(Json(json!({
        "peer_id": state.services.peer_id,
        "links": links,
        "known": known,
        "routes": routes,
    })))
}

async fn chat_history(State(state): State<ApiState>) -> Json<Vec<crate::live::ChatEntry>> {
    Json(state.services.live.chat())
}

/// `POST /api/chat`'s body.
#[derive(Deserialize)]
struct Say {
    /// `name@namespace`, `#namespace` or `*`.
    to: String,
    /// What to say.
    text: String,
}

async fn chat_send(
    State(state): State<ApiState>,
    Body(say): Body<Say>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let text = bounded(
        "text",
        &say.text,
        MAX_CHAT_TEXT,
        StatusCode::PAYLOAD_TOO_LARGE,
    )?;
    let to = short_text("to", &say.to)?;
    // Said on a task of its own: a client that goes away mid-request does not cut it
    // between its SEND and the `sent` event every interface shows.
    let chat = state.services.chat.clone();
    let (dst, payload) = (to.to_owned(), Value::String(text.into()));
    let msg_id = tokio::spawn(async move { chat.say(&dst, payload).await })
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"msg_id": msg_id, "dst": to})),
    ))
}

async fn shares(State(state): State<ApiState>) -> Result<Json<Value>, Problem> {
    let (folders, files) = state.services.files.shared()?;
    let count = files.len();
    let listed: Vec<Value> = files
        .into_iter()
        .take(MAX_FILES_LISTED)
        .map(|f| json!({"name":f.name,"size":f.size,"hash":f.hash.to_hex()}))
        .collect();
    Ok(Json(
        json!({"folders": folders, "file_count": count, "files": listed}),
    ))
}

/// A shared folder's path, in a body or a query.
#[derive(Deserialize)]
struct SharedPath {
    path: String,
}

async fn share(
    State(state): State<ApiState>,
    Body(body): Body<SharedPath>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let path = PathBuf::from(short_text("path", &body.path)?);
    let summary = state.services.files.share(&path).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"path":summary.path,"files":summary.files,"bytes":summary.bytes})),
    ))
}

async fn unshare(
    State(state): State<ApiState>,
    Params(query): Params<SharedPath>,
) -> Result<StatusCode, Problem> {
    let path = PathBuf::from(short_text("path", &query.path)?);
    if state.services.files.unshare(&path)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem(
            StatusCode::NOT_FOUND,
            format!("{} is not shared", path.display()),
        ))
    }
}

/// `POST /api/search`'s body.
#[derive(Deserialize)]
struct SearchFor {
    text: String,
}

async fn search(
    State(state): State<ApiState>,
    Body(body): Body<SearchFor>,
) -> Result<Json<Value>, Problem> {
    let text = short_text("text", &body.text)?;
    let local = state.services.files.search(text).await?;
    let local: Vec<Value> = local
        .into_iter()
        .map(|f| json!({"name":f.name,"size":f.size,"hash":f.hash,"holder":state.services.peer_id}))
        .collect();
    Ok(Json(json!({"text": text, "local": local})))
}

fn download_json(info: &teia_files::DownloadInfo) -> Value {
    json!({"hash":info.hash.to_hex(),"name":info.name,"size":info.size,"bytes":info.bytes,
           "fetched":info.fetched,"rate":info.rate,"holders":info.holders,"eta_seconds":info.eta,
           "seconds":info.seconds})
}

async fn downloads(State(state): State<ApiState>) -> Json<Vec<Value>> {
    Json(
        state
            .services
            .files
            .downloads()
            .iter()
            .map(download_json)
            .collect(),
    )
}

/// `POST /api/downloads`' body.
#[derive(Deserialize)]
struct Fetch {
    /// A hash, or a name a search found.
    target: String,
}

async fn download(
    State(state): State<ApiState>,
    Body(body): Body<Fetch>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let target = short_text("target", &body.target)?;
    let started = state.services.files.get(target, None).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"download": started}))))
}

async fn cancel(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
) -> Result<StatusCode, Problem> {
    let hash = Hash::from_hex(&hash)
        .ok_or_else(|| bad(format!("{hash:?} is not a hash (64 hex digits)")))?;
    if state.services.files.cancel(hash) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem(
            StatusCode::NOT_FOUND,
            format!("no download of {} runs", hash.to_hex()),
        ))
    }
}

async fn approvals(State(state): State<ApiState>) -> Json<Vec<teia_files::PendingApproval>> {
    Json(state.services.files.pending_approvals())
}

/// `POST /api/approvals/{id}`'s body.
#[derive(Deserialize)]
struct Answer {
    allow: bool,
}

async fn answer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body<Answer>,
) -> Result<Json<Value>, Problem> {
    let id: u64 = id
        .parse()
        .map_err(|_| bad(format!("{id:?} is not a request id")))?;
    let files = &state.services.files;
    let answered = if body.allow {
        files.approve(id)
    } else {
        files.deny(id)
    };
    if !answered {
        return Err(Problem(
            StatusCode::NOT_FOUND,
            format!("no request {id} waits (answered, or timed out)"),
        ));
    }
    Ok(Json(json!({"id": id, "allow": body.allow})))
}

/// Time between two `evaluation_changed` events at most: faster changes are one event.
pub const EVALUATION_EVENTS_EVERY: Duration = Duration::from_millis(200);

/// Publishes `{"event":"evaluation_changed","id":N}` to the live events when an evaluation
/// changes, at most once per [`EVALUATION_EVENTS_EVERY`], until the node stops.
pub(crate) async fn publish_evaluations(
    mut changes: watch::Receiver<u64>,
    live: Arc<Live>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopping.changed() => return,
        }
        let id = *changes.borrow_and_update();
        live.publish(&json!({"event": "evaluation_changed", "id": id}));
        tokio::time::sleep(EVALUATION_EVENTS_EVERY).await;
    }
}

/// Time between two looks at the script jobs' count of changes.
pub const JOBS_LOOKED_EVERY: Duration = Duration::from_millis(500);

/// Publishes `{"event":"jobs_changed","queued":N,"running":N}` when the script jobs
/// changed (a job queued, leased, done or given back), looking every
/// [`JOBS_LOOKED_EVERY`] at the queue's count of changes (in memory), and once more a look
/// later (a job's result is stored just after the queue counts it done), until the node
/// stops.
pub(crate) async fn publish_jobs(
    master: teia_jobs::master::MasterHandle,
    live: Arc<Live>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut seen = master.changes();
    let mut again = false;
    let mut ticker = tokio::time::interval(JOBS_LOOKED_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopping.changed() => return,
        }
        let now = master.changes();
        let changed = now != seen;
        if changed || again {
            seen = now;
            live.publish(&json!({"event": "jobs_changed", "queued": master.waiting(),
                                 "running": master.running()}));
        }
        again = changed;
    }
}

async fn events(State(state): State<ApiState>) -> Response {
    let stream = event_stream(state.services.live.subscribe(), state.stopping.clone());
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// The events of `receiver` as server-sent events, until the node stops.
fn event_stream(
    receiver: broadcast::Receiver<Arc<str>>,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(
        (receiver, stopping),
        |(mut receiver, mut stopping)| async move {
            if *stopping.borrow() {
                return None;
            }
            let data = tokio::select! {
                received = receiver.recv() => match received {
                    Ok(text) => text.to_string(),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        json!({"event":"lagged","missed":missed}).to_string()
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = stopping.changed() => return None,
            };
            Some((Ok(Event::default().data(data)), (receiver, stopping)))
        },
    )
}
