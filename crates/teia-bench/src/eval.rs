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
//!
//! Then two corpora for splitting and its cost, with 3 nodes: one whose module of 24 tests
//! takes 12 s of 18, its first test 4 s (a straggler: whole, it decides the makespan), run once (never seen:
//! whole) and again with the cache off (its duration known: split), against xdist; and
//! one of 60 modules of one fast test (where neither the cache nor splitting can help), on
//! nodes with both on and on nodes with both off, seven times each, alternating.
//!
//! Last, real projects from PyPI (cachetools, tabulate and more-itertools, whose
//! `test_more.py` dominates its suite) by a serial pytest, by xdist with 2 and 3 workers,
//! and by teia with 2 and 3 nodes, cold (never seen: the dominant module split by its
//! source's tests), again (served by the cache) and again with the cache off (split by its
//! durations), every run's counts checked against the serial pytest's.

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
    /// Run one part only (all by default).
    #[arg(long, value_enum)]
    only: Option<Part>,
}

/// A part of the evaluation benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// The synthetic corpus against serial pytest and xdist, the cache, and failover.
    Corpus,
    /// The straggler corpus, whole then split, against xdist.
    Stragglers,
    /// Tiny modules with the cache and splitting on and off.
    Tiny,
    /// Real projects from PyPI, against xdist, counts checked.
    Real,
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
    submit_to(addr, "/evaluation", zip)
}

fn submit_to(addr: &str, path: &str, zip: &[u8]) -> anyhow::Result<u64> {
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
        path,
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
    cluster_with(teia, dir, count, &[])
}

fn cluster_with(
    teia: &Path,
    dir: &Path,
    count: usize,
    extra: &[&str],
) -> anyhow::Result<Vec<Node>> {
    let flags: Vec<&str> = NODE_FLAGS.iter().chain(extra).copied().collect();
    let mut nodes = Vec::new();
    let owner = Node::start(teia, &dir.join("n0"), "n0", None, &flags)?;
    let first = format!("127.0.0.1:{}", owner.port);
    nodes.push(owner);
    for index in 1..count {
        let name = format!("n{index}");
        let node = Node::start(teia, &dir.join(&name), &name, Some(&first), &flags)?;
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
    let wanted = |part: Part| args.only.is_none_or(|only| only == part);
    if wanted(Part::Corpus) {
        corpus(&teia, &python, &dir)?;
    }
    if wanted(Part::Stragglers) {
        stragglers(&teia, &python, &dir)?;
    }
    if wanted(Part::Tiny) {
        tiny_modules(&teia, &python, &dir)?;
    }
    if wanted(Part::Real) {
        real_projects(&teia, &python, &dir)?;
    }
    remove_all(&dir);
    Ok(())
}

/// The synthetic corpus by serial pytest, xdist and teia with 2 and 3 nodes, submitted
/// again and with one module changed, then failover.
fn corpus(teia: &Path, python: &str, dir: &Path) -> anyhow::Result<()> {
    let corpus = dir.join("corpus");
    let work = write_corpus(&corpus)?;
    let zip_path = dir.join("corpus.zip");
    zip_corpus(python, &corpus, &zip_path)?;
    let zip = std::fs::read(&zip_path)?;
    println!(
        "corpus: 3 projects, 24 modules, 48 tests, {work:.1} s of work (longest module 2.0 s)"
    );

    let mut serial = 0.0;
    for (project, _) in CORPUS {
        let mut command = Command::new(python);
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
        let mut command = Command::new(python);
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
        let nodes = cluster(teia, &dir.join(format!("c{n}")), n)?;
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
            resubmissions(&owner.http, python, &corpus, dir, &zip, teia_time)?;
        }
        drop(nodes);
    }

    // Failover: a worker killed while it runs a module; then the owner killed.
    let mut nodes = cluster(teia, &dir.join("failover"), 3)?;
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
    Ok(())
}

/// Seconds of the straggler corpus's dominant module, and its tests: its first test takes
/// [`SLOW_FIRST`] of them, the others share the rest (pieces cut by count would be uneven).
const STRAGGLER: (f64, usize) = (12.0, 24);

/// Seconds the straggler's first test takes.
const SLOW_FIRST: f64 = 4.0;

/// Seconds of each of the straggler corpus's other modules (2 tests each).
const OTHERS: [f64; 6] = [1.0; 6];

/// One module of `tests` tests sleeping `seconds` in all, the first `first` of them.
fn sleeping_module(seconds: f64, tests: usize, first: f64) -> String {
    let each = (seconds - first) / (tests - 1).max(1) as f64;
    format!(
        "import time, pytest\n\n@pytest.mark.parametrize('n', range({tests}))\ndef test_sleep(n):\n    time.sleep({first} if n == 0 else {each})\n"
    )
}

/// A corpus whose one module takes most of the work, on 3 nodes: run whole (never seen),
/// then split (its duration known; the cache off), against `pytest -n 3 --dist worksteal`.
fn stragglers(teia: &Path, python: &str, dir: &Path) -> anyhow::Result<()> {
    let corpus = dir.join("stragglers");
    let tests = corpus.join("report").join("tests");
    std::fs::create_dir_all(&tests)?;
    std::fs::write(
        tests.join("test_big.py"),
        sleeping_module(STRAGGLER.0, STRAGGLER.1, SLOW_FIRST),
    )?;
    for (index, seconds) in OTHERS.iter().enumerate() {
        std::fs::write(
            tests.join(format!("test_m{index}.py")),
            sleeping_module(*seconds, 2, seconds / 2.0),
        )?;
    }
    let work = STRAGGLER.0 + OTHERS.iter().sum::<f64>();
    let zip_path = dir.join("stragglers.zip");
    zip_corpus(python, &corpus, &zip_path)?;
    let zip = std::fs::read(&zip_path)?;
    println!(
        "straggler corpus: 1 project, 7 modules, {work:.0} s of work, one module {:.0} s ({} tests, the first {SLOW_FIRST:.0} s)",
        STRAGGLER.0, STRAGGLER.1
    );
    let mut command = Command::new(python);
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .args(["-n", "3", "--dist", "worksteal", "report/tests"])
        .current_dir(&corpus);
    let xdist = timed(command)?;
    let ideal = work / 3.0;
    println!(
        "{:<44} {:>8.2} s   ({:.2} of ideal {ideal:.2} s)",
        "pytest -n 3 --dist worksteal",
        xdist,
        xdist / ideal
    );
    let nodes = cluster(teia, &dir.join("s3"), 3)?;
    let owner = &nodes.first().context("no owner")?.http;
    let started = Instant::now();
    let id = submit(owner, &zip)?;
    wait_done(owner, id)?;
    let whole = started.elapsed().as_secs_f64();
    println!(
        "{:<44} {:>8.2} s   ({:.2} of xdist; never seen: each module whole)",
        "teia, 3 nodes, first run",
        whole,
        whole / xdist
    );
    let started = Instant::now();
    let id = submit_to(owner, "/evaluation?cache=false", &zip)?;
    let done = wait_done(owner, id)?;
    let split = started.elapsed().as_secs_f64();
    let pieces = done["projects"]["report"]["modules"]
        .as_object()
        .map_or(0, |m| m.keys().filter(|k| k.contains(" [")).count());
    println!(
        "{:<44} {:>8.2} s   ({:.2} of xdist; {:.2} of the first run; the straggler in {pieces} pieces)",
        "teia, 3 nodes, again (cache off)",
        split,
        split / xdist,
        split / whole
    );
    drop(nodes);
    Ok(())
}

/// The real projects: cachetools and tabulate from the tests' corpus
/// (`crates/teia/tests/corpus`, 768 tests), and more-itertools from the benchmark's
/// (`crates/teia-bench/corpus`, 765 tests, one module dominating), each with the folder
/// it is in, from this crate's.
const REAL: [(&str, &str); 3] = [
    ("../teia/tests/corpus", "cachetools"),
    ("../teia/tests/corpus", "tabulate"),
    ("corpus", "more_itertools"),
];

/// Tests a pytest summary line says passed, failed and skipped.
fn summary_counts(output: &str) -> [u64; 3] {
    let mut counts = [0; 3];
    let words: Vec<&str> = output
        .lines()
        .last()
        .unwrap_or_default()
        .split([' ', ','])
        .collect();
    for pair in words.windows(2) {
        if let [number, word] = pair {
            let slot = match *word {
                "passed" => 0,
                "failed" => 1,
                "skipped" => 2,
                _ => continue,
            };
            if let (Some(count), Ok(n)) = (counts.get_mut(slot), number.parse::<u64>()) {
                *count = n;
            }
        }
    }
    counts
}

/// The real projects by serial pytest and `pytest -n 3 --dist worksteal`, each project
/// after the other, and by teia on 3 nodes in one submission, cold then again with the
/// cache off; each run's counts against the serial pytest's.
fn real_projects(teia: &Path, python: &str, dir: &Path) -> anyhow::Result<()> {
    let corpus = dir.join("real");
    let mut serial_counts = [0u64; 3];
    let mut serial = 0.0;
    let mut xdist = [0.0; 2];
    for (folder, project) in REAL {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
        copy_tree(&source.join(project), &corpus.join(project))?;
        let started = Instant::now();
        let output = Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(corpus.join(project))
            .output()?;
        serial += started.elapsed().as_secs_f64();
        let counts = summary_counts(String::from_utf8_lossy(&output.stdout).trim_end());
        for (total, count) in serial_counts.iter_mut().zip(counts) {
            *total += count;
        }
        for (workers, total) in [2, 3].into_iter().zip(&mut xdist) {
            let mut command = Command::new(python);
            command
                .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
                .args(["-n", &workers.to_string(), "--dist", "worksteal"])
                .current_dir(corpus.join(project));
            *total += timed(command)?;
        }
    }
    let zip_path = dir.join("real.zip");
    zip_corpus(python, &corpus, &zip_path)?;
    let zip = std::fs::read(&zip_path)?;
    println!(
        "real projects: {} (PyPI sdists), {} passed, {} failed, {} skipped by a serial pytest",
        REAL.map(|(_, project)| project).join(", "),
        serial_counts[0],
        serial_counts[1],
        serial_counts[2]
    );
    println!(
        "{:<44} {:>8.2} s",
        "serial pytest (one project after another)", serial
    );
    for (workers, xdist) in [2, 3].into_iter().zip(xdist) {
        println!(
            "{:<44} {xdist:>8.2} s",
            format!("pytest -n {workers} --dist worksteal (each project)")
        );
        let nodes = cluster(teia, &dir.join(format!("r{workers}")), workers)?;
        let owner = &nodes.first().context("no owner")?.http;
        let mut cold = None;
        for (run, path) in [
            ("cold", "/evaluation"),
            ("again (served by the cache)", "/evaluation"),
            ("again (cache off)", "/evaluation?cache=false"),
        ] {
            let started = Instant::now();
            let id = submit_to(owner, path, &zip)?;
            let done = wait_done(owner, id)?;
            let took = started.elapsed().as_secs_f64();
            let tests = &done["tests"];
            let counts = [
                tests["passed"].as_u64().unwrap_or(0),
                tests["failed"].as_u64().unwrap_or(0) + tests["errors"].as_u64().unwrap_or(0),
                tests["skipped"].as_u64().unwrap_or(0),
            ];
            let exact = if counts == serial_counts {
                "counts exact".to_owned()
            } else {
                format!("COUNTS DIFFER: {counts:?}")
            };
            let pieces = done["projects"]
                .as_object()
                .into_iter()
                .flat_map(|projects| projects.values())
                .filter_map(|project| project["modules"].as_object())
                .flat_map(|modules| modules.keys())
                .filter(|name| name.contains(" ["))
                .count();
            let of_cold = cold.map_or_else(String::new, |cold: f64| {
                format!("{:.3} of cold; ", took / cold)
            });
            cold.get_or_insert(took);
            println!(
                "{:<44} {took:>8.2} s   ({:.2} of xdist; {of_cold}{pieces} pieces; {exact})",
                format!("teia, {workers} nodes, {run}"),
                took / xdist
            );
        }
        drop(nodes);
    }
    Ok(())
}

/// Copies the folder `from` to `to` (`cp -r`).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new("cp").arg("-r").arg(from).arg(to).status()?;
    if !status.success() {
        bail!("cannot copy {} to {}", from.display(), to.display());
    }
    Ok(())
}

/// Modules of the tiny corpus (one fast test each).
const TINY: usize = 60;

/// Runs of the tiny corpus on each cluster.
const TINY_ROUNDS: usize = 7;

/// The cost of the cache and of splitting where they cannot help: a cold corpus of tiny
/// modules on 3 nodes with both on (the defaults) and on 3 nodes with both off,
/// [`TINY_ROUNDS`] times each, alternating which goes first (a new corpus each time, so
/// that nothing is cached).
fn tiny_modules(teia: &Path, python: &str, dir: &Path) -> anyhow::Result<()> {
    let on = cluster(teia, &dir.join("tiny-on"), 3)?;
    let off = cluster_with(teia, &dir.join("tiny-off"), 3, &["--no-result-cache"])?;
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..TINY_ROUNDS {
        let mut order = [
            (0, &on, "/evaluation"),
            (1, &off, "/evaluation?split=false"),
        ];
        if round % 2 == 1 {
            order.reverse();
        }
        for (which, nodes, path) in order {
            let corpus = dir.join(format!("tiny-{round}-{which}"));
            let tests = corpus.join("tiny").join("tests");
            std::fs::create_dir_all(&tests)?;
            for index in 0..TINY {
                std::fs::write(
                    tests.join(format!("test_t{index}.py")),
                    format!("def test_{index}_{round}_{which}():\n    assert {index} >= 0\n"),
                )?;
            }
            let zip_path = dir.join(format!("tiny-{round}-{which}.zip"));
            zip_corpus(python, &corpus, &zip_path)?;
            let zip = std::fs::read(&zip_path)?;
            let owner = &nodes.first().context("no owner")?.http;
            let started = Instant::now();
            let id = submit_to(owner, path, &zip)?;
            wait_done(owner, id)?;
            times[which].push(started.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let [mut with, mut without] = times;
    let said = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let runs = format!("on: {}; off: {}", said(&with), said(&without));
    // Each round's two runs side by side: the machine's drift between rounds cancels.
    let paired = with
        .iter()
        .zip(&without)
        .map(|(on, off)| on / off)
        .sum::<f64>()
        / with.len().max(1) as f64;
    let (with, without) = (median(&mut with), median(&mut without));
    println!(
        "{:<44} {:>8.2} s",
        format!("teia, 3 nodes, {TINY} tiny modules, cache and split off"),
        without
    );
    println!(
        "{:<44} {:>8.2} s   ({:.3} of off, {paired:.3} by round; median of {TINY_ROUNDS} each: {runs})",
        format!("teia, 3 nodes, {TINY} tiny modules, both on"),
        with,
        with / without
    );
    Ok(())
}
