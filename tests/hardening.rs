//! Attacks on the aggregator by a client holding one valid certificate, each
//! performed over real QUIC + mutual TLS, and the federation carrying on.
//! (Issue "Hardening": weights, norms, the model check, upload stalls,
//! sessions that outlive their Bye, failed evaluations, unknown tasks,
//! aborts.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use fedquic::aggregator::engine::NormPolicy;
use fedquic::net::io::write_message;
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{EvalResult, Message, encode_f32_body, encode_header};

fn body(values: &[f32]) -> Vec<u8> {
    let mut b = Vec::new();
    encode_f32_body(values, &mut b);
    b
}

/// Sends a whole update for the client's current task and returns the answer.
async fn send_update(
    raw: &mut Raw,
    task: &fedquic::protocol::FitTask,
    examples: u64,
    delta: f32,
) -> Message {
    let mut stream = raw.conn.open_uni().await.unwrap();
    let mut bytes = encode_header(&update_header(task, examples)).unwrap();
    bytes.extend_from_slice(&body(&[delta; PARAMS]));
    stream.write_all(&bytes).await.unwrap();
    stream.finish().unwrap();
    within(10, raw.next_message()).await.expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_claiming_two_to_the_32_examples_cannot_take_over_the_model() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut cfg = engine(4, 4, 2, Duration::from_secs(20));
    cfg.updates.max_examples_per_update = 1000;
    cfg.updates.max_weight_share = 0.5;
    let agg = start(&ca, Options::new(cfg));
    let honest: Vec<_> = (0..3)
        .map(|i| common::honest(&ca, agg.addr, &format!("h-{i}"), 1.0, 10))
        .collect();
    let mut attacker = raw_welcome(&ca, agg.addr, "attacker").await;
    for _ in 0..2 {
        let (task, _) = attacker.next_fit().await;
        let answer = send_update(&mut attacker, &task, 1 << 32, -9.0).await;
        assert!(
            matches!(answer, Message::UpdateAccepted { .. }),
            "{answer:?}"
        );
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
    for r in &summary.records {
        let o = &r.outcome;
        // Claimed 2^32 -> capped to 1000 per client -> capped to half the
        // round's weight: c = 0.5 * (c + 30), c = 30.
        assert_eq!(o.weight_claimed, 1030.0);
        assert_eq!(o.weight_used, 60.0);
        let adjusted = o
            .weight_adjusted
            .iter()
            .find(|a| a.client == "attacker")
            .unwrap();
        assert_eq!((adjusted.claimed, adjusted.used), (1 << 32, 30.0));
    }
    // Each round moves by (30 * 1 + 30 * -9) / 60 = -4, not by the attacker's -9.
    assert!(
        summary.final_model.iter().all(|v| (v + 8.0).abs() < 1e-5),
        "{:?}",
        &summary.final_model[..4]
    );
}

/// The next fit task, or `None` when the session ends or nothing comes for 10 s.
async fn next_task_or_end(raw: &mut Raw) -> Option<fedquic::protocol::FitTask> {
    let wait = async {
        loop {
            match raw.next_message().await? {
                Message::FitTask(t) => {
                    // Drain the model stream that follows.
                    if let Ok(mut s) = raw.conn.accept_uni().await {
                        let _ = s.read_to_end(1 << 20).await;
                    }
                    return Some(t);
                }
                Message::Bye { .. } => return None,
                _ => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_deltas_are_clipped_and_a_broken_model_is_never_committed() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut cfg = engine(4, 4, 2, Duration::from_secs(20));
    cfg.max_round_retries = 2;
    cfg.updates.norm_policy = NormPolicy::Clip;
    cfg.updates.max_update_norm_median_multiple = Some(2.0);
    let agg = start(&ca, Options::new(cfg));
    let honest: Vec<_> = (0..3)
        .map(|i| common::honest(&ca, agg.addr, &format!("h-{i}"), 1.0, 10))
        .collect();
    let mut attacker = raw_welcome(&ca, agg.addr, "attacker").await;
    let mut answers = Vec::new();
    let attack = tokio::spawn(async move {
        // Every task it gets, it answers with f32::MAX everywhere.
        while let Some(task) = next_task_or_end(&mut attacker).await {
            let mut s = attacker.conn.open_uni().await.unwrap();
            let mut bytes = encode_header(&update_header(&task, 10)).unwrap();
            bytes.extend_from_slice(&body(&[f32::MAX; PARAMS]));
            let _ = s.write_all(&bytes).await;
            let _ = s.finish();
            answers.push(task.task_id);
        }
        answers
    });
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
    let _ = attack.await;
    let first = &summary.records[0].outcome;
    // Attempt 1 would have pushed the model to ~1e38: not committed. The
    // retry clipped the attacker to 2x that attempt's median norm.
    assert_eq!(first.attempts, 2, "{first:?}");
    assert_eq!(first.updates_clipped, 1);
    let second = &summary.records[1].outcome;
    assert_eq!((second.attempts, second.updates_clipped), (1, 1));
    assert!(
        summary
            .final_model
            .iter()
            .all(|v| v.is_finite() && v.abs() < 10.0),
        "{:?}",
        &summary.final_model[..4]
    );
    // Clipped to norm 2 * sqrt(P) (each value 2.0): each round moves by
    // (3 * 10 * 1 + 10 * 2) / 40 = 1.25.
    assert!(
        summary.final_model.iter().all(|v| (v - 2.5).abs() < 1e-4),
        "{:?}",
        &summary.final_model[..4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reported_metrics_are_labelled_and_bounded() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let agg = start(&ca, Options::new(engine(2, 2, 1, Duration::from_secs(20))));
    let mut liars = Vec::new();
    for (name, accuracy) in [("liar-a", 1.0), ("liar-b", 7.0)] {
        let mut raw = raw_welcome(&ca, agg.addr, name).await;
        liars.push(tokio::spawn(async move {
            let (task, _) = raw.next_fit().await;
            let mut header = update_header(&task, 10);
            header.metrics = vec![("loss".into(), 0.0), ("accuracy".into(), accuracy)];
            let mut s = raw.conn.open_uni().await.unwrap();
            let mut bytes = encode_header(&header).unwrap();
            bytes.extend_from_slice(&body(&[0.5; PARAMS]));
            s.write_all(&bytes).await.unwrap();
            s.finish().unwrap();
            within(10, raw.next_message()).await
        }));
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    for l in liars {
        assert!(matches!(
            l.await.unwrap(),
            Some(Message::UpdateAccepted { .. })
        ));
    }
    let o = &summary.records[0].outcome;
    // The plausible claim is reported, under a name that says whose claim it
    // is; the impossible one is ignored and counted.
    assert_eq!(o.client_reported_train_accuracy, Some(1.0));
    assert_eq!(o.client_metrics_ignored, 1);
    let line = serde_json::to_value(&summary.records[0]).unwrap();
    assert!(line.get("train_accuracy").is_none(), "{line}");
    assert_eq!(line["client_reported_train_accuracy"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_uploads_with_made_up_tasks_do_not_stall_honest_clients() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let agg = start(&ca, Options::new(engine(4, 3, 2, Duration::from_secs(8))));
    let honest: Vec<_> = (0..3)
        .map(|i| common::honest(&ca, agg.addr, &format!("h-{i}"), 1.0 + i as f32, 10))
        .collect();
    let mut attacker = raw_welcome(&ca, agg.addr, "staller").await;
    let (task, _) = attacker.next_fit().await;
    // Four (more than the pool's two buffers) half-sent update streams with
    // made-up task ids, and one half-sent upload for its real task.
    let mut held = Vec::new();
    for fake in 0..4u64 {
        let mut header = update_header(&task, 10);
        header.task_id = 10_000 + fake;
        let mut s = attacker.conn.open_uni().await.unwrap();
        let mut bytes = encode_header(&header).unwrap();
        bytes.extend_from_slice(&body(&[1.0; PARAMS])[..PARAMS * 2]);
        let _ = s.write_all(&bytes).await;
        held.push(s);
    }
    let mut s = attacker.conn.open_uni().await.unwrap();
    let mut bytes = encode_header(&update_header(&task, 10)).unwrap();
    bytes.extend_from_slice(&body(&[1.0; PARAMS])[..PARAMS * 2]);
    s.write_all(&bytes).await.unwrap();
    held.push(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A second upload for the same task while the first is in flight.
    let mut second = attacker.conn.open_uni().await.unwrap();
    let mut bytes = encode_header(&update_header(&task, 10)).unwrap();
    bytes.extend_from_slice(&body(&[1.0; PARAMS]));
    let _ = second.write_all(&bytes).await;
    let _ = second.finish();

    let started = Instant::now();
    let summary = within(90, agg.task).await.unwrap().unwrap();
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
    let first = &summary.records[0].outcome;
    assert_eq!(first.clients_answered, 3, "{first:?}");
    assert_eq!(first.rejections.get("wrong_task"), Some(&4), "{first:?}");
    assert_eq!(first.rejections.get("upload_busy"), Some(&1), "{first:?}");
    // Round 1 closed at its deadline (the staller owed an answer); its
    // half-sent upload was cut off then, so round 2 had both buffers.
    assert!(first.fit_seconds >= 7.9, "{first:?}");
    assert_eq!(summary.records.len(), 2);
    assert_eq!(summary.records[1].outcome.clients_answered, 3);
    assert!(started.elapsed() < Duration::from_secs(40));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_minimum_rate_is_cut_off() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut opts = Options::new(engine(3, 2, 1, Duration::from_secs(60)));
    // The header-less stream is cut a second before the stalled upload: the
    // stalled upload fails the trickler's task, which closes the round (and
    // the run), so its rejection must come last. Equal limits made the order
    // a race under load.
    opts.adjust = |setup| {
        setup.upload_grace = Duration::from_secs(2);
        setup.header_timeout = Duration::from_secs(1);
    };
    let agg = start(&ca, opts);
    let honest: Vec<_> = (0..2)
        .map(|i| common::honest(&ca, agg.addr, &format!("h-{i}"), 1.0, 10))
        .collect();
    let mut slow = raw_welcome(&ca, agg.addr, "trickle").await;
    let (task, _) = slow.next_fit().await;
    // A stream that never sends its header...
    let mut silent = slow.conn.open_uni().await.unwrap();
    let _ = silent.write_all(&[]).await;
    // ...and an upload that stops after its header.
    let mut s = slow.conn.open_uni().await.unwrap();
    s.write_all(&encode_header(&update_header(&task, 10)).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        match within(10, slow.next_message()).await {
            Some(Message::UpdateRejected { reason, .. }) => reasons.push(reason),
            other => panic!("{other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        reasons.iter().any(|r| r.contains("no update header")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not received within")),
        "{reasons:?}"
    );
    let summary = within(30, agg.task).await.unwrap().unwrap();
    let o = &summary.records[0].outcome;
    assert_eq!(o.clients_answered, 2);
    assert_eq!(o.rejections.get("upload_timeout"), Some(&2), "{o:?}");
    assert!(
        o.fit_seconds < 10.0,
        "the round closed when the trickler was cut off"
    );
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_says_bye_closes_its_connection() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut opts = Options::new(engine(5, 5, 1, Duration::from_secs(60)));
    opts.max_clients = 2;
    let agg = start(&ca, opts);
    // Ten clients in turn: each says Bye while one of its streams is still
    // open; each connection must be closed by the aggregator, so the next
    // one finds room (max_clients = 2).
    for i in 0..10 {
        let mut raw = raw_welcome(&ca, agg.addr, &format!("bye-{i}")).await;
        let mut dangling = raw.conn.open_uni().await.unwrap();
        dangling.write_all(&[1, 2, 3]).await.unwrap();
        write_message(
            &mut raw.send,
            &Message::Bye {
                reason: "going away".into(),
                finished: false,
            },
        )
        .await
        .unwrap();
        let closed = within(5, raw.conn.closed()).await;
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
            "client {i}: {closed:?}"
        );
    }
    agg.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_evaluation_is_answered_and_does_not_hold_up_the_round() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut cfg = engine(2, 2, 1, Duration::from_secs(60));
    cfg.fraction_evaluate = 1.0;
    let agg = start(&ca, Options::new(cfg));
    let honest = common::honest(&ca, agg.addr, "h-0", 1.0, 10);
    let mut raw = raw_welcome(&ca, agg.addr, "bad-evaluator").await;
    let (task, _) = raw.next_fit().await;
    assert!(matches!(
        send_update(&mut raw, &task, 10, 1.0).await,
        Message::UpdateAccepted { .. }
    ));
    let eval = loop {
        match within(10, raw.next_message()).await {
            Some(Message::EvaluateTask(t)) => break t,
            Some(_) => continue,
            None => panic!("no evaluation task"),
        }
    };
    // Unknown tasks first: ignored, no answer, nothing counted.
    write_message(
        &mut raw.send,
        &Message::TaskFailed {
            task_id: 999_999,
            reason: "forged\nline".into(),
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    write_message(
        &mut raw.send,
        &Message::EvalResult(EvalResult {
            round: eval.round,
            task_id: eval.task_id,
            examples: 10,
            loss: f64::NAN,
            accuracy: 3.0,
        }),
    )
    .await
    .unwrap();
    loop {
        match within(10, raw.next_message()).await {
            Some(Message::UpdateRejected { task_id, reason }) => {
                assert_eq!(task_id, eval.task_id);
                assert!(reason.contains("evaluation"), "{reason}");
                break;
            }
            Some(Message::EvaluateTask(_)) | Some(Message::Heartbeat) => continue,
            other => panic!("{other:?}"),
        }
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    within(20, honest).await.unwrap().unwrap();
    let o = &summary.records[0].outcome;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait out the 60 s deadline"
    );
    assert_eq!(o.federated_eval.as_ref().map(|e| e.clients), Some(1));
    assert_eq!(o.updates_rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_run_tells_clients_to_come_back_and_they_do() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    // min_fit 3 of 2 available after one vanishes, no retries: aborts.
    let mut cfg = engine(2, 2, 1, Duration::from_secs(2));
    cfg.max_round_retries = 0;
    let agg = start(&ca, Options::new(cfg.clone()));
    let addr = agg.addr;
    let mut raw = raw_welcome(&ca, addr, "patient").await;
    let mut quitter = raw_welcome(&ca, addr, "quitter").await;
    let _ = quitter.next_fit().await;
    let _ = raw.next_fit().await;
    // Neither answers: the round gets 0 of 2 updates and the run aborts.
    let result = within(20, agg.task).await.unwrap();
    assert!(result.is_err(), "the run aborted");
    match within(5, raw.next_message()).await {
        Some(Message::Bye { finished, reason }) => {
            assert!(!finished, "an abort is not a finished run: {reason}");
        }
        other => panic!("expected Bye, got {other:?}"),
    }
    // A real client keeps retrying after an abort, and joins the next
    // aggregator on the same address.
    drop(quitter);
    let client = common::honest(&ca, addr, "returning", 1.0, 10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cfg.min_fit_clients = 1;
    cfg.min_available_clients = 1;
    let second = start_on(&ca, Options::new(cfg), addr);
    let summary = within(30, second.task).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 1);
    let report = within(20, client).await.unwrap().unwrap();
    assert!(report.sessions >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_update_header_is_refused_before_it_is_read() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let agg = start(&ca, Options::new(engine(2, 1, 1, Duration::from_secs(3))));
    let honest = common::honest(&ca, agg.addr, "h-0", 1.0, 10);
    let mut raw = raw_welcome(&ca, agg.addr, "big-header").await;
    let _ = raw.next_fit().await;
    let mut s = raw.conn.open_uni().await.unwrap();
    // A header length prefix of 1 MiB: real headers are under 1 KiB.
    let mut bytes = (1u32 << 20).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 4096]);
    let _ = s.write_all(&bytes).await;
    match within(10, raw.next_message()).await {
        Some(Message::UpdateRejected { reason, .. }) => {
            assert!(reason.contains("header"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    within(20, honest).await.unwrap().unwrap();
    assert_eq!(
        summary.records[0].outcome.rejections.get("malformed"),
        Some(&1)
    );
}

/// A client whose own endpoint is closed (the simulator closes the shared one
/// when a run ends) stops at once with `EndpointClosed`, whether the endpoint
/// was closed before it connected or while a handshake was hanging, instead
/// of retrying until it gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_endpoint_ends_the_client() {
    let ca = CertAuthority::generate("test CA").unwrap();
    let tls = client_tls(&ca, Some(identity(&ca, "client-001")));
    // A "server" that swallows every datagram: handshakes hang.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();

    let closed = fedquic::net::endpoint::client_endpoint(tls.clone()).unwrap();
    closed.close(0u32.into(), b"run over");
    let mut opts = options(addr, tls.clone(), 20);
    opts.endpoint = Some(closed);
    let err = within(
        10,
        fedquic::client::run_client(opts, DeltaTrainer::new(1.0, 1)),
    )
    .await
    .expect_err("a closed endpoint cannot connect");
    assert!(
        matches!(err, fedquic::client::ClientError::EndpointClosed),
        "{err}"
    );

    let endpoint = fedquic::net::endpoint::client_endpoint(tls.clone()).unwrap();
    let mut opts = options(addr, tls, 20);
    opts.endpoint = Some(endpoint.clone());
    let client = tokio::spawn(fedquic::client::run_client(opts, DeltaTrainer::new(1.0, 1)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    endpoint.close(0u32.into(), b"run over");
    let err = within(10, client)
        .await
        .unwrap()
        .expect_err("the handshake was cut");
    assert!(
        matches!(err, fedquic::client::ClientError::EndpointClosed),
        "{err}"
    );
}

/// An aggregator that never completes a handshake (here: a socket that
/// swallows every datagram) costs each attempt `handshake_timeout`, not the
/// whole `connect_timeout`: the client gives up on the handshake, backs off
/// and tries again, and says why when it runs out of attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_handshake_is_abandoned_after_the_handshake_timeout() {
    let ca = CertAuthority::generate("test CA").unwrap();
    let tls = client_tls(&ca, Some(identity(&ca, "client-001")));
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut opts = options(silent.local_addr().unwrap(), tls, 3);
    opts.connect_timeout = Duration::from_secs(60);
    opts.handshake_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = within(
        30,
        fedquic::client::run_client(opts, DeltaTrainer::new(1.0, 1)),
    )
    .await
    .expect_err("nothing answers");
    let elapsed = started.elapsed();
    match &err {
        fedquic::client::ClientError::GaveUp { attempts, last } => {
            assert_eq!(*attempts, 3, "{err}");
            assert!(last.contains("handshake not complete"), "{err}");
        }
        other => panic!("expected GaveUp, got {other}"),
    }
    // Three attempts of 0.3 s plus two backoffs of at most 0.2 s each; far
    // below one 60 s connect timeout.
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
}

/// A raw session whose client allows the aggregator no unidirectional
/// streams: no model can ever reach it.
async fn raw_without_model_streams(
    ca: &CertAuthority,
    addr: std::net::SocketAddr,
    name: &str,
) -> Raw {
    use fedquic::net::tls::{self, TransportSettings};
    let settings = TransportSettings {
        max_concurrent_uni_streams: 0,
        ..TransportSettings::default()
    };
    let tls = tls::client_config(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        Some(identity(ca, name)),
        &settings,
    )
    .unwrap();
    match open_raw(addr, tls, fedquic::protocol::SUPPORTED_VERSIONS.to_vec()).await {
        Opened::Welcome(raw, _) => raw,
        Opened::Refused(why) => panic!("{name} refused: {why}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_takes_its_model_is_disconnected() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    let mut opts = Options::new(engine(1, 1, 1, Duration::from_secs(60)));
    // The model (256 bytes) must arrive within the upload rule: 1 s here.
    opts.adjust = |setup| setup.upload_grace = Duration::from_secs(1);
    let agg = start(&ca, opts);
    let mut raw = raw_without_model_streams(&ca, agg.addr, "no-streams").await;
    match within(10, raw.next_message()).await {
        Some(Message::FitTask(_)) => {}
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    // The client's keep-alives hold the connection open: only the
    // aggregator can end it.
    let closed = within(15, raw.conn.closed()).await;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8), "{started:?}");
    agg.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_do_not_pile_up_behind_a_model_the_client_does_not_take() {
    let ca = CertAuthority::generate("hardening CA").unwrap();
    // Every second a retried round hands the client a new task (and
    // model), long before its first model transfer runs out of time (30 s).
    let mut eng = engine(1, 1, 1, Duration::from_secs(1));
    eng.max_round_retries = 50;
    let agg = start(&ca, Options::new(eng));
    let mut raw = raw_without_model_streams(&ca, agg.addr, "no-streams").await;
    match within(10, raw.next_message()).await {
        Some(Message::FitTask(_)) => {}
        other => panic!("{other:?}"),
    }
    // The third task, with two models pending, ends the session.
    let closed = within(15, raw.conn.closed()).await;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    agg.task.abort();
}
