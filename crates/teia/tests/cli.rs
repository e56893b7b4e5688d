//! The command line a newcomer meets: `--version`, completions, `teia status` and `teia
//! reset` against real nodes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[test]
fn version_names_the_commit_and_completions_are_printed() {
    let version = teia().arg("--version").output().unwrap();
    assert!(version.status.success());
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(
        text.starts_with("teia ") && text.contains("commit"),
        "{text}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = teia().args(["completions", shell]).output().unwrap();
        assert!(script.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&script.stdout).contains("teia"),
            "{shell}"
        );
    }
}

/// `teia status --json --data-dir DIR`: one object per node.
fn status(dir: &std::path::Path) -> Vec<Value> {
    let output = teia()
        .args(["status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn status_shows_a_running_node_and_reset_waits_until_it_stops() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let alice = NodeProcess::start_in(data, "alice", "cli", &["--peer", "127.0.0.1:1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let nodes = status(&dir);
        if let Some(node) = nodes.iter().find(|n| n["updated_at"].is_u64()) {
            break node.clone();
        }
        assert!(Instant::now() < deadline, "no status: {nodes:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["peer_id"], "alice@cli");
    assert_eq!(shown["running"], true);
    assert_eq!(shown["pid"], alice.process.child.id());

    let refused = teia()
        .args([
            "reset",
            "--yes",
            "--name",
            "alice",
            "--namespace",
            "cli",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is running"));

    let data = alice.kill9();
    assert_eq!(status(data.path())[0]["running"], false);
    let reset = teia()
        .args(["reset", "--yes", "--namespace", "cli", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let left: Vec<String> = std::fs::read_dir(data.path().join("nodes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["alice@cli.key"], "the key is kept");

    let all = teia()
        .args(["reset", "--all", "--yes", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(all.status.success());
    assert!(!data.path().exists());
}

/// A data directory given as a relative path works like an absolute one: the warm
/// interpreter, which runs in another folder, starts.
#[test]
fn a_relative_data_dir_is_made_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = teia();
    command
        .current_dir(dir.path())
        .args([
            "node",
            "--name",
            "rel",
            "--no-listen",
            "--data-dir",
            "state",
        ])
        .env_remove("RUST_LOG");
    let (node, _stdin) = Process::spawn_capturing(command);
    node.wait_for_log("warm interpreter ready");
    assert!(dir.path().join("state/nodes/rel@teia.key").exists());
}
