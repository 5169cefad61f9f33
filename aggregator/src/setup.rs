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
    #[error("model: {0}")]
    Onnx(fedquic_train::onnx::OnnxError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error("central test data: {0}")]
    Data(fedquic_train::TrainError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
    // A spec string, or `onnx:FILE`: then the file's canonical `net:` spec travels to
    // clients and its initializers are the initial global model.
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
        let crls = tls::load_crl_file(&crl_path)?;
        info!(path = %crl_path.display(), "certificate revocation list loaded");
        crls
    } else {
        Vec::new()
    };
    let server_tls = tls::server_config_with_crls(roots, identity, crls, &transport)?;

    std::fs::create_dir_all(&config.state.dir).map_err(|source| SetupError::StateDir {
        path: config.state.dir.clone(),
        source,
    })?;
    let store = CheckpointStore::open(config.checkpoint_dir(), config.state.keep_checkpoints)?;
    // `fedquic-aggregator export` finds the original graph here.
    crate::export::keep_original(&config.state.dir, source.onnx.as_ref().map(|(b, _)| &b[..]))?;
    let mut initial_model = source
        .initial_parameters(config.model.seed)
        .map_err(SetupError::Onnx)?;
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

    Ok(ServerSetup {
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
    })
}
