//! Optimizers for local training: SGD (momentum, Nesterov, weight decay) and Adam, with
//! an optional FedProx proximal term. Their state lives for one `fit` call: a fresh local
//! optimizer per round, as FedAvg clients do.

use crate::backend::{AdamStep, Backend, SgdStep};
use crate::error::{Result, TrainError};

/// The update rule of [`crate::Model::fit`]. Both follow PyTorch's `torch.optim` classes
/// (weight decay is an L2 term added to the gradient, applied to every parameter,
/// biases included; the FedProx term `proximal_mu * (w - w_global)` is added the same way).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `v = momentum * v + g` (v starts at 0, so the first step's `v` is `g`);
    /// `w -= lr * v`, or with Nesterov `w -= lr * (g + momentum * v)`. `momentum = 0`
    /// is plain SGD.
    Sgd {
        /// In `[0, 1)`.
        momentum: f32,
        /// Requires `momentum > 0`.
        nesterov: bool,
        /// Finite, not negative.
        weight_decay: f32,
    },
    /// Adam (Kingma & Ba) with bias correction.
    Adam {
        /// In `[0, 1)`; 0.9 is usual.
        beta1: f32,
        /// In `[0, 1)`; 0.999 is usual.
        beta2: f32,
        /// Finite and positive; 1e-8 is usual.
        epsilon: f32,
        /// Finite, not negative.
        weight_decay: f32,
    },
}

/// Plain SGD: no momentum, no weight decay.
impl Default for Optimizer {
    fn default() -> Optimizer {
        Optimizer::sgd()
    }
}

impl Optimizer {
    /// Plain SGD.
    pub const fn sgd() -> Optimizer {
        Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// Adam with PyTorch's defaults (0.9, 0.999, 1e-8, no weight decay).
    pub const fn adam() -> Optimizer {
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// Checks the hyper-parameters' ranges.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: String| Err(TrainError::InvalidConfig(what));
        let unit = |value: f32| value.is_finite() && (0.0..1.0).contains(&value);
        let decay_ok = |value: f32| value.is_finite() && value >= 0.0;
        match *self {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                if !unit(momentum) {
                    return invalid(format!("SGD momentum must be in [0, 1), got {momentum}"));
                }
                if nesterov && momentum == 0.0 {
                    return invalid("Nesterov SGD needs a momentum above 0".to_string());
                }
                if !decay_ok(weight_decay) {
                    return invalid(format!(
                        "weight_decay must be finite and not negative, got {weight_decay}"
                    ));
                }
            }
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                if !unit(beta1) || !unit(beta2) {
                    return invalid(format!(
                        "Adam betas must be in [0, 1), got {beta1} and {beta2}"
                    ));
                }
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return invalid(format!(
                        "Adam epsilon must be finite and positive, got {epsilon}"
                    ));
                }
                if !decay_ok(weight_decay) {
                    return invalid(format!(
                        "weight_decay must be finite and not negative, got {weight_decay}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One `fit` call's optimizer: the rule, its constants and its state buffers.
pub(crate) struct OptimizerState<B: Backend> {
    optimizer: Optimizer,
    learning_rate: f32,
    proximal_mu: f32,
    /// SGD velocity, or Adam's first moment (empty when unused).
    first: Option<B::Buffer>,
    /// Adam's second moment.
    second: Option<B::Buffer>,
    /// Steps taken so far (Adam's bias correction).
    steps: u64,
}

impl<B: Backend> OptimizerState<B> {
    /// Fresh state (zeroed moments) for `num_params` parameters.
    pub fn new(
        backend: &B,
        optimizer: Optimizer,
        learning_rate: f32,
        proximal_mu: f32,
        num_params: usize,
    ) -> OptimizerState<B> {
        let (first, second) = match optimizer {
            Optimizer::Sgd { momentum, .. } if momentum != 0.0 => {
                (Some(backend.zeros(num_params)), None)
            }
            Optimizer::Sgd { .. } => (None, None),
            Optimizer::Adam { .. } => (
                Some(backend.zeros(num_params)),
                Some(backend.zeros(num_params)),
            ),
        };
        OptimizerState {
            optimizer,
            learning_rate,
            proximal_mu,
            first,
            second,
            steps: 0,
        }
    }

    /// The weight decay to fuse into the backward pass, when this is plain SGD without a
    /// proximal term (then [`OptimizerState::step`] is not needed).
    pub fn fused_weight_decay(&self) -> Option<f32> {
        match self.optimizer {
            Optimizer::Sgd {
                momentum,
                weight_decay,
                ..
            } if momentum == 0.0 && self.proximal_mu == 0.0 => Some(weight_decay),
            _ => None,
        }
    }

    /// Applies one step from the gradient `grads` of the mean batch loss. `anchor` (the
    /// parameters at the start of `fit`) is needed when `proximal_mu != 0`.
    pub fn step(
        &mut self,
        backend: &B,
        params: &mut B::Buffer,
        grads: &B::Buffer,
        anchor: Option<&B::Buffer>,
        num_params: usize,
    ) -> Result<()> {
        self.steps += 1;
        let range = 0..num_params;
        let anchor = match anchor {
            Some(anchor) if self.proximal_mu != 0.0 => Some(backend.src(anchor, range.clone())?),
            _ => None,
        };
        let params = backend.dst(params, range.clone())?;
        let grads = backend.src(grads, range.clone())?;
        match self.optimizer {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                let step = SgdStep {
                    learning_rate: self.learning_rate,
                    momentum,
                    nesterov,
                    weight_decay,
                    proximal_mu: self.proximal_mu,
                };
                let velocity = match self.first.as_mut() {
                    Some(buffer) => Some(backend.dst(buffer, range)?),
                    None => None,
                };
                backend.sgd_step(&step, params, grads, velocity, anchor)
            }
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                // Bias corrections in f64: beta^t underflows gracefully and stays exact
                // enough for the long runs where it matters.
                let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
                let step = AdamStep {
                    learning_rate: self.learning_rate,
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay,
                    proximal_mu: self.proximal_mu,
                    bias_correction1: (1.0 - f64::from(beta1).powi(t)) as f32,
                    bias_correction2_sqrt: (1.0 - f64::from(beta2).powi(t)).sqrt() as f32,
                };
                let (Some(first), Some(second)) = (self.first.as_mut(), self.second.as_mut())
                else {
                    return Err(TrainError::InvalidConfig(
                        "Adam state missing (bug)".to_string(),
                    ));
                };
                let moment1 = backend.dst(first, range.clone())?;
                let moment2 = backend.dst(second, range)?;
                backend.adam_step(&step, params, grads, moment1, moment2, anchor)
            }
        }
    }
}
