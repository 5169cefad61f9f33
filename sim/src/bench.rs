//! `bench-overhead`: what the framework itself costs per round. K clients
//! whose "training" adds a fixed delta to a P-parameter model (no
//! learning; each client its own delta and example count, so the run checks
//! the exact weighted mean), over the same QUIC + mutual TLS path as a real run. The
//! aggregator runs in its own process (this binary, `bench-serve`), so its
//! peak memory is measured apart from the clients'.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fedquic_aggregator::EngineConfig;
use fedquic_aggregator::config::CodecPreference;
use fedquic_aggregator::server::{Server, ServerSetup};
use fedquic_client::{
    Backoff, ClientOptions, EvalOutcome, FitOutcome, Trainer, TrainerError, run_client,
};
use fedquic_net::pki::{self, CertAuthority, client_name};
use fedquic_net::tls::{self, Identity, TransportSettings};
use fedquic_protocol::{Codec, FitInstructions};
use fedquic_train::layout::ParamLayout;
use serde::{Deserialize, Serialize};

use crate::pki::SERVER_NAME;

/// The unit of the deltas benchmark clients add to every parameter.
pub const BENCH_DELTA: f32 = 1e-3;

/// Client `i`'s delta and example count: distinct across clients, so that
/// wrong weighting shows in the result.
pub fn bench_update(i: usize) -> (f32, u64) {
    (BENCH_DELTA * (1 + i % 7) as f32, 1 + (i % 5) as u64)
}

/// What every parameter moves by per round when clients `1..=clients` all
/// answer: the example-weighted mean of their deltas.
pub fn bench_expected_step(clients: usize) -> f64 {
    let (sum, total) = (1..=clients)
        .map(bench_update)
        .fold((0.0, 0.0), |(s, t), (d, n)| {
            (s + d as f64 * n as f64, t + n as f64)
        });
    sum / total
}

/// Largest difference from the exact weighted mean that passes (f32
/// rounding of values around 1e-2 over a few rounds is far below it; equal
/// weights instead of example weights would be off by 1e-5 per round).
pub const BENCH_TOLERANCE: f64 = 1e-6;

#[derive(clap::Args, Debug, Clone)]
pub struct OverheadArgs {
    /// Clients (all of them train every round).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Model parameters (one f32 tensor).
    #[arg(long, default_value_t = 1_000_000)]
    pub params: usize,
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Server-side strategy with its default parameters (a streaming one:
    /// fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox, normbounded).
    /// The exactness check of the aggregate runs for fedavg only.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// Run every round with secure aggregation (SecAgg+): clients mask their
    /// updates, the aggregator unmasks only the sum.
    #[arg(long)]
    pub secagg: bool,
    /// Secure aggregation: neighbours per client (0: 2 ceil(log2 K)).
    #[arg(long, default_value_t = 0)]
    pub secagg_degree: usize,
    /// The model broadcast's codec: f32 (lossless), f16 or bf16 (half the
    /// downlink bytes). Updates go up as f32 either way.
    #[arg(long, default_value = "f32")]
    pub downlink_codec: Codec,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Mutually authenticated connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Model parameters (small: the point is the connections).
    #[arg(long, default_value_t = 100)]
    pub params: usize,
    /// Rounds to hold the connections through (every client trains each round).
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Directory with ca.pem, server.pem and server.key.
    #[arg(long)]
    pub certs: PathBuf,
    #[arg(long)]
    pub clients: usize,
    #[arg(long)]
    pub params: usize,
    #[arg(long)]
    pub rounds: u64,
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    #[arg(long)]
    pub secagg: bool,
    #[arg(long, default_value_t = 0)]
    pub secagg_degree: usize,
    #[arg(long, default_value = "f32")]
    pub downlink_codec: Codec,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ServeReport {
    pub round_seconds: Vec<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory once listening, before any client connected.
    pub baseline_rss_bytes: Option<u64>,
    /// From listening until every client was connected and round 1 began.
    pub setup_seconds: f64,
    pub clients_per_round: Vec<usize>,
    /// Every parameter must have moved by exactly rounds x the weighted
    /// mean of the clients' deltas ([`bench_expected_step`]).
    pub max_error: f64,
    /// The error allowed: float rounding, or secure aggregation's fixed point.
    pub tolerance: f64,
    /// Per round: the mean over clients of the bytes each sent and was sent
    /// (tensor bodies, and secure aggregation's key exchange).
    pub bytes_per_client: Vec<f64>,
    /// Secure aggregation: seconds of each phase (advertise, share, masked
    /// input, unmask) per round.
    #[serde(default)]
    pub secagg_phase_seconds: Vec<Vec<f64>>,
}

/// A "trainer" that adds a fixed delta to every parameter and claims a fixed
/// example count ([`bench_update`]).
pub struct FixedDeltaTrainer {
    params: Vec<f32>,
    delta: f32,
    examples: u64,
}

impl FixedDeltaTrainer {
    /// The trainer of benchmark client `i`.
    pub fn for_client(i: usize) -> Self {
        let (delta, examples) = bench_update(i);
        FixedDeltaTrainer {
            params: Vec::new(),
            delta,
            examples,
        }
    }
}

impl Trainer for FixedDeltaTrainer {
    fn prepare(&mut self, _layout: &ParamLayout) -> Result<(), TrainerError> {
        Ok(())
    }
    fn parameters(&self) -> &[f32] {
        &self.params
    }
    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        self.params.clear();
        self.params.extend_from_slice(params);
        Ok(())
    }
    fn fit(&mut self, _config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        for p in &mut self.params {
            *p += self.delta;
        }
        Ok(FitOutcome {
            examples: self.examples,
            metrics: Vec::new(),
        })
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        Err(TrainerError::Other(
            "the overhead benchmark does not evaluate".into(),
        ))
    }
    fn release(&mut self) {
        self.params = Vec::new();
    }
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

/// Current resident memory of this process (Linux `VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:")
}

fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// The aggregator side, run as a child process by [`run_overhead`].
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let layout = ParamLayout::Vector(args.params);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let tls = tls::server_config(
            tls::load_ca_file(&args.certs.join(pki::CA_CERT_FILE))?,
            Identity::from_files(
                &args.certs.join(pki::SERVER_CERT_FILE),
                &args.certs.join(pki::SERVER_KEY_FILE),
            )?,
            // Both processes are on this host, over loopback directly.
            &TransportSettings::aggregator().direct_loopback(),
        )?;
        let engine = EngineConfig {
            rounds: args.rounds,
            fraction_fit: 1.0,
            min_fit_clients: args.clients,
            max_fit_clients: args.clients,
            min_available_clients: args.clients,
            round_deadline: Duration::from_secs(600),
            fit: FitInstructions {
                epochs: 1,
                batch_size: 1,
                learning_rate: 1.0,
                proximal_mu: 0.0,
                seed: 0,
                optimizer: Default::default(),
            },
            fraction_evaluate: 0.0,
            min_evaluate_clients: 0,
            max_round_retries: 0,
            seed: 0,
            one_task_per_connection: false,
            updates: Default::default(),
            strategy: fedquic_aggregator::strategy::StrategyConfig {
                name: args.strategy.clone(),
                ..Default::default()
            },
        };
        // Secure aggregation: clip just above the largest update's norm, and
        // weigh by examples exactly (the cap is the largest count).
        let (max_delta, max_examples) = (1..=args.clients)
            .map(bench_update)
            .fold((0f32, 0u64), |(d, n), (di, ni)| {
                (d.max(di.abs()), n.max(ni))
            });
        let clip_norm = 1.01 * f64::from(max_delta) * (args.params as f64).sqrt();
        let secure_aggregation = args.secagg.then(|| fedquic_aggregator::SecAggSettings {
            degree: args.secagg_degree,
            threshold: 0.5,
            phase_timeout: Duration::from_secs(120),
            clip_norm,
            weight_cap: max_examples,
            min_clients: args.clients.clamp(2, usize::MAX),
        });
        let tolerance = match args.secagg {
            // Each client's rounding moves the sum by less than 1/scale per
            // value; the mean divides by the summed weights.
            true => {
                let fixed_point =
                    fedquic_privacy::secagg::FixedPoint::for_sum(args.clients, clip_norm.max(1.0))?;
                let weights: f64 = (1..=args.clients)
                    .map(|i| bench_update(i).1 as f64 / max_examples as f64)
                    .sum();
                args.rounds as f64 * args.clients as f64 / fixed_point.scale() / weights
                    + BENCH_TOLERANCE
            }
            false => BENCH_TOLERANCE,
        };
        let setup = ServerSetup {
            max_clients: args.clients + 8,
            handshake_timeout: Duration::from_secs(60),
            secure_aggregation,
            codecs: downlink_preference(args.downlink_codec),
            ..ServerSetup::new(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                tls,
                engine,
                &layout,
                layout.initial_parameters(0)?,
            )
        };
        let server = Server::bind(setup)?;
        let baseline_rss_bytes = rss_bytes();
        println!("LISTENING {}", server.local_addr()?);
        let summary = server.run(std::future::pending()).await?;
        // Only plain FedAvg's result is known in closed form.
        let expected = args.rounds as f64 * bench_expected_step(args.clients);
        let exact = args.strategy == "fedavg";
        let max_error = if exact {
            summary
                .final_model
                .iter()
                .map(|v| (*v as f64 - expected).abs())
                .fold(0.0, f64::max)
        } else {
            0.0
        };
        let report = ServeReport {
            round_seconds: summary.records.iter().map(|r| r.seconds).collect(),
            peak_rss_bytes: peak_rss_bytes(),
            baseline_rss_bytes,
            setup_seconds: summary
                .records
                .first()
                .map(|r| r.elapsed_seconds - r.seconds)
                .unwrap_or(f64::NAN),
            clients_per_round: summary
                .records
                .iter()
                .map(|r| r.outcome.clients_answered)
                .collect(),
            max_error,
            tolerance,
            bytes_per_client: summary
                .records
                .iter()
                .map(|r| {
                    let total: u64 = r
                        .client_traffic
                        .values()
                        .map(|t| t.bytes_up + t.bytes_down)
                        .sum();
                    total as f64 / r.client_traffic.len().max(1) as f64
                })
                .collect(),
            secagg_phase_seconds: summary
                .records
                .iter()
                .filter_map(|r| r.outcome.secagg.as_ref().map(|s| s.phase_seconds.clone()))
                .collect(),
        };
        println!("RESULT {}", serde_json::to_string(&report)?);
        anyhow::Ok(())
    })
}

/// An aggregator running in a child process (`bench-serve`), with the
/// PKI its clients need.
struct ChildAggregator {
    child: Child,
    addr: SocketAddr,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    ca: CertAuthority,
    _certs: tempfile::TempDir,
}

impl ChildAggregator {
    fn start(
        clients: usize,
        params: usize,
        rounds: u64,
        strategy: &str,
        secagg: Option<usize>,
        downlink: Codec,
    ) -> anyhow::Result<Self> {
        let certs = tempfile_dir()?;
        let ca = CertAuthority::generate("fedquic bench CA")?;
        let server = ca.issue_server(&[SERVER_NAME.to_string(), "127.0.0.1".to_string()])?;
        for (file, text) in [
            (pki::CA_CERT_FILE, ca.cert_pem()),
            (pki::SERVER_CERT_FILE, server.cert_pem.as_str()),
            (pki::SERVER_KEY_FILE, server.key_pem.as_str()),
        ] {
            std::fs::write(certs.path().join(file), text)
                .context("writing benchmark certificates")?;
        }
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = Command::new(exe)
            .args(["bench-serve", "--certs"])
            .arg(certs.path())
            .args([
                "--clients",
                &clients.to_string(),
                "--params",
                &params.to_string(),
            ])
            .args(["--rounds", &rounds.to_string()])
            .args(["--strategy", strategy])
            .arg(format!("--downlink-codec={downlink}"))
            .args(match secagg {
                Some(degree) => vec!["--secagg".to_string(), format!("--secagg-degree={degree}")],
                None => Vec::new(),
            })
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the aggregator process")?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout from the aggregator process")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr: SocketAddr = match lines.next() {
            Some(Ok(line)) if line.starts_with("LISTENING ") => {
                line["LISTENING ".len()..].parse()?
            }
            other => {
                let _ = child.kill();
                bail!("aggregator process did not start: {other:?}");
            }
        };
        Ok(ChildAggregator {
            child,
            addr,
            lines,
            ca,
            _certs: certs,
        })
    }

    /// Runs `clients` fixed-delta clients against it (all sharing one UDP
    /// socket) until the run completes, and returns the aggregator's report.
    fn run_fleet(mut self, clients: usize) -> anyhow::Result<ServeReport> {
        let runtime = tokio::runtime::Runtime::new()?;
        let (addr, ca) = (self.addr, &self.ca);
        let client_result: anyhow::Result<()> = runtime.block_on(async {
            let roots = tls::load_ca_pem(ca.cert_pem())?;
            let mut handles = Vec::with_capacity(clients);
            let mut endpoint: Option<quinn::Endpoint> = None;
            for i in 1..=clients {
                let issued = ca.issue_client(&client_name(i))?;
                let identity = Identity::from_pem(&issued.cert_pem, &issued.key_pem)?;
                let tls = tls::client_config(
                    roots.clone(),
                    Some(identity),
                    &TransportSettings::default().direct_loopback(),
                )?;
                let endpoint = match &endpoint {
                    Some(e) => e.clone(),
                    None => endpoint
                        .insert(fedquic_net::endpoint::client_endpoint_for(
                            addr,
                            tls.clone(),
                        )?)
                        .clone(),
                };
                let opts = ClientOptions {
                    server: addr,
                    server_name: SERVER_NAME.into(),
                    tls,
                    backoff: Backoff::new(
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                        i as u64,
                    ),
                    max_attempts: Some(30),
                    connect_timeout: Duration::from_secs(60),
                    handshake_timeout: fedquic_client::DEFAULT_HANDSHAKE_TIMEOUT,
                    training_slots: None,
                    endpoint: Some(endpoint),
                    limits: Default::default(),
                    codecs: Default::default(),
                    privacy_seed: None,
                    max_fit_tasks: None,
                };
                handles.push(tokio::spawn(run_client(
                    opts,
                    FixedDeltaTrainer::for_client(i),
                )));
            }
            let mut failed = 0usize;
            let mut first_error = None;
            for h in handles {
                if let Err(e) = h
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from))
                {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            match first_error {
                Some(e) => Err(e.context(format!("{failed} of {clients} clients failed"))),
                None => Ok(()),
            }
        });
        if client_result.is_err() {
            let _ = self.child.kill();
        }
        let mut report = None;
        for line in self.lines.by_ref() {
            if let Some(json) = line?.strip_prefix("RESULT ") {
                report = Some(serde_json::from_str::<ServeReport>(json)?);
            }
        }
        let status = self.child.wait()?;
        client_result?;
        let report = report
            .with_context(|| format!("aggregator process ended ({status}) without a result"))?;
        if report.max_error > report.tolerance {
            bail!(
                "aggregation is wrong: parameters off by {} from the exact weighted mean (allowed {})",
                report.max_error,
                report.tolerance
            );
        }
        Ok(report)
    }
}

fn mb(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.1} MB", b as f64 / 1e6))
        .unwrap_or_else(|| "unavailable".into())
}

/// The benchmark aggregator's codecs: f32 updates, the model as `downlink`.
fn downlink_preference(downlink: Codec) -> CodecPreference {
    CodecPreference {
        downlink: vec![downlink],
        ..CodecPreference::default()
    }
}

/// Runs the overhead benchmark and prints its results.
pub fn run_overhead(args: OverheadArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.params == 0 || args.rounds == 0 {
        bail!("--clients, --params and --rounds must be at least 1");
    }
    fedquic_aggregator::strategy::StrategyConfig {
        name: args.strategy.clone(),
        ..Default::default()
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("--strategy: {e}"))?;
    downlink_preference(args.downlink_codec)
        .validate()
        .map_err(|e| anyhow::anyhow!("--downlink-codec: {e}"))?;
    let secagg = args.secagg.then_some(args.secagg_degree);
    let report = ChildAggregator::start(
        args.clients,
        args.params,
        args.rounds,
        &args.strategy,
        secagg,
        args.downlink_codec,
    )?
    .run_fleet(args.clients)?;
    let median_s = median(&report.round_seconds).unwrap_or(f64::NAN);
    println!(
        "bench-overhead: K={} clients, P={} params, {} rounds, strategy {}, model sent as {}, mutual TLS on, secure aggregation {}",
        args.clients,
        args.params,
        args.rounds,
        args.strategy,
        args.downlink_codec,
        match args.secagg {
            true => "on",
            false => "off",
        }
    );
    println!(
        "round seconds: {}",
        report
            .round_seconds
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("median seconds per round: {median_s:.3}");
    println!(
        "bytes per client per round (median): {:.0}",
        median(&report.bytes_per_client).unwrap_or(f64::NAN)
    );
    println!(
        "largest error against the exact weighted mean: {:.3e} (allowed {:.3e})",
        report.max_error, report.tolerance
    );
    if !report.secagg_phase_seconds.is_empty() {
        let phase = |i: usize| {
            let v: Vec<f64> = report
                .secagg_phase_seconds
                .iter()
                .filter_map(|p| p.get(i).copied())
                .collect();
            median(&v).unwrap_or(f64::NAN)
        };
        println!(
            "secure aggregation phases, median seconds: advertise {:.3}, share {:.3}, masked input {:.3}, unmask {:.3}",
            phase(0),
            phase(1),
            phase(2),
            phase(3)
        );
    }
    println!(
        "aggregator peak memory (VmHWM): {}",
        mb(report.peak_rss_bytes)
    );
    Ok(())
}

/// Opens `clients` mutually authenticated connections from this process to
/// an aggregator in another, holds them through the rounds, and reports
/// the setup rate and the aggregator's memory per connected client.
pub fn run_connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.params == 0 || args.rounds == 0 {
        bail!("--clients, --params and --rounds must be at least 1");
    }
    let report = ChildAggregator::start(
        args.clients,
        args.params,
        args.rounds,
        "fedavg",
        None,
        Codec::F32,
    )?
    .run_fleet(args.clients)?;
    if report.clients_per_round.iter().any(|&n| n != args.clients) {
        bail!(
            "not every client took part in every round: {:?}",
            report.clients_per_round
        );
    }
    println!(
        "bench-connections: {} clients, P={} params, {} rounds, mutual TLS on",
        args.clients, args.params, args.rounds
    );
    println!(
        "all connected in {:.2} s ({:.0} connections/s, handshake + hello included)",
        report.setup_seconds,
        args.clients as f64 / report.setup_seconds
    );
    println!(
        "round seconds with every client training: {}",
        report
            .round_seconds
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "aggregator memory: {} before clients, {} peak",
        mb(report.baseline_rss_bytes),
        mb(report.peak_rss_bytes)
    );
    if let (Some(peak), Some(base)) = (report.peak_rss_bytes, report.baseline_rss_bytes) {
        println!(
            "aggregator memory per connected client: {:.1} KB",
            peak.saturating_sub(base) as f64 / args.clients as f64 / 1e3
        );
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("fedquic-bench-")
        .tempdir()
        .context("creating a temporary directory")
}
