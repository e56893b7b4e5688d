//! The file-sharing service's shared state: the parts the handle ([`crate::service`]), the
//! downloads ([`crate::fetch`]), serving ([`crate::serve`]), course peers ([`crate::seed`])
//! and the index link ([`crate::index_client`]) share, and the few operations that span
//! them (asking a holder to dial back, deciding an approval). Each part is one owner type
//! behind a lock of its own, its methods in its own module: the share index
//! ([`crate::store`]), search findings ([`crate::findings`]), approvals
//! ([`crate::approvals`]), dial-backs ([`crate::dial_back`]), streams served and rates
//! ([`crate::limits`]). The modules that work on this state depend on it; it depends on
//! none of them.
//!
//! Bounds: [`MAX_DOWNLOADS`] downloads at once, [`MAX_SERVING`] streams served at once and
//! [`MAX_STREAMS_PER_PEER`] per peer (one more is answered `busy`), [`MAX_PENDING_APPROVALS`]
//! requests waiting for the user (more are denied), [`RESULTS_KEPT`] search results
//! remembered, events to the interface up to [`EVENTS`] (progress events are dropped when
//! the interface lags; the others wait).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use teia_core::identity::PublicKey;
use teia_node::node::NodeHandle;
use teia_node::stream::DataStream;
use tokio::sync::{mpsc, oneshot};

use crate::approvals::{Approvals, Asked};
pub use crate::approvals::{APPROVAL_TIMEOUT, GRANTS_KEPT, MAX_PENDING_APPROVALS};
pub(crate) use crate::dial_back::DialBack;
use crate::dial_back::DialBacks;
pub use crate::dial_back::{DIAL_BACKS_PER_MINUTE, DIAL_BACK_TIMEOUT, MAX_DIAL_BACKS_WAITING};
use crate::download::{DialBackError, Download, DownloadInfo, Source};
use crate::findings::{Findings, Holding, SeedHolding};
pub use crate::findings::{MAX_ANSWERS_PER_SEARCH, RESULTS_KEPT};
use crate::limits::{Budget, LogSummary, Serving, Throttle};
pub use crate::limits::{MAX_SERVING, MAX_STREAMS_PER_PEER};
use crate::proto::msg::{self, Found, Question};
use crate::proto::tree::Hash;
use crate::store::{FileStore, SharedFile, StoreError};
use crate::tasks::Tasks;
use teia_node::sync::lock;

/// Downloads running at once; one more is refused.
pub const MAX_DOWNLOADS: usize = 16;
/// Events waiting for the interface.
pub const EVENTS: usize = 1_024;
/// Queries this node answers per second at most (burst as many); beyond, it stays silent.
pub const ANSWERS_PER_SECOND: f64 = 50.0;
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

/// Commands waiting for the index link.
pub const INDEX_COMMANDS: usize = 32;

/// What the service asks of its index link.
pub(crate) enum IndexCommand {
    /// Search by name.
    Search(String),
    /// Leave the index and stop.
    Leave(oneshot::Sender<()>),
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

impl FilesConfig {
    /// A node that shares `shares` with anyone (`--approve all`), with no upload limit and
    /// no index server: `teia node`'s defaults, its database at `db` and its downloads in
    /// `download_dir`.
    pub fn defaults(
        db: PathBuf,
        download_dir: PathBuf,
        shares: Vec<PathBuf>,
        (key, peer_id): (PublicKey, String),
        listen: Option<SocketAddr>,
    ) -> Self {
        Self {
            db,
            shares,
            approval: Approval::All,
            trusted: Vec::new(),
            download_dir,
            listen,
            key,
            upload_limit: None,
            peer_id,
            index: None,
        }
    }
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
        /// The file was already there, whole and verified: nothing was fetched.
        already_here: bool,
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
        /// It could be neither dialed nor reached another way (it is gone, or a firewall is
        /// in the way), rather than refusing or failing on its stream.
        unreachable: bool,
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
    /// A stream that served one of our files to a peer ended (a download may use several).
    Served {
        /// Who fetched.
        peer: String,
        /// The file's name.
        name: String,
        /// Its size.
        size: u64,
        /// Bytes of it sent on this stream.
        bytes: u64,
        /// Time the stream served, from its first byte.
        seconds: f64,
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
        /// The largest size the index listed for this name, when it is not `bytes`: the
        /// copy may be partial (a course peer's file has no hash to check it by).
        expected: Option<u64>,
    },
    /// A download from a course peer failed.
    SeedFailed {
        /// The file's name.
        name: String,
        /// The last course peer tried.
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
    /// The download folder cannot be made.
    #[error("cannot make the download folder {path}: {source}", path = .path.display())]
    DownloadDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// As many downloads as may run at once are running.
    #[error("{0} downloads are running; wait for one to finish")]
    Busy(usize),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) struct Inner {
    pub(crate) node: NodeHandle,
    pub(crate) store: Mutex<FileStore>,
    pub(crate) events: mpsc::Sender<FilesEvent>,
    pub(crate) config: FilesConfig,
    pub(crate) downloads: Mutex<HashMap<Hash, Arc<Download>>>,
    /// What our searches found: searches asked, holders heard, course peers' files.
    pub(crate) findings: Mutex<Findings>,
    /// Requests waiting for the user, and grants ([`Approval::Ask`]).
    pub(crate) approvals: Mutex<Approvals>,
    /// Streams served now, per peer.
    pub(crate) serving: Mutex<Serving>,
    /// Held while a search of ours is asked and recorded in `findings`; an answer waits for
    /// it, so it is never taken for an answer to an unknown search because it came back
    /// before its search was recorded.
    pub(crate) asking: tokio::sync::Mutex<()>,
    pub(crate) throttle: Option<Throttle>,
    pub(crate) index: Option<mpsc::Sender<IndexCommand>>,
    /// Our dial-back requests waiting for their stream, and the streams we may open back.
    pub(crate) dial_backs: Mutex<DialBacks>,
    /// Queries we may still answer ([`ANSWERS_PER_SECOND`]).
    pub(crate) answer_budget: Mutex<Budget>,
    /// Requests of course peers for files not shared, for their summarised log line.
    pub(crate) not_found_log: Mutex<LogSummary>,
    /// Every task the service starts, stopped and joined at shutdown.
    pub(crate) tasks: Tasks,
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
        let ask = lock(&self.dial_backs).token(&self.config.key);
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
                    .open_spliced_stream(&relay, &holder, &ask, msg::SERVICE, key)
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
        let _ = self.node.query(msg::SERVICE, body, SEARCH_TTL).await;
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
        let (token, stream) = {
            let mut dial_backs = lock(&self.dial_backs);
            let token = dial_backs.token(&self.config.key);
            let stream = dial_backs
                .expect(&token, source.key)
                .ok_or(DialBackError::TooMany)?;
            (token, stream)
        };
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
            .query(msg::SERVICE, body, SEARCH_TTL)
            .await
            .is_err()
        {
            lock(&self.dial_backs).forget(&token);
            return Err(DialBackError::NodeStopped);
        }
        let result = tokio::time::timeout(DIAL_BACK_TIMEOUT, stream).await;
        lock(&self.dial_backs).forget(&token);
        match result {
            Ok(Ok(stream)) => Ok(stream),
            _ => Err(DialBackError::NoStreamBack),
        }
    }

    pub(crate) fn node_peer_id(&self) -> String {
        self.config.peer_id.clone()
    }

    pub(crate) fn remember(&self, holding: Holding) {
        lock(&self.findings).remember(holding);
    }

    pub(crate) fn remember_seed(&self, holding: SeedHolding) {
        lock(&self.findings).remember_seed(holding);
    }

    pub(crate) async fn emit(&self, event: FilesEvent) {
        let _ = self.events.send(event).await;
    }

    pub(crate) fn emit_progress(&self, event: FilesEvent) {
        let _ = self.events.try_send(event);
    }

    /// Holders of `hash` heard in answers.
    pub(crate) fn sources_of(&self, hash: &Hash) -> Vec<Source> {
        lock(&self.findings).sources_of(hash)
    }

    /// Asks the network who holds `hash`; answers reach the download as new holders.
    pub(crate) async fn ask_holders(&self, hash: Hash) {
        let body = serde_json::to_value(Question::Holders {
            hash: hash.to_hex(),
        })
        .unwrap_or(Value::Null);
        // Answers are matched to the download by the hashes they hold, not by the query.
        let _ = self.node.query(msg::SERVICE, body, SEARCH_TTL).await;
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
                let asked = crate::approvals::PendingApproval {
                    id: 0,
                    peer: peer.to_owned(),
                    key: key.map(|k| k.to_string()),
                    name: file.name.clone(),
                    size: file.size,
                    hash: file.hash.to_hex(),
                };
                let asked = lock(&self.approvals).ask(key, file.hash, asked);
                let (id, answer) = match asked {
                    Asked::Granted => return true,
                    Asked::Full => return false,
                    Asked::Waiting(id, answer) => (id, answer),
                };
                if let Some(stream) = stream {
                    let wait = msg::line(&msg::Reply::Wait { request: id });
                    if stream.write_all(&wait).await.is_err() {
                        lock(&self.approvals).settle(id, false, key, file.hash);
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
                    tokio::time::timeout(APPROVAL_TIMEOUT, answer).await,
                    Ok(Ok(true))
                );
                lock(&self.approvals).settle(id, yes, key, file.hash);
                yes
            }
        }
    }
}
