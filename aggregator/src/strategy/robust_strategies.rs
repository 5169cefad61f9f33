//! FedMedian, FedTrimmedAvg, Krum, Multi-Krum and Bulyan as strategies: they
//! hold the round's updates (at most `max_held_updates`, K x P x 4 bytes,
//! checked against `memory_budget_mb` at startup), aggregate them with the
//! rules in [`super::robust`], and apply the result as FedAvg applies its
//! mean (`w <- w + aggregate`). Example counts are not used: a robust rule
//! treats every client alike (as Flower's do), so a client cannot buy
//! influence with a large claim.

use super::Strategy;
use super::robust::{self, RobustError};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RobustRule {
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean after dropping `beta` of the values at each end.
    TrimmedMean { beta: f64 },
    /// Mean of the `m` updates with the best Krum scores for `f` Byzantine
    /// clients (`m = 1`: Krum).
    MultiKrum { f: usize, m: usize },
    /// Bulyan for `f` Byzantine clients.
    Bulyan { f: usize },
}

#[derive(Clone, Debug)]
pub struct RobustStrategy {
    pub rule: RobustRule,
}

impl RobustStrategy {
    /// Aggregates the held updates into `out`.
    pub fn aggregate(&self, updates: &[&[f32]], out: &mut [f32]) -> Result<(), RobustError> {
        match self.rule {
            RobustRule::Median => robust::coordinate_median(updates, out),
            RobustRule::TrimmedMean { beta } => robust::trimmed_mean(updates, beta, out),
            RobustRule::MultiKrum { f, m } => {
                let chosen = robust::multi_krum(updates, f, m)?;
                out.fill(0.0);
                let inv = 1.0 / chosen.len() as f64;
                for (j, o) in out.iter_mut().enumerate() {
                    *o = (chosen.iter().map(|&i| updates[i][j] as f64).sum::<f64>() * inv) as f32;
                }
                Ok(())
            }
            RobustRule::Bulyan { f } => robust::bulyan(updates, f, out),
        }
    }

    /// The fewest updates the rule can work with.
    pub fn min_updates(&self) -> usize {
        match self.rule {
            RobustRule::Median | RobustRule::TrimmedMean { .. } => 1,
            RobustRule::MultiKrum { f, .. } => 2 * f + 3,
            RobustRule::Bulyan { f } => 4 * f + 3,
        }
    }
}

impl Strategy for RobustStrategy {
    fn name(&self) -> &'static str {
        match self.rule {
            RobustRule::Median => "fedmedian",
            RobustRule::TrimmedMean { .. } => "fedtrimmedavg",
            RobustRule::MultiKrum { m: 1, .. } => "krum",
            RobustRule::MultiKrum { .. } => "multikrum",
            RobustRule::Bulyan { .. } => "bulyan",
        }
    }

    fn robust(&self) -> Option<&RobustStrategy> {
        Some(self)
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}
