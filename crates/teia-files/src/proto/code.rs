//! Short codes of one-shot transfers: `teia send` prints a code such as `7-maple-otter` that a
//! person can read out, and `teia receive 7-maple-otter` gets the sender's ticket with it,
//! as magic-wormhole does. The number (the *nameplate*) finds the sender at a rendezvous
//! (its record `NAMEPLATE@teia-codes`); the two words are a password that neither the
//! rendezvous nor anyone on the network learns: both ends run SPAKE2 on the whole code, the
//! receiver proves it derived the same key, and only then does the sender send the ticket,
//! sealed with that key. Whoever guesses gets one try: a wrong proof voids the code (the
//! ticket still works). Two words of 256 make a guess right once in 65,536.
//!
//! This module is the exchange without I/O: the code, the messages, and each side's steps.
//!
//! **Bounds**: a message line is at most [`MAX_LINE`] bytes; a code's sender answers one
//! exchange at a time, each within the time its runtime gives it; one wrong proof ends
//! the code.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use spake2::{Ed25519Group, Identity, Password, Spake2};

/// The rendezvous namespace where senders register their nameplates.
pub const NAMESPACE: &str = "teia-codes";
/// Nameplates are 1 to this.
pub const MAX_NAMEPLATE: u32 = 999;
/// Longest message line, `\n` included.
pub const MAX_LINE: usize = 8192;

/// The words of codes: short, distinct, easy to say.
pub const WORDS: [&str; 256] = [
    "acorn", "adobe", "agent", "alarm", "album", "alpine", "amber", "anchor", "angle", "apple",
    "apron", "arctic", "arena", "armor", "arrow", "atlas", "attic", "autumn", "avocado", "badge",
    "bagel", "bamboo", "banjo", "barley", "basil", "basket", "beacon", "beaver", "bishop",
    "blanket", "blossom", "bonfire", "bottle", "bramble", "breeze", "brick", "bridge", "bronze",
    "bucket", "buffalo", "bugle", "butter", "cabin", "cactus", "camel", "canal", "candle", "canoe",
    "canyon", "carbon", "carpet", "castle", "cedar", "cello", "chalk", "cherry", "chess",
    "chimney", "cider", "cinnamon", "circus", "citrus", "cliff", "clover", "cobalt", "cocoa",
    "comet", "compass", "copper", "coral", "cotton", "cougar", "crater", "crayon", "cricket",
    "crystal", "cupcake", "dahlia", "daisy", "delta", "desert", "diamond", "dolphin", "domino",
    "dragon", "drum", "eagle", "easel", "echo", "eclipse", "elbow", "ember", "emerald", "engine",
    "falcon", "feather", "fern", "ferry", "fiddle", "fig", "flute", "forest", "fossil", "fountain",
    "fox", "galaxy", "garden", "garnet", "gazelle", "geyser", "ginger", "glacier", "globe",
    "goblet", "granite", "grape", "gravel", "guitar", "hammock", "harbor", "harp", "hazel",
    "hedge", "helmet", "heron", "hickory", "honey", "horizon", "husky", "igloo", "indigo", "iris",
    "island", "ivory", "jacket", "jaguar", "jasmine", "jelly", "jigsaw", "jungle", "juniper",
    "kayak", "kernel", "kettle", "kiwi", "koala", "ladder", "lagoon", "lantern", "lava", "lemon",
    "lilac", "linen", "lizard", "lobster", "locket", "lotus", "magnet", "mango", "maple", "marble",
    "meadow", "melon", "meteor", "mint", "mirror", "mosaic", "moss", "muffin", "mustard", "nectar",
    "needle", "nickel", "noodle", "nutmeg", "oasis", "oboe", "ocean", "olive", "onyx", "orbit",
    "orchid", "otter", "oyster", "paddle", "panda", "papaya", "parrot", "pebble", "pepper",
    "piano", "pigeon", "pillow", "pine", "pirate", "planet", "plum", "pocket", "polar", "pony",
    "poppy", "prism", "puffin", "pumpkin", "quartz", "quill", "quilt", "rabbit", "radar", "radish",
    "raven", "reef", "ribbon", "river", "robin", "rocket", "saddle", "saffron", "salmon",
    "sapphire", "satchel", "scarf", "shell", "sierra", "silver", "sketch", "sloth", "spruce",
    "squid", "stable", "summit", "sunset", "swan", "tango", "teapot", "thistle", "thunder",
    "tiger", "timber", "toast", "topaz", "tulip", "tundra", "turnip", "umbrella", "valley",
    "velvet", "violet", "violin", "walnut", "walrus", "willow", "window", "yogurt", "zebra",
    "zephyr",
];

/// Who the sender is to SPAKE2.
const SENDER: &[u8] = b"teia code sender";
/// Who the receiver is to SPAKE2.
const RECEIVER: &[u8] = b"teia code receiver";
/// Key derivation contexts.
const CONFIRM_CONTEXT: &str = "teia code v1 receiver confirms";
const SEAL_CONTEXT: &str = "teia code v1 ticket";

/// A short code: a nameplate and two words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// Which sender (its rendezvous record's name).
    pub nameplate: u32,
    /// The password.
    pub words: [&'static str; 2],
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.nameplate, self.words[0], self.words[1])
    }
}

/// Why a code exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The text is not a code.
    #[error("not a code (a code is a number and two words, like 7-maple-otter)")]
    NotACode,
    /// No randomness to draw a code with.
    #[error("no randomness to draw a code")]
    NoRandomness,
    /// The other side sent something else than the exchange's next message.
    #[error("the other side does not follow the code exchange ({0})")]
    Protocol(&'static str),
    /// The keys differ: the code was wrong (or typed wrong).
    #[error("wrong code: the sender refused it, and the code is void now; ask for a new one or for the ticket")]
    WrongCode,
    /// The sender refused the exchange.
    #[error("the sender refused: {0}")]
    Refused(String),
}

impl Code {
    /// A code for `nameplate` with two random words.
    pub fn random(nameplate: u32) -> Result<Self, CodeError> {
        let mut pick = [0u8; 2];
        getrandom::fill(&mut pick).map_err(|_| CodeError::NoRandomness)?;
        Ok(Self {
            nameplate,
            // 256 words: every byte picks one.
            words: pick.map(|byte| WORDS.get(usize::from(byte)).copied().unwrap_or("acorn")),
        })
    }

    /// Reads `text` as a code (case and surrounding spaces ignored).
    pub fn parse(text: &str) -> Result<Self, CodeError> {
        let text = text.trim().to_ascii_lowercase();
        let mut parts = text.split('-');
        let (Some(number), Some(first), Some(second), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CodeError::NotACode);
        };
        let nameplate: u32 = number.parse().map_err(|_| CodeError::NotACode)?;
        if nameplate == 0 || nameplate > MAX_NAMEPLATE {
            return Err(CodeError::NotACode);
        }
        let word = |w: &str| {
            WORDS
                .iter()
                .find(|known| **known == w)
                .copied()
                .ok_or(CodeError::NotACode)
        };
        Ok(Self {
            nameplate,
            words: [word(first)?, word(second)?],
        })
    }

    fn password(&self) -> Password {
        Password::new(self.to_string().as_bytes())
    }
}

/// Longest LAN datagram of codes.
pub const MAX_LAN_DATAGRAM: usize = 256;

/// A datagram that finds a code's sender on the LAN, on the port of LAN discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LanMessage {
    /// Broadcast by a receiver (or a sender choosing its number): who has this nameplate?
    #[serde(rename = "CODE_WHERE")]
    Where {
        /// The nameplate.
        nameplate: u32,
    },
    /// A sender's answer, unicast: its exchanges are on `port` of the address it answers from.
    #[serde(rename = "CODE_HERE")]
    Here {
        /// The nameplate.
        nameplate: u32,
        /// Its TCP port for exchanges.
        port: u16,
    },
}

impl LanMessage {
    /// The datagram.
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a datagram; `None` for anything else (LAN discovery's own datagrams included).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_LAN_DATAGRAM {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }
}

/// A message of the exchange, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CodeMessage {
    /// A side's SPAKE2 message (base64url), the receiver's first.
    #[serde(rename = "CODE_PAKE")]
    Pake {
        /// The message.
        pake: String,
    },
    /// The receiver's proof that it holds the key (base64url of 32 bytes).
    #[serde(rename = "CODE_CONFIRM")]
    Confirm {
        /// The proof.
        confirm: String,
    },
    /// The ticket, sealed with the key (base64url).
    #[serde(rename = "CODE_TICKET")]
    Ticket {
        /// The sealed ticket.
        sealed: String,
    },
    /// The sender refuses (`wrong_code`, `bad_request`).
    #[serde(rename = "ERROR")]
    Error {
        /// The code.
        error: String,
        /// For people.
        message: String,
    },
}

impl CodeMessage {
    /// The message as a line, `\n` included.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Reads one line (without its `\n`).
    pub fn parse(line: &[u8]) -> Result<Self, CodeError> {
        serde_json::from_slice(line).map_err(|_| CodeError::Protocol("not a code message"))
    }
}

/// The receiver's side: [`Receiver::start`], then [`Receiver::on_pake`] with the sender's
/// answer, then [`Receiver::on_ticket`].
pub struct Receiver {
    spake: Option<Spake2<Ed25519Group>>,
    key: Option<Vec<u8>>,
}

impl Receiver {
    /// Starts with `code`; returns the first message to send.
    pub fn start(code: &Code) -> (Self, CodeMessage) {
        let (spake, outbound) = Spake2::<Ed25519Group>::start_b(
            &code.password(),
            &Identity::new(SENDER),
            &Identity::new(RECEIVER),
        );
        let message = CodeMessage::Pake {
            pake: teia_core::identity::encode(&outbound),
        };
        (
            Self {
                spake: Some(spake),
                key: None,
            },
            message,
        )
    }

    /// The sender's SPAKE2 message: returns the proof to send.
    pub fn on_pake(&mut self, message: CodeMessage) -> Result<CodeMessage, CodeError> {
        let spake = self
            .spake
            .take()
            .ok_or(CodeError::Protocol("CODE_PAKE twice"))?;
        let key = finish(spake, message)?;
        let confirm = blake3::derive_key(CONFIRM_CONTEXT, &key);
        self.key = Some(key);
        Ok(CodeMessage::Confirm {
            confirm: teia_core::identity::encode(&confirm),
        })
    }

    /// The sender's last message: the ticket's text.
    pub fn on_ticket(&self, message: CodeMessage) -> Result<String, CodeError> {
        let key = self
            .key
            .as_ref()
            .ok_or(CodeError::Protocol("CODE_TICKET first"))?;
        match message {
            CodeMessage::Ticket { sealed } => {
                let sealed = teia_core::identity::decode(&sealed)
                    .ok_or(CodeError::Protocol("sealed ticket not base64url"))?;
                let opened = cipher(key)
                    .decrypt(&NONCE.into(), sealed.as_slice())
                    .map_err(|_| CodeError::WrongCode)?;
                String::from_utf8(opened).map_err(|_| CodeError::Protocol("ticket not text"))
            }
            CodeMessage::Error { error, .. } if error == "wrong_code" => Err(CodeError::WrongCode),
            CodeMessage::Error { message, .. } => Err(CodeError::Refused(message)),
            _ => Err(CodeError::Protocol("CODE_TICKET expected")),
        }
    }
}

/// The sender's side: [`Sender::on_pake`] with the receiver's first message, then
/// [`Sender::on_confirm`]; a wrong proof voids the code.
pub struct Sender {
    spake: Option<Spake2<Ed25519Group>>,
    outbound: Vec<u8>,
    key: Option<Vec<u8>>,
}

impl Sender {
    /// Starts with `code`, for one exchange.
    pub fn new(code: &Code) -> Self {
        let (spake, outbound) = Spake2::<Ed25519Group>::start_a(
            &code.password(),
            &Identity::new(SENDER),
            &Identity::new(RECEIVER),
        );
        Self {
            spake: Some(spake),
            outbound,
            key: None,
        }
    }

    /// The receiver's SPAKE2 message: returns ours.
    pub fn on_pake(&mut self, message: CodeMessage) -> Result<CodeMessage, CodeError> {
        let spake = self
            .spake
            .take()
            .ok_or(CodeError::Protocol("CODE_PAKE twice"))?;
        self.key = Some(finish(spake, message)?);
        Ok(CodeMessage::Pake {
            pake: teia_core::identity::encode(&self.outbound),
        })
    }

    /// The receiver's proof: the sealed `ticket` if it holds our key, else
    /// [`CodeError::WrongCode`] (the code is then void).
    pub fn on_confirm(&self, message: CodeMessage, ticket: &str) -> Result<CodeMessage, CodeError> {
        let key = self
            .key
            .as_ref()
            .ok_or(CodeError::Protocol("CODE_PAKE first"))?;
        let CodeMessage::Confirm { confirm } = message else {
            return Err(CodeError::Protocol("CODE_CONFIRM expected"));
        };
        let expected = blake3::Hash::from(blake3::derive_key(CONFIRM_CONTEXT, key));
        let given = teia_core::identity::decode(&confirm)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(blake3::Hash::from);
        // blake3::Hash compares in constant time.
        if given != Some(expected) {
            return Err(CodeError::WrongCode);
        }
        let sealed = cipher(key)
            .encrypt(&NONCE.into(), ticket.as_bytes())
            .map_err(|_| CodeError::Protocol("ticket too long"))?;
        Ok(CodeMessage::Ticket {
            sealed: teia_core::identity::encode(&sealed),
        })
    }
}

/// The sealing key is used once: its nonce can be fixed.
const NONCE: [u8; 12] = [0; 12];

fn cipher(key: &[u8]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(&blake3::derive_key(SEAL_CONTEXT, key).into())
}

fn finish(spake: Spake2<Ed25519Group>, message: CodeMessage) -> Result<Vec<u8>, CodeError> {
    let CodeMessage::Pake { pake } = message else {
        return Err(CodeError::Protocol("CODE_PAKE expected"));
    };
    let inbound =
        teia_core::identity::decode(&pake).ok_or(CodeError::Protocol("CODE_PAKE not base64url"))?;
    spake
        .finish(&inbound)
        .map_err(|_| CodeError::Protocol("CODE_PAKE malformed"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn exchange(sender_code: &Code, receiver_code: &Code) -> Result<String, CodeError> {
        let mut sender = Sender::new(sender_code);
        let (mut receiver, first) = Receiver::start(receiver_code);
        let answer = sender.on_pake(first)?;
        let confirm = receiver.on_pake(answer)?;
        let sealed = sender.on_confirm(confirm, "teia1ticket")?;
        receiver.on_ticket(sealed)
    }

    #[test]
    fn the_right_code_gets_the_ticket() {
        let code = Code::random(7).unwrap();
        assert_eq!(exchange(&code, &code).unwrap(), "teia1ticket");
    }

    #[test]
    fn a_wrong_word_or_nameplate_gets_nothing() {
        let code = Code::parse("7-maple-otter").unwrap();
        for wrong in ["7-maple-panda", "8-maple-otter", "7-otter-maple"] {
            let wrong = Code::parse(wrong).unwrap();
            assert_eq!(exchange(&code, &wrong), Err(CodeError::WrongCode));
        }
    }

    #[test]
    fn codes_read_back_and_junk_is_refused() {
        let code = Code::random(999).unwrap();
        assert_eq!(Code::parse(&code.to_string()).unwrap(), code);
        assert_eq!(
            Code::parse(" 12-Maple-OTTER ").unwrap().to_string(),
            "12-maple-otter"
        );
        for junk in [
            "",
            "7",
            "7-maple",
            "0-maple-otter",
            "1000-maple-otter",
            "7-maple-otter-fox",
            "x-maple-otter",
            "7-maple-unknownword",
            "teia1abc",
        ] {
            assert_eq!(Code::parse(junk), Err(CodeError::NotACode), "{junk}");
        }
    }

    #[test]
    fn the_words_are_distinct() {
        let distinct: std::collections::HashSet<_> = WORDS.iter().collect();
        assert_eq!(distinct.len(), WORDS.len());
        assert!(WORDS
            .iter()
            .all(|w| w.chars().all(|c| c.is_ascii_lowercase())));
    }

    #[test]
    fn a_forged_confirm_or_message_is_refused() {
        let code = Code::random(3).unwrap();
        let mut sender = Sender::new(&code);
        let (_, first) = Receiver::start(&code);
        sender.on_pake(first).unwrap();
        let forged = CodeMessage::Confirm {
            confirm: teia_core::identity::encode(&[0u8; 32]),
        };
        assert_eq!(sender.on_confirm(forged, "t"), Err(CodeError::WrongCode));
        let mut fresh = Sender::new(&code);
        for junk in [
            CodeMessage::Pake { pake: "!!".into() },
            CodeMessage::Pake {
                pake: teia_core::identity::encode(&[1, 2, 3]),
            },
            CodeMessage::Confirm {
                confirm: String::new(),
            },
        ] {
            assert!(matches!(fresh.on_pake(junk), Err(CodeError::Protocol(_))));
            fresh = Sender::new(&code);
        }
    }
}
