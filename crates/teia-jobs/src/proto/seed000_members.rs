//! Seed 000's own nodes as workers of a teia node, sans-IO: their nodes join a node started
//! with `--pytest-port` (they send `CONNECT` to the address they are given), and run modules
//! of the evaluations it owns, under the same lease rules as teia's workers.
//!
//! The node answers `CONNECT` with `CONNECT_REP` (a new id, the same again for the same
//! address), heartbeats its members, sends `CACHE_UPDATE`s naming no evaluation (so that
//! their failure detector finds its entry and starts no election over it), announces each
//! project of its evaluations under way (`PROJECT_ANNOUNCE`: their workers fetch a project
//! only then, from `GET /file/<project_id>`), and `TASK_ANNOUNCE`s while modules wait. A
//! `TASK_REQUEST` asks the runtime for a lease ([`MemberAction::Lease`]); the module leased
//! goes out in a `TASK_SEND`, and is renewed while its member heartbeats and has
//! confirmed it ([`CONFIRM_WAIT`]). A result (`POST /task`) counts only for a task handed to
//! the member whose address it comes from and names ([`Members::result`]), and only while
//! it holds the lease; the engine checks the lease again.
//!
//! Only modules `tests/<name>.py` go to their nodes: they run `tests/<module>` of a project.
//!
//! **Bounds**: [`MAX_PEERS`] members (a `CONNECT` past it gets no answer); [`MAX_GIVEN`]
//! ids remembered by address (the oldest forgotten); [`MAX_HANDED`] modules per member at
//! once (a `TASK_REQUEST` past it is not answered); a module handed is taken back when not
//! confirmed within [`CONFIRM_WAIT`], when its member is silent for [`MEMBER_SILENT`], or
//! after [`RUN_LIMIT`].

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::ledger::{EvalId, Lease};
use super::seed000::{
    decode, plain_name, FrameError, Outgoing, CACHE_EVERY, HEARTBEAT_EVERY, MAX_PEERS,
};

/// Time between two `TASK_ANNOUNCE`s while modules wait (as their nodes).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// A member not heard from for this long is gone (their nodes' own rule); the modules it
/// held are taken back when their leases run out.
pub const MEMBER_SILENT: Duration = Duration::from_secs(21);
/// Time a member has to confirm a module sent; then it goes to another.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// Time a member may hold a module after confirming it (their nodes kill a module after
/// 25 s, and install a project's requirements first).
pub const RUN_LIMIT: Duration = Duration::from_secs(300);
/// A member's lease lasts this long from its last renewal (every [`RENEW_EVERY`]).
pub const LEASE_MS: u64 = 5_000;
/// Time between two renewals of the leases members hold.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Modules one member holds at once at most.
pub const MAX_HANDED: usize = 2;
/// Ids given, remembered by address.
pub const MAX_GIVEN: usize = 1024;

/// A project of ours their nodes may fetch and run modules of.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Offer {
    /// Its evaluation.
    pub eval: EvalId,
    /// Its name in the evaluation.
    pub project: String,
    /// Its bytes' hash.
    pub blob: String,
}

impl Offer {
    /// Its id on their side (a folder name in their nodes' working directory).
    pub fn course_id(&self) -> String {
        let short = self.blob.get(..16).unwrap_or(&self.blob);
        format!("teia-{}-{short}", self.eval)
    }
}

/// What the worker names of course nodes start with.
const COURSE_WORKER: &str = "seed000@";

/// The worker name a member's leases are held under.
pub fn worker_key(member: SocketAddr) -> String {
    format!("{COURSE_WORKER}{member}")
}

/// Whether `worker` names a course node (its results prove nothing beyond its word).
pub fn is_course_worker(worker: &str) -> bool {
    worker.starts_with(COURSE_WORKER)
}

/// The name their nodes run a module by (`tests/<name>`), if they can run it.
pub fn course_module(path: &str) -> Option<&str> {
    path.strip_prefix("tests/")
        .filter(|name| !name.contains('/') && plain_name(name))
}

/// Why a result was not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskRefusal {
    /// The body lacks a field or has one of the wrong type.
    #[error("the result has no valid {0}")]
    Malformed(&'static str),
    /// No module of that id is handed to anyone (never, or taken back).
    #[error("no such task is handed out")]
    UnknownTask,
    /// The module is handed to another node than the one that sent the result.
    #[error("the task is not held by the sender")]
    NotTheHolder,
    /// The engine no longer counts that lease (taken back, or done by another).
    #[error("the lease is no longer held")]
    LeaseLost,
}

/// A result accepted by [`Members::result`], for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Counted {
    /// The lease it is for.
    pub lease: Lease,
    /// The worker name it is held under.
    pub worker: String,
    /// The member's address.
    pub member: SocketAddr,
    /// Tests passed.
    pub passed: u32,
    /// Tests failed (their nodes count errors as failures).
    pub failed: u32,
    /// Seconds.
    pub seconds: f64,
}

/// What happened, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberNote {
    /// A node joined, with this id.
    Joined {
        /// Its address.
        addr: SocketAddr,
        /// The id given.
        id: String,
    },
    /// A member went silent.
    Gone {
        /// Its address.
        addr: SocketAddr,
    },
    /// A module was handed out.
    Handed {
        /// The task id.
        task: String,
        /// The member.
        to: SocketAddr,
    },
}

/// What the runtime is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberAction {
    /// Send this.
    Send(Outgoing),
    /// Lease a module for `member` (one of [`course_module`]'s), then call
    /// [`Members::hand`] with it.
    Lease {
        /// The member asking.
        member: SocketAddr,
    },
    /// Renew the lease for [`LEASE_MS`].
    Renew {
        /// The lease.
        lease: Lease,
        /// Its worker name.
        worker: String,
    },
    /// Give the module back: its member never started it.
    Release {
        /// The lease.
        lease: Lease,
        /// Its worker name.
        worker: String,
    },
    /// The project's ZIP for their nodes is no longer needed.
    Forget {
        /// Its id on their side.
        course_id: String,
    },
    /// Log this.
    Note(MemberNote),
}

#[derive(Debug)]
struct Member {
    id: String,
    heard: Instant,
}

#[derive(Debug)]
struct Handed {
    lease: Lease,
    member: SocketAddr,
    sent: Instant,
    confirmed: Option<Instant>,
}

/// Seed 000's nodes working for this node.
#[derive(Debug)]
pub struct Members {
    me: SocketAddr,
    id: String,
    api_port: u16,
    id_base: u64,
    issued: u64,
    members: BTreeMap<SocketAddr, Member>,
    given: BTreeMap<SocketAddr, String>,
    given_order: VecDeque<SocketAddr>,
    offers: BTreeMap<String, Offer>,
    pending: bool,
    handed: BTreeMap<String, Handed>,
    next_heartbeat: Option<Instant>,
    next_cache: Option<Instant>,
    next_announce: Option<Instant>,
    next_renew: Option<Instant>,
    actions: VecDeque<MemberAction>,
}

impl Members {
    /// This node at `me` (its advertised UDP address), known to their nodes as `id`, with
    /// its HTTP API on `api_port`; ids it gives start from `id_base` (Unix microseconds, as
    /// theirs).
    pub fn new(me: SocketAddr, id: String, api_port: u16, id_base: u64) -> Self {
        Self {
            me,
            id,
            api_port,
            id_base,
            issued: 0,
            members: BTreeMap::new(),
            given: BTreeMap::new(),
            given_order: VecDeque::new(),
            offers: BTreeMap::new(),
            pending: false,
            handed: BTreeMap::new(),
            next_heartbeat: None,
            next_cache: None,
            next_announce: None,
            next_renew: None,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<MemberAction> {
        self.actions.pop_front()
    }

    /// When [`Members::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silent = self.members.values().map(|m| m.heard + MEMBER_SILENT).min();
        [
            self.next_heartbeat,
            self.next_cache,
            self.next_announce,
            self.next_renew,
            silent,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether `ip` is a member's, and `course_id` a project announced: what `GET /file`
    /// serves, and to whom.
    pub fn offer_for(&self, ip: IpAddr, course_id: &str) -> Option<&Offer> {
        if !self.members.keys().any(|m| m.ip() == ip) {
            return None;
        }
        self.offers.get(course_id)
    }

    /// The projects under way and whether modules wait: new projects are announced to every
    /// member, and ones no longer under way forgotten.
    pub fn set_offers(&mut self, offers: Vec<Offer>, pending: bool, now: Instant) {
        let fresh: BTreeMap<String, Offer> =
            offers.into_iter().map(|o| (o.course_id(), o)).collect();
        for gone in self.offers.keys().filter(|id| !fresh.contains_key(*id)) {
            self.actions.push_back(MemberAction::Forget {
                course_id: gone.clone(),
            });
        }
        let new: Vec<Offer> = fresh
            .iter()
            .filter(|(id, _)| !self.offers.contains_key(*id))
            .map(|(_, o)| o.clone())
            .collect();
        self.offers = fresh;
        let members: Vec<SocketAddr> = self.members.keys().copied().collect();
        for offer in &new {
            for member in &members {
                self.announce(*member, offer);
            }
        }
        if pending && !self.pending {
            self.next_announce = Some(now);
        }
        self.pending = pending;
    }

    /// A datagram came; anything not understood is dropped.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<(), FrameError> {
        let envelope = decode(datagram)?;
        let from = envelope.from;
        let data = &envelope.data;
        match envelope.cmd.as_str() {
            "CONNECT" => self.on_connect(now, from),
            "HEARTBEAT" => {
                if let Some(member) = self.members.get_mut(&from) {
                    member.heard = now;
                } else if let Some(id) = data.get("id").and_then(Value::as_str) {
                    // A node of their network that learned of this one from another.
                    if plain_name(id) && self.members.len() < MAX_PEERS {
                        self.add(now, from, id.to_owned());
                    }
                }
            }
            "TASK_REQUEST" => {
                let held = self.handed.values().filter(|h| h.member == from).count();
                if self.members.contains_key(&from) && held < MAX_HANDED {
                    self.actions.push_back(MemberAction::Lease { member: from });
                }
            }
            "TASK_CONFIRM" => {
                let task = data.get("task_id").and_then(Value::as_str);
                if let Some(handed) = task.and_then(|t| self.handed.get_mut(t)) {
                    if handed.member == from && handed.confirmed.is_none() {
                        handed.confirmed = Some(now);
                    }
                }
            }
            "RECOVERY_ELECTION" => {
                // Never a candidate: this node recovers no one's evaluations. The failed
                // node is dropped; the modules it held come back when their leases end.
                if let Some(failed) = data.get("failed_node").and_then(Value::as_str) {
                    let gone: Vec<SocketAddr> = self
                        .members
                        .iter()
                        .filter(|(_, m)| m.id == failed)
                        .map(|(a, _)| *a)
                        .collect();
                    for addr in gone {
                        self.remove(addr);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_connect(&mut self, now: Instant, from: SocketAddr) {
        if !self.members.contains_key(&from) && self.members.len() >= MAX_PEERS {
            return;
        }
        let id = match self.given.get(&from) {
            Some(id) => id.clone(),
            None => {
                self.issued += 1;
                let id = format!("{}{:05}", self.id_base + self.issued, self.issued % 100_000);
                if self.given.len() >= MAX_GIVEN {
                    if let Some(oldest) = self.given_order.pop_front() {
                        self.given.remove(&oldest);
                    }
                }
                self.given.insert(from, id.clone());
                self.given_order.push_back(from);
                id
            }
        };
        let peers = self.peer_table(Some(from));
        self.send(
            from,
            "CONNECT_REP",
            json!({"peers": peers, "id": self.id, "given_id": id}),
        );
        self.add(now, from, id);
    }

    fn add(&mut self, now: Instant, addr: SocketAddr, id: String) {
        self.members.insert(
            addr,
            Member {
                id: id.clone(),
                heard: now,
            },
        );
        self.actions
            .push_back(MemberAction::Note(MemberNote::Joined { addr, id }));
        let offers: Vec<Offer> = self.offers.values().cloned().collect();
        for offer in &offers {
            self.announce(addr, offer);
        }
        self.next_heartbeat.get_or_insert(now);
        self.next_cache.get_or_insert(now);
    }

    fn remove(&mut self, addr: SocketAddr) {
        if self.members.remove(&addr).is_some() {
            self.handed.retain(|_, h| h.member != addr);
            self.actions
                .push_back(MemberAction::Note(MemberNote::Gone { addr }));
        }
    }

    fn announce(&mut self, to: SocketAddr, offer: &Offer) {
        self.send(
            to,
            "PROJECT_ANNOUNCE",
            json!({
                "project_id": offer.course_id(),
                "api_port": self.api_port.to_string(),
                "project_name": offer.project,
                "eval_id": offer.eval.to_string(),
                "url": null,
                "token": null,
                "type": 0,
            }),
        );
    }

    /// The module the runtime leased for `member` (`None`: none to give); sent in a
    /// `TASK_SEND`, or given back when it cannot be.
    pub fn hand(&mut self, now: Instant, member: SocketAddr, lease: Option<Lease>) {
        let Some(lease) = lease else {
            return;
        };
        let offer = self
            .offers
            .values()
            .find(|o| o.eval == lease.eval && o.project == lease.project)
            .cloned();
        let module = course_module(&lease.module).map(str::to_owned);
        let (Some(offer), Some(module), true) = (offer, module, self.members.contains_key(&member))
        else {
            self.actions.push_back(MemberAction::Release {
                worker: worker_key(member),
                lease,
            });
            return;
        };
        let task = format!("{}::{module}", offer.course_id());
        self.send(
            member,
            "TASK_SEND",
            json!({"id": self.id, "info": {
                "project_id": offer.course_id(),
                "module": module,
                "project_name": offer.project,
                "api_port": self.api_port.to_string(),
                "eval_id": offer.eval.to_string(),
                "url": null,
                "token": null,
                "type": "zip",
            }}),
        );
        self.actions
            .push_back(MemberAction::Note(MemberNote::Handed {
                task: task.clone(),
                to: member,
            }));
        // The same module handed again (its earlier lease ended) replaces the earlier one,
        // whose result no longer counts.
        self.handed.insert(
            task,
            Handed {
                lease,
                member,
                sent: now,
                confirmed: None,
            },
        );
        self.next_renew.get_or_insert(now + RENEW_EVERY);
    }

    /// A result posted by `source` (`POST /task`, their body
    /// `{"task_id","passed","failed","time","project_id","module","ip","port"}`): counted
    /// only from the member the task is handed to, at the address it names.
    pub fn result(&mut self, source: IpAddr, body: &Value) -> Result<Counted, TaskRefusal> {
        let task = body
            .get("task_id")
            .and_then(Value::as_str)
            .ok_or(TaskRefusal::Malformed("task_id"))?;
        let count = |field: &'static str| {
            body.get(field)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(TaskRefusal::Malformed(field))
        };
        let (passed, failed) = (count("passed")?, count("failed")?);
        let seconds = body
            .get("time")
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(0.0);
        let ip: Option<IpAddr> = body
            .get("ip")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let port: Option<u16> = match body.get("port") {
            Some(Value::String(s)) => s.parse().ok(),
            Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
            _ => None,
        };
        let named = match (ip, port) {
            (Some(ip), Some(port)) => SocketAddr::new(ip, port),
            _ => return Err(TaskRefusal::Malformed("ip and port")),
        };
        let handed = self.handed.get(task).ok_or(TaskRefusal::UnknownTask)?;
        if handed.member != named || named.ip() != source {
            return Err(TaskRefusal::NotTheHolder);
        }
        let handed = self.handed.remove(task).ok_or(TaskRefusal::UnknownTask)?;
        Ok(Counted {
            worker: worker_key(handed.member),
            member: handed.member,
            lease: handed.lease,
            passed,
            failed,
            seconds,
        })
    }

    /// Time passed: heartbeats, counters, announces, renewals, and what timed out.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|(_, m)| now >= m.heard + MEMBER_SILENT)
            .map(|(a, _)| *a)
            .collect();
        for addr in silent {
            self.remove(addr);
        }
        if self.members.is_empty() {
            self.next_heartbeat = None;
            self.next_cache = None;
        }
        if self.next_renew.is_some_and(|t| now >= t) {
            self.next_renew = (!self.handed.is_empty()).then_some(now + RENEW_EVERY);
            let mut unconfirmed = Vec::new();
            let mut overdue = Vec::new();
            for (task, handed) in &self.handed {
                match handed.confirmed {
                    None if now >= handed.sent + CONFIRM_WAIT => unconfirmed.push(task.clone()),
                    Some(at) if now >= at + RUN_LIMIT => overdue.push(task.clone()),
                    _ => self.actions.push_back(MemberAction::Renew {
                        lease: handed.lease.clone(),
                        worker: worker_key(handed.member),
                    }),
                }
            }
            for task in unconfirmed {
                if let Some(handed) = self.handed.remove(&task) {
                    self.actions.push_back(MemberAction::Release {
                        worker: worker_key(handed.member),
                        lease: handed.lease,
                    });
                }
            }
            // Past its run limit a module is no longer renewed: its lease ends and it goes
            // to another worker as a new attempt.
            for task in overdue {
                self.handed.remove(&task);
            }
        }
        if self.next_heartbeat.is_some_and(|t| now >= t) {
            self.next_heartbeat = Some(now + HEARTBEAT_EVERY);
            let data = json!({"id": self.id, "peers": self.peer_table(None)});
            self.send_to_members("HEARTBEAT", &data);
        }
        if self.next_cache.is_some_and(|t| now >= t) {
            self.next_cache = Some(now + CACHE_EVERY);
            let data = json!({
                "addr": self.me.to_string(),
                "peers_ip": self.members.keys().map(ToString::to_string).collect::<Vec<_>>(),
                "evaluations": {},
                "projects": {},
                "stats": {"failed": 0, "passed": 0, "projects": 0, "modules": 0,
                          "evaluations": [], "submitted_evaluation": []},
            });
            self.send_to_members("CACHE_UPDATE", &data);
        }
        if self.next_announce.is_some_and(|t| now >= t) {
            if self.pending && !self.members.is_empty() {
                self.next_announce = Some(now + ANNOUNCE_EVERY);
                self.send_to_members("TASK_ANNOUNCE", &json!({"id": self.id}));
            } else {
                self.next_announce = None;
            }
        }
    }

    /// The members as their peer tables hold them, `{id: [ip, port]}`, but `except`.
    fn peer_table(&self, except: Option<SocketAddr>) -> Map<String, Value> {
        self.members
            .iter()
            .filter(|(addr, _)| Some(**addr) != except)
            .map(|(addr, m)| (m.id.clone(), json!([addr.ip().to_string(), addr.port()])))
            .collect()
    }

    fn send_to_members(&mut self, cmd: &'static str, data: &Value) {
        let members: Vec<SocketAddr> = self.members.keys().copied().collect();
        for to in members {
            self.send(to, cmd, data.clone());
        }
    }

    fn send(&mut self, to: SocketAddr, cmd: &'static str, data: Value) {
        self.actions
            .push_back(MemberAction::Send(Outgoing { to, cmd, data }));
    }
}

#[cfg(test)]
mod tests {
    use super::super::seed000::testing::{addr, datagram};
    use super::*;

    const ME: &str = "127.0.0.1:7000";
    const THEIRS: &str = "127.0.0.1:8002";

    fn drain(members: &mut Members) -> Vec<MemberAction> {
        std::iter::from_fn(|| members.poll_action()).collect()
    }

    fn sent(actions: &[MemberAction], cmd: &str) -> Vec<(SocketAddr, Value)> {
        let sends = actions.iter().filter_map(|a| match a {
            MemberAction::Send(o) => Some(o),
            _ => None,
        });
        super::super::seed000::testing::sent(sends, cmd)
    }

    fn offer() -> Offer {
        Offer {
            eval: 7,
            project: "calc".into(),
            blob: "0123456789abcdef0123".into(),
        }
    }

    fn lease(module: &str) -> Lease {
        Lease {
            eval: 7,
            project: "calc".into(),
            blob: "0123456789abcdef0123".into(),
            module: module.into(),
            attempt: 0,
            selection: Vec::new(),
            piece: None,
        }
    }

    fn joined(now: Instant) -> Members {
        let mut members = Members::new(addr(ME), "100".into(), 5001, 1_000);
        members.set_offers(vec![offer()], true, now);
        members
            .handle_datagram(now, &datagram(THEIRS, "CONNECT", json!({})))
            .unwrap();
        members
    }

    #[test]
    fn a_node_that_connects_gets_an_id_kept_for_its_address_and_the_projects() {
        let now = Instant::now();
        let mut members = joined(now);
        let actions = drain(&mut members);
        let reply = sent(&actions, "CONNECT_REP");
        assert_eq!(reply[0].0, addr(THEIRS));
        let given = reply[0].1["given_id"].as_str().unwrap().to_owned();
        assert_eq!(reply[0].1["id"], "100");
        let announce = sent(&actions, "PROJECT_ANNOUNCE");
        assert_eq!(announce[0].1["project_id"], "teia-7-0123456789abcdef");
        assert_eq!(announce[0].1["api_port"], "5001");
        assert_eq!(announce[0].1["type"], 0);
        members
            .handle_datagram(now, &datagram(THEIRS, "CONNECT", json!({})))
            .unwrap();
        let again = sent(&drain(&mut members), "CONNECT_REP");
        assert_eq!(again[0].1["given_id"], given.as_str());
        assert!(members
            .offer_for(addr(THEIRS).ip(), "teia-7-0123456789abcdef")
            .is_some());
        assert!(members
            .offer_for("10.0.0.9".parse().unwrap(), "teia-7-0123456789abcdef")
            .is_none());
        members.handle_timeout(now);
        let actions = drain(&mut members);
        assert_eq!(sent(&actions, "HEARTBEAT").len(), 1);
        assert_eq!(sent(&actions, "TASK_ANNOUNCE").len(), 1);
        let cache = sent(&actions, "CACHE_UPDATE");
        assert_eq!(cache[0].1["addr"], ME);
        assert_eq!(cache[0].1["stats"]["submitted_evaluation"], json!([]));
    }

    #[test]
    fn a_result_counts_only_from_the_member_holding_the_task() {
        let now = Instant::now();
        let mut members = joined(now);
        members
            .handle_datagram(now, &datagram(THEIRS, "TASK_REQUEST", json!({"id": "x"})))
            .unwrap();
        let actions = drain(&mut members);
        assert!(actions.contains(&MemberAction::Lease {
            member: addr(THEIRS)
        }));
        members.hand(now, addr(THEIRS), Some(lease("tests/test_a.py")));
        let send = sent(&drain(&mut members), "TASK_SEND");
        assert_eq!(send[0].1["info"]["module"], "test_a.py");
        let task = "teia-7-0123456789abcdef::test_a.py";
        members
            .handle_datagram(
                now,
                &datagram(THEIRS, "TASK_CONFIRM", json!({"task_id": task})),
            )
            .unwrap();
        let body = |ip: &str, port: &str| {
            json!({"task_id": task, "passed": 3, "failed": 1, "time": 0.5,
                "project_id": "teia-7-0123456789abcdef", "module": "test_a.py",
                "ip": ip, "port": port})
        };
        let local = addr(THEIRS).ip();
        assert_eq!(
            members.result(local, &body("127.0.0.1", "8003")),
            Err(TaskRefusal::NotTheHolder)
        );
        assert_eq!(
            members.result("10.0.0.2".parse().unwrap(), &body("127.0.0.1", "8002")),
            Err(TaskRefusal::NotTheHolder)
        );
        let counted = members.result(local, &body("127.0.0.1", "8002")).unwrap();
        assert_eq!((counted.passed, counted.failed), (3, 1));
        assert_eq!(counted.worker, "seed000@127.0.0.1:8002");
        assert_eq!(
            members.result(local, &body("127.0.0.1", "8002")),
            Err(TaskRefusal::UnknownTask)
        );
    }

    #[test]
    fn unconfirmed_modules_go_back_and_silent_members_are_dropped() {
        let now = Instant::now();
        let mut members = joined(now);
        members.hand(now, addr(THEIRS), Some(lease("tests/test_a.py")));
        // A module in a subfolder is not theirs to run: given back at once.
        members.hand(now, addr(THEIRS), Some(lease("tests/unit/test_b.py")));
        let actions = drain(&mut members);
        assert!(actions.iter().any(|a| matches!(a,
            MemberAction::Release { lease, .. } if lease.module == "tests/unit/test_b.py")));
        members.handle_timeout(now + RENEW_EVERY);
        assert!(drain(&mut members)
            .iter()
            .any(|a| matches!(a, MemberAction::Renew { .. })));
        members.handle_timeout(now + CONFIRM_WAIT);
        assert!(drain(&mut members).iter().any(|a| matches!(a,
            MemberAction::Release { lease, .. } if lease.module == "tests/test_a.py")));
        members.handle_timeout(now + MEMBER_SILENT);
        assert!(drain(&mut members)
            .contains(&MemberAction::Note(MemberNote::Gone { addr: addr(THEIRS) })));
        assert!(members
            .offer_for(addr(THEIRS).ip(), "teia-7-0123456789abcdef")
            .is_none());
    }
}
