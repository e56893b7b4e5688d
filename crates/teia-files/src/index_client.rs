//! A node's link to an index server (`teia node --index HOST:PORT`): JOIN with the files
//! shared, UPDATE when they change, SEARCH by name, LEAVE on exit. Reconnects with backoff
//! (1 s doubling to [`MAX_BACKOFF`]). Understands both a teia index (JSON answers) and a
//! seed 004 index (a Python list of ports).
//!
//! A seed 004 server reads each request with one 1,024-byte `recv`, takes the files of a
//! JOIN from `filePath` (a folder it lists itself, on its own machine) and records the
//! JOIN connection's *source port* as the peer's port. So the connection is opened from the
//! node's listen port (which `--index` binds with `SO_REUSEPORT`; tried again for
//! [`SAME_PORT_PATIENCE`] while that port is taken, then from any port with a warning), and teia's JOIN carries
//! `filePath` and no file (the files follow in an UPDATE), so that it fits that `recv`. A
//! teia index answers it with JSON; a bare `JOIN_OK` is the seed's server, spoken to in its
//! own form from then on ([`SEED_MAX_REQUEST`] bytes at most): names only, an UPDATE with
//! the names that fit (the rest left out, and said so). A JOIN with no answer is sent again
//! in the seed's form.
//!
//! **Bounds**: answers of at most `napster::MAX_MESSAGE` bytes within [`ANSWER_TIMEOUT`];
//! seed-form requests of at most [`SEED_MAX_REQUEST`] bytes.

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
use crate::proto::napster::{Hit, Listed, ObjectError, ObjectReader, MAX_MESSAGE};
use crate::proto::tree::Hash;
use crate::state::{FilesEvent, IndexCommand, Inner};
use teia_node::sync::lock;

/// Longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Time an answer may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between two checks of the shared files for an UPDATE.
pub const UPDATE_EVERY: Duration = Duration::from_secs(5);
/// Longest request in the seed's form: its server reads one `recv(1024)`.
pub const SEED_MAX_REQUEST: usize = 1024;
/// How long a connection from the listen port is tried again while the kernel still holds
/// an earlier connection between the same ports; then any port is taken, with a warning.
pub const SAME_PORT_PATIENCE: Duration = Duration::from_secs(5);
/// Time between two such tries.
const SAME_PORT_RETRY: Duration = Duration::from_millis(200);

/// How a node speaks to its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// teia's JOIN (keys, hashes, sizes), with the seed's `filePath` beside.
    Teia,
    /// The seed's own requests: names only, each within one 1,024-byte read.
    Seed,
}
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
    Read(#[from] ObjectError),
    /// The answer is longer than a message may be.
    #[error("the index's answer is too long")]
    TooLong,
    /// JOIN was refused.
    #[error("JOIN answered {0}")]
    JoinRefused(String),
    /// JOIN got no answer.
    #[error("no answer to JOIN")]
    JoinUnanswered,
    /// A seed-form JOIN cannot be written.
    #[error("the shared folder's path makes a JOIN longer than the seed's 1,024-byte read: {0}")]
    SeedJoinTooLong(String),
}

enum Answer {
    Token(String),
    Json(Value),
}

async fn read_answer(stream: &mut TcpStream) -> Result<Answer, LinkError> {
    let mut reader = ObjectReader::new(MAX_MESSAGE);
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
        if raw.len() > MAX_MESSAGE {
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
    let mut form = Form::Teia;
    loop {
        match session(&inner, &server, form, &mut commands).await {
            Ok(()) => return,
            // Not understood in teia's form: at once in the seed's.
            Err(LinkError::JoinUnanswered) if form == Form::Teia => {
                tracing::info!(%server, "no answer to teia's JOIN; joining in the seed 004 form");
                form = Form::Seed;
                continue;
            }
            Err(e) => {
                if !warned {
                    let said = match &e {
                        LinkError::JoinUnanswered => format!(
                            "index {server}: no answer to JOIN, in teia's form or the seed's: \
                             is it a `teia index` or a seed 004 server? (retrying)"
                        ),
                        e => format!("index {server}: {e}"),
                    };
                    inner.emit(FilesEvent::Warning(said)).await;
                    warned = true;
                }
                tracing::debug!(%server, error = %e, "index link down");
                if form == Form::Seed {
                    form = Form::Teia;
                }
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

/// Opens a connection to `server`, from the node's listen port when it can (a seed 004
/// server takes the source port for the peer's), else from any port.
///
/// The port or the pair of ports may be taken for a while (an earlier connection between
/// the same ports still closing, TIME_WAIT; another program's socket on the port), so the
/// listen port is tried again for [`SAME_PORT_PATIENCE`] before any port is taken.
async fn connect(server: &str, from: Option<SocketAddr>) -> Result<TcpStream, LinkError> {
    let open = async {
        let Some(from) = from else {
            return TcpStream::connect(server).await;
        };
        let mut last = std::io::Error::other("no address");
        for to in tokio::net::lookup_host(server).await? {
            let local = SocketAddr::new(
                if to.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                from.port(),
            );
            let started = tokio::time::Instant::now();
            loop {
                match connect_from(local, to).await {
                    Ok(stream) => return Ok(stream),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
                        ) && started.elapsed() < SAME_PORT_PATIENCE =>
                    {
                        tokio::time::sleep(SAME_PORT_RETRY).await;
                    }
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
        }
        tracing::warn!(error = %last, port = from.port(), "index link not from the listen port");
        TcpStream::connect(server).await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, open)
        .await
        .map_err(|_| LinkError::ConnectTimedOut)?
        .map_err(LinkError::from)
}

/// One connection from `local` (shared with the node's listener) to `to`.
async fn connect_from(local: SocketAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    teia_node::node::port_sharing_socket(local)?
        .connect(to)
        .await
}

/// The folder a seed 004 server lists for our JOIN: the first shared folder, else an empty
/// one of our own.
fn seed_folder(inner: &Inner) -> std::path::PathBuf {
    let shared = lock(&inner.store).files().unwrap_or_default();
    let roots = shared
        .iter()
        .map(|f| f.root.clone())
        .chain(inner.config.shares.iter().cloned());
    for root in roots {
        if root.is_dir() {
            return std::fs::canonicalize(&root).unwrap_or(root);
        }
    }
    let empty = inner
        .config
        .db
        .parent()
        .map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        )
        .join("index-join-empty");
    let _ = std::fs::create_dir_all(&empty);
    empty
}

/// The seed-form UPDATE of our files' names (as a seed peer asks for them), as many as
/// fit in one read; and how many were left out.
fn seed_update(inner: &Inner) -> (Vec<u8>, Vec<String>) {
    let mut names: Vec<String> = lock(&inner.store)
        .files()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names.dedup();
    let mut kept: Vec<String> = Vec::new();
    let mut left_out = Vec::new();
    for name in names {
        let mut trial = kept.clone();
        trial.push(name.clone());
        let request = json!({"method":"UPDATE","data":{"files":trial}}).to_string();
        if request.len() <= SEED_MAX_REQUEST {
            kept = trial;
        } else {
            left_out.push(name);
        }
    }
    let request = json!({"method":"UPDATE","data":{"files":kept}}).to_string();
    (request.into_bytes(), left_out)
}

/// One connection's life: `Ok` after LEAVE, `Err` when the connection fails.
async fn session(
    inner: &Arc<Inner>,
    server: &str,
    form: Form,
    commands: &mut mpsc::Receiver<IndexCommand>,
) -> Result<(), LinkError> {
    let mut stream = connect(server, inner.config.listen).await?;
    let outcome = talk(inner, server, form, commands, &mut stream).await;
    if outcome.is_err() {
        // Closed with a reset, so that no TIME_WAIT keeps the next connection from the
        // listen port.
        let _ = stream.set_zero_linger();
    }
    outcome
}

/// The requests and answers of one connection.
async fn talk(
    inner: &Arc<Inner>,
    server: &str,
    form: Form,
    commands: &mut mpsc::Receiver<IndexCommand>,
    stream: &mut TcpStream,
) -> Result<(), LinkError> {
    let index_ip = stream.peer_addr()?.ip();
    let folder = seed_folder(inner).to_string_lossy().into_owned();
    // JOIN lists no file, so that it fits the seed server's one read too; the files follow
    // in an UPDATE, in the form the answer calls for.
    let mut sent = Vec::new();
    let join = match form {
        Form::Teia => json!({"method":"JOIN","data":{"teia":1,"filePath":folder,"peer":{
            "peer_id": inner.node_peer_id(),
            "key": inner.config.key.to_string(),
            "port": inner.config.listen.map(|a| a.port())},
            "files": sent}}),
        Form::Seed => {
            let join = json!({"method":"JOIN","data":{"filePath":folder}});
            if join.to_string().len() > SEED_MAX_REQUEST {
                return Err(LinkError::SeedJoinTooLong(folder));
            }
            join
        }
    };
    // A teia index answers teia's JOIN with JSON; a bare JOIN_OK is the seed's server,
    // spoken to in its own form from here on.
    let form = match exchange(stream, &join).await {
        Ok(Answer::Json(value))
            if value.get("status").and_then(Value::as_str) == Some("JOIN_OK") =>
        {
            Form::Teia
        }
        Ok(Answer::Token(token)) if token == "JOIN_OK" => Form::Seed,
        Ok(Answer::Token(token)) => return Err(LinkError::JoinRefused(token)),
        Ok(Answer::Json(value)) => return Err(LinkError::JoinRefused(value.to_string())),
        Err(LinkError::NoAnswer | LinkError::Closed) => return Err(LinkError::JoinUnanswered),
        Err(e) => return Err(e),
    };
    tracing::info!(%server, ?form, "joined the index");
    if let (Form::Seed, Some(listen), Ok(local)) = (form, inner.config.listen, stream.local_addr())
    {
        if local.port() != listen.port() {
            inner
                .emit(FilesEvent::Warning(format!(
                    "index {server}: joined from port {}, not from the listen port {}: this \
                     seed 004 index lists the node under the port it joined from, where \
                     nothing serves",
                    local.port(),
                    listen.port()
                )))
                .await;
        }
    }
    let mut seed_sent = Vec::new();
    let mut ticker = tokio::time::interval(UPDATE_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => match form {
                Form::Teia => {
                    let now = listing(inner);
                    if now != sent {
                        let update = json!({"method":"UPDATE","data":{"teia":1,"files":now}});
                        exchange(stream, &update).await?;
                        sent = now;
                    }
                }
                Form::Seed => {
                    let (update, left_out) = seed_update(inner);
                    if update != seed_sent {
                        if !left_out.is_empty() {
                            let shown: Vec<&str> =
                                left_out.iter().take(5).map(String::as_str).collect();
                            inner.emit(FilesEvent::Warning(format!(
                                "index {server}: {} shared file(s) left out of the index (a seed \
                                 004 index reads 1,024 bytes per request): {}{}",
                                left_out.len(),
                                shown.join(", "),
                                if left_out.len() > shown.len() { ", …" } else { "" }
                            ))).await;
                        }
                        stream.write_all(&update).await?;
                        read_answer(stream).await?;
                        seed_sent = update;
                    }
                }
            },
            command = commands.recv() => match command {
                Some(IndexCommand::Search(text)) => {
                    let search = match form {
                        Form::Teia => json!({"method":"SEARCH","data":{"teia":1,"query":text}}),
                        Form::Seed => json!({"method":"SEARCH","data":{"query":text}}),
                    };
                    let answer = exchange(stream, &search).await?;
                    take_results(inner, &text, answer, index_ip).await;
                }
                Some(IndexCommand::Leave(done)) => {
                    // The seed's server knows no LEAVE: the connection just closes.
                    if form == Form::Teia {
                        let _ = exchange(stream, &json!({"method":"LEAVE","data":{}})).await;
                    }
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
    let own_port = inner.config.listen.map(|a| a.port());
    for hit in hits.into_iter().take(crate::proto::napster::MAX_RESULTS) {
        if hit.holder == inner.node_peer_id() {
            continue;
        }
        let Ok(addr) = hit.addr.parse::<SocketAddr>() else {
            continue;
        };
        // A seed index names holders by port alone: ours is not a holder to fetch from.
        if hit.key.is_none() && Some(addr.port()) == own_port && addr.ip() == index_ip {
            continue;
        }
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
                size: (hit.size > 0).then_some(hit.size),
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
