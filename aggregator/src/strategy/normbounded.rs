//! Norm-bounded FedAvg (Sun et al., "Can You Really Backdoor Federated
//! Learning?", 2019): every update is scaled down to L2 norm at most
//! `clip_norm` before it is averaged, `delta <- delta * min(1, C / |delta|)`,
//! which bounds what any one client (a backdoor attacker, say) can add to a
//! round, whatever the update gate's own bound.

use super::Strategy;

#[derive(Clone, Copy, Debug)]
pub struct NormBoundedFedAvg {
    pub clip_norm: f64,
}

impl Strategy for NormBoundedFedAvg {
    fn name(&self) -> &'static str {
        "normbounded"
    }

    fn clip_norm(&self) -> Option<f64> {
        Some(self.clip_norm)
    }

    fn clone_box(&self) -> Box<dyn Strategy> {
        Box::new(*self)
    }
}
