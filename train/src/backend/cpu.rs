//! The CPU backend: `Vec<f32>` storage, ndarray/matrixmultiply SIMD GEMM for matrix
//! products (small-batch shapes in [`small_gemm`]), an im2col-free convolution forward
//! ([`direct_conv`]) and a convolution backward that skips zero output gradients
//! ([`sparse_conv`]), both AVX2, and plain loops over contiguous slices (iterator zips, so
//! the compiler can vectorise them without per-element bounds checks) for everything else.

use std::ops::Range;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ErrorKind, ShapeError};

use super::cpu_parallel::{self, ParamSlices};
use super::direct_conv;
use super::small_gemm;
use super::sparse_conv;
use super::{AdamStep, Backend, ConvGeometry, Gemm, LossSum, PoolGeometry, SgdStep};
use crate::error::{Result, TrainError};

/// Host-memory backend. Stateless: GEMM threads come from matrixmultiply
/// (see [`crate::gemm_threads`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// The error for a range or length that does not match what an operation was told:
/// always a bug in the caller, reported instead of panicking.
fn shape_error() -> TrainError {
    TrainError::Shape(ShapeError::from_kind(ErrorKind::IncompatibleShape))
}

fn check_len(slice: &[f32], len: usize) -> Result<()> {
    if slice.len() == len {
        Ok(())
    } else {
        Err(shape_error())
    }
}

/// `rows x cols` row-major view, or its transpose when `transposed` (stored `cols x rows`).
fn matrix(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Result<ArrayView2<'_, f32>> {
    check_len(data, rows * cols)?;
    Ok(if transposed {
        ArrayView2::from_shape((cols, rows), data)?.reversed_axes()
    } else {
        ArrayView2::from_shape((rows, cols), data)?
    })
}

/// The `ox` range whose input column `ox * stride + kx - padding` lies inside `0..width`.
fn valid_columns(geometry: &ConvGeometry, kx: usize) -> Range<usize> {
    let (stride, padding) = (geometry.stride, geometry.padding);
    let low = if kx >= padding {
        0
    } else {
        (padding - kx).div_ceil(stride)
    };
    let high = if geometry.in_width + padding > kx {
        ((geometry.in_width - 1 + padding - kx) / stride + 1).min(geometry.out_width)
    } else {
        0
    };
    low.min(high)..high
}

/// The input row read by output row `oy` at kernel row `ky`, if it is not padding.
fn input_row(geometry: &ConvGeometry, oy: usize, ky: usize) -> Option<usize> {
    (oy * geometry.stride + ky)
        .checked_sub(geometry.padding)
        .filter(|&iy| iy < geometry.in_height)
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;
    type Src<'a> = &'a [f32];
    type Dst<'a> = &'a mut [f32];

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn as_cpu(&self) -> Option<&CpuBackend> {
        Some(self)
    }

    fn src<'a>(&self, buffer: &'a Vec<f32>, range: Range<usize>) -> Result<&'a [f32]> {
        buffer.get(range).ok_or_else(shape_error)
    }

    fn dst<'a>(&self, buffer: &'a mut Vec<f32>, range: Range<usize>) -> Result<&'a mut [f32]> {
        buffer.get_mut(range).ok_or_else(shape_error)
    }

    fn upload(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        self.copy(src, dst)
    }

    fn download(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        self.copy(src, dst)
    }

    fn gather_rows(&self, data: &[f32], dim: usize, rows: &[usize], dst: &mut [f32]) -> Result<()> {
        check_len(dst, rows.len() * dim)?;
        let len = data.len() / dim.max(1);
        if let Some(&index) = rows.iter().find(|&&row| row >= len) {
            return Err(TrainError::IndexOutOfRange { index, len });
        }
        // Every index is in range: `get` only keeps the copy free of panics.
        let copy_rows = |rows: &[usize], dst: &mut [f32]| {
            for (slot, &row) in dst.chunks_exact_mut(dim.max(1)).zip(rows) {
                if let Some(source) = data.get(row * dim..(row + 1) * dim) {
                    slot.copy_from_slice(source);
                }
            }
        };
        if !cpu_parallel::gather_rows(dim, rows, dst, copy_rows) {
            copy_rows(rows, dst);
        }
        Ok(())
    }

    fn copy(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_len(dst, src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn host_src<'a>(&self, data: &'a [f32]) -> Option<&'a [f32]> {
        Some(data)
    }

    fn with_frozen_params<R>(&self, params: &Vec<f32>, work: impl FnOnce() -> R) -> R {
        small_gemm::with_frozen_weights(params, work)
    }

    fn gemm(&self, gemm: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        check_len(a, gemm.m * gemm.k)?;
        check_len(b, gemm.k * gemm.n)?;
        check_len(c, gemm.m * gemm.n)?;
        let packed = small_gemm::forward_packed(
            &gemm,
            a,
            b,
            c,
            cpu_parallel::pack_strips,
            |plain, a, packed, c, kernel| {
                let rows = |g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]| kernel.run(g, a, b, c);
                if !cpu_parallel::by_rows(plain, a, packed, c, rows) {
                    kernel.run(plain, a, packed, c);
                }
            },
        );
        if packed {
            return Ok(());
        }
        if cpu_parallel::gemm(&gemm, a, b, c) {
            return Ok(());
        }
        if small_gemm::try_gemm(&gemm, a, b, c) {
            return Ok(());
        }
        let a = matrix(a, gemm.m, gemm.k, gemm.trans_a)?;
        let b = matrix(b, gemm.k, gemm.n, gemm.trans_b)?;
        let mut c = ArrayViewMut2::from_shape((gemm.m, gemm.n), c)?;
        // matrixmultiply ignores C when beta == 0, so outputs need no clearing.
        general_mat_mul(gemm.alpha, &a, &b, gemm.beta, &mut c);
        Ok(())
    }

    fn fill_rows(&self, bias: &[f32], rows: usize, dst: &mut [f32]) -> Result<()> {
        check_len(dst, rows * bias.len())?;
        if bias.is_empty() {
            return Ok(());
        }
        for row in dst.chunks_exact_mut(bias.len()) {
            row.copy_from_slice(bias);
        }
        Ok(())
    }

    fn fill_channels(
        &self,
        bias: &[f32],
        batch: usize,
        plane: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        check_len(dst, batch * bias.len() * plane)?;
        if plane == 0 || cpu_parallel::fill_channels(bias, plane, dst) {
            return Ok(());
        }
        for (run, &value) in dst.chunks_exact_mut(plane).zip(bias.iter().cycle()) {
            run.fill(value);
        }
        Ok(())
    }

    fn sum_rows(
        &self,
        src: &[f32],
        rows: usize,
        alpha: f32,
        beta: f32,
        dst: &mut [f32],
    ) -> Result<()> {
        let cols = dst.len();
        check_len(src, rows * cols)?;
        scale_or_clear(dst, beta);
        if cols == 0 {
            return Ok(());
        }
        for row in src.chunks_exact(cols) {
            for (d, &s) in dst.iter_mut().zip(row) {
                *d += alpha * s;
            }
        }
        Ok(())
    }

    fn sum_channels(
        &self,
        src: &[f32],
        batch: usize,
        plane: usize,
        alpha: f32,
        beta: f32,
        dst: &mut [f32],
    ) -> Result<()> {
        let channels = dst.len();
        check_len(src, batch * channels * plane)?;
        if cpu_parallel::sum_channels(src, plane, alpha, beta, dst) {
            return Ok(());
        }
        scale_or_clear(dst, beta);
        if plane == 0 {
            return Ok(());
        }
        for (run, channel) in src.chunks_exact(plane).zip((0..channels).cycle()) {
            dst[channel] += alpha * run_sum(run);
        }
        Ok(())
    }

    fn relu(&self, x: &mut [f32]) -> Result<()> {
        fn relu(x: &mut [f32]) {
            for value in x.iter_mut() {
                *value = value.max(0.0);
            }
        }
        if !cpu_parallel::elementwise(x, relu) {
            relu(x);
        }
        Ok(())
    }

    fn relu_backward(&self, y: &[f32], dy: &mut [f32]) -> Result<()> {
        check_len(dy, y.len())?;
        fn relu_backward(y: &[f32], dy: &mut [f32]) {
            for (d, &v) in dy.iter_mut().zip(y) {
                // A select rather than a multiply, so a NaN gradient cannot leak through
                // a closed unit and the loop still vectorises.
                *d = if v > 0.0 { *d } else { 0.0 };
            }
        }
        if !cpu_parallel::zipped(y, dy, relu_backward) {
            relu_backward(y, dy);
        }
        Ok(())
    }

    fn mul(&self, x: &mut [f32], mask: &[f32]) -> Result<()> {
        check_len(x, mask.len())?;
        for (value, &m) in x.iter_mut().zip(mask) {
            *value *= m;
        }
        Ok(())
    }

    fn im2col(&self, geometry: &ConvGeometry, input: &[f32], cols: &mut [f32]) -> Result<()> {
        check_len(input, geometry.input_len())?;
        check_len(cols, geometry.col_rows() * geometry.col_cols())?;
        if geometry.stride == 1 {
            im2col_stride1(geometry, input, cols);
            return Ok(());
        }
        let (height, width) = (geometry.in_height, geometry.in_width);
        let (out_width, stride, padding) = (geometry.out_width, geometry.stride, geometry.padding);
        let mut rows = cols.chunks_exact_mut(geometry.col_cols());
        for plane in input.chunks_exact(height * width) {
            for ky in 0..geometry.kernel {
                for kx in 0..geometry.kernel {
                    let Some(row) = rows.next() else {
                        return Err(shape_error());
                    };
                    let valid = valid_columns(geometry, kx);
                    for (oy, out) in row.chunks_exact_mut(out_width).enumerate() {
                        let Some(iy) = input_row(geometry, oy, ky) else {
                            out.fill(0.0);
                            continue;
                        };
                        let line = &plane[iy * width..(iy + 1) * width];
                        out[..valid.start].fill(0.0);
                        out[valid.end..].fill(0.0);
                        // First input column read, then every `stride`-th one.
                        let first = valid.start * stride + kx - padding;
                        let out = &mut out[valid.clone()];
                        if stride == 1 {
                            out.copy_from_slice(&line[first..first + out.len()]);
                        } else {
                            for (o, &v) in out.iter_mut().zip(line[first..].iter().step_by(stride))
                            {
                                *o = v;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn col2im(&self, geometry: &ConvGeometry, cols: &[f32], input_grad: &mut [f32]) -> Result<()> {
        check_len(input_grad, geometry.input_len())?;
        check_len(cols, geometry.col_rows() * geometry.col_cols())?;
        if geometry.stride == 1 {
            col2im_stride1(geometry, cols, input_grad);
            return Ok(());
        }
        input_grad.fill(0.0);
        let (height, width) = (geometry.in_height, geometry.in_width);
        let (out_width, stride, padding) = (geometry.out_width, geometry.stride, geometry.padding);
        let mut rows = cols.chunks_exact(geometry.col_cols());
        for plane in input_grad.chunks_exact_mut(height * width) {
            for ky in 0..geometry.kernel {
                for kx in 0..geometry.kernel {
                    let Some(row) = rows.next() else {
                        return Err(shape_error());
                    };
                    let valid = valid_columns(geometry, kx);
                    for (oy, src) in row.chunks_exact(out_width).enumerate() {
                        let Some(iy) = input_row(geometry, oy, ky) else {
                            continue;
                        };
                        let line = &mut plane[iy * width..(iy + 1) * width];
                        let first = valid.start * stride + kx - padding;
                        let src = &src[valid.clone()];
                        if stride == 1 {
                            for (d, &v) in line[first..first + src.len()].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (d, &v) in line[first..].iter_mut().step_by(stride).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn conv_forward_direct(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        bias: &[f32],
        weight: &[f32],
        input: &[f32],
        output: &mut [f32],
    ) -> Result<bool> {
        check_len(bias, out_channels)?;
        check_len(weight, out_channels * geometry.col_rows())?;
        check_len(input, batch * geometry.input_len())?;
        check_len(output, batch * out_channels * geometry.col_cols())?;
        let layer = direct_conv::Layer {
            geometry,
            out_channels,
            bias,
            weight,
        };
        if cpu_parallel::conv_forward(self, &layer, batch, input, output) {
            return Ok(true);
        }
        Ok(direct_conv::forward(&layer, input, output))
    }

    fn dense_backward_fused(
        &self,
        batch: usize,
        inputs: usize,
        outputs: usize,
        input: &[f32],
        output_grad: &[f32],
        alpha: f32,
        beta: f32,
        weight: &mut [f32],
        input_grad: &mut [f32],
    ) -> Result<bool> {
        check_len(input, batch * inputs)?;
        check_len(input_grad, batch * inputs)?;
        check_len(output_grad, batch * outputs)?;
        check_len(weight, outputs * inputs)?;
        let shape = small_gemm::FusedShape {
            batch,
            inputs,
            outputs,
            alpha,
            beta,
        };
        if cpu_parallel::dense_backward_fused(&shape, input, output_grad, weight, input_grad) {
            return Ok(true);
        }
        Ok(small_gemm::try_fused_dense_backward(
            &shape,
            0..outputs,
            input,
            output_grad,
            weight,
            input_grad,
        ))
    }

    fn conv_input_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        weight: &[f32],
        output_grad: &[f32],
        input_grad: &mut [f32],
    ) -> Result<bool> {
        check_len(weight, out_channels * geometry.col_rows())?;
        check_len(output_grad, batch * out_channels * geometry.col_cols())?;
        check_len(input_grad, batch * geometry.input_len())?;
        if !sparse_conv::worth_it(geometry, output_grad) {
            return Ok(false);
        }
        if cpu_parallel::conv_input_grad(
            geometry,
            out_channels,
            batch,
            weight,
            output_grad,
            input_grad,
        ) {
            return Ok(true);
        }
        sparse_conv::input_grad(geometry, out_channels, weight, output_grad, input_grad);
        Ok(true)
    }

    fn conv_weight_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        input: &[f32],
        output_grad: &[f32],
        alpha: f32,
        beta: f32,
        weight_grad: &mut [f32],
    ) -> Result<bool> {
        check_len(weight_grad, out_channels * geometry.col_rows())?;
        check_len(output_grad, batch * out_channels * geometry.col_cols())?;
        check_len(input, batch * geometry.input_len())?;
        if !sparse_conv::worth_it(geometry, output_grad) {
            return Ok(false);
        }
        if cpu_parallel::conv_weight_grad(
            geometry,
            out_channels,
            batch,
            input,
            output_grad,
            alpha,
            beta,
            weight_grad,
        ) {
            return Ok(true);
        }
        sparse_conv::weight_grad(
            geometry,
            out_channels,
            input,
            output_grad,
            alpha,
            beta,
            weight_grad,
        );
        Ok(true)
    }

    fn max_pool(&self, geometry: &PoolGeometry, input: &[f32], output: &mut [f32]) -> Result<()> {
        check_len(input, geometry.input_len())?;
        check_len(output, geometry.output_len())?;
        let plane_in = geometry.in_height * geometry.in_width;
        let plane_out = geometry.out_height * geometry.out_width;
        if plane_out == 0 {
            return Ok(());
        }
        if geometry.size == 2 && geometry.stride == 2 {
            if !cpu_parallel::planes(geometry, input, output, max_pool_2x2) {
                max_pool_2x2(geometry, input, output);
            }
            return Ok(());
        }
        for (plane, out) in input
            .chunks_exact(plane_in)
            .zip(output.chunks_exact_mut(plane_out))
        {
            for (oy, out_row) in out.chunks_exact_mut(geometry.out_width).enumerate() {
                for (ox, value) in out_row.iter_mut().enumerate() {
                    *value = window_max(geometry, plane, oy, ox).1;
                }
            }
        }
        Ok(())
    }

    fn max_pool_backward(
        &self,
        geometry: &PoolGeometry,
        input: &[f32],
        output_grad: &[f32],
        input_grad: &mut [f32],
    ) -> Result<()> {
        check_len(input, geometry.input_len())?;
        check_len(input_grad, geometry.input_len())?;
        check_len(output_grad, geometry.output_len())?;
        if geometry.size == 2 && geometry.stride == 2 {
            if !cpu_parallel::planes_backward(
                geometry,
                input,
                output_grad,
                input_grad,
                max_pool_2x2_backward,
            ) {
                max_pool_2x2_backward(geometry, input, output_grad, input_grad);
            }
            return Ok(());
        }
        input_grad.fill(0.0);
        let plane_in = geometry.in_height * geometry.in_width;
        let plane_out = geometry.out_height * geometry.out_width;
        if plane_out == 0 {
            return Ok(());
        }
        for ((plane, grad_in), grad_out) in input
            .chunks_exact(plane_in)
            .zip(input_grad.chunks_exact_mut(plane_in))
            .zip(output_grad.chunks_exact(plane_out))
        {
            for (oy, grad_row) in grad_out.chunks_exact(geometry.out_width).enumerate() {
                for (ox, &grad) in grad_row.iter().enumerate() {
                    // Recomputing the argmax (instead of storing indices) keeps the op
                    // stateless; it is a few compares per window.
                    let (position, _) = window_max(geometry, plane, oy, ox);
                    grad_in[position] += grad;
                }
            }
        }
        Ok(())
    }

    fn softmax_cross_entropy(
        &self,
        logits: &[f32],
        labels: &[f32],
        classes: usize,
        grad: Option<(f32, &mut [f32])>,
        stats: &mut [f32],
    ) -> Result<()> {
        check_len(logits, labels.len() * classes)?;
        check_len(stats, 2)?;
        let mut outcome = LossSum::default();
        if classes == 0 {
            stats.fill(0.0);
            return Ok(());
        }
        let mut grad = match grad {
            Some((scale, dst)) => {
                check_len(dst, logits.len())?;
                Some((scale, dst.chunks_exact_mut(classes)))
            }
            None => None,
        };
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            // Labels are exact small integers stored as f32 (checked by the caller); a
            // negative or NaN one saturates to 0, a large one fails the lookup below.
            let label = label as usize;
            let target = *row.get(label).ok_or_else(shape_error)?;
            // First maximum wins ties, so a constant output counts as predicting class 0.
            let (argmax, max) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(best_i, best), (i, &v)| {
                        if v > best { (i, v) } else { (best_i, best) }
                    });
            // Max-shifted log-sum-exp: large logits cannot overflow.
            let sum_exp: f32 = row.iter().map(|&v| (v - max).exp()).sum();
            outcome.loss += f64::from(sum_exp.ln() - (target - max));
            if argmax == label {
                outcome.correct += 1;
            }
            if let Some((scale, rows)) = grad.as_mut() {
                let out = rows.next().ok_or_else(shape_error)?;
                let inverse_sum = 1.0 / sum_exp;
                for (g, &v) in out.iter_mut().zip(row) {
                    *g = *scale * (v - max).exp() * inverse_sum;
                }
                out[label] -= *scale;
            }
        }
        stats[0] = outcome.loss as f32;
        stats[1] = outcome.correct as f32;
        Ok(())
    }

    fn dropout_mask(&self, seed: u64, rate: f32, mask: &mut [f32]) -> Result<()> {
        let keep_scale = 1.0 / (1.0 - rate);
        for (index, value) in mask.iter_mut().enumerate() {
            *value = super::dropout_value(seed, index, rate, keep_scale);
        }
        Ok(())
    }

    fn dst_len(&self, dst: &&mut [f32]) -> usize {
        dst.len()
    }

    fn sgd_step(
        &self,
        step: &SgdStep,
        params: &mut [f32],
        grads: &[f32],
        velocity: Option<&mut [f32]>,
        anchor: Option<&[f32]>,
    ) -> Result<()> {
        check_len(params, grads.len())?;
        if let Some(velocity) = &velocity {
            check_len(velocity, params.len())?;
        }
        if let Some(anchor) = anchor {
            check_len(anchor, params.len())?;
        }
        let slices = ParamSlices {
            params,
            grads,
            first: velocity,
            second: None,
            anchor,
        };
        if let Err(slices) = cpu_parallel::param_update(slices, |part| sgd_update(step, part)) {
            sgd_update(step, slices);
        }
        Ok(())
    }

    fn adam_step(
        &self,
        step: &AdamStep,
        params: &mut [f32],
        grads: &[f32],
        moment1: &mut [f32],
        moment2: &mut [f32],
        anchor: Option<&[f32]>,
    ) -> Result<()> {
        let len = params.len();
        check_len(grads, len)?;
        check_len(moment1, len)?;
        check_len(moment2, len)?;
        if let Some(anchor) = anchor {
            check_len(anchor, len)?;
        }
        let slices = ParamSlices {
            params,
            grads,
            first: Some(moment1),
            second: Some(moment2),
            anchor,
        };
        if let Err(slices) = cpu_parallel::param_update(slices, |part| adam_update(step, part)) {
            adam_update(step, slices);
        }
        Ok(())
    }
}

/// SGD (with optional momentum and a proximal anchor) over slices of equal length; the
/// momentum buffer is `slices.first`.
fn sgd_update(step: &SgdStep, slices: ParamSlices<'_>) {
    let &SgdStep {
        learning_rate: lr,
        momentum,
        nesterov,
        weight_decay: decay,
        proximal_mu: mu,
    } = step;
    let ParamSlices {
        params,
        grads,
        first: velocity,
        anchor,
        ..
    } = slices;
    // One specialised loop per combination keeps each loop branch-free.
    match (velocity, anchor) {
        (None, None) => {
            for (w, &g) in params.iter_mut().zip(grads) {
                *w -= lr * (g + decay * *w);
            }
        }
        (None, Some(anchor)) => {
            for ((w, &g), &a) in params.iter_mut().zip(grads).zip(anchor) {
                *w -= lr * (g + decay * *w + mu * (*w - a));
            }
        }
        (Some(velocity), anchor) => {
            let momentum_step = |w: &mut f32, v: &mut f32, g: f32| {
                *v = momentum * *v + g;
                let direction = if nesterov { g + momentum * *v } else { *v };
                *w -= lr * direction;
            };
            match anchor {
                None => {
                    for ((w, v), &g) in params.iter_mut().zip(velocity.iter_mut()).zip(grads) {
                        let g = g + decay * *w;
                        momentum_step(w, v, g);
                    }
                }
                Some(anchor) => {
                    for (((w, v), &g), &a) in params
                        .iter_mut()
                        .zip(velocity.iter_mut())
                        .zip(grads)
                        .zip(anchor)
                    {
                        let g = g + decay * *w + mu * (*w - a);
                        momentum_step(w, v, g);
                    }
                }
            }
        }
    }
}

/// Adam over slices of equal length; the moments are `slices.first` and `slices.second`
/// (both present: the caller passes them).
fn adam_update(step: &AdamStep, slices: ParamSlices<'_>) {
    let ParamSlices {
        params,
        grads,
        first: Some(moment1),
        second: Some(moment2),
        anchor,
    } = slices
    else {
        return;
    };
    let step_size = step.learning_rate / step.bias_correction1;
    let update = |w: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
        *m = step.beta1 * *m + (1.0 - step.beta1) * g;
        *v = step.beta2 * *v + (1.0 - step.beta2) * g * g;
        let denominator = v.sqrt() / step.bias_correction2_sqrt + step.epsilon;
        *w -= step_size * *m / denominator;
    };
    let states = params
        .iter_mut()
        .zip(moment1.iter_mut())
        .zip(moment2.iter_mut());
    match anchor {
        None => {
            for (((w, m), v), &g) in states.zip(grads) {
                let g = g + step.weight_decay * *w;
                update(w, m, v, g);
            }
        }
        Some(anchor) => {
            for ((((w, m), v), &g), &a) in states.zip(grads).zip(anchor) {
                let g = g + step.weight_decay * *w + step.proximal_mu * (*w - a);
                update(w, m, v, g);
            }
        }
    }
}

/// The sum of `run` in 16 partial sums (value `i` into sum `i % 16`), added pairwise at
/// the end. A plain `iter().sum()` is one chain of dependent adds, which the compiler
/// may not reorder: 4 cycles a value, where this vectorises. The order is fixed, so the
/// bits are the same on every kernel path and thread count.
pub(super) fn run_sum(run: &[f32]) -> f32 {
    const PARTIALS: usize = 16;
    let mut partial = [0.0f32; PARTIALS];
    let (blocks, tail) = run.as_chunks::<PARTIALS>();
    for block in blocks {
        for (p, v) in partial.iter_mut().zip(block) {
            *p += v;
        }
    }
    for (p, v) in partial.iter_mut().zip(tail) {
        *p += v;
    }
    let mut width = PARTIALS;
    while width > 1 {
        width /= 2;
        let (low, high) = partial.split_at_mut(width);
        for (p, q) in low.iter_mut().zip(&*high) {
            *p += q;
        }
    }
    partial[0]
}

/// `dst *= beta`, where `beta == 0` clears (so stale NaNs cannot survive).
pub(super) fn scale_or_clear(dst: &mut [f32], beta: f32) {
    if beta == 0.0 {
        dst.fill(0.0);
    } else if beta != 1.0 {
        for value in dst.iter_mut() {
            *value *= beta;
        }
    }
}

/// Whether `value` replaces `best` as a window's maximum: strictly greater (so the first
/// maximum wins ties), or NaN (so NaNs propagate, as in PyTorch).
#[inline(always)]
fn beats(value: f32, best: f32) -> bool {
    value > best || value.is_nan()
}

/// Position (within the plane) and value of the first maximum of window `(oy, ox)`.
fn window_max(geometry: &PoolGeometry, plane: &[f32], oy: usize, ox: usize) -> (usize, f32) {
    let width = geometry.in_width;
    let (top, left) = (oy * geometry.stride, ox * geometry.stride);
    let mut best = (top * width + left, f32::NEG_INFINITY);
    for y in top..top + geometry.size {
        let start = y * width + left;
        for (offset, &value) in plane[start..start + geometry.size].iter().enumerate() {
            if beats(value, best.1) {
                best = (start + offset, value);
            }
        }
    }
    best
}

thread_local! {
    /// One zero-padded input plane for the stride-1 im2col/col2im (a few KiB, reused by
    /// every call on this thread, so steps allocate nothing).
    static PADDED_PLANE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Values of slack after a padded plane, so 8-wide block copies may read past a row.
const SLACK: usize = 8;

/// Copies `len` values from `src[from..]` to `dst[to..]`. When both have room for `len`
/// rounded up to 8, copies whole 8-value blocks instead (the extra values land where
/// the caller writes next): fixed-size copies compile to a few vector moves, where a
/// `copy_from_slice` of a short run would be a `memcpy` call.
#[inline(always)]
fn copy_run(dst: &mut [f32], to: usize, src: &[f32], from: usize, len: usize) {
    fn blocks<const N: usize>(dst: &mut [f32], to: usize, src: &[f32], from: usize) {
        if let (Some(d), Some(s)) = (dst.get_mut(to..to + N), src.get(from..from + N))
            && let (Ok(d), Ok(s)) = (<&mut [f32; N]>::try_from(d), <&[f32; N]>::try_from(s))
        {
            *d = *s;
        }
    }
    let rounded = len.div_ceil(8) * 8;
    if to + rounded <= dst.len() && from + rounded <= src.len() {
        match rounded {
            8 => return blocks::<8>(dst, to, src, from),
            16 => return blocks::<16>(dst, to, src, from),
            24 => return blocks::<24>(dst, to, src, from),
            32 => return blocks::<32>(dst, to, src, from),
            _ => {}
        }
    }
    dst[to..to + len].copy_from_slice(&src[from..from + len]);
}

/// im2col for stride 1: each input plane is copied once into a zero-padded plane, after
/// which every output row of every `(ky, kx)` is one contiguous run of that plane.
fn im2col_stride1(geometry: &ConvGeometry, input: &[f32], cols: &mut [f32]) {
    let (height, width, padding) = (geometry.in_height, geometry.in_width, geometry.padding);
    let (padded_width, padded_height) = (width + 2 * padding, height + 2 * padding);
    let (out_height, out_width) = (geometry.out_height, geometry.out_width);
    let plane_cols = geometry.col_cols();
    let kernel = geometry.kernel;
    PADDED_PLANE.with_borrow_mut(|padded| {
        padded.resize(padded_height * padded_width + SLACK, 0.0);
        let mut row_start = 0;
        for plane in input.chunks_exact(height * width) {
            padded.fill(0.0);
            for (y, line) in plane.chunks_exact(width).enumerate() {
                let start = (y + padding) * padded_width + padding;
                padded[start..start + width].copy_from_slice(line);
            }
            for ky in 0..kernel {
                for kx in 0..kernel {
                    for oy in 0..out_height {
                        let from = (oy + ky) * padded_width + kx;
                        copy_run(cols, row_start + oy * out_width, padded, from, out_width);
                    }
                    row_start += plane_cols;
                }
            }
        }
    });
}

/// col2im for stride 1: the adjoint of [`im2col_stride1`], accumulating into a padded
/// plane and copying its interior out.
fn col2im_stride1(geometry: &ConvGeometry, cols: &[f32], input_grad: &mut [f32]) {
    let (height, width, padding) = (geometry.in_height, geometry.in_width, geometry.padding);
    let (padded_width, padded_height) = (width + 2 * padding, height + 2 * padding);
    let out_width = geometry.out_width;
    let kernel = geometry.kernel;
    let mut rows = cols.chunks_exact(geometry.col_cols());
    PADDED_PLANE.with_borrow_mut(|padded| {
        padded.resize(padded_height * padded_width + SLACK, 0.0);
        for plane in input_grad.chunks_exact_mut(height * width) {
            padded.fill(0.0);
            for ky in 0..kernel {
                for kx in 0..kernel {
                    let Some(row) = rows.next() else { return };
                    for (oy, run) in row.chunks_exact(out_width).enumerate() {
                        let from = (oy + ky) * padded_width + kx;
                        for (d, &v) in padded[from..from + out_width].iter_mut().zip(run) {
                            *d += v;
                        }
                    }
                }
            }
            for (y, line) in plane.chunks_exact_mut(width).enumerate() {
                let start = (y + padding) * padded_width + padding;
                line.copy_from_slice(&padded[start..start + width]);
            }
        }
    });
}

/// The first maximum of a 2x2 window (row-major order), as in [`window_max`].
#[inline(always)]
fn max_of_four(top: [f32; 2], bottom: [f32; 2]) -> f32 {
    let mut best = top[0];
    for value in [top[1], bottom[0], bottom[1]] {
        if beats(value, best) {
            best = value;
        }
    }
    best
}

/// Max pooling with 2x2 windows and stride 2, two input rows at a time.
fn max_pool_2x2(geometry: &PoolGeometry, input: &[f32], output: &mut [f32]) {
    let (width, out_width) = (geometry.in_width, geometry.out_width);
    let plane_in = geometry.in_height * width;
    let plane_out = geometry.out_height * out_width;
    for (plane, out) in input
        .chunks_exact(plane_in)
        .zip(output.chunks_exact_mut(plane_out))
    {
        for (oy, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            let top = &plane[2 * oy * width..][..2 * out_width];
            let bottom = &plane[(2 * oy + 1) * width..][..2 * out_width];
            let done = max_2x2_vectors(top, bottom, out_row);
            let pairs = top.as_chunks::<2>().0.iter().zip(bottom.as_chunks::<2>().0);
            for (value, (&t, &b)) in out_row.iter_mut().zip(pairs).skip(done) {
                *value = max_of_four(t, b);
            }
        }
    }
}

/// Backward of [`max_pool_2x2`]: writes every covered input position (the gradient at
/// the window's first maximum, zero at the others), and zeroes the uncovered last row or
/// column of odd-sized planes.
fn max_pool_2x2_backward(
    geometry: &PoolGeometry,
    input: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
) {
    let (width, out_width) = (geometry.in_width, geometry.out_width);
    let plane_in = geometry.in_height * width;
    let plane_out = geometry.out_height * out_width;
    let covered = 2 * geometry.out_height * width;
    for ((plane, grad_in), grad_out) in input
        .chunks_exact(plane_in)
        .zip(input_grad.chunks_exact_mut(plane_in))
        .zip(output_grad.chunks_exact(plane_out))
    {
        grad_in[covered..].fill(0.0);
        for (oy, grad_row) in grad_out.chunks_exact(out_width).enumerate() {
            let top = &plane[2 * oy * width..][..2 * out_width];
            let bottom = &plane[(2 * oy + 1) * width..][..2 * out_width];
            let (grad_top, grad_bottom) =
                grad_in[2 * oy * width..][..2 * width].split_at_mut(width);
            grad_top[2 * out_width..].fill(0.0);
            grad_bottom[2 * out_width..].fill(0.0);
            let done = route_2x2_vectors(top, bottom, grad_row, grad_top, grad_bottom);
            let windows = top.as_chunks::<2>().0.iter().zip(bottom.as_chunks::<2>().0);
            let grads = grad_top
                .as_chunks_mut::<2>()
                .0
                .iter_mut()
                .zip(grad_bottom.as_chunks_mut::<2>().0.iter_mut());
            let rest = grad_row.iter().zip(windows).zip(grads).skip(done);
            for ((&grad, (&t, &b)), (gt, gb)) in rest {
                // Branch-free routing to the first cell equal to the window's maximum
                // (which is the first maximum); a NaN maximum equals nothing and goes to
                // the last cell.
                let best = max_of_four(t, b);
                // Which cell is the first equal to the maximum, as 0/1 integers and bit
                // masks: comparisons that data makes unpredictable stay branch-free.
                let equal = |value: f32| u32::from(value == best);
                let (e0, e1, e2) = (equal(t[0]), equal(t[1]), equal(b[0]));
                let bits = grad.to_bits();
                let pick = |hit: u32| f32::from_bits(bits & 0u32.wrapping_sub(hit));
                *gt = [pick(e0), pick(e1 & (1 ^ e0))];
                *gb = [pick(e2 & (1 ^ (e0 | e1))), pick(1 ^ (e0 | e1 | e2))];
            }
        }
    }
}

/// The windows of one row of [`max_pool_2x2_backward`], four at a time with AVX2, routed
/// exactly as the scalar loop does; returns how many windows it wrote: all of them for
/// rows of 4 or more (a ragged end is one more block of 4 that overlaps the last one and
/// rewrites its windows with the same values), 0 without AVX2 and FMA. `top`, `bottom`,
/// `grad_top` and `grad_bottom` are at least `2 * grads.len()` long.
fn route_2x2_vectors(
    top: &[f32],
    bottom: &[f32],
    grads: &[f32],
    grad_top: &mut [f32],
    grad_bottom: &mut [f32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if grads.len() >= 4 && small_gemm::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { route_2x2_avx2(top, bottom, grads, grad_top, grad_bottom) };
        }
    }
    let _ = (top, bottom, grads, grad_top, grad_bottom);
    0
}

/// See [`route_2x2_vectors`]. Each vector holds 4 windows' cells of one row, in place;
/// a cell's partner in its window's row is the neighbouring lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn route_2x2_avx2(
    top: &[f32],
    bottom: &[f32],
    grads: &[f32],
    grad_top: &mut [f32],
    grad_bottom: &mut [f32],
) -> usize {
    use std::arch::x86_64::{
        _CMP_EQ_OQ, _CMP_UNORD_Q, _mm_loadu_ps, _mm256_and_ps, _mm256_andnot_ps, _mm256_blendv_ps,
        _mm256_castps128_ps256, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_loadu_ps, _mm256_max_ps,
        _mm256_or_ps, _mm256_permute_ps, _mm256_permutevar8x32_ps, _mm256_set1_epi32,
        _mm256_setr_epi32, _mm256_storeu_ps,
    };
    let windows = grads.len();
    if windows < 4 {
        return 0;
    }
    let (top, bottom) = (&top[..2 * windows], &bottom[..2 * windows]);
    let (grad_top, grad_bottom) = (
        &mut grad_top[..2 * windows],
        &mut grad_bottom[..2 * windows],
    );
    let spread = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    // Set in the lanes holding a window's left column.
    let left = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
    let ones = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    // Whole blocks of 4, then the last 4 windows again if the row is ragged.
    let ragged = (!windows.is_multiple_of(4)).then_some(windows - 4);
    for w in (0..windows / 4 * 4).step_by(4).chain(ragged) {
        let cells = 2 * w..2 * w + 8;
        // SAFETY (all loads and stores below): `cells` is in bounds of the four slices
        // (2 * windows long, checked by the slicing above), and `w..w + 4` of `grads`;
        // the accesses are unaligned.
        let (t, b, g) = unsafe {
            (
                _mm256_loadu_ps(top[cells.clone()].as_ptr()),
                _mm256_loadu_ps(bottom[cells.clone()].as_ptr()),
                _mm_loadu_ps(grads[w..w + 4].as_ptr()),
            )
        };
        let (tp, bp) = (_mm256_permute_ps(t, 0xB1), _mm256_permute_ps(b, 0xB1));
        // A NaN anywhere in the window: nothing equals the maximum (the last cell takes it).
        let nan = _mm256_or_ps(
            _mm256_cmp_ps(t, tp, _CMP_UNORD_Q),
            _mm256_cmp_ps(b, bp, _CMP_UNORD_Q),
        );
        let max = _mm256_max_ps(_mm256_max_ps(t, tp), _mm256_max_ps(b, bp));
        let et = _mm256_andnot_ps(nan, _mm256_cmp_ps(t, max, _CMP_EQ_OQ));
        let eb = _mm256_andnot_ps(nan, _mm256_cmp_ps(b, max, _CMP_EQ_OQ));
        let (etp, ebp) = (_mm256_permute_ps(et, 0xB1), _mm256_permute_ps(eb, 0xB1));
        let any_top = _mm256_or_ps(et, etp);
        // Cell 0: equal; cell 1: equal and cell 0 not.
        let top_hit = _mm256_blendv_ps(_mm256_andnot_ps(etp, et), et, left);
        // Cell 2: equal and no top cell; cell 3: none of cells 0-2 equal.
        let bottom_hit = _mm256_blendv_ps(
            _mm256_andnot_ps(_mm256_or_ps(any_top, ebp), ones),
            _mm256_andnot_ps(any_top, eb),
            left,
        );
        let g = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(g), spread);
        // SAFETY: see above.
        unsafe {
            _mm256_storeu_ps(
                grad_top[cells.clone()].as_mut_ptr(),
                _mm256_and_ps(top_hit, g),
            );
            _mm256_storeu_ps(
                grad_bottom[cells].as_mut_ptr(),
                _mm256_and_ps(bottom_hit, g),
            );
        }
    }
    windows
}

/// The windows of one output row of [`max_pool_2x2`], eight and then four at a time with
/// AVX2, with the scalar loop's choice (first maximum, NaN propagating); returns how many
/// it wrote: all of them for rows of 4 or more (a ragged end is one more block of 4 that
/// overlaps the one before and rewrites its windows with the same values), 0 without
/// AVX2 and FMA. `top` and `bottom` are `2 * out.len()` long.
fn max_2x2_vectors(top: &[f32], bottom: &[f32], out: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if out.len() >= 4 && small_gemm::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { max_2x2_avx2(top, bottom, out) };
        }
    }
    let _ = (top, bottom, out);
    0
}

/// See [`max_2x2_vectors`]: the four cells of 8 windows go into four registers (even and
/// odd columns of both rows), then the window order is restored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn max_2x2_avx2(top: &[f32], bottom: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::{
        __m128, __m256, _CMP_GT_OQ, _CMP_UNORD_Q, _mm_blendv_ps, _mm_cmp_ps, _mm_loadu_ps,
        _mm_or_ps, _mm_shuffle_ps, _mm_storeu_ps, _mm256_blendv_ps, _mm256_castpd_ps,
        _mm256_castps_pd, _mm256_cmp_ps, _mm256_loadu_ps, _mm256_or_ps, _mm256_permute4x64_pd,
        _mm256_shuffle_ps, _mm256_storeu_ps,
    };
    // `value` replaces `best` when strictly greater or NaN, as in `beats`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn take(best: __m256, value: __m256) -> __m256 {
        let beats = _mm256_or_ps(
            _mm256_cmp_ps(value, best, _CMP_GT_OQ),
            _mm256_cmp_ps(value, value, _CMP_UNORD_Q),
        );
        _mm256_blendv_ps(best, value, beats)
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn take4(best: __m128, value: __m128) -> __m128 {
        let beats = _mm_or_ps(
            _mm_cmp_ps(value, best, _CMP_GT_OQ),
            _mm_cmp_ps(value, value, _CMP_UNORD_Q),
        );
        _mm_blendv_ps(best, value, beats)
    }
    let windows = out.len();
    if windows < 4 {
        return 0;
    }
    let (top, bottom) = (&top[..2 * windows], &bottom[..2 * windows]);
    let eights = windows / 8 * 8;
    // Blocks of 4 after the 8s: one more if 4 are left, and the last 4 windows again if
    // the row is ragged.
    let four = (windows - eights >= 4).then_some(eights);
    let ragged = (!windows.is_multiple_of(4)).then_some(windows - 4);
    for w in four.into_iter().chain(ragged) {
        // SAFETY: `2 * w..2 * w + 8` is in bounds of `top` and `bottom` (2 * windows
        // long, w + 4 <= windows); the loads are unaligned.
        let (t0, t1, b0, b1) = unsafe {
            (
                _mm_loadu_ps(top[2 * w..2 * w + 4].as_ptr()),
                _mm_loadu_ps(top[2 * w + 4..2 * w + 8].as_ptr()),
                _mm_loadu_ps(bottom[2 * w..2 * w + 4].as_ptr()),
                _mm_loadu_ps(bottom[2 * w + 4..2 * w + 8].as_ptr()),
            )
        };
        // Windows in order: the left cells are the even lanes of `t0, t1`.
        let mut best = _mm_shuffle_ps(t0, t1, 0x88);
        best = take4(best, _mm_shuffle_ps(t0, t1, 0xDD));
        best = take4(best, _mm_shuffle_ps(b0, b1, 0x88));
        best = take4(best, _mm_shuffle_ps(b0, b1, 0xDD));
        // SAFETY: `w..w + 4` is in bounds of `out`; the store is unaligned.
        unsafe { _mm_storeu_ps(out[w..w + 4].as_mut_ptr(), best) };
    }
    let out = &mut out[..eights];
    for w in (0..eights).step_by(8) {
        // SAFETY: `2 * w..2 * w + 16` is in bounds of `top` and `bottom` (2 * windows
        // long, checked by the slicing above); the loads are unaligned.
        let (t0, t1, b0, b1) = unsafe {
            (
                _mm256_loadu_ps(top[2 * w..2 * w + 8].as_ptr()),
                _mm256_loadu_ps(top[2 * w + 8..2 * w + 16].as_ptr()),
                _mm256_loadu_ps(bottom[2 * w..2 * w + 8].as_ptr()),
                _mm256_loadu_ps(bottom[2 * w + 8..2 * w + 16].as_ptr()),
            )
        };
        // Windows in the order 0 1 4 5 | 2 3 6 7.
        let mut best = _mm256_shuffle_ps(t0, t1, 0x88);
        best = take(best, _mm256_shuffle_ps(t0, t1, 0xDD));
        best = take(best, _mm256_shuffle_ps(b0, b1, 0x88));
        best = take(best, _mm256_shuffle_ps(b0, b1, 0xDD));
        let ordered = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(best), 0xD8));
        // SAFETY: `w..w + 8` is in bounds of `out` (`eights` long); the store is unaligned.
        unsafe { _mm256_storeu_ps(out[w..w + 8].as_mut_ptr(), ordered) };
    }
    windows
}
