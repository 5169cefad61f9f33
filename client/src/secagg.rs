//! The client's side of secure aggregation (SecAgg+, Bell et al. 2020).
//!
//! A fit task with [`SecAggTask`] runs the key exchange on the control
//! stream while the model trains: advertise keys at once, answer the
//! neighbour list with encrypted shares, take the relayed shares. Once both
//! training and the exchange are done, the update is clipped, weighted,
//! quantised, noised (distributed DP) and masked
//! ([`prepare_masked_input`]), and sent as `ring32`. The client then keeps
//! the round's secrets until the aggregator's unmask request, which an
//! honest client answers at most once and refuses when it asks for both
//! secrets of one neighbour (see `fedquic_privacy::secagg::ClientRound`).
//!
//! The key material and the noise come from the operating system's random
//! generator, never from anything the aggregator sent: a server that knew
//! the seed could remove the masks or the noise. The simulator may pass a
//! seed for reproducible research runs.

use fedquic_privacy::dp;
use fedquic_privacy::secagg::ClientRound;
use fedquic_protocol::{ClientNoise, SECAGG_EXTRA_VALUES, SecAggTask};

/// Why a masked input could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SecAggClientError {
    #[error("secure aggregation: {0}")]
    Protocol(#[from] fedquic_privacy::secagg::SecAggError),
    #[error("secure aggregation: fixed point: {0}")]
    FixedPoint(#[from] fedquic_privacy::secagg::FixedPointError),
    #[error("secure aggregation: noise: {0}")]
    Noise(#[from] dp::DpError),
    #[error("secure aggregation: {0}")]
    Task(String),
}

/// The fresh secrets of one round: OS randomness, or (simulation) derived
/// from `seed` and the task.
pub fn round_secret(seed: Option<u64>, task_id: u64) -> [u8; 32] {
    match seed {
        Some(seed) => {
            let mut out = [0u8; 32];
            let mut state = seed ^ task_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for chunk in out.chunks_mut(8) {
                // SplitMix64: enough to spread a simulation seed.
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            out
        }
        None => rand::random(),
    }
}

/// Turns a trained update into the masked input a SecAgg round sums:
/// `delta` clipped to `task.clip_norm`, scaled by the update's weight, then
/// the weight and the within-clip indicator, quantised with the task's fixed
/// point, Skellam noise added when the task asks for it, and masked by
/// `round`. `noise_key` drives the rounding and the noise: it must be
/// secret from the aggregator (see [`round_secret`]); the noise uses all
/// 32 bytes of it. Returns the body's bytes (little-endian `u32`s).
pub fn prepare_masked_input(
    task: &SecAggTask,
    mut delta: Vec<f32>,
    examples: u64,
    round: &mut ClientRound,
    noise_key: &[u8; 32],
) -> Result<Vec<u8>, SecAggClientError> {
    task.validate()
        .map_err(|e| SecAggClientError::Task(e.to_string()))?;
    let norm = dp::clip_l2(&mut delta, task.clip_norm)?;
    let within_clip = norm <= task.clip_norm;
    let weight = match task.weight_cap {
        0 => 1.0,
        cap => examples.min(cap) as f64 / cap as f64,
    };
    if weight < 1.0 {
        for v in &mut delta {
            *v = (f64::from(*v) * weight) as f32;
        }
    }
    delta.reserve_exact(SECAGG_EXTRA_VALUES);
    delta.push(weight as f32);
    delta.push(if within_clip { 1.0 } else { 0.0 });
    let fixed_point = task.fixed_point()?;
    let mut rounding_seed = [0u8; 8];
    rounding_seed.copy_from_slice(&noise_key[..8]);
    let mut input = vec![0u32; delta.len()];
    fixed_point.encode_into(&delta, &mut input, u64::from_le_bytes(rounding_seed) ^ 0x51)?;
    drop(delta);
    if let ClientNoise::Skellam { mu } = task.noise {
        dp::add_skellam_noise_u32_with_rng(&mut input, mu, &mut dp::keyed_rng(noise_key, 0x5e))?;
    }
    round.mask(&mut input)?;
    let mut body = Vec::with_capacity(4 * input.len());
    for v in input {
        body.extend_from_slice(&v.to_le_bytes());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_skellam_mu_a_task_may_carry_can_be_sampled() {
        assert_eq!(SecAggTask::MAX_SKELLAM_MU, dp::mechanism::MAX_POISSON_MEAN);
    }
}
