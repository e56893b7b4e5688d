//! Script tasks (seed 001) across a cluster. A node with a tasks folder says how many of
//! its tasks wait in its TASK_ANNOUNCE (`scripts`); an idle worker of a node that trusts it
//! takes one on a `jobs` stream, says it is alive on that stream every [`RENEW_EVERY`]
//! while the task runs, and sends the result ZIP back on it (PROTOCOL.md section 8).
//!
//! The stream is the lease: the owner takes the task back the moment the stream ends (the
//! worker's process died, its machine closed the connection) or stays silent for
//! [`REMOTE_LEASE_MS`], and hands it to the next worker that asks. A result is written to
//! the results folder (flushed, then renamed) before the worker hears `ok`; a result for a
//! task no longer the worker's is dropped, so each task has one result.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use teia_node::stream::DataStream;

use crate::engine::Engine;
use crate::master::MasterHandle;
use crate::proto::seed001::Task;
use crate::remote::{
    read_head, receive_file, send_file, Cluster, ANSWER_WAIT, MAX_BLOB, REMOTE_LEASE_MS,
    RENEW_EVERY,
};
use crate::script::MAX_RESULT;

/// Time the worker has to say what it sends after the task ran, and the owner to answer.
const RESULT_WAIT: Duration = Duration::from_secs(30);

/// Slowest rate a task or result is sent at (bytes a second) before the peer is deemed
/// stalled: a peer that stops reading does not hold the sender forever.
const MIN_RATE: u64 = 1024 * 1024;

/// Sends the first `size` bytes of `file` within [`RESULT_WAIT`] plus a second per
/// [`MIN_RATE`] bytes.
async fn send_within(
    stream: &mut DataStream,
    file: &mut std::fs::File,
    size: u64,
) -> Result<(), String> {
    let time = RESULT_WAIT + Duration::from_secs(size / MIN_RATE);
    match tokio::time::timeout(time, send_file(stream, file, size)).await {
        Ok(sent) => sent.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "{} did not read {size} bytes in {time:?}",
            stream.peer_id()
        )),
    }
}

/// A line written on the stream (a JSON object and a newline).
fn line(value: &serde_json::Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

impl Engine {
    /// Serves a worker's `{"script":"take"}` stream: leases it a task, sends its ZIP, waits
    /// for the result while the worker says it is alive, and stores it; gives the task
    /// back if the stream ends first.
    pub(crate) async fn serve_script(
        &self,
        cluster: &Cluster,
        mut stream: DataStream,
        trusted: bool,
    ) {
        let refusal = match (&cluster.config.scripts, trusted) {
            (None, _) => Some("no script tasks here"),
            (Some(_), false) => Some("not served to you"),
            (Some(_), true) => None,
        };
        let (Some(master), None) = (&cluster.config.scripts, refusal) else {
            if !trusted {
                tracing::warn!(peer = %stream.peer_id(), "script task request from an untrusted node refused");
            }
            let refusal = refusal.unwrap_or_default();
            let _ = stream.write_all(&line(&json!({ "error": refusal }))).await;
            return;
        };
        let worker = format!(
            "teia:{}#{}",
            stream.peer_id(),
            cluster.next.fetch_add(1, Ordering::Relaxed)
        );
        let Some((task, path)) = master.take(&worker) else {
            let _ = stream.write_all(&line(&json!({"none": true}))).await;
            master.give_back(&worker);
            return;
        };
        tracing::info!(task = %task.name, %worker, attempt = task.attempts, "task handed to a teia worker");
        let answer = match lend(master, &worker, &task, &path, &mut stream).await {
            Ok(()) => json!({"ok": true}),
            Err(e) => {
                if let Some(name) = master.give_back(&worker) {
                    tracing::warn!(task = %name, %worker, error = %e, "a teia worker let its task go; it goes to another");
                }
                json!({ "error": e })
            }
        };
        let _ = stream.write_all(&line(&answer)).await;
        stream.shutdown().await;
        master.give_back(&worker);
    }

    /// Takes a script task from a trusted owner that announced some, runs it and sends its
    /// result back; false when there was none to take.
    pub(crate) async fn work_remote_script(&self, slot: usize) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        let owner = cluster.rules().owner_for_scripts(slot, Instant::now());
        let Some((owner, port)) = owner else {
            return false;
        };
        match self.take_script(cluster, &owner, port, slot).await {
            Ok(true) => true,
            Ok(false) => {
                // Nothing there now: wait for its next announcement.
                cluster.rules().no_scripts(&owner);
                false
            }
            Err(e) => {
                tracing::warn!(%owner, error = %e, "script task not done here");
                cluster.rules().no_scripts(&owner);
                true
            }
        }
    }

    /// One task from `owner`: taken, run in this slot's folder, its result sent.
    async fn take_script(
        &self,
        cluster: &Cluster,
        owner: &str,
        port: Option<u16>,
        slot: usize,
    ) -> Result<bool, String> {
        let mut stream = self.open_to(cluster, owner, port).await?;
        let take = json!({"script": "take", "proof": cluster.proof()});
        stream
            .write_all(&line(&take))
            .await
            .map_err(|e| e.to_string())?;
        let head = read_head(&mut stream, ANSWER_WAIT).await?;
        if head.get("none").is_some() {
            return Ok(false);
        }
        let (Some(task), Some(size)) = (
            head.get("task").and_then(serde_json::Value::as_str),
            head.get("size").and_then(serde_json::Value::as_u64),
        ) else {
            return Err(format!("{owner} answered {head}"));
        };
        if size > MAX_BLOB {
            return Err(format!("{owner}'s task is {size} bytes, over {MAX_BLOB}"));
        }
        let task = task.to_owned();
        let work = self.runner.work_dir().join(format!("script-{slot}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        let done = self.run_taken(&mut stream, owner, &task, size, &work).await;
        let _ = std::fs::remove_dir_all(&work);
        done.map(|()| true)
    }

    /// Receives the task's ZIP into `work`, runs it while saying so on the stream, sends
    /// the result and waits for the owner's `ok`.
    async fn run_taken(
        &self,
        stream: &mut DataStream,
        owner: &str,
        task: &str,
        size: u64,
        work: &std::path::Path,
    ) -> Result<(), String> {
        let archive = work.join("task.zip");
        // A work file: lost with the node, the task goes to another anyway.
        receive_file(stream, size, &archive, false).await?;
        tracing::info!(%task, %owner, "script task running here");
        let (folder, result) = (work.join("run"), work.join("result.zip"));
        let run = crate::script::run_task(
            &self.runner,
            &archive,
            task,
            &self.config.node,
            &folder,
            &result,
        );
        tokio::pin!(run);
        let made = loop {
            tokio::select! {
                made = &mut run => break made,
                () = tokio::time::sleep(RENEW_EVERY) => {
                    // The owner gone, the task is its again: stop running it.
                    stream
                        .write_all(&line(&json!({"alive": true})))
                        .await
                        .map_err(|e| format!("{owner} is gone: {e}"))?;
                }
            }
        };
        if let Err(e) = made {
            let _ = stream.write_all(&line(&json!({ "failed": e }))).await;
            return Err(e);
        }
        let mut file = std::fs::File::open(&result).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        stream
            .write_all(&line(&json!({ "result": size })))
            .await
            .map_err(|e| e.to_string())?;
        send_within(stream, &mut file, size).await?;
        let answer = read_head(stream, RESULT_WAIT).await?;
        if answer.get("ok").is_some() {
            tracing::info!(%task, %owner, "script task's result delivered");
            Ok(())
        } else {
            Err(format!("{owner} answered {answer}"))
        }
    }
}

/// Lends `task` to `worker` on `stream`: its ZIP sent, then the worker's lines read (each
/// within [`REMOTE_LEASE_MS`]) until its result, which is stored.
async fn lend(
    master: &MasterHandle,
    worker: &str,
    task: &Task,
    path: &std::path::Path,
    stream: &mut DataStream,
) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("task unreadable: {e}"))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    stream
        .write_all(&line(&json!({"task": task.name, "size": size})))
        .await
        .map_err(|e| e.to_string())?;
    send_within(stream, &mut file, size).await?;
    let silence = Duration::from_millis(REMOTE_LEASE_MS);
    loop {
        let said = read_head(stream, silence).await?;
        if said.get("alive").is_some() {
            master.alive(worker);
            continue;
        }
        if let Some(failure) = said.get("failed") {
            let failure = failure.as_str().unwrap_or("no reason given");
            master.fail(worker, &format!("{worker}: {failure}"));
            return Err(format!("the task failed to run: {failure}"));
        }
        let Some(size) = said.get("result").and_then(serde_json::Value::as_u64) else {
            return Err(format!("unexpected {said}"));
        };
        if size > MAX_RESULT {
            return Err(format!("a result of {size} bytes is over {MAX_RESULT}"));
        }
        let partial = master.partial(worker, &task.name);
        // Each piece must come within 30 s (the worker stalled, the task goes back).
        if let Err(e) = receive_file(stream, size, &partial, true).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        if zip::ZipArchive::new(std::fs::File::open(&partial).map_err(|e| e.to_string())?).is_err()
        {
            let _ = std::fs::remove_file(&partial);
            return Err("the result is not a ZIP".into());
        }
        master.finish(worker, &task.name, &partial)?;
        return Ok(());
    }
}
