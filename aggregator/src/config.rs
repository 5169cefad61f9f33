//! The aggregator's TOML configuration. Every field has a default, so a
//! config names only what differs; command-line flags override the
//! deployment-specific parts (listen address, certificates, state directory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedquic_protocol::{FitInstructions, OptimizerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::EngineConfig;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    pub listen: SocketAddr,
    pub certs: CertsConfig,
    pub model: ModelConfig,
    pub rounds: RoundsConfig,
    pub fit: FitConfig,
    pub evaluate: EvaluateConfig,
    pub state: StateConfig,
    pub limits: LimitsConfig,
    pub admission: AdmissionConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Client names (certificate subjects) admitted; empty admits every
    /// client with a valid, unrevoked certificate from the CA.
    pub allowlist: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CertsConfig {
    /// Directory written by `fedquic-aggregator certs init`.
    pub dir: PathBuf,
    /// Individual paths; relative ones are inside `dir`.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate revocation list (written by `certs revoke`); loaded when
    /// the file exists, and revoked client certificates are refused.
    pub crl: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A model spec (`mlp:...`, `cnn:...`, `net:...`) or `onnx:FILE` (path relative to
    /// the working directory; its initializers are the initial weights).
    pub spec: String,
    /// Seed of the initial weights.
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    pub count: u64,
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub max_fit_clients: usize,
    pub min_available_clients: usize,
    pub deadline_secs: f64,
    pub max_retries: u32,
    /// Seed of client selection and of the clients' per-task shuffling.
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FitConfig {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// FedProx proximal term mu (0: plain FedAvg).
    pub proximal_mu: f32,
    /// Client optimizer: "sgd" or "adam".
    pub optimizer: OptimizerName,
    /// SGD momentum (0: none) and Nesterov.
    pub momentum: f32,
    pub nesterov: bool,
    /// L2 weight decay (SGD and Adam).
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    Adam,
}

impl FitConfig {
    pub fn optimizer_config(&self) -> OptimizerConfig {
        match self.optimizer {
            OptimizerName::Sgd => OptimizerConfig::Sgd {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
            },
            OptimizerName::Adam => OptimizerConfig::Adam {
                beta1: self.beta1,
                beta2: self.beta2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateConfig {
    /// Data spec of the central test set (`synthetic`, `mnist:DIR`,
    /// `csv:FILE`: its test split is used). Empty: no central evaluation.
    pub test_data: String,
    /// Fraction of connected clients asked to evaluate each round on their
    /// own data (federated evaluation); 0 turns it off.
    pub fraction: f64,
    pub min_clients: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Holds `checkpoints/` and `metrics.jsonl` unless overridden below.
    pub dir: PathBuf,
    pub checkpoint_dir: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub keep_checkpoints: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connected clients at most; more are told to retry later.
    pub max_clients: usize,
    /// Updates held in memory while being received, at most (each one model
    /// sized); further uploads wait, so memory stays bounded.
    pub max_inflight_updates: usize,
    /// Seconds a new connection has to send its Hello.
    pub handshake_timeout_secs: f64,
    /// Seconds without any packet before a connection is dropped.
    pub idle_timeout_secs: f64,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            certs: CertsConfig::default(),
            model: ModelConfig::default(),
            rounds: RoundsConfig::default(),
            fit: FitConfig::default(),
            evaluate: EvaluateConfig::default(),
            state: StateConfig::default(),
            limits: LimitsConfig::default(),
            admission: AdmissionConfig::default(),
        }
    }
}

impl Default for CertsConfig {
    fn default() -> Self {
        CertsConfig {
            dir: PathBuf::from("certs"),
            ca: PathBuf::from("ca.pem"),
            cert: PathBuf::from("server.pem"),
            key: PathBuf::from("server.key"),
            crl: PathBuf::from("crl.pem"),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            spec: "mlp:784-200-200-10".into(),
            seed: 0,
        }
    }
}

impl Default for RoundsConfig {
    fn default() -> Self {
        RoundsConfig {
            count: 10,
            fraction_fit: 1.0,
            min_fit_clients: 2,
            max_fit_clients: 1000,
            min_available_clients: 2,
            deadline_secs: 300.0,
            max_retries: 3,
            seed: 0,
        }
    }
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.05,
            proximal_mu: 0.0,
            optimizer: OptimizerName::Sgd,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        }
    }
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        EvaluateConfig {
            test_data: String::new(),
            fraction: 0.0,
            min_clients: 0,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("state"),
            checkpoint_dir: None,
            metrics_file: None,
            keep_checkpoints: 3,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_clients: 10_000,
            max_inflight_updates: 4,
            handshake_timeout_secs: 10.0,
            idle_timeout_secs: 60.0,
        }
    }
}

impl AggregatorConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: AggregatorConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let r = &self.rounds;
        if r.count == 0 {
            return bad("rounds.count must be at least 1");
        }
        if !(r.fraction_fit > 0.0 && r.fraction_fit <= 1.0) {
            return bad("rounds.fraction_fit must be in (0, 1]");
        }
        if r.min_fit_clients == 0 || r.max_fit_clients < r.min_fit_clients {
            return bad("rounds.min_fit_clients must be >= 1 and <= rounds.max_fit_clients");
        }
        if !(r.deadline_secs.is_finite() && r.deadline_secs > 0.0) {
            return bad("rounds.deadline_secs must be positive");
        }
        if !(0.0..=1.0).contains(&self.evaluate.fraction) {
            return bad("evaluate.fraction must be in [0, 1]");
        }
        self.fit_instructions()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[fit]: {e}")))?;
        if self.limits.max_clients == 0 || self.limits.max_inflight_updates == 0 {
            return bad("limits.max_clients and limits.max_inflight_updates must be at least 1");
        }
        for (name, v) in [
            (
                "limits.handshake_timeout_secs",
                self.limits.handshake_timeout_secs,
            ),
            ("limits.idle_timeout_secs", self.limits.idle_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        Ok(())
    }

    pub fn fit_instructions(&self) -> FitInstructions {
        FitInstructions {
            epochs: self.fit.epochs,
            batch_size: self.fit.batch_size,
            learning_rate: self.fit.learning_rate,
            proximal_mu: self.fit.proximal_mu,
            seed: self.rounds.seed,
            optimizer: self.fit.optimizer_config(),
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        let r = &self.rounds;
        EngineConfig {
            rounds: r.count,
            fraction_fit: r.fraction_fit,
            min_fit_clients: r.min_fit_clients,
            max_fit_clients: r.max_fit_clients,
            min_available_clients: r.min_available_clients,
            round_deadline: Duration::from_secs_f64(r.deadline_secs),
            fit: self.fit_instructions(),
            fraction_evaluate: self.evaluate.fraction,
            min_evaluate_clients: self.evaluate.min_clients,
            max_round_retries: r.max_retries,
            seed: r.seed,
        }
    }

    fn in_certs(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.certs.dir.join(p)
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.in_certs(&self.certs.ca)
    }
    pub fn cert_path(&self) -> PathBuf {
        self.in_certs(&self.certs.cert)
    }
    pub fn key_path(&self) -> PathBuf {
        self.in_certs(&self.certs.key)
    }
    pub fn crl_path(&self) -> PathBuf {
        self.in_certs(&self.certs.crl)
    }
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.state
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.state.dir.join("checkpoints"))
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.state
            .metrics_file
            .clone()
            .unwrap_or_else(|| self.state.dir.join("metrics.jsonl"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/aggregator.toml");
        let c = AggregatorConfig::from_file(&path).unwrap();
        assert_eq!(c.ca_path(), c.certs.dir.join("ca.pem"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<AggregatorConfig>("listne = \"1.2.3.4:5\"").is_err());
        let mut c = AggregatorConfig::default();
        c.rounds.fraction_fit = 0.0;
        assert!(c.validate().is_err());
        let mut c = AggregatorConfig::default();
        c.fit.learning_rate = -1.0;
        assert!(c.validate().is_err());
        assert!(AggregatorConfig::default().validate().is_ok());
        let mut c = AggregatorConfig::default();
        c.fit.nesterov = true;
        assert!(c.validate().is_err(), "Nesterov without momentum");
    }

    #[test]
    fn optimizer_settings_reach_the_fit_instructions() {
        let c: AggregatorConfig = toml::from_str(
            "[fit]\noptimizer = \"adam\"\nbeta1 = 0.8\nweight_decay = 0.01\nproximal_mu = 0.1",
        )
        .unwrap();
        c.validate().unwrap();
        let fit = c.fit_instructions();
        assert_eq!(fit.proximal_mu, 0.1);
        assert_eq!(
            fit.optimizer,
            OptimizerConfig::Adam {
                beta1: 0.8,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.01
            }
        );
        assert!(toml::from_str::<AggregatorConfig>("[fit]\noptimizer = \"lbfgs\"").is_err());
    }
}
