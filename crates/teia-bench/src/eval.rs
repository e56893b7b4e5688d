//! The evaluation benchmark: one corpus of projects run by a serial pytest, by
//! `pytest -n N --dist worksteal` (pytest-xdist) and by teia with N nodes of one worker each
//! on this machine (N = 2 and 3), in the same run; with 3 nodes, the same corpus submitted
//! again (every result reused from the cache) and with one module changed (that module
//! alone run), beside the cold run; then the time from `kill -9` of a worker to its module
//! running elsewhere, and from `kill -9` of the owner to the evaluation progressing again on
//! a survivor.
//!
//! The corpus is synthetic and uneven, as real suites are: modules whose tests sleep from
//! 0.1 s to 2 s (the work is waiting, so the machine's two cores do not cap the speed-up of
//! three workers), spread over three projects.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::node::{remove_all, Node, Programs};

/// Flags of the evaluation benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    programs: Programs,
}

/// Seconds of sleep of each module's tests, by project: 24 modules, 22.3 s of work.
const CORPUS: [(&str, &[f64]); 3] = [
    ("parser", &[2.0, 1.6, 1.2, 0.9, 0.6, 0.4, 0.2, 0.1]),
    ("scheduler", &[1.8, 1.5, 1.1, 0.8, 0.5, 0.3, 0.2, 0.1]),
    ("storage", &[1.9, 1.4, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1]),
];

fn write_corpus(root: &Path) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for (project, modules) in CORPUS {
        let tests = root.join(project).join("tests");
        std::fs::create_dir_all(&tests)?;
        for (index, seconds) in modules.iter().enumerate() {
            total += seconds;
            let source = format!(
                "import time\n\ndef test_first():\n    time.sleep({half})\n\ndef test_second():\n    time.sleep({half})\n    assert True\n",
                half = seconds / 2.0
            );
            std::fs::write(tests.join(format!("test_m{index}.py")), source)?;
        }
    }
    Ok(total)
}

/// Times `zip` submitted again to `owner` (the result cache serves every module), then the
/// corpus with one module changed (the longest: it alone runs), against the cold run.
fn resubmissions(
    owner: &str,
    python: &str,
    corpus: &Path,
    dir: &Path,
    zip: &[u8],
    cold: f64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let id = submit(owner, zip)?;
    let done = wait_done(owner, id)?;
    let again = started.elapsed().as_secs_f64();
    let reused = done["projects"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(_, p)| p["modules"].as_object().into_iter().flatten())
        .filter(|(_, m)| m["cached"] == true)
        .count();
    println!(
        "{:<44} {:>8.2} s   ({:.3} of cold; {reused} of 24 modules reused)",
        "teia, 3 nodes, the same corpus again",
        again,
        again / cold
    );
    let changed = corpus.join("parser/tests/test_m0.py");
    let mut source = std::fs::read_to_string(&changed)?;
    source.push_str("\n# changed\n");
    std::fs::write(&changed, source)?;
    let changed_zip = dir.join("changed.zip");
    zip_corpus(python, corpus, &changed_zip)?;
    let started = Instant::now();
    let id = submit(owner, &std::fs::read(&changed_zip)?)?;
    wait_done(owner, id)?;
    let one = started.elapsed().as_secs_f64();
    let module = CORPUS
        .first()
        .and_then(|(_, m)| m.first())
        .copied()
        .unwrap_or(0.0);
    println!(
        "{:<44} {:>8.2} s   ({:.3} of cold; the module alone takes {module:.1} s)",
        "teia, 3 nodes, one module changed",
        one,
        one / cold
    );
    Ok(())
}

fn zip_corpus(python: &str, root: &Path, out: &Path) -> anyhow::Result<()> {
    let status = Command::new(python)
        .args([
            "-c",
            "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_DEFLATED)\nfor r, _, fs in os.walk(sys.argv[1]):\n    for f in sorted(fs):\n        p = os.path.join(r, f)\n        z.write(p, os.path.relpath(p, sys.argv[1]))\nz.close()",
        ])
        .arg(root)
        .arg(out)
        .status()?;
    if !status.success() {
        bail!("cannot zip the corpus");
    }
    Ok(())
}

fn timed(mut command: Command) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = command.output()?;
    if !output.status.success() && output.status.code() != Some(1) {
        bail!(
            "{:?} failed: {}",
            command,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One HTTP request; status and JSON body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn submit(addr: &str, zip: &[u8]) -> anyhow::Result<u64> {
    let boundary = "teiabenchboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"corpus.zip\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(zip);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, answer) = http(
        addr,
        "POST",
        "/evaluation",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    )?;
    if status != 201 {
        bail!(
            "submission of {} bytes to {addr} refused: {status} {answer}",
            zip.len()
        );
    }
    answer["id"].as_u64().context("no id")
}

fn detail(addr: &str, id: u64) -> anyhow::Result<Value> {
    Ok(http(addr, "GET", &format!("/evaluation/{id}"), "text/plain", b"")?.1)
}

/// Flags of each node of an evaluation cluster: one worker, the HTTP API.
const NODE_FLAGS: [&str; 6] = [
    "--workers",
    "1",
    "--cluster-secret",
    "bench",
    "--http",
    "127.0.0.1:0",
];

fn cluster(teia: &Path, dir: &Path, count: usize) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    let owner = Node::start(teia, &dir.join("n0"), "n0", None, &NODE_FLAGS)?;
    let first = format!("127.0.0.1:{}", owner.port);
    nodes.push(owner);
    for index in 1..count {
        let name = format!("n{index}");
        let node = Node::start(teia, &dir.join(&name), &name, Some(&first), &NODE_FLAGS)?;
        nodes.push(node);
    }
    // Let the links come up and the announcements flow.
    std::thread::sleep(Duration::from_secs(2));
    Ok(nodes)
}

fn wait_done(addr: &str, id: u64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let detail = detail(addr, id)?;
        if detail["status"] == "done" {
            return Ok(detail);
        }
        if Instant::now() > deadline {
            bail!("evaluation {id} not done: {detail}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || measure(args)).await?
}

fn measure(args: Args) -> anyhow::Result<()> {
    let teia = args.programs.teia()?;
    let python = args.programs.python;
    let dir = std::env::temp_dir().join(format!("teia-bench-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let corpus = dir.join("corpus");
    let work = write_corpus(&corpus)?;
    let zip_path = dir.join("corpus.zip");
    zip_corpus(&python, &corpus, &zip_path)?;
    let zip = std::fs::read(&zip_path)?;
    println!(
        "corpus: 3 projects, 24 modules, 48 tests, {work:.1} s of work (longest module 2.0 s)"
    );

    let mut serial = 0.0;
    for (project, _) in CORPUS {
        let mut command = Command::new(&python);
        command
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(corpus.join(project));
        serial += timed(command)?;
    }
    println!(
        "{:<44} {:>8.2} s",
        "serial pytest (one project after another)", serial
    );

    for n in [2usize, 3] {
        let ideal = (work / n as f64).max(2.0);
        let mut command = Command::new(&python);
        command
            .args([
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--import-mode=importlib",
            ])
            .args(["-n", &n.to_string(), "--dist", "worksteal"])
            .args(CORPUS.iter().map(|(p, _)| format!("{p}/tests")))
            .current_dir(&corpus);
        let xdist = timed(command)?;
        let nodes = cluster(&teia, &dir.join(format!("c{n}")), n)?;
        let owner = nodes.first().context("no owner")?;
        let started = Instant::now();
        let id = submit(&owner.http, &zip)?;
        let done = wait_done(&owner.http, id)?;
        let teia_time = started.elapsed().as_secs_f64();
        let mut per_node: std::collections::BTreeMap<String, f64> = Default::default();
        for project in done["projects"].as_object().into_iter().flatten() {
            for module in project.1["modules"].as_object().into_iter().flatten() {
                *per_node
                    .entry(module.1["node"].as_str().unwrap_or("?").to_owned())
                    .or_default() += module.1["seconds"].as_f64().unwrap_or(0.0);
            }
        }
        let busiest = per_node.values().cloned().fold(0.0, f64::max);
        let total: f64 = per_node.values().sum();
        println!(
            "{:<44} {:>8.2} s   ({:.2} of ideal {:.2} s)",
            format!("pytest -n {n} --dist worksteal"),
            xdist,
            xdist / ideal,
            ideal
        );
        println!(
            "{:<44} {:>8.2} s   ({:.2} of ideal; {:.2} of xdist; busiest node {:.0} % of the work)",
            format!("teia, {n} nodes of 1 worker"),
            teia_time,
            teia_time / ideal,
            teia_time / xdist,
            busiest * 100.0 / total.max(1e-9)
        );
        if n == 3 {
            resubmissions(&owner.http, &python, &corpus, &dir, &zip, teia_time)?;
        }
        drop(nodes);
    }

    // Failover: a worker killed while it runs a module; then the owner killed.
    let mut nodes = cluster(&teia, &dir.join("failover"), 3)?;
    let owner_http = nodes.first().context("no owner")?.http.clone();
    let survivor_http = nodes.get(1).context("no survivor")?.http.clone();
    let id = submit(&owner_http, &zip)?;
    let victim = nodes.get(2).context("no worker")?.name.clone();
    let victim_module = loop {
        let detail = detail(&owner_http, id)?;
        let found = detail["projects"].as_object().and_then(|projects| {
            projects.iter().find_map(|(project, p)| {
                p["modules"].as_object().and_then(|modules| {
                    modules
                        .iter()
                        .find(|(_, m)| m["status"] == "running" && m["node"] == victim.as_str())
                        .map(|(path, _)| (project.clone(), path.clone()))
                })
            })
        });
        if let Some(found) = found {
            break found;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut worker = nodes.pop().context("no worker")?;
    let killed = Instant::now();
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    let handed = loop {
        let detail = detail(&owner_http, id)?;
        let module = &detail["projects"][&victim_module.0]["modules"][&victim_module.1];
        let elsewhere = (module["status"] == "running" && module["node"] != victim.as_str())
            || module["status"] == "done";
        if elsewhere {
            break killed.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("kill -9 of a worker → its module running elsewhere: {handed:.2} s");
    let before = detail(&survivor_http, id)?["modules"]["executed"]
        .as_u64()
        .unwrap_or(0);
    let mut owner = nodes.remove(0);
    let killed = Instant::now();
    let _ = owner.child.kill();
    let _ = owner.child.wait();
    let resumed = loop {
        let replica = detail(&survivor_http, id)?;
        let executed = replica["modules"]["executed"].as_u64().unwrap_or(0);
        let taken = replica["owner"] != "n0@bench";
        if taken && (executed > before || replica["modules"]["running"].as_u64().unwrap_or(0) > 0) {
            break killed.elapsed().as_secs_f64();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the evaluation did not progress after the owner died: {replica}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("kill -9 of the owner → the evaluation progressing again: {resumed:.2} s");
    drop(nodes);
    remove_all(&dir);
    Ok(())
}
