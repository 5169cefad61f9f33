//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while parsing specs, loading data, partitioning or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model spec string (or a hand-built [`crate::ModelSpec`]) is not usable.
    #[error("invalid model spec {spec:?}: {reason}")]
    InvalidModelSpec { spec: String, reason: String },

    /// A data spec string is not usable.
    #[error("invalid data spec {spec:?}: {reason}")]
    InvalidDataSpec { spec: String, reason: String },

    /// A partition scheme string is not usable.
    #[error("invalid partition scheme {spec:?}: {reason}")]
    InvalidPartitionScheme { spec: String, reason: String },

    /// A partition cannot be produced for these inputs.
    #[error("cannot partition: {0}")]
    Partition(String),

    /// A training hyper-parameter is out of range.
    #[error("invalid fit config: {0}")]
    InvalidConfig(String),

    /// A flat parameter vector of the wrong length was supplied.
    #[error("parameter vector has {actual} values but model {spec} has {expected} parameters")]
    ParameterCount {
        spec: String,
        expected: usize,
        actual: usize,
    },

    /// A supplied parameter is NaN or infinite.
    #[error("parameter {index} is not finite ({value})")]
    NonFiniteParameter { index: usize, value: f32 },

    /// An example index points past the end of the dataset.
    #[error("example index {index} is out of range for a dataset of {len} examples")]
    IndexOutOfRange { index: usize, len: usize },

    /// Training or evaluation was asked to work on zero examples.
    #[error("no examples selected")]
    NoExamples,

    /// The dataset's feature width does not match the model's input width.
    #[error("dataset examples have {data} features but the model expects {model}")]
    DimensionMismatch { data: usize, model: usize },

    /// A label is not a valid class index for the model.
    #[error("example {index} has label {label}, but the model only has {classes} classes")]
    LabelOutOfRange {
        index: usize,
        label: u8,
        classes: usize,
    },

    /// A [`crate::Dataset`]'s fields disagree with each other.
    #[error("inconsistent dataset: {0}")]
    InvalidDataset(String),

    /// Training produced a non-finite loss or parameters; the model's parameters were restored.
    #[error(
        "training diverged (non-finite loss or parameters) in epoch {epoch}; \
         parameters restored, try a smaller learning rate"
    )]
    Diverged { epoch: u32 },

    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A data file is malformed (bad header, wrong size, unparsable line...).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },

    /// An internal array had an unexpected shape; this is a bug in this crate.
    #[error("internal shape error (bug): {0}")]
    Shape(#[from] ndarray::ShapeError),

    /// The GPU backend could not start or failed (no adapter, a device error).
    #[error("GPU backend: {0}")]
    Gpu(String),
}

/// Shorthand for results carrying a [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
