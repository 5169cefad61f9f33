//! Convolution forward pass without an im2col matrix, on x86-64 with AVX2 and FMA (and
//! AVX-512 where the kernel path is `avx512`).
//!
//! Each example is copied once into a zero-padded channel-last plane (see
//! [`super::sparse_conv::Shape`]), where kernel row `ky` of an output pixel's patch is
//! one contiguous run of `kernel * in_channels` values, matching the weights reordered
//! to `[out][ky][kx][in]`. An output value is then `kernel` dot products of contiguous
//! runs, computed for blocks of 4 output channels by 3 pixels at once (12 accumulator
//! registers; each loaded lane feeds 3 or 4 FMAs). This skips writing and re-reading
//! the im2col matrix (25 times the input for a 5x5 kernel) and GEMM packing.
//!
//! On the `avx512` path a full panel is 32 channels (two 16-lane vectors) when the
//! channel count allows, else 16 (one vector), and tiles are 12 pixels wide
//! ([`row_avx512`]); each output value gets the same FMAs in the same order either way.
//!
//! Summation order is fixed, so results are reproducible; they are rounded differently
//! from the im2col + GEMM path, which the caller uses when this one declines (no AVX2,
//! or runs that are not whole lanes, such as a single-channel first layer).

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Reordered weights before they are cut into panels.
    static STAGING: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One panel's `[pixel][channel]` sums.
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Output pixels per register tile.
#[cfg(target_arch = "x86_64")]
const TILE_PIXELS: usize = 6;
/// Output channels per register tile (two lanes).
#[cfg(target_arch = "x86_64")]
const TILE_OUT: usize = 16;
/// Output channels per panel on AVX-512 when they come in whole panels of it: two
/// 16-lane vectors, so that each input value broadcast feeds two FMAs. With one vector
/// per pixel a tile loaded 13 values per 12 FMAs, more than the two 512-bit loads a
/// cycle that keep the FMAs busy; with two it loads 14 per 24.
#[cfg(target_arch = "x86_64")]
const WIDE_PANEL: usize = 32;
/// Output pixels per register tile on AVX-512, where a whole panel's `TILE_OUT` channels
/// are one vector: 12 accumulators of the 32 registers, and each weight vector loaded
/// feeds 12 FMAs.
#[cfg(target_arch = "x86_64")]
const TILE_PIXELS_512: usize = 12;

/// Whether [`forward`] takes this convolution (on this thread's kernel path).
pub(super) fn supports(geometry: &super::ConvGeometry, out_channels: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::small_gemm::{LANES, has_avx2_fma};
        geometry.kernel * geometry.in_channels >= LANES
            && out_channels.is_multiple_of(LANES)
            && out_channels > 0
            && has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (geometry, out_channels);
        false
    }
}

/// A convolution layer's shape and parameters.
pub(super) struct Layer<'a> {
    pub geometry: &'a super::ConvGeometry,
    pub out_channels: usize,
    /// One value per output channel.
    pub bias: &'a [f32],
    /// `[out, in, k, k]`.
    pub weight: &'a [f32],
}

/// Writes each channel's bias plus the convolution of every example of `input`
/// (`[batch, in, h, w]`) with the layer's weights to `output` (`[batch, out, plane]`,
/// overwritten). Returns whether it did (untouched if not); lengths were checked by the
/// caller.
pub(super) fn forward(layer: &Layer<'_>, input: &[f32], output: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::sparse_conv::{PADDED, REORDERED, Scratch};
        if !supports(layer.geometry, layer.out_channels) {
            return false;
        }
        REORDERED.with_borrow_mut(|reordered| {
            PADDED.with_borrow_mut(|padded| {
                let scratch = Scratch { reordered, padded };
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { forward_avx2(layer, input, output, scratch) };
            })
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (layer, input, output);
        false
    }
}

/// Output channels per panel of weights: [`WIDE_PANEL`] on AVX-512 when they come in
/// whole panels of it, else [`TILE_OUT`].
#[cfg(target_arch = "x86_64")]
fn panel_width(out_channels: usize) -> usize {
    match super::dispatch::avx512f() && out_channels.is_multiple_of(WIDE_PANEL) {
        true => WIDE_PANEL,
        false => TILE_OUT,
    }
}

/// The weights as panels of `panel_width` output channels (with [`TILE_OUT`], the last
/// one `LANES` wide when `out_channels` is an odd number of lanes): the panel of
/// channels `o..o + width`
/// starts at `o * rows` and holds, for each `(ky, kx, in)` in order, `width` values.
#[cfg(target_arch = "x86_64")]
fn panel_weights<'a>(
    shape: &super::sparse_conv::Shape,
    out_channels: usize,
    panel_width: usize,
    weight: &[f32],
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    let rows = shape.rows;
    let panels = super::sparse_conv::zeroed_aligned(buffer, out_channels * rows);
    // `[out][ky][kx][in]` first, then transposed panel by panel.
    STAGING.with_borrow_mut(|staging| {
        let reordered = shape.reorder_weights(weight, staging);
        fill_panels(out_channels, rows, panel_width, reordered, panels);
    });
    panels
}

/// Transposes `[out][rows]` weights into panels (see [`panel_weights`]).
#[cfg(target_arch = "x86_64")]
fn fill_panels(
    out_channels: usize,
    rows: usize,
    panel_width: usize,
    reordered: &[f32],
    panels: &mut [f32],
) {
    let mut o = 0;
    while o < out_channels {
        let width = (out_channels - o).min(panel_width);
        let panel = &mut panels[o * rows..(o + width) * rows];
        for (e, dst) in panel.chunks_exact_mut(width).enumerate() {
            for (c, value) in dst.iter_mut().enumerate() {
                *value = reordered[(o + c) * rows + e];
            }
        }
        o += width;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_avx2(
    layer: &Layer<'_>,
    input: &[f32],
    output: &mut [f32],
    super::sparse_conv::Scratch { reordered, padded }: super::sparse_conv::Scratch<'_>,
) {
    let shape = super::sparse_conv::Shape::new(layer.geometry);
    let panel_width = panel_width(layer.out_channels);
    let panels = panel_weights(
        &shape,
        layer.out_channels,
        panel_width,
        layer.weight,
        reordered,
    );
    SUMS.with_borrow_mut(|sums_buffer| {
        sums_buffer.resize(shape.out_plane * panel_width, 0.0);
        forward_examples(&shape, layer, panels, input, output, padded, sums_buffer);
    });
}

/// [`forward_avx2`] after the weights are in panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_examples(
    shape: &super::sparse_conv::Shape,
    layer: &Layer<'_>,
    panels: &[f32],
    input: &[f32],
    output: &mut [f32],
    padded: &mut Vec<f32>,
    sums_buffer: &mut [f32],
) {
    let shape = *shape;
    let out_channels = layer.out_channels;
    let panel_width = panel_width(out_channels);
    let out_len = out_channels * shape.out_plane;
    let avx512 = super::dispatch::avx512f();
    for (x, y) in input
        .chunks_exact(shape.input_len())
        .zip(output.chunks_exact_mut(out_len))
    {
        let padded = shape.pad_channels_last(x, padded);
        let mut o = 0;
        while o < out_channels {
            let width = (out_channels - o).min(panel_width);
            let panel = &panels[o * shape.rows..(o + width) * shape.rows];
            // `[pixel][channel]` sums of this panel, kernel row by kernel row so that
            // row's weights (`run * width` values) stay in L1 across all pixels.
            let sums = &mut sums_buffer[..shape.out_plane * width];
            sums.fill(0.0);
            for (ky, panel_rows) in panel.chunks_exact(shape.run * width).enumerate() {
                if avx512 && width == WIDE_PANEL {
                    // SAFETY: the CPU supports AVX-512F (checked above).
                    unsafe { row_avx512::<2>(&shape, panel_rows, padded, ky, sums) };
                    continue;
                }
                if avx512 && width == TILE_OUT {
                    // SAFETY: the CPU supports AVX-512F (checked above).
                    unsafe { row_avx512::<1>(&shape, panel_rows, padded, ky, sums) };
                    continue;
                }
                let mut p = 0;
                while p < shape.out_plane {
                    let np = (shape.out_plane - p).min(TILE_PIXELS);
                    let tile_sums = &mut sums[p * width..(p + np) * width];
                    macro_rules! tile {
                        ($np:literal) => {
                            if width == TILE_OUT {
                                tile::<$np, 2>(&shape, panel_rows, padded, ky, p, tile_sums)
                            } else {
                                tile::<$np, 1>(&shape, panel_rows, padded, ky, p, tile_sums)
                            }
                        };
                    }
                    match np {
                        6 => tile!(6),
                        5 => tile!(5),
                        4 => tile!(4),
                        3 => tile!(3),
                        2 => tile!(2),
                        _ => tile!(1),
                    }
                    p += np;
                }
            }
            let bias = &layer.bias[o..o + width];
            for (c, (y_c, &b)) in y[o * shape.out_plane..(o + width) * shape.out_plane]
                .chunks_exact_mut(shape.out_plane)
                .zip(bias)
                .enumerate()
            {
                for (out, pixel) in y_c.iter_mut().zip(sums.chunks_exact(width)) {
                    *out = b + pixel[c];
                }
            }
            o += width;
        }
    }
}

/// Kernel row `ky`'s share of every output pixel for a full panel of `NV` 16-lane vectors
/// of channels ([`TILE_OUT`] or [`WIDE_PANEL`]) on AVX-512, in tiles of
/// [`TILE_PIXELS_512`] pixels: per output value, the same FMAs in the same order as
/// [`tile`], so both paths give identical sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_avx512<const NV: usize>(
    shape: &super::sparse_conv::Shape,
    panel_rows: &[f32],
    padded: &[f32],
    ky: usize,
    sums: &mut [f32],
) {
    let mut p = 0;
    while p < shape.out_plane {
        let np = (shape.out_plane - p).min(TILE_PIXELS_512);
        let tile_sums = &mut sums[p * NV * 16..(p + np) * NV * 16];
        macro_rules! tile {
            ($np:literal) => {
                tile_avx512::<$np, NV>(shape, panel_rows, padded, ky, p, tile_sums)
            };
        }
        match np {
            12 => tile!(12),
            11 => tile!(11),
            10 => tile!(10),
            9 => tile!(9),
            8 => tile!(8),
            7 => tile!(7),
            6 => tile!(6),
            5 => tile!(5),
            4 => tile!(4),
            3 => tile!(3),
            2 => tile!(2),
            _ => tile!(1),
        }
        p += np;
    }
}

/// [`tile`] for a full panel on AVX-512: `NP` pixels by `NV` 16-lane vectors of channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn tile_avx512<const NP: usize, const NV: usize>(
    shape: &super::sparse_conv::Shape,
    panel_rows: &[f32],
    padded: &[f32],
    ky: usize,
    p: usize,
    sums: &mut [f32],
) {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_storeu_ps};
    let run = shape.run;
    let (sum_vectors, _) = sums.as_chunks_mut::<TILE_OUT>();
    let mut acc = [[_mm512_set1_ps(0.0); NV]; NP];
    for (acc_j, sums_j) in acc.iter_mut().zip(sum_vectors.chunks_exact(NV)) {
        for (a, sum) in acc_j.iter_mut().zip(sums_j) {
            // SAFETY: `sum` is 16 readable f32 values; the load is unaligned.
            *a = unsafe { _mm512_loadu_ps(sum.as_ptr()) };
        }
    }
    let mut x: [&[f32]; NP] = [&[]; NP];
    for (j, values) in x.iter_mut().enumerate() {
        let start = shape.patch_row(p + j, ky);
        *values = &padded[start..start + run];
    }
    let (rows, _) = panel_rows.as_chunks::<TILE_OUT>();
    for (t, row) in rows.chunks_exact(NV).enumerate() {
        let mut w = [_mm512_set1_ps(0.0); NV];
        for (w, lane) in w.iter_mut().zip(row) {
            // SAFETY: `lane` is 16 readable f32 values; the load is unaligned.
            *w = unsafe { _mm512_loadu_ps(lane.as_ptr()) };
        }
        for (acc_j, values) in acc.iter_mut().zip(&x) {
            let xb = _mm512_set1_ps(values[t]);
            for (a, &wv) in acc_j.iter_mut().zip(&w) {
                *a = _mm512_fmadd_ps(xb, wv, *a);
            }
        }
    }
    for (acc_j, sums_j) in acc.iter().zip(sum_vectors.chunks_exact_mut(NV)) {
        for (a, sum) in acc_j.iter().zip(sums_j) {
            // SAFETY: `sum` is 16 writable f32 values; the store is unaligned.
            unsafe { _mm512_storeu_ps(sum.as_mut_ptr(), *a) };
        }
    }
}

/// Adds kernel row `ky`'s share of the outputs at pixels `p..p + NP` (for the panel's
/// `8 * NV` channels) to `sums` (`[pixel][channel]`): for every patch value, one
/// broadcast per pixel and one FMA per pixel and lane of weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn tile<const NP: usize, const NV: usize>(
    shape: &super::sparse_conv::Shape,
    panel_rows: &[f32],
    padded: &[f32],
    ky: usize,
    p: usize,
    sums: &mut [f32],
) {
    use super::small_gemm::{LANES, Lane, load};
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps};
    let run = shape.run;
    let width = NV * LANES;
    let mut acc = [[_mm256_setzero_ps(); NV]; NP];
    let (sum_lanes, _) = sums.as_chunks_mut::<LANES>();
    for (j, acc_j) in acc.iter_mut().enumerate() {
        for (v, a) in acc_j.iter_mut().enumerate() {
            *a = load(&sum_lanes[j * NV + v]);
        }
    }
    let mut x: [&[f32]; NP] = [&[]; NP];
    for (j, values) in x.iter_mut().enumerate() {
        let start = shape.patch_row(p + j, ky);
        *values = &padded[start..start + run];
    }
    for (t, row) in panel_rows.chunks_exact(width).enumerate() {
        let lanes: &[Lane] = row.as_chunks::<LANES>().0;
        let mut w = [_mm256_setzero_ps(); NV];
        for (value, lane) in w.iter_mut().zip(lanes) {
            *value = load(lane);
        }
        for (acc_j, values) in acc.iter_mut().zip(&x) {
            let xb = _mm256_set1_ps(values[t]);
            for (a, &wv) in acc_j.iter_mut().zip(&w) {
                *a = _mm256_fmadd_ps(xb, wv, *a);
            }
        }
    }
    for (j, acc_j) in acc.iter().enumerate() {
        for (v, &a) in acc_j.iter().enumerate() {
            let lane = &mut sum_lanes[j * NV + v];
            // SAFETY: `lane` is 8 writable f32 values; the store is unaligned.
            unsafe { _mm256_storeu_ps(lane.as_mut_ptr(), a) };
        }
    }
}
