//! Integration tests of the job engine's HTTP API (seed 000) on real `teia` processes:
//! ZIP and git submissions graded as pytest counts them, a module killed at its timeout,
//! the shapes of `/stats` and `/network`, and every bad input answered with a 4xx.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A multipart form with one `file` field holding `bytes`, to `/evaluation`.
fn post_zip(addr: &str, bytes: &[u8]) -> (u16, Value) {
    post_file(addr, "/evaluation", bytes)
}

/// A ZIP of `files` (path, content), built with Python's zipfile.
fn zip_of(dir: &Path, files: &[(&str, &str)]) -> Vec<u8> {
    let root = dir.join("zipsrc");
    for (path, content) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let bytes = zip_tree(&root, &dir.join("out.zip"));
    std::fs::remove_dir_all(&root).unwrap();
    bytes
}

/// A ZIP of the folder `root` (its entries relative to it), written at `out` by Python's
/// zipfile.
fn zip_tree(root: &Path, out: &Path) -> Vec<u8> {
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_DEFLATED)\nfor r, _, fs in os.walk(sys.argv[1]):\n    for f in sorted(fs):\n        p = os.path.join(r, f)\n        z.write(p, os.path.relpath(p, sys.argv[1]))\nz.close()",
        ])
        .arg(root)
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

/// The bytes of a ZIP that Python writes at `path` with `entries` (statements on `z`, a
/// deflating `zipfile.ZipFile`): for archives no honest tool makes.
fn python_zip(path: &Path, entries: &str) -> Vec<u8> {
    let script = format!(
        "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED)\n{entries}\nz.close()"
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(path).unwrap()
}

fn start(extra: &[&str]) -> (NodeProcess, String) {
    http_node("judge", "eval", extra)
}

/// An owner in the cluster of secret "our-lab" (one worker), with the HTTP API; its
/// address.
fn cluster_owner() -> (NodeProcess, String) {
    http_node(
        "owner",
        "eval",
        &["--cluster-secret", "our-lab", "--workers", "1"],
    )
}

/// A worker of `owner`'s cluster (one worker), linked to it.
fn cluster_worker(owner: &NodeProcess, name: &str) -> NodeProcess {
    let peer = owner.addr();
    let args = [
        "--peer",
        &peer,
        "--cluster-secret",
        "our-lab",
        "--workers",
        "1",
    ];
    NodeProcess::start(name, "eval", &args)
}

fn wait_done(addr: &str, id: u64) -> Value {
    wait_evaluation(addr, id)
}

/// pytest's own counts for a project (one serial run that, like teia's runs by module,
/// goes on past a module that fails to import): passed, failed, errors, skipped.
fn serial_counts(project: &Path) -> (u64, u64, u64, u64) {
    let output = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg("--continue-on-collection-errors")
        .current_dir(project)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let summary = text.lines().last().unwrap_or_default().to_owned();
    let count = |word: &str| -> u64 {
        summary
            .split(", ")
            .flat_map(|part| part.split(' '))
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1].starts_with(word))
            .and_then(|w| {
                w[0].trim_start_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (
        count("passed"),
        count("failed"),
        count("error"),
        count("skipped"),
    )
}

const ALPHA_MATH: &str =
    "def test_add():\n    assert 1 + 1 == 2\n\ndef test_wrong():\n    assert 1 + 1 == 3\n";
const ALPHA_MORE: &str = "import pytest\n\n@pytest.mark.skip\ndef test_later():\n    pass\n\n@pytest.mark.parametrize('n', [1, 2, 3])\ndef test_n(n):\n    assert n > 0\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError('fixture')\n\ndef test_uses_broken(broken):\n    pass\n";
const BETA_DEEP: &str = "import time\n\ndef test_slow():\n    time.sleep(0.5)\n\ndef test_quick():\n    assert 'a' in 'abc'\n";
const BETA_IMPORT: &str = "import no_such_module\n\ndef test_never():\n    pass\n";
const BETA_SUBTESTS: &str = "def test_parts(subtests):\n    for i in range(3):\n        with subtests.test(i=i):\n            assert i != 1\n";
const HANG: &str = "import time\n\ndef test_before():\n    assert True\n\ndef test_hangs():\n    time.sleep(600)\n";

/// Checks that project `name` of the evaluation `detail` has the counts of a serial pytest
/// of `project`; the tests that passed.
fn assert_serial_counts(detail: &Value, name: &str, project: &Path) -> u64 {
    let (passed, failed, errors, skipped) = serial_counts(project);
    let tests = &detail["projects"][name]["tests"];
    assert_eq!(
        (
            tests["passed"].as_u64().unwrap(),
            tests["failed"].as_u64().unwrap(),
            tests["errors"].as_u64().unwrap(),
            tests["skipped"].as_u64().unwrap()
        ),
        (passed, failed, errors, skipped),
        "{name}: {detail}"
    );
    passed
}

#[test]
fn a_zip_of_projects_is_graded_with_the_counts_of_a_serial_pytest() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("alpha/tests/test_math.py", ALPHA_MATH),
        ("alpha/tests/test_more.py", ALPHA_MORE),
        ("alpha/src/lib.py", "VALUE = 1\n"),
        ("beta/tests/deep/test_deep.py", BETA_DEEP),
        ("beta/tests/test_import.py", BETA_IMPORT),
        ("beta/tests/test_subtests.py", BETA_SUBTESTS),
        ("hang/tests/test_hang.py", HANG),
    ];
    let bytes = zip_of(dir.path(), &files);
    let (_node, addr) = start(&["--module-timeout", "4"]);
    let (status, created) = post_zip(&addr, &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    assert!(id < (1u64 << 53));
    // What the published seed 000 nodes answer, for their clients.
    assert_eq!(created["eval_id"], id.to_string().as_str());
    assert_eq!(created["status"], "submitted");
    let detail = wait_done(&addr, id);

    for name in ["alpha", "beta"] {
        let project = dir.path().join("serial").join(name);
        for (path, content) in &files {
            if let Some(rest) = path.strip_prefix(&format!("{name}/")) {
                let target = project.join(rest);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(target, content).unwrap();
            }
        }
        assert_serial_counts(&detail, name, &project);
    }
    // alpha: 4 passed, 1 failed, 1 error, 1 skipped → 4 / 6 passed.
    let alpha = &detail["projects"]["alpha"];
    assert_eq!(alpha["percent_passed"], 66.67);
    assert_eq!(alpha["grade"], 13.33);
    // The hanging module is killed at its timeout and keeps the test that passed.
    let hang = &detail["projects"]["hang"]["modules"]["tests/test_hang.py"];
    assert_eq!(
        (hang["passed"].as_u64(), hang["errors"].as_u64()),
        (Some(1), Some(1)),
        "{hang}"
    );
    let grades: Vec<f64> = ["alpha", "beta", "hang"]
        .iter()
        .map(|p| detail["projects"][p]["grade"].as_f64().unwrap())
        .collect();
    let mean = grades.iter().sum::<f64>() / 3.0;
    assert!(
        (detail["grade"].as_f64().unwrap() - mean).abs() < 0.02,
        "{detail}"
    );
    assert_eq!(detail["modules"]["executed"], 6);

    let (status, list) = get(&addr, "/evaluation");
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["status"], "done");
    let (_, stats) = get(&addr, "/stats");
    let all = stats["all"].as_object().unwrap();
    let mut keys: Vec<&String> = all.keys().collect();
    keys.sort();
    assert_eq!(keys, ["evaluations", "failed", "passed", "projects"]);
    assert_eq!(stats["all"]["evaluations"], 1);
    assert_eq!(stats["all"]["projects"], 3);
    let node = stats["nodes"][0].as_object().unwrap();
    let mut keys: Vec<&String> = node.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "address",
            "evaluations",
            "failed",
            "modules",
            "passed",
            "projects"
        ]
    );
    assert_eq!(stats["nodes"][0]["evaluations"][0], id);
    let (_, network) = get(&addr, "/network");
    let network = network.as_object().unwrap();
    assert_eq!(network.len(), 1);
    assert!(network.values().all(Value::is_array));
}

#[test]
fn bad_submissions_are_answered_with_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr) = start(&[]);
    let expect = |(status, body): (u16, Value), code: u16, needle: &str| {
        assert_eq!(status, code, "{body}");
        let error = body["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    };
    expect(post_zip(&addr, b"not a zip"), 400, "not a ZIP");
    expect(post_zip(&addr, b""), 400, "empty");
    let no_project = zip_of(dir.path(), &[("p/readme.txt", "hello")]);
    expect(post_zip(&addr, &no_project), 400, "no project");
    // zip-slip: an entry named ../evil.py, written by Python.
    let slip = python_zip(
        &dir.path().join("slip.zip"),
        "z.writestr('../evil.py', 'x')\nz.writestr('p/tests/test_a.py', 'def test_a(): pass')",
    );
    expect(post_zip(&addr, &slip), 400, "zip-slip");
    // A zip bomb: 50 MiB of zeros in a few KiB.
    let bomb = python_zip(
        &dir.path().join("bomb.zip"),
        "z.writestr('p/tests/test_a.py', b'\\0' * (50 * 1024 * 1024))",
    );
    expect(post_zip(&addr, &bomb), 400, "zip bomb");
    expect(
        http(&addr, "POST", "/evaluation", "text/plain", b"hi"),
        415,
        "multipart",
    );
    expect(
        http(&addr, "POST", "/evaluation", "application/json", b"{nope"),
        400,
        "",
    );
    expect(
        http(
            &addr,
            "POST",
            "/evaluation",
            "application/json",
            b"{\"projects\": []}",
        ),
        400,
        "projects",
    );
    expect(
        http(
            &addr,
            "POST",
            "/evaluation",
            "application/json",
            b"{\"projects\": [\"file:///nowhere/at/all.git\"]}",
        ),
        400,
        "clones only https",
    );
    let boundary = "b0undary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    expect(
        http(
            &addr,
            "POST",
            "/evaluation",
            &format!("multipart/form-data; boundary={boundary}"),
            form.as_bytes(),
        ),
        400,
        "no `file` field",
    );
    expect(get(&addr, "/evaluation/abc"), 400, "not an evaluation id");
    expect(get(&addr, "/evaluation/12345"), 404, "no evaluation 12345");
    expect(get(&addr, "/nowhere"), 404, "no such route");
    assert!(!dir.path().parent().unwrap().join("evil.py").exists());
}

#[test]
fn a_git_url_submission_clones_a_local_bare_repository_and_keeps_the_token_secret() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("tests")).unwrap();
    std::fs::write(work.join("tests/test_repo.py"), ALPHA_MATH).unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let status = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(cwd)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    };
    git(&["init", "-q"], &work);
    git(&["add", "."], &work);
    git(&["commit", "-q", "-m", "tests"], &work);
    let bare = dir.path().join("course-project.git");
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        dir.path(),
    );
    // By default a node clones https:// only: not its own repositories, not ssh with its
    // user's keys, and it says nothing of what git found (no probing of hosts and ports).
    let (strict, strict_addr) = start(&[]);
    for url in [
        format!("file://{}", bare.display()),
        bare.display().to_string(),
        "ssh://git@127.0.0.1:22/repo.git".to_owned(),
        "git@127.0.0.1:repo.git".to_owned(),
        "http://127.0.0.1:1/repo.git".to_owned(),
    ] {
        let (status, refused) = post_json(
            &strict_addr,
            "/evaluation",
            &serde_json::json!({"projects": [url]}),
        );
        assert_eq!(status, 400, "{url}: {refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("clones only https"),
            "{refused}"
        );
    }
    let (status, failed) = post_json(
        &strict_addr,
        "/evaluation",
        &serde_json::json!({"projects": ["https://127.0.0.1:1/closed.git"]}),
    );
    assert_eq!(status, 400, "{failed}");
    assert!(
        !failed["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("connect"),
        "git's message reached the submitter: {failed}"
    );
    drop(strict);
    let (node, addr) = start(&["--allow-git-scheme", "file"]);
    let body = serde_json::json!({
        "auth_token": "s3cr3t-t0ken",
        "projects": [format!("file://{}", bare.display())],
    });
    let (status, created) = http(
        &addr,
        "POST",
        "/evaluation",
        "application/json",
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 201, "{created}");
    let detail = wait_done(&addr, created["id"].as_u64().unwrap());
    let tests = &detail["projects"]["course-project"]["tests"];
    assert_eq!(
        (tests["passed"].as_u64(), tests["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let data = node.data_dir().to_owned();
    let (_, _) = node.kill9_with_events();
    let found = Command::new("grep")
        .args(["-r", "-l", "s3cr3t-t0ken"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "the token is stored in clear: {:?}",
        found
    );
}

#[test]
fn modules_spread_over_three_nodes_and_a_killed_worker_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let slow =
        "import time\n\ndef test_slow():\n    time.sleep(2)\n\ndef test_fast():\n    assert True\n";
    let mut files = Vec::new();
    let names: Vec<String> = (1..=6).map(|i| format!("p/tests/test_m{i}.py")).collect();
    for name in &names {
        files.push((name.as_str(), slow));
    }
    let bytes = zip_of(dir.path(), &files);
    let (owner, addr) = cluster_owner();
    let doomed = cluster_worker(&owner, "doomed");
    let survivor = cluster_worker(&owner, "survivor");
    owner.wait_link("doomed@eval");
    owner.wait_link("survivor@eval");
    // An untrusted node (no secret) never gets a module.
    let outsider = NodeProcess::start(
        "outsider",
        "eval",
        &["--peer", &owner.addr(), "--workers", "1"],
    );
    owner.wait_link("outsider@eval");

    let (status, created) = post_zip(&addr, &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    // Wait until the doomed worker runs a module, then kill it.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, detail) = get(&addr, &format!("/evaluation/{id}"));
        let running_there = detail["projects"]["p"]["modules"]
            .as_object()
            .unwrap()
            .values()
            .any(|m| m["status"] == "running" && m["node"] == "doomed@eval");
        if running_there {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "doomed never ran a module: {detail}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    doomed.kill9();
    let detail = wait_done(&addr, id);
    let tests = &detail["tests"];
    assert_eq!(
        (
            tests["passed"].as_u64(),
            tests["failed"].as_u64(),
            tests["errors"].as_u64()
        ),
        (Some(12), Some(0), Some(0)),
        "{detail}"
    );
    let nodes: std::collections::BTreeSet<String> = detail["projects"]["p"]["modules"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["node"].as_str().unwrap().to_owned())
        .collect();
    assert!(nodes.len() >= 2, "modules ran on {nodes:?}");
    assert!(
        !nodes.contains(&format!("127.0.0.1:{}", outsider.port)),
        "{nodes:?}"
    );
    drop(survivor);
}

/// Two real projects from PyPI that ship their tests (`tests/corpus`: cachetools 8.0.1 with
/// its `src/` folder flattened, and tabulate 0.10.0 with `test/` renamed `tests/`), run on
/// three nodes, get the counts of a serial pytest of each.
#[test]
fn real_projects_from_pypi_get_the_counts_of_a_serial_pytest_on_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("corpus");
    let bytes = zip_tree(&corpus, &dir.path().join("corpus.zip"));
    let (owner, addr) = cluster_owner();
    let _one = cluster_worker(&owner, "one");
    let _two = cluster_worker(&owner, "two");
    owner.wait_link("one@eval");
    owner.wait_link("two@eval");
    let (status, created) = post_zip(&addr, &bytes);
    assert_eq!(status, 201, "{created}");
    let detail = wait_done(&addr, created["id"].as_u64().unwrap());
    for name in ["cachetools", "tabulate"] {
        // A copy, so that the serial run leaves nothing in the repository.
        let project = dir.path().join("serial").join(name);
        copy_dir(&corpus.join(name), &project);
        let passed = assert_serial_counts(&detail, name, &project);
        assert!(passed > 100, "{name}: pytest passed only {passed}");
    }
    let nodes: std::collections::BTreeSet<&str> = detail["projects"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p["modules"].as_object().unwrap().values())
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    assert!(nodes.len() >= 2, "modules ran on {nodes:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A worker that joins late fetches the project's bytes from a worker that has them,
/// not from the owner.
#[test]
fn a_late_worker_fetches_the_project_from_a_worker_that_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let slow = "import time\n\ndef test_slow():\n    time.sleep(1)\n";
    let names: Vec<String> = (1..=10).map(|i| format!("p/tests/test_m{i}.py")).collect();
    let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), slow)).collect();
    let bytes = zip_of(dir.path(), &files);
    let (owner, addr) = cluster_owner();
    let early = cluster_worker(&owner, "early");
    owner.wait_link("early@eval");
    let (status, created) = post_zip(&addr, &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    early.process.wait_for_log("from=owner@eval");
    // Once early has returned a result, the owner knows it holds the project.
    let early_address = format!("127.0.0.1:{}", early.port);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, detail) = get(&addr, &format!("/evaluation/{id}"));
        let done_there = detail["projects"]["p"]["modules"]
            .as_object()
            .unwrap()
            .values()
            .any(|m| m["status"] == "done" && m["node"] == early_address.as_str());
        if done_there {
            break;
        }
        assert!(Instant::now() < deadline, "early ran nothing: {detail}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let late = cluster_worker(&owner, "late");
    let fetched = late.process.wait_for_log("project fetched");
    assert_eq!(field(&fetched, "from"), "early@eval", "{fetched}");
    let detail = wait_done(&addr, id);
    assert_eq!(detail["tests"]["passed"], 10, "{detail}");
}

#[test]
fn when_the_owner_dies_a_survivor_takes_over_and_finishes_without_recomputing() {
    let dir = tempfile::tempdir().unwrap();
    let slow = "import time\n\ndef test_slow():\n    time.sleep(1.5)\n\ndef test_fast():\n    assert True\n";
    let names: Vec<String> = (1..=8).map(|i| format!("p/tests/test_m{i}.py")).collect();
    let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), slow)).collect();
    let bytes = zip_of(dir.path(), &files);
    let common = [
        "--cluster-secret",
        "our-lab",
        "--workers",
        "1",
        "--http",
        "127.0.0.1:0",
    ];
    let mut owner_args = vec!["--peer", "127.0.0.1:1"];
    owner_args.extend_from_slice(&common);
    let owner = NodeProcess::start("a-owner", "eval", &owner_args);
    let owner_http = field(&owner.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    let owner_addr = owner.addr();
    let mut worker_args = vec!["--peer", owner_addr.as_str()];
    worker_args.extend_from_slice(&common);
    let first = NodeProcess::start("b-worker", "eval", &worker_args);
    let second = NodeProcess::start("c-worker", "eval", &worker_args);
    let first_http = field(&first.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    owner.wait_link("b-worker@eval");
    owner.wait_link("c-worker@eval");
    first.wait_link("a-owner@eval");
    second.wait_link("a-owner@eval");

    let (status, created) = post_zip(&owner_http, &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    // Wait until a survivor's replica shows some modules done, then kill the owner.
    let deadline = Instant::now() + PATIENCE;
    let before = loop {
        let (status, replica) = get(&first_http, &format!("/evaluation/{id}"));
        if status == 200 && replica["modules"]["executed"].as_u64().unwrap_or(0) >= 3 {
            break replica;
        }
        assert!(
            Instant::now() < deadline,
            "no replica with progress: {replica}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    owner.kill9();
    let after = wait_done(&first_http, id);
    assert_ne!(after["owner"], "a-owner@eval", "{after}");
    let tests = &after["tests"];
    assert_eq!(
        (
            tests["passed"].as_u64(),
            tests["failed"].as_u64(),
            tests["errors"].as_u64()
        ),
        (Some(16), Some(0), Some(0)),
        "{after}"
    );
    // Modules finished before the kill are kept as they were, not run again.
    for (path, module) in before["projects"]["p"]["modules"].as_object().unwrap() {
        if module["status"] == "done" {
            assert_eq!(
                &after["projects"]["p"]["modules"][path], module,
                "{path} ran again"
            );
        }
    }
    // The survivor's totals cover the network's evaluation, though another node took it.
    let (_, stats) = get(&first_http, "/stats");
    assert_eq!(
        (
            stats["all"]["evaluations"].as_u64(),
            stats["all"]["passed"].as_u64(),
            stats["all"]["projects"].as_u64()
        ),
        (Some(1), Some(16), Some(1)),
        "{stats}"
    );
    drop(second);
}

/// An evaluation answered `201` survives its owner killed at once, before any worker ran a
/// module: the owner answered only once two other nodes held every project's bytes, so a
/// survivor takes it over and every project gets pytest's own counts (no module counted as
/// failed for want of its project).
#[test]
fn an_owner_killed_right_after_answering_loses_no_project() {
    let dir = tempfile::tempdir().unwrap();
    let module = |n: u32| {
        format!("import time\n\ndef test_slow():\n    time.sleep(0.5)\n\ndef test_fast():\n    assert {n} == {n}\n")
    };
    let sources: Vec<(String, String)> = ["one", "two", "three"]
        .iter()
        .flat_map(|project| {
            (1..=2).map(move |i| (format!("{project}/tests/test_m{i}.py"), module(i)))
        })
        .collect();
    let files: Vec<(&str, &str)> = sources
        .iter()
        .map(|(path, source)| (path.as_str(), source.as_str()))
        .collect();
    let bytes = zip_of(dir.path(), &files);
    let common = [
        "--cluster-secret",
        "our-lab",
        "--workers",
        "1",
        "--http",
        "127.0.0.1:0",
    ];
    let (owner, owner_http) = http_node("a-owner", "eval", &common[..4]);
    let owner_addr = owner.addr();
    let worker_args = [&["--peer", owner_addr.as_str()][..], &common].concat();
    let first = NodeProcess::start("b-worker", "eval", &worker_args);
    let second = NodeProcess::start("c-worker", "eval", &worker_args);
    let first_http = field(&first.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    // Both workers are members of the owner's cluster.
    let (after, _) = owner
        .process
        .wait_for_log_after("a node of the cluster proved itself", 0);
    owner
        .process
        .wait_for_log_after("a node of the cluster proved itself", after + 1);
    first
        .process
        .wait_for_log("a node of the cluster proved itself");
    second
        .process
        .wait_for_log("a node of the cluster proved itself");

    let (status, created) = post_zip(&owner_http, &bytes);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    owner.kill9();
    let done = wait_done(&first_http, id);
    assert_ne!(done["owner"], "a-owner@eval", "{done}");
    for project in ["one", "two", "three"] {
        let tests = &done["projects"][project]["tests"];
        assert_eq!(
            (
                tests["passed"].as_u64(),
                tests["failed"].as_u64(),
                tests["errors"].as_u64()
            ),
            (Some(4), Some(0), Some(0)),
            "{project}: {done}"
        );
    }
    drop(second);
}

/// A Python whose test reports lie: a virtual environment whose `sitecustomize` puts a
/// report plugin first on the path that says every test passed.
fn lying_python(dir: &Path) -> std::path::PathBuf {
    let venv = dir.join("liar");
    let status = Command::new("python3")
        .args(["-m", "venv", "--system-site-packages", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(status.success(), "python3 -m venv");
    let python = venv.join("bin").join("python");
    let purelib = Command::new(&python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .unwrap();
    let purelib = String::from_utf8(purelib.stdout).unwrap().trim().to_owned();
    let plugin = venv.join("plugin");
    std::fs::create_dir_all(&plugin).unwrap();
    std::fs::write(
        plugin.join("teia_report.py"),
        "import json, os\n_out = open(os.environ['TEIA_REPORT'], 'a', buffering=1)\n\ndef pytest_runtest_logreport(report):\n    if report.when == 'call':\n        _out.write(json.dumps({'kind': 'call', 'outcome': 'passed', 'nodeid': report.nodeid}) + '\\n')\n",
    )
    .unwrap();
    std::fs::write(
        Path::new(&purelib).join("sitecustomize.py"),
        format!(
            "import sys\nsys.path.insert(0, {:?})\n",
            plugin.to_string_lossy()
        ),
    )
    .unwrap();
    python
}

/// With `--verify 1` every result is run again on another node of the cluster: a node that
/// lies (its reports say every test passed) is caught, each module it ran or checked is
/// disputed with both nodes named, and the owner's own run stands, so every count is
/// pytest's own.
#[test]
fn verification_catches_a_node_that_lies() {
    let dir = tempfile::tempdir().unwrap();
    let liar_python = lying_python(dir.path());
    let honest = "import time\n\ndef test_passes():\n    time.sleep(0.3)\n\ndef test_fails():\n    assert False\n";
    let names: Vec<String> = (1..=4).map(|i| format!("p/tests/test_m{i}.py")).collect();
    let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), honest)).collect();
    let bytes = zip_of(dir.path(), &files);
    let secret = ["--cluster-secret", "our-lab", "--workers", "1"];
    let (owner, http) = http_node("owner", "eval", &[&["--verify", "1"][..], &secret].concat());
    let liar = NodeProcess::start(
        "liar",
        "eval",
        &[
            &[
                "--peer",
                &owner.addr(),
                "--python",
                liar_python.to_str().unwrap(),
            ][..],
            &secret,
        ]
        .concat(),
    );
    owner
        .process
        .wait_for_log("a node of the cluster proved itself");
    liar.process
        .wait_for_log("a node of the cluster proved itself");
    let (status, created) = post_zip(&http, &bytes);
    assert_eq!(status, 201, "{created}");
    let detail = wait_done(&http, created["id"].as_u64().unwrap());
    let modules = detail["projects"]["p"]["modules"].as_object().unwrap();
    let mut disputed = 0;
    for (path, module) in modules {
        assert_eq!(
            (module["passed"].as_u64(), module["failed"].as_u64()),
            (Some(1), Some(1)),
            "{path}: {detail}"
        );
        assert_eq!(module["node"], owner.addr().as_str(), "{path}: {detail}");
        if let Some(dispute) = module.get("disputed") {
            disputed += 1;
            assert_eq!(dispute["nodes"][1], liar.addr().as_str(), "{dispute}");
            assert_eq!(dispute["other"]["failed"], 0, "{dispute}");
        }
    }
    assert_eq!(
        disputed, 4,
        "every module was run by the liar first or checked by it: {detail}"
    );
    owner.process.wait_for_log("a verification disagreed");
}

#[test]
fn teia_eval_submits_a_folder_follows_it_and_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("submission/alpha/tests");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("test_math.py"), ALPHA_MATH).unwrap();
    let (_node, addr) = start(&[]);
    let output = teia()
        .args(["eval", "--node", &addr, "--json", "submit"])
        .arg(dir.path().join("submission"))
        .output()
        .unwrap();
    // One test of two fails: the command says so and fails.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 test(s) failed"), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done = lines.iter().find(|l| l["event"] == "done").unwrap();
    let tests = &done["evaluation"]["projects"]["alpha"]["tests"];
    assert_eq!(
        (tests["passed"].as_u64(), tests["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let id = done["evaluation"]["id"].as_u64().unwrap();
    let list = teia()
        .args(["eval", "--node", &addr, "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id.to_string()));
    let missing = teia()
        .args(["eval", "--node", &addr, "status", "1"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    // A grade of 10 / 20 passes --fail-under 10 and fails --fail-under 12.
    for (minimum, code) in [("10", 0), ("12", 1)] {
        let output = teia()
            .args([
                "eval",
                "--node",
                &addr,
                "--json",
                "submit",
                "--fail-under",
                minimum,
            ])
            .arg(dir.path().join("submission"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(code),
            "--fail-under {minimum}: {stderr}"
        );
        // The module ran before: its progress says how much work is expected to be left.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let progress: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["event"] == "progress")
            .collect();
        assert!(!progress.is_empty(), "{stdout}");
        assert!(
            progress.iter().all(|p| p["expected_seconds_left"].is_f64()),
            "{stdout}"
        );
    }
}

#[test]
fn clients_without_a_node_say_how_to_start_one() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let output = teia()
        .args(["eval", "--node", &addr, "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no node's HTTP API answers"), "{stderr}");
    assert!(stderr.contains("--http"), "{stderr}");
}

#[test]
fn a_job_for_a_node_without_tasks_gets_the_nodes_answer() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    std::fs::create_dir_all(&task).unwrap();
    std::fs::write(task.join("main.py"), "print('hi')\n").unwrap();
    std::fs::write(task.join("input.csv"), "a\n1\n").unwrap();
    // A task larger than the socket buffers: refused before it is sent, not mid-way.
    std::fs::write(task.join("padding.bin"), vec![7u8; 4 << 20]).unwrap();
    let (_node, addr) = start(&[]);
    let output = teia()
        .args(["job", "--node", &addr, "submit"])
        .arg(&task)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("503") && stderr.contains("--tasks-dir"),
        "{stderr}"
    );
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

#[test]
fn two_evaluations_run_at_once_and_a_restarted_node_keeps_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let first = zip_of(dir.path(), &[("one/tests/test_a.py", ALPHA_MATH)]);
    let second = zip_of(
        dir.path(),
        &[
            ("two/tests/test_b.py", BETA_DEEP),
            ("two/tests/test_c.py", ALPHA_MATH),
        ],
    );
    let data = tempfile::tempdir().unwrap();
    let node = NodeProcess::start_in(
        data,
        "keeper",
        "eval",
        &[
            "--http",
            "127.0.0.1:0",
            "--peer",
            "127.0.0.1:1",
            "--workers",
            "2",
        ],
    );
    let addr = field(&node.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    let (_, a) = post_zip(&addr, &first);
    let (_, b) = post_zip(&addr, &second);
    let (a, b) = (a["id"].as_u64().unwrap(), b["id"].as_u64().unwrap());
    assert_ne!(a, b);
    let done_a = wait_done(&addr, a);
    let done_b = wait_done(&addr, b);
    assert_eq!(done_a["tests"]["passed"], 1);
    assert_eq!(done_b["tests"]["passed"], 3);
    let (_, stats) = get(&addr, "/stats");
    assert_eq!(stats["all"]["evaluations"], 2);

    // Restarted with its data directory, it still knows both, and its totals.
    let data = node.kill9();
    let node = NodeProcess::start_in(
        data,
        "keeper",
        "eval",
        &["--http", "127.0.0.1:0", "--peer", "127.0.0.1:1"],
    );
    let addr = field(&node.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    let (status, again) = get(&addr, &format!("/evaluation/{b}"));
    assert_eq!(status, 200);
    assert_eq!(again["status"], "done");
    assert_eq!(again["tests"], done_b["tests"]);
    let (_, list) = get(&addr, "/evaluation");
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (_, stats) = get(&addr, "/stats");
    assert_eq!(stats["all"]["evaluations"], 2);
    assert_eq!(stats["all"]["passed"], 4);
}

#[test]
fn stats_and_network_show_every_node_of_the_cluster_and_no_stranger() {
    let secret = ["--cluster-secret", "our-lab"];
    let a = NodeProcess::start(
        "a-node",
        "eval",
        &[
            &["--http", "127.0.0.1:0", "--peer", "127.0.0.1:1"][..],
            &secret,
        ]
        .concat(),
    );
    let http = field(&a.process.wait_for_log("HTTP API listening"), "bound").to_owned();
    let b = NodeProcess::start(
        "b-node",
        "eval",
        &[&["--peer", &a.addr(), "--max-neighbours", "2"][..], &secret].concat(),
    );
    let c = NodeProcess::start(
        "c-node",
        "eval",
        &[&["--peer", &b.addr(), "--max-neighbours", "1"][..], &secret].concat(),
    );
    // A node without the secret, linked to a: not a node of the cluster, never shown.
    let stranger = NodeProcess::start("stranger", "eval", &["--peer", &a.addr()]);
    a.wait_link("stranger@eval");
    b.wait_link("c-node@eval");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, stats) = get(&http, "/stats");
        let (_, network) = get(&http, "/network");
        let nodes = stats["nodes"].as_array().map_or(0, Vec::len);
        let graph = network.as_object().cloned().unwrap_or_default();
        let c_links = graph.get(&c.addr()).cloned().unwrap_or_default();
        let all = [a.addr(), b.addr(), c.addr()];
        let known_links = graph.values().all(|links| {
            links
                .as_array()
                .is_some_and(|l| l.iter().all(|x| all.iter().any(|a| x == a.as_str())))
        });
        let c_to_b = c_links
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x == b.addr().as_str()));
        if nodes == 3 && graph.len() == 3 && known_links && c_to_b {
            let addresses: Vec<&str> = stats["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["address"].as_str().unwrap())
                .collect();
            assert!(addresses.contains(&c.addr().as_str()), "{stats}");
            assert!(!addresses.contains(&stranger.addr().as_str()), "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "stats {stats} network {network}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A module whose files did not change is not run again: its result is reused, said so
/// (with the evaluation it came from), and counted as before; a module that failed runs
/// again, a changed test module alone runs again, a change to a file every module may use
/// (a `conftest.py`) runs them all, and `?cache=false` runs everything.
#[test]
fn an_unchanged_resubmission_reuses_the_results_of_modules_that_passed() {
    let (_node, addr) = start(&["--workers", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "calc/tests/test_ok.py",
            "def test_1(): pass\ndef test_2(): pass\n",
        ),
        (
            "calc/tests/test_bad.py",
            "def test_1(): pass\ndef test_2(): assert 0\n",
        ),
        ("calc/tests/test_other.py", "def test_1(): pass\n"),
    ];
    let first = wait_done(
        &addr,
        post_zip(&addr, &zip_of(dir.path(), &files)).1["id"]
            .as_u64()
            .unwrap(),
    );
    let counts = |detail: &Value, module: &str| {
        let m = &detail["projects"]["calc"]["modules"][module];
        (
            m["passed"].as_u64(),
            m["failed"].as_u64(),
            m["cached"].as_bool(),
        )
    };
    assert_eq!(
        counts(&first, "tests/test_ok.py"),
        (Some(2), Some(0), Some(false))
    );

    // The same files, zipped again (other times in the ZIP).
    let again = zip_of(dir.path(), &files);
    let (status, created) = post_zip(&addr, &again);
    assert_eq!(status, 201, "{created}");
    let second = wait_done(&addr, created["id"].as_u64().unwrap());
    assert_eq!(
        counts(&second, "tests/test_ok.py"),
        (Some(2), Some(0), Some(true))
    );
    assert_eq!(
        counts(&second, "tests/test_other.py"),
        (Some(1), Some(0), Some(true))
    );
    assert_eq!(
        second["projects"]["calc"]["modules"]["tests/test_ok.py"]["cached_from"]["eval"],
        first["id"]
    );
    // A module that failed runs again, expected to take what it took the first time.
    assert_eq!(
        counts(&second, "tests/test_bad.py"),
        (Some(1), Some(1), Some(false))
    );
    let bad = |detail: &Value| detail["projects"]["calc"]["modules"]["tests/test_bad.py"].clone();
    assert!(bad(&first).get("expected_seconds").is_none(), "{first}");
    assert_eq!(
        bad(&second)["expected_seconds"],
        bad(&first)["seconds"],
        "{second}"
    );
    assert_eq!(second["tests"], first["tests"]);
    assert_eq!(second["grade"], first["grade"]);

    // One module changed: it alone runs.
    let mut changed = files;
    changed[2].1 = "def test_1(): pass\ndef test_2(): pass\n";
    let third = wait_done(
        &addr,
        post_zip(&addr, &zip_of(dir.path(), &changed)).1["id"]
            .as_u64()
            .unwrap(),
    );
    assert_eq!(
        counts(&third, "tests/test_other.py"),
        (Some(2), Some(0), Some(false))
    );
    assert_eq!(
        counts(&third, "tests/test_ok.py"),
        (Some(2), Some(0), Some(true))
    );
    // Anything else changed (a conftest.py): every module runs.
    let mut shared = changed.to_vec();
    shared.push(("calc/tests/conftest.py", "# shared by every module\n"));
    let fourth = wait_done(
        &addr,
        post_zip(&addr, &zip_of(dir.path(), &shared)).1["id"]
            .as_u64()
            .unwrap(),
    );
    assert_eq!(
        counts(&fourth, "tests/test_ok.py"),
        (Some(2), Some(0), Some(false))
    );

    let (status, created) = post_file(&addr, "/evaluation?cache=false", &again);
    assert_eq!(status, 201, "{created}");
    let fifth = wait_done(&addr, created["id"].as_u64().unwrap());
    assert_eq!(
        counts(&fifth, "tests/test_ok.py"),
        (Some(2), Some(0), Some(false))
    );
}

/// Waits until the node at `addr` shows `nodes` nodes of its cluster (itself included) in
/// `/stats`: its members are known.
fn wait_for_cluster(addr: &str, nodes: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, stats) = get(addr, "/stats");
        if stats["nodes"].as_array().map_or(0, Vec::len) >= nodes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never formed: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A module with a test that fails when the whole module runs and passes when run by its
/// node id (as a rerun runs it), a test that always passes, and a parametrised test of
/// which one case always fails.
const SHAKY: &str = "import pytest\n\ndef test_steady():\n    pass\n\ndef test_flaky(request):\n    assert any('::' in arg for arg in request.config.args)\n\n@pytest.mark.parametrize('n', [1, 2])\ndef test_real(n):\n    assert n == 1\n";

/// Failed tests run again by default: the one that then passes is named flaky (in the
/// module, the project and `teia eval status`), the one that fails again is not, and the
/// counts stay those of the first run (a serial pytest's); `rerun_failures=0` runs nothing
/// again, and a bad value is a 400.
#[test]
fn a_test_that_fails_then_passes_when_run_again_is_reported_flaky() {
    let (_node, addr) = start(&["--workers", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let files = [("shaky/tests/test_shaky.py", SHAKY)];
    let zip = zip_of(dir.path(), &files);
    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let detail = wait_done(&addr, id);
    let module = "tests/test_shaky.py";
    let project = &detail["projects"]["shaky"];
    let shaky = &project["modules"][module];
    assert_eq!(
        (shaky["passed"].as_u64(), shaky["failed"].as_u64()),
        (Some(2), Some(2)),
        "{detail}"
    );
    let serial = dir.path().join("serial");
    std::fs::create_dir_all(serial.join("tests")).unwrap();
    std::fs::write(serial.join(module), SHAKY).unwrap();
    assert_serial_counts(&detail, "shaky", &serial);
    let flaky = serde_json::json!([format!("{module}::test_flaky")]);
    assert_eq!(shaky["flaky"], flaky, "{detail}");
    assert_eq!(project["flaky"], flaky, "{detail}");
    assert_eq!(
        shaky["failed_tests"],
        serde_json::json!([
            format!("{module}::test_flaky"),
            format!("{module}::test_real[2]")
        ]),
        "{detail}"
    );
    let status = teia()
        .args(["eval", "--node", &addr, "status", &id.to_string()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&status.stdout);
    let (failed, flaky) = said
        .split_once("\nflaky: ")
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        flaky.contains(&format!("shaky: {module}::test_flaky")),
        "{said}"
    );
    assert!(!flaky.contains("test_real[2]"), "{said}");
    assert!(
        failed.contains(&format!("shaky: {module}::test_real[2]: assert 2 == 1")),
        "{said}"
    );

    let (status, created) = post_file(&addr, "/evaluation?cache=false&rerun_failures=0", &zip);
    assert_eq!(status, 201, "{created}");
    let once = wait_done(&addr, created["id"].as_u64().unwrap());
    assert!(once["projects"]["shaky"].get("flaky").is_none(), "{once}");
    assert_eq!(once["tests"], detail["tests"]);

    let (status, refused) = post_file(&addr, "/evaluation?rerun_failures=9", &zip);
    assert_eq!(status, 400, "{refused}");
}

/// In a cluster, failed tests run again on another node than the one that failed them.
#[test]
fn failed_tests_run_again_on_another_node_of_the_cluster() {
    let (owner, addr) = cluster_owner();
    let _worker = cluster_worker(&owner, "worker");
    owner.wait_link("worker@eval");
    wait_for_cluster(&addr, 2);
    let dir = tempfile::tempdir().unwrap();
    let zip = zip_of(dir.path(), &[("shaky/tests/test_shaky.py", SHAKY)]);
    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let detail = wait_done(&addr, created["id"].as_u64().unwrap());
    let shaky = &detail["projects"]["shaky"]["modules"]["tests/test_shaky.py"];
    assert_eq!(
        shaky["flaky"],
        serde_json::json!(["tests/test_shaky.py::test_flaky"]),
        "{detail}"
    );
    let reran = shaky["rerun_on"][0].as_str().unwrap();
    assert_ne!(reran, shaky["node"].as_str().unwrap(), "{detail}");
    let real = serde_json::json!("tests/test_shaky.py::test_real[2]");
    let why = shaky["failures"]
        .as_array()
        .and_then(|all| all.iter().find(|f| f["test"] == real))
        .and_then(|f| f["output"].as_str())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!(why.contains("assert 2 == 1"), "{detail}");
    // The owner served the project (and its ledger) to the other node: counted as the
    // job engine's bytes.
    let text = metrics(&addr, owner.data_dir());
    let served = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("teia_service_bytes_total{service=\"jobs\",direction=\"out\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(served > 0, "{text}");
}

/// The result cache and the modules' durations are the cluster's: a node that replicated
/// another's evaluation reuses its results for the same files submitted to it, though it
/// owned none of them, and expects each module to take what it took there.
#[test]
fn a_node_of_the_cluster_reuses_the_results_another_node_ran() {
    let (owner, addr) = cluster_owner();
    let (_other, other_addr) = http_node(
        "other",
        "eval",
        &[
            "--peer",
            &owner.addr(),
            "--cluster-secret",
            "our-lab",
            "--workers",
            "1",
        ],
    );
    owner.wait_link("other@eval");
    wait_for_cluster(&addr, 2);
    wait_for_cluster(&other_addr, 2);
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "calc/tests/test_a.py",
            "def test_1(): pass\ndef test_2(): pass\n",
        ),
        ("calc/tests/test_b.py", "def test_1(): pass\n"),
    ];
    let zip = zip_of(dir.path(), &files);
    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    wait_done(&addr, id);
    // The other node has the evaluation, done, once it replicated it.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, copy) = get(&other_addr, &format!("/evaluation/{id}"));
        if status == 200 && copy["status"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "never replicated: {copy}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, created) = post_zip(&other_addr, &zip);
    assert_eq!(status, 201, "{created}");
    let again = wait_done(&other_addr, created["id"].as_u64().unwrap());
    for module in ["tests/test_a.py", "tests/test_b.py"] {
        let entry = &again["projects"]["calc"]["modules"][module];
        assert_eq!(entry["cached"], true, "{module}: {again}");
        assert_eq!(entry["cached_from"]["eval"], id, "{module}: {again}");
        // Durations travel too: the other node expects what the module took there.
        assert!(entry["expected_seconds"].is_number(), "{module}: {again}");
    }
    assert_eq!(again["tests"]["passed"], 3, "{again}");
}

/// A module of parametrised tests that takes a few seconds, one case failing.
const BIG: &str = "import time, pytest\n\n@pytest.mark.parametrize('n', range(10))\ndef test_slow(n):\n    time.sleep(0.3)\n    assert n != 7\n";

/// As long, its tests sharing a module-scoped fixture: it may not be split.
const SHARED: &str = "import time, pytest\n\n@pytest.fixture(scope='module')\ndef seen():\n    return []\n\n@pytest.mark.parametrize('n', range(10))\ndef test_order(seen, n):\n    time.sleep(0.3)\n    seen.append(n)\n    assert seen == list(range(n + 1))\n";

/// A module never run, whose source holds many more tests than its share of the
/// evaluation's and nothing splitting could change, is split on its first run in equal
/// parts whose counts add up to a serial pytest's; one as large whose tests share a
/// module-scoped fixture stays whole. The pieces' results, joined, serve the whole module
/// from the cache the next time.
#[test]
fn a_large_module_never_seen_is_split_on_its_first_run_when_its_source_allows() {
    let (_node, addr) = start(&["--workers", "4", "--cache-failures"]);
    let dir = tempfile::tempdir().unwrap();
    let mut many = String::from("import pytest\n\n");
    for n in 0..150 {
        let body = match n % 50 {
            7 => "assert False",
            9 => "pytest.skip('no')",
            _ => "pass",
        };
        many.push_str(&format!("def test_{n}():\n    {body}\n\n"));
    }
    many.push_str("@pytest.mark.parametrize('x', range(5))\ndef test_p(x):\n    assert x != 3\n");
    let shared = many.replacen(
        "import pytest\n",
        "import pytest\n\n@pytest.fixture(scope='module')\ndef db():\n    return []\n",
        1,
    );
    let files = [
        ("unseen/tests/test_many.py", many.as_str()),
        ("unseen/tests/test_shared.py", shared.as_str()),
        ("unseen/tests/test_small.py", "def test_1(): pass\n"),
    ];
    let zip = zip_of(dir.path(), &files);
    let serial = dir.path().join("serial");
    for (path, source) in files {
        let path = serial.join(path.trim_start_matches("unseen/"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let first = wait_done(&addr, created["id"].as_u64().unwrap());
    let modules: Vec<&String> = first["projects"]["unseen"]["modules"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    // 301 tests over 4 workers: test_many.py (151 by its source) is twice its share.
    for name in [
        "tests/test_many.py [1/2]",
        "tests/test_many.py [2/2]",
        "tests/test_shared.py",
        "tests/test_small.py",
    ] {
        assert!(modules.contains(&&name.to_owned()), "{name}: {first}");
    }
    assert_eq!(modules.len(), 4, "{first}");
    assert_serial_counts(&first, "unseen", &serial);

    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let again = wait_done(&addr, created["id"].as_u64().unwrap());
    let modules = again["projects"]["unseen"]["modules"].as_object().unwrap();
    assert_eq!(modules.len(), 3, "served whole: {again}");
    let many = &modules["tests/test_many.py"];
    assert_eq!(many["cached"], true, "{again}");
    assert_eq!(many["cached_from"]["eval"], first["id"], "{again}");
    let failed = many["failed_tests"].to_string();
    for test in ["test_many.py::test_7", "test_many.py::test_p[3]"] {
        assert!(failed.contains(test), "{test}: {again}");
    }
    assert_serial_counts(&again, "unseen", &serial);
}

/// A module that took more than its share of an evaluation is split over the workers the
/// next time: its pieces show in the detail and add up to a serial pytest's counts, while
/// a module whose tests share a module-scoped fixture stays whole; `split=false` runs it
/// whole.
#[test]
fn a_straggler_is_split_in_pieces_that_add_up_to_serial_pytest() {
    let (_node, addr) = start(&["--workers", "4"]);
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("split/tests/test_big.py", BIG),
        ("split/tests/test_shared.py", SHARED),
        ("split/tests/test_small.py", "def test_1(): pass\n"),
    ];
    let zip = zip_of(dir.path(), &files);
    let serial = dir.path().join("serial");
    for (path, source) in files {
        let path = serial.join(path.trim_start_matches("split/"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    let names = |detail: &Value| -> Vec<String> {
        detail["projects"]["split"]["modules"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let (status, created) = post_zip(&addr, &zip);
    assert_eq!(status, 201, "{created}");
    let first = wait_done(&addr, created["id"].as_u64().unwrap());
    assert_eq!(names(&first).len(), 3, "never run: not split: {first}");
    assert_serial_counts(&first, "split", &serial);

    let (status, created) = post_file(&addr, "/evaluation?cache=false", &zip);
    assert_eq!(status, 201, "{created}");
    let second = wait_done(&addr, created["id"].as_u64().unwrap());
    let modules = names(&second);
    // As many pieces as its time over its share (2 or 3, as the machine's load has it).
    let pieces: Vec<&String> = modules
        .iter()
        .filter(|m| m.starts_with("tests/test_big.py ["))
        .collect();
    assert!(pieces.len() >= 2, "{second}");
    let of = pieces.len();
    for index in 1..=of {
        let name = format!("tests/test_big.py [{index}/{of}]");
        assert!(modules.contains(&name), "{name}: {second}");
    }
    assert!(
        !modules.contains(&"tests/test_big.py".to_owned()),
        "{second}"
    );
    assert!(
        modules.contains(&"tests/test_shared.py".to_owned()),
        "{second}"
    );
    assert_serial_counts(&second, "split", &serial);

    let (status, created) = post_file(&addr, "/evaluation?cache=false&split=false", &zip);
    assert_eq!(status, 201, "{created}");
    let whole = wait_done(&addr, created["id"].as_u64().unwrap());
    assert_eq!(names(&whole).len(), 3, "{whole}");
    assert_eq!(whole["tests"], second["tests"]);
}
