//! GFLOP/s of three GEMM implementations on the shapes fedquic's models train and infer
//! with, one thread: fedquic-train's CPU backend (its dense kernels, written against
//! pulp), matrixmultiply alone, and the gemm crate (runtime-dispatched AVX2/AVX-512/NEON
//! micro-kernels). Run: `cargo run --release` in this directory. (Until commit 7ffabd6
//! the backend's kernels were hand-written AVX2 and this tool also timed a pulp version
//! of the weight-gradient tile, `src/pulp_rank.rs`, for BENCHMARKS.md's pulp column.)

use std::time::{Duration, Instant};

use fedquic_train::backend::{Backend, CpuBackend, Gemm};

struct Shape {
    label: &'static str,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
}

const fn shape(label: &'static str, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Shape {
    Shape {
        label,
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
    }
}

/// C = op(A) op(B), op(A) m x k, op(B) k x n, row-major as `Gemm` stores them.
const SHAPES: &[Shape] = &[
    // 2NN (784-200-200-10) training at batch 64.
    shape("2NN b64 fwd 784->200", 64, 200, 784, false, true),
    shape("2NN b64 fwd 200->200", 64, 200, 200, false, true),
    shape("2NN b64 igrad 200<-200", 64, 200, 200, false, false),
    shape("2NN b64 wgrad 784x200", 200, 784, 64, true, false),
    shape("2NN b64 wgrad 200x200", 200, 200, 64, true, false),
    // 2NN at batch 10.
    shape("2NN b10 fwd 784->200", 10, 200, 784, false, true),
    shape("2NN b10 wgrad 784x200", 200, 784, 10, true, false),
    // 2NN inference at batch 256.
    shape("2NN b256 fwd 784->200", 256, 200, 784, false, true),
    shape("2NN b256 fwd 200->200", 256, 200, 200, false, true),
    // cnn:mnist dense layers (3136 -> 512 -> 10) at batch 64.
    shape("CNN b64 fwd 3136->512", 64, 512, 3136, false, true),
    shape("CNN b64 igrad 3136<-512", 64, 3136, 512, false, false),
    shape("CNN b64 wgrad 3136x512", 512, 3136, 64, true, false),
    // cnn:mnist convolutions as im2col GEMMs at batch 1 (per image): out_ch x pixels x patch.
    shape("CNN conv1 im2col 32x784x25", 32, 784, 25, false, false),
    shape("CNN conv2 im2col 64x196x800", 64, 196, 800, false, false),
];

fn filled(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

/// Best GFLOP/s over 3 windows of `window` each.
fn measure(flops: f64, window: Duration, mut run: impl FnMut()) -> f64 {
    for _ in 0..3 {
        run();
    }
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < window {
            run();
            calls += 1;
        }
        best = best.max(flops * calls as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    let window = Duration::from_millis(
        std::env::var("GEMM_EVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    println!(
        "kernel path {} | gemm crate 0.19 | matrixmultiply 0.3 | one thread | GFLOP/s, best of 3 x {} ms",
        fedquic_train::kernel_path_name(),
        window.as_millis()
    );
    println!(
        "| shape | m | n | k | ours | matrixmultiply | gemm | gemm / ours | max abs diff vs ours |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // GEMM_EVAL_ONLY=TEXT: only the shapes whose label contains TEXT (for profiling).
    let only = std::env::var("GEMM_EVAL_ONLY").unwrap_or_default();
    for s in SHAPES.iter().filter(|s| s.label.contains(only.as_str())) {
        let (m, n, k) = (s.m, s.n, s.k);
        let a = filled(m * k, 1);
        let b = filled(k * n, 2);
        let mut c_ours = vec![0.0f32; m * n];
        let mut c_mm = vec![0.0f32; m * n];
        let mut c_gemm = vec![0.0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        // Strides of op(A) (m x k) and op(B) (k x n) over row-major storage.
        let (rsa, csa) = if s.trans_a {
            (1, m as isize)
        } else {
            (k as isize, 1)
        };
        let (rsb, csb) = if s.trans_b {
            (1, k as isize)
        } else {
            (n as isize, 1)
        };
        let gemm = Gemm {
            m,
            n,
            k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            alpha: 1.0,
            beta: 0.0,
        };
        let ours = measure(flops, window, || {
            CpuBackend
                .gemm(gemm, &a, &b, &mut c_ours)
                .expect("valid lengths");
        });
        let mm = measure(flops, window, || {
            // SAFETY: the pointers and strides describe the vectors above, in bounds.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    0.0,
                    c_mm.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        });
        let gm = measure(flops, window, || {
            // SAFETY: as above; read_dst false so C's prior contents are ignored.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c_gemm.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    csa,
                    rsa,
                    b.as_ptr(),
                    csb,
                    rsb,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
        let diff = c_ours
            .iter()
            .zip(&c_gemm)
            .chain(c_ours.iter().zip(&c_mm))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        println!(
            "| {} | {m} | {n} | {k} | {ours:.1} | {mm:.1} | {gm:.1} | {:.2}x | {diff:.1e} |",
            s.label,
            gm / ours
        );
    }
}
