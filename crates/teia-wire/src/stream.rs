//! The lines that open a data stream (PROTOCOL.md section 6): `STREAM`, `STREAM_OK`, `NOISE`,
//! or an `ERROR` refusing it. After them the connection carries encrypted frames.

use serde::{Deserialize, Serialize};

/// What every data stream's first line starts with, byte for byte (strict when writing), so
/// that a listener can tell a stream from a peer link before parsing it.
pub const STREAM_PREFIX: &[u8] = b"{\"type\":\"STREAM\"";

/// What a splice request's first line starts with, byte for byte.
pub const SPLICE_PREFIX: &[u8] = b"{\"type\":\"SPLICE\"";

/// Longest opening line, `\n` included.
pub const MAX_OPENING_LINE: usize = 4096;

/// One line of a stream's opening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Opening {
    /// The opener's first line: who it is, which service, and Noise message 1.
    Stream {
        /// The opener's peer id.
        peer_id: String,
        /// The service the stream is for (`files`).
        service: String,
        /// Noise message 1, unpadded base64url.
        noise: String,
    },
    /// The acceptor's answer: who it is and Noise message 2.
    StreamOk {
        /// The acceptor's peer id.
        peer_id: String,
        /// Noise message 2.
        noise: String,
    },
    /// The opener's last line: Noise message 3.
    Noise {
        /// Noise message 3.
        noise: String,
    },
    /// Asks a node to join this connection with the other one that gives the same token
    /// (both ends then open a stream through it, end to end).
    Splice {
        /// Names the pair.
        token: String,
    },
    /// The splicing node joined the two connections: from here on, its bytes are the other
    /// end's.
    SpliceOk,
    /// The acceptor refuses the stream.
    Error {
        /// Machine-readable reason (`busy`, `unsupported`, `bad_format`, `unauthorized`).
        code: String,
        /// For humans.
        #[serde(default)]
        detail: String,
    },
}

impl Opening {
    /// The line, with its `\n`.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses one line (without or with its `\n`).
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stream_line_starts_with_the_prefix() {
        let line = Opening::Stream {
            peer_id: "a@x".into(),
            service: "files".into(),
            noise: "AAAA".into(),
        }
        .to_line();
        assert!(line.starts_with(STREAM_PREFIX));
        assert_eq!(
            Opening::parse(&line).unwrap(),
            Opening::Stream {
                peer_id: "a@x".into(),
                service: "files".into(),
                noise: "AAAA".into()
            }
        );
        assert!(Opening::parse(b"{\"type\":\"HELLO\"}").is_err());
        let splice = Opening::Splice { token: "t".into() }.to_line();
        assert!(splice.starts_with(SPLICE_PREFIX));
        assert_eq!(Opening::SpliceOk.to_line(), b"{\"type\":\"SPLICE_OK\"}\n");
    }
}
