//! The chat's history on disk, so that the dashboard's conversation survives a restart: the
//! last [`CHAT_KEPT`] entries of [`Live`](crate::live::Live), each with its delivery state,
//! in an SQLite file of the node's data folder. A thread of its own owns the connection and
//! writes what the hub hands it in batches (one transaction each), so the hub never waits
//! on the disk; a write is durable once its transaction commits (WAL, `synchronous=NORMAL`:
//! a `kill -9` loses nothing committed). The file is its owner's alone (mode 0600).
//!
//! **Bounds**: [`CHAT_KEPT`] rows (older ones are deleted with each batch), each text at
//! most [`CHAT_TEXT_KEPT`](crate::live::CHAT_TEXT_KEPT) bytes, so about 2.5 MB on disk;
//! [`WRITES_QUEUED`] writes wait for the thread at most: past it a write is dropped (the
//! page still shows it; only the copy on disk misses it), counted and said once in the
//! log. A row the file holds that is not one this module wrote (another kind, a state it
//! does not know) is skipped when loading.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::{params, Connection};

use crate::live::{ChatEntry, CHAT_KEPT};

/// Writes waiting for the history's thread at most.
pub const WRITES_QUEUED: usize = 1024;
/// Writes the thread commits in one transaction at most.
const BATCH: usize = 256;

/// Why the history could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file could not be opened, made or read.
    #[error("cannot use the chat history at {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The file could not be made private.
    #[error("cannot make the chat history at {path} private: {source}")]
    Private {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The thread could not start.
    #[error("cannot start the chat history's thread: {0}")]
    Thread(std::io::Error),
}

/// The writer's handle: what the hub hands the thread. Dropping it waits for the thread to
/// commit what it was handed.
pub struct ChatHistory {
    writes: Option<SyncSender<(u64, ChatEntry)>>,
    thread: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl Drop for ChatHistory {
    fn drop(&mut self) {
        self.writes = None;
        if let Some(thread) = self.thread.take() {
            // A thread that panicked has nothing left to commit.
            let _ = thread.join();
        }
    }
}

impl ChatHistory {
    /// Opens (or makes) the history at `path` and starts its thread; returns it with the
    /// entries kept there, oldest first, each with its sequence number.
    pub fn open(path: &Path) -> Result<(Self, Vec<(u64, ChatEntry)>), HistoryError> {
        let sqlite = |source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let connection = Connection::open(path).map_err(sqlite)?;
        // Private messages: the owner's alone (SQLite gives its journal files the same mode).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| HistoryError::Private {
                path: path.to_owned(),
                source,
            })?;
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
                 CREATE TABLE IF NOT EXISTS chat (
                     seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, direction TEXT NOT NULL,
                     src TEXT NOT NULL, dst TEXT NOT NULL, text TEXT NOT NULL,
                     state TEXT NOT NULL, detail TEXT, at_ms INTEGER NOT NULL);",
            )
            .map_err(sqlite)?;
        let kept = load(&connection).map_err(sqlite)?;
        let (writes, received) = std::sync::mpsc::sync_channel(WRITES_QUEUED);
        let shown = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("chat-history".into())
            .spawn(move || write_all(connection, received, &shown))
            .map_err(HistoryError::Thread)?;
        let history = Self {
            writes: Some(writes),
            thread: Some(thread),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        Ok((history, kept))
    }

    /// Hands entry `seq` (new or changed) to the thread; dropped when [`WRITES_QUEUED`]
    /// writes wait already.
    pub fn keep(&self, seq: u64, entry: &ChatEntry) {
        let Some(writes) = &self.writes else {
            return;
        };
        match writes.try_send((seq, entry.clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "the chat history's disk is behind: some messages are shown but not kept \
                         for the next start"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes dropped since the start (the disk was behind, or the thread had stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The last [`CHAT_KEPT`] rows, oldest first; rows this module did not write are skipped.
fn load(connection: &Connection) -> rusqlite::Result<Vec<(u64, ChatEntry)>> {
    let mut query = connection.prepare(
        "SELECT seq, msg_id, direction, src, dst, text, state, detail, at_ms FROM chat
         ORDER BY seq DESC LIMIT ?1",
    )?;
    let rows = query.query_map(params![CHAT_KEPT as i64], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
            row.get::<_, String>(6)?,
            row.get::<_, Option<String>>(7)?,
            row.get::<_, i64>(8)?,
        ))
    })?;
    let mut kept = Vec::new();
    for row in rows {
        let Ok((seq, msg_id, direction, src, dst, text, state, detail, at_ms)) = row else {
            continue;
        };
        let (Some(direction), Some(state), Ok(seq)) = (
            known(&direction, &["in", "out"]),
            known(&state, crate::live::CHAT_STATES),
            u64::try_from(seq),
        ) else {
            continue;
        };
        kept.push((
            seq,
            ChatEntry {
                msg_id,
                direction,
                src,
                dst,
                text: crate::live::cut_text(text),
                state,
                detail,
                at_ms: u64::try_from(at_ms).unwrap_or(0),
            },
        ));
    }
    kept.reverse();
    Ok(kept)
}

/// `value` as one of `names`.
fn known(value: &str, names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|name| *name == value)
}

/// The thread: commits the writes in batches until the hub is gone.
fn write_all(mut connection: Connection, writes: Receiver<(u64, ChatEntry)>, path: &Path) {
    let mut failed = false;
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match writes.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        if let Err(e) = commit(&mut connection, &batch) {
            if !failed {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot write the chat history: this run's messages may not be kept");
            }
            failed = true;
        }
    }
}

/// Writes `batch` (each entry replacing the row of its sequence number) and deletes the
/// rows older than the last [`CHAT_KEPT`], in one transaction.
fn commit(connection: &mut Connection, batch: &[(u64, ChatEntry)]) -> rusqlite::Result<()> {
    let transaction = connection.transaction()?;
    {
        let mut upsert = transaction.prepare_cached(
            "INSERT OR REPLACE INTO chat
             (seq, msg_id, direction, src, dst, text, state, detail, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for (seq, entry) in batch {
            upsert.execute(params![
                i64::try_from(*seq).unwrap_or(i64::MAX),
                entry.msg_id,
                entry.direction,
                entry.src,
                entry.dst,
                entry.text,
                entry.state,
                entry.detail,
                i64::try_from(entry.at_ms).unwrap_or(i64::MAX),
            ])?;
        }
    }
    transaction.execute(
        "DELETE FROM chat WHERE seq <= (SELECT MAX(seq) FROM chat) - ?1",
        params![CHAT_KEPT as i64],
    )?;
    transaction.commit()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::live::{Live, CHAT_TEXT_KEPT};
    use serde_json::json;

    fn reopened(path: &Path) -> Vec<(u64, ChatEntry)> {
        ChatHistory::open(path).unwrap().1
    }

    /// What the hub kept, with each message's last state, is there at the next start, and
    /// the numbering goes on after it; only the last [`CHAT_KEPT`] stay on disk; rows the
    /// history did not write are skipped.
    #[test]
    fn the_conversation_and_its_states_survive_a_restart_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.sqlite3");
        let live = Live::with_history("ana@lab", Some(ChatHistory::open(&path).unwrap()));
        live.publish(&json!({"event":"sent","msg_id":"m1","dst":"bob@lab","payload":"oi"}));
        live.publish(&json!({"event":"message","msg_id":"m2","src":"bob@lab",
                             "dst":"ana@lab","payload":"olá"}));
        live.publish(&json!({"event":"ack","msg_id":"m1","from":"bob@lab"}));
        drop(live);
        let kept = reopened(&path);
        let said: Vec<(u64, &str, &str, &str)> = kept
            .iter()
            .map(|(seq, e)| (*seq, e.msg_id.as_str(), e.text.as_str(), e.state))
            .collect();
        assert_eq!(
            said,
            [(0, "m1", "oi", "delivered"), (1, "m2", "olá", "received")]
        );

        let live = Live::with_history("ana@lab", Some(ChatHistory::open(&path).unwrap()));
        assert_eq!(live.chat().len(), 2);
        for n in 0..CHAT_KEPT + 5 {
            live.publish(
                &json!({"event":"message","msg_id":format!("n{n}"),"src":"bob@lab",
                                 "dst":"ana@lab","payload":"x".repeat(CHAT_TEXT_KEPT)}),
            );
        }
        drop(live);
        let connection = Connection::open(&path).unwrap();
        connection
            .execute(
                "INSERT INTO chat VALUES (999999, 'z', 'sideways', 's', 'd', 't', 'sent', NULL, 0)",
                [],
            )
            .unwrap();
        let rows: i64 = connection
            .query_row("SELECT COUNT(*) FROM chat", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows as usize, CHAT_KEPT + 1);
        drop(connection);
        let kept = reopened(&path);
        assert_eq!(kept.len(), CHAT_KEPT - 1, "the odd row skipped");
        assert_eq!(kept.last().unwrap().1.msg_id, format!("n{}", CHAT_KEPT + 4));
        assert_eq!(kept.last().unwrap().0, CHAT_KEPT as u64 + 6);
    }
}
