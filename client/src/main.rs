//! `fedquic-client`: argument parsing and wiring; the logic lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
use fedquic_client::{
    Backoff, ClientData, ClientLimits, ClientOptions, CodecOptions, LocalTrainer, PartitionSpec,
    StateStore, run_client_with_store,
};
use fedquic_net::tls::{self, Identity, TransportSettings};
use fedquic_train::backend::{BackendKind, Engine};
use fedquic_train::{DataSpec, PartitionScheme};
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "fedquic-client",
    version,
    about = "Federated learning edge client: trains on local data, sends only model updates over QUIC with mutual TLS",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  fedquic-client predict --model model.onnx --data mnist:/data/mnist\n  fedquic-client --server 127.0.0.1:4433 --certs certs --name client-001 --data synthetic --partition 1/3\n  fedquic-client --server agg.example.org:4433 --ca ca.pem --cert me.pem --key me.key --data mnist:/data/mnist"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<ClientCommand>,
    /// Aggregator address, HOST:PORT.
    #[arg(long, required = true)]
    server: Option<String>,
    /// Name in the aggregator's certificate (default: the HOST of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// CA certificate that signed the aggregator's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This client's certificate (its name is the client's identity).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This client's private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Shorthand: DIR/ca.pem, DIR/NAME.pem, DIR/NAME.key (with --name).
    #[arg(long, requires = "name")]
    certs: Option<PathBuf>,
    /// Client name for --certs, e.g. client-001.
    #[arg(long)]
    name: Option<String>,
    /// Local data: synthetic[:N[:SEED]], mnist:DIR (IDX files, raw or .gz), csv:FILE (label,features...).
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// Use only share I of N of the data (demos): e.g. 2/10.
    #[arg(long)]
    partition: Option<PartitionSpec>,
    /// How --partition splits the data: iid, shards:S, dirichlet:ALPHA or quantity:SIGMA.
    #[arg(long, default_value = "iid")]
    partition_scheme: String,
    /// Seed of the partition (use the same on every client).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Give up after this many failed connection attempts in a row (default: retry forever).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30.0)]
    max_backoff: f64,
    /// Longest a connection attempt may take, QUIC handshake and hello
    /// included, in seconds; then the client backs off and tries again.
    #[arg(long, default_value_t = 15.0)]
    connect_timeout: f64,
    /// Longest the QUIC handshake of one attempt may take, in seconds (at most
    /// --connect-timeout; default 10, or --connect-timeout if that is
    /// shorter). Keep it above the aggregator's
    /// `limits.quic_handshake_timeout_secs` (default 5).
    #[arg(long)]
    handshake_timeout: Option<f64>,
    /// Threads for local training: each convolution, matrix product, pooling
    /// and activation pass is split across them (1-4; default: the number of
    /// cores, at most 4).
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse models with more parameters than this (memory: about 16-20
    /// bytes per parameter while training).
    #[arg(long, default_value_t = ClientLimits::default().max_params)]
    max_params: u64,
    /// Refuse fit tasks asking for more local epochs than this.
    #[arg(long, default_value_t = ClientLimits::default().max_epochs)]
    max_epochs: u32,
    /// Refuse fit tasks asking for larger minibatches than this.
    #[arg(long, default_value_t = ClientLimits::default().max_batch_size)]
    max_batch_size: u32,
    /// Longest "retry after" from the aggregator honoured, in seconds.
    #[arg(long, default_value_t = ClientLimits::default().max_retry_after.as_secs_f64())]
    max_retry_after: f64,
    /// Refuse models and fit tasks whose training scratch memory (activations
    /// and their gradients for one batch) exceeds this, in MiB.
    #[arg(long, default_value_t = ClientLimits::default().max_training_memory >> 20)]
    max_training_memory: u64,
    /// Longest wait on the aggregator within a task, in seconds: for the model
    /// to start arriving, for the secure-aggregation key exchange to finish
    /// after training, for a control message to be taken, and beyond 16 KiB/s
    /// for a model or update transfer. Then the client reconnects.
    #[arg(long, default_value_t = ClientLimits::default().max_task_wait.as_secs_f64())]
    max_task_wait: f64,
    /// Training backend: cpu, wgpu (any Vulkan adapter, software ones included) or auto
    /// (a discrete or integrated GPU when there is one, else the CPU). Overrides the
    /// config file's `backend`; default cpu.
    #[arg(long, value_parser = BackendKind::NAMES)]
    backend: Option<String>,
    /// TOML config file; keys (all optional): `backend = "cpu" | "wgpu" | "auto"`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for state kept between rounds and restarts: the SCAFFOLD
    /// control variate (`scaffold-control.bin`) and the error-feedback
    /// residual of a lossy codec (`error-feedback.bin`), 4 bytes per model
    /// parameter each, written atomically, per run. Without it they live in
    /// memory and a restarted client starts them from zero.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Codecs this client offers for its updates and the models it receives,
    /// comma-separated: f32, f16, bf16, int8, top-k:FRACTION[+f16|bf16|int8]
    /// (a top-k entry accepts the fraction the aggregator chooses). The
    /// aggregator picks its first choice among them. Default: all.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    codecs: Vec<fedquic_protocol::Codec>,
    /// Send lossy-codec updates without error feedback (by default the part a
    /// lossy codec drops is kept and added to the next update).
    #[arg(long)]
    no_error_feedback: bool,
    /// Leave after answering this many training tasks (cross-device
    /// check-in: 1, with the aggregator's rounds.one_task_per_connection);
    /// by default the client stays until the run finishes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_fit_tasks: Option<u64>,
}

/// The client's config file (command-line flags take precedence).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    backend: Option<String>,
}

impl ConfigFile {
    fn load(path: &std::path::Path) -> anyhow::Result<ConfigFile> {
        // Config files are small; refuse anything large before reading it.
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if size > 1 << 20 {
            bail!("{}: config file larger than 1 MiB", path.display());
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

#[derive(clap::Subcommand)]
enum ClientCommand {
    /// Run an ONNX model (e.g. the exported global model) with tract on local data and
    /// print its accuracy or per-example predictions; no aggregator involved.
    Predict(fedquic_client::predict::PredictArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `--version` names the CPU kernel path training runs on.
    let long_version: &'static str = Box::leak(
        fedquic_train::backend::version_details(env!("CARGO_PKG_VERSION")).into_boxed_str(),
    );
    let cli = Cli::from_arg_matches(&Cli::command().long_version(long_version).get_matches())
        .unwrap_or_else(|e| e.exit());
    if let Some(ClientCommand::Predict(args)) = cli.command {
        return fedquic_client::predict::run(args);
    }
    let server_address = cli.server.clone().context("--server is required")?;
    let handshake_timeout = cli.handshake_timeout.unwrap_or_else(|| {
        fedquic_client::DEFAULT_HANDSHAKE_TIMEOUT
            .as_secs_f64()
            .min(cli.connect_timeout)
    });
    for (flag, value, min, max) in [
        ("--max-retry-after", cli.max_retry_after, 0.0, 86_400.0),
        ("--max-backoff", cli.max_backoff, 0.0, 86_400.0),
        ("--connect-timeout", cli.connect_timeout, 0.1, 3_600.0),
        ("--handshake-timeout", handshake_timeout, 0.1, 3_600.0),
        ("--max-task-wait", cli.max_task_wait, 1.0, 86_400.0),
    ] {
        if !(value.is_finite() && (min..=max).contains(&value)) {
            bail!("{flag} must be between {min} and {max} seconds, got {value}");
        }
    }
    if handshake_timeout > cli.connect_timeout {
        bail!(
            "--handshake-timeout ({handshake_timeout} s) must not exceed --connect-timeout ({} s)",
            cli.connect_timeout
        );
    }
    let limits = ClientLimits {
        max_params: cli.max_params,
        max_epochs: cli.max_epochs,
        max_batch_size: cli.max_batch_size,
        max_retry_after: Duration::from_secs_f64(cli.max_retry_after),
        max_training_memory: cli.max_training_memory.saturating_mul(1 << 20),
        max_task_wait: Duration::from_secs_f64(cli.max_task_wait),
    };
    let config = match &cli.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let backend: BackendKind = cli
        .backend
        .as_deref()
        .or(config.backend.as_deref())
        .unwrap_or("cpu")
        .parse()?;
    // Fixed before any other thread starts (the GEMM library reads it once).
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    });
    fedquic_train::set_gemm_threads(threads)?;
    // A forced kernel level the CPU lacks stops the client here, before any work.
    let kernel = fedquic_train::backend::dispatch::process_path()?;
    tracing::info!(
        kernel = kernel.name(),
        cpu_threads = fedquic_train::cpu_threads(),
        "training kernels (FEDQUIC_KERNEL=auto|avx512|avx2|neon|portable)"
    );
    // After the GEMM threads: a Vulkan driver may start threads of its own.
    let engine = Engine::select(backend).with_context(|| format!("starting backend {backend}"))?;
    tracing::info!(requested = %backend, backend = engine.name(), device = %engine.describe(), "training backend");
    let (ca, cert, key) = match (&cli.certs, &cli.name, &cli.ca, &cli.cert, &cli.key) {
        (Some(dir), Some(name), None, None, None) => (
            dir.join("ca.pem"),
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ),
        (None, _, Some(ca), Some(cert), Some(key)) => (ca.clone(), cert.clone(), key.clone()),
        _ => bail!("give either --certs DIR --name NAME, or all of --ca, --cert and --key"),
    };
    let data_spec: DataSpec = cli.data.parse()?;
    let scheme: PartitionScheme = cli.partition_scheme.parse()?;
    let data = ClientData::load(&data_spec, cli.partition, &scheme, cli.seed)
        .with_context(|| format!("loading {}", cli.data))?;
    tracing::info!(
        train = data.train_indices.len(),
        test = data.test_indices.len(),
        "local data loaded"
    );

    let identity = Identity::from_files(&cert, &key)?;
    let name = identity.name().unwrap_or_else(|_| "client".into());
    let tls = tls::client_config(
        tls::load_ca_file(&ca)?,
        Some(identity),
        &TransportSettings::default(),
    )?;
    let store = match &cli.state_dir {
        Some(dir) => StateStore::in_dir(dir)?,
        None => StateStore::default(),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = tokio::net::lookup_host(&server_address)
            .await
            .with_context(|| format!("resolving {server_address}"))?
            .next()
            .with_context(|| format!("{server_address} resolves to no address"))?;
        let server_name = cli.server_name.clone().unwrap_or_else(|| {
            server_address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_default()
        });
        let opts = ClientOptions {
            server,
            server_name,
            tls,
            backoff: Backoff::new(
                Duration::from_millis(250),
                Duration::from_secs_f64(cli.max_backoff.max(0.25)),
                seed_from_name(&name),
            ),
            max_attempts: cli.max_attempts,
            connect_timeout: Duration::from_secs_f64(cli.connect_timeout),
            handshake_timeout: Duration::from_secs_f64(handshake_timeout),
            training_slots: None,
            endpoint: None,
            limits,
            codecs: CodecOptions {
                offer: match cli.codecs.is_empty() {
                    true => fedquic_protocol::all_codecs(),
                    false => cli.codecs.clone(),
                },
                error_feedback: !cli.no_error_feedback,
            },
            privacy_seed: None,
            max_fit_tasks: cli.max_fit_tasks,
        };
        let trainer =
            LocalTrainer::new(data.train, data.train_indices, data.test, data.test_indices)
                .with_engine(engine);
        let report = tokio::select! {
            r = run_client_with_store(opts, trainer, store) => r?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        };
        println!(
            "run complete: {} fit tasks, {} evaluations, {} bytes of updates sent",
            report.fit_tasks, report.evaluate_tasks, report.bytes_up
        );
        Ok(())
    })
}

/// Jitter seed from the client's name, so clients spread out their retries.
fn seed_from_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
