//! End-to-end SecAgg+ rounds with real crypto and deterministic seeds: exact
//! sums under dropouts at every phase, failures that reconstruct nothing, an
//! honest client's refusals, the masked input's uniformity, and the typed
//! errors for tampered, misaddressed, stale and oversize messages.

use std::collections::{BTreeMap, BTreeSet};

use chacha20::ChaCha20Rng;
use fedquic_privacy::secagg::{
    AdvertiseKeys, CIPHERTEXT_LEN, ClientRound, EncryptedShare, FixedPoint, MAX_NEIGHBOURS,
    NeighbourKeys, Neighbours, Phase, RelayedShares, SecAggError, ServerParams, ServerRound,
    ShareKeys, ShareKind, Threshold, UnmaskRefusal, UnmaskRequest, UnmaskResponse, Unmasked,
};
use rand::{Rng, RngExt, SeedableRng};

const ROUND: u64 = 7;

fn seed_for(i: usize, salt: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    s[8..16].copy_from_slice(&salt.to_le_bytes());
    s
}

fn name(i: usize) -> String {
    format!("client-{i:03}")
}

/// Drives one round: every client honest, drops chosen by the test.
struct Sim {
    server: ServerRound,
    clients: BTreeMap<String, ClientRound>,
    inputs: BTreeMap<String, Vec<u32>>,
    /// After the advertise close: each client's index and neighbours' names.
    index: BTreeMap<String, u32>,
    adjacency: BTreeMap<String, Vec<String>>,
    /// Clients that will need their secrets reconstructed (those in U2 so far).
    needs: BTreeSet<String>,
    share_msgs: BTreeMap<String, ShareKeys>,
    relays: BTreeMap<String, RelayedShares>,
    requests: BTreeMap<String, UnmaskRequest>,
    threshold: usize,
}

impl Sim {
    fn new(n: usize, p: usize, degree: usize, threshold: Threshold, salt: u64) -> Sim {
        let params = ServerParams {
            round: ROUND,
            vector_len: p,
            degree,
            threshold,
            min_clients: 3,
            graph_seed: salt,
        };
        let mut server = ServerRound::new(params);
        let mut clients = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        let mut rng = ChaCha20Rng::seed_from_u64(salt ^ 0xfeed);
        for i in 0..n {
            let (c, adv) = ClientRound::new(ROUND, p, seed_for(i, salt));
            server.on_keys(&name(i), &adv).unwrap();
            clients.insert(name(i), c);
            inputs.insert(name(i), (0..p).map(|_| rng.next_u32()).collect());
        }
        Sim {
            server,
            clients,
            inputs,
            index: BTreeMap::new(),
            adjacency: BTreeMap::new(),
            needs: BTreeSet::new(),
            share_msgs: BTreeMap::new(),
            relays: BTreeMap::new(),
            requests: BTreeMap::new(),
            threshold: 0,
        }
    }

    fn drop_now(&mut self, dropped: &BTreeSet<String>) {
        for d in dropped {
            self.clients.remove(d);
        }
    }

    /// Close advertising and deliver the neighbour lists.
    fn close_advertise(&mut self) -> Result<(), SecAggError> {
        let msgs = self.server.close_advertise()?;
        self.threshold = self.server.threshold();
        let by_index: BTreeMap<u32, String> =
            msgs.iter().map(|(n, m)| (m.you, n.clone())).collect();
        for (who, msg) in &msgs {
            self.index.insert(who.clone(), msg.you);
            self.adjacency.insert(
                who.clone(),
                msg.neighbours
                    .iter()
                    .map(|nk| by_index[&nk.index].clone())
                    .collect(),
            );
            self.needs.insert(who.clone());
            let c = self.clients.get_mut(who).unwrap();
            self.share_msgs.insert(who.clone(), c.on_neighbours(msg)?);
        }
        Ok(())
    }

    /// Clients not in `dropped` send their shares; the server relays.
    fn share(&mut self, dropped: &BTreeSet<String>) -> Result<(), SecAggError> {
        self.drop_now(dropped);
        for d in dropped {
            self.needs.remove(d);
        }
        for who in self.clients.keys() {
            self.server.on_shares(who, &self.share_msgs[who])?;
        }
        for (who, relay) in self.server.close_sharing()? {
            self.relays.insert(who, relay);
        }
        for (who, c) in self.clients.iter_mut() {
            c.on_relayed_shares(&self.relays[who])?;
        }
        Ok(())
    }

    /// Clients not in `dropped` mask and send their input.
    fn mask(&mut self, dropped: &BTreeSet<String>) -> Result<(), SecAggError> {
        self.drop_now(dropped);
        for (who, c) in self.clients.iter_mut() {
            let mut y = self.inputs[who].clone();
            c.mask(&mut y)?;
            self.server.on_masked_input(who, &y)?;
        }
        for (who, req) in self.server.close_masked_input()? {
            self.requests.insert(who, req);
        }
        Ok(())
    }

    /// Clients not in `dropped` answer the unmask request; then finish.
    fn unmask(mut self, dropped: &BTreeSet<String>) -> Result<Unmasked, SecAggError> {
        self.drop_now(dropped);
        for (who, c) in self.clients.iter_mut() {
            let resp = c.on_unmask(&self.requests[who])?;
            self.server.on_unmask(who, &resp)?;
        }
        self.server.finish()
    }

    /// Greedily picks up to `count` of the live clients to drop (in a seeded
    /// random order), keeping every client that needs its secrets
    /// reconstructed with at least t live neighbours. `leaves_needs`: the
    /// dropped ones stop needing reconstruction (they drop before sharing).
    fn pick_drops(&self, count: usize, leaves_needs: bool, salt: u64) -> BTreeSet<String> {
        let mut order: Vec<String> = self.clients.keys().cloned().collect();
        let mut rng = ChaCha20Rng::seed_from_u64(salt);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut alive: BTreeSet<String> = self.clients.keys().cloned().collect();
        let mut needs = self.needs.clone();
        let mut out = BTreeSet::new();
        for c in order {
            if out.len() == count {
                break;
            }
            alive.remove(&c);
            let mut needs_after = needs.clone();
            if leaves_needs {
                needs_after.remove(&c);
            }
            let ok = needs_after.iter().all(|w| {
                self.adjacency[w]
                    .iter()
                    .filter(|x| alive.contains(*x))
                    .count()
                    >= self.threshold
            });
            if ok {
                out.insert(c);
                needs = needs_after;
            } else {
                alive.insert(c);
            }
        }
        assert_eq!(out.len(), count, "could not drop {count} clients safely");
        out
    }

    fn expected_sum(&self, contributors: &[String]) -> Vec<u32> {
        let p = self.inputs.values().next().map_or(0, Vec::len);
        let mut sum = vec![0u32; p];
        for c in contributors {
            for (s, x) in sum.iter_mut().zip(&self.inputs[c]) {
                *s = s.wrapping_add(*x);
            }
        }
        sum
    }
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

#[derive(Clone, Copy, Debug)]
enum DropAt {
    Advertise,
    Sharing,
    MaskedInput,
}

/// Runs a round dropping `frac` of the clients at `at` (and `frac_all` at every phase).
fn round_with_drops(
    n: usize,
    degree: usize,
    threshold: Threshold,
    at: &[(DropAt, f64)],
    salt: u64,
) -> (Unmasked, BTreeSet<String>) {
    let p = 300;
    let mut sim = Sim::new(n, p, degree, threshold, salt);
    sim.close_advertise().unwrap();
    let frac_of = |a: fn(DropAt) -> bool| {
        at.iter()
            .filter(|(d, _)| a(*d))
            .map(|(_, f)| (n as f64 * f).round() as usize)
            .sum::<usize>()
    };
    let d1 = sim.pick_drops(frac_of(|d| matches!(d, DropAt::Advertise)), true, salt + 1);
    sim.share(&d1).unwrap();
    let d2 = sim.pick_drops(frac_of(|d| matches!(d, DropAt::Sharing)), false, salt + 2);
    sim.mask(&d2).unwrap();
    let d3 = sim.pick_drops(
        frac_of(|d| matches!(d, DropAt::MaskedInput)),
        false,
        salt + 3,
    );
    let expected_contributors: BTreeSet<String> = sim
        .inputs
        .keys()
        .filter(|c| !d1.contains(*c) && !d2.contains(*c))
        .cloned()
        .collect();
    let expected = sim.expected_sum(&expected_contributors.iter().cloned().collect::<Vec<_>>());
    let out = sim.unmask(&d3).unwrap();
    assert_eq!(
        out.contributors.iter().cloned().collect::<BTreeSet<_>>(),
        expected_contributors
    );
    assert_eq!(out.sum, expected, "unmasked sum differs from the plain sum");
    // The clients dropped after masking are counted.
    assert!(d3.iter().all(|d| expected_contributors.contains(d)));
    (out, d3)
}

#[test]
fn no_drops_complete_and_regular() {
    round_with_drops(12, 100, Threshold::Fraction(0.5), &[], 1);
    round_with_drops(40, 8, Threshold::Fraction(0.6), &[], 2);
    // Odd degree over an odd number of clients is raised to even.
    round_with_drops(21, 5, Threshold::Fraction(0.5), &[], 3);
}

#[test]
fn thirty_percent_dropped_at_each_phase_complete_graph() {
    for (i, at) in [DropAt::Advertise, DropAt::Sharing, DropAt::MaskedInput]
        .into_iter()
        .enumerate()
    {
        round_with_drops(
            50,
            1000,
            Threshold::Fraction(0.5),
            &[(at, 0.3)],
            10 + i as u64,
        );
    }
    // Drops at every phase of one round (10% each: the complete graph needs a
    // majority of the 50 to answer).
    round_with_drops(
        50,
        1000,
        Threshold::Fraction(0.5),
        &[
            (DropAt::Advertise, 0.1),
            (DropAt::Sharing, 0.1),
            (DropAt::MaskedInput, 0.1),
        ],
        13,
    );
}

#[test]
fn thirty_percent_dropped_at_each_phase_regular_graph() {
    for (i, at) in [DropAt::Advertise, DropAt::Sharing, DropAt::MaskedInput]
        .into_iter()
        .enumerate()
    {
        round_with_drops(50, 10, Threshold::Absolute(6), &[(at, 0.3)], 20 + i as u64);
    }
    round_with_drops(
        60,
        14,
        Threshold::Absolute(8),
        &[
            (DropAt::Advertise, 0.1),
            (DropAt::Sharing, 0.1),
            (DropAt::MaskedInput, 0.1),
        ],
        23,
    );
}

#[test]
fn fixed_point_sum_decodes_within_the_quantisation_error() {
    let n = 30;
    let p = 500;
    let bound = 1.0;
    let fp = FixedPoint::for_sum(n, bound).unwrap();
    let mut sim = Sim::new(n, p, 8, Threshold::Fraction(0.6), 40);
    let mut rng = ChaCha20Rng::seed_from_u64(41);
    let mut floats: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (i, (who, x)) in sim.inputs.iter_mut().enumerate() {
        // The first 400 coordinates within the bound, the last 100 beyond it (clipped).
        let v: Vec<f32> = (0..p)
            .map(|j| {
                if j < 400 {
                    rng.random_range(-1.0f32..=1.0)
                } else {
                    rng.random_range(-1.5f32..1.5)
                }
            })
            .collect();
        fp.encode_into(&v, x, 1000 + i as u64).unwrap();
        floats.insert(who.clone(), v);
    }
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    sim.mask(&none()).unwrap();
    let plain = sim.expected_sum(&sim.inputs.keys().cloned().collect::<Vec<_>>());
    let out = sim.unmask(&none()).unwrap();
    assert_eq!(out.sum, plain);
    let mut decoded = vec![0f64; p];
    fp.decode_sum(&out.sum, &mut decoded).unwrap();
    let tol = fp.max_sum_error(n);
    assert!(tol <= n as f64 / fp.scale());
    let mut worst = 0f64;
    for (j, d) in decoded.iter().enumerate() {
        // Within the bound: the plain f64 sum of the f32 inputs.
        let exact: f64 = if j < 400 {
            floats.values().map(|v| f64::from(v[j])).sum()
        } else {
            floats
                .values()
                .map(|v| f64::from(v[j]).clamp(-bound, bound))
                .sum()
        };
        worst = worst.max((d - exact).abs());
    }
    assert!(worst <= tol, "error {worst} above {tol}");
    assert!(worst > 0.0, "suspiciously exact");
}

#[test]
fn too_many_drops_before_unmasking_fail_without_reconstruction() {
    // Complete graph of 12, t = 7: 6 survivors of the unmask phase are too few.
    let mut sim = Sim::new(12, 50, 100, Threshold::Fraction(0.6), 50);
    sim.close_advertise().unwrap();
    assert_eq!(sim.threshold, 7);
    sim.share(&none()).unwrap();
    sim.mask(&none()).unwrap();
    let dropped: BTreeSet<String> = (0..6).map(name).collect();
    let err = sim.unmask(&dropped).unwrap_err();
    match err {
        SecAggError::NotEnoughShares {
            kind,
            have,
            need,
            short,
            ..
        } => {
            assert_eq!(kind, ShareKind::SelfMask);
            assert_eq!((have, need), (6, 7));
            // Every one of the 12 seeds is short: 5 or 6 holders answered.
            assert_eq!(short, 12);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_short_neighbourhood_fails_the_round_and_names_the_client() {
    // k = 6, t = 4: drop 3 neighbours of one client after masking.
    let mut sim = Sim::new(20, 50, 6, Threshold::Absolute(4), 51);
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    sim.mask(&none()).unwrap();
    let victim = name(5);
    let dropped: BTreeSet<String> = sim.adjacency[&victim].iter().take(3).cloned().collect();
    let victim_index = sim.index[&victim];
    let err = sim.unmask(&dropped).unwrap_err();
    match err {
        SecAggError::NotEnoughShares {
            client,
            index,
            kind,
            have,
            need,
            ..
        } => {
            // The first short client in roster order has 3 of 4; the victim is one.
            assert_eq!((kind, have, need), (ShareKind::SelfMask, 3, 4));
            assert!(index <= victim_index, "{client}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn too_many_drops_after_sharing_fail_at_the_masked_input_close() {
    let mut sim = Sim::new(12, 50, 100, Threshold::Fraction(0.6), 52);
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    let dropped: BTreeSet<String> = (0..6).map(name).collect();
    let err = sim.mask(&dropped).unwrap_err();
    assert!(
        matches!(err, SecAggError::NotEnoughShares { need: 7, .. }),
        "{err:?}"
    );
    assert_eq!(sim.server.phase(), Phase::Done);
}

#[test]
fn phases_closing_below_the_minimum_are_typed_errors() {
    // Advertise close.
    let mut s = ServerRound::new(ServerParams {
        round: ROUND,
        vector_len: 4,
        degree: 4,
        threshold: Threshold::Fraction(0.5),
        min_clients: 3,
        graph_seed: 0,
    });
    for i in 0..2 {
        let (_, adv) = ClientRound::new(ROUND, 4, seed_for(i, 60));
        s.on_keys(&name(i), &adv).unwrap();
    }
    assert_eq!(
        s.close_advertise().unwrap_err(),
        SecAggError::TooFewClients {
            phase: Phase::AdvertiseKeys,
            have: 2,
            min: 3
        }
    );
    assert_eq!(s.phase(), Phase::Done);
    // Sharing close.
    let mut sim = Sim::new(5, 4, 4, Threshold::Fraction(0.5), 61);
    sim.close_advertise().unwrap();
    let err = sim.share(&(0..3).map(name).collect()).unwrap_err();
    assert_eq!(
        err,
        SecAggError::TooFewClients {
            phase: Phase::ShareKeys,
            have: 2,
            min: 3
        }
    );
}

/// A round of `n` clients run to the unmask requests; returns the sim.
fn sim_at_unmask(n: usize, degree: usize, salt: u64) -> Sim {
    let mut sim = Sim::new(n, 64, degree, Threshold::Fraction(0.5), salt);
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    sim.mask(&none()).unwrap();
    sim
}

#[test]
fn an_honest_client_refuses_a_request_for_both_shares_of_one_neighbour() {
    let mut sim = sim_at_unmask(8, 100, 70);
    let who = name(0);
    let mut req = sim.requests[&who].clone();
    let v = req.survivors[0];
    req.dropped.push(v);
    let c = sim.clients.get_mut(&who).unwrap();
    assert_eq!(
        c.on_unmask(&req).unwrap_err(),
        SecAggError::UnmaskRefused(UnmaskRefusal::BothLists(v))
    );
    // Refused means consumed: the honest request now gets nothing either.
    assert_eq!(
        c.on_unmask(&sim.requests[&who]).unwrap_err(),
        SecAggError::UnmaskRefused(UnmaskRefusal::AlreadyRequested)
    );
}

#[test]
fn an_honest_client_answers_once_and_refuses_bad_requests() {
    let mut sim = sim_at_unmask(8, 100, 71);
    let reqs = sim.requests.clone();
    let t = sim.threshold;
    // Answers the honest request once only.
    let c = sim.clients.get_mut(&name(1)).unwrap();
    let resp = c.on_unmask(&reqs[&name(1)]).unwrap();
    assert_eq!(resp.self_mask_shares.len(), 7);
    assert!(resp.key_shares.is_empty());
    assert_eq!(
        c.on_unmask(&reqs[&name(1)]).unwrap_err(),
        SecAggError::UnmaskRefused(UnmaskRefusal::AlreadyRequested)
    );
    let refusal = |sim: &mut Sim, who: usize, f: &dyn Fn(&mut UnmaskRequest)| {
        let mut req = reqs[&name(who)].clone();
        f(&mut req);
        sim.clients
            .get_mut(&name(who))
            .unwrap()
            .on_unmask(&req)
            .unwrap_err()
    };
    // Not a neighbour (its own index).
    let own = sim.index[&name(2)];
    assert_eq!(
        refusal(&mut sim, 2, &|r| r.dropped.push(own)),
        SecAggError::UnmaskRefused(UnmaskRefusal::NotANeighbour(own))
    );
    // Too few survivors: all but t - 1 declared dropped.
    let e = refusal(&mut sim, 3, &|r| {
        let moved: Vec<u32> = r.survivors.drain(t - 1..).collect();
        r.dropped.extend(moved);
    });
    assert_eq!(
        e,
        SecAggError::UnmaskRefused(UnmaskRefusal::TooFewSurvivors {
            survivors: t - 1,
            threshold: t
        })
    );
    // Named twice.
    let e = refusal(&mut sim, 4, &|r| {
        let v = r.survivors[0];
        r.survivors.push(v);
    });
    assert!(matches!(
        e,
        SecAggError::UnmaskRefused(UnmaskRefusal::Repeated(_))
    ));
    // Wrong round: not consumed, the right one is still answered.
    let c = sim.clients.get_mut(&name(5)).unwrap();
    let mut stale = reqs[&name(5)].clone();
    stale.round = ROUND - 1;
    assert_eq!(
        c.on_unmask(&stale).unwrap_err(),
        SecAggError::WrongRound {
            expected: ROUND,
            got: ROUND - 1
        }
    );
    assert!(c.on_unmask(&reqs[&name(5)]).is_ok());
    // Oversize.
    let e = refusal(&mut sim, 6, &|r| r.dropped = vec![0; MAX_NEIGHBOURS + 1]);
    assert!(matches!(e, SecAggError::TooLong { .. }), "{e:?}");
}

/// Wilson-Hilferty: the chi-square quantile with `k` degrees of freedom at the
/// standard normal quantile `z` (z = 4.753 for an upper tail of 1e-6).
fn chi2_quantile(k: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * k);
    k * (1.0 - a + z * a.sqrt()).powi(3)
}

fn chi2(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let e = total as f64 / counts.len() as f64;
    counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
}

fn masked_input_of_one_client(input: u32, salt: u64) -> Vec<u32> {
    let p = 1 << 16;
    let mut sim = Sim::new(5, p, 4, Threshold::Fraction(0.6), salt);
    for x in sim.inputs.values_mut() {
        x.fill(input);
    }
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    let mut y = vec![input; p];
    sim.clients.get_mut(&name(0)).unwrap().mask(&mut y).unwrap();
    y
}

#[test]
fn a_masked_input_is_indistinguishable_from_uniform() {
    const Z_1E6: f64 = 4.753;
    let byte_limit = chi2_quantile(255.0, Z_1E6);
    let top_limit = chi2_quantile(255.0, Z_1E6);
    for (input, salt) in [(0u32, 80u64), (0xdead_beef, 81)] {
        let y = masked_input_of_one_client(input, salt);
        let mut bytes = [0u64; 256];
        let mut top = [0u64; 256];
        for w in &y {
            for b in w.to_le_bytes() {
                bytes[b as usize] += 1;
            }
            top[(w >> 24) as usize] += 1;
        }
        let (cb, ct) = (chi2(&bytes), chi2(&top));
        assert!(cb < byte_limit, "bytes: chi2 {cb} >= {byte_limit}");
        assert!(ct < top_limit, "top byte: chi2 {ct} >= {top_limit}");
        // And not trivially so: the input itself is maximally non-uniform.
        assert!(y.iter().filter(|&&w| w == input).count() < 4);
    }
    // Two maskings of the same input (fresh seeds) share almost no word.
    let a = masked_input_of_one_client(0, 82);
    let b = masked_input_of_one_client(0, 83);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 4, "{same} equal words");
}

#[test]
fn tampered_misaddressed_and_stale_bundles_are_typed_errors() {
    let mut sim = Sim::new(6, 16, 100, Threshold::Fraction(0.5), 90);
    sim.close_advertise().unwrap();
    for who in sim.clients.keys() {
        sim.server.on_shares(who, &sim.share_msgs[who]).unwrap();
    }
    let relays: BTreeMap<String, RelayedShares> =
        sim.server.close_sharing().unwrap().into_iter().collect();
    let who = name(0);
    let good = relays[&who].clone();
    let c = sim.clients.get_mut(&who).unwrap();

    let mut tampered = good.clone();
    tampered.shares[1].ciphertext[20] ^= 1;
    assert_eq!(
        c.on_relayed_shares(&tampered).unwrap_err(),
        SecAggError::BadShare {
            from: good.shares[1].from,
            reason: "does not authenticate"
        }
    );
    // A bundle relabelled as coming from another neighbour.
    let mut relabelled = good.clone();
    relabelled.shares[0].from = good.shares[2].from;
    relabelled.shares[2].from = good.shares[0].from;
    assert!(matches!(
        c.on_relayed_shares(&relabelled).unwrap_err(),
        SecAggError::BadShare {
            reason: "does not authenticate",
            ..
        }
    ));
    // A bundle addressed to someone else, relayed here.
    let mut misrouted = good.clone();
    misrouted.shares[0].ciphertext = relays[&name(1)]
        .shares
        .iter()
        .find(|s| s.from == good.shares[0].from)
        .map_or_else(
            || relays[&name(2)].shares[0].ciphertext.clone(),
            |s| s.ciphertext.clone(),
        );
    assert!(matches!(
        c.on_relayed_shares(&misrouted).unwrap_err(),
        SecAggError::BadShare {
            reason: "does not authenticate",
            ..
        }
    ));
    // From a non-neighbour (its own index), twice, short, stale, oversize.
    let me = sim.index[&who];
    let mut own = good.clone();
    own.shares[0].from = me;
    assert_eq!(
        c.on_relayed_shares(&own).unwrap_err(),
        SecAggError::BadShare {
            from: me,
            reason: "not a neighbour"
        }
    );
    let mut twice = good.clone();
    twice.shares.push(good.shares[0].clone());
    assert!(matches!(
        c.on_relayed_shares(&twice).unwrap_err(),
        SecAggError::BadShare {
            reason: "relayed twice",
            ..
        }
    ));
    let mut short = good.clone();
    short.shares[3].ciphertext.pop();
    assert_eq!(
        c.on_relayed_shares(&short).unwrap_err(),
        SecAggError::CiphertextLength {
            peer: good.shares[3].from,
            len: CIPHERTEXT_LEN - 1
        }
    );
    let mut stale = good.clone();
    stale.round += 1;
    assert!(matches!(
        c.on_relayed_shares(&stale).unwrap_err(),
        SecAggError::WrongRound { .. }
    ));
    let mut huge = good.clone();
    huge.shares = vec![good.shares[0].clone(); MAX_NEIGHBOURS + 1];
    assert!(matches!(
        c.on_relayed_shares(&huge).unwrap_err(),
        SecAggError::TooLong { .. }
    ));
    // Too few left to hold this client's shares.
    let mut few = good.clone();
    few.shares.truncate(sim.threshold - 1);
    assert!(matches!(
        c.on_relayed_shares(&few).unwrap_err(),
        SecAggError::TooFewNeighbours { .. }
    ));
    // Masking before the shares is out of order; after all that, the good relay still works.
    let mut x = vec![0u32; 16];
    assert!(matches!(
        c.mask(&mut x).unwrap_err(),
        SecAggError::OutOfOrder { .. }
    ));
    c.on_relayed_shares(&good).unwrap();
    assert!(matches!(
        c.mask(&mut [0u32; 3]).unwrap_err(),
        SecAggError::VectorLength {
            expected: 16,
            got: 3
        }
    ));
    c.mask(&mut x).unwrap();
    assert!(matches!(
        c.mask(&mut x).unwrap_err(),
        SecAggError::OutOfOrder { .. }
    ));
}

fn keys(i: u8) -> NeighbourKeys {
    let (_, adv) = ClientRound::new(ROUND, 1, [i; 32]);
    NeighbourKeys {
        index: u32::from(i),
        cipher_pk: adv.cipher_pk,
        mask_pk: adv.mask_pk,
    }
}

#[test]
fn bad_neighbour_lists_are_typed_errors() {
    let base = Neighbours {
        round: ROUND,
        you: 0,
        threshold: 3,
        neighbours: (1..=4).map(keys).collect(),
    };
    let (mut c, _) = ClientRound::new(ROUND, 1, [0; 32]);
    let check = |c: &mut ClientRound, f: &dyn Fn(&mut Neighbours)| {
        let mut m = base.clone();
        f(&mut m);
        c.on_neighbours(&m).unwrap_err()
    };
    assert_eq!(
        check(&mut c, &|m| m.threshold = 2),
        SecAggError::BadThreshold {
            threshold: 2,
            degree: 4
        }
    );
    assert_eq!(
        check(&mut c, &|m| m.threshold = 5),
        SecAggError::BadThreshold {
            threshold: 5,
            degree: 4
        }
    );
    assert_eq!(
        check(&mut c, &|m| m.you = 2),
        SecAggError::SelfAsNeighbour(2)
    );
    assert_eq!(
        check(&mut c, &|m| m.neighbours[1].index = 1),
        SecAggError::DuplicateNeighbour(1)
    );
    assert!(matches!(
        check(&mut c, &|m| m.neighbours[1].mask_pk =
            m.neighbours[0].cipher_pk),
        SecAggError::DuplicateKey(_)
    ));
    assert!(matches!(
        check(&mut c, &|m| m.neighbours[0].cipher_pk = [0; 32]),
        SecAggError::WeakKey(_)
    ));
    assert!(matches!(
        check(&mut c, &|m| m.round = 1),
        SecAggError::WrongRound { .. }
    ));
    assert!(matches!(
        check(&mut c, &|m| m.neighbours =
            vec![keys(1); MAX_NEIGHBOURS + 1]),
        SecAggError::TooLong { .. }
    ));
    assert!(matches!(
        check(&mut c, &|m| m.neighbours[0].index = u32::MAX),
        SecAggError::BadIndex { .. }
    ));
    // None of that changed anything: the good list is accepted, once.
    let shares = c.on_neighbours(&base).unwrap();
    assert_eq!(shares.shares.len(), 4);
    assert!(
        shares
            .shares
            .iter()
            .all(|s| s.ciphertext.len() == CIPHERTEXT_LEN)
    );
    assert!(matches!(
        c.on_neighbours(&base).unwrap_err(),
        SecAggError::OutOfOrder { .. }
    ));
}

#[test]
fn the_server_rejects_unexpected_messages() {
    let mut sim = Sim::new(6, 8, 4, Threshold::Fraction(0.5), 100);
    // Keys: duplicate client, reused key, low-order key, wrong round.
    let (_, adv) = ClientRound::new(ROUND, 8, seed_for(0, 100));
    assert!(matches!(
        sim.server.on_keys(&name(0), &adv).unwrap_err(),
        SecAggError::Duplicate { .. }
    ));
    assert!(matches!(
        sim.server.on_keys("copycat", &adv).unwrap_err(),
        SecAggError::DuplicateKey(_)
    ));
    let (_, mut fresh) = ClientRound::new(ROUND, 8, [0xAB; 32]);
    let good_fresh = fresh.clone();
    fresh.mask_pk = [0; 32];
    assert!(matches!(
        sim.server.on_keys("weak", &fresh).unwrap_err(),
        SecAggError::WeakKey(_)
    ));
    let stale = AdvertiseKeys {
        round: ROUND + 1,
        ..good_fresh
    };
    assert!(matches!(
        sim.server.on_keys("late", &stale).unwrap_err(),
        SecAggError::WrongRound { .. }
    ));
    assert!(sim.server.expects("late"));
    // Out of phase.
    assert!(matches!(
        sim.server.on_masked_input(&name(0), &[0; 8]).unwrap_err(),
        SecAggError::OutOfPhase { .. }
    ));
    sim.close_advertise().unwrap();
    assert!(sim.server.expects(&name(0)));
    // Shares: unknown, incomplete, misaddressed, oversize ciphertext.
    let msg = sim.share_msgs[&name(0)].clone();
    assert!(matches!(
        sim.server.on_shares("nobody", &msg).unwrap_err(),
        SecAggError::UnknownClient(_)
    ));
    let mut partial = msg.clone();
    partial.shares.pop();
    assert!(matches!(
        sim.server.on_shares(&name(0), &partial).unwrap_err(),
        SecAggError::IncompleteShares { .. }
    ));
    let mut wrong = msg.clone();
    wrong.shares[0].to = sim.index[&name(0)];
    assert!(matches!(
        sim.server.on_shares(&name(0), &wrong).unwrap_err(),
        SecAggError::NotANeighbour(_)
    ));
    let mut fat = msg.clone();
    fat.shares[0] = EncryptedShare {
        to: fat.shares[0].to,
        ciphertext: vec![0; 1 << 20],
    };
    assert!(matches!(
        sim.server.on_shares(&name(0), &fat).unwrap_err(),
        SecAggError::CiphertextLength { .. }
    ));
    sim.server.on_shares(&name(0), &msg).unwrap();
    assert!(!sim.server.expects(&name(0)));
    assert!(matches!(
        sim.server.on_shares(&name(0), &msg).unwrap_err(),
        SecAggError::Duplicate { .. }
    ));
    // Client 5 drops before sharing: later messages from it are not expected.
    sim.clients.remove(&name(5));
    for who in sim.clients.keys().filter(|w| **w != name(0)) {
        sim.server.on_shares(who, &sim.share_msgs[who]).unwrap();
    }
    let relays = sim.server.close_sharing().unwrap();
    assert_eq!(relays.len(), 5);
    assert!(matches!(
        sim.server.on_masked_input(&name(5), &[0; 8]).unwrap_err(),
        SecAggError::NotExpected { .. }
    ));
    assert!(matches!(
        sim.server.on_masked_input(&name(1), &[0; 7]).unwrap_err(),
        SecAggError::VectorLength { .. }
    ));
    sim.server.on_masked_input(&name(1), &[0; 8]).unwrap();
    assert!(matches!(
        sim.server.on_masked_input(&name(1), &[0; 8]).unwrap_err(),
        SecAggError::Duplicate { .. }
    ));
}

#[test]
fn the_server_rejects_bad_unmask_responses() {
    let mut sim = sim_at_unmask(8, 100, 110);
    let who = name(0);
    let req = sim.requests[&who].clone();
    let good = sim.clients.get_mut(&who).unwrap().on_unmask(&req).unwrap();
    let check = |sim: &mut Sim, f: &dyn Fn(&mut UnmaskResponse)| {
        let mut r = good.clone();
        f(&mut r);
        sim.server.on_unmask(&who, &r).unwrap_err()
    };
    assert!(matches!(
        check(&mut sim, &|r| {
            r.self_mask_shares.pop();
        }),
        SecAggError::BadResponse { .. }
    ));
    assert!(matches!(
        check(&mut sim, &|r| {
            let s = r.self_mask_shares.pop().unwrap();
            r.key_shares.push(s);
        }),
        SecAggError::BadResponse { .. }
    ));
    assert!(matches!(
        check(&mut sim, &|r| r.self_mask_shares[0].1.x += 1),
        SecAggError::BadResponse { .. }
    ));
    assert!(matches!(
        check(&mut sim, &|r| r.self_mask_shares[0].1.y[0] = u64::MAX),
        SecAggError::MalformedShare { .. }
    ));
    assert!(matches!(
        check(&mut sim, &|r| r.round = 0),
        SecAggError::WrongRound { .. }
    ));
    sim.server.on_unmask(&who, &good).unwrap();
    assert!(matches!(
        sim.server.on_unmask(&who, &good).unwrap_err(),
        SecAggError::Duplicate { .. }
    ));
}

#[test]
fn a_corrupted_key_share_is_caught_at_reconstruction() {
    // Client 7 drops after sharing; one responder lies about its share of 7's key.
    let mut sim = Sim::new(8, 16, 100, Threshold::Fraction(0.5), 120);
    sim.close_advertise().unwrap();
    sim.share(&none()).unwrap();
    sim.mask(&[name(7)].into_iter().collect()).unwrap();
    let t = sim.threshold;
    let mut liar_done = false;
    let names: Vec<String> = sim.clients.keys().cloned().collect();
    for who in names {
        let c = sim.clients.get_mut(&who).unwrap();
        let mut resp = c.on_unmask(&sim.requests[&who]).unwrap();
        if !liar_done {
            resp.key_shares[0].1.y[0] = (resp.key_shares[0].1.y[0] + 1) % ((1 << 61) - 1);
            liar_done = true;
        }
        sim.server.on_unmask(&who, &resp).unwrap();
    }
    assert!(t < 7);
    let err = sim.server.finish().unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Reconstruction {
                kind: ShareKind::MaskKey,
                ..
            } | SecAggError::KeyMismatch(_)
        ),
        "{err:?}"
    );
}

#[test]
fn messages_travel_on_postcard() {
    let mut sim = sim_at_unmask(5, 100, 130);
    let req = sim.requests[&name(0)].clone();
    let bytes = postcard::to_stdvec(&req).unwrap();
    let back: UnmaskRequest = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, req);
    let resp = sim
        .clients
        .get_mut(&name(0))
        .unwrap()
        .on_unmask(&req)
        .unwrap();
    let bytes = postcard::to_stdvec(&resp).unwrap();
    let back: UnmaskResponse = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, resp);
    back.validate().unwrap();
    let relay = &sim.relays[&name(1)];
    let back: RelayedShares = postcard::from_bytes(&postcard::to_stdvec(relay).unwrap()).unwrap();
    assert_eq!(&back, relay);
    let share_msg = &sim.share_msgs[&name(1)];
    let bytes = postcard::to_stdvec(share_msg).unwrap();
    // 4 bundles of CIPHERTEXT_LEN bytes plus a few bytes of framing each.
    assert!(
        bytes.len() < 4 * (CIPHERTEXT_LEN + 8) + 16,
        "{}",
        bytes.len()
    );
    // A length prefix claiming a huge vector fails to decode instead of allocating.
    let mut evil = postcard::to_stdvec(&UnmaskRequest {
        round: 1,
        survivors: vec![],
        dropped: vec![],
    })
    .unwrap();
    evil[1] = 0xff;
    evil.extend_from_slice(&[0xff, 0xff, 0xff, 0x0f]);
    assert!(postcard::from_bytes::<UnmaskRequest>(&evil).is_err());
}

#[test]
fn hundreds_of_clients_beyond_gf256() {
    // Roster indices up to 599: Shamir points far beyond GF(256)'s 255.
    let (out, _) = round_with_drops(
        600,
        6,
        Threshold::Absolute(4),
        &[(DropAt::Sharing, 0.05), (DropAt::MaskedInput, 0.05)],
        140,
    );
    assert_eq!(out.contributors.len(), 570);
}

mod robustness {
    //! Mangled wire messages (bytes flipped, cut, appended, then decoded with
    //! postcard) are fed to the client and server in the phase that expects
    //! them: whatever decodes is rejected or accepted with a `Result`, never a
    //! panic.
    use super::*;
    use proptest::prelude::*;

    fn mangle(
        mut bytes: Vec<u8>,
        flips: &[(usize, u8)],
        cut: Option<usize>,
        extra: &[u8],
    ) -> Vec<u8> {
        for &(at, x) in flips {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        bytes.extend_from_slice(extra);
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]
        #[test]
        fn mangled_messages_never_panic(
            phase in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..6),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..8),
            salt in 0u64..1000,
        ) {
            let mut sim = Sim::new(5, 8, 100, Threshold::Fraction(0.5), 1000 + salt);
            let who = name(1);
            match phase {
                0 => {
                    // Neighbours, to a client.
                    let msgs = sim.server.close_advertise().unwrap();
                    let m = &msgs.iter().find(|(n, _)| *n == who).unwrap().1;
                    let bytes = mangle(postcard::to_stdvec(m).unwrap(), &flips, cut, &extra);
                    if let Ok(m) = postcard::from_bytes::<Neighbours>(&bytes) {
                        let _ = sim.clients.get_mut(&who).unwrap().on_neighbours(&m);
                    }
                }
                1 => {
                    // ShareKeys, to the server; RelayedShares, to a client.
                    sim.close_advertise().unwrap();
                    let bytes = mangle(postcard::to_stdvec(&sim.share_msgs[&who]).unwrap(), &flips, cut, &extra);
                    if let Ok(m) = postcard::from_bytes::<ShareKeys>(&bytes) {
                        let _ = sim.server.on_shares(&who, &m);
                    }
                    for w in sim.clients.keys() {
                        let _ = sim.server.on_shares(w, &sim.share_msgs[w]);
                    }
                    let relays: BTreeMap<String, RelayedShares> =
                        sim.server.close_sharing().unwrap().into_iter().collect();
                    let bytes = mangle(postcard::to_stdvec(&relays[&who]).unwrap(), &flips, cut, &extra);
                    if let Ok(m) = postcard::from_bytes::<RelayedShares>(&bytes) {
                        let _ = sim.clients.get_mut(&who).unwrap().on_relayed_shares(&m);
                    }
                }
                _ => {
                    // UnmaskRequest, to a client; UnmaskResponse, to the server; then finish.
                    sim.close_advertise().unwrap();
                    sim.share(&none()).unwrap();
                    sim.mask(&none()).unwrap();
                    let req = sim.requests[&who].clone();
                    let bytes = mangle(postcard::to_stdvec(&req).unwrap(), &flips, cut, &extra);
                    let c = sim.clients.get_mut(&who).unwrap();
                    if phase == 2 {
                        if let Ok(m) = postcard::from_bytes::<UnmaskRequest>(&bytes) {
                            let _ = c.on_unmask(&m);
                        }
                    } else {
                        let resp = c.on_unmask(&req).unwrap();
                        let bytes = mangle(postcard::to_stdvec(&resp).unwrap(), &flips, cut, &extra);
                        if let Ok(m) = postcard::from_bytes::<UnmaskResponse>(&bytes) {
                            let _ = sim.server.on_unmask(&who, &m);
                        }
                        for (w, c) in sim.clients.iter_mut().filter(|(w, _)| **w != who) {
                            let r = c.on_unmask(&sim.requests[w]).unwrap();
                            sim.server.on_unmask(w, &r).unwrap();
                        }
                        // Either the right sum or a typed error (a mangled share
                        // that still decodes is caught at reconstruction).
                        let all: Vec<String> = sim.inputs.keys().cloned().collect();
                        let want = sim.expected_sum(&all);
                        if let Ok(out) = sim.server.finish() {
                            prop_assert_eq!(out.sum, want);
                        }
                    }
                }
            }
        }
    }
}
