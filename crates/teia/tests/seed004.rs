//! Seed 004 (Napster) compatibility, both ways, with a course peer written in Python from the
//! seed's messages (`tests/seed004/peer.py`): the peer joins, searches and updates a
//! `teia index`; downloads from a teia node; and a teia node downloads from it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed004/peer.py")
}

fn python() -> Command {
    let mut command = Command::new("python3");
    command.arg(peer_script());
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Index {
    process: Process,
    addr: SocketAddr,
}

fn start_index(dir: &Path, grace: &str) -> Index {
    let process = Process::spawn(&[
        "index",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--grace",
        grace,
    ]);
    let line = process.wait_for_log("index listening");
    let addr = field(&line, "addr").parse().unwrap();
    Index { process, addr }
}

/// Starts the Python course peer in `join` mode; returns it and its port.
fn join(index: &Index, folder: &Path, queries: &[&str]) -> (Process, u16) {
    let port = free_port();
    let mut command = python();
    command
        .args(["join", "127.0.0.1"])
        .arg(index.addr.port().to_string())
        .arg(port.to_string())
        .arg(folder)
        .args(queries);
    let (process, _stdin) = Process::spawn_capturing(command);
    process.wait_for_log("READY");
    (process, port)
}

#[test]
fn a_course_peer_joins_searches_and_updates_a_teia_index() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "1");
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("aula1.mp4"), b"video").unwrap();
    let (peer, port) = join(
        &index,
        folder.path(),
        &[
            "aula1.mp4",
            "nada.txt",
            "RAW:{not json",
            "UPDATE:aula1.mp4,novo.txt",
            "novo.txt",
        ],
    );
    let lines = peer.wait_for_log("SEARCH novo.txt");
    assert!(lines.ends_with(&format!("[{port}]")), "{lines}");
    peer.wait_for_log("JOIN JOIN_OK");
    peer.wait_for_log(&format!("SEARCH aula1.mp4 [{port}]"));
    peer.wait_for_log("SEARCH nada.txt []");
    let raw = peer.wait_for_log("RAW ");
    assert!(raw.contains("bad_format"), "{raw}");
    peer.wait_for_log("UPDATE UPDATE_OK");
    // The record outlives the peer by the grace time (1 s) only.
    drop(peer);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let empty = tempfile::tempdir().unwrap();
        let (probe, _) = join(&index, empty.path(), &["novo.txt"]);
        let line = probe.wait_for_log("SEARCH novo.txt");
        if line.ends_with("[]") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records never expired: {line}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(index.process);
}

#[test]
fn index_records_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "30");
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("kept.bin"), b"k").unwrap();
    let (peer, port) = join(&index, folder.path(), &[]);
    drop(peer);
    let Index { process, .. } = index;
    process.kill9();
    let index = start_index(data.path(), "30");
    let empty = tempfile::tempdir().unwrap();
    let (probe, _) = join(&index, empty.path(), &["kept.bin"]);
    probe.wait_for_log(&format!("SEARCH kept.bin [{port}]"));
}

#[test]
fn a_course_peer_downloads_from_a_teia_node_found_through_the_index() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "60");
    let share = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.path().join("lecture.bin"), &content).unwrap();
    std::fs::write(share.path().parent().unwrap().join("secret.txt"), b"no").unwrap();
    let node = NodeProcess::start(
        "holder",
        "seed",
        &[
            "--share",
            share.path().to_str().unwrap(),
            "--index",
            &index.addr.to_string(),
            "--peer",
            "127.0.0.1:1",
        ],
    );
    node.wait_event("shared", |e| e["event"] == "shared");
    index.process.wait_for_log("joined");
    let empty = tempfile::tempdir().unwrap();
    let (probe, _) = join(&index, empty.path(), &["lecture.bin"]);
    probe.wait_for_log(&format!("SEARCH lecture.bin [{}]", node.port));

    let out = tempfile::tempdir().unwrap();
    let download = |name: &str| {
        python()
            .args(["download", "127.0.0.1"])
            .arg(node.port.to_string())
            .arg(name)
            .arg(out.path())
            .output()
            .unwrap()
    };
    let got = download("lecture.bin");
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(text.contains("STATUS OK"), "{text}");
    assert!(text.contains("DECISION downloadAccepted"), "{text}");
    assert!(text.contains(&format!("SAVED {}", content.len())), "{text}");
    assert_eq!(
        std::fs::read(out.path().join("lecture.bin")).unwrap(),
        content
    );
    for escape in ["../secret.txt", "/etc/passwd", "sub/../../secret.txt"] {
        let got = download(escape);
        let text = String::from_utf8_lossy(&got.stdout);
        assert!(text.contains("STATUS fileNotFound"), "{escape}: {text}");
    }
}

#[test]
fn a_teia_node_downloads_from_a_course_peer_found_through_the_index() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "60");
    let folder = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..2_500_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(folder.path().join("aula.bin"), &content).unwrap();
    let (_peer, port) = join(&index, folder.path(), &[]);
    let mut node = NodeProcess::start(
        "fetcher",
        "seed",
        &["--index", &index.addr.to_string(), "--peer", "127.0.0.1:1"],
    );
    index.process.wait_for_log("fetcher@seed");
    node.command("/search aula.bin");
    let results = node.wait_event("results from the index", |e| {
        e["event"] == "search_results" && e["holder"] == format!("127.0.0.1:{port}")
    });
    assert_eq!(results["results"][0]["name"], "aula.bin");
    let out = tempfile::tempdir().unwrap();
    node.command(&format!("/get aula.bin {}", out.path().display()));
    let done = node.wait_event("download_done", |e| e["event"] == "download_done");
    assert_eq!(done["course_peer"], true);
    assert_eq!(done["bytes"], content.len());
    assert_eq!(std::fs::read(out.path().join("aula.bin")).unwrap(), content);
}

/// Searches the index as a course peer until the answer ends with `expected`.
fn eventually_searches(index: &Index, query: &str, expected: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let empty = tempfile::tempdir().unwrap();
        let (probe, _) = join(index, empty.path(), &[query]);
        let line = probe.wait_for_log(&format!("SEARCH {query}"));
        if line.ends_with(expected) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "index never answered {expected}: {line}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn a_teia_node_updates_the_index_when_its_shares_change_and_leaves_on_exit() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "60");
    let first = tempfile::tempdir().unwrap();
    std::fs::write(first.path().join("first.bin"), b"1").unwrap();
    let mut node = NodeProcess::start(
        "updater",
        "seed",
        &[
            "--share",
            first.path().to_str().unwrap(),
            "--index",
            &index.addr.to_string(),
            "--peer",
            "127.0.0.1:1",
        ],
    );
    let port = node.port;
    eventually_searches(&index, "first.bin", &format!("[{port}]"));
    let second = tempfile::tempdir().unwrap();
    std::fs::write(second.path().join("second.bin"), b"2").unwrap();
    node.command(&format!("/share {}", second.path().display()));
    eventually_searches(&index, "second.bin", &format!("[{port}]"));
    node.process.terminate();
    eventually_searches(&index, "first.bin", "[]");
}
