//! Every server-side strategy driven through the daemon over QUIC + mutual
//! TLS for a few rounds, against the same strategy applied by hand to the
//! round's known mean delta.

mod common;

use std::time::Duration;

use common::*;
use fedquic::aggregator::strategy::{STRATEGY_NAMES, StrategyConfig};
use fedquic::client::{
    EvalOutcome, FitOutcome, StateStore, StateVector, Trainer, TrainerError, run_client_with_store,
};
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{FitInstructions, Message};
use fedquic::train::layout::ParamLayout;

const ROUNDS: u64 = 3;
/// (delta, examples) of the three clients: mean delta (10 + 2*20 + 3*30)/60.
const CLIENTS: [(f32, u64); 3] = [(1.0, 10), (2.0, 20), (3.0, 30)];

fn strategy(name: &str) -> StrategyConfig {
    StrategyConfig {
        name: name.into(),
        server_lr: 0.3,
        server_momentum: 0.5,
        mu: 0.125,
        // Client deltas have norms 8, 16 and 24 (P = 64): the last is clipped.
        clip_norm: 16.0,
        ..StrategyConfig::default()
    }
}

/// What `ROUNDS` rounds of the strategy make of a zero parameter when every
/// round's mean delta is `mean`.
fn expected(name: &str, mean: f64) -> f32 {
    let mut s = strategy(name).build(1).unwrap();
    let total: f64 = CLIENTS.iter().map(|(_, n)| *n as f64).sum();
    let mut w = vec![0.0f32];
    for _ in 0..ROUNDS {
        s.apply(&mut w, &[mean * total], 1.0 / total);
    }
    w[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_runs_through_the_daemon() {
    let total: f64 = CLIENTS.iter().map(|(_, n)| *n as f64).sum();
    let mean = CLIENTS
        .iter()
        .map(|(d, n)| *d as f64 * *n as f64)
        .sum::<f64>()
        / total;
    // q-FedAvg and SCAFFOLD need more from their clients: tested below.
    let streaming = STRATEGY_NAMES.iter().filter(|n| {
        strategy(n).build(1).unwrap().robust().is_none() && !["qfedavg", "scaffold"].contains(*n)
    });
    for name in streaming {
        let ca = CertAuthority::generate("strategy CA").unwrap();
        let mut cfg = engine(3, 3, ROUNDS, Duration::from_secs(20));
        cfg.strategy = strategy(name);
        // The deltas are constant, so the norm bound would only clip noise.
        cfg.updates.max_update_norm_median_multiple = None;
        let agg = start(&ca, Options::new(cfg));
        let clients: Vec<_> = CLIENTS
            .iter()
            .enumerate()
            .map(|(i, (d, n))| common::honest(&ca, agg.addr, &format!("c-{i}"), *d, *n))
            .collect();
        let summary = within(60, agg.task).await.unwrap().unwrap();
        for c in clients {
            within(20, c).await.unwrap().unwrap();
        }
        assert_eq!(summary.rounds_completed, ROUNDS, "{name}");
        // The metrics say which backend each accepted update was trained on.
        let backends = &summary.records[0].client_backends;
        assert_eq!(backends.len(), 3, "{backends:?}");
        assert!(backends.values().all(|b| b == "cpu"), "{backends:?}");
        // Norm-bounded FedAvg clips the third client's delta from 3 to 2.
        let want = match *name {
            "normbounded" => expected(name, (10.0 + 2.0 * 20.0 + 2.0 * 30.0) / total),
            _ => expected(name, mean),
        };
        assert!(
            summary.final_model.iter().all(|v| (v - want).abs() < 1e-5),
            "{name}: {} vs {want}",
            summary.final_model[0]
        );
    }
    // The strategies really differ on this run.
    let fedavg = expected("fedavg", mean);
    for name in ["fedavgm", "fedadam", "fedyogi", "fedadagrad"] {
        assert!((expected(name, mean) - fedavg).abs() > 1e-3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedprox_sends_its_mu_with_every_task() {
    let ca = CertAuthority::generate("strategy CA").unwrap();
    let mut cfg = engine(2, 2, 2, Duration::from_secs(20));
    cfg.strategy = strategy("fedprox");
    let agg = start(&ca, Options::new(cfg));
    let honest = common::honest(&ca, agg.addr, "h", 1.0, 10);
    let mut raw = raw_welcome(&ca, agg.addr, "observer").await;
    for _ in 0..2 {
        let (task, _) = raw.next_fit().await;
        assert_eq!(task.config.proximal_mu, 0.125);
        let mut s = raw.conn.open_uni().await.unwrap();
        let mut bytes = fedquic::protocol::encode_header(&update_header(&task, 10)).unwrap();
        fedquic::protocol::encode_f32_body(&[1.0; PARAMS], &mut bytes);
        s.write_all(&bytes).await.unwrap();
        s.finish().unwrap();
        assert!(matches!(
            within(10, raw.next_message()).await,
            Some(Message::UpdateAccepted { .. })
        ));
    }
    within(30, agg.task).await.unwrap().unwrap();
    within(20, honest).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robust_strategies_shrug_off_an_attacker_through_the_daemon() {
    // Six honest clients move every parameter by +1, one attacker by +100;
    // FedAvg would move it by (6 + 100) / 7 = 15.1 per round.
    for name in ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"] {
        let ca = CertAuthority::generate("robust CA").unwrap();
        let mut cfg = engine(7, 7, 2, Duration::from_secs(20));
        cfg.strategy = StrategyConfig {
            name: name.into(),
            trim: 0.2,
            byzantine_f: 1,
            krum_m: 3,
            ..StrategyConfig::default()
        };
        cfg.updates.max_update_norm_median_multiple = None;
        let agg = start(&ca, Options::new(cfg));
        let mut clients: Vec<_> = (0..6)
            .map(|i| common::honest(&ca, agg.addr, &format!("h-{i}"), 1.0, 10))
            .collect();
        clients.push(common::honest(&ca, agg.addr, "attacker", 100.0, 10));
        let summary = within(60, agg.task).await.unwrap().unwrap();
        for c in clients {
            within(20, c).await.unwrap().unwrap();
        }
        assert!(
            summary.final_model.iter().all(|v| (v - 2.0).abs() < 1e-5),
            "{name}: {}",
            summary.final_model[0]
        );
    }
    // Too few clients for Krum's f is refused at startup, with the numbers.
    let ca = CertAuthority::generate("robust CA").unwrap();
    let mut cfg = engine(3, 3, 1, Duration::from_secs(20));
    cfg.strategy = StrategyConfig {
        name: "krum".into(),
        byzantine_f: 1,
        ..StrategyConfig::default()
    };
    let agg = start(&ca, Options::new(cfg));
    let err = within(10, agg.task).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("at least 5 updates"), "{err}");
}

/// A client whose "training" is known in closed form: the loss before
/// training is `loss`; plain fit adds `delta` to every parameter; SCAFFOLD's
/// corrected fit is one step of lr 1 on a gradient of `-delta`, so it adds
/// `delta - correction` (K = 1). It records every correction it was given.
struct ClosedForm {
    delta: f32,
    loss: f64,
    params: Vec<f32>,
    corrections: std::sync::Arc<std::sync::Mutex<Vec<f32>>>,
}

impl ClosedForm {
    fn new(delta: f32, loss: f64) -> Self {
        ClosedForm {
            delta,
            loss,
            params: Vec::new(),
            corrections: Default::default(),
        }
    }
}

impl Trainer for ClosedForm {
    fn prepare(&mut self, _layout: &ParamLayout) -> Result<(), TrainerError> {
        Ok(())
    }
    fn parameters(&self) -> &[f32] {
        &self.params
    }
    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        self.params = params.to_vec();
        Ok(())
    }
    fn fit(&mut self, _config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        self.params.iter_mut().for_each(|p| *p += self.delta);
        Ok(FitOutcome {
            examples: 10,
            metrics: vec![("loss".into(), 1.0)],
        })
    }
    fn training_loss(&mut self) -> Result<f64, TrainerError> {
        Ok(self.loss)
    }
    fn fit_corrected(
        &mut self,
        _config: &FitInstructions,
        correction: &[f32],
    ) -> Result<(FitOutcome, u64), TrainerError> {
        if let Ok(mut seen) = self.corrections.lock() {
            seen.push(correction[0]);
        }
        for (p, c) in self.params.iter_mut().zip(correction) {
            *p += self.delta - c;
        }
        Ok((
            FitOutcome {
                examples: 10,
                metrics: Vec::new(),
            },
            1,
        ))
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        Ok(EvalOutcome {
            examples: 10,
            loss: self.loss,
            accuracy: 0.5,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qfedavg_weighs_clients_by_their_reported_loss_through_the_daemon() {
    // (delta, initial loss) of three clients; q = 2, lr = 1 so L = 1.
    let clients = [(1.0f32, 0.5f64), (2.0, 1.0), (-1.0, 2.0)];
    let q = 2.0;
    let ca = CertAuthority::generate("qfedavg CA").unwrap();
    let mut cfg = engine(3, 3, ROUNDS, Duration::from_secs(20));
    cfg.strategy = StrategyConfig {
        name: "qfedavg".into(),
        q,
        ..StrategyConfig::default()
    };
    cfg.updates.max_update_norm_median_multiple = None;
    let agg = start(&ca, Options::new(cfg));
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, (d, f))| {
            let tls = client_tls(&ca, Some(identity(&ca, &format!("q-{i}"))));
            tokio::spawn(fedquic::client::run_client(
                options(agg.addr, tls, 20),
                ClosedForm::new(*d, *f),
            ))
        })
        .collect();
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for t in tasks {
        within(20, t).await.unwrap().unwrap();
    }
    // By hand: w += L sum F^q d / sum (q F^(q-1) L^2 ||d||^2 + L F^q), with
    // ||d||^2 = 64 d^2 (every one of the 64 parameters moves by d).
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (d, f) in clients {
        let d = d as f64;
        num += f.powf(q) * d;
        den += q * f.powf(q - 1.0) * 64.0 * d * d + f.powf(q);
    }
    let want = (ROUNDS as f64 * num / den) as f32;
    assert!(
        summary.final_model.iter().all(|v| (v - want).abs() < 1e-5),
        "{} vs {want}",
        summary.final_model[0]
    );
    // Plain FedAvg would have moved it by (1 + 2 - 1) / 3 per round.
    assert!((want - 2.0).abs() > 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qfedavg_refuses_an_implausible_loss_and_a_client_that_reports_none() {
    let ca = CertAuthority::generate("qfedavg CA").unwrap();
    let mut cfg = engine(2, 1, 1, Duration::from_secs(20));
    cfg.strategy = StrategyConfig {
        name: "qfedavg".into(),
        ..StrategyConfig::default()
    };
    let agg = start(&ca, Options::new(cfg));
    let honest = {
        let tls = client_tls(&ca, Some(identity(&ca, "honest")));
        tokio::spawn(fedquic::client::run_client(
            options(agg.addr, tls, 20),
            ClosedForm::new(1.0, 1.0),
        ))
    };
    let mut raw = raw_welcome(&ca, agg.addr, "liar").await;
    let (task, _) = raw.next_fit().await;
    assert!(
        task.initial_loss,
        "q-FedAvg asks for the loss before training"
    );
    let mut header = update_header(&task, 10);
    header.metrics = vec![("initial_loss".into(), 1e9)];
    let mut s = raw.conn.open_uni().await.unwrap();
    let mut bytes = fedquic::protocol::encode_header(&header).unwrap();
    fedquic::protocol::encode_f32_body(&[1.0; PARAMS], &mut bytes);
    s.write_all(&bytes).await.unwrap();
    s.finish().unwrap();
    match within(10, raw.next_message()).await {
        Some(Message::UpdateRejected { reason, .. }) => {
            assert!(reason.contains("initial loss"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    within(20, honest).await.unwrap().unwrap();
    assert_eq!(
        summary.records[0].outcome.rejections.get("strategy"),
        Some(&1)
    );
    // DeltaTrainer cannot report a loss: its task fails, clearly.
    let ca = CertAuthority::generate("qfedavg CA").unwrap();
    let mut cfg = engine(1, 1, 1, Duration::from_secs(5));
    cfg.max_round_retries = 0;
    cfg.strategy.name = "qfedavg".into();
    let agg = start(&ca, Options::new(cfg));
    let _plain = common::honest(&ca, agg.addr, "plain", 1.0, 10);
    let err = within(30, agg.task).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("got 0 of the 1 updates"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_control_variates_go_down_and_come_back_through_the_daemon() {
    // Deltas 1, 2 and 3, server_lr 0.5, N = |S| = 3 (all clients train).
    // Round 1: c = c_i = 0, so Delta y = d; x = 0.5 * 2 = 1; each client's
    // c_i+ = c_i - c + (x - y) / (K lr) = -d, Delta c = -d; c = -6 / 3 = -2.
    // Rounds 2 and 3: correction c - c_i = d - 2, so every Delta y is
    // d - (d - 2) = 2 (the drift is gone); x += 0.5 * 2; Delta c = 0.
    let ca = CertAuthority::generate("scaffold CA").unwrap();
    let mut cfg = engine(3, 3, ROUNDS, Duration::from_secs(20));
    cfg.strategy = StrategyConfig {
        name: "scaffold".into(),
        server_lr: 0.5,
        ..StrategyConfig::default()
    };
    cfg.updates.max_update_norm_median_multiple = None;
    let mut opts = Options::new(cfg);
    opts.adjust = |setup| setup.run_id = "scaffold-test-run".into();
    let agg = start(&ca, opts);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let tasks: Vec<_> = [1.0f32, 2.0, 3.0]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let tls = client_tls(&ca, Some(identity(&ca, &format!("s-{i}"))));
            let trainer = ClosedForm::new(*d, 1.0);
            seen.push(std::sync::Arc::clone(&trainer.corrections));
            // The first client keeps c_i on disk, the others in memory.
            let store = match i {
                0 => StateStore::in_dir(dir.path()).unwrap(),
                _ => StateStore::default(),
            };
            tokio::spawn(run_client_with_store(
                options(agg.addr, tls, 20),
                trainer,
                store,
            ))
        })
        .collect();
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for t in tasks {
        within(20, t).await.unwrap().unwrap();
    }
    assert!(
        summary.final_model.iter().all(|v| (v - 3.0).abs() < 1e-5),
        "{}",
        summary.final_model[0]
    );
    // Each client saw correction 0, then d - 2 twice.
    for (i, corrections) in seen.iter().enumerate() {
        let d = i as f32 + 1.0;
        assert_eq!(*corrections.lock().unwrap(), vec![0.0, d - 2.0, d - 2.0]);
    }
    // The file-backed client's c_i = -1 is on disk, for this run only.
    let stored = StateStore::in_dir(dir.path()).unwrap();
    assert_eq!(
        stored
            .load(StateVector::ScaffoldControl, "scaffold-test-run", PARAMS)
            .unwrap(),
        vec![-1.0; PARAMS]
    );
    assert_eq!(
        stored
            .load(StateVector::ScaffoldControl, "another-run", PARAMS)
            .unwrap(),
        vec![0.0; PARAMS]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_refuses_updates_without_a_control_variate_and_old_peers() {
    let ca = CertAuthority::generate("scaffold CA").unwrap();
    let mut cfg = engine(2, 1, 1, Duration::from_secs(20));
    cfg.strategy.name = "scaffold".into();
    let agg = start(&ca, Options::new(cfg));
    // A version-1 peer is told there is no common version.
    match open_raw(
        agg.addr,
        client_tls(&ca, Some(identity(&ca, "old"))),
        vec![1],
    )
    .await
    {
        Opened::Refused(why) => assert!(why.contains("no common protocol version"), "{why}"),
        Opened::Welcome(..) => panic!("a version-1 peer was admitted"),
    }
    let honest = {
        let tls = client_tls(&ca, Some(identity(&ca, "honest")));
        tokio::spawn(fedquic::client::run_client(
            options(agg.addr, tls, 20),
            ClosedForm::new(1.0, 1.0),
        ))
    };
    // A client that sends a plain update (no Delta c) is refused.
    let mut raw = raw_welcome(&ca, agg.addr, "plain").await;
    let task = loop {
        match within(20, raw.next_message()).await {
            Some(Message::FitTask(task)) => break task,
            Some(_) => continue,
            None => panic!("no fit task"),
        }
    };
    assert_eq!(
        task.scaffold.as_ref().map(|s| s.run.is_empty()),
        Some(false),
        "SCAFFOLD tasks name the run"
    );
    let model = raw.conn.accept_uni().await.unwrap();
    drop(model);
    let mut s = raw.conn.open_uni().await.unwrap();
    let mut bytes = fedquic::protocol::encode_header(&update_header(&task, 10)).unwrap();
    fedquic::protocol::encode_f32_body(&[1.0; PARAMS], &mut bytes);
    s.write_all(&bytes).await.unwrap();
    s.finish().unwrap();
    match within(10, raw.next_message()).await {
        Some(Message::UpdateRejected { reason, .. }) => {
            assert!(reason.contains("tensors"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    within(30, agg.task).await.unwrap().unwrap();
    within(20, honest).await.unwrap().unwrap();
}
