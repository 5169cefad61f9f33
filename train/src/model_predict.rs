//! Inference on raw inputs: what an exported ONNX graph computes, for checks against
//! other runtimes and for prediction.

use super::Model;
use crate::backend::{Backend, CpuBackend};
use crate::error::{Result, TrainError};
use crate::layers::{self, Purpose};
use crate::spec::{ModelSpec, NetOutput};

impl Model {
    /// The logits (last layer's outputs, `batch x classes` row-major) for `inputs`
    /// (`batch x input_dim` row-major, images as `[C, H, W]`), dropout off.
    pub fn logits(&self, inputs: &[f32]) -> Result<Vec<f32>> {
        let dim = self.spec.input_dim();
        if dim == 0 || !inputs.len().is_multiple_of(dim) || inputs.is_empty() {
            return Err(TrainError::DimensionMismatch {
                data: inputs.len(),
                model: dim,
            });
        }
        let mut out = Vec::with_capacity(inputs.len() / dim * self.spec.num_classes());
        CpuBackend.with_frozen_params(&self.params, || -> Result<()> {
            for chunk in inputs.chunks(self.eval_batch(Purpose::Evaluate) * dim) {
                out.extend(layers::logits(
                    &self.network,
                    &self.params,
                    chunk,
                    chunk.len() / dim,
                )?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// What the model's exported ONNX graph outputs for `inputs`: the logits, or their
    /// softmax / log-softmax when a `net:` spec ends with `softmax` / `logsoftmax`.
    pub fn outputs(&self, inputs: &[f32]) -> Result<Vec<f32>> {
        let mut values = self.logits(inputs)?;
        let output = match &self.spec {
            ModelSpec::Net { output, .. } => *output,
            _ => NetOutput::Logits,
        };
        if output != NetOutput::Logits {
            for row in values.chunks_mut(self.spec.num_classes().max(1)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                for value in row.iter_mut() {
                    *value = if output == NetOutput::Softmax {
                        (*value - max).exp() / sum
                    } else {
                        *value - max - sum.ln()
                    };
                }
            }
        }
        Ok(values)
    }
}
