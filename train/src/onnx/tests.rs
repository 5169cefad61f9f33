//! Import, export and round-trip checks against tract, on fixtures made by PyTorch's
//! exporter (tests/fixtures/onnx, see make_fixtures.py there).

use std::path::PathBuf;

use prost::Message;
use rand::RngExt;

use super::*;
use crate::rng::seeded;
use crate::{Dataset, FitConfig, MAX_NET_LAYERS, Optimizer};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/onnx")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn random_inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = seeded(seed);
    (0..len).map(|_| rng.random_range(-1.5f32..1.5)).collect()
}

fn example_shape(spec: &ModelSpec) -> Vec<usize> {
    match spec {
        ModelSpec::Net { input, .. } => input.clone(),
        ModelSpec::Cnn { input, .. } => input.to_vec(),
        _ => vec![spec.input_dim()],
    }
}

/// Largest |fedquic - tract| over a random batch, fedquic's model against tract running
/// `bytes`.
fn max_difference(model: &Model, bytes: &[u8], seed: u64) -> f32 {
    let batch = 7;
    let inputs = random_inputs(batch * model.spec().input_dim(), seed);
    let ours = model.outputs(&inputs).unwrap();
    let runner = OnnxRunner::new(bytes, &example_shape(model.spec()), batch).unwrap();
    let (theirs, width) = runner.run(&inputs).unwrap();
    assert_eq!(width, model.spec().num_classes());
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

const IMPORTABLE: [(&str, &str); 6] = [
    (
        "mlp.onnx",
        "net:20-fc16-relu-fc12-tanh-fc8-sigmoid-fc3-softmax",
    ),
    (
        "cnn.onnx",
        "net:1x12x12-conv4k3p1-relu-max2-conv6k3-relu-avg2-flat-fc16-relu-fc5-logsoftmax",
    ),
    (
        "batchnorm.onnx",
        "net:3x8x8-conv8k3s2p1-bn0.00001-relu-gap-flat-fc6-bn0.00001-relu-fc4",
    ),
    ("dropout.onnx", "net:10-fc12-relu-drop0.3-fc4"),
    ("matmul_add.onnx", "net:12-fc9-relu-fc4-softmax"),
    ("keras_mlp.onnx", "net:12-fc9-tanh-fc4-softmax"),
];

#[test]
fn imports_fixtures_and_matches_tract() {
    for (name, expected) in IMPORTABLE {
        let bytes = fixture(name);
        let imported = import_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(imported.spec.to_string(), expected, "{name}");
        // The canonical spec parses back to the same structure.
        assert_eq!(expected.parse::<ModelSpec>().unwrap(), imported.spec);
        let model = imported.model().unwrap();
        // tract refuses a training-mode Dropout; export writes it in inference mode.
        let bytes = if name == "dropout.onnx" {
            let run = OnnxRunner::new(&bytes, &[10], 2).and_then(|r| r.run(&[0.0; 20]));
            assert!(run.is_err());
            export_imported(&bytes, &imported.parameters).unwrap()
        } else {
            bytes
        };
        for seed in 0..3 {
            let difference = max_difference(&model, &bytes, seed);
            assert!(
                difference <= 1e-5,
                "{name}: fedquic and tract differ by {difference}"
            );
        }
    }
}

#[test]
fn keeps_the_files_names() {
    let imported = import_bytes(&fixture("matmul_add.onnx")).unwrap();
    assert_eq!(imported.input_name, "features");
    assert_eq!(imported.output_name, "probs");
    // MatMul weights are stored [in, out]; fedquic's dense0.weight is [out, in].
    let tensors = imported.spec.tensors();
    assert_eq!(tensors[0].shape, vec![9, 12]);
}

#[test]
fn refuses_unsupported_ops_clearly() {
    let error = import_bytes(&fixture("unsupported.onnx")).unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, OnnxError::UnsupportedOp { op, node } if op == "LeakyRelu" && node == "/LeakyRelu"),
        "{text}"
    );
    for part in [
        "LeakyRelu",
        "/LeakyRelu",
        "Gemm",
        "BatchNormalization",
        "Softmax",
    ] {
        assert!(text.contains(part), "{text}");
    }
}

#[test]
fn refuses_files_that_are_not_onnx() {
    for bytes in [
        b"".to_vec(),
        b"label,f1,f2\n1,0.5,0.25\n".to_vec(),
        random_inputs(100, 3)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    ] {
        let error = import_bytes(&bytes).unwrap_err();
        assert!(matches!(error, OnnxError::NotOnnx(_)), "{error}");
    }
    let error = ModelSource::parse("onnx:/nonexistent/model.onnx").unwrap_err();
    assert!(matches!(error, OnnxError::Io { .. }), "{error}");
}

#[test]
fn refuses_dynamic_shapes() {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    // A symbolic feature axis.
    let mut model = import::decode(&fixture("mlp.onnx")).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let Some(tract_onnx::pb::type_proto::Value::TensorType(tensor)) =
        graph.input[0].r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("input is a tensor");
    };
    tensor.shape.as_mut().unwrap().dim[1].value = Some(Value::DimParam("features".into()));
    let error = import_bytes(&model.encode_to_vec()).unwrap_err();
    assert!(matches!(error, OnnxError::DynamicShape(_)), "{error}");
    assert!(error.to_string().contains("features"), "{error}");

    // A Reshape whose shape is computed at run time.
    let mut model = import::decode(&fixture("batchnorm.onnx")).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let reshape = graph
        .node
        .iter_mut()
        .find(|n| n.op_type == "Reshape")
        .unwrap();
    reshape.input[1] = "computed_shape".into();
    let error = import_bytes(&model.encode_to_vec()).unwrap_err();
    assert!(matches!(error, OnnxError::DynamicShape(_)), "{error}");
    assert!(error.to_string().contains("/Reshape"), "{error}");
}

/// Specs covering every layer type a model can have.
const EXPORTABLE: [&str; 6] = [
    "logreg:10-3",
    "mlp:20-16-12-4",
    "cnn:1x12x12-c4k3p1-m2-c6k3s2-d8-drop50-3",
    "net:3x8x8-conv4k3p1-bn0.001-relu-max2-conv5k2-sigmoid-avg1-tanh-avg2s1-gap-flat-drop0.25-fc6-relu-fc3-softmax",
    "net:12-fc8-tanh-bn0.00001-fc4-logsoftmax",
    "net:2x6x6-conv3k3s2-relu-fc5",
];

/// A model with random weights, and batch-norm variances in [0.5, 1.5].
fn random_model(spec: &str, seed: u64) -> Model {
    let spec: ModelSpec = spec.parse().unwrap();
    let mut model = Model::new(spec.clone(), seed);
    let mut params = model.parameters().to_vec();
    let mut rng = seeded(seed + 100);
    let mut offset = 0;
    for tensor in spec.tensors() {
        for value in &mut params[offset..offset + tensor.len()] {
            if tensor.name.ends_with("running_var") {
                *value = rng.random_range(0.5f32..1.5);
            } else {
                *value += rng.random_range(-0.3f32..0.3);
            }
        }
        offset += tensor.len();
    }
    model.set_parameters(&params).unwrap();
    model
}

#[test]
fn exports_every_layer_type_and_tract_agrees() {
    for spec in EXPORTABLE {
        let model = random_model(spec, 1);
        let bytes = export_model(&model).unwrap();
        let difference = max_difference(&model, &bytes, 9);
        assert!(
            difference <= 1e-5,
            "{spec}: fedquic and tract differ by {difference}"
        );
        // A fresh export imports back to the same weights, bit for bit.
        let imported = import_bytes(&bytes).unwrap();
        assert_eq!(imported.parameters, model.parameters(), "{spec}");
        assert_eq!(imported.spec.num_params(), model.spec().num_params());
        let again = imported.model().unwrap();
        assert!(max_difference(&again, &bytes, 4) <= 1e-5, "{spec}");
    }
}

fn random_dataset(dim: usize, classes: usize, examples: usize, seed: u64) -> Dataset {
    let mut rng = seeded(seed);
    let features = random_inputs(dim * examples, seed);
    let labels = (0..examples)
        .map(|_| rng.random_range(0..classes as u8))
        .collect();
    Dataset::new(features, labels, dim, classes).unwrap()
}

#[test]
fn round_trip_import_train_export_reimport() {
    for name in [
        "cnn.onnx",
        "batchnorm.onnx",
        "matmul_add.onnx",
        "dropout.onnx",
        "keras_mlp.onnx",
    ] {
        let original = fixture(name);
        let imported = import_bytes(&original).unwrap();
        let mut model = imported.model().unwrap();
        let data = random_dataset(model.spec().input_dim(), model.spec().num_classes(), 24, 5);
        let indices: Vec<usize> = (0..data.len()).collect();
        let config = FitConfig {
            optimizer: Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.01,
            },
            ..FitConfig::new(2, 8, 0.05, 3)
        };
        model.fit(&data, &indices, &config).unwrap();
        assert_ne!(
            model.parameters(),
            imported.parameters.as_slice(),
            "{name} trained"
        );

        let exported = export_imported(&original, model.parameters()).unwrap();
        let again = import_bytes(&exported).unwrap();
        assert_eq!(again.spec, imported.spec, "{name}");
        let same_bits = again
            .parameters
            .iter()
            .zip(model.parameters())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same_bits, "{name}: weights changed in the round trip");
        let reloaded = again.model().unwrap();
        let inputs = random_inputs(3 * model.spec().input_dim(), 8);
        assert_eq!(
            reloaded.outputs(&inputs).unwrap(),
            model.outputs(&inputs).unwrap()
        );
        assert!(max_difference(&model, &exported, 2) <= 1e-5, "{name}");

        // The user's graph keeps its node, input and output names.
        let before = import::decode(&original).unwrap().graph.unwrap();
        let after = import::decode(&exported).unwrap().graph.unwrap();
        // (A bias the file lacked adds a node; every original node stays, same name and op.)
        for node in &before.node {
            assert!(
                after
                    .node
                    .iter()
                    .any(|n| n.name == node.name && n.op_type == node.op_type),
                "{name}: node {:?} lost",
                node.name
            );
        }
        assert_eq!(before.input, after.input);
        assert_eq!(before.output, after.output);
    }
}

#[test]
fn batch_norm_statistics_stay_frozen_in_training() {
    let imported = import_bytes(&fixture("batchnorm.onnx")).unwrap();
    let mut model = imported.model().unwrap();
    let data = random_dataset(model.spec().input_dim(), 4, 16, 1);
    let indices: Vec<usize> = (0..data.len()).collect();
    for optimizer in [
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        },
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
        },
        Optimizer::default(),
    ] {
        let config = FitConfig {
            optimizer,
            ..FitConfig::new(2, 4, 0.05, 3)
        };
        model.fit(&data, &indices, &config).unwrap();
        let mut offset = 0;
        let mut scales_moved = false;
        for tensor in model.spec().tensors() {
            let now = &model.parameters()[offset..offset + tensor.len()];
            let then = &imported.parameters[offset..offset + tensor.len()];
            if tensor.name.contains("running_") {
                assert_eq!(now, then, "{} moved with {optimizer:?}", tensor.name);
            } else if tensor.name.starts_with("bn") {
                scales_moved |= now != then;
            }
            offset += tensor.len();
        }
        assert!(scales_moved, "batch-norm scale and bias train");
    }
}

/// Finite differences of the mean loss against `Model::gradient` for the new layers.
#[test]
fn new_layers_have_correct_gradients() {
    for spec in [
        "net:2x6x6-conv3k3p1-bn0.01-sigmoid-avg2-tanh-gap-flat-fc3",
        "net:2x4x4-avg2s1-conv2k2-tanh-flat-bn0.001-sigmoid-fc3",
    ] {
        let model = random_model(spec, 2);
        let data = random_dataset(model.spec().input_dim(), 3, 6, 4);
        let indices: Vec<usize> = (0..data.len()).collect();
        let (_, analytic) = model.gradient(&data, &indices).unwrap();
        let base = model.parameters().to_vec();
        let mut probe = model.clone();
        let mut checked = 0;
        let mut offset = 0;
        for tensor in model.spec().tensors() {
            for index in offset..offset + tensor.len() {
                let step = 1e-2f32;
                let mut loss_at = |delta: f32| {
                    let mut params = base.clone();
                    params[index] += delta;
                    probe.set_parameters(&params).unwrap();
                    f64::from(probe.evaluate(&data, &indices).unwrap().loss)
                };
                let numeric = ((loss_at(step) - loss_at(-step)) / (2.0 * f64::from(step))) as f32;
                let expected = if tensor.name.contains("running_") {
                    0.0
                } else {
                    numeric
                };
                let got = analytic[index];
                assert!(
                    (got - expected).abs() <= 2e-3 + 2e-2 * expected.abs(),
                    "{spec} {}[{}]: analytic {got}, numeric {expected}",
                    tensor.name,
                    index - offset
                );
                checked += 1;
            }
            offset += tensor.len();
        }
        assert!(checked > 50);
    }
}

#[test]
fn net_specs_parse_and_print_back() {
    for text in EXPORTABLE.iter().chain(IMPORTABLE.iter().map(|(_, s)| s)) {
        let spec: ModelSpec = text.parse().unwrap();
        assert_eq!(spec.to_string().parse::<ModelSpec>().unwrap(), spec);
    }
    for bad in [
        "net:",
        "net:0-fc3",
        "net:10-fc1",
        "net:10-conv3k3-fc2",
        "net:1x4x4-max5-fc2",
        "net:10-drop1.5-fc2",
        "net:10-drop-fc2",
        "net:10-bn0-fc2",
        "net:10-softmax-fc2",
        "net:10-leaky-fc2",
        "net:10-fc2s2",
        "net:1x2-fc2",
    ] {
        assert!(bad.parse::<ModelSpec>().is_err(), "{bad}");
    }
    let huge = format!("net:4{}-fc2", "-relu".repeat(MAX_NET_LAYERS + 1));
    assert!(huge.parse::<ModelSpec>().is_err());
}

#[test]
fn model_source_exports_specs_and_imports() {
    let source = ModelSource::parse("mlp:4-3-2").unwrap();
    let params = source.initial_parameters(1).unwrap();
    let bytes = source.export(&params).unwrap();
    assert_eq!(import_bytes(&bytes).unwrap().parameters, params);
    assert!(
        ModelSource::parse("vector:5")
            .unwrap()
            .export(&[0.0; 5])
            .is_err()
    );
    assert!(source.export(&params[1..]).is_err());
}

#[test]
fn shared_initializers_are_untied_and_oversized_inputs_refused() {
    // Two square dense layers reading one initializer (PyTorch's exporter merges
    // initializers of equal value): each becomes its own parameter, and export
    // gives each layer its own copy, so training them apart survives the round trip.
    let bytes = export_model(&random_model("mlp:8-8-8-3", 2)).unwrap();
    let mut model = import::decode(&bytes).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let weights: Vec<String> = graph
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "Gemm" | "MatMul"))
        .map(|n| n.input[1].clone())
        .collect();
    assert!(weights.len() >= 2, "{weights:?}");
    let second = graph
        .node
        .iter_mut()
        .filter(|n| matches!(n.op_type.as_str(), "Gemm" | "MatMul"))
        .nth(1)
        .unwrap();
    second.input[1] = weights[0].clone();
    let tied = model.encode_to_vec();
    let imported = import_bytes(&tied).unwrap();
    let (first, rest) = imported.parameters.split_at(8 * 8 + 8);
    assert_eq!(
        &first[..64],
        &rest[..64],
        "both layers start from the shared tensor"
    );
    let mut trained = imported.parameters.clone();
    for (i, v) in trained[72..136].iter_mut().enumerate() {
        *v += 0.01 * i as f32;
    }
    let exported = export::export_imported(&tied, &trained).unwrap();
    let again = import_bytes(&exported).unwrap();
    assert_eq!(again.parameters, trained, "each layer kept its own weights");

    // An image input of 2^22 x 2^22 x 2^22 values: the product overflowed
    // (a panic in debug builds) in the shapes computed from it.
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    let bytes = export_model(&random_model("cnn:1x12x12-c4k3p1-m2-3", 3)).unwrap();
    let mut model = import::decode(&bytes).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let Some(tract_onnx::pb::type_proto::Value::TensorType(tensor)) =
        graph.input[0].r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("input is a tensor");
    };
    for dim in &mut tensor.shape.as_mut().unwrap().dim[1..] {
        dim.value = Some(Value::DimValue(1 << 22));
    }
    let error = import_bytes(&model.encode_to_vec()).unwrap_err();
    assert!(error.to_string().contains("values per example"), "{error}");
}
