//! The index server (`teia index`, the Napster role): peers JOIN with their files, SEARCH
//! by name and UPDATE their lists, in seed 004's exact format (one JSON object per write,
//! answers `JOIN_OK`, a Python list of ports, `UPDATE_OK`) or in teia's (JSON answers with
//! sizes, hashes, keys and addresses).
//!
//! Records are kept in SQLite and survive a restart; a record whose peer's connection is
//! gone is dropped a grace time ([`GRACE`] by default) later unless the peer joins again. Bounds: [`MAX_CONNECTIONS`]
//! connections (one more is closed at once), messages of [`MAX_MESSAGE`] bytes, the
//! record limits of [`Index`], [`IDLE_TIMEOUT`] of silence per connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::proto::napster::{
    Index, Listed, ObjectReader, ReadError, Record, Request, MAX_FILES_PER_PEER, MAX_MESSAGE,
};
use crate::service::lock;

/// Time a record outlives its peer's connection, by default.
pub const GRACE: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a connection may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why the index could not start.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("index database {path}: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
}

struct State {
    index: Index,
    /// When each record's peer went away (unix seconds).
    gone: std::collections::HashMap<String, u64>,
    db: Connection,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl State {
    fn save(&self, record: &Record) {
        let text = serde_json::to_string(record).unwrap_or_default();
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO records (id, record) VALUES (?1, ?2)",
            params![record.id, text],
        ) {
            tracing::error!(error = %e, "index record not stored");
        }
    }

    fn delete(&mut self, id: &str) {
        self.index.remove(id);
        self.gone.remove(id);
        if let Err(e) = self
            .db
            .execute("DELETE FROM records WHERE id = ?1", params![id])
        {
            tracing::error!(error = %e, "index record not dropped");
        }
    }
}

/// A bound index server.
pub struct IndexServer {
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    grace: Duration,
}

impl IndexServer {
    /// Binds `listen` and opens (creating) the records in `data_dir`; a record outlives its
    /// peer's connection by `grace`.
    pub async fn bind(
        listen: SocketAddr,
        data_dir: &Path,
        grace: Duration,
    ) -> Result<Self, IndexError> {
        let path = data_dir.join("index.sqlite3");
        let fail = |source| IndexError::Store {
            path: path.clone(),
            source,
        };
        let db = teia_node::store::open_database(&path, false).map_err(fail)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, record TEXT NOT NULL);",
        )
        .map_err(fail)?;
        let mut index = Index::default();
        let mut gone = std::collections::HashMap::new();
        {
            let mut statement = db.prepare("SELECT record FROM records").map_err(fail)?;
            let rows = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(fail)?;
            let now = now_secs();
            for text in rows.flatten() {
                if let Ok(record) = serde_json::from_str::<Record>(&text) {
                    gone.insert(record.id.clone(), now);
                    index.put(record);
                }
            }
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| IndexError::Bind {
                addr: listen,
                source,
            })?;
        Ok(Self {
            listener,
            state: Arc::new(Mutex::new(State { index, gone, db })),
            grace,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Records held now.
    pub fn records(&self) -> usize {
        lock(&self.state).index.len()
    }

    /// Serves until `stop` completes.
    pub async fn serve(self, stop: impl std::future::Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let sweeper = Arc::clone(&self.state);
        let grace = self.grace;
        let sweep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(
                    (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
                )
                .await;
                let mut state = lock(&sweeper);
                let now = now_secs();
                let expired: Vec<String> = state
                    .gone
                    .iter()
                    .filter(|(_, at)| now.saturating_sub(**at) >= grace.as_secs())
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    tracing::info!(%id, "index record expired");
                    state.delete(&id);
                }
            }
        });
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                accepted = self.listener.accept() => {
                    let Ok((stream, addr)) = accepted else { continue };
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(%addr, "index full; connection closed");
                        continue;
                    };
                    let state = Arc::clone(&self.state);
                    tokio::spawn(async move {
                        connection(state, stream, addr).await;
                        drop(permit);
                    });
                }
            }
        }
        sweep.abort();
    }
}

/// The names of the regular files in a seed peer's folder: read only for a peer on this
/// machine (the seed's JOIN sends a local path), never following links out of it.
fn list_folder(path: &str, peer: SocketAddr) -> Vec<Listed> {
    if !peer.ip().is_loopback() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .take(MAX_FILES_PER_PEER)
        .map(|e| Listed {
            name: e.file_name().to_string_lossy().into_owned(),
            size: e.metadata().map_or(0, |m| m.len()),
            hash: String::new(),
        })
        .collect()
}

fn error_answer(code: &str, detail: &str) -> Vec<u8> {
    json!({"status":"ERROR","error":code,"detail":detail})
        .to_string()
        .into_bytes()
}

async fn connection(state: Arc<Mutex<State>>, mut stream: TcpStream, addr: SocketAddr) {
    let mut reader = ObjectReader::default();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut joined: Option<String> = None;
    'read: loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        reader.push(buffer.get(..n).unwrap_or_default());
        while let Some(object) = reader.next_object() {
            let answer = match object {
                Ok(value) => answer(&state, &value, addr, &mut joined),
                Err(ReadError::TooLong) => {
                    let detail = format!("messages are at most {MAX_MESSAGE} bytes");
                    let _ = stream.write_all(&error_answer("too_long", &detail)).await;
                    break 'read;
                }
                Err(ReadError::Malformed(detail)) => error_answer("bad_format", &detail),
            };
            if stream.write_all(&answer).await.is_err() {
                break 'read;
            }
        }
    }
    if let Some(id) = joined {
        lock(&state).gone.insert(id, now_secs());
    }
}

/// The answer to one request.
fn answer(
    state: &Mutex<State>,
    value: &Value,
    addr: SocketAddr,
    joined: &mut Option<String>,
) -> Vec<u8> {
    let request = match Request::from_value(value) {
        Ok(request) => request,
        Err(detail) => return error_answer("bad_request", &detail),
    };
    let mut state = lock(state);
    match request {
        Request::Join {
            file_path,
            files,
            teia,
        } => {
            let record = match teia {
                Some(peer) => Record {
                    id: peer.peer_id,
                    port: peer.port.unwrap_or(0),
                    ip: addr.ip().to_string(),
                    key: Some(peer.key),
                    files,
                },
                None => Record {
                    id: addr.to_string(),
                    port: addr.port(),
                    ip: addr.ip().to_string(),
                    key: None,
                    files: file_path.map_or(files, |p| list_folder(&p, addr)),
                },
            };
            let id = record.id.clone();
            if !state.index.put(record.clone()) {
                return error_answer("busy", "the index is full");
            }
            state.save(&record);
            state.gone.remove(&id);
            tracing::info!(%id, files = record.files.len(), "joined");
            *joined = Some(id);
            b"JOIN_OK".to_vec()
        }
        Request::Search { query, teia } => {
            if teia {
                json!({"results": state.index.search(&query)})
                    .to_string()
                    .into_bytes()
            } else {
                state.index.seed_answer(&query).into_bytes()
            }
        }
        Request::Update { files } => {
            let Some(id) = joined.clone() else {
                return error_answer("not_joined", "JOIN before UPDATE");
            };
            if !state.index.update(&id, files) {
                return error_answer("not_joined", "JOIN before UPDATE");
            }
            if let Some(record) = state.index.get(&id).cloned() {
                state.save(&record);
            }
            b"UPDATE_OK".to_vec()
        }
        Request::Leave => {
            if let Some(id) = joined.take() {
                state.delete(&id);
            }
            b"LEAVE_OK".to_vec()
        }
        Request::DownloadRequest { .. } => error_answer(
            "bad_request",
            "this is an index; ask the peer that holds the file",
        ),
    }
}
