//! The k-regular communication graph of SecAgg+ (Bell et al., CCS 2020): each
//! client shares its secrets with, and masks pairwise against, only its
//! neighbours in the graph instead of every other client (Bonawitz et al.,
//! CCS 2017), so a round costs O(k) per client instead of O(n).
//!
//! Construction: a circulant (Harary) graph over a seeded random permutation.
//! The n clients are placed on a cycle in the order of a Fisher-Yates shuffle
//! drawn from ChaCha20 keyed by the seed; the client at position p is joined to
//! positions p ± 1, ..., p ± ⌊k/2⌋ (mod n), and for odd k also to the
//! diametrically opposite position p + n/2. Every client then has exactly k
//! distinct neighbours when 1 <= k < n - 1 and n·k is even. When n·k is odd no
//! k-regular graph exists and k + 1 is used (raising the degree never lowers
//! the privacy a neighbourhood gives). When k >= n - 1 the graph is complete.
//! The shuffle keeps an adversary who controls roster positions (for example,
//! by choosing client names) from choosing whom it neighbours.

use chacha20::ChaCha20Rng;
use rand::{RngExt, SeedableRng};

use super::SecAggError;

/// A communication graph over roster indices `0..n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    /// `adjacency[i]`: the neighbours of roster index `i`, ascending.
    pub adjacency: Vec<Vec<u32>>,
    /// The degree every vertex has.
    pub degree: usize,
}

/// The degree a graph over `n` vertices built for `requested` has.
pub fn effective_degree(n: usize, requested: usize) -> usize {
    if n < 2 {
        return 0;
    }
    if requested >= n - 1 {
        return n - 1;
    }
    if requested % 2 == 1 && n % 2 == 1 {
        requested + 1
    } else {
        requested
    }
}

/// Builds the graph over `n` vertices with degree `requested` (see the module
/// documentation), deterministic in `seed`.
pub fn build(n: usize, requested: usize, seed: [u8; 32]) -> Result<Graph, SecAggError> {
    if requested == 0 {
        return Err(SecAggError::BadParams("degree must be at least 1"));
    }
    let n32 = u32::try_from(n).map_err(|_| SecAggError::BadParams("too many clients"))?;
    if n < 2 {
        return Err(SecAggError::BadParams("a graph needs at least 2 clients"));
    }
    let degree = effective_degree(n, requested);
    if degree == n - 1 {
        let adjacency = (0..n32)
            .map(|i| (0..n32).filter(|&j| j != i).collect())
            .collect();
        return Ok(Graph { adjacency, degree });
    }
    let mut rng = ChaCha20Rng::from_seed(seed);
    let mut perm: Vec<u32> = (0..n32).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        perm.swap(i, j);
    }
    let half = degree / 2;
    let mut adjacency = vec![Vec::with_capacity(degree); n];
    for (p, &node) in perm.iter().enumerate() {
        let list = &mut adjacency[node as usize];
        for o in 1..=half {
            list.push(perm[(p + o) % n]);
            list.push(perm[(p + n - o) % n]);
        }
        if degree % 2 == 1 {
            list.push(perm[(p + n / 2) % n]);
        }
        list.sort_unstable();
    }
    Ok(Graph { adjacency, degree })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize, k: usize) {
        let g = build(n, k, [3u8; 32]).unwrap();
        assert_eq!(g.degree, effective_degree(n, k));
        for (i, list) in g.adjacency.iter().enumerate() {
            assert_eq!(list.len(), g.degree, "n={n} k={k} vertex {i}");
            assert!(!list.contains(&(i as u32)));
            assert!(list.windows(2).all(|w| w[0] < w[1]), "duplicates");
            for &j in list {
                assert!(g.adjacency[j as usize].contains(&(i as u32)), "symmetric");
            }
        }
    }

    #[test]
    fn regular_symmetric_simple() {
        for n in 2..40 {
            for k in 1..n + 2 {
                check(n, k);
            }
        }
        check(1000, 8);
        check(1001, 9);
        assert_eq!(effective_degree(1001, 9), 10);
        assert_eq!(effective_degree(1000, 9), 9);
    }

    #[test]
    fn deterministic_in_the_seed() {
        assert_eq!(build(50, 10, [1; 32]), build(50, 10, [1; 32]));
        assert_ne!(build(50, 10, [1; 32]), build(50, 10, [2; 32]));
    }
}
