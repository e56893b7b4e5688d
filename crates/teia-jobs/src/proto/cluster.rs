//! The rules of a cluster of job engines, sans-IO: who is a member, which job messages
//! count and from whom, which owners announced work, when an owner whose evaluations we
//! replicate is gone, and the elections of a new owner. Events and the time come in as
//! arguments (`now`), decisions come out; the runtime ([`crate::remote`]) sends, streams
//! and logs, and the simulator of `proto/sim.rs` (tests) runs many nodes of it in one
//! process.
//!
//! Trust: a key proven by the overlay (a message's origin, a stream's handshake) is trusted
//! if it is this node's, a `--trust` key, or carries [`messages::proof`] of the cluster
//! secret bound to the sender's peer id and that key. A CLUSTER_HELLO so proven makes its
//! sender a *member* under that key until it is silent for [`MEMBER_FRESH`]; every other
//! message counts only from a fresh member under its key, and TASK_ANNOUNCE,
//! RECOVERY_ELECTION, NODE_STATUS and EVALUATION_RESPONSIBILITY_UPDATE must name their
//! sender. A refusal is a [`Refusal`], and changes nothing but the refusal count.
//!
//! Elections: when an owner that answered before has not answered for [`OWNER_GONE`], the
//! node stands for each of its unfinished evaluations it replicates and collects the
//! candidacies for [`ELECTION_TIME`], counting those heard in the [`ELECTION_TIME`] × 4
//! before it stood (a candidacy may come before this node finds the owner gone: dropped,
//! two nodes could each win, record the other as the owner, and leave the evaluation
//! with none); the lowest peer id wins. A candidate that lost and does not hear the
//! winner within [`ELECTION_TIME`] × 4 forgets the election and stands again.
//!
//! **Bounds.** Members, greetings, refusal counts, announced owners, their ports, owners
//! heard, suspects, elections, candidacies heard before standing, and statuses are each
//! kept for at most [`MAX_OWNERS`] nodes or evaluations (candidates of one election are
//! members, so at most [`MAX_OWNERS`] too): past it the stalest member is forgotten, stale
//! greetings, refusal counts, statuses and candidacies are dropped, as are the ports of
//! nodes neither members nor owners heard, and otherwise the new entry is not kept.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use teia_core::identity::PublicKey;

use super::ledger::EvalId;
use super::messages::{self, JobMessage};

/// Nodes of the cluster (besides the owner) that must hold a project's bytes before a
/// module of it is handed out, when the cluster has that many: so that the evaluation
/// survives its owner.
pub const REPLICAS: usize = 2;
/// Time an owner waits at most for a new evaluation's projects to reach [`REPLICAS`] nodes
/// (nodes that run no test modules never pull them): then its modules are handed out, and
/// `POST /evaluation` answered, regardless.
pub const REPLICATION_WAIT: Duration = Duration::from_secs(5);

/// Whether a module of a project held by `holders` of the cluster's `members` (besides its
/// owner), of an evaluation submitted at `submitted` (Unix ms), may be handed out at `now`:
/// its bytes are at [`REPLICAS`] nodes (as many as the cluster has), or [`REPLICATION_WAIT`]
/// has passed.
pub fn may_hand_out(members: usize, holders: usize, submitted: u64, now: u64) -> bool {
    let wanted = REPLICAS.min(members);
    wanted == 0
        || holders >= wanted
        || now >= submitted.saturating_add(REPLICATION_WAIT.as_millis() as u64)
}

/// Milliseconds a remote worker's lease lasts without a renewal.
pub const REMOTE_LEASE_MS: u64 = 2_000;
/// Time an announcement is believed.
pub const OWNER_FRESH: Duration = Duration::from_secs(5);
/// Time a node's status is shown after it came.
pub const STATUS_FRESH: Duration = Duration::from_secs(7);
/// Time an owner may not answer before its evaluations are taken over.
pub const OWNER_GONE: Duration = Duration::from_secs(3);
/// Time an election collects candidacies.
pub const ELECTION_TIME: Duration = Duration::from_millis(1000);
/// Times [`ELECTION_TIME`] a losing candidate waits for the winner before it starts over.
pub const ELECTION_PATIENCE: u32 = 4;
/// Owners (and members, statuses, elections…) remembered at most.
pub const MAX_OWNERS: usize = 256;
/// Time between two CLUSTER_HELLOs to one node that is not (or no longer) a member.
pub const HELLO_EVERY: Duration = Duration::from_secs(5);
/// Time a member stays one without being heard (members send a status every 2 s); then
/// it must say CLUSTER_HELLO again.
pub const MEMBER_FRESH: Duration = Duration::from_secs(15);
/// Time between two log lines about one sender's refused messages.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a message (or a `jobs` stream) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No key proved where it came from.
    #[error("no key proved its origin")]
    Unproven,
    /// It claims to come from this node.
    #[error("it claims to be this node")]
    Impostor,
    /// Its key is neither trusted nor carries a valid proof of the cluster secret.
    #[error("its key is not trusted and proves no cluster secret")]
    Untrusted,
    /// Its sender is not a member (or was silent for [`MEMBER_FRESH`]).
    #[error("the sender is not a proven member of this cluster")]
    NotMember,
    /// Its sender is a member under another key.
    #[error("the sender is a member under another key")]
    OtherKey,
    /// It speaks for another node than its sender.
    #[error("it speaks for another node")]
    ForAnother,
}

/// What a received job message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A CLUSTER_HELLO made its sender a member.
    Admitted {
        /// It was not a fresh member before.
        new: bool,
        /// Say CLUSTER_HELLO back to it now.
        greet_back: bool,
    },
    /// Counted: the runtime acts on it (requests, leases, results, a new owner).
    Accepted,
    /// Dropped, for this reason.
    Refused(Refusal),
}

/// What a failed ledger pull from an owner means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suspicion {
    /// Not gone (yet): it answered within [`OWNER_GONE`], or never answered.
    Waiting,
    /// Gone, with evaluations we replicate: we stand for these (send our candidacy to
    /// the members).
    Gone {
        /// The evaluations we newly stand for.
        stand: Vec<EvalId>,
    },
    /// Gone, with nothing of it left to take over: forgotten.
    Forgotten,
}

/// How an election ended here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElectionOutcome {
    /// We won: take the evaluation over and tell the members.
    Won(EvalId),
    /// The winner did not say it took over: forgotten, to stand again.
    Abandoned(EvalId),
}

/// How this node takes part: who it is and whom it trusts.
#[derive(Debug, Clone)]
pub struct Trust {
    /// This node's peer id.
    pub me: String,
    /// This node's key.
    pub key: Option<PublicKey>,
    /// Keys trusted with `--trust`.
    pub trusted: Vec<PublicKey>,
    /// The cluster secret.
    pub secret: Option<String>,
    /// Whether this node stands in elections (it runs other nodes' code).
    pub stands: bool,
}

/// A node proven to belong to the cluster.
#[derive(Debug, Clone)]
struct Member {
    /// The key that proved it.
    key: PublicKey,
    /// When it was last heard.
    seen: Instant,
}

/// An owner's last TASK_ANNOUNCE.
#[derive(Debug, Clone)]
struct Announced {
    port: Option<u16>,
    seen: Instant,
    pending: u32,
    scripts: u32,
}

/// An election going on here.
#[derive(Debug, Clone)]
struct Election {
    candidates: BTreeSet<String>,
    started: Instant,
}

/// The rules of one node's cluster and their state.
#[derive(Debug, Clone)]
pub struct ClusterRules {
    trust: Trust,
    /// Members by peer id.
    members: HashMap<String, Member>,
    /// When a CLUSTER_HELLO last went to each node.
    greeted: HashMap<String, Instant>,
    /// Refused messages by sender: when last logged (never: none), and how many since.
    refusals: HashMap<String, (Option<Instant>, u64)>,
    /// Owners that announced work.
    owners: HashMap<String, Announced>,
    /// Owners' listen ports, as said.
    ports: HashMap<String, Option<u16>>,
    /// When each owner whose evaluations we replicate last answered.
    heard: HashMap<String, Instant>,
    /// Owners whose last pull failed.
    suspects: HashSet<String>,
    /// Elections going on, by evaluation.
    elections: HashMap<EvalId, Election>,
    /// Candidacies heard for evaluations we do not stand for (yet), and when.
    candidacies: HashMap<EvalId, (Instant, BTreeSet<String>)>,
    /// Other nodes' statuses, by peer id, and when they came.
    statuses: HashMap<String, (JobMessage, Instant)>,
}

/// Whether `at` is less than `fresh` before `now`.
fn within(at: Instant, now: Instant, fresh: Duration) -> bool {
    now.saturating_duration_since(at) < fresh
}

impl ClusterRules {
    /// A node's rules, with no member yet.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            members: HashMap::new(),
            greeted: HashMap::new(),
            refusals: HashMap::new(),
            owners: HashMap::new(),
            ports: HashMap::new(),
            heard: HashMap::new(),
            suspects: HashSet::new(),
            elections: HashMap::new(),
            candidacies: HashMap::new(),
            statuses: HashMap::new(),
        }
    }

    /// Our proof of the cluster secret, bound to our key.
    pub fn proof(&self) -> Option<String> {
        let key = self.trust.key?;
        let secret = self.trust.secret.as_deref()?;
        Some(messages::proof(secret, &self.trust.me, &key))
    }

    /// Whether `peer`, whose origin `key` proved (none: nothing did), is trusted: this node
    /// itself, a `--trust` key, or a proof of the cluster secret bound to that key.
    pub fn trusted(
        &self,
        peer: &str,
        key: Option<PublicKey>,
        proof: Option<&str>,
    ) -> Result<PublicKey, Refusal> {
        let key = key.ok_or(Refusal::Unproven)?;
        if peer == self.trust.me {
            return if Some(key) == self.trust.key {
                Ok(key)
            } else {
                Err(Refusal::Impostor)
            };
        }
        if self.trust.trusted.contains(&key) {
            return Ok(key);
        }
        match (self.trust.secret.as_deref(), proof) {
            (Some(secret), Some(proof)) if messages::proof(secret, peer, &key) == proof => Ok(key),
            _ => Err(Refusal::Untrusted),
        }
    }

    /// Whether a `jobs` stream from `peer`, proving `key`, is served: a fresh member under
    /// that key, or a trusted node.
    pub fn stream_allowed(
        &self,
        peer: &str,
        key: PublicKey,
        proof: Option<&str>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if self.member_key(peer, now) == Some(key) {
            return Ok(());
        }
        self.trusted(peer, Some(key), proof).map(|_| ())
    }

    /// A job message from `src`, whose origin `key` proved (none: nothing did): a
    /// CLUSTER_HELLO admits a trusted sender; anything else counts only from a fresh member
    /// under its key that speaks for itself, and records what the rules keep of it
    /// (announced owners, candidacies, statuses, the end of an election).
    pub fn receive(
        &mut self,
        src: &str,
        key: Option<PublicKey>,
        message: &JobMessage,
        now: Instant,
    ) -> Verdict {
        if let JobMessage::ClusterHello { proof, port } = message {
            return match self.hello(src, key, proof.as_deref(), *port, now) {
                Ok((new, greet_back)) => Verdict::Admitted { new, greet_back },
                Err(refusal) => Verdict::Refused(refusal),
            };
        }
        if let Err(refusal) = self.check_member(src, key, now) {
            return Verdict::Refused(refusal);
        }
        let named = match message {
            JobMessage::TaskAnnounce { owner, .. } => Some(owner),
            JobMessage::RecoveryElection { candidate, .. } => Some(candidate),
            JobMessage::NodeStatus { peer_id, .. } => Some(peer_id),
            JobMessage::EvaluationResponsibilityUpdate { owner, .. } => Some(owner),
            _ => None,
        };
        if named.is_some_and(|named| named != src) {
            return Verdict::Refused(Refusal::ForAnother);
        }
        if let Some(member) = self.members.get_mut(src) {
            member.seen = now;
        }
        match message {
            JobMessage::TaskAnnounce {
                port,
                pending,
                scripts,
                ..
            } => self.announced(src, *port, *pending, *scripts, now),
            JobMessage::RecoveryElection { eval, .. } => self.candidacy(*eval, src, now),
            JobMessage::NodeStatus { .. } => {
                self.statuses
                    .retain(|_, (_, at)| within(*at, now, STATUS_FRESH));
                if self.statuses.len() < MAX_OWNERS || self.statuses.contains_key(src) {
                    self.statuses.insert(src.to_owned(), (message.clone(), now));
                }
            }
            JobMessage::EvaluationResponsibilityUpdate { eval, .. } => {
                self.elections.remove(eval);
                self.candidacies.remove(eval);
            }
            _ => {}
        }
        Verdict::Accepted
    }

    /// A CLUSTER_HELLO: whether its sender was new, and whether to greet it back.
    fn hello(
        &mut self,
        src: &str,
        key: Option<PublicKey>,
        proof: Option<&str>,
        port: Option<u16>,
        now: Instant,
    ) -> Result<(bool, bool), Refusal> {
        if src == self.trust.me {
            return Err(Refusal::Impostor);
        }
        let key = self.trusted(src, key, proof)?;
        let new = self.member_key(src, now).is_none();
        if self.members.len() >= MAX_OWNERS && !self.members.contains_key(src) {
            let stalest = self
                .members
                .iter()
                .min_by_key(|(_, m)| m.seen)
                .map(|(name, _)| name.clone());
            if let Some(stalest) = stalest {
                self.members.remove(&stalest);
            }
        }
        self.members
            .insert(src.to_owned(), Member { key, seen: now });
        self.set_port(src, port);
        // It does not know us (or it would not greet): tell it, at most every HELLO_EVERY.
        Ok((new, self.greet_due(src, now)))
    }

    /// Whether `src` is a fresh member under `key`.
    fn check_member(&self, src: &str, key: Option<PublicKey>, now: Instant) -> Result<(), Refusal> {
        match self.members.get(src) {
            Some(member) if within(member.seen, now, MEMBER_FRESH) => {
                if Some(member.key) == key {
                    Ok(())
                } else if key.is_none() {
                    Err(Refusal::Unproven)
                } else {
                    Err(Refusal::OtherKey)
                }
            }
            _ => Err(Refusal::NotMember),
        }
    }

    /// Records `peer`'s listen port; when [`MAX_OWNERS`] are known, those of nodes that
    /// are no longer members nor owners we replicate are forgotten first.
    fn set_port(&mut self, peer: &str, port: Option<u16>) {
        if self.ports.len() >= MAX_OWNERS && !self.ports.contains_key(peer) {
            let (members, heard) = (&self.members, &self.heard);
            self.ports
                .retain(|known, _| members.contains_key(known) || heard.contains_key(known));
        }
        if self.ports.len() < MAX_OWNERS || self.ports.contains_key(peer) {
            self.ports.insert(peer.to_owned(), port);
        }
    }

    fn announced(
        &mut self,
        owner: &str,
        port: Option<u16>,
        pending: u32,
        scripts: u32,
        now: Instant,
    ) {
        self.set_port(owner, port);
        if self.owners.len() >= MAX_OWNERS && !self.owners.contains_key(owner) {
            self.owners.retain(|_, o| within(o.seen, now, OWNER_FRESH));
            if self.owners.len() >= MAX_OWNERS {
                return;
            }
        }
        self.owners.insert(
            owner.to_owned(),
            Announced {
                port,
                seen: now,
                pending,
                scripts,
            },
        );
    }

    fn candidacy(&mut self, eval: EvalId, candidate: &str, now: Instant) {
        if let Some(election) = self.elections.get_mut(&eval) {
            election.candidates.insert(candidate.to_owned());
            return;
        }
        let patience = ELECTION_TIME * ELECTION_PATIENCE;
        if self.candidacies.len() >= MAX_OWNERS && !self.candidacies.contains_key(&eval) {
            self.candidacies
                .retain(|_, (at, _)| within(*at, now, patience));
            if self.candidacies.len() >= MAX_OWNERS {
                return;
            }
        }
        let heard = self
            .candidacies
            .entry(eval)
            .or_insert_with(|| (now, BTreeSet::new()));
        if !within(heard.0, now, patience) {
            heard.1.clear();
        }
        heard.0 = now;
        heard.1.insert(candidate.to_owned());
    }

    /// When a refusal of `src`'s messages is to be logged: the first at once, then one line
    /// every [`REFUSAL_LOG_EVERY`]; the number of refusals the line stands for.
    pub fn refused(&mut self, src: &str, now: Instant) -> Option<u64> {
        if self.refusals.len() >= MAX_OWNERS && !self.refusals.contains_key(src) {
            self.refusals
                .retain(|_, (at, _)| at.is_some_and(|at| within(at, now, REFUSAL_LOG_EVERY)));
            if self.refusals.len() >= MAX_OWNERS {
                return None;
            }
        }
        let entry = self.refusals.entry(src.to_owned()).or_insert((None, 0));
        entry.1 += 1;
        if entry.0.is_some_and(|at| within(at, now, REFUSAL_LOG_EVERY)) {
            return None;
        }
        let count = entry.1;
        *entry = (Some(now), 0);
        Some(count)
    }

    /// The key of member `peer`, if it is a fresh member.
    pub fn member_key(&self, peer: &str, now: Instant) -> Option<PublicKey> {
        self.members
            .get(peer)
            .filter(|m| within(m.seen, now, MEMBER_FRESH))
            .map(|m| m.key)
    }

    /// The fresh members' peer ids, in order.
    pub fn members(&self, now: Instant) -> Vec<String> {
        let mut names: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| within(m.seen, now, MEMBER_FRESH))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Whether a CLUSTER_HELLO may go to `peer` now (none went for [`HELLO_EVERY`]); if so
    /// it is counted as sent.
    fn greet_due(&mut self, peer: &str, now: Instant) -> bool {
        if self
            .greeted
            .get(peer)
            .is_some_and(|at| within(*at, now, HELLO_EVERY))
        {
            return false;
        }
        if self.greeted.len() >= MAX_OWNERS && !self.greeted.contains_key(peer) {
            self.greeted.retain(|_, at| within(*at, now, HELLO_EVERY));
            if self.greeted.len() >= MAX_OWNERS {
                return false;
            }
        }
        self.greeted.insert(peer.to_owned(), now);
        true
    }

    /// The nodes to say CLUSTER_HELLO to now: of `neighbours` (teia neighbours with a
    /// pinned key) and the nodes members' statuses name, those that are not fresh members
    /// and were not greeted for [`HELLO_EVERY`] (counted as greeted).
    pub fn to_greet(&mut self, neighbours: Vec<String>, now: Instant) -> Vec<String> {
        let mut candidates = neighbours;
        for (status, _) in self.statuses.values() {
            if let JobMessage::NodeStatus { neighbours, .. } = status {
                candidates.extend(neighbours.iter().cloned());
            }
        }
        candidates.sort();
        candidates.dedup();
        candidates.truncate(MAX_OWNERS);
        candidates
            .into_iter()
            .filter(|peer| {
                *peer != self.trust.me
                    && self.member_key(peer, now).is_none()
                    && self.greet_due(peer, now)
            })
            .collect()
    }

    /// The owner a worker in `slot` asks for a module: of the owners that announced
    /// waiting modules within [`OWNER_FRESH`], in peer id order, the slot's turn; with its
    /// listen port.
    pub fn owner_for_modules(
        &mut self,
        slot: usize,
        now: Instant,
    ) -> Option<(String, Option<u16>)> {
        self.owner_with(slot, now, |o| o.pending > 0)
    }

    /// As [`ClusterRules::owner_for_modules`], for owners with script tasks waiting.
    pub fn owner_for_scripts(
        &mut self,
        slot: usize,
        now: Instant,
    ) -> Option<(String, Option<u16>)> {
        self.owner_with(slot, now, |o| o.scripts > 0)
    }

    fn owner_with(
        &mut self,
        slot: usize,
        now: Instant,
        has: impl Fn(&Announced) -> bool,
    ) -> Option<(String, Option<u16>)> {
        self.owners.retain(|_, o| within(o.seen, now, OWNER_FRESH));
        let mut fresh: Vec<(&String, Option<u16>)> = self
            .owners
            .iter()
            .filter(|(_, o)| has(o))
            .map(|(name, o)| (name, o.port))
            .collect();
        fresh.sort();
        let count = fresh.len().max(1);
        fresh
            .get(slot % count)
            .map(|(name, port)| ((*name).clone(), *port))
    }

    /// `owner` had no module for us: none is asked of it before its next announcement.
    pub fn no_modules(&mut self, owner: &str) {
        if let Some(known) = self.owners.get_mut(owner) {
            known.pending = 0;
        }
    }

    /// `owner` had no script task for us: none is asked of it before its next announcement.
    pub fn no_scripts(&mut self, owner: &str) {
        if let Some(known) = self.owners.get_mut(owner) {
            known.scripts = 0;
        }
    }

    /// `peer`'s listen port, as it last said.
    pub fn port(&self, peer: &str) -> Option<u16> {
        self.ports.get(peer).copied().flatten()
    }

    /// The owners whose ledgers to pull: those that announced within [`OWNER_FRESH`] and
    /// those whose evaluations we replicate, in order, but this node.
    pub fn to_replicate(&self, now: Instant) -> Vec<String> {
        let mut owners: Vec<String> = self
            .owners
            .iter()
            .filter(|(_, o)| within(o.seen, now, OWNER_FRESH))
            .map(|(name, _)| name.clone())
            .chain(self.heard.keys().cloned())
            .filter(|name| *name != self.trust.me)
            .collect();
        owners.sort();
        owners.dedup();
        owners
    }

    /// The owners whose last pull failed (pulled again every watch).
    pub fn suspects(&self) -> Vec<String> {
        let mut suspects: Vec<String> = self.suspects.iter().cloned().collect();
        suspects.sort();
        suspects
    }

    /// `owner` answered a pull.
    pub fn pulled(&mut self, owner: &str, now: Instant) {
        self.suspects.remove(owner);
        if self.heard.len() < MAX_OWNERS || self.heard.contains_key(owner) {
            self.heard.insert(owner.to_owned(), now);
        }
    }

    /// A pull from `owner` failed; `replicas` are its unfinished evaluations we replicate.
    /// Gone (it answered before, and not for [`OWNER_GONE`] since): we stand for them.
    pub fn pull_failed(&mut self, owner: &str, replicas: &[EvalId], now: Instant) -> Suspicion {
        let gone = self
            .heard
            .get(owner)
            .is_some_and(|at| !within(*at, now, OWNER_GONE));
        if replicas.is_empty() || self.suspects.len() >= MAX_OWNERS {
            self.suspects.remove(owner);
        } else {
            self.suspects.insert(owner.to_owned());
        }
        match (gone, replicas.is_empty()) {
            (false, _) => Suspicion::Waiting,
            (true, true) => {
                self.heard.remove(owner);
                Suspicion::Forgotten
            }
            (true, false) => Suspicion::Gone {
                stand: replicas
                    .iter()
                    .copied()
                    .filter(|eval| self.stand(*eval, now))
                    .collect(),
            },
        }
    }

    /// Stands in the election for `eval` (once per election), counting the candidacies
    /// heard lately; false on a node that runs no other node's code, or already standing.
    pub fn stand(&mut self, eval: EvalId, now: Instant) -> bool {
        if !self.trust.stands
            || self.elections.contains_key(&eval)
            || self.elections.len() >= MAX_OWNERS
        {
            return false;
        }
        let mut candidates = BTreeSet::new();
        if let Some((at, heard)) = self.candidacies.remove(&eval) {
            if within(at, now, ELECTION_TIME * ELECTION_PATIENCE) {
                candidates = heard;
            }
        }
        candidates.insert(self.trust.me.clone());
        self.elections.insert(
            eval,
            Election {
                candidates,
                started: now,
            },
        );
        true
    }

    /// Closes the elections whose time is up: the lowest peer id wins; a loser that has
    /// not heard the winner within [`ELECTION_PATIENCE`] times [`ELECTION_TIME`] forgets it.
    pub fn count_votes(&mut self, now: Instant) -> Vec<ElectionOutcome> {
        let me = self.trust.me.as_str();
        let mut outcomes: Vec<ElectionOutcome> = self
            .elections
            .iter()
            .filter(|(_, e)| !within(e.started, now, ELECTION_TIME))
            .filter_map(|(eval, e)| {
                let winner = e.candidates.iter().next()?;
                if winner == me {
                    Some(ElectionOutcome::Won(*eval))
                } else if !within(e.started, now, ELECTION_TIME * ELECTION_PATIENCE) {
                    Some(ElectionOutcome::Abandoned(*eval))
                } else {
                    None
                }
            })
            .collect();
        outcomes.sort_by_key(|o| match o {
            ElectionOutcome::Won(eval) | ElectionOutcome::Abandoned(eval) => *eval,
        });
        for outcome in &outcomes {
            match outcome {
                ElectionOutcome::Won(eval) | ElectionOutcome::Abandoned(eval) => {
                    self.elections.remove(eval);
                }
            }
        }
        outcomes
    }

    /// Whether an election for `eval` goes on here.
    pub fn electing(&self, eval: EvalId) -> bool {
        self.elections.contains_key(&eval)
    }

    /// The statuses of the other nodes heard within [`STATUS_FRESH`], by address.
    pub fn statuses(&self, now: Instant) -> Vec<JobMessage> {
        let mut fresh: Vec<&JobMessage> = self
            .statuses
            .values()
            .filter(|(_, at)| within(*at, now, STATUS_FRESH))
            .map(|(status, _)| status)
            .collect();
        fresh.sort_by_key(|status| match status {
            JobMessage::NodeStatus { address, .. } => address.clone(),
            _ => String::new(),
        });
        fresh.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_module_waits_for_its_replicas_or_for_the_wait_to_pass() {
        let submitted = 1_000_000;
        let wait = REPLICATION_WAIT.as_millis() as u64;
        assert!(
            may_hand_out(0, 0, submitted, submitted),
            "no cluster: at once"
        );
        assert!(
            !may_hand_out(5, 1, submitted, submitted),
            "one holder of two"
        );
        assert!(may_hand_out(5, 2, submitted, submitted), "two holders");
        assert!(
            may_hand_out(1, 1, submitted, submitted),
            "as many as the cluster has"
        );
        assert!(!may_hand_out(5, 0, submitted, submitted + wait - 1));
        assert!(
            may_hand_out(5, 0, submitted, submitted + wait),
            "the wait passed"
        );
    }
    use teia_core::identity::Identity;

    fn key(n: u8) -> PublicKey {
        Identity::from_seed(&[n; 32]).public_key()
    }

    fn rules(me: &str, n: u8) -> ClusterRules {
        ClusterRules::new(Trust {
            me: me.into(),
            key: Some(key(n)),
            trusted: vec![key(9)],
            secret: Some("s".into()),
            stands: true,
        })
    }

    fn hello(proof: Option<String>) -> JobMessage {
        JobMessage::ClusterHello {
            proof,
            port: Some(7),
        }
    }

    #[test]
    fn trust_is_a_trust_key_or_a_proof_bound_to_the_key() {
        let mut a = rules("a", 1);
        let now = Instant::now();
        let proof_b = messages::proof("s", "b", &key(2));
        assert_eq!(
            a.receive("b", None, &hello(Some(proof_b.clone())), now),
            Verdict::Refused(Refusal::Unproven)
        );
        assert_eq!(
            a.receive("b", Some(key(3)), &hello(Some(proof_b.clone())), now),
            Verdict::Refused(Refusal::Untrusted)
        );
        assert_eq!(
            a.receive("a", Some(key(1)), &hello(None), now),
            Verdict::Refused(Refusal::Impostor)
        );
        assert_eq!(
            a.receive("b", Some(key(2)), &hello(Some(proof_b)), now),
            Verdict::Admitted {
                new: true,
                greet_back: true
            }
        );
        assert_eq!(
            a.receive("c", Some(key(9)), &hello(None), now),
            Verdict::Admitted {
                new: true,
                greet_back: true
            }
        );
        assert_eq!(a.members(now), vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(a.port("b"), Some(7));
        // Greeted back once per HELLO_EVERY.
        assert_eq!(
            a.receive("c", Some(key(9)), &hello(None), now),
            Verdict::Admitted {
                new: false,
                greet_back: false
            }
        );
        // A member speaks only under its key, for itself, while fresh.
        let request = JobMessage::TaskRequest { request: 1 };
        assert_eq!(
            a.receive("b", Some(key(2)), &request, now),
            Verdict::Accepted
        );
        assert_eq!(
            a.receive("b", Some(key(3)), &request, now),
            Verdict::Refused(Refusal::OtherKey)
        );
        let candidacy = JobMessage::RecoveryElection {
            eval: 1,
            candidate: "c".into(),
        };
        assert_eq!(
            a.receive("b", Some(key(2)), &candidacy, now),
            Verdict::Refused(Refusal::ForAnother)
        );
        let later = now + MEMBER_FRESH;
        assert_eq!(
            a.receive("b", Some(key(2)), &request, later),
            Verdict::Refused(Refusal::NotMember)
        );
        assert!(a.members(later).is_empty());
    }

    #[test]
    fn refusals_are_logged_once_per_period_with_their_count() {
        let mut a = rules("a", 1);
        let now = Instant::now();
        assert_eq!(a.refused("x", now), Some(1));
        assert_eq!(a.refused("x", now), None);
        assert_eq!(a.refused("x", now + Duration::from_secs(1)), None);
        assert_eq!(a.refused("x", now + REFUSAL_LOG_EVERY), Some(3));
    }

    #[test]
    fn the_lowest_candidate_wins_and_a_loser_starts_over() {
        let now = Instant::now();
        let mut b = rules("b", 2);
        let mut c = rules("c", 3);
        for (node, other, n) in [(&mut b, "c", 3), (&mut c, "b", 2)] {
            let proof = messages::proof("s", other, &key(n));
            node.receive(other, Some(key(n)), &hello(Some(proof)), now);
            node.pulled("a", now);
            assert_eq!(node.pull_failed("a", &[5], now), Suspicion::Waiting);
            assert_eq!(
                node.pull_failed("a", &[5], now + OWNER_GONE),
                Suspicion::Gone { stand: vec![5] }
            );
        }
        let t = now + OWNER_GONE;
        let from_b = JobMessage::RecoveryElection {
            eval: 5,
            candidate: "b".into(),
        };
        let from_c = JobMessage::RecoveryElection {
            eval: 5,
            candidate: "c".into(),
        };
        assert_eq!(c.receive("b", Some(key(2)), &from_b, t), Verdict::Accepted);
        assert_eq!(b.receive("c", Some(key(3)), &from_c, t), Verdict::Accepted);
        assert!(b.count_votes(t).is_empty());
        let closed = t + ELECTION_TIME;
        assert_eq!(b.count_votes(closed), vec![ElectionOutcome::Won(5)]);
        assert!(c.count_votes(closed).is_empty());
        assert!(c.electing(5));
        let patience = t + ELECTION_TIME * ELECTION_PATIENCE;
        assert_eq!(c.count_votes(patience), vec![ElectionOutcome::Abandoned(5)]);
        assert!(!c.electing(5));
        assert_eq!(
            c.pull_failed("a", &[5], patience),
            Suspicion::Gone { stand: vec![5] }
        );
        // The winner's word ends the election.
        let update = JobMessage::EvaluationResponsibilityUpdate {
            eval: 5,
            owner: "b".into(),
        };
        assert_eq!(
            c.receive("b", Some(key(2)), &update, patience),
            Verdict::Accepted
        );
        assert!(!c.electing(5));
        assert_eq!(c.pull_failed("a", &[], patience), Suspicion::Forgotten);
        assert!(c.suspects().is_empty());
    }

    #[test]
    fn a_candidacy_heard_before_standing_counts() {
        let now = Instant::now();
        let mut c = rules("c", 3);
        let proof = messages::proof("s", "b", &key(2));
        c.receive("b", Some(key(2)), &hello(Some(proof)), now);
        c.pulled("a", now);
        // b found the owner gone first: its candidacy comes before c stands.
        let from_b = JobMessage::RecoveryElection {
            eval: 5,
            candidate: "b".into(),
        };
        let t = now + OWNER_GONE;
        assert_eq!(c.receive("b", Some(key(2)), &from_b, t), Verdict::Accepted);
        let later = t + Duration::from_millis(300);
        assert_eq!(
            c.pull_failed("a", &[5], later),
            Suspicion::Gone { stand: vec![5] }
        );
        // c does not win against b, and waits for it.
        assert!(c.count_votes(later + ELECTION_TIME).is_empty());
        assert!(c.electing(5));
        // One heard longer ago than the patience does not count.
        let mut d = rules("d", 4);
        let proof = messages::proof("s", "b", &key(2));
        d.receive("b", Some(key(2)), &hello(Some(proof)), now);
        d.pulled("a", now);
        assert_eq!(
            d.receive("b", Some(key(2)), &from_b, now),
            Verdict::Accepted
        );
        let stale = now + ELECTION_TIME * ELECTION_PATIENCE;
        assert_eq!(
            d.pull_failed("a", &[5], stale),
            Suspicion::Gone { stand: vec![5] }
        );
        assert_eq!(
            d.count_votes(stale + ELECTION_TIME),
            vec![ElectionOutcome::Won(5)]
        );
    }

    #[test]
    fn members_and_ports_stay_bounded() {
        let mut a = ClusterRules::new(Trust {
            me: "a".into(),
            key: Some(key(1)),
            trusted: Vec::new(),
            secret: Some("s".into()),
            stands: true,
        });
        let start = Instant::now();
        for n in 0..MAX_OWNERS + 44 {
            let peer = format!("p{n:03}");
            let peer_key = Identity::from_seed(&[(n % 200) as u8 + 10; 32]).public_key();
            let proof = messages::proof("s", &peer, &peer_key);
            let at = start + Duration::from_millis(n as u64);
            let verdict = a.receive(&peer, Some(peer_key), &hello(Some(proof)), at);
            assert!(matches!(verdict, Verdict::Admitted { new: true, .. }));
        }
        let now = start + Duration::from_millis(400);
        let members = a.members(now);
        assert_eq!(members.len(), MAX_OWNERS);
        // The stalest were forgotten; the newest is a member with its port.
        assert!(!members.contains(&"p000".to_owned()));
        assert_eq!(a.port("p299"), Some(7));
        assert!(a.ports.len() <= MAX_OWNERS);
        assert!(a.greeted.len() <= MAX_OWNERS);
    }
}
