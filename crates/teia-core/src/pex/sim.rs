//! A seeded simulation of a mixed network: teia nodes (each a [`Pex`] machine, their overlay
//! reduced to what it does for Node peers: flooding PUBs once to every node and every Node
//! peer's link, and carrying views) and seed 003 peers written after the seed's `Peer.js`
//! (two connections per pair, a dial back for every welcome that is not one, no relay, no
//! deduplication, hosts lists never dialed). Connections deliver in order with random delays;
//! time is simulated.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::rng::SplitMix64;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Hub { hub: usize, conn: ConnId },
    Seed { peer: usize },
}

#[derive(Debug)]
struct Wire {
    /// The dialer.
    a: Side,
    b: Side,
    /// Each side has stopped writing.
    ended: [bool; 2],
    /// Last arrival time, per direction (to a, to b): deliveries stay in order.
    last: [Instant; 2],
}

#[derive(Debug)]
enum Ev {
    Object {
        wire: usize,
        to_a: bool,
        value: Value,
    },
    Fin {
        wire: usize,
        to_a: bool,
    },
    Dialed {
        hub: usize,
        conn: ConnId,
        addr: SocketAddr,
    },
    DialFailed {
        hub: usize,
        addr: SocketAddr,
    },
    Timer {
        hub: usize,
    },
    LinkLine {
        hub: usize,
        peer: SocketAddr,
        line: Vec<u8>,
    },
    View {
        hub: usize,
        from: String,
        payload: Value,
    },
    Gone {
        hub: usize,
        from: String,
    },
}

struct Hub {
    pex: Pex,
    id: String,
    port: u16,
    alive: bool,
    /// Node peers linked through this hub (their overlay links).
    links: HashSet<SocketAddr>,
    /// PUB ids shown, per text.
    shown: HashMap<String, HashSet<String>>,
    /// Last write per connection, to check the pacing.
    last_write: HashMap<ConnId, Instant>,
    timer: Option<Instant>,
}

struct Seed {
    port: u16,
    alive: bool,
    /// Wires it dialed (the seed's `connections`).
    connections: Vec<usize>,
    known: Vec<Value>,
    /// Times each text was shown.
    shown: HashMap<String, usize>,
}

struct Sim {
    rng: SplitMix64,
    now: Instant,
    hubs: Vec<Hub>,
    seeds: Vec<Seed>,
    wires: Vec<Wire>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    next_conn: ConnId,
    next_msg: u64,
}

impl Sim {
    fn new(seed: u64, hubs: usize) -> Self {
        let now = Instant::now();
        let mut sim = Self {
            rng: SplitMix64::new(seed),
            now,
            hubs: Vec::new(),
            seeds: Vec::new(),
            wires: Vec::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            next_conn: 1,
            next_msg: 0,
        };
        for i in 0..hubs {
            let id = format!("t{i}@UnB");
            let port = 7000 + u16::try_from(i).unwrap_or(0);
            sim.hubs.push(Hub {
                pex: Pex::new(PexConfig::new(id.clone(), "UnB", port, seed + i as u64)),
                id,
                port,
                alive: true,
                links: HashSet::new(),
                shown: HashMap::new(),
                last_write: HashMap::new(),
                timer: None,
            });
        }
        sim
    }

    fn delay(&mut self) -> Duration {
        Duration::from_micros(100 + self.rng.below(8_000))
    }

    fn at(&mut self, when: Instant, event: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((when, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn run_for(&mut self, span: Duration) {
        let end = self.now + span;
        while let Some(Reverse((when, seq))) = self.queue.peek().copied() {
            if when > end {
                break;
            }
            self.queue.pop();
            self.now = self.now.max(when);
            if let Some(event) = self.events.remove(&seq) {
                self.handle(event);
            }
        }
        self.now = end;
    }

    fn handle(&mut self, event: Ev) {
        let now = self.now;
        match event {
            Ev::Object { wire, to_a, value } => match self.side(wire, to_a) {
                Side::Hub { hub, conn } => self.at_hub(hub, |pex| pex.object(now, conn, &value)),
                Side::Seed { peer } => self.seed_reads(peer, &value),
            },
            Ev::Fin { wire, to_a } => match self.side(wire, to_a) {
                Side::Hub { hub, conn } => self.at_hub(hub, |pex| pex.closed(now, conn)),
                // Node.js ends its side when the other side ended (allowHalfOpen false).
                Side::Seed { .. } => self.end(wire, to_a),
            },
            Ev::Dialed { hub, conn, addr } => self.at_hub(hub, |pex| pex.dialed(now, conn, addr)),
            Ev::DialFailed { hub, addr } => {
                self.at_hub(hub, |pex| pex.dial_failed(now, addr, "refused"));
            }
            Ev::Timer { hub } => {
                self.hubs[hub].timer = None;
                self.at_hub(hub, |pex| pex.handle_timeout(now));
            }
            Ev::LinkLine { hub, peer, line } => {
                if self.hubs[hub].links.contains(&peer) {
                    self.at_hub(hub, |pex| pex.overlay_line(now, peer, &line));
                }
            }
            Ev::View { hub, from, payload } => {
                self.at_hub(hub, |pex| pex.view(now, &from, Some(LOCALHOST), &payload));
            }
            Ev::Gone { hub, from } => self.at_hub(hub, |pex| pex.teia_gone(now, &from)),
        }
    }

    /// The end of `wire` that a delivery `to_a` reaches.
    fn side(&self, wire: usize, to_a: bool) -> Side {
        if to_a {
            self.wires[wire].a
        } else {
            self.wires[wire].b
        }
    }

    /// Hands a live hub an input, then carries out what it asks for.
    fn at_hub(&mut self, hub: usize, input: impl FnOnce(&mut Pex)) {
        if self.hubs[hub].alive {
            input(&mut self.hubs[hub].pex);
            self.drive(hub);
        }
    }

    /// Carries out a hub's actions.
    fn drive(&mut self, hub: usize) {
        let now = self.now;
        while let Some(action) = self.hubs[hub].pex.poll_action() {
            match action {
                PexAction::Dial { addr } => {
                    let target = self
                        .seeds
                        .iter()
                        .position(|s| s.alive && s.port == addr.port());
                    let when = now + self.delay();
                    match target {
                        Some(peer) => {
                            let conn = self.next_conn;
                            self.next_conn += 1;
                            self.wires.push(Wire {
                                a: Side::Hub { hub, conn },
                                b: Side::Seed { peer },
                                ended: [false; 2],
                                last: [when; 2],
                            });
                            self.at(when, Ev::Dialed { hub, conn, addr });
                        }
                        None => self.at(when, Ev::DialFailed { hub, addr }),
                    }
                }
                PexAction::Write { conn, bytes } => {
                    assert!(bytes.len() <= 1_200, "an object of {} bytes", bytes.len());
                    let value: Value = serde_json::from_slice(&bytes).unwrap();
                    if let Some(last) = self.hubs[hub].last_write.insert(conn, now) {
                        let gap = now.duration_since(last);
                        assert!(
                            gap >= Duration::from_millis(100),
                            "two objects {gap:?} apart on one connection (a Node peer crashes)"
                        );
                    }
                    if let Some(wire) = self.wire_of(hub, conn) {
                        let to_a = self.wires[wire].b == (Side::Hub { hub, conn });
                        self.send(wire, to_a, value);
                    }
                }
                PexAction::Close { conn } => {
                    if let Some(wire) = self.wire_of(hub, conn) {
                        let from_a = self.wires[wire].a == (Side::Hub { hub, conn });
                        self.end(wire, !from_a);
                    }
                }
                PexAction::LinkUp { peer } => {
                    self.hubs[hub].links.insert(peer);
                }
                PexAction::LinkLine { peer, line } => self.overlay(hub, peer, &line),
                PexAction::LinkDown { peer, .. } => {
                    self.hubs[hub].links.remove(&peer);
                }
                PexAction::Publish { payload } => {
                    let from = self.hubs[hub].id.clone();
                    for other in 0..self.hubs.len() {
                        if other != hub {
                            let when = now + self.delay();
                            let (from, payload) = (from.clone(), payload.clone());
                            self.at(
                                when,
                                Ev::View {
                                    hub: other,
                                    from,
                                    payload,
                                },
                            );
                        }
                    }
                }
                PexAction::Event(_) => {}
            }
        }
        if let Some(next) = self.hubs[hub].pex.poll_timeout() {
            let next = next.max(now);
            if self.hubs[hub].timer.is_none_or(|t| t > next) {
                self.hubs[hub].timer = Some(next);
                self.at(next, Ev::Timer { hub });
            }
        }
    }

    /// The overlay: a Node peer's line through its home.
    fn overlay(&mut self, hub: usize, peer: SocketAddr, line: &[u8]) {
        let Ok(Message::Pub(data)) = Message::parse(line) else {
            return;
        };
        self.flood(hub, Some(peer), &data.msg_id, line.to_vec());
    }

    /// Floods a PUB: every teia node shows it once, every Node peer's link gets it.
    fn flood(&mut self, hub: usize, from: Option<SocketAddr>, msg_id: &str, line: Vec<u8>) {
        let Ok(Message::Pub(data)) = Message::parse(&line) else {
            return;
        };
        let text = data.payload.as_str().unwrap_or_default().to_owned();
        for other in 0..self.hubs.len() {
            if !self.hubs[other].alive {
                continue;
            }
            if from.is_some() || other != hub {
                let shown = self.hubs[other].shown.entry(text.clone()).or_default();
                shown.insert(msg_id.to_owned());
            }
            let links: Vec<SocketAddr> = self.hubs[other].links.iter().copied().collect();
            for peer in links {
                if other == hub && Some(peer) == from {
                    continue;
                }
                let when = self.now + self.delay();
                let line = line.clone();
                self.at(
                    when,
                    Ev::LinkLine {
                        hub: other,
                        peer,
                        line,
                    },
                );
            }
        }
    }

    fn wire_of(&self, hub: usize, conn: ConnId) -> Option<usize> {
        let side = Side::Hub { hub, conn };
        self.wires.iter().position(|w| w.a == side || w.b == side)
    }

    fn send(&mut self, wire: usize, to_a: bool, value: Value) {
        let from = usize::from(to_a);
        if self.wires[wire].ended[from] {
            return;
        }
        let when = (self.now + self.delay()).max(self.wires[wire].last[usize::from(!to_a)]);
        self.wires[wire].last[usize::from(!to_a)] = when;
        self.at(when, Ev::Object { wire, to_a, value });
    }

    /// The side opposite `to_a` stops writing: a FIN reaches the other side.
    fn end(&mut self, wire: usize, to_a: bool) {
        let from = usize::from(to_a);
        if std::mem::replace(&mut self.wires[wire].ended[from], true) {
            return;
        }
        let when = (self.now + self.delay()).max(self.wires[wire].last[usize::from(!to_a)]);
        self.wires[wire].last[usize::from(!to_a)] = when;
        self.at(when, Ev::Fin { wire, to_a });
    }

    /// A seed peer starts, dialing `hosts` (ports).
    fn start_seed(&mut self, hosts: &[u16]) -> usize {
        let peer = self.seeds.len();
        self.seeds.push(Seed {
            port: 3000 + u16::try_from(peer).unwrap_or(0),
            alive: true,
            connections: Vec::new(),
            known: Vec::new(),
            shown: HashMap::new(),
        });
        for &port in hosts {
            self.seed_dials(peer, port, false);
        }
        peer
    }

    /// `connectTo`: a wire, the connection kept, a welcome written.
    fn seed_dials(&mut self, peer: usize, port: u16, loopback: bool) {
        let target = if let Some(hub) = self.hubs.iter().position(|h| h.alive && h.port == port) {
            let conn = self.next_conn;
            self.next_conn += 1;
            let remote = SocketAddr::new(LOCALHOST, 40_000 + u16::try_from(conn).unwrap_or(0));
            self.hubs[hub].pex.accepted(self.now, conn, remote);
            self.drive(hub);
            Side::Hub { hub, conn }
        } else if let Some(other) = self.seeds.iter().position(|s| s.alive && s.port == port) {
            Side::Seed { peer: other }
        } else {
            return;
        };
        let when = self.now;
        self.wires.push(Wire {
            a: Side::Seed { peer },
            b: target,
            ended: [false; 2],
            last: [when; 2],
        });
        let wire = self.wires.len() - 1;
        self.seeds[peer].connections.push(wire);
        let welcome = json!({
            "type": "welcome",
            "myPort": self.seeds[peer].port.to_string(),
            "loopback": loopback,
            "knownHosts": self.seeds[peer].known.clone(),
        });
        self.send(wire, false, welcome);
    }

    /// What the seed's `listenClientData` does with an object.
    fn seed_reads(&mut self, peer: usize, value: &Value) {
        if !self.seeds[peer].alive {
            return;
        }
        if value["type"] == "message" {
            let text = value["message"].as_str().unwrap_or_default().to_owned();
            for line in text.lines() {
                // A teia node's lines name their origin first: `[src] text`.
                let line = match line.strip_prefix('[') {
                    Some(rest) => rest.split_once("] ").map_or(line, |(_, text)| text),
                    None => line,
                };
                *self.seeds[peer].shown.entry(line.to_owned()).or_default() += 1;
            }
            return;
        }
        if value["type"] != "welcome" {
            return;
        }
        let my_port = &value["myPort"];
        self.seeds[peer]
            .known
            .push(json!({"host": "::ffff:127.0.0.1", "port": my_port}));
        if value["loopback"] != true {
            let port = teia_wire::fields::liberal_u64(my_port).unwrap_or(0);
            self.seed_dials(peer, u16::try_from(port).unwrap_or(0), true);
        }
    }

    /// The seed's `broadcastMessage` of a typed line.
    fn seed_types(&mut self, peer: usize, text: &str) {
        let port = self.seeds[peer].port.to_string();
        let value = json!({"type": "message", "message": format!("{text}\n"), "myPort": port});
        for wire in self.seeds[peer].connections.clone() {
            self.send(wire, false, value.clone());
        }
    }

    /// A teia node's user publishes to `#UnB`.
    fn hub_types(&mut self, hub: usize, text: &str) {
        self.next_msg += 1;
        let msg_id = format!("teia-{}", self.next_msg);
        let line = json!({
            "type": "PUB", "msg_id": msg_id, "src": self.hubs[hub].id, "dst": "#UnB",
            "payload": text, "require_ack": false, "ttl": 8,
        });
        self.flood(hub, None, &msg_id, serde_json::to_vec(&line).unwrap());
    }

    fn kill_hub(&mut self, hub: usize) {
        self.hubs[hub].alive = false;
        for wire in 0..self.wires.len() {
            for (side, to_a) in [(self.wires[wire].a, false), (self.wires[wire].b, true)] {
                if matches!(side, Side::Hub { hub: h, .. } if h == hub) {
                    self.end(wire, to_a);
                }
            }
        }
        let from = self.hubs[hub].id.clone();
        for other in 0..self.hubs.len() {
            if other != hub {
                let when = self.now + self.delay();
                self.at(
                    when,
                    Ev::Gone {
                        hub: other,
                        from: from.clone(),
                    },
                );
            }
        }
    }

    fn kill_seed(&mut self, peer: usize) {
        self.seeds[peer].alive = false;
        for wire in 0..self.wires.len() {
            for (side, to_a) in [(self.wires[wire].a, false), (self.wires[wire].b, true)] {
                if side == (Side::Seed { peer }) {
                    self.end(wire, to_a);
                }
            }
        }
    }

    fn seed_addr(&self, peer: usize) -> SocketAddr {
        SocketAddr::new(LOCALHOST, self.seeds[peer].port)
    }

    /// Seed peers directly linked (a wire between them that both still write on).
    fn adjacent(&self, x: usize, y: usize) -> bool {
        self.wires.iter().any(|w| {
            let pair = (w.a, w.b);
            (pair == (Side::Seed { peer: x }, Side::Seed { peer: y })
                || pair == (Side::Seed { peer: y }, Side::Seed { peer: x }))
                && !w.ended[0]
                && !w.ended[1]
        })
    }

    fn homes(&self, peer: usize) -> usize {
        let addr = self.seed_addr(peer);
        self.hubs
            .iter()
            .filter(|h| h.alive && h.pex.homed().contains(&addr))
            .count()
    }

    /// Every live member says a line; checks who shows it, and how often.
    fn round(&mut self, name: &str) {
        let seeds: Vec<usize> = (0..self.seeds.len())
            .filter(|&s| self.seeds[s].alive)
            .collect();
        let hubs: Vec<usize> = (0..self.hubs.len())
            .filter(|&h| self.hubs[h].alive)
            .collect();
        for &s in &seeds {
            assert!(
                self.homes(s) <= 1,
                "seed peer {s} has {} homes",
                self.homes(s)
            );
        }
        let homed: Vec<bool> = (0..self.seeds.len()).map(|s| self.homes(s) == 1).collect();
        let adjacency: Vec<Vec<bool>> = (0..self.seeds.len())
            .map(|x| (0..self.seeds.len()).map(|y| self.adjacent(x, y)).collect())
            .collect();
        for (s, row) in adjacency.iter().enumerate() {
            let addr = self.seed_addr(s);
            let homes: Vec<String> = self
                .hubs
                .iter()
                .filter(|h| h.alive && h.pex.homed().contains(&addr))
                .map(|h| h.id.clone())
                .collect();
            let adjacent: Vec<usize> = (0..row.len()).filter(|&y| row[y]).collect();
            eprintln!(
                "{name}: seed peer {s} alive={} homes={homes:?} adjacent={adjacent:?}",
                self.seeds[s].alive
            );
        }
        for &s in &seeds {
            self.seed_types(s, &format!("{name}-s{s}"));
        }
        for &h in &hubs {
            self.hub_types(h, &format!("{name}-h{h}"));
        }
        self.run_for(Duration::from_secs(10));
        for &r in &seeds {
            for &s in &seeds {
                if s == r {
                    continue;
                }
                let text = format!("{name}-s{s}");
                let shown = self.seeds[r].shown.get(&text).copied().unwrap_or(0);
                let expected = usize::from(adjacency[s][r] || (homed[s] && homed[r]));
                assert_eq!(shown, expected, "seed peer {r} shows {text} {shown} times");
            }
            for &h in &hubs {
                let text = format!("{name}-h{h}");
                let shown = self.seeds[r].shown.get(&text).copied().unwrap_or(0);
                assert_eq!(shown, usize::from(homed[r]), "seed peer {r} shows {text}");
            }
        }
        for &h in &hubs {
            for &s in &seeds {
                let text = format!("{name}-s{s}");
                let shown = self.hubs[h].shown.get(&text).map_or(0, HashSet::len);
                assert_eq!(
                    shown,
                    usize::from(homed[s]),
                    "t{h} shows {text} {shown} times"
                );
            }
        }
    }
}

/// One random mixed network: `peers` seed peers join one by one (at most `pause_ms` apart)
/// through one or two earlier members; a teia node is sometimes asked to link a seed peer;
/// everyone speaks; then the first `kills` teia nodes and the first seed peer die, and
/// everyone left speaks again.
fn mixed_network(seed: u64, hubs: usize, peers: usize, pause_ms: u64, kills: usize) {
    let mut sim = Sim::new(seed, hubs);
    let mut started: Vec<u16> = sim.hubs.iter().map(|h| h.port).collect();
    for _ in 0..peers {
        let mut hosts = Vec::new();
        for _ in 0..=sim.rng.below(2) {
            let pick = started[usize::try_from(sim.rng.below(started.len() as u64)).unwrap()];
            if !hosts.contains(&pick) {
                hosts.push(pick);
            }
        }
        let peer = sim.start_seed(&hosts);
        eprintln!("seed peer {peer} dials {hosts:?}");
        started.push(sim.seeds[peer].port);
        if sim.rng.below(4) == 0 {
            let hub = usize::try_from(sim.rng.below(hubs as u64)).unwrap();
            let addr = sim.seed_addr(peer);
            let now = sim.now;
            sim.hubs[hub].pex.connect(now, addr);
            sim.drive(hub);
        }
        let pause = Duration::from_millis(sim.rng.below(pause_ms));
        sim.run_for(pause);
    }
    sim.run_for(Duration::from_secs(20));
    sim.round(&format!("seed{seed}-first"));
    for hub in 0..kills {
        sim.kill_hub(hub);
    }
    sim.kill_seed(0);
    sim.run_for(Duration::from_secs(20));
    sim.round(&format!("seed{seed}-second"));
}

#[test]
fn mixed_networks_show_every_line_once_and_survive_their_first_nodes() {
    for seed in 0..100 {
        mixed_network(seed, 3, 7, 5_000, 1);
    }
}

#[test]
fn crowds_joining_at_once_settle_on_one_home_each() {
    for seed in 0..40 {
        mixed_network(1_000 + seed, 5, 12, 300, 2);
    }
}
