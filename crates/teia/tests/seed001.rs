//! Seed 001 compatibility on real processes: course workers written in Python from the
//! seed's messages (`tests/seed001/worker.py`), in both envelopes, discover a teia node by
//! UDP broadcast (on loopback), pull the ZIPs of its tasks folder, run them and return
//! their results; a worker that dies with a task has it handed to another; bad messages get
//! an error and the master keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

/// A task ZIP `NAME.zip` in `tasks`: a `main.py` that prints the sum of `input.csv`'s
/// second column, and its `input.csv`.
fn task(tasks: &Path, name: &str, values: &[u32]) {
    let csv: String = std::iter::once("name,value\n".to_owned())
        .chain(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("r{i},{v}\n")),
        )
        .collect();
    let main = "import csv, sys\nrows = list(csv.DictReader(open(sys.argv[1])))\nprint('sum', sum(int(r['value']) for r in rows))\nprint('rows', len(rows), file=sys.stderr)\n";
    zip_task(&tasks.join(format!("{name}.zip")), main, &csv);
}

/// A test's folder and its `tasks` folder in it, made.
fn tasks_folder() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    (dir, tasks)
}

/// Writes a task ZIP at `path` with `main` as `main.py` and `csv` as `input.csv`.
fn zip_task(path: &Path, main: &str, csv: &str) {
    zip_files(path, &[("main.py", main), ("input.csv", csv)]);
}

/// Drops `count` script tasks `tNN.zip` into `dir`'s tasks folder (each made beside, then
/// moved in whole): each sleeps `seconds` and prints `task N`, checked by
/// [`assert_task_outputs`].
fn drop_script_tasks(dir: &Path, count: usize, seconds: f64) {
    let (staging, tasks) = (dir.join("staging"), dir.join("tasks"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&tasks).unwrap();
    let main = format!(
        "import sys, time\ntime.sleep({seconds})\nprint('task', open(sys.argv[1]).read().split()[1])\n"
    );
    for n in 0..count {
        let name = format!("t{n:02}.zip");
        zip_task(&staging.join(&name), &main, &format!("n\n{n}\n"));
        std::fs::rename(staging.join(&name), tasks.join(&name)).unwrap();
    }
}

/// Waits for the results of the tasks of [`drop_script_tasks`] and checks each one's
/// output.
fn assert_task_outputs(dir: &Path, count: usize) {
    for n in 0..count {
        let stdout = result_stdout(&dir.join("results"), &format!("t{n:02}"), PATIENCE * 2);
        assert_eq!(stdout.trim(), format!("task {n}"), "t{n:02}");
    }
}

/// A node of the cluster of our masters (secret `our-lab`), one worker, linked to `peer`.
fn cluster_node(name: &str, peer: &str, extra: &[&str]) -> NodeProcess {
    let mut args = vec![
        "--peer",
        peer,
        "--cluster-secret",
        "our-lab",
        "--workers",
        "1",
    ];
    args.extend_from_slice(extra);
    NodeProcess::start(name, "seed001", &args)
}

/// A teia node serving `tasks` to course workers on discovery port `port` (running none
/// itself).
fn master(dir: &Path, port: u16) -> NodeProcess {
    master_running(dir, port, "0")
}

/// A teia node serving `tasks` on discovery port `port` and running `task_workers` itself.
fn master_running(dir: &Path, port: u16, task_workers: &str) -> NodeProcess {
    master_with(dir, port, task_workers, &[])
}

/// [`master_running`] with `extra` flags.
fn master_with(dir: &Path, port: u16, task_workers: &str, extra: &[&str]) -> NodeProcess {
    let data = tempfile::tempdir().unwrap();
    master_in(data, dir, port, task_workers, extra)
}

/// [`master_with`], the node's own data in `data`.
fn master_in(
    data: tempfile::TempDir,
    dir: &Path,
    port: u16,
    task_workers: &str,
    extra: &[&str],
) -> NodeProcess {
    let tasks = dir.join("tasks");
    let results = dir.join("results");
    let port = port.to_string();
    let mut args = vec![
        "--task-workers",
        task_workers,
        "--peer",
        "127.0.0.1:1",
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--results-dir",
        results.to_str().unwrap(),
        "--master-port",
        "127.0.0.1:0",
        "--discovery-port",
        &port,
    ];
    args.extend_from_slice(extra);
    let node = NodeProcess::start_in(data, "master", "seed001", &args);
    node.process.wait_for_log("seed 001 master listening");
    node
}

/// `python3 tests/seed001/PROGRAM --discovery-port PORT --envelope ENVELOPE`: a course
/// worker or master written from the seed.
fn course_program(program: &str, port: u16, envelope: &str) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/seed001")
        .join(program);
    let mut command = Command::new("python3");
    command.arg(script).args([
        "--discovery-port",
        &port.to_string(),
        "--envelope",
        envelope,
    ]);
    command
}

/// A course worker; killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(dir: &Path, port: u16, envelope: &str, extra: &[&str]) -> Self {
        let work = dir.join(format!("work-{envelope}-{}", extra.len()));
        std::fs::create_dir_all(&work).unwrap();
        let child = course_program("worker.py", port, envelope)
            .arg("--work")
            .arg(&work)
            .args(extra)
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Waits for it to exit, with its status.
    fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `file` of `results/result_NAME.zip`, once it exists (waiting up to `patience`).
fn result_file(results: &Path, name: &str, file: &str, patience: Duration) -> String {
    let path: PathBuf = results.join(format!("result_{name}.zip"));
    let deadline = Instant::now() + patience;
    while !path.exists() {
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = "import sys, zipfile\nsys.stdout.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]).decode())";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .arg(file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{name}: no {file}");
    String::from_utf8(output.stdout).unwrap()
}

/// `stdout.txt` of `results/result_NAME.zip`, once it exists.
fn result_stdout(results: &Path, name: &str, patience: Duration) -> String {
    result_file(results, name, "stdout.txt", patience)
}

#[test]
fn course_workers_in_both_envelopes_discover_pull_run_and_return_tasks() {
    let (dir, tasks) = tasks_folder();
    for i in 0..6u32 {
        task(&tasks, &format!("t{i}"), &[i, 10, 100]);
    }
    let port = free_udp_port();
    let _master = master(dir.path(), port);
    let flat = Worker::start(dir.path(), port, "flat", &[]);
    let typed = Worker::start(dir.path(), port, "typed", &[]);
    // A task dropped in while they work is handed out too.
    task(&tasks, "late", &[1, 2, 3]);
    assert!(flat.wait().success());
    assert!(typed.wait().success());
    let results = dir.path().join("results");
    for i in 0..6u32 {
        let stdout = result_stdout(&results, &format!("t{i}"), PATIENCE);
        assert_eq!(stdout.trim(), format!("sum {}", i + 110));
    }
    assert_eq!(result_stdout(&results, "late", PATIENCE).trim(), "sum 6");
}

#[test]
fn a_worker_that_dies_with_a_task_has_it_handed_to_another() {
    let (dir, tasks) = tasks_folder();
    task(&tasks, "only", &[4, 5]);
    let port = free_udp_port();
    let master = master(dir.path(), port);
    let doomed = Worker::start(dir.path(), port, "flat", &["--die-with-task"]);
    assert!(doomed.wait().success());
    master.process.wait_for_log("task handed out");
    // Another worker waits for it (NO_TASKS meanwhile) until the first is found silent.
    let patient = Worker::start(dir.path(), port, "typed", &["--idle-exit", "200"]);
    let stdout = result_stdout(&dir.path().join("results"), "only", PATIENCE * 2);
    assert_eq!(stdout.trim(), "sum 9");
    master
        .process
        .wait_for_log("a worker went silent; its task goes to another");
    drop(patient);
}

/// With no course worker, the node runs its tasks itself, in the sandbox: the result keeps
/// stdout, stderr, the exit code and duration, and the files the script made.
#[test]
fn the_node_runs_its_tasks_itself_and_keeps_exit_code_and_output_files() {
    let (dir, tasks) = tasks_folder();
    task(&tasks, "plain", &[7, 8]);
    zip_task(
        &tasks.join("fails.zip"),
        "open('report.txt', 'w').write('made here')\nraise SystemExit(3)\n",
        "a\n1\n",
    );
    let _master = master_running(dir.path(), free_udp_port(), "2");
    let results = dir.path().join("results");
    assert_eq!(result_stdout(&results, "plain", PATIENCE).trim(), "sum 15");
    assert_eq!(
        result_file(&results, "plain", "stderr.txt", PATIENCE).trim(),
        "rows 2"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&result_file(&results, "fails", "result.json", PATIENCE)).unwrap();
    assert_eq!(summary["exit_code"], 3, "{summary}");
    assert_eq!(summary["timed_out"], false);
    assert!(summary["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        result_file(&results, "fails", "outputs/report.txt", PATIENCE),
        "made here"
    );
}

/// Tasks that cannot run do not loop: a ZIP whose entry leaves its folder fails to unpack
/// three times and is given up, its result saying why; a file that is not a ZIP is left
/// alone while it may still be being written, then given up; a half-written ZIP waits and
/// runs once whole. The node keeps running the others.
#[test]
fn tasks_that_cannot_run_are_given_up_with_a_result_that_says_why() {
    let (dir, tasks) = tasks_folder();
    zip_files(
        &tasks.join("evil.zip"),
        &[("main.py", "print(1)"), ("../escape.txt", "out")],
    );
    std::fs::write(tasks.join("junk.zip"), "not a zip").unwrap();
    let status = Command::new("touch")
        .args(["-d", "1 minute ago"])
        .arg(tasks.join("junk.zip"))
        .status()
        .unwrap();
    assert!(status.success());
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    task(&staging, "late", &[1, 2]);
    let whole = std::fs::read(staging.join("late.zip")).unwrap();
    std::fs::write(tasks.join("late.zip"), &whole[..whole.len() / 2]).unwrap();
    let master = master_running(dir.path(), free_udp_port(), "1");
    let results = dir.path().join("results");
    for (name, reason) in [("evil", "escape"), ("junk", "not a ZIP")] {
        let summary: serde_json::Value =
            serde_json::from_str(&result_file(&results, name, "result.json", PATIENCE)).unwrap();
        let error = summary["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{name}: {summary}");
        assert_eq!(summary["exit_code"], serde_json::Value::Null);
        let stderr = result_file(&results, name, "stderr.txt", PATIENCE);
        assert!(stderr.contains(reason), "{name}: {stderr}");
    }
    assert!(!dir.path().join("escape.txt").exists());
    assert!(!tasks.join("escape.txt").exists());
    let tries = master
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("task run here") && l.contains("evil.zip"))
        .count();
    assert_eq!(tries, 3, "tried three times, then given up");
    assert!(
        !results.join("result_late.zip").exists(),
        "half a ZIP waits"
    );
    std::fs::write(tasks.join("late.zip"), &whole).unwrap();
    assert_eq!(result_stdout(&results, "late", PATIENCE).trim(), "sum 3");
}

/// Sends `bytes` on a new connection to the master and reads its whole answer.
fn exchange(addr: &str, bytes: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn malformed_and_oversized_messages_get_an_error_and_the_master_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let master = master(dir.path(), port);
    let line = master.process.wait_for_log("seed 001 master listening");
    let addr = field(&line, "bound").to_owned();
    let answer = exchange(&addr, b"{\"action\": REGISTER}");
    assert!(answer.contains("\"ERROR\""), "{answer}");
    let answer = exchange(&addr, b"{\"action\": \"FLY\", \"peer_id\": \"w\"}");
    assert!(answer.contains("FLY"), "{answer}");
    let answer = exchange(&addr, b"{\"type\": \"REGISTER\", \"data\": {}}");
    assert!(
        answer.starts_with("{\"type\":\"ERROR\"") && answer.contains("peer_id"),
        "{answer}"
    );
    let mut huge =
        b"{\"action\": \"SUBMIT_RESULT\", \"peer_id\": \"w\", \"result_data\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'A', 16 * 1024 * 1024));
    let answer = exchange(&addr, &huge);
    assert!(answer.contains("over"), "{answer}");
    // A message in pieces, with no newline, is answered without waiting for the end.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"{\"action\": \"REGISTER\", ").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream.write_all(b"\"peer_id\": \"w1\"}").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "{\"status\":\"REGISTERED\"}");
    // Discovery in the typed envelope is answered in it, unicast.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.send_to(
        b"{\"type\": \"DISCOVER_MASTER\", \"data\": {\"peer_id\": \"w1\"}}",
        ("127.0.0.1", port),
    )
    .unwrap();
    let mut buffer = [0u8; 1024];
    let (len, _) = udp.recv_from(&mut buffer).unwrap();
    let announce: serde_json::Value = serde_json::from_slice(&buffer[..len]).unwrap();
    assert_eq!(announce["type"], "MASTER_ANNOUNCE");
    assert_eq!(
        format!(
            "{}:{}",
            announce["data"]["master_ip"].as_str().unwrap(),
            announce["data"]["master_port"]
        ),
        addr
    );
}

/// `teia worker --master-compat` works for a Python master written from the seed
/// (`tests/seed001/master.py`), in each envelope: it discovers it by broadcast, registers,
/// heartbeats, runs its tasks and submits their results.
#[test]
fn a_teia_worker_works_for_a_python_master_in_both_envelopes() {
    for envelope in ["flat", "typed"] {
        let (dir, tasks) = tasks_folder();
        for i in 0..3u32 {
            task(&tasks, &format!("t{i}"), &[i, 1000]);
        }
        let results = dir.path().join("results");
        let port = free_udp_port();
        let mut master = course_program("master.py", port, envelope);
        master
            .arg("--tasks")
            .arg(&tasks)
            .arg("--results")
            .arg(&results)
            .stdout(std::process::Stdio::piped());
        let mut master = Worker(master.spawn().unwrap());
        let mut lines = std::io::BufReader::new(master.0.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut lines, &mut line).unwrap();
        assert!(line.starts_with("master listening"), "{line}");
        let data = tempfile::tempdir().unwrap();
        let worker = Process::spawn(&[
            "worker",
            "--master-compat",
            "--discovery-port",
            &port.to_string(),
            "--broadcast",
            "127.255.255.255",
            "--data-dir",
            data.path().to_str().unwrap(),
        ]);
        for i in 0..3u32 {
            let stdout = result_stdout(&results, &format!("t{i}"), PATIENCE);
            assert_eq!(stdout.trim(), format!("sum {}", i + 1000), "{envelope}");
        }
        drop(worker);
    }
}

/// A node serving script jobs from `tasks` over HTTP, running `task_workers` itself; its
/// HTTP address.
fn jobs_node(tasks: &Path, task_workers: &str) -> (NodeProcess, String) {
    jobs_node_with(tasks, &["--task-workers", task_workers])
}

/// A node serving script jobs from `tasks` over HTTP, with `extra` flags; its HTTP address.
fn jobs_node_with(tasks: &Path, extra: &[&str]) -> (NodeProcess, String) {
    let discovery = free_udp_port().to_string();
    let mut args = vec![
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--master-port",
        "127.0.0.1:0",
        "--discovery-port",
        &discovery,
    ];
    args.extend_from_slice(extra);
    http_node("jobs", "seed001", &args)
}

/// `POST /jobs` queues a script job on a node with `--tasks-dir`; `GET /jobs/<id>` follows
/// it to its exit code and stdout. Bad jobs get a 4xx; a node without a tasks folder a 503.
#[test]
fn script_jobs_are_submitted_and_followed_over_http() {
    let (dir, tasks) = tasks_folder();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    task(&staging, "sum", &[20, 22]);
    let (_node, addr) = jobs_node(&tasks, "1");
    let (status, created) = post_file(
        &addr,
        "/jobs",
        &std::fs::read(staging.join("sum.zip")).unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + PATIENCE;
    let done = loop {
        let (status, job) = get(&addr, &format!("/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if job["status"] == "done" {
            break job;
        }
        assert!(
            ["queued", "running"].contains(&job["status"].as_str().unwrap()),
            "{job}"
        );
        assert!(Instant::now() < deadline, "not done: {job}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(done["stdout"].as_str().unwrap().trim(), "sum 42");
    let (status, list) = get(&addr, "/jobs");
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        (list["queued"].as_u64(), list["running"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(list["done"], 1, "{list}");
    assert_eq!(list["jobs"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["jobs"][0]["status"], "done", "{list}");
    // The result ZIP itself, as the node stored it.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let head =
        format!("GET /jobs/{id}/result HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/zip"), "{head}");
    let stored =
        std::fs::read(dir.path().join("results").join(format!("result_{id}.zip"))).unwrap();
    assert_eq!(&answer[split + 4..], &stored[..]);
    let (status, missing) = get(&addr, "/jobs/job-0-0/result");
    assert_eq!(status, 404, "{missing}");
    let (status, answer) = post_file(&addr, "/jobs", b"not a zip");
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("main.py"),
        "{answer}"
    );
    let (status, _) = get(&addr, "/jobs/job-0-0");
    assert_eq!(status, 404);
    let (status, _) = get(&addr, "/jobs/..%2F..%2Fetc");
    assert_eq!(status, 404);

    let (plain, plain_addr) = {
        let node = NodeProcess::start(
            "plain",
            "seed001",
            &["--peer", "127.0.0.1:1", "--http", "127.0.0.1:0"],
        );
        let line = node.process.wait_for_log("HTTP API listening");
        let addr = field(&line, "bound").to_owned();
        (node, addr)
    };
    let (status, answer) = post_file(
        &plain_addr,
        "/jobs",
        &std::fs::read(staging.join("sum.zip")).unwrap(),
    );
    assert_eq!(status, 503, "{answer}");
    drop(plain);
}

/// A job no worker can take (the node runs no tasks itself, no course worker asks and no
/// cluster node is linked) is queued with a warning saying why, and its status says it too.
#[test]
fn a_job_nobody_can_take_is_queued_with_a_warning_saying_why() {
    let (dir, tasks) = tasks_folder();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    task(&staging, "sum", &[20, 22]);
    let (_node, addr) = jobs_node(&tasks, "0");
    let (status, created) = post_file(
        &addr,
        "/jobs",
        &std::fs::read(staging.join("sum.zip")).unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let warning = created["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("no worker can take it yet"), "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, job) = get(&addr, &format!("/jobs/{id}"));
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "queued", "{job}");
    assert!(
        job["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("--task-workers 0")),
        "{job}"
    );
}

/// `teia job submit --split-csv 3` cuts a task's input.csv into three row ranges run as
/// three jobs, and prints their stdouts concatenated in order: those of the whole task.
#[test]
fn teia_job_submit_splits_a_csv_and_concatenates_the_stdouts_in_order() {
    let (dir, tasks) = tasks_folder();
    let folder = dir.path().join("rows");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("main.py"),
        "import csv, sys\nfor row in csv.DictReader(open(sys.argv[1])):\n    print(row['value'])\n",
    )
    .unwrap();
    let values: Vec<String> = (1..=10).map(|v| (v * 7).to_string()).collect();
    let csv = format!("value\n{}\n", values.join("\n"));
    std::fs::write(folder.join("input.csv"), csv).unwrap();
    let (_node, addr) = jobs_node(&tasks, "2");
    let saved = dir.path().join("saved");
    let mut child = teia()
        .args(["job", "--node", &addr, "submit", "--split-csv", "3"])
        .arg(&folder)
        .arg("--results")
        .arg(&saved)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "teia job submit did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 job(s) submitted"), "{stdout}");
    let printed: Vec<&str> = stdout
        .split_once("--- stdout of")
        .unwrap()
        .1
        .lines()
        .skip(1)
        .take_while(|l| !l.contains("result(s) saved"))
        .collect();
    assert_eq!(printed, values, "{stdout}");
    // --results saved each part's result ZIP, its stdout the part's rows.
    assert!(stdout.contains("3 result(s) saved"), "{stdout}");
    let mut rows = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in names {
        let id = name.trim_start_matches("result_").trim_end_matches(".zip");
        rows.extend(
            result_stdout(&saved, id, PATIENCE)
                .lines()
                .map(str::to_owned),
        );
    }
    assert_eq!(rows, values);
}

/// A script job of 20 tasks dropped in the tasks folder of a node with one worker of its
/// own, run with two more nodes of its cluster (one worker each); one of them is killed
/// with `kill -9` while it runs a task. Every task gets one result, with its own output:
/// the killed node's task went to another node.
#[test]
fn a_script_job_over_three_nodes_survives_a_node_killed_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--cluster-secret", "our-lab", "--workers", "1"];
    let owner = master_with(dir.path(), free_udp_port(), "1", &extra);
    let steady = cluster_node("steady", &owner.addr(), &[]);
    let mut doomed = cluster_node("doomed", &owner.addr(), &[]);
    owner.wait_link(&steady.peer_id);
    owner.wait_link(&doomed.peer_id);
    drop_script_tasks(dir.path(), 20, 1.5);
    let (_, running) = doomed
        .process
        .wait_for_log_after("script task running here", 0);
    let held = field(&running, "task").to_owned();
    steady.process.wait_for_log("script task running here");
    doomed.process.child.kill().unwrap();
    doomed.process.child.wait().unwrap();

    assert_task_outputs(dir.path(), 20);
    // The task the killed node held went to another, unless it had delivered it.
    let delivered = doomed
        .process
        .lines()
        .iter()
        .any(|l| l.contains("result delivered") && field(l, "task") == held);
    if !delivered {
        owner.process.wait_for_log("let its task go");
    }
    let stored: Vec<String> = owner
        .process
        .lines()
        .into_iter()
        .filter(|l| l.contains("result stored"))
        .collect();
    assert_eq!(
        stored.len(),
        20,
        "one result per task:\n{}",
        stored.join("\n")
    );
    let ran_remotely = steady
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("result delivered"))
        .count();
    assert!(ran_remotely > 0, "the steady node ran none");
}

/// The owner of a script job killed with `kill -9` while a node of its cluster runs one of
/// its tasks, and started again on the same folders (with no worker of its own), finishes
/// the job on that node: every task gets its result, and no partial result is left behind.
#[test]
fn a_script_job_survives_its_owner_killed_and_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let discovery = free_udp_port();
    let extra = [
        "--cluster-secret",
        "our-lab",
        "--workers",
        "1",
        "--port",
        &port,
    ];
    let owner = master_with(dir.path(), discovery, "1", &extra);
    let helper = cluster_node("helper", &format!("127.0.0.1:{port}"), &[]);
    owner.wait_link(&helper.peer_id);
    drop_script_tasks(dir.path(), 8, 1.0);
    helper.process.wait_for_log("script task running here");
    let data = owner.kill9();
    let restarted_at = helper.process.log_len();
    // Started again with no worker of its own: the helper runs what is left.
    let owner = master_in(data, dir.path(), discovery, "0", &extra);
    assert_task_outputs(dir.path(), 8);
    helper
        .process
        .wait_for_log_after("result delivered", restarted_at);
    let litter: Vec<String> = std::fs::read_dir(dir.path().join("results"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(litter.is_empty(), "partial results left: {litter:?}");
    drop(owner);
}

/// Script tasks need Python, not pytest: a node of the cluster whose Python has no pytest
/// (a bare virtual environment, in /tmp) runs them, and says it runs no test modules.
#[test]
fn a_node_whose_python_has_no_pytest_runs_script_tasks() {
    let dir = tempfile::tempdir().unwrap();
    // In /tmp, which the sandbox replaces with its own: the interpreter's prefix is shown.
    let venv = dir.path().join("bare");
    let status = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "python3 -m venv (.ci/run installs python3-venv)"
    );
    let bare = venv.join("bin").join("python");
    let probe = Command::new(&bare)
        .args(["-c", "import pytest"])
        .output()
        .unwrap();
    assert!(!probe.status.success(), "the bare environment has pytest");
    let extra = ["--cluster-secret", "our-lab", "--workers", "1"];
    let owner = master_with(dir.path(), free_udp_port(), "0", &extra);
    let worker = cluster_node("bare", &owner.addr(), &["--python", bare.to_str().unwrap()]);
    worker
        .process
        .wait_for_log("runs script tasks but no test modules");
    owner.wait_link(&worker.peer_id);
    let tasks = dir.path().join("tasks");
    task(&tasks, "first", &[1, 2, 3]);
    task(&tasks, "second", &[4]);
    let results = dir.path().join("results");
    assert_eq!(result_stdout(&results, "first", PATIENCE).trim(), "sum 6");
    assert_eq!(result_stdout(&results, "second", PATIENCE).trim(), "sum 4");
    let summary: serde_json::Value =
        serde_json::from_str(&result_file(&results, "first", "result.json", PATIENCE)).unwrap();
    assert_eq!(summary["node"], worker.peer_id.as_str(), "{summary}");
}

/// A task that leaves a link to the node's `/proc/self/cmdline` as its `stdout.txt`, a
/// link to `/dev/zero` and a FIFO among its outputs: the node follows none of them (its
/// secret is not in the result), is not blocked or flooded, and the job ends.
#[test]
fn links_and_fifos_a_task_leaves_are_not_followed() {
    let (dir, tasks) = tasks_folder();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let main = "import os\nprint('before')\nos.remove('stdout.txt')\nos.symlink('/proc/self/cmdline', 'stdout.txt')\nos.symlink('/dev/zero', 'zero.txt')\nos.mkfifo('fifo.txt')\n";
    zip_task(&staging.join("tricks.zip"), main, "name,value\n");
    let (_node, addr) = jobs_node_with(&tasks, &["--cluster-secret", "secret-of-the-node"]);
    let (status, created) = post_file(
        &addr,
        "/jobs",
        &std::fs::read(staging.join("tricks.zip")).unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + PATIENCE;
    let done = loop {
        let (status, job) = get(&addr, &format!("/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if job["status"] == "done" {
            break job;
        }
        assert!(Instant::now() < deadline, "not done: {job}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!done.to_string().contains("secret-of-the-node"), "{done}");
    assert_eq!(done["exit_code"], 0, "{done}");
    // The node still serves, and kept nothing of /dev/zero.
    let (status, list) = get(&addr, "/jobs");
    assert_eq!((status, list["done"].as_u64()), (200, Some(1)), "{list}");
}

/// A connection to the master at `addr` from the loopback address `source` (any
/// 127.x.y.z: each is a source of its own to the master), blocking.
fn dial_from(source: &str, addr: &str) -> std::io::Result<std::net::TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{source}:0").parse().unwrap())?;
        socket.connect(addr.parse().unwrap()).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends `message` from `source` on a new connection and reads the master's whole answer
/// (empty when it closed without one).
fn ask_from(source: &str, addr: &str, message: &serde_json::Value) -> String {
    let mut stream = dial_from(source, addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = stream.write_all(message.to_string().as_bytes());
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// A result as a course worker sends it: the ZIP of `stdout.txt` (and an empty
/// `stderr.txt`), in base64.
fn result_data(dir: &Path, stdout: &str) -> String {
    result_data_with(dir, &[("stdout.txt", stdout), ("stderr.txt", "")])
}

/// A result made of `files`, zipped, in base64.
fn result_data_with(dir: &Path, files: &[(&str, &str)]) -> String {
    let path = dir.join("result-to-send.zip");
    zip_files(&path, files);
    let script = "import base64, sys\nsys.stdout.write(base64.b64encode(open(sys.argv[1], 'rb').read()).decode())";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

/// The TCP address of a master started by [`master`] and the like.
fn master_addr(master: &NodeProcess) -> String {
    let line = master.process.wait_for_log("seed 001 master listening");
    field(&line, "bound").to_owned()
}

/// A worker holds a task (its private `input.csv` with it); a stranger naming that task,
/// naming none, or giving the worker's own id from another address, cannot return its
/// result nor take it: each is answered the protocol's `ERROR` and nothing is written. The
/// real worker's result is the one stored.
#[test]
fn a_stranger_cannot_return_the_result_of_a_task_leased_to_a_worker() {
    let (dir, tasks) = tasks_folder();
    task(&tasks, "private", &[1, 2]);
    let master = master(dir.path(), free_udp_port());
    let line = master.process.wait_for_log("seed 001 master listening");
    assert!(
        field(&line, "allow").split(',').any(|n| n == "127.0.0.0/8"),
        "loopback is allowed by default: {line}"
    );
    let addr = master_addr(&master);
    let results = dir.path().join("results");
    let ask = serde_json::json!({"action": "REQUEST_TASK", "peer_id": "real"});
    let taken = ask_from("127.0.0.1", &addr, &ask);
    assert!(
        taken.contains("TASK_PACKAGE") && taken.contains("private.zip"),
        "{taken}"
    );
    let forged = result_data(dir.path(), "FORGED BY A STRANGER");
    for (source, peer_id, named, error) in [
        (
            "127.0.0.2",
            "stranger",
            Some("private.zip"),
            "private.zip is not leased to you",
        ),
        (
            "127.0.0.2",
            "real",
            Some("private.zip"),
            "private.zip is not leased to you",
        ),
        (
            "127.0.0.1",
            "stranger",
            Some("result_private.zip"),
            "result_private.zip is not leased to you",
        ),
        ("127.0.0.2", "real", None, "you hold no task"),
        ("127.0.0.1", "teia:local-0", None, "you hold no task"),
    ] {
        let mut submit = serde_json::json!({
            "action": "SUBMIT_RESULT",
            "peer_id": peer_id,
            "result_data": forged,
        });
        if let Some(named) = named {
            submit["result_name"] = named.into();
        }
        let answer: serde_json::Value =
            serde_json::from_str(&ask_from(source, &addr, &submit)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"status": "ERROR", "message": error}),
            "{peer_id} from {source}"
        );
        assert!(!results.join("result_private.zip").exists());
    }
    // In the typed envelope, the refusal is typed.
    let typed = serde_json::json!({"type": "SUBMIT_RESULT", "data": {
        "peer_id": "stranger", "task_name": "private.zip", "result_data": forged}});
    let answer: serde_json::Value =
        serde_json::from_str(&ask_from("127.0.0.2", &addr, &typed)).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"type": "ERROR", "data": {"message": "private.zip is not leased to you"}})
    );
    master
        .process
        .wait_for_log("result refused: not from the task's lease holder");
    // The worker's id from another address is another worker: it does not get the task.
    let answer = ask_from("127.0.0.2", &addr, &ask);
    assert_eq!(answer, "{\"action\":\"NO_TASKS\"}");
    // Its result.json, claiming the node ran it, is not kept: that file is the node's own
    // account of the runs teia workers make.
    let real = result_data_with(
        dir.path(),
        &[
            ("stdout.txt", "sum 3"),
            ("stderr.txt", ""),
            (
                "result.json",
                "{\"exit_code\": 0, \"node\": \"master@seed001\"}",
            ),
        ],
    );
    let submit = serde_json::json!({
        "action": "SUBMIT_RESULT",
        "peer_id": "real",
        "result_name": "private.zip",
        "result_data": real,
    });
    assert_eq!(ask_from("127.0.0.1", &addr, &submit), "{\"status\":\"OK\"}");
    // Sent again (its OK lost), it is thanked and dropped.
    assert_eq!(ask_from("127.0.0.1", &addr, &submit), "{\"status\":\"OK\"}");
    assert_eq!(result_stdout(&results, "private", PATIENCE).trim(), "sum 3");
    let names = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\nprint(' '.join(sorted(zipfile.ZipFile(sys.argv[1]).namelist())))",
        ])
        .arg(results.join("result_private.zip"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&names.stdout).trim(),
        "stderr.txt stdout.txt"
    );
    let mut late = submit.clone();
    late["peer_id"] = "stranger".into();
    late["result_data"] = forged.into();
    assert!(ask_from("127.0.0.2", &addr, &late).contains("ERROR"));
    assert_eq!(result_stdout(&results, "private", PATIENCE).trim(), "sum 3");
}

/// While the node runs a task itself, a course worker naming that task, or giving the
/// node's own worker's name, cannot put its result in place of the node's.
#[test]
fn a_stranger_cannot_replace_the_result_of_a_task_the_node_runs() {
    let (dir, tasks) = tasks_folder();
    zip_task(
        &tasks.join("slow.zip"),
        "import time\ntime.sleep(2)\nprint('run by the node')\n",
        "a\n1\n",
    );
    let master = master_running(dir.path(), free_udp_port(), "1");
    let addr = master_addr(&master);
    master.process.wait_for_log("task run here");
    let forged = result_data(dir.path(), "FORGED BY A STRANGER");
    for (source, peer_id) in [("127.0.0.2", "stranger"), ("127.0.0.1", "teia:local-0")] {
        let submit = serde_json::json!({
            "action": "SUBMIT_RESULT",
            "peer_id": peer_id,
            "result_name": "slow.zip",
            "result_data": forged,
        });
        let answer = ask_from(source, &addr, &submit);
        assert_eq!(
            answer,
            "{\"status\":\"ERROR\",\"message\":\"slow.zip is not leased to you\"}"
        );
    }
    let results = dir.path().join("results");
    assert_eq!(
        result_stdout(&results, "slow", PATIENCE).trim(),
        "run by the node"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&result_file(&results, "slow", "result.json", PATIENCE)).unwrap();
    assert_eq!(summary["exit_code"], 0, "{summary}");
}

/// Connections from `sources` (`per_source` from each) that send nothing, each opened again
/// as soon as the master closes it, until `stop`.
fn idlers(
    addr: &str,
    sources: &[&str],
    per_source: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for source in sources {
        for _ in 0..per_source {
            let (addr, source, stop) = (addr.to_owned(), source.to_string(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut stream) = dial_from(&source, &addr) else {
                        continue;
                    };
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let mut buffer = [0u8; 256];
                    loop {
                        match stream.read(&mut buffer) {
                            Ok(_) => break,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    // Closed or refused: open it again soon, not in a tight loop.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
    }
    threads
}

/// 80 connections from four other addresses that send nothing, opened again as soon as
/// they are closed, do not keep a real course worker waiting: each source gets 16 at once,
/// the others are refused at once, silent ones are closed after 5 s, and the worker (from
/// 127.0.0.1) is served all along.
#[test]
fn idle_connections_do_not_delay_a_real_worker() {
    let (dir, tasks) = tasks_folder();
    for i in 0..3u32 {
        task(&tasks, &format!("t{i}"), &[i, 20]);
    }
    let port = free_udp_port();
    let master = master(dir.path(), port);
    let addr = master_addr(&master);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = idlers(
        &addr,
        &["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"],
        20,
        &stop,
    );
    master
        .process
        .wait_for_log("seed 001 connection refused: too many from one address");
    // The worker's requests time out after 30 s: it succeeds only if it is never kept
    // waiting behind the silent connections.
    let worker = Worker::start(dir.path(), port, "flat", &[]);
    let status = worker.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(status.success());
    let results = dir.path().join("results");
    for i in 0..3u32 {
        let stdout = result_stdout(&results, &format!("t{i}"), PATIENCE);
        assert_eq!(stdout.trim(), format!("sum {}", i + 20));
    }
}

/// Peak resident memory of process `pid`, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// 24 connections from six addresses each send 15 MiB of one result and never end it
/// (a space a second keeps them from being idle): the master keeps no more than its
/// budget, refuses the rest with an error, and serves a real worker meanwhile; its peak
/// memory stays far below what it was sent.
#[test]
fn big_messages_past_the_buffer_budget_are_refused_and_the_master_keeps_serving() {
    let (dir, tasks) = tasks_folder();
    task(&tasks, "after", &[5, 6]);
    let port = free_udp_port();
    let master = master(dir.path(), port);
    let addr = master_addr(&master);
    let mut body =
        b"{\"action\": \"SUBMIT_RESULT\", \"peer_id\": \"flood\", \"result_data\": \"".to_vec();
    body.extend(std::iter::repeat_n(b'A', 15 * 1024 * 1024));
    let body = std::sync::Arc::new(body);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for source in 2..8 {
        for _ in 0..4 {
            let (addr, body, stop, answers) =
                (addr.clone(), body.clone(), stop.clone(), answers.clone());
            threads.push(std::thread::spawn(move || {
                let Ok(mut stream) = dial_from(&format!("127.0.0.{source}"), &addr) else {
                    return;
                };
                stream
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .unwrap();
                let sent = stream.write_all(&body).is_ok();
                let deadline = Instant::now() + PATIENCE;
                let mut answer = Vec::new();
                while sent && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut buffer = [0u8; 1024];
                    match stream.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buffer[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if Instant::now() > deadline || stream.write_all(b" ").is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                answers
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&answer).into_owned());
            }));
        }
    }
    master.process.wait_for_log("buffer budget is spent");
    let worker = Worker::start(dir.path(), port, "typed", &[]);
    let status = worker.wait();
    let results = dir.path().join("results");
    assert!(status.success());
    assert_eq!(result_stdout(&results, "after", PATIENCE).trim(), "sum 11");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let answers = answers.lock().unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.is_empty() || a.contains("too much at once")),
        "{answers:?}"
    );
    // 360 MiB were sent; the master kept at most its 64 MiB budget of them.
    let peak = peak_rss_kb(master.process.child.id());
    eprintln!("peak RSS of the master: {peak} kB");
    assert!(peak < 400 * 1024, "peak RSS {peak} kB");
}

/// With `--master-allow 127.0.0.2/32`, a connection from 127.0.0.1 is closed unanswered
/// and its discovery gets no answer; 127.0.0.2 is served.
#[test]
fn a_source_outside_master_allow_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let master = master_with(dir.path(), port, "0", &["--master-allow", "127.0.0.2/32"]);
    let line = master.process.wait_for_log("seed 001 master listening");
    assert_eq!(field(&line, "allow"), "127.0.0.2/32");
    let addr = master_addr(&master);
    let register = serde_json::json!({"action": "REGISTER", "peer_id": "w"});
    assert_eq!(ask_from("127.0.0.1", &addr, &register), "");
    master
        .process
        .wait_for_log("seed 001 connection refused: source outside --master-allow");
    assert_eq!(
        ask_from("127.0.0.2", &addr, &register),
        "{\"status\":\"REGISTERED\"}"
    );
    // Discovery: asked from 127.0.0.1 first, then from 127.0.0.2; only the second is
    // answered (the master answers in order: the first was dropped, not delayed).
    let outside = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let inside = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    inside.set_read_timeout(Some(PATIENCE)).unwrap();
    let discover = b"{\"action\": \"DISCOVER_MASTER\", \"peer_id\": \"w\", \"port_tcp\": 0}";
    outside.send_to(discover, ("127.0.0.1", port)).unwrap();
    inside.send_to(discover, ("127.0.0.1", port)).unwrap();
    let mut buffer = [0u8; 1024];
    let (len, _) = inside.recv_from(&mut buffer).unwrap();
    let announce: serde_json::Value = serde_json::from_slice(&buffer[..len]).unwrap();
    assert_eq!(announce["action"], "MASTER_ANNOUNCE");
    outside.set_nonblocking(true).unwrap();
    assert_eq!(
        outside.recv_from(&mut buffer).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

/// A task gets no descriptor its node inherited (here a file that whoever started the node
/// left open), and its processes die with the node: killed with SIGKILL in the middle of a
/// task, the node leaves nothing of it running.
#[test]
fn a_task_gets_nothing_the_node_inherited_and_dies_with_the_node() {
    task_gets_nothing_inherited_and_dies_with_node(true);
}

/// The same without a sandbox (no `bwrap` on the node's `PATH`, `--unsandboxed`): the warm
/// interpreter kills what it forked when its node is gone.
#[test]
fn without_a_sandbox_a_task_still_dies_with_the_node() {
    task_gets_nothing_inherited_and_dies_with_node(false);
}

fn task_gets_nothing_inherited_and_dies_with_node(sandboxed: bool) {
    let (dir, tasks) = tasks_folder();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let inherited = dir.path().join("inherited-by-the-node");
    // The node started by a shell that leaves descriptor 7 open, as `flock FILE teia` does.
    let mut wrapper = Command::new("bash");
    wrapper
        .env("TEIA_NO_LAN", "1")
        .args(["-c", "exec 7>>\"$0\" && exec \"$@\""])
        .arg(&inherited)
        .arg(env!("CARGO_BIN_EXE_teia"));
    if !sandboxed {
        // The programs a node and these tasks use, and no bwrap.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let python = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap();
        let python = String::from_utf8(python.stdout).unwrap();
        std::os::unix::fs::symlink(python.trim(), bin.join("python3")).unwrap();
        for program in ["bash", "sh", "sleep", "env"] {
            let found = Command::new("sh")
                .args(["-c", "command -v \"$0\"", program])
                .output()
                .unwrap();
            let path = String::from_utf8(found.stdout).unwrap();
            std::os::unix::fs::symlink(path.trim(), bin.join(program)).unwrap();
        }
        wrapper.env("PATH", &bin);
    }
    let discovery = free_udp_port().to_string();
    let mut flags = vec![
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--master-port",
        "127.0.0.1:0",
        "--discovery-port",
        &discovery,
        "--http",
        "127.0.0.1:0",
        "--peer",
        "127.0.0.1:1",
    ];
    if !sandboxed {
        flags.push("--unsandboxed");
    }
    let node = NodeProcess::start_with(
        wrapper,
        tempfile::tempdir().unwrap(),
        "jobs",
        "seed001",
        &flags,
    );

    let listening = node.wait_event("http_listening", |e| e["event"] == "http_listening");
    let addr = listening["addr"].as_str().unwrap().to_owned();
    let look = "import os\nprint('pid', os.getpid())\nfor fd in sorted(os.listdir('/proc/self/fd')):\n    try:\n        print(fd, os.readlink('/proc/self/fd/' + fd))\n    except OSError:\n        pass\n";
    zip_task(&staging.join("look.zip"), look, "name,value\n");
    let looked = run_job(&addr, &staging.join("look.zip"));
    assert_eq!(looked["exit_code"], 0, "{looked}");
    let seen = looked["stdout"].as_str().unwrap();
    assert!(seen.contains("stdout.txt"), "{looked}");
    assert!(!seen.contains("inherited-by-the-node"), "{seen}");
    // In the sandbox, the task has a PID namespace of its own.
    assert_eq!(
        seen.lines().any(|line| line == "pid 1" || line == "pid 2"),
        sandboxed,
        "{seen}"
    );

    zip_task(
        &staging.join("forever.zip"),
        "import subprocess, time\nsubprocess.Popen(['sleep', '3600'])\ntime.sleep(3600)\n",
        "name,value\n",
    );
    let (status, created) = post_file(
        &addr,
        "/jobs",
        &std::fs::read(staging.join("forever.zip")).unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let node_pid = node.process.child.id();
    // Running, and its `sleep` started: the node's descendants then include it.
    let deadline = Instant::now() + PATIENCE;
    let started = loop {
        let (_, job) = get(&addr, &format!("/jobs/{id}"));
        let family = descendants(node_pid);
        if job["status"] == "running" && family.iter().any(|p| p.command == "sleep") {
            break family;
        }
        assert!(Instant::now() < deadline, "not running: {job}");
        std::thread::sleep(Duration::from_millis(50));
    };
    node.kill9();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: Vec<&Descendant> = started.iter().filter(|p| p.still_running()).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left running after the node died: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Posts the job ZIP at `zip` to the node at `addr` and waits until it is done.
fn run_job(addr: &str, zip: &Path) -> serde_json::Value {
    let (status, created) = post_file(addr, "/jobs", &std::fs::read(zip).unwrap());
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, job) = get(addr, &format!("/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if job["status"] == "done" {
            return job;
        }
        assert!(Instant::now() < deadline, "not done: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process started, directly or not, by one of this test's processes.
#[derive(Debug)]
struct Descendant {
    pid: u32,
    /// Its start time (clock ticks since boot): tells it from a later process of its pid.
    started: u64,
    command: String,
}

impl Descendant {
    /// Still running (not ended, not a zombie waiting for a reaper).
    fn still_running(&self) -> bool {
        stat_of(self.pid)
            .is_some_and(|(state, _, started, _)| started == self.started && state != 'Z')
    }
}

/// (state, parent pid, start time, command name) of `pid`, from `/proc/PID/stat`.
fn stat_of(pid: u32) -> Option<(char, u32, u64, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let command = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let parent = fields.get(1)?.parse().ok()?;
    let started = fields.get(19)?.parse().ok()?;
    Some((state, parent, started, command))
}

/// Every living process under `root`, by parent links in `/proc`.
fn descendants(root: u32) -> Vec<Descendant> {
    let all: Vec<(u32, char, u32, u64, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (state, parent, started, command) = stat_of(pid)?;
            Some((pid, state, parent, started, command))
        })
        .collect();
    let mut family = vec![root];
    let mut found = Vec::new();
    while let Some(parent) = family.pop() {
        for (pid, state, _, started, command) in all.iter().filter(|p| p.2 == parent) {
            family.push(*pid);
            if *state != 'Z' {
                found.push(Descendant {
                    pid: *pid,
                    started: *started,
                    command: command.clone(),
                });
            }
        }
    }
    found
}
