//! The layer stack: Dense, Conv2d, MaxPool2d, ReLU, Flatten and Dropout, each written once
//! over the [`Backend`] trait, with softmax cross-entropy on the logits.
//!
//! A [`Network`] is built from a spec's [`Plan`]; it knows where each layer's tensors
//! live in the flat parameter vector and which activation buffer each layer reads and
//! writes. ReLU, Flatten and Dropout work in place (their output buffer is their input
//! buffer), which saves memory traffic: the layers before them never need their own
//! outputs in the backward pass, except ReLU, whose mask `y > 0` survives a following
//! in-place dropout (dropped values get a zero gradient either way).
//!
//! A [`Workspace`] holds every buffer one batch size needs. It is allocated once per
//! `fit`/`evaluate` call; training steps then allocate nothing (matrixmultiply's GEMM
//! packing buffers aside). The loss goes to a backend buffer, never straight to the host,
//! so a device backend reads it back once per epoch (see [`loss`]).

use rand::RngExt;

use crate::backend::{Activation, Backend, ConvGeometry, Gemm, PoolGeometry};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::rng::SeededRng;
use crate::spec::{Plan, Stage};

/// What a layer computes, with its tensors' offsets in the flat parameter vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Op {
    /// `y = x W^T + b`, `W` is `[outputs, inputs]`.
    Dense {
        inputs: usize,
        outputs: usize,
        weight: usize,
        bias: usize,
    },
    /// Convolution `y_e = W cols(x_e) + b`: by the backend's im2col-free forward and
    /// sparse backward where it offers them (see [`Backend::conv_forward_direct`]),
    /// otherwise by im2col + GEMM, per example.
    Conv {
        geometry: ConvGeometry,
        out_channels: usize,
        weight: usize,
        bias: usize,
    },
    /// `geometry.planes` is the channels of one example.
    MaxPool {
        geometry: PoolGeometry,
    },
    Relu,
    /// The identity on memory: `[C, H, W]` rows are already flat.
    Flatten,
    /// Inverted dropout with the mask in workspace mask buffer `mask`.
    Dropout {
        rate: f32,
        mask: usize,
    },
    /// Sigmoid or tanh, into its own buffer (backward recomputes from the input).
    Activation(Activation),
    AvgPool {
        geometry: PoolGeometry,
    },
    GlobalAvgPool {
        channels: usize,
        plane: usize,
    },
    /// Batch normalisation with the running statistics: `params` is the offset of
    /// `[scale, bias, running_mean, running_var]`, `channels` values each.
    BatchNorm {
        channels: usize,
        plane: usize,
        epsilon: f32,
        params: usize,
    },
}

impl Op {
    fn has_params(&self) -> bool {
        matches!(
            self,
            Op::Dense { .. } | Op::Conv { .. } | Op::BatchNorm { .. }
        )
    }
}

/// One layer: its op, per-example sizes and activation buffers.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layer {
    pub op: Op,
    pub input_len: usize,
    pub output_len: usize,
    /// Index of the activation buffer read (0 is the input batch).
    pub input: usize,
    /// Index of the activation buffer written (== `input` for in-place layers).
    pub output: usize,
}

/// A model's layers and the sizes of the buffers they need.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Network {
    pub layers: Vec<Layer>,
    pub num_params: usize,
    pub input_len: usize,
    pub classes: usize,
    /// Per-example length of each activation buffer.
    buffer_lens: Vec<usize>,
    /// Per-example length of each dropout mask.
    mask_lens: Vec<usize>,
    /// Largest per-example activation: the size of each gradient buffer.
    max_len: usize,
    /// Largest im2col matrix of one example (0 without non-pointwise convolutions).
    cols_len: usize,
    /// Whether backward also produces the gradient with respect to the input (gradient
    /// checks); models skip it, which saves the first layer's largest GEMM.
    pub input_grad: bool,
}

impl Network {
    /// Lays out the layers of a validated plan.
    pub fn new(plan: &Plan) -> Network {
        let mut layers = Vec::with_capacity(plan.stages.len());
        let mut buffer_lens = vec![plan.input_len];
        let mut mask_lens = Vec::new();
        let (mut offset, mut cols_len) = (0, 0);
        let mut current_len = plan.input_len;
        for stage in &plan.stages {
            let input = buffer_lens.len() - 1;
            let (op, in_place) = match *stage {
                Stage::Dense { inputs, outputs } => {
                    let weight = offset;
                    offset += inputs * outputs + outputs;
                    let op = Op::Dense {
                        inputs,
                        outputs,
                        weight,
                        bias: weight + inputs * outputs,
                    };
                    (op, false)
                }
                Stage::Conv {
                    geometry,
                    out_channels,
                } => {
                    let weight = offset;
                    let weight_len = out_channels * geometry.col_rows();
                    offset += weight_len + out_channels;
                    if !geometry.is_pointwise() {
                        cols_len = cols_len.max(geometry.col_rows() * geometry.col_cols());
                    }
                    let op = Op::Conv {
                        geometry,
                        out_channels,
                        weight,
                        bias: weight + weight_len,
                    };
                    (op, false)
                }
                Stage::MaxPool { geometry } => (Op::MaxPool { geometry }, false),
                Stage::Relu { .. } => (Op::Relu, true),
                Stage::Flatten { .. } => (Op::Flatten, true),
                Stage::Dropout { len, rate } => {
                    mask_lens.push(len);
                    let op = Op::Dropout {
                        rate,
                        mask: mask_lens.len() - 1,
                    };
                    (op, true)
                }
                Stage::Sigmoid { .. } => (Op::Activation(Activation::Sigmoid), false),
                Stage::Tanh { .. } => (Op::Activation(Activation::Tanh), false),
                Stage::AvgPool { geometry } => (Op::AvgPool { geometry }, false),
                Stage::GlobalAvgPool { channels, plane } => {
                    (Op::GlobalAvgPool { channels, plane }, false)
                }
                Stage::BatchNorm {
                    channels,
                    plane,
                    epsilon,
                } => {
                    let params = offset;
                    offset += 4 * channels;
                    let op = Op::BatchNorm {
                        channels,
                        plane,
                        epsilon,
                        params,
                    };
                    (op, false)
                }
            };
            let output_len = stage.output_len();
            let output = if in_place {
                input
            } else {
                buffer_lens.push(output_len);
                buffer_lens.len() - 1
            };
            layers.push(Layer {
                op,
                input_len: current_len,
                output_len,
                input,
                output,
            });
            current_len = output_len;
        }
        Network {
            layers,
            num_params: offset,
            input_len: plan.input_len,
            classes: current_len,
            max_len: buffer_lens.iter().copied().max().unwrap_or(0),
            buffer_lens,
            mask_lens,
            cols_len,
            input_grad: false,
        }
    }

    /// Whether layer `index` is an in-place ReLU feeding a max pool, which then runs
    /// after the pool instead, on a quarter of the values (2 x 2 pooling).
    ///
    /// `max(relu(a), relu(b), ..) = relu(max(a, b, ..))` exactly, and the gradient is
    /// the same too: a window whose maximum is positive routes to the same first
    /// maximum in both orders and ReLU passes it; a window whose maximum is not positive
    /// sends nothing back either way. So the forward pass skips a read and write of the
    /// convolution's whole output (6.4 MB per batch of 64 for the FedAvg CNN's first
    /// layer), and backward the same, with results bit for bit those of the written
    /// order for finite values. (A NaN input, from a diverged model, can differ: the
    /// pool lets a NaN win its window, which the ReLU used to zero first.)
    fn relu_moves_past_pool(&self, index: usize) -> bool {
        match (self.layers.get(index), self.layers.get(index + 1)) {
            (Some(relu), Some(pool)) => {
                relu.op == Op::Relu
                    && relu.input == relu.output
                    && matches!(pool.op, Op::MaxPool { .. })
                    && pool.input == relu.output
            }
            _ => false,
        }
    }

    /// Whether a forward pass may read its input in place (a contiguous range of a
    /// dataset) instead of from the workspace's input buffer: only dense layers read the
    /// input, possibly through an in-place flatten, and nothing writes it.
    pub(crate) fn reads_input_in_place(&self) -> bool {
        let mut readers = self.layers.iter().filter(|layer| layer.input == 0);
        readers
            .clone()
            .any(|layer| matches!(layer.op, Op::Dense { .. }))
            && readers.all(|layer| match layer.op {
                Op::Dense { .. } => layer.output != 0,
                Op::Flatten => true,
                _ => false,
            })
    }

    /// Whether the max pool at `index` applies the ReLU before it (see
    /// [`Self::relu_moves_past_pool`]).
    fn pool_applies_relu(&self, index: usize) -> bool {
        index > 0 && self.relu_moves_past_pool(index - 1)
    }

    /// Index of the first layer with parameters: nothing below it needs a gradient.
    fn first_param_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|layer| layer.op.has_params())
            .unwrap_or(self.layers.len())
    }

    /// Seeded initial parameters: weights of layers followed by ReLU are He/Kaiming uniform
    /// (`±sqrt(6 / fan_in)`), others (the output layer) Glorot uniform
    /// (`±sqrt(6 / (fan_in + fan_out))`), biases zero; drawn layer by layer in order.
    pub fn initial_parameters(&self, rng: &mut SeededRng) -> Vec<f32> {
        let mut params = vec![0.0f32; self.num_params];
        for (index, layer) in self.layers.iter().enumerate() {
            let (weight, weight_len, fan_in, fan_out) = match layer.op {
                Op::Dense {
                    inputs,
                    outputs,
                    weight,
                    ..
                } => (weight, inputs * outputs, inputs, outputs),
                Op::Conv {
                    geometry,
                    out_channels,
                    weight,
                    ..
                } => {
                    let receptive = geometry.kernel * geometry.kernel;
                    (
                        weight,
                        out_channels * geometry.col_rows(),
                        geometry.col_rows(),
                        out_channels * receptive,
                    )
                }
                Op::BatchNorm {
                    channels,
                    params: at,
                    ..
                } => {
                    extra::initial_batch_norm(&mut params[at..at + 4 * channels], channels);
                    continue;
                }
                _ => continue,
            };
            let followed_by_relu = self
                .layers
                .get(index + 1)
                .is_some_and(|next| next.op == Op::Relu);
            let bound = if followed_by_relu {
                (6.0 / fan_in as f32).sqrt()
            } else {
                (6.0 / (fan_in + fan_out) as f32).sqrt()
            };
            for value in &mut params[weight..weight + weight_len] {
                *value = rng.random_range(-bound..bound);
            }
        }
        params
    }
}

/// Which buffers a [`Workspace`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Forward passes only.
    Evaluate,
    /// Forward and backward passes.
    Train,
}

/// Scratch memory for batches of up to `capacity` examples.
pub(crate) struct Workspace<B: Backend> {
    capacity: usize,
    /// `buffer_lens[i] * capacity` values each; a smaller batch uses a prefix.
    acts: Vec<B::Buffer>,
    /// The batch's labels as `f32` class indices, uploaded once per batch.
    labels: B::Buffer,
    /// Host staging for `labels`.
    labels_host: Vec<f32>,
    /// Ping-pong gradient buffers, `max_len * capacity` each.
    deltas: [B::Buffer; 2],
    /// One example's im2col matrix.
    cols: B::Buffer,
    masks: Vec<B::Buffer>,
    /// Which delta buffer holds the input gradient after [`backward`] (gradient checks).
    input_grad_buffer: usize,
    /// Whether the last forward pass applied dropout masks (backward must match it).
    dropout_applied: bool,
}

impl Network {
    /// The f32 values a [`Workspace`] for `capacity` examples allocates (as
    /// [`Workspace::new`] lays them out), saturating: what a batch costs in
    /// memory, known before anything is allocated.
    pub fn workspace_values(&self, capacity: usize, purpose: Purpose) -> u64 {
        let per_example = |lens: &[usize]| {
            lens.iter()
                .fold(0u64, |sum, &len| sum.saturating_add(len as u64))
        };
        let mut values = per_example(&self.buffer_lens).saturating_add(2); // activations, labels (device and host)
        if purpose == Purpose::Train {
            values = values
                .saturating_add((self.max_len as u64).saturating_mul(2))
                .saturating_add(per_example(&self.mask_lens));
        }
        values
            .saturating_mul(capacity as u64)
            .saturating_add(self.cols_len as u64)
    }
}

impl<B: Backend> Workspace<B> {
    pub fn new(backend: &B, network: &Network, capacity: usize, purpose: Purpose) -> Workspace<B> {
        let train = purpose == Purpose::Train;
        let train_len = |len: usize| if train { len * capacity } else { 0 };
        Workspace {
            capacity,
            acts: network
                .buffer_lens
                .iter()
                .map(|&len| backend.zeros(len * capacity))
                .collect(),
            labels: backend.zeros(capacity),
            labels_host: vec![0.0; capacity],
            deltas: [
                backend.zeros(train_len(network.max_len)),
                backend.zeros(train_len(network.max_len)),
            ],
            cols: backend.zeros(network.cols_len),
            masks: network
                .mask_lens
                .iter()
                .map(|&len| backend.zeros(train_len(len)))
                .collect(),
            input_grad_buffer: 0,
            dropout_applied: false,
        }
    }

    /// Copies the examples `indices` (at most `capacity`) into the input buffer, checking
    /// each index and label. Returns the batch size.
    pub fn load_batch(
        &mut self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        classes: usize,
    ) -> Result<usize> {
        let batch = self.load_labels(backend, data, indices, classes)?;
        let input = self.acts.first_mut().ok_or_else(shape_bug)?;
        let dst = backend.dst(input, 0..batch * data.dim)?;
        backend.gather_rows(&data.features, data.dim, indices, dst)?;
        Ok(batch)
    }

    /// The labels of the examples `indices` (at most `capacity`), each index and label
    /// checked, without their inputs (a forward pass given them in place). Returns the
    /// batch size.
    pub fn load_labels(
        &mut self,
        backend: &B,
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
        for (slot, &index) in self.labels_host.iter_mut().zip(indices) {
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
            *slot = f32::from(label);
        }
        let labels = self.labels_host.get(..batch).ok_or_else(shape_bug)?;
        backend.upload(labels, backend.dst(&mut self.labels, 0..batch)?)?;
        Ok(batch)
    }

    /// Writes a raw input batch (row-major `batch x input_len`) and its labels (tests).
    #[cfg(test)]
    pub fn set_batch(&mut self, backend: &B, inputs: &[f32], labels: &[u8]) -> Result<()> {
        let host: Vec<f32> = labels.iter().map(|&label| f32::from(label)).collect();
        backend.upload(&host, backend.dst(&mut self.labels, 0..labels.len())?)?;
        let input = self.acts.first_mut().ok_or_else(shape_bug)?;
        backend.upload(inputs, backend.dst(input, 0..inputs.len())?)
    }

    /// Activation buffer `index` (tests).
    #[cfg(test)]
    pub fn activation(&self, index: usize) -> &B::Buffer {
        &self.acts[index]
    }

    /// The buffer holding the input gradient after a backward pass with
    /// `network.input_grad` set (tests).
    #[cfg(test)]
    pub fn input_gradient(&self) -> &B::Buffer {
        &self.deltas[self.input_grad_buffer]
    }
}

fn shape_bug() -> TrainError {
    TrainError::Shape(ndarray::ShapeError::from_kind(
        ndarray::ErrorKind::IncompatibleShape,
    ))
}

/// `(&items[read], &mut items[write])` for `read != write`.
fn read_write<T>(items: &mut [T], read: usize, write: usize) -> Result<(&T, &mut T)> {
    if read < write {
        let (low, high) = items.split_at_mut(write);
        Ok((
            low.get(read).ok_or_else(shape_bug)?,
            high.first_mut().ok_or_else(shape_bug)?,
        ))
    } else if read > write {
        let (low, high) = items.split_at_mut(read);
        let read = high.first().ok_or_else(shape_bug)?;
        Ok((read, low.get_mut(write).ok_or_else(shape_bug)?))
    } else {
        Err(shape_bug())
    }
}

/// Runs the batch loaded into `workspace` through the network, leaving the logits in the
/// last layer's output buffer. `dropout` is the training RNG for dropout masks; `None`
/// evaluates (dropout is then the identity). `input`, where given, is the batch's input
/// read in place instead of the workspace's input buffer; only for a network whose
/// [`Network::reads_input_in_place`] holds.
pub(crate) fn forward<B: Backend>(
    backend: &B,
    network: &Network,
    params: &B::Buffer,
    workspace: &mut Workspace<B>,
    batch: usize,
    mut dropout: Option<&mut SeededRng>,
    input: Option<B::Src<'_>>,
) -> Result<()> {
    if input.is_some() && !network.reads_input_in_place() {
        // The workspace's input buffer was not loaded: refuse rather than read it.
        return Err(shape_bug());
    }
    workspace.dropout_applied = dropout.is_some();
    for (index, layer) in network.layers.iter().enumerate() {
        let in_range = 0..batch * layer.input_len;
        let out_range = 0..batch * layer.output_len;
        match layer.op {
            Op::Dense {
                inputs,
                outputs,
                weight,
                bias,
            } => {
                let (x, y) = read_write(&mut workspace.acts, layer.input, layer.output)?;
                // Seed every row with the bias so the GEMM accumulates onto it (beta = 1)
                // instead of needing a second pass to add it.
                let bias = backend.src(params, bias..bias + outputs)?;
                backend.fill_rows(bias, batch, backend.dst(y, out_range.clone())?)?;
                let gemm = Gemm {
                    m: batch,
                    n: outputs,
                    k: inputs,
                    trans_a: false,
                    trans_b: true,
                    alpha: 1.0,
                    beta: 1.0,
                };
                let w = backend.src(params, weight..weight + inputs * outputs)?;
                let y = backend.dst(y, out_range)?;
                match input {
                    Some(input) if layer.input == 0 => backend.gemm(gemm, input, w, y)?,
                    _ => backend.gemm(gemm, backend.src(x, in_range)?, w, y)?,
                }
            }
            Op::Conv {
                geometry,
                out_channels,
                weight,
                bias,
            } => {
                let (x, y) = read_write(&mut workspace.acts, layer.input, layer.output)?;
                let (rows, plane) = (geometry.col_rows(), geometry.col_cols());
                let bias = backend.src(params, bias..bias + out_channels)?;
                let w = backend.src(params, weight..weight + out_channels * rows)?;
                if backend.conv_forward_direct(
                    &geometry,
                    out_channels,
                    batch,
                    bias,
                    w,
                    backend.src(x, in_range.clone())?,
                    backend.dst(y, out_range.clone())?,
                )? {
                    continue;
                }
                backend.fill_channels(bias, batch, plane, backend.dst(y, out_range)?)?;
                let gemm = Gemm {
                    m: out_channels,
                    n: plane,
                    k: rows,
                    trans_a: false,
                    trans_b: false,
                    alpha: 1.0,
                    beta: 1.0,
                };
                // One example at a time keeps the im2col matrix (25x the input for a 5x5
                // kernel) in cache between being written and being multiplied.
                for example in 0..batch {
                    let input = backend.src(
                        x,
                        example * layer.input_len..(example + 1) * layer.input_len,
                    )?;
                    let cols = if geometry.is_pointwise() {
                        input
                    } else {
                        let cols_range = 0..rows * plane;
                        backend.im2col(
                            &geometry,
                            input,
                            backend.dst(&mut workspace.cols, cols_range.clone())?,
                        )?;
                        backend.src(&workspace.cols, cols_range)?
                    };
                    let out = example * layer.output_len..(example + 1) * layer.output_len;
                    backend.gemm(gemm, w, cols, backend.dst(y, out)?)?;
                }
            }
            Op::MaxPool { geometry } => {
                let (x, y) = read_write(&mut workspace.acts, layer.input, layer.output)?;
                let geometry = geometry.with_planes(batch * geometry.planes);
                backend.max_pool(
                    &geometry,
                    backend.src(x, in_range)?,
                    backend.dst(y, out_range.clone())?,
                )?;
                if network.pool_applies_relu(index) {
                    backend.relu(backend.dst(y, out_range)?)?;
                }
            }
            Op::Relu if network.relu_moves_past_pool(index) => {}
            Op::Relu => {
                let x = workspace.acts.get_mut(layer.input).ok_or_else(shape_bug)?;
                backend.relu(backend.dst(x, out_range)?)?;
            }
            Op::Flatten => {}
            Op::Dropout { rate, mask } => {
                let Some(rng) = dropout.as_deref_mut() else {
                    continue;
                };
                // Inverted dropout: kept values are scaled by 1/(1 - rate) so evaluation
                // needs no rescaling. One seed per mask; the backend draws the mask from it
                // (on the device for a GPU), the same bits everywhere.
                let seed = rng.random::<u64>();
                let mask_buffer = workspace.masks.get_mut(mask).ok_or_else(shape_bug)?;
                backend.dropout_mask(seed, rate, backend.dst(mask_buffer, out_range.clone())?)?;
                let x = workspace.acts.get_mut(layer.input).ok_or_else(shape_bug)?;
                backend.mul(
                    backend.dst(x, out_range.clone())?,
                    backend.src(mask_buffer, out_range)?,
                )?;
            }
            Op::Activation(_)
            | Op::AvgPool { .. }
            | Op::GlobalAvgPool { .. }
            | Op::BatchNorm { .. } => {
                extra::forward(backend, layer, params, workspace, batch)?;
            }
        }
    }
    Ok(())
}

/// Softmax cross-entropy of the logits left by [`forward`], summed loss and correct
/// count written into `stats` (two values). With `gradient_scale = Some(s)`, also writes
/// `s * (softmax - onehot)` (the gradient of `s * summed loss`) as the starting gradient
/// for [`backward`].
pub(crate) fn loss<B: Backend>(
    backend: &B,
    network: &Network,
    workspace: &mut Workspace<B>,
    batch: usize,
    gradient_scale: Option<f32>,
    stats: B::Dst<'_>,
) -> Result<()> {
    let classes = network.classes;
    let last = network.layers.last().map_or(0, |layer| layer.output);
    let logits_buffer = workspace.acts.get(last).ok_or_else(shape_bug)?;
    let logits = backend.src(logits_buffer, 0..batch * classes)?;
    let grad = match gradient_scale {
        Some(scale) => Some((
            scale,
            backend.dst(&mut workspace.deltas[0], 0..batch * classes)?,
        )),
        None => None,
    };
    let labels = backend.src(&workspace.labels, 0..batch)?;
    backend.softmax_cross_entropy(logits, labels, classes, grad, stats)
}

/// What [`backward`] does with each parameter gradient.
pub(crate) enum Update<'a, B: Backend> {
    /// Write it into `grads` (same layout as the parameters), or add it when `accumulate`.
    Store {
        params: &'a B::Buffer,
        grads: &'a mut B::Buffer,
        accumulate: bool,
    },
    /// Plain SGD straight from the GEMMs: `w = (1 - lr * weight_decay) * w - lr * g`
    /// (alpha = -lr, beta = 1 - lr * weight_decay). No gradient buffer is written and
    /// re-read, which matters for small batches where that traffic rivals the arithmetic.
    /// Each layer's input gradient is computed before its weights change.
    Sgd {
        params: &'a mut B::Buffer,
        learning_rate: f32,
        weight_decay: f32,
    },
}

impl<B: Backend> Update<'_, B> {
    fn params(&self) -> &B::Buffer {
        match self {
            Update::Store { params, .. } => params,
            Update::Sgd { params, .. } => params,
        }
    }

    /// Where parameter gradients go, with the GEMM `alpha` and the `beta` for the first
    /// write of a tensor (later accumulation into the same tensor uses beta = 1).
    fn target(&mut self) -> (&mut B::Buffer, f32, f32) {
        match self {
            Update::Store {
                grads, accumulate, ..
            } => (grads, 1.0, if *accumulate { 1.0 } else { 0.0 }),
            Update::Sgd {
                params,
                learning_rate,
                weight_decay,
            } => (
                params,
                -*learning_rate,
                1.0 - *learning_rate * *weight_decay,
            ),
        }
    }
}

/// Backpropagates the logit gradient left by [`loss`] through the layers, handing every
/// parameter gradient to `update`.
pub(crate) fn backward<B: Backend>(
    backend: &B,
    network: &Network,
    workspace: &mut Workspace<B>,
    batch: usize,
    mut update: Update<'_, B>,
) -> Result<()> {
    let first_param = network.first_param_layer();
    // Index of the delta buffer holding the gradient of the current layer's output.
    let mut current = 0;
    for (index, layer) in network.layers.iter().enumerate().rev() {
        let needs_input_grad = index > first_param || network.input_grad;
        if !needs_input_grad && !layer.op.has_params() {
            break;
        }
        let in_range = 0..batch * layer.input_len;
        let out_range = 0..batch * layer.output_len;
        if network.pool_applies_relu(index) {
            // The ReLU after the pool (see `Network::relu_moves_past_pool`), backward.
            let [first, second] = &mut workspace.deltas;
            let dy = if current == 0 { first } else { second };
            let y = workspace.acts.get(layer.output).ok_or_else(shape_bug)?;
            backend.relu_backward(
                backend.src(y, out_range.clone())?,
                backend.dst(dy, out_range.clone())?,
            )?;
        }
        let [first, second] = &mut workspace.deltas;
        let (dy, dx) = if current == 0 {
            (&*first, second)
        } else {
            (&*second, first)
        };
        match layer.op {
            Op::Dense {
                inputs,
                outputs,
                weight,
                bias,
            } => {
                let dy = backend.src(dy, out_range)?;
                let x_buffer = workspace.acts.get(layer.input).ok_or_else(shape_bug)?;
                // With SGD, the input gradient and the update in one pass over W.
                if needs_input_grad && matches!(update, Update::Sgd { .. }) {
                    let (target, alpha, beta) = update.target();
                    let fused = backend.dense_backward_fused(
                        batch,
                        inputs,
                        outputs,
                        backend.src(x_buffer, in_range.clone())?,
                        dy,
                        alpha,
                        beta,
                        backend.dst(target, weight..weight + inputs * outputs)?,
                        backend.dst(dx, in_range.clone())?,
                    )?;
                    if fused {
                        backend.sum_rows(
                            dy,
                            batch,
                            alpha,
                            beta,
                            backend.dst(target, bias..bias + outputs)?,
                        )?;
                        current = 1 - current;
                        continue;
                    }
                }
                if needs_input_grad {
                    // dX [batch, in] = dY [batch, out] . W [out, in]
                    let gemm = Gemm {
                        m: batch,
                        n: inputs,
                        k: outputs,
                        trans_a: false,
                        trans_b: false,
                        alpha: 1.0,
                        beta: 0.0,
                    };
                    let w = backend.src(update.params(), weight..weight + inputs * outputs)?;
                    backend.gemm(gemm, dy, w, backend.dst(dx, in_range.clone())?)?;
                }
                // dW [out, in] = dY^T [out, batch] . X [batch, in]; db = column sums of dY.
                let x = backend.src(x_buffer, in_range)?;
                let (target, alpha, beta) = update.target();
                let gemm = Gemm {
                    m: outputs,
                    n: inputs,
                    k: batch,
                    trans_a: true,
                    trans_b: false,
                    alpha,
                    beta,
                };
                backend.gemm(
                    gemm,
                    dy,
                    x,
                    backend.dst(target, weight..weight + inputs * outputs)?,
                )?;
                backend.sum_rows(
                    dy,
                    batch,
                    alpha,
                    beta,
                    backend.dst(target, bias..bias + outputs)?,
                )?;
                if needs_input_grad {
                    current = 1 - current;
                }
            }
            Op::Conv {
                geometry,
                out_channels,
                weight,
                bias,
            } => {
                let (rows, plane) = (geometry.col_rows(), geometry.col_cols());
                let weight_range = weight..weight + out_channels * rows;
                let example_in = |e: usize| e * layer.input_len..(e + 1) * layer.input_len;
                let example_out = |e: usize| e * layer.output_len..(e + 1) * layer.output_len;
                let cols_range = 0..rows * plane;
                let dy_all = backend.src(dy, out_range.clone())?;
                let sparse_input_grad = needs_input_grad
                    && backend.conv_input_grad_sparse(
                        &geometry,
                        out_channels,
                        batch,
                        backend.src(update.params(), weight_range.clone())?,
                        dy_all,
                        backend.dst(dx, in_range.clone())?,
                    )?;
                if needs_input_grad && !sparse_input_grad {
                    // dcols [rows, plane] = W^T [rows, out] . dY_e [out, plane], then col2im;
                    // all examples before an SGD update changes W.
                    let gemm = Gemm {
                        m: rows,
                        n: plane,
                        k: out_channels,
                        trans_a: true,
                        trans_b: false,
                        alpha: 1.0,
                        beta: 0.0,
                    };
                    let w = backend.src(update.params(), weight_range.clone())?;
                    for example in 0..batch {
                        let dy_e = backend.src(dy, example_out(example))?;
                        if geometry.is_pointwise() {
                            backend.gemm(gemm, w, dy_e, backend.dst(dx, example_in(example))?)?;
                        } else {
                            let cols = backend.dst(&mut workspace.cols, cols_range.clone())?;
                            backend.gemm(gemm, w, dy_e, cols)?;
                            backend.col2im(
                                &geometry,
                                backend.src(&workspace.cols, cols_range.clone())?,
                                backend.dst(dx, example_in(example))?,
                            )?;
                        }
                    }
                }
                // dW [out, rows] += dY_e [out, plane] . cols_e^T [plane, rows], recomputing
                // each example's im2col rather than keeping the whole batch's (25x the
                // activations) alive between the passes.
                let x_buffer = workspace.acts.get(layer.input).ok_or_else(shape_bug)?;
                let (target, alpha, first_beta) = update.target();
                let sparse_weight_grad = backend.conv_weight_grad_sparse(
                    &geometry,
                    out_channels,
                    batch,
                    backend.src(x_buffer, in_range.clone())?,
                    dy_all,
                    alpha,
                    first_beta,
                    backend.dst(target, weight_range.clone())?,
                )?;
                for example in (0..batch).filter(|_| !sparse_weight_grad) {
                    let input = backend.src(x_buffer, example_in(example))?;
                    let cols = if geometry.is_pointwise() {
                        input
                    } else {
                        backend.im2col(
                            &geometry,
                            input,
                            backend.dst(&mut workspace.cols, cols_range.clone())?,
                        )?;
                        backend.src(&workspace.cols, cols_range.clone())?
                    };
                    let gemm = Gemm {
                        m: out_channels,
                        n: rows,
                        k: plane,
                        trans_a: false,
                        trans_b: true,
                        alpha,
                        beta: if example == 0 { first_beta } else { 1.0 },
                    };
                    let dy_e = backend.src(dy, example_out(example))?;
                    backend.gemm(gemm, dy_e, cols, backend.dst(target, weight_range.clone())?)?;
                }
                let dy = backend.src(dy, out_range)?;
                let db = backend.dst(target, bias..bias + out_channels)?;
                backend.sum_channels(dy, batch, plane, alpha, first_beta, db)?;
                if needs_input_grad {
                    current = 1 - current;
                }
            }
            Op::MaxPool { geometry } => {
                let geometry = geometry.with_planes(batch * geometry.planes);
                let x_buffer = workspace.acts.get(layer.input).ok_or_else(shape_bug)?;
                backend.max_pool_backward(
                    &geometry,
                    backend.src(x_buffer, in_range.clone())?,
                    backend.src(dy, out_range)?,
                    backend.dst(dx, in_range)?,
                )?;
                current = 1 - current;
            }
            Op::Relu if network.relu_moves_past_pool(index) => {}
            Op::Relu => {
                let [first, second] = &mut workspace.deltas;
                let dy = if current == 0 { first } else { second };
                let y = workspace.acts.get(layer.output).ok_or_else(shape_bug)?;
                backend.relu_backward(
                    backend.src(y, out_range.clone())?,
                    backend.dst(dy, out_range)?,
                )?;
            }
            Op::Flatten => {}
            Op::Dropout { mask, .. } => {
                if !workspace.dropout_applied {
                    continue;
                }
                let [first, second] = &mut workspace.deltas;
                let dy = if current == 0 { first } else { second };
                let mask = workspace.masks.get(mask).ok_or_else(shape_bug)?;
                backend.mul(
                    backend.dst(dy, out_range.clone())?,
                    backend.src(mask, out_range)?,
                )?;
            }
            Op::Activation(_)
            | Op::AvgPool { .. }
            | Op::GlobalAvgPool { .. }
            | Op::BatchNorm { .. } => {
                let x = workspace.acts.get(layer.input).ok_or_else(shape_bug)?;
                let step = extra::Step {
                    batch,
                    needs_input_grad,
                };
                if extra::backward(backend, layer, step, x, dy, dx, &mut update)? {
                    current = 1 - current;
                }
            }
        }
    }
    workspace.input_grad_buffer = current;
    Ok(())
}

#[path = "layers_extra.rs"]
mod extra;
pub(crate) use extra::{logits, restore_frozen_on};

#[cfg(test)]
#[path = "layers_tests.rs"]
mod tests;
