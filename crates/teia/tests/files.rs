//! Integration tests of file sharing: real `teia` processes on 127.0.0.1 searching, fetching
//! from several holders, surviving holders and downloaders that die, refusing corrupt bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Writes `size` pseudo-random bytes (seeded) to `path`, a piece at a time.
fn random_file(path: &Path, size: usize, seed: u64) {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = seed | 1;
    let mut left = size;
    let mut piece = vec![0u8; 1 << 20];
    while left > 0 {
        for byte in piece.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        let n = left.min(piece.len());
        file.write_all(&piece[..n]).unwrap();
        left -= n;
    }
    file.flush().unwrap();
}

fn same_content(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// Searches from `node` until `holders` holders answered; returns the results.
fn search(node: &mut NodeProcess, text: &str, holders: usize) -> Vec<Value> {
    node.command(&format!("/search {text}"));
    node.wait_count("search results", holders, |e| {
        e["event"] == "search_results" && e["text"] == text
    });
    node.events()
        .into_iter()
        .filter(|e| e["event"] == "search_results" && e["text"] == text)
        .flat_map(|e| e["results"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn wait_done(node: &NodeProcess, hash: &str) -> Value {
    node.wait_event("download_done", |e| {
        e["event"] == "download_done" && e["hash"] == hash
    })
}

fn share_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join(name);
    std::fs::create_dir_all(&share).unwrap();
    (dir, share)
}

fn start_holder(name: &str, share: &Path, extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--share", share.to_str().unwrap(), "--peer", "127.0.0.1:1"];
    args.extend_from_slice(extra);
    let node = NodeProcess::start(name, "files", &args);
    node.wait_event("share indexed", |e| e["event"] == "shared");
    node
}

fn start_downloader(name: &str, holders: &[&NodeProcess], extra: &[&str]) -> NodeProcess {
    let addrs: Vec<String> = holders.iter().map(|h| h.addr()).collect();
    let mut args: Vec<&str> = Vec::new();
    for addr in &addrs {
        args.extend(["--peer", addr.as_str()]);
    }
    args.extend_from_slice(extra);
    let node = NodeProcess::start(name, "files", &args);
    for holder in holders {
        node.wait_link(&holder.peer_id);
    }
    node
}

#[test]
fn search_and_fetch_across_a_relay_keeping_folders() {
    let (_a, share) = share_dir("lectures");
    random_file(&share.join("week1/Intro Video.bin"), 3 << 20, 1);
    random_file(&share.join("notes.txt"), 1000, 2);
    let alice = start_holder("alice", &share, &["--max-neighbours", "1"]);
    let carol = NodeProcess::start(
        "carol",
        "files",
        &["--peer", &alice.addr(), "--max-neighbours", "2"],
    );
    carol.wait_link("alice@files");
    let mut bob = NodeProcess::start(
        "bob",
        "files",
        &["--peer", &carol.addr(), "--max-neighbours", "1"],
    );
    bob.wait_link("carol@files");
    let results = search(&mut bob, "intro WEEK1", 1);
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["name"], "lectures/week1/Intro Video.bin");
    assert_eq!(results[0]["holder"], "alice@files");
    assert_eq!(
        bob.count(|e| e["event"] == "link_up" && e["peer"] == "alice@files"),
        0,
        "the search went through carol"
    );
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    bob.command(&format!(
        "/get \"lectures/week1/Intro Video.bin\" {}",
        out.path().display()
    ));
    let done = wait_done(&bob, &hash);
    let path = out.path().join("lectures/week1/Intro Video.bin");
    assert_eq!(done["path"], path.to_str().unwrap());
    assert_eq!(done["bytes"], 3 << 20);
    assert_eq!(done["sources"]["alice@files"], 3 << 20);
    assert!(same_content(&path, &share.join("week1/Intro Video.bin")));
    // The whole folder, structure kept.
    let results = search(&mut bob, "lectures", 1);
    assert!(results.len() >= 2, "{results:?}");
    let folder = tempfile::tempdir().unwrap();
    bob.command(&format!("/get lectures/ {}", folder.path().display()));
    bob.wait_count("both files of the folder", 3, |e| {
        e["event"] == "download_done"
    });
    assert!(same_content(
        &folder.path().join("lectures/notes.txt"),
        &share.join("notes.txt")
    ));
    assert!(same_content(
        &folder.path().join("lectures/week1/Intro Video.bin"),
        &share.join("week1/Intro Video.bin")
    ));
    bob.command("/downloads");
    bob.wait_event("downloads output", |e| {
        e["event"] == "output" && e["command"] == "downloads" && e["data"] == Value::Array(vec![])
    });
}

#[test]
fn three_holders_each_serve_part_of_a_200_mb_file() {
    let size = 200 << 20;
    let (_a, share_a) = share_dir("a");
    random_file(&share_a.join("big.bin"), size, 7);
    let (_b, share_b) = share_dir("b");
    std::fs::copy(share_a.join("big.bin"), share_b.join("big.bin")).unwrap();
    let (_c, share_c) = share_dir("c");
    std::fs::copy(share_a.join("big.bin"), share_c.join("big.bin")).unwrap();
    // Each holder serves at most 40 MB/s, so no one of them can take it all.
    let limit = ["--upload-limit", "40000000"];
    let h1 = start_holder("h1", &share_a, &limit);
    let h2 = start_holder("h2", &share_b, &limit);
    let h3 = start_holder("h3", &share_c, &limit);
    let mut downloader = start_downloader("d", &[&h1, &h2, &h3], &[]);
    let results = search(&mut downloader, "big", 3);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    // By name: the three holders name it a/, b/ and c/big.bin, one content.
    downloader.command(&format!("/get big.bin {}", out.path().display()));
    // Chat goes on during the download: bytes travel on their own streams.
    let during = downloader.msg("@h1@files", "still here?");
    downloader.wait_ack(&during);
    let done = wait_done(&downloader, &hash);
    let sources = done["sources"].as_object().unwrap();
    assert_eq!(sources.len(), 3, "{done}");
    for (holder, bytes) in sources {
        assert!(
            bytes.as_u64().unwrap() > 0,
            "{holder} served nothing: {done}"
        );
    }
    let total: u64 = sources.values().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(total, size as u64);
    assert!(same_content(
        Path::new(done["path"].as_str().unwrap()),
        &share_a.join("big.bin")
    ));
}

#[test]
fn a_holder_killed_mid_transfer_is_replaced_by_the_other() {
    let size = 60 << 20;
    let (_a, share_a) = share_dir("a");
    random_file(&share_a.join("movie.bin"), size, 3);
    let (_b, share_b) = share_dir("b");
    std::fs::copy(share_a.join("movie.bin"), share_b.join("movie.bin")).unwrap();
    let limit = ["--upload-limit", "10000000"];
    let h1 = start_holder("h1", &share_a, &limit);
    let h2 = start_holder("h2", &share_b, &limit);
    let mut downloader = start_downloader("d", &[&h1, &h2], &[]);
    let results = search(&mut downloader, "movie", 2);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    downloader.command(&format!("/get {hash} {}", out.path().display()));
    downloader.wait_event("a tenth fetched", |e| {
        e["event"] == "download_progress" && e["bytes"].as_u64().unwrap() > (size as u64) / 10
    });
    h1.kill9();
    let done = wait_done(&downloader, &hash);
    assert!(done["sources"]["h2@files"].as_u64().unwrap() > 0);
    downloader.wait_event("h1 dropped", |e| {
        e["event"] == "holder_dropped" && e["holder"] == "h1@files"
    });
    assert!(same_content(
        Path::new(done["path"].as_str().unwrap()),
        &share_b.join("movie.bin")
    ));
}

#[test]
fn a_killed_downloader_resumes_fetching_only_what_was_missing() {
    let size: u64 = 60 << 20;
    let (_a, share) = share_dir("a");
    random_file(&share.join("resume.bin"), size as usize, 5);
    let holder = start_holder("h", &share, &["--upload-limit", "15000000"]);
    let mut downloader = start_downloader("d", &[&holder], &[]);
    let results = search(&mut downloader, "resume", 1);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    downloader.command(&format!("/get {hash} {}", out.path().display()));
    let progress = downloader.wait_event("40 % fetched", |e| {
        e["event"] == "download_progress" && e["bytes"].as_u64().unwrap() > size * 4 / 10
    });
    let verified_before = progress["bytes"].as_u64().unwrap();
    let data = downloader.kill9();
    assert!(out.path().join("a/resume.bin.teia-partial").exists());
    let again = NodeProcess::start_in(data, "d", "files", &["--peer", &holder.addr()]);
    let done = wait_done(&again, &hash);
    let fetched = done["fetched"].as_u64().unwrap();
    assert!(
        fetched <= size - verified_before + (16 << 20),
        "fetched {fetched} again; {verified_before} of {size} were verified before"
    );
    assert!(same_content(
        &out.path().join("a/resume.bin"),
        &share.join("resume.bin")
    ));
}

#[test]
fn a_holder_serving_corrupt_bytes_is_dropped_and_the_file_is_still_right() {
    let size = 8 << 20;
    let (_a, good_share) = share_dir("good");
    random_file(&good_share.join("data.bin"), size, 9);
    let (_b, bad_share) = share_dir("bad");
    let bad_path = bad_share.join("data.bin");
    std::fs::copy(good_share.join("data.bin"), &bad_path).unwrap();
    let good = start_holder("good", &good_share, &["--upload-limit", "4000000"]);
    let bad = start_holder("bad", &bad_share, &[]);
    // Corrupt one byte in every chunk after it was hashed, keeping size and mtime.
    let modified = std::fs::metadata(&bad_path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&bad_path).unwrap();
    for offset in (1000..size).step_by(256 * 1024) {
        bytes[offset] ^= 0xff;
    }
    std::fs::write(&bad_path, &bytes).unwrap();
    let file = std::fs::File::options()
        .write(true)
        .open(&bad_path)
        .unwrap();
    file.set_modified(modified).unwrap();
    drop(file);
    let mut downloader = start_downloader("d", &[&good, &bad], &[]);
    let results = search(&mut downloader, "data", 2);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    downloader.command(&format!("/get {hash} {}", out.path().display()));
    let done = wait_done(&downloader, &hash);
    let dropped = downloader.wait_event("bad holder reported", |e| {
        e["event"] == "holder_dropped" && e["holder"] == "bad@files"
    });
    assert!(
        dropped["reason"].as_str().unwrap().contains("corrupt"),
        "{dropped}"
    );
    assert_eq!(done["sources"]["good@files"], size);
    assert!(same_content(
        Path::new(done["path"].as_str().unwrap()),
        &good_share.join("data.bin")
    ));
}

#[test]
fn ask_approval_approves_one_and_denies_another() {
    let (_a, share) = share_dir("s");
    random_file(&share.join("asked.bin"), 1 << 20, 11);
    let mut holder = start_holder("h", &share, &["--approve", "ask"]);
    let mut first = start_downloader("d1", &[&holder], &[]);
    let results = search(&mut first, "asked", 1);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    first.command(&format!("/get {hash} {}", out.path().display()));
    let request = holder.wait_event("approval request", |e| {
        e["event"] == "approval_request" && e["peer"] == "d1@files"
    });
    assert_eq!(request["name"], "s/asked.bin");
    holder.command(&format!("/approve {}", request["id"]));
    wait_done(&first, &hash);

    let mut second = start_downloader("d2", &[&holder], &[]);
    search(&mut second, "asked", 1);
    let out2 = tempfile::tempdir().unwrap();
    second.command(&format!("/get {hash} {}", out2.path().display()));
    let request = holder.wait_event("second approval request", |e| {
        e["event"] == "approval_request" && e["peer"] == "d2@files"
    });
    holder.command(&format!("/deny {}", request["id"]));
    let dropped = second.wait_event("told it was denied", |e| {
        e["event"] == "holder_dropped" && e["holder"] == "h@files"
    });
    assert!(dropped["reason"].as_str().unwrap().contains("denied"));
    assert!(!out2.path().join("s/asked.bin").exists());
}

#[test]
fn send_and_receive_with_a_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.pdf");
    random_file(&file, 5 << 20, 13);
    let mut sender = teia();
    sender
        .args(["send", "--json", "--no-code", "--listen", "127.0.0.1:0"])
        .arg(&file);
    let (sender, _stdin) = Process::spawn_capturing(sender);
    let line = sender.wait_for_log("\"ticket\"");
    let start = line.find('{').unwrap();
    let ticket: Value = serde_json::from_str(&line[start..]).unwrap();
    let out = dir.path().join("received");
    let status = teia()
        .args(["receive", ticket["ticket"].as_str().unwrap(), "--to"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(same_content(&out.join("report.pdf"), &file));
    // The same ticket again: the file is here, whole and verified, and not fetched again.
    let again = teia()
        .args(["receive", ticket["ticket"].as_str().unwrap(), "--to"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already here"));
    let bad = teia()
        .args(["receive", "teia1garbage", "--to"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a teia ticket"));
    // Ctrl-C stops the sender, which exits as interrupted (130); the ticket then says, at
    // once and in one sentence, that the sender is gone.
    let interrupt = std::process::Command::new("kill")
        .args(["-INT", &sender.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    assert_eq!(sender.wait_exit().code(), Some(130));
    let gone = teia()
        .args(["receive", ticket["ticket"].as_str().unwrap(), "--to"])
        .arg(dir.path().join("elsewhere"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success());
    assert!(stderr.contains("the sender cannot be reached"), "{stderr}");
}

/// A file sent with a short code: the receiver gets it with the code alone (found at the
/// rendezvous), the sender says who got what; the code is then spent. Another sender's
/// code, given with a wrong word, is refused and void: the right code no longer finds it,
/// and its ticket still works.
#[test]
fn a_short_code_gets_the_file_once_and_a_wrong_one_voids_it() {
    let (_rdv_dir, rdv) = rendezvous();
    let rdv_addr = rdv.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    random_file(&file, 300_000, 5);
    let start_sender = || {
        let mut sender = teia();
        sender
            .args([
                "send",
                "--json",
                "--listen",
                "127.0.0.1:0",
                "--rendezvous",
                &rdv_addr,
            ])
            .arg(&file);
        let (sender, stdin) = Process::spawn_capturing(sender);
        let line = sender.wait_for_log("\"ticket\"");
        let ticket: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
        (sender, stdin, ticket)
    };
    let receive = |what: &str, to: &str| {
        teia()
            .args(["receive", what, "--rendezvous", &rdv_addr, "--to"])
            .arg(dir.path().join(to))
            .output()
            .unwrap()
    };

    let (sender, _stdin, ticket) = start_sender();
    let code = ticket["code"].as_str().unwrap().to_owned();
    let got = receive(&code, "first");
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(same_content(&dir.path().join("first/notes.txt"), &file));
    let used = sender.wait_for_log("\"code_used\"");
    assert!(used.contains(&code), "{used}");
    let served = sender.wait_for_log("\"served\"");
    assert!(
        served.contains("notes.txt") && served.contains("receive-"),
        "{served}"
    );
    let again = receive(&code, "again");
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("no sender has code number"), "{said}");

    let (other, _other_stdin, other_ticket) = start_sender();
    let other_code = other_ticket["code"].as_str().unwrap().to_owned();
    let (number, words) = other_code.split_once('-').unwrap();
    let wrong_word = if words.starts_with("zebra-") {
        "yogurt"
    } else {
        "zebra"
    };
    let wrong = format!("{number}-{wrong_word}-{}", words.split_once('-').unwrap().1);
    let guessed = receive(&wrong, "guess");
    assert!(!guessed.status.success());
    let said = String::from_utf8_lossy(&guessed.stderr);
    assert!(said.contains("wrong code"), "{said}");
    assert!(!dir.path().join("guess/notes.txt").exists());
    other.wait_for_log("\"code_void\"");
    let late = receive(&other_code, "late");
    assert!(!late.status.success());
    let ticket_still = receive(other_ticket["ticket"].as_str().unwrap(), "by-ticket");
    assert!(ticket_still.status.success());
    assert!(same_content(&dir.path().join("by-ticket/notes.txt"), &file));
    let junk = receive("seven-maple-otter", "junk");
    assert!(String::from_utf8_lossy(&junk.stderr).contains("neither a code"));
}

/// With no rendezvous, a short code is found on the LAN (broadcasts kept on loopback).
#[test]
fn a_short_code_is_found_on_the_lan_without_a_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slides.txt");
    random_file(&file, 70_000, 9);
    let lan_port = free_udp_port().to_string();
    let lan = [
        "--rendezvous",
        "localhost:1",
        "--lan-broadcast",
        "127.255.255.255",
        "--lan-port",
        &lan_port,
    ];
    let mut sender = teia();
    sender
        .env_remove("TEIA_NO_LAN")
        .args(["send", "--json", "--listen", "127.0.0.1:0"])
        .args(lan)
        .arg(&file);
    let (sender, _stdin) = Process::spawn_capturing(sender);
    let line = sender.wait_for_log("\"ticket\"");
    let ticket: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    let code = ticket["code"].as_str().expect("a code with the LAN alone");
    let got = teia()
        .env_remove("TEIA_NO_LAN")
        .args(["receive", code, "--to"])
        .arg(dir.path().join("got"))
        .args(lan)
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(same_content(&dir.path().join("got/slides.txt"), &file));
    sender.wait_for_log("\"code_used\"");
}

/// Opens a `files` stream to `addr` as a fresh identity.
async fn raw_stream(addr: &str) -> teia_node::stream::DataStream {
    let us = teia_node::stream::StreamIdentity {
        identity: teia_node::identity::ephemeral().unwrap(),
        peer_id: "prober@files".into(),
    };
    teia_node::stream::open(&us, addr.parse().unwrap(), "files", None)
        .await
        .unwrap()
}

async fn reply(stream: &mut teia_node::stream::DataStream) -> Value {
    let line = stream.read_line(64 * 1024).await.unwrap().unwrap();
    serde_json::from_slice(&line).unwrap()
}

#[tokio::test]
async fn hostile_stream_requests_get_errors_and_the_node_keeps_serving() {
    let (_a, share) = share_dir("s");
    random_file(&share.join("ok.bin"), 1 << 20, 17);
    let holder = start_holder("h", &share, &[]);
    let addr = holder.addr();

    let mut stream = raw_stream(&addr).await;
    stream.write_all(b"garbage\n").await.unwrap();
    assert_eq!(reply(&mut stream).await["code"], "bad_request");

    let mut stream = raw_stream(&addr).await;
    stream
        .write_all(b"{\"op\":\"GET\",\"hash\":\"zz\"}\n")
        .await
        .unwrap();
    assert_eq!(reply(&mut stream).await["code"], "bad_request");

    let mut stream = raw_stream(&addr).await;
    let unknown = format!("{{\"op\":\"GET\",\"hash\":\"{}\"}}\n", "0".repeat(64));
    stream.write_all(unknown.as_bytes()).await.unwrap();
    assert_eq!(reply(&mut stream).await["code"], "not_found");

    let mut stream = raw_stream(&addr).await;
    stream
        .write_all(b"{\"op\":\"CHUNKS\",\"chunks\":[0]}\n")
        .await
        .unwrap();
    assert_eq!(reply(&mut stream).await["code"], "bad_request");

    let mut stream = raw_stream(&addr).await;
    stream.write_all(&vec![b'x'; 100_000]).await.unwrap();
    assert_eq!(reply(&mut stream).await["code"], "bad_request");

    // A stream opening that is not Noise is refused without harm.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"{\"type\":\"STREAM\",\"peer_id\":\"x@y\",\"service\":\"files\",\"noise\":\"!!\"}\n",
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;

    // A valid GET, then a chunk that does not exist.
    let hash = {
        let events = holder.events();
        let shared = events.iter().find(|e| e["event"] == "shared").unwrap();
        assert_eq!(shared["files"], 1);
        let mut downloader = start_downloader("d", &[&holder], &[]);
        let results = search(&mut downloader, "ok.bin", 1);
        let hash = results[0]["hash"].as_str().unwrap().to_owned();
        let out = tempfile::tempdir().unwrap();
        downloader.command(&format!("/get {hash} {}", out.path().display()));
        wait_done(&downloader, &hash);
        hash
    };
    let mut stream = raw_stream(&addr).await;
    let get = format!("{{\"op\":\"GET\",\"hash\":\"{hash}\"}}\n");
    stream.write_all(get.as_bytes()).await.unwrap();
    let ok = reply(&mut stream).await;
    assert_eq!(ok["op"], "OK");
    let outboard = ok["outboard"].as_u64().unwrap() as usize;
    while stream.buffered().len() < outboard {
        assert!(stream.fill().await.unwrap());
    }
    stream.consume(outboard);
    stream
        .write_all(b"{\"op\":\"CHUNKS\",\"chunks\":[99999]}\n")
        .await
        .unwrap();
    assert_eq!(reply(&mut stream).await["code"], "bad_request");
}

/// A holder with `--no-listen` behind a relay, and a downloader of the relay (listening or
/// not) that fetches the holder's file of `size` bytes.
fn fetch_from_a_holder_behind_a_relay(name: &str, size: usize, downloader_listens: bool) {
    let (_a, share) = share_dir("nat");
    random_file(&share.join(name), size, 21);
    let relay = NodeProcess::start("relay", "files", &["--peer", "127.0.0.1:1"]);
    let holder = NodeProcess::start(
        "holder",
        "files",
        &[
            "--no-listen",
            "--share",
            share.to_str().unwrap(),
            "--peer",
            &relay.addr(),
        ],
    );
    holder.wait_event("shared", |e| e["event"] == "shared");
    relay.wait_link("holder@files");
    let relay_addr = relay.addr();
    let mut args = vec!["--peer", relay_addr.as_str()];
    if !downloader_listens {
        args.push("--no-listen");
    }
    let mut downloader = NodeProcess::start("d", "files", &args);
    downloader.wait_link("relay@files");
    let results = search(&mut downloader, name, 1);
    let hash = results[0]["hash"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    downloader.command(&format!("/get {hash} {}", out.path().display()));
    let done = wait_done(&downloader, &hash);
    assert_eq!(done["sources"]["holder@files"], size);
    assert!(same_content(
        Path::new(done["path"].as_str().unwrap()),
        &share.join(name)
    ));
}

#[test]
fn a_holder_that_cannot_be_dialed_opens_the_stream_itself() {
    fetch_from_a_holder_behind_a_relay("behind.bin", 2 << 20, true);
}

#[test]
fn when_neither_side_can_be_dialed_a_common_neighbour_splices_the_stream() {
    fetch_from_a_holder_behind_a_relay("both.bin", 3 << 20, false);
}

/// What a node answers to a connection that asks it to splice with `token`, unasked.
fn splice_unasked(addr: &str, token: &str) -> Value {
    use std::io::{BufRead, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let request = format!("{{\"type\":\"SPLICE\",\"token\":\"{token}\"}}\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(tcp).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or(Value::Null)
}

#[test]
fn strangers_who_bring_the_same_token_are_not_spliced() {
    let relay = NodeProcess::start("relay", "files", &["--peer", "127.0.0.1:1"]);
    let addr = relay.addr();
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| splice_unasked(&addr, "same-token"));
        let second = scope.spawn(|| splice_unasked(&addr, "same-token"));
        (first.join().unwrap(), second.join().unwrap())
    });
    for answer in [first, second] {
        assert_eq!(answer["type"], "ERROR", "{answer}");
        assert_eq!(answer["code"], "unauthorized", "{answer}");
    }
}

#[test]
fn a_download_beyond_the_room_left_fails_cleanly_and_the_node_goes_on() {
    let (_a, share) = share_dir("s");
    random_file(&share.join("huge.bin"), 12 << 20, 25);
    random_file(&share.join("small.bin"), 1 << 20, 27);
    let holder = start_holder("h", &share, &[]);
    // The downloader may write files of 4 MiB at most (`ulimit -f`, in 1 KiB blocks): as a
    // disk that has 4 MiB left.
    let data = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("bash");
    command
        .args(["-c", "ulimit -f 4096 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_teia"))
        .env("TEIA_NO_LAN", "1");
    let mut downloader =
        NodeProcess::start_with(command, data, "d", "files", &["--peer", &holder.addr()]);
    downloader.wait_link("h@files");
    let results = search(&mut downloader, "bin", 1);
    let hash_of = |name: &str| {
        results.iter().find(|r| r["name"] == name).unwrap()["hash"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (huge, small) = (hash_of("s/huge.bin"), hash_of("s/small.bin"));
    let out = tempfile::tempdir().unwrap();
    downloader.command(&format!("/get {huge} {}", out.path().display()));
    let failed = downloader.wait_event("download_failed", |e| {
        e["event"] == "download_failed" && e["hash"] == huge.as_str()
    });
    assert!(
        failed["reason"].as_str().unwrap().contains("large")
            || failed["reason"].as_str().unwrap().contains("room"),
        "{failed}"
    );
    downloader.command(&format!("/get {small} {}", out.path().display()));
    wait_done(&downloader, &small);
}
