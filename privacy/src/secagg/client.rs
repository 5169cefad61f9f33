//! The client's side of one SecAgg+ round.

use core::fmt;

use chacha20::ChaCha20Rng;
use rand::{Rng, SeedableRng};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::crypto::{self, Bundle};
use super::message::{
    AdvertiseKeys, EncryptedShare, Neighbours, RelayedShares, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};
use super::prg::{Sign, apply_prg};
use super::shamir::{self, Share};
use super::{SecAggError, UnmaskRefusal};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitNeighbours,
    AwaitShares,
    ReadyToMask,
    Masked,
    Answered,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitNeighbours => "awaiting neighbours",
            State::AwaitShares => "awaiting relayed shares",
            State::ReadyToMask => "ready to mask",
            State::Masked => "masked, awaiting the unmask request",
            State::Answered => "done (unmask request received)",
        }
    }
}

struct Peer {
    index: u32,
    /// X25519(c_sk_u, c_pk_v): keys the share bundles in both directions.
    cipher_shared: Zeroizing<[u8; 32]>,
    /// s_uv.
    mask_seed: Zeroizing<[u8; 32]>,
    /// The peer's bundle, once relayed: (share of b_v, share of s_sk_v).
    /// `Some` exactly for the neighbours in U2.
    held: Option<(Share, Share)>,
}

/// One client's state for one SecAgg+ round: its fresh keys, its neighbours,
/// the shares it holds for them. Drive it with the server's messages in
/// order; every method checks the message against the state and returns a
/// typed error instead of acting on anything malformed. Secrets are zeroed
/// when it is dropped.
pub struct ClientRound {
    round: u64,
    vector_len: usize,
    rng: ChaCha20Rng,
    cipher_sk: StaticSecret,
    mask_sk: StaticSecret,
    cipher_pk: [u8; 32],
    mask_pk: [u8; 32],
    state: State,
    me: u32,
    threshold: usize,
    /// Sorted by index.
    peers: Vec<Peer>,
    self_mask_seed: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for ClientRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRound")
            .field("round", &self.round)
            .field("state", &self.state.name())
            .field("index", &self.me)
            .field("neighbours", &self.peers.len())
            .finish_non_exhaustive()
    }
}

fn draw32(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

impl ClientRound {
    /// Starts a round: draws the two key pairs from `seed` (which must be
    /// fresh and secret for every round) and returns the keys to advertise.
    /// `vector_len` is the length of the input [`ClientRound::mask`] takes.
    pub fn new(round: u64, vector_len: usize, seed: [u8; 32]) -> (ClientRound, AdvertiseKeys) {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let cipher_sk = StaticSecret::from(draw32(&mut rng));
        let mask_sk = StaticSecret::from(draw32(&mut rng));
        let cipher_pk = crypto::public_of(&cipher_sk);
        let mask_pk = crypto::public_of(&mask_sk);
        let client = ClientRound {
            round,
            vector_len,
            rng,
            cipher_sk,
            mask_sk,
            cipher_pk,
            mask_pk,
            state: State::AwaitNeighbours,
            me: 0,
            threshold: 0,
            peers: Vec::new(),
            self_mask_seed: Zeroizing::new([0u8; 32]),
        };
        let msg = AdvertiseKeys {
            round,
            cipher_pk,
            mask_pk,
        };
        (client, msg)
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// This client's roster index (meaningful once neighbours have arrived).
    pub fn index(&self) -> u32 {
        self.me
    }

    fn expect_state(&self, want: State, what: &'static str) -> Result<(), SecAggError> {
        if self.state == want {
            Ok(())
        } else {
            Err(SecAggError::OutOfOrder {
                what,
                state: self.state.name(),
            })
        }
    }

    fn check_round(&self, got: u64) -> Result<(), SecAggError> {
        if got == self.round {
            Ok(())
        } else {
            Err(SecAggError::WrongRound {
                expected: self.round,
                got,
            })
        }
    }

    /// Step 2 to 3: checks the neighbour list (not itself, no index or key
    /// twice, at most [`super::MAX_NEIGHBOURS`], k/2 < t <= k, no low-order
    /// key), then shares the fresh self-mask seed b_u and the mask secret key
    /// among the neighbours and encrypts one bundle to each. On error nothing
    /// changes and nothing was sent.
    pub fn on_neighbours(&mut self, msg: &Neighbours) -> Result<ShareKeys, SecAggError> {
        self.expect_state(State::AwaitNeighbours, "on_neighbours")?;
        self.check_round(msg.round)?;
        msg.validate()?;
        let k = msg.neighbours.len();
        let t = msg.threshold as usize;
        if k == 0 || t == 0 || 2 * t <= k || t > k {
            return Err(SecAggError::BadThreshold {
                threshold: t,
                degree: k,
            });
        }
        let me = msg.you;
        let mut indices: Vec<u32> = msg.neighbours.iter().map(|n| n.index).collect();
        indices.sort_unstable();
        for w in indices.windows(2) {
            if w[0] == w[1] {
                return Err(SecAggError::DuplicateNeighbour(w[0]));
            }
        }
        if indices.binary_search(&me).is_ok() {
            return Err(SecAggError::SelfAsNeighbour(me));
        }
        let mut keys: Vec<([u8; 32], u32)> = Vec::with_capacity(2 * k + 2);
        keys.push((self.cipher_pk, me));
        keys.push((self.mask_pk, me));
        for n in &msg.neighbours {
            keys.push((n.cipher_pk, n.index));
            keys.push((n.mask_pk, n.index));
        }
        keys.sort_unstable();
        for w in keys.windows(2) {
            if w[0].0 == w[1].0 {
                let who = if w[0].1 == me { w[1].1 } else { w[0].1 };
                return Err(SecAggError::DuplicateKey(format!("neighbour {who}")));
            }
        }
        let mut peers = Vec::with_capacity(k);
        for n in &msg.neighbours {
            let weak = || SecAggError::WeakKey(format!("neighbour {}", n.index));
            let cipher_shared = crypto::dh(&self.cipher_sk, &n.cipher_pk).ok_or_else(weak)?;
            let mask_shared =
                Zeroizing::new(crypto::dh(&self.mask_sk, &n.mask_pk).ok_or_else(weak)?);
            let mask_seed = crypto::mask_seed(&mask_shared, self.round)?;
            peers.push(Peer {
                index: n.index,
                cipher_shared: Zeroizing::new(cipher_shared),
                mask_seed: Zeroizing::new(mask_seed),
                held: None,
            });
        }
        peers.sort_unstable_by_key(|p| p.index);
        // Everything checked: draw the secrets and deal.
        let self_mask_seed = Zeroizing::new(draw32(&mut self.rng));
        let holders: Vec<u32> = peers.iter().map(|p| p.index).collect();
        let b_shares = shamir::split(&self_mask_seed, t, &holders, &mut self.rng)?;
        let sk_bytes = Zeroizing::new(self.mask_sk.to_bytes());
        let s_shares = shamir::split(&sk_bytes, t, &holders, &mut self.rng)?;
        let mut shares = Vec::with_capacity(k);
        for ((p, b), s) in peers.iter().zip(b_shares).zip(s_shares) {
            let bundle = Bundle {
                from: me,
                to: p.index,
                round: self.round,
                self_mask: b,
                key: s,
            };
            shares.push(EncryptedShare {
                to: p.index,
                ciphertext: crypto::seal_bundle(&p.cipher_shared, &bundle)?,
            });
        }
        self.me = me;
        self.threshold = t;
        self.peers = peers;
        self.self_mask_seed = self_mask_seed;
        self.state = State::AwaitShares;
        Ok(ShareKeys {
            round: self.round,
            shares,
        })
    }

    /// Step 4: decrypts and checks the bundles the server relays (sender a
    /// neighbour, not twice, authenticates, names this round, sender and
    /// recipient, shares well formed at this client's point). The senders are
    /// the neighbours in U2: only they get pairwise masks. A bad bundle is an
    /// error naming its sender; fewer than t senders is an error too (the
    /// client's own self-mask seed could then never be recovered). On error
    /// nothing changes.
    pub fn on_relayed_shares(&mut self, msg: &RelayedShares) -> Result<(), SecAggError> {
        self.expect_state(State::AwaitShares, "on_relayed_shares")?;
        self.check_round(msg.round)?;
        msg.validate()?;
        let my_x = shamir::point_of(self.me)?;
        let mut got: Vec<Option<(Share, Share)>> = vec![None; self.peers.len()];
        for r in &msg.shares {
            let bad = |reason| SecAggError::BadShare {
                from: r.from,
                reason,
            };
            let pos = self
                .peers
                .binary_search_by_key(&r.from, |p| p.index)
                .map_err(|_| bad("not a neighbour"))?;
            if got[pos].is_some() {
                return Err(bad("relayed twice"));
            }
            let peer = &self.peers[pos];
            let bundle = crypto::open_bundle(
                &peer.cipher_shared,
                self.round,
                r.from,
                self.me,
                &r.ciphertext,
            )?
            .ok_or_else(|| bad("does not authenticate"))?;
            if bundle.round != self.round {
                return Err(bad("wrong round inside"));
            }
            if bundle.from != r.from || bundle.to != self.me {
                return Err(bad("wrong indices inside"));
            }
            for s in [&bundle.self_mask, &bundle.key] {
                if !s.is_well_formed() || s.x != my_x {
                    return Err(bad("malformed share"));
                }
            }
            got[pos] = Some((bundle.self_mask, bundle.key));
        }
        let live = got.iter().filter(|g| g.is_some()).count();
        if live < self.threshold {
            return Err(SecAggError::TooFewNeighbours {
                have: live,
                threshold: self.threshold,
            });
        }
        for (p, g) in self.peers.iter_mut().zip(got) {
            p.held = g;
        }
        self.state = State::ReadyToMask;
        Ok(())
    }

    /// Step 5, exactly once: masks the quantised input in place,
    /// y = x + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^32, + when this
    /// client's index is below v's.
    pub fn mask(&mut self, input: &mut [u32]) -> Result<(), SecAggError> {
        self.expect_state(State::ReadyToMask, "mask")?;
        if input.len() != self.vector_len {
            return Err(SecAggError::VectorLength {
                expected: self.vector_len,
                got: input.len(),
            });
        }
        apply_prg(&self.self_mask_seed, input, Sign::Add);
        for p in self.peers.iter().filter(|p| p.held.is_some()) {
            let sign = if self.me < p.index {
                Sign::Add
            } else {
                Sign::Sub
            };
            apply_prg(&p.mask_seed, input, sign);
        }
        self.state = State::Masked;
        Ok(())
    }

    /// Step 6: answers the server's one unmask request of the round with this
    /// client's share of b_v for each named survivor v and of s_sk_v for each
    /// named dropped v.
    ///
    /// An honest client refuses, answering nothing, when the request
    /// - is not the first of the round (a refused one counts too: a server
    ///   gets one try, so it cannot ask for b_v and later for s_sk_v);
    /// - names an index in both lists, or twice in one;
    /// - names an index that is not a neighbour whose bundle it holds (U2);
    /// - names fewer than t survivors.
    ///
    /// The last check is the papers' |U3| >= t (Bonawitz et al., Round 4),
    /// restricted to the neighbourhood. There every user holds a share of
    /// its own secrets, so "survivors including myself" is what can answer;
    /// here a client deals only to its neighbours, so the holders of this
    /// client's own b_u are exactly its neighbours in U3, and the round can
    /// only finish if at least t of them survive. We therefore refuse when
    /// |survivors| < t, which implies refusing when |survivors ∪ {me}| < t:
    /// it is the stricter of the two and never refuses a round that could
    /// still finish, since this client is itself in U3 and its b_u needs t
    /// answering neighbours.
    pub fn on_unmask(&mut self, msg: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        match self.state {
            State::Masked => {}
            State::Answered => {
                return Err(SecAggError::UnmaskRefused(UnmaskRefusal::AlreadyRequested));
            }
            _ => self.expect_state(State::Masked, "on_unmask")?,
        }
        self.check_round(msg.round)?;
        // From here on the request is consumed, whatever the outcome.
        self.state = State::Answered;
        msg.validate()?;
        let refuse = |r| Err(SecAggError::UnmaskRefused(r));
        let mut named: Vec<(u32, bool)> = msg
            .survivors
            .iter()
            .map(|&i| (i, true))
            .chain(msg.dropped.iter().map(|&i| (i, false)))
            .collect();
        named.sort_unstable();
        for w in named.windows(2) {
            if w[0].0 == w[1].0 {
                return if w[0].1 == w[1].1 {
                    refuse(UnmaskRefusal::Repeated(w[0].0))
                } else {
                    refuse(UnmaskRefusal::BothLists(w[0].0))
                };
            }
        }
        let held = |i: u32| -> Result<(Share, Share), SecAggError> {
            self.peers
                .binary_search_by_key(&i, |p| p.index)
                .ok()
                .and_then(|pos| self.peers[pos].held)
                .ok_or(SecAggError::UnmaskRefused(UnmaskRefusal::NotANeighbour(i)))
        };
        let mut self_mask_shares = Vec::with_capacity(msg.survivors.len());
        for &v in &msg.survivors {
            self_mask_shares.push((v, held(v)?.0));
        }
        let mut key_shares = Vec::with_capacity(msg.dropped.len());
        for &v in &msg.dropped {
            key_shares.push((v, held(v)?.1));
        }
        if msg.survivors.len() < self.threshold {
            return refuse(UnmaskRefusal::TooFewSurvivors {
                survivors: msg.survivors.len(),
                threshold: self.threshold,
            });
        }
        Ok(UnmaskResponse {
            round: self.round,
            self_mask_shares,
            key_shares,
        })
    }
}
