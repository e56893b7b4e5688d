//! Authentic origins (PROTOCOL.md section 4.1): the messages this node originates are signed
//! once, at the origin, a whole batch at a time (the messages originated in one turn share
//! one signature over the root of a hash tree, each carrying its proof); a course neighbour
//! may only speak for itself, and the teia node it enters through vouches for it with its own
//! signature; a message is checked before it is delivered (one signature check per batch),
//! so the application is never told that it came from someone who did not send it.

use serde_json::Value;

use super::*;
use crate::identity;

/// Why a message's origin was not accepted: the detail of its `ERROR unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forgery {
    /// It came on a link this node no longer has.
    #[error("unknown link")]
    UnknownLink,
    /// A course peer sent it as someone else.
    #[error("a course peer may only send as itself ({neighbour}), not as {src}")]
    NotItself {
        /// The course peer.
        neighbour: String,
        /// The origin it claimed.
        src: String,
    },
    /// It carries no origin signature.
    #[error("no origin signature for {0}")]
    Unsigned(String),
    /// Its signing key is not a key.
    #[error("{0}")]
    BadKey(String),
    /// A node signed for a teia node, which signs for itself.
    #[error("{src} is a teia node: {signer} cannot sign for it")]
    SignedForTeiaNode {
        /// The origin claimed.
        src: String,
        /// Who signed.
        signer: String,
    },
    /// Its batch proof is not base64url.
    #[error("proof is not base64url")]
    ProofEncoding,
    /// Its batch proof does not lead to a root.
    #[error("malformed batch proof")]
    MalformedProof,
    /// Its signature does not verify.
    #[error("bad origin signature for {0}")]
    BadSignature(String),
    /// Its signer used a key other than the one pinned for it.
    #[error("{0} signed with a key other than its pinned key")]
    NotPinnedKey(String),
}

/// What an origin signature covers, borrowed from the message.
pub(super) struct Origin<'a> {
    pub kind: &'a str,
    pub msg_id: &'a str,
    pub src: &'a str,
    pub dst: &'a str,
    pub payload: Option<&'a Value>,
}

impl<'a> Origin<'a> {
    /// The origin fields of a SEND or PUB (`kind`).
    pub(super) fn of(kind: &'a str, data: &'a Data) -> Self {
        Self {
            kind,
            msg_id: &data.msg_id,
            src: &data.src,
            dst: &data.dst,
            payload: Some(&data.payload),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        identity::origin_message(self.kind, self.msg_id, self.src, self.dst, self.payload)
    }
}

/// A message originated here, waiting for the end of the turn to be signed with the others
/// and sent.
#[derive(Debug)]
pub(super) enum Deferred {
    /// A PUB, to every neighbour.
    Pub(Data),
    /// A SEND, routed to its destination, then remembered (when it is new, not a
    /// retransmission).
    Send {
        data: Data,
        remember: Option<PendingSend>,
    },
    /// An ACK, back to the SEND's origin (`hint`: the link the SEND came on).
    Ack {
        ack: Ack,
        origin: String,
        hint: Option<LinkId>,
    },
}

/// Messages signed together at most; one more starts a new batch.
const MAX_BATCH: usize = 64;
/// Room kept in a line for the signature fields of a batch of [`MAX_BATCH`].
pub(super) const AUTH_ROOM: usize = 512;

impl Deferred {
    fn origin(&self) -> Origin<'_> {
        match self {
            Self::Pub(data) => Origin::of("PUB", data),
            Self::Send { data, .. } => Origin::of("SEND", data),
            Self::Ack { ack, origin, .. } => Origin {
                kind: "ACK",
                msg_id: &ack.msg_id,
                src: ack.src.as_deref().unwrap_or_default(),
                dst: origin,
                payload: None,
            },
        }
    }
}

impl Node {
    /// A SEND or PUB from this node, not signed yet.
    pub(super) fn originate(
        &mut self,
        kind: &str,
        msg_id: String,
        dst: String,
        payload: Value,
    ) -> Data {
        Data {
            msg_id,
            src: self.config.peer_id.clone(),
            dst,
            payload,
            require_ack: kind == "SEND",
            ttl: self.config.default_ttl,
            auth: None,
        }
    }

    /// Queues a message of ours until the end of the turn ([`Node::poll_action`]), when the
    /// queue is signed as one batch and sent.
    pub(super) fn defer(&mut self, message: Deferred) {
        self.unsigned.push(message);
        if self.unsigned.len() >= MAX_BATCH {
            self.flush_origins();
        }
    }

    /// Signs the queued messages as one batch and sends them.
    pub(super) fn flush_origins(&mut self) {
        let batch = std::mem::take(&mut self.unsigned);
        let signed: Vec<bool> = batch.iter().map(|d| self.needs_signature(d)).collect();
        let origins: Vec<Origin<'_>> = batch
            .iter()
            .zip(&signed)
            .filter(|(_, &signed)| signed)
            .map(|(deferred, _)| deferred.origin())
            .collect();
        let mut auths = if origins.is_empty() {
            Vec::new()
        } else {
            self.sign_batch(&origins)
        }
        .into_iter();
        drop(origins);
        let now = self.now;
        for (deferred, signed) in batch.into_iter().zip(signed) {
            let auth = if signed { auths.next().flatten() } else { None };
            match deferred {
                Deferred::Pub(mut data) => {
                    data.auth = auth;
                    let message = Message::Pub(data);
                    let Ok(line) = message.to_line() else {
                        self.counters.errors += 1;
                        continue;
                    };
                    let links: Vec<LinkId> = self.by_peer.values().copied().collect();
                    for link in links {
                        self.write_line(link, &message, line.clone());
                    }
                }
                Deferred::Send { mut data, remember } => {
                    data.auth = auth;
                    self.route(now, Message::Send(data), None);
                    if let Some(remember) = remember {
                        self.actions.push_back(Action::Remember(remember));
                    }
                }
                Deferred::Ack {
                    mut ack,
                    origin,
                    hint,
                } => {
                    ack.auth = auth;
                    self.reply(now, Message::Ack(ack), &origin, hint);
                }
            }
        }
    }

    /// Whether a message of ours needs its origin signature: not when it goes straight to
    /// its destination over an encrypted link with a teia node (the link proves where it
    /// comes from, and the destination forwards it no further); a PUB always does.
    fn needs_signature(&self, deferred: &Deferred) -> bool {
        let direct = |peer: &str| {
            self.by_peer
                .get(peer)
                .and_then(|link| self.links.get(link))
                .is_some_and(|state| state.encrypted && state.has(feature::TEIA))
        };
        match deferred {
            Deferred::Pub(_) => true,
            Deferred::Send { data, .. } => !direct(&data.dst),
            Deferred::Ack { origin, .. } => !direct(origin),
        }
    }

    /// This node's signatures of `origins`, all under one signature of the root of their hash
    /// tree: as their origin, or, when `src` is a course neighbour, as the teia node vouching
    /// for it (`signer`). `None` each when the node does not sign.
    pub(super) fn sign_batch(&self, origins: &[Origin<'_>]) -> Vec<Option<Auth>> {
        let identity = match &self.config.identity {
            Some(identity) if self.config.sign_messages => identity,
            _ => return origins.iter().map(|_| None).collect(),
        };
        let leaves: Vec<[u8; 32]> = origins
            .iter()
            .map(|o| identity::leaf_hash(&o.bytes()))
            .collect();
        let (root, proofs) = identity::batch_tree(&leaves);
        let sig = identity::encode(&identity.sign(&identity::batch_message(&root)));
        let key = identity.public_key().to_string();
        let batched = origins.len() > 1;
        origins
            .iter()
            .zip(proofs)
            .enumerate()
            .map(|(index, (origin, proof))| {
                Some(Auth {
                    key: key.clone(),
                    sig: sig.clone(),
                    signer: (origin.src != self.config.peer_id)
                        .then(|| self.config.peer_id.clone()),
                    proof: batched.then(|| identity::encode(&proof)),
                    leaf: batched.then(|| u32::try_from(index).unwrap_or(u32::MAX)),
                })
            })
            .collect()
    }

    /// This node's signature of one message (a batch of one).
    pub(super) fn sign(&self, origin: &Origin<'_>) -> Option<Auth> {
        self.sign_batch(std::slice::from_ref(origin))
            .into_iter()
            .next()
            .flatten()
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
    /// `ERROR unauthorized`; the link stays up. `None` when refused, else the key that
    /// proved `src` (`Some(None)` when nothing did: a course peer, a vouched-for message, a
    /// plaintext link).
    pub(super) fn authentic(
        &mut self,
        link: LinkId,
        origin: &Origin<'_>,
        auth: Option<&Auth>,
    ) -> Option<Option<PublicKey>> {
        let verdict = self.verdict(link, origin, auth);
        let reason = match verdict {
            Ok(proven) => return Some(proven),
            Err(reason) => reason,
        };
        self.counters.forged += 1;
        let from = self.peer_of(link);
        let error = self.error_msg(
            code::UNAUTHORIZED,
            Some(origin.msg_id.to_owned()),
            Some(reason.to_string()),
            None,
        );
        self.write(link, &Message::Error(error));
        self.emit(Event::Forged {
            from,
            src: origin.src.to_owned(),
            msg_id: origin.msg_id.to_owned(),
            reason,
        });
        None
    }

    /// The key `text` names, read once and then remembered (within [`KNOWN_KEYS_KEPT`]).
    fn signing_key(&mut self, text: &str) -> Result<PublicKey, Forgery> {
        if let Some(key) = self.known_keys.get(text) {
            return Ok(*key);
        }
        let key = PublicKey::parse(text).map_err(|e| Forgery::BadKey(e.to_string()))?;
        if self.known_keys.len() >= KNOWN_KEYS_KEPT {
            self.known_keys.clear();
        }
        self.known_keys.insert(text.to_owned(), key);
        Ok(key)
    }

    fn verdict(
        &mut self,
        link: LinkId,
        origin: &Origin<'_>,
        auth: Option<&Auth>,
    ) -> Result<Option<PublicKey>, Forgery> {
        let Some(state) = self.links.get(&link) else {
            return Err(Forgery::UnknownLink);
        };
        let neighbour = state.peer.clone().unwrap_or_default();
        if !state.has(feature::TEIA) {
            return if origin.src == neighbour {
                Ok(None)
            } else {
                Err(Forgery::NotItself {
                    neighbour,
                    src: origin.src.to_owned(),
                })
            };
        }
        if state.encrypted && origin.src == neighbour {
            return Ok(state.key);
        }
        if !self.config.sign_messages {
            return Ok(None);
        }
        let auth = auth.ok_or_else(|| Forgery::Unsigned(origin.src.to_owned()))?;
        let key = self.signing_key(&auth.key)?;
        let signer = auth.signer.as_deref().unwrap_or(origin.src);
        if signer != origin.src && self.pins.contains_key(origin.src) {
            return Err(Forgery::SignedForTeiaNode {
                src: origin.src.to_owned(),
                signer: signer.to_owned(),
            });
        }
        let proof = match &auth.proof {
            Some(proof) => identity::decode(proof).ok_or(Forgery::ProofEncoding)?,
            None => Vec::new(),
        };
        let leaf = identity::leaf_hash(&origin.bytes());
        let root = identity::batch_root(leaf, auth.leaf.unwrap_or(0), &proof)
            .ok_or(Forgery::MalformedProof)?;
        // A root verified once vouches for every message of its batch.
        let verified = format!("{key}:{}", identity::encode(&root));
        if !self.verified_roots.contains(&verified) {
            let signature = identity::decode(&auth.sig).unwrap_or_default();
            if !key.verify(&identity::batch_message(&root), &signature) {
                return Err(Forgery::BadSignature(origin.src.to_owned()));
            }
            self.verified_roots.insert(&verified);
        }
        if !self.check_pin(signer, key, None) {
            return Err(Forgery::NotPinnedKey(signer.to_owned()));
        }
        Ok((signer == origin.src).then_some(key))
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
