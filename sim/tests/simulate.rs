//! The simulator end to end: real QUIC + mTLS on loopback, outputs written.

use fedquic_sim::{SimConfig, simulate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_simulation_learns_and_writes_reports() {
    let out = tempfile::tempdir().unwrap();
    let config = SimConfig {
        clients: 6,
        fraction: 0.5,
        rounds: 3,
        model: "mlp:784-32-10".into(),
        data: "synthetic:1200/300:5".into(),
        partition: "dirichlet:0.5".into(),
        learning_rate: 0.1,
        fraction_evaluate: 0.5,
        out: Some(out.path().to_path_buf()),
        ..SimConfig::default()
    };
    let mut seen = Vec::new();
    let result = simulate(config.clone(), |r| seen.push(r.outcome.round))
        .await
        .unwrap();
    assert_eq!(seen, vec![1, 2, 3], "every round reported, in order");
    for r in &result.rounds {
        assert_eq!(r.outcome.clients_selected, 3, "fraction 0.5 of 6 clients");
        assert_eq!(r.outcome.clients_answered, 3);
        let fed = r
            .outcome
            .federated_eval
            .as_ref()
            .expect("federated evaluation ran");
        assert_eq!(fed.clients, 3);
    }
    let acc = result.final_test_accuracy.unwrap();
    assert!(acc > 0.3, "accuracy {acc}");
    let csv = std::fs::read_to_string(out.path().join("rounds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 rounds");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["rounds"].as_array().unwrap().len(), 3);
    assert_eq!(
        std::fs::read_to_string(out.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // The same seed gives the same run.
    let again = simulate(
        SimConfig {
            out: None,
            ..config
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.final_test_accuracy, result.final_test_accuracy);
    assert_eq!(again.final_test_loss, result.final_test_loss);
}

#[tokio::test]
async fn bad_settings_are_clear_errors() {
    for (config, needle) in [
        (
            SimConfig {
                clients: 0,
                ..SimConfig::default()
            },
            "--clients",
        ),
        (
            SimConfig {
                model: "mlp:10-10".into(),
                ..SimConfig::default()
            },
            "model",
        ),
        (
            SimConfig {
                model: "mlp:784-10-3".into(),
                data: "synthetic:100".into(),
                ..SimConfig::default()
            },
            "classes",
        ),
        (
            SimConfig {
                data: "mnist:/nonexistent".into(),
                ..SimConfig::default()
            },
            "mnist",
        ),
        (
            SimConfig {
                partition: "shards:x".into(),
                ..SimConfig::default()
            },
            "shards",
        ),
        // The aggregator's config errors name the simulator's flags.
        (
            SimConfig {
                privacy: Some(fedquic_aggregator::config::DifferentialPrivacyConfig {
                    mode: "everywhere".into(),
                    ..Default::default()
                }),
                ..SimConfig::default()
            },
            "--dp must be",
        ),
        (
            SimConfig {
                privacy: Some(fedquic_aggregator::config::DifferentialPrivacyConfig {
                    mode: "distributed".into(),
                    ..Default::default()
                }),
                ..SimConfig::default()
            },
            "needs --secagg",
        ),
        (
            SimConfig {
                secure_aggregation: Some(Default::default()),
                strategy: fedquic_aggregator::strategy::StrategyConfig {
                    name: "krum".into(),
                    ..Default::default()
                },
                ..SimConfig::default()
            },
            "--secagg",
        ),
        // Bounded before use (a Duration or semaphore of these sizes panicked).
        (
            SimConfig {
                round_deadline_secs: 1e20,
                ..SimConfig::default()
            },
            "--round-deadline",
        ),
        (
            SimConfig {
                threads: usize::MAX,
                ..SimConfig::default()
            },
            "--threads",
        ),
        (
            SimConfig {
                clients: usize::MAX,
                ..SimConfig::default()
            },
            "--clients",
        ),
    ] {
        let err = simulate(config, |_| {}).await.expect_err(needle);
        assert!(
            format!("{err:#}").contains(needle),
            "{err:#} should mention {needle}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_runs_in_the_simulator_over_a_lossy_codec_and_learns() {
    // SCAFFOLD's control variates travel both ways (the update carries
    // Delta y and Delta c); each virtual client keeps its c_i and, with int8
    // updates, its error-feedback residual over both halves.
    let base = SimConfig {
        clients: 6,
        fraction: 0.5,
        rounds: 4,
        model: "mlp:784-32-10".into(),
        data: "synthetic:1200/300:5".into(),
        partition: "shards:2".into(),
        learning_rate: 0.1,
        threads: 2,
        seed: 4,
        strategy: fedquic_aggregator::strategy::StrategyConfig {
            name: "scaffold".into(),
            ..Default::default()
        },
        ..SimConfig::default()
    };
    let params = (784 * 32 + 32 + 32 * 10 + 10) as u64;
    let f32_run = simulate(base.clone(), |_| {}).await.unwrap();
    let int8_run = simulate(
        SimConfig {
            codecs: fedquic_sim::simulate::SimCodecs {
                uplink: "int8".into(),
                ..Default::default()
            },
            ..base
        },
        |_| {},
    )
    .await
    .unwrap();
    for run in [&f32_run, &int8_run] {
        assert_eq!(run.rounds.len(), 4);
        for r in &run.rounds {
            assert_eq!(r.outcome.clients_answered, 3);
            // Models go down with c: twice the parameters, as f32.
            for t in r.client_traffic.values() {
                assert_eq!(t.bytes_down, 2 * params * 4);
            }
        }
        assert!(run.final_test_accuracy.unwrap() > 0.2);
    }
    // Updates carry Delta y and Delta c: 8 bytes a parameter in f32, about
    // 2 in int8.
    let up = |run: &fedquic_sim::SimResult| {
        run.rounds[0]
            .client_traffic
            .values()
            .map(|t| t.bytes_up)
            .sum::<u64>()
            / 3
    };
    assert_eq!(up(&f32_run), 2 * params * 4);
    assert!(up(&int8_run) < 2 * params * 11 / 10, "{}", up(&int8_run));
    let (a, b) = (
        f32_run.final_test_accuracy.unwrap(),
        int8_run.final_test_accuracy.unwrap(),
    );
    assert!((a - b).abs() < 0.1, "f32 {a} vs int8 {b}");
}

/// Secure aggregation with distributed DP in the simulator: the masked sums
/// train the model about as well as plain FedAvg, epsilon grows every round
/// in rounds.csv, and the same seed gives the same run (the masks cancel
/// exactly; the noise is part of the seed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_with_distributed_dp_learns_and_reports_epsilon() {
    use fedquic_aggregator::config::{DifferentialPrivacyConfig, SecureAggregationConfig};
    let out = tempfile::tempdir().unwrap();
    let base = SimConfig {
        clients: 8,
        fraction: 0.75,
        rounds: 4,
        model: "mlp:784-32-10".into(),
        data: "synthetic:1200/300:5".into(),
        partition: "iid".into(),
        learning_rate: 0.1,
        ..SimConfig::default()
    };
    let plain = simulate(base.clone(), |_| {}).await.unwrap();
    let config = SimConfig {
        out: Some(out.path().to_path_buf()),
        secure_aggregation: Some(SecureAggregationConfig {
            enabled: true,
            ..Default::default()
        }),
        privacy: Some(DifferentialPrivacyConfig {
            enabled: true,
            mode: "distributed".into(),
            clip_norm: 5.0,
            noise_multiplier: 0.01,
            ..Default::default()
        }),
        ..base
    };
    let secure = simulate(config.clone(), |_| {}).await.unwrap();
    let (a, b) = (
        plain.final_test_accuracy.unwrap(),
        secure.final_test_accuracy.unwrap(),
    );
    assert!(b > 0.3 && (a - b).abs() < 0.15, "plain {a}, secure {b}");
    let mut last = 0.0;
    for r in &secure.rounds {
        let s = r.outcome.secagg.as_ref().unwrap();
        assert_eq!(s.masked, 6, "{s:?}");
        let p = r.outcome.privacy.as_ref().unwrap();
        assert!(p.epsilon > last, "{p:?}");
        last = p.epsilon;
    }
    let csv = std::fs::read_to_string(out.path().join("rounds.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let eps = header.iter().position(|h| *h == "epsilon").unwrap();
    let row: Vec<&str> = csv.lines().nth(4).unwrap().split(',').collect();
    assert_eq!(row.len(), header.len());
    assert!((row[eps].parse::<f64>().unwrap() - last).abs() < 1e-9);
    let again = simulate(
        SimConfig {
            out: None,
            ..config
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.final_test_accuracy, secure.final_test_accuracy);
}

/// The in-process network (`--transport mem`): the same QUIC and TLS with
/// no sockets; the run learns as over UDP, and a shaped link is real (each
/// round pays at least the link's round trips and the model's transfer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_transport_learns_like_udp_and_shapes_links() {
    let base = SimConfig {
        clients: 6,
        fraction: 0.5,
        rounds: 3,
        model: "mlp:784-16-10".into(),
        data: "synthetic:1200/300:5".into(),
        learning_rate: 0.1,
        ..SimConfig::default()
    };
    let udp = simulate(base.clone(), |_| {}).await.unwrap();
    let mem = simulate(
        SimConfig {
            transport: "mem".into(),
            ..base.clone()
        },
        |_| {},
    )
    .await
    .unwrap();
    let (a, b) = (
        udp.final_test_accuracy.unwrap(),
        mem.final_test_accuracy.unwrap(),
    );
    assert!(b > 0.3 && (a - b).abs() < 0.05, "udp {a}, mem {b}");
    // 50 ms each way and 8 Mbit/s: a 50 kB model and update take >= 2 x
    // (50 ms + 50 ms) per round.
    let shaped = simulate(
        SimConfig {
            transport: "mem".into(),
            link: Some(fedquic_sim::relay::LinkSpec {
                latency_ms: 50.0,
                mbps: 8.0,
            }),
            ..base.clone()
        },
        |_| {},
    )
    .await
    .unwrap();
    for r in &shaped.rounds {
        assert!(
            r.seconds >= 0.2,
            "round {} took {} s",
            r.outcome.round,
            r.seconds
        );
    }
    assert!(shaped.final_test_accuracy.unwrap() > 0.3);
    let bad = simulate(
        SimConfig {
            transport: "tcp".into(),
            ..base
        },
        |_| {},
    )
    .await;
    assert!(bad.unwrap_err().to_string().contains("--transport"));
}

/// `--out` draws the plots next to the tables, from the same round records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_dir_gets_the_plots() {
    use fedquic_aggregator::plot::{ACCURACY_PNG, BYTES_PNG, LOSS_PNG};
    let out = tempfile::tempdir().unwrap();
    let config = SimConfig {
        clients: 4,
        rounds: 2,
        model: "mlp:784-16-10".into(),
        data: "synthetic:400/100".into(),
        out: Some(out.path().to_path_buf()),
        ..SimConfig::default()
    };
    let result = simulate(config, |_| {}).await.unwrap();
    assert_eq!(result.rounds.len(), 2);
    assert!(
        result.plots.skipped.is_empty(),
        "{:?}",
        result.plots.skipped
    );
    for name in [ACCURACY_PNG, LOSS_PNG, BYTES_PNG] {
        let path = out.path().join(name);
        assert!(result.plots.written.contains(&path), "{name} reported");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is a PNG");
        assert!(bytes.len() > 5_000, "{name}: {} bytes", bytes.len());
    }
}
