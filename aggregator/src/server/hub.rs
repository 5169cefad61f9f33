//! The hub: owns the coordinator, turns connection events into its inputs
//! and carries out its actions (tasks, answers, evaluation, checkpoints,
//! metrics).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fedquic_protocol::{Codec, EvalResult, Message, SecAggStep, StreamKind, TensorHeader};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::connection::{ModelBody, ToConn};
use super::pool::PooledBuffer;
use super::records::{ClientTraffic, RoundRecord, append_json_line};
use super::{CentralEval, RunSummary, ServerError, ServerSetup, Shared};
use crate::checkpoint::{CheckpointHeader, CheckpointStore};
use crate::coordinator::{Coordinator, ReceivedUpdate};
use crate::engine::Waiting;
use crate::engine::{Action, ClientId, RejectCause, RoundOutcome};
use crate::logging::{LogBudget, MAX_LOGGED_CHARS, sanitize};

pub(super) enum ToHub {
    Joined {
        client: ClientId,
        conn_id: u64,
        handle: mpsc::UnboundedSender<ToConn>,
        /// The training backend the client reported in its Hello (validated).
        backend: String,
        /// The session's update and model codecs.
        uplink: Codec,
        downlink: Codec,
    },
    Left {
        client: ClientId,
        conn_id: u64,
    },
    Update {
        client: ClientId,
        conn_id: u64,
        header: TensorHeader,
        delta: PooledBuffer,
        /// `delta`'s L2 norm, taken while it was decoded.
        norm: Option<f64>,
    },
    /// May this client upload for this task now? Answered with the fit
    /// epoch the upload belongs to, or refused (the hub tells the client).
    UploadRequest {
        client: ClientId,
        conn_id: u64,
        round: u64,
        task_id: u64,
        reply: oneshot::Sender<Result<u64, ()>>,
    },
    UpdateFailed {
        client: ClientId,
        conn_id: u64,
        task_id: Option<u64>,
        cause: RejectCause,
        reason: String,
    },
    TaskFailed {
        client: ClientId,
        conn_id: u64,
        task_id: u64,
        reason: String,
        _queued: QueuedControl,
    },
    Eval {
        client: ClientId,
        conn_id: u64,
        result: EvalResult,
        _queued: QueuedControl,
    },
    /// A secure-aggregation step (validated), and its size on the wire.
    SecAgg {
        client: ClientId,
        conn_id: u64,
        task_id: u64,
        step: SecAggStep,
        bytes: u64,
        _queued: QueuedControl,
    },
}

/// One of the few places a session has for a client's control messages
/// waiting for the hub (see `MAX_QUEUED_CONTROL` in `connection`): freed when
/// the hub has handled the message. A client that sends faster than the hub
/// handles waits for one, and QUIC flow control holds it back, instead of its
/// messages piling up in the hub's queue.
pub(super) struct QueuedControl {
    /// Held for its drop.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl QueuedControl {
    pub(super) fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        QueuedControl { _permit: permit }
    }
}

pub(super) struct Hub {
    engine: Box<dyn Coordinator>,
    shared: Arc<Shared>,
    clients: HashMap<ClientId, (u64, mpsc::UnboundedSender<ToConn>)>,
    model_spec: String,
    central_eval: Option<CentralEval>,
    checkpoints: Option<CheckpointStore>,
    metrics_path: Option<PathBuf>,
    records_tx: Option<mpsc::UnboundedSender<RoundRecord>>,
    records: Vec<RoundRecord>,
    started: Instant,
    round_started: Option<Instant>,
    run_id: String,
    engine_strategy_name: String,
    /// Clients with an upload in flight (at most one each).
    uploading: HashSet<ClientId>,
    fit_epoch: watch::Sender<u64>,
    log_budgets: HashMap<ClientId, LogBudget>,
    log_lines_per_minute: u32,
    /// Each connected client's training backend and codecs, and which
    /// backend each accepted update of the current round was trained on.
    sessions: HashMap<ClientId, SessionInfo>,
    round_backends: std::collections::BTreeMap<ClientId, String>,
    /// Bytes each client sent and was sent this round, and in what codec.
    round_traffic: std::collections::BTreeMap<ClientId, ClientTraffic>,
    /// The model encoded for each (downlink codec, with control variate):
    /// encoded once per model version, whoever it goes to.
    encoded_models: HashMap<(Codec, bool), EncodedModel>,
    /// When the last "waiting for clients" line was logged, and the count then.
    last_waiting_log: Option<(Instant, usize)>,
    /// Published whenever what the coordinator waits for changes.
    waiting: Option<tokio::sync::watch::Sender<Option<Waiting>>>,
}

/// A model version (the values it was encoded from) and its encoding.
type EncodedModel = (Arc<Vec<f32>>, bytes::Bytes);

/// What a connected client's Hello settled.
struct SessionInfo {
    backend: String,
    uplink: Codec,
    downlink: Codec,
}

impl Hub {
    pub(super) fn new(
        engine: Box<dyn Coordinator>,
        setup: ServerSetup,
        shared: Arc<Shared>,
        fit_epoch: watch::Sender<u64>,
    ) -> Result<Hub, ServerError> {
        let strategy_name = setup.engine.strategy.name.clone();
        Ok(Hub {
            engine,
            shared,
            clients: HashMap::new(),
            model_spec: setup.model_spec,
            central_eval: setup.central_eval,
            checkpoints: setup.checkpoints,
            metrics_path: setup.metrics_path,
            records_tx: setup.records,
            records: Vec::new(),
            started: Instant::now(),
            round_started: None,
            run_id: setup.run_id,
            engine_strategy_name: strategy_name,
            uploading: HashSet::new(),
            fit_epoch,
            log_budgets: HashMap::new(),
            log_lines_per_minute: setup.client_log_lines_per_minute,
            sessions: HashMap::new(),
            round_backends: std::collections::BTreeMap::new(),
            round_traffic: std::collections::BTreeMap::new(),
            encoded_models: HashMap::new(),
            last_waiting_log: None,
            waiting: setup.waiting,
        })
    }

    /// Whether a line about this client may be logged now (each client has
    /// a budget of lines per minute); says how many were held back.
    fn may_log(&mut self, client: &str) -> Option<u64> {
        let now = Instant::now();
        let per_minute = self.log_lines_per_minute;
        self.log_budgets
            .entry(client.to_string())
            .or_insert_with(|| LogBudget::new(per_minute, now))
            .allow(now)
    }

    fn warn_rejected(&mut self, client: &str, task_id: u64, reason: &str, what: &str) {
        if let Some(suppressed) = self.may_log(client) {
            warn!(
                %client,
                task_id,
                reason = %sanitize(reason, MAX_LOGGED_CHARS),
                suppressed,
                "{what}"
            );
        }
    }

    /// Publishes what the coordinator waits for (`ServerSetup.waiting`) and
    /// logs "waiting for N more clients (c/n connected)" when the count
    /// changes (at most every 2 s) and every 30 s while it does not.
    fn report_waiting(&mut self) {
        let waiting = self.engine.waiting_for();
        if let Some(watch) = &self.waiting {
            watch.send_if_modified(|w| std::mem::replace(w, waiting) != waiting);
        }
        let Some(Waiting {
            available: connected,
            needed,
            ..
        }) = waiting
        else {
            self.last_waiting_log = None;
            return;
        };
        let now = Instant::now();
        let due = match self.last_waiting_log {
            None => true,
            Some((at, logged)) => {
                let since = now.duration_since(at);
                (logged != connected && since >= Duration::from_secs(2))
                    || since >= Duration::from_secs(30)
            }
        };
        if due {
            info!(
                "waiting for {} more client{} ({connected}/{needed} connected)",
                needed.saturating_sub(connected),
                if needed.saturating_sub(connected) == 1 {
                    ""
                } else {
                    "s"
                }
            );
            self.last_waiting_log = Some((now, connected));
        }
    }

    /// Tells upload tasks of a closed fit phase to stop.
    fn publish_fit_epoch(&mut self) {
        let epoch = self.engine.fit_epoch();
        if *self.fit_epoch.borrow() != epoch {
            self.uploading.clear();
            self.fit_epoch.send_replace(epoch);
        }
    }

    pub(super) async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<ToHub>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, ServerError> {
        tokio::pin!(shutdown);
        let actions = self.engine.start(Instant::now());
        let mut outcome = self.execute(actions).await;
        self.report_waiting();
        while outcome.is_none() {
            let deadline = self.engine.next_deadline();
            let actions = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = sleep_until(deadline) => self.engine.tick(Instant::now()),
                // Wakes the "waiting for clients" line when nothing else happens.
                _ = tokio::time::sleep(Duration::from_secs(30)), if self.last_waiting_log.is_some() => Vec::new(),
                _ = &mut shutdown => {
                    info!("shutting down: the round in progress is dropped, completed rounds are checkpointed");
                    self.close_all("aggregator shutting down", false);
                    outcome = Some(Ok(false));
                    break;
                }
            };
            outcome = self.execute(actions).await;
            self.publish_fit_epoch();
            self.report_waiting();
        }
        let finished = match outcome {
            Some(Ok(finished)) => finished,
            Some(Err(e)) => {
                // Not "finished": clients keep retrying, so they come back
                // when the aggregator is fixed and resumed.
                self.close_all(&format!("run aborted: {e}"), false);
                return Err(e);
            }
            None => false,
        };
        Ok(RunSummary {
            rounds_completed: self.engine.completed_rounds(),
            final_model: self.engine.global_model(),
            records: self.records,
            finished,
        })
    }

    fn is_current(&self, client: &str, conn_id: u64) -> bool {
        self.clients
            .get(client)
            .is_some_and(|(id, _)| *id == conn_id)
    }

    fn handle(&mut self, ev: ToHub) -> Vec<Action> {
        let actions = self.handle_event(ev);
        self.shared
            .metrics
            .set_connected_clients(self.clients.len());
        actions
    }

    fn handle_event(&mut self, ev: ToHub) -> Vec<Action> {
        let now = Instant::now();
        match ev {
            ToHub::Joined {
                client,
                conn_id,
                handle,
                backend,
                uplink,
                downlink,
            } => {
                self.sessions.insert(
                    client.clone(),
                    SessionInfo {
                        backend,
                        uplink,
                        downlink,
                    },
                );
                // The new connection has no upload in flight. The old one's
                // upload can no longer count (its Update is not current) and
                // would otherwise stay marked until the fit epoch moves,
                // which in FedBuff is only at the end of the run.
                self.uploading.remove(&client);
                let mut actions = Vec::new();
                if let Some((_, old)) = self.clients.insert(client.clone(), (conn_id, handle)) {
                    // A reconnect replaces the old session; its task is forfeited.
                    let _ = old.send(ToConn::Close {
                        reason: "replaced by a newer connection".into(),
                        finished: false,
                    });
                    actions.extend(self.engine.client_left(&client, now));
                }
                actions.extend(self.engine.client_joined(client, now));
                actions
            }
            ToHub::Left { client, conn_id } => {
                if self.is_current(&client, conn_id) {
                    self.clients.remove(&client);
                    self.sessions.remove(&client);
                    self.uploading.remove(&client);
                    self.log_budgets.remove(&client);
                    self.engine.client_left(&client, now)
                } else {
                    Vec::new()
                }
            }
            ToHub::Update {
                client,
                conn_id,
                header,
                delta,
                norm,
            } => {
                if !self.is_current(&client, conn_id) {
                    return Vec::new();
                }
                self.uploading.remove(&client);
                self.count_traffic(&client, header.body_len, 0);
                let update = ReceivedUpdate {
                    client: &client,
                    task_id: header.task_id,
                    round: header.round,
                    num_examples: header.num_examples,
                    metrics: &header.metrics,
                    delta: &delta.buf,
                    norm,
                };
                self.engine.update_received(update, now)
                // `delta` goes back to the pool here.
            }
            ToHub::UploadRequest {
                client,
                conn_id,
                round,
                task_id,
                reply,
            } => {
                if !self.is_current(&client, conn_id) {
                    let _ = reply.send(Err(()));
                    return Vec::new();
                }
                let verdict = self
                    .engine
                    .check_upload(&client, round, task_id)
                    .and_then(|()| match self.uploading.contains(&client) {
                        true => Err((
                            RejectCause::UploadBusy,
                            "another upload from this client is in flight".into(),
                        )),
                        false => Ok(()),
                    });
                match verdict {
                    Ok(()) => {
                        self.uploading.insert(client);
                        let _ = reply.send(Ok(self.engine.fit_epoch()));
                        Vec::new()
                    }
                    Err((cause, reason)) => {
                        let _ = reply.send(Err(()));
                        self.warn_rejected(&client, task_id, &reason, "upload refused");
                        self.send(&client, Message::UpdateRejected { task_id, reason });
                        // Counted, but the client keeps the task it holds: the
                        // header may lie about the round of a task id it holds.
                        self.engine.update_failed(&client, None, cause, now)
                    }
                }
            }
            ToHub::UpdateFailed {
                client,
                conn_id,
                task_id,
                cause,
                reason,
            } => {
                if !self.is_current(&client, conn_id) {
                    return Vec::new();
                }
                if task_id.is_some_and(|t| self.engine.is_pending(&client, t)) {
                    self.uploading.remove(&client);
                }
                self.warn_rejected(&client, task_id.unwrap_or(0), &reason, "update rejected");
                self.send(
                    &client,
                    Message::UpdateRejected {
                        task_id: task_id.unwrap_or(0),
                        reason,
                    },
                );
                self.engine.update_failed(&client, task_id, cause, now)
            }
            ToHub::TaskFailed {
                client,
                conn_id,
                task_id,
                reason,
                ..
            } => {
                // Messages about tasks the client does not hold are ignored
                // without a log line: they cost an attacker nothing.
                if !self.is_current(&client, conn_id) || !self.engine.is_pending(&client, task_id) {
                    return Vec::new();
                }
                self.warn_rejected(&client, task_id, &reason, "client failed its task");
                self.uploading.remove(&client);
                self.engine.task_failed(&client, task_id, now)
            }
            ToHub::Eval {
                client,
                conn_id,
                result,
                ..
            } => {
                if !self.is_current(&client, conn_id)
                    || !self.engine.is_pending(&client, result.task_id)
                {
                    return Vec::new();
                }
                self.engine.eval_received(&client, &result, now)
            }
            ToHub::SecAgg {
                client,
                conn_id,
                task_id,
                step,
                bytes,
                ..
            } => {
                if !self.is_current(&client, conn_id) || !self.engine.is_pending(&client, task_id) {
                    return Vec::new();
                }
                self.count_traffic(&client, bytes, 0);
                self.engine.secagg_received(&client, task_id, &step, now)
            }
        }
    }

    fn send(&self, client: &str, message: Message) {
        if let Some((_, handle)) = self.clients.get(client) {
            let _ = handle.send(ToConn::Send(message));
        }
    }

    /// Adds to `client`'s traffic this round; its entry (with the session's
    /// codec names) is made on its first bytes only.
    fn count_traffic(&mut self, client: &str, up: u64, down: u64) {
        if let Some(t) = self.round_traffic.get_mut(client) {
            t.bytes_up += up;
            t.bytes_down += down;
            return;
        }
        let (uplink, downlink) = self
            .sessions
            .get(client)
            .map(|s| (s.uplink.to_string(), s.downlink.to_string()))
            .unwrap_or_default();
        self.round_traffic.insert(
            client.to_string(),
            ClientTraffic {
                uplink,
                downlink,
                bytes_up: up,
                bytes_down: down,
            },
        );
    }

    /// The model (and, with `with_control`, SCAFFOLD's control variate after
    /// it) in `codec`: shared values for f32, otherwise encoded once per
    /// model version and codec.
    fn model_body(&mut self, codec: Codec, with_control: bool) -> Result<ModelBody, String> {
        let model = match with_control {
            true => self.engine.fit_payload(),
            false => self.engine.global_model(),
        };
        if codec == Codec::F32 {
            return Ok(ModelBody::F32(model));
        }
        if let Some((source, body)) = self.encoded_models.get(&(codec, with_control))
            && Arc::ptr_eq(source, &model)
        {
            return Ok(ModelBody::Encoded(body.clone()));
        }
        let mut body = Vec::new();
        // Downlink codecs (f16, bf16) round to nearest: the seed is unused.
        fedquic_protocol::encode_body(codec, &model, 0, &mut body)
            .map_err(|e| format!("cannot encode the model as {codec}: {e}"))?;
        let body = bytes::Bytes::from(body);
        self.encoded_models
            .insert((codec, with_control), (model, body.clone()));
        Ok(ModelBody::Encoded(body))
    }

    /// Sends a task and its model in the client's downlink codec;
    /// `with_control` (SCAFFOLD fit tasks) sends the control variate after
    /// the model.
    fn send_task(
        &mut self,
        client: &str,
        message: Message,
        round: u64,
        task_id: u64,
        with_control: bool,
    ) {
        let Some(codec) = self.sessions.get(client).map(|s| s.downlink) else {
            return;
        };
        let tensors = match with_control {
            true => self.shared.update_layout.clone(),
            false => self.shared.layout.clone(),
        };
        let model = match self.model_body(codec, with_control) {
            Ok(model) => model,
            Err(e) => {
                // Only a non-finite model fails to encode, and the engine
                // never commits one; the client's task times out.
                warn!(%client, error = %e, "model not sent");
                return;
            }
        };
        let body_len = match &model {
            ModelBody::F32(values) => values.len() as u64 * 4,
            ModelBody::Encoded(bytes) => bytes.len() as u64,
        };
        let header = TensorHeader {
            kind: StreamKind::GlobalModel,
            round,
            task_id,
            codec,
            tensors,
            num_examples: 0,
            metrics: Vec::new(),
            body_len,
        };
        if let Some((_, handle)) = self.clients.get(client) {
            let _ = handle.send(ToConn::Task {
                message,
                header,
                model,
            });
            self.count_traffic(client, 0, body_len);
        }
    }

    fn close_all(&mut self, reason: &str, finished: bool) {
        for (_, handle) in self.clients.values() {
            let _ = handle.send(ToConn::Close {
                reason: reason.to_string(),
                finished,
            });
        }
    }

    /// Carries out actions in order. Returns `Some(finished)` when the run is over.
    async fn execute(&mut self, actions: Vec<Action>) -> Option<Result<bool, ServerError>> {
        for action in actions {
            match action {
                Action::SendFit { client, task } => {
                    self.round_started.get_or_insert_with(Instant::now);
                    let (round, task_id) = (task.round, task.task_id);
                    let with_control = task.scaffold.is_some();
                    self.send_task(
                        &client,
                        Message::FitTask(task),
                        round,
                        task_id,
                        with_control,
                    );
                }
                Action::SendSecAgg {
                    client,
                    task_id,
                    step,
                } => {
                    let message = Message::SecAgg { task_id, step };
                    let bytes = fedquic_protocol::encode_message(&message)
                        .map_or(0, |frame| frame.len() as u64);
                    self.count_traffic(&client, 0, bytes);
                    self.send(&client, message);
                }
                Action::SendEvaluate { client, task } => {
                    let (round, task_id) = (task.round, task.task_id);
                    self.send_task(&client, Message::EvaluateTask(task), round, task_id, false);
                }
                Action::UpdateAccepted { client, task_id } => {
                    if let Some(session) = self.sessions.get(&client) {
                        self.round_backends
                            .insert(client.clone(), session.backend.clone());
                    }
                    self.send(&client, Message::UpdateAccepted { task_id });
                }
                Action::UpdateRejected {
                    client,
                    task_id,
                    reason,
                } => {
                    self.warn_rejected(&client, task_id, &reason, "update rejected");
                    self.send(&client, Message::UpdateRejected { task_id, reason });
                }
                Action::EvalRejected {
                    client,
                    task_id,
                    reason,
                } => {
                    self.warn_rejected(&client, task_id, &reason, "evaluation result rejected");
                    self.send(&client, Message::UpdateRejected { task_id, reason });
                }
                Action::RoundNotCommitted { round, reason } => {
                    warn!(round, %reason, "round not committed: the global model is unchanged");
                }
                Action::RoundRetry {
                    round,
                    attempt,
                    answered,
                    needed,
                } => {
                    self.round_backends.clear();
                    warn!(
                        round,
                        attempt,
                        answered,
                        needed,
                        "too few updates: retrying the round with a new selection"
                    );
                }
                Action::RoundFinished(outcome) => {
                    if let Err(e) = self.finish_round(*outcome).await {
                        return Some(Err(e));
                    }
                }
                Action::Finished => {
                    info!(
                        rounds = self.engine.completed_rounds(),
                        "federated run complete"
                    );
                    self.close_all("federated run complete", true);
                    return Some(Ok(true));
                }
                Action::Aborted { reason } => return Some(Err(ServerError::Aborted(reason))),
            }
        }
        None
    }

    async fn finish_round(&mut self, outcome: RoundOutcome) -> Result<(), ServerError> {
        let global = self.engine.global_model();
        let mut record = RoundRecord {
            outcome,
            test_loss: None,
            test_accuracy: None,
            test_examples: None,
            bytes_down: self.shared.bytes_down.swap(0, Ordering::Relaxed),
            bytes_up: self.shared.bytes_up.swap(0, Ordering::Relaxed),
            client_backends: std::mem::take(&mut self.round_backends),
            client_traffic: std::mem::take(&mut self.round_traffic),
            seconds: 0.0,
            central_eval_seconds: 0.0,
            checkpoint_seconds: 0.0,
            elapsed_seconds: 0.0,
        };
        if let Some(mut eval) = self.central_eval.take() {
            let t = Instant::now();
            let model = Arc::clone(&global);
            let joined = tokio::task::spawn_blocking(move || {
                let stats = eval
                    .model
                    .set_parameters(&model)
                    .and_then(|()| eval.model.evaluate_all(&eval.test));
                (eval, stats)
            })
            .await;
            match joined {
                Ok((eval, stats)) => {
                    match stats {
                        Ok(s) => {
                            record.test_loss = Some(s.loss as f64);
                            record.test_accuracy = Some(s.accuracy as f64);
                            record.test_examples = Some(s.examples);
                        }
                        Err(e) => warn!(error = %e, "central evaluation failed"),
                    }
                    self.central_eval = Some(eval);
                }
                Err(e) => warn!(error = %e, "central evaluation panicked; disabled"),
            }
            record.central_eval_seconds = t.elapsed().as_secs_f64();
        }
        let now = Instant::now();
        record.seconds = self
            .round_started
            .take()
            .map(|t| now.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        record.elapsed_seconds = now.duration_since(self.started).as_secs_f64();
        if let Some(store) = self
            .checkpoints
            .clone()
            .filter(|_| record.outcome.checkpoint)
        {
            // The checkpoint carries this round's metrics line, so a crash
            // before the line reaches metrics.jsonl loses nothing: resume
            // restores it.
            let metrics_line = serde_json::to_string(&record).map_err(|e| {
                ServerError::Setup(format!("cannot encode the round's metrics: {e}"))
            })?;
            let header = CheckpointHeader {
                run_id: self.run_id.clone(),
                round: record.outcome.round,
                model_spec: self.model_spec.clone(),
                values: global.len() as u64,
                unix_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                engine: record.outcome.state.clone(),
                strategy: self.engine_strategy_name.clone(),
                strategy_bytes: 0,
                metrics_line,
            };
            let t = Instant::now();
            let model = Arc::clone(&global);
            let strategy = self.engine.strategy_state();
            tokio::task::spawn_blocking(move || store.save(&header, &model, &strategy))
                .await
                .map_err(|e| ServerError::Setup(format!("checkpoint task failed: {e}")))??;
            record.checkpoint_seconds = t.elapsed().as_secs_f64();
            self.shared
                .metrics
                .checkpoint_written(record.checkpoint_seconds);
        }
        info!(
            round = record.outcome.round,
            answered = record.outcome.clients_answered,
            selected = record.outcome.clients_selected,
            dropped = record.outcome.clients_dropped,
            test_accuracy = record
                .test_accuracy
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "-".into()),
            seconds = format!("{:.2}", record.seconds),
            "round finished"
        );
        if let Some(path) = &self.metrics_path {
            append_json_line(path, &record)?;
        }
        self.shared.metrics.round_committed(&record);
        if let Some(tx) = &self.records_tx {
            let _ = tx.send(record.clone());
        }
        self.records.push(record);
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
