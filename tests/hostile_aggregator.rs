//! A compromised aggregator, hand-written over real QUIC with mutual TLS,
//! asks a client for a 2e9-parameter model, 10,000 epochs, batches of 2^20
//! and a retry-after of u64::MAX: the client refuses each with a clear
//! error, allocates nothing big, and does not park.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fedquic::client::{ClientError, ClientLimits, LimitError, run_client};
use fedquic::net::io::{
    read_message, read_tensor_body, read_tensor_header, send_tensors, write_message,
};
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{
    Codec, FitInstructions, FitTask, Message, Reject, StreamKind, TensorHeader, TensorLimits,
};
use fedquic::train::layout::ParamLayout;

/// Records the largest single allocation of this test process.
struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only reads the requested size.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, forwarded to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

fn fit_task(task_id: u64, epochs: u32, batch_size: u32) -> FitTask {
    FitTask {
        round: 1,
        task_id,
        config: FitInstructions {
            epochs,
            batch_size,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            seed: 0,
            optimizer: Default::default(),
        },
        initial_loss: false,
        scaffold: None,
        secagg: None,
    }
}

/// Sends a fit task and its (valid) global model.
async fn send_fit(conn: &quinn::Connection, send: &mut quinn::SendStream, task: FitTask) {
    write_message(send, &Message::FitTask(task.clone()))
        .await
        .unwrap();
    let header = TensorHeader {
        kind: StreamKind::GlobalModel,
        round: task.round,
        task_id: task.task_id,
        codec: Codec::F32,
        tensors: ParamLayout::Vector(PARAMS).wire_layout(),
        num_examples: 0,
        metrics: Vec::new(),
        body_len: PARAMS as u64 * 4,
    };
    // The client may stop the stream unread: that is its answer too.
    let _ = send_tensors(conn, &header, &[0.0; PARAMS]).await;
}

/// The client's next control message.
async fn answer(recv: &mut quinn::RecvStream) -> Message {
    loop {
        match read_message(recv).await.unwrap() {
            Some(Message::Heartbeat) => continue,
            Some(m) => return m,
            None => panic!("client closed the session"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_model_is_refused_before_anything_is_allocated() {
    let ca = CertAuthority::generate("hostile CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let server = tokio::spawn(async move {
        let (conn, _send, _recv) = welcome(&endpoint, "vector:2000000000").await;
        // Hold the session open: the client must leave on its own.
        conn.closed().await;
    });
    let opts = options(addr, client_tls(&ca, Some(identity(&ca, "client-001"))), 3);
    let result = within(20, run_client(opts, DeltaTrainer::new(1.0, 1))).await;
    let err = result.expect_err("the client must refuse the model");
    assert!(
        matches!(
            err,
            ClientError::Limit(LimitError::Params {
                params: 2_000_000_000,
                ..
            })
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("2000000000 parameters"), "{text}");
    assert!(text.contains("--max-params"), "{text}");
    // 2e9 f32 would be 8 GB; nothing near a model of that size was asked for.
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 64 << 20, "largest allocation {largest} bytes");
    within(10, server).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excessive_tasks_are_refused_and_retry_after_is_capped() {
    let ca = CertAuthority::generate("hostile CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let server = tokio::spawn(async move {
        let spec = ParamLayout::Vector(PARAMS).to_string();
        let (conn, mut send, mut recv) = welcome(&endpoint, &spec).await;
        let mut refusals = Vec::new();
        for (task_id, epochs, batch) in [(1, 10_000, 10), (2, 1, 1 << 20)] {
            send_fit(&conn, &mut send, fit_task(task_id, epochs, batch)).await;
            match answer(&mut recv).await {
                Message::TaskFailed {
                    task_id: id,
                    reason,
                } => {
                    assert_eq!(id, task_id);
                    refusals.push(reason);
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        // The session still works: an ordinary task is trained.
        send_fit(&conn, &mut send, fit_task(3, 1, 10)).await;
        let mut update = conn.accept_uni().await.unwrap();
        let header = read_tensor_header(&mut update, &TensorLimits::for_model(PARAMS as u64))
            .await
            .unwrap();
        assert_eq!((header.kind, header.task_id), (StreamKind::Update, 3));
        // Park the client "forever"; it must come back after its own cap.
        write_message(
            &mut send,
            &Message::Reject(Reject {
                reason: "go away".into(),
                retry_after_ms: Some(u64::MAX),
            }),
        )
        .await
        .unwrap();
        let (conn, mut send, _recv) = welcome(&endpoint, &spec).await;
        say_the_run_is_over(&mut send).await;
        // The client closes the connection once it has read the goodbye.
        conn.closed().await;
        refusals
    });
    let mut opts = options(addr, client_tls(&ca, Some(identity(&ca, "client-001"))), 3);
    opts.limits = ClientLimits {
        max_retry_after: Duration::from_millis(300),
        ..ClientLimits::default()
    };
    let report = within(30, run_client(opts, DeltaTrainer::new(1.0, 1)))
        .await
        .expect("the client finishes when told so");
    assert_eq!(report.sessions, 2, "it came back after the capped wait");
    let refusals = within(10, server).await.unwrap();
    assert!(
        refusals[0].contains("10000 local epochs"),
        "{}",
        refusals[0]
    );
    assert!(refusals[0].contains("--max-epochs"), "{}", refusals[0]);
    assert!(
        refusals[1].contains("batches of 1048576"),
        "{}",
        refusals[1]
    );
}

/// A model with few parameters (786k) but a 51M-value activation per example:
/// a batch of 32 would need 20 GB of scratch memory. The client refuses the
/// task before allocating it, and says which flag raises the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_activations_are_refused_before_anything_is_allocated() {
    let refusal = train_a_wide_model(None).await.expect_err("refused");
    assert!(refusal.contains("batches of 32"), "{refusal}");
    assert!(refusal.contains("--max-training-memory"), "{refusal}");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 64 << 20, "largest allocation {largest} bytes");
}

/// The same task for a client with one local example: its batches hold one
/// example (0.6 GB of scratch), within the limit, so it trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_check_counts_the_examples_a_batch_can_hold() {
    train_a_wide_model(Some(1)).await.expect("trained");
}

/// Sends the wide model's task (batch 32) to a client with `local_examples`;
/// the refusal's reason, or Ok when an update came back.
async fn train_a_wide_model(local_examples: Option<usize>) -> Result<(), String> {
    let ca = CertAuthority::generate("hostile CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let server = tokio::spawn(async move {
        let spec = "cnn:1x28x28-c65536k1-m28-10";
        let (conn, mut send, mut recv) = welcome(&endpoint, spec).await;
        write_message(&mut send, &Message::FitTask(fit_task(1, 1, 32)))
            .await
            .unwrap();
        let layout: ParamLayout = spec.parse().unwrap();
        let header = TensorHeader {
            kind: StreamKind::GlobalModel,
            round: 1,
            task_id: 1,
            codec: Codec::F32,
            tensors: layout.wire_layout(),
            num_examples: 0,
            metrics: Vec::new(),
            body_len: layout.num_params() as u64 * 4,
        };
        let _ = send_tensors(&conn, &header, &vec![0.0; layout.num_params()]).await;
        let outcome = tokio::select! {
            message = answer(&mut recv) => match message {
                Message::TaskFailed { task_id: 1, reason } => Err(reason),
                other => panic!("expected a refusal or an update, got {other:?}"),
            },
            update = conn.accept_uni() => {
                let mut update = update.unwrap();
                let limits = TensorLimits::for_model(layout.num_params() as u64);
                let header = read_tensor_header(&mut update, &limits).await.unwrap();
                assert_eq!((header.kind, header.task_id), (StreamKind::Update, 1));
                let mut delta = vec![0f32; layout.num_params()];
                read_tensor_body(&mut update, &header, &mut delta).await.unwrap();
                Ok(())
            }
        };
        say_the_run_is_over(&mut send).await;
        conn.closed().await;
        outcome
    });
    let opts = options(addr, client_tls(&ca, Some(identity(&ca, "client-001"))), 3);
    let mut trainer = DeltaTrainer::new(1.0, 1);
    trainer.local_examples = local_examples;
    within(30, run_client(opts, trainer))
        .await
        .expect("the client stays and finishes");
    within(10, server).await.unwrap()
}

/// A task whose model never comes, kept alive by QUIC keep-alives: the client
/// gives up on the session after `max_task_wait` and reconnects, instead of
/// waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_comes_is_not_waited_for_forever() {
    let ca = CertAuthority::generate("hostile CA").unwrap();
    let (endpoint, addr) = hostile_endpoint(&ca);
    let server = tokio::spawn(async move {
        let spec = ParamLayout::Vector(PARAMS).to_string();
        let (first, mut send, _recv) = welcome(&endpoint, &spec).await;
        write_message(&mut send, &Message::FitTask(fit_task(1, 1, 10)))
            .await
            .unwrap();
        // No model stream. The client must come back on a new connection.
        let (conn, mut send, _recv) = welcome(&endpoint, &spec).await;
        drop(first);
        say_the_run_is_over(&mut send).await;
        conn.closed().await;
    });
    let mut opts = options(addr, client_tls(&ca, Some(identity(&ca, "client-001"))), 3);
    opts.limits = ClientLimits {
        max_task_wait: Duration::from_secs(1),
        ..ClientLimits::default()
    };
    let report = within(20, run_client(opts, DeltaTrainer::new(1.0, 1)))
        .await
        .expect("the client finishes when told so");
    assert_eq!((report.sessions, report.fit_tasks), (2, 0));
    within(10, server).await.unwrap();
}
