//! A teia worker for a seed 001 master written by others (`teia worker --master-compat`):
//! finds it by UDP broadcast, registers, heartbeats, and runs its tasks (`main.py` over
//! `input.csv`) under the node's sandbox and limits, then submits `stdout.txt` and
//! `stderr.txt` zipped, speaking in the envelope the master answered discovery in.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::bundle::BundleError;
use crate::proto::seed001::{Envelope, Framer, MessageError, MAX_MESSAGE};
use crate::runner::{RunError, Runner};

/// Time between two discovery broadcasts while no master answers.
pub const DISCOVER_EVERY: Duration = Duration::from_secs(1);

/// Time between two heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Time between two task requests while the master has none.
pub const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Time the master has to answer a request.
pub const ANSWER_TIME: Duration = Duration::from_secs(30);

/// Failed requests in a row after which the master is looked for again.
pub const MAX_FAILURES: u32 = 3;

/// Why a request to the master got no answer.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request could not be written as JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The answer is not a seed 001 message.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// No answer within [`ANSWER_TIME`].
    #[error("the master did not answer")]
    NoAnswer,
}

/// Why a master's task was not run here (said in its result's `stderr.txt`).
#[derive(Debug, thiserror::Error)]
enum CourseTaskError {
    /// The package has no `task_data`.
    #[error("the task has no task_data")]
    NoData,
    /// The package is over [`MAX_MESSAGE`] bytes.
    #[error("the task is too large")]
    TooLarge,
    /// `task_data` is not base64.
    #[error("task_data is not base64")]
    NotBase64,
    /// The work folder could not be used.
    #[error("{0}")]
    Disk(#[from] std::io::Error),
    /// The task's ZIP could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] BundleError),
    /// The script could not be started.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The outputs could not be zipped.
    #[error("{0}")]
    Zip(#[from] zip::result::ZipError),
    /// The zipping stopped.
    #[error("{0}")]
    Zipper(#[from] tokio::task::JoinError),
}

/// Where to look for the master and where to work.
#[derive(Debug, Clone)]
pub struct CourseWorkerConfig {
    /// This worker's id, as the master sees it.
    pub peer_id: String,
    /// UDP ports the master may answer discovery on.
    pub discovery_ports: Vec<u16>,
    /// Where discovery is broadcast.
    pub broadcast: Vec<IpAddr>,
    /// Where tasks are unpacked and run (`work/<task>/`).
    pub work: PathBuf,
}

/// The master found.
#[derive(Debug, Clone, Copy)]
struct Found {
    addr: SocketAddr,
    envelope: Envelope,
}

/// Runs tasks for seed 001 masters until the runtime stops.
pub async fn run(config: CourseWorkerConfig, runner: Arc<Runner>) {
    loop {
        let master = discover(&config).await;
        tracing::info!(master = %master.addr, "seed 001 master found");
        serve_master(&config, &runner, master).await;
        tracing::warn!(master = %master.addr, "seed 001 master lost; looking again");
    }
}

/// Broadcasts `DISCOVER_MASTER` until a `MASTER_ANNOUNCE` comes back.
async fn discover(config: &CourseWorkerConfig) -> Found {
    loop {
        match discover_once(config).await {
            Ok(Some(found)) => return found,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "discovery failed"),
        }
        tokio::time::sleep(DISCOVER_EVERY).await;
    }
}

async fn discover_once(config: &CourseWorkerConfig) -> std::io::Result<Option<Found>> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).await?;
    socket.set_broadcast(true)?;
    let ask = json!({"action": "DISCOVER_MASTER", "peer_id": config.peer_id, "port_tcp": 0});
    let bytes = serde_json::to_vec(&ask).unwrap_or_default();
    for ip in &config.broadcast {
        for port in &config.discovery_ports {
            if let Err(e) = socket.send_to(&bytes, (*ip, *port)).await {
                tracing::debug!(%ip, port, error = %e, "discovery not sent");
            }
        }
    }
    let mut buffer = [0u8; 1024];
    let answer = tokio::time::timeout(DISCOVER_EVERY, async {
        loop {
            let (len, from) = socket.recv_from(&mut buffer).await?;
            if let Some(found) = read_announce(buffer.get(..len).unwrap_or_default(), from) {
                return Ok::<_, std::io::Error>(found);
            }
        }
    })
    .await;
    match answer {
        Ok(Ok(found)) => Ok(Some(found)),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// A `MASTER_ANNOUNCE` in either envelope; its address defaults to the sender's.
fn read_announce(bytes: &[u8], from: SocketAddr) -> Option<Found> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let (envelope, fields) = match (value.get("action"), value.get("type")) {
        (Some(action), _) if action == "MASTER_ANNOUNCE" => (Envelope::Flat, &value),
        (None, Some(kind)) if kind == "MASTER_ANNOUNCE" => {
            (Envelope::Typed, value.get("data").unwrap_or(&value))
        }
        _ => return None,
    };
    let port = u16::try_from(fields.get("master_port")?.as_u64()?).ok()?;
    let ip = fields
        .get("master_ip")
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(from.ip());
    Some(Found {
        addr: SocketAddr::new(ip, port),
        envelope,
    })
}

/// A message in the master's envelope.
fn wrap(envelope: Envelope, action: &str, fields: Value) -> Value {
    match envelope {
        Envelope::Typed => json!({"type": action, "data": fields}),
        Envelope::Flat => {
            let mut object = match fields {
                Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            object.insert("action".into(), Value::String(action.into()));
            Value::Object(object)
        }
    }
}

/// The name of an answer (its `action`, `status` or `type`) and its fields.
fn unwrap(answer: &Value) -> (String, &Value) {
    for key in ["action", "status"] {
        if let Some(name) = answer.get(key).and_then(Value::as_str) {
            return (name.to_owned(), answer);
        }
    }
    let name = answer
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    (name, answer.get("data").unwrap_or(answer))
}

/// One request on a connection of its own, and the master's answer.
async fn request(master: Found, message: &Value) -> Result<Value, RequestError> {
    let exchange = async {
        let mut stream = TcpStream::connect(master.addr).await?;
        let bytes = serde_json::to_vec(message)?;
        stream.write_all(&bytes).await?;
        let mut framer = Framer::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Ok(framer.finish()?);
            }
            if let Some(value) = framer.push(buffer.get(..n).unwrap_or_default())? {
                return Ok(value);
            }
        }
    };
    tokio::time::timeout(ANSWER_TIME, exchange)
        .await
        .map_err(|_| RequestError::NoAnswer)?
}

/// Registers, then runs the master's tasks until it stops answering.
async fn serve_master(config: &CourseWorkerConfig, runner: &Runner, master: Found) {
    let registered = request(
        master,
        &wrap(
            master.envelope,
            "REGISTER",
            json!({"peer_id": config.peer_id, "addr": ["0.0.0.0", 0]}),
        ),
    )
    .await;
    if let Err(e) = registered {
        tracing::warn!(error = %e, "not registered");
        return;
    }
    let heartbeat = {
        let message = wrap(
            master.envelope,
            "HEARTBEAT",
            json!({"peer_id": config.peer_id}),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                let _ = request(master, &message).await;
            }
        })
    };
    let ask = wrap(
        master.envelope,
        "REQUEST_TASK",
        json!({"peer_id": config.peer_id}),
    );
    let mut failures = 0;
    while failures < MAX_FAILURES {
        let answer = match request(master, &ask).await {
            Ok(answer) => answer,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "task request failed");
                tokio::time::sleep(IDLE_WAIT).await;
                continue;
            }
        };
        failures = 0;
        let (kind, fields) = unwrap(&answer);
        if kind != "TASK_PACKAGE" {
            tokio::time::sleep(IDLE_WAIT).await;
            continue;
        }
        let name = fields
            .get("task_name")
            .and_then(Value::as_str)
            .unwrap_or("task.zip")
            .to_owned();
        let result = match run_task(config, runner, &name, fields).await {
            Ok(result) => result,
            Err(e) => {
                tracing::warn!(task = %name, error = %e, "task not run");
                zip_outputs(b"", e.to_string().as_bytes()).unwrap_or_default()
            }
        };
        let submit = wrap(
            master.envelope,
            "SUBMIT_RESULT",
            json!({
                "peer_id": config.peer_id,
                "task_name": name,
                "result_name": name,
                "result_data": STANDARD.encode(result),
            }),
        );
        match request(master, &submit).await {
            Ok(_) => tracing::info!(task = %name, "result submitted"),
            Err(e) => tracing::warn!(task = %name, error = %e, "result not submitted"),
        }
    }
    heartbeat.abort();
}

/// Unpacks a `TASK_PACKAGE` in `work/<task>/`, runs `main.py input.csv`, and returns the
/// ZIP of its `stdout.txt` and `stderr.txt`.
async fn run_task(
    config: &CourseWorkerConfig,
    runner: &Runner,
    name: &str,
    fields: &Value,
) -> Result<Vec<u8>, CourseTaskError> {
    let data = fields
        .get("task_data")
        .and_then(Value::as_str)
        .ok_or(CourseTaskError::NoData)?;
    if data.len() > MAX_MESSAGE {
        return Err(CourseTaskError::TooLarge);
    }
    let bytes = STANDARD
        .decode(data.trim())
        .map_err(|_| CourseTaskError::NotBase64)?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let folder = config.work.join(safe.trim_start_matches('.'));
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&config.work)?;
    let archive = config.work.join(format!(".{safe}.zip"));
    std::fs::write(&archive, &bytes)?;
    let unpacked = crate::bundle::unpack(&archive, &folder);
    let _ = std::fs::remove_file(&archive);
    unpacked?;
    let outcome = runner.run_script(&folder, &["input.csv"]).await?;
    tracing::info!(task = %name, exit = ?outcome.exit_code, timed_out = outcome.timed_out, seconds = outcome.seconds, "task ran");
    // The folder is the task's: read as hostile input (at most MAX_MESSAGE / 4 bytes of
    // each, for a result must fit a message in base64), off the async threads.
    let task_folder = folder.clone();
    let result = tokio::task::spawn_blocking(move || {
        let read = |file: &str| {
            crate::taskfile::read_capped(&task_folder, Path::new(file), (MAX_MESSAGE / 4) as u64)
                .unwrap_or_else(|e| e.to_string().into_bytes())
        };
        zip_outputs(&read("stdout.txt"), &read("stderr.txt"))
    })
    .await
    .map_err(CourseTaskError::from)
    .and_then(|zipped| Ok(zipped?));
    let _ = std::fs::remove_dir_all(&folder);
    result
}

/// A ZIP of `stdout.txt` and `stderr.txt`.
fn zip_outputs(stdout: &[u8], stderr: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("stdout.txt", options)?;
    zip.write_all(stdout)?;
    zip.start_file("stderr.txt", options)?;
    zip.write_all(stderr)?;
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn announcements_in_both_envelopes_are_read() {
        let from: SocketAddr = "10.1.1.1:9999".parse().unwrap();
        let flat = br#"{"action":"MASTER_ANNOUNCE","master_ip":"10.1.1.2","master_port":5000}"#;
        let found = read_announce(flat, from).unwrap();
        assert_eq!(found.addr, "10.1.1.2:5000".parse().unwrap());
        assert_eq!(found.envelope, Envelope::Flat);
        let typed = br#"{"type":"MASTER_ANNOUNCE","data":{"master_ip":"0.0.0.0","master_port":7}}"#;
        let found = read_announce(typed, from).unwrap();
        assert_eq!(found.addr, "10.1.1.1:7".parse().unwrap());
        assert_eq!(found.envelope, Envelope::Typed);
        assert!(read_announce(br#"{"action":"DISCOVER_MASTER"}"#, from).is_none());
        assert!(read_announce(b"nonsense", from).is_none());
        let message = wrap(Envelope::Flat, "HEARTBEAT", json!({"peer_id": "w"}));
        assert_eq!(message, json!({"action": "HEARTBEAT", "peer_id": "w"}));
        assert_eq!(unwrap(&json!({"status": "OK"})).0, "OK");
        assert_eq!(
            unwrap(&json!({"type": "TASK_PACKAGE", "data": {"task_name": "t"}})).1["task_name"],
            "t"
        );
    }
}
