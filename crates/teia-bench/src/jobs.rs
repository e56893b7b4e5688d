//! The script-task benchmark (seed 001): tasks of 50 ms (`time.sleep(0.05)` in `main.py`)
//! dropped in the tasks folder of a node, run by it and by two more nodes of its cluster,
//! one worker each, on this machine. Compared with the ideal (the work over three workers)
//! and with three `python main.py` processes at a time with no teia (`xargs -P 3`),
//! measured in the same run. Then the time from `kill -9` of the node running a task to
//! that task running on another.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::node::{log_field, remove_all, Node, Programs};

/// Flags of the benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    programs: Programs,
    /// Tasks in the job.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Seconds each task works.
    #[arg(long, default_value_t = 0.05)]
    seconds: f64,
    /// Times a worker is killed in the failover measure.
    #[arg(long, default_value_t = 3)]
    kills: usize,
}

/// Workers in the cluster (and processes at a time in the reference).
const WORKERS: usize = 3;

/// Writes `count` task ZIPs `tNNNN.zip` in `zips` and the same tasks unpacked as folders in
/// `folders`: `main.py` sleeps `seconds` and prints its `input.csv`'s number.
fn write_tasks(
    python: &str,
    zips: &Path,
    folders: &Path,
    count: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    let script = r#"
import os, sys, zipfile
zips, folders, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
main = "import sys, time\ntime.sleep(%s)\nprint('task', open(sys.argv[1]).read().split()[1])\n" % seconds
for n in range(count):
    name = "t%04d" % n
    csv = "n\n%d\n" % n
    with zipfile.ZipFile(os.path.join(zips, name + ".zip"), "w") as z:
        z.writestr("main.py", main)
        z.writestr("input.csv", csv)
    folder = os.path.join(folders, name)
    os.makedirs(folder)
    open(os.path.join(folder, "main.py"), "w").write(main)
    open(os.path.join(folder, "input.csv"), "w").write(csv)
"#;
    std::fs::create_dir_all(zips)?;
    std::fs::create_dir_all(folders)?;
    let status = Command::new(python)
        .args(["-c", script])
        .arg(zips)
        .arg(folders)
        .args([count.to_string(), seconds.to_string()])
        .status()?;
    if !status.success() {
        bail!("cannot write the tasks");
    }
    Ok(())
}

/// A UDP port free now (for the node's seed 001 discovery, which the benchmark does not use).
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The owner (with the tasks folder, running `task_workers` itself) and two workers of its
/// cluster, one worker each.
fn cluster(teia: &Path, dir: &Path, task_workers: usize) -> anyhow::Result<Vec<Node>> {
    let tasks = dir.join("tasks");
    let results = dir.join("results");
    let discovery = free_udp_port()?.to_string();
    let task_workers = task_workers.to_string();
    let owner_flags = [
        "--workers",
        "1",
        "--cluster-secret",
        "bench",
        "--task-workers",
        &task_workers,
        "--tasks-dir",
        tasks.to_str().context("path")?,
        "--results-dir",
        results.to_str().context("path")?,
        "--master-port",
        "127.0.0.1:0",
        "--discovery-port",
        &discovery,
    ];
    let owner = Node::start(teia, &dir.join("n0"), "n0", None, &owner_flags)?;
    let first = format!("127.0.0.1:{}", owner.port);
    let mut nodes = vec![owner];
    for name in ["n1", "n2"] {
        let flags = ["--workers", "1", "--cluster-secret", "bench"];
        nodes.push(Node::start(
            teia,
            &dir.join(name),
            name,
            Some(&first),
            &flags,
        )?);
    }
    for node in nodes.iter().skip(1) {
        let owner = nodes.first().context("no owner")?;
        owner.wait_log(&["link up", &node.name], 0, Duration::from_secs(30))?;
    }
    Ok(nodes)
}

/// Moves every ZIP of `from` into `to` (one rename each, so the node never sees half a ZIP).
fn drop_tasks(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::rename(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Waits until `results` holds `count` result ZIPs.
fn wait_results(results: &Path, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = std::fs::read_dir(results)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("result_"))
                    .count()
            })
            .unwrap_or(0);
        if done >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{done} of {count} results after 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Tasks run by each node, from the results' `result.json`, and whether every stdout is
/// right.
fn tally(python: &str, results: &Path) -> anyhow::Result<String> {
    let script = r#"
import collections, glob, json, os, sys, zipfile
counts, wrong = collections.Counter(), 0
for path in glob.glob(os.path.join(sys.argv[1], "result_t*.zip")):
    z = zipfile.ZipFile(path)
    counts[json.loads(z.read("result.json"))["node"]] += 1
    n = int(os.path.basename(path)[len("result_t"):-len(".zip")])
    wrong += z.read("stdout.txt").decode().strip() != "task %d" % n
print(", ".join("%s %d" % kv for kv in sorted(counts.items())) + ("; %d wrong stdouts" % wrong if wrong else "; every stdout right"))
"#;
    let output = Command::new(python)
        .args(["-c", script])
        .arg(results)
        .output()?;
    if !output.status.success() {
        bail!(
            "cannot read the results: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || measure(args)).await?
}

fn measure(args: Args) -> anyhow::Result<()> {
    let teia = args.programs.teia()?;
    // The interpreter itself, not a wrapper (a pyenv shim costs 60 ms a start), as the
    // nodes run it.
    let output = Command::new(&args.programs.python)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    let python = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || python.is_empty() {
        bail!("{} does not run", args.programs.python);
    }
    let args = Args {
        programs: Programs {
            python,
            ..args.programs
        },
        ..args
    };
    let dir = std::env::temp_dir().join(format!("teia-bench-jobs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (zips, folders) = (dir.join("zips"), dir.join("folders"));
    write_tasks(
        &args.programs.python,
        &zips,
        &folders,
        args.tasks,
        args.seconds,
    )?;
    let ideal = args.tasks as f64 * args.seconds / WORKERS as f64;
    println!(
        "{} tasks of {:.0} ms, {WORKERS} workers: ideal {:.2} s ({:.0} tasks/s)",
        args.tasks,
        args.seconds * 1000.0,
        ideal,
        if ideal > 0.0 {
            args.tasks as f64 / ideal
        } else {
            f64::INFINITY
        }
    );

    let started = Instant::now();
    let status = Command::new("sh")
        .args([
            "-c",
            "ls | xargs -P 3 -I{} sh -c 'cd \"$1\" && \"$0\" main.py input.csv > stdout.txt' \"$0\" {}",
            &args.programs.python,
        ])
        .current_dir(&folders)
        .status()?;
    if !status.success() {
        bail!("the reference run failed");
    }
    let reference = started.elapsed().as_secs_f64();
    // The rate as a share of the ideal's (none when the tasks do no work).
    let of_ideal = |elapsed: f64| {
        if ideal > 0.0 {
            format!("{:.2} of the ideal rate", ideal / elapsed)
        } else {
            "no ideal: the tasks do no work".to_owned()
        }
    };
    println!(
        "{:<46} {:>7.2} s  {:>6.1} tasks/s  ({})",
        "reference: xargs -P 3 python main.py",
        reference,
        args.tasks as f64 / reference,
        of_ideal(reference)
    );

    let run_dir = dir.join("run");
    let nodes = cluster(&teia, &run_dir, 1)?;
    let started = Instant::now();
    drop_tasks(&zips, &run_dir.join("tasks"))?;
    wait_results(&run_dir.join("results"), args.tasks)?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{:<46} {:>7.2} s  {:>6.1} tasks/s  ({}; {:.2} times the reference's)",
        "teia: 3 nodes, 1 worker each",
        elapsed,
        args.tasks as f64 / elapsed,
        of_ideal(elapsed),
        reference / elapsed
    );
    println!(
        "  tasks per node: {}",
        tally(&args.programs.python, &run_dir.join("results"))?
    );
    drop(nodes);

    failover(&args, &teia, &dir)?;
    remove_all(&dir);
    Ok(())
}

/// One long task at a time on a node that runs none itself: the worker that takes it is
/// killed, and the time until the owner hands it to the other is measured.
fn failover(args: &Args, teia: &Path, dir: &Path) -> anyhow::Result<()> {
    let run_dir = dir.join("failover");
    let mut nodes = cluster(teia, &run_dir, 0)?;
    let (zips, folders) = (run_dir.join("zips"), run_dir.join("folders"));
    write_tasks(&args.programs.python, &zips, &folders, args.kills, 5.0)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&zips)?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut times = Vec::new();
    for (round, zip) in names.iter().enumerate() {
        if nodes.len() < 2 {
            break;
        }
        let name = zip.file_name().context("name")?.to_owned();
        let owner_from = 0;
        std::fs::rename(zip, run_dir.join("tasks").join(&name))?;
        let task = name.to_string_lossy().into_owned();
        // The worker running it.
        let deadline = Instant::now() + Duration::from_secs(60);
        let victim = loop {
            let found = nodes.iter().skip(1).position(|node| {
                node.wait_log(&["script task running here", &task], 0, Duration::ZERO)
                    .is_ok()
            });
            if let Some(found) = found {
                break found + 1;
            }
            if Instant::now() > deadline {
                bail!("nobody runs {task}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let owner = nodes.first().context("no owner")?;
        let (mark, _) =
            owner.wait_log(&["task handed", &task], owner_from, Duration::from_secs(5))?;
        let killed = Instant::now();
        nodes.remove(victim).kill9();
        let owner = nodes.first().context("no owner")?;
        let (_, line) = owner.wait_log(
            &["task handed to a teia worker", &task],
            mark + 1,
            Duration::from_secs(60),
        )?;
        let handed = killed.elapsed().as_secs_f64();
        times.push(handed);
        let attempt = log_field(&line, "attempt").unwrap_or("?");
        println!(
            "kill -9 of the node running {task} (round {}) → its task running elsewhere: {handed:.2} s (attempt {attempt})",
            round + 1
        );
        wait_results(&run_dir.join("results"), round + 1)?;
        // A fresh worker for the next round.
        let first = format!("127.0.0.1:{}", owner.port);
        let name = format!("r{round}");
        let flags = ["--workers", "1", "--cluster-secret", "bench"];
        let fresh = Node::start(teia, &run_dir.join(&name), &name, Some(&first), &flags)?;
        owner.wait_log(&["link up", &fresh.name], 0, Duration::from_secs(30))?;
        nodes.push(fresh);
    }
    if let (Some(best), Some(worst)) = (
        times.iter().cloned().reduce(f64::min),
        times.iter().cloned().reduce(f64::max),
    ) {
        println!(
            "kill -9 → task elsewhere: {best:.2}–{worst:.2} s over {} kills",
            times.len()
        );
    }
    Ok(())
}
