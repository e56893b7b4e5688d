//! Seed 003's peer-exchange chat on the wire (PROTOCOL.md section 11): JSON objects written
//! back to back with no delimiter, `welcome` (a listen port, whether it answers a dial, the
//! hosts its sender knows) and `message` (a chat line).
//!
//! [`ObjectReader`] (of [`crate::codec`]) finds whole objects in such a stream, cut
//! anywhere, up to [`MAX_OBJECT`] bytes each; [`Welcome`] and
//! [`ChatLine`] read liberally (a port as a number or a string of digits) and write the way the
//! seed's own peers do, with one difference the seed's code cannot notice: a teia node writes
//! its `myPort` as a number, where the seed's peers write a string, so that a host list
//! passed on by the seed's peers tells teia nodes (numbers) from the seed's peers (strings).
//!
//! **Bounds**: an object being read is at most [`MAX_OBJECT`] bytes (beyond, the reader
//! reports `TooLong` and the connection is closed); a `knownHosts` list is read
//! up to [`MAX_KNOWN_HOSTS`] entries (the rest are ignored).

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use crate::fields::{liberal_string, liberal_u64};

pub use crate::codec::{ObjectError, ObjectReader};

/// The largest object read from a seed 003 peer, in bytes.
pub const MAX_OBJECT: usize = 64 * 1024;

/// `knownHosts` entries read from one `welcome`, at most.
pub const MAX_KNOWN_HOSTS: usize = 256;

/// What a seed 003 connection opens with, as the seed's peers write it (`JSON.stringify` of
/// `{type: "welcome", …}`).
pub const WELCOME_PREFIX: &[u8] = b"{\"type\":\"welcome\"";

/// A host in a `knownHosts` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownHost {
    /// Where it listens (an IPv4-mapped IPv6 address, as Node.js reports IPv4 peers on a
    /// dual-stack socket, is read as the IPv4 address).
    pub addr: SocketAddr,
    /// Its port was written as a number: a teia node (the seed's peers write strings).
    pub teia: bool,
}

/// `welcome`: the first object on every seed 003 connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The sender's listen port.
    pub my_port: u16,
    /// True on the connection that answers a dial (the "loopback" connection).
    pub loopback: bool,
    /// The hosts the sender knows, as far as they could be read.
    pub known_hosts: Vec<KnownHost>,
    /// Written by a teia node (its `myPort` is a number).
    pub teia: bool,
}

/// Why an object is not a usable `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeError {
    /// Its `type` is not `welcome`.
    #[error("the first object is not a welcome")]
    NotWelcome,
    /// Its `myPort` is not a port.
    #[error("its myPort is not a port")]
    BadPort,
}

impl Welcome {
    /// Reads a `welcome` object.
    pub fn read(value: &Value) -> Result<Self, WelcomeError> {
        if value.get("type").and_then(Value::as_str) != Some("welcome") {
            return Err(WelcomeError::NotWelcome);
        }
        let port = value.get("myPort").ok_or(WelcomeError::BadPort)?;
        let my_port = port_of(port).ok_or(WelcomeError::BadPort)?;
        let known_hosts = value
            .get("knownHosts")
            .and_then(Value::as_array)
            .map(|hosts| {
                hosts
                    .iter()
                    .take(MAX_KNOWN_HOSTS)
                    .filter_map(known_host)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            my_port,
            loopback: value.get("loopback").and_then(Value::as_bool) == Some(true),
            known_hosts,
            teia: port.is_number(),
        })
    }

    /// A teia node's `welcome`: `my_port` as a number, `known` as the seed's peers write
    /// their hosts (`{host, port}` with the port as a string).
    pub fn write(my_port: u16, loopback: bool, known: &[SocketAddr]) -> Vec<u8> {
        let hosts: Vec<Value> = known
            .iter()
            .map(|a| json!({"host": a.ip().to_string(), "port": a.port().to_string()}))
            .collect();
        let value = json!({
            "type": "welcome",
            "myPort": my_port,
            "loopback": loopback,
            "knownHosts": hosts,
        });
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// `message`: a chat line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    /// The text as typed (the seed's peers send what their terminal read, `\n` included).
    pub text: String,
}

impl ChatLine {
    /// Reads a `message` object; `None` for any other object.
    pub fn read(value: &Value) -> Option<Self> {
        if value.get("type").and_then(Value::as_str) != Some("message") {
            return None;
        }
        Some(Self {
            text: value.get("message").and_then(liberal_string)?,
        })
    }

    /// A `message` object, with the port the seed's peers print beside the sender's address.
    pub fn write(text: &str, my_port: u16) -> Vec<u8> {
        let value = json!({"type": "message", "message": text, "myPort": my_port.to_string()});
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// A port written as a number or a string of digits.
fn port_of(value: &Value) -> Option<u16> {
    liberal_u64(value)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
}

fn known_host(value: &Value) -> Option<KnownHost> {
    let host = value.get("host").and_then(Value::as_str)?;
    let port = value.get("port")?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(KnownHost {
        addr: SocketAddr::new(ip.to_canonical(), port_of(port)?),
        teia: port.is_number(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_back_to_back_are_read_one_by_one_whatever_the_cuts() {
        let stream = br#"{"type":"welcome","myPort":"3001","loopback":false,"knownHosts":[]}{"type":"message","message":"oi\n","myPort":"3001"}"#;
        for cut in 0..stream.len() {
            let mut reader = ObjectReader::new(MAX_OBJECT);
            let (head, tail) = stream.split_at(cut);
            reader.push(head);
            let mut seen = Vec::new();
            while let Some(object) = reader.next_object() {
                seen.push(object.unwrap());
            }
            reader.push(tail);
            while let Some(object) = reader.next_object() {
                seen.push(object.unwrap());
            }
            assert_eq!(seen.len(), 2, "cut at {cut}");
            assert_eq!(ChatLine::read(&seen[1]).unwrap().text, "oi\n");
        }
    }

    #[test]
    fn an_object_sent_a_byte_at_a_time_is_read_and_garbage_is_refused_at_once() {
        let text = "x\\\"}{".repeat(2_000);
        let object = serde_json::to_vec(&json!({"type": "message", "message": text})).unwrap();
        let mut reader = ObjectReader::new(MAX_OBJECT);
        for (i, byte) in object.iter().enumerate() {
            reader.push(&[*byte]);
            let next = reader.next_object();
            if i + 1 < object.len() {
                assert_eq!(next, None, "at byte {i}");
            } else {
                assert_eq!(ChatLine::read(&next.unwrap().unwrap()).unwrap().text, text);
            }
        }
        let mut reader = ObjectReader::new(MAX_OBJECT);
        reader.push(b"{not json");
        assert!(matches!(
            reader.next_object(),
            Some(Err(ObjectError::Malformed(_)))
        ));
    }

    #[test]
    fn an_endless_object_is_refused_and_garbage_is_malformed() {
        let mut reader = ObjectReader::new(MAX_OBJECT);
        reader.push(b"{\"type\":\"message\",\"message\":\"");
        reader.push(&vec![b'a'; MAX_OBJECT]);
        assert_eq!(
            reader.next_object(),
            Some(Err(ObjectError::TooLong { limit: MAX_OBJECT }))
        );
        let mut reader = ObjectReader::new(MAX_OBJECT);
        reader.push(b"HELLO\n");
        assert!(matches!(
            reader.next_object(),
            Some(Err(ObjectError::Malformed(_)))
        ));
    }

    #[test]
    fn welcomes_are_read_as_the_seeds_peers_write_them() {
        let value: Value = serde_json::from_str(
            r#"{"type":"welcome","myPort":"3002","loopback":true,"knownHosts":[{"host":"::ffff:127.0.0.1","port":"3001"},{"host":"127.0.0.1","port":7070},{"host":"nowhere","port":"1"},{"host":"127.0.0.1","port":"x"}]}"#,
        )
        .unwrap();
        let welcome = Welcome::read(&value).unwrap();
        assert_eq!(welcome.my_port, 3002);
        assert!(welcome.loopback && !welcome.teia);
        assert_eq!(
            welcome.known_hosts,
            vec![
                KnownHost {
                    addr: "127.0.0.1:3001".parse().unwrap(),
                    teia: false
                },
                KnownHost {
                    addr: "127.0.0.1:7070".parse().unwrap(),
                    teia: true
                },
            ]
        );
        let ours: Value = serde_json::from_slice(&Welcome::write(
            7070,
            false,
            &["127.0.0.1:3001".parse().unwrap()],
        ))
        .unwrap();
        assert!(ours.to_string().as_bytes().starts_with(WELCOME_PREFIX));
        let read = Welcome::read(&ours).unwrap();
        assert!(read.teia && !read.loopback);
        assert!(!read.known_hosts[0].teia);
        let bad = serde_json::json!({"type": "welcome", "myPort": "0"});
        assert_eq!(Welcome::read(&bad), Err(WelcomeError::BadPort));
        let other = serde_json::json!({"type": "message", "myPort": "1"});
        assert_eq!(Welcome::read(&other), Err(WelcomeError::NotWelcome));
    }
}
