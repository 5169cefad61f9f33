//! `fedquic-aggregator`: argument parsing and wiring; the logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedquic_aggregator::{AggregatorConfig, Server, setup_from_config};

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
    /// Run the aggregator daemon until its last round (Ctrl-C stops it cleanly).
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
        /// Continue from the newest valid checkpoint in the state directory.
        #[arg(long)]
        resume: bool,
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
    /// Manage the PKI: the CA, the aggregator's certificate, client certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, the aggregator's certificate and N client certificates.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Client certificates to create (client-001, client-002, ...).
        #[arg(long, default_value_t = 3)]
        clients: usize,
        /// Names (DNS or IP) the aggregator's certificate is valid for;
        /// clients pass one of them as --server-name.
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
        /// Replace an existing PKI in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Add one client certificate, signed by the CA in DIR.
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Revoke a client's certificate: rewrites DIR/crl.pem, which the
    /// aggregator loads at start (restart it to apply).
    Revoke {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
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
                let setup = setup_from_config(&cfg, resume)?;
                let server = Server::bind(setup)?;
                let summary = server
                    .run(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
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
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    clients,
                    server_names,
                    force,
                },
        } => {
            let written = fedquic_net::pki::init_dir(&dir, &server_names, clients, force)?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Revoke { dir, name },
        } => {
            let crl = fedquic_net::pki::revoke(&dir, &name)?;
            println!("revoked {name}; wrote {}", crl.display());
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Client { dir, name },
        } => {
            for path in fedquic_net::pki::add_client(&dir, &name)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}
