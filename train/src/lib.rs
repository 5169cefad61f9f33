//! fedquic's training engine: classifiers named by spec strings, a CPU minibatch-SGD
//! backend, datasets (built-in synthetic digits, MNIST IDX files, CSV) and partitioners
//! that split a dataset among federated clients.
//!
//! # Parameter layout
//!
//! A [`Model`] keeps all of its parameters in one flat `Vec<f32>`, which is what
//! [`Model::parameters`] returns and [`Model::set_parameters`] accepts, so the network
//! layer can send and average models without knowing their structure. The vector is the
//! concatenation, in [`ModelSpec::tensors`] order, of each dense layer's tensors:
//!
//! - `dense{i}.weight`, shape `[out, in]`, row-major: element `(o, j)` sits at
//!   `offset + o * in + j` and multiplies input `j` of output unit `o` (PyTorch's
//!   `nn.Linear` convention);
//! - `dense{i}.bias`, shape `[out]`.
//!
//! Layers are numbered from 0 at the input. For `mlp:784-200-200-10` that is
//! `dense0.weight [200, 784]`, `dense0.bias [200]`, `dense1.weight [200, 200]`,
//! `dense1.bias [200]`, `dense2.weight [10, 200]`, `dense2.bias [10]`: 199,210 values.
//! Hidden layers use ReLU; the last layer's outputs are logits for softmax cross-entropy.
//!
//! Everything random (initialisation, shuffles, synthetic data, partitions) is driven by
//! explicit seeds: the same seed gives bit-identical results.

pub mod data;
mod error;
mod layers;
pub mod layout;
mod model;
pub mod partition;
mod rng;
pub mod synthetic;

pub use data::{DataSpec, Dataset};
pub use error::{Result, TrainError};
pub use model::{EvalStats, FitConfig, FitStats, MAX_PARAMS, Model, ModelSpec, TensorInfo};
pub use partition::{PartitionScheme, partition};
