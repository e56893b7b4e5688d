//! One `files` data stream as explicit states on both ends, sans-IO: which line may come
//! next, and what it means. The runtimes (`fetch.rs` for the requester, `serve.rs` for the
//! holder) read and write the lines and bytes, and hand each line to the state they are in;
//! a state that cannot go on says why, as a [`ReplyFault`] or a [`Refusal`].
//!
//! Requester: GET sent → [`AwaitingHead`] (`WAIT` keeps it there, `OK` moves on) →
//! [`ReadingOutboard`] (the outboard's bytes follow the `OK` line) → [`Transferring`] once
//! the outboard verifies (each `CHUNKS` asked is recorded; each `DATA` must be the oldest
//! chunk asked, with its length).
//!
//! Holder: [`AwaitingGet`] (the first line must be a GET with a hash) → approval and the
//! head written → [`Serving`] (each line must be `CHUNKS` of at most
//! [`MAX_CHUNKS_PER_REQUEST`] chunks the file has).
//!
//! **Bounds**: an outboard longer than the largest file's ([`MAX_CHUNKS`] chunk hashes) is a
//! fault; the chunks asked and not yet received are at most the window the swarm policy
//! gives (the requester asks no more).

use std::collections::VecDeque;

use super::msg::{code, Reply, Request, MAX_CHUNKS_PER_REQUEST};
use super::tree::{Hash, Layout, CV_LEN, MAX_CHUNKS};

/// Why a holder's reply ends the exchange, on the requester's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyFault {
    /// It refused (an ERROR reply).
    #[error("{code}: {detail}")]
    Refused {
        /// The error's code.
        code: String,
        /// Its explanation.
        detail: String,
    },
    /// It replied out of turn before its OK.
    #[error("a reply out of order before OK")]
    OutOfOrder,
    /// Its outboard is longer than any file's.
    #[error("outboard too large")]
    OutboardTooLarge,
    /// It replied out of turn to CHUNKS (the reply's kind).
    #[error("unexpected {0}")]
    Unexpected(&'static str),
    /// It sent a chunk other than the one asked, or of the wrong length.
    #[error("sent chunk {chunk} of {len} bytes, chunk {expected} was asked")]
    WrongChunk {
        /// The chunk it sent.
        chunk: u32,
        /// Its length.
        len: u64,
        /// The chunk asked.
        expected: u32,
    },
    /// It sent a chunk when none was asked.
    #[error("sent chunk {0}, none was asked")]
    NotAsked(u32),
}

/// The name of a reply's kind, for [`ReplyFault::Unexpected`].
fn kind(reply: &Reply) -> &'static str {
    match reply {
        Reply::Ok { .. } => "OK",
        Reply::Offer { .. } => "OFFER",
        Reply::Wait { .. } => "WAIT",
        Reply::Data { .. } => "DATA",
        Reply::Error { .. } => "ERROR",
    }
}

/// The requester sent GET and waits for the holder's head.
#[derive(Debug)]
pub struct AwaitingHead {
    hash: Hash,
}

/// Where a reply to GET leads.
#[derive(Debug)]
pub enum Head {
    /// The holder asks its user; keep waiting.
    Wait(AwaitingHead),
    /// The outboard follows.
    Outboard(ReadingOutboard),
}

impl AwaitingHead {
    /// Asks for `hash`: the state, and the GET to write.
    pub fn get(hash: Hash) -> (Self, Request) {
        let request = Request::Get {
            hash: hash.to_hex(),
        };
        (Self { hash }, request)
    }

    /// The content asked.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The holder's reply to GET.
    pub fn on_reply(self, reply: Reply) -> Result<Head, ReplyFault> {
        match reply {
            Reply::Wait { .. } => Ok(Head::Wait(self)),
            Reply::Ok { size, outboard } => {
                let len = usize::try_from(outboard).unwrap_or(usize::MAX);
                if len > MAX_CHUNKS as usize * CV_LEN {
                    return Err(ReplyFault::OutboardTooLarge);
                }
                Ok(Head::Outboard(ReadingOutboard { size, len }))
            }
            Reply::Error { code, detail } => Err(ReplyFault::Refused { code, detail }),
            Reply::Data { .. } | Reply::Offer { .. } => Err(ReplyFault::OutOfOrder),
        }
    }
}

/// The holder said `OK`: `len` bytes of outboard follow for a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingOutboard {
    /// The file's size, as the holder says.
    pub size: u64,
    /// The outboard's length in bytes (bounded by the largest file's).
    pub len: usize,
}

impl ReadingOutboard {
    /// The outboard verified against the hash, for a file laid out as `layout`: chunks may
    /// be asked.
    pub fn verified(self, layout: Layout) -> Transferring {
        Transferring {
            layout,
            asked: VecDeque::new(),
        }
    }
}

/// A chunk whose bytes follow its `DATA` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// Its index.
    pub chunk: u32,
    /// Its offset in the file.
    pub offset: u64,
    /// Its length, the bytes that follow.
    pub len: u64,
}

/// Chunks are asked and arrive in the order asked.
#[derive(Debug)]
pub struct Transferring {
    layout: Layout,
    /// Asked, not yet arrived, oldest first.
    asked: VecDeque<u32>,
}

impl Transferring {
    /// Asks for `chunks` (none: nothing to write).
    pub fn ask(&mut self, chunks: Vec<u32>) -> Option<Request> {
        if chunks.is_empty() {
            return None;
        }
        self.asked.extend(chunks.iter().copied());
        Some(Request::Chunks { chunks })
    }

    /// Whether a chunk asked has not arrived yet (so a reply is awaited).
    pub fn awaiting(&self) -> bool {
        !self.asked.is_empty()
    }

    /// The holder's reply to CHUNKS: the chunk whose bytes follow, which must be the oldest
    /// asked, with its length.
    pub fn on_reply(&mut self, reply: Reply) -> Result<Incoming, ReplyFault> {
        let (chunk, len) = match reply {
            Reply::Data { chunk, len } => (chunk, len),
            Reply::Error { code, detail } => return Err(ReplyFault::Refused { code, detail }),
            other => return Err(ReplyFault::Unexpected(kind(&other))),
        };
        let Some(&expected) = self.asked.front() else {
            return Err(ReplyFault::NotAsked(chunk));
        };
        match self.layout.range(chunk) {
            Some((offset, wanted)) if chunk == expected && wanted == len => {
                self.asked.pop_front();
                Ok(Incoming { chunk, offset, len })
            }
            _ => Err(ReplyFault::WrongChunk {
                chunk,
                len,
                expected,
            }),
        }
    }
}

/// Why a holder refuses a request: the ERROR reply to write before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error's code ([`code`]).
    pub code: &'static str,
    /// Its explanation.
    pub detail: String,
}

impl Refusal {
    fn bad_request(detail: impl Into<String>) -> Self {
        Self {
            code: code::BAD_REQUEST,
            detail: detail.into(),
        }
    }

    /// The ERROR reply.
    pub fn reply(&self) -> Reply {
        Reply::error(self.code, self.detail.clone())
    }
}

/// A stream opened to the holder: the first line must be a GET.
#[derive(Debug, Default)]
pub struct AwaitingGet;

impl AwaitingGet {
    /// The first request: the content asked.
    pub fn on_request(self, request: Request) -> Result<Hash, Refusal> {
        match request {
            Request::Get { hash } => Hash::from_hex(&hash)
                .ok_or_else(|| Refusal::bad_request("hash is not 64 hex digits")),
            Request::Chunks { .. } => Err(Refusal::bad_request("GET comes first")),
        }
    }
}

/// The head was written: each line asks for chunks of the file.
#[derive(Debug)]
pub struct Serving {
    layout: Layout,
}

impl Serving {
    /// Serving a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            layout: Layout::new(size),
        }
    }

    /// The file's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// A request after the head: the chunks asked, in order.
    pub fn on_request(&self, request: Request) -> Result<Vec<u32>, Refusal> {
        match request {
            Request::Chunks { chunks } if chunks.len() <= MAX_CHUNKS_PER_REQUEST => Ok(chunks),
            _ => Err(Refusal::bad_request(format!(
                "CHUNKS of at most {MAX_CHUNKS_PER_REQUEST} expected"
            ))),
        }
    }

    /// Where chunk `index` is: its offset and length; refused if the file has no such chunk.
    pub fn chunk(&self, index: u32) -> Result<(u64, u64), Refusal> {
        self.layout
            .range(index)
            .ok_or_else(|| Refusal::bad_request(format!("no chunk {index}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> Hash {
        Hash::from_hex(&"ab".repeat(32)).expect("a hash")
    }

    #[test]
    fn the_requester_waits_through_wait_then_reads_the_outboard() {
        let (state, get) = AwaitingHead::get(hash());
        assert_eq!(
            get,
            Request::Get {
                hash: hash().to_hex()
            }
        );
        let Ok(Head::Wait(state)) = state.on_reply(Reply::Wait { request: 3 }) else {
            panic!("WAIT keeps waiting");
        };
        let Ok(Head::Outboard(outboard)) = state.on_reply(Reply::Ok {
            size: 10,
            outboard: 64,
        }) else {
            panic!("OK leads to the outboard");
        };
        assert_eq!(outboard, ReadingOutboard { size: 10, len: 64 });
    }

    #[test]
    fn a_head_out_of_turn_or_too_large_is_a_fault() {
        let data = Reply::Data { chunk: 0, len: 1 };
        assert_eq!(
            AwaitingHead::get(hash()).0.on_reply(data).unwrap_err(),
            ReplyFault::OutOfOrder
        );
        let huge = Reply::Ok {
            size: 1,
            outboard: u64::MAX,
        };
        assert_eq!(
            AwaitingHead::get(hash()).0.on_reply(huge).unwrap_err(),
            ReplyFault::OutboardTooLarge
        );
        let refused = Reply::error(code::DENIED, "no");
        assert!(matches!(
            AwaitingHead::get(hash()).0.on_reply(refused),
            Err(ReplyFault::Refused { code, .. }) if code == code::DENIED
        ));
    }

    #[test]
    fn chunks_must_arrive_in_the_order_asked_with_their_length() {
        let layout = Layout::new(3 * 1024 * 1024 + 5);
        let mut state = ReadingOutboard { size: 0, len: 0 }.verified(layout);
        assert!(state.ask(Vec::new()).is_none());
        assert!(!state.awaiting());
        let unasked = state.on_reply(Reply::Data { chunk: 0, len: 1 });
        assert_eq!(unasked.unwrap_err(), ReplyFault::NotAsked(0));
        let last = layout.chunks() - 1;
        assert!(state.ask(vec![0, last]).is_some());
        let (_, first_len) = layout.range(0).expect("chunk 0");
        let swapped = state.on_reply(Reply::Data {
            chunk: last,
            len: first_len,
        });
        assert!(matches!(
            swapped,
            Err(ReplyFault::WrongChunk { expected: 0, .. })
        ));
        let first = state.on_reply(Reply::Data {
            chunk: 0,
            len: first_len,
        });
        assert_eq!(
            first,
            Ok(Incoming {
                chunk: 0,
                offset: 0,
                len: first_len
            })
        );
        let (offset, len) = layout.range(last).expect("last chunk");
        let wrong_len = state.on_reply(Reply::Data {
            chunk: last,
            len: len + 1,
        });
        assert!(wrong_len.is_err());
        assert_eq!(
            state.on_reply(Reply::Data { chunk: last, len }),
            Ok(Incoming {
                chunk: last,
                offset,
                len
            })
        );
        assert!(!state.awaiting());
        assert_eq!(
            state.on_reply(Reply::Wait { request: 1 }).unwrap_err(),
            ReplyFault::Unexpected("WAIT")
        );
    }

    #[test]
    fn the_holder_takes_a_get_first_then_chunks_the_file_has() {
        let chunks_first = AwaitingGet.on_request(Request::Chunks { chunks: vec![0] });
        assert_eq!(chunks_first.unwrap_err().detail, "GET comes first");
        let bad_hash = AwaitingGet.on_request(Request::Get { hash: "zz".into() });
        assert_eq!(bad_hash.unwrap_err().code, code::BAD_REQUEST);
        let get = Request::Get {
            hash: hash().to_hex(),
        };
        assert_eq!(AwaitingGet.on_request(get), Ok(hash()));

        let serving = Serving::new(10);
        assert_eq!(
            serving.on_request(Request::Chunks { chunks: vec![0] }),
            Ok(vec![0])
        );
        let too_many = vec![0; MAX_CHUNKS_PER_REQUEST + 1];
        assert!(serving
            .on_request(Request::Chunks { chunks: too_many })
            .is_err());
        let again = Request::Get {
            hash: hash().to_hex(),
        };
        assert!(serving.on_request(again).is_err());
        assert_eq!(serving.chunk(0), Ok((0, 10)));
        assert_eq!(serving.chunk(1).unwrap_err().detail, "no chunk 1");
    }
}
