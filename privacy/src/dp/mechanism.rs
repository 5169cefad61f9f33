//! Noise mechanisms and clipping.
//!
//! # Randomness
//!
//! Every sampler takes a `u64` seed and draws from `ChaCha12Rng::seed_from_u64(seed)`
//! (rand 0.10's portable ChaCha; same seed, same noise, on every platform), or from a
//! caller-supplied [`Rng`] through the `*_with_rng` variants. A 64-bit seed is for
//! reproducible experiments; in a deployment the noise must be unpredictable to
//! everybody, so seed a ChaCha from 32 bytes of OS entropy and use the `*_with_rng`
//! variants.
//!
//! # Floating point
//!
//! The Gaussian guarantee is for real-valued noise. Floating-point samples are not
//! exactly Gaussian and their low bits can leak (Mironov 2012, "On Significance of the
//! Least Significant Bits for Differential Privacy", for Laplace). The integer Skellam
//! path of distributed DP has no such gap in the noise itself.

use rand::{Rng, RngExt, SeedableRng, rngs::ChaCha12Rng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{DpError, check};

fn rng_from(seed: u64) -> ChaCha12Rng {
    ChaCha12Rng::seed_from_u64(seed)
}

/// The deployment generator: ChaCha12 keyed by 32 secret bytes (OS entropy),
/// on its own `stream` (e.g. the round), so that one key serves a whole run
/// and nobody without it can predict, and so remove, the noise.
pub fn keyed_rng(key: &[u8; 32], stream: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::from_seed(*key);
    rng.set_stream(stream);
    rng
}

/// Scales `values` so that their L2 norm is at most `bound` (`bound > 0`) and returns
/// the norm before clipping. The norm is accumulated in f64; after clipping, the
/// f32 vector's norm (computed in f64) is guaranteed `<= bound` (the scale is nudged
/// down if f32 rounding would overshoot). A NaN or infinite value is an error and
/// leaves `values` untouched.
pub fn clip_l2(values: &mut [f32], bound: f64) -> Result<f64, DpError> {
    check("clip bound", bound, "finite and > 0", |b| b > 0.0)?;
    let norm = l2_norm(values);
    if !norm.is_finite() {
        return Err(DpError::NonFiniteInput);
    }
    if norm > bound {
        let mut scale = bound / norm;
        let original: Vec<f32> = values.to_vec();
        for attempt in 0u32.. {
            for (v, &o) in values.iter_mut().zip(&original) {
                *v = (f64::from(o) * scale) as f32;
            }
            if l2_norm(values) <= bound {
                break;
            }
            // f32 rounding overshot (by about 1e-7 relative): shrink by an ulp, and
            // after a few tries (subnormal territory) by half, which must end at zero.
            scale *= if attempt < 8 {
                1.0 - f64::from(f32::EPSILON)
            } else {
                0.5
            };
        }
    }
    Ok(norm)
}

/// The Euclidean norm of `values`, summed in f64: [`NormAccumulator`] over
/// the whole slice.
pub fn l2_norm(values: &[f32]) -> f64 {
    let mut acc = NormAccumulator::default();
    acc.add(0, values);
    acc.norm()
}

/// The Euclidean norm of a vector whose values come in pieces, added in
/// order: value `i` is squared into partial sum `i % 8`, and the eight sums
/// are added in order at the end, so the result is the same bits however the
/// vector was split (a receiver's chunks are decided by the network).
///
/// Eight partial sums in a fixed order (so the result is reproducible) let
/// the compiler vectorise what one running sum serialises on the adder's
/// latency: the aggregator takes every update's norm, and the single sum
/// was 5% of a K = 50, P = 1M round's CPU. Taken while an update is decoded,
/// each piece is still in cache, which saves a pass over the whole update.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NormAccumulator {
    partial: [f64; NORM_LANES],
}

const NORM_LANES: usize = 8;

impl NormAccumulator {
    /// Adds `values`, the vector's values from index `first` on.
    pub fn add(&mut self, first: usize, values: &[f32]) {
        let skew = (NORM_LANES - first % NORM_LANES) % NORM_LANES;
        let (head, aligned) = values.split_at(skew.min(values.len()));
        for (i, &v) in head.iter().enumerate() {
            self.partial[(first + i) % NORM_LANES] += square(v);
        }
        add_aligned(&mut self.partial, aligned);
    }

    /// The norm of everything added.
    pub fn norm(&self) -> f64 {
        self.partial.iter().fold(0.0, |sum, p| sum + p).sqrt()
    }
}

fn square(v: f32) -> f64 {
    f64::from(v) * f64::from(v)
}

fedquic_simd::avx2_dispatch! {
    /// `aligned` starts at an index that is a multiple of 8: value j goes to
    /// sum j % 8. With AVX2: 2.3x the baseline's two-lane SSE2 on a chunk in
    /// cache, where the aggregator takes its norms. Rust never fuses the
    /// multiply and the add, so every instruction set gives the same bits.
    fn add_aligned(partial: &mut [f64; NORM_LANES], aligned: &[f32]) => add_aligned_portable
}

#[inline(always)]
fn add_aligned_portable(partial: &mut [f64; NORM_LANES], aligned: &[f32]) {
    let chunks = aligned.chunks_exact(NORM_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += square(v);
        }
    }
    for (p, &v) in partial.iter_mut().zip(tail) {
        *p += square(v);
    }
}

/// Central DP: adds i.i.d. `N(0, std^2)` to every coordinate of `sum`, drawn with the
/// Ziggurat method (`rand_distr::StandardNormal`, Marsaglia & Tsang 2000) from a
/// ChaCha12 stream seeded with `seed`. For the Gaussian mechanism on a sum of updates
/// clipped to `C`, `std = noise_multiplier * C`; its RDP is `alpha / (2 sigma^2)`
/// (Mironov 2017, Prop. 7). `std` must be finite and `>= 0` (0 adds nothing).
pub fn add_gaussian_noise(sum: &mut [f64], std: f64, seed: u64) -> Result<(), DpError> {
    add_gaussian_noise_with_rng(sum, std, &mut rng_from(seed))
}

/// [`add_gaussian_noise`] drawing from `rng`.
pub fn add_gaussian_noise_with_rng<R: Rng + ?Sized>(
    sum: &mut [f64],
    std: f64,
    rng: &mut R,
) -> Result<(), DpError> {
    check("noise std", std, "finite and >= 0", |s| s >= 0.0)?;
    if std == 0.0 {
        return Ok(());
    }
    for x in sum.iter_mut() {
        let z: f64 = StandardNormal.sample(rng);
        *x += std * z;
    }
    Ok(())
}

/// Largest Poisson mean accepted: keeps samples far inside `i64` and the PTRS
/// arithmetic exact enough.
pub const MAX_POISSON_MEAN: f64 = 1e15;

/// One exact Poisson(`lambda`) sample, `0 <= lambda <= MAX_POISSON_MEAN`.
///
/// * `lambda < 10`: multiplication of uniforms (Knuth, TAOCP vol. 2, 3.4.1): count the
///   uniforms whose running product stays above `e^-lambda`; `O(lambda)` draws.
/// * `lambda >= 10`: PTRS, transformed rejection with squeeze (Hörmann 1993, "The
///   transformed rejection method for generating Poisson random variables", Insurance:
///   Mathematics and Economics 12), the algorithm of numpy's `random_poisson`; the
///   acceptance test compares against the exact log pmf
///   `-lambda + k ln(lambda) - ln(k!)`, so the output follows Poisson(`lambda`) exactly
///   up to floating-point error in that test; about 1.1 uniform pairs per sample,
///   independent of `lambda`.
pub fn sample_poisson<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> Result<i64, DpError> {
    check("poisson mean", lambda, "finite and in [0, 1e15]", |l| {
        (0.0..=MAX_POISSON_MEAN).contains(&l)
    })?;
    Ok(poisson_unchecked(rng, lambda))
}

fn poisson_unchecked<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> i64 {
    if lambda == 0.0 {
        0
    } else if lambda < 10.0 {
        let enlam = (-lambda).exp();
        let mut x = 0;
        let mut prod = 1.0;
        loop {
            prod *= rng.random::<f64>();
            if prod > enlam {
                x += 1;
            } else {
                return x;
            }
        }
    } else {
        poisson_ptrs(rng, lambda)
    }
}

fn poisson_ptrs<R: Rng + ?Sized>(rng: &mut R, lam: f64) -> i64 {
    let slam = lam.sqrt();
    let loglam = lam.ln();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.02483 * b;
    let invalpha = 1.1239 + 1.1328 / (b - 3.4);
    let vr = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = rng.random::<f64>() - 0.5;
        let v = rng.random::<f64>();
        let us = 0.5 - u.abs();
        // `as` saturates: a -inf (us == 0) becomes i64::MIN and is rejected below.
        let k = ((2.0 * a / us + b) * u + lam + 0.43).floor() as i64;
        if us >= 0.07 && v <= vr {
            return k;
        }
        if k < 0 || (us < 0.013 && v > us) {
            continue;
        }
        let kf = k as f64;
        if v.ln() + invalpha.ln() - (a / (us * us) + b).ln()
            <= -lam + kf * loglam - libm::lgamma(kf + 1.0)
        {
            return k;
        }
    }
}

/// Distributed DP, one client's share: adds `Poisson(mu) - Poisson(mu)` (symmetric
/// Skellam, mean 0, variance `2 mu`) to every coordinate of the client's fixed-point
/// vector, with wrapping (two's complement) arithmetic so that it composes with
/// modular secure aggregation.
///
/// The Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021): Skellam is closed under
/// summation, so if each of `n` clients adds `Skellam(mu / n)` before masking, the sum
/// the server unmasks carries exactly `Skellam(mu)` noise and no party, the server
/// included, sees a noise-free sum. Pass `mu / n` here
/// ([`skellam_mu_per_client`]) and account with
/// [`RdpAccountant::step_skellam`](super::accountant::RdpAccountant::step_skellam)
/// using the total `mu` of the clients that actually contributed (dropouts reduce it).
/// The bound is in terms of the L1/L2 sensitivity of one client's *integer* vector
/// (after scaling by the fixed-point factor and rounding); see [`skellam_l1_bound`].
/// The modulus must be large enough that the noised sum does not wrap around.
///
/// What this guarantees: against the server (and anyone who sees only the unmasked
/// sum), the Skellam RDP bound with the total `mu` of the contributing clients. What it
/// does not: a client's own masked vector is protected by secure aggregation, not by its
/// small noise share `mu / n`; if `k` clients collude with the server and subtract
/// their own noise, the remaining noise is `(n - k) / n * mu`, so account with the
/// noise of the honest clients you are willing to assume. The bound is for the
/// integer vector that is actually summed, so the sensitivities must cover the scaling
/// and rounding step (randomized rounding can increase the L2 norm; the Skellam paper
/// bounds it with conditional rounding, which this module does not implement).
pub fn add_skellam_noise(values: &mut [i64], mu: f64, seed: u64) -> Result<(), DpError> {
    add_skellam_noise_with_rng(values, mu, &mut rng_from(seed))
}

/// [`add_skellam_noise`] drawing from `rng`.
pub fn add_skellam_noise_with_rng<R: Rng + ?Sized>(
    values: &mut [i64],
    mu: f64,
    rng: &mut R,
) -> Result<(), DpError> {
    check_mu(mu)?;
    for v in values.iter_mut() {
        *v = v.wrapping_add(skellam(rng, mu));
    }
    Ok(())
}

/// [`add_skellam_noise`] for vectors in `Z_{2^32}` (`u32` with wrapping arithmetic),
/// the representation of 32-bit modular secure aggregation: noise `k` is added as
/// `k mod 2^32`.
pub fn add_skellam_noise_u32(values: &mut [u32], mu: f64, seed: u64) -> Result<(), DpError> {
    add_skellam_noise_u32_with_rng(values, mu, &mut rng_from(seed))
}

/// [`add_skellam_noise_u32`] drawing from `rng`.
pub fn add_skellam_noise_u32_with_rng<R: Rng + ?Sized>(
    values: &mut [u32],
    mu: f64,
    rng: &mut R,
) -> Result<(), DpError> {
    check_mu(mu)?;
    for v in values.iter_mut() {
        *v = v.wrapping_add(skellam(rng, mu) as u32);
    }
    Ok(())
}

fn check_mu(mu: f64) -> Result<f64, DpError> {
    check("skellam mu", mu, "finite and in [0, 1e15]", |m| {
        (0.0..=MAX_POISSON_MEAN).contains(&m)
    })
}

fn skellam<R: Rng + ?Sized>(rng: &mut R, mu: f64) -> i64 {
    poisson_unchecked(rng, mu) - poisson_unchecked(rng, mu)
}

/// Each client's Skellam parameter when `clients` clients share total noise `mu`.
pub fn skellam_mu_per_client(total_mu: f64, clients: usize) -> Result<f64, DpError> {
    check_mu(total_mu)?;
    if clients == 0 {
        return Err(DpError::InvalidParameter {
            name: "clients",
            value: 0.0,
            expected: "at least 1",
        });
    }
    Ok(total_mu / clients as f64)
}

/// An L1 bound for an integer vector of dimension `dim` with L2 norm at most `l2`:
/// `min(l2^2, sqrt(dim) l2)` (`|x_i| <= x_i^2` for integers; Cauchy-Schwarz), the bound
/// the Skellam paper's accounting uses.
pub fn skellam_l1_bound(l2: f64, dim: usize) -> Result<f64, DpError> {
    check("l2", l2, "finite and >= 0", |x| x >= 0.0)?;
    Ok((l2 * l2).min((dim as f64).sqrt() * l2))
}

/// The noise multiplier `sigma_delta` for the update sum when adaptive clipping also
/// releases a noisy count with std `count_noise_std` (`sigma_b`), such that the two
/// releases together are as private as one Gaussian release with noise multiplier
/// `noise_multiplier` (`z`): the count of `b_u - 1/2` has sensitivity `1/2`, i.e.
/// noise multiplier `2 sigma_b`, and Gaussian RDPs add as `sigma^-2`, so
/// `sigma_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)` (Andrew, Thakkar, McMahan,
/// Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping", Sec. 3).
/// Requires `2 sigma_b > z`.
pub fn noise_multiplier_after_count_noise(
    noise_multiplier: f64,
    count_noise_std: f64,
) -> Result<f64, DpError> {
    let z = check(
        "noise_multiplier",
        noise_multiplier,
        "finite and > 0",
        |z| z > 0.0,
    )?;
    let sb = check("count_noise_std", count_noise_std, "finite and > 0", |s| {
        s > 0.0
    })?;
    let inv = z.powi(-2) - (2.0 * sb).powi(-2);
    if inv <= 0.0 || 2.0 * sb <= z {
        return Err(DpError::InvalidParameter {
            name: "count_noise_std",
            value: count_noise_std,
            expected: "greater than noise_multiplier / 2",
        });
    }
    Ok(inv.powf(-0.5))
}

/// Adaptive clipping to a target quantile of the update norms (Andrew, Thakkar, McMahan,
/// Ramaswamy, NeurIPS 2021, Algorithm 1 with the geometric update).
///
/// Each round, client `u` reports `b_u = 1[||update_u|| <= C]` ([`Self::indicator`])
/// alongside its clipped update; the server adds `N(0, sigma_b^2)` to the sum of the
/// `b_u` ([`Self::noisy_count`]) and calls [`Self::update`], which sets
/// `C <- C exp(-eta (b_bar - gamma))`, `b_bar = noisy sum / m`. Account the round with
/// the configured noise multiplier `z`, and noise the update sum with
/// [`noise_multiplier_after_count_noise`]`(z, sigma_b) * C`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// Target quantile `gamma` in [0, 1].
    pub target_quantile: f64,
    /// Learning rate `eta` > 0.
    pub learning_rate: f64,
    /// Std `sigma_b` of the noise on the count of unclipped clients (> 0).
    pub count_noise_std: f64,
    /// Current clip norm `C` > 0.
    pub clip: f64,
}

impl AdaptiveClip {
    /// Validated adaptive clipping state starting at clip `initial_clip`.
    pub fn new(
        target_quantile: f64,
        learning_rate: f64,
        count_noise_std: f64,
        initial_clip: f64,
    ) -> Result<Self, DpError> {
        let s = Self {
            target_quantile,
            learning_rate,
            count_noise_std,
            clip: initial_clip,
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), DpError> {
        check("target_quantile", self.target_quantile, "in [0, 1]", |g| {
            (0.0..=1.0).contains(&g)
        })?;
        check("learning_rate", self.learning_rate, "finite and > 0", |e| {
            e > 0.0
        })?;
        check(
            "count_noise_std",
            self.count_noise_std,
            "finite and > 0",
            |s| s > 0.0,
        )?;
        check("clip", self.clip, "finite and > 0", |c| c > 0.0)?;
        Ok(())
    }

    /// A client's bit `b_u = 1[norm <= C]` for its unclipped update norm.
    pub fn indicator(&self, norm: f64) -> f64 {
        if norm <= self.clip { 1.0 } else { 0.0 }
    }

    /// `count + N(0, sigma_b^2)`, the noisy number of unclipped clients.
    pub fn noisy_count(&self, count: f64, seed: u64) -> Result<f64, DpError> {
        self.noisy_count_with_rng(count, &mut rng_from(seed))
    }

    /// [`Self::noisy_count`] drawing from `rng`.
    pub fn noisy_count_with_rng<R: Rng + ?Sized>(
        &self,
        count: f64,
        rng: &mut R,
    ) -> Result<f64, DpError> {
        self.validate()?;
        let count = check("count", count, "finite", |_| true)?;
        let z: f64 = StandardNormal.sample(rng);
        Ok(count + self.count_noise_std * z)
    }

    /// The geometric update `C <- C exp(-eta (b_bar - gamma))` with
    /// `b_bar = unclipped_count_sum / clients`, where `unclipped_count_sum` is the noisy
    /// sum of the `b_u` and `clients` the number of clients of the round (the expected
    /// number under Poisson sampling, as in the paper). Returns the new clip; on an
    /// error (or a clip that would under/overflow) the clip is unchanged.
    pub fn update(&mut self, unclipped_count_sum: f64, clients: usize) -> Result<f64, DpError> {
        self.validate()?;
        let sum = check("unclipped_count_sum", unclipped_count_sum, "finite", |_| {
            true
        })?;
        if clients == 0 {
            return Err(DpError::InvalidParameter {
                name: "clients",
                value: 0.0,
                expected: "at least 1",
            });
        }
        let b_bar = sum / clients as f64;
        let next = self.clip * (-self.learning_rate * (b_bar - self.target_quantile)).exp();
        let next = check("updated clip", next, "finite and > 0", |c| c > 0.0)?;
        self.clip = next;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_is_the_same_bits_however_the_vector_is_split() {
        let mut rng = rng_from(3);
        let values: Vec<f32> = (0..1_003).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let whole = l2_norm(&values);
        let exact = values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        assert!((whole - exact).abs() <= 1e-12 * exact);
        for pieces in [1usize, 2, 3, 7, 8, 9, 64, 1_003] {
            let mut acc = NormAccumulator::default();
            let mut first = 0;
            // Uneven pieces: lengths cycle through 1..=pieces.
            let mut len = 1;
            while first < values.len() {
                let end = (first + len).min(values.len());
                acc.add(first, &values[first..end]);
                first = end;
                len = len % pieces + 1;
            }
            assert_eq!(
                acc.norm().to_bits(),
                whole.to_bits(),
                "pieces up to {pieces}"
            );
        }
        assert_eq!(l2_norm(&[]), 0.0);
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
    }

    #[test]
    fn every_instruction_set_gives_the_same_norm() {
        let mut rng = rng_from(5);
        let values: Vec<f32> = (0..4_099).map(|_| rng.random_range(-1e3f32..1e3)).collect();
        let mut portable = [0f64; NORM_LANES];
        add_aligned_portable(&mut portable, &values);
        let mut dispatched = [0f64; NORM_LANES];
        add_aligned(&mut dispatched, &values);
        assert_eq!(dispatched.map(f64::to_bits), portable.map(f64::to_bits));
        let mut acc = NormAccumulator::default();
        acc.add(0, &values);
        assert_eq!(acc.partial.map(f64::to_bits), portable.map(f64::to_bits));
    }

    #[test]
    fn clip_keeps_short_vectors() {
        let mut v = [3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 10.0).unwrap(), 5.0);
        assert_eq!(v, [3.0, 4.0]);
    }

    #[test]
    fn poisson_small_and_large_means_are_exact_in_mean() {
        let mut rng = rng_from(7);
        for lam in [0.5, 3.0, 10.0, 1e6] {
            let n = 20_000;
            let s: f64 = (0..n)
                .map(|_| sample_poisson(&mut rng, lam).unwrap() as f64)
                .sum();
            let mean = s / n as f64;
            // 6 standard errors
            assert!(
                (mean - lam).abs() < 6.0 * (lam / n as f64).sqrt(),
                "{lam} {mean}"
            );
        }
    }
}
