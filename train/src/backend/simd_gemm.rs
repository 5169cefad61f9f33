//! The dense layers' three matrix products (see [`super::small_gemm`] for the shapes and
//! why they stream their operands instead of packing them), written once against pulp's
//! [`Simd`] trait and instantiated per instruction set at run time: AVX2+FMA (8 lanes),
//! AVX-512 (16 lanes) and NEON (4 lanes). Register tiles have the same shape in vectors
//! on every instruction set (6 rows x 2 vectors of C for the gradients, 3 x 4 dot
//! products for the forward pass), so they fit AVX2's 16 registers and leave room on
//! the 32 of AVX-512 and NEON.
//!
//! Everything below [`Product::with_simd`] is `#[inline(always)]`: pulp compiles the body
//! once per instruction set inside a function that enables it, and only inlined code
//! inherits those target features.

use pulp::{Simd, WithSimd};

use super::Gemm;
use super::small_gemm::{Kind, finish};

/// Rows of C per register tile of [`scale_rows`] and [`rank_update`]: 6 rows x 2 vectors
/// is 12 accumulators, plus 2 vectors of B and a broadcast, within AVX2's 16 registers
/// (BLIS's 6x16 shape for that ISA).
const TILE_ROWS: usize = 6;

/// Columns of B per cache block of [`rank_update`] (a multiple of every ISA's two
/// vectors): 256 columns of a batch of 64 are 64 KB, which stay in L2 while every row
/// tile of C passes over them.
const BLOCK_COLS: usize = 256;

/// Rows of A per pass of [`dot_rows`] over B: 48 rows of 784 values (150 KB) stay in L2
/// while B streams past once per block.
const DOT_BLOCK_ROWS: usize = 48;

/// One product for [`pulp::Arch`]-style dispatch: `kind` names the shape (lengths were
/// checked by the caller); for the rank update A's rows are `lda` apart.
pub(super) struct Product<'a> {
    pub kind: Kind,
    pub gemm: &'a Gemm,
    pub lda: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a mut [f32],
}

impl WithSimd for Product<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Product {
            kind,
            gemm,
            lda,
            a,
            b,
            c,
        } = self;
        match kind {
            Kind::DotRows => dot_rows(simd, gemm, a, b, c),
            Kind::ScaleRows => scale_rows(simd, gemm, a, b, c),
            Kind::RankUpdate => rank_update(simd, gemm, lda, a, b, c),
        }
    }
}

/// Runs `$body` over C's rows in tiles of [`TILE_ROWS`] rows and then one tile of the
/// remaining rows, with `$i` the tile's first row and `$rows` its (constant) height.
macro_rules! row_tiles {
    ($m:expr, |$i:ident, $rows:ident| $body:expr) => {{
        let m = $m;
        let mut $i = 0;
        while $i + TILE_ROWS <= m {
            {
                const $rows: usize = TILE_ROWS;
                $body;
            }
            $i += TILE_ROWS;
        }
        match m - $i {
            5 => {
                const $rows: usize = 5;
                $body
            }
            4 => {
                const $rows: usize = 4;
                $body
            }
            3 => {
                const $rows: usize = 3;
                $body
            }
            2 => {
                const $rows: usize = 2;
                $body
            }
            1 => {
                const $rows: usize = 1;
                $body
            }
            _ => {}
        }
    }};
}

/// `out = alpha * acc + beta * out` for one vector, not reading `out` when `beta == 0`.
#[inline(always)]
fn finish_vector<S: Simd>(simd: S, out: &mut S::f32s, acc: S::f32s, alpha: f32, beta: f32) {
    let scaled = simd.mul_f32s(acc, simd.splat_f32s(alpha));
    *out = if beta == 0.0 {
        scaled
    } else {
        simd.mul_add_f32s(*out, simd.splat_f32s(beta), scaled)
    };
}

/// Writes a tile of sums to C's rows from `i`, columns from `start`:
/// `C = alpha * acc + beta * C`.
#[inline(always)]
fn store_tile<S: Simd, const R: usize, const L: usize>(
    simd: S,
    gemm: &Gemm,
    acc: &[[S::f32s; L]; R],
    c: &mut [f32],
    i: usize,
    start: usize,
) {
    let (n, width) = (gemm.n, L * S::F32_LANES);
    for (r, acc) in acc.iter().enumerate() {
        let out = &mut c[(i + r) * n + start..(i + r) * n + start + width];
        for (out, &value) in S::as_mut_simd_f32s(out).0.iter_mut().zip(acc) {
            finish_vector(simd, out, value, gemm.alpha, gemm.beta);
        }
    }
}

/// Dense forward: `C = alpha * A . B^T + beta * C`, A `m x k` (the batch), B `n x k`.
/// Blocks of 4 rows of B (streamed from memory once per block of A's rows) against 3
/// rows of A at a time (in cache): 12 accumulators.
#[inline(always)]
fn dot_rows<S: Simd>(simd: S, gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    for rows in (0..gemm.m).step_by(DOT_BLOCK_ROWS) {
        let rows_end = (rows + DOT_BLOCK_ROWS).min(gemm.m);
        let Gemm {
            n, k, alpha, beta, ..
        } = *gemm;
        let mut j = 0;
        while j < n {
            let nj = (n - j).min(4);
            let mut i = rows;
            while i < rows_end {
                let mi = (rows_end - i).min(3);
                macro_rules! block {
                    ($mi:literal, $nj:literal) => {{
                        let mut a_rows: [&[f32]; $mi] = [&[]; $mi];
                        for (r, row) in a_rows.iter_mut().enumerate() {
                            *row = &a[(i + r) * k..(i + r + 1) * k];
                        }
                        let mut b_rows: [&[f32]; $nj] = [&[]; $nj];
                        for (s, row) in b_rows.iter_mut().enumerate() {
                            *row = &b[(j + s) * k..(j + s + 1) * k];
                        }
                        let sums = dot_block::<S, $mi, $nj>(simd, a_rows, b_rows, k);
                        for (r, row) in sums.iter().enumerate() {
                            for (s, &sum) in row.iter().enumerate() {
                                finish(&mut c[(i + r) * n + j + s], sum, alpha, beta);
                            }
                        }
                    }};
                }
                match (mi, nj) {
                    (3, 4) => block!(3, 4),
                    (3, 3) => block!(3, 3),
                    (3, 2) => block!(3, 2),
                    (3, _) => block!(3, 1),
                    (2, 4) => block!(2, 4),
                    (2, 3) => block!(2, 3),
                    (2, 2) => block!(2, 2),
                    (2, _) => block!(2, 1),
                    (_, 4) => block!(1, 4),
                    (_, 3) => block!(1, 3),
                    (_, 2) => block!(1, 2),
                    _ => block!(1, 1),
                }
                i += mi;
            }
            j += nj;
        }
    }
}

/// Dot products of `MI` rows of A with `NJ` rows of B (all `k` long): one accumulator per
/// pair, A's vectors loaded first and B's one at a time (`MI * NJ + MI + 1` registers).
#[inline(always)]
fn dot_block<S: Simd, const MI: usize, const NJ: usize>(
    simd: S,
    a: [&[f32]; MI],
    b: [&[f32]; NJ],
    k: usize,
) -> [[f32; NJ]; MI] {
    let whole = k / S::F32_LANES * S::F32_LANES;
    let mut a_vectors: [&[S::f32s]; MI] = [&[]; MI];
    for (vectors, row) in a_vectors.iter_mut().zip(a) {
        *vectors = S::as_simd_f32s(&row[..whole]).0;
    }
    let mut b_vectors: [&[S::f32s]; NJ] = [&[]; NJ];
    for (vectors, row) in b_vectors.iter_mut().zip(b) {
        *vectors = S::as_simd_f32s(&row[..whole]).0;
    }
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NJ]; MI];
    for chunk in 0..whole / S::F32_LANES {
        let mut av = [zero; MI];
        for i in 0..MI {
            av[i] = a_vectors[i][chunk];
        }
        for j in 0..NJ {
            let bv = b_vectors[j][chunk];
            for i in 0..MI {
                acc[i][j] = simd.mul_add_f32s(av[i], bv, acc[i][j]);
            }
        }
    }
    if whole < k {
        // The last k % lanes values as zero-padded vectors (masked loads on AVX-512):
        // with 16 lanes the 2NN's k = 200 leaves 8, which one at a time cost as much
        // as the 12 whole vectors before them.
        let mut av = [zero; MI];
        for i in 0..MI {
            av[i] = simd.partial_load_f32s(&a[i][whole..k]);
        }
        for j in 0..NJ {
            let bv = simd.partial_load_f32s(&b[j][whole..k]);
            for i in 0..MI {
                acc[i][j] = simd.mul_add_f32s(av[i], bv, acc[i][j]);
            }
        }
    }
    let mut sums = [[0.0f32; NJ]; MI];
    for i in 0..MI {
        let mut four = [zero; 4];
        four[..NJ].copy_from_slice(&acc[i]);
        sums[i].copy_from_slice(&reduce_sum4(simd, four)[..NJ]);
    }
    sums
}

/// The lane sums of four vectors. On AVX2 three horizontal adds and one add do all four
/// at once (15-25% faster for the 2NN's forward products than four separate
/// reductions, which is all pulp offers generically); AVX-512 first adds each vector's
/// two halves. Elsewhere pulp's reduction.
///
/// No `array::map` here: a closure is compiled without the instruction set pulp enables
/// for the kernel, so the intrinsics inside it became function calls (on AVX-512, half
/// of the 2NN's inference time went to pulp's reduction called that way).
#[inline(always)]
fn reduce_sum4<S: Simd>(simd: S, values: [S::f32s; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::any::TypeId;
        use std::arch::x86_64::{__m256, __m512};
        use std::mem::transmute_copy;
        if TypeId::of::<S>() == TypeId::of::<pulp::x86::V3>() {
            // SAFETY: `S` is pulp's V3, whose `f32s` is 8 f32 in 32 bytes, the layout of
            // `__m256`; and a V3 value exists only on a CPU with AVX2, which `sums4_avx`
            // needs.
            return unsafe {
                sums4_avx([
                    transmute_copy::<S::f32s, __m256>(&values[0]),
                    transmute_copy::<S::f32s, __m256>(&values[1]),
                    transmute_copy::<S::f32s, __m256>(&values[2]),
                    transmute_copy::<S::f32s, __m256>(&values[3]),
                ])
            };
        }
        if TypeId::of::<S>() == TypeId::of::<pulp::x86::V4>() {
            // SAFETY: `S` is pulp's V4, whose `f32s` is 16 f32 in 64 bytes, the layout of
            // `__m512`; and a V4 value exists only on a CPU with AVX-512F, which
            // `sums4_avx512` needs.
            return unsafe {
                sums4_avx512([
                    transmute_copy::<S::f32s, __m512>(&values[0]),
                    transmute_copy::<S::f32s, __m512>(&values[1]),
                    transmute_copy::<S::f32s, __m512>(&values[2]),
                    transmute_copy::<S::f32s, __m512>(&values[3]),
                ])
            };
        }
    }
    [
        simd.reduce_sum_f32s(values[0]),
        simd.reduce_sum_f32s(values[1]),
        simd.reduce_sum_f32s(values[2]),
        simd.reduce_sum_f32s(values[3]),
    ]
}

/// [`reduce_sum4`] on AVX-512: each vector's two 256-bit halves added, then
/// [`sums4_avx`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn sums4_avx512(values: [std::arch::x86_64::__m512; 4]) -> [f32; 4] {
    sums4_avx([
        halves_added(values[0]),
        halves_added(values[1]),
        halves_added(values[2]),
        halves_added(values[3]),
    ])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn halves_added(value: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_castpd_ps, _mm512_castps_pd, _mm512_castps512_ps256,
        _mm512_extractf64x4_pd,
    };
    _mm256_add_ps(
        _mm512_castps512_ps256(value),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(value))),
    )
}

/// [`reduce_sum4`] on AVX: each sum pairwise in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
fn sums4_avx(values: [std::arch::x86_64::__m256; 4]) -> [f32; 4] {
    use std::arch::x86_64::{
        _mm_add_ps, _mm_storeu_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_hadd_ps,
    };
    let pairs01 = _mm256_hadd_ps(values[0], values[1]);
    let pairs23 = _mm256_hadd_ps(values[2], values[3]);
    let quads = _mm256_hadd_ps(pairs01, pairs23);
    let sums = _mm_add_ps(
        _mm256_castps256_ps128(quads),
        _mm256_extractf128_ps::<1>(quads),
    );
    let mut out = [0.0f32; 4];
    // SAFETY: `out` is 4 writable f32 values; the store is unaligned.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// Dense input gradient: `C = alpha * A . B + beta * C`, A `m x k` (the batch), B `k x n`.
/// For each strip of two vectors of columns, every row of C is a sum of B's rows scaled
/// by A's entries: B's strip stays in cache across the batch's rows, and each 6-row tile
/// of C stays in registers over all of k.
#[inline(always)]
fn scale_rows<S: Simd>(simd: S, gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, .. } = *gemm;
    let rows = Coefficients {
        row_step: k,
        depth_step: 1,
    };
    let lanes = S::F32_LANES;
    let pairs = n / (2 * lanes) * (2 * lanes);
    for start in (0..pairs).step_by(2 * lanes) {
        row_tiles!(m, |i, R| broadcast_tile::<S, R, 2>(
            simd, gemm, rows, a, b, c, i, start
        ));
    }
    broadcast_tail(simd, gemm, rows, a, b, c, pairs);
}

/// Dense weight gradient (or fused SGD update): `C = alpha * A^T . B + beta * C`, A
/// `k x m` (rows `lda` apart) and B `k x n`, with `k` the batch. Each tile of C (6 rows x
/// 2 vectors) is read and written once, accumulated in registers over the whole batch
/// from B's rows with coefficients from A; B is taken in blocks of [`BLOCK_COLS`]
/// columns that stay in cache while every row tile of C passes over them.
#[inline(always)]
fn rank_update<S: Simd>(simd: S, gemm: &Gemm, lda: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, .. } = *gemm;
    let transposed = Coefficients {
        row_step: 1,
        depth_step: lda,
    };
    let lanes = S::F32_LANES;
    let pairs = n / (2 * lanes) * (2 * lanes);
    for block in (0..pairs).step_by(BLOCK_COLS) {
        let end = (block + BLOCK_COLS).min(pairs);
        row_tiles!(m, |i, R| {
            for start in (block..end).step_by(2 * lanes) {
                broadcast_tile::<S, R, 2>(simd, gemm, transposed, a, b, c, i, start);
            }
        });
    }
    broadcast_tail(simd, gemm, transposed, a, b, c, pairs);
}

/// The columns of C from `from` on that pairs of vectors do not cover: one vector at a
/// time, then the last columns one at a time (shared by both broadcast products).
#[inline(always)]
fn broadcast_tail<S: Simd>(
    simd: S,
    gemm: &Gemm,
    coefficients: Coefficients,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    from: usize,
) {
    let Gemm {
        m,
        n,
        k,
        alpha,
        beta,
        ..
    } = *gemm;
    let lanes = S::F32_LANES;
    let vectors = n / lanes * lanes;
    for start in (from..vectors).step_by(lanes) {
        row_tiles!(m, |i, R| broadcast_tile::<S, R, 1>(
            simd,
            gemm,
            coefficients,
            a,
            b,
            c,
            i,
            start
        ));
    }
    let Coefficients {
        row_step,
        depth_step,
    } = coefficients;
    for i in 0..m {
        for col in vectors..n {
            let mut sum = 0.0f32;
            for p in 0..k {
                sum = a[i * row_step + p * depth_step].mul_add(b[p * n + col], sum);
            }
            finish(&mut c[i * n + col], sum, alpha, beta);
        }
    }
}

/// Where a product's coefficients lie in A: coefficient `(r, p)` (row `r` of C, step `p`
/// of the sum) is `a[r * row_step + p * depth_step]`. The input gradient reads A's rows
/// (`row_step = k`, `depth_step = 1`); the weight gradient reads them transposed
/// (`row_step = 1`, `depth_step = lda`).
#[derive(Clone, Copy)]
struct Coefficients {
    row_step: usize,
    depth_step: usize,
}

/// `R` rows x `L` vectors of C from row `i`, column `start`, in registers (`R` and `L`
/// are constants so that the loops unroll into them), summed over all `k` rows of B,
/// each scaled by a broadcast coefficient from A.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn broadcast_tile<S: Simd, const R: usize, const L: usize>(
    simd: S,
    gemm: &Gemm,
    coefficients: Coefficients,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    i: usize,
    start: usize,
) {
    let Gemm { n, k, .. } = *gemm;
    let Coefficients {
        row_step,
        depth_step,
    } = coefficients;
    let width = L * S::F32_LANES;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; L]; R];
    for p in 0..k {
        let vectors = S::as_simd_f32s(&b[p * n + start..p * n + start + width]).0;
        let mut bv = [zero; L];
        for (value, vector) in bv.iter_mut().zip(vectors) {
            *value = *vector;
        }
        for r in 0..R {
            let s = simd.splat_f32s(a[(i + r) * row_step + p * depth_step]);
            for l in 0..L {
                acc[r][l] = simd.mul_add_f32s(s, bv[l], acc[r][l]);
            }
        }
    }
    store_tile(simd, gemm, &acc, c, i, start);
}
