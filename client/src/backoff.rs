//! Jittered exponential backoff for reconnects ("full jitter"): the n-th
//! wait is uniform in [base/2, min(max, initial * 2^n)], so a fleet of
//! clients that lost the aggregator together does not come back together.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// SplitMix64 state: a tiny, cloneable, seeded jitter source.
    state: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            state: seed,
        }
    }

    /// The next wait; grows until `max`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let low = ceiling.as_secs_f64() / 2.0;
        Duration::from_secs_f64(low + (ceiling.as_secs_f64() - low) * self.next_unit())
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Call after a successful session so the next outage starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        assert!(
            waits[7] >= Duration::from_secs(1),
            "late waits reach the cap's range: {waits:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let mut again = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        assert_eq!(again.next_delay(), waits[0], "same seed, same waits");
    }
}
