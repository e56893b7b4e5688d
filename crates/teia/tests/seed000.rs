//! Seed 000's distributed pytest network: a teia worker (`teia worker --pytest-compat`) in a
//! network whose owner is a node written from the protocol (`tests/seed000/owner.py`): it
//! joins, keeps the id given, takes modules only in answer to its requests, fetches the
//! project over the owner's HTTP API, runs the modules in the sandbox, and posts counts that
//! the owner accepts from the worker that confirmed them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::{free_port, free_udp_port, Process};

/// A project whose modules give known counts: 3 passed and 1 failed, 2 passed, and 1
/// passed with 1 error in a fixture.
fn project(dir: &Path) {
    let tests = dir.join("tests");
    std::fs::create_dir_all(&tests).unwrap();
    std::fs::write(
        tests.join("test_a.py"),
        "def test_1(): assert 1\ndef test_2(): assert 1\ndef test_3(): assert 1\n\
         def test_4(): assert 0\n",
    )
    .unwrap();
    std::fs::write(
        tests.join("test_b.py"),
        "def test_1(): assert 1\ndef test_2(): assert 1\n",
    )
    .unwrap();
    std::fs::write(
        tests.join("test_c.py"),
        "import pytest\n@pytest.fixture\ndef broken(): raise RuntimeError('no')\n\
         def test_1(): assert 1\ndef test_2(broken): assert 1\n",
    )
    .unwrap();
}

fn owner(udp: u16, http: u16, project: &Path, failure_after: Option<u32>) -> Process {
    let mut command = Command::new("python3");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed000/owner.py"))
        .arg(udp.to_string())
        .arg(http.to_string())
        .arg(project)
        .args(failure_after.map(|s| s.to_string()));
    let (process, _stdin) = Process::spawn_capturing(command);
    process.wait_for_log("READY");
    process
}

#[test]
fn a_teia_worker_runs_the_modules_of_a_seed000_owner_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let project_dir = dir.path().join("calc");
    project(&project_dir);
    let udp = free_udp_port();
    let owner = owner(udp, free_port(), &project_dir, None);

    let data = tempfile::tempdir().unwrap();
    let worker = Process::spawn(&[
        "worker",
        "--pytest-compat",
        &format!("127.0.0.1:{udp}"),
        "--advertise-ip",
        "127.0.0.1",
        "--slots",
        "2",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let joined = owner.wait_for_log("CONNECT 127.0.0.1:");
    let given = joined.split_whitespace().nth(2).unwrap().to_owned();
    let worker_addr = joined.split_whitespace().nth(1).unwrap().to_owned();
    worker.wait_for_log(&format!("joined the seed 000 network id={given}"));

    let done = owner.wait_for_log("DONE ");
    assert_eq!(done.trim(), "DONE 6 2", "{:?}", owner.lines());
    let lines = owner.lines();
    for (module, passed, failed) in [
        ("test_a.py", 3, 1),
        ("test_b.py", 2, 0),
        ("test_c.py", 1, 1),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with("RESULT ")
                && l.contains(&format!("::{module} {passed} {failed}"))),
            "{module}: {lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("CONFIRM ")
                    && l.contains(&format!("::{module} {worker_addr}"))),
            "{module}: {lines:?}"
        );
    }
    assert!(!lines.iter().any(|l| l.starts_with("REFUSED")), "{lines:?}");
    // The worker's counters reach the network in its CACHE_UPDATEs.
    owner.wait_for_log(&format!("CACHE {worker_addr} 6 2"));
}

/// A teia worker killed while it runs a module: the owner counts it failed after its silence
/// and hands the module to the other teia worker, whose result is the one counted.
#[test]
fn a_module_of_a_killed_teia_worker_is_run_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let project_dir = dir.path().join("calc");
    project(&project_dir);
    std::fs::write(
        project_dir.join("tests/test_slow.py"),
        "import time\ndef test_1():\n    time.sleep(6)\n    assert 1\n",
    )
    .unwrap();
    let udp = free_udp_port();
    let owner = owner(udp, free_port(), &project_dir, Some(8));

    let start = |data: &Path, port: u16| {
        Process::spawn(&[
            "worker",
            "--pytest-compat",
            &format!("127.0.0.1:{udp}"),
            "--advertise-ip",
            "127.0.0.1",
            "--udp-port",
            &port.to_string(),
            "--slots",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ])
    };
    let (data1, data2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (port1, port2) = (free_udp_port(), free_udp_port());
    let mut workers = [
        (
            format!("127.0.0.1:{port1}"),
            Some(start(data1.path(), port1)),
        ),
        (
            format!("127.0.0.1:{port2}"),
            Some(start(data2.path(), port2)),
        ),
    ];
    let confirmed = owner.wait_for_log("::test_slow.py 127.0.0.1:");
    let first = confirmed.split_whitespace().nth(2).unwrap().to_owned();
    let (_, process) = workers.iter_mut().find(|(addr, _)| *addr == first).unwrap();
    drop(process.take());

    owner.wait_for_log("REQUEUED ");
    let done = owner.wait_for_log("DONE ");
    assert_eq!(done.trim(), "DONE 7 2", "{:?}", owner.lines());
    let lines = owner.lines();
    let counted: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("RESULT ") && l.contains("::test_slow.py "))
        .collect();
    assert_eq!(counted.len(), 1, "{lines:?}");
    let other = &workers.iter().find(|(addr, _)| *addr != first).unwrap().0;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("CONFIRM ") && l.ends_with(&format!("::test_slow.py {other}"))),
        "{lines:?}"
    );
}

/// Seed 000's own nodes as workers of a teia node (`--pytest-port`): a node written from the
/// protocol joins, fetches the project announced, runs modules handed to it (beside the
/// teia node's one worker; each test takes a second) and posts their counts, which the
/// evaluation shows as that node's; a result for a module not handed to the sender, or sent
/// by a web page, is refused.
#[test]
fn a_seed000_node_runs_the_modules_of_a_teia_evaluation_under_its_leases() {
    let udp = free_udp_port();
    let (_node, http) = common::http_node(
        "judge",
        "seed000",
        &[
            "--pytest-port",
            &format!("127.0.0.1:{udp}"),
            "--workers",
            "1",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    project(&dir.path().join("calc"));
    std::fs::write(
        dir.path().join("calc/tests/conftest.py"),
        "import time, pytest\n@pytest.fixture(autouse=True)\ndef slow():\n    time.sleep(1)\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("calc/tests/test_d.py"),
        "def test_1(): assert 1\ndef test_2(): assert 1\n",
    )
    .unwrap();
    let zipped = Command::new("python3")
        .args(["-m", "zipfile", "-c", "all.zip", "calc"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(zipped.success());

    let folder = tempfile::tempdir().unwrap();
    let their_port = free_udp_port();
    let mut command = Command::new("python3");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed000/worker.py"))
        .arg(format!("127.0.0.1:{udp}"))
        .arg(their_port.to_string())
        .arg(folder.path());
    let (worker, _stdin) = Process::spawn_capturing(command);
    worker.wait_for_log("JOINED ");

    let bytes = std::fs::read(dir.path().join("all.zip")).unwrap();
    let (status, created) = common::post_file(&http, "/evaluation", &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let detail = common::wait_evaluation(&http, id);
    assert_eq!(detail["status"], "done", "{detail}");
    let modules = &detail["projects"]["calc"]["modules"];
    let theirs = format!("127.0.0.1:{their_port} (seed 000)");
    let mut ran_there = Vec::new();
    for (module, passed, failed) in [
        ("test_a.py", 3, 1),
        ("test_b.py", 2, 0),
        ("test_c.py", 1, 1),
        ("test_d.py", 2, 0),
    ] {
        let counted = &modules[format!("tests/{module}")];
        // Their nodes count an error as a failure; teia keeps errors apart.
        let failed_or_errors =
            counted["failed"].as_u64().unwrap() + counted["errors"].as_u64().unwrap();
        assert_eq!(
            (counted["passed"].as_u64(), failed_or_errors),
            (Some(passed), failed),
            "{module}: {detail}"
        );
        if counted["node"] == theirs.as_str() {
            worker.wait_for_log(&format!("::{module} {passed} {failed} 200"));
            ran_there.push(module);
        }
    }
    assert!(
        !ran_there.is_empty(),
        "no module ran on the seed 000 node: {detail}"
    );

    let task = worker
        .wait_for_log("CONFIRMED ")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let forged = serde_json::json!({"task_id": task, "passed": 9, "failed": 0, "time": 1.0,
        "ip": "127.0.0.1", "port": their_port.to_string()})
    .to_string();
    let (status, answer) = common::http(
        &http,
        "POST",
        "/task",
        "application/json",
        forged.as_bytes(),
    );
    assert_eq!(status, 409, "{answer}");
    // The same from a web page (a browser names its origin).
    let mut stream = std::net::TcpStream::connect(&http).unwrap();
    write!(
        stream,
        "POST /task HTTP/1.1\r\nHost: {http}\r\nOrigin: http://example.com\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{forged}",
        forged.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let after = common::get(&http, &format!("/evaluation/{id}")).1;
    assert_eq!(after["projects"]["calc"], detail["projects"]["calc"]);
}
