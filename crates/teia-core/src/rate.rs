//! Per-source rate limiting by token bucket, with a bounded table of sources. Sans-IO: the
//! caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;

/// A monotonic time in milliseconds, from any origin the caller keeps fixed.
pub type Millis = u64;

/// Token buckets per source: each source may make `burst` requests at once and `per_second`
/// requests per second sustained.
///
/// The table tracks at most `max_sources` sources. When it is full, sources whose buckets
/// have refilled (idle ones) are forgotten; if none has, a new source is refused until one
/// does, so a flood of new sources cannot grow memory.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: u32,
    burst: u32,
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens, in thousandths of a request.
    milli_tokens: u64,
    /// Requests taken on credit ([`RateLimiter::take_paced`]), in thousandths: the refill
    /// repays them before it adds tokens.
    milli_debt: u64,
    updated: Millis,
}

/// What [`RateLimiter::take_paced`] decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// Within the rate.
    Free,
    /// Taken on credit: the source should be slowed down (not heard) for this many
    /// milliseconds, until its credit is repaid.
    Wait(Millis),
    /// Beyond the credit too (a burst's worth): refused.
    Refused,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter allowing `per_second` sustained and `burst` at once (at least 1 each).
    pub fn new(per_second: u32, burst: u32, max_sources: usize) -> Self {
        Self {
            per_second: per_second.max(1),
            burst: burst.max(1),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Number of sources tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Takes one token for `source` at `now`; false when it has none left.
    pub fn allow(&mut self, source: &K, now: Millis) -> bool {
        let full = u64::from(self.burst) * 1000;
        if !self.buckets.contains_key(source) {
            if self.buckets.len() >= self.max_sources {
                self.forget_idle(now);
                if self.buckets.len() >= self.max_sources {
                    return false;
                }
            }
            self.buckets.insert(
                source.clone(),
                Bucket {
                    milli_tokens: full,
                    milli_debt: 0,
                    updated: now,
                },
            );
        }
        let per_second = u64::from(self.per_second);
        let Some(bucket) = self.buckets.get_mut(source) else {
            return false;
        };
        let elapsed = now.saturating_sub(bucket.updated);
        let refill = elapsed.saturating_mul(per_second);
        let repaid = refill.min(bucket.milli_debt);
        bucket.milli_debt -= repaid;
        bucket.milli_tokens = bucket
            .milli_tokens
            .saturating_add(refill - repaid)
            .min(full);
        bucket.updated = now;
        if bucket.milli_tokens >= 1000 {
            bucket.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Takes one token for `source` at `now`, or, when it has none left, takes it on credit
    /// (up to a burst's worth) and says how long the source should be paused to repay it;
    /// refuses beyond that credit.
    pub fn take_paced(&mut self, source: &K, now: Millis) -> Paced {
        if self.allow(source, now) {
            return Paced::Free;
        }
        let full = u64::from(self.burst) * 1000;
        let per_second = u64::from(self.per_second);
        let Some(bucket) = self.buckets.get_mut(source) else {
            return Paced::Refused;
        };
        if bucket.milli_debt + 1000 > full {
            return Paced::Refused;
        }
        bucket.milli_debt += 1000;
        let missing = bucket.milli_debt + 1000 - bucket.milli_tokens.min(1000);
        Paced::Wait(missing.div_ceil(per_second))
    }

    fn forget_idle(&mut self, now: Millis) {
        let full = u64::from(self.burst) * 1000;
        let per_second = u64::from(self.per_second);
        self.buckets.retain(|_, b| {
            let refilled = b
                .milli_tokens
                .saturating_add(now.saturating_sub(b.updated).saturating_mul(per_second));
            refilled < full.saturating_add(b.milli_debt)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_rate_requests_are_taken_on_credit_then_refused() {
        let mut limiter = RateLimiter::new(2, 3, 10);
        assert!((0..3).all(|_| limiter.take_paced(&"a", 0) == Paced::Free));
        assert_eq!(limiter.take_paced(&"a", 0), Paced::Wait(1000));
        assert_eq!(limiter.take_paced(&"a", 0), Paced::Wait(1500));
        assert_eq!(limiter.take_paced(&"a", 0), Paced::Wait(2000));
        assert_eq!(limiter.take_paced(&"a", 0), Paced::Refused);
        // The refill repays the credit before it gives tokens again.
        assert_eq!(limiter.take_paced(&"a", 1000), Paced::Wait(1500));
        assert_eq!(limiter.take_paced(&"a", 3000), Paced::Free);
    }

    #[test]
    fn burst_then_sustained_rate() {
        let mut limiter = RateLimiter::new(2, 3, 10);
        assert!((0..3).all(|_| limiter.allow(&"a", 0)));
        assert!(!limiter.allow(&"a", 0));
        assert!(limiter.allow(&"b", 0), "sources are independent");
        assert!(!limiter.allow(&"a", 499));
        assert!(limiter.allow(&"a", 500));
        assert!(!limiter.allow(&"a", 500));
        assert!(
            (0..3).all(|_| limiter.allow(&"a", 100_000)),
            "refill caps at burst"
        );
        assert!(!limiter.allow(&"a", 100_000));
    }

    #[test]
    fn table_is_bounded() {
        let mut limiter = RateLimiter::new(1, 2, 2);
        assert!(limiter.allow(&1, 0));
        assert!(limiter.allow(&2, 0));
        assert!(
            !limiter.allow(&3, 0),
            "full of busy sources: refuse newcomers"
        );
        assert_eq!(limiter.tracked(), 2);
        assert!(limiter.allow(&3, 1_000), "idle sources are forgotten");
        assert!(limiter.tracked() <= 2);
    }
}
