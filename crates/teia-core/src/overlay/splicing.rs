//! Splice requests on links (SPLICE_ASK / SPLICE_GRANT / SPLICE_REFUSED, PROTOCOL.md
//! section 6, Splicing): link-local, and only between teia neighbours whose links proved
//! their keys, so that a splicing node knows who asked. The pairing and the tokens are
//! [`crate::splice::SpliceBroker`]'s; this part carries the messages.

use std::time::Instant;

use teia_wire::peer::{SpliceAsk, SpliceGrant, SpliceRefused};

use super::*;

impl Node {
    /// The teia neighbour `peer`'s link, when it proved its key.
    fn proven_link(&self, peer: &str) -> Option<LinkId> {
        let link = *self.by_peer.get(peer)?;
        let state = self.links.get(&link)?;
        (state.has(feature::TEIA) && state.key.is_some()).then_some(link)
    }

    /// The peer of `link` when it is a teia neighbour that proved its key.
    fn proven_peer(&self, link: LinkId) -> Option<String> {
        let state = self.links.get(&link)?;
        let peer = state.peer.clone()?;
        (state.has(feature::TEIA) && state.key.is_some() && self.by_peer.get(&peer) == Some(&link))
            .then_some(peer)
    }

    /// Asks neighbour `relay` to splice a data stream between us and `with` under `ask`;
    /// the answer comes as [`Event::SpliceGranted`] or [`Event::SpliceRefused`].
    pub fn splice_ask(
        &mut self,
        now: Instant,
        relay: &str,
        with: &str,
        ask: &str,
    ) -> Result<(), ApiError> {
        self.now = now;
        if !is_peer_id(with) {
            return Err(ApiError::BadPeerId(with.to_owned()));
        }
        let link = self
            .proven_link(relay)
            .ok_or_else(|| ApiError::NoNeighbour(relay.to_owned()))?;
        let message = Message::SpliceAsk(SpliceAsk {
            ask: ask.to_owned(),
            with: with.to_owned(),
            ttl: 1,
        });
        self.write(link, &message);
        Ok(())
    }

    /// Tells neighbour `peer` the outcome of its ask (as [`crate::splice::SpliceBroker`]
    /// decided it): its token, with this node's listen port, or why not. Dropped when the
    /// neighbour is gone.
    pub fn splice_answer(&mut self, now: Instant, answer: crate::splice::SpliceAnswer) {
        self.now = now;
        let Some(link) = self.proven_link(&answer.peer) else {
            return;
        };
        let message = match (answer.outcome, self.config.listen_port) {
            (Ok(token), Some(port)) => Message::SpliceGrant(SpliceGrant {
                ask: answer.ask,
                with: answer.with,
                token,
                port,
                ttl: 1,
            }),
            (Ok(_), None) => Message::SpliceRefused(SpliceRefused {
                ask: answer.ask,
                with: answer.with,
                reason: crate::splice::SpliceRefusal::Unsupported.code().to_owned(),
                ttl: 1,
            }),
            (Err(refusal), _) => Message::SpliceRefused(SpliceRefused {
                ask: answer.ask,
                with: answer.with,
                reason: refusal.code().to_owned(),
                ttl: 1,
            }),
        };
        self.write(link, &message);
    }

    pub(super) fn on_splice_ask(&mut self, link: LinkId, ask: SpliceAsk) {
        // Only a neighbour whose link proved its key may ask: course peers and plaintext
        // links are ignored.
        let Some(peer) = self.proven_peer(link) else {
            return;
        };
        self.emit(Event::SpliceAsked {
            peer,
            with: ask.with,
            ask: ask.ask,
        });
    }

    pub(super) fn on_splice_grant(&mut self, link: LinkId, grant: SpliceGrant) {
        let Some(relay) = self.proven_peer(link) else {
            return;
        };
        let Some(ip) = self.links.get(&link).map(|l| l.addr.ip()) else {
            return;
        };
        self.emit(Event::SpliceGranted {
            relay,
            with: grant.with,
            ask: grant.ask,
            token: grant.token,
            addr: SocketAddr::new(ip, grant.port),
        });
    }

    pub(super) fn on_splice_refused(&mut self, link: LinkId, refused: SpliceRefused) {
        let Some(relay) = self.proven_peer(link) else {
            return;
        };
        self.emit(Event::SpliceRefused {
            relay,
            with: refused.with,
            ask: refused.ask,
            reason: crate::splice::SpliceRefusal::from_code(&refused.reason),
        });
    }
}
