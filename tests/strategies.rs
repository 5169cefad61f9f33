//! Every server-side strategy driven through the daemon over QUIC + mutual
//! TLS for a few rounds, against the same strategy applied by hand to the
//! round's known mean delta.

mod common;

use std::time::Duration;

use common::*;
use fedquic::aggregator::strategy::{STRATEGY_NAMES, StrategyConfig};
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::Message;

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
    let streaming = STRATEGY_NAMES
        .iter()
        .filter(|n| strategy(n).build(1).unwrap().robust().is_none());
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
