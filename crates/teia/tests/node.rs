//! Integration tests of `teia node`: real processes on 127.0.0.1 talking real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use serde_json::json;

#[test]
fn direct_chat_through_a_rendezvous() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let mut alice = NodeProcess::start("alice", "UnB", &["--rendezvous", &server]);
    let mut bob = NodeProcess::start("bob", "UnB", &["--rendezvous", &server]);
    alice.wait_link("bob@UnB");
    bob.wait_link("alice@UnB");

    let to_bob = alice.msg("@bob@UnB", "Olá Bob!");
    let got = bob.wait_message(&to_bob);
    assert_eq!(got["src"], "alice@UnB");
    assert_eq!(got["payload"], "Olá Bob!");
    assert_eq!(got["cast"], "unicast");
    alice.wait_ack(&to_bob);

    let to_alice = bob.msg("@alice@UnB", "Oi Alice");
    alice.wait_message(&to_alice);
    bob.wait_ack(&to_alice);

    bob.command("/routes");
    let routes = bob.wait_event("routes output", |e| {
        e["event"] == "output" && e["command"] == "routes"
    });
    assert_eq!(routes["data"]["neighbours"][0]["peer"], "alice@UnB");
    assert_eq!(
        bob.count(|e| e["event"] == "message" && e["msg_id"] == to_alice.as_str()),
        0
    );
    assert_eq!(
        alice.count(|e| e["event"] == "message" && e["msg_id"] == to_alice.as_str()),
        1,
        "exactly one message event"
    );

    // A bare name is one of the known peers; an unknown one is refused at once.
    bob.command("/msg alice by name");
    let sent = bob.wait_event("sent to alice by name", |e| {
        e["event"] == "sent" && e["dst"] == "alice@UnB" && e["msg_id"] != to_alice.as_str()
    });
    alice.wait_message(sent["msg_id"].as_str().unwrap());
    bob.command("/msg alcie typo");
    let refused = bob.wait_event("unknown name refused", |e| e["event"] == "command_error");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("no known peer is named alcie"),
        "{refused}"
    );
}

#[test]
fn relay_to_a_peer_that_cannot_be_dialed_and_back() {
    let bob = NodeProcess::start("bob", "UnB", &[]);
    let bob_addr = bob.addr();
    let mut alice = NodeProcess::start("alice", "UnB", &["--peer", &bob_addr]);
    // carol accepts no links, and dials no one but bob (as a peer behind NAT that keeps
    // one link out).
    let mut carol = NodeProcess::start(
        "carol",
        "UnB",
        &["--no-listen", "--max-neighbours", "1", "--peer", &bob_addr],
    );
    bob.wait_link("alice@UnB");
    bob.wait_link("carol@UnB");

    let to_carol = alice.msg("@carol@UnB", "via bob");
    let got = carol.wait_message(&to_carol);
    assert_eq!(got["src"], "alice@UnB");
    alice.wait_ack(&to_carol);
    alice.wait_event("RELAY_OK from bob", |e| {
        e["event"] == "relay" && e["via"] == "bob@UnB" && e["ok"] == true
    });

    let to_alice = carol.msg("@alice@UnB", "and back");
    alice.wait_message(&to_alice);
    carol.wait_ack(&to_alice);
    assert_eq!(
        alice.count(|e| e["event"] == "link_up" && e["peer"] == "carol@UnB"),
        0,
        "carol cannot be dialed"
    );
}

#[test]
fn namespace_cast_and_broadcast_over_several_nodes() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let mut a = NodeProcess::start("a", "UnB", &["--rendezvous", &server]);
    let b = NodeProcess::start("b", "Giga", &["--peer", &a.addr()]);
    let c = NodeProcess::start("c", "UnB", &["--peer", &b.addr()]);
    let d = NodeProcess::start("d", "UnB", &["--rendezvous", &server]);
    // PUBs are not retransmitted: wait until each sending side has its links up (on an
    // encrypted link the listener's side comes up last, when the handshake's NOISE arrives).
    a.wait_link("b@Giga");
    b.wait_link("c@UnB");
    a.wait_link("d@UnB");

    let ns = a.msg("#UnB", "para a UnB");
    c.wait_message(&ns);
    d.wait_message(&ns);
    let all = a.msg("*", "para todos");
    for node in [&b, &c, &d] {
        let got = node.wait_message(&all);
        assert_eq!(got["cast"], "broadcast");
    }
    let bare = a.msg("#Giga", "para a Giga");
    b.wait_message(&bare);
    for node in [&c, &d] {
        node.wait_message(&all);
        assert_eq!(
            node.count(|e| e["msg_id"] == bare.as_str() && e["event"] == "message"),
            0,
            "not for UnB"
        );
        assert_eq!(
            node.count(|e| e["msg_id"] == all.as_str() && e["event"] == "message"),
            1,
            "once"
        );
    }
    assert_eq!(
        b.count(|e| e["msg_id"] == ns.as_str() && e["event"] == "message"),
        0
    );
}

#[test]
fn a_node_given_one_peer_reaches_the_whole_mesh() {
    let first = NodeProcess::start("n0", "mesh", &[]);
    let mut nodes = vec![first];
    for i in 1..5 {
        let previous = nodes[i - 1].addr();
        nodes.push(NodeProcess::start(
            &format!("n{i}"),
            "mesh",
            &["--peer", &previous],
        ));
    }
    // n4 only knows n3, yet peer exchange links it with everyone.
    for i in 0..4 {
        nodes[4].wait_link(&format!("n{i}@mesh"));
    }
    // The mesh survives the loss of the peers it was built through.
    nodes.remove(3).kill9();
    nodes.remove(2).kill9();
    let msg = nodes[2].msg("@n0@mesh", "still here");
    nodes[0].wait_message(&msg);
    nodes[2].wait_ack(&msg);
}

#[test]
fn churn_kill_9_then_come_back() {
    let (_dir, rdv) = rendezvous();
    let server = rdv.addr.to_string();
    let flags = ["--rendezvous", server.as_str(), "--register-ttl", "5"];
    let alice = NodeProcess::start("alice", "UnB", &flags);
    let mut bob = NodeProcess::start("bob", "UnB", &flags);
    let carol = NodeProcess::start("carol", "UnB", &flags);
    bob.wait_link("alice@UnB");
    bob.wait_link("carol@UnB");
    alice.wait_link("carol@UnB");
    let carol_data = carol.kill9();
    bob.wait_event("carol down", |e| {
        e["event"] == "link_down" && e["peer"] == "carol@UnB"
    });
    alice.wait_event("carol down", |e| {
        e["event"] == "link_down" && e["peer"] == "carol@UnB"
    });
    let msg = bob.msg("@alice@UnB", "carol left");
    alice.wait_message(&msg);

    // Back with its data directory, hence its key: the others' pins accept it.
    let carol = NodeProcess::start_in(carol_data, "carol", "UnB", &flags);
    carol.wait_link("bob@UnB");
    let back = bob.msg("@carol@UnB", "welcome back");
    carol.wait_message(&back);
    bob.wait_ack(&back);
}

#[test]
fn course_client_chats_both_ways_and_errors_keep_the_link() {
    let mut node = NodeProcess::start("teia", "UnB", &["--send-deadline", "20"]);
    let mut client = CourseClient::connect(&node.addr(), "course@UnB");
    node.wait_link("course@UnB");

    // Course client -> teia: SEND with ttl 1, answered by ACK; PUB delivered.
    client.send(&json!({"type":"SEND","msg_id":"c1","src":"course@UnB","dst":"teia@UnB","payload":"oi teia","require_ack":true,"ttl":1}));
    let ack = client.read_until(|m| m["type"] == "ACK");
    assert_eq!(ack["msg_id"], "c1");
    node.wait_message("c1");
    client.send(&json!({"type":"PUB","msg_id":"c2","src":"course@UnB","dst":"#UnB","payload":"oi todos","require_ack":false,"ttl":1}));
    node.wait_message("c2");

    // teia -> course client: SEND acknowledged with an ACK that has only msg_id.
    let to_course = node.msg("@course@UnB", "olá curso");
    let send = client.read_until(|m| m["type"] == "SEND");
    assert_eq!(send["msg_id"], to_course.as_str());
    assert_eq!(send["payload"], "olá curso");
    client.send(&json!({"type":"ACK","msg_id":to_course}));
    node.wait_ack(&to_course);
    let all = node.msg("*", "para todos");
    let publ = client.read_until(|m| m["type"] == "PUB");
    assert_eq!(publ["msg_id"], all.as_str());

    // Errors: each answered with the right code, and the link stays up.
    let mut big = b"{\"type\":\"PUB\",\"payload\":\"".to_vec();
    big.resize(40_000, b'x');
    big.extend_from_slice(b"\"}\n");
    client.send_raw(&big);
    let error = client.read_until(|m| m["type"] == "ERROR");
    assert_eq!(error["error"], "line_too_long");
    assert_eq!(error["limit"], 32768);
    client.send_raw(b"this is not json\n");
    let error = client.read_until(|m| m["type"] == "ERROR");
    assert_eq!(error["error"], "bad_format");
    client.send(&json!({"type":"SEND","msg_id":"c3","src":"course@UnB"}));
    let error = client.read_until(|m| m["type"] == "ERROR");
    assert_eq!(
        (error["error"].clone(), error["ref"].clone()),
        (json!("bad_format"), json!("c3"))
    );
    client.send(&json!({"type":"SEND","msg_id":"c4","src":"course@UnB","dst":"ghost@UnB","payload":"?","require_ack":true,"ttl":8}));
    let error = client.read_until(|m| m["type"] == "ERROR");
    assert_eq!(
        (error["error"].clone(), error["ref"].clone()),
        (json!("no_route"), json!("c4"))
    );
    client.send(&json!({"type":"PING","msg_id":"p1","timestamp":"2025-09-21T10:30:00Z","ttl":1}));
    let pong = client.read_until(|m| m["type"] == "PONG");
    assert_eq!(pong["msg_id"], "p1");
    node.command("/conn");
    let conn = node.wait_event("conn output", |e| {
        e["event"] == "output" && e["command"] == "conn"
    });
    // Other tests' nodes may share the local rendezvous (and UnB): look for the course peer.
    let course = conn["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"] == "course@UnB")
        .cloned()
        .unwrap_or_else(|| panic!("no course peer in {conn}"));
    assert_eq!(course["teia"], false);

    // An unknown peer from the shell is reported undelivered.
    let ghost = node.msg("@ghost@UnB", "anyone?");
    let undelivered = node.wait_event("undelivered", |e| {
        e["event"] == "undelivered" && e["msg_id"] == ghost.as_str()
    });
    assert_eq!(undelivered["reason"], "no_route");
}

#[test]
fn malformed_commands_get_usage_and_help_lists_commands() {
    let mut node = NodeProcess::start("solo", "UnB", &["--peer", "127.0.0.1:1"]);
    node.command("/msg");
    node.wait_event("usage", |e| e["event"] == "usage");
    node.command("/frobnicate");
    node.wait_event("usage unknown", |e| {
        e["event"] == "usage" && e["error"].as_str().unwrap().contains("unknown command")
    });
    node.command("/help");
    let help = node.wait_event("help", |e| e["event"] == "output" && e["command"] == "help");
    for command in [
        "/peers",
        "/connect",
        "/msg",
        "/pub",
        "/routes",
        "/watch",
        "/conn",
        "/rtt",
        "/reconnect",
        "/log",
        "/help",
        "/quit",
    ] {
        assert!(
            help["data"].as_str().unwrap().contains(command),
            "{command}"
        );
    }
    node.command("/quit");
    node.wait_event("stopped", |e| e["event"] == "stopped");
    let status = node.process.wait_exit();
    assert!(status.success(), "{status}");
}

#[test]
fn a_sent_message_survives_kill_9_of_its_sender() {
    // bob's port is chosen now; bob starts only after alice has crashed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bob_addr = format!("127.0.0.1:{port}");
    let mut alice = NodeProcess::start("alice", "UnB", &["--peer", &bob_addr]);
    let msg = alice.msg("@bob@UnB", "guardado");
    let data = alice.kill9();

    let alice = NodeProcess::start_in(data, "alice", "UnB", &["--peer", &bob_addr]);
    let bob = NodeProcess::start("bob", "UnB", &["--port", &port.to_string()]);
    let got = bob.wait_message(&msg);
    assert_eq!(got["payload"], "guardado");
    alice.wait_ack(&msg);
    assert_eq!(
        bob.count(|e| e["event"] == "message" && e["msg_id"] == msg.as_str()),
        1
    );
}

/// Two nodes started at once with neither a rendezvous nor a peer race for the local
/// rendezvous's port: one runs the rendezvous, the other uses it, and they meet there.
#[test]
fn two_nodes_started_at_once_share_the_local_rendezvous() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = free.local_addr().unwrap().to_string();
    drop(free);
    let starts: Vec<_> = ["alice", "bob"]
        .into_iter()
        .map(|name| {
            let local = local.clone();
            std::thread::spawn(move || {
                NodeProcess::start(name, "race", &["--local-rendezvous", &local])
            })
        })
        .collect();
    let nodes: Vec<NodeProcess> = starts.into_iter().map(|s| s.join().unwrap()).collect();
    let [alice, bob] = nodes.as_slice() else {
        panic!("two nodes")
    };
    alice.wait_link("bob@race");
    bob.wait_link("alice@race");
}

/// A listener that cannot be bound ends the start at once, on standard error, before the
/// node links to anyone (no `ready`).
#[test]
fn a_port_in_use_stops_the_start_before_anything_runs() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let data = tempfile::tempdir().unwrap();
    for flag in [["--http", port.as_str()], ["--port", port.as_str()]] {
        let output = teia()
            .args(["node", "--json", "--name", "early", "--peer", "127.0.0.1:1"])
            .args(["--listen-ip", "127.0.0.1"])
            .args(flag)
            .arg("--data-dir")
            .arg(data.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flag:?}");
        assert!(
            stderr.contains("Address already in use"),
            "{flag:?}: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("\"ready\""),
            "{flag:?} started the node"
        );
    }
}
