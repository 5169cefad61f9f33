//! Seeded random number helpers shared by the data generators, partitioners and training.
//!
//! Everything random in this crate goes through [`seeded`], so one seed always gives the
//! same bits: Xoshiro256++ is a fixed, documented algorithm (unlike `StdRng`, whose
//! algorithm may change between rand releases).

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// The generator used everywhere in this crate.
pub(crate) type SeededRng = Xoshiro256PlusPlus;

/// A generator whose whole stream is determined by `seed`.
pub(crate) fn seeded(seed: u64) -> SeededRng {
    SeededRng::seed_from_u64(seed)
}

/// Mixes `stream` into `seed` so that independent consumers (train vs test split, one
/// image vs the next) get unrelated streams from one user seed. SplitMix64 finaliser.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw from the open interval (0, 1), safe to take the logarithm of.
pub(crate) fn open_unit(rng: &mut SeededRng) -> f64 {
    loop {
        let u: f64 = rng.random();
        if u > 0.0 {
            return u;
        }
    }
}

/// A standard normal draw (Box-Muller; one of the pair is discarded for simplicity).
pub(crate) fn standard_normal(rng: &mut SeededRng) -> f64 {
    let u1 = open_unit(rng);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The natural logarithm of a Gamma(shape, 1) draw.
///
/// Marsaglia & Tsang (2000) for shape >= 1; for shape < 1 the boost
/// `Gamma(shape) = Gamma(shape + 1) * U^(1/shape)` is applied in log space, because
/// `U^(1/shape)` underflows to zero for small shapes (e.g. Dirichlet alpha = 0.01).
pub(crate) fn ln_gamma_sample(rng: &mut SeededRng, shape: f64) -> f64 {
    if shape < 1.0 {
        let boost = open_unit(rng).ln() / shape;
        return ln_gamma_sample(rng, shape + 1.0) + boost;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = open_unit(rng);
        // Squeeze test first (cheap), then the exact acceptance test.
        if u < 1.0 - 0.0331 * x * x * x * x || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d.ln() + v.ln();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_sample_mean_and_variance_match_shape() {
        // Gamma(k, 1) has mean k and variance k.
        for &shape in &[0.3_f64, 1.0, 2.5, 9.0] {
            let mut rng = seeded(11);
            let n = 40_000;
            let draws: Vec<f64> = (0..n)
                .map(|_| ln_gamma_sample(&mut rng, shape).exp())
                .collect();
            let mean = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "shape {shape}: mean {mean}"
            );
            assert!(
                (var - shape).abs() < 0.1 * shape.max(1.0),
                "shape {shape}: var {var}"
            );
        }
    }

    #[test]
    fn tiny_shape_stays_finite_in_log_space() {
        let mut rng = seeded(3);
        for _ in 0..1000 {
            let v = ln_gamma_sample(&mut rng, 0.001);
            assert!(v.is_finite());
        }
    }

    #[test]
    fn derived_seeds_differ() {
        assert_ne!(derive_seed(7, 0), derive_seed(7, 1));
        assert_ne!(derive_seed(7, 0), derive_seed(8, 0));
        assert_eq!(derive_seed(7, 5), derive_seed(7, 5));
    }
}
