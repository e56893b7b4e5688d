//! The route cache ("destination via neighbour") and the WHO_HAS reverse paths, both
//! bounded in size and in age.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::LinkId;

/// A cached route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The neighbour's link to forward on.
    pub next_hop: LinkId,
    /// Hops to the destination through it.
    pub hops: u32,
    /// When the route was learnt or last confirmed.
    pub learned: Instant,
}

/// Routes by destination peer id, at most `capacity`, each valid for `expiry`.
#[derive(Debug)]
pub struct RouteTable {
    routes: HashMap<String, Route>,
    capacity: usize,
    expiry: Duration,
}

impl RouteTable {
    /// An empty table.
    pub fn new(capacity: usize, expiry: Duration) -> Self {
        Self {
            routes: HashMap::new(),
            capacity: capacity.max(1),
            expiry,
        }
    }

    /// The route to `dst`, if one is fresh at `now`.
    pub fn get(&self, dst: &str, now: Instant) -> Option<Route> {
        self.routes
            .get(dst)
            .filter(|r| now.saturating_duration_since(r.learned) < self.expiry)
            .copied()
    }

    /// Learns `dst` via `next_hop`. An existing fresh route is replaced only by a shorter
    /// one or refreshed by the same neighbour. When full, the oldest route is dropped.
    pub fn learn(&mut self, dst: &str, next_hop: LinkId, hops: u32, now: Instant) {
        if let Some(current) = self.get(dst, now) {
            if current.next_hop != next_hop && current.hops <= hops {
                return;
            }
        }
        if !self.routes.contains_key(dst) && self.routes.len() >= self.capacity {
            self.expire(now);
            if self.routes.len() >= self.capacity {
                let oldest = self
                    .routes
                    .iter()
                    .min_by_key(|(_, r)| r.learned)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.routes.remove(&oldest);
                }
            }
        }
        self.routes.insert(
            dst.to_owned(),
            Route {
                next_hop,
                hops,
                learned: now,
            },
        );
    }

    /// Drops the route to `dst`.
    pub fn forget(&mut self, dst: &str) {
        self.routes.remove(dst);
    }

    /// Drops every route through `link`.
    pub fn forget_link(&mut self, link: LinkId) {
        self.routes.retain(|_, r| r.next_hop != link);
    }

    /// Drops routes older than the expiry.
    pub fn expire(&mut self, now: Instant) {
        let expiry = self.expiry;
        self.routes
            .retain(|_, r| now.saturating_duration_since(r.learned) < expiry);
    }

    /// Every route, fresh or not yet swept, sorted by destination.
    pub fn all(&self) -> Vec<(String, Route)> {
        let mut all: Vec<_> = self.routes.iter().map(|(k, r)| (k.clone(), *r)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Which neighbour each recent WHO_HAS came from, so its HIT can travel back.
#[derive(Debug)]
pub struct ReversePaths {
    paths: HashMap<String, (LinkId, Instant)>,
    order: VecDeque<String>,
    capacity: usize,
    lifetime: Duration,
}

impl ReversePaths {
    /// An empty set of at most `capacity` paths, each kept for `lifetime`.
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            paths: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            lifetime,
        }
    }

    /// Records that WHO_HAS `msg_id` came from `link`.
    pub fn record(&mut self, msg_id: &str, link: LinkId, now: Instant) {
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.paths.remove(&old);
            }
        }
        if self.paths.insert(msg_id.to_owned(), (link, now)).is_none() {
            self.order.push_back(msg_id.to_owned());
        }
    }

    /// The neighbour WHO_HAS `msg_id` came from, if recent.
    pub fn back(&self, msg_id: &str, now: Instant) -> Option<LinkId> {
        self.paths
            .get(msg_id)
            .filter(|(_, at)| now.saturating_duration_since(*at) < self.lifetime)
            .map(|(link, _)| *link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_prefer_shorter_and_expire() {
        let t0 = Instant::now();
        let mut table = RouteTable::new(2, Duration::from_secs(10));
        table.learn("c@U", 1, 3, t0);
        table.learn("c@U", 2, 4, t0);
        assert_eq!(
            table.get("c@U", t0).unwrap().next_hop,
            1,
            "a longer route does not replace"
        );
        table.learn("c@U", 2, 2, t0);
        assert_eq!(
            table.get("c@U", t0).unwrap().next_hop,
            2,
            "a shorter one does"
        );
        assert!(table.get("c@U", t0 + Duration::from_secs(10)).is_none());
        table.learn("d@U", 3, 1, t0);
        table.learn("e@U", 3, 1, t0 + Duration::from_secs(1));
        assert_eq!(table.all().len(), 2, "bounded");
        table.forget_link(3);
        assert!(table.all().iter().all(|(_, r)| r.next_hop != 3));
        table.forget_link(2);
        assert!(table.all().is_empty());
    }

    #[test]
    fn reverse_paths_are_bounded() {
        let t0 = Instant::now();
        let mut paths = ReversePaths::new(2, Duration::from_secs(5));
        paths.record("a", 1, t0);
        paths.record("b", 2, t0);
        paths.record("c", 3, t0);
        assert_eq!(paths.back("a", t0), None);
        assert_eq!(paths.back("c", t0), Some(3));
        assert_eq!(paths.back("c", t0 + Duration::from_secs(5)), None);
    }
}
