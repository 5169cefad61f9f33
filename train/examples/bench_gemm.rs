//! One thread's GFLOP/s for the matrix products our models do, three ways: the CPU
//! backend's own kernels (`CpuBackend::gemm`: small-batch AVX2 kernels, else
//! matrixmultiply), matrixmultiply alone (through ndarray), and the `gemm` crate
//! (with its AVX-512 kernels compiled in, `x86-v4`), so the choice of GEMM is measured,
//! not assumed.
//!
//! ```text
//! cargo run --release -p fedquic-train --features gemm-eval --example bench_gemm
//! ```
//!
//! `--seconds S` sets the time per cell [0.3]. The `gemm-eval` feature is off by default
//! so day-to-day builds and CI do not compile the `gemm` crate.

use std::time::Instant;

use fedquic_train::backend::{Backend, CpuBackend, Gemm};
use fedquic_train::{kernel_path_name, with_cpu_threads};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// A product from one of our models: name, m, n, k, trans_a, trans_b.
type Shape = (&'static str, usize, usize, usize, bool, bool);

const SHAPES: [Shape; 10] = [
    ("2NN dense0 fwd b64", 64, 200, 784, false, true),
    ("2NN dense0 fwd b256", 256, 200, 784, false, true),
    ("2NN dense1 fwd b256", 256, 200, 200, false, true),
    ("2NN dense1 dx b64", 64, 200, 200, false, false),
    ("2NN dense0 dW b64", 200, 784, 64, true, false),
    ("CNN dense fwd b64", 64, 512, 3136, false, true),
    ("CNN dense dx b64", 64, 3136, 512, false, false),
    ("CNN dense dW b64", 512, 3136, 64, true, false),
    ("CNN conv1 im2col/ex", 32, 784, 25, false, false),
    ("CNN conv2 im2col/ex", 64, 196, 800, false, false),
];

/// GFLOP/s of `run` (one product of `flops`), repeated for about `seconds`.
fn rate(flops: f64, seconds: f64, mut run: impl FnMut()) -> f64 {
    run();
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        run();
        calls += 1;
    }
    flops * calls as f64 / started.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let mut seconds = 0.3;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, value] if flag == "--seconds" => match value.parse() {
            Ok(s) => seconds = s,
            Err(_) => {
                eprintln!("bench_gemm: bad --seconds {value:?}");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: bench_gemm [--seconds S]");
            std::process::exit(2);
        }
    }
    println!(
        "one thread; ours = CpuBackend::gemm on kernel path {}; GFLOP/s",
        kernel_path_name()
    );
    println!(
        "{:<22} {:>5} {:>5} {:>5} {:>3} {:>8} {:>15} {:>10}",
        "product", "m", "n", "k", "op", "ours", "matrixmultiply", "gemm 0.19"
    );
    for (name, m, n, k, trans_a, trans_b) in SHAPES {
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 500.0;
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
        let mut c = vec![0.0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let g = Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
        };
        let ours = with_cpu_threads(1, || {
            rate(flops, seconds, || {
                CpuBackend
                    .gemm(g, &a, &b, &mut c)
                    .expect("lengths match the shape");
            })
        });
        // Views in the stored layout (the transposes are free stride changes).
        let a_stored = if trans_a {
            ArrayView2::from_shape((k, m), &a[..]).map(|v| v.reversed_axes())
        } else {
            ArrayView2::from_shape((m, k), &a[..])
        }
        .expect("lengths match");
        let b_stored = if trans_b {
            ArrayView2::from_shape((n, k), &b[..]).map(|v| v.reversed_axes())
        } else {
            ArrayView2::from_shape((k, n), &b[..])
        }
        .expect("lengths match");
        let expected = c.clone();
        let mm = rate(flops, seconds, || {
            let mut c_view = ArrayViewMut2::from_shape((m, n), &mut c[..]).expect("lengths match");
            general_mat_mul(1.0, &a_stored, &b_stored, 0.0, &mut c_view);
        });
        // Strides (column, row) of the stored operands.
        let (a_cs, a_rs) = if trans_a {
            (m as isize, 1)
        } else {
            (1, k as isize)
        };
        let (b_cs, b_rs) = if trans_b {
            (k as isize, 1)
        } else {
            (1, n as isize)
        };
        let crate_gemm = rate(flops, seconds, || {
            // SAFETY: every pointer covers its matrix for the given strides (a is m x k,
            // b k x n, c m x n, as laid out above), c does not alias a or b, and
            // read_dst is false so c's old contents are not read.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        // The strides above are only right if the crate computes what we do.
        let worst = c
            .iter()
            .zip(&expected)
            .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
        let check = if worst <= 1e-3 {
            ""
        } else {
            "  (gemm crate result DIFFERS)"
        };
        let op = match (trans_a, trans_b) {
            (false, false) => "NN",
            (false, true) => "NT",
            (true, false) => "TN",
            (true, true) => "TT",
        };
        println!(
            "{name:<22} {m:>5} {n:>5} {k:>5} {op:>3} {ours:>8.1} {mm:>15.1} {crate_gemm:>10.1}{check}"
        );
    }
}
