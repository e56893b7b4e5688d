//! A `teia node` process started by a benchmark (on 127.0.0.1, LAN discovery off): its
//! listen port, its HTTP address when it serves the API, and the log lines it printed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// The programs a benchmark runs: Python, and the `teia` binary.
#[derive(Debug, Clone, clap::Args)]
pub struct Programs {
    /// Python (with pytest and pytest-xdist for `eval`).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The `teia` binary (default: beside this one).
    #[arg(long)]
    pub teia: Option<std::path::PathBuf>,
}

impl Programs {
    /// The `teia` binary to run.
    pub fn teia(&self) -> anyhow::Result<std::path::PathBuf> {
        match &self.teia {
            Some(path) => Ok(path.clone()),
            None => Ok(std::env::current_exe()?
                .parent()
                .context("no folder")?
                .join("teia")),
        }
    }
}

/// A running node, killed when dropped.
pub struct Node {
    pub child: Child,
    /// `ip:port` of its HTTP API (empty without `--http`).
    pub http: String,
    /// Its overlay listen port.
    pub port: u16,
    /// Its peer id.
    pub name: String,
    /// Its log lines (info and above) so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `teia node` named `name` with its data in `data`, linked to `peer` if given,
    /// with `extra` flags; its warnings are printed as they come.
    pub fn start(
        teia: &Path,
        data: &Path,
        name: &str,
        peer: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(teia);
        command
            .args(["node", "--json", "--name", name, "--namespace", "bench"])
            .arg("--no-lan")
            .args(["--listen-ip", "127.0.0.1", "--log", "info", "--data-dir"])
            .arg(data)
            .args(extra)
            .args(["--peer", peer.unwrap_or("127.0.0.1:1")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut port = 0;
        let mut stdout = BufReader::new(stdout).lines();
        for line in stdout.by_ref() {
            let line = line?;
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                if event["event"] == "ready" {
                    port = event["listen"]
                        .as_str()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    break;
                }
            }
        }
        let mut http = String::new();
        let mut stderr = BufReader::new(stderr).lines();
        if extra.contains(&"--http") {
            for line in stderr.by_ref() {
                let line = line?;
                if let Some(at) = line.find("bound=") {
                    http = line[at + 6..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    break;
                }
            }
            if http.is_empty() {
                bail!("node {name} did not serve its HTTP API");
            }
        }
        if port == 0 {
            bail!("node {name} did not start");
        }
        // Keep reading both, so the node never blocks on a full pipe; say its warnings.
        std::thread::spawn(move || stdout.for_each(drop));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let who = name.to_owned();
        std::thread::spawn(move || {
            for line in stderr.map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[{who}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Self {
            child,
            http,
            port,
            name: format!("{name}@bench"),
            log,
        })
    }

    /// Waits (up to `patience`) for a log line, among those from the `from`th on, that
    /// contains every one of `needles`; its index and text.
    pub fn wait_log(
        &self,
        needles: &[&str],
        from: usize,
        patience: Duration,
    ) -> anyhow::Result<(usize, String)> {
        let deadline = Instant::now() + patience;
        loop {
            {
                let log = self.log.lock().unwrap();
                let found = log
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, line)| needles.iter().all(|n| line.contains(n)));
                if let Some((index, line)) = found {
                    return Ok((index, line.clone()));
                }
            }
            if Instant::now() > deadline {
                bail!("{}: no log line with {needles:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the node with SIGKILL (`kill -9`) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of `key=` in a log line.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line.get(at..)?.split_whitespace().next()
}

/// Removes a benchmark's folder, again if processes of the nodes just killed were still
/// leaving files in it.
pub fn remove_all(dir: &Path) {
    for _ in 0..10 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
