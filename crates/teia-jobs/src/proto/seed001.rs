//! Seed 001's master/worker messages, sans-IO: reading them in both envelopes the course's
//! workers use (flat `{"action":"REGISTER",...}` and `{"type":"REGISTER","data":{...}}`),
//! one JSON object per TCP connection with no newline and no length prefix (read
//! incrementally: a reply never waits for the peer to close), replying in the envelope
//! asked in, and the master's task table: each task leased to one worker, handed to
//! another when its worker stops heartbeating or its lease runs out, a result that does not
//! name its task matched by the worker's lease.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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

#[derive(Debug)]
struct Worker {
    heard: Instant,
    /// The task it holds and until when.
    lease: Option<(String, Instant)>,
}

/// What the master's table decided for a `SUBMIT_RESULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The result of this task, which is done.
    Done(Task),
    /// No task of this worker to match it with (already done, or handed to another).
    Unmatched,
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

/// The master's tasks and workers.
#[derive(Debug, Default)]
pub struct Master {
    /// Names of the tasks waiting or leased.
    names: HashSet<String>,
    waiting: VecDeque<Task>,
    leased: BTreeMap<String, Task>,
    workers: HashMap<String, Worker>,
    /// Times each task waiting or leased failed to run (none when it never did).
    failures: HashMap<String, u32>,
}

impl Master {
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
        true
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
    pub fn holder(&self, name: &str) -> Option<&str> {
        self.workers
            .iter()
            .find(|(_, w)| w.lease.as_ref().is_some_and(|(held, _)| held == name))
            .map(|(id, _)| id.as_str())
    }

    /// Notes that `worker` spoke; false when the table of workers is full.
    pub fn heard(&mut self, worker: &str, now: Instant) -> bool {
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
                .map(|(id, _)| id.clone());
            match idle {
                Some(id) => {
                    self.workers.remove(&id);
                }
                None => return false,
            }
        }
        self.workers.insert(
            worker.to_owned(),
            Worker {
                heard: now,
                lease: None,
            },
        );
        true
    }

    /// A task for `worker`, whose ZIP is at most `max_size` bytes; the one it holds if it
    /// asks again.
    pub fn request(&mut self, worker: &str, now: Instant, max_size: u64) -> Option<Task> {
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
        self.leased.insert(task.name.clone(), task.clone());
        if let Some(known) = self.workers.get_mut(worker) {
            known.lease = Some((task.name.clone(), now + LEASE));
        }
        Some(task)
    }

    /// A result from `worker`, for `named` or else for the task it holds.
    pub fn submit(&mut self, worker: &str, named: Option<&str>, now: Instant) -> Submitted {
        self.heard(worker, now);
        let held = self
            .workers
            .get(worker)
            .and_then(|w| w.lease.as_ref().map(|(t, _)| t.clone()));
        let name = match (named, &held) {
            (Some(named), _) if self.leased.contains_key(named) => named.to_owned(),
            (Some(named), Some(held)) if named.trim_start_matches("result_") == held => {
                held.clone()
            }
            (_, Some(held)) => held.clone(),
            (Some(_), None) | (None, None) => return Submitted::Unmatched,
        };
        let Some(task) = self.leased.remove(&name) else {
            return Submitted::Unmatched;
        };
        self.names.remove(&name);
        self.failures.remove(&name);
        for known in self.workers.values_mut() {
            if known.lease.as_ref().is_some_and(|(t, _)| *t == name) {
                known.lease = None;
            }
        }
        Submitted::Done(task)
    }

    /// `worker` could not run the task it holds: it waits again, last in line, unless it
    /// failed [`MAX_FAILURES`] times.
    pub fn failed(&mut self, worker: &str, now: Instant) -> Failed {
        self.heard(worker, now);
        let held = self.workers.get_mut(worker).and_then(|w| w.lease.take());
        let Some(task) = held.and_then(|(name, _)| self.leased.remove(&name)) else {
            return Failed::Unmatched;
        };
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
    pub fn renew(&mut self, worker: &str, now: Instant) {
        if let Some(known) = self.workers.get_mut(worker) {
            known.heard = now;
            if let Some((_, until)) = known.lease.as_mut() {
                *until = now + LEASE;
            }
        }
    }

    /// Forgets `worker` (its connection ended) and takes back the task it held, if any: it
    /// waits again, first in line. Returns the task's name.
    pub fn give_back(&mut self, worker: &str) -> Option<String> {
        let (name, _) = self.workers.remove(worker)?.lease?;
        let task = self.leased.remove(&name)?;
        self.waiting.push_front(task);
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
            }
        }
        taken
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

    #[test]
    fn a_task_goes_to_one_worker_and_to_another_when_the_first_goes_silent() {
        let start = Instant::now();
        let mut master = Master::default();
        assert!(master.add("a.zip", 100));
        assert!(master.add("b.zip", 100));
        assert!(!master.add("a.zip", 100), "a name is queued once");
        assert!(master.add("big.zip", 1 << 20));
        let a = master.request("w1", start, MAX_PACKAGE as u64).unwrap();
        assert_eq!(a.name, "a.zip");
        // Asking again, w1 gets the task it holds.
        assert_eq!(
            master
                .request("w1", start, MAX_PACKAGE as u64)
                .unwrap()
                .name,
            "a.zip"
        );
        let b = master.request("w2", start, MAX_PACKAGE as u64).unwrap();
        assert_eq!(b.name, "b.zip");
        // The big task is not for course workers.
        assert_eq!(master.request("w3", start, MAX_PACKAGE as u64), None);
        // w2 keeps heartbeating; w1 falls silent.
        let later = start + WORKER_SILENT;
        master.heard("w2", later - Duration::from_secs(1));
        assert_eq!(master.expire(later), vec!["a.zip".to_owned()]);
        let again = master.request("w3", later, MAX_PACKAGE as u64).unwrap();
        assert_eq!((again.name.as_str(), again.attempts), ("a.zip", 2));
        // w1's late result no longer matches; w3's result, unnamed, matches its lease.
        assert_eq!(
            master.submit("w1", Some("a.zip"), later),
            Submitted::Done(again.clone())
        );
        assert_eq!(master.submit("w3", None, later), Submitted::Unmatched);
        assert_eq!(
            master.submit("w2", Some("result_b.zip"), later),
            Submitted::Done(b)
        );
        assert_eq!(master.counts(), (1, 0));
    }

    #[test]
    fn a_task_given_back_goes_first_to_the_next_worker() {
        let now = Instant::now();
        let mut master = Master::default();
        assert!(master.add("a.zip", 10));
        assert!(master.add("b.zip", 10));
        let a = master.request("teia:x#1", now, u64::MAX).unwrap();
        assert_eq!(master.holder("a.zip"), Some("teia:x#1"));
        assert_eq!(master.holder("b.zip"), None);
        // Renewed, a lease outlives LEASE.
        master.renew("teia:x#1", now + LEASE - Duration::from_secs(1));
        assert!(master.expire(now + LEASE).is_empty());
        assert_eq!(master.give_back("teia:x#1"), Some(a.name.clone()));
        assert_eq!(
            master.give_back("teia:x#1"),
            None,
            "the worker is forgotten"
        );
        assert_eq!(master.counts(), (2, 0));
        let again = master.request("teia:y#2", now, u64::MAX).unwrap();
        assert_eq!((again.name.as_str(), again.attempts), ("a.zip", 2));
        assert_eq!(
            master.submit("teia:y#2", Some("a.zip"), now),
            Submitted::Done(again)
        );
        assert_eq!(
            master.give_back("teia:y#2"),
            None,
            "nothing held after its result"
        );
        assert_eq!(master.counts(), (1, 0));
    }

    #[test]
    fn a_task_that_cannot_run_is_retried_last_in_line_then_given_up() {
        let now = Instant::now();
        let mut master = Master::default();
        assert!(master.add("broken.zip", 10));
        assert!(master.add("fine.zip", 10));
        assert_eq!(master.failed("w", now), Failed::Unmatched);
        let first = master.request("w", now, u64::MAX).unwrap();
        assert_eq!(first.name, "broken.zip");
        assert_eq!(master.failed("w", now), Failed::Retry);
        assert_eq!(master.request("w", now, u64::MAX).unwrap().name, "fine.zip");
        assert_eq!(
            master.submit("w", None, now),
            Submitted::Done(Task {
                name: "fine.zip".into(),
                size: 10,
                attempts: 1
            })
        );
        for attempt in 2..MAX_FAILURES {
            assert_eq!(
                master.request("w", now, u64::MAX).unwrap().attempts,
                attempt
            );
            assert_eq!(master.failed("w", now), Failed::Retry);
        }
        let last = master.request("w", now, u64::MAX).unwrap();
        assert_eq!(master.failed("w", now), Failed::GiveUp(last));
        assert_eq!(master.counts(), (0, 0));
        assert_eq!(master.leased("broken.zip"), None);
        assert!(
            master.add("broken.zip", 10),
            "a new file of that name is a new task"
        );
    }
}
