//! Running one test module: `python -m pytest MODULE` in a fresh copy of its project, with a
//! clean environment, resource limits (`ulimit`: memory, processes, file size), its own
//! process group (killed whole at the timeout), and under `bubblewrap` (no network, a
//! read-only system) when it is installed.
//!
//! Results are counted per test as they happen, by a small pytest plugin that writes one
//! JSON line per test report to a file: a module killed at its timeout keeps the results of
//! the tests that finished, and counts one error for the one it was in.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::proto::ledger::ModuleResult;

/// The pytest plugin that reports each test as it ends.
const PLUGIN: &str = r#"
import json, os

_out = open(os.environ["TEIA_REPORT"], "a", buffering=1)

def _write(kind, outcome, nodeid):
    _out.write(json.dumps({"kind": kind, "outcome": outcome, "nodeid": nodeid}) + "\n")

def pytest_collectreport(report):
    if report.failed:
        _write("collect", "error", report.nodeid)

def pytest_runtest_logreport(report):
    if report.when == "call":
        _write("call", "skipped" if report.skipped else report.outcome, report.nodeid)
    elif report.failed:
        _write(report.when, "error", report.nodeid)
    elif report.skipped and report.when == "setup":
        _write("setup", "skipped", report.nodeid)
"#;

/// Bytes of a module's output kept (the rest is dropped).
pub const OUTPUT_KEPT: usize = 64 * 1024;

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
    /// `bubblewrap` when installed, else limits only.
    pub fn detect() -> Self {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("bwrap"))
                    .find(|p| p.is_file())
            })
            .map_or(Self::Limits, Self::Bubblewrap)
    }

    /// For the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Bubblewrap(path) => format!(
                "bubblewrap ({}): no network, read-only system, limits",
                path.display()
            ),
            Self::Limits => {
                "clean environment, ulimits and a process group (install bubblewrap for \
                 no network and a read-only system)"
                    .to_owned()
            }
        }
    }
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

/// Runs `module` of the project in `project` (copied into `work`, which must not exist),
/// with `python`; `node` names this node in the result.
pub async fn run_module(
    python: &Path,
    project: &Path,
    module: &str,
    work: &Path,
    limits: &Limits,
    isolation: &Isolation,
    node: &str,
) -> Result<Outcome, RunError> {
    let prepare = |source| RunError::Prepare {
        path: work.to_owned(),
        source,
    };
    let tree = work.join("project");
    copy_tree(project, &tree).map_err(prepare)?;
    let support = work.join("support");
    std::fs::create_dir_all(&support).map_err(prepare)?;
    std::fs::write(support.join("teia_report.py"), PLUGIN).map_err(prepare)?;
    let report = work.join("report.jsonl");
    let home = work.join("home");
    std::fs::create_dir_all(&home).map_err(prepare)?;

    let limits_script = format!(
        "ulimit -v {} && ulimit -u {} && ulimit -f {} && exec \"$@\"",
        limits.memory_mib * 1024,
        limits.processes,
        limits.file_mib * 1024
    );
    let pytest_args = [
        "-m",
        "pytest",
        module,
        "-q",
        "-p",
        "teia_report",
        "-p",
        "no:cacheprovider",
    ];
    let mut command = match isolation {
        Isolation::Bubblewrap(bwrap) => {
            let mut command = tokio::process::Command::new(bwrap);
            let work_text = work.to_string_lossy().into_owned();
            command
                .args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
                .args(["--tmpfs", "/tmp", "--bind", &work_text, &work_text])
                .args(["--unshare-net", "--unshare-pid", "--die-with-parent"])
                .arg("--chdir")
                .arg(&tree)
                .args(["bash", "-c", &limits_script, "bash"]);
            command
        }
        Isolation::Limits => {
            let mut command = tokio::process::Command::new("bash");
            command.args(["-c", &limits_script, "bash"]);
            command
        }
    };
    command
        .arg(python)
        .args(pytest_args)
        .current_dir(&tree)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("PYTHONPATH", &support)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("TEIA_REPORT", &report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
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
    let timed_out = tokio::time::timeout(limits.timeout, child.wait())
        .await
        .is_err();
    if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        // The whole group: pytest and whatever the tests started.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.wait().await;
    let output = match tokio::time::timeout(Duration::from_secs(2), output_task).await {
        Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        _ => String::new(),
    };
    let mut result = ModuleResult {
        seconds: started.elapsed().as_secs_f64(),
        node: node.to_owned(),
        ..ModuleResult::default()
    };
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    for line in text.lines() {
        let Ok(report) = serde_json::from_str::<Report>(line) else {
            continue;
        };
        match (report.kind.as_str(), report.outcome.as_str()) {
            ("call", "passed") => result.passed += 1,
            ("call", "failed") => result.failed += 1,
            (_, "skipped") => result.skipped += 1,
            (_, "error") => result.errors += 1,
            _ => {}
        }
    }
    let counted = result.passed + result.failed + result.errors + result.skipped;
    if timed_out || (counted == 0 && !output.contains("no tests ran")) {
        // Killed at its timeout, or crashed before any report: the test it was in counts
        // as one error.
        result.errors += 1;
    }
    Ok(Outcome {
        result,
        timed_out,
        output,
    })
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

/// Checks that `python` runs and has pytest; says what is missing otherwise. Returns the
/// interpreter's own path (`sys.executable`: a wrapper such as a pyenv shim costs every
/// module a second start) and its versions.
pub async fn check_python(python: &Path) -> Result<(PathBuf, String), String> {
    let output = tokio::process::Command::new(python)
        .args([
            "-c",
            "import sys, pytest; print(sys.executable); print(sys.version.split()[0], pytest.__version__)",
        ])
        .output()
        .await
        .map_err(|e| {
            format!(
                "{} cannot run ({e}); install Python 3 or give --python PATH",
                python.display()
            )
        })?;
    if output.status.success() {
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines = text.lines();
        let executable = lines
            .next()
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.is_file())
            .unwrap_or_else(|| python.to_owned());
        Ok((
            executable,
            lines.next().unwrap_or_default().trim().to_owned(),
        ))
    } else {
        Err(format!(
            "{} has no pytest; install it (pip install pytest, or apt-get install python3-pytest)",
            python.display()
        ))
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
        check_python(&python())
            .await
            .map(|(p, _)| p)
            .unwrap_or_else(|_| python())
    }

    async fn have_pytest() -> bool {
        check_python(&python()).await.is_ok()
    }

    fn project(dir: &Path, module: &str, source: &str) {
        std::fs::create_dir_all(dir.join("tests")).unwrap();
        std::fs::write(dir.join("tests").join(module), source).unwrap();
    }

    #[tokio::test]
    async fn counts_each_outcome_and_keeps_results_of_a_module_killed_at_its_timeout() {
        assert!(
            have_pytest().await,
            "these tests run pytest: install it (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p");
        project(
            &src,
            "test_mix.py",
            "import pytest\n\ndef test_ok():\n    assert True\n\ndef test_no():\n    assert False\n\n@pytest.mark.skip\ndef test_skip():\n    pass\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError\n\ndef test_error(broken):\n    pass\n",
        );
        project(
            &src,
            "test_hang.py",
            "import time\n\ndef test_first():\n    assert True\n\ndef test_hangs():\n    time.sleep(60)\n",
        );
        let limits = Limits::default();
        let python = interpreter().await;
        let mix = run_module(
            &python,
            &src,
            "tests/test_mix.py",
            &dir.path().join("w1"),
            &limits,
            &Isolation::Limits,
            "n",
        )
        .await
        .unwrap();
        let r = mix.result;
        assert_eq!(
            (r.passed, r.failed, r.skipped, r.errors),
            (1, 1, 1, 1),
            "{}",
            mix.output
        );
        let short = Limits {
            timeout: Duration::from_secs(3),
            ..Limits::default()
        };
        let hang = run_module(
            &python,
            &src,
            "tests/test_hang.py",
            &dir.path().join("w2"),
            &short,
            &Isolation::Limits,
            "n",
        )
        .await
        .unwrap();
        assert!(hang.timed_out);
        assert_eq!((hang.result.passed, hang.result.errors), (1, 1));
    }
}
