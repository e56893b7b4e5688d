//! The file-sharing service: the handle interfaces call, and its state. It talks to the
//! network only through the node's API (queries, answers, data streams).
//!
//! Bounds: [`MAX_DOWNLOADS`] downloads at once, [`MAX_SERVING`] streams served at once and
//! [`MAX_STREAMS_PER_PEER`] per peer (one more is answered `busy`), [`MAX_PENDING_APPROVALS`]
//! requests waiting for the user (more are denied), [`RESULTS_KEPT`] search results
//! remembered, events to the interface up to [`EVENTS`] (progress events are dropped when
//! the interface lags; the others wait). Shutdown waits [`LEAVE_WAIT`] for the index and
//! [`SHUTDOWN_GRACE`] for the service's tasks, then aborts those left.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use teia_core::identity::PublicKey;
use teia_node::node::NodeHandle;
use tokio::sync::{mpsc, oneshot};

use crate::download::{self, Download, DownloadInfo, Source};
use crate::findings::{Findings, Holding};
use crate::index_client;
use crate::limits::{Budget, LogSummary, Serving, Throttle};
use crate::proto::msg::{self, Answer, Found, Question, MAX_RESULTS_PER_HIT, MAX_SEARCH_TEXT};
use crate::proto::tree::Hash;
use crate::seed;
use crate::serve;
use crate::share;
use crate::store::{FileStore, SharedFile, StoreError};
use crate::tasks::Tasks;
use teia_node::sync::lock;

use crate::approvals::{Approvals, PendingApproval};
use crate::dial_back::DialBacks;
pub use crate::state::{
    reachable, Approval, FilesConfig, FilesError, FilesEvent, UnknownApproval, ANSWERS_PER_SECOND,
    APPROVAL_TIMEOUT, DIAL_BACKS_PER_MINUTE, DIAL_BACK_TIMEOUT, EVENTS, GRANTS_KEPT, LEAVE_WAIT,
    MAX_ANSWERS_PER_SEARCH, MAX_DIAL_BACKS_WAITING, MAX_DOWNLOADS, MAX_PENDING_APPROVALS,
    MAX_SERVING, MAX_STREAMS_PER_PEER, RESCAN_INTERVAL, RESULTS_KEPT, SEARCH_TTL, SHUTDOWN_GRACE,
};
use crate::state::{DialBack, IndexCommand, Inner, INDEX_COMMANDS};

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
        let (index, index_rx) = mpsc::channel(INDEX_COMMANDS);
        let index_server = config.index.clone();
        let files = Self {
            inner: Arc::new(Inner {
                node,
                store: Mutex::new(store),
                events,
                downloads: Mutex::new(HashMap::new()),
                findings: Mutex::new(Findings::default()),
                approvals: Mutex::new(Approvals::default()),
                serving: Mutex::new(Serving::default()),
                asking: tokio::sync::Mutex::new(()),
                throttle: config.upload_limit.map(Throttle::new),
                index: index_server.is_some().then_some(index),
                dial_backs: Mutex::new(DialBacks::default()),
                answer_budget: Mutex::new(Budget::new(ANSWERS_PER_SECOND, ANSWERS_PER_SECOND)),
                not_found_log: Mutex::new(LogSummary::new(seed::NOT_FOUND_LOG_EVERY)),
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
                .query(msg::SERVICE, body, SEARCH_TTL)
                .await
                .map_err(|_| FilesError::Stopped)?;
            lock(&self.inner.findings).asked(query_id, text.to_owned());
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
                        serve::dial_back(&inner, &asker, request).await;
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
            let mut findings = lock(&self.inner.findings);
            for file in &files {
                if let Some(hash) = Hash::from_hex(&file.hash) {
                    findings.remember(Holding {
                        name: file.name.clone(),
                        size: file.size,
                        hash,
                        source: source.clone(),
                    });
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
        let search = lock(&self.inner.findings).answered(query_id);
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
        std::fs::create_dir_all(&dir).map_err(|source| FilesError::DownloadDir {
            path: dir.clone(),
            source,
        })?;
        if target.trim().ends_with('/') {
            return self.get_folder(target.trim(), dir).await;
        }
        let (hash, name, size) = match self.resolve_target(target) {
            Ok(found) => found,
            Err(error) => {
                let holders = lock(&self.inner.findings).seed_holders(target.trim());
                let Some(first) = holders.first().map(|h| h.addr) else {
                    return Err(error);
                };
                let inner = Arc::clone(&self.inner);
                let name = target.trim().to_owned();
                self.inner
                    .tasks
                    .spawn(seed::fetch(inner, holders, name, dir));
                return Ok(format!("from course peer {first}"));
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
        let mut files: Vec<(Hash, String, u64)> = lock(&self.inner.findings)
            .holdings()
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
        let findings = lock(&self.inner.findings);
        if let Some(hash) = Hash::from_hex(target) {
            let known = findings.holdings().rev().find(|h| h.hash == hash);
            let name = known.map_or_else(|| hash.to_hex(), |h| h.name.clone());
            return Ok((hash, name, known.map(|h| h.size)));
        }
        let exact: Vec<&Holding> = findings.holdings().filter(|h| h.name == target).collect();
        let candidates: Vec<&Holding> = if exact.is_empty() {
            findings
                .holdings()
                .filter(|h| msg::matches(&h.name, target))
                .collect()
        } else {
            exact
        };
        let hashes: HashSet<Hash> = candidates.iter().map(|h| h.hash).collect();
        match (hashes.len(), candidates.first()) {
            (1, Some(h)) => Ok((h.hash, h.name.clone(), Some(h.size))),
            (0, _) => Err(FilesError::Invalid(format!(
                "no search result is named {target:?}; search first, or give its hash"
            ))),
            (n, _) => Err(FilesError::Invalid(format!(
                "{n} different files match {target:?}; give one of their hashes"
            ))),
        }
    }

    pub(crate) async fn start_download(&self, spec: download::Spec) -> Result<(), FilesError> {
        let download = {
            let mut downloads = lock(&self.inner.downloads);
            if let Some(running) = downloads.get(&spec.hash) {
                if running.cancel.is_cancelled() {
                    return Err(FilesError::Invalid(format!(
                        "the download of {} is being cancelled; ask again in a moment",
                        spec.hash.to_hex()
                    )));
                }
                return Ok(());
            }
            if downloads.len() >= MAX_DOWNLOADS {
                return Err(FilesError::Busy(MAX_DOWNLOADS));
            }
            let download = Arc::new(Download::new(spec));
            downloads.insert(download.hash(), Arc::clone(&download));
            download
        };
        for source in self.inner.sources_of(&download.hash()) {
            download.add_source(source);
        }
        let inner = Arc::clone(&self.inner);
        self.inner.tasks.spawn(crate::fetch::run(inner, download));
        Ok(())
    }

    /// Adds a holder to a download (from a ticket).
    pub fn add_source(&self, hash: Hash, source: Source) {
        let download = lock(&self.inner.downloads).get(&hash).cloned();
        match download {
            Some(download) => download.add_source(source),
            None => lock(&self.inner.findings).remember(Holding {
                name: hash.to_hex(),
                size: 0,
                hash,
                source,
            }),
        }
    }

    /// The downloads running.
    pub fn downloads(&self) -> Vec<DownloadInfo> {
        lock(&self.inner.downloads)
            .values()
            .map(|d| d.info())
            .collect()
    }

    /// Cancels the download of `hash`: its holders are let go, and what it fetched is
    /// deleted (it ends with a [`FilesEvent::Failed`] saying `cancelled`); false if no such
    /// download runs.
    pub fn cancel(&self, hash: Hash) -> bool {
        let download = lock(&self.inner.downloads).get(&hash).cloned();
        download.is_some_and(|download| {
            download.cancel.cancel();
            true
        })
    }

    /// The download requests waiting for the user's answer (under `--approve ask`).
    pub fn pending_approvals(&self) -> Vec<PendingApproval> {
        lock(&self.inner.approvals).pending()
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
        lock(&self.inner.approvals).answer(id, yes)
    }
}
