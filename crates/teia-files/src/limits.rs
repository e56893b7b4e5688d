//! Rates and counts the file-sharing service keeps to: the node-wide upload limit
//! ([`Throttle`]), token buckets for what peers may ask ([`Budget`]), the streams served at
//! once ([`Serving`]), and summaries of repeated log lines ([`LogSummary`]). Each holds a
//! few numbers, whatever comes; [`Serving`] one count per peer served now, at most
//! [`MAX_SERVING`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use teia_node::sync::lock;

/// The node-wide upload limit: a token bucket in bytes (burst of a quarter second).
pub(crate) struct Throttle {
    rate: u64,
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl Throttle {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            bucket: std::sync::Mutex::new((0.0, std::time::Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn take(&self, bytes: usize) {
        let wait = {
            let mut bucket = lock(&self.bucket);
            let now = std::time::Instant::now();
            let rate = self.rate as f64;
            let refill = now.duration_since(bucket.1).as_secs_f64() * rate;
            bucket.0 = (bucket.0 + refill).min(rate / 4.0) - bytes as f64;
            bucket.1 = now;
            (bucket.0 < 0.0).then(|| Duration::from_secs_f64(-bucket.0 / rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved.
pub(crate) struct Budget {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: std::time::Instant,
}

impl Budget {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            at: std::time::Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// One kind of repeated log line, summarised: the first occurrence is logged at once, the
/// next ones are counted, and one line with their count is due at most once per `period`
/// (at the first occurrence after it). Its state is two numbers, however many come.
#[derive(Debug)]
pub(crate) struct LogSummary {
    period: Duration,
    last: Option<Instant>,
    count: u64,
}

impl LogSummary {
    /// A summary of at most one line per `period`.
    pub(crate) fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            count: 0,
        }
    }

    /// Counts one occurrence at `now`; returns how many to report when a line is due
    /// (this one included), `None` while they are being counted.
    pub(crate) fn occurred(&mut self, now: Instant) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.period)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Streams served at once.
pub const MAX_SERVING: usize = 64;
/// Streams served to one peer at once.
pub const MAX_STREAMS_PER_PEER: usize = 4;

/// The streams served now, per peer.
#[derive(Default)]
pub(crate) struct Serving {
    per_peer: HashMap<String, usize>,
    total: usize,
}

impl Serving {
    /// Counts one more stream to `peer`; false (not counted) when [`MAX_SERVING`] streams
    /// are served, or [`MAX_STREAMS_PER_PEER`] to this peer.
    pub(crate) fn take(&mut self, peer: &str) -> bool {
        let mine = self.per_peer.get(peer).copied().unwrap_or(0);
        if self.total >= MAX_SERVING || mine >= MAX_STREAMS_PER_PEER {
            return false;
        }
        self.per_peer.insert(peer.to_owned(), mine + 1);
        self.total += 1;
        true
    }

    /// A stream to `peer` counted by [`Serving::take`] is over.
    pub(crate) fn release(&mut self, peer: &str) {
        if let Some(count) = self.per_peer.get_mut(peer) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.per_peer.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_counts_streams_per_peer_and_in_all_and_frees_them() {
        let mut serving = Serving::default();
        for _ in 0..MAX_STREAMS_PER_PEER {
            assert!(serving.take("a"));
        }
        assert!(!serving.take("a"), "one more than a peer may have");
        serving.release("a");
        assert!(serving.take("a"), "a freed slot serves again");
        let mut peers = 1;
        while serving.take(&format!("p{peers}")) {
            peers += 1;
        }
        assert_eq!(serving.total, MAX_SERVING);
        serving.release("ghost");
        assert_eq!(
            serving.total, MAX_SERVING,
            "a peer never served frees nothing"
        );
        serving.release("a");
        assert!(serving.take("new"));
    }
}
