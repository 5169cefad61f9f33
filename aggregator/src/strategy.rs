//! Aggregation strategies. FedAvg folds each update into one accumulator the
//! moment it arrives, so memory is O(model) however many clients answer.

/// Weighted running sum of client deltas (FedAvg, McMahan et al. 2017).
///
/// The sum is kept in f64 so that the order in which updates arrive (which
/// the network decides) practically never changes the f32 result: the same
/// seed gives the same run.
#[derive(Debug, Clone)]
pub struct FedAvgAccumulator {
    sum: Vec<f64>,
    total_weight: f64,
    updates: usize,
}

impl FedAvgAccumulator {
    pub fn new(len: usize) -> Self {
        FedAvgAccumulator {
            sum: vec![0.0; len],
            total_weight: 0.0,
            updates: 0,
        }
    }

    /// Adds `weight * delta`. The caller has checked the length and that all
    /// values are finite (the tensor stream decoder does both).
    pub fn fold(&mut self, delta: &[f32], weight: f64) {
        debug_assert_eq!(delta.len(), self.sum.len());
        for (s, d) in self.sum.iter_mut().zip(delta) {
            *s += weight * *d as f64;
        }
        self.total_weight += weight;
        self.updates += 1;
    }

    pub fn updates(&self) -> usize {
        self.updates
    }

    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Applies the weighted mean delta to `global` (server learning rate 1,
    /// i.e. plain FedAvg) and clears the accumulator for the next round.
    /// Does nothing if no update was folded.
    pub fn apply_mean(&mut self, global: &mut [f32]) {
        if self.total_weight > 0.0 {
            let inv = 1.0 / self.total_weight;
            for (g, s) in global.iter_mut().zip(&self.sum) {
                *g = (*g as f64 + s * inv) as f32;
            }
        }
        self.reset();
    }

    /// Forgets everything folded so far.
    pub fn reset(&mut self) {
        self.sum.fill(0.0);
        self.total_weight = 0.0;
        self.updates = 0;
    }
}

/// The reference (non-streaming) FedAvg: the example-weighted mean of whole
/// client models. Used to check the streaming path.
pub fn fedavg_batch(models: &[(&[f32], f64)]) -> Option<Vec<f32>> {
    let (first, _) = models.first()?;
    let total: f64 = models.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut out = vec![0f64; first.len()];
    for (m, w) in models {
        for (o, v) in out.iter_mut().zip(m.iter()) {
            *o += *v as f64 * w;
        }
    }
    Some(out.into_iter().map(|v| (v / total) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_average_matches_hand_computation() {
        // Global 1.0; client A (weight 1) moves to 3.0, client B (weight 3) to 5.0.
        // Mean = (1*3 + 3*5) / 4 = 4.5.
        let mut global = vec![1.0f32, -2.0];
        let mut acc = FedAvgAccumulator::new(2);
        acc.fold(&[2.0, 0.0], 1.0);
        acc.fold(&[4.0, 4.0], 3.0);
        assert_eq!(acc.updates(), 2);
        acc.apply_mean(&mut global);
        assert_eq!(global, vec![4.5, 1.0]);
        assert_eq!(acc.updates(), 0);
    }

    #[test]
    fn streaming_equals_batch_fedavg() {
        let global: Vec<f32> = (0..257).map(|i| (i as f32 * 0.37).sin()).collect();
        let clients: Vec<(Vec<f32>, f64)> = (0..13)
            .map(|c| {
                let m = global
                    .iter()
                    .enumerate()
                    .map(|(i, g)| g + ((c * 31 + i) as f32 * 0.11).cos() * 0.1)
                    .collect();
                (m, (c * 7 % 5 + 1) as f64 * 10.0)
            })
            .collect();
        let mut acc = FedAvgAccumulator::new(global.len());
        for (m, w) in &clients {
            let delta: Vec<f32> = m.iter().zip(&global).map(|(a, b)| a - b).collect();
            acc.fold(&delta, *w);
        }
        let mut streamed = global.clone();
        acc.apply_mean(&mut streamed);
        let refs: Vec<(&[f32], f64)> = clients.iter().map(|(m, w)| (m.as_slice(), *w)).collect();
        let batch = fedavg_batch(&refs).unwrap();
        for (s, b) in streamed.iter().zip(&batch) {
            assert!((s - b).abs() < 1e-5, "{s} vs {b}");
        }
    }

    #[test]
    fn empty_round_leaves_the_model_alone() {
        let mut global = vec![1.0f32; 4];
        FedAvgAccumulator::new(4).apply_mean(&mut global);
        assert_eq!(global, vec![1.0; 4]);
        assert!(fedavg_batch(&[]).is_none());
    }
}
