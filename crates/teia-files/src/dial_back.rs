//! Dial-backs: a holder we cannot dial opens a stream to us (or meets us through a splice at
//! a neighbour), and we open streams back to askers that cannot dial us. [`DialBacks`] owns
//! the requests of ours waiting for their stream and the budget of streams we open back;
//! asking is an operation of the service's state (`state.rs`), which owns the node handle.
//!
//! **Bounds**: [`MAX_DIAL_BACKS_WAITING`] requests of ours wait at once (one more fails at
//! once with [`DialBackError::TooMany`]), each at most [`DIAL_BACK_TIMEOUT`]; we open back
//! [`DIAL_BACKS_PER_MINUTE`] streams a minute at most (bursts of [`DIAL_BACK_BURST`]; more
//! requests are ignored).

use std::collections::HashMap;
use std::time::Duration;

use teia_core::identity::PublicKey;
use teia_node::stream::DataStream;
use tokio::sync::oneshot;

use crate::limits::Budget;

/// Streams this node opens back to askers (when it cannot be dialed), per minute at most;
/// requests beyond are ignored.
pub const DIAL_BACKS_PER_MINUTE: f64 = 10.0;
/// Our dial-back requests waiting at once; more fail at once.
pub const MAX_DIAL_BACKS_WAITING: usize = 64;
/// Time a holder has to open a stream back to us.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams we may open back at once after a quiet spell.
pub const DIAL_BACK_BURST: f64 = 5.0;

/// A dial-back request heard: what to serve, to whom, and how to reach it.
pub(crate) struct DialBack {
    pub(crate) hash: String,
    pub(crate) key: String,
    pub(crate) addrs: Vec<String>,
    pub(crate) token: String,
    /// For a splice: the relays the asker asked.
    pub(crate) relays: Option<Vec<String>>,
}

/// Who a dial-back request expects, and who waits for its stream.
type Waiter = (PublicKey, oneshot::Sender<DataStream>);

/// Our dial-back requests waiting for their stream, and the streams we may open back.
pub(crate) struct DialBacks {
    /// Token → the holder key expected and the waiter.
    waiting: HashMap<String, Waiter>,
    /// Streams we may still open back to askers.
    budget: Budget,
    /// Tokens made so far (each token covers its number).
    issued: u64,
}

impl Default for DialBacks {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            budget: Budget::new(DIAL_BACKS_PER_MINUTE / 60.0, DIAL_BACK_BURST),
            issued: 0,
        }
    }
}

impl DialBacks {
    /// A fresh token no one can guess, for a request of ours signed by `key`.
    pub(crate) fn token(&mut self, key: &PublicKey) -> String {
        self.issued += 1;
        let seed = format!("{key}:{}:{:?}", self.issued, std::time::SystemTime::now());
        blake3::hash(seed.as_bytes())
            .to_hex()
            .chars()
            .take(32)
            .collect()
    }

    /// Waits for the stream of request `token` from the holder proving `key`; `None` when
    /// [`MAX_DIAL_BACKS_WAITING`] requests wait already.
    pub(crate) fn expect(
        &mut self,
        token: &str,
        key: PublicKey,
    ) -> Option<oneshot::Receiver<DataStream>> {
        if self.waiting.len() >= MAX_DIAL_BACKS_WAITING {
            return None;
        }
        let (reply, stream) = oneshot::channel();
        self.waiting.insert(token.to_owned(), (key, reply));
        Some(stream)
    }

    /// Forgets request `token` (answered, timed out or abandoned).
    pub(crate) fn forget(&mut self, token: &str) {
        self.waiting.remove(token);
    }

    /// The request a stream offering `token` answers, taken out of those waiting.
    pub(crate) fn answered(&mut self, token: &str) -> Option<Waiter> {
        self.waiting.remove(token)
    }

    /// Whether we may open one more stream back now (and count it).
    pub(crate) fn may_open_back(&mut self) -> bool {
        self.budget.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wait_up_to_the_bound_and_each_is_answered_once() {
        let key = teia_core::identity::Identity::from_seed(&[7; 32]).public_key();
        let mut dial_backs = DialBacks::default();
        let first = dial_backs.token(&key);
        assert_ne!(first, dial_backs.token(&key), "tokens differ");
        let _stream = dial_backs.expect(&first, key).expect("room to wait");
        assert!(dial_backs.answered(&first).is_some());
        assert!(dial_backs.answered(&first).is_none(), "answered once");
        let mut waiting = Vec::new();
        for n in 0..MAX_DIAL_BACKS_WAITING {
            waiting.push(dial_backs.expect(&n.to_string(), key).expect("room"));
        }
        assert!(dial_backs.expect("one more", key).is_none());
        dial_backs.forget("0");
        assert!(dial_backs.expect("one more", key).is_some());
    }
}
