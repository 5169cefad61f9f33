//! The CPU backend's products against a plain f64 reference, for shapes that
//! take every path: small kernels, blocked small kernels, general GEMM.

use fedquic_train::backend::{Backend, CpuBackend, Gemm};
use fedquic_train::{KernelPath, kernel_path_name, with_kernel_path};

fn reference(g: &Gemm, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
    let at = |i: usize, p: usize| if g.trans_a { a[p * g.m + i] } else { a[i * g.k + p] } as f64;
    let bt = |p: usize, j: usize| if g.trans_b { b[j * g.k + p] } else { b[p * g.n + j] } as f64;
    let mut out = vec![0f32; g.m * g.n];
    for i in 0..g.m {
        for j in 0..g.n {
            let sum: f64 = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
            let prior = if g.beta == 0.0 {
                0.0
            } else {
                g.beta as f64 * c0[i * g.n + j] as f64
            };
            out[i * g.n + j] = (g.alpha as f64 * sum + prior) as f32;
        }
    }
    out
}

#[test]
fn every_shape_and_transpose_matches_the_reference() {
    // Both kernel families where the CPU has AVX2, the portable one everywhere.
    for path in KernelPath::available() {
        with_kernel_path(path, every_shape_on_this_path);
    }
}

fn every_shape_on_this_path() {
    let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
    for &(m, n, k) in &[
        (3, 5, 7),
        (16, 33, 17),
        (17, 9, 40),
        (64, 20, 50),
        (100, 31, 3),
        (5, 40, 64),
        (70, 8, 70),
        // The avx512 forward's packed path (m >= 48, n >= 32): whole 16 x 16 transposed
        // blocks, two-vector strips and a narrower last strip, edges both ways.
        (48, 70, 45),
        (50, 64, 1100),
        // A frozen weight's packed forward from 16 rows (on avx2 too), below the 48
        // rows from which avx512 packs every product.
        (16, 70, 45),
        (23, 32, 9),
        // The dot-product forward's blocks of depth (k > 1024).
        (20, 13, 1100),
        // The input gradient's copied panels (B of 2^18 values or more, over one row
        // tile), then the last columns as one vector and a partial one.
        (29, 530, 500),
    ] {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for (alpha, beta) in [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)] {
                let g = Gemm {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                };
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let b: Vec<f32> = (0..k * n).map(|i| value(i + 7)).collect();
                let c0: Vec<f32> = (0..m * n).map(|i| value(i + 3)).collect();
                let want = reference(&g, &a, &b, &c0);
                // As in training, and with B frozen as in an evaluation (the forward
                // packs a frozen weight once, on more paths and shapes).
                for frozen in [false, true] {
                    let mut c = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        c0.clone()
                    };
                    let mut product = || CpuBackend.gemm(g, &a, &b, &mut c).unwrap();
                    if frozen {
                        CpuBackend.with_frozen_params(&b, product);
                    } else {
                        product();
                    }
                    for (x, y) in c.iter().zip(&want) {
                        assert!(
                            (x - y).abs() <= 1e-3 * (1.0 + y.abs()),
                            "{g:?} (frozen: {frozen}) on {}: {x} vs {y}",
                            kernel_path_name()
                        );
                    }
                }
            }
        }
    }
}
