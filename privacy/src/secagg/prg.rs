//! The mask PRG: the ChaCha20 keystream (20 rounds, 64-bit block counter and
//! 64-bit nonce fixed to 0, as in `chacha20::ChaCha20Rng`) keyed by a 32-byte
//! seed, read as little-endian `u32` words and added to (or subtracted from)
//! a vector with wrapping arithmetic, i.e. in Z_{2^32}.
//!
//! Speed: the keystream is generated 4 blocks (64 words) at a time straight
//! into a stack buffer by the crate's SIMD backend (AVX2 where available) and
//! added word by word; nothing is allocated.

use chacha20::rand_core::SeedableRng;
use chacha20::rand_core::block::Generator;
use chacha20::variants::Legacy;
use chacha20::{ChaChaCore, R20};

const BUF_WORDS: usize = 64;

/// Whether the keystream is added to or subtracted from the vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// `out[i] = out[i] + ks[i]` (mod 2^32).
    Add,
    /// `out[i] = out[i] - ks[i]` (mod 2^32).
    Sub,
}

/// Adds (or subtracts) `PRG(seed)` to `out`, word by word, mod 2^32.
pub fn apply_prg(seed: &[u8; 32], out: &mut [u32], sign: Sign) {
    let mut core = ChaChaCore::<R20, Legacy>::from_seed(*seed);
    let mut buf = [0u32; BUF_WORDS];
    let mut chunks = out.chunks_exact_mut(BUF_WORDS);
    match sign {
        Sign::Add => {
            for chunk in &mut chunks {
                core.generate(&mut buf);
                for (o, k) in chunk.iter_mut().zip(buf.iter()) {
                    *o = o.wrapping_add(*k);
                }
            }
        }
        Sign::Sub => {
            for chunk in &mut chunks {
                core.generate(&mut buf);
                for (o, k) in chunk.iter_mut().zip(buf.iter()) {
                    *o = o.wrapping_sub(*k);
                }
            }
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        core.generate(&mut buf);
        for (o, k) in rest.iter_mut().zip(buf.iter()) {
            *o = match sign {
                Sign::Add => o.wrapping_add(*k),
                Sign::Sub => o.wrapping_sub(*k),
            };
        }
    }
    // The keystream is mask material: do not leave it on the stack.
    zeroize::Zeroize::zeroize(&mut buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::Rng;

    #[test]
    fn matches_chacha20_test_vector() {
        // ChaCha20, all-zero key and nonce: keystream starts 76 b8 e0 ad a0 f1 3d 90.
        let mut v = [0u32; 3];
        apply_prg(&[0u8; 32], &mut v, Sign::Add);
        assert_eq!(v[0], u32::from_le_bytes([0x76, 0xb8, 0xe0, 0xad]));
        assert_eq!(v[1], u32::from_le_bytes([0xa0, 0xf1, 0x3d, 0x90]));
    }

    #[test]
    fn matches_the_rng_word_stream_at_every_length_and_cancels() {
        let seed = [9u8; 32];
        for len in [0usize, 1, 63, 64, 65, 200, 1000] {
            let mut v = vec![5u32; len];
            apply_prg(&seed, &mut v, Sign::Add);
            let mut rng = ChaCha20Rng::from_seed(seed);
            for w in &v {
                assert_eq!(*w, 5u32.wrapping_add(rng.next_u32()));
            }
            apply_prg(&seed, &mut v, Sign::Sub);
            assert!(v.iter().all(|&w| w == 5));
        }
    }
}
