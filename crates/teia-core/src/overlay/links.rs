//! Link life: the HELLO handshake, duplicate links, BYE, keep-alive, and dialing peers with backoff.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

impl Node {
    pub(super) fn hello(&self) -> Hello {
        Hello {
            peer_id: self.config.peer_id.clone(),
            version: VERSION.to_owned(),
            features: feature::ALL.iter().map(|f| (*f).to_owned()).collect(),
            listen_port: self.config.listen_port,
            agent: Some(self.config.agent.clone()),
            ttl: 1,
        }
    }

    pub(super) fn on_hello(&mut self, now: Instant, link: LinkId, hello: Hello) {
        if hello.peer_id == self.config.peer_id {
            self.say_bye(now, link, "self");
            return;
        }
        let already = self.links.get(&link).map(|l| l.state);
        if already == Some(LinkState::Up) {
            return;
        }
        if self.by_peer.len() >= self.config.max_links && !self.by_peer.contains_key(&hello.peer_id)
        {
            self.say_bye(now, link, "busy");
            return;
        }
        let answer = Hello {
            features: agreed_features(&hello),
            ..self.hello()
        };
        self.write(link, &Message::HelloOk(answer));
        self.link_up(now, link, hello);
    }

    pub(super) fn link_up(&mut self, now: Instant, link: LinkId, hello: Hello) {
        let peer = hello.peer_id.clone();
        if peer == self.config.peer_id {
            self.say_bye(now, link, "self");
            return;
        }
        let features = agreed_features(&hello);
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        state.state = LinkState::Up;
        state.peer = Some(peer.clone());
        state.features = features.clone();
        state.next_ping = now + self.config.ping_interval;
        if let Some(port) = hello.listen_port {
            state.dial_addr = Some(SocketAddr::new(state.addr.ip(), port));
        }
        let (addr, inbound, dial_addr) = (state.addr, state.inbound, state.dial_addr);
        if let Some(addr) = dial_addr {
            let entry = self.known_entry(now, addr, Some(peer.clone()));
            if let Some(known) = entry {
                known.state = Dial::Connected;
                known.failures = 0;
            }
        }
        if let Some(&old) = self.by_peer.get(&peer) {
            if old != link {
                let keep = self.tie_break(&peer, old, link);
                let loser = if keep == link { old } else { link };
                self.by_peer.insert(peer.clone(), keep);
                self.routes.forget_link(loser);
                self.say_bye(now, loser, "duplicate");
                return;
            }
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
        let duplicate = reason == "duplicate";
        self.drop_link(now, link, &format!("peer said bye ({reason})"), !duplicate);
        self.actions.push_back(Action::Close { link });
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
            state.state = LinkState::Closing;
            state.opened = now;
        }
    }

    pub(super) fn close(&mut self, now: Instant, link: LinkId, reason: &str) {
        if self.links.contains_key(&link) {
            self.drop_link(now, link, reason, true);
            self.actions.push_back(Action::Close { link });
        }
    }

    /// Forgets a link; reports the neighbour down if it was its link; schedules a redial.
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
        if let Some(addr) = state.dial_addr {
            if let Some(known) = self.known.get_mut(&addr) {
                if known.state != Dial::Dialing {
                    known.state = Dial::Idle;
                }
                if !redial {
                    known.pinned = false;
                }
            }
            if redial && was_active {
                self.schedule_redial(now, addr);
            }
        }
    }

    pub(super) fn check_links(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut pings = Vec::new();
        for (&id, link) in &self.links {
            match link.state {
                LinkState::Up if link.next_ping <= now => {
                    if link.outstanding_pings.len() >= self.config.max_missed_pings as usize {
                        expired.push((id, "keep-alive timeout"));
                    } else {
                        pings.push(id);
                    }
                }
                LinkState::AwaitingHello | LinkState::AwaitingHelloOk | LinkState::Closing
                    if link.opened + self.config.hello_timeout <= now =>
                {
                    expired.push((id, "handshake timeout"));
                }
                _ => {}
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
                link.outstanding_pings.push_back((msg_id, now));
                link.next_ping = now + self.config.ping_interval;
            }
            self.write(id, &ping);
        }
    }

    pub(super) fn wants(&self, known: &Known) -> bool {
        if self.stopping {
            return false;
        }
        if known
            .peer
            .as_ref()
            .is_some_and(|p| self.by_peer.contains_key(p))
        {
            return false;
        }
        known.pinned
            || (known.failures < self.config.reconnect_attempts
                && self.by_peer.len() < self.config.target_neighbours)
    }

    pub(super) fn redial(&mut self, now: Instant) {
        let mut budget = self
            .config
            .target_neighbours
            .saturating_sub(self.by_peer.len() + self.dialing());
        let mut due: Vec<(bool, SocketAddr)> = self
            .known
            .iter()
            .filter(|(_, k)| k.state == Dial::Idle && k.next_attempt <= now && self.wants(k))
            .map(|(addr, k)| (!k.pinned, *addr))
            .collect();
        due.sort();
        for (unpinned, addr) in due {
            if unpinned {
                if budget == 0 {
                    continue;
                }
                budget -= 1;
            }
            if let Some(known) = self.known.get_mut(&addr) {
                known.state = Dial::Dialing;
            }
            self.actions.push_back(Action::Dial { addr });
        }
    }

    pub(super) fn dialing(&self) -> usize {
        self.known
            .values()
            .filter(|k| k.state == Dial::Dialing)
            .count()
    }

    /// After a failure or loss: the delay before the next dial of `addr`, if any.
    pub(super) fn schedule_redial(&mut self, now: Instant, addr: SocketAddr) -> Option<Duration> {
        let config = &self.config;
        let known = self.known.get_mut(&addr)?;
        known.state = Dial::Idle;
        known.failures = known.failures.saturating_add(1);
        if known.failures > config.reconnect_attempts {
            if !known.pinned {
                self.known.remove(&addr);
            } else {
                known.next_attempt = now + config.reconnect_max_delay;
            }
            return None;
        }
        let factor = 1u32 << known.failures.saturating_sub(1).min(16);
        let delay = (config.reconnect_initial * factor).min(config.reconnect_max_delay);
        known.next_attempt = now + delay;
        Some(delay)
    }

    /// The entry for `addr`, created if there is room; its peer id updated when given.
    pub(super) fn known_entry(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        peer: Option<String>,
    ) -> Option<&mut Known> {
        if !self.known.contains_key(&addr) {
            if self.known.len() >= self.config.known_capacity {
                let stale = self
                    .known
                    .iter()
                    .filter(|(_, k)| !k.pinned && k.state == Dial::Idle)
                    .min_by_key(|(_, k)| k.learned)
                    .map(|(a, _)| *a)?;
                self.known.remove(&stale);
            }
            self.known.insert(
                addr,
                Known {
                    peer: None,
                    pinned: false,
                    state: Dial::Idle,
                    failures: 0,
                    next_attempt: now,
                    learned: now,
                },
            );
        }
        let known = self.known.get_mut(&addr)?;
        if peer.is_some() {
            known.peer = peer;
        }
        known.learned = now;
        Some(known)
    }
}
