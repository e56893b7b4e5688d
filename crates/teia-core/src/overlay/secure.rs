//! Encrypted links (PROTOCOL.md section 4.1) and data streams (section 6): the Noise XX
//! handshake carried in HELLO, HELLO_OK and NOISE (or STREAM, STREAM_OK and NOISE), and the
//! framing of the encrypted bytes that follow it.
//!
//! No I/O: [`SecureWriter`] and [`SecureReader`] turn plaintext into frames and back for the
//! runtime's link tasks, with their nonces counted here.

use std::sync::Arc;

use ring::aead;

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

/// The symmetric keys of one encrypted link or stream (Noise's split: one key each way),
/// shared by its reader and writer. Frames are sealed and opened in place with `ring`,
/// exactly as Noise's transport messages (empty associated data; ChaChaPoly's nonce is the
/// counter little-endian, AESGCM's big-endian, after 4 zero bytes).
#[derive(Clone)]
pub struct LinkCipher(Arc<Keys>);

struct Keys {
    send: aead::LessSafeKey,
    receive: aead::LessSafeKey,
    suite: Suite,
}

impl Keys {
    fn new(suite: Suite, send: &[u8; 32], receive: &[u8; 32]) -> Result<Self, SecureError> {
        let algorithm = match suite {
            Suite::Link => &aead::CHACHA20_POLY1305,
            Suite::Stream => &aead::AES_256_GCM,
        };
        let key = |bytes: &[u8; 32]| {
            aead::UnboundKey::new(algorithm, bytes)
                .map(aead::LessSafeKey::new)
                .map_err(|_| SecureError::Noise("cipher key refused".into()))
        };
        Ok(Self {
            send: key(send)?,
            receive: key(receive)?,
            suite,
        })
    }

    /// Noise's nonce for counter `n`: 4 zero bytes, then `n` in the cipher's byte order.
    fn nonce(&self, n: u64) -> aead::Nonce {
        let counter = match self.suite {
            Suite::Link => n.to_le_bytes(),
            Suite::Stream => n.to_be_bytes(),
        };
        let mut bytes = [0u8; aead::NONCE_LEN];
        if let Some(tail) = bytes.get_mut(4..) {
            tail.copy_from_slice(&counter);
        }
        aead::Nonce::assume_unique_for_key(bytes)
    }
}

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
/// ciphertext and tag, nonce counting from 0.
pub struct SecureWriter {
    cipher: LinkCipher,
    nonce: u64,
}

impl SecureWriter {
    fn next_nonce(&mut self) -> Result<aead::Nonce, SecureError> {
        let nonce = self.cipher.0.nonce(self.nonce);
        self.nonce = self.nonce.checked_add(1).ok_or(SecureError::Exhausted)?;
        Ok(nonce)
    }

    /// Appends the frames carrying `plaintext` to `out` (copied once, then sealed in place).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        for chunk in plaintext.chunks(FRAME_PLAINTEXT) {
            self.seal_frame(chunk.len(), out, |room| room.copy_from_slice(chunk))?;
        }
        Ok(())
    }

    /// Appends the frames carrying `len` bytes that `fill` writes straight into `out`, a
    /// frame's worth at a time in order (so bytes read from a file are never copied before
    /// they are sealed); stops at the first error of `fill`.
    pub fn seal_from<E>(
        &mut self,
        len: usize,
        out: &mut Vec<u8>,
        mut fill: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, SecureError> {
        let mut left = len;
        while left > 0 {
            let take = left.min(FRAME_PLAINTEXT);
            let mut failed = None;
            self.seal_frame(take, out, |room| {
                if let Err(e) = fill(room) {
                    failed = Some(e);
                }
            })?;
            if let Some(e) = failed {
                return Ok(Err(e));
            }
            left -= take;
        }
        Ok(Ok(()))
    }

    /// Appends one frame of `len` (at most [`FRAME_PLAINTEXT`]) plaintext bytes, which
    /// `write` puts in place before they are sealed.
    fn seal_frame(
        &mut self,
        len: usize,
        out: &mut Vec<u8>,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<(), SecureError> {
        let prefix = u16::try_from(len + TAG).map_err(|_| SecureError::Frame)?;
        let nonce = self.next_nonce()?;
        out.extend_from_slice(&prefix.to_be_bytes());
        let start = out.len();
        out.resize(start + len, 0);
        let body = out.get_mut(start..).unwrap_or_default();
        write(body);
        let tag = self
            .cipher
            .0
            .send
            .seal_in_place_separate_tag(nonce, aead::Aad::empty(), body)
            .map_err(|_| SecureError::Frame)?;
        out.extend_from_slice(tag.as_ref());
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
    /// carry; keeps an incomplete frame for the next call.
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
            self.open_copied(&frame, plaintext)?;
        }
        let used = self.open_copied(input, plaintext)?;
        self.pending
            .extend_from_slice(input.get(used..).unwrap_or_default());
        Ok(())
    }

    /// Opens the complete frames at the start of `input` into `plaintext` (each copied
    /// once, then opened in place); returns the bytes they took.
    fn open_copied(&mut self, input: &[u8], plaintext: &mut Vec<u8>) -> Result<usize, SecureError> {
        let mut used = 0;
        while let Some(len) = complete_frame(input.get(used..).unwrap_or_default()) {
            let sealed = input.get(used + 2..used + 2 + len).unwrap_or_default();
            let start = plaintext.len();
            plaintext.extend_from_slice(sealed);
            let opened = self.open_one(plaintext.get_mut(start..).unwrap_or_default(), 0)?;
            plaintext.truncate(start + opened);
            used += 2 + len;
        }
        Ok(used)
    }

    /// Opens, in place, the complete frames that start at `buffer[from..]`, moving their
    /// plaintext to the start of `buffer` (no copy besides the decryption's own); returns
    /// the plaintext bytes now at its start and where the frames opened end. An incomplete
    /// frame is left where it was: the caller keeps it for when its end arrives.
    pub fn open_in_place(
        &mut self,
        buffer: &mut [u8],
        from: usize,
    ) -> Result<(usize, usize), SecureError> {
        let (mut written, mut used) = (0, from);
        while let Some(len) = complete_frame(buffer.get(used..).unwrap_or_default()) {
            let frame_end = used + 2 + len;
            let in_out = buffer.get_mut(written..frame_end).unwrap_or_default();
            written += self.open_one(in_out, used + 2 - written)?;
            used = frame_end;
        }
        Ok((written, used))
    }

    /// Opens the frame body at `in_out[from..]` (ciphertext and tag), its plaintext moved
    /// to the start of `in_out`; returns the plaintext's length.
    fn open_one(&mut self, in_out: &mut [u8], from: usize) -> Result<usize, SecureError> {
        let nonce = self.cipher.0.nonce(self.nonce);
        self.nonce = self.nonce.checked_add(1).ok_or(SecureError::Exhausted)?;
        self.cipher
            .0
            .receive
            .open_within(nonce, aead::Aad::empty(), in_out, from..)
            .map(|plain| plain.len())
            .map_err(|_| SecureError::Frame)
    }
}

/// The body length of the frame at the start of `bytes`, when all of it is there.
fn complete_frame(bytes: &[u8]) -> Option<usize> {
    let &[high, low] = bytes.get(..2)? else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    (bytes.len() >= 2 + len).then_some(len)
}

/// Which side of the handshake this node took.
#[derive(Clone, Copy)]
enum Role {
    Initiator,
    Responder,
}

/// A Noise XX handshake in progress on one link or stream.
pub struct Handshake {
    state: Box<snow::HandshakeState>,
    suite: Suite,
}

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
        let state = Box::new(state);
        Ok((Self { state, suite }, out))
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
        let state = Box::new(state);
        Ok((Self { state, suite }, out))
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
            .state
            .write_message(&payload(identity, our_peer_id), &mut out)?;
        out.truncate(len);
        let cipher = self.cipher(Role::Initiator)?;
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
        let cipher = self.cipher(Role::Responder)?;
        Ok((key, cipher))
    }

    /// The transport keys of a finished handshake: Noise's split gives the initiator's
    /// sending key first.
    fn cipher(mut self, role: Role) -> Result<LinkCipher, SecureError> {
        if !self.state.is_handshake_finished() {
            return Err(SecureError::Noise("the handshake is not finished".into()));
        }
        let (initiator, responder) = self.state.dangerously_get_raw_split();
        let keys = match role {
            Role::Initiator => Keys::new(self.suite, &initiator, &responder)?,
            Role::Responder => Keys::new(self.suite, &responder, &initiator)?,
        };
        Ok(LinkCipher(Arc::new(keys)))
    }

    /// Reads a message carrying the peer's payload; checks that its key signs the Noise
    /// static key just proven, with `peer_id`.
    fn read_peer(&mut self, message: &[u8], peer_id: &str) -> Result<PublicKey, SecureError> {
        let mut scratch = vec![0; NOISE_MAX];
        let len = self.state.read_message(message, &mut scratch)?;
        let payload = scratch.get(..len).ok_or(SecureError::Payload)?;
        if payload.len() != PAYLOAD_LEN {
            return Err(SecureError::Payload);
        }
        let (key, signature) = payload.split_at(32);
        let key = crate::identity::encode(key);
        let key = PublicKey::parse(&key).map_err(|_| SecureError::Payload)?;
        let remote_static = self.state.get_remote_static().ok_or(SecureError::Payload)?;
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
    fn frames_are_noise_transport_messages() {
        for suite in [Suite::Link, Suite::Stream] {
            let (alice, bob) = (Identity::from_seed(&[1; 32]), Identity::from_seed(&[2; 32]));
            let (mut dialer, first) = Handshake::initiate(&alice, suite).unwrap();
            let (listener, second) = Handshake::respond(&bob, suite, "bob@U", &first).unwrap();
            dialer.read_peer(&second, "bob@U").unwrap();
            let mut third = vec![0; NOISE_MAX];
            let len = dialer
                .state
                .write_message(&payload(&alice, "alice@U"), &mut third)
                .unwrap();
            third.truncate(len);
            let (_, ours) = listener.finish_responder("alice@U", &third).unwrap();
            let snow = dialer.state.into_stateless_transport_mode().unwrap();
            for nonce in 0..3u64 {
                let mut sealed = vec![0; 64];
                let len = snow.write_message(nonce, b"hello", &mut sealed).unwrap();
                let mut wire = u16::try_from(len).unwrap().to_be_bytes().to_vec();
                wire.extend_from_slice(&sealed[..len]);
                let mut reader = ours.reader();
                reader.nonce = nonce;
                let mut plain = Vec::new();
                reader.open(&wire, &mut plain).unwrap();
                assert_eq!(plain, b"hello", "{suite:?} nonce {nonce}");
                let mut writer = ours.writer();
                writer.nonce = nonce;
                let mut wire = Vec::new();
                writer.seal(b"world", &mut wire).unwrap();
                let mut out = vec![0; 64];
                let len = snow.read_message(nonce, &wire[2..], &mut out).unwrap();
                assert_eq!(&out[..len], b"world", "{suite:?} nonce {nonce}");
            }
        }
    }

    #[test]
    fn frames_open_in_place_in_any_cut() {
        let (a, b) = handshake();
        let mut writer = a.writer();
        let mut wire = Vec::new();
        let big: Vec<u8> = (0..FRAME_PLAINTEXT * 2 + 77).map(|i| i as u8).collect();
        writer.seal(b"line\n", &mut wire).unwrap();
        let mut offset = 0u8;
        let filled = writer
            .seal_from(big.len(), &mut wire, |room| {
                for byte in room.iter_mut() {
                    *byte = offset;
                    offset = offset.wrapping_add(1);
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(filled, Ok(()));
        for cut in [1, 7, 4096, 70_000, wire.len()] {
            let mut reader = b.reader();
            let (mut buffer, mut plain) = (Vec::new(), Vec::new());
            for piece in wire.chunks(cut) {
                buffer.extend_from_slice(piece);
                let (opened, used) = reader.open_in_place(&mut buffer, 0).unwrap();
                plain.extend_from_slice(&buffer[..opened]);
                buffer.drain(..used);
            }
            assert!(buffer.is_empty());
            assert_eq!(&plain[..5], b"line\n");
            assert_eq!(&plain[5..], &big[..], "cut {cut}");
        }
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
