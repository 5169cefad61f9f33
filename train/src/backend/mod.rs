//! The arithmetic that layers need, behind one trait.
//!
//! Every layer ([`crate::layers`]) and optimizer step is written once, generically over
//! [`Backend`]; a backend only provides storage and these primitive operations. The CPU
//! backend ([`CpuBackend`]) works on `Vec<f32>` with ndarray/matrixmultiply's SIMD GEMM;
//! the wgpu backend (`WgpuBackend`, cargo feature `wgpu`) implements the same trait over
//! GPU buffers, with [`Backend::Src`] and [`Backend::Dst`] naming a buffer range instead
//! of a slice.
//!
//! # Device backends
//!
//! Operations may run asynchronously: a device backend records them and submits them in
//! order, so an operation's result is only guaranteed visible to the host through
//! [`Backend::download`] (which waits for everything recorded before it). Nothing else
//! reads device memory back: the loss of a batch goes into a device buffer
//! ([`Backend::softmax_cross_entropy`]'s `stats`), which the training loop downloads
//! once per epoch. Labels are uploaded once per batch as class indices stored as `f32`.
//!
//! # Adding an operation
//!
//! A new primitive can be given a default implementation that works on every backend
//! through host transfer: [`Backend::download`] the inputs into `Vec<f32>`s, compute on
//! the host, [`Backend::upload`] the result (see [`Backend::dropout_mask`]). Backends
//! override it with a native kernel where it matters.
//!
//! Conventions shared by all operations:
//! - Tensors are row-major `f32`. Images are `[channels, height, width]` per example and
//!   examples follow each other (`NCHW`).
//! - Operations are told every size explicitly and check that the ranges they are given
//!   have exactly those lengths (an error, never a panic, on mismatch: that would be a
//!   bug in the caller).
//! - `alpha`/`beta` follow BLAS: `dst = alpha * result + beta * dst`; with `beta == 0` the
//!   old contents of `dst` are ignored (even NaN), so `dst` needs no clearing.

use std::ops::Range;

use crate::error::Result;

mod cpu;
mod cpu_parallel;
mod direct_conv;
pub mod dispatch;
pub(crate) mod host_ops;
pub mod pool;
mod select;
mod simd_gemm;
mod small_gemm;
mod sparse_conv;
#[cfg(feature = "wgpu")]
pub mod wgpu;

#[cfg(feature = "wgpu")]
pub use self::wgpu::{WgpuBackend, WgpuDevice};
pub use cpu::CpuBackend;
pub use dispatch::{KernelPath, kernel_path, kernel_path_name, version_details, with_kernel_path};
pub use pool::{cpu_threads, with_cpu_threads};
pub use select::{BackendKind, Engine};

/// The dropout mask value of element `index` for a mask drawn with `seed`: 0 with
/// probability `rate`, else `keep_scale`. A counter-based hash (lowbias32 over the
/// index and both seed halves), so every backend computes the same bits independently
/// (the wgpu kernel `dropout_mask` is the same function).
pub fn dropout_value(seed: u64, index: usize, rate: f32, keep_scale: f32) -> f32 {
    fn mix32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        x
    }
    // Truncating the index and seed halves is the definition (the kernel works in u32).
    let h = mix32(index as u32 ^ mix32(seed as u32 ^ mix32((seed >> 32) as u32)));
    let uniform = (h >> 8) as f32 * (1.0 / 16_777_216.0);
    if uniform < rate { 0.0 } else { keep_scale }
}

/// Shape of a 2-D convolution (or of its im2col matrix) over one example.
///
/// The input is `[in_channels, in_height, in_width]`; zero padding of `padding` on every
/// side; the kernel is `kernel x kernel` applied every `stride` pixels. The im2col matrix
/// has one row per `(channel, ky, kx)` (in that order, matching a `[out, in, k, k]`
/// weight tensor) and one column per output pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeometry {
    /// The geometry for this input and kernel, or `None` if the kernel does not fit the
    /// padded input (or a size is zero, or arithmetic would overflow).
    pub fn new(
        (in_channels, in_height, in_width): (usize, usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Option<ConvGeometry> {
        if in_channels == 0 || in_height == 0 || in_width == 0 || kernel == 0 || stride == 0 {
            return None;
        }
        let out = |size: usize| -> Option<usize> {
            let padded = size.checked_add(padding.checked_mul(2)?)?;
            Some(padded.checked_sub(kernel)? / stride + 1)
        };
        let geometry = ConvGeometry {
            in_channels,
            in_height,
            in_width,
            kernel,
            stride,
            padding,
            out_height: out(in_height)?,
            out_width: out(in_width)?,
        };
        // Every size derived below must be representable.
        geometry
            .col_rows()
            .checked_mul(geometry.col_cols())
            .and(in_channels.checked_mul(in_height)?.checked_mul(in_width))
            .map(|_| geometry)
    }

    /// Elements of one input example.
    pub fn input_len(&self) -> usize {
        self.in_channels * self.in_height * self.in_width
    }

    /// Rows of the im2col matrix: `in_channels * kernel * kernel`.
    pub fn col_rows(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// Columns of the im2col matrix: output pixels per channel.
    pub fn col_cols(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Whether the im2col matrix is the input itself (1x1 kernel, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Shape of a max pooling over `planes` independent `[in_height, in_width]` planes
/// (channels times examples), `size x size` windows every `stride` pixels, no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    pub planes: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub size: usize,
    pub stride: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl PoolGeometry {
    /// The geometry, or `None` if the window does not fit or a size is zero.
    pub fn new(
        planes: usize,
        (in_height, in_width): (usize, usize),
        size: usize,
        stride: usize,
    ) -> Option<PoolGeometry> {
        if planes == 0 || size == 0 || stride == 0 || in_height < size || in_width < size {
            return None;
        }
        Some(PoolGeometry {
            planes,
            in_height,
            in_width,
            size,
            stride,
            out_height: (in_height - size) / stride + 1,
            out_width: (in_width - size) / stride + 1,
        })
    }

    /// The same pooling over a different number of planes (a batch of examples).
    pub fn with_planes(self, planes: usize) -> PoolGeometry {
        PoolGeometry { planes, ..self }
    }

    pub fn input_len(&self) -> usize {
        self.planes * self.in_height * self.in_width
    }

    pub fn output_len(&self) -> usize {
        self.planes * self.out_height * self.out_width
    }
}

/// A matrix product `C = alpha * op(A) * op(B) + beta * C`, with `op(A)` of shape `m x k`,
/// `op(B)` of shape `k x n` and `C` of shape `m x n`, all stored densely row-major
/// (`A` is stored `k x m` when `trans_a`, `B` is stored `n x k` when `trans_b`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

/// One SGD step's constants (see [`Backend::sgd_step`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub learning_rate: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    /// FedProx coefficient; the anchor is passed separately.
    pub proximal_mu: f32,
}

/// One Adam step's constants (see [`Backend::adam_step`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub proximal_mu: f32,
    /// `1 - beta1^t` for this step `t` (1-based), computed by the caller in f64.
    pub bias_correction1: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
}

/// Elementwise activations other than ReLU (which has its own in-place primitives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Sigmoid,
    Tanh,
}

/// Summed softmax cross-entropy and correct predictions (of a batch, or of an epoch once
/// the per-batch `stats` of [`Backend::softmax_cross_entropy`] are downloaded and added).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub loss: f64,
    pub correct: usize,
}

/// Storage plus the primitive operations of the training engine.
///
/// Host transfers: [`Backend::upload`], [`Backend::download`] and
/// [`Backend::gather_rows`]; everything else stays in backend memory.
pub trait Backend {
    /// Owned storage of `f32` values (host memory, or a device buffer).
    type Buffer: Send;
    /// A read-only range of a buffer.
    type Src<'a>: Copy
    where
        Self: 'a;
    /// A writable range of a buffer.
    type Dst<'a>
    where
        Self: 'a;

    /// A buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Self::Buffer;
    /// The range `range` of `buffer` for reading.
    fn src<'a>(&self, buffer: &'a Self::Buffer, range: Range<usize>) -> Result<Self::Src<'a>>;
    /// The range `range` of `buffer` for writing.
    fn dst<'a>(&self, buffer: &'a mut Self::Buffer, range: Range<usize>) -> Result<Self::Dst<'a>>;

    /// Copies host values into `dst` (same length).
    fn upload(&self, src: &[f32], dst: Self::Dst<'_>) -> Result<()>;
    /// Copies `src` into host memory (same length).
    fn download(&self, src: Self::Src<'_>, dst: &mut [f32]) -> Result<()>;
    /// Copies the rows `rows` (each `dim` long) of the host matrix `data` into `dst`,
    /// one after the other. Every row index must be in range.
    fn gather_rows(
        &self,
        data: &[f32],
        dim: usize,
        rows: &[usize],
        dst: Self::Dst<'_>,
    ) -> Result<()>;
    /// `dst = src` (same length).
    fn copy(&self, src: Self::Src<'_>, dst: Self::Dst<'_>) -> Result<()>;

    /// The matrix product described by `gemm`.
    fn gemm(&self, gemm: Gemm, a: Self::Src<'_>, b: Self::Src<'_>, c: Self::Dst<'_>) -> Result<()>;

    /// Bias broadcast for dense layers: every row of `dst` (`rows x bias.len()`) becomes `bias`.
    fn fill_rows(&self, bias: Self::Src<'_>, rows: usize, dst: Self::Dst<'_>) -> Result<()>;
    /// Bias broadcast for convolutions: `dst` is `[batch, channels, plane]` and every
    /// `plane`-long run of channel `c` becomes `bias[c]` (`channels = bias.len()`).
    fn fill_channels(
        &self,
        bias: Self::Src<'_>,
        batch: usize,
        plane: usize,
        dst: Self::Dst<'_>,
    ) -> Result<()>;
    /// Dense bias gradient: `dst[j] = beta * dst[j] + alpha * sum_i src[i, j]` over the
    /// `rows` rows of `src` (`rows x dst.len()`).
    fn sum_rows(
        &self,
        src: Self::Src<'_>,
        rows: usize,
        alpha: f32,
        beta: f32,
        dst: Self::Dst<'_>,
    ) -> Result<()>;
    /// Convolution bias gradient: `dst[c] = beta * dst[c] + alpha * sum over examples and
    /// pixels of src[e, c, p]`, with `src` of shape `[batch, dst.len(), plane]`.
    fn sum_channels(
        &self,
        src: Self::Src<'_>,
        batch: usize,
        plane: usize,
        alpha: f32,
        beta: f32,
        dst: Self::Dst<'_>,
    ) -> Result<()>;

    /// `x = max(x, 0)` in place.
    fn relu(&self, x: Self::Dst<'_>) -> Result<()>;
    /// ReLU backward from the layer's output: `dy = dy * (y > 0)` in place.
    fn relu_backward(&self, y: Self::Src<'_>, dy: Self::Dst<'_>) -> Result<()>;
    /// `x = x * mask` elementwise (dropout forward and backward).
    fn mul(&self, x: Self::Dst<'_>, mask: Self::Src<'_>) -> Result<()>;
    /// Fills `mask` with an inverted-dropout mask: element `i` is
    /// [`dropout_value`]`(seed, i, rate, 1 / (1 - rate))`. The default computes it on the
    /// host and uploads it.
    fn dropout_mask(&self, seed: u64, rate: f32, mask: Self::Dst<'_>) -> Result<()> {
        let len = self.dst_len(&mask);
        let keep_scale = 1.0 / (1.0 - rate);
        let host: Vec<f32> = (0..len)
            .map(|index| dropout_value(seed, index, rate, keep_scale))
            .collect();
        self.upload(&host, mask)
    }
    /// Length of a writable range (for default implementations that go through the host).
    fn dst_len(&self, dst: &Self::Dst<'_>) -> usize;
    /// Submits the work recorded so far without waiting for it (a no-op on backends that
    /// compute synchronously). Training loops call it after every step so a device
    /// starts working while the host prepares the next batch.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// `data` (host memory) as an operand this backend reads in place, if it can: the
    /// CPU backend reads host memory directly; a GPU backend must upload it (`None`).
    fn host_src<'a>(&self, data: &'a [f32]) -> Option<Self::Src<'a>> {
        let _ = data;
        None
    }

    /// This backend as the CPU backend, if it is one: an evaluation on it may hand whole
    /// forward passes to the CPU's threads ([`crate::Model::evaluate`]). The default:
    /// `None`.
    fn as_cpu(&self) -> Option<&CpuBackend> {
        None
    }

    /// Runs `work` with `params` frozen: nothing changes them meanwhile (the shared
    /// borrow guarantees it), so a backend may prepare a weight once (the CPU's packed
    /// forward operand) and reuse it for every batch of an evaluation. The default
    /// just runs `work`.
    fn with_frozen_params<R>(&self, params: &Self::Buffer, work: impl FnOnce() -> R) -> R {
        let _ = params;
        work()
    }

    /// The im2col matrix (`col_rows x col_cols`) of one example (`input_len` values);
    /// padding reads as zero.
    fn im2col(
        &self,
        geometry: &ConvGeometry,
        input: Self::Src<'_>,
        cols: Self::Dst<'_>,
    ) -> Result<()>;
    /// The adjoint of [`Backend::im2col`]: `input_grad` (overwritten) receives the sum of
    /// every column entry that was read from each input pixel.
    fn col2im(
        &self,
        geometry: &ConvGeometry,
        cols: Self::Src<'_>,
        input_grad: Self::Dst<'_>,
    ) -> Result<()>;

    /// Convolution forward without an im2col matrix: writes each output channel's `bias`
    /// plus the convolution of the `batch` examples of `input` with the `[out, in, k, k]`
    /// weights to `output` (`[batch, out_channels, plane]`, overwritten; the CPU adds
    /// the bias as it stores each sum, saving a pass over the output). Returns
    /// `Ok(false)`, touching nothing, when the backend has no such route for this
    /// geometry; the caller then fills the bias and uses im2col and GEMM.
    #[allow(clippy::too_many_arguments)]
    fn conv_forward_direct(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        bias: Self::Src<'_>,
        weight: Self::Src<'_>,
        input: Self::Src<'_>,
        output: Self::Dst<'_>,
    ) -> Result<bool> {
        let _ = (geometry, out_channels, batch, bias, weight, input, output);
        Ok(false)
    }
    /// Dense backward with the SGD update folded in, in one pass over the weights:
    /// `input_grad [batch, in] = output_grad [batch, out] . W [out, in]` (overwritten, from
    /// the weights as they were) and `W = alpha * output_grad^T . input + beta * W` (W
    /// ignored when `beta == 0`). Returns `Ok(false)`, touching nothing, when the backend
    /// has no such route for this shape; the caller then uses two GEMMs.
    #[allow(clippy::too_many_arguments)]
    fn dense_backward_fused(
        &self,
        batch: usize,
        inputs: usize,
        outputs: usize,
        input: Self::Src<'_>,
        output_grad: Self::Src<'_>,
        alpha: f32,
        beta: f32,
        weight: Self::Dst<'_>,
        input_grad: Self::Dst<'_>,
    ) -> Result<bool> {
        let _ = (batch, inputs, outputs, input, output_grad, alpha, beta);
        let _ = (weight, input_grad);
        Ok(false)
    }
    /// Convolution input gradient (overwritten, `batch` examples) from the output
    /// gradient `[batch, out_channels, plane]` and the `[out, in, k, k]` weights, over the
    /// whole batch by the backend's own route: the CPU's skips zero output gradients
    /// (after ReLU and max pooling most are), the GPU's is an implicit GEMM.
    /// Returns `Ok(false)`, touching nothing, when the backend has no such route or
    /// judges the gradient too dense; the caller then uses im2col and GEMM per example.
    fn conv_input_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        weight: Self::Src<'_>,
        output_grad: Self::Src<'_>,
        input_grad: Self::Dst<'_>,
    ) -> Result<bool> {
        let _ = (
            geometry,
            out_channels,
            batch,
            weight,
            output_grad,
            input_grad,
        );
        Ok(false)
    }
    /// Convolution weight gradient, `dw = alpha * (sum over the batch) + beta * dw`
    /// (`dw` ignored when `beta == 0`), like [`Backend::conv_input_grad_sparse`]:
    /// `Ok(false)` leaves it to the caller's im2col and GEMM.
    #[allow(clippy::too_many_arguments)]
    fn conv_weight_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        input: Self::Src<'_>,
        output_grad: Self::Src<'_>,
        alpha: f32,
        beta: f32,
        weight_grad: Self::Dst<'_>,
    ) -> Result<bool> {
        let _ = (geometry, out_channels, batch, input, output_grad);
        let _ = (alpha, beta, weight_grad);
        Ok(false)
    }

    /// Max pooling forward.
    fn max_pool(
        &self,
        geometry: &PoolGeometry,
        input: Self::Src<'_>,
        output: Self::Dst<'_>,
    ) -> Result<()>;
    /// Max pooling backward: `input_grad` (overwritten) gets each window's output gradient
    /// at the position of the window's maximum in `input` (the first maximum in row-major
    /// order, as in the forward pass), summed where windows overlap; zero elsewhere.
    fn max_pool_backward(
        &self,
        geometry: &PoolGeometry,
        input: Self::Src<'_>,
        output_grad: Self::Src<'_>,
        input_grad: Self::Dst<'_>,
    ) -> Result<()>;

    /// Softmax cross-entropy of `logits` (`rows x classes`) against `labels` (`rows`
    /// class indices stored as `f32`, checked by the caller). Writes the summed loss and
    /// the number of correct predictions (the first maximum counts as the prediction)
    /// into the two values of `stats`, so that a device backend needs no read-back per
    /// batch. With `grad = Some((scale, dst))`, also writes `scale * (softmax - onehot)`
    /// into `dst`.
    fn softmax_cross_entropy(
        &self,
        logits: Self::Src<'_>,
        labels: Self::Src<'_>,
        classes: usize,
        grad: Option<(f32, Self::Dst<'_>)>,
        stats: Self::Dst<'_>,
    ) -> Result<()>;

    /// One SGD step (PyTorch's `torch.optim.SGD` semantics), elementwise over `params`:
    /// `g = grad + weight_decay * w + proximal_mu * (w - anchor)`; with momentum
    /// `v = momentum * v + g` and `g = v` (or `g + momentum * v` for Nesterov);
    /// `w = w - learning_rate * g`. `velocity` is required when `momentum != 0`, `anchor`
    /// when `proximal_mu != 0`.
    fn sgd_step(
        &self,
        step: &SgdStep,
        params: Self::Dst<'_>,
        grads: Self::Src<'_>,
        velocity: Option<Self::Dst<'_>>,
        anchor: Option<Self::Src<'_>>,
    ) -> Result<()>;

    /// One Adam step (PyTorch's `torch.optim.Adam`, L2 weight decay added to the
    /// gradient): `g` as for SGD; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
    /// `w = w - (lr / bias_correction1) * m / (sqrt(v) / bias_correction2_sqrt + eps)`.
    fn adam_step(
        &self,
        step: &AdamStep,
        params: Self::Dst<'_>,
        grads: Self::Src<'_>,
        moment1: Self::Dst<'_>,
        moment2: Self::Dst<'_>,
        anchor: Option<Self::Src<'_>>,
    ) -> Result<()>;

    // The primitives below have default implementations written only in terms of
    // `download`/`upload` and the plain-Rust loops of `host_ops`, so every backend
    // supports the layers that need them (ONNX imports); override where speed matters.

    /// `y = f(x)` elementwise over `len` values.
    fn activation(
        &self,
        kind: Activation,
        len: usize,
        x: Self::Src<'_>,
        y: Self::Dst<'_>,
    ) -> Result<()> {
        let mut host = vec![0.0; len];
        self.download(x, &mut host)?;
        let mut out = vec![0.0; len];
        host_ops::activation(kind, &host, &mut out);
        self.upload(&out, y)
    }
    /// `dx = dy * f'(x)` elementwise over `len` values, from the activation's input.
    fn activation_backward(
        &self,
        kind: Activation,
        len: usize,
        x: Self::Src<'_>,
        dy: Self::Src<'_>,
        dx: Self::Dst<'_>,
    ) -> Result<()> {
        let (mut xs, mut grads) = (vec![0.0; len], vec![0.0; len]);
        self.download(x, &mut xs)?;
        self.download(dy, &mut grads)?;
        let mut out = vec![0.0; len];
        host_ops::activation_backward(kind, &xs, &grads, &mut out);
        self.upload(&out, dx)
    }
    /// Average pooling forward (windows inside the input, no padding).
    fn avg_pool(
        &self,
        geometry: &PoolGeometry,
        input: Self::Src<'_>,
        output: Self::Dst<'_>,
    ) -> Result<()> {
        let mut host = vec![0.0; geometry.input_len()];
        self.download(input, &mut host)?;
        let mut out = vec![0.0; geometry.output_len()];
        host_ops::avg_pool(geometry, &host, &mut out);
        self.upload(&out, output)
    }
    /// Average pooling backward: `input_grad` (overwritten) gets each window's output
    /// gradient divided by the window size, summed where windows overlap.
    fn avg_pool_backward(
        &self,
        geometry: &PoolGeometry,
        output_grad: Self::Src<'_>,
        input_grad: Self::Dst<'_>,
    ) -> Result<()> {
        let mut host = vec![0.0; geometry.output_len()];
        self.download(output_grad, &mut host)?;
        let mut out = vec![0.0; geometry.input_len()];
        host_ops::avg_pool_backward(geometry, &host, &mut out);
        self.upload(&out, input_grad)
    }
    /// `y[e, c, p] = scale[c] * x[e, c, p] + shift[c]` over `batch` examples of
    /// `[scale.len(), plane]` (batch normalisation with fixed statistics, and its input
    /// gradient with `shift = 0`).
    fn channel_affine(
        &self,
        batch: usize,
        plane: usize,
        scale: &[f32],
        shift: &[f32],
        x: Self::Src<'_>,
        y: Self::Dst<'_>,
    ) -> Result<()> {
        let len = batch * scale.len() * plane;
        let mut host = vec![0.0; len];
        self.download(x, &mut host)?;
        let mut out = vec![0.0; len];
        host_ops::channel_affine(plane, scale, shift, &host, &mut out);
        self.upload(&out, y)
    }
    /// Per channel `c`: `(sum (x - center[c]) * dy, sum dy)` over the `batch` examples
    /// and `plane` pixels (batch normalisation's scale and bias gradients).
    fn channel_grad_sums(
        &self,
        batch: usize,
        plane: usize,
        center: &[f32],
        x: Self::Src<'_>,
        dy: Self::Src<'_>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let len = batch * center.len() * plane;
        let (mut xs, mut grads) = (vec![0.0; len], vec![0.0; len]);
        self.download(x, &mut xs)?;
        self.download(dy, &mut grads)?;
        Ok(host_ops::channel_grad_sums(plane, center, &xs, &grads))
    }
}
