//! Fault injection end to end: each fault really happens over real QUIC and
//! shows in rounds.csv and faults.csv.

use std::time::{Duration, Instant};

use fedquic_sim::faults::{FaultConfig, byzantine_clients};
use fedquic_sim::{SimConfig, SimResult, simulate};

fn small(rounds: u64) -> SimConfig {
    SimConfig {
        clients: 6,
        fraction: 1.0,
        rounds,
        model: "mlp:784-16-10".into(),
        data: "synthetic:600/200:5".into(),
        learning_rate: 0.1,
        threads: 2,
        seed: 3,
        ..SimConfig::default()
    }
}

async fn run(config: SimConfig) -> (SimResult, String, String) {
    let out = tempfile::tempdir().unwrap();
    let result = simulate(
        SimConfig {
            out: Some(out.path().to_path_buf()),
            ..config
        },
        |_| {},
    )
    .await
    .unwrap();
    let rounds = std::fs::read_to_string(out.path().join("rounds.csv")).unwrap();
    let faults = std::fs::read_to_string(out.path().join("faults.csv")).unwrap();
    (result, rounds, faults)
}

/// The value of `column` in every data row of a CSV.
fn column(csv: &str, name: &str) -> Vec<String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_clients_lose_their_connection_and_are_reported() {
    let config = SimConfig {
        faults: FaultConfig {
            dropout: 0.4,
            ..Default::default()
        },
        ..small(3)
    };
    let (result, rounds, faults) = run(config.clone()).await;
    let events: Vec<_> = result
        .faults
        .iter()
        .filter(|f| f.fault == "dropout")
        .collect();
    assert!(!events.is_empty(), "seed 3 drops someone: {faults}");
    let counts = column(&rounds, "faults_dropout");
    for (r, rec) in result.rounds.iter().enumerate() {
        let injected = events
            .iter()
            .filter(|e| e.round == rec.outcome.round)
            .count();
        assert_eq!(counts[r], injected.to_string());
        // The aggregator saw exactly those connections go.
        assert_eq!(
            rec.outcome.clients_dropped, injected,
            "round {}",
            rec.outcome.round
        );
        assert_eq!(rec.outcome.clients_answered, 6 - injected);
    }
    assert_eq!(faults.lines().count(), events.len() + 1);
    // Seeded: the same clients drop in the same rounds.
    let (again, _, _) = run(config).await;
    assert_eq!(again.faults, result.faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_past_the_deadline_are_cut() {
    let config = SimConfig {
        faults: FaultConfig {
            stragglers: Some("0.5:const:2.5".parse().unwrap()),
            ..Default::default()
        },
        round_deadline_secs: 1.0,
        // One round: a straggler cut in round 1 is still busy when round 2
        // starts, and would be late there too without being drawn again.
        ..small(1)
    };
    let started = Instant::now();
    let (result, rounds, faults) = run(config).await;
    let ids = column(&rounds, "straggler_clients");
    for (r, rec) in result.rounds.iter().enumerate() {
        let late = result
            .faults
            .iter()
            .filter(|f| f.round == rec.outcome.round && f.fault == "straggler")
            .count();
        assert!(
            late > 0 && late < 6,
            "seed 3: some straggle in round {r}: {faults}"
        );
        assert_eq!(ids[r].split(';').count(), late);
        assert_eq!(rec.outcome.clients_answered, 6 - late, "{faults}");
        assert!(rec.seconds >= 0.9, "the round waited for its deadline");
    }
    assert!(faults.contains("straggler,2.500s"));
    assert!(started.elapsed() >= Duration::from_secs(1));
}

/// Runs `kind` with half the clients Byzantine and checks it was reported
/// for exactly those clients every round, and that it changed the model.
async fn byzantine(kind: &str) -> (SimResult, SimResult) {
    // Plain FedAvg, without the aggregator's default norm clip.
    let config = SimConfig {
        max_norm_multiple: 0.0,
        ..small(2)
    };
    let attacked = SimConfig {
        faults: FaultConfig {
            byzantine: Some(format!("0.5:{kind}").parse().unwrap()),
            ..Default::default()
        },
        ..config.clone()
    };
    let (clean, _, _) = run(config).await;
    let (result, rounds, _) = run(attacked).await;
    let expected: Vec<usize> = byzantine_clients(0.5, 6, 3)
        .into_iter()
        .map(|c| c + 1)
        .collect();
    let listed = column(&rounds, "byzantine_clients");
    for (r, rec) in result.rounds.iter().enumerate() {
        let who: Vec<usize> = result
            .faults
            .iter()
            .filter(|f| f.round == rec.outcome.round && f.fault == "byzantine")
            .map(|f| {
                assert!(f.detail.starts_with(kind.split(':').next().unwrap()));
                f.client
            })
            .collect();
        assert_eq!(who, expected, "{kind}, round {}", rec.outcome.round);
        assert_eq!(listed[r].split(';').count(), 3);
    }
    assert_ne!(
        result.final_test_loss, clean.final_test_loss,
        "{kind} changed the model"
    );
    (clean, result)
}

fn accuracy(r: &SimResult) -> f64 {
    r.final_test_accuracy.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_sign_flip() {
    let (clean, attacked) = byzantine("sign-flip").await;
    assert!(accuracy(&attacked) < accuracy(&clean));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_scale() {
    let (clean, attacked) = byzantine("scale:50").await;
    assert!(
        attacked.final_test_loss.unwrap() > clean.final_test_loss.unwrap() + 0.5,
        "loss {:?} vs clean {:?}, accuracy {} vs {}",
        attacked.final_test_loss,
        clean.final_test_loss,
        accuracy(&attacked),
        accuracy(&clean)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_gaussian() {
    let (clean, attacked) = byzantine("gaussian:1").await;
    assert!(accuracy(&attacked) < accuracy(&clean) - 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_label_flip() {
    let (clean, attacked) = byzantine("label-flip").await;
    assert!(accuracy(&attacked) < accuracy(&clean));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_same_value() {
    let (clean, attacked) = byzantine("same-value:0.5").await;
    assert!(accuracy(&attacked) < accuracy(&clean) - 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_alie() {
    byzantine("alie:1.5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_links_are_slow_for_real() {
    // 784-16-10: 12,730 parameters, a 51 KB update; at 1 Mbit/s each way
    // with 50 ms latency, a round takes at least the model down plus the
    // update up: about 0.9 s.
    let config = SimConfig {
        link: Some("50:1".parse().unwrap()),
        clients: 2,
        ..small(1)
    };
    let (result, _, _) = run(config).await;
    let round = &result.rounds[0];
    assert_eq!(round.outcome.clients_answered, 2);
    assert!(round.seconds >= 0.8, "round took {} s", round.seconds);
    let (fast, _, _) = run(SimConfig {
        clients: 2,
        ..small(1)
    })
    .await;
    assert!(fast.rounds[0].seconds < round.seconds / 2.0);
}

#[tokio::test]
async fn bad_fault_settings_are_clear_errors() {
    let err = simulate(
        SimConfig {
            faults: FaultConfig {
                dropout: 1.5,
                ..Default::default()
            },
            ..small(1)
        },
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--dropout"), "{err:#}");
    let err = simulate(
        SimConfig {
            round_deadline_secs: 0.0,
            ..small(1)
        },
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--round-deadline"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_does_not_wait_for_stragglers() {
    // Half the clients wait 3 s before each upload. FedBuff keeps 3 clients
    // training and steps every 2 updates, so the fast half carries the run.
    let config = SimConfig {
        faults: FaultConfig {
            stragglers: Some("0.5:const:3".parse().unwrap()),
            ..Default::default()
        },
        fedbuff: Some(fedquic_aggregator::FedBuffSettings {
            concurrency: 3,
            buffer_size: 2,
            max_staleness: 50,
            ..Default::default()
        }),
        ..small(6)
    };
    let (result, rounds, _) = run(config).await;
    assert_eq!(result.rounds.len(), 6);
    assert_eq!(column(&rounds, "round"), ["1", "2", "3", "4", "5", "6"]);
    for r in &result.rounds {
        assert_eq!(
            r.outcome
                .staleness
                .as_ref()
                .unwrap()
                .counts
                .iter()
                .sum::<usize>(),
            2
        );
    }
    // Synchronous rounds with these stragglers would take 3 s or more each
    // (18 s or more for six).
    let run_time = result.rounds.last().unwrap().elapsed_seconds;
    assert!(run_time < 12.0, "{run_time} s");
    assert!(result.final_test_accuracy.unwrap() > 0.2);
}
