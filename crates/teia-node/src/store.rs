//! The node's durable state in SQLite (WAL): SENDs awaiting their ACK, so a restart resumes
//! them; the ids of SENDs delivered here, so their retransmissions are not delivered twice;
//! SENDs delivered but not yet shown by the application, so an acknowledged message is never
//! lost; and the keys pinned per peer id. Each change is committed before the node goes on,
//! so nothing acknowledged to the user or to a peer is lost on `kill -9`. At most
//! [`DELIVERED_KEPT`] delivered ids and [`UNSHOWN_KEPT`] unshown messages are kept.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};
use teia_core::identity::PublicKey;
use teia_core::overlay::{Inbound, PendingSend, Restored};

/// Delivered ids kept; older ones are pruned.
pub const DELIVERED_KEPT: i64 = 16_384;
/// Delivered messages kept while the application has not shown them (one that never marks
/// them shown cannot fill the disk); older ones are pruned.
pub const UNSHOWN_KEPT: i64 = 16_384;
/// Deliveries between two prunings.
const PRUNE_EVERY: u32 = 1_024;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("node database {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: rusqlite::Error,
}

/// The open database.
pub struct NodeStore {
    path: PathBuf,
    conn: Connection,
    since_prune: u32,
}

/// Opens (creating it and its folder if needed) a SQLite database for durable state: WAL
/// journal, `synchronous = NORMAL` (a commit survives `kill -9` of the process). With
/// `exclusive`, for a database one process holds alone (its lock file says so), no file
/// locks per transaction and the WAL index kept in memory.
pub fn open_database(path: &Path, exclusive: bool) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    }
    let conn = Connection::open(path)?;
    if exclusive {
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

impl NodeStore {
    /// Opens (creating if needed) the database at `path` and reads what it holds.
    pub fn open(path: &Path) -> Result<(Self, Restored), StoreError> {
        let fail = |source| StoreError {
            path: path.to_owned(),
            source,
        };
        let conn = open_database(path, true).map_err(fail)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                msg_id TEXT PRIMARY KEY,
                dst TEXT NOT NULL,
                payload TEXT NOT NULL,
                deadline INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS delivered (
                seq INTEGER PRIMARY KEY,
                msg_id TEXT NOT NULL UNIQUE
            );
            CREATE TABLE IF NOT EXISTS inbox (
                seq INTEGER PRIMARY KEY,
                msg_id TEXT NOT NULL UNIQUE,
                src TEXT NOT NULL,
                dst TEXT NOT NULL,
                payload TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS pins (
                peer_id TEXT PRIMARY KEY,
                key TEXT NOT NULL
            );",
        )
        .map_err(fail)?;
        let restored = read(&conn).map_err(fail)?;
        Ok((
            Self {
                path: path.to_owned(),
                conn,
                since_prune: 0,
            },
            restored,
        ))
    }

    /// Stores a SEND awaiting its ACK.
    pub fn remember(&mut self, send: &PendingSend) -> Result<(), StoreError> {
        let deadline = i64::try_from(send.deadline_unix_ms).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO outbox (msg_id, dst, payload, deadline) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut insert| {
                insert.execute(params![send.msg_id, send.dst, send.payload.to_string(), deadline])
            })
            .map(drop)
            .map_err(|source| self.error(source))
    }

    /// Drops a SEND that was acknowledged or given up.
    pub fn forget(&mut self, msg_id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE msg_id = ?1")
            .and_then(|mut delete| delete.execute(params![msg_id]))
            .map(drop)
            .map_err(|source| self.error(source))
    }

    /// Records a SEND delivered here, and keeps it until [`NodeStore::shown`], in one
    /// transaction.
    pub fn delivered(&mut self, message: &Inbound) -> Result<(), StoreError> {
        let result = self.insert_delivered(message);
        result.map_err(|source| self.error(source))?;
        self.since_prune += 1;
        if self.since_prune >= PRUNE_EVERY {
            self.since_prune = 0;
            self.conn
                .execute_batch(&format!(
                    "DELETE FROM delivered WHERE seq <= (SELECT max(seq) FROM delivered) - {DELIVERED_KEPT};
                     DELETE FROM inbox WHERE seq <= (SELECT max(seq) FROM inbox) - {UNSHOWN_KEPT};"
                ))
                .map_err(|source| self.error(source))?;
        }
        Ok(())
    }

    fn insert_delivered(&mut self, message: &Inbound) -> rusqlite::Result<()> {
        let transaction = self.conn.transaction()?;
        transaction
            .prepare_cached("INSERT OR IGNORE INTO delivered (msg_id) VALUES (?1)")?
            .execute(params![message.msg_id])?;
        transaction
            .prepare_cached(
                "INSERT OR IGNORE INTO inbox (msg_id, src, dst, payload) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                message.msg_id,
                message.src,
                message.dst,
                message.payload.to_string()
            ])?;
        transaction.commit()
    }

    /// The application has shown the message `msg_id`: it is not handed over again.
    pub fn shown(&mut self, msg_id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM inbox WHERE msg_id = ?1")
            .and_then(|mut delete| delete.execute(params![msg_id]))
            .map(drop)
            .map_err(|source| self.error(source))
    }

    /// Pins `key` for `peer_id`.
    pub fn pin(&mut self, peer_id: &str, key: &PublicKey) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO pins (peer_id, key) VALUES (?1, ?2)",
                params![peer_id, key.to_string()],
            )
            .map(drop)
            .map_err(|source| self.error(source))
    }

    /// Drops the pin of `peer_id`.
    pub fn unpin(&mut self, peer_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM pins WHERE peer_id = ?1", params![peer_id])
            .map(drop)
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }
}

fn read(conn: &Connection) -> rusqlite::Result<Restored> {
    let sends = rows(
        conn,
        "SELECT msg_id, dst, payload, deadline FROM outbox",
        |row| {
            let msg_id: String = row.get(0)?;
            let (dst, deadline): (String, i64) = (row.get(1)?, row.get(3)?);
            Ok(
                payload(&msg_id, &row.get::<_, String>(2)?).map(|payload| PendingSend {
                    msg_id,
                    dst,
                    payload,
                    deadline_unix_ms: u64::try_from(deadline).unwrap_or(0),
                }),
            )
        },
    )?;
    let delivered = rows(conn, "SELECT msg_id FROM delivered ORDER BY seq", |row| {
        row.get(0).map(Some)
    })?;
    let unshown = rows(
        conn,
        "SELECT msg_id, src, dst, payload FROM inbox ORDER BY seq",
        |row| {
            let msg_id: String = row.get(0)?;
            let (src, dst): (String, String) = (row.get(1)?, row.get(2)?);
            Ok(
                payload(&msg_id, &row.get::<_, String>(3)?).map(|payload| Inbound {
                    msg_id,
                    src,
                    dst,
                    payload,
                }),
            )
        },
    )?;
    let pins = rows(conn, "SELECT peer_id, key FROM pins", |row| {
        let (peer_id, key): (String, String) = (row.get(0)?, row.get(1)?);
        Ok(match PublicKey::parse(&key) {
            Ok(key) => Some((peer_id, key)),
            Err(e) => {
                tracing::warn!(%peer_id, error = %e, "skipping an unreadable pinned key");
                None
            }
        })
    })?;
    Ok(Restored {
        sends,
        delivered,
        unshown,
        pins,
    })
}

/// The rows of `sql`, each made a value by `decode`; a row it cannot make sense of (`None`)
/// is skipped.
fn rows<T>(
    conn: &Connection,
    sql: &str,
    decode: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Option<T>>,
) -> rusqlite::Result<Vec<T>> {
    let mut statement = conn.prepare(sql)?;
    let decoded = statement.query_map([], |row| decode(row))?;
    let mut values = Vec::new();
    for value in decoded {
        values.extend(value?);
    }
    Ok(values)
}

/// A stored payload; `None`, with a warning, when it cannot be read.
fn payload(msg_id: &str, text: &str) -> Option<serde_json::Value> {
    match serde_json::from_str(text) {
        Ok(payload) => Some(payload),
        Err(e) => {
            tracing::warn!(%msg_id, error = %e, "skipping a stored message whose payload cannot be read");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use teia_core::identity::Identity;

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes/a@U.sqlite3");
        let (mut store, restored) = NodeStore::open(&path).unwrap();
        assert_eq!(restored, Restored::default());
        let send = |id: &str| PendingSend {
            msg_id: id.into(),
            dst: "b@U".into(),
            payload: json!({"text":"hi"}),
            deadline_unix_ms: 99,
        };
        let inbound = |id: &str| Inbound {
            msg_id: id.into(),
            src: "b@U".into(),
            dst: "a@U".into(),
            payload: json!("oi"),
        };
        store.remember(&send("m1")).unwrap();
        store.remember(&send("m2")).unwrap();
        store.forget("m1").unwrap();
        store.delivered(&inbound("d1")).unwrap();
        store.delivered(&inbound("d1")).unwrap();
        store.delivered(&inbound("d2")).unwrap();
        store.shown("d1").unwrap();
        let key = Identity::from_seed(&[3; 32]).public_key();
        store.pin("b@U", &key).unwrap();
        store.pin("c@U", &key).unwrap();
        store.unpin("c@U").unwrap();
        drop(store);
        let (_, restored) = NodeStore::open(&path).unwrap();
        assert_eq!(restored.sends, vec![send("m2")]);
        assert_eq!(restored.delivered, vec!["d1".to_owned(), "d2".to_owned()]);
        assert_eq!(restored.unshown, vec![inbound("d2")]);
        assert_eq!(restored.pins, vec![("b@U".to_owned(), key)]);
    }
}
