//! Content addressing (PROTOCOL.md section 6.2): a file is named by its BLAKE3 hash, and cut
//! into chunks whose BLAKE3 chaining values (its "outboard") let a receiver check every chunk
//! on arrival against that hash alone.
//!
//! A chunk is a power-of-two number of BLAKE3's 1 KiB chunks, so each chunk is a subtree of
//! BLAKE3's own tree: the chunks' chaining values, merged pairwise level by level (an odd one
//! moving up), give the file's BLAKE3 hash. A file of one chunk has no outboard: the chunk is
//! checked against the hash itself.

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Smallest chunk: 256 KiB.
pub const MIN_CHUNK: u64 = 256 * 1024;
/// Chunks per file at most; larger files get larger chunks, so an outboard is at most
/// 2 MiB (65,536 chaining values of 32 bytes).
pub const MAX_CHUNKS: u64 = 65_536;
/// Bytes of one chaining value.
pub const CV_LEN: usize = 32;

/// A BLAKE3 hash: the name of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, as `b3sum` prints it.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        blake3::Hash::from_hex(text.trim())
            .ok()
            .map(|h| Self(*h.as_bytes()))
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a file of a given size is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The file's size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk: u64,
}

impl Layout {
    /// The layout of a file of `size` bytes: the smallest power-of-two chunk of at least
    /// [`MIN_CHUNK`] that keeps the count within [`MAX_CHUNKS`].
    pub fn new(size: u64) -> Self {
        let mut chunk = MIN_CHUNK;
        while size.div_ceil(chunk) > MAX_CHUNKS {
            chunk *= 2;
        }
        Self { size, chunk }
    }

    /// Number of chunks (0 for an empty file).
    pub fn chunks(&self) -> u32 {
        u32::try_from(self.size.div_ceil(self.chunk)).unwrap_or(u32::MAX)
    }

    /// Offset and length of chunk `index`; `None` past the end.
    pub fn range(&self, index: u32) -> Option<(u64, u64)> {
        let offset = u64::from(index).checked_mul(self.chunk)?;
        if offset >= self.size {
            return None;
        }
        Some((offset, self.chunk.min(self.size - offset)))
    }

    /// Bytes of this file's outboard.
    pub fn outboard_len(&self) -> usize {
        match self.chunks() {
            0 | 1 => 0,
            n => n as usize * CV_LEN,
        }
    }
}

/// Why an outboard or a chunk does not match a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The outboard has the wrong length for the file's size.
    #[error("outboard of {got} bytes, expected {expected} for this size")]
    OutboardLength {
        /// What came.
        got: usize,
        /// What the size implies.
        expected: usize,
    },
    /// The outboard's chaining values do not merge to the file's hash.
    #[error("outboard does not match the hash")]
    OutboardMismatch,
}

/// The hash of a file whose chunks have these chaining values (at least two).
fn root(cvs: &[ChainingValue]) -> Option<Hash> {
    let mut level = cvs.to_vec();
    while level.len() > 2 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for pair in level.chunks(2) {
            match pair {
                [left, right] => next.push(merge_subtrees_non_root(left, right, Mode::Hash)),
                [single] => next.push(*single),
                _ => {}
            }
        }
        level = next;
    }
    match level.as_slice() {
        [left, right] => Some(Hash(
            *merge_subtrees_root(left, right, Mode::Hash).as_bytes(),
        )),
        _ => None,
    }
}

/// A file's verified chunk hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    layout: Layout,
    hash: Hash,
    cvs: Vec<ChainingValue>,
}

impl Outboard {
    /// Checks `bytes` (as sent by a holder) against `hash` for a file of `size` bytes.
    pub fn verify(hash: Hash, size: u64, bytes: &[u8]) -> Result<Self, VerifyError> {
        let layout = Layout::new(size);
        if bytes.len() != layout.outboard_len() {
            return Err(VerifyError::OutboardLength {
                got: bytes.len(),
                expected: layout.outboard_len(),
            });
        }
        let cvs: Vec<ChainingValue> = bytes
            .chunks_exact(CV_LEN)
            .filter_map(|cv| cv.try_into().ok())
            .collect();
        if layout.chunks() >= 2 && root(&cvs) != Some(hash) {
            return Err(VerifyError::OutboardMismatch);
        }
        Ok(Self { layout, hash, cvs })
    }

    /// The file's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The file's hash.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The bytes a holder sends.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.cvs.concat()
    }

    /// A checker for chunk `index`.
    pub fn chunk_hasher(&self, index: u32) -> Option<ChunkHasher> {
        let (offset, len) = self.layout.range(index)?;
        let expected = if self.layout.chunks() == 1 {
            Expected::Root(self.hash)
        } else {
            Expected::Cv(*self.cvs.get(index as usize)?)
        };
        Some(ChunkHasher::new(offset, len, expected))
    }
}

#[derive(Debug, Clone, Copy)]
enum Expected {
    Root(Hash),
    Cv(ChainingValue),
}

/// Hashes one chunk as its bytes arrive, in order, and says whether they were right.
pub struct ChunkHasher {
    hasher: blake3::Hasher,
    expected: Expected,
    remaining: u64,
}

impl ChunkHasher {
    fn new(offset: u64, len: u64, expected: Expected) -> Self {
        let mut hasher = blake3::Hasher::new();
        if matches!(expected, Expected::Cv(_)) {
            hasher.set_input_offset(offset);
        }
        Self {
            hasher,
            expected,
            remaining: len,
        }
    }

    /// Bytes of the chunk still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Takes the next bytes of the chunk (at most [`remaining`](Self::remaining)).
    pub fn update(&mut self, bytes: &[u8]) {
        let take = (bytes.len() as u64).min(self.remaining) as usize;
        self.hasher.update(bytes.get(..take).unwrap_or_default());
        self.remaining -= take as u64;
    }

    /// Whether all the chunk's bytes came and they match.
    pub fn matches(&self) -> bool {
        if self.remaining != 0 {
            return false;
        }
        match self.expected {
            Expected::Root(hash) => Hash(*self.hasher.finalize().as_bytes()) == hash,
            Expected::Cv(cv) => self.hasher.count() > 0 && self.hasher.finalize_non_root() == cv,
        }
    }
}

/// Computes a file's hash and outboard from its bytes, fed in order by [`update`](Self::update).
pub struct OutboardBuilder {
    layout: Layout,
    cvs: Vec<ChainingValue>,
    current: blake3::Hasher,
    whole: Option<blake3::Hasher>,
    offset: u64,
}

impl OutboardBuilder {
    /// For a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        let layout = Layout::new(size);
        Self {
            layout,
            cvs: Vec::with_capacity(layout.chunks() as usize),
            current: blake3::Hasher::new(),
            whole: (layout.chunks() <= 1).then(blake3::Hasher::new),
            offset: 0,
        }
    }

    /// Takes the next bytes of the file.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if let Some(whole) = &mut self.whole {
            whole.update(bytes);
            self.offset += bytes.len() as u64;
            return;
        }
        while !bytes.is_empty() {
            let in_chunk = self.offset % self.layout.chunk;
            let room = (self.layout.chunk - in_chunk) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.current.update(now);
            self.offset += now.len() as u64;
            bytes = rest;
            if self.offset.is_multiple_of(self.layout.chunk) {
                self.close_chunk();
            }
        }
    }

    /// Closes the chunk that just ended at a chunk boundary and starts the next one.
    fn close_chunk(&mut self) {
        if self.current.count() > 0 {
            self.cvs.push(self.current.finalize_non_root());
        }
        self.current = blake3::Hasher::new();
        if self.offset < self.layout.size {
            self.current.set_input_offset(self.offset);
        }
    }

    /// The hash and outboard; `None` when the bytes fed were not `size` bytes.
    pub fn finish(mut self) -> Option<Outboard> {
        if self.offset != self.layout.size {
            return None;
        }
        if let Some(whole) = &self.whole {
            return Some(Outboard {
                layout: self.layout,
                hash: Hash(*whole.finalize().as_bytes()),
                cvs: Vec::new(),
            });
        }
        if self.current.count() > 0 {
            self.cvs.push(self.current.finalize_non_root());
        }
        let hash = root(&self.cvs)?;
        Some(Outboard {
            layout: self.layout,
            hash,
            cvs: self.cvs,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn build(bytes: &[u8], piece: usize) -> Outboard {
        let mut builder = OutboardBuilder::new(bytes.len() as u64);
        for part in bytes.chunks(piece.max(1)) {
            builder.update(part);
        }
        builder.finish().unwrap()
    }

    #[test]
    fn the_hash_is_blake3_of_the_file_for_every_shape() {
        let chunk = MIN_CHUNK as usize;
        for len in [
            0,
            1,
            1024,
            chunk - 1,
            chunk,
            chunk + 1,
            2 * chunk,
            3 * chunk + 17,
            5 * chunk,
        ] {
            let bytes = data(len);
            let outboard = build(&bytes, 100_000);
            assert_eq!(outboard.hash(), Hash::of(&bytes), "len {len}");
            let again =
                Outboard::verify(outboard.hash(), len as u64, &outboard.to_bytes()).unwrap();
            assert_eq!(again, outboard);
        }
    }

    #[test]
    fn every_chunk_checks_and_one_bad_byte_is_caught() {
        let chunk = MIN_CHUNK as usize;
        for len in [chunk / 2, 3 * chunk + 5] {
            let bytes = data(len);
            let outboard = build(&bytes, 65_519);
            let layout = outboard.layout();
            for index in 0..layout.chunks() {
                let (offset, size) = layout.range(index).unwrap();
                let piece = &bytes[offset as usize..(offset + size) as usize];
                let mut good = outboard.chunk_hasher(index).unwrap();
                for part in piece.chunks(7_000) {
                    good.update(part);
                }
                assert!(good.matches());
                let mut bad_piece = piece.to_vec();
                bad_piece[size as usize / 2] ^= 1;
                let mut bad = outboard.chunk_hasher(index).unwrap();
                bad.update(&bad_piece);
                assert!(!bad.matches());
                let mut short = outboard.chunk_hasher(index).unwrap();
                short.update(&piece[..piece.len() - 1]);
                assert!(!short.matches());
            }
        }
    }

    #[test]
    fn a_forged_outboard_is_refused() {
        let bytes = data(3 * MIN_CHUNK as usize);
        let outboard = build(&bytes, 1 << 20);
        let mut forged = outboard.to_bytes();
        forged[5] ^= 1;
        assert_eq!(
            Outboard::verify(outboard.hash(), bytes.len() as u64, &forged),
            Err(VerifyError::OutboardMismatch)
        );
        assert!(matches!(
            Outboard::verify(outboard.hash(), bytes.len() as u64, &forged[..40]),
            Err(VerifyError::OutboardLength { .. })
        ));
    }

    #[test]
    fn large_files_get_larger_chunks() {
        assert_eq!(Layout::new(1 << 30).chunk, MIN_CHUNK);
        assert_eq!(Layout::new(1 << 30).chunks(), 4096);
        let huge = Layout::new(1 << 40);
        assert!(huge.chunks() as u64 <= MAX_CHUNKS);
        assert_eq!(huge.chunk, 1 << 24);
        assert_eq!(Layout::new(0).chunks(), 0);
        assert_eq!(Layout::new(0).range(0), None);
    }

    #[test]
    fn hex_round_trips() {
        let hash = Hash::of(b"abc");
        assert_eq!(Hash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(Hash::from_hex("zz"), None);
    }
}
