//! Intra-op threading (`set_gemm_threads(2)`): operations split across the pool give
//! the single-threaded results, on every kernel path this CPU has. This test binary
//! fixes the process's thread count at 2, so it runs as its own process.

use fedquic_train::backend::{Backend, CpuBackend, Gemm};
use fedquic_train::{
    DataSpec, Dataset, FitConfig, KernelPath, Model, Optimizer, cpu_threads, kernel_path_name,
    set_gemm_threads, with_cpu_threads, with_kernel_path,
};

fn two_threads() {
    assert_eq!(set_gemm_threads(2).expect("first and only setting"), 2);
    assert_eq!(cpu_threads(), 2);
    assert_eq!(with_cpu_threads(1, cpu_threads), 1);
}

fn data() -> Dataset {
    let (train, _) = "synthetic:128/16:5"
        .parse::<DataSpec>()
        .unwrap()
        .load()
        .unwrap();
    train
}

fn reference(g: &Gemm, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
    let at = |i: usize, p: usize| if g.trans_a { a[p * g.m + i] } else { a[i * g.k + p] } as f64;
    let bt = |p: usize, j: usize| if g.trans_b { b[j * g.k + p] } else { b[p * g.n + j] } as f64;
    let mut out = vec![0f32; g.m * g.n];
    for i in 0..g.m {
        for j in 0..g.n {
            let sum: f64 = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
            let prior = g.beta as f64 * c0[i * g.n + j] as f64;
            out[i * g.n + j] = (g.alpha as f64 * sum + prior) as f32;
        }
    }
    out
}

/// Products large enough to be split (row blocks, C's columns for a single row block,
/// and the rank update's C rows with A's stride), against f64, and bit for bit against
/// one thread.
fn split_products_match() {
    let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
    for &(m, n, k, trans_a, trans_b) in &[
        (72, 200, 300, false, true),
        // On avx512 a forward of 48+ rows packs B^T in strips: this one (n x k >= 2^19)
        // packs on both threads, with a narrower last strip.
        (56, 1_000, 700, false, true),
        // One row block (a batch of 10, or fewer): split by C's columns instead.
        (10, 200, 784, false, true),
        (7, 130, 1_200, false, true),
        (1, 1_003, 1_100, false, true),
        (70, 130, 256, false, false),
        (100, 300, 40, true, false),
        (37, 64, 600, true, false),
    ] {
        let g = Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: -0.5,
            beta: 0.25,
        };
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(i + 7)).collect();
        let c0: Vec<f32> = (0..m * n).map(|i| value(i + 3)).collect();
        let run = || {
            let mut c = c0.clone();
            CpuBackend.gemm(g, &a, &b, &mut c).unwrap();
            c
        };
        let threaded = run();
        let single = with_cpu_threads(1, run);
        assert_eq!(threaded, single, "{g:?} on {}", kernel_path_name());
        let expected = reference(&g, &a, &b, &c0);
        for (i, (x, y)) in threaded.iter().zip(&expected).enumerate() {
            assert!(
                (x - y).abs() <= 1e-3 * (1.0 + y.abs()),
                "{g:?} on {}: value {i}: {x} vs {y}",
                kernel_path_name()
            );
        }
    }
}

/// A CNN (direct and sparse convolutions, 2x2 pooling, ReLU) and an MLP: gradients equal
/// one thread's (the convolution weight gradient up to the order of its partial sums),
/// and inference is bit-identical.
fn models_match() {
    let data = data();
    for spec in [
        "cnn:1x28x28-c16k5p2-m2-c32k5p2-m2-d64-10",
        "mlp:784-256-256-10",
    ] {
        let model = Model::try_new(spec.parse().unwrap(), 3).unwrap();
        let indices: Vec<usize> = (0..64).collect();
        let (stats, threaded) = model.gradient(&data, &indices).unwrap();
        let (single_stats, single) =
            with_cpu_threads(1, || model.gradient(&data, &indices).unwrap());
        assert_eq!(
            stats.loss, single_stats.loss,
            "{spec}: forward is bit-identical"
        );
        let scale = single.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (x, y)) in threaded.iter().zip(&single).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{spec} on {}: gradient {i}: {x} vs {y}",
                kernel_path_name()
            );
        }
        // Evaluation splits by examples: each row's outputs as on one thread, the loss
        // summed per share, so equal up to the order of that sum.
        let eval = model.evaluate(&data, &indices).unwrap();
        let single_eval = with_cpu_threads(1, || model.evaluate(&data, &indices).unwrap());
        assert!(
            (eval.loss - single_eval.loss).abs() <= 1e-5 * single_eval.loss.abs().max(1.0),
            "{spec}: {} vs {}",
            eval.loss,
            single_eval.loss
        );
        assert_eq!(eval.accuracy, single_eval.accuracy, "{spec}");

        // And training moves the same way.
        let config = FitConfig {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            ..FitConfig::default()
        };
        let all: Vec<usize> = (0..data.len()).collect();
        let mut a = model.clone();
        a.fit(&data, &all, &config).unwrap();
        let mut b = model.clone();
        with_cpu_threads(1, || b.fit(&data, &all, &config).unwrap());
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(
                (x - y).abs() <= 1e-4,
                "{spec}: trained parameter {x} vs {y}"
            );
        }
    }
}

/// Evaluation split by examples across the threads (each runs whole forward passes on
/// its share of every batch): the one-thread figures for batch sizes that split unevenly
/// or not at all, a short last batch, scattered and consecutive indices; a bad index or
/// label still refused.
fn split_evaluation_matches() {
    let data = data();
    let model = Model::try_new("mlp:784-64-10".parse().unwrap(), 5).unwrap();
    let consecutive: Vec<usize> = (0..128).collect();
    let scattered: Vec<usize> = (0..101).map(|i| (i * 37 + 11) % 128).collect();
    for indices in [&consecutive, &scattered] {
        for batch in [1, 17, 31, 32, 33, 48, 64, 100, 256] {
            let threaded = model
                .evaluate_batched_on(&CpuBackend, &data, indices, batch)
                .unwrap();
            let single = with_cpu_threads(1, || {
                model.evaluate_batched_on(&CpuBackend, &data, indices, batch)
            })
            .unwrap();
            assert_eq!(threaded.examples, single.examples);
            assert_eq!(threaded.accuracy, single.accuracy, "batch {batch}");
            assert!(
                (threaded.loss - single.loss).abs() <= 1e-5 * single.loss.abs().max(1.0),
                "batch {batch} on {}: {} vs {}",
                kernel_path_name(),
                threaded.loss,
                single.loss
            );
        }
    }
    // An index past the end, in the second thread's share of the second batch.
    let mut bad = consecutive.clone();
    bad[64 + 50] = data.len();
    assert!(
        model
            .evaluate_batched_on(&CpuBackend, &data, &bad, 64)
            .is_err()
    );
    assert!(
        model
            .evaluate_batched_on(&CpuBackend, &data, &[], 64)
            .is_err()
    );
}

/// The fused small-batch dense backward split into ranges of weight rows (CNN-sized and
/// odd shapes): the updated weights equal one thread's bit for bit, and the input
/// gradient (summed over the parts) matches one thread's within rounding.
fn split_fused_backward_matches() {
    let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 50.0;
    for &(batch, inputs, outputs) in &[(10, 3_136, 512), (7, 1_001, 203), (16, 640, 130)] {
        let x: Vec<f32> = (0..batch * inputs).map(value).collect();
        let dy: Vec<f32> = (0..batch * outputs).map(|i| value(i + 5)).collect();
        let w0: Vec<f32> = (0..outputs * inputs).map(|i| value(i + 9)).collect();
        let run = || {
            let mut w = w0.clone();
            let mut dx = vec![f32::NAN; batch * inputs];
            let ran = CpuBackend
                .dense_backward_fused(batch, inputs, outputs, &x, &dy, -0.05, 1.0, &mut w, &mut dx)
                .unwrap();
            (ran, w, dx)
        };
        let (ran, w, dx) = run();
        let (single_ran, single_w, single_dx) = with_cpu_threads(1, run);
        assert_eq!(
            ran, single_ran,
            "the kernel runs on this path or on neither"
        );
        if !ran {
            continue; // No fused kernel on this path (the caller runs two products).
        }
        let differing = w
            .iter()
            .zip(&single_w)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            differing, None,
            "{batch}x{inputs}x{outputs}: first differing weight"
        );
        for (i, (a, b)) in dx.iter().zip(&single_dx).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{batch}x{inputs}x{outputs}: dx {i}: {a} vs {b}"
            );
        }
    }
}

/// Bias fills and bias-gradient sums over channel planes, split into plane or channel
/// ranges whose boundaries fall inside a channel cycle (odd batch, 5 channels): bit for
/// bit one thread's, and the fill against the obvious loop.
fn split_channel_passes_match() {
    let (batch, channels, plane) = (3, 5, 9_000);
    let bias = [0.5, -1.0, 2.0, 3.5, -0.25];
    let fill = || {
        let mut dst = vec![f32::NAN; batch * channels * plane];
        CpuBackend
            .fill_channels(&bias, batch, plane, &mut dst)
            .unwrap();
        dst
    };
    for dst in [fill(), with_cpu_threads(1, fill)] {
        for (index, &value) in dst.iter().enumerate() {
            assert_eq!(value, bias[index / plane % channels], "fill at {index}");
        }
    }
    let src: Vec<f32> = (0..batch * channels * plane)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    for beta in [0.0, 1.0, 0.5] {
        let sum = || {
            let mut dst = vec![1.5f32; channels];
            CpuBackend
                .sum_channels(&src, batch, plane, -0.5, beta, &mut dst)
                .unwrap();
            dst
        };
        let threaded = sum();
        assert_eq!(threaded, with_cpu_threads(1, sum), "beta {beta}");
        for (channel, &total) in threaded.iter().enumerate() {
            let expected: f64 = (0..batch)
                .flat_map(|b| {
                    let start = (b * channels + channel) * plane;
                    src[start..start + plane].iter().map(|&v| f64::from(v))
                })
                .sum();
            let expected = 1.5 * f64::from(beta) - 0.5 * expected;
            assert!(
                (f64::from(total) - expected).abs() <= 1e-3 * (1.0 + expected.abs()),
                "channel {channel}: {total} vs {expected}"
            );
        }
    }
}

/// The optimizer updates split into ranges (SGD with momentum, Nesterov, weight decay
/// and FedProx's anchor; Adam): an MLP, whose split products are bit-identical too,
/// trains to exactly one thread's parameters.
fn optimizers_match() {
    let data = data();
    let model = Model::try_new("mlp:784-256-256-10".parse().unwrap(), 5).unwrap();
    let all: Vec<usize> = (0..data.len()).collect();
    let optimizers = [
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
        },
        Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 1e-3,
        },
        Optimizer::adam(),
    ];
    for optimizer in optimizers {
        for proximal_mu in [0.0, 0.01] {
            let config = FitConfig {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.01,
                optimizer,
                proximal_mu,
                ..FitConfig::default()
            };
            let mut a = model.clone();
            a.fit(&data, &all, &config).unwrap();
            let mut b = model.clone();
            with_cpu_threads(1, || b.fit(&data, &all, &config).unwrap());
            let differing = a
                .parameters()
                .iter()
                .zip(b.parameters())
                .position(|(x, y)| x.to_bits() != y.to_bits());
            assert_eq!(
                differing,
                None,
                "{optimizer:?}, mu {proximal_mu} on {}: first differing parameter",
                kernel_path_name()
            );
        }
    }
}

/// A batch's rows gathered on both threads: the same rows in the same places, in any
/// order, and an index out of range refused before anything is copied.
fn split_gather_matches() {
    let dim = 784;
    let data: Vec<f32> = (0..300 * dim).map(|i| i as f32).collect();
    let rows: Vec<usize> = (0..256).map(|i| (i * 113 + 7) % 300).collect();
    let gather = |rows: &[usize]| {
        let mut dst = vec![f32::NAN; rows.len() * dim];
        CpuBackend
            .gather_rows(&data, dim, rows, &mut dst)
            .map(|()| dst)
    };
    let threaded = gather(&rows).unwrap();
    assert_eq!(threaded, with_cpu_threads(1, || gather(&rows)).unwrap());
    for (slot, &row) in threaded.chunks(dim).zip(&rows) {
        assert_eq!(slot, &data[row * dim..(row + 1) * dim]);
    }
    let mut bad = rows.clone();
    bad[200] = 300;
    assert!(gather(&bad).is_err());
}

#[test]
fn split_operations_match_one_thread_on_every_path() {
    two_threads();
    for path in KernelPath::available() {
        with_kernel_path(path, || {
            split_products_match();
            split_gather_matches();
            models_match();
            split_evaluation_matches();
            split_channel_passes_match();
            split_fused_backward_matches();
            optimizers_match();
        });
    }
}
