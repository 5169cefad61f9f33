//! SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD:
//! Stochastic Controlled Averaging for Federated Learning", ICML 2020,
//! Algorithm 1 with option II): control variates correct the client drift
//! that non-IID data causes in FedAvg's local steps.
//!
//! The server keeps a control variate `c` (one value per parameter) and
//! sends it down with the model `x`. Client `i` keeps its own `c_i` (zero at
//! first), trains `K` local steps with the corrected gradient
//! `g(y) + c - c_i`, then sets
//! - `c_i+ = c_i - c + (x - y_i) / (K * lr)` (option II),
//!
//! and sends `Delta y = y_i - x` and `Delta c = c_i+ - c_i`. With `S` the
//! round's accepted updates and `N` the clients connected when the round
//! started (the paper's total number of clients):
//! - `x <- x + server_lr * (1/|S|) sum_S Delta y`
//! - `c <- c + (|S|/N) * (1/|S|) sum_S Delta c = c + (1/N) sum_S Delta c`
//!
//! Both sums stream (the engine's accumulator with weight 1 per update for
//! `Delta y`, and `c_sum` here for `Delta c`). `Delta c` passes its own norm
//! bound, the smaller of two, clipped or refused like updates: the update
//! gate's median multiple applied to the previous round's median `Delta c`
//! norm, and, with an absolute `max_update_norm` B, what an honest client's
//! `Delta c` can reach with `|Delta y| <= B`: `|c| + B / lr` (`K >= 1`, as
//! `Delta c = (x - y) / (K lr) - c`). Memory: `c` (4
//! bytes a parameter) and `c_sum` (8 bytes) on top of the accumulator. `c`
//! and that median are the strategy's checkpointed state.

use super::{ModelCheckError, Strategy, UpdateInput, UpdateRefused};

#[derive(Clone, Debug)]
pub struct Scaffold {
    server_lr: f64,
    c: Vec<f32>,
    /// The round's sum of (clipped) `Delta c`.
    c_sum: Vec<f64>,
    /// `N`: clients connected when the round started.
    clients: usize,
    /// The round's `Delta c` norms (before clipping).
    norms: Vec<f64>,
    /// Median `Delta c` norm of the last committed round.
    control_median: Option<f64>,
}

impl Scaffold {
    pub fn new(len: usize, server_lr: f64) -> Self {
        Scaffold {
            server_lr,
            c: vec![0.0; len],
            c_sum: vec![0.0; len],
            clients: 1,
            norms: Vec::new(),
            control_median: None,
        }
    }

    /// The new `c` value after this round from the old one and the round's
    /// sum of `Delta c` over `clients`.
    fn next_c(c: f32, sum: f64, clients: usize) -> f32 {
        (c as f64 + sum / clients as f64) as f32
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &'static str {
        "scaffold"
    }

    fn control_variate(&self) -> Option<&[f32]> {
        Some(&self.c)
    }

    fn begin_round(&mut self, clients: usize) {
        self.clients = clients.max(1);
        self.c_sum.fill(0.0);
        self.norms.clear();
    }

    fn accept(&mut self, u: &UpdateInput<'_>) -> Result<f64, UpdateRefused> {
        if u.extra.len() != self.c.len() {
            return Err(UpdateRefused {
                norm_bound: false,
                reason: format!(
                    "SCAFFOLD update carries {} control values, the model has {}",
                    u.extra.len(),
                    self.c.len()
                ),
            });
        }
        let norm = crate::engine::l2_norm(u.extra);
        // The update gate's bounds carried over to Delta c (the smaller of
        // the two): without the absolute one, round 1 (no median yet) would
        // let one client move c anywhere. The absolute one never clips an
        // honest client (module docs).
        let absolute = u
            .max_update_norm
            .map(|b| b / u.client_lr + crate::engine::l2_norm(&self.c));
        let relative = u
            .norm_median_multiple
            .zip(self.control_median)
            .map(|(m, median)| m * median);
        let bound = match (absolute, relative) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        let scale = match bound {
            Some(bound) if norm > bound => {
                if u.reject_over_bound {
                    return Err(UpdateRefused {
                        norm_bound: true,
                        reason: format!(
                            "control variate change norm {norm:.4e} exceeds the bound {bound:.4e}"
                        ),
                    });
                }
                bound / norm
            }
            _ => 1.0,
        };
        for (s, d) in self.c_sum.iter_mut().zip(u.extra) {
            *s += scale * *d as f64;
        }
        self.norms.push(norm);
        // The paper's |S|-mean: every client counts the same.
        Ok(1.0)
    }

    fn peek(&self, _i: usize, g: f32, d: f64) -> f64 {
        g as f64 + self.server_lr * d
    }

    fn apply(&mut self, model: &mut [f32], sum: &[f64], inv_weight: f64) {
        for (i, (g, s)) in model.iter_mut().zip(sum).enumerate() {
            *g = self.peek(i, *g, s * inv_weight) as f32;
        }
        let clients = self.clients;
        for (c, sum) in self.c.iter_mut().zip(&self.c_sum) {
            *c = Self::next_c(*c, *sum, clients);
        }
        self.norms.sort_by(|a, b| a.total_cmp(b));
        let n = self.norms.len();
        if n > 0 {
            self.control_median = Some(match n % 2 {
                1 => self.norms[n / 2],
                _ => (self.norms[n / 2 - 1] + self.norms[n / 2]) / 2.0,
            });
        }
    }

    fn check(
        &self,
        model: &[f32],
        sum: &[f64],
        inv_weight: f64,
        max_abs: f64,
    ) -> Result<(), ModelCheckError> {
        super::check_peeked_model(self, model, sum, inv_weight, max_abs)?;
        for (i, (c, sum)) in self.c.iter().zip(&self.c_sum).enumerate() {
            let v = Self::next_c(*c, *sum, self.clients);
            if !(v.is_finite() && (v as f64).abs() <= max_abs) {
                return Err(ModelCheckError::Aggregation(format!(
                    "SCAFFOLD control variate would be {v:e} at parameter {i}"
                )));
            }
        }
        Ok(())
    }

    /// `c` (little-endian f32), then a flag byte and the median `Delta c`
    /// norm (f64) when the flag is 1.
    fn state(&self) -> Vec<u8> {
        let mut out = super::encode_vectors(&[&self.c]);
        out.push(u8::from(self.control_median.is_some()));
        out.extend_from_slice(&self.control_median.unwrap_or(0.0).to_le_bytes());
        out
    }

    fn restore(&mut self, state: &[u8], len: usize) -> Result<(), String> {
        let vector_bytes = len.checked_mul(4).ok_or("state size overflows")?;
        if state.len() != vector_bytes + 9 {
            return Err(format!(
                "SCAFFOLD state has {} bytes, expected {} (control variate of {len} values, median)",
                state.len(),
                vector_bytes + 9
            ));
        }
        let mut c = super::decode_vectors(&state[..vector_bytes], 1, len)?;
        let mut median = [0u8; 8];
        median.copy_from_slice(&state[vector_bytes + 1..]);
        let median = f64::from_le_bytes(median);
        self.control_median = match state[vector_bytes] {
            0 => None,
            1 if median.is_finite() && median >= 0.0 => Some(median),
            _ => return Err("SCAFFOLD state has a bad median norm".into()),
        };
        self.c = c.pop().unwrap_or_default();
        self.c_sum = vec![0.0; len];
        Ok(())
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(extra: &'a [f32], metrics: &'a fedquic_protocol::Metrics) -> UpdateInput<'a> {
        UpdateInput {
            weight: 50.0,
            delta: &[],
            norm: 0.0,
            scale: 1.0,
            metrics,
            extra,
            client_lr: 0.1,
            max_update_norm: None,
            norm_median_multiple: Some(10.0),
            reject_over_bound: false,
        }
    }

    #[test]
    fn server_step_matches_hand_computation() {
        // N = 4 connected, |S| = 2 answer. server_lr 0.5.
        // Delta y: (1, 2) and (3, 4): mean (2, 3); x = (1, 1) + 0.5 * (2, 3) = (2, 2.5).
        // Delta c: (4, 0) and (0, 8): c = 0 + (4, 8) / 4 = (1, 2).
        let m = Vec::new();
        let mut s = Scaffold::new(2, 0.5);
        s.begin_round(4);
        assert_eq!(s.accept(&input(&[4.0, 0.0], &m)).unwrap(), 1.0);
        assert_eq!(s.accept(&input(&[0.0, 8.0], &m)).unwrap(), 1.0);
        let mut x = vec![1.0f32, 1.0];
        let sum = [1.0 + 3.0, 2.0 + 4.0];
        s.check(&x, &sum, 0.5, 1e6).unwrap();
        s.apply(&mut x, &sum, 0.5);
        assert_eq!(x, vec![2.0, 2.5]);
        assert_eq!(s.control_variate().unwrap(), &[1.0, 2.0]);
        // Median Delta c norm (4 and 8) is 6: next round bounds Delta c at 60.
        assert_eq!(s.control_median, Some(6.0));
        s.begin_round(4);
        s.accept(&input(&[120.0, 0.0], &m)).unwrap();
        let mut x2 = x.clone();
        s.apply(&mut x2, &[0.0, 0.0], 1.0);
        // Clipped to 60, divided by N = 4: c = (1 + 15, 2).
        assert_eq!(s.control_variate().unwrap(), &[16.0, 2.0]);
        let mut refusing = input(&[1e6, 0.0], &m);
        refusing.reject_over_bound = true;
        let err = s.accept(&refusing).unwrap_err();
        assert!(err.norm_bound, "{}", err.reason);
        assert!(s.accept(&input(&[1.0], &m)).is_err(), "wrong length");
    }

    #[test]
    fn the_absolute_norm_bound_applies_to_delta_c_from_round_one() {
        // Round 1, no median and no multiple: only max_update_norm = 0.1
        // stands between one client and c; with lr 0.1 and c = 0, Delta c's
        // bound is 0.1 / 0.1 + 0 = 1.
        let m = Vec::new();
        let mut s = Scaffold::new(2, 1.0);
        s.begin_round(1);
        let mut huge = input(&[3e5, 4e5], &m);
        huge.max_update_norm = Some(0.1);
        huge.norm_median_multiple = None;
        s.accept(&huge).unwrap();
        s.apply(&mut [0.0; 2], &[0.0; 2], 1.0);
        let c = s.control_variate().unwrap();
        assert!(
            (c[0] - 0.6).abs() < 1e-6 && (c[1] - 0.8).abs() < 1e-6,
            "{c:?}"
        );
        huge.reject_over_bound = true;
        let err = s.accept(&huge).unwrap_err();
        assert!(err.norm_bound, "{}", err.reason);
        // Both bounds set: the smaller one wins (10 x the median 5e5 is not);
        // the absolute one is now 0.1 / 0.1 + |c| = 2: (3, 4) becomes (1.2, 1.6).
        let mut both = input(&[3.0, 4.0], &m);
        both.max_update_norm = Some(0.1);
        s.begin_round(1);
        s.accept(&both).unwrap();
        s.apply(&mut [0.0; 2], &[0.0; 2], 1.0);
        let c = s.control_variate().unwrap();
        assert!(
            (c[0] - 1.8).abs() < 1e-6 && (c[1] - 2.4).abs() < 1e-6,
            "{c:?}"
        );
    }

    #[test]
    fn a_control_variate_out_of_bounds_fails_the_check() {
        let m = Vec::new();
        let mut s = Scaffold::new(1, 1.0);
        s.begin_round(1);
        s.accept(&input(&[3e6], &m)).unwrap();
        let err = s.check(&[0.0], &[0.0], 1.0, 1e6).unwrap_err();
        assert!(matches!(err, ModelCheckError::Aggregation(_)), "{err}");
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let m = Vec::new();
        let mut s = Scaffold::new(3, 1.0);
        s.begin_round(2);
        s.accept(&input(&[1.0, -2.0, 3.0], &m)).unwrap();
        s.apply(&mut [0.0; 3], &[0.0; 3], 1.0);
        let mut t = Scaffold::new(3, 1.0);
        t.restore(&s.state(), 3).unwrap();
        assert_eq!(t.c, s.c);
        assert_eq!(t.control_median, s.control_median);
        assert!(t.restore(&s.state(), 4).is_err());
        let mut bad = s.state();
        bad[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(t.restore(&bad, 3).is_err());
        let mut bad = s.state();
        bad[12] = 7;
        assert!(t.restore(&bad, 3).is_err());
        assert!(t.restore(&[], 3).is_err());
    }
}
