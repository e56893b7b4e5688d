//! The load loop shared by the benchmarks: N concurrent clients repeat one exchange for a
//! fixed time; the results are requests per second, latency percentiles and errors.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latency samples kept per client at most, so a long run cannot exhaust memory.
const MAX_SAMPLES_PER_CLIENT: usize = 1 << 20;

/// What runs measured: every latency sample, the errors and the time spent.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    latencies: Vec<u32>,
    errors: u64,
    elapsed: Duration,
}

impl Outcome {
    /// Adds another run's measurements to this one.
    pub fn merge(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
    }

    /// Completed exchanges per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.latencies.len() as f64 / secs
        } else {
            0.0
        }
    }

    /// Exchanges that failed or were answered with an error.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The latency below which a fraction `p` of exchanges completed.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        Duration::from_micros(u64::from(sorted[index]))
    }
}

/// Runs `clients` concurrent loops of `exchange(client, iteration)` for `duration`.
/// `exchange` returns whether the exchange succeeded.
pub async fn run<F, Fut>(clients: usize, duration: Duration, exchange: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let exchange = Arc::new(exchange);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let exchange = Arc::clone(&exchange);
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut iteration = 0u64;
            while Instant::now() < deadline {
                let begun = Instant::now();
                let ok = exchange(client, iteration).await;
                iteration += 1;
                if ok {
                    if samples.len() < MAX_SAMPLES_PER_CLIENT {
                        let micros = begun.elapsed().as_micros();
                        samples.push(u32::try_from(micros).unwrap_or(u32::MAX));
                    }
                } else {
                    errors += 1;
                }
            }
            (samples, errors)
        }));
    }
    let mut outcome = Outcome::default();
    for task in tasks {
        let (samples, failed) = task.await.expect("load task");
        outcome.latencies.extend(samples);
        outcome.errors += failed;
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// A small deterministic pseudo-random sequence (SplitMix64), to pick keys without a
/// dependency.
pub fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Prints one row of a results table.
pub fn print_row(name: &str, outcome: &Outcome, ceiling: f64) {
    println!(
        "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>8} {:>10.2}",
        name,
        outcome.per_second(),
        outcome.percentile(0.50).as_secs_f64() * 1000.0,
        outcome.percentile(0.99).as_secs_f64() * 1000.0,
        outcome.errors(),
        if ceiling > 0.0 {
            outcome.per_second() / ceiling
        } else {
            0.0
        },
    );
}

/// Prints the header of a results table.
pub fn print_header() {
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>8} {:>10}",
        "run", "req/s", "p50 ms", "p99 ms", "errors", "vs ceiling"
    );
}
