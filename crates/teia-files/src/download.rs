//! Downloading one file from every holder at once, the runtime of the [`Swarm`] policy: a
//! stream per holder pulls the chunks the swarm hands out, each chunk is hashed as it lands
//! in the partial file and checked against the outboard (so a bad byte costs one chunk and
//! the holder that sent it), and the partial file is renamed once every chunk is verified.
//! This file does the I/O and keeps the timers; the swarm decides.
//!
//! Resuming: the partial file and the verified outboard (in the database) survive an
//! interruption or a `kill -9`; the next run re-hashes the partial file's chunks and asks
//! only for those that do not verify.
//!
//! Bounds: those of the [`Swarm`] (holders at once, bytes requested from one holder), one
//! read buffer and two staging buffers of `STAGING` bytes per stream, `SOURCES_QUEUED`
//! holders waiting to be tried (more are not queued); a holder silent for [`STALL_TIMEOUT`]
//! is dropped.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use teia_core::identity::PublicKey;
use teia_node::stream::{DataStream, StreamError};
use tokio::sync::{mpsc, Notify, OnceCell};
use tokio::task::JoinSet;

use crate::proto::msg::{self, Reply, Request, MAX_STREAM_LINE};
use crate::proto::plan::HolderId;
use crate::proto::swarm::{Fault, Step, Swarm};
use crate::proto::tree::{Hash, Outboard, VerifyError, CV_LEN, MAX_CHUNKS};
use crate::service::{DialBackError, FilesEvent, Inner};
use crate::store::{PendingDownload, StoreError};
use crate::sync::lock;

/// Time a holder may send nothing while chunks are requested from it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between two progress events of one download.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Holders waiting to be tried, per download.
const SOURCES_QUEUED: usize = 64;
/// Suffix of a file being downloaded.
pub const PARTIAL_SUFFIX: &str = ".teia-partial";

/// A holder to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its peer id.
    pub peer_id: String,
    /// The key its stream must prove.
    pub key: PublicKey,
    /// Where to open the stream.
    pub addrs: Vec<SocketAddr>,
}

/// What to download.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The content.
    pub hash: Hash,
    /// The folder it goes to.
    pub dir: PathBuf,
    /// Its name (folders in it are kept, made safe).
    pub name: String,
    /// Its size, if known.
    pub size: Option<u64>,
}

/// A download's state, for `/downloads` and progress events.
#[derive(Debug, Clone)]
pub struct DownloadInfo {
    /// The content.
    pub hash: Hash,
    /// Its name.
    pub name: String,
    /// Its size, once known.
    pub size: Option<u64>,
    /// Bytes verified (including those on disk before this run).
    pub bytes: u64,
    /// Bytes fetched in this run.
    pub fetched: u64,
    /// Bytes per second, recently.
    pub rate: f64,
    /// Holders sending now.
    pub holders: usize,
    /// Seconds left at the current rate.
    pub eta: Option<f64>,
    /// Seconds since the download started (this run).
    pub seconds: f64,
}

struct Ready {
    outboard: Outboard,
    file: File,
    /// The same file opened for direct I/O (`O_DIRECT`), where the file system allows it:
    /// writes bypass the page cache, so a large download neither evicts the user's cache
    /// nor pays for filling it.
    direct: Option<File>,
}

/// Alignment of direct I/O buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
/// Bytes staged before a write, at most.
const STAGING: usize = 1024 * 1024;

/// Bytes of one chunk waiting to be written, in a buffer aligned for direct I/O.
struct Staging {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    /// File offset of the first staged byte.
    at: u64,
}

impl Staging {
    fn new() -> Self {
        let storage = vec![0u8; STAGING + DIRECT_ALIGN];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        Self {
            storage,
            start,
            len: 0,
            at: 0,
        }
    }

    fn room(&self) -> usize {
        STAGING - self.len
    }

    fn push(&mut self, bytes: &[u8]) {
        let end = self.start + self.len;
        if let Some(target) = self.storage.get_mut(end..end + bytes.len()) {
            target.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    /// Writes what is staged at its offset: the aligned part directly when possible.
    fn flush(&mut self, ready: &Ready) -> std::io::Result<()> {
        let data = self
            .storage
            .get(self.start..self.start + self.len)
            .unwrap_or_default();
        let aligned = if ready.direct.is_some() && self.at.is_multiple_of(DIRECT_ALIGN as u64) {
            self.len / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        let (head, tail) = data.split_at(aligned);
        if let (Some(direct), false) = (&ready.direct, head.is_empty()) {
            if direct.write_all_at(head, self.at).is_err() {
                ready.file.write_all_at(head, self.at)?;
            }
        }
        ready.file.write_all_at(tail, self.at + aligned as u64)?;
        self.at += self.len as u64;
        self.len = 0;
        Ok(())
    }
}

/// One download in progress.
pub struct Download {
    spec: Spec,
    started: Instant,
    ready: OnceCell<Ready>,
    swarm: Mutex<Swarm>,
    work: Notify,
    sources: mpsc::Sender<Source>,
    queued: Mutex<Option<mpsc::Receiver<Source>>>,
    /// Holders that served the file and may take a second stream.
    seconds: mpsc::Sender<Source>,
    seconds_queued: Mutex<Option<mpsc::Receiver<Source>>>,
}

/// Why fetching from one holder stopped.
enum HolderEnd {
    /// Nothing left to fetch.
    Finished,
    /// This holder failed; others may go on.
    Dropped(HolderError),
    /// The download cannot go on (disk full, write error).
    Fatal(DownloadError),
}

/// Why one holder was dropped from a download.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// Its outboard does not verify against the hash.
    #[error("corrupt: the holder's outboard is wrong: {0}")]
    BadOutboard(VerifyError),
    /// It announced another size than the verified outboard's.
    #[error("corrupt: another size")]
    OtherSize,
    /// A chunk it sent does not match the hash.
    #[error("corrupt: chunk {0} does not match the hash")]
    BadChunk(u32),
    /// It sent a chunk other than the one asked, or of the wrong length.
    #[error("sent chunk {chunk} of {len} bytes, chunk {expected} was asked")]
    WrongChunk {
        /// The chunk it sent.
        chunk: u32,
        /// Its length.
        len: u64,
        /// The chunk asked.
        expected: u32,
    },
    /// It named a chunk the file does not have.
    #[error("no such chunk")]
    NoSuchChunk,
    /// Its outboard is longer than any file's.
    #[error("outboard too large")]
    OutboardTooLarge,
    /// It could not be reached, neither dialed nor dialing back.
    #[error("cannot open a stream: {dial}; {back}")]
    Unreachable {
        /// Why dialing it failed.
        dial: String,
        /// Why it did not reach us another way.
        back: DialBackError,
    },
    /// Its stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Its stream closed.
    #[error("the stream closed")]
    Closed,
    /// It sent nothing for [`STALL_TIMEOUT`].
    #[error("the holder stalled")]
    Stalled,
    /// Its reply is not a reply.
    #[error("bad reply: {0}")]
    BadReply(serde_json::Error),
    /// It refused (an ERROR reply).
    #[error("{code}: {detail}")]
    Refused {
        /// The error's code.
        code: String,
        /// Its explanation.
        detail: String,
    },
    /// It replied out of turn before its OK.
    #[error("a reply out of order before OK")]
    OutOfOrder,
    /// It replied out of turn to CHUNKS.
    #[error("unexpected {0}")]
    Unexpected(String),
}

impl HolderError {
    /// The failure as the swarm policy sees it.
    pub fn fault(&self) -> Fault {
        match self {
            Self::BadOutboard(_) | Self::OtherSize | Self::BadChunk(_) => Fault::Corrupt,
            Self::Stalled => Fault::Stalled,
            Self::Unreachable { .. } | Self::Stream(_) | Self::Closed => Fault::Gone,
            Self::WrongChunk { .. }
            | Self::NoSuchChunk
            | Self::OutboardTooLarge
            | Self::BadReply(_)
            | Self::Refused { .. }
            | Self::OutOfOrder
            | Self::Unexpected(_) => Fault::Misbehaved,
        }
    }
}

/// Why a download failed (what was verified stays on disk for the next attempt).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The partial file could not be created or sized.
    #[error("cannot write the partial file: {0}")]
    Partial(std::io::Error),
    /// Writing into the partial file failed.
    #[error("cannot write {path}: {source}", path = .path.display())]
    Write {
        /// The partial file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A blocking disk task did not complete.
    #[error("writer failed: {0}")]
    Writer(tokio::task::JoinError),
    /// The size says empty but the hash is not the empty file's.
    #[error("the holder says the file is empty, but the hash says otherwise")]
    NotEmpty,
    /// The empty file could not be created.
    #[error("{0}")]
    Create(std::io::Error),
    /// The same download runs already.
    #[error("download already running")]
    AlreadyRunning,
    /// Every holder left or failed, and no other came in time.
    #[error("no holder left ({last}); what was verified is kept, /get again to resume")]
    NoHolder {
        /// The last holder's end, or that none answered.
        last: String,
    },
    /// No holder ever sent the outboard.
    #[error("no data")]
    NoData,
    /// The finished file could not be flushed to disk.
    #[error("cannot flush the file: {0}")]
    Flush(std::io::Error),
    /// The finished file could not take its name.
    #[error("cannot rename {path}: {source}", path = .path.display())]
    Rename {
        /// The partial file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The safe relative path for a name a peer chose: plain components only.
fn safe_relative(name: &str, hash: &Hash) -> PathBuf {
    let relative: PathBuf = Path::new(name)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    if relative.as_os_str().is_empty() {
        PathBuf::from(hash.to_hex())
    } else {
        relative
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(PARTIAL_SUFFIX);
    PathBuf::from(partial)
}

impl Download {
    pub(crate) fn new(spec: Spec) -> Self {
        let (sources, queued) = mpsc::channel(SOURCES_QUEUED);
        let (seconds, seconds_queued) = mpsc::channel(crate::proto::swarm::MAX_HOLDERS);
        let started = Instant::now();
        Self {
            spec,
            started,
            ready: OnceCell::new(),
            swarm: Mutex::new(Swarm::new(started)),
            work: Notify::new(),
            sources,
            queued: Mutex::new(Some(queued)),
            seconds,
            seconds_queued: Mutex::new(Some(seconds_queued)),
        }
    }

    /// The content.
    pub fn hash(&self) -> Hash {
        self.spec.hash
    }

    /// Where the file goes once verified.
    pub fn path(&self) -> PathBuf {
        self.spec
            .dir
            .join(safe_relative(&self.spec.name, &self.spec.hash))
    }

    pub(crate) fn add_source(&self, source: Source) {
        let _ = self.sources.try_send(source);
    }

    /// Its state now.
    pub fn info(&self) -> DownloadInfo {
        let swarm = lock(&self.swarm);
        let size = self
            .ready
            .get()
            .map(|r| r.outboard.layout().size)
            .or(self.spec.size);
        let bytes = swarm.done_bytes();
        let rate = swarm.rate();
        let eta = match (size, rate > 0.0) {
            (Some(size), true) => Some(size.saturating_sub(bytes) as f64 / rate),
            _ => None,
        };
        DownloadInfo {
            hash: self.spec.hash,
            name: self.spec.name.clone(),
            size,
            bytes,
            fetched: swarm.fetched(),
            rate,
            holders: swarm.peers(),
            eta,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    fn update_rate(&self) {
        lock(&self.swarm).sample_rate(Instant::now());
    }

    fn complete(&self) -> bool {
        lock(&self.swarm).is_complete()
    }

    /// Sets up the partial file and the plan from the first holder's outboard (checked
    /// against the hash), re-hashing what a previous run left.
    async fn prepare(
        &self,
        inner: &Arc<Inner>,
        size: u64,
        outboard: &[u8],
    ) -> Result<&Ready, HolderEnd> {
        self.ready
            .get_or_try_init(|| async {
                let outboard = Outboard::verify(self.spec.hash, size, outboard)
                    .map_err(|e| HolderEnd::Dropped(HolderError::BadOutboard(e)))?;
                let record = PendingDownload {
                    hash: self.spec.hash,
                    dir: self.spec.dir.clone(),
                    name: self.spec.name.clone(),
                    size,
                    outboard: Some(outboard.to_bytes()),
                };
                lock(&inner.store)
                    .put_download(&record)
                    .map_err(|e| HolderEnd::Fatal(e.into()))?;
                let partial = partial_path(&self.path());
                let checked = outboard.clone();
                let (file, have) =
                    tokio::task::spawn_blocking(move || open_partial(&partial, &checked))
                        .await
                        .map_err(|e| HolderEnd::Fatal(DownloadError::Writer(e)))?
                        .map_err(|e| HolderEnd::Fatal(DownloadError::Partial(e)))?;
                lock(&self.swarm).plan(outboard.layout(), &have);
                let direct = open_direct(&partial_path(&self.path()));
                Ok(Ready {
                    outboard,
                    file,
                    direct,
                })
            })
            .await
    }
}

/// Opens the partial file for direct I/O, if the file system supports it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).ok()?;
    OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .ok()
}

/// Opens (creating) the partial file at its size and finds the chunks already verified.
fn open_partial(path: &Path, outboard: &Outboard) -> std::io::Result<(File, Vec<bool>)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let layout = outboard.layout();
    let existing = file.metadata()?.len();
    // Reserve the blocks now: a full disk fails here, before any transfer, and writing into
    // reserved blocks costs the filesystem less than growing the file.
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, layout.size) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOSPC => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("no room for {} bytes", layout.size),
            ))
        }
        Err(_) => file.set_len(layout.size)?,
    }
    let mut have = Vec::with_capacity(layout.chunks() as usize);
    let mut buffer = vec![0u8; 1024 * 1024];
    for index in 0..layout.chunks() {
        let Some((offset, len)) = layout.range(index) else {
            break;
        };
        if offset + len > existing {
            have.push(false);
            continue;
        }
        let Some(mut hasher) = outboard.chunk_hasher(index) else {
            have.push(false);
            continue;
        };
        let mut done = 0u64;
        while done < len {
            let want = ((len - done) as usize).min(buffer.len());
            let Some(piece) = buffer.get_mut(..want) else {
                break;
            };
            file.read_exact_at(piece, offset + done)?;
            hasher.update(piece);
            done += want as u64;
        }
        have.push(hasher.matches());
    }
    Ok((file, have))
}

/// Runs a download to its end: done (renamed, verified) or failed (partial kept).
pub(crate) async fn run(inner: Arc<Inner>, download: Arc<Download>) {
    let hash = download.hash();
    let outcome = drive(&inner, &download).await;
    lock(&inner.downloads).remove(&hash);
    match outcome {
        Ok(path) => {
            if let Err(e) = lock(&inner.store).remove_download(&hash) {
                tracing::warn!(error = %e, "finished download not dropped from the database");
            }
            let sources = lock(&download.swarm).sources();
            inner
                .emit(FilesEvent::Done {
                    info: download.info(),
                    path,
                    sources,
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

async fn drive(inner: &Arc<Inner>, download: &Arc<Download>) -> Result<PathBuf, DownloadError> {
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
        return Ok(target);
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
                        let reason = reason.to_string();
                        inner.emit(FilesEvent::HolderDropped { hash, holder: peer, reason }).await;
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
    Ok(target)
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
            .open_stream(*addr, crate::routed::SERVICE, Some(source.key))
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
    let get = Request::Get {
        hash: download.hash().to_hex(),
    };
    stream
        .write_all(&msg::line(&get))
        .await
        .map_err(|e| HolderEnd::Dropped(e.into()))?;
    let (size, outboard_len) = loop {
        match read_reply(stream, crate::serve::APPROVAL_TIMEOUT + STALL_TIMEOUT).await? {
            Reply::Ok { size, outboard } => break (size, outboard),
            Reply::Wait { .. } => continue,
            Reply::Error { code, detail } => {
                return Err(HolderEnd::Dropped(HolderError::Refused { code, detail }))
            }
            Reply::Data { .. } | Reply::Offer { .. } => {
                return Err(HolderEnd::Dropped(HolderError::OutOfOrder))
            }
        }
    };
    if download.spec.size.is_some_and(|s| s != size) && download.ready.get().is_none() {
        tracing::debug!(size, "the holder's size differs from the search result's");
    }
    let max_outboard = MAX_CHUNKS as usize * CV_LEN;
    let outboard_len = usize::try_from(outboard_len).unwrap_or(usize::MAX);
    if outboard_len > max_outboard {
        return Err(HolderEnd::Dropped(HolderError::OutboardTooLarge));
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
    let ready = download.prepare(inner, size, &outboard_bytes).await?;
    if ready.outboard.layout().size != size {
        return Err(HolderEnd::Dropped(HolderError::OtherSize));
    }
    let layout = ready.outboard.layout();
    let start = lock(&download.swarm).ready(id, first_of.is_some());
    let Some(start) = start else {
        return Err(HolderEnd::Fatal(DownloadError::NoData));
    };
    if let Some(source) = first_of.filter(|_| start.second) {
        let _ = download.seconds.try_send(source.clone());
    }
    let window = start.window;
    let mut outstanding: VecDeque<u32> = VecDeque::new();
    let mut writes = Writes::new(Arc::clone(download));
    loop {
        let asked = lock(&download.swarm).next_requests(id, window);
        if !asked.is_empty() {
            let request = Request::Chunks {
                chunks: asked.clone(),
            };
            stream
                .write_all(&msg::line(&request))
                .await
                .map_err(|e| HolderEnd::Dropped(e.into()))?;
            outstanding.extend(asked);
        }
        let Some(&expected) = outstanding.front() else {
            if let Some(written) = writes.drain().await? {
                arrived(download, id, written);
                continue;
            }
            if download.complete() {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), download.work.notified()).await;
            continue;
        };
        let (chunk, len) = match read_reply(stream, STALL_TIMEOUT).await? {
            Reply::Data { chunk, len } => (chunk, len),
            Reply::Error { code, detail } => {
                return Err(HolderEnd::Dropped(HolderError::Refused { code, detail }))
            }
            other => {
                return Err(HolderEnd::Dropped(HolderError::Unexpected(format!(
                    "{other:?}"
                ))))
            }
        };
        let range = layout.range(chunk);
        if chunk != expected || range.map(|(_, l)| l) != Some(len) {
            return Err(HolderEnd::Dropped(HolderError::WrongChunk {
                chunk,
                len,
                expected,
            }));
        }
        let (offset, _) = range.unwrap_or_default();
        let Some(mut hasher) = ready.outboard.chunk_hasher(chunk) else {
            return Err(HolderEnd::Dropped(HolderError::NoSuchChunk));
        };
        // A chunk of up to STAGING bytes is written only once verified; a larger one is
        // written a staged piece at a time and checked at its end. The write runs in a
        // blocking thread while the next chunk is read; a chunk counts as arrived once its
        // bytes are written.
        writes.start(offset);
        while hasher.remaining() > 0 {
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
            if writes.room() == 0 && hasher.remaining() > 0 {
                if let Some(written) = writes.submit(None).await? {
                    arrived(download, id, written);
                }
            }
        }
        outstanding.pop_front();
        if !hasher.matches() {
            return Err(HolderEnd::Dropped(HolderError::BadChunk(chunk)));
        }
        if let Some(written) = writes.submit(Some((chunk, len))).await? {
            arrived(download, id, written);
        }
    }
}

/// Records that chunk `chunk` of `len` bytes from `id` is verified and on disk.
fn arrived(download: &Download, id: HolderId, (chunk, len): (u32, u64)) {
    lock(&download.swarm).arrived(id, chunk, len);
}

type Written = tokio::task::JoinHandle<(Staging, std::io::Result<()>, Option<(u32, u64)>)>;

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

    fn start(&mut self, offset: u64) {
        self.current.at = offset;
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

    /// Waits for the write in flight; returns the chunk it completed, if any.
    async fn drain(&mut self) -> Result<Option<(u32, u64)>, HolderEnd> {
        let Some(handle) = self.inflight.take() else {
            return Ok(None);
        };
        let (buffer, result, chunk) = handle
            .await
            .map_err(|e| HolderEnd::Fatal(DownloadError::Writer(e)))?;
        self.spare = Some(buffer);
        result.map_err(|e| self.fatal(e))?;
        Ok(chunk)
    }

    /// Writes what is staged (completing `chunk`, if given) in the background; returns the
    /// chunk the previous write completed, if any.
    async fn submit(&mut self, chunk: Option<(u32, u64)>) -> Result<Option<(u32, u64)>, HolderEnd> {
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
            (full, result, chunk)
        }));
        Ok(previous)
    }
}
