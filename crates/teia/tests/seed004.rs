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
    join_at(index.addr.port(), folder, queries)
}

/// Starts the Python course peer in `join` mode with the index on 127.0.0.1:`index_port`.
fn join_at(index_port: u16, folder: &Path, queries: &[&str]) -> (Process, u16) {
    let port = free_port();
    let mut command = python();
    command
        .args(["join", "127.0.0.1"])
        .arg(index_port.to_string())
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

/// The seed's own index server (`tests/seed004/server.py`, its functions as the document
/// prints them) with teia nodes, both ways: a teia node sharing 81 files joins it from its
/// listen port (the server lists its folder and names it by that port), says which files
/// its UPDATE left out of the server's one 1,024-byte read, and serves a course peer that
/// found it there; another teia node finds the course peer's file through the server and
/// downloads it.
#[test]
fn the_seeds_own_index_server_works_with_teia_nodes_both_ways() {
    let server_port = free_port();
    let mut server = Command::new("python3");
    server
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed004/server.py"))
        .arg(server_port.to_string());
    let (server, _server_stdin) = Process::spawn_capturing(server);
    server.wait_for_log("READY");
    let index = format!("127.0.0.1:{server_port}");

    let shared = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(shared.path().join("aula.bin"), &content).unwrap();
    for n in 0..80 {
        let name = format!("zz-handout-of-week-{n:02}.txt");
        std::fs::write(shared.path().join(name), b"notes").unwrap();
    }
    let holder = NodeProcess::start(
        "holder",
        "seed",
        &[
            "--share",
            shared.path().to_str().unwrap(),
            "--index",
            &index,
            "--peer",
            "127.0.0.1:1",
        ],
    );
    server.wait_for_log(&format!("Peer 127.0.0.1:{} adicionado", holder.port));
    let warning = holder.wait_event("the files left out", |e| {
        e["event"] == "files_warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("left out"))
    });
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("zz-handout-of-week-"),
        "{warning}"
    );

    let course = tempfile::tempdir().unwrap();
    std::fs::write(course.path().join("lecture.pdf"), b"%PDF course notes").unwrap();
    let (_peer, peer_port) = join_at(server_port, course.path(), &["aula.bin"]);
    _peer.wait_for_log(&format!("SEARCH aula.bin [{}]", holder.port));
    let out = tempfile::tempdir().unwrap();
    let mut download = python();
    download
        .args(["download", "127.0.0.1"])
        .arg(holder.port.to_string())
        .arg("aula.bin")
        .arg(out.path());
    let (download, _stdin) = Process::spawn_capturing(download);
    download.wait_for_log(&format!("SAVED {}", content.len()));
    assert_eq!(std::fs::read(out.path().join("aula.bin")).unwrap(), content);

    let joined_from = server.log_len();
    let mut fetcher = NodeProcess::start(
        "fetcher",
        "seed",
        &["--index", &index, "--peer", "127.0.0.1:1"],
    );
    // The seed's index lists a peer under the port it joined from: the fetcher's listen port
    // (the fetcher shares nothing; the others joined with files).
    let (_, joined) = server.wait_for_log_after(" adicionado com os arquivos []", joined_from);
    assert!(
        joined.contains(&format!("Peer 127.0.0.1:{} adicionado", fetcher.port)),
        "the index listed the fetcher (port {}) as: {joined}\nthe fetcher's log:\n{}",
        fetcher.port,
        fetcher.process.lines().join("\n")
    );
    fetcher.command("/search lecture.pdf");
    fetcher.wait_event("the course peer's file", |e| {
        e["event"] == "search_results" && e["holder"] == format!("127.0.0.1:{peer_port}")
    });
    let got = tempfile::tempdir().unwrap();
    fetcher.command(&format!("/get lecture.pdf {}", got.path().display()));
    let done = fetcher.wait_event("download_done", |e| e["event"] == "download_done");
    assert_eq!(done["course_peer"], true, "{done}");
    assert_eq!(
        std::fs::read(got.path().join("lecture.pdf")).unwrap(),
        b"%PDF course notes"
    );
}

/// Two course peers hold `aula.bin`: one whole, one a 64 KiB copy (what the seed's single
/// `recv` leaves). `/get` takes the whole one, and says the download is unverified; with
/// the whole one gone, the short copy comes with a warning that it may be partial.
#[test]
fn a_whole_copy_is_preferred_and_a_short_one_is_called_partial() {
    let data = tempfile::tempdir().unwrap();
    let index = start_index(data.path(), "60");
    let content: Vec<u8> = (0..400_000u32).map(|i| (i * 11 % 241) as u8).collect();
    let whole = tempfile::tempdir().unwrap();
    std::fs::write(whole.path().join("aula.bin"), &content).unwrap();
    let short = tempfile::tempdir().unwrap();
    std::fs::write(short.path().join("aula.bin"), &content[..65_536]).unwrap();
    let (short_peer, short_port) = join(&index, short.path(), &[]);
    let (whole_peer, whole_port) = join(&index, whole.path(), &[]);
    let mut node = NodeProcess::start(
        "picky",
        "seed",
        &["--index", &index.addr.to_string(), "--peer", "127.0.0.1:1"],
    );
    index.process.wait_for_log("picky@seed");
    let search = |node: &mut NodeProcess| {
        node.command("/search aula.bin");
        node.wait_event("both holders", |e| {
            e["event"] == "search_results" && e["holder"] == format!("127.0.0.1:{short_port}")
        });
    };
    search(&mut node);
    let first = tempfile::tempdir().unwrap();
    node.command(&format!("/get aula.bin {}", first.path().display()));
    let done = node.wait_event("download_done", |e| e["event"] == "download_done");
    assert_eq!(done["bytes"], content.len(), "{done}");
    assert_eq!(done["unverified"], true, "{done}");
    assert!(done["expected_size"].is_null(), "{done}");
    assert!(
        done["sources"]
            .get(format!("127.0.0.1:{whole_port}"))
            .is_some(),
        "{done}"
    );
    assert_eq!(
        std::fs::read(first.path().join("aula.bin")).unwrap(),
        content
    );

    drop(whole_peer);
    let second = tempfile::tempdir().unwrap();
    let before = node.count(|e| e["event"] == "download_done");
    node.command(&format!("/get aula.bin {}", second.path().display()));
    node.wait_count("download_done", before + 1, |e| {
        e["event"] == "download_done"
    });
    let partial = node
        .events()
        .into_iter()
        .rev()
        .find(|e| e["event"] == "download_done")
        .unwrap();
    assert_eq!(partial["bytes"], 65_536, "{partial}");
    assert_eq!(partial["expected_size"], content.len(), "{partial}");
    drop(short_peer);
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

/// One JOIN of a teia node as a flood from `source` sends it: `files` names, the last one
/// `comum.bin`.
fn flood_join(source: &str, n: usize, files: usize) -> Vec<u8> {
    let mut names: Vec<String> = (0..files.saturating_sub(1))
        .map(|j| format!("f{n:05}-{j:05}-{:06}x", (n * 7919 + j * 104_729) % 999_983))
        .collect();
    names.push("comum.bin".into());
    serde_json::json!({"method":"JOIN","data":{"teia":1,
        "peer":{"peer_id":format!("flood-{source}-{n}"),"key":"k".repeat(43),"port":1},
        "files":names}})
    .to_string()
    .into_bytes()
}

/// Reads one answer of the index: `JOIN_OK` or a JSON object.
async fn index_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("the index answers")
            .unwrap();
        assert!(n > 0, "the index closed: {answer:?}");
        answer.extend_from_slice(&buffer[..n]);
        if answer == b"JOIN_OK" || serde_json::from_slice::<serde_json::Value>(&answer).is_ok() {
            return String::from_utf8(answer).unwrap();
        }
    }
}

/// The answers' kinds: `JOIN_OK`, or the error code.
fn kind(answer: &str) -> String {
    if answer == "JOIN_OK" {
        return answer.into();
    }
    let value: serde_json::Value = serde_json::from_str(answer).unwrap();
    if value["status"] == "JOIN_OK" {
        return "JOIN_OK".into();
    }
    assert_eq!(value["status"], "ERROR", "{answer}");
    value["error"].as_str().unwrap().to_owned()
}

/// Floods the index at `addr` from `source` with `count` JOINs of `files` files each, on
/// `tasks` connections at once; the connections of the first `live` JOINs of each task stay
/// open until the flood ends. Sends each answer's kind on `progress` as it comes; returns
/// them all.
fn flood(
    addr: SocketAddr,
    source: &'static str,
    count: usize,
    files: usize,
    tasks: usize,
    live: usize,
    progress: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut running = Vec::new();
            for task in 0..tasks {
                let progress = progress.clone();
                running.push(tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let (mut kinds, mut kept) = (Vec::new(), Vec::new());
                    for n in (task..count).step_by(tasks) {
                        let mut stream = connect_from(source, addr).await;
                        stream
                            .write_all(&flood_join(source, n, files))
                            .await
                            .unwrap();
                        let answer = kind(&index_answer(&mut stream).await);
                        let _ = progress.send(answer.clone());
                        kinds.push(answer);
                        if kept.len() < live {
                            kept.push(stream);
                        }
                    }
                    (kinds, kept)
                }));
            }
            let mut kinds = Vec::new();
            let mut kept = Vec::new();
            for task in running {
                let (k, s) = task.await.unwrap();
                kinds.extend(k);
                kept.extend(s);
            }
            drop(kept);
            kinds
        })
    })
}

/// The peak resident memory of a process, in bytes (`VmHWM` of /proc/PID/status).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn a_flood_from_one_address_is_capped_and_a_course_peer_still_finds_its_file() {
    let data = tempfile::tempdir().unwrap();
    let process = Process::spawn(&[
        "index",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--grace",
        "600",
        "--max-memory",
        "32",
    ]);
    let line = process.wait_for_log("index listening");
    let index = Index {
        addr: field(&line, "addr").parse().unwrap(),
        process,
    };
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("aula-rara.mp4"), b"video").unwrap();
    let (_peer, port) = join(&index, folder.path(), &[]);

    // 60 JOINs of 2,500 files (about 1.2 MB counted each) from 127.0.0.7, four at once, the
    // first three of each kept connected: that address's share is 8 MiB.
    let (progress, answers) = std::sync::mpsc::channel();
    let one = flood(index.addr, "127.0.0.7", 60, 2_500, 4, 3, progress.clone());
    // 100 empty JOINs from 127.0.0.8, all kept connected: 64 peers per address.
    let many = flood(index.addr, "127.0.0.8", 100, 1, 4, 25, progress.clone());
    // 40 JOINs like the first from each of four more addresses, six of each kept connected:
    // together they pass the 32 MiB of the whole index.
    let others: Vec<_> = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .into_iter()
        .map(|source| flood(index.addr, source, 40, 2_500, 2, 3, progress.clone()))
        .collect();
    drop(progress);
    // While it goes on, once the caps have refused something, a course peer searches.
    loop {
        let answer = answers.recv_timeout(PATIENCE).expect("flood answers");
        if answer != "JOIN_OK" {
            break;
        }
    }
    let empty = tempfile::tempdir().unwrap();
    let (probe, _) = join(&index, empty.path(), &["aula-rara.mp4"]);
    probe.wait_for_log(&format!("SEARCH aula-rara.mp4 [{port}]"));

    let one = one.join().unwrap();
    assert_eq!(one.len(), 60);
    assert!(one.iter().all(|k| k == "JOIN_OK" || k == "full"), "{one:?}");
    // Twelve records kept connected do not fit in 8 MiB: some were refused.
    assert!(one.iter().any(|k| k == "full"), "{one:?}");
    let many = many.join().unwrap();
    let ok = many.iter().filter(|k| *k == "JOIN_OK").count();
    assert_eq!(ok, 64, "{many:?}");
    assert!(
        many.iter().all(|k| k == "JOIN_OK" || k == "busy"),
        "{many:?}"
    );
    let others: Vec<String> = others.into_iter().flat_map(|f| f.join().unwrap()).collect();
    assert!(
        others.iter().all(|k| k == "JOIN_OK" || k == "full"),
        "{others:?}"
    );
    assert!(others.iter().any(|k| k == "full"), "{others:?}");

    // The bound held in the process: never more than 32 MiB counted, and its memory with it.
    let mut most = 0;
    for line in index.process.lines() {
        if line.contains(" joined ") {
            let bytes: usize = field(&line, "bytes").parse().unwrap();
            assert!(bytes <= 32 << 20, "{line}");
            most = most.max(bytes);
        }
    }
    let peak = peak_rss(index.process.child.id());
    eprintln!(
        "the index counted {} MiB at most; its peak resident memory: {} MiB",
        most >> 20,
        peak >> 20
    );
    assert!(peak < 160 << 20, "the index took {peak} bytes");

    // After the flood: the course peer's file, and the flood's records that were kept.
    let (probe, _) = join(&index, empty.path(), &["aula-rara.mp4", "comum.bin"]);
    probe.wait_for_log(&format!("SEARCH aula-rara.mp4 [{port}]"));
    probe.wait_for_log("SEARCH comum.bin [1]");
}

#[test]
fn the_index_database_stays_within_its_bound() {
    let data = tempfile::tempdir().unwrap();
    let process = Process::spawn(&[
        "index",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--max-disk",
        "2",
    ]);
    let line = process.wait_for_log("index listening");
    let index = Index {
        addr: field(&line, "addr").parse().unwrap(),
        process,
    };
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("pequeno.txt"), b"p").unwrap();
    let (_peer, port) = join(&index, folder.path(), &[]);
    // 40 records of 2,500 files (about 125 KB each in the database), all kept connected.
    let (progress, _answers) = std::sync::mpsc::channel();
    let kinds = flood(index.addr, "127.0.0.9", 40, 2_500, 2, 20, progress)
        .join()
        .unwrap();
    assert!(
        kinds.iter().all(|k| k == "JOIN_OK" || k == "full"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "full"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "JOIN_OK"), "{kinds:?}");
    let size = std::fs::metadata(data.path().join("index/index.sqlite3"))
        .unwrap()
        .len();
    assert!(size <= 2 << 20, "the database takes {size} bytes");
    // It still answers, from what it holds.
    let empty = tempfile::tempdir().unwrap();
    let (probe, _) = join(&index, empty.path(), &["pequeno.txt", "comum.bin"]);
    probe.wait_for_log(&format!("SEARCH pequeno.txt [{port}]"));
    probe.wait_for_log("SEARCH comum.bin [1]");
}
