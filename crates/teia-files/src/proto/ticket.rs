//! Tickets of one-shot transfers (`teia send` / `teia receive`): everything a receiver needs
//! to fetch and verify one file without a network of its own: the hash, the size and name,
//! the sender's key and addresses. Written `teia1` followed by unpadded base64url of JSON.

use serde::{Deserialize, Serialize};

/// What a ticket starts with.
pub const PREFIX: &str = "teia1";
/// Longest ticket accepted.
pub const MAX_TICKET: usize = 4096;

/// A one-shot transfer's ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Hex BLAKE3 hash of the file.
    pub hash: String,
    /// Its size.
    pub size: u64,
    /// Its name.
    pub name: String,
    /// The sender's peer id.
    pub peer_id: String,
    /// The sender's key (its stream must prove it).
    pub key: String,
    /// Where the sender listens.
    pub addrs: Vec<String>,
}

/// Why a ticket could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a teia ticket ({0}); copy the whole line `teia send` printed")]
pub struct TicketError(&'static str);

impl Ticket {
    /// The ticket as text.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", teia_core::identity::encode(&json))
    }

    /// Reads a ticket.
    pub fn decode(text: &str) -> Result<Self, TicketError> {
        let text = text.trim();
        if text.len() > MAX_TICKET {
            return Err(TicketError("too long"));
        }
        let body = text
            .strip_prefix(PREFIX)
            .ok_or(TicketError("no teia1 prefix"))?;
        let json = teia_core::identity::decode(body).ok_or(TicketError("not base64url"))?;
        serde_json::from_slice(&json).map_err(|_| TicketError("bad content"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tickets_round_trip_and_garbage_is_refused() {
        let ticket = Ticket {
            hash: "ab".repeat(32),
            size: 5,
            name: "f.txt".into(),
            peer_id: "send-x@teia".into(),
            key: "k".into(),
            addrs: vec!["127.0.0.1:9".into()],
        };
        assert_eq!(Ticket::decode(&ticket.encode()).unwrap(), ticket);
        assert!(Ticket::decode("teia1!!!").is_err());
        assert!(Ticket::decode("hello").is_err());
        assert!(Ticket::decode(&"teia1A".repeat(2000)).is_err());
    }
}
