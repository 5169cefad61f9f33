//! Connection IDs for server endpoints: 64 bits that never repeat within an
//! endpoint, plus a keyed tag that lets a restarted aggregator recognise the
//! IDs its predecessor issued.
//!
//! Why not quinn's `HashedConnectionIdGenerator`: its 8-byte IDs carry a
//! 3-byte random nonce (16.7 million values) and a 5-byte tag. quinn checks
//! a new connection's IDs against the live ones, but not the source ID of a
//! stateless Retry, and it routes an Initial by its destination ID through the
//! live IDs first. So when a Retry's ID equals an ID already issued to an
//! established connection (probability about live IDs / 2^24 per Retry: one
//! in 1,100 with 3,000 connections open, about 5 IDs each), the client's next
//! Initials go to that connection, which drops them as unexpected, and the
//! client waits until its handshake times out (BENCHMARKS.md, "Connections").
//! Here the 8-byte nonce is a keyed permutation of a counter (a four-round
//! Feistel network with HMAC-SHA256 rounds, Luby-Rackoff), so no two IDs of an
//! endpoint share it and a Retry cannot collide with a live ID; the round key
//! also depends on a random per-endpoint salt, so a restarted endpoint's IDs
//! differ from its predecessor's, and nobody without the key can predict them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of the nonce, unique per endpoint.
const NONCE_LEN: usize = 8;
/// Feistel rounds: four make a pseudorandom permutation of any PRF.
const FEISTEL_ROUNDS: u8 = 4;
/// Bytes of the keyed tag over the nonce.
const TAG_LEN: usize = 4;
/// Length of every ID this generator issues.
pub const CID_LEN: usize = NONCE_LEN + TAG_LEN;

/// Issues `CID_LEN`-byte connection IDs: `nonce || tag`, where `nonce` is
/// the 64-bit counter through a Feistel permutation keyed by
/// HMAC-SHA256(key, "permutation" || salt), and `tag` is HMAC-SHA256(key,
/// "tag" || nonce) truncated to 4 bytes.
pub struct KeyedCidGenerator {
    key: hmac::Key,
    permutation: hmac::Key,
    counter: u64,
}

impl KeyedCidGenerator {
    /// A generator whose tags verify under `key` (the same key after a
    /// restart recognises the old IDs); the nonces of each generator differ.
    pub fn new(key: hmac::Key) -> Self {
        let seed: [u8; 32] = truncated_hmac(&key, &[b"permutation", &fresh_salt()]);
        let permutation = hmac::Key::new(hmac::HMAC_SHA256, &seed);
        KeyedCidGenerator {
            key,
            permutation,
            counter: 0,
        }
    }

    /// A generator with a random key (endpoints without a reset secret).
    pub fn random() -> Self {
        let key_bytes = fresh_salt();
        Self::new(hmac::Key::new(hmac::HMAC_SHA256, &key_bytes))
    }

    /// The counter's image under the keyed permutation of 64-bit values.
    fn permute(&self, counter: u64) -> [u8; NONCE_LEN] {
        let (mut left, mut right) = ((counter >> 32) as u32, counter as u32);
        for round in 0..FEISTEL_ROUNDS {
            (left, right) = (right, left ^ self.round_function(round, right));
        }
        ((u64::from(left) << 32) | u64::from(right)).to_le_bytes()
    }

    /// The Feistel round function: a PRF of the round and the half-block.
    fn round_function(&self, round: u8, half: u32) -> u32 {
        u32::from_le_bytes(truncated_hmac(
            &self.permutation,
            &[&[round], &half.to_le_bytes()],
        ))
    }

    fn tag(&self, nonce: &[u8]) -> [u8; TAG_LEN] {
        truncated_hmac(&self.key, &[b"tag", nonce])
    }
}

/// The first `N` bytes (at most 32) of HMAC-SHA256 over `parts` in turn.
fn truncated_hmac<const N: usize>(key: &hmac::Key, parts: &[&[u8]]) -> [u8; N] {
    let mut ctx = hmac::Context::with_key(key);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&ctx.sign().as_ref()[..N]);
    out
}

impl ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let nonce = self.permute(self.counter);
        // 2^64 IDs before a repeat: an endpoint issuing a million a second
        // would take 580,000 years.
        self.counter = self.counter.wrapping_add(1);
        let mut bytes = [0u8; CID_LEN];
        bytes[..NONCE_LEN].copy_from_slice(&nonce);
        bytes[NONCE_LEN..].copy_from_slice(&self.tag(&nonce));
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        let (nonce, tag) = cid.split_at(NONCE_LEN);
        // Not secret-dependent timing worth guarding: a wrong guess only
        // means the packet is dropped instead of answered with a reset.
        match self.tag(nonce) == tag {
            true => Ok(()),
            false => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// 16 bytes from the operating system's generator; should that ever fail,
/// the clock and the process id, which still differ between endpoints and
/// restarts. Uniqueness rests on the counter either way; only the secrecy of
/// a random key would suffer, and without the OS generator no TLS handshake
/// (ring draws its key shares there too) could complete anyway.
fn fresh_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    if SystemRandom::new().fill(&mut salt).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        salt[..12].copy_from_slice(&nanos.to_le_bytes()[..12]);
        salt[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    salt
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(byte: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[byte; 32])
    }

    #[test]
    fn ids_are_distinct_and_validate_under_the_same_key_only() {
        let mut generator = KeyedCidGenerator::new(key(1));
        // quinn's 3-byte nonce repeats within this many IDs (birthday bound
        // of 2^24: even odds by 4,800, about 1,200 repeats by 200,000); ours
        // is a permutation of the counter and must not repeat at all.
        let ids: Vec<ConnectionId> = (0..200_000).map(|_| generator.generate_cid()).collect();
        let distinct: HashSet<&[u8]> = ids.iter().map(|id| &id[..NONCE_LEN]).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|id| id.len() == CID_LEN));

        let restarted = KeyedCidGenerator::new(key(1));
        let other = KeyedCidGenerator::new(key(2));
        for id in ids.iter().take(1000) {
            assert!(generator.validate(id).is_ok());
            assert!(restarted.validate(id).is_ok(), "a restart keeps the key");
            assert!(other.validate(id).is_err(), "another key rejects it");
        }
        let mut forged = ids[0][..].to_vec();
        forged[CID_LEN - 1] ^= 1;
        assert!(generator.validate(&ConnectionId::new(&forged)).is_err());
        assert!(generator.validate(&ConnectionId::new(&[0; 8])).is_err());
    }

    #[test]
    fn two_generators_with_one_key_issue_different_ids() {
        // A restarted aggregator must not reissue its predecessor's IDs,
        // which old clients may still be sending to.
        let mut a = KeyedCidGenerator::new(key(3));
        let mut b = KeyedCidGenerator::new(key(3));
        let from_a: HashSet<Vec<u8>> = (0..10_000).map(|_| a.generate_cid()[..].to_vec()).collect();
        assert!((0..10_000).all(|_| !from_a.contains(&b.generate_cid()[..])));
    }

    /// The Feistel network is a bijection: on a counter range it gives as
    /// many distinct nonces, and inverting the rounds gives the counters back.
    #[test]
    fn the_nonce_is_a_permutation_of_the_counter() {
        let generator = KeyedCidGenerator::new(hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]));
        let invert = |nonce: [u8; NONCE_LEN]| {
            let v = u64::from_le_bytes(nonce);
            let (mut left, mut right) = ((v >> 32) as u32, v as u32);
            for round in (0..FEISTEL_ROUNDS).rev() {
                (left, right) = (right ^ generator.round_function(round, left), left);
            }
            (u64::from(left) << 32) | u64::from(right)
        };
        let mut seen = HashSet::new();
        for counter in (0..50_000u64).chain([u64::MAX - 1, u64::MAX, 1 << 32, (1 << 32) - 1]) {
            let nonce = generator.permute(counter);
            assert!(seen.insert(nonce), "nonce repeated at counter {counter}");
            assert_eq!(invert(nonce), counter);
        }
    }
}
