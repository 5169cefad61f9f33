//! Tests of specs, the parameter layout, gradients and training.

use super::*;
use crate::rng::seeded;
use crate::synthetic;

fn spec(text: &str) -> ModelSpec {
    text.parse().unwrap()
}

#[test]
fn spec_round_trips_and_counts() {
    for text in [
        "logreg:784-10",
        "mlp:784-200-200-10",
        "mlp:2-3-2",
        "logreg:1-2",
    ] {
        assert_eq!(spec(text).to_string(), text);
    }
    assert_eq!(
        spec(" MLP:784 - 200-200 -10 ").to_string(),
        "mlp:784-200-200-10"
    );
    assert_eq!(spec("mlp:784-200-200-10").num_params(), 199_210);
    assert_eq!(spec("logreg:784-10").num_params(), 7_850);
    let mlp = spec("mlp:784-200-200-10");
    assert_eq!((mlp.input_dim(), mlp.num_classes()), (784, 10));
    let names: Vec<String> = mlp
        .tensors()
        .iter()
        .map(|t| format!("{}{:?}", t.name, t.shape))
        .collect();
    assert_eq!(
        names,
        [
            "dense0.weight[200, 784]",
            "dense0.bias[200]",
            "dense1.weight[200, 200]",
            "dense1.bias[200]",
            "dense2.weight[10, 200]",
            "dense2.bias[10]"
        ]
    );
    assert_eq!(
        mlp.tensors().iter().map(TensorInfo::len).sum::<usize>(),
        199_210
    );
    assert_eq!(
        spec("logreg:784-10").tensors(),
        vec![
            TensorInfo {
                name: "dense0.weight".into(),
                shape: vec![10, 784]
            },
            TensorInfo {
                name: "dense0.bias".into(),
                shape: vec![10]
            },
        ]
    );
}

#[test]
fn bad_specs_are_rejected_with_reasons() {
    let cases = [
        ("", "KIND:SIZES"),
        ("mlp", "KIND:SIZES"),
        ("mlp:784-10", "at least one hidden"),
        ("mlp:784-0-10", "size 2 is zero"),
        ("logreg:0-10", "size 1 is zero"),
        ("logreg:784-1", "at least 2 output classes"),
        ("logreg:784", "exactly two sizes"),
        ("logreg:784-10-10", "exactly two sizes"),
        ("cnn:1-2", "unknown model kind"),
        ("mlp:784-x-10", "layer size 2"),
        ("mlp:784--10", "layer size 2"),
        ("mlp:784-200-10-", "layer size 4"),
        ("mlp:-784-200-10", "layer size 1"),
        ("mlp:100000-100000-10", "2^31"),
        ("mlp:18446744073709551615-2-2", "2^31"),
        ("mlp:18446744073709551616-2-2", "layer size 1"),
    ];
    for (text, needle) in cases {
        match text.parse::<ModelSpec>() {
            Err(error @ TrainError::InvalidModelSpec { .. }) => {
                assert!(error.to_string().contains(needle), "{text}: {error}")
            }
            other => panic!("{text}: expected InvalidModelSpec, got {other:?}"),
        }
    }
    // Hand-built invalid specs are caught too.
    assert!(Model::try_new(ModelSpec::Mlp { layers: vec![4, 2] }, 0).is_err());
    assert!(
        Model::try_new(
            ModelSpec::LogReg {
                inputs: 4,
                classes: 0
            },
            0
        )
        .is_err()
    );
    assert_eq!(
        ModelSpec::Mlp {
            layers: vec![usize::MAX, usize::MAX, 2]
        }
        .num_params(),
        usize::MAX
    );
}

#[test]
#[should_panic(expected = "invalid model spec")]
fn new_panics_on_hand_built_invalid_spec() {
    let _ = Model::new(ModelSpec::Mlp { layers: vec![] }, 0);
}

#[test]
fn model_is_send_sync_and_init_is_seeded() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();

    let a = Model::new(spec("mlp:784-200-200-10"), 1);
    assert_eq!(a.parameters().len(), 199_210);
    assert_eq!(
        a.parameters(),
        Model::new(spec("mlp:784-200-200-10"), 1).parameters()
    );
    assert_ne!(
        a.parameters(),
        Model::new(spec("mlp:784-200-200-10"), 2).parameters()
    );
    // He bound for the first layer, zero biases, Glorot bound for the output layer.
    let first = &a.parameters()[..200 * 784];
    let bound = (6.0f32 / 784.0).sqrt();
    assert!(first.iter().all(|w| w.abs() <= bound));
    assert!(first.iter().any(|w| w.abs() > 0.9 * bound));
    assert!(
        a.parameters()[200 * 784..200 * 785]
            .iter()
            .all(|&b| b == 0.0)
    );
    let output = &a.parameters()[199_210 - 10 - 2000..199_210 - 10];
    let glorot = (6.0f32 / 210.0).sqrt();
    assert!(output.iter().all(|w| w.abs() <= glorot));
    assert!(format!("{a:?}").contains("mlp:784-200-200-10"));
}

#[test]
fn set_parameters_checks_length_and_finiteness() {
    let mut model = Model::new(spec("logreg:3-2"), 0);
    let values: Vec<f32> = (0..8).map(|i| i as f32).collect();
    model.set_parameters(&values).unwrap();
    assert_eq!(model.parameters(), values.as_slice());
    assert!(matches!(
        model.set_parameters(&values[..7]),
        Err(TrainError::ParameterCount {
            expected: 8,
            actual: 7,
            ..
        })
    ));
    let mut poisoned = values.clone();
    poisoned[5] = f32::NAN;
    assert!(matches!(
        model.set_parameters(&poisoned),
        Err(TrainError::NonFiniteParameter { index: 5, .. })
    ));
    poisoned[5] = f32::INFINITY;
    assert!(model.set_parameters(&poisoned).is_err());
    assert_eq!(
        model.parameters(),
        values.as_slice(),
        "failed sets leave the model alone"
    );
}

/// Random inputs and labels for small models.
fn random_dataset(count: usize, dim: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = seeded(seed);
    let features = (0..count * dim)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    let labels = (0..count)
        .map(|_| rng.random_range(0..classes) as u8)
        .collect();
    Dataset::new(features, labels, dim, classes).unwrap()
}

/// Mean cross-entropy computed independently in f64 with plain loops, reading the
/// parameters in the documented layout (weights `[out, in]`, then bias, per layer).
fn reference_loss(spec: &ModelSpec, params: &[f64], data: &Dataset) -> f64 {
    let sizes = spec.layer_sizes();
    let mut total = 0.0;
    for index in 0..data.len() {
        let mut activation: Vec<f64> = data.example(index).iter().map(|&v| f64::from(v)).collect();
        let mut offset = 0;
        for (layer, pair) in sizes.windows(2).enumerate() {
            let (inputs, outputs) = (pair[0], pair[1]);
            let weights = &params[offset..offset + inputs * outputs];
            let bias = &params[offset + inputs * outputs..offset + inputs * outputs + outputs];
            offset += inputs * outputs + outputs;
            let mut next: Vec<f64> = (0..outputs)
                .map(|o| {
                    bias[o]
                        + (0..inputs)
                            .map(|j| weights[o * inputs + j] * activation[j])
                            .sum::<f64>()
                })
                .collect();
            if layer + 2 < sizes.len() {
                next.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            activation = next;
        }
        let max = activation.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum_exp = max + activation.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += log_sum_exp - activation[usize::from(data.labels[index])];
    }
    total / data.len() as f64
}

/// Compares the analytic gradient with central differences of the f64 reference.
fn check_gradient(spec_text: &str) {
    let spec = spec(spec_text);
    let data = random_dataset(7, spec.input_dim(), spec.num_classes(), 5);
    let mut model = Model::new(spec.clone(), 3);
    // Non-zero biases so their gradients and the ReLU masks are exercised properly.
    let mut rng = seeded(8);
    let params: Vec<f32> = model
        .parameters()
        .iter()
        .map(|&p| p + rng.random_range(-0.2..0.2f32))
        .collect();
    model.set_parameters(&params).unwrap();

    let indices: Vec<usize> = (0..data.len()).collect();
    let (stats, gradient) = model.gradient(&data, &indices).unwrap();
    let mut reference: Vec<f64> = params.iter().map(|&p| f64::from(p)).collect();
    let reference_value = reference_loss(&spec, &reference, &data);
    assert!(
        (f64::from(stats.loss) - reference_value).abs() < 1e-5 * reference_value.max(1.0),
        "forward loss {} vs reference {reference_value}",
        stats.loss
    );
    assert_eq!(model.evaluate(&data, &indices).unwrap(), stats);

    let step = 1e-6;
    let mut worst: f64 = 0.0;
    for index in 0..reference.len() {
        let original = reference[index];
        reference[index] = original + step;
        let plus = reference_loss(&spec, &reference, &data);
        reference[index] = original - step;
        let minus = reference_loss(&spec, &reference, &data);
        reference[index] = original;
        let numeric = (plus - minus) / (2.0 * step);
        let error = (f64::from(gradient[index]) - numeric).abs() / (1e-4 + numeric.abs());
        assert!(
            error < 1e-3,
            "{spec_text}: parameter {index}: analytic {} vs numeric {numeric}",
            gradient[index]
        );
        worst = worst.max(error);
    }
    assert!(
        gradient.iter().any(|&g| g.abs() > 1e-3),
        "gradient is trivially zero"
    );
}

#[test]
fn mlp_gradient_matches_finite_differences() {
    check_gradient("mlp:5-6-4-3");
}

#[test]
fn logreg_gradient_matches_finite_differences() {
    check_gradient("logreg:4-3");
}

#[test]
fn gradient_over_several_batches_matches_single_batch_math() {
    // 600 examples span three evaluation batches; the accumulated mean gradient must equal
    // the mean of per-example gradients (checked via two disjoint halves).
    let spec = spec("mlp:6-5-3");
    let data = random_dataset(600, 6, 3, 2);
    let model = Model::new(spec, 4);
    let all: Vec<usize> = (0..600).collect();
    let (_, full) = model.gradient(&data, &all).unwrap();
    let (_, first) = model.gradient(&data, &all[..300]).unwrap();
    let (_, second) = model.gradient(&data, &all[300..]).unwrap();
    for ((f, a), b) in full.iter().zip(&first).zip(&second) {
        assert!((f - (a + b) / 2.0).abs() < 1e-5, "{f} vs {}", (a + b) / 2.0);
    }
}

#[test]
fn one_full_batch_step_is_plain_sgd() {
    let data = random_dataset(20, 4, 3, 1);
    let mut model = Model::new(spec("mlp:4-8-3"), 2);
    let indices: Vec<usize> = (0..20).collect();
    let (_, gradient) = model.gradient(&data, &indices).unwrap();
    let expected: Vec<f32> = model
        .parameters()
        .iter()
        .zip(&gradient)
        .map(|(p, g)| p - 0.5 * g)
        .collect();
    let config = FitConfig {
        epochs: 1,
        batch_size: 20,
        learning_rate: 0.5,
        seed: 9,
    };
    model.fit(&data, &indices, &config).unwrap();
    for (actual, expected) in model.parameters().iter().zip(&expected) {
        assert!((actual - expected).abs() < 1e-5, "{actual} vs {expected}");
    }
}

/// Trains `spec_text` on a small synthetic set and returns (before, after) test stats.
fn train_synthetic(
    spec_text: &str,
    epochs: u32,
    learning_rate: f32,
) -> (EvalStats, EvalStats, FitStats) {
    let (train, test) = synthetic::train_test(2000, 500, 21);
    let mut model = Model::new(spec(spec_text), 1);
    let before = model.evaluate_all(&test).unwrap();
    let indices: Vec<usize> = (0..train.len()).collect();
    let config = FitConfig {
        epochs,
        batch_size: 32,
        learning_rate,
        seed: 2,
    };
    let fit = model.fit(&train, &indices, &config).unwrap();
    (before, model.evaluate_all(&test).unwrap(), fit)
}

#[test]
fn logreg_learns_synthetic_digits() {
    let (before, after, fit) = train_synthetic("logreg:784-10", 4, 0.1);
    assert_eq!(fit.examples, 2000);
    assert!(after.loss < before.loss * 0.7, "{before:?} -> {after:?}");
    assert!(after.accuracy > 0.45, "{after:?}");
    assert!(fit.accuracy > 0.45, "{fit:?}");
}

#[test]
fn mlp_learns_synthetic_digits() {
    let (before, after, fit) = train_synthetic("mlp:784-64-32-10", 6, 0.1);
    assert!(before.accuracy < 0.25, "{before:?}");
    assert!(after.loss < before.loss * 0.5, "{before:?} -> {after:?}");
    assert!(after.accuracy > 0.6, "{after:?}");
    assert!(fit.loss < 1.0, "{fit:?}");
}

#[test]
fn training_is_bit_identical_for_a_seed() {
    let data = synthetic::generate(300, 4);
    let indices: Vec<usize> = (0..300).collect();
    let run = |init_seed: u64, fit_seed: u64| {
        let mut model = Model::new(spec("mlp:784-16-10"), init_seed);
        let config = FitConfig {
            epochs: 2,
            batch_size: 10,
            learning_rate: 0.05,
            seed: fit_seed,
        };
        let stats = model.fit(&data, &indices, &config).unwrap();
        (model.parameters().to_vec(), stats)
    };
    let (params, stats) = run(1, 1);
    let (params_again, stats_again) = run(1, 1);
    assert!(
        params
            .iter()
            .zip(&params_again)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert_eq!(stats, stats_again);
    assert_ne!(params, run(1, 2).0, "the fit seed must change the shuffle");
    assert_ne!(params, run(2, 1).0, "the init seed must change the start");
}

#[test]
fn fit_and_evaluate_reject_bad_input() {
    let data = random_dataset(10, 4, 3, 0);
    let mut model = Model::new(spec("logreg:4-3"), 0);
    let original = model.parameters().to_vec();
    let good = FitConfig {
        epochs: 1,
        batch_size: 4,
        learning_rate: 0.1,
        seed: 0,
    };
    let all: Vec<usize> = (0..10).collect();
    assert!(matches!(
        model.fit(&data, &[0, 10], &good),
        Err(TrainError::IndexOutOfRange { index: 10, len: 10 })
    ));
    assert!(matches!(
        model.fit(&data, &[], &good),
        Err(TrainError::NoExamples)
    ));
    for bad in [
        FitConfig {
            batch_size: 0,
            ..good.clone()
        },
        FitConfig {
            epochs: 0,
            ..good.clone()
        },
        FitConfig {
            learning_rate: f32::NAN,
            ..good.clone()
        },
        FitConfig {
            learning_rate: -0.1,
            ..good.clone()
        },
    ] {
        assert!(
            matches!(
                model.fit(&data, &all, &bad),
                Err(TrainError::InvalidConfig(_))
            ),
            "{bad:?}"
        );
    }
    let wide = random_dataset(10, 5, 3, 0);
    assert!(matches!(
        model.fit(&wide, &all, &good),
        Err(TrainError::DimensionMismatch { data: 5, model: 4 })
    ));
    assert!(matches!(
        model.evaluate_all(&wide),
        Err(TrainError::DimensionMismatch { .. })
    ));
    // Labels beyond the model's classes.
    let many_classes = random_dataset(40, 4, 8, 0);
    let all_40: Vec<usize> = (0..40).collect();
    assert!(matches!(
        model.fit(&many_classes, &all_40, &good),
        Err(TrainError::LabelOutOfRange { classes: 3, .. })
    ));
    assert!(matches!(
        model.evaluate_all(&many_classes),
        Err(TrainError::LabelOutOfRange { .. })
    ));
    // An inconsistent hand-built dataset.
    let mut broken = data.clone();
    broken.features.pop();
    assert!(matches!(
        model.fit(&broken, &all, &good),
        Err(TrainError::InvalidDataset(_))
    ));
    assert!(matches!(
        model.evaluate(&data, &[]),
        Err(TrainError::NoExamples)
    ));
    assert!(matches!(
        model.evaluate(&data, &[11]),
        Err(TrainError::IndexOutOfRange { .. })
    ));
    assert_eq!(
        model.parameters(),
        original.as_slice(),
        "failed fits leave the model alone"
    );
}

#[test]
fn divergence_restores_parameters() {
    let data = random_dataset(50, 4, 3, 0);
    let mut model = Model::new(spec("mlp:4-8-3"), 0);
    let original = model.parameters().to_vec();
    let all: Vec<usize> = (0..50).collect();
    let config = FitConfig {
        epochs: 3,
        batch_size: 5,
        learning_rate: 1e30,
        seed: 0,
    };
    assert!(matches!(
        model.fit(&data, &all, &config),
        Err(TrainError::Diverged { .. })
    ));
    assert_eq!(model.parameters(), original.as_slice());
}

#[test]
fn batch_larger_than_data_and_repeated_indices_work() {
    let data = random_dataset(5, 4, 3, 0);
    let mut model = Model::new(spec("logreg:4-3"), 0);
    let config = FitConfig {
        epochs: 2,
        batch_size: 64,
        learning_rate: 0.1,
        seed: 0,
    };
    let stats = model.fit(&data, &[0, 1, 1, 4], &config).unwrap();
    assert_eq!(stats.examples, 4);
    assert!(stats.loss.is_finite());
}
