//! Authentic origins (PROTOCOL.md section 4.1): the messages this node originates are signed
//! once, at the origin; a course neighbour may only speak for itself, and the teia node it
//! enters through vouches for it with its own signature; a message is checked before it is
//! delivered, so the application is never told that it came from someone who did not send it.

use serde_json::Value;

use super::*;
use crate::identity;

/// What an origin signature covers, borrowed from the message.
pub(super) struct Origin<'a> {
    pub kind: &'a str,
    pub msg_id: &'a str,
    pub src: &'a str,
    pub dst: &'a str,
    pub payload: Option<&'a Value>,
}

impl Origin<'_> {
    fn bytes(&self) -> Vec<u8> {
        identity::origin_message(self.kind, self.msg_id, self.src, self.dst, self.payload)
    }
}

impl Node {
    /// A SEND or PUB originated here, signed when the node has an identity.
    pub(super) fn originate(
        &mut self,
        kind: &str,
        msg_id: String,
        dst: String,
        payload: Value,
    ) -> Data {
        let src = self.config.peer_id.clone();
        let auth = self.sign(&Origin {
            kind,
            msg_id: &msg_id,
            src: &src,
            dst: &dst,
            payload: Some(&payload),
        });
        Data {
            msg_id,
            src,
            dst,
            payload,
            require_ack: kind == "SEND",
            ttl: self.config.default_ttl,
            auth,
        }
    }

    /// This node's signature of `origin`: as its origin, or, when `src` is a course
    /// neighbour, as the teia node vouching for it (`signer`).
    pub(super) fn sign(&self, origin: &Origin<'_>) -> Option<Auth> {
        if !self.config.sign_messages {
            return None;
        }
        let identity = self.config.identity.as_ref()?;
        let signature = identity.sign(&origin.bytes());
        Some(Auth {
            key: identity.public_key().to_string(),
            sig: identity::encode(&signature),
            signer: (origin.src != self.config.peer_id).then(|| self.config.peer_id.clone()),
        })
    }

    /// True when `link` is a course peer's (no proven teia feature).
    pub(super) fn is_course_link(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| !l.has(feature::TEIA))
    }

    /// Checks that `origin`, received on `link`, really comes from `origin.src`:
    /// - from a course peer, `src` must be that peer itself;
    /// - from a teia neighbour speaking for itself on an encrypted link, the link proves it;
    /// - otherwise the signature must verify, by `src`'s pinned key (pinned now if new), or
    ///   by a teia node vouching for `src` when `src` is not a teia node.
    ///
    /// A refused message is counted, reported ([`Event::Forged`]) and answered
    /// `ERROR unauthorized`; the link stays up.
    pub(super) fn authentic(
        &mut self,
        link: LinkId,
        origin: &Origin<'_>,
        auth: Option<&Auth>,
    ) -> bool {
        let verdict = self.verdict(link, origin, auth);
        let Err(reason) = verdict else {
            return true;
        };
        self.counters.forged += 1;
        let from = self.peer_of(link);
        let error = self.error_msg(
            code::UNAUTHORIZED,
            Some(origin.msg_id.to_owned()),
            Some(reason.clone()),
            None,
        );
        self.write(link, &Message::Error(error));
        self.emit(Event::Forged {
            from,
            src: origin.src.to_owned(),
            msg_id: origin.msg_id.to_owned(),
            reason,
        });
        false
    }

    fn verdict(
        &mut self,
        link: LinkId,
        origin: &Origin<'_>,
        auth: Option<&Auth>,
    ) -> Result<(), String> {
        let Some(state) = self.links.get(&link) else {
            return Err("unknown link".to_owned());
        };
        let neighbour = state.peer.clone().unwrap_or_default();
        if !state.has(feature::TEIA) {
            return if origin.src == neighbour {
                Ok(())
            } else {
                Err(format!(
                    "a course peer may only send as itself ({neighbour}), not as {}",
                    origin.src
                ))
            };
        }
        if !self.config.sign_messages || (state.encrypted && origin.src == neighbour) {
            return Ok(());
        }
        let auth = auth.ok_or_else(|| format!("no origin signature for {}", origin.src))?;
        let key = PublicKey::parse(&auth.key).map_err(|e| e.to_string())?;
        let signer = auth.signer.as_deref().unwrap_or(origin.src);
        if signer != origin.src && self.pins.contains_key(origin.src) {
            return Err(format!(
                "{} is a teia node: {signer} cannot sign for it",
                origin.src
            ));
        }
        let signature = identity::decode(&auth.sig).unwrap_or_default();
        if !key.verify(&origin.bytes(), &signature) {
            return Err(format!("bad origin signature for {}", origin.src));
        }
        if !self.check_pin(signer, key, None) {
            return Err(format!(
                "{signer} signed with a key other than its pinned key"
            ));
        }
        Ok(())
    }

    /// For a message that entered from a course neighbour and goes on to others: this
    /// node's signature vouching for it (when it has none).
    pub(super) fn vouch(
        &self,
        link: LinkId,
        origin: &Origin<'_>,
        auth: Option<Auth>,
    ) -> Option<Auth> {
        if auth.is_some() || !self.is_course_link(link) {
            return auth;
        }
        self.sign(origin)
    }
}
