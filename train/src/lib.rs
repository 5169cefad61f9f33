//! fedquic's training engine: classifiers named by spec strings (logistic regression,
//! MLPs, CNNs), a CPU backend behind the [`backend::Backend`] trait, SGD/Adam optimizers
//! with an optional FedProx term, datasets (built-in synthetic digits, MNIST IDX files,
//! CSV) and partitioners that split a dataset among federated clients.
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
//! A CNN (`cnn:mnist`, or `cnn:CxHxW-...`, see [`ModelSpec`]) lists `conv{i}.weight`
//! `[out, in, k, k]` and `conv{i}.bias` `[out]` for each convolution, then its dense
//! layers as above; `cnn:mnist` has `conv0` `[32, 1, 5, 5]`, `conv1` `[64, 32, 5, 5]`,
//! `dense0` `[512, 3136]` and `dense1` `[10, 512]`: 1,663,370 values. Dataset rows are
//! the images in `[C, H, W]` row-major order.
//!
//! # Threads
//!
//! General matrix products use matrixmultiply's SIMD GEMM, single-threaded unless
//! `MATMUL_NUM_THREADS` or [`set_gemm_threads`] say otherwise (see [`gemm_threads`]).
//! The CPU backend's own kernels (small-batch dense products, the im2col-free
//! convolution forward and the sparse convolution backward) are single-threaded.
//!
//! Everything random (initialisation, shuffles, synthetic data, partitions) is driven by
//! explicit seeds: the same seed gives bit-identical results.

pub mod backend;
pub mod data;
mod error;
mod layers;
pub mod layout;
mod model;
pub mod onnx;
mod optim;
pub mod partition;
mod rng;
mod spec;
pub mod synthetic;
mod threads;

pub use backend::dispatch::{KernelPath, kernel_path, kernel_path_name, with_kernel_path};
pub use backend::{cpu_threads, with_cpu_threads};
pub use data::{DataSpec, Dataset};
pub use error::{Result, TrainError};
pub use model::{EvalStats, FitConfig, FitStats, Model, local_steps};
pub use optim::Optimizer;
pub use partition::{PartitionScheme, partition};
pub use spec::{
    CnnLayer, MAX_ACTIVATION, MAX_NET_LAYERS, MAX_PARAMS, ModelSpec, NetLayer, NetOutput,
    SpecFloat, TensorInfo,
};
pub use threads::{GEMM_THREADS_VAR, gemm_threads, set_gemm_threads};
