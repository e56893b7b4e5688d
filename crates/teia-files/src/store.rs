//! File sharing's durable state in SQLite (WAL): the folders shared, each shared file's
//! hash and outboard (recomputed only when its size or modification time changes), and the
//! downloads not yet finished (with their verified outboard, so a restart resumes them).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::proto::tree::{Hash, Outboard};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("file-sharing database {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: rusqlite::Error,
}

/// One shared file as indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// Where it is.
    pub path: PathBuf,
    /// The shared folder (or file) it is served from.
    pub root: PathBuf,
    /// Its name relative to the shared folder's parent (`folder/sub/file`).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime: i64,
    /// Content hash.
    pub hash: Hash,
}

/// A download not yet finished.
#[derive(Debug, Clone)]
pub struct PendingDownload {
    /// The content.
    pub hash: Hash,
    /// Folder it goes to.
    pub dir: PathBuf,
    /// File name it gets.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// The verified outboard, once a holder sent it.
    pub outboard: Option<Vec<u8>>,
}

/// The open database.
pub struct FileStore {
    path: PathBuf,
    conn: Connection,
}

fn hash_of(bytes: Vec<u8>) -> Option<Hash> {
    <[u8; 32]>::try_from(bytes).ok().map(Hash)
}

impl FileStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fail = |source| StoreError {
            path: path.to_owned(),
            source,
        };
        let conn = teia_node::store::open_database(path, false).map_err(fail)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS shares (
                path TEXT PRIMARY KEY
            );
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY,
                root TEXT NOT NULL,
                name TEXT NOT NULL,
                size INTEGER NOT NULL,
                mtime INTEGER NOT NULL,
                hash BLOB NOT NULL,
                outboard BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS files_by_hash ON files(hash);
            CREATE TABLE IF NOT EXISTS downloads (
                hash BLOB PRIMARY KEY,
                dir TEXT NOT NULL,
                name TEXT NOT NULL,
                size INTEGER NOT NULL,
                outboard BLOB
            );",
        )
        .map_err(fail)?;
        Ok(Self {
            path: path.to_owned(),
            conn,
        })
    }

    fn fail(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// The folders and files shared.
    pub fn shares(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT path FROM shares ORDER BY path")
            .map_err(|e| self.fail(e))?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(|e| self.fail(e))?;
        rows.map(|r| r.map(PathBuf::from).map_err(|e| self.fail(e)))
            .collect()
    }

    /// Adds a shared folder or file.
    pub fn add_share(&self, path: &Path) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO shares (path) VALUES (?1)",
                params![path.to_string_lossy()],
            )
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// Stops sharing a folder or file, and forgets its files; true if it was shared.
    pub fn remove_share(&self, path: &Path) -> Result<bool, StoreError> {
        let path = path.to_string_lossy();
        let removed = self
            .conn
            .execute("DELETE FROM shares WHERE path = ?1", params![path])
            .map_err(|e| self.fail(e))?;
        self.conn
            .execute("DELETE FROM files WHERE root = ?1", params![path])
            .map_err(|e| self.fail(e))?;
        Ok(removed > 0)
    }

    /// The indexed file at `path`, if its size and mtime are still these.
    pub fn cached(&self, path: &Path, size: u64, mtime: i64) -> Result<bool, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT 1 FROM files WHERE path = ?1 AND size = ?2 AND mtime = ?3")
            .map_err(|e| self.fail(e))?;
        statement
            .exists(params![path.to_string_lossy(), size as i64, mtime])
            .map_err(|e| self.fail(e))
    }

    /// Records a file's hash and outboard.
    pub fn put_file(&self, file: &SharedFile, outboard: &Outboard) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO files (path, root, name, size, mtime, hash, outboard)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    file.path.to_string_lossy(),
                    file.root.to_string_lossy(),
                    file.name,
                    file.size as i64,
                    file.mtime,
                    file.hash.0.as_slice(),
                    outboard.to_bytes()
                ])
            })
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// Forgets the files of `root` not in `keep`.
    pub fn prune(&self, root: &Path, keep: &[PathBuf]) -> Result<(), StoreError> {
        let present: std::collections::HashSet<String> = keep
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let indexed: Vec<String> = {
            let mut statement = self
                .conn
                .prepare_cached("SELECT path FROM files WHERE root = ?1")
                .map_err(|e| self.fail(e))?;
            let rows = statement
                .query_map(params![root.to_string_lossy()], |row| row.get(0))
                .map_err(|e| self.fail(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))?
        };
        for path in indexed.into_iter().filter(|p| !present.contains(p)) {
            self.conn
                .execute("DELETE FROM files WHERE path = ?1", params![path])
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn read_file(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<SharedFile>> {
        let path: String = row.get(0)?;
        let root: String = row.get(1)?;
        Ok(hash_of(row.get(5)?).map(|hash| SharedFile {
            path: PathBuf::from(path),
            root: PathBuf::from(root),
            name: row.get(2).unwrap_or_default(),
            size: row.get::<_, i64>(3).unwrap_or(0).max(0) as u64,
            mtime: row.get(4).unwrap_or(0),
            hash,
        }))
    }

    /// Every shared file.
    pub fn files(&self) -> Result<Vec<SharedFile>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT path, root, name, size, mtime, hash FROM files ORDER BY name")
            .map_err(|e| self.fail(e))?;
        let rows = statement
            .query_map([], Self::read_file)
            .map_err(|e| self.fail(e))?;
        let mut files = Vec::new();
        for row in rows {
            if let Some(file) = row.map_err(|e| self.fail(e))? {
                files.push(file);
            }
        }
        Ok(files)
    }

    /// A shared file with this content, and its outboard.
    pub fn by_hash(&self, hash: &Hash) -> Result<Option<(SharedFile, Vec<u8>)>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT path, root, name, size, mtime, hash, outboard FROM files
                 WHERE hash = ?1 LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![hash.0.as_slice()], |row| {
                    Ok(Self::read_file(row)?.map(|f| (f, row.get(6).unwrap_or_default())))
                })
                .optional()
            })
            .map(Option::flatten)
            .map_err(|e| self.fail(e))
    }

    /// Records a download (its outboard once known).
    pub fn put_download(&self, download: &PendingDownload) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO downloads (hash, dir, name, size, outboard)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    download.hash.0.as_slice(),
                    download.dir.to_string_lossy(),
                    download.name,
                    download.size as i64,
                    download.outboard
                ],
            )
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// Forgets a finished (or abandoned) download.
    pub fn remove_download(&self, hash: &Hash) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM downloads WHERE hash = ?1",
                params![hash.0.as_slice()],
            )
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// Downloads not yet finished.
    pub fn downloads(&self) -> Result<Vec<PendingDownload>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT hash, dir, name, size, outboard FROM downloads")
            .map_err(|e| self.fail(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok(hash_of(row.get(0)?).map(|hash| PendingDownload {
                    hash,
                    dir: PathBuf::from(row.get::<_, String>(1).unwrap_or_default()),
                    name: row.get(2).unwrap_or_default(),
                    size: row.get::<_, i64>(3).unwrap_or(0).max(0) as u64,
                    outboard: row.get(4).unwrap_or(None),
                }))
            })
            .map_err(|e| self.fail(e))?;
        let mut downloads = Vec::new();
        for row in rows {
            if let Some(download) = row.map_err(|e| self.fail(e))? {
                downloads.push(download);
            }
        }
        Ok(downloads)
    }
}
