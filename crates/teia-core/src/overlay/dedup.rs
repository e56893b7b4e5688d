//! A bounded set of recently seen message ids, and a bounded map of recent ids to a value:
//! the oldest id is forgotten when full, so memory stays fixed however much traffic passes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// Recently seen ids, at most `capacity` of them, each kept as a 128-bit hash keyed at
/// random for this set (no allocation per id; two ids collide with a chance of 2^-128, and
/// a peer cannot aim for it without the key).
#[derive(Debug)]
pub struct SeenIds {
    capacity: usize,
    key: RandomState,
    set: HashSet<u128>,
    order: VecDeque<u128>,
}

impl SeenIds {
    /// An empty set remembering at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            key: RandomState::new(),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// The keyed hash of `kind` and `id` together.
    fn digest(&self, kind: &str, id: &str) -> u128 {
        let half = |salt: u8| {
            let mut hasher = self.key.build_hasher();
            salt.hash(&mut hasher);
            kind.hash(&mut hasher);
            id.hash(&mut hasher);
            hasher.finish()
        };
        u128::from(half(0)) << 64 | u128::from(half(1))
    }

    /// Records `id`; returns false when it was already there (a duplicate).
    pub fn insert(&mut self, id: &str) -> bool {
        self.insert_kind("", id)
    }

    /// Records `id` of messages of `kind` (ids of different kinds never meet); returns
    /// false when it was already there (a duplicate).
    pub fn insert_kind(&mut self, kind: &str, id: &str) -> bool {
        let digest = self.digest(kind, id);
        if self.set.contains(&digest) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(digest);
        self.order.push_back(digest);
        true
    }

    /// True when `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.contains_kind("", id)
    }

    /// True when `id` of messages of `kind` is remembered.
    pub fn contains_kind(&self, kind: &str, id: &str) -> bool {
        self.set.contains(&self.digest(kind, id))
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Recently recorded ids with a value each, at most `capacity` of them: one more forgets
/// the oldest.
#[derive(Debug)]
pub struct RecentMap<V> {
    capacity: usize,
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> RecentMap<V> {
    /// An empty map remembering at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `value` for `id` (a new id; an id already there keeps its first value).
    pub fn insert(&mut self, id: &str, value: V) {
        if self.map.contains_key(id) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.map.insert(id.to_owned(), value);
        self.order.push_back(id.to_owned());
    }

    /// The value recorded for `id`, while it is remembered.
    pub fn get(&self, id: &str) -> Option<&V> {
        self.map.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_map_forgets_its_oldest_past_capacity() {
        let mut map = RecentMap::new(2);
        map.insert("a", 1);
        map.insert("a", 5);
        map.insert("b", 2);
        assert_eq!(map.get("a"), Some(&1), "an id keeps its first value");
        map.insert("c", 3);
        assert_eq!(map.get("a"), None, "the oldest is forgotten");
        assert_eq!(map.get("c"), Some(&3));
    }

    #[test]
    fn remembers_up_to_capacity() {
        let mut seen = SeenIds::new(2);
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        assert!(seen.insert("b"));
        assert!(seen.insert("c"));
        assert_eq!(seen.len(), 2);
        assert!(!seen.contains("a"), "the oldest is forgotten");
        assert!(seen.contains("c"));
    }
}
