//! The membership part of the overlay: the addresses a node knows, which of them to dial and
//! when (a node-wide dial budget, backoff per address, giving up), and the addresses found to
//! be the node itself. It knows nothing of links beyond the peer ids linked now; the router
//! part of [`super::Node`] tells it what happened to its dials and links.
//!
//! **Bounds**: [`super::Config::known_capacity`] addresses (the oldest idle, unpinned one is
//! forgotten for a new one; when none is idle the new one is not learnt), at most
//! [`super::Config::learned_per_peer`] learnt from one neighbour's PEER_LIST (more are
//! ignored), [`OWN_ADDRS_KEPT`] own addresses (the oldest forgotten first), and
//! [`super::Config::dial_rate`] dials per second (a burst of twice that).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Config, LinkId};

/// Addresses remembered as our own.
pub(super) const OWN_ADDRS_KEPT: usize = 16;
/// Time a link must stay up for its address's failures to be forgotten.
pub(super) const STABLE_LINK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    Idle,
    Dialing,
    Connected,
}

#[derive(Debug)]
struct Known {
    peer: Option<String>,
    /// Asked for by the user (`--peer`, `/connect`): kept connected.
    pinned: bool,
    state: Dial,
    failures: u32,
    next_attempt: Instant,
    learned: Instant,
    /// The neighbour whose PEER_LIST named it, for the per-neighbour cap.
    source: Option<String>,
    /// It said BYE: not dialed again until it is seen again.
    departed: bool,
}

/// What follows a failed dial or a lost link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Redial {
    /// The address is not known (any more).
    Unknown,
    /// Dialed again after this delay.
    After(Duration),
    /// Given up after this many failures in a row; `asked` when the user asked for it.
    GaveUp { attempts: u32, asked: bool },
}

impl Redial {
    /// The delay before the next dial, if there is one.
    pub(super) fn delay(self) -> Option<Duration> {
        match self {
            Self::After(delay) => Some(delay),
            Self::Unknown | Self::GaveUp { .. } => None,
        }
    }
}

/// The settings of [`Config`] that membership follows.
#[derive(Debug, Clone)]
struct Settings {
    listen_port: Option<u16>,
    target_neighbours: usize,
    reconnect_initial: Duration,
    reconnect_max_delay: Duration,
    reconnect_attempts: u32,
    known_capacity: usize,
    dial_rate: u32,
    learned_per_peer: usize,
}

/// Known addresses, dial scheduling and own addresses.
#[derive(Debug)]
pub(super) struct Membership {
    settings: Settings,
    known: HashMap<SocketAddr, Known>,
    own_addrs: Vec<SocketAddr>,
    dial_tokens: f64,
    dial_tokens_at: Instant,
}

impl Membership {
    /// Nothing known, a full dial budget at `now`.
    pub(super) fn new(config: &Config, now: Instant) -> Self {
        Self {
            settings: Settings {
                listen_port: config.listen_port,
                target_neighbours: config.target_neighbours,
                reconnect_initial: config.reconnect_initial,
                reconnect_max_delay: config.reconnect_max_delay,
                reconnect_attempts: config.reconnect_attempts,
                known_capacity: config.known_capacity,
                dial_rate: config.dial_rate,
                learned_per_peer: config.learned_per_peer,
            },
            known: HashMap::new(),
            own_addrs: Vec::new(),
            dial_tokens: f64::from(config.dial_rate) * 2.0,
            dial_tokens_at: now,
        }
    }

    /// True for an address this node must not dial: one found to be itself, or its own
    /// listening port on a loopback or unspecified address.
    pub(super) fn is_own(&self, addr: SocketAddr) -> bool {
        self.own_addrs.contains(&addr)
            || (Some(addr.port()) == self.settings.listen_port
                && (addr.ip().is_loopback() || addr.ip().is_unspecified()))
    }

    /// Remembers `addr` as this node's own: never dialed again. When it was known, it is
    /// forgotten and `Some(asked)` says whether the user had asked for it.
    pub(super) fn mark_own(&mut self, addr: SocketAddr) -> Option<bool> {
        if !self.own_addrs.contains(&addr) {
            if self.own_addrs.len() >= OWN_ADDRS_KEPT {
                self.own_addrs.remove(0);
            }
            self.own_addrs.push(addr);
        }
        self.known.remove(&addr).map(|known| known.pinned)
    }

    /// Learns `addr` (its peer id when given), if there is room: `source` is the neighbour
    /// whose PEER_LIST named it. Seeing a departed peer again makes it dialable. Returns
    /// whether the address is known now.
    pub(super) fn learn(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        peer: Option<String>,
        source: Option<String>,
    ) -> bool {
        self.entry(now, addr, peer, source).is_some()
    }

    fn entry(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        peer: Option<String>,
        source: Option<String>,
    ) -> Option<&mut Known> {
        if self.is_own(addr) {
            return None;
        }
        if !self.known.contains_key(&addr) {
            if let Some(source) = &source {
                let from_source = self
                    .known
                    .values()
                    .filter(|k| k.source.as_ref() == Some(source))
                    .count();
                if from_source >= self.settings.learned_per_peer {
                    return None;
                }
            }
            if self.known.len() >= self.settings.known_capacity {
                let stale = self
                    .known
                    .iter()
                    .filter(|(_, k)| !k.pinned && k.state == Dial::Idle)
                    .min_by_key(|(_, k)| k.learned)
                    .map(|(a, _)| *a)?;
                self.known.remove(&stale);
            }
            self.known.insert(
                addr,
                Known {
                    peer: None,
                    pinned: false,
                    state: Dial::Idle,
                    failures: 0,
                    next_attempt: now,
                    learned: now,
                    source,
                    departed: false,
                },
            );
        } else if let Some(known) = self.known.get_mut(&addr) {
            known.departed = false;
        }
        let known = self.known.get_mut(&addr)?;
        if peer.is_some() {
            known.peer = peer;
        }
        known.learned = now;
        Some(known)
    }

    /// The user asks for `addr`: kept connected, dialed at once.
    pub(super) fn pin(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(known) = self.entry(now, addr, None, None) {
            known.pinned = true;
            known.failures = 0;
            known.departed = false;
            known.next_attempt = now;
        }
    }

    /// Whether the user asked for `addr`.
    pub(super) fn asked(&self, addr: SocketAddr) -> bool {
        self.known.get(&addr).is_some_and(|k| k.pinned)
    }

    /// A dial of ours to `addr` connected.
    pub(super) fn connected(&mut self, addr: SocketAddr) {
        if let Some(known) = self.known.get_mut(&addr) {
            known.state = Dial::Connected;
        }
    }

    /// A link to `peer`, dialable at `addr`, came up.
    pub(super) fn link_up(&mut self, now: Instant, addr: SocketAddr, peer: String) {
        if let Some(known) = self.entry(now, addr, Some(peer), None) {
            known.state = Dial::Connected;
            known.departed = false;
        }
    }

    /// A link to `addr` is gone; one that stayed up for [`STABLE_LINK`] wipes the address's
    /// record of failures.
    pub(super) fn link_lost(&mut self, addr: SocketAddr, stable: bool) {
        if let Some(known) = self.known.get_mut(&addr) {
            if known.state != Dial::Dialing {
                known.state = Dial::Idle;
            }
            if stable {
                known.failures = 0;
            }
        }
    }

    /// The peer at `addr` said it leaves: not dialed again until it is seen again, unless
    /// the user asked for it (then `true`: schedule its redial).
    pub(super) fn departed(&mut self, addr: SocketAddr) -> bool {
        match self.known.get_mut(&addr) {
            Some(known) if known.pinned => true,
            Some(known) => {
                known.departed = true;
                false
            }
            None => false,
        }
    }

    /// After a failure or loss: the delay before the next dial of `addr`, if any. After
    /// [`Config::reconnect_attempts`] failures in a row the address is given up.
    pub(super) fn failed(&mut self, now: Instant, addr: SocketAddr) -> Redial {
        let settings = &self.settings;
        let Some(known) = self.known.get_mut(&addr) else {
            return Redial::Unknown;
        };
        known.state = Dial::Idle;
        known.failures = known.failures.saturating_add(1);
        if known.failures > settings.reconnect_attempts {
            let attempts = known.failures.saturating_sub(1);
            let asked = known.pinned;
            self.known.remove(&addr);
            return Redial::GaveUp { attempts, asked };
        }
        let factor = 1u32 << known.failures.saturating_sub(1).min(16);
        let delay = (settings.reconnect_initial * factor).min(settings.reconnect_max_delay);
        known.next_attempt = now + delay;
        Redial::After(delay)
    }

    /// Peers known by id, sorted, with their addresses.
    pub(super) fn known_peers(&self) -> Vec<(String, SocketAddr)> {
        let mut list: Vec<_> = self
            .known
            .iter()
            .filter_map(|(addr, k)| k.peer.clone().map(|p| (p, *addr)))
            .collect();
        list.sort();
        list
    }

    /// Makes every address not connected now dialable at once, forgetting its backoff.
    pub(super) fn reconnect_all(&mut self, now: Instant) {
        for known in self.known.values_mut() {
            if known.state == Dial::Idle {
                known.failures = 0;
                known.departed = false;
                known.next_attempt = now;
            }
        }
    }

    fn wants(&self, known: &Known, linked: &HashMap<String, LinkId>) -> bool {
        if known.departed || known.failures > self.settings.reconnect_attempts {
            return false;
        }
        if known.peer.as_ref().is_some_and(|p| linked.contains_key(p)) {
            return false;
        }
        known.pinned || linked.len() < self.settings.target_neighbours
    }

    fn dialing(&self) -> usize {
        self.known
            .values()
            .filter(|k| k.state == Dial::Dialing)
            .count()
    }

    /// The addresses to dial now, given the peers `linked` now: pinned ones first, others
    /// while below the neighbour target, all within the dial budget. Each is marked as
    /// being dialed.
    pub(super) fn due(
        &mut self,
        now: Instant,
        linked: &HashMap<String, LinkId>,
    ) -> Vec<SocketAddr> {
        let mut budget = self
            .settings
            .target_neighbours
            .saturating_sub(linked.len() + self.dialing());
        let mut due: Vec<(bool, SocketAddr)> = self
            .known
            .iter()
            .filter(|(_, k)| {
                k.state == Dial::Idle && k.next_attempt <= now && self.wants(k, linked)
            })
            .map(|(addr, k)| (!k.pinned, *addr))
            .collect();
        due.sort();
        let mut dials = Vec::new();
        for (unpinned, addr) in due {
            if unpinned {
                if budget == 0 {
                    continue;
                }
                budget -= 1;
            }
            if !self.take_dial_token(now) {
                break;
            }
            if let Some(known) = self.known.get_mut(&addr) {
                known.state = Dial::Dialing;
            }
            dials.push(addr);
        }
        dials
    }

    /// When [`Membership::due`] next has an address to dial, given the peers `linked` now.
    pub(super) fn next_dial(&self, linked: &HashMap<String, LinkId>) -> Option<Instant> {
        let room = linked.len() + self.dialing() < self.settings.target_neighbours;
        let token = self.next_dial_token();
        self.known
            .values()
            .filter(|k| k.state == Dial::Idle && self.wants(k, linked) && (k.pinned || room))
            .map(|k| k.next_attempt.max(token))
            .min()
    }

    /// When the node-wide dial budget next has a dial to spend.
    fn next_dial_token(&self) -> Instant {
        if self.dial_tokens >= 1.0 || self.settings.dial_rate == 0 {
            return self.dial_tokens_at;
        }
        let missing = 1.0 - self.dial_tokens;
        self.dial_tokens_at + Duration::from_secs_f64(missing / f64::from(self.settings.dial_rate))
    }

    fn take_dial_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.settings.dial_rate);
        let elapsed = now.saturating_duration_since(self.dial_tokens_at);
        self.dial_tokens = (self.dial_tokens + elapsed.as_secs_f64() * rate).min(rate * 2.0);
        self.dial_tokens_at = now;
        if self.dial_tokens >= 1.0 {
            self.dial_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn config() -> Config {
        Config {
            target_neighbours: 2,
            reconnect_attempts: 2,
            known_capacity: 3,
            learned_per_peer: 2,
            dial_rate: 100,
            listen_port: Some(7000),
            ..Config::new("n0")
        }
    }

    #[test]
    fn dials_stay_below_the_target_and_pinned_addresses_go_first() {
        let now = Instant::now();
        let mut members = Membership::new(&config(), now);
        for port in [1, 2, 3] {
            members.learn(now, addr(port), None, None);
        }
        members.pin(now, addr(9));
        let due = members.due(now, &HashMap::new());
        assert_eq!(due.len(), 3, "one pinned and two for the target: {due:?}");
        assert_eq!(due.first(), Some(&addr(9)));
        assert!(
            members.due(now, &HashMap::new()).is_empty(),
            "all being dialed"
        );
    }

    #[test]
    fn failures_back_off_and_give_up() {
        let now = Instant::now();
        let mut members = Membership::new(&config(), now);
        members.pin(now, addr(1));
        assert_eq!(
            members.failed(now, addr(1)),
            Redial::After(Duration::from_secs(1))
        );
        assert_eq!(
            members.failed(now, addr(1)),
            Redial::After(Duration::from_secs(2))
        );
        assert_eq!(
            members.failed(now, addr(1)),
            Redial::GaveUp {
                attempts: 2,
                asked: true
            }
        );
        assert_eq!(members.failed(now, addr(1)), Redial::Unknown);
    }

    #[test]
    fn own_addresses_and_one_neighbours_share_are_not_learnt() {
        let now = Instant::now();
        let mut members = Membership::new(&config(), now);
        assert!(
            !members.learn(now, addr(7000), None, None),
            "our listening port"
        );
        let from = Some("n1".to_owned());
        assert!(members.learn(now, addr(1), None, from.clone()));
        assert!(members.learn(now, addr(2), None, from.clone()));
        assert!(
            !members.learn(now, addr(3), None, from),
            "over learned_per_peer"
        );
        members.learn(now, addr(5), None, None);
        assert_eq!(members.mark_own(addr(5)), Some(false));
        assert!(members.is_own(addr(5)));
        assert!(!members.learn(now, addr(5), None, None));
    }

    #[test]
    fn a_departed_peer_waits_until_it_is_seen_again() {
        let now = Instant::now();
        let mut members = Membership::new(&config(), now);
        members.learn(now, addr(1), Some("n1".into()), None);
        assert!(!members.departed(addr(1)));
        assert!(members.due(now, &HashMap::new()).is_empty());
        members.learn(now, addr(1), None, None);
        assert_eq!(members.due(now, &HashMap::new()), vec![addr(1)]);
    }
}
