//! The client's QUIC session: connect, say hello, then serve fit and
//! evaluate tasks until the aggregator says the run is complete. Lost
//! connections are retried with jittered exponential backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedquic_net::io::{
    IoError, read_message, read_tensor_body, read_tensor_header, send_tensors, write_message,
};
use fedquic_protocol::{
    Codec, EvalResult, FitTask, Hello, INITIAL_LOSS_METRIC, Message, SUPPORTED_VERSIONS,
    StreamKind, TensorHeader, TensorLimits, TensorMeta, with_control_layout,
};
use fedquic_train::layout::ParamLayout;
use thiserror::Error;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::control::ControlStore;
use crate::limits::{ClientLimits, LimitError};
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
    /// Shared by clients in one process so training does not oversubscribe the cores.
    pub training_slots: Option<Arc<Semaphore>>,
    /// Reuse this endpoint (one UDP socket for many simulated clients);
    /// otherwise each client binds its own.
    pub endpoint: Option<quinn::Endpoint>,
    /// What this client accepts from the aggregator (model size, epochs,
    /// batch size, retry-after).
    pub limits: ClientLimits,
}

/// What a client did during its run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientReport {
    pub fit_tasks: u64,
    pub evaluate_tasks: u64,
    pub sessions: u32,
    pub bytes_up: u64,
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
        SessionError::Transient(e.to_string())
    }
}

/// Runs the client until the aggregator completes the federated run. A
/// SCAFFOLD control variate is kept in memory (see [`run_client_with_store`]).
pub async fn run_client<T: Trainer>(
    opts: ClientOptions,
    trainer: T,
) -> Result<ClientReport, ClientError> {
    run_client_with_store(opts, trainer, ControlStore::default()).await
}

/// [`run_client`], keeping the SCAFFOLD control variate `c_i` in `store`
/// (a state directory survives restarts).
pub async fn run_client_with_store<T: Trainer>(
    opts: ClientOptions,
    trainer: T,
    mut store: ControlStore,
) -> Result<ClientReport, ClientError> {
    let endpoint = match &opts.endpoint {
        Some(e) => e.clone(),
        None => fedquic_net::endpoint::client_endpoint_for(opts.server, opts.tls.clone())?,
    };
    let mut backoff = opts.backoff.clone();
    let mut trainer = Some(Box::new(trainer) as Box<dyn Trainer>);
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
    trainer: &mut Option<Box<dyn Trainer>>,
    report: &mut ClientReport,
    welcomed: &mut bool,
    store: &mut ControlStore,
) -> Result<SessionEnd, SessionError> {
    report.sessions += 1;
    let backend = trainer
        .as_ref()
        .map_or("cpu", |trainer| trainer.backend())
        .to_string();
    let (conn, mut send, mut recv, layout) = tokio::time::timeout(opts.connect_timeout, async {
        let connecting = endpoint
            .connect_with(opts.tls.clone(), opts.server, &opts.server_name)
            .map_err(|e| SessionError::Transient(format!("cannot connect: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| SessionError::Transient(format!("cannot connect: {e}")))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(IoError::from)?;
        let hello = Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            codecs: vec![Codec::F32],
            agent: concat!("fedquic-client/", env!("CARGO_PKG_VERSION")).into(),
            backend,
        };
        write_message(&mut send, &Message::Hello(hello)).await?;
        // With mutual TLS a refused certificate shows here, on the first read.
        match read_message(&mut recv).await? {
            Some(Message::Welcome(w)) => {
                let layout: ParamLayout =
                    w.model_spec
                        .parse()
                        .map_err(|e: fedquic_train::TrainError| {
                            SessionError::Fatal(ClientError::Incompatible(TrainerError::Train(e)))
                        })?;
                // Before the trainer or a receive buffer allocates the model.
                opts.limits
                    .check_params(layout.num_params() as u64)
                    .map_err(|e| SessionError::Fatal(e.into()))?;
                info!(client = %w.client_name, model = %w.model_spec, "joined the federation");
                Ok((conn, send, recv, layout))
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
    let mut t = trainer
        .take()
        .ok_or_else(|| SessionError::Transient("trainer lost".into()))?;
    let prepared = t.prepare(&layout);
    *trainer = Some(t);
    prepared.map_err(|e| SessionError::Fatal(e.into()))?;
    let wire_layout = layout.wire_layout();
    let limits = TensorLimits::for_model(layout.num_params() as u64);

    loop {
        let msg = match read_message(&mut recv).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Ok(SessionEnd::Retry {
                    after: None,
                    reason: "aggregator closed the session".into(),
                });
            }
            Err(e) => {
                return Ok(SessionEnd::Retry {
                    after: None,
                    reason: e.to_string(),
                });
            }
        };
        match msg {
            Message::FitTask(task) => {
                let answer = fit_task(&conn, &task, trainer, opts, &wire_layout, store).await?;
                match answer {
                    Ok(bytes) => {
                        report.fit_tasks += 1;
                        report.bytes_up += bytes;
                    }
                    Err(reason) => {
                        warn!(round = task.round, %reason, "fit task failed");
                        write_message(
                            &mut send,
                            &Message::TaskFailed {
                                task_id: task.task_id,
                                reason,
                            },
                        )
                        .await?;
                    }
                }
            }
            Message::EvaluateTask(task) => {
                let model =
                    receive_model(&conn, task.round, task.task_id, &wire_layout, &limits).await?;
                let outcome = run_trainer(trainer, opts, move |t| {
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
                write_message(&mut send, &reply).await?;
                report.evaluate_tasks += 1;
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

/// Receives the global model for a task on its own stream.
async fn receive_model(
    conn: &quinn::Connection,
    round: u64,
    task_id: u64,
    layout: &[TensorMeta],
    limits: &TensorLimits,
) -> Result<Vec<f32>, SessionError> {
    let mut stream = conn.accept_uni().await.map_err(IoError::from)?;
    let header = read_tensor_header(&mut stream, limits).await?;
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
    let mut model = vec![0f32; limits.max_values as usize];
    read_tensor_body(&mut stream, &header, &mut model).await?;
    Ok(model)
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

/// Runs `work` on the trainer on a blocking thread, within a training slot.
async fn run_trainer<R: Send + 'static>(
    trainer: &mut Option<Box<dyn Trainer>>,
    opts: &ClientOptions,
    work: impl FnOnce(&mut dyn Trainer) -> Result<R, TrainerError> + Send + 'static,
) -> Result<Result<R, TrainerError>, SessionError> {
    let _slot = match &opts.training_slots {
        Some(s) => Some(
            s.clone()
                .acquire_owned()
                .await
                .map_err(|_| SessionError::Transient("shutting down".into()))?,
        ),
        None => None,
    };
    let mut t = trainer
        .take()
        .ok_or_else(|| SessionError::Transient("trainer lost".into()))?;
    let (t, result) = tokio::task::spawn_blocking(move || {
        let r = work(t.as_mut());
        (t, r)
    })
    .await
    .map_err(|e| {
        SessionError::Fatal(ClientError::Incompatible(TrainerError::Other(format!(
            "trainer panicked: {e}"
        ))))
    })?;
    *trainer = Some(t);
    Ok(result)
}

/// Receives the model, trains, and streams the delta back. The inner
/// result is the task's own outcome (bytes sent, or why training failed).
///
/// SCAFFOLD tasks (option II of Karimireddy et al. 2020): the model stream
/// carries the server's `c` after the model; training uses `g + c - c_i`;
/// then `c_i+ = c_i - c + (x - y) / (K lr)`, and the update carries
/// `Delta y = y - x` followed by `Delta c = c_i+ - c_i`. `c_i+` is stored
/// once the update is sent.
async fn fit_task(
    conn: &quinn::Connection,
    task: &FitTask,
    trainer: &mut Option<Box<dyn Trainer>>,
    opts: &ClientOptions,
    layout: &[TensorMeta],
    store: &mut ControlStore,
) -> Result<Result<u64, String>, SessionError> {
    let refusal = match task.config.validate() {
        Err(e) => Some(e.to_string()),
        Ok(()) => opts
            .limits
            .check_fit(task.config.epochs, task.config.batch_size)
            .err()
            .map(|e| e.to_string())
            .or_else(|| {
                task.scaffold
                    .as_ref()
                    .and_then(|s| s.validate().err())
                    .map(|e| e.to_string())
            }),
    };
    if let Some(reason) = refusal {
        discard_model(conn, task.task_id).await?;
        return Ok(Err(reason));
    }
    let params: usize = layout
        .iter()
        .map(|t| t.elements().unwrap_or(0) as usize)
        .sum();
    let (stream_layout, values) = match &task.scaffold {
        Some(_) => (with_control_layout(layout), 2 * params),
        None => (layout.to_vec(), params),
    };
    let limits = TensorLimits::for_model(values as u64);
    let mut global = receive_model(conn, task.round, task.task_id, &stream_layout, &limits).await?;
    // SCAFFOLD: split off c, and find this client's c_i for the run.
    let control = match &task.scaffold {
        Some(scaffold) => {
            let c = global.split_off(params);
            let c_i = store.load(&scaffold.run, params).unwrap_or_else(|e| {
                warn!(error = %e, "cannot use the stored control variate; starting from zero");
                vec![0.0; params]
            });
            Some((c, c_i))
        }
        None => None,
    };
    let config = task.config.clone();
    let initial_loss = task.initial_loss;
    let trained = run_trainer(trainer, opts, move |t| {
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
            if local.iter().any(|v| !v.is_finite()) {
                return Err(TrainerError::Other(
                    "training diverged (non-finite parameters)".into(),
                ));
            }
            for (d, l) in delta.iter_mut().zip(local) {
                *d = l - *d;
            }
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
        result
    })
    .await?;
    let (outcome, delta, next_control) = match trained {
        Ok(x) => x,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let header = TensorHeader {
        kind: StreamKind::Update,
        round: task.round,
        task_id: task.task_id,
        codec: Codec::F32,
        tensors: stream_layout,
        num_examples: outcome.examples,
        metrics: outcome.metrics,
        body_len: delta.len() as u64 * 4,
    };
    let bytes = send_tensors(conn, &header, &delta).await?;
    if let (Some(scaffold), Some(c_next)) = (&task.scaffold, next_control)
        && let Err(e) = store.save(&scaffold.run, c_next)
    {
        warn!(error = %e, "cannot store the control variate");
    }
    debug!(
        round = task.round,
        task = task.task_id,
        bytes,
        "update sent"
    );
    Ok(Ok(bytes))
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
