//! The download planner: which chunk to ask which holder for. No I/O and no clock: the
//! runtime reports what arrived and asks what to request next.
//!
//! Holders pull work: each keeps a window of chunks requested, and asks for more as chunks
//! arrive, so a faster holder is given more. Chunks are handed out in file order (the disk
//! writes stay sequential-ish), each to one holder at a time: a chunk is written where it
//! lands while it is checked, so two copies of one chunk in flight could let a bad copy
//! overwrite a good one. A holder that sends a bad chunk, stalls or leaves gets its chunks
//! put back for the others.

use std::collections::{BTreeMap, BTreeSet};

use super::tree::Layout;

/// Identifies a holder within one download, chosen by the runtime.
pub type HolderId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Missing,
    Requested,
    Done,
}

#[derive(Debug, Default)]
struct Holder {
    requested: BTreeSet<u32>,
}

/// What a holder's arrival of a chunk means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New and verified.
    Fresh,
    /// Already done (it was on disk).
    Duplicate,
    /// Not asked of this holder.
    Unexpected,
}

/// Plans one file's download across its holders.
#[derive(Debug)]
pub struct Planner {
    layout: Layout,
    chunks: Vec<Chunk>,
    holders: BTreeMap<HolderId, Holder>,
    cursor: usize,
    done: u32,
    done_bytes: u64,
}

impl Planner {
    /// A plan for `layout`, with the chunks in `have` already on disk and verified.
    pub fn new(layout: Layout, have: &[bool]) -> Self {
        let count = layout.chunks() as usize;
        let chunks: Vec<Chunk> = (0..count)
            .map(|i| {
                if have.get(i).copied().unwrap_or(false) {
                    Chunk::Done
                } else {
                    Chunk::Missing
                }
            })
            .collect();
        let done = chunks.iter().filter(|c| **c == Chunk::Done).count() as u32;
        let done_bytes = (0..count as u32)
            .filter(|&i| chunks.get(i as usize) == Some(&Chunk::Done))
            .filter_map(|i| layout.range(i).map(|(_, len)| len))
            .sum();
        Self {
            layout,
            chunks,
            holders: BTreeMap::new(),
            cursor: 0,
            done,
            done_bytes,
        }
    }

    /// The file's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether every chunk is done.
    pub fn is_complete(&self) -> bool {
        self.done == self.layout.chunks()
    }

    /// Bytes verified so far (those on disk at the start included).
    pub fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    /// Adds a holder.
    pub fn add_holder(&mut self, id: HolderId) {
        self.holders.entry(id).or_default();
    }

    /// Removes a holder (it left, failed or sent bad bytes); its chunks go back to be asked
    /// of others.
    pub fn remove_holder(&mut self, id: HolderId) {
        let Some(holder) = self.holders.remove(&id) else {
            return;
        };
        for index in holder.requested {
            self.unsend(index);
        }
    }

    fn unsend(&mut self, index: u32) {
        let i = index as usize;
        if let Some(chunk @ Chunk::Requested) = self.chunks.get_mut(i) {
            *chunk = Chunk::Missing;
            self.cursor = self.cursor.min(i);
        }
    }

    /// Chunks to ask `id` for now, so that it has `window` outstanding.
    pub fn next_requests(&mut self, id: HolderId, window: usize) -> Vec<u32> {
        let Some(outstanding) = self.holders.get(&id).map(|h| h.requested.len()) else {
            return Vec::new();
        };
        let mut picked = Vec::new();
        let want = window.saturating_sub(outstanding);
        while picked.len() < want {
            match self.next_missing() {
                Some(index) => picked.push(index),
                None => break,
            }
        }
        for &index in &picked {
            if let Some(chunk) = self.chunks.get_mut(index as usize) {
                *chunk = Chunk::Requested;
            }
            if let Some(holder) = self.holders.get_mut(&id) {
                holder.requested.insert(index);
            }
        }
        picked
    }

    fn next_missing(&mut self) -> Option<u32> {
        while let Some(chunk) = self.chunks.get(self.cursor) {
            let index = self.cursor;
            self.cursor += 1;
            if *chunk == Chunk::Missing {
                return u32::try_from(index).ok();
            }
        }
        None
    }

    /// Chunk `index` arrived from `id` and verified.
    pub fn arrived(&mut self, id: HolderId, index: u32) -> Arrival {
        let Some(holder) = self.holders.get_mut(&id) else {
            return Arrival::Unexpected;
        };
        if !holder.requested.remove(&index) {
            return Arrival::Unexpected;
        }
        match self.chunks.get(index as usize) {
            Some(Chunk::Done) => Arrival::Duplicate,
            Some(_) => {
                let len = self.layout.range(index).map_or(0, |(_, len)| len);
                if let Some(chunk) = self.chunks.get_mut(index as usize) {
                    *chunk = Chunk::Done;
                }
                self.done += 1;
                self.done_bytes += len;
                Arrival::Fresh
            }
            None => Arrival::Unexpected,
        }
    }

    /// Whether `id` has chunks requested and not yet arrived.
    pub fn busy(&self, id: HolderId) -> bool {
        self.holders
            .get(&id)
            .is_some_and(|h| !h.requested.is_empty())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proto::tree::MIN_CHUNK;

    fn layout(chunks: u64) -> Layout {
        Layout::new(chunks * MIN_CHUNK)
    }

    #[test]
    fn two_holders_share_the_chunks_and_finish() {
        let mut plan = Planner::new(layout(10), &[]);
        plan.add_holder(1);
        plan.add_holder(2);
        let a = plan.next_requests(1, 3);
        let b = plan.next_requests(2, 3);
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(b, vec![3, 4, 5]);
        let mut outstanding: Vec<(u32, u32)> = a
            .iter()
            .map(|&i| (1, i))
            .chain(b.iter().map(|&i| (2, i)))
            .collect();
        let mut fresh = 0;
        while let Some((holder, index)) = outstanding.pop() {
            assert_eq!(plan.arrived(holder, index), Arrival::Fresh);
            fresh += 1;
            for next in plan.next_requests(holder, 3) {
                outstanding.push((holder, next));
            }
        }
        assert!(plan.is_complete());
        assert_eq!(fresh, 10);
        assert_eq!(plan.done_bytes(), 10 * MIN_CHUNK);
    }

    #[test]
    fn a_holder_that_leaves_gives_its_chunks_back() {
        let mut plan = Planner::new(layout(4), &[]);
        plan.add_holder(1);
        plan.add_holder(2);
        assert_eq!(plan.next_requests(1, 2), vec![0, 1]);
        assert_eq!(plan.next_requests(2, 2), vec![2, 3]);
        plan.remove_holder(1);
        assert_eq!(plan.arrived(2, 2), Arrival::Fresh);
        assert_eq!(plan.next_requests(2, 2), vec![0]);
        assert_eq!(plan.arrived(2, 3), Arrival::Fresh);
        assert_eq!(plan.next_requests(2, 2), vec![1]);
        assert_eq!(plan.arrived(2, 0), Arrival::Fresh);
        assert_eq!(plan.arrived(2, 1), Arrival::Fresh);
        assert!(plan.is_complete());
    }

    #[test]
    fn resume_skips_what_is_done_and_a_chunk_goes_to_one_holder() {
        let mut plan = Planner::new(layout(3), &[true, false, true]);
        assert_eq!(plan.done_bytes(), 2 * MIN_CHUNK);
        plan.add_holder(1);
        plan.add_holder(2);
        assert_eq!(plan.next_requests(1, 4), vec![1]);
        assert!(plan.next_requests(2, 4).is_empty());
        assert_eq!(plan.arrived(2, 1), Arrival::Unexpected);
        assert_eq!(plan.arrived(1, 1), Arrival::Fresh);
        assert!(plan.is_complete());
        assert_eq!(plan.done_bytes(), 3 * MIN_CHUNK);
    }
}
