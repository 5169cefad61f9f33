//! The AVX2+FMA and portable kernels compute the same model: gradients and a
//! round of training agree between the paths (up to rounding), for a dense
//! model and a CNN that takes the direct and sparse convolution kernels. On a
//! CPU without AVX2 only the portable path exists and is checked for sanity.

use fedquic_train::{DataSpec, Dataset, FitConfig, KernelPath, Model, with_kernel_path};

const SPECS: [&str; 2] = ["mlp:784-48-10", "cnn:1x28x28-c8k5p2-m2-c16k5p2-m2-d32-10"];

fn data() -> Dataset {
    let (train, _) = "synthetic:128/16:7"
        .parse::<DataSpec>()
        .unwrap()
        .load()
        .unwrap();
    train
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}: value {i} is {x}");
        assert!(
            (x - y).abs() <= 2e-3 * scale,
            "{what}: value {i}: {x} vs {y} (scale {scale})"
        );
    }
}

#[test]
fn gradients_agree_between_kernel_paths() {
    let data = data();
    for spec in SPECS {
        let model = Model::try_new(spec.parse().unwrap(), 3).unwrap();
        for batch in [10usize, 40] {
            let indices: Vec<usize> = (0..batch).collect();
            let on = |path| with_kernel_path(path, || model.gradient(&data, &indices).unwrap());
            let (portable_stats, portable) = on(KernelPath::Portable);
            assert!(portable_stats.loss.is_finite());
            assert!(portable.iter().any(|g| *g != 0.0), "{spec}: zero gradient");
            for path in KernelPath::available() {
                let (stats, grad) = on(path);
                let what = format!("{spec} batch {batch} on {}", path.name());
                assert!((stats.loss - portable_stats.loss).abs() < 1e-4, "{what}");
                assert_close(&what, &grad, &portable);
            }
        }
    }
}

#[test]
fn training_agrees_between_kernel_paths() {
    let data = data();
    let indices: Vec<usize> = (0..data.len()).collect();
    for spec in SPECS {
        let cfg = FitConfig {
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.05,
            ..FitConfig::default()
        };
        let trained = |path| {
            with_kernel_path(path, || {
                let mut model = Model::try_new(spec.parse().unwrap(), 5).unwrap();
                let before = model.evaluate(&data, &indices).unwrap().loss;
                model.fit(&data, &indices, &cfg).unwrap();
                let after = model.evaluate(&data, &indices).unwrap().loss;
                (before, after, model.parameters().to_vec())
            })
        };
        let (before, after, portable) = trained(KernelPath::Portable);
        assert!(
            after < before,
            "{spec}: portable training did not learn ({before} -> {after})"
        );
        for path in KernelPath::available() {
            let (_, _, params) = trained(path);
            assert_close(
                &format!("{spec} trained on {}", path.name()),
                &params,
                &portable,
            );
        }
    }
}
