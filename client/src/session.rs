//! The client's QUIC session: connect, say hello, then serve fit and
//! evaluate tasks until the aggregator says the run is complete. Lost
//! connections are retried with jittered exponential backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedquic_net::io::{
    IoError, read_message, read_tensor_body, read_tensor_header, send_encoded, send_shared_tensors,
    write_message,
};
use fedquic_net::revocation::certificate_refused;
use fedquic_privacy::secagg::ClientRound;
use fedquic_protocol::{
    BodyDecoder, Codec, EvalResult, FitTask, Hello, INITIAL_LOSS_METRIC, Message,
    SUPPORTED_VERSIONS, SecAggStep, SecAggTask, StreamKind, TensorHeader, TensorLimits, TensorMeta,
    all_codecs, encode_body, with_control_layout, with_secagg_layout,
};
use fedquic_train::layout::ParamLayout;
use thiserror::Error;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::limits::{ClientLimits, LimitError};
use crate::state::{StateStore, StateVector};
use crate::trainer::{Trainer, TrainerError};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the aggregator refused this client: {0}")]
    Rejected(String),
    #[error("the aggregator's model cannot be trained here: {0}")]
    Incompatible(#[from] TrainerError),
    #[error("gave up after {attempts} connection attempts; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("cannot create the client endpoint: {0}")]
    Endpoint(#[from] fedquic_net::endpoint::EndpointError),
    #[error("refusing the aggregator's demand: {0}")]
    Limit(#[from] LimitError),
    /// The aggregator refused this client's certificate for good (revoked
    /// or expired): reconnecting with it cannot help.
    #[error(
        "the aggregator refused this client's certificate ({0}); ask the federation's operator \
         for a new one"
    )]
    CertificateRefused(String),
    /// The client's own QUIC endpoint was closed (by the process sharing it,
    /// e.g. the simulator at the end of a run): no attempt can succeed.
    #[error("the client's endpoint was closed")]
    EndpointClosed,
}

/// Everything a client needs to reach its aggregator.
#[derive(Clone)]
pub struct ClientOptions {
    pub server: SocketAddr,
    /// The name the aggregator's certificate must carry.
    pub server_name: String,
    pub tls: quinn::ClientConfig,
    /// Reconnect waits.
    pub backoff: Backoff,
    /// Give up after this many failed connection attempts in a row (None: never).
    pub max_attempts: Option<u32>,
    /// Bounds a single connection attempt, hello included.
    pub connect_timeout: Duration,
    /// Bounds the QUIC handshake within an attempt: an attempt still
    /// handshaking after this long is abandoned and the client reconnects
    /// (with backoff). [`DEFAULT_HANDSHAKE_TIMEOUT`] suits an aggregator with
    /// the default `limits.quic_handshake_timeout_secs`; raise both together.
    pub handshake_timeout: Duration,
    /// Shared by clients in one process so training does not oversubscribe the cores.
    pub training_slots: Option<Arc<Semaphore>>,
    /// Reuse this endpoint (one UDP socket for many simulated clients);
    /// otherwise each client binds its own.
    pub endpoint: Option<quinn::Endpoint>,
    /// What this client accepts from the aggregator (model size, epochs,
    /// batch size, retry-after).
    pub limits: ClientLimits,
    /// The codecs this client offers, and error feedback.
    pub codecs: CodecOptions,
    /// Secure aggregation's secrets (keys, masks, noise) come from the
    /// operating system's generator; a seed here makes them reproducible,
    /// for simulations only (whoever knows it can unmask the updates).
    pub privacy_seed: Option<u64>,
    /// Leave the federation once this many training tasks are answered
    /// (their update acknowledged, their failure reported, their unmask
    /// request served): a cross-device check-in is `Some(1)`. None: stay
    /// until the aggregator finishes the run.
    pub max_fit_tasks: Option<u64>,
}

/// What a client offers to encode its updates (and decode models) with.
/// The aggregator picks, from its own preference list, one the client offers.
#[derive(Clone, Debug)]
pub struct CodecOptions {
    /// Offered codecs (a top-k entry accepts any fraction the aggregator
    /// chooses; see `fedquic_protocol::Codec::same_family`).
    pub offer: Vec<Codec>,
    /// Keep what a lossy uplink codec did not send and add it to the next
    /// update (error feedback, Karimireddy et al. 2019).
    pub error_feedback: bool,
}

impl Default for CodecOptions {
    /// Every codec, with error feedback.
    fn default() -> Self {
        CodecOptions {
            offer: all_codecs(),
            error_feedback: true,
        }
    }
}

/// What the aggregator's Welcome settled for a session.
#[derive(Clone, Debug)]
struct Negotiated {
    uplink: Codec,
    downlink: Codec,
    run: String,
    /// The model, when it is a network (not a bare vector): its training
    /// memory is checked for each task's batch size.
    model: Option<fedquic_train::ModelSpec>,
}

/// What a client did during its run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientReport {
    /// Training tasks whose update went out.
    pub fit_tasks: u64,
    /// Training tasks answered to the end (see `ClientOptions::max_fit_tasks`).
    pub fit_tasks_answered: u64,
    pub evaluate_tasks: u64,
    pub sessions: u32,
    pub bytes_up: u64,
    /// Model bytes received.
    pub bytes_down: u64,
}

enum SessionEnd {
    /// The federated run is complete.
    Finished,
    /// Come back later (after at least this long, if given).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
}

enum SessionError {
    Fatal(ClientError),
    Transient(String),
    /// Refused for now; come back after (at least) `after`.
    Busy {
        after: Duration,
        reason: String,
    },
}

impl From<IoError> for SessionError {
    fn from(e: IoError) -> Self {
        match e.connection_error().and_then(certificate_refused) {
            Some(why) => SessionError::Fatal(ClientError::CertificateRefused(why)),
            None => SessionError::Transient(e.to_string()),
        }
    }
}

/// Runs the client until the aggregator completes the federated run. Its
/// state between tasks (a SCAFFOLD control variate, an error-feedback
/// residual) is kept in memory (see [`run_client_with_store`]).
pub async fn run_client<T: Trainer>(
    opts: ClientOptions,
    trainer: T,
) -> Result<ClientReport, ClientError> {
    run_client_with_store(opts, trainer, StateStore::default()).await
}

/// [`run_client`], keeping the state between tasks in `store` (a state
/// directory survives restarts).
pub async fn run_client_with_store<T: Trainer>(
    opts: ClientOptions,
    trainer: T,
    mut store: StateStore,
) -> Result<ClientReport, ClientError> {
    let endpoint = match &opts.endpoint {
        Some(e) => e.clone(),
        None => fedquic_net::endpoint::client_endpoint_for(opts.server, opts.tls.clone())?,
    };
    let mut backoff = opts.backoff.clone();
    let mut trainer = TrainerSlot::new(Box::new(trainer));
    let mut report = ClientReport::default();
    let mut failures = 0u32;
    loop {
        let welcomed = &mut false;
        let result = session(
            &endpoint,
            &opts,
            &mut trainer,
            &mut report,
            welcomed,
            &mut store,
        )
        .await;
        if *welcomed {
            backoff.reset();
            failures = 0;
        }
        if opts
            .max_fit_tasks
            .is_some_and(|max| report.fit_tasks_answered >= max)
        {
            return Ok(report);
        }
        let (after, reason) = match result {
            Ok(SessionEnd::Finished) => return Ok(report),
            Ok(SessionEnd::Retry { after, reason }) => (after, reason),
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(SessionError::Transient(reason)) => (None, reason),
            Err(SessionError::Busy { after, reason }) => (Some(after), reason),
        };
        failures += 1;
        if opts.max_attempts.is_some_and(|max| failures >= max) {
            return Err(ClientError::GaveUp {
                attempts: failures,
                last: reason,
            });
        }
        let wait = backoff.next_delay().max(after.unwrap_or_default());
        info!(%reason, wait_ms = wait.as_millis() as u64, "reconnecting later");
        tokio::time::sleep(wait).await;
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
    trainer: &mut TrainerSlot,
    report: &mut ClientReport,
    welcomed: &mut bool,
    store: &mut StateStore,
) -> Result<SessionEnd, SessionError> {
    report.sessions += 1;
    let backend = trainer.backend.clone();
    let (conn, mut send, mut recv, layout, negotiated) =
        tokio::time::timeout(opts.connect_timeout, async {
            let connecting = endpoint
                .connect_with(opts.tls.clone(), opts.server, &opts.server_name)
                .map_err(|e| match e {
                    quinn::ConnectError::EndpointStopping => {
                        SessionError::Fatal(ClientError::EndpointClosed)
                    }
                    e => SessionError::Transient(format!("cannot connect: {e}")),
                })?;
            let conn = tokio::time::timeout(opts.handshake_timeout, connecting)
                .await
                .map_err(|_| {
                    SessionError::Transient(format!(
                        "QUIC handshake not complete within {:?}",
                        opts.handshake_timeout
                    ))
                })?
                .map_err(|e| match e {
                    quinn::ConnectionError::LocallyClosed => {
                        SessionError::Fatal(ClientError::EndpointClosed)
                    }
                    // Not checked for a certificate refusal: before the
                    // handshake completes, a close can be forged (Initial
                    // packets are readable by anyone on the path). The
                    // server's verdict on this client's certificate comes
                    // after, on the first read, authenticated.
                    e => SessionError::Transient(format!("cannot connect: {e}")),
                })?;
            // Closed already when the handshake completed: the close may
            // have come in an Initial packet (keys anyone on the path can
            // derive) and is not trusted as a verdict on our certificate.
            // A genuine verdict that raced in this early (a late-woken task)
            // costs one retry; the next attempt gets it authenticated.
            if let Some(reason) = conn.close_reason() {
                return Err(SessionError::Transient(format!(
                    "connection closed during the handshake: {reason}"
                )));
            }
            let (mut send, mut recv) = conn.open_bi().await.map_err(IoError::from)?;
            let hello = Hello {
                versions: SUPPORTED_VERSIONS.to_vec(),
                codecs: opts.codecs.offer.clone(),
                agent: concat!("fedquic-client/", env!("CARGO_PKG_VERSION")).into(),
                backend,
            };
            write_message(&mut send, &Message::Hello(hello)).await?;
            // With mutual TLS a refused certificate shows here, on the first read.
            match read_message(&mut recv).await? {
                Some(Message::Welcome(w)) => {
                    // A Welcome naming a codec we never offered, or an unsafe run id.
                    w.validate(&opts.codecs.offer)
                        .map_err(|e| SessionError::Transient(e.to_string()))?;
                    let layout: ParamLayout =
                        w.model_spec
                            .parse()
                            .map_err(|e: fedquic_train::TrainError| {
                                SessionError::Fatal(ClientError::Incompatible(TrainerError::Train(
                                    e,
                                )))
                            })?;
                    // Before the trainer or a receive buffer allocates the model:
                    // its parameters, and its activations for one example.
                    opts.limits
                        .check_params(layout.num_params() as u64)
                        .map_err(|e| SessionError::Fatal(e.into()))?;
                    if let Some(spec) = layout.model_spec() {
                        check_training_memory(&opts.limits, spec, 1)
                            .map_err(|e| SessionError::Fatal(e.into()))?;
                    }
                    info!(
                        client = %w.client_name,
                        model = %w.model_spec,
                        uplink = %w.uplink,
                        downlink = %w.downlink,
                        "joined the federation"
                    );
                    let negotiated = Negotiated {
                        uplink: w.uplink,
                        downlink: w.downlink,
                        run: w.run,
                        model: layout.model_spec().cloned(),
                    };
                    Ok((conn, send, recv, layout, negotiated))
                }
                Some(Message::Reject(r)) => match r.retry_after_ms {
                    Some(ms) => Err(SessionError::Busy {
                        after: opts.limits.retry_after(ms),
                        reason: format!("aggregator busy ({}), retry after {ms} ms", r.reason),
                    }),
                    None => Err(SessionError::Fatal(ClientError::Rejected(r.reason))),
                },
                other => Err(SessionError::Transient(format!(
                    "expected Welcome, got {other:?}"
                ))),
            }
        })
        .await
        .map_err(|_| SessionError::Transient("connection attempt timed out".into()))??;
    *welcomed = true;
    let mut t = trainer.take().await?;
    let prepared = t.prepare(&layout);
    trainer.idle = Some(t);
    prepared.map_err(|e| SessionError::Fatal(e.into()))?;
    let wire_layout = layout.wire_layout();
    // The control stream is read by its own task: reads are not cancel-safe
    // inside select! (a secure-aggregation task listens while it trains),
    // channel receives are.
    let (msg_tx, mut messages) = tokio::sync::mpsc::channel(16);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let msg = read_message(&mut recv).await;
            let stop = !matches!(msg, Ok(Some(_)));
            if msg_tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    }));
    // A message a secure-aggregation task stopped at, handled next.
    let mut next: Option<Message> = None;
    // The secrets of the last masked input, kept for its unmask request.
    let mut unmask: Option<(u64, Box<ClientRound>)> = None;
    // The task whose update went out and waits for its verdict.
    let mut awaiting_verdict: Option<u64> = None;
    let mut tasks = TaskState {
        store,
        spare_model: None,
    };

    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match messages.recv().await {
                Some(Ok(Some(m))) => m,
                Some(Ok(None)) | None => {
                    return Ok(SessionEnd::Retry {
                        after: None,
                        reason: "aggregator closed the session".into(),
                    });
                }
                Some(Err(e)) => return Err(e.into()),
            },
        };
        match msg {
            Message::FitTask(task) if task.secagg.is_some() => {
                unmask = None;
                log_task_received(&task);
                let outcome = secagg_fit_task(
                    &conn,
                    &mut send,
                    &mut messages,
                    &task,
                    trainer,
                    opts,
                    &wire_layout,
                    &negotiated,
                )
                .await?;
                match outcome {
                    SecAggFit::Sent { up, down, round } => {
                        report.fit_tasks += 1;
                        report.bytes_up += up;
                        report.bytes_down += down;
                        unmask = Some((task.task_id, round));
                    }
                    SecAggFit::Failed(reason) => {
                        warn!(round = task.round, %reason, "secure-aggregation task failed");
                        write_control(
                            &mut send,
                            &Message::TaskFailed {
                                task_id: task.task_id,
                                reason,
                            },
                            &opts.limits,
                        )
                        .await?;
                        if task_answered(opts, report) {
                            return leave(&conn, &mut send).await;
                        }
                    }
                    SecAggFit::Stopped(msg) => next = msg,
                }
            }
            Message::SecAgg { task_id, step } => {
                let Some((pending, round)) = unmask.as_mut() else {
                    debug!(
                        task_id,
                        step = step.name(),
                        "secure-aggregation step for no task; ignored"
                    );
                    continue;
                };
                let SecAggStep::UnmaskRequest(request) = &step else {
                    debug!(
                        task_id,
                        step = step.name(),
                        "unexpected secure-aggregation step; ignored"
                    );
                    continue;
                };
                if *pending != task_id {
                    continue;
                }
                match step
                    .validate()
                    .map_err(|e| e.to_string())
                    .and_then(|()| round.on_unmask(request).map_err(|e| e.to_string()))
                {
                    Ok(response) => {
                        let answer = Message::SecAgg {
                            task_id,
                            step: SecAggStep::UnmaskResponse(response),
                        };
                        report.bytes_up +=
                            fedquic_protocol::encode_message(&answer).map_or(0, |f| f.len() as u64);
                        write_control(&mut send, &answer, &opts.limits).await?;
                    }
                    // An honest client answers nothing to a request that
                    // could unmask a neighbour's update.
                    Err(reason) => warn!(task_id, %reason, "refused the unmask request"),
                }
                unmask = None;
                if task_answered(opts, report) {
                    return leave(&conn, &mut send).await;
                }
            }
            Message::FitTask(task) => {
                log_task_received(&task);
                let answer = fit_task(
                    &conn,
                    &task,
                    trainer,
                    opts,
                    &wire_layout,
                    &mut tasks,
                    &negotiated,
                )
                .await?;
                match answer {
                    Ok((up, down)) => {
                        report.fit_tasks += 1;
                        report.bytes_up += up;
                        report.bytes_down += down;
                        awaiting_verdict = Some(task.task_id);
                    }
                    Err(reason) => {
                        warn!(round = task.round, %reason, "fit task failed");
                        write_control(
                            &mut send,
                            &Message::TaskFailed {
                                task_id: task.task_id,
                                reason,
                            },
                            &opts.limits,
                        )
                        .await?;
                        if task_answered(opts, report) {
                            return leave(&conn, &mut send).await;
                        }
                    }
                }
            }
            Message::EvaluateTask(task) => {
                let (model, bytes) = receive_model(
                    &conn,
                    task.round,
                    task.task_id,
                    &wire_layout,
                    negotiated.downlink,
                    None,
                    &opts.limits,
                )
                .await?;
                report.bytes_down += bytes;
                let outcome = trainer
                    .run(opts, move |t| {
                        t.set_parameters(&model)?;
                        let r = t.evaluate();
                        t.release();
                        r
                    })
                    .await?;
                let reply = match outcome {
                    Ok(e) => Message::EvalResult(EvalResult {
                        round: task.round,
                        task_id: task.task_id,
                        examples: e.examples,
                        loss: e.loss,
                        accuracy: e.accuracy,
                    }),
                    Err(e) => Message::TaskFailed {
                        task_id: task.task_id,
                        reason: e.to_string(),
                    },
                };
                write_control(&mut send, &reply, &opts.limits).await?;
                report.evaluate_tasks += 1;
            }
            Message::UpdateAccepted { task_id } | Message::UpdateRejected { task_id, .. }
                if awaiting_verdict == Some(task_id) =>
            {
                if let Message::UpdateRejected { reason, .. } = &msg {
                    warn!(task_id, %reason, "aggregator rejected our update");
                } else {
                    debug!(task_id, "update accepted");
                }
                awaiting_verdict = None;
                if task_answered(opts, report) {
                    return leave(&conn, &mut send).await;
                }
            }
            Message::UpdateAccepted { task_id } => debug!(task_id, "update accepted"),
            Message::UpdateRejected { task_id, reason } => {
                warn!(task_id, %reason, "aggregator rejected our update")
            }
            Message::Wait { .. } | Message::Heartbeat => {}
            Message::Bye { reason, finished } => {
                info!(%reason, "aggregator said goodbye");
                conn.close(0u32.into(), b"bye");
                return Ok(if finished {
                    SessionEnd::Finished
                } else {
                    SessionEnd::Retry {
                        after: Some(Duration::from_secs(1)),
                        reason,
                    }
                });
            }
            Message::Reject(r) => {
                return match r.retry_after_ms {
                    Some(ms) => Ok(SessionEnd::Retry {
                        after: Some(opts.limits.retry_after(ms)),
                        reason: r.reason,
                    }),
                    None => Err(SessionError::Fatal(ClientError::Rejected(r.reason))),
                };
            }
            other => {
                return Ok(SessionEnd::Retry {
                    after: None,
                    reason: format!("unexpected message {other:?}"),
                });
            }
        }
    }
}

/// Counts a training task answered to the end; true when the client has
/// now done what it came for (`ClientOptions::max_fit_tasks`).
fn task_answered(opts: &ClientOptions, report: &mut ClientReport) -> bool {
    report.fit_tasks_answered += 1;
    opts.max_fit_tasks
        .is_some_and(|max| report.fit_tasks_answered >= max)
}

/// Says goodbye and waits (briefly) for the aggregator to close, so that
/// everything sent before, the goodbye included, is delivered.
async fn leave(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
) -> Result<SessionEnd, SessionError> {
    info!("task quota reached; leaving the federation");
    let bye = Message::Bye {
        reason: "task quota reached".into(),
        finished: true,
    };
    // Leaving needs no answer: a goodbye that cannot be written soon is dropped.
    if tokio::time::timeout(Duration::from_secs(2), write_message(send, &bye))
        .await
        .is_err()
    {
        conn.close(0u32.into(), b"bye");
        return Ok(SessionEnd::Finished);
    }
    let _ = send.finish();
    if tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .is_err()
    {
        conn.close(0u32.into(), b"bye");
    }
    Ok(SessionEnd::Finished)
}

/// Writes a control message, giving up on the session if the aggregator does
/// not take it within [`ClientLimits::max_task_wait`] (it withholds
/// flow-control credit on the control stream).
async fn write_control(
    send: &mut quinn::SendStream,
    message: &Message,
    limits: &ClientLimits,
) -> Result<(), SessionError> {
    tokio::time::timeout(limits.max_task_wait, write_message(send, message))
        .await
        .map_err(|_| {
            SessionError::Transient(format!(
                "the aggregator did not take a control message within {:?}",
                limits.max_task_wait
            ))
        })?
        .map_err(SessionError::from)
}

/// Aborts a spawned task when dropped (the session's control-stream reader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type ControlMessages = tokio::sync::mpsc::Receiver<Result<Option<Message>, IoError>>;

/// How a secure-aggregation fit task ended.
enum SecAggFit {
    /// The masked input went out; its secrets wait for the unmask request.
    Sent {
        up: u64,
        down: u64,
        round: Box<ClientRound>,
    },
    /// Training or the exchange failed; the aggregator is told.
    Failed(String),
    /// The aggregator moved on (a new task, a rejection, goodbye): this
    /// message is handled next, if any.
    Stopped(Option<Message>),
}

/// A fit task with secure aggregation: the key exchange runs on the control
/// stream while the model trains, then the masked input goes out.
#[allow(clippy::too_many_arguments)]
async fn secagg_fit_task(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    messages: &mut ControlMessages,
    task: &FitTask,
    trainer: &mut TrainerSlot,
    opts: &ClientOptions,
    layout: &[TensorMeta],
    negotiated: &Negotiated,
) -> Result<SecAggFit, SessionError> {
    let Some(secagg) = task.secagg.clone() else {
        return Ok(SecAggFit::Failed("not a secure-aggregation task".into()));
    };
    let refusal = secagg
        .validate()
        .err()
        .map(|e| e.to_string())
        .or_else(|| task_refusal(opts, negotiated, task, trainer.training_examples))
        .or_else(|| {
            task.scaffold
                .is_some()
                .then(|| "SCAFFOLD cannot run with secure aggregation".to_string())
        });
    if let Some(reason) = refusal {
        discard_model(conn, task.task_id).await?;
        return Ok(SecAggFit::Failed(reason));
    }
    let params: usize = layout
        .iter()
        .map(|t| t.elements().unwrap_or(0) as usize)
        .sum();
    let secret = crate::secagg::round_secret(opts.privacy_seed, task.task_id);
    let noise_key = crate::secagg::round_secret(
        opts.privacy_seed.map(|s| s ^ 0x006e_6f69_7365),
        task.task_id,
    );
    let (mut round, keys) = ClientRound::new(task.round, SecAggTask::vector_len(params), secret);
    let mut up = 0u64;
    let say = async |send: &mut quinn::SendStream, step: SecAggStep, up: &mut u64| {
        let message = Message::SecAgg {
            task_id: task.task_id,
            step,
        };
        *up += fedquic_protocol::encode_message(&message).map_or(0, |f| f.len() as u64);
        write_control(send, &message, &opts.limits).await
    };
    say(send, SecAggStep::AdvertiseKeys(keys), &mut up).await?;
    let config = task.config.clone();
    // The model's download and the training run while the key exchange goes
    // on: the control stream is served throughout.
    let downlink = negotiated.downlink;
    let training = async {
        let (global, down) = receive_model(
            conn,
            task.round,
            task.task_id,
            layout,
            downlink,
            None,
            &opts.limits,
        )
        .await?;
        let trained = trainer
            .run(opts, move |t| {
                t.set_parameters(&global)?;
                let outcome = t.fit(&config);
                let mut delta = global;
                let result = outcome.and_then(|o| {
                    let local = t.parameters();
                    if local.len() != delta.len()
                        || fedquic_protocol::first_non_finite(local).is_some()
                    {
                        return Err(TrainerError::Other(
                            "training diverged or changed the model's size".into(),
                        ));
                    }
                    for (d, l) in delta.iter_mut().zip(local) {
                        *d = l - *d;
                    }
                    Ok((o, delta))
                });
                t.release();
                result
            })
            .await?;
        Ok::<_, SessionError>((trained, down))
    };
    tokio::pin!(training);
    let mut down = 0u64;
    let mut trained = None;
    let mut shares_in = false;
    // Once training is done, the key exchange must finish within this.
    let mut steps_deadline: Option<tokio::time::Instant> = None;
    loop {
        if shares_in && let Some(result) = trained.take() {
            let (outcome, delta) = match result {
                Ok(x) => x,
                Err(e) => return Ok(SecAggFit::Failed(format!("{e}"))),
            };
            let outcome: crate::trainer::FitOutcome = outcome;
            let body = match crate::secagg::prepare_masked_input(
                &secagg,
                delta,
                outcome.examples,
                &mut round,
                &noise_key,
            ) {
                Ok(body) => body,
                Err(e) => return Ok(SecAggFit::Failed(e.to_string())),
            };
            let header = TensorHeader {
                kind: StreamKind::Update,
                round: task.round,
                task_id: task.task_id,
                codec: Codec::Ring32,
                tensors: with_secagg_layout(layout),
                num_examples: outcome.examples,
                metrics: outcome.metrics,
                body_len: body.len() as u64,
            };
            let deadline = opts.limits.transfer_deadline(header.body_len);
            up += upload(deadline, send_encoded(conn, &header, body.into())).await?;
            info!(
                round = task.round,
                examples = header.num_examples,
                train_loss = %metric_text(&header.metrics, "loss"),
                bytes = up,
                "trained; masked input sent"
            );
            return Ok(SecAggFit::Sent {
                up,
                down,
                round: Box::new(round),
            });
        }
        tokio::select! {
            result = &mut training, if trained.is_none() => {
                let (result, bytes) = result?;
                down = bytes;
                trained = Some(result);
                steps_deadline = Some(tokio::time::Instant::now() + opts.limits.max_task_wait);
            }
            () = tokio::time::sleep_until(steps_deadline.unwrap_or_else(tokio::time::Instant::now)),
                if steps_deadline.is_some() =>
            {
                return Err(SessionError::Transient(format!(
                    "secure aggregation: the aggregator's next step did not come within {:?} of training",
                    opts.limits.max_task_wait
                )));
            }
            msg = messages.recv() => {
                let msg = match msg {
                    Some(Ok(Some(m))) => m,
                    Some(Ok(None)) | None => {
                        return Err(SessionError::Transient("aggregator closed the session".into()));
                    }
                    Some(Err(e)) => return Err(e.into()),
                };
                match msg {
                    Message::SecAgg { task_id, step } if task_id == task.task_id => {
                        if let Err(e) = step.validate() {
                            return Ok(SecAggFit::Failed(e.to_string()));
                        }
                        match &step {
                            SecAggStep::Neighbours(m) => match round.on_neighbours(m) {
                                Ok(shares) => {
                                    say(send, SecAggStep::ShareKeys(shares), &mut up).await?;
                                }
                                Err(e) => return Ok(SecAggFit::Failed(format!("secure aggregation: {e}"))),
                            },
                            SecAggStep::RelayedShares(m) => match round.on_relayed_shares(m) {
                                Ok(()) => shares_in = true,
                                Err(e) => return Ok(SecAggFit::Failed(format!("secure aggregation: {e}"))),
                            },
                            other => {
                                debug!(step = other.name(), "secure-aggregation step out of order; ignored");
                            }
                        }
                    }
                    Message::Heartbeat | Message::Wait { .. } => {}
                    Message::UpdateAccepted { .. } => {}
                    Message::UpdateRejected { task_id, reason } if task_id == task.task_id => {
                        warn!(task_id, %reason, "the aggregator dropped us from the round");
                        return Ok(SecAggFit::Stopped(None));
                    }
                    Message::UpdateRejected { .. } | Message::SecAgg { .. } => {}
                    // Anything else ends this task and is handled by the session.
                    other => return Ok(SecAggFit::Stopped(Some(other))),
                }
            }
        }
    }
}

/// What fit tasks keep between them besides the trainer: the client's stored vectors,
/// and the last f32 update's buffer, which the next model is received into.
struct TaskState<'a> {
    store: &'a mut StateStore,
    spare_model: Option<Arc<Vec<f32>>>,
}

/// Receives the global model for a task on its own stream, encoded with the
/// negotiated downlink codec. Returns it and its body's size in bytes.
async fn receive_model(
    conn: &quinn::Connection,
    round: u64,
    task_id: u64,
    layout: &[TensorMeta],
    codec: Codec,
    buffer: Option<Vec<f32>>,
    client: &ClientLimits,
) -> Result<(Vec<f32>, u64), SessionError> {
    let values = layout.iter().map(|t| t.elements().unwrap_or(0)).sum();
    let limits = &TensorLimits::for_model(values);
    let wait = client.max_task_wait;
    let (mut stream, header) = tokio::time::timeout(wait, async {
        let mut stream = conn.accept_uni().await.map_err(IoError::from)?;
        let header = read_tensor_header(&mut stream, limits).await?;
        Ok::<_, SessionError>((stream, header))
    })
    .await
    .map_err(|_| {
        SessionError::Transient(format!(
            "the model for task {task_id} did not start arriving within {wait:?}"
        ))
    })??;
    if header.kind != StreamKind::GlobalModel || header.task_id != task_id || header.round != round
    {
        return Err(SessionError::Transient(format!(
            "expected the model for task {task_id} of round {round}, got {:?} for task {} of round {}",
            header.kind, header.task_id, header.round
        )));
    }
    header
        .check_layout(layout)
        .map_err(|e| SessionError::Transient(e.to_string()))?;
    if header.codec != codec {
        return Err(SessionError::Transient(format!(
            "model sent as {}, the session agreed on {codec}",
            header.codec
        )));
    }
    // The decoder writes every value (zeros included), so a reused buffer needs no
    // clearing; a fresh one would cost a page fault per 4 KiB on every task.
    let values = limits.max_values as usize;
    let mut model = match buffer {
        Some(mut buffer) => {
            buffer.resize(values, 0.0);
            buffer
        }
        None => vec![0f32; values],
    };
    let deadline = client.transfer_deadline(header.body_len);
    tokio::time::timeout(deadline, read_tensor_body(&mut stream, &header, &mut model))
        .await
        .map_err(|_| {
            SessionError::Transient(format!(
                "the model for task {task_id} ({} bytes) did not arrive within {deadline:?}",
                header.body_len
            ))
        })??;
    Ok((model, header.body_len))
}

/// Takes the model stream of a refused task and stops it unread, so the
/// next task's stream is not mistaken for it and nothing is buffered.
async fn discard_model(conn: &quinn::Connection, task_id: u64) -> Result<(), SessionError> {
    let accepted = tokio::time::timeout(DISCARD_WAIT, conn.accept_uni()).await;
    match accepted {
        Ok(stream) => {
            let mut stream = stream.map_err(IoError::from)?;
            let _ = stream.stop(0u32.into());
            Ok(())
        }
        Err(_) => Err(SessionError::Transient(format!(
            "no model stream for refused task {task_id}"
        ))),
    }
}

/// How long a refused task's model stream is waited for.
const DISCARD_WAIT: Duration = Duration::from_secs(30);

/// The default [`ClientOptions::handshake_timeout`]: the longest a connection
/// attempt waits for its QUIC handshake before the client gives up on it and
/// reconnects (with backoff), within `connect_timeout`. An aggregator
/// abandons handshakes after 5 s by default (`fedquic_net::admission`), so
/// an attempt still waiting after twice that is dead: its packets lost for
/// good, or sent where the aggregator cannot answer them (as happened when
/// quinn reused a live connection ID for a Retry: BENCHMARKS.md,
/// "Connections"). Without this bound it costs the whole connect timeout.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The trainer, and the blocking run that holds it while it works. A task can
/// be abandoned while it trains (the aggregator moves on during a
/// secure-aggregation task); its run keeps the trainer until it ends, and the
/// next use waits for it. So the trainer is never lost, and every wait is
/// cancel-safe: a cancelled wait leaves the run here.
struct TrainerSlot {
    idle: Option<Box<dyn Trainer>>,
    busy: Option<tokio::task::JoinHandle<Box<dyn Trainer>>>,
    /// The trainer's backend, for the Hello, and the most examples a batch can
    /// hold (read once: the trainer may be busy later).
    backend: String,
    training_examples: Option<usize>,
}

impl TrainerSlot {
    fn new(trainer: Box<dyn Trainer>) -> TrainerSlot {
        TrainerSlot {
            backend: trainer.backend().to_string(),
            training_examples: trainer.training_examples(),
            idle: Some(trainer),
            busy: None,
        }
    }

    /// The trainer, once any run that holds it has ended.
    async fn take(&mut self) -> Result<Box<dyn Trainer>, SessionError> {
        self.wait_idle().await?;
        self.take_idle()
    }

    /// Waits for the run that holds the trainer, if any, to give it back.
    async fn wait_idle(&mut self) -> Result<(), SessionError> {
        if let Some(run) = self.busy.as_mut() {
            let trainer = run.await.map_err(trainer_panicked)?;
            self.busy = None;
            self.idle = Some(trainer);
        }
        Ok(())
    }

    fn take_idle(&mut self) -> Result<Box<dyn Trainer>, SessionError> {
        // Only a panicked run (a fatal error) leaves no trainer.
        self.idle.take().ok_or_else(|| {
            SessionError::Fatal(ClientError::Incompatible(TrainerError::Other(
                "the trainer was lost".into(),
            )))
        })
    }

    /// Runs `work` on the trainer on a blocking thread, within a training
    /// slot (held until the work ends, even if this call is cancelled).
    async fn run<R: Send + 'static>(
        &mut self,
        opts: &ClientOptions,
        work: impl FnOnce(&mut dyn Trainer) -> Result<R, TrainerError> + Send + 'static,
    ) -> Result<Result<R, TrainerError>, SessionError> {
        // Every await before the trainer leaves `idle` is cancel-safe: a task
        // abandoned while it waits for a training slot leaves the trainer here.
        self.wait_idle().await?;
        let permit = match &opts.training_slots {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| SessionError::Transient("shutting down".into()))?,
            ),
            None => None,
        };
        let mut trainer = self.take_idle()?;
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let run = self.busy.insert(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _ = result_tx.send(work(trainer.as_mut()));
            trainer
        }));
        let trainer = run.await.map_err(trainer_panicked)?;
        self.busy = None;
        self.idle = Some(trainer);
        // Sent before the run returned the trainer (a panic is caught above).
        result_rx
            .await
            .map_err(|_| SessionError::Transient("the trainer's result was lost".into()))
    }
}

fn trainer_panicked(e: tokio::task::JoinError) -> SessionError {
    SessionError::Fatal(ClientError::Incompatible(TrainerError::Other(format!(
        "trainer panicked: {e}"
    ))))
}

/// Turns `delta`, which holds the received global model, into `local -
/// global`, refusing non-finite results (training that diverged, or a step
/// too large for f32). One pass: each difference is checked as it is
/// stored, without a branch per value, and a block at a time so a diverged
/// model stops early.
fn subtract_finite(delta: &mut [f32], local: &[f32]) -> Result<(), TrainerError> {
    if subtract_any_non_finite(delta, local) {
        return Err(TrainerError::Other(
            "training diverged (non-finite parameters)".into(),
        ));
    }
    Ok(())
}

fedquic_simd::avx2_dispatch! {
    /// [`subtract_finite`]'s pass; whether a difference was NaN or infinite. On
    /// x86-64 with AVX2 the same loop runs in 256-bit registers: 1.7x the
    /// baseline's subtraction followed by a separate check (1M values, in cache).
    fn subtract_any_non_finite(delta: &mut [f32], local: &[f32]) -> bool
        => subtract_any_non_finite_portable
}

#[inline(always)]
fn subtract_any_non_finite_portable(delta: &mut [f32], local: &[f32]) -> bool {
    const BLOCK: usize = 4096;
    for (d, l) in delta.chunks_mut(BLOCK).zip(local.chunks(BLOCK)) {
        let mut bad = false;
        for (d, l) in d.iter_mut().zip(l) {
            let difference = l - *d;
            *d = difference;
            bad |= !difference.is_finite();
        }
        if bad {
            return true;
        }
    }
    false
}

/// Receives the model, trains, and streams the delta back. The inner
/// result is the task's own outcome (bytes sent and received, or why
/// training failed).
///
/// With a lossy uplink codec and error feedback on, the client sends
/// `C(delta + e)` and keeps `e+ = delta + e - D(C(delta + e))`, exactly what
/// the aggregator did not receive, for its next update of the run.
///
/// SCAFFOLD tasks (option II of Karimireddy et al. 2020): the model stream
/// carries the server's `c` after the model; training uses `g + c - c_i`;
/// then `c_i+ = c_i - c + (x - y) / (K lr)`, and the update carries
/// `Delta y = y - x` followed by `Delta c = c_i+ - c_i`. `c_i+` is stored
/// once the update is sent.
async fn fit_task(
    conn: &quinn::Connection,
    task: &FitTask,
    trainer: &mut TrainerSlot,
    opts: &ClientOptions,
    layout: &[TensorMeta],
    state: &mut TaskState<'_>,
    negotiated: &Negotiated,
) -> Result<Result<(u64, u64), String>, SessionError> {
    let params: usize = layout
        .iter()
        .map(|t| t.elements().unwrap_or(0) as usize)
        .sum();
    let refusal = task_refusal(opts, negotiated, task, trainer.training_examples).or_else(|| {
        let scaffold = task.scaffold.as_ref()?;
        // SCAFFOLD's stream carries the model and c: a receive buffer of twice the model.
        scaffold
            .validate()
            .err()
            .map(|e| e.to_string())
            .or_else(|| {
                opts.limits
                    .check_params((params as u64).saturating_mul(2))
                    .err()
                    .map(|e| format!("SCAFFOLD: {e}"))
            })
    });
    if let Some(reason) = refusal {
        discard_model(conn, task.task_id).await?;
        return Ok(Err(reason));
    }
    let (stream_layout, values) = match &task.scaffold {
        Some(_) => (with_control_layout(layout), 2 * params),
        None => (layout.to_vec(), params),
    };
    // The previous update's buffer, once QUIC has let go of it (acknowledged).
    let reuse = state
        .spare_model
        .take()
        .and_then(|shared| Arc::try_unwrap(shared).ok());
    let (mut global, bytes_down) = receive_model(
        conn,
        task.round,
        task.task_id,
        &stream_layout,
        negotiated.downlink,
        reuse,
        &opts.limits,
    )
    .await?;
    // SCAFFOLD: split off c, and find this client's c_i for the run.
    let control = match &task.scaffold {
        Some(scaffold) => {
            let c = global.split_off(params);
            let c_i = state
                .store
                .load(StateVector::ScaffoldControl, &scaffold.run, params)
                .unwrap_or_else(|e| {
                    warn!(error = %e, "cannot use the stored control variate; starting from zero");
                    vec![0.0; params]
                });
            Some((c, c_i))
        }
        None => None,
    };
    let uplink = negotiated.uplink;
    let feedback = opts.codecs.error_feedback && !uplink.is_lossless();
    let residual = match feedback {
        true => Some(
            state
                .store
                .load(StateVector::Residual, &negotiated.run, values)
                .unwrap_or_else(|e| {
                    warn!(error = %e, "cannot use the stored error-feedback residual; starting from zero");
                    vec![0.0; values]
                }),
        ),
        false => None,
    };
    // Stochastic rounding is seeded per task, so a replayed run sends the same bytes.
    let codec_seed = task.config.seed ^ task.task_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let config = task.config.clone();
    let initial_loss = task.initial_loss;
    let trained = trainer
        .run(opts, move |t| {
            t.set_parameters(&global)?;
            let loss_before = match initial_loss {
                true => t.training_loss().map(Some),
                false => Ok(None),
            };
            let (outcome, steps) = match (&loss_before, &control) {
                (Err(_), _) => (Err(TrainerError::Other(String::new())), 0),
                (Ok(_), Some((c, c_i))) => {
                    let correction: Vec<f32> = c.iter().zip(c_i).map(|(c, ci)| c - ci).collect();
                    match t.fit_corrected(&config, &correction) {
                        Ok((outcome, steps)) => (Ok(outcome), steps),
                        Err(e) => (Err(e), 0),
                    }
                }
                (Ok(_), None) => (t.fit(&config), 0),
            };
            // A failed loss report is the task's failure.
            let (outcome, loss_before) = match loss_before {
                Ok(loss) => (outcome, loss),
                Err(e) => (Err(e), None),
            };
            // The delta overwrites the received copy: one model copy beyond the trainer's.
            let mut delta = global;
            let result = outcome.and_then(|mut o| {
                let local = t.parameters();
                if local.len() != delta.len() {
                    return Err(TrainerError::Other(format!(
                        "trainer returned {} parameters, model has {}",
                        local.len(),
                        delta.len()
                    )));
                }
                subtract_finite(&mut delta, local)?;
                if let Some(loss) = loss_before {
                    o.metrics.push((INITIAL_LOSS_METRIC.into(), loss));
                }
                let next_control = match control {
                    Some((c, c_i)) => {
                        let (body, c_next) =
                            scaffold_control(delta, &c, c_i, steps, config.learning_rate)?;
                        delta = body;
                        Some(c_next)
                    }
                    None => None,
                };
                Ok((o, delta, next_control))
            });
            t.release();
            let (o, delta, next_control) = result?;
            let (body, next_residual) = encode_update(uplink, delta, residual, codec_seed)?;
            Ok((o, body, next_control, next_residual))
        })
        .await?;
    let (outcome, body, next_control, next_residual) = match trained {
        Ok(x) => x,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut header = TensorHeader {
        kind: StreamKind::Update,
        round: task.round,
        task_id: task.task_id,
        codec: uplink,
        tensors: stream_layout,
        num_examples: outcome.examples,
        metrics: outcome.metrics,
        body_len: 0,
    };
    // The residual this update supersedes is forgotten before it goes out
    // (see `StateStore::forget`); a failed forget sends nothing, rather than
    // risk the next update repeating the old residual. SCAFFOLD's c_i stays
    // until the update is sent: if it is not, the server's c never saw its
    // change, and the old c_i is the consistent one.
    if next_residual.is_some()
        && let Err(e) = state.store.forget(StateVector::Residual)
    {
        return Ok(Err(format!("cannot update the client's state: {e}")));
    }
    let deadline = opts.limits.transfer_deadline(body.len_bytes());
    let bytes = match body {
        UpdateBody::F32(delta) => {
            header.body_len = delta.len() as u64 * 4;
            // The f32 values are their own wire encoding: handed to QUIC as
            // one chunk, not re-encoded and copied piece by piece. Kept to
            // receive the next task's model into.
            let shared = Arc::new(delta);
            let sent = upload(
                deadline,
                send_shared_tensors(conn, &header, Arc::clone(&shared)),
            )
            .await?;
            state.spare_model = Some(shared);
            sent
        }
        UpdateBody::Encoded(bytes) => {
            header.body_len = bytes.len() as u64;
            upload(deadline, send_encoded(conn, &header, bytes.into())).await?
        }
    };
    if let (Some(scaffold), Some(c_next)) = (&task.scaffold, next_control)
        && let Err(e) = state
            .store
            .save(StateVector::ScaffoldControl, &scaffold.run, c_next)
    {
        // The server has this update's change of c; an old c_i would count it again.
        warn!(error = %e, "cannot store the control variate; starting it from zero");
        if let Err(e) = state.store.forget(StateVector::ScaffoldControl) {
            warn!(error = %e, "cannot remove the stale control variate");
        }
    }
    if let Some(residual) = next_residual
        && let Err(e) = state
            .store
            .save(StateVector::Residual, &negotiated.run, residual)
    {
        warn!(error = %e, "cannot store the error-feedback residual");
    }
    info!(
        round = task.round,
        examples = header.num_examples,
        train_loss = %metric_text(&header.metrics, "loss"),
        train_accuracy = %metric_text(&header.metrics, "accuracy"),
        bytes,
        codec = %uplink,
        "trained; update sent"
    );
    Ok(Ok((bytes, bytes_down)))
}

/// Why this client refuses a fit task's instructions, if it does: invalid,
/// beyond its epoch or batch limits, or a batch whose training memory exceeds
/// its limit (a batch holds at most `examples`, when the trainer knows it).
fn task_refusal(
    opts: &ClientOptions,
    negotiated: &Negotiated,
    task: &FitTask,
    examples: Option<usize>,
) -> Option<String> {
    let config = &task.config;
    config
        .validate()
        .err()
        .map(|e| e.to_string())
        .or_else(|| {
            opts.limits
                .check_fit(config.epochs, config.batch_size)
                .err()
                .map(|e| e.to_string())
        })
        .or_else(|| {
            let spec = negotiated.model.as_ref()?;
            let batch = examples.map_or(config.batch_size, |n| {
                config
                    .batch_size
                    .min(u32::try_from(n.max(1)).unwrap_or(u32::MAX))
            });
            check_training_memory(&opts.limits, spec, batch)
                .err()
                .map(|e| e.to_string())
        })
}

/// Refuses a model whose training scratch memory at `batch_size` exceeds the limit.
fn check_training_memory(
    limits: &ClientLimits,
    spec: &fedquic_train::ModelSpec,
    batch_size: u32,
) -> Result<(), LimitError> {
    // A spec the trainer cannot plan is refused by `Trainer::prepare`, not here.
    let Ok(bytes) = spec.training_scratch_bytes(batch_size as usize) else {
        return Ok(());
    };
    limits.check_training_memory(bytes, batch_size)
}

fn log_task_received(task: &FitTask) {
    info!(
        round = task.round,
        epochs = task.config.epochs,
        batch_size = task.config.batch_size,
        lr = task.config.learning_rate,
        secure_aggregation = task.secagg.is_some(),
        "fit task received; training"
    );
}

/// A training metric for the log, or "-".
fn metric_text(metrics: &fedquic_protocol::Metrics, name: &str) -> String {
    metrics
        .iter()
        .find(|(n, _)| n == name)
        .map_or_else(|| "-".into(), |(_, v)| format!("{v:.4}"))
}

/// An update ready to send.
enum UpdateBody {
    /// Raw values (the f32 codec: encoded as it is written).
    F32(Vec<f32>),
    /// A body already encoded with a compressing codec.
    Encoded(Vec<u8>),
}

impl UpdateBody {
    /// Its size on the wire.
    fn len_bytes(&self) -> u64 {
        match self {
            UpdateBody::F32(values) => values.len() as u64 * 4,
            UpdateBody::Encoded(bytes) => bytes.len() as u64,
        }
    }
}

/// Sends an update, giving up (and the session with it) if the aggregator
/// does not take it within `deadline` (it withholds flow-control credit).
async fn upload(
    deadline: Duration,
    send: impl std::future::Future<Output = Result<u64, IoError>>,
) -> Result<u64, SessionError> {
    tokio::time::timeout(deadline, send)
        .await
        .map_err(|_| {
            SessionError::Transient(format!(
                "the aggregator did not take the update within {deadline:?}"
            ))
        })?
        .map_err(SessionError::from)
}

/// Encodes `delta` with `codec`. With a `residual` (error feedback), encodes
/// `delta + residual` and returns the new residual: what the aggregator will
/// not see, found by decoding the body exactly as the aggregator will.
pub fn encode_update_values(
    codec: Codec,
    mut delta: Vec<f32>,
    residual: Option<Vec<f32>>,
    seed: u64,
) -> Result<(Vec<u8>, Option<Vec<f32>>), TrainerError> {
    let codec_error = |e: fedquic_protocol::ProtocolError| {
        TrainerError::Other(format!("cannot encode the update as {codec}: {e}"))
    };
    if let Some(residual) = &residual {
        if residual.len() != delta.len() {
            return Err(TrainerError::Other(
                "error-feedback residual size mismatch".into(),
            ));
        }
        for (d, r) in delta.iter_mut().zip(residual) {
            *d += r;
        }
    }
    let mut body = Vec::new();
    encode_body(codec, &delta, seed, &mut body).map_err(codec_error)?;
    let next_residual = match residual {
        Some(mut next) => {
            let header = TensorHeader {
                kind: StreamKind::Update,
                round: 0,
                task_id: 0,
                codec,
                tensors: vec![TensorMeta::f32("update", &[delta.len()])],
                num_examples: 0,
                metrics: Vec::new(),
                body_len: body.len() as u64,
            };
            let mut decoder = BodyDecoder::new(&header);
            decoder.push(&body, &mut next).map_err(codec_error)?;
            decoder.finish().map_err(codec_error)?;
            // next holds what the aggregator decodes: the residual is the rest.
            for (r, v) in next.iter_mut().zip(&delta) {
                *r = v - *r;
            }
            Some(next)
        }
        None => None,
    };
    Ok((body, next_residual))
}

fn encode_update(
    codec: Codec,
    delta: Vec<f32>,
    residual: Option<Vec<f32>>,
    seed: u64,
) -> Result<(UpdateBody, Option<Vec<f32>>), TrainerError> {
    if codec == Codec::F32 {
        return Ok((UpdateBody::F32(delta), None));
    }
    let (body, residual) = encode_update_values(codec, delta, residual, seed)?;
    Ok((UpdateBody::Encoded(body), residual))
}

/// SCAFFOLD option II after `steps` local steps at learning rate `lr`: from
/// `Delta y` (`delta`), the server's `c` and this client's `c_i`, returns the
/// update body `Delta y ++ Delta c` and `c_i+`, where
/// `Delta c = c_i+ - c_i = -c - Delta y / (K lr)`.
pub fn scaffold_control(
    mut delta: Vec<f32>,
    c: &[f32],
    mut c_i: Vec<f32>,
    steps: u64,
    lr: f32,
) -> Result<(Vec<f32>, Vec<f32>), TrainerError> {
    if steps == 0 || !(lr.is_finite() && lr > 0.0) {
        return Err(TrainerError::Other(format!(
            "SCAFFOLD needs local steps and a positive learning rate (got {steps} steps, lr {lr})"
        )));
    }
    if c.len() != delta.len() || c_i.len() != delta.len() {
        return Err(TrainerError::Other(
            "SCAFFOLD control variate size mismatch".into(),
        ));
    }
    let inv = 1.0 / (steps as f64 * lr as f64);
    let changes: Vec<f32> = c
        .iter()
        .zip(&delta)
        .map(|(c, d)| (-(*c as f64) - *d as f64 * inv) as f32)
        .collect();
    for (ci, change) in c_i.iter_mut().zip(&changes) {
        *ci += change;
    }
    delta.extend_from_slice(&changes);
    if delta.iter().chain(&c_i).any(|v| !v.is_finite()) {
        return Err(TrainerError::Other(
            "SCAFFOLD control variate is not finite".into(),
        ));
    }
    Ok((delta, c_i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_local_minus_global_and_refuses_non_finite_values() {
        let global: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        let local: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        let mut delta = global.clone();
        subtract_finite(&mut delta, &local).unwrap();
        assert!(delta.iter().enumerate().all(|(i, d)| *d == i as f32 * 0.5));
        // A NaN in a later block, and a step that overflows f32.
        for (at, value) in [(9_000, f32::NAN), (5_000, f32::INFINITY), (1, f32::MAX)] {
            let mut local = local.clone();
            local[at] = value;
            let mut delta = global.clone();
            if value == f32::MAX {
                delta[at] = -f32::MAX;
            }
            assert!(
                subtract_finite(&mut delta, &local).is_err(),
                "{value} at {at}"
            );
            let mut delta = global.clone();
            if value == f32::MAX {
                delta[at] = -f32::MAX;
            }
            assert!(subtract_any_non_finite_portable(&mut delta, &local));
        }
        // The portable path (which the dispatch above skips on AVX2) computes the
        // same differences.
        let mut portable = global.clone();
        assert!(!subtract_any_non_finite_portable(&mut portable, &local));
        assert_eq!(
            portable,
            (0..10_000).map(|i| i as f32 * 0.5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn scaffold_control_matches_hand_computation() {
        // x = 1, y = 0.4 (Delta y = -0.6), K = 3, lr = 0.1: (x - y)/(K lr) = 2.
        // c = 0.5, c_i = 0.25: c_i+ = 0.25 - 0.5 + 2 = 1.75, Delta c = 1.5.
        let (body, c_next) = scaffold_control(vec![-0.6], &[0.5], vec![0.25], 3, 0.1).unwrap();
        assert_eq!(body.len(), 2);
        assert!((body[0] + 0.6).abs() < 1e-7);
        assert!((body[1] - 1.5).abs() < 1e-6, "{}", body[1]);
        assert!((c_next[0] - 1.75).abs() < 1e-6, "{}", c_next[0]);
        assert!(scaffold_control(vec![1.0], &[0.0], vec![0.0], 0, 0.1).is_err());
        assert!(scaffold_control(vec![1.0], &[0.0, 1.0], vec![0.0], 1, 0.1).is_err());
        assert!(scaffold_control(vec![1e30], &[0.0], vec![0.0], 1, 1e-30).is_err());
    }
}
