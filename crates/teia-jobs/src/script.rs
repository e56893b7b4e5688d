//! One script task (seed 001) run on this node: its ZIP unpacked in a work folder,
//! `python main.py input.csv` run there in the sandbox, and the result ZIP written, the same
//! whether the task came from this node's tasks folder or from another node's.

use std::path::{Path, PathBuf};

use crate::bundle::BundleError;
use crate::runner::{RunError, Runner};

/// Bytes of each file kept in a result made here (stdout, stderr, an output); the rest is
/// left out.
pub const MAX_OUTPUT_FILE: u64 = 64 * 1024 * 1024;

/// Output files kept in a result.
pub const MAX_OUTPUT_FILES: usize = 256;

/// Bytes of all the files kept in a result, before compression; past it, the last files
/// are cut short or left out.
pub const MAX_RESULT_CONTENT: u64 = 1024 * 1024 * 1024;

/// Bytes of a result ZIP at most, as a node receives it from another (the content, and
/// room for the ZIP's own records).
pub const MAX_RESULT: u64 = MAX_RESULT_CONTENT + 16 * 1024 * 1024;

/// The entry of a result made by a teia worker that tells how the run went (exit code,
/// seconds, the node that ran it); a course worker's result is stored without one.
pub const SUMMARY: &str = "result.json";

/// Why a script task could not be run here, or its result not written.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task's ZIP could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] BundleError),
    /// The script could not be started.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The result ZIP could not be written.
    #[error("{0}")]
    Result(#[from] std::io::Error),
    /// The result ZIP could not be flushed to disk.
    #[error("result not flushed: {0}")]
    NotFlushed(std::io::Error),
    /// The writer of the result ZIP stopped.
    #[error("{0}")]
    Writer(#[from] tokio::task::JoinError),
}

/// Unpacks the task ZIP at `archive` (named `task`) in `folder`, runs `main.py input.csv`
/// there with `runner`, and writes the result ZIP to `to`: `stdout.txt`, `stderr.txt`,
/// `result.json` (exit code, seconds, whether it timed out, the `node` that ran it) and,
/// under `outputs/`, the files the script made. The ZIP is not flushed to disk: the caller
/// does, if it keeps it.
pub async fn run_task(
    runner: &Runner,
    archive: &Path,
    task: &str,
    node: &str,
    folder: &Path,
    to: &Path,
) -> Result<(), TaskError> {
    let _ = std::fs::remove_dir_all(folder);
    crate::bundle::unpack(archive, folder)?;
    let inputs = list_files(folder);
    let outcome = runner.run_script(folder, &["input.csv"]).await?;
    let summary = serde_json::json!({
        "task": task,
        "exit_code": outcome.exit_code,
        "timed_out": outcome.timed_out,
        "seconds": outcome.seconds,
        "node": node,
    });
    let outputs: Vec<PathBuf> = list_files(folder)
        .into_iter()
        .filter(|p| !inputs.contains(p))
        .filter(|p| {
            let name = p.to_string_lossy();
            name != "stdout.txt" && name != "stderr.txt" && !name.starts_with(".home")
        })
        .take(MAX_OUTPUT_FILES)
        .collect();
    // The folder is the task's: read as hostile input, off the async threads.
    let (folder, to) = (folder.to_owned(), to.to_owned());
    Ok(
        tokio::task::spawn_blocking(move || write_result_zip(&folder, &summary, &outputs, &to))
            .await??,
    )
}

/// The files under `dir`, relative to it (links not followed).
fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&relative)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = relative.join(entry.file_name());
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(path),
                Ok(kind) if kind.is_file() => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Writes the result ZIP, each file copied a piece at a time; a file of the task's that is
/// not a regular file inside its folder (a link, a FIFO, a device) is left out, and said
/// so in `result.json`'s `skipped`.
fn write_result_zip(
    folder: &Path,
    summary: &serde_json::Value,
    outputs: &[PathBuf],
    to: &Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(to)?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let mut left = MAX_RESULT_CONTENT;
    let mut skipped = Vec::new();
    let mut add = |name: String, relative: &Path| -> std::io::Result<()> {
        let mut source = match crate::taskfile::open(folder, relative) {
            Ok(file) => file,
            Err(e) => {
                skipped.push(e.to_string());
                return Ok(());
            }
        };
        zip.start_file(name, options)
            .map_err(std::io::Error::other)?;
        let copied = std::io::copy(
            &mut std::io::Read::take(&mut source, MAX_OUTPUT_FILE.min(left)),
            &mut zip,
        )?;
        left -= copied;
        Ok(())
    };
    add("stdout.txt".into(), Path::new("stdout.txt"))?;
    add("stderr.txt".into(), Path::new("stderr.txt"))?;
    for output in outputs {
        add(format!("outputs/{}", output.to_string_lossy()), output)?;
    }
    let mut summary = summary.clone();
    if let (Some(fields), false) = (summary.as_object_mut(), skipped.is_empty()) {
        fields.insert("skipped".into(), skipped.into());
    }
    zip.start_file(SUMMARY, options)
        .map_err(std::io::Error::other)?;
    zip.write_all(summary.to_string().as_bytes())?;
    zip.finish().map_err(std::io::Error::other)?;
    Ok(())
}

/// Writes the result ZIP of a task that could not be run: an empty `stdout.txt`, `error`
/// as `stderr.txt`, and `result.json` with the `error` and no exit code.
pub fn write_error_result(task: &str, error: &str, to: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(to)?);
    let options = zip::write::SimpleFileOptions::default();
    let summary = serde_json::json!({
        "task": task,
        "exit_code": null,
        "timed_out": false,
        "seconds": 0.0,
        "error": error,
    });
    for (name, bytes) in [
        ("stdout.txt", Vec::new()),
        ("stderr.txt", format!("{error}\n").into_bytes()),
        (SUMMARY, summary.to_string().into_bytes()),
    ] {
        zip.start_file(name, options)
            .map_err(std::io::Error::other)?;
        zip.write_all(&bytes)?;
    }
    zip.finish().map_err(std::io::Error::other)?.sync_all()
}
