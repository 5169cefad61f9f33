//! The QUIC server: the async shell around the [`RoundEngine`].
//!
//! One task (the hub) owns the engine and carries out its actions; one task
//! per connection moves bytes. Updates are decoded straight into one of a
//! bounded pool of model-sized buffers and folded into the round's single
//! accumulator as soon as they are complete and valid, so memory is
//! O(model x max_inflight_updates) whatever the number of clients.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedquic_net::io::{
    IoError, read_message, read_tensor_body, read_tensor_header, send_shared_tensors, write_message,
};
use fedquic_protocol::{
    Codec, EvalResult, Message, PROTOCOL_VERSION, Reject, StreamKind, TensorHeader, TensorLimits,
    TensorMeta, Welcome, negotiate_version, with_control_layout,
};
use fedquic_train::{Dataset, Model};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::checkpoint::{CheckpointError, CheckpointHeader, CheckpointStore};
use crate::engine::{
    Action, ClientId, EngineConfig, EngineState, RejectCause, RoundEngine, RoundOutcome,
};
use crate::logging::{LogBudget, MAX_LOGGED_CHARS, sanitize};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Endpoint(#[from] fedquic_net::endpoint::EndpointError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot write metrics to {path}: {source}")]
    Metrics {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run aborted: {0}")]
    Aborted(String),
    #[error("invalid server setup: {0}")]
    Setup(String),
}

/// The global model evaluated centrally after every round.
pub struct CentralEval {
    pub model: Model,
    pub test: Arc<Dataset>,
}

/// Everything the server needs, already loaded and checked.
pub struct ServerSetup {
    pub listen: SocketAddr,
    pub tls: quinn::ServerConfig,
    pub engine: EngineConfig,
    pub model_spec: String,
    pub layout: Vec<TensorMeta>,
    pub initial_model: Vec<f32>,
    /// The checkpointed engine state to continue from (`None`: a fresh run).
    pub resume: Option<EngineState>,
    /// The checkpointed strategy state (with `resume`).
    pub strategy_state: Vec<u8>,
    /// Identifies this run in every checkpoint.
    pub run_id: String,
    pub central_eval: Option<CentralEval>,
    pub checkpoints: Option<CheckpointStore>,
    pub metrics_path: Option<PathBuf>,
    pub max_clients: usize,
    pub max_inflight_updates: usize,
    pub handshake_timeout: Duration,
    /// Time a client has to send an update stream's header.
    pub header_timeout: Duration,
    /// An upload must finish within `upload_grace` plus its size at
    /// `min_upload_bytes_per_sec`.
    pub upload_grace: Duration,
    pub min_upload_bytes_per_sec: f64,
    /// Log lines about one client's misbehaviour per minute.
    pub client_log_lines_per_minute: u32,
    /// Receives each round's record as soon as it is written (progress bars).
    pub records: Option<mpsc::UnboundedSender<RoundRecord>>,
    /// When set, only these client names are admitted.
    pub allowlist: Option<std::collections::HashSet<String>>,
    /// Secret for stateless-reset tokens that survive restarts (see
    /// `fedquic_net::endpoint::server_endpoint_with_reset_secret`); `None`
    /// uses a random key.
    pub reset_secret: Option<Vec<u8>>,
    /// Screens connection attempts before their handshake (Retry, cap,
    /// timeout); keep a clone to read its counters.
    pub admission: Arc<fedquic_net::admission::Admission>,
}

impl ServerSetup {
    /// A setup for `layout` starting from `initial_model`, with no central
    /// evaluation, checkpoints, metrics file, allowlist or progress channel,
    /// and the config file's default limits; set the fields that differ.
    pub fn new(
        listen: SocketAddr,
        tls: quinn::ServerConfig,
        engine: EngineConfig,
        layout: &fedquic_train::layout::ParamLayout,
        initial_model: Vec<f32>,
    ) -> Self {
        let limits = crate::config::LimitsConfig::default();
        ServerSetup {
            listen,
            tls,
            engine,
            model_spec: layout.to_string(),
            layout: layout.wire_layout(),
            initial_model,
            resume: None,
            strategy_state: Vec::new(),
            run_id: new_run_id(),
            central_eval: None,
            checkpoints: None,
            metrics_path: None,
            max_clients: limits.max_clients,
            max_inflight_updates: limits.max_inflight_updates,
            handshake_timeout: Duration::from_secs_f64(limits.handshake_timeout_secs),
            header_timeout: Duration::from_secs_f64(limits.header_timeout_secs),
            upload_grace: Duration::from_secs_f64(limits.upload_grace_secs),
            min_upload_bytes_per_sec: limits.min_upload_bytes_per_sec,
            client_log_lines_per_minute: limits.client_log_lines_per_minute,
            records: None,
            allowlist: None,
            reset_secret: None,
            admission: Arc::default(),
        }
    }
}

/// A fresh run id: the time and 64 random bits, in hex. Not a learning
/// choice, so it needs no seed.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{now:x}-{:016x}", rand::random::<u64>())
}

/// One line of the metrics file.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    #[serde(flatten)]
    pub outcome: RoundOutcome,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_examples: Option<usize>,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// The training backend (as each client reported it) of every accepted
    /// update: which clients trained on what.
    pub client_backends: std::collections::BTreeMap<ClientId, String>,
    /// Wall time of the round: training, transfers, evaluation, checkpoint.
    pub seconds: f64,
    pub central_eval_seconds: f64,
    pub checkpoint_seconds: f64,
    /// Seconds since the server started.
    pub elapsed_seconds: f64,
}

#[derive(Debug)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub final_model: Arc<Vec<f32>>,
    pub records: Vec<RoundRecord>,
    /// False when the run was stopped (Ctrl-C) before its last round.
    pub finished: bool,
}

/// Bounded pool of update buffers: at most `permits` updates are held in
/// memory at once, and buffers are reused across rounds.
struct BufferPool {
    len: usize,
    free: Mutex<Vec<Vec<f32>>>,
    permits: Arc<Semaphore>,
}

struct PooledBuffer {
    buf: Vec<f32>,
    pool: Arc<BufferPool>,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    async fn acquire(self: &Arc<Self>) -> Option<PooledBuffer> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok()?;
        let buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| vec![0f32; self.len]);
        Some(PooledBuffer {
            buf,
            pool: Arc::clone(self),
            _permit: permit,
        })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

enum ToHub {
    Joined {
        client: ClientId,
        conn_id: u64,
        handle: mpsc::UnboundedSender<ToConn>,
        /// The training backend the client reported in its Hello (validated).
        backend: String,
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
    },
    Eval {
        client: ClientId,
        conn_id: u64,
        result: EvalResult,
    },
}

enum ToConn {
    /// A fit or evaluate task, followed by the global model on its own stream.
    Task {
        message: Message,
        header: TensorHeader,
        model: Arc<Vec<f32>>,
    },
    Send(Message),
    Close {
        reason: String,
        finished: bool,
    },
}

/// State shared by the hub and the connection tasks.
struct Shared {
    model_spec: String,
    layout: Vec<TensorMeta>,
    /// The layout of fit streams and updates: `layout`, then (SCAFFOLD) the
    /// control variate's tensors.
    update_layout: Vec<TensorMeta>,
    limits: TensorLimits,
    pool: Arc<BufferPool>,
    hub: mpsc::UnboundedSender<ToHub>,
    connected: AtomicUsize,
    max_clients: usize,
    handshake_timeout: Duration,
    header_timeout: Duration,
    upload_grace: Duration,
    min_upload_rate: f64,
    /// The hub's fit epoch: uploads end when it moves on.
    fit_epochs: watch::Receiver<u64>,
    allowlist: Option<std::collections::HashSet<String>>,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    next_conn_id: AtomicU64,
}

pub struct Server {
    endpoint: quinn::Endpoint,
    setup: ServerSetup,
}

impl Server {
    /// Binds the UDP socket; the server runs when [`Server::run`] is awaited.
    pub fn bind(setup: ServerSetup) -> Result<Server, ServerError> {
        let values: usize = setup
            .layout
            .iter()
            .map(|t| t.elements().unwrap_or(u64::MAX) as usize)
            .sum();
        if values != setup.initial_model.len() {
            return Err(ServerError::Setup(format!(
                "model has {} values but its layout needs {values}",
                setup.initial_model.len()
            )));
        }
        let endpoint = match &setup.reset_secret {
            Some(secret) => fedquic_net::endpoint::server_endpoint_with_reset_secret(
                setup.listen,
                setup.tls.clone(),
                secret,
            )?,
            None => fedquic_net::endpoint::server_endpoint(setup.listen, setup.tls.clone())?,
        };
        Ok(Server { endpoint, setup })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Runs rounds until the last one is done, the run aborts, or
    /// `shutdown` completes (then it says goodbye to clients and returns).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, ServerError> {
        let Server { endpoint, setup } = self;
        setup
            .engine
            .strategy
            .validate()
            .map_err(ServerError::Setup)?;
        setup
            .engine
            .strategy
            .check_capacity(
                setup.initial_model.len(),
                setup.engine.max_fit_clients,
                setup.engine.min_fit_clients,
            )
            .map_err(ServerError::Setup)?;
        let (hub_tx, hub_rx) = mpsc::unbounded_channel();
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let values = setup.initial_model.len();
        // SCAFFOLD's updates carry Delta c after Delta y: twice the values.
        let (update_layout, update_values) = match setup.engine.strategy.carries_control_variate() {
            true => (with_control_layout(&setup.layout), 2 * values),
            false => (setup.layout.clone(), values),
        };
        let shared = Arc::new(Shared {
            model_spec: setup.model_spec.clone(),
            layout: setup.layout.clone(),
            update_layout,
            limits: TensorLimits::for_model(update_values as u64),
            pool: Arc::new(BufferPool {
                len: update_values,
                free: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(setup.max_inflight_updates.max(1))),
            }),
            hub: hub_tx,
            connected: AtomicUsize::new(0),
            max_clients: setup.max_clients,
            handshake_timeout: setup.handshake_timeout,
            header_timeout: setup.header_timeout,
            upload_grace: setup.upload_grace,
            min_upload_rate: setup.min_upload_bytes_per_sec.max(1.0),
            fit_epochs: epoch_rx,
            allowlist: setup.allowlist.clone(),
            bytes_down: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
        });
        info!(
            addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            model = %setup.model_spec, params = values, "aggregator listening"
        );
        let acceptor = tokio::spawn(accept_loop(
            endpoint.clone(),
            Arc::clone(&shared),
            Arc::clone(&setup.admission),
        ));
        // The hub folds updates, applies the server step, evaluates and
        // encodes checkpoints: CPU-heavy work that must not block the
        // runtime that moves every connection's bytes. It gets a thread and
        // a single-threaded runtime of its own.
        let hub = Hub::new(setup, Arc::clone(&shared), epoch_tx)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("fedquic-hub".into())
            .spawn(move || {
                let result = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(hub.run(hub_rx, async {
                        let _ = stop_rx.await;
                    })),
                    Err(e) => Err(ServerError::Setup(format!("cannot start the hub: {e}"))),
                };
                let _ = done_tx.send(result);
            });
        let result = match spawned {
            Err(e) => Err(ServerError::Setup(format!(
                "cannot start the hub thread: {e}"
            ))),
            Ok(_) => {
                tokio::pin!(shutdown);
                tokio::pin!(done_rx);
                let mut stop_tx = Some(stop_tx);
                loop {
                    tokio::select! {
                        done = &mut done_rx => break done.unwrap_or_else(|_| {
                            Err(ServerError::Setup("the hub thread panicked".into()))
                        }),
                        _ = &mut shutdown, if stop_tx.is_some() => {
                            if let Some(tx) = stop_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
            }
        };
        acceptor.abort();
        // Let the goodbyes reach the clients, then close what is left.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while shared.connected.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        endpoint.close(0u32.into(), b"aggregator stopped");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        result
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    admission: Arc<fedquic_net::admission::Admission>,
) {
    while let Some(incoming) = endpoint.accept().await {
        // Retry, the handshake cap, the handshake timeout and rate-limited
        // refusal logs live in net's Admission; a flood spawns no task.
        let Some(handshake) = admission.screen(incoming) else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Some(conn) = handshake.complete().await {
                serve_connection(conn, shared).await;
            }
        });
    }
}

/// Decrements the connected-clients count however the connection ends.
struct ConnectedGuard<'a>(&'a AtomicUsize);
impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    let Some(client) = fedquic_net::tls::peer_name(&conn) else {
        warn!(%remote, "refused connection: client certificate has no usable name");
        conn.close(1u32.into(), b"certificate has no name");
        return;
    };
    let (mut send, mut recv, backend) = match tokio::time::timeout(
        shared.handshake_timeout,
        async {
            let (send, mut recv) = conn.accept_bi().await?;
            let hello = read_message(&mut recv).await?;
            Ok::<_, IoError>((send, recv, hello))
        },
    )
    .await
    {
        Ok(Ok((send, recv, Some(Message::Hello(hello))))) => {
            match negotiate_version(&hello.versions).and_then(|_| hello.validate()) {
                Ok(_) => (send, recv, hello.backend),
                Err(e) => {
                    let mut send = send;
                    reject(&conn, &mut send, &client, &e.to_string(), None).await;
                    return;
                }
            }
        }
        Ok(Ok((mut send, _, other))) => {
            let what = other
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|| "end of stream".into());
            reject(
                &conn,
                &mut send,
                &client,
                &format!("expected Hello, got {what:.60}"),
                None,
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            warn!(%client, %remote, error = %e, "refused connection during hello");
            return;
        }
        Err(_) => {
            warn!(%client, %remote, "refused connection: no hello within the handshake timeout");
            conn.close(2u32.into(), b"handshake timeout");
            return;
        }
    };
    if shared
        .allowlist
        .as_ref()
        .is_some_and(|names| !names.contains(&client))
    {
        reject(
            &conn,
            &mut send,
            &client,
            &format!("client '{client}' is not on the aggregator's allowlist"),
            None,
        )
        .await;
        return;
    }
    let count = shared.connected.fetch_add(1, Ordering::Relaxed) + 1;
    let _guard = ConnectedGuard(&shared.connected);
    if count > shared.max_clients {
        let reason = format!(
            "aggregator is full ({} clients connected)",
            shared.max_clients
        );
        reject(&conn, &mut send, &client, &reason, Some(5_000)).await;
        return;
    }
    let welcome = Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        codec: Codec::F32,
        model_spec: shared.model_spec.clone(),
        client_name: client.clone(),
    });
    if let Err(e) = write_message(&mut send, &welcome).await {
        warn!(%client, error = %e, "lost connection while welcoming");
        return;
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (to_conn, mut commands) = mpsc::unbounded_channel();
    if shared
        .hub
        .send(ToHub::Joined {
            client: client.clone(),
            conn_id,
            handle: to_conn,
            backend: backend.clone(),
        })
        .is_err()
    {
        return;
    }
    info!(%client, %remote, %backend, "client connected");

    // Every task this session starts (the control-stream reader, model
    // sends, update receivers) lives in `tasks` and is aborted when the
    // session ends, so nothing keeps the connection alive after it.
    let mut tasks = JoinSet::new();
    // The control stream is read by its own task: reads are not cancel-safe
    // inside select!, channel receives are.
    let (msg_tx, mut messages) = mpsc::channel(16);
    tasks.spawn(async move {
        loop {
            let msg = read_message(&mut recv).await;
            let stop = !matches!(msg, Ok(Some(_)));
            if msg_tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });

    let end_reason: String = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(ToConn::Task { message, header, model }) => {
                    if let Err(e) = write_message(&mut send, &message).await {
                        break format!("write failed: {e}");
                    }
                    let conn = conn.clone();
                    let shared = Arc::clone(&shared);
                    tasks.spawn(async move {
                        match send_shared_tensors(&conn, &header, model).await {
                            Ok(bytes) => { shared.bytes_down.fetch_add(bytes, Ordering::Relaxed); }
                            Err(e) => debug!(error = %e, "model transfer failed"),
                        }
                    });
                }
                Some(ToConn::Send(message)) => {
                    if let Err(e) = write_message(&mut send, &message).await {
                        break format!("write failed: {e}");
                    }
                }
                Some(ToConn::Close { reason, finished }) => {
                    let _ = write_message(&mut send, &Message::Bye { reason: reason.clone(), finished }).await;
                    let _ = send.finish();
                    // Wait (briefly) for the client to close, so the goodbye is delivered.
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    break reason;
                }
                None => break "aggregator stopped".into(),
            },
            msg = messages.recv() => match msg {
                Some(Ok(Some(Message::EvalResult(result)))) => {
                    let _ = shared.hub.send(ToHub::Eval { client: client.clone(), conn_id, result });
                }
                Some(Ok(Some(Message::TaskFailed { task_id, reason }))) => {
                    let _ = shared.hub.send(ToHub::TaskFailed { client: client.clone(), conn_id, task_id, reason });
                }
                Some(Ok(Some(Message::Heartbeat))) => {}
                Some(Ok(Some(Message::Bye { reason, .. }))) => {
                    break format!("client said bye: {}", sanitize(&reason, 80));
                }
                Some(Ok(Some(other))) => {
                    let reason = format!("unexpected message from client: {:.80}", format!("{other:?}"));
                    reject(&conn, &mut send, &client, &reason, None).await;
                    break reason;
                }
                Some(Ok(None)) | None => break "client closed the control stream".into(),
                Some(Err(e)) => {
                    if matches!(e, IoError::Protocol(_)) {
                        reject(&conn, &mut send, &client, &e.to_string(), None).await;
                    }
                    break e.to_string();
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(stream) => {
                    tasks.spawn(receive_update(stream, client.clone(), conn_id, Arc::clone(&shared)));
                }
                Err(e) => break format!("connection lost: {e}"),
            },
            // Reap finished tasks so the set does not grow over a long session.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    tasks.abort_all();
    conn.close(0u32.into(), b"session ended");
    info!(%client, reason = %sanitize(&end_reason, MAX_LOGGED_CHARS), "client disconnected");
    let _ = shared.hub.send(ToHub::Left { client, conn_id });
}

async fn reject(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    client: &str,
    reason: &str,
    retry_after_ms: Option<u64>,
) {
    warn!(%client, reason = %sanitize(reason, MAX_LOGGED_CHARS), "rejecting client");
    let msg = Message::Reject(Reject {
        reason: reason.to_string(),
        retry_after_ms,
    });
    let _ = write_message(send, &msg).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(3u32.into(), b"rejected");
}

/// QUIC error code on update streams the aggregator stops reading.
const STREAM_REFUSED: u32 = 1;

/// Resolves once the fit phase that `epoch` names has closed (or the hub is
/// gone): the upload is for a round that no longer collects updates.
async fn fit_phase_closed(mut epochs: watch::Receiver<u64>, epoch: u64) {
    loop {
        if *epochs.borrow_and_update() != epoch {
            return;
        }
        if epochs.changed().await.is_err() {
            return;
        }
    }
}

/// Reads one update stream into a pooled buffer, validating as it goes, and
/// hands it to the hub. The header must arrive within the header timeout,
/// and the hub must confirm that the round and task are current and that
/// this client owes this update and has no other upload in flight, before a
/// buffer is taken. The body must then arrive within its deadline, and the
/// read is cut off when the round closes. Nothing reaches the accumulator
/// unless the whole update arrived and passed every check.
async fn receive_update(
    mut stream: quinn::RecvStream,
    client: ClientId,
    conn_id: u64,
    shared: Arc<Shared>,
) {
    let fail = |task_id: Option<u64>, cause: RejectCause, reason: String| {
        let _ = shared.hub.send(ToHub::UpdateFailed {
            client: client.clone(),
            conn_id,
            task_id,
            cause,
            reason,
        });
    };
    let header = match tokio::time::timeout(
        shared.header_timeout,
        read_tensor_header(&mut stream, &shared.limits),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return fail(
                None,
                RejectCause::Malformed,
                format!("bad update header: {e}"),
            );
        }
        Err(_) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return fail(
                None,
                RejectCause::UploadTimeout,
                format!(
                    "no update header within {:.0} s",
                    shared.header_timeout.as_secs_f64()
                ),
            );
        }
    };
    if header.kind != StreamKind::Update {
        let _ = stream.stop(STREAM_REFUSED.into());
        return fail(
            Some(header.task_id),
            RejectCause::Malformed,
            "expected an update stream".into(),
        );
    }
    if let Err(e) = header.check_layout(&shared.update_layout) {
        let _ = stream.stop(STREAM_REFUSED.into());
        return fail(Some(header.task_id), RejectCause::Malformed, e.to_string());
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    let asked = shared.hub.send(ToHub::UploadRequest {
        client: client.clone(),
        conn_id,
        round: header.round,
        task_id: header.task_id,
        reply: reply_tx,
    });
    let epoch = match (asked, reply_rx.await) {
        (Ok(()), Ok(Ok(epoch))) => epoch,
        // The hub refused (and told the client why), or is gone.
        _ => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    let closed = fit_phase_closed(shared.fit_epochs.clone(), epoch);
    tokio::pin!(closed);
    let mut delta = tokio::select! {
        buffer = shared.pool.acquire() => match buffer {
            Some(b) => b,
            None => return,
        },
        _ = &mut closed => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    let deadline = shared.upload_grace
        + Duration::from_secs_f64(header.body_len as f64 / shared.min_upload_rate);
    let body = tokio::select! {
        body = tokio::time::timeout(deadline, read_tensor_body(&mut stream, &header, &mut delta.buf)) => body,
        _ = &mut closed => {
            // The round closed while this upload was in flight: free the
            // buffer now, there is nothing to fold it into.
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    match body {
        Ok(Ok(())) => {
            shared
                .bytes_up
                .fetch_add(header.body_len, Ordering::Relaxed);
            let _ = shared.hub.send(ToHub::Update {
                client: client.clone(),
                conn_id,
                header,
                delta,
            });
        }
        Ok(Err(e)) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            fail(
                Some(header.task_id),
                RejectCause::Malformed,
                format!("update discarded: {e}"),
            );
        }
        Err(_) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            fail(
                Some(header.task_id),
                RejectCause::UploadTimeout,
                format!(
                    "update of {} bytes not received within {:.0} s",
                    header.body_len,
                    deadline.as_secs_f64()
                ),
            );
        }
    }
}

struct Hub {
    engine: RoundEngine,
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
    /// Each connected client's training backend, and which backend each
    /// accepted update of the current round was trained on.
    backends: HashMap<ClientId, String>,
    round_backends: std::collections::BTreeMap<ClientId, String>,
}

impl Hub {
    fn new(
        setup: ServerSetup,
        shared: Arc<Shared>,
        fit_epoch: watch::Sender<u64>,
    ) -> Result<Hub, ServerError> {
        let strategy_name = setup.engine.strategy.name.clone();
        let engine = match setup.resume {
            Some(state) => {
                let mut engine = RoundEngine::resume(setup.engine, setup.initial_model, state);
                engine
                    .restore_strategy(&setup.strategy_state)
                    .map_err(|e| ServerError::Setup(format!("checkpointed strategy: {e}")))?;
                engine
            }
            None => RoundEngine::new(setup.engine, setup.initial_model, 0),
        };
        let mut engine = engine;
        engine.set_run_id(&setup.run_id);
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
            backends: HashMap::new(),
            round_backends: std::collections::BTreeMap::new(),
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

    /// Tells upload tasks of a closed fit phase to stop.
    fn publish_fit_epoch(&mut self) {
        let epoch = self.engine.fit_epoch();
        if *self.fit_epoch.borrow() != epoch {
            self.uploading.clear();
            self.fit_epoch.send_replace(epoch);
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<ToHub>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, ServerError> {
        tokio::pin!(shutdown);
        let actions = self.engine.start(Instant::now());
        let mut outcome = self.execute(actions).await;
        while outcome.is_none() {
            let deadline = self.engine.next_deadline();
            let actions = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = sleep_until(deadline) => self.engine.tick(Instant::now()),
                _ = &mut shutdown => {
                    info!("shutting down: the round in progress is dropped, completed rounds are checkpointed");
                    self.close_all("aggregator shutting down", false);
                    outcome = Some(Ok(false));
                    break;
                }
            };
            outcome = self.execute(actions).await;
            self.publish_fit_epoch();
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
        let now = Instant::now();
        match ev {
            ToHub::Joined {
                client,
                conn_id,
                handle,
                backend,
            } => {
                self.backends.insert(client.clone(), backend);
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
                    self.backends.remove(&client);
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
            } => {
                if !self.is_current(&client, conn_id) {
                    return Vec::new();
                }
                self.uploading.remove(&client);
                self.engine.update_received(
                    &client,
                    header.task_id,
                    header.round,
                    header.num_examples,
                    &header.metrics,
                    &delta.buf,
                    now,
                )
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
                        // Counted, but the client keeps the task it holds.
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
            } => {
                if !self.is_current(&client, conn_id)
                    || !self.engine.is_pending(&client, result.task_id)
                {
                    return Vec::new();
                }
                self.engine.eval_received(&client, &result, now)
            }
        }
    }

    fn send(&self, client: &str, message: Message) {
        if let Some((_, handle)) = self.clients.get(client) {
            let _ = handle.send(ToConn::Send(message));
        }
    }

    /// Sends a task and its model; `with_control` (SCAFFOLD fit tasks) sends
    /// the control variate after the model.
    fn send_task(
        &mut self,
        client: &str,
        message: Message,
        round: u64,
        task_id: u64,
        with_control: bool,
    ) {
        let (model, tensors) = match with_control {
            true => (self.engine.fit_payload(), self.shared.update_layout.clone()),
            false => (self.engine.global_model(), self.shared.layout.clone()),
        };
        let header = TensorHeader {
            kind: StreamKind::GlobalModel,
            round,
            task_id,
            codec: Codec::F32,
            tensors,
            num_examples: 0,
            metrics: Vec::new(),
            body_len: model.len() as u64 * 4,
        };
        if let Some((_, handle)) = self.clients.get(client) {
            let _ = handle.send(ToConn::Task {
                message,
                header,
                model,
            });
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
                Action::SendEvaluate { client, task } => {
                    let (round, task_id) = (task.round, task.task_id);
                    self.send_task(&client, Message::EvaluateTask(task), round, task_id, false);
                }
                Action::UpdateAccepted { client, task_id } => {
                    if let Some(backend) = self.backends.get(&client) {
                        self.round_backends.insert(client.clone(), backend.clone());
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
        if let Some(store) = self.checkpoints.clone() {
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
        if let Some(tx) = &self.records_tx {
            let _ = tx.send(record.clone());
        }
        self.records.push(record);
        Ok(())
    }
}

fn append_json_line(path: &PathBuf, record: &RoundRecord) -> Result<(), ServerError> {
    use std::io::Write;
    let err = |source| ServerError::Metrics {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_vec(record).map_err(|e| err(std::io::Error::other(e)))?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&line).map_err(err)?;
    f.flush().map_err(err)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
