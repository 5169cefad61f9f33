//! Connection IDs for server endpoints: 64 bits that never repeat within an
//! endpoint, plus a keyed tag that lets a restarted aggregator recognise the
//! IDs its predecessor issued.
//!
//! Why not quinn's `HashedConnectionIdGenerator`: its 8-byte IDs carry a
//! 3-byte random nonce (16.7 million values) and a 5-byte tag. quinn checks
//! a new connection's IDs against the live ones, but not the source ID of a
//! stateless Retry, and it routes an Initial by its destination ID through the
//! live IDs first. So when a Retry's ID equals an ID already issued to an
//! established connection (about one Retry in 4,000 while ~4,000 connections
//! are open), the client's next Initials go to that connection, which drops
//! them as unexpected, and the client waits until its handshake times out
//! (BENCHMARKS.md, "Connections"). Here the 8-byte nonce is a keyed function
//! of a per-endpoint random salt and a counter: distinct for 2^64 IDs within
//! an endpoint, so a Retry can no longer collide with a live ID, and
//! unpredictable to anyone without the key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of the nonce, unique per endpoint.
const NONCE_LEN: usize = 8;
/// Bytes of the keyed tag over the nonce.
const TAG_LEN: usize = 4;
/// Length of every ID this generator issues.
pub const CID_LEN: usize = NONCE_LEN + TAG_LEN;

/// Issues `CID_LEN`-byte connection IDs: `nonce || tag`, where `nonce` is
/// HMAC-SHA256(key, "nonce" || salt || counter) truncated to 8 bytes and
/// `tag` is HMAC-SHA256(key, "tag" || nonce) truncated to 4.
pub struct KeyedCidGenerator {
    key: hmac::Key,
    salt: [u8; 16],
    counter: u64,
}

impl KeyedCidGenerator {
    /// A generator whose tags verify under `key` (the same key after a
    /// restart recognises the old IDs); the nonces of each generator differ.
    pub fn new(key: hmac::Key) -> Self {
        KeyedCidGenerator {
            key,
            salt: fresh_salt(),
            counter: 0,
        }
    }

    /// A generator with a random key (endpoints without a reset secret).
    pub fn random() -> Self {
        let key_bytes = fresh_salt();
        Self::new(hmac::Key::new(hmac::HMAC_SHA256, &key_bytes))
    }

    fn tag(&self, nonce: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"tag");
        ctx.update(nonce);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        tag
    }
}

impl ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let n = self.counter;
        self.counter = self.counter.wrapping_add(1);
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"nonce");
        ctx.update(&self.salt);
        ctx.update(&n.to_le_bytes());
        let mut bytes = [0u8; CID_LEN];
        bytes[..NONCE_LEN].copy_from_slice(&ctx.sign().as_ref()[..NONCE_LEN]);
        let tag = self.tag(&bytes[..NONCE_LEN]);
        bytes[NONCE_LEN..].copy_from_slice(&tag);
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
/// restarts (uniqueness then rests on the counter, secrecy on the key).
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
        // of 2^24: about 50% by 4,800, and certainly by 16.7 million); ours
        // must not repeat at all.
        let ids: Vec<ConnectionId> = (0..200_000).map(|_| generator.generate_cid()).collect();
        let distinct: HashSet<&[u8]> = ids.iter().map(|id| &id[..]).collect();
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
}
