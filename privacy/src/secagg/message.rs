//! The SecAgg+ messages, one per protocol step, as `serde` structs for
//! fedquic's control stream (postcard). Every message has a `validate()` that
//! bounds each vector it carries and checks every fixed-size field, so a
//! decoded message from a peer can be checked before anything is done with it;
//! the state machines call it on every message they receive.

use serde::{Deserialize, Serialize};

use super::SecAggError;
use super::shamir::Share;

/// Most neighbours a client may have in one round (and so most shares and
/// unmask entries any one message may carry).
pub const MAX_NEIGHBOURS: usize = 1024;
/// Roster indices are below this (so most clients per round).
pub const MAX_ROSTER: u32 = 1 << 20;
/// Bytes of an encrypted share's plaintext: from (4), to (4), round (8), and
/// two shares (x: 4, five limbs: 40).
pub const SHARE_PLAINTEXT_LEN: usize = 4 + 4 + 8 + 2 * (4 + 8 * super::shamir::LIMBS);
/// Bytes of an encrypted share: plaintext plus the 16-byte Poly1305 tag.
pub const CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

fn bound(what: &'static str, len: usize, max: usize) -> Result<(), SecAggError> {
    if len > max {
        Err(SecAggError::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

fn index_ok(what: &'static str, index: u32) -> Result<(), SecAggError> {
    if index >= MAX_ROSTER {
        Err(SecAggError::BadIndex { what, index })
    } else {
        Ok(())
    }
}

/// Step 1, client to server: the client's two fresh X25519 public keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// The round.
    pub round: u64,
    /// Public key for encrypting shares to this client.
    pub cipher_pk: [u8; 32],
    /// Public key for agreeing pairwise masks with this client.
    pub mask_pk: [u8; 32],
}

impl AdvertiseKeys {
    /// Fixed size: nothing to bound.
    pub fn validate(&self) -> Result<(), SecAggError> {
        Ok(())
    }
}

/// One neighbour's roster index and public keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// The neighbour's roster index.
    pub index: u32,
    /// Its share-encryption public key.
    pub cipher_pk: [u8; 32],
    /// Its pairwise-mask public key.
    pub mask_pk: [u8; 32],
}

/// Step 2, server to client: the client's roster index, the Shamir threshold
/// and its neighbours in the communication graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbours {
    /// The round.
    pub round: u64,
    /// The recipient's own roster index.
    pub you: u32,
    /// Shares needed to reconstruct a secret of any client.
    pub threshold: u32,
    /// The recipient's neighbours.
    pub neighbours: Vec<NeighbourKeys>,
}

impl Neighbours {
    /// Bounds the neighbour list and every index.
    pub fn validate(&self) -> Result<(), SecAggError> {
        bound("neighbours", self.neighbours.len(), MAX_NEIGHBOURS)?;
        index_ok("you", self.you)?;
        for n in &self.neighbours {
            index_ok("neighbour", n.index)?;
        }
        Ok(())
    }
}

/// One encrypted share bundle (a share of the self-mask seed and a share of
/// the mask secret key) addressed to neighbour `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The recipient's roster index.
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext and tag, [`CIPHERTEXT_LEN`] bytes.
    pub ciphertext: Vec<u8>,
}

/// Step 3, client to server: one encrypted share bundle per neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    /// The round.
    pub round: u64,
    /// The bundles.
    pub shares: Vec<EncryptedShare>,
}

impl ShareKeys {
    /// Bounds the bundle count, every index and every ciphertext's length.
    pub fn validate(&self) -> Result<(), SecAggError> {
        bound("shares", self.shares.len(), MAX_NEIGHBOURS)?;
        for s in &self.shares {
            index_ok("share recipient", s.to)?;
            if s.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(SecAggError::CiphertextLength {
                    peer: s.to,
                    len: s.ciphertext.len(),
                });
            }
        }
        Ok(())
    }
}

/// A bundle relayed by the server from sender `from`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedShare {
    /// The sender's roster index.
    pub from: u32,
    /// The ciphertext as the sender produced it.
    pub ciphertext: Vec<u8>,
}

/// Step 4, server to client: the bundles addressed to the client by senders
/// whose shares the server accepted (U2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedShares {
    /// The round.
    pub round: u64,
    /// The bundles.
    pub shares: Vec<RelayedShare>,
}

impl RelayedShares {
    /// Bounds the bundle count, every index and every ciphertext's length.
    pub fn validate(&self) -> Result<(), SecAggError> {
        bound("relayed shares", self.shares.len(), MAX_NEIGHBOURS)?;
        for s in &self.shares {
            index_ok("share sender", s.from)?;
            if s.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(SecAggError::CiphertextLength {
                    peer: s.from,
                    len: s.ciphertext.len(),
                });
            }
        }
        Ok(())
    }
}

/// Step 6, server to client: which of the client's neighbours survived (send
/// your share of their self-mask seed) and which dropped after sharing (send
/// your share of their mask secret key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// The round.
    pub round: u64,
    /// Neighbours whose masked input arrived (U3).
    pub survivors: Vec<u32>,
    /// Neighbours that shared keys but sent no masked input (U2 \ U3).
    pub dropped: Vec<u32>,
}

impl UnmaskRequest {
    /// Bounds both lists together and every index.
    pub fn validate(&self) -> Result<(), SecAggError> {
        bound(
            "unmask request",
            self.survivors.len().saturating_add(self.dropped.len()),
            MAX_NEIGHBOURS,
        )?;
        for &i in self.survivors.iter().chain(self.dropped.iter()) {
            index_ok("unmask index", i)?;
        }
        Ok(())
    }
}

/// Step 6, client to server: the shares the request asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// The round.
    pub round: u64,
    /// (survivor's index, this client's share of the survivor's self-mask seed).
    pub self_mask_shares: Vec<(u32, Share)>,
    /// (dropped client's index, this client's share of its mask secret key).
    pub key_shares: Vec<(u32, Share)>,
}

impl UnmaskResponse {
    /// Bounds both lists together, every index and every share.
    pub fn validate(&self) -> Result<(), SecAggError> {
        bound(
            "unmask response",
            self.self_mask_shares
                .len()
                .saturating_add(self.key_shares.len()),
            MAX_NEIGHBOURS,
        )?;
        for (i, share) in self.self_mask_shares.iter().chain(self.key_shares.iter()) {
            index_ok("unmask index", *i)?;
            if !share.is_well_formed() {
                return Err(SecAggError::MalformedShare { about: *i });
            }
        }
        Ok(())
    }
}
