//! The [`Trainer`] trait: how a training engine plugs into the client. The
//! built-in [`LocalTrainer`] trains fedquic-train models on local data.

use std::sync::Arc;

use fedquic_protocol::{FitInstructions, Metrics, OptimizerConfig};
use fedquic_train::backend::Engine;
use fedquic_train::layout::ParamLayout;
use fedquic_train::{Dataset, FitConfig, Model, ModelSpec, Optimizer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainerError {
    #[error("this trainer cannot train model '{spec}': {reason}")]
    Unsupported { spec: String, reason: String },
    #[error("no model loaded: set_parameters must come first")]
    NoModel,
    #[error(transparent)]
    Train(#[from] fedquic_train::TrainError),
    #[error("{0}")]
    Other(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct FitOutcome {
    /// Examples trained on: the update's weight in FedAvg.
    pub examples: u64,
    pub metrics: Metrics,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalOutcome {
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// A local training engine over a flat vector of named f32 tensors (the
/// layout is the aggregator's model spec, see [`ParamLayout`]).
pub trait Trainer: Send + 'static {
    /// Checks that this trainer can work with the aggregator's model.
    fn prepare(&mut self, layout: &ParamLayout) -> Result<(), TrainerError>;
    /// The current local parameters (empty before `set_parameters`).
    fn parameters(&self) -> &[f32];
    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError>;
    /// Trains locally from the current parameters.
    fn fit(&mut self, config: &FitInstructions) -> Result<FitOutcome, TrainerError>;
    /// Evaluates the current parameters on local data.
    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError>;
    /// Frees the model between tasks; idle clients then hold only their data.
    fn release(&mut self) {}
    /// Mean training loss of the current parameters on the local training
    /// data, without training (q-FedAvg's `F_k`, asked for by
    /// `FitTask::initial_loss`).
    fn training_loss(&mut self) -> Result<f64, TrainerError> {
        Err(TrainerError::Other(
            "this trainer cannot report its loss before training (q-FedAvg)".into(),
        ))
    }
    /// SCAFFOLD: trains like [`Trainer::fit`] with every gradient `g`
    /// replaced by `g + correction` (`c - c_i`, one value per parameter) and
    /// returns the outcome with the number of local steps taken (`K`).
    fn fit_corrected(
        &mut self,
        _config: &FitInstructions,
        _correction: &[f32],
    ) -> Result<(FitOutcome, u64), TrainerError> {
        Err(TrainerError::Other(
            "this trainer cannot apply a gradient correction (SCAFFOLD)".into(),
        ))
    }
    /// The training backend reported in the Hello (`cpu`, `wgpu`, ...): a short name of
    /// `[a-z0-9_-]` (see `fedquic_protocol::Hello::validate`).
    fn backend(&self) -> &str {
        "cpu"
    }
    /// How many examples a training batch can hold at most, when known: a batch
    /// never exceeds the local training set, so the training-memory check uses
    /// `min(batch_size, this)`.
    fn training_examples(&self) -> Option<usize> {
        None
    }
}

/// The built-in trainer: a fedquic-train model over this client's share of
/// a dataset. The model exists only while a task runs, so thousands of idle
/// simulated clients cost little more than their index lists.
pub struct LocalTrainer {
    train: Arc<Dataset>,
    train_indices: Vec<usize>,
    test: Arc<Dataset>,
    test_indices: Vec<usize>,
    spec: Option<ModelSpec>,
    model: Option<Model>,
    engine: Engine,
}

impl LocalTrainer {
    pub fn new(
        train: Arc<Dataset>,
        train_indices: Vec<usize>,
        test: Arc<Dataset>,
        test_indices: Vec<usize>,
    ) -> Self {
        LocalTrainer {
            train,
            train_indices,
            test,
            test_indices,
            spec: None,
            model: None,
            engine: Engine::Cpu(fedquic_train::backend::CpuBackend),
        }
    }

    /// Trains and evaluates on `engine` instead of the CPU.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    pub fn num_train_examples(&self) -> usize {
        self.train_indices.len()
    }
}

impl Trainer for LocalTrainer {
    fn prepare(&mut self, layout: &ParamLayout) -> Result<(), TrainerError> {
        let unsupported = |reason: String| TrainerError::Unsupported {
            spec: layout.to_string(),
            reason,
        };
        let spec = layout
            .model_spec()
            .ok_or_else(|| unsupported("not a trainable model spec".into()))?;
        if spec.input_dim() != self.train.dim {
            return Err(unsupported(format!(
                "model takes {} inputs, local data has {}",
                spec.input_dim(),
                self.train.dim
            )));
        }
        if spec.num_classes() < self.train.classes {
            return Err(unsupported(format!(
                "model has {} classes, local data has {}",
                spec.num_classes(),
                self.train.classes
            )));
        }
        if self.train_indices.is_empty() {
            return Err(unsupported("this client has no training examples".into()));
        }
        self.spec = Some(spec.clone());
        Ok(())
    }

    fn parameters(&self) -> &[f32] {
        self.model.as_ref().map(|m| m.parameters()).unwrap_or(&[])
    }

    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        if self.model.is_none() {
            let spec = self.spec.clone().ok_or(TrainerError::NoModel)?;
            self.model = Some(Model::try_new(spec, 0)?);
        }
        let model = self.model.as_mut().ok_or(TrainerError::NoModel)?;
        Ok(model.set_parameters(params)?)
    }

    fn fit(&mut self, config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        let model = self.model.as_mut().ok_or(TrainerError::NoModel)?;
        let cfg = fit_config(config);
        let stats = self
            .engine
            .fit(model, &self.train, &self.train_indices, &cfg)?;
        Ok(fit_outcome(&stats))
    }

    fn training_loss(&mut self) -> Result<f64, TrainerError> {
        let model = self.model.as_ref().ok_or(TrainerError::NoModel)?;
        let stats = self
            .engine
            .evaluate(model, &self.train, &self.train_indices)?;
        Ok(stats.loss as f64)
    }

    fn fit_corrected(
        &mut self,
        config: &FitInstructions,
        correction: &[f32],
    ) -> Result<(FitOutcome, u64), TrainerError> {
        let model = self.model.as_mut().ok_or(TrainerError::NoModel)?;
        let cfg = fit_config(config);
        let stats =
            self.engine
                .fit_corrected(model, &self.train, &self.train_indices, &cfg, correction)?;
        let steps = fedquic_train::local_steps(self.train_indices.len(), &cfg);
        Ok((fit_outcome(&stats), steps))
    }

    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        let model = self.model.as_ref().ok_or(TrainerError::NoModel)?;
        let stats = self
            .engine
            .evaluate(model, &self.test, &self.test_indices)?;
        Ok(EvalOutcome {
            examples: stats.examples as u64,
            loss: stats.loss as f64,
            accuracy: stats.accuracy as f64,
        })
    }

    fn release(&mut self) {
        self.model = None;
    }

    fn backend(&self) -> &str {
        self.engine.name()
    }

    fn training_examples(&self) -> Option<usize> {
        Some(self.train_indices.len())
    }
}

fn fit_outcome(stats: &fedquic_train::FitStats) -> FitOutcome {
    FitOutcome {
        examples: stats.examples as u64,
        metrics: vec![
            ("loss".into(), stats.loss as f64),
            ("accuracy".into(), stats.accuracy as f64),
        ],
    }
}

/// The training library's settings for a task's instructions.
fn fit_config(config: &FitInstructions) -> FitConfig {
    FitConfig {
        epochs: config.epochs,
        batch_size: config.batch_size as usize,
        learning_rate: config.learning_rate,
        seed: config.seed,
        proximal_mu: config.proximal_mu,
        optimizer: match config.optimizer {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            },
            OptimizerConfig::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            },
        },
    }
}
