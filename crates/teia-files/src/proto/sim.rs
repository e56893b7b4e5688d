//! A seeded simulator of one download's [`Swarm`] in one process: dozens of holders, each
//! honest, corrupt (some of its chunks are wrong), stalling (it stops sending), slow, or
//! leaving at some time, answer the swarm's questions for holders, and the simulator plays
//! the runtime: it opens streams, keeps every holder's window full, checks each chunk
//! against the file (as the outboard does) and reports the ends. Time is the simulator's,
//! every choice comes from a seed, and a run of 60 holders takes milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use teia_core::identity::{Identity, PublicKey};
use teia_core::rng::SplitMix64;

use super::plan::HolderId;
use super::swarm::{Fault, Step, Swarm, NO_HOLDER_TIMEOUT};
use super::tree::Layout;

/// The simulator's step.
const STEP: Duration = Duration::from_millis(10);
/// Time a holder may send nothing while chunks are asked of it, as the runtime's.
const STALL: Duration = crate::download::STALL_TIMEOUT;
/// Holders one question for holders brings back, at most.
const ANSWERS: usize = 16;
/// Longest simulated download before the simulator calls it stuck.
const LIMIT: Duration = Duration::from_secs(1_800);
/// The simulated file: large enough for two streams per holder.
const SIZE: u64 = 100 * 1024 * 1024 + 12_345;

/// How one holder behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Sends every chunk right.
    Honest,
    /// Sends one chunk in four wrong.
    Corrupt,
    /// Sends a few chunks, then nothing.
    Stalling,
    /// Sends right, and leaves the network at this time after the start.
    Leaves(Duration),
}

/// One simulated holder.
struct Holder {
    peer: String,
    key: PublicKey,
    behaviour: Behaviour,
    /// Time it takes to send one chunk.
    per_chunk: Duration,
}

impl Holder {
    fn present(&self, since_start: Duration) -> bool {
        !matches!(self.behaviour, Behaviour::Leaves(at) if since_start >= at)
    }
}

/// One stream the simulated runtime has open.
struct Stream {
    holder: usize,
    id: HolderId,
    first: bool,
    /// When its outboard arrives (it is "connecting" before).
    opens_at: Instant,
    window: Option<usize>,
    outstanding: VecDeque<u32>,
    next_send: Instant,
    last_heard: Instant,
    sent: u32,
}

/// How a run ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Whether every chunk was verified.
    complete: bool,
    /// Simulated time taken.
    took: Duration,
    /// Ends reported, by fault (`None`: finished), counted.
    ends: BTreeMap<String, usize>,
    /// Bytes verified from each peer.
    sources: Vec<(String, u64)>,
    /// Holders whose key was banned.
    banned: Vec<usize>,
    /// Holders that sent a wrong chunk.
    lied: Vec<usize>,
    /// Streams opened to a holder after its key was banned.
    admitted_banned: usize,
}

/// A seeded run of one download.
struct Sim {
    rng: SplitMix64,
    holders: Vec<Holder>,
    layout: Layout,
    /// The file's true chunks.
    truth: Vec<u64>,
    /// The downloader's disk.
    disk: Vec<Option<u64>>,
}

impl Sim {
    fn new(seed: u64, behaviours: &[Behaviour]) -> Self {
        let mut rng = SplitMix64::new(seed);
        let holders = behaviours
            .iter()
            .enumerate()
            .map(|(i, &behaviour)| {
                let mut secret = [0u8; 32];
                secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
                Holder {
                    peer: format!("holder-{i:02}"),
                    key: Identity::from_seed(&secret).public_key(),
                    behaviour,
                    per_chunk: Duration::from_millis(20 + rng.below(180)),
                }
            })
            .collect();
        let layout = Layout::new(SIZE);
        let truth = (0..layout.chunks()).map(|_| rng.next_u64()).collect();
        Self {
            rng,
            holders,
            layout,
            truth,
            disk: vec![None; layout.chunks() as usize],
        }
    }

    /// What a holder sends for `chunk`.
    fn send(&mut self, holder: usize, chunk: u32) -> u64 {
        let right = self.truth[chunk as usize];
        match self.holders[holder].behaviour {
            Behaviour::Corrupt if self.rng.below(4) == 0 => !right,
            _ => right,
        }
    }

    fn run(&mut self) -> Outcome {
        let start = Instant::now();
        let mut now = start;
        let mut swarm = Swarm::new(now);
        let mut streams: Vec<Stream> = Vec::new();
        let mut ends: BTreeMap<String, usize> = BTreeMap::new();
        let mut banned: Vec<usize> = Vec::new();
        let mut admitted_banned = 0;
        let mut lied: Vec<usize> = Vec::new();
        let mut end = |swarm: &mut Swarm, stream: &Stream, fault: Option<Fault>| {
            if swarm.ended(stream.id, fault) {
                banned.push(stream.holder);
            }
            *ends.entry(format!("{fault:?}")).or_default() += 1;
        };
        let complete = loop {
            if swarm.is_complete() {
                break true;
            }
            if now.duration_since(start) >= LIMIT {
                break false;
            }
            let since_start = now.duration_since(start);
            match swarm.poll(now) {
                Step::Wait => {}
                Step::GiveUp => break false,
                Step::AskHolders => {
                    let present: Vec<usize> = (0..self.holders.len())
                        .filter(|&h| self.holders[h].present(since_start))
                        .collect();
                    for _ in 0..ANSWERS.min(present.len()) {
                        let h = present[self.rng.below(present.len() as u64) as usize];
                        let holder = &self.holders[h];
                        let was_banned = swarm.is_banned(&holder.key);
                        if let Some(id) = swarm.offer(&holder.peer, holder.key) {
                            admitted_banned += usize::from(was_banned);
                            let opens_at = now + Duration::from_millis(self.rng.below(200));
                            streams.push(Stream {
                                holder: h,
                                id,
                                first: true,
                                opens_at,
                                window: None,
                                outstanding: VecDeque::new(),
                                next_send: opens_at,
                                last_heard: opens_at,
                                sent: 0,
                            });
                        }
                    }
                }
            }
            let mut kept = Vec::with_capacity(streams.len());
            let mut seconds = Vec::new();
            for mut stream in std::mem::take(&mut streams) {
                let holder = &self.holders[stream.holder];
                if !holder.present(since_start) {
                    end(&mut swarm, &stream, Some(Fault::Gone));
                    continue;
                }
                if now < stream.opens_at {
                    kept.push(stream);
                    continue;
                }
                let window = match stream.window {
                    Some(window) => window,
                    None => {
                        swarm.plan(self.layout, &[]);
                        let started = swarm.ready(stream.id, stream.first).unwrap();
                        if started.second {
                            seconds.push(stream.holder);
                        }
                        stream.window = Some(started.window);
                        started.window
                    }
                };
                stream
                    .outstanding
                    .extend(swarm.next_requests(stream.id, window));
                let stalls = holder.behaviour == Behaviour::Stalling && stream.sent >= 3;
                let mut fault = None;
                while !stalls && stream.next_send <= now {
                    let Some(chunk) = stream.outstanding.pop_front() else {
                        stream.next_send = now;
                        break;
                    };
                    stream.next_send += self.holders[stream.holder].per_chunk;
                    stream.last_heard = now;
                    stream.sent += 1;
                    let value = self.send(stream.holder, chunk);
                    if value != self.truth[chunk as usize] {
                        lied.push(stream.holder);
                        fault = Some(Fault::Corrupt);
                        break;
                    }
                    self.disk[chunk as usize] = Some(value);
                    let (_, len) = self.layout.range(chunk).unwrap();
                    swarm.arrived(stream.id, chunk, len);
                }
                if fault.is_none()
                    && !stream.outstanding.is_empty()
                    && now.duration_since(stream.last_heard) >= STALL
                {
                    fault = Some(Fault::Stalled);
                }
                match fault {
                    Some(fault) => end(&mut swarm, &stream, Some(fault)),
                    None => kept.push(stream),
                }
            }
            for h in seconds {
                let holder = &self.holders[h];
                let was_banned = swarm.is_banned(&holder.key);
                if let Some(id) = swarm.offer_second(&holder.peer, holder.key) {
                    admitted_banned += usize::from(was_banned);
                    kept.push(Stream {
                        holder: h,
                        id,
                        first: false,
                        opens_at: now,
                        window: None,
                        outstanding: VecDeque::new(),
                        next_send: now,
                        last_heard: now,
                        sent: 0,
                    });
                }
            }
            streams = kept;
            now += STEP;
        };
        for stream in std::mem::take(&mut streams) {
            end(&mut swarm, &stream, None);
        }
        banned.sort_unstable();
        banned.dedup();
        lied.sort_unstable();
        lied.dedup();
        Outcome {
            complete,
            took: now.duration_since(start),
            ends,
            sources: swarm.sources(),
            banned,
            lied,
            admitted_banned,
        }
    }

    /// Whether every chunk on disk is the file's.
    fn disk_is_right(&self) -> bool {
        self.disk
            .iter()
            .zip(&self.truth)
            .all(|(got, right)| got.is_none_or(|got| got == *right))
    }

    fn disk_is_whole(&self) -> bool {
        self.disk.iter().all(Option::is_some)
    }
}

/// `count` behaviours: `pick` chooses each from a number below 100.
fn population(seed: u64, count: usize, pick: impl Fn(u64) -> Behaviour) -> Vec<Behaviour> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    (0..count).map(|_| pick(rng.below(100))).collect()
}

const SEEDS: u64 = 12;

#[test]
fn sixty_honest_holders_deliver_the_file_and_faster_ones_send_more() {
    for seed in 0..SEEDS {
        let behaviours = population(seed, 60, |_| Behaviour::Honest);
        let mut sim = Sim::new(seed, &behaviours);
        let outcome = sim.run();
        assert!(outcome.complete, "seed {seed}: {outcome:?}");
        assert!(sim.disk_is_whole() && sim.disk_is_right(), "seed {seed}");
        assert!(outcome.banned.is_empty(), "seed {seed}: {outcome:?}");
        let total: u64 = outcome.sources.iter().map(|(_, b)| b).sum();
        assert_eq!(total, SIZE, "seed {seed}: every byte counted once");
        let speed = |peer: &str| {
            let holder = sim.holders.iter().find(|h| h.peer == peer).unwrap();
            holder.per_chunk
        };
        let fastest = outcome
            .sources
            .iter()
            .min_by_key(|(p, _)| speed(p))
            .unwrap();
        let slowest = outcome
            .sources
            .iter()
            .max_by_key(|(p, _)| speed(p))
            .unwrap();
        assert!(
            speed(&fastest.0) == speed(&slowest.0) || fastest.1 > slowest.1,
            "seed {seed}: {outcome:?}"
        );
    }
}

#[test]
fn corrupt_holders_are_banned_and_the_file_is_still_right() {
    let mut bans = 0;
    for seed in 0..SEEDS {
        let behaviours = population(seed, 60, |n| {
            if n < 60 {
                Behaviour::Corrupt
            } else {
                Behaviour::Honest
            }
        });
        let mut sim = Sim::new(seed, &behaviours);
        let outcome = sim.run();
        assert!(outcome.complete, "seed {seed}: {outcome:?}");
        assert!(sim.disk_is_whole() && sim.disk_is_right(), "seed {seed}");
        assert_eq!(
            outcome.banned, outcome.lied,
            "seed {seed}: who lied is banned"
        );
        assert_eq!(
            outcome.admitted_banned, 0,
            "seed {seed}: a banned key came back"
        );
        bans += outcome.banned.len();
    }
    assert!(bans >= SEEDS as usize, "{bans} bans in {SEEDS} runs");
}

#[test]
fn stalling_holders_are_dropped_and_others_finish() {
    for seed in 0..SEEDS {
        let behaviours = population(seed, 55, |n| {
            if n < 40 {
                Behaviour::Stalling
            } else {
                Behaviour::Honest
            }
        });
        let mut sim = Sim::new(seed, &behaviours);
        let outcome = sim.run();
        assert!(outcome.complete, "seed {seed}: {outcome:?}");
        assert!(sim.disk_is_whole() && sim.disk_is_right(), "seed {seed}");
        assert!(outcome.banned.is_empty(), "seed {seed}: stalling is no ban");
        let stalled = outcome.ends.get("Some(Stalled)").copied().unwrap_or(0);
        assert!(stalled > 0, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn holders_leaving_mid_download_are_replaced() {
    for seed in 0..SEEDS {
        let behaviours = population(seed, 60, |n| {
            if n < 85 {
                Behaviour::Leaves(Duration::from_millis(200 + n * 40))
            } else {
                Behaviour::Honest
            }
        });
        let mut sim = Sim::new(seed, &behaviours);
        let outcome = sim.run();
        assert!(outcome.complete, "seed {seed}: {outcome:?}");
        assert!(sim.disk_is_whole() && sim.disk_is_right(), "seed {seed}");
        let gone = outcome.ends.get("Some(Gone)").copied().unwrap_or(0);
        assert!(gone > 0, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn when_every_holder_is_gone_the_download_fails_cleanly() {
    let leave = Duration::from_millis(500);
    for seed in 0..SEEDS {
        let behaviours = population(seed, 50, |_| Behaviour::Leaves(leave));
        let mut sim = Sim::new(seed, &behaviours);
        let outcome = sim.run();
        assert!(!outcome.complete, "seed {seed}");
        assert!(!sim.disk_is_whole(), "seed {seed}");
        assert!(sim.disk_is_right(), "seed {seed}: what is kept is right");
        assert!(
            outcome.took >= leave + NO_HOLDER_TIMEOUT
                && outcome.took <= leave + NO_HOLDER_TIMEOUT + Duration::from_secs(1),
            "seed {seed}: gave up after {:?}",
            outcome.took
        );
    }
}

#[test]
fn a_seed_gives_the_same_run() {
    let behaviours = population(7, 60, |n| match n {
        0..20 => Behaviour::Corrupt,
        20..30 => Behaviour::Stalling,
        30..60 => Behaviour::Leaves(Duration::from_secs(2 + n / 10)),
        _ => Behaviour::Honest,
    });
    let first = Sim::new(7, &behaviours).run();
    let second = Sim::new(7, &behaviours).run();
    assert_eq!(first, second);
    assert!(first.complete, "{first:?}");
}
