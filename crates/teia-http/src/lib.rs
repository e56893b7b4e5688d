//! teia's HTTP API (`teia node --http ADDR`), the routes of seed 000's course statement:
//! `POST /evaluation` (a ZIP as `multipart/form-data` field `file`, or JSON
//! `{"auth_token", "projects": [git URLs]}`), `GET /evaluation`, `GET /evaluation/<id>`,
//! `GET /stats` and `GET /network`; script jobs (seed 001) on a node with
//! `--tasks-dir`: `POST /jobs` (a ZIP with `main.py`, field `file`) and `GET /jobs/<id>`;
//! the node's other services ([`api`]: `/api/...` and the live `/events`), `/metrics`
//! ([`metrics`]) and the dashboard at `/` ([`web`]).
//! Every error is a 4xx or 5xx with `{"error": "..."}`. Every route is behind [`guard`]:
//! the node's token (or its cookie), or a request only a program on this machine makes.
//!
//! Bounds: a request body of [`MAX_UPLOAD`] bytes at most (more is answered 413), 64
//! repositories per submission, URLs of 2,048 bytes; connections as [`limits`] says.

pub mod answers;
pub mod api;
pub mod guard;
pub mod history;
pub mod limits;
pub mod live;
mod metrics;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use answers::{Created, Detail, ErrorAnswer, JobCreated, Listed, Stats};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use teia_jobs::engine::{Engine, EngineError, SubmitOptions};
use teia_jobs::master::{JobError, MasterHandle};
use teia_jobs::seed000_members::{MembersError, MembersHandle};

/// Bytes a request body may have at most.
pub const MAX_UPLOAD: usize = 256 * 1024 * 1024;
/// Repositories one JSON submission may list at most.
pub const MAX_REPOSITORIES: usize = 64;
/// Bytes a seed 000 node's `POST /task` may have at most.
pub const MAX_COURSE_RESULT: usize = 64 * 1024;
/// Evaluations `GET /evaluation` lists at most (`?offset=O&limit=L` pages through them).
pub const MAX_LISTED: usize = 1000;

/// What `/network` shows: each node's address and the addresses it has links to.
pub type NetworkView = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Value> + Send>> + Send + Sync>;

/// The services the API answers for.
#[derive(Clone)]
pub struct Services {
    /// The job engine (evaluations).
    pub engine: Engine,
    /// The seed 001 task queue, on a node with `--tasks-dir`.
    pub master: Option<MasterHandle>,
    /// Seed 000's nodes working for this one, on a node with `--pytest-port`.
    pub seed000: Option<MembersHandle>,
    /// The node's other services (peers, chat, files, live events), for `/api`, `/events`,
    /// `/metrics` and the dashboard.
    pub node: Option<api::NodeServices>,
}

#[derive(Clone)]
struct App {
    engine: Engine,
    master: Option<MasterHandle>,
    seed000: Option<MembersHandle>,
    node: Option<api::NodeServices>,
    network: NetworkView,
    uploads: std::path::PathBuf,
}

/// An error answer.
pub(crate) struct Problem(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorAnswer { error: self.1 })).into_response()
    }
}

impl From<EngineError> for Problem {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Bundle(_) | EngineError::Clone { .. } | EngineError::Refused { .. } => {
                StatusCode::BAD_REQUEST
            }
            EngineError::Busy | EngineError::ClonesBusy => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            EngineError::Store(_) | EngineError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

/// Serves the API on `listener` until `stop` completes; requests need `token` unless only
/// a program on this machine makes them ([`guard`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    services: Services,
    network: NetworkView,
    uploads: std::path::PathBuf,
    token: String,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Uploads left by a node that stopped mid-upload: nothing refers to them.
    let _ = std::fs::remove_dir_all(&uploads);
    std::fs::create_dir_all(&uploads)?;
    let keys = Arc::new(guard::Keys::new(token, listener.local_addr()?.port())?);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    // The live streams end first: a graceful shutdown waits for every connection.
    let stop = async move {
        stop.await;
        let _ = stopping_tx.send(true);
    };
    let app = App {
        engine: services.engine,
        master: services.master,
        seed000: services.seed000,
        node: services.node.clone(),
        network,
        uploads,
    };
    // Seed 000's nodes have no token: their two routes answer only the addresses of the
    // nodes that joined (and nothing a web page sends), outside the token's guard.
    let course = Router::new()
        .route("/file/{id}", get(course_file))
        .route("/task", axum::routing::post(course_task))
        .layer(DefaultBodyLimit::max(MAX_COURSE_RESULT))
        .with_state(app.clone());
    let mut router = Router::new()
        .route("/evaluation", get(list).post(submit))
        .route("/evaluation/{id}", get(detail))
        .route("/stats", get(stats))
        .route("/network", get(network_view))
        .route("/jobs", get(list_jobs).post(submit_job))
        .route("/jobs/{id}", get(job_detail))
        .route("/jobs/{id}/result", get(job_result))
        .route("/metrics", get(metrics::metrics))
        .merge(web::routes(Arc::from(keys.csrf.as_str())));
    if let Some(node) = services.node {
        tokio::spawn(api::publish_evaluations(
            app.engine.changes(),
            std::sync::Arc::clone(&node.live),
            stopping.clone(),
        ));
        if let Some(master) = &app.master {
            tokio::spawn(api::publish_jobs(
                master.clone(),
                std::sync::Arc::clone(&node.live),
                stopping.clone(),
            ));
        }
        router = router.merge(api::routes(node, stopping));
    }
    let router = router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .layer(axum::middleware::from_fn_with_state(
            keys,
            guard::require_token,
        ))
        .with_state(app)
        .merge(course)
        .layer(axum::middleware::from_fn(web::security_headers));
    axum::serve(
        limits::BoundedListener::new(listener),
        router.into_make_service_with_connect_info::<limits::Peer>(),
    )
    .with_graceful_shutdown(stop)
    .await
}

/// Binds `addr` (a bare port means 127.0.0.1).
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = match addr.parse::<u16>() {
        Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)).to_string(),
        Err(_) => addr.to_owned(),
    };
    tokio::net::TcpListener::bind(addr).await
}

async fn not_found() -> Problem {
    Problem(
        StatusCode::NOT_FOUND,
        "no such route: the dashboard is at /; the API has /evaluation, /stats, /network, \
         /jobs, /api/node, /api/peers, /api/chat, /api/shares, /api/search, /api/downloads, \
         /api/approvals, /events and /metrics (docs/HTTP.md)"
            .into(),
    )
}

/// `?offset=O&limit=L` of `GET /evaluation` (other or malformed parameters are ignored).
fn page(uri: &axum::http::Uri) -> (usize, usize) {
    let mut page = (0, MAX_LISTED);
    for pair in uri.query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("offset", value)) => page.0 = value.parse().unwrap_or(0),
            Some(("limit", value)) => {
                page.1 = value.parse().unwrap_or(MAX_LISTED).min(MAX_LISTED);
            }
            _ => {}
        }
    }
    page
}

async fn list(State(app): State<App>, uri: axum::http::Uri) -> Json<Vec<Listed>> {
    let (offset, limit) = page(&uri);
    let evaluations = app.engine.evaluations(offset, limit);
    Json(evaluations.iter().map(Listed::from).collect())
}

async fn detail(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Detail>, Problem> {
    let id: u64 = id.parse().map_err(|_| {
        Problem(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an evaluation id (a non-negative integer)"),
        )
    })?;
    let evaluation = app
        .engine
        .evaluation(id)
        .ok_or_else(|| Problem(StatusCode::NOT_FOUND, format!("no evaluation {id}")))?;
    Ok(Json(Detail::of(&evaluation, unix_ms())))
}

async fn stats(State(app): State<App>) -> Json<Stats> {
    Json(Stats {
        all: app.engine.totals(),
        nodes: app.engine.loads(),
    })
}

/// The time now, in Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn network_view(State(app): State<App>) -> Json<Value> {
    Json((app.network)().await)
}

/// The submission's options from its query: `?cache=false` (or `0`, `no`, `off`) runs every
/// module, whatever the result cache holds; `?rerun_failures=N` (0 to
/// [`teia_jobs::engine::MAX_RERUNS`]) runs failed tests again N times at most (another
/// value is a `400`); `?split=false` runs each module whole.
fn submit_options(query: Option<&str>) -> Result<SubmitOptions, Problem> {
    let mut options = SubmitOptions::default();
    let pairs = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='));
    for (name, value) in pairs {
        match name {
            "cache" => {
                options.use_cache = !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "false" | "0" | "no" | "off"
                );
            }
            "split" => {
                options.split = !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "false" | "0" | "no" | "off"
                );
            }
            "rerun_failures" => {
                let times = value
                    .parse::<u32>()
                    .ok()
                    .filter(|t| *t <= teia_jobs::engine::MAX_RERUNS)
                    .ok_or_else(|| {
                        Problem(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "rerun_failures={value:?}: give a number from 0 to {}",
                                teia_jobs::engine::MAX_RERUNS
                            ),
                        )
                    })?;
                options.rerun_failures = Some(times);
            }
            _ => {}
        }
    }
    Ok(options)
}

async fn submit(State(app): State<App>, request: Request) -> Result<Response, Problem> {
    let options = submit_options(request.uri().query())?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let id = if content_type.starts_with("multipart/form-data") {
        let multipart = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
            .await
            .map_err(|e| Problem(StatusCode::BAD_REQUEST, e.body_text()))?;
        submit_zip(&app, multipart, options).await?
    } else if content_type.starts_with("application/json") {
        let Json(body) =
            <Json<Value> as axum::extract::FromRequest<()>>::from_request(request, &())
                .await
                .map_err(|e| Problem(StatusCode::BAD_REQUEST, e.body_text()))?;
        submit_json(&app, &body, options).await?
    } else {
        return Err(Problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send multipart/form-data with a `file` field (a ZIP), or application/json \
             {\"auth_token\": ..., \"projects\": [git URLs]}"
                .into(),
        ));
    };
    // Answered once the projects are at enough nodes of the cluster (or a while passed).
    app.engine.wait_replicated(id).await;
    let created = Created {
        id,
        eval_id: id.to_string(),
        status: "submitted",
        warning: app.engine.warning(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn submit_zip(
    app: &App,
    multipart: Multipart,
    options: SubmitOptions,
) -> Result<u64, Problem> {
    let upload = save_upload(app, multipart).await?;
    let engine = app.engine.clone();
    let archive = upload.path.clone();
    let result = tokio::task::spawn_blocking(move || engine.submit_zip_with(&archive, options))
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    drop(upload);
    result.map_err(Problem::from)
}

/// An uploaded file, removed when dropped: an upload that fails or is aborted halfway
/// leaves nothing behind.
struct Upload {
    path: std::path::PathBuf,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Saves the form's `file` field in the uploads folder.
async fn save_upload(app: &App, mut multipart: Multipart) -> Result<Upload, Problem> {
    use tokio::io::AsyncWriteExt;
    let bad = |detail: String| Problem(StatusCode::BAD_REQUEST, detail);
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|e| bad(format!("malformed form: {}", e.body_text())))?;
        let Some(mut field) = field else {
            return Err(bad("no `file` field in the form".into()));
        };
        if field.name() != Some("file") {
            continue;
        }
        let upload = Upload {
            path: app.uploads.join(format!(
                "upload-{}-{}.zip",
                std::process::id(),
                UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
        };
        let mut out = tokio::fs::File::create(&upload.path)
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut size = 0usize;
        while let Some(chunk) = field.chunk().await.map_err(|e| {
            let status = e.status();
            Problem(status, format!("upload failed: {}", e.body_text()))
        })? {
            size += chunk.len();
            out.write_all(&chunk)
                .await
                .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
        // A tokio file finishes its last write in the background unless flushed.
        out.flush()
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        drop(out);
        if size == 0 {
            return Err(bad("the `file` field is empty".into()));
        }
        return Ok(upload);
    }
}

/// The task queue, or why there is none.
fn master(app: &App) -> Result<MasterHandle, Problem> {
    app.master.clone().ok_or_else(|| {
        Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node takes script jobs only when started with --tasks-dir DIR".into(),
        )
    })
}

async fn submit_job(State(app): State<App>, request: Request) -> Result<Response, Problem> {
    let master = master(&app)?;
    let multipart = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
        .await
        .map_err(|e| {
            Problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "send multipart/form-data with a `file` field (a ZIP with main.py): {}",
                    e.body_text()
                ),
            )
        })?;
    let upload = save_upload(&app, multipart).await?;
    let archive = upload.path.clone();
    let size = std::fs::metadata(&archive).map_or(0, |m| m.len());
    let submitter = master.clone();
    let result = tokio::task::spawn_blocking(move || submitter.submit(&archive))
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    drop(upload);
    let id = result.map_err(|e| {
        let status = match e {
            JobError::NotATask(_) => StatusCode::BAD_REQUEST,
            JobError::Queue(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Problem(status, e.to_string())
    })?;
    let created = JobCreated {
        id,
        warning: master.no_taker(size),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_jobs(State(app): State<App>) -> Result<Json<Value>, Problem> {
    let master = master(&app)?;
    tokio::task::spawn_blocking(move || Json(master.list()))
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Bytes of a result ZIP read and sent at once.
const RESULT_PIECE: usize = 256 * 1024;

/// `GET /jobs/<id>/result`: the job's result ZIP, streamed from its file.
async fn job_result(State(app): State<App>, Path(id): Path<String>) -> Result<Response, Problem> {
    let master = master(&app)?;
    let Some(path) = master.result(&id) else {
        return Err(Problem(
            StatusCode::NOT_FOUND,
            format!("no result for job {id:?}: unknown, or not done yet"),
        ));
    };
    stream_zip(&path, &format!("result_{id}.zip")).await
}

/// Answers the ZIP at `path`, streamed, as the attachment `name`.
async fn stream_zip(path: &std::path::Path, name: &str) -> Result<Response, Problem> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .len();
    let pieces = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut piece = vec![0u8; RESULT_PIECE];
        match file.read(&mut piece).await {
            Ok(0) => None,
            Ok(n) => {
                piece.truncate(n);
                Some((Ok(axum::body::Bytes::from(piece)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let disposition = format!("attachment; filename=\"{name}\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        axum::body::Body::from_stream(pieces),
    )
        .into_response())
}

async fn job_detail(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let master = master(&app)?;
    let answer = tokio::task::spawn_blocking(move || master.status(&id).ok_or(id))
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    answer
        .map(Json)
        .map_err(|id| Problem(StatusCode::NOT_FOUND, format!("no job {id:?}")))
}

static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn submit_json(app: &App, body: &Value, options: SubmitOptions) -> Result<u64, Problem> {
    let bad = |detail: &str| Problem(StatusCode::BAD_REQUEST, detail.to_owned());
    let projects = body
        .get("projects")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`projects` must be a list of git repository URLs"))?;
    if projects.is_empty() || projects.len() > MAX_REPOSITORIES {
        return Err(bad("`projects` must list 1 to 64 repositories"));
    }
    let mut urls = Vec::new();
    for project in projects {
        let url = project
            .as_str()
            .filter(|u| !u.trim().is_empty() && u.len() <= 2048 && !u.starts_with('-'))
            .ok_or_else(|| bad("each project must be a git URL (a string)"))?;
        urls.push(url.trim().to_owned());
    }
    let token = match body.get("auth_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) => Some(token.clone()),
        Some(_) => return Err(bad("`auth_token` must be a string")),
    };
    app.engine
        .submit_git_with(&urls, token.as_deref(), options)
        .await
        .map_err(Problem::from)
}

/// Whether a web page sent the request (browsers name the page's origin, or say the
/// request is cross-site): seed 000's nodes never do.
fn from_a_web_page(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none" && v.as_bytes() != b"same-origin")
}

fn members(app: &App, headers: &axum::http::HeaderMap) -> Result<MembersHandle, Problem> {
    if from_a_web_page(headers) {
        return Err(Problem(
            StatusCode::FORBIDDEN,
            "seed 000 routes do not answer web pages".into(),
        ));
    }
    app.seed000.clone().ok_or_else(|| {
        Problem(
            StatusCode::NOT_FOUND,
            "this node takes no seed 000 nodes (start it with --pytest-port)".into(),
        )
    })
}

fn members_problem(e: MembersError) -> Problem {
    match e {
        MembersError::Refused(refusal) => Problem(StatusCode::CONFLICT, refusal.to_string()),
        MembersError::Unavailable => Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /file/<project_id>`: a project announced to seed 000's nodes, as a ZIP of the
/// folder `<project_id>/`, for the nodes that joined.
async fn course_file(
    State(app): State<App>,
    axum::extract::ConnectInfo(limits::Peer(peer)): axum::extract::ConnectInfo<limits::Peer>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let members = members(&app, &headers)?;
    match members
        .file(peer.ip(), &id)
        .await
        .map_err(members_problem)?
    {
        Some(path) => stream_zip(&path, &format!("{id}.zip")).await,
        None => Err(Problem(StatusCode::NOT_FOUND, "File not found".into())),
    }
}

/// `POST /task`: a seed 000 node's result, counted only from the node the module is
/// handed to.
async fn course_task(
    State(app): State<App>,
    axum::extract::ConnectInfo(limits::Peer(peer)): axum::extract::ConnectInfo<limits::Peer>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Problem> {
    let members = members(&app, &headers)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    if !json {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            "Invalid content type".into(),
        ));
    }
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        Problem(
            StatusCode::BAD_REQUEST,
            format!("the result is not JSON: {e}"),
        )
    })?;
    members
        .result(peer.ip(), body)
        .await
        .map_err(members_problem)?;
    Ok(Json(serde_json::json!({"status": "success"})).into_response())
}
