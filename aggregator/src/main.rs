//! `fedquic-aggregator`: argument parsing and wiring; the logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedquic_aggregator::{AggregatorConfig, Server, StartMode, setup_with_crl_reload};
use fedquic_net::pki::{self, PkiDirs};

#[derive(Parser)]
#[command(
    name = "fedquic-aggregator",
    version,
    about = "Federated averaging server over QUIC with mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the aggregator daemon until its last round (Ctrl-C or SIGTERM stops
    /// it cleanly; completed rounds are checkpointed).
    Run {
        /// TOML config (see examples/aggregator.toml); defaults apply without one.
        #[arg(long)]
        config: Option<PathBuf>,
        /// UDP address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory written by `certs init` (overrides `certs.dir`).
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Directory for checkpoints and metrics (overrides `state.dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Continue from the newest valid checkpoint in the state directory
        /// (fails if checkpoints exist but none is valid).
        #[arg(long, conflicts_with = "fresh")]
        resume: bool,
        /// Start a new run even though the state directory holds an earlier
        /// one: its checkpoints and metrics are moved to STATE/archive/<time>/.
        /// Without --fresh or --resume a non-empty state directory is refused.
        #[arg(long)]
        fresh: bool,
        /// Start even though the certs directory holds the CA's private key
        /// (ca.key); by default that is refused, as it should stay offline.
        #[arg(long)]
        allow_ca_key: bool,
    },
    /// Export the global model of a checkpointed round as ONNX (from the state
    /// directory alone; an `onnx:FILE` model keeps its original node and I/O names).
    Export {
        /// The run's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Checkpoint directory, if the config moved it (default: STATE_DIR/checkpoints).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// Round to export (default: the newest valid checkpoint).
        #[arg(long)]
        round: Option<u64>,
        /// Where to write the ONNX file.
        #[arg(long, value_name = "OUT.onnx")]
        onnx: PathBuf,
    },
    /// Draw PNG plots of a run from its metrics file: accuracy.png and
    /// loss.png (by round and by wall time) and bytes.png (bytes per round).
    Plot {
        /// The run's state directory (holds metrics.jsonl).
        #[arg(long)]
        state_dir: PathBuf,
        /// Metrics file, if the config moved it (default: STATE_DIR/metrics.jsonl).
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Where to write the PNG files (default: the state directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Manage the PKI: the CA, the aggregator's certificate, client certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, the aggregator's certificate and N client bundles:
    /// DIR holds the aggregator's files (for `run --certs DIR`), DIR/clients/NAME/
    /// the bundle each device receives (ca.pem, NAME.pem, NAME.key), and the
    /// CA directory (default DIR-ca) the CA key: keep it offline.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where the CA's certificate and private key go (default: DIR-ca).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Client bundles to create (client-001, client-002, ...).
        #[arg(long, default_value_t = 3)]
        clients: usize,
        /// Names (DNS or IP) the aggregator's certificate is valid for;
        /// clients pass one of them as --server-name.
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
        /// Replace an existing PKI in DIR and the CA directory.
        #[arg(long)]
        force: bool,
    },
    /// Add one client bundle (DIR/clients/NAME/), signed by the CA.
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The CA directory (default: DIR-ca).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        #[arg(long)]
        name: String,
    },
    /// Revoke a client certificate, by name (its current bundle) or by
    /// serial number (any certificate, e.g. an older one of a re-issued
    /// name): rewrites DIR/crl.pem. A running aggregator applies it on
    /// SIGHUP (`kill -HUP PID`), or at its next start.
    Revoke {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The CA directory (default: DIR-ca).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        name: Option<String>,
        /// Serial number in hex, as `openssl x509 -serial` prints it.
        #[arg(long)]
        serial: Option<String>,
    },
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the signal systemd and Kubernetes
/// stop services with: both stop the aggregator cleanly.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: stopping"),
            _ = term.recv() => tracing::info!("SIGTERM received: stopping"),
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
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
    match Cli::parse().command {
        Command::Run {
            config,
            listen,
            certs,
            state_dir,
            resume,
            fresh,
            allow_ca_key,
        } => {
            let mut cfg = match &config {
                Some(path) => AggregatorConfig::from_file(path)?,
                None => AggregatorConfig::default(),
            };
            if let Some(listen) = listen {
                cfg.listen = listen;
            }
            if let Some(dir) = certs {
                cfg.certs.dir = dir;
            }
            if let Some(dir) = state_dir {
                cfg.state.dir = dir;
            }
            cfg.validate()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let mode = match (resume, fresh) {
                    (true, _) => StartMode::Resume,
                    (false, true) => StartMode::Fresh,
                    (false, false) => StartMode::New,
                };
                let (setup, crl) = setup_with_crl_reload(&cfg, mode, allow_ca_key)?;
                fedquic_aggregator::setup::start_metrics_endpoint(&cfg, &setup.metrics).await?;
                let server = Server::bind(setup)?;
                #[cfg(unix)]
                fedquic_aggregator::setup::reload_crl_on_sighup(crl)
                    .context("installing the SIGHUP handler (CRL reload)")?;
                #[cfg(not(unix))]
                drop(crl);
                let stop = stop_signal()?;
                let summary = server.run(stop).await?;
                if summary.finished {
                    println!("run complete: {} rounds", summary.rounds_completed);
                } else {
                    println!(
                        "stopped after {} completed rounds (resume with --resume)",
                        summary.rounds_completed
                    );
                }
                anyhow::Ok(())
            })
        }
        Command::Export {
            state_dir,
            checkpoint_dir,
            round,
            onnx,
        } => {
            use fedquic_aggregator::export::{export_from_state, write_atomically};
            let (round, bytes) = export_from_state(&state_dir, checkpoint_dir.as_deref(), round)?;
            write_atomically(&onnx, &bytes)?;
            println!("exported round {round} to {}", onnx.display());
            Ok(())
        }
        Command::Plot {
            state_dir,
            metrics,
            out,
        } => {
            use fedquic_aggregator::plot::{METRICS_FILE, Series, write_plots};
            let metrics = metrics.unwrap_or_else(|| state_dir.join(METRICS_FILE));
            let series = Series::read_metrics(&metrics)?;
            let report = write_plots(&series, out.as_deref().unwrap_or(&state_dir))?;
            for path in &report.written {
                println!("wrote {}", path.display());
            }
            for note in &report.skipped {
                println!("skipped {note}");
            }
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    ca_dir,
                    clients,
                    server_names,
                    force,
                },
        } => {
            let dirs = PkiDirs::new(&dir, ca_dir.as_deref());
            for path in pki::init_dir(&dirs, &server_names, clients, force)? {
                println!("wrote {}", path.display());
            }
            println!(
                "\nthe CA is in {}: keep it offline, never deploy it\n\
                 aggregator: run --certs {}\n\
                 each device: copy only its bundle, {}/NAME/",
                dirs.ca.display(),
                dirs.certs.display(),
                dirs.certs.join(pki::CLIENTS_DIR).display()
            );
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Revoke {
                    dir,
                    ca_dir,
                    name,
                    serial,
                },
        } => {
            let dirs = PkiDirs::new(&dir, ca_dir.as_deref());
            let (what, crl) = match (name, serial) {
                (Some(name), _) => (name.clone(), pki::revoke(&dirs, &name)?),
                (None, Some(serial)) => {
                    let bytes = pki::parse_serial(&serial)?;
                    (
                        format!("serial {}", pki::serial_hex(&bytes)),
                        pki::revoke_serial(&dirs, &bytes)?,
                    )
                }
                (None, None) => anyhow::bail!("give --name or --serial"),
            };
            println!(
                "revoked {what}; wrote {} (send SIGHUP to a running aggregator to apply it)",
                crl.display()
            );
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Client { dir, ca_dir, name },
        } => {
            let dirs = PkiDirs::new(&dir, ca_dir.as_deref());
            for path in pki::add_client(&dirs, &name)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}
