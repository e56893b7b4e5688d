//! One link's own life, as quinn-proto's `Connection` is to its `Endpoint`: where its
//! handshake stands, its keep-alive (PINGs, missed PONGs, the round-trip time), the pacing of
//! lines toward a course peer, and its counters. [`super::Node`] owns the links, keyed by
//! [`LinkId`](super::LinkId), and asks each what is due; what a link decides needs only its
//! own state, the time and the [`Config`].
//!
//! **Bounds**: a course peer's pacing queue holds [`Config::course_queue_bytes`] (one more
//! line is refused, and counted as dropped by the node); PINGs without a PONG up to
//! [`Config::max_missed_pings`] (then the link is expired); what a peer first said is kept
//! to [`SAID_CHARS`] characters.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use teia_wire::peer::{feature, Hello};

use super::secure::Handshake;
use super::Config;
use crate::identity::PublicKey;

/// Characters of what a peer first sent kept to name a failed handshake.
pub(super) const SAID_CHARS: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    /// Inbound: waiting for HELLO.
    AwaitingHello,
    /// Outbound: HELLO sent, waiting for HELLO_OK.
    AwaitingHelloOk,
    /// Inbound: HELLO_OK with Noise message 2 sent, waiting for NOISE.
    AwaitingNoise,
    /// Handshake done.
    Up,
    /// BYE sent or received; closing.
    Closing,
}

/// What a link's timers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Send a PING.
    Ping,
    /// Close the link, for this reason.
    Expire(&'static str),
}

/// PINGs on an up link and the round-trip time their PONGs give.
#[derive(Debug)]
pub(super) struct KeepAlive {
    next_ping: Instant,
    outstanding: VecDeque<(String, Instant)>,
    rtt: Option<Duration>,
}

impl KeepAlive {
    fn new(now: Instant, interval: Duration) -> Self {
        Self {
            next_ping: now + interval,
            outstanding: VecDeque::new(),
            rtt: None,
        }
    }

    /// A PING `msg_id` went out at `now`.
    pub(super) fn sent(&mut self, msg_id: String, now: Instant, interval: Duration) {
        self.outstanding.push_back((msg_id, now));
        self.next_ping = now + interval;
    }

    /// A PONG for `msg_id` came at `now`: the round trip is measured, missed PINGs forgotten.
    pub(super) fn pong(&mut self, msg_id: &str, now: Instant) {
        if let Some((_, sent)) = self.outstanding.iter().find(|(id, _)| id == msg_id) {
            self.rtt = Some(now.saturating_duration_since(*sent));
            self.outstanding.clear();
        }
    }

    /// The latest round-trip time measured.
    pub(super) fn rtt(&self) -> Option<Duration> {
        self.rtt
    }
}

/// Lines toward a course peer, paced: one per [`Config::course_gap`], and a SEND only once
/// the previous SEND was acknowledged (or [`Config::course_ack_wait`] passed), so that
/// clients that keep only the first line of each read lose nothing.
#[derive(Debug)]
pub(super) struct Pacing {
    queue: VecDeque<(Option<String>, Vec<u8>)>,
    bytes: usize,
    next_at: Instant,
    awaiting_ack: Option<(String, Instant)>,
}

impl Pacing {
    fn new(now: Instant) -> Self {
        Self {
            queue: VecDeque::new(),
            bytes: 0,
            next_at: now,
            awaiting_ack: None,
        }
    }

    /// Queues `line` (a SEND when `send_id` is given); false when `cap` bytes would be
    /// exceeded (the line is refused).
    pub(super) fn queue(&mut self, send_id: Option<String>, line: Vec<u8>, cap: usize) -> bool {
        if self.bytes + line.len() > cap {
            return false;
        }
        self.bytes += line.len();
        self.queue.push_back((send_id, line));
        true
    }

    /// The next line that may be written at `now`, if any.
    pub(super) fn next(&mut self, now: Instant, config: &Config) -> Option<Vec<u8>> {
        if self.next_at > now {
            return None;
        }
        let (send_id, _) = self.queue.front()?;
        let waiting = self
            .awaiting_ack
            .as_ref()
            .is_some_and(|(_, until)| *until > now);
        if send_id.is_some() && waiting {
            return None;
        }
        let (send_id, line) = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(line.len());
        if let Some(id) = send_id {
            self.awaiting_ack = Some((id, now + config.course_ack_wait));
        }
        self.next_at = now + config.course_gap;
        Some(line)
    }

    /// The ACK of `msg_id` came: true when it was the SEND the queue waited for.
    pub(super) fn acked(&mut self, msg_id: &str) -> bool {
        if self
            .awaiting_ack
            .as_ref()
            .is_some_and(|(id, _)| id == msg_id)
        {
            self.awaiting_ack = None;
            return true;
        }
        false
    }

    /// Whether a line may be due at `now`.
    pub(super) fn due(&self, now: Instant) -> bool {
        !self.queue.is_empty() && self.next_at <= now
    }

    /// When the next line may go, if one waits.
    pub(super) fn deadline(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        Some(match &self.awaiting_ack {
            Some((_, until)) => self.next_at.max(*until),
            None => self.next_at,
        })
    }

    /// Whether the SEND `msg_id` waits in the queue.
    pub(super) fn holds(&self, msg_id: &str) -> bool {
        self.queue
            .iter()
            .any(|(id, _)| id.as_deref() == Some(msg_id))
    }
}

#[derive(Debug)]
pub(super) struct Link {
    pub(super) addr: SocketAddr,
    pub(super) inbound: bool,
    pub(super) opened: Instant,
    pub(super) state: LinkState,
    pub(super) peer: Option<String>,
    pub(super) features: Vec<String>,
    /// Where the peer can be dialed (for PEER_LIST and reconnection).
    pub(super) dial_addr: Option<SocketAddr>,
    pub(super) keep_alive: KeepAlive,
    pub(super) sent: u64,
    pub(super) received: u64,
    /// Noise handshake in progress.
    pub(super) handshake: Option<Handshake>,
    /// The HELLO whose link comes up when the handshake completes.
    pub(super) pending_hello: Option<Hello>,
    /// Key proven by the handshake.
    pub(super) key: Option<PublicKey>,
    /// The link is encrypted.
    pub(super) encrypted: bool,
    /// A line has arrived on this link.
    pub(super) heard: bool,
    /// What the other end first sent, for people (at most [`SAID_CHARS`] characters,
    /// control characters as spaces), kept while the link is not up: a dial whose
    /// handshake fails names it.
    pub(super) said: Option<String>,
    /// Lines waiting to be paced out to a course peer.
    pub(super) pacing: Pacing,
}

impl Link {
    /// A connection just opened at `now`: dialed by us, or accepted (`inbound`).
    pub(super) fn new(addr: SocketAddr, inbound: bool, now: Instant, config: &Config) -> Self {
        Self {
            addr,
            inbound,
            opened: now,
            state: if inbound {
                LinkState::AwaitingHello
            } else {
                LinkState::AwaitingHelloOk
            },
            peer: None,
            features: Vec::new(),
            dial_addr: (!inbound).then_some(addr),
            keep_alive: KeepAlive::new(now, config.ping_interval),
            sent: 0,
            received: 0,
            handshake: None,
            pending_hello: None,
            key: None,
            encrypted: false,
            heard: false,
            said: None,
            pacing: Pacing::new(now),
        }
    }

    /// Whether the link agreed on `feature`.
    pub(super) fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// The peer's id, or its address before the handshake.
    pub(super) fn label(&self) -> String {
        self.peer.clone().unwrap_or_else(|| self.addr.to_string())
    }

    /// A course peer: lines to it are paced.
    pub(super) fn paced(&self) -> bool {
        self.state == LinkState::Up && !self.has(feature::TEIA)
    }

    /// The handshake is done at `now` with `peer`, agreeing on `features`; `listen_port`
    /// is where the peer can be dialed.
    pub(super) fn up(
        &mut self,
        now: Instant,
        peer: String,
        features: Vec<String>,
        listen_port: Option<u16>,
        config: &Config,
    ) {
        self.state = LinkState::Up;
        self.opened = now;
        self.peer = Some(peer);
        self.features = features;
        self.keep_alive = KeepAlive::new(now, config.ping_interval);
        self.pacing.next_at = now;
        if let Some(port) = listen_port {
            self.dial_addr = Some(SocketAddr::new(self.addr.ip(), port));
        }
    }

    /// A BYE was sent or received at `now`: the link has [`Config::hello_timeout`] to close.
    pub(super) fn closing(&mut self, now: Instant) {
        self.state = LinkState::Closing;
        self.opened = now;
    }

    /// What the link's timers ask for at `now`.
    pub(super) fn due(&self, now: Instant, config: &Config) -> Option<Due> {
        match self.state {
            LinkState::Up if self.keep_alive.next_ping <= now => {
                if self.keep_alive.outstanding.len() >= config.max_missed_pings as usize {
                    Some(Due::Expire("keep-alive timeout"))
                } else {
                    Some(Due::Ping)
                }
            }
            LinkState::AwaitingHello
                if !self.heard && self.opened + config.first_line_timeout <= now =>
            {
                Some(Due::Expire("silent connection"))
            }
            LinkState::AwaitingHello
            | LinkState::AwaitingHelloOk
            | LinkState::AwaitingNoise
            | LinkState::Closing
                if self.opened + config.hello_timeout <= now =>
            {
                Some(Due::Expire("handshake timeout"))
            }
            _ => None,
        }
    }

    /// When [`Link::due`] next asks for something.
    pub(super) fn deadline(&self, config: &Config) -> Instant {
        match self.state {
            LinkState::Up => self.keep_alive.next_ping,
            LinkState::AwaitingHello if !self.heard => {
                self.opened + config.first_line_timeout.min(config.hello_timeout)
            }
            _ => self.opened + config.hello_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn an_up_link_pings_and_expires_after_missed_pongs() {
        let config = Config {
            max_missed_pings: 2,
            ..Config::new("n0")
        };
        let start = Instant::now();
        let mut link = Link::new(addr(), false, start, &config);
        link.up(start, "n1".into(), Vec::new(), None, &config);
        assert_eq!(link.due(start, &config), None);
        let mut now = link.deadline(&config);
        for n in 0..2 {
            assert_eq!(link.due(now, &config), Some(Due::Ping));
            link.keep_alive
                .sent(format!("p{n}"), now, config.ping_interval);
            now = link.deadline(&config);
        }
        assert_eq!(
            link.due(now, &config),
            Some(Due::Expire("keep-alive timeout"))
        );
        link.keep_alive.pong("p1", now);
        assert!(link.keep_alive.rtt().is_some());
        assert_eq!(link.due(now, &config), Some(Due::Ping));
    }

    #[test]
    fn a_silent_connection_expires_before_the_handshake_timeout() {
        let config = Config::new("n0");
        let start = Instant::now();
        let link = Link::new(addr(), true, start, &config);
        let at = link.deadline(&config);
        assert_eq!(
            link.due(at, &config),
            Some(Due::Expire("silent connection"))
        );
    }

    #[test]
    fn pacing_spaces_lines_and_holds_a_send_until_its_ack() {
        let config = Config::new("n0");
        let now = Instant::now();
        let mut pacing = Pacing::new(now);
        assert!(pacing.queue(Some("s1".into()), b"a".to_vec(), 10));
        assert!(pacing.queue(Some("s2".into()), b"b".to_vec(), 10));
        assert!(!pacing.queue(None, vec![0; 9], 10), "over the byte cap");
        assert_eq!(pacing.next(now, &config), Some(b"a".to_vec()));
        assert_eq!(pacing.next(now, &config), None, "one line per gap");
        let later = now + config.course_gap;
        assert_eq!(pacing.next(later, &config), None, "s1 not acknowledged");
        assert!(pacing.holds("s2"));
        assert!(pacing.acked("s1"));
        assert_eq!(pacing.next(later, &config), Some(b"b".to_vec()));
        assert_eq!(pacing.deadline(), None);
    }
}
