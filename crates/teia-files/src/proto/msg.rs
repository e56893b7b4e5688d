//! The messages of file sharing (PROTOCOL.md section 6.3): the lines exchanged on a `files`
//! data stream, and the bodies of the `files` QUERY and QUERY_HIT.

use serde::{Deserialize, Serialize};

/// The service's name: of its queries and of its data streams.
pub const SERVICE: &str = "files";
/// The kind of the data streams a holder opens back to a downloader that cannot be dialed.
pub const DIAL_BACK_STREAM: &str = "files-back";
/// Longest request or answer line on a stream.
pub const MAX_STREAM_LINE: usize = 64 * 1024;
/// Chunks asked in one `CHUNKS` request at most.
pub const MAX_CHUNKS_PER_REQUEST: usize = 256;
/// Results one holder puts in one QUERY_HIT at most.
pub const MAX_RESULTS_PER_HIT: usize = 64;
/// Longest search text.
pub const MAX_SEARCH_TEXT: usize = 256;

/// A line the requester writes on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Request {
    /// Asks for a file by hash: answered `OK` with its size and outboard, `WAIT` while the
    /// holder's user decides, or `ERROR`.
    Get {
        /// Hex BLAKE3 hash.
        hash: String,
    },
    /// Asks for chunks of the file of the `GET` (answered by one `DATA` each, in order).
    Chunks {
        /// Chunk indexes.
        chunks: Vec<u32>,
    },
}

/// A line the holder writes on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reply {
    /// The file is served: `outboard` bytes of outboard follow the line.
    Ok {
        /// File size.
        size: u64,
        /// Bytes of outboard after this line.
        outboard: u64,
    },
    /// First line of a stream a holder opened back to an asker (`files-back`): the asker
    /// then sends its requests on it as on a stream it opened.
    Offer {
        /// The token of the asker's DIAL_BACK question.
        token: String,
    },
    /// The holder's user is asked to approve; an `OK` or `ERROR` follows.
    Wait {
        /// The approval request's id at the holder.
        request: u64,
    },
    /// One chunk: `len` bytes follow the line.
    Data {
        /// Its index.
        chunk: u32,
        /// Its length.
        len: u64,
    },
    /// The request failed; the stream closes.
    Error {
        /// `not_found`, `denied`, `busy`, `bad_request`, `changed`, `io`.
        code: String,
        /// For humans.
        #[serde(default)]
        detail: String,
    },
}

/// Error codes of [`Reply::Error`].
pub mod code {
    /// No shared file has this hash.
    pub const NOT_FOUND: &str = "not_found";
    /// The holder's approval policy refused.
    pub const DENIED: &str = "denied";
    /// Too many transfers.
    pub const BUSY: &str = "busy";
    /// The request is malformed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The file changed on disk since it was hashed.
    pub const CHANGED: &str = "changed";
    /// Reading the file failed.
    pub const IO: &str = "io";
}

impl Reply {
    /// An error reply.
    pub fn error(code: &str, detail: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Encodes a stream line, with its `\n`.
pub fn line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Relays a splice request names at most (and a holder reads).
pub const MAX_RELAYS: usize = 4;

/// The body of a `files` QUERY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Question {
    /// Asks `holder`, which cannot be dialed, to open a stream to the asker (service
    /// `files-back`) and serve `hash` on it; the stream starts with [`Reply::Offer`].
    DialBack {
        /// The holder asked.
        holder: String,
        /// The content.
        hash: String,
        /// The asker's key (its end of the stream must prove it).
        key: String,
        /// Where the asker listens.
        addrs: Vec<String>,
        /// Names the request on the stream.
        token: String,
        /// When true, the asker cannot be dialed either: the holder asks the first of
        /// `relays` that is its neighbour to splice it with the asker under `token` (the
        /// asker asked them all), and the asker opens the stream through it.
        #[serde(default)]
        splice: bool,
        /// For a splice: peer ids of the asker's neighbours that listen, at most
        /// [`MAX_RELAYS`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        relays: Vec<String>,
    },
    /// Files whose name has every word of `text`.
    Search {
        /// The words.
        text: String,
    },
    /// Who holds this content.
    Holders {
        /// Hex hash.
        hash: String,
    },
}

/// One file in a QUERY_HIT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    /// Name relative to the shared folder's parent.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex hash.
    pub hash: String,
}

/// The body of a `files` QUERY_HIT: who holds what, and where to open a stream to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The holder's key (the stream must prove it).
    pub key: String,
    /// The holder's listen port, if it listens.
    #[serde(default)]
    pub port: Option<u16>,
    /// Addresses the holder knows it listens on (`ip:port`), if any.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// The files.
    pub files: Vec<Found>,
}

/// Whether `name` matches the search `text`: every word of it, case-insensitively, as a
/// substring, in any order. An empty text matches nothing.
pub fn matches(name: &str, text: &str) -> bool {
    let name = name.to_lowercase();
    let mut words = text.split_whitespace().peekable();
    if words.peek().is_none() {
        return false;
    }
    words.all(|word| name.contains(&word.to_lowercase()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn words_match_in_any_order_ignoring_case() {
        assert!(matches("Lectures/Week1 Intro.mp4", "intro week1"));
        assert!(matches("Lectures/Week1 Intro.mp4", "MP4"));
        assert!(!matches("Lectures/Week1 Intro.mp4", "intro week2"));
        assert!(!matches("anything", "   "));
    }

    #[test]
    fn lines_round_trip() {
        let request = Request::Chunks { chunks: vec![1, 2] };
        let text = line(&request);
        assert_eq!(text, b"{\"op\":\"CHUNKS\",\"chunks\":[1,2]}\n");
        let parsed: Request = serde_json::from_slice(&text).unwrap();
        assert_eq!(parsed, request);
        let question: Question = serde_json::from_str(r#"{"hash":"ab"}"#).unwrap();
        assert_eq!(question, Question::Holders { hash: "ab".into() });
        let reply: Reply = serde_json::from_str(r#"{"op":"ERROR","code":"denied"}"#).unwrap();
        assert_eq!(reply, Reply::error("denied", ""));
    }
}
