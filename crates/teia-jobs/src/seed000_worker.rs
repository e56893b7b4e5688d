//! A teia worker in a seed 000 network (`teia worker --pytest-compat HOST:PORT`): the
//! runtime around [`crate::proto::seed000::Worker`]. One UDP socket; projects fetched over
//! their HTTP API (`GET /file/<project_id>`, a ZIP of the folder `<project_id>/`) and
//! unpacked off the async threads; modules run under the node's sandbox and limits (their
//! network is unauthenticated: never outside it); results posted to `POST /task`.
//!
//! Every task this worker starts (fetches, runs, posts) lives in one `JoinSet`, so all of
//! them end with [`run`].
//!
//! **Bounds**: a project's ZIP of at most [`MAX_PROJECT_ZIP`] bytes (a longer one is
//! dropped, and its tasks with it), unpacked within [`MAX_PROJECT_EXPANDED`]; each HTTP
//! exchange within [`HTTP_TIME`]; answers to a POST read up to 64 KiB; the state machine's
//! own bounds ([`crate::proto::seed000`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::bundle::{self, BundleError};
use crate::proto::seed000::{encode, Action, Counts, Note, Outgoing, Task, Worker, MAX_DATAGRAM};
use crate::runner::Runner;

/// Largest project ZIP fetched.
pub const MAX_PROJECT_ZIP: u64 = 256 * 1024 * 1024;
/// Bytes a project may expand to.
pub const MAX_PROJECT_EXPANDED: u64 = 1024 * 1024 * 1024;
/// Time one HTTP exchange (connect, request, whole answer) may take.
pub const HTTP_TIME: Duration = Duration::from_secs(60);
/// Longest answer to a `POST /task` read.
const MAX_POST_ANSWER: usize = 64 * 1024;

/// Where to join and how to work.
#[derive(Debug, Clone)]
pub struct Seed000Config {
    /// The advertised UDP address of the node to join through (their `HOST`).
    pub host: SocketAddr,
    /// The UDP address to bind.
    pub bind: SocketAddr,
    /// The address to advertise (its port 0: the bound port).
    pub advertise: SocketAddr,
    /// Modules run at once.
    pub slots: usize,
    /// Where projects are kept (`projects/`; modules run in the runner's work folder).
    pub work: PathBuf,
}

/// Why a project was not fetched.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    /// Not a 200.
    #[error("HTTP {0}")]
    Status(u16),
    /// Over [`MAX_PROJECT_ZIP`].
    #[error("the project is over {MAX_PROJECT_ZIP} bytes")]
    TooLarge,
    /// No answer in [`HTTP_TIME`].
    #[error("no answer in {}s", HTTP_TIME.as_secs())]
    TimedOut,
    /// The ZIP could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] BundleError),
    /// The ZIP holds no `tests/` folder.
    #[error("the ZIP has no tests/ folder")]
    NoTests,
    /// Unpacking stopped.
    #[error("{0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What a background task finished.
enum Done {
    Fetched {
        project: String,
        ok: bool,
    },
    Ran {
        task: String,
        counts: Option<Counts>,
    },
}

/// Works in the seed 000 network until the future is dropped, or the socket fails.
pub async fn run(config: Seed000Config, runner: Arc<Runner>) -> std::io::Result<()> {
    let socket = UdpSocket::bind(config.bind).await?;
    let me = if config.advertise.port() == 0 {
        SocketAddr::new(config.advertise.ip(), socket.local_addr()?.port())
    } else {
        config.advertise
    };
    tracing::info!(udp = %me, host = %config.host, "joining the seed 000 network");
    // Nothing of an earlier run is kept: projects are fetched again when their tasks come.
    let projects = config.work.join("projects");
    let _ = std::fs::remove_dir_all(&config.work);
    std::fs::create_dir_all(&projects)?;
    let mut worker = Worker::new(config.host, me, config.slots);
    let mut tasks = JoinSet::new();
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(64);
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut runs = 0u64;
    loop {
        while let Some(action) = worker.poll_action() {
            match action {
                Action::Send(outgoing) => send(&socket, me, &outgoing).await,
                Action::Fetch { project, api } => {
                    let done = done_tx.clone();
                    let dir = projects.clone();
                    tasks.spawn(async move {
                        let ok = match fetch_project(api, &project, &dir).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(%project, %api, error = %e, "project not fetched");
                                false
                            }
                        };
                        let _ = done.send(Done::Fetched { project, ok }).await;
                    });
                }
                Action::Run(task) => {
                    runs += 1;
                    // Under the runner's work folder: there a module is forked from the warm
                    // interpreter, already isolated, instead of starting a sandbox of its own.
                    let work = runner.work_dir().join(format!("pytest-{runs}"));
                    let project = projects.join(&task.project);
                    let runner = runner.clone();
                    let done = done_tx.clone();
                    let node = me.to_string();
                    tasks.spawn(async move {
                        let counts = run_task(&runner, &task, &project, &work, &node).await;
                        let _ = done
                            .send(Done::Ran {
                                task: task.id,
                                counts,
                            })
                            .await;
                    });
                }
                Action::Post { api, body } => {
                    tasks.spawn(async move {
                        let task = body
                            .get("task_id")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        match post_json(api, "/task", body.to_string()).await {
                            Ok(status) => tracing::info!(%task, %api, status, "result posted"),
                            Err(e) => tracing::warn!(%task, %api, error = %e, "result not posted"),
                        }
                    });
                }
                Action::Forget { project } => {
                    let dir = projects.join(project);
                    tasks.spawn_blocking(move || {
                        let _ = std::fs::remove_dir_all(dir);
                    });
                }
                Action::Note(note) => match note {
                    Note::Joined { id, via } => {
                        tracing::info!(%id, %via, "joined the seed 000 network");
                    }
                    Note::Rejoining => tracing::warn!("no peer heard from: joining again"),
                    Note::Took(task) => {
                        tracing::info!(task = %task.id, holder = %task.api, "task taken");
                    }
                    Note::NotFetched { project } => {
                        tracing::warn!(%project, "its tasks here are dropped");
                    }
                },
            }
        }
        let deadline = worker
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                let (n, from) = received?;
                let datagram = buffer.get(..n).unwrap_or_default();
                if let Err(e) = worker.handle_datagram(Instant::now(), datagram) {
                    tracing::debug!(%from, error = %e, "datagram dropped");
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => worker.handle_timeout(Instant::now()),
            Some(done) = done_rx.recv() => match done {
                Done::Fetched { project, ok } => worker.fetched(&project, ok),
                Done::Ran { task, counts } => worker.ran(&task, counts),
            },
            Some(ended) = tasks.join_next() => {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "a worker task failed");
                }
            }
        }
    }
}

/// Sends `outgoing` from `me`, stamped now; a failure is logged (UDP: their nodes send
/// again on their own timers).
pub(crate) async fn send(socket: &UdpSocket, me: SocketAddr, outgoing: &Outgoing) {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let Outgoing { to, cmd, data } = outgoing;
    match encode(me, cmd, data, stamp) {
        Ok(bytes) => {
            if let Err(e) = socket.send_to(&bytes, to).await {
                tracing::debug!(%to, cmd, error = %e, "not sent");
            }
        }
        Err(e) => tracing::warn!(%to, cmd, error = %e, "not sent"),
    }
}

/// Runs one task's module: `tests/<module>` of the project.
async fn run_task(
    runner: &Runner,
    task: &Task,
    project: &Path,
    work: &Path,
    node: &str,
) -> Option<Counts> {
    let module = format!("tests/{}", task.module);
    // A folder of the same name left by an earlier run of the worker.
    let _ = tokio::fs::remove_dir_all(work).await;
    let outcome = runner
        .run_module(project, &module, &[], None, work, node)
        .await;
    let _ = tokio::fs::remove_dir_all(work).await;
    match outcome {
        Ok(outcome) => {
            let result = outcome.result;
            tracing::info!(task = %task.id, passed = result.passed, failed = result.failed,
                errors = result.errors, "module ran");
            Some(Counts {
                passed: result.passed,
                failed: result.failed + result.errors,
                seconds: result.seconds,
            })
        }
        Err(e) => {
            tracing::warn!(task = %task.id, error = %e, "module not run");
            None
        }
    }
}

/// Opens an HTTP/1.1 connection to `api`.
async fn connect(
    api: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, FetchError> {
    let stream = TcpStream::connect(api).await?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP connection ended");
        }
    });
    Ok(sender)
}

/// Fetches `GET http://{api}/file/{project}` into `dir/{project}/` (the ZIP's folder
/// `{project}/`, or its root when the root holds `tests/`).
async fn fetch_project(api: SocketAddr, project: &str, dir: &Path) -> Result<(), FetchError> {
    let zip = dir.join(format!(".{project}.zip"));
    let unpacked = dir.join(format!(".{project}.unpacking"));
    let result = tokio::time::timeout(HTTP_TIME, download(api, project, &zip))
        .await
        .map_err(|_| FetchError::TimedOut)
        .and_then(|r| r);
    let result = match result {
        Ok(()) => {
            let (zip, unpacked, target) = (zip.clone(), unpacked.clone(), dir.join(project));
            let project = project.to_owned();
            tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
                let _ = std::fs::remove_dir_all(&unpacked);
                bundle::unpack_within(&zip, &unpacked, MAX_PROJECT_EXPANDED)?;
                let inner = unpacked.join(&project);
                let root = if inner.join("tests").is_dir() {
                    inner
                } else if unpacked.join("tests").is_dir() {
                    unpacked.clone()
                } else {
                    return Err(FetchError::NoTests);
                };
                let _ = std::fs::remove_dir_all(&target);
                std::fs::rename(root, &target)?;
                Ok(())
            })
            .await?
        }
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&zip).await;
    let _ = tokio::fs::remove_dir_all(&unpacked).await;
    result
}

/// Streams the project's ZIP to `to`, within [`MAX_PROJECT_ZIP`].
async fn download(api: SocketAddr, project: &str, to: &Path) -> Result<(), FetchError> {
    let mut sender = connect(api).await?;
    let request = hyper::Request::get(format!("/file/{}", encode_path(project)))
        .header(hyper::header::HOST, api.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    if response.status() != hyper::StatusCode::OK {
        return Err(FetchError::Status(response.status().as_u16()));
    }
    let mut body = response.into_body();
    let mut file = tokio::fs::File::create(to).await?;
    let mut written: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        written += data.len() as u64;
        if written > MAX_PROJECT_ZIP {
            return Err(FetchError::TooLarge);
        }
        file.write_all(&data).await?;
    }
    file.flush().await?;
    Ok(())
}

/// `POST http://{api}{path}` with a JSON body; the answer's status.
async fn post_json(api: SocketAddr, path: &str, body: String) -> Result<u16, FetchError> {
    let exchange = async {
        let mut sender = connect(api).await?;
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, api.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let answer = http_body_util::Limited::new(response.into_body(), MAX_POST_ANSWER);
        let _ = answer.collect().await;
        Ok(status)
    };
    tokio::time::timeout(HTTP_TIME, exchange)
        .await
        .map_err(|_| FetchError::TimedOut)?
}

/// Percent-encodes what a path segment cannot hold as is.
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
