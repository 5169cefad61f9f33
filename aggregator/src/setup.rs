//! Turns a validated [`AggregatorConfig`] into a ready [`ServerSetup`]:
//! loads certificates, the model, the central test set and, on resume, the
//! newest valid checkpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedquic_net::revocation;
use fedquic_net::tls::{self, Identity, TransportSettings};
use fedquic_train::layout::ParamLayout;
use fedquic_train::{DataSpec, Model};
use thiserror::Error;
use tracing::{info, warn};

use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::AggregatorConfig;
use crate::server::{CentralEval, ServerSetup};

#[derive(Debug, Error)]
pub enum SetupError {
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("certificates: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("model: {0}")]
    Model(fedquic_train::TrainError),
    #[error("model: {0}")]
    Onnx(fedquic_train::onnx::OnnxError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("central test data: {0}")]
    Data(fedquic_train::TrainError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {dir} already holds a run ({what}); pass --resume to continue it, \
         or --fresh to archive it and start a new run"
    )]
    StateInUse {
        dir: std::path::PathBuf,
        what: String,
    },
    #[error("--resume: no valid checkpoint in {dir}; rejected: {rejected}")]
    NoValidCheckpoint {
        dir: std::path::PathBuf,
        rejected: String,
    },
    #[error("state directory: {0}")]
    State(String),
    #[error(
        "{} holds the CA's private key: whoever reads the aggregator's certificates could mint any client identity. Move it to an offline CA directory (`certs init` writes it to <certs>-ca/), or pass --allow-ca-key to run anyway",
        .0.display()
    )]
    CaKeyInCertsDir(std::path::PathBuf),
    #[error("checkpoint {path} is for model '{found}', but the config says '{expected}'")]
    ModelMismatch {
        path: std::path::PathBuf,
        found: String,
        expected: String,
    },
}

/// How a run treats what its state directory already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// A new run; refused if the state directory holds another run's
    /// checkpoints or metrics.
    New,
    /// A new run; another run's checkpoints and metrics are moved to
    /// `archive/<time>/` inside the state directory first (nothing is deleted).
    Fresh,
    /// Continue from the newest valid checkpoint; fail if checkpoints exist
    /// but none is valid.
    Resume,
}

/// Starts the Prometheus endpoint for `metrics` when `[metrics] listen` is
/// set, and says where it listens (the port, when the config asked for 0).
/// It serves until the runtime stops.
pub async fn start_metrics_endpoint(
    config: &AggregatorConfig,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<std::net::SocketAddr>, SetupError> {
    let Some(addr) = config
        .metrics
        .listen_addr()
        .map_err(SetupError::InvalidConfig)?
    else {
        return Ok(None);
    };
    let endpoint = crate::metrics::MetricsEndpoint::bind(addr, metrics.clone()).await?;
    let local = endpoint
        .local_addr()
        .map_err(|source| crate::metrics::MetricsError::Bind { addr, source })?;
    info!(addr = %local, "serving Prometheus metrics at /metrics");
    endpoint.spawn();
    Ok(Some(local))
}

pub fn setup_from_config(
    config: &AggregatorConfig,
    mode: StartMode,
) -> Result<ServerSetup, SetupError> {
    setup_with_crl_reload(config, mode, false).map(|(setup, _)| setup)
}

/// The CRL the server uses and a handle that reloads it (on SIGHUP: see
/// [`reload_crl_on_sighup`]).
#[derive(Clone, Debug)]
pub struct CrlReload {
    pub path: std::path::PathBuf,
    reloader: revocation::CrlReloader,
}

impl CrlReload {
    /// Reloads the CRL file into the running server: new handshakes use
    /// it, and connected clients whose certificates it revokes are closed.
    /// On any error (missing, empty, malformed file, a CRL not signed by
    /// the CA or older than the one in force) the lists in force stay.
    /// Blocks on file I/O: from async code, call it on a blocking thread.
    pub fn reload(&self) -> Result<revocation::Reloaded, tls::TlsError> {
        self.reloader.reload_file(&self.path)
    }
}

/// Reloads the CRL each time the process receives SIGHUP, logging the
/// outcome, until the runtime stops. The handler is installed before this
/// returns (so a SIGHUP right after start cannot kill the process); call it
/// inside the tokio runtime, next to the server.
#[cfg(unix)]
pub fn reload_crl_on_sighup(crl: CrlReload) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let reload = crl.clone();
            let outcome = match tokio::task::spawn_blocking(move || reload.reload()).await {
                Ok(outcome) => outcome,
                Err(e) => Err(tls::TlsError::CrlRefused(format!(
                    "the reload task failed: {e}"
                ))),
            };
            match outcome {
                Ok(reloaded) => info!(
                    path = %crl.path.display(),
                    crls = reloaded.crls,
                    closed = reloaded.closed.len(),
                    "SIGHUP: certificate revocation list reloaded"
                ),
                Err(e) => warn!(
                    path = %crl.path.display(),
                    error = %e,
                    "SIGHUP: CRL not reloaded; the previous one stays in force"
                ),
            }
        }
    }))
}

/// The paths where the CA's private key must not be: the certs directory
/// and the directory of the CA certificate the aggregator loads.
fn check_no_ca_key(config: &AggregatorConfig) -> Result<(), SetupError> {
    let key = fedquic_net::pki::CA_KEY_FILE;
    let mut candidates = vec![config.certs.dir.join(key)];
    if let Some(dir) = config.ca_path().parent() {
        candidates.push(dir.join(key));
    }
    match candidates.into_iter().find(|p| p.exists()) {
        Some(path) => Err(SetupError::CaKeyInCertsDir(path)),
        None => Ok(()),
    }
}

/// [`setup_from_config`] that also returns the CRL reload handle. Refuses a
/// certs directory holding the CA key unless `allow_ca_key`.
pub fn setup_with_crl_reload(
    config: &AggregatorConfig,
    mode: StartMode,
    allow_ca_key: bool,
) -> Result<(ServerSetup, CrlReload), SetupError> {
    match check_no_ca_key(config) {
        Ok(()) => {}
        Err(SetupError::CaKeyInCertsDir(path)) if allow_ca_key => {
            warn!(path = %path.display(), "running with the CA's private key next to the aggregator's certificates (--allow-ca-key)")
        }
        Err(e) => return Err(e),
    }
    // A spec string, or `onnx:FILE`: then the file's canonical `net:` spec travels to
    // clients and its initializers are the initial global model.
    // Secure aggregation and differential privacy clip every update themselves.
    if config.updates.max_update_norm <= 0.0
        && !config.secure_aggregation.enabled
        && !config.differential_privacy.enabled
    {
        // The median rule needs a previous round; robust strategies bound
        // outliers their own way, but plain averaging does not.
        warn!(
            "updates.max_update_norm is not set: in round 1, before a median norm exists, a \
             client's update is bounded only by max_weight_share and max_parameter_abs; set an \
             absolute bound (a few times a typical update's norm) to bound it from the start"
        );
    }
    let source =
        fedquic_train::onnx::ModelSource::parse(&config.model.spec).map_err(SetupError::Onnx)?;
    let layout: ParamLayout = source.layout.clone();
    let roots = tls::load_ca_file(&config.ca_path())?;
    let identity = Identity::from_files(&config.cert_path(), &config.key_path())?;
    // Stateless-reset tokens keyed by the server's private key survive a
    // restart, so clients notice a crash at their next packet.
    let reset_secret = identity.key.secret_der().to_vec();
    let transport = TransportSettings {
        idle_timeout: Duration::from_secs_f64(config.limits.idle_timeout_secs),
        ..TransportSettings::aggregator()
    };
    let crl_path = config.crl_path();
    let crls = if crl_path.exists() {
        let crls = revocation::load_crl_file(&crl_path)?;
        info!(path = %crl_path.display(), "certificate revocation list loaded");
        crls
    } else {
        warn!(
            path = %crl_path.display(),
            "no certificate revocation list: every certificate the CA signed is accepted; \
             `fedquic-aggregator certs revoke` writes one, SIGHUP loads it"
        );
        Vec::new()
    };
    let (server_tls, reloader) = tls::server_config_reloadable(roots, identity, crls, &transport)?;
    let crl_reload = CrlReload {
        path: crl_path,
        reloader: reloader.clone(),
    };

    std::fs::create_dir_all(&config.state.dir).map_err(|source| SetupError::StateDir {
        path: config.state.dir.clone(),
        source,
    })?;
    let checkpoint_dir = config.checkpoint_dir();
    let metrics_path = config.metrics_path();
    let existing = existing_state(&checkpoint_dir, &metrics_path)?;
    match (mode, existing.is_empty()) {
        (StartMode::New, false) => {
            return Err(SetupError::StateInUse {
                dir: config.state.dir.clone(),
                what: existing.describe(),
            });
        }
        (StartMode::Fresh, false) => {
            let archive = archive_state(&config.state.dir, &existing, &metrics_path)?;
            info!(archive = %archive.display(), "previous run archived");
        }
        _ => {}
    }
    let store = CheckpointStore::open(&checkpoint_dir, config.state.keep_checkpoints)?;
    // `fedquic-aggregator export` finds the original graph here.
    crate::export::keep_original(&config.state.dir, source.onnx.as_ref().map(|(b, _)| &b[..]))?;
    let mut initial_model = source
        .initial_parameters(config.model.seed)
        .map_err(SetupError::Onnx)?;
    let mut resume = None;
    let mut strategy_state = Vec::new();
    let mut run_id = crate::server::new_run_id();
    if mode == StartMode::Resume {
        let mut rejected = Vec::new();
        let latest = store.latest_valid(|path, e| {
            warn!(path = %path.display(), error = %e, "skipping checkpoint");
            rejected.push(format!("{}: {e}", path.display()));
        })?;
        match latest {
            Some(ckpt) => {
                let found: Result<ParamLayout, _> = ckpt.header.model_spec.parse();
                if found.as_ref().ok() != Some(&layout) || ckpt.model.len() != initial_model.len() {
                    return Err(SetupError::ModelMismatch {
                        path: store.path_for(ckpt.header.round),
                        found: ckpt.header.model_spec,
                        expected: config.model.spec.clone(),
                    });
                }
                info!(
                    round = ckpt.header.round,
                    run = %ckpt.header.run_id,
                    "resuming from checkpoint"
                );
                reconcile_metrics(&metrics_path, ckpt.header.round, &ckpt.header.metrics_line)?;
                run_id = ckpt.header.run_id.clone();
                if ckpt.header.strategy != config.strategy.name {
                    return Err(SetupError::State(format!(
                        "{} was written by strategy '{}', but the config says '{}'",
                        store.path_for(ckpt.header.round).display(),
                        ckpt.header.strategy,
                        config.strategy.name
                    )));
                }
                let engine = &ckpt.header.engine;
                let consistent = engine.completed_rounds == ckpt.header.round;
                if let Err(e) = engine.validate().and_then(|()| match consistent {
                    true => Ok(()),
                    false => Err(format!(
                        "the header says round {} but the engine state {} completed rounds",
                        ckpt.header.round, engine.completed_rounds
                    )),
                }) {
                    return Err(SetupError::State(format!(
                        "{}: {e}",
                        store.path_for(ckpt.header.round).display()
                    )));
                }
                resume = Some(ckpt.header.engine.clone());
                strategy_state = ckpt.strategy;
                initial_model = ckpt.model;
            }
            None if !rejected.is_empty() => {
                return Err(SetupError::NoValidCheckpoint {
                    dir: store.dir().to_path_buf(),
                    rejected: rejected.join("; "),
                });
            }
            None => {
                info!(dir = %store.dir().display(), "no checkpoint to resume from: starting at round 1")
            }
        }
    }

    let central_eval = match (config.evaluate.test_data.trim(), layout.model_spec()) {
        ("", _) => None,
        (_, None) => {
            warn!(
                "central evaluation needs a trainable model spec; disabled for {}",
                config.model.spec
            );
            None
        }
        (spec, Some(model_spec)) => {
            let data: DataSpec = spec.parse().map_err(SetupError::Data)?;
            let (_, test) = data.load().map_err(SetupError::Data)?;
            info!(data = %spec, examples = test.len(), "central evaluation enabled");
            Some(CentralEval {
                model: Model::try_new(model_spec.clone(), 0).map_err(SetupError::Model)?,
                test: Arc::new(test),
            })
        }
    };

    let setup = ServerSetup {
        listen: config.listen,
        tls: server_tls,
        engine: config.engine_config(),
        model_spec: layout.to_string(),
        layout: layout.wire_layout(),
        initial_model,
        resume,
        strategy_state,
        run_id,
        central_eval,
        checkpoints: Some(store),
        metrics_path: Some(config.metrics_path()),
        max_clients: config.limits.max_clients,
        max_inflight_updates: config.limits.max_inflight_updates,
        handshake_timeout: Duration::from_secs_f64(config.limits.handshake_timeout_secs),
        header_timeout: Duration::from_secs_f64(config.limits.header_timeout_secs),
        upload_grace: Duration::from_secs_f64(config.limits.upload_grace_secs),
        min_upload_bytes_per_sec: config.limits.min_upload_bytes_per_sec,
        client_log_lines_per_minute: config.limits.client_log_lines_per_minute,
        records: None,
        waiting: None,
        allowlist: (!config.admission.allowlist.is_empty())
            .then(|| config.admission.allowlist.iter().cloned().collect()),
        reset_secret: Some(reset_secret),
        admission: Arc::new(fedquic_net::admission::Admission::new(
            config.limits.admission(),
        )),
        // Checked by `AggregatorConfig::validate`; checked again for configs
        // built in code.
        codecs: config
            .codecs
            .preference()
            .map_err(SetupError::InvalidConfig)?,
        fedbuff: config
            .fedbuff
            .settings()
            .map_err(SetupError::InvalidConfig)?,
        secure_aggregation: config
            .secure_aggregation
            .settings(&config.rounds, &config.differential_privacy)
            .map_err(SetupError::InvalidConfig)?,
        privacy: config
            .differential_privacy
            .privacy()
            .map_err(SetupError::InvalidConfig)?,
        mem_network: None,
        metrics: crate::metrics::Metrics::new(),
        revocation: Some(reloader),
    };
    Ok((setup, crl_reload))
}

/// What a state directory already holds from an earlier run.
#[derive(Debug, Default)]
struct ExistingState {
    checkpoints: Vec<PathBuf>,
    metrics: bool,
}

impl ExistingState {
    fn is_empty(&self) -> bool {
        self.checkpoints.is_empty() && !self.metrics
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.checkpoints.is_empty() {
            parts.push(format!("{} checkpoint file(s)", self.checkpoints.len()));
        }
        if self.metrics {
            parts.push("a metrics file".to_string());
        }
        parts.join(" and ")
    }
}

fn state_err(what: &str, path: &Path, e: std::io::Error) -> SetupError {
    SetupError::State(format!("{what} {}: {e}", path.display()))
}

fn existing_state(checkpoint_dir: &Path, metrics_path: &Path) -> Result<ExistingState, SetupError> {
    let mut found = ExistingState::default();
    if checkpoint_dir.is_dir() {
        let entries = fs::read_dir(checkpoint_dir)
            .map_err(|e| state_err("cannot read", checkpoint_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| state_err("cannot read", checkpoint_dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("round-") && name.ends_with(".ckpt") {
                found.checkpoints.push(entry.path());
            }
        }
        found.checkpoints.sort();
    }
    found.metrics = fs::metadata(metrics_path).is_ok_and(|m| m.len() > 0);
    Ok(found)
}

/// Moves an earlier run's checkpoints and metrics into
/// `STATE/archive/<unix time>[-n]/`, so a fresh run never mixes with it and
/// nothing is lost.
fn archive_state(
    state_dir: &Path,
    existing: &ExistingState,
    metrics_path: &Path,
) -> Result<PathBuf, SetupError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = state_dir.join("archive");
    let mut archive = base.join(now.to_string());
    let mut n = 1;
    while archive.exists() {
        archive = base.join(format!("{now}-{n}"));
        n += 1;
    }
    let checkpoints = archive.join("checkpoints");
    fs::create_dir_all(&checkpoints).map_err(|e| state_err("cannot create", &checkpoints, e))?;
    for path in &existing.checkpoints {
        if let Some(name) = path.file_name() {
            let to = checkpoints.join(name);
            fs::rename(path, &to).map_err(|e| state_err("cannot archive", path, e))?;
        }
    }
    if existing.metrics {
        let to = archive.join("metrics.jsonl");
        fs::rename(metrics_path, &to).map_err(|e| state_err("cannot archive", metrics_path, e))?;
    }
    Ok(archive)
}

/// Makes `metrics.jsonl` agree with the checkpoint of round `round`: one line
/// per committed round up to it, no duplicates, nothing after it, and the
/// checkpoint's own line restored if a crash lost it. The file is rewritten
/// atomically, and the original kept beside it when anything changed.
fn reconcile_metrics(path: &Path, round: u64, checkpoint_line: &str) -> Result<(), SetupError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(state_err("cannot read", path, e)),
    };
    let round_of = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("round").and_then(|r| r.as_u64()))
    };
    let mut by_round: std::collections::BTreeMap<u64, &str> = std::collections::BTreeMap::new();
    let mut dropped = 0usize;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match round_of(line) {
            Some(r) if r <= round => {
                if by_round.insert(r, line).is_some() {
                    dropped += 1;
                }
            }
            _ => dropped += 1,
        }
    }
    let mut restored = false;
    if !by_round.contains_key(&round) && round_of(checkpoint_line) == Some(round) {
        by_round.insert(round, checkpoint_line);
        restored = true;
    }
    let missing: Vec<u64> = (1..=round).filter(|r| !by_round.contains_key(r)).collect();
    if !missing.is_empty() {
        warn!(
            path = %path.display(),
            missing = missing.len(),
            first = missing[0],
            "metrics file lacks lines for some committed rounds (older than the checkpoint)"
        );
    }
    if dropped == 0 && !restored {
        return Ok(());
    }
    let mut out = String::new();
    for line in by_round.values() {
        out.push_str(line);
        out.push('\n');
    }
    if path.exists() {
        let backup = path.with_extension(format!("jsonl.before-resume-{round}"));
        fs::copy(path, &backup).map_err(|e| state_err("cannot back up", path, e))?;
    }
    fedquic_net::files::replace_file(path, out.as_bytes())
        .map_err(|e| state_err("cannot replace", path, e))?;
    info!(
        path = %path.display(),
        restored_round = restored.then_some(round),
        removed_lines = dropped,
        "metrics file brought in line with the checkpoint"
    );
    Ok(())
}
