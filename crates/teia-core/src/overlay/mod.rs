//! The peer overlay as a sans-IO state machine: link handshakes and keep-alive, SEND/ACK with
//! retransmission, PUB flooding with deduplication, WHO_HAS route discovery and relay, peer
//! exchange and reconnection, node identity with encrypted links, key pinning and origin
//! signatures (PROTOCOL.md sections 3 to 5).
//!
//! The runtime feeds it what happened (a link opened, a line arrived, a dial failed, time
//! passed) and carries out what it asks for ([`Action`]: write a line, close a link, dial an
//! address, report an event). It never touches a socket or reads a clock.

mod dedup;
mod exchange;
mod link;
mod links;
mod membership;
mod messages;
mod origin;
mod query;
mod routes;
pub mod secure;
mod splicing;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use teia_wire::codec::{DecodeError, MAX_LINE};
use teia_wire::peer::{
    code, feature, uuid_v4, Ack, Auth, Bye, Data, ErrorMsg, Hello, Message, Metrics, MetricsReq,
    Noise, PeerEntry, PeerList, Ping, Relay, WhoHas, WhoHasHit, VERSION,
};

pub use dedup::{RecentMap, SeenIds};
pub use origin::Forgery;
pub use query::{QUERY_FANOUT, QUERY_MAX_TTL};
pub use routes::{ReversePaths, Route, RouteTable};
pub use secure::LinkCipher;
pub use teia_wire::fields::is_peer_id;

fn is_name(text: &str) -> bool {
    teia_wire::fields::validate_name(text).is_ok()
}

use crate::identity::{Identity, PublicKey};
use crate::rate::{Paced, RateLimiter};
use crate::rng::SplitMix64;
use link::{Due, Link, LinkState, SAID_CHARS};
use membership::{Membership, Redial, STABLE_LINK};
use secure::{Handshake, Suite};

/// Identifies one connection, chosen by the runtime.
pub type LinkId = u64;

/// Settings of a node. [`Config::new`] gives the protocol's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// `name@namespace`.
    pub peer_id: String,
    /// Port other peers can dial us on, announced in HELLO; `None` when not listening.
    pub listen_port: Option<u16>,
    /// Software name announced in HELLO.
    pub agent: String,
    /// Interval between PINGs on each link.
    pub ping_interval: Duration,
    /// PINGs left unanswered before the link is closed.
    pub max_missed_pings: u32,
    /// Time allowed for the handshake.
    pub hello_timeout: Duration,
    /// Neighbours the node dials up to on its own (from the rendezvous and peer lists).
    pub target_neighbours: usize,
    /// Links at most, both directions; a HELLO beyond it is answered BYE `busy`.
    pub max_links: usize,
    /// ttl of messages this node originates.
    pub default_ttl: u32,
    /// Message ids remembered for deduplication.
    pub dedup_capacity: usize,
    /// Routes cached at most.
    pub route_capacity: usize,
    /// Age after which a cached route is dropped.
    pub route_expiry: Duration,
    /// Time to wait for a WHO_HAS_HIT.
    pub discovery_timeout: Duration,
    /// Messages waiting for a route, per destination; beyond it they are refused `busy`.
    pub pending_per_destination: usize,
    /// Destinations being discovered at once.
    pub max_discoveries: usize,
    /// Time a SEND is retransmitted for before it is reported undelivered.
    pub send_deadline: Duration,
    /// First retransmission delay; it doubles up to 8 times this.
    pub retransmit_after: Duration,
    /// Unacknowledged SENDs at most; beyond it `send` fails with `busy`.
    pub outbox_capacity: usize,
    /// Messages per second a neighbour may make this node handle (burst twice as many);
    /// beyond, the link is not read until its share refills ([`Action::Pace`]), and what
    /// still comes past a second burst's worth is answered `over_quota`.
    pub link_rate: u32,
    /// First delay before redialing a lost or failed peer; it doubles per failure.
    pub reconnect_initial: Duration,
    /// Longest delay between two dials of the same peer.
    pub reconnect_max_delay: Duration,
    /// Failed dials in a row before an address is given up.
    pub reconnect_attempts: u32,
    /// Addresses remembered for dialing.
    pub known_capacity: usize,
    /// Seed of the node's random choices (message ids).
    pub seed: u64,
    /// The node's key pair. With it, links to teia nodes are encrypted and authenticated
    /// and the messages the node originates are signed; without it (benchmarks' plaintext
    /// baseline), links stay plaintext.
    pub identity: Option<Identity>,
    /// Sign originated SEND, PUB and ACK, and deliver messages relayed from other origins
    /// only with a valid origin signature.
    pub sign_messages: bool,
    /// Refuse peers that do not complete the encrypted handshake.
    pub require_encryption: bool,
    /// Believe a plaintext peer's claim of the `teia` feature. Only for a benchmark's
    /// plaintext baseline: a course client that echoes features would be misread.
    pub plaintext_teia: bool,
    /// Keys pinned at most; beyond, new peer ids are not pinned (and a warning is given).
    pub pin_capacity: usize,
    /// Inbound connections that have not finished their handshake, at most; when full, the
    /// oldest silent one is closed to make room, or the newcomer gets BYE `busy`.
    pub max_pending_handshakes: usize,
    /// The same, per source IP.
    pub pending_per_ip: usize,
    /// Time an inbound connection has to send its first line.
    pub first_line_timeout: Duration,
    /// New dials per second, node-wide (burst twice as many).
    pub dial_rate: u32,
    /// Addresses learnt from one neighbour's PEER_LISTs, at most.
    pub learned_per_peer: usize,
    /// Gap between two lines written to a course peer (they read one line per read).
    pub course_gap: Duration,
    /// Time a course peer has to ACK a SEND before the next SEND goes to it anyway.
    pub course_ack_wait: Duration,
    /// Bytes waiting to be paced out to one course peer, at most; beyond, lines are dropped
    /// (and counted).
    pub course_queue_bytes: usize,
}

impl Config {
    /// The protocol's defaults for `peer_id`.
    pub fn new(peer_id: impl Into<String>) -> Self {
        Self {
            peer_id: peer_id.into(),
            listen_port: None,
            agent: concat!("teia/", env!("CARGO_PKG_VERSION")).to_owned(),
            ping_interval: Duration::from_secs(30),
            max_missed_pings: 3,
            hello_timeout: Duration::from_secs(10),
            target_neighbours: 8,
            max_links: 64,
            default_ttl: teia_wire::peer::DEFAULT_TTL,
            dedup_capacity: 16_384,
            route_capacity: 4_096,
            route_expiry: Duration::from_secs(300),
            discovery_timeout: Duration::from_secs(5),
            pending_per_destination: 64,
            max_discoveries: 256,
            send_deadline: Duration::from_secs(60),
            retransmit_after: Duration::from_secs(1),
            outbox_capacity: 1_024,
            link_rate: 100_000,
            reconnect_initial: Duration::from_secs(1),
            reconnect_max_delay: Duration::from_secs(60),
            reconnect_attempts: 10,
            known_capacity: 1_024,
            seed: 0,
            identity: None,
            sign_messages: true,
            require_encryption: false,
            plaintext_teia: false,
            pin_capacity: 16_384,
            max_pending_handshakes: 64,
            pending_per_ip: 8,
            first_line_timeout: Duration::from_secs(3),
            dial_rate: 10,
            learned_per_peer: 32,
            course_gap: Duration::from_millis(15),
            course_ack_wait: Duration::from_secs(1),
            course_queue_bytes: 256 * 1024,
        }
    }

    fn namespace(&self) -> &str {
        self.peer_id
            .split_once('@')
            .map_or("", |(_, namespace)| namespace)
    }
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write one line (with its `\n`) on a link.
    Write {
        /// The link.
        link: LinkId,
        /// The line.
        line: Vec<u8>,
    },
    /// Close a link (after writing what was queued before this action).
    Close {
        /// The link.
        link: LinkId,
    },
    /// Stop reading this link until `until`: its neighbour sends faster than its share
    /// ([`Config::link_rate`]), and is slowed down (through TCP) rather than refused.
    Pace {
        /// The link.
        link: LinkId,
        /// When it may be read again.
        until: Instant,
    },
    /// Lines for this link may from now on be written several per `write` (the peer speaks
    /// teia; course peers read one line per read and need one line per write).
    Coalesce {
        /// The link.
        link: LinkId,
    },
    /// The handshake is done: every line written on this link after this action is
    /// encrypted with `cipher`, and every byte read after the line that caused it is
    /// decrypted with it (PROTOCOL.md section 4.1).
    Encrypt {
        /// The link.
        link: LinkId,
        /// Its keys.
        cipher: LinkCipher,
    },
    /// Remember that `peer_id` has `key` (first key seen, or set by [`Node::trust`]).
    Pin {
        /// The peer.
        peer_id: String,
        /// Its key.
        key: PublicKey,
    },
    /// Drop the pin of `peer_id` ([`Node::forget_pin`]).
    Unpin {
        /// The peer.
        peer_id: String,
    },
    /// Store a SEND of ours until its ACK (or its deadline), so that a restart resumes it.
    /// It follows the SEND's first write (so the disk is not in the round trip's way) and
    /// precedes any input the node handles next, so the runtime has stored it before it
    /// tells the application the message was sent or hands over its ACK.
    Remember(PendingSend),
    /// A remembered SEND was acknowledged or given up: drop it from storage.
    Forget {
        /// The SEND's id.
        msg_id: String,
    },
    /// Store a SEND delivered here before its ACK goes out: its id, so that retransmissions
    /// are not delivered again after a restart, and the message itself until the
    /// application says it was shown ([`Node::restore`] hands back those not shown).
    Delivered(Inbound),
    /// Open a connection to `addr` and report it with [`Node::link_opened`] or
    /// [`Node::dial_failed`].
    Dial {
        /// Where.
        addr: SocketAddr,
    },
    /// Tell the application.
    Event(Event),
}

/// A SEND of ours awaiting its ACK, as kept in storage across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSend {
    /// Its id.
    pub msg_id: String,
    /// Its destination.
    pub dst: String,
    /// Its payload.
    pub payload: Value,
    /// Wall time (UNIX ms) after which it is reported undelivered.
    pub deadline_unix_ms: u64,
}

/// A SEND delivered here, as kept in storage until the application has shown it.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Its id.
    pub msg_id: String,
    /// Its origin.
    pub src: String,
    /// As addressed.
    pub dst: String,
    /// Content.
    pub payload: Value,
}

/// How a delivered message was addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cast {
    /// SEND to this node.
    Unicast,
    /// PUB to this node's `#namespace`.
    Namespace,
    /// PUB to `*`.
    Broadcast,
}

/// Direction of traffic in a [`Event::Traffic`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received.
    In,
    /// Sent.
    Out,
}

/// The service a message's payload is addressed to: its `svc` string, when it has one
/// (PROTOCOL.md section 5). Payloads without one are chat.
pub fn service_of(payload: &Value) -> Option<String> {
    payload.get("svc")?.as_str().map(str::to_owned)
}

/// Why a connection was refused before its link came up: the BYE `reason` it was sent
/// (PROTOCOL.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Links or handshakes are full.
    Busy,
    /// The encrypted handshake failed.
    HandshakeFailed,
    /// The connection is from this node itself.
    OwnNode,
    /// The HELLO was malformed.
    BadFormat,
    /// The key offered is not the one pinned for the peer id.
    KeyMismatch,
    /// A peer id pinned to a key came without proving it.
    Unauthorized,
    /// The peer is already linked (a simultaneous dial: the other link stays).
    Duplicate,
    /// A plaintext link to a node that accepts encrypted links only.
    EncryptionRequired,
}

impl Refusal {
    /// The BYE reason, as on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::HandshakeFailed => "handshake_failed",
            Self::OwnNode => "self",
            Self::BadFormat => "bad_format",
            Self::KeyMismatch => "key_mismatch",
            Self::Unauthorized => "unauthorized",
            Self::Duplicate => "duplicate",
            Self::EncryptionRequired => "encryption_required",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What the application hears about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A service query heard from the overlay (answer it with [`Node::answer`]).
    Query {
        /// Its id.
        query_id: String,
        /// Who asks.
        src: String,
        /// For which service.
        service: String,
        /// The question.
        body: Value,
    },
    /// A teia neighbour (its link proved its key) asks this node to splice a data stream
    /// between it and `with`: for [`crate::splice::SpliceBroker::ask`], whose answers go
    /// back with [`Node::splice_answer`].
    SpliceAsked {
        /// The neighbour asking.
        peer: String,
        /// The other side it names.
        with: String,
        /// The ask's name.
        ask: String,
    },
    /// Neighbour `relay` granted our ask: join it at `addr` with `token`.
    SpliceGranted {
        /// The splicing neighbour.
        relay: String,
        /// The other side.
        with: String,
        /// The ask.
        ask: String,
        /// Our token.
        token: String,
        /// Where to join: the link's address and the relay's listen port.
        addr: SocketAddr,
    },
    /// Neighbour `relay` refused our ask.
    SpliceRefused {
        /// The splicing neighbour.
        relay: String,
        /// The other side.
        with: String,
        /// The ask.
        ask: String,
        /// Why.
        reason: crate::splice::SpliceRefusal,
    },
    /// An answer to a query of ours.
    QueryHit {
        /// The query.
        query_id: String,
        /// The service the query was for.
        service: String,
        /// Who answers.
        src: String,
        /// The answer.
        body: Value,
    },
    /// A neighbour is connected.
    LinkUp {
        /// Its peer id.
        peer: String,
        /// Its address as connected.
        addr: SocketAddr,
        /// Whether it dialed us.
        inbound: bool,
        /// Features both sides use.
        features: Vec<String>,
    },
    /// A neighbour is no longer connected.
    LinkDown {
        /// Its peer id.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A message for this node.
    Message {
        /// Its id.
        msg_id: String,
        /// Origin.
        src: String,
        /// As addressed.
        dst: String,
        /// How.
        cast: Cast,
        /// The service it is addressed to (its payload's `svc`, PROTOCOL.md section 5),
        /// `None` for chat.
        service: Option<String>,
        /// Content.
        payload: Value,
        /// The key that proved `src` sent it: its origin signature, or the encrypted link
        /// it came on from `src` itself. `None` for a course peer, a message a teia node
        /// vouched for, a plaintext link, or a message restored after a restart: nothing
        /// that needs to know who sent it (the job engine's control) may act on those.
        origin_key: Option<PublicKey>,
    },
    /// A SEND of ours was acknowledged end to end.
    Acked {
        /// The SEND's id.
        msg_id: String,
        /// Who acknowledged.
        from: String,
        /// Time from the first transmission to the ACK.
        elapsed: Duration,
    },
    /// A SEND of ours could not be delivered before its deadline.
    Undelivered {
        /// The SEND's id.
        msg_id: String,
        /// Its destination.
        dst: String,
        /// Why (last error seen, or `timeout`).
        reason: String,
    },
    /// A hop reported on a SEND of ours (RELAY_OK or RELAY_FAIL).
    Relayed {
        /// The SEND's id.
        msg_id: String,
        /// The hop.
        via: String,
        /// True for RELAY_OK.
        ok: bool,
        /// Why it failed.
        reason: Option<String>,
    },
    /// An ERROR addressed to this node.
    RemoteError {
        /// The error code.
        code: String,
        /// The offending message's id.
        reference: Option<String>,
        /// Detail given.
        detail: Option<String>,
        /// Who reported it.
        from: String,
    },
    /// A METRICS answer.
    Metrics {
        /// The neighbour.
        peer: String,
        /// Its round-trip time to us, in ms.
        rtt_ms: Option<u64>,
        /// Messages it sent us.
        sent: u64,
        /// Messages it received from us.
        received: u64,
    },
    /// A peer offered a key other than the one pinned for its peer id: refused.
    KeyMismatch {
        /// The peer id claimed.
        peer: String,
        /// The key pinned for it.
        pinned: PublicKey,
        /// The key offered.
        offered: PublicKey,
        /// Where the link came from, when it was a link (not a relayed message).
        addr: Option<SocketAddr>,
    },
    /// A connection was refused before its link came up.
    Refused {
        /// The peer id claimed, if it got that far.
        peer: Option<String>,
        /// The connection's address.
        addr: SocketAddr,
        /// Why (the BYE's reason).
        refusal: Refusal,
        /// What happened, for people.
        detail: String,
    },
    /// An address was given up after its configured attempts (or because it is our own).
    DialGaveUp {
        /// Where.
        addr: SocketAddr,
        /// Failed attempts in a row.
        attempts: u32,
        /// The last failure.
        reason: String,
        /// Whether it was asked for (`--peer`, [`Node::connect`]) rather than learnt (from a
        /// rendezvous, LAN discovery or a peer list): what was asked for is the user's
        /// business, what was learnt is summarised in the log.
        asked: bool,
    },
    /// A message was dropped because its origin could not be authenticated.
    Forged {
        /// The neighbour it came from.
        from: String,
        /// The origin it claimed.
        src: String,
        /// Its id.
        msg_id: String,
        /// Why it was refused.
        reason: Forgery,
    },
    /// A dial failed.
    DialFailed {
        /// Where.
        addr: SocketAddr,
        /// Why.
        error: String,
        /// When it is tried again, if it is.
        retry_in: Option<Duration>,
        /// Whether it was asked for rather than learnt (as in [`Event::DialGaveUp`]).
        asked: bool,
    },
    /// One message in or out, reported only while watching (see [`Node::set_watch`]).
    Traffic {
        /// In or out.
        direction: Direction,
        /// The neighbour.
        peer: String,
        /// Message type.
        kind: String,
        /// Its id, if any.
        msg_id: Option<String>,
        /// Its origin, if any.
        src: Option<String>,
        /// Its destination, if any.
        dst: Option<String>,
    },
}

/// Why an API call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The destination is not `name@namespace`, `#namespace` or `*`.
    #[error("bad destination {0:?}: use name@namespace, #namespace or *")]
    BadDestination(String),
    /// Too many SENDs await their ACK.
    #[error("too many messages await acknowledgement ({0}); try again later")]
    Busy(usize),
    /// The message would not fit in one line.
    #[error("message too large: lines are limited to {MAX_LINE} bytes")]
    TooLarge,
    /// No neighbour by that name.
    #[error("no neighbour {0}")]
    NoNeighbour(String),
    /// Not `name@namespace`.
    #[error("bad peer id {0:?}: use name@namespace")]
    BadPeerId(String),
}

/// What storage hands back at start ([`Node::restore`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// SENDs of ours awaiting their ACK.
    pub sends: Vec<PendingSend>,
    /// Ids of SENDs already delivered here.
    pub delivered: Vec<String>,
    /// SENDs delivered (and acknowledged) but not yet shown by the application.
    pub unshown: Vec<Inbound>,
    /// Pinned keys.
    pub pins: Vec<(String, PublicKey)>,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lines written.
    pub sent: u64,
    /// Lines received.
    pub received: u64,
    /// Messages forwarded for others.
    pub forwarded: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Errors sent or received.
    pub errors: u64,
    /// Messages delivered to the application.
    pub delivered: u64,
    /// Lines dropped because a write queue was full.
    pub dropped: u64,
    /// Messages refused because their origin could not be authenticated.
    pub forged: u64,
}

/// A neighbour, for `/peers` and `/routes`.
#[derive(Debug, Clone, PartialEq)]
pub struct NeighbourInfo {
    /// Its peer id.
    pub peer: String,
    /// The link to it.
    pub link: LinkId,
    /// Connected address.
    pub addr: SocketAddr,
    /// Whether it dialed us.
    pub inbound: bool,
    /// Last measured round-trip time.
    pub rtt: Option<Duration>,
    /// Lines sent to it.
    pub sent: u64,
    /// Lines received from it.
    pub received: u64,
    /// Whether it speaks teia's extensions.
    pub teia: bool,
    /// The key it proved, if it is a teia node.
    pub key: Option<PublicKey>,
    /// Whether the link is encrypted.
    pub encrypted: bool,
}

/// A cached route, for `/routes`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteInfo {
    /// Destination.
    pub dst: String,
    /// Neighbour to forward through.
    pub next_hop: String,
    /// Hops.
    pub hops: u32,
    /// Age.
    pub age: Duration,
}

#[derive(Debug)]
struct Outgoing {
    dst: String,
    payload: Value,
    first_sent: Instant,
    deadline: Instant,
    next_try: Instant,
    backoff: Duration,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Pending {
    message: Message,
    /// For relayed SENDs: the link it came from, to answer the origin.
    from: Option<LinkId>,
}

#[derive(Debug)]
struct Discovery {
    msg_id: String,
    deadline: Instant,
    pending: VecDeque<Pending>,
}

/// The overlay state machine of one node.
pub struct Node {
    config: Config,
    namespace: String,
    started: Instant,
    wall_at_start: u64,
    rng: SplitMix64,
    links: HashMap<LinkId, Link>,
    by_peer: HashMap<String, LinkId>,
    seen: SeenIds,
    delivered: SeenIds,
    routes: RouteTable,
    reverse: ReversePaths,
    discoveries: HashMap<String, Discovery>,
    outbox: HashMap<String, Outgoing>,
    /// Known addresses and when to dial them.
    members: Membership,
    quota: RateLimiter<LinkId>,
    peer_list_due: Option<Instant>,
    watch: bool,
    stopping: bool,
    counters: Counters,
    actions: VecDeque<Action>,
    /// Keys pinned per peer id.
    pins: HashMap<String, PublicKey>,
    /// SENDs relayed to a course neighbour, by id: their origin, so the neighbour's bare
    /// ACK can be routed back.
    relayed: HashMap<String, String>,
    relayed_order: VecDeque<String>,
    /// The time of the latest input.
    now: Instant,
    /// Messages of ours waiting to be signed at the end of the turn.
    unsigned: Vec<origin::Deferred>,
    /// Batch roots whose signature was verified (key and root).
    verified_roots: SeenIds,
    /// Signing keys already read, by their text: a key is decoded and its point checked
    /// once, not once per message of its batches.
    known_keys: HashMap<String, PublicKey>,
    /// Queries we asked.
    own_queries: dedup::RecentMap<String>,
    /// Where each query heard came from, for its answers.
    query_paths: ReversePaths,
}

/// Longest a PEER_LIST update waits, so several changes go out as one.
const PEER_LIST_DELAY: Duration = Duration::from_millis(500);
/// Neighbours listed in one PEER_LIST at most; entries beyond are ignored.
const PEER_LIST_MAX: usize = 32;
/// Relayed SENDs remembered for routing back course peers' ACKs.
const RELAYED_KEPT: usize = 4_096;
/// Verified batch roots remembered.
const VERIFIED_ROOTS_KEPT: usize = 4_096;
/// Signing keys remembered once read; one more forgets them all (each is read again when
/// next seen).
const KNOWN_KEYS_KEPT: usize = 1_024;

impl Node {
    /// A node with no links, at monotonic time `now` and wall time `unix_ms`.
    pub fn new(config: Config, now: Instant, unix_ms: u64) -> Self {
        Self {
            namespace: config.namespace().to_owned(),
            started: now,
            wall_at_start: unix_ms,
            rng: SplitMix64::new(config.seed),
            links: HashMap::new(),
            by_peer: HashMap::new(),
            seen: SeenIds::new(config.dedup_capacity),
            delivered: SeenIds::new(config.dedup_capacity),
            routes: RouteTable::new(config.route_capacity, config.route_expiry),
            reverse: ReversePaths::new(config.dedup_capacity, config.discovery_timeout * 2),
            discoveries: HashMap::new(),
            outbox: HashMap::new(),
            members: Membership::new(&config, now),
            quota: RateLimiter::new(config.link_rate, config.link_rate * 2, config.max_links),
            peer_list_due: None,
            watch: false,
            stopping: false,
            counters: Counters::default(),
            actions: VecDeque::new(),
            pins: HashMap::new(),
            relayed: HashMap::new(),
            relayed_order: VecDeque::new(),
            now,
            unsigned: Vec::new(),
            verified_roots: SeenIds::new(VERIFIED_ROOTS_KEPT),
            known_keys: HashMap::new(),
            own_queries: dedup::RecentMap::new(query::QUERIES_KEPT),
            query_paths: ReversePaths::new(query::QUERIES_KEPT, query::QUERY_LIFETIME),
            config,
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> &str {
        &self.config.peer_id
    }

    /// The next thing to do, if any. When nothing else is left, the messages this node
    /// originated in this turn are signed (as one batch) and sent.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() && !self.unsigned.is_empty() {
            self.flush_origins();
        }
        self.actions.pop_front()
    }

    /// When [`Node::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self.links.values().map(|l| l.deadline(&self.config));
        let paced = self.links.values().filter_map(|l| l.pacing.deadline());
        let outbox = self.outbox.values().map(|o| o.next_try.min(o.deadline));
        let discoveries = self.discoveries.values().map(|d| d.deadline);
        let dials = if self.stopping {
            None
        } else {
            self.members.next_dial(&self.by_peer)
        };
        links
            .chain(paced)
            .chain(outbox)
            .chain(discoveries)
            .chain(dials)
            .chain(self.peer_list_due)
            .min()
    }

    /// Starts or stops [`Event::Traffic`] reports.
    pub fn set_watch(&mut self, on: bool) {
        self.watch = on;
    }

    /// Counters since start.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// This node's public key, if it has an identity.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.config.identity.as_ref().map(Identity::public_key)
    }

    /// Connected neighbours, sorted by peer id.
    pub fn neighbours(&self) -> Vec<NeighbourInfo> {
        let mut list: Vec<_> = self
            .by_peer
            .iter()
            .filter_map(|(peer, id)| {
                let link = self.links.get(id)?;
                Some(NeighbourInfo {
                    peer: peer.clone(),
                    link: *id,
                    addr: link.addr,
                    inbound: link.inbound,
                    rtt: link.keep_alive.rtt(),
                    sent: link.sent,
                    received: link.received,
                    teia: link.has(feature::TEIA),
                    key: link.key,
                    encrypted: link.encrypted,
                })
            })
            .collect();
        list.sort_by(|a, b| a.peer.cmp(&b.peer));
        list
    }

    /// Cached routes that are still fresh.
    pub fn routes(&self, now: Instant) -> Vec<RouteInfo> {
        self.routes
            .all()
            .into_iter()
            .filter(|(dst, _)| self.routes.get(dst, now).is_some())
            .filter_map(|(dst, route)| {
                let next_hop = self.links.get(&route.next_hop)?.peer.clone()?;
                Some(RouteInfo {
                    dst,
                    next_hop,
                    hops: route.hops,
                    age: now.saturating_duration_since(route.learned),
                })
            })
            .collect()
    }

    /// Peers known by id but not connected (from the rendezvous or peer lists).
    pub fn known_peers(&self) -> Vec<(String, SocketAddr)> {
        self.members.known_peers()
    }

    /// The line that refuses a connection the node has no room for at all (BYE `busy`),
    /// for the runtime to write before it closes a connection the overlay never sees.
    pub fn busy_line(&mut self) -> Vec<u8> {
        let bye = Message::Bye(Bye {
            msg_id: self.new_id(),
            src: self.config.peer_id.clone(),
            dst: String::new(),
            reason: Some(code::BUSY.to_owned()),
            ttl: 1,
        });
        bye.to_line().unwrap_or_default()
    }

    /// Pinned keys, sorted by peer id.
    pub fn pins(&self) -> Vec<(String, PublicKey)> {
        let mut list: Vec<_> = self.pins.iter().map(|(p, k)| (p.clone(), *k)).collect();
        list.sort();
        list
    }

    /// Pins `key` for `peer_id`, replacing any earlier pin (`/trust`).
    pub fn trust(&mut self, peer_id: &str, key: PublicKey) -> Result<(), ApiError> {
        if !is_peer_id(peer_id) {
            return Err(ApiError::BadPeerId(peer_id.to_owned()));
        }
        self.pins.insert(peer_id.to_owned(), key);
        self.actions.push_back(Action::Pin {
            peer_id: peer_id.to_owned(),
            key,
        });
        Ok(())
    }

    /// Drops the pin of `peer_id` (`/forget`): the next key it shows is pinned anew.
    /// Returns the key that was pinned.
    pub fn forget_pin(&mut self, peer_id: &str) -> Option<PublicKey> {
        let key = self.pins.remove(peer_id)?;
        self.actions.push_back(Action::Unpin {
            peer_id: peer_id.to_owned(),
        });
        Some(key)
    }

    // ---------------------------------------------------------------- runtime inputs

    /// A connection is open: dialed by us (`inbound == false`) or accepted.
    pub fn link_opened(&mut self, now: Instant, link: LinkId, addr: SocketAddr, inbound: bool) {
        self.now = now;
        if !inbound {
            self.members.connected(addr);
        }
        self.links
            .insert(link, Link::new(addr, inbound, now, &self.config));
        if inbound {
            self.admit(link, addr);
        } else {
            self.start_handshake(link);
        }
    }

    /// A dial asked for by [`Action::Dial`] failed.
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, error: &str) {
        self.now = now;
        let asked = self.members.asked(addr);
        let retry_in = self.schedule_redial(now, addr, error);
        self.emit(Event::DialFailed {
            addr,
            error: error.to_owned(),
            retry_in,
            asked,
        });
    }

    /// The connection closed (by the other side, an error, or after [`Action::Close`]).
    pub fn link_closed(&mut self, now: Instant, link: LinkId, reason: &str) {
        self.now = now;
        self.drop_link(now, link, reason, true);
    }

    /// True while `link` is in its handshake: the runtime must hand its lines over one at a
    /// time, since the bytes after one of them may be encrypted ([`Action::Encrypt`]).
    pub fn handshaking(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| {
            matches!(
                l.state,
                LinkState::AwaitingHello | LinkState::AwaitingHelloOk | LinkState::AwaitingNoise
            )
        })
    }

    /// The first bytes that arrived on a link (the runtime reports them once, whether or
    /// not they make a line): a dial whose handshake then fails says what came back.
    pub fn first_bytes(&mut self, now: Instant, link: LinkId, bytes: &[u8]) {
        self.now = now;
        if let Some(state) = self.links.get_mut(&link) {
            if state.state != LinkState::Up {
                // Control characters (an HTTP answer's line ends) become spaces; the
                // interfaces escape what is left as they escape anything a peer chose.
                let text = String::from_utf8_lossy(bytes);
                let text = text.trim();
                let mut said: String = text
                    .chars()
                    .take(SAID_CHARS)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                if text.chars().count() > SAID_CHARS {
                    said.push('…');
                }
                state.said = Some(said);
            }
        }
    }

    /// A frame arrived on a link: a line, or the report that a line was too long.
    pub fn line_received(
        &mut self,
        now: Instant,
        link: LinkId,
        frame: Result<Vec<u8>, DecodeError>,
    ) {
        self.now = now;
        let Some(state) = self.links.get_mut(&link).map(|l| {
            l.received += 1;
            l.heard = true;
            l.state
        }) else {
            return;
        };
        self.counters.received += 1;
        let line = match frame {
            Ok(line) => line,
            Err(DecodeError::LineTooLong { limit }) => {
                let error = self.error_msg(code::LINE_TOO_LONG, None, None, None);
                let error = ErrorMsg {
                    limit: Some(limit as u64),
                    ..error
                };
                self.write(link, &Message::Error(error));
                return;
            }
            Err(other) => {
                self.bad_format(link, None, &other.to_string());
                return;
            }
        };
        if teia_wire::codec::is_blank(&line) {
            return;
        }
        let message = match Message::parse(&line) {
            Ok(message) => message,
            Err(e) => {
                self.bad_format(link, e.msg_id, &e.detail);
                return;
            }
        };
        self.trace(Direction::In, link, &message);
        match (state, message) {
            (LinkState::AwaitingHello, Message::Hello(hello)) => self.on_hello(now, link, hello),
            (LinkState::AwaitingHelloOk, Message::HelloOk(hello)) => {
                self.on_hello_ok(now, link, hello)
            }
            (LinkState::AwaitingNoise, Message::Noise(noise)) => self.on_noise(now, link, noise),
            (_, Message::Bye(bye)) => self.on_bye(now, link, bye),
            (_, Message::ByeOk(_)) => self.close(now, link, "closed"),
            (LinkState::Up | LinkState::Closing, Message::Hello(_) | Message::HelloOk(_)) => {}
            (LinkState::Up, message) => self.on_message(now, link, message),
            (LinkState::Closing, _) => {}
            (_, other) => {
                let detail = format!("{} during the handshake", other.kind());
                self.bad_format(link, None, &detail);
            }
        }
    }

    /// Time passed: keep-alives, handshake deadlines, retransmissions, discoveries, dials.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.check_links(now);
        self.pace_all(now);
        self.retransmit(now);
        self.expire_discoveries(now);
        self.redial(now);
        if self.peer_list_due.is_some_and(|due| due <= now) {
            self.peer_list_due = None;
            self.broadcast_peer_list();
        }
    }

    // ---------------------------------------------------------------- API

    /// Sends `payload` to `dst`: a SEND (acknowledged, retransmitted) for `name@namespace`,
    /// a PUB for `#namespace` or `*`. Returns the message id.
    pub fn send(&mut self, now: Instant, dst: &str, payload: Value) -> Result<String, ApiError> {
        self.now = now;
        let dst = dst.trim();
        if dst == "*" || dst.starts_with('#') {
            return self.publish(now, dst, payload);
        }
        if !is_peer_id(dst) {
            return Err(ApiError::BadDestination(dst.to_owned()));
        }
        if self.outbox.len() >= self.config.outbox_capacity {
            return Err(ApiError::Busy(self.config.outbox_capacity));
        }
        let msg_id = self.new_id();
        let data = self.originate("SEND", msg_id.clone(), dst.to_owned(), payload.clone());
        if !fits_signed(&Message::Send(data.clone())) {
            return Err(ApiError::TooLarge);
        }
        let remember = PendingSend {
            msg_id: msg_id.clone(),
            dst: dst.to_owned(),
            payload: payload.clone(),
            deadline_unix_ms: self.unix_millis(now + self.config.send_deadline),
        };
        self.outbox.insert(
            msg_id.clone(),
            Outgoing {
                dst: dst.to_owned(),
                payload,
                first_sent: now,
                deadline: now + self.config.send_deadline,
                next_try: now + self.config.retransmit_after,
                backoff: self.config.retransmit_after,
                last_error: None,
            },
        );
        if dst == self.config.peer_id {
            self.actions.push_back(Action::Remember(remember));
            let own = self.public_key();
            self.deliver_send(now, None, data, own);
        } else {
            self.defer(origin::Deferred::Send {
                data,
                remember: Some(remember),
            });
        }
        Ok(msg_id)
    }

    /// Floods `payload` to `#namespace` or `*` (bare `namespace` is read as `#namespace`).
    pub fn publish(&mut self, now: Instant, dst: &str, payload: Value) -> Result<String, ApiError> {
        self.now = now;
        let dst = match dst.trim() {
            "*" => "*".to_owned(),
            d if d.starts_with('#') && is_name(d.get(1..).unwrap_or_default()) => d.to_owned(),
            d if is_name(d) => format!("#{d}"),
            d => return Err(ApiError::BadDestination(d.to_owned())),
        };
        let msg_id = self.new_id();
        let data = self.originate("PUB", msg_id.clone(), dst, payload);
        if !fits_signed(&Message::Pub(data.clone())) {
            return Err(ApiError::TooLarge);
        }
        self.seen.insert_kind("PUB", &msg_id);
        self.defer(origin::Deferred::Pub(data));
        Ok(msg_id)
    }

    /// Dials `addr` and keeps it connected (reconnecting with backoff) until shutdown or
    /// until it fails the configured attempts in a row.
    pub fn connect(&mut self, now: Instant, addr: SocketAddr) {
        self.now = now;
        if self.members.is_own(addr) {
            self.emit(Event::DialGaveUp {
                addr,
                attempts: 0,
                reason: "the address is this node itself".to_owned(),
                asked: true,
            });
            return;
        }
        self.members.pin(now, addr);
        self.redial(now);
    }

    /// Peers learnt from a rendezvous: dialed while below the neighbour target.
    pub fn discovered(
        &mut self,
        now: Instant,
        peers: impl IntoIterator<Item = (String, SocketAddr)>,
    ) {
        self.now = now;
        for (peer, addr) in peers {
            if peer != self.config.peer_id {
                self.members.learn(now, addr, Some(peer), None);
            }
        }
        self.redial(now);
    }

    /// Dials every known peer that is not connected now, forgetting its backoff.
    pub fn reconnect(&mut self, now: Instant) {
        self.now = now;
        self.members.reconnect_all(now);
        self.redial(now);
    }

    /// Resumes what storage kept across a restart: SENDs awaiting their ACK (retransmitted
    /// at once; those past their deadline are reported undelivered), the ids of SENDs
    /// already delivered here, messages delivered but not yet shown (reported again), and
    /// pinned keys.
    pub fn restore(&mut self, now: Instant, restored: Restored) {
        self.now = now;
        let Restored {
            sends,
            delivered,
            unshown,
            pins,
        } = restored;
        for id in delivered {
            self.delivered.insert(&id);
        }
        self.pins.extend(pins);
        for message in unshown {
            self.delivered.insert(&message.msg_id);
            self.emit(Event::Message {
                msg_id: message.msg_id,
                src: message.src,
                dst: message.dst,
                cast: Cast::Unicast,
                service: service_of(&message.payload),
                payload: message.payload,
                origin_key: None,
            });
        }
        let unix_now = self.unix_millis(now);
        for send in sends {
            if send.deadline_unix_ms <= unix_now {
                self.actions.push_back(Action::Forget {
                    msg_id: send.msg_id.clone(),
                });
                self.emit(Event::Undelivered {
                    msg_id: send.msg_id,
                    dst: send.dst,
                    reason: "timeout".to_owned(),
                });
                continue;
            }
            let left = Duration::from_millis(send.deadline_unix_ms - unix_now);
            self.outbox.insert(
                send.msg_id,
                Outgoing {
                    dst: send.dst,
                    payload: send.payload,
                    first_sent: now,
                    deadline: now + left,
                    next_try: now,
                    backoff: self.config.retransmit_after,
                    last_error: None,
                },
            );
        }
    }

    /// Asks a neighbour for its METRICS.
    pub fn request_metrics(&mut self, peer: &str) -> Result<(), ApiError> {
        let link = *self
            .by_peer
            .get(peer)
            .ok_or_else(|| ApiError::NoNeighbour(peer.to_owned()))?;
        let request = Message::MetricsReq(MetricsReq {
            msg_id: self.new_id(),
            src: self.config.peer_id.clone(),
            dst: peer.to_owned(),
            ttl: 1,
        });
        self.write(link, &request);
        Ok(())
    }

    /// Says BYE on every link that is up (the runtime closes them after a short grace
    /// period) and closes the others: a program that never spoke teia gets no BYE.
    pub fn shutdown(&mut self, now: Instant) {
        self.now = now;
        let links: Vec<(LinkId, bool)> = self
            .links
            .iter()
            .map(|(id, link)| (*id, link.state == LinkState::Up))
            .collect();
        for (link, up) in links {
            if up {
                self.say_bye(now, link, "shutdown");
            } else {
                self.drop_link(now, link, "shutdown", false);
                self.actions.push_back(Action::Close { link });
            }
        }
        self.stopping = true;
    }

    // ---------------------------------------------------------------- helpers

    fn write(&mut self, link: LinkId, message: &Message) {
        match message.to_line() {
            Ok(line) => self.write_line(link, message, line),
            Err(_) => self.counters.errors += 1,
        }
    }

    /// Writes `message`, already encoded as `line`, on `link`.
    /// Lines to course peers wait in the link's pacing queue (see [`Node::pace`]).
    fn write_line(&mut self, link: LinkId, message: &Message, line: Vec<u8>) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        if state.paced() {
            // A service's PUB (a payload with `svc`) means nothing to a course peer.
            if matches!(message, Message::Pub(data) if service_of(&data.payload).is_some()) {
                return;
            }
            let send_id = match message {
                Message::Send(data) => Some(data.msg_id.clone()),
                _ => None,
            };
            if !state
                .pacing
                .queue(send_id, line, self.config.course_queue_bytes)
            {
                self.counters.dropped += 1;
                return;
            }
        } else {
            self.actions.push_back(Action::Write { link, line });
        }
        if let Some(state) = self.links.get_mut(&link) {
            state.sent += 1;
        }
        self.counters.sent += 1;
        self.trace(Direction::Out, link, message);
        self.pace(link);
    }

    /// The runtime could not queue a line it was asked to write: it is counted as dropped,
    /// not sent.
    pub fn line_dropped(&mut self, link: LinkId) {
        if let Some(state) = self.links.get_mut(&link) {
            state.sent = state.sent.saturating_sub(1);
        }
        self.counters.sent = self.counters.sent.saturating_sub(1);
        self.counters.dropped += 1;
    }

    /// Writes what the pacing of a course link allows now: one line per
    /// [`Config::course_gap`], and a SEND only once the previous SEND was acknowledged (or
    /// [`Config::course_ack_wait`] passed), so that clients that keep only the first line of
    /// each read lose nothing.
    fn pace(&mut self, link: LinkId) {
        let now = self.now;
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        while let Some(line) = state.pacing.next(now, &self.config) {
            self.actions.push_back(Action::Write { link, line });
        }
    }

    fn pace_all(&mut self, now: Instant) {
        let due: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.pacing.due(now))
            .map(|(id, _)| *id)
            .collect();
        for link in due {
            self.pace(link);
        }
    }

    /// True when a SEND is still waiting in a course link's pacing queue (so retransmitting
    /// it would only queue a copy).
    fn queued_for_course(&self, msg_id: &str) -> bool {
        self.links.values().any(|l| l.pacing.holds(msg_id))
    }

    fn emit(&mut self, event: Event) {
        self.actions.push_back(Action::Event(event));
    }

    fn trace(&mut self, direction: Direction, link: LinkId, message: &Message) {
        if !self.watch {
            return;
        }
        let (src, dst) = match message {
            Message::Send(d) | Message::Pub(d) => (Some(d.src.clone()), Some(d.dst.clone())),
            Message::WhoHas(w) => (Some(w.src.clone()), Some(w.dst.clone())),
            Message::WhoHasHit(h) => (Some(h.src.clone()), Some(h.dst.clone())),
            Message::Ack(a) => (a.src.clone(), a.dst.clone()),
            Message::RelayOk(r) | Message::RelayFail(r) => {
                (Some(r.src.clone()), Some(r.dst.clone()))
            }
            Message::Error(e) => (e.src.clone(), e.dst.clone()),
            _ => (None, None),
        };
        let event = Event::Traffic {
            direction,
            peer: self.peer_of(link),
            kind: message.kind().to_owned(),
            msg_id: msg_id_of(message),
            src,
            dst,
        };
        self.emit(event);
    }

    fn bad_format(&mut self, link: LinkId, reference: Option<String>, detail: &str) {
        self.counters.errors += 1;
        let error = self.error_msg(code::BAD_FORMAT, reference, Some(detail.to_owned()), None);
        self.write(link, &Message::Error(error));
    }

    fn error_msg(
        &self,
        code: &str,
        reference: Option<String>,
        detail: Option<String>,
        dst: Option<String>,
    ) -> ErrorMsg {
        ErrorMsg {
            status: "ERROR".to_owned(),
            error: code.to_owned(),
            reference,
            detail,
            limit: None,
            src: Some(self.config.peer_id.clone()),
            ttl: if dst.is_some() {
                self.config.default_ttl
            } else {
                1
            },
            dst,
        }
    }

    fn peer_of(&self, link: LinkId) -> String {
        self.links.get(&link).map(Link::label).unwrap_or_default()
    }

    fn new_id(&mut self) -> String {
        let high = self.rng.next_u64();
        let low = self.rng.next_u64();
        uuid_v4(high, low)
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// Wall time (UNIX ms) at `now`.
    fn unix_millis(&self, now: Instant) -> u64 {
        self.wall_at_start.saturating_add(self.millis(now))
    }

    /// ISO-8601 UTC wall time at `now`.
    fn timestamp(&self, now: Instant) -> String {
        let unix = self.unix_millis(now);
        let time = UNIX_EPOCH + Duration::from_millis(unix);
        humantime::format_rfc3339_seconds(time.max(SystemTime::UNIX_EPOCH)).to_string()
    }
}

/// True when `message` still fits in a line once its signature fields are added.
fn fits_signed(message: &Message) -> bool {
    message
        .to_line()
        .is_ok_and(|line| line.len() + origin::AUTH_ROOM <= MAX_LINE)
}

/// The features both we and the sender of `hello` speak.
fn agreed_features(hello: &Hello) -> Vec<String> {
    feature::ALL
        .iter()
        .filter(|f| hello.has(f))
        .map(|f| (*f).to_owned())
        .collect()
}

/// The destination of a routed message.
fn routed_dst(message: &Message) -> Option<String> {
    match message {
        Message::Send(d) => Some(d.dst.clone()),
        Message::Ack(a) => a.dst.clone(),
        Message::RelayOk(r) | Message::RelayFail(r) => Some(r.dst.clone()),
        Message::Error(e) => e.dst.clone(),
        _ => None,
    }
}

fn msg_id_of(message: &Message) -> Option<String> {
    match message {
        Message::Ping(p) | Message::Pong(p) => Some(p.msg_id.clone()),
        Message::Bye(b) | Message::ByeOk(b) => Some(b.msg_id.clone()),
        Message::Send(d) | Message::Pub(d) => Some(d.msg_id.clone()),
        Message::Ack(a) => Some(a.msg_id.clone()),
        Message::WhoHas(w) => Some(w.msg_id.clone()),
        Message::WhoHasHit(h) => Some(h.msg_id.clone()),
        Message::RelayOk(r) | Message::RelayFail(r) => Some(r.msg_id.clone()),
        Message::MetricsReq(m) => Some(m.msg_id.clone()),
        Message::Metrics(m) => Some(m.msg_id.clone()),
        Message::Error(e) => e.reference.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod sim;
