//! What this node's searches found, owned in one place: the searches it asked (to show each
//! holder's answer while the search wants more), the holders heard in answers (for
//! `/get NAME`, folders, and the holders of a download), and course peers' files heard from
//! a seed 004 index.
//!
//! Bounds: [`SEARCHES_KEPT`] searches and [`RESULTS_KEPT`] holdings and course peers' files,
//! the oldest forgotten first; the answers of one search are shown up to
//! [`MAX_ANSWERS_PER_SEARCH`] holders.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;

use crate::download::Source;
use crate::proto::tree::Hash;

/// Searches of ours remembered, for their answers; the oldest is forgotten first.
pub const SEARCHES_KEPT: usize = 256;
/// Search results remembered (for `/get NAME` and for holders of a download).
pub const RESULTS_KEPT: usize = 4_096;
/// Holders whose answers to one search are shown; later ones are dropped.
pub const MAX_ANSWERS_PER_SEARCH: usize = 64;

/// Appends `item`, forgetting the oldest when `queue` holds `cap` already.
fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() >= cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

/// A search result remembered: a file and who has it.
#[derive(Debug, Clone)]
pub(crate) struct Holding {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) hash: Hash,
    pub(crate) source: Source,
}

/// A course peer's file found through a seed 004 index (no hash, no key).
#[derive(Debug, Clone)]
pub(crate) struct SeedHolding {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// Its size as the index listed it, when it did.
    pub(crate) size: Option<u64>,
}

/// A search of ours: its query, its words, and how many holders answered.
struct Search {
    query_id: String,
    text: String,
    answers: usize,
}

/// What our searches found.
#[derive(Default)]
pub(crate) struct Findings {
    searches: VecDeque<Search>,
    holdings: VecDeque<Holding>,
    seed: VecDeque<SeedHolding>,
}

impl Findings {
    /// Records a search asked as `query_id`.
    pub(crate) fn asked(&mut self, query_id: String, text: String) {
        let search = Search {
            query_id,
            text,
            answers: 0,
        };
        push_bounded(&mut self.searches, search, SEARCHES_KEPT);
    }

    /// Counts a holder's answer to `query_id`; the search's words when the answer is to be
    /// shown (a search of ours that has not had its fill of answers).
    pub(crate) fn answered(&mut self, query_id: &str) -> Option<String> {
        let search = self.searches.iter_mut().find(|s| s.query_id == query_id)?;
        search.answers += 1;
        (search.answers <= MAX_ANSWERS_PER_SEARCH).then(|| search.text.clone())
    }

    /// Remembers who holds a file.
    pub(crate) fn remember(&mut self, holding: Holding) {
        push_bounded(&mut self.holdings, holding, RESULTS_KEPT);
    }

    /// Remembers a course peer's file.
    pub(crate) fn remember_seed(&mut self, holding: SeedHolding) {
        push_bounded(&mut self.seed, holding, RESULTS_KEPT);
    }

    /// Holders of `hash` heard, the latest first, one per peer.
    pub(crate) fn sources_of(&self, hash: &Hash) -> Vec<Source> {
        let mut seen = HashSet::new();
        self.holdings
            .iter()
            .rev()
            .filter(|h| h.hash == *hash)
            .filter(|h| seen.insert(h.source.peer_id.clone()))
            .map(|h| h.source.clone())
            .collect()
    }

    /// The holdings heard, the oldest first.
    pub(crate) fn holdings(&self) -> impl DoubleEndedIterator<Item = &Holding> {
        self.holdings.iter()
    }

    /// The course peers holding a file named `name`, one per address, the best first: the
    /// largest listed size first (a short copy of a file is a holder's too), unknown sizes
    /// last, the latest heard first among equals.
    pub(crate) fn seed_holders(&self, name: &str) -> Vec<SeedHolding> {
        let mut seen = HashSet::new();
        let mut holders: Vec<SeedHolding> = self
            .seed
            .iter()
            .rev()
            .filter(|h| h.name == name)
            .filter(|h| seen.insert(h.addr))
            .cloned()
            .collect();
        holders.sort_by_key(|h| std::cmp::Reverse(h.size.map(|s| s + 1).unwrap_or(0)));
        holders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_shows_its_answers_up_to_its_fill_and_unknown_queries_none() {
        let mut findings = Findings::default();
        findings.asked("q1".into(), "report".into());
        for _ in 0..MAX_ANSWERS_PER_SEARCH {
            assert_eq!(findings.answered("q1").as_deref(), Some("report"));
        }
        assert_eq!(findings.answered("q1"), None, "past its fill");
        assert_eq!(findings.answered("q2"), None, "not ours");
    }
}
