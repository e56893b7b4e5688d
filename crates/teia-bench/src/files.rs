//! The file-sharing benchmark: real `teia` processes on loopback moving a random file,
//! compared with a raw TCP copy (1 MiB buffer, no encryption, no verification, nothing
//! written) measured in the same run, the ceiling of the machine.
//!
//! Measured: `/get` between two nodes and `teia receive` from `teia send` (encrypted,
//! verified, written to disk), with each side's peak RSS and CPU seconds per GiB; a resume
//! after a `kill -9` of the downloader at 50 %; two holders (each one's share, and the rate
//! against one holder's); a 20 MiB file from `/get` to verified on disk; and the same `/get`
//! between two nodes assembled in this process on the service router
//! ([`crate::assembled`]), without the binary.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::assembled;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Flags of the files benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the big file, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Folder for the files (its file system is the one written to).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The `teia` binary (default: beside this one).
    #[arg(long)]
    teia: Option<PathBuf>,
}

const MIB: u64 = 1024 * 1024;

fn teia_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("no folder for this binary")?
            .join("teia"),
    };
    if !path.exists() {
        bail!(
            "{} not found; build it (cargo build --release) or pass --teia",
            path.display()
        );
    }
    Ok(path)
}

/// Writes `size` pseudo-random bytes.
fn random_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = seed | 1;
    let mut piece = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in piece.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        file.write_all(&piece[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

/// Peak resident memory of a process so far, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A `teia node --json` child: its events arrive on a channel.
struct Node {
    child: Child,
    stdin: ChildStdin,
    events: std_mpsc::Receiver<Value>,
    seen: Vec<Value>,
    port: u16,
    peer_id: String,
}

impl Node {
    fn start(teia: &Path, data: &Path, name: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(teia)
            .args(["node", "--json", "--name", name, "--namespace", "bench"])
            .arg("--no-lan")
            .args(["--listen-ip", "127.0.0.1", "--log", "warn", "--data-dir"])
            .arg(data)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start teia node")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, events) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            }
        });
        let mut node = Self {
            child,
            stdin,
            events,
            seen: Vec::new(),
            port: 0,
            peer_id: format!("{name}@bench"),
        };
        let ready = node.wait("ready", |e| e["event"] == "ready")?;
        node.port = ready["listen"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(node)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn command(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Waits for an event matching `predicate` among those after the first `from`.
    fn wait_from(
        &mut self,
        from: usize,
        what: &str,
        predicate: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut next = from;
        loop {
            while let Some(event) = self.seen.get(next) {
                next += 1;
                if predicate(event) {
                    return Ok(event.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .with_context(|| format!("{}: no {what}", self.peer_id))?;
            self.seen.push(event);
        }
    }

    fn wait(&mut self, what: &str, predicate: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        self.wait_from(0, what, predicate)
    }

    /// Searches until `holders` holders answered; returns the first result's hash.
    fn search(&mut self, text: &str, holders: usize) -> anyhow::Result<String> {
        let from = self.seen.len();
        self.command(&format!("/search {text}"))?;
        let mut hash = String::new();
        let mut at = from;
        for _ in 0..holders {
            let result = self.wait_from(at, "search results", |e| {
                e["event"] == "search_results" && e["text"] == text
            })?;
            at = self
                .seen
                .iter()
                .skip(at)
                .position(|e| e == &result)
                .map_or(self.seen.len(), |i| at + i + 1);
            hash = result["results"][0]["hash"]
                .as_str()
                .unwrap_or("")
                .to_owned();
        }
        Ok(hash)
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The raw TCP copy: `size` bytes through loopback, 1 MiB buffers, read from the file,
/// nothing verified; written to `to` (then flushed to disk) when given, else dropped.
/// Returns bytes per second.
async fn raw_copy(path: &Path, size: u64, to: Option<&Path>) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let path = path.to_owned();
    let sender = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut file = std::fs::File::open(&path)?;
        let mut buffer = vec![0u8; MIB as usize];
        loop {
            let n = std::io::Read::read(&mut file, &mut buffer)?;
            if n == 0 {
                break;
            }
            socket.write_all(&buffer[..n]).await?;
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut socket = TcpStream::connect(addr).await?;
    let mut buffer = vec![0u8; MIB as usize];
    let mut received = 0u64;
    let mut out = match to {
        Some(path) => Some(std::fs::File::create(path)?),
        None => None,
    };
    while received < size {
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        if let Some(out) = &mut out {
            out.write_all(&buffer[..n])?;
        }
        received += n as u64;
    }
    if let Some(out) = &out {
        out.sync_all()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = to {
        std::fs::remove_file(path)?;
    }
    sender.await??;
    Ok(received as f64 / seconds)
}

struct Side {
    rss_mb: f64,
    cpu_per_gib: f64,
}

struct Transfer {
    rate: f64,
    seconds: f64,
    downloader: Side,
    holder: Side,
    sources: Value,
}

fn side(pid: u32, cpu_before: f64, bytes: u64) -> Side {
    let gib = bytes as f64 / (1024.0 * MIB as f64);
    Side {
        rss_mb: peak_rss_mb(pid),
        cpu_per_gib: (cpu_seconds(pid) - cpu_before) / gib.max(1e-9),
    }
}

/// `/get HASH` on `downloader`, timed from the command to `download_done`.
fn get(
    downloader: &mut Node,
    holder_pid: u32,
    hash: &str,
    out: &Path,
    size: u64,
) -> anyhow::Result<Transfer> {
    let cpu_d = cpu_seconds(downloader.pid());
    let cpu_h = cpu_seconds(holder_pid);
    let from = downloader.seen.len();
    let started = Instant::now();
    downloader.command(&format!("/get {hash} {}", out.display()))?;
    let done = downloader.wait_from(from, "download_done", |e| {
        e["event"] == "download_done" && e["hash"] == hash
    })?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Transfer {
        rate: size as f64 / seconds,
        seconds,
        downloader: side(downloader.pid(), cpu_d, size),
        holder: side(holder_pid, cpu_h, size),
        sources: done["sources"].clone(),
    })
}

fn gbps(rate: f64) -> String {
    format!("{:.2} GB/s", rate / 1e9)
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let teia = teia_binary(args.teia)?;
    let base = args.dir.unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("teia-bench-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("share"))?;
    std::fs::create_dir_all(work.join("share2"))?;
    let size = args.size_mib * MIB;
    let big = work.join("share/big.bin");
    println!(
        "writing a {} MiB random file in {}",
        args.size_mib,
        work.display()
    );
    random_file(&big, size, 42)?;
    std::fs::hard_link(&big, work.join("share2/big.bin"))?;
    let small = work.join("share/small.bin");
    random_file(&small, 20 * MIB, 7)?;

    let raw = raw_copy(&big, size, None).await?;
    println!(
        "raw TCP copy (1 MiB buffer, nothing verified or written): {}",
        gbps(raw)
    );
    let raw_disk = raw_copy(&big, size, Some(&work.join("raw.out"))).await?;
    println!(
        "raw TCP copy written to disk (1 MiB writes, then fsync): {}",
        gbps(raw_disk)
    );

    let assembled = assembled::get(&work, &work.join("share"), "big.bin", size).await?;
    println!(
        "/get between two nodes assembled in this process on the router (no binary): {} = \
         {:.2} of raw TCP, {:.2} of raw TCP to disk",
        gbps(assembled),
        assembled / raw,
        assembled / raw_disk
    );

    let result =
        tokio::task::spawn_blocking(move || measure(&teia, &work, size, raw, raw_disk)).await?;
    result
}

fn measure(teia: &Path, work: &Path, size: u64, raw: f64, raw_disk: f64) -> anyhow::Result<()> {
    let data = |name: &str| work.join("data").join(name);
    let share = work.join("share");
    let mut holder = Node::start(
        teia,
        &data("h1"),
        "h1",
        &[
            "--share",
            share.to_str().unwrap_or(""),
            "--peer",
            "127.0.0.1:1",
        ],
    )?;
    holder.wait("share indexed", |e| e["event"] == "shared")?;
    let mut downloader = Node::start(teia, &data("d"), "d", &["--peer", &holder.addr()])?;
    downloader.wait("link", |e| e["event"] == "link_up")?;
    let hash = downloader.search("big.bin", 1)?;
    let small_hash = downloader.search("small.bin", 1)?;

    // /get, one holder.
    let out = work.join("out1");
    let one = get(&mut downloader, holder.pid(), &hash, &out, size)?;
    println!(
        "/get (encrypted, verified, on disk): {} in {:.2} s = {:.2} of raw TCP, {:.2} of raw TCP to disk",
        gbps(one.rate),
        one.seconds,
        one.rate / raw,
        one.rate / raw_disk
    );
    println!(
        "  downloader: peak RSS {:.1} MB, {:.2} CPU-s/GiB; holder: peak RSS {:.1} MB, {:.2} CPU-s/GiB",
        one.downloader.rss_mb, one.downloader.cpu_per_gib, one.holder.rss_mb, one.holder.cpu_per_gib
    );
    std::fs::remove_dir_all(&out)?;

    // 20 MiB from /get to verified.
    let out = work.join("out-small");
    let small = get(&mut downloader, holder.pid(), &small_hash, &out, 20 * MIB)?;
    println!(
        "20 MiB from /get to verified on disk: {:.3} s",
        small.seconds
    );
    std::fs::remove_dir_all(&out)?;

    // Resume after a kill -9 at 50 %: from a holder serving 200 MB/s, so that the kill
    // lands close to the half.
    let mut slow = Node::start(
        teia,
        &data("h3"),
        "h3",
        &[
            "--share",
            share.to_str().unwrap_or(""),
            "--peer",
            "127.0.0.1:1",
            "--upload-limit",
            "200000000",
        ],
    )?;
    slow.wait("share indexed", |e| e["event"] == "shared")?;
    let mut resumer = Node::start(teia, &data("r"), "r", &["--peer", &slow.addr()])?;
    resumer.wait("link", |e| e["event"] == "link_up")?;
    resumer.search("big.bin", 1)?;
    let out = work.join("out-resume");
    let from = resumer.seen.len();
    resumer.command(&format!("/get {hash} {}", out.display()))?;
    let half = resumer.wait_from(from, "half", |e| {
        e["event"] == "download_progress"
            && e["hash"] == hash.as_str()
            && e["bytes"].as_u64().unwrap_or(0) >= size / 2
    })?;
    resumer.kill();
    let verified = half["bytes"].as_u64().unwrap_or(0);
    let mut resumer = Node::start(teia, &data("r"), "r", &["--peer", &slow.addr()])?;
    let done = resumer.wait("resumed download_done", |e| {
        e["event"] == "download_done" && e["hash"] == hash.as_str()
    })?;
    let fetched = done["fetched"].as_u64().unwrap_or(0);
    println!(
        "resume after kill -9 at {:.0} %: {:.1} % of the file fetched again",
        verified as f64 * 100.0 / size as f64,
        fetched as f64 * 100.0 / size as f64
    );
    std::fs::remove_dir_all(&out)?;
    drop(resumer);
    drop(slow);

    // Two holders.
    let share2 = work.join("share2");
    let mut second = Node::start(
        teia,
        &data("h2"),
        "h2",
        &[
            "--share",
            share2.to_str().unwrap_or(""),
            "--peer",
            "127.0.0.1:1",
        ],
    )?;
    second.wait("share indexed", |e| e["event"] == "shared")?;
    downloader.command(&format!("/connect {}", second.addr()))?;
    downloader.wait("link to h2", |e| {
        e["event"] == "link_up" && e["peer"] == "h2@bench"
    })?;
    downloader.search("big.bin", 2)?;
    let out = work.join("out2");
    let two = get(&mut downloader, holder.pid(), &hash, &out, size)?;
    let h1 = two.sources["h1@bench"].as_u64().unwrap_or(0) as f64 / size as f64;
    let h2 = two.sources["h2@bench"].as_u64().unwrap_or(0) as f64 / size as f64;
    println!(
        "two holders: {} = {:.2} of one holder's rate; h1 served {:.0} %, h2 {:.0} %",
        gbps(two.rate),
        two.rate / one.rate,
        h1 * 100.0,
        h2 * 100.0
    );
    std::fs::remove_dir_all(&out)?;
    drop(second);
    drop(downloader);
    drop(holder);

    // teia send / teia receive.
    let big = work.join("share/big.bin");
    let mut sender = Command::new(teia)
        .args([
            "send",
            "--json",
            "--no-code",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .arg(&big)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(sender.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let ticket: Value = serde_json::from_str(&line)?;
    let ticket = ticket["ticket"].as_str().context("no ticket")?.to_owned();
    let out = work.join("out-receive");
    let sender_cpu = cpu_seconds(sender.id());
    let started = Instant::now();
    let mut receiver = Command::new(teia)
        .args(["receive", &ticket, "--json", "--log", "warn", "--to"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = receiver.id();
    let mut peak = 0.0f64;
    let mut cpu = 0.0f64;
    let status = loop {
        if let Some(status) = receiver.try_wait()? {
            break status;
        }
        peak = peak.max(peak_rss_mb(pid));
        cpu = cpu.max(cpu_seconds(pid));
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("teia receive failed");
    }
    let gib = size as f64 / (1024.0 * MIB as f64);
    println!(
        "teia receive (encrypted, verified, on disk; process start included): {} in {:.2} s = \
         {:.2} of raw TCP, {:.2} of raw TCP to disk; receiver peak RSS ≥ {peak:.1} MB, \
         ≥ {:.2} CPU-s/GiB; sender peak RSS {:.1} MB, {:.2} CPU-s/GiB",
        gbps(size as f64 / seconds),
        seconds,
        size as f64 / seconds / raw,
        size as f64 / seconds / raw_disk,
        cpu / gib,
        peak_rss_mb(sender.id()),
        (cpu_seconds(sender.id()) - sender_cpu) / gib
    );
    let _ = sender.kill();
    let _ = sender.wait();
    let _ = std::fs::remove_dir_all(work);
    Ok(())
}
