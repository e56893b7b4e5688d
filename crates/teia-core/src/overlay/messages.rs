//! Messages on live links: SEND/ACK, PUB flooding, WHO_HAS route discovery, relay, errors and metrics.

use std::time::Instant;

use super::origin::Origin;
use super::*;

impl Node {
    pub(super) fn on_message(&mut self, now: Instant, link: LinkId, message: Message) {
        let costly = matches!(
            message,
            Message::Send(_)
                | Message::Pub(_)
                | Message::WhoHas(_)
                | Message::Ack(_)
                | Message::Query(_)
                | Message::SpliceAsk(_)
        );
        if costly {
            match self.quota.take_paced(&link, self.millis(now)) {
                Paced::Free => {}
                Paced::Wait(millis) => self.actions.push_back(Action::Pace {
                    link,
                    until: now + Duration::from_millis(millis),
                }),
                Paced::Refused => {
                    let reference = msg_id_of(&message);
                    let error = self.error_msg(code::OVER_QUOTA, reference, None, None);
                    self.write(link, &Message::Error(error));
                    self.counters.errors += 1;
                    return;
                }
            }
        }
        match message {
            Message::Ping(ping) => {
                let pong = Message::Pong(Ping {
                    msg_id: ping.msg_id,
                    timestamp: self.timestamp(now),
                    ttl: 1,
                });
                self.write(link, &pong);
            }
            Message::Pong(pong) => self.on_pong(now, link, &pong.msg_id),
            Message::Send(data) => self.on_send(now, link, data),
            Message::Pub(data) => self.on_pub(now, link, data),
            Message::Ack(ack) => self.on_ack(now, link, ack),
            Message::WhoHas(who) => self.on_who_has(now, link, who),
            Message::WhoHasHit(hit) => self.on_hit(now, link, hit),
            Message::RelayOk(relay) => self.on_relay(now, link, relay, true),
            Message::RelayFail(relay) => self.on_relay(now, link, relay, false),
            Message::Error(error) => self.on_error(now, link, error),
            Message::MetricsReq(request) => self.on_metrics_request(now, link, request),
            Message::Metrics(metrics) => self.emit(Event::Metrics {
                peer: self.peer_of(link),
                rtt_ms: metrics.rtt_ms,
                sent: metrics.sent_count,
                received: metrics.recv_count,
            }),
            Message::PeerList(list) => self.on_peer_list(now, link, list),
            Message::Query(query) => self.on_query(now, link, query),
            Message::QueryHit(hit) => self.on_query_hit(now, link, hit),
            Message::SpliceAsk(ask) => self.on_splice_ask(link, ask),
            Message::SpliceGrant(grant) => self.on_splice_grant(link, grant),
            Message::SpliceRefused(refused) => self.on_splice_refused(link, refused),
            Message::Hello(_)
            | Message::HelloOk(_)
            | Message::Bye(_)
            | Message::ByeOk(_)
            | Message::Noise(_)
            | Message::Unknown(_) => {}
        }
    }

    pub(super) fn on_pong(&mut self, now: Instant, link: LinkId, msg_id: &str) {
        if let Some(state) = self.links.get_mut(&link) {
            state.keep_alive.pong(msg_id, now);
        }
    }

    pub(super) fn on_send(&mut self, now: Instant, link: LinkId, mut data: Data) {
        let for_us = data.dst == self.config.peer_id;
        let mut origin_key = None;
        // Delivered here: checked in full. Relayed: a course peer's src is checked (and
        // vouched for); a teia origin's signature is checked where it is delivered.
        if for_us || self.is_course_link(link) {
            let auth = data.auth.take();
            let origin = Origin::of("SEND", &data);
            let Some(proven) = self.authentic(link, &origin, auth.as_ref()) else {
                return;
            };
            origin_key = proven;
            let auth = if for_us {
                auth
            } else {
                self.vouch(link, &origin, auth)
            };
            data.auth = auth;
        }
        self.learn_reverse(now, link, &data.src, data.ttl);
        if for_us {
            self.deliver_send(now, Some(link), data, origin_key);
            return;
        }
        if data.ttl <= 1 {
            self.counters.errors += 1;
            let error = self.error_msg(
                code::TTL_EXPIRED,
                Some(data.msg_id),
                Some(format!("ttl ran out before {}", data.dst)),
                Some(data.src.clone()),
            );
            self.reply(now, Message::Error(error), &data.src, Some(link));
            return;
        }
        let forwarded = Data {
            ttl: data.ttl - 1,
            ..data
        };
        self.route(now, Message::Send(forwarded), Some(link));
    }

    /// Delivers a SEND for this node whose origin `origin_key` proved (see
    /// [`Event::Message`]), and acknowledges it.
    pub(super) fn deliver_send(
        &mut self,
        now: Instant,
        link: Option<LinkId>,
        data: Data,
        origin_key: Option<PublicKey>,
    ) {
        if self.delivered.insert(&data.msg_id) {
            self.counters.delivered += 1;
            // Stored before the ACK below is written: an acknowledged message survives a
            // crash and is shown after the restart if it was not shown before.
            self.actions.push_back(Action::Delivered(Inbound {
                msg_id: data.msg_id.clone(),
                src: data.src.clone(),
                dst: data.dst.clone(),
                payload: data.payload.clone(),
            }));
            self.emit(Event::Message {
                msg_id: data.msg_id.clone(),
                src: data.src.clone(),
                dst: data.dst.clone(),
                cast: Cast::Unicast,
                service: service_of(&data.payload),
                payload: data.payload,
                origin_key,
            });
        } else {
            self.counters.duplicates += 1;
        }
        if !data.require_ack {
            return;
        }
        let ack = Ack {
            msg_id: data.msg_id.clone(),
            src: Some(self.config.peer_id.clone()),
            dst: Some(data.src.clone()),
            from: Some(self.config.peer_id.clone()),
            timestamp: Some(self.timestamp(now)),
            ttl: self.config.default_ttl,
            auth: None,
        };
        if data.src == self.config.peer_id {
            self.on_ack(now, LinkId::MAX, ack);
        } else {
            self.defer(super::origin::Deferred::Ack {
                ack,
                origin: data.src,
                hint: link,
            });
        }
    }

    pub(super) fn on_pub(&mut self, now: Instant, link: LinkId, mut data: Data) {
        if self.seen.contains_kind("PUB", &data.msg_id) {
            self.counters.duplicates += 1;
            return;
        }
        let auth = data.auth.take();
        let origin = Origin::of("PUB", &data);
        let Some(origin_key) = self.authentic(link, &origin, auth.as_ref()) else {
            return;
        };
        let auth = self.vouch(link, &origin, auth);
        data.auth = auth;
        self.seen.insert_kind("PUB", &data.msg_id);
        self.learn_reverse(now, link, &data.src, data.ttl);
        let cast = if data.dst == "*" {
            Some(Cast::Broadcast)
        } else if data.dst.strip_prefix('#') == Some(self.namespace.as_str()) {
            Some(Cast::Namespace)
        } else {
            None
        };
        if data.ttl > 1 {
            let forwarded = Message::Pub(Data {
                ttl: data.ttl - 1,
                ..data.clone()
            });
            let others: Vec<LinkId> = self
                .by_peer
                .values()
                .copied()
                .filter(|l| *l != link)
                .collect();
            if let Ok(line) = forwarded.to_line() {
                for other in others {
                    self.write_line(other, &forwarded, line.clone());
                    self.counters.forwarded += 1;
                }
            }
        }
        if let Some(cast) = cast {
            self.counters.delivered += 1;
            self.emit(Event::Message {
                msg_id: data.msg_id,
                src: data.src,
                dst: data.dst,
                cast,
                service: service_of(&data.payload),
                payload: data.payload,
                origin_key,
            });
        }
    }

    pub(super) fn on_ack(&mut self, now: Instant, link: LinkId, ack: Ack) {
        if self
            .links
            .get_mut(&link)
            .is_some_and(|state| state.pacing.acked(&ack.msg_id))
        {
            self.pace(link);
        }
        if self.is_course_link(link) && !self.outbox.contains_key(&ack.msg_id) {
            if let Some(origin) = self.relayed.get(&ack.msg_id).cloned() {
                self.relay_course_ack(now, link, ack, origin);
                return;
            }
        }
        let for_us = ack.dst.as_deref().is_none_or(|d| d == self.config.peer_id);
        if !for_us {
            if ack.ttl > 1 {
                let forwarded = Ack {
                    ttl: ack.ttl - 1,
                    ..ack
                };
                self.route(now, Message::Ack(forwarded), Some(link));
            } else {
                self.counters.errors += 1;
            }
            return;
        }
        if !self.outbox.contains_key(&ack.msg_id) {
            self.counters.duplicates += 1;
            return;
        }
        let src = ack.src.clone().unwrap_or_else(|| self.peer_of(link));
        let me = self.config.peer_id.clone();
        let origin = Origin {
            kind: "ACK",
            msg_id: &ack.msg_id,
            src: &src,
            dst: &me,
            payload: None,
        };
        if self.authentic(link, &origin, ack.auth.as_ref()).is_none() {
            return;
        }
        if let Some(outgoing) = self.outbox.remove(&ack.msg_id) {
            self.actions.push_back(Action::Forget {
                msg_id: ack.msg_id.clone(),
            });
            let from = src;
            self.emit(Event::Acked {
                msg_id: ack.msg_id,
                from,
                elapsed: now.saturating_duration_since(outgoing.first_sent),
            });
        } else {
            self.counters.duplicates += 1;
        }
    }

    pub(super) fn on_who_has(&mut self, now: Instant, link: LinkId, who: WhoHas) {
        if !self.seen.insert_kind("WHO_HAS", &who.msg_id) {
            self.counters.duplicates += 1;
            return;
        }
        self.reverse.record(&who.msg_id, link, now);
        self.learn_reverse(now, link, &who.src, who.ttl);
        let hops = if who.dst == self.config.peer_id {
            Some(0)
        } else if self.by_peer.contains_key(&who.dst) {
            Some(1)
        } else {
            self.routes
                .get(&who.dst, now)
                .filter(|r| r.next_hop != link)
                .map(|r| r.hops)
        };
        if let Some(hops) = hops {
            let hit = Message::WhoHasHit(WhoHasHit {
                msg_id: who.msg_id,
                src: self.config.peer_id.clone(),
                dst: who.dst,
                via: self.config.peer_id.clone(),
                hops,
                ttl: self.config.default_ttl,
            });
            self.write(link, &hit);
            return;
        }
        if who.ttl > 1 {
            let forwarded = Message::WhoHas(WhoHas {
                ttl: who.ttl - 1,
                ..who
            });
            self.flood(&forwarded, Some(link), feature::WHO_HAS);
        }
    }

    pub(super) fn on_hit(&mut self, now: Instant, link: LinkId, hit: WhoHasHit) {
        let hops = hit.hops.saturating_add(1);
        self.routes.learn(&hit.dst, link, hops, now);
        let ours = self
            .discoveries
            .get(&hit.dst)
            .is_some_and(|d| d.msg_id == hit.msg_id);
        if ours {
            if let Some(discovery) = self.discoveries.remove(&hit.dst) {
                self.flush(now, discovery.pending);
            }
            return;
        }
        if !self.seen.insert_kind("HIT", &hit.msg_id) {
            self.counters.duplicates += 1;
            return;
        }
        if let Some(back) = self.reverse.back(&hit.msg_id, now) {
            if hit.ttl > 1 && back != link {
                let forwarded = Message::WhoHasHit(WhoHasHit {
                    src: self.config.peer_id.clone(),
                    hops,
                    ttl: hit.ttl - 1,
                    ..hit
                });
                self.write(back, &forwarded);
                self.counters.forwarded += 1;
            }
        }
    }

    pub(super) fn on_relay(&mut self, now: Instant, link: LinkId, relay: Relay, ok: bool) {
        if relay.dst != self.config.peer_id && !relay.dst.is_empty() {
            if relay.ttl > 1 {
                let forwarded = Relay {
                    ttl: relay.ttl - 1,
                    ..relay
                };
                let message = if ok {
                    Message::RelayOk(forwarded)
                } else {
                    Message::RelayFail(forwarded)
                };
                self.route(now, message, Some(link));
            }
            return;
        }
        if !ok {
            if let Some(outgoing) = self.outbox.get_mut(&relay.msg_id) {
                outgoing.last_error = relay.reason.clone();
                outgoing.next_try = now;
                let dst = outgoing.dst.clone();
                self.routes.forget(&dst);
            }
        }
        let via = if relay.src.is_empty() {
            self.peer_of(link)
        } else {
            relay.src
        };
        self.emit(Event::Relayed {
            msg_id: relay.msg_id,
            via,
            ok,
            reason: relay.reason,
        });
    }

    pub(super) fn on_error(&mut self, now: Instant, link: LinkId, error: ErrorMsg) {
        self.counters.errors += 1;
        let elsewhere = error
            .dst
            .as_ref()
            .is_some_and(|d| d != &self.config.peer_id && is_peer_id(d));
        if elsewhere {
            if error.ttl > 1 {
                let forwarded = ErrorMsg {
                    ttl: error.ttl - 1,
                    ..error
                };
                self.route(now, Message::Error(forwarded), Some(link));
            }
            return;
        }
        if let Some(outgoing) = error
            .reference
            .as_ref()
            .and_then(|r| self.outbox.get_mut(r))
        {
            outgoing.last_error = Some(error.error.clone());
        }
        let from = error.src.clone().unwrap_or_else(|| self.peer_of(link));
        self.emit(Event::RemoteError {
            code: error.error,
            reference: error.reference,
            detail: error.detail,
            from,
        });
    }

    pub(super) fn on_metrics_request(&mut self, now: Instant, link: LinkId, request: MetricsReq) {
        let Some(state) = self.links.get(&link) else {
            return;
        };
        if !state.has(feature::METRICS) {
            return;
        }
        let answer = Message::Metrics(Metrics {
            msg_id: request.msg_id,
            src: self.config.peer_id.clone(),
            dst: request.src,
            rtt_ms: state.keep_alive.rtt().map(|r| r.as_millis() as u64),
            sent_count: state.sent,
            recv_count: state.received,
            last_seen: self.timestamp(now),
            ttl: 1,
        });
        self.write(link, &answer);
    }

    /// Addresses are learnt only from authenticated teia neighbours (or, in a benchmark's
    /// plaintext baseline, any teia neighbour), at most [`PEER_LIST_MAX`] per list and
    /// [`Config::learned_per_peer`] per neighbour; dials then obey the node-wide rate and
    /// each address's backoff.
    pub(super) fn on_peer_list(&mut self, now: Instant, link: LinkId, list: PeerList) {
        let Some(state) = self.links.get(&link) else {
            return;
        };
        let trusted = state.has(feature::TEIA) && (state.encrypted || self.config.plaintext_teia);
        if !trusted {
            return;
        }
        let source = state.peer.clone();
        for entry in list.peers.into_iter().take(PEER_LIST_MAX) {
            if entry.peer_id == self.config.peer_id || !is_peer_id(&entry.peer_id) {
                continue;
            }
            let Ok(ip) = entry.ip.parse::<std::net::IpAddr>() else {
                continue;
            };
            if ip.is_unspecified() || ip.is_multicast() {
                continue;
            }
            self.members.learn(
                now,
                SocketAddr::new(ip, entry.port),
                Some(entry.peer_id),
                source.clone(),
            );
        }
        self.redial(now);
    }

    /// The link toward `dst`: a direct link, else a fresh cached route.
    pub(super) fn next_hop(&self, dst: &str, now: Instant) -> Option<LinkId> {
        if let Some(&link) = self.by_peer.get(dst) {
            return Some(link);
        }
        self.routes
            .get(dst, now)
            .map(|r| r.next_hop)
            .filter(|l| self.links.get(l).is_some_and(|s| s.state == LinkState::Up))
    }

    /// Sends a routed message toward its destination, discovering a route if needed.
    /// `from` is the link it arrived on, when relaying.
    pub(super) fn route(&mut self, now: Instant, message: Message, from: Option<LinkId>) {
        let Some(dst) = routed_dst(&message) else {
            return;
        };
        match self.next_hop(&dst, now) {
            Some(link) if Some(link) != from || self.by_peer.get(&dst) == Some(&link) => {
                self.forward(now, link, message, from);
            }
            _ => self.discover(now, dst, Pending { message, from }),
        }
    }

    /// A course neighbour acknowledged a SEND this node relayed to it (its ACK names no
    /// destination, or has no hops left): route the ACK to the SEND's origin, vouched for.
    fn relay_course_ack(&mut self, now: Instant, link: LinkId, ack: Ack, origin: String) {
        let neighbour = self.peer_of(link);
        if ack.src.as_deref().is_some_and(|s| s != neighbour) {
            self.counters.errors += 1;
            return;
        }
        let auth = self.sign(&Origin {
            kind: "ACK",
            msg_id: &ack.msg_id,
            src: &neighbour,
            dst: &origin,
            payload: None,
        });
        let forwarded = Ack {
            src: Some(neighbour.clone()),
            dst: Some(origin.clone()),
            from: Some(neighbour),
            ttl: self.config.default_ttl,
            auth,
            ..ack
        };
        self.counters.forwarded += 1;
        if origin == self.config.peer_id {
            self.on_ack(now, LinkId::MAX, forwarded);
        } else {
            self.route(now, Message::Ack(forwarded), Some(link));
        }
    }

    /// Remembers that the SEND `msg_id` from `origin` went to a course neighbour, whose
    /// ACK will not name its destination.
    fn remember_relayed(&mut self, msg_id: &str, origin: &str) {
        // Kept until pushed out by newer ones (an ACK may come again for a retransmission).
        if self.relayed_order.len() >= RELAYED_KEPT {
            if let Some(oldest) = self.relayed_order.pop_front() {
                self.relayed.remove(&oldest);
            }
        }
        if self
            .relayed
            .insert(msg_id.to_owned(), origin.to_owned())
            .is_none()
        {
            self.relayed_order.push_back(msg_id.to_owned());
        }
    }

    pub(super) fn forward(
        &mut self,
        now: Instant,
        link: LinkId,
        message: Message,
        from: Option<LinkId>,
    ) {
        if let Message::Send(data) = &message {
            if from.is_some() && self.is_course_link(link) {
                self.remember_relayed(&data.msg_id, &data.src);
            }
        }
        self.write(link, &message);
        let Some(from) = from else {
            return;
        };
        self.counters.forwarded += 1;
        if let Message::Send(data) = &message {
            let ok = Message::RelayOk(Relay {
                msg_id: data.msg_id.clone(),
                src: self.config.peer_id.clone(),
                dst: data.src.clone(),
                reason: None,
                ttl: self.config.default_ttl,
            });
            self.reply(now, ok, &data.src, Some(from));
        }
    }

    /// Sends an answer to `origin`: directly if it is a neighbour, else back on the link
    /// the triggering message came from, else by route.
    pub(super) fn reply(
        &mut self,
        now: Instant,
        message: Message,
        origin: &str,
        hint: Option<LinkId>,
    ) {
        if let Some(&link) = self.by_peer.get(origin) {
            self.write(link, &message);
        } else if let Some(link) = hint.filter(|l| self.links.contains_key(l)) {
            self.write(link, &message);
        } else {
            self.route(now, message, None);
        }
    }

    pub(super) fn discover(&mut self, now: Instant, dst: String, pending: Pending) {
        if let Some(discovery) = self.discoveries.get_mut(&dst) {
            if discovery.pending.len() < self.config.pending_per_destination {
                discovery.pending.push_back(pending);
            } else {
                self.refuse_pending(pending, code::BUSY);
            }
            return;
        }
        if self.discoveries.len() >= self.config.max_discoveries {
            self.refuse_pending(pending, code::BUSY);
            return;
        }
        let msg_id = self.new_id();
        let who = Message::WhoHas(WhoHas {
            msg_id: msg_id.clone(),
            src: self.config.peer_id.clone(),
            dst: dst.clone(),
            ttl: self.config.default_ttl,
        });
        self.seen.insert_kind("WHO_HAS", &msg_id);
        self.flood(&who, None, feature::WHO_HAS);
        self.discoveries.insert(
            dst,
            Discovery {
                msg_id,
                deadline: now + self.config.discovery_timeout,
                pending: VecDeque::from([pending]),
            },
        );
    }

    pub(super) fn flush(&mut self, now: Instant, pending: VecDeque<Pending>) {
        for Pending { message, from } in pending {
            let Some(dst) = routed_dst(&message) else {
                continue;
            };
            match self.next_hop(&dst, now) {
                Some(link) => self.forward(now, link, message, from),
                None => self.refuse_pending(Pending { message, from }, code::NO_ROUTE),
            }
        }
    }

    /// A newly connected neighbour may be a destination being discovered.
    pub(super) fn flush_discovery_for_neighbour(&mut self, now: Instant, link: LinkId) {
        let Some(peer) = self.links.get(&link).and_then(|l| l.peer.clone()) else {
            return;
        };
        if let Some(discovery) = self.discoveries.remove(&peer) {
            self.flush(now, discovery.pending);
        }
    }

    pub(super) fn expire_discoveries(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .discoveries
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(dst, _)| dst.clone())
            .collect();
        for dst in expired {
            if let Some(discovery) = self.discoveries.remove(&dst) {
                for pending in discovery.pending {
                    self.refuse_pending(pending, code::NO_ROUTE);
                }
            }
        }
    }

    /// A message that cannot go on: relayed SENDs are answered RELAY_FAIL and ERROR; our own
    /// SENDs wait for their retransmission; anything else is dropped.
    pub(super) fn refuse_pending(&mut self, pending: Pending, reason: &str) {
        let Pending { message, from } = pending;
        match message {
            Message::Send(data) if from.is_some() => {
                self.counters.errors += 1;
                let fail = Message::RelayFail(Relay {
                    msg_id: data.msg_id.clone(),
                    src: self.config.peer_id.clone(),
                    dst: data.src.clone(),
                    reason: Some(reason.to_owned()),
                    ttl: self.config.default_ttl,
                });
                let error = Message::Error(self.error_msg(
                    reason,
                    Some(data.msg_id.clone()),
                    Some(format!("{} not reachable", data.dst)),
                    Some(data.src.clone()),
                ));
                if let Some(link) = from.filter(|l| self.links.contains_key(l)) {
                    self.write(link, &fail);
                    self.write(link, &error);
                }
            }
            Message::Send(data) => {
                if let Some(outgoing) = self.outbox.get_mut(&data.msg_id) {
                    outgoing.last_error = Some(reason.to_owned());
                }
            }
            _ => self.counters.errors += 1,
        }
    }

    pub(super) fn retransmit(&mut self, now: Instant) {
        let due: Vec<String> = self
            .outbox
            .iter()
            .filter(|(_, o)| o.next_try <= now || o.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for msg_id in due {
            let Some(outgoing) = self.outbox.get_mut(&msg_id) else {
                continue;
            };
            if outgoing.deadline <= now {
                if let Some(outgoing) = self.outbox.remove(&msg_id) {
                    self.actions.push_back(Action::Forget {
                        msg_id: msg_id.clone(),
                    });
                    self.emit(Event::Undelivered {
                        msg_id,
                        dst: outgoing.dst,
                        reason: outgoing.last_error.unwrap_or_else(|| "timeout".to_owned()),
                    });
                }
                continue;
            }
            outgoing.backoff = (outgoing.backoff * 2).min(self.config.retransmit_after * 8);
            outgoing.next_try = now + outgoing.backoff;
            let (dst, payload) = (outgoing.dst.clone(), outgoing.payload.clone());
            if self.queued_for_course(&msg_id) {
                continue;
            }
            let data = self.originate("SEND", msg_id, dst, payload);
            self.defer(super::origin::Deferred::Send {
                data,
                remember: None,
            });
        }
    }

    /// Learns "origin via this link" from a routed message, if no better route is known.
    pub(super) fn learn_reverse(&mut self, now: Instant, link: LinkId, origin: &str, ttl: u32) {
        if origin == self.config.peer_id || self.by_peer.contains_key(origin) || !is_peer_id(origin)
        {
            return;
        }
        let hops = self
            .config
            .default_ttl
            .saturating_sub(ttl)
            .saturating_add(1)
            .max(1);
        self.routes.learn(origin, link, hops, now);
    }

    pub(super) fn flood(&mut self, message: &Message, except: Option<LinkId>, needed: &str) {
        let links: Vec<LinkId> = self
            .by_peer
            .values()
            .copied()
            .filter(|l| Some(*l) != except)
            .filter(|l| self.links.get(l).is_some_and(|s| s.has(needed)))
            .collect();
        for link in links {
            self.write(link, message);
        }
    }
}
