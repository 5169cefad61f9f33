//! Tests of specs, the parameter layout, gradients and training.

use rand::RngExt;

use super::*;
use crate::rng::seeded;
use crate::spec::CnnLayer;
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
        ("rnn:1-2", "unknown model kind"),
        ("cnn:1-2", "not an input shape"),
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
/// parameters in the documented layout (per layer: weights, then bias; dense weights
/// `[out, in]`, convolution weights `[out, in, k, k]`). Dropout is the identity, as in
/// evaluation.
fn reference_loss(spec: &ModelSpec, params: &[f64], data: &Dataset) -> f64 {
    let mut total = 0.0;
    for index in 0..data.len() {
        let input: Vec<f64> = data.example(index).iter().map(|&v| f64::from(v)).collect();
        let logits = reference_logits(spec, params, input);
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum_exp = max + logits.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += log_sum_exp - logits[usize::from(data.labels[index])];
    }
    total / data.len() as f64
}

/// A dense layer `inputs -> outputs` at `*offset`, advancing it.
fn reference_dense(params: &[f64], offset: &mut usize, input: &[f64], outputs: usize) -> Vec<f64> {
    let inputs = input.len();
    let weights = &params[*offset..*offset + inputs * outputs];
    let bias = &params[*offset + inputs * outputs..*offset + inputs * outputs + outputs];
    *offset += inputs * outputs + outputs;
    (0..outputs)
        .map(|o| {
            bias[o]
                + (0..inputs)
                    .map(|j| weights[o * inputs + j] * input[j])
                    .sum::<f64>()
        })
        .collect()
}

fn reference_logits(spec: &ModelSpec, params: &[f64], input: Vec<f64>) -> Vec<f64> {
    let mut offset = 0;
    let relu = |values: &mut Vec<f64>| values.iter_mut().for_each(|v| *v = v.max(0.0));
    let ModelSpec::Cnn {
        input: [channels, height, width],
        layers,
        classes,
    } = spec
    else {
        let sizes = spec.layer_sizes();
        let mut activation = input;
        for (layer, &outputs) in sizes[1..].iter().enumerate() {
            activation = reference_dense(params, &mut offset, &activation, outputs);
            if layer + 2 < sizes.len() {
                relu(&mut activation);
            }
        }
        return activation;
    };
    let (mut c, mut h, mut w) = (*channels, *height, *width);
    let mut activation = input;
    for layer in layers {
        match *layer {
            CnnLayer::Conv {
                channels: out,
                kernel: k,
                stride,
                padding,
            } => {
                let oh = (h + 2 * padding - k) / stride + 1;
                let ow = (w + 2 * padding - k) / stride + 1;
                let weights = &params[offset..offset + out * c * k * k];
                let bias = &params[offset + out * c * k * k..offset + out * c * k * k + out];
                offset += out * c * k * k + out;
                let mut next = vec![0.0; out * oh * ow];
                for o in 0..out {
                    for y in 0..oh {
                        for x in 0..ow {
                            let mut sum = bias[o];
                            for i in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (y * stride + ky) as isize - padding as isize;
                                        let ix = (x * stride + kx) as isize - padding as isize;
                                        if iy >= 0
                                            && ix >= 0
                                            && (iy as usize) < h
                                            && (ix as usize) < w
                                        {
                                            sum += weights[((o * c + i) * k + ky) * k + kx]
                                                * activation
                                                    [(i * h + iy as usize) * w + ix as usize];
                                        }
                                    }
                                }
                            }
                            next[(o * oh + y) * ow + x] = sum;
                        }
                    }
                }
                relu(&mut next);
                (c, h, w) = (out, oh, ow);
                activation = next;
            }
            CnnLayer::MaxPool { size, stride } => {
                let (oh, ow) = ((h - size) / stride + 1, (w - size) / stride + 1);
                let mut next = vec![f64::NEG_INFINITY; c * oh * ow];
                for i in 0..c {
                    for y in 0..oh {
                        for x in 0..ow {
                            for dy in 0..size {
                                for dx in 0..size {
                                    let value =
                                        activation[(i * h + y * stride + dy) * w + x * stride + dx];
                                    let slot = &mut next[(i * oh + y) * ow + x];
                                    *slot = slot.max(value);
                                }
                            }
                        }
                    }
                }
                (h, w) = (oh, ow);
                activation = next;
            }
            CnnLayer::Dense { units } => {
                activation = reference_dense(params, &mut offset, &activation, units);
                relu(&mut activation);
            }
            CnnLayer::Dropout { .. } => {}
        }
    }
    reference_dense(params, &mut offset, &activation, *classes)
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
        ..Default::default()
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
    train_synthetic_with(
        spec_text,
        2000,
        FitConfig::new(epochs, 32, learning_rate, 2),
    )
}

/// Trains `spec_text` with `config` on `count` synthetic digits; (before, after) test
/// stats and the fit stats.
fn train_synthetic_with(
    spec_text: &str,
    count: usize,
    config: FitConfig,
) -> (EvalStats, EvalStats, FitStats) {
    let (train, test) = synthetic::train_test(count, 500, 21);
    let mut model = Model::new(spec(spec_text), 1);
    let before = model.evaluate_all(&test).unwrap();
    let indices: Vec<usize> = (0..train.len()).collect();
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
            ..Default::default()
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
        ..Default::default()
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
        ..Default::default()
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
        ..Default::default()
    };
    let stats = model.fit(&data, &[0, 1, 1, 4], &config).unwrap();
    assert_eq!(stats.examples, 4);
    assert!(stats.loss.is_finite());
}

#[test]
fn cnn_gradients_match_finite_differences() {
    // Padding, stride 2, a pointwise convolution, overlapping pooling, dropout (off when
    // computing gradients) and two dense layers, against the independent f64 reference.
    check_gradient("cnn:1x6x6-c2k3p1-m2-d4-drop50-3");
    check_gradient("cnn:2x7x7-c3k3s2p1-c2k1-m2s1-d4-3");
}

#[test]
fn cnn_specs_parse_display_and_count() {
    let mnist = spec("cnn:mnist");
    assert_eq!(mnist, ModelSpec::cnn_mnist());
    assert_eq!(mnist.to_string(), "cnn:mnist");
    assert_eq!(spec("CNN: MNIST"), mnist);
    assert_eq!(spec("cnn:1x28x28-c32k5p2-m2-c64k5p2-m2-d512-10"), mnist);
    assert_eq!(mnist.num_params(), 1_663_370);
    assert_eq!(spec("mlp:784-200-200-10").num_params(), 199_210);
    assert_eq!((mnist.input_dim(), mnist.num_classes()), (784, 10));
    assert_eq!(
        mnist.layer_sizes(),
        vec![
            784,
            32 * 28 * 28,
            32 * 14 * 14,
            64 * 14 * 14,
            64 * 7 * 7,
            512,
            10
        ]
    );
    let names: Vec<String> = mnist
        .tensors()
        .iter()
        .map(|t| format!("{}{:?}", t.name, t.shape))
        .collect();
    assert_eq!(
        names,
        [
            "conv0.weight[32, 1, 5, 5]",
            "conv0.bias[32]",
            "conv1.weight[64, 32, 5, 5]",
            "conv1.bias[64]",
            "dense0.weight[512, 3136]",
            "dense0.bias[512]",
            "dense1.weight[10, 512]",
            "dense1.bias[10]"
        ]
    );
    assert_eq!(
        mnist.tensors().iter().map(TensorInfo::len).sum::<usize>(),
        1_663_370
    );
    // Round trips of the long form, defaults left out.
    for text in [
        "cnn:1x28x28-c8k3-m2-10",
        "cnn:3x32x32-c16k3s2p1-m3s2-d64-drop50-d32-10",
        "cnn:1x8x8-drop20-c4k1-2",
        "cnn:1x28x28-c32k5p2-m2-c64k5p2-m2-d512-drop50-10",
    ] {
        assert_eq!(spec(text).to_string(), text);
        assert_eq!(spec(&spec(text).to_string()), spec(text));
    }
    assert_eq!(
        spec("cnn:1x8x8-c4k3s1p0-m2s2-2").to_string(),
        "cnn:1x8x8-c4k3-m2-2"
    );
    assert_eq!(
        spec("cnn:1x8x8-drop25-2"),
        ModelSpec::Cnn {
            input: [1, 8, 8],
            layers: vec![CnnLayer::Dropout { percent: 25 }],
            classes: 2
        }
    );
    // The layout module carries CNNs too.
    let layout: crate::layout::ParamLayout = "cnn:mnist".parse().unwrap();
    assert_eq!(layout.num_params(), 1_663_370);
    assert_eq!(layout.to_string(), "cnn:mnist");
    assert_eq!(layout.initial_parameters(1).unwrap().len(), 1_663_370);
}

#[test]
fn bad_cnn_specs_are_rejected_with_reasons() {
    let cases = [
        ("cnn:mnst", "not an input shape"),
        ("cnn:1x28-10", "not an input shape"),
        ("cnn:0x28x28-10", "non-zero"),
        ("cnn:1x28x28", "class count last"),
        ("cnn:1x28x28-c4k3", "number of classes"),
        ("cnn:1x28x28-c4k3-1", "at least 2 output classes"),
        ("cnn:1x28x28-x3-10", "bad layer \"x3\""),
        ("cnn:1x28x28-c4-10", "bad layer"),
        ("cnn:1x28x28-c4k3k3-10", "bad layer"),
        ("cnn:1x28x28-m2p1-10", "bad layer"),
        ("cnn:1x28x28-c4k29-10", "does not fit"),
        ("cnn:1x28x28-c0k3-10", "at least 1"),
        ("cnn:1x28x28-c4k3s0-10", "at least 1"),
        ("cnn:1x28x28-m29-10", "does not fit"),
        ("cnn:1x28x28-m0-10", "does not fit"),
        ("cnn:1x28x28-d10-c4k3-10", "convolution after a dense layer"),
        ("cnn:1x28x28-d10-m2-10", "pooling after a dense layer"),
        ("cnn:1x28x28-d0-10", "needs 1..="),
        ("cnn:1x28x28-drop0-10", "1..=99"),
        ("cnn:1x28x28-drop100-10", "1..=99"),
        ("cnn:1x28x28-drop1000-10", "1..=99"),
        ("cnn:1x100000x100000-10", "more than"),
        ("cnn:1x28x28-c100000k5p2-10", "activations would exceed"),
        ("cnn:1x4096x4096-d200-10", "2^31"),
        ("cnn:1x28x28-c4k3-18446744073709551616", "number of classes"),
    ];
    for (text, needle) in cases {
        match text.parse::<ModelSpec>() {
            Err(error @ TrainError::InvalidModelSpec { .. }) => {
                assert!(error.to_string().contains(needle), "{text}: {error}")
            }
            other => panic!("{text}: expected InvalidModelSpec, got {other:?}"),
        }
    }
    // A hand-built invalid CNN is refused by try_new and lists what it can.
    let broken = ModelSpec::Cnn {
        input: [1, 4, 4],
        layers: vec![
            CnnLayer::Conv {
                channels: 2,
                kernel: 3,
                stride: 1,
                padding: 0,
            },
            CnnLayer::MaxPool { size: 5, stride: 1 },
        ],
        classes: 3,
    };
    assert!(Model::try_new(broken.clone(), 0).is_err());
    assert_eq!(broken.tensors().len(), 2);
    assert_eq!(broken.num_params(), 2 * 9 + 2);
}

#[test]
fn mnist_cnn_forward_backward_shapes() {
    let data = synthetic::generate(3, 5);
    let mut model = Model::new(ModelSpec::cnn_mnist(), 1);
    assert_eq!(model.parameters().len(), 1_663_370);
    let (stats, gradient) = model.gradient(&data, &[0, 1, 2]).unwrap();
    assert_eq!(gradient.len(), 1_663_370);
    assert!(gradient.iter().all(|g| g.is_finite()));
    // A fresh 10-class model predicts roughly uniformly.
    assert!((stats.loss - 10f32.ln()).abs() < 1.0, "{stats:?}");
    // Every tensor gets a gradient.
    let mut offset = 0;
    for tensor in ModelSpec::cnn_mnist().tensors() {
        let part = &gradient[offset..offset + tensor.len()];
        assert!(
            part.iter().any(|&g| g != 0.0),
            "{} has no gradient",
            tensor.name
        );
        offset += tensor.len();
    }
    // One SGD step moves every tensor.
    let before = model.parameters().to_vec();
    model
        .fit(&data, &[0, 1, 2], &FitConfig::new(1, 3, 0.1, 0))
        .unwrap();
    let mut offset = 0;
    for tensor in ModelSpec::cnn_mnist().tensors() {
        let range = offset..offset + tensor.len();
        assert_ne!(
            &model.parameters()[range.clone()],
            &before[range],
            "{}",
            tensor.name
        );
        offset += tensor.len();
    }
    let eval = model.evaluate(&data, &[0, 1, 2]).unwrap();
    assert_eq!(eval.examples, 3);
}

/// A CNN small enough for debug-mode tests, with the mnist CNN's structure.
const SMALL_CNN: &str = "cnn:1x28x28-c4k5p2-m2-c8k5p2-m2-d32-10";

#[test]
fn cnn_learns_synthetic_digits() {
    let (before, after, fit) =
        train_synthetic_with(SMALL_CNN, 1000, FitConfig::new(3, 16, 0.05, 2));
    assert!(after.loss < before.loss * 0.6, "{before:?} -> {after:?}");
    assert!(after.accuracy > 0.5, "{after:?}");
    assert!(fit.loss < before.loss, "{fit:?}");
}

#[test]
fn every_optimizer_lowers_the_loss() {
    let optimizers = [
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
        },
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
        },
        Optimizer::adam(),
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.99,
            epsilon: 1e-7,
            weight_decay: 1e-3,
        },
    ];
    for optimizer in optimizers {
        let learning_rate = if matches!(optimizer, Optimizer::Adam { .. }) {
            3e-3
        } else {
            0.02
        };
        let config = FitConfig {
            optimizer,
            proximal_mu: 0.01,
            ..FitConfig::new(2, 32, learning_rate, 3)
        };
        let (before, after, _) = train_synthetic_with("mlp:784-32-10", 1000, config);
        assert!(
            after.loss < before.loss * 0.75,
            "{optimizer:?}: {before:?} -> {after:?}"
        );
    }
    // Adam and momentum on the CNN too.
    for optimizer in [
        Optimizer::adam(),
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
        },
    ] {
        let learning_rate = if matches!(optimizer, Optimizer::Adam { .. }) {
            2e-3
        } else {
            0.02
        };
        let config = FitConfig {
            optimizer,
            ..FitConfig::new(1, 16, learning_rate, 3)
        };
        let (before, after, _) = train_synthetic_with(SMALL_CNN, 600, config);
        assert!(
            after.loss < before.loss * 0.8,
            "{optimizer:?}: {before:?} -> {after:?}"
        );
    }
}

/// Parameters after `steps` full-batch steps of `config`, computed in f64 from
/// `Model::gradient` and the optimizer's textbook formulas (PyTorch's semantics).
fn manual_steps(start: &Model, data: &Dataset, config: &FitConfig, steps: usize) -> Vec<f64> {
    let all: Vec<usize> = (0..data.len()).collect();
    let anchor: Vec<f64> = start.parameters().iter().map(|&p| f64::from(p)).collect();
    let mut params = anchor.clone();
    let mut first = vec![0.0f64; params.len()];
    let mut second = vec![0.0f64; params.len()];
    let mut probe = start.clone();
    let lr = f64::from(config.learning_rate);
    let mu = f64::from(config.proximal_mu);
    for step in 1..=steps {
        let as_f32: Vec<f32> = params.iter().map(|&p| p as f32).collect();
        probe.set_parameters(&as_f32).unwrap();
        let (_, gradient) = probe.gradient(data, &all).unwrap();
        for i in 0..params.len() {
            let w = params[i];
            let prox = mu * (w - anchor[i]);
            match config.optimizer {
                Optimizer::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let (momentum, decay) = (f64::from(momentum), f64::from(weight_decay));
                    let g = f64::from(gradient[i]) + decay * w + prox;
                    first[i] = momentum * first[i] + g;
                    let direction = if momentum == 0.0 {
                        g
                    } else if nesterov {
                        g + momentum * first[i]
                    } else {
                        first[i]
                    };
                    params[i] = w - lr * direction;
                }
                Optimizer::Adam {
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay,
                } => {
                    let (b1, b2) = (f64::from(beta1), f64::from(beta2));
                    let g = f64::from(gradient[i]) + f64::from(weight_decay) * w + prox;
                    first[i] = b1 * first[i] + (1.0 - b1) * g;
                    second[i] = b2 * second[i] + (1.0 - b2) * g * g;
                    let m_hat = first[i] / (1.0 - b1.powi(step as i32));
                    let v_hat = second[i] / (1.0 - b2.powi(step as i32));
                    params[i] = w - lr * m_hat / (v_hat.sqrt() + f64::from(epsilon));
                }
            }
        }
    }
    params
}

#[test]
fn optimizer_steps_match_the_formulas() {
    let data = random_dataset(12, 4, 3, 4);
    let all: Vec<usize> = (0..12).collect();
    let sgd = |momentum, nesterov, weight_decay| Optimizer::Sgd {
        momentum,
        nesterov,
        weight_decay,
    };
    let adam = |weight_decay| Optimizer::Adam {
        beta1: 0.8,
        beta2: 0.9,
        epsilon: 1e-6,
        weight_decay,
    };
    // (optimizer, proximal_mu, learning rate): fused plain SGD (with and without weight
    // decay), the unfused SGD variants, Adam, and FedProx with each.
    let cases = [
        (sgd(0.0, false, 0.0), 0.0, 0.3),
        (sgd(0.0, false, 0.2), 0.0, 0.3),
        (sgd(0.9, false, 0.0), 0.0, 0.3),
        (sgd(0.5, true, 0.1), 0.0, 0.3),
        (sgd(0.0, false, 0.0), 0.5, 0.3),
        (sgd(0.9, true, 0.05), 2.0, 0.3),
        (adam(0.0), 0.0, 0.05),
        (adam(0.1), 0.0, 0.05),
        (adam(0.0), 1.0, 0.05),
    ];
    for spec_text in ["logreg:4-3", "mlp:4-5-3"] {
        let start = Model::new(spec(spec_text), 7);
        for (optimizer, proximal_mu, learning_rate) in cases {
            let config = FitConfig {
                optimizer,
                proximal_mu,
                ..FitConfig::new(3, 12, learning_rate, 1)
            };
            let expected = manual_steps(&start, &data, &config, 3);
            let mut model = start.clone();
            model.fit(&data, &all, &config).unwrap();
            for (index, (&actual, &expected)) in
                model.parameters().iter().zip(&expected).enumerate()
            {
                assert!(
                    (f64::from(actual) - expected).abs() < 2e-5 + 1e-4 * expected.abs(),
                    "{spec_text} {optimizer:?} mu {proximal_mu}: parameter {index}: {actual} vs {expected}"
                );
            }
            assert_ne!(model.parameters(), start.parameters());
        }
    }
}

#[test]
fn single_steps_match_hand_computation() {
    // logreg:1-2, one example x = 1 with label 0, W = [0.5, -0.5], b = [0, 0]:
    // logits [0.5, -0.5], softmax p0 = 1 / (1 + e^-1), gradient [p0 - 1, 1 - p0] for both
    // the weights (times x = 1) and the biases.
    let data = Dataset::new(vec![1.0], vec![0], 1, 2).unwrap();
    let p0 = 1.0 / (1.0 + (-1.0f64).exp());
    let g = 1.0 - p0; // 0.268941...
    let step = |optimizer: Optimizer, learning_rate: f32, epochs: u32| {
        let mut model = Model::new(spec("logreg:1-2"), 0);
        model.set_parameters(&[0.5, -0.5, 0.0, 0.0]).unwrap();
        let config = FitConfig {
            optimizer,
            ..FitConfig::new(epochs, 1, learning_rate, 0)
        };
        model.fit(&data, &[0], &config).unwrap();
        model.parameters().to_vec()
    };
    let close = |actual: &[f32], expected: [f64; 4]| {
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (f64::from(*a) - e).abs() < 1e-6,
                "{actual:?} vs {expected:?}"
            );
        }
    };
    // Plain SGD and momentum agree on the first step: w -= 0.1 * g.
    let sgd = [0.5 + 0.1 * g, -0.5 - 0.1 * g, 0.1 * g, -0.1 * g];
    close(&step(Optimizer::sgd(), 0.1, 1), sgd);
    let momentum = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    close(&step(momentum, 0.1, 1), sgd);
    // Nesterov's first step is (1 + momentum) times as long.
    let nesterov = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.0,
    };
    let d = 0.1 * 1.9 * g;
    close(&step(nesterov, 0.1, 1), [0.5 + d, -0.5 - d, d, -d]);
    // Weight decay 0.2 adds 0.2 * w to the gradient (biases are 0, so unaffected).
    let decayed = Optimizer::Sgd {
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.2,
    };
    close(
        &step(decayed, 0.1, 1),
        [
            0.5 - 0.1 * (-g + 0.1),
            -0.5 - 0.1 * (g - 0.1),
            0.1 * g,
            -0.1 * g,
        ],
    );
    // Adam's first step: the bias-corrected moments are g and g^2, so every parameter
    // moves by lr * |g| / (|g| + eps), about lr.
    let d = 0.01 * g / (g + 1e-8);
    close(
        &step(Optimizer::adam(), 0.01, 1),
        [0.5 + d, -0.5 - d, d, -d],
    );
    // Momentum's second step: v = 0.9 g1 + g2, with g2 at the moved parameters.
    let w = [0.5 + 0.1 * g, -0.5 - 0.1 * g];
    let b = [0.1 * g, -0.1 * g];
    let z = [w[0] + b[0], w[1] + b[1]];
    let q0 = 1.0 / (1.0 + (z[1] - z[0]).exp());
    let g2 = 1.0 - q0;
    let v = 0.9 * g + g2;
    close(
        &step(momentum, 0.1, 2),
        [
            w[0] + 0.1 * v,
            w[1] - 0.1 * v,
            b[0] + 0.1 * v,
            b[1] - 0.1 * v,
        ],
    );
}

#[test]
fn proximal_term_pulls_towards_the_start() {
    let data = random_dataset(64, 6, 3, 8);
    let all: Vec<usize> = (0..64).collect();
    let start = Model::new(spec("mlp:6-8-3"), 2);
    let drift = |proximal_mu: f32| {
        let mut model = start.clone();
        let config = FitConfig {
            proximal_mu,
            ..FitConfig::new(20, 8, 0.05, 3)
        };
        model.fit(&data, &all, &config).unwrap();
        model
            .parameters()
            .iter()
            .zip(start.parameters())
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (free, held) = (drift(0.0), drift(5.0));
    assert!(held < 0.5 * free, "drift with mu=5 {held} vs mu=0 {free}");
}

#[test]
fn optimizer_and_proximal_settings_are_validated() {
    let data = random_dataset(10, 4, 3, 0);
    let all: Vec<usize> = (0..10).collect();
    let mut model = Model::new(spec("logreg:4-3"), 0);
    let original = model.parameters().to_vec();
    let sgd = |momentum, nesterov, weight_decay| Optimizer::Sgd {
        momentum,
        nesterov,
        weight_decay,
    };
    let adam = |beta1, beta2, epsilon, weight_decay| Optimizer::Adam {
        beta1,
        beta2,
        epsilon,
        weight_decay,
    };
    let bad = [
        (sgd(-0.1, false, 0.0), 0.0, "momentum"),
        (sgd(1.0, false, 0.0), 0.0, "momentum"),
        (sgd(f32::NAN, false, 0.0), 0.0, "momentum"),
        (sgd(0.0, true, 0.0), 0.0, "Nesterov"),
        (sgd(0.5, false, -1.0), 0.0, "weight_decay"),
        (sgd(0.5, false, f32::INFINITY), 0.0, "weight_decay"),
        (adam(1.0, 0.999, 1e-8, 0.0), 0.0, "betas"),
        (adam(0.9, -0.1, 1e-8, 0.0), 0.0, "betas"),
        (adam(0.9, 0.999, 0.0, 0.0), 0.0, "epsilon"),
        (adam(0.9, 0.999, 1e-8, f32::NAN), 0.0, "weight_decay"),
        (Optimizer::sgd(), -0.5, "proximal_mu"),
        (Optimizer::sgd(), f32::NAN, "proximal_mu"),
    ];
    for (optimizer, proximal_mu, needle) in bad {
        let config = FitConfig {
            optimizer,
            proximal_mu,
            ..FitConfig::new(1, 4, 0.1, 0)
        };
        match model.fit(&data, &all, &config) {
            Err(error @ TrainError::InvalidConfig(_)) => {
                assert!(error.to_string().contains(needle), "{error}")
            }
            other => panic!("{optimizer:?} mu {proximal_mu}: {other:?}"),
        }
    }
    assert_eq!(model.parameters(), original.as_slice());
    assert_eq!(FitConfig::default().optimizer, Optimizer::default());
    assert_eq!(Optimizer::default(), Optimizer::sgd());
    assert_eq!(
        FitConfig::new(2, 8, 0.5, 9),
        FitConfig {
            epochs: 2,
            batch_size: 8,
            learning_rate: 0.5,
            seed: 9,
            ..Default::default()
        }
    );
}

#[test]
fn cnn_training_with_dropout_and_adam_is_bit_identical_for_a_seed() {
    let data = synthetic::generate(60, 4);
    let indices: Vec<usize> = (0..60).collect();
    let run = |spec_text: &str, fit_seed: u64, optimizer: Optimizer| {
        let mut model = Model::new(spec(spec_text), 1);
        let config = FitConfig {
            optimizer,
            proximal_mu: 0.1,
            ..FitConfig::new(2, 8, 0.01, fit_seed)
        };
        let stats = model.fit(&data, &indices, &config).unwrap();
        (model.parameters().to_vec(), stats)
    };
    let dropout = "cnn:1x28x28-c3k5s2p2-m2-d16-drop50-10";
    for optimizer in [Optimizer::adam(), Optimizer::sgd()] {
        let (params, stats) = run(dropout, 1, optimizer);
        let (again, stats_again) = run(dropout, 1, optimizer);
        assert!(
            params
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(stats, stats_again);
        assert_ne!(params, run(dropout, 2, optimizer).0, "the seed must matter");
        // Dropout changes training (same parameter layout, same init, same shuffles).
        assert_ne!(
            params,
            run("cnn:1x28x28-c3k5s2p2-m2-d16-10", 1, optimizer).0
        );
    }
    // Evaluation has dropout off: repeatable, and equal to the gradient pass's stats.
    let model = Model::new(spec(dropout), 3);
    let eval = model.evaluate(&data, &indices).unwrap();
    assert_eq!(eval, model.evaluate(&data, &indices).unwrap());
    assert_eq!(eval, model.gradient(&data, &indices).unwrap().0);
}

/// An evaluation reads consecutive examples in place (no row copy) where the network
/// allows it, and gets exactly what the copying path gets: the gradient pass always
/// copies, and shuffled indices copy too.
#[test]
fn evaluation_in_place_matches_the_copying_path() {
    let data = synthetic::generate(300, 4);
    for text in ["mlp:784-64-10", "cnn:1x28x28-c4k5p2-m2-d16-10"] {
        let model = Model::try_new(spec(text), 7).unwrap();
        assert_eq!(
            model.network.reads_input_in_place(),
            text.starts_with("mlp"),
            "{text}"
        );
        let consecutive: Vec<usize> = (10..290).collect();
        let evaluated = model.evaluate(&data, &consecutive).unwrap();
        let (copied, _) = model.gradient(&data, &consecutive).unwrap();
        assert_eq!(evaluated.loss.to_bits(), copied.loss.to_bits(), "{text}");
        assert_eq!(evaluated.accuracy, copied.accuracy, "{text}");
        // Batches of 256 here: one in place, one of 24; and a mixed batch.
        let mut mixed = consecutive.clone();
        mixed.swap(3, 260);
        let (mixed_copied, _) = model.gradient(&data, &mixed).unwrap();
        let mixed_evaluated = model.evaluate(&data, &mixed).unwrap();
        assert_eq!(mixed_evaluated.loss.to_bits(), mixed_copied.loss.to_bits());
    }
    assert_eq!(consecutive_rows(&[4, 5, 6]), Some(4..7));
    assert_eq!(consecutive_rows(&[4, 6]), None);
    assert_eq!(consecutive_rows(&[]), None);
    assert_eq!(consecutive_rows(&[usize::MAX, 0]), None);
    assert_eq!(consecutive_rows(&[usize::MAX]), None);
    // Hostile indices are refused with an error, never an overflow.
    let model = Model::try_new(spec("mlp:784-64-10"), 7).unwrap();
    for indices in [vec![usize::MAX], vec![usize::MAX / 784 + 1], vec![299, 300]] {
        assert!(model.evaluate(&data, &indices).is_err(), "{indices:?}");
    }
}

#[test]
fn training_scratch_is_known_before_anything_is_allocated() {
    // cnn:mnist: activations 784 + 25,088 + 6,272 + 12,544 + 3,136 + 512 + 10 and two
    // label slots per example, two gradient buffers of the largest (25,088), and one
    // im2col matrix of the second convolution (32 x 25 rows, 14 x 14 columns).
    let per_example = 48_346 + 2 + 2 * 25_088;
    assert_eq!(
        ModelSpec::cnn_mnist().training_scratch_bytes(64).unwrap(),
        4 * (per_example * 64 + 32 * 25 * 196)
    );
    // Few parameters (786k), huge activations: 51M values an example in the first
    // convolution's output, so a batch of 32 would take 20 GB.
    let wide: ModelSpec = "cnn:1x28x28-c65536k1-m28-10".parse().unwrap();
    assert!(wide.num_params() < 1_000_000);
    assert!(wide.training_scratch_bytes(32).unwrap() > 16 << 30);
    assert_eq!(
        wide.training_scratch_bytes(usize::MAX).unwrap(),
        u64::MAX,
        "saturates"
    );
    // Evaluations shrink their batch to stay within their scratch budget; small
    // models keep the full batch.
    let model = Model::new(wide, 0);
    assert_eq!(model.eval_batch(Purpose::Evaluate), 1);
    assert_eq!(model.eval_batch(Purpose::Train), 1);
    let model = Model::new(ModelSpec::cnn_mnist(), 0);
    assert_eq!(model.eval_batch(Purpose::Evaluate), EVAL_BATCH);
}
