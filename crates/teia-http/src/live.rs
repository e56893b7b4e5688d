//! The node's live events for the web: every event the node shows with `--json` is published
//! here once, as its JSON text, and fanned out to each `GET /events` stream; the chat's
//! messages are also kept, with each one's delivery state, for `GET /api/chat`. The node's
//! interface feeds it ([`Live::publish`]); it owns nothing else.
//!
//! **Bounds**: [`EVENTS_BUFFERED`] events wait for the slowest stream, each of
//! [`MAX_EVENT_BYTES`] at most (a longer one goes out cut to its kind and ids, with
//! `"cut": true`: the page reloads what it names), so 16 MiB at most; a stream further
//! behind skips what it missed and is told so with a `{"event":"lagged","missed":N}` event
//! (the page then reloads its views). [`CHAT_KEPT`] chat entries are kept, in memory (and,
//! given a [`ChatHistory`], on disk for the next start), the oldest forgotten first; texts longer than [`CHAT_TEXT_KEPT`] bytes are cut. Counters are kept for
//! [`EVENT_KINDS_COUNTED`] kinds of event at most (others count as `other`). An outcome that
//! comes before its message's `sent` (the ACK can beat it) waits for it among the last
//! [`EARLY_OUTCOMES_KEPT`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use teia_node::sync::lock;
use tokio::sync::broadcast;

use crate::history::ChatHistory;

/// Events buffered for the slowest `/events` stream.
pub const EVENTS_BUFFERED: usize = 512;
/// Bytes of one event sent to the streams at most.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Chat entries kept for `GET /api/chat`.
pub const CHAT_KEPT: usize = 500;
/// Bytes of a chat text kept.
pub const CHAT_TEXT_KEPT: usize = 4096;
/// Kinds of event counted for `/metrics`.
pub const EVENT_KINDS_COUNTED: usize = 64;
/// Outcomes kept until their message's `sent` comes.
pub const EARLY_OUTCOMES_KEPT: usize = 64;

/// The states a chat entry can be in ([`ChatEntry::state`]).
pub const CHAT_STATES: &[&str] = &[
    "received",
    "sent",
    "relayed",
    "delivered",
    "failed",
    "published",
];

/// `text` cut to [`CHAT_TEXT_KEPT`] bytes, on a character.
pub(crate) fn cut_text(mut text: String) -> String {
    if text.len() > CHAT_TEXT_KEPT {
        let mut cut = CHAT_TEXT_KEPT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// One message of the conversation, as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatEntry {
    /// The message's id.
    pub msg_id: String,
    /// `in` (received) or `out` (said here).
    pub direction: &'static str,
    /// Who said it (`name@namespace`).
    pub src: String,
    /// Where it went: a peer, `#namespace` or `*`.
    pub dst: String,
    /// The text (a payload that is not text, as JSON).
    pub text: String,
    /// `received`; or, said here, `sent`, `relayed`, `delivered`, `failed`, or
    /// `published` (to a namespace or everyone: no acknowledgement comes).
    pub state: &'static str,
    /// Why it failed, or who acknowledged it.
    pub detail: Option<String>,
    /// When this node heard of it, in Unix milliseconds.
    pub at_ms: u64,
}

/// The live events' hub.
pub struct Live {
    events: broadcast::Sender<Arc<str>>,
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    /// The conversation, each entry with its sequence number (the history's key).
    chat: VecDeque<(u64, ChatEntry)>,
    next_seq: u64,
    history: Option<ChatHistory>,
    /// Outcomes (kind, event) whose `sent` has not come yet.
    early: VecDeque<(String, Value)>,
    counted: BTreeMap<String, u64>,
    /// Bytes by (service, direction), as the events say them.
    bytes: BTreeMap<(&'static str, &'static str), u64>,
    peer_id: String,
}

impl Live {
    /// A hub for the node `peer_id`, with no event yet and its chat in memory only.
    pub fn new(peer_id: &str) -> Arc<Self> {
        Self::with_history(peer_id, None)
    }

    /// A hub for the node `peer_id` whose chat starts with what `history` kept and keeps
    /// each change there ([`ChatHistory::open`]).
    pub fn with_history(
        peer_id: &str,
        history: Option<(ChatHistory, Vec<(u64, ChatEntry)>)>,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        let (history, kept) = history.map_or((None, Vec::new()), |(h, kept)| (Some(h), kept));
        let next_seq = kept.last().map_or(0, |(seq, _)| seq.saturating_add(1));
        let start = kept.len().saturating_sub(CHAT_KEPT);
        Arc::new(Self {
            events,
            state: Mutex::new(LiveState {
                chat: kept.into_iter().skip(start).collect(),
                next_seq,
                history,
                peer_id: peer_id.to_owned(),
                ..LiveState::default()
            }),
        })
    }

    /// Chat writes the history dropped since the start (its disk was behind).
    pub fn history_dropped(&self) -> u64 {
        lock(&self.state)
            .history
            .as_ref()
            .map_or(0, ChatHistory::dropped)
    }

    /// Publishes `event` (a JSON object with an `event` field, as `--json` prints it) to
    /// every stream, and records what it says of the chat.
    pub fn publish(&self, event: &Value) {
        let kind = event
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("other");
        {
            let mut state = lock(&self.state);
            let counted = state.counted.len();
            let key = if counted >= EVENT_KINDS_COUNTED && !state.counted.contains_key(kind) {
                "other"
            } else {
                kind
            };
            *state.counted.entry(key.to_owned()).or_default() += 1;
            let amount = |field: &str| event.get(field).and_then(Value::as_u64).unwrap_or(0);
            let payload = || {
                event
                    .get("payload")
                    .map_or(0, |p| p.to_string().len() as u64)
            };
            let moved = match kind {
                "served" => Some((("files", "out"), amount("bytes"))),
                "download_done" => Some((("files", "in"), amount("fetched"))),
                "message" => Some((("chat", "in"), payload())),
                "sent" => Some((("chat", "out"), payload())),
                _ => None,
            };
            if let Some((key, n)) = moved {
                *state.bytes.entry(key).or_default() += n;
            }
            state.record_chat(kind, event);
        }
        let mut text = event.to_string();
        if text.len() > MAX_EVENT_BYTES {
            let mut cut = serde_json::Map::new();
            for field in [
                "event", "msg_id", "hash", "id", "src", "dst", "holder", "text",
            ] {
                if let Some(value) = event.get(field).filter(|v| v.to_string().len() < 1024) {
                    cut.insert(field.into(), value.clone());
                }
            }
            cut.insert("cut".into(), Value::Bool(true));
            text = Value::Object(cut).to_string();
        }
        // No stream open is no error: the event is only counted.
        let _ = self.events.send(Arc::from(text));
    }

    /// A new stream of the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// The `/events` streams open now.
    pub fn streams(&self) -> usize {
        self.events.receiver_count()
    }

    /// The conversation kept, oldest first.
    pub fn chat(&self) -> Vec<ChatEntry> {
        lock(&self.state)
            .chat
            .iter()
            .map(|(_, entry)| entry.clone())
            .collect()
    }

    /// Bytes each service moved since the start, by (service, direction): file sharing's
    /// served and fetched, the chat's payloads said and heard.
    pub fn bytes(&self) -> Vec<((&'static str, &'static str), u64)> {
        lock(&self.state)
            .bytes
            .iter()
            .map(|(key, n)| (*key, *n))
            .collect()
    }

    /// Events published since the start, by kind.
    pub fn counted(&self) -> Vec<(String, u64)> {
        lock(&self.state)
            .counted
            .iter()
            .map(|(kind, n)| (kind.clone(), *n))
            .collect()
    }
}

impl LiveState {
    fn record_chat(&mut self, kind: &str, event: &Value) {
        let text = |name: &str| {
            event
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let msg_id = text("msg_id");
        match kind {
            "message" | "sent" => {
                let payload = event.get("payload").cloned().unwrap_or(Value::Null);
                let said = cut_text(match payload {
                    Value::String(said) => said,
                    other => other.to_string(),
                });
                let dst = text("dst");
                let (direction, src, state) = if kind == "message" {
                    ("in", text("src"), "received")
                } else if dst.starts_with('#') || dst == "*" {
                    ("out", self.peer_id.clone(), "published")
                } else {
                    ("out", self.peer_id.clone(), "sent")
                };
                if self.chat.len() >= CHAT_KEPT {
                    self.chat.pop_front();
                }
                let entry = ChatEntry {
                    msg_id: msg_id.clone(),
                    direction,
                    src,
                    dst,
                    text: said,
                    state,
                    detail: None,
                    at_ms: unix_ms(),
                };
                let seq = self.next_seq;
                self.next_seq = seq.saturating_add(1);
                if let Some(history) = &self.history {
                    history.keep(seq, &entry);
                }
                self.chat.push_back((seq, entry));
                if direction == "out" {
                    let early: Vec<(String, Value)> = self
                        .early
                        .iter()
                        .filter(|(_, e)| e.get("msg_id").and_then(Value::as_str) == Some(&msg_id))
                        .cloned()
                        .collect();
                    self.early
                        .retain(|(_, e)| e.get("msg_id").and_then(Value::as_str) != Some(&msg_id));
                    for (kind, event) in early {
                        self.record_chat(&kind, &event);
                    }
                }
            }
            "ack" | "undelivered" | "relay" => {
                let Some((seq, entry)) = self
                    .chat
                    .iter_mut()
                    .rev()
                    .find(|(_, e)| e.direction == "out" && e.msg_id == msg_id)
                else {
                    if self.early.len() >= EARLY_OUTCOMES_KEPT {
                        self.early.pop_front();
                    }
                    self.early.push_back((kind.to_owned(), event.clone()));
                    return;
                };
                match kind {
                    "ack" => {
                        entry.state = "delivered";
                        entry.detail = Some(text("from"));
                    }
                    "undelivered" => {
                        entry.state = "failed";
                        entry.detail = Some(text("reason"));
                    }
                    _ if entry.state == "sent" && event.get("ok") == Some(&Value::Bool(true)) => {
                        entry.state = "relayed";
                        entry.detail = Some(text("via"));
                    }
                    _ => return,
                }
                if let Some(history) = &self.history {
                    history.keep(*seq, entry);
                }
            }
            _ => {}
        }
    }
}

/// The time now, in Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_chat_keeps_each_message_with_its_delivery_state() {
        let live = Live::new("ana@lab");
        let mut stream = live.subscribe();
        live.publish(&json!({"event":"ack","msg_id":"m0","from":"bob@lab"}));
        live.publish(&json!({"event":"sent","msg_id":"m0","dst":"bob@lab","payload":"early"}));
        live.publish(&json!({"event":"sent","msg_id":"m1","dst":"bob@lab","payload":"oi"}));
        live.publish(&json!({"event":"relay","msg_id":"m1","via":"carl@lab","ok":true}));
        live.publish(&json!({"event":"sent","msg_id":"m2","dst":"#lab","payload":"todos"}));
        live.publish(&json!({"event":"message","msg_id":"m3","src":"bob@lab",
                             "dst":"ana@lab","payload":{"n":1}}));
        live.publish(&json!({"event":"ack","msg_id":"m1","from":"bob@lab"}));
        let chat = live.chat();
        assert_eq!(chat.len(), 4);
        assert_eq!(
            chat[0].state, "delivered",
            "an ACK that came before its sent"
        );
        assert_eq!(
            (chat[1].state, chat[1].detail.as_deref()),
            ("delivered", Some("bob@lab"))
        );
        assert_eq!(chat[2].state, "published");
        assert_eq!(
            (chat[3].direction, chat[3].text.as_str()),
            ("in", "{\"n\":1}")
        );
        let first: Value = serde_json::from_str(&stream.try_recv().unwrap()).unwrap();
        assert_eq!(first["msg_id"], "m0");
        assert!(live.counted().contains(&("sent".to_owned(), 3)));
    }

    #[test]
    fn an_event_too_long_goes_out_cut_to_its_ids() {
        let live = Live::new("ana@lab");
        let mut stream = live.subscribe();
        live.publish(&json!({"event":"message","msg_id":"m1","src":"bob@lab",
                             "payload":"x".repeat(MAX_EVENT_BYTES)}));
        let sent: Value = serde_json::from_str(&stream.try_recv().unwrap()).unwrap();
        assert_eq!(
            sent,
            json!({"event":"message","msg_id":"m1","src":"bob@lab","cut":true})
        );
        assert_eq!(
            live.chat()[0].text.len(),
            CHAT_TEXT_KEPT,
            "kept whole up to its bound"
        );
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let live = Live::new("ana@lab");
        for n in 0..CHAT_KEPT + 10 {
            live.publish(
                &json!({"event":"message","msg_id":format!("m{n}"),"src":"bob@lab",
                                 "dst":"ana@lab","payload":"é".repeat(CHAT_TEXT_KEPT)}),
            );
        }
        for n in 0..EVENT_KINDS_COUNTED + 10 {
            live.publish(&json!({"event":format!("kind{n}")}));
        }
        let chat = live.chat();
        assert_eq!(chat.len(), CHAT_KEPT);
        assert_eq!(chat[0].msg_id, "m10");
        assert!(chat[0].text.len() <= CHAT_TEXT_KEPT);
        assert!(live.counted().len() <= EVENT_KINDS_COUNTED + 1);
    }
}
