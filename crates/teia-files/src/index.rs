//! The index server (`teia index`, the Napster role): peers JOIN with their files, SEARCH
//! by name and UPDATE their lists, in seed 004's exact format (one JSON object per write,
//! answers `JOIN_OK`, a Python list of ports, `UPDATE_OK`) or in teia's (JSON answers with
//! sizes, hashes, keys and addresses).
//!
//! Records are kept in SQLite and survive a restart; a record whose peer's connection is
//! gone is dropped a grace time ([`GRACE`] by default) later unless the peer joins again.
//! Searches go through the index's n-grams ([`crate::proto::napster`], Search) under a
//! shared lock, many at once. A JOIN, UPDATE or LEAVE is made by one writer thread, never on
//! the threads that answer searches, one change at a time, in the same order in the database
//! and in memory: it computes what it needs (the files' n-grams, what to drop, the database
//! write) before it takes that lock alone to apply it.
//!
//! **Bounds.** [`MAX_CONNECTIONS`] connections (one more is closed at once); messages of
//! [`MAX_MESSAGE`] bytes; [`CHANGES`] changes waiting for the writer (a connection with one
//! more waits); [`IDLE_TIMEOUT`] of silence per connection; the records' limits
//! of [`Index`] (files per peer, name lengths, peers in all and per source address, bytes of
//! memory in all and per source address: see [`crate::proto::napster`], Bounds), set by
//! [`IndexConfig::limits`]; the database at most [`IndexConfig::max_disk`] bytes
//! ([`MAX_DISK_BYTES`] by default; its write-ahead log is cut back to [`WAL_BYTES`] after
//! each checkpoint). A JOIN or UPDATE past a limit is answered
//! `{"status":"ERROR","error":"busy|full","detail":...}` and changes nothing, in memory or
//! on disk. At start, the records that do not fit the limits are dropped from the
//! database, and a database bigger than its bound is compacted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::proto::napster::{
    Index, Limits, Listed, ObjectError, ObjectReader, Prepared, Record, Request,
    MAX_FILES_PER_PEER, MAX_MESSAGE,
};
use teia_node::sync::lock;

/// Time a record outlives its peer's connection, by default.
pub const GRACE: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a connection may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Changes (JOIN, UPDATE, LEAVE, a connection gone) waiting for the writer thread at most;
/// a connection with one more waits for room (and reads nothing meanwhile).
pub const CHANGES: usize = 16;
/// Bytes the records' database may take, by default; a JOIN or UPDATE beyond is answered
/// `full`.
pub const MAX_DISK_BYTES: u64 = 512 << 20;
/// Bytes the database's write-ahead log is cut back to after a checkpoint.
pub const WAL_BYTES: u64 = 8 << 20;

/// How an index server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Time a record outlives its peer's connection.
    pub grace: Duration,
    /// The limits of the records held in memory.
    pub limits: Limits,
    /// Bytes the records' database may take.
    pub max_disk: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            grace: GRACE,
            limits: Limits::default(),
            max_disk: MAX_DISK_BYTES,
        }
    }
}

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

/// Why a record was not written to the database.
#[derive(Debug, thiserror::Error)]
enum SaveError {
    /// The database is at its bound.
    #[error("the database is at its bound")]
    Full,
    /// Another failure.
    #[error(transparent)]
    Store(rusqlite::Error),
}

impl From<rusqlite::Error> for SaveError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == rusqlite::ErrorCode::DiskFull =>
            {
                Self::Full
            }
            _ => Self::Store(e),
        }
    }
}

/// What every connection shares.
struct Shared {
    index: RwLock<Index>,
    /// The database. Every change of the index is made holding it, so the database and the
    /// index change in the same order, and nothing changes between a plan and its doing.
    db: Mutex<Connection>,
    config: IndexConfig,
    writer: Writer,
}

fn read(index: &RwLock<Index>) -> RwLockReadGuard<'_, Index> {
    index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(index: &RwLock<Index>) -> RwLockWriteGuard<'_, Index> {
    index
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `record` and drops `dropped`, all or nothing.
fn save(db: &mut Connection, record: &Record, dropped: &[String]) -> Result<(), SaveError> {
    let text = serde_json::to_string(record).unwrap_or_default();
    let transaction = db.transaction()?;
    for id in dropped {
        transaction.execute("DELETE FROM records WHERE id = ?1", params![id])?;
    }
    transaction.execute(
        "INSERT OR REPLACE INTO records (id, record) VALUES (?1, ?2)",
        params![record.id, text],
    )?;
    transaction.commit()?;
    Ok(())
}

fn delete_rows(db: &Connection, ids: &[String]) {
    for id in ids {
        if let Err(e) = db.execute("DELETE FROM records WHERE id = ?1", params![id]) {
            tracing::error!(error = %e, "index record not dropped");
        }
    }
}

/// A refused change: the protocol's error code and its detail.
type Refused = (&'static str, String);

impl Shared {
    /// Holds `prepared` for connection `owner`, in the database and then in memory, or says
    /// why not (then nothing changed).
    fn hold(&self, prepared: Prepared, owner: u64) -> Result<(), Refused> {
        let mut db = lock(&self.db);
        let dropped = read(&self.index)
            .plan(&prepared)
            .map_err(|refusal| (refusal.code(), refusal.to_string()))?;
        match save(&mut db, prepared.record(), &dropped) {
            Ok(()) => {}
            Err(SaveError::Full) => {
                return Err((
                    "full",
                    format!(
                        "the index's database is at its bound of {} bytes",
                        self.config.max_disk
                    ),
                ))
            }
            Err(SaveError::Store(e)) => tracing::error!(error = %e, "index record not stored"),
        }
        let id = prepared.record().id.clone();
        match write(&self.index).put(prepared, owner) {
            Ok(dropped) => {
                for other in dropped {
                    tracing::info!(id = %other, "index record dropped for a newer one of its address");
                }
                Ok(())
            }
            Err(refusal) => {
                // Not reached: nothing changed since the plan, the database lock held.
                delete_rows(&db, std::slice::from_ref(&id));
                Err((refusal.code(), refusal.to_string()))
            }
        }
    }

    /// Drops `id`.
    fn delete(&self, id: &str) {
        let db = lock(&self.db);
        write(&self.index).remove(id);
        delete_rows(&db, &[id.to_owned()]);
    }

    /// Drops the records whose peer's connection has been gone for the grace time.
    fn expire(&self) {
        let db = lock(&self.db);
        let expired = read(&self.index).expired(now_secs(), self.config.grace.as_secs());
        let mut index = write(&self.index);
        for id in &expired {
            tracing::info!(%id, "index record expired");
            index.remove(id);
        }
        drop(index);
        delete_rows(&db, &expired);
    }

    /// Notes that `owner`'s connection to `id` is gone.
    fn gone(&self, id: &str, owner: u64) {
        let _db = lock(&self.db);
        write(&self.index).set_gone(id, owner, now_secs());
    }
}

/// A change for the writer thread.
type Job = Box<dyn FnOnce() + Send>;

/// The thread that makes every change of the records, one at a time, in the order asked.
struct Writer(mpsc::Sender<Job>);

impl Writer {
    /// Starts the thread; it ends when every sender is gone. If it cannot start, every change
    /// is answered with an error.
    fn start() -> Self {
        let (sender, mut jobs) = mpsc::channel::<Job>(CHANGES);
        let started = std::thread::Builder::new()
            .name("teia-index-writer".into())
            .spawn(move || {
                while let Some(job) = jobs.blocking_recv() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("an index change failed");
                    }
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "the index's writer thread did not start");
        }
        Self(sender)
    }

    /// Runs `work` on the writer thread, waiting for room in its queue; `None` if it failed.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, result) = oneshot::channel();
        self.0
            .send(Box::new(move || {
                let _ = done.send(work());
            }))
            .await
            .ok()?;
        result.await.ok()
    }
}

/// A bound index server.
pub struct IndexServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl IndexServer {
    /// Binds `listen` and opens (creating) the records in `data_dir`, keeping those that fit
    /// `config`'s limits.
    pub async fn bind(
        listen: SocketAddr,
        data_dir: &Path,
        config: IndexConfig,
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
        db.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(WAL_BYTES).unwrap_or(i64::MAX),
        )
        .map_err(fail)?;
        let mut index = Index::new(config.limits);
        let mut unwanted = Vec::new();
        {
            let mut statement = db.prepare("SELECT id, record FROM records").map_err(fail)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(fail)?;
            let now = now_secs();
            for (row_id, text) in rows.flatten() {
                let Ok(record) = serde_json::from_str::<Record>(&text) else {
                    continue;
                };
                let prepared = Prepared::new(record);
                let id = prepared.record().id.clone();
                match index.put(prepared, 0) {
                    Ok(dropped) => {
                        index.set_gone(&id, 0, now);
                        unwanted.extend(dropped);
                    }
                    Err(refusal) => {
                        tracing::warn!(%id, %refusal, "index record dropped at start");
                        unwanted.push(row_id);
                    }
                }
            }
        }
        delete_rows(&db, &unwanted);
        let page_size: u64 = db
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(fail)?;
        let pages: u64 = db
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .map_err(fail)?;
        let max_pages = (config.max_disk / page_size.max(512)).max(2);
        if pages > max_pages {
            tracing::info!(pages, max_pages, "index database compacted");
            db.execute_batch("VACUUM").map_err(fail)?;
        }
        db.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
            Ok(())
        })
        .map_err(fail)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| IndexError::Bind {
                addr: listen,
                source,
            })?;
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                index: RwLock::new(index),
                db: Mutex::new(db),
                config,
                writer: Writer::start(),
            }),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Records held now.
    pub fn records(&self) -> usize {
        read(&self.shared.index).len()
    }

    /// Bytes the records held now are counted for.
    pub fn bytes(&self) -> usize {
        read(&self.shared.index).bytes()
    }

    /// Serves until `stop` completes.
    pub async fn serve(self, stop: impl std::future::Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let sweeper = Arc::clone(&self.shared);
        let grace = self.shared.config.grace;
        let sweep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(
                    (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
                )
                .await;
                let shared = Arc::clone(&sweeper);
                sweeper.writer.run(move || shared.expire()).await;
            }
        });
        let owners = AtomicU64::new(1);
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
                    let shared = Arc::clone(&self.shared);
                    let owner = owners.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        connection(shared, stream, addr, owner).await;
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

async fn connection(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr, owner: u64) {
    let mut reader = ObjectReader::new(MAX_MESSAGE);
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
                Ok(value) => answer(&shared, &value, addr, owner, &mut joined).await,
                Err(ObjectError::TooLong { .. }) => {
                    let detail = format!("messages are at most {MAX_MESSAGE} bytes");
                    let _ = stream.write_all(&error_answer("too_long", &detail)).await;
                    break 'read;
                }
                Err(ObjectError::Malformed(detail)) => error_answer("bad_format", &detail),
            };
            if stream.write_all(&answer).await.is_err() {
                break 'read;
            }
        }
    }
    if let Some(id) = joined {
        let writer = Arc::clone(&shared);
        writer.writer.run(move || shared.gone(&id, owner)).await;
    }
}

/// The answer to one request.
async fn answer(
    shared: &Arc<Shared>,
    value: &Value,
    addr: SocketAddr,
    owner: u64,
    joined: &mut Option<String>,
) -> Vec<u8> {
    let request = match Request::from_value(value) {
        Ok(request) => request,
        Err(refused) => return error_answer("bad_request", &refused.to_string()),
    };
    match request {
        Request::Search { query, teia } => {
            let index = read(&shared.index);
            if teia {
                json!({"results": index.search(&query)})
                    .to_string()
                    .into_bytes()
            } else {
                index.seed_answer(&query).into_bytes()
            }
        }
        Request::Join {
            file_path,
            files,
            teia,
        } => {
            // A teia node learns from the answer's form that this is a teia index.
            let teia_join = teia.is_some();
            let writer = Arc::clone(shared);
            let shared = Arc::clone(shared);
            let before = joined.clone();
            let done = writer
                .writer
                .run(move || {
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
                    let prepared = Prepared::new(record);
                    let (id, count, ignored) = (
                        prepared.record().id.clone(),
                        prepared.record().files.len(),
                        prepared.ignored(),
                    );
                    shared.hold(prepared, owner)?;
                    if let Some(previous) = before.filter(|p| *p != id) {
                        // One connection holds one record: the one it joined before is left.
                        shared.gone(&previous, owner);
                    }
                    let bytes = read(&shared.index).bytes();
                    tracing::info!(%id, files = count, ignored, bytes, "joined");
                    Ok(id)
                })
                .await;
            match done {
                Some(Ok(id)) => {
                    *joined = Some(id);
                    if teia_join {
                        json!({"status":"JOIN_OK","teia":1})
                            .to_string()
                            .into_bytes()
                    } else {
                        b"JOIN_OK".to_vec()
                    }
                }
                Some(Err((code, detail))) => error_answer(code, &detail),
                None => error_answer("busy", "the index failed to take the record"),
            }
        }
        Request::Update { files } => {
            let Some(id) = joined.clone() else {
                return error_answer("not_joined", "JOIN before UPDATE");
            };
            let writer = Arc::clone(shared);
            let shared = Arc::clone(shared);
            let done = writer
                .writer
                .run(move || {
                    let Some(record) = read(&shared.index).get(&id).map(|r| Record {
                        id: r.id.clone(),
                        port: r.port,
                        ip: r.ip.clone(),
                        key: r.key.clone(),
                        files: Vec::new(),
                    }) else {
                        return Err(("not_joined", "JOIN before UPDATE".to_owned()));
                    };
                    shared.hold(Prepared::new(Record { files, ..record }), owner)
                })
                .await;
            match done {
                Some(Ok(())) => b"UPDATE_OK".to_vec(),
                Some(Err((code, detail))) => error_answer(code, &detail),
                None => error_answer("busy", "the index failed to take the record"),
            }
        }
        Request::Leave => {
            if let Some(id) = joined.take() {
                let writer = Arc::clone(shared);
                let shared = Arc::clone(shared);
                writer.writer.run(move || shared.delete(&id)).await;
            }
            b"LEAVE_OK".to_vec()
        }
        Request::DownloadRequest { .. } => error_answer(
            "bad_request",
            "this is an index; ask the peer that holds the file",
        ),
    }
}
