//! FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown, "Measuring the
//! Effects of Non-Identical Data Distribution for Federated Visual
//! Classification", 2019).
//!
//! With `d` the round's mean delta, momentum `beta` and server learning
//! rate `eta`: `v <- beta * v + d`, then `w <- w + eta * v`.

use super::{Strategy, decode_vectors, encode_vectors};

#[derive(Clone, Debug)]
pub struct FedAvgM {
    lr: f64,
    momentum: f64,
    velocity: Vec<f32>,
}

impl FedAvgM {
    pub fn new(len: usize, lr: f64, momentum: f64) -> Self {
        FedAvgM {
            lr,
            momentum,
            velocity: vec![0.0; len],
        }
    }

    fn velocity(&self, i: usize, d: f64) -> f64 {
        self.momentum * self.velocity[i] as f64 + d
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn peek(&self, i: usize, g: f32, d: f64) -> f64 {
        g as f64 + self.lr * self.velocity(i, d)
    }

    fn apply(&mut self, model: &mut [f32], sum: &[f64], inv_weight: f64) {
        for (i, (g, s)) in model.iter_mut().zip(sum).enumerate() {
            let v = self.velocity(i, s * inv_weight);
            self.velocity[i] = v as f32;
            *g = (*g as f64 + self.lr * v) as f32;
        }
    }

    fn check(
        &self,
        model: &[f32],
        sum: &[f64],
        inv_weight: f64,
        max_abs: f64,
    ) -> Result<(), super::ModelCheckError> {
        super::check_peeked_model(self, model, sum, inv_weight, max_abs)?;
        // With a small server learning rate the model can stay finite while
        // the stored (f32) velocity overflows; that state must not commit.
        for (i, s) in sum.iter().enumerate().take(model.len()) {
            if !(self.velocity(i, s * inv_weight) as f32).is_finite() {
                return Err(super::ModelCheckError::StateNotFinite {
                    index: i,
                    what: "momentum",
                });
            }
        }
        Ok(())
    }

    fn state(&self) -> Vec<u8> {
        encode_vectors(&[&self.velocity])
    }

    fn restore(&mut self, state: &[u8], len: usize) -> Result<(), String> {
        let mut v = decode_vectors(state, 1, len)?;
        self.velocity = v.pop().unwrap_or_default();
        Ok(())
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_matches_hand_computation() {
        // lr 0.5, momentum 0.5, mean deltas 2 then 2:
        // v1 = 2, w1 = 0 + 0.5 * 2 = 1; v2 = 0.5 * 2 + 2 = 3, w2 = 1 + 1.5 = 2.5.
        let mut s = FedAvgM::new(1, 0.5, 0.5);
        let mut w = vec![0.0f32];
        assert_eq!(s.peek(0, 0.0, 2.0), 1.0);
        s.apply(&mut w, &[4.0], 0.5);
        assert_eq!(w, vec![1.0]);
        s.apply(&mut w, &[4.0], 0.5);
        assert_eq!(w, vec![2.5]);
        let mut restored = FedAvgM::new(1, 0.5, 0.5);
        restored.restore(&s.state(), 1).unwrap();
        assert_eq!(restored.velocity, vec![3.0]);
        assert!(restored.restore(&[0u8; 3], 1).is_err());
    }

    #[test]
    fn a_step_whose_velocity_overflows_is_refused() {
        // v = 0.9 * 3e38 + 3e38 overflows f32; lr 1e-6 keeps the model finite.
        let mut s = FedAvgM::new(1, 1e-6, 0.9);
        s.velocity[0] = 3e38;
        let err = s.check(&[0.0], &[3e38], 1.0, f64::MAX).unwrap_err();
        assert!(
            matches!(err, super::super::ModelCheckError::StateNotFinite { .. }),
            "{err}"
        );
    }
}
