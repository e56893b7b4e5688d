//! The job engine across nodes: owners announce waiting modules, idle workers of nodes
//! that trust them pull modules (TASK_REQUEST → TASK_SEND), renew their lease every second
//! while they run (TASK_RENEW, twice a second) and return the result (TASK_RESULT); an
//! owner takes back a lease not renewed for [`REMOTE_LEASE_MS`] (checked every
//! [`EXPIRE_EVERY`]), so a worker that dies is replaced within about 2.5 s. Workers fetch a project's packed bytes from its owner on a `jobs` data stream,
//! check them against their BLAKE3 hash, and keep them per hash.
//!
//! Trust: a node runs modules only for owners it trusts, and hands modules only to workers
//! it trusts: itself, the keys given with `--trust`, or nodes proving the same
//! `--cluster-secret` bound to their key. Such a node becomes a *member* once its
//! CLUSTER_HELLO, signed by its key, proved it; every other job message is then accepted
//! only from a member, by the key that proved its origin, and sent only to members (nothing
//! of the engine is flooded). A result counts only from the worker holding that module's
//! lease for its current attempt. Refusals are logged once per sender every
//! [`REFUSAL_LOG_EVERY`], with how many there were.
//!
//! These rules, failure detection of owners and elections are decided by the sans-IO
//! [`crate::proto::cluster::ClusterRules`] (one lock, the time passed in); this module sends, opens streams,
//! runs modules and logs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use teia_core::identity::PublicKey;
use teia_node::stream::{DataStream, StreamError};
use tokio::sync::oneshot;

use crate::bundle::BundleError;
use teia_node::sync::lock;

use crate::cluster::Cluster;
pub use crate::cluster::{ClusterConfig, MAX_HELD_BLOBS, MAX_HOLDERS, MAX_WAITING};
use crate::engine::Engine;
use crate::proto::cluster::{ElectionOutcome, Suspicion, Verdict};
pub use crate::proto::cluster::{
    ELECTION_TIME, HELLO_EVERY, MAX_OWNERS, MEMBER_FRESH, OWNER_FRESH, OWNER_GONE,
    REFUSAL_LOG_EVERY, REMOTE_LEASE_MS, STATUS_FRESH,
};
use crate::proto::ledger::{EvalId, Lease};
use crate::proto::messages::{self, JobMessage, SERVICE};
pub use crate::transfer::MAX_BLOB;
use crate::transfer::{fetch_blob, read_sized, send_file, TransferError, MAX_HEAD, SERVE_PIECE};

/// Time between two renewals by a worker.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// Time between two checks for leases past their deadline.
pub const EXPIRE_EVERY: Duration = Duration::from_millis(250);
/// Time between two announcements by an owner with waiting modules.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// Time a worker waits for an owner's answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// Time between two status floods of a node.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Period of the watch on owners that stopped answering and on elections.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Time a `jobs` stream's opener has to say what it wants.
pub const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// Holders a worker tries before the owner.
const HOLDERS_TRIED: usize = 2;

/// Why a member could not be reached, or a project or ledger not fetched from one.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The peer has not proved itself a member.
    #[error("{0} is not a proven member of this cluster")]
    NotMember(String),
    /// No address of the peer is known.
    #[error("no address")]
    NoAddress,
    /// An address of the peer answered as another node.
    #[error("{addr} is {found}, not {wanted}")]
    WrongPeer {
        /// The address.
        addr: SocketAddr,
        /// The node that answered.
        found: String,
        /// The node wanted.
        wanted: String,
    },
    /// A stream to the peer could not be opened.
    #[error("{peer}: {source}")]
    Open {
        /// The peer.
        peer: String,
        /// Why.
        source: StreamError,
    },
    /// The peer did not send what was asked.
    #[error("{peer}: {source}")]
    Fetch {
        /// The peer.
        peer: String,
        /// Why.
        source: TransferError,
    },
    /// The exchange on an open stream failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A file on this node could not be written.
    #[error("{0}")]
    Disk(#[from] std::io::Error),
    /// A project's bytes are not a project.
    #[error(transparent)]
    Unpack(#[from] BundleError),
    /// A project unpacked could not be put in its place.
    #[error("cannot store the project")]
    NotStored,
    /// A ledger pulled is not one.
    #[error("{0}")]
    BadLedger(#[from] serde_json::Error),
}

impl Engine {
    /// The statuses of the other nodes heard from lately.
    pub(crate) fn heard_statuses(&self) -> Vec<JobMessage> {
        self.cluster
            .as_ref()
            .map(|cluster| cluster.rules().statuses(Instant::now()))
            .unwrap_or_default()
    }

    /// `GET /network`: each node of the cluster's overlay address and the addresses of the
    /// nodes of the cluster it has links to (this node's from its links, the others' from
    /// their statuses): strangers are not shown.
    pub async fn network(&self) -> serde_json::Value {
        let mut addresses: HashMap<String, String> = HashMap::new();
        let mut graph: Vec<(String, Vec<String>)> = Vec::new();
        for status in self.heard_statuses() {
            if let JobMessage::NodeStatus {
                peer_id,
                address,
                neighbours,
                ..
            } = status
            {
                addresses.insert(peer_id, address.clone());
                graph.push((address, neighbours));
            }
        }
        let mut map = serde_json::Map::new();
        if let Some(cluster) = &self.cluster {
            if let Ok(snapshot) = cluster.config.node.snapshot().await {
                let links: Vec<serde_json::Value> = snapshot
                    .neighbours
                    .iter()
                    .filter(|n| cluster.member_key(&n.peer).is_some())
                    .map(|n| {
                        addresses
                            .get(&n.peer)
                            .cloned()
                            .unwrap_or_else(|| n.addr.to_string())
                            .into()
                    })
                    .collect();
                map.insert(self.config.address.clone(), links.into());
            }
        }
        for (address, neighbours) in graph {
            let links: Vec<serde_json::Value> = neighbours
                .iter()
                .filter_map(|peer| {
                    if *peer == self.config.node {
                        Some(self.config.address.clone().into())
                    } else {
                        addresses.get(peer).cloned().map(Into::into)
                    }
                })
                .collect();
            map.insert(address, links.into());
        }
        serde_json::Value::Object(map)
    }

    /// Starts the owner's and worker's background tasks of the cluster.
    pub(crate) fn start_cluster(&self) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let expirer = self.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::time::sleep(EXPIRE_EVERY).await;
                expirer.expire_leases();
            }
        });
        let reporter = self.clone();
        let reporter_cluster = Arc::clone(&cluster);
        self.tasks.spawn(async move {
            loop {
                tokio::time::sleep(STATUS_EVERY).await;
                let neighbours = match reporter_cluster.config.node.snapshot().await {
                    Ok(snapshot) => snapshot.neighbours.iter().map(|n| n.peer.clone()).collect(),
                    Err(_) => return,
                };
                let status = reporter.own_status(neighbours);
                reporter_cluster.to_members(&status).await;
            }
        });
        let watcher = self.clone();
        let watched = Arc::clone(&cluster);
        self.tasks.spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                watcher.watch_suspects(&watched).await;
            }
        });
        let owner = self.clone();
        self.tasks.spawn(async move {
            let scripts = cluster.config.scripts.clone();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(ANNOUNCE_EVERY) => {}
                    () = cluster.announce_now.notified() => {}
                    () = scripts_queued(scripts.as_ref()) => {}
                }
                cluster.greet_candidates().await;
                if owner.config.modules {
                    owner.replicate_and_watch(&cluster).await;
                }
                let unfinished = owner.unfinished();
                if let Some(scripts) = &scripts {
                    scripts.set_cluster_members(cluster.member_count());
                }
                let waiting_scripts = scripts.as_ref().map_or(0, |m| m.waiting());
                if unfinished == 0 && waiting_scripts == 0 {
                    continue;
                }
                let announce = JobMessage::TaskAnnounce {
                    owner: owner.config.node.clone(),
                    port: cluster.config.node.listen_addr().map(|a| a.port()),
                    pending: owner.pending_modules(),
                    unfinished,
                    scripts: waiting_scripts,
                };
                cluster.to_members(&announce).await;
            }
        });
    }

    /// Pulls the ledgers of the owners whose evaluations we replicate (and the projects
    /// they need), and starts an election for the evaluations of an owner that stopped
    /// answering for [`OWNER_GONE`].
    pub(crate) async fn replicate_and_watch(&self, cluster: &Cluster) {
        let owners = cluster.rules().to_replicate(Instant::now());
        for owner in owners {
            self.replicate_from(cluster, owner).await;
        }
        self.count_votes(cluster).await;
    }

    /// Every [`WATCH_EVERY`]: pulls again from the owners whose last pull failed (so that
    /// one gone is found [`OWNER_GONE`] after it last answered, not up to a period later),
    /// and closes the elections whose time is up.
    async fn watch_suspects(&self, cluster: &Cluster) {
        let suspects = cluster.rules().suspects();
        for owner in suspects {
            self.replicate_from(cluster, owner).await;
        }
        self.count_votes(cluster).await;
    }

    /// Pulls `owner`'s ledger; when it has not answered for [`OWNER_GONE`], stands for
    /// its evaluations.
    async fn replicate_from(&self, cluster: &Cluster, owner: String) {
        let port = cluster.rules().port(&owner);
        let Err(e) = self.pull_ledger(cluster, &owner, port).await else {
            cluster.rules().pulled(&owner, Instant::now());
            return;
        };
        let replicas: Vec<EvalId> = self
            .replicas_owned_by(&owner)
            .into_iter()
            .map(|(eval, _)| eval)
            .collect();
        let suspicion = cluster
            .rules()
            .pull_failed(&owner, &replicas, Instant::now());
        match suspicion {
            Suspicion::Gone { stand } => {
                tracing::warn!(%owner, error = %e, "an owner is gone; electing a new one");
                for eval in stand {
                    let candidacy = JobMessage::RecoveryElection {
                        eval,
                        candidate: self.config.node.clone(),
                    };
                    cluster.to_members(&candidacy).await;
                }
            }
            Suspicion::Waiting | Suspicion::Forgotten => {
                tracing::debug!(%owner, error = %e, "replication failed");
            }
        }
    }

    /// Closes the elections whose candidacies are in: the lowest peer id takes over.
    async fn count_votes(&self, cluster: &Cluster) {
        let outcomes = cluster.rules().count_votes(Instant::now());
        for outcome in outcomes {
            let ElectionOutcome::Won(eval) = outcome else {
                continue;
            };
            self.take_over(eval);
            let update = JobMessage::EvaluationResponsibilityUpdate {
                eval,
                owner: self.config.node.clone(),
            };
            cluster.to_members(&update).await;
        }
    }

    /// Fetches `owner`'s unfinished evaluations and the projects we lack.
    async fn pull_ledger(
        &self,
        cluster: &Cluster,
        owner: &str,
        port: Option<u16>,
    ) -> Result<(), RemoteError> {
        let mut stream = self.open_to(cluster, owner, port).await?;
        let request = serde_json::json!({"ledger": true, "proof": cluster.proof()});
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(TransferError::from)?;
        let bytes = read_sized(&mut stream).await?;
        self.traffic.fetched(bytes.len() as u64);
        let evaluations: Vec<crate::proto::ledger::Evaluation> = serde_json::from_slice(&bytes)?;
        let blobs: Vec<String> = evaluations
            .iter()
            .flat_map(|e| e.projects.values().map(|p| p.blob.clone()))
            .collect();
        self.take_replicas(owner, evaluations);
        cluster.rules().pulled(owner, Instant::now());
        for blob in blobs {
            let lease = Lease {
                eval: 0,
                project: String::new(),
                blob,
                module: String::new(),
                attempt: 0,
                selection: Vec::new(),
                piece: None,
            };
            // Other members first (one that has it spares the owner), then the owner.
            let others: Vec<String> = cluster
                .member_names()
                .into_iter()
                .filter(|m| m != owner && *m != self.config.node)
                .collect();
            match self
                .fetch_project(cluster, owner, port, &others, &lease)
                .await
            {
                Ok(_) => {
                    // The owner hands the project's modules out once enough nodes hold it.
                    let told = (owner.to_owned(), lease.blob.clone());
                    let new = {
                        let mut told_already = lock(&cluster.told);
                        if told_already.len() >= MAX_HELD_BLOBS {
                            told_already.clear();
                        }
                        told_already.insert(told)
                    };
                    if new {
                        let held = JobMessage::ProjectHeld { blob: lease.blob };
                        cluster.send(owner, &held).await;
                    }
                }
                Err(e) => tracing::debug!(%owner, error = %e, "project not replicated yet"),
            }
        }
        Ok(())
    }

    pub(crate) async fn open_to(
        &self,
        cluster: &Cluster,
        owner: &str,
        port: Option<u16>,
    ) -> Result<DataStream, RemoteError> {
        let mut last = RemoteError::NoAddress;
        let Some(key) = cluster.member_key(owner) else {
            return Err(RemoteError::NotMember(owner.to_owned()));
        };
        for addr in cluster.addresses(owner, port).await {
            match cluster
                .config
                .node
                .open_stream(addr, SERVICE, Some(key))
                .await
            {
                Ok(stream) if stream.peer_id() == owner => return Ok(stream),
                Ok(stream) => {
                    last = RemoteError::WrongPeer {
                        addr,
                        found: stream.peer_id().to_owned(),
                        wanted: owner.to_owned(),
                    }
                }
                Err(source) => {
                    last = RemoteError::Open {
                        peer: owner.to_owned(),
                        source,
                    }
                }
            }
        }
        Err(last)
    }

    /// A SEND whose payload is a job message, from `src`, whose origin `origin_key` proved
    /// (none: nothing did). A CLUSTER_HELLO makes a trusted sender a member; anything else
    /// counts only from a member, and says only what its sender may say of itself.
    pub async fn on_message(
        &self,
        src: &str,
        origin_key: Option<PublicKey>,
        payload: &serde_json::Value,
    ) {
        let (Some(cluster), Some(message)) = (&self.cluster, messages::from_payload(payload))
        else {
            return;
        };
        let verdict = cluster
            .rules()
            .receive(src, origin_key, &message, Instant::now());
        match verdict {
            // A node in no cluster (no secret, no trusted key) refuses every greeting: that
            // is no news for the warning log.
            Verdict::Refused(why)
                if !cluster.configured() && matches!(message, JobMessage::ClusterHello { .. }) =>
            {
                return tracing::debug!(%src, reason = %why, "CLUSTER_HELLO refused: this node is in no cluster");
            }
            Verdict::Refused(why) => return cluster.refuse(src, message.kind(), why),
            Verdict::Admitted { new, greet_back } => {
                if new {
                    tracing::info!(peer = %src, "a node of the cluster proved itself");
                }
                if greet_back {
                    cluster.greet(src).await;
                }
                return;
            }
            Verdict::Accepted => {}
        }
        match message {
            JobMessage::TaskRequest { request } => {
                let answer = self.lease_remote(src).map(|lease| {
                    let holders = lock(&cluster.holders)
                        .get(&lease.blob)
                        .map(|h| h.iter().filter(|w| *w != src).cloned().collect())
                        .unwrap_or_default();
                    JobMessage::TaskSend {
                        request,
                        lease,
                        timeout_s: self.config.limits.timeout.as_secs(),
                        lease_ms: REMOTE_LEASE_MS,
                        holders,
                    }
                });
                let answer = answer.unwrap_or(JobMessage::NoTasks { request });
                cluster.send(src, &answer).await;
            }
            JobMessage::TaskRenew { lease } => self.renew_remote(&lease, src),
            JobMessage::ProjectHeld { blob } => {
                cluster.add_holder(&blob, src);
                // Its modules may go out now: say so to the workers at once.
                cluster.announce_now.notify_one();
            }
            JobMessage::TaskResult { lease, result } => {
                if self.complete(&lease, src, *result) {
                    cluster.add_holder(&lease.blob, src);
                } else {
                    tracing::debug!(%src, module = %lease.module, "a result for a lease the sender does not hold (any more) dropped");
                }
            }
            JobMessage::TaskSend { request, .. } | JobMessage::NoTasks { request } => {
                let mut waiting = lock(&cluster.waiting);
                if waiting.get(&request).is_some_and(|(owner, _)| owner == src) {
                    if let Some((_, waiter)) = waiting.remove(&request) {
                        let _ = waiter.send(message);
                    }
                }
            }
            JobMessage::EvaluationResponsibilityUpdate { eval, .. } => self.set_owner(eval, src),
            JobMessage::TaskAnnounce { unfinished, .. } => {
                // A new evaluation: replicate it now rather than at the next period, so that
                // its owner may hand its modules out.
                let changed = {
                    let mut seen = lock(&cluster.unfinished_seen);
                    if seen.len() >= MAX_OWNERS && !seen.contains_key(src) {
                        seen.clear();
                    }
                    seen.insert(src.to_owned(), unfinished) != Some(unfinished)
                };
                if changed && self.config.modules {
                    cluster.announce_now.notify_one();
                }
            }
            // Kept by the rules.
            JobMessage::ClusterHello { .. }
            | JobMessage::RecoveryElection { .. }
            | JobMessage::NodeStatus { .. } => {}
        }
    }

    /// Asks a trusted owner with waiting modules for one, runs it, returns its result;
    /// false when there was nothing to do.
    pub(crate) async fn work_remote(&self, slot: usize) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        let owner = cluster.rules().owner_for_modules(slot, Instant::now());
        let Some((owner, port)) = owner else {
            return false;
        };
        let request = cluster.next.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut waiting = lock(&cluster.waiting);
            if waiting.len() >= MAX_WAITING {
                return false;
            }
            waiting.insert(request, (owner.clone(), reply));
        }
        let ask = JobMessage::TaskRequest { request };
        cluster.send(&owner, &ask).await;
        let answer = tokio::time::timeout(ANSWER_WAIT, answer).await;
        lock(&cluster.waiting).remove(&request);
        let Ok(Ok(JobMessage::TaskSend { lease, holders, .. })) = answer else {
            // Nothing there now: wait for its next announcement.
            cluster.rules().no_modules(&owner);
            return false;
        };
        let project = match self
            .fetch_project(cluster, &owner, port, &holders, &lease)
            .await
        {
            Ok(project) => project,
            Err(e) => {
                tracing::warn!(%owner, error = %e, "project not fetched");
                return true;
            }
        };
        // Renewed while it runs, so that the owner does not hand it to another.
        let result = {
            let run = self.run_lease(&lease, &project, slot);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    result = &mut run => break result,
                    () = tokio::time::sleep(RENEW_EVERY) => {
                        let renew = JobMessage::TaskRenew {
                            lease: lease.clone(),
                        };
                        cluster.send(&owner, &renew).await;
                    }
                }
            }
        };
        if self.tasks.stopping() {
            // Killed by the stop: not a result; the owner hands the module to another.
            return true;
        }
        self.count_work(&lease, &result);
        cluster
            .send(
                &owner,
                &JobMessage::TaskResult {
                    lease,
                    result: Box::new(result),
                },
            )
            .await;
        true
    }

    /// The project's folder on this node, fetched if not here yet: from one of the
    /// `holders` (other workers that have it), else from `owner`; its hash is checked.
    pub(crate) async fn fetch_project(
        &self,
        cluster: &Cluster,
        owner: &str,
        port: Option<u16>,
        holders: &[String],
        lease: &Lease,
    ) -> Result<PathBuf, RemoteError> {
        let blobs = self.config.dir.join("blobs");
        let folder = blobs.join(&lease.blob);
        if folder.is_dir() {
            return Ok(folder);
        }
        std::fs::create_dir_all(&blobs)?;
        let packed = blobs.join(format!(
            "{}.zip.part-{}",
            lease.blob,
            cluster.next.fetch_add(1, Ordering::Relaxed)
        ));
        // Holders in turn, so that the owner does not serve every worker.
        let turn = cluster.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut sources: Vec<(&str, Option<u16>)> = holders
            .iter()
            .cycle()
            .skip(turn % holders.len().max(1))
            .take(holders.len().min(HOLDERS_TRIED))
            .map(|h| (h.as_str(), None))
            .collect();
        sources.push((owner, port));
        let mut last = RemoteError::NoAddress;
        let mut fetched = false;
        'sources: for (source, port) in sources {
            let Some(key) = cluster.member_key(source) else {
                last = RemoteError::NotMember(source.to_owned());
                continue;
            };
            for addr in cluster.addresses(source, port).await {
                match cluster
                    .config
                    .node
                    .open_stream(addr, SERVICE, Some(key))
                    .await
                {
                    Ok(mut stream) if stream.peer_id() == source => {
                        match fetch_blob(&mut stream, &lease.blob, &packed, cluster.proof()).await {
                            Ok(size) => {
                                self.traffic.fetched(size);
                                tracing::info!(from = %source, blob = %lease.blob, "project fetched");
                                fetched = true;
                                break 'sources;
                            }
                            Err(e) => {
                                last = RemoteError::Fetch {
                                    peer: source.to_owned(),
                                    source: e,
                                }
                            }
                        }
                    }
                    Ok(stream) => {
                        last = RemoteError::WrongPeer {
                            addr,
                            found: stream.peer_id().to_owned(),
                            wanted: source.to_owned(),
                        }
                    }
                    Err(e) => {
                        last = RemoteError::Open {
                            peer: source.to_owned(),
                            source: e,
                        }
                    }
                }
            }
        }
        if !fetched {
            let _ = std::fs::remove_file(&packed);
            return Err(last);
        }
        // Unpacked aside, then renamed: a project folder is whole or absent; when two
        // fetches race, the first rename wins and both use it.
        let partial = blobs.join(format!(
            "{}.unpacking-{}",
            lease.blob,
            cluster.next.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = crate::bundle::unpack(&packed, &partial) {
            let _ = std::fs::remove_file(&packed);
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e.into());
        }
        let _ = std::fs::rename(&packed, blobs.join(format!("{}.zip", lease.blob)));
        if std::fs::rename(&partial, &folder).is_err() {
            let _ = std::fs::remove_dir_all(&partial);
            if !folder.is_dir() {
                return Err(RemoteError::NotStored);
            }
        }
        Ok(folder)
    }

    /// Serves a `jobs` stream: a project's packed bytes (`{"blob":H}`) to a worker holding
    /// a lease of one of its modules or to a trusted replica, and our unfinished
    /// evaluations (`{"ledger":true}`) to a trusted replica; answered `{"size":N}` and N
    /// bytes, or `{"error":...}`. Served by a task of the engine's (dropped when it stops);
    /// returns when it is served.
    pub async fn serve_stream(&self, stream: DataStream) {
        let (served, done) = oneshot::channel();
        let engine = self.clone();
        let started = self.tasks.spawn(async move {
            engine.serve(stream).await;
            let _ = served.send(());
        });
        if started {
            let _ = done.await;
        }
    }

    /// Serves a `jobs` stream (see [`Engine::serve_stream`]).
    async fn serve(&self, mut stream: DataStream) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Ok(Ok(Some(line))) =
            tokio::time::timeout(REQUEST_WAIT, stream.read_line(MAX_HEAD)).await
        else {
            return;
        };
        let Ok(request) = serde_json::from_slice::<serde_json::Value>(&line) else {
            return;
        };
        let proof = request.get("proof").and_then(|p| p.as_str());
        let peer = stream.peer_id().to_owned();
        let allowed = cluster
            .rules()
            .stream_allowed(&peer, stream.key(), proof, Instant::now());
        let trusted = match allowed {
            Ok(()) => true,
            Err(why) => {
                cluster.refuse(&peer, "a jobs stream", why);
                false
            }
        };
        if request.get("script").is_some() {
            return self.serve_script(cluster, stream, trusted).await;
        }
        let served = if let Some(blob) = request.get("blob").and_then(|b| b.as_str()) {
            self.blob_for(&peer, blob, trusted)
                .and_then(|path| std::fs::File::open(path).ok())
                .map(Served::File)
        } else if request.get("ledger").is_some() && trusted {
            serde_json::to_vec(&self.replica_of_ours())
                .ok()
                .map(Served::Bytes)
        } else {
            None
        };
        let Some(served) = served else {
            let _ = stream
                .write_all(b"{\"error\":\"not served to you\"}\n")
                .await;
            return;
        };
        if let Ok(size) = served.send(&mut stream).await {
            self.traffic.served(size);
            stream.shutdown().await;
        }
    }
}

/// Returns when `scripts` queued tasks (never without a tasks folder).
async fn scripts_queued(scripts: Option<&crate::master::MasterHandle>) {
    match scripts {
        Some(master) => master.queued().notified().await,
        None => std::future::pending().await,
    }
}

/// What a `jobs` stream serves: a project's file (read a piece at a time) or a ledger.
enum Served {
    File(std::fs::File),
    Bytes(Vec<u8>),
}

impl Served {
    /// Writes `{"size":N}` and the N bytes; returns N.
    async fn send(self, stream: &mut DataStream) -> Result<u64, StreamError> {
        match self {
            Self::Bytes(bytes) => {
                let head = format!("{{\"size\":{}}}\n", bytes.len());
                stream.write_all(head.as_bytes()).await?;
                for piece in bytes.chunks(SERVE_PIECE) {
                    stream.write_all(piece).await?;
                }
                Ok(bytes.len() as u64)
            }
            Self::File(mut file) => {
                let size = file.metadata()?.len();
                let head = format!("{{\"size\":{size}}}\n");
                stream.write_all(head.as_bytes()).await?;
                send_file(stream, &mut file, size).await?;
                Ok(size)
            }
        }
    }
}
