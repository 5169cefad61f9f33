//! SecAgg+ secure aggregation: the server learns the sum of the clients'
//! (quantised) updates and nothing else about any one of them, and the sum
//! survives clients dropping out at any step.
//!
//! The protocol is that of Bonawitz et al., "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning", CCS 2017, with the k-regular
//! communication graph of Bell et al., "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+): each client shares secrets
//! with, and masks against, only its k neighbours. It is the semi-honest
//! variant (no consistency-check round, no signatures): the server is trusted
//! to follow the protocol; the clients' checks below keep an honest client
//! from being the one that reveals an input.
//!
//! One round, all keys fresh per round and every random choice drawn from a
//! caller-given seed (this module has no sockets, clocks or threads):
//!
//! 1. **Advertise keys** ([`AdvertiseKeys`]): two X25519 key pairs per client,
//!    c (encrypting shares) and s (pairwise masks).
//! 2. **Neighbours** ([`Neighbours`]): the server closes with U1, gives every
//!    client a roster index (by sorted name) and its neighbours in a k-regular
//!    graph over U1 ([`graph`]: a circulant graph over a seeded permutation),
//!    and the Shamir threshold t, with k/2 < t <= k ([`Threshold`]).
//! 3. **Share keys** ([`ShareKeys`]): client u draws a self-mask seed b_u and
//!    Shamir-shares b_u and s_sk_u among its neighbours (threshold t); each
//!    neighbour's pair of shares is encrypted with ChaCha20-Poly1305 under
//!    HKDF-SHA256(X25519(c_sk_u, c_pk_v), round, u -> v) (module `crypto`).
//! 4. **Relay** ([`RelayedShares`]): the server closes with U2 and forwards
//!    each client the bundles addressed to it by senders in U2.
//! 5. **Masked input**: y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv)
//!    mod 2^32, + when u < v. PRG is the AES-128-CTR keystream ([`prg`]).
//! 6. **Unmask** ([`UnmaskRequest`], [`UnmaskResponse`]): the server closes
//!    with U3 and asks each client in U3, for each of its neighbours, either a
//!    share of b (neighbour in U3) or of s_sk (neighbour in U2 \ U3), never
//!    both.
//! 7. **Finish** ([`Unmasked`]): with t shares of each needed secret (all
//!    counts checked before anything is reconstructed) the server removes the
//!    self masks of U3 and the pairwise masks U3 added for the dropped, and
//!    holds Σ_{u ∈ U3} x_u.
//!
//! Why an honest client never helps reveal an input: the server needs t
//! shares of b_u (to strip u's self mask) *and* t shares of s_sk_u (to strip
//! its pairwise masks) to see x_u. Each honest neighbour answers one request
//! per round and names each neighbour in at most one list, so the two sets of
//! answering neighbours are disjoint; with t > k/2 they cannot both reach t.
//! On top of that a client refuses a request naming fewer than t surviving
//! neighbours: see [`ClientRound::on_unmask`].
//!
//! Shamir sharing is our own, over GF(2^61 - 1) ([`shamir`] says why); inputs
//! are quantised with [`FixedPoint`] so the sum of up to a stated number of
//! clients cannot wrap mod 2^32.

#![forbid(unsafe_code)]
// Nothing here may panic on what a peer sends: no unwrap/expect outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod client;
mod crypto;
pub mod fixed_point;
pub mod graph;
pub mod message;
pub mod prg;
mod server;
pub mod shamir;

pub use client::ClientRound;
pub use fixed_point::{FixedPoint, FixedPointError};
pub use message::{
    AdvertiseKeys, CIPHERTEXT_LEN, EncryptedShare, MAX_NEIGHBOURS, MAX_ROSTER, NeighbourKeys,
    Neighbours, RelayedShare, RelayedShares, ShareKeys, UnmaskRequest, UnmaskResponse,
};
pub use server::{ServerParams, ServerRound, Unmasked};
pub use shamir::{ShamirError, Share};

/// The phase a [`ServerRound`] is in: which client message it accepts now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Collecting [`AdvertiseKeys`].
    AdvertiseKeys,
    /// Collecting [`ShareKeys`].
    ShareKeys,
    /// Collecting masked inputs.
    MaskedInput,
    /// Collecting [`UnmaskResponse`]s; [`ServerRound::finish`] ends it.
    Unmask,
    /// The round failed at a phase close; it accepts nothing more.
    Done,
}

/// Which secret a share is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareKind {
    /// The self-mask seed b_u of a client whose masked input arrived.
    SelfMask,
    /// The mask secret key s_sk_v of a client that dropped after sharing.
    MaskKey,
}

/// The Shamir threshold, resolved each round against the graph's degree k.
/// Whatever is asked, the resolved t satisfies k/2 < t <= k (Bell et al.:
/// a majority of the neighbourhood), so it is raised to ⌊k/2⌋ + 1 when lower.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// t = ⌈f·k⌉, f in (0, 1].
    Fraction(f64),
    /// A fixed t; a round whose degree is below it fails at the advertise close.
    Absolute(usize),
}

impl Threshold {
    /// The threshold for a graph of degree `degree`.
    pub fn resolve(&self, degree: usize) -> Result<usize, SecAggError> {
        if degree == 0 {
            return Err(SecAggError::BadThreshold {
                threshold: 0,
                degree,
            });
        }
        let majority = degree / 2 + 1;
        let t = match *self {
            Threshold::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(SecAggError::BadParams(
                        "threshold fraction must be in (0, 1]",
                    ));
                }
                let t = (f * degree as f64).ceil() as usize;
                t.clamp(majority, degree)
            }
            Threshold::Absolute(t) => t.max(majority),
        };
        if t > degree {
            return Err(SecAggError::BadThreshold {
                threshold: t,
                degree,
            });
        }
        Ok(t)
    }
}

/// Why an honest client refused an [`UnmaskRequest`] (and answered nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnmaskRefusal {
    /// A request for this round was already received (answered or refused).
    AlreadyRequested,
    /// The index is named both as a survivor and as dropped.
    BothLists(u32),
    /// The index is named twice in one list.
    Repeated(u32),
    /// The index is not one of this client's neighbours whose shares it holds.
    NotANeighbour(u32),
    /// Fewer than t of the client's neighbours are named as survivors.
    TooFewSurvivors {
        /// Survivors named.
        survivors: usize,
        /// The threshold.
        threshold: usize,
    },
}

/// Everything that can go wrong in a SecAgg+ round. Messages from peers never
/// cause a panic; they cause one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// A message for another round.
    #[error("message for round {got}, this is round {expected}")]
    WrongRound {
        /// This round.
        expected: u64,
        /// The message's round.
        got: u64,
    },
    /// The server got a message its current phase does not accept.
    #[error("{what} is not accepted in phase {phase:?}")]
    OutOfPhase {
        /// What arrived.
        what: &'static str,
        /// The phase.
        phase: Phase,
    },
    /// A client-side call in the wrong order.
    #[error("{what} called while the client is {state}")]
    OutOfOrder {
        /// The call.
        what: &'static str,
        /// The client's state.
        state: &'static str,
    },
    /// A message from a client the round does not know.
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    /// A client that does not owe this phase's message (it dropped earlier).
    #[error("client {client:?} is not part of the {what} phase")]
    NotExpected {
        /// The client.
        client: String,
        /// The phase's message.
        what: &'static str,
    },
    /// A second message of one kind from one client.
    #[error("duplicate {what} from client {client:?}")]
    Duplicate {
        /// The client.
        client: String,
        /// What it sent twice.
        what: &'static str,
    },
    /// A vector longer than allowed.
    #[error("{what}: {len} entries, at most {max}")]
    TooLong {
        /// Which vector.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A roster index out of range.
    #[error("{what}: index {index} out of range")]
    BadIndex {
        /// Which field.
        what: &'static str,
        /// The index.
        index: u32,
    },
    /// An encrypted share of the wrong length.
    #[error("ciphertext for/from {peer}: {len} bytes, expected {CIPHERTEXT_LEN}")]
    CiphertextLength {
        /// The peer it is addressed to or from.
        peer: u32,
        /// Its length.
        len: usize,
    },
    /// A share that is not a field point.
    #[error("malformed share about client {about}")]
    MalformedShare {
        /// The index of the client it is a share of.
        about: u32,
    },
    /// Unusable round parameters.
    #[error("bad parameters: {0}")]
    BadParams(&'static str),
    /// A threshold outside k/2 < t <= k.
    #[error("threshold {threshold} is not within k/2 < t <= k for k = {degree}")]
    BadThreshold {
        /// The threshold.
        threshold: usize,
        /// The degree k.
        degree: usize,
    },
    /// The client's own index in its neighbour list.
    #[error("neighbour list names the client itself ({0})")]
    SelfAsNeighbour(u32),
    /// A neighbour listed twice.
    #[error("neighbour {0} listed twice")]
    DuplicateNeighbour(u32),
    /// A public key used twice (by two clients, or twice by one).
    #[error("public key of {0} is used more than once")]
    DuplicateKey(String),
    /// A public key of small order (X25519 gives a non-contributory secret)
    /// or not on the curve.
    #[error("public key of {0} is not a usable X25519 key (small order or not on the curve)")]
    WeakKey(String),
    /// An index that is not a neighbour of the client concerned.
    #[error("{0} is not a neighbour")]
    NotANeighbour(u32),
    /// A relayed share bundle that is bad; names the sender.
    #[error("share bundle from {from}: {reason}")]
    BadShare {
        /// The sender's index.
        from: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// Fewer than t neighbours are left to hold a client's shares.
    #[error("only {have} neighbours left, threshold {threshold}")]
    TooFewNeighbours {
        /// Neighbours left.
        have: usize,
        /// The threshold.
        threshold: usize,
    },
    /// A vector of the wrong length.
    #[error("vector of length {got}, expected {expected}")]
    VectorLength {
        /// The round's vector length.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A `ShareKeys` that does not address each neighbour exactly once.
    #[error("client {client:?} sent {got} share bundles for {expected} neighbours")]
    IncompleteShares {
        /// The client.
        client: String,
        /// Bundles sent.
        got: usize,
        /// Neighbours.
        expected: usize,
    },
    /// An `UnmaskResponse` that does not answer exactly what was asked.
    #[error("unmask response from {client:?}: {reason}")]
    BadResponse {
        /// The client.
        client: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A phase closed with fewer clients than the round's minimum.
    #[error("phase {phase:?} closed with {have} clients, at least {min} needed")]
    TooFewClients {
        /// The phase that closed.
        phase: Phase,
        /// Clients left.
        have: usize,
        /// The minimum.
        min: usize,
    },
    /// The honest client refuses the unmask request.
    #[error("unmask request refused: {0:?}")]
    UnmaskRefused(UnmaskRefusal),
    /// Not enough shares to reconstruct some secret: the round fails and
    /// nothing is reconstructed. Names the first short client.
    #[error(
        "{short} secrets lack shares; first: {kind:?} of {client:?} (index {index}) has {have} of {need}"
    )]
    NotEnoughShares {
        /// The first short client.
        client: String,
        /// Its index.
        index: u32,
        /// Which of its secrets.
        kind: ShareKind,
        /// Shares there are (or neighbours left to give them).
        have: usize,
        /// The threshold.
        need: usize,
        /// How many secrets in all are short.
        short: usize,
    },
    /// Reconstruction failed: shares inconsistent or malformed.
    #[error("reconstructing {kind:?} of {client:?}: {source}")]
    Reconstruction {
        /// The client whose secret it is.
        client: String,
        /// Which secret.
        kind: ShareKind,
        /// Why.
        source: ShamirError,
    },
    /// A reconstructed mask key does not match the key the client advertised.
    #[error("reconstructed mask key of {0:?} does not match its advertised key")]
    KeyMismatch(String),
    /// Shamir sharing failed (parameters).
    #[error("shamir: {0}")]
    Shamir(#[from] ShamirError),
    /// A primitive failed where it cannot for valid lengths.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}
