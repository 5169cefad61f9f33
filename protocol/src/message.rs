//! Control-stream messages. Small by construction: models never travel here,
//! they go on their own tensor streams (see [`crate::tensor`]).

use serde::{Deserialize, Serialize};

use fedquic_privacy::secagg;

use crate::codec::Codec;
use crate::error::{ProtocolError, Result};

/// The protocol version this build speaks best.
///
/// Version 2 added [`FitTask::initial_loss`] (q-FedAvg) and
/// [`FitTask::scaffold`] (SCAFFOLD's control variates on the model and
/// update streams). Version 3 added codecs besides f32 and a [`Welcome`]
/// with an uplink and a downlink codec and the run id. An older peer would
/// misread the newer messages, so only the newest version is spoken: old
/// peers get a clear "no common version" refusal at Hello (whose encoding
/// is unchanged for a client offering f32 only). Version 4 added secure
/// aggregation: [`FitTask::secagg`] and [`Message::SecAgg`].
pub const PROTOCOL_VERSION: u16 = 4;
/// Every version this build can speak, newest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[4];

/// Named scalar metrics (loss, accuracy, ...), in a stable order.
pub type Metrics = Vec<(String, f64)>;

/// The client's opening message on the control stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u16>,
    /// Codecs the client can decode and encode.
    pub codecs: Vec<Codec>,
    /// Free-form software identification, for logs.
    pub agent: String,
    /// The client's training backend (`cpu`, `wgpu`), for the aggregator's metrics: at
    /// most [`Hello::MAX_BACKEND_LEN`] bytes of `[a-z0-9_-]` (see [`Hello::validate`]).
    pub backend: String,
}

impl Hello {
    /// Longest accepted [`Hello::backend`].
    pub const MAX_BACKEND_LEN: usize = 32;
    /// Most codecs one client may offer.
    pub const MAX_CODECS: usize = 32;

    /// Checks the fields a receiver stores or shows: `backend` must be a short plain
    /// name, so it is safe in metrics files and logs.
    pub fn validate(&self) -> Result<()> {
        let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if self.backend.is_empty()
            || self.backend.len() > Hello::MAX_BACKEND_LEN
            || !self.backend.chars().all(plain)
        {
            return Err(ProtocolError::Malformed(format!(
                "hello: backend must be 1..={} characters of [a-z0-9_-], got {:.40?}",
                Hello::MAX_BACKEND_LEN,
                self.backend
            )));
        }
        if self.codecs.is_empty() || self.codecs.len() > Hello::MAX_CODECS {
            return Err(ProtocolError::Malformed(format!(
                "hello: offer 1..={} codecs, not {}",
                Hello::MAX_CODECS,
                self.codecs.len()
            )));
        }
        self.codecs.iter().try_for_each(|c| c.validate())
    }
}

/// The aggregator's answer to an acceptable [`Hello`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Welcome {
    pub version: u16,
    /// How this client encodes its updates (one of its [`Hello::codecs`]).
    pub uplink: Codec,
    /// How the aggregator encodes the models it sends this client.
    pub downlink: Codec,
    /// The model spec string (for example `mlp:784-200-200-10`).
    pub model_spec: String,
    /// The identity the aggregator knows this client by (its certificate name).
    pub client_name: String,
    /// The federated run: state a client keeps between tasks (error-feedback
    /// residuals, SCAFFOLD variates) belongs to one run. See [`validate_run_id`].
    pub run: String,
}

impl Welcome {
    /// Checks what a client stores or acts on: codecs it offered (`offered`),
    /// a dense downlink codec, and a plain run id.
    pub fn validate(&self, offered: &[Codec]) -> Result<()> {
        for (what, codec) in [("uplink", self.uplink), ("downlink", self.downlink)] {
            codec.validate()?;
            if !offered.iter().any(|o| o.same_family(codec)) {
                return Err(ProtocolError::Malformed(format!(
                    "welcome: {what} codec {codec} was not offered"
                )));
            }
        }
        if self.uplink == Codec::Ring32 || self.downlink == Codec::Ring32 {
            return Err(ProtocolError::Malformed(
                "welcome: ring32 is secure aggregation's masked encoding, not a negotiable codec"
                    .into(),
            ));
        }
        if self.downlink.top_k_ppm().is_some() {
            return Err(ProtocolError::Malformed(
                "welcome: models are not sent with a top-k codec".into(),
            ));
        }
        validate_run_id(&self.run)
    }
}

/// Longest accepted run id.
pub const MAX_RUN_LEN: usize = 64;

/// A run id is 1 to [`MAX_RUN_LEN`] bytes of `[A-Za-z0-9_.-]`: safe to store,
/// compare and log.
pub fn validate_run_id(run: &str) -> Result<()> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if run.is_empty() || run.len() > MAX_RUN_LEN || !run.chars().all(plain) {
        return Err(ProtocolError::Malformed(format!(
            "run id must be 1..={MAX_RUN_LEN} characters of [A-Za-z0-9_.-], got {run:.40?}"
        )));
    }
    Ok(())
}

/// The client's local optimizer (fresh for every task, as in FedAvg).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// SGD, optionally with (Nesterov) momentum and L2 weight decay.
    Sgd {
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

impl Default for OptimizerConfig {
    /// Plain SGD, the FedAvg paper's client optimizer.
    fn default() -> Self {
        OptimizerConfig::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(ProtocolError::Malformed(format!("optimizer: {what}")));
        let unit = |v: f32| v.is_finite() && (0.0..1.0).contains(&v);
        let non_negative = |v: f32| v.is_finite() && v >= 0.0;
        match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                if !unit(momentum) {
                    return bad("momentum must be in [0, 1)");
                }
                if nesterov && momentum == 0.0 {
                    return bad("Nesterov needs a non-zero momentum");
                }
                if !non_negative(weight_decay) {
                    return bad("weight decay must be finite and non-negative");
                }
            }
            OptimizerConfig::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                if !unit(beta1) || !unit(beta2) {
                    return bad("Adam betas must be in [0, 1)");
                }
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return bad("Adam epsilon must be finite and positive");
                }
                if !non_negative(weight_decay) {
                    return bad("weight decay must be finite and non-negative");
                }
            }
        }
        Ok(())
    }
}

/// Local training settings sent with each fit task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FitInstructions {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// FedProx proximal term; 0 is plain FedAvg.
    pub proximal_mu: f32,
    /// Seed for the client's shuffling, so a run can be replayed.
    pub seed: u64,
    pub optimizer: OptimizerConfig,
}

impl FitInstructions {
    /// Checks values a client must not trust blindly.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(ProtocolError::Malformed(format!(
                "fit instructions: {what}"
            )))
        };
        if self.epochs == 0 || self.epochs > 10_000 {
            return bad("epochs must be in 1..=10000");
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return bad("batch size must be in 1..=1048576");
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return bad("learning rate must be finite and positive");
        }
        if !self.proximal_mu.is_finite() || self.proximal_mu < 0.0 {
            return bad("proximal mu must be finite and non-negative");
        }
        self.optimizer.validate()
    }
}

/// Train on the global model that follows on a tensor stream with the same task id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FitTask {
    pub round: u64,
    pub task_id: u64,
    pub config: FitInstructions,
    /// q-FedAvg: report the mean training loss of the received model, before
    /// any training, as the update's metric [`INITIAL_LOSS_METRIC`].
    pub initial_loss: bool,
    /// SCAFFOLD: the model stream also carries the server's control variate
    /// `c` (the model's tensors again, each name prefixed with
    /// [`CONTROL_PREFIX`]), training uses the corrected gradient, and the
    /// update carries `Delta c` after `Delta y` in the same layout.
    pub scaffold: Option<ScaffoldTask>,
    /// Secure aggregation (SecAgg+): the client takes part in the round's
    /// key exchange ([`Message::SecAgg`]) while it trains, and sends its
    /// update clipped, weighted, quantised and masked, in [`Codec::Ring32`].
    pub secagg: Option<SecAggTask>,
}

/// How a client prepares its update for secure aggregation.
///
/// The update `delta` is clipped to L2 norm `clip_norm`, multiplied by its
/// weight `w = min(examples, weight_cap) / weight_cap` (or 1 when
/// `weight_cap` is 0, as differential privacy needs), has the client's
/// noise share added, and is quantised with
/// `fedquic_privacy::secagg::FixedPoint::for_sum(max_contributors, bound)`:
/// each value clamped to `[-bound, bound]`, scaled so that `max_contributors`
/// such vectors cannot wrap modulo 2^32, stochastically rounded. Two values
/// follow the update: `w`, and 1 if the update was within `clip_norm` before
/// clipping (else 0), so the server learns the sums of both and nothing per
/// client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecAggTask {
    pub clip_norm: f64,
    pub weight_cap: u64,
    /// Each quantised value is clamped to `[-bound, bound]` first.
    pub bound: f64,
    /// The most clients whose inputs the round may sum.
    pub max_contributors: u32,
    /// Distributed differential privacy: the noise this client adds before
    /// masking, so the server never sees a noise-free sum.
    pub noise: ClientNoise,
}

/// Noise a client adds to its quantised update before masking.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum ClientNoise {
    None,
    /// Distributed DP: Skellam noise `Poisson(mu) - Poisson(mu)` on every
    /// quantised value (integer units), so the sum of the contributors'
    /// shares is Skellam noise of their summed `mu` (Agarwal, Kairouz and
    /// Liu, NeurIPS 2021).
    Skellam {
        mu: f64,
    },
}

impl SecAggTask {
    /// Largest accepted clip norm and bound (in update units).
    pub const MAX_MAGNITUDE: f64 = 1e6;
    /// Largest accepted Skellam `mu` (integer units): the largest mean the
    /// clients' exact Poisson sampler takes (`fedquic_privacy::dp::MAX_POISSON_MEAN`,
    /// checked equal there), so a task that validates can be noised.
    pub const MAX_SKELLAM_MU: f64 = 1e15;

    /// Checks what a client must not trust blindly: every number finite and
    /// in range, and a fixed-point scale that exists for them.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Err(ProtocolError::Malformed(format!(
                "secure aggregation: {what}"
            )))
        };
        let magnitude = |v: f64| v.is_finite() && v > 0.0 && v <= Self::MAX_MAGNITUDE;
        if !magnitude(self.clip_norm) || !magnitude(self.bound) || self.bound < 1.0 {
            return bad(format!(
                "clip norm {} must be in (0, {max}] and bound {} in [1, {max}]",
                self.clip_norm,
                self.bound,
                max = Self::MAX_MAGNITUDE
            ));
        }
        if self.max_contributors == 0 || self.max_contributors > secagg::MAX_ROSTER {
            return bad(format!(
                "max contributors {} must be in 1..={}",
                self.max_contributors,
                secagg::MAX_ROSTER
            ));
        }
        if let Err(e) = self.fixed_point() {
            return bad(e.to_string());
        }
        if let ClientNoise::Skellam { mu } = self.noise
            && !(mu.is_finite() && mu > 0.0 && mu <= Self::MAX_SKELLAM_MU)
        {
            return bad(format!(
                "Skellam mu {mu} must be in (0, {}]",
                Self::MAX_SKELLAM_MU
            ));
        }
        Ok(())
    }

    /// The fixed-point code both sides use.
    pub fn fixed_point(&self) -> std::result::Result<secagg::FixedPoint, secagg::FixedPointError> {
        secagg::FixedPoint::for_sum(self.max_contributors as usize, self.bound)
    }

    /// Values a masked input carries: the update's, then the weight and
    /// the within-clip indicator.
    pub fn vector_len(update_values: usize) -> usize {
        update_values + SECAGG_EXTRA_VALUES
    }
}

/// Values after the update in a masked input: weight, within-clip indicator.
pub const SECAGG_EXTRA_VALUES: usize = 2;

/// The layout of a masked input: `layout`, then the weight and the
/// within-clip indicator as one-value tensors.
pub fn with_secagg_layout(layout: &[crate::tensor::TensorMeta]) -> Vec<crate::tensor::TensorMeta> {
    let mut out = layout.to_vec();
    out.push(crate::tensor::TensorMeta::f32("secagg.weight", &[1]));
    out.push(crate::tensor::TensorMeta::f32("secagg.within_clip", &[1]));
    out
}

/// The metric name of [`FitTask::initial_loss`]'s answer.
pub const INITIAL_LOSS_METRIC: &str = "initial_loss";

/// Prefix of the control-variate tensors' names on SCAFFOLD streams.
pub const CONTROL_PREFIX: &str = "scaffold.c/";

/// What a SCAFFOLD fit task tells the client besides the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScaffoldTask {
    /// The federated run this task belongs to: a client keeps its control
    /// variate `c_i` per run, and starts from zero in a new one. At most
    /// [`ScaffoldTask::MAX_RUN_LEN`] bytes of `[A-Za-z0-9_.-]`.
    pub run: String,
}

impl ScaffoldTask {
    /// Longest accepted [`ScaffoldTask::run`].
    pub const MAX_RUN_LEN: usize = MAX_RUN_LEN;

    /// Checks the run id a client stores and compares.
    pub fn validate(&self) -> Result<()> {
        validate_run_id(&self.run)
    }
}

/// The layout of a SCAFFOLD stream: `layout`, then `layout` again with every
/// name prefixed by [`CONTROL_PREFIX`].
pub fn with_control_layout(layout: &[crate::tensor::TensorMeta]) -> Vec<crate::tensor::TensorMeta> {
    let control = layout.iter().map(|t| crate::tensor::TensorMeta {
        name: format!("{CONTROL_PREFIX}{}", t.name),
        ..t.clone()
    });
    layout.iter().cloned().chain(control).collect()
}

/// Evaluate the global model that follows on a tensor stream with the same task id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvaluateTask {
    pub round: u64,
    pub task_id: u64,
}

/// A client's answer to an [`EvaluateTask`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalResult {
    pub round: u64,
    pub task_id: u64,
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// Why the aggregator turned a client away, and when to come back if ever.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Reject {
    pub reason: String,
    /// `Some` means "try again after this long"; `None` means "do not retry".
    pub retry_after_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    FitTask(FitTask),
    EvaluateTask(EvaluateTask),
    EvalResult(EvalResult),
    /// The client could not complete a task (bad data, training diverged...).
    TaskFailed {
        task_id: u64,
        reason: String,
    },
    /// The aggregator accepted the update for this task.
    UpdateAccepted {
        task_id: u64,
    },
    /// The aggregator refused the update for this task; the connection stays up.
    UpdateRejected {
        task_id: u64,
        reason: String,
    },
    /// Nothing to do for now; stay connected.
    Wait {
        round: u64,
    },
    Reject(Reject),
    Heartbeat,
    /// The sender is closing the session on purpose. From the aggregator,
    /// `finished` means the federated run is complete (clients exit);
    /// otherwise clients reconnect later (for example after a restart).
    Bye {
        reason: String,
        finished: bool,
    },
    /// One step of a fit task's secure aggregation (see [`SecAggStep`]).
    SecAgg {
        task_id: u64,
        step: SecAggStep,
    },
}

/// The SecAgg+ steps that travel on the control stream (the masked input
/// itself goes on the update stream). Bell et al., CCS 2020.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum SecAggStep {
    /// Client: its two fresh public keys for the round.
    AdvertiseKeys(secagg::AdvertiseKeys),
    /// Aggregator: the client's roster index and its neighbours' keys.
    Neighbours(secagg::Neighbours),
    /// Client: a share bundle for each neighbour, encrypted to it.
    ShareKeys(secagg::ShareKeys),
    /// Aggregator: the bundles other clients addressed to this one.
    RelayedShares(secagg::RelayedShares),
    /// Aggregator: which neighbours survived and which dropped.
    UnmaskRequest(secagg::UnmaskRequest),
    /// Client: the shares the request asked for.
    UnmaskResponse(secagg::UnmaskResponse),
}

impl SecAggStep {
    /// Bounds every list and field before the step is used.
    pub fn validate(&self) -> Result<()> {
        let checked = match self {
            SecAggStep::AdvertiseKeys(m) => m.validate(),
            SecAggStep::Neighbours(m) => m.validate(),
            SecAggStep::ShareKeys(m) => m.validate(),
            SecAggStep::RelayedShares(m) => m.validate(),
            SecAggStep::UnmaskRequest(m) => m.validate(),
            SecAggStep::UnmaskResponse(m) => m.validate(),
        };
        checked.map_err(|e| ProtocolError::Malformed(format!("secure aggregation: {e}")))
    }

    /// The step's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            SecAggStep::AdvertiseKeys(_) => "advertise keys",
            SecAggStep::Neighbours(_) => "neighbours",
            SecAggStep::ShareKeys(_) => "share keys",
            SecAggStep::RelayedShares(_) => "relayed shares",
            SecAggStep::UnmaskRequest(_) => "unmask request",
            SecAggStep::UnmaskResponse(_) => "unmask response",
        }
    }
}

/// Picks the newest version both sides speak.
pub fn negotiate_version(offered: &[u16]) -> Result<u16> {
    SUPPORTED_VERSIONS
        .iter()
        .copied()
        .find(|v| offered.contains(v))
        .ok_or_else(|| ProtocolError::NoCommonVersion {
            offered: offered.iter().copied().take(16).collect(),
            supported: SUPPORTED_VERSIONS.to_vec(),
        })
}
