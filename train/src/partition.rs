//! Splitting a dataset's examples among federated clients (IID and non-IID schemes).

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;

use crate::error::{Result, TrainError};
use crate::rng::{SeededRng, ln_gamma_sample, seeded};

/// Full Dirichlet redraws tried before empty clients are patched (see [`partition`]).
const DIRICHLET_ATTEMPTS: usize = 20;

/// How examples are spread over clients; written `iid`, `shards:N` or `dirichlet:ALPHA`.
#[derive(Clone, Debug, PartialEq)]
pub enum PartitionScheme {
    /// Uniformly shuffled, near-equal parts.
    Iid,
    /// The FedAvg paper's pathological non-IID split: examples sorted by label, cut into
    /// `num_clients * per_client` shards, `per_client` random shards per client.
    Shards { per_client: usize },
    /// Per class, client shares drawn from a symmetric Dirichlet(`alpha`): small alpha
    /// concentrates each class on few clients, large alpha approaches IID.
    Dirichlet { alpha: f64 },
    /// Quantity skew: IID labels, but client sizes proportional to lognormal(0, `sigma`)
    /// draws (each client at least one example), as cross-device populations are: a few
    /// clients hold much of the data. `sigma` 0 is an even split.
    Quantity { sigma: f64 },
}

impl FromStr for PartitionScheme {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<PartitionScheme> {
        let invalid = |reason: String| TrainError::InvalidPartitionScheme {
            spec: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        let (kind, argument) = match trimmed.split_once(':') {
            Some((kind, argument)) => (kind, Some(argument.trim())),
            None => (trimmed, None),
        };
        let scheme = match (kind, argument) {
            ("iid", None) => PartitionScheme::Iid,
            ("shards", Some(count)) => PartitionScheme::Shards {
                per_client: count.parse().map_err(|_| {
                    invalid(format!("shards per client {count:?} is not a whole number"))
                })?,
            },
            ("dirichlet", Some(alpha)) => PartitionScheme::Dirichlet {
                alpha: alpha
                    .parse()
                    .map_err(|_| invalid(format!("alpha {alpha:?} is not a number")))?,
            },
            ("quantity", Some(sigma)) => PartitionScheme::Quantity {
                sigma: sigma
                    .parse()
                    .map_err(|_| invalid(format!("sigma {sigma:?} is not a number")))?,
            },
            _ => {
                return Err(invalid(
                    "expected iid, shards:PER_CLIENT (e.g. shards:2), dirichlet:ALPHA (e.g. dirichlet:0.5) or quantity:SIGMA (e.g. quantity:1)"
                        .to_string(),
                ));
            }
        };
        scheme.validate().map_err(invalid)?;
        Ok(scheme)
    }
}

impl fmt::Display for PartitionScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionScheme::Iid => f.write_str("iid"),
            PartitionScheme::Shards { per_client } => write!(f, "shards:{per_client}"),
            // f64's Display is the shortest text that parses back to the same value.
            PartitionScheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            PartitionScheme::Quantity { sigma } => write!(f, "quantity:{sigma}"),
        }
    }
}

impl PartitionScheme {
    /// Why the scheme's parameter is unusable, if it is.
    fn validate(&self) -> std::result::Result<(), String> {
        match self {
            PartitionScheme::Shards { per_client: 0 } => {
                Err("shards per client must be at least 1".to_string())
            }
            PartitionScheme::Dirichlet { alpha } if !(alpha.is_finite() && *alpha > 0.0) => Err(
                format!("alpha must be a finite number above 0, got {alpha}"),
            ),
            PartitionScheme::Quantity { sigma }
                if !(sigma.is_finite() && (0.0..=10.0).contains(sigma)) =>
            {
                Err(format!("sigma must be in [0, 10], got {sigma}"))
            }
            _ => Ok(()),
        }
    }
}

/// Splits the indices `0..labels.len()` among `num_clients` clients.
///
/// Every scheme uses each index exactly once and is a pure function of its inputs and
/// `seed`. No client is left empty: with `Iid` and `Shards` that follows from the sizes
/// (errors if there are too few examples); with `Dirichlet`, draws that leave a client
/// empty are redrawn a bounded number of times, and if that keeps happening (tiny alpha,
/// many clients) each empty client gets one example moved from the currently largest client.
pub fn partition(
    labels: &[u8],
    num_clients: usize,
    scheme: &PartitionScheme,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if num_clients == 0 {
        return Err(TrainError::Partition(
            "the number of clients must be at least 1".to_string(),
        ));
    }
    if num_clients > labels.len() {
        return Err(TrainError::Partition(format!(
            "{num_clients} clients but only {} examples: every client needs at least one",
            labels.len()
        )));
    }
    scheme
        .validate()
        .map_err(|reason| TrainError::InvalidPartitionScheme {
            spec: scheme.to_string(),
            reason,
        })?;
    let mut rng = seeded(seed);
    match scheme {
        PartitionScheme::Iid => {
            let mut order: Vec<usize> = (0..labels.len()).collect();
            order.shuffle(&mut rng);
            Ok(split_evenly(&order, num_clients)
                .map(<[usize]>::to_vec)
                .collect())
        }
        PartitionScheme::Shards { per_client } => {
            shards(labels, num_clients, *per_client, &mut rng)
        }
        PartitionScheme::Dirichlet { alpha } => {
            Ok(dirichlet(labels, num_clients, *alpha, &mut rng))
        }
        PartitionScheme::Quantity { sigma } => {
            let mut order: Vec<usize> = (0..labels.len()).collect();
            order.shuffle(&mut rng);
            let sizes = lognormal_sizes(labels.len(), num_clients, *sigma, &mut rng);
            let mut start = 0;
            Ok(sizes
                .into_iter()
                .map(|n| {
                    let part = order[start..start + n].to_vec();
                    start += n;
                    part
                })
                .collect())
        }
    }
}

/// `parts` sizes summing to `total`, each at least 1, the rest shared in proportion to
/// lognormal(0, `sigma`) weights (largest remainders get the leftover examples).
fn lognormal_sizes(total: usize, parts: usize, sigma: f64, rng: &mut SeededRng) -> Vec<usize> {
    let weights: Vec<f64> = (0..parts)
        .map(|_| (sigma * crate::rng::standard_normal(rng)).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    let spare = total - parts;
    let shares: Vec<f64> = weights.iter().map(|w| w / sum * spare as f64).collect();
    let mut sizes: Vec<usize> = shares.iter().map(|s| 1 + s.floor() as usize).collect();
    let mut left = total - sizes.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..parts).collect();
    by_remainder.sort_by(|&a, &b| {
        let frac = |i: usize| shares[i] - shares[i].floor();
        frac(b).total_cmp(&frac(a)).then(a.cmp(&b))
    });
    for i in by_remainder.into_iter().cycle() {
        if left == 0 {
            break;
        }
        sizes[i] += 1;
        left -= 1;
    }
    sizes
}

/// `parts` consecutive pieces of `items` whose lengths differ by at most one (the longer
/// ones first).
fn split_evenly<T>(items: &[T], parts: usize) -> impl Iterator<Item = &[T]> {
    let (base, extra) = (items.len() / parts, items.len() % parts);
    (0..parts).map(move |part| {
        let start = part * base + part.min(extra);
        let end = start + base + usize::from(part < extra);
        &items[start..end]
    })
}

fn shards(
    labels: &[u8],
    num_clients: usize,
    per_client: usize,
    rng: &mut SeededRng,
) -> Result<Vec<Vec<usize>>> {
    let shard_count = num_clients
        .checked_mul(per_client)
        .filter(|&count| count <= labels.len());
    let Some(shard_count) = shard_count else {
        return Err(TrainError::Partition(format!(
            "{num_clients} clients x {per_client} shards is more shards than the {} examples",
            labels.len()
        )));
    };
    // Sort by label, ties by index, so the shards only depend on the labels.
    let mut by_label: Vec<usize> = (0..labels.len()).collect();
    by_label.sort_by_key(|&index| labels[index]);
    let shard_list: Vec<&[usize]> = split_evenly(&by_label, shard_count).collect();
    let mut shard_order: Vec<usize> = (0..shard_count).collect();
    shard_order.shuffle(rng);
    Ok(shard_order
        .chunks_exact(per_client)
        .map(|owned| {
            owned
                .iter()
                .flat_map(|&shard| shard_list[shard].iter().copied())
                .collect()
        })
        .collect())
}

fn dirichlet(
    labels: &[u8],
    num_clients: usize,
    alpha: f64,
    rng: &mut SeededRng,
) -> Vec<Vec<usize>> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); 256];
    for (index, &label) in labels.iter().enumerate() {
        by_class[usize::from(label)].push(index);
    }
    by_class.retain(|members| !members.is_empty());

    let mut clients = Vec::new();
    for _ in 0..DIRICHLET_ATTEMPTS {
        clients = dirichlet_draw(&by_class, num_clients, alpha, rng);
        if clients.iter().all(|client| !client.is_empty()) {
            return clients;
        }
    }
    fill_empty_clients(&mut clients);
    clients
}

/// One Dirichlet assignment: per class, shuffled members cut at the cumulative shares.
fn dirichlet_draw(
    by_class: &[Vec<usize>],
    num_clients: usize,
    alpha: f64,
    rng: &mut SeededRng,
) -> Vec<Vec<usize>> {
    let mut clients = vec![Vec::new(); num_clients];
    let mut log_weights = vec![0.0f64; num_clients];
    for members in by_class {
        let mut members = members.clone();
        members.shuffle(rng);
        // Normalised Gamma(alpha) draws are Dirichlet(alpha); normalise in log space so
        // tiny alphas, whose Gamma draws underflow f64, still give valid shares.
        for weight in &mut log_weights {
            *weight = ln_gamma_sample(rng, alpha);
        }
        let max = log_weights
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = log_weights.iter().map(|&w| (w - max).exp()).sum();
        let mut cumulative = 0.0;
        let mut start = 0;
        for (client, &weight) in clients.iter_mut().zip(&log_weights) {
            cumulative += (weight - max).exp() / total;
            let end = ((cumulative * members.len() as f64).round() as usize).min(members.len());
            client.extend_from_slice(&members[start..end.max(start)]);
            start = end.max(start);
        }
        // Rounding can leave the last few members unassigned: they go to the last client.
        if let Some(last) = clients.last_mut() {
            last.extend_from_slice(&members[start..]);
        }
    }
    clients
}

/// Moves one example from the largest client to each empty one (possible because there
/// are at least as many examples as clients).
fn fill_empty_clients(clients: &mut [Vec<usize>]) {
    for empty in 0..clients.len() {
        if !clients[empty].is_empty() {
            continue;
        }
        let largest = (0..clients.len())
            .max_by_key(|&client| (clients[client].len(), std::cmp::Reverse(client)));
        if let Some(largest) = largest
            && let Some(moved) = clients[largest].pop()
        {
            clients[empty].push(moved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(count: usize, classes: usize) -> Vec<u8> {
        (0..count)
            .map(|i| ((i * 7 + i / 3) % classes) as u8)
            .collect()
    }

    /// Asserts that the parts use every index below `count` exactly once.
    fn assert_exact_cover(parts: &[Vec<usize>], count: usize) {
        let mut seen = vec![false; count];
        for &index in parts.iter().flatten() {
            assert!(!seen[index], "index {index} used twice");
            seen[index] = true;
        }
        assert!(seen.iter().all(|&used| used), "some index unused");
    }

    #[test]
    fn scheme_strings_round_trip() {
        for text in [
            "iid",
            "shards:2",
            "dirichlet:0.5",
            "dirichlet:0.1",
            "dirichlet:100",
            "dirichlet:1e-7",
        ] {
            let scheme: PartitionScheme = text.parse().unwrap();
            assert_eq!(
                scheme.to_string().parse::<PartitionScheme>().unwrap(),
                scheme
            );
        }
        assert_eq!(
            "shards:3".parse::<PartitionScheme>().unwrap(),
            PartitionScheme::Shards { per_client: 3 }
        );
        for bad in [
            "",
            "iid:2",
            "shards",
            "shards:0",
            "shards:-1",
            "dirichlet:0",
            "dirichlet:-1",
            "dirichlet:nan",
            "dirichlet:inf",
            "dirichlet:x",
            "zipf:1",
        ] {
            assert!(
                matches!(
                    bad.parse::<PartitionScheme>(),
                    Err(TrainError::InvalidPartitionScheme { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn iid_is_an_even_exact_cover() {
        let labels = labels(103, 10);
        let parts = partition(&labels, 10, &PartitionScheme::Iid, 1).unwrap();
        assert_exact_cover(&parts, 103);
        assert!(
            parts
                .iter()
                .all(|part| part.len() == 10 || part.len() == 11)
        );
        assert_eq!(
            parts,
            partition(&labels, 10, &PartitionScheme::Iid, 1).unwrap()
        );
        assert_ne!(
            parts,
            partition(&labels, 10, &PartitionScheme::Iid, 2).unwrap()
        );
    }

    #[test]
    fn shards_give_each_client_few_labels() {
        let labels: Vec<u8> = (0..6000).map(|i| (i % 10) as u8).collect();
        let scheme = PartitionScheme::Shards { per_client: 2 };
        let parts = partition(&labels, 100, &scheme, 5).unwrap();
        assert_exact_cover(&parts, 6000);
        for part in &parts {
            assert_eq!(part.len(), 60);
            let mut distinct: Vec<u8> = part.iter().map(|&i| labels[i]).collect();
            distinct.sort_unstable();
            distinct.dedup();
            // Shards of 30 sorted examples lie within one class (600 per class here).
            assert!(distinct.len() <= 2, "client has labels {distinct:?}");
        }
        assert_eq!(parts, partition(&labels, 100, &scheme, 5).unwrap());
        assert_ne!(parts, partition(&labels, 100, &scheme, 6).unwrap());
    }

    #[test]
    fn dirichlet_covers_everything_and_skews_with_alpha() {
        let labels = labels(5000, 10);
        let skew = |alpha: f64| {
            let parts = partition(&labels, 20, &PartitionScheme::Dirichlet { alpha }, 9).unwrap();
            assert_exact_cover(&parts, 5000);
            assert!(parts.iter().all(|part| !part.is_empty()));
            // Mean share of each client's most common label.
            parts
                .iter()
                .map(|part| {
                    let mut counts = [0usize; 10];
                    for &i in part {
                        counts[usize::from(labels[i])] += 1;
                    }
                    *counts.iter().max().unwrap() as f64 / part.len() as f64
                })
                .sum::<f64>()
                / parts.len() as f64
        };
        let concentrated = skew(0.05);
        let spread = skew(1000.0);
        assert!(concentrated > 0.6, "{concentrated}");
        assert!(spread < 0.2, "{spread}");
        let scheme = PartitionScheme::Dirichlet { alpha: 0.5 };
        assert_eq!(
            partition(&labels, 20, &scheme, 1).unwrap(),
            partition(&labels, 20, &scheme, 1).unwrap()
        );
        assert_ne!(
            partition(&labels, 20, &scheme, 1).unwrap(),
            partition(&labels, 20, &scheme, 2).unwrap()
        );
    }

    #[test]
    fn quantity_skew_uses_every_example_once_and_skews_sizes_with_sigma() {
        let labels: Vec<u8> = (0..10_000).map(|i| (i % 10) as u8).collect();
        let spread = |sigma: f64| {
            let parts = partition(&labels, 100, &PartitionScheme::Quantity { sigma }, 3).unwrap();
            let mut seen: Vec<usize> = parts.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..labels.len()).collect::<Vec<_>>(), "sigma {sigma}");
            let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
            assert!(sizes.iter().all(|&n| n >= 1));
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            *max as f64 / *min as f64
        };
        assert!(spread(0.0) <= 1.02, "sigma 0 is an even split");
        let skewed = spread(1.5);
        assert!(skewed > 20.0, "max/min {skewed}");
        let a = partition(&labels, 50, &PartitionScheme::Quantity { sigma: 1.0 }, 9).unwrap();
        let b = partition(&labels, 50, &PartitionScheme::Quantity { sigma: 1.0 }, 9).unwrap();
        assert_eq!(a, b, "the same seed gives the same split");
        // More clients than the skew can feed: still at least one example each.
        let tight = partition(
            &labels[..120],
            100,
            &PartitionScheme::Quantity { sigma: 3.0 },
            1,
        )
        .unwrap();
        assert!(tight.iter().all(|p| !p.is_empty()));
        assert_eq!(
            "quantity:1.5"
                .parse::<PartitionScheme>()
                .unwrap()
                .to_string(),
            "quantity:1.5"
        );
        assert!("quantity:-1".parse::<PartitionScheme>().is_err());
        assert!("quantity:x".parse::<PartitionScheme>().is_err());
    }

    #[test]
    fn dirichlet_tiny_alpha_leaves_no_client_empty() {
        let labels = labels(300, 3);
        let parts = partition(
            &labels,
            100,
            &PartitionScheme::Dirichlet { alpha: 0.001 },
            4,
        )
        .unwrap();
        assert_exact_cover(&parts, 300);
        assert!(parts.iter().all(|part| !part.is_empty()));
    }

    #[test]
    fn thousand_clients_over_sixty_thousand_labels_is_fast() {
        let labels = labels(60_000, 10);
        let started = std::time::Instant::now();
        for scheme in [
            PartitionScheme::Iid,
            PartitionScheme::Shards { per_client: 2 },
            PartitionScheme::Dirichlet { alpha: 0.5 },
        ] {
            let parts = partition(&labels, 1000, &scheme, 3).unwrap();
            assert_eq!(parts.len(), 1000);
            assert_exact_cover(&parts, 60_000);
        }
        // Generous for debug builds; release takes a few milliseconds.
        assert!(
            started.elapsed().as_secs_f64() < 5.0,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        let labels = labels(10, 2);
        assert!(partition(&labels, 0, &PartitionScheme::Iid, 0).is_err());
        assert!(partition(&labels, 11, &PartitionScheme::Iid, 0).is_err());
        assert!(partition(&labels, 6, &PartitionScheme::Shards { per_client: 2 }, 0).is_err());
        assert!(partition(&labels, 2, &PartitionScheme::Shards { per_client: 0 }, 0).is_err());
        assert!(partition(&labels, 2, &PartitionScheme::Dirichlet { alpha: 0.0 }, 0).is_err());
        assert!(
            partition(
                &labels,
                2,
                &PartitionScheme::Dirichlet { alpha: f64::NAN },
                0
            )
            .is_err()
        );
        assert!(partition(&[], 1, &PartitionScheme::Iid, 0).is_err());
        // Exactly one example per client works for every scheme.
        assert_eq!(
            partition(&labels, 10, &PartitionScheme::Shards { per_client: 1 }, 0)
                .unwrap()
                .len(),
            10
        );
        assert_eq!(
            partition(&labels, 10, &PartitionScheme::Dirichlet { alpha: 0.1 }, 0)
                .unwrap()
                .len(),
            10
        );
    }
}
