//! `teia status` and `teia reset`. A running node holds its lock file and rewrites a status
//! file beside it every [`STATUS_EVERY`] (`nodes/PEER.status.json`: its addresses, peers,
//! downloads, evaluations and jobs); `teia status` shows the nodes whose lock is held, from
//! those files. `teia reset` removes a stopped node's files (its key only when asked), or
//! the whole data directory.
//!
//! **Bounds**: a status file is read up to [`MAX_STATUS`] bytes; a node writes at most
//! [`PEERS_LISTED`] peers and [`DOWNLOADS_LISTED`] downloads into it (with their counts).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{data_dir, node_file};
use crate::cli::{ResetArgs, StatusArgs};
use crate::commands::eval::at;

/// How often a running node rewrites its status file.
pub(crate) const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Bytes of a status file read at most.
const MAX_STATUS: u64 = 64 * 1024;
/// Peers a status file names at most.
pub(crate) const PEERS_LISTED: usize = 32;
/// Downloads a status file describes at most.
pub(crate) const DOWNLOADS_LISTED: usize = 16;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes a status file whole or not at all (to a file beside, then renamed).
pub(crate) async fn write(path: &Path, status: &Value) -> std::io::Result<()> {
    let partial = path.with_extension("json.part");
    tokio::fs::write(&partial, status.to_string()).await?;
    tokio::fs::rename(&partial, path).await
}

/// Whether the node whose lock file is `lock` runs: a process holds the lock.
fn running(lock: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(lock) else {
        return false;
    };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// The peer ids of the nodes that ran with `dir`, from their lock files, sorted.
fn nodes(dir: &Path) -> Vec<String> {
    let mut peers: Vec<String> = std::fs::read_dir(dir.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "lock"))
        .filter_map(|path| Some(path.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    peers.sort();
    peers
}

/// A running node's status file, if it is readable.
fn read_status(path: &Path) -> Option<Value> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_STATUS).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// `teia status`.
pub fn show(args: StatusArgs) -> anyhow::Result<()> {
    let dir = data_dir(args.data_dir)?;
    let peers = nodes(&dir);
    if peers.is_empty() {
        if args.json {
            return Ok(());
        }
        println!(
            "no node has run with data directory {}; start one with `teia node --name NAME`",
            dir.display()
        );
        return Ok(());
    }
    for peer in peers {
        let is_running = running(&node_file(&dir, &peer, "lock"));
        let status = is_running
            .then(|| read_status(&node_file(&dir, &peer, "status.json")))
            .flatten();
        if args.json {
            let mut object = status.unwrap_or_else(|| json!({"peer_id": peer}));
            if let Some(map) = object.as_object_mut() {
                map.insert("running".into(), is_running.into());
                map.insert("data_dir".into(), json!(dir));
            }
            println!("{object}");
            continue;
        }
        print_node(&dir, &peer, is_running, status.as_ref());
    }
    Ok(())
}

/// Where a node's files are, as a pattern (`DIR/nodes/PEER.*`).
fn data_files(dir: &Path, peer: &str) -> String {
    let stem = node_file(dir, peer, "").display().to_string();
    format!("{}.*", stem.trim_end_matches('.'))
}

/// One node, in text.
fn print_node(dir: &Path, peer: &str, is_running: bool, status: Option<&Value>) {
    let clean = crate::present::clean;
    if !is_running {
        println!("{}  stopped", clean(peer));
        println!("  data: {}", data_files(dir, peer));
        return;
    }
    let Some(status) = status else {
        println!(
            "{}  running (it has not written its status yet)",
            clean(peer)
        );
        return;
    };
    let now = unix_now();
    let up = now.saturating_sub(at(status, "started_at").as_u64().unwrap_or(now));
    println!(
        "{}  running (pid {}) for {}",
        clean(peer),
        at(status, "pid"),
        human_duration(up)
    );
    let stale = now.saturating_sub(at(status, "updated_at").as_u64().unwrap_or(now));
    if stale > 3 * STATUS_EVERY.as_secs() {
        println!("  ! its status was last written {stale} s ago: the node may be stuck");
    }
    let text = |key: &str| at(status, key).as_str().map(clean);
    let mut addresses = Vec::new();
    if let Some(listen) = text("listen") {
        addresses.push(format!("links on {listen}"));
    }
    if let Some(http) = text("http") {
        addresses.push(format!("HTTP API http://{http}"));
    }
    if let Some(rendezvous) = text("rendezvous") {
        addresses.push(format!("rendezvous {rendezvous}"));
    }
    if !addresses.is_empty() {
        println!("  {}", addresses.join("; "));
    }
    let peers: Vec<String> = at(status, "peers")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(clean)
        .collect();
    let count = at(status, "peer_count")
        .as_u64()
        .unwrap_or(peers.len() as u64);
    match peers.is_empty() {
        true => println!("  peers: none linked"),
        false => println!("  peers ({count}): {}", peers.join(", ")),
    }
    for download in at(status, "downloads").as_array().into_iter().flatten() {
        let bytes = at(download, "bytes").as_u64().unwrap_or(0);
        let done = match at(download, "size").as_u64() {
            Some(size) if size > 0 => format!("{} %", bytes * 100 / size),
            _ => format!("{bytes} bytes"),
        };
        println!(
            "  downloading {}: {done}",
            clean(at(download, "name").as_str().unwrap_or("?"))
        );
    }
    if let Some(unfinished) = at(status, "evaluations_unfinished").as_u64() {
        println!("  evaluations under way: {unfinished}");
    }
    if let (Some(queued), Some(running)) = (
        at(status, "jobs_queued").as_u64(),
        at(status, "jobs_running").as_u64(),
    ) {
        println!("  script jobs: {queued} queued, {running} running");
    }
    println!("  data: {}", data_files(dir, peer));
    match text("log") {
        Some(log) => println!("  log: {log}"),
        None => println!("  log: on its standard error"),
    }
}

/// `3 min`, `2 h 5 min`, `12 s`.
fn human_duration(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=3599 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Asks before removing `what`; `--yes` answers for the user, and without a terminal it is
/// required.
fn confirm(what: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("reset removes {what}: add --yes to do it without a terminal to confirm on");
    }
    print!("remove {what}? [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("nothing removed");
    }
    Ok(())
}

/// `teia reset`.
pub fn reset(args: ResetArgs) -> anyhow::Result<()> {
    let dir = data_dir(args.home.data_dir.clone())?;
    if args.all {
        let live: Vec<String> = nodes(&dir)
            .into_iter()
            .filter(|peer| running(&node_file(&dir, peer, "lock")))
            .collect();
        if !live.is_empty() {
            bail!(
                "still running with {}: {}; stop them first (/quit in their shell, or Ctrl-C)",
                dir.display(),
                live.join(", ")
            );
        }
        if !dir.exists() {
            println!("{} does not exist: nothing to remove", dir.display());
            return Ok(());
        }
        confirm(&format!("{} and everything in it", dir.display()), args.yes)?;
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
        println!("removed {}", dir.display());
        return Ok(());
    }
    let peer = match &args.name {
        Some(name) => args.home.peer_id(name)?,
        None => match nodes(&dir).as_slice() {
            [] => bail!("no node has run with data directory {}", dir.display()),
            [only] => only.clone(),
            several => bail!(
                "several nodes ran with {} ({}): choose one with --name NAME --namespace NS, or \
                 --all",
                dir.display(),
                several.join(", ")
            ),
        },
    };
    if running(&node_file(&dir, &peer, "lock")) {
        bail!("node {peer} is running: stop it first (/quit in its shell, or Ctrl-C)");
    }
    let prefix = node_file(&dir, &peer, "")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = format!("{prefix}key");
    let mut doomed: Vec<PathBuf> = std::fs::read_dir(dir.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && (args.identity || name != key)
        })
        .map(|entry| entry.path())
        .collect();
    doomed.sort();
    if doomed.is_empty() {
        println!("node {peer} has no state to remove");
        return Ok(());
    }
    let names: Vec<String> = doomed
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    confirm(
        &format!(
            "node {peer}'s {} in {}",
            names.join(", "),
            dir.join("nodes").display()
        ),
        args.yes,
    )?;
    for path in &doomed {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    match args.identity {
        true => println!("removed node {peer}'s state and identity"),
        false => println!("removed node {peer}'s state (its key is kept: --identity removes it)"),
    }
    Ok(())
}
