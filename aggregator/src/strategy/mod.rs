//! Aggregation strategies: how the round's mean client delta becomes the
//! next global model (the server step), and what each round asks clients
//! to do.
//!
//! Every strategy here is *streaming*: updates are folded into one weighted
//! sum as they arrive ([`FedAvgAccumulator`], which also applies the update
//! gate's weight caps), so memory stays O(model) however many clients answer.
//! At the end of a round the strategy turns the mean delta
//! `d = sum_i w_i delta_i / sum_i w_i` (the FedOpt papers' "pseudo-gradient",
//! with the sign of a descent direction) into the new model.
//!
//! Adding a strategy is one file with one [`Strategy`] impl, plus one line
//! in [`by_name`]. The server step is checked before it is committed: the
//! engine first asks [`Strategy::check`] whether the new model would be
//! finite and within bounds, and only then calls [`Strategy::apply`], which
//! updates the model and the strategy's own state (momentum, moments) in one
//! pass. A round that fails the check leaves both untouched.

mod accumulator;
mod fedavg;
mod fedavgm;
mod fedopt;
mod normbounded;
mod qfedavg;
pub mod robust;
mod robust_strategies;
mod scaffold;

use fedquic_protocol::{FitInstructions, Metrics};
use serde::{Deserialize, Serialize};

pub use accumulator::{FedAvgAccumulator, ModelCheckError, WeightReport, fedavg_batch};
pub use fedavg::{FedAvg, FedProx};
pub use fedavgm::FedAvgM;
pub use fedopt::{FedOpt, FedOptKind};
pub use normbounded::NormBoundedFedAvg;
pub use qfedavg::QFedAvg;
pub use robust_strategies::{RobustRule, RobustStrategy};
pub use scaffold::Scaffold;

/// One update that passed the engine's gate, as [`Strategy::accept`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct UpdateInput<'a> {
    /// FedAvg's weight: the claimed example count, capped per client.
    pub weight: f64,
    /// The model delta as received (the accumulator folds `scale * delta`).
    pub delta: &'a [f32],
    /// L2 norm of `delta` before clipping, and the clipping factor in (0, 1].
    pub norm: f64,
    pub scale: f64,
    /// What the client reported with the update (untrusted).
    pub metrics: &'a Metrics,
    /// The values after the model (SCAFFOLD's `Delta c`, already checked
    /// finite and of the right length); empty for other strategies.
    pub extra: &'a [f32],
    /// The clients' learning rate this round.
    pub client_lr: f64,
    /// The update gate's absolute bound on norms, its bound as a multiple of
    /// the previous round's median, and whether updates over a bound are
    /// refused rather than clipped (strategies apply them to their own extra
    /// values).
    pub max_update_norm: Option<f64>,
    pub norm_median_multiple: Option<f64>,
    pub reject_over_bound: bool,
}

/// Why [`Strategy::accept`] refused an update.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateRefused {
    /// The refusal is a norm bound (counted as `norm_bound`; otherwise as
    /// `strategy`).
    pub norm_bound: bool,
    pub reason: String,
}

/// A server-side aggregation strategy (streaming: see the module docs).
pub trait Strategy: Send + std::fmt::Debug {
    /// The name it is registered under (`[strategy] name = ...`).
    fn name(&self) -> &'static str;

    /// The fit instructions for `round`, from the configured ones (FedProx
    /// sets its proximal term here).
    fn configure_fit(&self, _round: u64, base: &FitInstructions) -> FitInstructions {
        base.clone()
    }

    /// The new value of parameter `i` from the current value `g` and the
    /// mean delta `d`, without changing any state (default: FedAvg's `g + d`).
    fn peek(&self, _i: usize, g: f32, d: f64) -> f64 {
        g as f64 + d
    }

    /// Applies the server step to the whole model, updating the strategy's
    /// state; `model[i]` must become exactly what [`Strategy::peek`] said
    /// (default: FedAvg's `w + d`).
    fn apply(&mut self, model: &mut [f32], sum: &[f64], inv_weight: f64) {
        for (g, s) in model.iter_mut().zip(sum) {
            *g = (*g as f64 + s * inv_weight) as f32;
        }
    }

    /// Checks the model the server step would produce: every value finite and
    /// at most `max_abs` in absolute value.
    fn check(
        &self,
        model: &[f32],
        sum: &[f64],
        inv_weight: f64,
        max_abs: f64,
    ) -> Result<(), ModelCheckError> {
        check_peeked_model(self, model, sum, inv_weight, max_abs)
    }

    /// The strategy's state (server momentum, moments...), for checkpoints
    /// (default: none).
    fn state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores what [`Strategy::state`] saved, for a model of `len` values
    /// (default: there must be nothing to restore).
    fn restore(&mut self, state: &[u8], _len: usize) -> Result<(), String> {
        match state.is_empty() {
            true => Ok(()),
            false => Err(format!("{} keeps no state", self.name())),
        }
    }

    fn clone_box(&self) -> Box<dyn Strategy>;

    /// Strategies that need the whole round's updates at once (median,
    /// trimmed mean, Krum, Bulyan) return themselves here; the engine then
    /// holds the round's updates and aggregates them with
    /// [`RobustStrategy::aggregate`] before the server step.
    fn robust(&self) -> Option<&RobustStrategy> {
        None
    }

    /// An L2 bound every update is clipped to before it is folded, on top of
    /// the update gate's (norm-bounded FedAvg).
    fn clip_norm(&self) -> Option<f64> {
        None
    }

    /// Whether fit tasks ask clients for the loss of the received model
    /// before training (q-FedAvg).
    fn wants_initial_loss(&self) -> bool {
        false
    }

    /// A vector sent down with every fit task after the model, whose
    /// per-client change comes back after the update (SCAFFOLD's control
    /// variate `c`); updates then carry twice the model's values.
    fn control_variate(&self) -> Option<&[f32]> {
        None
    }

    /// Whether the update gate's share cap applies to the fold weights
    /// (q-FedAvg weighs by loss, not by example counts, and bounds that).
    fn uses_share_cap(&self) -> bool {
        true
    }

    /// A fit phase starts with `clients` connected: forget the previous
    /// attempt's per-update state.
    fn begin_round(&mut self, _clients: usize) {}

    /// Sees every update that passed the gate, before it is folded, and
    /// returns the weight to fold it with (default: FedAvg's `weight`).
    fn accept(&mut self, update: &UpdateInput<'_>) -> Result<f64, UpdateRefused> {
        Ok(update.weight)
    }

    /// The factor the round's weighted sum is multiplied by to give the
    /// step `d` of [`Strategy::peek`] (default: the mean, `1 / weight_used`).
    fn sum_scale(&self, weight_used: f64) -> f64 {
        1.0 / weight_used
    }
}

impl Clone for Box<dyn Strategy> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Every registered strategy name, for help texts and errors.
pub const STRATEGY_NAMES: &[&str] = &[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "normbounded",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
    "scaffold",
];

/// `[strategy]` in the aggregator's config (and the simulator's flags): a
/// name and the parameters of that strategy; parameters a strategy does not
/// use are ignored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    /// One of [`STRATEGY_NAMES`].
    pub name: String,
    /// Server learning rate (FedAvgM, FedAdam, FedYogi, FedAdagrad).
    pub server_lr: f64,
    /// Server momentum (FedAvgM).
    pub server_momentum: f64,
    /// First and second moment decay (FedAdam, FedYogi).
    pub beta1: f64,
    pub beta2: f64,
    /// Adaptivity (epsilon) of the adaptive optimizers.
    pub tau: f64,
    /// FedProx's proximal term mu, sent to clients every round.
    pub mu: f32,
    /// Norm-bounded FedAvg: the L2 norm every update is clipped to.
    pub clip_norm: f64,
    /// FedTrimmedAvg: fraction trimmed at each end, in [0, 0.5).
    pub trim: f64,
    /// Krum, Multi-Krum, Bulyan: Byzantine clients tolerated.
    pub byzantine_f: usize,
    /// Multi-Krum: updates averaged.
    pub krum_m: usize,
    /// Robust strategies: updates held per round at most (K), and the memory
    /// they may take (K x parameters x 4 bytes), checked at startup.
    pub max_held_updates: usize,
    pub memory_budget_mb: f64,
    /// q-FedAvg's fairness exponent q (0 is an unweighted mean step).
    pub q: f64,
    /// q-FedAvg's Lipschitz constant L; 0 derives it from the clients'
    /// learning rate as `1 / lr`, as the paper does.
    pub q_lipschitz: f64,
    /// q-FedAvg: the largest initial loss a client may report (losses must
    /// also be finite and at least 1e-6); others are refused.
    pub q_max_loss: f64,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            name: "fedavg".into(),
            server_lr: 1.0,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            mu: 0.01,
            clip_norm: 1.0,
            trim: 0.2,
            byzantine_f: 1,
            krum_m: 5,
            max_held_updates: 1000,
            memory_budget_mb: 2048.0,
            q: 1.0,
            q_lipschitz: 0.0,
            q_max_loss: 1e3,
        }
    }
}

impl StrategyConfig {
    /// Checks the name and the parameters that strategy uses.
    pub fn validate(&self) -> Result<(), String> {
        if !STRATEGY_NAMES.contains(&self.name.as_str()) {
            return Err(format!(
                "unknown strategy '{}'; available: {}",
                self.name,
                STRATEGY_NAMES.join(", ")
            ));
        }
        let positive = |key: &str, v: f64, max: f64| {
            if v.is_finite() && v > 0.0 && v <= max {
                Ok(())
            } else {
                Err(format!("strategy.{key} must be in (0, {max}], got {v}"))
            }
        };
        let unit = |key: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("strategy.{key} must be in [0, 1), got {v}"))
            }
        };
        positive("server_lr", self.server_lr, 1e3)?;
        unit("server_momentum", self.server_momentum)?;
        unit("beta1", self.beta1)?;
        unit("beta2", self.beta2)?;
        positive("tau", self.tau, 1e3)?;
        positive("clip_norm", self.clip_norm, 1e12)?;
        if !(self.mu.is_finite() && self.mu >= 0.0 && self.mu <= 1e3) {
            return Err(format!("strategy.mu must be in [0, 1000], got {}", self.mu));
        }
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!(
                "strategy.trim must be in [0, 0.5), got {}",
                self.trim
            ));
        }
        if self.byzantine_f > 10_000 || self.krum_m == 0 || self.krum_m > 100_000 {
            return Err(
                "strategy.byzantine_f must be at most 10000 and strategy.krum_m in 1..=100000"
                    .into(),
            );
        }
        if self.max_held_updates == 0 || self.max_held_updates > 100_000 {
            return Err("strategy.max_held_updates must be in 1..=100000".into());
        }
        positive("memory_budget_mb", self.memory_budget_mb, 1e7)?;
        if !(self.q.is_finite() && (0.0..=20.0).contains(&self.q)) {
            return Err(format!("strategy.q must be in [0, 20], got {}", self.q));
        }
        if !(self.q_lipschitz.is_finite() && (0.0..=1e6).contains(&self.q_lipschitz)) {
            return Err(format!(
                "strategy.q_lipschitz must be in [0, 1e6] (0: 1 / client lr), got {}",
                self.q_lipschitz
            ));
        }
        if !(self.q_max_loss.is_finite() && (1e-3..=1e6).contains(&self.q_max_loss)) {
            return Err(format!(
                "strategy.q_max_loss must be in [0.001, 1e6], got {}",
                self.q_max_loss
            ));
        }
        Ok(())
    }

    /// Whether fit streams carry a control variate after the model (and
    /// updates one after the delta): SCAFFOLD.
    pub fn carries_control_variate(&self) -> bool {
        self.name == "scaffold"
    }

    /// For robust strategies: checks that `max_fit` selected clients fit the
    /// held-update limit and the memory budget for a model of `len` values,
    /// and that the rule can work with them.
    pub fn check_capacity(&self, len: usize, max_fit: usize, min_fit: usize) -> Result<(), String> {
        let Ok(strategy) = self.build(len) else {
            return self.validate();
        };
        let Some(robust) = strategy.robust() else {
            return Ok(());
        };
        if max_fit > self.max_held_updates {
            return Err(format!(
                "strategy {} holds every update of a round: rounds.max_fit_clients ({max_fit}) \
                 must be at most strategy.max_held_updates ({})",
                self.name, self.max_held_updates
            ));
        }
        let mb = max_fit as f64 * len as f64 * 4.0 / 1e6;
        if mb > self.memory_budget_mb {
            return Err(format!(
                "strategy {} would hold {max_fit} updates x {len} parameters x 4 bytes = {mb:.0} MB, \
                 over strategy.memory_budget_mb ({:.0}); lower rounds.max_fit_clients or raise the budget",
                self.name, self.memory_budget_mb
            ));
        }
        if min_fit < robust.min_updates() {
            return Err(format!(
                "strategy {} needs at least {} updates a round (f = {}): raise rounds.min_fit_clients ({min_fit})",
                self.name,
                robust.min_updates(),
                self.byzantine_f
            ));
        }
        Ok(())
    }

    /// The strategy, for a model of `len` values.
    pub fn build(&self, len: usize) -> Result<Box<dyn Strategy>, String> {
        self.validate()?;
        by_name(self, len)
    }
}

/// The registry: a strategy by name.
pub fn by_name(c: &StrategyConfig, len: usize) -> Result<Box<dyn Strategy>, String> {
    Ok(match c.name.as_str() {
        "fedavg" => Box::new(FedAvg),
        "fedprox" => Box::new(FedProx { mu: c.mu }),
        "fedavgm" => Box::new(FedAvgM::new(len, c.server_lr, c.server_momentum)),
        "fedadam" => Box::new(FedOpt::new(FedOptKind::Adam, len, c)),
        "fedyogi" => Box::new(FedOpt::new(FedOptKind::Yogi, len, c)),
        "fedadagrad" => Box::new(FedOpt::new(FedOptKind::Adagrad, len, c)),
        "normbounded" => Box::new(NormBoundedFedAvg {
            clip_norm: c.clip_norm,
        }),
        "fedmedian" => Box::new(RobustStrategy {
            rule: RobustRule::Median,
        }),
        "fedtrimmedavg" => Box::new(RobustStrategy {
            rule: RobustRule::TrimmedMean { beta: c.trim },
        }),
        "krum" => Box::new(RobustStrategy {
            rule: RobustRule::MultiKrum {
                f: c.byzantine_f,
                m: 1,
            },
        }),
        "multikrum" => Box::new(RobustStrategy {
            rule: RobustRule::MultiKrum {
                f: c.byzantine_f,
                m: c.krum_m,
            },
        }),
        "bulyan" => Box::new(RobustStrategy {
            rule: RobustRule::Bulyan { f: c.byzantine_f },
        }),
        "qfedavg" => Box::new(QFedAvg::new(c)),
        "scaffold" => Box::new(Scaffold::new(len, c.server_lr)),
        other => {
            return Err(format!(
                "unknown strategy '{other}'; available: {}",
                STRATEGY_NAMES.join(", ")
            ));
        }
    })
}

/// Little-endian f32 vectors, concatenated: the state format of the
/// strategies that keep per-parameter vectors.
pub(crate) fn encode_vectors(vectors: &[&[f32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vectors.iter().map(|v| v.len() * 4).sum());
    for v in vectors {
        for x in *v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// The inverse of [`encode_vectors`] for `count` vectors of `len` values.
pub(crate) fn decode_vectors(
    bytes: &[u8],
    count: usize,
    len: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let expected = count
        .checked_mul(len)
        .and_then(|n| n.checked_mul(4))
        .ok_or("strategy state size overflows")?;
    if bytes.len() != expected {
        return Err(format!(
            "strategy state has {} bytes, expected {expected} ({count} vectors of {len} values)",
            bytes.len()
        ));
    }
    let mut values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let vectors: Vec<Vec<f32>> = (0..count)
        .map(|_| values.by_ref().take(len).collect())
        .collect();
    if vectors.iter().flatten().any(|v| !v.is_finite()) {
        return Err("strategy state holds a non-finite value".into());
    }
    Ok(vectors)
}

/// The default [`Strategy::check`]: every value [`Strategy::peek`] gives is
/// finite and at most `max_abs` in absolute value. Strategies that check more
/// (SCAFFOLD's control variate) call it first.
pub(crate) fn check_peeked_model<S: Strategy + ?Sized>(
    strategy: &S,
    model: &[f32],
    sum: &[f64],
    inv_weight: f64,
    max_abs: f64,
) -> Result<(), ModelCheckError> {
    for (i, (g, s)) in model.iter().zip(sum).enumerate() {
        let v = strategy.peek(i, *g, s * inv_weight) as f32;
        if !v.is_finite() {
            return Err(ModelCheckError::NotFinite { index: i });
        }
        if (v as f64).abs() > max_abs {
            return Err(ModelCheckError::OutOfBounds {
                index: i,
                value: v as f64,
                bound: max_abs,
            });
        }
    }
    Ok(())
}
