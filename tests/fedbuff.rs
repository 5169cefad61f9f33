//! FedBuff end to end: the asynchronous coordinator behind the real QUIC
//! shell, with a slow client whose updates arrive stale.

mod common;

use std::time::Duration;

use common::*;
use fedquic::aggregator::server::ServerSetup;
use fedquic::aggregator::{FedBuffSettings, Staleness};
use fedquic::net::pki::CertAuthority;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_steps_without_waiting_for_the_slow_client() {
    let ca = CertAuthority::generate("fedbuff CA").unwrap();
    let mut opts = Options::new(engine(4, 1, 6, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.fedbuff = Some(FedBuffSettings {
            concurrency: 3,
            buffer_size: 2,
            max_staleness: 20,
            staleness: Staleness::Constant,
            checkpoint_every: 1,
        });
        // Two updates a step: no share cap on one of two.
        setup.engine.updates.max_weight_share = 1.0;
    };
    let agg = start(&ca, opts);
    let mut clients = Vec::new();
    for (name, delay) in [("fast-1", 0), ("fast-2", 0), ("fast-3", 0), ("slow", 1500)] {
        let mut trainer = DeltaTrainer::new(1.0, 10);
        trainer.delay = Duration::from_millis(delay);
        clients.push(slow(&ca, agg.addr, name, trainer));
    }
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(20, c).await.unwrap().unwrap();
    }
    assert_eq!(summary.rounds_completed, 6);
    assert_eq!(summary.records.len(), 6);
    // Every delta is +1 and staleness weighs nothing (constant): each step
    // moves every parameter by exactly 1.
    for v in summary.final_model.iter() {
        assert!((v - 6.0).abs() < 1e-5, "{v}");
    }
    let mut answered = 0;
    for r in &summary.records {
        let s = r.outcome.staleness.as_ref().expect("a staleness summary");
        assert_eq!(s.counts.iter().sum::<usize>(), 2);
        answered += r.outcome.clients_answered;
    }
    assert_eq!(answered, 12);
    // The fast clients carried the run: steps did not wait for the slow one
    // (whose one 1.5 s task, if it landed, was stale).
    let slow_updates = summary
        .records
        .iter()
        .filter(|r| r.client_backends.contains_key("slow"))
        .count();
    assert!(slow_updates <= 1, "{slow_updates}");
    let max_staleness = summary
        .records
        .iter()
        .filter_map(|r| r.outcome.staleness.as_ref().map(|s| s.max))
        .max()
        .unwrap();
    if slow_updates == 1 {
        assert!(max_staleness >= 1);
    }
}

/// A client that reconnects while an upload from its old connection is in
/// flight can upload again on the new one: the old upload neither blocks it
/// (as "another upload in flight") nor counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_during_an_upload_frees_the_client_to_upload_again() {
    use fedquic::protocol::{Message, encode_f32_body, encode_header};
    let ca = CertAuthority::generate("fedbuff CA").unwrap();
    let mut opts = Options::new(engine(1, 1, 1, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.fedbuff = Some(FedBuffSettings {
            concurrency: 1,
            buffer_size: 1,
            max_staleness: 20,
            staleness: Staleness::Constant,
            checkpoint_every: 1,
        });
        setup.engine.updates.max_weight_share = 1.0;
    };
    let agg = start(&ca, opts);
    let update = |task: &fedquic::protocol::FitTask, delta: f32| {
        let mut bytes = encode_header(&update_header(task, 10)).unwrap();
        encode_f32_body(&[delta; PARAMS], &mut bytes);
        bytes
    };
    let mut old = raw_welcome(&ca, agg.addr, "returning").await;
    let (task, _) = within(10, old.next_fit()).await;
    // The old connection starts an upload (header only): the hub marks it
    // as in flight.
    let old_bytes = update(&task, 100.0);
    let header_len = old_bytes.len() - PARAMS * 4;
    let mut stalled = old.conn.open_uni().await.unwrap();
    stalled.write_all(&old_bytes[..header_len]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The same client comes back on a new connection and gets a new task.
    let mut new = raw_welcome(&ca, agg.addr, "returning").await;
    // The old connection's upload completes late: it must not count.
    let _ = stalled.write_all(&old_bytes[header_len..]).await;
    let _ = stalled.finish();
    let (task, _) = within(10, new.next_fit()).await;
    let mut stream = new.conn.open_uni().await.unwrap();
    stream.write_all(&update(&task, 1.0)).await.unwrap();
    stream.finish().unwrap();
    match within(10, new.next_message()).await {
        Some(Message::UpdateAccepted { .. }) => {}
        other => panic!("the new connection's upload was not accepted: {other:?}"),
    }
    let summary = within(20, agg.task).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 1);
    for v in summary.final_model.iter() {
        assert!((v - 1.0).abs() < 1e-6, "{v}");
    }
}
