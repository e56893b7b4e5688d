//! `teia job`: script jobs (seed 001) through a node's HTTP API: `submit` sends each task
//! (`POST /jobs`; with `--split-csv N`, each cut into N parts), follows them with a
//! progress bar until all are done, then prints a summary and the stdouts (a split task's
//! parts concatenated in order) and, with `--results DIR`, saves their result ZIPs;
//! `status` shows one job, `list` them all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::eval::{api_error, at, download, get, request, Body};
use crate::cli::{JobArgs, JobCommand};

/// Time between two polls of the jobs.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Runs `teia job ...`.
pub async fn run(args: JobArgs) -> anyhow::Result<()> {
    match args.command {
        JobCommand::Submit {
            targets,
            split_csv,
            results,
        } => {
            let jobs = submit(&args.node, &targets, split_csv, args.json).await?;
            match results {
                Some(dir) => save_results(&args.node, &jobs, &dir, args.json).await,
                None => Ok(()),
            }
        }
        JobCommand::Status { id } => {
            let body = get(&args.node, &format!("/jobs/{id}")).await?;
            println!("{body}");
            Ok(())
        }
        JobCommand::List => {
            let body = get(&args.node, "/jobs").await?;
            if args.json {
                println!("{body}");
                return Ok(());
            }
            println!(
                "{} queued, {} running, {} done",
                at(&body, "queued"),
                at(&body, "running"),
                at(&body, "done")
            );
            for job in at(&body, "jobs").as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<8} {}",
                    at(job, "id").as_str().unwrap_or_default(),
                    at(job, "status").as_str().unwrap_or_default(),
                    at(job, "worker").as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// One task as submitted: what it came from, its part (when split), its job id.
struct Submitted {
    label: String,
    part: Option<usize>,
    id: String,
}

/// Submits the tasks and follows them to the end; the jobs.
async fn submit(
    node: &str,
    targets: &[PathBuf],
    split: Option<usize>,
    json_output: bool,
) -> anyhow::Result<Vec<Submitted>> {
    let scratch = std::env::temp_dir().join(format!("teia-job-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = submit_all(node, targets, split, json_output, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    let jobs = result?;
    follow(node, &jobs, json_output).await?;
    Ok(jobs)
}

/// Saves each job's result ZIP in `dir` (`GET /jobs/<id>/result`).
async fn save_results(
    node: &str,
    jobs: &[Submitted],
    dir: &Path,
    json_output: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    for job in jobs {
        // The id comes from the node: it names a file here only if it is a plain name.
        let plain = !job.id.is_empty()
            && job
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !plain {
            bail!("the node named a job {:?}: not saved", job.id);
        }
        let to = dir.join(format!("result_{}.zip", job.id));
        let size = download(node, &format!("/jobs/{}/result", job.id), &to)
            .await
            .with_context(|| format!("result of {} not saved", job.id))?;
        if json_output {
            println!(
                "{}",
                json!({"event": "saved", "id": job.id, "path": to, "bytes": size})
            );
        }
    }
    if !json_output {
        println!("{} result(s) saved in {}", jobs.len(), dir.display());
    }
    Ok(())
}

async fn submit_all(
    node: &str,
    targets: &[PathBuf],
    split: Option<usize>,
    json_output: bool,
    scratch: &Path,
) -> anyhow::Result<Vec<Submitted>> {
    let mut jobs = Vec::new();
    let mut warned = false;
    for (index, target) in targets.iter().enumerate() {
        let label = target.display().to_string();
        let archive = if target.is_dir() {
            let packed = scratch.join(format!("task{index}.zip"));
            teia_jobs::bundle::pack(target, &packed)
                .with_context(|| format!("cannot pack {label}"))?;
            packed
        } else if target.is_file() {
            target.clone()
        } else {
            bail!("{label} is neither a ZIP nor a folder");
        };
        let parts: Vec<(Option<usize>, PathBuf)> = match split {
            Some(n) => {
                teia_jobs::split::split_task(&archive, n, &scratch.join(format!("parts{index}")))
                    .with_context(|| format!("cannot split {label}"))?
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (Some(i + 1), p))
                    .collect()
            }
            None => vec![(None, archive)],
        };
        for (part, path) in parts {
            let (id, warning) = post(node, &path).await?;
            if let Some(warning) = warning.filter(|_| !warned) {
                warned = true;
                if json_output {
                    println!("{}", json!({"event": "warning", "warning": warning}));
                } else {
                    eprintln!("WARNING: {warning}");
                }
            }
            if json_output {
                println!(
                    "{}",
                    json!({"event": "submitted", "task": label, "part": part, "id": id})
                );
            }
            jobs.push(Submitted {
                label: label.clone(),
                part,
                id,
            });
        }
    }
    if !json_output {
        println!("{} job(s) submitted", jobs.len());
    }
    Ok(jobs)
}

/// `POST /jobs` with the ZIP at `path`; the job's id, and why no worker can take it yet
/// when none can.
async fn post(node: &str, path: &Path) -> anyhow::Result<(String, Option<String>)> {
    let boundary = "teia-job-boundary-7c2e";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"task.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let (status, body) = request(
        node,
        "POST",
        "/jobs",
        &format!("multipart/form-data; boundary={boundary}"),
        Body::Multipart {
            head,
            file: path,
            tail,
        },
    )
    .await?;
    if status != 201 {
        return Err(api_error(status, &body));
    }
    let id = at(&body, "id")
        .as_str()
        .map(str::to_owned)
        .context("the node answered no job id")?;
    let warning = at(&body, "warning").as_str().map(str::to_owned);
    Ok((id, warning))
}

/// Polls every job until all are done, then prints the summary.
async fn follow(node: &str, jobs: &[Submitted], json_output: bool) -> anyhow::Result<()> {
    let bar = (!json_output).then(|| {
        let bar = indicatif::ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} jobs done  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut done: Vec<Option<Value>> = vec![None; jobs.len()];
    while done.iter().any(Option::is_none) {
        for (job, slot) in jobs.iter().zip(done.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let status = get(node, &format!("/jobs/{}", job.id)).await?;
            if at(&status, "status") == "done" {
                if json_output {
                    println!("{}", json!({"event": "done", "job": status}));
                }
                *slot = Some(status);
            }
        }
        let finished = done.iter().flatten().count() as u64;
        let failed = done
            .iter()
            .flatten()
            .filter(|s| {
                // A course worker's result says no exit code: only its stdout and stderr.
                at(s, "exit_code").as_i64().is_some_and(|c| c != 0)
                    || at(s, "error").is_string()
                    || at(s, "timed_out").as_bool() == Some(true)
            })
            .count();
        if let Some(bar) = &bar {
            bar.set_position(finished);
            bar.set_message(format!("{failed} failed"));
        }
        if done.iter().any(Option::is_none) {
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let results: Vec<Value> = done.into_iter().flatten().collect();
    if json_output {
        println!("{}", json!({"event": "summary", "jobs": results.len()}));
        return Ok(());
    }
    println!(
        "{:<40} {:<28} {:>5} {:>8}",
        "task", "job", "exit", "seconds"
    );
    for (job, status) in jobs.iter().zip(&results) {
        let name = match job.part {
            Some(part) => format!("{} (part {part})", job.label),
            None => job.label.clone(),
        };
        println!(
            "{:<40} {:<28} {:>5} {:>8}",
            name,
            job.id,
            at(status, "exit_code")
                .as_i64()
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            at(status, "seconds")
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}"))
        );
    }
    // Why a job has no exit code: killed at its timeout, or not run at all.
    for (job, status) in jobs.iter().zip(&results) {
        if let Some(error) = at(status, "error").as_str() {
            println!("{} was not run: {error}", job.id);
        } else if at(status, "timed_out").as_bool() == Some(true) {
            println!("{} was killed at its timeout", job.id);
        }
    }
    // Stdouts, a split task's parts in order, as one.
    let mut previous: Option<&str> = None;
    for (job, status) in jobs.iter().zip(&results) {
        if previous != Some(job.label.as_str()) {
            println!("--- stdout of {} ---", job.label);
            previous = Some(job.label.as_str());
        }
        print!("{}", at(status, "stdout").as_str().unwrap_or_default());
    }
    Ok(())
}
