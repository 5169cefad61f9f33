//! Secure aggregation and differential privacy end to end over QUIC with
//! mutual TLS: the aggregator only ever holds masked inputs and their sum,
//! yet the global model moves by the (weighted) mean of the updates; clients
//! that drop mid-round are unmasked out; DP noise and epsilon show in the
//! records.

mod common;

use std::time::Duration;

use common::*;
use fedquic::aggregator::SecAggSettings;
use fedquic::aggregator::privacy::Privacy;
use fedquic::aggregator::server::ServerSetup;
use fedquic::client::{EvalOutcome, FitOutcome, Trainer, TrainerError, run_client};
use fedquic::net::pki::CertAuthority;
use fedquic::privacy::dp::{DpConfig, DpMode, OnBudget, Sampling};
use fedquic::protocol::FitInstructions;
use fedquic::train::layout::ParamLayout;

fn secagg(weight_cap: u64) -> SecAggSettings {
    SecAggSettings {
        degree: 0,
        threshold: 0.5,
        phase_timeout: Duration::from_secs(5),
        clip_norm: 100.0,
        weight_cap,
        min_clients: 3,
    }
}

/// Trains nothing: its fit fails (after the key exchange has begun, so the
/// aggregator must unmask it out of the round).
struct FailingTrainer(Vec<f32>);

impl Trainer for FailingTrainer {
    fn prepare(&mut self, _layout: &ParamLayout) -> Result<(), TrainerError> {
        Ok(())
    }
    fn parameters(&self) -> &[f32] {
        &self.0
    }
    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        self.0 = params.to_vec();
        Ok(())
    }
    fn fit(&mut self, _config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        std::thread::sleep(Duration::from_millis(300));
        Err(TrainerError::Other("this device ran out of battery".into()))
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        Err(TrainerError::Other("no".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_updates_sum_to_the_weighted_mean() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(5, 5, 2, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.secure_aggregation = Some(secagg(100));
    };
    let agg = start(&ca, opts);
    let mut clients = Vec::new();
    for (i, (delta, examples)) in [(0.1, 10), (0.2, 20), (0.3, 30), (0.4, 40), (0.5, 50)]
        .into_iter()
        .enumerate()
    {
        let tls = client_tls(&ca, Some(identity(&ca, &format!("c{i}"))));
        let opts = options(agg.addr, tls, 20);
        clients.push(tokio::spawn(run_client(
            opts,
            DeltaTrainer::new(delta, examples),
        )));
    }
    let summary = within(90, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    // Weights n/100: sum(n d) / sum(n) = 55 / 150 per round.
    let expected = 2.0 * 55.0 / 150.0;
    for v in summary.final_model.iter() {
        assert!((v - expected).abs() < 1e-4, "{v} vs {expected}");
    }
    for record in &summary.records {
        let s = record
            .outcome
            .secagg
            .as_ref()
            .expect("secure-aggregation summary");
        assert_eq!(
            (s.selected, s.advertised, s.shared, s.masked),
            (5, 5, 5, 5),
            "{s:?}"
        );
        // Five clients: the complete graph, threshold a majority of 4.
        assert_eq!((s.degree, s.threshold), (4, 3));
        assert_eq!(s.phase_seconds.len(), 4);
        assert!((s.within_clip - 5.0).abs() < 1e-3);
        assert_eq!(record.outcome.clients_answered, 5);
        // Every client's traffic shows the ring32 masked input, the model
        // and the key exchange.
        assert_eq!(record.client_traffic.len(), 5);
        for t in record.client_traffic.values() {
            assert!(t.bytes_up > 4 * PARAMS as u64, "{t:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_after_sharing_its_keys_is_unmasked_out() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(5, 3, 1, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.secure_aggregation = Some(secagg(0));
    };
    let agg = start(&ca, opts);
    let mut clients = Vec::new();
    for (i, delta) in [0.1f32, 0.2, 0.3, 0.4].into_iter().enumerate() {
        let tls = client_tls(&ca, Some(identity(&ca, &format!("c{i}"))));
        let opts = options(agg.addr, tls, 20);
        clients.push(tokio::spawn(run_client(opts, DeltaTrainer::new(delta, 7))));
    }
    let tls = client_tls(&ca, Some(identity(&ca, "flat-battery")));
    let failing = tokio::spawn(run_client(
        options(agg.addr, tls, 20),
        FailingTrainer(Vec::new()),
    ));
    let summary = within(90, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    within(10, failing).await.unwrap().unwrap();
    // Equal weights: the mean of the four who sent a masked input.
    let expected = 0.25;
    for v in summary.final_model.iter() {
        assert!((v - expected).abs() < 1e-4, "{v} vs {expected}");
    }
    let s = summary.records[0].outcome.secagg.as_ref().unwrap();
    assert_eq!((s.advertised, s.shared, s.masked), (5, 5, 4), "{s:?}");
    assert_eq!(summary.records[0].outcome.clients_dropped, 1);
}

fn dp(mode: DpMode, noise_multiplier: f64, budget: Option<f64>) -> DpConfig {
    DpConfig {
        mode,
        clip_norm: 100.0,
        noise_multiplier,
        delta: 1e-5,
        epsilon_budget: budget,
        on_budget: OnBudget::Stop,
        sampling: Sampling::FixedSizeWithoutReplacement,
        adaptive_clipping: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_noise_rides_inside_the_masks_and_epsilon_is_reported() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(4, 4, 2, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.secure_aggregation = Some(secagg(0));
        setup.privacy = Some(Privacy::new(dp(DpMode::Distributed, 1e-4, None), 40).unwrap());
    };
    let agg = start(&ca, opts);
    let mut clients = Vec::new();
    for (i, delta) in [0.1f32, 0.2, 0.3, 0.4].into_iter().enumerate() {
        let tls = client_tls(&ca, Some(identity(&ca, &format!("c{i}"))));
        clients.push(tokio::spawn(run_client(
            options(agg.addr, tls, 20),
            DeltaTrainer::new(delta, 7),
        )));
    }
    let summary = within(90, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    // Noise std on the mean: sigma C / 4 = 2.5e-3 per round.
    let expected = 2.0 * 0.25;
    let mean: f32 = summary.final_model.iter().sum::<f32>() / PARAMS as f32;
    assert!((mean - expected).abs() < 3e-3, "{mean} vs {expected}");
    let deviation = summary
        .final_model
        .iter()
        .map(|v| (v - mean).abs())
        .fold(0f32, f32::max);
    assert!(deviation > 1e-5, "no noise reached the model");
    assert!(deviation < 0.05, "{deviation}");
    let first = summary.records[0].outcome.privacy.as_ref().unwrap();
    let second = summary.records[1].outcome.privacy.as_ref().unwrap();
    assert_eq!(first.mode, "distributed");
    assert!(first.epsilon.is_finite() && first.epsilon > 0.0);
    assert!(second.epsilon > first.epsilon, "{first:?} {second:?}");
    assert!((first.q - 0.1).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_without_secure_aggregation_stops_at_its_budget() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(3, 3, 10, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        // A budget that one round fits and a second would not.
        let first = fedquic::privacy::dp::epsilon_after(
            0.3,
            5.0,
            1,
            1e-5,
            Sampling::FixedSizeWithoutReplacement,
        )
        .unwrap();
        setup.privacy =
            Some(Privacy::new(dp(DpMode::Central, 5.0, Some(first * 1.01)), 10).unwrap());
    };
    let agg = start(&ca, opts);
    let mut clients = Vec::new();
    for (i, delta) in [0.1f32, 0.2, 0.3].into_iter().enumerate() {
        let tls = client_tls(&ca, Some(identity(&ca, &format!("c{i}"))));
        clients.push(tokio::spawn(run_client(
            options(agg.addr, tls, 20),
            DeltaTrainer::new(delta, 7 + i as u64),
        )));
    }
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    assert!(summary.finished);
    assert_eq!(summary.records.len(), 1, "the budget allows one round");
    let p = summary.records[0].outcome.privacy.as_ref().unwrap();
    assert_eq!(p.mode, "central");
    assert!((p.noise_std - 500.0).abs() < 1e-9, "{p:?}");
    // Equal weights whatever the example counts; the noise (std 500 on the
    // sum, 167 per coordinate of the mean) dwarfs the updates (at most 0.3),
    // as a noise multiplier of 5 with three clients must. The spread over
    // the coordinates is checked, not their mean: the mean of 64 such
    // coordinates has std 21 and fell within 1.0 of zero in about 4% of runs.
    let values = &summary.final_model;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
    let spread = (values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (values.len() - 1) as f64)
        .sqrt();
    assert!((60.0..400.0).contains(&spread), "{spread}");
}
