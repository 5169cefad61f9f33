//! q-FedAvg (Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in
//! Federated Learning", ICLR 2020, Algorithm 2): the q-FFL objective
//! `sum_k p_k F_k^(q+1) / (q+1)` weighs clients with a high loss more, so the
//! accuracy spread across clients shrinks as `q` grows (`q = 0`: every
//! selected client counts the same).
//!
//! Each client reports `F_k`, its training loss on the received global model
//! `w` before training, with its update `w_k - w`. With `L` the Lipschitz
//! constant (by default `1 / lr`, the clients' learning rate):
//! - `Delta w_k = L (w - w_k)`
//! - `Delta_k = F_k^q Delta w_k`
//! - `h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q`
//! - `w <- w - sum_k Delta_k / sum_k h_k`
//!
//! Streaming: with `delta_k = w_k - w`, the step is
//! `w + L * sum_k F_k^q delta_k / sum_k h_k`, so each update is folded into
//! the accumulator with weight `F_k^q` while `sum_k h_k` is kept on the side
//! (it needs only the update's norm, after clipping). The loss is the
//! client's claim: it must be finite and in `[1e-6, q_max_loss]`, or the
//! update is refused. The weights are losses, not example counts, so the
//! share cap does not apply; the loss bound is what limits one client's
//! weight.

use fedquic_protocol::INITIAL_LOSS_METRIC;

use super::{Strategy, StrategyConfig, UpdateInput, UpdateRefused};

/// Smallest initial loss accepted: `F^(q-1)` must stay finite.
pub const MIN_INITIAL_LOSS: f64 = 1e-6;

#[derive(Clone, Debug)]
pub struct QFedAvg {
    q: f64,
    /// `L`; 0 means `1 / client lr`.
    lipschitz: f64,
    max_loss: f64,
    /// The round's `sum_k h_k`, and the `L` it used.
    h_sum: f64,
    round_lipschitz: f64,
}

impl QFedAvg {
    pub fn new(c: &StrategyConfig) -> Self {
        QFedAvg {
            q: c.q,
            lipschitz: c.q_lipschitz,
            max_loss: c.q_max_loss,
            h_sum: 0.0,
            round_lipschitz: 1.0,
        }
    }

    /// `L` for a round whose clients train with learning rate `lr`.
    fn lipschitz_for(&self, lr: f64) -> f64 {
        if self.lipschitz > 0.0 {
            self.lipschitz
        } else {
            1.0 / lr
        }
    }

    /// (`F^q`, `h`) of one update from its loss `f` and its L2 norm (as folded).
    pub fn terms(&self, f: f64, norm: f64, l: f64) -> (f64, f64) {
        let fq = f.powf(self.q);
        let h = self.q * f.powf(self.q - 1.0) * l * l * norm * norm + l * fq;
        (fq, h)
    }
}

impl Strategy for QFedAvg {
    fn name(&self) -> &'static str {
        "qfedavg"
    }

    fn wants_initial_loss(&self) -> bool {
        true
    }

    fn uses_share_cap(&self) -> bool {
        false
    }

    fn begin_round(&mut self, _clients: usize) {
        self.h_sum = 0.0;
    }

    fn accept(&mut self, u: &UpdateInput<'_>) -> Result<f64, UpdateRefused> {
        let refuse = |reason: String| UpdateRefused {
            norm_bound: false,
            reason,
        };
        let loss = u
            .metrics
            .iter()
            .find(|(name, _)| name == INITIAL_LOSS_METRIC)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                refuse(format!(
                    "q-FedAvg needs the metric '{INITIAL_LOSS_METRIC}' (loss before training)"
                ))
            })?;
        if !(loss.is_finite() && (MIN_INITIAL_LOSS..=self.max_loss).contains(&loss)) {
            return Err(refuse(format!(
                "initial loss {loss:e} is outside [{MIN_INITIAL_LOSS:e}, {:e}]",
                self.max_loss
            )));
        }
        if !(u.client_lr.is_finite() && u.client_lr > 0.0) {
            return Err(refuse("the round's learning rate is not positive".into()));
        }
        let l = self.lipschitz_for(u.client_lr);
        let (fq, h) = self.terms(loss, u.norm * u.scale, l);
        if !(fq.is_finite() && fq > 0.0 && h.is_finite() && h > 0.0) {
            return Err(refuse(format!(
                "q-FedAvg weights of loss {loss:e} are not finite"
            )));
        }
        self.h_sum += h;
        self.round_lipschitz = l;
        Ok(fq)
    }

    fn sum_scale(&self, _weight_used: f64) -> f64 {
        if self.h_sum > 0.0 {
            self.round_lipschitz / self.h_sum
        } else {
            0.0
        }
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(delta: &'a [f32], metrics: &'a fedquic_protocol::Metrics) -> UpdateInput<'a> {
        UpdateInput {
            weight: 10.0,
            delta,
            norm: crate::engine::l2_norm(delta),
            scale: 1.0,
            metrics,
            extra: &[],
            client_lr: 0.5,
            max_update_norm: None,
            norm_median_multiple: None,
            reject_over_bound: false,
        }
    }

    #[test]
    fn step_matches_hand_computation() {
        // q = 1, lr = 0.5 so L = 2. Model w = 1 (one parameter).
        // Client A: loss 2, delta +1 (w_A = 2); client B: loss 0.5, delta -2.
        // Delta w_A = L (w - w_A) = -2, Delta w_B = 4.
        // Delta_A = 2 * -2 = -4, Delta_B = 0.5 * 4 = 2; sum = -2.
        // h_A = 1 * 2^0 * 4 + 2 * 2 = 8; h_B = 1 * 16 + 2 * 0.5 = 17; sum 25.
        // w <- 1 - (-2 / 25) = 1.08.
        let c = StrategyConfig {
            q: 1.0,
            ..StrategyConfig::default()
        };
        let mut s = QFedAvg::new(&c);
        s.begin_round(2);
        let (ma, mb) = (
            vec![(INITIAL_LOSS_METRIC.to_string(), 2.0)],
            vec![(INITIAL_LOSS_METRIC.to_string(), 0.5)],
        );
        let wa = s.accept(&input(&[1.0], &ma)).unwrap();
        let wb = s.accept(&input(&[-2.0], &mb)).unwrap();
        assert_eq!((wa, wb), (2.0, 0.5));
        // The engine folds sum = 2 * 1 + 0.5 * -2 = 1 and scales it by L / H.
        let sum = wa * 1.0 + wb * -2.0;
        let mut w = vec![1.0f32];
        let scale = s.sum_scale(wa + wb);
        assert!((scale - 2.0 / 25.0).abs() < 1e-12);
        s.apply(&mut w, &[sum], scale);
        assert!((w[0] - 1.08).abs() < 1e-6, "{}", w[0]);
        // A new round forgets the old sum of h.
        s.begin_round(2);
        assert_eq!(s.sum_scale(1.0), 0.0);
    }

    #[test]
    fn q_zero_is_the_unweighted_mean_and_l_can_be_fixed() {
        let c = StrategyConfig {
            q: 0.0,
            q_lipschitz: 7.0,
            ..StrategyConfig::default()
        };
        let mut s = QFedAvg::new(&c);
        s.begin_round(3);
        let mut sum = 0.0;
        let mut used = 0.0;
        for (d, f) in [(1.0f32, 0.1), (2.0, 3.0), (6.0, 100.0)] {
            let m = vec![(INITIAL_LOSS_METRIC.to_string(), f)];
            let w = s.accept(&input(&[d], &m)).unwrap();
            assert_eq!(w, 1.0);
            sum += w * d as f64;
            used += w;
        }
        // h = L each: step = L * sum / (3 L) = mean = 3.
        assert!((sum * s.sum_scale(used) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn implausible_losses_are_refused() {
        let mut s = QFedAvg::new(&StrategyConfig::default());
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e-9, 1e4] {
            let m = vec![(INITIAL_LOSS_METRIC.to_string(), bad)];
            let err = s.accept(&input(&[1.0], &m)).unwrap_err();
            assert!(err.reason.contains("initial loss"), "{bad}: {}", err.reason);
        }
        let none = vec![("loss".to_string(), 1.0)];
        assert!(s.accept(&input(&[1.0], &none)).is_err());
        assert_eq!(s.sum_scale(1.0), 0.0, "nothing refused was counted");
    }
}
