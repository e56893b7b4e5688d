//! Seed 003's peer-exchange chat (PROTOCOL.md section 11) as a sans-IO machine: the Node.js
//! peers a teia node links with, and the rules that make a mixed network of them and teia
//! nodes show every line once everywhere.
//!
//! A seed 003 peer writes JSON objects back to back on two connections per pair of peers
//! (the dialed peer dials back), never relays, and shows every `message` it reads, twice if
//! it gets it twice. So each Node peer has one *home*: the one teia node linked with it, which
//! presents it to the overlay as a course peer named `IP:PORT@NAMESPACE` (its lines become
//! PUBs to `#NAMESPACE` vouched for by the home, and PUBs to `*` and `#NAMESPACE` and SENDs
//! to it become `message` objects). Teia nodes tell each other which Node peers they are home
//! to, and which Node peers each of those is directly linked with, in *views* (a PUB to `*`
//! for the service `pex`): a line is written to a Node peer only when it could not have had it
//! from its origin directly, a teia node does not link a Node peer that has a home, and when a
//! home goes its Node peers are adopted, one adopter after the other.
//!
//! The runtime feeds it connections, objects read, lines the overlay writes to a Node peer's
//! link, views heard and time; it carries out [`PexAction`]s.
//!
//! **Bounds**: Node peers known, at most [`PexConfig::max_peers`] (beyond, one that is idle
//! is forgotten to make room, and when none is, newly learnt ones are ignored); connections, at most [`PexConfig::max_conns`] (beyond, a new one is closed);
//! text waiting for one Node peer, at most [`PexConfig::queue_bytes`] (beyond, lines are
//! dropped and reported); one `message` written, at most [`PexConfig::max_object`] bytes (a
//! longer line goes in several); adjacency lists of at most [`MAX_ADJACENT`] hosts; views from
//! at most [`MAX_VIEWS`] teia nodes (beyond, a new sender is ignored until one expires).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use teia_wire::peer::{Ack, Hello, Message, Ping, VERSION};
use teia_wire::pex::{ChatLine, KnownHost, Welcome};

/// Identifies one TCP connection to a Node peer, chosen by the runtime.
pub type ConnId = u64;

/// The service name of views (a PUB's payload `svc`).
pub const VIEW_SERVICE: &str = "pex";

/// Hosts kept per Node peer as directly linked with it, at most.
pub const MAX_ADJACENT: usize = 64;

/// Teia nodes whose views are kept, at most.
pub const MAX_VIEWS: usize = 256;

/// Lines a Node peer sends before its link is up that are kept for it, at most (each is at
/// most one object, 64 KiB); more are dropped.
const MAX_EARLY_LINES: usize = 16;

/// A link that lasts this long resets its peer's failures.
const STEADY: Duration = Duration::from_secs(30);

/// Time an accepted connection has to complete its `welcome`.
const WELCOME_WAIT: Duration = Duration::from_secs(5);

/// Settings of the machine.
#[derive(Debug, Clone)]
pub struct PexConfig {
    /// Our peer id (views' tie-breaks compare it).
    pub peer_id: String,
    /// Namespace the Node peers are placed in.
    pub namespace: String,
    /// Port we listen on, announced as `myPort`.
    pub port: u16,
    /// Random for each run: the ids of the PUBs made of Node peers' lines start with it, so
    /// that a restarted node does not reuse an id the overlay still remembers.
    pub seed: u64,
    /// Shortest time between two objects written to one Node peer: the seed's peers parse
    /// each read as one object, and two objects in one read crash them.
    pub gap: Duration,
    /// Bytes of text waiting for one Node peer, at most.
    pub queue_bytes: usize,
    /// Bytes of one `message` on the wire, at most: one TCP segment on an Ethernet path, so
    /// that a Node peer reads it whole (lines waiting are joined up to it; a longer line goes
    /// in pieces).
    pub max_object: usize,
    /// Time after a Node peer's link comes up before its host list is asked for again
    /// (once), when its own dials have settled.
    pub refresh_after: Duration,
    /// Time a dialed Node peer has to dial back.
    pub dial_back_wait: Duration,
    /// Interval between two views while this node is home to Node peers.
    pub view_interval: Duration,
    /// Age after which a teia node's view is dropped.
    pub view_expiry: Duration,
    /// Delay between two teia nodes' turns at adopting a Node peer whose home went.
    pub adopt_step: Duration,
    /// Delay before a Node peer learnt from a host list is dialed: time for the views of
    /// teia nodes just linked to say whether it has a home.
    pub learn_delay: Duration,
    /// Node peers known, at most.
    pub max_peers: usize,
    /// Connections at most.
    pub max_conns: usize,
    /// Failed dials in a row before a learnt (not asked for) Node peer is given up.
    pub learned_attempts: u32,
    /// Longest delay between two dials of a Node peer asked for.
    pub retry_max: Duration,
}

impl PexConfig {
    /// The defaults for a node `peer_id` listening on `port`, placing Node peers in
    /// `namespace`, with a run's random `seed`.
    pub fn new(
        peer_id: impl Into<String>,
        namespace: impl Into<String>,
        port: u16,
        seed: u64,
    ) -> Self {
        Self {
            peer_id: peer_id.into(),
            namespace: namespace.into(),
            port,
            seed,
            gap: Duration::from_millis(100),
            queue_bytes: 64 * 1024,
            max_object: 1_200,
            refresh_after: Duration::from_secs(3),
            dial_back_wait: Duration::from_secs(5),
            view_interval: Duration::from_secs(10),
            view_expiry: Duration::from_secs(35),
            adopt_step: Duration::from_secs(2),
            learn_delay: Duration::from_secs(1),
            max_peers: 256,
            max_conns: 512,
            learned_attempts: 3,
            retry_max: Duration::from_secs(60),
        }
    }
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum PexAction {
    /// Open a connection to a Node peer; report it with [`Pex::dialed`] or
    /// [`Pex::dial_failed`].
    Dial {
        /// Where.
        addr: SocketAddr,
    },
    /// Write one object, in one `write`.
    Write {
        /// The connection.
        conn: ConnId,
        /// The object's bytes.
        bytes: Vec<u8>,
    },
    /// Stop writing on a connection and close it once the other side has (the seed's peers
    /// crash on a reset).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// A Node peer's overlay link is up: open it on the overlay as an inbound link from
    /// `peer` (whoever dialed first: the overlay must never dial a Node peer itself); its
    /// HELLO follows.
    LinkUp {
        /// The Node peer (its listen address).
        peer: SocketAddr,
    },
    /// A line for the overlay, as if read on the Node peer's link.
    LinkLine {
        /// The Node peer.
        peer: SocketAddr,
        /// The line (no `\n`).
        line: Vec<u8>,
    },
    /// The Node peer's overlay link is down.
    LinkDown {
        /// The Node peer.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Publish this view to `*`.
    Publish {
        /// The view (its `svc` is [`VIEW_SERVICE`]).
        payload: Value,
    },
    /// Tell people.
    Event(PexEvent),
}

/// What people hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum PexEvent {
    /// A Node peer already has a home: this node leaves it to it.
    Declined {
        /// The Node peer.
        peer: SocketAddr,
        /// Its home.
        home: String,
    },
    /// A dial of a Node peer failed.
    DialFailed {
        /// Where.
        peer: SocketAddr,
        /// Why.
        error: String,
        /// When it is tried again, if it is.
        retry_in: Option<Duration>,
        /// Whether it was asked for (rather than learnt from a host list).
        asked: bool,
    },
    /// Lines for a Node peer were dropped: it was not reading fast enough.
    Dropped {
        /// The Node peer.
        peer: SocketAddr,
        /// Bytes of text dropped.
        bytes: usize,
    },
    /// Another teia node's view changed: the Node peers it is home to, each with the hosts
    /// it is directly linked with (sorted).
    View {
        /// The teia node.
        from: String,
        /// Its Node peers.
        homed: Vec<(SocketAddr, Vec<SocketAddr>)>,
    },
    /// A connection was closed because of what it sent.
    Refused {
        /// The connection's address.
        addr: SocketAddr,
        /// Why.
        why: &'static str,
    },
}

/// The name a Node peer has in the overlay: `IP:PORT@NAMESPACE`.
pub fn peer_id_of(addr: SocketAddr, namespace: &str) -> String {
    format!("{addr}@{namespace}")
}

/// The Node peer a peer id names, if it is one (`IP:PORT@…`).
pub fn addr_of(peer_id: &str) -> Option<SocketAddr> {
    peer_id.split_once('@')?.0.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Known, not linked.
    Idle,
    /// Our dial is on its way, for the link.
    Dialing,
    /// Our welcome is written; waiting for the Node peer to dial back.
    AwaitingDialBack,
    /// It dialed us; our dial back is on its way.
    DialingBack,
    /// Linked: its overlay link is up.
    Linked,
}

#[derive(Debug)]
struct Peer {
    state: State,
    /// Asked for by the user: dialed again, with backoff, for as long as the node runs.
    asked: bool,
    /// The connection we write on (ours).
    out_conn: Option<ConnId>,
    /// The connection it writes on (its own).
    in_conn: Option<ConnId>,
    /// Hosts it is directly linked with, as its latest welcome said.
    adjacent: BTreeSet<SocketAddr>,
    /// Text waiting to be written to it.
    queue: VecDeque<String>,
    queued_bytes: usize,
    next_write: Instant,
    /// When to ask for its host list again.
    refresh_at: Option<Instant>,
    /// Our connection asking for its host list, and the dial back it answers with.
    refresh_conns: Vec<ConnId>,
    failures: u32,
    /// When its link came up.
    linked_at: Option<Instant>,
    /// Lines it sent before its link came up (at most [`MAX_EARLY_LINES`]).
    early: Vec<String>,
    /// When to dial it (while idle).
    dial_at: Option<Instant>,
    /// When the dial back must have come.
    deadline: Option<Instant>,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Self {
            state: State::Idle,
            asked: false,
            out_conn: None,
            in_conn: None,
            adjacent: BTreeSet::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_write: now,
            refresh_at: None,
            refresh_conns: Vec::new(),
            failures: 0,
            linked_at: None,
            early: Vec::new(),
            dial_at: None,
            deadline: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Accepted; its first object (a welcome) has not come.
    Accepted,
    /// A Node peer's own connection to us: it writes its lines here.
    Theirs,
    /// Ours, to a Node peer: we write here.
    Ours,
    /// A short-lived pair asking a Node peer for its host list.
    Refresh,
}

#[derive(Debug)]
struct Conn {
    remote: SocketAddr,
    peer: Option<SocketAddr>,
    role: Role,
    /// When it was accepted or dialed.
    opened: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Link,
    DialBack,
    Refresh,
}

#[derive(Debug)]
struct View {
    /// Node peers the sender is home to, each with the hosts it is directly linked with.
    homed: HashMap<SocketAddr, Vec<SocketAddr>>,
    expires: Instant,
}

/// The machine: every Node peer this node knows, its connections, and the views of other
/// teia nodes.
#[derive(Debug)]
pub struct Pex {
    config: PexConfig,
    peers: HashMap<SocketAddr, Peer>,
    conns: HashMap<ConnId, Conn>,
    dials: HashMap<SocketAddr, Purpose>,
    views: HashMap<String, View>,
    view_due: Option<Instant>,
    /// A view saying we are home to no one is still owed (after the last Node peer left).
    retract: bool,
    next_id: u64,
    actions: VecDeque<PexAction>,
}

impl Pex {
    /// A machine with no Node peer yet.
    pub fn new(config: PexConfig) -> Self {
        Self {
            config,
            peers: HashMap::new(),
            conns: HashMap::new(),
            dials: HashMap::new(),
            views: HashMap::new(),
            view_due: None,
            retract: false,
            next_id: 0,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<PexAction> {
        self.actions.pop_front()
    }

    /// Links with the Node peer at `addr` and keeps it linked (unless another teia node is
    /// its home).
    pub fn connect(&mut self, now: Instant, addr: SocketAddr) {
        let addr = canonical(addr);
        if !self.knows(now, addr) {
            return;
        }
        if let Some(peer) = self.peers.get_mut(&addr) {
            peer.asked = true;
            if peer.state == State::Idle {
                peer.dial_at = Some(now);
            }
        }
    }

    /// A connection was accepted whose first bytes are a seed 003 welcome.
    pub fn accepted(&mut self, now: Instant, conn: ConnId, remote: SocketAddr) {
        if self.conns.len() >= self.config.max_conns {
            self.actions.push_back(PexAction::Close { conn });
            return;
        }
        self.conns.insert(
            conn,
            Conn {
                remote,
                peer: None,
                role: Role::Accepted,
                opened: now,
            },
        );
    }

    /// Our dial of `addr` connected as `conn`.
    pub fn dialed(&mut self, now: Instant, conn: ConnId, addr: SocketAddr) {
        let Some(purpose) = self.dials.remove(&addr) else {
            self.actions.push_back(PexAction::Close { conn });
            return;
        };
        if !self.peers.contains_key(&addr) {
            self.actions.push_back(PexAction::Close { conn });
            return;
        }
        let role = if purpose == Purpose::Refresh {
            Role::Refresh
        } else {
            Role::Ours
        };
        self.conns.insert(
            conn,
            Conn {
                remote: addr,
                peer: Some(addr),
                role,
                opened: now,
            },
        );
        let known = known_hosts(&self.peers, addr);
        let loopback = purpose == Purpose::DialBack;
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        match purpose {
            Purpose::Link => {
                peer.out_conn = Some(conn);
                peer.state = State::AwaitingDialBack;
                peer.deadline = Some(now + self.config.dial_back_wait);
            }
            Purpose::DialBack => {
                peer.out_conn = Some(conn);
            }
            Purpose::Refresh => {
                peer.refresh_conns.push(conn);
                peer.deadline = Some(now + self.config.dial_back_wait);
            }
        }
        let bytes = Welcome::write(self.config.port, loopback, &known);
        self.actions.push_back(PexAction::Write { conn, bytes });
        if purpose == Purpose::DialBack {
            self.link_up(now, addr);
        }
    }

    /// Our dial of `addr` failed.
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, error: &str) {
        match self.dials.remove(&addr) {
            Some(Purpose::Link) => self.failed(now, addr, error),
            // It dialed us: we write on its own connection instead.
            Some(Purpose::DialBack) => self.link_up(now, addr),
            Some(Purpose::Refresh) | None => {}
        }
    }

    /// An object arrived on `conn`.
    pub fn object(&mut self, now: Instant, conn: ConnId, value: &Value) {
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        let (remote, role, peer) = (state.remote, state.role, state.peer);
        match role {
            Role::Accepted => self.welcome(now, conn, remote, value),
            Role::Theirs => {
                let (Some(peer), Some(line)) = (peer, ChatLine::read(value)) else {
                    return;
                };
                let Some(state) = self.peers.get_mut(&peer) else {
                    return;
                };
                match state.state {
                    State::Linked => self.line_from(peer, &line.text),
                    // Typed before our dial back connected: passed on once it has.
                    State::DialingBack | State::AwaitingDialBack
                        if state.early.len() < MAX_EARLY_LINES =>
                    {
                        state.early.push(line.text);
                    }
                    _ => {}
                }
            }
            // The seed's peers write nothing on connections they did not open.
            Role::Ours | Role::Refresh => {}
        }
    }

    /// The connection `conn` closed.
    pub fn closed(&mut self, now: Instant, conn: ConnId) {
        let Some(state) = self.conns.remove(&conn) else {
            return;
        };
        let Some(addr) = state.peer else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        peer.refresh_conns.retain(|c| *c != conn);
        if peer.out_conn == Some(conn) {
            peer.out_conn = None;
            if peer.state == State::AwaitingDialBack {
                self.failed(now, addr, "closed before it dialed back");
                return;
            }
        }
        if peer.in_conn == Some(conn) {
            peer.in_conn = None;
            self.down(now, addr, "closed by peer", true);
        } else if peer.state == State::Linked && peer.out_conn.is_none() && peer.in_conn.is_none() {
            self.down(now, addr, "closed by peer", true);
        }
    }

    /// The overlay wrote `line` to the Node peer `addr`'s link.
    pub fn overlay_line(&mut self, now: Instant, addr: SocketAddr, line: &[u8]) {
        let Ok(message) = Message::parse(line) else {
            return;
        };
        let own = peer_id_of(addr, &self.config.namespace);
        match message {
            Message::Ping(ping) => {
                let pong = Message::Pong(Ping { ttl: 1, ..ping });
                self.line_to_overlay(addr, &pong);
            }
            Message::Pub(data) => {
                let Some(text) = data.payload.as_str() else {
                    return;
                };
                let ours = data.dst == "*"
                    || data.dst.strip_prefix('#') == Some(self.config.namespace.as_str());
                if !ours || data.src == own || self.had_directly(&data.src, addr) {
                    return;
                }
                self.enqueue(now, addr, format!("[{}] {text}", data.src));
            }
            Message::Send(data) => {
                if data.dst != own {
                    return;
                }
                let text = data
                    .payload
                    .as_str()
                    .map_or_else(|| data.payload.to_string(), str::to_owned);
                self.enqueue(now, addr, format!("[{} → you] {text}", data.src));
                let ack = Message::Ack(Ack {
                    msg_id: data.msg_id,
                    src: None,
                    dst: None,
                    from: None,
                    timestamp: None,
                    ttl: teia_wire::peer::DEFAULT_TTL,
                    auth: None,
                });
                self.line_to_overlay(addr, &ack);
            }
            _ => {}
        }
    }

    /// The overlay closed the Node peer `addr`'s link (a refusal, a BYE, a ping timeout).
    pub fn overlay_closed(&mut self, now: Instant, addr: SocketAddr) {
        self.down(now, addr, "", false);
    }

    /// A view from the teia node `from` (authenticated by the overlay), whose address is
    /// `from_ip` when it is a neighbour: the view's loopback addresses are its machine's, so
    /// they are read as `from_ip` (and left out when it is not known); the Node peers it names
    /// are dialed only when they are near it (see [`nearby`]).
    pub fn view(&mut self, now: Instant, from: &str, from_ip: Option<IpAddr>, payload: &Value) {
        if from == self.config.peer_id {
            return;
        }
        if !self.views.contains_key(from) && self.views.len() >= MAX_VIEWS {
            return;
        }
        let mut homed = HashMap::new();
        for entry in payload
            .get("homed")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(self.config.max_peers)
        {
            let Some(addr) = entry.get("addr").and_then(Value::as_str) else {
                continue;
            };
            let Some(addr) = addr
                .parse::<SocketAddr>()
                .ok()
                .and_then(|a| in_our_frame(a, from_ip))
            else {
                continue;
            };
            let adjacent: Vec<SocketAddr> = entry
                .get("adjacent")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .take(MAX_ADJACENT)
                .filter_map(|a| in_our_frame(a.as_str()?.parse().ok()?, from_ip))
                .collect();
            homed.insert(addr, adjacent);
        }
        let addrs: Vec<SocketAddr> = homed.keys().copied().collect();
        let learnt: Vec<SocketAddr> = match from_ip {
            Some(ip) => homed
                .values()
                .flatten()
                .copied()
                .filter(|a| nearby(a.ip(), ip))
                .collect(),
            None => Vec::new(),
        };
        if self.views.get(from).is_none_or(|old| old.homed != homed) {
            let mut listed: Vec<(SocketAddr, Vec<SocketAddr>)> = homed
                .iter()
                .map(|(addr, adjacent)| {
                    let mut adjacent = adjacent.clone();
                    adjacent.sort();
                    (*addr, adjacent)
                })
                .collect();
            listed.sort();
            self.event(PexEvent::View {
                from: from.to_owned(),
                homed: listed,
            });
        }
        self.views.insert(
            from.to_owned(),
            View {
                homed,
                expires: now + self.config.view_expiry,
            },
        );
        for addr in addrs {
            self.knows(now, addr);
            let linked_here = self.peers.get(&addr).map(|p| p.state) == Some(State::Linked);
            if linked_here && from < self.config.peer_id.as_str() {
                // Two homes: the smaller peer id keeps it.
                self.decline(now, addr, from.to_owned());
            }
        }
        // Every node that hears the view learns them: they take turns, as for adoption.
        let turn = self.turn();
        for addr in learnt {
            self.learn(now, addr, turn);
        }
    }

    /// A teia node linked with us: it hears our view soon (it may be about to link a Node
    /// peer we are home to).
    pub fn teia_linked(&mut self, now: Instant) {
        if !self.homed().is_empty() {
            self.view_changed(now);
        }
    }

    /// The teia node `peer_id` is gone (its link is down): its view no longer counts.
    pub fn teia_gone(&mut self, now: Instant, peer_id: &str) {
        if let Some(view) = self.views.remove(peer_id) {
            self.adopt(now, view.homed.keys().copied().collect());
        }
    }

    /// When [`Pex::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().flat_map(|p| {
            let write = (!p.queue.is_empty()).then_some(p.next_write);
            [write, p.refresh_at, p.dial_at, p.deadline]
        });
        let views = self.views.values().map(|v| Some(v.expires));
        let welcomes = self
            .conns
            .values()
            .filter(|c| c.role == Role::Accepted)
            .map(|c| Some(c.opened + WELCOME_WAIT));
        peers
            .chain(views)
            .chain(welcomes)
            .chain([self.view_due])
            .flatten()
            .min()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<(ConnId, SocketAddr)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.role == Role::Accepted && c.opened + WELCOME_WAIT <= now)
            .map(|(id, c)| (*id, c.remote))
            .collect();
        for (conn, addr) in silent {
            self.refuse(conn, addr, "no whole welcome within 5 s");
        }
        let expired: Vec<String> = self
            .views
            .iter()
            .filter(|(_, v)| v.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for from in expired {
            self.teia_gone(now, &from);
        }
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        for addr in addrs {
            self.flush(now, addr);
            let Some(peer) = self.peers.get_mut(&addr) else {
                continue;
            };
            if peer.deadline.is_some_and(|d| d <= now) {
                peer.deadline = None;
                if peer.state == State::AwaitingDialBack {
                    self.failed(now, addr, "it did not dial back");
                    continue;
                }
                let stale = std::mem::take(&mut peer.refresh_conns);
                self.close_all(stale);
            }
            let Some(peer) = self.peers.get_mut(&addr) else {
                continue;
            };
            if peer.refresh_at.is_some_and(|at| at <= now) {
                peer.refresh_at = None;
                if peer.state == State::Linked && !self.dials.contains_key(&addr) {
                    self.dials.insert(addr, Purpose::Refresh);
                    self.actions.push_back(PexAction::Dial { addr });
                }
            }
            let Some(peer) = self.peers.get_mut(&addr) else {
                continue;
            };
            if peer.dial_at.is_some_and(|at| at <= now) {
                peer.dial_at = None;
                if peer.state == State::Idle && !self.dials.contains_key(&addr) {
                    if let Some(home) = self.home_elsewhere(addr) {
                        let home = home.to_owned();
                        self.event(PexEvent::Declined { peer: addr, home });
                    } else {
                        if let Some(peer) = self.peers.get_mut(&addr) {
                            peer.state = State::Dialing;
                        }
                        self.dials.insert(addr, Purpose::Link);
                        self.actions.push_back(PexAction::Dial { addr });
                    }
                }
            }
        }
        if self.view_due.is_some_and(|at| at <= now) {
            self.publish(now);
        }
    }

    /// The Node peers this node is home to.
    pub fn homed(&self) -> Vec<SocketAddr> {
        let mut homed: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.state == State::Linked)
            .map(|(a, _)| *a)
            .collect();
        homed.sort();
        homed
    }

    fn welcome(&mut self, now: Instant, conn: ConnId, remote: SocketAddr, value: &Value) {
        let welcome = match Welcome::read(value) {
            Ok(welcome) => welcome,
            Err(_) => {
                self.refuse(conn, remote, "its first object is not a usable welcome");
                return;
            }
        };
        if welcome.teia {
            self.refuse(
                conn,
                remote,
                "a teia node speaking the peer-exchange wire (teia nodes link with their own handshake)",
            );
            return;
        }
        let addr = SocketAddr::new(remote.ip().to_canonical(), welcome.my_port);
        if !self.knows(now, addr) {
            self.refuse(conn, remote, "too many peer-exchange peers known");
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.peer = Some(addr);
        }
        self.learn_hosts(now, addr, &welcome.known_hosts);
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if welcome.loopback {
            // The answer to a dial of ours.
            if peer.refresh_conns.len() == 1 && peer.state == State::Linked {
                peer.refresh_conns.push(conn);
                peer.deadline = None;
                let done = std::mem::take(&mut peer.refresh_conns);
                self.close_all(done);
                self.view_changed(now);
                return;
            }
            if peer.state != State::AwaitingDialBack {
                self.close_all(vec![conn]);
                return;
            }
            peer.in_conn = Some(conn);
            peer.deadline = None;
            if let Some(c) = self.conns.get_mut(&conn) {
                c.role = Role::Theirs;
            }
            if let Some(home) = self.home_elsewhere(addr).map(str::to_owned) {
                self.decline(now, addr, home);
                return;
            }
            self.link_up(now, addr);
            return;
        }
        // It dialed us.
        if let Some(home) = self.home_elsewhere(addr).map(str::to_owned) {
            self.close_all(vec![conn]);
            self.event(PexEvent::Declined { peer: addr, home });
            return;
        }
        if self
            .peers
            .get(&addr)
            .is_some_and(|p| p.state != State::Idle)
        {
            // It dialed again (restarted): start over with this connection.
            self.down(now, addr, "it dialed again", true);
        }
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        peer.in_conn = Some(conn);
        peer.state = State::DialingBack;
        peer.dial_at = None;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.role = Role::Theirs;
        }
        self.dials.insert(addr, Purpose::DialBack);
        self.actions.push_back(PexAction::Dial { addr });
    }

    fn link_up(&mut self, now: Instant, addr: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if peer.state == State::Linked {
            return;
        }
        peer.state = State::Linked;
        peer.linked_at = Some(now);
        peer.deadline = None;
        peer.refresh_at = Some(now + self.config.refresh_after);
        // Our welcome may just have been written on the connection the lines go to.
        peer.next_write = now + self.config.gap;
        self.actions.push_back(PexAction::LinkUp { peer: addr });
        let hello = Message::Hello(self.hello(addr));
        self.line_to_overlay(addr, &hello);
        let early = self
            .peers
            .get_mut(&addr)
            .map(|p| std::mem::take(&mut p.early))
            .unwrap_or_default();
        for text in early {
            self.line_from(addr, &text);
        }
        self.view_changed(now);
    }

    /// What a Node peer says in the overlay's handshake, were it a course peer.
    fn hello(&self, addr: SocketAddr) -> Hello {
        Hello {
            peer_id: peer_id_of(addr, &self.config.namespace),
            version: VERSION.to_owned(),
            features: vec!["ack".to_owned()],
            listen_port: None,
            agent: Some("seed003".to_owned()),
            noise: None,
            ttl: 1,
        }
    }

    /// The link with `addr` is over; `tell` says whether the overlay must hear it.
    fn down(&mut self, now: Instant, addr: SocketAddr, reason: &str, tell: bool) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        let was = peer.state;
        let mut conns: Vec<ConnId> = peer.out_conn.take().into_iter().collect();
        conns.extend(peer.in_conn.take());
        conns.append(&mut peer.refresh_conns);
        peer.state = State::Idle;
        peer.queue.clear();
        peer.early.clear();
        peer.queued_bytes = 0;
        peer.refresh_at = None;
        peer.deadline = None;
        // A link that did not last counts as a failure: redials of a peer whose links keep
        // dropping back off.
        match peer.linked_at.take() {
            Some(at) if now.saturating_duration_since(at) >= STEADY => peer.failures = 0,
            Some(_) => peer.failures += 1,
            None => {}
        }
        if peer.asked {
            peer.dial_at = Some(now + backoff(peer.failures, self.config.retry_max));
        }
        self.dials.remove(&addr);
        self.close_all(conns);
        if was == State::Linked {
            if tell {
                self.actions.push_back(PexAction::LinkDown {
                    peer: addr,
                    reason: reason.to_owned(),
                });
            }
            self.view_changed(now);
        }
    }

    fn decline(&mut self, now: Instant, addr: SocketAddr, home: String) {
        self.down(now, addr, "another teia node is its home", true);
        if let Some(peer) = self.peers.get_mut(&addr) {
            peer.dial_at = None;
        }
        self.event(PexEvent::Declined { peer: addr, home });
    }

    fn failed(&mut self, now: Instant, addr: SocketAddr, error: &str) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        peer.failures += 1;
        let asked = peer.asked;
        let retry_in = if asked || peer.failures < self.config.learned_attempts {
            Some(backoff(peer.failures, self.config.retry_max))
        } else {
            None
        };
        let mut conns: Vec<ConnId> = peer.out_conn.take().into_iter().collect();
        conns.extend(peer.in_conn.take());
        peer.state = State::Idle;
        peer.early.clear();
        peer.deadline = None;
        peer.dial_at = retry_in.map(|d| now + d);
        self.close_all(conns);
        self.event(PexEvent::DialFailed {
            peer: addr,
            error: error.to_owned(),
            retry_in,
            asked,
        });
    }

    fn refuse(&mut self, conn: ConnId, addr: SocketAddr, why: &'static str) {
        self.close_all(vec![conn]);
        self.event(PexEvent::Refused { addr, why });
    }

    fn close_all(&mut self, conns: Vec<ConnId>) {
        for conn in conns {
            self.conns.remove(&conn);
            self.actions.push_back(PexAction::Close { conn });
        }
    }

    fn event(&mut self, event: PexEvent) {
        self.actions.push_back(PexAction::Event(event));
    }

    /// Makes sure `addr` is known; false when it is not and there is no room (a full table
    /// first forgets a Node peer that is neither linked, nor asked for, nor about to be
    /// dialed).
    fn knows(&mut self, now: Instant, addr: SocketAddr) -> bool {
        if self.peers.contains_key(&addr) {
            return true;
        }
        if self.peers.len() >= self.config.max_peers {
            let idle = self
                .peers
                .iter()
                .find(|(a, p)| {
                    p.state == State::Idle
                        && !p.asked
                        && p.dial_at.is_none()
                        && !self.dials.contains_key(a)
                })
                .map(|(a, _)| *a);
            match idle {
                Some(forgotten) => {
                    self.peers.remove(&forgotten);
                }
                None => return false,
            }
        }
        self.peers.insert(addr, Peer::new(now));
        true
    }

    /// A Node peer heard of: dialed if no teia node is its home and it is not linked.
    fn learn(&mut self, now: Instant, addr: SocketAddr, turn: Duration) {
        let fresh = !self.peers.contains_key(&addr);
        if !fresh || !self.knows(now, addr) {
            return;
        }
        if self.home_elsewhere(addr).is_none() {
            if let Some(peer) = self.peers.get_mut(&addr) {
                peer.dial_at = Some(now + self.config.learn_delay + turn);
            }
        }
    }

    fn learn_hosts(&mut self, now: Instant, addr: SocketAddr, hosts: &[KnownHost]) {
        // Its loopback hosts are on its machine.
        let adjacent: BTreeSet<SocketAddr> = hosts
            .iter()
            .filter(|h| !h.teia)
            .filter_map(|h| in_our_frame(h.addr, Some(addr.ip())))
            .filter(|h| *h != addr && nearby(h.ip(), addr.ip()))
            .take(MAX_ADJACENT)
            .collect();
        for host in &adjacent {
            self.learn(now, *host, Duration::ZERO);
        }
        if let Some(peer) = self.peers.get_mut(&addr) {
            if peer.adjacent != adjacent {
                peer.adjacent = adjacent;
                self.view_changed(now);
            }
        }
    }

    /// The teia node that is home to `addr`, when it is not us.
    fn home_elsewhere(&self, addr: SocketAddr) -> Option<&str> {
        self.views
            .iter()
            .filter(|(_, v)| v.homed.contains_key(&addr))
            .map(|(from, _)| from.as_str())
            .min()
    }

    /// Whether the Node peer `to` had the line of `src` from it directly.
    fn had_directly(&self, src: &str, to: SocketAddr) -> bool {
        let Some(from) = addr_of(src) else {
            return false;
        };
        let knows = |a: SocketAddr, b: SocketAddr| {
            self.peers.get(&a).is_some_and(|p| p.adjacent.contains(&b))
                || self
                    .views
                    .values()
                    .any(|v| v.homed.get(&a).is_some_and(|l| l.contains(&b)))
        };
        knows(from, to) || knows(to, from)
    }

    /// This node's turn among the teia nodes with views, as a delay: the node whose peer id
    /// sorts first goes first, each next one [`PexConfig::adopt_step`] later.
    fn turn(&self) -> Duration {
        let rank = self
            .views
            .keys()
            .filter(|k| k.as_str() < self.config.peer_id.as_str())
            .count();
        self.config.adopt_step * u32::try_from(rank).unwrap_or(u32::MAX)
    }

    fn adopt(&mut self, now: Instant, orphans: Vec<SocketAddr>) {
        let wait = self.config.adopt_step / 4 + self.turn();
        for addr in orphans {
            if !self.knows(now, addr) {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(&addr) {
                if peer.state == State::Idle {
                    peer.failures = 0;
                    peer.dial_at = Some(now + wait);
                }
            }
        }
    }

    fn line_from(&mut self, addr: SocketAddr, text: &str) {
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return;
        }
        self.next_id += 1;
        let line = json!({
            "type": "PUB",
            "msg_id": format!("pex-{:x}-{}", self.config.seed, self.next_id),
            "src": peer_id_of(addr, &self.config.namespace),
            "dst": format!("#{}", self.config.namespace),
            "payload": text,
            "require_ack": false,
            "ttl": teia_wire::peer::DEFAULT_TTL,
        });
        if let Ok(line) = serde_json::to_vec(&line) {
            self.actions
                .push_back(PexAction::LinkLine { peer: addr, line });
        }
    }

    fn line_to_overlay(&mut self, addr: SocketAddr, message: &Message) {
        if let Ok(mut line) = message.to_line() {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            self.actions
                .push_back(PexAction::LinkLine { peer: addr, line });
        }
    }

    fn enqueue(&mut self, now: Instant, addr: SocketAddr, text: String) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if peer.state != State::Linked {
            return;
        }
        if peer.queued_bytes + text.len() > self.config.queue_bytes {
            let bytes = text.len();
            self.event(PexEvent::Dropped { peer: addr, bytes });
            return;
        }
        peer.queued_bytes += text.len();
        peer.queue.push_back(text);
        self.flush(now, addr);
    }

    /// Writes what is waiting for `addr` as one `message`, if its gap has passed.
    fn flush(&mut self, now: Instant, addr: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if peer.queue.is_empty() || peer.next_write > now {
            return;
        }
        let Some(conn) = peer.out_conn.or(peer.in_conn) else {
            return;
        };
        let (port, max) = (self.config.port, self.config.max_object);
        let fits = |text: &str| ChatLine::write(&format!("{text}\n"), port).len() <= max;
        let mut text = String::new();
        while let Some(next) = peer.queue.front_mut() {
            let candidate = if text.is_empty() {
                next.clone()
            } else {
                format!("{text}\n{next}")
            };
            if fits(&candidate) {
                peer.queued_bytes = peer.queued_bytes.saturating_sub(next.len());
                peer.queue.pop_front();
                text = candidate;
                continue;
            }
            if text.is_empty() {
                // A line too long for one object: its longest head that fits goes now, the
                // rest waits its turn.
                let cuts: Vec<usize> = next.char_indices().map(|(i, _)| i).skip(1).collect();
                let fitting = cuts.partition_point(|&cut| fits(next.get(..cut).unwrap_or("")));
                let cut = fitting
                    .checked_sub(1)
                    .and_then(|i| cuts.get(i))
                    .copied()
                    .unwrap_or_else(|| cuts.first().copied().unwrap_or(next.len()));
                let rest = next.split_off(cut);
                peer.queued_bytes = peer.queued_bytes.saturating_sub(next.len());
                text = std::mem::replace(next, rest);
            }
            break;
        }
        peer.next_write = now + self.config.gap;
        let bytes = ChatLine::write(&format!("{text}\n"), port);
        self.actions.push_back(PexAction::Write { conn, bytes });
    }

    fn view_changed(&mut self, now: Instant) {
        let soon = now + Duration::from_millis(200);
        if self.view_due.is_none_or(|at| at > soon) {
            self.view_due = Some(soon);
        }
    }

    fn publish(&mut self, now: Instant) {
        let homed: Vec<Value> = self
            .homed()
            .into_iter()
            .map(|addr| {
                let adjacent: Vec<String> = self
                    .peers
                    .get(&addr)
                    .map(|p| p.adjacent.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                json!({"addr": addr.to_string(), "adjacent": adjacent})
            })
            .collect();
        if homed.is_empty() && !self.retract {
            self.view_due = None;
            return;
        }
        self.retract = !homed.is_empty();
        self.view_due = self.retract.then(|| now + self.config.view_interval);
        self.actions.push_back(PexAction::Publish {
            payload: json!({"svc": VIEW_SERVICE, "homed": homed}),
        });
    }
}

/// The known hosts a welcome to `to` lists: the other Node peers this node is home to.
fn known_hosts(peers: &HashMap<SocketAddr, Peer>, to: SocketAddr) -> Vec<SocketAddr> {
    let mut hosts: Vec<SocketAddr> = peers
        .iter()
        .filter(|(a, p)| **a != to && p.state == State::Linked)
        .map(|(a, _)| *a)
        .take(MAX_ADJACENT)
        .collect();
    hosts.sort();
    hosts
}

/// `addr` as said by a program at `teller` (a Node peer, or a teia node's view) in this
/// node's frame: a loopback address is the teller's machine, so it is read as the teller's
/// address; `None` when that is not known.
fn in_our_frame(addr: SocketAddr, teller: Option<IpAddr>) -> Option<SocketAddr> {
    let addr = canonical(addr);
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        return Some(SocketAddr::new(teller?, addr.port()));
    }
    Some(addr)
}

/// Whether a host named by a program at `told_by` may be dialed: on its machine, or on a
/// loopback or private network (nobody can make teia nodes dial the internet).
fn nearby(host: IpAddr, told_by: IpAddr) -> bool {
    host == told_by
        || host.is_loopback()
        || match host {
            IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local(),
        }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// 1 s after the first failure, doubling, at most `max`.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    (Duration::from_secs(1) * (1u32 << exp)).min(max)
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> (Pex, Instant) {
        (
            Pex::new(PexConfig::new("t1@UnB", "UnB", 7070, 1)),
            Instant::now(),
        )
    }

    fn actions(pex: &mut Pex) -> Vec<PexAction> {
        std::iter::from_fn(|| pex.poll_action()).collect()
    }

    /// A Node peer at 3001 dials in and gets linked (its dial back connected as conn 2).
    fn linked(pex: &mut Pex, now: Instant) -> SocketAddr {
        let remote: SocketAddr = "[::ffff:127.0.0.1]:50000".parse().unwrap();
        pex.accepted(now, 1, remote);
        let welcome =
            json!({"type": "welcome", "myPort": "3001", "loopback": false, "knownHosts": []});
        pex.object(now, 1, &welcome);
        let addr: SocketAddr = "127.0.0.1:3001".parse().unwrap();
        assert!(actions(pex).contains(&PexAction::Dial { addr }));
        pex.dialed(now, 2, addr);
        let done = actions(pex);
        assert!(done.contains(&PexAction::LinkUp { peer: addr }));
        addr
    }

    fn written(actions: &[PexAction]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                PexAction::Write { bytes, .. } => serde_json::from_slice(bytes).ok(),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_peers_line_becomes_a_pub_from_it() {
        let (mut pex, now) = machine();
        let addr = linked(&mut pex, now);
        let line = json!({"type": "message", "message": "oi\n", "myPort": "3001"});
        pex.object(now, 1, &line);
        let lines: Vec<Message> = actions(&mut pex)
            .into_iter()
            .filter_map(|a| match a {
                PexAction::LinkLine { peer, line } if peer == addr => Message::parse(&line).ok(),
                _ => None,
            })
            .collect();
        let [Message::Pub(data)] = lines.as_slice() else {
            panic!("not one PUB: {lines:?}");
        };
        assert_eq!(
            (data.src.as_str(), data.dst.as_str()),
            ("127.0.0.1:3001@UnB", "#UnB")
        );
        assert_eq!(data.payload, json!("oi"));
    }

    #[test]
    fn a_line_typed_before_the_dial_back_is_passed_on_after_the_hello() {
        let (mut pex, now) = machine();
        let remote: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        pex.accepted(now, 1, remote);
        let welcome = json!({"type": "welcome", "myPort": "3001", "loopback": false});
        pex.object(now, 1, &welcome);
        pex.object(now, 1, &json!({"type": "message", "message": "cedo\n"}));
        let addr: SocketAddr = "127.0.0.1:3001".parse().unwrap();
        actions(&mut pex);
        pex.dialed(now, 2, addr);
        let lines: Vec<Message> = actions(&mut pex)
            .into_iter()
            .filter_map(|a| match a {
                PexAction::LinkLine { line, .. } => Message::parse(&line).ok(),
                _ => None,
            })
            .collect();
        assert!(
            matches!(lines.as_slice(), [Message::Hello(_), Message::Pub(data)]
            if data.payload == json!("cedo"))
        );
    }

    #[test]
    fn lines_to_a_node_peer_wait_their_gap_and_go_as_one_object() {
        let (mut pex, now) = machine();
        let addr = linked(&mut pex, now);
        for (i, text) in ["one", "two", "three"].iter().enumerate() {
            let line = json!({
                "type": "PUB", "msg_id": format!("m{i}"), "src": "bob@UnB", "dst": "*",
                "payload": text, "require_ack": false, "ttl": 8,
            });
            pex.overlay_line(now, addr, &serde_json::to_vec(&line).unwrap());
        }
        assert!(
            written(&actions(&mut pex)).is_empty(),
            "the welcome's gap first"
        );
        let later = now + Duration::from_millis(100);
        pex.handle_timeout(later);
        let objects = written(&actions(&mut pex));
        assert_eq!(objects.len(), 1);
        assert_eq!(
            objects[0]["message"],
            json!("[bob@UnB] one\n[bob@UnB] two\n[bob@UnB] three\n")
        );
        assert_eq!(objects[0]["myPort"], json!("7070"));
    }

    #[test]
    fn a_send_to_a_node_peer_is_shown_and_acknowledged() {
        let (mut pex, now) = machine();
        let addr = linked(&mut pex, now);
        let send = json!({
            "type": "SEND", "msg_id": "s1", "src": "bob@UnB", "dst": "127.0.0.1:3001@UnB",
            "payload": "só pra você", "require_ack": true, "ttl": 8,
        });
        pex.overlay_line(now, addr, &serde_json::to_vec(&send).unwrap());
        let acked = actions(&mut pex).into_iter().any(|a| {
            matches!(a, PexAction::LinkLine { line, .. }
                if matches!(Message::parse(&line), Ok(Message::Ack(ack)) if ack.msg_id == "s1"))
        });
        assert!(acked);
        pex.handle_timeout(now + Duration::from_millis(100));
        let objects = written(&actions(&mut pex));
        assert_eq!(
            objects[0]["message"],
            json!("[bob@UnB → you] só pra você\n")
        );
    }

    #[test]
    fn what_is_not_a_node_peer_is_closed() {
        let (mut pex, now) = machine();
        let remote: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        for (conn, first) in [
            (
                1,
                json!({"type": "welcome", "myPort": 7071, "loopback": false, "knownHosts": []}),
            ),
            (2, json!({"type": "welcome", "myPort": "0"})),
            (3, json!({"type": "message", "message": "oi"})),
        ] {
            pex.accepted(now, conn, remote);
            pex.object(now, conn, &first);
            let done = actions(&mut pex);
            assert!(done.contains(&PexAction::Close { conn }), "{first}");
            assert!(!done.iter().any(|a| matches!(a, PexAction::Dial { .. })));
        }
    }

    #[test]
    fn a_full_table_forgets_idle_node_peers_for_new_ones() {
        let (mut pex, now) = machine();
        pex.config.max_peers = 2;
        for (conn, port) in [(1, "3001"), (2, "3002"), (3, "3003")] {
            let remote: SocketAddr = "127.0.0.1:50000".parse().unwrap();
            pex.accepted(now, conn, remote);
            let welcome = json!({"type": "welcome", "myPort": port, "loopback": false});
            pex.object(now, conn, &welcome);
            let dialed = actions(&mut pex)
                .iter()
                .any(|a| matches!(a, PexAction::Dial { addr } if addr.port().to_string() == port));
            assert!(dialed, "{port} taken");
            // It goes away before the dial back: idle, forgettable.
            pex.closed(now, conn);
            pex.dial_failed(now, format!("127.0.0.1:{port}").parse().unwrap(), "refused");
            actions(&mut pex);
        }
        assert!(pex.peers.len() <= 2);
    }

    #[test]
    fn a_node_peer_that_stops_reading_loses_lines_not_the_node() {
        let (mut pex, now) = machine();
        let addr = linked(&mut pex, now);
        let big = "x".repeat(10_000);
        let mut dropped = 0;
        for i in 0..10 {
            let line = json!({
                "type": "PUB", "msg_id": format!("m{i}"), "src": "bob@UnB", "dst": "*",
                "payload": big, "require_ack": false, "ttl": 8,
            });
            pex.overlay_line(now, addr, &serde_json::to_vec(&line).unwrap());
            dropped += actions(&mut pex)
                .iter()
                .filter(|a| matches!(a, PexAction::Event(PexEvent::Dropped { .. })))
                .count();
        }
        assert_eq!(
            dropped, 4,
            "64 KiB hold six lines of 10,000 bytes and their origin"
        );
        pex.handle_timeout(now + Duration::from_millis(100));
        let objects = written(&actions(&mut pex));
        assert_eq!(objects.len(), 1);
    }

    #[test]
    fn a_long_line_goes_in_pieces_that_each_fit_one_segment() {
        let (mut pex, now) = machine();
        let addr = linked(&mut pex, now);
        // Control characters take six bytes each in JSON.
        let text: String = "ação\u{1}".repeat(500);
        let line = json!({
            "type": "PUB", "msg_id": "long", "src": "bob@UnB", "dst": "*",
            "payload": text, "require_ack": false, "ttl": 8,
        });
        pex.overlay_line(now, addr, &serde_json::to_vec(&line).unwrap());
        let mut at = now;
        let mut got = String::new();
        for _ in 0..100 {
            at += Duration::from_millis(100);
            pex.handle_timeout(at);
            for action in actions(&mut pex) {
                if let PexAction::Write { bytes, .. } = action {
                    assert!(bytes.len() <= 1_200, "{} bytes in one object", bytes.len());
                    let value: Value = serde_json::from_slice(&bytes).unwrap();
                    let piece = value["message"].as_str().unwrap();
                    got.push_str(piece.strip_suffix('\n').unwrap());
                }
            }
        }
        assert_eq!(got, format!("[bob@UnB] {text}"));
    }
}
