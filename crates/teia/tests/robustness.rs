//! Integration tests of smaller defects found by attacking `teia node`: start-up checks,
//! error messages, a rendezvous that refuses DISCOVER before REGISTER, and peers that never
//! read. Real processes on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

use common::*;
use serde_json::{json, Value};

/// Runs `teia ARGS` to completion; returns its exit success and standard error.
fn run(args: &[&str]) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let output = teia()
        .args(args)
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_rendezvous_that_does_not_resolve_stops_the_node_as_a_bad_peer_does() {
    for flag in ["--rendezvous", "--peer"] {
        let (ok, stderr) = run(&["node", "--json", "--name", "a", flag, "nonsense"]);
        assert!(!ok, "{flag}");
        assert!(
            stderr.contains("cannot resolve") && stderr.contains("nonsense"),
            "{stderr}"
        );
    }
}

#[test]
fn bad_durations_say_what_is_allowed() {
    let (ok, stderr) = run(&["node", "--json", "--name", "a", "--ping-interval", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("above 0 and at most 86400, got 0"),
        "{stderr}"
    );
}

#[test]
fn an_error_cause_is_said_once() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let (ok, stderr) = run(&[
        "node",
        "--json",
        "--name",
        "a",
        "--listen-ip",
        "127.0.0.1",
        "--port",
        &port,
        "--peer",
        "127.0.0.1:9",
    ]);
    assert!(!ok);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    assert_eq!(line.matches("in use").count(), 1, "{line}");
}

/// A rendezvous in the style of the newer course server: DISCOVER from an address that has
/// not registered yet is refused `peer_not_registered`. It lists one peer: `listed`.
fn strict_rendezvous(listed: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let registered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let registered = std::sync::Arc::clone(&registered);
            std::thread::spawn(move || answer(stream, &registered, listed));
        }
    });
    addr
}

fn answer(mut stream: TcpStream, registered: &std::sync::atomic::AtomicBool, listed: u16) {
    use std::sync::atomic::Ordering;
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let answer = match request["type"].as_str() {
        Some("REGISTER") => {
            // The registration takes effect late, so the first DISCOVER comes first.
            std::thread::sleep(std::time::Duration::from_millis(500));
            registered.store(true, Ordering::SeqCst);
            json!({"status":"OK","ttl":60,"ip":"127.0.0.1","port":1})
        }
        Some("DISCOVER") if !registered.load(Ordering::SeqCst) => {
            json!({"status":"ERROR","error":"peer_not_registered","message":"peer_not_registered"})
        }
        Some("DISCOVER") => json!({"status":"OK","peers":[
            {"ip":"127.0.0.1","port":listed,"name":"listed","namespace":"UnB","ttl":60}
        ]}),
        _ => json!({"status":"OK"}),
    };
    let _ = stream.write_all(format!("{answer}\n").as_bytes());
}

#[test]
fn a_discover_refused_before_the_first_register_is_retried_soon() {
    let peer = NodeProcess::start("listed", "UnB", &["--peer", "127.0.0.1:9"]);
    let server = strict_rendezvous(peer.port);
    // With a 1-hour interval, only a prompt retry can find the listed peer.
    let node = NodeProcess::start(
        "alice",
        "UnB",
        &["--rendezvous", &server, "--discover-interval", "3600"],
    );
    node.wait_event("refused at first", |e| {
        e["event"] == "rendezvous_error"
            && e["error"]
                .as_str()
                .is_some_and(|s| s.contains("not_registered"))
    });
    node.wait_link("listed@UnB");
}

#[test]
fn peers_that_never_read_cannot_exhaust_memory() {
    let (_dir, rdv) = rendezvous();
    let mut node = NodeProcess::start("teia", "UnB", &["--rendezvous", &rdv.addr.to_string()]);
    let mut silent = Vec::new();
    for i in 0..30 {
        let mut stream = TcpStream::connect(node.addr()).unwrap();
        let hello = format!(
            "{{\"type\":\"HELLO\",\"peer_id\":\"slow{i}@UnB\",\"features\":[\"ack\"],\"ttl\":1}}\n"
        );
        stream.write_all(hello.as_bytes()).unwrap();
        silent.push(stream);
        node.wait_link(&format!("slow{i}@UnB"));
    }
    let mut reader = CourseClient::connect(&node.addr(), "reader@UnB");
    node.wait_link("reader@UnB");
    let big = "x".repeat(30_000);
    for _ in 0..300 {
        node.command(&format!("/pub #UnB {big}"));
    }
    node.wait_count("300 PUBs sent", 300, |e| e["event"] == "sent");
    let last = node.msg("@reader@UnB", "still served");
    let send = reader.read_until(|m| m["type"] == "SEND" && m["msg_id"] == last.as_str());
    reader.send(&json!({"type":"ACK","msg_id":send["msg_id"]}));
    node.wait_ack(&last);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", node.process.child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        peak_kb < 150 * 1024,
        "peak RSS {} MB with 30 peers that never read",
        peak_kb / 1024
    );
    node.command("/metrics");
    let metrics = node.wait_event("/metrics", |e| e["command"] == "metrics");
    assert!(
        metrics["data"]["dropped"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    drop(silent);
}

#[test]
fn a_teia_peer_that_stops_reading_is_disconnected_and_warnings_are_summarised() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let mut alice = NodeProcess::start("alice", "UnB", &["--rendezvous", &server]);
    let bob = NodeProcess::joining("bob", "UnB", &server, &alice.addr());
    let carol = NodeProcess::joining("carol", "X", &server, &alice.addr());
    alice.wait_link("bob@UnB");
    alice.wait_link("carol@X");
    // Bob hangs (as a stopped process does): it reads nothing more.
    let pid = bob.process.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let big = "x".repeat(30_000);
    for _ in 0..1_500 {
        alice.command(&format!("/pub #UnB {big}"));
    }
    let down = alice.wait_event("bob dropped", |e| {
        e["event"] == "link_down" && e["peer"] == "bob@UnB"
    });
    assert!(
        down["reason"].as_str().unwrap().contains("not reading"),
        "{down}"
    );
    // The other peer is still served.
    let msg = alice.msg("@carol@X", "ainda aqui");
    carol.wait_message(&msg);
    let warnings = alice
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("write queue full"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings for one cause"
    );
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
}

#[test]
fn teia_id_prints_the_key_the_node_proves() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let id = |args: &[&str]| {
        let output = teia()
            .arg("id")
            .args(args)
            .args(["--data-dir", dir])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = id(&[]);
    assert!(!ok && stderr.contains("--name"), "{stderr}");
    let (ok, key, _) = id(&["--name", "alice", "--namespace", "UnB"]);
    assert!(ok);
    assert_eq!(key.len(), 43, "{key}");
    assert_eq!(id(&[]).1, key, "the only node of the data directory");
    let node = NodeProcess::start_in(data, "alice", "UnB", &["--peer", "127.0.0.1:9"]);
    let ready = node.wait_event("ready", |e| e["event"] == "ready");
    assert_eq!(ready["key"], key.as_str());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = node.data_dir().join("nodes/alice@UnB.key");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let output = teia()
            .args(["id", "--name", "alice", "--namespace", "UnB", "--data-dir"])
            .arg(node.data_dir())
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("chmod 600"));
    }
}

/// A dial that reaches a program of another protocol (here one that writes a seed 003
/// `welcome`, with no newline, and waits) says so once, naming the address and what came
/// back, then backs off: no silent redial for ever.
#[test]
fn a_dial_whose_handshake_never_completes_says_what_came_back() {
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in other.incoming() {
            let Ok(mut stream) = stream else { break };
            let _ = stream
                .write_all(br#"{"type":"welcome","myPort":3001,"loopback":false,"knownHosts":[]}"#);
            held.push(stream);
        }
    });
    let node = NodeProcess::start("dialer", "robust", &["--peer", &addr]);
    let failed = node.wait_event("dial_failed", |e| {
        e["event"] == "dial_failed" && e["addr"] == addr.as_str()
    });
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("no teia handshake"), "{failed}");
    assert!(error.contains(r#"it said: {"type":"welcome""#), "{failed}");
    assert!(failed["retry_in_ms"].as_u64().unwrap() > 0, "{failed}");
}
