//! FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
//! Networks from Decentralized Data", AISTATS 2017) and FedProx (Li et al.,
//! "Federated Optimization in Heterogeneous Networks", MLSys 2020).

use fedquic_protocol::FitInstructions;

use super::Strategy;

/// `w <- w + d`: the example-weighted mean of the client models.
#[derive(Clone, Copy, Debug, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(*self)
    }
}

/// FedAvg's server step, with every round's clients told to add the proximal
/// term `mu/2 * ||w - w_global||^2` to their local objective (the clients
/// implement the term; the strategy sets `mu` each round, overriding
/// `[fit] proximal_mu`).
#[derive(Clone, Copy, Debug)]
pub struct FedProx {
    pub mu: f32,
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn configure_fit(&self, _round: u64, base: &FitInstructions) -> FitInstructions {
        FitInstructions {
            proximal_mu: self.mu,
            ..base.clone()
        }
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_adds_the_mean_delta_and_fedprox_sets_mu() {
        let mut model = vec![1.0f32, -1.0];
        // Sum of weighted deltas (2, 6) over weight 4: mean (0.5, 1.5).
        FedAvg.apply(&mut model, &[2.0, 6.0], 0.25);
        assert_eq!(model, vec![1.5, 0.5]);
        let base = FitInstructions {
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            seed: 1,
            optimizer: Default::default(),
        };
        let fit = FedProx { mu: 0.25 }.configure_fit(3, &base);
        assert_eq!(fit.proximal_mu, 0.25);
        assert_eq!(fit.epochs, 1);
    }
}
