//! Integration tests of the job engine's integrity on real `teia` processes: results and
//! control messages count only from proven members of the cluster (a plaintext course
//! client and a keyed node without the cluster secret change nothing), and a result only
//! from the worker holding that module's lease.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One project of `modules` test modules (`tests/test_slow_N.py`) that each take a moment,
/// then have one test pass and one fail.
fn slow_project_zip(dir: &std::path::Path, modules: usize) -> Vec<u8> {
    let source = "import time\n\ndef test_slow_pass():\n    time.sleep(2)\n\ndef test_fails():\n    assert False\n";
    let path = dir.join("projects.zip");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z:\n    for n in range(int(sys.argv[3])):\n        z.writestr('p/tests/test_slow_%d.py' % n, sys.argv[2])",
        ])
        .arg(&path)
        .arg(source)
        .arg(modules.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(&path).unwrap()
}

/// `bytes` posted as seed 000's `file` field to `addr`'s `/evaluation`: its id.
fn submit(addr: &str, bytes: &[u8]) -> u64 {
    let (status, created) = post_file(addr, "/evaluation", bytes);
    assert_eq!(status, 201, "{created}");
    created["id"].as_u64().unwrap()
}

/// A SEND from the course client `src` to `dst` carrying job message `msg`.
fn job_send(msg_id: &str, src: &str, dst: &str, msg: Value) -> Value {
    json!({"type":"SEND","msg_id":msg_id,"src":src,"dst":dst,
           "payload":{"svc":"jobs","msg":msg},"require_ack":true,"ttl":8})
}

/// A plaintext client with no key and no secret sends the owner results for its pending
/// module, takes its evaluation over, stands in an election, announces, and reports a
/// node with 999,999 passed: the evaluation ends with pytest's own counts, run by the
/// owner, which still owns it; `/stats` shows no invented node; the refusals are logged.
#[test]
fn forged_results_and_control_from_a_plaintext_client_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, http) = http_node("judge", "eval", &["--workers", "1"]);
    let id = submit(&http, &slow_project_zip(dir.path(), 1));
    let mut forger = CourseClient::connect(&owner.addr(), "forger@eval");
    owner.wait_link("forger@eval");
    let lease =
        json!({"eval":id,"project":"p","blob":"","module":"tests/test_slow_0.py","attempt":0});
    let result =
        json!({"passed":1000,"failed":0,"errors":0,"skipped":0,"seconds":0.1,"node":"forger"});
    let forged = [
        json!({"type":"TASK_RESULT","lease":lease,"result":result}),
        json!({"type":"EVALUATION_RESPONSIBILITY_UPDATE","eval":id,"owner":"forger@eval"}),
        json!({"type":"RECOVERY_ELECTION","eval":id,"candidate":"forger@eval"}),
        json!({"type":"TASK_ANNOUNCE","owner":"forger@eval","port":1,"pending":5}),
        json!({"type":"NODE_STATUS","peer_id":"forger@eval","address":"6.6.6.6:1",
               "neighbours":[],"passed":999999,"failed":0,"projects":1,"modules":1,"evaluations":[id]}),
        json!({"type":"CLUSTER_HELLO","proof":"00","port":1}),
    ];
    for (n, msg) in forged.into_iter().enumerate() {
        let msg_id = format!("forged-{n}");
        forger.send(&job_send(&msg_id, "forger@eval", &owner.peer_id, msg));
        forger.read_until(|m| m["type"] == "ACK" && m["msg_id"] == msg_id.as_str());
    }
    let detail = wait_evaluation(&http, id);
    let module = &detail["projects"]["p"]["modules"]["tests/test_slow_0.py"];
    assert_eq!(
        (module["passed"].as_u64(), module["failed"].as_u64()),
        (Some(1), Some(1)),
        "{detail}"
    );
    assert_ne!(module["node"], "forger", "{detail}");
    let (_, stats) = get(&http, "/stats");
    assert!(!stats.to_string().contains("999999"), "{stats}");
    assert!(!stats.to_string().contains("6.6.6.6"), "{stats}");
    assert_eq!(stats["nodes"].as_array().map(Vec::len), Some(1), "{stats}");
    let refused = owner
        .process
        .wait_for_log("refused: the sender is not a proven member");
    assert!(refused.contains("forger@eval"), "{refused}");
    // One line for the burst, not one per message.
    let lines = owner
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("refused: the sender is not a proven member"))
        .count();
    assert_eq!(lines, 1, "refusals are summarised");
}

/// A teia node with its own key but without the cluster secret, linked to the owner, is
/// not made a member: its CLUSTER_HELLO is refused, it is handed no module, and it is not
/// shown; a node with the secret becomes a member and runs some of the modules.
#[test]
fn a_keyed_node_without_the_secret_is_no_member_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secret = ["--cluster-secret", "our-lab"];
    let (owner, http) = http_node(
        "owner",
        "eval",
        &[&["--workers", "1"][..], &secret].concat(),
    );
    let stranger = NodeProcess::start(
        "stranger",
        "eval",
        &["--peer", &owner.addr(), "--cluster-secret", "not-ours"],
    );
    owner.wait_link("stranger@eval");
    let refused = owner
        .process
        .wait_for_log("CLUSTER_HELLO refused: the sender is not a proven member");
    assert!(refused.contains("stranger@eval"), "{refused}");
    let member = NodeProcess::start(
        "member",
        "eval",
        &[&["--peer", &owner.addr(), "--workers", "1"][..], &secret].concat(),
    );
    let proved = owner
        .process
        .wait_for_log("a node of the cluster proved itself");
    assert!(proved.contains("member@eval"), "{proved}");
    let id = submit(&http, &slow_project_zip(dir.path(), 4));
    let detail = wait_evaluation(&http, id);
    let modules = detail["projects"]["p"]["modules"].as_object().unwrap();
    assert_eq!(modules.len(), 4, "{detail}");
    assert!(modules.values().all(|m| m["passed"] == 1), "{detail}");
    let ran_on: Vec<String> = modules
        .values()
        .map(|m| m["node"].as_str().unwrap().to_owned())
        .collect();
    assert!(ran_on.contains(&member.addr()), "{detail}");
    assert!(
        ran_on
            .iter()
            .all(|n| *n == owner.addr() || *n == member.addr()),
        "{detail}"
    );
    let (_, stats) = get(&http, "/stats");
    assert!(!stats.to_string().contains(&stranger.addr()), "{stats}");
}

/// What a web page can make a browser send is refused before any code runs: a cross-site
/// multipart POST (no preflight) is answered 403 and starts no evaluation, a DNS-rebound
/// `Host` reads nothing (401); the same requests with the node's token (from its data
/// directory's `http-token`, mode 0600, or `teia token`) pass, and the course statement's
/// `curl` from this machine needs none.
#[test]
fn requests_a_web_page_makes_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (node, http) = http_node("judge", "eval", &["--workers", "1"]);
    let zip = slow_project_zip(dir.path(), 1);
    let boundary = "teiaboundary7MA4YWxkTrZu0gW";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"all.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(&zip);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let multipart = format!("Content-Type: multipart/form-data; boundary={boundary}\r\n");
    let page = format!(
        "Host: {http}\r\nOrigin: https://attacker.example\r\nSec-Fetch-Site: cross-site\r\n{multipart}"
    );
    let (status, answer) = raw_request(&http, "POST /evaluation", &page, &form);
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = raw_request(&http, "GET /evaluation", "Host: attacker.example\r\n", b"");
    assert_eq!(status, 401, "{answer}");
    let (_, list) = get(&http, "/evaluation");
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(0),
        "nothing ran: {list}"
    );

    let token_file = node.data_dir().join("http-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_teia"))
        .args(["token", "--data-dir"])
        .arg(node.data_dir())
        .output()
        .unwrap();
    let token = String::from_utf8(printed.stdout).unwrap().trim().to_owned();
    assert_eq!(
        token,
        std::fs::read_to_string(&token_file).unwrap().trim(),
        "teia token prints the node's token"
    );
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let (status, answer) = raw_request(
        &http,
        "GET /evaluation",
        &format!("Host: attacker.example\r\n{bearer}"),
        b"",
    );
    assert_eq!(status, 200, "{answer}");
    let (status, answer) =
        raw_request(&http, "POST /evaluation", &format!("{page}{bearer}"), &form);
    assert_eq!(status, 201, "{answer}");
    // The course statement's curl: loopback, loopback Host, no Origin, no token.
    let (status, created) = post_file(&http, "/evaluation", &zip);
    assert_eq!(status, 201, "{created}");
}

/// Idle connections cannot take the HTTP API: 40 connections that send nothing from one
/// address (127.0.0.2) hold at most the per-address share, a request from another address
/// is answered at once, and the idle ones are closed by the node.
#[test]
fn idle_connections_do_not_take_the_http_api() {
    let (_node, http) = http_node("judge", "eval", &[]);
    let target: std::net::SocketAddr = http.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let stream = runtime
                .block_on(connect_from("127.0.0.2", target))
                .into_std()
                .unwrap();
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            stream
        })
        .collect();
    let (status, stats) = get(&http, "/stats");
    assert_eq!(status, 200, "{stats}");
    // The node closes every idle one (at once past the share, the rest at the idle timeout).
    for mut connection in idle {
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut connection, &mut byte);
        assert!(
            matches!(read, Ok(0))
                || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "an idle connection was not closed by the node"
        );
    }
}

/// An upload aborted halfway leaves no file behind, and `GET /evaluation` pages.
#[test]
fn an_aborted_upload_leaves_nothing_and_the_list_pages() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (node, http) = http_node("judge", "eval", &["--workers", "1"]);
    let uploads = node
        .data_dir()
        .join("nodes")
        .join("judge@eval.jobs")
        .join("uploads");
    let boundary = "teiaboundary7MA4YWxkTrZu0gW";
    let head = format!(
        "POST /evaluation HTTP/1.1\r\nHost: {http}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000000\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"all.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    );
    let mut aborted = std::net::TcpStream::connect(&http).unwrap();
    aborted.write_all(head.as_bytes()).unwrap();
    let megabyte = vec![7u8; 1024 * 1024];
    for _ in 0..4 {
        aborted.write_all(&megabyte).unwrap();
    }
    // The upload is on disk while it comes...
    let deadline = Instant::now() + PATIENCE;
    while std::fs::read_dir(&uploads).map_or(0, |d| d.count()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no upload in {}",
            uploads.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...and gone once the client gives up.
    drop(aborted);
    while std::fs::read_dir(&uploads).map_or(0, |d| d.count()) > 0 {
        assert!(
            Instant::now() < deadline,
            "an aborted upload was left behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        submit(&http, &slow_project_zip(dir.path(), 1));
    }
    let (_, all) = get(&http, "/evaluation");
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let (_, first) = get(&http, "/evaluation?limit=1");
    let (_, second) = get(&http, "/evaluation?offset=1&limit=1");
    assert_eq!(first.as_array().map(Vec::len), Some(1), "{first}");
    assert_eq!(second.as_array().map(Vec::len), Some(1), "{second}");
    assert_ne!(first[0]["id"], second[0]["id"]);
}

/// A `PATH` with what a node needs but no `bwrap`: a machine without a working sandbox.
fn path_without_bubblewrap(dir: &std::path::Path) -> std::path::PathBuf {
    let bin = dir.join("bin-without-bwrap");
    std::fs::create_dir_all(&bin).unwrap();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();
    std::os::unix::fs::symlink(python, bin.join("python3")).unwrap();
    for tool in ["bash", "git", "env"] {
        for folder in ["/usr/bin", "/bin"] {
            let path = std::path::Path::new(folder).join(tool);
            if path.exists() && !bin.join(tool).exists() {
                std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
            }
        }
    }
    bin
}

/// A node without a working sandbox runs no other node's code: in a cluster, the owner's
/// modules all run on the owner; its own submission still runs, and the answer says it ran
/// without a sandbox.
#[test]
fn a_node_without_a_sandbox_runs_only_its_own_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let secret = ["--cluster-secret", "our-lab"];
    let (owner, owner_http) = http_node(
        "owner",
        "eval",
        &[&["--workers", "1"][..], &secret].concat(),
    );
    let mut bare = teia();
    bare.env("PATH", path_without_bubblewrap(dir.path()));
    let worker = NodeProcess::start_with(
        bare,
        tempfile::tempdir().unwrap(),
        "bare",
        "eval",
        &[
            &[
                "--http",
                "127.0.0.1:0",
                "--peer",
                &owner.addr(),
                "--workers",
                "2",
            ][..],
            &secret,
        ]
        .concat(),
    );
    worker
        .process
        .wait_for_log("this node runs only what is submitted to it");
    let worker_http = field(&worker.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    owner
        .process
        .wait_for_log("a node of the cluster proved itself");
    let id = submit(&owner_http, &slow_project_zip(dir.path(), 3));
    let detail = wait_evaluation(&owner_http, id);
    let modules = detail["projects"]["p"]["modules"].as_object().unwrap();
    assert!(
        modules.values().all(|m| m["node"] == owner.addr().as_str()),
        "{detail}"
    );
    let (status, created) = post_file(
        &worker_http,
        "/evaluation",
        &slow_project_zip(dir.path(), 1),
    );
    assert_eq!(status, 201, "{created}");
    assert!(
        created["warning"]
            .as_str()
            .unwrap_or_default()
            .contains("no working sandbox"),
        "{created}"
    );
    let own = wait_evaluation(&worker_http, created["id"].as_u64().unwrap());
    assert_eq!(own["tests"]["passed"], 1, "{own}");
}

/// `--keep-evaluations 1`: when a new evaluation comes, the finished ones past the newest
/// are forgotten, their folders removed.
#[test]
fn finished_evaluations_are_kept_up_to_the_count_given() {
    let dir = tempfile::tempdir().unwrap();
    let (node, http) = http_node("judge", "eval", &["--keep-evaluations", "1"]);
    let ids: Vec<u64> = (0..3)
        .map(|_| {
            let id = submit(&http, &slow_project_zip(dir.path(), 1));
            wait_evaluation(&http, id);
            id
        })
        .collect();
    let (status, _) = get(&http, &format!("/evaluation/{}", ids[0]));
    assert_eq!(status, 404, "the oldest was forgotten");
    let (_, list) = get(&http, "/evaluation");
    let listed: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{list}");
    assert!(!listed.contains(&ids[0]), "{list}");
    let folder = node
        .data_dir()
        .join("nodes")
        .join("judge@eval.jobs")
        .join("evaluations")
        .join(ids[0].to_string());
    assert!(!folder.exists(), "{} is left", folder.display());
}
