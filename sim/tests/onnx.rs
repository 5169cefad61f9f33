//! `fedquic-sim --model onnx:FILE --export-onnx OUT`: federate an ONNX model, export the
//! result, and check another runtime (tract) sees the accuracy the simulator reported.

use fedquic_sim::{SimConfig, simulate};
use fedquic_train::onnx::{self, ModelSource};
use fedquic_train::{DataSpec, Model};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federates_an_onnx_model_and_exports_the_result() {
    let dir = tempfile::tempdir().unwrap();
    // A user's file: weights, names and a softmax output of its own.
    let start = Model::new("net:784-fc32-tanh-fc10-softmax".parse().unwrap(), 7);
    let start_path = dir.path().join("start.onnx");
    std::fs::write(&start_path, onnx::export_model(&start).unwrap()).unwrap();
    let out_path = dir.path().join("federated.onnx");
    let data = "synthetic:1200/300:5";
    let config = SimConfig {
        clients: 4,
        rounds: 2,
        model: format!("onnx:{}", start_path.display()),
        data: data.into(),
        learning_rate: 0.1,
        export_onnx: Some(out_path.clone()),
        ..SimConfig::default()
    };
    let result = simulate(config, |_| {}).await.unwrap();
    let reported = result.final_test_accuracy.unwrap();

    let bytes = std::fs::read(&out_path).unwrap();
    let exported = onnx::import_bytes(&bytes).unwrap();
    assert_eq!(exported.spec, *start.spec(), "the structure is the file's");
    assert_ne!(
        exported.parameters,
        start.parameters(),
        "the weights trained"
    );
    // The simulator started from the file's weights, not a seeded initialisation.
    let source = ModelSource::parse(&format!("onnx:{}", start_path.display())).unwrap();
    assert_eq!(source.initial_parameters(99).unwrap(), start.parameters());

    let (_, test) = data.parse::<DataSpec>().unwrap().load().unwrap();
    let prediction = fedquic_client::predict::predict(&bytes, &test, 128).unwrap();
    assert!(
        (prediction.accuracy - reported).abs() <= 1.0 / test.len() as f64 + 1e-9,
        "tract {} vs fedquic {reported}",
        prediction.accuracy
    );
    assert!(reported > 0.3, "accuracy {reported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_unsupported_onnx_model_before_starting() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/onnx/unsupported.onnx");
    let config = SimConfig {
        model: format!("onnx:{}", fixture.display()),
        ..SimConfig::default()
    };
    let error = simulate(config, |_| {}).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("LeakyRelu") && text.contains("Gemm"),
        "{text}"
    );
}
