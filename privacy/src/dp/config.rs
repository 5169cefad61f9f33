//! Differential-privacy configuration, as the aggregator embeds it in its TOML:
//!
//! ```toml
//! [dp]
//! mode = "central"            # or "distributed" (clients add Skellam noise under SecAgg)
//! clip_norm = 1.0
//! noise_multiplier = 1.1      # noise std / clip_norm on the sum
//! delta = 1e-5
//! epsilon_budget = 8.0        # optional
//! on_budget = "stop"          # or "warn"
//! sampling = "fixed_size_without_replacement"   # or "poisson"
//! [dp.adaptive_clipping]      # optional
//! target_quantile = 0.5
//! learning_rate = 0.2
//! count_noise_std = 10.0
//! ```

use serde::{Deserialize, Serialize};

use super::DpError;
use super::accountant::{Budget, Sampling};
use super::mechanism::{AdaptiveClip, noise_multiplier_after_count_noise};

/// Where the noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// The aggregator adds Gaussian noise to the sum of clipped updates (trusted server).
    #[default]
    Central,
    /// Each client adds its share of Skellam noise before secure aggregation, so the
    /// server only ever sees a noised sum.
    Distributed,
}

/// What to do when the next round would exceed the epsilon budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBudget {
    /// End training before the round that would exceed the budget.
    #[default]
    Stop,
    /// Log a warning and run the round anyway.
    Warn,
}

/// Adaptive clipping settings (Andrew, Thakkar, McMahan, Ramaswamy 2021); the initial
/// clip is [`DpConfig::clip_norm`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipConfig {
    /// Target fraction `gamma` of clients whose update norm is within the clip, in [0, 1].
    pub target_quantile: f64,
    /// Geometric learning rate `eta` (> 0); the paper uses 0.2.
    pub learning_rate: f64,
    /// Std `sigma_b` of the Gaussian noise on the count of unclipped clients (> 0, and
    /// > noise_multiplier / 2 so that the update noise can be rebalanced).
    pub count_noise_std: f64,
}

/// Differential privacy of a federated run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// Central (server adds noise) or distributed (clients add noise under SecAgg).
    #[serde(default)]
    pub mode: DpMode,
    /// L2 clip norm `C` of each client's update (> 0; the initial clip if adaptive).
    pub clip_norm: f64,
    /// Noise multiplier `sigma`: noise std on the sum is `sigma * C` (> 0).
    pub noise_multiplier: f64,
    /// Delta of the reported `(epsilon, delta)`, in (0, 1); usually below 1 / population.
    pub delta: f64,
    /// Epsilon budget; `None` only reports epsilon.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
    /// What to do when the next round would exceed `epsilon_budget`.
    #[serde(default)]
    pub on_budget: OnBudget,
    /// How the engine selects clients; fedquic's engine draws a fixed number without
    /// replacement, hence the default.
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    /// Adaptive clipping; `None` keeps `clip_norm` fixed.
    #[serde(default)]
    pub adaptive_clipping: Option<AdaptiveClipConfig>,
}

fn default_sampling() -> Sampling {
    Sampling::FixedSizeWithoutReplacement
}

fn invalid(field: &'static str, value: f64, expected: &str) -> DpError {
    DpError::InvalidConfig {
        field,
        reason: format!("{value} is invalid: must be {expected}"),
    }
}

fn require(
    field: &'static str,
    value: f64,
    expected: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<(), DpError> {
    if value.is_finite() && ok(value) {
        Ok(())
    } else {
        Err(invalid(field, value, expected))
    }
}

impl DpConfig {
    /// Checks every field; the error names the field, the value and the accepted range.
    pub fn validate(&self) -> Result<(), DpError> {
        require("clip_norm", self.clip_norm, "a finite number > 0", |c| {
            c > 0.0
        })?;
        require(
            "noise_multiplier",
            self.noise_multiplier,
            "a finite number > 0",
            |s| s > 0.0,
        )?;
        require("delta", self.delta, "in the open interval (0, 1)", |d| {
            d > 0.0 && d < 1.0
        })?;
        if let Some(eps) = self.epsilon_budget {
            require("epsilon_budget", eps, "a finite number > 0", |e| e > 0.0)?;
        }
        if let Some(a) = &self.adaptive_clipping {
            require(
                "adaptive_clipping.target_quantile",
                a.target_quantile,
                "in [0, 1]",
                |g| (0.0..=1.0).contains(&g),
            )?;
            require(
                "adaptive_clipping.learning_rate",
                a.learning_rate,
                "a finite number > 0",
                |e| e > 0.0,
            )?;
            require(
                "adaptive_clipping.count_noise_std",
                a.count_noise_std,
                "a finite number > 0",
                |s| s > 0.0,
            )?;
            if 2.0 * a.count_noise_std <= self.noise_multiplier {
                return Err(DpError::InvalidConfig {
                    field: "adaptive_clipping.count_noise_std",
                    reason: format!(
                        "{} is too small for noise_multiplier {}: the count query spends \
                         privacy as noise multiplier 2 * count_noise_std, which must exceed \
                         noise_multiplier (Andrew et al. 2021); use more than {}",
                        a.count_noise_std,
                        self.noise_multiplier,
                        self.noise_multiplier / 2.0
                    ),
                });
            }
        }
        Ok(())
    }

    /// The epsilon budget, if one is set.
    pub fn budget(&self) -> Result<Option<Budget>, DpError> {
        self.validate()?;
        self.epsilon_budget
            .map(|eps| Budget::new(eps, self.delta, self.on_budget))
            .transpose()
    }

    /// The noise multiplier to apply to the update sum: `noise_multiplier` itself, or,
    /// with adaptive clipping, the smaller `sigma_delta` that leaves room for the count
    /// query so that the pair is as private as `noise_multiplier` alone
    /// ([`noise_multiplier_after_count_noise`]). Account with `noise_multiplier`.
    pub fn update_noise_multiplier(&self) -> Result<f64, DpError> {
        self.validate()?;
        match &self.adaptive_clipping {
            None => Ok(self.noise_multiplier),
            Some(a) => noise_multiplier_after_count_noise(self.noise_multiplier, a.count_noise_std),
        }
    }

    /// The adaptive clipping state to start a run with, if enabled.
    pub fn adaptive_clip(&self) -> Result<Option<AdaptiveClip>, DpError> {
        self.validate()?;
        self.adaptive_clipping
            .map(|a| {
                AdaptiveClip::new(
                    a.target_quantile,
                    a.learning_rate,
                    a.count_noise_std,
                    self.clip_norm,
                )
            })
            .transpose()
    }
}
