//! t-out-of-n Shamir secret sharing of 32-byte secrets over the prime field
//! GF(2^61 - 1).
//!
//! Why our own: SecAgg+ (Bell et al., CCS 2020) shares every client's secrets
//! among its neighbours, whose roster indices run into the thousands; the
//! byte-oriented crates (`sharks`, `blahaj`) work in GF(256) and allow at most
//! 255 holders, and `vsss-rs` brings a whole elliptic-curve stack for what is
//! here ~150 lines of field arithmetic. The Mersenne prime p = 2^61 - 1 admits
//! 2^61 - 2 distinct non-zero evaluation points and a reduction that is two
//! shifts and an add.
//!
//! A 32-byte secret is cut into [`LIMBS`] = 5 limbs: four of 7 bytes (< 2^56)
//! and one of 4 bytes (< 2^32), each below p, and every limb is shared with its
//! own random polynomial of degree t - 1 evaluated at the same point. Holder
//! `i` (a roster index) gets the point x = i + 1 (x = 0 is the secret).
//! A reconstructed limb that does not fit its width proves the shares were not
//! all from one dealing, and is reported as [`ShamirError::Inconsistent`].
//! A share is fixed-size (4 + 5 * 8 bytes), so decoding it is bounded.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The field modulus, the Mersenne prime 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per 32-byte secret.
pub const LIMBS: usize = 5;
/// Byte width of each limb of a 32-byte secret (the last one holds the remaining 4 bytes).
const LIMB_BYTES: [usize; LIMBS] = [7, 7, 7, 7, 4];

/// One holder's share of a 32-byte secret: the evaluation point `x` (roster
/// index + 1) and one field element per limb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The evaluation point: the holder's roster index plus one; never 0.
    pub x: u32,
    /// The share of each limb, each `< P`.
    pub y: [u64; LIMBS],
}

impl Share {
    /// Whether the share is a well-formed field point (x != 0, every limb < P).
    pub fn is_well_formed(&self) -> bool {
        self.x != 0 && self.y.iter().all(|&v| v < P)
    }
}

/// Why sharing or reconstruction failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold must be at least 1 and at most the number of holders.
    #[error("threshold {threshold} is not within 1..={holders}")]
    BadThreshold {
        /// The threshold asked for.
        threshold: usize,
        /// The number of holders (or shares given).
        holders: usize,
    },
    /// A holder index of `u32::MAX` has no evaluation point.
    #[error("holder index {0} has no evaluation point")]
    BadHolder(u32),
    /// Two shares (or holders) have the same evaluation point.
    #[error("two shares at the same point x = {0}")]
    DuplicatePoint(u32),
    /// A share is not a field point (x = 0 or a limb >= P).
    #[error("malformed share at x = {0}")]
    Malformed(u32),
    /// The shares interpolate to something that is not a 32-byte secret.
    #[error("shares are inconsistent: they do not come from one dealing")]
    Inconsistent,
}

#[inline]
fn reduce(v: u64) -> u64 {
    // v < 2P for every caller.
    if v >= P { v - P } else { v }
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    reduce(a + b)
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    reduce(a + P - b)
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    let prod = u128::from(a) * u128::from(b);
    // prod < (P-1)^2, so the high part is < P and lo + hi < 2P.
    let lo = (prod as u64) & P;
    let hi = (prod >> 61) as u64;
    reduce(lo + hi)
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// Inverse of a non-zero element (Fermat: a^(p-2)).
fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// A uniform field element, by rejection of the single value 2^61 - 1.
fn random_element<R: Rng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

fn to_limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    let mut pos = 0;
    for (limb, &width) in limbs.iter_mut().zip(LIMB_BYTES.iter()) {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(&secret[pos..pos + width]);
        *limb = u64::from_le_bytes(buf);
        pos += width;
    }
    limbs
}

fn from_limbs(limbs: &[u64; LIMBS]) -> Result<[u8; 32], ShamirError> {
    let mut out = [0u8; 32];
    let mut pos = 0;
    for (&limb, &width) in limbs.iter().zip(LIMB_BYTES.iter()) {
        if limb >> (8 * width) != 0 {
            return Err(ShamirError::Inconsistent);
        }
        out[pos..pos + width].copy_from_slice(&limb.to_le_bytes()[..width]);
        pos += width;
    }
    Ok(out)
}

/// The evaluation point of holder `index`: `index + 1`.
pub fn point_of(index: u32) -> Result<u32, ShamirError> {
    index.checked_add(1).ok_or(ShamirError::BadHolder(index))
}

/// Shares `secret` among `holders` (roster indices) so that any `threshold`
/// of the shares reconstruct it and fewer reveal nothing about it. Returns one
/// share per holder, in the order given.
pub fn split<R: Rng + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    holders: &[u32],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > holders.len() {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: holders.len(),
        });
    }
    let mut xs = Vec::with_capacity(holders.len());
    for &h in holders {
        let x = point_of(h)?;
        if xs.contains(&x) {
            return Err(ShamirError::DuplicatePoint(x));
        }
        xs.push(x);
    }
    let limbs = to_limbs(secret);
    // coeffs[l][j]: coefficient of x^j of limb l's polynomial; coeffs[l][0] is the limb.
    let mut coeffs = vec![[0u64; LIMBS]; threshold];
    coeffs[0] = limbs;
    for c in coeffs.iter_mut().skip(1) {
        for v in c.iter_mut() {
            *v = random_element(rng);
        }
    }
    let shares = xs
        .iter()
        .map(|&x| {
            let xf = u64::from(x);
            let mut y = [0u64; LIMBS];
            for (l, yl) in y.iter_mut().enumerate() {
                // Horner, highest degree first.
                let mut acc = 0;
                for c in coeffs.iter().rev() {
                    acc = add(mul(acc, xf), c[l]);
                }
                *yl = acc;
            }
            Share { x, y }
        })
        .collect();
    Ok(shares)
}

/// Interpolates the limbs at x = 0 from exactly the shares given (all of them).
/// Exposed to the crate for tests of the "t - 1 shares reveal nothing" property.
pub(crate) fn interpolate_at_zero(shares: &[Share]) -> Result<[u64; LIMBS], ShamirError> {
    for (i, s) in shares.iter().enumerate() {
        if !s.is_well_formed() {
            return Err(ShamirError::Malformed(s.x));
        }
        if shares[..i].iter().any(|o| o.x == s.x) {
            return Err(ShamirError::DuplicatePoint(s.x));
        }
    }
    let mut out = [0u64; LIMBS];
    for (i, si) in shares.iter().enumerate() {
        // Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i).
        let xi = u64::from(si.x);
        let mut num = 1;
        let mut den = 1;
        for (j, sj) in shares.iter().enumerate() {
            if i != j {
                let xj = u64::from(sj.x);
                num = mul(num, xj);
                den = mul(den, sub(xj, xi));
            }
        }
        let lambda = mul(num, inv(den));
        for (o, &y) in out.iter_mut().zip(si.y.iter()) {
            *o = add(*o, mul(lambda, y));
        }
    }
    Ok(out)
}

/// Reconstructs a secret from at least `threshold` shares (the first
/// `threshold` are used; with more, one further share is checked to lie on the
/// same polynomials, so a single corrupted share among honest ones is caught).
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32], ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: shares.len(),
        });
    }
    let base = &shares[..threshold];
    let limbs = interpolate_at_zero(base)?;
    if let Some(extra) = shares.get(threshold) {
        if !extra.is_well_formed() {
            return Err(ShamirError::Malformed(extra.x));
        }
        if base.iter().any(|s| s.x == extra.x) {
            return Err(ShamirError::DuplicatePoint(extra.x));
        }
        // Evaluate the interpolated polynomials at extra.x.
        let xe = u64::from(extra.x);
        let mut at = [0u64; LIMBS];
        for (i, si) in base.iter().enumerate() {
            let xi = u64::from(si.x);
            let mut num = 1;
            let mut den = 1;
            for (j, sj) in base.iter().enumerate() {
                if i != j {
                    let xj = u64::from(sj.x);
                    num = mul(num, sub(xe, xj));
                    den = mul(den, sub(xi, xj));
                }
            }
            let lambda = mul(num, inv(den));
            for (o, &y) in at.iter_mut().zip(si.y.iter()) {
                *o = add(*o, mul(lambda, y));
            }
        }
        if at != extra.y {
            return Err(ShamirError::Inconsistent);
        }
    }
    from_limbs(&limbs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1u64, 2, 12345, P - 2, 1 << 60] {
            assert_eq!(mul(a, inv(a)), 1);
        }
    }

    #[test]
    fn limbs_round_trip() {
        let s: [u8; 32] = core::array::from_fn(|i| (i * 37 + 5) as u8);
        assert_eq!(from_limbs(&to_limbs(&s)), Ok(s));
        assert_eq!(
            from_limbs(&[1 << 56, 0, 0, 0, 0]),
            Err(ShamirError::Inconsistent)
        );
    }

    #[test]
    fn corrupted_share_is_caught_with_a_spare() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = [7u8; 32];
        let holders: Vec<u32> = (0..10).collect();
        let mut shares = split(&secret, 4, &holders, &mut rng).unwrap();
        assert_eq!(reconstruct(&shares, 4), Ok(secret));
        shares[4].y[2] = add(shares[4].y[2], 1);
        assert_eq!(reconstruct(&shares[..5], 4), Err(ShamirError::Inconsistent));
        shares[1].x = shares[0].x;
        assert!(matches!(
            reconstruct(&shares, 4),
            Err(ShamirError::DuplicatePoint(_))
        ));
    }

    #[test]
    fn thousands_of_holders() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = [0xA5u8; 32];
        let holders: Vec<u32> = (4000..4300).collect();
        let shares = split(&secret, 151, &holders, &mut rng).unwrap();
        assert_eq!(reconstruct(&shares[149..], 151), Ok(secret));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_t_of_n_reconstruct_and_t_minus_1_do_not(
            secret in proptest::array::uniform32(any::<u8>()),
            n in 2usize..24,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            base in 0u32..100_000,
        ) {
            let t = 2 + ((n - 1) as f64 * t_frac) as usize;
            let t = t.min(n);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let holders: Vec<u32> = (0..n as u32).map(|i| base + 3 * i).collect();
            let mut shares = split(&secret, t, &holders, &mut rng).unwrap();
            // A seeded shuffle picks which t.
            let mut pick = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
            for i in (1..shares.len()).rev() {
                let j = (pick.next_u64() % (i as u64 + 1)) as usize;
                shares.swap(i, j);
            }
            prop_assert_eq!(reconstruct(&shares[..t], t), Ok(secret));
            prop_assert_eq!(reconstruct(&shares, t), Ok(secret));
            prop_assert!(reconstruct(&shares[..t - 1], t).is_err());
            // Interpolating t - 1 shares as if they were enough does not give the secret.
            let wrong = interpolate_at_zero(&shares[..t - 1]).unwrap();
            prop_assert_ne!(wrong, to_limbs(&secret));
        }
    }
}
