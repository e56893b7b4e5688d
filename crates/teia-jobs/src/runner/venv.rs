//! Virtual environments for projects with a `requirements.txt`: one per (Python, the
//! file's content), made once (`python -m venv --system-site-packages`, then `pip install
//! -r`) and reused by every module and later evaluation that has the same file.
//!
//! An environment is built in place and marked ready when whole; one left unmarked (the
//! node stopped while building it) is built again. With bubblewrap, it is built in the
//! tasks' sandbox (the project's code runs in `pip install`: a build backend, a `setup.py`):
//! the network allowed, nothing of the node visible, only the environment being built and
//! the build's home writable, as a task id of its own when the node is root. A build that failed is remembered until
//! the node restarts, so the other modules of its project fail at once with the same
//! message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::sandbox::{self, TaskIds};
use super::{clean_environment, limits_script, python_prefixes, Limits, OUTPUT_KEPT};

/// The sandbox builds run in: `bwrap`, and the task ids when the node is root.
pub(crate) type BuildSandbox = (PathBuf, Option<std::sync::Arc<TaskIds>>);

/// Size of a `requirements.txt` read; a larger one is refused.
pub const MAX_REQUIREMENTS: u64 = 64 * 1024;

/// Time an environment has to be made and its requirements installed.
pub const BUILD_TIME: Duration = Duration::from_secs(600);

/// Failed builds remembered; past it, the oldest is forgotten (and would be tried again).
const MAX_FAILED: usize = 64;

/// The marker of a whole environment.
const READY: &str = ".teia-ready";

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
    failed: tokio::sync::Mutex<HashMap<String, String>>,
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
    pub async fn interpreter(&self, python: &Path, project: &Path) -> Result<PathBuf, String> {
        let path = project.join("requirements.txt");
        let Ok(meta) = std::fs::metadata(&path) else {
            return Ok(python.to_owned());
        };
        if !meta.is_file() || meta.len() > MAX_REQUIREMENTS {
            return Err(format!(
                "requirements.txt must be a file of at most {MAX_REQUIREMENTS} bytes"
            ));
        }
        let content = std::fs::read(&path).map_err(|e| format!("requirements.txt: {e}"))?;
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

    async fn build(&self, python: &Path, project: &Path, venv: &Path) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(venv);
        let home = self.dir.join("home");
        let _ = std::fs::remove_dir_all(&home);
        for folder in [venv, &home] {
            std::fs::create_dir_all(folder).map_err(|e| e.to_string())?;
        }
        let id = match self.sandbox.as_ref().and_then(|(_, ids)| ids.as_ref()) {
            Some(ids) => {
                let id = ids.take().await;
                for folder in [venv, &home] {
                    sandbox::give_tree(folder, id.id).map_err(|e| e.to_string())?;
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
        std::fs::write(venv.join(READY), b"").map_err(|e| e.to_string())
    }

    /// Runs one step of `build` in `dir` with the modules' environment and limits (but the
    /// network: pip needs it), in the sandbox when there is one.
    async fn step(
        &self,
        build: &Build<'_>,
        program: &Path,
        args: &[&str],
        dir: &Path,
        what: &str,
    ) -> Result<(), String> {
        let mut command = match &self.sandbox {
            Some((bwrap, _)) => {
                let prefixes = python_prefixes(build.python);
                let plan = sandbox::Plan {
                    readable: [build.project, self.support.as_path()]
                        .into_iter()
                        .chain(prefixes.iter().map(PathBuf::as_path))
                        .collect(),
                    writable: vec![build.venv, build.home],
                    network: true,
                    keep_capabilities: false,
                };
                let mut command = tokio::process::Command::new(bwrap);
                command
                    .args(sandbox::bwrap_args(&plan))
                    .arg("--chdir")
                    .arg(dir)
                    .args(sandbox::become_task(build.id))
                    .arg("bash");
                command
            }
            None => tokio::process::Command::new("bash"),
        };
        command
            .args(["-c", &limits_script(&self.limits), "bash"])
            .arg(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        clean_environment(&mut command, &self.support, build.home);
        let output = match tokio::time::timeout(BUILD_TIME, command.output()).await {
            Err(_) => return Err(format!("{what} took more than {BUILD_TIME:?}")),
            Ok(Err(e)) => return Err(format!("{what}: {e}")),
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
        Err(format!("{what} failed: {tail}"))
    }
}
