//! LAN discovery, sans-IO: nodes on one LAN find each other with no rendezvous and no
//! `--peer`, by UDP broadcast (as Syncthing's local discovery does). A node broadcasts a
//! query and its announcement when it starts, its announcement every
//! [`ANNOUNCE_EVERY`], and answers a query with its announcement, unicast. Each datagram is
//! signed by the node's key and carries it, with the node's addresses, the time it was made
//! and a nonce: one that is stale, seen before, or whose signature does not verify is
//! refused. What is learnt goes to the overlay as an address to dial (under its dial limits,
//! and its handshake must prove the announced key, which pinning then checks like any
//! other).
//!
//! Datagrams are JSON objects of at most [`MAX_DATAGRAM`] bytes (PROTOCOL.md section 9).
//!
//! # Bounds
//!
//! A datagram goes through, in this order, each check cheaper than the next:
//! - its size ([`MAX_DATAGRAM`]);
//! - its source IP's budget, [`DATAGRAMS_PER_SOURCE`] a second (twice as many at once),
//!   for at most [`MAX_SOURCES`] sources (when the table is full of busy sources, new
//!   ones are dropped until one is idle);
//! - the node's budget for all sources, [`DATAGRAMS_PER_SECOND`] (twice as many at once);
//! - parsing, its namespace (others are ignored) and its time, at most [`FRESH_WINDOW`]
//!   from ours either way;
//! - the replay cache: the last [`REPLAYS_KEPT`] (key, nonce) pairs accepted (the oldest is
//!   forgotten first, never one still fresh: see [`REPLAYS_KEPT`]);
//! - the budget of signature checks, [`VERIFICATIONS_PER_SECOND`] (twice as many at once);
//! - the signature.
//!
//! A datagram dropped by a budget is [`LanError::Flooded`] and costs no signature check.
//! Queries are answered at most once a second per source IP (two at once) and
//! [`REPLIES_PER_SECOND`] in all; announced nodes are reported at most once a second per
//! source IP (eight at once) and [`LAN_DIALS_PER_SECOND`] in all ([`LAN_DIALS_BURST`] at
//! once): beyond,
//! they wait for the next announcement ([`ANNOUNCE_EVERY`]).

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, PublicKey};
use crate::rate::RateLimiter;
use crate::rng::SplitMix64;

/// The UDP port of LAN discovery, unless told otherwise.
pub const LAN_PORT: u16 = 21029;

/// Period of a node's announcement.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);

/// Largest datagram read or sent.
pub const MAX_DATAGRAM: usize = 1024;

/// Sources (IP addresses) whose rates are tracked; past it, idle ones are forgotten and,
/// if none is idle, a new source is ignored until one is.
pub const MAX_SOURCES: usize = 256;

/// Datagrams a second one source IP may make the node read (twice as many at once).
pub const DATAGRAMS_PER_SOURCE: u32 = 10;

/// Datagrams a second the node reads from all sources together (twice as many at once).
pub const DATAGRAMS_PER_SECOND: u32 = 500;

/// Signatures checked a second at most (twice as many at once).
pub const VERIFICATIONS_PER_SECOND: u32 = 100;

/// Queries answered a second at most, all sources together (twice as many at once).
pub const REPLIES_PER_SECOND: u32 = 10;

/// Nodes learnt from the LAN reported for dialing a second at most, all sources together.
pub const LAN_DIALS_PER_SECOND: u32 = 2;

/// Nodes learnt from the LAN reported for dialing at once at most, all sources together.
pub const LAN_DIALS_BURST: u32 = 8;

/// Most a datagram's time may differ from ours, either way, for it to be fresh.
pub const FRESH_WINDOW: Duration = Duration::from_secs(60);

/// (key, nonce) pairs of accepted datagrams remembered, to refuse their replays. More than
/// can be accepted while one is fresh (an accepted datagram costs a signature check: at most
/// twice [`VERIFICATIONS_PER_SECOND`] at once, then that many a second, over the two
/// [`FRESH_WINDOW`]s a datagram is fresh for), so none is forgotten while it could be
/// replayed.
pub const REPLAYS_KEPT: usize = 16_384;

/// Addresses a datagram lists at most (a node with more lists its first ones).
pub const MAX_ADDRS: usize = 16;

/// Longest nonce read (22 characters are written: 16 bytes, unpadded base64url).
const MAX_NONCE: usize = 32;

/// The protocol tag of a datagram.
const TAG: &str = "teia-lan/2";

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LanError {
    /// Over [`MAX_DATAGRAM`] bytes.
    #[error("datagram over {MAX_DATAGRAM} bytes")]
    TooLarge,
    /// Dropped unread: its source, or all sources together, sent more than their budget.
    #[error("datagram dropped: too many")]
    Flooded,
    /// Not a teia LAN datagram (or one of an older version).
    #[error("not a teia LAN datagram")]
    Foreign,
    /// Its fields are not valid.
    #[error("malformed LAN datagram: {0}")]
    Malformed(String),
    /// Its time is more than [`FRESH_WINDOW`] from ours.
    #[error("stale LAN datagram from {0}")]
    Stale(String),
    /// Its key and nonce were seen before.
    #[error("replayed LAN datagram from {0}")]
    Replayed(String),
    /// Its signature does not verify with its key.
    #[error("LAN datagram from {0} with a bad signature")]
    BadSignature(String),
    /// An announcement from an address it does not list (its source was forged, or it is
    /// behind a translation).
    #[error("announcement of {peer_id} from {from}, an address it does not list")]
    Unlisted {
        /// The node announced.
        peer_id: String,
        /// Where the datagram came from.
        from: IpAddr,
    },
}

/// What the runtime is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LanAction {
    /// Send these bytes to the broadcast addresses.
    Broadcast(Vec<u8>),
    /// Send these bytes to one address.
    Send(SocketAddr, Vec<u8>),
    /// A node of our namespace announced itself: dial it.
    Found {
        /// Its peer id.
        peer_id: String,
        /// Its key, as it signed the announcement.
        key: PublicKey,
        /// Its overlay address: the datagram's source IP (one it listed) and the announced
        /// port.
        addr: SocketAddr,
    },
}

/// A datagram.
#[derive(Debug, Serialize, Deserialize)]
struct Datagram {
    lan: String,
    kind: Kind,
    peer_id: String,
    key: String,
    /// The port it accepts links on; none when it accepts none.
    port: Option<u16>,
    /// The IPv4 addresses it may be dialed at.
    addrs: Vec<Ipv4Addr>,
    /// When it was made, in milliseconds since the UNIX epoch.
    time: u64,
    /// Unique per datagram of this key.
    nonce: String,
    sig: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Announce,
    Query,
}

/// What a datagram's signature covers.
fn signed_text(d: &Datagram) -> String {
    let kind = match d.kind {
        Kind::Announce => "announce",
        Kind::Query => "query",
    };
    let port = d.port.map_or_else(String::new, |p| p.to_string());
    let addrs: Vec<String> = d.addrs.iter().map(ToString::to_string).collect();
    format!(
        "{TAG}\n{kind}\n{}\n{}\n{port}\n{}\n{}\n{}",
        d.peer_id,
        d.key,
        addrs.join(","),
        d.time,
        d.nonce
    )
}

/// (key, nonce) pairs accepted lately, oldest first, at most [`REPLAYS_KEPT`].
#[derive(Debug, Default)]
struct Replays {
    seen: HashSet<(PublicKey, String)>,
    order: VecDeque<(PublicKey, String)>,
}

impl Replays {
    fn contains(&self, key: PublicKey, nonce: &str) -> bool {
        self.seen.contains(&(key, nonce.to_owned()))
    }

    fn insert(&mut self, key: PublicKey, nonce: String) {
        while self.order.len() >= REPLAYS_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        if self.seen.insert((key, nonce.clone())) {
            self.order.push_back((key, nonce));
        }
    }
}

/// One node's LAN discovery.
#[derive(Debug)]
pub struct Lan {
    peer_id: String,
    namespace: String,
    identity: Identity,
    key: String,
    port: Option<u16>,
    addrs: Vec<Ipv4Addr>,
    rng: SplitMix64,
    next_announce: Option<Instant>,
    origin: Option<Instant>,
    datagrams: RateLimiter<IpAddr>,
    all_datagrams: RateLimiter<()>,
    verifications: RateLimiter<()>,
    replies: RateLimiter<IpAddr>,
    all_replies: RateLimiter<()>,
    found: RateLimiter<IpAddr>,
    all_found: RateLimiter<()>,
    replays: Replays,
    checked: u64,
}

impl Lan {
    /// Discovery for `peer_id` (signed with `identity`), which accepts links on `port`
    /// (`None`: it only dials); `seed` makes its nonces (any value unique to this run).
    pub fn new(peer_id: &str, identity: &Identity, port: Option<u16>, seed: u64) -> Self {
        Self {
            peer_id: peer_id.to_owned(),
            namespace: namespace_of(peer_id).to_owned(),
            identity: identity.clone(),
            key: identity.public_key().to_string(),
            port,
            addrs: Vec::new(),
            rng: SplitMix64::new(seed),
            next_announce: None,
            origin: None,
            datagrams: RateLimiter::new(
                DATAGRAMS_PER_SOURCE,
                DATAGRAMS_PER_SOURCE * 2,
                MAX_SOURCES,
            ),
            all_datagrams: RateLimiter::new(DATAGRAMS_PER_SECOND, DATAGRAMS_PER_SECOND * 2, 1),
            verifications: RateLimiter::new(
                VERIFICATIONS_PER_SECOND,
                VERIFICATIONS_PER_SECOND * 2,
                1,
            ),
            // One answer a second per source, two at once.
            replies: RateLimiter::new(1, 2, MAX_SOURCES),
            all_replies: RateLimiter::new(REPLIES_PER_SECOND, REPLIES_PER_SECOND * 2, 1),
            // Eight nodes at once per source, then one a second.
            found: RateLimiter::new(1, 8, MAX_SOURCES),
            all_found: RateLimiter::new(LAN_DIALS_PER_SECOND, LAN_DIALS_BURST, 1),
            replays: Replays::default(),
            checked: 0,
        }
    }

    /// The IPv4 addresses this node may be dialed at, listed in its announcements (at most
    /// [`MAX_ADDRS`]): a receiver dials an announcement's source only if it is one of them.
    pub fn set_addresses(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut list: Vec<Ipv4Addr> = Vec::new();
        for addr in addrs {
            if !addr.is_unspecified() && !list.contains(&addr) && list.len() < MAX_ADDRS {
                list.push(addr);
            }
        }
        self.addrs = list;
    }

    /// Signatures checked so far.
    pub fn signatures_checked(&self) -> u64 {
        self.checked
    }

    /// A fresh datagram of `kind`, signed, at wall time `unix_ms`: with as many of the
    /// node's addresses, first ones first, as fit in [`MAX_DATAGRAM`].
    fn datagram(&mut self, kind: Kind, unix_ms: u64) -> Vec<u8> {
        let mut listed = self.addrs.len();
        loop {
            let bytes = self.datagram_listing(kind, unix_ms, listed);
            if bytes.len() <= MAX_DATAGRAM || listed == 0 {
                return bytes;
            }
            listed -= 1;
        }
    }

    fn datagram_listing(&mut self, kind: Kind, unix_ms: u64, listed: usize) -> Vec<u8> {
        let nonce = [
            self.rng.next_u64().to_le_bytes(),
            self.rng.next_u64().to_le_bytes(),
        ]
        .concat();
        let mut datagram = Datagram {
            lan: TAG.to_owned(),
            kind,
            peer_id: self.peer_id.clone(),
            key: self.key.clone(),
            port: self.port,
            addrs: self.addrs.iter().take(listed).copied().collect(),
            time: unix_ms,
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            sig: String::new(),
        };
        let sig = self.identity.sign(signed_text(&datagram).as_bytes());
        datagram.sig = URL_SAFE_NO_PAD.encode(sig);
        serde_json::to_vec(&datagram).unwrap_or_default()
    }

    fn millis(&self, now: Instant) -> u64 {
        self.origin.map_or(0, |origin| {
            u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// At start (`now`, wall time `unix_ms`): ask the LAN's nodes to announce themselves,
    /// and announce this one.
    pub fn start(&mut self, now: Instant, unix_ms: u64) -> Vec<LanAction> {
        self.origin = Some(now);
        self.next_announce = Some(now + ANNOUNCE_EVERY);
        let mut actions = vec![LanAction::Broadcast(self.datagram(Kind::Query, unix_ms))];
        if self.port.is_some() {
            actions.push(LanAction::Broadcast(self.datagram(Kind::Announce, unix_ms)));
        }
        actions
    }

    /// When [`Lan::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_announce
    }

    /// The periodic announcement, when due.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) -> Vec<LanAction> {
        match self.next_announce {
            Some(due) if now >= due => {
                self.next_announce = Some(now + ANNOUNCE_EVERY);
                if self.port.is_some() {
                    vec![LanAction::Broadcast(self.datagram(Kind::Announce, unix_ms))]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// A datagram from `from` at `now` (wall time `unix_ms`): a query is answered
    /// (rate-limited), an announcement of a node of our namespace is reported
    /// [`LanAction::Found`] (rate-limited); our own echoes and other namespaces are
    /// ignored. The checks run cheapest first (see the module's Bounds).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<LanAction>, LanError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(LanError::TooLarge);
        }
        let millis = self.millis(now);
        if !self.datagrams.allow(&from.ip(), millis) || !self.all_datagrams.allow(&(), millis) {
            return Err(LanError::Flooded);
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|_| LanError::Foreign)?;
        if value.get("lan").and_then(serde_json::Value::as_str) != Some(TAG) {
            return Err(LanError::Foreign);
        }
        let datagram: Datagram =
            serde_json::from_value(value).map_err(|e| LanError::Malformed(e.to_string()))?;
        if !crate::overlay::is_peer_id(&datagram.peer_id) {
            return Err(LanError::Malformed("peer_id".into()));
        }
        if datagram.addrs.len() > MAX_ADDRS {
            return Err(LanError::Malformed("addrs".into()));
        }
        if datagram.nonce.is_empty() || datagram.nonce.len() > MAX_NONCE {
            return Err(LanError::Malformed("nonce".into()));
        }
        if datagram.peer_id == self.peer_id || namespace_of(&datagram.peer_id) != self.namespace {
            return Ok(Vec::new());
        }
        let window = u64::try_from(FRESH_WINDOW.as_millis()).unwrap_or(u64::MAX);
        if datagram.time.abs_diff(unix_ms) > window {
            return Err(LanError::Stale(datagram.peer_id));
        }
        let key = PublicKey::parse(&datagram.key)
            .map_err(|e| LanError::Malformed(format!("key: {e}")))?;
        if self.replays.contains(key, &datagram.nonce) {
            return Err(LanError::Replayed(datagram.peer_id));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(&datagram.sig)
            .map_err(|_| LanError::Malformed("sig".into()))?;
        if !self.verifications.allow(&(), millis) {
            return Err(LanError::Flooded);
        }
        self.checked += 1;
        if !key.verify(signed_text(&datagram).as_bytes(), &signature) {
            return Err(LanError::BadSignature(datagram.peer_id));
        }
        self.replays.insert(key, datagram.nonce.clone());
        match datagram.kind {
            Kind::Query => {
                if self.port.is_some()
                    && self.replies.allow(&from.ip(), millis)
                    && self.all_replies.allow(&(), millis)
                {
                    Ok(vec![LanAction::Send(
                        from,
                        self.datagram(Kind::Announce, unix_ms),
                    )])
                } else {
                    Ok(Vec::new())
                }
            }
            Kind::Announce => {
                let Some(port) = datagram.port.filter(|p| *p != 0) else {
                    return Ok(Vec::new());
                };
                let listed = match from.ip() {
                    IpAddr::V4(v4) => datagram.addrs.contains(&v4),
                    IpAddr::V6(v6) => v6
                        .to_ipv4_mapped()
                        .is_some_and(|v4| datagram.addrs.contains(&v4)),
                };
                if !listed {
                    return Err(LanError::Unlisted {
                        peer_id: datagram.peer_id,
                        from: from.ip(),
                    });
                }
                if !self.found.allow(&from.ip(), millis) || !self.all_found.allow(&(), millis) {
                    return Ok(Vec::new());
                }
                Ok(vec![LanAction::Found {
                    peer_id: datagram.peer_id,
                    key,
                    addr: SocketAddr::new(from.ip(), port),
                }])
            }
        }
    }
}

fn namespace_of(peer_id: &str) -> &str {
    peer_id.rsplit_once('@').map_or("", |(_, ns)| ns)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    /// A wall time, in UNIX milliseconds.
    const T0: u64 = 1_700_000_000_000;

    fn identity(name: &str) -> Identity {
        let mut seed = [0u8; 32];
        seed[..name.len()].copy_from_slice(name.as_bytes());
        Identity::from_seed(&seed)
    }

    /// A node `name` listening on `port`, dialable at `ip`.
    fn node_at(name: &str, port: Option<u16>, ip: &str) -> (Lan, PublicKey) {
        let identity = identity(name);
        let mut lan = Lan::new(name, &identity, port, name.len() as u64);
        lan.set_addresses([ip.parse().unwrap()]);
        (lan, identity.public_key())
    }

    fn node(name: &str, port: Option<u16>) -> (Lan, PublicKey) {
        node_at(name, port, "192.168.1.20")
    }

    fn broadcasts(actions: &[LanAction]) -> Vec<Vec<u8>> {
        actions
            .iter()
            .filter_map(|a| match a {
                LanAction::Broadcast(bytes) => Some(bytes.clone()),
                _ => None,
            })
            .collect()
    }

    fn found(actions: &[LanAction]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, LanAction::Found { .. }))
            .count()
    }

    /// `name`'s announcement made at wall time `unix_ms`, from `ip`.
    fn announcement(name: &str, ip: &str, unix_ms: u64) -> Vec<u8> {
        let mut lan = Lan::new(name, &identity(name), Some(7000), unix_ms);
        lan.set_addresses([ip.parse().unwrap()]);
        broadcasts(&lan.start(Instant::now(), unix_ms))
            .pop()
            .unwrap()
    }

    #[test]
    fn an_announcement_is_found_and_a_query_answered_once_a_second() {
        let now = Instant::now();
        let (mut alice, alice_key) = node("alice@lab", Some(7000));
        let (mut bob, _) = node("bob@lab", Some(7001));
        let started = alice.start(now, T0);
        let sent = broadcasts(&started);
        assert_eq!(sent.len(), 2, "a query and an announcement");
        bob.start(now, T0);
        let from: SocketAddr = "192.168.1.20:40000".parse().unwrap();
        let mut reported = Vec::new();
        let mut answers = Vec::new();
        for bytes in &sent {
            for action in bob.handle_datagram(now, T0, from, bytes).unwrap() {
                match action {
                    LanAction::Found { peer_id, key, addr } => reported.push((peer_id, key, addr)),
                    LanAction::Send(to, _) => answers.push(to),
                    LanAction::Broadcast(_) => panic!("no broadcast on a datagram"),
                }
            }
        }
        assert_eq!(
            reported,
            [(
                "alice@lab".to_owned(),
                alice_key,
                "192.168.1.20:7000".parse().unwrap()
            )]
        );
        assert_eq!(answers, [from], "the query is answered to its sender");
        // Queries (each fresh) beyond the rate are not answered.
        let mut answered = 0;
        for i in 0..10 {
            let (mut asker, _) = node_at(&format!("q{i}@lab"), None, "192.168.1.20");
            let query = broadcasts(&asker.start(now, T0)).remove(0);
            answered += bob.handle_datagram(now, T0, from, &query).unwrap().len();
        }
        assert_eq!(answered, 1, "a burst of two per source, one already spent");
        let later = now + Duration::from_secs(2);
        let (mut asker, _) = node_at("late@lab", None, "192.168.1.20");
        let query = broadcasts(&asker.start(later, T0 + 2_000)).remove(0);
        let answer = bob
            .handle_datagram(later, T0 + 2_000, from, &query)
            .unwrap();
        assert_eq!(answer.len(), 1);
        // The answer is a fresh announcement, found by the asker.
        let LanAction::Send(_, bytes) = &answer[0] else {
            panic!("{answer:?}");
        };
        let heard = asker
            .handle_datagram(
                later,
                T0 + 2_000,
                "192.168.1.20:50000".parse().unwrap(),
                bytes,
            )
            .unwrap();
        assert_eq!(found(&heard), 1);
    }

    #[test]
    fn forged_foreign_old_unsigned_oversized_own_and_other_namespaces_are_not_found() {
        let now = Instant::now();
        let (mut alice, _) = node("alice@lab", Some(7000));
        let (mut bob, _) = node("bob@lab", Some(7001));
        let (mut carol, _) = node("carol@other", Some(7002));
        let from: SocketAddr = "192.168.1.20:1".parse().unwrap();
        let announce = broadcasts(&alice.start(now, T0)).pop().unwrap();
        bob.start(now, T0);
        let text = String::from_utf8(announce.clone()).unwrap();
        // Another peer id under alice's signature.
        let forged = text.replace("alice@lab", "mallory@lab");
        assert_eq!(
            bob.handle_datagram(now, T0, from, forged.as_bytes()),
            Err(LanError::BadSignature("mallory@lab".into()))
        );
        // Another port, or another address, under alice's signature.
        for altered in [
            text.replace("\"port\":7000", "\"port\":7666"),
            text.replace("192.168.1.20", "192.168.1.66"),
        ] {
            assert!(matches!(
                bob.handle_datagram(now, T0, from, altered.as_bytes()),
                Err(LanError::BadSignature(_))
            ));
        }
        // Unsigned, and the older version (no time, no nonce).
        let unsigned = {
            let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
            value.as_object_mut().unwrap().remove("sig");
            value.to_string()
        };
        assert!(matches!(
            bob.handle_datagram(now, T0, from, unsigned.as_bytes()),
            Err(LanError::Malformed(_))
        ));
        let old = format!(
            r#"{{"lan":"teia-lan/1","kind":"announce","peer_id":"alice@lab","key":"{}","port":7000,"sig":"AAAA"}}"#,
            identity("alice@lab").public_key()
        );
        assert_eq!(
            bob.handle_datagram(now, T0, from, old.as_bytes()),
            Err(LanError::Foreign)
        );
        assert_eq!(
            bob.handle_datagram(now, T0, from, b"{\"action\":\"DISCOVER_MASTER\"}"),
            Err(LanError::Foreign)
        );
        assert_eq!(
            bob.handle_datagram(now, T0, from, &[b' '; MAX_DATAGRAM + 1]),
            Err(LanError::TooLarge)
        );
        // Its own echo, and a node of another namespace: nothing.
        assert_eq!(
            alice.handle_datagram(now, T0, from, &announce),
            Ok(Vec::new())
        );
        carol.start(now, T0);
        assert_eq!(
            carol.handle_datagram(now, T0, from, &announce),
            Ok(Vec::new())
        );
        // The genuine one still counts.
        assert_eq!(
            found(&bob.handle_datagram(now, T0, from, &announce).unwrap()),
            1
        );
    }

    #[test]
    fn a_replayed_announcement_is_refused_and_one_from_an_address_it_does_not_list_too() {
        let now = Instant::now();
        let (mut bob, _) = node("bob@lab", Some(7001));
        bob.start(now, T0);
        let announce = announcement("alice@lab", "192.168.1.20", T0);
        let from: SocketAddr = "192.168.1.20:21029".parse().unwrap();
        assert_eq!(
            found(&bob.handle_datagram(now, T0, from, &announce).unwrap()),
            1
        );
        let later = now + Duration::from_secs(5);
        assert_eq!(
            bob.handle_datagram(later, T0 + 5_000, from, &announce),
            Err(LanError::Replayed("alice@lab".into()))
        );
        // The same datagram sent again from forged sources: refused, nothing to dial.
        for i in 1..50 {
            let spoofed: SocketAddr = format!("10.9.0.{i}:21029").parse().unwrap();
            assert_eq!(
                bob.handle_datagram(later, T0 + 5_000, spoofed, &announce),
                Err(LanError::Replayed("alice@lab".into()))
            );
        }
        // A fresh announcement that reaches bob from an address it does not list.
        let fresh = announcement("alice@lab", "192.168.1.20", T0 + 6_000);
        let spoofed: SocketAddr = "10.9.1.1:21029".parse().unwrap();
        assert!(matches!(
            bob.handle_datagram(later, T0 + 6_000, spoofed, &fresh),
            Err(LanError::Unlisted { .. })
        ));
    }

    #[test]
    fn the_replay_cache_outlasts_what_can_be_accepted_while_fresh() {
        let window = FRESH_WINDOW.as_secs() * 2;
        let accepted = u64::from(VERIFICATIONS_PER_SECOND) * (2 + window);
        assert!(accepted < REPLAYS_KEPT as u64, "{accepted}");
    }

    #[test]
    fn a_stale_announcement_is_refused() {
        let now = Instant::now();
        let (mut bob, _) = node("bob@lab", Some(7001));
        bob.start(now, T0);
        let from: SocketAddr = "192.168.1.20:21029".parse().unwrap();
        let window = FRESH_WINDOW.as_millis() as u64;
        let old = announcement("alice@lab", "192.168.1.20", T0 - window - 1);
        assert_eq!(
            bob.handle_datagram(now, T0, from, &old),
            Err(LanError::Stale("alice@lab".into()))
        );
        let ahead = announcement("alice@lab", "192.168.1.20", T0 + window + 1);
        assert_eq!(
            bob.handle_datagram(now, T0, from, &ahead),
            Err(LanError::Stale("alice@lab".into()))
        );
        assert_eq!(bob.signatures_checked(), 0, "refused before its signature");
        let edge = announcement("alice@lab", "192.168.1.20", T0 - window);
        assert_eq!(
            found(&bob.handle_datagram(now, T0, from, &edge).unwrap()),
            1
        );
    }

    #[test]
    fn a_flood_is_dropped_before_its_signatures_are_checked() {
        let now = Instant::now();
        let (mut bob, _) = node("bob@lab", Some(7001));
        bob.start(now, T0);
        let text = String::from_utf8(announcement("alice@lab", "10.0.0.1", T0)).unwrap();
        let sig_at = text.find("\"sig\":\"").unwrap() + 7;
        let mut bad = text.into_bytes();
        bad[sig_at] = if bad[sig_at] == b'A' { b'B' } else { b'A' };
        // From one source: its budget, then nothing is read.
        let from: SocketAddr = "10.0.0.1:21029".parse().unwrap();
        let mut refused_unread = 0;
        for _ in 0..10_000 {
            match bob.handle_datagram(now, T0, from, &bad) {
                Err(LanError::Flooded) => refused_unread += 1,
                Err(LanError::BadSignature(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        let per_source = u64::from(DATAGRAMS_PER_SOURCE * 2);
        assert_eq!(bob.signatures_checked(), per_source);
        assert_eq!(refused_unread, 10_000 - per_source);
        // From ten thousand (forged) sources: the table of sources, the node's budget of
        // datagrams and of signature checks bound the work.
        for i in 0..10_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), 21029);
            let _ = bob.handle_datagram(now, T0, from, &bad);
        }
        let checked = bob.signatures_checked();
        assert!(
            checked <= u64::from(VERIFICATIONS_PER_SECOND * 2),
            "{checked} signatures checked"
        );
        // A second later the budgets have refilled a little, not more.
        let later = now + Duration::from_secs(1);
        for i in 0..10_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(11, a, b, c)), 21029);
            let _ = bob.handle_datagram(later, T0 + 1_000, from, &bad);
        }
        let more = bob.signatures_checked() - checked;
        assert!(
            more <= u64::from(VERIFICATIONS_PER_SECOND),
            "{more} more signatures checked in a second"
        );
    }

    #[test]
    fn lan_learned_dials_are_capped_in_total() {
        let now = Instant::now();
        let (mut bob, _) = node("bob@lab", Some(7001));
        bob.start(now, T0);
        let announce = |i: usize, unix_ms: u64| {
            let ip = format!("10.1.{}.{}", i / 200, i % 200 + 1);
            let from: SocketAddr = format!("{ip}:21029").parse().unwrap();
            (from, announcement(&format!("n{i}@lab"), &ip, unix_ms))
        };
        let mut reported = 0;
        for i in 0..50 {
            let (from, bytes) = announce(i, T0);
            reported += found(&bob.handle_datagram(now, T0, from, &bytes).unwrap());
        }
        assert_eq!(reported, LAN_DIALS_BURST as usize, "fifty nodes at once");
        let later = now + Duration::from_secs(1);
        let mut reported = 0;
        for i in 50..100 {
            let (from, bytes) = announce(i, T0 + 1_000);
            reported += found(
                &bob.handle_datagram(later, T0 + 1_000, from, &bytes)
                    .unwrap(),
            );
        }
        assert_eq!(reported, LAN_DIALS_PER_SECOND as usize, "then the rate");
    }

    #[test]
    fn the_longest_announcement_fits_in_a_datagram() {
        let now = Instant::now();
        let long = format!("{}@{}", "é".repeat(64), "ç".repeat(64));
        let mut lan = Lan::new(&long, &identity("long"), Some(65_535), 1);
        let addrs: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(192, 168, 255, i)).collect();
        lan.set_addresses(addrs);
        let announce = broadcasts(&lan.start(now, T0)).pop().unwrap();
        assert!(announce.len() <= MAX_DATAGRAM, "{} bytes", announce.len());
        let mut other = Lan::new(
            &format!("other@{}", "ç".repeat(64)),
            &identity("other"),
            None,
            2,
        );
        other.start(now, T0);
        let from: SocketAddr = "192.168.255.0:21029".parse().unwrap();
        assert_eq!(
            found(&other.handle_datagram(now, T0, from, &announce).unwrap()),
            1
        );
    }

    #[test]
    fn a_node_that_accepts_no_links_asks_but_never_announces() {
        let now = Instant::now();
        let (mut quiet, _) = node_at("quiet@lab", None, "10.0.0.9");
        let (mut bob, _) = node_at("bob@lab", Some(7001), "10.0.0.7");
        let started = quiet.start(now, T0);
        assert_eq!(broadcasts(&started).len(), 1, "only the query");
        assert!(quiet.handle_timeout(now + ANNOUNCE_EVERY, T0).is_empty());
        bob.start(now, T0);
        let query = broadcasts(&started).pop().unwrap();
        let from: SocketAddr = "10.0.0.9:5".parse().unwrap();
        let answer = bob.handle_datagram(now, T0, from, &query).unwrap();
        let Some(LanAction::Send(to, bytes)) = answer.first() else {
            panic!("bob answers: {answer:?}");
        };
        assert_eq!(*to, from);
        let found = quiet.handle_datagram(now, T0, "10.0.0.7:21029".parse().unwrap(), bytes);
        assert!(
            matches!(found.unwrap().first(), Some(LanAction::Found { peer_id, .. }) if peer_id == "bob@lab")
        );
    }

    /// Forty nodes on one broadcast medium, started a second apart: every node learns every
    /// other (from the announcements at start, the answers to queries, and the periodic
    /// announcements, within the cap on LAN-learned dials), and the periodic announcement
    /// comes every 30 s.
    #[test]
    fn forty_nodes_on_a_lan_all_find_each_other() {
        let start = Instant::now();
        let count = 40;
        let ip = |i: usize| format!("10.0.{}.{}", i / 200, i % 200 + 1);
        let addr = |i: usize| -> SocketAddr { format!("{}:21029", ip(i)).parse().unwrap() };
        let mut nodes: Vec<Lan> = (0..count)
            .map(|i| node_at(&format!("n{i}@lab"), Some(7000 + i as u16), &ip(i)).0)
            .collect();
        let mut known = vec![std::collections::BTreeSet::new(); count];
        let mut started = 0;
        let step = Duration::from_millis(100);
        for tick in 0..(count as u64 * 10 + 400) {
            let now = start + step * tick as u32;
            let unix = T0 + tick * 100;
            let mut queue: Vec<(usize, Option<usize>, Vec<u8>)> = Vec::new();
            if tick % 10 == 0 && started < count {
                let actions = nodes[started].start(now, unix);
                queue.extend(broadcasts(&actions).into_iter().map(|b| (started, None, b)));
                started += 1;
            }
            for (i, lan) in nodes.iter_mut().enumerate().take(started) {
                if lan.poll_timeout().is_some_and(|due| due <= now) {
                    let actions = lan.handle_timeout(now, unix);
                    queue.extend(broadcasts(&actions).into_iter().map(|b| (i, None, b)));
                }
            }
            while let Some((sender, to, bytes)) = queue.pop() {
                let receivers: Vec<usize> = match to {
                    Some(one) => vec![one],
                    None => (0..started).filter(|&r| r != sender).collect(),
                };
                for receiver in receivers {
                    for action in nodes[receiver]
                        .handle_datagram(now, unix, addr(sender), &bytes)
                        .unwrap()
                    {
                        match action {
                            LanAction::Found { peer_id, .. } => {
                                known[receiver].insert(peer_id);
                            }
                            LanAction::Send(to, bytes) => {
                                let target = (0..count).find(|&t| addr(t) == to).unwrap();
                                queue.push((receiver, Some(target), bytes));
                            }
                            LanAction::Broadcast(_) => {}
                        }
                    }
                }
            }
        }
        for (i, peers) in known.iter().enumerate() {
            assert_eq!(peers.len(), count - 1, "n{i} knows {peers:?}");
        }
        let first = &mut nodes[0];
        let due = first.poll_timeout().unwrap();
        assert!(first
            .handle_timeout(due - Duration::from_millis(1), T0)
            .is_empty());
        assert_eq!(broadcasts(&first.handle_timeout(due, T0)).len(), 1);
        assert_eq!(first.poll_timeout(), Some(due + ANNOUNCE_EVERY));
    }
}
