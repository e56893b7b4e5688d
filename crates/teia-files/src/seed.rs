//! Seed 004's peer-to-peer download, both ways: answering a course peer's
//! `DOWNLOAD_REQUEST` on the node's listen port, and downloading from a course peer.
//!
//! The seed's format: the request `{"method": "DOWNLOAD_REQUEST", "data": {"filename": N,
//! "port": P}}`; the answers `{"status": "OK", "fileSize": S}` (or `fileNotFound`), then
//! `{"status": "downloadAccepted"}` (or `downloadRejected`), then the file's raw bytes and the
//! end of the connection. Its client reads each answer with one `recv`, so each is written
//! alone, [`ANSWER_GAP`] apart. Course peers have no keys and no hashes: what comes from them
//! is checked for its size, and its BLAKE3 hash is computed on the way to disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::download::PARTIAL_SUFFIX;
use crate::findings::SeedHolding;
use crate::proto::napster::{ObjectError, ObjectReader, Request, RequestError, MAX_MESSAGE};
use crate::proto::tree::OutboardBuilder;
use crate::share;
use crate::state::{FilesEvent, Inner};
use crate::store::SharedFile;
use teia_node::sync::lock;

/// Pause between two answers, so a client reading each with one `recv` gets them apart.
pub const ANSWER_GAP: Duration = Duration::from_millis(100);
/// Time a course peer has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a course peer may send nothing during a download from it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read or written at once.
const PIECE: usize = 1024 * 1024;
/// Shortest time between two log lines about requests for files not shared: the first is
/// logged at once, the next ones counted and summarised in one line per this period.
pub const NOT_FOUND_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a seed 004 exchange with a course peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeedError {
    /// The bytes are not a message.
    #[error(transparent)]
    Read(#[from] ObjectError),
    /// The message is not a request.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The connection closed before a whole message.
    #[error("the connection closed")]
    Closed,
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No message within the time allowed.
    #[error("timed out")]
    TimedOut,
    /// The requested name has no file name in it.
    #[error("the file name has no final part")]
    NoFileName,
    /// The course peer did not accept the connection in time.
    #[error("connect timed out")]
    ConnectTimedOut,
    /// The course peer refused (or answered something else).
    #[error("the peer answered {0}")]
    Refused(serde_json::Value),
    /// The course peer's OK has no size.
    #[error("the peer's answer has no fileSize")]
    NoSize,
    /// Its copy is shorter than another holder's.
    #[error("its copy has {size} bytes, another holder's {least}")]
    Short {
        /// Its size.
        size: u64,
        /// The largest listed.
        least: u64,
    },
    /// The partial file could not be written.
    #[error("{path}: {source}", path = .path.display())]
    File {
        /// The partial file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The course peer closed before the whole file.
    #[error("the peer closed after {received} of {size} bytes")]
    Cut {
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        size: u64,
    },
    /// The course peer sent nothing for [`STALL_TIMEOUT`].
    #[error("the peer stalled")]
    Stalled,
    /// The bytes hashed are not the size announced.
    #[error("size mismatch while hashing")]
    SizeMismatch,
}

async fn read_object(
    stream: &mut TcpStream,
    reader: &mut ObjectReader,
    timeout: Duration,
) -> Result<serde_json::Value, SeedError> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.next_object() {
            Some(Ok(value)) => return Ok(value),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        let n = match tokio::time::timeout(timeout, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => n,
            Ok(Ok(_)) => return Err(SeedError::Closed),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(SeedError::TimedOut),
        };
        reader.push(buffer.get(..n).unwrap_or_default());
    }
}

/// The shared file a course peer names: a path inside a shared folder, or the indexed name
/// or base name of a shared file.
fn find(inner: &Inner, filename: &str) -> Option<SharedFile> {
    let store = lock(&inner.store);
    let files = store.files().ok()?;
    if let Some(file) = files
        .iter()
        .find(|f| f.name == filename || f.path.file_name().is_some_and(|n| n == filename))
    {
        return Some(file.clone());
    }
    for root in store.shares().ok()? {
        if let Some(path) = share::resolve(&root, filename) {
            if let Some(file) = files.iter().find(|f| f.path == path) {
                return Some(file.clone());
            }
        }
    }
    None
}

/// Answers one course peer's DOWNLOAD_REQUEST.
pub(crate) async fn serve(inner: Arc<Inner>, mut stream: TcpStream, peer: SocketAddr) {
    let mut reader = ObjectReader::new(MAX_MESSAGE);
    let request = read_object(&mut stream, &mut reader, REQUEST_TIMEOUT)
        .await
        .and_then(|value| Request::from_value(&value).map_err(SeedError::from));
    let filename = match request {
        Ok(Request::DownloadRequest { filename }) => filename,
        Ok(_) => {
            let answer = json!({"status": "ERROR", "error": "bad_request",
                                "detail": "a peer answers DOWNLOAD_REQUEST only"});
            let _ = stream.write_all(answer.to_string().as_bytes()).await;
            return;
        }
        Err(e) => {
            let detail = e.to_string();
            let answer = json!({"status": "ERROR", "error": "bad_format", "detail": detail});
            let _ = stream.write_all(answer.to_string().as_bytes()).await;
            return;
        }
    };
    let Some(file) = find(&inner, &filename) else {
        let due = lock(&inner.not_found_log).occurred(Instant::now());
        match due {
            Some(1) => tracing::info!(%peer, %filename, "course peer asked for a file not shared"),
            Some(count) => tracing::info!(
                count, %peer, %filename,
                "course peers asked for files not shared (summarised; the last named)"
            ),
            None => {}
        }
        let _ = stream.write_all(br#"{"status": "fileNotFound"}"#).await;
        return;
    };
    let opened = match share::open_served(&file) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "not served");
            let _ = stream.write_all(br#"{"status": "fileNotFound"}"#).await;
            return;
        }
    };
    let ok = format!(r#"{{"status": "OK", "fileSize": {}}}"#, file.size);
    if stream.write_all(ok.as_bytes()).await.is_err() {
        return;
    }
    let who = format!("course peer {peer}");
    let approved = inner.approve(&who, None, &file, None).await;
    tokio::time::sleep(ANSWER_GAP).await;
    if !approved {
        let _ = stream.write_all(br#"{"status": "downloadRejected"}"#).await;
        return;
    }
    if stream
        .write_all(br#"{"status": "downloadAccepted"}"#)
        .await
        .is_err()
    {
        return;
    }
    tokio::time::sleep(ANSWER_GAP).await;
    tracing::info!(%peer, file = %file.name, "serving a course peer");
    let mut buffer = vec![0u8; PIECE];
    let mut sent = 0u64;
    while sent < file.size {
        let want = ((file.size - sent) as usize).min(PIECE);
        let Some(piece) = buffer.get_mut(..want) else {
            return;
        };
        if std::os::unix::fs::FileExt::read_exact_at(&opened, piece, sent).is_err() {
            return;
        }
        if let Some(throttle) = &inner.throttle {
            throttle.take(want).await;
        }
        if stream.write_all(piece).await.is_err() {
            return;
        }
        sent += want as u64;
    }
    let _ = stream.shutdown().await;
}

/// Downloads `filename` into `dir` from the first of the course peers `holders` (the best
/// first, [`crate::findings::Findings::seed_holders`]) that serves it: one whose copy is
/// shorter than the largest size listed is passed over while others remain, and the
/// last resort's short copy is reported as such.
pub(crate) async fn fetch(
    inner: Arc<Inner>,
    holders: Vec<SeedHolding>,
    filename: String,
    dir: PathBuf,
) {
    let started = Instant::now();
    let expected = holders.iter().filter_map(|h| h.size).max();
    let mut last = None;
    for (n, holder) in holders.iter().enumerate() {
        let last_resort = n + 1 == holders.len();
        let least = if last_resort { None } else { expected };
        match fetch_inner(&holder.addr, &filename, &dir, least).await {
            Ok((path, size, hash)) => {
                let event = FilesEvent::SeedDone {
                    name: filename,
                    path,
                    bytes: size,
                    hash,
                    seconds: started.elapsed().as_secs_f64(),
                    holder: holder.addr.to_string(),
                    expected: expected.filter(|e| *e != size),
                };
                inner.emit(event).await;
                return;
            }
            Err(reason) => {
                tracing::info!(holder = %holder.addr, %reason, "course peer passed over");
                last = Some((holder.addr, reason));
            }
        }
    }
    if let Some((addr, reason)) = last {
        inner
            .emit(FilesEvent::SeedFailed {
                name: filename,
                holder: addr.to_string(),
                reason: reason.to_string(),
            })
            .await;
    }
}

/// Downloads `filename` from the course peer at `addr` into `dir`; refuses a copy shorter
/// than `least` bytes.
async fn fetch_inner(
    addr: &SocketAddr,
    filename: &str,
    dir: &Path,
    least: Option<u64>,
) -> Result<(PathBuf, u64, crate::proto::tree::Hash), SeedError> {
    let name = Path::new(filename)
        .file_name()
        .ok_or(SeedError::NoFileName)?
        .to_owned();
    let target = dir.join(&name);
    let mut stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| SeedError::ConnectTimedOut)??;
    let request = json!({"method": "DOWNLOAD_REQUEST",
                         "data": {"filename": filename, "port": addr.port()}});
    stream.write_all(request.to_string().as_bytes()).await?;
    let mut reader = ObjectReader::new(MAX_MESSAGE);
    let first = read_object(&mut stream, &mut reader, REQUEST_TIMEOUT).await?;
    if first.get("status").and_then(|s| s.as_str()) != Some("OK") {
        return Err(SeedError::Refused(first));
    }
    let size = first
        .get("fileSize")
        .and_then(serde_json::Value::as_u64)
        .ok_or(SeedError::NoSize)?;
    if let Some(least) = least.filter(|least| size < *least) {
        return Err(SeedError::Short { size, least });
    }
    let decision = read_object(&mut stream, &mut reader, crate::state::APPROVAL_TIMEOUT).await?;
    if decision.get("status").and_then(|s| s.as_str()) != Some("downloadAccepted") {
        return Err(SeedError::Refused(decision));
    }
    let mut partial = target.as_os_str().to_owned();
    partial.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial).map_err(|source| SeedError::File {
        path: partial.clone(),
        source,
    })?;
    let mut hasher = OutboardBuilder::new(size);
    let mut received = 0u64;
    let rest = reader.take_rest();
    let mut buffer = vec![0u8; PIECE];
    let mut pending = rest;
    loop {
        let take = (pending.len() as u64).min(size - received) as usize;
        let piece = pending.get(..take).unwrap_or_default();
        hasher.update(piece);
        std::os::unix::fs::FileExt::write_all_at(&file, piece, received).map_err(|source| {
            SeedError::File {
                path: partial.clone(),
                source,
            }
        })?;
        received += take as u64;
        if received >= size {
            break;
        }
        let n = match tokio::time::timeout(STALL_TIMEOUT, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => n,
            Ok(Ok(_)) => return Err(SeedError::Cut { received, size }),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(SeedError::Stalled),
        };
        pending = buffer.get(..n).unwrap_or_default().to_vec();
    }
    file.sync_all()?;
    let hash = hasher
        .finish()
        .map(|o| o.hash())
        .ok_or(SeedError::SizeMismatch)?;
    std::fs::rename(&partial, &target)?;
    Ok((target, size, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LogSummary;

    #[test]
    fn a_flood_of_requests_makes_one_line_per_period_with_its_count() {
        let start = Instant::now();
        let mut summary = LogSummary::new(NOT_FOUND_LOG_EVERY);
        assert_eq!(summary.occurred(start), Some(1), "the first at once");
        let mut lines = Vec::new();
        // 3,000 requests in 0.8 s, then one more 10 s later.
        for i in 1..3_000u64 {
            let now = start + Duration::from_micros(i * 266);
            lines.extend(summary.occurred(now));
        }
        assert!(lines.is_empty(), "counted, not logged: {lines:?}");
        let later = start + NOT_FOUND_LOG_EVERY;
        assert_eq!(
            summary.occurred(later),
            Some(3_000),
            "one line with the count"
        );
        assert_eq!(summary.occurred(later), None);
    }
}
