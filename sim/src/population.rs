//! Check-in simulation (`--materialize selected`): a virtual client exists
//! only while it is selected. An idle client is its index, its data recipe
//! (a partition of a shared dataset, or a seed for data drawn from its id)
//! and, for strategies and codecs that keep per-client state, a state
//! directory on disk; nothing of it is in memory.
//!
//! Each round the simulator draws a seeded cohort from the population and
//! materialises it: certificates, an endpoint, a trainer and its data. The
//! cohort connects over QUIC with mutual TLS, trains its one task, says
//! goodbye and is dropped. The aggregator runs with
//! `one_task_per_connection`, so it takes exactly the clients that checked
//! in for the round; its "waiting for" signal says which round (and, after
//! a failed attempt, which retry) needs a cohort next.

use std::path::PathBuf;
use std::sync::Arc;

use fedquic_aggregator::engine::mix;
use fedquic_train::synthetic::PerClient;
use fedquic_train::{Dataset, PartitionScheme};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Populations above this size are materialised on selection by default.
pub const AUTO_SELECTED_ABOVE: usize = 10_000;

/// Where clients' training data comes from.
pub enum ClientData {
    /// Index lists into one shared dataset (its partition).
    Shared {
        train: Arc<Dataset>,
        parts: Vec<Vec<usize>>,
    },
    /// Drawn from the client's id when it is selected.
    PerClient {
        recipe: PerClient,
        scheme: PartitionScheme,
    },
}

impl ClientData {
    /// Client `index`'s dataset and the examples of it that are its own.
    /// Per-client data is drawn here (CPU work: call it off the async
    /// threads).
    pub fn materialise(&self, index: usize) -> anyhow::Result<(Arc<Dataset>, Vec<usize>)> {
        match self {
            ClientData::Shared { train, parts } => {
                let part = parts
                    .get(index)
                    .ok_or_else(|| anyhow::anyhow!("no partition for client {index}"))?;
                Ok((Arc::clone(train), part.clone()))
            }
            ClientData::PerClient { recipe, scheme } => {
                let data = recipe.client(index as u64, scheme)?;
                let indices = (0..data.len()).collect();
                Ok((Arc::new(data), indices))
            }
        }
    }
}

/// The seeded cohorts of a population.
#[derive(Clone, Copy, Debug)]
pub struct Cohorts {
    pub population: usize,
    pub per_round: usize,
    pub seed: u64,
}

impl Cohorts {
    /// The clients (0-based, ascending) that check in for `round`'s
    /// `attempt` (1 first, as the aggregator counts them): `per_round` distinct ones drawn uniformly, in O(per_round)
    /// time and memory whatever the population.
    pub fn draw(&self, round: u64, attempt: u32) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, round, 0xc0_4012 + u64::from(attempt)));
        let amount = self.per_round.min(self.population);
        let mut picked = rand::seq::index::sample(&mut rng, self.population, amount).into_vec();
        picked.sort_unstable();
        picked
    }
}

/// Where per-client state lives between a client's selections: one
/// directory per client ever selected, under `root`.
pub struct StateDirs {
    pub root: PathBuf,
    /// Removed when the run ends (no `--out`).
    _temporary: Option<tempfile::TempDir>,
}

impl StateDirs {
    /// `DIR/client-state` with `--out DIR`, else a temporary directory.
    pub fn new(out: Option<&std::path::Path>) -> anyhow::Result<StateDirs> {
        match out {
            Some(out) => Ok(StateDirs {
                root: out.join("client-state"),
                _temporary: None,
            }),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("fedquic-sim-state-")
                    .tempdir()?;
                Ok(StateDirs {
                    root: dir.path().to_path_buf(),
                    _temporary: Some(dir),
                })
            }
        }
    }

    pub fn client(&self, index: usize) -> PathBuf {
        self.root.join(format!("{index}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohorts_are_seeded_distinct_and_cheap_for_huge_populations() {
        let c = Cohorts {
            population: 10_000_000,
            per_round: 100,
            seed: 3,
        };
        let a = c.draw(1, 1);
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert!(a.iter().all(|&i| i < 10_000_000));
        assert_eq!(a, c.draw(1, 1));
        assert_ne!(a, c.draw(2, 1));
        assert_ne!(a, c.draw(1, 2), "a retry draws a new cohort");
        let small = Cohorts {
            population: 5,
            per_round: 10,
            seed: 0,
        };
        assert_eq!(small.draw(1, 1), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn shared_data_hands_out_a_clients_own_part() {
        let train = Arc::new(fedquic_train::synthetic::generate(20, 1));
        let data = ClientData::Shared {
            train,
            parts: vec![vec![0, 1], vec![5]],
        };
        assert_eq!(data.materialise(1).unwrap().1, vec![5]);
        assert!(data.materialise(2).is_err());
        let per = ClientData::PerClient {
            recipe: PerClient {
                examples: 7,
                test: 1,
                seed: 0,
            },
            scheme: PartitionScheme::Iid,
        };
        let (set, own) = per.materialise(123_456).unwrap();
        assert_eq!((set.len(), own), (7, (0..7).collect::<Vec<_>>()));
    }
}
