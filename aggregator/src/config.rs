//! The aggregator's TOML configuration. Every field has a default, so a
//! config names only what differs; command-line flags override the
//! deployment-specific parts (listen address, certificates, state directory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedquic_protocol::{Codec, FitInstructions, OptimizerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::{EngineConfig, NormPolicy, UpdatePolicy};
use crate::fedbuff::FedBuffSettings;
use crate::strategy::StrategyConfig;

/// Upper bounds on configuration values, so that nothing downstream
/// overflows (durations added to `Instant`s, counts used for allocation).
pub const MAX_DURATION_SECS: f64 = 7.0 * 24.0 * 3600.0;
pub const MAX_ROUNDS: u64 = 1_000_000_000;
pub const MAX_COUNT: usize = 100_000_000;
use crate::engine::MAX_EXAMPLES_PER_UPDATE;

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
    pub updates: UpdatesConfig,
    pub strategy: StrategyConfig,
    pub codecs: CodecsConfig,
    pub fedbuff: FedBuffConfig,
    pub secure_aggregation: SecureAggregationConfig,
    pub differential_privacy: DifferentialPrivacyConfig,
    pub metrics: MetricsConfig,
}

/// The Prometheus endpoint (see [`crate::metrics`]). Off unless `listen` is
/// set: the metrics tell whoever reaches the port how the run is going, so
/// exposing them is a deployment decision.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` serving `GET /metrics` over plain HTTP (e.g.
    /// `127.0.0.1:9464`); empty: no endpoint.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to serve metrics on, or `None` when they are off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            format!(
                "metrics.listen = {:?} is not host:port with a numeric IP address \
                 (e.g. \"127.0.0.1:9464\"); leave it empty for no endpoint",
                self.listen
            )
        })
    }
}

/// Secure aggregation (SecAgg+) in every round (see [`crate::secagg`]): the
/// aggregator learns only the sum of each round's updates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationConfig {
    pub enabled: bool,
    /// Neighbours per client in the communication graph; 0 picks
    /// `2 ceil(log2 n)` for a round of n clients (capped at n - 1, the
    /// complete graph of the original protocol).
    pub degree: usize,
    /// Shares that rebuild a secret, as a fraction of the degree (never
    /// below a majority of the neighbourhood).
    pub threshold: f64,
    /// Deadline of each key-exchange phase, in seconds.
    pub phase_timeout_secs: f64,
    /// Clients clip their update to this L2 norm before masking (with
    /// differential privacy, its `clip_norm` applies instead).
    pub clip_norm: f64,
    /// Updates weigh `min(examples, weight_cap) / weight_cap` (0: all equal;
    /// forced to 0 with differential privacy).
    pub weight_cap: u64,
    /// Fewest clients a phase may close with (0: rounds.min_fit_clients, at
    /// least 2).
    pub min_clients: usize,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        SecureAggregationConfig {
            enabled: false,
            degree: 0,
            threshold: 0.5,
            phase_timeout_secs: 30.0,
            clip_norm: 10.0,
            weight_cap: 1000,
            min_clients: 0,
        }
    }
}

impl SecureAggregationConfig {
    /// The coordinator's settings when enabled; errors name the key.
    pub fn settings(
        &self,
        rounds: &RoundsConfig,
        dp: &DifferentialPrivacyConfig,
    ) -> Result<Option<crate::secagg::SecAggSettings>, String> {
        if !self.enabled {
            return Ok(None);
        }
        if !(self.phase_timeout_secs.is_finite() && self.phase_timeout_secs > 0.0) {
            return Err("secure_aggregation.phase_timeout_secs must be in (0, 3600]".into());
        }
        let settings = crate::secagg::SecAggSettings {
            degree: self.degree,
            threshold: self.threshold,
            phase_timeout: Duration::from_secs_f64(self.phase_timeout_secs.min(3600.0)),
            clip_norm: match dp.enabled {
                true => dp.clip_norm,
                false => self.clip_norm,
            },
            weight_cap: match dp.enabled {
                true => 0,
                false => self.weight_cap,
            },
            min_clients: match self.min_clients {
                0 => rounds.min_fit_clients.max(2),
                n => n,
            },
        };
        settings.validate()?;
        Ok(Some(settings))
    }
}

/// Differential privacy (see [`crate::privacy`]): clipped, equally weighted
/// updates, Gaussian noise on their sum, and an RDP accountant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DifferentialPrivacyConfig {
    pub enabled: bool,
    /// "central" (the aggregator adds the noise) or "distributed" (clients
    /// add Skellam shares before masking; needs [secure_aggregation]).
    pub mode: String,
    /// L2 clip norm C of each update (the initial one with adaptive clipping).
    pub clip_norm: f64,
    /// Noise standard deviation on the sum, in units of C.
    pub noise_multiplier: f64,
    /// Delta of the reported (epsilon, delta).
    pub delta: f64,
    /// Clients that may be sampled: the sampling rate is clients per round
    /// over this (required).
    pub population: usize,
    /// "fixed" (what the engine does: a fixed number without replacement)
    /// or "poisson" (an approximation that gives smaller epsilons).
    pub sampling: String,
    /// Stop (or warn, see `on_budget`) before a round that would take
    /// epsilon past this; 0 only reports epsilon.
    pub epsilon_budget: f64,
    /// "stop" or "warn".
    pub on_budget: String,
    /// Adaptive clipping (Andrew et al. 2021): move C towards the
    /// `target_quantile` of update norms (central mode).
    pub adaptive_clipping: bool,
    pub target_quantile: f64,
    pub clip_learning_rate: f64,
    /// Noise on the count of unclipped updates (must exceed noise_multiplier / 2).
    pub count_noise_std: f64,
}

impl Default for DifferentialPrivacyConfig {
    fn default() -> Self {
        DifferentialPrivacyConfig {
            enabled: false,
            mode: "central".into(),
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            population: 0,
            sampling: "fixed".into(),
            epsilon_budget: 0.0,
            on_budget: "stop".into(),
            adaptive_clipping: false,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            count_noise_std: 5.0,
        }
    }
}

impl DifferentialPrivacyConfig {
    /// The run's privacy when enabled; errors name the key.
    pub fn privacy(&self) -> Result<Option<crate::privacy::Privacy>, String> {
        use fedquic_privacy::dp;
        if !self.enabled {
            return Ok(None);
        }
        // One of two named settings; the error names the key and both.
        fn pick<T: Copy>(key: &str, value: &str, options: [(&str, T); 2]) -> Result<T, String> {
            options
                .iter()
                .find(|(name, _)| *name == value)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    format!(
                        "differential_privacy.{key} must be \"{}\" or \"{}\", not {value:?}",
                        options[0].0, options[1].0
                    )
                })
        }
        let mode = pick(
            "mode",
            &self.mode,
            [
                ("central", dp::DpMode::Central),
                ("distributed", dp::DpMode::Distributed),
            ],
        )?;
        let sampling = pick(
            "sampling",
            &self.sampling,
            [
                ("fixed", dp::Sampling::FixedSizeWithoutReplacement),
                ("poisson", dp::Sampling::Poisson),
            ],
        )?;
        let on_budget = pick(
            "on_budget",
            &self.on_budget,
            [("stop", dp::OnBudget::Stop), ("warn", dp::OnBudget::Warn)],
        )?;
        if self.population == 0 {
            return Err(
                "differential_privacy.population is required: how many clients may be sampled"
                    .into(),
            );
        }
        let config = dp::DpConfig {
            mode,
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            delta: self.delta,
            epsilon_budget: (self.epsilon_budget != 0.0).then_some(self.epsilon_budget),
            on_budget,
            sampling,
            adaptive_clipping: self.adaptive_clipping.then_some(dp::AdaptiveClipConfig {
                target_quantile: self.target_quantile,
                learning_rate: self.clip_learning_rate,
                count_noise_std: self.count_noise_std,
            }),
        };
        crate::privacy::Privacy::new(config, self.population).map(Some)
    }
}

/// Asynchronous FedBuff instead of synchronous rounds (see
/// [`crate::fedbuff`]). With it, `rounds.count` is the number of server
/// steps (model versions) and `rounds.deadline_secs` the time one task may
/// take.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FedBuffConfig {
    pub enabled: bool,
    /// Clients training at once.
    pub concurrency: usize,
    /// Updates per server step.
    pub buffer_size: usize,
    /// Updates from a model more versions old than this are refused.
    pub max_staleness: u64,
    /// `constant`, `polynomial:A` (weight `(1 + tau)^-A`) or `hinge:A,B`.
    pub staleness: String,
    /// Checkpoint every this many server steps (and after the last).
    pub checkpoint_every: u64,
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        let d = FedBuffSettings::default();
        FedBuffConfig {
            enabled: false,
            concurrency: d.concurrency,
            buffer_size: d.buffer_size,
            max_staleness: d.max_staleness,
            staleness: d.staleness.to_string(),
            checkpoint_every: d.checkpoint_every,
        }
    }
}

impl FedBuffConfig {
    /// The coordinator's settings when enabled; errors name the key.
    pub fn settings(&self) -> Result<Option<FedBuffSettings>, String> {
        if !self.enabled {
            return Ok(None);
        }
        let settings = FedBuffSettings {
            concurrency: self.concurrency,
            buffer_size: self.buffer_size,
            max_staleness: self.max_staleness,
            staleness: self
                .staleness
                .parse()
                .map_err(|e| format!("fedbuff.staleness: {e}"))?,
            checkpoint_every: self.checkpoint_every,
        };
        settings.validate()?;
        Ok(Some(settings))
    }
}

/// Which codecs updates (uplink) and models (downlink) may travel in, best
/// first. Each client gets the first one it offers; a client offering none
/// is refused with the list. See `fedquic_protocol::codec`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CodecsConfig {
    /// `f32`, `f16`, `bf16`, `int8`, `top-k:FRACTION`, `top-k:FRACTION+f16|bf16|int8`.
    pub uplink: Vec<String>,
    /// `f32`, `f16` or `bf16` (models are not sparsified or int8-rounded).
    pub downlink: Vec<String>,
}

impl Default for CodecsConfig {
    /// Lossless both ways.
    fn default() -> Self {
        CodecsConfig {
            uplink: vec!["f32".into()],
            downlink: vec!["f32".into()],
        }
    }
}

/// Most codecs one direction may list.
pub const MAX_CODECS: usize = 16;

/// The parsed [`CodecsConfig`]: what the server negotiates with.
#[derive(Clone, Debug, PartialEq)]
pub struct CodecPreference {
    pub uplink: Vec<Codec>,
    pub downlink: Vec<Codec>,
}

impl Default for CodecPreference {
    fn default() -> Self {
        CodecPreference {
            uplink: vec![Codec::F32],
            downlink: vec![Codec::F32],
        }
    }
}

impl CodecPreference {
    /// Checks both lists: non-empty, at most [`MAX_CODECS`], valid codecs,
    /// and only dense f32/f16/bf16 downlink.
    pub fn validate(&self) -> Result<(), String> {
        for (key, list) in [
            ("codecs.uplink", &self.uplink),
            ("codecs.downlink", &self.downlink),
        ] {
            if list.is_empty() || list.len() > MAX_CODECS {
                return Err(format!("{key} must list 1..={MAX_CODECS} codecs"));
            }
            for c in list {
                c.validate().map_err(|e| format!("{key}: {e}"))?;
                if *c == Codec::Ring32 {
                    return Err(format!(
                        "{key}: ring32 carries secure aggregation's masked inputs and is not \
                         negotiated (enable [secure_aggregation] instead)"
                    ));
                }
            }
        }
        if let Some(bad) = self
            .downlink
            .iter()
            .find(|c| !matches!(c, Codec::F32 | Codec::F16 | Codec::Bf16))
        {
            return Err(format!(
                "codecs.downlink: {bad} is not a model codec (use f32, f16 or bf16)"
            ));
        }
        Ok(())
    }
}

impl CodecsConfig {
    /// Parses and checks the lists; the error names the key.
    pub fn preference(&self) -> Result<CodecPreference, String> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .map(|s| s.parse::<Codec>().map_err(|e| format!("{key}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        let preference = CodecPreference {
            uplink: parse("codecs.uplink", &self.uplink)?,
            downlink: parse("codecs.downlink", &self.downlink)?,
        };
        preference.validate()?;
        Ok(preference)
    }
}

/// How much one update may weigh and move the model (see
/// [`UpdatePolicy`]), and the check on each new global model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatesConfig {
    /// A client's weight is min(its example count, this).
    pub max_examples_per_update: u64,
    /// No client carries more than this share of a round's total weight
    /// (1.0 turns the cap off).
    pub max_weight_share: f64,
    /// Absolute bound on an update's L2 norm (0: none).
    pub max_update_norm: f64,
    /// Bound on an update's L2 norm as a multiple of the previous round's
    /// median update norm (0: none).
    pub max_update_norm_median_multiple: f64,
    /// "clip" (scale down to the bound) or "reject".
    pub norm_policy: NormPolicy,
    /// A new global model with a parameter beyond this (or not finite) is
    /// not committed.
    pub max_parameter_abs: f64,
    /// Client-reported losses above this are ignored.
    pub max_client_loss: f64,
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        let p = UpdatePolicy::default();
        UpdatesConfig {
            max_examples_per_update: p.max_examples_per_update,
            max_weight_share: p.max_weight_share,
            max_update_norm: p.max_update_norm.unwrap_or(0.0),
            max_update_norm_median_multiple: p.max_update_norm_median_multiple.unwrap_or(0.0),
            norm_policy: p.norm_policy,
            max_parameter_abs: p.max_parameter_abs,
            max_client_loss: p.max_client_loss,
        }
    }
}

impl UpdatesConfig {
    pub fn policy(&self) -> UpdatePolicy {
        let positive = |v: f64| (v > 0.0).then_some(v);
        UpdatePolicy {
            max_examples_per_update: self.max_examples_per_update,
            max_weight_share: self.max_weight_share,
            max_update_norm: positive(self.max_update_norm),
            max_update_norm_median_multiple: positive(self.max_update_norm_median_multiple),
            norm_policy: self.norm_policy,
            max_parameter_abs: self.max_parameter_abs,
            max_client_loss: self.max_client_loss,
        }
    }
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
    /// Cross-device check-in: a connection gets at most one training task.
    /// A client selected once is not selected again until it reconnects,
    /// so a round only draws from clients that checked in since (devices
    /// that leave after reporting, or the simulator's materialised clients).
    pub one_task_per_connection: bool,
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
    /// Seconds a client has to send an update's header once it opens the
    /// stream.
    pub header_timeout_secs: f64,
    /// An upload must finish within `upload_grace_secs` plus its size at
    /// `min_upload_bytes_per_sec`, or it is cut off and its buffer freed.
    pub upload_grace_secs: f64,
    pub min_upload_bytes_per_sec: f64,
    /// Log lines about one client's misbehaviour allowed per minute; the
    /// rest are counted and summarised.
    pub client_log_lines_per_minute: u32,
    /// QUIC handshakes in progress at most; further attempts are ignored
    /// until one completes or times out.
    pub max_handshakes: usize,
    /// Seconds a QUIC/TLS handshake may take before its state is freed.
    pub quic_handshake_timeout_secs: f64,
    /// Address validation (QUIC Retry): "under-load" (default: once 16
    /// handshakes are in progress), "always" or "never".
    pub retry: RetryMode,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryMode {
    UnderLoad,
    Always,
    Never,
}

impl LimitsConfig {
    /// The handshake admission settings these limits describe.
    pub fn admission(&self) -> fedquic_net::admission::AdmissionConfig {
        use fedquic_net::admission::{AdmissionConfig, RetryPolicy};
        let defaults = AdmissionConfig::default();
        AdmissionConfig {
            retry: match self.retry {
                RetryMode::UnderLoad => defaults.retry,
                RetryMode::Always => RetryPolicy::Always,
                RetryMode::Never => RetryPolicy::Never,
            },
            max_handshakes: self.max_handshakes,
            handshake_timeout: Duration::from_secs_f64(self.quic_handshake_timeout_secs),
            ..defaults
        }
    }
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
            updates: UpdatesConfig::default(),
            strategy: StrategyConfig::default(),
            codecs: CodecsConfig::default(),
            fedbuff: FedBuffConfig::default(),
            secure_aggregation: SecureAggregationConfig::default(),
            differential_privacy: DifferentialPrivacyConfig::default(),
            metrics: MetricsConfig::default(),
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
            one_task_per_connection: false,
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
            header_timeout_secs: 10.0,
            upload_grace_secs: 30.0,
            min_upload_bytes_per_sec: 64.0 * 1024.0,
            client_log_lines_per_minute: 10,
            max_handshakes: fedquic_net::admission::AdmissionConfig::default().max_handshakes,
            quic_handshake_timeout_secs: 5.0,
            retry: RetryMode::UnderLoad,
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

    /// Checks every value against its bounds; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let r = &self.rounds;
        if !(1..=MAX_ROUNDS).contains(&r.count) {
            return bad(format!("rounds.count must be in 1..={MAX_ROUNDS}"));
        }
        if !(r.fraction_fit > 0.0 && r.fraction_fit <= 1.0) {
            return bad("rounds.fraction_fit must be in (0, 1]".into());
        }
        if r.min_fit_clients == 0 || r.max_fit_clients < r.min_fit_clients {
            return bad("rounds.min_fit_clients must be >= 1 and <= rounds.max_fit_clients".into());
        }
        for (key, v) in [
            ("rounds.min_fit_clients", r.min_fit_clients),
            ("rounds.max_fit_clients", r.max_fit_clients),
            ("rounds.min_available_clients", r.min_available_clients),
            ("evaluate.min_clients", self.evaluate.min_clients),
            ("limits.max_clients", self.limits.max_clients),
            (
                "limits.max_inflight_updates",
                self.limits.max_inflight_updates,
            ),
            ("state.keep_checkpoints", self.state.keep_checkpoints),
        ] {
            if v > MAX_COUNT {
                return bad(format!("{key} = {v} is above the limit {MAX_COUNT}"));
            }
        }
        if r.max_retries > 1000 {
            return bad("rounds.max_retries must be at most 1000".into());
        }
        if !(0.0..=1.0).contains(&self.evaluate.fraction) {
            return bad("evaluate.fraction must be in [0, 1]".into());
        }
        self.fit_instructions()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[fit]: {e}")))?;
        if self.limits.max_clients == 0 || self.limits.max_inflight_updates == 0 {
            return bad(
                "limits.max_clients and limits.max_inflight_updates must be at least 1".into(),
            );
        }
        if self.state.keep_checkpoints == 0 {
            return bad("state.keep_checkpoints must be at least 1".into());
        }
        let l = &self.limits;
        for (key, v, max) in [
            ("rounds.deadline_secs", r.deadline_secs, MAX_DURATION_SECS),
            (
                "limits.handshake_timeout_secs",
                l.handshake_timeout_secs,
                3600.0,
            ),
            ("limits.idle_timeout_secs", l.idle_timeout_secs, 3600.0),
            ("limits.header_timeout_secs", l.header_timeout_secs, 3600.0),
            (
                "limits.upload_grace_secs",
                l.upload_grace_secs,
                MAX_DURATION_SECS,
            ),
            (
                "limits.min_upload_bytes_per_sec",
                l.min_upload_bytes_per_sec,
                1e12,
            ),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= max) {
                return bad(format!("{key} must be a positive number of at most {max}"));
            }
        }
        if !(l.quic_handshake_timeout_secs.is_finite()
            && l.quic_handshake_timeout_secs > 0.0
            && l.quic_handshake_timeout_secs <= 120.0)
        {
            return bad("limits.quic_handshake_timeout_secs must be in (0, 120]".into());
        }
        l.admission()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("limits.max_handshakes: {e}")))?;
        if l.client_log_lines_per_minute == 0 || l.client_log_lines_per_minute > 10_000 {
            return bad("limits.client_log_lines_per_minute must be in 1..=10000".into());
        }
        self.strategy.validate().map_err(ConfigError::Invalid)?;
        self.codecs.preference().map_err(ConfigError::Invalid)?;
        self.metrics.listen_addr().map_err(ConfigError::Invalid)?;
        if self.rounds.one_task_per_connection {
            if self.fedbuff.enabled {
                return bad(
                    "rounds.one_task_per_connection is for synchronous rounds; it cannot run \
                     with [fedbuff]"
                        .into(),
                );
            }
            if self.evaluate.fraction > 0.0 {
                return bad(
                    "evaluate.fraction must be 0 with rounds.one_task_per_connection (clients \
                     leave after their training task; use evaluate.test_data for central \
                     evaluation)"
                        .into(),
                );
            }
        }
        if self
            .fedbuff
            .settings()
            .map_err(ConfigError::Invalid)?
            .is_some()
        {
            if self.evaluate.fraction > 0.0 {
                return bad(
                    "evaluate.fraction must be 0 with [fedbuff] (no rounds to evaluate in; \
                     use evaluate.test_data for central evaluation)"
                        .into(),
                );
            }
            let strategy = self
                .strategy
                .build(1)
                .map_err(|e| ConfigError::Invalid(format!("[strategy]: {e}")))?;
            if strategy.robust().is_some()
                || strategy.control_variate().is_some()
                || strategy.wants_initial_loss()
            {
                return bad(format!(
                    "strategy.name = \"{}\" needs whole rounds and cannot run with [fedbuff]",
                    self.strategy.name
                ));
            }
        }
        self.check_privacy()?;
        let u = &self.updates;
        if u.max_examples_per_update == 0 || u.max_examples_per_update > MAX_EXAMPLES_PER_UPDATE {
            return bad(format!(
                "updates.max_examples_per_update must be in 1..={MAX_EXAMPLES_PER_UPDATE}"
            ));
        }
        if !(u.max_weight_share > 0.0 && u.max_weight_share <= 1.0) {
            return bad("updates.max_weight_share must be in (0, 1]".into());
        }
        for (key, v) in [
            ("updates.max_update_norm", u.max_update_norm),
            (
                "updates.max_update_norm_median_multiple",
                u.max_update_norm_median_multiple,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{key} must be a finite number >= 0 (0: no bound)"));
            }
        }
        for (key, v) in [
            ("updates.max_parameter_abs", u.max_parameter_abs),
            ("updates.max_client_loss", u.max_client_loss),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{key} must be a positive, finite number"));
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

    /// Secure aggregation and differential privacy against everything
    /// else: the combinations that cannot work are refused by name.
    fn check_privacy(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let privacy = self
            .differential_privacy
            .privacy()
            .map_err(ConfigError::Invalid)?;
        let secagg = self
            .secure_aggregation
            .settings(&self.rounds, &self.differential_privacy)
            .map_err(ConfigError::Invalid)?;
        if let Some(p) = &privacy
            && p.mode() == fedquic_privacy::dp::DpMode::Distributed
            && secagg.is_none()
        {
            return bad(
                "differential_privacy.mode = \"distributed\" needs [secure_aggregation] \
                 enabled (clients add noise before masking)"
                    .into(),
            );
        }
        if (privacy.is_some() || secagg.is_some()) && self.fedbuff.enabled {
            return bad(
                "[fedbuff] folds individual updates as they arrive; it cannot run with \
                 [secure_aggregation] or [differential_privacy]"
                    .into(),
            );
        }
        let section = match (&secagg, &privacy) {
            (Some(_), _) => "[secure_aggregation]",
            (None, Some(_)) => "[differential_privacy]",
            (None, None) => return Ok(()),
        };
        let strategy = self
            .strategy
            .build(1)
            .map_err(|e| ConfigError::Invalid(format!("[strategy]: {e}")))?;
        if strategy.robust().is_some()
            || strategy.control_variate().is_some()
            || strategy.wants_initial_loss()
            || strategy.clip_norm().is_some()
        {
            return bad(format!(
                "strategy.name = \"{}\" needs individual updates and cannot run with {section} \
                 (use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad; clipping is \
                 done by {section} itself)",
                self.strategy.name
            ));
        }
        if secagg.is_some() {
            if self.updates.max_update_norm > 0.0 {
                return bad("updates.max_update_norm needs individual updates, which \
                     [secure_aggregation] hides: set secure_aggregation.clip_norm (clients \
                     clip before masking)"
                    .into());
            }
            if self.evaluate.fraction > 0.0 {
                return bad(
                    "evaluate.fraction must be 0 with [secure_aggregation] (use \
                     evaluate.test_data for central evaluation)"
                        .into(),
                );
            }
        }
        Ok(())
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
            one_task_per_connection: r.one_task_per_connection,
            updates: self.privacy_policy(),
            strategy: self.strategy.clone(),
        }
    }

    /// The update policy, with what secure aggregation or differential
    /// privacy replace: under secure aggregation there are no individual
    /// norms to bound (clients clip); under central DP without it, every
    /// update is clipped to C and weighs 1.
    fn privacy_policy(&self) -> UpdatePolicy {
        let mut policy = self.updates.policy();
        if self.secure_aggregation.enabled {
            policy.max_update_norm = None;
            policy.max_update_norm_median_multiple = None;
        } else if self.differential_privacy.enabled {
            policy.max_update_norm = Some(self.differential_privacy.clip_norm);
            policy.max_update_norm_median_multiple = None;
            policy.norm_policy = NormPolicy::Clip;
            policy.max_examples_per_update = 1;
            policy.max_weight_share = 1.0;
        }
        policy
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
    fn the_metrics_endpoint_is_off_unless_an_address_is_given() {
        let c = AggregatorConfig::default();
        assert_eq!(c.metrics.listen_addr().unwrap(), None);
        let c: AggregatorConfig = toml::from_str("[metrics]\nlisten = \"127.0.0.1:9464\"").unwrap();
        assert_eq!(
            c.metrics.listen_addr().unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        c.validate().unwrap();
        let c: AggregatorConfig = toml::from_str("[metrics]\nlisten = \"localhost:80\"").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("metrics.listen"), "{e}");
        assert!(toml::from_str::<AggregatorConfig>("[metrics]\nport = 9464").is_err());
    }

    #[test]
    fn codec_lists_are_parsed_and_bad_ones_name_their_key() {
        let c: AggregatorConfig = toml::from_str(
            "[codecs]\nuplink = [\"top-k:0.01+int8\", \"f16\"]\ndownlink = [\"bf16\", \"f32\"]",
        )
        .unwrap();
        let p = c.codecs.preference().unwrap();
        assert_eq!(p.uplink[1], Codec::F16);
        assert_eq!(p.downlink, vec![Codec::Bf16, Codec::F32]);
        for (toml, key) in [
            ("[codecs]\nuplink = [\"f64\"]", "codecs.uplink"),
            ("[codecs]\nuplink = []", "codecs.uplink"),
            ("[codecs]\ndownlink = [\"int8\"]", "codecs.downlink"),
            ("[codecs]\ndownlink = [\"top-k:0.1\"]", "codecs.downlink"),
        ] {
            let c: AggregatorConfig = toml::from_str(toml).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn privacy_sections_refuse_what_cannot_work_together() {
        let refused = |toml: &str, needle: &str| {
            let c: AggregatorConfig = toml::from_str(toml).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        };
        let secagg = "[secure_aggregation]\nenabled = true\n";
        refused(
            &format!("{secagg}[strategy]\nname = \"krum\"\n"),
            "needs individual updates",
        );
        refused(
            &format!("{secagg}[updates]\nmax_update_norm = 5.0\n"),
            "updates.max_update_norm",
        );
        refused(&format!("{secagg}[fedbuff]\nenabled = true\n"), "[fedbuff]");
        refused(
            "[differential_privacy]\nenabled = true\nmode = \"distributed\"\npopulation = 100\n",
            "needs [secure_aggregation]",
        );
        refused(
            "[differential_privacy]\nenabled = true\n",
            "differential_privacy.population",
        );
        refused(
            "[differential_privacy]\nenabled = true\npopulation = 10\nnoise_multiplier = -1.0\n",
            "noise_multiplier",
        );
        refused(
            &format!("{secagg}degree = 1000\n"),
            "secure_aggregation.degree",
        );
        // Together they work, and DP moves the clip norm and the weights.
        let c: AggregatorConfig = toml::from_str(&format!(
            "{secagg}[differential_privacy]\nenabled = true\nmode = \"distributed\"\n\
             population = 100\nclip_norm = 2.0\n"
        ))
        .unwrap();
        c.validate().unwrap();
        let s = c
            .secure_aggregation
            .settings(&c.rounds, &c.differential_privacy)
            .unwrap()
            .unwrap();
        assert_eq!((s.clip_norm, s.weight_cap), (2.0, 0));
        // Central DP without secure aggregation: clip to C, weight 1.
        let c: AggregatorConfig = toml::from_str(
            "[differential_privacy]\nenabled = true\npopulation = 10\nclip_norm = 3.0\n",
        )
        .unwrap();
        c.validate().unwrap();
        let u = c.engine_config().updates;
        assert_eq!(u.max_update_norm, Some(3.0));
        assert_eq!(u.max_examples_per_update, 1);
    }

    #[test]
    fn fedbuff_section_is_checked_against_the_strategy_and_evaluation() {
        let c: AggregatorConfig = toml::from_str(
            "[fedbuff]\nenabled = true\nconcurrency = 4\nstaleness = \"hinge:10,4\"",
        )
        .unwrap();
        c.validate().unwrap();
        let s = c.fedbuff.settings().unwrap().unwrap();
        assert_eq!(s.concurrency, 4);
        assert_eq!(s.staleness.to_string(), "hinge:10,4");
        assert!(
            AggregatorConfig::default()
                .fedbuff
                .settings()
                .unwrap()
                .is_none()
        );
        for (toml, key) in [
            (
                "[fedbuff]\nenabled = true\nstaleness = \"x\"",
                "fedbuff.staleness",
            ),
            (
                "[fedbuff]\nenabled = true\nbuffer_size = 0",
                "fedbuff.buffer_size",
            ),
            (
                "[fedbuff]\nenabled = true\n[strategy]\nname = \"krum\"",
                "cannot run with [fedbuff]",
            ),
            (
                "[fedbuff]\nenabled = true\n[evaluate]\nfraction = 0.5",
                "evaluate.fraction",
            ),
            (
                "[rounds]\none_task_per_connection = true\n[fedbuff]\nenabled = true",
                "one_task_per_connection",
            ),
            (
                "[rounds]\none_task_per_connection = true\n[evaluate]\nfraction = 0.5",
                "evaluate.fraction",
            ),
        ] {
            let c: AggregatorConfig = toml::from_str(toml).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
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

#[cfg(test)]
mod property_tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::engine::RoundEngine;

    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e19),
            Just(1e300),
            Just(-1.0),
            Just(0.0),
            0.001f64..1000.0,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Random configs never panic: either `validate` names the bad key,
        /// or the engine starts, runs a tick far in the future and keeps
        /// going.
        #[test]
        fn random_configs_are_refused_or_run_without_panics(
            deadline in any_f64(),
            handshake in any_f64(),
            idle in any_f64(),
            header in any_f64(),
            grace in any_f64(),
            rate in prop_oneof![any_f64(), 1e-300f64..1.0],
            fraction in any_f64(),
            share in any_f64(),
            norm in any_f64(),
            multiple in any_f64(),
            max_abs in any_f64(),
            count in any::<u64>(),
            min_fit in any::<usize>(),
            max_examples in any::<u64>(),
            lr in any::<f32>(),
            epochs in any::<u32>(),
            batch in any::<u32>(),
        ) {
            let mut c = AggregatorConfig::default();
            c.rounds.deadline_secs = deadline;
            c.limits.handshake_timeout_secs = handshake;
            c.limits.idle_timeout_secs = idle;
            c.limits.header_timeout_secs = header;
            c.limits.upload_grace_secs = grace;
            c.limits.min_upload_bytes_per_sec = rate;
            c.rounds.fraction_fit = fraction;
            c.updates.max_weight_share = share;
            c.updates.max_update_norm = norm;
            c.updates.max_update_norm_median_multiple = multiple;
            c.updates.max_parameter_abs = max_abs;
            c.rounds.count = count;
            c.rounds.min_fit_clients = min_fit;
            c.updates.max_examples_per_update = max_examples;
            c.fit.learning_rate = lr;
            c.fit.epochs = epochs;
            c.fit.batch_size = batch;
            if c.validate().is_ok() {
                let now = Instant::now();
                let mut engine = RoundEngine::new(c.engine_config(), vec![0.0; 3], 0);
                engine.start(now);
                for i in 0..3 {
                    engine.client_joined(format!("c{i}"), now);
                }
                engine.tick(now + std::time::Duration::from_secs(30 * 24 * 3600));
                // The largest upload deadline the server can compute: a
                // 2^32-value model at the minimum rate.
                let _ = Duration::from_secs_f64(c.limits.upload_grace_secs)
                    + Duration::from_secs_f64(4.0 * 2f64.powi(32) / c.limits.min_upload_bytes_per_sec);
            } else {
                let e = c.validate().unwrap_err().to_string();
                prop_assert!(e.contains('.') || e.contains("[fit]"), "error names a key: {}", e);
            }
        }
    }
}
