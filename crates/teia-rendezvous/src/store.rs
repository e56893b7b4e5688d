//! Durable storage of rendezvous records in SQLite (WAL), written by one thread that groups
//! concurrent writes into one transaction (group commit).
//!
//! Changes are appended to a `changes` log, which touches only the last pages of the file
//! however scattered the records are; the `records` snapshot is rewritten from snapshot plus
//! log at start and whenever the log outgrows the snapshot (see [`COMPACT_MIN`]), so the
//! file stays proportional to the live records.
//!
//! A change is acknowledged only once its transaction has committed, so an answered REGISTER
//! survives `kill -9`. The queue to the writer is bounded ([`QUEUE_CAPACITY`]): when it is
//! full, [`Store::try_reserve`] fails and the server answers `busy` instead of waiting.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use rusqlite::{params, Connection};
use teia_core::rendezvous::{Record, RecordKey, UnixMillis};
use tokio::sync::{mpsc, oneshot};

/// Changes waiting for the writer, at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Changes committed in one transaction, at most.
const BATCH: usize = 512;
const SCHEMA_VERSION: i64 = 1;
/// Changes logged before the snapshot is rewritten: at least this many, and at least twice
/// the live records, so rewriting costs O(1) per change.
pub const COMPACT_MIN: usize = 50_000;

const OP_UPSERT: i64 = 0;
const OP_DELETE: i64 = 1;
const OP_PURGE: i64 = 2;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The database was written by a newer teia.
    #[error("database {path} has schema version {found}, newer than this teia understands ({SCHEMA_VERSION})")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
    /// The writer thread has stopped (after an earlier error, or at shutdown).
    #[error("the storage writer has stopped")]
    Stopped,
    /// The commit of a batch failed.
    #[error("commit failed: {0}")]
    Commit(std::sync::Arc<rusqlite::Error>),
}

/// One change to persist.
#[derive(Debug)]
pub enum Change {
    /// Insert or replace a record.
    Upsert(Record),
    /// Delete these records.
    Delete(Vec<RecordKey>),
    /// Delete every record expired at this time.
    PurgeExpired(UnixMillis),
}

/// A change and who waits for its commit.
#[derive(Debug)]
pub struct Job {
    change: Change,
    done: Option<oneshot::Sender<Result<(), std::sync::Arc<rusqlite::Error>>>>,
}

/// A place reserved in the writer's queue: sending through it cannot fail for lack of room,
/// so a change can be queued in the same critical section that applied it in memory, and
/// the writer sees changes in the order memory did.
pub struct Reserved<'a>(mpsc::Permit<'a, Job>);

impl Reserved<'_> {
    /// Queues `change`; the receiver resolves once it is committed.
    pub fn send(self, change: Change) -> Committed {
        let (tx, rx) = oneshot::channel();
        self.0.send(Job {
            change,
            done: Some(tx),
        });
        Committed(rx)
    }

    /// Queues `change` with nobody waiting for it.
    pub fn send_detached(self, change: Change) {
        self.0.send(Job { change, done: None });
    }
}

/// Resolves when a queued change has been committed.
pub struct Committed(oneshot::Receiver<Result<(), std::sync::Arc<rusqlite::Error>>>);

impl Committed {
    /// Waits for the commit.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Commit(e)),
            Err(_) => Err(StoreError::Stopped),
        }
    }
}

/// Handle to the writer thread.
pub struct Store {
    tx: mpsc::Sender<Job>,
    writer: JoinHandle<()>,
}

impl Store {
    /// Opens (creating if needed) `rendezvous.sqlite3` in `data_dir`, reads every record
    /// back, and starts the writer thread.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<Record>), StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join("rendezvous.sqlite3");
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sql)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path: path.clone(),
                found: version,
            });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                namespace TEXT NOT NULL,
                name TEXT NOT NULL,
                ip TEXT NOT NULL,
                port INTEGER NOT NULL,
                ttl INTEGER NOT NULL,
                observed_port INTEGER NOT NULL,
                registered_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, name, ip)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS changes (
                seq INTEGER PRIMARY KEY,
                op INTEGER NOT NULL,
                namespace TEXT NOT NULL,
                name TEXT NOT NULL,
                ip TEXT NOT NULL,
                port INTEGER NOT NULL,
                ttl INTEGER NOT NULL,
                observed_port INTEGER NOT NULL,
                registered_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL
            );
            PRAGMA user_version = 1;",
        )
        .map_err(sql)?;
        let mut conn = conn;
        let records = load(&conn).map_err(sql)?;
        compact(&mut conn, &records).map_err(sql)?;
        let live = records.len();
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = std::thread::Builder::new()
            .name("rendezvous-store".into())
            .spawn(move || write_loop(conn, rx, live))
            .map_err(|source| StoreError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
        Ok((Self { tx, writer }, records))
    }

    /// Reserves a place in the writer's queue, or `None` when it is full or stopped.
    pub fn try_reserve(&self) -> Option<Reserved<'_>> {
        self.tx.try_reserve().ok().map(Reserved)
    }

    /// Stops the writer once it has committed everything queued, and waits for it.
    pub fn close(self) {
        drop(self.tx);
        if self.writer.join().is_err() {
            tracing::error!("storage writer thread panicked");
        }
    }
}

type Row = (String, String, String, i64, i64, i64, i64, i64);

fn read_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Row> {
    Ok((
        row.get(first)?,
        row.get(first + 1)?,
        row.get(first + 2)?,
        row.get(first + 3)?,
        row.get(first + 4)?,
        row.get(first + 5)?,
        row.get(first + 6)?,
        row.get(first + 7)?,
    ))
}

/// A stored row as a record; `None` for a row that does not hold one (a damaged file).
fn to_record(row: Row) -> Option<Record> {
    let (namespace, name, ip, port, ttl, observed_port, registered_at, expires_at) = row;
    Some(Record {
        key: RecordKey {
            namespace,
            name,
            ip: ip.parse::<IpAddr>().ok()?,
        },
        port: u16::try_from(port).ok()?,
        ttl: u32::try_from(ttl).ok()?,
        observed_port: u16::try_from(observed_port).ok()?,
        registered_at: u64::try_from(registered_at).ok()?,
        expires_at: u64::try_from(expires_at).ok()?,
    })
}

/// The live records: the snapshot with the change log replayed over it in order.
fn load(conn: &Connection) -> rusqlite::Result<Vec<Record>> {
    let mut live = BTreeMap::new();
    let mut skipped = 0usize;
    let mut snapshot = conn.prepare(
        "SELECT namespace, name, ip, port, ttl, observed_port, registered_at, expires_at FROM records",
    )?;
    for row in snapshot.query_map([], |row| read_row(row, 0))? {
        match to_record(row?) {
            Some(record) => {
                live.insert(record.key.clone(), record);
            }
            None => skipped += 1,
        }
    }
    let mut log = conn.prepare(
        "SELECT op, namespace, name, ip, port, ttl, observed_port, registered_at, expires_at
         FROM changes ORDER BY seq",
    )?;
    for row in log.query_map([], |row| Ok((row.get::<_, i64>(0)?, read_row(row, 1)?)))? {
        let (op, row) = row?;
        let purge_at = row.7;
        match (op, to_record(row)) {
            (OP_UPSERT, Some(record)) => {
                live.insert(record.key.clone(), record);
            }
            (OP_DELETE, Some(record)) => {
                live.remove(&record.key);
            }
            (OP_PURGE, _) => live.retain(|_, r: &mut Record| clamp(r.expires_at) > purge_at),
            _ => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, "skipped malformed stored rows");
    }
    Ok(live.into_values().collect())
}

/// Rewrites the snapshot as exactly `live` and empties the change log, in one transaction.
fn compact(conn: &mut Connection, live: &[Record]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM records", [])?;
    {
        let mut insert = tx.prepare(
            "INSERT OR REPLACE INTO records
             (namespace, name, ip, port, ttl, observed_port, registered_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for r in live {
            execute_record(&mut insert, r, None)?;
        }
    }
    tx.execute("DELETE FROM changes", [])?;
    tx.commit()
}

fn write_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>, mut live: usize) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut logged = 0usize;
    while let Some(job) = rx.blocking_recv() {
        batch.push(job);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = commit(&mut conn, &batch).map_err(std::sync::Arc::new);
        match &outcome {
            Ok(rows) => logged += rows,
            Err(e) => tracing::error!(error = %e, changes = batch.len(), "storage commit failed"),
        }
        for job in batch.drain(..) {
            if let Some(done) = job.done {
                let _ = done.send(outcome.clone().map(drop));
            }
        }
        if logged >= COMPACT_MIN.max(live * 2) {
            logged = 0;
            let compacted = load(&conn).and_then(|records| {
                compact(&mut conn, &records)?;
                Ok(records.len())
            });
            match compacted {
                Ok(count) => live = count,
                Err(e) => tracing::error!(error = %e, "storage compaction failed"),
            }
        }
    }
}

/// Appends a batch to the change log in one transaction; returns the rows written.
fn commit(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut rows = 0;
    {
        let mut append = tx.prepare_cached(
            "INSERT INTO changes
             (namespace, name, ip, port, ttl, observed_port, registered_at, expires_at, op)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for job in batch {
            match &job.change {
                Change::Upsert(r) => rows += execute_record(&mut append, r, Some(OP_UPSERT))?,
                Change::Delete(keys) => {
                    for k in keys {
                        rows += append.execute(params![
                            k.namespace,
                            k.name,
                            k.ip.to_string(),
                            0,
                            0,
                            0,
                            0,
                            0,
                            OP_DELETE
                        ])?;
                    }
                }
                Change::PurgeExpired(now) => {
                    rows +=
                        append.execute(params!["", "", "", 0, 0, 0, 0, clamp(*now), OP_PURGE])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(rows)
}

/// Runs `statement` with a record's columns as ?1 to ?8 (namespace, name, ip, port, ttl,
/// observed_port, registered_at, expires_at), and `op` as ?9 when given.
fn execute_record(
    statement: &mut rusqlite::Statement<'_>,
    r: &Record,
    op: Option<i64>,
) -> rusqlite::Result<usize> {
    statement.raw_bind_parameter(1, &r.key.namespace)?;
    statement.raw_bind_parameter(2, &r.key.name)?;
    statement.raw_bind_parameter(3, r.key.ip.to_string())?;
    statement.raw_bind_parameter(4, r.port)?;
    statement.raw_bind_parameter(5, r.ttl)?;
    statement.raw_bind_parameter(6, r.observed_port)?;
    statement.raw_bind_parameter(7, clamp(r.registered_at))?;
    statement.raw_bind_parameter(8, clamp(r.expires_at))?;
    if let Some(op) = op {
        statement.raw_bind_parameter(9, op)?;
    }
    statement.raw_execute()
}

fn clamp(millis: UnixMillis) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn record(name: &str, expires_at: u64) -> Record {
        Record {
            key: RecordKey {
                namespace: "ns".into(),
                name: name.into(),
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            port: 7070,
            ttl: 60,
            observed_port: 50_000,
            registered_at: 1_000,
            expires_at,
        }
    }

    async fn apply(store: &Store, change: Change) {
        store
            .try_reserve()
            .unwrap()
            .send(change)
            .wait()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn changes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.is_empty());
        apply(&store, Change::Upsert(record("a", 5_000))).await;
        apply(&store, Change::Upsert(record("b", 9_000))).await;
        apply(&store, Change::Upsert(record("c", 9_000))).await;
        apply(&store, Change::Delete(vec![record("c", 0).key])).await;
        apply(&store, Change::PurgeExpired(5_000)).await;
        store.close();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![record("b", 9_000)]);
        store.close();
    }

    #[tokio::test]
    async fn opening_compacts_the_log_into_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        for i in 0..50 {
            apply(&store, Change::Upsert(record("a", 5_000 + i))).await;
        }
        store.close();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![record("a", 5_049)]);
        store.close();
        let conn = Connection::open(dir.path().join("rendezvous.sqlite3")).unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!((count("records"), count("changes")), (1, 0));
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("rendezvous.sqlite3")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Schema { found: 99, .. })
        ));
    }
}
