//! One federated run, aggregator and clients in this process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_aggregator::server::{CentralEval, RoundRecord, Server, ServerSetup};
use fedquic_aggregator::{AggregatorConfig, EngineConfig};
use fedquic_client::{Backoff, ClientOptions, LocalTrainer, run_client};
use fedquic_net::tls::TransportSettings;
use fedquic_protocol::FitInstructions;
use fedquic_train::backend::{BackendKind, Engine};
use fedquic_train::layout::ParamLayout;
use fedquic_train::{DataSpec, Model, ModelSpec, PartitionScheme, partition};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

use crate::pki::{SERVER_NAME, SimPki};

#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub clients: usize,
    pub fraction: f64,
    pub rounds: u64,
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// FedProx proximal term (0: FedAvg).
    pub proximal_mu: f32,
    /// Client optimizer settings.
    pub optimizer: fedquic_aggregator::config::FitConfig,
    pub model: String,
    pub data: String,
    pub partition: String,
    pub seed: u64,
    /// Clients training at once (default: the number of cores).
    pub threads: usize,
    /// Training backend of every client: `cpu`, `wgpu` or `auto` (see
    /// `fedquic_train::backend::BackendKind`). With wgpu, all clients share one device
    /// and its queue (wgpu synchronises submissions); each client records its own
    /// command buffers.
    pub backend: String,
    /// Fraction of clients asked to evaluate each round on their local test share.
    pub fraction_evaluate: f64,
    pub round_deadline_secs: f64,
    pub out: Option<PathBuf>,
    /// The server-side strategy and its parameters.
    pub strategy: fedquic_aggregator::strategy::StrategyConfig,
    /// Write the final global model here as ONNX.
    pub export_onnx: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            clients: 10,
            fraction: 1.0,
            rounds: 5,
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.05,
            proximal_mu: 0.0,
            optimizer: fedquic_aggregator::config::FitConfig::default(),
            model: "mlp:784-200-200-10".into(),
            data: "synthetic".into(),
            partition: "iid".into(),
            seed: 0,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            backend: "cpu".into(),
            fraction_evaluate: 0.0,
            round_deadline_secs: 600.0,
            out: None,
            strategy: Default::default(),
            export_onnx: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SimResult {
    pub config: SimConfig,
    pub rounds: Vec<RoundRecord>,
    pub final_test_accuracy: Option<f64>,
    pub final_test_loss: Option<f64>,
    pub seconds: f64,
    pub setup_seconds: f64,
}

/// Runs the simulation. `on_round` sees each round's record as it lands
/// (progress display); `on_ready` is called once all clients are set up.
pub async fn simulate(
    config: SimConfig,
    mut on_round: impl FnMut(&RoundRecord),
) -> anyhow::Result<SimResult> {
    use anyhow::{Context, bail};
    let started = Instant::now();
    if config.clients == 0 {
        bail!("--clients must be at least 1");
    }
    // A spec string or `onnx:FILE` (whose canonical `net:` spec travels to clients).
    let source = fedquic_train::onnx::ModelSource::parse(&config.model)?;
    let layout: ParamLayout = source.layout.clone();
    let Some(model_spec) = layout.model_spec().cloned() else {
        bail!(
            "the simulator trains real models: '{}' is not trainable",
            config.model
        );
    };
    let data_spec: DataSpec = config.data.parse()?;
    let scheme: PartitionScheme = config.partition.parse()?;
    let (train, test) = data_spec
        .load()
        .with_context(|| format!("loading {}", config.data))?;
    check_model_fits(&model_spec, train.dim, train.classes)?;
    let parts = partition(&train.labels, config.clients, &scheme, config.seed)?;
    let test_parts = partition(
        &test.labels,
        config.clients.min(test.len()),
        &PartitionScheme::Iid,
        config.seed,
    )?;
    let (train, test) = (Arc::new(train), Arc::new(test));

    let mut aggregator = AggregatorConfig::default();
    aggregator.rounds.fraction_fit = config.fraction;
    aggregator.rounds.count = config.rounds;
    aggregator.fit = fedquic_aggregator::config::FitConfig {
        epochs: config.epochs,
        batch_size: config.batch_size,
        learning_rate: config.learning_rate,
        proximal_mu: config.proximal_mu,
        ..config.optimizer.clone()
    };
    aggregator.evaluate.fraction = config.fraction_evaluate;
    aggregator.strategy = config.strategy.clone();
    aggregator.validate()?;
    let engine = EngineConfig {
        min_fit_clients: 1,
        max_fit_clients: config.clients,
        // Every client connects before round 1, so selection is over all of them.
        min_available_clients: config.clients,
        round_deadline: Duration::from_secs_f64(config.round_deadline_secs),
        fit: FitInstructions {
            seed: config.seed,
            ..aggregator.fit_instructions()
        },
        seed: config.seed,
        ..aggregator.engine_config()
    };

    let pki = SimPki::new(
        TransportSettings::aggregator(),
        TransportSettings::default(),
    )?;
    let (records_tx, mut records_rx) = mpsc::unbounded_channel();
    let setup = ServerSetup {
        central_eval: Some(CentralEval {
            model: Model::try_new(model_spec, 0)?,
            test: Arc::clone(&test),
        }),
        metrics_path: config.out.as_ref().map(|d| d.join("metrics.jsonl")),
        max_clients: config.clients + 16,
        max_inflight_updates: config.threads.max(2) * 2,
        handshake_timeout: Duration::from_secs(60),
        records: Some(records_tx),
        ..ServerSetup::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            pki.server.clone(),
            engine,
            &layout,
            source.initial_parameters(config.seed)?,
        )
    };
    if let Some(out) = &config.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    }
    let server = Server::bind(setup)?;
    let addr = server.local_addr()?;
    let server_task = tokio::spawn(server.run(std::future::pending()));

    let backend: BackendKind = config.backend.parse()?;
    let engine = Engine::select(backend).with_context(|| format!("starting backend {backend}"))?;
    tracing::info!(requested = %backend, backend = engine.name(), device = %engine.describe(), "training backend");
    let slots = Arc::new(Semaphore::new(config.threads.max(1)));
    let endpoint = fedquic_net::endpoint::client_endpoint_for(addr, pki.client(1)?.1)?;
    let mut clients = Vec::with_capacity(config.clients);
    let mut test_parts = test_parts.into_iter();
    for (i, indices) in parts.into_iter().enumerate() {
        let (_, tls) = pki.client(i + 1)?;
        let opts = ClientOptions {
            server: addr,
            server_name: SERVER_NAME.into(),
            tls,
            backoff: Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(2),
                config.seed ^ i as u64,
            ),
            max_attempts: Some(20),
            connect_timeout: Duration::from_secs(30),
            training_slots: Some(Arc::clone(&slots)),
            endpoint: Some(endpoint.clone()),
            limits: Default::default(),
        };
        let trainer = LocalTrainer::new(
            Arc::clone(&train),
            indices,
            Arc::clone(&test),
            test_parts.next().unwrap_or_default(),
        )
        .with_engine(engine.share());
        clients.push(tokio::spawn(run_client(opts, trainer)));
    }
    let setup_seconds = started.elapsed().as_secs_f64();

    let server_task = async {
        let summary = server_task.await.context("aggregator task failed")??;
        anyhow::Ok(summary)
    };
    tokio::pin!(server_task);
    let summary = loop {
        tokio::select! {
            Some(record) = records_rx.recv() => on_round(&record),
            summary = &mut server_task => break summary?,
        }
    };
    while let Ok(record) = records_rx.try_recv() {
        on_round(&record);
    }
    for (i, c) in clients.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), c).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(client = i + 1, error = %e, "client ended with an error")
            }
            Ok(Err(e)) => tracing::warn!(client = i + 1, error = %e, "client task failed"),
            Err(_) => tracing::warn!(client = i + 1, "client did not finish"),
        }
    }
    endpoint.close(0u32.into(), b"done");
    if let Some(path) = &config.export_onnx {
        let bytes = source.export(&summary.final_model)?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let last = summary.records.last();
    let result = SimResult {
        final_test_accuracy: last.and_then(|r| r.test_accuracy),
        final_test_loss: last.and_then(|r| r.test_loss),
        rounds: summary.records.clone(),
        seconds: started.elapsed().as_secs_f64(),
        setup_seconds,
        config,
    };
    if let Some(out) = &result.config.out {
        crate::report::write_outputs(out, &result)?;
    }
    Ok(result)
}

fn check_model_fits(spec: &ModelSpec, dim: usize, classes: usize) -> anyhow::Result<()> {
    if spec.input_dim() != dim {
        anyhow::bail!(
            "model {spec} takes {} inputs but the data has {dim} features",
            spec.input_dim()
        );
    }
    if spec.num_classes() < classes {
        anyhow::bail!(
            "model {spec} has {} outputs but the data has {classes} classes",
            spec.num_classes()
        );
    }
    Ok(())
}
