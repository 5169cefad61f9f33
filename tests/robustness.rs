//! The aggregator under faults and hostile clients, over real QUIC + mTLS:
//! dropouts mid-upload, a client that stalls forever, malformed updates,
//! oversized frames, wrong versions, stream and idle limits.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fedquic::net::io::write_message;
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{Message, SUPPORTED_VERSIONS, TensorMeta, encode_f32_body, encode_header};

/// The exact FedAvg of `(delta, examples)` updates applied to a zero model.
fn fedavg(updates: &[(f32, u64)]) -> f32 {
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum();
    (updates
        .iter()
        .map(|(d, n)| *d as f64 * *n as f64)
        .sum::<f64>()
        / total) as f32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_vanish_mid_upload_and_their_partial_updates_are_discarded() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let agg = start(&ca, Options::new(engine(10, 5, 1, Duration::from_secs(20))));
    let honest_updates: Vec<(f32, u64)> = (0..7)
        .map(|i| (0.5 + i as f32, 10 + 5 * i as u64))
        .collect();
    let honest: Vec<_> = honest_updates
        .iter()
        .enumerate()
        .map(|(i, (d, n))| common::honest(&ca, agg.addr, &format!("honest-{i}"), *d, *n))
        .collect();
    // Three clients send half of their update (a huge delta that would wreck
    // the average) and then drop the connection.
    let mut vanishing = Vec::new();
    for i in 0..3 {
        let mut raw = raw_welcome(&ca, agg.addr, &format!("vanish-{i}")).await;
        vanishing.push(tokio::spawn(async move {
            let (task, _) = raw.next_fit().await;
            let mut stream = raw.conn.open_uni().await.unwrap();
            let mut bytes = encode_header(&update_header(&task, 1_000_000)).unwrap();
            encode_f32_body(&[1e6; PARAMS / 2], &mut bytes);
            stream.write_all(&bytes).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            raw.conn.close(0u32.into(), b"gone");
        }));
    }
    let started = Instant::now();
    let summary = within(60, agg.task).await.unwrap().unwrap();
    for v in vanishing {
        v.await.unwrap();
    }
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
    let first = &summary.records[0].outcome;
    assert_eq!(first.clients_selected, 10);
    assert_eq!(first.clients_answered, 7);
    assert_eq!(first.clients_dropped, 3);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the round closed when the last client dropped, not at the deadline"
    );
    let expected = fedavg(&honest_updates);
    for v in summary.final_model.iter() {
        assert!(
            (v - expected).abs() < 1e-4,
            "partial updates leaked into the model: {v} vs {expected}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_forever_is_dropped_at_the_deadline() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let agg = start(&ca, Options::new(engine(4, 3, 2, Duration::from_secs(2))));
    let updates = [(1.0f32, 10u64), (2.0, 20), (3.0, 30)];
    let honest: Vec<_> = updates
        .iter()
        .enumerate()
        .map(|(i, (d, n))| common::honest(&ca, agg.addr, &format!("h-{i}"), *d, *n))
        .collect();
    let mut staller = raw_welcome(&ca, agg.addr, "staller").await;
    let stall = tokio::spawn(async move {
        // Takes its tasks and the models, and never answers.
        let _ = staller.next_fit().await;
        let _ = staller.next_fit().await;
        staller
    });
    let summary = within(30, agg.task).await.unwrap().unwrap();
    for r in &summary.records {
        assert_eq!(r.outcome.clients_selected, 4);
        assert_eq!(r.outcome.clients_answered, 3);
        assert_eq!(
            r.outcome.clients_dropped, 1,
            "the staller counts as dropped"
        );
        assert!(
            r.outcome.fit_seconds >= 1.9,
            "closed at the deadline: {}",
            r.outcome.fit_seconds
        );
    }
    let expected = 2.0 * fedavg(&updates);
    assert!(
        summary
            .final_model
            .iter()
            .all(|v| (v - expected).abs() < 1e-5)
    );
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
    drop(stall.await.unwrap());
}

/// Sends one crafted update stream and returns the aggregator's answer.
async fn answer_to(
    raw: &mut Raw,
    header: &fedquic::protocol::TensorHeader,
    body: &[u8],
    finish: bool,
) -> Message {
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream
        .write_all(&encode_header(header).unwrap())
        .await
        .unwrap();
    // The aggregator may stop reading as soon as it has seen the header.
    let _ = stream.write_all(body).await;
    if finish {
        let _ = stream.finish();
    } else {
        // Give up on the stream half-way: the peer sees a reset.
        let _ = stream.reset(7u32.into());
    }
    within(10, raw.next_message())
        .await
        .expect("an answer from the aggregator")
}

/// (client, what, header, body, finish the stream, what the reason says)
type Case = (
    usize,
    &'static str,
    fedquic::protocol::TensorHeader,
    Vec<u8>,
    bool,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_updates_are_rejected_with_reasons_and_the_round_carries_on() {
    const HOSTILE: usize = 7;
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let agg = start(
        &ca,
        Options::new(engine(HOSTILE + 2, 2, 1, Duration::from_secs(20))),
    );
    // The honest clients take 2 s to train, which keeps the round open
    // while the hostile clients try everything.
    let honest: Vec<_> = [(1.0f32, 10u64), (3.0, 10)]
        .iter()
        .enumerate()
        .map(|(i, (d, n))| {
            let trainer = DeltaTrainer {
                delay: Duration::from_secs(2),
                ..DeltaTrainer::new(*d, *n)
            };
            common::slow(&ca, agg.addr, &format!("h-{i}"), trainer)
        })
        .collect();
    // Each hostile client holds one task, and any unusable answer to it ends
    // its turn: one client per kind of malformed answer.
    let mut raws = Vec::new();
    for i in 0..HOSTILE {
        raws.push(raw_welcome(&ca, agg.addr, &format!("hostile-{i}")).await);
    }
    let mut tasks = Vec::new();
    for raw in &mut raws {
        tasks.push(raw.next_fit().await.0);
    }
    let good_body = {
        let mut b = Vec::new();
        encode_f32_body(&[1e6; PARAMS], &mut b);
        b
    };
    let mut nan_body = Vec::new();
    let mut values = [0.5f32; PARAMS];
    values[PARAMS - 1] = f32::NAN;
    encode_f32_body(&values, &mut nan_body);

    let mut cases: Vec<Case> = Vec::new();
    // First the ones that leave the client its turn (they are not answers to
    // its task): refused from the header alone, before any buffer is taken...
    let mut h = update_header(&tasks[0], 5);
    h.round = tasks[0].round + 7;
    cases.push((
        0,
        "future round",
        h,
        good_body.clone(),
        true,
        "stale update",
    ));
    let mut h = update_header(&tasks[0], 5);
    h.task_id += 1000;
    cases.push((
        0,
        "unknown task",
        h,
        good_body.clone(),
        true,
        "expected task",
    ));
    // ...then the malformed answers, each refused before it reaches the model.
    let mut h = update_header(&tasks[0], 5);
    h.tensors = vec![TensorMeta::f32("weights", &[PARAMS])];
    cases.push((
        0,
        "wrong tensor name",
        h,
        good_body.clone(),
        true,
        "layout mismatch",
    ));
    let mut h = update_header(&tasks[1], 5);
    h.tensors = vec![TensorMeta::f32("params", &[PARAMS / 2, 2])];
    cases.push((
        1,
        "wrong shape",
        h,
        good_body.clone(),
        true,
        "layout mismatch",
    ));
    let mut h = update_header(&tasks[2], 5);
    h.body_len += 4;
    cases.push((
        2,
        "wrong byte length",
        h,
        good_body.clone(),
        true,
        "body bytes",
    ));
    cases.push((
        3,
        "non-finite value",
        update_header(&tasks[3], 5),
        nan_body,
        true,
        "non-finite",
    ));
    cases.push((
        4,
        "truncated body",
        update_header(&tasks[4], 5),
        good_body[..100].to_vec(),
        true,
        "truncated",
    ));
    cases.push((
        5,
        "reset mid-body",
        update_header(&tasks[5], 5),
        good_body[..100].to_vec(),
        false,
        "reset",
    ));
    let mut h = update_header(&tasks[6], 5);
    h.kind = fedquic::protocol::StreamKind::GlobalModel;
    cases.push((
        6,
        "not an update stream",
        h,
        good_body.clone(),
        true,
        "expected an update",
    ));
    // Client 0's turn ended with its malformed answer.
    cases.push((
        0,
        "after its turn ended",
        update_header(&tasks[0], 5),
        good_body.clone(),
        true,
        "not selected",
    ));
    for (client, what, header, body, finish, needle) in cases {
        match answer_to(&mut raws[client], &header, &body, finish).await {
            Message::UpdateRejected { reason, .. } => {
                assert!(
                    reason.contains(needle),
                    "{what}: reason '{reason}' should mention '{needle}'"
                )
            }
            other => panic!("{what}: expected UpdateRejected, got {other:?}"),
        }
    }
    // None of it touched the model; the honest clients finish the round.
    let summary = within(30, agg.task).await.unwrap().unwrap();
    let r = &summary.records[0].outcome;
    assert_eq!(r.clients_answered, 2);
    assert_eq!(
        r.clients_dropped, HOSTILE,
        "every hostile client lost its turn"
    );
    assert_eq!(r.updates_rejected, 10, "{r:?}");
    let expected: std::collections::BTreeMap<String, usize> = [
        ("stale", 1),
        ("wrong_task", 1),
        ("malformed", 7),
        ("not_selected", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(r.rejections, expected);
    assert!(
        summary.final_model.iter().all(|v| (v - 2.0).abs() < 1e-6),
        "{:?}",
        &summary.final_model[..4]
    );
    for h in honest {
        within(20, h).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_within_the_round_is_refused_without_counting_twice() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let agg = start(&ca, Options::new(engine(3, 2, 1, Duration::from_secs(3))));
    let a = common::honest(&ca, agg.addr, "h-0", 1.0, 10);
    let mut raw = raw_welcome(&ca, agg.addr, "twice").await;
    // A third client that stalls keeps the round open until its deadline.
    let mut staller = raw_welcome(&ca, agg.addr, "staller").await;
    let stall = tokio::spawn(async move {
        let _ = staller.next_fit().await;
        staller
    });
    let (task, _) = raw.next_fit().await;
    let mut body = Vec::new();
    encode_f32_body(&[3.0; PARAMS], &mut body);
    let first = answer_to(&mut raw, &update_header(&task, 10), &body, true).await;
    assert!(matches!(first, Message::UpdateAccepted { .. }), "{first:?}");
    match answer_to(&mut raw, &update_header(&task, 10), &body, true).await {
        Message::UpdateRejected { reason, .. } => assert!(reason.contains("duplicate"), "{reason}"),
        other => panic!("expected a duplicate rejection, got {other:?}"),
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    assert_eq!(summary.records[0].outcome.clients_answered, 2);
    assert!(
        summary.final_model.iter().all(|v| (v - 2.0).abs() < 1e-6),
        "counted once"
    );
    within(20, a).await.unwrap().unwrap();
    drop(stall.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_versions_and_oversized_frames_are_refused_clearly() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    // No round starts (it waits for 100 clients): only the handshakes matter.
    let agg = start(
        &ca,
        Options::new(engine(100, 1, 1, Duration::from_secs(20))),
    );
    match open_raw(
        agg.addr,
        client_tls(&ca, Some(identity(&ca, "future"))),
        vec![99],
    )
    .await
    {
        Opened::Refused(why) => assert!(why.contains("no common protocol version"), "{why}"),
        Opened::Welcome(..) => panic!("version 99 must be refused"),
    }
    // A frame prefix claiming 16 MiB: refused before anything is allocated.
    let mut raw = raw_welcome(&ca, agg.addr, "big-talker").await;
    raw.send
        .write_all(&(16u32 << 20).to_le_bytes())
        .await
        .unwrap();
    match within(10, raw.next_message()).await {
        Some(Message::Reject(r)) => assert!(r.reason.contains("exceeds the limit"), "{}", r.reason),
        other => panic!("expected a Reject, got {other:?}"),
    }
    let closed = within(10, raw.conn.closed()).await;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    // A client that speaks out of turn.
    let mut rude = raw_welcome(&ca, agg.addr, "rude").await;
    write_message(
        &mut rude.send,
        &Message::Hello(fedquic::protocol::Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            codecs: vec![],
            agent: "again".into(),
            backend: "cpu".into(),
        }),
    )
    .await
    .unwrap();
    match within(10, rude.next_message()).await {
        Some(Message::Reject(r)) => {
            assert!(r.reason.contains("unexpected message"), "{}", r.reason)
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    agg.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_bounded() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let agg = start(&ca, Options::new(engine(5, 5, 1, Duration::from_secs(20))));
    let raw = raw_welcome(&ca, agg.addr, "greedy").await;
    let limit = fedquic::net::tls::TransportSettings::default().max_concurrent_uni_streams as usize;
    let mut streams = Vec::new();
    for _ in 0..limit {
        let mut s = within(5, raw.conn.open_uni()).await.unwrap();
        s.write_all(b"FQ").await.unwrap();
        streams.push(s);
    }
    // One more than the limit cannot be opened while the others stay open.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), raw.conn.open_uni())
            .await
            .is_err()
    );

    drop((streams, raw));
    agg.task.abort();
}

/// Forwards UDP between one client and `server` until told to cut the link
/// (a network partition: from then on both sides hear nothing).
async fn udp_link(
    server: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    use tokio::net::UdpSocket;
    let front = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    let client = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (f, b, c, rx) = (front.clone(), back.clone(), client.clone(), cut_rx.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            let cut_off = *rx.borrow();
            if !cut_off {
                let _ = b.send(&buf[..n]).await;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            let cut_off = *cut_rx.borrow();
            if let (Some(to), false) = (to, cut_off) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_dropped_at_the_idle_timeout_and_frees_its_place() {
    let ca = CertAuthority::generate("robustness CA").unwrap();
    let mut opts = Options::new(engine(5, 5, 1, Duration::from_secs(20)));
    opts.transport.idle_timeout = Duration::from_millis(1500);
    opts.max_clients = 1;
    let agg = start(&ca, opts);
    let (link, cut) = udp_link(agg.addr).await;
    let _vanishing = match open_raw(
        link,
        client_tls(&ca, Some(identity(&ca, "vanishing"))),
        SUPPORTED_VERSIONS.to_vec(),
    )
    .await
    {
        Opened::Welcome(raw, _) => raw,
        Opened::Refused(why) => panic!("{why}"),
    };
    match open_raw(
        agg.addr,
        client_tls(&ca, Some(identity(&ca, "next"))),
        SUPPORTED_VERSIONS.to_vec(),
    )
    .await
    {
        Opened::Refused(why) => assert!(why.contains("full"), "{why}"),
        Opened::Welcome(..) => panic!("the aggregator is full while the first client is there"),
    }
    // The network between them fails: no close, no packets, nothing.
    cut.send(true).unwrap();
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match open_raw(
            agg.addr,
            client_tls(&ca, Some(identity(&ca, "next"))),
            SUPPORTED_VERSIONS.to_vec(),
        )
        .await
        {
            Opened::Welcome(..) => break,
            Opened::Refused(why) => {
                assert!(why.contains("full"), "{why}");
                assert!(
                    start.elapsed() < Duration::from_secs(8),
                    "the vanished client was never dropped"
                );
            }
        }
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "dropped only after the idle timeout"
    );
    agg.task.abort();
}
