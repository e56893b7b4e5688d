//! Service queries (QUERY / QUERY_HIT, PROTOCOL.md section 5): a question flooded to teia
//! neighbours with a ttl and dedup, Gnutella-style, and answers routed back hop by hop along
//! the path the question came. Course peers never see them.

use std::time::Instant;

use teia_wire::peer::{Query, QueryHit};

use super::*;

/// Longest ttl a query may ask for; more is lowered to this.
pub const QUERY_MAX_TTL: u32 = 8;
/// Neighbours a query is passed on to at most (the first in id order).
pub const QUERY_FANOUT: usize = 32;
/// Time answers to a query are routed back.
pub const QUERY_LIFETIME: Duration = Duration::from_secs(60);
/// Queries remembered (for dedup, for their paths back and as ours).
pub const QUERIES_KEPT: usize = 4_096;

impl Node {
    /// Floods a question for `service` with `ttl` hops (at most [`QUERY_MAX_TTL`]); returns
    /// its id. Answers come as [`Event::QueryHit`].
    pub fn query(&mut self, now: Instant, service: &str, body: Value, ttl: u32) -> String {
        self.now = now;
        let query_id = self.new_id();
        self.seen.insert_kind("QUERY", &query_id);
        self.own_queries.insert(&query_id, service.to_owned());
        let query = Message::Query(Query {
            query_id: query_id.clone(),
            src: self.config.peer_id.clone(),
            service: service.to_owned(),
            body,
            ttl: ttl.clamp(1, QUERY_MAX_TTL),
        });
        self.flood_query(&query, None);
        query_id
    }

    /// Answers a query heard as [`Event::Query`]; dropped when its path back is gone.
    pub fn answer(&mut self, now: Instant, query_id: &str, body: Value) {
        self.now = now;
        let Some(link) = self.query_paths.back(query_id, now) else {
            return;
        };
        let hit = Message::QueryHit(QueryHit {
            query_id: query_id.to_owned(),
            src: self.config.peer_id.clone(),
            body,
            ttl: QUERY_MAX_TTL,
        });
        self.write(link, &hit);
    }

    fn flood_query(&mut self, query: &Message, except: Option<LinkId>) {
        let mut links: Vec<(String, LinkId)> = self
            .by_peer
            .iter()
            .filter(|(_, l)| Some(**l) != except)
            .filter(|(_, l)| self.links.get(l).is_some_and(|s| s.has(feature::TEIA)))
            .map(|(peer, l)| (peer.clone(), *l))
            .collect();
        links.sort();
        for (_, link) in links.into_iter().take(QUERY_FANOUT) {
            self.write(link, query);
        }
    }

    pub(super) fn on_query(&mut self, now: Instant, link: LinkId, query: Query) {
        if self.is_course_link(link) || !self.seen.insert_kind("QUERY", &query.query_id) {
            self.counters.duplicates += 1;
            return;
        }
        self.query_paths.record(&query.query_id, link, now);
        if query.ttl > 1 {
            let forwarded = Message::Query(Query {
                ttl: (query.ttl - 1).min(QUERY_MAX_TTL),
                ..query.clone()
            });
            self.flood_query(&forwarded, Some(link));
        }
        self.emit(Event::Query {
            query_id: query.query_id,
            src: query.src,
            service: query.service,
            body: query.body,
        });
    }

    pub(super) fn on_query_hit(&mut self, now: Instant, link: LinkId, hit: QueryHit) {
        if self.is_course_link(link) {
            return;
        }
        if let Some(service) = self.own_queries.get(&hit.query_id) {
            self.emit(Event::QueryHit {
                service: service.clone(),
                query_id: hit.query_id,
                src: hit.src,
                body: hit.body,
            });
            return;
        }
        let Some(back) = self.query_paths.back(&hit.query_id, now) else {
            return;
        };
        if hit.ttl > 1 && back != link {
            let forwarded = Message::QueryHit(QueryHit {
                ttl: hit.ttl - 1,
                ..hit
            });
            self.write(back, &forwarded);
        }
    }
}
