//! The seed 001 master on a teia node: course workers (written by others, in Python)
//! discover it by UDP broadcast, register, heartbeat, pull the ZIPs dropped in the tasks
//! folder, and return their results, which are written to the results folder as
//! `result_<task>.zip` (as the seed's master does). The protocol decisions are in
//! [`crate::proto::seed001`]; this is the I/O around them.
//!
//! A task is done when its result file exists: results are written (to a file beside,
//! then renamed) before the worker hears `OK`, so a master killed at any time loses
//! nothing acknowledged, and a restarted one hands out only the tasks without a result.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use teia_core::rate::RateLimiter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::proto::seed001::{
    encode, parse, Budget, Cidr, Envelope, Failed, Framer, Gate, Master, MessageError, Reply,
    Request, Spent, Submitted, Task, Unwelcome, WorkerKey, COURSE_TASK_FITS, MAX_PACKAGE,
};
use crate::runner::Runner;
use teia_node::sync;

/// Course-worker connections served at once, all sources together; more wait (in the
/// kernel's queue) for a free one.
pub const MAX_CONNECTIONS: usize = 256;

/// Connections one source IP address may have open at once; one more is answered an error
/// and closed at once (a course worker uses one or two at a time).
pub const MAX_PER_SOURCE: usize = 16;

/// Bytes of messages being received, all connections together (past the first
/// [`UNCOUNTED`] of each); a connection whose next piece would pass it is answered an error
/// and closed, the piece not kept. Parsing and decoding a whole message take about as much
/// again while it is handled.
pub const BUFFER_BUDGET: usize = 64 * 1024 * 1024;

/// Bytes of messages being received from one source address, all its connections
/// together: one message of [`crate::proto::seed001::MAX_MESSAGE`] and some; past it, as
/// past [`BUFFER_BUDGET`]. One source cannot spend the whole budget.
pub const SOURCE_BUDGET: usize = 20 * 1024 * 1024;

/// The first bytes of each connection, not counted in the budget (a whole small request:
/// register, heartbeat, ask for a task, a small result), so that a spent budget does not
/// stop those; they are bounded by [`MAX_CONNECTIONS`] instead (4 MiB in all).
pub const UNCOUNTED: usize = 16 * 1024;

/// Time a connection may send nothing (before its first byte too) before it is closed;
/// also the time it has to take its answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a worker has to send its whole message.
pub const READ_TIME: Duration = Duration::from_secs(30);

/// Period of the scan of the tasks folder and of the lease check.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Jobs `GET /jobs` lists at most (its counts cover them all).
pub const MAX_LISTED: usize = 1000;

/// Time an idle local worker waits before it looks at the queue again (it is woken sooner
/// when a task is queued).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// Time a file of the tasks folder that is not a whole ZIP yet may still be being written;
/// older, it is given up as not a task.
const SETTLE: Duration = Duration::from_secs(10);

/// Bytes read and dropped after a refused message, before closing.
const DRAINED: usize = 1024 * 1024;

/// Bytes read from a connection at a time.
const READ_BUFFER: usize = UNCOUNTED;

/// Largest UDP datagram read; a discovery answer is well under it.
const MAX_DATAGRAM: usize = 1024;

/// Where the master listens and keeps its files.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// ZIPs to hand out (`main.py`, `input.csv`, ...).
    pub tasks: PathBuf,
    /// Where `result_<task>.zip` files go.
    pub results: PathBuf,
    /// The TCP address course workers connect to.
    pub listen: SocketAddr,
    /// UDP ports answering `DISCOVER_MASTER` (course workers use 9999 and 55001).
    pub discovery_ports: Vec<u16>,
    /// Networks course workers may connect (and discover the master) from; others are
    /// refused at accept. Empty: none.
    pub allow: Vec<Cidr>,
    /// The node's own workers for these tasks: how many run at once (0: none, the tasks
    /// go to course workers only), the runner, and where they work.
    pub local: Option<LocalWorkers>,
}

/// The node's own workers for seed 001 tasks.
#[derive(Clone)]
pub struct LocalWorkers {
    /// Tasks run at once.
    pub slots: usize,
    /// Runs them.
    pub runner: Arc<Runner>,
    /// The node's peer id, recorded in the results they make.
    pub node: String,
}

impl std::fmt::Debug for LocalWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorkers")
            .field("slots", &self.slots)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A folder could not be made.
    #[error("cannot make {path}: {source}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A port could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

struct Shared {
    config: MasterConfig,
    master: Mutex<Master>,
    /// Who may connect, and how many connections each source has open.
    gate: Mutex<Gate>,
    /// Bytes of messages being received.
    budget: Mutex<Budget>,
    /// Refused connections are logged at most once a second per source.
    refusals: Mutex<RateLimiter<IpAddr>>,
    /// When the master started, for the rate limiter's clock.
    origin: Instant,
    port: u16,
    /// Woken when tasks are queued (the node's announcement to its cluster).
    queued: tokio::sync::Notify,
    /// Nodes of the cluster heard lately (set by the node's announcer; none without one):
    /// they may take tasks.
    cluster_members: std::sync::atomic::AtomicUsize,
    /// Wakes the idle local workers when tasks are queued.
    wake: tokio::sync::Notify,
}

impl Shared {
    /// Says that tasks wait: to the cluster's announcer and to idle local workers.
    fn queued(&self) {
        self.queued.notify_one();
        self.wake.notify_waiters();
    }
}

/// The master's queue, locked.
fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Master> {
    sync::lock(&shared.master)
}

/// The networks course workers may connect from when `--master-allow` is not given: those
/// of the machine's interfaces, and loopback.
pub fn default_allow() -> Vec<Cidr> {
    let mut allow = Vec::new();
    let loopback = [
        (IpAddr::V4(Ipv4Addr::LOCALHOST), 8),
        (IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
    ];
    for (ip, prefix) in loopback
        .into_iter()
        .chain(teia_node::lan::interface_networks())
    {
        if let Ok(net) = Cidr::new(ip, prefix) {
            if !allow.contains(&net) {
                allow.push(net);
            }
        }
    }
    allow
}

/// Starts the master: binds its ports, then serves until the runtime stops. Returns the
/// TCP address it listens on.
pub async fn start(config: MasterConfig) -> Result<(SocketAddr, MasterHandle), MasterError> {
    for path in [&config.tasks, &config.results] {
        std::fs::create_dir_all(path).map_err(|source| MasterError::Folder {
            path: path.clone(),
            source,
        })?;
    }
    remove_partials(&config.results);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| MasterError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| MasterError::Bind {
        addr: config.listen,
        source,
    })?;
    let mut sockets = Vec::new();
    for port in &config.discovery_ports {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| MasterError::Bind { addr, source })?;
        sockets.push(socket);
    }
    let gate = Gate::new(config.allow.clone(), MAX_PER_SOURCE);
    let shared = Arc::new(Shared {
        config,
        master: Mutex::new(Master::default()),
        gate: Mutex::new(gate),
        budget: Mutex::new(Budget::new(BUFFER_BUDGET, SOURCE_BUDGET, UNCOUNTED)),
        refusals: Mutex::new(RateLimiter::new(1, 1, 1024)),
        origin: Instant::now(),
        port: bound.port(),
        queued: tokio::sync::Notify::new(),
        cluster_members: std::sync::atomic::AtomicUsize::new(0),
        wake: tokio::sync::Notify::new(),
    });
    scan(&shared);
    let allow: Vec<String> = shared.config.allow.iter().map(Cidr::to_string).collect();
    tracing::info!(
        %bound,
        discovery = ?shared.config.discovery_ports,
        allow = %allow.join(","),
        tasks = %shared.config.tasks.display(),
        "seed 001 master listening"
    );
    let scanner = Arc::clone(&shared);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SCAN_EVERY).await;
            for task in lock(&scanner).expire(Instant::now()) {
                tracing::warn!(%task, "a worker went silent; its task goes to another");
            }
            scan(&scanner);
        }
    });
    for socket in sockets {
        let answering = Arc::clone(&shared);
        tokio::spawn(async move { answer_discovery(socket, answering).await });
    }
    let accepting = Arc::clone(&shared);
    tokio::spawn(async move {
        let shared = accepting;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let admitted = sync::lock(&shared.gate).admit(peer.ip());
            if let Err(why) = admitted {
                refuse(&shared, stream, peer, why);
                continue;
            }
            let serving = Arc::clone(&shared);
            tokio::spawn(async move {
                let _open = Admitted {
                    gate: &serving.gate,
                    ip: peer.ip(),
                };
                serve(stream, peer, &serving).await;
                drop(permit);
            });
        }
    });
    if let Some(local) = shared.config.local.clone() {
        // The warm interpreter started now, not by the first task.
        let warming = Arc::clone(&local.runner);
        tokio::spawn(async move { warming.warm_up().await });
        for slot in 0..local.slots {
            let working = Arc::clone(&shared);
            let local = local.clone();
            tokio::spawn(async move { work_locally(&working, &local, slot).await });
        }
    }
    Ok((bound, MasterHandle(shared)))
}

/// A handle on the master's queue, for the HTTP API's `/jobs`.
#[derive(Clone)]
pub struct MasterHandle(Arc<Shared>);

/// Why a job was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Not a ZIP with `main.py`.
    #[error("a job is a ZIP with main.py at its root (and its inputs, input.csv): {0}")]
    NotATask(String),
    /// The queue is full or the file could not be stored.
    #[error("cannot queue the job: {0}")]
    Queue(String),
}

/// A result that could not be moved into the results folder (the task waits again).
#[derive(Debug, thiserror::Error)]
#[error("result not stored: {0}")]
pub struct NotStored(std::io::Error);

/// Jobs numbered since the node started, for their names.
static JOB_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl MasterHandle {
    /// Queues the ZIP at `archive` (moved into the tasks folder) as a job; its id.
    pub fn submit(&self, archive: &Path) -> Result<String, JobError> {
        let file = std::fs::File::open(archive).map_err(|e| JobError::NotATask(e.to_string()))?;
        let zip = zip::ZipArchive::new(file).map_err(|e| JobError::NotATask(e.to_string()))?;
        if zip.index_for_name("main.py").is_none() {
            return Err(JobError::NotATask("no main.py".into()));
        }
        let id = format!(
            "job-{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            JOB_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let name = format!("{id}.zip");
        let size = std::fs::metadata(archive).map_or(0, |m| m.len());
        std::fs::rename(archive, self.0.config.tasks.join(&name))
            .map_err(|e| JobError::Queue(e.to_string()))?;
        if !lock(&self.0).add(&name, size) {
            let _ = std::fs::remove_file(self.0.config.tasks.join(&name));
            return Err(JobError::Queue("the queue is full".into()));
        }
        tracing::info!(job = %id, size, "job queued");
        if let Some(why) = self.no_taker(size) {
            tracing::warn!(job = %id, "{why}");
        }
        self.0.queued();
        Ok(id)
    }

    /// Why no worker can take a task of `size` bytes now, if none can: this node runs no
    /// tasks itself, no course worker that could take it asked lately, and no node of its
    /// cluster is linked. The task waits until one comes.
    pub fn no_taker(&self, size: u64) -> Option<String> {
        if self.0.config.local.is_some() {
            return None;
        }
        if self.cluster_members() > 0 {
            return None;
        }
        let course = lock(&self.0).course_workers(Instant::now());
        if course > 0 && size <= COURSE_TASK_FITS {
            return None;
        }
        let course = if course > 0 {
            format!(
                "the course workers asking for tasks take ZIPs of {COURSE_TASK_FITS} bytes at most"
            )
        } else {
            format!(
                "no course worker asked for a task in the last {} s",
                crate::proto::seed001::WORKER_SILENT.as_secs()
            )
        };
        Some(format!(
            "no worker can take it yet: this node runs no tasks itself (no Python here, or \
             --task-workers 0), {course}, and no node of its cluster (--cluster-secret, --trust) \
             is linked; it waits until one comes"
        ))
    }

    /// Notes how many nodes of the cluster were heard lately (they may take tasks).
    pub(crate) fn set_cluster_members(&self, members: usize) {
        self.0
            .cluster_members
            .store(members, std::sync::atomic::Ordering::Relaxed);
    }

    fn cluster_members(&self) -> usize {
        self.0
            .cluster_members
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tasks a worker runs now.
    pub fn running(&self) -> u32 {
        u32::try_from(lock(&self.0).counts().1).unwrap_or(u32::MAX)
    }

    /// Changes to the tasks so far (added, leased, done, given back): compare with the last
    /// seen to know whether the jobs changed.
    pub fn changes(&self) -> u64 {
        lock(&self.0).changes()
    }

    /// Tasks waiting for a worker.
    pub fn waiting(&self) -> u32 {
        u32::try_from(lock(&self.0).counts().0).unwrap_or(u32::MAX)
    }

    /// Wakes when tasks are queued (for the node's announcement to its cluster).
    pub fn queued(&self) -> &tokio::sync::Notify {
        &self.0.queued
    }

    /// Leases a task, of any size, to the teia worker `worker`: the task and its ZIP.
    pub(crate) fn take(&self, worker: &str) -> Option<(Task, PathBuf)> {
        let task = lock(&self.0).request(&WorkerKey::teia(worker), Instant::now(), u64::MAX)?;
        let path = self.0.config.tasks.join(&task.name);
        Some((task, path))
    }

    /// Notes that the teia worker `worker` still runs its task (its lease is renewed).
    pub(crate) fn alive(&self, worker: &str) {
        lock(&self.0).renew(&WorkerKey::teia(worker), Instant::now());
    }

    /// Where a result being received from `worker` is written.
    pub(crate) fn partial(&self, worker: &str, task: &str) -> PathBuf {
        let safe: String = worker
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.0
            .config
            .results
            .join(format!(".{}.{safe}.part", result_name(task)))
    }

    /// Stores the result at `partial` (complete and flushed) as that of the task `worker`
    /// holds: true when stored, false when the task is no longer its own (done by another,
    /// or taken back), the result then dropped.
    pub(crate) fn finish(
        &self,
        worker: &str,
        task: &str,
        partial: &Path,
    ) -> Result<bool, NotStored> {
        let done = lock(&self.0).submit(&WorkerKey::teia(worker), Some(task), Instant::now());
        let Ok(Submitted::Done(task)) = done else {
            let _ = std::fs::remove_file(partial);
            return Ok(false);
        };
        let path = self.0.config.results.join(result_name(&task.name));
        if let Err(e) = std::fs::rename(partial, &path) {
            let _ = std::fs::remove_file(partial);
            lock(&self.0).add(&task.name, task.size);
            return Err(NotStored(e));
        }
        tracing::info!(task = %task.name, %worker, "result stored");
        Ok(true)
    }

    /// Forgets the teia worker `worker` and takes back the task it held, if any.
    pub(crate) fn give_back(&self, worker: &str) -> Option<String> {
        let task = lock(&self.0).give_back(&WorkerKey::teia(worker));
        if task.is_some() {
            self.0.queued();
        }
        task
    }

    /// `worker` could not run the task it holds (`error`): it waits again, last in line, or,
    /// after [`crate::proto::seed001::MAX_FAILURES`] times, is done with the error as its
    /// result.
    pub(crate) fn fail(&self, worker: &str, error: &str) {
        let failed = lock(&self.0).failed(&WorkerKey::teia(worker), Instant::now());
        match failed {
            Failed::Retry => {
                tracing::warn!(%worker, %error, "a task could not be run; it goes back in line");
                self.0.queued();
            }
            Failed::GiveUp(task) => give_up(&self.0, &task.name, error),
            Failed::Unmatched => {}
        }
    }

    /// A job's status: `queued`, `running` or `done` (with `result.json`'s fields when the
    /// node ran it, and the start of its stdout); `None` when unknown.
    pub fn status(&self, id: &str) -> Option<serde_json::Value> {
        let name = format!("{id}.zip");
        if let Some(path) = self.result(id) {
            let read = |file: &str| -> Option<Vec<u8>> {
                let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).ok()?).ok()?;
                let entry = zip.by_name(file).ok()?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(entry, 64 * 1024), &mut bytes)
                    .ok()?;
                Some(bytes)
            };
            // result.json as the node wrote it; a course worker's result has none.
            let mut status = read(crate::script::SUMMARY)
                .and_then(|b| {
                    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok()
                })
                .unwrap_or_default();
            status.insert("id".into(), id.into());
            status.insert("status".into(), "done".into());
            let stdout = read("stdout.txt").map(|b| String::from_utf8_lossy(&b).into_owned());
            status.insert("stdout".into(), stdout.into());
            return Some(serde_json::Value::Object(status));
        }
        let master = lock(&self.0);
        match (master.leased(&name)?, master.holder(&name)) {
            (true, Some(worker)) => Some(
                serde_json::json!({"id": id, "status": "running", "worker": worker.to_string()}),
            ),
            _ => {
                drop(master);
                let size =
                    std::fs::metadata(self.0.config.tasks.join(&name)).map_or(0, |m| m.len());
                Some(match self.no_taker(size) {
                    Some(why) => serde_json::json!({"id": id, "status": "queued", "waiting": why}),
                    None => serde_json::json!({"id": id, "status": "queued"}),
                })
            }
        }
    }

    /// `GET /jobs`: how many jobs (tasks of the tasks folder) are queued, running and done,
    /// and the first [`MAX_LISTED`] by name with their status (and the worker of each
    /// running one).
    pub fn list(&self) -> serde_json::Value {
        let mut names: Vec<String> = std::fs::read_dir(&self.0.config.tasks)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".zip") && !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        // The files looked at first, not to hold the table meanwhile.
        let finished: Vec<bool> = names
            .iter()
            .map(|name| self.0.config.results.join(result_name(name)).is_file())
            .collect();
        let (mut queued, mut running, mut done, mut listed) = (0u64, 0u64, 0u64, Vec::new());
        let master = lock(&self.0);
        for (name, finished) in names.iter().zip(finished) {
            let id = name.trim_end_matches(".zip");
            let (status, worker) = if finished {
                done += 1;
                ("done", None)
            } else {
                match master.leased(name) {
                    Some(true) => {
                        running += 1;
                        ("running", master.holder(name).map(WorkerKey::to_string))
                    }
                    _ => {
                        queued += 1;
                        ("queued", None)
                    }
                }
            };
            if listed.len() < MAX_LISTED {
                listed.push(match worker {
                    Some(worker) => {
                        serde_json::json!({"id": id, "status": status, "worker": worker})
                    }
                    None => serde_json::json!({"id": id, "status": status}),
                });
            }
        }
        serde_json::json!({
            "queued": queued,
            "running": running,
            "done": done,
            "jobs": listed,
        })
    }

    /// The result ZIP of job `id`, once done.
    pub fn result(&self, id: &str) -> Option<PathBuf> {
        let safe = id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let path = self
            .0
            .config
            .results
            .join(result_name(&format!("{id}.zip")));
        (safe && path.is_file()).then_some(path)
    }
}

/// One of the node's own workers: takes a task, runs it, stores its result.
async fn work_locally(shared: &Arc<Shared>, local: &LocalWorkers, slot: usize) {
    let me = format!("teia:local-{slot}");
    let key = WorkerKey::teia(me.as_str());
    let handle = MasterHandle(Arc::clone(shared));
    loop {
        let task = lock(shared).request(&key, Instant::now(), u64::MAX);
        let Some(task) = task else {
            tokio::select! {
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = shared.wake.notified() => {}
            }
            continue;
        };
        tracing::info!(task = %task.name, worker = %me, "task run here");
        let alive = {
            let (shared, key) = (Arc::clone(shared), key.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SCAN_EVERY).await;
                    lock(&shared).renew(&key, Instant::now());
                }
            })
        };
        let folder = local.runner.work_dir().join(format!("local-{slot}"));
        let partial = handle.partial(&me, &task.name);
        let made = crate::script::run_task(
            &local.runner,
            &shared.config.tasks.join(&task.name),
            &task.name,
            &local.node,
            &folder,
            &partial,
        )
        .await;
        alive.abort();
        let _ = std::fs::remove_dir_all(&folder);
        // Flushed before it is renamed into the results: a result is whole or absent.
        let made = made.and_then(|()| {
            std::fs::File::open(&partial)
                .and_then(|file| file.sync_all())
                .map_err(crate::script::TaskError::NotFlushed)
        });
        let stored = match made {
            Ok(()) => handle.finish(&me, &task.name, &partial),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                handle.fail(&me, &e.to_string());
                continue;
            }
        };
        match stored {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(task = %task.name, "the task was taken back; another runs it")
            }
            Err(e) => tracing::warn!(task = %task.name, error = %e, "no result stored"),
        }
    }
}

/// Adds the tasks folder's new ZIPs that have no result yet. A file that is not a whole ZIP
/// is left for the next scan while it may still be being written ([`SETTLE`]), then given
/// up with a result that says so.
fn scan(shared: &Shared) {
    let Ok(entries) = std::fs::read_dir(&shared.config.tasks) else {
        return;
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || !name.ends_with(".zip") || name.starts_with('.') {
            continue;
        }
        if lock(shared).leased(&name).is_some()
            || shared.config.results.join(result_name(&name)).exists()
        {
            continue;
        }
        let metadata = entry.metadata().ok();
        let whole = std::fs::File::open(entry.path())
            .map_err(zip::result::ZipError::from)
            .and_then(|file| zip::ZipArchive::new(file).map(drop));
        if let Err(e) = whole {
            let age = metadata
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|at| at.elapsed().ok())
                .unwrap_or(SETTLE);
            if age >= SETTLE {
                give_up(shared, &name, &format!("not a ZIP: {e}"));
            }
            continue;
        }
        found.push((name, metadata.map_or(u64::MAX, |m| m.len())));
    }
    found.sort();
    let mut master = lock(shared);
    let mut added = false;
    for (name, size) in found {
        if master.add(&name, size) {
            added = true;
            tracing::info!(task = %name, size, "task queued");
            if size > MAX_PACKAGE as u64 {
                tracing::warn!(task = %name, "over 64 KiB in base64: no course worker can take it");
            }
        }
    }
    drop(master);
    if added {
        shared.queued();
    }
}

/// Removes the results being written when the node last stopped (`.*.part`): their tasks
/// run again.
fn remove_partials(results: &Path) {
    let Ok(entries) = std::fs::read_dir(results) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".part") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Records `error` as the result of `task`, which will not be run.
fn give_up(shared: &Shared, task: &str, error: &str) {
    let path = shared.config.results.join(result_name(task));
    let partial = shared
        .config
        .results
        .join(format!(".{}.give-up.part", result_name(task)));
    let written = crate::script::write_error_result(task, error, &partial)
        .and_then(|()| std::fs::rename(&partial, &path));
    match written {
        Ok(()) => tracing::error!(%task, %error, "task given up; its result says why"),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            tracing::error!(%task, %error, write_error = %e, "task given up");
        }
    }
}

/// `result_<task>` (one `.zip` however the task was named).
fn result_name(task: &str) -> String {
    format!("result_{}.zip", task.trim_end_matches(".zip"))
}

/// Answers `DISCOVER_MASTER` datagrams on `socket`, unicast to each sender in its own
/// envelope, at most once a second per source IP (two at once): one known worker
/// broadcasts again at once on any answer it does not understand.
async fn answer_discovery(socket: UdpSocket, shared: Arc<Shared>) {
    let mut limiter = RateLimiter::new(1, 2, 4096);
    let origin = Instant::now();
    let mut buffer = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let Some(bytes) = buffer.get(..len).filter(|_| len <= MAX_DATAGRAM) else {
            continue;
        };
        if !sync::lock(&shared.gate).allows(from.ip()) {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            continue;
        };
        let Ok((envelope, Request::DiscoverMaster)) = parse(&value) else {
            continue;
        };
        if !limiter.allow(&from.ip(), origin.elapsed().as_millis() as u64) {
            continue;
        }
        let ip = local_ip_towards(from).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let reply = encode(
            envelope,
            &Reply::MasterAnnounce {
                ip: ip.to_string(),
                port: shared.port,
            },
        );
        if let Err(e) = socket.send_to(&reply, from).await {
            tracing::debug!(%from, error = %e, "discovery answer not sent");
        }
    }
}

/// The address of ours on the route to `peer` (a UDP socket's `connect` sends nothing).
fn local_ip_towards(peer: SocketAddr) -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(peer).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// A connection admitted by the gate, given back when it ends.
struct Admitted<'a> {
    gate: &'a Mutex<Gate>,
    ip: IpAddr,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        sync::lock(self.gate).leave(self.ip);
    }
}

/// Bytes of the budget a connection from `ip` holds, given back when it ends.
struct Reserved<'a> {
    budget: &'a Mutex<Budget>,
    ip: IpAddr,
    /// Bytes received.
    received: usize,
    /// Bytes reserved.
    bytes: usize,
}

impl Reserved<'_> {
    /// Counts a piece of `piece` bytes received, reserving what the budget counts of it.
    fn more(&mut self, piece: usize) -> Result<(), Spent> {
        let mut budget = sync::lock(self.budget);
        let counted = budget.counted(self.received, piece);
        budget.reserve(self.ip, counted)?;
        self.bytes += counted;
        self.received = self.received.saturating_add(piece);
        Ok(())
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        sync::lock(self.budget).release(self.ip, self.bytes);
    }
}

/// Closes a connection refused at accept: a source outside the allowed networks hears
/// nothing; one with too many connections open is told so (if its socket takes it now).
fn refuse(shared: &Shared, stream: TcpStream, peer: SocketAddr, why: Unwelcome) {
    if why == Unwelcome::TooMany {
        let _ = stream.try_write(&encode(Envelope::Flat, &Reply::Error(why.to_string())));
    }
    drop(stream);
    let now = shared.origin.elapsed().as_millis() as u64;
    if sync::lock(&shared.refusals).allow(&peer.ip(), now) {
        match why {
            Unwelcome::NotAllowed => tracing::warn!(
                %peer,
                "seed 001 connection refused: source outside --master-allow"
            ),
            Unwelcome::TooMany => tracing::warn!(
                %peer,
                limit = MAX_PER_SOURCE,
                "seed 001 connection refused: too many from one address"
            ),
        }
    }
}

/// Why a connection's message was not read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// It sent nothing for [`IDLE_TIMEOUT`], or not its whole message in [`READ_TIME`].
    #[error("too slow")]
    Slow,
    /// The connection failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// Its next bytes would pass [`BUFFER_BUDGET`] or [`SOURCE_BUDGET`].
    #[error(transparent)]
    Busy(#[from] Spent),
    /// Not a message.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Reads one message from `stream`, each piece within [`IDLE_TIMEOUT`] and counted in the
/// budget before it is kept.
async fn read_message(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    reserved: &mut Reserved<'_>,
) -> Result<serde_json::Value, ReadError> {
    let mut framer = Framer::default();
    loop {
        let n = tokio::time::timeout(IDLE_TIMEOUT, stream.read(buffer))
            .await
            .map_err(|_| ReadError::Slow)??;
        if n == 0 {
            return Ok(framer.finish()?);
        }
        reserved.more(n)?;
        if let Some(value) = framer.push(buffer.get(..n).unwrap_or_default())? {
            return Ok(value);
        }
    }
}

/// One connection: one message read whole (however it is split), one reply written in
/// one piece.
async fn serve(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut reserved = Reserved {
        budget: &shared.budget,
        ip: peer.ip(),
        received: 0,
        bytes: 0,
    };
    let read = read_message(&mut stream, &mut buffer, &mut reserved);
    let read = tokio::time::timeout(READ_TIME, read)
        .await
        .unwrap_or(Err(ReadError::Slow));
    let value = match read {
        Ok(value) => value,
        Err(ReadError::Slow | ReadError::Io(_)) => return,
        Err(e) => {
            if let ReadError::Busy(spent) = &e {
                let (what, limit) = match spent {
                    Spent::Total => ("all connections'", BUFFER_BUDGET),
                    Spent::Source => ("this source's", SOURCE_BUDGET),
                };
                tracing::warn!(%peer, limit, "course worker's message refused: {what} buffer budget is spent");
            } else {
                tracing::debug!(%peer, error = %e, "course worker's message refused");
            }
            // What was received is given back before the rest is drained.
            drop(reserved);
            let reply = encode(Envelope::Flat, &Reply::Error(e.to_string()));
            let _ = tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&reply)).await;
            let _ = stream.shutdown().await;
            // What it still sends is read and dropped (a little, for a little while), so
            // that closing does not reset the connection before it reads the error.
            let drain = async {
                let mut left = DRAINED;
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            return;
        }
    };
    let reply = match parse(&value) {
        Ok((envelope, request)) => encode(envelope, &handle(shared, peer.ip(), request)),
        Err(e) => {
            let envelope = if value.get("type").is_some() && value.get("action").is_none() {
                Envelope::Typed
            } else {
                Envelope::Flat
            };
            encode(envelope, &Reply::Error(e.to_string()))
        }
    };
    drop(value);
    let _ = tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&reply)).await;
    let _ = stream.shutdown().await;
}

/// Answers a course worker's request; `ip` is where it came from (with its `peer_id`, who
/// it is: [`WorkerKey::Course`]).
fn handle(shared: &Shared, ip: IpAddr, request: Request) -> Reply {
    let now = Instant::now();
    match request {
        Request::DiscoverMaster => Reply::MasterAnnounce {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
            port: shared.port,
        },
        Request::Register { peer_id } => {
            let worker = WorkerKey::course(peer_id, ip);
            if lock(shared).heard(&worker, now) {
                tracing::info!(%worker, "course worker registered");
                Reply::Registered
            } else {
                Reply::Error("too many workers".into())
            }
        }
        Request::Heartbeat { peer_id } => {
            lock(shared).heard(&WorkerKey::course(peer_id, ip), now);
            Reply::Alive
        }
        Request::RequestTask { peer_id } => {
            let worker = WorkerKey::course(peer_id, ip);
            let task = lock(shared).request(&worker, now, COURSE_TASK_FITS);
            let Some(task) = task else {
                return Reply::NoTasks;
            };
            match std::fs::read(shared.config.tasks.join(&task.name)) {
                Ok(bytes) => {
                    tracing::info!(task = %task.name, %worker, attempt = task.attempts, "task handed out");
                    Reply::TaskPackage {
                        name: task.name,
                        data: STANDARD.encode(bytes),
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %task.name, error = %e, "task unreadable; dropped");
                    let _ = lock(shared).submit(&worker, Some(&task.name), now);
                    Reply::NoTasks
                }
            }
        }
        Request::SubmitResult {
            peer_id,
            task,
            data,
        } => {
            let worker = WorkerKey::course(peer_id, ip);
            let Ok(bytes) = STANDARD.decode(data.trim()) else {
                return Reply::Error("result_data is not base64".into());
            };
            drop(data);
            let done = lock(shared).submit(&worker, task.as_deref(), now);
            match done {
                Ok(Submitted::Done(task)) => {
                    let written = course_result(bytes)
                        .map_err(std::io::Error::other)
                        .and_then(|bytes| write_result(&shared.config.results, &task.name, &bytes));
                    match written {
                        Ok(path) => {
                            tracing::info!(task = %task.name, %worker, result = %path.display(), "result stored");
                            Reply::Ok
                        }
                        Err(e) => {
                            tracing::error!(task = %task.name, error = %e, "result not stored; the task goes out again");
                            lock(shared).add(&task.name, task.size);
                            Reply::Error(format!("result not stored: {e}"))
                        }
                    }
                }
                // Its result of the task it delivered last, again: the first one counts.
                Ok(Submitted::Again) => Reply::Ok,
                Err(refused) => {
                    tracing::warn!(%worker, named = ?task, reason = %refused, "result refused: not from the task's lease holder");
                    Reply::Error(refused.to_string())
                }
            }
        }
    }
}

/// A course worker's result as stored: its ZIP without any `result.json` (that file is the
/// node's account of a run a teia worker made, never a course worker's claim); anything
/// else as sent.
fn course_result(bytes: Vec<u8>) -> Result<Vec<u8>, zip::result::ZipError> {
    let claims = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice()))
        .is_ok_and(|zip| zip.index_for_name(crate::script::SUMMARY).is_some());
    if !claims {
        return Ok(bytes);
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice()))?;
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for index in 0..zip.len() {
        let entry = zip.by_index_raw(index)?;
        let keep = entry.name()? != crate::script::SUMMARY;
        if keep {
            out.raw_copy_file(entry)?;
        }
    }
    Ok(out.finish()?.into_inner())
}

/// Writes `result_<task>.zip` (beside, flushed, then renamed): whole or absent.
fn write_result(results: &Path, task: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let path = results.join(result_name(task));
    let partial = results.join(format!(".{}.part", result_name(task)));
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}
