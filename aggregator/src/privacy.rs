//! Differential privacy of a run: the aggregator's side of DP-FedAvg
//! (McMahan et al., ICLR 2018) with an RDP accountant.
//!
//! The unit of privacy is a client (user-level DP). Every round each
//! selected client's update is clipped to L2 norm `C` and counts with
//! weight 1, so one client changes the sum by at most `C`; the sum gets
//! Gaussian noise of standard deviation `sigma C`:
//! - **central** mode: the aggregator adds it to the sum (it sees the
//!   noise-free sum; the guarantee holds against everyone who sees the
//!   models, not against the aggregator);
//! - **distributed** mode (secure aggregation only): every client adds its
//!   share as Skellam noise in the integer domain before masking, so the
//!   aggregator never sees a noise-free sum. A dropped client's share is
//!   missing, so the round is accounted with the noise that the clients who
//!   contributed actually added.
//!
//! After each round the accountant ([`fedquic_privacy::dp`]) composes the
//! round (sampling rate `q = selected / population`) and reports epsilon at
//! the configured delta; a budget stops the run (or warns) before a round
//! that would exceed it.

use fedquic_privacy::dp::{
    self, AccountantState, AdaptiveClip, DpConfig, DpMode, OnBudget, RdpAccountant,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// What one round spent, for the metrics.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PrivacySummary {
    pub mode: &'static str,
    /// The clip norm this round used and the next round will use (they
    /// differ with adaptive clipping).
    pub clip_norm: f64,
    pub next_clip_norm: f64,
    /// Noise multiplier on the update sum (with adaptive clipping, the part
    /// left after the count query), and the noise standard deviation that
    /// the sum actually carries (distributed mode: the contributors' shares).
    pub noise_multiplier: f64,
    pub noise_std: f64,
    /// Sampling rate of the round.
    pub q: f64,
    /// Epsilon spent so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// The RDP order that gave epsilon.
    pub order: f64,
}

/// The noise a round's sum carries.
#[derive(Clone, Copy, Debug)]
pub enum RoundNoise {
    /// Gaussian noise added by the aggregator.
    Central,
    /// Skellam shares added by `contributors` clients, `mu` each, on values
    /// quantised with `scale`, `dim` of them.
    Skellam {
        mu: f64,
        contributors: usize,
        scale: f64,
        dim: usize,
    },
}

#[derive(Serialize, Deserialize)]
struct SavedPrivacy {
    accountant: AccountantState,
    clip: f64,
}

/// A run's differential privacy: config, accountant, adaptive clip.
#[derive(Debug, Clone)]
pub struct Privacy {
    config: DpConfig,
    population: usize,
    accountant: RdpAccountant,
    adaptive: Option<AdaptiveClip>,
    clip: f64,
    noise_key: NoiseKey,
}

/// The key of the aggregator's noise (central DP, the adaptive clip's
/// count): whoever knows it can regenerate the noise and subtract it from
/// the published model, so it comes from the OS, is never written to a
/// checkpoint, and is not printed.
#[derive(Clone)]
struct NoiseKey([u8; 32]);

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(..)")
    }
}

impl Privacy {
    /// `population`: how many clients may be sampled (the sampling rate's
    /// denominator). Fails on an invalid config.
    pub fn new(config: DpConfig, population: usize) -> Result<Privacy, String> {
        config
            .validate()
            .map_err(|e| format!("differential_privacy: {e}"))?;
        if population < 2 {
            return Err("differential_privacy.population must be at least 2".into());
        }
        if config.mode == DpMode::Distributed && config.adaptive_clipping.is_some() {
            return Err(
                "differential_privacy: adaptive clipping runs in central mode only (its count \
                 query would need its own distributed noise)"
                    .into(),
            );
        }
        let accountant = RdpAccountant::new(None).map_err(|e| e.to_string())?;
        let adaptive = config.adaptive_clip().map_err(|e| e.to_string())?;
        Ok(Privacy {
            clip: config.clip_norm,
            config,
            population,
            accountant,
            adaptive,
            noise_key: NoiseKey(rand::random()),
        })
    }

    /// Noise derived from `seed` instead of the OS: reproducible runs for
    /// research (the simulator). Anyone who knows the seed can remove the
    /// noise, so a deployment never does this.
    pub fn with_reproducible_noise(mut self, seed: u64) -> Privacy {
        let mut key = [0u8; 32];
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&crate::engine::mix(seed, i as u64, 0x0d9_5eed).to_le_bytes());
        }
        self.noise_key = NoiseKey(key);
        self
    }

    pub fn mode(&self) -> DpMode {
        self.config.mode
    }

    pub fn mode_name(&self) -> &'static str {
        match self.config.mode {
            DpMode::Central => "central",
            DpMode::Distributed => "distributed",
        }
    }

    /// The clip norm of the coming round.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// The noise multiplier on the update sum.
    fn update_sigma(&self) -> f64 {
        self.config
            .update_noise_multiplier()
            .unwrap_or(self.config.noise_multiplier)
    }

    /// Distributed mode: the standard deviation (update units) of the noise
    /// each of `selected` clients adds, so that together they add
    /// `sigma C`. 0 in central mode.
    pub fn client_noise_std(&self, selected: usize) -> f64 {
        match self.config.mode {
            DpMode::Central => 0.0,
            DpMode::Distributed => {
                self.update_sigma() * self.clip / (selected.max(1) as f64).sqrt()
            }
        }
    }

    /// Central mode: adds the Gaussian noise to the sum of clipped updates,
    /// from the run's noise key on `stream` (distinct per round and attempt).
    pub fn noise_sum(&self, sum: &mut [f64], stream: u64) -> Result<(), String> {
        if self.config.mode != DpMode::Central {
            return Ok(());
        }
        dp::add_gaussian_noise_with_rng(
            sum,
            self.update_sigma() * self.clip,
            &mut dp::keyed_rng(&self.noise_key.0, stream),
        )
        .map_err(|e| e.to_string())
    }

    /// The chance that a client is in a round of `selected`.
    fn sampling_rate(&self, selected: usize) -> f64 {
        (selected as f64 / self.population as f64).min(1.0)
    }

    /// Charges one release of a noised sum to the accountant; the noise's
    /// standard deviation on the sum.
    fn step_accountant(&mut self, selected: usize, noise: RoundNoise) -> Result<f64, String> {
        let q = self.sampling_rate(selected);
        let sampling = self.config.sampling;
        let sigma = self.config.noise_multiplier;
        let noise_std = match noise {
            RoundNoise::Central => {
                self.accountant
                    .step(q, sigma, 1, sampling)
                    .map_err(|e| e.to_string())?;
                self.update_sigma() * self.clip
            }
            RoundNoise::Skellam {
                mu,
                contributors,
                scale,
                dim,
            } => {
                let total_mu = mu * contributors as f64;
                // Stochastic rounding moves each value by less than 1.
                let l2 = self.clip * scale + (dim as f64).sqrt();
                let l1 = dp::skellam_l1_bound(l2, dim).map_err(|e| e.to_string())?;
                self.accountant
                    .step_skellam(q, total_mu, l1, l2, 1, sampling)
                    .map_err(|e| e.to_string())?;
                (2.0 * total_mu).sqrt() / scale
            }
        };
        Ok(noise_std)
    }

    /// A secure-aggregation round that failed after its noised sum was unmasked:
    /// under distributed DP the aggregator has seen that sum, so the release is
    /// charged (the adaptive clip does not move: no round was committed). Central
    /// noise is added only to a committed round's sum, so nothing was released.
    pub fn account_uncommitted(
        &mut self,
        selected: usize,
        noise: RoundNoise,
    ) -> Result<(), String> {
        match noise {
            RoundNoise::Central => Ok(()),
            skellam => self.step_accountant(selected, skellam).map(|_| ()),
        }
    }

    /// Composes a finished round into the accountant and moves the adaptive
    /// clip: `selected` clients were sampled, `within_clip` of the updates
    /// were within the clip norm before clipping (exact: the aggregator
    /// adds the count's noise here).
    pub fn account(
        &mut self,
        selected: usize,
        within_clip: f64,
        noise: RoundNoise,
        stream: u64,
    ) -> Result<PrivacySummary, String> {
        let noise_std = self.step_accountant(selected, noise)?;
        let used_clip = self.clip;
        if let Some(adaptive) = &mut self.adaptive {
            let noisy = adaptive
                .noisy_count_with_rng(within_clip, &mut dp::keyed_rng(&self.noise_key.0, stream))
                .map_err(|e| e.to_string())?;
            self.clip = adaptive
                .update(noisy, selected.max(1))
                .map_err(|e| e.to_string())?;
        }
        let (epsilon, order) = self
            .accountant
            .epsilon(self.config.delta)
            .map_err(|e| e.to_string())?;
        Ok(PrivacySummary {
            mode: self.mode_name(),
            clip_norm: used_clip,
            next_clip_norm: self.clip,
            noise_multiplier: self.update_sigma(),
            noise_std,
            q: self.sampling_rate(selected),
            epsilon,
            delta: self.config.delta,
            order,
        })
    }

    /// Why the run must stop before a round of `selected` clients: the
    /// budget would be exceeded (with `on_budget = "warn"`, a warning is
    /// logged and the run goes on).
    pub fn stop_reason(&self, selected: usize) -> Option<String> {
        let budget = self.config.budget().ok().flatten()?;
        let q = self.sampling_rate(selected);
        let mut next = self.accountant.clone();
        let stepped = match self.config.mode {
            // Distributed rounds are accounted as the Gaussian of the same
            // variance for this look-ahead (the Skellam bound is close).
            DpMode::Central | DpMode::Distributed => {
                next.step(q, self.config.noise_multiplier, 1, self.config.sampling)
            }
        };
        stepped.ok()?;
        let (epsilon, _) = next.epsilon(budget.delta).ok()?;
        if epsilon <= budget.epsilon {
            return None;
        }
        let reason = format!(
            "the privacy budget epsilon = {} at delta = {} would be exceeded by the next round \
             (epsilon {epsilon:.3})",
            budget.epsilon, budget.delta
        );
        match budget.on_exceed {
            OnBudget::Stop => Some(reason),
            OnBudget::Warn => {
                warn!("{reason}; going on (on_budget = \"warn\")");
                None
            }
        }
    }

    /// Accountant and clip, for the checkpoint.
    pub fn state(&self) -> Vec<u8> {
        postcard::to_stdvec(&SavedPrivacy {
            accountant: self.accountant.state(),
            clip: self.clip,
        })
        .unwrap_or_default()
    }

    pub fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let saved: SavedPrivacy =
            postcard::from_bytes(state).map_err(|e| format!("checkpointed privacy state: {e}"))?;
        if !(saved.clip.is_finite() && saved.clip > 0.0) {
            return Err(format!("checkpointed clip norm {} is invalid", saved.clip));
        }
        self.accountant = RdpAccountant::restore(saved.accountant).map_err(|e| e.to_string())?;
        self.clip = saved.clip;
        if let Some(a) = &mut self.adaptive {
            a.clip = saved.clip;
        }
        Ok(())
    }
}

/// Marks a checkpoint's strategy state that carries privacy state too.
const PRIVACY_MAGIC: &[u8; 8] = b"FQDPv1\0\0";

/// The strategy's state, followed by the privacy state when there is one
/// (a run without DP keeps the plain strategy state).
pub fn join_state(strategy: Vec<u8>, privacy: Option<Vec<u8>>) -> Vec<u8> {
    let Some(privacy) = privacy else {
        return strategy;
    };
    let mut out = Vec::with_capacity(16 + strategy.len() + privacy.len());
    out.extend_from_slice(PRIVACY_MAGIC);
    out.extend_from_slice(&(strategy.len() as u64).to_le_bytes());
    out.extend_from_slice(&strategy);
    out.extend_from_slice(&privacy);
    out
}

/// Splits what [`join_state`] wrote.
pub fn split_state(state: &[u8]) -> Result<(&[u8], Option<&[u8]>), String> {
    let Some(rest) = state.strip_prefix(PRIVACY_MAGIC.as_slice()) else {
        return Ok((state, None));
    };
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or("checkpointed privacy state is truncated")?;
    let len = u64::from_le_bytes(*len);
    if len > rest.len() as u64 {
        return Err("checkpointed privacy state is truncated".into());
    }
    let (strategy, privacy) = rest.split_at(len as usize);
    Ok((strategy, Some(privacy)))
}

/// Restores the privacy accountant from a checkpoint's privacy state, if the
/// run has differential privacy. A checkpoint without one cannot resume a run
/// that has it: its budget would start again from nothing.
pub fn restore_privacy(privacy: Option<&mut Privacy>, saved: Option<&[u8]>) -> Result<(), String> {
    match (privacy, saved) {
        (Some(p), Some(saved)) => p.restore(saved),
        (Some(_), None) => Err(
            "the checkpoint has no privacy accountant: it was written without \
             [differential_privacy], whose budget cannot be resumed from nothing"
                .into(),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedquic_privacy::dp::Sampling;

    fn config() -> DpConfig {
        DpConfig {
            mode: DpMode::Central,
            clip_norm: 2.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            epsilon_budget: Some(30.0),
            on_budget: OnBudget::Stop,
            sampling: Sampling::FixedSizeWithoutReplacement,
            adaptive_clipping: Some(dp::AdaptiveClipConfig {
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise_std: 5.0,
            }),
        }
    }

    #[test]
    fn noise_is_keyed_by_the_os_unless_a_simulation_asks_for_a_seed() {
        let noise = |p: &Privacy| {
            let mut sum = vec![0.0; 16];
            p.noise_sum(&mut sum, 7).unwrap();
            sum
        };
        let (a, b) = (
            Privacy::new(config(), 100).unwrap(),
            Privacy::new(config(), 100).unwrap(),
        );
        assert_ne!(noise(&a), noise(&b), "two runs must not share their noise");
        assert_ne!(noise(&a), vec![0.0; 16]);
        let seeded = |seed| {
            Privacy::new(config(), 100)
                .unwrap()
                .with_reproducible_noise(seed)
        };
        assert_eq!(noise(&seeded(1)), noise(&seeded(1)));
        assert_ne!(noise(&seeded(1)), noise(&seeded(2)));
        // Each round draws its own stream.
        let mut other = vec![0.0; 16];
        seeded(1).noise_sum(&mut other, 8).unwrap();
        assert_ne!(other, noise(&seeded(1)));
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.noise_key.0)));
    }

    #[test]
    fn an_unmasked_sum_of_a_failed_round_is_charged_under_distributed_dp_only() {
        let skellam = RoundNoise::Skellam {
            mu: 1e6,
            contributors: 10,
            scale: 1e4,
            dim: 100,
        };
        let distributed = DpConfig {
            mode: DpMode::Distributed,
            adaptive_clipping: None,
            ..config()
        };
        let mut charged = Privacy::new(distributed, 100).unwrap();
        let clip = charged.clip_norm();
        charged.account_uncommitted(10, skellam).unwrap();
        let mut untouched = Privacy::new(distributed, 100).unwrap();
        untouched
            .account_uncommitted(10, RoundNoise::Central)
            .unwrap();
        // The next committed round reports what was spent so far: more after a
        // charged failure, and the clip has not moved.
        let after_failure = charged.account(10, 5.0, skellam, 1).unwrap();
        let first = untouched.account(10, 5.0, skellam, 1).unwrap();
        assert!(
            after_failure.epsilon > first.epsilon,
            "{after_failure:?} {first:?}"
        );
        assert_eq!(after_failure.clip_norm, clip);
    }

    #[test]
    fn a_run_with_privacy_never_resumes_from_a_checkpoint_without_its_accountant() {
        let spent = {
            let mut p = Privacy::new(config(), 100).unwrap();
            p.account(10, 10.0, RoundNoise::Central, 1).unwrap();
            p.state()
        };
        let mut p = Privacy::new(config(), 100).unwrap();
        let err = restore_privacy(Some(&mut p), None).unwrap_err();
        assert!(err.contains("no privacy accountant"), "{err}");
        restore_privacy(Some(&mut p), Some(&spent)).unwrap();
        // Without privacy, a saved accountant (DP turned off) is not an error.
        restore_privacy(None, Some(&spent)).unwrap();
        restore_privacy(None, None).unwrap();
    }

    #[test]
    fn the_accountant_and_clip_survive_a_checkpoint_and_strategy_state_is_kept_apart() {
        let mut p = Privacy::new(config(), 100)
            .unwrap()
            .with_reproducible_noise(5);
        let first = p.account(10, 10.0, RoundNoise::Central, 1).unwrap();
        assert!(first.epsilon > 0.0);
        // Every update was within the clip: the clip shrinks towards the median.
        assert!(first.next_clip_norm < first.clip_norm);
        let joined = join_state(vec![1, 2, 3], Some(p.state()));
        let (strategy, saved) = split_state(&joined).unwrap();
        assert_eq!(strategy, &[1, 2, 3]);
        let mut restored = Privacy::new(config(), 100)
            .unwrap()
            .with_reproducible_noise(5);
        restored.restore(saved.unwrap()).unwrap();
        assert_eq!(restored.clip_norm(), p.clip_norm());
        let a = p.account(10, 3.0, RoundNoise::Central, 2).unwrap();
        let b = restored.account(10, 3.0, RoundNoise::Central, 2).unwrap();
        assert_eq!(
            a, b,
            "a resumed run spends exactly what an uninterrupted one does"
        );
        // Without privacy the strategy state is stored as it was.
        assert_eq!(join_state(vec![7], None), vec![7]);
        assert_eq!(split_state(&[7]).unwrap(), (&[7u8][..], None));
        // A truncated state is an error, not a panic.
        assert!(split_state(&joined[..12]).is_err());
        assert!(restored.restore(&[1, 2]).is_err());
    }

    #[test]
    fn the_budget_stops_before_the_round_that_would_exceed_it() {
        let mut p = Privacy::new(config(), 100).unwrap();
        let mut rounds = 0;
        while p.stop_reason(10).is_none() {
            let s = p.account(10, 5.0, RoundNoise::Central, rounds).unwrap();
            assert!(s.epsilon <= 30.0, "{s:?}");
            rounds += 1;
            assert!(rounds < 10_000);
        }
        assert!(rounds > 0);
        let reason = p.stop_reason(10).unwrap();
        assert!(reason.contains("epsilon = 30"), "{reason}");
        let warn_only = DpConfig {
            on_budget: OnBudget::Warn,
            ..config()
        };
        let mut w = Privacy::new(warn_only, 100).unwrap();
        for i in 0..rounds + 5 {
            w.account(10, 5.0, RoundNoise::Central, i).unwrap();
        }
        assert!(w.stop_reason(10).is_none(), "warn goes on");
    }
}
