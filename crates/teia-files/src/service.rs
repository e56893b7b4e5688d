//! The file-sharing service: the handle interfaces call, and its state. It talks to the
//! network only through the node's API (queries, answers, data streams).
//!
//! Bounds: [`MAX_DOWNLOADS`] downloads at once, [`MAX_SERVING`] streams served at once and
//! [`MAX_STREAMS_PER_PEER`] per peer (one more is answered `busy`), [`MAX_PENDING_APPROVALS`]
//! requests waiting for the user (more are denied), [`RESULTS_KEPT`] search results
//! remembered, events to the interface up to [`EVENTS`] (progress events are dropped when
//! the interface lags; the others wait). Shutdown waits [`LEAVE_WAIT`] for the index and
//! [`SHUTDOWN_GRACE`] for the service's tasks, then aborts those left.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use teia_core::identity::PublicKey;
use teia_node::node::NodeHandle;
use teia_node::stream::{DataStream, StreamError};
use tokio::sync::{mpsc, oneshot};

use crate::download::{self, Download, DownloadInfo, Source};
use crate::index_client::{self, IndexCommand};
use crate::proto::msg::{self, Answer, Found, Question, MAX_RESULTS_PER_HIT, MAX_SEARCH_TEXT};
use crate::proto::tree::Hash;
use crate::seed;
use crate::serve;
use crate::share;
use crate::store::{FileStore, SharedFile, StoreError};
use crate::sync::lock;
use crate::tasks::Tasks;

/// Downloads running at once; one more is refused.
pub const MAX_DOWNLOADS: usize = 16;
/// Streams served at once.
pub const MAX_SERVING: usize = 64;
/// Streams served to one peer at once.
pub const MAX_STREAMS_PER_PEER: usize = 4;
/// Requests waiting for the user's approval at once.
pub const MAX_PENDING_APPROVALS: usize = 64;
/// Search results remembered (for `/get NAME` and for holders of a download).
pub const RESULTS_KEPT: usize = 4_096;
/// Approvals remembered (requester key and file); beyond, they are forgotten and asked again.
pub const GRANTS_KEPT: usize = 4_096;
/// Events waiting for the interface.
pub const EVENTS: usize = 1_024;
/// Holders whose answers to one search are shown; later ones are dropped.
pub const MAX_ANSWERS_PER_SEARCH: usize = 64;
/// Streams this node opens back to askers (when it cannot be dialed), per minute at most;
/// requests beyond are ignored.
pub const DIAL_BACKS_PER_MINUTE: f64 = 10.0;
/// Queries this node answers per second at most (burst as many); beyond, it stays silent.
pub const ANSWERS_PER_SECOND: f64 = 50.0;
/// Our dial-back requests waiting at once; more fail at once.
pub const MAX_DIAL_BACKS_WAITING: usize = 64;
/// Time a holder has to open a stream back to us.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Hops a search travels.
pub const SEARCH_TTL: u32 = 5;
/// Time between two rescans of the shared folders.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Time shutdown waits for the index's answer to LEAVE.
pub const LEAVE_WAIT: Duration = Duration::from_secs(2);
/// Time shutdown waits for the service's tasks to stop before aborting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Who may download what this node shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// Anyone.
    All,
    /// The user approves each requester (`/approve ID`, `/deny ID`).
    Ask,
    /// Only keys given with `--trust`.
    Trusted,
    /// No one.
    None,
}

/// A name that is not an approval policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown approval policy {0:?}; use all, ask, trusted or none")]
pub struct UnknownApproval(pub String);

impl std::str::FromStr for Approval {
    type Err = UnknownApproval;

    fn from_str(text: &str) -> Result<Self, UnknownApproval> {
        match text {
            "all" => Ok(Self::All),
            "ask" => Ok(Self::Ask),
            "trusted" => Ok(Self::Trusted),
            "none" => Ok(Self::None),
            other => Err(UnknownApproval(other.to_owned())),
        }
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
    /// [`MAX_DIAL_BACKS_WAITING`] requests already wait.
    #[error("too many dial-back requests waiting")]
    TooMany,
    /// The holder did not open a stream to us within [`DIAL_BACK_TIMEOUT`].
    #[error("the holder did not open a stream back")]
    NoStreamBack,
}

/// How to run the service.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Its database.
    pub db: PathBuf,
    /// Folders and files to share (added to those shared before).
    pub shares: Vec<PathBuf>,
    /// Who may download.
    pub approval: Approval,
    /// Keys `Approval::Trusted` lets in.
    pub trusted: Vec<PublicKey>,
    /// Where downloads go unless told otherwise.
    pub download_dir: PathBuf,
    /// Our listen address, advertised in answers (`None`: we do not listen).
    pub listen: Option<SocketAddr>,
    /// Our key.
    pub key: PublicKey,
    /// Bytes per second served at most, all streams together (`None`: no limit).
    pub upload_limit: Option<u64>,
    /// Our peer id.
    pub peer_id: String,
    /// An index server to join (`HOST:PORT`).
    pub index: Option<String>,
}

/// What the service tells the interface.
#[derive(Debug, Clone)]
pub enum FilesEvent {
    /// A folder was (re)indexed.
    Shared {
        /// The folder or file.
        path: PathBuf,
        /// Files in it.
        files: usize,
        /// Their bytes.
        bytes: u64,
        /// Files hashed this time (new or changed).
        hashed: usize,
    },
    /// A holder answered a search.
    SearchResults {
        /// The words searched.
        text: String,
        /// The holder.
        holder: String,
        /// What it has.
        files: Vec<Found>,
    },
    /// A download's progress (a few per second at most).
    Progress(DownloadInfo),
    /// A download finished, verified.
    Done {
        /// Its state at the end.
        info: DownloadInfo,
        /// Where the file is.
        path: PathBuf,
        /// Bytes fetched from each holder this run.
        sources: Vec<(String, u64)>,
    },
    /// A download failed; what was verified is kept for a later `/get`.
    Failed {
        /// The content.
        hash: Hash,
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A holder was dropped from a download.
    HolderDropped {
        /// The content.
        hash: Hash,
        /// The holder.
        holder: String,
        /// Why (`denied`, a corrupt chunk, a broken stream).
        reason: String,
    },
    /// A peer asks to download a file of ours; answer with [`Files::approve`] or
    /// [`Files::deny`].
    ApprovalRequest {
        /// The request's id.
        id: u64,
        /// Who asks.
        peer: String,
        /// Its key (none for a seed peer).
        key: Option<PublicKey>,
        /// The file.
        name: String,
        /// Its size.
        size: u64,
        /// Its hash.
        hash: Hash,
    },
    /// A download from a course peer (seed 004) finished.
    SeedDone {
        /// The file's name.
        name: String,
        /// Where it is.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// Its BLAKE3 hash, computed on the way.
        hash: Hash,
        /// Time taken.
        seconds: f64,
        /// The course peer.
        holder: String,
    },
    /// A download from a course peer failed.
    SeedFailed {
        /// The file's name.
        name: String,
        /// The course peer.
        holder: String,
        /// Why.
        reason: String,
    },
    /// A warning about sharing (a folder that could not be read, ...).
    Warning(String),
}

/// Why the service could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A path could not be used.
    #[error("{path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A path to share cannot be read.
    #[error("cannot share {path}: {source}")]
    Share {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// A search result remembered: a file and who has it.
#[derive(Debug, Clone)]
pub(crate) struct Holding {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) hash: Hash,
    pub(crate) source: Source,
}

/// A course peer's file found through a seed 004 index (no hash, no key).
#[derive(Debug, Clone)]
pub(crate) struct SeedHolding {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
}

pub(crate) struct Approvals {
    next: u64,
    pending: HashMap<u64, oneshot::Sender<bool>>,
    granted: HashSet<(Option<PublicKey>, Hash)>,
}

pub(crate) struct Inner {
    pub(crate) node: NodeHandle,
    pub(crate) store: Mutex<FileStore>,
    pub(crate) events: mpsc::Sender<FilesEvent>,
    pub(crate) config: FilesConfig,
    pub(crate) downloads: Mutex<HashMap<Hash, Arc<Download>>>,
    pub(crate) results: Mutex<VecDeque<Holding>>,
    pub(crate) approvals: Mutex<Approvals>,
    pub(crate) serving: Mutex<HashMap<String, usize>>,
    /// Our searches: query id, text, holders that answered.
    pub(crate) searches: Mutex<VecDeque<(String, String, usize)>>,
    /// Our holder queries for downloads: query id → hash.
    pub(crate) holder_queries: Mutex<VecDeque<(String, Hash)>>,
    /// Held while a query of ours is asked and recorded (in `searches` or
    /// `holder_queries`); an answer waits for it, so it is never taken for an answer to
    /// an unknown query because it came back before its query was recorded.
    pub(crate) asking: tokio::sync::Mutex<()>,
    pub(crate) throttle: Option<serve::Throttle>,
    pub(crate) seed_results: Mutex<VecDeque<SeedHolding>>,
    pub(crate) index: Option<mpsc::Sender<IndexCommand>>,
    /// Our dial-back requests waiting for their stream: token → holder key and the waiter.
    pub(crate) dial_backs: Mutex<HashMap<String, DialBackWaiter>>,
    /// Dial-backs we may still make ([`DIAL_BACKS_PER_MINUTE`]).
    pub(crate) dial_back_budget: Mutex<Budget>,
    /// Queries we may still answer ([`ANSWERS_PER_SECOND`]).
    pub(crate) answer_budget: Mutex<Budget>,
    pub(crate) tokens: std::sync::atomic::AtomicU64,
    /// Requests of course peers for files not shared, for their summarised log line.
    pub(crate) not_found_log: Mutex<seed::LogSummary>,
    /// Every task the service starts, stopped and joined at shutdown.
    pub(crate) tasks: Tasks,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved.
pub(crate) struct Budget {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: std::time::Instant,
}

impl Budget {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            at: std::time::Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A dial-back request heard: what to serve, to whom, and how to reach it.
struct DialBack {
    hash: String,
    key: String,
    addrs: Vec<String>,
    token: String,
    /// For a splice: the relays the asker asked.
    relays: Option<Vec<String>>,
}

/// Who a dial-back request expects, and who waits for its stream.
pub(crate) type DialBackWaiter = (PublicKey, oneshot::Sender<DataStream>);

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() >= cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

/// The addresses we can be reached on: the one we listen on, or, listening on all
/// interfaces, loopback and the address of the default route (found without sending
/// anything: connecting a UDP socket only picks a route).
pub fn reachable(listen: SocketAddr) -> Vec<SocketAddr> {
    if !listen.ip().is_unspecified() {
        return vec![listen];
    }
    let mut addrs = Vec::new();
    let primary = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|socket| {
            socket.connect((std::net::Ipv4Addr::new(192, 0, 2, 1), 9))?;
            socket.local_addr()
        })
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback());
    if let Some(ip) = primary {
        addrs.push(SocketAddr::new(ip, listen.port()));
    }
    addrs.push(SocketAddr::new(
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        listen.port(),
    ));
    addrs
}

impl Inner {
    /// Opens a stream back to `asker`, which cannot reach us, and serves `hash` on it
    /// (directly at one of `addrs`, or spliced by the first of `relays` that is our
    /// neighbour): only for content we share, with a policy that serves someone, within the
    /// dial-back budget, to an asker proving `key`.
    async fn dial_back(self: &Arc<Self>, asker: &str, request: DialBack) {
        let DialBack {
            hash,
            key,
            addrs,
            token,
            relays,
        } = request;
        let (Some(hash), Ok(key)) = (Hash::from_hex(&hash), PublicKey::parse(&key)) else {
            return;
        };
        if self.config.approval == Approval::None
            || !matches!(lock(&self.store).by_hash(&hash), Ok(Some(_)))
        {
            return;
        }
        if !lock(&self.dial_back_budget).take() {
            tracing::warn!("dial-back request ignored: too many");
            return;
        }
        if let Some(relays) = relays {
            let Ok(snapshot) = self.node.snapshot().await else {
                return;
            };
            let relay = relays.iter().take(msg::MAX_RELAYS).find(|relay| {
                snapshot
                    .neighbours
                    .iter()
                    .any(|n| n.peer == **relay && n.teia && n.key.is_some())
            });
            let Some(relay) = relay else {
                tracing::debug!(%asker, "splice asked through no neighbour of ours");
                return;
            };
            match self
                .node
                .accept_spliced_stream(relay, asker, &token, key)
                .await
            {
                Ok(stream) => serve::serve_requests(Arc::clone(self), stream).await,
                Err(e) => tracing::debug!(%relay, error = %e, "splice failed"),
            }
            return;
        }
        for addr in addrs
            .iter()
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .take(4)
        {
            match self
                .node
                .open_stream(addr, crate::routed::DIAL_BACK_STREAM, Some(key))
                .await
            {
                Ok(mut stream) => {
                    let offer = msg::line(&msg::Reply::Offer { token });
                    if stream.write_all(&offer).await.is_ok() {
                        serve::serve_requests(Arc::clone(self), stream).await;
                    }
                    return;
                }
                Err(e) => tracing::debug!(%addr, error = %e, "dial-back failed"),
            }
        }
    }

    fn new_token(&self) -> String {
        let number = self
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        blake3::hash(
            format!(
                "{}:{number}:{:?}",
                self.config.key,
                std::time::SystemTime::now()
            )
            .as_bytes(),
        )
        .to_hex()
        .chars()
        .take(32)
        .collect()
    }

    /// Asks `source`, which we cannot dial, to join us through a neighbour of ours that
    /// listens (a splice): we ask up to [`msg::MAX_RELAYS`] of them to splice us with it,
    /// it asks the first that is its neighbour too, and the stream opens through that one.
    pub(crate) async fn request_splice(
        &self,
        source: &Source,
        hash: Hash,
    ) -> Result<DataStream, DialBackError> {
        let snapshot = self
            .node
            .snapshot()
            .await
            .map_err(|_| DialBackError::NodeStopped)?;
        let relays: Vec<String> = snapshot
            .neighbours
            .iter()
            .filter(|n| !n.inbound && n.teia && n.key.is_some() && n.peer != source.peer_id)
            .map(|n| n.peer.clone())
            .take(msg::MAX_RELAYS)
            .collect();
        if relays.is_empty() {
            return Err(DialBackError::NoRelay);
        }
        let ask = self.new_token();
        let mut openings = tokio::task::JoinSet::new();
        for relay in &relays {
            let (node, relay, holder, ask, key) = (
                self.node.clone(),
                relay.clone(),
                source.peer_id.clone(),
                ask.clone(),
                source.key,
            );
            openings.spawn(async move {
                let opened = node
                    .open_spliced_stream(&relay, &holder, &ask, crate::routed::SERVICE, key)
                    .await;
                opened.map_err(|source| DialBackError::Splice { relay, source })
            });
        }
        let question = Question::DialBack {
            holder: source.peer_id.clone(),
            hash: hash.to_hex(),
            key: self.config.key.to_string(),
            addrs: Vec::new(),
            token: ask,
            splice: true,
            relays,
        };
        let body = serde_json::to_value(question).unwrap_or(Value::Null);
        let _ = self
            .node
            .query(crate::routed::SERVICE, body, SEARCH_TTL)
            .await;
        let mut last = DialBackError::NoRelayAnswered;
        while let Some(opened) = openings.join_next().await {
            match opened {
                Ok(Ok(stream)) => {
                    openings.abort_all();
                    return Ok(stream);
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = DialBackError::NoRelayAnswered,
            }
        }
        Err(last)
    }

    /// Asks `source`, which we cannot dial, to open a stream to us (or, when we cannot be
    /// dialed either, to join us at a neighbour); waits for it.
    pub(crate) async fn request_dial_back(
        &self,
        source: &Source,
        hash: Hash,
    ) -> Result<DataStream, DialBackError> {
        let Some(listen) = self.config.listen else {
            return self.request_splice(source, hash).await;
        };
        let token = self.new_token();
        let (reply, stream) = oneshot::channel();
        {
            let mut waiting = lock(&self.dial_backs);
            if waiting.len() >= MAX_DIAL_BACKS_WAITING {
                return Err(DialBackError::TooMany);
            }
            waiting.insert(token.clone(), (source.key, reply));
        }
        let question = Question::DialBack {
            holder: source.peer_id.clone(),
            hash: hash.to_hex(),
            key: self.config.key.to_string(),
            addrs: reachable(listen).iter().map(ToString::to_string).collect(),
            token: token.clone(),
            splice: false,
            relays: Vec::new(),
        };
        let body = serde_json::to_value(question).unwrap_or(Value::Null);
        if self
            .node
            .query(crate::routed::SERVICE, body, SEARCH_TTL)
            .await
            .is_err()
        {
            lock(&self.dial_backs).remove(&token);
            return Err(DialBackError::NodeStopped);
        }
        let result = tokio::time::timeout(DIAL_BACK_TIMEOUT, stream).await;
        lock(&self.dial_backs).remove(&token);
        match result {
            Ok(Ok(stream)) => Ok(stream),
            _ => Err(DialBackError::NoStreamBack),
        }
    }

    pub(crate) fn node_peer_id(&self) -> String {
        self.config.peer_id.clone()
    }

    pub(crate) fn remember(&self, holding: Holding) {
        push_bounded(&mut lock(&self.results), holding, RESULTS_KEPT);
    }

    pub(crate) fn remember_seed(&self, holding: SeedHolding) {
        push_bounded(&mut lock(&self.seed_results), holding, RESULTS_KEPT);
    }

    pub(crate) async fn emit(&self, event: FilesEvent) {
        let _ = self.events.send(event).await;
    }

    pub(crate) fn emit_progress(&self, event: FilesEvent) {
        let _ = self.events.try_send(event);
    }

    /// Holders of `hash` heard in answers.
    pub(crate) fn sources_of(&self, hash: &Hash) -> Vec<Source> {
        let mut seen = HashSet::new();
        lock(&self.results)
            .iter()
            .rev()
            .filter(|h| h.hash == *hash)
            .filter(|h| seen.insert(h.source.peer_id.clone()))
            .map(|h| h.source.clone())
            .collect()
    }

    /// Asks the network who holds `hash`; answers reach the download as new holders.
    pub(crate) async fn ask_holders(&self, hash: Hash) {
        let body = serde_json::to_value(Question::Holders {
            hash: hash.to_hex(),
        })
        .unwrap_or(Value::Null);
        let _asking = self.asking.lock().await;
        if let Ok(query_id) = self
            .node
            .query(crate::routed::SERVICE, body, SEARCH_TTL)
            .await
        {
            push_bounded(&mut lock(&self.holder_queries), (query_id, hash), 256);
        }
    }
}

/// The file-sharing service's handle.
#[derive(Clone)]
pub struct Files {
    pub(crate) inner: Arc<Inner>,
}

/// What `/share` found.
#[derive(Debug, Clone)]
pub struct ShareSummary {
    /// The folder or file, as stored.
    pub path: PathBuf,
    /// Files in it.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

impl Files {
    /// Starts the service: opens its database, indexes the shared folders (in the
    /// background), resumes unfinished downloads. The node hands it its queries, hits and
    /// streams once it is attached to the node's router ([`crate::routed`]).
    pub async fn start(
        config: FilesConfig,
        node: NodeHandle,
    ) -> Result<(Self, mpsc::Receiver<FilesEvent>), FilesError> {
        let store = FileStore::open(&config.db)?;
        for path in &config.shares {
            let path = path.canonicalize().map_err(|source| FilesError::Share {
                path: path.clone(),
                source,
            })?;
            store.add_share(&path)?;
        }
        let pending = store.downloads()?;
        let (events, event_rx) = mpsc::channel(EVENTS);
        let (index, index_rx) = mpsc::channel(index_client::COMMANDS);
        let index_server = config.index.clone();
        let files = Self {
            inner: Arc::new(Inner {
                node,
                store: Mutex::new(store),
                events,
                downloads: Mutex::new(HashMap::new()),
                results: Mutex::new(VecDeque::new()),
                approvals: Mutex::new(Approvals {
                    next: 1,
                    pending: HashMap::new(),
                    granted: HashSet::new(),
                }),
                serving: Mutex::new(HashMap::new()),
                searches: Mutex::new(VecDeque::new()),
                holder_queries: Mutex::new(VecDeque::new()),
                asking: tokio::sync::Mutex::new(()),
                throttle: config.upload_limit.map(serve::Throttle::new),
                seed_results: Mutex::new(VecDeque::new()),
                index: index_server.is_some().then_some(index),
                dial_backs: Mutex::new(HashMap::new()),
                dial_back_budget: Mutex::new(Budget::new(DIAL_BACKS_PER_MINUTE / 60.0, 5.0)),
                answer_budget: Mutex::new(Budget::new(ANSWERS_PER_SECOND, ANSWERS_PER_SECOND)),
                tokens: std::sync::atomic::AtomicU64::new(0),
                not_found_log: Mutex::new(seed::LogSummary::new(seed::NOT_FOUND_LOG_EVERY)),
                tasks: Tasks::new(),
                config,
            }),
        };

        let scanner = files.clone();
        files.inner.tasks.spawn(async move {
            scanner.rescan(true).await;
            // The index hears of the files once they are indexed.
            if let Some(server) = index_server {
                let inner = Arc::clone(&scanner.inner);
                scanner
                    .inner
                    .tasks
                    .spawn(index_client::run(inner, server, index_rx));
            }
            loop {
                tokio::time::sleep(RESCAN_INTERVAL).await;
                scanner.rescan(true).await;
            }
        });
        for download in pending {
            let spec = download::Spec {
                hash: download.hash,
                dir: download.dir,
                name: download.name,
                size: Some(download.size),
            };
            if let Err(e) = files.start_download(spec).await {
                files
                    .inner
                    .emit(FilesEvent::Warning(format!("download not resumed: {e}")))
                    .await;
            }
        }
        Ok((files, event_rx))
    }

    /// Re-indexes every shared folder: hashes new and changed files, forgets deleted ones.
    pub async fn rescan(&self, quiet: bool) {
        let shares = lock(&self.inner.store).shares();
        let shares = match shares {
            Ok(shares) => shares,
            Err(e) => {
                self.inner.emit(FilesEvent::Warning(e.to_string())).await;
                return;
            }
        };
        for root in shares {
            match self.index(root.clone()).await {
                Ok((summary, hashed)) => {
                    if !quiet || hashed > 0 {
                        self.inner
                            .emit(FilesEvent::Shared {
                                path: summary.path,
                                files: summary.files,
                                bytes: summary.bytes,
                                hashed,
                            })
                            .await;
                    }
                }
                Err(e) => {
                    self.inner
                        .emit(FilesEvent::Warning(format!(
                            "cannot index {}: {e}",
                            root.display()
                        )))
                        .await;
                }
            }
        }
    }

    /// Indexes one shared root (hashing in a blocking thread).
    async fn index(&self, root: PathBuf) -> Result<(ShareSummary, usize), FilesError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let (found, truncated) = share::walk(&root).map_err(|source| FilesError::Path {
                path: root.clone(),
                source,
            })?;
            if truncated {
                tracing::warn!(
                    root = %root.display(),
                    "more than {} files; the rest are not shared",
                    share::MAX_FILES_PER_SHARE
                );
            }
            let mut hashed = 0;
            let mut bytes = 0;
            for file in &found {
                bytes += file.size;
                if lock(&inner.store).cached(&file.path, file.size, file.mtime)? {
                    continue;
                }
                let outboard = match share::hash_file(&file.path) {
                    Ok(Some(outboard)) => outboard,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(path = %file.path.display(), error = %e, "not shared");
                        continue;
                    }
                };
                hashed += 1;
                let shared = SharedFile {
                    path: file.path.clone(),
                    root: root.clone(),
                    name: file.name.clone(),
                    size: file.size,
                    mtime: file.mtime,
                    hash: outboard.hash(),
                };
                lock(&inner.store).put_file(&shared, &outboard)?;
            }
            let paths: Vec<PathBuf> = found.iter().map(|f| f.path.clone()).collect();
            lock(&inner.store).prune(&root, &paths)?;
            Ok((
                ShareSummary {
                    path: root,
                    files: found.len(),
                    bytes,
                },
                hashed,
            ))
        })
        .await
        .map_err(|_| FilesError::Stopped)?
    }

    /// Shares a folder or file (indexing it now).
    pub async fn share(&self, path: &Path) -> Result<ShareSummary, FilesError> {
        let path = path.canonicalize().map_err(|source| FilesError::Share {
            path: path.to_owned(),
            source,
        })?;
        lock(&self.inner.store).add_share(&path)?;
        let (summary, _) = self.index(path).await?;
        Ok(summary)
    }

    /// Stops sharing a folder or file; false if it was not shared.
    pub fn unshare(&self, path: &Path) -> Result<bool, FilesError> {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        Ok(lock(&self.inner.store).remove_share(&path)?)
    }

    /// Shared folders, and every file shared.
    pub fn shared(&self) -> Result<(Vec<PathBuf>, Vec<SharedFile>), FilesError> {
        let store = lock(&self.inner.store);
        Ok((store.shares()?, store.files()?))
    }

    /// Floods a search for files whose names have every word of `text`; answers come as
    /// [`FilesEvent::SearchResults`]. Shared files of this node match too.
    pub async fn search(&self, text: &str) -> Result<Vec<Found>, FilesError> {
        let text = text.trim();
        if text.is_empty() || text.len() > MAX_SEARCH_TEXT {
            return Err(FilesError::Invalid(format!(
                "search for 1 to {MAX_SEARCH_TEXT} bytes of text"
            )));
        }
        let body = serde_json::to_value(Question::Search {
            text: text.to_owned(),
        })
        .unwrap_or(Value::Null);
        {
            let _asking = self.inner.asking.lock().await;
            let query_id = self
                .inner
                .node
                .query(crate::routed::SERVICE, body, SEARCH_TTL)
                .await
                .map_err(|_| FilesError::Stopped)?;
            push_bounded(
                &mut lock(&self.inner.searches),
                (query_id, text.to_owned(), 0),
                256,
            );
        }
        if let Some(index) = &self.inner.index {
            let _ = index.try_send(IndexCommand::Search(text.to_owned()));
        }
        Ok(self.local_matches(text)?)
    }

    fn local_matches(&self, text: &str) -> Result<Vec<Found>, StoreError> {
        Ok(lock(&self.inner.store)
            .files()?
            .into_iter()
            .filter(|f| msg::matches(&f.name, text))
            .take(MAX_RESULTS_PER_HIT)
            .map(|f| Found {
                name: f.name,
                size: f.size,
                hash: f.hash.to_hex(),
            })
            .collect())
    }

    /// Answers a `files` query that `src` asked through the overlay.
    pub async fn on_query(&self, query_id: &str, src: &str, body: &Value) {
        let Ok(question) = serde_json::from_value::<Question>(body.clone()) else {
            return;
        };
        if !lock(&self.inner.answer_budget).take() {
            return;
        }
        let found: Vec<Found> = match question {
            Question::DialBack {
                holder,
                hash,
                key,
                addrs,
                token,
                splice,
                relays,
            } => {
                if holder == self.inner.config.peer_id {
                    let inner = Arc::clone(&self.inner);
                    let asker = src.to_owned();
                    let request = DialBack {
                        hash,
                        key,
                        addrs,
                        token,
                        relays: splice.then_some(relays),
                    };
                    self.inner.tasks.spawn(async move {
                        inner.dial_back(&asker, request).await;
                    });
                }
                return;
            }
            Question::Search { text } if text.len() <= MAX_SEARCH_TEXT => {
                self.local_matches(&text).unwrap_or_default()
            }
            Question::Search { .. } => Vec::new(),
            Question::Holders { hash } => {
                let Some(hash) = Hash::from_hex(&hash) else {
                    return;
                };
                match lock(&self.inner.store).by_hash(&hash) {
                    Ok(Some((file, _))) => vec![Found {
                        name: file.name,
                        size: file.size,
                        hash: hash.to_hex(),
                    }],
                    _ => Vec::new(),
                }
            }
        };
        if found.is_empty() || self.inner.config.approval == Approval::None {
            return;
        }
        let listen = self.inner.config.listen;
        let answer = Answer {
            key: self.inner.config.key.to_string(),
            port: listen.map(|a| a.port()),
            addrs: listen
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.to_string())
                .into_iter()
                .collect(),
            files: found,
        };
        if let Ok(body) = serde_json::to_value(answer) {
            let _ = self.inner.node.answer(query_id, body).await;
        }
    }

    /// Takes an answer to one of our queries.
    pub async fn on_hit(&self, query_id: &str, holder: &str, body: &Value) {
        // A query being asked is recorded first.
        drop(self.inner.asking.lock().await);
        let Ok(answer) = serde_json::from_value::<Answer>(body.clone()) else {
            return;
        };
        let Ok(key) = PublicKey::parse(&answer.key) else {
            return;
        };
        let addrs = self.addresses(holder, &answer).await;
        let source = Source {
            peer_id: holder.to_owned(),
            key,
            addrs,
        };
        let files: Vec<Found> = answer
            .files
            .into_iter()
            .take(MAX_RESULTS_PER_HIT)
            .filter(|f| Hash::from_hex(&f.hash).is_some())
            .collect();
        {
            let mut results = lock(&self.inner.results);
            for file in &files {
                if let Some(hash) = Hash::from_hex(&file.hash) {
                    push_bounded(
                        &mut results,
                        Holding {
                            name: file.name.clone(),
                            size: file.size,
                            hash,
                            source: source.clone(),
                        },
                        RESULTS_KEPT,
                    );
                }
            }
        }
        for file in &files {
            let Some(hash) = Hash::from_hex(&file.hash) else {
                continue;
            };
            let download = lock(&self.inner.downloads).get(&hash).cloned();
            if let Some(download) = download {
                download.add_source(source.clone());
            }
        }
        let search = lock(&self.inner.searches)
            .iter_mut()
            .find(|(id, _, _)| id == query_id)
            .and_then(|(_, text, answers)| {
                *answers += 1;
                (*answers <= MAX_ANSWERS_PER_SEARCH).then(|| text.clone())
            });
        if let Some(text) = search {
            self.inner
                .emit(FilesEvent::SearchResults {
                    text,
                    holder: holder.to_owned(),
                    files,
                })
                .await;
        }
    }

    /// Where to open a stream to `holder`: the addresses it gave, and the addresses the
    /// node knows for it with the port it gave.
    async fn addresses(&self, holder: &str, answer: &Answer) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> =
            answer.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if let (Some(port), Ok(snapshot)) = (answer.port, self.inner.node.snapshot().await) {
            let ips: Vec<IpAddr> = snapshot
                .known
                .iter()
                .filter(|(peer, _)| peer == holder)
                .map(|(_, a)| a.ip())
                .chain(
                    snapshot
                        .neighbours
                        .iter()
                        .filter(|n| n.peer == holder)
                        .map(|n| n.addr.ip()),
                )
                .collect();
            for ip in ips {
                let addr = SocketAddr::new(ip, port);
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        addrs.truncate(4);
        addrs
    }

    /// Starts (or joins) the download of `target`: a hex hash, or a name a search found
    /// (it must name one content, or one course peer's file). Goes to `dir`, or the
    /// download folder. Returns what is downloaded: the hash, or the course peer's address.
    pub async fn get(&self, target: &str, dir: Option<PathBuf>) -> Result<String, FilesError> {
        let dir = dir.unwrap_or_else(|| self.inner.config.download_dir.clone());
        std::fs::create_dir_all(&dir).map_err(|source| FilesError::Path {
            path: dir.clone(),
            source,
        })?;
        if target.trim().ends_with('/') {
            return self.get_folder(target.trim(), dir).await;
        }
        let (hash, name, size) = match self.resolve_target(target) {
            Ok(found) => found,
            Err(error) => {
                let seed = lock(&self.inner.seed_results)
                    .iter()
                    .rev()
                    .find(|h| h.name == target.trim())
                    .cloned();
                let Some(seed) = seed else {
                    return Err(error);
                };
                let inner = Arc::clone(&self.inner);
                self.inner
                    .tasks
                    .spawn(seed::fetch(inner, seed.addr, seed.name, dir));
                return Ok(format!("from course peer {}", seed.addr));
            }
        };
        let spec = download::Spec {
            hash,
            dir,
            name,
            size,
        };
        self.start_download(spec).await?;
        Ok(hash.to_hex())
    }

    /// Leaves the index, if one is joined (waiting [`LEAVE_WAIT`] at most for its answer),
    /// then stops every task the service started and joins them ([`SHUTDOWN_GRACE`] at
    /// most, then the rest are aborted). Downloads stop where they are and resume at the
    /// next start.
    pub async fn shutdown(&self) {
        if let Some(index) = &self.inner.index {
            let (done, left) = oneshot::channel();
            if index.send(IndexCommand::Leave(done)).await.is_ok() {
                let _ = tokio::time::timeout(LEAVE_WAIT, left).await;
            }
        }
        self.inner.tasks.shutdown(SHUTDOWN_GRACE).await;
    }

    /// Starts the download of every file a search found under `folder` (`name/`), keeping
    /// its structure.
    async fn get_folder(&self, folder: &str, dir: PathBuf) -> Result<String, FilesError> {
        let mut files: Vec<(Hash, String, u64)> = lock(&self.inner.results)
            .iter()
            .filter(|h| h.name.starts_with(folder))
            .map(|h| (h.hash, h.name.clone(), h.size))
            .collect();
        files.sort();
        files.dedup_by_key(|(hash, _, _)| *hash);
        if files.is_empty() {
            return Err(FilesError::Invalid(format!(
                "no search result is in {folder:?}; /search first"
            )));
        }
        let count = files.len();
        for (hash, name, size) in files {
            self.start_download(download::Spec {
                hash,
                dir: dir.clone(),
                name,
                size: Some(size),
            })
            .await?;
        }
        Ok(format!("{count} files"))
    }

    /// Starts the download of `hash` under `name` (a ticket's), of `size` bytes.
    pub async fn get_named(
        &self,
        hash: Hash,
        name: &str,
        size: u64,
        dir: Option<PathBuf>,
    ) -> Result<(), FilesError> {
        let dir = dir.unwrap_or_else(|| self.inner.config.download_dir.clone());
        self.start_download(download::Spec {
            hash,
            dir,
            name: name.to_owned(),
            size: Some(size),
        })
        .await
    }

    fn resolve_target(&self, target: &str) -> Result<(Hash, String, Option<u64>), FilesError> {
        let target = target.trim();
        let results = lock(&self.inner.results);
        if let Some(hash) = Hash::from_hex(target) {
            let known = results.iter().rev().find(|h| h.hash == hash);
            let name = known.map_or_else(|| hash.to_hex(), |h| h.name.clone());
            return Ok((hash, name, known.map(|h| h.size)));
        }
        let exact: Vec<&Holding> = results.iter().filter(|h| h.name == target).collect();
        let candidates: Vec<&Holding> = if exact.is_empty() {
            results
                .iter()
                .filter(|h| msg::matches(&h.name, target))
                .collect()
        } else {
            exact
        };
        let hashes: HashSet<Hash> = candidates.iter().map(|h| h.hash).collect();
        match (hashes.len(), candidates.first()) {
            (1, Some(h)) => Ok((h.hash, h.name.clone(), Some(h.size))),
            (0, _) => Err(FilesError::Invalid(format!(
                "no search result is named {target:?}; /search first, or /get HASH"
            ))),
            (n, _) => Err(FilesError::Invalid(format!(
                "{n} different files match {target:?}; /get one of their hashes"
            ))),
        }
    }

    pub(crate) async fn start_download(&self, spec: download::Spec) -> Result<(), FilesError> {
        let download = {
            let mut downloads = lock(&self.inner.downloads);
            if downloads.contains_key(&spec.hash) {
                return Ok(());
            }
            if downloads.len() >= MAX_DOWNLOADS {
                return Err(FilesError::Invalid(format!(
                    "{MAX_DOWNLOADS} downloads are running; wait for one to finish"
                )));
            }
            let download = Arc::new(Download::new(spec));
            downloads.insert(download.hash(), Arc::clone(&download));
            download
        };
        for source in self.inner.sources_of(&download.hash()) {
            download.add_source(source);
        }
        let inner = Arc::clone(&self.inner);
        self.inner.tasks.spawn(download::run(inner, download));
        Ok(())
    }

    /// Adds a holder to a download (from a ticket).
    pub fn add_source(&self, hash: Hash, source: Source) {
        let download = lock(&self.inner.downloads).get(&hash).cloned();
        match download {
            Some(download) => download.add_source(source),
            None => push_bounded(
                &mut lock(&self.inner.results),
                Holding {
                    name: hash.to_hex(),
                    size: 0,
                    hash,
                    source,
                },
                RESULTS_KEPT,
            ),
        }
    }

    /// The downloads running.
    pub fn downloads(&self) -> Vec<DownloadInfo> {
        lock(&self.inner.downloads)
            .values()
            .map(|d| d.info())
            .collect()
    }

    /// Approves request `id`; false if no such request waits.
    pub fn approve(&self, id: u64) -> bool {
        self.answer_approval(id, true)
    }

    /// Denies request `id`; false if no such request waits.
    pub fn deny(&self, id: u64) -> bool {
        self.answer_approval(id, false)
    }

    fn answer_approval(&self, id: u64, yes: bool) -> bool {
        lock(&self.inner.approvals)
            .pending
            .remove(&id)
            .is_some_and(|reply| reply.send(yes).is_ok())
    }
}

impl Inner {
    /// Decides whether `key` may download `file`: by policy, or by asking the user (the
    /// stream is told to wait meanwhile).
    pub(crate) async fn approve(
        &self,
        peer: &str,
        key: Option<PublicKey>,
        file: &SharedFile,
        stream: Option<&mut DataStream>,
    ) -> bool {
        match self.config.approval {
            Approval::All => true,
            Approval::None => false,
            Approval::Trusted => key.is_some_and(|k| self.config.trusted.contains(&k)),
            Approval::Ask => {
                let (id, answer) = {
                    let mut approvals = lock(&self.approvals);
                    if approvals.granted.contains(&(key, file.hash)) {
                        return true;
                    }
                    if approvals.pending.len() >= MAX_PENDING_APPROVALS {
                        return false;
                    }
                    let id = approvals.next;
                    approvals.next += 1;
                    let (reply, answer) = oneshot::channel();
                    approvals.pending.insert(id, reply);
                    (id, answer)
                };
                if let Some(stream) = stream {
                    let wait = msg::line(&msg::Reply::Wait { request: id });
                    if stream.write_all(&wait).await.is_err() {
                        lock(&self.approvals).pending.remove(&id);
                        return false;
                    }
                }
                self.emit(FilesEvent::ApprovalRequest {
                    id,
                    peer: peer.to_owned(),
                    key,
                    name: file.name.clone(),
                    size: file.size,
                    hash: file.hash,
                })
                .await;
                let yes = matches!(
                    tokio::time::timeout(serve::APPROVAL_TIMEOUT, answer).await,
                    Ok(Ok(true))
                );
                let mut approvals = lock(&self.approvals);
                approvals.pending.remove(&id);
                if yes {
                    if approvals.granted.len() >= GRANTS_KEPT {
                        approvals.granted.clear();
                    }
                    approvals.granted.insert((key, file.hash));
                }
                yes
            }
        }
    }
}
