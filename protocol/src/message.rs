//! Control-stream messages. Small by construction: models never travel here,
//! they go on their own tensor streams (see [`crate::tensor`]).

use serde::{Deserialize, Serialize};

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
/// is unchanged for a client offering f32 only).
pub const PROTOCOL_VERSION: u16 = 3;
/// Every version this build can speak, newest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[3];

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
