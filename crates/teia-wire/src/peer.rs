//! Peer-link messages (PROTOCOL.md sections 3 to 5): typed, written strictly, read
//! liberally. Every message is a JSON object with a `type`; unknown types are kept as
//! [`Message::Unknown`] so the caller can ignore them.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::codec::{EncodeError, MAX_LINE};
use crate::fields::{liberal_string, liberal_u64, message_type};

/// Protocol version written in HELLO.
pub const VERSION: &str = "1.0";
/// Default ttl of a routed message.
pub const DEFAULT_TTL: u32 = 8;
/// Largest ttl read; a larger one is malformed.
pub const MAX_TTL: u32 = 255;

/// Features a peer may announce in HELLO.
pub mod feature {
    /// End-to-end ACK of SEND.
    pub const ACK: &str = "ack";
    /// Forwarding for other peers.
    pub const RELAY: &str = "relay";
    /// WHO_HAS route discovery.
    pub const WHO_HAS: &str = "who_has";
    /// METRICS_REQ / METRICS.
    pub const METRICS: &str = "metrics";
    /// teia's extensions (PEER_LIST, batching).
    pub const TEIA: &str = "teia";
    /// Everything teia speaks.
    pub const ALL: [&str; 5] = [ACK, RELAY, WHO_HAS, METRICS, TEIA];
}

/// HELLO and HELLO_OK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hello {
    /// `name@namespace` of the sender.
    pub peer_id: String,
    /// Protocol version.
    pub version: String,
    /// Features announced (HELLO) or agreed (HELLO_OK).
    pub features: Vec<String>,
    /// Port the sender accepts links on, if any (teia extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Software of the sender (teia extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// A Noise handshake message, base64url (teia extension, PROTOCOL.md section 4.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<String>,
    /// Always 1.
    pub ttl: u32,
}

impl Hello {
    /// True when `feature` was announced.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// PING and PONG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ping {
    /// Echoed by PONG.
    pub msg_id: String,
    /// ISO-8601 UTC when written; any string or number when read.
    pub timestamp: String,
    /// Always 1.
    pub ttl: u32,
}

/// BYE and BYE_OK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bye {
    /// Id of the BYE (echoed by BYE_OK).
    pub msg_id: String,
    /// Sender.
    pub src: String,
    /// Receiver.
    pub dst: String,
    /// Why (BYE only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Always 1.
    pub ttl: u32,
}

/// SEND (unicast) and PUB (namespace-cast or broadcast).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Data {
    /// Unique id.
    pub msg_id: String,
    /// Origin.
    pub src: String,
    /// `name@namespace`, `#namespace` or `*`.
    pub dst: String,
    /// The application's payload: a string for chat, any JSON value when read.
    pub payload: Value,
    /// True for SEND, false for PUB.
    pub require_ack: bool,
    /// Hops left.
    pub ttl: u32,
    /// The origin's signature (teia nodes; PROTOCOL.md section 4.1).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
}

/// An origin signature: `sig` by `key` over the message's origin fields (PROTOCOL.md 4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Auth {
    /// The signer's ed25519 public key, base64url.
    pub key: String,
    /// The signature, base64url.
    pub sig: String,
    /// Who signed, when not `src`: the teia node a course peer's message entered through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// When the signature covers a batch of messages: the sibling hashes from this message's
    /// leaf up to the batch's root, base64url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// The message's position in its batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaf: Option<u32>,
}

/// NOISE (teia): the third message of the Noise handshake, after which the link is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Noise {
    /// The handshake message, base64url.
    pub msg: String,
    /// Always 1.
    pub ttl: u32,
}

/// ACK of a SEND, routed back to the SEND's origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// The SEND's id.
    pub msg_id: String,
    /// Who acknowledges (absent in older clients' ACKs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// The SEND's origin (absent in older clients' ACKs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Who received the SEND.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// When.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Hops left.
    pub ttl: u32,
    /// The acknowledging node's signature (teia nodes).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
}

/// WHO_HAS: route discovery for `dst`, flooded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WhoHas {
    /// Unique id; the HIT carries it back.
    pub msg_id: String,
    /// Who searches.
    pub src: String,
    /// Who is searched.
    pub dst: String,
    /// Hops left.
    pub ttl: u32,
}

/// WHO_HAS_HIT: the answer, travelling back along the reverse path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WhoHasHit {
    /// The WHO_HAS's id.
    pub msg_id: String,
    /// Who sends this HIT (the answering peer, then each hop back).
    pub src: String,
    /// The searched peer (not the receiver).
    pub dst: String,
    /// The answering peer.
    pub via: String,
    /// Distance from the sender of this HIT to `dst`.
    pub hops: u32,
    /// Hops left.
    pub ttl: u32,
}

/// RELAY_OK and RELAY_FAIL, sent by a hop to the origin of a SEND it forwarded (or could not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relay {
    /// The SEND's id.
    pub msg_id: String,
    /// The hop.
    pub src: String,
    /// The SEND's origin.
    pub dst: String,
    /// Why it failed (RELAY_FAIL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Hops left.
    pub ttl: u32,
}

/// METRICS_REQ, link-local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsReq {
    /// Unique id, echoed by METRICS.
    pub msg_id: String,
    /// Who asks.
    pub src: String,
    /// Who is asked.
    pub dst: String,
    /// Always 1.
    pub ttl: u32,
}

/// METRICS, link-local: the answering side's view of the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// The METRICS_REQ's id.
    pub msg_id: String,
    /// Who answers.
    pub src: String,
    /// Who asked.
    pub dst: String,
    /// Round-trip time of the link in milliseconds, if measured.
    pub rtt_ms: Option<u64>,
    /// Messages sent on the link.
    pub sent_count: u64,
    /// Messages received on the link.
    pub recv_count: u64,
    /// When the last message arrived (ISO-8601).
    pub last_seen: String,
    /// Always 1.
    pub ttl: u32,
}

/// ERROR, on the link or routed to the origin of the offending message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorMsg {
    /// Always `"ERROR"`.
    pub status: String,
    /// The code (`code` is read as a synonym).
    pub error: String,
    /// `msg_id` of the offending message.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Human-readable detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The limit exceeded, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Who reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// To whom, when routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Hops left.
    pub ttl: u32,
}

/// One entry of a PEER_LIST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerEntry {
    /// `name@namespace`.
    pub peer_id: String,
    /// Address to dial.
    pub ip: String,
    /// Port to dial.
    pub port: u16,
}

/// PEER_LIST (teia only): the sender's neighbours that can be dialed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerList {
    /// The neighbours.
    pub peers: Vec<PeerEntry>,
    /// Always 1.
    pub ttl: u32,
}

/// QUERY (teia only): a service's question flooded through the overlay, Gnutella-style
/// (PROTOCOL.md section 5): every teia node that has not seen `query_id` answers it if it
/// can, and passes it on with `ttl` one lower.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Query {
    /// Unique id, for dedup and for routing the answers back.
    pub query_id: String,
    /// Who asks.
    pub src: String,
    /// Which service answers (`files`).
    pub service: String,
    /// The question, as the service defines it.
    pub body: Value,
    /// Hops left.
    pub ttl: u32,
}

/// QUERY_HIT (teia only): an answer to a QUERY, sent back hop by hop along the path the
/// query came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryHit {
    /// The query answered.
    pub query_id: String,
    /// Who answers.
    pub src: String,
    /// The answer, as the service defines it.
    pub body: Value,
    /// Hops left.
    pub ttl: u32,
}

/// SPLICE_ASK (teia only, link-local): asks the neighbour it is sent to, which listens, to
/// splice a data stream between the sender and `with`, another neighbour of it that asks
/// the same, naming the sender and the same `ask` (PROTOCOL.md section 6, Splicing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpliceAsk {
    /// Names the splice; both sides ask with the same.
    pub ask: String,
    /// The other side's peer id.
    pub with: String,
    /// Always 1.
    pub ttl: u32,
}

/// SPLICE_GRANT (teia only, link-local): the splicing node's answer to each side once both
/// asked: the token that joins this side's connection, once, at `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpliceGrant {
    /// The ask answered.
    pub ask: String,
    /// The other side's peer id.
    pub with: String,
    /// This side's token.
    pub token: String,
    /// The splicing node's listen port (its address is the link's).
    pub port: u16,
    /// Always 1.
    pub ttl: u32,
}

/// SPLICE_REFUSED (teia only, link-local): the splicing node will not splice this ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpliceRefused {
    /// The ask refused.
    pub ask: String,
    /// The other side's peer id.
    pub with: String,
    /// Why: `bad_request`, `busy` or `unsupported`.
    pub reason: String,
    /// Always 1.
    pub ttl: u32,
}

/// Error codes of peer links (PROTOCOL.md section 4).
pub mod code {
    /// A routed message ran out of hops.
    pub const TTL_EXPIRED: &str = "ttl_expired";
    /// No route to the destination.
    pub const NO_ROUTE: &str = "no_route";
    /// The sender exceeded its share.
    pub const OVER_QUOTA: &str = "over_quota";
    /// This node's queues are full.
    pub const BUSY: &str = "busy";
    /// Not allowed.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Not a JSON object, or a field the type needs is missing.
    pub const BAD_FORMAT: &str = "bad_format";
    /// Line over 32768 bytes.
    pub const LINE_TOO_LONG: &str = "line_too_long";
    /// Not understood.
    pub const UNKNOWN_COMMAND: &str = "unknown_command";
}

/// Any peer-link message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a link.
    Hello(Hello),
    /// Accepts a link.
    HelloOk(Hello),
    /// Keep-alive probe.
    Ping(Ping),
    /// Keep-alive answer.
    Pong(Ping),
    /// Closes a link.
    Bye(Bye),
    /// Acknowledges BYE.
    ByeOk(Bye),
    /// Unicast data.
    Send(Data),
    /// Namespace-cast or broadcast data.
    Pub(Data),
    /// End-to-end acknowledgement of SEND.
    Ack(Ack),
    /// Route discovery.
    WhoHas(WhoHas),
    /// Route discovery answer.
    WhoHasHit(WhoHasHit),
    /// A hop forwarded a SEND.
    RelayOk(Relay),
    /// A hop could not forward a SEND.
    RelayFail(Relay),
    /// Link metrics request.
    MetricsReq(MetricsReq),
    /// Link metrics.
    Metrics(Metrics),
    /// An error report.
    Error(ErrorMsg),
    /// Peer exchange.
    PeerList(PeerList),
    /// Last handshake message of an encrypted link.
    Noise(Noise),
    /// A flooded service query.
    Query(Query),
    /// An answer to a query.
    QueryHit(QueryHit),
    /// Asks a neighbour to splice a data stream.
    SpliceAsk(SpliceAsk),
    /// Grants a splice.
    SpliceGrant(SpliceGrant),
    /// Refuses a splice.
    SpliceRefused(SpliceRefused),
    /// A type this node does not know; ignored.
    Unknown(String),
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct ParseError {
    /// The message's `msg_id`, if it had one, for the `ref` of the ERROR answer.
    pub msg_id: Option<String>,
    /// What was wrong.
    pub detail: String,
}

impl Message {
    /// The wire `type` of this message.
    pub fn kind(&self) -> &str {
        match self {
            Self::Hello(_) => "HELLO",
            Self::HelloOk(_) => "HELLO_OK",
            Self::Ping(_) => "PING",
            Self::Pong(_) => "PONG",
            Self::Bye(_) => "BYE",
            Self::ByeOk(_) => "BYE_OK",
            Self::Send(_) => "SEND",
            Self::Pub(_) => "PUB",
            Self::Ack(_) => "ACK",
            Self::WhoHas(_) => "WHO_HAS",
            Self::WhoHasHit(_) => "WHO_HAS_HIT",
            Self::RelayOk(_) => "RELAY_OK",
            Self::RelayFail(_) => "RELAY_FAIL",
            Self::MetricsReq(_) => "METRICS_REQ",
            Self::Metrics(_) => "METRICS",
            Self::Error(_) => "ERROR",
            Self::PeerList(_) => "PEER_LIST",
            Self::Noise(_) => "NOISE",
            Self::Query(_) => "QUERY",
            Self::QueryHit(_) => "QUERY_HIT",
            Self::SpliceAsk(_) => "SPLICE_ASK",
            Self::SpliceGrant(_) => "SPLICE_GRANT",
            Self::SpliceRefused(_) => "SPLICE_REFUSED",
            Self::Unknown(kind) => kind,
        }
    }

    /// Encodes the message as one line, `type` first.
    pub fn to_line(&self) -> Result<Vec<u8>, EncodeError> {
        let body = match self {
            Self::Hello(m) | Self::HelloOk(m) => serde_json::to_vec(m),
            Self::Ping(m) | Self::Pong(m) => serde_json::to_vec(m),
            Self::Bye(m) | Self::ByeOk(m) => serde_json::to_vec(m),
            Self::Send(m) | Self::Pub(m) => serde_json::to_vec(m),
            Self::Ack(m) => serde_json::to_vec(m),
            Self::WhoHas(m) => serde_json::to_vec(m),
            Self::WhoHasHit(m) => serde_json::to_vec(m),
            Self::RelayOk(m) | Self::RelayFail(m) => serde_json::to_vec(m),
            Self::MetricsReq(m) => serde_json::to_vec(m),
            Self::Metrics(m) => serde_json::to_vec(m),
            Self::Error(m) => serde_json::to_vec(m),
            Self::PeerList(m) => serde_json::to_vec(m),
            Self::Noise(m) => serde_json::to_vec(m),
            Self::Query(m) => serde_json::to_vec(m),
            Self::QueryHit(m) => serde_json::to_vec(m),
            Self::SpliceAsk(m) => serde_json::to_vec(m),
            Self::SpliceGrant(m) => serde_json::to_vec(m),
            Self::SpliceRefused(m) => serde_json::to_vec(m),
            Self::Unknown(_) => Ok(b"{}".to_vec()),
        }?;
        // `body` is an object, `{...}`: put `"type":KIND` first inside it.
        let kind = serde_json::to_vec(self.kind())?;
        let fields = body
            .get(1..body.len().saturating_sub(1))
            .unwrap_or_default();
        let mut line = Vec::with_capacity(body.len() + kind.len() + 10);
        line.extend_from_slice(b"{\"type\":");
        line.extend_from_slice(&kind);
        if !fields.is_empty() {
            line.push(b',');
            line.extend_from_slice(fields);
        }
        line.extend_from_slice(b"}\n");
        if line.len() > MAX_LINE {
            return Err(EncodeError::TooLong {
                len: line.len(),
                limit: MAX_LINE,
            });
        }
        Ok(line)
    }

    /// Reads a message from a JSON object, liberally: numbers as strings, missing optional
    /// fields, `code` for `error`, a bare namespace as a PUB destination.
    pub fn from_object(object: &Map<String, Value>) -> Result<Self, ParseError> {
        Self::read(object, object.get("payload").cloned())
    }

    /// [`Message::from_object`], the payload of a SEND or PUB given apart (moved out of
    /// the object rather than copied).
    fn read(object: &Map<String, Value>, payload: Option<Value>) -> Result<Self, ParseError> {
        let payload = payload.unwrap_or(Value::Null);
        let reader = Reader(object);
        let Some(kind) = message_type(object) else {
            // Some course servers answer with a bare {"status":"ERROR",...}.
            if object.get("status").and_then(Value::as_str) == Some("ERROR") {
                return Ok(Self::Error(reader.error()));
            }
            return Err(reader.fail("missing type"));
        };
        Ok(match kind.as_str() {
            "HELLO" => Self::Hello(reader.hello()?),
            "HELLO_OK" => Self::HelloOk(reader.hello()?),
            "PING" => Self::Ping(reader.ping()?),
            "PONG" => Self::Pong(reader.ping()?),
            "BYE" => Self::Bye(reader.bye()),
            "BYE_OK" => Self::ByeOk(reader.bye()),
            "SEND" => Self::Send(reader.data(true, payload)?),
            "PUB" => {
                let mut data = reader.data(false, payload)?;
                if !data.dst.starts_with('#') && data.dst != "*" && !data.dst.contains('@') {
                    data.dst = format!("#{}", data.dst);
                }
                Self::Pub(data)
            }
            "ACK" => Self::Ack(Ack {
                msg_id: reader.required("msg_id")?,
                src: reader.text("src"),
                dst: reader.text("dst"),
                from: reader.text("from"),
                timestamp: reader.text("timestamp"),
                ttl: reader.ttl()?,
                auth: reader.auth(),
            }),
            "WHO_HAS" => Self::WhoHas(WhoHas {
                msg_id: reader.required("msg_id")?,
                src: reader.required("src")?,
                dst: reader.required("dst")?,
                ttl: reader.ttl()?,
            }),
            "WHO_HAS_HIT" => Self::WhoHasHit(WhoHasHit {
                msg_id: reader.required("msg_id")?,
                src: reader.required("src")?,
                dst: reader.required("dst")?,
                via: reader.text("via").unwrap_or_default(),
                hops: reader.number("hops").unwrap_or(0),
                ttl: reader.ttl()?,
            }),
            "RELAY_OK" => Self::RelayOk(reader.relay()?),
            "RELAY_FAIL" => Self::RelayFail(reader.relay()?),
            "METRICS_REQ" => Self::MetricsReq(MetricsReq {
                msg_id: reader.required("msg_id")?,
                src: reader.text("src").unwrap_or_default(),
                dst: reader.text("dst").unwrap_or_default(),
                ttl: 1,
            }),
            "METRICS" => Self::Metrics(Metrics {
                msg_id: reader.text("msg_id").unwrap_or_default(),
                src: reader.text("src").unwrap_or_default(),
                dst: reader.text("dst").unwrap_or_default(),
                rtt_ms: object
                    .get("rtt_ms")
                    .and_then(Value::as_f64)
                    .map(|f| f.max(0.0) as u64),
                sent_count: reader.number("sent_count").unwrap_or(0),
                recv_count: reader.number("recv_count").unwrap_or(0),
                last_seen: reader.text("last_seen").unwrap_or_default(),
                ttl: 1,
            }),
            "ERROR" => Self::Error(reader.error()),
            "PEER_LIST" => Self::PeerList(PeerList {
                peers: object
                    .get("peers")
                    .and_then(Value::as_array)
                    .map(|peers| peers.iter().filter_map(peer_entry).collect())
                    .unwrap_or_default(),
                ttl: 1,
            }),
            "NOISE" => Self::Noise(Noise {
                msg: reader.required("msg")?,
                ttl: 1,
            }),
            "QUERY" => Self::Query(Query {
                query_id: reader.required("query_id")?,
                src: reader.required("src")?,
                service: reader.required("service")?,
                body: object.get("body").cloned().unwrap_or(Value::Null),
                ttl: reader.ttl()?,
            }),
            "QUERY_HIT" => Self::QueryHit(QueryHit {
                query_id: reader.required("query_id")?,
                src: reader.required("src")?,
                body: object.get("body").cloned().unwrap_or(Value::Null),
                ttl: reader.ttl()?,
            }),
            "SPLICE_ASK" => Self::SpliceAsk(SpliceAsk {
                ask: reader.required("ask")?,
                with: reader.required("with")?,
                ttl: 1,
            }),
            "SPLICE_GRANT" => Self::SpliceGrant(SpliceGrant {
                ask: reader.required("ask")?,
                with: reader.required("with")?,
                token: reader.required("token")?,
                port: reader
                    .number("port")
                    .filter(|p: &u16| *p > 0)
                    .ok_or_else(|| reader.fail("missing field port"))?,
                ttl: 1,
            }),
            "SPLICE_REFUSED" => Self::SpliceRefused(SpliceRefused {
                ask: reader.required("ask")?,
                with: reader.required("with")?,
                reason: reader.text("reason").unwrap_or_default(),
                ttl: 1,
            }),
            _ => Self::Unknown(kind),
        })
    }

    /// Parses a line already known to be a JSON object.
    pub fn parse(line: &[u8]) -> Result<Self, ParseError> {
        let mut object = crate::codec::parse_object(line).map_err(|e| ParseError {
            msg_id: None,
            detail: e.to_string(),
        })?;
        let payload = object.get_mut("payload").map(Value::take);
        Self::read(&object, payload)
    }
}

fn peer_entry(value: &Value) -> Option<PeerEntry> {
    let object = value.as_object()?;
    Some(PeerEntry {
        peer_id: object.get("peer_id").and_then(liberal_string)?,
        ip: object.get("ip").and_then(liberal_string)?,
        port: object
            .get("port")
            .and_then(liberal_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)?,
    })
}

struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn text(&self, key: &str) -> Option<String> {
        self.0.get(key).and_then(liberal_string)
    }

    fn number<T: TryFrom<u64>>(&self, key: &str) -> Option<T> {
        self.0
            .get(key)
            .and_then(liberal_u64)
            .and_then(|n| T::try_from(n).ok())
    }

    fn fail(&self, detail: impl Into<String>) -> ParseError {
        ParseError {
            msg_id: self.text("msg_id"),
            detail: detail.into(),
        }
    }

    fn required(&self, key: &str) -> Result<String, ParseError> {
        self.text(key)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.fail(format!("missing field {key}")))
    }

    /// `ttl` as sent (an integer 0 to [`MAX_TTL`], or a string of its digits); a missing
    /// ttl counts as 1 (link-local); anything else is malformed.
    fn ttl(&self) -> Result<u32, ParseError> {
        let Some(value) = self.0.get("ttl") else {
            return Ok(1);
        };
        liberal_u64(value)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t <= MAX_TTL)
            .ok_or_else(|| self.fail(format!("ttl must be an integer from 0 to {MAX_TTL}")))
    }

    fn auth(&self) -> Option<Auth> {
        Some(Auth {
            key: self.text("key")?,
            sig: self.text("sig")?,
            signer: self.text("signer"),
            proof: self.text("proof"),
            leaf: self.number("leaf"),
        })
    }

    fn timestamp(&self) -> String {
        match self.0.get("timestamp") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    }

    fn hello(&self) -> Result<Hello, ParseError> {
        let features = match self.0.get("features") {
            Some(Value::Array(items)) => items.iter().filter_map(liberal_string).collect(),
            Some(Value::String(s)) => s.split(',').map(|f| f.trim().to_owned()).collect(),
            _ => Vec::new(),
        };
        Ok(Hello {
            peer_id: self.required("peer_id")?,
            version: self.text("version").unwrap_or_else(|| VERSION.to_owned()),
            features,
            listen_port: self.number("listen_port").filter(|p: &u16| *p > 0),
            agent: self.text("agent"),
            noise: self.text("noise"),
            ttl: 1,
        })
    }

    fn ping(&self) -> Result<Ping, ParseError> {
        Ok(Ping {
            msg_id: self.required("msg_id")?,
            timestamp: self.timestamp(),
            ttl: 1,
        })
    }

    fn bye(&self) -> Bye {
        Bye {
            msg_id: self.text("msg_id").unwrap_or_default(),
            src: self.text("src").unwrap_or_default(),
            dst: self.text("dst").unwrap_or_default(),
            reason: self.text("reason"),
            ttl: 1,
        }
    }

    fn data(&self, require_ack: bool, payload: Value) -> Result<Data, ParseError> {
        Ok(Data {
            msg_id: self.required("msg_id")?,
            src: self.required("src")?,
            dst: self.required("dst")?,
            payload,
            require_ack: self
                .0
                .get("require_ack")
                .and_then(Value::as_bool)
                .unwrap_or(require_ack),
            ttl: self.ttl()?,
            auth: self.auth(),
        })
    }

    fn relay(&self) -> Result<Relay, ParseError> {
        Ok(Relay {
            msg_id: self.required("msg_id")?,
            src: self.text("src").unwrap_or_default(),
            dst: self.text("dst").unwrap_or_default(),
            reason: self.text("reason"),
            ttl: self.ttl()?,
        })
    }

    fn error(&self) -> ErrorMsg {
        ErrorMsg {
            status: "ERROR".to_owned(),
            error: self
                .text("error")
                .or_else(|| self.text("code"))
                .or_else(|| self.text("message"))
                .unwrap_or_else(|| "unknown".to_owned()),
            reference: self.text("ref"),
            detail: self.text("detail"),
            limit: self.number("limit"),
            src: self.text("src"),
            dst: self.text("dst"),
            ttl: self.ttl().unwrap_or(1),
        }
    }
}

/// Formats 128 random bits as a UUIDv4 string (version and variant bits set).
pub fn uuid_v4(high: u64, low: u64) -> String {
    let high = (high & !0xF000) | 0x4000;
    let low = (low & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xFFFF,
        high & 0xFFFF,
        low >> 48,
        low & 0xFFFF_FFFF_FFFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Message, ParseError> {
        Message::from_object(value.as_object().unwrap())
    }

    #[test]
    fn reads_the_protocol_examples() {
        let hello = parse(json!({"type":"HELLO","peer_id":"alice@UnB","version":"1.0","features":["ack","relay","who_has","metrics","teia"],"ttl":1})).unwrap();
        let Message::Hello(hello) = hello else {
            panic!()
        };
        assert!(hello.has("teia"));
        assert_eq!(hello.listen_port, None);
        let send = parse(json!({"type":"SEND","msg_id":"m456","src":"alice@UnB","dst":"bob@UnB","payload":"Olá Bob!","require_ack":true,"ttl":8})).unwrap();
        assert!(matches!(
            send,
            Message::Send(Data {
                ttl: 8,
                require_ack: true,
                ..
            })
        ));
        let ack = parse(json!({"type":"ACK","msg_id":"m456"})).unwrap();
        assert!(matches!(
            ack,
            Message::Ack(Ack {
                src: None,
                dst: None,
                ..
            })
        ));
        let err = parse(json!({"type":"ERROR","code":"no_route","ref":"m123"})).unwrap();
        let Message::Error(err) = err else { panic!() };
        assert_eq!(
            (err.error.as_str(), err.reference.as_deref()),
            ("no_route", Some("m123"))
        );
        let ping = parse(json!({"type":"PING","msg_id":"m1","timestamp":1726914600.5})).unwrap();
        assert!(
            matches!(ping, Message::Ping(Ping { ref timestamp, .. }) if timestamp == "1726914600.5")
        );
    }

    #[test]
    fn liberal_reading() {
        let p = parse(
            json!({"type":"pub","msg_id":"m","src":"a@U","dst":"UnB","payload":"x","ttl":"3"}),
        )
        .unwrap();
        let Message::Pub(p) = p else { panic!() };
        assert_eq!((p.dst.as_str(), p.ttl), ("#UnB", 3));
        let p = parse(json!({"type":"PUB","msg_id":"m","src":"a@U","dst":"*","payload":{"k":1}}))
            .unwrap();
        assert!(
            matches!(p, Message::Pub(Data { ttl: 1, .. })),
            "missing ttl is link-local"
        );
        let p = parse(json!({"type":"SEND","msg_id":"m","src":"a@U","dst":"b@U","ttl":0})).unwrap();
        assert!(matches!(p, Message::Send(Data { ttl: 0, .. })));
        for bad in [json!(-1), json!("x"), json!(1.5), json!(256)] {
            let e = parse(json!({"type":"SEND","msg_id":"m","src":"a@U","dst":"b@U","ttl":bad}))
                .unwrap_err();
            assert!(e.detail.contains("ttl"), "{bad}: {e}");
        }
        assert!(matches!(parse(json!({"type":"FOO"})), Ok(Message::Unknown(k)) if k == "FOO"));
        let bad = parse(json!({"type":"SEND","msg_id":"m9","src":"a@U"})).unwrap_err();
        assert_eq!(bad.msg_id.as_deref(), Some("m9"));
        assert!(parse(json!({"msg_id":"x"})).is_err());
        assert!(matches!(
            parse(json!({"status":"ERROR","error":"line_too_long","limit":32768})),
            Ok(Message::Error(ErrorMsg {
                limit: Some(32768),
                ..
            }))
        ));
    }

    #[test]
    fn writes_type_first_and_round_trips() {
        let messages = [
            Message::Hello(Hello {
                peer_id: "a@U".into(),
                version: VERSION.into(),
                features: feature::ALL.iter().map(|f| f.to_string()).collect(),
                listen_port: Some(7000),
                agent: Some("teia/0.1".into()),
                noise: Some("AAAA".into()),
                ttl: 1,
            }),
            Message::Send(Data {
                msg_id: "m".into(),
                src: "a@U".into(),
                dst: "b@U".into(),
                payload: json!("hi"),
                require_ack: true,
                ttl: 8,
                auth: Some(Auth {
                    key: "k".into(),
                    sig: "s".into(),
                    signer: None,
                    proof: Some("p".into()),
                    leaf: Some(3),
                }),
            }),
            Message::Noise(Noise {
                msg: "AAAA".into(),
                ttl: 1,
            }),
            Message::WhoHasHit(WhoHasHit {
                msg_id: "m".into(),
                src: "b@U".into(),
                dst: "c@U".into(),
                via: "b@U".into(),
                hops: 1,
                ttl: 8,
            }),
            Message::PeerList(PeerList {
                peers: vec![PeerEntry {
                    peer_id: "c@U".into(),
                    ip: "127.0.0.1".into(),
                    port: 9,
                }],
                ttl: 1,
            }),
            Message::SpliceAsk(SpliceAsk {
                ask: "a1".into(),
                with: "h@U".into(),
                ttl: 1,
            }),
            Message::SpliceGrant(SpliceGrant {
                ask: "a1".into(),
                with: "h@U".into(),
                token: "t".into(),
                port: 7000,
                ttl: 1,
            }),
            Message::SpliceRefused(SpliceRefused {
                ask: "a1".into(),
                with: "h@U".into(),
                reason: "busy".into(),
                ttl: 1,
            }),
        ];
        for message in messages {
            let line = message.to_line().unwrap();
            assert!(
                line.starts_with(b"{\"type\":\""),
                "{}",
                String::from_utf8_lossy(&line)
            );
            assert_eq!(Message::parse(&line[..line.len() - 1]).unwrap(), message);
        }
    }

    #[test]
    fn uuid_has_version_4_shape() {
        let id = uuid_v4(u64::MAX, 0);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
    }
}
