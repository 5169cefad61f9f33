//! ONNX in and out: import a graph exported by PyTorch, TensorFlow (tf2onnx) or any other
//! exporter as a trainable [`Model`], export any model (spec or imported) as ONNX, and
//! run an ONNX file with tract for inference.
//!
//! - **Import** ([`import_bytes`], [`import_file`]) reads the protobuf with
//!   `tract_onnx::pb` and maps a chain of supported ops ([`SUPPORTED_OPS`]) to a `net:`
//!   [`ModelSpec`] whose initial parameters are the file's initializers. The spec string
//!   is what travels to clients; they never need the file. Anything else is refused with
//!   the op type, the node name and the supported list.
//! - **Export** ([`export_spec`]) writes a fresh opset-13 graph for a spec and its
//!   parameters; [`export_imported`] instead rewrites the initializers of the original
//!   file, so every node name, input and output name of the user's graph is kept.
//! - **Inference** ([`OnnxRunner`]) runs any ONNX file with tract (edge devices,
//!   `fedquic-client predict`, and the tests that compare fedquic with tract).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::error::TrainError;
use crate::layout::ParamLayout;
use crate::model::{Model, ModelSpec};

mod export;
mod import;
mod proto;
mod run;

pub use export::{export_imported, export_model, export_spec};
pub use import::{import_bytes, import_file};
pub use run::OnnxRunner;

/// The ONNX ops fedquic imports (default domain).
pub const SUPPORTED_OPS: &[&str] = &[
    "Gemm",
    "MatMul (+ Add)",
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Flatten",
    "Reshape",
    "Dropout",
    "BatchNormalization",
    "Softmax",
    "LogSoftmax",
    "Identity",
    "Constant",
];

/// Largest ONNX file read (the whole protobuf is decoded in memory).
pub const MAX_ONNX_BYTES: u64 = 1 << 31;

/// Most nodes an imported graph may have.
pub const MAX_ONNX_NODES: usize = 4096;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OnnxError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    #[error(
        "unsupported ONNX op {op:?} (node {node:?}); fedquic imports {}",
        SUPPORTED_OPS.join(", ")
    )]
    UnsupportedOp { op: String, node: String },
    #[error("node {node:?} ({op}): {reason}")]
    UnsupportedNode {
        op: String,
        node: String,
        reason: String,
    },
    #[error("dynamic shape: {0}")]
    DynamicShape(String),
    #[error("unsupported graph: {0}")]
    UnsupportedGraph(String),
    #[error("invalid ONNX model: {0}")]
    Invalid(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("tract: {0}")]
    Tract(String),
}

pub type Result<T> = std::result::Result<T, OnnxError>;

/// A model imported from ONNX: its `net:` spec, the initial parameters (the file's
/// initializers, in the spec's tensor order) and the graph's input and output names.
#[derive(Clone, Debug)]
pub struct Imported {
    pub spec: ModelSpec,
    pub parameters: Vec<f32>,
    pub input_name: String,
    pub output_name: String,
}

impl Imported {
    /// The trainable model with the file's weights.
    pub fn model(&self) -> Result<Model> {
        let mut model = Model::try_new(self.spec.clone(), 0)?;
        model.set_parameters(&self.parameters)?;
        Ok(model)
    }
}

/// A `--model` argument: a spec string (`mlp:...`, `cnn:...`, `net:...`, `vector:N`) or
/// `onnx:FILE`.
#[derive(Clone, Debug)]
pub struct ModelSource {
    /// What travels to clients (for an ONNX file, its canonical `net:` spec).
    pub layout: ParamLayout,
    /// The imported file: its bytes (kept for [`export_imported`]) and weights.
    pub onnx: Option<(Vec<u8>, Imported)>,
}

impl ModelSource {
    /// Parses a spec string, or imports `onnx:FILE`.
    pub fn parse(text: &str) -> Result<ModelSource> {
        match text.trim().strip_prefix("onnx:") {
            Some(path) => {
                let path = Path::new(path.trim());
                let bytes = read_limited(path)?;
                let imported = import_bytes(&bytes)?;
                Ok(ModelSource {
                    layout: ParamLayout::Model(imported.spec.clone()),
                    onnx: Some((bytes, imported)),
                })
            }
            None => Ok(ModelSource {
                layout: text.parse()?,
                onnx: None,
            }),
        }
    }

    /// The initial global model: the file's weights for ONNX, else seeded.
    pub fn initial_parameters(&self, seed: u64) -> Result<Vec<f32>> {
        match &self.onnx {
            Some((_, imported)) => Ok(imported.parameters.clone()),
            None => Ok(self.layout.initial_parameters(seed)?),
        }
    }

    /// ONNX bytes of `parameters` for this model: the original graph with new weights for
    /// an imported file, a fresh graph for a spec.
    pub fn export(&self, parameters: &[f32]) -> Result<Vec<u8>> {
        match (&self.onnx, self.layout.model_spec()) {
            (Some((bytes, _)), _) => export_imported(bytes, parameters),
            (None, Some(spec)) => export_spec(spec, parameters),
            (None, None) => Err(OnnxError::UnsupportedGraph(format!(
                "{} is a bare parameter vector, not a model: nothing to export",
                self.layout
            ))),
        }
    }
}

/// Reads a whole file of at most [`MAX_ONNX_BYTES`].
pub fn read_limited(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let io = |source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_ONNX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_ONNX_BYTES {
        return Err(OnnxError::NotOnnx(format!(
            "{} is larger than {MAX_ONNX_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
