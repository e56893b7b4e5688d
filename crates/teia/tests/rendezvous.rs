//! Integration tests of `teia rendezvous` against PROTOCOL.md section 2, over real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn names(answer: &Value) -> Vec<String> {
    let mut names: Vec<String> = answer["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}@{}",
                p["name"].as_str().unwrap(),
                p["namespace"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn register_discover_unregister() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr;

    let ok = request(
        addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"alice","port":7070}),
    )
    .await;
    assert_eq!(ok["status"], "OK");
    assert_eq!(ok["ttl"], 7200, "default ttl");
    assert_eq!(ok["ip"], "127.0.0.1");
    assert_eq!(ok["observed_ip"], "127.0.0.1");
    assert_eq!(ok["port"], 7070);
    assert!(ok["observed_port"].as_u64().unwrap() > 0);

    let ok = request(
        addr,
        json!({"type":"register","namespace":"UnB","name":"bob","port":"7071","ttl":"60"}),
    )
    .await;
    assert_eq!(
        ok["status"], "OK",
        "type is case-insensitive, numbers may be strings"
    );
    assert_eq!(ok["ttl"], 60);
    request(
        addr,
        json!({"type":"Register","namespace":"Giga","name":"carol","port":7072}),
    )
    .await;

    let unb = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(names(&unb), ["alice@UnB", "bob@UnB"]);
    let bob = unb["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bob")
        .unwrap();
    assert_eq!(bob["ip"], "127.0.0.1");
    assert_eq!(bob["port"], 7071);
    assert_eq!(bob["ttl"], 60);
    assert!(bob["expires_in"].as_u64().unwrap() <= 60);
    assert_eq!(bob["observed_ip"], "127.0.0.1");
    assert!(bob["observed_port"].as_u64().is_some());

    let all = request(addr, json!({"type":"DISCOVER"})).await;
    assert_eq!(names(&all), ["alice@UnB", "bob@UnB", "carol@Giga"]);
    let all = request(addr, json!({"type":"DISCOVER","namespace":""})).await;
    assert_eq!(names(&all).len(), 3);
    let none = request(addr, json!({"type":"DISCOVER","namespace":"room1"})).await;
    assert_eq!(none, json!({"status":"OK","peers":[]}));

    // Re-registering replaces port and ttl of the same record.
    request(
        addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"alice","port":9000,"ttl":30}),
    )
    .await;
    let unb = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(names(&unb).len(), 2);
    let alice = unb["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "alice")
        .unwrap();
    assert_eq!(
        (alice["port"].clone(), alice["ttl"].clone()),
        (json!(9000), json!(30))
    );

    let ok = request(
        addr,
        json!({"type":"UNREGISTER","namespace":"UnB","name":"alice","port":9000}),
    )
    .await;
    assert_eq!(ok["status"], "OK");
    let unb = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(names(&unb), ["bob@UnB"]);
}

#[tokio::test]
async fn unregister_touches_only_the_callers_ip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr;
    for source in ["127.0.0.1", "127.0.0.2"] {
        let ok = request_from(
            source,
            addr,
            json!({"type":"REGISTER","namespace":"UnB","name":"alice","port":7070}),
        )
        .await;
        assert_eq!(ok["ip"], source, "ip is the observed source address");
    }
    let both = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(
        both["peers"].as_array().unwrap().len(),
        2,
        "keyed by (ip, namespace, name)"
    );

    let ok = request_from(
        "127.0.0.3",
        addr,
        json!({"type":"UNREGISTER","namespace":"UnB","name":"alice"}),
    )
    .await;
    assert_eq!(ok["status"], "OK");
    let still = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(
        still["peers"].as_array().unwrap().len(),
        2,
        "a stranger removed nothing"
    );

    request_from(
        "127.0.0.2",
        addr,
        json!({"type":"UNREGISTER","namespace":"UnB"}),
    )
    .await;
    let left = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    let left = left["peers"].as_array().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["ip"], "127.0.0.1");
}

#[tokio::test]
async fn every_validation_error_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr;
    let long = "x".repeat(65);
    let cases = [
        (
            json!({"type":"REGISTER","namespace":"UnB","port":1}),
            "bad_name",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":long,"port":1}),
            "bad_name",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a@b","port":1}),
            "bad_name",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":42,"port":1}),
            "bad_name",
        ),
        (
            json!({"type":"REGISTER","namespace":7,"name":"a","port":1}),
            "bad_namespace",
        ),
        (
            json!({"type":"REGISTER","name":"a","port":1}),
            "bad_namespace",
        ),
        (
            json!({"type":"REGISTER","namespace":"#UnB","name":"a","port":1}),
            "bad_namespace",
        ),
        (
            json!({"type":"DISCOVER","namespace":"a*b"}),
            "bad_namespace",
        ),
        (json!({"type":"UNREGISTER"}), "bad_namespace"),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a"}),
            "bad_port",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":0}),
            "bad_port",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":70000}),
            "bad_port",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":"abc"}),
            "bad_port",
        ),
        (
            json!({"type":"UNREGISTER","namespace":"UnB","port":"abc"}),
            "bad_port",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":1,"ttl":0}),
            "bad_ttl",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":1,"ttl":86401}),
            "bad_ttl",
        ),
        (
            json!({"type":"REGISTER","namespace":"UnB","name":"a","port":1,"ttl":"soon"}),
            "bad_ttl",
        ),
        (json!({"namespace":"UnB"}), "missing_type"),
        (json!({"type":"FLY"}), "unknown_command"),
    ];
    for (req, code) in cases {
        let answer = request(addr, req.clone()).await;
        assert_error(&answer, code);
    }
    for (raw, code) in [
        (&b"{not json\n"[..], "invalid_json"),
        (b"[1,2,3]\n", "invalid_json"),
        (b"\xff\xfe\n", "invalid_json"),
        (b"\n", "empty_line"),
        (b"   \t \r\n", "empty_line"),
    ] {
        let answer = parse_answer(&exchange_from("127.0.0.1", addr, raw).await);
        assert_error(&answer, code);
    }
    let ok = request(
        addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"a","port":65535,"ttl":86400}),
    )
    .await;
    assert_eq!(ok["status"], "OK", "bounds are inclusive");
}

#[tokio::test]
async fn oversized_line_is_refused_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut big = br#"{"type":"DISCOVER","pad":""#.to_vec();
    big.resize(40_000, b'x');
    // The server may close before all of it is written; that is the point.
    let _ = stream.write_all(&big).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = parse_answer(&answer);
    assert_error(&answer, "line_too_long");
    assert_eq!(answer["limit"], 32768);

    let mut exact = br#"{"type":"DISCOVER","pad":""#.to_vec();
    exact.resize(32_765, b'x');
    exact.extend_from_slice(b"\"}\n");
    assert_eq!(exact.len(), 32_768);
    let answer = parse_answer(&exchange_from("127.0.0.1", server.addr, &exact).await);
    assert_eq!(
        answer["status"], "OK",
        "a line of exactly 32768 bytes is accepted"
    );
}

#[tokio::test]
async fn idle_connection_gets_timeout_after_five_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "not before the idle timeout"
    );
    assert_error(&parse_answer(&answer), "timeout");
}

#[tokio::test]
async fn request_without_newline_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    // A complete object with no newline, connection left open.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(br#"{"type":"DISCOVER"}"#).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parse_answer(&answer)["status"], "OK");
    // An object split in two writes, then a half-close.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(br#"{"type":"DISC"#).await.unwrap();
    stream.write_all(br#"OVER"}"#).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parse_answer(&answer)["status"], "OK");
}

#[tokio::test]
async fn limits_answer_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(
        dir.path(),
        &["--max-records-per-ip", "2", "--max-records", "3"],
    );
    let addr = server.addr;
    let reg = |name: &str| json!({"type":"REGISTER","namespace":"UnB","name":name,"port":1});
    assert_eq!(request(addr, reg("a")).await["status"], "OK");
    assert_eq!(request(addr, reg("b")).await["status"], "OK");
    let refused = request(addr, reg("c")).await;
    assert_error(&refused, "over_quota");
    assert_eq!(refused["limit"], 2);
    assert_eq!(
        request(addr, reg("b")).await["status"],
        "OK",
        "refreshing is not a new record"
    );
    assert_eq!(
        request_from("127.0.0.2", addr, reg("c")).await["status"],
        "OK"
    );
    let full = request_from("127.0.0.3", addr, reg("d")).await;
    assert_error(&full, "busy");
    assert_eq!(full["limit"], 3);
}

#[tokio::test]
async fn connection_limit_answers_busy_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(
        dir.path(),
        &["--max-connections", "1", "--idle-timeout", "120"],
    );
    // Connections are accepted in order: the holder takes the only slot.
    let _holder = TcpStream::connect(server.addr).await.unwrap();
    let busy = parse_answer(&exchange_from("127.0.0.1", server.addr, b"").await);
    assert_error(&busy, "busy");
    assert_eq!(busy["limit"], 1);
}

#[tokio::test]
async fn rate_limit_answers_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &["--rate-limit", "1"]);
    let mut limited = 0;
    for _ in 0..10 {
        let answer = request(server.addr, json!({"type":"DISCOVER"})).await;
        if answer["status"] == "ERROR" {
            assert_error(&answer, "rate_limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "ten requests in a row exceed one per second");
    let other = request_from("127.0.0.2", server.addr, json!({"type":"DISCOVER"})).await;
    assert_eq!(other["status"], "OK", "the limit is per source IP");
}

#[tokio::test]
async fn records_expire_on_time_and_memory_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &["--log", "teia_rendezvous=debug,info"]);
    let addr = server.addr;
    request(
        addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"brief","port":1,"ttl":1}),
    )
    .await;
    request(
        addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"stays","port":1,"ttl":600}),
    )
    .await;
    let line = server.process.wait_for_log("expired records reclaimed");
    assert_eq!(field(&line, "dropped"), "1");
    assert_eq!(field(&line, "remaining"), "1");
    let left = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(names(&left), ["stays@UnB"]);
}

#[tokio::test]
async fn records_survive_restart_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    assert_eq!(server.records_at_start, 0);
    request(
        server.addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"alice","port":7070,"ttl":600}),
    )
    .await;
    let status = server.process.terminate();
    assert!(status.success(), "graceful exit on SIGTERM: {status}");

    let server = Rendezvous::start(dir.path(), &[]);
    assert_eq!(server.records_at_start, 1);
    request(
        server.addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"bob","port":7071,"ttl":600}),
    )
    .await;
    server.process.kill9();

    let server = Rendezvous::start(dir.path(), &[]);
    assert_eq!(
        server.records_at_start, 2,
        "an acknowledged REGISTER survives kill -9"
    );
    let found = request(server.addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
    assert_eq!(names(&found), ["alice@UnB", "bob@UnB"]);
    for peer in found["peers"].as_array().unwrap() {
        assert_eq!(peer["ttl"], 600);
        assert!(peer["expires_in"].as_u64().unwrap() <= 600);
    }
}

#[tokio::test]
async fn remaining_ttl_keeps_counting_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    request(
        server.addr,
        json!({"type":"REGISTER","namespace":"UnB","name":"brief","port":1,"ttl":2}),
    )
    .await;
    server.process.kill9();
    let server = Rendezvous::start(dir.path(), &[]);
    assert!(server.records_at_start <= 1);
    let addr = server.addr;
    eventually("the restored record to expire", || async move {
        let answer = request(addr, json!({"type":"DISCOVER","namespace":"UnB"})).await;
        answer["peers"].as_array().unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn many_concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr;
    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(tokio::spawn(async move {
            let ns = format!("room{}", i % 4);
            let name = format!("peer{i}");
            request(
                addr,
                json!({"type":"REGISTER","namespace":ns,"name":name,"port":1000 + i}),
            )
            .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap()["status"], "OK");
    }
    let mut total = 0;
    for room in 0..4 {
        let found = request(
            addr,
            json!({"type":"DISCOVER","namespace":format!("room{room}")}),
        )
        .await;
        assert_eq!(found["peers"].as_array().unwrap().len(), 50);
        total += 50;
    }
    assert_eq!(total, 200);
}

#[tokio::test]
async fn discover_answer_never_exceeds_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr;
    for i in 0..300 {
        request(
            addr,
            json!({"type":"REGISTER","namespace":"big","name":format!("peer{i:03}"),"port":1}),
        )
        .await;
    }
    let raw = exchange_from(
        "127.0.0.1",
        addr,
        b"{\"type\":\"DISCOVER\",\"namespace\":\"big\"}\n",
    )
    .await;
    assert!(raw.len() <= 32_768, "{} bytes", raw.len());
    let answer = parse_answer(&raw);
    assert_eq!(answer["truncated"], true);
    assert_eq!(answer["total"], 300);
    let listed = answer["peers"].as_array().unwrap();
    assert!(listed.len() > 100);
    let listed: Vec<&str> = listed.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(
        listed.contains(&"peer299") && !listed.contains(&"peer000"),
        "the freshest records are kept: {listed:?}"
    );
}

#[test]
fn cli_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    let addr = server.addr.to_string();
    let run = |args: &[&str]| {
        let out = teia()
            .args(args)
            .args(["--server", &addr])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, _) = run(&[
        "rdv",
        "register",
        "--namespace",
        "UnB",
        "--name",
        "alice",
        "--port",
        "7070",
        "--ttl",
        "60",
    ]);
    assert!(ok);
    assert!(
        out.contains("registered alice@UnB on port 7070 for 60 s"),
        "{out}"
    );
    let (ok, out, _) = run(&["rdv", "discover", "--namespace", "UnB"]);
    assert!(ok);
    assert!(
        out.contains("alice@UnB") && out.contains("127.0.0.1:7070") && out.contains("1 peers"),
        "{out}"
    );
    let (ok, out, _) = run(&["rdv", "discover", "--json"]);
    assert!(ok);
    let raw: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(raw["peers"][0]["name"], "alice");
    let (ok, _, err) = run(&[
        "rdv",
        "register",
        "--namespace",
        "a b",
        "--name",
        "x",
        "--port",
        "1",
    ]);
    assert!(!ok, "an error answer fails the command");
    assert!(err.contains("bad_namespace"), "{err}");
    let (ok, out, _) = run(&["rdv", "unregister", "--namespace", "UnB", "--name", "alice"]);
    assert!(ok);
    assert!(out.contains("removed 1 record"), "{out}");

    let unreachable = teia()
        .args([
            "rdv",
            "discover",
            "--server",
            "127.0.0.1:1",
            "--timeout",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot connect"));
}

#[test]
fn help_explains_every_command() {
    let out = teia().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rendezvous") && text.contains("rdv"),
        "{text}"
    );
    let out = teia().args(["rendezvous", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--max-connections",
        "--idle-timeout",
        "--rate-limit",
        "--max-records",
        "--max-records-per-ip",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}
