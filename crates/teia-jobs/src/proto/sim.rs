//! A seeded simulator of a cluster of job engines in one process: each node has its
//! [`ClusterRules`] and [`Ledger`] and one worker; job messages go on a bus with random
//! delays and lost copies (retransmitted, as the overlay's acknowledged SENDs are), ledger
//! pulls fail at random, and time is the simulator's. Every choice comes from a seed, and
//! a run of 60 nodes takes milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use teia_core::identity::{Identity, PublicKey};
use teia_core::rng::SplitMix64;

use super::cluster::{
    ClusterRules, ElectionOutcome, Refusal, Suspicion, Trust, Verdict, ELECTION_TIME,
};
use super::discover::FoundModule;
use super::ledger::{
    Completed, EvalId, Evaluation, Lease, Ledger, ModuleResult, ModuleState, NewProject,
};
use super::messages::JobMessage;

const SECRET: &str = "the simulated cluster";
/// The simulator's step.
const STEP: Duration = Duration::from_millis(20);
/// A lease's length without renewal, as the runtime's.
const LEASE_MS: u64 = super::cluster::REMOTE_LEASE_MS;
const EVAL: EvalId = 1;

/// How the network and the nodes behave in one run.
#[derive(Clone)]
struct Network {
    /// Longest delay of one copy of a message.
    max_delay: Duration,
    /// Chance in 1000 that a copy is lost (and sent again after [`Network::retransmit`]).
    loss: u64,
    /// Time before a lost copy is sent again.
    retransmit: Duration,
    /// Chance in 1000 that a ledger pull fails though its owner lives.
    pull_loss: u64,
}

impl Network {
    /// The longest a message can take: two copies lost, the third late.
    fn worst(&self) -> Duration {
        self.max_delay + self.retransmit * 2
    }
}

/// A job message on the bus.
struct Envelope {
    from: String,
    to: usize,
    /// The key that proved its origin.
    key: Option<PublicKey>,
    message: JobMessage,
    /// A forged message, and why it must be refused.
    forged: Option<Refusal>,
}

/// What a node's one worker does.
enum Worker {
    Idle,
    Asking {
        owner: String,
        request: u64,
        since: Instant,
    },
    Running {
        owner: String,
        lease: Lease,
        until: Instant,
        renew: Instant,
    },
}

struct SimNode {
    id: String,
    identity: Identity,
    rules: ClusterRules,
    ledger: Ledger,
    alive: bool,
    /// Says that every module it runs passed.
    liar: bool,
    /// Runs modules (its own and others').
    works: bool,
    worker: Worker,
    /// When its duties of each period come next: (every second, every 250 ms, every 2 s).
    next: (Instant, Instant, Instant),
}

/// A module's true result: what an honest worker reports.
fn truth(module: &str, node: &str) -> ModuleResult {
    let n = module.len() as u32 + module.bytes().map(u32::from).sum::<u32>() % 7;
    ModuleResult {
        passed: n,
        failed: 1 + n % 3,
        errors: 0,
        skipped: 0,
        seconds: 0.1,
        node: node.to_owned(),
        ..ModuleResult::default()
    }
}

fn same(a: &ModuleResult, b: &ModuleResult) -> bool {
    (a.passed, a.failed, a.errors, a.skipped) == (b.passed, b.failed, b.errors, b.skipped)
}

struct Sim {
    start: Instant,
    now: Instant,
    rng: SplitMix64,
    net: Network,
    nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    envelopes: HashMap<u64, Envelope>,
    seq: u64,
    /// Verification share on owners, per thousand.
    verify: u64,
    /// Candidacies: (node, eval, when).
    stood: Vec<(usize, EvalId, Instant)>,
    /// Elections won: (node, eval, when).
    won: Vec<(usize, EvalId, Instant)>,
    /// Elections a loser forgot, not hearing its winner (to stand again).
    abandoned: usize,
    /// Forged messages refused with the expected reason and no change of state.
    forged_refused: usize,
    /// Results of a lying node its owner took (first runs and verifications).
    liar_counted: usize,
}

fn name(index: usize) -> String {
    format!("n{index:02}")
}

fn identity(index: usize, salt: u8) -> Identity {
    let mut seed = [salt; 32];
    seed[..8].copy_from_slice(&(index as u64 + 1).to_le_bytes());
    Identity::from_seed(&seed)
}

impl Sim {
    fn new(count: usize, seed: u64, net: Network) -> Self {
        let start = Instant::now();
        let mut rng = SplitMix64::new(seed);
        let nodes = (0..count)
            .map(|i| {
                let identity = identity(i, 0);
                let rules = ClusterRules::new(Trust {
                    me: name(i),
                    key: Some(identity.public_key()),
                    trusted: Vec::new(),
                    secret: Some(SECRET.to_owned()),
                    stands: true,
                });
                let mut phase = || start + Duration::from_millis(rng.below(1000));
                let next = (phase(), phase(), phase());
                SimNode {
                    id: name(i),
                    identity,
                    rules,
                    ledger: Ledger::default(),
                    alive: true,
                    liar: false,
                    works: true,
                    worker: Worker::Idle,
                    next,
                }
            })
            .collect();
        Self {
            start,
            now: start,
            rng,
            net,
            nodes,
            queue: BinaryHeap::new(),
            envelopes: HashMap::new(),
            seq: 0,
            verify: 0,
            stood: Vec::new(),
            won: Vec::new(),
            abandoned: 0,
            forged_refused: 0,
            liar_counted: 0,
        }
    }

    /// How long a module runs.
    fn run_time(&mut self) -> Duration {
        Duration::from_millis(300 + self.rng.below(1200))
    }

    fn ms(&self) -> u64 {
        self.now.duration_since(self.start).as_millis() as u64
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Puts `message` from node `from` on the bus to `to`, signed by its key.
    fn send(&mut self, from: usize, to: &str, message: JobMessage) {
        let Some(to) = self.index(to) else {
            return;
        };
        let node = &self.nodes[from];
        let envelope = Envelope {
            from: node.id.clone(),
            to,
            key: Some(node.identity.public_key()),
            message,
            forged: None,
        };
        self.post(envelope);
    }

    /// Puts `envelope` on the bus: a random delay, plus a retransmission for each lost copy
    /// (at most two).
    fn post(&mut self, envelope: Envelope) {
        let mut delay =
            Duration::from_millis(self.rng.below(self.net.max_delay.as_millis() as u64 + 1));
        for _ in 0..2 {
            if self.rng.below(1000) < self.net.loss {
                delay += self.net.retransmit;
            }
        }
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.envelopes.insert(self.seq, envelope);
    }

    fn broadcast(&mut self, from: usize, message: &JobMessage) {
        let members = self.nodes[from].rules.members(self.now);
        for member in members {
            self.send(from, &member, message.clone());
        }
    }

    fn hello(&self, from: usize) -> JobMessage {
        JobMessage::ClusterHello {
            proof: self.nodes[from].rules.proof(),
            port: None,
        }
    }

    /// Runs the simulation for `duration`, or until `done` holds.
    fn run(&mut self, duration: Duration, done: impl Fn(&Sim) -> bool) {
        let end = self.now + duration;
        while self.now < end && !done(self) {
            self.now += STEP;
            while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                if let Some(envelope) = self.envelopes.remove(&seq) {
                    self.deliver(envelope);
                }
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive {
                    self.duties(i);
                }
            }
        }
    }

    fn deliver(&mut self, envelope: Envelope) {
        let to = envelope.to;
        if !self.nodes[to].alive {
            return;
        }
        let now = self.now;
        let before = envelope
            .forged
            .map(|_| format!("{:?}", self.nodes[to].rules));
        let verdict =
            self.nodes[to]
                .rules
                .receive(&envelope.from, envelope.key, &envelope.message, now);
        if let Some(expected) = envelope.forged {
            assert_eq!(
                verdict,
                Verdict::Refused(expected),
                "{:?} from {}",
                envelope.message,
                envelope.from
            );
            assert_eq!(before, Some(format!("{:?}", self.nodes[to].rules)));
            self.forged_refused += 1;
            return;
        }
        match verdict {
            // A message that overtook its sender's CLUSTER_HELLO: dropped, as on a real node.
            Verdict::Refused(_) => {}
            Verdict::Admitted { greet_back, .. } => {
                if greet_back {
                    let hello = self.hello(to);
                    self.send(to, &envelope.from, hello);
                }
            }
            Verdict::Accepted => self.act(to, &envelope.from, envelope.message),
        }
    }

    /// What the runtime does with an accepted message.
    fn act(&mut self, at: usize, src: &str, message: JobMessage) {
        let (now, ms) = (self.now, self.ms());
        match message {
            JobMessage::TaskRequest { request } => {
                let me = self.nodes[at].id.clone();
                let lease = self.nodes[at].ledger.lease(&me, src, ms, LEASE_MS, ms);
                let answer = match lease {
                    Some(lease) => JobMessage::TaskSend {
                        request,
                        lease,
                        timeout_s: 60,
                        lease_ms: LEASE_MS,
                        holders: Vec::new(),
                    },
                    None => JobMessage::NoTasks { request },
                };
                self.send(at, src, answer);
            }
            JobMessage::TaskRenew { lease } => {
                self.nodes[at].ledger.renew(&lease, src, ms, LEASE_MS);
            }
            JobMessage::TaskResult { lease, result } => self.complete(at, &lease, src, *result),
            JobMessage::TaskSend { request, lease, .. } => {
                let run = self.run_time();
                let node = &mut self.nodes[at];
                if let Worker::Asking {
                    owner,
                    request: asked,
                    ..
                } = &node.worker
                {
                    if *asked == request && owner == src {
                        node.worker = Worker::Running {
                            owner: src.to_owned(),
                            lease,
                            until: now + run,
                            renew: now + Duration::from_millis(500),
                        };
                    }
                }
            }
            JobMessage::NoTasks { request } => {
                let node = &mut self.nodes[at];
                if matches!(&node.worker, Worker::Asking { owner, request: asked, .. } if *asked == request && owner == src)
                {
                    node.rules.no_modules(src);
                    node.worker = Worker::Idle;
                }
            }
            JobMessage::EvaluationResponsibilityUpdate { eval, .. } => {
                self.nodes[at].ledger.take_over(eval, src);
            }
            JobMessage::ClusterHello { .. }
            | JobMessage::TaskAnnounce { .. }
            | JobMessage::RecoveryElection { .. }
            | JobMessage::NodeStatus { .. }
            | JobMessage::ProjectHeld { .. } => {}
        }
    }

    /// An owner records `worker`'s result, verifying the seeded share of them.
    fn complete(&mut self, at: usize, lease: &Lease, worker: &str, result: ModuleResult) {
        let ms = self.ms();
        let verify = self.rng.below(1000) < self.verify;
        let node = &mut self.nodes[at];
        let me = node.id.clone();
        let completed = node
            .ledger
            .complete_or_verify(lease, worker, result, ms, verify, &me, true);
        let liar = |id: &str| self.nodes.iter().any(|n| n.liar && n.id == id);
        if completed != Completed::Refused && liar(worker) {
            self.liar_counted += 1;
        }
        if let Completed::Disputed { stands, .. } = &completed {
            assert!(!liar(&stands.node), "a liar's result stands");
        }
    }

    /// A node's periodic duties and its worker.
    fn duties(&mut self, i: usize) {
        let now = self.now;
        if self.nodes[i].next.0 <= now {
            self.nodes[i].next.0 += Duration::from_secs(1);
            self.greet(i);
            let owners = self.nodes[i].rules.to_replicate(now);
            for owner in owners {
                self.pull(i, &owner);
            }
            self.count_votes(i);
            self.announce(i);
        }
        if self.nodes[i].next.1 <= now {
            self.nodes[i].next.1 += Duration::from_millis(250);
            // Only an owner's leases are its to take back.
            let node = &mut self.nodes[i];
            if node.ledger.owned_by(&node.id).next().is_some() {
                let ms = self.ms();
                self.nodes[i].ledger.expire(ms, ms);
            }
            for owner in self.nodes[i].rules.suspects() {
                self.pull(i, &owner);
            }
            self.count_votes(i);
        }
        if self.nodes[i].next.2 <= now {
            self.nodes[i].next.2 += Duration::from_secs(2);
            let status = JobMessage::NodeStatus {
                peer_id: self.nodes[i].id.clone(),
                address: self.nodes[i].id.clone(),
                neighbours: Vec::new(),
                passed: 0,
                failed: 0,
                projects: 0,
                modules: 0,
                evaluations: Vec::new(),
            };
            self.broadcast(i, &status);
        }
        self.work(i);
    }

    fn greet(&mut self, i: usize) {
        let everyone: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        let due = self.nodes[i].rules.to_greet(everyone, self.now);
        for peer in due {
            let hello = self.hello(i);
            self.send(i, &peer, hello);
        }
    }

    fn announce(&mut self, i: usize) {
        let me = self.nodes[i].id.clone();
        let pending: u32 = self.nodes[i]
            .ledger
            .owned_by(&me)
            .filter(|e| e.status() != "done")
            .flat_map(|e| e.projects.values().flat_map(|p| p.modules.values()))
            .filter(|m| matches!(m.state, ModuleState::Pending { .. }))
            .count() as u32;
        let unfinished = self.nodes[i]
            .ledger
            .owned_by(&me)
            .filter(|e| e.status() != "done")
            .count() as u32;
        if unfinished > 0 {
            let announce = JobMessage::TaskAnnounce {
                owner: me,
                port: None,
                pending,
                unfinished,
                scripts: 0,
            };
            self.broadcast(i, &announce);
        }
    }

    /// Node `i` pulls `owner`'s ledger; a failed pull may find the owner gone.
    fn pull(&mut self, i: usize, owner: &str) {
        let now = self.now;
        let source = self.index(owner).filter(|o| self.nodes[*o].alive);
        let lost = self.rng.below(1000) < self.net.pull_loss;
        let me = self.nodes[i].id.clone();
        match source {
            Some(o) if !lost => {
                let theirs: Vec<Evaluation> =
                    self.nodes[o].ledger.owned_by(owner).cloned().collect();
                let node = &mut self.nodes[i];
                for evaluation in theirs {
                    let ours = node
                        .ledger
                        .get(evaluation.id)
                        .is_some_and(|e| e.owner == me);
                    if !ours {
                        node.ledger.replicate(evaluation);
                    }
                }
                node.rules.pulled(owner, now);
            }
            _ => {
                let node = &mut self.nodes[i];
                let replicas: Vec<EvalId> = node
                    .ledger
                    .owned_by(owner)
                    .filter(|e| e.status() != "done")
                    .map(|e| e.id)
                    .collect();
                if let Suspicion::Gone { stand } = node.rules.pull_failed(owner, &replicas, now) {
                    for eval in stand {
                        self.stood.push((i, eval, now));
                        let candidacy = JobMessage::RecoveryElection {
                            eval,
                            candidate: me.clone(),
                        };
                        self.broadcast(i, &candidacy);
                    }
                }
            }
        }
    }

    fn count_votes(&mut self, i: usize) {
        let now = self.now;
        let me = self.nodes[i].id.clone();
        for outcome in self.nodes[i].rules.count_votes(now) {
            let eval = match outcome {
                ElectionOutcome::Won(eval) => eval,
                ElectionOutcome::Abandoned(_) => {
                    self.abandoned += 1;
                    continue;
                }
            };
            self.won.push((i, eval, now));
            let node = &mut self.nodes[i];
            node.ledger.take_over(eval, &me);
            if let Some(mut evaluation) = node.ledger.get(eval).cloned() {
                evaluation.requeue_running();
                node.ledger.replicate(evaluation);
            }
            let update = JobMessage::EvaluationResponsibilityUpdate {
                eval,
                owner: me.clone(),
            };
            self.broadcast(i, &update);
        }
    }

    /// Node `i`'s worker: its own modules first, else one of an owner that announced some.
    fn work(&mut self, i: usize) {
        if !self.nodes[i].works {
            return;
        }
        let (now, ms) = (self.now, self.ms());
        let me = self.nodes[i].id.clone();
        let worker = std::mem::replace(&mut self.nodes[i].worker, Worker::Idle);
        match worker {
            Worker::Idle => {
                if let Some(lease) = self.nodes[i].ledger.lease(&me, &me, ms, LEASE_MS, ms) {
                    let run = self.run_time();
                    self.nodes[i].worker = Worker::Running {
                        owner: me,
                        lease,
                        until: now + run,
                        renew: now + Duration::from_millis(500),
                    };
                    return;
                }
                let Some((owner, _)) = self.nodes[i].rules.owner_for_modules(0, now) else {
                    return;
                };
                self.seq += 1;
                let request = self.seq;
                self.nodes[i].worker = Worker::Asking {
                    owner: owner.clone(),
                    request,
                    since: now,
                };
                self.send(i, &owner, JobMessage::TaskRequest { request });
            }
            Worker::Asking {
                owner,
                request,
                since,
            } => {
                if now.duration_since(since) >= Duration::from_secs(3) {
                    self.nodes[i].rules.no_modules(&owner);
                } else {
                    self.nodes[i].worker = Worker::Asking {
                        owner,
                        request,
                        since,
                    };
                }
            }
            Worker::Running {
                owner,
                lease,
                until,
                renew,
            } => {
                if until <= now {
                    let mut result = truth(&lease.module, &me);
                    if self.nodes[i].liar {
                        result.passed += result.failed;
                        result.failed = 0;
                    }
                    if owner == me {
                        self.complete(i, &lease, &me, result);
                    } else {
                        self.send(
                            i,
                            &owner,
                            JobMessage::TaskResult {
                                lease,
                                result: Box::new(result),
                            },
                        );
                    }
                } else if renew <= now {
                    if owner == me {
                        self.nodes[i].ledger.renew(&lease, &me, ms, LEASE_MS);
                    } else {
                        self.send(
                            i,
                            &owner,
                            JobMessage::TaskRenew {
                                lease: lease.clone(),
                            },
                        );
                    }
                    let renew = now + Duration::from_millis(500);
                    self.nodes[i].worker = Worker::Running {
                        owner,
                        lease,
                        until,
                        renew,
                    };
                } else {
                    self.nodes[i].worker = Worker::Running {
                        owner,
                        lease,
                        until,
                        renew,
                    };
                }
            }
        }
    }

    /// Node `owner` submits evaluation [`EVAL`] of `modules` modules.
    fn submit(&mut self, owner: usize, modules: usize) {
        let me = self.nodes[owner].id.clone();
        let ms = self.ms();
        let project = NewProject {
            name: "p".into(),
            blob: "b".into(),
            content: None,
            module_content: Default::default(),
            modules: (0..modules)
                .map(|m| FoundModule {
                    path: format!("tests/test_{m:02}.py"),
                    estimated_tests: 1,
                    may_split: true,
                })
                .collect(),
        };
        self.nodes[owner]
            .ledger
            .submit(EVAL, &me, ms, vec![project]);
    }

    fn kill(&mut self, index: usize) {
        self.nodes[index].alive = false;
    }

    /// The evaluation as the node that owns it (by its own ledger) sees it, if one lives.
    fn owned(&self) -> Option<(usize, &Evaluation)> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            let evaluation = n.ledger.get(EVAL)?;
            (n.alive && evaluation.owner == n.id).then_some((i, evaluation))
        })
    }

    fn finished(&self) -> bool {
        self.owned().is_some_and(|(_, e)| e.status() == "done")
    }
}

/// Asserts that the evaluation is done with each module's true result counted once.
fn assert_counted_once(evaluation: &Evaluation) {
    assert_eq!(evaluation.status(), "done");
    let mut passed = 0;
    let mut expected = 0;
    for (path, module) in evaluation.projects.values().flat_map(|p| p.modules.iter()) {
        let ModuleState::Done(result) = &module.state else {
            panic!("{path} not done");
        };
        assert!(same(result, &truth(path, "")), "{path}: {result:?}");
        passed += result.passed;
        expected += truth(path, "").passed;
    }
    assert_eq!(passed, expected);
    assert_eq!(evaluation.counts().0.passed, expected);
}

fn quiet() -> Network {
    Network {
        max_delay: Duration::from_millis(40),
        loss: 20,
        retransmit: Duration::from_millis(100),
        pull_loss: 50,
    }
}

/// Runs an owner's death in a cluster of `count` on `net`; kills the first candidate to
/// stand too when `kill_candidate`. Returns the simulation once the evaluation is done.
fn owner_dies(count: usize, seed: u64, net: Network, kill_candidate: bool) -> Sim {
    let mut sim = Sim::new(count, seed, net);
    let owner = 1 + sim.rng.below(count as u64 - 1) as usize;
    sim.run(Duration::from_secs(2), |_| false);
    assert!(sim
        .nodes
        .iter()
        .all(|n| n.rules.members(sim.now).len() == count - 1));
    sim.submit(owner, 200);
    let dies = Duration::from_millis(1500 + sim.rng.below(1500));
    sim.run(dies, |_| false);
    let done_before = sim.nodes[owner]
        .ledger
        .get(EVAL)
        .map(|e| e.status() == "done")
        .unwrap();
    assert!(
        !done_before,
        "seed {seed}: the evaluation ended before its owner died"
    );
    sim.kill(owner);
    if kill_candidate {
        sim.run(Duration::from_secs(10), |s| !s.stood.is_empty());
        let first = sim.stood.iter().map(|(i, _, _)| *i).min().unwrap();
        sim.run(Duration::from_millis(100), |_| false);
        sim.kill(first);
    }
    sim.run(Duration::from_secs(60), Sim::finished);
    let (winner, evaluation) = sim
        .owned()
        .unwrap_or_else(|| panic!("seed {seed}: no owner"));
    assert_counted_once(evaluation);
    // One live owner, and every live node that replicates the evaluation agrees on it.
    let live_wins: Vec<usize> = sim
        .won
        .iter()
        .map(|(i, _, _)| *i)
        .filter(|i| sim.nodes[*i].alive)
        .collect();
    assert_eq!(
        live_wins,
        vec![winner],
        "seed {seed}: winners {:?}",
        sim.won
    );
    let winner_id = sim.nodes[winner].id.clone();
    for node in sim.nodes.iter().filter(|n| n.alive) {
        let owner = node.ledger.get(EVAL).map(|e| e.owner.clone());
        assert_eq!(
            owner.as_deref(),
            Some(winner_id.as_str()),
            "seed {seed}: {}",
            node.id
        );
    }
    sim
}

#[test]
fn owner_death_elects_the_lowest_candidate_once_and_the_evaluation_finishes() {
    for seed in 0..20 {
        let net = quiet();
        let worst = net.worst();
        let sim = owner_dies(60, seed, net, false);
        let (winner, _, closed) = sim.won[0];
        assert_eq!(sim.won.len(), 1, "seed {seed}");
        // Every candidacy the winner could hear before its election closed was higher.
        for (candidate, _, at) in &sim.stood {
            if *at + worst <= closed {
                assert!(
                    *candidate >= winner,
                    "seed {seed}: {candidate} beat {winner}"
                );
            }
        }
        let standing = sim.stood.len();
        assert!(standing > 1, "seed {seed}: only {standing} stood");
    }
}

#[test]
fn split_votes_converge_on_one_owner() {
    let jittery = Network {
        max_delay: Duration::from_millis(150),
        loss: 100,
        retransmit: Duration::from_millis(150),
        pull_loss: 100,
    };
    assert!(jittery.worst() * 2 < ELECTION_TIME);
    let mut restarted = 0;
    for seed in 0..20 {
        let sim = owner_dies(60, 100 + seed, jittery.clone(), seed % 2 == 1);
        // Candidacies came at different times: nodes stood over a spread of time.
        let first = sim.stood.iter().map(|(_, _, at)| *at).min().unwrap();
        let last = sim.stood.iter().map(|(_, _, at)| *at).max().unwrap();
        assert!(last > first, "seed {seed}");
        if sim.abandoned > 0 {
            restarted += 1;
        }
    }
    // A winner that died before saying so made the others start over, and they agreed.
    assert!(restarted > 0);
}

#[test]
fn forged_messages_are_refused_and_change_nothing() {
    for seed in 0..20 {
        let mut sim = Sim::new(50, 200 + seed, quiet());
        sim.run(Duration::from_secs(2), |_| false);
        sim.submit(3, 10);
        let stranger = identity(99, 0).public_key();
        let thief = identity(98, 7).public_key();
        for round in 0..40 {
            let to = sim.rng.below(50) as usize;
            let member = (to + 1 + sim.rng.below(49) as usize) % 50;
            let other = (member + 1 + sim.rng.below(48) as usize) % 50;
            let member_id = name(member);
            let other_id = name(other);
            let member_key = sim.nodes[member].identity.public_key();
            let proof = sim.nodes[member].rules.proof();
            let forged: Vec<(String, Option<PublicKey>, JobMessage, Refusal)> = vec![
                // No key proved it.
                ("x9".into(), None, sim.hello(member), Refusal::Unproven),
                // A key nobody trusts, with no proof or another node's proof.
                (
                    "x9".into(),
                    Some(stranger),
                    JobMessage::ClusterHello {
                        proof: None,
                        port: None,
                    },
                    Refusal::Untrusted,
                ),
                (
                    "x9".into(),
                    Some(stranger),
                    JobMessage::ClusterHello {
                        proof: proof.clone(),
                        port: None,
                    },
                    Refusal::Untrusted,
                ),
                // A member's id with another key, its proof stolen.
                (
                    member_id.clone(),
                    Some(thief),
                    JobMessage::ClusterHello { proof, port: None },
                    Refusal::Untrusted,
                ),
                (
                    member_id.clone(),
                    Some(thief),
                    JobMessage::TaskRequest { request: round },
                    Refusal::OtherKey,
                ),
                // A stranger's job messages.
                (
                    "x9".into(),
                    Some(stranger),
                    JobMessage::TaskAnnounce {
                        owner: "x9".into(),
                        port: None,
                        pending: 9,
                        unfinished: 1,
                        scripts: 0,
                    },
                    Refusal::NotMember,
                ),
                // Claiming to be the receiver.
                (
                    name(to),
                    Some(stranger),
                    JobMessage::ClusterHello {
                        proof: None,
                        port: None,
                    },
                    Refusal::Impostor,
                ),
                // A member speaking for another node.
                (
                    member_id.clone(),
                    Some(member_key),
                    JobMessage::TaskAnnounce {
                        owner: other_id.clone(),
                        port: None,
                        pending: 9,
                        unfinished: 1,
                        scripts: 0,
                    },
                    Refusal::ForAnother,
                ),
                (
                    member_id.clone(),
                    Some(member_key),
                    JobMessage::RecoveryElection {
                        eval: EVAL,
                        candidate: other_id.clone(),
                    },
                    Refusal::ForAnother,
                ),
                (
                    member_id.clone(),
                    Some(member_key),
                    JobMessage::EvaluationResponsibilityUpdate {
                        eval: EVAL,
                        owner: other_id.clone(),
                    },
                    Refusal::ForAnother,
                ),
                (
                    member_id,
                    Some(member_key),
                    JobMessage::NodeStatus {
                        peer_id: other_id,
                        address: String::new(),
                        neighbours: vec!["x9".into()],
                        passed: 0,
                        failed: 0,
                        projects: 0,
                        modules: 0,
                        evaluations: Vec::new(),
                    },
                    Refusal::ForAnother,
                ),
            ];
            for (from, key, message, why) in forged {
                sim.post(Envelope {
                    from,
                    to,
                    key,
                    message,
                    forged: Some(why),
                });
            }
            sim.run(Duration::from_millis(50), |_| false);
        }
        sim.run(sim.net.worst() + STEP, |_| false);
        sim.run(Duration::from_secs(30), Sim::finished);
        assert_eq!(sim.forged_refused, 40 * 11, "seed {seed}");
        let (owner, evaluation) = sim.owned().unwrap();
        assert_eq!(owner, 3);
        assert_counted_once(evaluation);
        // Nobody took a stranger for a member or an owner.
        for node in &sim.nodes {
            assert!(node.rules.member_key("x9", sim.now).is_none());
            assert!(node.rules.to_replicate(sim.now).iter().all(|o| o == "n03"));
        }
    }
}

#[test]
fn a_lying_member_is_disputed_and_the_owners_run_stands() {
    for seed in 0..20 {
        let mut sim = Sim::new(50, 300 + seed, quiet());
        sim.verify = 1000;
        let (owner, liar) = (4, 9);
        for (i, node) in sim.nodes.iter_mut().enumerate() {
            node.works = i == owner || i == liar;
        }
        sim.nodes[liar].liar = true;
        sim.run(Duration::from_secs(2), |_| false);
        sim.submit(owner, 30);
        sim.run(Duration::from_secs(120), Sim::finished);
        let (at, evaluation) = sim.owned().unwrap();
        assert_eq!(at, owner);
        assert_counted_once(evaluation);
        let liar_id = name(liar);
        let mut disputed = 0;
        for module in evaluation
            .projects
            .values()
            .flat_map(|p| p.modules.values())
        {
            if let Some(other) = &module.disputed {
                assert_eq!(other.node, liar_id, "seed {seed}");
                disputed += 1;
            }
        }
        // Every result the liar gave (a first run or a verification) is disputed.
        assert!(disputed > 0, "seed {seed}: the liar went unnoticed");
        assert_eq!(disputed, sim.liar_counted, "seed {seed}");
        let by: BTreeMap<&str, usize> = evaluation
            .projects
            .values()
            .flat_map(|p| p.modules.values())
            .filter_map(|m| match &m.state {
                ModuleState::Done(r) => Some(r.node.as_str()),
                _ => None,
            })
            .fold(BTreeMap::new(), |mut by, node| {
                *by.entry(node).or_default() += 1;
                by
            });
        assert!(!by.contains_key(liar_id.as_str()), "seed {seed}: {by:?}");
    }
}
