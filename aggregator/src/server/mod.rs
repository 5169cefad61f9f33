//! The QUIC server: the async shell around a [`Coordinator`] (by default the
//! [`RoundEngine`]).
//!
//! One task (the hub, `hub.rs`) owns the coordinator and carries out its
//! actions; one task per connection (`connection.rs`) moves bytes. Updates are
//! decoded straight into one of a bounded pool (`pool.rs`) of model-sized
//! buffers and handed to the coordinator as soon as they are complete and
//! valid, so memory is O(model x max_inflight_updates) whatever the number of
//! clients. Each committed round leaves a [`RoundRecord`] (`records.rs`).
//!
//! [`Coordinator`]: crate::coordinator::Coordinator

mod connection;
mod hub;
mod pool;
mod records;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedquic_protocol::{TensorLimits, TensorMeta, with_control_layout};
use fedquic_train::{Dataset, Model};
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::info;

use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::CodecPreference;
use crate::coordinator::Coordinator;
use crate::engine::{EngineConfig, EngineState, RoundEngine};

pub use records::{ClientTraffic, RoundRecord};

use connection::accept_loop;
use hub::{Hub, ToHub};
use pool::BufferPool;

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
    /// Holds what the coordinator waits for, whenever that changes (a
    /// simulator brings in the next cohort of check-in clients on it).
    pub waiting: Option<tokio::sync::watch::Sender<Option<crate::engine::Waiting>>>,
    /// When set, only these client names are admitted.
    pub allowlist: Option<std::collections::HashSet<String>>,
    /// Secret for stateless-reset tokens that survive restarts (see
    /// `fedquic_net::endpoint::server_endpoint_with_reset_secret`); `None`
    /// uses a random key.
    pub reset_secret: Option<Vec<u8>>,
    /// Screens connection attempts before their handshake (Retry, cap,
    /// timeout); keep a clone to read its counters.
    pub admission: Arc<fedquic_net::admission::Admission>,
    /// Codecs for updates and models, best first.
    pub codecs: CodecPreference,
    /// Run FedBuff (asynchronous) instead of synchronous rounds.
    pub fedbuff: Option<crate::fedbuff::FedBuffSettings>,
    /// Run every round with secure aggregation (SecAgg+).
    pub secure_aggregation: Option<crate::secagg::SecAggSettings>,
    /// Differential privacy (with or without secure aggregation).
    pub privacy: Option<crate::privacy::Privacy>,
    /// Listen on this in-process network instead of a UDP socket (the
    /// simulator's `--transport mem`): still QUIC and TLS, no sockets.
    /// `listen` is then the address on that network.
    pub mem_network: Option<fedquic_net::mem::MemNetwork>,
    /// Prometheus metrics the run updates; keep a clone to serve them
    /// (`crate::metrics::MetricsEndpoint`) or read them.
    pub metrics: crate::metrics::Metrics,
    /// The handle that replaces `tls`'s CRLs (see
    /// `fedquic_net::tls::server_config_reloadable`): every session is
    /// watched, so a reload closes the connections it revokes and a
    /// connection ends when its certificate expires. `None`: neither.
    pub revocation: Option<fedquic_net::revocation::CrlReloader>,
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
            waiting: None,
            allowlist: None,
            reset_secret: None,
            admission: Arc::default(),
            codecs: CodecPreference::default(),
            fedbuff: None,
            secure_aggregation: None,
            privacy: None,
            mem_network: None,
            metrics: crate::metrics::Metrics::new(),
            revocation: None,
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

#[derive(Debug)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub final_model: Arc<Vec<f32>>,
    pub records: Vec<RoundRecord>,
    /// False when the run was stopped (Ctrl-C) before its last round.
    pub finished: bool,
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
    codecs: CodecPreference,
    run_id: String,
    /// Every update is a masked input (codec `ring32`, two extra values).
    secure_aggregation: bool,
    metrics: crate::metrics::Metrics,
    revocation: Option<fedquic_net::revocation::CrlReloader>,
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
        let in_memory =
            |e: fedquic_net::mem::MemError| ServerError::Setup(format!("in-process network: {e}"));
        let endpoint = match (&setup.mem_network, &setup.reset_secret) {
            (Some(net), Some(secret)) => fedquic_net::mem::mem_server_endpoint_with_reset_secret(
                net,
                setup.listen,
                setup.tls.clone(),
                secret,
            )
            .map_err(in_memory)?,
            (Some(net), None) => {
                fedquic_net::mem::mem_server_endpoint(net, setup.listen, setup.tls.clone())
                    .map_err(in_memory)?
            }
            (None, Some(secret)) => fedquic_net::endpoint::server_endpoint_with_reset_secret(
                setup.listen,
                setup.tls.clone(),
                secret,
            )?,
            (None, None) => {
                fedquic_net::endpoint::server_endpoint(setup.listen, setup.tls.clone())?
            }
        };
        Ok(Server { endpoint, setup })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Runs rounds until the last one is done, the run aborts, or
    /// `shutdown` completes (then it says goodbye to clients and returns).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, ServerError> {
        let setup = &self.setup;
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
        let (config, initial) = (setup.engine.clone(), setup.initial_model.clone());
        if setup.fedbuff.is_some()
            && (setup.secure_aggregation.is_some() || setup.privacy.is_some())
        {
            return Err(ServerError::Setup(
                "FedBuff folds individual updates as they arrive; it cannot run with secure \
                 aggregation or differential privacy"
                    .into(),
            ));
        }
        if let Some(settings) = &setup.secure_aggregation {
            let privacy = setup.privacy.clone();
            let engine = match &setup.resume {
                Some(state) => crate::secagg::SecAggEngine::resume(
                    config,
                    settings.clone(),
                    privacy,
                    initial,
                    state,
                    &setup.strategy_state,
                ),
                None => {
                    crate::secagg::SecAggEngine::new(config, settings.clone(), privacy, initial)
                }
            }
            .map_err(ServerError::Setup)?;
            return self.run_with(Box::new(engine), shutdown).await;
        }
        if let Some(settings) = &setup.fedbuff {
            let now = std::time::Instant::now();
            let fedbuff = match &setup.resume {
                Some(state) => crate::fedbuff::FedBuff::resume(
                    config,
                    settings.clone(),
                    initial,
                    state,
                    &setup.strategy_state,
                    now,
                ),
                None => crate::fedbuff::FedBuff::new(config, settings.clone(), initial, now),
            }
            .map_err(ServerError::Setup)?;
            return self.run_with(Box::new(fedbuff), shutdown).await;
        }
        let engine = match &setup.resume {
            Some(state) => {
                let mut engine = RoundEngine::resume(config, initial, state.clone());
                if let Some(privacy) = &setup.privacy {
                    engine.set_privacy(privacy.clone());
                }
                engine
                    .restore_strategy(&setup.strategy_state)
                    .map_err(|e| ServerError::Setup(format!("checkpointed strategy: {e}")))?;
                engine
            }
            None => {
                let mut engine = RoundEngine::new(config, initial, 0);
                if let Some(privacy) = &setup.privacy {
                    engine.set_privacy(privacy.clone());
                }
                engine
            }
        };
        let mut engine = engine;
        engine.set_run_id(&setup.run_id);
        self.run_with(Box::new(engine), shutdown).await
    }

    /// Runs the shell around any [`Coordinator`] (the default is the
    /// [`RoundEngine`] that [`Server::run`] builds from the setup). The
    /// coordinator's model must match the setup's layout.
    pub async fn run_with(
        self,
        coordinator: Box<dyn Coordinator>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, ServerError> {
        let Server { endpoint, setup } = self;
        setup.codecs.validate().map_err(ServerError::Setup)?;
        fedquic_protocol::validate_run_id(&setup.run_id)
            .map_err(|e| ServerError::Setup(e.to_string()))?;
        if coordinator.global_model().len() != setup.initial_model.len() {
            return Err(ServerError::Setup(format!(
                "the coordinator's model has {} values, the layout {}",
                coordinator.global_model().len(),
                setup.initial_model.len()
            )));
        }
        let (hub_tx, hub_rx) = mpsc::unbounded_channel();
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let values = setup.initial_model.len();
        // SCAFFOLD's updates carry Delta c after Delta y: twice the values.
        let secure_aggregation = setup.secure_aggregation.is_some();
        let (update_layout, update_values) = match setup.engine.strategy.carries_control_variate() {
            _ if secure_aggregation => (
                fedquic_protocol::with_secagg_layout(&setup.layout),
                fedquic_protocol::SecAggTask::vector_len(values),
            ),
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
            codecs: setup.codecs.clone(),
            secure_aggregation,
            run_id: setup.run_id.clone(),
            metrics: setup.metrics.clone(),
            revocation: setup.revocation.clone(),
        });
        setup.metrics.watch_admission(Arc::clone(&setup.admission));
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
        let hub = Hub::new(coordinator, setup, Arc::clone(&shared), epoch_tx)?;
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
        // The hub stopped counting sessions when it returned; none is left.
        shared.metrics.set_connected_clients(0);
        result
    }
}
