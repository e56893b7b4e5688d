//! Virtual environments for projects with a `requirements.txt`: one per (Python, the
//! file's content), made once (`python -m venv --system-site-packages`, then `pip install
//! -r`) and reused by every module and later evaluation that has the same file.
//!
//! An environment is built in place and marked ready when whole; one left unmarked (the
//! node stopped while building it) is built again. With bubblewrap, it is built in the
//! tasks' sandbox (the project's code runs in `pip install`: a build backend, a `setup.py`):
//! the network allowed, nothing of the node visible, only the environment being built and
//! the build's home writable, as a task id of its own when the node is root. Its network
//! is a namespace of its own behind `slirp4netns` with the host's loopback refused, so a
//! build reaches the internet (PyPI) but none of this machine's local services (the node's
//! HTTP API among them); without `slirp4netns`, it has the host's network, and the node
//! says so. A build that failed is remembered until
//! the node restarts, so the other modules of its project fail at once with the same
//! message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use super::sandbox::{self, TaskIds};
use super::{clean_environment, limits_script, python_prefixes, Limits, OUTPUT_KEPT};

/// The sandbox builds run in: `bwrap`, and the task ids when the node is root.
pub(crate) type BuildSandbox = (PathBuf, Option<Arc<TaskIds>>);

/// Size of a `requirements.txt` read; a larger one is refused.
pub const MAX_REQUIREMENTS: u64 = 64 * 1024;

/// Time an environment has to be made and its requirements installed.
pub const BUILD_TIME: Duration = Duration::from_secs(600);

/// Failed builds remembered; past it, the oldest is forgotten (and would be tried again).
const MAX_FAILED: usize = 64;

/// The marker of a whole environment.
const READY: &str = ".teia-ready";

/// Why a project's environment could not be made (remembered for the project's other
/// modules, hence cloneable).
#[derive(Debug, Clone, thiserror::Error)]
pub enum VenvError {
    /// The project's `requirements.txt` is not a file or is too large.
    #[error("requirements.txt must be a file of at most {MAX_REQUIREMENTS} bytes")]
    RequirementsTooLarge,
    /// The project's `requirements.txt` could not be read.
    #[error("requirements.txt: {0}")]
    RequirementsUnreadable(Arc<std::io::Error>),
    /// The environment's folders could not be prepared.
    #[error("cannot prepare the environment: {0}")]
    Prepare(Arc<std::io::Error>),
    /// A step of the build took more than [`BUILD_TIME`].
    #[error("{step} took more than {BUILD_TIME:?}")]
    TimedOut {
        /// The step.
        step: &'static str,
    },
    /// A step of the build could not be run.
    #[error("{step}: {cause}")]
    NotRun {
        /// The step.
        step: &'static str,
        /// Why.
        cause: SlirpError,
    },
    /// A step of the build failed.
    #[error("{step} failed ({status}): {said}")]
    Failed {
        /// The step.
        step: &'static str,
        /// How it ended (an exit code, or the signal that killed it).
        status: std::process::ExitStatus,
        /// The end of what it said.
        said: String,
    },
}

/// Why a build's command could not be run (behind `slirp4netns` or not).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SlirpError {
    /// A process could not be started or waited for.
    #[error("{0}")]
    Io(Arc<std::io::Error>),
    /// A pipe to or from bwrap or slirp4netns was missing.
    #[error("no pipe to or from {0}")]
    NoPipe(&'static str),
    /// bwrap did not say its sandbox's pid in time.
    #[error("bwrap did not say its sandbox's pid")]
    NoPid,
    /// bwrap said something other than its sandbox's pid.
    #[error("bwrap did not start: {0}")]
    NotStarted(String),
    /// slirp4netns could not be run.
    #[error("cannot run slirp4netns: {0}")]
    SlirpNotRun(Arc<std::io::Error>),
    /// slirp4netns did not say the network was ready in time.
    #[error("slirp4netns could not give the build a network")]
    NoNetwork,
    /// The sandbox ended before it was let run the build.
    #[error("the build's sandbox ended before the build started ({status}): {said}")]
    SandboxEnded {
        /// How bwrap ended.
        status: std::process::ExitStatus,
        /// What it said last.
        said: String,
    },
}

impl From<std::io::Error> for SlirpError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

/// A [`VenvError::Prepare`] of `e`.
fn prepare(e: std::io::Error) -> VenvError {
    VenvError::Prepare(Arc::new(e))
}

/// One environment being built.
struct Build<'a> {
    /// The interpreter it is made from.
    python: &'a Path,
    /// The project whose requirements it installs.
    project: &'a Path,
    /// The environment's folder.
    venv: &'a Path,
    /// The build's `HOME`.
    home: &'a Path,
    /// The task id it is built as (the node is root), if any.
    id: Option<u32>,
}

/// The node's environments.
pub(crate) struct VenvCache {
    dir: PathBuf,
    support: PathBuf,
    limits: Limits,
    /// One build at a time; failures by key.
    failed: tokio::sync::Mutex<HashMap<String, VenvError>>,
    /// The sandbox builds run in, if any.
    sandbox: Option<BuildSandbox>,
}

impl VenvCache {
    /// Environments go in `dir`.
    pub fn new(
        dir: PathBuf,
        support: PathBuf,
        limits: Limits,
        sandbox: Option<BuildSandbox>,
    ) -> Self {
        Self {
            dir,
            support,
            limits,
            failed: tokio::sync::Mutex::new(HashMap::new()),
            sandbox,
        }
    }

    /// The folder the environments are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The interpreter for `project`: `python` itself when it has no requirements, else
    /// that of its environment (made now if needed). `Err` says why it could not be made.
    pub async fn interpreter(&self, python: &Path, project: &Path) -> Result<PathBuf, VenvError> {
        let path = project.join("requirements.txt");
        let Ok(meta) = std::fs::metadata(&path) else {
            return Ok(python.to_owned());
        };
        if !meta.is_file() || meta.len() > MAX_REQUIREMENTS {
            return Err(VenvError::RequirementsTooLarge);
        }
        let content =
            std::fs::read(&path).map_err(|e| VenvError::RequirementsUnreadable(Arc::new(e)))?;
        let wanted = String::from_utf8_lossy(&content);
        if wanted
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Ok(python.to_owned());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(python.as_os_str().as_encoded_bytes());
        hasher.update(&[0]);
        hasher.update(&content);
        let key = hasher.finalize().to_hex()[..32].to_owned();
        let venv = self.dir.join(&key);
        let interpreter = venv.join("bin").join("python");
        if venv.join(READY).is_file() {
            return Ok(interpreter);
        }
        let mut failed = self.failed.lock().await;
        if venv.join(READY).is_file() {
            return Ok(interpreter);
        }
        if let Some(reason) = failed.get(&key) {
            return Err(reason.clone());
        }
        tracing::info!(environment = %venv.display(), "installing a project's requirements");
        match self.build(python, project, &venv).await {
            Ok(()) => {
                tracing::info!(environment = %venv.display(), "requirements installed");
                Ok(interpreter)
            }
            Err(reason) => {
                tracing::warn!(environment = %venv.display(), %reason, "requirements not installed");
                if failed.len() >= MAX_FAILED {
                    failed.clear();
                }
                failed.insert(key, reason.clone());
                Err(reason)
            }
        }
    }

    async fn build(&self, python: &Path, project: &Path, venv: &Path) -> Result<(), VenvError> {
        let _ = std::fs::remove_dir_all(venv);
        let home = self.dir.join("home");
        let _ = std::fs::remove_dir_all(&home);
        for folder in [venv, &home] {
            std::fs::create_dir_all(folder).map_err(prepare)?;
        }
        let id = match self.sandbox.as_ref().and_then(|(_, ids)| ids.as_ref()) {
            Some(ids) => {
                let id = ids.take().await;
                for folder in [venv, &home] {
                    sandbox::give_tree(folder, id.id).map_err(prepare)?;
                }
                Some(id)
            }
            None => None,
        };
        let build = Build {
            python,
            project,
            venv,
            home: &home,
            id: id.as_ref().map(|id| id.id),
        };
        let venv_text = venv.to_string_lossy();
        self.step(
            &build,
            python,
            &["-m", "venv", "--system-site-packages", &venv_text],
            venv,
            "python -m venv (on Debian: apt-get install python3-venv)",
        )
        .await?;
        self.step(
            &build,
            &venv.join("bin").join("python"),
            &[
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "-r",
                "requirements.txt",
            ],
            project,
            "pip install -r requirements.txt",
        )
        .await?;
        std::fs::write(venv.join(READY), b"").map_err(prepare)
    }

    /// Runs one step of `build` in `dir` with the modules' environment and limits (but the
    /// network: pip needs it), in the sandbox when there is one.
    async fn step(
        &self,
        build: &Build<'_>,
        program: &Path,
        args: &[&str],
        dir: &Path,
        step: &'static str,
    ) -> Result<(), VenvError> {
        let slirp = self
            .sandbox
            .as_ref()
            .and_then(|_| find_program("slirp4netns"));
        let mut command = match &self.sandbox {
            Some((bwrap, _)) => {
                let prefixes = python_prefixes(build.python);
                let plan = sandbox::Plan {
                    readable: [build.project, self.support.as_path()]
                        .into_iter()
                        .chain(prefixes.iter().map(PathBuf::as_path))
                        .collect(),
                    writable: vec![build.venv, build.home],
                    // With slirp4netns: a network namespace of its own, connected below.
                    network: slirp.is_none(),
                    keep_capabilities: false,
                };
                let mut command = if slirp.is_some() {
                    // bwrap closes its info descriptor once it has said the sandbox's pid,
                    // so it gets one of its own (3, the pipe on stderr), and everything
                    // else bwrap and the build say goes to stdout.
                    let mut command = tokio::process::Command::new("bash");
                    command
                        .args(["-c", "exec \"$@\" 3>&2 2>&1", "bash"])
                        .arg(bwrap);
                    command
                } else {
                    tokio::process::Command::new(bwrap)
                };
                command.args(sandbox::bwrap_args(&plan));
                if slirp.is_some() {
                    // slirp4netns answers DNS at 10.0.2.3; bwrap says the sandbox's pid on
                    // fd 3.
                    let resolv = self.dir.join("resolv.conf");
                    std::fs::write(&resolv, "nameserver 10.0.2.3\n").map_err(prepare)?;
                    command
                        .arg("--ro-bind")
                        .arg(&resolv)
                        .arg("/etc/resolv.conf")
                        .args(["--info-fd", "3"]);
                } else {
                    warn_host_network();
                }
                command
                    .arg("--chdir")
                    .arg(dir)
                    .args(sandbox::become_task(build.id))
                    .arg("bash");
                command
            }
            None => tokio::process::Command::new("bash"),
        };
        let script = if slirp.is_some() {
            // The sandbox says it is set up (bwrap has configured its loopback: slirp4netns
            // must not join the namespace before), then waits for a byte on stdin, sent
            // once slirp4netns has connected it, before it runs the build.
            format!(
                "echo {SANDBOX_READY} && read -r -n 1 _ && {}",
                limits_script(&self.limits)
            )
        } else {
            limits_script(&self.limits)
        };
        command
            .args(["-c", &script, "bash"])
            .arg(program)
            .args(args)
            .current_dir(dir)
            .stdin(if slirp.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        clean_environment(&mut command, &self.support, build.home);
        let run = async {
            match &slirp {
                Some(slirp) => run_behind_slirp(command, slirp).await,
                None => command.output().await.map_err(SlirpError::from),
            }
        };
        let output = match tokio::time::timeout(BUILD_TIME, run).await {
            Err(_) => return Err(VenvError::TimedOut { step }),
            Ok(Err(cause)) => return Err(VenvError::NotRun { step, cause }),
            Ok(Ok(output)) => output,
        };
        if output.status.success() {
            return Ok(());
        }
        let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        let said = said.trim();
        let start = said.len().saturating_sub(OUTPUT_KEPT / 16);
        let start = (start..said.len())
            .find(|&i| said.is_char_boundary(i))
            .unwrap_or(said.len());
        let tail = said.get(start..).unwrap_or_default();
        Err(VenvError::Failed {
            step,
            status: output.status,
            said: tail.to_owned(),
        })
    }
}

/// What a build's sandbox says on stdout once bwrap has set it up.
const SANDBOX_READY: &str = "teia-sandbox-ready";

/// Time `slirp4netns` has to connect a build's network namespace.
const SLIRP_TIME: Duration = Duration::from_secs(10);

/// Bytes of what bwrap says about its sandbox read at most.
const INFO_KEPT: usize = 4096;

/// `program` on the node's `PATH`, if it is there.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Says once that builds have the host's network (no `slirp4netns` here).
fn warn_host_network() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(
            "requirements are installed with the host's network, this machine's local \
             services included: install slirp4netns to give builds the internet only"
        );
    });
}

/// Runs a build's bwrap `command` (its info descriptor on stderr, what it and the build say
/// on stdout, where the sandbox says [`SANDBOX_READY`] before it waits for a byte on
/// stdin): reads the sandbox's pid from stderr, waits for it to be set up, connects its
/// network namespace to the internet with `slirp4netns` (the host's loopback refused), lets
/// the build start, and collects its output; `slirp4netns` is stopped when the build ends.
async fn run_behind_slirp(
    mut command: tokio::process::Command,
    slirp: &Path,
) -> Result<std::process::Output, SlirpError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut child = command.spawn()?;
    let mut stdin = child.stdin.take().ok_or(SlirpError::NoPipe("bwrap"))?;
    let mut stdout =
        tokio::io::BufReader::new(child.stdout.take().ok_or(SlirpError::NoPipe("bwrap"))?);
    let mut stderr =
        tokio::io::BufReader::new(child.stderr.take().ok_or(SlirpError::NoPipe("bwrap"))?);
    // bwrap's JSON, `{ ... "child-pid": N, ... }`, one field a line, ends with `}`.
    let mut info = String::new();
    let mut pid = None;
    while info.len() < INFO_KEPT {
        let mut line = String::new();
        let read = tokio::time::timeout(SLIRP_TIME, (&mut stderr).take(1024).read_line(&mut line))
            .await
            .map_err(|_| SlirpError::NoPid)??;
        if read == 0 {
            break;
        }
        if let Some(value) = line.trim().strip_prefix("\"child-pid\":") {
            pid = value.trim().trim_end_matches(',').parse::<u32>().ok();
        }
        info.push_str(&line);
        if line.trim() == "}" {
            break;
        }
    }
    let Some(pid) = pid else {
        let said = read_what_is_left(&mut stdout).await;
        return Err(SlirpError::NotStarted(format!("{}{said}", info.trim())));
    };
    let mut line = String::new();
    let _ = tokio::time::timeout(SLIRP_TIME, (&mut stdout).take(1024).read_line(&mut line)).await;
    if line.trim() != SANDBOX_READY {
        let said = read_what_is_left(&mut stdout).await;
        let _ = child.start_kill();
        let status = child.wait().await?;
        return Err(SlirpError::SandboxEnded {
            status,
            said: format!("{}{said}", line.trim()),
        });
    }
    let mut network = tokio::process::Command::new(slirp)
        .args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--ready-fd=1",
        ])
        .arg(pid.to_string())
        .arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SlirpError::SlirpNotRun(Arc::new(e)))?;
    let mut ready = network
        .stdout
        .take()
        .ok_or(SlirpError::NoPipe("slirp4netns"))?;
    let mut byte = [0u8; 1];
    let connected = tokio::time::timeout(SLIRP_TIME, ready.read(&mut byte)).await;
    if !matches!(connected, Ok(Ok(1))) {
        let _ = network.kill().await;
        return Err(SlirpError::NoNetwork);
    }
    if stdin.write_all(b"1").await.is_err() {
        // bwrap is gone: say why, from what it said.
        let _ = network.kill().await;
        let said = read_what_is_left(&mut stdout).await;
        let status = child.wait().await?;
        return Err(SlirpError::SandboxEnded { status, said });
    }
    drop(stdin);
    let collect = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let mut bytes = Vec::new();
        let _ = pipe
            .take(OUTPUT_KEPT as u64 * 4)
            .read_to_end(&mut bytes)
            .await;
        bytes
    };
    let (out, err, status) = tokio::join!(
        collect(Box::new(stdout)),
        collect(Box::new(stderr)),
        child.wait()
    );
    let _ = network.kill().await;
    Ok(std::process::Output {
        status: status?,
        stdout: out,
        stderr: err,
    })
}

/// What a sandbox that ended early said, at most [`INFO_KEPT`] bytes, waiting at most
/// [`SLIRP_TIME`] for it.
async fn read_what_is_left(pipe: &mut tokio::io::BufReader<tokio::process::ChildStdout>) -> String {
    use tokio::io::AsyncReadExt;
    let mut said = Vec::new();
    let _ = tokio::time::timeout(
        SLIRP_TIME,
        pipe.take(INFO_KEPT as u64).read_to_end(&mut said),
    )
    .await;
    String::from_utf8_lossy(&said).trim().to_owned()
}
