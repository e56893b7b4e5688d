//! A node's link to an index server (`teia node --index HOST:PORT`): JOIN with the files
//! shared, UPDATE when they change, SEARCH by name, LEAVE on exit. Reconnects with backoff
//! (1 s doubling to [`MAX_BACKOFF`]). Understands both a teia index (JSON answers) and a
//! seed 004 index (a Python list of ports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use teia_core::identity::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::download::Source;
use crate::findings::{Holding, SeedHolding};
use crate::proto::msg::Found;
use crate::proto::napster::{Hit, Listed, ObjectReader, ReadError};
use crate::proto::tree::Hash;
use crate::state::{FilesEvent, IndexCommand, Inner};
use crate::sync::lock;

/// Longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Time an answer may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between two checks of the shared files for an UPDATE.
pub const UPDATE_EVERY: Duration = Duration::from_secs(5);
/// Why the link to the index went down.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// The index closed the connection.
    #[error("the index closed the connection")]
    Closed,
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer within [`ANSWER_TIMEOUT`].
    #[error("the index did not answer")]
    NoAnswer,
    /// The connection did not open within [`ANSWER_TIMEOUT`].
    #[error("connect timed out")]
    ConnectTimedOut,
    /// The answer is not a message.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The answer is longer than a message may be.
    #[error("the index's answer is too long")]
    TooLong,
    /// JOIN was refused.
    #[error("JOIN answered {0}")]
    JoinRefused(String),
}

enum Answer {
    Token(String),
    Json(Value),
}

async fn read_answer(stream: &mut TcpStream) -> Result<Answer, LinkError> {
    let mut reader = ObjectReader::default();
    let mut raw = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(ANSWER_TIMEOUT, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => n,
            Ok(Ok(_)) => return Err(LinkError::Closed),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(LinkError::NoAnswer),
        };
        let bytes = buffer.get(..n).unwrap_or_default();
        raw.extend_from_slice(bytes);
        let trimmed = String::from_utf8_lossy(&raw).trim().to_owned();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            reader.push(bytes);
            match reader.next_object() {
                Some(Ok(value)) => return Ok(Answer::Json(value)),
                Some(Err(e)) => return Err(e.into()),
                None => continue,
            }
        }
        if trimmed.ends_with("_OK") {
            return Ok(Answer::Token(trimmed));
        }
        if raw.len() > crate::proto::napster::MAX_MESSAGE {
            return Err(LinkError::TooLong);
        }
    }
}

async fn exchange(stream: &mut TcpStream, request: &Value) -> Result<Answer, LinkError> {
    stream.write_all(request.to_string().as_bytes()).await?;
    read_answer(stream).await
}

fn listing(inner: &Inner) -> Vec<Listed> {
    lock(&inner.store)
        .files()
        .unwrap_or_default()
        .into_iter()
        .map(|f| Listed {
            name: f.name,
            size: f.size,
            hash: f.hash.to_hex(),
        })
        .collect()
}

/// Runs the link until LEAVE.
pub(crate) async fn run(
    inner: Arc<Inner>,
    server: String,
    mut commands: mpsc::Receiver<IndexCommand>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut warned = false;
    loop {
        match session(&inner, &server, &mut commands).await {
            Ok(()) => return,
            Err(e) => {
                if !warned {
                    inner
                        .emit(FilesEvent::Warning(format!("index {server}: {e}")))
                        .await;
                    warned = true;
                }
                tracing::debug!(%server, error = %e, "index link down");
            }
        }
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                command = commands.recv() => match command {
                    Some(IndexCommand::Leave(done)) => { let _ = done.send(()); return; }
                    Some(IndexCommand::Search(_)) => {}
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: `Ok` after LEAVE, `Err` when the connection fails.
async fn session(
    inner: &Arc<Inner>,
    server: &str,
    commands: &mut mpsc::Receiver<IndexCommand>,
) -> Result<(), LinkError> {
    let mut stream = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| LinkError::ConnectTimedOut)??;
    let index_ip = stream.peer_addr()?.ip();
    let mut sent = listing(inner);
    let join = json!({"method":"JOIN","data":{"teia":1,"peer":{
        "peer_id": inner.node_peer_id(),
        "key": inner.config.key.to_string(),
        "port": inner.config.listen.map(|a| a.port())},
        "files": sent}});
    match exchange(&mut stream, &join).await? {
        Answer::Token(token) if token == "JOIN_OK" => {}
        Answer::Token(token) => return Err(LinkError::JoinRefused(token)),
        Answer::Json(value) => return Err(LinkError::JoinRefused(value.to_string())),
    }
    tracing::info!(%server, files = sent.len(), "joined the index");
    let mut ticker = tokio::time::interval(UPDATE_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = listing(inner);
                if now != sent {
                    let update = json!({"method":"UPDATE","data":{"teia":1,"files":now}});
                    exchange(&mut stream, &update).await?;
                    sent = now;
                }
            }
            command = commands.recv() => match command {
                Some(IndexCommand::Search(text)) => {
                    let search = json!({"method":"SEARCH","data":{"teia":1,"query":text}});
                    let answer = exchange(&mut stream, &search).await?;
                    take_results(inner, &text, answer, index_ip).await;
                }
                Some(IndexCommand::Leave(done)) => {
                    let _ = exchange(&mut stream, &json!({"method":"LEAVE","data":{}})).await;
                    let _ = done.send(());
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
    }
}

/// Turns an index's answer into search results: teia hits (with keys and hashes) become
/// holders to download from; course peers' become seed holders.
async fn take_results(inner: &Arc<Inner>, text: &str, answer: Answer, index_ip: std::net::IpAddr) {
    let Answer::Json(value) = answer else {
        return;
    };
    let hits: Vec<Hit> = match &value {
        Value::Array(ports) => ports
            .iter()
            .filter_map(Value::as_u64)
            .filter_map(|p| u16::try_from(p).ok())
            .map(|port| Hit {
                name: text.to_owned(),
                size: 0,
                hash: String::new(),
                holder: SocketAddr::new(index_ip, port).to_string(),
                key: None,
                addr: SocketAddr::new(index_ip, port).to_string(),
            })
            .collect(),
        other => other
            .get("results")
            .cloned()
            .and_then(|r| serde_json::from_value(r).ok())
            .unwrap_or_default(),
    };
    let mut by_holder: std::collections::BTreeMap<String, Vec<Found>> = Default::default();
    for hit in hits.into_iter().take(crate::proto::napster::MAX_RESULTS) {
        if hit.holder == inner.node_peer_id() {
            continue;
        }
        let Ok(addr) = hit.addr.parse::<SocketAddr>() else {
            continue;
        };
        let key = hit.key.as_deref().and_then(|k| PublicKey::parse(k).ok());
        match (key, Hash::from_hex(&hit.hash)) {
            (Some(key), Some(hash)) => inner.remember(Holding {
                name: hit.name.clone(),
                size: hit.size,
                hash,
                source: Source {
                    peer_id: hit.holder.clone(),
                    key,
                    addrs: vec![addr],
                },
            }),
            _ => inner.remember_seed(SeedHolding {
                name: hit.name.clone(),
                addr,
            }),
        }
        by_holder.entry(hit.holder).or_default().push(Found {
            name: hit.name,
            size: hit.size,
            hash: hit.hash,
        });
    }
    for (holder, files) in by_holder {
        inner
            .emit(FilesEvent::SearchResults {
                text: text.to_owned(),
                holder,
                files,
            })
            .await;
    }
}
