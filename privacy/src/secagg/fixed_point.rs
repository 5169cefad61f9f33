//! Fixed-point quantisation for secure aggregation: SecAgg+ sums in Z_{2^32},
//! so each client's f32 update is mapped to integers whose sum over all
//! contributors cannot wrap, and the unmasked sum is read back as i32.
//!
//! Clipping range: every value is clamped to [-bound, bound] (NaN counts as 0).
//! Scale: the largest s with `n * (bound * s + 1) <= 2^31 - 1`, n the most
//! contributors a round may have. A value v becomes q = round(v * s) with
//! unbiased stochastic rounding (E\[q\] = v * s, |q - v*s| < 1), so |q| <=
//! bound * s + 1, the sum of n of them stays within i32, and the decoded sum
//! differs from the exact sum of the clamped values by less than n / s.
//! q is stored in two's complement mod 2^32.

use chacha20::ChaCha20Rng;
use rand::{Rng, SeedableRng};

/// Why a quantiser cannot be built or used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FixedPointError {
    /// `max_contributors` is 0.
    #[error("max_contributors must be at least 1")]
    NoContributors,
    /// The bound is not a finite positive number.
    #[error("bound {0} is not finite and positive")]
    BadBound(f64),
    /// So many contributors that no positive scale keeps the sum within i32.
    #[error("{0} contributors leave no room in 31 bits")]
    TooManyContributors(usize),
    /// Input and output lengths differ.
    #[error("lengths differ: {input} in, {output} out")]
    LengthMismatch {
        /// Input length.
        input: usize,
        /// Output length.
        output: usize,
    },
}

/// A quantiser: clamp to ±bound, scale, stochastically round (see the module
/// documentation for how the scale is chosen).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedPoint {
    scale: f64,
    bound: f64,
    max_contributors: usize,
    /// floor((2^31 - 1) / max_contributors): no quantised value exceeds it.
    max_q: i64,
}

const I32_MAX: f64 = i32::MAX as f64;

impl FixedPoint {
    /// The largest scale with `max_contributors * (bound * scale + 1) <= 2^31 - 1`.
    pub fn for_sum(max_contributors: usize, bound: f64) -> Result<FixedPoint, FixedPointError> {
        if max_contributors == 0 {
            return Err(FixedPointError::NoContributors);
        }
        if !(bound.is_finite() && bound > 0.0) {
            return Err(FixedPointError::BadBound(bound));
        }
        let n = max_contributors as f64;
        let per_value = I32_MAX / n - 1.0;
        if per_value <= 0.0 {
            return Err(FixedPointError::TooManyContributors(max_contributors));
        }
        let mut scale = per_value / bound;
        // Guard the inequality against floating-point rounding.
        while n * (bound * scale + 1.0) > I32_MAX {
            scale *= 1.0 - f64::EPSILON * 4.0;
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(FixedPointError::BadBound(bound));
        }
        let max_q = i64::from(i32::MAX) / max_contributors as i64;
        Ok(FixedPoint {
            scale,
            bound,
            max_contributors,
            max_q,
        })
    }

    /// Quantisation steps per unit.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The clipping bound.
    pub fn bound(&self) -> f64 {
        self.bound
    }

    /// The most contributors whose sum cannot wrap.
    pub fn max_contributors(&self) -> usize {
        self.max_contributors
    }

    /// The largest error per coordinate of a decoded sum of `contributors`
    /// encodings, against the exact sum of the clamped values: `contributors / scale`.
    pub fn max_sum_error(&self, contributors: usize) -> f64 {
        contributors as f64 / self.scale
    }

    /// Quantises `values` into `out` (same length): clamp to ±bound, scale,
    /// unbiased stochastic rounding drawn from ChaCha20 seeded with
    /// `rng_seed`, two's complement mod 2^32.
    pub fn encode_into(
        &self,
        values: &[f32],
        out: &mut [u32],
        rng_seed: u64,
    ) -> Result<(), FixedPointError> {
        if values.len() != out.len() {
            return Err(FixedPointError::LengthMismatch {
                input: values.len(),
                output: out.len(),
            });
        }
        let mut rng = ChaCha20Rng::seed_from_u64(rng_seed);
        const TWO_POW_M53: f64 = 1.0 / (1u64 << 53) as f64;
        for (o, &v) in out.iter_mut().zip(values) {
            let v = if v.is_nan() {
                0.0
            } else {
                f64::from(v).clamp(-self.bound, self.bound)
            };
            let x = v * self.scale;
            let floor = x.floor();
            let frac = x - floor;
            let u = (rng.next_u64() >> 11) as f64 * TWO_POW_M53;
            let q = floor as i64 + i64::from(u < frac);
            let q = q.clamp(-self.max_q, self.max_q);
            *o = q as i32 as u32;
        }
        Ok(())
    }

    /// Reads a sum of encodings back: each word as i32, divided by the scale.
    pub fn decode_sum(&self, sum: &[u32], out: &mut [f64]) -> Result<(), FixedPointError> {
        if sum.len() != out.len() {
            return Err(FixedPointError::LengthMismatch {
                input: sum.len(),
                output: out.len(),
            });
        }
        for (o, &s) in out.iter_mut().zip(sum) {
            *o = f64::from(s as i32) / self.scale;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scale_is_the_largest_that_fits() {
        for (n, b) in [(1usize, 1.0f64), (100, 0.5), (1000, 10.0), (7, 1e-3)] {
            let fp = FixedPoint::for_sum(n, b).unwrap();
            let nf = n as f64;
            assert!(nf * (b * fp.scale() + 1.0) <= I32_MAX);
            assert!(nf * (b * fp.scale() * (1.0 + 1e-9) + 1.0) > I32_MAX);
        }
        assert_eq!(
            FixedPoint::for_sum(0, 1.0),
            Err(FixedPointError::NoContributors)
        );
        assert!(FixedPoint::for_sum(10, f64::NAN).is_err());
        assert!(FixedPoint::for_sum(10, -1.0).is_err());
        assert!(FixedPoint::for_sum(1 << 31, 1.0).is_err());
    }

    #[test]
    fn extremes_do_not_wrap() {
        let n = 1000;
        let fp = FixedPoint::for_sum(n, 2.0).unwrap();
        for v in [f32::INFINITY, f32::NEG_INFINITY, 2.0, -2.0, 1e30] {
            let mut sum = 0u32;
            for seed in 0..n as u64 {
                let mut q = [0u32];
                fp.encode_into(&[v], &mut q, seed).unwrap();
                sum = sum.wrapping_add(q[0]);
            }
            let mut d = [0f64];
            fp.decode_sum(&[sum], &mut d).unwrap();
            let exact = n as f64 * f64::from(v).clamp(-2.0, 2.0);
            assert!(
                (d[0] - exact).abs() <= fp.max_sum_error(n),
                "{v}: {} vs {exact}",
                d[0]
            );
        }
        let mut q = [7u32];
        fp.encode_into(&[f32::NAN], &mut q, 0).unwrap();
        assert_eq!(q[0], 0);
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let fp = FixedPoint::for_sum(1, 1.0).unwrap();
        // A value a third of the way between two steps.
        let v = ((1000.0 + 1.0 / 3.0) / fp.scale()) as f32;
        let x = f64::from(v) * fp.scale();
        let values = vec![v; 30_000];
        let mut out = vec![0u32; values.len()];
        fp.encode_into(&values, &mut out, 42).unwrap();
        let mean = out.iter().map(|&q| f64::from(q as i32)).sum::<f64>() / values.len() as f64;
        // Bernoulli(1/3) over 30k draws: sd ~ 0.0027; 6 sd.
        assert!((mean - x).abs() < 0.017, "mean {mean} vs {x}");
    }

    proptest! {
        #[test]
        fn round_trip_within_one_step(
            values in proptest::collection::vec(-3.0f32..3.0, 1..50),
            n in 1usize..5000,
            seed in any::<u64>(),
        ) {
            let fp = FixedPoint::for_sum(n, 2.5).unwrap();
            let mut q = vec![0u32; values.len()];
            fp.encode_into(&values, &mut q, seed).unwrap();
            let mut back = vec![0f64; values.len()];
            fp.decode_sum(&q, &mut back).unwrap();
            for (v, b) in values.iter().zip(&back) {
                let c = f64::from(*v).clamp(-2.5, 2.5);
                prop_assert!((c - b).abs() < 1.0 / fp.scale());
            }
        }
    }
}
