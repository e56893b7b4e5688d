//! Seed 001's master/worker messages, sans-IO: reading them in both envelopes the course's
//! workers use (flat `{"action":"REGISTER",...}` and `{"type":"REGISTER","data":{...}}`),
//! one JSON object per TCP connection with no newline and no length prefix (read
//! incrementally: a reply never waits for the peer to close), replying in the envelope
//! asked in, and the master's task table: each task leased to one worker, handed to
//! another when its worker stops heartbeating or its lease runs out, a result counted only
//! from the worker holding its task's lease (a course worker being its `peer_id` and source
//! address: [`WorkerKey`]). Also the rules at accept: the networks allowed to connect
//! ([`Cidr`], [`Gate`]) with a few connections per source, and the bytes of messages being
//! received, all connections together ([`Budget`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Largest message read: a result is a ZIP of stdout and stderr, in base64.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Largest `TASK_PACKAGE` written: one known worker reads it with a single `recv` of
/// 64 KiB, so a larger task is not handed to course workers.
pub const MAX_PACKAGE: usize = 64 * 1024;

/// A worker that has not sent a heartbeat (or any message) for this long is gone: its
/// task goes to another.
pub const WORKER_SILENT: Duration = Duration::from_secs(15);

/// Time a worker has to return a task's result.
pub const LEASE: Duration = Duration::from_secs(300);

/// Workers tracked; past it, the longest silent without a task is forgotten, and if all
/// hold tasks, a new worker is refused.
pub const MAX_WORKERS: usize = 1024;

/// Tasks queued or leased at once; past it, new ones wait in the folder until there is
/// room (the folder is scanned again every second).
pub const MAX_TASKS: usize = 100_000;

/// Times a task may fail to run (its ZIP cannot be unpacked, has no `main.py`, the worker
/// cannot start Python) before it is given up, with the reason as its result.
pub const MAX_FAILURES: u32 = 3;

/// How a message was wrapped, so that its answer is wrapped the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"action": NAME, ...fields}`; answers `{"status": ...}` or `{"action": ...}`.
    Flat,
    /// `{"type": NAME, "data": {...fields}}`; answers `{"type": ..., "data": {...}}`.
    Typed,
}

/// A worker's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// UDP: where is the master?
    DiscoverMaster,
    /// Join.
    Register {
        /// The worker's id.
        peer_id: String,
    },
    /// Still alive.
    Heartbeat {
        /// The worker's id.
        peer_id: String,
    },
    /// Give me a task.
    RequestTask {
        /// The worker's id.
        peer_id: String,
    },
    /// A task's result.
    SubmitResult {
        /// The worker's id.
        peer_id: String,
        /// The task it names, if it does (`task_name`, or `result_name` when that is the
        /// task's name).
        task: Option<String>,
        /// The result: a ZIP with `stdout.txt` and `stderr.txt`, in base64.
        data: String,
    },
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Over [`MAX_MESSAGE`] bytes.
    #[error("message over {MAX_MESSAGE} bytes")]
    TooLarge,
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but not a message of seed 001.
    #[error("not a seed 001 message: {0}")]
    Unknown(String),
    /// A field is missing or of the wrong kind.
    #[error("{action}: missing or bad `{field}`")]
    Field {
        /// The message.
        action: String,
        /// The field.
        field: &'static str,
    },
}

/// Reads one JSON object from bytes as they arrive on a connection.
#[derive(Debug, Default)]
pub struct Framer {
    buffer: Vec<u8>,
}

impl Framer {
    /// Adds `bytes`; returns the object once it is whole (`Ok(None)`: not yet).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Value>, MessageError> {
        if self.buffer.len() + bytes.len() > MAX_MESSAGE {
            return Err(MessageError::TooLarge);
        }
        self.buffer.extend_from_slice(bytes);
        // An object is whole only when it ends with `}`: no parse before (a result of
        // megabytes comes in many reads).
        let last = self.buffer.iter().rev().find(|b| !b.is_ascii_whitespace());
        if last != Some(&b'}') && !bytes.is_empty() {
            return Ok(None);
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match values.next() {
            None => Ok(None),
            Some(Ok(value)) => Ok(Some(value)),
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(MessageError::NotJson(e.to_string())),
        }
    }

    /// The object the peer sent before closing, if whole.
    pub fn finish(&mut self) -> Result<Value, MessageError> {
        match self.push(&[]) {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(MessageError::NotJson("the message ends early".into())),
            Err(e) => Err(e),
        }
    }
}

/// Reads a message in either envelope.
pub fn parse(value: &Value) -> Result<(Envelope, Request), MessageError> {
    let object = value
        .as_object()
        .ok_or_else(|| MessageError::Unknown("not an object".into()))?;
    let (envelope, action, fields) = match (object.get("action"), object.get("type")) {
        (Some(Value::String(action)), _) => (Envelope::Flat, action.as_str(), object),
        (None, Some(Value::String(kind))) => {
            let data = match object.get("data") {
                Some(Value::Object(data)) => data,
                _ => object,
            };
            (Envelope::Typed, kind.as_str(), data)
        }
        _ => return Err(MessageError::Unknown("no `action` nor `type`".into())),
    };
    let text = |field: &'static str| -> Result<String, MessageError> {
        match fields.get(field) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(MessageError::Field {
                action: action.to_owned(),
                field,
            }),
        }
    };
    let request = match action {
        "DISCOVER_MASTER" => Request::DiscoverMaster,
        "REGISTER" => Request::Register {
            peer_id: text("peer_id")?,
        },
        "HEARTBEAT" => Request::Heartbeat {
            peer_id: text("peer_id")?,
        },
        "REQUEST_TASK" => Request::RequestTask {
            peer_id: text("peer_id")?,
        },
        "SUBMIT_RESULT" => {
            let data = ["result_data", "data", "result"]
                .iter()
                .find_map(|f| fields.get(*f).and_then(Value::as_str))
                .ok_or(MessageError::Field {
                    action: action.to_owned(),
                    field: "result_data",
                })?;
            let task = ["task_name", "result_name", "task"]
                .iter()
                .find_map(|f| text(f).ok());
            Request::SubmitResult {
                peer_id: text("peer_id")?,
                task,
                data: data.to_owned(),
            }
        }
        other => return Err(MessageError::Unknown(format!("action {other:?}"))),
    };
    Ok((envelope, request))
}

/// A master's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To DISCOVER_MASTER.
    MasterAnnounce {
        /// Our address as the worker can reach it.
        ip: String,
        /// Our TCP port.
        port: u16,
    },
    /// To REGISTER.
    Registered,
    /// To HEARTBEAT.
    Alive,
    /// A task.
    TaskPackage {
        /// Its name (`NAME.zip`).
        name: String,
        /// The ZIP, in base64.
        data: String,
    },
    /// Nothing to do now.
    NoTasks,
    /// To SUBMIT_RESULT.
    Ok,
    /// What was wrong with the request.
    Error(String),
}

/// The bytes of `reply` in `envelope`.
pub fn encode(envelope: Envelope, reply: &Reply) -> Vec<u8> {
    let (name, fields): (&str, Map<String, Value>) = match reply {
        Reply::MasterAnnounce { ip, port } => (
            "MASTER_ANNOUNCE",
            map(json!({"master_ip": ip, "master_port": port})),
        ),
        Reply::Registered => ("REGISTERED", Map::new()),
        Reply::Alive => ("ALIVE", Map::new()),
        Reply::TaskPackage { name, data } => (
            "TASK_PACKAGE",
            map(json!({"task_name": name, "task_data": data})),
        ),
        Reply::NoTasks => ("NO_TASKS", Map::new()),
        Reply::Ok => ("OK", Map::new()),
        Reply::Error(message) => ("ERROR", map(json!({"message": message}))),
    };
    let value = match envelope {
        Envelope::Typed => json!({"type": name, "data": fields}),
        Envelope::Flat => {
            // Answers that are statuses in the seed's master stay statuses.
            let key = match reply {
                Reply::Registered | Reply::Alive | Reply::Ok | Reply::Error(_) => "status",
                _ => "action",
            };
            let mut object = Map::new();
            object.insert(key.to_owned(), Value::String(name.to_owned()));
            object.extend(fields);
            Value::Object(object)
        }
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

fn map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// A task of the table: its name, the size of its ZIP, and how many times it was handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// `NAME.zip`.
    pub name: String,
    /// Bytes of its ZIP.
    pub size: u64,
    /// Times it was leased.
    pub attempts: u32,
}

/// A worker as the master knows it, and so who may hold a lease and return its result.
///
/// Course workers have no keys and open a new TCP connection for each request, so a
/// connection cannot hold a lease: a course worker is the `peer_id` it gives together with
/// the IP address its requests come from. Another id, or the same id from another address,
/// is another worker. teia's own workers (the node's, and those of its cluster on their
/// encrypted streams) are named by the node and can never be matched by a course worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkerKey {
    /// A worker of teia: a name the node made (`teia:local-0`, `teia:PEER#N`).
    Teia(String),
    /// A course worker.
    Course {
        /// The `peer_id` it gives.
        peer_id: String,
        /// The address its requests come from.
        ip: IpAddr,
    },
}

impl WorkerKey {
    /// A worker of teia named `name`.
    pub fn teia(name: impl Into<String>) -> Self {
        Self::Teia(name.into())
    }

    /// A course worker giving `peer_id`, speaking from `ip` (an IPv4 address mapped in IPv6
    /// is its IPv4 address).
    pub fn course(peer_id: impl Into<String>, ip: IpAddr) -> Self {
        Self::Course {
            peer_id: peer_id.into(),
            ip: ip.to_canonical(),
        }
    }
}

impl std::fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Teia(name) => f.write_str(name),
            // The id is the worker's choice: shown escaped.
            Self::Course { peer_id, ip } => write!(f, "{}@{ip}", peer_id.escape_debug()),
        }
    }
}

#[derive(Debug)]
struct Worker {
    heard: Instant,
    /// The task it holds and until when.
    lease: Option<(String, Instant)>,
    /// The last task whose result it delivered (a result sent again is not an error).
    delivered: Option<String>,
    /// The last [`REMEMBERED`] tasks leased to it, so that a late result of one is not taken
    /// for the task it holds now.
    held_before: VecDeque<String>,
}

/// Tasks remembered per worker as leased to it before.
const REMEMBERED: usize = 8;

/// What the master's table decided for a `SUBMIT_RESULT` it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The result of this task, which is done.
    Done(Task),
    /// The worker's result of the task it delivered last, sent again: dropped (answered
    /// `OK`, the first one counts).
    Again,
}

/// Why a `SUBMIT_RESULT` was refused: a result counts only from the worker holding that
/// task's lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It names a task that is not leased to this worker (another holds it, or it waits).
    #[error("{task} is not leased to you")]
    NotYours {
        /// The name it gave.
        task: String,
    },
    /// It names no task, and the worker holds none.
    #[error("you hold no task")]
    NoLease,
}

/// What the master's table decided for a task its worker could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// It waits again, last in line.
    Retry,
    /// It failed [`MAX_FAILURES`] times: it is dropped, for the caller to record why.
    GiveUp(Task),
    /// The worker held no task.
    Unmatched,
}

/// The names a result named `named` may mean: itself, without `result_`, each with and
/// without `.zip`.
fn meanings(named: &str) -> impl Iterator<Item = String> + '_ {
    let bare = named.strip_prefix("result_");
    [Some(named), bare].into_iter().flatten().flat_map(|name| {
        let other = match name.strip_suffix(".zip") {
            Some(stem) => stem.to_owned(),
            None => format!("{name}.zip"),
        };
        [name.to_owned(), other]
    })
}

/// The master's tasks and workers.
#[derive(Debug, Default)]
pub struct Master {
    /// Names of the tasks waiting or leased.
    names: HashSet<String>,
    waiting: VecDeque<Task>,
    leased: BTreeMap<String, Task>,
    workers: HashMap<WorkerKey, Worker>,
    /// Times each task waiting or leased failed to run (none when it never did).
    failures: HashMap<String, u32>,
    /// Changes to the tasks so far (added, leased, done, given back, failed, expired).
    changes: u64,
}

/// Bytes of a task's ZIP a course worker can be handed: base64 makes 4 bytes of 3, and the
/// envelope takes a few hundred of [`MAX_PACKAGE`].
pub const COURSE_TASK_FITS: u64 = (MAX_PACKAGE as u64 - 512) / 4 * 3;

impl Master {
    /// Course workers heard within [`WORKER_SILENT`] before `now`.
    pub fn course_workers(&self, now: Instant) -> usize {
        self.workers
            .iter()
            .filter(|(key, worker)| {
                matches!(key, WorkerKey::Course { .. })
                    && now.saturating_duration_since(worker.heard) < WORKER_SILENT
            })
            .count()
    }

    /// Adds a task to hand out (a name already waiting or leased is ignored, and so is any
    /// past [`MAX_TASKS`]).
    pub fn add(&mut self, name: &str, size: u64) -> bool {
        if self.names.len() >= MAX_TASKS || self.names.contains(name) {
            return false;
        }
        self.names.insert(name.to_owned());
        self.waiting.push_back(Task {
            name: name.to_owned(),
            size,
            attempts: 0,
        });
        self.changes += 1;
        true
    }

    /// Changes to the tasks so far: one who follows the tasks compares it with the last
    /// seen.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Tasks waiting and leased.
    pub fn counts(&self) -> (usize, usize) {
        (self.waiting.len(), self.leased.len())
    }

    /// Whether `name` is waiting (`Some(false)`), leased (`Some(true)`) or neither.
    pub fn leased(&self, name: &str) -> Option<bool> {
        if self.leased.contains_key(name) {
            Some(true)
        } else {
            self.names.contains(name).then_some(false)
        }
    }

    /// The worker holding `name`, if it is leased.
    pub fn holder(&self, name: &str) -> Option<&WorkerKey> {
        self.workers
            .iter()
            .find(|(_, w)| w.lease.as_ref().is_some_and(|(held, _)| held == name))
            .map(|(key, _)| key)
    }

    /// Notes that `worker` spoke; false when the table of workers is full.
    pub fn heard(&mut self, worker: &WorkerKey, now: Instant) -> bool {
        if let Some(known) = self.workers.get_mut(worker) {
            known.heard = now;
            return true;
        }
        if self.workers.len() >= MAX_WORKERS {
            let idle = self
                .workers
                .iter()
                .filter(|(_, w)| w.lease.is_none())
                .min_by_key(|(_, w)| w.heard)
                .map(|(key, _)| key.clone());
            match idle {
                Some(key) => {
                    self.workers.remove(&key);
                }
                None => return false,
            }
        }
        self.workers.insert(
            worker.clone(),
            Worker {
                heard: now,
                lease: None,
                delivered: None,
                held_before: VecDeque::new(),
            },
        );
        true
    }

    /// A task for `worker`, whose ZIP is at most `max_size` bytes; the one it holds if it
    /// asks again.
    pub fn request(&mut self, worker: &WorkerKey, now: Instant, max_size: u64) -> Option<Task> {
        if !self.heard(worker, now) {
            return None;
        }
        if let Some((held, _)) = self.workers.get(worker).and_then(|w| w.lease.clone()) {
            if let Some(task) = self.leased.get(&held) {
                return Some(task.clone());
            }
        }
        let position = self.waiting.iter().position(|t| t.size <= max_size)?;
        let mut task = self.waiting.remove(position)?;
        task.attempts += 1;
        self.changes += 1;
        self.leased.insert(task.name.clone(), task.clone());
        if let Some(known) = self.workers.get_mut(worker) {
            known.lease = Some((task.name.clone(), now + LEASE));
            if known.held_before.len() >= REMEMBERED {
                known.held_before.pop_front();
            }
            known.held_before.push_back(task.name.clone());
        }
        Some(task)
    }

    /// A result from `worker`, naming `named` (or nothing): it counts only for the task
    /// `worker` holds. A name that means its task (`t.zip`, `t`, `result_t.zip`), or no name,
    /// is its task; a name that means another task of the table, or one leased to it before,
    /// is refused; any other name is taken as its task's under another name. A worker holding
    /// nothing that sends again the result of the task it delivered last gets
    /// [`Submitted::Again`]; anything else it sends is refused.
    pub fn submit(
        &mut self,
        worker: &WorkerKey,
        named: Option<&str>,
        now: Instant,
    ) -> Result<Submitted, Refused> {
        self.heard(worker, now);
        let (held, delivered, before) = match self.workers.get(worker) {
            Some(known) => (
                known.lease.as_ref().map(|(task, _)| task.clone()),
                known.delivered.clone(),
                known.held_before.clone(),
            ),
            None => (None, None, VecDeque::new()),
        };
        let means = |task: &str| named.is_none_or(|n| meanings(n).any(|m| m == task));
        let refused = || match named {
            Some(task) => Refused::NotYours {
                task: task.to_owned(),
            },
            None => Refused::NoLease,
        };
        let Some(held) = held else {
            return match delivered {
                Some(done) if means(&done) => Ok(Submitted::Again),
                _ => Err(refused()),
            };
        };
        if !means(&held) {
            if delivered.as_deref().is_some_and(means) {
                return Ok(Submitted::Again);
            }
            let another = |m: &String| self.names.contains(m) || before.contains(m);
            if named.is_some_and(|n| meanings(n).any(|m| another(&m))) {
                return Err(refused());
            }
        }
        let Some(task) = self.leased.remove(&held) else {
            return Err(refused());
        };
        self.names.remove(&held);
        self.failures.remove(&held);
        self.changes += 1;
        if let Some(known) = self.workers.get_mut(worker) {
            known.lease = None;
            known.delivered = Some(held);
        }
        Ok(Submitted::Done(task))
    }

    /// `worker` could not run the task it holds: it waits again, last in line, unless it
    /// failed [`MAX_FAILURES`] times.
    pub fn failed(&mut self, worker: &WorkerKey, now: Instant) -> Failed {
        self.heard(worker, now);
        let held = self.workers.get_mut(worker).and_then(|w| w.lease.take());
        let Some(task) = held.and_then(|(name, _)| self.leased.remove(&name)) else {
            return Failed::Unmatched;
        };
        self.changes += 1;
        let count = self.failures.entry(task.name.clone()).or_default();
        *count += 1;
        if *count >= MAX_FAILURES {
            self.failures.remove(&task.name);
            self.names.remove(&task.name);
            return Failed::GiveUp(task);
        }
        self.waiting.push_back(task);
        Failed::Retry
    }

    /// Notes that `worker` still runs the task it holds, which it keeps [`LEASE`] longer
    /// (teia workers say so on their stream; course workers cannot).
    pub fn renew(&mut self, worker: &WorkerKey, now: Instant) {
        if let Some(known) = self.workers.get_mut(worker) {
            known.heard = now;
            if let Some((_, until)) = known.lease.as_mut() {
                *until = now + LEASE;
            }
        }
    }

    /// Forgets `worker` (its connection ended) and takes back the task it held, if any: it
    /// waits again, first in line. Returns the task's name.
    pub fn give_back(&mut self, worker: &WorkerKey) -> Option<String> {
        let (name, _) = self.workers.remove(worker)?.lease?;
        let task = self.leased.remove(&name)?;
        self.waiting.push_front(task);
        self.changes += 1;
        Some(name)
    }

    /// Takes back the tasks of workers silent for [`WORKER_SILENT`] or past their lease:
    /// they wait again, first in line; returns their names.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut taken = Vec::new();
        for known in self.workers.values_mut() {
            let silent = now.saturating_duration_since(known.heard) >= WORKER_SILENT;
            let late = known.lease.as_ref().is_some_and(|(_, until)| now >= *until);
            if silent || late {
                if let Some((task, _)) = known.lease.take() {
                    taken.push(task);
                }
            }
        }
        self.workers
            .retain(|_, w| now.saturating_duration_since(w.heard) < WORKER_SILENT * 4);
        for name in &taken {
            if let Some(task) = self.leased.remove(name) {
                self.waiting.push_front(task);
                self.changes += 1;
            }
        }
        taken
    }
}

/// An IP network, written `ADDR/PREFIX` (`192.168.1.0/24`, `fd00::/8`); a bare address is
/// that one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("{0:?} is not an IP address (write ADDR/PREFIX, e.g. 192.168.1.0/24)")]
    Address(String),
    /// The prefix is not a number up to 32 (IPv4) or 128 (IPv6).
    #[error("prefix {prefix:?} is not a number from 0 to {max}")]
    Prefix {
        /// The prefix given.
        prefix: String,
        /// Its largest value for that kind of address.
        max: u8,
    },
}

impl Cidr {
    /// The network of `addr` with `prefix` bits (an IPv4 address mapped in IPv6 is its
    /// IPv4 address, its prefix less 96).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(CidrError::Prefix {
                prefix: prefix.to_string(),
                max,
            });
        }
        // Kept as its network's address: `192.168.1.7/24` is `192.168.1.0/24`.
        let addr = match addr {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & v4_mask(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & v6_mask(prefix)).into()),
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(net) == u32::from(ip) & v4_mask(self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(net) == u128::from(ip) & v6_mask(self.prefix)
            }
            _ => false,
        }
    }
}

/// The IPv4 netmask of `prefix` bits (at most 32).
fn v4_mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

/// The IPv6 netmask of `prefix` bits (at most 128).
fn v6_mask(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| CidrError::Address(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix {
                    prefix: prefix.to_owned(),
                    max,
                })?,
        };
        Self::new(addr, prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unwelcome {
    /// Its source is in none of the allowed networks (`--master-allow`).
    #[error("source outside the allowed networks")]
    NotAllowed,
    /// Its source already has as many connections open as it may.
    #[error("too many connections from your address")]
    TooMany,
}

/// Who may connect to the master, and how many connections each source may have open: the
/// rules at accept.
#[derive(Debug)]
pub struct Gate {
    allow: Vec<Cidr>,
    per_source: usize,
    open: HashMap<IpAddr, usize>,
}

impl Gate {
    /// Sources in `allow` may connect, `per_source` connections each at once.
    pub fn new(allow: Vec<Cidr>, per_source: usize) -> Self {
        Self {
            allow,
            per_source,
            open: HashMap::new(),
        }
    }

    /// Whether `ip` is in an allowed network.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(ip))
    }

    /// Admits a connection from `ip` (to be given back with [`Gate::leave`] when it ends).
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Unwelcome> {
        if !self.allows(ip) {
            return Err(Unwelcome::NotAllowed);
        }
        let open = self.open.entry(ip.to_canonical()).or_default();
        if *open >= self.per_source {
            return Err(Unwelcome::TooMany);
        }
        *open += 1;
        Ok(())
    }

    /// A connection admitted from `ip` ended.
    pub fn leave(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(open) = self.open.get_mut(&ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

/// Why a piece of a message was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Spent {
    /// All connections together hold as many bytes as the budget allows.
    #[error("the master is receiving too much at once; send again later")]
    Total,
    /// This source's connections hold as many bytes as one source may.
    #[error("your address is sending too much at once; send again later")]
    Source,
}

/// Bytes of messages being received, within a limit for all connections together and a
/// share for each source address: a connection reserves each piece before it keeps it,
/// except its first [`Budget::free`] bytes (a whole small request), which are bounded by
/// the number of connections instead.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    share: usize,
    free: usize,
    used: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Budget {
    /// A budget of `limit` bytes in all, `share` for each source, the first `free` bytes of
    /// each connection not counted.
    pub fn new(limit: usize, share: usize, free: usize) -> Self {
        Self {
            limit,
            share,
            free,
            used: 0,
            by_source: HashMap::new(),
        }
    }

    /// Bytes of a connection not counted.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Bytes of a piece of `piece` bytes to reserve on a connection that received
    /// `received` bytes before it (those past its first [`Budget::free`]).
    pub fn counted(&self, received: usize, piece: usize) -> usize {
        let after = received.saturating_add(piece).saturating_sub(self.free);
        after.saturating_sub(received.saturating_sub(self.free))
    }

    /// Reserves `bytes` for a connection from `ip`; nothing is reserved when that would
    /// pass the total or the source's share.
    pub fn reserve(&mut self, ip: IpAddr, bytes: usize) -> Result<(), Spent> {
        if bytes == 0 {
            return Ok(());
        }
        let ip = ip.to_canonical();
        let used = self
            .used
            .checked_add(bytes)
            .filter(|u| *u <= self.limit)
            .ok_or(Spent::Total)?;
        let mine = self
            .by_source
            .get(&ip)
            .copied()
            .unwrap_or(0)
            .checked_add(bytes)
            .filter(|m| *m <= self.share)
            .ok_or(Spent::Source)?;
        self.used = used;
        self.by_source.insert(ip, mine);
        Ok(())
    }

    /// Gives back `bytes` reserved before for a connection from `ip`.
    pub fn release(&mut self, ip: IpAddr, bytes: usize) {
        let ip = ip.to_canonical();
        self.used = self.used.saturating_sub(bytes);
        if let Some(mine) = self.by_source.get_mut(&ip) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                self.by_source.remove(&ip);
            }
        }
    }

    /// Bytes reserved now, in all.
    pub fn used(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn both_envelopes_are_read_and_answered_in_kind() {
        let flat = json!({"action": "REGISTER", "peer_id": "w1", "addr": ["10.0.0.2", 6000]});
        assert_eq!(
            parse(&flat).unwrap(),
            (
                Envelope::Flat,
                Request::Register {
                    peer_id: "w1".into()
                }
            )
        );
        let typed = json!({"type": "HEARTBEAT", "data": {"peer_id": "w2"}});
        assert_eq!(
            parse(&typed).unwrap(),
            (
                Envelope::Typed,
                Request::Heartbeat {
                    peer_id: "w2".into()
                }
            )
        );
        let answer: Value =
            serde_json::from_slice(&encode(Envelope::Flat, &Reply::Registered)).unwrap();
        assert_eq!(answer, json!({"status": "REGISTERED"}));
        let answer: Value = serde_json::from_slice(&encode(
            Envelope::Typed,
            &Reply::TaskPackage {
                name: "t.zip".into(),
                data: "UEs=".into(),
            },
        ))
        .unwrap();
        assert_eq!(
            answer,
            json!({"type": "TASK_PACKAGE", "data": {"task_name": "t.zip", "task_data": "UEs="}})
        );
        let announce: Value = serde_json::from_slice(&encode(
            Envelope::Flat,
            &Reply::MasterAnnounce {
                ip: "10.0.0.1".into(),
                port: 5000,
            },
        ))
        .unwrap();
        assert_eq!(
            announce,
            json!({"action": "MASTER_ANNOUNCE", "master_ip": "10.0.0.1", "master_port": 5000})
        );
        let submit = json!({"action": "SUBMIT_RESULT", "peer_id": "w1", "result_name": "t.zip", "result_data": "UEs="});
        assert_eq!(
            parse(&submit).unwrap().1,
            Request::SubmitResult {
                peer_id: "w1".into(),
                task: Some("t.zip".into()),
                data: "UEs=".into()
            }
        );
    }

    #[test]
    fn malformed_messages_are_refused_with_what_is_wrong() {
        assert!(matches!(
            parse(&json!([1, 2])),
            Err(MessageError::Unknown(_))
        ));
        assert!(matches!(
            parse(&json!({"action": "FLY"})),
            Err(MessageError::Unknown(_))
        ));
        assert_eq!(
            parse(&json!({"action": "REGISTER"})),
            Err(MessageError::Field {
                action: "REGISTER".into(),
                field: "peer_id"
            })
        );
        assert!(matches!(
            parse(&json!({"action": "SUBMIT_RESULT", "peer_id": "w"})),
            Err(MessageError::Field { .. })
        ));
    }

    #[test]
    fn the_framer_reads_an_object_in_pieces_without_waiting_for_the_end() {
        let bytes = br#"{"action": "REQUEST_TASK", "peer_id": "w1"}"#;
        let mut framer = Framer::default();
        for piece in bytes.chunks(7).take(bytes.len() / 7) {
            assert_eq!(framer.push(piece).unwrap(), None);
        }
        let rest = &bytes[bytes.len() / 7 * 7..];
        let value = framer.push(rest).unwrap().unwrap();
        assert_eq!(value["peer_id"], "w1");
        let mut bad = Framer::default();
        assert!(matches!(
            bad.push(b"{\"a\": }"),
            Err(MessageError::NotJson(_))
        ));
        let mut short = Framer::default();
        short.push(b"{\"a\": 1").unwrap();
        assert!(short.finish().is_err());
        let mut huge = Framer::default();
        assert_eq!(
            huge.push(&vec![b' '; MAX_MESSAGE + 1]),
            Err(MessageError::TooLarge)
        );
    }

    fn course(peer_id: &str, ip: [u8; 4]) -> WorkerKey {
        WorkerKey::course(peer_id, IpAddr::from(ip))
    }

    #[test]
    fn a_task_goes_to_one_worker_and_to_another_when_the_first_goes_silent() {
        let start = Instant::now();
        let (w1, w2, w3) = (
            course("w1", [10, 0, 0, 1]),
            course("w2", [10, 0, 0, 2]),
            course("w3", [10, 0, 0, 3]),
        );
        let mut master = Master::default();
        assert!(master.add("a.zip", 100));
        assert!(master.add("b.zip", 100));
        assert!(!master.add("a.zip", 100), "a name is queued once");
        assert!(master.add("big.zip", 1 << 20));
        let a = master.request(&w1, start, MAX_PACKAGE as u64).unwrap();
        assert_eq!(a.name, "a.zip");
        // Asking again, w1 gets the task it holds.
        assert_eq!(
            master.request(&w1, start, MAX_PACKAGE as u64).unwrap().name,
            "a.zip"
        );
        let b = master.request(&w2, start, MAX_PACKAGE as u64).unwrap();
        assert_eq!(b.name, "b.zip");
        // The big task is not for course workers.
        assert_eq!(master.request(&w3, start, MAX_PACKAGE as u64), None);
        // w2 keeps heartbeating; w1 falls silent.
        let later = start + WORKER_SILENT;
        master.heard(&w2, later - Duration::from_secs(1));
        assert_eq!(master.expire(later), vec!["a.zip".to_owned()]);
        let again = master.request(&w3, later, MAX_PACKAGE as u64).unwrap();
        assert_eq!((again.name.as_str(), again.attempts), ("a.zip", 2));
        // w1's late result no longer counts: a.zip is w3's now.
        assert_eq!(
            master.submit(&w1, Some("a.zip"), later),
            Err(Refused::NotYours {
                task: "a.zip".into()
            })
        );
        assert_eq!(master.holder("a.zip"), Some(&w3));
        // w3's result, unnamed, matches its lease; w2's names its task as the seed's
        // master names results.
        assert_eq!(
            master.submit(&w3, None, later),
            Ok(Submitted::Done(again.clone()))
        );
        assert_eq!(
            master.submit(&w2, Some("result_b.zip"), later),
            Ok(Submitted::Done(b))
        );
        assert_eq!(master.counts(), (1, 0));
    }

    #[test]
    fn a_result_counts_only_from_the_worker_holding_the_lease() {
        let now = Instant::now();
        let worker = course("w1", [192, 168, 1, 10]);
        let stranger = course("intruder", [192, 168, 1, 66]);
        let same_id_elsewhere = course("w1", [192, 168, 1, 66]);
        let local = WorkerKey::teia("teia:local-0");
        let posing = course("teia:local-0", [127, 0, 0, 1]);
        let mut master = Master::default();
        for name in ["a.zip", "b.zip", "c.zip", "d.zip"] {
            assert!(master.add(name, 10));
        }
        let a = master.request(&worker, now, u64::MAX).unwrap();
        let b = master.request(&local, now, u64::MAX).unwrap();
        assert_eq!((a.name.as_str(), b.name.as_str()), ("a.zip", "b.zip"));
        // Strangers name the task, or name none, or take the worker's id from elsewhere, or
        // a teia worker's name: all refused, and the leases stand.
        for (who, named) in [
            (&stranger, Some("a.zip")),
            (&stranger, Some("result_a.zip")),
            (&same_id_elsewhere, Some("a")),
            (&posing, Some("b.zip")),
        ] {
            assert_eq!(
                master.submit(who, named, now),
                Err(Refused::NotYours {
                    task: named.unwrap().into()
                }),
                "{who}"
            );
        }
        assert_eq!(master.submit(&stranger, None, now), Err(Refused::NoLease));
        assert_eq!(master.submit(&posing, None, now), Err(Refused::NoLease));
        // The same id from another address is another worker: it does not get w1's task.
        assert_eq!(
            master
                .request(&same_id_elsewhere, now, u64::MAX)
                .unwrap()
                .name,
            "c.zip"
        );
        assert_eq!(master.holder("a.zip"), Some(&worker));
        assert_eq!(master.holder("b.zip"), Some(&local));
        // A name meaning another task of the table is refused, even from a lease holder.
        assert_eq!(
            master.submit(&worker, Some("c.zip"), now),
            Err(Refused::NotYours {
                task: "c.zip".into()
            })
        );
        // The holder's result counts, however it names it; sent again, it is thanked and
        // dropped; after that, the worker holds nothing.
        assert_eq!(
            master.submit(&worker, Some("a"), now),
            Ok(Submitted::Done(a))
        );
        assert_eq!(
            master.submit(&worker, Some("a.zip"), now),
            Ok(Submitted::Again)
        );
        assert_eq!(master.submit(&worker, None, now), Ok(Submitted::Again));
        assert_eq!(
            master.submit(&worker, Some("b.zip"), now),
            Err(Refused::NotYours {
                task: "b.zip".into()
            })
        );
        // Holding d.zip, its earlier result sent again is still not d's; a name the table
        // does not know is its task's result under another name.
        let d = master.request(&worker, now, u64::MAX).unwrap();
        assert_eq!(d.name, "d.zip");
        assert_eq!(
            master.submit(&worker, Some("result_a.zip"), now),
            Ok(Submitted::Again)
        );
        assert_eq!(master.holder("d.zip"), Some(&worker));
        assert_eq!(
            master.submit(&worker, Some("output.zip"), now),
            Ok(Submitted::Done(d))
        );
        assert_eq!(
            master.submit(&local, Some("b.zip"), now),
            Ok(Submitted::Done(b))
        );
        assert_eq!(master.counts(), (0, 1), "c.zip is still leased");
        assert!(matches!(
            master.submit(&same_id_elsewhere, None, now),
            Ok(Submitted::Done(Task { name, .. })) if name == "c.zip"
        ));
        // A task taken back from a silent worker and done by another: that worker's late
        // result of it, sent while it holds a new task, is not the new task's.
        let slow = course("slow", [192, 168, 1, 11]);
        assert!(master.add("e.zip", 10));
        assert!(master.add("f.zip", 10));
        assert_eq!(master.request(&slow, now, u64::MAX).unwrap().name, "e.zip");
        let later = now + WORKER_SILENT;
        master.heard(&local, later);
        assert_eq!(master.expire(later), vec!["e.zip".to_owned()]);
        let e = master.request(&local, later, u64::MAX).unwrap();
        assert_eq!(
            master.submit(&local, Some("e.zip"), later),
            Ok(Submitted::Done(e))
        );
        assert_eq!(
            master.request(&slow, later, u64::MAX).unwrap().name,
            "f.zip"
        );
        assert_eq!(
            master.submit(&slow, Some("e.zip"), later),
            Err(Refused::NotYours {
                task: "e.zip".into()
            })
        );
        assert_eq!(master.holder("f.zip"), Some(&slow));
    }

    #[test]
    fn a_task_given_back_goes_first_to_the_next_worker() {
        let now = Instant::now();
        let (x, y) = (WorkerKey::teia("teia:x#1"), WorkerKey::teia("teia:y#2"));
        let mut master = Master::default();
        assert!(master.add("a.zip", 10));
        assert!(master.add("b.zip", 10));
        let a = master.request(&x, now, u64::MAX).unwrap();
        assert_eq!(master.holder("a.zip"), Some(&x));
        assert_eq!(master.holder("b.zip"), None);
        // Renewed, a lease outlives LEASE.
        master.renew(&x, now + LEASE - Duration::from_secs(1));
        assert!(master.expire(now + LEASE).is_empty());
        assert_eq!(master.give_back(&x), Some(a.name.clone()));
        assert_eq!(master.give_back(&x), None, "the worker is forgotten");
        assert_eq!(master.counts(), (2, 0));
        let again = master.request(&y, now, u64::MAX).unwrap();
        assert_eq!((again.name.as_str(), again.attempts), ("a.zip", 2));
        assert_eq!(
            master.submit(&y, Some("a.zip"), now),
            Ok(Submitted::Done(again))
        );
        assert_eq!(master.give_back(&y), None, "nothing held after its result");
        assert_eq!(master.counts(), (1, 0));
    }

    #[test]
    fn every_change_to_the_tasks_is_counted_and_nothing_else() {
        let now = Instant::now();
        let w = WorkerKey::teia("w");
        let mut master = Master::default();
        assert!(master.add("a.zip", 10));
        assert!(!master.add("a.zip", 10), "already there");
        assert_eq!(master.changes(), 1);
        master.request(&w, now, u64::MAX).unwrap();
        master.request(&w, now, u64::MAX).unwrap();
        master.renew(&w, now);
        assert_eq!(
            master.changes(),
            2,
            "asking again for the task held changes nothing"
        );
        assert_eq!(master.give_back(&w), Some("a.zip".into()));
        master.request(&w, now, u64::MAX).unwrap();
        assert!(matches!(
            master.submit(&w, None, now),
            Ok(Submitted::Done(_))
        ));
        assert_eq!(master.changes(), 5);
    }

    #[test]
    fn a_task_that_cannot_run_is_retried_last_in_line_then_given_up() {
        let now = Instant::now();
        let w = WorkerKey::teia("w");
        let mut master = Master::default();
        assert!(master.add("broken.zip", 10));
        assert!(master.add("fine.zip", 10));
        assert_eq!(master.failed(&w, now), Failed::Unmatched);
        let first = master.request(&w, now, u64::MAX).unwrap();
        assert_eq!(first.name, "broken.zip");
        assert_eq!(master.failed(&w, now), Failed::Retry);
        assert_eq!(master.request(&w, now, u64::MAX).unwrap().name, "fine.zip");
        assert_eq!(
            master.submit(&w, None, now),
            Ok(Submitted::Done(Task {
                name: "fine.zip".into(),
                size: 10,
                attempts: 1
            }))
        );
        for attempt in 2..MAX_FAILURES {
            assert_eq!(master.request(&w, now, u64::MAX).unwrap().attempts, attempt);
            assert_eq!(master.failed(&w, now), Failed::Retry);
        }
        let last = master.request(&w, now, u64::MAX).unwrap();
        assert_eq!(master.failed(&w, now), Failed::GiveUp(last));
        assert_eq!(master.counts(), (0, 0));
        assert_eq!(master.leased("broken.zip"), None);
        assert!(
            master.add("broken.zip", 10),
            "a new file of that name is a new task"
        );
    }

    #[test]
    fn networks_are_read_and_hold_their_addresses() {
        let lan: Cidr = "192.168.1.7/24".parse().unwrap();
        assert_eq!(lan.to_string(), "192.168.1.0/24");
        assert!(lan.contains("192.168.1.77".parse().unwrap()));
        assert!(!lan.contains("192.168.2.1".parse().unwrap()));
        // An IPv4 source seen by a dual-stack socket is still IPv4.
        assert!(lan.contains("::ffff:192.168.1.5".parse().unwrap()));
        assert!(!lan.contains("fe80::1".parse().unwrap()));
        let host: Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(host.to_string(), "10.1.2.3/32");
        assert!(host.contains("10.1.2.3".parse().unwrap()));
        assert!(!host.contains("10.1.2.4".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()));
        let ula: Cidr = " fd00::/8 ".parse().unwrap();
        assert!(ula.contains("fd12::1".parse().unwrap()));
        assert!(!ula.contains("fe80::1".parse().unwrap()));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix {
                prefix: "33".into(),
                max: 32
            })
        );
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
    }

    #[test]
    fn the_gate_admits_allowed_sources_a_few_connections_each() {
        let mut gate = Gate::new(
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/24".parse().unwrap(),
            ],
            2,
        );
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        assert_eq!(
            gate.admit("10.0.1.1".parse().unwrap()),
            Err(Unwelcome::NotAllowed)
        );
        assert_eq!(gate.admit(a), Ok(()));
        assert_eq!(gate.admit("::ffff:10.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(gate.admit(a), Err(Unwelcome::TooMany));
        // Another source is not held back by the first one's connections.
        assert_eq!(gate.admit(b), Ok(()));
        assert_eq!(gate.open(a), 2);
        gate.leave(a);
        assert_eq!(gate.admit(a), Ok(()));
        for _ in 0..5 {
            gate.leave(a);
        }
        assert_eq!(gate.open(a), 0);
        assert!(gate.open.len() == 1, "a source with none open is forgotten");
        let closed = Gate::new(Vec::new(), 8);
        assert!(!closed.allows(a));
    }

    #[test]
    fn the_budget_refuses_what_would_pass_it_and_takes_back_what_is_released() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let mut budget = Budget::new(100, 60, 10);
        // The first 10 bytes of a connection are not counted.
        assert_eq!(budget.counted(0, 8), 0);
        assert_eq!(budget.counted(8, 8), 6);
        assert_eq!(budget.counted(16, 8), 8);
        assert_eq!(budget.counted(usize::MAX, 8), 0);
        assert_eq!(budget.reserve(a, 0), Ok(()));
        assert_eq!(budget.reserve(a, 50), Ok(()));
        // One source cannot take more than its share; others still can.
        assert_eq!(budget.reserve(a, 11), Err(Spent::Source));
        assert_eq!(budget.reserve(b, 45), Ok(()));
        // Nor can all of them together pass the total: nothing is reserved then.
        assert_eq!(budget.reserve(c, 6), Err(Spent::Total));
        assert_eq!(budget.reserve(c, usize::MAX), Err(Spent::Total));
        assert_eq!(budget.used(), 95);
        assert_eq!(budget.reserve(c, 5), Ok(()));
        budget.release(a, 50);
        assert_eq!(
            budget.reserve("::ffff:10.0.0.3".parse().unwrap(), 50),
            Ok(())
        );
        assert_eq!(budget.reserve(c, 10), Err(Spent::Total));
        budget.release(b, 1000);
        assert_eq!(
            budget.reserve(c, 10),
            Err(Spent::Source),
            "10.0.0.3 holds 55"
        );
        budget.release(c, 1000);
        assert_eq!(budget.used(), 0);
        assert!(
            budget.by_source.is_empty(),
            "a source with nothing held is forgotten"
        );
    }
}
