//! The node's side of link life: admission of inbound connections, the HELLO handshake with
//! its Noise exchange, key pinning, duplicate links, BYE, asking each link what its timers
//! want ([`super::link`]), and dialing what [`super::membership`] finds due.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::identity;

impl Node {
    pub(super) fn hello(&self, noise: Option<String>) -> Hello {
        Hello {
            peer_id: self.config.peer_id.clone(),
            version: VERSION.to_owned(),
            features: feature::ALL.iter().map(|f| (*f).to_owned()).collect(),
            listen_port: self.config.listen_port,
            agent: Some(self.config.agent.clone()),
            noise,
            ttl: 1,
        }
    }

    /// Bounds inbound connections still in their handshake, in total and per source IP:
    /// when a bound is reached, the oldest one that has not said a word is closed to make
    /// room; if every one has spoken, the newcomer is answered BYE `busy`.
    pub(super) fn admit(&mut self, link: LinkId, addr: SocketAddr) {
        let pending: Vec<(LinkId, SocketAddr, Instant, bool)> = self
            .links
            .iter()
            .filter(|(id, l)| **id != link && l.inbound && l.state != LinkState::Up)
            .map(|(id, l)| (*id, l.addr, l.opened, l.heard))
            .collect();
        let same_ip = pending.iter().filter(|p| p.1.ip() == addr.ip()).count();
        let bound = if same_ip >= self.config.pending_per_ip {
            Some(true)
        } else if pending.len() >= self.config.max_pending_handshakes {
            Some(false)
        } else {
            None
        };
        let Some(per_ip) = bound else {
            return;
        };
        let victim = pending
            .iter()
            .filter(|p| !p.3 && (!per_ip || p.1.ip() == addr.ip()))
            .min_by_key(|p| p.2)
            .map(|p| p.0);
        match victim {
            Some(victim) => self.refuse(victim, Refusal::Busy, "silent while handshakes are full"),
            None => self.refuse(link, Refusal::Busy, "too many handshakes in progress"),
        }
    }

    /// Says BYE with `refusal` on a link that is not up, reports it, and closes it.
    pub(super) fn refuse(&mut self, link: LinkId, refusal: Refusal, detail: &str) {
        let Some(state) = self.links.get(&link) else {
            return;
        };
        let (addr, peer) = (state.addr, state.peer.clone());
        self.say_bye(self.now, link, refusal.code());
        self.emit(Event::Refused {
            peer,
            addr,
            refusal,
            detail: detail.to_owned(),
        });
        self.close(self.now, link, refusal.code());
    }

    /// Dialer: HELLO, with Noise message 1 when the node has an identity.
    pub(super) fn start_handshake(&mut self, link: LinkId) {
        let mut noise = None;
        if let Some(identity) = &self.config.identity {
            match Handshake::initiate(identity, Suite::Link) {
                Ok((handshake, first)) => {
                    noise = Some(identity::encode(&first));
                    if let Some(state) = self.links.get_mut(&link) {
                        state.handshake = Some(handshake);
                    }
                }
                Err(e) => {
                    self.refuse(link, Refusal::HandshakeFailed, &e.to_string());
                    return;
                }
            }
        }
        let hello = self.hello(noise);
        self.write(link, &Message::Hello(hello));
    }

    /// Listener: a HELLO arrived.
    pub(super) fn on_hello(&mut self, now: Instant, link: LinkId, hello: Hello) {
        if let Some(state) = self.links.get_mut(&link) {
            state.peer = Some(hello.peer_id.clone());
        }
        if hello.peer_id == self.config.peer_id {
            self.refuse(link, Refusal::OwnNode, "a connection from this node itself");
            return;
        }
        if !is_peer_id(&hello.peer_id) {
            self.refuse(link, Refusal::BadFormat, "peer_id is not name@namespace");
            return;
        }
        if self.by_peer.len() >= self.config.max_links && !self.by_peer.contains_key(&hello.peer_id)
        {
            self.refuse(link, Refusal::Busy, "links are full");
            return;
        }
        let offered = hello.noise.as_deref().and_then(identity::decode);
        let identity = self.config.identity.clone();
        if let (Some(first), Some(identity), true) = (offered, identity, hello.has(feature::TEIA)) {
            match Handshake::respond(&identity, Suite::Link, &self.config.peer_id, &first) {
                Ok((handshake, second)) => {
                    let answer = Hello {
                        features: agreed_features(&hello),
                        ..self.hello(Some(identity::encode(&second)))
                    };
                    self.write(link, &Message::HelloOk(answer));
                    if let Some(state) = self.links.get_mut(&link) {
                        state.handshake = Some(handshake);
                        state.pending_hello = Some(hello);
                        state.state = LinkState::AwaitingNoise;
                        state.opened = now;
                    }
                }
                Err(e) => self.refuse(link, Refusal::HandshakeFailed, &e.to_string()),
            }
            return;
        }
        if !self.plaintext_allowed(link, &hello.peer_id) {
            return;
        }
        let mut features = agreed_features(&hello);
        if !self.config.plaintext_teia {
            features.retain(|f| f != feature::TEIA);
        }
        let answer = Hello {
            features,
            ..self.hello(None)
        };
        self.write(link, &Message::HelloOk(answer));
        self.link_up(now, link, hello);
    }

    /// Dialer: the HELLO_OK arrived; finishes the Noise handshake if the listener took it.
    pub(super) fn on_hello_ok(&mut self, now: Instant, link: LinkId, hello: Hello) {
        if let Some(state) = self.links.get_mut(&link) {
            state.peer = Some(hello.peer_id.clone());
        }
        if hello.peer_id == self.config.peer_id {
            self.mark_own(link);
            self.refuse(link, Refusal::OwnNode, "this address is this node itself");
            return;
        }
        if !is_peer_id(&hello.peer_id) {
            self.refuse(link, Refusal::BadFormat, "peer_id is not name@namespace");
            return;
        }
        let handshake = self.links.get_mut(&link).and_then(|l| l.handshake.take());
        let identity = self.config.identity.clone();
        let second = hello.noise.as_deref().map(identity::decode);
        match (handshake, identity, second) {
            (Some(handshake), Some(identity), Some(Some(second))) => {
                let finished = handshake.finish_initiator(
                    &identity,
                    &self.config.peer_id,
                    &hello.peer_id,
                    &second,
                );
                match finished {
                    Ok((key, third, cipher)) => {
                        if !self.check_pin(&hello.peer_id, key, Some(link)) {
                            self.refuse(
                                link,
                                Refusal::KeyMismatch,
                                "the key pinned for it differs",
                            );
                            return;
                        }
                        let noise = Message::Noise(Noise {
                            msg: identity::encode(&third),
                            ttl: 1,
                        });
                        self.write(link, &noise);
                        self.secured(link, key, cipher);
                        self.link_up(now, link, hello);
                    }
                    Err(e) => self.refuse(link, Refusal::HandshakeFailed, &e.to_string()),
                }
            }
            (_, _, Some(None)) => self.refuse(link, Refusal::BadFormat, "noise is not base64url"),
            _ => {
                if self.plaintext_allowed(link, &hello.peer_id) {
                    self.link_up(now, link, hello);
                }
            }
        }
    }

    /// Listener: NOISE (handshake message 3) arrived.
    pub(super) fn on_noise(&mut self, now: Instant, link: LinkId, noise: Noise) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        let (Some(handshake), Some(hello)) = (state.handshake.take(), state.pending_hello.take())
        else {
            return;
        };
        let Some(third) = identity::decode(&noise.msg) else {
            self.refuse(link, Refusal::BadFormat, "noise is not base64url");
            return;
        };
        match handshake.finish_responder(&hello.peer_id, &third) {
            Ok((key, cipher)) => {
                let pinned = self.check_pin(&hello.peer_id, key, Some(link));
                // The dialer already encrypts: our answer, even a refusal, must be too.
                self.secured(link, key, cipher);
                if !pinned {
                    self.refuse(link, Refusal::KeyMismatch, "the key pinned for it differs");
                    return;
                }
                self.link_up(now, link, hello);
            }
            Err(e) => self.refuse(link, Refusal::HandshakeFailed, &e.to_string()),
        }
    }

    fn secured(&mut self, link: LinkId, key: PublicKey, cipher: LinkCipher) {
        if let Some(state) = self.links.get_mut(&link) {
            state.key = Some(key);
            state.encrypted = true;
        }
        self.actions.push_back(Action::Encrypt { link, cipher });
    }

    /// Whether a plaintext link may come up for `peer`: not with `--require-encryption`,
    /// and not for a peer id pinned to a key (a teia node must prove it). Refuses it if not.
    fn plaintext_allowed(&mut self, link: LinkId, peer: &str) -> bool {
        if self.config.require_encryption {
            self.refuse(
                link,
                Refusal::EncryptionRequired,
                "this node accepts encrypted links only",
            );
            return false;
        }
        if let Some(pinned) = self.pins.get(peer) {
            let detail = format!("{peer} is pinned to key {pinned} and did not prove it");
            self.refuse(link, Refusal::Unauthorized, &detail);
            return false;
        }
        true
    }

    /// True when `key` may speak for `peer`: it is the pinned key, or no key is pinned yet
    /// (then it is pinned, while there is room). A mismatch is reported.
    pub(super) fn check_pin(&mut self, peer: &str, key: PublicKey, link: Option<LinkId>) -> bool {
        match self.pins.get(peer) {
            Some(pinned) if *pinned == key => true,
            Some(pinned) => {
                let pinned = *pinned;
                let addr = link.and_then(|l| self.links.get(&l)).map(|l| l.addr);
                self.emit(Event::KeyMismatch {
                    peer: peer.to_owned(),
                    pinned,
                    offered: key,
                    addr,
                });
                false
            }
            None => {
                if self.pins.len() < self.config.pin_capacity {
                    self.pins.insert(peer.to_owned(), key);
                    self.actions.push_back(Action::Pin {
                        peer_id: peer.to_owned(),
                        key,
                    });
                }
                true
            }
        }
    }

    /// Remembers the address `link` was dialed at as this node's own: never dialed again.
    fn mark_own(&mut self, link: LinkId) {
        let Some(addr) = self.links.get(&link).and_then(|l| l.dial_addr) else {
            return;
        };
        if let Some(asked) = self.members.mark_own(addr) {
            self.emit(Event::DialGaveUp {
                addr,
                attempts: 1,
                reason: "the address is this node itself".to_owned(),
                asked,
            });
        }
    }

    pub(super) fn link_up(&mut self, now: Instant, link: LinkId, hello: Hello) {
        let peer = hello.peer_id.clone();
        let Some(state) = self.links.get(&link) else {
            return;
        };
        let mut features = agreed_features(&hello);
        if !state.encrypted && !self.config.plaintext_teia {
            features.retain(|f| f != feature::TEIA);
        }
        if let Some(&old) = self.by_peer.get(&peer) {
            if old != link {
                let old_key = self.links.get(&old).and_then(|l| l.key);
                let same_node = old_key.is_some() && old_key == state.key;
                if !same_node {
                    let detail = format!("{peer} is already connected on another link");
                    self.refuse(link, Refusal::Duplicate, &detail);
                    return;
                }
                let keep = self.tie_break(&peer, old, link);
                if keep == old {
                    self.refuse(
                        link,
                        Refusal::Duplicate,
                        "simultaneous dial; the other link stays",
                    );
                    return;
                }
                self.routes.forget_link(old);
                self.say_bye(now, old, "duplicate");
            }
        }
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        state.up(
            now,
            peer.clone(),
            features.clone(),
            hello.listen_port,
            &self.config,
        );
        let (addr, inbound, dial_addr) = (state.addr, state.inbound, state.dial_addr);
        if let Some(addr) = dial_addr {
            self.members.link_up(now, addr, peer.clone());
        }
        self.by_peer.insert(peer.clone(), link);
        self.routes.forget(&peer);
        self.emit(Event::LinkUp {
            peer,
            addr,
            inbound,
            features: features.clone(),
        });
        if features.iter().any(|f| f == feature::TEIA) {
            self.actions.push_back(Action::Coalesce { link });
            let list = self.peer_list_for(link);
            self.write(link, &Message::PeerList(list));
        }
        self.schedule_peer_list(now);
        self.flush_discovery_for_neighbour(now, link);
    }

    /// Of two links to `peer`, the one to keep: the one dialed by the peer whose id sorts
    /// lower; if both were dialed by the same side, the newer.
    pub(super) fn tie_break(&self, peer: &str, old: LinkId, new: LinkId) -> LinkId {
        let lower_is_us = self.config.peer_id.as_str() < peer;
        let dialed_by_lower = |id: LinkId| {
            self.links
                .get(&id)
                .is_some_and(|l| l.inbound != lower_is_us)
        };
        match (dialed_by_lower(old), dialed_by_lower(new)) {
            (true, false) => old,
            _ => new,
        }
    }

    pub(super) fn on_bye(&mut self, now: Instant, link: LinkId, bye: Bye) {
        let answer = Message::ByeOk(Bye {
            msg_id: bye.msg_id,
            src: self.config.peer_id.clone(),
            dst: bye.src,
            reason: None,
            ttl: 1,
        });
        self.write(link, &answer);
        let reason = bye.reason.unwrap_or_else(|| "bye".to_owned());
        let was_up = self
            .links
            .get(&link)
            .is_some_and(|l| l.state == LinkState::Up);
        if reason == "self" {
            self.mark_own(link);
        }
        let dial_addr = self.links.get(&link).and_then(|l| l.dial_addr);
        let peer = self.links.get(&link).and_then(|l| l.peer.clone());
        let why = format!("peer said bye ({reason})");
        self.drop_link(now, link, &why, false);
        self.actions.push_back(Action::Close { link });
        let Some(addr) = dial_addr else {
            return;
        };
        // A `duplicate` is explained by another link of ours to the same peer (both dialed
        // at once). Without one, the peer refused us because someone else holds our id
        // there (a course client squatting it): backed off like any refusal.
        let explained = peer.is_some_and(|p| self.by_peer.contains_key(&p));
        match reason.as_str() {
            // Another link to the same peer stays: nothing to redial.
            "duplicate" if explained => {}
            "self" => {}
            // A peer that left is dialed again once it is seen again (a rendezvous or a
            // neighbour lists it, or it dials us); one asked for by the user, after a
            // backoff.
            _ if was_up => {
                if self.members.departed(addr) {
                    self.schedule_redial(now, addr, &why);
                }
            }
            _ => {
                self.schedule_redial(now, addr, &why);
            }
        }
    }

    pub(super) fn say_bye(&mut self, now: Instant, link: LinkId, reason: &str) {
        let Some(dst) = self
            .links
            .get(&link)
            .map(|l| l.peer.clone().unwrap_or_default())
        else {
            return;
        };
        let bye = Message::Bye(Bye {
            msg_id: self.new_id(),
            src: self.config.peer_id.clone(),
            dst,
            reason: Some(reason.to_owned()),
            ttl: 1,
        });
        self.write(link, &bye);
        if let Some(state) = self.links.get_mut(&link) {
            state.closing(now);
        }
    }

    pub(super) fn close(&mut self, now: Instant, link: LinkId, reason: &str) {
        if self.links.contains_key(&link) {
            self.drop_link(now, link, reason, true);
            self.actions.push_back(Action::Close { link });
        }
    }

    /// Forgets a link; reports the neighbour down if it was its link; with `redial`,
    /// schedules the next dial of its address (a dial that never came up counts as a
    /// failure, so an address that accepts and drops connections is backed off too).
    pub(super) fn drop_link(&mut self, now: Instant, link: LinkId, reason: &str, redial: bool) {
        let Some(state) = self.links.remove(&link) else {
            return;
        };
        self.routes.forget_link(link);
        let was_active = state
            .peer
            .as_ref()
            .is_some_and(|p| self.by_peer.get(p) == Some(&link));
        if let Some(peer) = state.peer.filter(|_| was_active) {
            self.by_peer.remove(&peer);
            self.emit(Event::LinkDown {
                peer,
                reason: reason.to_owned(),
            });
            self.schedule_peer_list(now);
        }
        let Some(addr) = state.dial_addr else {
            return;
        };
        // A link that stayed up a while wipes the address's record of failures; one that
        // fell at once counts as a failure, so a peer that accepts and then drops us is
        // backed off and given up like one that cannot be reached.
        let stable = was_active && now.saturating_duration_since(state.opened) >= STABLE_LINK;
        self.members.link_lost(addr, stable);
        let never_up = !state.inbound && !was_active;
        if redial && was_active {
            self.schedule_redial(now, addr, reason);
        } else if redial && never_up {
            // A dial that connected but never came up: said once, with what came back
            // (an HTTP page, a program of another protocol), then backed off.
            let error = match &state.said {
                Some(said) => format!("no teia handshake ({reason}); it said: {said}"),
                None => format!(
                    "no teia handshake ({reason}); it said nothing (a peer of the Node.js \
                     peer-exchange chat stays silent: link it with --pex-peer)"
                ),
            };
            let asked = self.members.asked(addr);
            let retry_in = self.schedule_redial(now, addr, &error);
            self.emit(Event::DialFailed {
                addr,
                error,
                retry_in,
                asked,
            });
        }
    }

    pub(super) fn check_links(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut pings = Vec::new();
        for (&id, link) in &self.links {
            match link.due(now, &self.config) {
                Some(Due::Ping) => pings.push(id),
                Some(Due::Expire(reason)) => expired.push((id, reason)),
                None => {}
            }
        }
        for (id, reason) in expired {
            self.close(now, id, reason);
        }
        for id in pings {
            let msg_id = self.new_id();
            let ping = Message::Ping(Ping {
                msg_id: msg_id.clone(),
                timestamp: self.timestamp(now),
                ttl: 1,
            });
            if let Some(link) = self.links.get_mut(&id) {
                link.keep_alive.sent(msg_id, now, self.config.ping_interval);
            }
            self.write(id, &ping);
        }
    }

    /// Dials what membership finds due now (nothing once the node is stopping).
    pub(super) fn redial(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        for addr in self.members.due(now, &self.by_peer) {
            self.actions.push_back(Action::Dial { addr });
        }
    }

    /// After a failure or loss: the delay before the next dial of `addr`, if any. After
    /// [`Config::reconnect_attempts`] failures in a row the address is given up, reported
    /// once ([`Event::DialGaveUp`]).
    pub(super) fn schedule_redial(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        reason: &str,
    ) -> Option<Duration> {
        let redial = self.members.failed(now, addr);
        if let Redial::GaveUp { attempts, asked } = redial {
            self.emit(Event::DialGaveUp {
                addr,
                attempts,
                reason: reason.to_owned(),
                asked,
            });
        }
        redial.delay()
    }
}
