//! The cluster side of a job engine at run time: the sans-IO [`ClusterRules`] behind one
//! lock, and what only the runtime holds (requests waiting for their answer, the holders of
//! projects' bytes, what was told to whom); sending to members and finding their addresses.
//! What the engine does with the cluster's messages is in [`crate::remote`].
//!
//! Bounds: requests waiting for an answer, [`MAX_WAITING`]; holders remembered per project,
//! [`MAX_HOLDERS`], for at most [`MAX_HELD_BLOBS`] projects (past it, all are forgotten and
//! told again); owners' counts, [`crate::proto::cluster::MAX_OWNERS`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use teia_core::identity::PublicKey;
use teia_node::node::NodeHandle;
use tokio::sync::oneshot;

use crate::proto::cluster::{ClusterRules, Refusal, Trust};
use crate::proto::messages::{self, JobMessage, SERVICE};
use teia_node::sync::lock;

/// Requests waiting for an answer at most.
pub const MAX_WAITING: usize = 256;
/// Workers remembered as holding a project's bytes, per project; the oldest is forgotten.
pub const MAX_HOLDERS: usize = 8;
/// Projects whose holders are remembered; past it, all are forgotten.
pub const MAX_HELD_BLOBS: usize = 1024;
/// How this node takes part in a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The node.
    pub node: NodeHandle,
    /// Keys trusted as owners and workers.
    pub trusted: Vec<PublicKey>,
    /// A secret shared by the nodes of one cluster.
    pub secret: Option<String>,
    /// The script tasks this node hands out (`--tasks-dir`), if any.
    pub scripts: Option<crate::master::MasterHandle>,
}

/// The cluster side of an engine: the sans-IO [`ClusterRules`] (one lock) and what only
/// the runtime holds (requests waiting for their answer, projects' holders).
pub(crate) struct Cluster {
    pub(crate) config: ClusterConfig,
    /// Membership, acceptance, announced owners, failure detection and elections.
    pub(crate) rules: Mutex<ClusterRules>,
    /// Requests for a module waiting for their answer: the owner asked, and where to tell.
    pub(crate) waiting: Mutex<HashMap<u64, (String, oneshot::Sender<JobMessage>)>>,
    /// Projects we told their owner we hold, as (owner, blob) (at most
    /// [`MAX_HELD_BLOBS`]; past it, all are forgotten and told again).
    pub(crate) told: Mutex<std::collections::HashSet<(String, String)>>,
    pub(crate) next: AtomicU64,
    /// Workers that fetched a project's bytes, by their hash (for TASK_SEND's holders).
    pub(crate) holders: Mutex<HashMap<String, Vec<String>>>,
    /// Wakes the owner's announcer before its period (a new evaluation to hand out).
    pub(crate) announce_now: tokio::sync::Notify,
    /// The count of unfinished evaluations each owner announced last (at most
    /// [`crate::proto::cluster::MAX_OWNERS`]; past it, all are forgotten): a new one is pulled at once.
    pub(crate) unfinished_seen: Mutex<HashMap<String, u32>>,
}

impl Cluster {
    /// The cluster side of node `me`, standing in elections when `stands`.
    pub(crate) fn new(config: ClusterConfig, me: &str, stands: bool) -> Self {
        let rules = ClusterRules::new(Trust {
            me: me.to_owned(),
            key: config.node.public_key(),
            trusted: config.trusted.clone(),
            secret: config.secret.clone(),
            stands,
        });
        Self {
            config,
            rules: Mutex::new(rules),
            waiting: Mutex::new(HashMap::new()),
            told: Mutex::new(std::collections::HashSet::new()),
            next: AtomicU64::new(1),
            holders: Mutex::new(HashMap::new()),
            announce_now: tokio::sync::Notify::new(),
            unfinished_seen: Mutex::new(HashMap::new()),
        }
    }

    /// The rules, locked.
    pub(crate) fn rules(&self) -> std::sync::MutexGuard<'_, ClusterRules> {
        lock(&self.rules)
    }

    /// Our proof of the cluster secret, bound to our key.
    pub(crate) fn proof(&self) -> Option<String> {
        self.rules().proof()
    }

    /// The key of member `peer`, if it is a fresh member.
    pub(crate) fn member_key(&self, peer: &str) -> Option<PublicKey> {
        self.rules().member_key(peer, Instant::now())
    }

    /// How many fresh members there are.
    pub(crate) fn member_count(&self) -> usize {
        self.member_names().len()
    }

    /// The fresh members' peer ids.
    pub(crate) fn member_names(&self) -> Vec<String> {
        self.rules().members(Instant::now())
    }

    /// How many nodes are known to hold project `blob`.
    pub(crate) fn holder_count(&self, blob: &str) -> usize {
        lock(&self.holders).get(blob).map_or(0, Vec::len)
    }

    /// Logs a refused message (`what`) from `src`: the first at once, then one line with
    /// the count every [`REFUSAL_LOG_EVERY`].
    pub(crate) fn refuse(&self, src: &str, what: &str, why: Refusal) {
        if let Some(refused) = self.rules().refused(src, Instant::now()) {
            tracing::warn!(
                %src,
                refused,
                reason = %why,
                "{what} refused: the sender is not a proven member of this cluster (--trust its key, or give both nodes the same --cluster-secret)"
            );
        }
    }

    /// Sends `message` to every fresh member.
    pub(crate) async fn to_members(&self, message: &JobMessage) {
        for member in self.member_names() {
            self.send(&member, message).await;
        }
    }

    /// Whether this node is in a cluster: it has a secret or trusts keys. Membership goes
    /// both ways, so a node in none says no CLUSTER_HELLO.
    pub(crate) fn configured(&self) -> bool {
        self.config.secret.is_some() || !self.config.trusted.is_empty()
    }

    /// Says CLUSTER_HELLO to `peer`, when this node is in a cluster.
    pub(crate) async fn greet(&self, peer: &str) {
        if !self.configured() {
            return;
        }
        let hello = JobMessage::ClusterHello {
            proof: self.proof(),
            port: self.config.node.listen_addr().map(|a| a.port()),
        };
        self.send(peer, &hello).await;
    }

    /// Says CLUSTER_HELLO to the teia neighbours (those with a pinned key) and the nodes
    /// members have links to, that are not fresh members, at most every [`HELLO_EVERY`].
    pub(crate) async fn greet_candidates(&self) {
        let Ok(snapshot) = self.config.node.snapshot().await else {
            return;
        };
        let neighbours: Vec<String> = snapshot
            .neighbours
            .iter()
            .filter(|n| snapshot.pins.iter().any(|(id, _)| *id == n.peer))
            .map(|n| n.peer.clone())
            .collect();
        let due = self.rules().to_greet(neighbours, Instant::now());
        for peer in due {
            self.greet(&peer).await;
        }
    }

    pub(crate) async fn send(&self, to: &str, message: &JobMessage) {
        if let Err(e) = self
            .config
            .node
            .send_for(SERVICE, to, messages::payload(message))
            .await
        {
            tracing::debug!(%to, error = %e, "job message not sent");
        }
    }

    /// Remembers that `worker` has the bytes of project `blob`.
    pub(crate) fn add_holder(&self, blob: &str, worker: &str) {
        let mut holders = lock(&self.holders);
        if holders.len() >= MAX_HELD_BLOBS && !holders.contains_key(blob) {
            holders.clear();
        }
        let known = holders.entry(blob.to_owned()).or_default();
        if known.iter().any(|w| w == worker) {
            return;
        }
        if known.len() >= MAX_HOLDERS {
            known.remove(0);
        }
        known.push(worker.to_owned());
    }

    /// Where to reach `owner`: the addresses the node knows for it, with its listen port.
    pub(crate) async fn addresses(&self, owner: &str, port: Option<u16>) -> Vec<SocketAddr> {
        let Ok(snapshot) = self.config.node.snapshot().await else {
            return Vec::new();
        };
        let mut addrs: Vec<SocketAddr> = snapshot
            .known
            .iter()
            .filter(|(peer, _)| peer == owner)
            .map(|(_, a)| *a)
            .collect();
        for neighbour in snapshot.neighbours.iter().filter(|n| n.peer == owner) {
            let addr = match (neighbour.inbound, port) {
                (true, Some(port)) => SocketAddr::new(neighbour.addr.ip(), port),
                _ => neighbour.addr,
            };
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        addrs.truncate(4);
        addrs
    }
}
