//! Check-in simulation (`--materialize selected`): only each round's cohort
//! exists, over the same QUIC + mutual TLS stack, with per-client data drawn
//! from the client id and per-client state kept on disk between selections.

use std::collections::BTreeSet;

use fedquic_net::pki::client_name;
use fedquic_sim::population::Cohorts;
use fedquic_sim::{SimConfig, simulate};

fn cohort_names(config: &SimConfig, per_round: usize, round: u64) -> BTreeSet<String> {
    Cohorts {
        population: config.clients,
        per_round,
        seed: config.seed,
    }
    .draw(round, 1)
    .into_iter()
    .map(|i| client_name(i + 1))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_clients_cost_only_their_cohorts() {
    let config = SimConfig {
        clients: 1_000_000,
        fraction: 0.000_008, // 8 a round
        rounds: 3,
        model: "mlp:784-16-10".into(),
        data: "synthetic-per-client:30/300".into(),
        learning_rate: 0.1,
        transport: "mem".into(),
        seed: 11,
        ..SimConfig::default()
    };
    let result = simulate(config.clone(), |_| {}).await.unwrap();
    assert!(result.materialized_on_selection, "auto picks selection");
    assert_eq!(result.rounds.len(), 3);
    assert_eq!(
        result.clients_materialized, 24,
        "8 sessions a round, no more"
    );
    let mut everyone = BTreeSet::new();
    for r in &result.rounds {
        let o = &r.outcome;
        assert_eq!((o.clients_available, o.clients_selected), (8, 8), "{o:?}");
        assert_eq!(o.clients_answered, 8);
        // The aggregator trained exactly the cohort the seed draws.
        let trained: BTreeSet<String> = r.client_traffic.keys().cloned().collect();
        assert_eq!(
            trained,
            cohort_names(&config, 8, o.round),
            "round {}",
            o.round
        );
        everyone.extend(trained);
        assert_eq!(o.examples, 8 * 30, "each client drew its 30 examples");
    }
    assert_eq!(
        everyone.len(),
        24,
        "a million clients: cohorts do not repeat"
    );
    assert!(result.final_test_accuracy.unwrap() > 0.15);

    // The same seed, the same run: cohorts and model.
    let again = simulate(config, |_| {}).await.unwrap();
    for (a, b) in result.rounds.iter().zip(&again.rounds) {
        assert_eq!(
            a.client_traffic.keys().collect::<Vec<_>>(),
            b.client_traffic.keys().collect::<Vec<_>>()
        );
        assert_eq!(a.outcome.examples, b.outcome.examples);
    }
}

/// SCAFFOLD's control variates survive between a client's selections, on
/// disk: a client that comes back starts from its stored `c_i`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_state_is_kept_on_disk_between_selections() {
    let out = tempfile::tempdir().unwrap();
    let config = SimConfig {
        clients: 4,
        fraction: 0.5,
        rounds: 4,
        model: "mlp:784-16-10".into(),
        data: "synthetic:800/200:3".into(),
        partition: "dirichlet:0.5".into(),
        learning_rate: 0.1,
        materialize: "selected".into(),
        strategy: fedquic_aggregator::strategy::StrategyConfig {
            name: "scaffold".into(),
            ..Default::default()
        },
        out: Some(out.path().to_path_buf()),
        ..SimConfig::default()
    };
    let result = simulate(config.clone(), |_| {}).await.unwrap();
    assert_eq!(result.rounds.len(), 4);
    assert_eq!(result.clients_materialized, 8);
    let mut selected = BTreeSet::new();
    for round in 1..=4 {
        for name in cohort_names(&config, 2, round) {
            selected.insert(name);
        }
    }
    // Every client ever selected has its control variate on disk; the
    // others have nothing.
    for i in 0..4 {
        let file = out
            .path()
            .join("client-state")
            .join(i.to_string())
            .join(fedquic_client::state::CONTROL_FILE);
        assert_eq!(
            file.exists(),
            selected.contains(&client_name(i + 1)),
            "client {i}: {}",
            file.display()
        );
    }
    assert!(result.final_test_accuracy.unwrap() > 0.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_check_in_clients_cannot_do_is_refused_by_flag() {
    let base = SimConfig {
        clients: 4,
        rounds: 1,
        model: "mlp:784-16-10".into(),
        data: "synthetic:100/20".into(),
        materialize: "selected".into(),
        ..SimConfig::default()
    };
    for (config, needle) in [
        (
            SimConfig {
                fraction_evaluate: 0.5,
                ..base.clone()
            },
            "--fraction-evaluate",
        ),
        (
            SimConfig {
                faults: fedquic_sim::faults::FaultConfig {
                    dropout: 0.5,
                    ..Default::default()
                },
                ..base.clone()
            },
            "--dropout",
        ),
        (
            SimConfig {
                materialize: "all".into(),
                data: "synthetic-per-client:10".into(),
                ..base.clone()
            },
            "--materialize selected",
        ),
        (
            SimConfig {
                materialize: "some".into(),
                ..base.clone()
            },
            "--materialize",
        ),
        (
            SimConfig {
                clients: 1_000_000,
                fraction: 0.0001,
                ..base.clone()
            },
            "synthetic-per-client",
        ),
        // A cohort client that fails before its round starts (here: it
        // cannot draw shards of its own data) ends the run with its error
        // rather than leaving the aggregator waiting.
        (
            SimConfig {
                data: "synthetic-per-client:10".into(),
                partition: "shards:2".into(),
                ..base.clone()
            },
            "failed before the round could start: cannot partition: shards cut a shared dataset",
        ),
    ] {
        let err =
            tokio::time::timeout(std::time::Duration::from_secs(60), simulate(config, |_| {}))
                .await
                .expect("an error, not a hang")
                .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
