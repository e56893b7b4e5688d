//! Seed 000's wire as a teia worker speaks it, sans-IO: the distributed pytest network of
//! the course group whose protocol document is seed 000 (their nodes: UDP control messages,
//! projects and results over each node's HTTP API).
//!
//! **Framing**: one message per UDP datagram, a 4-byte big-endian length then a JSON
//! envelope `{"ip","port","cmd","data","timestamp"}`; `ip`/`port` are the sender's
//! advertised UDP address (an integer port), and replies go there, not to the datagram's
//! source. [`decode`] and [`encode`] read and write it.
//!
//! **The worker** ([`Worker`]) joins through one of their nodes (`CONNECT`, and keeps the
//! id the `CONNECT_REP` gives it), heartbeats every peer it knows with its peer table,
//! sends `CACHE_UPDATE`s with its counters (so their `/network` and `/stats` list it, and
//! so their failure detector finds its entry when it dies), answers `TASK_ANNOUNCE` with
//! `TASK_REQUEST` while a slot is free, and takes a `TASK_SEND` only from a node it asked:
//! `TASK_CONFIRM` at once, the project fetched from the sender's `GET /file/<project_id>`
//! (also on `PROJECT_ANNOUNCE`, ahead of the tasks), the module run by the runtime, and its
//! counts posted to the sender's `POST /task`. It owns no evaluation, so it takes no part in
//! their elections: a `RECOVERY_ELECTION` only drops the failed node from its peers.
//!
//! Events and time come in ([`Worker::handle_datagram`], [`Worker::handle_timeout`],
//! [`Worker::fetched`], [`Worker::ran`]); [`Action`]s come out ([`Worker::poll_action`]).
//!
//! **Bounds**: datagrams read up to [`MAX_DATAGRAM`] bytes (their nodes read 256 KiB), and
//! none is written past [`MAX_SEND`] (a longer one is not sent); at most [`MAX_PEERS`] peers
//! (past it, newcomers are not added); [`MAX_PROJECTS`] projects kept on disk (past it, the
//! oldest not in use is forgotten); [`MAX_EVALUATIONS`] evaluation ids in the counters (the
//! oldest dropped); tasks at once at most the worker's slots (a `TASK_SEND` beyond them is
//! ignored, and its sender hands the module to another after its confirm timeout).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Largest datagram read.
pub const MAX_DATAGRAM: usize = 256 * 1024;
/// Largest datagram written (under the 65,507 bytes of a UDP datagram over IPv4).
pub const MAX_SEND: usize = 60 * 1024;
/// Peers known at most.
pub const MAX_PEERS: usize = 256;
/// Projects kept on disk at most.
pub const MAX_PROJECTS: usize = 32;
/// Evaluation ids kept in the counters at most.
pub const MAX_EVALUATIONS: usize = 64;
/// Longest id, project id or module name taken.
pub const MAX_NAME: usize = 256;
/// Time between two `CONNECT`s while no `CONNECT_REP` came.
pub const JOIN_EVERY: Duration = Duration::from_secs(2);
/// Time between two heartbeats (their nodes send one every 3.5 s and count a node failed
/// after 21 s of silence).
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(3500);
/// Time between two `CACHE_UPDATE`s (as their nodes).
pub const CACHE_EVERY: Duration = Duration::from_secs(5);
/// A peer not heard from for this long is forgotten; with none left, the worker joins
/// again through the node it was given.
pub const PEER_SILENT: Duration = Duration::from_secs(30);
/// Time a `TASK_REQUEST` waits for its `TASK_SEND` (their holders send it at once, or
/// nothing when their queue ran empty).
pub const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Why a datagram was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its length prefix says, or than the prefix itself.
    #[error("truncated datagram")]
    Truncated,
    /// Over [`MAX_DATAGRAM`] or [`MAX_SEND`].
    #[error("datagram over {0} bytes")]
    TooLong(usize),
    /// Not a JSON object.
    #[error("not JSON: {0}")]
    Json(String),
    /// A field of the envelope is missing or of the wrong type.
    #[error("envelope without a valid {0}")]
    Envelope(&'static str),
}

/// One message: who sent it (as it says), what, and the command's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The sender's advertised UDP address: where replies go.
    pub from: SocketAddr,
    /// The command (`"HEARTBEAT"`, `"TASK_SEND"`…).
    pub cmd: String,
    /// Its data (an object).
    pub data: Value,
}

/// Reads a datagram.
pub fn decode(datagram: &[u8]) -> Result<Envelope, FrameError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(FrameError::TooLong(MAX_DATAGRAM));
    }
    let (prefix, rest) = datagram.split_at_checked(4).ok_or(FrameError::Truncated)?;
    let length = u32::from_be_bytes(prefix.try_into().map_err(|_| FrameError::Truncated)?);
    let body = usize::try_from(length)
        .ok()
        .and_then(|n| rest.get(..n))
        .ok_or(FrameError::Truncated)?;
    let value: Value = serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))?;
    let ip: IpAddr = value
        .get("ip")
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse().ok())
        .ok_or(FrameError::Envelope("ip"))?;
    let port = value
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or(FrameError::Envelope("port"))?;
    let cmd = value
        .get("cmd")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty() && c.len() <= 64)
        .ok_or(FrameError::Envelope("cmd"))?
        .to_owned();
    let data = match value.get("data") {
        Some(Value::Object(map)) => Value::Object(map.clone()),
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(_) => return Err(FrameError::Envelope("data")),
    };
    Ok(Envelope {
        from: SocketAddr::new(ip, port),
        cmd,
        data,
    })
}

/// Writes a datagram from `me` at `timestamp` (Unix seconds).
pub fn encode(
    me: SocketAddr,
    cmd: &str,
    data: &Value,
    timestamp: f64,
) -> Result<Vec<u8>, FrameError> {
    let body = json!({
        "ip": me.ip().to_string(),
        "port": me.port(),
        "cmd": cmd,
        "data": data,
        "timestamp": timestamp,
    })
    .to_string();
    if body.len() + 4 > MAX_SEND {
        return Err(FrameError::TooLong(MAX_SEND));
    }
    let length = u32::try_from(body.len()).map_err(|_| FrameError::TooLong(MAX_SEND))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    Ok(out)
}

/// A message to send: `cmd` with `data` to `to`, whose envelope the runtime writes
/// ([`encode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The peer's advertised UDP address.
    pub to: SocketAddr,
    /// The command.
    pub cmd: &'static str,
    /// Its data.
    pub data: Value,
}

/// A module handed to this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// `<project_id>::<module>`, as their holders name it.
    pub id: String,
    /// The project (a folder name on their nodes).
    pub project: String,
    /// The test file, a bare name under the project's `tests/`.
    pub module: String,
    /// The evaluation, when the holder said.
    pub eval: Option<String>,
    /// The holder's HTTP API: where the project is fetched and the result posted.
    pub api: SocketAddr,
}

/// A module's counts, in their shape (failed counts errors too).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    /// Tests passed.
    pub passed: u32,
    /// Tests failed, and errors.
    pub failed: u32,
    /// Seconds the module ran.
    pub seconds: f64,
}

/// What happened, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// Joined with this id through this node.
    Joined {
        /// The id given.
        id: String,
        /// The node that answered.
        via: SocketAddr,
    },
    /// No peer heard from for [`PEER_SILENT`]: joining again.
    Rejoining,
    /// A module taken.
    Took(Task),
    /// A project could not be fetched: its tasks here are dropped (their holders hand them
    /// to another after their task timeout).
    NotFetched {
        /// The project.
        project: String,
    },
}

/// What the runtime is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this.
    Send(Outgoing),
    /// Fetch `GET http://{api}/file/{project}` (a ZIP of the folder `{project}/`), then
    /// call [`Worker::fetched`].
    Fetch {
        /// The project.
        project: String,
        /// The HTTP API that has it.
        api: SocketAddr,
    },
    /// Run the task's module (its project is here), then call [`Worker::ran`].
    Run(Task),
    /// `POST http://{api}/task` with `body` (JSON).
    Post {
        /// The holder's HTTP API.
        api: SocketAddr,
        /// The result, in their shape.
        body: Value,
    },
    /// Remove the project's folder: it is no longer kept.
    Forget {
        /// The project.
        project: String,
    },
    /// Log this.
    Note(Note),
}

/// A peer of their network.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    heard: Instant,
}

/// Where a project stands here.
#[derive(Debug, Clone, PartialEq)]
enum Project {
    /// Being fetched.
    Fetching,
    /// On disk; the number is its order of arrival (the oldest is forgotten first).
    Here(u64),
}

/// This worker's counters, as their `CACHE_UPDATE` `stats` carries them.
#[derive(Debug, Default, Clone)]
struct Stats {
    passed: u64,
    failed: u64,
    modules: u64,
    projects: BTreeSet<String>,
    evaluations: VecDeque<String>,
}

/// A teia worker in a seed 000 network.
#[derive(Debug)]
pub struct Worker {
    /// The node it joins through.
    host: SocketAddr,
    /// Its own advertised UDP address.
    me: SocketAddr,
    /// Tasks it runs at once.
    slots: usize,
    /// The id their network gave it.
    id: Option<String>,
    /// When the last `CONNECT` left.
    join_sent: Option<Instant>,
    peers: BTreeMap<String, Peer>,
    next_heartbeat: Option<Instant>,
    next_cache: Option<Instant>,
    /// `TASK_REQUEST`s awaiting their `TASK_SEND`, by holder.
    requests: BTreeMap<SocketAddr, Instant>,
    /// Tasks taken, by id: waiting for their project or running.
    tasks: BTreeMap<String, Task>,
    projects: BTreeMap<String, Project>,
    arrivals: u64,
    stats: Stats,
    actions: VecDeque<Action>,
}

/// A name their nodes use as a folder or file name: no path, nothing hidden.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("::")
}

/// A port given as a number or as a string (their `api_port`).
fn port_of(value: Option<&Value>) -> Option<u16> {
    match value? {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|p| *p != 0)
}

impl Worker {
    /// A worker that joins through `host`, advertises `me` and runs `slots` modules at once.
    pub fn new(host: SocketAddr, me: SocketAddr, slots: usize) -> Self {
        Self {
            host,
            me,
            slots: slots.max(1),
            id: None,
            join_sent: None,
            peers: BTreeMap::new(),
            next_heartbeat: None,
            next_cache: None,
            requests: BTreeMap::new(),
            tasks: BTreeMap::new(),
            projects: BTreeMap::new(),
            arrivals: 0,
            stats: Stats::default(),
            actions: VecDeque::new(),
        }
    }

    /// The id their network gave it, once joined.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Worker::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let join = match self.id {
            None => Some(self.join_sent.map_or_else(Instant::now, |t| t + JOIN_EVERY)),
            Some(_) => None,
        };
        let silent = self.peers.values().map(|p| p.heard + PEER_SILENT).min();
        let requests = self.requests.values().map(|t| *t + REQUEST_WAIT).min();
        [join, self.next_heartbeat, self.next_cache, silent, requests]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed: joins, heartbeats, sends the counters, forgets silent peers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.requests.retain(|_, asked| now < *asked + REQUEST_WAIT);
        let before = self.peers.len();
        self.peers.retain(|_, p| now < p.heard + PEER_SILENT);
        if self.id.is_some() && before > 0 && self.peers.is_empty() {
            self.id = None;
            self.join_sent = None;
            self.next_heartbeat = None;
            self.next_cache = None;
            self.actions.push_back(Action::Note(Note::Rejoining));
        }
        if self.id.is_none() {
            if self.join_sent.is_none_or(|sent| now >= sent + JOIN_EVERY) {
                self.join_sent = Some(now);
                self.send(self.host, "CONNECT", json!({}));
            }
            return;
        }
        if self.next_heartbeat.is_none_or(|t| now >= t) {
            self.next_heartbeat = Some(now + HEARTBEAT_EVERY);
            self.heartbeat();
        }
        if self.next_cache.is_none_or(|t| now >= t) {
            self.next_cache = Some(now + CACHE_EVERY);
            self.cache_update();
        }
    }

    /// A datagram came; anything not understood is dropped.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<(), FrameError> {
        let envelope = decode(datagram)?;
        let from = envelope.from;
        let data = &envelope.data;
        match envelope.cmd.as_str() {
            "CONNECT_REP" => self.on_connect_rep(now, from, data),
            "HEARTBEAT" => self.on_heartbeat(now, from, data),
            "PROJECT_ANNOUNCE" => {
                let project = data.get("project_id").and_then(Value::as_str);
                let api = port_of(data.get("api_port"));
                if let (Some(project), Some(api)) = (project, api) {
                    if plain_name(project) {
                        self.want_project(project, SocketAddr::new(from.ip(), api));
                    }
                }
            }
            "TASK_ANNOUNCE" => {
                let asked = self.requests.len() + self.tasks.len();
                if self.id.is_some() && asked < self.slots && !self.requests.contains_key(&from) {
                    self.requests.insert(from, now);
                    let id = self.id.clone().unwrap_or_default();
                    self.send(from, "TASK_REQUEST", json!({ "id": id }));
                }
            }
            "TASK_SEND" => self.on_task_send(from, data),
            "RECOVERY_ELECTION" => {
                if let Some(failed) = data.get("failed_node").and_then(Value::as_str) {
                    self.peers.remove(failed);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_connect_rep(&mut self, now: Instant, from: SocketAddr, data: &Value) {
        let given = data.get("given_id").and_then(Value::as_str);
        let theirs = data.get("id").and_then(Value::as_str);
        let (Some(given), Some(theirs)) = (given, theirs) else {
            return;
        };
        if !plain_name(given) || !plain_name(theirs) || given == theirs {
            return;
        }
        if self.id.as_deref() == Some(given) {
            return;
        }
        self.id = Some(given.to_owned());
        self.peers.clear();
        self.add_peer(now, theirs, from);
        self.merge_peers(now, data.get("peers"));
        self.actions.push_back(Action::Note(Note::Joined {
            id: given.to_owned(),
            via: from,
        }));
        self.next_heartbeat = Some(now);
        self.next_cache = Some(now);
        self.handle_timeout(now);
    }

    fn on_heartbeat(&mut self, now: Instant, from: SocketAddr, data: &Value) {
        if self.id.is_none() {
            return;
        }
        let Some(id) = data.get("id").and_then(Value::as_str) else {
            return;
        };
        if !plain_name(id) {
            return;
        }
        match self.peers.get_mut(id) {
            Some(peer) => peer.heard = now,
            None => self.add_peer(now, id, from),
        }
        self.merge_peers(now, data.get("peers"));
    }

    /// Adds the peers of a `CONNECT_REP` or `HEARTBEAT` (`{id: [ip, port]}`) not known yet.
    fn merge_peers(&mut self, now: Instant, peers: Option<&Value>) {
        let Some(Value::Object(peers)) = peers else {
            return;
        };
        for (id, addr) in peers {
            let ip = addr
                .get(0)
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let port = port_of(addr.get(1));
            if let (Some(ip), Some(port)) = (ip, port) {
                if !self.peers.contains_key(id) && plain_name(id) {
                    self.add_peer(now, id, SocketAddr::new(ip, port));
                }
            }
        }
    }

    fn add_peer(&mut self, now: Instant, id: &str, addr: SocketAddr) {
        if Some(id) == self.id.as_deref() || addr == self.me || self.peers.len() >= MAX_PEERS {
            return;
        }
        self.peers.insert(id.to_owned(), Peer { addr, heard: now });
    }

    fn on_task_send(&mut self, from: SocketAddr, data: &Value) {
        // Only an answer to our own TASK_REQUEST: nobody else hands us work.
        if self.requests.remove(&from).is_none() || self.tasks.len() >= self.slots {
            return;
        }
        let Some(info) = data.get("info") else {
            return;
        };
        let project = info.get("project_id").and_then(Value::as_str);
        let module = info.get("module").and_then(Value::as_str);
        let api = port_of(info.get("api_port"));
        let (Some(project), Some(module), Some(api)) = (project, module, api) else {
            return;
        };
        if !plain_name(project) || !plain_name(module) {
            return;
        }
        let id = format!("{project}::{module}");
        if self.tasks.contains_key(&id) {
            return;
        }
        let task = Task {
            id: id.clone(),
            project: project.to_owned(),
            module: module.to_owned(),
            eval: info
                .get("eval_id")
                .and_then(Value::as_str)
                .filter(|e| plain_name(e))
                .map(str::to_owned),
            api: SocketAddr::new(from.ip(), api),
        };
        self.send(from, "TASK_CONFIRM", json!({ "task_id": id }));
        self.actions
            .push_back(Action::Note(Note::Took(task.clone())));
        self.tasks.insert(id, task.clone());
        if matches!(self.projects.get(project), Some(Project::Here(_))) {
            self.actions.push_back(Action::Run(task));
        } else {
            self.want_project(project, task.api);
        }
    }

    /// Fetches `project` from `api` unless it is here or on its way.
    fn want_project(&mut self, project: &str, api: SocketAddr) {
        if self.projects.contains_key(project) {
            return;
        }
        if self.projects.len() >= MAX_PROJECTS {
            let in_use: BTreeSet<&str> = self.tasks.values().map(|t| t.project.as_str()).collect();
            let oldest = self
                .projects
                .iter()
                .filter_map(|(name, state)| match state {
                    Project::Here(order) if !in_use.contains(name.as_str()) => Some((*order, name)),
                    _ => None,
                })
                .min()
                .map(|(_, name)| name.clone());
            let Some(oldest) = oldest else {
                return;
            };
            self.projects.remove(&oldest);
            self.actions.push_back(Action::Forget { project: oldest });
        }
        self.projects.insert(project.to_owned(), Project::Fetching);
        self.actions.push_back(Action::Fetch {
            project: project.to_owned(),
            api,
        });
    }

    /// The project's fetch ended (`ok`: it is on disk, unpacked).
    pub fn fetched(&mut self, project: &str, ok: bool) {
        if ok {
            self.arrivals += 1;
            self.projects
                .insert(project.to_owned(), Project::Here(self.arrivals));
            let ready: Vec<Task> = self
                .tasks
                .values()
                .filter(|t| t.project == project)
                .cloned()
                .collect();
            self.actions.extend(ready.into_iter().map(Action::Run));
        } else {
            self.projects.remove(project);
            self.tasks.retain(|_, t| t.project != project);
            self.actions.push_back(Action::Note(Note::NotFetched {
                project: project.to_owned(),
            }));
        }
    }

    /// The task's module ran (`None`: it could not be run; nothing is posted, and its
    /// holder hands it to another after its task timeout).
    pub fn ran(&mut self, task_id: &str, counts: Option<Counts>) {
        let Some(task) = self.tasks.remove(task_id) else {
            return;
        };
        let Some(counts) = counts else {
            return;
        };
        self.stats.passed += u64::from(counts.passed);
        self.stats.failed += u64::from(counts.failed);
        self.stats.modules += 1;
        self.stats.projects.insert(task.project.clone());
        if self.stats.projects.len() > MAX_EVALUATIONS {
            self.stats.projects.pop_first();
        }
        if let Some(eval) = &task.eval {
            if !self.stats.evaluations.contains(eval) {
                self.stats.evaluations.push_back(eval.clone());
                if self.stats.evaluations.len() > MAX_EVALUATIONS {
                    self.stats.evaluations.pop_front();
                }
            }
        }
        self.actions.push_back(Action::Post {
            api: task.api,
            body: json!({
                "task_id": task.id,
                "passed": counts.passed,
                "failed": counts.failed,
                "time": counts.seconds,
                "project_id": task.project,
                "module": task.module,
                "ip": self.me.ip().to_string(),
                "port": self.me.port().to_string(),
            }),
        });
        self.cache_update();
    }

    fn heartbeat(&mut self) {
        let id = self.id.clone().unwrap_or_default();
        let peers: Map<String, Value> = self
            .peers
            .iter()
            .map(|(id, p)| (id.clone(), json!([p.addr.ip().to_string(), p.addr.port()])))
            .collect();
        let data = json!({ "id": id, "peers": peers });
        let to: Vec<SocketAddr> = self.peers.values().map(|p| p.addr).collect();
        for addr in to {
            self.send(addr, "HEARTBEAT", data.clone());
        }
    }

    /// Sends the counters to every peer, in the shape of their `CACHE_UPDATE` (this worker
    /// owns no evaluation and tracks no project's modules).
    fn cache_update(&mut self) {
        let data = json!({
            "addr": self.me.to_string(),
            "peers_ip": self.peers.values().map(|p| p.addr.to_string()).collect::<Vec<_>>(),
            "evaluations": {},
            "projects": {},
            "stats": {
                "failed": self.stats.failed,
                "passed": self.stats.passed,
                "projects": self.stats.projects.len(),
                "modules": self.stats.modules,
                "evaluations": self.stats.evaluations,
                "submitted_evaluation": [],
            },
        });
        let to: Vec<SocketAddr> = self.peers.values().map(|p| p.addr).collect();
        for addr in to {
            self.send(addr, "CACHE_UPDATE", data.clone());
        }
    }

    fn send(&mut self, to: SocketAddr, cmd: &'static str, data: Value) {
        self.actions
            .push_back(Action::Send(Outgoing { to, cmd, data }));
    }
}

/// What the tests of both roles share.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An address from text.
    pub(crate) fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A datagram from `from`.
    pub(crate) fn datagram(from: &str, cmd: &str, data: Value) -> Vec<u8> {
        encode(addr(from), cmd, &data, 1.0).unwrap()
    }

    /// Where each `cmd` among `sends` goes, and with what.
    pub(crate) fn sent<'a>(
        sends: impl IntoIterator<Item = &'a Outgoing>,
        cmd: &str,
    ) -> Vec<(SocketAddr, Value)> {
        sends
            .into_iter()
            .filter(|o| o.cmd == cmd)
            .map(|o| (o.to, o.data.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{addr, datagram};
    use super::*;

    const HOLDER: &str = "127.0.0.1:8001";
    const ME: &str = "127.0.0.1:8002";

    fn drain(worker: &mut Worker) -> Vec<Action> {
        std::iter::from_fn(|| worker.poll_action()).collect()
    }

    fn sent(actions: &[Action], cmd: &str) -> Vec<(SocketAddr, Value)> {
        let sends = actions.iter().filter_map(|a| match a {
            Action::Send(o) => Some(o),
            _ => None,
        });
        super::testing::sent(sends, cmd)
    }

    fn joined(now: Instant) -> Worker {
        let mut worker = Worker::new(addr(HOLDER), addr(ME), 1);
        worker.handle_timeout(now);
        let reply = json!({"given_id": "200", "id": "100",
            "peers": {"300": ["127.0.0.1", 8003]}});
        worker
            .handle_datagram(now, &datagram(HOLDER, "CONNECT_REP", reply))
            .unwrap();
        worker
    }

    #[test]
    fn the_frame_is_a_big_endian_length_then_json() {
        let bytes = encode(addr(ME), "HEARTBEAT", &json!({"id": "1"}), 2.5).unwrap();
        let length = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(length, bytes.len() - 4);
        let envelope = decode(&bytes).unwrap();
        assert_eq!(envelope.from, addr(ME));
        assert_eq!(envelope.cmd, "HEARTBEAT");
        assert_eq!(decode(&bytes[..10]), Err(FrameError::Truncated));
        let string_port = br#"{"ip":"127.0.0.1","port":"8001","cmd":"X","data":{}}"#;
        let mut framed = (string_port.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(string_port);
        assert_eq!(decode(&framed), Err(FrameError::Envelope("port")));
        assert!(encode(addr(ME), "X", &json!({"pad": "x".repeat(MAX_SEND)}), 0.0).is_err());
    }

    #[test]
    fn it_joins_keeps_the_given_id_and_heartbeats_every_peer() {
        let now = Instant::now();
        let mut worker = Worker::new(addr(HOLDER), addr(ME), 1);
        worker.handle_timeout(now);
        assert_eq!(sent(&drain(&mut worker), "CONNECT").len(), 1);
        let reply = json!({"given_id": "200", "id": "100",
            "peers": {"300": ["127.0.0.1", 8003]}});
        worker
            .handle_datagram(now, &datagram(HOLDER, "CONNECT_REP", reply))
            .unwrap();
        assert_eq!(worker.id(), Some("200"));
        let actions = drain(&mut worker);
        let beats = sent(&actions, "HEARTBEAT");
        assert_eq!(beats.len(), 2);
        assert_eq!(beats[0].1["id"], "200");
        assert_eq!(beats[0].1["peers"]["300"], json!(["127.0.0.1", 8003]));
        let cache = sent(&actions, "CACHE_UPDATE");
        assert_eq!(cache[0].1["addr"], ME);
        assert_eq!(cache[0].1["stats"]["submitted_evaluation"], json!([]));
        worker.handle_timeout(now + HEARTBEAT_EVERY);
        assert_eq!(sent(&drain(&mut worker), "HEARTBEAT").len(), 2);
    }

    #[test]
    fn a_task_is_taken_only_in_answer_to_its_request_and_its_counts_posted() {
        let now = Instant::now();
        let mut worker = joined(now);
        drain(&mut worker);
        let task = json!({"id": "100", "info": {"project_id": "p1.100", "module": "test_a.py",
            "project_name": "calc", "api_port": "5001", "eval_id": "1001", "type": "zip"}});
        // Not asked: ignored.
        worker
            .handle_datagram(now, &datagram(HOLDER, "TASK_SEND", task.clone()))
            .unwrap();
        assert!(sent(&drain(&mut worker), "TASK_CONFIRM").is_empty());

        worker
            .handle_datagram(
                now,
                &datagram(HOLDER, "TASK_ANNOUNCE", json!({"id": "100"})),
            )
            .unwrap();
        assert_eq!(sent(&drain(&mut worker), "TASK_REQUEST").len(), 1);
        // One slot, one request out: another announce asks nothing more.
        worker
            .handle_datagram(now, &datagram("127.0.0.1:8003", "TASK_ANNOUNCE", json!({})))
            .unwrap();
        assert!(sent(&drain(&mut worker), "TASK_REQUEST").is_empty());

        worker
            .handle_datagram(now, &datagram(HOLDER, "TASK_SEND", task))
            .unwrap();
        let actions = drain(&mut worker);
        assert_eq!(
            sent(&actions, "TASK_CONFIRM")[0].1["task_id"],
            "p1.100::test_a.py"
        );
        assert!(actions.contains(&Action::Fetch {
            project: "p1.100".into(),
            api: addr("127.0.0.1:5001")
        }));
        worker.fetched("p1.100", true);
        let run = drain(&mut worker);
        let Some(Action::Run(task)) = run.first() else {
            panic!("{run:?}");
        };
        assert_eq!(task.module, "test_a.py");
        worker.ran(
            "p1.100::test_a.py",
            Some(Counts {
                passed: 3,
                failed: 1,
                seconds: 0.5,
            }),
        );
        let actions = drain(&mut worker);
        let Some(Action::Post { api, body }) = actions.first() else {
            panic!("{actions:?}");
        };
        assert_eq!(*api, addr("127.0.0.1:5001"));
        assert_eq!(body["task_id"], "p1.100::test_a.py");
        assert_eq!(
            (body["passed"].clone(), body["failed"].clone()),
            (json!(3), json!(1))
        );
        assert_eq!(body["port"], "8002");
        let cache = sent(&actions, "CACHE_UPDATE");
        assert_eq!(cache[0].1["stats"]["passed"], 3);
        assert_eq!(cache[0].1["stats"]["evaluations"], json!(["1001"]));
    }

    #[test]
    fn hostile_names_and_silence_are_handled() {
        let now = Instant::now();
        let mut worker = joined(now);
        drain(&mut worker);
        let bad = json!({"project_id": "../etc", "api_port": 5001, "type": 0});
        worker
            .handle_datagram(now, &datagram(HOLDER, "PROJECT_ANNOUNCE", bad))
            .unwrap();
        assert!(drain(&mut worker).is_empty());
        assert!(worker.handle_datagram(now, b"\0\0\0\x09{}").is_err());
        worker.handle_timeout(now + PEER_SILENT);
        assert_eq!(worker.id(), None);
        let actions = drain(&mut worker);
        assert!(actions.contains(&Action::Note(Note::Rejoining)));
        assert_eq!(sent(&actions, "CONNECT")[0].0, addr(HOLDER));
    }

    #[test]
    fn projects_kept_are_bounded_and_the_oldest_unused_forgotten() {
        let now = Instant::now();
        let mut worker = joined(now);
        for n in 0..=MAX_PROJECTS {
            let announce = json!({"project_id": format!("p{n}"), "api_port": "5001", "type": 0});
            worker
                .handle_datagram(now, &datagram(HOLDER, "PROJECT_ANNOUNCE", announce))
                .unwrap();
            worker.fetched(&format!("p{n}"), true);
        }
        let actions = drain(&mut worker);
        assert!(actions.contains(&Action::Forget {
            project: "p0".into()
        }));
        assert_eq!(worker.projects.len(), MAX_PROJECTS);
    }
}
