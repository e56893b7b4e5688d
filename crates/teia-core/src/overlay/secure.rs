//! Encrypted links (PROTOCOL.md section 4.1) and data streams (section 6): the Noise XX
//! handshake carried in HELLO, HELLO_OK and NOISE (or STREAM, STREAM_OK and NOISE), and the
//! framing of the encrypted bytes that follow it.
//!
//! No I/O: [`SecureWriter`] and [`SecureReader`] turn plaintext into frames and back for the
//! runtime's link tasks, with their nonces counted here.

use std::sync::Arc;

use crate::identity::{Identity, PublicKey, SIGNATURE_LEN};

/// The Noise protocol name of teia links.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// The Noise protocol name of data streams: AES-GCM, several times faster than
/// ChaCha20-Poly1305 on processors with AES instructions, for bulk bytes.
pub const STREAM_NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_BLAKE2s";

/// Which kind of connection a handshake is for; each has its own cipher suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// A peer link (JSON lines).
    Link,
    /// A data stream (bulk bytes).
    Stream,
}

impl Suite {
    fn params(self) -> &'static str {
        match self {
            Self::Link => NOISE_PARAMS,
            Self::Stream => STREAM_NOISE_PARAMS,
        }
    }
}
/// Prologue both sides mix into the handshake.
const PROLOGUE: &[u8] = b"teia-noise-v1";
/// Largest Noise message, ciphertext and tag included.
const NOISE_MAX: usize = 65_535;
/// Authentication tag added to each frame.
const TAG: usize = 16;
/// Plaintext bytes carried by one frame at most.
pub const FRAME_PLAINTEXT: usize = NOISE_MAX - TAG;
/// Payload of handshake messages 2 and 3: the node's ed25519 key and its binding signature.
const PAYLOAD_LEN: usize = 32 + SIGNATURE_LEN;

/// Why a handshake or a frame failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecureError {
    /// The Noise library refused a message (bad ciphertext, wrong state).
    #[error("noise handshake failed: {0}")]
    Noise(String),
    /// The handshake payload is not a key and signature.
    #[error("handshake payload is not a teia key and signature")]
    Payload,
    /// The signature does not bind the peer's link key to its node key and peer id.
    #[error("the peer's key does not sign its link key for peer id {0}")]
    Binding(String),
    /// A frame did not decrypt (tampered, reordered or not encrypted at all).
    #[error("an encrypted frame failed authentication")]
    Frame,
    /// The frame counter ran out (after 2^64 frames).
    #[error("frame counter exhausted")]
    Exhausted,
}

impl From<snow::Error> for SecureError {
    fn from(e: snow::Error) -> Self {
        Self::Noise(e.to_string())
    }
}

/// The symmetric keys of one encrypted link, shared by its reader and writer.
#[derive(Clone)]
pub struct LinkCipher(Arc<snow::StatelessTransportState>);

impl std::fmt::Debug for LinkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkCipher")
    }
}

impl PartialEq for LinkCipher {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl LinkCipher {
    /// A writer of frames with this link's keys.
    pub fn writer(&self) -> SecureWriter {
        SecureWriter {
            cipher: self.clone(),
            nonce: 0,
        }
    }

    /// A reader of frames with this link's keys.
    pub fn reader(&self) -> SecureReader {
        SecureReader {
            cipher: self.clone(),
            nonce: 0,
            pending: Vec::new(),
        }
    }
}

/// Seals plaintext into frames: a 2-byte big-endian length, then that many bytes of
/// ChaCha20-Poly1305 ciphertext and tag, nonce counting from 0.
pub struct SecureWriter {
    cipher: LinkCipher,
    nonce: u64,
}

impl SecureWriter {
    /// Appends the frames carrying `plaintext` to `out` (sealed in place, no extra copy).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        for chunk in plaintext.chunks(FRAME_PLAINTEXT) {
            let nonce = self.nonce;
            self.nonce = self.nonce.checked_add(1).ok_or(SecureError::Exhausted)?;
            let start = out.len();
            out.resize(start + 2 + chunk.len() + TAG, 0);
            let sealed = out.get_mut(start + 2..).unwrap_or_default();
            let len = self.cipher.0.write_message(nonce, chunk, sealed)?;
            let prefix = u16::try_from(len).map_err(|_| SecureError::Frame)?;
            out.truncate(start + 2 + len);
            if let Some(slot) = out.get_mut(start..start + 2) {
                slot.copy_from_slice(&prefix.to_be_bytes());
            }
        }
        Ok(())
    }
}

/// Opens frames written by the peer's [`SecureWriter`]; holds back at most one partial frame
/// (65,537 bytes).
pub struct SecureReader {
    cipher: LinkCipher,
    nonce: u64,
    pending: Vec<u8>,
}

impl SecureReader {
    /// Appends to `plaintext` what the complete frames in `input` (after what was held back)
    /// carry; keeps an incomplete frame for the next call. Frames are opened straight from
    /// `input` into `plaintext` when nothing was held back (the common case in bulk reads).
    pub fn open(&mut self, input: &[u8], plaintext: &mut Vec<u8>) -> Result<(), SecureError> {
        let mut input = input;
        if !self.pending.is_empty() {
            // Complete the held-back frame: its length first, then its body.
            let take = 2usize.saturating_sub(self.pending.len()).min(input.len());
            let (head, rest) = input.split_at(take);
            self.pending.extend_from_slice(head);
            input = rest;
            let Some(&[high, low]) = self.pending.get(..2) else {
                return Ok(());
            };
            let need = 2 + usize::from(u16::from_be_bytes([high, low]));
            let take = need.saturating_sub(self.pending.len()).min(input.len());
            let (head, rest) = input.split_at(take);
            self.pending.extend_from_slice(head);
            input = rest;
            if self.pending.len() < need {
                return Ok(());
            }
            let frame = std::mem::take(&mut self.pending);
            self.open_frames(&frame, plaintext)?;
        }
        let used = self.open_frames(input, plaintext)?;
        self.pending
            .extend_from_slice(input.get(used..).unwrap_or_default());
        Ok(())
    }

    /// Opens the complete frames at the start of `input`; returns the bytes they took.
    fn open_frames(&mut self, input: &[u8], plaintext: &mut Vec<u8>) -> Result<usize, SecureError> {
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            let Some(&[high, low]) = rest.get(..2) else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([high, low]));
            let Some(sealed) = rest.get(2..2 + len) else {
                break;
            };
            let nonce = self.nonce;
            self.nonce = self.nonce.checked_add(1).ok_or(SecureError::Exhausted)?;
            let start = plaintext.len();
            plaintext.resize(start + len, 0);
            let out = plaintext.get_mut(start..).unwrap_or_default();
            let n = self
                .cipher
                .0
                .read_message(nonce, sealed, out)
                .map_err(|_| SecureError::Frame)?;
            plaintext.truncate(start + n);
            used += 2 + len;
        }
        Ok(used)
    }
}

/// A Noise XX handshake in progress on one link or stream.
pub struct Handshake(Box<snow::HandshakeState>);

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handshake")
    }
}

fn builder(identity: &Identity, suite: Suite) -> Result<snow::Builder<'_>, SecureError> {
    let params = suite
        .params()
        .parse()
        .map_err(|e: snow::Error| SecureError::Noise(e.to_string()))?;
    Ok(snow::Builder::new(params)
        .prologue(PROLOGUE)?
        .local_private_key(identity.noise_private())?)
}

fn payload(identity: &Identity, peer_id: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(PAYLOAD_LEN);
    payload.extend_from_slice(identity.public_key().as_bytes());
    payload.extend_from_slice(&identity.sign_binding(peer_id));
    payload
}

impl Handshake {
    /// The dialer's side: message 1 (`-> e`), sent in HELLO.
    pub fn initiate(identity: &Identity, suite: Suite) -> Result<(Self, Vec<u8>), SecureError> {
        let mut state = builder(identity, suite)?.build_initiator()?;
        let mut out = vec![0; NOISE_MAX];
        let len = state.write_message(&[], &mut out)?;
        out.truncate(len);
        Ok((Self(Box::new(state)), out))
    }

    /// The listener's side: reads message 1, writes message 2 (`<- e, ee, s, es` with our
    /// key and binding), sent in HELLO_OK.
    pub fn respond(
        identity: &Identity,
        suite: Suite,
        our_peer_id: &str,
        first: &[u8],
    ) -> Result<(Self, Vec<u8>), SecureError> {
        let mut state = builder(identity, suite)?.build_responder()?;
        let mut scratch = vec![0; NOISE_MAX];
        state.read_message(first, &mut scratch)?;
        let mut out = vec![0; NOISE_MAX];
        let len = state.write_message(&payload(identity, our_peer_id), &mut out)?;
        out.truncate(len);
        Ok((Self(Box::new(state)), out))
    }

    /// The dialer's side: reads message 2 from `their_peer_id`, writes message 3
    /// (`-> s, se` with our key and binding), sent in NOISE. Returns the peer's proven key.
    pub fn finish_initiator(
        mut self,
        identity: &Identity,
        our_peer_id: &str,
        their_peer_id: &str,
        second: &[u8],
    ) -> Result<(PublicKey, Vec<u8>, LinkCipher), SecureError> {
        let key = self.read_peer(second, their_peer_id)?;
        let mut out = vec![0; NOISE_MAX];
        let len = self
            .0
            .write_message(&payload(identity, our_peer_id), &mut out)?;
        out.truncate(len);
        let cipher = LinkCipher(Arc::new(self.0.into_stateless_transport_mode()?));
        Ok((key, out, cipher))
    }

    /// The listener's side: reads message 3 from `their_peer_id`. Returns the peer's proven
    /// key and the link's keys.
    pub fn finish_responder(
        mut self,
        their_peer_id: &str,
        third: &[u8],
    ) -> Result<(PublicKey, LinkCipher), SecureError> {
        let key = self.read_peer(third, their_peer_id)?;
        let cipher = LinkCipher(Arc::new(self.0.into_stateless_transport_mode()?));
        Ok((key, cipher))
    }

    /// Reads a message carrying the peer's payload; checks that its key signs the Noise
    /// static key just proven, with `peer_id`.
    fn read_peer(&mut self, message: &[u8], peer_id: &str) -> Result<PublicKey, SecureError> {
        let mut scratch = vec![0; NOISE_MAX];
        let len = self.0.read_message(message, &mut scratch)?;
        let payload = scratch.get(..len).ok_or(SecureError::Payload)?;
        if payload.len() != PAYLOAD_LEN {
            return Err(SecureError::Payload);
        }
        let (key, signature) = payload.split_at(32);
        let key = crate::identity::encode(key);
        let key = PublicKey::parse(&key).map_err(|_| SecureError::Payload)?;
        let remote_static = self.0.get_remote_static().ok_or(SecureError::Payload)?;
        if !key.verify_binding(remote_static, peer_id, signature) {
            return Err(SecureError::Binding(peer_id.to_owned()));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn handshake() -> (LinkCipher, LinkCipher) {
        let (alice, bob) = (Identity::from_seed(&[1; 32]), Identity::from_seed(&[2; 32]));
        let (dialer, first) = Handshake::initiate(&alice, Suite::Link).unwrap();
        let (listener, second) = Handshake::respond(&bob, Suite::Link, "bob@U", &first).unwrap();
        let (bob_key, third, a) = dialer
            .finish_initiator(&alice, "alice@U", "bob@U", &second)
            .unwrap();
        assert_eq!(bob_key, bob.public_key());
        let (alice_key, b) = listener.finish_responder("alice@U", &third).unwrap();
        assert_eq!(alice_key, alice.public_key());
        (a, b)
    }

    #[test]
    fn frames_round_trip_in_any_cut() {
        let (a, b) = handshake();
        let mut writer = a.writer();
        let mut wire = Vec::new();
        let big = vec![b'x'; FRAME_PLAINTEXT + 10];
        writer.seal(b"{\"type\":\"PING\"}\n", &mut wire).unwrap();
        writer.seal(&big, &mut wire).unwrap();
        let mut reader = b.reader();
        let mut plain = Vec::new();
        for piece in wire.chunks(7) {
            reader.open(piece, &mut plain).unwrap();
        }
        assert_eq!(plain.len(), 16 + big.len());
        assert!(plain.starts_with(b"{\"type\":\"PING\"}\n"));
    }

    #[test]
    fn tampering_and_wrong_peer_id_fail() {
        let (a, b) = handshake();
        let mut wire = Vec::new();
        a.writer().seal(b"hello", &mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert_eq!(
            b.reader().open(&wire, &mut Vec::new()),
            Err(SecureError::Frame)
        );
        let (alice, bob) = (Identity::from_seed(&[1; 32]), Identity::from_seed(&[2; 32]));
        let (dialer, first) = Handshake::initiate(&alice, Suite::Stream).unwrap();
        let (_, second) = Handshake::respond(&bob, Suite::Stream, "bob@U", &first).unwrap();
        let error = dialer
            .finish_initiator(&alice, "alice@U", "carol@U", &second)
            .unwrap_err();
        assert_eq!(error, SecureError::Binding("carol@U".into()));
    }
}
