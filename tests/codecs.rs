//! Update and model codecs end to end over QUIC with mutual TLS: per-client
//! negotiation, compressed updates folded into the same FedAvg, compressed
//! model broadcast, error feedback, per-client traffic in the metrics, and
//! refusals.

mod common;

use std::time::Duration;

use common::*;
use fedquic::aggregator::config::CodecPreference;
use fedquic::aggregator::server::ServerSetup;
use fedquic::client::{
    ClientError, CodecOptions, StateStore, StateVector, run_client, run_client_with_store,
};
use fedquic::net::io::send_encoded;
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{Codec, Message, encode_body};

fn codec(s: &str) -> Codec {
    s.parse().unwrap()
}

fn offering(
    mut opts: fedquic::client::ClientOptions,
    offer: &[&str],
) -> fedquic::client::ClientOptions {
    opts.codecs = CodecOptions {
        offer: offer.iter().map(|s| codec(s)).collect(),
        error_feedback: true,
    };
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_codecs_federate_and_the_metrics_show_each() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(3, 3, 2, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.codecs = CodecPreference {
            uplink: vec!["int8".parse().unwrap(), "f16".parse().unwrap(), Codec::F32],
            downlink: vec!["bf16".parse().unwrap(), Codec::F32],
        };
        setup.run_id = "codec-mix".into();
    };
    let agg = start(&ca, opts);
    // Uniform deltas of 0.5, 1 and 2 are exact in every codec here (int8:
    // every value is the block's maximum, q = 127).
    let mut clients = Vec::new();
    for (name, delta, offer) in [
        ("c-f32", 0.5, vec!["f32"]),
        ("c-f16", 1.0, vec!["f16", "f32"]),
        ("c-int8", 2.0, vec!["top-k:1", "int8", "bf16", "f32"]),
    ] {
        let tls = client_tls(&ca, Some(identity(&ca, name)));
        let opts = offering(options(agg.addr, tls, 20), &offer);
        clients.push(tokio::spawn(run_client(opts, DeltaTrainer::new(delta, 10))));
    }
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    // Two rounds of the mean delta (3.5 / 3) on every parameter; the bf16
    // model broadcast only rounds each client's starting point.
    let expected = 2.0 * 3.5 / 3.0;
    for v in summary.final_model.iter() {
        assert!((v - expected).abs() < 1e-3, "{v} vs {expected}");
    }
    let traffic = &summary.records[1].client_traffic;
    let seen = |name: &str| {
        let t = &traffic[name];
        (
            t.uplink.as_str(),
            t.downlink.as_str(),
            t.bytes_up,
            t.bytes_down,
        )
    };
    let p = PARAMS as u64;
    assert_eq!(seen("c-f32"), ("f32", "f32", 4 * p, 4 * p));
    assert_eq!(seen("c-f16"), ("f16", "f32", 2 * p, 4 * p));
    assert_eq!(seen("c-int8"), ("int8", "bf16", 4 + p, 2 * p));
    assert_eq!(summary.records[1].bytes_up, 4 * p + 2 * p + 4 + p);
}

/// Adds `(i + 1) / 100` to parameter `i`: a delta whose top-k is known.
fn ramp_trainer() -> DeltaTrainer {
    DeltaTrainer {
        per_param: Some(ramp),
        ..DeltaTrainer::new(0.0, 1)
    }
}

fn ramp(i: usize) -> f32 {
    (i + 1) as f32 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_with_error_feedback_loses_nothing_over_rounds() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let rounds = 5;
    let mut opts = Options::new(engine(1, 1, rounds, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.codecs.uplink = vec!["top-k:0.25".parse().unwrap()];
        setup.run_id = "topk-ef".into();
    };
    let agg = start(&ca, opts);
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::in_dir(dir.path()).unwrap();
    let tls = client_tls(&ca, Some(identity(&ca, "ef")));
    let client = tokio::spawn(run_client_with_store(
        options(agg.addr, tls, 20),
        ramp_trainer(),
        store,
    ));
    let summary = within(60, agg.task).await.unwrap().unwrap();
    let report = within(10, client).await.unwrap().unwrap();
    // 16 of 64 values a round: a quarter of the f32 bytes plus gaps and lengths.
    assert!(report.bytes_up < rounds * (16 * 5 + 4) + rounds * 200);
    // Everything the client computed reached the model, or waits in its
    // residual file for the next round: model + residual = rounds x delta.
    let residual = StateStore::in_dir(dir.path())
        .unwrap()
        .load(StateVector::Residual, "topk-ef", PARAMS)
        .unwrap();
    assert!(residual.iter().any(|r| *r != 0.0), "a residual is kept");
    for (i, (model, kept)) in summary.final_model.iter().zip(&residual).enumerate() {
        let want = rounds as f32 * ramp(i);
        assert!(
            (model + kept - want).abs() < 1e-5,
            "{i}: {model} + {kept} != {want}"
        );
    }
    // Small coordinates were sent too, once their residual grew: not only
    // the largest 16 of the ramp.
    assert!(summary.final_model[..PARAMS - 16].iter().any(|v| *v != 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_error_feedback_top_k_drops_the_rest() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(1, 1, 3, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.codecs.uplink = vec!["top-k:0.25".parse().unwrap()];
    };
    let agg = start(&ca, opts);
    let tls = client_tls(&ca, Some(identity(&ca, "no-ef")));
    let mut client_opts = options(agg.addr, tls, 20);
    client_opts.codecs.error_feedback = false;
    let client = tokio::spawn(run_client(client_opts, ramp_trainer()));
    let summary = within(60, agg.task).await.unwrap().unwrap();
    within(10, client).await.unwrap().unwrap();
    for i in 0..PARAMS {
        let want = if i >= PARAMS - 16 { 3.0 * ramp(i) } else { 0.0 };
        assert!((summary.final_model[i] - want).abs() < 1e-5, "{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_common_codec_is_refused_with_both_lists() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let mut opts = Options::new(engine(1, 1, 1, Duration::from_secs(30)));
    opts.adjust = |setup: &mut ServerSetup| {
        setup.codecs.uplink = vec![Codec::Int8];
    };
    let agg = start(&ca, opts);
    let tls = client_tls(&ca, Some(identity(&ca, "old")));
    let opts = offering(options(agg.addr, tls, 3), &["f32", "f16"]);
    match within(20, run_client(opts, DeltaTrainer::new(1.0, 1))).await {
        Err(ClientError::Rejected(reason)) => {
            assert!(
                reason.contains("no common uplink codec")
                    && reason.contains("[f32, f16]")
                    && reason.contains("[int8]"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    agg.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_a_codec_other_than_the_agreed_one_is_refused() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let agg = start(&ca, Options::new(engine(1, 1, 1, Duration::from_secs(30))));
    // The raw client offers f32 only, so the session agrees on f32.
    let mut raw = raw_welcome(&ca, agg.addr, "sneaky").await;
    let (task, _) = raw.next_fit().await;
    let mut body = Vec::new();
    encode_body(Codec::F16, &[1.0; PARAMS], 0, &mut body).unwrap();
    let mut header = update_header(&task, 1);
    header.codec = Codec::F16;
    header.body_len = body.len() as u64;
    // The aggregator may stop the stream before the body is written: fine.
    let _ = send_encoded(&raw.conn, &header, body.into()).await;
    match within(10, raw.next_message()).await {
        Some(Message::UpdateRejected { reason, .. }) => {
            assert!(reason.contains("agreed on f32"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    agg.task.abort();
}
