//! Turns a validated [`AggregatorConfig`] into a ready [`ServerSetup`]:
//! loads certificates, the model, the central test set and, on resume, the
//! newest valid checkpoint.

use std::sync::Arc;
use std::time::Duration;

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
    #[error("certificates: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("model: {0}")]
    Model(fedquic_train::TrainError),
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

pub fn setup_from_config(
    config: &AggregatorConfig,
    resume: bool,
) -> Result<ServerSetup, SetupError> {
    setup_with_crl_reload(config, resume, false).map(|(setup, _)| setup)
}

/// The CRL the server uses and a handle that reloads it (on SIGHUP: see
/// [`reload_crl_on_sighup`]).
#[derive(Clone, Debug)]
pub struct CrlReload {
    pub path: std::path::PathBuf,
    reloader: tls::CrlReloader,
}

impl CrlReload {
    /// Reloads the CRL file into the running server; new handshakes use it.
    /// On any error (missing, empty or malformed file) the lists in force
    /// stay. Returns the number of CRLs loaded.
    pub fn reload(&self) -> Result<usize, tls::TlsError> {
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
            match crl.reload() {
                Ok(count) => info!(
                    path = %crl.path.display(),
                    crls = count,
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
    resume: bool,
    allow_ca_key: bool,
) -> Result<(ServerSetup, CrlReload), SetupError> {
    match check_no_ca_key(config) {
        Ok(()) => {}
        Err(SetupError::CaKeyInCertsDir(path)) if allow_ca_key => {
            warn!(path = %path.display(), "running with the CA's private key next to the aggregator's certificates (--allow-ca-key)")
        }
        Err(e) => return Err(e),
    }
    let layout: ParamLayout = config.model.spec.parse().map_err(SetupError::Model)?;
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
        let crls = tls::load_crl_file(&crl_path)?;
        info!(path = %crl_path.display(), "certificate revocation list loaded");
        crls
    } else {
        Vec::new()
    };
    let (server_tls, reloader) = tls::server_config_reloadable(roots, identity, crls, &transport)?;
    let crl_reload = CrlReload {
        path: crl_path,
        reloader,
    };

    std::fs::create_dir_all(&config.state.dir).map_err(|source| SetupError::StateDir {
        path: config.state.dir.clone(),
        source,
    })?;
    let store = CheckpointStore::open(config.checkpoint_dir(), config.state.keep_checkpoints)?;
    let mut initial_model = layout
        .initial_parameters(config.model.seed)
        .map_err(SetupError::Model)?;
    let mut completed_rounds = 0;
    if resume {
        let latest = store.latest_valid(
            |path, e| warn!(path = %path.display(), error = %e, "skipping checkpoint"),
        )?;
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
                info!(round = ckpt.header.round, "resuming from checkpoint");
                completed_rounds = ckpt.header.round;
                initial_model = ckpt.model;
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
        completed_rounds,
        central_eval,
        checkpoints: Some(store),
        metrics_path: Some(config.metrics_path()),
        max_clients: config.limits.max_clients,
        max_inflight_updates: config.limits.max_inflight_updates,
        handshake_timeout: Duration::from_secs_f64(config.limits.handshake_timeout_secs),
        records: None,
        allowlist: (!config.admission.allowlist.is_empty())
            .then(|| config.admission.allowlist.iter().cloned().collect()),
        reset_secret: Some(reset_secret),
        admission: Arc::default(),
    };
    Ok((setup, crl_reload))
}
