//! The job engine on one node: accepts submissions, keeps the ledger durable (SQLite), runs
//! modules on this node's workers (as many at once as it has cores, or `--workers`), and
//! answers the HTTP API's questions.
//!
//! Its workers run the modules of the evaluations it owns, and, when it has none waiting,
//! those of trusted owners; it replicates their evaluations and takes one over when its
//! owner is gone ([`crate::remote`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};

use crate::bundle::{self, BundleError};
use crate::cluster::{Cluster, ClusterConfig};
use crate::proto::ledger::{
    CachedFrom, Completed, EvalId, Evaluation, Lease, Ledger, ModuleResult, ModuleState,
    NewProject, Piece, Project, Shape,
};
use crate::proto::result_cache::{self, Policy};
use crate::runner::{Isolation, Limits, Runner};
use crate::tasks::TaskSet;
use teia_node::sync::lock;

/// Numbers the folders projects are unpacked in before they are renamed.
static UNPACKING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Evaluations running or queued at once on this node; one more is refused.
pub const MAX_ACTIVE: usize = 64;
/// Bytes all evaluations' folders on this node may take on disk together (the projects as
/// submitted while they are unpacked, their packed copies, and what their modules run
/// in); a submission that would expand past what is left is refused (HTTP 507).
pub const EVALUATIONS_DISK: u64 = 8 * 1024 * 1024 * 1024;
/// Git clones running at once at most; a submission that would start more is refused (503)
/// before it clones anything.
pub const MAX_CLONES: usize = 4;
/// Time one clone may take.
pub const CLONE_TIME: Duration = Duration::from_secs(300);

pub use crate::proto::cluster::{REPLICAS, REPLICATION_WAIT};
/// Finished evaluations kept by default (with their results, answered by
/// `GET /evaluation/<id>`); past it, the oldest finished are forgotten, their folders
/// removed, when a new one comes.
pub const KEEP_FINISHED: usize = 500;
/// Time [`Engine::shutdown`] waits for the engine's tasks to end (a worker records nothing
/// of the module the stop killed, a stream being served is dropped) before it aborts them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time an idle worker waits before it looks for work again.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Time a worker waits before it takes a module again after its project's bytes were not
/// to be had.
const PROJECT_WAIT: Duration = Duration::from_secs(1);
/// Time between two looks at whether a new evaluation's projects are replicated.
const REPLICATED_POLL: Duration = Duration::from_millis(50);

/// How to run the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where submissions, work folders and the database go.
    pub dir: PathBuf,
    /// This node's peer id (the owner of what it accepts).
    pub node: String,
    /// This node's overlay address, as `/stats` and `/network` show it.
    pub address: String,
    /// Python with pytest.
    pub python: PathBuf,
    /// Modules run at once.
    pub workers: usize,
    /// Limits of each module.
    pub limits: Limits,
    /// How modules are isolated.
    pub isolation: Isolation,
    /// Whether this node runs test modules (its Python has pytest); without, it runs only
    /// script tasks, and neither replicates nor takes over evaluations.
    pub modules: bool,
    /// Whether it runs other nodes' modules and script tasks (it has a working sandbox, or
    /// was told to without); without, it runs only its own submissions and takes over
    /// nothing.
    pub others: bool,
    /// The share of module results (0 to 1) run again, chosen at random when each arrives,
    /// on another trusted node, to catch a node that lies or is broken.
    pub verify: f64,
    /// Finished evaluations kept (`--keep-evaluations`; [`KEEP_FINISHED`] by default): past
    /// it, the oldest finished are forgotten, their folders removed, when a new one comes.
    pub keep_finished: usize,
    /// The URL schemes of the git repositories it clones (`https`; `http`, `ssh`, `git`,
    /// `file` only when allowed: `file` also allows local paths).
    pub git_schemes: Vec<String>,
    /// How it reuses module results whose inputs did not change (none: it runs every
    /// module; `--no-result-cache`).
    pub result_cache: Option<Policy>,
    /// Times a module's failed tests run again, on another node when the cluster has one,
    /// to name the flaky ones, for submissions that do not say (`--rerun-failures`;
    /// [`RERUN_FAILURES`] by default, at most [`MAX_RERUNS`]).
    pub rerun_failures: u32,
}

/// Times a module's failed tests run again by default.
pub const RERUN_FAILURES: u32 = 1;
pub use crate::proto::ledger::MAX_RERUNS;

/// How one submission is to be run.
#[derive(Debug, Clone, Copy)]
pub struct SubmitOptions {
    /// Whether modules whose results the cache has are not run again (`cache=false` on a
    /// submission runs them all).
    pub use_cache: bool,
    /// Times failed tests run again (`rerun_failures=N` on a submission); none: the node's
    /// [`EngineConfig::rerun_failures`].
    pub rerun_failures: Option<u32>,
    /// Whether modules expected to hold the evaluation up are split in pieces run on
    /// several workers (`split=false` on a submission runs each whole).
    pub split: bool,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            use_cache: true,
            rerun_failures: None,
            split: true,
        }
    }
}

/// Why the engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The submission is not acceptable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The database failed.
    #[error("job database: {0}")]
    Store(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Too many evaluations.
    #[error("{MAX_ACTIVE} evaluations are queued or running here; retry later")]
    Busy,
    /// Too many clones running.
    #[error("{MAX_CLONES} git clones are running here; retry later")]
    ClonesBusy,
    /// A repository URL this node does not clone.
    #[error("{url}: {why}")]
    Refused {
        /// The URL.
        url: String,
        /// Why, and what is allowed.
        why: String,
    },
    /// The evaluations' disk budget is used up.
    #[error("the evaluations here use their whole disk budget ({EVALUATIONS_DISK} bytes); retry when some have finished")]
    DiskFull,
    /// Cloning a repository failed.
    #[error("cannot clone {url}: {detail}")]
    Clone {
        /// The repository.
        url: String,
        /// What git said (the token removed).
        detail: String,
    },
}

/// Counts of this node's work since it started, for `/stats`.
#[derive(Debug, Default, Clone)]
struct Work {
    passed: u64,
    failed: u64,
    modules: u64,
    projects: std::collections::BTreeSet<(EvalId, String)>,
    evaluations: std::collections::BTreeSet<EvalId>,
}

struct State {
    ledger: Ledger,
    db: Connection,
    work: Work,
    next: u64,
    /// Bytes of the results in the cache's table.
    cache_bytes: u64,
    /// The last evaluation stored, for those who follow the evaluations ([`Engine::changes`]).
    changes: tokio::sync::watch::Sender<EvalId>,
}

/// The engine's handle.
#[derive(Clone)]
pub struct Engine {
    pub(crate) config: Arc<EngineConfig>,
    state: Arc<Mutex<State>>,
    started: Instant,
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) runner: Arc<Runner>,
    /// Git clones running ([`MAX_CLONES`]).
    clones: Arc<tokio::sync::Semaphore>,
    /// The tasks it started, stopped by [`Engine::shutdown`].
    pub(crate) tasks: Arc<TaskSet>,
    /// Bytes its streams moved.
    pub(crate) traffic: Arc<Traffic>,
}

/// Bytes the engine's `jobs` streams moved since the start: projects, ledgers, script
/// tasks and their results.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    /// Fetched from other nodes.
    pub(crate) fetched: std::sync::atomic::AtomicU64,
    /// Served to other nodes.
    pub(crate) served: std::sync::atomic::AtomicU64,
}

impl Traffic {
    /// Counts `bytes` fetched.
    pub(crate) fn fetched(&self, bytes: u64) {
        self.fetched
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `bytes` served.
    pub(crate) fn served(&self, bytes: u64) {
        self.served
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Fills the modules of evaluation `id` whose results the cache has (and `policy` lets
/// serve) with them; returns how many.
fn reuse_results(state: &mut State, id: EvalId, policy: &Policy) -> usize {
    let Some(evaluation) = state.ledger.get(id) else {
        return 0;
    };
    let wanted: Vec<(String, String, String)> = evaluation
        .projects
        .iter()
        .filter_map(|(name, project)| Some((name, project.content.as_deref()?, project)))
        .flat_map(|(name, shared, project)| {
            project.modules.iter().filter_map(move |(path, module)| {
                let key = result_cache::key(
                    &policy.environment,
                    shared,
                    path,
                    module.content.as_deref()?,
                );
                Some((name.clone(), path.clone(), key))
            })
        })
        .collect();
    let mut reused = 0;
    for (project, module, key) in wanted {
        let Some((mut result, from)) = state.cached(&key) else {
            continue;
        };
        if !result_cache::reusable(policy, &result) {
            continue;
        }
        result.cached = Some(CachedFrom {
            eval: from,
            node: result.node.clone(),
        });
        if state
            .ledger
            .fill_cached(id, &project, &module, result, unix_ms())
        {
            reused += 1;
        }
    }
    reused
}

/// The result to keep in the cache for module `name` of `project`, now done, and the
/// module's path it is kept under: its own, or, for a piece, the whole module's joined
/// from its pieces once the last is done ([`Project::joined_pieces`]); none when `policy`
/// keeps none (`trusted`: whether the worker of its last run counts for the cache).
fn result_to_keep(
    project: &Project,
    name: &str,
    policy: &Policy,
    trusted: bool,
) -> Option<(ModuleResult, String)> {
    let module = project.modules.get(name)?;
    let (result, path) = match &module.piece {
        None => {
            let ModuleState::Done(result) = &module.state else {
                return None;
            };
            if module.disputed.is_some() {
                return None;
            }
            ((**result).clone(), name.to_owned())
        }
        Some(piece) => {
            let joined = project.joined_pieces(&piece.path)?;
            let course = joined
                .pieces_by
                .iter()
                .any(|node| crate::proto::seed000_members::is_course_worker(node));
            if course {
                return None;
            }
            (joined, piece.path.clone())
        }
    };
    result_cache::keeps(policy, &result, trusted).then_some((result, path))
}

/// Keeps the result the ledger now holds for `lease`'s module in the cache (for a piece,
/// the whole module's once every piece is done), if `policy` keeps it.
fn keep_result(state: &mut State, lease: &Lease, policy: &Policy, trusted: bool) {
    let Some(project) = state
        .ledger
        .get(lease.eval)
        .and_then(|e| e.projects.get(&lease.project))
    else {
        return;
    };
    let Some((result, path)) = result_to_keep(project, &lease.module, policy, trusted) else {
        return;
    };
    let (Some(shared), Some(module_content)) = (
        &project.content,
        project
            .modules
            .get(&lease.module)
            .and_then(|m| m.content.as_ref()),
    ) else {
        return;
    };
    let Some(key) = result_cache::key_of_result(&result, shared, &path, module_content) else {
        return;
    };
    state.keep(&key, &result, lease.eval, policy.max_bytes);
}

/// Learns from the modules newly done in `evaluation`, replicated from its owner (a member
/// of the cluster): their durations and shapes, as the owner learns them (so that any node
/// of the cluster splits a straggler), and, with a `policy`, their results, kept as the
/// owner keeps them; evicts the results of a node a verification found disagreeing.
/// `before` is the copy replicated here until now.
fn learn_replicated(
    state: &mut State,
    before: Option<&Evaluation>,
    evaluation: &Evaluation,
    policy: Option<&Policy>,
) {
    for (name, project) in &evaluation.projects {
        for (path, module) in &project.modules {
            let ModuleState::Done(result) = &module.state else {
                continue;
            };
            let known = before
                .and_then(|e| e.projects.get(name))
                .and_then(|p| p.modules.get(path))
                .is_some_and(|m| m.state == module.state && m.disputed == module.disputed);
            if known {
                continue;
            }
            if let Some(other) = &module.disputed {
                state.evict_from(&other.node);
                continue;
            }
            if module.piece.is_none() && module.rerun.is_none() && result.cached.is_none() {
                let key = format!("{name}/{path}");
                state.ledger.learn_duration(key.clone(), result.seconds);
                state.save_duration(&key, result.seconds);
                if let Some(shape) = Shape::of(result) {
                    state.save_shape(&key, &shape);
                    state.ledger.learn_shape(key.clone(), shape);
                }
            }
            let Some(policy) = policy else {
                continue;
            };
            let (Some(shared), Some(module_content)) = (&project.content, &module.content) else {
                continue;
            };
            let Some((result, path)) = result_to_keep(project, path, policy, true) else {
                continue;
            };
            if let Some(key) = result_cache::key_of_result(&result, shared, &path, module_content) {
                state.keep(&key, &result, evaluation.id, policy.max_bytes);
            }
        }
    }
}

/// Bytes the regular files under `dir` take (links not followed; an unreadable part counts
/// nothing).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    total
}

/// A random number in [0, 1).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1.0;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Results evicted from the cache at once when it is over its budget.
const EVICT_BATCH: i64 = 64;

impl State {
    /// The result kept under `key`, and the evaluation it was run for.
    fn cached(&self, key: &str) -> Option<(ModuleResult, EvalId)> {
        let row: Option<(String, i64)> = self
            .db
            .query_row(
                "SELECT body, eval FROM result_cache WHERE key = ?1",
                params![key],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .ok();
        let (body, eval) = row?;
        Some((serde_json::from_str(&body).ok()?, u64::try_from(eval).ok()?))
    }

    /// Keeps `result` (of evaluation `eval`) under `key`, then evicts the oldest results
    /// past `max_bytes`.
    fn keep(&mut self, key: &str, result: &ModuleResult, eval: EvalId, max_bytes: u64) {
        let body = serde_json::to_string(result).unwrap_or_default();
        let size = (key.len() + body.len()) as u64;
        let replaced: u64 = self
            .db
            .query_row(
                "SELECT LENGTH(key) + LENGTH(body) FROM result_cache WHERE key = ?1",
                params![key],
                |row| row.get::<_, i64>(0),
            )
            .map_or(0, |n| n.unsigned_abs());
        let stored = self.db.execute(
            "INSERT OR REPLACE INTO result_cache (key, body, eval, at) VALUES (?1, ?2, ?3, ?4)",
            params![key, body, eval as i64, unix_ms() as i64],
        );
        match stored {
            Ok(_) => self.cache_bytes = (self.cache_bytes + size).saturating_sub(replaced),
            Err(e) => tracing::error!(error = %e, "result not kept in the cache"),
        }
        while self.cache_bytes > max_bytes {
            let oldest: Vec<(String, u64)> = self
                .db
                .prepare(
                    "SELECT key, LENGTH(key) + LENGTH(body) FROM result_cache ORDER BY at LIMIT ?1",
                )
                .and_then(|mut statement| {
                    statement
                        .query_map(params![EVICT_BATCH], |row| {
                            Ok((
                                row.get::<_, String>(0)?,
                                row.get::<_, i64>(1)?.unsigned_abs(),
                            ))
                        })
                        .map(|rows| rows.flatten().collect())
                })
                .unwrap_or_default();
            if oldest.is_empty() {
                self.cache_bytes = 0;
                break;
            }
            for (key, size) in oldest {
                if self
                    .db
                    .execute("DELETE FROM result_cache WHERE key = ?1", params![key])
                    .is_ok()
                {
                    self.cache_bytes = self.cache_bytes.saturating_sub(size);
                }
            }
        }
    }

    /// Evicts from the cache every result `node` ran (a verification disagreed with it).
    fn evict_from(&mut self, node: &str) {
        let evicted = self.db.execute(
            "DELETE FROM result_cache WHERE json_extract(body, '$.node') = ?1 \
             OR EXISTS (SELECT 1 FROM json_each(body, '$.pieces_by') WHERE value = ?1)",
            params![node],
        );
        match evicted {
            Ok(0) => {}
            Ok(count) => {
                tracing::warn!(%node, count, "results of a node a verification disagreed with evicted from the cache");
                self.cache_bytes = self
                    .db
                    .query_row(
                        "SELECT COALESCE(SUM(LENGTH(key) + LENGTH(body)), 0) FROM result_cache",
                        [],
                        |row| row.get::<_, i64>(0),
                    )
                    .map_or(0, i64::unsigned_abs);
            }
            Err(e) => tracing::error!(error = %e, "results not evicted from the cache"),
        }
    }

    /// Keeps how long a module took, for longest-first and the expected times of the
    /// next evaluations (within the ledger's bound on durations).
    fn save_duration(&self, key: &str, seconds: f64) {
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO durations (key, seconds) VALUES (?1, ?2)",
            params![key, seconds],
        ) {
            tracing::error!(error = %e, "duration not stored");
        }
    }

    /// Keeps what a module held when it last ran whole, for splitting the next
    /// evaluations' stragglers.
    fn save_shape(&self, key: &str, shape: &Shape) {
        let cuts = serde_json::to_string(&shape.cuts).unwrap_or_default();
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO module_shapes (key, tests, cuts) VALUES (?1, ?2, ?3)",
            params![key, shape.tests, cuts],
        ) {
            tracing::error!(error = %e, "module's shape not stored");
        }
    }

    fn save(&self, evaluation: &Evaluation) {
        self.changes.send_replace(evaluation.id);
        let text = serde_json::to_string(evaluation).unwrap_or_default();
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO evaluations (id, body) VALUES (?1, ?2)",
            params![evaluation.id as i64, text],
        ) {
            tracing::error!(error = %e, "evaluation not stored");
        }
    }
}

impl Engine {
    /// Opens the engine's database in `config.dir` (its evaluations come back) and starts
    /// its workers.
    pub fn start(
        config: EngineConfig,
        cluster: Option<ClusterConfig>,
    ) -> Result<Self, EngineError> {
        std::fs::create_dir_all(&config.dir)?;
        let db = teia_node::store::open_database(&config.dir.join("jobs.sqlite3"), false)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS evaluations (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS result_cache (key TEXT PRIMARY KEY, body TEXT NOT NULL,
                 eval INTEGER NOT NULL, at INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS result_cache_at ON result_cache (at);
             CREATE TABLE IF NOT EXISTS durations (key TEXT PRIMARY KEY, seconds REAL NOT NULL);
             CREATE TABLE IF NOT EXISTS module_shapes (key TEXT PRIMARY KEY,
                 tests INTEGER NOT NULL, cuts TEXT NOT NULL);",
        )?;
        if config.result_cache.is_none() {
            db.execute("DELETE FROM result_cache", [])?;
        }
        let cache_bytes: i64 = db.query_row(
            "SELECT COALESCE(SUM(LENGTH(key) + LENGTH(body)), 0) FROM result_cache",
            [],
            |row| row.get(0),
        )?;
        let mut ledger = Ledger::default();
        {
            let mut statement = db.prepare("SELECT key, seconds FROM durations")?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, f64>(1)?))
            })?;
            for (key, seconds) in rows.flatten() {
                ledger.learn_duration(key, seconds);
            }
            let mut statement = db.prepare("SELECT key, tests, cuts FROM module_shapes")?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u32>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })?;
            for (key, tests, cuts) in rows.flatten() {
                let cuts = serde_json::from_str(&cuts).unwrap_or_default();
                ledger.learn_shape(key, Shape { tests, cuts });
            }
        }
        {
            let mut statement = db.prepare("SELECT body FROM evaluations")?;
            let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
            for body in rows.flatten() {
                if let Ok(mut evaluation) = serde_json::from_str::<Evaluation>(&body) {
                    // Modules that were running when the node stopped run again.
                    evaluation.requeue_running();
                    ledger.replicate(evaluation);
                }
            }
        }
        let runner = Runner::new(
            &config.dir,
            config.python.clone(),
            config.limits.clone(),
            config.isolation.clone(),
        )?;
        let cluster = cluster.map(|c| Arc::new(Cluster::new(c, &config.node, config.others)));
        let engine = Self {
            runner: Arc::new(runner),
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                ledger,
                db,
                work: Work::default(),
                next: 0,
                cache_bytes: cache_bytes.unsigned_abs(),
                changes: tokio::sync::watch::Sender::new(0),
            })),
            started: Instant::now(),
            cluster,
            clones: Arc::new(tokio::sync::Semaphore::new(MAX_CLONES)),
            tasks: Arc::new(TaskSet::default()),
            traffic: Arc::new(Traffic::default()),
        };
        engine.start_cluster();
        let warming = Arc::clone(&engine.runner);
        engine.tasks.spawn(async move { warming.warm_up().await });
        for slot in 0..engine.config.workers.max(1) {
            let worker = engine.clone();
            engine
                .tasks
                .spawn_finishing(async move { worker.work(slot).await });
        }
        tracing::info!(
            workers = engine.config.workers,
            isolation = %engine.config.isolation.describe(),
            "job engine ready"
        );
        if engine.config.isolation == crate::runner::Isolation::Limits {
            tracing::warn!(
                "modules and script tasks run WITHOUT A SANDBOX: they can read and change \
                 everything this user can (install bubblewrap)"
            );
        }
        Ok(engine)
    }

    /// Stops the engine: its workers take nothing more, the modules and script tasks
    /// running are killed (and their results not recorded: they run again, here after a
    /// restart or on another node), its periodic duties and the streams it serves end; waits
    /// for its tasks up to [`SHUTDOWN_GRACE`], then aborts those left.
    pub async fn shutdown(&self) {
        self.tasks.stop();
        self.runner.stop().await;
        self.tasks.shutdown(SHUTDOWN_GRACE).await;
        tracing::info!("job engine stopped");
    }

    /// Waits up to `wait`, or until the engine stops.
    pub(crate) async fn pause(&self, wait: Duration) {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = self.tasks.stopped() => {}
        }
    }

    /// Whether a module of a project with bytes `blob`, of an evaluation submitted at
    /// `submitted` (unix ms), may be handed out: its bytes are at [`REPLICAS`] nodes of the
    /// cluster (as many as it has that run modules), or [`REPLICATION_WAIT`] has passed.
    pub(crate) fn replicated(&self, submitted: u64, blob: &str) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        crate::proto::cluster::may_hand_out(
            cluster.member_count(),
            cluster.holder_count(blob),
            submitted,
            unix_ms(),
        )
    }

    /// Waits until every project of evaluation `id` may be handed out (see
    /// [`Engine::replicated`]): `POST /evaluation` answers then, so that an evaluation
    /// answered survives its owner where the cluster allows.
    pub async fn wait_replicated(&self, id: EvalId) {
        loop {
            let ready = {
                let state = lock(&self.state);
                state.ledger.get(id).is_none_or(|evaluation| {
                    evaluation
                        .projects
                        .values()
                        .all(|p| self.replicated(evaluation.submitted_at, &p.blob))
                })
            };
            if ready || self.tasks.stopping() {
                return;
            }
            self.pause(REPLICATED_POLL).await;
        }
    }

    /// The folder of a leased module's project here, fetched by hash from the nodes of the
    /// cluster when this node does not have it (it took the evaluation over).
    async fn project_here(&self, lease: &Lease) -> Option<PathBuf> {
        if let Some(folder) = self.local_project(lease) {
            return Some(folder);
        }
        let cluster = self.cluster.as_ref()?;
        let members = cluster.member_names();
        match self
            .fetch_project(cluster, &self.config.node, None, &members, lease)
            .await
        {
            Ok(folder) => Some(folder),
            Err(e) => {
                tracing::debug!(blob = %lease.blob, error = %e, "project not found in the cluster");
                None
            }
        }
    }

    /// What a submitter must be told: tasks here run without a sandbox.
    pub fn warning(&self) -> Option<&'static str> {
        (self.config.isolation == crate::runner::Isolation::Limits).then_some(
            "this node has no working sandbox: the submission's code runs with everything the \
             node's user can reach (install bubblewrap on it)",
        )
    }

    /// Forgets the oldest finished evaluations past `keep_finished`: from the ledger, the
    /// database and the disk.
    fn forget_oldest_finished(&self) {
        let mut state = lock(&self.state);
        let mut finished: Vec<(u64, EvalId)> = state
            .ledger
            .all()
            .filter(|e| !matches!(e.status(), "queued" | "running"))
            .map(|e| (e.finished_at.unwrap_or(e.submitted_at), e.id))
            .collect();
        let keep = self.config.keep_finished;
        if finished.len() <= keep {
            return;
        }
        finished.sort_unstable();
        let excess = finished.len() - keep;
        for (_, id) in finished.into_iter().take(excess) {
            state.ledger.remove(id);
            if let Err(e) = state
                .db
                .execute("DELETE FROM evaluations WHERE id = ?1", params![id as i64])
            {
                tracing::error!(error = %e, "a forgotten evaluation stays in the database");
            }
            let _ =
                std::fs::remove_dir_all(self.config.dir.join("evaluations").join(id.to_string()));
            tracing::info!(id, "finished evaluation forgotten (more than {keep} kept)");
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A new id: unix seconds (32 bits), this node (10 bits of its id's hash) and a counter
    /// (11 bits): below 2^53, unique across nodes without coordination.
    fn new_id(&self, state: &mut State) -> EvalId {
        let seconds = (unix_ms() / 1000) & 0xFFFF_FFFF;
        let node = self
            .config
            .node
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)))
            & 0x3FF;
        loop {
            state.next = state.next.wrapping_add(1);
            let id = (seconds << 21) | (node << 11) | (state.next & 0x7FF);
            if state.ledger.get(id).is_none() {
                return id;
            }
        }
    }

    /// Accepts a submitted ZIP (at `archive`): unpacks it, finds its projects, records the
    /// evaluation; returns its id.
    pub fn submit_zip(&self, archive: &Path) -> Result<EvalId, EngineError> {
        self.submit_zip_with(archive, SubmitOptions::default())
    }

    /// As [`Engine::submit_zip`], with `options`.
    pub fn submit_zip_with(
        &self,
        archive: &Path,
        options: SubmitOptions,
    ) -> Result<EvalId, EngineError> {
        let id = self.reserve()?;
        let evaluations = self.config.dir.join("evaluations");
        let left = EVALUATIONS_DISK.saturating_sub(disk_usage(&evaluations));
        if left == 0 {
            return Err(EngineError::DiskFull);
        }
        let root = evaluations.join(id.to_string());
        let source = root.join("source");
        let result = bundle::unpack_within(archive, &source, left)
            .and_then(|()| bundle::projects(&source, "project"));
        match result {
            Ok(found) => self.record(id, &root, found, options),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                Err(e.into())
            }
        }
    }

    /// Accepts a list of git repositories: clones each (the token, if any, sent as an HTTP
    /// header through git's environment: never on a command line, in a log or on disk).
    pub async fn submit_git(
        &self,
        urls: &[String],
        token: Option<&str>,
    ) -> Result<EvalId, EngineError> {
        self.submit_git_with(urls, token, SubmitOptions::default())
            .await
    }

    /// As [`Engine::submit_git`], with `options`.
    pub async fn submit_git_with(
        &self,
        urls: &[String],
        token: Option<&str>,
        options: SubmitOptions,
    ) -> Result<EvalId, EngineError> {
        for url in urls {
            check_git_url(url, &self.config.git_schemes)?;
        }
        // Counted before anything is cloned: one submission holds one clone at a time.
        let _clone = Arc::clone(&self.clones)
            .try_acquire_owned()
            .map_err(|_| EngineError::ClonesBusy)?;
        let id = self.reserve()?;
        let root = self.config.dir.join("evaluations").join(id.to_string());
        let source = root.join("source");
        std::fs::create_dir_all(&source)?;
        let mut found = Vec::new();
        for (index, url) in urls.iter().enumerate() {
            let name = url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("project")
                .trim_end_matches(".git");
            let name = if name.is_empty() || name.starts_with('.') {
                format!("project{index}")
            } else {
                name.to_owned()
            };
            let dir = source.join(&name);
            if let Err(e) = clone(url, &dir, token, &self.config.git_schemes).await {
                let _ = std::fs::remove_dir_all(&root);
                return Err(e);
            }
            match bundle::projects(&dir, &name) {
                Ok(mut projects) => found.append(&mut projects),
                Err(BundleError::NoProject) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if found.is_empty() {
            let _ = std::fs::remove_dir_all(&root);
            return Err(BundleError::NoProject.into());
        }
        self.record(id, &root, found, options)
    }

    fn reserve(&self) -> Result<EvalId, EngineError> {
        self.forget_oldest_finished();
        let mut state = lock(&self.state);
        let active = state
            .ledger
            .all()
            .filter(|e| matches!(e.status(), "queued" | "running"))
            .count();
        if active >= MAX_ACTIVE {
            return Err(EngineError::Busy);
        }
        Ok(self.new_id(&mut state))
    }

    fn record(
        &self,
        id: EvalId,
        root: &Path,
        found: Vec<bundle::FoundProject>,
        options: SubmitOptions,
    ) -> Result<EvalId, EngineError> {
        let packs = root.join("projects");
        std::fs::create_dir_all(&packs)?;
        let mut projects = Vec::new();
        for project in found {
            let packed = packs.join(format!("{}.zip", project.name));
            bundle::pack(&project.dir, &packed)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(std::fs::File::open(&packed)?)?;
            let (content, module_content) = match &self.config.result_cache {
                Some(_) => {
                    let hashes = bundle::content_hashes(&project.dir)?;
                    (Some(hashes.shared), hashes.modules)
                }
                None => (None, Default::default()),
            };
            projects.push(NewProject {
                name: project.name,
                blob: hasher.finalize().to_hex().to_string(),
                content,
                module_content,
                modules: project.modules,
            });
        }
        // The projects are packed: the submission as it came takes no more room.
        let _ = std::fs::remove_dir_all(root.join("source"));
        let project_count = projects.len() as u64;
        let mut state = lock(&self.state);
        state
            .ledger
            .submit(id, &self.config.node, unix_ms(), projects);
        let reruns = options.rerun_failures.unwrap_or(self.config.rerun_failures);
        state.ledger.set_rerun_failures(id, reruns);
        let reuse = |state: &mut State| match &self.config.result_cache {
            Some(policy) if options.use_cache => reuse_results(state, id, policy),
            _ => 0,
        };
        let mut reused = reuse(&mut state);
        let split = if options.split {
            state.ledger.split_stragglers(id, self.worker_estimate())
        } else {
            0
        };
        if split > 0 {
            // Pieces of an earlier split the same way may be cached too.
            reused += reuse(&mut state);
        }
        if let Some(evaluation) = state.ledger.get(id).cloned() {
            state.save(&evaluation);
        }
        drop(state);
        if let Some(cluster) = &self.cluster {
            cluster.announce_now.notify_one();
        }
        tracing::info!(
            id,
            projects = project_count,
            reused,
            split,
            "evaluation accepted"
        );
        Ok(id)
    }

    /// One worker: takes modules of this node's evaluations, or else of trusted owners',
    /// and runs them, until the engine stops.
    async fn work(&self, slot: usize) {
        let lease_ms = (self.config.limits.timeout + Duration::from_secs(30)).as_millis() as u64;
        while !self.tasks.stopping() {
            // Our own workers start at once: the bytes they run are ours, and `POST
            // /evaluation` answers only once they are replicated.
            let lease = {
                let mut state = lock(&self.state);
                let now = self.now_ms();
                state.ledger.lease(
                    &self.config.node,
                    &self.config.address,
                    now,
                    lease_ms,
                    unix_ms(),
                )
            };
            let Some(lease) = lease else {
                // Other nodes' modules, else their script tasks (when this node runs others').
                let others = self.config.others;
                let worked = others
                    && ((self.config.modules && self.work_remote(slot).await)
                        || self.work_remote_script(slot).await);
                if !worked {
                    self.pause(IDLE_WAIT).await;
                }
                continue;
            };
            let Some(extracted) = self.project_here(&lease).await else {
                // Not a test failure: the module waits for its project's bytes.
                let why = format!(
                    "the bytes of project {} are not to be had here yet (no node of the cluster \
                     that has them answers); its modules wait",
                    lease.project
                );
                tracing::warn!(module = %lease.module, "{why}");
                {
                    let mut state = lock(&self.state);
                    if state.ledger.give_back(&lease, &self.config.address, &why) {
                        if let Some(evaluation) = state.ledger.get(lease.eval).cloned() {
                            state.save(&evaluation);
                        }
                    }
                }
                self.pause(PROJECT_WAIT).await;
                continue;
            };
            let result = self.run_lease(&lease, &extracted, slot).await;
            if self.tasks.stopping() {
                // Killed by the stop: the module stays leased in the database, and runs
                // again when the node starts.
                return;
            }
            self.count_work(&lease, &result);
            self.complete(&lease, &self.config.address, result);
        }
    }

    /// Runs a leased module of the project in `project`.
    pub(crate) async fn run_lease(
        &self,
        lease: &Lease,
        project: &Path,
        slot: usize,
    ) -> ModuleResult {
        let work = self
            .config
            .dir
            .join("work")
            .join(format!("{}-{slot}-{}", lease.eval, lease.attempt));
        let _ = std::fs::remove_dir_all(&work);
        let outcome = self
            .runner
            .run_module(
                project,
                lease.path(),
                &lease.selection,
                lease.piece.as_ref().map(Piece::shard).as_deref(),
                &work,
                &self.config.address,
            )
            .await;
        let _ = std::fs::remove_dir_all(&work);
        match outcome {
            Ok(outcome) => ModuleResult {
                environment: self
                    .config
                    .result_cache
                    .as_ref()
                    .map(|policy| policy.environment.clone()),
                ..outcome.result
            },
            Err(e) => {
                tracing::error!(error = %e, module = %lease.module, "module not run");
                ModuleResult {
                    errors: 1,
                    node: self.config.address.clone(),
                    ..Default::default()
                }
            }
        }
    }

    /// Counts a module this node ran, for `/stats`.
    pub(crate) fn count_work(&self, lease: &Lease, result: &ModuleResult) {
        let mut state = lock(&self.state);
        state.work.passed += u64::from(result.passed);
        state.work.failed += u64::from(result.failed + result.errors);
        state.work.modules += 1;
        state
            .work
            .projects
            .insert((lease.eval, lease.project.clone()));
        state.work.evaluations.insert(lease.eval);
    }

    /// Records `worker`'s result of `lease` in our ledger (we own its evaluation); false
    /// (nothing recorded) unless `worker` holds that lease for the module's current attempt.
    pub(crate) fn complete(&self, lease: &Lease, worker: &str, result: ModuleResult) -> bool {
        let elsewhere = self.another_worker_than(worker);
        // Drawn once the result is here, so a worker cannot know which it runs are checked.
        let verify =
            self.config.verify > 0.0 && random_fraction() < self.config.verify && elsewhere;
        let mut state = lock(&self.state);
        let owner_worker = self.config.address.as_str();
        let completed = state.ledger.complete_or_verify(
            lease,
            worker,
            result,
            unix_ms(),
            verify,
            owner_worker,
            elsewhere,
        );
        match &completed {
            Completed::Refused => return false,
            Completed::Disputed { stands, other } => {
                state.evict_from(&other.node);
                tracing::warn!(
                    eval = lease.eval,
                    module = %format!("{}/{}", lease.project, lease.module),
                    stands = %stands.node,
                    disputed = %other.node,
                    "a verification disagreed: the module is disputed ({} says {}/{}/{}, {} says {}/{}/{} passed/failed/errors)",
                    stands.node, stands.passed, stands.failed, stands.errors,
                    other.node, other.passed, other.failed, other.errors,
                );
            }
            Completed::Verifying => {
                tracing::debug!(module = %lease.module, %worker, "result kept; the module runs again to verify it");
            }
            Completed::Rerunning => {
                tracing::debug!(module = %lease.module, %worker, "result kept; its failed tests run again");
            }
            Completed::Done | Completed::Agreed => {
                if let Some(policy) = &self.config.result_cache {
                    let trusted = !crate::proto::seed000_members::is_course_worker(worker);
                    keep_result(&mut state, lease, policy, trusted);
                }
            }
            Completed::RerunsOver { first_worker } => {
                if let Some(policy) = &self.config.result_cache {
                    let trusted = !crate::proto::seed000_members::is_course_worker(first_worker);
                    keep_result(&mut state, lease, policy, trusted);
                }
            }
        }
        let key = format!("{}/{}", lease.project, lease.path());
        if let Some(seconds) = state.ledger.duration(&lease.project, lease.path()) {
            state.save_duration(&key, seconds);
        }
        if let Some(shape) = state.ledger.shape(&lease.project, lease.path()).cloned() {
            state.save_shape(&key, &shape);
        }
        if let Some(evaluation) = state.ledger.get(lease.eval).cloned() {
            state.save(&evaluation);
        }
        true
    }

    /// Workers the cluster is expected to have: this node's, as many again for each member
    /// (what splitting a straggler counts on).
    fn worker_estimate(&self) -> usize {
        let members = self
            .cluster
            .as_ref()
            .map_or(0, |cluster| cluster.member_count());
        self.config.workers.max(1) * (1 + members)
    }

    /// Whether a worker other than `worker` can run a module of ours: our own workers when
    /// `worker` is another node's, else another node of the cluster.
    fn another_worker_than(&self, worker: &str) -> bool {
        worker != self.config.address
            || self
                .cluster
                .as_ref()
                .is_some_and(|cluster| cluster.member_count() > 0)
    }

    /// Modules of ours waiting for a worker.
    pub(crate) fn pending_modules(&self) -> u32 {
        let state = lock(&self.state);
        state
            .ledger
            .owned_by(&self.config.node)
            .map(|e| e.counts().1.pending)
            .sum()
    }

    /// Our evaluations not finished.
    pub fn unfinished(&self) -> u32 {
        let state = lock(&self.state);
        state
            .ledger
            .owned_by(&self.config.node)
            .filter(|e| matches!(e.status(), "queued" | "running"))
            .count() as u32
    }

    /// Our evaluations not finished, for replicas.
    pub(crate) fn replica_of_ours(&self) -> Vec<Evaluation> {
        let now = unix_ms();
        let state = lock(&self.state);
        state
            .ledger
            .owned_by(&self.config.node)
            .filter(|e| e.worth_replicating(now))
            .cloned()
            .collect()
    }

    /// Takes in evaluations replicated from `owner` (ours are never replaced).
    pub(crate) fn take_replicas(&self, owner: &str, evaluations: Vec<Evaluation>) {
        let mut state = lock(&self.state);
        for evaluation in evaluations {
            if evaluation.owner != owner {
                continue;
            }
            let ours = state
                .ledger
                .get(evaluation.id)
                .is_some_and(|e| e.owner == self.config.node);
            if ours {
                continue;
            }
            state.save(&evaluation);
            let before = state.ledger.get(evaluation.id).cloned();
            let policy = self.config.result_cache.as_ref();
            learn_replicated(&mut state, before.as_ref(), &evaluation, policy);
            state.ledger.replicate(evaluation);
        }
    }

    /// Evaluations replicated here, not finished, whose owner is `owner`.
    pub(crate) fn replicas_owned_by(&self, owner: &str) -> Vec<(EvalId, Vec<String>)> {
        let state = lock(&self.state);
        state
            .ledger
            .owned_by(owner)
            .filter(|e| matches!(e.status(), "queued" | "running"))
            .map(|e| (e.id, e.projects.values().map(|p| p.blob.clone()).collect()))
            .collect()
    }

    /// Makes this node the owner of `eval` (its old owner is gone): modules that were
    /// running go back to the queue; finished ones are kept.
    pub(crate) fn take_over(&self, eval: EvalId) {
        let mut state = lock(&self.state);
        state.ledger.take_over(eval, &self.config.node);
        if let Some(mut evaluation) = state.ledger.get(eval).cloned() {
            evaluation.requeue_running();
            state.save(&evaluation);
            state.ledger.replicate(evaluation);
        }
        tracing::warn!(eval, "took over an evaluation whose owner is gone");
    }

    /// Records `owner` as the new owner of `eval`.
    pub(crate) fn set_owner(&self, eval: EvalId, owner: &str) {
        let mut state = lock(&self.state);
        if state.ledger.take_over(eval, owner) {
            if let Some(evaluation) = state.ledger.get(eval).cloned() {
                state.save(&evaluation);
            }
        }
    }

    /// The folder of a leased module's project here: unpacked from the evaluation's own
    /// packs (we accepted it) or from the cache of projects fetched by hash.
    pub(crate) fn local_project(&self, lease: &Lease) -> Option<PathBuf> {
        self.project_dir(lease.eval, &lease.project, &lease.blob)
    }

    /// The folder of project `project` (bytes `blob`) of evaluation `eval`, unpacked from
    /// its ZIP when it is ours, or the cached copy of another owner's.
    pub(crate) fn project_dir(&self, eval: EvalId, project: &str, blob: &str) -> Option<PathBuf> {
        let packs = self
            .config
            .dir
            .join("evaluations")
            .join(eval.to_string())
            .join("projects");
        let packed = packs.join(format!("{project}.zip"));
        if packed.is_file() {
            let extracted = packs.join(project);
            if !extracted.is_dir() {
                // Unpacked aside, then renamed: another worker of this node never sees a
                // project half unpacked; when two race, the first rename wins.
                let partial = packs.join(format!(
                    ".{project}.unpacking-{}",
                    UNPACKING.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let unpacked = bundle::unpack(&packed, &partial);
                if let Err(e) = &unpacked {
                    tracing::error!(error = %e, "project not unpacked");
                }
                if unpacked.is_err() || std::fs::rename(&partial, &extracted).is_err() {
                    let _ = std::fs::remove_dir_all(&partial);
                }
            }
            return Some(extracted);
        }
        let cached = self.config.dir.join("blobs").join(blob);
        cached.is_dir().then_some(cached)
    }

    /// Takes back remote leases not renewed in time.
    pub(crate) fn expire_leases(&self) {
        let mut state = lock(&self.state);
        let now = self.now_ms();
        let taken = state.ledger.expire(now, unix_ms());
        for lease in &taken {
            tracing::warn!(module = %lease.module, "a worker went silent; its module goes to another");
            if let Some(evaluation) = state.ledger.get(lease.eval).cloned() {
                state.save(&evaluation);
            }
        }
    }

    /// Leases one of our modules to a remote worker.
    pub(crate) fn lease_remote(&self, worker: &str) -> Option<Lease> {
        self.lease_matching(worker, crate::proto::cluster::REMOTE_LEASE_MS, |_, _| true)
    }

    /// Leases one of our modules that `module_ok(path, whole)` takes to `worker`, another node
    /// (of the cluster, or a course node: renewed with [`Engine::renew_course`]), until
    /// `lease_ms` from now, once its project's bytes are replicated enough.
    pub(crate) fn lease_matching(
        &self,
        worker: &str,
        lease_ms: u64,
        module_ok: impl Fn(&str, bool) -> bool,
    ) -> Option<Lease> {
        let mut state = lock(&self.state);
        let now = self.now_ms();
        let lease = state.ledger.lease_matching(
            &self.config.node,
            worker,
            now,
            lease_ms,
            unix_ms(),
            |submitted, blob| self.replicated(submitted, blob),
            module_ok,
        )?;
        if let Some(evaluation) = state.ledger.get(lease.eval).cloned() {
            state.save(&evaluation);
        }
        Some(lease)
    }

    /// Extends a course node's lease to `lease_ms` from now; false if it is no longer its.
    pub(crate) fn renew_course(&self, lease: &Lease, worker: &str, lease_ms: u64) -> bool {
        let mut state = lock(&self.state);
        let now = self.now_ms();
        state.ledger.renew(lease, worker, now, lease_ms)
    }

    /// Gives back a module a course node never started (it did not confirm it).
    pub(crate) fn release_course(&self, lease: &Lease, worker: &str) {
        let mut state = lock(&self.state);
        if state.ledger.release(lease, worker) {
            if let Some(evaluation) = state.ledger.get(lease.eval).cloned() {
                state.save(&evaluation);
            }
        }
    }

    /// Our evaluations' projects that have modules waiting or running: (evaluation,
    /// project, bytes' hash).
    pub(crate) fn projects_under_way(&self) -> Vec<(EvalId, String, String)> {
        let state = lock(&self.state);
        state
            .ledger
            .owned_by(&self.config.node)
            .filter(|e| e.failure.is_none())
            .flat_map(|e| {
                e.projects
                    .iter()
                    .filter(|(_, project)| {
                        project.modules.values().any(|m| {
                            matches!(
                                m.state,
                                ModuleState::Pending { .. } | ModuleState::Leased { .. }
                            )
                        })
                    })
                    .map(move |(name, project)| (e.id, name.clone(), project.blob.clone()))
            })
            .collect()
    }

    /// Renews a remote worker's lease.
    pub(crate) fn renew_remote(&self, lease: &Lease, worker: &str) {
        let mut state = lock(&self.state);
        let now = self.now_ms();
        state
            .ledger
            .renew(lease, worker, now, crate::proto::cluster::REMOTE_LEASE_MS);
    }

    /// The packed project `blob` of ours, if `peer` holds a lease of one of its modules (or
    /// any we have, when `trusted`: a replica).
    pub(crate) fn blob_for(&self, peer: &str, blob: &str, trusted: bool) -> Option<PathBuf> {
        if trusted {
            let cached = self.config.dir.join("blobs").join(format!("{blob}.zip"));
            if cached.is_file() {
                return Some(cached);
            }
        }
        let state = lock(&self.state);
        for evaluation in state.ledger.owned_by(&self.config.node) {
            for (name, project) in &evaluation.projects {
                if project.blob != blob {
                    continue;
                }
                let leased = project.modules.values().any(
                    |m| matches!(&m.state, ModuleState::Leased { worker, .. } if worker == peer),
                );
                if leased || trusted {
                    return Some(
                        self.config
                            .dir
                            .join("evaluations")
                            .join(evaluation.id.to_string())
                            .join("projects")
                            .join(format!("{name}.zip")),
                    );
                }
            }
        }
        None
    }

    /// Evaluations known, in id order: at most `limit` from the `offset`th.
    pub fn evaluations(&self, offset: usize, limit: usize) -> Vec<Evaluation> {
        let state = lock(&self.state);
        state
            .ledger
            .all()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect()
    }

    /// One evaluation, if known.
    pub fn evaluation(&self, id: EvalId) -> Option<Evaluation> {
        lock(&self.state).ledger.get(id).cloned()
    }

    /// This node's own status, as it floods it.
    pub(crate) fn own_status(&self, neighbours: Vec<String>) -> crate::proto::messages::JobMessage {
        let state = lock(&self.state);
        let work = &state.work;
        crate::proto::messages::JobMessage::NodeStatus {
            peer_id: self.config.node.clone(),
            address: self.config.address.clone(),
            neighbours,
            passed: work.passed,
            failed: work.failed,
            projects: work.projects.len() as u64,
            modules: work.modules,
            evaluations: work.evaluations.iter().copied().collect(),
        }
    }

    /// Sums over every evaluation this node keeps (its own and those it replicates from
    /// the owners it trusts, so every node of a cluster sums the same; kept across
    /// restarts).
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for evaluation in lock(&self.state).ledger.all() {
            let (tests, _) = evaluation.counts();
            totals.passed += u64::from(tests.passed);
            totals.failed += u64::from(tests.failed + tests.errors);
            totals.projects += evaluation.projects.len() as u64;
            totals.evaluations += 1;
        }
        totals
    }

    /// Bytes its `jobs` streams moved since the start (projects, ledgers, script tasks and
    /// their results): (fetched, served).
    pub fn transferred(&self) -> (u64, u64) {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.traffic.fetched), load(&self.traffic.served))
    }

    /// Tasks whose sandbox could not be made since the start (they did not run).
    pub fn sandbox_failures(&self) -> u64 {
        self.runner.sandbox_failures()
    }

    /// Follows the evaluations: the receiver is told the id of the last evaluation that
    /// changed (submitted, a module leased or done, finished); changes that come faster
    /// than it reads are seen as one.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<EvalId> {
        lock(&self.state).changes.subscribe()
    }

    /// The test modules of every evaluation kept, by state: `done`, `running` and
    /// `pending`.
    pub fn module_states(&self) -> [(&'static str, usize); 3] {
        let (mut done, mut running, mut pending) = (0usize, 0usize, 0usize);
        for evaluation in lock(&self.state).ledger.all() {
            let (_, modules) = evaluation.counts();
            done += modules.executed as usize;
            running += modules.running as usize;
            pending += modules.pending as usize;
        }
        [("done", done), ("running", running), ("pending", pending)]
    }

    /// The load of this node and of the nodes heard from in the last seconds.
    pub fn loads(&self) -> Vec<NodeLoad> {
        let mut statuses = vec![self.own_status(Vec::new())];
        statuses.extend(self.heard_statuses());
        statuses
            .into_iter()
            .filter_map(|status| match status {
                crate::proto::messages::JobMessage::NodeStatus {
                    address,
                    passed,
                    failed,
                    projects,
                    modules,
                    evaluations,
                    ..
                } => Some(NodeLoad {
                    address,
                    failed,
                    passed,
                    projects,
                    modules,
                    evaluations,
                }),
                _ => None,
            })
            .collect()
    }
}

/// Sums over the evaluations a node keeps (`GET /stats`' `all`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Tests failed or in error.
    pub failed: u64,
    /// Tests passed.
    pub passed: u64,
    /// Projects.
    pub projects: u64,
    /// Evaluations.
    pub evaluations: u64,
}

/// What one node has done (`GET /stats`' `nodes`), as its status says.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeLoad {
    /// Its address (`ip:port`).
    pub address: String,
    /// Tests failed there.
    pub failed: u64,
    /// Tests passed there.
    pub passed: u64,
    /// Projects it worked on.
    pub projects: u64,
    /// Modules it ran.
    pub modules: u64,
    /// The evaluations it worked on.
    pub evaluations: Vec<EvalId>,
}

/// Clones `url` into `dir` with git; the token goes in an HTTP header set through git's
/// environment (`GIT_CONFIG_*`), so it is on no command line and in no file.
/// Refuses a repository URL whose scheme is not in `schemes` (a local path counts as
/// `file`), saying what is allowed.
fn check_git_url(url: &str, schemes: &[String]) -> Result<(), EngineError> {
    let scheme = match url.split_once("://") {
        Some((scheme, _)) => scheme.to_ascii_lowercase(),
        // `host:path` is ssh's short form; anything else is a local path.
        None if url.contains(':') && !url.starts_with('/') && !url.starts_with('.') => {
            "ssh".to_owned()
        }
        None => "file".to_owned(),
    };
    if schemes.contains(&scheme) {
        return Ok(());
    }
    Err(EngineError::Refused {
        url: url.to_owned(),
        why: format!(
            "this node clones only {} repositories (a node's owner allows more with \
             --allow-git-scheme; local paths are `file`)",
            schemes.join(", ")
        ),
    })
}

/// Clones `url` into `dir` with git, in an empty environment (no `HOME`: none of the node
/// user's keys, credentials or configuration), only by the allowed protocols, never
/// prompting; the token goes in an HTTP header set through git's environment
/// (`GIT_CONFIG_*`), so it is on no command line and in no file, and tasks cannot read it
/// (they see no other process). What git said is logged; the submitter is told only that
/// the clone failed, so that the node cannot be used to probe hosts and ports.
async fn clone(
    url: &str,
    dir: &Path,
    token: Option<&str>,
    schemes: &[String],
) -> Result<(), EngineError> {
    let home = dir.with_extension("git-home");
    std::fs::create_dir_all(&home)?;
    let mut command = tokio::process::Command::new("git");
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -F /dev/null")
        .env("GIT_PROTOCOL_FROM_USER", "0")
        .arg("-c")
        .arg("protocol.allow=never");
    for scheme in schemes {
        command
            .arg("-c")
            .arg(format!("protocol.{scheme}.allow=always"));
    }
    command
        .args([
            "clone",
            "--depth",
            "1",
            "--quiet",
            "--no-recurse-submodules",
            "--",
            url,
        ])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        command
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Bearer {token}"),
            );
    }
    let output = tokio::time::timeout(CLONE_TIME, command.output()).await;
    let _ = std::fs::remove_dir_all(&home);
    let output = output
        .map_err(|_| EngineError::Clone {
            url: url.to_owned(),
            detail: format!("timed out after {CLONE_TIME:?}"),
        })?
        .map_err(|e| EngineError::Clone {
            url: url.to_owned(),
            detail: format!("cannot run git: {e}"),
        })?;
    if !output.status.success() {
        let mut said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            said = said.replace(token, "***");
        }
        tracing::warn!(%url, git = %said, "clone failed");
        return Err(EngineError::Clone {
            url: url.to_owned(),
            detail: "git could not fetch it (no such repository, no access, or unreachable; \
                     the node's log has git's message)"
                .to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A test module whose test starts a child holding a lock on `outlives.lock`, says so
    /// with `outlives.ready`, and hangs: the lock is free again only once the child is gone.
    const HANGS: &str = "import os, subprocess, sys, time\nHOLD = 'import fcntl, time\\nf = open(\"outlives.lock\", \"w\")\\nfcntl.flock(f, fcntl.LOCK_EX)\\nopen(\"outlives.ready\", \"w\").close()\\ntime.sleep(300)\\n'\n\ndef test_hangs():\n    open('outlives.lock', 'w').close()\n    subprocess.Popen([sys.executable, '-c', HOLD])\n    time.sleep(300)\n";

    /// A node's engine in `dir`: one worker running its own modules, no cache.
    fn test_config(dir: &Path) -> EngineConfig {
        EngineConfig {
            dir: dir.to_owned(),
            node: "node".into(),
            address: "127.0.0.1:1".into(),
            python: crate::runner::resolve_python(Path::new("python3")),
            workers: 1,
            limits: Limits::default(),
            isolation: Isolation::Limits,
            modules: true,
            others: false,
            verify: 0.0,
            keep_finished: KEEP_FINISHED,
            git_schemes: vec!["https".into()],
            result_cache: None,
            rerun_failures: RERUN_FAILURES,
        }
    }

    /// The first file named `name` under `dir`.
    fn find(dir: &Path, name: &str) -> Option<PathBuf> {
        let mut stack = vec![dir.to_owned()];
        while let Some(folder) = stack.pop() {
            for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.file_name().is_some_and(|n| n == name) {
                    return Some(path);
                }
                if path.is_dir() {
                    stack.push(path);
                }
            }
        }
        None
    }

    /// `Engine::shutdown` kills the module running (and what it started), ends the
    /// engine's tasks within its grace, and records no result for the module it killed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_kills_the_running_module_and_records_no_result() {
        let dir = tempfile::tempdir().unwrap();
        let submission = dir.path().join("submission");
        std::fs::create_dir_all(submission.join("tests")).unwrap();
        std::fs::write(submission.join("tests").join("test_hangs.py"), HANGS).unwrap();
        let archive = dir.path().join("submission.zip");
        bundle::pack(&submission, &archive).unwrap();
        let node = dir.path().join("node");
        let config = test_config(&node);
        let engine = Engine::start(config, None).unwrap();
        let id = engine.submit_zip(&archive).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            if let Some(ready) = find(&node.join("work"), "outlives.ready") {
                break ready;
            }
            assert!(Instant::now() < deadline, "the module never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let held = std::fs::File::open(ready.with_file_name("outlives.lock")).unwrap();
        engine.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "a process of the module outlived the stop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let evaluation = engine.evaluation(id).unwrap();
        let module = evaluation
            .projects
            .get("project")
            .and_then(|p| p.modules.get("tests/test_hangs.py"))
            .unwrap();
        assert!(
            matches!(module.state, ModuleState::Leased { .. }),
            "{:?}",
            module.state
        );
    }

    /// A node a verification disagreed with loses every result it ran from the cache; the
    /// others' stay, and the cache's size follows.
    #[tokio::test]
    async fn the_results_of_a_node_found_disagreeing_are_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            environment: "env".into(),
            keep_failures: false,
            max_bytes: result_cache::MAX_BYTES,
        };
        let config = EngineConfig {
            modules: false,
            result_cache: Some(policy.clone()),
            ..test_config(&dir.path().join("node"))
        };
        let engine = Engine::start(config, None).unwrap();
        let result = |node: &str| ModuleResult {
            passed: 1,
            node: node.into(),
            environment: Some("env".into()),
            ..ModuleResult::default()
        };
        {
            let mut state = lock(&engine.state);
            state.keep("k-liar", &result("liar"), 1, policy.max_bytes);
            state.keep("k-honest", &result("honest"), 1, policy.max_bytes);
            let both = state.cache_bytes;
            state.evict_from("liar");
            assert!(state.cached("k-liar").is_none());
            assert_eq!(
                state.cached("k-honest").map(|(r, _)| r.node),
                Some("honest".into())
            );
            assert!(state.cache_bytes < both && state.cache_bytes > 0);
        }
        engine.shutdown().await;
    }
}
