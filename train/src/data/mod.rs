//! In-memory datasets and the `DataSpec` strings that name where they come from.

mod csv;
mod idx;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Result, TrainError};
use crate::synthetic;

pub use self::csv::{CSV_SPLIT_SEED, load_csv};
pub use self::idx::{
    IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IdxImages, MAX_IDX_PAYLOAD, load_mnist, read_idx_images,
    read_idx_labels,
};

/// Labelled examples: `features` is row-major `len() x dim`; `labels[i] < classes`.
///
/// The fields are public for cheap access; [`Dataset::new`] and [`Dataset::validate`]
/// check that they agree, and training/evaluation validate before use.
#[derive(Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<f32>,
    pub labels: Vec<u8>,
    pub dim: usize,
    pub classes: usize,
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The features are far too many to print.
        f.debug_struct("Dataset")
            .field("len", &self.len())
            .field("dim", &self.dim)
            .field("classes", &self.classes)
            .finish()
    }
}

impl Dataset {
    /// A checked dataset (see [`Dataset::validate`]).
    pub fn new(features: Vec<f32>, labels: Vec<u8>, dim: usize, classes: usize) -> Result<Dataset> {
        let dataset = Dataset {
            features,
            labels,
            dim,
            classes,
        };
        dataset.validate()?;
        Ok(dataset)
    }

    /// Checks that `dim >= 1`, `1 <= classes <= 256`, `features.len() == len() * dim`,
    /// and every label is below `classes`.
    pub fn validate(&self) -> Result<()> {
        self.check_layout()?;
        if let Some(index) = self
            .labels
            .iter()
            .position(|&label| usize::from(label) >= self.classes)
        {
            return Err(TrainError::InvalidDataset(format!(
                "example {index} has label {} but there are only {} classes",
                self.labels[index], self.classes
            )));
        }
        Ok(())
    }

    /// The constant-time part of [`Dataset::validate`] (everything but the labels), for
    /// hot paths that check the labels they actually use themselves.
    pub(crate) fn check_layout(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(TrainError::InvalidDataset(
                "dim must be at least 1".to_string(),
            ));
        }
        if !(1..=256).contains(&self.classes) {
            return Err(TrainError::InvalidDataset(format!(
                "classes must be between 1 and 256 (labels are bytes), got {}",
                self.classes
            )));
        }
        if self.labels.len().checked_mul(self.dim) != Some(self.features.len()) {
            return Err(TrainError::InvalidDataset(format!(
                "{} features do not make {} examples of dimension {}",
                self.features.len(),
                self.labels.len(),
                self.dim
            )));
        }
        Ok(())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features of example `i`.
    ///
    /// # Panics
    /// If `i >= len()`, like slice indexing.
    pub fn example(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// A new dataset holding copies of the examples `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_layout()?;
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            let label = *self.labels.get(index).ok_or(TrainError::IndexOutOfRange {
                index,
                len: self.len(),
            })?;
            let row = self
                .features
                .get(index * self.dim..(index + 1) * self.dim)
                .ok_or(TrainError::IndexOutOfRange {
                    index,
                    len: self.len(),
                })?;
            features.extend_from_slice(row);
            labels.push(label);
        }
        Ok(Dataset {
            features,
            labels,
            dim: self.dim,
            classes: self.classes,
        })
    }

    /// How many examples carry each label (`classes` entries).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(usize::from(label)) {
                *count += 1;
            }
        }
        counts
    }
}

/// Training examples in the default synthetic dataset.
pub const DEFAULT_SYNTHETIC_TRAIN: usize = 12_000;
/// Test examples in the default synthetic dataset.
pub const DEFAULT_SYNTHETIC_TEST: usize = 2_000;
/// Seed of the default synthetic dataset.
pub const DEFAULT_SYNTHETIC_SEED: u64 = 7;
/// Upper bound on either synthetic split (a million 28x28 images is ~3 GB of `f32`).
pub const MAX_SYNTHETIC_EXAMPLES: usize = 1_000_000;

/// Where a train/test pair of datasets comes from.
///
/// String forms (parsed by [`FromStr`](#impl-FromStr-for-DataSpec), produced by
/// [`Display`](#impl-Display-for-DataSpec)):
///
/// - `synthetic`: the built-in procedurally drawn digits, 12,000 train / 2,000 test, seed 7.
/// - `synthetic:TRAIN`: `TRAIN` training images, `max(TRAIN / 6, 1)` test images, seed 7.
/// - `synthetic:TRAIN/TEST`: explicit test size.
/// - `synthetic:TRAIN:SEED` or `synthetic:TRAIN/TEST:SEED`: another seed.
/// - `mnist:DIR`: the four MNIST IDX files in `DIR` (raw or `.gz`).
/// - `csv:FILE`: `label,f1,f2,...` rows, split 80/20 deterministically.
/// - `synthetic-per-client:N[/TEST][:SEED]`: no shared training set; each simulated
///   client draws `N` digits of its own from its id when selected
///   ([`crate::synthetic::PerClient`]); `TEST` (default 2,000) test digits.
///
/// Sizes are between 1 and [`MAX_SYNTHETIC_EXAMPLES`].
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    Synthetic {
        train: usize,
        test: usize,
        seed: u64,
    },
    Mnist {
        dir: PathBuf,
    },
    Csv {
        path: PathBuf,
    },
    SyntheticPerClient(crate::synthetic::PerClient),
}

impl Default for DataSpec {
    fn default() -> DataSpec {
        DataSpec::Synthetic {
            train: DEFAULT_SYNTHETIC_TRAIN,
            test: DEFAULT_SYNTHETIC_TEST,
            seed: DEFAULT_SYNTHETIC_SEED,
        }
    }
}

/// Test-set size implied by `synthetic:TRAIN`.
fn default_synthetic_test(train: usize) -> usize {
    (train / 6).max(1)
}

impl DataSpec {
    /// Loads (or generates) the `(train, test)` datasets.
    pub fn load(&self) -> Result<(Dataset, Dataset)> {
        match self {
            DataSpec::Synthetic { train, test, seed } => {
                for (name, count) in [("train", *train), ("test", *test)] {
                    if !(1..=MAX_SYNTHETIC_EXAMPLES).contains(&count) {
                        return Err(TrainError::InvalidDataSpec {
                            spec: self.to_string(),
                            reason: format!(
                                "the {name} size must be between 1 and {MAX_SYNTHETIC_EXAMPLES}, got {count}"
                            ),
                        });
                    }
                }
                Ok(synthetic::train_test(*train, *test, *seed))
            }
            DataSpec::Mnist { dir } => load_mnist(dir),
            DataSpec::Csv { path } => load_csv(path),
            DataSpec::SyntheticPerClient(_) => Err(TrainError::InvalidDataSpec {
                spec: self.to_string(),
                reason: "per-client data has no shared training set: each simulated client \
                         draws its own (fedquic-sim)"
                    .into(),
            }),
        }
    }

    /// The per-client recipe, for `synthetic-per-client:...`.
    pub fn per_client(&self) -> Option<&crate::synthetic::PerClient> {
        match self {
            DataSpec::SyntheticPerClient(p) => Some(p),
            _ => None,
        }
    }
}

impl FromStr for DataSpec {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<DataSpec> {
        let invalid = |reason: String| TrainError::InvalidDataSpec {
            spec: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        let (kind, argument) = match trimmed.split_once(':') {
            Some((kind, argument)) => (kind, Some(argument)),
            None => (trimmed, None),
        };
        match (kind, argument) {
            ("synthetic", None) => Ok(DataSpec::default()),
            ("synthetic", Some(argument)) => parse_synthetic(argument).map_err(invalid),
            ("synthetic-per-client", Some(argument)) => parse_per_client(argument).map_err(invalid),
            ("mnist", Some(dir)) if !dir.is_empty() => Ok(DataSpec::Mnist { dir: dir.into() }),
            ("csv", Some(path)) if !path.is_empty() => Ok(DataSpec::Csv { path: path.into() }),
            ("mnist", _) => Err(invalid("expected mnist:DIR".to_string())),
            ("csv", _) => Err(invalid("expected csv:FILE".to_string())),
            _ => Err(invalid(
                "expected synthetic[:TRAIN[/TEST][:SEED]], synthetic-per-client:N[/TEST][:SEED], \
                 mnist:DIR or csv:FILE"
                    .to_string(),
            )),
        }
    }
}

/// Parses the part after `synthetic-per-client:`.
fn parse_per_client(argument: &str) -> std::result::Result<DataSpec, String> {
    let explicit_test = argument.split(':').next().is_some_and(|s| s.contains('/'));
    let DataSpec::Synthetic { train, test, seed } = parse_synthetic(argument)? else {
        unreachable!("parse_synthetic makes a Synthetic spec")
    };
    if train > crate::synthetic::MAX_PER_CLIENT_EXAMPLES {
        return Err(format!(
            "at most {} examples per client, got {train}",
            crate::synthetic::MAX_PER_CLIENT_EXAMPLES
        ));
    }
    Ok(DataSpec::SyntheticPerClient(crate::synthetic::PerClient {
        examples: train,
        test: if explicit_test {
            test
        } else {
            DEFAULT_SYNTHETIC_TEST
        },
        seed,
    }))
}

/// Parses the part after `synthetic:`.
fn parse_synthetic(argument: &str) -> std::result::Result<DataSpec, String> {
    let (sizes, seed) = match argument.split_once(':') {
        Some((sizes, seed)) => (sizes, Some(seed)),
        None => (argument, None),
    };
    let parse_size = |name: &str, text: &str| -> std::result::Result<usize, String> {
        let count = text
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("the {name} size {text:?} is not a whole number"))?;
        if (1..=MAX_SYNTHETIC_EXAMPLES).contains(&count) {
            Ok(count)
        } else {
            Err(format!(
                "the {name} size must be between 1 and {MAX_SYNTHETIC_EXAMPLES}, got {count}"
            ))
        }
    };
    let (train, test) = match sizes.split_once('/') {
        Some((train, test)) => (parse_size("train", train)?, parse_size("test", test)?),
        None => {
            let train = parse_size("train", sizes)?;
            (train, default_synthetic_test(train))
        }
    };
    let seed = match seed {
        Some(seed) => seed
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("the seed {seed:?} is not a 64-bit unsigned integer"))?,
        None => DEFAULT_SYNTHETIC_SEED,
    };
    Ok(DataSpec::Synthetic { train, test, seed })
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Synthetic { train, test, seed } => {
                if *self == DataSpec::default() {
                    return f.write_str("synthetic");
                }
                write!(f, "synthetic:{train}")?;
                if *test != default_synthetic_test(*train) {
                    write!(f, "/{test}")?;
                }
                if *seed != DEFAULT_SYNTHETIC_SEED {
                    write!(f, ":{seed}")?;
                }
                Ok(())
            }
            DataSpec::Mnist { dir } => write!(f, "mnist:{}", dir.display()),
            DataSpec::Csv { path } => write!(f, "csv:{}", path.display()),
            DataSpec::SyntheticPerClient(p) => {
                write!(f, "synthetic-per-client:{}", p.examples)?;
                if p.test != DEFAULT_SYNTHETIC_TEST {
                    write!(f, "/{}", p.test)?;
                }
                if p.seed != DEFAULT_SYNTHETIC_SEED {
                    write!(f, ":{}", p.seed)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spec_grammar() {
        assert_eq!(
            "synthetic".parse::<DataSpec>().unwrap(),
            DataSpec::default()
        );
        assert_eq!(
            "synthetic:600".parse::<DataSpec>().unwrap(),
            DataSpec::Synthetic {
                train: 600,
                test: 100,
                seed: 7
            }
        );
        assert_eq!(
            "synthetic:5".parse::<DataSpec>().unwrap(),
            DataSpec::Synthetic {
                train: 5,
                test: 1,
                seed: 7
            }
        );
        assert_eq!(
            "synthetic:600/50:9".parse::<DataSpec>().unwrap(),
            DataSpec::Synthetic {
                train: 600,
                test: 50,
                seed: 9
            }
        );
        assert_eq!(
            "mnist:/data/mnist".parse::<DataSpec>().unwrap(),
            DataSpec::Mnist {
                dir: "/data/mnist".into()
            }
        );
        assert_eq!(
            "csv:C:/x.csv".parse::<DataSpec>().unwrap(),
            DataSpec::Csv {
                path: "C:/x.csv".into()
            }
        );
        for bad in [
            "",
            "synthetic:",
            "synthetic:0",
            "synthetic:-3",
            "synthetic:10/0",
            "synthetic:10:x",
            "synthetic:99999999999",
            "mnist",
            "mnist:",
            "csv:",
            "imagenet:/x",
        ] {
            let error = bad.parse::<DataSpec>().unwrap_err();
            assert!(
                matches!(error, TrainError::InvalidDataSpec { .. }),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn per_client_specs_parse_and_have_no_shared_training_set() {
        let spec: DataSpec = "synthetic-per-client:600".parse().unwrap();
        let recipe = spec.per_client().unwrap();
        assert_eq!((recipe.examples, recipe.test, recipe.seed), (600, 2_000, 7));
        let err = spec.load().unwrap_err().to_string();
        assert!(err.contains("no shared training set"), "{err}");
        for bad in [
            "synthetic-per-client",
            "synthetic-per-client:0",
            "synthetic-per-client:100001",
            "synthetic-per-client:x",
        ] {
            assert!(bad.parse::<DataSpec>().is_err(), "{bad}");
        }
        assert!(
            "synthetic:600"
                .parse::<DataSpec>()
                .unwrap()
                .per_client()
                .is_none()
        );
    }

    #[test]
    fn data_spec_display_round_trips() {
        for text in [
            "synthetic",
            "synthetic:600",
            "synthetic:600/7",
            "synthetic:600:3",
            "synthetic:12000/1999:8",
            "synthetic:12000:8",
            "mnist:/tmp/m",
            "csv:data.csv",
            "synthetic-per-client:600",
            "synthetic-per-client:20/500",
            "synthetic-per-client:20/500:9",
        ] {
            let spec: DataSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
            assert_eq!(spec.to_string().parse::<DataSpec>().unwrap(), spec);
        }
        // A hand-built spec that equals the default prints the short form.
        let spec = DataSpec::Synthetic {
            train: 12_000,
            test: 2_000,
            seed: 7,
        };
        assert_eq!(spec.to_string(), "synthetic");
    }

    #[test]
    fn dataset_validation_and_subset() {
        let data = Dataset::new(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![0, 1, 2], 2, 3).unwrap();
        assert_eq!(data.example(1), &[2.0, 3.0]);
        let subset = data.subset(&[2, 0, 2]).unwrap();
        assert_eq!(subset.features, vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        assert_eq!(subset.labels, vec![2, 0, 2]);
        assert_eq!(subset.class_counts(), vec![1, 0, 2]);
        assert!(matches!(
            data.subset(&[3]),
            Err(TrainError::IndexOutOfRange { index: 3, len: 3 })
        ));
        assert!(Dataset::new(vec![0.0; 5], vec![0, 1, 2], 2, 3).is_err());
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 3], 2, 3).is_err());
        assert!(Dataset::new(vec![], vec![], 0, 3).is_err());
        assert!(Dataset::new(vec![], vec![], 1, 0).is_err());
    }

    #[test]
    fn oversized_synthetic_spec_is_rejected_at_load() {
        let spec = DataSpec::Synthetic {
            train: MAX_SYNTHETIC_EXAMPLES + 1,
            test: 1,
            seed: 1,
        };
        assert!(matches!(
            spec.load(),
            Err(TrainError::InvalidDataSpec { .. })
        ));
    }
}
