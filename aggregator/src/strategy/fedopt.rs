//! FedAdam, FedYogi and FedAdagrad: adaptive server optimizers (Reddi et al.,
//! "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).
//!
//! With `d` the round's mean delta (the pseudo-gradient, as a descent
//! direction), server learning rate `eta`, decay rates `beta1`, `beta2` and
//! adaptivity `tau`:
//! - `m <- beta1 * m + (1 - beta1) * d`
//! - FedAdagrad: `v <- v + d^2`
//! - FedAdam:    `v <- beta2 * v + (1 - beta2) * d^2`
//! - FedYogi:    `v <- v - (1 - beta2) * d^2 * sign(v - d^2)`
//! - `w <- w + eta * m / (sqrt(v) + tau)`
//!
//! As in the paper (and Flower's implementation), there is no bias
//! correction, and `v` starts at 0 (`m` too), so early steps are scaled by
//! `(1 - beta1) / (sqrt(1 - beta2) |d| + tau)`; `tau` around 1e-3 keeps them
//! bounded.

use super::{Strategy, StrategyConfig, decode_vectors, encode_vectors};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FedOptKind {
    Adam,
    Yogi,
    Adagrad,
}

#[derive(Clone, Debug)]
pub struct FedOpt {
    kind: FedOptKind,
    lr: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedOpt {
    pub fn new(kind: FedOptKind, len: usize, c: &StrategyConfig) -> Self {
        FedOpt {
            kind,
            lr: c.server_lr,
            // Adagrad has no first-moment decay in the paper: m = d.
            beta1: if kind == FedOptKind::Adagrad {
                0.0
            } else {
                c.beta1
            },
            beta2: c.beta2,
            tau: c.tau,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// The new (m, v) for parameter `i` and mean delta `d`.
    fn moments(&self, i: usize, d: f64) -> (f64, f64) {
        let m = self.beta1 * self.m[i] as f64 + (1.0 - self.beta1) * d;
        let (v, d2) = (self.v[i] as f64, d * d);
        let v = match self.kind {
            FedOptKind::Adagrad => v + d2,
            FedOptKind::Adam => self.beta2 * v + (1.0 - self.beta2) * d2,
            FedOptKind::Yogi => v - (1.0 - self.beta2) * d2 * (v - d2).signum(),
        };
        (m, v.max(0.0))
    }

    fn step(&self, m: f64, v: f64) -> f64 {
        self.lr * m / (v.sqrt() + self.tau)
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.kind {
            FedOptKind::Adam => "fedadam",
            FedOptKind::Yogi => "fedyogi",
            FedOptKind::Adagrad => "fedadagrad",
        }
    }

    fn peek(&self, i: usize, g: f32, d: f64) -> f64 {
        let (m, v) = self.moments(i, d);
        g as f64 + self.step(m, v)
    }

    fn apply(&mut self, model: &mut [f32], sum: &[f64], inv_weight: f64) {
        for (i, (g, s)) in model.iter_mut().zip(sum).enumerate() {
            let (m, v) = self.moments(i, s * inv_weight);
            // The step uses the f32-rounded moments that are stored, so a
            // resumed run (which reloads them) computes the same thing.
            let (m, v) = (m as f32, v as f32);
            self.m[i] = m;
            self.v[i] = v;
            *g = (*g as f64 + self.step(m as f64, v as f64)) as f32;
        }
    }

    fn check(
        &self,
        model: &[f32],
        sum: &[f64],
        inv_weight: f64,
        max_abs: f64,
    ) -> Result<(), super::ModelCheckError> {
        // Same arithmetic as `apply`, including the f32 rounding of moments.
        for (i, (g, s)) in model.iter().zip(sum).enumerate() {
            let (m, v) = self.moments(i, s * inv_weight);
            let (m, v) = (m as f32, v as f32);
            // A moment that overflows f32 would be stored as inf: an infinite
            // v makes every later step 0 (training silently stops) and the
            // checkpoint unloadable, even though this step's model is finite.
            for (value, what) in [(m, "first moment"), (v, "second moment")] {
                if !value.is_finite() {
                    return Err(super::ModelCheckError::StateNotFinite { index: i, what });
                }
            }
            let value = (*g as f64 + self.step(m as f64, v as f64)) as f32;
            if !value.is_finite() {
                return Err(super::ModelCheckError::NotFinite { index: i });
            }
            if (value as f64).abs() > max_abs {
                return Err(super::ModelCheckError::OutOfBounds {
                    index: i,
                    value: value as f64,
                    bound: max_abs,
                });
            }
        }
        Ok(())
    }

    fn state(&self) -> Vec<u8> {
        encode_vectors(&[&self.m, &self.v])
    }

    fn restore(&mut self, state: &[u8], len: usize) -> Result<(), String> {
        let mut mv = decode_vectors(state, 2, len)?;
        self.v = mv.pop().unwrap_or_default();
        self.m = mv.pop().unwrap_or_default();
        if self.v.iter().any(|v| *v < 0.0) {
            return Err("second moment is negative".into());
        }
        Ok(())
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> StrategyConfig {
        StrategyConfig {
            server_lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.01,
            ..StrategyConfig::default()
        }
    }

    #[test]
    fn adam_yogi_and_adagrad_match_hand_computation() {
        // One round, mean delta d = 2 (sum 4, weight 2), w = 1.
        // m = 0.1 * 2 = 0.2 (Adagrad: m = 2).
        // Adam: v = 0.01 * 4 = 0.04; step = 0.1 * 0.2 / (0.2 + 0.01) = 0.0952380...
        // Yogi: v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04: same first step as Adam.
        // Adagrad: v = 4; step = 0.1 * 2 / (2 + 0.01) = 0.0995024...
        let cases = [
            (FedOptKind::Adam, 1.0 + 0.02 / 0.21),
            (FedOptKind::Yogi, 1.0 + 0.02 / 0.21),
            (FedOptKind::Adagrad, 1.0 + 0.2 / 2.01),
        ];
        for (kind, expected) in cases {
            let mut s = FedOpt::new(kind, 1, &config());
            assert!((s.peek(0, 1.0, 2.0) - expected).abs() < 1e-6, "{kind:?}");
            let mut w = vec![1.0f32];
            s.apply(&mut w, &[4.0], 0.5);
            assert!((w[0] as f64 - expected).abs() < 1e-6, "{kind:?}: {}", w[0]);
        }
        // Second round with d = 0: Adam's v decays (0.99 * 0.04), Yogi's moves
        // towards d^2 = 0 by (1 - beta2) * 0 = 0 (stays 0.04), Adagrad's stays.
        let mut adam = FedOpt::new(FedOptKind::Adam, 1, &config());
        let mut yogi = FedOpt::new(FedOptKind::Yogi, 1, &config());
        let mut w = vec![0.0f32];
        adam.apply(&mut w, &[2.0], 1.0);
        yogi.apply(&mut w.clone(), &[2.0], 1.0);
        adam.apply(&mut w, &[0.0], 1.0);
        let mut wy = vec![0.0f32];
        yogi.apply(&mut wy, &[0.0], 1.0);
        assert!((adam.v[0] as f64 - 0.99 * 0.04).abs() < 1e-7);
        assert!((yogi.v[0] as f64 - 0.04).abs() < 1e-7);
        assert!((adam.m[0] as f64 - 0.18).abs() < 1e-7);
    }

    #[test]
    fn a_step_whose_moments_overflow_is_refused_and_changes_nothing() {
        // Two clients sending every value at ~3e38 (finite f32): the mean
        // delta is 3e38 and (1 - beta2) d^2 is far beyond f32, while the
        // step m / (sqrt(inf) + tau) = 0 leaves the model itself finite.
        for kind in [FedOptKind::Adam, FedOptKind::Yogi, FedOptKind::Adagrad] {
            let mut s = FedOpt::new(kind, 2, &config());
            let mut w = vec![0.5f32, -0.5];
            s.apply(&mut w, &[0.2, -0.2], 1.0);
            let (before_m, before_v, before_w) = (s.m.clone(), s.v.clone(), w.clone());
            let sum = [3e38 * 2.0, 1.0];
            let err = s.check(&w, &sum, 0.5, f64::MAX).unwrap_err();
            assert!(
                matches!(
                    err,
                    super::super::ModelCheckError::StateNotFinite { index: 0, .. }
                ),
                "{kind:?}: {err}"
            );
            // The engine applies only what passed the check: the state and
            // model it would commit are untouched, and still checkpointable.
            assert_eq!((&s.m, &s.v, &w), (&before_m, &before_v, &before_w));
            let mut restored = FedOpt::new(kind, 2, &config());
            restored.restore(&s.state(), 2).unwrap();
        }
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let mut s = FedOpt::new(FedOptKind::Adam, 3, &config());
        let mut w = vec![0.0f32; 3];
        s.apply(&mut w, &[1.0, -2.0, 3.0], 1.0);
        let mut t = FedOpt::new(FedOptKind::Adam, 3, &config());
        t.restore(&s.state(), 3).unwrap();
        assert_eq!((t.m.clone(), t.v.clone()), (s.m.clone(), s.v.clone()));
        assert!(t.restore(&s.state(), 4).is_err());
        let mut bad = s.state();
        bad[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(t.restore(&bad, 3).is_err());
    }
}
