//! Codecs in the simulator: clients on different codecs in one run, over
//! real QUIC, and what each one sent in the metrics.

use fedquic_sim::simulate::SimCodecs;
use fedquic_sim::{SimConfig, simulate};

fn small(codecs: SimCodecs) -> SimConfig {
    SimConfig {
        clients: 6,
        fraction: 1.0,
        rounds: 3,
        model: "mlp:784-16-10".into(),
        data: "synthetic:600/200:5".into(),
        learning_rate: 0.1,
        threads: 2,
        seed: 3,
        codecs,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_codecs_train_together_and_each_clients_bytes_are_recorded() {
    let mixed = simulate(
        small(SimCodecs {
            uplink: "top-k:0.1+int8,f16,f32".into(),
            downlink: "f16,f32".into(),
            client_offers: Some("f32;f16;top-k:1+int8,f32".into()),
            error_feedback: true,
        }),
        |_| {},
    )
    .await
    .unwrap();
    let plain = simulate(small(SimCodecs::default()), |_| {}).await.unwrap();

    let traffic = &mixed.rounds.last().unwrap().client_traffic;
    assert_eq!(traffic.len(), 6);
    let mut uplinks: Vec<&str> = traffic.values().map(|t| t.uplink.as_str()).collect();
    uplinks.sort();
    assert_eq!(
        uplinks,
        [
            "f16",
            "f16",
            "f32",
            "f32",
            "top-k:0.1+int8",
            "top-k:0.1+int8"
        ]
    );
    // Models go as f16 to clients that offer it, as f32 to the others.
    for t in traffic.values() {
        let params = 784 * 16 + 16 + 16 * 10 + 10;
        let (up, down) = match (t.uplink.as_str(), t.downlink.as_str()) {
            ("f32", "f32") => (4 * params, 4 * params),
            ("f16", "f16") => (2 * params, 2 * params),
            ("top-k:0.1+int8", "f32") => (0, 4 * params),
            other => panic!("unexpected codecs {other:?}"),
        };
        assert_eq!(t.bytes_down, down as u64);
        if up > 0 {
            assert_eq!(t.bytes_up, up as u64);
        } else {
            // 10% of the values at about 2-3 bytes each.
            assert!(t.bytes_up < (params as u64) / 2, "{}", t.bytes_up);
        }
    }
    let sent = |r: &fedquic_sim::SimResult| r.rounds.iter().map(|r| r.bytes_up).sum::<u64>();
    // Two clients of six on f32: about half the bytes of an all-f32 run.
    assert!(sent(&mixed) < sent(&plain) * 6 / 10);
    // Compression costs little here: both runs learn (10 classes: chance is 0.1).
    let (m, p) = (
        mixed.final_test_accuracy.unwrap(),
        plain.final_test_accuracy.unwrap(),
    );
    assert!(m > 0.2 && p > 0.2 && (m - p).abs() < 0.1, "{m} vs {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_codec_no_client_offers_is_a_clear_error() {
    let err = simulate(
        small(SimCodecs {
            uplink: "f64".into(),
            ..SimCodecs::default()
        }),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--codec: unknown codec"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offer_the_aggregator_refuses_is_an_error_not_a_hang() {
    let err = simulate(
        small(SimCodecs {
            uplink: "int8".into(),
            client_offers: Some("int8,f32;f16".into()),
            ..SimCodecs::default()
        }),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("--client-codecs") && err.to_string().contains("\"f16\""),
        "{err}"
    );
}
