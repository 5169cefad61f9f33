//! Differential privacy for fedquic: user-level (client-level) guarantees for
//! federated averaging.
//!
//! * [`accountant`]: a Rényi-DP accountant for the subsampled Gaussian mechanism
//!   (Poisson sampling and fixed-size sampling without replacement) and for the
//!   Skellam mechanism, converted to `(epsilon, delta)`.
//! * [`mechanism`]: L2 clipping, seeded Gaussian noise for central DP, seeded
//!   Skellam noise for distributed DP under secure aggregation, and adaptive
//!   clipping.
//! * [`config`]: the serde configuration the aggregator embeds in its TOML.
//!
//! The unit of privacy is the client: one accountant step is one round in which
//! every participating client's clipped update is summed once and noised once.
//! Everything here is pure: no clocks, no sockets, every random draw comes from a
//! caller-supplied seed, and every parameter is validated into a [`DpError`] instead
//! of a panic.

pub mod accountant;
pub mod config;
pub mod mechanism;
mod special;

pub use accountant::{
    AccountantState, Budget, DEFAULT_ORDERS_COUNT, RdpAccountant, Sampling, default_orders,
    epsilon_after, rdp_poisson_gaussian, rdp_skellam, rdp_without_replacement_gaussian,
};
pub use config::{AdaptiveClipConfig, DpConfig, DpMode, OnBudget};
pub use mechanism::{
    AdaptiveClip, NormAccumulator, add_gaussian_noise, add_gaussian_noise_with_rng,
    add_skellam_noise, add_skellam_noise_u32, add_skellam_noise_u32_with_rng,
    add_skellam_noise_with_rng, clip_l2, keyed_rng, l2_norm, noise_multiplier_after_count_noise,
    sample_poisson, skellam_l1_bound, skellam_mu_per_client,
};

/// Everything that can go wrong in `dp`: invalid parameters, never internal panics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpError {
    /// A numeric parameter is NaN, infinite or out of its range.
    #[error("invalid {name} = {value}: must be {expected}")]
    InvalidParameter {
        /// The parameter's name as the API or config spells it.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// The RDP orders are unusable (empty, not finite, not above 1, or too large).
    #[error("invalid RDP orders: {0}")]
    InvalidOrders(String),
    /// A checkpointed accountant state does not fit together.
    #[error("invalid accountant state: {0}")]
    InvalidState(String),
    /// Steps of different neighbouring relations were composed in one accountant.
    #[error(
        "cannot compose {new:?} sampling into an accountant that already holds {existing:?} steps: \
         Poisson accounting is for add/remove-one neighbours and fixed-size accounting for \
         replace-one neighbours, and the two guarantees do not add up"
    )]
    MixedSampling {
        /// The sampling already composed.
        existing: accountant::Sampling,
        /// The sampling of the rejected step.
        new: accountant::Sampling,
    },
    /// The input vector holds a NaN or an infinity, so its norm is undefined.
    #[error("input holds a non-finite value (NaN or infinity); its L2 norm is undefined")]
    NonFiniteInput,
    /// A configuration field is invalid.
    #[error("invalid dp config: {field}: {reason}")]
    InvalidConfig {
        /// The field's path in the config, e.g. `adaptive_clipping.target_quantile`.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

/// Checks that `value` is finite and satisfies `ok`; else [`DpError::InvalidParameter`].
pub(crate) fn check(
    name: &'static str,
    value: f64,
    expected: &'static str,
    ok: impl Fn(f64) -> bool,
) -> Result<f64, DpError> {
    if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(DpError::InvalidParameter {
            name,
            value,
            expected,
        })
    }
}
