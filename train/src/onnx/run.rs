//! Inference on any ONNX file with tract: what an edge device runs.

use tract_onnx::prelude::*;

use super::{OnnxError, Result};

type Plan = Arc<TypedSimplePlan>;

/// An ONNX model prepared by tract for one batch size.
pub struct OnnxRunner {
    plan: Plan,
    /// Input shape per example (without the batch axis).
    example_shape: Vec<usize>,
    batch: usize,
}

fn tract_error(error: impl std::fmt::Display) -> OnnxError {
    OnnxError::Tract(format!("{error:#}"))
}

impl OnnxRunner {
    /// Loads `bytes` with tract, fixing the input to `[batch, example_shape...]`.
    pub fn new(bytes: &[u8], example_shape: &[usize], batch: usize) -> Result<OnnxRunner> {
        if batch == 0 || example_shape.is_empty() {
            return Err(OnnxError::UnsupportedGraph(
                "the batch and the example shape must be non-empty".into(),
            ));
        }
        let mut shape = vec![batch];
        shape.extend_from_slice(example_shape);
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(tract_error)?
            .with_input_fact(0, f32::fact(&shape).into())
            .map_err(tract_error)?
            .into_optimized()
            .map_err(tract_error)?
            .into_runnable()
            .map_err(tract_error)?;
        Ok(OnnxRunner {
            plan,
            example_shape: example_shape.to_vec(),
            batch,
        })
    }

    /// [`OnnxRunner::new`] with the example shape the file declares for its input
    /// (every axis but the batch must be fixed).
    pub fn from_file_shape(bytes: &[u8], batch: usize) -> Result<OnnxRunner> {
        let model = super::import::decode(bytes)?;
        let shape = declared_example_shape(&model)?;
        OnnxRunner::new(bytes, &shape, batch)
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn example_len(&self) -> usize {
        self.example_shape.iter().product()
    }

    /// Runs one batch (`batch x example_len` values, row-major); returns the first
    /// output, flattened, and its per-example width.
    pub fn run(&self, inputs: &[f32]) -> Result<(Vec<f32>, usize)> {
        if inputs.len() != self.batch * self.example_len() {
            return Err(OnnxError::UnsupportedGraph(format!(
                "{} input values for a batch of {} examples of {}",
                inputs.len(),
                self.batch,
                self.example_len()
            )));
        }
        let mut shape = vec![self.batch];
        shape.extend_from_slice(&self.example_shape);
        let tensor = Tensor::from_shape(&shape, inputs).map_err(tract_error)?;
        let outputs = self.plan.run(tvec!(tensor.into())).map_err(tract_error)?;
        let first = outputs
            .first()
            .ok_or_else(|| OnnxError::Tract("the model has no output".into()))?;
        let view = first.to_plain_array_view::<f32>().map_err(tract_error)?;
        let values: Vec<f32> = view.iter().copied().collect();
        if values.is_empty() || !values.len().is_multiple_of(self.batch) {
            return Err(OnnxError::UnsupportedGraph(format!(
                "the first output has {} values, not a whole row for each of {} examples",
                values.len(),
                self.batch
            )));
        }
        let width = values.len() / self.batch;
        Ok((values, width))
    }
}

/// The input's declared shape without its first (batch) axis.
fn declared_example_shape(model: &tract_onnx::pb::ModelProto) -> Result<Vec<usize>> {
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::NotOnnx("no graph".into()))?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = graph
        .input
        .iter()
        .find(|i| !initializers.contains(&i.name.as_str()))
        .ok_or_else(|| OnnxError::UnsupportedGraph("the graph has no data input".into()))?;
    let Some(type_proto::Value::TensorType(tensor)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(OnnxError::UnsupportedGraph(format!(
            "input {:?} is not a tensor",
            input.name
        )));
    };
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| s.dim.as_slice())
        .unwrap_or_default();
    dims.iter()
        .skip(1)
        .map(|d| match d.value {
            Some(Value::DimValue(v)) if v > 0 => Ok(v as usize),
            _ => Err(OnnxError::DynamicShape(format!(
                "input {:?} has a non-fixed size besides the batch axis",
                input.name
            ))),
        })
        .collect()
}
