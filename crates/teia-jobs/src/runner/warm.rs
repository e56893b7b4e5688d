//! Warm interpreters: one Python per interpreter that has imported pytest and its plugins
//! once, under the same clean environment and limits as a module (and, with bubblewrap,
//! in one sandbox: no network, the system read-only, only the folder of the modules' work
//! folders writable), and forks a child per module or script task (which then runs in its
//! own session, work folder and environment). A module so starts in about 0.1 s instead of
//! 0.25 s (0.6 s in a sandbox of its own), and a script in a few milliseconds instead of
//! the 40 ms of a new Python.
//!
//! The node talks to each one over a Unix socket in a folder only its user can enter: a
//! request is one JSON line; the child answers its pid on a line and keeps the connection
//! open until it exits, so the end of the connection is the end of the module.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{clean_environment, limits_script, Limits, PYTEST_ARGS};

/// Warm interpreters kept at once (one per Python: the base one and each requirements
/// environment); starting one more stops the oldest.
pub const MAX_WARM: usize = 4;

/// Time a warm interpreter has to start and import pytest; past it, modules start cold.
const START_TIME: Duration = Duration::from_secs(30);

/// Time a forked module has to say its pid.
const FORK_TIME: Duration = Duration::from_secs(10);

/// Interpreters that failed to start, remembered so that modules start cold at once.
const MAX_BROKEN: usize = 16;

/// Bytes of what a forked child says last that are kept (its end: why its isolation
/// failed, and its exit code).
const SAID_KEPT: usize = 512;

/// Bytes of a socket's path at most (a Unix socket's address holds 108); a longer one
/// leaves modules to start cold.
const MAX_SOCKET_PATH: usize = 100;

/// Why a warm interpreter could not be started (modules then start cold).
#[derive(Debug, thiserror::Error)]
enum WarmError {
    /// Its folder could not be made, or it could not be started.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Its socket's path is over [`MAX_SOCKET_PATH`] bytes.
    #[error("{} is too long a path for a socket", .0.display())]
    SocketPathTooLong(PathBuf),
    /// It was started without its pipes.
    #[error("no pipe to or from it")]
    NoPipe,
    /// It did not say it was ready within [`START_TIME`].
    #[error("it did not start (does the Python run?)")]
    NotReady,
}

/// The warm interpreter's program: preload, then accept, fork, run.
const ZYGOTE: &str = r#"
import json, os, selectors, signal, socket, sys, traceback
# Per-task isolation, {"hidden": [...], "keep": [...]} from the node (argv[2]); none without
# a sandbox.
ISOLATION = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
# Script tasks need no pytest: without it, this interpreter forks them only.
try:
    import pytest
except ImportError:
    pytest = None
# Plugins' dependencies stay imported; the plugins themselves are imported again by each
# run, so that pytest can rewrite their asserts (and does not warn that it cannot).
try:
    from importlib.metadata import entry_points
    plugins = set()
    for plugin in entry_points(group="pytest11"):
        try:
            plugin.load()
            plugins.add(plugin.module.split(".")[0])
        except Exception:
            pass
    for name in list(sys.modules):
        if name.split(".")[0] in plugins:
            del sys.modules[name]
except Exception:
    pass

server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    os.unlink(sys.argv[1])
except FileNotFoundError:
    pass
server.bind(sys.argv[1])
server.listen(64)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
events = selectors.DefaultSelector()
events.register(server, selectors.EVENT_READ, "accept")
events.register(0, selectors.EVENT_READ, "node")
ZYGOTE = os.getpid()
# Each forked child C leads a process group of its own (setsid): the zygote kills those
# left when the node is gone. The ended ones are pruned once 256 are listed.
children = set()
print("ready", flush=True)

def alive_child(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[1]) == ZYGOTE and int(fields[2]) == pid
    except (OSError, ValueError, IndexError):
        return False

def end():
    for pid in children:
        if alive_child(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    sys.exit(0)

def detach(conn, request):
    # The forked child C: its own session, no listening, no stdin; then, isolated, the pid
    # of the task's PID 1 said. Returns in the task only: C stays behind, waits for it and
    # says how it ended ("exit N"), so that the task cannot say it.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # C dies with the zygote, which dies with the node; a zygote gone already is seen here.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ZYGOTE:
        os._exit(1)
    os.setsid()
    events.close()
    server.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if ISOLATION is None:
        conn.sendall(b"%d\n" % os.getpid())
        return
    isolate(request["task"], ISOLATION["hidden"], request.get("uid"), request.get("uid"),
            keep=ISOLATION["keep"], close_fds=[conn.fileno()],
            on_pid=lambda pid: conn.sendall(b"%d\n" % pid), on_exit=said_exit(conn))
    conn.detach()  # its descriptor is closed here: forget it (its number will be reused)

def said_exit(conn):
    def on_exit(status, message):
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
        if message:
            conn.sendall(b"isolation failed: " + message.encode("utf-8", "replace")[:400].replace(b"\n", b" ") + b"\n")
        conn.sendall(b"exit %d\n" % code)
    return on_exit

import atexit, runpy

def run_script(conn, request):
    # As `python main.py ARGS` would: the script as __main__, its folder first on the path,
    # and its own modules its own (those imported here under the same names forgotten).
    code = 1
    try:
        detach(conn, request)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(request["dir"])
        os.environ.update(request["env"])
        own = set()
        for entry in os.listdir(request["dir"]):
            stem, ext = os.path.splitext(entry)
            if ext in (".py", ".pyc", ".so", ".pyd") or os.path.isdir(os.path.join(request["dir"], entry)):
                own.add(stem.split(".")[0])
        for name in list(sys.modules):
            if name.split(".")[0] in own:
                del sys.modules[name]
        sys.path[0] = request["dir"]
        sys.argv = list(request["args"])
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None:
                code = 0
            elif isinstance(stop.code, int):
                code = stop.code & 0xFF
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if ISOLATION is None:
            conn.sendall(b"exit %d\n" % code)
    finally:
        os._exit(code)

def run(conn, request):
    if request.get("script"):
        run_script(conn, request)
    code = 3
    try:
        detach(conn, request)
        out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(request["dir"])
        os.environ.update(request["env"])
        sys.path.insert(0, request["dir"])
        sys.argv = ["pytest"] + request["args"]
        code = int(pytest.main(request["args"]))
    except BaseException:
        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

while True:
    for key, _ in events.select():
        if key.data == "node":
            if not os.read(0, 4096):
                end()
            continue
        conn, _ = server.accept()
        try:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n") and len(data) < 65536:
                more = conn.recv(4096)
                if not more:
                    break
                data += more
            request = json.loads(data)
            conn.settimeout(None)
        except Exception:
            conn.close()
            continue
        if "kill" in request:
            try:
                # Isolated, the pid is the task's PID 1: its namespaces die with it.
                os.kill(int(request["kill"]), signal.SIGKILL)
                os.killpg(int(request["kill"]), signal.SIGKILL)
            except Exception:
                pass
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            run(conn, request)
        if len(children) >= 256:
            children = {child for child in children if alive_child(child)}
        children.add(pid)
        conn.close()
"#;

/// One warm interpreter.
struct Warm {
    python: PathBuf,
    socket: PathBuf,
    process: tokio::process::Child,
    /// Its end of this pipe closes when the node dies, and it exits.
    _lifeline: tokio::process::ChildStdin,
}

/// The program of the warm interpreter: the per-task isolation, then the zygote.
fn program() -> String {
    format!("{}\n{ZYGOTE}", include_str!("isolate.py"))
}

/// What one forked module is to do.
pub(crate) struct Request<'a> {
    /// The task's own folder (the only one of the work folders it sees).
    pub task: &'a Path,
    /// The user id it runs as (the node is root), if any.
    pub id: Option<u32>,
    /// The project's copy, where it runs.
    pub dir: &'a Path,
    /// The test module.
    pub module: &'a str,
    /// Its tests to run (node ids), when not all of them.
    pub selection: &'a [String],
    /// The piece of its tests to run (`START:END`, `TEIA_SHARD`), when it is split.
    pub shard: Option<String>,
    /// Where its stdout and stderr go.
    pub output: &'a Path,
    /// Its `HOME`.
    pub home: &'a Path,
    /// Where the report plugin writes.
    pub report: &'a Path,
}

impl Request<'_> {
    /// What pytest is given to run: the module, or the selected tests.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        let whole = self.selection.is_empty().then_some(self.module);
        whole
            .into_iter()
            .chain(self.selection.iter().map(String::as_str))
    }
}

/// What one forked script task is to do (`python ARGS...` in `dir`).
pub(crate) struct ScriptRequest<'a> {
    /// The user id it runs as (the node is root), if any.
    pub id: Option<u32>,
    /// The task's folder, where it runs.
    pub dir: &'a Path,
    /// `main.py` and its arguments.
    pub args: &'a [&'a str],
    /// Where its stdout goes.
    pub stdout: &'a Path,
    /// Where its stderr goes.
    pub stderr: &'a Path,
    /// Its `HOME`.
    pub home: &'a Path,
}

/// How a forked script ended.
pub(crate) struct ScriptEnd {
    /// Killed at its timeout.
    pub timed_out: bool,
    /// Its exit code, when it exited by itself.
    pub exit_code: Option<i32>,
}

/// The bubblewrap sandbox warm interpreters run in (see `sandbox`): each task forked
/// from it is then isolated in namespaces of its own (`isolate.py`).
pub(crate) struct Sandbox {
    /// The `bwrap` program.
    pub bwrap: PathBuf,
    /// Folders visible read-only (under a fresh `/tmp`): the report plugin, environments,
    /// the interpreter's prefix.
    pub readable: Vec<PathBuf>,
    /// Where the tasks' work folders are: each task sees only its own.
    pub work: PathBuf,
}

/// The node's warm interpreters.
pub(crate) struct WarmPool {
    sockets: PathBuf,
    support: PathBuf,
    limits: Limits,
    sandbox: Option<Sandbox>,
    running: tokio::sync::Mutex<(Vec<Warm>, Vec<PathBuf>)>,
    next: AtomicU64,
    /// Tasks whose sandbox could not be made (they did not run).
    sandbox_failures: AtomicU64,
    /// Cancelled when the runner stops: children running are killed, none is forked.
    stop: CancellationToken,
}

impl WarmPool {
    /// A pool whose sockets go in `sockets` (made private to this user); `support` holds
    /// the report plugin.
    pub fn new(
        sockets: PathBuf,
        support: PathBuf,
        limits: Limits,
        sandbox: Option<Sandbox>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            sockets,
            support,
            limits,
            sandbox,
            running: tokio::sync::Mutex::new((Vec::new(), Vec::new())),
            next: AtomicU64::new(0),
            sandbox_failures: AtomicU64::new(0),
            stop,
        }
    }

    /// Tasks whose sandbox could not be made since the start.
    pub fn sandbox_failures(&self) -> u64 {
        self.sandbox_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops every warm interpreter (dropped, each is killed, and its sandbox with it).
    pub async fn stop(&self) {
        self.running.lock().await.0.clear();
    }

    /// Runs `request` in a child of `python`'s warm interpreter; waits for it to end or
    /// kills its process group at the timeout. `Some(timed_out)`, or `None` when no warm
    /// interpreter took it (the caller starts it cold).
    pub async fn run(&self, python: &Path, request: &Request<'_>) -> Option<bool> {
        let line = serde_json::json!({
            "task": request.task,
            "uid": request.id,
            "dir": request.dir,
            "args": request.targets().chain(PYTEST_ARGS).collect::<Vec<_>>(),
            "output": request.output,
            "env": match &request.shard {
                Some(shard) => serde_json::json!({"HOME": request.home, "TEIA_REPORT": request.report, "TEIA_SHARD": shard}),
                None => serde_json::json!({"HOME": request.home, "TEIA_REPORT": request.report}),
            },
        });
        self.fork(python, &line)
            .await
            .map(|(timed_out, _)| timed_out)
    }

    /// Runs a script task in a child of `python`'s warm interpreter, as [`WarmPool::run`]
    /// runs a module; `None` when no warm interpreter took it.
    pub async fn run_script(
        &self,
        python: &Path,
        request: &ScriptRequest<'_>,
    ) -> Option<ScriptEnd> {
        let line = serde_json::json!({
            "script": true,
            "task": request.dir,
            "uid": request.id,
            "dir": request.dir,
            "args": request.args,
            "stdout": request.stdout,
            "stderr": request.stderr,
            "env": {"HOME": request.home},
        });
        let (timed_out, said) = self.fork(python, &line).await?;
        let exit_code = said
            .lines()
            .last()
            .and_then(|line| line.strip_prefix("exit "))
            .and_then(|code| code.trim().parse().ok())
            .filter(|_| !timed_out);
        Some(ScriptEnd {
            timed_out,
            exit_code,
        })
    }

    /// Sends `request` to `python`'s warm interpreter, which forks a child for it; waits for
    /// the child to end (its connection closes) or kills its process group at the timeout.
    /// Whether it timed out, and the line the child said last (at most 64 bytes).
    async fn fork(&self, python: &Path, request: &serde_json::Value) -> Option<(bool, String)> {
        let started = Instant::now();
        let socket = self.socket(python).await?;
        let line = request.to_string() + "\n";
        let connected = async {
            let mut conn = tokio::net::UnixStream::connect(&socket).await.ok()?;
            conn.write_all(line.as_bytes()).await.ok()?;
            let mut reader = BufReader::new(conn);
            let mut pid = String::new();
            (&mut reader).take(32).read_line(&mut pid).await.ok()?;
            let pid = pid.trim().parse::<i32>().ok()?;
            Some((reader, rustix::process::Pid::from_raw(pid)?))
        };
        let Ok(Some((mut reader, pid))) = tokio::time::timeout(FORK_TIME, connected).await else {
            tracing::warn!(python = %python.display(), "warm interpreter did not answer; modules start cold");
            self.forget(python).await;
            return None;
        };
        let left = self.limits.timeout.saturating_sub(started.elapsed());
        let mut said = Vec::new();
        let ended = async {
            let mut piece = [0u8; 512];
            while let Ok(n @ 1..) = reader.read(&mut piece).await {
                said.extend_from_slice(piece.get(..n).unwrap_or_default());
                let excess = said.len().saturating_sub(SAID_KEPT);
                said.drain(..excess);
            }
        };
        let timed_out = tokio::select! {
            ended = tokio::time::timeout(left, ended) => ended.is_err(),
            () = self.stop.cancelled() => true,
        };
        // The whole session: pytest and whatever the tests started. In a sandbox, pids are
        // the sandbox's own: the warm interpreter kills it.
        if self.sandbox.is_some() {
            let kill = format!("{{\"kill\":{}}}\n", pid.as_raw_nonzero());
            let asked = async {
                let mut conn = tokio::net::UnixStream::connect(&socket).await.ok()?;
                conn.write_all(kill.as_bytes()).await.ok()
            };
            let _ = tokio::time::timeout(FORK_TIME, asked).await;
        } else {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let said = String::from_utf8_lossy(&said).into_owned();
        if let Some(why) = said
            .lines()
            .find_map(|l| l.strip_prefix("isolation failed: "))
        {
            self.sandbox_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(reason = %why, "a task's sandbox could not be made: it did not run");
        }
        Some((timed_out, said))
    }

    /// Starts `python`'s warm interpreter if it is not running.
    pub async fn warm_up(&self, python: &Path) {
        let _ = self.socket(python).await;
    }

    /// The socket of `python`'s warm interpreter, started if needed.
    async fn socket(&self, python: &Path) -> Option<PathBuf> {
        if self.stop.is_cancelled() {
            return None;
        }
        let mut running = self.running.lock().await;
        let (warm, broken) = &mut *running;
        warm.retain_mut(|w| matches!(w.process.try_wait(), Ok(None)));
        if let Some(found) = warm.iter().find(|w| w.python == python) {
            return Some(found.socket.clone());
        }
        if broken.iter().any(|b| b == python) {
            return None;
        }
        if warm.len() >= MAX_WARM {
            // Dropped, it is killed.
            warm.remove(0);
        }
        match self.start(python).await {
            Ok(started) => {
                let socket = started.socket.clone();
                warm.push(started);
                Some(socket)
            }
            Err(e) => {
                tracing::warn!(python = %python.display(), error = %e, "no warm interpreter; modules start cold");
                if broken.len() >= MAX_BROKEN {
                    broken.remove(0);
                }
                broken.push(python.to_owned());
                None
            }
        }
    }

    /// Warm interpreters running now.
    #[cfg(test)]
    pub async fn count(&self) -> usize {
        self.running.lock().await.0.len()
    }

    /// Stops `python`'s warm interpreter (it failed); the next module starts a new one.
    async fn forget(&self, python: &Path) {
        self.running.lock().await.0.retain(|w| w.python != python);
    }

    async fn start(&self, python: &Path) -> Result<Warm, WarmError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.sockets)?;
        std::fs::set_permissions(&self.sockets, std::fs::Permissions::from_mode(0o700))?;
        let socket = self.sockets.join(format!(
            "{}.sock",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(WarmError::SocketPathTooLong(socket));
        }
        let mut isolation = None;
        let mut command = match &self.sandbox {
            Some(sandbox) => {
                for path in sandbox
                    .readable
                    .iter()
                    .chain([&sandbox.work, &self.sockets])
                {
                    std::fs::create_dir_all(path)?;
                }
                let plan = super::sandbox::Plan {
                    readable: sandbox.readable.iter().map(PathBuf::as_path).collect(),
                    writable: vec![&sandbox.work, &self.sockets],
                    network: false,
                    keep_capabilities: true,
                };
                let hidden: Vec<&Path> = vec![
                    &sandbox.work,
                    &self.sockets,
                    Path::new("/tmp"),
                    Path::new("/dev/shm"),
                ];
                let keep: Vec<&PathBuf> = sandbox
                    .readable
                    .iter()
                    .filter(|p| hidden.iter().any(|h| p.starts_with(h)))
                    .collect();
                isolation = Some(serde_json::json!({"hidden": hidden, "keep": keep}).to_string());
                let mut command = tokio::process::Command::new(&sandbox.bwrap);
                command
                    .args(super::sandbox::bwrap_args(&plan))
                    .arg("--chdir")
                    .arg(&self.sockets)
                    .arg("bash");
                command
            }
            None => tokio::process::Command::new("bash"),
        };
        command
            .args(["-c", &limits_script(&self.limits), "bash"])
            .arg(python)
            .args(["-c", &program()])
            .arg(&socket)
            .args(isolation)
            .current_dir(&self.sockets);
        clean_environment(&mut command, &self.support, &self.sockets);
        let mut process = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let lifeline = process.stdin.take().ok_or(WarmError::NoPipe)?;
        let stdout = process.stdout.take().ok_or(WarmError::NoPipe)?;
        let mut ready = String::new();
        let said = tokio::time::timeout(
            START_TIME,
            BufReader::new(stdout).take(64).read_line(&mut ready),
        )
        .await;
        if !matches!(said, Ok(Ok(_))) || ready.trim() != "ready" {
            return Err(WarmError::NotReady);
        }
        tracing::info!(python = %python.display(), "warm interpreter ready");
        Ok(Warm {
            python: python.to_owned(),
            socket,
            process,
            _lifeline: lifeline,
        })
    }
}
