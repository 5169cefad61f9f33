//! Byzantine-robust aggregation rules over a round's whole set of updates:
//! the building blocks of FedMedian, FedTrimmedAvg, Krum, Multi-Krum and
//! Bulyan. Unlike the streaming strategies these need every update of the
//! round at once: K updates of P values hold K x P x 4 bytes.
//!
//! - Coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust
//!   Distributed Learning: Towards Optimal Statistical Rates", ICML 2018) run
//!   over column chunks on all cores, each thread with one K-value scratch.
//! - Krum and Multi-Krum (Blanchard et al., "Machine Learning with
//!   Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017) score
//!   update i by the sum of its squared distances to its K - f - 2 nearest
//!   neighbours. The K x K distances come from a Gram matrix
//!   `|u_i|^2 + |u_j|^2 - 2 <u_i, u_j>`, built with blocked f32 GEMMs over
//!   column chunks summed in f64: O(K^2 P) flops at GEMM speed, and cache
//!   friendly, instead of K^2 / 2 separate passes over memory.
//! - Bulyan (El Mhamdi et al., "The Hidden Vulnerability of Distributed
//!   Learning in Byzantium", ICML 2018): Krum picks theta = K - 2f updates
//!   one at a time; then, coordinate-wise, the beta = theta - 2f values
//!   closest to the median are averaged. Needs K >= 4f + 3.

use ndarray::{ArrayView2, linalg::general_mat_mul};

/// Why a robust rule cannot run on a round's updates.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RobustError {
    #[error("no updates")]
    Empty,
    #[error("updates have different lengths")]
    Ragged,
    #[error("{rule} needs at least {needed} updates for f = {f}, got {got}")]
    TooFew {
        rule: &'static str,
        needed: usize,
        got: usize,
        f: usize,
    },
}

fn check(updates: &[&[f32]]) -> Result<usize, RobustError> {
    let len = updates.first().ok_or(RobustError::Empty)?.len();
    if updates.iter().any(|u| u.len() != len) {
        return Err(RobustError::Ragged);
    }
    Ok(len)
}

/// Columns gathered per tile: a K x TILE block of the updates (each row a
/// contiguous 1 KiB) is transposed into scratch, so the per-coordinate work
/// reads K contiguous values instead of K scattered ones.
const TILE: usize = 256;

/// An order-preserving u32 key of an f32 (IEEE total order): selecting on
/// integers is about twice as fast as `f32::total_cmp`.
#[inline]
fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn value(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// Calls `column(keys, out)` for every coordinate, with `keys` that
/// coordinate's K values as [`key`]s (contiguous, free to reorder), over
/// tiles of columns spread across all cores.
fn for_each_column(
    updates: &[&[f32]],
    out: &mut [f32],
    column: impl Fn(&mut [u32], &mut f32) + Sync,
) {
    let k = updates.len();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(out.len().div_ceil(4 * TILE).max(1));
    let chunk = out.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, piece) in out.chunks_mut(chunk).enumerate() {
            let column = &column;
            scope.spawn(move || {
                let mut tile = vec![0u32; TILE * k];
                let base = c * chunk;
                for (t, outs) in piece.chunks_mut(TILE).enumerate() {
                    let start = base + t * TILE;
                    let width = outs.len();
                    for (r, u) in updates.iter().enumerate() {
                        for (j, v) in u[start..start + width].iter().enumerate() {
                            tile[j * k + r] = key(*v);
                        }
                    }
                    for (j, o) in outs.iter_mut().enumerate() {
                        column(&mut tile[j * k..(j + 1) * k], o);
                    }
                }
            });
        }
    });
}

/// Coordinate-wise median (the mean of the two middle values for even K).
pub fn coordinate_median(updates: &[&[f32]], out: &mut [f32]) -> Result<(), RobustError> {
    let len = check(updates)?;
    assert_eq!(out.len(), len, "output length");
    let k = updates.len();
    let mid = k / 2;
    for_each_column(updates, out, |keys, o| {
        let (below, m, _) = keys.select_nth_unstable(mid);
        let m = value(*m);
        *o = if k % 2 == 1 {
            m
        } else {
            let below = value(below.iter().copied().max().unwrap_or(0));
            ((below as f64 + m as f64) / 2.0) as f32
        };
    });
    Ok(())
}

/// Coordinate-wise trimmed mean: drops the `floor(beta * K)` smallest and
/// largest values of each coordinate and averages the rest (beta < 0.5).
///
/// Up to [`MAX_NETWORK_K`] updates, columns are sorted [`LANES`] at a time by
/// a sorting network straight from the row-major updates (no transposition,
/// no keys: the updates are finite, so `<` orders them); beyond that, per
/// column selections over keys.
pub fn trimmed_mean(updates: &[&[f32]], beta: f64, out: &mut [f32]) -> Result<(), RobustError> {
    let len = check(updates)?;
    assert_eq!(out.len(), len, "output length");
    let k = updates.len();
    let trim = ((beta.clamp(0.0, 0.499) * k as f64).floor() as usize).min((k - 1) / 2);
    if k <= MAX_NETWORK_K {
        trimmed_mean_network(updates, trim, out);
        return Ok(());
    }
    trimmed_mean_select(updates, trim, out);
    Ok(())
}

/// The trimmed mean by per-column selection over keys (any K).
fn trimmed_mean_select(updates: &[&[f32]], trim: usize, out: &mut [f32]) {
    for_each_column(updates, out, |keys, o| {
        let kept = trim_in_place(keys, trim);
        *o = (kept.iter().map(|v| value(*v) as f64).sum::<f64>() / kept.len() as f64) as f32;
    });
}

/// Columns sorted together by the network (two SSE registers, one AVX).
const LANES: usize = 8;
/// The largest K the sorting network handles (its comparator list grows as
/// K log^2 K: 1,104 comparators at K = 100, about 7,700 at 512).
pub const MAX_NETWORK_K: usize = 512;

/// Batcher's odd-even merge sort network for `n` (a power of two) inputs,
/// keeping only the comparators between the first `k`: the rest would compare
/// with +infinity padding, which never moves.
fn sorting_network(n: usize, k: usize) -> Vec<(u16, u16)> {
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < n {
        let mut step = p;
        while step >= 1 {
            let mut j = step % p;
            while j + step < n {
                for i in 0..step.min(n - j - step) {
                    let (a, b) = (i + j, i + j + step);
                    if a / (2 * p) == b / (2 * p) && b < k {
                        pairs.push((a as u16, b as u16));
                    }
                }
                j += 2 * step;
            }
            step /= 2;
        }
        p *= 2;
    }
    pairs
}

/// The trimmed mean by sorting [`LANES`] columns at once with a sorting
/// network on a K x LANES block copied from the updates (row-major: each
/// update contributes LANES contiguous values), spread across all cores.
fn trimmed_mean_network(updates: &[&[f32]], trim: usize, out: &mut [f32]) {
    let k = updates.len();
    let network = sorting_network(k.next_power_of_two(), k);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(out.len().div_ceil(4 * TILE).max(1));
    let chunk = out.len().div_ceil(threads).div_ceil(LANES).max(1) * LANES;
    let kept = (k - 2 * trim) as f64;
    std::thread::scope(|scope| {
        for (c, piece) in out.chunks_mut(chunk).enumerate() {
            let network = &network;
            scope.spawn(move || {
                let mut block = vec![[0f32; LANES]; k];
                let base = c * chunk;
                for (g, outs) in piece.chunks_mut(LANES).enumerate() {
                    let start = base + g * LANES;
                    let width = outs.len();
                    for (row, u) in block.iter_mut().zip(updates) {
                        row[..width].copy_from_slice(&u[start..start + width]);
                    }
                    for &(a, b) in network {
                        let (x, y) = (block[a as usize], block[b as usize]);
                        let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
                        // Branch-free, so it compiles to packed min/max.
                        for l in 0..LANES {
                            lo[l] = if x[l] < y[l] { x[l] } else { y[l] };
                            hi[l] = if x[l] < y[l] { y[l] } else { x[l] };
                        }
                        block[a as usize] = lo;
                        block[b as usize] = hi;
                    }
                    let mut sums = [0f64; LANES];
                    for row in &block[trim..k - trim] {
                        for (s, v) in sums.iter_mut().zip(row) {
                            *s += *v as f64;
                        }
                    }
                    for (o, s) in outs.iter_mut().zip(sums) {
                        *o = (s / kept) as f32;
                    }
                }
            });
        }
    });
}

/// Reorders `keys` so that the `trim` smallest come first and the `trim`
/// largest last, and returns the middle. One branch-free partition around a
/// sampled pivot splits the work in two, so each tail is selected in half
/// the slice (two selections over the whole slice cost about a fifth more).
fn trim_in_place(keys: &mut [u32], trim: usize) -> &[u32] {
    let k = keys.len();
    if trim == 0 {
        return keys;
    }
    // The median of five spread samples: near the middle, so both tails fit
    // in their side almost always.
    let mut sample = [
        keys[0],
        keys[k / 4],
        keys[k / 2],
        keys[3 * k / 4],
        keys[k - 1],
    ];
    sample.sort_unstable();
    let pivot = sample[2];
    // Branch-free Lomuto partition: keys[..lower] < pivot <= keys[lower..].
    let mut lower = 0;
    for j in 0..k {
        keys.swap(j, lower);
        lower += (keys[lower] < pivot) as usize;
    }
    if lower >= trim && k - lower >= trim {
        let (left, right) = keys.split_at_mut(lower);
        if trim < left.len() {
            left.select_nth_unstable(trim);
        }
        let top = right.len() - trim;
        if top > 0 {
            right.select_nth_unstable(top - 1);
        }
    } else {
        // A lopsided split (many equal values): plain selections.
        keys.select_nth_unstable(trim);
        let rest = &mut keys[trim..];
        let top = rest.len() - trim;
        rest.select_nth_unstable(top - 1);
    }
    &keys[trim..k - trim]
}

/// Squared Euclidean distances between all pairs of updates (row-major K x K),
/// from a Gram matrix built chunk by chunk.
pub fn pairwise_sq_distances(updates: &[&[f32]]) -> Result<Vec<f64>, RobustError> {
    let len = check(updates)?;
    let k = updates.len();
    const CHUNK: usize = 2048;
    let mut gram = vec![0f64; k * k];
    let mut block = vec![0f32; k * CHUNK];
    let mut partial = ndarray::Array2::<f32>::zeros((k, k));
    let mut start = 0;
    while start < len {
        let width = CHUNK.min(len - start);
        for (r, u) in updates.iter().enumerate() {
            block[r * width..(r + 1) * width].copy_from_slice(&u[start..start + width]);
        }
        let a = ArrayView2::from_shape((k, width), &block[..k * width]).expect("block shape");
        general_mat_mul(1.0, &a, &a.t(), 0.0, &mut partial);
        for (g, p) in gram.iter_mut().zip(partial.iter()) {
            *g += *p as f64;
        }
        start += width;
    }
    let mut dist = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            dist[i * k + j] = (gram[i * k + i] + gram[j * k + j] - 2.0 * gram[i * k + j]).max(0.0);
        }
    }
    Ok(dist)
}

/// Krum scores of the updates in `alive` (indices into a K x K distance
/// matrix): the sum of each one's `alive.len() - f - 2` smallest distances to
/// the others.
fn krum_scores(dist: &[f64], k: usize, alive: &[usize], f: usize) -> Vec<f64> {
    let neighbours = alive.len().saturating_sub(f + 2).max(1);
    alive
        .iter()
        .map(|&i| {
            let mut d: Vec<f64> = alive
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| dist[i * k + j])
                .collect();
            d.sort_by(f64::total_cmp);
            d.iter().take(neighbours).sum()
        })
        .collect()
}

/// Multi-Krum: the indices of the `m` updates with the lowest Krum scores
/// (m = 1 is Krum). Needs K >= 2f + 3.
pub fn multi_krum(updates: &[&[f32]], f: usize, m: usize) -> Result<Vec<usize>, RobustError> {
    check(updates)?;
    let k = updates.len();
    if k < 2 * f + 3 {
        return Err(RobustError::TooFew {
            rule: "Krum",
            needed: 2 * f + 3,
            got: k,
            f,
        });
    }
    let dist = pairwise_sq_distances(updates)?;
    let alive: Vec<usize> = (0..k).collect();
    let scores = krum_scores(&dist, k, &alive, f);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    order.truncate(m.clamp(1, k));
    Ok(order)
}

/// Bulyan's aggregate into `out`. Needs K >= 4f + 3.
pub fn bulyan(updates: &[&[f32]], f: usize, out: &mut [f32]) -> Result<(), RobustError> {
    let len = check(updates)?;
    assert_eq!(out.len(), len, "output length");
    let k = updates.len();
    if k < 4 * f + 3 {
        return Err(RobustError::TooFew {
            rule: "Bulyan",
            needed: 4 * f + 3,
            got: k,
            f,
        });
    }
    let dist = pairwise_sq_distances(updates)?;
    let theta = k - 2 * f;
    let mut alive: Vec<usize> = (0..k).collect();
    let mut selected = Vec::with_capacity(theta);
    while selected.len() < theta {
        let scores = krum_scores(&dist, k, &alive, f);
        let best = (0..alive.len())
            .min_by(|a, b| {
                scores[*a]
                    .total_cmp(&scores[*b])
                    .then(alive[*a].cmp(&alive[*b]))
            })
            .expect("alive is not empty while selecting");
        selected.push(alive.remove(best));
    }
    let chosen: Vec<&[f32]> = selected.iter().map(|&i| updates[i]).collect();
    let beta = theta - 2 * f;
    for_each_column(&chosen, out, |keys, o| {
        keys.sort_unstable();
        let values: Vec<f32> = keys.iter().map(|k| value(*k)).collect();
        let median = if theta % 2 == 1 {
            values[theta / 2] as f64
        } else {
            (values[theta / 2 - 1] as f64 + values[theta / 2] as f64) / 2.0
        };
        // The beta values closest to the median form a window of the sorted
        // values; slide it to the best place.
        let cost = |s: usize| {
            (values[s] as f64 - median)
                .abs()
                .max((values[s + beta - 1] as f64 - median).abs())
        };
        let lo = (0..=(theta - beta))
            .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))
            .unwrap_or(0);
        let window = &values[lo..lo + beta];
        *o = (window.iter().map(|v| *v as f64).sum::<f64>() / beta as f64) as f32;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(u: &[Vec<f32>]) -> Vec<&[f32]> {
        u.iter().map(|v| v.as_slice()).collect()
    }

    #[test]
    fn keys_preserve_the_order_of_floats() {
        let mut v = vec![3.5f32, -0.0, 0.0, -2.0, f32::MIN, f32::MAX, 1e-30, -1e-30];
        let mut by_key = v.clone();
        by_key.sort_by_key(|x| key(*x));
        v.sort_by(f32::total_cmp);
        assert_eq!(by_key, v);
        assert!(v.iter().all(|x| value(key(*x)).to_bits() == x.to_bits()));
    }

    #[test]
    fn median_and_trimmed_mean_match_hand_computation() {
        let u = vec![
            vec![1.0, 10.0],
            vec![2.0, 20.0],
            vec![3.0, 30.0],
            vec![4.0, 40.0],
            vec![100.0, -1000.0],
        ];
        let mut out = vec![0.0; 2];
        coordinate_median(&views(&u), &mut out).unwrap();
        assert_eq!(out, vec![3.0, 20.0]);
        coordinate_median(&views(&u[..4]), &mut out).unwrap();
        assert_eq!(out, vec![2.5, 25.0]);
        // beta 0.2 of 5: drop one from each end -> means of {2,3,4} and {10,20,30}.
        trimmed_mean(&views(&u), 0.2, &mut out).unwrap();
        assert_eq!(out, vec![3.0, 20.0]);
        trimmed_mean(&views(&u), 0.0, &mut out).unwrap();
        assert_eq!(out, vec![22.0, -180.0]);
    }

    #[test]
    fn trimming_keeps_exactly_the_middle_values() {
        let mut state = 7u64;
        for k in [3usize, 5, 10, 37, 100] {
            for trim in 0..=(k - 1) / 2 {
                for dupes in [false, true] {
                    let keys: Vec<u32> = (0..k)
                        .map(|_| {
                            state = state
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let v = (state >> 33) as u32;
                            if dupes { v % 3 } else { v }
                        })
                        .collect();
                    let mut sorted = keys.clone();
                    sorted.sort_unstable();
                    let mut work = keys.clone();
                    let mut kept = trim_in_place(&mut work, trim).to_vec();
                    kept.sort_unstable();
                    assert_eq!(kept, sorted[trim..k - trim], "k {k} trim {trim}");
                }
            }
        }
    }

    #[test]
    fn the_sorting_network_sorts_and_agrees_with_selection() {
        // Every K up to 70 and some larger ones: the network sorts
        // arbitrary columns (0-1 principle, checked directly here).
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for k in (1usize..=70).chain([100, 129, 200]) {
            let network = sorting_network(k.next_power_of_two(), k);
            let mut v: Vec<u32> = (0..k).map(|_| next() % 50).collect();
            let mut want = v.clone();
            want.sort_unstable();
            for &(a, b) in &network {
                let (a, b) = (a as usize, b as usize);
                if v[a] > v[b] {
                    v.swap(a, b);
                }
            }
            assert_eq!(v, want, "k {k}");
        }
        // Both trimmed-mean paths agree, duplicates, signed zeros and
        // columns that are not a multiple of the lane count included.
        for k in [3usize, 5, 10, 37, 100] {
            let p = 1_000 + k;
            let u: Vec<Vec<f32>> = (0..k)
                .map(|_| {
                    (0..p)
                        .map(|j| match j % 5 {
                            0 => 0.0,
                            1 => -0.0,
                            2 => (next() % 4) as f32,
                            _ => next() as f32 / 1e9 - 2.0,
                        })
                        .collect()
                })
                .collect();
            for trim in [0, 1, (k - 1) / 2] {
                let (mut a, mut b) = (vec![0.0; p], vec![0.0; p]);
                trimmed_mean_network(&views(&u), trim, &mut a);
                trimmed_mean_select(&views(&u), trim, &mut b);
                for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                        "k {k} trim {trim} col {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn large_inputs_use_every_chunk() {
        let k = 7;
        let p = 20_011;
        let u: Vec<Vec<f32>> = (0..k)
            .map(|i| (0..p).map(|j| ((i * 31 + j * 7) % 13) as f32).collect())
            .collect();
        let mut out = vec![0.0; p];
        coordinate_median(&views(&u), &mut out).unwrap();
        for j in [0, 4095, 4096, 12345, p - 1] {
            let mut col: Vec<f32> = u.iter().map(|v| v[j]).collect();
            col.sort_by(f32::total_cmp);
            assert_eq!(out[j], col[3], "column {j}");
        }
    }

    #[test]
    fn distances_from_the_gram_matrix_are_exact_enough() {
        let u = vec![vec![0.0; 5000], vec![1.0; 5000], vec![3.0; 5000]];
        let d = pairwise_sq_distances(&views(&u)).unwrap();
        assert_eq!(d[1], 5000.0);
        assert_eq!(d[2], 45000.0);
        assert_eq!(d[5], 20000.0);
        assert_eq!(d[4], 0.0);
    }

    #[test]
    fn krum_picks_the_honest_cluster() {
        // Five honest updates near 1, two attackers far away; f = 2.
        let mut u: Vec<Vec<f32>> = (0..5).map(|i| vec![1.0 + 0.01 * i as f32; 4]).collect();
        u.push(vec![50.0; 4]);
        u.push(vec![-50.0; 4]);
        let v = views(&u);
        assert!(multi_krum(&v, 2, 1).unwrap()[0] < 5);
        let mut chosen = multi_krum(&v, 2, 5).unwrap();
        chosen.sort();
        assert_eq!(chosen, vec![0, 1, 2, 3, 4]);
        assert!(matches!(
            multi_krum(&v[..5], 2, 1),
            Err(RobustError::TooFew { needed: 7, .. })
        ));
    }

    #[test]
    fn krum_scores_match_hand_computation() {
        // f = 0, K = 4: two nearest neighbours each. Squared distances:
        // u0: 1 (u1) + 9 (u2) = 10; u1: 1 + 4 = 5; u2: 4 + 9 = 13; u3: huge.
        let u = vec![vec![0.0f32], vec![1.0], vec![3.0], vec![100.0]];
        assert_eq!(multi_krum(&views(&u), 0, 1).unwrap(), vec![1]);
        assert_eq!(multi_krum(&views(&u), 0, 2).unwrap(), vec![1, 0]);
    }

    #[test]
    fn bulyan_ignores_attackers() {
        // K = 11, f = 2: theta = 7 picked by Krum, beta = 3 around the median.
        let mut u: Vec<Vec<f32>> = (0..9).map(|i| vec![i as f32; 3]).collect();
        u.push(vec![1000.0; 3]);
        u.push(vec![-1000.0; 3]);
        let mut out = vec![0.0; 3];
        bulyan(&views(&u), 2, &mut out).unwrap();
        // Krum keeps the 7 honest values closest together (1..=7 or 2..=8...);
        // the 3 around their median average to the median: 4.
        assert_eq!(out, vec![4.0; 3]);
        assert!(bulyan(&views(&u[..10]), 2, &mut out).is_err());
    }
}
