//! One download in progress ([`Download`]: its [`Swarm`] behind one lock, its partial file,
//! the holders waiting to be tried) and what a download reports: its progress
//! ([`DownloadInfo`]) and why a holder or the download stopped. [`crate::fetch`] drives it.
//!
//! Resuming: the partial file and the verified outboard (in the database) survive an
//! interruption or a `kill -9`; the next run re-hashes the partial file's chunks and asks
//! only for those that do not verify.
//!
//! Bounds: those of the [`Swarm`] (holders at once, bytes requested from one holder), one
//! read buffer and two staging buffers of `STAGING` bytes per stream, `SOURCES_QUEUED`
//! holders waiting to be tried (more are not queued); a holder silent for [`STALL_TIMEOUT`]
//! is dropped.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use teia_core::identity::PublicKey;
use teia_node::stream::StreamError;
use tokio::sync::{mpsc, Notify, OnceCell};

use crate::proto::exchange::ReplyFault;
use crate::proto::swarm::{Fault, Swarm};
use crate::proto::tree::{Hash, Outboard, VerifyError};
use crate::store::{FileStore, PendingDownload, StoreError};
use teia_node::sync::lock;

/// Time a holder may send nothing while chunks are requested from it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between two progress events of one download.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(500);
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

pub(crate) struct Ready {
    pub(crate) outboard: Outboard,
    pub(crate) file: File,
    /// The same file opened for direct I/O (`O_DIRECT`), where the file system allows it:
    /// writes bypass the page cache, so a large download neither evicts the user's cache
    /// nor pays for filling it.
    direct: Option<File>,
}

/// Alignment of direct I/O buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
/// Bytes staged before a write, at most: consecutive chunks are written together, so a
/// download makes one write per this many bytes whatever its chunk size.
pub(crate) const STAGING: usize = 2 * 1024 * 1024;

/// Consecutive bytes of a file waiting to be written, in a buffer aligned for direct I/O,
/// and the chunks they complete.
pub(crate) struct Staging {
    storage: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) len: usize,
    /// File offset of the first staged byte.
    pub(crate) at: u64,
    /// The verified chunks (index, length) whose last bytes are staged here: they count as
    /// arrived once this buffer is written.
    pub(crate) completes: Vec<(u32, u64)>,
}

impl Staging {
    pub(crate) fn new() -> Self {
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
            completes: Vec::new(),
        }
    }

    /// Whether nothing is staged.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0 && self.completes.is_empty()
    }

    pub(crate) fn room(&self) -> usize {
        STAGING - self.len
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let end = self.start + self.len;
        if let Some(target) = self.storage.get_mut(end..end + bytes.len()) {
            target.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    /// Writes what is staged at its offset: the aligned part directly when possible.
    pub(crate) fn flush(&mut self, ready: &Ready) -> std::io::Result<()> {
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

/// Why a holder we cannot dial did not reach us another way.
#[derive(Debug, thiserror::Error)]
pub enum DialBackError {
    /// The node has stopped.
    #[error("the node has stopped")]
    NodeStopped,
    /// No neighbour of ours accepts connections.
    #[error("no neighbour accepts connections to splice through")]
    NoRelay,
    /// Every relay failed; the last one's reason.
    #[error("splice through {relay}: {source}")]
    Splice {
        /// The relay.
        relay: String,
        /// Its failure.
        source: StreamError,
    },
    /// No relay answered.
    #[error("no relay answered")]
    NoRelayAnswered,
    /// [`crate::state::MAX_DIAL_BACKS_WAITING`] requests already wait.
    #[error("too many dial-back requests waiting")]
    TooMany,
    /// The holder did not open a stream to us within [`crate::state::DIAL_BACK_TIMEOUT`].
    #[error("the holder did not open a stream back")]
    NoStreamBack,
}

/// One download in progress.
pub struct Download {
    pub(crate) spec: Spec,
    started: Instant,
    pub(crate) ready: OnceCell<Ready>,
    pub(crate) swarm: Mutex<Swarm>,
    pub(crate) work: Notify,
    pub(crate) sources: mpsc::Sender<Source>,
    pub(crate) queued: Mutex<Option<mpsc::Receiver<Source>>>,
    /// Holders that served the file and may take a second stream.
    pub(crate) seconds: mpsc::Sender<Source>,
    pub(crate) seconds_queued: Mutex<Option<mpsc::Receiver<Source>>>,
    /// Cancelled by the user ([`crate::Files::cancel`]).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
}

/// Why fetching from one holder stopped.
pub(crate) enum HolderEnd {
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
    /// It named a chunk the file does not have.
    #[error("no such chunk")]
    NoSuchChunk,
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
    /// It refused, or replied out of turn (the stream's states, [`crate::proto::exchange`]).
    #[error(transparent)]
    Reply(#[from] ReplyFault),
}

impl HolderError {
    /// The failure as the swarm policy sees it.
    pub fn fault(&self) -> Fault {
        match self {
            Self::BadOutboard(_) | Self::OtherSize | Self::BadChunk(_) => Fault::Corrupt,
            Self::Stalled => Fault::Stalled,
            Self::Unreachable { .. } | Self::Stream(_) | Self::Closed => Fault::Gone,
            Self::NoSuchChunk | Self::BadReply(_) | Self::Reply(_) => Fault::Misbehaved,
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
    /// The user cancelled it (what was fetched is deleted).
    #[error("cancelled")]
    Cancelled,
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

pub(crate) fn partial_path(path: &Path) -> PathBuf {
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
            cancel: tokio_util::sync::CancellationToken::new(),
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

    pub(crate) fn update_rate(&self) {
        lock(&self.swarm).sample_rate(Instant::now());
    }

    pub(crate) fn complete(&self) -> bool {
        lock(&self.swarm).is_complete()
    }

    /// Sets up the partial file and the plan from the first holder's outboard (checked
    /// against the hash), re-hashing what a previous run left.
    pub(crate) async fn prepare(
        &self,
        store: &Mutex<FileStore>,
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
                lock(store)
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
