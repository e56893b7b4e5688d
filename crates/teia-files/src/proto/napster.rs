//! The Napster role (seed 004, PROTOCOL.md section 7): the index's messages and its state,
//! with no I/O.
//!
//! The seed's programs write one JSON object per `send`, with no newline or length, and read
//! with one `recv`: [`ObjectReader`] finds whole objects in whatever bytes arrived. The seed's
//! requests are `{"method":"JOIN","data":{"filePath":DIR}}`, `{"method":"SEARCH","data":
//! {"query":NAME}}`, `{"method":"UPDATE","data":{"files":[NAME,...]}}` and, to a peer,
//! `{"method":"DOWNLOAD_REQUEST","data":{"filename":NAME,"port":PORT}}`. teia nodes add
//! `"teia":1` in `data` and richer fields (sizes, hashes, keys), and get JSON answers.
//!
//! **Search.** A file matches a query when its name equals the query, or when every word of
//! the query (split at whitespace) is, lowercased, a substring of the lowercased name
//! ([`matches`]). [`Index`] finds them through an inverted index of the byte n-grams (1, 2
//! and 3 bytes) of each lowercased name: a query word of 3 bytes or more can only be in a
//! name that has all its trigrams, a shorter one only in a name that has it as a 1- or
//! 2-gram. A search walks the shortest posting list among the query's n-grams, keeps the
//! file ids found in the next shortest ones too, and checks each with the matcher, stopping
//! at [`MAX_RESULTS`]: it costs in proportion to the rarest n-gram's files, never to the
//! whole index, and answers exactly what a scan of every file would: the same files, in the
//! same order (by holder, then in the holder's order). When more than [`MAX_RESULTS`] match,
//! it answers the [`MAX_RESULTS`] listed first, in that order (the scan it replaces answered
//! the first by holder). A query with no word can only equal a name with no word: those
//! files are listed apart. (SQLite's FTS5 trigram tokenizer was not used: it folds case unlike Rust's
//! `to_lowercase` and scans everything for words under 3 characters.)
//!
//! **Bounds.** What one peer may put in the index, and what happens at each limit:
//! - a message: [`MAX_MESSAGE`] bytes (a longer one is an error, the connection closes);
//! - a record: [`MAX_FILES_PER_PEER`] files (more are ignored, on JOIN, UPDATE, a folder
//!   read for a seed peer and a record read back from disk alike), names of at most
//!   [`MAX_NAME_BYTES`] bytes and hashes of at most [`MAX_HASH_BYTES`] (a file with a longer
//!   one is ignored); a teia peer id or key of at most [`MAX_ID_BYTES`] (a longer one is
//!   answered `bad_request`);
//! - a query: [`MAX_QUERY_BYTES`] bytes (a longer one is answered `bad_request`), at most
//!   [`MAX_RESULTS`] results;
//! - peers: [`Limits::max_peers`] in all ([`MAX_PEERS`] by default) and
//!   [`Limits::max_peers_per_ip`] from one source IP address ([`MAX_PEERS_PER_IP`]; an IPv6
//!   address counts with its /64 network, [`source_of`]);
//! - memory: [`Limits::max_bytes`] for all records and the search index together
//!   ([`MAX_INDEX_BYTES`] by default), of which one source IP address may take
//!   [`Limits::max_bytes_per_ip`] (a quarter, [`IP_SHARE`]). Bytes are counted by a model
//!   of what the index allocates ([`RECORD_COST`], [`FILE_COST`], [`POSTING_COST`],
//!   [`GRAM_COST`] besides the strings' own bytes), checked before anything is held.
//!
//! A JOIN or UPDATE that would pass a peer or memory limit first drops records of its own
//! address whose connection is gone (oldest first: they are only kept for a grace time); if
//! that is not enough it is refused ([`Refusal`]: `busy` for peers, `full` for memory) and
//! the index is left as it was. The index never holds more than its limits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::msg::matches;

/// Bytes one message may take at most; a longer one is an error and the connection closes.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Files one peer's record lists at most; more are ignored.
pub const MAX_FILES_PER_PEER: usize = 10_000;
/// Bytes of one file name at most (a relative path in a teia node's share fits); a file with
/// a longer name is ignored.
pub const MAX_NAME_BYTES: usize = 1024;
/// Bytes of one file's hash at most (BLAKE3's hex takes 64); a file with a longer one is
/// ignored.
pub const MAX_HASH_BYTES: usize = 128;
/// Bytes of a teia node's peer id or key at most; a JOIN with a longer one is answered
/// `bad_request`.
pub const MAX_ID_BYTES: usize = 256;
/// Bytes of a search query at most; a longer one is answered `bad_request`.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Peers the index holds at most, by default; a JOIN beyond is answered `busy`.
pub const MAX_PEERS: usize = 10_000;
/// Peers of one source IP address the index holds at most, by default; a JOIN beyond is
/// answered `busy`.
pub const MAX_PEERS_PER_IP: usize = 64;
/// Bytes the records and the search index take at most, by default (as counted with
/// [`RECORD_COST`] and the others); a JOIN or UPDATE beyond is answered `full`.
pub const MAX_INDEX_BYTES: usize = 256 << 20;
/// One source IP address may take 1/`IP_SHARE` of the memory bound.
pub const IP_SHARE: usize = 4;
/// Results one SEARCH answers at most.
pub const MAX_RESULTS: usize = 256;
/// Bytes counted for a record besides its id, address, key and files.
pub const RECORD_COST: usize = 256;
/// Bytes counted for a file besides its name and hash.
pub const FILE_COST: usize = 96;
/// Bytes counted for each entry of a posting list (a 4-byte file id, and the list's spare
/// capacity: a list's block never has more than twice its length, or 4).
pub const POSTING_COST: usize = 8;
/// Bytes counted for each posting list (its n-gram, its header, its place in the table).
pub const GRAM_COST: usize = 96;

/// Finds whole messages in the seed's stream (at most [`MAX_MESSAGE`] bytes each: use
/// `ObjectReader::new(MAX_MESSAGE)`).
pub use teia_wire::codec::{ObjectError, ObjectReader};

/// A file as a teia node lists it to the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// Hex hash (empty for a seed peer's file).
    #[serde(default)]
    pub hash: String,
}

/// Who a teia node is, in its JOIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeiaPeer {
    /// Its peer id.
    pub peer_id: String,
    /// Its key.
    pub key: String,
    /// Its listen port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A request to the index or to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Join with a folder path (seed) or a list of files (teia).
    Join {
        /// The seed's folder path.
        file_path: Option<String>,
        /// The files (teia).
        files: Vec<Listed>,
        /// A teia node's identity.
        teia: Option<TeiaPeer>,
    },
    /// Search by name.
    Search {
        /// The words.
        query: String,
        /// Whether the asker wants teia's JSON answer.
        teia: bool,
    },
    /// Replace the list of files.
    Update {
        /// The files.
        files: Vec<Listed>,
    },
    /// Leave the index.
    Leave,
    /// Ask a peer for a file (seed).
    DownloadRequest {
        /// Its name.
        filename: String,
    },
}

fn listed(value: &Value) -> Option<Listed> {
    match value {
        Value::String(name) => Some(Listed {
            name: name.clone(),
            size: 0,
            hash: String::new(),
        }),
        other => serde_json::from_value(other.clone()).ok(),
    }
}

fn files_of(data: &Value) -> Vec<Listed> {
    data.get("files")
        .and_then(Value::as_array)
        .map(|files| {
            files
                .iter()
                .filter_map(listed)
                .take(MAX_FILES_PER_PEER)
                .collect()
        })
        .unwrap_or_default()
}

/// Why a request object is not a request; the message goes back in the error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No `method` string.
    #[error("no method")]
    NoMethod,
    /// A method this index does not know.
    #[error("unknown method {0:?}")]
    UnknownMethod(String),
    /// A teia JOIN whose `data.peer` does not read.
    #[error("teia JOIN without its peer: {0}")]
    NoPeer(String),
    /// A peer id or key longer than [`MAX_ID_BYTES`].
    #[error("a peer id or key is at most {MAX_ID_BYTES} bytes")]
    IdTooLong,
    /// SEARCH without its query.
    #[error("SEARCH without data.query")]
    NoQuery,
    /// A query longer than [`MAX_QUERY_BYTES`].
    #[error("a query is at most {MAX_QUERY_BYTES} bytes")]
    QueryTooLong,
    /// UPDATE without its list of files.
    #[error("UPDATE without data.files")]
    NoFiles,
    /// DOWNLOAD_REQUEST without the file's name.
    #[error("DOWNLOAD_REQUEST without data.filename")]
    NoFilename,
}

impl Request {
    /// Reads a request object; `Err` says what is wrong, for the error answer.
    pub fn from_value(value: &Value) -> Result<Self, RequestError> {
        let method = value
            .get("method")
            .and_then(Value::as_str)
            .ok_or(RequestError::NoMethod)?;
        let data = value.get("data").cloned().unwrap_or(Value::Null);
        let is_teia = data.get("teia").is_some_and(|t| !t.is_null());
        match method {
            "JOIN" => Ok(Self::Join {
                file_path: data
                    .get("filePath")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                files: files_of(&data),
                teia: if is_teia {
                    let peer: TeiaPeer =
                        serde_json::from_value(data.get("peer").cloned().unwrap_or(Value::Null))
                            .map_err(|e| RequestError::NoPeer(e.to_string()))?;
                    if peer.peer_id.len() > MAX_ID_BYTES || peer.key.len() > MAX_ID_BYTES {
                        return Err(RequestError::IdTooLong);
                    }
                    Some(peer)
                } else {
                    None
                },
            }),
            "SEARCH" => {
                let query = data
                    .get("query")
                    .and_then(Value::as_str)
                    .ok_or(RequestError::NoQuery)?;
                if query.len() > MAX_QUERY_BYTES {
                    return Err(RequestError::QueryTooLong);
                }
                Ok(Self::Search {
                    query: query.to_owned(),
                    teia: is_teia,
                })
            }
            "UPDATE" => {
                if data.get("files").and_then(Value::as_array).is_none() {
                    return Err(RequestError::NoFiles);
                }
                Ok(Self::Update {
                    files: files_of(&data),
                })
            }
            "LEAVE" => Ok(Self::Leave),
            "DOWNLOAD_REQUEST" => Ok(Self::DownloadRequest {
                filename: data
                    .get("filename")
                    .and_then(Value::as_str)
                    .ok_or(RequestError::NoFilename)?
                    .to_owned(),
            }),
            other => Err(RequestError::UnknownMethod(other.to_owned())),
        }
    }
}

/// One peer's record at the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its key in the index: the teia peer id, or `ip:port` of a seed peer's connection.
    pub id: String,
    /// The port others download from (a seed peer's connection port, a teia node's listen
    /// port).
    pub port: u16,
    /// The IP it connected from.
    pub ip: String,
    /// A teia node's key.
    #[serde(default)]
    pub key: Option<String>,
    /// Its files.
    pub files: Vec<Listed>,
}

/// One search result in teia's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    /// The file's name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex hash (empty for a seed peer's file).
    pub hash: String,
    /// Who holds it (peer id, or `ip:port`).
    pub holder: String,
    /// The holder's key, for a teia node.
    pub key: Option<String>,
    /// Where to download from.
    pub addr: String,
}

/// The limits of an [`Index`] that its operator may set (the others are constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Peers held at most.
    pub max_peers: usize,
    /// Peers of one source IP address held at most.
    pub max_peers_per_ip: usize,
    /// Bytes counted for all records and the search index at most.
    pub max_bytes: usize,
    /// Bytes counted for the records of one source IP address at most.
    pub max_bytes_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_memory(MAX_INDEX_BYTES)
    }
}

impl Limits {
    /// The default limits with a memory bound of `max_bytes`, a quarter of it per source IP
    /// address.
    pub fn with_memory(max_bytes: usize) -> Self {
        Self {
            max_peers: MAX_PEERS,
            max_peers_per_ip: MAX_PEERS_PER_IP,
            max_bytes,
            max_bytes_per_ip: max_bytes / IP_SHARE,
        }
    }
}

/// Why the index refused a record: the index is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The index holds its most peers.
    #[error("the index holds {max} peers, its most")]
    Peers {
        /// The limit.
        max: usize,
    },
    /// The index holds its most peers from this address.
    #[error("the index holds {max} peers from {ip}, its most for one address")]
    PeersPerIp {
        /// The source address (an IPv6 one as its /64 network).
        ip: String,
        /// The limit.
        max: usize,
    },
    /// The record does not fit in the index's memory bound.
    #[error("the index's memory bound of {max} bytes is reached ({needed} bytes needed)")]
    Memory {
        /// Bytes the index would hold with the record.
        needed: usize,
        /// The limit.
        max: usize,
    },
    /// The record does not fit in its address's share of the memory bound.
    #[error("{ip}'s share of the index's memory, {max} bytes, is reached ({needed} bytes needed)")]
    IpMemory {
        /// The source address (an IPv6 one as its /64 network).
        ip: String,
        /// Bytes the address would hold with the record.
        needed: usize,
        /// The limit.
        max: usize,
    },
}

impl Refusal {
    /// The protocol's error code: `busy` for peers, `full` for memory.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Peers { .. } | Self::PeersPerIp { .. } => "busy",
            Self::Memory { .. } | Self::IpMemory { .. } => "full",
        }
    }
}

/// The key of a byte n-gram (1 to 3 bytes): its length in the top byte, its bytes below.
fn gram(bytes: &[u8]) -> u32 {
    let packed = bytes
        .iter()
        .take(3)
        .fold(0u32, |key, &b| (key << 8) | u32::from(b));
    let n = bytes.len().min(3) as u32;
    (n << 24) | packed
}

/// Appends the distinct 1-, 2- and 3-grams of `name` lowercased to `out`, sorted.
fn name_grams(name: &str, out: &mut Vec<u32>) {
    let lower = name.to_lowercase();
    let mut grams: Vec<u32> = (1..=3)
        .flat_map(|n| lower.as_bytes().windows(n).map(gram))
        .collect();
    grams.sort_unstable();
    grams.dedup();
    out.extend(grams);
}

/// Appends the n-grams a name must have to hold `word` (lowercased): its trigrams, or the
/// word itself when shorter than 3 bytes.
fn word_grams(word: &str, out: &mut Vec<u32>) {
    let bytes = word.as_bytes();
    if bytes.len() >= 3 {
        out.extend(bytes.windows(3).map(gram));
    } else if !bytes.is_empty() {
        out.push(gram(bytes));
    }
}

/// What a record's per-address limits count against: its IPv4 address, or the /64 network
/// of its IPv6 address (one host commonly has a whole /64).
pub fn source_of(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                format!("{a:x}:{b:x}:{c:x}:{d:x}::/64")
            }
        },
        _ => ip.to_owned(),
    }
}

/// Whether a name has no word (the only names a query with no word can equal).
fn is_blank(name: &str) -> bool {
    name.split_whitespace().next().is_none()
}

/// A record made ready for an [`Index`], outside any lock: its files bounded, their n-grams
/// computed and its bytes counted.
#[derive(Debug, Clone)]
pub struct Prepared {
    record: Record,
    /// What its per-address limits count against ([`source_of`]).
    source: String,
    /// The files' n-grams, one after the other; file `i`'s end at `ends[i]`.
    grams: Vec<u32>,
    ends: Vec<usize>,
    /// Every n-gram of the record once, sorted.
    distinct: Vec<u32>,
    cost: usize,
    ignored: usize,
}

impl Prepared {
    /// Bounds `record`'s files (see the module's Bounds) and computes what the index needs.
    pub fn new(mut record: Record) -> Self {
        let listed = record.files.len();
        record
            .files
            .retain(|f| f.name.len() <= MAX_NAME_BYTES && f.hash.len() <= MAX_HASH_BYTES);
        record.files.truncate(MAX_FILES_PER_PEER);
        let ignored = listed.saturating_sub(record.files.len());
        let mut grams = Vec::new();
        let mut ends = Vec::with_capacity(record.files.len());
        let mut cost = RECORD_COST
            + record.id.len()
            + record.ip.len()
            + record.key.as_ref().map_or(0, String::len);
        for file in &record.files {
            let start = grams.len();
            name_grams(&file.name, &mut grams);
            cost += FILE_COST
                + file.name.len()
                + file.hash.len()
                + POSTING_COST * (grams.len() - start + usize::from(is_blank(&file.name)));
            ends.push(grams.len());
        }
        let mut distinct = grams.clone();
        distinct.sort_unstable();
        distinct.dedup();
        Self {
            source: source_of(&record.ip),
            record,
            grams,
            ends,
            distinct,
            cost,
            ignored,
        }
    }

    /// The record, bounded.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Bytes the record is counted for (besides new posting lists).
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// Files listed but ignored (beyond [`MAX_FILES_PER_PEER`], or with a name or hash too
    /// long).
    pub fn ignored(&self) -> usize {
        self.ignored
    }
}

/// A record held, with where its files are in the posting lists.
#[derive(Debug)]
struct Entry {
    record: Record,
    /// What its per-address limits count against.
    source: String,
    /// The id of its first file; its files have the ids that follow.
    first: u32,
    cost: usize,
    /// When its peer's connection went away, if it did.
    gone: Option<u64>,
    /// The connection that holds it.
    owner: u64,
}

/// What one source IP address holds.
#[derive(Debug, Default)]
struct Source {
    ids: BTreeSet<String>,
    bytes: usize,
}

/// File ids a posting list keeps in one block: 16 KiB, so that no list is one large
/// allocation (large ones, grown and freed, fragment the heap).
pub const BLOCK: usize = 4096;

/// A sorted list of file ids, in blocks of at most [`BLOCK`] ids; each block's capacity is
/// kept within twice its length (or 4).
#[derive(Debug, Default)]
struct Postings {
    blocks: Vec<Vec<u32>>,
    len: usize,
}

impl Postings {
    /// Adds `id`, greater than every id held.
    fn push(&mut self, id: u32) {
        match self.blocks.last_mut() {
            Some(block) if block.len() < BLOCK => {
                if block.len() == block.capacity() {
                    block.reserve_exact(block.len().max(4).min(BLOCK - block.len()));
                }
                block.push(id);
            }
            _ => {
                let mut block = Vec::with_capacity(4);
                block.push(id);
                self.blocks.push(block);
            }
        }
        self.len += 1;
    }

    /// Removes the ids `first..end`.
    fn remove_range(&mut self, first: u32, end: u32) {
        let from = self
            .blocks
            .partition_point(|b| b.last().is_some_and(|&last| last < first));
        let mut i = from;
        while let Some(block) = self.blocks.get_mut(i) {
            if block.first().is_none_or(|&id| id >= end) {
                break;
            }
            let lo = block.partition_point(|&id| id < first);
            let hi = block.partition_point(|&id| id < end);
            if lo < hi {
                block.drain(lo..hi);
                self.len -= hi - lo;
            }
            if block.is_empty() {
                self.blocks.remove(i);
                continue;
            }
            if block.capacity() > 2 * block.len() + 4 {
                block.shrink_to(block.len().max(4));
            }
            i += 1;
        }
    }

    /// Whether `id` is held.
    fn contains(&self, id: u32) -> bool {
        let at = self
            .blocks
            .partition_point(|b| b.last().is_some_and(|&last| last < id));
        self.blocks
            .get(at)
            .is_some_and(|block| block.binary_search(&id).is_ok())
    }

    /// The ids, in order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks.iter().flatten().copied()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The records an index holds and their search index (see the module's Search and Bounds).
#[derive(Debug, Default)]
pub struct Index {
    limits: Limits,
    records: BTreeMap<String, Entry>,
    /// Each record's first file id, for finding a file by its id.
    firsts: BTreeMap<u32, String>,
    /// For each n-gram of a lowercased name, the ids of the files that have it, sorted.
    lists: HashMap<u32, Postings>,
    /// The ids of the files whose name has no word, sorted.
    blank: Postings,
    sources: HashMap<String, Source>,
    /// Bytes counted for the records held (the posting lists' own cost aside).
    record_bytes: usize,
    next_id: u32,
}

impl Index {
    /// An empty index with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes counted for everything held (never more than [`Limits::max_bytes`]).
    pub fn bytes(&self) -> usize {
        self.record_bytes + self.lists.len() * GRAM_COST
    }

    /// What holding `prepared` takes: the records of its address to drop first (gone,
    /// oldest first), or why it is refused. Changes nothing.
    pub fn plan(&self, prepared: &Prepared) -> Result<Vec<String>, Refusal> {
        let id = &prepared.record.id;
        let ip = &prepared.source;
        let old = self.records.get(id);
        let old_here = old.filter(|o| o.source == *ip);
        let source = self.sources.get(ip);
        let new_lists = prepared
            .distinct
            .iter()
            .filter(|g| !self.lists.contains_key(g))
            .count();
        let mut peers = (self.records.len() + 1).saturating_sub(usize::from(old.is_some()));
        let mut ip_peers =
            (source.map_or(0, |s| s.ids.len()) + 1).saturating_sub(usize::from(old_here.is_some()));
        let mut bytes = (self.bytes() + prepared.cost + new_lists * GRAM_COST)
            .saturating_sub(old.map_or(0, |o| o.cost));
        let mut ip_bytes = (source.map_or(0, |s| s.bytes) + prepared.cost)
            .saturating_sub(old_here.map_or(0, |o| o.cost));
        let mut droppable: Vec<(u64, &str, usize)> = source
            .map(|s| {
                s.ids
                    .iter()
                    .filter(|other| *other != id)
                    .filter_map(|other| self.records.get(other))
                    .filter_map(|e| e.gone.map(|at| (at, e.record.id.as_str(), e.cost)))
                    .collect()
            })
            .unwrap_or_default();
        droppable.sort_unstable();
        let mut droppable = droppable.into_iter();
        let mut dropped = Vec::new();
        loop {
            let refusal = if peers > self.limits.max_peers {
                Refusal::Peers {
                    max: self.limits.max_peers,
                }
            } else if ip_peers > self.limits.max_peers_per_ip {
                Refusal::PeersPerIp {
                    ip: ip.clone(),
                    max: self.limits.max_peers_per_ip,
                }
            } else if bytes > self.limits.max_bytes {
                Refusal::Memory {
                    needed: bytes,
                    max: self.limits.max_bytes,
                }
            } else if ip_bytes > self.limits.max_bytes_per_ip {
                Refusal::IpMemory {
                    ip: ip.clone(),
                    needed: ip_bytes,
                    max: self.limits.max_bytes_per_ip,
                }
            } else {
                return Ok(dropped);
            };
            let Some((_, victim, cost)) = droppable.next() else {
                return Err(refusal);
            };
            dropped.push(victim.to_owned());
            peers = peers.saturating_sub(1);
            ip_peers = ip_peers.saturating_sub(1);
            bytes = bytes.saturating_sub(cost);
            ip_bytes = ip_bytes.saturating_sub(cost);
        }
    }

    /// Holds `prepared` for the connection `owner` (replacing the record of the same id),
    /// after dropping what [`Index::plan`] says; returns the ids dropped, or why it is
    /// refused (then nothing changed).
    pub fn put(&mut self, prepared: Prepared, owner: u64) -> Result<Vec<String>, Refusal> {
        let dropped = self.plan(&prepared)?;
        for id in &dropped {
            self.remove(id);
        }
        self.remove(&prepared.record.id);
        self.insert(prepared, owner, None);
        Ok(dropped)
    }

    fn insert(&mut self, prepared: Prepared, owner: u64, gone: Option<u64>) {
        let files = prepared.record.files.len();
        let count = u32::try_from(files).unwrap_or(u32::MAX);
        if self.next_id.checked_add(count).is_none() {
            self.renumber();
        }
        let first = self.next_id;
        self.next_id = self.next_id.saturating_add(count);
        let mut start = 0;
        for (offset, (end, file)) in (0u32..).zip(prepared.ends.iter().zip(&prepared.record.files))
        {
            let id = first + offset;
            for g in prepared.grams.get(start..*end).unwrap_or_default() {
                self.lists.entry(*g).or_default().push(id);
            }
            if is_blank(&file.name) {
                self.blank.push(id);
            }
            start = *end;
        }
        let record_id = prepared.record.id.clone();
        if files > 0 {
            self.firsts.insert(first, record_id.clone());
        }
        let source = self.sources.entry(prepared.source.clone()).or_default();
        source.ids.insert(record_id.clone());
        source.bytes += prepared.cost;
        self.record_bytes += prepared.cost;
        self.records.insert(
            record_id,
            Entry {
                record: prepared.record,
                source: prepared.source,
                first,
                cost: prepared.cost,
                gone,
                owner,
            },
        );
    }

    /// Gives every file a new id from 0 (when ids run out: after 4 billion files listed;
    /// the memory bound keeps far fewer at once).
    fn renumber(&mut self) {
        let entries = std::mem::take(&mut self.records);
        *self = Self::new(self.limits);
        for entry in entries.into_values() {
            let prepared = Prepared::new(entry.record);
            let count = u32::try_from(prepared.record.files.len()).unwrap_or(u32::MAX);
            if self.next_id.checked_add(count).is_some() {
                self.insert(prepared, entry.owner, entry.gone);
            }
        }
    }

    /// Drops `id`, returning its record.
    pub fn remove(&mut self, id: &str) -> Option<Record> {
        let entry = self.records.remove(id)?;
        let files = u32::try_from(entry.record.files.len()).unwrap_or(u32::MAX);
        if files > 0 {
            let (first, end) = (entry.first, entry.first.saturating_add(files));
            self.firsts.remove(&first);
            let mut grams = Vec::new();
            for file in &entry.record.files {
                name_grams(&file.name, &mut grams);
            }
            grams.sort_unstable();
            grams.dedup();
            for g in grams {
                if let Some(list) = self.lists.get_mut(&g) {
                    list.remove_range(first, end);
                    if list.is_empty() {
                        self.lists.remove(&g);
                    }
                }
            }
            self.blank.remove_range(first, end);
        }
        if let Some(source) = self.sources.get_mut(&entry.source) {
            source.ids.remove(id);
            source.bytes = source.bytes.saturating_sub(entry.cost);
            if source.ids.is_empty() {
                self.sources.remove(&entry.source);
            }
        }
        self.record_bytes = self.record_bytes.saturating_sub(entry.cost);
        Some(entry.record)
    }

    /// Notes that the connection `owner` of `id` went away at `at` (unix seconds); nothing
    /// if another connection holds it now.
    pub fn set_gone(&mut self, id: &str, owner: u64, at: u64) {
        if let Some(entry) = self.records.get_mut(id).filter(|e| e.owner == owner) {
            entry.gone = Some(at);
        }
    }

    /// The records whose connection went away `grace` seconds or more before `now`.
    pub fn expired(&self, now: u64, grace: u64) -> Vec<String> {
        self.records
            .values()
            .filter(|e| e.gone.is_some_and(|at| now.saturating_sub(at) >= grace))
            .map(|e| e.record.id.clone())
            .collect()
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Option<&Record> {
        self.records.get(id).map(|e| &e.record)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record holding file `id`, and the file's place in it.
    fn file(&self, id: u32) -> Option<(&Record, usize, &Listed)> {
        let (first, record_id) = self.firsts.range(..=id).next_back()?;
        let record = &self.records.get(record_id)?.record;
        let place = usize::try_from(id - first).ok()?;
        Some((record, place, record.files.get(place)?))
    }

    /// Files matching `query` (its exact name, or every word of it; see the module's
    /// Search), at most [`MAX_RESULTS`], by holder and then in the holder's order.
    pub fn search(&self, query: &str) -> Vec<Hit> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        let mut lists: Vec<&Postings> = Vec::new();
        if words.is_empty() {
            lists.push(&self.blank);
        } else {
            let mut grams = Vec::new();
            for word in &words {
                word_grams(word, &mut grams);
            }
            grams.sort_unstable();
            grams.dedup();
            for g in grams {
                match self.lists.get(&g) {
                    Some(list) => lists.push(list),
                    None => return Vec::new(),
                }
            }
        }
        lists.sort_by_key(|list| list.len);
        let Some((driver, others)) = lists.split_first() else {
            return Vec::new();
        };
        let others = others.get(..others.len().min(3)).unwrap_or_default();
        let mut found: Vec<(&Record, usize, &Listed)> = Vec::new();
        for id in driver.iter() {
            if !others.iter().all(|list| list.contains(id)) {
                continue;
            }
            let Some((record, place, file)) = self.file(id) else {
                continue;
            };
            if file.name == query || matches(&file.name, query) {
                found.push((record, place, file));
                if found.len() >= MAX_RESULTS {
                    break;
                }
            }
        }
        found.sort_by(|a, b| (&a.0.id, a.1).cmp(&(&b.0.id, b.1)));
        found
            .into_iter()
            .map(|(record, _, file)| Hit {
                name: file.name.clone(),
                size: file.size,
                hash: file.hash.clone(),
                holder: record.id.clone(),
                key: record.key.clone(),
                addr: format!("{}:{}", record.ip, record.port),
            })
            .collect()
    }

    /// The seed's answer to SEARCH: the Python list of the holders' ports, as its server
    /// prints it (`[5001, 5002]`).
    pub fn seed_answer(&self, query: &str) -> String {
        let mut ports: Vec<u16> = Vec::new();
        for hit in self.search(query) {
            let port = hit
                .addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!("[{}]", list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn objects_are_found_however_the_bytes_are_cut() {
        let stream = br#"{"method":"JOIN","data":{"filePath":"/p"}} {"method":"SEARCH","data":{"query":"a b"}}"#;
        for cut in 1..stream.len() {
            let mut reader = ObjectReader::new(MAX_MESSAGE);
            let mut found = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                reader.push(piece);
                while let Some(object) = reader.next_object() {
                    found.push(object.unwrap());
                }
            }
            assert_eq!(found.len(), 2, "cut at {cut}");
        }
        let mut reader = ObjectReader::new(MAX_MESSAGE);
        reader.push(b"{nope}");
        assert!(matches!(
            reader.next_object(),
            Some(Err(ObjectError::Malformed(_)))
        ));
        let mut reader = ObjectReader::new(MAX_MESSAGE);
        reader.push(b"{\"a\":\"");
        reader.push(&vec![b'x'; MAX_MESSAGE + 1]);
        assert_eq!(
            reader.next_object(),
            Some(Err(ObjectError::TooLong { limit: MAX_MESSAGE }))
        );
    }

    #[test]
    fn seed_requests_parse_and_searches_answer_both_ways() {
        let join = serde_json::json!({"method":"JOIN","data":{"filePath":"/x/p2p/5001"}});
        assert_eq!(
            Request::from_value(&join).unwrap(),
            Request::Join {
                file_path: Some("/x/p2p/5001".into()),
                files: vec![],
                teia: None
            }
        );
        let update = serde_json::json!({"method":"UPDATE","data":{"files":["a.mp4","b.txt"]}});
        let Request::Update { files } = Request::from_value(&update).unwrap() else {
            panic!()
        };
        let mut index = Index::default();
        let record = Record {
            id: "127.0.0.1:5001".into(),
            port: 5001,
            ip: "127.0.0.1".into(),
            key: None,
            files,
        };
        assert_eq!(index.put(Prepared::new(record), 1), Ok(vec![]));
        assert_eq!(index.seed_answer("a.mp4"), "[5001]");
        assert_eq!(index.seed_answer("zzz"), "[]");
        assert_eq!(index.search("MP4")[0].holder, "127.0.0.1:5001");
        assert!(Request::from_value(&serde_json::json!({"method":"NOPE"})).is_err());
        assert!(Request::from_value(&serde_json::json!({"method":"SEARCH"})).is_err());
    }

    fn record(id: &str, ip: &str, names: &[&str]) -> Record {
        Record {
            id: id.into(),
            port: 5001,
            ip: ip.into(),
            key: None,
            files: names
                .iter()
                .map(|n| Listed {
                    name: (*n).into(),
                    size: 1,
                    hash: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn files_names_hashes_queries_and_ids_are_bounded() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let mut big = record("p", "10.0.0.1", &["ok.txt", &long]);
        big.files.push(Listed {
            name: "hashed".into(),
            size: 1,
            hash: "h".repeat(MAX_HASH_BYTES + 1),
        });
        big.files.extend((0..MAX_FILES_PER_PEER).map(|i| Listed {
            name: format!("f{i}"),
            size: 1,
            hash: String::new(),
        }));
        let prepared = Prepared::new(big);
        assert_eq!(prepared.record().files.len(), MAX_FILES_PER_PEER);
        assert_eq!(prepared.ignored(), 3);
        assert_eq!(prepared.record().files[0].name, "ok.txt");
        assert_eq!(prepared.record().files[1].name, "f0");

        // The wire's own bounds: a query and a peer id.
        let query = "q".repeat(MAX_QUERY_BYTES + 1);
        let search = serde_json::json!({"method":"SEARCH","data":{"query":query}});
        assert!(Request::from_value(&search).is_err());
        let search = serde_json::json!({"method":"SEARCH","data":{"query":&query[1..]}});
        assert!(Request::from_value(&search).is_ok());
        let join = serde_json::json!({"method":"JOIN","data":{"teia":1,
            "peer":{"peer_id":"p".repeat(MAX_ID_BYTES + 1),"key":"k"},"files":[]}});
        assert!(Request::from_value(&join).is_err());
        // An UPDATE is bounded like a JOIN.
        let names: Vec<String> = (0..MAX_FILES_PER_PEER + 5)
            .map(|i| format!("{i}"))
            .collect();
        let update = serde_json::json!({"method":"UPDATE","data":{"files":names}});
        let Request::Update { files } = Request::from_value(&update).unwrap() else {
            panic!()
        };
        assert_eq!(files.len(), MAX_FILES_PER_PEER);
    }

    #[test]
    fn peers_per_address_and_in_all_are_capped_dropping_gone_ones_first() {
        let limits = Limits {
            max_peers: 5,
            max_peers_per_ip: 3,
            ..Limits::default()
        };
        let mut index = Index::new(limits);
        for (owner, id) in (1..).zip(["a1", "a2", "a3"]) {
            assert_eq!(
                index.put(Prepared::new(record(id, "A", &[])), owner),
                Ok(vec![])
            );
        }
        let refused = index.put(Prepared::new(record("a4", "A", &[])), 4);
        assert_eq!(
            refused,
            Err(Refusal::PeersPerIp {
                ip: "A".into(),
                max: 3
            })
        );
        assert_eq!(refused.unwrap_err().code(), "busy");
        assert_eq!(index.len(), 3);
        // The same peer joining again replaces its record.
        assert_eq!(
            index.put(Prepared::new(record("a2", "A", &["x"])), 5),
            Ok(vec![])
        );
        // A connection that went away makes room, oldest first; another owner's leaving
        // does not count.
        index.set_gone("a3", 99, 10);
        assert!(index.put(Prepared::new(record("a4", "A", &[])), 6).is_err());
        index.set_gone("a3", 3, 20);
        index.set_gone("a1", 1, 10);
        assert_eq!(
            index.put(Prepared::new(record("a4", "A", &[])), 6),
            Ok(vec!["a1".to_owned()])
        );
        assert_eq!(
            index.put(Prepared::new(record("a5", "A", &[])), 7),
            Ok(vec!["a3".to_owned()])
        );
        assert!(index.get("a1").is_none() && index.get("a3").is_none());
        // Another address is not limited by A's, but by the total; it drops no one else's.
        assert_eq!(
            index.put(Prepared::new(record("b1", "B", &[])), 8),
            Ok(vec![])
        );
        assert_eq!(
            index.put(Prepared::new(record("b2", "B", &[])), 9),
            Ok(vec![])
        );
        index.set_gone("a2", 5, 30);
        assert_eq!(
            index.put(Prepared::new(record("b3", "B", &[])), 10),
            Err(Refusal::Peers { max: 5 })
        );
        assert_eq!(index.len(), 5);
        assert_eq!(index.expired(40, 10), vec!["a2".to_owned()]);
        // IPv6 addresses count by their /64 network; a mapped IPv4 address as that address.
        let mut index = Index::new(Limits {
            max_peers_per_ip: 1,
            ..Limits::default()
        });
        let put = |index: &mut Index, id: &str, ip: &str| {
            index.put(Prepared::new(record(id, ip, &[])), 1).map(|_| ())
        };
        assert_eq!(put(&mut index, "v6a", "2001:db8:1:2::1"), Ok(()));
        assert!(put(&mut index, "v6b", "2001:db8:1:2:ffff::9").is_err());
        assert_eq!(put(&mut index, "v6c", "2001:db8:1:3::1"), Ok(()));
        assert_eq!(put(&mut index, "v4a", "10.0.0.1"), Ok(()));
        assert_eq!(
            put(&mut index, "v4b", "::ffff:10.0.0.1"),
            Err(Refusal::PeersPerIp {
                ip: "10.0.0.1".into(),
                max: 1
            })
        );
        assert!(index.expired(39, 10).is_empty());
    }

    #[test]
    fn memory_is_bounded_in_bytes_and_a_refusal_changes_nothing() {
        let max = 2_000_000;
        let mut index = Index::new(Limits::with_memory(max));
        let names: Vec<String> = (0..50)
            .map(|i| format!("lecture {i:03} of the course.mp4"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // One address's share (a quarter) fills first.
        let mut held = 0;
        let refusal = loop {
            let prepared = Prepared::new(record(&format!("a{held}"), "A", &names));
            match index.put(prepared, held) {
                Ok(_) => held += 1,
                Err(refusal) => break refusal,
            }
            assert!(index.bytes() <= max);
        };
        assert!(matches!(refusal, Refusal::IpMemory { .. }), "{refusal}");
        assert_eq!(refusal.code(), "full");
        assert!(held > 0);
        // Others fill the rest, up to the bound and never past it.
        let mut refusal = None;
        for (n, ip) in (0..)
            .zip(["B", "C", "D", "E", "F"].iter().cycle())
            .take(1000)
        {
            let before = (index.len(), index.bytes());
            let prepared = Prepared::new(record(&format!("{ip}{n}"), ip, &names));
            if let Err(e) = index.put(prepared, 1000 + n) {
                assert_eq!(
                    before,
                    (index.len(), index.bytes()),
                    "a refusal changed the index"
                );
                refusal = Some(e);
            }
            assert!(index.bytes() <= max);
        }
        assert!(
            matches!(refusal, Some(Refusal::Memory { .. })),
            "{refusal:?}"
        );
        // An UPDATE that does not fit leaves the old record.
        let mut grown = record("a0", "A", &names);
        grown.files.extend(record("", "", &names).files);
        assert!(index.put(Prepared::new(grown), 0).is_err());
        assert_eq!(index.get("a0").unwrap().files.len(), 50);
        // Everything dropped, nothing is counted.
        let ids: Vec<String> = index.records.keys().cloned().collect();
        for id in ids {
            index.remove(&id);
        }
        assert_eq!(index.bytes(), 0);
        assert!(index.lists.is_empty() && index.sources.is_empty() && index.firsts.is_empty());
    }

    /// The search as it was: every file of every record, in order.
    fn linear(index: &Index, query: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        for entry in index.records.values() {
            let record = &entry.record;
            for file in &record.files {
                if file.name == query || matches(&file.name, query) {
                    hits.push(Hit {
                        name: file.name.clone(),
                        size: file.size,
                        hash: file.hash.clone(),
                        holder: record.id.clone(),
                        key: record.key.clone(),
                        addr: format!("{}:{}", record.ip, record.port),
                    });
                }
            }
        }
        hits
    }

    /// A small deterministic generator (xorshift64*).
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
        }

        fn text(&mut self, len: usize) -> String {
            const PIECES: &[&str] = &[
                "a", "b", "A", "B", "ab", "mp4", ".", " ", "  ", "\t", "Σ", "σ", "ς", "é", "É",
                "İ", "i", "ß", "x", "y", "_", "1",
            ];
            (0..len).map(|_| PIECES[self.below(PIECES.len())]).collect()
        }
    }

    #[test]
    fn search_by_the_index_equals_a_scan_of_every_file() {
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        let mut index = Index::default();
        let mut names: Vec<String> = vec![String::new(), " ".into(), "ΑΣ Β".into()];
        let (mut asked, mut answered) = (0, 0);
        for round in 0..400u64 {
            let id = format!("peer{}", random.below(60));
            match random.below(10) {
                0 => {
                    index.remove(&id);
                }
                1 => index.set_gone(&id, round, round),
                _ => {
                    let count = random.below(12);
                    let files: Vec<String> = (0..count)
                        .map(|_| {
                            if random.below(8) == 0 {
                                names[random.below(names.len())].clone()
                            } else {
                                let len = random.below(9);
                                random.text(len)
                            }
                        })
                        .collect();
                    names.extend(files.iter().cloned());
                    let files: Vec<&str> = files.iter().map(String::as_str).collect();
                    let ip = format!("10.0.0.{}", random.below(4));
                    index
                        .put(Prepared::new(record(&id, &ip, &files)), round)
                        .unwrap();
                }
            }
            for _ in 0..20 {
                let query = match random.below(4) {
                    0 => names[random.below(names.len())].clone(),
                    1 => {
                        let name = &names[random.below(names.len())];
                        let cut: Vec<char> = name.chars().collect();
                        let from = random.below(cut.len() + 1);
                        let to = from + random.below(cut.len() + 1 - from);
                        cut[from..to].iter().collect()
                    }
                    _ => {
                        let len = random.below(5);
                        random.text(len)
                    }
                };
                let all = linear(&index, &query);
                let found = index.search(&query);
                answered += usize::from(!all.is_empty());
                asked += 1;
                if all.len() < MAX_RESULTS {
                    assert_eq!(found, all, "query {query:?}");
                } else {
                    assert_eq!(found.len(), MAX_RESULTS);
                    assert!(found.iter().all(|hit| all.contains(hit)), "query {query:?}");
                }
            }
        }
        // The queries found something often enough to mean something.
        assert!(answered * 4 > asked, "{answered} of {asked}");
        // Many matches: the answer stops at MAX_RESULTS.
        let many: Vec<String> = (0..MAX_RESULTS + 10)
            .map(|i| format!("song {i}.mp3"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        index
            .put(Prepared::new(record("many", "10.0.0.9", &many)), 0)
            .unwrap();
        let found = index.search("SONG");
        assert_eq!(found.len(), MAX_RESULTS);
        assert!(found.iter().all(|hit| hit.holder == "many"));
    }

    #[test]
    fn file_ids_run_out_and_are_given_again() {
        let mut index = Index::default();
        index
            .put(
                Prepared::new(record("old", "A", &["kept one.txt", "other"])),
                1,
            )
            .unwrap();
        index.next_id = u32::MAX - 1;
        index
            .put(
                Prepared::new(record("new", "B", &["new one.txt", "more"])),
                2,
            )
            .unwrap();
        assert_eq!(index.next_id, 4);
        let holders: Vec<String> = index.search("ONE").into_iter().map(|h| h.holder).collect();
        assert_eq!(holders, ["new", "old"]);
        assert_eq!(index.search("more")[0].holder, "new");
        index.remove("old");
        assert!(index.search("kept").is_empty());
    }

    #[test]
    fn posting_lists_in_blocks_behave_as_one_sorted_list() {
        let mut random = Random(7);
        let mut list = Postings::default();
        let mut model: Vec<u32> = Vec::new();
        let mut next = 0u32;
        for _ in 0..200 {
            for _ in 0..random.below(3 * BLOCK) {
                next += 1 + random.below(3) as u32;
                list.push(next);
                model.push(next);
            }
            let first = random.below(next as usize + 1) as u32;
            let end = first + random.below(2 * BLOCK) as u32;
            list.remove_range(first, end);
            model.retain(|id| !(first..end).contains(id));
            assert_eq!(list.len, model.len());
            assert!(list.iter().eq(model.iter().copied()));
            for probe in [first, end, next, random.below(next as usize + 2) as u32] {
                assert_eq!(list.contains(probe), model.binary_search(&probe).is_ok());
            }
            assert!(list.blocks.iter().all(|b| !b.is_empty()
                && b.len() <= BLOCK
                && b.capacity() <= (2 * b.len()).max(4) + 4));
        }
    }
}
