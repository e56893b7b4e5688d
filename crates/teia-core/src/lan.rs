//! LAN discovery, sans-IO: nodes on one LAN find each other with no rendezvous and no
//! `--peer`, by UDP broadcast (as Syncthing's local discovery does). A node broadcasts a
//! query and its announcement when it starts, its announcement every
//! [`ANNOUNCE_EVERY`], and answers a query with its announcement, unicast, at most once a
//! second per source. Each datagram is signed by the node's key and carries it; one whose
//! signature does not verify is refused. What is learnt goes to the overlay as an address
//! to dial (under its dial limits, and its handshake must prove the announced key, which
//! pinning then checks like any other).
//!
//! Datagrams are JSON objects of at most [`MAX_DATAGRAM`] bytes (PROTOCOL.md section 9).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, PublicKey};
use crate::rate::RateLimiter;

/// The UDP port of LAN discovery, unless told otherwise.
pub const LAN_PORT: u16 = 21029;

/// Period of a node's announcement.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);

/// Largest datagram read or sent.
pub const MAX_DATAGRAM: usize = 1024;

/// Sources (IP addresses) whose rates are tracked; past it, idle ones are forgotten and,
/// if none is idle, a new source is ignored until one is.
pub const MAX_SOURCES: usize = 256;

/// The protocol tag of a datagram.
const TAG: &str = "teia-lan/1";

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LanError {
    /// Over [`MAX_DATAGRAM`] bytes.
    #[error("datagram over {MAX_DATAGRAM} bytes")]
    TooLarge,
    /// Not a teia LAN datagram.
    #[error("not a teia LAN datagram")]
    Foreign,
    /// Its fields are not valid.
    #[error("malformed LAN datagram: {0}")]
    Malformed(String),
    /// Its signature does not verify with its key.
    #[error("LAN datagram from {0} with a bad signature")]
    BadSignature(String),
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
        /// Its overlay address: the datagram's source IP and the announced port.
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
    sig: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Announce,
    Query,
}

/// What a datagram's signature covers.
fn signed_text(kind: Kind, peer_id: &str, key: &str, port: Option<u16>) -> String {
    let kind = match kind {
        Kind::Announce => "announce",
        Kind::Query => "query",
    };
    let port = port.map_or_else(String::new, |p| p.to_string());
    format!("{TAG}\n{kind}\n{peer_id}\n{key}\n{port}")
}

/// One node's LAN discovery.
#[derive(Debug)]
pub struct Lan {
    peer_id: String,
    namespace: String,
    listening: bool,
    announce: Vec<u8>,
    query: Vec<u8>,
    next_announce: Option<Instant>,
    origin: Option<Instant>,
    replies: RateLimiter<IpAddr>,
    found: RateLimiter<IpAddr>,
}

impl Lan {
    /// Discovery for `peer_id` (signed with `identity`), which accepts links on `port`
    /// (`None`: it only dials).
    pub fn new(peer_id: &str, identity: &Identity, port: Option<u16>) -> Self {
        let key = identity.public_key().to_string();
        let datagram = |kind| {
            let sig = identity.sign(signed_text(kind, peer_id, &key, port).as_bytes());
            let datagram = Datagram {
                lan: TAG.to_owned(),
                kind,
                peer_id: peer_id.to_owned(),
                key: key.clone(),
                port,
                sig: URL_SAFE_NO_PAD.encode(sig),
            };
            serde_json::to_vec(&datagram).unwrap_or_default()
        };
        Self {
            peer_id: peer_id.to_owned(),
            namespace: namespace_of(peer_id).to_owned(),
            listening: port.is_some(),
            announce: datagram(Kind::Announce),
            query: datagram(Kind::Query),
            next_announce: None,
            origin: None,
            // One answer a second per source, two at once.
            replies: RateLimiter::new(1, 2, MAX_SOURCES),
            // Eight nodes at once per source, then one a second.
            found: RateLimiter::new(1, 8, MAX_SOURCES),
        }
    }

    /// At start: ask the LAN's nodes to announce themselves, and announce this one.
    pub fn start(&mut self, now: Instant) -> Vec<LanAction> {
        self.origin = Some(now);
        self.next_announce = Some(now + ANNOUNCE_EVERY);
        let mut actions = vec![LanAction::Broadcast(self.query.clone())];
        if self.listening {
            actions.push(LanAction::Broadcast(self.announce.clone()));
        }
        actions
    }

    /// When [`Lan::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_announce
    }

    /// The periodic announcement, when due.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<LanAction> {
        match self.next_announce {
            Some(due) if now >= due => {
                self.next_announce = Some(now + ANNOUNCE_EVERY);
                if self.listening {
                    vec![LanAction::Broadcast(self.announce.clone())]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// A datagram from `from`: a query is answered (rate-limited), an announcement of a
    /// node of our namespace is reported [`LanAction::Found`]; our own echoes and other
    /// namespaces are ignored.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<LanAction>, LanError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(LanError::TooLarge);
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
        if datagram.peer_id == self.peer_id {
            return Ok(Vec::new());
        }
        let key = PublicKey::parse(&datagram.key)
            .map_err(|e| LanError::Malformed(format!("key: {e}")))?;
        let signature = URL_SAFE_NO_PAD
            .decode(&datagram.sig)
            .map_err(|_| LanError::Malformed("sig".into()))?;
        let text = signed_text(
            datagram.kind,
            &datagram.peer_id,
            &datagram.key,
            datagram.port,
        );
        if !key.verify(text.as_bytes(), &signature) {
            return Err(LanError::BadSignature(datagram.peer_id));
        }
        if namespace_of(&datagram.peer_id) != self.namespace {
            return Ok(Vec::new());
        }
        let millis = self.origin.map_or(0, |origin| {
            now.saturating_duration_since(origin).as_millis() as u64
        });
        match datagram.kind {
            Kind::Query => {
                if self.listening && self.replies.allow(&from.ip(), millis) {
                    Ok(vec![LanAction::Send(from, self.announce.clone())])
                } else {
                    Ok(Vec::new())
                }
            }
            Kind::Announce => match datagram.port {
                Some(port) if port != 0 && self.found.allow(&from.ip(), millis) => {
                    Ok(vec![LanAction::Found {
                        peer_id: datagram.peer_id,
                        key,
                        addr: SocketAddr::new(from.ip(), port),
                    }])
                }
                _ => Ok(Vec::new()),
            },
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

    fn node(name: &str, port: Option<u16>) -> (Lan, PublicKey) {
        let mut seed = [0u8; 32];
        seed[..name.len()].copy_from_slice(name.as_bytes());
        let identity = Identity::from_seed(&seed);
        (Lan::new(name, &identity, port), identity.public_key())
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

    #[test]
    fn an_announcement_is_found_and_a_query_answered_once_a_second() {
        let now = Instant::now();
        let (mut alice, alice_key) = node("alice@lab", Some(7000));
        let (mut bob, _) = node("bob@lab", Some(7001));
        let started = alice.start(now);
        let sent = broadcasts(&started);
        assert_eq!(sent.len(), 2, "a query and an announcement");
        bob.start(now);
        let from: SocketAddr = "192.168.1.20:40000".parse().unwrap();
        let mut found = Vec::new();
        let mut answers = Vec::new();
        for bytes in &sent {
            for action in bob.handle_datagram(now, from, bytes).unwrap() {
                match action {
                    LanAction::Found { peer_id, key, addr } => found.push((peer_id, key, addr)),
                    LanAction::Send(to, _) => answers.push(to),
                    LanAction::Broadcast(_) => panic!("no broadcast on a datagram"),
                }
            }
        }
        assert_eq!(
            found,
            [(
                "alice@lab".to_owned(),
                alice_key,
                "192.168.1.20:7000".parse().unwrap()
            )]
        );
        assert_eq!(answers, [from], "the query is answered to its sender");
        // Queries beyond the rate are not answered.
        let query = &sent[0];
        let mut answered = 0;
        for _ in 0..10 {
            answered += bob.handle_datagram(now, from, query).unwrap().len();
        }
        assert_eq!(answered, 1, "a burst of two per source, one already spent");
        let later = now + Duration::from_secs(2);
        assert_eq!(bob.handle_datagram(later, from, query).unwrap().len(), 1);
    }

    #[test]
    fn forged_foreign_oversized_own_and_other_namespaces_are_not_found() {
        let now = Instant::now();
        let (mut alice, _) = node("alice@lab", Some(7000));
        let (mut bob, _) = node("bob@lab", Some(7001));
        let (mut carol, _) = node("carol@other", Some(7002));
        let from: SocketAddr = "10.0.0.5:1".parse().unwrap();
        let announce = broadcasts(&alice.start(now)).pop().unwrap();
        bob.start(now);
        // Another peer id under alice's signature.
        let forged = String::from_utf8(announce.clone())
            .unwrap()
            .replace("alice@lab", "mallory@lab");
        assert_eq!(
            bob.handle_datagram(now, from, forged.as_bytes()),
            Err(LanError::BadSignature("mallory@lab".into()))
        );
        // Another port under alice's signature.
        let moved = String::from_utf8(announce.clone())
            .unwrap()
            .replace("7000", "7666");
        assert!(matches!(
            bob.handle_datagram(now, from, moved.as_bytes()),
            Err(LanError::BadSignature(_))
        ));
        assert_eq!(
            bob.handle_datagram(now, from, b"{\"action\":\"DISCOVER_MASTER\"}"),
            Err(LanError::Foreign)
        );
        assert_eq!(
            bob.handle_datagram(now, from, &[b' '; MAX_DATAGRAM + 1]),
            Err(LanError::TooLarge)
        );
        assert!(matches!(
            bob.handle_datagram(now, from, b"{\"lan\":\"teia-lan/1\",\"kind\":\"announce\"}"),
            Err(LanError::Malformed(_))
        ));
        // Its own echo, and a node of another namespace: nothing.
        assert_eq!(alice.handle_datagram(now, from, &announce), Ok(Vec::new()));
        carol.start(now);
        assert_eq!(carol.handle_datagram(now, from, &announce), Ok(Vec::new()));
    }

    #[test]
    fn a_node_that_accepts_no_links_asks_but_never_announces() {
        let now = Instant::now();
        let (mut quiet, _) = node("quiet@lab", None);
        let (mut bob, _) = node("bob@lab", Some(7001));
        let started = quiet.start(now);
        assert_eq!(broadcasts(&started).len(), 1, "only the query");
        assert!(quiet.handle_timeout(now + ANNOUNCE_EVERY).is_empty());
        bob.start(now);
        let query = broadcasts(&started).pop().unwrap();
        let from: SocketAddr = "10.0.0.9:5".parse().unwrap();
        let answer = bob.handle_datagram(now, from, &query).unwrap();
        let Some(LanAction::Send(to, bytes)) = answer.first() else {
            panic!("bob answers: {answer:?}");
        };
        assert_eq!(*to, from);
        let found = quiet.handle_datagram(now, "10.0.0.7:21029".parse().unwrap(), bytes);
        assert!(
            matches!(found.unwrap().first(), Some(LanAction::Found { peer_id, .. }) if peer_id == "bob@lab")
        );
    }

    /// Forty nodes on one broadcast medium, started one after another: every node learns
    /// every other (from the announcements at start and the answers to queries), and the
    /// periodic announcement comes every 30 s.
    #[test]
    fn forty_nodes_on_a_lan_all_find_each_other() {
        let start = Instant::now();
        let count = 40;
        let mut nodes: Vec<Lan> = (0..count)
            .map(|i| node(&format!("n{i}@lab"), Some(7000 + i as u16)).0)
            .collect();
        let ip = |i: usize| -> SocketAddr {
            format!("10.0.{}.{}:21029", i / 200, i % 200 + 1)
                .parse()
                .unwrap()
        };
        let mut known = vec![std::collections::BTreeSet::new(); count];
        for i in 0..count {
            let now = start + Duration::from_millis(100 * i as u64);
            let mut queue: Vec<(usize, Option<usize>, Vec<u8>)> = nodes[i]
                .start(now)
                .into_iter()
                .filter_map(|a| match a {
                    LanAction::Broadcast(b) => Some((i, None, b)),
                    _ => None,
                })
                .collect();
            while let Some((sender, to, bytes)) = queue.pop() {
                let receivers: Vec<usize> = match to {
                    Some(one) => vec![one],
                    None => (0..=i).filter(|&r| r != sender).collect(),
                };
                for receiver in receivers {
                    for action in nodes[receiver]
                        .handle_datagram(now, ip(sender), &bytes)
                        .unwrap()
                    {
                        match action {
                            LanAction::Found { peer_id, .. } => {
                                known[receiver].insert(peer_id);
                            }
                            LanAction::Send(to, bytes) => {
                                let target = (0..count).find(|&t| ip(t) == to).unwrap();
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
        assert_eq!(first.poll_timeout(), Some(start + ANNOUNCE_EVERY));
        assert!(first
            .handle_timeout(start + ANNOUNCE_EVERY - Duration::from_millis(1))
            .is_empty());
        assert_eq!(
            broadcasts(&first.handle_timeout(start + ANNOUNCE_EVERY)).len(),
            1
        );
    }
}
