//! The Napster role (seed 004, PROTOCOL.md section 7): the index's messages and its state,
//! with no I/O.
//!
//! The seed's programs write one JSON object per `send`, with no newline or length, and read
//! with one `recv`: [`ObjectReader`] finds whole objects in whatever bytes arrived. The seed's
//! requests are `{"method":"JOIN","data":{"filePath":DIR}}`, `{"method":"SEARCH","data":
//! {"query":NAME}}`, `{"method":"UPDATE","data":{"files":[NAME,...]}}` and, to a peer,
//! `{"method":"DOWNLOAD_REQUEST","data":{"filename":NAME,"port":PORT}}`. teia nodes add
//! `"teia":1` in `data` and richer fields (sizes, hashes, keys), and get JSON answers.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::msg::matches;

/// Bytes one message may take at most; a longer one is an error and the connection closes.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Files one peer may list at most; more are ignored.
pub const MAX_FILES_PER_PEER: usize = 10_000;
/// Peers the index holds at most; a JOIN beyond is answered `busy`.
pub const MAX_PEERS: usize = 10_000;
/// Results one SEARCH answers at most.
pub const MAX_RESULTS: usize = 256;

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Not JSON.
    #[error("not a JSON object: {0}")]
    Malformed(String),
    /// Longer than [`MAX_MESSAGE`].
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
}

/// Finds whole JSON objects in a byte stream with no delimiters.
#[derive(Debug, Default)]
pub struct ObjectReader {
    buffer: Vec<u8>,
}

impl ObjectReader {
    /// Adds bytes read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Takes the bytes after the objects read (raw file bytes after the seed's answers).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// The next whole object, if one arrived.
    pub fn next_object(&mut self) -> Option<Result<Value, ReadError>> {
        let start = self
            .buffer
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buffer.len());
        self.buffer.drain(..start);
        if self.buffer.is_empty() {
            return None;
        }
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                let used = stream.byte_offset();
                self.buffer.drain(..used);
                Some(Ok(value))
            }
            Some(Err(e)) if e.is_eof() => {
                (self.buffer.len() > MAX_MESSAGE).then_some(Err(ReadError::TooLong))
            }
            Some(Err(e)) => {
                self.buffer.clear();
                Some(Err(ReadError::Malformed(e.to_string())))
            }
            None => None,
        }
    }
}

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

impl Request {
    /// Reads a request object; `Err` says what is wrong, for the error answer.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        let method = value
            .get("method")
            .and_then(Value::as_str)
            .ok_or("no method")?;
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
                    Some(
                        serde_json::from_value(data.get("peer").cloned().unwrap_or(Value::Null))
                            .map_err(|e| format!("teia JOIN without its peer: {e}"))?,
                    )
                } else {
                    None
                },
            }),
            "SEARCH" => Ok(Self::Search {
                query: data
                    .get("query")
                    .and_then(Value::as_str)
                    .ok_or("SEARCH without data.query")?
                    .to_owned(),
                teia: is_teia,
            }),
            "UPDATE" => {
                if data.get("files").and_then(Value::as_array).is_none() {
                    return Err("UPDATE without data.files".into());
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
                    .ok_or("DOWNLOAD_REQUEST without data.filename")?
                    .to_owned(),
            }),
            other => Err(format!("unknown method {other:?}")),
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

/// The records an index holds, and its searches.
#[derive(Debug, Default)]
pub struct Index {
    records: std::collections::BTreeMap<String, Record>,
}

impl Index {
    /// Holds `record` (replacing the one of the same id); false when full.
    pub fn put(&mut self, record: Record) -> bool {
        if self.records.len() >= MAX_PEERS && !self.records.contains_key(&record.id) {
            return false;
        }
        self.records.insert(record.id.clone(), record);
        true
    }

    /// Replaces the files of `id`; false if unknown.
    pub fn update(&mut self, id: &str, files: Vec<Listed>) -> bool {
        match self.records.get_mut(id) {
            Some(record) => {
                record.files = files;
                true
            }
            None => false,
        }
    }

    /// Drops `id`.
    pub fn remove(&mut self, id: &str) -> Option<Record> {
        self.records.remove(id)
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Option<&Record> {
        self.records.get(id)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Files matching `query` (exact name, or every word), with their holders.
    pub fn search(&self, query: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        for record in self.records.values() {
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
                    if hits.len() >= MAX_RESULTS {
                        return hits;
                    }
                }
            }
        }
        hits
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
            let mut reader = ObjectReader::default();
            let mut found = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                reader.push(piece);
                while let Some(object) = reader.next_object() {
                    found.push(object.unwrap());
                }
            }
            assert_eq!(found.len(), 2, "cut at {cut}");
        }
        let mut reader = ObjectReader::default();
        reader.push(b"{nope}");
        assert!(matches!(
            reader.next_object(),
            Some(Err(ReadError::Malformed(_)))
        ));
        let mut reader = ObjectReader::default();
        reader.push(b"{\"a\":\"");
        reader.push(&vec![b'x'; MAX_MESSAGE + 1]);
        assert_eq!(reader.next_object(), Some(Err(ReadError::TooLong)));
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
        assert!(index.put(Record {
            id: "127.0.0.1:5001".into(),
            port: 5001,
            ip: "127.0.0.1".into(),
            key: None,
            files,
        }));
        assert_eq!(index.seed_answer("a.mp4"), "[5001]");
        assert_eq!(index.seed_answer("zzz"), "[]");
        assert_eq!(index.search("MP4")[0].holder, "127.0.0.1:5001");
        assert!(Request::from_value(&serde_json::json!({"method":"NOPE"})).is_err());
        assert!(Request::from_value(&serde_json::json!({"method":"SEARCH"})).is_err());
    }
}
