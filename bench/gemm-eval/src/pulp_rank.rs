//! The weight-gradient kernel (`C = alpha * A^T . B + beta * C`, A `k x m`, B `k x n`)
//! written once against pulp's `Simd` trait: the same 6-row x 2-vector register tiles and
//! 256-column cache blocks as fedquic-train's AVX2 `rank_update`, but the vector width
//! comes from the CPU at run time (AVX2: 8 lanes, AVX-512 with pulp's `x86-v4`: 16,
//! NEON: 4). Evaluated here against the hand-written kernel; not used by the engine.

use pulp::{Arch, Simd, WithSimd};

const TILE_ROWS: usize = 6;
const BLOCK_COLS: usize = 256;

pub struct RankUpdate<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a mut [f32],
}

impl WithSimd for RankUpdate<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let RankUpdate {
            m,
            n,
            k,
            alpha,
            beta,
            a,
            b,
            c,
        } = self;
        let lanes = S::F32_LANES;
        let pair = 2 * lanes;
        let pairs = n / pair * pair;
        for block in (0..pairs).step_by(BLOCK_COLS.max(pair)) {
            let end = (block + BLOCK_COLS.max(pair)).min(pairs);
            let mut i = 0;
            while i + TILE_ROWS <= m {
                for start in (block..end).step_by(pair) {
                    tile::<S, TILE_ROWS, 2>(simd, n, k, alpha, beta, a, m, b, c, i, start);
                }
                i += TILE_ROWS;
            }
            for r in i..m {
                for start in (block..end).step_by(pair) {
                    tile::<S, 1, 2>(simd, n, k, alpha, beta, a, m, b, c, r, start);
                }
            }
        }
        // Remaining columns, scalar (the evaluation's shapes are multiples of 16).
        for i in 0..m {
            for col in pairs..n {
                let mut sum = 0.0f32;
                for p in 0..k {
                    sum = a[p * m + i].mul_add(b[p * n + col], sum);
                }
                let out = &mut c[i * n + col];
                *out = if beta == 0.0 {
                    alpha * sum
                } else {
                    alpha * sum + beta * *out
                };
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<S: Simd, const R: usize, const L: usize>(
    simd: S,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: &mut [f32],
    i: usize,
    start: usize,
) {
    let width = L * S::F32_LANES;
    let mut acc = [[simd.splat_f32s(0.0); L]; R];
    for p in 0..k {
        let coefficients = &a[p * lda + i..p * lda + i + R];
        let (vectors, _) = S::as_simd_f32s(&b[p * n + start..p * n + start + width]);
        for r in 0..R {
            let s = simd.splat_f32s(coefficients[r]);
            for l in 0..L {
                acc[r][l] = simd.mul_add_f32s(s, vectors[l], acc[r][l]);
            }
        }
    }
    let alpha_v = simd.splat_f32s(alpha);
    let beta_v = simd.splat_f32s(beta);
    for (r, acc) in acc.iter().enumerate() {
        let out = &mut c[(i + r) * n + start..(i + r) * n + start + width];
        let (out, _) = S::as_mut_simd_f32s(out);
        for (value, &sum) in out.iter_mut().zip(acc) {
            let scaled = simd.mul_f32s(sum, alpha_v);
            *value = if beta == 0.0 {
                scaled
            } else {
                simd.mul_add_f32s(*value, beta_v, scaled)
            };
        }
    }
}

pub fn rank_update(arch: Arch, op: RankUpdate<'_>) {
    arch.dispatch(op)
}
