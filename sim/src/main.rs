//! `fedquic-sim`: argument parsing and wiring; the logic lives in the library.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedquic_aggregator::config::OptimizerName;
use fedquic_sim::report::{TABLE_HEADER, table_row};
use fedquic_sim::{SimConfig, simulate};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "fedquic-sim",
    version,
    about = "Simulate federated learning: an aggregator and many clients in one process, over real QUIC with mutual TLS on 127.0.0.1",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Number of simulated clients.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Fraction of clients selected to train each round (C in the FedAvg paper).
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Local epochs per round (E).
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// Local minibatch size (B).
    #[arg(long, default_value_t = 10)]
    batch_size: u32,
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Client optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    optimizer: OptimizerArg,
    /// SGD momentum (0: none).
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    /// Nesterov momentum (needs --momentum > 0).
    #[arg(long)]
    nesterov: bool,
    /// L2 weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// FedProx proximal term mu (0: plain FedAvg); with --strategy fedprox,
    /// the strategy's mu (default 0.01) applies instead.
    #[arg(long, default_value_t = 0.0)]
    mu: f32,
    /// Server-side strategy: fedavg, fedprox, fedavgm, fedadam, fedyogi,
    /// fedadagrad, normbounded, fedmedian, fedtrimmedavg, krum, multikrum, bulyan,
    /// qfedavg, scaffold (each virtual client keeps its control variate in memory:
    /// 4 bytes x parameters per client ever selected).
    #[arg(long, default_value = "fedavg")]
    strategy: String,
    /// Server learning rate (fedavgm, fedadam, fedyogi, fedadagrad, scaffold).
    #[arg(long, default_value_t = 1.0)]
    server_lr: f64,
    /// Server momentum (fedavgm).
    #[arg(long, default_value_t = 0.9)]
    server_momentum: f64,
    /// First and second moment decay of the adaptive server optimizers.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.99)]
    beta2: f64,
    /// Adaptivity of the adaptive server optimizers.
    #[arg(long, default_value_t = 1e-3)]
    tau: f64,
    /// Norm-bounded FedAvg: the L2 norm every update is clipped to.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// FedTrimmedAvg: fraction trimmed at each end of every coordinate.
    #[arg(long, default_value_t = 0.2)]
    trim: f64,
    /// Krum, Multi-Krum, Bulyan: Byzantine clients to tolerate.
    #[arg(long, default_value_t = 1)]
    byzantine_f: usize,
    /// Multi-Krum: updates averaged.
    #[arg(long, default_value_t = 5)]
    krum_m: usize,
    /// q-FedAvg: fairness exponent q (0: every selected client counts the same).
    #[arg(long, default_value_t = 1.0)]
    q: f64,
    /// q-FedAvg: Lipschitz constant L (0: 1 / --lr, as in the paper).
    #[arg(long, default_value_t = 0.0)]
    q_lipschitz: f64,
    /// Model: logreg:IN-OUT, mlp:IN-H1-...-OUT, cnn:mnist (the FedAvg paper's CNN),
    /// net:... (explicit layers), or onnx:FILE (a PyTorch/TensorFlow export; its weights
    /// are the initial global model).
    #[arg(long, default_value = "mlp:784-200-200-10")]
    model: String,
    /// Write the final global model as ONNX (an onnx:FILE model keeps its graph's names).
    #[arg(long, value_name = "OUT.onnx")]
    export_onnx: Option<PathBuf>,
    /// Data: synthetic[:TRAIN[/TEST][:SEED]] (built in), mnist:DIR (IDX files), csv:FILE.
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// How the training data is split across clients: iid, shards:S, dirichlet:ALPHA,
    /// or quantity:SIGMA (IID labels, client sizes lognormal(0, SIGMA)).
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Seed of partitioning, initial weights, selection and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Clients training at once (default: all cores); each trains single-threaded.
    #[arg(long)]
    threads: Option<usize>,
    /// Training backend: cpu, wgpu (any Vulkan adapter, lavapipe included; all clients
    /// share the device) or auto (a GPU when there is one, else the CPU).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "wgpu", "auto"])]
    backend: String,
    /// Fraction of clients asked each round to evaluate on their local test share.
    #[arg(long, default_value_t = 0.0)]
    fraction_evaluate: f64,
    /// Write rounds.csv, results.json, metrics.jsonl and the plots
    /// (accuracy.png, loss.png, bytes.png) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar or table; print only the summary.
    #[arg(long)]
    quiet: bool,
    /// Fault injection: probability that a selected client vanishes in a round
    /// (it trains, then its connection drops before or, over a --link, during
    /// its upload; it reconnects for later rounds).
    #[arg(long, default_value_t = 0.0, help_heading = "Faults")]
    dropout: f64,
    /// Fault injection: P:DIST, a selected client waits a delay from DIST
    /// before uploading with probability P. DIST (seconds): lognormal:MU,SIGMA,
    /// exp:MEAN, uniform:LO,HI, const:SECS. E.g. 0.3:lognormal:0,1.
    #[arg(long, value_name = "P:DIST", help_heading = "Faults")]
    stragglers: Option<fedquic_sim::faults::StragglerSpec>,
    /// Fault injection: FRACTION:KIND, that fraction of the clients (fixed by
    /// the seed) poisons every update. KIND: sign-flip, scale:X, gaussian:SIGMA
    /// (noise instead of the update), label-flip (trains on labels l -> C-1-l),
    /// same-value[:V] (every coordinate V, default 1), alie[:Z] (colluders send
    /// mean - Z*std of their honest updates; default Z from Baruch et al.).
    #[arg(long, value_name = "FRACTION:KIND", help_heading = "Faults")]
    byzantine: Option<fedquic_sim::faults::ByzantineSpec>,
    /// Fault injection: LATENCY_MS:MBPS, every client reaches the aggregator
    /// through its own UDP relay adding that one-way latency and pacing to that
    /// rate, each way.
    #[arg(long, value_name = "LATENCY_MS:MBPS", help_heading = "Faults")]
    link: Option<fedquic_sim::relay::LinkSpec>,
    /// Clip updates longer than this multiple of the previous round's median
    /// update norm (the aggregator's default defence); 0 turns it off.
    #[arg(long, default_value_t = 10.0)]
    max_norm_multiple: f64,
    /// Seconds a round waits for updates; later ones are cut.
    #[arg(long, default_value_t = 600.0)]
    round_deadline: f64,
    /// Update codecs the aggregator allows, best first (comma-separated): f32,
    /// f16, bf16, int8 (per-block scale, stochastic rounding), top-k:FRACTION
    /// and top-k:FRACTION+f16|bf16|int8. Each client gets the first it offers.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "f32",
        help_heading = "Codecs"
    )]
    codec: String,
    /// Model codecs the aggregator allows, best first: f32, f16, bf16.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "f32",
        help_heading = "Codecs"
    )]
    downlink_codec: String,
    /// Mix codecs across clients: semicolon-separated offers, client i making
    /// offer i mod N, e.g. "f32;int8;top-k:1" (with --codec listing them all).
    /// Default: every client offers every codec.
    #[arg(long, value_name = "OFFERS", help_heading = "Codecs")]
    client_codecs: Option<String>,
    /// Lossy codecs without error feedback (by default each client keeps what
    /// its codec dropped and adds it to its next update).
    #[arg(long, help_heading = "Codecs")]
    no_error_feedback: bool,
    /// Asynchronous FedBuff (Nguyen et al. 2022) instead of synchronous rounds:
    /// no round barrier; --rounds counts server steps, --round-deadline is the
    /// time one task may take.
    #[arg(long, help_heading = "FedBuff")]
    fedbuff: bool,
    /// FedBuff: clients training at once.
    #[arg(long, default_value_t = 10, help_heading = "FedBuff")]
    concurrency: usize,
    /// FedBuff: updates folded per server step.
    #[arg(long, default_value_t = 5, help_heading = "FedBuff")]
    buffer_size: usize,
    /// FedBuff: updates from a model more than this many versions old are refused.
    #[arg(long, default_value_t = 10, help_heading = "FedBuff")]
    max_staleness: u64,
    /// FedBuff: staleness weight, constant, polynomial:A ((1 + tau)^-A) or hinge:A,B.
    #[arg(long, default_value = "polynomial:0.5", help_heading = "FedBuff")]
    staleness: fedquic_aggregator::Staleness,
    /// How clients reach the aggregator: "udp" (QUIC over kernel UDP on
    /// 127.0.0.1) or "mem" (QUIC and TLS over an in-process network, no
    /// sockets; --link then shapes each client's own link).
    #[arg(long, default_value = "udp")]
    transport: String,
    /// Which clients exist: "all" connect for the whole run; "selected": only
    /// each round's cohort (fraction x clients, drawn with --seed) is
    /// created, checks in over QUIC for one task and leaves, so an idle
    /// client costs no memory (a million-client population fits in a few
    /// hundred MB). "auto": selected for synthetic-per-client data or more
    /// than 10,000 clients.
    #[arg(long, default_value = "auto", value_parser = ["auto", "all", "selected"])]
    materialize: String,
    /// Secure aggregation (SecAgg+): the aggregator only sees the sum of each
    /// round's updates. Clients clip to --secagg-clip (or --dp-clip) and
    /// weight their own updates; robust strategies are refused.
    #[arg(long, help_heading = "Privacy")]
    secagg: bool,
    /// Secure aggregation: neighbours per client (0: 2 ceil(log2 n); n - 1
    /// or more: the complete graph).
    #[arg(long, default_value_t = 0, help_heading = "Privacy")]
    secagg_degree: usize,
    /// Secure aggregation: shares that rebuild a secret, as a fraction of the
    /// degree (never below a majority).
    #[arg(long, default_value_t = 0.5, help_heading = "Privacy")]
    secagg_threshold: f64,
    /// Secure aggregation: clients clip their update to this L2 norm.
    #[arg(long, default_value_t = 10.0, help_heading = "Privacy")]
    secagg_clip: f64,
    /// Differential privacy: the aggregator adds the noise ("central"), or
    /// clients add Skellam shares inside the masks ("distributed", needs
    /// --secagg).
    #[arg(long, value_name = "MODE", help_heading = "Privacy")]
    dp: Option<String>,
    /// Differential privacy: L2 clip norm C of each update.
    #[arg(long, default_value_t = 1.0, help_heading = "Privacy")]
    dp_clip: f64,
    /// Differential privacy: noise multiplier (noise std on the sum is this x C).
    #[arg(long, default_value_t = 1.0, help_heading = "Privacy")]
    dp_noise: f64,
    /// Differential privacy: delta of the reported (epsilon, delta).
    #[arg(long, default_value_t = 1e-5, help_heading = "Privacy")]
    dp_delta: f64,
    /// Differential privacy: "fixed" (the engine's fixed-size selection) or
    /// "poisson" (an approximation; smaller epsilons).
    #[arg(long, default_value = "fixed", help_heading = "Privacy")]
    dp_sampling: String,
    /// Differential privacy: stop before a round that would take epsilon past this (0: none).
    #[arg(long, default_value_t = 0.0, help_heading = "Privacy")]
    epsilon_budget: f64,
    /// Differential privacy: adaptive clipping towards the median update norm
    /// (Andrew et al. 2021; central mode).
    #[arg(long, help_heading = "Privacy")]
    dp_adaptive_clip: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    Sgd,
    Adam,
}

#[derive(Subcommand)]
enum Command {
    /// Measure framework overhead: K clients whose "training" adds a fixed
    /// delta to a P-parameter model, over the same QUIC/mTLS path.
    #[command(name = "bench-overhead")]
    Overhead(fedquic_sim::bench::OverheadArgs),
    /// Load test: open N mutually authenticated QUIC connections to one
    /// aggregator (in another process) and hold them through a round.
    #[command(name = "bench-connections")]
    Connections(fedquic_sim::bench::ConnectionsArgs),
    /// (internal) The aggregator process of bench-overhead.
    #[command(name = "bench-serve", hide = true)]
    Serve(fedquic_sim::bench::ServeArgs),
    /// Flood an aggregator on 127.0.0.1 with QUIC Initial packets that
    /// never complete a handshake (measures the cost of half-open attempts).
    Flood(fedquic_sim::flood::FloodArgs),
    /// Explore hyper-parameters in parallel: a grid or a random search over
    /// any simulator option, several seeds each, resumable, optionally with
    /// successive halving; writes a ranked table and the best command line.
    /// Example: `fedquic-sim sweep --grid lr=0.01,0.05 --grid
    /// strategy=fedavg,fedadam --seeds 3 --out sweep -- --rounds 20`.
    Sweep(fedquic_sim::sweep::SweepArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
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
    // Clients train in parallel on `--threads` workers; each one's small
    // matrix products stay single-threaded, which uses the cores better.
    fedquic_train::set_gemm_threads(1)?;
    match cli.command {
        Some(Command::Overhead(args)) => return fedquic_sim::bench::run_overhead(args),
        Some(Command::Connections(args)) => return fedquic_sim::bench::run_connections(args),
        Some(Command::Serve(args)) => return fedquic_sim::bench::serve(args),
        Some(Command::Flood(args)) => return fedquic_sim::flood::run_flood(args),
        Some(Command::Sweep(args)) => return fedquic_sim::sweep::run_sweep(args),
        None => {}
    }
    let a = cli.run;
    let mut config = SimConfig {
        clients: a.clients,
        fraction: a.fraction,
        rounds: a.rounds,
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        proximal_mu: a.mu,
        strategy: fedquic_aggregator::strategy::StrategyConfig {
            name: a.strategy,
            server_lr: a.server_lr,
            server_momentum: a.server_momentum,
            beta1: a.beta1,
            beta2: a.beta2,
            tau: a.tau,
            mu: if a.mu > 0.0 { a.mu } else { 0.01 },
            trim: a.trim,
            clip_norm: a.clip_norm,
            byzantine_f: a.byzantine_f,
            krum_m: a.krum_m,
            q: a.q,
            q_lipschitz: a.q_lipschitz,
            ..Default::default()
        },
        optimizer: fedquic_aggregator::config::FitConfig {
            optimizer: match a.optimizer {
                OptimizerArg::Sgd => OptimizerName::Sgd,
                OptimizerArg::Adam => OptimizerName::Adam,
            },
            momentum: a.momentum,
            nesterov: a.nesterov,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        model: a.model,
        data: a.data,
        partition: a.partition,
        seed: a.seed,
        fraction_evaluate: a.fraction_evaluate,
        backend: a.backend,
        out: a.out,
        export_onnx: a.export_onnx,
        faults: fedquic_sim::faults::FaultConfig {
            dropout: a.dropout,
            stragglers: a.stragglers,
            byzantine: a.byzantine,
        },
        link: a.link,
        transport: a.transport,
        materialize: a.materialize,
        round_deadline_secs: a.round_deadline,
        max_norm_multiple: a.max_norm_multiple,
        codecs: fedquic_sim::simulate::SimCodecs {
            uplink: a.codec,
            downlink: a.downlink_codec,
            client_offers: a.client_codecs,
            error_feedback: !a.no_error_feedback,
        },
        fedbuff: a.fedbuff.then(|| fedquic_aggregator::FedBuffSettings {
            concurrency: a.concurrency,
            buffer_size: a.buffer_size,
            max_staleness: a.max_staleness,
            staleness: a.staleness,
            // The simulator writes no checkpoints.
            ..Default::default()
        }),
        secure_aggregation: a
            .secagg
            .then(|| fedquic_aggregator::config::SecureAggregationConfig {
                enabled: true,
                degree: a.secagg_degree,
                threshold: a.secagg_threshold,
                clip_norm: a.secagg_clip,
                ..Default::default()
            }),
        privacy: a.dp.as_ref().map(
            |mode| fedquic_aggregator::config::DifferentialPrivacyConfig {
                enabled: true,
                mode: mode.clone(),
                clip_norm: a.dp_clip,
                noise_multiplier: a.dp_noise,
                delta: a.dp_delta,
                sampling: a.dp_sampling.clone(),
                epsilon_budget: a.epsilon_budget,
                adaptive_clipping: a.dp_adaptive_clip,
                ..Default::default()
            },
        ),
        ..SimConfig::default()
    };
    if let Some(t) = a.threads {
        config.threads = t.max(1);
    }
    println!(
        "fedquic-sim: {} clients, fraction {}, {} rounds, model {}, data {}, partition {}, {} training threads, backend {}",
        config.clients,
        config.fraction,
        config.rounds,
        config.model,
        config.data,
        config.partition,
        config.threads,
        config.backend
    );
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(config.rounds);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40.cyan/blue} round {pos}/{len} [{elapsed_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    // The table goes above the bar on a terminal, and plainly to stdout when
    // the output is piped (where indicatif draws nothing).
    let show_table = !a.quiet;
    let print_line = |line: &str| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    if show_table {
        print_line(TABLE_HEADER);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(simulate(config, |record| {
        if show_table {
            print_line(&table_row(record));
        }
        bar.set_position(record.outcome.round);
        if let Some(acc) = record.test_accuracy {
            bar.set_message(format!("test accuracy {:.2}%", acc * 100.0));
        }
    }))?;
    bar.finish_and_clear();
    match result.final_test_accuracy {
        Some(acc) => println!(
            "final test accuracy: {:.2}% (loss {:.4}) after {} rounds in {:.2} s",
            acc * 100.0,
            result.final_test_loss.unwrap_or(f64::NAN),
            result.rounds.len(),
            result.seconds
        ),
        None => println!(
            "finished {} rounds in {:.2} s",
            result.rounds.len(),
            result.seconds
        ),
    }
    if result.materialized_on_selection {
        println!(
            "materialised {} client sessions for {} rounds out of a population of {}",
            result.clients_materialized,
            result.rounds.len(),
            result.config.clients
        );
    }
    if let Some(out) = &result.config.out {
        println!(
            "wrote {}/rounds.csv, faults.csv, results.json, metrics.jsonl",
            out.display()
        );
        for path in &result.plots.written {
            println!("wrote {}", path.display());
        }
        for note in &result.plots.skipped {
            println!("skipped {note}");
        }
    }
    Ok(())
}
