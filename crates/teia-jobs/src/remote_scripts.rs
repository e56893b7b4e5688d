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

use teia_node::stream::StreamError;

use crate::cluster::Cluster;
use crate::engine::{Engine, Traffic};
use crate::master::{MasterHandle, NotStored};
use crate::proto::cluster::REMOTE_LEASE_MS;
use crate::proto::seed001::Task;
use crate::remote::{RemoteError, ANSWER_WAIT, RENEW_EVERY};
use crate::script::{TaskError, MAX_RESULT};
use crate::transfer::{read_head, receive_file, send_file, TransferError, MAX_BLOB};

/// Time the worker has to say what it sends after the task ran, and the owner to answer.
const RESULT_WAIT: Duration = Duration::from_secs(30);

/// Slowest rate a task or result is sent at (bytes a second) before the peer is deemed
/// stalled: a peer that stops reading does not hold the sender forever.
const MIN_RATE: u64 = 1024 * 1024;

/// Why a worker could not take, run or deliver an owner's script task.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// The owner could not be reached.
    #[error(transparent)]
    Reach(#[from] RemoteError),
    /// The exchange with the owner failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The owner answered something else than a task, none, or `ok`.
    #[error("{owner} answered {answer}")]
    Unexpected {
        /// The owner.
        owner: String,
        /// Its answer.
        answer: serde_json::Value,
    },
    /// The owner's task is over [`MAX_BLOB`] bytes.
    #[error("{owner}'s task is {size} bytes, over {MAX_BLOB}")]
    TooLarge {
        /// The owner.
        owner: String,
        /// The task's size.
        size: u64,
    },
    /// The task's work folder or result could not be used.
    #[error("{0}")]
    Disk(#[from] std::io::Error),
    /// The owner stopped listening while the task ran (the task is its again).
    #[error("{owner} is gone: {source}")]
    OwnerGone {
        /// The owner.
        owner: String,
        /// Why the stream failed.
        source: StreamError,
    },
    /// The task could not be run here.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The node stopped while the task ran: no result is sent (the owner gives the task to
    /// another when the stream ends).
    #[error("the node is stopping")]
    Stopped,
}

/// Why an owner's task lent to a worker came back without a result.
#[derive(Debug, thiserror::Error)]
pub enum LendError {
    /// The task's ZIP could not be read.
    #[error("task unreadable: {0}")]
    TaskUnreadable(std::io::Error),
    /// A file on this node could not be read.
    #[error("{0}")]
    Disk(#[from] std::io::Error),
    /// The exchange with the worker failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The worker could not run the task.
    #[error("the task failed to run: {0}")]
    TaskFailed(String),
    /// The worker said something else than alive, failed or a result.
    #[error("unexpected {0}")]
    Unexpected(serde_json::Value),
    /// The worker's result is over [`MAX_RESULT`] bytes.
    #[error("a result of {0} bytes is over {MAX_RESULT}")]
    ResultTooLarge(u64),
    /// The worker's result is not a ZIP.
    #[error("the result is not a ZIP")]
    NotZip,
    /// The result could not be stored.
    #[error(transparent)]
    NotStored(#[from] NotStored),
}

/// Sends the first `size` bytes of `file` within [`RESULT_WAIT`] plus a second per
/// [`MIN_RATE`] bytes.
async fn send_within(
    stream: &mut DataStream,
    file: &mut std::fs::File,
    size: u64,
) -> Result<(), TransferError> {
    let time = RESULT_WAIT + Duration::from_secs(size / MIN_RATE);
    match tokio::time::timeout(time, send_file(stream, file, size)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(TransferError::NotRead {
            peer: stream.peer_id().to_owned(),
            size,
            time,
        }),
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
        let answer = match lend(master, &worker, &task, &path, &mut stream, &self.traffic).await {
            Ok(()) => json!({"ok": true}),
            Err(e) => {
                if let Some(name) = master.give_back(&worker) {
                    tracing::warn!(task = %name, %worker, error = %e, "a teia worker let its task go; it goes to another");
                }
                json!({ "error": e.to_string() })
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
    ) -> Result<bool, TakeError> {
        let mut stream = self.open_to(cluster, owner, port).await?;
        let take = json!({"script": "take", "proof": cluster.proof()});
        stream
            .write_all(&line(&take))
            .await
            .map_err(TransferError::from)?;
        let head = read_head(&mut stream, ANSWER_WAIT).await?;
        if head.get("none").is_some() {
            return Ok(false);
        }
        let (Some(task), Some(size)) = (
            head.get("task").and_then(serde_json::Value::as_str),
            head.get("size").and_then(serde_json::Value::as_u64),
        ) else {
            return Err(TakeError::Unexpected {
                owner: owner.to_owned(),
                answer: head,
            });
        };
        if size > MAX_BLOB {
            return Err(TakeError::TooLarge {
                owner: owner.to_owned(),
                size,
            });
        }
        let task = task.to_owned();
        let work = self.runner.work_dir().join(format!("script-{slot}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
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
    ) -> Result<(), TakeError> {
        let archive = work.join("task.zip");
        // A work file: lost with the node, the task goes to another anyway.
        receive_file(stream, size, &archive, false).await?;
        self.traffic.fetched(size);
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
                        .map_err(|source| TakeError::OwnerGone {
                            owner: owner.to_owned(),
                            source,
                        })?;
                }
            }
        };
        if self.tasks.stopping() {
            return Err(TakeError::Stopped);
        }
        if let Err(e) = made {
            let failed = json!({ "failed": e.to_string() });
            let _ = stream.write_all(&line(&failed)).await;
            return Err(e.into());
        }
        let mut file = std::fs::File::open(&result)?;
        let size = file.metadata()?.len();
        stream
            .write_all(&line(&json!({ "result": size })))
            .await
            .map_err(TransferError::from)?;
        send_within(stream, &mut file, size).await?;
        self.traffic.served(size);
        let answer = read_head(stream, RESULT_WAIT).await?;
        if answer.get("ok").is_some() {
            tracing::info!(%task, %owner, "script task's result delivered");
            Ok(())
        } else {
            Err(TakeError::Unexpected {
                owner: owner.to_owned(),
                answer,
            })
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
    traffic: &Traffic,
) -> Result<(), LendError> {
    let mut file = std::fs::File::open(path).map_err(LendError::TaskUnreadable)?;
    let size = file.metadata()?.len();
    stream
        .write_all(&line(&json!({"task": task.name, "size": size})))
        .await
        .map_err(TransferError::from)?;
    send_within(stream, &mut file, size).await?;
    traffic.served(size);
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
            return Err(LendError::TaskFailed(failure.to_owned()));
        }
        let Some(size) = said.get("result").and_then(serde_json::Value::as_u64) else {
            return Err(LendError::Unexpected(said));
        };
        if size > MAX_RESULT {
            return Err(LendError::ResultTooLarge(size));
        }
        let partial = master.partial(worker, &task.name);
        // Each piece must come within 30 s (the worker stalled, the task goes back).
        if let Err(e) = receive_file(stream, size, &partial, true).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
        traffic.fetched(size);
        if zip::ZipArchive::new(std::fs::File::open(&partial)?).is_err() {
            let _ = std::fs::remove_file(&partial);
            return Err(LendError::NotZip);
        }
        master.finish(worker, &task.name, &partial)?;
        return Ok(());
    }
}
