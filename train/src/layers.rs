//! CPU forward/backward passes for a stack of dense layers (ReLU between them, softmax
//! cross-entropy on the logits).
//!
//! Kept apart from [`crate::model`] so that a future `Backend` trait can swap this module
//! out: the model owns the flat parameter vector and the bookkeeping, this module only
//! does arithmetic on `&[f32]` slices laid out as described in the crate docs.
//!
//! Every matrix product goes through ndarray's `general_mat_mul` (matrixmultiply's SIMD
//! GEMM) on views built directly over the flat buffers, so nothing is copied per step.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::data::Dataset;
use crate::error::{Result, TrainError};

/// One dense layer's shape and where its tensors live in the flat parameter vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DenseLayer {
    pub inputs: usize,
    pub outputs: usize,
    /// Offset of the `[outputs, inputs]` row-major weight matrix.
    pub weight_offset: usize,
    /// Offset of the `[outputs]` bias vector (directly after the weights).
    pub bias_offset: usize,
    /// Whether ReLU follows this layer (all but the last).
    pub relu: bool,
}

impl DenseLayer {
    pub fn weight_len(&self) -> usize {
        self.inputs * self.outputs
    }
}

/// The layer stack of a model: `sizes = [in, h1, ..., out]` gives `sizes.len() - 1` layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Network {
    pub layers: Vec<DenseLayer>,
    pub num_params: usize,
}

impl Network {
    /// Lays out the layers for `sizes` (at least two entries, all non-zero; the caller has
    /// validated the spec).
    pub fn new(sizes: &[usize]) -> Network {
        let mut layers = Vec::with_capacity(sizes.len().saturating_sub(1));
        let mut offset = 0;
        let last = sizes.len().saturating_sub(2);
        for (index, pair) in sizes.windows(2).enumerate() {
            let (inputs, outputs) = (pair[0], pair[1]);
            let weight_offset = offset;
            let bias_offset = weight_offset + inputs * outputs;
            offset = bias_offset + outputs;
            layers.push(DenseLayer {
                inputs,
                outputs,
                weight_offset,
                bias_offset,
                relu: index < last,
            });
        }
        Network {
            layers,
            num_params: offset,
        }
    }

    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |layer| layer.inputs)
    }

    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, |layer| layer.outputs)
    }

    fn max_width(&self) -> usize {
        self.layers
            .iter()
            .map(|layer| layer.inputs.max(layer.outputs))
            .max()
            .unwrap_or(0)
    }
}

/// What a [`Workspace`] is for, which decides the buffers it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Forward passes only.
    Evaluate,
    /// Forward and backward passes with SGD applied in place ([`GradientSink::Sgd`]).
    Train,
    /// Forward and backward passes collecting gradients ([`GradientSink::Store`]).
    Gradient,
}

/// Scratch memory for one batch size, allocated once per `fit`/`evaluate` call and reused
/// for every minibatch.
pub(crate) struct Workspace {
    capacity: usize,
    /// `activations[0]` is the gathered input batch, `activations[l + 1]` the output of
    /// layer `l` (post-ReLU for hidden layers, raw logits for the last). Each is
    /// `capacity x width` row-major; a smaller final batch uses a prefix.
    activations: Vec<Vec<f32>>,
    labels: Vec<u8>,
    /// Ping-pong buffers for the gradient with respect to a layer's pre-activations.
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
    /// Gradient of the loss with respect to every parameter, same layout as the parameters.
    pub gradients: Vec<f32>,
}

impl Workspace {
    /// Scratch for batches of up to `capacity` examples, with only the buffers `purpose` needs.
    pub fn new(network: &Network, capacity: usize, purpose: Purpose) -> Workspace {
        let backpropagates = purpose != Purpose::Evaluate;
        let mut activations = Vec::with_capacity(network.layers.len() + 1);
        activations.push(vec![0.0; capacity * network.input_dim()]);
        for layer in &network.layers {
            activations.push(vec![0.0; capacity * layer.outputs]);
        }
        let delta_len = if backpropagates {
            capacity * network.max_width()
        } else {
            0
        };
        Workspace {
            capacity,
            activations,
            labels: vec![0; capacity],
            delta: vec![0.0; delta_len],
            delta_prev: vec![0.0; delta_len],
            gradients: if purpose == Purpose::Gradient {
                vec![0.0; network.num_params]
            } else {
                Vec::new()
            },
        }
    }

    /// Copies the examples `indices` (at most `capacity`) into the input buffer, checking
    /// each index and label. Returns the batch size.
    pub fn load_batch(
        &mut self,
        data: &Dataset,
        indices: &[usize],
        classes: usize,
    ) -> Result<usize> {
        let batch = indices.len();
        if batch > self.capacity {
            return Err(TrainError::InvalidConfig(format!(
                "batch of {batch} exceeds workspace capacity {}",
                self.capacity
            )));
        }
        let dim = data.dim;
        let inputs = &mut self.activations[0];
        if dim * self.capacity != inputs.len() {
            return Err(TrainError::DimensionMismatch {
                data: dim,
                model: inputs.len() / self.capacity.max(1),
            });
        }
        for (slot, &index) in indices.iter().enumerate() {
            let label = *data.labels.get(index).ok_or(TrainError::IndexOutOfRange {
                index,
                len: data.len(),
            })?;
            if usize::from(label) >= classes {
                return Err(TrainError::LabelOutOfRange {
                    index,
                    label,
                    classes,
                });
            }
            let row = data.features.get(index * dim..(index + 1) * dim).ok_or(
                TrainError::IndexOutOfRange {
                    index,
                    len: data.len(),
                },
            )?;
            inputs[slot * dim..(slot + 1) * dim].copy_from_slice(row);
            self.labels[slot] = label;
        }
        Ok(batch)
    }

    /// Writes a raw input batch (row-major `batch x input_dim`) and its labels (unit tests).
    #[cfg(test)]
    pub fn set_batch(&mut self, inputs: &[f32], labels: &[u8]) {
        self.activations[0][..inputs.len()].copy_from_slice(inputs);
        self.labels[..labels.len()].copy_from_slice(labels);
    }
}

/// Runs the batch already loaded into `workspace` through the network, leaving the logits
/// in the last activation buffer.
pub(crate) fn forward(
    network: &Network,
    params: &[f32],
    workspace: &mut Workspace,
    batch: usize,
) -> Result<()> {
    for (index, layer) in network.layers.iter().enumerate() {
        let (before, after) = workspace.activations.split_at_mut(index + 1);
        let input = ArrayView2::from_shape(
            (batch, layer.inputs),
            &before[index][..batch * layer.inputs],
        )?;
        let output_slice = &mut after[0][..batch * layer.outputs];
        let bias = &params[layer.bias_offset..layer.bias_offset + layer.outputs];
        // Seed every row with the bias so the GEMM can accumulate onto it (beta = 1)
        // instead of needing a second pass to add it.
        for row in output_slice.chunks_exact_mut(layer.outputs) {
            row.copy_from_slice(bias);
        }
        let mut output = ArrayViewMut2::from_shape((batch, layer.outputs), &mut *output_slice)?;
        general_mat_mul(
            1.0,
            &input,
            &weight_view(layer, params)?.t(),
            1.0,
            &mut output,
        );
        if layer.relu {
            for value in output_slice.iter_mut() {
                *value = value.max(0.0);
            }
        }
    }
    Ok(())
}

/// The `[outputs, inputs]` weight matrix of `layer` as a view into `params`.
fn weight_view<'a>(layer: &DenseLayer, params: &'a [f32]) -> Result<ArrayView2<'a, f32>> {
    let weights = &params[layer.weight_offset..layer.weight_offset + layer.weight_len()];
    Ok(ArrayView2::from_shape(
        (layer.outputs, layer.inputs),
        weights,
    )?)
}

/// Summed loss and number of correct predictions over one batch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BatchOutcome {
    pub loss_sum: f64,
    pub correct: usize,
}

/// Softmax cross-entropy over the logits left by [`forward`].
///
/// With `gradient_scale = Some(s)`, also writes `s * (softmax - onehot)`, the gradient of
/// `s * summed loss` with respect to the logits, into the workspace's delta buffer (ready
/// for [`backward`]). Uses the max-shift / log-sum-exp form so large logits cannot overflow.
pub(crate) fn softmax_cross_entropy(
    network: &Network,
    workspace: &mut Workspace,
    batch: usize,
    gradient_scale: Option<f32>,
) -> BatchOutcome {
    let classes = network.output_dim();
    let logits = &workspace.activations[network.layers.len()][..batch * classes];
    let mut outcome = BatchOutcome::default();
    for (row_index, row) in logits.chunks_exact(classes).enumerate() {
        let label = usize::from(workspace.labels[row_index]);
        // First maximum wins ties, so a constant output counts as predicting class 0.
        let (argmax, max) =
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(best_i, best), (i, &v)| {
                    if v > best { (i, v) } else { (best_i, best) }
                });
        let sum_exp: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        let log_sum_exp = sum_exp.ln();
        outcome.loss_sum += f64::from(log_sum_exp - (row[label] - max));
        if argmax == label {
            outcome.correct += 1;
        }
        if let Some(scale) = gradient_scale {
            let delta = &mut workspace.delta[row_index * classes..(row_index + 1) * classes];
            let inverse_sum = 1.0 / sum_exp;
            for (d, &v) in delta.iter_mut().zip(row) {
                *d = scale * (v - max).exp() * inverse_sum;
            }
            delta[label] -= scale;
        }
    }
    outcome
}

/// What [`backward`] does with each layer's parameter gradient.
pub(crate) enum GradientSink<'a> {
    /// Store it in `workspace.gradients` (adding onto what is there when `accumulate`).
    Store { params: &'a [f32], accumulate: bool },
    /// Apply plain SGD, `params -= learning_rate * gradient`, straight from the GEMM
    /// (alpha = -learning_rate, beta = 1): no gradient buffer is written and re-read, which
    /// matters for small batches where that memory traffic rivals the arithmetic.
    Sgd {
        params: &'a mut [f32],
        learning_rate: f32,
    },
}

impl GradientSink<'_> {
    fn params(&self) -> &[f32] {
        match self {
            GradientSink::Store { params, .. } => params,
            GradientSink::Sgd { params, .. } => params,
        }
    }
}

/// Backpropagates the logit gradient left by [`softmax_cross_entropy`] through the
/// layers, handing each layer's parameter gradient to `sink`.
pub(crate) fn backward(
    network: &Network,
    workspace: &mut Workspace,
    batch: usize,
    mut sink: GradientSink<'_>,
) -> Result<()> {
    for (index, layer) in network.layers.iter().enumerate().rev() {
        let delta_slice = &workspace.delta[..batch * layer.outputs];
        let delta = ArrayView2::from_shape((batch, layer.outputs), delta_slice)?;
        let input_slice = &workspace.activations[index][..batch * layer.inputs];
        let input = ArrayView2::from_shape((batch, layer.inputs), input_slice)?;

        if index > 0 {
            // d(input) [batch, in] = delta [batch, out] . W [out, in], computed before an
            // SGD sink changes W, then through the previous layer's ReLU: its derivative
            // is 1 exactly where its output is > 0.
            let previous_slice = &mut workspace.delta_prev[..batch * layer.inputs];
            let mut previous =
                ArrayViewMut2::from_shape((batch, layer.inputs), &mut *previous_slice)?;
            general_mat_mul(
                1.0,
                &delta,
                &weight_view(layer, sink.params())?,
                0.0,
                &mut previous,
            );
            for (d, &activation) in previous_slice.iter_mut().zip(input_slice) {
                if activation <= 0.0 {
                    *d = 0.0;
                }
            }
        }

        // dW [out, in] = delta^T [out, batch] . input [batch, in]; db = column sums of delta.
        let (alpha, beta, target, bias_scale) = match &mut sink {
            GradientSink::Store { accumulate, .. } => (
                1.0,
                if *accumulate { 1.0 } else { 0.0 },
                &mut workspace.gradients[layer.weight_offset..layer.bias_offset + layer.outputs],
                1.0,
            ),
            GradientSink::Sgd {
                params,
                learning_rate,
            } => (
                -*learning_rate,
                1.0,
                &mut params[layer.weight_offset..layer.bias_offset + layer.outputs],
                -*learning_rate,
            ),
        };
        let (weights, bias) = target.split_at_mut(layer.weight_len());
        let mut weights = ArrayViewMut2::from_shape((layer.outputs, layer.inputs), weights)?;
        general_mat_mul(alpha, &delta.t(), &input, beta, &mut weights);
        if beta == 0.0 {
            bias.fill(0.0);
        }
        for row in delta_slice.chunks_exact(layer.outputs) {
            for (b, &d) in bias.iter_mut().zip(row) {
                *b += bias_scale * d;
            }
        }

        if index > 0 {
            std::mem::swap(&mut workspace.delta, &mut workspace.delta_prev);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_bias_after_weights() {
        let network = Network::new(&[3, 4, 2]);
        assert_eq!(network.num_params, 3 * 4 + 4 + 4 * 2 + 2);
        assert_eq!(network.layers[0].bias_offset, 12);
        assert_eq!(network.layers[1].weight_offset, 16);
        assert!(network.layers[0].relu);
        assert!(!network.layers[1].relu);
    }

    #[test]
    fn forward_matches_hand_computation() {
        // One layer, 2 inputs -> 2 outputs: W = [[1, 2], [3, 4]] (row = output), b = [0.5, -1].
        let network = Network::new(&[2, 2]);
        let params = [1.0, 2.0, 3.0, 4.0, 0.5, -1.0];
        let mut workspace = Workspace::new(&network, 2, Purpose::Evaluate);
        workspace.set_batch(&[1.0, 1.0, 0.0, 2.0], &[0, 1]);
        forward(&network, &params, &mut workspace, 2).unwrap();
        assert_eq!(workspace.activations[1], vec![3.5, 6.0, 4.5, 7.0]);
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let network = Network::new(&[1, 2]);
        // Zero weights, biases give logits [1000, 0] for every input.
        let params = [0.0, 0.0, 1000.0, 0.0];
        let mut workspace = Workspace::new(&network, 1, Purpose::Gradient);
        workspace.set_batch(&[1.0], &[1]);
        forward(&network, &params, &mut workspace, 1).unwrap();
        let outcome = softmax_cross_entropy(&network, &mut workspace, 1, Some(1.0));
        assert!(
            (outcome.loss_sum - 1000.0).abs() < 1e-3,
            "{}",
            outcome.loss_sum
        );
        assert_eq!(outcome.correct, 0);
        assert!((workspace.delta[0] - 1.0).abs() < 1e-6);
        assert!((workspace.delta[1] + 1.0).abs() < 1e-6);
    }
}
