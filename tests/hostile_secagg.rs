//! A curious aggregator, hand-written over real QUIC with mutual TLS, runs a
//! secure-aggregation round with one real client and two in-process ones,
//! then asks the real client for both secrets of the same neighbour (which
//! would unmask that neighbour's update). The honest client refuses: it
//! answers nothing, to that request or to a second one, and stays in the
//! federation.

mod common;

use std::time::Duration;

use common::*;
use fedquic::client::run_client;
use fedquic::net::io::{
    read_message, read_tensor_body, read_tensor_header, send_tensors, write_message,
};
use fedquic::net::pki::CertAuthority;
use fedquic::privacy::secagg::{
    ClientRound, FixedPoint, ServerParams, ServerRound, Threshold, UnmaskRequest,
};
use fedquic::protocol::{
    ClientNoise, Codec, FitInstructions, FitTask, Message, SecAggStep, SecAggTask, StreamKind,
    TensorHeader, TensorLimits, TensorMeta,
};

const REAL: &str = "client-001";

/// One epoch of batches of one: the test trainers ignore it.
fn one_step() -> FitInstructions {
    FitInstructions {
        epochs: 1,
        batch_size: 1,
        learning_rate: 0.1,
        proximal_mu: 0.0,
        seed: 0,
        optimizer: Default::default(),
    }
}

/// Secure aggregation for up to three clients, no noise.
fn three_clients() -> SecAggTask {
    SecAggTask {
        clip_norm: 100.0,
        weight_cap: 0,
        bound: 100.0,
        max_contributors: 3,
        noise: ClientNoise::None,
    }
}

async fn expect_step(recv: &mut quinn::RecvStream) -> SecAggStep {
    match tokio::time::timeout(Duration::from_secs(20), read_message(recv))
        .await
        .expect("the client answers")
        .unwrap()
    {
        Some(Message::SecAgg { task_id: 1, step }) => step,
        other => panic!("expected a secure-aggregation step, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_client_refuses_to_reveal_both_secrets_of_a_neighbour() {
    // The same round answered honestly: the client does send its shares...
    let answered = round_then_unmask(false).await;
    assert!(
        matches!(
            answered,
            Some(Message::SecAgg {
                step: SecAggStep::UnmaskResponse(_),
                ..
            })
        ),
        "{answered:?}"
    );
    // ...but not when the request could unmask a neighbour, nor to any
    // request after that one.
    assert_eq!(round_then_unmask(true).await, None);
}

/// Plays a round up to the unmask request (a curious one first if asked,
/// then the honest one) and returns the client's answer to the first.
async fn round_then_unmask(curious_first: bool) -> Option<Message> {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let tls = client_tls(&ca, Some(identity(&ca, REAL)));
    let client = tokio::spawn(run_client(
        options(addr, tls, 3),
        DeltaTrainer::new(0.25, 10),
    ));

    let spec = format!("vector:{PARAMS}");
    let (conn, mut send, mut recv) = welcome(&endpoint, &spec).await;
    let task = three_clients();
    let fit = FitTask {
        round: 1,
        task_id: 1,
        config: one_step(),
        initial_loss: false,
        scaffold: None,
        secagg: Some(task.clone()),
    };
    write_message(&mut send, &Message::FitTask(fit))
        .await
        .unwrap();
    let header = TensorHeader {
        kind: StreamKind::GlobalModel,
        round: 1,
        task_id: 1,
        codec: Codec::F32,
        tensors: vec![TensorMeta::f32("params", &[PARAMS])],
        num_examples: 0,
        metrics: Vec::new(),
        body_len: 4 * PARAMS as u64,
    };
    send_tensors(&conn, &header, &[0.0; PARAMS]).await.unwrap();

    // The round, played honestly up to the unmask request.
    let len = SecAggTask::vector_len(PARAMS);
    let mut server = ServerRound::new(ServerParams {
        round: 1,
        vector_len: len,
        // Three clients: the complete graph.
        degree: 2,
        threshold: Threshold::Fraction(0.5),
        min_clients: 2,
        graph_seed: 5,
    });
    let mut fakes: Vec<(String, ClientRound)> = Vec::new();
    for (i, name) in ["fake-a", "fake-b"].into_iter().enumerate() {
        let (round, keys) = ClientRound::new(1, len, [i as u8 + 1; 32]);
        server.on_keys(name, &keys).unwrap();
        fakes.push((name.to_string(), round));
    }
    let SecAggStep::AdvertiseKeys(keys) = expect_step(&mut recv).await else {
        panic!("keys first")
    };
    server.on_keys(REAL, &keys).unwrap();
    for (name, neighbours) in server.close_advertise().unwrap() {
        match fakes.iter_mut().find(|(n, _)| *n == name) {
            Some((_, round)) => {
                let shares = round.on_neighbours(&neighbours).unwrap();
                server.on_shares(&name, &shares).unwrap();
            }
            None => {
                let step = SecAggStep::Neighbours(neighbours);
                write_message(&mut send, &Message::SecAgg { task_id: 1, step })
                    .await
                    .unwrap();
            }
        }
    }
    let SecAggStep::ShareKeys(shares) = expect_step(&mut recv).await else {
        panic!("shares next")
    };
    server.on_shares(REAL, &shares).unwrap();
    for (name, relayed) in server.close_sharing().unwrap() {
        match fakes.iter_mut().find(|(n, _)| *n == name) {
            Some((_, round)) => round.on_relayed_shares(&relayed).unwrap(),
            None => {
                let step = SecAggStep::RelayedShares(relayed);
                write_message(&mut send, &Message::SecAgg { task_id: 1, step })
                    .await
                    .unwrap();
            }
        }
    }
    // The real client's masked input arrives as ring32.
    let mut stream = conn.accept_uni().await.unwrap();
    let header = read_tensor_header(&mut stream, &TensorLimits::for_model(len as u64))
        .await
        .unwrap();
    assert_eq!(header.codec, Codec::Ring32);
    let mut masked = vec![0f32; len];
    read_tensor_body(&mut stream, &header, &mut masked)
        .await
        .unwrap();
    let masked: Vec<u32> = masked.iter().map(|v| v.to_bits()).collect();
    server.on_masked_input(REAL, &masked).unwrap();
    let fixed_point = FixedPoint::for_sum(3, 100.0).unwrap();
    for (name, round) in &mut fakes {
        let mut input = vec![0u32; len];
        fixed_point
            .encode_into(&vec![0.0; len], &mut input, 1)
            .unwrap();
        round.mask(&mut input).unwrap();
        server.on_masked_input(name, &input).unwrap();
    }
    let requests = server.close_masked_input().unwrap();
    let (_, honest) = requests.iter().find(|(n, _)| n == REAL).unwrap();
    // The curious part: fake-a named both as a survivor and as dropped, so
    // its self mask and its pairwise masks could both be removed.
    let target = honest.survivors[0];
    let curious = UnmaskRequest {
        round: 1,
        survivors: honest.survivors.clone(),
        dropped: vec![target],
    };
    let requests = match curious_first {
        true => vec![curious, honest.clone()],
        false => vec![honest.clone()],
    };
    let mut answers = Vec::new();
    for request in requests {
        let step = SecAggStep::UnmaskRequest(request);
        write_message(&mut send, &Message::SecAgg { task_id: 1, step })
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(2), read_message(&mut recv)).await {
            Err(_) => answers.push(None),
            Ok(Ok(msg)) => answers.push(msg),
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    if curious_first {
        assert_eq!(answers[1], None, "a second request is never answered");
    }
    // Still in the federation: it leaves cleanly when told the run is over.
    say_the_run_is_over(&mut send).await;
    let report = within(10, client).await.unwrap().unwrap();
    assert_eq!(report.fit_tasks, 1);
    answers.swap_remove(0)
}

/// The aggregator drops the client from a secure-aggregation round while it
/// trains (as it does to every client of a failed round), then hands it an
/// ordinary task. The abandoned training keeps the trainer until it ends;
/// the next task waits for it and is answered on the same connection (the
/// trainer was lost before, and the client reconnected forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_abandoned_while_training_keeps_the_trainer() {
    abandon_a_task_then_train(false).await;
}

/// The same, abandoned while it waits for a training slot (the simulator
/// shares slots between its clients): the trainer stays with the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_abandoned_while_waiting_for_a_training_slot_keeps_the_trainer() {
    abandon_a_task_then_train(true).await;
}

async fn abandon_a_task_then_train(wait_for_a_slot: bool) {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let tls = client_tls(&ca, Some(identity(&ca, REAL)));
    let mut trainer = DeltaTrainer::new(0.25, 10);
    let mut opts = options(addr, tls, 3);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let mut held = None;
    if wait_for_a_slot {
        held = Some(slots.clone().acquire_owned().await.unwrap());
        opts.training_slots = Some(slots);
    } else {
        trainer.delay = Duration::from_millis(1500);
    }
    let client = tokio::spawn(run_client(opts, trainer));

    let spec = format!("vector:{PARAMS}");
    let (conn, mut send, mut recv) = welcome(&endpoint, &spec).await;
    let config = one_step();
    let model = |task_id| TensorHeader {
        kind: StreamKind::GlobalModel,
        round: task_id,
        task_id,
        codec: Codec::F32,
        tensors: vec![TensorMeta::f32("params", &[PARAMS])],
        num_examples: 0,
        metrics: Vec::new(),
        body_len: 4 * PARAMS as u64,
    };
    let secure = FitTask {
        round: 1,
        task_id: 1,
        config: config.clone(),
        initial_loss: false,
        scaffold: None,
        secagg: Some(three_clients()),
    };
    write_message(&mut send, &Message::FitTask(secure))
        .await
        .unwrap();
    send_tensors(&conn, &model(1), &[0.0; PARAMS])
        .await
        .unwrap();
    assert!(matches!(
        expect_step(&mut recv).await,
        SecAggStep::AdvertiseKeys(_)
    ));
    // Training has the model by now and sleeps in `fit`, or waits for the slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_message(
        &mut send,
        &Message::UpdateRejected {
            task_id: 1,
            reason: "the round failed".into(),
        },
    )
    .await
    .unwrap();
    // The rejection is read before a held slot frees up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    let plain = FitTask {
        round: 2,
        task_id: 2,
        config,
        initial_loss: false,
        scaffold: None,
        secagg: None,
    };
    write_message(&mut send, &Message::FitTask(plain))
        .await
        .unwrap();
    send_tensors(&conn, &model(2), &[0.0; PARAMS])
        .await
        .unwrap();
    let mut update = within(20, conn.accept_uni())
        .await
        .expect("the update arrives on the same connection");
    let header = read_tensor_header(&mut update, &TensorLimits::for_model(PARAMS as u64))
        .await
        .unwrap();
    assert_eq!((header.kind, header.task_id), (StreamKind::Update, 2));
    let mut delta = vec![0f32; PARAMS];
    read_tensor_body(&mut update, &header, &mut delta)
        .await
        .unwrap();
    assert!(delta.iter().all(|&d| d == 0.25), "{delta:?}");
    say_the_run_is_over(&mut send).await;
    let report = within(10, client).await.unwrap().unwrap();
    assert_eq!((report.fit_tasks, report.sessions), (1, 1));
}
