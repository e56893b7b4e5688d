//! Reading what a task left in its folder, as hostile input. A task controls its folder:
//! it can replace `stdout.txt` by a link to `/proc/self/cmdline` (the node's secret), a
//! FIFO (a read that never returns) or `/dev/zero` (a read that never ends). So every file
//! the node reads from a task's folder is opened component by component from the folder
//! with no link followed, non-blocking, and only if it is a regular file; it is read up to
//! a cap; and the callers read on a blocking thread, never on the async runtime's.
//!
//! **Bounds**: a read returns at most the `cap` the caller gives; a path of more than
//! [`MAX_DEPTH`] components is refused.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path};

use rustix::fs::{FileType, Mode, OFlags};

/// Folders deep a path inside a task's folder may be at most.
pub const MAX_DEPTH: usize = 32;

/// Why a task's file is not read.
#[derive(Debug, thiserror::Error)]
pub enum TaskFileError {
    /// The path leaves the folder (`..`, absolute) or is too deep.
    #[error("{0} is not a plain path inside the task's folder")]
    OutsideFolder(String),
    /// A link, a FIFO, a device or a socket: not read.
    #[error("{0} is not a regular file")]
    NotRegular(String),
    /// It could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path, inside the folder.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Opens `relative` inside `folder`: every component without following a link, the file
/// non-blocking and only if it is a regular file.
pub fn open(folder: &Path, relative: &Path) -> Result<File, TaskFileError> {
    let shown = || relative.display().to_string();
    let io_error = |source: io::Error| TaskFileError::Io {
        path: shown(),
        source,
    };
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            _ => return Err(TaskFileError::OutsideFolder(shown())),
        }
    }
    let Some((file_name, folders)) = names.split_last() else {
        return Err(TaskFileError::OutsideFolder(shown()));
    };
    if folders.len() > MAX_DEPTH {
        return Err(TaskFileError::OutsideFolder(shown()));
    }
    let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir =
        rustix::fs::open(folder, directory, Mode::empty()).map_err(|e| io_error(e.into()))?;
    for name in folders {
        dir = rustix::fs::openat(&dir, *name, directory, Mode::empty())
            .map_err(|e| io_error(e.into()))?;
    }
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::openat(&dir, *file_name, flags, Mode::empty()) {
        Ok(fd) => fd,
        // A link's last component: O_NOFOLLOW refuses it with ELOOP.
        Err(rustix::io::Errno::LOOP) => return Err(TaskFileError::NotRegular(shown())),
        Err(e) => return Err(io_error(e.into())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(e.into()))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(TaskFileError::NotRegular(shown()));
    }
    Ok(File::from(fd))
}

/// The first `cap` bytes of `relative` inside `folder`, opened as [`open`] does.
pub fn read_capped(folder: &Path, relative: &Path, cap: u64) -> Result<Vec<u8>, TaskFileError> {
    let file = open(folder, relative)?;
    let mut bytes = Vec::new();
    file.take(cap)
        .read_to_end(&mut bytes)
        .map_err(|source| TaskFileError::Io {
            path: relative.display().to_string(),
            source,
        })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Links (to a file outside, to `/dev/zero`, to a folder outside), a FIFO and `..`
    /// are refused at once; a regular file, also in a subfolder, is read up to the cap.
    #[test]
    fn only_regular_files_inside_the_folder_are_read_and_never_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("task");
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        std::fs::write(dir.path().join("secret"), "the node's").unwrap();
        std::fs::write(folder.join("stdout.txt"), "0123456789").unwrap();
        std::fs::write(folder.join("sub").join("out.txt"), "deep").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), folder.join("link.txt")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", folder.join("zero.txt")).unwrap();
        std::os::unix::fs::symlink(dir.path(), folder.join("up")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            folder.join("fifo.txt"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(
            read_capped(&folder, Path::new("stdout.txt"), 4).unwrap(),
            b"0123"
        );
        assert_eq!(
            read_capped(&folder, Path::new("sub/out.txt"), 64).unwrap(),
            b"deep"
        );
        for refused in ["link.txt", "zero.txt", "fifo.txt"] {
            assert!(
                matches!(
                    read_capped(&folder, Path::new(refused), 64),
                    Err(TaskFileError::NotRegular(_))
                ),
                "{refused}"
            );
        }
        assert!(read_capped(&folder, Path::new("up/secret"), 64).is_err());
        assert!(matches!(
            read_capped(&folder, Path::new("../secret"), 64),
            Err(TaskFileError::OutsideFolder(_))
        ));
        assert!(matches!(
            read_capped(&folder, Path::new("/etc/passwd"), 64),
            Err(TaskFileError::OutsideFolder(_))
        ));
    }
}
