//! The server's side of one SecAgg+ round.

use std::collections::{HashMap, HashSet};

use x25519_dalek::StaticSecret;

use super::crypto;
use super::graph::{self, Graph};
use super::message::{
    AdvertiseKeys, MAX_ROSTER, NeighbourKeys, Neighbours, RelayedShare, RelayedShares, ShareKeys,
    UnmaskRequest, UnmaskResponse,
};
use super::prg::{Sign, apply_prg};
use super::shamir::{self, Share};
use super::{Phase, SecAggError, ShareKind, Threshold};

/// A round's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerParams {
    /// The round; every message must carry it.
    pub round: u64,
    /// Length of every masked vector.
    pub vector_len: usize,
    /// Requested degree k of the communication graph (complete when k >= n - 1).
    pub degree: usize,
    /// The Shamir threshold, resolved against the graph's degree.
    pub threshold: Threshold,
    /// Fewest clients any phase may close with (at least 2 is enforced).
    pub min_clients: usize,
    /// Seed of the graph's permutation (mixed with the round).
    pub graph_seed: u64,
}

/// What a successful round yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmasked {
    /// Σ x_u mod 2^32 over the contributors.
    pub sum: Vec<u32>,
    /// The clients whose inputs are in the sum (U3), in roster order.
    pub contributors: Vec<String>,
}

/// One sender's bundles, sorted by recipient.
type Bundles = Vec<(u32, Vec<u8>)>;

struct Member {
    name: String,
    cipher_pk: [u8; 32],
    mask_pk: [u8; 32],
}

/// The server's state for one SecAgg+ round. Messages arrive through the
/// `on_*` methods (each checked; a bad one is a typed error and changes
/// nothing), the caller closes each phase when it stops waiting, and
/// [`ServerRound::finish`] yields the sum. The running sum is the only
/// vector-sized state (O(P) memory, not per client).
pub struct ServerRound {
    params: ServerParams,
    phase: Phase,
    // Advertise phase.
    advertised: Vec<(String, AdvertiseKeys)>,
    advertised_names: HashSet<String>,
    keys_seen: HashSet<[u8; 32]>,
    // From close_advertise on: roster index -> member.
    members: Vec<Member>,
    by_name: HashMap<String, u32>,
    graph: Graph,
    threshold: usize,
    /// Per sender: its bundles, sorted by recipient (dropped at close_sharing).
    bundles: Vec<Option<Bundles>>,
    in_u2: Vec<bool>,
    in_u3: Vec<bool>,
    responded: Vec<bool>,
    sum: Vec<u32>,
    /// Shares of b_u, indexed by u.
    self_mask_shares: Vec<Vec<Share>>,
    /// Shares of s_sk_v, indexed by v.
    key_shares: Vec<Vec<Share>>,
}

impl core::fmt::Debug for ServerRound {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerRound")
            .field("params", &self.params)
            .field("phase", &self.phase)
            .field("clients", &self.members.len().max(self.advertised.len()))
            .finish_non_exhaustive()
    }
}

fn count(v: &[bool]) -> usize {
    v.iter().filter(|&&b| b).count()
}

impl ServerRound {
    /// A round waiting for keys.
    pub fn new(params: ServerParams) -> Self {
        ServerRound {
            params,
            phase: Phase::AdvertiseKeys,
            advertised: Vec::new(),
            advertised_names: HashSet::new(),
            keys_seen: HashSet::new(),
            members: Vec::new(),
            by_name: HashMap::new(),
            graph: Graph {
                adjacency: Vec::new(),
                degree: 0,
            },
            threshold: 0,
            bundles: Vec::new(),
            in_u2: Vec::new(),
            in_u3: Vec::new(),
            responded: Vec::new(),
            sum: Vec::new(),
            self_mask_shares: Vec::new(),
            key_shares: Vec::new(),
        }
    }

    /// The phase the round is in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The threshold t of the round (0 before the advertise phase closes).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether `client` still owes the current phase's message. In the
    /// advertise phase that is any client that has not advertised.
    pub fn expects(&self, client: &str) -> bool {
        let idx = |c: &str| self.by_name.get(c).map(|&i| i as usize);
        match self.phase {
            Phase::AdvertiseKeys => !self.advertised_names.contains(client),
            Phase::ShareKeys => idx(client).is_some_and(|i| self.bundles[i].is_none()),
            Phase::MaskedInput => idx(client).is_some_and(|i| self.in_u2[i] && !self.in_u3[i]),
            Phase::Unmask => idx(client).is_some_and(|i| self.in_u3[i] && !self.responded[i]),
            Phase::Done => false,
        }
    }

    fn expect_phase(&self, want: Phase, what: &'static str) -> Result<(), SecAggError> {
        if self.phase == want {
            Ok(())
        } else {
            Err(SecAggError::OutOfPhase {
                what,
                phase: self.phase,
            })
        }
    }

    fn check_round(&self, got: u64) -> Result<(), SecAggError> {
        if got == self.params.round {
            Ok(())
        } else {
            Err(SecAggError::WrongRound {
                expected: self.params.round,
                got,
            })
        }
    }

    fn index_of(&self, client: &str) -> Result<usize, SecAggError> {
        self.by_name
            .get(client)
            .map(|&i| i as usize)
            .ok_or_else(|| SecAggError::UnknownClient(client.to_string()))
    }

    fn min_clients(&self) -> usize {
        self.params.min_clients.max(2)
    }

    fn fail_if_short(&mut self, phase: Phase, have: usize) -> Result<(), SecAggError> {
        let min = self.min_clients();
        if have < min {
            self.phase = Phase::Done;
            return Err(SecAggError::TooFewClients { phase, have, min });
        }
        Ok(())
    }

    /// Step 1: a client's keys. Refuses a second message from one client, a
    /// key already used (by anyone, or both keys equal) and low-order keys, so
    /// that one client cannot make its neighbours' checks fail.
    pub fn on_keys(&mut self, client: &str, msg: &AdvertiseKeys) -> Result<(), SecAggError> {
        self.expect_phase(Phase::AdvertiseKeys, "AdvertiseKeys")?;
        self.check_round(msg.round)?;
        msg.validate()?;
        if self.advertised_names.contains(client) {
            return Err(SecAggError::Duplicate {
                client: client.to_string(),
                what: "AdvertiseKeys",
            });
        }
        if self.advertised.len() >= MAX_ROSTER as usize {
            return Err(SecAggError::TooLong {
                what: "clients",
                len: self.advertised.len() + 1,
                max: MAX_ROSTER as usize,
            });
        }
        if msg.cipher_pk == msg.mask_pk
            || self.keys_seen.contains(&msg.cipher_pk)
            || self.keys_seen.contains(&msg.mask_pk)
        {
            return Err(SecAggError::DuplicateKey(client.to_string()));
        }
        if crypto::is_weak_key(&msg.cipher_pk) || crypto::is_weak_key(&msg.mask_pk) {
            return Err(SecAggError::WeakKey(client.to_string()));
        }
        self.keys_seen.insert(msg.cipher_pk);
        self.keys_seen.insert(msg.mask_pk);
        self.advertised_names.insert(client.to_string());
        self.advertised.push((client.to_string(), msg.clone()));
        Ok(())
    }

    /// Closes the advertise phase with U1 = the clients that advertised:
    /// roster indices by sorted name, the graph, the threshold, and one
    /// [`Neighbours`] message per client.
    pub fn close_advertise(&mut self) -> Result<Vec<(String, Neighbours)>, SecAggError> {
        self.expect_phase(Phase::AdvertiseKeys, "close_advertise")?;
        let n = self.advertised.len();
        self.fail_if_short(Phase::AdvertiseKeys, n)?;
        let mut advertised = std::mem::take(&mut self.advertised);
        advertised.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.params.graph_seed.to_le_bytes());
        seed[8..16].copy_from_slice(&self.params.round.to_le_bytes());
        seed[16..29].copy_from_slice(b"fedquic-graph");
        let built = graph::build(n, self.params.degree, seed).and_then(|g| {
            let t = self.params.threshold.resolve(g.degree)?;
            let t32 = u32::try_from(t).map_err(|_| SecAggError::BadParams("threshold"))?;
            Ok((g, t, t32))
        });
        let (graph, threshold, t32) = match built {
            Ok(v) => v,
            Err(e) => {
                self.phase = Phase::Done;
                return Err(e);
            }
        };
        self.members = advertised
            .into_iter()
            .map(|(name, k)| Member {
                name,
                cipher_pk: k.cipher_pk,
                mask_pk: k.mask_pk,
            })
            .collect();
        self.by_name = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i as u32))
            .collect();
        let out = graph
            .adjacency
            .iter()
            .enumerate()
            .map(|(i, adj)| {
                let neighbours = adj
                    .iter()
                    .map(|&j| {
                        let m = &self.members[j as usize];
                        NeighbourKeys {
                            index: j,
                            cipher_pk: m.cipher_pk,
                            mask_pk: m.mask_pk,
                        }
                    })
                    .collect();
                (
                    self.members[i].name.clone(),
                    Neighbours {
                        round: self.params.round,
                        you: i as u32,
                        threshold: t32,
                        neighbours,
                    },
                )
            })
            .collect();
        self.graph = graph;
        self.threshold = threshold;
        self.bundles = vec![None; n];
        self.in_u2 = vec![false; n];
        self.in_u3 = vec![false; n];
        self.responded = vec![false; n];
        self.keys_seen = HashSet::new();
        self.phase = Phase::ShareKeys;
        Ok(out)
    }

    /// Step 3: a client's encrypted bundles; well formed means exactly one
    /// bundle per neighbour, each of the right length.
    pub fn on_shares(&mut self, client: &str, msg: &ShareKeys) -> Result<(), SecAggError> {
        self.expect_phase(Phase::ShareKeys, "ShareKeys")?;
        let u = self.index_of(client)?;
        if self.bundles[u].is_some() {
            return Err(SecAggError::Duplicate {
                client: client.to_string(),
                what: "ShareKeys",
            });
        }
        self.check_round(msg.round)?;
        msg.validate()?;
        let adj = &self.graph.adjacency[u];
        if msg.shares.len() != adj.len() {
            return Err(SecAggError::IncompleteShares {
                client: client.to_string(),
                got: msg.shares.len(),
                expected: adj.len(),
            });
        }
        let mut list: Bundles = msg
            .shares
            .iter()
            .map(|s| (s.to, s.ciphertext.clone()))
            .collect();
        list.sort_unstable_by_key(|e| e.0);
        // Same length, sorted, so equal iff each neighbour exactly once.
        for (e, &v) in list.iter().zip(adj.iter()) {
            if e.0 != v {
                return Err(SecAggError::NotANeighbour(e.0));
            }
        }
        self.bundles[u] = Some(list);
        Ok(())
    }

    /// Closes sharing with U2 = the clients whose bundles were accepted, and
    /// gives each client in U2 the bundles addressed to it by senders in U2.
    pub fn close_sharing(&mut self) -> Result<Vec<(String, RelayedShares)>, SecAggError> {
        self.expect_phase(Phase::ShareKeys, "close_sharing")?;
        for (i, b) in self.bundles.iter().enumerate() {
            self.in_u2[i] = b.is_some();
        }
        let have = count(&self.in_u2);
        self.fail_if_short(Phase::ShareKeys, have)?;
        let bundles = std::mem::take(&mut self.bundles);
        let mut out = Vec::with_capacity(have);
        for (u, adj) in self.graph.adjacency.iter().enumerate() {
            if !self.in_u2[u] {
                continue;
            }
            let u32_ = u as u32;
            let shares = adj
                .iter()
                .filter_map(|&v| {
                    let list = bundles[v as usize].as_ref()?;
                    let pos = list.binary_search_by_key(&u32_, |e| e.0).ok()?;
                    Some(RelayedShare {
                        from: v,
                        ciphertext: list[pos].1.clone(),
                    })
                })
                .collect();
            out.push((
                self.members[u].name.clone(),
                RelayedShares {
                    round: self.params.round,
                    shares,
                },
            ));
        }
        self.sum = vec![0u32; self.params.vector_len];
        self.phase = Phase::MaskedInput;
        Ok(out)
    }

    /// Step 5: a client's masked vector, added into the running sum at once.
    pub fn on_masked_input(&mut self, client: &str, masked: &[u32]) -> Result<(), SecAggError> {
        self.expect_phase(Phase::MaskedInput, "masked input")?;
        let u = self.index_of(client)?;
        if !self.in_u2[u] {
            return Err(SecAggError::NotExpected {
                client: client.to_string(),
                what: "masked input",
            });
        }
        if self.in_u3[u] {
            return Err(SecAggError::Duplicate {
                client: client.to_string(),
                what: "masked input",
            });
        }
        if masked.len() != self.params.vector_len {
            return Err(SecAggError::VectorLength {
                expected: self.params.vector_len,
                got: masked.len(),
            });
        }
        for (s, &m) in self.sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(m);
        }
        self.in_u3[u] = true;
        Ok(())
    }

    fn request_lists(&self, u: usize) -> (Vec<u32>, Vec<u32>) {
        let adj = &self.graph.adjacency[u];
        let survivors = adj
            .iter()
            .copied()
            .filter(|&v| self.in_u3[v as usize])
            .collect();
        let dropped = adj
            .iter()
            .copied()
            .filter(|&v| self.in_u2[v as usize] && !self.in_u3[v as usize])
            .collect();
        (survivors, dropped)
    }

    /// Closes the masked-input phase with U3 and asks each client in U3, for
    /// each of its neighbours in U2, for one share: of b if the neighbour is
    /// in U3, of s_sk if it dropped. Fails at once (typed error) when some
    /// secret that must be reconstructed has fewer than t neighbours left in
    /// U3 to give shares: such a round could not finish.
    pub fn close_masked_input(&mut self) -> Result<Vec<(String, UnmaskRequest)>, SecAggError> {
        self.expect_phase(Phase::MaskedInput, "close_masked_input")?;
        let have = count(&self.in_u3);
        self.fail_if_short(Phase::MaskedInput, have)?;
        if let Err(e) = self.check_feasible(|v| self.in_u3[v], "neighbours in U3") {
            self.phase = Phase::Done;
            return Err(e);
        }
        let n = self.members.len();
        self.self_mask_shares = vec![Vec::new(); n];
        self.key_shares = vec![Vec::new(); n];
        let mut out = Vec::with_capacity(have);
        for u in 0..n {
            if !self.in_u3[u] {
                continue;
            }
            let (survivors, dropped) = self.request_lists(u);
            out.push((
                self.members[u].name.clone(),
                UnmaskRequest {
                    round: self.params.round,
                    survivors,
                    dropped,
                },
            ));
        }
        self.phase = Phase::Unmask;
        Ok(out)
    }

    /// For every secret to reconstruct (b_u for u in U3, s_sk_v for v in
    /// U2 \ U3), counts `holder(w)` over its owner's neighbours; errors with
    /// the first short one and the number short.
    fn check_feasible(
        &self,
        holder: impl Fn(usize) -> bool,
        _what: &'static str,
    ) -> Result<(), SecAggError> {
        let t = self.threshold;
        let mut first = None;
        let mut short = 0;
        for (u, adj) in self.graph.adjacency.iter().enumerate() {
            let kind = if self.in_u3[u] {
                ShareKind::SelfMask
            } else if self.in_u2[u] {
                ShareKind::MaskKey
            } else {
                continue;
            };
            let have = adj.iter().filter(|&&w| holder(w as usize)).count();
            if have < t {
                short += 1;
                first.get_or_insert((u, kind, have));
            }
        }
        match first {
            None => Ok(()),
            Some((u, kind, have)) => Err(SecAggError::NotEnoughShares {
                client: self.members[u].name.clone(),
                index: u as u32,
                kind,
                have,
                need: t,
                short,
            }),
        }
    }

    /// Step 6: a client's shares. They must answer exactly what was asked
    /// (each named neighbour once, in the right list) with shares at the
    /// client's point.
    pub fn on_unmask(&mut self, client: &str, msg: &UnmaskResponse) -> Result<(), SecAggError> {
        self.expect_phase(Phase::Unmask, "UnmaskResponse")?;
        let u = self.index_of(client)?;
        if !self.in_u3[u] {
            return Err(SecAggError::NotExpected {
                client: client.to_string(),
                what: "UnmaskResponse",
            });
        }
        if self.responded[u] {
            return Err(SecAggError::Duplicate {
                client: client.to_string(),
                what: "UnmaskResponse",
            });
        }
        self.check_round(msg.round)?;
        msg.validate()?;
        let bad = |reason| SecAggError::BadResponse {
            client: client.to_string(),
            reason,
        };
        let x = shamir::point_of(u as u32)?;
        let (survivors, dropped) = self.request_lists(u);
        for (asked, given) in [
            (&survivors, &msg.self_mask_shares),
            (&dropped, &msg.key_shares),
        ] {
            if asked.len() != given.len() {
                return Err(bad("does not answer what was asked"));
            }
            let mut ids: Vec<u32> = given.iter().map(|e| e.0).collect();
            ids.sort_unstable();
            if ids != *asked {
                return Err(bad("does not answer what was asked"));
            }
            if given.iter().any(|e| e.1.x != x) {
                return Err(bad("share at another client's point"));
            }
        }
        for (v, s) in &msg.self_mask_shares {
            self.self_mask_shares[*v as usize].push(*s);
        }
        for (v, s) in &msg.key_shares {
            self.key_shares[*v as usize].push(*s);
        }
        self.responded[u] = true;
        Ok(())
    }

    /// Step 7: closes the unmask phase with U4 = the responders and unmasks
    /// the sum of U3's inputs. All share counts are checked first; if any
    /// secret has fewer than t shares the round fails and nothing is
    /// reconstructed. Then every secret is reconstructed (a mask key must
    /// match the key its owner advertised) before the sum is touched.
    pub fn finish(mut self) -> Result<Unmasked, SecAggError> {
        self.expect_phase(Phase::Unmask, "finish")?;
        let responders = count(&self.responded);
        self.fail_if_short(Phase::Unmask, responders)?;
        let t = self.threshold;
        {
            let mut first = None;
            let mut short = 0;
            for u in 0..self.members.len() {
                let (kind, have) = if self.in_u3[u] {
                    (ShareKind::SelfMask, self.self_mask_shares[u].len())
                } else if self.in_u2[u] {
                    (ShareKind::MaskKey, self.key_shares[u].len())
                } else {
                    continue;
                };
                if have < t {
                    short += 1;
                    first.get_or_insert((u, kind, have));
                }
            }
            if let Some((u, kind, have)) = first {
                return Err(SecAggError::NotEnoughShares {
                    client: self.members[u].name.clone(),
                    index: u as u32,
                    kind,
                    have,
                    need: t,
                    short,
                });
            }
        }
        let recon_err = |u: usize, kind, source| SecAggError::Reconstruction {
            client: self.members[u].name.clone(),
            kind,
            source,
        };
        let mut self_masks = Vec::new();
        let mut dropped_keys = Vec::new();
        for u in 0..self.members.len() {
            if self.in_u3[u] {
                let b = shamir::reconstruct(&self.self_mask_shares[u], t)
                    .map_err(|e| recon_err(u, ShareKind::SelfMask, e))?;
                self_masks.push(zeroize::Zeroizing::new(b));
            } else if self.in_u2[u] {
                let sk = shamir::reconstruct(&self.key_shares[u], t)
                    .map_err(|e| recon_err(u, ShareKind::MaskKey, e))?;
                let sk = StaticSecret::from(sk);
                if crypto::public_of(&sk) != self.members[u].mask_pk {
                    return Err(SecAggError::KeyMismatch(self.members[u].name.clone()));
                }
                dropped_keys.push((u, sk));
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        for b in &self_masks {
            apply_prg(b, &mut sum, Sign::Sub);
        }
        for (v, sk) in &dropped_keys {
            for &u in &self.graph.adjacency[*v] {
                let u = u as usize;
                if !self.in_u3[u] {
                    continue;
                }
                let shared = crypto::dh(sk, &self.members[u].mask_pk)
                    .ok_or_else(|| SecAggError::WeakKey(self.members[u].name.clone()))?;
                let seed = zeroize::Zeroizing::new(crypto::mask_seed(&shared, self.params.round)?);
                // u added +PRG(s_uv) when u < v, -PRG(s_uv) otherwise: undo it.
                let sign = if u < *v { Sign::Sub } else { Sign::Add };
                apply_prg(&seed, &mut sum, sign);
            }
        }
        let contributors = (0..self.members.len())
            .filter(|&u| self.in_u3[u])
            .map(|u| self.members[u].name.clone())
            .collect();
        Ok(Unmasked { sum, contributors })
    }
}
