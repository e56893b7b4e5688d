//! What is shared, on disk: walking shared folders (symbolic links are not followed),
//! hashing files, and opening a file to serve only when it is still inside what was shared
//! and unchanged since it was hashed.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::proto::tree::{Outboard, OutboardBuilder};
use crate::store::SharedFile;

/// Files indexed per shared folder at most; beyond, the rest are skipped (and said so).
pub const MAX_FILES_PER_SHARE: usize = 100_000;
/// Folder depth walked at most.
pub const MAX_DEPTH: usize = 32;
/// Bytes read at a time when hashing.
const HASH_BUFFER: usize = 1024 * 1024;

/// Why a file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// It is no longer inside what was shared (moved, or replaced by a link).
    #[error("{0} is not inside what was shared")]
    Outside(PathBuf),
    /// Its size or modification time changed since it was hashed.
    #[error("{0} changed since it was hashed")]
    Changed(PathBuf),
    /// It cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Modification time in nanoseconds since the epoch (0 when unknown).
pub fn mtime(meta: &Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A file found under a shared root.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its path.
    pub path: PathBuf,
    /// Its name relative to the root's parent.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its modification time.
    pub mtime: i64,
}

/// The regular files under `root` (or `root` itself when it is a file), symbolic links
/// skipped, at most [`MAX_FILES_PER_SHARE`]; the second value says whether some were left
/// out.
pub fn walk(root: &Path) -> std::io::Result<(Vec<Found>, bool)> {
    let base = root.parent().unwrap_or(root).to_owned();
    let mut found = Vec::new();
    let mut truncated = false;
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((path, depth)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_file() {
            if found.len() >= MAX_FILES_PER_SHARE {
                truncated = true;
                break;
            }
            let name = path
                .strip_prefix(&base)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            found.push(Found {
                path,
                name,
                size: meta.len(),
                mtime: mtime(&meta),
            });
        } else if meta.is_dir() && depth < MAX_DEPTH {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            stack.extend(entries.into_iter().rev().map(|p| (p, depth + 1)));
        }
    }
    Ok((found, truncated))
}

/// Hashes a file: its BLAKE3 hash and outboard; `None` if it changed size while read.
pub fn hash_file(path: &Path) -> std::io::Result<Option<Outboard>> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut builder = OutboardBuilder::new(size);
    let mut buffer = vec![0u8; HASH_BUFFER];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        builder.update(buffer.get(..n).unwrap_or_default());
    }
    Ok(builder.finish())
}

/// Opens a shared file to serve it: it must still be a regular file (not a link) inside its
/// shared root, with the size and modification time it was hashed with.
pub fn open_served(file: &SharedFile) -> Result<File, ServeError> {
    let io = |source| ServeError::Io {
        path: file.path.clone(),
        source,
    };
    let meta = std::fs::symlink_metadata(&file.path).map_err(io)?;
    if meta.file_type().is_symlink() || !meta.is_file() {
        return Err(ServeError::Outside(file.path.clone()));
    }
    let real = file.path.canonicalize().map_err(io)?;
    let root = file.root.canonicalize().map_err(io)?;
    if !real.starts_with(&root) {
        return Err(ServeError::Outside(file.path.clone()));
    }
    let opened = File::open(&real).map_err(io)?;
    let meta = opened.metadata().map_err(io)?;
    if meta.len() != file.size || mtime(&meta) != file.mtime {
        return Err(ServeError::Changed(file.path.clone()));
    }
    Ok(opened)
}

/// Resolves a name asked by a peer (seed 004's `filename`) inside a shared root: only plain
/// relative components (no `..`, no absolute path, no prefix), and the result, links
/// resolved, must stay inside the root and be a regular file.
pub fn resolve(root: &Path, name: &str) -> Option<PathBuf> {
    let relative = Path::new(name);
    if name.is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    let root = root.canonicalize().ok()?;
    let base = if root.is_dir() {
        root.clone()
    } else {
        root.parent()?.to_owned()
    };
    let real = base.join(relative).canonicalize().ok()?;
    (real.starts_with(&root) && real.is_file()).then_some(real)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_keep_the_folder_and_links_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("videos");
        std::fs::create_dir_all(share.join("week1")).unwrap();
        std::fs::write(share.join("week1/intro.mp4"), b"abc").unwrap();
        std::fs::write(share.join("notes.txt"), b"n").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), share.join("link")).unwrap();
        let (found, truncated) = walk(&share).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["videos/notes.txt", "videos/week1/intro.mp4"]);
        assert!(!truncated);
    }

    #[test]
    fn escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("ok.txt"), b"ok").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), share.join("link")).unwrap();
        assert!(resolve(&share, "ok.txt").is_some());
        for bad in [
            "../secret",
            "/etc/passwd",
            "link",
            "",
            "sub/../../secret",
            ".",
        ] {
            assert_eq!(resolve(&share, bad), None, "{bad}");
        }
    }

    #[test]
    fn a_changed_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let outboard = hash_file(&path).unwrap().unwrap();
        let shared = SharedFile {
            path: path.clone(),
            root: dir.path().to_owned(),
            name: "f".into(),
            size: meta.len(),
            mtime: mtime(&meta),
            hash: outboard.hash(),
        };
        assert!(open_served(&shared).is_ok());
        std::fs::write(&path, b"hello world").unwrap();
        assert!(matches!(open_served(&shared), Err(ServeError::Changed(_))));
    }
}
