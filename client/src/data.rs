//! A client's local data: a dataset (or one client's share of it, for
//! demos and simulations) split into training and local test examples.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use fedquic_train::{DataSpec, Dataset, PartitionScheme, TrainError, partition};

/// `I/N`: this is client I (1-based) of N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    pub index: usize,
    pub count: usize,
}

impl FromStr for PartitionSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}': expected I/N, for example 3/10"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("'{s}': I must be a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("'{s}': N must be a number"))?;
        if count == 0 || index == 0 || index > count {
            return Err(format!("'{s}': need 1 <= I <= N"));
        }
        Ok(PartitionSpec { index, count })
    }
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Training and test examples of one client, sharing the loaded datasets.
#[derive(Clone, Debug)]
pub struct ClientData {
    pub train: Arc<Dataset>,
    pub train_indices: Vec<usize>,
    pub test: Arc<Dataset>,
    pub test_indices: Vec<usize>,
}

impl ClientData {
    /// Loads `spec`; with a partition, keeps only this client's share of
    /// the training split (by `scheme`) and of the test split (IID).
    pub fn load(
        spec: &DataSpec,
        part: Option<PartitionSpec>,
        scheme: &PartitionScheme,
        seed: u64,
    ) -> Result<ClientData, TrainError> {
        let (train, test) = spec.load()?;
        let (train, test) = (Arc::new(train), Arc::new(test));
        match part {
            None => Ok(ClientData {
                train_indices: (0..train.len()).collect(),
                test_indices: (0..test.len()).collect(),
                train,
                test,
            }),
            Some(p) => {
                let mut train_parts = partition(&train.labels, p.count, scheme, seed)?;
                let mut test_parts = partition(
                    &test.labels,
                    p.count.min(test.len().max(1)),
                    &PartitionScheme::Iid,
                    seed,
                )?;
                let test_indices = if p.index <= test_parts.len() {
                    std::mem::take(&mut test_parts[p.index - 1])
                } else {
                    Vec::new()
                };
                Ok(ClientData {
                    train_indices: std::mem::take(&mut train_parts[p.index - 1]),
                    test_indices,
                    train,
                    test,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_spec_parses() {
        assert_eq!(
            "3/10".parse::<PartitionSpec>().unwrap(),
            PartitionSpec {
                index: 3,
                count: 10
            }
        );
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(bad.parse::<PartitionSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn partitions_of_synthetic_data_are_disjoint() {
        let spec: DataSpec = "synthetic:600".parse().unwrap();
        let a = ClientData::load(
            &spec,
            Some("1/3".parse().unwrap()),
            &PartitionScheme::Iid,
            1,
        )
        .unwrap();
        let b = ClientData::load(
            &spec,
            Some("2/3".parse().unwrap()),
            &PartitionScheme::Iid,
            1,
        )
        .unwrap();
        assert_eq!(a.train_indices.len(), 200);
        assert!(a.train_indices.iter().all(|i| !b.train_indices.contains(i)));
        assert!(!a.test_indices.is_empty());
    }
}
