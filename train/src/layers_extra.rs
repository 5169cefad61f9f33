//! The layers that ONNX imports add to the stack (sigmoid, tanh, average and global
//! average pooling, batch normalisation), written over the [`Backend`] trait like those
//! of the parent module, plus whole-batch inference for export checks and prediction.
//!
//! Batch normalisation normalises with its *running* statistics in training as well as
//! in evaluation ("frozen statistics"): its scale and bias train and are averaged like
//! any weight; the running mean and variance travel in the parameter vector, get a zero
//! gradient and are restored after every optimizer step, so they stay what the imported
//! file (or the initialisation: mean 0, variance 1) says. This avoids the FedAvg pitfall
//! of averaging per-client batch statistics, at the cost of not adapting them.
//!
//! These layers allocate small host buffers per batch (their default backend
//! primitives move data through the host), unlike the dense and convolution layers.

use super::{
    Layer, Network, Op, Purpose, Update, Workspace, forward as forward_all, read_write, shape_bug,
};
use crate::backend::{Backend, CpuBackend};
use crate::error::Result;

/// Batch size and whether the input gradient is needed, for [`backward`].
pub(super) struct Step {
    pub batch: usize,
    pub needs_input_grad: bool,
}

/// Scale 1, bias 0, running mean 0, running variance 1.
pub(super) fn initial_batch_norm(params: &mut [f32], channels: usize) {
    for (index, value) in params.iter_mut().enumerate() {
        let part = index / channels.max(1);
        *value = if part == 0 || part == 3 { 1.0 } else { 0.0 };
    }
}

/// The `[scale, bias, mean, var]` values of a batch normalisation, on the host.
fn norm_params<B: Backend>(
    backend: &B,
    params: &B::Buffer,
    at: usize,
    channels: usize,
) -> Result<Vec<f32>> {
    let mut host = vec![0.0; 4 * channels];
    backend.download(backend.src(params, at..at + 4 * channels)?, &mut host)?;
    Ok(host)
}

/// `1 / sqrt(var + eps)` per channel (a negative variance, which only a hostile update
/// could produce, is treated as zero).
fn inverse_std(norm: &[f32], channels: usize, epsilon: f32) -> Vec<f32> {
    norm[3 * channels..4 * channels]
        .iter()
        .map(|&var| 1.0 / (var.max(0.0) + epsilon).sqrt())
        .collect()
}

pub(super) fn forward<B: Backend>(
    backend: &B,
    layer: &Layer,
    params: &B::Buffer,
    workspace: &mut Workspace<B>,
    batch: usize,
) -> Result<()> {
    let in_range = 0..batch * layer.input_len;
    let out_range = 0..batch * layer.output_len;
    let (x, y) = read_write(&mut workspace.acts, layer.input, layer.output)?;
    match layer.op {
        Op::Activation(kind) => backend.activation(
            kind,
            in_range.len(),
            backend.src(x, in_range)?,
            backend.dst(y, out_range)?,
        ),
        Op::AvgPool { geometry } => {
            let geometry = geometry.with_planes(batch * geometry.planes);
            backend.avg_pool(
                &geometry,
                backend.src(x, in_range)?,
                backend.dst(y, out_range)?,
            )
        }
        Op::GlobalAvgPool { plane, .. } => {
            let mut host = vec![0.0; in_range.len()];
            backend.download(backend.src(x, in_range)?, &mut host)?;
            let means: Vec<f32> = host
                .chunks(plane.max(1))
                .map(|values| {
                    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64) as f32
                })
                .collect();
            backend.upload(&means, backend.dst(y, out_range)?)
        }
        Op::BatchNorm {
            channels,
            plane,
            epsilon,
            params: at,
        } => {
            let norm = norm_params(backend, params, at, channels)?;
            let inverse = inverse_std(&norm, channels, epsilon);
            let scale: Vec<f32> = (0..channels).map(|c| norm[c] * inverse[c]).collect();
            let shift: Vec<f32> = (0..channels)
                .map(|c| norm[channels + c] - scale[c] * norm[2 * channels + c])
                .collect();
            backend.channel_affine(
                batch,
                plane,
                &scale,
                &shift,
                backend.src(x, in_range)?,
                backend.dst(y, out_range)?,
            )
        }
        _ => Err(shape_bug()),
    }
}

/// Backpropagates through one of this module's layers: writes the input gradient into
/// `dx` when `step.needs_input_grad` (returning `true`: the caller swaps its gradient
/// buffers) and hands batch normalisation's parameter gradients to `update`.
pub(super) fn backward<B: Backend>(
    backend: &B,
    layer: &Layer,
    step: Step,
    x: &B::Buffer,
    dy: &B::Buffer,
    dx: &mut B::Buffer,
    update: &mut Update<'_, B>,
) -> Result<bool> {
    let Step {
        batch,
        needs_input_grad,
    } = step;
    let in_range = 0..batch * layer.input_len;
    let out_range = 0..batch * layer.output_len;
    match layer.op {
        Op::Activation(kind) if needs_input_grad => {
            backend.activation_backward(
                kind,
                in_range.len(),
                backend.src(x, in_range.clone())?,
                backend.src(dy, out_range)?,
                backend.dst(dx, in_range)?,
            )?;
        }
        Op::AvgPool { geometry } if needs_input_grad => {
            let geometry = geometry.with_planes(batch * geometry.planes);
            backend.avg_pool_backward(
                &geometry,
                backend.src(dy, out_range)?,
                backend.dst(dx, in_range)?,
            )?;
        }
        Op::GlobalAvgPool { plane, .. } if needs_input_grad => {
            let mut host = vec![0.0; out_range.len()];
            backend.download(backend.src(dy, out_range)?, &mut host)?;
            let share = 1.0 / plane.max(1) as f32;
            let spread: Vec<f32> = host
                .iter()
                .flat_map(|&g| std::iter::repeat_n(g * share, plane))
                .collect();
            backend.upload(&spread, backend.dst(dx, in_range)?)?;
        }
        Op::BatchNorm {
            channels,
            plane,
            epsilon,
            params: at,
        } => {
            let norm = norm_params(backend, update.params(), at, channels)?;
            let inverse = inverse_std(&norm, channels, epsilon);
            if needs_input_grad {
                let scale: Vec<f32> = (0..channels).map(|c| norm[c] * inverse[c]).collect();
                backend.channel_affine(
                    batch,
                    plane,
                    &scale,
                    &vec![0.0; channels],
                    backend.src(dy, out_range.clone())?,
                    backend.dst(dx, in_range.clone())?,
                )?;
            }
            let (weighted, plain) = backend.channel_grad_sums(
                batch,
                plane,
                &norm[2 * channels..3 * channels],
                backend.src(x, in_range)?,
                backend.src(dy, out_range)?,
            )?;
            let store_zero_stats = matches!(
                update,
                Update::Store {
                    accumulate: false,
                    ..
                }
            );
            let (target, alpha, beta) = update.target();
            let mut host = vec![0.0; 2 * channels];
            if beta != 0.0 {
                backend.download(backend.src(target, at..at + 2 * channels)?, &mut host)?;
            }
            for c in 0..channels {
                let grads = [(weighted[c] as f32) * inverse[c], plain[c] as f32];
                for (part, grad) in grads.into_iter().enumerate() {
                    let slot = &mut host[part * channels + c];
                    *slot = alpha * grad + if beta != 0.0 { beta * *slot } else { 0.0 };
                }
            }
            backend.upload(&host, backend.dst(target, at..at + 2 * channels)?)?;
            // The running statistics get no gradient (see the module docs).
            if store_zero_stats {
                let zeros = vec![0.0; 2 * channels];
                backend.upload(
                    &zeros,
                    backend.dst(target, at + 2 * channels..at + 4 * channels)?,
                )?;
            }
        }
        _ => return Ok(false),
    }
    Ok(needs_input_grad)
}

/// Puts BatchNorm's frozen running statistics back after an optimizer step
/// (they travel in the parameter vector but never train): uploads them from
/// the host copy `initial` (a few values per BatchNorm layer).
pub(crate) fn restore_frozen_on<B: Backend>(
    backend: &B,
    network: &Network,
    params: &mut B::Buffer,
    initial: &[f32],
) -> Result<()> {
    for layer in &network.layers {
        if let Op::BatchNorm {
            channels,
            params: at,
            ..
        } = layer.op
        {
            let stats = at + 2 * channels..at + 4 * channels;
            if let Some(src) = initial.get(stats.clone()) {
                backend.upload(src, backend.dst(params, stats)?)?;
            }
        }
    }
    Ok(())
}

/// The last layer's outputs (logits) for `inputs` (`batch x network.input_len`, row-major),
/// dropout off, on the CPU backend. `params` is the CPU backend's buffer type, so that
/// weights frozen by the caller ([`Backend::with_frozen_params`]) are the ones read.
#[allow(clippy::ptr_arg)]
pub(crate) fn logits(
    network: &Network,
    params: &Vec<f32>,
    inputs: &[f32],
    batch: usize,
) -> Result<Vec<f32>> {
    if batch == 0 || inputs.len() != batch * network.input_len || params.len() != network.num_params
    {
        return Err(shape_bug());
    }
    let backend = CpuBackend;
    let mut workspace = Workspace::new(&backend, network, batch, Purpose::Evaluate);
    {
        let input = workspace.acts.first_mut().ok_or_else(shape_bug)?;
        backend.upload(inputs, backend.dst(input, 0..inputs.len())?)?;
    }
    forward_all(&backend, network, params, &mut workspace, batch, None, None)?;
    let last = network.layers.last().map_or(0, |layer| layer.output);
    let out = workspace.acts.get(last).ok_or_else(shape_bug)?;
    let len = batch * network.classes;
    let mut host = vec![0.0; len];
    backend.download(backend.src(out, 0..len)?, &mut host)?;
    Ok(host)
}
