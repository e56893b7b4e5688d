//! A deterministic in-process network of [`Node`]s: links are in-memory queues with a fixed
//! latency, time is simulated, and every choice comes from a seed. Networks of hundreds of
//! nodes run in milliseconds.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::rng::SplitMix64;

const LATENCY: Duration = Duration::from_millis(5);

#[derive(Debug)]
enum Delivery {
    Opened {
        node: usize,
        link: LinkId,
        addr: SocketAddr,
        inbound: bool,
    },
    Line {
        node: usize,
        link: LinkId,
        line: Vec<u8>,
    },
    Closed {
        node: usize,
        link: LinkId,
    },
    DialFailed {
        node: usize,
        addr: SocketAddr,
    },
}

struct SimNode {
    node: Node,
    addr: SocketAddr,
    alive: bool,
    /// A frozen node neither receives nor acts on time (a hung process).
    frozen: bool,
    events: Vec<Event>,
    /// SENDs the node asked to remember (its durable storage).
    stored: Vec<PendingSend>,
}

struct Sim {
    now: Instant,
    nodes: Vec<SimNode>,
    /// link -> (node owning this end, the other end's link, the other node)
    ends: HashMap<LinkId, (usize, LinkId, usize)>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    deliveries: HashMap<u64, Delivery>,
    seq: u64,
    next_link: LinkId,
    /// Every line written, by writer, when asked for ([`Sim::record_lines`]).
    lines: Option<Vec<(usize, String)>>,
}

fn addr_of(index: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10_000 + index as u16)
}

fn name(index: usize) -> String {
    format!("n{index}@sim")
}

/// The key pair of simulated node `index`: links between simulated nodes are encrypted
/// handshakes and their messages signed, as between real teia nodes.
fn identity(index: usize) -> crate::identity::Identity {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(index as u64 + 1).to_le_bytes());
    crate::identity::Identity::from_seed(&seed)
}

/// The configuration of simulated node `index`.
fn sim_config(index: usize) -> Config {
    let mut config = Config::new(name(index));
    config.listen_port = Some(addr_of(index).port());
    config.target_neighbours = 0;
    config.identity = Some(identity(index));
    config
}

impl Sim {
    fn new(count: usize, seed: u64, configure: impl Fn(&mut Config)) -> Self {
        let now = Instant::now();
        let nodes = (0..count)
            .map(|i| {
                let mut config = sim_config(i);
                config.seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
                configure(&mut config);
                SimNode {
                    node: Node::new(config, now, 1_700_000_000_000),
                    addr: addr_of(i),
                    alive: true,
                    frozen: false,
                    events: Vec::new(),
                    stored: Vec::new(),
                }
            })
            .collect();
        Self {
            now,
            nodes,
            ends: HashMap::new(),
            queue: BinaryHeap::new(),
            deliveries: HashMap::new(),
            seq: 0,
            next_link: 1,
            lines: None,
        }
    }

    /// Keeps every line written from now on.
    fn record_lines(&mut self) {
        self.lines = Some(Vec::new());
    }

    /// The lines `index` wrote that mention `text`.
    fn written_by(&self, index: usize, text: &str) -> Vec<String> {
        self.lines
            .iter()
            .flatten()
            .filter(|(writer, line)| *writer == index && line.contains(text))
            .map(|(_, line)| line.clone())
            .collect()
    }

    fn schedule(&mut self, delay: Duration, delivery: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.deliveries.insert(self.seq, delivery);
    }

    fn node(&mut self, index: usize) -> &mut Node {
        &mut self.nodes[index].node
    }

    /// Carries out every action the nodes have queued.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            for index in 0..self.nodes.len() {
                while let Some(action) = self.nodes[index].node.poll_action() {
                    any = true;
                    self.act(index, action);
                }
            }
            if !any {
                return;
            }
        }
    }

    fn act(&mut self, index: usize, action: Action) {
        match action {
            Action::Write { link, line } => {
                if let Some(&(_, other, other_node)) = self.ends.get(&link) {
                    let line = line[..line.len() - 1].to_vec();
                    if let Some(lines) = &mut self.lines {
                        lines.push((index, String::from_utf8_lossy(&line).into_owned()));
                    }
                    self.schedule(
                        LATENCY,
                        Delivery::Line {
                            node: other_node,
                            link: other,
                            line,
                        },
                    );
                }
            }
            Action::Close { link } => {
                if let Some((_, other, other_node)) = self.ends.remove(&link) {
                    self.ends.remove(&other);
                    self.schedule(
                        LATENCY,
                        Delivery::Closed {
                            node: other_node,
                            link: other,
                        },
                    );
                }
            }
            Action::Dial { addr } => {
                let target = self.nodes.iter().position(|n| n.addr == addr && n.alive);
                match target {
                    Some(target) => {
                        let (a, b) = (self.next_link, self.next_link + 1);
                        self.next_link += 2;
                        self.ends.insert(a, (index, b, target));
                        self.ends.insert(b, (target, a, index));
                        let from = self.nodes[index].addr;
                        self.schedule(
                            LATENCY,
                            Delivery::Opened {
                                node: index,
                                link: a,
                                addr,
                                inbound: false,
                            },
                        );
                        self.schedule(
                            LATENCY,
                            Delivery::Opened {
                                node: target,
                                link: b,
                                addr: from,
                                inbound: true,
                            },
                        );
                    }
                    None => self.schedule(LATENCY, Delivery::DialFailed { node: index, addr }),
                }
            }
            Action::Event(event) => self.nodes[index].events.push(event),
            Action::Remember(send) => self.nodes[index].stored.push(send),
            Action::Forget { msg_id } => self.nodes[index].stored.retain(|s| s.msg_id != msg_id),
            // Lines travel in memory: the transport's encryption has nothing to do here.
            Action::Coalesce { .. }
            | Action::Pace { .. }
            | Action::Delivered(_)
            | Action::Encrypt { .. }
            | Action::Pin { .. }
            | Action::Unpin { .. } => {}
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        let now = self.now;
        let node_of = |d: &Delivery| match d {
            Delivery::Opened { node, .. }
            | Delivery::Line { node, .. }
            | Delivery::Closed { node, .. }
            | Delivery::DialFailed { node, .. } => *node,
        };
        let target = &mut self.nodes[node_of(&delivery)];
        if !target.alive || (target.frozen && !matches!(delivery, Delivery::Closed { .. })) {
            return;
        }
        let node = &mut target.node;
        match delivery {
            Delivery::Opened {
                link,
                addr,
                inbound,
                ..
            } => node.link_opened(now, link, addr, inbound),
            Delivery::Line { link, line, .. } => node.line_received(now, link, Ok(line)),
            Delivery::Closed { link, .. } => node.link_closed(now, link, "closed by peer"),
            Delivery::DialFailed { addr, .. } => node.dial_failed(now, addr, "connection refused"),
        }
    }

    /// Runs the network until `duration` of simulated time has passed.
    fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        loop {
            self.drain();
            let next_delivery = self.queue.peek().map(|Reverse((at, _))| *at);
            let next_timer = self
                .nodes
                .iter()
                .filter(|n| n.alive && !n.frozen)
                .filter_map(|n| n.node.poll_timeout())
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                if let Some(delivery) = self.deliveries.remove(&seq) {
                    self.deliver(delivery);
                }
            }
            let now = self.now;
            for n in self.nodes.iter_mut().filter(|n| n.alive && !n.frozen) {
                if n.node.poll_timeout().is_some_and(|t| t <= now) {
                    n.node.handle_timeout(now);
                }
            }
        }
        self.now = end;
    }

    /// Kills a node: its links close as a crash would close them.
    fn kill(&mut self, index: usize) {
        self.nodes[index].alive = false;
        let ends: Vec<LinkId> = self
            .ends
            .iter()
            .filter(|(_, (owner, _, _))| *owner == index)
            .map(|(link, _)| *link)
            .collect();
        for link in ends {
            if let Some((_, other, other_node)) = self.ends.remove(&link) {
                self.ends.remove(&other);
                self.schedule(
                    LATENCY,
                    Delivery::Closed {
                        node: other_node,
                        link: other,
                    },
                );
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        let now = self.now;
        let addr = self.nodes[b].addr;
        self.node(a).connect(now, addr);
    }

    /// Neighbour sets as the nodes see them.
    fn adjacency(&self) -> Vec<HashSet<usize>> {
        self.nodes
            .iter()
            .map(|n| {
                n.node
                    .neighbours()
                    .iter()
                    .filter_map(|info| {
                        info.peer
                            .strip_prefix('n')?
                            .strip_suffix("@sim")?
                            .parse()
                            .ok()
                    })
                    .collect()
            })
            .collect()
    }

    /// Hop distances from `from` over live links.
    fn distances(&self, from: usize) -> Vec<Option<usize>> {
        let adjacency = self.adjacency();
        let mut dist = vec![None; self.nodes.len()];
        dist[from] = Some(0);
        let mut queue = VecDeque::from([from]);
        while let Some(at) = queue.pop_front() {
            for &next in &adjacency[at] {
                if dist[next].is_none() && self.nodes[next].alive {
                    dist[next] = Some(dist[at].unwrap_or(0) + 1);
                    queue.push_back(next);
                }
            }
        }
        dist
    }

    fn messages(&self, index: usize, msg_id: &str) -> usize {
        self.nodes[index]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Message { msg_id: id, .. } if id == msg_id))
            .count()
    }

    fn acked(&self, index: usize, msg_id: &str) -> bool {
        self.nodes[index]
            .events
            .iter()
            .any(|e| matches!(e, Event::Acked { msg_id: id, .. } if id == msg_id))
    }

    fn send(&mut self, from: usize, to: usize, text: &str) -> String {
        let now = self.now;
        self.node(from).send(now, &name(to), json!(text)).unwrap()
    }
}

/// A random connected topology: a random tree plus `extra` random edges.
fn random_topology(sim: &mut Sim, seed: u64, extra: usize) {
    let mut rng = SplitMix64::new(seed);
    let count = sim.nodes.len();
    for i in 1..count {
        let j = rng.below(i as u64) as usize;
        sim.connect(i, j);
    }
    for _ in 0..extra {
        let a = rng.below(count as u64) as usize;
        let b = rng.below(count as u64) as usize;
        if a != b {
            sim.connect(a, b);
        }
    }
}

#[test]
fn pub_reaches_every_node_of_200_exactly_once() {
    for seed in [1, 2, 3] {
        let mut sim = Sim::new(200, seed, |_| {});
        random_topology(&mut sim, seed, 300);
        sim.run(Duration::from_secs(2));
        let dist = sim.distances(0);
        assert!(dist.iter().all(Option::is_some), "connected");
        let eccentricity = dist.iter().flatten().max().copied().unwrap_or(0);
        assert!(
            eccentricity < 8,
            "seed {seed}: eccentricity {eccentricity} within the ttl"
        );
        let now = sim.now;
        let star = sim.node(0).publish(now, "*", json!("hello all")).unwrap();
        let ns = sim
            .node(0)
            .publish(now, "#sim", json!("hello sim"))
            .unwrap();
        let other = sim
            .node(0)
            .publish(now, "#elsewhere", json!("not for us"))
            .unwrap();
        sim.run(Duration::from_secs(2));
        for i in 1..200 {
            assert_eq!(
                sim.messages(i, &star),
                1,
                "seed {seed}: node {i} got * once"
            );
            assert_eq!(
                sim.messages(i, &ns),
                1,
                "seed {seed}: node {i} got #sim once"
            );
            assert_eq!(
                sim.messages(i, &other),
                0,
                "not delivered outside its namespace"
            );
        }
        let duplicates: u64 = sim.nodes.iter().map(|n| n.node.counters().duplicates).sum();
        assert!(
            duplicates > 0,
            "the mesh has cycles, and their copies were dropped"
        );
    }
}

#[test]
fn send_finds_its_route_by_who_has_and_is_acked() {
    let mut sim = Sim::new(200, 7, |_| {});
    random_topology(&mut sim, 7, 100);
    sim.run(Duration::from_secs(2));
    let dist = sim.distances(0);
    let far = (1..200)
        .filter(|i| dist[*i].is_some_and(|d| (3..8).contains(&d)))
        .max_by_key(|i| dist[*i])
        .expect("a node at least 3 hops away");
    let msg = sim.send(0, far, "hi far");
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.messages(far, &msg), 1, "delivered exactly once");
    assert!(sim.acked(0, &msg), "the ACK came back");
    let route = sim.nodes[0].node.routes(sim.now);
    assert!(
        route.iter().any(|r| r.dst == name(far)),
        "the route is cached: {route:?}"
    );
    let relayed = sim.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::Relayed { ok: true, .. }));
    assert!(relayed, "the first hop answered RELAY_OK");
}

#[test]
fn sends_between_random_pairs_are_all_acked() {
    let mut sim = Sim::new(200, 11, |_| {});
    random_topology(&mut sim, 11, 150);
    sim.run(Duration::from_secs(2));
    let mut rng = SplitMix64::new(99);
    let mut sent = Vec::new();
    while sent.len() < 50 {
        let a = rng.below(200) as usize;
        let b = rng.below(200) as usize;
        let within_ttl = sim.distances(a)[b].is_some_and(|d| d <= 8);
        if a != b && within_ttl {
            sent.push((a, b, sim.send(a, b, "ping")));
        }
    }
    sim.run(Duration::from_secs(10));
    for (a, b, msg) in sent {
        assert_eq!(sim.messages(b, &msg), 1, "{a} -> {b} delivered once");
        assert!(sim.acked(a, &msg), "{a} -> {b} acked");
    }
}

#[test]
fn dead_links_are_routed_around() {
    // A ring: two ways from 0 to 5.
    let mut sim = Sim::new(10, 3, |_| {});
    for i in 0..10 {
        sim.connect(i, (i + 1) % 10);
    }
    sim.run(Duration::from_secs(1));
    let first = sim.send(0, 5, "before");
    sim.run(Duration::from_secs(2));
    assert!(sim.acked(0, &first));
    let hop = sim.nodes[0]
        .node
        .routes(sim.now)
        .into_iter()
        .find(|r| r.dst == name(5))
        .map(|r| r.next_hop)
        .expect("route to n5");
    let dead: usize = hop
        .trim_start_matches('n')
        .trim_end_matches("@sim")
        .parse()
        .unwrap();
    sim.kill(dead);
    sim.run(Duration::from_secs(1));
    let second = sim.send(0, 5, "after");
    sim.run(Duration::from_secs(10));
    assert_eq!(sim.messages(5, &second), 1);
    assert!(
        sim.acked(0, &second),
        "delivered the other way round after n{dead} died"
    );
}

#[test]
fn dead_relays_are_routed_around_in_a_200_node_network() {
    let mut sim = Sim::new(200, 21, |_| {});
    random_topology(&mut sim, 21, 250);
    sim.run(Duration::from_secs(2));
    let mut rng = SplitMix64::new(5);
    let mut rerouted = 0;
    for _ in 0..40 {
        if rerouted == 5 {
            break;
        }
        let a = rng.below(200) as usize;
        let b = rng.below(200) as usize;
        let far = sim.distances(a)[b].is_some_and(|d| (3..=6).contains(&d));
        if a == b || !far || !sim.nodes[a].alive || !sim.nodes[b].alive {
            continue;
        }
        let first = sim.send(a, b, "before");
        sim.run(Duration::from_secs(2));
        assert!(sim.acked(a, &first), "{a} -> {b} before the failure");
        let hop = sim.nodes[a]
            .node
            .routes(sim.now)
            .into_iter()
            .find(|r| r.dst == name(b))
            .map(|r| r.next_hop)
            .expect("a route was cached");
        let relay: usize = hop
            .trim_start_matches('n')
            .trim_end_matches("@sim")
            .parse()
            .unwrap();
        sim.kill(relay);
        sim.run(Duration::from_millis(100));
        if sim.distances(a)[b].is_none_or(|d| d > 8) {
            continue;
        }
        let second = sim.send(a, b, "after");
        sim.run(Duration::from_secs(15));
        assert_eq!(
            sim.messages(b, &second),
            1,
            "{a} -> {b} after n{relay} died"
        );
        assert!(sim.acked(a, &second));
        rerouted += 1;
    }
    assert_eq!(
        rerouted, 5,
        "five routes lost their first hop and were found again"
    );
}

#[test]
fn ttl_expiry_is_reported_to_the_origin() {
    let mut sim = Sim::new(5, 5, |c| {
        if c.peer_id == "n0@sim" {
            c.default_ttl = 3;
        }
    });
    for i in 0..4 {
        sim.connect(i, i + 1);
    }
    sim.run(Duration::from_secs(1));
    let msg = sim.send(0, 4, "too far");
    sim.run(Duration::from_secs(2));
    assert_eq!(sim.messages(4, &msg), 0);
    let reported = sim.nodes[0].events.iter().any(|e| {
        matches!(e, Event::RemoteError { code, reference: Some(r), .. } if code == "ttl_expired" && r == &msg)
    });
    assert!(reported, "events: {:?}", sim.nodes[0].events);
    sim.run(Duration::from_secs(70));
    let undelivered = sim.nodes[0].events.iter().any(|e| {
        matches!(e, Event::Undelivered { msg_id, reason, .. } if msg_id == &msg && reason == "ttl_expired")
    });
    assert!(
        undelivered,
        "after the deadline the send is reported undelivered"
    );
}

#[test]
fn unknown_destination_is_undelivered_with_no_route() {
    let mut sim = Sim::new(3, 9, |c| c.send_deadline = Duration::from_secs(10));
    sim.connect(0, 1);
    sim.connect(1, 2);
    sim.run(Duration::from_secs(1));
    let now = sim.now;
    let msg = sim
        .node(0)
        .send(now, "ghost@sim", json!("anyone?"))
        .unwrap();
    sim.run(Duration::from_secs(15));
    let undelivered = sim.nodes[0].events.iter().any(|e| {
        matches!(e, Event::Undelivered { msg_id, reason, .. } if msg_id == &msg && reason == "no_route")
    });
    assert!(undelivered, "events: {:?}", sim.nodes[0].events);
}

#[test]
fn peer_exchange_builds_a_mesh_that_survives_its_seed() {
    let mut sim = Sim::new(30, 4, |c| c.target_neighbours = 4);
    for i in 1..30 {
        sim.connect(i, 0);
        sim.run(Duration::from_millis(200));
    }
    sim.run(Duration::from_secs(5));
    let adjacency = sim.adjacency();
    for (i, neighbours) in adjacency.iter().enumerate() {
        assert!(neighbours.len() >= 2, "n{i} has only {neighbours:?}");
    }
    sim.kill(0);
    sim.run(Duration::from_secs(5));
    let dist = sim.distances(1);
    for (i, d) in dist.iter().enumerate().skip(1) {
        assert!(d.is_some(), "n{i} is still reachable from n1 after n0 died");
    }
}

#[test]
fn simultaneous_dials_leave_one_link() {
    let mut sim = Sim::new(2, 1, |_| {});
    sim.connect(0, 1);
    sim.connect(1, 0);
    sim.run(Duration::from_secs(2));
    assert_eq!(sim.nodes[0].node.neighbours().len(), 1);
    assert_eq!(sim.nodes[1].node.neighbours().len(), 1);
    assert_eq!(sim.ends.len(), 2, "one connection, two ends");
    let msg = sim.send(0, 1, "still works");
    sim.run(Duration::from_secs(1));
    assert!(sim.acked(0, &msg));
}

#[test]
fn silent_peer_is_closed_after_three_missed_pings_and_redialed() {
    let mut sim = Sim::new(2, 1, |c| c.ping_interval = Duration::from_secs(1));
    sim.connect(0, 1);
    sim.run(Duration::from_secs(3));
    assert!(
        sim.nodes[0].node.neighbours()[0].rtt.is_some(),
        "RTT measured"
    );
    sim.nodes[1].frozen = true;
    sim.run(Duration::from_secs(6));
    let down = sim.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::LinkDown { reason, .. } if reason == "keep-alive timeout"));
    assert!(down, "{:?}", sim.nodes[0].events);
    sim.nodes[1].frozen = false;
    // The dial made while it was frozen times out (10 s), then the next comes after its
    // backoff.
    sim.run(Duration::from_secs(20));
    assert_eq!(
        sim.nodes[0].node.neighbours().len(),
        1,
        "pinned peer redialed"
    );
}

#[test]
fn remembered_sends_resume_after_a_restart() {
    let mut sim = Sim::new(2, 3, |_| {});
    let msg = sim.send(0, 1, "kept across a crash");
    sim.run(Duration::from_secs(1));
    assert_eq!(
        sim.nodes[0].stored.len(),
        1,
        "remembered before anything else"
    );
    // Node 0 crashes and starts again from its storage; node 1 appears.
    let stored = std::mem::take(&mut sim.nodes[0].stored);
    sim.nodes[0].node = Node::new(sim_config(0), sim.now, 1_700_000_001_000);
    let now = sim.now;
    let restored = Restored {
        sends: stored,
        ..Restored::default()
    };
    sim.node(0).restore(now, restored);
    sim.connect(0, 1);
    sim.run(Duration::from_secs(5));
    assert_eq!(sim.messages(1, &msg), 1);
    assert!(sim.acked(0, &msg));
    assert!(
        sim.nodes[0].stored.is_empty(),
        "forgotten once acknowledged"
    );
}

#[test]
fn restored_delivered_ids_are_not_delivered_again() {
    let now = Instant::now();
    let mut node = Node::new(Config::new("b@U"), now, 0);
    let restored = Restored {
        delivered: vec!["m1".into()],
        ..Restored::default()
    };
    node.restore(now, restored);
    node.link_opened(now, 1, addr_of(1), true);
    node.line_received(now, 1, Ok(br#"{"type":"HELLO","peer_id":"a@U"}"#.to_vec()));
    let send = br#"{"type":"SEND","msg_id":"m1","src":"a@U","dst":"b@U","payload":"hi","require_ack":true,"ttl":1}"#;
    node.line_received(now, 1, Ok(send.to_vec()));
    let actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::Event(Event::Message { .. }))));
    assert!(actions.iter().any(
        |a| matches!(a, Action::Write { line, .. } if line.starts_with(b"{\"type\":\"ACK\""))
    ));
}

#[test]
fn expired_remembered_sends_are_reported_undelivered() {
    let now = Instant::now();
    let mut node = Node::new(Config::new("a@U"), now, 10_000);
    let stale = PendingSend {
        msg_id: "old".into(),
        dst: "b@U".into(),
        payload: json!("late"),
        deadline_unix_ms: 9_000,
    };
    let restored = Restored {
        sends: vec![stale],
        ..Restored::default()
    };
    node.restore(now, restored);
    let actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
    assert!(actions.contains(&Action::Forget {
        msg_id: "old".into()
    }));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Event(Event::Undelivered { msg_id, .. }) if msg_id == "old")));
}

/// Every action of `node` over the next two seconds of simulated time (lines to course
/// peers are paced out over time).
fn actions_over_time(node: &mut Node, now: Instant) -> Vec<Action> {
    let mut actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
    for step in 1..=200 {
        node.handle_timeout(now + Duration::from_millis(10 * step));
        actions.extend(std::iter::from_fn(|| node.poll_action()));
    }
    actions
}

#[test]
fn duplicate_send_is_delivered_once_and_acked_twice() {
    let now = Instant::now();
    let mut node = Node::new(Config::new("b@U"), now, 0);
    let addr = addr_of(1);
    node.link_opened(now, 1, addr, true);
    let hello = br#"{"type":"HELLO","peer_id":"a@U","version":"1.0","features":["ack"],"ttl":1}"#;
    node.line_received(now, 1, Ok(hello.to_vec()));
    let send = br#"{"type":"SEND","msg_id":"m1","src":"a@U","dst":"b@U","payload":"hi","require_ack":true,"ttl":1}"#;
    node.line_received(now, 1, Ok(send.to_vec()));
    node.line_received(now, 1, Ok(send.to_vec()));
    let actions = actions_over_time(&mut node, now);
    let delivered = actions
        .iter()
        .filter(|a| matches!(a, Action::Event(Event::Message { .. })))
        .count();
    let acks = actions
        .iter()
        .filter(
            |a| matches!(a, Action::Write { line, .. } if line.starts_with(b"{\"type\":\"ACK\"")),
        )
        .count();
    assert_eq!((delivered, acks), (1, 2));
}

#[test]
fn malformed_input_gets_errors_and_the_link_stays() {
    let now = Instant::now();
    let mut node = Node::new(Config::new("b@U"), now, 0);
    node.link_opened(now, 1, addr_of(1), true);
    node.line_received(now, 1, Ok(br#"{"type":"SEND","msg_id":"early"}"#.to_vec()));
    let hello = br#"{"type":"HELLO","peer_id":"a@U"}"#;
    node.line_received(now, 1, Ok(hello.to_vec()));
    node.line_received(now, 1, Ok(b"not json".to_vec()));
    node.line_received(
        now,
        1,
        Ok(br#"{"type":"SEND","msg_id":"m7","src":"a@U"}"#.to_vec()),
    );
    node.line_received(now, 1, Err(DecodeError::LineTooLong { limit: 32768 }));
    node.line_received(now, 1, Ok(br#"{"type":"WHATEVER"}"#.to_vec()));
    let written: Vec<String> = actions_over_time(&mut node, now)
        .into_iter()
        .filter_map(|a| match a {
            Action::Write { line, .. } => Some(String::from_utf8(line).unwrap()),
            Action::Close { .. } => panic!("the link must stay up"),
            _ => None,
        })
        .collect();
    let errors: Vec<&String> = written.iter().filter(|l| l.contains("\"ERROR\"")).collect();
    assert_eq!(errors.len(), 4, "{written:#?}");
    assert!(errors[0].contains("bad_format"));
    assert!(errors[1].contains("bad_format"));
    assert!(errors[2].contains("bad_format") && errors[2].contains("\"ref\":\"m7\""));
    assert!(errors[3].contains("line_too_long") && errors[3].contains("32768"));
    assert_eq!(node.neighbours().len(), 1);
}

#[test]
fn a_neighbour_over_its_quota_is_paced_then_refused() {
    let now = Instant::now();
    let mut config = Config::new("b@U");
    config.link_rate = 5;
    let mut node = Node::new(config, now, 0);
    node.link_opened(now, 1, addr_of(1), true);
    node.line_received(now, 1, Ok(br#"{"type":"HELLO","peer_id":"a@U"}"#.to_vec()));
    for i in 0..20 {
        let line = format!(
            r#"{{"type":"PUB","msg_id":"p{i}","src":"a@U","dst":"*","payload":"x","ttl":1}}"#
        );
        node.line_received(now, 1, Ok(line.into_bytes()));
    }
    let actions = actions_over_time(&mut node, now);
    let delivered = actions
        .iter()
        .filter(|a| matches!(a, Action::Event(Event::Message { .. })))
        .count();
    let refused = actions
        .iter()
        .filter(|a| matches!(a, Action::Write { line, .. } if String::from_utf8_lossy(line).contains("over_quota")))
        .count();
    let paced = actions
        .iter()
        .filter(|a| matches!(a, Action::Pace { link: 1, .. }))
        .count();
    assert_eq!(
        delivered, 20,
        "a burst of twice the rate, then as much again on credit"
    );
    assert_eq!(paced, 10, "the link is paused for what was taken on credit");
    assert_eq!(refused, 0);
    for i in 20..25 {
        let line = format!(
            r#"{{"type":"PUB","msg_id":"p{i}","src":"a@U","dst":"*","payload":"x","ttl":1}}"#
        );
        node.line_received(now, 1, Ok(line.into_bytes()));
    }
    let refused = actions_over_time(&mut node, now)
        .iter()
        .filter(|a| matches!(a, Action::Write { line, .. } if String::from_utf8_lossy(line).contains("over_quota")))
        .count();
    assert_eq!(refused, 5, "what comes on a paused link past its credit");
}

#[test]
fn only_messages_that_cross_another_node_carry_a_signature() {
    let mut sim = Sim::new(3, 5, |_| {});
    sim.connect(0, 1);
    sim.connect(1, 2);
    sim.run(Duration::from_secs(1));
    sim.record_lines();
    let direct = sim.send(0, 1, "next door");
    let far = sim.send(0, 2, "two hops");
    sim.run(Duration::from_secs(2));
    assert!(sim.acked(0, &direct) && sim.acked(0, &far));
    assert_eq!(sim.messages(1, &direct), 1);
    assert_eq!(sim.messages(2, &far), 1);
    let signed = |lines: Vec<String>| {
        assert!(!lines.is_empty());
        lines.iter().all(|line| line.contains("\"sig\""))
    };
    let unsigned = |lines: Vec<String>| {
        assert!(!lines.is_empty());
        lines.iter().all(|line| !line.contains("\"sig\""))
    };
    // Straight to a neighbour on an encrypted link: the link proves the origin.
    assert!(unsigned(
        sim.written_by(0, &format!("\"SEND\",\"msg_id\":\"{direct}\""))
    ));
    assert!(unsigned(
        sim.written_by(1, &format!("\"ACK\",\"msg_id\":\"{direct}\""))
    ));
    // Through a relay: signed at the origin, checked at the destination.
    assert!(signed(
        sim.written_by(0, &format!("\"SEND\",\"msg_id\":\"{far}\""))
    ));
    assert!(signed(
        sim.written_by(2, &format!("\"ACK\",\"msg_id\":\"{far}\""))
    ));
}

#[test]
fn links_between_teia_nodes_are_encrypted_and_keys_pinned() {
    let mut sim = Sim::new(2, 1, |_| {});
    sim.connect(0, 1);
    sim.run(Duration::from_secs(1));
    let neighbours = sim.nodes[0].node.neighbours();
    assert_eq!(neighbours.len(), 1);
    assert!(neighbours[0].encrypted && neighbours[0].teia);
    assert_eq!(neighbours[0].key, Some(identity(1).public_key()));
    assert_eq!(
        sim.nodes[0].node.pins(),
        vec![(name(1), identity(1).public_key())]
    );
}

#[test]
fn an_impostor_key_is_refused_and_the_existing_link_stays() {
    // Node 2 claims node 1's peer id with its own key.
    let mut sim = Sim::new(3, 1, |c| {
        if c.peer_id == name(2) {
            c.peer_id = name(1);
        }
    });
    sim.connect(0, 1);
    sim.run(Duration::from_secs(1));
    sim.connect(0, 2);
    sim.run(Duration::from_secs(1));
    let mismatch = sim.nodes[0].events.iter().any(|e| {
        matches!(e, Event::KeyMismatch { peer, pinned, offered, .. }
            if *peer == name(1) && *pinned == identity(1).public_key() && *offered == identity(2).public_key())
    });
    assert!(mismatch, "{:?}", sim.nodes[0].events);
    let neighbours = sim.nodes[0].node.neighbours();
    assert_eq!(neighbours.len(), 1);
    assert_eq!(neighbours[0].key, Some(identity(1).public_key()));
    let msg = sim.send(0, 1, "still the real one");
    sim.run(Duration::from_secs(1));
    assert!(sim.acked(0, &msg));
}

#[test]
fn a_relay_cannot_forge_a_message() {
    let mut sim = Sim::new(3, 1, |_| {});
    sim.connect(0, 1);
    sim.connect(1, 2);
    sim.run(Duration::from_secs(1));
    // What n1 could inject on its link to n2: a PUB in n0's name, unsigned, then one with
    // n0's real signature over other text.
    let (&link, _) = sim
        .ends
        .iter()
        .find(|(_, &(owner, _, other))| owner == 2 && other == 1)
        .unwrap();
    let now = sim.now;
    let genuine = sim.node(0).publish(now, "*", json!("original")).unwrap();
    sim.run(Duration::from_secs(1));
    assert_eq!(
        sim.messages(2, &genuine),
        1,
        "signed and relayed: delivered"
    );
    // n0's genuine signature of a batch of one PUB "forged-2" saying "original".
    let signature = {
        let bytes = crate::identity::origin_message(
            "PUB",
            "forged-2",
            &name(0),
            "*",
            Some(&json!("original")),
        );
        let root = crate::identity::leaf_hash(&bytes);
        crate::identity::encode(&identity(0).sign(&crate::identity::batch_message(&root)))
    };
    let key = identity(0).public_key().to_string();
    let unsigned = format!(
        r#"{{"type":"PUB","msg_id":"forged-1","src":"{}","dst":"*","payload":"pague","ttl":7}}"#,
        name(0)
    );
    let altered = format!(
        r#"{{"type":"PUB","msg_id":"forged-2","src":"{}","dst":"*","payload":"pague","ttl":7,"key":"{key}","sig":"{signature}"}}"#,
        name(0)
    );
    for line in [unsigned, altered] {
        sim.schedule(
            LATENCY,
            Delivery::Line {
                node: 2,
                link,
                line: line.into_bytes(),
            },
        );
    }
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.messages(2, "forged-1"), 0);
    assert_eq!(sim.messages(2, "forged-2"), 0);
    let forged = sim.nodes[2]
        .events
        .iter()
        .filter(|e| matches!(e, Event::Forged { .. }))
        .count();
    assert_eq!(forged, 2);
    assert_eq!(sim.nodes[2].node.neighbours().len(), 1, "the link stays");
}

#[test]
fn peer_lists_from_unproven_peers_are_not_dialed() {
    let now = Instant::now();
    let mut config = Config::new("b@U");
    config.identity = Some(identity(9));
    let mut node = Node::new(config, now, 0);
    node.link_opened(now, 1, addr_of(1), true);
    // A course client that claims `teia` without the handshake.
    let hello = br#"{"type":"HELLO","peer_id":"evil@U","features":["ack","teia"],"ttl":1}"#;
    node.line_received(now, 1, Ok(hello.to_vec()));
    let peers: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#"{{"peer_id":"v{i}@U","ip":"127.0.0.1","port":{}}}"#,
                20_000 + i
            )
        })
        .collect();
    let list = format!(
        r#"{{"type":"PEER_LIST","peers":[{}],"ttl":1}}"#,
        peers.join(",")
    );
    node.line_received(now, 1, Ok(list.into_bytes()));
    let actions = actions_over_time(&mut node, now);
    assert!(!actions.iter().any(|a| matches!(a, Action::Dial { .. })));
    assert!(
        !node.neighbours()[0].teia,
        "not a teia peer without its key"
    );
}

#[test]
fn new_dials_are_rate_limited_node_wide() {
    let now = Instant::now();
    let mut config = Config::new("b@U");
    config.target_neighbours = 500;
    let mut node = Node::new(config, now, 0);
    let peers = (0..200).map(|i| (format!("p{i}@U"), addr_of(100 + i)));
    node.discovered(now, peers);
    let dials = |node: &mut Node| {
        std::iter::from_fn(|| node.poll_action())
            .filter(|a| matches!(a, Action::Dial { .. }))
            .count()
    };
    assert_eq!(dials(&mut node), 20, "the burst");
    node.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(dials(&mut node), 10, "then the rate");
}

#[test]
fn a_peer_that_said_bye_is_dialed_again_only_once_seen_again() {
    let mut sim = Sim::new(2, 1, |config| config.target_neighbours = 4);
    let now = sim.now;
    sim.node(0).discovered(now, [(name(1), addr_of(1))]);
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.nodes[0].node.neighbours().len(), 1);
    let now = sim.now;
    sim.node(1).shutdown(now);
    sim.run(Duration::from_secs(1));
    // Node 1 starts again at once, but node 0 does not know it is back.
    sim.nodes[1].node = Node::new(sim_config(1), sim.now, 1_700_000_010_000);
    sim.run(Duration::from_secs(120));
    assert!(sim.nodes[0].node.neighbours().is_empty(), "not redialed");
    let now = sim.now;
    sim.node(0).discovered(now, [(name(1), addr_of(1))]);
    sim.run(Duration::from_secs(2));
    assert_eq!(
        sim.nodes[0].node.neighbours().len(),
        1,
        "seen again: dialed"
    );
}

#[test]
fn an_address_that_drops_every_link_is_given_up() {
    let now = Instant::now();
    let mut config = Config::new("a@U");
    config.reconnect_attempts = 3;
    let mut node = Node::new(config, now, 0);
    let addr = addr_of(7);
    node.connect(now, addr);
    let mut dials = 0;
    let mut link = 0;
    let mut at = now;
    for _ in 0..1_000 {
        let actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
        for action in actions {
            match action {
                Action::Dial { .. } => {
                    dials += 1;
                    link += 1;
                    node.link_opened(at, link, addr, false);
                    node.link_closed(at, link, "closed by peer");
                }
                Action::Event(Event::DialGaveUp { attempts, .. }) => {
                    assert_eq!(attempts, 3);
                    assert_eq!(dials, 4, "the first dial and 3 retries");
                    return;
                }
                _ => {}
            }
        }
        at = node.poll_timeout().unwrap_or(at + Duration::from_secs(1));
        node.handle_timeout(at);
    }
    panic!("never gave up after {dials} dials");
}

#[test]
fn a_node_whose_id_a_course_client_squats_backs_off_its_redials() {
    let mut sim = Sim::new(2, 1, |_| {});
    // A course client holds n1's (not yet pinned) peer id on a plaintext link to n0.
    let now = sim.now;
    let squatter = 9_999;
    sim.node(0).link_opened(now, squatter, addr_of(50), true);
    let hello = format!(
        r#"{{"type":"HELLO","peer_id":"{}","version":"1.0","features":["ack"],"ttl":1}}"#,
        name(1)
    );
    sim.node(0)
        .line_received(now, squatter, Ok(hello.into_bytes()));
    // The real n1 is told to keep n0 connected: each of its links is refused `duplicate`.
    sim.connect(1, 0);
    sim.run(Duration::from_secs(20));
    let refused = sim.nodes[0]
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Refused {
                    refusal: Refusal::Duplicate,
                    ..
                }
            )
        })
        .count();
    // Backed off 1, 2, 4 and 8 s: five dials in 20 s (not nine a second).
    assert!((2..=6).contains(&refused), "{refused} refusals in 20 s");
    assert_eq!(
        sim.nodes[0].node.neighbours().len(),
        1,
        "the squatter stays"
    );
}

#[test]
fn a_splice_is_granted_only_to_neighbours_that_both_asked() {
    let mut sim = Sim::new(3, 1, |_| {});
    sim.connect(1, 0);
    sim.connect(2, 0);
    // A course client on node 0 asks too: it is ignored.
    let now = sim.now;
    sim.node(0).link_opened(now, 9_999, addr_of(50), true);
    for line in [
        r#"{"type":"HELLO","peer_id":"c@sim","features":["ack","teia"],"ttl":1}"#,
        r#"{"type":"SPLICE_ASK","ask":"k","with":"n1@sim","ttl":1}"#,
    ] {
        sim.node(0)
            .line_received(now, 9_999, Ok(line.as_bytes().to_vec()));
    }
    sim.run(Duration::from_secs(1));
    let now = sim.now;
    sim.node(1)
        .splice_ask(now, &name(0), &name(2), "k")
        .unwrap();
    sim.node(2)
        .splice_ask(now, &name(0), &name(1), "k")
        .unwrap();
    assert_eq!(
        sim.node(1).splice_ask(now, &name(2), &name(0), "k"),
        Err(ApiError::NoNeighbour(name(2))),
        "only a neighbour is asked"
    );
    sim.run(Duration::from_secs(1));
    let mut broker = crate::splice::SpliceBroker::new();
    let asks: Vec<(String, String, String)> = sim.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SpliceAsked { peer, with, ask } => {
                Some((peer.clone(), with.clone(), ask.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        asks.len(),
        2,
        "the course client's ask is not heard: {asks:?}"
    );
    let mut answers = Vec::new();
    for (i, (peer, with, ask)) in asks.iter().enumerate() {
        let tokens = [format!("t{i}a"), format!("t{i}b")];
        answers.extend(broker.ask(now, peer, with, ask, tokens));
    }
    for answer in answers {
        let now = sim.now;
        sim.node(0).splice_answer(now, answer);
    }
    sim.run(Duration::from_secs(1));
    for (me, other) in [(1, 2), (2, 1)] {
        let grants: Vec<(SocketAddr, String)> = sim.nodes[me]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::SpliceGranted {
                    relay,
                    with,
                    ask,
                    token,
                    addr,
                } if *relay == name(0) && *with == name(other) && ask == "k" => {
                    Some((*addr, token.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(grants.len(), 1, "n{me}: {:?}", sim.nodes[me].events);
        assert_eq!(grants[0].0, addr_of(0));
        assert!(broker.join(sim.now, &grants[0].1).is_ok());
    }
}

#[test]
fn a_query_floods_once_per_node_within_its_ttl_and_hits_come_back() {
    let mut sim = Sim::new(120, 11, |_| {});
    random_topology(&mut sim, 11, 60);
    sim.run(Duration::from_secs(2));
    let dist = sim.distances(0);
    let now = sim.now;
    let query_id = sim
        .node(0)
        .query(now, "files", serde_json::json!({"text": "video"}), 3);
    sim.run(Duration::from_secs(1));
    for (index, distance) in dist.iter().enumerate().skip(1) {
        let heard: Vec<String> = sim.nodes[index]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Query { query_id: q, .. } if *q == query_id => Some(q.clone()),
                _ => None,
            })
            .collect();
        let within = distance.is_some_and(|d| d <= 3);
        assert_eq!(
            heard.len(),
            usize::from(within),
            "node {index} at {distance:?}"
        );
        if within {
            let now = sim.now;
            sim.node(index)
                .answer(now, &query_id, serde_json::json!({"name": name(index)}));
        }
    }
    sim.run(Duration::from_secs(1));
    let hits = sim.nodes[0]
        .events
        .iter()
        .filter(|e| matches!(e, Event::QueryHit { query_id: q, .. } if *q == query_id))
        .count();
    let expected = (1..sim.nodes.len())
        .filter(|i| dist[*i].is_some_and(|d| d <= 3))
        .count();
    assert!(expected > 3, "the topology reaches a few nodes");
    assert_eq!(hits, expected, "every answer came back along its path");
}
