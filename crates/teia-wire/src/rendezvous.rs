//! The rendezvous protocol (PROTOCOL.md section 2): requests, answers and error codes, for
//! both the server (parse requests, write answers) and the client (write requests, read
//! answers of every shape real servers send).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::codec::{encode_line, is_blank, parse_object, DecodeError, MAX_LINE};
use crate::fields::{liberal_string, liberal_u64, message_type, validate_name};

/// Default port of a rendezvous server.
pub const DEFAULT_PORT: u16 = 8080;
/// Record lifetime when REGISTER gives none, in seconds.
pub const DEFAULT_TTL: u32 = 7200;
/// Longest record lifetime accepted, in seconds.
pub const MAX_TTL: u32 = 86_400;

/// Error codes a rendezvous server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `name` missing or not acceptable.
    BadName,
    /// `namespace` missing or not acceptable.
    BadNamespace,
    /// `port` missing or not an integer in 1..=65535.
    BadPort,
    /// `ttl` not an integer in 1..=86400.
    BadTtl,
    /// The line is not a JSON object (or not UTF-8).
    InvalidJson,
    /// The object has no string `type`.
    MissingType,
    /// `type` is not a rendezvous command.
    UnknownCommand,
    /// The line exceeds the 32768-byte cap.
    LineTooLong,
    /// The line is empty or whitespace.
    EmptyLine,
    /// Nothing complete arrived before the idle timeout.
    Timeout,
    /// This source IP exceeded its request rate.
    RateLimited,
    /// The server is at its connection or record limit.
    Busy,
    /// This source IP holds as many records as it may.
    OverQuota,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 13] = [
        Self::BadName,
        Self::BadNamespace,
        Self::BadPort,
        Self::BadTtl,
        Self::InvalidJson,
        Self::MissingType,
        Self::UnknownCommand,
        Self::LineTooLong,
        Self::EmptyLine,
        Self::Timeout,
        Self::RateLimited,
        Self::Busy,
        Self::OverQuota,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadName => "bad_name",
            Self::BadNamespace => "bad_namespace",
            Self::BadPort => "bad_port",
            Self::BadTtl => "bad_ttl",
            Self::InvalidJson => "invalid_json",
            Self::MissingType => "missing_type",
            Self::UnknownCommand => "unknown_command",
            Self::LineTooLong => "line_too_long",
            Self::EmptyLine => "empty_line",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::Busy => "busy",
            Self::OverQuota => "over_quota",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: its code plus optional `detail` and `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdvError {
    /// The error code.
    pub code: ErrorCode,
    /// Human-readable detail, when useful.
    pub detail: Option<String>,
    /// The limit that was hit, when the error is about one.
    pub limit: Option<u64>,
}

impl RdvError {
    /// An error with only a code.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            detail: None,
            limit: None,
        }
    }

    /// Adds a `detail`.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a `limit`.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The answer line: `{"status":"ERROR","error":CODE,"message":CODE,...}\n`.
    pub fn to_line(&self) -> Vec<u8> {
        let mut answer = Map::new();
        answer.insert("status".into(), json!("ERROR"));
        answer.insert("error".into(), json!(self.code.as_str()));
        answer.insert("message".into(), json!(self.code.as_str()));
        if let Some(detail) = &self.detail {
            answer.insert("detail".into(), json!(detail));
        }
        if let Some(limit) = self.limit {
            answer.insert("limit".into(), json!(limit));
        }
        let answer = Value::Object(answer);
        let mut line = answer.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// A validated rendezvous request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Register or refresh `name` in `namespace`, reachable on `port`, for `ttl` seconds.
    Register {
        /// Namespace (room) of the record.
        namespace: String,
        /// Name of the peer within the namespace.
        name: String,
        /// Port the peer listens on.
        port: u16,
        /// Lifetime in seconds.
        ttl: u32,
    },
    /// List records of one namespace, or of all when `None`.
    Discover {
        /// The namespace, or `None` for every namespace.
        namespace: Option<String>,
    },
    /// Remove the caller's records of a namespace, optionally only one name and/or port.
    Unregister {
        /// Namespace of the records.
        namespace: String,
        /// Only records of this name.
        name: Option<String>,
        /// Only records of this port.
        port: Option<u16>,
    },
}

impl Request {
    /// The request as a JSON line, as a client writes it.
    pub fn to_line(&self) -> Vec<u8> {
        let value = match self {
            Self::Register {
                namespace,
                name,
                port,
                ttl,
            } => json!({"type":"REGISTER","namespace":namespace,"name":name,"port":port,"ttl":ttl}),
            Self::Discover { namespace } => match namespace {
                Some(ns) => json!({"type":"DISCOVER","namespace":ns}),
                None => json!({"type":"DISCOVER"}),
            },
            Self::Unregister {
                namespace,
                name,
                port,
            } => {
                let mut v = Map::new();
                v.insert("type".into(), json!("UNREGISTER"));
                v.insert("namespace".into(), json!(namespace));
                if let Some(name) = name {
                    v.insert("name".into(), json!(name));
                }
                if let Some(port) = port {
                    v.insert("port".into(), json!(port));
                }
                Value::Object(v)
            }
        };
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// Parses one request line (without its `\n`) into a validated request.
pub fn parse_request(line: &[u8]) -> Result<Request, RdvError> {
    if is_blank(line) {
        return Err(RdvError::new(ErrorCode::EmptyLine));
    }
    let object = parse_object(line).map_err(|e| match e {
        DecodeError::LineTooLong { limit } => {
            RdvError::new(ErrorCode::LineTooLong).limit(limit as u64)
        }
        other => RdvError::new(ErrorCode::InvalidJson).detail(other.to_string()),
    })?;
    request_from_object(&object)
}

/// Validates a request already parsed as a JSON object.
pub fn request_from_object(object: &Map<String, Value>) -> Result<Request, RdvError> {
    let kind = message_type(object).ok_or_else(|| RdvError::new(ErrorCode::MissingType))?;
    match kind.as_str() {
        "REGISTER" => Ok(Request::Register {
            namespace: required_name(object, "namespace", ErrorCode::BadNamespace)?,
            name: required_name(object, "name", ErrorCode::BadName)?,
            port: required_port(object)?,
            ttl: ttl(object)?,
        }),
        "DISCOVER" => {
            let namespace = match object.get("namespace") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.is_empty() => None,
                Some(_) => Some(required_name(object, "namespace", ErrorCode::BadNamespace)?),
            };
            Ok(Request::Discover { namespace })
        }
        "UNREGISTER" => Ok(Request::Unregister {
            namespace: required_name(object, "namespace", ErrorCode::BadNamespace)?,
            name: match object.get("name") {
                None | Some(Value::Null) => None,
                Some(_) => Some(required_name(object, "name", ErrorCode::BadName)?),
            },
            port: match object.get("port") {
                None | Some(Value::Null) => None,
                Some(_) => Some(required_port(object)?),
            },
        }),
        _ => Err(RdvError::new(ErrorCode::UnknownCommand).detail(kind)),
    }
}

fn required_name(
    object: &Map<String, Value>,
    field: &str,
    code: ErrorCode,
) -> Result<String, RdvError> {
    // Names must be JSON strings (as the course server requires): a number is refused.
    let value = match object.get(field) {
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(RdvError::new(code).detail(format!("{field} must be a string"))),
        None => return Err(RdvError::new(code).detail(format!("{field} is required"))),
    };
    validate_name(&value).map_err(|e| RdvError::new(code).detail(format!("{field} {e}")))?;
    Ok(value)
}

fn required_port(object: &Map<String, Value>) -> Result<u16, RdvError> {
    let bad = || RdvError::new(ErrorCode::BadPort).detail("port must be an integer in 1..=65535");
    let value = object.get("port").ok_or_else(bad)?;
    liberal_u64(value)
        .filter(|p| (1..=65_535).contains(p))
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(bad)
}

fn ttl(object: &Map<String, Value>) -> Result<u32, RdvError> {
    match object.get("ttl") {
        None | Some(Value::Null) => Ok(DEFAULT_TTL),
        Some(value) => liberal_u64(value)
            .filter(|t| (1..=u64::from(MAX_TTL)).contains(t))
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| {
                RdvError::new(ErrorCode::BadTtl)
                    .detail(format!("ttl must be an integer in 1..={MAX_TTL}"))
            }),
    }
}

/// The OK answer to REGISTER. Carries both the newer (`ip`/`port`) and the older
/// (`observed_ip`/`observed_port`) fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisterOk {
    /// Always `"OK"`.
    pub status: &'static str,
    /// The lifetime granted, in seconds.
    pub ttl: u32,
    /// The registering peer's address as the server saw it.
    pub ip: String,
    /// The port registered.
    pub port: u16,
    /// Same as `ip`.
    pub observed_ip: String,
    /// Source port of the registering connection.
    pub observed_port: u16,
}

/// One record in a DISCOVER answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerRecord {
    /// Address the peer registered from.
    pub ip: String,
    /// Port the peer listens on.
    pub port: u16,
    /// Peer name.
    pub name: String,
    /// Peer namespace.
    pub namespace: String,
    /// Lifetime the record was registered with, in seconds.
    pub ttl: u32,
    /// Seconds until the record expires.
    pub expires_in: u64,
    /// Same as `ip`.
    pub observed_ip: String,
    /// Source port of the registering connection.
    pub observed_port: u16,
}

impl PeerRecord {
    /// `name@namespace`.
    pub fn peer_id(&self) -> String {
        format!("{}@{}", self.name, self.namespace)
    }

    /// Reads a record liberally: numbers as strings or floats, missing optional fields.
    pub fn from_value(value: &Value) -> Option<Self> {
        let object = value.as_object()?;
        let text = |k: &str| object.get(k).and_then(liberal_string);
        let number = |k: &str| object.get(k).and_then(liberal_u64);
        let ip = text("ip").or_else(|| text("observed_ip"))?;
        Some(Self {
            observed_ip: text("observed_ip").unwrap_or_else(|| ip.clone()),
            ip,
            port: number("port").and_then(|p| u16::try_from(p).ok())?,
            name: text("name")?,
            namespace: text("namespace")?,
            ttl: number("ttl")
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_TTL),
            expires_in: object
                .get("expires_in")
                .and_then(|v| v.as_f64())
                .map(|f| f.max(0.0).ceil() as u64)
                .unwrap_or(0),
            observed_port: number("observed_port")
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
        })
    }
}

/// Writes a DISCOVER answer that fits in one [`MAX_LINE`] line: records are taken in the
/// order given until the line is full; when fewer than `total` are listed,
/// `"truncated":true` and `"total"` say so.
pub fn discover_answer_line<'a>(
    records: impl IntoIterator<Item = &'a PeerRecord>,
    total: usize,
) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"status\":\"OK\",\"peers\":[";
    let tail_room = format!("],\"truncated\":true,\"total\":{total}}}\n").len();
    let mut line = HEAD.to_vec();
    let mut written = 0usize;
    for record in records {
        let Ok(encoded) = serde_json::to_vec(record) else {
            continue;
        };
        let separator = usize::from(written > 0);
        if line.len() + separator + encoded.len() + tail_room > MAX_LINE {
            break;
        }
        if separator == 1 {
            line.push(b',');
        }
        line.extend_from_slice(&encoded);
        written += 1;
    }
    if written < total {
        line.extend_from_slice(format!("],\"truncated\":true,\"total\":{total}}}\n").as_bytes());
    } else {
        line.extend_from_slice(b"]}\n");
    }
    line
}

/// The OK answer to REGISTER as a line.
pub fn register_answer_line(answer: &RegisterOk) -> Vec<u8> {
    encode_line(answer).unwrap_or_else(|_| b"{\"status\":\"OK\"}\n".to_vec())
}

/// The OK answer to UNREGISTER as a line, with the number of records removed.
pub fn unregister_answer_line(removed: usize) -> Vec<u8> {
    format!("{{\"status\":\"OK\",\"removed\":{removed}}}\n").into_bytes()
}

/// What a client could not accept in an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// The server answered an error.
    #[error("{code}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        /// The error code, from `error`, else `code`, else `message`.
        code: String,
        /// `detail`, when given.
        detail: Option<String>,
    },
    /// The answer is not one a rendezvous server gives.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// The fields a client keeps from a REGISTER answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Lifetime granted, in seconds.
    pub ttl: u32,
    /// Our address as the server saw it, when told.
    pub observed_ip: Option<String>,
    /// Our source port as the server saw it, when told.
    pub observed_port: Option<u16>,
}

/// Reads any answer: its object when `status` is OK, the server's error otherwise.
pub fn parse_answer(line: &[u8]) -> Result<Map<String, Value>, AnswerError> {
    let object = parse_object(line).map_err(|e| AnswerError::Malformed(e.to_string()))?;
    let status = object
        .get("status")
        .and_then(Value::as_str)
        .map(str::to_ascii_uppercase);
    match status.as_deref() {
        Some("OK") => Ok(object),
        Some("ERROR") => {
            let code = ["error", "code", "message"]
                .iter()
                .find_map(|k| object.get(*k).and_then(liberal_string))
                .unwrap_or_else(|| "unknown".to_owned());
            Err(AnswerError::Server {
                code,
                detail: object.get("detail").and_then(liberal_string),
            })
        }
        _ => Err(AnswerError::Malformed("no status OK or ERROR".to_owned())),
    }
}

/// Reads a REGISTER answer, accepting `ip`/`port` or `observed_ip`/`observed_port`.
pub fn parse_register_answer(line: &[u8], requested_ttl: u32) -> Result<Registration, AnswerError> {
    let object = parse_answer(line)?;
    let text = |k: &str| object.get(k).and_then(liberal_string);
    Ok(Registration {
        ttl: object
            .get("ttl")
            .and_then(liberal_u64)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(requested_ttl),
        observed_ip: text("observed_ip").or_else(|| text("ip")),
        observed_port: object
            .get("observed_port")
            .and_then(liberal_u64)
            .and_then(|p| u16::try_from(p).ok()),
    })
}

/// Reads a DISCOVER answer; records that cannot be read are skipped.
pub fn parse_discover_answer(line: &[u8]) -> Result<Vec<PeerRecord>, AnswerError> {
    let object = parse_answer(line)?;
    let peers = object
        .get("peers")
        .and_then(Value::as_array)
        .ok_or_else(|| AnswerError::Malformed("no peers list".to_owned()))?;
    Ok(peers.iter().filter_map(PeerRecord::from_value).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> ErrorCode {
        parse_request(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn register_is_validated() {
        assert_eq!(
            parse_request(br#"{"type":"register","namespace":"UnB","name":"alice","port":"7070"}"#),
            Ok(Request::Register {
                namespace: "UnB".into(),
                name: "alice".into(),
                port: 7070,
                ttl: DEFAULT_TTL
            })
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"UnB","port":1}"#),
            ErrorCode::BadName
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","name":"a","port":1}"#),
            ErrorCode::BadNamespace
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U#","name":"a","port":1}"#),
            ErrorCode::BadNamespace
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a@b","port":1}"#),
            ErrorCode::BadName
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a"}"#),
            ErrorCode::BadPort
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":0}"#),
            ErrorCode::BadPort
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":65536}"#),
            ErrorCode::BadPort
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":"abc"}"#),
            ErrorCode::BadPort
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":1,"ttl":0}"#),
            ErrorCode::BadTtl
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":1,"ttl":86401}"#),
            ErrorCode::BadTtl
        );
        assert_eq!(
            code(r#"{"type":"REGISTER","namespace":"U","name":"a","port":1,"ttl":"x"}"#),
            ErrorCode::BadTtl
        );
        let long = "n".repeat(65);
        assert_eq!(
            code(&format!(
                r#"{{"type":"REGISTER","namespace":"U","name":"{long}","port":1}}"#
            )),
            ErrorCode::BadName
        );
        assert!(matches!(
            parse_request(
                br#"{"type":"REGISTER","namespace":"U","name":"a","port":65535,"ttl":"86400"}"#
            ),
            Ok(Request::Register {
                port: 65535,
                ttl: 86400,
                ..
            })
        ));
    }

    #[test]
    fn generic_errors() {
        assert_eq!(code(""), ErrorCode::EmptyLine);
        assert_eq!(code("   \t"), ErrorCode::EmptyLine);
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidJson);
        assert_eq!(code("{}"), ErrorCode::MissingType);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::MissingType);
        assert_eq!(code(r#"{"type":"FLY"}"#), ErrorCode::UnknownCommand);
        assert_eq!(
            parse_request(b"\xff").unwrap_err().code,
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn discover_and_unregister() {
        assert_eq!(
            parse_request(br#"{"type":"DISCOVER"}"#),
            Ok(Request::Discover { namespace: None })
        );
        assert_eq!(
            parse_request(br#"{"type":"DISCOVER","namespace":""}"#),
            Ok(Request::Discover { namespace: None })
        );
        assert_eq!(
            code(r#"{"type":"DISCOVER","namespace":"a b"}"#),
            ErrorCode::BadNamespace
        );
        assert_eq!(code(r#"{"type":"UNREGISTER"}"#), ErrorCode::BadNamespace);
        assert_eq!(
            code(r#"{"type":"UNREGISTER","namespace":"U","port":"x"}"#),
            ErrorCode::BadPort
        );
        assert_eq!(
            parse_request(br#"{"type":"UNREGISTER","namespace":"U","port":"7"}"#),
            Ok(Request::Unregister {
                namespace: "U".into(),
                name: None,
                port: Some(7)
            })
        );
    }

    #[test]
    fn requests_round_trip_through_their_lines() {
        let requests = [
            Request::Register {
                namespace: "U".into(),
                name: "a".into(),
                port: 9,
                ttl: 60,
            },
            Request::Discover { namespace: None },
            Request::Discover {
                namespace: Some("U".into()),
            },
            Request::Unregister {
                namespace: "U".into(),
                name: Some("a".into()),
                port: Some(9),
            },
        ];
        for request in requests {
            let line = request.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line[..line.len() - 1]), Ok(request));
        }
    }

    #[test]
    fn error_answers_carry_error_and_message() {
        for code in ErrorCode::ALL {
            let line = RdvError::new(code).limit(5).to_line();
            let v: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["status"], "ERROR");
            assert_eq!(v["error"], code.as_str());
            assert_eq!(v["message"], code.as_str());
            assert_eq!(v["limit"], 5);
        }
    }

    #[test]
    fn client_reads_every_answer_shape() {
        let old = br#"{"status":"OK","ttl":60,"observed_ip":"1.2.3.4","observed_port":5}"#;
        let new = br#"{"status":"OK","ttl":"60","ip":"1.2.3.4","port":7070}"#;
        for line in [&old[..], &new[..]] {
            let reg = parse_register_answer(line, 7200).unwrap();
            assert_eq!(reg.ttl, 60);
            assert_eq!(reg.observed_ip.as_deref(), Some("1.2.3.4"));
        }
        let err = parse_register_answer(br#"{"status":"ERROR","message":"Unknown command"}"#, 1);
        assert_eq!(
            err,
            Err(AnswerError::Server {
                code: "Unknown command".into(),
                detail: None
            })
        );
        let err =
            parse_register_answer(br#"{"status":"ERROR","error":"bad_port","message":"x"}"#, 1);
        assert!(matches!(err, Err(AnswerError::Server { code, .. }) if code == "bad_port"));
        assert!(matches!(
            parse_register_answer(b"hello", 1),
            Err(AnswerError::Malformed(_))
        ));
        let peers = parse_discover_answer(
            br#"{"status":"OK","peers":[{"ip":"1.2.3.4","port":"4000","name":"a","namespace":"r","expires_in":41.5},{"bad":1}]}"#,
        )
        .unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id(), "a@r");
        assert_eq!(peers[0].expires_in, 42);
        assert_eq!(peers[0].observed_ip, "1.2.3.4");
    }

    #[test]
    fn discover_answer_fits_in_one_line() {
        let record = |i: usize| PeerRecord {
            ip: "127.0.0.1".into(),
            port: 4000,
            name: format!("peer{i}"),
            namespace: "room".into(),
            ttl: 60,
            expires_in: 59,
            observed_ip: "127.0.0.1".into(),
            observed_port: 50000,
        };
        let few: Vec<_> = (0..3).map(record).collect();
        let line = discover_answer_line(few.iter(), 3);
        assert_eq!(parse_discover_answer(&line[..line.len() - 1]).unwrap(), few);

        let many: Vec<_> = (0..1000).map(record).collect();
        let line = discover_answer_line(many.iter(), 1000);
        assert!(line.len() <= MAX_LINE);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["total"], 1000);
        let shown = v["peers"].as_array().unwrap().len();
        assert!(shown > 100 && shown < 1000);
    }
}
