//! Node identity: an ed25519 key pair whose public half names the node, the X25519 static key
//! its encrypted links use (derived from the same secret), and origin signatures on messages
//! (PROTOCOL.md section 4.1).
//!
//! No I/O: the secret comes in as 32 bytes; the runtime reads or creates the key file.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha512};

/// Domain string of the signature that binds a Noise static key to a node key and peer id.
const STATIC_BINDING: &[u8] = b"teia-noise-static-v1\n";
/// Domain string of origin signatures on messages.
const ORIGIN_SIGNATURE: &[u8] = b"teia-sig-v1\n";
/// Length of a signature in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Characters of the encoded key shown as its fingerprint.
const FINGERPRINT_CHARS: usize = 12;

/// A node's public key: its identity on the network.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

/// Why a key or signature could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64url of the right length.
    #[error("not a teia key: expected 43 characters of unpadded base64url (as `teia id` prints)")]
    Encoding,
    /// The bytes are not a valid ed25519 point.
    #[error("not a valid ed25519 public key")]
    Point,
}

impl PublicKey {
    /// Reads a key as printed by [`fmt::Display`] (unpadded base64url).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| KeyError::Encoding)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Encoding)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Point)?;
        Ok(Self(bytes))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short prefix of the encoded key, for listings.
    pub fn fingerprint(&self) -> String {
        let mut text = self.to_string();
        text.truncate(FINGERPRINT_CHARS);
        text
    }

    /// True when `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        key.verify(message, &signature).is_ok()
    }

    /// True when `signature` binds the Noise static key `noise_static` to this key and
    /// `peer_id`.
    pub fn verify_binding(&self, noise_static: &[u8], peer_id: &str, signature: &[u8]) -> bool {
        self.verify(&binding(noise_static, peer_id), signature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A node's secret key and what derives from it.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    public: PublicKey,
    noise_private: [u8; 32],
    noise_public: [u8; 32],
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public)
    }
}

impl Identity {
    /// The identity of the 32-byte secret `seed`. The Noise static key is derived from it
    /// (SHA-512 of a domain string and the seed), so one secret is all a node stores.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let public = PublicKey(signing.verifying_key().to_bytes());
        let digest = Sha512::new()
            .chain_update(b"teia-noise-static-key-v1")
            .chain_update(seed)
            .finalize();
        let mut noise_private = [0u8; 32];
        noise_private.copy_from_slice(digest.get(..32).unwrap_or(&[0u8; 32]));
        let noise_public =
            curve25519_dalek::MontgomeryPoint::mul_base_clamped(noise_private).to_bytes();
        Self {
            signing,
            public,
            noise_private,
            noise_public,
        }
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The X25519 private key of the node's encrypted links.
    pub fn noise_private(&self) -> &[u8; 32] {
        &self.noise_private
    }

    /// The X25519 public key of the node's encrypted links.
    pub fn noise_public(&self) -> &[u8; 32] {
        &self.noise_public
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.signing.sign(message).to_bytes()
    }

    /// The signature binding this node's Noise static key to its key and `peer_id`.
    pub fn sign_binding(&self, peer_id: &str) -> [u8; SIGNATURE_LEN] {
        self.sign(&binding(&self.noise_public, peer_id))
    }
}

fn binding(noise_static: &[u8], peer_id: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(STATIC_BINDING.len() + 32 + peer_id.len());
    message.extend_from_slice(STATIC_BINDING);
    message.extend_from_slice(noise_static);
    message.extend_from_slice(peer_id.as_bytes());
    message
}

/// The bytes an origin signature covers: a domain string, then `kind`, `msg_id`, `src`, `dst`
/// and the payload, each followed by `\n`. A string payload counts as its UTF-8 text; any
/// other payload as its compact JSON. The ttl is not covered (hops change it).
pub fn origin_message(
    kind: &str,
    msg_id: &str,
    src: &str,
    dst: &str,
    payload: Option<&serde_json::Value>,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(128);
    message.extend_from_slice(ORIGIN_SIGNATURE);
    for part in [kind, msg_id, src, dst] {
        message.extend_from_slice(part.as_bytes());
        message.push(b'\n');
    }
    match payload {
        Some(serde_json::Value::String(text)) => message.extend_from_slice(text.as_bytes()),
        Some(other) => message.extend_from_slice(other.to_string().as_bytes()),
        None => {}
    }
    message
}

/// Domain strings of the batch hash tree.
const LEAF: &[u8] = b"teia-leaf-v1\n";
const NODE: &[u8] = b"teia-node-v1\n";
const BATCH: &[u8] = b"teia-batch-v1\n";
/// Levels of a batch tree at most (batches of up to 2^16 messages).
pub const MAX_PROOF_LEVELS: usize = 16;

fn hash32(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.get(..32).unwrap_or(&[0u8; 32]));
    out
}

/// The leaf hash of a message in a signed batch: SHA-512, truncated to 32 bytes, of a
/// domain string and the message's [`origin_message`] bytes.
pub fn leaf_hash(origin: &[u8]) -> [u8; 32] {
    hash32(&[LEAF, origin])
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    hash32(&[NODE, left, right])
}

/// What a batch signature signs: a domain string and the batch's root.
pub fn batch_message(root: &[u8; 32]) -> Vec<u8> {
    [BATCH, root.as_slice()].concat()
}

/// The root of the tree over `leaves` (padded with zero leaves to a power of two) and, for
/// each leaf, its proof: the sibling hashes from the leaf up, concatenated.
pub fn batch_tree(leaves: &[[u8; 32]]) -> ([u8; 32], Vec<Vec<u8>>) {
    let width = leaves.len().max(1).next_power_of_two();
    let mut level: Vec<[u8; 32]> = leaves.to_vec();
    level.resize(width, [0u8; 32]);
    let mut proofs = vec![Vec::new(); leaves.len()];
    let mut positions: Vec<usize> = (0..leaves.len()).collect();
    while level.len() > 1 {
        for (proof, position) in proofs.iter_mut().zip(positions.iter_mut()) {
            if let Some(sibling) = level.get(*position ^ 1) {
                proof.extend_from_slice(sibling);
            }
            *position /= 2;
        }
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => node_hash(left, right),
                [single] => *single,
                _ => [0u8; 32],
            })
            .collect();
    }
    (level.first().copied().unwrap_or([0u8; 32]), proofs)
}

/// The root that `leaf` at `index` reaches with `proof` (sibling hashes from the leaf up);
/// `None` when the proof is malformed.
pub fn batch_root(leaf: [u8; 32], index: u32, proof: &[u8]) -> Option<[u8; 32]> {
    if !proof.len().is_multiple_of(32) || proof.len() / 32 > MAX_PROOF_LEVELS {
        return None;
    }
    if u64::from(index) >> (proof.len() / 32) != 0 {
        return None;
    }
    let mut hash = leaf;
    for (level, sibling) in proof.chunks(32).enumerate() {
        let sibling: [u8; 32] = sibling.try_into().ok()?;
        hash = if (index >> level) & 1 == 0 {
            node_hash(&hash, &sibling)
        } else {
            node_hash(&sibling, &hash)
        };
    }
    Some(hash)
}

/// Encodes bytes as unpadded base64url, as keys and signatures travel.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url; `None` when malformed.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_round_trip_and_sign() {
        let identity = Identity::from_seed(&[7; 32]);
        let key = identity.public_key();
        let text = key.to_string();
        assert_eq!(text.len(), 43);
        assert_eq!(PublicKey::parse(&text).unwrap(), key);
        assert!(text.starts_with(&key.fingerprint()));
        let message = origin_message("SEND", "m1", "a@U", "b@U", Some(&"oi".into()));
        let signature = identity.sign(&message);
        assert!(key.verify(&message, &signature));
        let forged = origin_message("SEND", "m1", "c@U", "b@U", Some(&"oi".into()));
        assert!(!key.verify(&forged, &signature));
        let binding = identity.sign_binding("a@U");
        assert!(key.verify_binding(identity.noise_public(), "a@U", &binding));
        assert!(!key.verify_binding(identity.noise_public(), "b@U", &binding));
    }

    #[test]
    fn every_leaf_of_a_batch_reaches_its_root() {
        for size in [1usize, 2, 3, 5, 8, 64] {
            let leaves: Vec<[u8; 32]> = (0..size).map(|i| leaf_hash(&[i as u8])).collect();
            let (root, proofs) = batch_tree(&leaves);
            for (i, (leaf, proof)) in leaves.iter().zip(&proofs).enumerate() {
                assert_eq!(batch_root(*leaf, i as u32, proof), Some(root), "{size}/{i}");
                assert_ne!(batch_root(leaf_hash(b"other"), i as u32, proof), Some(root));
            }
        }
        let (root, proofs) = batch_tree(&[leaf_hash(b"a"), leaf_hash(b"b")]);
        assert_ne!(batch_root(leaf_hash(b"a"), 1, &proofs[0]), Some(root));
        assert_eq!(batch_root(leaf_hash(b"a"), 2, &proofs[0]), None);
        assert_eq!(batch_root(leaf_hash(b"a"), 0, &[0u8; 31]), None);
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(PublicKey::parse("abc"), Err(KeyError::Encoding));
        assert_eq!(PublicKey::parse(&"A".repeat(44)), Err(KeyError::Encoding));
        assert!(!Identity::from_seed(&[1; 32])
            .public_key()
            .verify(b"x", b"short"));
    }
}
