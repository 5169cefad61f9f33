//! Convolution backward passes for sparse output gradients.
//!
//! A convolution followed by ReLU and max pooling gets an output gradient that is
//! mostly zero: pooling routes each window's gradient to one of its cells (a quarter of
//! them for 2x2 windows) and ReLU zeroes the inactive ones. The dense im2col + GEMM
//! backward multiplies all those zeros; here every nonzero output gradient `g` at pixel
//! `(oy, ox)` of channel `o` instead scatters (input gradient) or gathers (weight
//! gradient) one `kernel x kernel x in_channels` patch:
//!
//! - `dX[patch] += g * W[o]` and
//! - `dW[o] += g * X[patch]`.
//!
//! Both run on a zero-padded channel-last (`[height][width][channel]`) copy of one
//! example's plane, where each kernel row of a patch is one contiguous run of
//! `kernel * in_channels` values, and on weights reordered to `[out][ky][kx][in]` to
//! match. Summation order is fixed per kernel path (examples, then channels, then kernel
//! rows in blocks, then pixels), so results are reproducible; the input gradient's block
//! size differs between AVX-512, AVX2 and the portable path, so its rounding differs
//! between paths (the weight gradient's does not). Both are rounded differently from the
//! GEMM path, which the caller picks by the gradient's density (deterministic in the
//! data).

use std::cell::RefCell;

use super::ConvGeometry;

/// Shortest contiguous run (`kernel * in_channels`) worth the scatter; below it (a
/// single-channel first layer) the GEMM path wins.
const MIN_RUN: usize = 16;

/// The sparse path is used when at most `1 / MAX_DENSITY_INVERSE` of the output gradient
/// is nonzero. Each nonzero costs about as much as `5` columns of the dense GEMM, so it
/// pays off well below a density of one half; 2x2 pooling gives at most a quarter.
const MAX_DENSITY_INVERSE: usize = 3;

/// Values of a kernel row kept in registers at once (weights for the input gradient,
/// sums for the weight gradient) on the portable path and for a row's last values.
const SUM_BLOCK: usize = 32;

/// [`SUM_BLOCK`] on AVX2: 8 vectors. In the weight gradient every vector is a chain of
/// dependent FMAs (one per nonzero gradient), so it takes 8 chains to cover the FMA's
/// latency at two per cycle; in the input gradient the loop's own work per nonzero is
/// spread over more values.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // x86-64 kernels only
const SUM_BLOCK_AVX2: usize = 64;

/// [`SUM_BLOCK`] on AVX-512: 8 of its 32 registers of 16 values (with 32-value blocks,
/// two chains, the weight gradient ran at a quarter of the FMA peak).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // x86-64 kernels only
const SUM_BLOCK_AVX512: usize = 128;

thread_local! {
    /// Padded channel-last plane of one example (input or input gradient).
    pub(super) static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Reordered weights, or the reordered weight gradient being accumulated.
    /// One output channel's nonzero gradients: patch start and value.
    static NONZERO: RefCell<Vec<(usize, f32)>> = const { RefCell::new(Vec::new()) };
    pub(super) static REORDERED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Cache-line alignment of the scratch slices, in values: no vector load of a run
/// then straddles two lines unless the run itself is misaligned.
const ALIGN: usize = 16;

/// A `len`-long zeroed slice of `buffer` starting on a 64-byte boundary.
pub(super) fn zeroed_aligned(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.clear();
    buffer.resize(len + ALIGN, 0.0);
    let offset = buffer.as_ptr().align_offset(ALIGN * 4).min(ALIGN);
    &mut buffer[offset..offset + len]
}

/// The thread's scratch buffers, borrowed for one call.
pub(super) struct Scratch<'a> {
    pub(super) reordered: &'a mut Vec<f32>,
    pub(super) padded: &'a mut Vec<f32>,
}

/// Whether the sparse path should handle a backward pass with this output gradient.
pub(super) fn worth_it(geometry: &ConvGeometry, output_grad: &[f32]) -> bool {
    if geometry.kernel * geometry.in_channels < MIN_RUN || output_grad.is_empty() {
        return false;
    }
    let nonzero = output_grad.iter().filter(|&&v| v != 0.0).count();
    nonzero * MAX_DENSITY_INVERSE <= output_grad.len()
}

/// Sizes shared by the passes (here and in [`super::direct_conv`]).
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    height: usize,
    width: usize,
    padded_width: usize,
    padded_len: usize,
    out_width: usize,
    pub(super) out_plane: usize,
    /// `kernel * channels`: one kernel row of a patch.
    pub(super) run: usize,
    /// `kernel * run`: one output channel's weights.
    pub(super) rows: usize,
}

impl Shape {
    pub(super) fn new(geometry: &ConvGeometry) -> Shape {
        let padded_width = geometry.in_width + 2 * geometry.padding;
        let padded_height = geometry.in_height + 2 * geometry.padding;
        let run = geometry.kernel * geometry.in_channels;
        Shape {
            channels: geometry.in_channels,
            kernel: geometry.kernel,
            stride: geometry.stride,
            padding: geometry.padding,
            height: geometry.in_height,
            width: geometry.in_width,
            padded_width,
            padded_len: padded_height * padded_width * geometry.in_channels,
            out_width: geometry.out_width,
            out_plane: geometry.out_height * geometry.out_width,
            run,
            rows: geometry.kernel * run,
        }
    }

    /// Values of one input example.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
    pub(super) fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Index in the padded channel-last plane of input pixel `(y, x)`, channel 0.
    fn padded_index(&self, y: usize, x: usize) -> usize {
        ((y + self.padding) * self.padded_width + x + self.padding) * self.channels
    }

    /// Start of kernel row `ky` of the patch of output pixel `pixel`.
    pub(super) fn patch_row(&self, pixel: usize, ky: usize) -> usize {
        let (oy, ox) = (pixel / self.out_width, pixel % self.out_width);
        ((oy * self.stride + ky) * self.padded_width + ox * self.stride) * self.channels
    }

    /// Index of `(ci, ky, kx)` in one output channel's `[in][ky][kx]` weights.
    fn weight_index(&self, ci: usize, ky: usize, kx: usize) -> usize {
        (ci * self.kernel + ky) * self.kernel + kx
    }

    /// Index of `(ci, ky, kx)` in one output channel's reordered `[ky][kx][in]` weights.
    fn reordered_index(&self, ci: usize, ky: usize, kx: usize) -> usize {
        (ky * self.kernel + kx) * self.channels + ci
    }

    /// `padded` becomes the zero-padded channel-last copy of one `[C, H, W]` example.
    pub(super) fn pad_channels_last<'a>(&self, x: &[f32], buffer: &'a mut Vec<f32>) -> &'a [f32] {
        let padded = zeroed_aligned(buffer, self.padded_len);
        let in_plane = self.height * self.width;
        for (ci, x_c) in x.chunks_exact(in_plane).enumerate() {
            for (y, line) in x_c.chunks_exact(self.width).enumerate() {
                let start = self.padded_index(y, 0) + ci;
                let target = padded[start..].iter_mut().step_by(self.channels);
                for (d, &s) in target.zip(line) {
                    *d = s;
                }
            }
        }
        padded
    }

    /// `reordered` becomes the `[out][ky][kx][in]` copy of `[out, in, k, k]` weights.
    pub(super) fn reorder_weights<'a>(
        &self,
        weight: &[f32],
        buffer: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let reordered = zeroed_aligned(buffer, weight.len());
        for (dst, src) in reordered
            .chunks_exact_mut(self.rows)
            .zip(weight.chunks_exact(self.rows))
        {
            for ci in 0..self.channels {
                for ky in 0..self.kernel {
                    for kx in 0..self.kernel {
                        dst[self.reordered_index(ci, ky, kx)] = src[self.weight_index(ci, ky, kx)];
                    }
                }
            }
        }
        reordered
    }
}

/// `dst += g * src`, fused multiply-adds when `FUSED`.
#[inline(always)]
fn axpy<const FUSED: bool>(dst: &mut [f32], g: f32, src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = if FUSED { s.mul_add(g, *d) } else { *d + g * s };
    }
}

/// Cuts a kernel row of `run` values into blocks for [`scatter_block`] and
/// [`gather_block`]: `BLOCK`s, then [`SUM_BLOCK`]s, then the rest. Calls `block(from,
/// len)` for each.
#[inline(always)]
fn for_blocks<const BLOCK: usize>(run: usize, mut block: impl FnMut(usize, usize)) {
    let mut from = 0;
    while from < run {
        let len = match run - from {
            left if left >= BLOCK => BLOCK,
            left if left >= SUM_BLOCK => SUM_BLOCK,
            left => left,
        };
        block(from, len);
        from += len;
    }
}

/// Input gradient, one block of a kernel row: `padded[start + offset..][..len] += g *
/// w_block` for each nonzero `(start, g)`, the weights held in registers throughout.
#[inline(always)]
fn scatter_block<const FUSED: bool, const BLOCK: usize>(
    padded: &mut [f32],
    offset: usize,
    w_block: &[f32],
    nonzero: &[(usize, f32)],
) {
    macro_rules! scatter {
        ($n:expr) => {{
            let Ok(&w_block) = <&[f32; $n]>::try_from(w_block) else {
                unreachable!("the block is {} long", $n)
            };
            for &(start, g) in nonzero {
                let d = start + offset;
                axpy::<FUSED>(&mut padded[d..d + $n], g, &w_block);
            }
        }};
    }
    let len = w_block.len();
    if len == BLOCK {
        scatter!(BLOCK)
    } else if len == SUM_BLOCK {
        scatter!(SUM_BLOCK)
    } else {
        for &(start, g) in nonzero {
            let d = start + offset;
            axpy::<FUSED>(&mut padded[d..d + len], g, w_block);
        }
    }
}

/// Weight gradient, one block of a kernel row: `block += g * padded[start +
/// offset..][..len]` for each nonzero `(start, g)`, the sums held in registers
/// throughout (each value's terms in the same order whatever the block size).
#[inline(always)]
fn gather_block<const FUSED: bool, const BLOCK: usize>(
    block: &mut [f32],
    padded: &[f32],
    offset: usize,
    nonzero: &[(usize, f32)],
) {
    macro_rules! gather {
        ($n:expr) => {{
            let Ok(block) = <&mut [f32; $n]>::try_from(&mut *block) else {
                unreachable!("the block is {} long", $n)
            };
            let mut acc = *block;
            for &(start, g) in nonzero {
                let x = &padded[start + offset..start + offset + $n];
                axpy::<FUSED>(&mut acc, g, x);
            }
            *block = acc;
        }};
    }
    let len = block.len();
    if len == BLOCK {
        gather!(BLOCK)
    } else if len == SUM_BLOCK {
        gather!(SUM_BLOCK)
    } else {
        for &(start, g) in nonzero {
            let x = &padded[start + offset..start + offset + len];
            axpy::<FUSED>(block, g, x);
        }
    }
}

/// `nonzero` becomes the (patch start, value) of each nonzero gradient of one channel.
#[inline(always)]
fn collect_nonzero(shape: &Shape, dy_o: &[f32], nonzero: &mut Vec<(usize, f32)>) {
    // Room for every pixel at once: sized by the count of nonzeros, the buffer would
    // grow again whenever a later step had more of them (an allocation mid-training,
    // seen on aarch64's portable path).
    nonzero.clear();
    nonzero.resize(dy_o.len(), (0, 0.0));
    if shape.out_width == 0 {
        nonzero.clear();
        return;
    }
    // Branch-free: every pixel is written at the next free place, which only a nonzero
    // keeps. Which gradients are zero is data (a quarter survive pooling, at random),
    // and a branch on it was mispredicted often enough to cost a quarter of the input
    // gradient's time.
    let row_step = shape.stride * shape.padded_width * shape.channels;
    let column_step = shape.stride * shape.channels;
    let mut count = 0;
    for (oy, row) in dy_o.chunks_exact(shape.out_width).enumerate() {
        // `patch_row(pixel, 0)` without a division per pixel.
        let mut start = oy * row_step;
        for &g in row {
            nonzero[count] = (start, g);
            count += usize::from(g != 0.0);
            start += column_step;
        }
    }
    nonzero.truncate(count);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    // Never true on a CPU without AVX2/FMA: see `super::dispatch`.
    super::dispatch::avx2_fma()
}

/// The kernel compiled for the instruction set the kernel path runs: AVX-512, else
/// AVX2+FMA, else none (the portable body).
#[cfg(target_arch = "x86_64")]
fn vector_kernel<K>(avx512: K, avx2: K) -> Option<K> {
    if super::dispatch::avx512f() {
        Some(avx512)
    } else if has_avx2_fma() {
        Some(avx2)
    } else {
        None
    }
}

/// Input gradient (overwritten) of a batch of examples from the output gradient and the
/// `[out, in, k, k]` weights. Lengths were checked by the caller.
pub(super) fn input_grad(
    geometry: &ConvGeometry,
    out_channels: usize,
    weight: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
) {
    NONZERO.with_borrow_mut(|nonzero| {
        REORDERED.with_borrow_mut(|reordered| {
            PADDED.with_borrow_mut(|padded| {
                let scratch = Scratch { reordered, padded };
                #[cfg(target_arch = "x86_64")]
                {
                    type Kernel = unsafe fn(
                        &ConvGeometry,
                        usize,
                        &[f32],
                        &[f32],
                        &mut [f32],
                        Scratch<'_>,
                        &mut Vec<(usize, f32)>,
                    );
                    if let Some(kernel) =
                        vector_kernel::<Kernel>(input_grad_avx512, input_grad_avx2)
                    {
                        // SAFETY: the CPU has the instruction set of the kernel chosen
                        // (checked just above).
                        unsafe {
                            kernel(
                                geometry,
                                out_channels,
                                weight,
                                output_grad,
                                input_grad,
                                scratch,
                                nonzero,
                            )
                        };
                        return;
                    }
                }
                input_grad_body::<false, SUM_BLOCK>(
                    geometry,
                    out_channels,
                    weight,
                    output_grad,
                    input_grad,
                    scratch,
                    nonzero,
                );
            })
        })
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn input_grad_avx2(
    geometry: &ConvGeometry,
    out_channels: usize,
    weight: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
    scratch: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    input_grad_body::<true, SUM_BLOCK_AVX2>(
        geometry,
        out_channels,
        weight,
        output_grad,
        input_grad,
        scratch,
        nonzero,
    );
}

/// [`input_grad_avx2`] compiled for AVX-512 (16-lane vectors), in blocks of 128 values
/// (so its sums are added in a different order from AVX2's).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn input_grad_avx512(
    geometry: &ConvGeometry,
    out_channels: usize,
    weight: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
    scratch: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    input_grad_body::<true, SUM_BLOCK_AVX512>(
        geometry,
        out_channels,
        weight,
        output_grad,
        input_grad,
        scratch,
        nonzero,
    );
}

#[inline(always)]
fn input_grad_body<const FUSED: bool, const BLOCK: usize>(
    geometry: &ConvGeometry,
    out_channels: usize,
    weight: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
    Scratch { reordered, padded }: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    let shape = Shape::new(geometry);
    let (run, rows, out_plane) = (shape.run, shape.rows, shape.out_plane);
    let in_plane = shape.height * shape.width;
    {
        let reordered = shape.reorder_weights(weight, reordered);
        {
            for (dy, dx) in output_grad
                .chunks_exact(out_channels * out_plane)
                .zip(input_grad.chunks_exact_mut(shape.channels * in_plane))
            {
                let padded = zeroed_aligned(padded, shape.padded_len);
                for (dy_o, w_o) in dy.chunks_exact(out_plane).zip(reordered.chunks_exact(rows)) {
                    collect_nonzero(&shape, dy_o, nonzero);
                    // Each block of a kernel row's weights stays in registers across all
                    // the channel's nonzero gradients.
                    for (ky, w_row) in w_o.chunks_exact(run).enumerate() {
                        let row_offset = shape.patch_row(0, ky);
                        for_blocks::<BLOCK>(run, |from, len| {
                            let w_block = &w_row[from..from + len];
                            let offset = row_offset + from;
                            scatter_block::<FUSED, BLOCK>(padded, offset, w_block, nonzero);
                        });
                    }
                }
                for (ci, dx_c) in dx.chunks_exact_mut(in_plane).enumerate() {
                    for (y, line) in dx_c.chunks_exact_mut(shape.width).enumerate() {
                        let start = shape.padded_index(y, 0) + ci;
                        let source = padded[start..].iter().step_by(shape.channels);
                        for (d, &s) in line.iter_mut().zip(source) {
                            *d = s;
                        }
                    }
                }
            }
        }
    }
}

/// Weight gradient `dw = alpha * sum over examples + beta * dw` (`dw` not read when
/// `beta == 0`), `[out, in, k, k]`, from the inputs and the output gradient. Lengths
/// were checked by the caller.
pub(super) fn weight_grad(
    geometry: &ConvGeometry,
    out_channels: usize,
    input: &[f32],
    output_grad: &[f32],
    alpha: f32,
    beta: f32,
    weight_grad: &mut [f32],
) {
    NONZERO.with_borrow_mut(|nonzero| {
        REORDERED.with_borrow_mut(|reordered| {
            PADDED.with_borrow_mut(|padded| {
                let scratch = Scratch { reordered, padded };
                #[cfg(target_arch = "x86_64")]
                {
                    type Kernel = unsafe fn(
                        &ConvGeometry,
                        usize,
                        (&[f32], &[f32]),
                        (f32, f32),
                        &mut [f32],
                        Scratch<'_>,
                        &mut Vec<(usize, f32)>,
                    );
                    if let Some(kernel) =
                        vector_kernel::<Kernel>(weight_grad_avx512, weight_grad_avx2)
                    {
                        // SAFETY: the CPU has the instruction set of the kernel chosen
                        // (checked just above).
                        unsafe {
                            kernel(
                                geometry,
                                out_channels,
                                (input, output_grad),
                                (alpha, beta),
                                weight_grad,
                                scratch,
                                nonzero,
                            )
                        };
                        return;
                    }
                }
                weight_grad_body::<false, SUM_BLOCK>(
                    geometry,
                    out_channels,
                    (input, output_grad),
                    (alpha, beta),
                    weight_grad,
                    scratch,
                    nonzero,
                );
            })
        })
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weight_grad_avx2(
    geometry: &ConvGeometry,
    out_channels: usize,
    (input, output_grad): (&[f32], &[f32]),
    scale: (f32, f32),
    weight_grad: &mut [f32],
    scratch: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    weight_grad_body::<true, SUM_BLOCK_AVX2>(
        geometry,
        out_channels,
        (input, output_grad),
        scale,
        weight_grad,
        scratch,
        nonzero,
    );
}

/// [`weight_grad_avx2`] compiled for AVX-512 (16-lane vectors); the same FMAs per
/// value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weight_grad_avx512(
    geometry: &ConvGeometry,
    out_channels: usize,
    (input, output_grad): (&[f32], &[f32]),
    scale: (f32, f32),
    weight_grad: &mut [f32],
    scratch: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    weight_grad_body::<true, SUM_BLOCK_AVX512>(
        geometry,
        out_channels,
        (input, output_grad),
        scale,
        weight_grad,
        scratch,
        nonzero,
    );
}

#[inline(always)]
fn weight_grad_body<const FUSED: bool, const BLOCK: usize>(
    geometry: &ConvGeometry,
    out_channels: usize,
    (input, output_grad): (&[f32], &[f32]),
    (alpha, beta): (f32, f32),
    weight_grad: &mut [f32],
    Scratch {
        reordered: sums,
        padded,
    }: Scratch<'_>,
    nonzero: &mut Vec<(usize, f32)>,
) {
    let shape = Shape::new(geometry);
    let (run, rows, out_plane) = (shape.run, shape.rows, shape.out_plane);
    let in_plane = shape.height * shape.width;
    {
        let sums = zeroed_aligned(sums, out_channels * rows);
        {
            for (x, dy) in input
                .chunks_exact(shape.channels * in_plane)
                .zip(output_grad.chunks_exact(out_channels * out_plane))
            {
                let padded = shape.pad_channels_last(x, padded);
                for (dy_o, sum_o) in dy.chunks_exact(out_plane).zip(sums.chunks_exact_mut(rows)) {
                    collect_nonzero(&shape, dy_o, nonzero);
                    // Each block of a kernel row's sums stays in registers across all
                    // the channel's nonzero gradients (same order as one at a time).
                    for (ky, sum_row) in sum_o.chunks_exact_mut(run).enumerate() {
                        let row_offset = shape.patch_row(0, ky);
                        for_blocks::<BLOCK>(run, |from, len| {
                            let block = &mut sum_row[from..from + len];
                            let offset = row_offset + from;
                            gather_block::<FUSED, BLOCK>(block, padded, offset, nonzero);
                        });
                    }
                }
            }
        }
        for (dst, src) in weight_grad
            .chunks_exact_mut(rows)
            .zip(sums.chunks_exact(rows))
        {
            for ci in 0..shape.channels {
                for ky in 0..shape.kernel {
                    for kx in 0..shape.kernel {
                        let sum = src[shape.reordered_index(ci, ky, kx)];
                        let d = &mut dst[shape.weight_index(ci, ky, kx)];
                        *d = if beta == 0.0 {
                            alpha * sum
                        } else {
                            alpha * sum + beta * *d
                        };
                    }
                }
            }
        }
    }
}
