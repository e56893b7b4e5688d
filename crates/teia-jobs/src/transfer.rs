//! Bytes over a `jobs` data stream: the JSON head lines, the `{"size":N}` answers and the N
//! bytes after them (a project's packed bytes, a ledger, a script task or its result),
//! read and written a piece at a time.
//!
//! **Bounds**: a head line is at most [`MAX_HEAD`] bytes; a sized answer at most
//! [`MAX_BLOB`] bytes (a larger one is refused with [`TransferError::TooLarge`]); a peer
//! that sends nothing for [`STALL_TIME`] in the middle of an answer, or no size line within
//! it, is given up ([`TransferError::Stalled`], [`TransferError::NoAnswer`]); files are
//! sent [`SERVE_PIECE`] bytes at a time.

use std::path::Path;
use std::time::Duration;

use teia_node::stream::{DataStream, StreamError};

/// Bytes of a project's packed bytes, or of any sized answer, at most.
pub const MAX_BLOB: u64 = 1024 * 1024 * 1024;

/// Bytes of a head line (a JSON request or answer) read at most.
pub const MAX_HEAD: usize = 4096;

/// Time a peer may stay silent while it sends an answer (or before its size line).
pub const STALL_TIME: Duration = Duration::from_secs(30);

/// Bytes of a file read and written at once.
pub const SERVE_PIECE: usize = 1024 * 1024;

/// Why bytes could not be exchanged on a `jobs` stream.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer did not answer in time.
    #[error("{peer} did not answer")]
    NoAnswer {
        /// The peer.
        peer: String,
    },
    /// The peer closed the stream before its answer.
    #[error("{peer} closed the stream")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// The peer closed the stream in the middle of its answer.
    #[error("{peer} closed the stream early")]
    ClosedEarly {
        /// The peer.
        peer: String,
    },
    /// The peer sent nothing for [`STALL_TIME`] in the middle of its answer.
    #[error("{peer} stalled")]
    Stalled {
        /// The peer.
        peer: String,
    },
    /// The peer did not read what was sent in time.
    #[error("{peer} did not read {size} bytes in {time:?}")]
    NotRead {
        /// The peer.
        peer: String,
        /// The bytes sent.
        size: u64,
        /// The time it had.
        time: Duration,
    },
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A file on this node could not be read or written.
    #[error("{0}")]
    Disk(#[from] std::io::Error),
    /// A head line is not JSON.
    #[error("{0}")]
    NotJson(#[from] serde_json::Error),
    /// The answer is not `{"size":N}`.
    #[error("the owner answered {0}")]
    NoSize(serde_json::Value),
    /// The answer is over [`MAX_BLOB`] bytes.
    #[error("answer too large")]
    TooLarge,
    /// The bytes received do not have the hash asked for.
    #[error("the project's bytes do not match their hash")]
    HashMismatch,
}

/// Writes the first `size` bytes of `file` on `stream`, a piece at a time.
pub(crate) async fn send_file(
    stream: &mut DataStream,
    file: &mut std::fs::File,
    size: u64,
) -> Result<(), StreamError> {
    use std::io::Read;
    let mut piece = vec![0u8; SERVE_PIECE];
    let mut left = size;
    while left > 0 {
        let want = piece.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let buffer = piece.get_mut(..want).unwrap_or_default();
        file.read_exact(buffer)?;
        stream.write_all(buffer).await?;
        left -= want as u64;
    }
    Ok(())
}

/// Reads one JSON line of at most [`MAX_HEAD`] bytes, waiting up to `wait`.
pub(crate) async fn read_head(
    stream: &mut DataStream,
    wait: Duration,
) -> Result<serde_json::Value, TransferError> {
    let line = tokio::time::timeout(wait, stream.read_line(MAX_HEAD))
        .await
        .map_err(|_| TransferError::NoAnswer {
            peer: stream.peer_id().to_owned(),
        })??
        .ok_or_else(|| TransferError::Closed {
            peer: stream.peer_id().to_owned(),
        })?;
    Ok(serde_json::from_slice(&line)?)
}

/// Reads a `{"size":N}` line.
pub(crate) async fn read_size(stream: &mut DataStream) -> Result<u64, TransferError> {
    let head = read_head(stream, STALL_TIME).await?;
    let size = head
        .get("size")
        .and_then(serde_json::Value::as_u64)
        .ok_or(TransferError::NoSize(head))?;
    if size > MAX_BLOB {
        return Err(TransferError::TooLarge);
    }
    Ok(size)
}

/// Reads more of the peer's bytes: an error if it stalls for [`STALL_TIME`] or closes.
async fn fill(stream: &mut DataStream) -> Result<(), TransferError> {
    let more = tokio::time::timeout(STALL_TIME, stream.fill())
        .await
        .map_err(|_| TransferError::Stalled {
            peer: stream.peer_id().to_owned(),
        })??;
    if more {
        Ok(())
    } else {
        Err(TransferError::ClosedEarly {
            peer: stream.peer_id().to_owned(),
        })
    }
}

/// Reads a `{"size":N}` line and N bytes.
pub(crate) async fn read_sized(stream: &mut DataStream) -> Result<Vec<u8>, TransferError> {
    let size = read_size(stream).await?;
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < size {
        if stream.buffered().is_empty() {
            fill(stream).await?;
        }
        let take = (stream.buffered().len() as u64).min(size - bytes.len() as u64) as usize;
        bytes.extend_from_slice(stream.buffered().get(..take).unwrap_or_default());
        stream.consume(take);
    }
    Ok(bytes)
}

/// Fetches `blob` on `stream` into `to`, checking its BLAKE3 hash; returns its size.
pub(crate) async fn fetch_blob(
    stream: &mut DataStream,
    blob: &str,
    to: &Path,
    proof: Option<String>,
) -> Result<u64, TransferError> {
    let request = serde_json::json!({"blob": blob, "proof": proof});
    stream.write_all(format!("{request}\n").as_bytes()).await?;
    let size = read_size(stream).await?;
    let hash = receive_file(stream, size, to, true).await?;
    if hash.to_hex().as_str() != blob {
        let _ = std::fs::remove_file(to);
        return Err(TransferError::HashMismatch);
    }
    Ok(size)
}

/// Reads `size` bytes from `stream` into a new file at `to` (flushed to disk when
/// `durable`); their BLAKE3 hash.
pub(crate) async fn receive_file(
    stream: &mut DataStream,
    size: u64,
    to: &Path,
    durable: bool,
) -> Result<blake3::Hash, TransferError> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::create(to)?;
    let mut received = 0u64;
    while received < size {
        if stream.buffered().is_empty() {
            fill(stream).await?;
        }
        let take = (stream.buffered().len() as u64).min(size - received) as usize;
        let piece = stream.buffered().get(..take).unwrap_or_default();
        hasher.update(piece);
        std::io::Write::write_all(&mut file, piece)?;
        stream.consume(take);
        received += take as u64;
    }
    if durable {
        file.sync_all()?;
    }
    Ok(hasher.finalize())
}
