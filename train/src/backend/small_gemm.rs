//! Matrix products of training's dense layers (one dimension is the batch): which kernel
//! runs (the vector ones are in [`super::simd_gemm`]), the portable kernels, and the
//! small-batch fused dense backward (AVX2+FMA; compiled for AVX-512VL's 32 registers on
//! the `avx512` path).
//!
//! A general GEMM copies ("packs") both operands into cache-friendly panels on every
//! call, into a freshly allocated buffer. With a batch of 10 that copy of the weight
//! matrix costs more than the arithmetic: the FedAvg CNN's `dense0` weight is 6.4 MB,
//! packed twice per step (forward and input gradient) and then read and written again by
//! the update. These kernels read their operands where they lie instead: register tiles
//! of C (6 x 2 vectors for the input and weight gradients, 3 x 4 dot products for the
//! forward pass; 12 x 2 and 4 x 6 with AVX-512's 32 registers) over cache blocks of the
//! operands. The one copy: on `avx512` a forward of [`PACKED_FORWARD_ROWS`] or more rows
//! packs the weight transposed once per call into a per-thread buffer (allocated once),
//! to run as broadcast tiles over one sequential stream; while the parameters are frozen
//! (an evaluation, [`with_frozen_weights`]) each weight is packed once for all batches,
//! from [`FROZEN_PACKED_ROWS`] rows, on `avx2` as well.
//! They allocate nothing per training step, and at batches 64 and 256 they match or
//! beat matrixmultiply (AVX-512 kernels included) and the gemm crate on the models'
//! shapes (`bench/gemm-eval`, BENCHMARKS.md).
//!
//! Results are deterministic (fixed summation order) but rounded differently from
//! matrixmultiply's; the caller picks a path per shape, never per run.

use super::Gemm;

/// Largest batch the fused dense backward takes (above it the two products run
/// separately), and the row granule of threaded products.
pub(super) const MAX_SMALL: usize = 16;

/// Lanes per vector register (AVX2, f32).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(super) const LANES: usize = 8;

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(super) type Lane = [f32; LANES];

/// Runs `gemm` with a dense-layer kernel if one fits its shape: the vector one of the
/// kernel path in use ([`super::simd_gemm`]: AVX-512, AVX2+FMA or NEON), or the portable
/// one ([`super::dispatch`] decides); returns whether it did. Lengths were checked by the
/// caller.
pub(super) fn try_gemm(gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> bool {
    try_gemm_strided(gemm, gemm.m, a, b, c)
}

/// [`try_gemm`], where for the rank update (`trans_a` only) A's stored rows are `lda`
/// apart (`lda >= m`): C's rows `r..r + m` of a larger product are computed from
/// `&a[r..]` with `lda` the full product's `m`, so threads can share out C's rows.
pub(super) fn try_gemm_strided(
    gemm: &Gemm,
    lda: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> bool {
    let kind = match (gemm.trans_a, gemm.trans_b) {
        // Dense forward: C[batch, out] = X[batch, in] . W[out, in]^T, any batch.
        (false, true) => Kind::DotRows,
        // Dense input gradient: C[batch, in] = dY[batch, out] . W[out, in]. Any batch:
        // the kernels tile C's rows themselves.
        (false, false) => Kind::ScaleRows,
        // Dense weight gradient: C[out, in] = dY[batch, out]^T . X[batch, in]. Any
        // batch: C's tiles stay in registers over the whole batch.
        (true, false) => Kind::RankUpdate,
        _ => return false,
    };
    if gemm.m == 0 || gemm.n == 0 || gemm.k == 0 {
        return false;
    }
    if simd_product(kind, gemm, lda, a, b, c) {
        return true;
    }
    match kind {
        Kind::DotRows => portable::dot_rows(gemm, a, b, c),
        Kind::ScaleRows => portable::scale_rows(gemm, a, b, c),
        Kind::RankUpdate => portable::rank_update(gemm, lda, a, b, c),
    }
    true
}

/// Rows of C from which a dense forward on the `avx512` path packs B transposed
/// ([`pack_strips`]) and runs as the input gradient's broadcast product
/// ([`StripKernel`]) instead of as dot products: on a Xeon that product reached
/// 100-110 GFLOP/s where the 4 x 6 dot tile stopped near 80 (its horizontal sums and
/// its two streams of long rows), and the packing is a few percent of a product with
/// this many rows. Below it (federated training's batch 10) the dot products win: B is
/// read once and nothing is copied. Packing costs about a 16-lane FMA per value moved
/// per 6 rows of C, so below 48 rows (a convolution's per-example weight gradient has
/// its 32 output channels) or below one whole strip of columns it does not pay.
const PACKED_FORWARD_ROWS: usize = 48;

/// [`PACKED_FORWARD_ROWS`] for a frozen weight ([`with_frozen_weights`]), packed once
/// for a whole evaluation: with no packing to pay for, the packed product runs from a
/// few row tiles up (a two-thread evaluation's share of a batch of 64 is 32 rows). On
/// `avx2`, where packing goes one value at a time, only frozen weights are packed:
/// there the broadcast product over packed strips reached 97% of a Zen 5 core's AVX2
/// FMA peak in the 2NN's inference, against 85-90% for the 3 x 4 dot tile.
const FROZEN_PACKED_ROWS: usize = 16;

thread_local! {
    /// B packed for [`forward_packed`], on the calling thread.
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Weights packed once while their parameters are frozen ([`with_frozen_weights`]).
    static FROZEN: std::cell::RefCell<FrozenPacks> =
        const { std::cell::RefCell::new(FrozenPacks::new()) };
}

/// The packed forms of frozen weights, found by where the weight lies in the frozen
/// parameter vector and by its shape.
struct FrozenPacks {
    /// The frozen parameters' address range; empty when nothing is frozen.
    params: std::ops::Range<usize>,
    /// (offset of the weight in bytes, n, k) and its packing.
    packs: Vec<((usize, usize, usize), Vec<f32>)>,
}

impl FrozenPacks {
    const fn new() -> Self {
        FrozenPacks {
            params: 0..0,
            packs: Vec::new(),
        }
    }

    /// The key of weight `b` of a `gemm`, if it lies inside the frozen parameters.
    fn key(&self, b: &[f32], gemm: &Gemm) -> Option<(usize, usize, usize)> {
        let range = b.as_ptr_range();
        let (start, end) = (range.start as usize, range.end as usize);
        (start >= self.params.start && end <= self.params.end && start < end)
            .then(|| (start - self.params.start, gemm.n, gemm.k))
    }
}

/// Runs `work` with `params` frozen on this thread: a packed forward whose weight lies
/// in `params` packs it the first time and reuses that packing afterwards, instead of
/// packing it again for every batch of an evaluation (7% of the 2NN's inference at
/// batch 256). The shared borrow of `params` for the whole call is what makes the
/// reuse sound: nothing can change a weight while it is frozen. Nested freezes keep
/// the outer one. The packings are freed when the call returns.
pub(super) fn with_frozen_weights<R>(params: &[f32], work: impl FnOnce() -> R) -> R {
    let range = params.as_ptr_range();
    let outer = FROZEN.with_borrow_mut(|frozen| {
        if !frozen.params.is_empty() {
            return true;
        }
        frozen.params = range.start as usize..range.end as usize;
        false
    });
    if outer {
        return work();
    }
    // Unfreezes even if `work` panics, so no stale packing outlives its parameters.
    struct Thaw;
    impl Drop for Thaw {
        fn drop(&mut self) {
            // The packings are freed: an evaluation allocates them once (at most one
            // model's worth), and a thread keeps none between evaluations.
            FROZEN.with_borrow_mut(|frozen| {
                frozen.params = 0..0;
                frozen.packs = Vec::new();
            });
        }
    }
    let _thaw = Thaw;
    work()
}

/// Runs a dense forward (`C = alpha * A . B^T + beta * C`) as `A . (B^T)` with B^T packed
/// by `pack` ([`pack_strips`], on one thread or several) into a per-thread buffer,
/// handing the plain product (`trans_b` false), the packed operand and the kernel that
/// reads it to `run` (which may share C's rows out), when the shape and kernel path call
/// for it ([`PACKED_FORWARD_ROWS`]); returns whether it did. Lengths were checked by the
/// caller.
pub(super) fn forward_packed(
    gemm: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    pack: impl FnOnce(&[f32], usize, usize, &mut [f32]),
    run: impl FnOnce(&Gemm, &[f32], &[f32], &mut [f32], StripKernel),
) -> bool {
    if gemm.trans_a || !gemm.trans_b || gemm.n < super::simd_gemm::STRIP_COLUMNS || gemm.k == 0 {
        return false;
    }
    let Some(kernel) = StripKernel::on_this_path() else {
        return false;
    };
    let len = gemm.k * gemm.n;
    let frozen_key = FROZEN.with_borrow(|frozen| frozen.key(&b[..len], gemm));
    let min_rows = match frozen_key {
        Some(_) => FROZEN_PACKED_ROWS,
        None if kernel.packs_every_call() => PACKED_FORWARD_ROWS,
        None => return false,
    };
    if gemm.m < min_rows {
        return false;
    }
    let plain = Gemm {
        trans_b: false,
        ..*gemm
    };
    if let Some(key) = frozen_key {
        // The weight's packing, taken out of the cache while it is used (so nothing
        // borrows the cache meanwhile); empty the first time.
        let mut packed = FROZEN.with_borrow_mut(|frozen| {
            let at = frozen.packs.iter().position(|(k, _)| *k == key);
            at.map(|at| frozen.packs.swap_remove(at).1)
                .unwrap_or_default()
        });
        if packed.is_empty() {
            packed.resize(len, 0.0);
            pack(&b[..len], gemm.n, gemm.k, &mut packed);
        }
        run(&plain, a, &packed, c, kernel);
        FROZEN.with_borrow_mut(|frozen| frozen.packs.push((key, packed)));
        return true;
    }
    PACKED.with_borrow_mut(|buffer| {
        // Grown only, never shrunk: a model's layers of different sizes take turns here,
        // and every value read is written by the packing first.
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        let packed = &mut buffer[..len];
        pack(&b[..len], gemm.n, gemm.k, packed);
        run(&plain, a, packed, c, kernel);
    });
    true
}

/// The vector kernel over an operand packed by [`pack_strips`]: pulp's 16-lane AVX-512
/// instance, whose two-vector tiles are [`super::simd_gemm::STRIP_COLUMNS`] wide, on the
/// `avx512` path, and its 8-lane AVX2 instance (two tiles per strip) on the `avx2` path.
/// A value exists only on those paths of a CPU that has them, so the packed product has
/// no other kernel to fall back to.
#[derive(Clone, Copy)]
pub(super) enum StripKernel {
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
}

impl StripKernel {
    fn on_this_path() -> Option<StripKernel> {
        #[cfg(target_arch = "x86_64")]
        {
            use super::dispatch::{KernelPath, kernel_path};
            match kernel_path() {
                KernelPath::Avx512 => return pulp::x86::V4::try_new().map(StripKernel::Avx512),
                KernelPath::Avx2Fma => return pulp::x86::V3::try_new().map(StripKernel::Avx2),
                _ => {}
            }
        }
        None
    }

    /// Whether packing pays on every product, not only for frozen weights.
    fn packs_every_call(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self, StripKernel::Avx512(_))
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {}
    }

    /// `C = alpha * A . B + beta * C` with B (`k x n`) packed by [`pack_strips`]; `a`
    /// holds C's rows of A (`m x k`).
    pub(super) fn run(self, gemm: &Gemm, a: &[f32], packed: &[f32], c: &mut [f32]) {
        if gemm.m == 0 || gemm.n == 0 || gemm.k == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use pulp::Simd;
            let product = super::simd_gemm::StripProduct { gemm, a, packed, c };
            match self {
                StripKernel::Avx512(simd) => Simd::vectorize(simd, product),
                StripKernel::Avx2(simd) => Simd::vectorize(simd, product),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, packed, c);
            match self {}
        }
    }
}

/// Writes `b` (`n x k`, row-major: the dense weight) transposed into `dst` (`k x n`) in
/// strips of [`super::simd_gemm::STRIP_COLUMNS`] of its columns: the strip from column
/// `s`, `width` columns wide, is `k x width` row-major at `dst[s * k..]`. Whole 16 x 16
/// blocks go through registers on AVX-512 ([`transpose16_avx512`]); the edges one value
/// at a time.
pub(super) fn pack_strips(b: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    pack_strips_from(b, n, k, 0, dst);
}

/// [`pack_strips`] for the strips from column `first` (a multiple of
/// [`super::simd_gemm::STRIP_COLUMNS`]) that `dst` holds: `dst` is the packed operand
/// from `first * k` on, so threads can pack separate strips.
pub(super) fn pack_strips_from(b: &[f32], n: usize, k: usize, first: usize, dst: &mut [f32]) {
    use super::simd_gemm::STRIP_COLUMNS;
    debug_assert_eq!(first % STRIP_COLUMNS, 0);
    let end = (first + dst.len() / k).min(n);
    for strip in (first..end).step_by(STRIP_COLUMNS) {
        let width = (n - strip).min(STRIP_COLUMNS);
        let out = &mut dst[(strip - first) * k..(strip - first + width) * k];
        let (done_rows, done_depth) = pack_blocks_avx512(&b[strip * k..], k, width, out);
        for row in 0..width {
            let source = &b[(strip + row) * k..(strip + row + 1) * k];
            let depths = if row < done_rows { done_depth } else { 0 };
            for (depth, &value) in source.iter().enumerate().skip(depths) {
                out[depth * width + row] = value;
            }
        }
    }
}

/// The whole 16 x 16 blocks of one strip (`width` rows of `b`, `k` apart, into `out`)
/// through AVX-512 registers on the `avx512` path (forced to `avx2`, the packing goes
/// one value at a time, as on a CPU without AVX-512); returns how many of the strip's
/// rows and how much of their depth that covered (nothing elsewhere).
fn pack_blocks_avx512(b: &[f32], k: usize, width: usize, out: &mut [f32]) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if super::dispatch::avx512f() {
        let (rows, depth) = (width / 16 * 16, k / 16 * 16);
        for row in (0..rows).step_by(16) {
            for start in (0..depth).step_by(16) {
                // SAFETY: AVX-512F is present (checked above); rows `row..row + 16` of
                // `b` have `k >= start + 16` values each, and rows `start..start + 16` of
                // `out` (`width` apart) have `row + 16 <= width` values.
                unsafe {
                    transpose16_avx512(
                        b[row * k + start..].as_ptr(),
                        k,
                        out[start * width + row..].as_mut_ptr(),
                        width,
                    );
                }
            }
        }
        return (rows, depth);
    }
    let _ = (b, k, width, out);
    (0, 0)
}

/// Transposes one 16 x 16 block: row `r` of the source (`src + r * src_step`, 16
/// values) becomes column `r` of the destination (`dst + q * dst_step + r`).
///
/// # Safety
/// The CPU has AVX-512F; the 16 source rows and 16 destination rows of 16 values each
/// are valid for reads and writes respectively.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(src: *const f32, src_step: usize, dst: *mut f32, dst_step: usize) {
    use std::arch::x86_64::*;
    // SAFETY (for the loads and stores below): the caller's contract.
    let mut rows = [_mm512_setzero_ps(); 16];
    for (r, row) in rows.iter_mut().enumerate() {
        *row = unsafe { _mm512_loadu_ps(src.add(r * src_step)) };
    }
    // Interleave pairs of rows, then pairs of pairs (within 128-bit lanes), then swap
    // 128-bit lanes twice: the classic 16 x 16 transpose in 64 shuffles.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = _mm512_shuffle_ps::<0x44>(a, c);
        u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
        u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
    }
    let mut v = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        v[i] = _mm512_shuffle_f32x4::<0x88>(u[i], u[i + 4]);
        v[i + 4] = _mm512_shuffle_f32x4::<0xDD>(u[i], u[i + 4]);
        v[i + 8] = _mm512_shuffle_f32x4::<0x88>(u[i + 8], u[i + 12]);
        v[i + 12] = _mm512_shuffle_f32x4::<0xDD>(u[i + 8], u[i + 12]);
    }
    for i in 0..4 {
        rows[i] = _mm512_shuffle_f32x4::<0x88>(v[i], v[i + 8]);
        rows[i + 8] = _mm512_shuffle_f32x4::<0xDD>(v[i], v[i + 8]);
        rows[i + 4] = _mm512_shuffle_f32x4::<0x88>(v[i + 4], v[i + 12]);
        rows[i + 12] = _mm512_shuffle_f32x4::<0xDD>(v[i + 4], v[i + 12]);
    }
    for (q, row) in rows.iter().enumerate() {
        unsafe { _mm512_storeu_ps(dst.add(q * dst_step), *row) };
    }
}

/// The same three products in plain Rust, for the portable path: like the vector ones they
/// stream the large operand once and allocate nothing (so training allocates nothing on
/// either path), with f32 sums in a fixed order. Rounding differs from the vector kernels
/// (no fused multiply-add).
mod portable {
    use super::{Gemm, finish};

    /// Columns accumulated at once in a stack buffer.
    const STRIP: usize = 64;

    /// A dot product with 8 independent partial sums (which the compiler vectorises).
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        let mut partial = [0.0f32; 8];
        let (xs, x_tail) = x.as_chunks::<8>();
        let (ys, y_tail) = y.as_chunks::<8>();
        for (xc, yc) in xs.iter().zip(ys) {
            for l in 0..8 {
                partial[l] += xc[l] * yc[l];
            }
        }
        let mut sum = ((partial[0] + partial[4]) + (partial[2] + partial[6]))
            + ((partial[1] + partial[5]) + (partial[3] + partial[7]));
        for (a, b) in x_tail.iter().zip(y_tail) {
            sum += a * b;
        }
        sum
    }

    /// `C = alpha * A . B^T + beta * C`, A `m x k`, B `n x k`.
    pub(super) fn dot_rows(gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let Gemm {
            m,
            n,
            k,
            alpha,
            beta,
            ..
        } = *gemm;
        // Each row of B (the large operand) is read once, against every row of A.
        for (j, b_row) in b.chunks_exact(k).take(n).enumerate() {
            for (i, a_row) in a.chunks_exact(k).take(m).enumerate() {
                finish(&mut c[i * n + j], dot(a_row, b_row), alpha, beta);
            }
        }
    }

    /// `C = alpha * A . B + beta * C`, A `m x k`, B `k x n`.
    pub(super) fn scale_rows(gemm: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let Gemm {
            m,
            n,
            k,
            alpha,
            beta,
            ..
        } = *gemm;
        for start in (0..n).step_by(STRIP) {
            let width = (n - start).min(STRIP);
            for i in 0..m {
                let mut acc = [0.0f32; STRIP];
                for p in 0..k {
                    let s = a[i * k + p];
                    let row = &b[p * n + start..p * n + start + width];
                    for (sum, &value) in acc.iter_mut().zip(row) {
                        *sum += s * value;
                    }
                }
                let out = &mut c[i * n + start..i * n + start + width];
                for (value, &sum) in out.iter_mut().zip(&acc) {
                    finish(value, sum, alpha, beta);
                }
            }
        }
    }

    /// `C = alpha * A^T . B + beta * C`, A `k x m`, B `k x n`, `k` the batch.
    pub(super) fn rank_update(gemm: &Gemm, lda: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        let Gemm {
            m,
            n,
            k,
            alpha,
            beta,
            ..
        } = *gemm;
        for i in 0..m {
            for start in (0..n).step_by(STRIP) {
                let width = (n - start).min(STRIP);
                let mut acc = [0.0f32; STRIP];
                for p in 0..k {
                    let s = a[p * lda + i];
                    let row = &b[p * n + start..p * n + start + width];
                    for (sum, &value) in acc.iter_mut().zip(row) {
                        *sum += s * value;
                    }
                }
                let out = &mut c[i * n + start..i * n + start + width];
                for (value, &sum) in out.iter_mut().zip(&acc) {
                    finish(value, sum, alpha, beta);
                }
            }
        }
    }
}

/// The three dense products (see [`try_gemm_strided`]).
#[derive(Clone, Copy)]
pub(super) enum Kind {
    DotRows,
    ScaleRows,
    RankUpdate,
}

/// Runs the product with [`super::simd_gemm`]'s kernels on the vector instruction set
/// of the kernel path in use (AVX-512, AVX2+FMA or NEON); false on the portable path.
fn simd_product(kind: Kind, gemm: &Gemm, lda: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> bool {
    use super::dispatch::{KernelPath, kernel_path};
    use super::simd_gemm::Product;
    use pulp::Simd;
    let product = Product {
        kind,
        gemm,
        lda,
        a,
        b,
        c,
    };
    let path = kernel_path();
    #[cfg(target_arch = "x86_64")]
    {
        if path == KernelPath::Avx512
            && let Some(simd) = pulp::x86::V4::try_new()
        {
            Simd::vectorize(simd, product);
            return true;
        }
        // The AVX2 instance also serves AVX-512F without the rest of pulp's x86-64-v4 set.
        if matches!(path, KernelPath::Avx512 | KernelPath::Avx2Fma)
            && let Some(simd) = pulp::x86::V3::try_new()
        {
            Simd::vectorize(simd, product);
            return true;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if path == KernelPath::Neon
        && let Some(simd) = pulp::aarch64::Neon::try_new()
    {
        Simd::vectorize(simd, product);
        return true;
    }
    let _ = (path, product);
    false
}

/// Whether the AVX2+FMA kernels run: [`super::dispatch`]'s choice, which is never
/// AVX2 on a CPU without it.
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    super::dispatch::avx2_fma()
}

/// `c = alpha * sum + beta * c`, not reading `c` when `beta == 0`.
#[inline(always)]
pub(super) fn finish(c: &mut f32, sum: f32, alpha: f32, beta: f32) {
    *c = if beta == 0.0 {
        alpha * sum
    } else {
        alpha * sum + beta * *c
    };
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
    _mm256_storeu_ps,
};

/// Loads one lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn load(lane: &Lane) -> __m256 {
    // SAFETY: `lane` is 8 readable f32 values; the load is unaligned.
    unsafe { _mm256_loadu_ps(lane.as_ptr()) }
}

/// Stores one lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn store(lane: &mut Lane, value: __m256) {
    // SAFETY: `lane` is 8 writable f32 values; the store is unaligned.
    unsafe { _mm256_storeu_ps(lane.as_mut_ptr(), value) }
}

/// A fused dense backward's sizes and update coefficients.
#[derive(Clone, Copy)]
pub(super) struct FusedShape {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86-64 kernel only
    pub alpha: f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub beta: f32,
}

/// Whether [`try_fused_dense_backward`] runs for this batch on this CPU and kernel path
/// (it declines otherwise, touching nothing).
pub(super) fn fused_dense_backward_runs(batch: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        batch > 0 && batch <= MAX_SMALL && has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = batch;
        false
    }
}

/// Dense backward with an in-place weight update, in one pass over the weights (the
/// largest operand at small batches), for the weight rows `rows`: `dx [batch, in] =
/// dy [batch, out:rows] . W [rows, in]` with the weights as they were, then
/// `W[rows] = alpha * dy[:, rows]^T . x + beta * W[rows]` (W ignored when `beta == 0`).
/// `w_rows` holds just those rows and `dx` is written, not added to, so threads can
/// each take a range of rows and sum their shares of `dx` after (`0..outputs` is the
/// whole layer). Returns whether it ran (a small batch on a CPU with AVX2 and FMA);
/// lengths were checked by the caller.
pub(super) fn try_fused_dense_backward(
    shape: &FusedShape,
    rows: std::ops::Range<usize>,
    x: &[f32],
    dy: &[f32],
    w_rows: &mut [f32],
    dx: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let FusedShape {
            batch,
            inputs,
            outputs,
            ..
        } = *shape;
        if !fused_dense_backward_runs(batch)
            || inputs == 0
            || rows.start >= rows.end
            || rows.end > outputs
            || w_rows.len() != rows.len() * inputs
        {
            return false;
        }
        let fused = Fused {
            shape: *shape,
            first_row: rows.start,
            end_row: rows.end,
        };
        if super::dispatch::avx512f() && std::arch::is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU supports AVX-512F and VL (checked just above), and AVX2 and
            // FMA (checked by `fused_dense_backward_runs`).
            unsafe { fused_dense_backward_avx512(&fused, x, dy, w_rows, dx) };
        } else {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { fused_dense_backward(&fused, x, dy, w_rows, dx) };
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (shape, rows, x, dy, w_rows, dx);
        false
    }
}

#[cfg(target_arch = "x86_64")]
struct Fused {
    shape: FusedShape,
    /// The weight rows this call covers; the slice it gets starts at `first_row`.
    first_row: usize,
    end_row: usize,
}

/// Columns per step of [`fused_block`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
const FUSED_COLS: usize = 2 * LANES;

/// See [`try_fused_dense_backward`]: blocks of 4 weight rows, then single rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fused_dense_backward(shape: &Fused, x: &[f32], dy: &[f32], w: &mut [f32], dx: &mut [f32]) {
    let mut row = shape.first_row;
    while row < shape.end_row {
        if shape.end_row - row >= 4 {
            fused_block::<4>(shape, row, x, dy, w, dx);
            row += 4;
        } else {
            fused_block::<1>(shape, row, x, dy, w, dx);
            row += 1;
        }
    }
}

/// [`fused_dense_backward`] in blocks of 8 weight rows, compiled with AVX-512VL so that
/// the block's 16 vectors of weights and the rest fit in its 32 registers: each pass
/// over the batch's rows of `dx` (read and written once per block) now serves twice the
/// rows. The same FMAs in the same order per value as the 4-row blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
fn fused_dense_backward_avx512(
    shape: &Fused,
    x: &[f32],
    dy: &[f32],
    w: &mut [f32],
    dx: &mut [f32],
) {
    let mut row = shape.first_row;
    while row < shape.end_row {
        let left = shape.end_row - row;
        if left >= 8 {
            fused_block::<8>(shape, row, x, dy, w, dx);
            row += 8;
        } else if left >= 4 {
            fused_block::<4>(shape, row, x, dy, w, dx);
            row += 4;
        } else {
            fused_block::<1>(shape, row, x, dy, w, dx);
            row += 1;
        }
    }
}

/// Weight rows `row..row + R`: adds their share of `dx` (writing it at the call's first row), then
/// updates them; each strip of `FUSED_COLS` columns is loaded and stored once, with the
/// batch's rows of `dx` and `x` in cache.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn fused_block<const R: usize>(
    shape: &Fused,
    row: usize,
    x: &[f32],
    dy: &[f32],
    w: &mut [f32],
    dx: &mut [f32],
) {
    let FusedShape {
        batch,
        inputs,
        outputs,
        alpha,
        beta,
    } = shape.shape;
    let first = row == shape.first_row;
    let mut grads = [[0.0f32; R]; MAX_SMALL];
    let mut coefficients = [[0.0f32; R]; MAX_SMALL];
    for b in 0..batch {
        for r in 0..R {
            grads[b][r] = dy[b * outputs + row + r];
            coefficients[b][r] = alpha * grads[b][r];
        }
    }
    let local = row - shape.first_row;
    let rows = &mut w[local * inputs..(local + R) * inputs];
    let whole = inputs / FUSED_COLS * FUSED_COLS;
    for start in (0..whole).step_by(FUSED_COLS) {
        let mut wv = [[_mm256_setzero_ps(); 2]; R];
        for (r, value) in wv.iter_mut().enumerate() {
            let lanes = rows[r * inputs + start..][..FUSED_COLS]
                .as_chunks::<LANES>()
                .0;
            *value = [load(&lanes[0]), load(&lanes[1])];
        }
        for (b, grad) in grads.iter().enumerate().take(batch) {
            let out = dx[b * inputs + start..][..FUSED_COLS]
                .as_chunks_mut::<LANES>()
                .0;
            let mut d = if first {
                [_mm256_setzero_ps(); 2]
            } else {
                [load(&out[0]), load(&out[1])]
            };
            for r in 0..R {
                let s = _mm256_set1_ps(grad[r]);
                d[0] = _mm256_fmadd_ps(s, wv[r][0], d[0]);
                d[1] = _mm256_fmadd_ps(s, wv[r][1], d[1]);
            }
            store(&mut out[0], d[0]);
            store(&mut out[1], d[1]);
        }
        for value in wv.iter_mut() {
            for lane in value.iter_mut() {
                *lane = if beta == 0.0 {
                    _mm256_setzero_ps()
                } else {
                    _mm256_mul_ps(*lane, _mm256_set1_ps(beta))
                };
            }
        }
        for (b, coefficient) in coefficients.iter().enumerate().take(batch) {
            let lanes = x[b * inputs + start..][..FUSED_COLS].as_chunks::<LANES>().0;
            let (low, high) = (load(&lanes[0]), load(&lanes[1]));
            for r in 0..R {
                let s = _mm256_set1_ps(coefficient[r]);
                wv[r][0] = _mm256_fmadd_ps(s, low, wv[r][0]);
                wv[r][1] = _mm256_fmadd_ps(s, high, wv[r][1]);
            }
        }
        for (r, value) in wv.iter().enumerate() {
            let lanes = rows[r * inputs + start..][..FUSED_COLS]
                .as_chunks_mut::<LANES>()
                .0;
            store(&mut lanes[0], value[0]);
            store(&mut lanes[1], value[1]);
        }
    }
    // The last columns, one at a time, in the same order.
    for col in whole..inputs {
        for (b, grad) in grads.iter().enumerate().take(batch) {
            let mut d = if first { 0.0 } else { dx[b * inputs + col] };
            for (r, &g) in grad.iter().enumerate() {
                d = g.mul_add(rows[r * inputs + col], d);
            }
            dx[b * inputs + col] = d;
        }
        for r in 0..R {
            let old = rows[r * inputs + col];
            let mut value = if beta == 0.0 { 0.0 } else { old * beta };
            for (b, coefficient) in coefficients.iter().enumerate().take(batch) {
                value = coefficient[r].mul_add(x[b * inputs + col], value);
            }
            rows[r * inputs + col] = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::dispatch::{KernelPath, kernel_path_name, with_kernel_path};
    use crate::rng::seeded;
    use rand::RngExt;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = seeded(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect()
    }

    /// Runs `check` once per kernel path this CPU has (both where AVX2 is present).
    fn on_every_path(check: fn()) {
        for path in KernelPath::available() {
            with_kernel_path(path, check);
        }
    }

    /// The fused dense backward against plain f64 products, with ragged shapes.
    #[test]
    fn fused_dense_backward_matches_plain_products() {
        on_every_path(fused_dense_backward_case);
    }

    fn fused_dense_backward_case() {
        for (batch, inputs, outputs) in [(1, 1, 1), (3, 17, 5), (10, 40, 9), (16, 33, 12)] {
            for beta in [0.0, 0.9] {
                let x = random(batch * inputs, 4);
                let dy = random(batch * outputs, 5);
                let w0 = if beta == 0.0 {
                    vec![f32::NAN; outputs * inputs]
                } else {
                    random(outputs * inputs, 6)
                };
                // dx is computed from the weights before the update; with beta 0 they
                // are NaN, so check dx on finite weights.
                let w_for_dx = random(outputs * inputs, 6);
                let mut w = if beta == 0.0 {
                    w0.clone()
                } else {
                    w_for_dx.clone()
                };
                let mut dx = vec![f32::NAN; batch * inputs];
                let shape = FusedShape {
                    batch,
                    inputs,
                    outputs,
                    alpha: -0.5,
                    beta,
                };
                let ran = try_fused_dense_backward(&shape, 0..outputs, &x, &dy, &mut w, &mut dx);
                // Only the AVX2 path has a fused kernel; the portable path declines
                // and the caller runs the two products (tested below) instead.
                assert_eq!(ran, crate::backend::dispatch::avx2_fma());
                if !ran {
                    return;
                }
                let close = |actual: f32, expected: f64| {
                    (f64::from(actual) - expected).abs() < 1e-4 * (1.0 + expected.abs())
                };
                for i in 0..outputs {
                    for j in 0..inputs {
                        let mut sum = 0.0f64;
                        for b in 0..batch {
                            sum += f64::from(dy[b * outputs + i]) * f64::from(x[b * inputs + j]);
                        }
                        let mut expected = -0.5 * sum;
                        if beta != 0.0 {
                            expected += f64::from(beta) * f64::from(w_for_dx[i * inputs + j]);
                        }
                        assert!(close(w[i * inputs + j], expected), "w ({i}, {j})");
                    }
                }
                if beta != 0.0 {
                    for b in 0..batch {
                        for j in 0..inputs {
                            let mut expected = 0.0f64;
                            for i in 0..outputs {
                                expected += f64::from(dy[b * outputs + i])
                                    * f64::from(w_for_dx[i * inputs + j]);
                            }
                            assert!(close(dx[b * inputs + j], expected), "dx ({b}, {j})");
                        }
                    }
                }
            }
        }
    }

    /// Frozen weights are packed once and reused, give the same bits as packing every
    /// time, are told apart by place and shape, and are forgotten when thawed: a
    /// weight changed after the freeze is packed again.
    #[test]
    fn frozen_weights_are_packed_once_and_forgotten_when_thawed() {
        on_every_path(frozen_weights_case);
    }

    fn frozen_weights_case() {
        use crate::backend::{Backend, CpuBackend};
        let (m, k1, n1, n2) = (64, 40, 48, 33);
        // Two weights in one parameter vector (`n x k` each), and one outside it.
        let mut params = random(n1 * k1 + n2 * n1, 21);
        let outside = random(n1 * k1, 22);
        let x = random(m * k1, 23);
        let product = |n: usize, k: usize, trans_b: bool| Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
        };
        let forward = |w: &[f32], n: usize, k: usize, a: &[f32]| {
            let mut c = vec![f32::NAN; m * n];
            CpuBackend.gemm(product(n, k, true), a, w, &mut c).unwrap();
            c
        };
        /// One dense forward: weight (`n x k`), `n`, `k`, input rows.
        type Forward<'f> = &'f dyn Fn(&[f32], usize, usize, &[f32]) -> Vec<f32>;
        // Both frozen weights through `frozen_product`, and the weight outside them.
        let layers = |params: &[f32], frozen_product: Forward<'_>| {
            let (w1, w2) = params.split_at(n1 * k1);
            let h = frozen_product(w1, n1, k1, &x);
            (
                frozen_product(w2, n2, n1, &h),
                forward(&outside, n1, k1, &x),
            )
        };
        let two_layers = |params: &[f32]| layers(params, &forward);
        // What a frozen weight's product must equal bit for bit: the same weight packed
        // for this one product, where the path has the packed kernel (`avx2` packs only
        // frozen weights, so its plain product sums in another order).
        let packed_forward = |w: &[f32], n: usize, k: usize, a: &[f32]| {
            let Some(kernel) = StripKernel::on_this_path() else {
                return forward(w, n, k, a);
            };
            let mut packed = vec![f32::NAN; n * k];
            pack_strips(&w[..n * k], n, k, &mut packed);
            let mut c = vec![f32::NAN; m * n];
            kernel.run(&product(n, k, false), a, &packed, &mut c);
            c
        };
        let packed_layers = |params: &[f32]| layers(params, &packed_forward);
        let packs = || FROZEN.with_borrow(|f| f.packs.len());
        let expected = packed_layers(&params);
        let frozen = CpuBackend.with_frozen_params(&params, || {
            let runs = [two_layers(&params), two_layers(&params)];
            // Only the two weights inside the frozen vector are kept, once each, and
            // only where the packed forward runs.
            let packed_path = StripKernel::on_this_path().is_some();
            assert_eq!(packs(), if packed_path { 2 } else { 0 });
            runs
        });
        for run in &frozen {
            assert_eq!(
                run.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(run.1, expected.1);
        }
        assert_eq!(packs(), 0, "thawed");
        for v in params.iter_mut().take(n1 * k1) {
            *v *= -2.0;
        }
        let changed = CpuBackend.with_frozen_params(&params, || two_layers(&params));
        assert_eq!(changed, packed_layers(&params));
        assert_ne!(changed.0, expected.0);
    }

    /// Every kernel against a plain f64 product, over shapes with ragged edges, with
    /// beta 0 (C full of NaN, which must be ignored) and beta != 0.
    #[test]
    fn kernels_match_a_plain_product() {
        on_every_path(kernels_case);
    }

    fn kernels_case() {
        let shapes = [
            (1, 1, 1),
            (2, 5, 3),
            (3, 7, 9),
            (10, 37, 70),
            (16, 64, 33),
            (5, 33, 17),
            // More than one 256-column cache block, ragged on every edge, a 6-row tile
            // plus a 1-row one; and more than one 48-row block of the forward pass.
            (7, 300, 20),
            (50, 19, 9),
        ];
        for (m, n, k) in shapes {
            for (trans_a, trans_b) in [(false, true), (false, false), (true, false)] {
                for beta in [0.0, 0.75] {
                    let gemm = Gemm {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha: -1.5,
                        beta,
                    };
                    let a = random(m * k, 1);
                    let b = random(k * n, 2);
                    let start = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        random(m * n, 3)
                    };
                    let mut c = start.clone();
                    assert!(
                        try_gemm(&gemm, &a, &b, &mut c),
                        "{gemm:?} on {}",
                        kernel_path_name()
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let mut sum = 0.0f64;
                            for p in 0..k {
                                let x = if trans_a { a[p * m + i] } else { a[i * k + p] };
                                let y = if trans_b { b[j * k + p] } else { b[p * n + j] };
                                sum += f64::from(x) * f64::from(y);
                            }
                            let mut expected = -1.5 * sum;
                            if beta != 0.0 {
                                expected += f64::from(beta) * f64::from(start[i * n + j]);
                            }
                            let actual = f64::from(c[i * n + j]);
                            assert!(
                                (actual - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                                "{gemm:?} at ({i}, {j}) on {}: {actual} vs {expected}",
                                kernel_path_name()
                            );
                        }
                    }
                }
            }
        }
    }
}
