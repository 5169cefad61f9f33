//! The dense layers' three matrix products (see [`super::small_gemm`] for the shapes and
//! why they stream their operands instead of packing them), written once against pulp's
//! [`Simd`] trait and instantiated per instruction set at run time: AVX2+FMA (8 lanes),
//! AVX-512 (16 lanes) and NEON (4 lanes). Register tiles are sized for AVX2's 16
//! registers (6 rows x 2 vectors of C for the gradients, 3 x 4 dot products for the
//! forward pass), which NEON keeps; AVX-512's 32 take 12 x 2 and 4 x 6 ([`wide`]).
//!
//! Everything below [`Product::with_simd`] is `#[inline(always)]`: pulp compiles the body
//! once per instruction set inside a function that enables it, and only inlined code
//! inherits those target features.

use pulp::{MemMask, Simd, WithSimd};

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

/// Most values of each row summed per pass of [`dot_rows`]: a tile's 6 rows of B of
/// 1,024 values are 24 KB, which stay in L1 while A's rows stream past (the CNN's dense
/// layer has rows of 3,136).
const DOT_BLOCK_DEPTH: usize = 1024;

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
            Kind::ScaleRows => scale_rows(simd, gemm, BLayout::Rows, a, b, c),
            Kind::RankUpdate => rank_update(simd, gemm, lda, a, b, c),
        }
    }
}

/// The input gradient's product over an operand packed in strips
/// ([`super::small_gemm::pack_strips`]): the dense forward of many rows on `avx512`, and
/// of a frozen weight on `avx2` too.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // run on x86-64 only
pub(super) struct StripProduct<'a> {
    pub gemm: &'a Gemm,
    pub a: &'a [f32],
    pub packed: &'a [f32],
    pub c: &'a mut [f32],
}

impl WithSimd for StripProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let StripProduct { gemm, a, packed, c } = self;
        scale_rows(simd, gemm, BLayout::Strips, a, packed, c);
    }
}

/// Rows of C per register tile with AVX-512's 32 registers: 12 rows x 2 vectors is 24
/// accumulators plus 2 vectors of B and a broadcast (twice [`TILE_ROWS`], so every
/// coefficient broadcast feeds twice as many FMAs per vector of B loaded).
const WIDE_TILE_ROWS: usize = 12;

/// Runs `$body` over C's rows in tiles of [`WIDE_TILE_ROWS`] rows when `$wide` (the
/// instruction set has 32 vector registers), then of [`TILE_ROWS`] rows, then one tile
/// of the remaining rows, with `$i` the tile's first row and `$rows` its (constant)
/// height.
macro_rules! row_tiles {
    ($m:expr, $wide:expr, |$i:ident, $rows:ident| $body:expr) => {{
        let m = $m;
        let mut $i = 0;
        if $wide {
            while $i + WIDE_TILE_ROWS <= m {
                {
                    const $rows: usize = WIDE_TILE_ROWS;
                    $body;
                }
                $i += WIDE_TILE_ROWS;
            }
        }
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

/// Whether `S` has 32 vector registers for the wide tiles: AVX-512 (16 lanes). NEON has
/// 32 too but is untimed, so it keeps the AVX2 shapes.
#[inline(always)]
fn wide<S: Simd>() -> bool {
    S::F32_LANES == 16
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

/// The first `values.len() < lanes` values as a vector with zeros after them: a masked
/// load. pulp's own `partial_load_f32s` makes it a call to an out-of-line stub (through
/// the function pointer its `MemMask` carries on x86-64), which cost more than the FMAs
/// of a 2NN layer's `k % 16` tail; a `MemMask` made from the bare lane mask loads inline.
#[inline(always)]
fn partial_load<S: Simd>(simd: S, values: &[f32]) -> S::f32s {
    debug_assert!(values.len() < S::F32_LANES);
    let mask = MemMask::new(simd.mask_between_m32s(0, values.len() as u32).mask());
    // SAFETY: the mask enables the first `values.len()` lanes, all inside `values`;
    // masked-off lanes are not read.
    unsafe { simd.mask_load_ptr_f32s(mask, values.as_ptr()) }
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
/// Blocks of rows of B (streamed from memory once per block of A's rows) against a few
/// rows of A at a time (in cache): 3 x 4 dot products (12 accumulators) within AVX2's 16
/// registers, 4 x 6 (24) with AVX-512's 32, which loads a third fewer vectors per FMA.
#[inline(always)]
fn dot_rows<S: Simd>(simd: S, gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (tile_rows, tile_cols) = if wide::<S>() { (4, 6) } else { (3, 4) };
    let Gemm { m, n, k, alpha, .. } = *gemm;
    // Long rows are summed in equal blocks of at most DOT_BLOCK_DEPTH values, so that the
    // tile's rows of B stay in L1; every block after the first adds to C.
    let depth_blocks = k.div_ceil(DOT_BLOCK_DEPTH);
    let depth = k.div_ceil(depth_blocks);
    for depth_start in (0..k).step_by(depth) {
        let depth_end = (depth_start + depth).min(k);
        let beta = if depth_start == 0 { gemm.beta } else { 1.0 };
        for rows in (0..m).step_by(DOT_BLOCK_ROWS) {
            let rows_end = (rows + DOT_BLOCK_ROWS).min(m);
            let mut j = 0;
            while j < n {
                let nj = (n - j).min(tile_cols);
                let mut i = rows;
                while i < rows_end {
                    let mi = (rows_end - i).min(tile_rows);
                    macro_rules! block {
                        ($mi:literal, $nj:literal) => {{
                            let mut a_rows: [&[f32]; $mi] = [&[]; $mi];
                            for (r, row) in a_rows.iter_mut().enumerate() {
                                *row = &a[(i + r) * k + depth_start..(i + r) * k + depth_end];
                            }
                            let mut b_rows: [&[f32]; $nj] = [&[]; $nj];
                            for (s, row) in b_rows.iter_mut().enumerate() {
                                *row = &b[(j + s) * k + depth_start..(j + s) * k + depth_end];
                            }
                            let sums = dot_block::<S, $mi, $nj>(
                                simd,
                                a_rows,
                                b_rows,
                                depth_end - depth_start,
                            );
                            for (r, row) in sums.iter().enumerate() {
                                for (s, &sum) in row.iter().enumerate() {
                                    finish(&mut c[(i + r) * n + j + s], sum, alpha, beta);
                                }
                            }
                        }};
                    }
                    macro_rules! shapes {
                    ($(($r:literal, $s:literal)),*) => {
                        match (mi, nj) {
                            $(($r, $s) => block!($r, $s),)*
                            _ => unreachable!("tiles are at most 4 x 6"),
                        }
                    };
                }
                    shapes!(
                        (4, 6),
                        (4, 5),
                        (4, 4),
                        (4, 3),
                        (4, 2),
                        (4, 1),
                        (3, 6),
                        (3, 5),
                        (3, 4),
                        (3, 3),
                        (3, 2),
                        (3, 1),
                        (2, 6),
                        (2, 5),
                        (2, 4),
                        (2, 3),
                        (2, 2),
                        (2, 1),
                        (1, 6),
                        (1, 5),
                        (1, 4),
                        (1, 3),
                        (1, 2),
                        (1, 1)
                    );
                    i += mi;
                }
                j += nj;
            }
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
            av[i] = partial_load(simd, &a[i][whole..k]);
        }
        for j in 0..NJ {
            let bv = partial_load(simd, &b[j][whole..k]);
            for i in 0..MI {
                acc[i][j] = simd.mul_add_f32s(av[i], bv, acc[i][j]);
            }
        }
    }
    let mut sums = [[0.0f32; NJ]; MI];
    for i in 0..MI {
        for first in (0..NJ).step_by(4) {
            let count = (NJ - first).min(4);
            let mut four = [zero; 4];
            four[..count].copy_from_slice(&acc[i][first..first + count]);
            sums[i][first..first + count].copy_from_slice(&reduce_sum4(simd, four)[..count]);
        }
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
fn scale_rows<S: Simd>(simd: S, gemm: &Gemm, layout: BLayout, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, .. } = *gemm;
    let rows = Coefficients {
        row_step: k,
        depth_step: 1,
    };
    let lanes = S::F32_LANES;
    debug_assert!(matches!(layout, BLayout::Rows) || STRIP_COLUMNS.is_multiple_of(2 * lanes));
    let pairs = n / (2 * lanes) * (2 * lanes);
    let width = 2 * lanes;
    let copy_panels = matches!(layout, BLayout::Rows)
        && m > if wide::<S>() {
            WIDE_TILE_ROWS
        } else {
            TILE_ROWS
        }
        && k * n >= COPIED_PANEL_MIN_B
        && k <= COPIED_PANEL_MAX_DEPTH;
    if copy_panels {
        // Each panel of B is `k` rows of `width` values a whole row of B apart: a page
        // apart for the CNN's 3,136-wide weight, so every row tile read it through a
        // TLB miss per row, and it was the slowest of the dense products. Copied once
        // into a contiguous buffer, the row tiles read it as one stream (the same FMAs
        // in the same order: the same bits).
        // Taken out of the thread-local rather than used inside `with`: a closure is a
        // function of its own, without the target features that pulp enables here.
        let mut buffer = PANEL.with_borrow_mut(std::mem::take);
        if buffer.len() < k * width {
            buffer.resize(k * width, 0.0);
        }
        {
            let panel_copy = &mut buffer[..k * width];
            for start in (0..pairs).step_by(width) {
                for (dst, src) in panel_copy.chunks_exact_mut(width).zip(b[start..].chunks(n)) {
                    dst.copy_from_slice(&src[..width]);
                }
                let panel_copy = &*panel_copy;
                row_tiles!(m, wide::<S>(), |i, R| broadcast_tile::<S, R, 2>(
                    simd,
                    gemm,
                    rows,
                    a,
                    panel_copy,
                    (0, width),
                    c,
                    i,
                    start
                ));
            }
        }
        PANEL.with_borrow_mut(|kept| *kept = buffer);
    } else {
        for start in (0..pairs).step_by(width) {
            let panel = layout.panel(gemm, start);
            row_tiles!(m, wide::<S>(), |i, R| broadcast_tile::<S, R, 2>(
                simd, gemm, rows, a, b, panel, c, i, start
            ));
        }
    }
    broadcast_tail(simd, gemm, rows, layout, a, b, c, pairs);
}

/// Smallest B (in values) whose panels [`scale_rows`] copies: below it (the 2NN's 200 x
/// 200 and 784 x 200 weights) B stays in L2 and its rows are close enough to read in
/// place.
const COPIED_PANEL_MIN_B: usize = 1 << 18;
/// Deepest B whose panels [`scale_rows`] copies: a panel of `k` rows of two AVX-512
/// vectors is `128 * k` bytes, which should stay in L2 while the row tiles pass over it.
const COPIED_PANEL_MAX_DEPTH: usize = 4096;

thread_local! {
    /// One panel of B for [`scale_rows`], on the calling thread (grown, never shrunk:
    /// at most 512 KB).
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Columns per strip of a [`BLayout::Strips`] operand: AVX-512's two vectors, the width
/// of [`broadcast_tile`]'s tiles on the one path that packs B.
pub(super) const STRIP_COLUMNS: usize = 32;

/// How B (`k x n`) is stored.
#[derive(Clone, Copy)]
enum BLayout {
    /// Row-major: value `(p, col)` at `p * n + col`.
    Rows,
    /// In strips of [`STRIP_COLUMNS`] columns (the last one narrower), each row-major and
    /// contiguous, the strip from column `s` at `s * k`: every row tile reads its strip
    /// as one sequential stream ([`super::small_gemm::pack_strips`] writes it).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // packed on x86-64 only
    Strips,
}

impl BLayout {
    /// Where the columns from `start` lie: `(offset of row 0, distance between rows)`.
    #[inline(always)]
    fn panel(self, gemm: &Gemm, start: usize) -> (usize, usize) {
        match self {
            BLayout::Rows => (start, gemm.n),
            BLayout::Strips => {
                let strip = start / STRIP_COLUMNS * STRIP_COLUMNS;
                let width = (gemm.n - strip).min(STRIP_COLUMNS);
                (strip * gemm.k + (start - strip), width)
            }
        }
    }
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
        row_tiles!(m, wide::<S>(), |i, R| {
            for start in (block..end).step_by(2 * lanes) {
                let panel = BLayout::Rows.panel(gemm, start);
                broadcast_tile::<S, R, 2>(simd, gemm, transposed, a, b, panel, c, i, start);
            }
        });
    }
    broadcast_tail(simd, gemm, transposed, BLayout::Rows, a, b, c, pairs);
}

/// The columns of C from `from` on that pairs of vectors do not cover: one vector at a
/// time, then the last columns as one partial vector (shared by both broadcast products).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn broadcast_tail<S: Simd>(
    simd: S,
    gemm: &Gemm,
    coefficients: Coefficients,
    layout: BLayout,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    from: usize,
) {
    let Gemm { m, n, .. } = *gemm;
    let lanes = S::F32_LANES;
    let vectors = n / lanes * lanes;
    for start in (from..vectors).step_by(lanes) {
        let panel = layout.panel(gemm, start);
        row_tiles!(m, wide::<S>(), |i, R| broadcast_tile::<S, R, 1>(
            simd,
            gemm,
            coefficients,
            a,
            b,
            panel,
            c,
            i,
            start
        ));
    }
    if vectors < n {
        // The last n % lanes columns as one zero-padded vector (masked loads and stores
        // on AVX-512): with 16 lanes the 2NN's n = 200 leaves 8 columns, which one at a
        // time, down strided columns of B, cost as much as the other 192.
        let panel = layout.panel(gemm, vectors);
        row_tiles!(m, wide::<S>(), |i, R| partial_tile::<S, R>(
            simd,
            gemm,
            coefficients,
            a,
            b,
            panel,
            c,
            i,
            vectors
        ));
    }
}

/// [`broadcast_tile`] for the last `n - start < lanes` columns of C: one partial vector
/// per row, read through [`partial_load`] and written through
/// [`Simd::partial_store_f32s`] (once per row).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn partial_tile<S: Simd, const R: usize>(
    simd: S,
    gemm: &Gemm,
    coefficients: Coefficients,
    a: &[f32],
    b: &[f32],
    (b_offset, b_step): (usize, usize),
    c: &mut [f32],
    i: usize,
    start: usize,
) {
    let Gemm {
        n, k, alpha, beta, ..
    } = *gemm;
    let Coefficients {
        row_step,
        depth_step,
    } = coefficients;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [zero; R];
    let width = n - start;
    for p in 0..k {
        let bv = partial_load(simd, &b[b_offset + p * b_step..][..width]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let s = simd.splat_f32s(a[(i + r) * row_step + p * depth_step]);
            *acc = simd.mul_add_f32s(s, bv, *acc);
        }
    }
    for (r, &acc) in acc.iter().enumerate() {
        let out = &mut c[(i + r) * n + start..(i + r + 1) * n];
        let mut value = if beta == 0.0 {
            zero
        } else {
            partial_load(simd, out)
        };
        finish_vector(simd, &mut value, acc, alpha, beta);
        simd.partial_store_f32s(out, value);
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
/// are constants so that the loops unroll into them), summed over all `k` rows of B
/// (row `p` of the panel at `b_offset + p * b_step`), each scaled by a broadcast
/// coefficient from A.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn broadcast_tile<S: Simd, const R: usize, const L: usize>(
    simd: S,
    gemm: &Gemm,
    coefficients: Coefficients,
    a: &[f32],
    b: &[f32],
    (b_offset, b_step): (usize, usize),
    c: &mut [f32],
    i: usize,
    start: usize,
) {
    let k = gemm.k;
    let Coefficients {
        row_step,
        depth_step,
    } = coefficients;
    let lanes = S::F32_LANES;
    let width = L * lanes;
    // Every read below is in bounds: the last row of B read ends at `b_end`, the last
    // coefficient is at `a_last`. Checked once here rather than per FMA: with a bounds
    // check per coefficient LLVM spilled accumulators of the 12-row tile on every step.
    let b_end = b_offset + (k - 1) * b_step + width;
    let a_last = (i + R - 1) * row_step + (k - 1) * depth_step;
    assert!(k > 0 && b_end <= b.len() && a_last < a.len());
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; L]; R];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..k {
        // SAFETY: `b_offset + p * b_step + width <= b_end <= b.len()` for `p < k`, so
        // the `L` vectors from there are inside `b`; unaligned reads of plain f32s.
        let row = unsafe { b.add(b_offset + p * b_step) };
        let mut bv = [zero; L];
        for (l, value) in bv.iter_mut().enumerate() {
            *value = unsafe { row.add(l * lanes).cast::<S::f32s>().read_unaligned() };
        }
        // SAFETY: `(i + r) * row_step + p * depth_step <= a_last < a.len()` for `r < R`.
        let coefficients = unsafe { a.add(i * row_step + p * depth_step) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let s = simd.splat_f32s(unsafe { *coefficients.add(r * row_step) });
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = simd.mul_add_f32s(s, bv, *acc);
            }
        }
    }
    store_tile(simd, gemm, &acc, c, i, start);
}
