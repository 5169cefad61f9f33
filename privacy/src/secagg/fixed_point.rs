//! Fixed-point quantisation for secure aggregation: SecAgg+ sums in Z_{2^32},
//! so each client's f32 update is mapped to integers whose sum over all
//! contributors cannot wrap, and the unmasked sum is read back as i32.
//!
//! Clipping range: every value is clamped to [-bound, bound] (NaN counts as 0).
//! Scale: the largest s with `n * (bound * s + 1) <= 2^31 - 1`, n the most
//! contributors a round may have. A value v becomes q = round(v * s) with
//! stochastic rounding (|q - v*s| < 1, E\[q\] = v * s up to a bias below
//! 2^-32 of a step), so |q| <= bound * s + 1, the sum of n of them stays within
//! i32, and the decoded sum differs from the exact sum of the clamped values by
//! less than n / s. q is stored in two's complement mod 2^32.
//!
//! The rounding draws one 32-bit word per value from the mask PRG
//! ([`super::prg`], AES-128-CTR) keyed by 32 bytes drawn from ChaCha20 seeded
//! with the caller's `u64`: the draws cost a fraction of what one `u64` per
//! value from ChaCha20 did.

use chacha20::ChaCha20Rng;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

use super::prg::{BUF_WORDS, Keystream};

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
    max_q: f64,
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
        let max_q = f64::from(
            i32::MAX
                / i32::try_from(max_contributors)
                    .map_err(|_| FixedPointError::TooManyContributors(max_contributors))?,
        );
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
    /// stochastic rounding with draws from the mask PRG keyed from
    /// `rng_seed` (see the module documentation), two's complement mod 2^32.
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
        let mut seed = Zeroizing::new([0u8; 32]);
        ChaCha20Rng::seed_from_u64(rng_seed).fill_bytes(&mut *seed);
        let mut draws = Keystream::new(&seed);
        for (outs, vals) in out.chunks_mut(BUF_WORDS).zip(values.chunks(BUF_WORDS)) {
            let words = draws.next_words(outs.len());
            for ((o, &v), w) in outs.iter_mut().zip(vals).zip(words) {
                *o = self.quantise(v, u32::from_le_bytes(*w));
            }
        }
        Ok(())
    }

    /// One value, rounded up with probability (just above) its fractional
    /// part: up when `draw < frac * 2^32`.
    ///
    /// Only f64 arithmetic, no `f64::floor` (a libm call on baseline x86-64,
    /// which lacks SSE4.1) and no float-to-int casts, so the loop vectorises.
    /// Adding then subtracting 1.5 * 2^52 rounds any |x| < 2^51 to an integer
    /// exactly; an integer q with |q| < 2^31 plus 1.5 * 2^52 has q's two's
    /// complement in its low 32 bits.
    #[inline(always)]
    fn quantise(&self, v: f32, draw: u32) -> u32 {
        const TWO_POW_32: f64 = (1u64 << 32) as f64;
        const ROUND: f64 = (3u64 << 51) as f64;
        let v = if v.is_nan() { 0.0 } else { f64::from(v) };
        // Clamps written as compare-and-select, which compile to plain
        // `maxpd`/`minpd` (`f64::max` adds NaN fix-ups; there is no NaN here).
        let v = if v < -self.bound { -self.bound } else { v };
        let v = if v > self.bound { self.bound } else { v };
        // |x| <= bound * scale < 2^31 - 1.
        let x = v * self.scale;
        let nearest = (x + ROUND) - ROUND;
        let floor = nearest - if nearest > x { 1.0 } else { 0.0 };
        let frac = x - floor; // exact, in [0, 1)
        let up = if f64::from(draw) < frac * TWO_POW_32 {
            1.0
        } else {
            0.0
        };
        let q = floor + up;
        let q = if q < -self.max_q { -self.max_q } else { q };
        let q = if q > self.max_q { self.max_q } else { q };
        (q + ROUND).to_bits() as u32
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
    use super::super::prg::{Sign, apply_prg};
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

    /// `quantise` written the plain way: `f64::floor`, integer arithmetic.
    fn quantise_reference(fp: &FixedPoint, v: f32, draw: u32) -> u32 {
        let v = if v.is_nan() {
            0.0
        } else {
            f64::from(v).clamp(-fp.bound, fp.bound)
        };
        let x = v * fp.scale;
        let floor = x.floor();
        let up = f64::from(draw) < (x - floor) * 4_294_967_296.0;
        let q = (floor as i64 + i64::from(up)).clamp(-(fp.max_q as i64), fp.max_q as i64);
        q as i32 as u32
    }

    #[test]
    fn quantise_matches_the_plain_formula_at_the_edges() {
        for (n, bound) in [(1usize, 1.0f64), (3, 2.5), (1000, 1e-3), (100_000, 7.0)] {
            let fp = FixedPoint::for_sum(n, bound).unwrap();
            let step = (1.0 / fp.scale()) as f32;
            let b = bound as f32;
            let values = [
                0.0,
                -0.0,
                step,
                -step,
                step / 3.0,
                -step / 3.0,
                b,
                -b,
                b * 0.999_999,
                -b * 0.999_999,
                f32::MIN_POSITIVE,
                -f32::MIN_POSITIVE,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                f32::NAN,
            ];
            for v in values {
                for draw in [0, 1, 1 << 31, u32::MAX - 1, u32::MAX] {
                    assert_eq!(
                        fp.quantise(v, draw),
                        quantise_reference(&fp, v, draw),
                        "n {n}, bound {bound}, v {v}, draw {draw}"
                    );
                }
            }
        }
    }

    #[test]
    fn encode_draws_one_prg_word_per_value() {
        // Past several keystream runs, with specials mixed in.
        let fp = FixedPoint::for_sum(50, 1.5).unwrap();
        let values: Vec<f32> = (0..2_000)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -3.0,
                _ => ((i as f32) * 0.618).sin() * 1.6,
            })
            .collect();
        let mut out = vec![0u32; values.len()];
        fp.encode_into(&values, &mut out, 77).unwrap();
        let mut seed = [0u8; 32];
        ChaCha20Rng::seed_from_u64(77).fill_bytes(&mut seed);
        let mut draws = vec![0u32; values.len()];
        apply_prg(&seed, &mut draws, Sign::Add);
        for ((&q, &v), &d) in out.iter().zip(&values).zip(&draws) {
            assert_eq!(q, quantise_reference(&fp, v, d), "value {v}");
        }
    }

    proptest! {
        #[test]
        fn quantise_matches_the_plain_formula(
            v in any::<f32>(),
            draw in any::<u32>(),
            n in 1usize..100_000,
            bound in 1e-6f64..1e6,
        ) {
            let fp = FixedPoint::for_sum(n, bound).unwrap();
            prop_assert_eq!(fp.quantise(v, draw), quantise_reference(&fp, v, draw));
            // And a value within the bound, where the fraction matters.
            let w = (f64::from(v).rem_euclid(2.0 * bound) - bound) as f32;
            prop_assert_eq!(fp.quantise(w, draw), quantise_reference(&fp, w, draw));
        }

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
