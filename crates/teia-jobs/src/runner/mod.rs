//! Running one test module: `pytest MODULE` in a fresh copy of its project, with the
//! project's `requirements.txt` installed in a cached virtual environment ([`venv`], built
//! in a sandbox too, with the network), a clean environment, resource limits (`ulimit`:
//! memory, processes, file size), and under `bubblewrap` ([`sandbox`]: its own folder
//! only, no network, no capabilities, its own PID namespace, a user id of its own when the
//! node is root) when it is installed and works. Modules are forked from a warm
//! interpreter ([`warm`]) that has pytest imported already, each then isolated in
//! namespaces of its own.
//!
//! Results are counted per test as they happen, by a small pytest plugin that writes one
//! JSON line per test report to a file: a module killed at its timeout keeps the results of
//! the tests that finished, and counts one error for the one it was in.

pub mod sandbox;
mod venv;
mod warm;

pub use venv::{BUILD_TIME, MAX_REQUIREMENTS};
pub use warm::MAX_WARM;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[cfg(doc)]
use crate::proto::ledger::Piece;
use crate::proto::ledger::{list_failure, list_test, tail, ModuleResult, MAX_FAILURE_OUTPUT_BYTES};

/// The pytest plugin that reports each test as it ends, what was collected (and whether
/// the module may be split: no class- or module-scoped fixture, no `teia_no_split` mark),
/// and, at the end of a whole run, its tests' durations in short (the profile: how many
/// tests had run at each sixteenth of the time); for a piece of a split module
/// (`TEIA_SHARD=START:END`), it keeps only the collected tests from START up to END
/// (excluded; empty: to the last), or for `TEIA_SHARD=INDEX/OF` the INDEX-th (from 1) of
/// OF runs of equal count of them, and a collection error is reported by the first piece
/// alone.
const PLUGIN: &str = r#"
import json, os

_out = open(os.environ["TEIA_REPORT"], "a", buffering=1)
_shard = os.environ.get("TEIA_SHARD")
_order = []
_durations = {}

def _write(kind, outcome, nodeid, **more):
    _out.write(json.dumps(dict(kind=kind, outcome=outcome, nodeid=nodeid, **more)) + "\n")

def _why(report):
    # The end of pytest's report of a failure: where, and what was asserted.
    try:
        return str(report.longreprtext)[-4096:]
    except Exception:
        return ""

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "teia_no_split: never split this module's tests over several workers")

def _splittable(items):
    for item in items:
        if item.get_closest_marker("teia_no_split"):
            return False
        info = getattr(item, "_fixtureinfo", None)
        for defs in (getattr(info, "name2fixturedefs", None) or {}).values():
            for fixture in defs:
                if str(getattr(fixture, "scope", "function")) in ("class", "module"):
                    return False
    return True

def pytest_collection_modifyitems(session, config, items):
    collected, splittable = len(items), _splittable(items)
    _order[:] = [item.nodeid for item in items]
    if _shard and "/" in _shard:
        index, _, parts = _shard.partition("/")
        index, parts = int(index), int(parts)
        start, end = collected * (index - 1) // parts, collected * index // parts
    elif _shard:
        start, _, end = _shard.partition(":")
        start, end = int(start), (int(end) if end else collected)
    if _shard:
        deselected = items[:start] + items[end:]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        items[:] = items[start:end]
    _write("collected", "ok", "", count=collected, selected=len(items), splittable=splittable)

def pytest_collectreport(report):
    if report.failed and (not _shard or _shard.startswith(("0:", "1/"))):
        _write("collect", "error", report.nodeid, output=_why(report))

def pytest_sessionfinish(session):
    total = sum(_durations.get(nodeid, 0.0) for nodeid in _order)
    if _shard or total <= 0:
        return
    cuts, spent, part = [], 0.0, 1
    for index, nodeid in enumerate(_order):
        spent += _durations.get(nodeid, 0.0)
        while part < 16 and spent >= total * part / 16:
            cuts.append(index + 1)
            part += 1
    _write("profile", "ok", "", cuts=cuts[:15])

def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + (report.duration or 0.0)
    if type(report).__name__ == "SubtestReport":
        # As pytest's summary counts them: a failed subtest is a failure, a passed one
        # is not a test.
        if report.failed:
            _write("call", "failed", report.nodeid, output=_why(report))
        return
    if report.when == "call":
        outcome = "skipped" if report.skipped else report.outcome
        _write("call", outcome, report.nodeid, output=_why(report) if report.failed else "")
    elif report.failed:
        _write(report.when, "error", report.nodeid, output=_why(report))
    elif report.skipped and report.when == "setup":
        _write("setup", "skipped", report.nodeid)
"#;

/// Bytes of a module's output kept (the rest is dropped).
pub const OUTPUT_KEPT: usize = 64 * 1024;

/// Bytes of a module's report (one JSON line per test) read at most; a report cut there
/// counts the tests reported before the cut.
pub const MAX_REPORT: u64 = 32 * 1024 * 1024;

/// Limits a module runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall time.
    pub timeout: Duration,
    /// Virtual memory, in MiB.
    pub memory_mib: u64,
    /// Processes of the user at once.
    pub processes: u64,
    /// Size of any file written, in MiB.
    pub file_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            memory_mib: 2048,
            processes: 256,
            file_mib: 256,
        }
    }
}

/// How tasks are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// `bubblewrap`: no network, the system read-only, only the work folder writable.
    Bubblewrap(PathBuf),
    /// A clean environment, limits and a process group only.
    Limits,
}

impl Isolation {
    /// `bubblewrap` when installed and able to make its sandbox here (it needs user or
    /// root namespaces, which some containers deny; the log says why not), else limits
    /// only.
    pub fn detect() -> Self {
        let Some(bwrap) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("bwrap"))
                .find(|p| p.is_file())
        }) else {
            return Self::Limits;
        };
        let plan = sandbox::Plan {
            readable: Vec::new(),
            writable: Vec::new(),
            network: false,
            keep_capabilities: true,
        };
        let probe = std::process::Command::new(&bwrap)
            .args(sandbox::bwrap_args(&plan))
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match probe {
            Ok(output) if output.status.success() => Self::Bubblewrap(bwrap),
            Ok(output) => {
                tracing::warn!(
                    said = %String::from_utf8_lossy(&output.stderr).trim(),
                    "bubblewrap is installed but cannot make a sandbox here"
                );
                Self::Limits
            }
            Err(e) => {
                tracing::warn!(error = %e, "bubblewrap is installed but does not run");
                Self::Limits
            }
        }
    }

    /// For the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Bubblewrap(path) => format!(
                "bubblewrap ({}): each task sees only its folder, no network, no capabilities, \
                 its own PID namespace{}, limits",
                path.display(),
                if sandbox::running_as_root() {
                    ", its own user id"
                } else {
                    ""
                }
            ),
            Self::Limits => {
                "clean environment, ulimits and a process group (install bubblewrap for \
                 no network and a read-only system)"
                    .to_owned()
            }
        }
    }
}

/// How a script task ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptOutcome {
    /// Its exit code (none when killed by a signal).
    pub exit_code: Option<i32>,
    /// Whether it was killed at its timeout (or by [`Runner::stop`]).
    pub timed_out: bool,
    /// How long it ran.
    pub seconds: f64,
}

/// Why a module could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Preparing its folder failed.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The process could not start.
    #[error("cannot start python: {0}")]
    Spawn(std::io::Error),
    /// The runner was stopped ([`Runner::stop`]): it starts nothing more.
    #[error("the node is stopping")]
    Stopped,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The counts.
    pub result: ModuleResult,
    /// Whether it was killed at its timeout.
    pub timed_out: bool,
    /// The end of its output (stdout and stderr).
    pub output: String,
}

#[derive(Deserialize)]
struct Report {
    kind: String,
    outcome: String,
    #[serde(default)]
    nodeid: String,
    /// Tests collected (a `collected` line).
    #[serde(default)]
    count: Option<u32>,
    /// Tests kept to run (a `collected` line).
    #[serde(default)]
    selected: Option<u32>,
    /// Whether the module may be split (a `collected` line).
    #[serde(default)]
    splittable: Option<bool>,
    /// The tests' durations in short (a `profile` line).
    #[serde(default)]
    cuts: Vec<u32>,
    /// The end of pytest's report of a failure or error.
    #[serde(default)]
    output: String,
}

/// pytest's arguments after the module.
const PYTEST_ARGS: [&str; 5] = ["-q", "-p", "teia_report", "-p", "no:cacheprovider"];

/// The `bash` script that sets a module's limits and runs the rest of its arguments.
fn limits_script(limits: &Limits) -> String {
    format!(
        "ulimit -v {} && ulimit -u {} && ulimit -f {} && exec \"$@\"",
        limits.memory_mib * 1024,
        limits.processes,
        limits.file_mib * 1024
    )
}

/// Gives `command` the environment of a task: nothing of the node's but a minimal `PATH`,
/// `HOME`, the report plugin on `PYTHONPATH`, and no bytecode written.
fn clean_environment(command: &mut tokio::process::Command, support: &Path, home: &Path) {
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("PYTHONPATH", support)
        .env("PYTHONDONTWRITEBYTECODE", "1");
}

/// Copies `from` into `to` (created), recursively; symbolic links are not followed.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Runs test modules on this node: its Python, limits, isolation, warm interpreters and
/// requirements environments.
pub struct Runner {
    python: PathBuf,
    limits: Limits,
    isolation: Isolation,
    support: PathBuf,
    warm: Option<warm::WarmPool>,
    venvs: venv::VenvCache,
    /// Where tasks' work folders go (writable in the sandbox).
    work: PathBuf,
    /// The user ids tasks run as, when the node is root and sandboxes them.
    ids: Option<std::sync::Arc<sandbox::TaskIds>>,
    /// Cancelled by [`Runner::stop`]: running tasks are killed, no new one starts.
    stop: CancellationToken,
}

impl Runner {
    /// Tasks whose sandbox could not be made since the start (they did not run).
    pub fn sandbox_failures(&self) -> u64 {
        self.warm
            .as_ref()
            .map_or(0, warm::WarmPool::sandbox_failures)
    }

    /// A runner keeping its files (plugin, sockets, environments) in `dir`.
    pub fn new(
        dir: &Path,
        python: PathBuf,
        limits: Limits,
        isolation: Isolation,
    ) -> std::io::Result<Self> {
        let support = dir.join("support");
        std::fs::create_dir_all(&support)?;
        std::fs::write(support.join("teia_report.py"), PLUGIN)?;
        let ids = match (&isolation, sandbox::running_as_root()) {
            (Isolation::Bubblewrap(_), true) => Some(std::sync::Arc::default()),
            _ => None,
        };
        let bwrap = match &isolation {
            Isolation::Bubblewrap(bwrap) => Some(bwrap.clone()),
            Isolation::Limits => None,
        };
        let venvs = venv::VenvCache::new(
            dir.join("venvs"),
            support.clone(),
            limits.clone(),
            bwrap.map(|bwrap| (bwrap, ids.clone())),
        );
        let work = dir.join("work");
        let sandbox = match &isolation {
            Isolation::Bubblewrap(bwrap) => Some(warm::Sandbox {
                bwrap: bwrap.clone(),
                readable: [support.as_path(), venvs.dir()]
                    .into_iter()
                    .map(Path::to_path_buf)
                    .chain(python_prefixes(&python))
                    .collect(),
                work: work.clone(),
            }),
            Isolation::Limits => None,
        };
        let stop = CancellationToken::new();
        let warm = Some(warm::WarmPool::new(
            dir.join("warm"),
            support.clone(),
            limits.clone(),
            sandbox,
            stop.clone(),
        ));
        Ok(Self {
            venvs,
            python,
            limits,
            isolation,
            support,
            warm,
            work,
            ids,
            stop,
        })
    }

    /// Stops the runner: the modules and scripts running are killed (with their process
    /// groups, or their sandboxes), the warm interpreters stopped, and every later run
    /// refused with [`RunError::Stopped`].
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(pool) = &self.warm {
            pool.stop().await;
        }
    }

    /// A user id for a task about to run in `folder` (given to it), when the node is root
    /// and sandboxes tasks; none otherwise.
    async fn task_id(&self, folder: &Path) -> Result<Option<sandbox::TaskId>, RunError> {
        let Some(ids) = &self.ids else {
            return Ok(None);
        };
        let id = ids.take().await;
        sandbox::give_tree(folder, id.id).map_err(|source| RunError::Prepare {
            path: folder.to_owned(),
            source,
        })?;
        Ok(Some(id))
    }

    /// The folder tasks' work folders go in: a script task run in a folder under it is
    /// forked from a warm interpreter (under bubblewrap, only it is writable to them).
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// Starts the warm interpreter of the node's Python ahead of the first module.
    pub async fn warm_up(&self) {
        if let Some(pool) = &self.warm {
            pool.warm_up(&self.python).await;
        }
    }

    /// Runs `module` of the project in `project` (copied into `work`, which must not
    /// exist), or only its tests in `selection` (node ids: a rerun) when there are any,
    /// else only the piece `shard` when given (its `TEIA_SHARD`, [`Piece::shard`]: its
    /// collected tests from START up to END, excluded, or to the last, or an equal part);
    /// `node` names this node in the result. The result lists the tests that failed and,
    /// for a selection, those that passed (within [`list_test`]'s bounds).
    pub async fn run_module(
        &self,
        project: &Path,
        module: &str,
        selection: &[String],
        shard: Option<&str>,
        work: &Path,
        node: &str,
    ) -> Result<Outcome, RunError> {
        let prepare = |source| RunError::Prepare {
            path: work.to_owned(),
            source,
        };
        if self.stop.is_cancelled() {
            return Err(RunError::Stopped);
        }
        let started = Instant::now();
        let mut result = ModuleResult {
            node: node.to_owned(),
            ..ModuleResult::default()
        };
        let python = match self.venvs.interpreter(&self.python, project).await {
            Ok(python) => python,
            Err(reason) => {
                result.errors = 1;
                result.seconds = started.elapsed().as_secs_f64();
                return Ok(Outcome {
                    result,
                    timed_out: false,
                    output: reason.to_string(),
                });
            }
        };
        let tree = work.join("project");
        copy_tree(project, &tree).map_err(prepare)?;
        let report = work.join("report.jsonl");
        let home = work.join("home");
        std::fs::create_dir_all(&home).map_err(prepare)?;
        let output_file = work.join("output.txt");
        let id = self.task_id(work).await?;
        // Only the module's own tests (never an option), as the ledger lists them.
        let mut kept = Vec::new();
        for test in selection {
            list_test(&mut kept, module, test);
        }
        let selection = kept;
        let request = warm::Request {
            task: work,
            id: id.as_ref().map(|id| id.id),
            dir: &tree,
            module,
            selection: &selection,
            shard: shard.filter(|_| selection.is_empty()).map(str::to_owned),
            output: &output_file,
            home: &home,
            report: &report,
        };
        let warm = match &self.warm {
            Some(pool) => pool.run(&python, &request).await,
            None => None,
        };
        let cold = match warm {
            Some(_) => None,
            None => Some(self.run_cold(&python, &request).await?),
        };
        result.seconds = started.elapsed().as_secs_f64();
        // What the module left is the task's: read as hostile, off the async threads.
        let folder = work.to_owned();
        let read_warm_output = cold.is_none();
        let (kept, text) = tokio::task::spawn_blocking(move || {
            let kept = if read_warm_output {
                crate::taskfile::read_capped(&folder, Path::new("output.txt"), OUTPUT_KEPT as u64)
                    .unwrap_or_else(|e| e.to_string().into_bytes())
            } else {
                Vec::new()
            };
            let report =
                crate::taskfile::read_capped(&folder, Path::new("report.jsonl"), MAX_REPORT)
                    .unwrap_or_default();
            (kept, report)
        })
        .await
        .unwrap_or_default();
        let (timed_out, output) = match cold {
            Some(cold) => cold,
            None => (
                warm.unwrap_or(false),
                String::from_utf8_lossy(&kept).into_owned(),
            ),
        };
        let text = String::from_utf8_lossy(&text);
        let mut selected = None;
        for line in text.lines() {
            let Ok(report) = serde_json::from_str::<Report>(line) else {
                continue;
            };
            if report.kind == "collected" {
                result.collected = report.count;
                result.splittable = report.splittable;
                selected = report.selected;
                continue;
            }
            if report.kind == "profile" {
                // Of a whole run alone; at most one cut a sixteenth, none past the tests.
                let tests = result.collected.unwrap_or(0);
                let whole = selection.is_empty() && shard.is_none();
                if whole && report.cuts.len() < 16 && report.cuts.iter().all(|c| *c <= tests) {
                    result.profile = report.cuts;
                }
                continue;
            }
            let listed = match (report.kind.as_str(), report.outcome.as_str()) {
                ("call", "passed") => {
                    result.passed += 1;
                    (!selection.is_empty()).then_some(&mut result.passed_tests)
                }
                ("call", "failed") => {
                    result.failed += 1;
                    Some(&mut result.failed_tests)
                }
                (_, "skipped") => {
                    result.skipped += 1;
                    None
                }
                (_, "error") => {
                    result.errors += 1;
                    Some(&mut result.failed_tests)
                }
                _ => None,
            };
            let failed = !matches!(report.outcome.as_str(), "passed" | "skipped");
            if let Some(list) = listed {
                list_test(list, module, &report.nodeid);
            }
            if failed {
                let id = if report.kind == "collect" {
                    module
                } else {
                    &report.nodeid
                };
                list_failure(
                    &mut result.failures,
                    module,
                    &result.failed_tests,
                    id,
                    &report.output,
                );
            }
        }
        let counted = result.passed + result.failed + result.errors + result.skipped;
        let crashed = counted == 0 && selected != Some(0) && !output.contains("no tests ran");
        if crashed && !timed_out {
            tracing::warn!(
                module,
                output = tail(&output, 2048),
                "module ended before reporting any test"
            );
        }
        if timed_out || crashed {
            // Killed at its timeout, or crashed before any report: the test it was in counts
            // as one error.
            result.errors += 1;
            let why = if timed_out {
                format!(
                    "killed at its timeout of {} s; its output ended with:\n{}",
                    self.limits.timeout.as_secs(),
                    tail(&output, MAX_FAILURE_OUTPUT_BYTES / 2)
                )
            } else {
                format!(
                    "ended before reporting any test; its output ended with:\n{}",
                    tail(&output, MAX_FAILURE_OUTPUT_BYTES / 2)
                )
            };
            list_failure(&mut result.failures, module, &[], module, &why);
        }
        Ok(Outcome {
            result,
            timed_out,
            output,
        })
    }

    /// Runs a script task (seed 001): `python main.py ARGS...` in `dir` (the task's files,
    /// in a work folder of its own), with the modules' environment, limits and isolation;
    /// its stdout and stderr go to `stdout.txt` and `stderr.txt` in `dir`. Forked from the
    /// warm interpreter when `dir` is under [`Runner::work_dir`], else started cold. Killed
    /// with its process group at the timeout.
    pub async fn run_script(&self, dir: &Path, args: &[&str]) -> Result<ScriptOutcome, RunError> {
        if self.stop.is_cancelled() {
            return Err(RunError::Stopped);
        }
        let prepare = |source| RunError::Prepare {
            path: dir.to_owned(),
            source,
        };
        let (stdout_file, stderr_file) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
        let stdout = std::fs::File::create(&stdout_file).map_err(prepare)?;
        let stderr = std::fs::File::create(&stderr_file).map_err(prepare)?;
        let home = dir.join(".home");
        std::fs::create_dir_all(&home).map_err(prepare)?;
        let id = self.task_id(dir).await?;
        let id = id.as_ref().map(|id| id.id);
        let started = Instant::now();
        if let (Some(pool), true) = (&self.warm, dir.starts_with(&self.work)) {
            let main: Vec<&str> = std::iter::once("main.py")
                .chain(args.iter().copied())
                .collect();
            let request = warm::ScriptRequest {
                id,
                dir,
                args: &main,
                stdout: &stdout_file,
                stderr: &stderr_file,
                home: &home,
            };
            if let Some(end) = pool.run_script(&self.python, &request).await {
                return Ok(ScriptOutcome {
                    exit_code: end.exit_code,
                    timed_out: end.timed_out,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
        }
        let mut command = self.task_command(dir, &[], dir, id);
        command
            .arg(&self.python)
            .arg("main.py")
            .args(args)
            .current_dir(dir);
        clean_environment(&mut command, &self.support, &home);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(RunError::Spawn)?;
        let pid = child.id();
        let waited = tokio::select! {
            waited = tokio::time::timeout(self.limits.timeout, child.wait()) => waited.ok(),
            () = self.stop.cancelled() => None,
        };
        if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let (timed_out, status) = match waited {
            Some(status) => (false, status.ok()),
            None => (true, child.wait().await.ok()),
        };
        Ok(ScriptOutcome {
            exit_code: status.and_then(|s| s.code()),
            timed_out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// A command that runs its arguments with the tasks' limits, in `chdir`: under
    /// bubblewrap ([`sandbox`]), with the system and `readable` read-only, a fresh `/tmp`,
    /// only `writable` writable, no network, as task id `id` when the node is root.
    fn task_command(
        &self,
        writable: &Path,
        readable: &[&Path],
        chdir: &Path,
        id: Option<u32>,
    ) -> tokio::process::Command {
        let script = limits_script(&self.limits);
        match &self.isolation {
            Isolation::Bubblewrap(bwrap) => {
                let mut command = tokio::process::Command::new(bwrap);
                // The interpreter's own prefix too (a virtual environment may be in /tmp).
                let prefixes = python_prefixes(&self.python);
                let plan = sandbox::Plan {
                    readable: readable
                        .iter()
                        .copied()
                        .chain(prefixes.iter().map(PathBuf::as_path))
                        .collect(),
                    writable: vec![writable],
                    network: false,
                    keep_capabilities: false,
                };
                command
                    .args(sandbox::bwrap_args(&plan))
                    .arg("--chdir")
                    .arg(chdir)
                    .args(sandbox::become_task(id))
                    .args(["bash", "-c", &script, "bash"]);
                command
            }
            Isolation::Limits => {
                let mut command = tokio::process::Command::new("bash");
                command.args(["-c", &script, "bash"]);
                command
            }
        }
    }

    /// Starts `python -m pytest` for `request` as a process of its own (under bubblewrap
    /// when it is here); whether it timed out, and its output.
    async fn run_cold(
        &self,
        python: &Path,
        request: &warm::Request<'_>,
    ) -> Result<(bool, String), RunError> {
        // What the module needs of the node's folder (which may be in /tmp): the report
        // plugin and its environment, read-only.
        let mut readable = vec![self.support.as_path()];
        if python.starts_with(self.venvs.dir()) {
            readable.extend(python.parent().and_then(Path::parent));
        }
        let mut command = self.task_command(request.task, &readable, request.dir, request.id);
        command
            .arg(python)
            .args(["-m", "pytest"])
            .args(request.targets())
            .args(PYTEST_ARGS)
            .current_dir(request.dir);
        clean_environment(&mut command, &self.support, request.home);
        if let Some(shard) = &request.shard {
            command.env("TEIA_SHARD", shard);
        }
        command
            .env("TEIA_REPORT", request.report)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(RunError::Spawn)?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect = async move {
            use tokio::io::AsyncReadExt;
            let mut output = Vec::new();
            let mut buffer = vec![0u8; 8192];
            for pipe in [
                stdout.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                stderr.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let mut pipe = pipe;
                while let Ok(n) = pipe.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    let room = OUTPUT_KEPT.saturating_sub(output.len());
                    output.extend_from_slice(buffer.get(..n.min(room)).unwrap_or_default());
                }
            }
            output
        };
        let output_task = tokio::spawn(collect);
        let timed_out = tokio::select! {
            waited = tokio::time::timeout(self.limits.timeout, child.wait()) => waited.is_err(),
            () = self.stop.cancelled() => true,
        };
        if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            // The whole group: pytest and whatever the tests started.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.wait().await;
        let output = match tokio::time::timeout(Duration::from_secs(2), output_task).await {
            Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        Ok((timed_out, output))
    }
}

/// `python` as an absolute path, found on this process's `PATH` when it is a bare name
/// (tasks run with a minimal `PATH`).
pub fn resolve_python(python: &Path) -> PathBuf {
    if python.components().count() > 1 {
        return python.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(python))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| python.to_owned())
}

/// The prefixes of the interpreter at `python` (`P` for `P/bin/python`): what a sandbox
/// must show of it: its own (a virtual environment's `pyvenv.cfg` included) and, when it
/// is a link (a virtual environment's interpreter), that of the interpreter it links to.
fn python_prefixes(python: &Path) -> Vec<PathBuf> {
    let prefix = |path: &Path| path.parent().and_then(Path::parent).map(Path::to_path_buf);
    let mut prefixes: Vec<PathBuf> = prefix(python).into_iter().collect();
    if let Some(base) = std::fs::canonicalize(python)
        .ok()
        .as_deref()
        .and_then(prefix)
    {
        if !prefixes.contains(&base) {
            prefixes.push(base);
        }
    }
    prefixes
}

/// A Python found on this machine.
#[derive(Debug, Clone)]
pub struct FoundPython {
    /// The interpreter's own path (`sys.executable`: a wrapper such as a pyenv shim costs
    /// every task a second start).
    pub executable: PathBuf,
    /// Its version.
    pub version: String,
    /// pytest's version, when it is installed (test modules need it; script tasks do not).
    pub pytest: Option<String>,
}

/// Why a Python cannot serve the job engine.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    /// It could not be started.
    #[error("{} cannot run ({source}); install Python 3 or give --python PATH", python.display())]
    CannotRun {
        /// The interpreter given.
        python: PathBuf,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// It ran, but not as Python 3.
    #[error("{} does not run Python 3: {said}", python.display())]
    NotPython3 {
        /// The interpreter given.
        python: PathBuf,
        /// What it said on stderr, or how it ended when it said nothing.
        said: String,
    },
    /// It runs, without pytest.
    #[error("{} has no pytest; install it (pip install pytest, or apt-get install python3-pytest)", python.display())]
    NoPytest {
        /// The interpreter given.
        python: PathBuf,
    },
}

/// Checks that `python` runs, and whether it has pytest; says what is wrong otherwise.
pub async fn find_python(python: &Path) -> Result<FoundPython, PythonError> {
    let probe = "import sys\nprint(sys.executable)\nprint(sys.version.split()[0])\ntry:\n    import pytest\n    print(pytest.__version__)\nexcept Exception:\n    print('')";
    let output = tokio::process::Command::new(python)
        .args(["-c", probe])
        .output()
        .await
        .map_err(|source| PythonError::CannotRun {
            python: python.to_owned(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(PythonError::NotPython3 {
            python: python.to_owned(),
            said: if stderr.is_empty() {
                format!("it ended ({}) and said nothing", output.status)
            } else {
                stderr
            },
        });
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut lines = text.lines();
    let executable = lines
        .next()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_file())
        .unwrap_or_else(|| python.to_owned());
    let version = lines.next().unwrap_or_default().trim().to_owned();
    let pytest = lines
        .next()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    Ok(FoundPython {
        executable,
        version,
        pytest,
    })
}

/// Checks that `python` runs and has pytest; says what is missing otherwise. Returns the
/// interpreter's own path and its and pytest's versions.
pub async fn check_python(python: &Path) -> Result<(PathBuf, String), PythonError> {
    let found = find_python(python).await?;
    match found.pytest {
        Some(pytest) => Ok((found.executable, format!("{} {pytest}", found.version))),
        None => Err(PythonError::NoPytest {
            python: python.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn python() -> PathBuf {
        resolve_python(Path::new("python3"))
    }

    async fn interpreter() -> PathBuf {
        let found = check_python(&python()).await;
        assert!(
            found.is_ok(),
            "these tests run pytest: install it (.ci/run does)"
        );
        found.map(|(p, _)| p).unwrap_or_else(|_| python())
    }

    fn project(dir: &Path, module: &str, source: &str) {
        std::fs::create_dir_all(dir.join("tests")).unwrap();
        std::fs::write(dir.join("tests").join(module), source).unwrap();
    }

    const MIX: &str = "import pytest\n\ndef test_ok():\n    assert True\n\ndef test_no():\n    assert False\n\n@pytest.mark.skip\ndef test_skip():\n    pass\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError\n\ndef test_error(broken):\n    pass\n";

    /// Python that starts a child holding a lock on `outlives.lock` in its folder, waits
    /// until it holds it, then hangs: the lock is free again only once the child is gone.
    const HOLDER: &str = "import os, subprocess, sys, time\nHOLD = 'import fcntl, time\\nf = open(\"outlives.lock\", \"w\")\\nfcntl.flock(f, fcntl.LOCK_EX)\\nopen(\"outlives.ready\", \"w\").close()\\ntime.sleep(300)\\n'\n\ndef start_holder():\n    open('outlives.lock', 'w').close()\n    subprocess.Popen([sys.executable, '-c', HOLD])\n    while not os.path.exists('outlives.ready'):\n        time.sleep(0.01)\n";

    /// A module whose second test starts a [`HOLDER`] child and hangs.
    fn hang_module() -> String {
        format!("{HOLDER}\ndef test_first():\n    assert True\n\ndef test_hangs():\n    start_holder()\n    time.sleep(60)\n")
    }

    /// Both ways of starting a module (forked from a warm interpreter, and cold) count
    /// each outcome, keep the results of a module killed at its timeout, and kill what it
    /// started.
    #[tokio::test]
    async fn counts_each_outcome_and_keeps_results_of_a_module_killed_at_its_timeout() {
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p");
        project(&src, "test_mix.py", MIX);
        project(&src, "test_hang.py", &hang_module());
        let (warm, cold) = warm_and_cold(&dir.path().join("runner"), python, Isolation::Limits);
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            let work = dir.path().join(format!("{name}-mix"));
            let mix = runner
                .run_module(&src, "tests/test_mix.py", &[], None, &work, "n")
                .await
                .unwrap();
            let r = mix.result;
            assert_eq!(
                (r.passed, r.failed, r.skipped, r.errors),
                (1, 1, 1, 1),
                "{name}: {}",
                mix.output
            );
            assert!(mix.output.contains("1 failed"), "{name}: {}", mix.output);
            assert_killed_at_timeout(runner, &src, &dir.path().join(format!("{name}-hang"))).await;
        }
        let warm_running = warm_count(&warm).await;
        assert_eq!(warm_running, 1, "the warm runner forked its modules");
    }

    /// A run lists the tests that failed or errored by node id (parametrised ones
    /// included), each with the end of pytest's report of it, and a module that cannot be
    /// collected says why; a run of selected tests, forked warm or started cold, runs those alone
    /// and lists those that passed too; what is not a test of the module is not run.
    #[tokio::test]
    async fn failed_tests_are_listed_and_a_selection_runs_only_them() {
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p");
        project(
            &src,
            "test_sel.py",
            "import pytest\n\n@pytest.mark.parametrize('n', [1, 2, 3])\ndef test_p(n):\n    assert n != 2\n\ndef test_ok():\n    pass\n\ndef test_no():\n    assert False\n",
        );
        project(&src, "test_broken.py", "def test_x(:\n    pass\n");
        let module = "tests/test_sel.py";
        let (warm, cold) = warm_and_cold(&dir.path().join("runner"), python, Isolation::Limits);
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            let all = runner
                .run_module(
                    &src,
                    module,
                    &[],
                    None,
                    &dir.path().join(format!("{name}-all")),
                    "n",
                )
                .await
                .unwrap();
            let r = &all.result;
            assert_eq!((r.passed, r.failed), (3, 2), "{name}: {}", all.output);
            assert_eq!(
                r.failed_tests,
                [format!("{module}::test_p[2]"), format!("{module}::test_no")],
                "{name}"
            );
            assert!(
                r.passed_tests.is_empty(),
                "{name}: passed listed only for a selection"
            );
            let why: Vec<(&str, &str)> = r
                .failures
                .iter()
                .map(|f| (f.test.as_str(), f.output.as_str()))
                .collect();
            assert!(
                matches!(why[..], [(p, p_why), (no, no_why)]
                    if p == r.failed_tests[0] && p_why.contains("assert 2 != 2")
                        && no == r.failed_tests[1] && no_why.contains("assert False")),
                "{name}: {why:?}"
            );
            let broken = runner
                .run_module(
                    &src,
                    "tests/test_broken.py",
                    &[],
                    None,
                    &dir.path().join(format!("{name}-broken")),
                    "n",
                )
                .await
                .unwrap();
            let why = &broken.result.failures;
            assert!(
                broken.result.errors == 1
                    && why.len() == 1
                    && why[0].test == "tests/test_broken.py"
                    && why[0].output.contains("SyntaxError"),
                "{name}: {why:?} {}",
                broken.output
            );
            let selection = [
                format!("{module}::test_p[2]"),
                format!("{module}::test_ok"),
                "--collect-only".to_owned(),
            ];
            let some = runner
                .run_module(
                    &src,
                    module,
                    &selection,
                    None,
                    &dir.path().join(format!("{name}-some")),
                    "n",
                )
                .await
                .unwrap();
            let r = &some.result;
            assert_eq!(
                (r.passed, r.failed, r.errors),
                (1, 1, 0),
                "{name}: {}",
                some.output
            );
            assert_eq!(r.failed_tests, [format!("{module}::test_p[2]")], "{name}");
            assert_eq!(r.passed_tests, [format!("{module}::test_ok")], "{name}");
        }
    }

    /// The pieces of a split module, forked warm or started cold, run disjoint runs of its
    /// tests that add up to the whole (parametrised ones included), each saying what the
    /// module holds; a module with a module- or class-scoped fixture or the `teia_no_split`
    /// mark says it may not be split; a collection error counts once, in piece 1; a piece
    /// left no test is not a crash.
    #[tokio::test]
    async fn pieces_of_a_split_module_add_up_to_the_whole() {
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p");
        project(
            &src,
            "test_many.py",
            "import pytest\n\n@pytest.mark.parametrize('n', range(4))\ndef test_p(n):\n    assert n != 3\n\nclass TestC:\n    def test_a(self):\n        pass\n    def test_b(self):\n        pytest.skip('no')\n",
        );
        project(
            &src,
            "test_fixture.py",
            "import pytest\n\n@pytest.fixture(scope='module')\ndef shared():\n    return []\n\ndef test_a(shared):\n    shared.append(1)\n\ndef test_b(shared):\n    assert shared == [1]\n",
        );
        project(
            &src,
            "test_marked.py",
            "import pytest\n\npytestmark = pytest.mark.teia_no_split\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n",
        );
        project(&src, "test_broken.py", "import nothing_here\n");
        let (warm, cold) = warm_and_cold(&dir.path().join("runner"), python, Isolation::Limits);
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            let run = |module: &'static str, shard: Option<&'static str>, tag: String| {
                let work = dir.path().join(format!("{name}-{tag}"));
                let src = src.clone();
                async move {
                    runner
                        .run_module(&src, module, &[], shard, &work, "n")
                        .await
                        .unwrap()
                        .result
                }
            };
            let mut sum = (0, 0, 0, 0);
            let mut equal_parts = (0, 0, 0, 0);
            for (index, shard) in ["0:2", "2:4", "4:", "1/4", "2/4", "3/4", "4/4"]
                .into_iter()
                .enumerate()
            {
                let piece = run("tests/test_many.py", Some(shard), format!("m{index}")).await;
                assert!(piece.profile.is_empty(), "{name}: a piece says no profile");
                assert_eq!(piece.collected, Some(6), "{name}");
                assert_eq!(piece.splittable, Some(true), "{name}");
                let total = if shard.contains('/') {
                    &mut equal_parts
                } else {
                    &mut sum
                };
                total.0 += piece.passed;
                total.1 += piece.failed;
                total.2 += piece.errors;
                total.3 += piece.skipped;
            }
            assert_eq!(equal_parts, sum, "{name}: equal parts add up to ranges");
            let whole = run("tests/test_many.py", None, "whole".into()).await;
            // The profile of a whole run: 15 cuts, in order, within its 6 tests.
            assert_eq!(whole.profile.len(), 15, "{name}: {:?}", whole.profile);
            assert!(whole.profile.windows(2).all(|w| w[0] <= w[1]) && whole.profile[14] <= 6);
            assert_eq!(
                sum,
                (whole.passed, whole.failed, whole.errors, whole.skipped),
                "{name}"
            );
            assert_eq!(sum, (4, 1, 0, 1), "{name}");
            let fixture = run("tests/test_fixture.py", None, "fixture".into()).await;
            assert_eq!(fixture.splittable, Some(false), "{name}");
            let marked = run("tests/test_marked.py", None, "marked".into()).await;
            assert_eq!(marked.splittable, Some(false), "{name}");
            let mut errors = 0;
            for (index, shard) in ["0:1", "1:", "1/2", "2/2"].into_iter().enumerate() {
                let piece = run("tests/test_broken.py", Some(shard), format!("b{index}")).await;
                errors += piece.errors;
            }
            assert_eq!(errors, 2, "{name}: a collection error counts once a split");
            let empty = run("tests/test_marked.py", Some("2:"), "empty".into()).await;
            assert_eq!(
                (empty.passed, empty.errors),
                (0, 0),
                "{name}: a piece left no test"
            );
        }
    }

    /// Under bubblewrap (when it works here), a module, forked warm or started cold, has no
    /// network, cannot write to the system (not even by remounting it, as root), has no
    /// capabilities and no inherited socket, sees neither the node's folder nor another
    /// task's, nor processes other than its own, stops at the process limit when the node is
    /// root, and leaves no process behind (one that left its session included).
    #[tokio::test]
    async fn under_bubblewrap_a_module_has_no_network_and_sees_only_its_folder() {
        let isolation = Isolation::detect();
        if isolation == Isolation::Limits {
            // No usable bubblewrap here (.ci/run installs it): `detect` said why in the log.
            return;
        }
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let secret = dir.path().join("runner").join("secret.txt");
        let runner_dir = dir.path().join("runner");
        let other = runner_dir
            .join("work")
            .join("other-task")
            .join("theirs.txt");
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::fs::write(&other, "another submitter's").unwrap();
        let src = dir.path().join("p");
        let (warm, cold) = warm_and_cold(&runner_dir, python, isolation);
        std::fs::write(&secret, "the node's").unwrap();
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            let work = runner_dir.join("work").join(name);
            let source = format!(
                "PORT = {port}\nSECRET = {secret:?}\nOTHER = {other:?}\nTASK = {task:?}\nLIMITED = {limited}\n{body}",
                secret = secret.to_string_lossy(),
                other = other.to_string_lossy(),
                task = work.to_string_lossy(),
                limited = if sandbox::running_as_root() { "True" } else { "False" },
                body = include_str!("sandbox_test_module.py"),
            );
            project(&src, "test_sandbox.py", &source);
            let outcome = runner
                .run_module(&src, "tests/test_sandbox.py", &[], None, &work, "n")
                .await
                .unwrap();
            let r = outcome.result;
            assert_eq!(
                (r.passed, r.failed, r.errors),
                (11, 0, 0),
                "{name}: {}",
                outcome.output
            );
            // The child that left its session held a lock: it is free once it is gone.
            lock_freed(&work.join("project").join("held.lock"), name).await;
        }
        project(&src, "test_hang.py", &hang_module());
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            let work = runner_dir.join("work").join(format!("{name}-hang"));
            assert_killed_at_timeout(runner, &src, &work).await;
        }
        let warm_running = warm_count(&warm).await;
        assert_eq!(
            warm_running, 1,
            "the sandboxed warm interpreter forked its module"
        );
    }

    /// A script task forked from the warm interpreter behaves as one started cold (in the
    /// sandbox when bubblewrap works here): its arguments, its own module named like one
    /// pytest imports, stdout and stderr, the files it writes, `atexit`, exit codes
    /// (`sys.exit(3)`, an exception: 1), and a kill at its timeout with what it started.
    #[tokio::test]
    async fn scripts_forked_warm_behave_as_scripts_started_cold() {
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let (warm, cold) = warm_and_cold(&dir.path().join("runner"), python, Isolation::detect());
        let main = format!("{HOLDER}import atexit\nimport pluggy\nprint('args', sys.argv)\nprint('mine', pluggy.MINE)\nprint('to stderr', file=sys.stderr)\nopen('out.txt', 'w').write('made')\natexit.register(lambda: print('bye'))\nif sys.argv[1] == 'raise':\n    raise ValueError('no')\nif sys.argv[1] == 'hang':\n    start_holder()\n    time.sleep(60)\nsys.exit(3)\n");
        for (name, runner) in [("warm", &warm), ("cold", &cold)] {
            for (arg, code) in [("exit", Some(3)), ("raise", Some(1)), ("hang", None)] {
                let folder = runner.work_dir().join(format!("{name}-{arg}"));
                std::fs::create_dir_all(&folder).unwrap();
                std::fs::write(folder.join("main.py"), &main).unwrap();
                std::fs::write(folder.join("pluggy.py"), "MINE = 1\n").unwrap();
                let outcome = runner.run_script(&folder, &[arg]).await.unwrap();
                let stdout = std::fs::read_to_string(folder.join("stdout.txt")).unwrap();
                let stderr = std::fs::read_to_string(folder.join("stderr.txt")).unwrap();
                let what = format!("{name} {arg}: {stdout} {stderr}");
                assert_eq!(outcome.exit_code, code, "{what}");
                assert_eq!(outcome.timed_out, arg == "hang", "{what}");
                assert!(stderr.starts_with("to stderr\n"), "{what}");
                assert_eq!(
                    std::fs::read_to_string(folder.join("out.txt")).unwrap(),
                    "made"
                );
                // Killed, a script leaves what it buffered unwritten, as Python does.
                if arg != "hang" {
                    let expected = format!("args ['main.py', '{arg}']\nmine 1\n");
                    assert!(stdout.starts_with(&expected), "{what}");
                    assert!(stdout.ends_with("bye\n"), "{what}");
                }
                if arg == "raise" {
                    assert!(stderr.contains("ValueError: no"), "{what}");
                }
                if arg == "hang" {
                    lock_freed(&folder.join("outlives.lock"), &what).await;
                }
            }
        }
        assert_eq!(
            warm_count(&warm).await,
            1,
            "the warm runner forked its scripts"
        );
    }

    /// Runs `src`'s `tests/test_hang.py` in `work`: killed at the timeout, the test it
    /// finished kept, the one it was in counted as an error, and the child it started gone.
    async fn assert_killed_at_timeout(runner: &Runner, src: &Path, work: &Path) {
        let hang = runner
            .run_module(src, "tests/test_hang.py", &[], None, work, "n")
            .await
            .unwrap();
        assert!(hang.timed_out, "{}", hang.output);
        assert_eq!(
            (hang.result.passed, hang.result.errors),
            (1, 1),
            "{}",
            hang.output
        );
        let why = &hang.result.failures;
        assert!(
            why.len() == 1
                && why[0].test == "tests/test_hang.py"
                && why[0].output.starts_with("killed at its timeout of 4 s"),
            "{why:?}"
        );
        lock_freed(&work.join("project").join("outlives.lock"), &hang.output).await;
    }

    /// Two runners on `dir` with a 4 s timeout: one that forks from warm interpreters, one
    /// that starts every module and script cold.
    fn warm_and_cold(dir: &Path, python: PathBuf, isolation: Isolation) -> (Runner, Runner) {
        let limits = Limits {
            timeout: Duration::from_secs(4),
            ..Limits::default()
        };
        let warm = Runner::new(dir, python.clone(), limits.clone(), isolation.clone()).unwrap();
        let mut cold = Runner::new(dir, python, limits, isolation).unwrap();
        cold.warm = None;
        (warm, cold)
    }

    /// Warm interpreters `runner` has running.
    async fn warm_count(runner: &Runner) -> usize {
        match &runner.warm {
            Some(pool) => pool.count().await,
            None => 0,
        }
    }

    /// Waits until the lock on `path` a task's child held is free, that is until that child
    /// is gone; fails after 30 s.
    async fn lock_freed(path: &Path, what: &str) {
        let held = std::fs::File::open(path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "{what}: a process of the task outlived it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes a minimal wheel of a package `teia_minidep` (VALUE = 42) to `path`.
    fn wheel(path: &Path) {
        use std::io::Write;
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default();
        let info = "teia_minidep-1.0.dist-info";
        for (name, body) in [
            ("teia_minidep/__init__.py".to_owned(), "VALUE = 42\n".to_owned()),
            (
                format!("{info}/METADATA"),
                "Metadata-Version: 2.1\nName: teia_minidep\nVersion: 1.0\n".to_owned(),
            ),
            (
                format!("{info}/WHEEL"),
                "Wheel-Version: 1.0\nGenerator: teia-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
                    .to_owned(),
            ),
            (
                format!("{info}/RECORD"),
                format!("teia_minidep/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n"),
            ),
        ] {
            zip.start_file(name, options).unwrap();
            zip.write_all(body.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }

    /// `pip install` runs a project's own code (here an in-tree build backend): in the
    /// sandbox, it reads nothing of the node (its files, other processes' command lines),
    /// writes nowhere but the environment it builds, and (with slirp4netns, which `.ci/run`
    /// installs) reaches no service on this machine's loopback.
    #[tokio::test]
    async fn requirements_are_built_in_the_sandbox() {
        let isolation = Isolation::detect();
        if isolation == Isolation::Limits {
            return;
        }
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let runner_dir = dir.path().join("runner");
        let runner = Runner::new(&runner_dir, python, Limits::default(), isolation).unwrap();
        let secret = runner_dir.join("secret.txt");
        std::fs::write(&secret, "the node's secret").unwrap();
        let outside = runner_dir.join("escaped.txt");
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let marker = format!("teia-marker-{}", std::process::id());
        let mut witness = std::process::Command::new("python3")
            .args(["-c", "import time; time.sleep(120)", &marker])
            .spawn()
            .unwrap();
        let src = dir.path().join("evil");
        project(&src, "test_one.py", "def test_one():\n    pass\n");
        std::fs::write(src.join("requirements.txt"), "./backend_pkg\n").unwrap();
        let backend = src.join("backend_pkg");
        std::fs::create_dir_all(&backend).unwrap();
        std::fs::write(
            backend.join("pyproject.toml"),
            "[build-system]\nrequires = []\nbuild-backend = \"evil_backend\"\nbackend-path = [\".\"]\n",
        )
        .unwrap();
        std::fs::write(
            backend.join("evil_backend.py"),
            format!(
                "SECRET = {:?}\nOUTSIDE = {:?}\nPORT = {}\n{}",
                secret.to_string_lossy(),
                outside.to_string_lossy(),
                service.local_addr().unwrap().port(),
                include_str!("build_backend_test.py")
            ),
        )
        .unwrap();
        let outcome = runner
            .run_module(
                &src,
                "tests/test_one.py",
                &[],
                None,
                &dir.path().join("w"),
                "n",
            )
            .await
            .unwrap();
        let _ = witness.kill();
        let _ = witness.wait();
        assert_eq!(outcome.result.errors, 1, "{}", outcome.output);
        let seen = std::fs::read_to_string(runner_dir.join("venvs").join("home").join("seen.txt"))
            .unwrap_or_else(|e| panic!("the backend did not run ({e}): {}", outcome.output));
        assert!(!seen.contains("the node's secret"), "{seen}");
        assert!(!seen.contains(&marker), "{seen}");
        assert!(!outside.exists(), "the build wrote outside its environment");
        if venv::find_program("slirp4netns").is_some() {
            assert!(seen.contains("loopback: "), "{seen}");
            assert!(!seen.contains("loopback: reached"), "{seen}");
        }
    }

    /// A project's requirements are installed once into an environment that its modules
    /// (and another project with the same file) then use; a requirement that cannot be
    /// installed fails the module with pip's reason.
    #[tokio::test]
    async fn requirements_are_installed_once_in_a_cached_environment() {
        let python = interpreter().await;
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::new(
            &dir.path().join("runner"),
            python,
            Limits::default(),
            Isolation::Limits,
        )
        .unwrap();
        let uses =
            "import teia_minidep\n\ndef test_value():\n    assert teia_minidep.VALUE == 42\n";
        for name in ["a", "b"] {
            let src = dir.path().join(name);
            project(&src, "test_one.py", uses);
            project(&src, "test_two.py", uses);
            std::fs::create_dir_all(src.join("wheels")).unwrap();
            wheel(&src.join("wheels").join("teia_minidep-1.0-py3-none-any.whl"));
            std::fs::write(
                src.join("requirements.txt"),
                "# the test's own package\n./wheels/teia_minidep-1.0-py3-none-any.whl\n",
            )
            .unwrap();
            for module in ["tests/test_one.py", "tests/test_two.py"] {
                let work = dir.path().join(format!("w-{name}-{}", module.len()));
                let _ = std::fs::remove_dir_all(&work);
                let outcome = runner
                    .run_module(&src, module, &[], None, &work, "n")
                    .await
                    .unwrap();
                assert_eq!(
                    (outcome.result.passed, outcome.result.errors),
                    (1, 0),
                    "{}",
                    outcome.output
                );
            }
        }
        let environments = std::fs::read_dir(dir.path().join("runner").join("venvs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "home")
            .count();
        assert_eq!(environments, 1, "one environment for one requirements file");
        let warm_running = warm_count(&runner).await;
        assert_eq!(
            warm_running, 1,
            "modules forked from the environment's interpreter"
        );

        let broken = dir.path().join("broken");
        project(&broken, "test_one.py", uses);
        std::fs::write(broken.join("requirements.txt"), "./wheels/absent.whl\n").unwrap();
        let outcome = runner
            .run_module(
                &broken,
                "tests/test_one.py",
                &[],
                None,
                &dir.path().join("w-broken"),
                "n",
            )
            .await
            .unwrap();
        assert_eq!(outcome.result.errors, 1);
        assert!(
            outcome
                .output
                .contains("pip install -r requirements.txt failed"),
            "{}",
            outcome.output
        );
    }
}
