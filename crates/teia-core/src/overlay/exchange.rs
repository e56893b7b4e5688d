//! Peer exchange (PEER_LIST): telling neighbours whom we are linked with.

use std::time::Instant;

use super::*;

impl Node {
    pub(super) fn schedule_peer_list(&mut self, now: Instant) {
        if self.peer_list_due.is_none() {
            self.peer_list_due = Some(now + PEER_LIST_DELAY);
        }
    }

    pub(super) fn peer_list_for(&self, receiver: LinkId) -> PeerList {
        let mut peers: Vec<PeerEntry> = self
            .by_peer
            .iter()
            .filter(|(_, l)| **l != receiver)
            .filter_map(|(peer, l)| {
                let addr = self.links.get(l)?.dial_addr?;
                Some(PeerEntry {
                    peer_id: peer.clone(),
                    ip: addr.ip().to_string(),
                    port: addr.port(),
                })
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        peers.truncate(PEER_LIST_MAX);
        PeerList { peers, ttl: 1 }
    }

    pub(super) fn broadcast_peer_list(&mut self) {
        let links: Vec<LinkId> = self
            .by_peer
            .values()
            .copied()
            .filter(|l| self.links.get(l).is_some_and(|s| s.has(feature::TEIA)))
            .collect();
        for link in links {
            let list = self.peer_list_for(link);
            self.write(link, &Message::PeerList(list));
        }
    }
}
