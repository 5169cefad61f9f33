//! The CPU backend's operations split across the intra-op pool ([`super::pool`]).
//!
//! Each function returns `false` without touching its output when the pool has one
//! thread or the work is too small to pay for waking a second one; the caller then runs
//! its single-threaded code. Splits follow examples (convolutions, pooling), rows of C in
//! whole blocks of the small-GEMM kernels (dense layers), or plain element ranges
//! (activations), so every output value is computed by the same instructions as on one
//! thread: results are bit-identical to the single-threaded ones, except the
//! convolution weight gradient, whose per-thread partial sums are added in a fixed
//! order (deterministic for a given thread count). Lengths were checked by the caller.

use std::cell::RefCell;

use super::pool::{MAX_THREADS, cpu_threads, for_each, part_len};
use super::{ConvGeometry, Gemm, PoolGeometry, direct_conv, small_gemm, sparse_conv};

/// Multiply-adds (or element operations) below which an operation stays on one thread:
/// waking a worker costs microseconds, this much work takes about 20-50 µs.
const MIN_WORK: usize = 1 << 19;
/// Multiply-adds below which a dense-layer GEMM stays on one thread: each part re-reads
/// the shared operand. With a pool that slept between operations, the 2NN's batch-10
/// layers (1.6 M) split ran at 0.7x one thread on an idle AVX2 EPYC and this was 4 M;
/// since the pool spins across the gaps ([`super::pool`]), 1 M measured best there
/// (2NN inference at batch 64: 1.15x over 4 M; batch-10 training no longer slower).
const MIN_GEMM_WORK: usize = 1 << 20;
/// Elements below which an elementwise pass stays on one thread.
const MIN_ELEMENTS: usize = 1 << 16;

thread_local! {
    /// One example's im2col matrix, per thread.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The other parts' weight-gradient sums, on the calling thread.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// [`forward_by_columns`]'s column blocks, on the calling thread.
    static COLUMN_BLOCKS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How many parts to cut `units` into for `work` operations (1: do not split).
fn parts(units: usize, work: usize) -> usize {
    let threads = cpu_threads();
    if threads < 2 || work < MIN_WORK {
        return 1;
    }
    threads.min(units).min(MAX_THREADS)
}

/// A dense GEMM's work as [`parts`] sees it: none below [`MIN_GEMM_WORK`].
fn gemm_work(macs: usize) -> usize {
    if macs < MIN_GEMM_WORK { 0 } else { macs }
}

/// Convolution forward (output overwritten with bias plus convolution): the direct
/// kernel, or the bias then im2col + GEMM per example, on each part of the batch.
pub(super) fn conv_forward(
    backend: &super::CpuBackend,
    layer: &direct_conv::Layer<'_>,
    batch: usize,
    input: &[f32],
    output: &mut [f32],
) -> bool {
    let (geometry, out_channels) = (layer.geometry, layer.out_channels);
    let (rows, plane) = (geometry.col_rows(), geometry.col_cols());
    let parts = parts(batch, batch * out_channels * rows * plane);
    if parts < 2 {
        return false;
    }
    let per = part_len(batch, parts, 1);
    let (in_len, out_len) = (geometry.input_len(), out_channels * plane);
    let chunks = input
        .chunks(per * in_len)
        .zip(output.chunks_mut(per * out_len));
    if direct_conv::supports(geometry, out_channels) {
        for_each(chunks, |(input, output)| {
            direct_conv::forward(layer, input, output);
        });
        return true;
    }
    let gemm = Gemm {
        m: out_channels,
        n: plane,
        k: rows,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 1.0,
    };
    for_each(chunks, |(input, output)| {
        COLS.with_borrow_mut(|cols| {
            cols.resize(rows * plane, 0.0);
            for (example, out) in input.chunks(in_len).zip(output.chunks_mut(out_len)) {
                for (run, &value) in out.chunks_exact_mut(plane).zip(layer.bias) {
                    run.fill(value);
                }
                // Lengths are right by construction; an error here would be a bug in
                // this function, which the single-threaded path would also report.
                let done = if geometry.is_pointwise() {
                    super::Backend::gemm(backend, gemm, layer.weight, example, out)
                } else {
                    super::Backend::im2col(backend, geometry, example, cols)
                        .and_then(|()| super::Backend::gemm(backend, gemm, layer.weight, cols, out))
                };
                debug_assert!(done.is_ok(), "{done:?}");
            }
        });
    });
    true
}

/// Sparse convolution input gradient, per part of the batch.
pub(super) fn conv_input_grad(
    geometry: &ConvGeometry,
    out_channels: usize,
    batch: usize,
    weight: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
) -> bool {
    let plane = geometry.col_cols();
    let parts = parts(
        batch,
        batch * out_channels * geometry.col_rows() * plane / 4,
    );
    if parts < 2 {
        return false;
    }
    let per = part_len(batch, parts, 1);
    let chunks = output_grad
        .chunks(per * out_channels * plane)
        .zip(input_grad.chunks_mut(per * geometry.input_len()));
    for_each(chunks, |(output_grad, input_grad)| {
        sparse_conv::input_grad(geometry, out_channels, weight, output_grad, input_grad);
    });
    true
}

/// Sparse convolution weight gradient: the first part accumulates into `weight_grad`
/// (with `beta`), the others into partial sums that are then added in part order.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_weight_grad(
    geometry: &ConvGeometry,
    out_channels: usize,
    batch: usize,
    input: &[f32],
    output_grad: &[f32],
    alpha: f32,
    beta: f32,
    weight_grad: &mut [f32],
) -> bool {
    let plane = geometry.col_cols();
    let parts = parts(
        batch,
        batch * out_channels * geometry.col_rows() * plane / 4,
    );
    if parts < 2 {
        return false;
    }
    let per = part_len(batch, parts, 1);
    let items = input
        .chunks(per * geometry.input_len())
        .zip(output_grad.chunks(per * out_channels * plane));
    summed_in_parts(
        weight_grad,
        batch.div_ceil(per),
        items,
        |part, (input, output_grad), target| {
            let beta = if part == 0 { beta } else { 0.0 };
            sparse_conv::weight_grad(
                geometry,
                out_channels,
                input,
                output_grad,
                alpha,
                beta,
                target,
            );
        },
    );
    true
}

/// Runs `work(part, item, target)` for each of `parts` items on the pool: part 0's
/// target is `total` itself, the others' are partial sums on the calling thread, which
/// are then added into `total` in part order (deterministic for a given thread count).
fn summed_in_parts<T: Send>(
    total: &mut [f32],
    parts: usize,
    items: impl Iterator<Item = T>,
    work: impl Fn(usize, T, &mut [f32]) + Sync,
) {
    let len = total.len();
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(parts.saturating_sub(1) * len, 0.0);
        let targets = std::iter::once(&mut *total).chain(partials.chunks_mut(len.max(1)));
        for_each(items.zip(targets).enumerate(), |(part, (item, target))| {
            work(part, item, target);
        });
        for partial in partials.chunks(len.max(1)) {
            for (sum, &value) in total.iter_mut().zip(partial) {
                *sum += value;
            }
        }
    });
}

/// A small-GEMM product split into parts of C's rows: whole 16-row blocks of the
/// "rows" kernels, or row ranges of the rank update (A's columns, read with A's stride).
/// Returns false (C untouched) for shapes the small kernels do not take.
pub(super) fn gemm(gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> bool {
    let (m, n, k) = (gemm.m, gemm.n, gemm.k);
    if m == 0 || n == 0 || k == 0 {
        return false;
    }
    match (gemm.trans_a, gemm.trans_b) {
        // A dense forward pass at a batch of one row block (federated clients train at
        // batch 10): the rows cannot be shared out, so the outputs are.
        (false, true) if m <= small_gemm::MAX_SMALL => forward_by_columns(gemm, a, b, c),
        (false, _) => by_rows(gemm, a, b, c, |sub, a, b, c| {
            small_gemm::try_gemm(sub, a, b, c);
        }),
        (true, false) => {
            // Granules of 8 rows keep the kernel's 4-row blocks whole.
            let parts = parts(m.div_ceil(8), gemm_work(m * n * k));
            if parts < 2 {
                return false;
            }
            let per = part_len(m, parts, 8);
            let items = c.chunks_mut(per * n).enumerate();
            for_each(items, |(part, c)| {
                let first = part * per;
                let sub = Gemm {
                    m: c.len() / n,
                    ..*gemm
                };
                small_gemm::try_gemm_strided(&sub, m, &a[first..], b, c);
            });
            true
        }
        (true, true) => false,
    }
}

/// A product whose rows of C depend only on the same rows of A (`trans_a` false), split
/// into parts of whole 16-row blocks of C, each computed by `kernel` (every row alike
/// whatever the split). Returns false (C untouched) when too small to split.
pub(super) fn by_rows(
    gemm: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    kernel: impl Fn(&Gemm, &[f32], &[f32], &mut [f32]) + Sync,
) -> bool {
    let (m, n, k) = (gemm.m, gemm.n, gemm.k);
    let blocks = m.div_ceil(small_gemm::MAX_SMALL);
    let parts = parts(blocks, gemm_work(m * n * k));
    if parts < 2 {
        return false;
    }
    let per = part_len(m, parts, small_gemm::MAX_SMALL);
    let chunks = a.chunks(per * k).zip(c.chunks_mut(per * n));
    for_each(chunks, |(a, c)| {
        let sub = Gemm {
            m: c.len() / n,
            ..*gemm
        };
        kernel(&sub, a, b, c);
    });
    true
}

/// [`small_gemm::pack_strips`] split into parts of whole strips (each part writes its
/// own strips), or on this thread when the weight is small.
pub(super) fn pack_strips(b: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    use super::simd_gemm::STRIP_COLUMNS;
    let strips = n.div_ceil(STRIP_COLUMNS);
    let parts = parts(strips, n * k);
    if parts < 2 {
        small_gemm::pack_strips(b, n, k, dst);
        return;
    }
    let per = part_len(strips, parts, 1) * STRIP_COLUMNS;
    for_each(dst.chunks_mut(per * k).enumerate(), |(part, out)| {
        small_gemm::pack_strips_from(b, n, k, part * per, out);
    });
}

/// C = alpha A B^T + beta C for a few rows of C, split into ranges of C's columns (rows
/// of B, contiguous). Each part computes its columns into its own contiguous block of
/// the caller's scratch (seeded from C when beta != 0); the caller then copies the
/// blocks into C. Parts are whole multiples of the dot-product kernels' 4-column
/// blocks, so every value is computed by the same instructions as on one thread.
/// Returns false, C untouched, when the product is too small to split.
fn forward_by_columns(gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> bool {
    let (m, n, k) = (gemm.m, gemm.n, gemm.k);
    let parts = parts(n.div_ceil(COLUMN_GRANULE), gemm_work(m * n * k));
    if parts < 2 {
        return false;
    }
    let per = part_len(n, parts, COLUMN_GRANULE);
    COLUMN_BLOCKS.with_borrow_mut(|scratch| {
        scratch.resize(m * n, 0.0);
        let seed: &[f32] = c;
        let items = b
            .chunks(per * k)
            .zip(scratch.chunks_mut(m * per))
            .enumerate();
        for_each(items, |(part, (b, block))| {
            let (first, width) = (part * per, b.len() / k);
            if gemm.beta != 0.0 {
                for (row, out) in block.chunks_exact_mut(width).enumerate() {
                    out.copy_from_slice(&seed[row * n + first..][..width]);
                }
            }
            let sub = Gemm { n: width, ..*gemm };
            let done = small_gemm::try_gemm(&sub, a, b, block);
            debug_assert!(done, "the small kernels take every non-empty product");
        });
        for (part, block) in scratch.chunks(m * per).enumerate() {
            let (first, width) = (part * per, block.len() / m);
            for (row, values) in block.chunks_exact(width).enumerate() {
                c[row * n + first..][..width].copy_from_slice(values);
            }
        }
    });
    true
}

/// The fused small-batch dense backward ([`small_gemm::try_fused_dense_backward`]) split
/// into ranges of weight rows, in whole 4-row kernel blocks. Each part updates its own
/// rows, bit-identical to one thread, and writes its share of the input gradient: the
/// first part straight into `dx`, the others into partial sums that are then added in
/// part order (so `dx` is deterministic for a given thread count, within rounding of
/// one thread's). Returns false, touching nothing, when the kernel would not run or the
/// work is too small to split.
pub(super) fn dense_backward_fused(
    shape: &small_gemm::FusedShape,
    x: &[f32],
    dy: &[f32],
    w: &mut [f32],
    dx: &mut [f32],
) -> bool {
    let (batch, inputs, outputs) = (shape.batch, shape.inputs, shape.outputs);
    if !small_gemm::fused_dense_backward_runs(batch) || inputs == 0 {
        return false;
    }
    let parts = parts(outputs.div_ceil(4), gemm_work(2 * batch * inputs * outputs));
    if parts < 2 {
        return false;
    }
    let per = part_len(outputs, parts, 4);
    let items = w.chunks_mut(per * inputs);
    summed_in_parts(dx, outputs.div_ceil(per), items, |part, w_rows, target| {
        let first = part * per;
        let rows = first..first + w_rows.len() / inputs;
        let ran = small_gemm::try_fused_dense_backward(shape, rows, x, dy, w_rows, target);
        debug_assert!(ran, "checked by fused_dense_backward_runs");
    });
    true
}

/// Columns per part of [`forward_by_columns`]: the forward kernels' column block.
const COLUMN_GRANULE: usize = 4;

/// An elementwise pass `op` over `x`, split into ranges.
pub(super) fn elementwise(x: &mut [f32], op: impl Fn(&mut [f32]) + Sync) -> bool {
    let parts = parts(x.len() / MIN_ELEMENTS.max(1) + 1, x.len() * 8);
    if parts < 2 || x.len() < MIN_ELEMENTS {
        return false;
    }
    let per = part_len(x.len(), parts, 64);
    for_each(x.chunks_mut(per), op);
    true
}

/// A batch's row gather (`copy` writes the rows `rows` into `dst`, `dim` values each),
/// split into ranges of rows: on one thread this copy was 8% of the 2NN's inference at
/// batch 256, and the second core waited through it.
pub(super) fn gather_rows(
    dim: usize,
    rows: &[usize],
    dst: &mut [f32],
    copy: impl Fn(&[usize], &mut [f32]) + Sync,
) -> bool {
    // A copy is cheap per element: it pays for the split from 64 KB.
    const MIN_COPY: usize = 1 << 14;
    if dim == 0 || dst.len() != rows.len() * dim || dst.len() < MIN_COPY {
        return false;
    }
    let parts = parts(rows.len(), dst.len() * (MIN_WORK / MIN_COPY));
    if parts < 2 {
        return false;
    }
    let per = part_len(rows.len(), parts, 1);
    for_each(
        rows.chunks(per).zip(dst.chunks_mut(per * dim)),
        |(rows, dst)| copy(rows, dst),
    );
    true
}

/// An elementwise pass `op(src, dst)` over equal-length slices, split into ranges.
pub(super) fn zipped(src: &[f32], dst: &mut [f32], op: impl Fn(&[f32], &mut [f32]) + Sync) -> bool {
    if src.len() != dst.len() || dst.len() < MIN_ELEMENTS {
        return false;
    }
    let parts = parts(dst.len() / MIN_ELEMENTS + 1, dst.len() * 8);
    if parts < 2 {
        return false;
    }
    let per = part_len(dst.len(), parts, 64);
    for_each(src.chunks(per).zip(dst.chunks_mut(per)), |(s, d)| op(s, d));
    true
}

/// How a pooling pass over `input_len` values splits into whole planes: the input
/// and output plane sizes and the planes per part, or `None` to stay on one thread.
fn plane_split(geometry: &PoolGeometry, input_len: usize) -> Option<(usize, usize, usize)> {
    let plane_in = geometry.in_height * geometry.in_width;
    let plane_out = geometry.out_height * geometry.out_width;
    if plane_in == 0 || plane_out == 0 || input_len < MIN_ELEMENTS {
        return None;
    }
    let count = input_len / plane_in;
    let parts = parts(count, input_len * 8);
    (parts >= 2).then(|| (plane_in, plane_out, part_len(count, parts, 1)))
}

/// A pooling pass over whole planes: `op(geometry_of_part, input, output)`.
pub(super) fn planes(
    geometry: &PoolGeometry,
    input: &[f32],
    output: &mut [f32],
    op: impl Fn(&PoolGeometry, &[f32], &mut [f32]) + Sync,
) -> bool {
    let Some((plane_in, plane_out, per)) = plane_split(geometry, input.len()) else {
        return false;
    };
    for_each(
        input
            .chunks(per * plane_in)
            .zip(output.chunks_mut(per * plane_out)),
        |(input, output)| {
            let part = geometry.with_planes(input.len() / plane_in);
            op(&part, input, output);
        },
    );
    true
}

/// [`planes`] for a pooling backward pass: `op(geometry_of_part, input, output_grad,
/// input_grad)`.
pub(super) fn planes_backward(
    geometry: &PoolGeometry,
    input: &[f32],
    output_grad: &[f32],
    input_grad: &mut [f32],
    op: impl Fn(&PoolGeometry, &[f32], &[f32], &mut [f32]) + Sync,
) -> bool {
    let Some((plane_in, plane_out, per)) = plane_split(geometry, input.len()) else {
        return false;
    };
    let items = input
        .chunks(per * plane_in)
        .zip(output_grad.chunks(per * plane_out))
        .zip(input_grad.chunks_mut(per * plane_in));
    for_each(items, |((input, output_grad), input_grad)| {
        let part = geometry.with_planes(input.len() / plane_in);
        op(&part, input, output_grad, input_grad);
    });
    true
}

/// Fills every plane of `dst` (`plane` values each, channels cycling through `bias`)
/// with its channel's bias, split into ranges of whole planes.
pub(super) fn fill_channels(bias: &[f32], plane: usize, dst: &mut [f32]) -> bool {
    if plane == 0 || bias.is_empty() || dst.len() < MIN_ELEMENTS {
        return false;
    }
    let planes = dst.len() / plane;
    let parts = parts(planes, dst.len() * 8);
    if parts < 2 {
        return false;
    }
    let per = part_len(planes, parts, 1);
    for_each(dst.chunks_mut(per * plane).enumerate(), |(part, dst)| {
        let first = part * per % bias.len();
        let channels = bias[first..].iter().chain(bias.iter().cycle());
        for (run, &value) in dst.chunks_exact_mut(plane).zip(channels) {
            run.fill(value);
        }
    });
    true
}

/// Per-channel sums over a batch (`dst[c] = beta * dst[c] + alpha * sum of channel c's
/// planes`), split into ranges of channels. Each channel adds its planes in batch order,
/// as on one thread, so the sums are bit-identical to the single-threaded ones.
pub(super) fn sum_channels(
    src: &[f32],
    plane: usize,
    alpha: f32,
    beta: f32,
    dst: &mut [f32],
) -> bool {
    let channels = dst.len();
    if plane == 0 || channels == 0 || src.len() < MIN_ELEMENTS {
        return false;
    }
    let parts = parts(channels, src.len() * 4);
    if parts < 2 {
        return false;
    }
    let per = part_len(channels, parts, 1);
    for_each(dst.chunks_mut(per).enumerate(), |(part, dst)| {
        super::cpu::scale_or_clear(dst, beta);
        let first = part * per;
        for example in src.chunks_exact(channels * plane) {
            let runs = example[first * plane..].chunks_exact(plane);
            for (total, run) in dst.iter_mut().zip(runs) {
                *total += alpha * super::cpu::run_sum(run);
            }
        }
    });
    true
}

/// One optimizer step's slices, cut into matching element ranges: the parameters, their
/// gradients, up to two per-parameter states (momentum, Adam's moments) and an anchor.
pub(super) struct ParamSlices<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub first: Option<&'a mut [f32]>,
    pub second: Option<&'a mut [f32]>,
    pub anchor: Option<&'a [f32]>,
}

/// Runs an optimizer update `op` over ranges of `slices` in parallel (every slice has
/// the parameters' length, checked by the caller). Each value's update reads and writes
/// only its own index, so results are bit-identical to one thread's. Returns the slices
/// untouched when the update is too small to split.
pub(super) fn param_update<'a>(
    slices: ParamSlices<'a>,
    op: impl Fn(ParamSlices<'_>) + Sync,
) -> Result<(), ParamSlices<'a>> {
    let len = slices.params.len();
    let parts = parts(len / MIN_ELEMENTS + 1, len * 8);
    if parts < 2 || len < MIN_ELEMENTS {
        return Err(slices);
    }
    let per = part_len(len, parts, 64);
    let ParamSlices {
        params,
        grads,
        first,
        second,
        anchor,
    } = slices;
    let mut first = first.map(|s| s.chunks_mut(per));
    let mut second = second.map(|s| s.chunks_mut(per));
    let mut anchor = anchor.map(|s| s.chunks(per));
    let items = params
        .chunks_mut(per)
        .zip(grads.chunks(per))
        .map(|(params, grads)| ParamSlices {
            params,
            grads,
            first: first.as_mut().and_then(Iterator::next),
            second: second.as_mut().and_then(Iterator::next),
            anchor: anchor.as_mut().and_then(Iterator::next),
        });
    for_each(items, op);
    Ok(())
}
