//! The swarm policy of one download, with no I/O and no clock: which holders are taken in,
//! which chunks each is asked for (through the [`Planner`]), which holder's key is banned,
//! when to ask the network for more holders and when to give up. The runtime reports what
//! happened, with the time it happened (`now` is always passed in, never read), and does
//! what the answers say.
//!
//! A holder enters with [`Swarm::offer`] (a first stream) or [`Swarm::offer_second`] (a
//! second stream to a holder that served), starts pulling chunks once the outboard is known
//! ([`Swarm::plan`], [`Swarm::ready`], [`Swarm::next_requests`], [`Swarm::arrived`]), and
//! leaves with [`Swarm::ended`]: a holder that sent bytes contradicting the hash has its key
//! banned for the rest of the download; one that stalled or left only loses its chunks to
//! the others. [`Swarm::poll`] says when to ask the network for holders and when the
//! download has had none for too long.
//!
//! Bounds: [`MAX_HOLDERS`] holders at once (offers beyond are refused); a window of
//! [`WINDOW_BYTES`] per holder, at most an eighth of the file; each peer is offered once
//! between two questions while alone (the tried set is cleared then, so it holds at most the
//! peers heard in [`ASK_ALONE_EVERY`]); banned keys are kept for the download's life (at
//! most one per holder taken in); [`NO_HOLDER_TIMEOUT`] alone ends the download.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use teia_core::identity::PublicKey;

use super::plan::{Arrival, HolderId, Planner};
use super::tree::Layout;

/// Holders one download uses at once.
pub const MAX_HOLDERS: usize = 8;
/// Bytes requested from one holder and not yet received, at most.
pub const WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Time a download waits with no holder (asking the network again) before it fails.
pub const NO_HOLDER_TIMEOUT: Duration = Duration::from_secs(20);
/// Files from this size on are fetched over two streams per holder (each side then works
/// on two cores).
pub const PARALLEL_FROM: u64 = 64 * 1024 * 1024;
/// Time between two questions for holders while a download has none.
pub const ASK_ALONE_EVERY: Duration = Duration::from_secs(5);
/// Time between two questions for more holders while a download has some.
pub const ASK_MORE_EVERY: Duration = Duration::from_secs(30);

/// How a holder failed, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It sent bytes that contradict the hash: its key is banned.
    Corrupt,
    /// It sent nothing for too long.
    Stalled,
    /// It could not be reached, or its stream closed or failed.
    Gone,
    /// It refused, or broke the exchange's rules.
    Misbehaved,
}

/// What the runtime should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing until the next event or tick.
    Wait,
    /// Ask the network who holds the file.
    AskHolders,
    /// No holder for [`NO_HOLDER_TIMEOUT`]: the download fails.
    GiveUp,
}

/// What a holder whose outboard checked out should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Chunks to keep requested from it.
    pub window: usize,
    /// Whether to open a second stream to it (a large file, and this is its first).
    pub second: bool,
}

/// A holder taken in.
#[derive(Debug)]
struct Member {
    peer: String,
    key: PublicKey,
}

/// The policy of one download's holders and chunks.
#[derive(Debug)]
pub struct Swarm {
    planner: Option<Planner>,
    members: BTreeMap<HolderId, Member>,
    next_id: HolderId,
    /// Peers offered since the last question while alone.
    tried: HashSet<String>,
    banned: HashSet<PublicKey>,
    /// Since when the download has had no holder (`None`: it has one).
    alone_since: Option<Instant>,
    asked_at: Option<Instant>,
    /// Verified bytes each peer sent.
    by_peer: HashMap<String, u64>,
    fetched: u64,
    rate: f64,
    sample: (u64, Option<Instant>),
}

impl Swarm {
    /// A download starting at `now`, with no holder yet.
    pub fn new(now: Instant) -> Self {
        Self {
            planner: None,
            members: BTreeMap::new(),
            next_id: 1,
            tried: HashSet::new(),
            banned: HashSet::new(),
            alone_since: Some(now),
            asked_at: None,
            by_peer: HashMap::new(),
            fetched: 0,
            rate: 0.0,
            sample: (0, None),
        }
    }

    /// A holder heard of: `Some(id)` to open a first stream to it as holder `id`; `None`
    /// when the download is full, its key is banned, or it was tried since the last
    /// question while alone.
    pub fn offer(&mut self, peer: &str, key: PublicKey) -> Option<HolderId> {
        if self.members.len() >= MAX_HOLDERS
            || self.banned.contains(&key)
            || !self.tried.insert(peer.to_owned())
        {
            return None;
        }
        self.alone_since = None;
        Some(self.admit(peer, key))
    }

    /// A holder that served asks for a second stream: `Some(id)` to open it.
    pub fn offer_second(&mut self, peer: &str, key: PublicKey) -> Option<HolderId> {
        if self.members.len() >= MAX_HOLDERS || self.banned.contains(&key) {
            return None;
        }
        Some(self.admit(peer, key))
    }

    fn admit(&mut self, peer: &str, key: PublicKey) -> HolderId {
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                peer: peer.to_owned(),
                key,
            },
        );
        id
    }

    /// The outboard is verified: plan the chunks of `layout`, those in `have` already done.
    /// Only the first call counts.
    pub fn plan(&mut self, layout: Layout, have: &[bool]) {
        if self.planner.is_none() {
            self.planner = Some(Planner::new(layout, have));
        }
    }

    /// Holder `id` has the verified outboard and may be asked for chunks; `first` if this
    /// is its first stream. `None` before [`Swarm::plan`].
    pub fn ready(&mut self, id: HolderId, first: bool) -> Option<Start> {
        let planner = self.planner.as_mut()?;
        planner.add_holder(id);
        let layout = planner.layout();
        // A holder asks for up to WINDOW_BYTES at once, but for at most an eighth of the
        // file, so that on a small file every holder gets a share.
        let window = (WINDOW_BYTES / layout.chunk)
            .min(u64::from(layout.chunks()) / 8)
            .max(2) as usize;
        Some(Start {
            window,
            second: first && layout.size >= PARALLEL_FROM,
        })
    }

    /// Chunks to ask holder `id` for now, so that it has `window` outstanding.
    pub fn next_requests(&mut self, id: HolderId, window: usize) -> Vec<u32> {
        self.planner
            .as_mut()
            .map(|p| p.next_requests(id, window))
            .unwrap_or_default()
    }

    /// Chunk `chunk` of `len` bytes from holder `id` is verified and on disk.
    pub fn arrived(&mut self, id: HolderId, chunk: u32, len: u64) {
        let fresh = self
            .planner
            .as_mut()
            .is_some_and(|p| p.arrived(id, chunk) == Arrival::Fresh);
        if fresh {
            self.fetched += len;
            if let Some(member) = self.members.get(&id) {
                *self.by_peer.entry(member.peer.clone()).or_default() += len;
            }
        }
    }

    /// Holder `id` stopped, having failed with `fault` or not; its chunks go back to the
    /// others. Returns whether its key is now banned.
    pub fn ended(&mut self, id: HolderId, fault: Option<Fault>) -> bool {
        if let Some(planner) = self.planner.as_mut() {
            planner.remove_holder(id);
        }
        let Some(member) = self.members.remove(&id) else {
            return false;
        };
        if fault == Some(Fault::Corrupt) {
            self.banned.insert(member.key);
            return true;
        }
        false
    }

    /// What to do at `now`: ask for holders now and then (often while alone, rarely while
    /// some send), give up after [`NO_HOLDER_TIMEOUT`] alone.
    pub fn poll(&mut self, now: Instant) -> Step {
        let due = |every: Duration, asked: Option<Instant>| {
            asked.is_none_or(|at| now.saturating_duration_since(at) >= every)
        };
        if self.members.is_empty() {
            let since = *self.alone_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= NO_HOLDER_TIMEOUT {
                return Step::GiveUp;
            }
            if due(ASK_ALONE_EVERY, self.asked_at) {
                self.asked_at = Some(now);
                self.tried.clear();
                return Step::AskHolders;
            }
        } else if self.members.len() < MAX_HOLDERS && due(ASK_MORE_EVERY, self.asked_at) {
            // Look for more holders now and then: new ones join in.
            self.asked_at = Some(now);
            return Step::AskHolders;
        }
        Step::Wait
    }

    /// Updates the rate with the bytes fetched since the last sample, at `now`.
    pub fn sample_rate(&mut self, now: Instant) {
        let (bytes, at) = self.sample;
        if let Some(at) = at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            if elapsed > 0.0 {
                let current = self.fetched.saturating_sub(bytes) as f64 / elapsed;
                self.rate = if self.rate == 0.0 {
                    current
                } else {
                    0.5 * self.rate + 0.5 * current
                };
            }
        }
        self.sample = (self.fetched, Some(now));
    }

    /// Whether every chunk is verified.
    pub fn is_complete(&self) -> bool {
        self.planner.as_ref().is_some_and(Planner::is_complete)
    }

    /// Bytes verified (those on disk at the start included).
    pub fn done_bytes(&self) -> u64 {
        self.planner.as_ref().map_or(0, Planner::done_bytes)
    }

    /// Bytes fetched and verified in this run.
    pub fn fetched(&self) -> u64 {
        self.fetched
    }

    /// Bytes per second, recently.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Peers sending now (a peer with two streams counts once).
    pub fn peers(&self) -> usize {
        let peers: HashSet<&String> = self.members.values().map(|m| &m.peer).collect();
        peers.len()
    }

    /// Holders taken in and not ended (streams, so a peer may count twice).
    pub fn holders(&self) -> usize {
        self.members.len()
    }

    /// Whether `key` is banned from this download.
    pub fn is_banned(&self, key: &PublicKey) -> bool {
        self.banned.contains(key)
    }

    /// Verified bytes each peer sent, by peer.
    pub fn sources(&self) -> Vec<(String, u64)> {
        let mut sources: Vec<(String, u64)> = self
            .by_peer
            .iter()
            .map(|(peer, bytes)| (peer.clone(), *bytes))
            .collect();
        sources.sort();
        sources
    }
}
