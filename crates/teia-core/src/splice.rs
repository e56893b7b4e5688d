//! Splicing, sans-IO (PROTOCOL.md section 6, Splicing): a node that listens joins two of
//! its neighbours that cannot dial each other into one data stream, copying bytes between
//! their two connections to it. It does so only for neighbours that asked for it through
//! the overlay (`SPLICE_ASK`, on their links, which proved their keys), each naming the
//! other and the same ask: it then issues each side a token of its own (`SPLICE_GRANT`),
//! which joins that side's connection once, before it expires. A stranger has no token;
//! a token is worth one connection of the side it was given to.
//!
//! The broker takes the asks, the joins and the ends of splices, with the time, and
//! answers what to tell whom. The tokens are drawn by the caller (from the operating
//! system's randomness) and passed in.
//!
//! # Bounds
//!
//! - An ask waits [`SPLICE_WAIT`] for the other side's; a granted splice waits as long for
//!   both sides to join. Past it, it is forgotten (a late join is refused).
//! - At most [`MAX_ASKS`] asks wait, and [`MAX_SPLICES`] splices are granted or joined at
//!   once, in all; one peer may have at most [`SPLICES_PER_PEER`] asks waiting and
//!   splices granted or joined together. Beyond, an ask is refused `busy`: a neighbour can
//!   use its own share, not another's, and a stranger none.
//! - A joined splice relays at most [`SPLICE_BUDGET`] bytes (both ways together) and is
//!   cut after [`SPLICE_IDLE`] without a byte either way (the runtime copying the bytes
//!   enforces both, and reports the end with [`SpliceBroker::end`]).
//! - An ask names at most [`MAX_ASK_LEN`] bytes; a token is 22 characters, at most
//!   [`MAX_TOKEN_LEN`] are read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Time an ask waits for its pair, and a granted splice for both joins.
pub const SPLICE_WAIT: Duration = Duration::from_secs(15);
/// Time a joined splice may pass no byte either way before it is cut.
pub const SPLICE_IDLE: Duration = Duration::from_secs(30);
/// Bytes a joined splice relays at most, both ways together; then it is cut (a download
/// asks for a new one to go on).
pub const SPLICE_BUDGET: u64 = 256 * 1024 * 1024;
/// Asks waiting for their pair at most, in all.
pub const MAX_ASKS: usize = 64;
/// Splices granted or joined at once at most, in all.
pub const MAX_SPLICES: usize = 32;
/// Asks waiting plus splices granted or joined that involve one peer, at most.
pub const SPLICES_PER_PEER: usize = 8;
/// Longest ask name, in bytes.
pub const MAX_ASK_LEN: usize = 64;
/// Longest token read, in bytes.
pub const MAX_TOKEN_LEN: usize = 128;

/// Names one splice of a broker.
pub type SpliceId = u64;

/// Why an ask was refused (the wire's `reason`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpliceRefusal {
    /// The ask is malformed: no or too long a name, no valid peer id, or the asker itself.
    #[error("bad splice request")]
    BadRequest,
    /// The splicing node, or the asker's share of it, is full.
    #[error("too many splices")]
    Busy,
    /// The node splices for no one (it does not listen).
    #[error("this node does not splice")]
    Unsupported,
    /// A reason this node does not know.
    #[error("splice refused: {0}")]
    Other(String),
}

impl SpliceRefusal {
    /// The reason's code on the wire.
    pub fn code(&self) -> &str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Busy => "busy",
            Self::Unsupported => "unsupported",
            Self::Other(code) => code,
        }
    }

    /// Reads a code from the wire.
    pub fn from_code(code: &str) -> Self {
        match code {
            "bad_request" => Self::BadRequest,
            "busy" => Self::Busy,
            "unsupported" => Self::Unsupported,
            other => Self::Other(other.chars().take(64).collect()),
        }
    }
}

/// What to tell one asker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceAnswer {
    /// The neighbour told.
    pub peer: String,
    /// The other side it named.
    pub with: String,
    /// The ask.
    pub ask: String,
    /// Its token, or why not.
    pub outcome: Result<String, SpliceRefusal>,
}

/// A join of a connection with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The first side: it waits for the other.
    First(SpliceId),
    /// The second side: the splice is joined, its bytes may flow.
    Second(SpliceId),
}

/// Why a connection could not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No splice waits for this token: never issued, already used, or expired.
    #[error("no splice waits for this token (unknown, used or expired)")]
    UnknownToken,
}

#[derive(Debug)]
struct Ask {
    from: String,
    with: String,
    ask: String,
    expires: Instant,
}

#[derive(Debug)]
struct Side {
    peer: String,
    token: String,
    joined: bool,
}

#[derive(Debug)]
struct Splice {
    sides: [Side; 2],
    /// Until both sides joined: when it is forgotten.
    expires: Option<Instant>,
}

impl Splice {
    fn involves(&self, peer: &str) -> bool {
        self.sides.iter().any(|s| s.peer == peer)
    }
}

/// The splices of one node: asks waiting for their pair, and splices granted or joined.
#[derive(Debug, Default)]
pub struct SpliceBroker {
    asks: Vec<Ask>,
    splices: HashMap<SpliceId, Splice>,
    next: SpliceId,
}

impl SpliceBroker {
    /// A broker with nothing waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks waiting for their pair.
    pub fn asks_waiting(&self) -> usize {
        self.asks.len()
    }

    /// Splices granted or joined.
    pub fn splices(&self) -> usize {
        self.splices.len()
    }

    /// Neighbour `from` (its link proved its key) asks at `now` to be spliced with
    /// neighbour `with` under `ask`. When `with` has asked the same, naming `from`, both
    /// are granted, `tokens[0]` going to `with` and `tokens[1]` to `from` (each unguessable
    /// and new). Returns the answers to send: none while the ask waits for its pair.
    pub fn ask(
        &mut self,
        now: Instant,
        from: &str,
        with: &str,
        ask: &str,
        tokens: [String; 2],
    ) -> Vec<SpliceAnswer> {
        let answer = |peer: &str, with: &str, outcome| SpliceAnswer {
            peer: peer.to_owned(),
            with: with.to_owned(),
            ask: ask.to_owned(),
            outcome,
        };
        let well_formed = !ask.is_empty()
            && ask.len() <= MAX_ASK_LEN
            && from != with
            && teia_wire::fields::is_peer_id(with)
            && tokens
                .iter()
                .all(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN);
        if !well_formed {
            return vec![answer(from, with, Err(SpliceRefusal::BadRequest))];
        }
        self.expire(now);
        if self
            .asks
            .iter()
            .any(|a| a.from == from && a.with == with && a.ask == ask)
        {
            return Vec::new();
        }
        let pair = self
            .asks
            .iter()
            .position(|a| a.from == with && a.with == from && a.ask == ask);
        let Some(pair) = pair else {
            if self.asks.len() >= MAX_ASKS || self.load(from) >= SPLICES_PER_PEER {
                return vec![answer(from, with, Err(SpliceRefusal::Busy))];
            }
            self.asks.push(Ask {
                from: from.to_owned(),
                with: with.to_owned(),
                ask: ask.to_owned(),
                expires: now + SPLICE_WAIT,
            });
            return Vec::new();
        };
        self.asks.remove(pair);
        if self.splices.len() >= MAX_SPLICES
            || self.load(from) >= SPLICES_PER_PEER
            || self.load(with) >= SPLICES_PER_PEER
        {
            return vec![
                answer(with, from, Err(SpliceRefusal::Busy)),
                answer(from, with, Err(SpliceRefusal::Busy)),
            ];
        }
        let [theirs, ours] = tokens;
        self.next += 1;
        self.splices.insert(
            self.next,
            Splice {
                sides: [
                    Side {
                        peer: with.to_owned(),
                        token: theirs.clone(),
                        joined: false,
                    },
                    Side {
                        peer: from.to_owned(),
                        token: ours.clone(),
                        joined: false,
                    },
                ],
                expires: Some(now + SPLICE_WAIT),
            },
        );
        vec![answer(with, from, Ok(theirs)), answer(from, with, Ok(ours))]
    }

    /// A connection asks at `now` to join with `token`: valid once, for the side it was
    /// granted to, until the splice expires.
    pub fn join(&mut self, now: Instant, token: &str) -> Result<Joined, JoinRefusal> {
        self.expire(now);
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(JoinRefusal::UnknownToken);
        }
        for (&id, splice) in &mut self.splices {
            let Some(side) = splice
                .sides
                .iter_mut()
                .find(|s| !s.joined && s.token == token)
            else {
                continue;
            };
            side.joined = true;
            if splice.sides.iter().all(|s| s.joined) {
                splice.expires = None;
                return Ok(Joined::Second(id));
            }
            return Ok(Joined::First(id));
        }
        Err(JoinRefusal::UnknownToken)
    }

    /// A splice ended (its bytes are done, it was cut, or its first side gave up waiting):
    /// it is forgotten, and its share freed.
    pub fn end(&mut self, splice: SpliceId) {
        self.splices.remove(&splice);
    }

    /// Neighbour `peer`'s link is gone: its asks, and the splices granted to it that are
    /// not joined yet, are forgotten (joined ones run on their own connections).
    pub fn peer_gone(&mut self, peer: &str) {
        self.asks.retain(|a| a.from != peer);
        self.splices
            .retain(|_, s| s.expires.is_none() || !s.involves(peer));
    }

    fn load(&self, peer: &str) -> usize {
        let asks = self.asks.iter().filter(|a| a.from == peer).count();
        let splices = self.splices.values().filter(|s| s.involves(peer)).count();
        asks + splices
    }

    fn expire(&mut self, now: Instant) {
        self.asks.retain(|a| a.expires > now);
        self.splices
            .retain(|_, s| s.expires.is_none_or(|expires| expires > now));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn tokens(n: &mut u32) -> [String; 2] {
        *n += 2;
        [format!("token-{}", *n - 1), format!("token-{}", *n)]
    }

    fn granted(answers: &[SpliceAnswer]) -> Vec<(String, String)> {
        answers
            .iter()
            .filter_map(|a| Some((a.peer.clone(), a.outcome.clone().ok()?)))
            .collect()
    }

    #[test]
    fn both_sides_that_asked_get_a_token_each_valid_once() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        assert!(broker
            .ask(now, "d@x", "h@x", "a1", tokens(&mut n))
            .is_empty());
        // A stranger (or anyone) joining with a token never issued.
        assert_eq!(broker.join(now, "token-1"), Err(JoinRefusal::UnknownToken));
        let answers = broker.ask(now, "h@x", "d@x", "a1", tokens(&mut n));
        let grants = granted(&answers);
        assert_eq!(grants.len(), 2, "{answers:?}");
        assert_eq!(grants[0].0, "d@x");
        assert_eq!(grants[1].0, "h@x");
        assert_ne!(grants[0].1, grants[1].1, "a token per side");
        let first = broker.join(now, &grants[1].1).unwrap();
        assert!(matches!(first, Joined::First(_)));
        assert_eq!(
            broker.join(now, &grants[1].1),
            Err(JoinRefusal::UnknownToken),
            "a token joins once"
        );
        let second = broker.join(now, &grants[0].1).unwrap();
        let Joined::Second(id) = second else {
            panic!("{second:?}")
        };
        assert_eq!(Joined::First(id), first);
        assert_eq!(
            broker.join(now, &grants[0].1),
            Err(JoinRefusal::UnknownToken)
        );
        assert_eq!(broker.splices(), 1);
        broker.end(id);
        assert_eq!(broker.splices(), 0);
    }

    #[test]
    fn asks_that_do_not_name_each_other_are_not_paired() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        assert!(broker
            .ask(now, "d@x", "h@x", "a", tokens(&mut n))
            .is_empty());
        // Another ask name, another peer, or the same side again.
        assert!(broker
            .ask(now, "h@x", "d@x", "b", tokens(&mut n))
            .is_empty());
        assert!(broker
            .ask(now, "e@x", "d@x", "a", tokens(&mut n))
            .is_empty());
        assert!(broker
            .ask(now, "d@x", "h@x", "a", tokens(&mut n))
            .is_empty());
        assert_eq!(broker.asks_waiting(), 3);
        assert_eq!(broker.splices(), 0);
        let bad = broker.ask(now, "d@x", "d@x", "a", tokens(&mut n));
        assert_eq!(bad[0].outcome, Err(SpliceRefusal::BadRequest));
        let bad = broker.ask(now, "d@x", "not a peer", "a", tokens(&mut n));
        assert_eq!(bad[0].outcome, Err(SpliceRefusal::BadRequest));
        let bad = broker.ask(now, "d@x", "h@x", &"a".repeat(65), tokens(&mut n));
        assert_eq!(bad[0].outcome, Err(SpliceRefusal::BadRequest));
    }

    #[test]
    fn asks_and_grants_expire() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        broker.ask(now, "d@x", "h@x", "a", tokens(&mut n));
        let late = now + SPLICE_WAIT;
        assert!(
            broker
                .ask(late, "h@x", "d@x", "a", tokens(&mut n))
                .is_empty(),
            "the first ask is gone: this one waits"
        );
        let answers = broker.ask(late, "d@x", "h@x", "a", tokens(&mut n));
        let grants = granted(&answers);
        assert_eq!(grants.len(), 2);
        assert!(matches!(
            broker.join(late, &grants[0].1),
            Ok(Joined::First(_))
        ));
        let expired = late + SPLICE_WAIT;
        assert_eq!(
            broker.join(expired, &grants[1].1),
            Err(JoinRefusal::UnknownToken)
        );
        assert_eq!(broker.splices(), 0);
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        let mut busy = 0;
        for i in 0..100 {
            let answers = broker.ask(now, "greedy@x", &format!("p{i}@x"), "a", tokens(&mut n));
            busy += answers
                .iter()
                .filter(|a| a.outcome == Err(SpliceRefusal::Busy))
                .count();
        }
        assert_eq!(broker.asks_waiting(), SPLICES_PER_PEER);
        assert_eq!(busy, 100 - SPLICES_PER_PEER);
        // Others still get spliced.
        broker.ask(now, "d@x", "h@x", "a", tokens(&mut n));
        let answers = broker.ask(now, "h@x", "d@x", "a", tokens(&mut n));
        assert_eq!(granted(&answers).len(), 2);
        // Its own splices count against its share too.
        let mut broker = SpliceBroker::new();
        for i in 0..SPLICES_PER_PEER {
            let other = format!("p{i}@x");
            broker.ask(now, "greedy@x", &other, "a", tokens(&mut n));
            broker.ask(now, &other, "greedy@x", "a", tokens(&mut n));
        }
        assert_eq!(broker.splices(), SPLICES_PER_PEER);
        let answers = broker.ask(now, "greedy@x", "q@x", "a", tokens(&mut n));
        assert_eq!(answers[0].outcome, Err(SpliceRefusal::Busy));
    }

    #[test]
    fn the_totals_are_bounded() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        for i in 0..MAX_ASKS + 10 {
            broker.ask(
                now,
                &format!("a{i}@x"),
                &format!("b{i}@x"),
                "k",
                tokens(&mut n),
            );
        }
        assert_eq!(broker.asks_waiting(), MAX_ASKS);
        let mut broker = SpliceBroker::new();
        let mut refused = 0;
        for i in 0..MAX_SPLICES + 10 {
            let (a, b) = (format!("a{i}@x"), format!("b{i}@x"));
            broker.ask(now, &a, &b, "k", tokens(&mut n));
            let answers = broker.ask(now, &b, &a, "k", tokens(&mut n));
            refused += answers
                .iter()
                .filter(|a| a.outcome == Err(SpliceRefusal::Busy))
                .count();
        }
        assert_eq!(broker.splices(), MAX_SPLICES);
        assert_eq!(refused, 20, "both sides of each pair beyond are told");
    }

    #[test]
    fn a_neighbour_that_leaves_takes_its_asks_and_unjoined_splices_along() {
        let now = Instant::now();
        let mut broker = SpliceBroker::new();
        let mut n = 0;
        broker.ask(now, "d@x", "h@x", "a", tokens(&mut n));
        broker.ask(now, "d@x", "g@x", "b", tokens(&mut n));
        broker.ask(now, "g@x", "d@x", "b", tokens(&mut n));
        broker.ask(now, "e@x", "f@x", "c", tokens(&mut n));
        let grants = granted(&broker.ask(now, "f@x", "e@x", "c", tokens(&mut n)));
        broker.join(now, &grants[0].1).unwrap();
        broker.join(now, &grants[1].1).unwrap();
        assert_eq!((broker.asks_waiting(), broker.splices()), (1, 2));
        broker.peer_gone("d@x");
        broker.peer_gone("e@x");
        assert_eq!(
            (broker.asks_waiting(), broker.splices()),
            (0, 1),
            "the joined splice runs on"
        );
    }

    #[test]
    fn refusal_codes_round_trip() {
        for refusal in [
            SpliceRefusal::BadRequest,
            SpliceRefusal::Busy,
            SpliceRefusal::Unsupported,
            SpliceRefusal::Other("later".into()),
        ] {
            assert_eq!(SpliceRefusal::from_code(refusal.code()), refusal);
        }
    }
}
