//! One federated run, aggregator and clients in this process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_aggregator::engine::fraction_of;
use fedquic_aggregator::plot::PlotReport;
use fedquic_aggregator::server::{
    CentralEval, RoundRecord, RunSummary, Server, ServerError, ServerSetup,
};
use fedquic_aggregator::{AggregatorConfig, EngineConfig, Waiting};
use fedquic_client::{
    Backoff, ClientOptions, ClientReport, LocalTrainer, StateStore, run_client,
    run_client_with_store,
};
use fedquic_net::tls::TransportSettings;
use fedquic_protocol::FitInstructions;
use fedquic_train::backend::{BackendKind, Engine};
use fedquic_train::layout::ParamLayout;
use fedquic_train::{DataSpec, Model, ModelSpec, PartitionScheme, partition};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::faults::{
    AttackKind, ByzantineSpec, Collusion, FaultConfig, FaultContext, FaultEvent, FaultLog,
    FaultyTrainer, KillSender, RoundFinder, Slots,
};
use crate::pki::{SERVER_NAME, SimPki};
use crate::population::{AUTO_SELECTED_ABOVE, ClientData, Cohorts, StateDirs};
use crate::relay::{LinkSpec, Relay};

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
    /// Injected dropouts, stragglers and Byzantine clients.
    pub faults: FaultConfig,
    /// Shape every client's link through a UDP relay (latency, rate).
    pub link: Option<LinkSpec>,
    /// The aggregator clips updates longer than this multiple of the previous
    /// round's median norm (its default defence); 0 turns that off.
    pub max_norm_multiple: f64,
    /// Update and model codecs.
    pub codecs: SimCodecs,
    /// Asynchronous FedBuff instead of synchronous rounds (`rounds` is then
    /// the number of server steps, `round_deadline_secs` a task's deadline).
    pub fedbuff: Option<fedquic_aggregator::FedBuffSettings>,
    /// Secure aggregation (the aggregator's `[secure_aggregation]`).
    pub secure_aggregation: Option<fedquic_aggregator::config::SecureAggregationConfig>,
    /// Differential privacy (the aggregator's `[differential_privacy]`; its
    /// population defaults to the number of clients).
    pub privacy: Option<fedquic_aggregator::config::DifferentialPrivacyConfig>,
    /// `udp` (QUIC over kernel UDP on 127.0.0.1) or `mem` (QUIC over an
    /// in-process network, `fedquic_net::mem`: no sockets; `link` is then
    /// applied by that network to each client's own endpoint).
    pub transport: String,
    /// `all` (every client connects for the whole run), `selected` (only a
    /// round's cohort exists, checks in for one task and leaves: see
    /// [`crate::population`]) or `auto` (`selected` for per-client data or
    /// more than [`crate::population::AUTO_SELECTED_ABOVE`] clients).
    pub materialize: String,
}

/// Codecs in a simulation: the aggregator's lists, and what clients offer.
#[derive(Clone, Debug, Serialize)]
pub struct SimCodecs {
    /// The aggregator's update codecs, best first (comma-separated).
    pub uplink: String,
    /// The aggregator's model codecs, best first (comma-separated).
    pub downlink: String,
    /// Semicolon-separated offers, client i making offer i mod N; `None`:
    /// every client offers every codec.
    pub client_offers: Option<String>,
    /// Clients keep what a lossy codec dropped for their next update.
    pub error_feedback: bool,
}

impl Default for SimCodecs {
    fn default() -> Self {
        SimCodecs {
            uplink: "f32".into(),
            downlink: "f32".into(),
            client_offers: None,
            error_feedback: true,
        }
    }
}

impl SimCodecs {
    /// The aggregator's `[codecs]` section.
    fn aggregator_config(&self) -> fedquic_aggregator::config::CodecsConfig {
        let list = |s: &str| {
            s.split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        };
        fedquic_aggregator::config::CodecsConfig {
            uplink: list(&self.uplink),
            downlink: list(&self.downlink),
        }
    }

    /// Each client's offer, cycled over the clients.
    fn offers(&self) -> anyhow::Result<Vec<Vec<fedquic_protocol::Codec>>> {
        match &self.client_offers {
            None => Ok(vec![fedquic_protocol::all_codecs()]),
            Some(groups) => groups
                .split(';')
                .map(|g| {
                    fedquic_protocol::parse_codec_list(g)
                        .map_err(|e| anyhow::anyhow!("--client-codecs: {e}"))
                })
                .collect(),
        }
    }
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
            faults: FaultConfig::default(),
            link: None,
            max_norm_multiple: 10.0,
            codecs: SimCodecs::default(),
            fedbuff: None,
            secure_aggregation: None,
            privacy: None,
            transport: "udp".into(),
            materialize: "auto".into(),
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
    /// Every fault injected, sorted by round and client.
    pub faults: Vec<FaultEvent>,
    /// Whether only selected clients were materialised, and how many
    /// client sessions were created over the run.
    pub materialized_on_selection: bool,
    pub clients_materialized: u64,
    /// The plots `--out` wrote or skipped (not part of results.json).
    #[serde(skip)]
    pub plots: PlotReport,
}

/// Most training threads (`--threads`) a simulation takes.
pub const MAX_SIM_THREADS: usize = 1024;
/// Most virtual clients (`--clients`) a simulation takes.
pub const MAX_SIM_CLIENTS: usize = 1 << 32;

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
    config.faults.validate()?;
    let max_deadline = fedquic_aggregator::config::MAX_DURATION_SECS;
    if !(config.round_deadline_secs.is_finite()
        && config.round_deadline_secs > 0.0
        && config.round_deadline_secs <= max_deadline)
    {
        bail!("--round-deadline must be a positive number of seconds, at most {max_deadline}");
    }
    if !(1..=MAX_SIM_THREADS).contains(&config.threads) {
        bail!("--threads must be 1..={MAX_SIM_THREADS}");
    }
    if config.clients > MAX_SIM_CLIENTS {
        bail!("--clients must be at most {MAX_SIM_CLIENTS}");
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
    let on_selection = match config.materialize.as_str() {
        "all" => false,
        "selected" => true,
        "auto" => data_spec.per_client().is_some() || config.clients > AUTO_SELECTED_ABOVE,
        other => bail!("--materialize must be auto, all or selected, not {other:?}"),
    };
    if on_selection {
        check_on_selection(&config)?;
    } else if data_spec.per_client().is_some() {
        bail!(
            "--data {}: per-client data is drawn when a client is selected; use \
             --materialize selected (or auto)",
            config.data
        );
    }
    let (data, test, test_parts) = match data_spec.per_client() {
        Some(recipe) => {
            let test = recipe.test_set();
            check_model_fits(&model_spec, test.dim, test.classes)?;
            let data = ClientData::PerClient {
                recipe: recipe.clone(),
                scheme: scheme.clone(),
            };
            (data, test, Vec::new())
        }
        None => {
            let (train, test) = data_spec
                .load()
                .with_context(|| format!("loading {}", config.data))?;
            check_model_fits(&model_spec, train.dim, train.classes)?;
            if config.clients > train.len() {
                bail!(
                    "{} clients but --data {} has {} training examples: every client needs at \
                     least one; for populations larger than a dataset use \
                     --data synthetic-per-client:N (N examples drawn for each client)",
                    config.clients,
                    config.data,
                    train.len()
                );
            }
            let parts = partition(&train.labels, config.clients, &scheme, config.seed)?;
            let test_parts = match on_selection {
                // Federated evaluation is refused: clients keep no test share.
                true => Vec::new(),
                false => partition(
                    &test.labels,
                    config.clients.min(test.len()),
                    &PartitionScheme::Iid,
                    config.seed,
                )?,
            };
            let data = ClientData::Shared {
                train: Arc::new(train),
                parts,
            };
            (data, test, test_parts)
        }
    };
    let test = Arc::new(test);

    let mut aggregator = AggregatorConfig::default();
    aggregator.rounds.fraction_fit = config.fraction;
    aggregator.rounds.one_task_per_connection = on_selection;
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
    aggregator.updates.max_update_norm_median_multiple = config.max_norm_multiple;
    aggregator.codecs = config.codecs.aggregator_config();
    if let Some(f) = &config.fedbuff {
        aggregator.fedbuff = fedquic_aggregator::config::FedBuffConfig {
            enabled: true,
            concurrency: f.concurrency,
            buffer_size: f.buffer_size,
            max_staleness: f.max_staleness,
            staleness: f.staleness.to_string(),
            checkpoint_every: f.checkpoint_every,
        };
    }
    if let Some(s) = &config.secure_aggregation {
        aggregator.secure_aggregation = fedquic_aggregator::config::SecureAggregationConfig {
            enabled: true,
            ..s.clone()
        };
    }
    if let Some(p) = &config.privacy {
        aggregator.differential_privacy = fedquic_aggregator::config::DifferentialPrivacyConfig {
            enabled: true,
            population: match p.population {
                0 => config.clients,
                n => n,
            },
            ..p.clone()
        };
    }
    aggregator
        .validate()
        .map_err(|e| anyhow::anyhow!(in_flag_names(&e.to_string())))?;
    let offers = config.codecs.offers()?;
    // A refused client would leave the run waiting for it: check every offer
    // against the aggregator's lists before anyone connects.
    let preference = aggregator
        .codecs
        .preference()
        .map_err(|e| anyhow::anyhow!(in_flag_names(&e)))?;
    for offer in &offers {
        for (flag, allowed) in [
            ("--codec", &preference.uplink),
            ("--downlink-codec", &preference.downlink),
        ] {
            if fedquic_protocol::negotiate_codec(allowed, offer).is_none() {
                let list = |l: &[fedquic_protocol::Codec]| {
                    l.iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                bail!(
                    "--client-codecs: the offer \"{}\" has no codec that {flag} ({}) allows",
                    list(offer),
                    list(allowed)
                );
            }
        }
    }
    // Krum, Multi-Krum and Bulyan need a minimum of updates each round.
    let strategy = config.strategy.build(layout.num_params()).ok();
    let min_fit_clients = strategy
        .as_ref()
        .and_then(|s| s.robust().map(|r| r.min_updates()))
        .unwrap_or(1);
    // What clients keep between selections: SCAFFOLD's control variate, or
    // the residual of a lossy uplink codec's error feedback.
    let clients_keep_state = strategy
        .as_ref()
        .is_some_and(|s| s.control_variate().is_some())
        || (config.codecs.error_feedback && preference.uplink.iter().any(|c| !c.is_lossless()));
    // A cohort is what the aggregator would have selected from everyone.
    let per_round = fraction_of(config.fraction, config.clients)
        .max(min_fit_clients)
        .clamp(1, config.clients);
    let engine = EngineConfig {
        min_fit_clients,
        max_fit_clients: config.clients,
        // Every client connects before round 1, so selection is over all of
        // them; on selection, the aggregator takes the cohort that checked in.
        min_available_clients: match on_selection {
            true => per_round,
            false => config.clients,
        },
        fraction_fit: match on_selection {
            true => 1.0,
            false => config.fraction,
        },
        round_deadline: Duration::from_secs_f64(config.round_deadline_secs),
        fit: FitInstructions {
            seed: config.seed,
            ..aggregator.fit_instructions()
        },
        seed: config.seed,
        ..aggregator.engine_config()
    };

    let (mem_network, listen) = match config.transport.as_str() {
        "udp" => (None, SocketAddr::from(([127, 0, 0, 1], 0))),
        "mem" => (
            Some(fedquic_net::mem::MemNetwork::new(config.seed)),
            SocketAddr::from(([10, 255, 255, 254], 4433)),
        ),
        other => bail!("--transport must be udp or mem, not {other:?}"),
    };
    // Over real UDP without a shaped link, every client reaches the
    // aggregator over loopback directly. A link relay carries only Ethernet's
    // datagram size, and the in-process network has its own.
    let direct_loopback = mem_network.is_none() && config.link.is_none();
    let settings = |base: TransportSettings| match direct_loopback {
        true => base.direct_loopback(),
        false => base,
    };
    let pki = SimPki::new(
        settings(TransportSettings::aggregator()),
        settings(TransportSettings::default()),
    )?;
    let (records_tx, mut records_rx) = mpsc::unbounded_channel();
    let (waiting_tx, waiting_rx) = tokio::sync::watch::channel(None);
    let setup = ServerSetup {
        waiting: Some(waiting_tx),
        central_eval: Some(CentralEval {
            model: Model::try_new(model_spec, 0)?,
            test: Arc::clone(&test),
        }),
        metrics_path: config.out.as_ref().map(|d| d.join("metrics.jsonl")),
        max_clients: config.clients + 16,
        max_inflight_updates: config.threads.max(2) * 2,
        handshake_timeout: Duration::from_secs(60),
        records: Some(records_tx),
        codecs: preference.clone(),
        fedbuff: aggregator
            .fedbuff
            .settings()
            .map_err(|e| anyhow::anyhow!(in_flag_names(&e)))?,
        secure_aggregation: aggregator
            .secure_aggregation
            .settings(&aggregator.rounds, &aggregator.differential_privacy)
            .map_err(|e| anyhow::anyhow!(in_flag_names(&e)))?,
        // Reproducible runs: the aggregator's noise follows the seed, as the
        // clients' does (a simulation has nothing to hide).
        privacy: aggregator
            .differential_privacy
            .privacy()
            .map_err(|e| anyhow::anyhow!(in_flag_names(&e)))?
            .map(|p| p.with_reproducible_noise(config.seed)),
        mem_network: mem_network.clone(),
        ..ServerSetup::new(
            listen,
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
    let endpoint = match &mem_network {
        // One endpoint per client on the in-process network (made below).
        Some(_) => None,
        None => Some(fedquic_net::endpoint::client_endpoint_for(
            addr,
            pki.client(1)?.1,
        )?),
    };
    let fault_log = FaultLog::default();
    let factory = Arc::new(ClientFactory {
        pki,
        addr,
        mem_network,
        shared_endpoint: endpoint.clone(),
        link: config.link,
        seed: config.seed,
        offers,
        error_feedback: config.codecs.error_feedback,
        slots: Arc::clone(&slots),
        one_task: on_selection,
    });
    let summary;
    let setup_seconds;
    let mut materialized = 0u64;
    let mut relays: Vec<Relay> = Vec::new();
    if on_selection {
        setup_seconds = started.elapsed().as_secs_f64();
        let run = CohortRun {
            factory: Arc::clone(&factory),
            data: Arc::new(data),
            test: Arc::clone(&test),
            engine: engine.share(),
            cohorts: Cohorts {
                population: config.clients,
                per_round,
                seed: config.seed,
            },
            state: clients_keep_state
                .then(|| StateDirs::new(config.out.as_deref()))
                .transpose()?,
            generation: Arc::new(Semaphore::new(config.threads.max(1))),
        };
        let (s, m) = run
            .drive(server_task, waiting_rx, &mut records_rx, &mut on_round)
            .await?;
        (summary, materialized) = (s, m);
    } else {
        let ClientData::Shared { train, parts } = data else {
            bail!("per-client data needs --materialize selected");
        };
        let faults = if config.faults.is_active() {
            Some(fault_context(
                &config,
                &layout,
                &parts,
                &train,
                &test,
                &engine,
                fault_log.clone(),
            )?)
        } else {
            None
        };
        let flipped = match config.faults.byzantine {
            Some(ByzantineSpec {
                kind: AttackKind::LabelFlip,
                ..
            }) => Some(Arc::new(crate::faults::label_flipped(&train))),
            _ => None,
        };
        let mut clients = Vec::with_capacity(config.clients);
        let mut test_parts = test_parts.into_iter();
        for (i, indices) in parts.into_iter().enumerate() {
            let server = match config.link {
                Some(spec) if factory.mem_network.is_none() => {
                    let relay = crate::relay::spawn(addr, spec)
                        .await
                        .context("starting a link relay")?;
                    let relay_addr = relay.addr;
                    relays.push(relay);
                    relay_addr
                }
                _ => addr,
            };
            // A fault-injecting trainer takes its slot itself, for training only.
            let opts = factory.options(i, server, faults.is_none())?;
            materialized += 1;
            let test_indices = test_parts.next().unwrap_or_default();
            match &faults {
                None => {
                    let trainer = LocalTrainer::new(
                        Arc::clone(&train),
                        indices,
                        Arc::clone(&test),
                        test_indices,
                    )
                    .with_engine(engine.share());
                    clients.push(tokio::spawn(async move {
                        run_client(opts, trainer).await.map(|_| ())?;
                        anyhow::Ok(())
                    }));
                }
                Some(ctx) => {
                    let data = match &flipped {
                        Some(f) if ctx.byzantine.binary_search(&i).is_ok() => Arc::clone(f),
                        _ => Arc::clone(&train),
                    };
                    let (ctx, test, engine) = (Arc::clone(ctx), Arc::clone(&test), engine.share());
                    let make = move |kill: Option<KillSender>| {
                        let inner = LocalTrainer::new(
                            Arc::clone(&data),
                            indices.clone(),
                            Arc::clone(&test),
                            test_indices.clone(),
                        )
                        .with_engine(engine.share());
                        FaultyTrainer::new(inner, i, Arc::clone(&ctx), kill)
                    };
                    clients.push(tokio::spawn(supervise(opts, make)));
                }
            }
        }
        setup_seconds = started.elapsed().as_secs_f64();
        summary = collect_rounds(server_task, &mut records_rx, &mut on_round).await?;
        close_after_goodbyes(endpoint.as_ref());
        // The clients get 10 s in all, not 10 s each.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for (i, c) in clients.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, c).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) if stopped_at_the_end(&e) => {
                    tracing::debug!(client = i + 1, "client stopped at the end of the run")
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(client = i + 1, error = %e, "client ended with an error")
                }
                Ok(Err(e)) => tracing::warn!(client = i + 1, error = %e, "client task failed"),
                Err(_) => tracing::warn!(client = i + 1, "client did not finish"),
            }
        }
    }
    if let Some(endpoint) = &endpoint {
        endpoint.close(0u32.into(), b"done");
    }
    drop(relays);
    if let Some(path) = &config.export_onnx {
        let bytes = source.export(&summary.final_model)?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let last = summary.records.last();
    let mut result = SimResult {
        final_test_accuracy: last.and_then(|r| r.test_accuracy),
        final_test_loss: last.and_then(|r| r.test_loss),
        rounds: summary.records.clone(),
        seconds: started.elapsed().as_secs_f64(),
        setup_seconds,
        faults: fault_log.events(),
        materialized_on_selection: on_selection,
        clients_materialized: materialized,
        plots: PlotReport::default(),
        config,
    };
    if let Some(out) = &result.config.out {
        result.plots = crate::report::write_outputs(out, &result)?;
    }
    Ok(result)
}

/// The aggregator's config keys that the simulator sets from a flag, and
/// the flag: its errors name what the user typed. Longer keys first (a
/// section name is a prefix of its keys).
/// How long after the last round the clients' goodbyes have to arrive
/// before the shared client endpoint closes.
const GOODBYE_GRACE: Duration = Duration::from_secs(1);

/// A client that ended because the run closed its endpoint (it was busy
/// when the goodbye came), not because something failed.
fn stopped_at_the_end(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<fedquic_client::ClientError>())
        .any(|e| matches!(e, fedquic_client::ClientError::EndpointClosed))
}

const FLAG_NAMES: &[(&str, &str)] = &[
    (
        "differential_privacy.adaptive_clipping",
        "--dp-adaptive-clip",
    ),
    ("differential_privacy.noise_multiplier", "--dp-noise"),
    ("differential_privacy.epsilon_budget", "--epsilon-budget"),
    ("differential_privacy.clip_norm", "--dp-clip"),
    ("differential_privacy.sampling", "--dp-sampling"),
    ("differential_privacy.delta", "--dp-delta"),
    ("differential_privacy.mode", "--dp"),
    ("[differential_privacy]", "--dp"),
    ("secure_aggregation.threshold", "--secagg-threshold"),
    ("secure_aggregation.clip_norm", "--secagg-clip"),
    ("secure_aggregation.degree", "--secagg-degree"),
    ("[secure_aggregation]", "--secagg"),
    ("fedbuff.max_staleness", "--max-staleness"),
    ("fedbuff.buffer_size", "--buffer-size"),
    ("fedbuff.concurrency", "--concurrency"),
    ("fedbuff.staleness", "--staleness"),
    ("[fedbuff]", "--fedbuff"),
    ("evaluate.fraction", "--fraction-evaluate"),
    ("rounds.fraction_fit", "--fraction"),
    ("rounds.count", "--rounds"),
    ("fit.learning_rate", "--lr"),
    ("fit.batch_size", "--batch-size"),
    ("fit.epochs", "--epochs"),
    ("fit.proximal_mu", "--mu"),
    ("codecs.uplink", "--codec"),
    ("codecs.downlink", "--downlink-codec"),
    ("strategy.name", "--strategy"),
    ("[strategy]", "--strategy"),
];

/// `message` with the aggregator's config keys replaced by the simulator's
/// flags.
fn in_flag_names(message: &str) -> String {
    FLAG_NAMES
        .iter()
        .fold(message.to_string(), |m, (key, flag)| m.replace(key, flag))
}

/// Waits for the aggregator to finish, passing each round's record on.
async fn collect_rounds(
    server_task: tokio::task::JoinHandle<Result<RunSummary, ServerError>>,
    records_rx: &mut mpsc::UnboundedReceiver<RoundRecord>,
    on_round: &mut impl FnMut(&RoundRecord),
) -> anyhow::Result<RunSummary> {
    let server_task = server_summary(server_task);
    tokio::pin!(server_task);
    let summary = loop {
        tokio::select! {
            Some(record) = records_rx.recv() => on_round(&record),
            summary = &mut server_task => break summary?,
        }
    };
    drain_records(records_rx, on_round);
    Ok(summary)
}

/// The aggregator task's summary; its failure or panic as one error.
async fn server_summary(
    server_task: tokio::task::JoinHandle<Result<RunSummary, ServerError>>,
) -> anyhow::Result<RunSummary> {
    use anyhow::Context;
    Ok(server_task.await.context("aggregator task failed")??)
}

/// Hands on the rounds recorded after the aggregator finished.
fn drain_records(
    records_rx: &mut mpsc::UnboundedReceiver<RoundRecord>,
    on_round: &mut impl FnMut(&RoundRecord),
) {
    while let Ok(record) = records_rx.try_recv() {
        on_round(&record);
    }
}

/// Clients still busy with a task the run no longer needs (a straggler's
/// wait, a FedBuff task in flight at the last step) missed the goodbye and
/// would reconnect to an aggregator that is gone until their connect
/// timeout. Once the goodbyes are delivered ([`GOODBYE_GRACE`]), the shared
/// client endpoint closes: those clients end at their next connection
/// attempt with `EndpointClosed`.
fn close_after_goodbyes(endpoint: Option<&quinn::Endpoint>) {
    if let Some(endpoint) = endpoint.cloned() {
        tokio::spawn(async move {
            tokio::time::sleep(GOODBYE_GRACE).await;
            endpoint.close(0u32.into(), b"run over");
        });
    }
}

/// Builds what every simulated client shares: its certificate, endpoint and
/// options.
struct ClientFactory {
    pki: SimPki,
    addr: SocketAddr,
    mem_network: Option<fedquic_net::mem::MemNetwork>,
    /// The one UDP endpoint all clients share (kernel UDP transport).
    shared_endpoint: Option<quinn::Endpoint>,
    link: Option<LinkSpec>,
    seed: u64,
    offers: Vec<Vec<fedquic_protocol::Codec>>,
    error_feedback: bool,
    slots: Arc<Semaphore>,
    /// Check-in clients leave after one task.
    one_task: bool,
}

impl ClientFactory {
    /// Client `i`'s options (0-based; its certificate names client `i + 1`),
    /// reaching the aggregator at `server`. `take_slot`: the client takes a
    /// training slot itself (a fault-injecting trainer takes its own).
    fn options(
        &self,
        i: usize,
        server: SocketAddr,
        take_slot: bool,
    ) -> anyhow::Result<ClientOptions> {
        use anyhow::Context;
        let (_, tls) = self.pki.client(i + 1)?;
        let endpoint = match (&self.mem_network, &self.shared_endpoint) {
            (Some(net), _) => {
                let link = self.link.map(|spec| fedquic_net::mem::LinkShape {
                    // The network adds both ends' latencies: the server's is 0.
                    latency: Duration::from_secs_f64(spec.latency_ms / 1e3),
                    bandwidth_bytes_per_sec: Some((spec.mbps * 1e6 / 8.0) as u64),
                    loss: 0.0,
                });
                fedquic_net::mem::mem_client_endpoint(net, link, tls.clone())
                    .context("a client endpoint on the in-process network")?
            }
            (None, Some(shared)) => shared.clone(),
            (None, None) => anyhow::bail!("no client endpoint"),
        };
        Ok(ClientOptions {
            server,
            server_name: SERVER_NAME.into(),
            tls,
            backoff: Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(2),
                self.seed ^ i as u64,
            ),
            max_attempts: Some(20),
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: fedquic_client::DEFAULT_HANDSHAKE_TIMEOUT,
            training_slots: take_slot.then(|| Arc::clone(&self.slots)),
            endpoint: Some(endpoint),
            limits: Default::default(),
            codecs: fedquic_client::CodecOptions {
                offer: self.offers[i % self.offers.len()].clone(),
                error_feedback: self.error_feedback,
            },
            // Reproducible runs: masks cancel whatever their seed, and the
            // DP noise is then part of the run's seed.
            privacy_seed: Some(fedquic_aggregator::engine::mix(self.seed, i as u64, 0x5ec)),
            max_fit_tasks: self.one_task.then_some(1),
        })
    }
}

/// A run whose clients exist only while selected (see [`crate::population`]).
struct CohortRun {
    factory: Arc<ClientFactory>,
    data: Arc<ClientData>,
    test: Arc<fedquic_train::Dataset>,
    engine: Engine,
    cohorts: Cohorts,
    /// Per-client state directories, when the strategy or codec keeps state.
    state: Option<StateDirs>,
    /// Bounds how many clients draw their data at once.
    generation: Arc<Semaphore>,
}

impl CohortRun {
    /// Brings in a cohort whenever the aggregator waits for a round (or a
    /// retry) it has not had one for, until the run ends. Returns the run's
    /// summary and how many clients were materialised.
    async fn drive(
        self,
        server_task: tokio::task::JoinHandle<Result<RunSummary, ServerError>>,
        mut waiting: tokio::sync::watch::Receiver<Option<Waiting>>,
        records_rx: &mut mpsc::UnboundedReceiver<RoundRecord>,
        on_round: &mut impl FnMut(&RoundRecord),
    ) -> anyhow::Result<(RunSummary, u64)> {
        let stop_server = server_task.abort_handle();
        let server_task = server_summary(server_task);
        tokio::pin!(server_task);
        let mut live: JoinSet<(usize, anyhow::Result<ClientReport>)> = JoinSet::new();
        let mut served: Option<(u64, u32)> = None;
        let mut materialized = 0u64;
        let summary = loop {
            tokio::select! {
                Some(record) = records_rx.recv() => on_round(&record),
                Ok(()) = waiting.changed() => {
                    let Some(w) = *waiting.borrow_and_update() else { continue };
                    if served == Some((w.round, w.attempt)) {
                        continue;
                    }
                    served = Some((w.round, w.attempt));
                    let cohort = self.cohorts.draw(w.round, w.attempt);
                    tracing::debug!(round = w.round, attempt = w.attempt, clients = cohort.len(), "materialising a cohort");
                    for i in cohort {
                        self.spawn(i, &mut live)?;
                        materialized += 1;
                    }
                }
                Some(joined) = live.join_next() => {
                    // A client that failed while the aggregator still waits
                    // for its cohort to check in would leave the round
                    // waiting for ever: end the run with its error instead.
                    if let Ok((i, Err(e))) = &joined
                        && let Some(w) = *waiting.borrow()
                        && served == Some((w.round, w.attempt))
                        && w.available < w.needed
                    {
                        stop_server.abort();
                        anyhow::bail!(
                            "client {} of round {}'s cohort failed before the round could \
                             start: {e:#}",
                            i + 1,
                            w.round
                        );
                    }
                    log_client_end(joined);
                }
                summary = &mut server_task => break summary?,
            }
        };
        drain_records(records_rx, on_round);
        // The last cohort says goodbye as it leaves; give stragglers 10 s.
        close_after_goodbyes(self.factory.shared_endpoint.as_ref());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, live.join_next()).await {
            log_client_end(joined);
        }
        live.abort_all();
        Ok((summary, materialized))
    }

    /// Materialises client `i`: its options now, its data (drawn off the
    /// async threads) and trainer in its task.
    fn spawn(
        &self,
        i: usize,
        live: &mut JoinSet<(usize, anyhow::Result<ClientReport>)>,
    ) -> anyhow::Result<()> {
        let opts = self.factory.options(i, self.factory.addr, true)?;
        let store = match &self.state {
            Some(dirs) => StateStore::in_dir(&dirs.client(i))?,
            None => StateStore::default(),
        };
        let (data, test, engine) = (
            Arc::clone(&self.data),
            Arc::clone(&self.test),
            self.engine.share(),
        );
        let generation = Arc::clone(&self.generation);
        live.spawn(async move {
            let run = async {
                let (train, indices) = {
                    let _permit = generation.acquire_owned().await?;
                    tokio::task::spawn_blocking(move || data.materialise(i)).await??
                };
                let trainer =
                    LocalTrainer::new(train, indices, test, Vec::new()).with_engine(engine);
                Ok(run_client_with_store(opts, trainer, store).await?)
            };
            (i, run.await)
        });
        Ok(())
    }
}

fn log_client_end(joined: Result<(usize, anyhow::Result<ClientReport>), tokio::task::JoinError>) {
    match joined {
        Ok((_, Ok(_))) => {}
        Ok((i, Err(e))) if stopped_at_the_end(&e) => {
            tracing::debug!(client = i + 1, "client stopped at the end of the run")
        }
        Ok((i, Err(e))) => tracing::warn!(client = i + 1, error = %e, "client ended with an error"),
        Err(e) => tracing::warn!(error = %e, "client task failed"),
    }
}

/// What check-in clients cannot do: stay for federated evaluation, be
/// faulty (fault injection follows clients across rounds), take part in
/// FedBuff's continuous dispatch, or sit behind a per-client UDP relay.
fn check_on_selection(config: &SimConfig) -> anyhow::Result<()> {
    let refuse = |what: &str| {
        Err(anyhow::anyhow!(
            "{what} needs every client connected for the whole run: use --materialize all"
        ))
    };
    if config.fraction_evaluate > 0.0 {
        return refuse("--fraction-evaluate (federated evaluation)");
    }
    if config.faults.is_active() {
        return refuse("fault injection (--dropout, --stragglers, --byzantine)");
    }
    if config.fedbuff.is_some() {
        return refuse("--fedbuff");
    }
    if config.link.is_some() && config.transport != "mem" {
        anyhow::bail!("--link with materialisation on selection needs --transport mem");
    }
    Ok(())
}

/// Runs a fault-injecting client, restarting it whenever its trainer asks
/// to vanish: the running client task is aborted (its QUIC connection drops
/// with it) after the requested delay, and a fresh one reconnects, as a
/// crashed app that restarts would.
async fn supervise(
    opts: ClientOptions,
    make: impl Fn(Option<KillSender>) -> FaultyTrainer + Send + 'static,
) -> anyhow::Result<()> {
    loop {
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
        let mut task = tokio::spawn(run_client(opts.clone(), make(Some(kill_tx))));
        tokio::select! {
            joined = &mut task => {
                joined??;
                return Ok(());
            }
            Some(after) = kill_rx.recv() => {
                tokio::time::sleep(after).await;
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// The shared state of the fault-injecting trainers.
fn fault_context(
    config: &SimConfig,
    layout: &ParamLayout,
    parts: &[Vec<usize>],
    train: &Arc<fedquic_train::Dataset>,
    test: &Arc<fedquic_train::Dataset>,
    engine: &Engine,
    log: FaultLog,
) -> anyhow::Result<Arc<FaultContext>> {
    let byzantine = match &config.faults.byzantine {
        Some(b) => crate::faults::byzantine_clients(b.fraction, config.clients, config.seed),
        None => Vec::new(),
    };
    let collusion = match config.faults.byzantine {
        Some(ByzantineSpec {
            kind: AttackKind::Alie(z),
            fraction,
        }) => {
            // The paper's z for one round: n updates, of which the expected
            // share is Byzantine.
            let n = ((config.fraction * config.clients as f64) - 1e-9)
                .ceil()
                .max(1.0) as usize;
            let m = (fraction * n as f64).round() as usize;
            let z = z.unwrap_or_else(|| crate::faults::alie_z(n, m));
            tracing::info!(z, n, m, "ALIE colluders");
            Some(Collusion::new(
                Arc::clone(train),
                Arc::clone(test),
                byzantine.iter().map(|&c| (c, parts[c].clone())).collect(),
                engine.share(),
                z,
                config.seed,
            ))
        }
        _ => None,
    };
    let upload_time = config
        .link
        .map(|l| l.transfer_time(layout.num_params() as u64 * 4))
        .unwrap_or_default();
    Ok(Arc::new(FaultContext {
        config: config.faults.clone(),
        seed: config.seed,
        rounds: RoundFinder::new(config.seed, config.rounds, config.clients),
        log,
        slots: Slots::new(config.threads),
        byzantine,
        collusion,
        upload_time,
    }))
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
