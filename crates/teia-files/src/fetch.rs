//! Downloading one file from every holder at once, the runtime of the
//! [`crate::proto::swarm::Swarm`] policy: a stream per holder pulls the chunks the swarm
//! hands out, each chunk is hashed as it lands in the partial file and checked against the
//! outboard (so a bad byte costs one chunk and the holder that sent it), and the partial
//! file is renamed once every chunk is verified. This file does the I/O and keeps the
//! timers; the swarm decides.
//!
//! Bounds: those of [`crate::download`]; a holder silent for
//! [`crate::download::STALL_TIMEOUT`] is dropped.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use teia_node::stream::DataStream;
use tokio::task::JoinSet;

use crate::download::{
    partial_path, Download, DownloadError, HolderEnd, HolderError, Source, Staging, PROGRESS_EVERY,
    STALL_TIMEOUT,
};
use crate::proto::exchange::{AwaitingHead, Head, Incoming, ReplyFault};
use crate::proto::msg::{self, Reply, MAX_STREAM_LINE};
use crate::proto::plan::HolderId;
use crate::proto::swarm::Step;
use crate::proto::tree::Hash;
use crate::state::{FilesEvent, Inner};
use crate::store::PendingDownload;
use teia_node::sync::lock;

/// Runs a download to its end: done (renamed, verified) or failed (partial kept).
pub(crate) async fn run(inner: Arc<Inner>, download: Arc<Download>) {
    let hash = download.hash();
    let outcome = drive(&inner, &download).await;
    if matches!(outcome, Err(DownloadError::Cancelled)) {
        if let Err(e) = lock(&inner.store).remove_download(&hash) {
            tracing::warn!(error = %e, "cancelled download not dropped from the database");
        }
        let partial = crate::download::partial_path(&download.path());
        if let Err(e) = std::fs::remove_file(&partial) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, path = %partial.display(), "partial file not removed");
            }
        }
    }
    // Only now may the same content be asked for again (its cleanup is over).
    lock(&inner.downloads).remove(&hash);
    match outcome {
        Ok((path, already_here)) => {
            if let Err(e) = lock(&inner.store).remove_download(&hash) {
                tracing::warn!(error = %e, "finished download not dropped from the database");
            }
            let sources = lock(&download.swarm).sources();
            inner
                .emit(FilesEvent::Done {
                    info: download.info(),
                    path,
                    sources,
                    already_here,
                })
                .await;
        }
        Err(reason) => {
            inner
                .emit(FilesEvent::Failed {
                    hash,
                    name: download.spec.name.clone(),
                    reason: reason.to_string(),
                })
                .await;
        }
    }
}

/// Whether `path` already holds the content `hash` (of `size`, when known): a regular file
/// (not followed through a link), hashed off the async threads.
async fn already_here(path: &std::path::Path, hash: Hash, size: Option<u64>) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || size.is_some_and(|size| size != meta.len()) {
        return false;
    }
    let path = path.to_owned();
    let hashed = tokio::task::spawn_blocking(move || crate::share::hash_file(&path)).await;
    matches!(hashed, Ok(Ok(Some(outboard))) if outboard.hash() == hash)
}

/// Fetches a download to its target; where it is, and whether it was already there (a
/// complete, verified file is not fetched again).
async fn drive(
    inner: &Arc<Inner>,
    download: &Arc<Download>,
) -> Result<(PathBuf, bool), DownloadError> {
    let hash = download.hash();
    let target = download.path();
    if download.spec.size == Some(0) || hash == Hash::of(b"") {
        if hash != Hash::of(b"") {
            return Err(DownloadError::NotEmpty);
        }
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(DownloadError::Create)?;
        }
        File::create(&target).map_err(DownloadError::Create)?;
        return Ok((target, false));
    }
    if already_here(&target, hash, download.spec.size).await {
        return Ok((target, true));
    }
    lock(&inner.store).put_download(&PendingDownload {
        hash,
        dir: download.spec.dir.clone(),
        name: download.spec.name.clone(),
        size: download.spec.size.unwrap_or(0),
        outboard: None,
    })?;
    let (Some(mut sources), Some(mut seconds)) = (
        lock(&download.queued).take(),
        lock(&download.seconds_queued).take(),
    ) else {
        return Err(DownloadError::AlreadyRunning);
    };
    let mut holders: HolderTasks = JoinSet::new();
    let mut last_reason = String::from("no holder answered");
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    loop {
        if download.complete() {
            break;
        }
        let step = lock(&download.swarm).poll(Instant::now());
        match step {
            Step::Wait => {}
            Step::AskHolders => inner.ask_holders(hash).await,
            Step::GiveUp => return Err(DownloadError::NoHolder { last: last_reason }),
        }
        tokio::select! {
            source = sources.recv() => {
                let Some(source) = source else { continue };
                let admitted = lock(&download.swarm).offer(&source.peer_id, source.key);
                if let Some(id) = admitted {
                    spawn_holder(inner, download, &mut holders, id, source, true);
                }
            }
            Some(source) = seconds.recv() => {
                let admitted = lock(&download.swarm).offer_second(&source.peer_id, source.key);
                if let Some(id) = admitted {
                    spawn_holder(inner, download, &mut holders, id, source, false);
                }
            }
            Some(joined) = holders.join_next() => {
                let Ok((peer, end)) = joined else { continue };
                match end {
                    HolderEnd::Finished => {}
                    HolderEnd::Dropped(reason) => {
                        tracing::info!(%peer, %reason, "holder dropped");
                        last_reason = format!("{peer}: {reason}");
                        let unreachable = matches!(reason, HolderError::Unreachable { .. });
                        let reason = reason.to_string();
                        inner
                            .emit(FilesEvent::HolderDropped { hash, holder: peer, reason, unreachable })
                            .await;
                    }
                    HolderEnd::Fatal(reason) => {
                        holders.abort_all();
                        return Err(reason);
                    }
                }
            }
            _ = ticker.tick() => {
                download.update_rate();
                if download.ready.get().is_some() {
                    inner.emit_progress(FilesEvent::Progress(download.info()));
                }
            }
            () = download.cancel.cancelled() => {
                // Every holder's task ends before the caller deletes what they wrote.
                holders.shutdown().await;
                return Err(DownloadError::Cancelled);
            }
        }
    }
    holders.abort_all();
    download.update_rate();
    let ready = download.ready.get().ok_or(DownloadError::NoData)?;
    ready.file.sync_all().map_err(DownloadError::Flush)?;
    let partial = partial_path(&target);
    std::fs::rename(&partial, &target).map_err(|source| DownloadError::Rename {
        path: partial,
        source,
    })?;
    Ok((target, false))
}

type HolderTasks = JoinSet<(String, HolderEnd)>;

/// Starts fetching from `source` as holder `id`; a `first` stream may ask for a second.
fn spawn_holder(
    inner: &Arc<Inner>,
    download: &Arc<Download>,
    holders: &mut HolderTasks,
    id: HolderId,
    source: Source,
    first: bool,
) {
    let inner = Arc::clone(inner);
    let download = Arc::clone(download);
    holders.spawn(async move {
        let end = fetch(&inner, &download, id, &source, first).await;
        let fault = match &end {
            HolderEnd::Dropped(reason) => Some(reason.fault()),
            HolderEnd::Finished | HolderEnd::Fatal(_) => None,
        };
        lock(&download.swarm).ended(id, fault);
        download.work.notify_waiters();
        (source.peer_id, end)
    });
}

/// Fetches chunks from one holder until none is left for it.
async fn fetch(
    inner: &Arc<Inner>,
    download: &Arc<Download>,
    id: HolderId,
    source: &Source,
    first: bool,
) -> HolderEnd {
    let mut last_error = String::from("no address");
    let mut opened = None;
    for addr in &source.addrs {
        match inner
            .node
            .open_stream(*addr, msg::SERVICE, Some(source.key))
            .await
        {
            Ok(stream) => {
                opened = Some(stream);
                break;
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    let mut stream = match opened {
        Some(stream) => stream,
        // It cannot be dialed (no address, or none answers): ask it to dial us.
        None => match inner.request_dial_back(source, download.hash()).await {
            Ok(stream) => stream,
            Err(back) => {
                return HolderEnd::Dropped(HolderError::Unreachable {
                    dial: last_error,
                    back,
                })
            }
        },
    };
    match fetch_on(inner, download, id, &mut stream, first.then_some(source)).await {
        Ok(()) => {
            stream.shutdown().await;
            HolderEnd::Finished
        }
        Err(end) => end,
    }
}

async fn read_reply(stream: &mut DataStream, wait: Duration) -> Result<Reply, HolderEnd> {
    match tokio::time::timeout(wait, stream.read_line(MAX_STREAM_LINE)).await {
        Ok(Ok(Some(line))) => {
            serde_json::from_slice(&line).map_err(|e| HolderEnd::Dropped(HolderError::BadReply(e)))
        }
        Ok(Ok(None)) => Err(HolderEnd::Dropped(HolderError::Closed)),
        Ok(Err(e)) => Err(HolderEnd::Dropped(e.into())),
        Err(_) => Err(HolderEnd::Dropped(HolderError::Stalled)),
    }
}

async fn fill(stream: &mut DataStream) -> Result<(), HolderEnd> {
    match tokio::time::timeout(STALL_TIMEOUT, stream.fill()).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(HolderEnd::Dropped(HolderError::Closed)),
        Ok(Err(e)) => Err(HolderEnd::Dropped(e.into())),
        Err(_) => Err(HolderEnd::Dropped(HolderError::Stalled)),
    }
}

async fn fetch_on(
    inner: &Arc<Inner>,
    download: &Arc<Download>,
    id: HolderId,
    stream: &mut DataStream,
    first_of: Option<&Source>,
) -> Result<(), HolderEnd> {
    let (mut awaiting, get) = AwaitingHead::get(download.hash());
    stream
        .write_all(&msg::line(&get))
        .await
        .map_err(|e| HolderEnd::Dropped(e.into()))?;
    let head = loop {
        let reply = read_reply(stream, crate::state::APPROVAL_TIMEOUT + STALL_TIMEOUT).await?;
        match awaiting.on_reply(reply).map_err(dropped)? {
            Head::Wait(still) => awaiting = still,
            Head::Outboard(head) => break head,
        }
    };
    let (size, outboard_len) = (head.size, head.len);
    if download.spec.size.is_some_and(|s| s != size) && download.ready.get().is_none() {
        tracing::debug!(size, "the holder's size differs from the search result's");
    }
    while stream.buffered().len() < outboard_len {
        fill(stream).await?;
    }
    let outboard_bytes = stream
        .buffered()
        .get(..outboard_len)
        .unwrap_or_default()
        .to_vec();
    stream.consume(outboard_len);
    let ready = download
        .prepare(&inner.store, size, &outboard_bytes)
        .await?;
    if ready.outboard.layout().size != size {
        return Err(HolderEnd::Dropped(HolderError::OtherSize));
    }
    let mut exchange = head.verified(ready.outboard.layout());
    let start = lock(&download.swarm).ready(id, first_of.is_some());
    let Some(start) = start else {
        return Err(HolderEnd::Fatal(DownloadError::NoData));
    };
    if let Some(source) = first_of.filter(|_| start.second) {
        let _ = download.seconds.try_send(source.clone());
    }
    let window = start.window;
    let mut writes = Writes::new(Arc::clone(download));
    loop {
        let asked = lock(&download.swarm).next_requests(id, window);
        if let Some(request) = exchange.ask(asked) {
            stream
                .write_all(&msg::line(&request))
                .await
                .map_err(|e| HolderEnd::Dropped(e.into()))?;
        }
        if !exchange.awaiting() {
            let mut written = writes.submit().await?;
            written.extend(writes.drain().await?);
            if !written.is_empty() {
                arrived(download, id, written);
                continue;
            }
            if download.complete() {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), download.work.notified()).await;
            continue;
        }
        let reply = read_reply(stream, STALL_TIMEOUT).await?;
        let Incoming { chunk, offset, len } = exchange.on_reply(reply).map_err(dropped)?;
        let Some(mut hasher) = ready.outboard.chunk_hasher(chunk) else {
            return Err(HolderEnd::Dropped(HolderError::NoSuchChunk));
        };
        // Consecutive chunks are staged together and written STAGING bytes at a time, in
        // a blocking thread while the next bytes are read; a chunk counts as arrived once
        // it is verified and its bytes are written (a bad chunk's bytes already written
        // are never counted, and are fetched again).
        let written = writes.start(offset).await?;
        arrived(download, id, written);
        while hasher.remaining() > 0 {
            if writes.room() == 0 {
                let written = writes.submit().await?;
                arrived(download, id, written);
            }
            if stream.buffered().is_empty() {
                fill(stream).await?;
            }
            let take = (stream.buffered().len() as u64)
                .min(hasher.remaining())
                .min(writes.room() as u64) as usize;
            let piece = stream.buffered().get(..take).unwrap_or_default();
            hasher.update(piece);
            writes.push(piece);
            stream.consume(take);
        }
        if !hasher.matches() {
            return Err(HolderEnd::Dropped(HolderError::BadChunk(chunk)));
        }
        writes.completes(chunk, len);
    }
}

/// A holder dropped for a fault in its replies.
fn dropped(fault: ReplyFault) -> HolderEnd {
    HolderEnd::Dropped(HolderError::Reply(fault))
}

/// Records that the chunks `written` (index, length) from `id` are verified and on disk.
fn arrived(download: &Download, id: HolderId, written: Vec<(u32, u64)>) {
    if written.is_empty() {
        return;
    }
    let mut swarm = lock(&download.swarm);
    for (chunk, len) in written {
        swarm.arrived(id, chunk, len);
    }
}

type Written = tokio::task::JoinHandle<(Staging, std::io::Result<()>)>;

/// Double-buffered writes of one holder's chunks: one buffer fills while the other is
/// written in a blocking thread.
struct Writes {
    download: Arc<Download>,
    current: Staging,
    spare: Option<Staging>,
    inflight: Option<Written>,
}

impl Writes {
    fn new(download: Arc<Download>) -> Self {
        Self {
            download,
            current: Staging::new(),
            spare: Some(Staging::new()),
            inflight: None,
        }
    }

    /// Stages the chunk at `offset` next: after what is staged when it follows it, else
    /// once that is written; returns the chunks a write completed, if any.
    async fn start(&mut self, offset: u64) -> Result<Vec<(u32, u64)>, HolderEnd> {
        if self.current.is_empty() {
            self.current.at = offset;
            return Ok(Vec::new());
        }
        if self.current.at + self.current.len as u64 == offset {
            return Ok(Vec::new());
        }
        let written = self.submit().await?;
        self.current.at = offset;
        Ok(written)
    }

    /// Chunk `chunk` of `len` bytes, verified, ends with the bytes staged last.
    fn completes(&mut self, chunk: u32, len: u64) {
        self.current.completes.push((chunk, len));
    }

    fn room(&self) -> usize {
        self.current.room()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.current.push(bytes);
    }

    fn fatal(&self, source: std::io::Error) -> HolderEnd {
        HolderEnd::Fatal(DownloadError::Write {
            path: partial_path(&self.download.path()),
            source,
        })
    }

    /// Waits for the write in flight; returns the chunks it completed.
    async fn drain(&mut self) -> Result<Vec<(u32, u64)>, HolderEnd> {
        let Some(handle) = self.inflight.take() else {
            return Ok(Vec::new());
        };
        let (mut buffer, result) = handle
            .await
            .map_err(|e| HolderEnd::Fatal(DownloadError::Writer(e)))?;
        let completed = std::mem::take(&mut buffer.completes);
        self.spare = Some(buffer);
        result.map_err(|e| self.fatal(e))?;
        Ok(completed)
    }

    /// Writes what is staged in the background (nothing when nothing is); returns the
    /// chunks the previous write completed.
    async fn submit(&mut self) -> Result<Vec<(u32, u64)>, HolderEnd> {
        if self.current.is_empty() {
            return Ok(Vec::new());
        }
        let previous = self.drain().await?;
        let next_at = self.current.at + self.current.len as u64;
        let mut fresh = self.spare.take().unwrap_or_else(Staging::new);
        fresh.at = next_at;
        let full = std::mem::replace(&mut self.current, fresh);
        let download = Arc::clone(&self.download);
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            let mut full = full;
            let result = match download.ready.get() {
                Some(ready) => full.flush(ready),
                None => Err(std::io::Error::other("no partial file")),
            };
            (full, result)
        }));
        Ok(previous)
    }
}
