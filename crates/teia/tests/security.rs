//! Integration tests of the hardened overlay: encrypted links, pinning, authentic origins,
//! and each attack that was found to work before (impostors, spoofed origins, redial storms,
//! silent connections, terminal injection, lost messages). Real `teia` processes on
//! 127.0.0.1 over real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

/// Forwards one connection from a listening port to `target`, keeping a copy of every byte
/// in both directions.
fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(target).unwrap();
        for (mut from, mut to) in [
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
            (server, client),
        ] {
            let record = Arc::clone(&record);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

#[test]
fn bytes_between_teia_nodes_are_unreadable_on_the_wire() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let alice = NodeProcess::start("alice", "A", &["--rendezvous", &server]);
    let (proxy, seen) = recording_proxy(alice.addr());
    let mut bob = NodeProcess::joining("bob", "B", &server, &proxy);
    bob.wait_link("alice@A");
    let to_alice = bob.msg("@alice@A", "segredo-de-bob-123");
    alice.wait_message(&to_alice);
    bob.wait_ack(&to_alice);
    bob.command("/peers");
    let peers = bob.wait_event("/peers", |e| e["command"] == "peers");
    let link = &peers["data"]["links"][0];
    assert_eq!(link["peer"], "alice@A");
    assert_eq!(link["encrypted"], true, "{peers}");
    let key = alice.wait_event("ready", |e| e["event"] == "ready")["key"].clone();
    assert_eq!(link["key"], key, "bob knows alice by the key she proved");
    let wire = seen.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&wire);
    assert!(text.contains("\"HELLO\""), "the handshake is plain JSON");
    assert!(
        !text.contains("segredo-de-bob-123"),
        "a payload crossed in clear"
    );
    assert!(!text.contains("\"SEND\""), "a SEND crossed in clear");
}

#[test]
fn an_impostor_with_another_key_is_refused_and_the_real_link_stays() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let alice = NodeProcess::start("alice", "UnB", &["--rendezvous", &server]);
    let mut bob = NodeProcess::joining("bob", "X", &server, &alice.addr());
    alice.wait_link("bob@X");
    // Same peer id, another data directory, hence another key.
    let impostor = NodeProcess::joining("bob", "X", &server, &alice.addr());
    let mismatch = alice.wait_event("key_mismatch", |e| e["event"] == "key_mismatch");
    assert_eq!(mismatch["peer"], "bob@X");
    let real = bob.wait_event("ready", |e| e["event"] == "ready")["key"].clone();
    let fake = impostor.wait_event("ready", |e| e["event"] == "ready")["key"].clone();
    assert_eq!(mismatch["pinned"], real);
    assert_eq!(mismatch["offered"], fake);
    assert_eq!(
        alice.count(|e| e["event"] == "link_down" && e["peer"] == "bob@X"),
        0,
        "the real bob's link stays up"
    );
    let msg = bob.msg("@alice@UnB", "ainda aqui");
    alice.wait_message(&msg);
    assert_eq!(alice.wait_message(&msg)["src"], "bob@X");
}

#[test]
fn a_course_peer_may_only_speak_for_itself() {
    let (_dir, rdv) = rendezvous();
    let node = NodeProcess::start("teia", "UnB", &["--rendezvous", &rdv.addr.to_string()]);
    let mut client = CourseClient::connect(&node.addr(), "course@UnB");
    node.wait_link("course@UnB");
    client.send(&json!({"type":"SEND","msg_id":"spoof1","src":"carol@UnB","dst":"teia@UnB","payload":"sou a carol","require_ack":true,"ttl":8}));
    let error = client.read_until(|m| m["type"] == "ERROR");
    assert_eq!(error["error"], "unauthorized", "{error}");
    assert_eq!(error["ref"], "spoof1");
    let forged = node.wait_event("forged", |e| e["event"] == "forged");
    assert_eq!(forged["src"], "carol@UnB");
    // Speaking for itself still works, on the same link.
    client.send(&json!({"type":"SEND","msg_id":"real1","src":"course@UnB","dst":"teia@UnB","payload":"sou eu","require_ack":true,"ttl":8}));
    node.wait_message("real1");
    client.read_until(|m| m["type"] == "ACK" && m["msg_id"] == "real1");
    assert_eq!(
        node.count(|e| e["event"] == "message" && e["msg_id"] == "spoof1"),
        0
    );
}

/// A listener that accepts connections, counts them, and closes each at once.
fn closing_listener() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, count)
}

#[test]
fn a_peer_that_drops_every_connection_is_backed_off_and_given_up() {
    let (_dir, rdv) = rendezvous();
    let (bad, dials) = closing_listener();
    let node = NodeProcess::start(
        "alice",
        "UnB",
        &[
            "--rendezvous",
            &rdv.addr.to_string(),
            "--peer",
            &bad,
            "--reconnect-attempts",
            "3",
        ],
    );
    let gave_up = node.wait_event("dial_gave_up", |e| e["event"] == "dial_gave_up");
    assert_eq!(gave_up["addr"], bad.as_str());
    assert_eq!(gave_up["attempts"], 3);
    let count = dials.load(Ordering::SeqCst);
    assert_eq!(count, 4, "the first dial and 3 retries, then nothing");
}

#[test]
fn a_node_never_dials_itself() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let own = format!("127.0.0.1:{port}");
    let node = NodeProcess::start("alice", "UnB", &["--port", &port, "--peer", &own]);
    let gave_up = node.wait_event("dial_gave_up", |e| e["event"] == "dial_gave_up");
    assert_eq!(gave_up["addr"], own.as_str());
    assert_eq!(node.count(|e| e["event"] == "link_up"), 0);
}

#[test]
fn silent_connections_do_not_lock_out_a_real_peer() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let alice = NodeProcess::start("alice", "UnB", &["--rendezvous", &server]);
    let target = alice.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let attacking = Arc::clone(&stop);
    // 300 silent connections, then one more every time the node closes one.
    let (under_way, attack_started) = std::sync::mpsc::channel();
    let attacker = std::thread::spawn(move || {
        let mut open = std::collections::VecDeque::new();
        let mut made = 0;
        while !attacking.load(Ordering::SeqCst) && made < 20_000 {
            if let Ok(stream) = TcpStream::connect(&target) {
                open.push_back(stream);
                made += 1;
                if made == 300 {
                    let _ = under_way.send(());
                }
            }
            if open.len() > 300 {
                open.pop_front();
            }
        }
        made
    });
    attack_started.recv_timeout(PATIENCE).unwrap();
    let bob = NodeProcess::joining("bob", "X", &server, &alice.addr());
    bob.wait_link("alice@UnB");
    alice.wait_link("bob@X");
    stop.store(true, Ordering::SeqCst);
    let made = attacker.join().unwrap();
    assert!(made >= 300, "the attack ran ({made} connections)");
}

#[test]
fn peer_text_cannot_paint_the_terminal() {
    let (_dir, rdv) = rendezvous();
    let data = tempfile::tempdir().unwrap();
    let mut command = teia();
    command
        .args([
            "node",
            "--name",
            "teia",
            "--namespace",
            "UnB",
            "--listen-ip",
            "127.0.0.1",
        ])
        .args(["--rendezvous", &rdv.addr.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("RUST_LOG");
    let (node, _stdin) = Process::spawn_capturing(command);
    let ready = node.wait_for_log("accepting links on");
    let addr = ready
        .split("accepting links on ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");
    let mut client = CourseClient::connect(&addr, "mallory@UnB");
    let payload = "\u{1b}[2J\u{1b}]0;pwned\u{7}\r\n[carol@UnB] me manda a senha";
    client.send(&json!({"type":"SEND","msg_id":"inject","src":"mallory@UnB","dst":"teia@UnB","payload":payload,"require_ack":true,"ttl":8}));
    let line = node.wait_for_log("pwned");
    assert!(line.starts_with("[mallory@UnB] "), "{line:?}");
    assert!(
        line.contains("\\u{1b}[2J"),
        "escape shown, not obeyed: {line:?}"
    );
    assert!(line.contains("\\r\\n[carol@UnB]"), "no fake line: {line:?}");
    assert!(
        !line.contains('\u{1b}') && !line.contains('\u{7}'),
        "{line:?}"
    );
}

#[test]
fn a_relayed_send_is_acknowledged_by_a_course_peer_through_the_relay() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let relay = NodeProcess::start("relay", "UnB", &["--rendezvous", &server]);
    let mut alice = NodeProcess::joining("alice", "X", &server, &relay.addr());
    alice.wait_link("relay@UnB");
    let mut client = CourseClient::connect(&relay.addr(), "course@UnB");
    relay.wait_link("course@UnB");
    let msg = alice.msg("@course@UnB", "oi curso");
    let send = client.read_until(|m| m["type"] == "SEND");
    assert_eq!(send["msg_id"], msg.as_str());
    assert_eq!(send["src"], "alice@X");
    // The course client's ACK names no destination.
    client.send(&json!({"type":"ACK","msg_id":msg}));
    let ack = alice.wait_ack(&msg);
    assert_eq!(ack["from"], "course@UnB");
}

#[test]
fn a_burst_to_a_course_client_that_reads_one_line_per_read_all_arrives() {
    let (_dir, rdv) = rendezvous();
    let mut node = NodeProcess::start("teia", "UnB", &["--rendezvous", &rdv.addr.to_string()]);
    let mut client = TcpStream::connect(node.addr()).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client
        .write_all(
            b"{\"type\":\"HELLO\",\"peer_id\":\"course@UnB\",\"features\":[\"ack\"],\"ttl\":1}\n",
        )
        .unwrap();
    node.wait_link("course@UnB");
    let sent: Vec<String> = (0..50)
        .map(|i| node.msg("@course@UnB", &format!("m{i}")))
        .collect();
    for i in 0..10 {
        node.command(&format!("/pub #UnB p{i}"));
    }
    // Like the course's clients: one recv, the first line kept, the rest lost.
    let mut sends = std::collections::HashSet::new();
    let mut pubs = std::collections::HashSet::new();
    let mut buf = [0u8; 4096];
    while sends.len() < 50 || pubs.len() < 10 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "closed");
        let first = buf[..n].split(|b| *b == b'\n').next().unwrap();
        let Ok(message) = serde_json::from_slice::<Value>(first) else {
            continue;
        };
        match message["type"].as_str() {
            Some("SEND") => {
                let id = message["msg_id"].as_str().unwrap().to_owned();
                client
                    .write_all(format!("{{\"type\":\"ACK\",\"msg_id\":\"{id}\"}}\n").as_bytes())
                    .unwrap();
                sends.insert(id);
            }
            Some("PUB") => {
                pubs.insert(message["payload"].as_str().unwrap().to_owned());
            }
            _ => {}
        }
    }
    for id in &sent {
        node.wait_ack(id);
    }
}

#[test]
fn acknowledged_messages_survive_kill_9_of_the_receiver() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let mut alice = NodeProcess::start("alice", "UnB", &["--rendezvous", &server]);
    let bob = NodeProcess::joining("bob", "X", &server, &alice.addr());
    alice.wait_link("bob@X");
    let mut sent: Vec<String> = (0..15)
        .map(|i| alice.msg("@bob@X", &format!("a{i}")))
        .collect();
    bob.wait_message(&sent[3]);
    let (data, before) = bob.kill9_with_events();
    sent.extend((15..30).map(|i| alice.msg("@bob@X", &format!("b{i}"))));
    let bob = NodeProcess::start_in(
        data,
        "bob",
        "X",
        &["--rendezvous", &server, "--peer", &alice.addr()],
    );
    for id in &sent {
        alice.wait_ack(id);
    }
    for id in &sent {
        let shown = |events: &[Value]| {
            events
                .iter()
                .filter(|e| e["event"] == "message" && e["msg_id"] == id.as_str())
                .count()
        };
        if shown(&before) == 0 {
            bob.wait_message(id);
        }
        let total = shown(&before) + shown(&bob.events());
        assert!(total >= 1, "{id} was acknowledged but never shown");
    }
}

#[test]
fn a_second_node_with_the_same_name_and_data_dir_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let first = NodeProcess::start_in(data, "alice", "UnB", &["--rendezvous", &server]);
    let output = teia()
        .args(["node", "--json", "--name", "alice", "--namespace", "UnB"])
        .args(["--rendezvous", &server, "--data-dir"])
        .arg(first.data_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
}

#[test]
fn require_encryption_refuses_plaintext_peers_only() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let strict = NodeProcess::start(
        "strict",
        "UnB",
        &["--rendezvous", &server, "--require-encryption"],
    );
    let mut stream = TcpStream::connect(strict.addr()).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(
            b"{\"type\":\"HELLO\",\"peer_id\":\"course@UnB\",\"features\":[\"ack\"],\"ttl\":1}\n",
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.contains("\"BYE\"") && answer.contains("encryption_required"),
        "{answer}"
    );
    assert!(!answer.contains("HELLO_OK"), "{answer}");
    let teia = NodeProcess::joining("teia", "X", &server, &strict.addr());
    teia.wait_link("strict@UnB");
    assert_eq!(
        strict.count(|e| e["event"] == "link_up" && e["peer"] == "course@UnB"),
        0
    );
}
