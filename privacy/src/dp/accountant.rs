//! Rényi-DP accounting of federated rounds.
//!
//! # Model
//!
//! The unit of privacy is the client. One step is one round: a subset of the
//! population is sampled, each sampled client's update is clipped to L2 norm `C`,
//! the clipped updates are summed and the sum receives noise (Gaussian with standard
//! deviation `sigma * C`, or Skellam). The noise multiplier `sigma` used throughout
//! this API is always `noise std / C`, i.e. relative to one client's clip norm.
//!
//! # Rényi DP and composition
//!
//! A mechanism is `(alpha, eps(alpha))`-RDP if the Rényi divergence of order `alpha`
//! between its outputs on neighbouring inputs is at most `eps(alpha)`
//! (Mironov 2017, "Rényi Differential Privacy", CSF). RDP composes additively at every
//! order (Mironov 2017, Prop. 1), so the accountant keeps one running sum per order.
//!
//! # Sampling: which one applies when
//!
//! * [`Sampling::Poisson`]: every client joins a round independently with probability
//!   `q`; neighbouring populations differ by adding or removing one client. The RDP
//!   of the sampled Gaussian mechanism is computed as in Mironov, Talwar, Zhang 2019
//!   ("Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530):
//!   for integer `alpha`, `A_alpha = sum_{i=0}^{alpha} C(alpha,i) q^i (1-q)^(alpha-i)
//!   exp((i^2 - i) / (2 sigma^2))` (Sec. 3.2) and for fractional `alpha` the two-sided
//!   erfc series of Sec. 3.3; `eps(alpha) = ln(A_alpha) / (alpha - 1)`. Sums are in
//!   log space. This is the code path of dp-accounting's `PoissonSampledDpEvent`
//!   (the TF Privacy / Opacus `compute_rdp`) and matches it to floating-point
//!   accuracy (see `tests/data/rdp_reference.csv`). It is the right accounting when
//!   the engine really samples each client independently, and it is the standard
//!   *approximation* used by most FL papers when a fixed number is drawn.
//! * [`Sampling::FixedSizeWithoutReplacement`]: exactly `m` of `n` clients are drawn
//!   uniformly without replacement (`q = m / n`, `n` public), which is what fedquic's
//!   engine does. The bound is Wang, Balle, Kasiviswanathan 2019 ("Subsampled Rényi
//!   Differential Privacy and Analytical Moments Accountant", AISTATS, Theorem 27 for
//!   the Gaussian, Corollary 10 to interpolate fractional orders), as in
//!   dp-accounting's `SampledWithoutReplacementDpEvent`. That theorem is for the
//!   *replace-one* relation (one client's data swapped for another's), under which the
//!   L2 sensitivity of a sum of updates clipped to `C` is `2C`: the accountant
//!   therefore evaluates it with the noise multiplier `sigma / 2` relative to that
//!   sensitivity. Replace-one epsilons are not comparable one-to-one with add/remove
//!   ones (replace-one is roughly add/remove applied twice), which is why an accountant
//!   refuses to mix the two ([`DpError::MixedSampling`]). Note that dp-accounting itself
//!   feeds `GaussianDpEvent.noise_multiplier` (defined as `std / C`) unchanged into this
//!   bound, which under-counts replace-one RDP by 4x (google/differential-privacy issue
//!   #378); the reference CSV is therefore generated with `sigma / 2` explicitly.
//!   With the Wang-Balle-Kasiviswanathan bound the fixed-size epsilon is several times
//!   the Poisson one at the same `q` and `sigma` (e.g. `q = 0.001, sigma = 1`, 1000
//!   rounds, `delta = 1e-5`: 5.13 versus 0.68); part of that is the stronger replace-one
//!   notion and part is the looseness of the bound.
//!
//! # Conversion to (epsilon, delta)
//!
//! `eps = min_alpha [ rdp(alpha) + ln(1 - 1/alpha) - ln(delta * alpha) / (alpha - 1) ]`
//! (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy",
//! Prop. 12; Asoodeh, Liao, Calmon, Kosut, Sankar 2020), used for `alpha > 1.01`, and
//! `eps = 0` when `delta^2 > 1 - exp(-rdp(alpha))` (the KL bound). This is exactly
//! dp-accounting 0.6.0's `compute_epsilon`.

use serde::{Deserialize, Serialize};

use super::config::OnBudget;
use super::special::{log_add, log_comb, log_erfc, log_sub_sign};
use super::{DpError, check};

/// How the clients of a round are selected; decides the amplification bound and the
/// neighbouring relation (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Each client independently with probability `q`; add/remove-one neighbours.
    #[default]
    Poisson,
    /// Exactly `q * n` clients uniformly without replacement; replace-one neighbours.
    FixedSizeWithoutReplacement,
}

/// The largest RDP order accepted (bounds the work per step).
pub const MAX_ORDER: f64 = 10_000.0;

/// Number of orders in [`default_orders`].
pub const DEFAULT_ORDERS_COUNT: usize = 151;

/// Opacus's `DEFAULT_ALPHAS`: `1.1, 1.2, ..., 10.9` and `12, 13, ..., 63`.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// dp-accounting's `_MAX_STEPS_LOG_A_FRAC`: terms of the fractional-order series before
/// the order is given up (its RDP is then infinite, so it never wins the minimum).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

fn is_integer(alpha: f64) -> bool {
    alpha.fract() == 0.0
}

fn check_q(q: f64) -> Result<f64, DpError> {
    check("q", q, "a sampling rate in [0, 1]", |q| {
        (0.0..=1.0).contains(&q)
    })
}

fn check_sigma(sigma: f64) -> Result<f64, DpError> {
    check("noise_multiplier", sigma, "finite and > 0", |s| s > 0.0)
}

fn check_delta(delta: f64) -> Result<f64, DpError> {
    check("delta", delta, "in (0, 1)", |d| d > 0.0 && d < 1.0)
}

fn check_orders(orders: &[f64]) -> Result<(), DpError> {
    if orders.is_empty() {
        return Err(DpError::InvalidOrders("no orders".into()));
    }
    for &a in orders {
        if !(a.is_finite() && a > 1.0 && a <= MAX_ORDER) {
            return Err(DpError::InvalidOrders(format!(
                "order {a} is not finite or not in (1, {MAX_ORDER}]"
            )));
        }
    }
    Ok(())
}

/// `ln A_alpha` for integer `alpha`, `0 < q < 1` (Mironov, Talwar, Zhang 2019, Sec. 3.2).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = log_comb(a, i) + i * log_q + (a - i) * log1mq;
        let s = log_coef + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// `ln A_alpha` for fractional `alpha`, `0 < q < 1` (Mironov, Talwar, Zhang 2019,
/// Sec. 3.3): the integrals over `(-inf, z0]` and `[z0, inf)` with
/// `z0 = sigma^2 ln(1/q - 1) + 1/2`, summed until both series decrease and their terms
/// are `e^-30` below the total. Infinite if that takes more than 1000 terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * log_q + j * log1mq;
        let log_t1 = log_coef + j * log_q + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / sqrt2_sigma);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2_sigma);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// RDP at order `alpha` of one step of the Poisson-subsampled Gaussian mechanism with
/// sampling rate `q` and noise multiplier `sigma` (std / L2 sensitivity), add/remove-one
/// neighbours (Mironov, Talwar, Zhang 2019). `q = 1` gives the Gaussian's
/// `alpha / (2 sigma^2)` (Mironov 2017, Prop. 7); `q = 0` gives 0.
pub fn rdp_poisson_gaussian(q: f64, sigma: f64, alpha: f64) -> Result<f64, DpError> {
    check_q(q)?;
    check_sigma(sigma)?;
    check_orders(&[alpha])?;
    Ok(rdp_poisson_unchecked(q, sigma, alpha))
}

fn rdp_poisson_unchecked(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if q == 1.0 {
        alpha / (2.0 * sigma * sigma)
    } else if is_integer(alpha) {
        log_a_int(q, sigma, alpha as u64) / (alpha - 1.0)
    } else {
        log_a_frac(q, sigma, alpha) / (alpha - 1.0)
    }
}

/// In-place forward differences in log space with signs (dp-accounting's
/// `_stable_inplace_diff_in_log`).
fn stable_inplace_diff_in_log(vec: &mut [f64], signs: &mut [bool], n: usize) {
    for j in 0..n {
        if signs[j] == signs[j + 1] {
            let (s, m) = log_sub_sign(vec[j + 1], vec[j]);
            signs[j] = s;
            vec[j] = m;
            if !signs[j + 1] {
                signs[j] = !signs[j];
            }
        } else {
            vec[j] = log_add(vec[j], vec[j + 1]);
            signs[j] = signs[j + 1];
        }
    }
}

/// Log-magnitudes of the forward differences of `exp(f)` at 0, orders `0..=n+1`
/// (Wang, Balle, Kasiviswanathan 2019, Theorem 27; dp-accounting's `_get_forward_diffs`).
fn forward_diffs(f: impl Fn(f64) -> f64, n: usize) -> Vec<f64> {
    let mut func_vec = vec![0.0; n + 3];
    let mut signs = vec![true; n + 3];
    let mut deltas = vec![0.0; n + 2];
    for (i, v) in func_vec.iter_mut().enumerate().skip(1) {
        *v = f((i - 1) as f64);
    }
    for (i, d) in deltas.iter_mut().enumerate() {
        stable_inplace_diff_in_log(&mut func_vec, &mut signs, n + 2 - i);
        *d = func_vec[0];
    }
    deltas
}

/// `ln A_alpha` of Wang, Balle, Kasiviswanathan 2019, Theorem 27, for the Gaussian with
/// noise multiplier `sigma` (relative to the replace-one sensitivity), integer `alpha`:
/// `A = 1 + q^2 C(alpha,2) min(4 (e^{eps(2)} - 1), 2 e^{eps(2)})
///      + sum_{j=3}^{alpha} q^j C(alpha,j) min(4 sqrt(D_lo D_hi), 2 e^{(j-1) eps(j)})`
/// with `D` the forward differences of `exp((j-1) eps(j))`; above order 256 the cheaper
/// second bound alone (as dp-accounting does).
fn wor_log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    if alpha == 1 {
        return 0.0;
    }
    let s2 = 2.0 * sigma * sigma;
    let cgf = |x: f64| x * (x + 1.0) / s2;
    let func = |x: f64| x / s2;
    let a = alpha as f64;
    let log_q = q.ln();
    let ln2 = 2f64.ln();
    let ln4 = 4f64.ln();
    let mut log_a = 0.0;
    let log_f2m1 = func(2.0) + (-(-func(2.0)).exp()).ln_1p();
    let first = 2.0 * log_q + log_comb(a, 2.0) + (ln4 + log_f2m1).min(func(2.0) + ln2);
    if alpha <= 256 {
        let deltas = forward_diffs(cgf, alpha as usize);
        for i in 2..=alpha {
            let s = if i == 2 {
                first
            } else {
                let lo = deltas[(2 * (i / 2) - 1) as usize];
                let hi = deltas[(2 * i.div_ceil(2) - 1) as usize];
                let fi = i as f64;
                let s = (ln4 + 0.5 * (lo + hi)).min(ln2 + cgf(fi - 1.0));
                s + fi * log_q + log_comb(a, fi)
            };
            log_a = log_add(log_a, s);
        }
    } else {
        for i in 2..=alpha {
            let s = if i == 2 {
                first
            } else {
                let fi = i as f64;
                ln2 + cgf(fi - 1.0) + fi * log_q + log_comb(a, fi)
            };
            log_a = log_add(log_a, s);
        }
    }
    log_a
}

/// RDP at order `alpha` of one step of the Gaussian mechanism on a uniformly random
/// subset of fixed size `q * n` drawn without replacement, replace-one neighbours, with
/// `sigma` the noise std divided by the **replace-one** L2 sensitivity (Wang, Balle,
/// Kasiviswanathan 2019, Theorem 27; fractional orders interpolate the cumulant
/// generating function linearly between floor and ceiling, their Corollary 10).
/// Matches dp-accounting's `_compute_rdp_sample_wor_gaussian`.
pub fn rdp_without_replacement_gaussian(q: f64, sigma: f64, alpha: f64) -> Result<f64, DpError> {
    check_q(q)?;
    check_sigma(sigma)?;
    check_orders(&[alpha])?;
    Ok(rdp_wor_unchecked(q, sigma, alpha))
}

fn rdp_wor_unchecked(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if q == 1.0 {
        alpha / (2.0 * sigma * sigma)
    } else if is_integer(alpha) {
        wor_log_a_int(q, sigma, alpha as u64) / (alpha - 1.0)
    } else {
        let (lo, hi) = (alpha.floor(), alpha.ceil());
        let x = wor_log_a_int(q, sigma, lo as u64);
        let y = wor_log_a_int(q, sigma, hi as u64);
        let t = alpha - lo;
        ((1.0 - t) * x + t * y) / (alpha - 1.0)
    }
}

/// RDP at order `alpha` of the Skellam mechanism: noise `Poisson(mu) - Poisson(mu)` per
/// coordinate (variance `2 mu`) on an integer vector whose L1 and L2 sensitivities are
/// `l1` and `l2` (in the integer, scaled domain).
///
/// Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism for Differentially Private
/// Federated Learning", NeurIPS), Theorem 3.5, written for variance `V = 2 mu`:
/// `eps(alpha) <= alpha l2^2 / (2V) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 V^2), 3 l1 / (2V))`
/// `= alpha l2^2 / (4 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))`.
/// The first term is the Gaussian of the same variance; the rest is the price of
/// discreteness, negligible once `mu >> l2^2`. The theorem is stated for integer orders;
/// a fractional order is charged the bound of its ceiling, which is valid because Rényi
/// divergence does not decrease with the order.
pub fn rdp_skellam(mu: f64, l1: f64, l2: f64, alpha: f64) -> Result<f64, DpError> {
    check("mu", mu, "finite and > 0", |m| m > 0.0)?;
    check("l1", l1, "finite and >= 0", |x| x >= 0.0)?;
    check("l2", l2, "finite and >= 0", |x| x >= 0.0)?;
    check_orders(&[alpha])?;
    Ok(skellam_unchecked(mu, l1, l2, alpha.ceil()))
}

fn skellam_unchecked(mu: f64, l1: f64, l2: f64, alpha: f64) -> f64 {
    let l2sq = l2 * l2;
    alpha * l2sq / (4.0 * mu)
        + (((2.0 * alpha - 1.0) * l2sq + 6.0 * l1) / (16.0 * mu * mu)).min(3.0 * l1 / (4.0 * mu))
}

/// Zhu & Wang 2019 ("Poisson Subsampled Rényi Differential Privacy", ICML, the general
/// upper bound valid for any mechanism, add/remove neighbours), at integer `alpha >= 2`:
/// `eps'(alpha) <= 1/(alpha-1) ln[ (1-q)^(alpha-1) (alpha q - q + 1)
///   + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
///   + 3 sum_{l=3}^{alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} ]`,
/// the bound the Skellam paper's authors use for their experiments
/// (google-research/federated `distributed_dp/accounting_utils.py`,
/// `_compute_rdp_subsampled`), also capped by the unamplified `eps(alpha)`.
fn poisson_amplified_generic(q: f64, alpha: u64, eps: impl Fn(f64) -> f64) -> f64 {
    let a = alpha as f64;
    let unamplified = eps(a);
    if q >= 1.0 {
        return unamplified;
    }
    let (log_q, log1mq) = (q.ln(), (-q).ln_1p());
    let mut total = (a - 1.0) * log1mq + (a * q - q + 1.0).ln();
    total = log_add(
        total,
        log_comb(a, 2.0) + 2.0 * log_q + (a - 2.0) * log1mq + eps(2.0),
    );
    for l in 3..=alpha {
        let l = l as f64;
        let term = 3f64.ln() + log_comb(a, l) + l * log_q + (a - l) * log1mq + (l - 1.0) * eps(l);
        total = log_add(total, term);
    }
    (total / (a - 1.0)).min(unamplified)
}

/// A checkpoint of an [`RdpAccountant`]: plain data for the aggregator's state file.
/// `rdp` entries may be `inf` (an order whose series did not converge); use a format
/// that keeps infinities (postcard does, JSON does not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountantState {
    /// RDP orders, all in `(1, MAX_ORDER]`.
    pub orders: Vec<f64>,
    /// Accumulated RDP per order, same length as `orders`, each `>= 0`.
    pub rdp: Vec<f64>,
    /// The sampling (hence neighbouring relation) composed so far, if any.
    pub sampling: Option<Sampling>,
    /// Rounds composed so far.
    pub steps: u64,
}

/// Rényi-DP accountant: one running RDP sum per order (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    sampling: Option<Sampling>,
    steps: u64,
}

impl RdpAccountant {
    /// A fresh accountant over `orders`, or [`default_orders`] (Opacus's
    /// `DEFAULT_ALPHAS`) when `None`. Orders must be finite and in `(1, MAX_ORDER]`.
    pub fn new(orders: Option<Vec<f64>>) -> Result<Self, DpError> {
        let orders = orders.unwrap_or_else(default_orders);
        check_orders(&orders)?;
        Ok(Self {
            rdp: vec![0.0; orders.len()],
            orders,
            sampling: None,
            steps: 0,
        })
    }

    /// The RDP orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Rounds composed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The sampling composed so far (`None` before the first step).
    pub fn sampling(&self) -> Option<Sampling> {
        self.sampling
    }

    fn claim_sampling(&mut self, sampling: Sampling) -> Result<(), DpError> {
        match self.sampling {
            Some(existing) if existing != sampling => Err(DpError::MixedSampling {
                existing,
                new: sampling,
            }),
            _ => Ok(()),
        }
    }

    fn add(&mut self, per_step: &[f64], steps: u64, sampling: Sampling) {
        for (acc, r) in self.rdp.iter_mut().zip(per_step) {
            *acc += steps as f64 * r;
        }
        self.sampling = Some(sampling);
        self.steps = self.steps.saturating_add(steps);
    }

    /// Composes `steps` rounds of the sampled Gaussian mechanism: sampling rate
    /// `q = clients per round / population` in `[0, 1]`, noise multiplier
    /// `sigma = noise std / clip norm` (> 0). For
    /// [`Sampling::FixedSizeWithoutReplacement`] the replace-one sensitivity `2C` is
    /// taken into account (the bound is evaluated at `sigma / 2`). `steps = 0` is a
    /// no-op.
    pub fn step(
        &mut self,
        q: f64,
        noise_multiplier: f64,
        steps: u64,
        sampling: Sampling,
    ) -> Result<(), DpError> {
        check_q(q)?;
        check_sigma(noise_multiplier)?;
        self.claim_sampling(sampling)?;
        if steps == 0 {
            return Ok(());
        }
        let per_step: Vec<f64> = match sampling {
            Sampling::Poisson => self
                .orders
                .iter()
                .map(|&a| rdp_poisson_unchecked(q, noise_multiplier, a))
                .collect(),
            Sampling::FixedSizeWithoutReplacement => self
                .orders
                .iter()
                .map(|&a| rdp_wor_unchecked(q, noise_multiplier / 2.0, a))
                .collect(),
        };
        self.add(&per_step, steps, sampling);
        Ok(())
    }

    /// Composes `steps` rounds of the distributed Skellam mechanism
    /// ([`rdp_skellam`]): total noise `Poisson(mu) - Poisson(mu)` per coordinate of the
    /// integer sum, where one client's scaled, rounded update has L1 norm at most `l1`
    /// and L2 norm at most `l2` (add/remove sensitivities; doubled for replace-one).
    ///
    /// Subsampling: with [`Sampling::Poisson`] and `q < 1` the generic amplification
    /// bound of Zhu & Wang 2019 is applied (the one the Skellam paper's authors use),
    /// capped by the unamplified bound. With [`Sampling::FixedSizeWithoutReplacement`]
    /// **no amplification** is claimed (the RDP of the full-participation mechanism with
    /// replace-one sensitivities `2 l1`, `2 l2`): a valid but conservative bound.
    /// `mu` must be the noise that the clients who actually contributed added (with
    /// dropouts, `n_contributed * mu_per_client`), not the planned one.
    pub fn step_skellam(
        &mut self,
        q: f64,
        mu: f64,
        l1: f64,
        l2: f64,
        steps: u64,
        sampling: Sampling,
    ) -> Result<(), DpError> {
        check_q(q)?;
        check("mu", mu, "finite and > 0", |m| m > 0.0)?;
        check("l1", l1, "finite and >= 0", |x| x >= 0.0)?;
        check("l2", l2, "finite and >= 0", |x| x >= 0.0)?;
        self.claim_sampling(sampling)?;
        if steps == 0 {
            return Ok(());
        }
        let per_step: Vec<f64> = match sampling {
            Sampling::Poisson if q == 0.0 => vec![0.0; self.orders.len()],
            Sampling::Poisson => self
                .orders
                .iter()
                .map(|&a| {
                    let eps = |x: f64| skellam_unchecked(mu, l1, l2, x);
                    poisson_amplified_generic(q, a.ceil() as u64, eps)
                })
                .collect(),
            Sampling::FixedSizeWithoutReplacement => self
                .orders
                .iter()
                .map(|&a| skellam_unchecked(mu, 2.0 * l1, 2.0 * l2, a.ceil()))
                .collect(),
        };
        self.add(&per_step, steps, sampling);
        Ok(())
    }

    /// The smallest `epsilon` over the orders such that everything composed so far is
    /// `(epsilon, delta)`-DP, and the order that achieves it (conversion: module docs).
    /// `delta` must be in `(0, 1)`. Returns `(inf, order)` if every order is infinite.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), DpError> {
        check_delta(delta)?;
        let mut best = (f64::INFINITY, self.orders[0]);
        for (&a, &r) in self.orders.iter().zip(&self.rdp) {
            let eps = if r.is_nan() {
                f64::INFINITY
            } else if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            };
            if eps < best.0 {
                best = (eps, a);
            }
        }
        Ok((best.0.max(0.0), best.1))
    }

    /// The accountant's state, for checkpointing.
    pub fn state(&self) -> AccountantState {
        AccountantState {
            orders: self.orders.clone(),
            rdp: self.rdp.clone(),
            sampling: self.sampling,
            steps: self.steps,
        }
    }

    /// Rebuilds an accountant from a checkpoint, validating it.
    pub fn restore(state: AccountantState) -> Result<Self, DpError> {
        check_orders(&state.orders)?;
        if state.rdp.len() != state.orders.len() {
            return Err(DpError::InvalidState(format!(
                "{} rdp values for {} orders",
                state.rdp.len(),
                state.orders.len()
            )));
        }
        if let Some(r) = state.rdp.iter().find(|r| r.is_nan() || **r < 0.0) {
            return Err(DpError::InvalidState(format!("rdp value {r} is not >= 0")));
        }
        Ok(Self {
            orders: state.orders,
            rdp: state.rdp,
            sampling: state.sampling,
            steps: state.steps,
        })
    }
}

/// Epsilon after `steps` rounds of the sampled Gaussian mechanism at `delta`, over the
/// default orders.
pub fn epsilon_after(
    q: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
    sampling: Sampling,
) -> Result<f64, DpError> {
    let mut acc = RdpAccountant::new(None)?;
    acc.step(q, noise_multiplier, steps, sampling)?;
    Ok(acc.epsilon(delta)?.0)
}

/// A privacy budget `(epsilon, delta)` and what to do when a round would exceed it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Largest epsilon allowed, finite and > 0.
    pub epsilon: f64,
    /// Delta at which epsilon is measured, in (0, 1).
    pub delta: f64,
    /// Stop training, or log a warning and go on.
    pub on_exceed: OnBudget,
}

impl Budget {
    /// A validated budget.
    pub fn new(epsilon: f64, delta: f64, on_exceed: OnBudget) -> Result<Self, DpError> {
        check("epsilon", epsilon, "finite and > 0", |e| e > 0.0)?;
        check_delta(delta)?;
        Ok(Self {
            epsilon,
            delta,
            on_exceed,
        })
    }

    /// Epsilon spent so far at this budget's delta.
    pub fn spent(&self, accountant: &RdpAccountant) -> Result<f64, DpError> {
        self.validate()?;
        Ok(accountant.epsilon(self.delta)?.0)
    }

    /// Whether one more round with sampling rate `q` and noise multiplier
    /// `noise_multiplier` would take the accountant past the budget. Call it before
    /// running the round; the accountant is not changed.
    pub fn would_exceed(
        &self,
        accountant: &RdpAccountant,
        q: f64,
        noise_multiplier: f64,
        sampling: Sampling,
    ) -> Result<bool, DpError> {
        self.validate()?;
        let mut next = accountant.clone();
        next.step(q, noise_multiplier, 1, sampling)?;
        Ok(next.epsilon(self.delta)?.0 > self.epsilon)
    }

    fn validate(&self) -> Result<(), DpError> {
        Self::new(self.epsilon, self.delta, self.on_exceed).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_orders_are_opacus_default_alphas() {
        let o = default_orders();
        assert_eq!(o.len(), DEFAULT_ORDERS_COUNT);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 12.0);
        assert_eq!(*o.last().unwrap(), 63.0);
    }

    #[test]
    fn full_participation_is_the_gaussian() {
        for alpha in [1.5, 2.0, 7.3, 32.0] {
            let r = rdp_poisson_gaussian(1.0, 1.3, alpha).unwrap();
            assert!((r - alpha / (2.0 * 1.3 * 1.3)).abs() < 1e-12);
        }
    }

    #[test]
    fn integer_and_fractional_orders_agree_nearby() {
        // RDP is continuous in alpha: the two code paths must meet.
        let a = rdp_poisson_gaussian(0.01, 1.1, 5.0).unwrap();
        let b = rdp_poisson_gaussian(0.01, 1.1, 5.000_001).unwrap();
        assert!((a - b).abs() / a < 1e-4, "{a} {b}");
    }

    #[test]
    fn skellam_bound_formula() {
        // alpha = 2, mu = 100, l1 = 4, l2 = 2:
        // 2*4/400 + min((3*4 + 24)/(16*1e4), 12/400) = 0.02 + 0.000225
        let r = rdp_skellam(100.0, 4.0, 2.0, 2.0).unwrap();
        assert!((r - 0.020225).abs() < 1e-15, "{r}");
        // fractional orders are charged their ceiling
        assert_eq!(rdp_skellam(100.0, 4.0, 2.0, 1.5).unwrap(), r);
    }

    #[test]
    fn generic_amplification_bounds_the_exact_subsampled_gaussian() {
        // Zhu-Wang's generic bound applied to the Gaussian's eps(l) = l / (2 sigma^2)
        // must be an upper bound on the exact Poisson-subsampled Gaussian RDP, and not
        // a vacuous one.
        for (q, sigma) in [(0.01, 1.0), (0.1, 2.0), (0.3, 0.8)] {
            for alpha in [2u64, 3, 8, 32] {
                let exact = rdp_poisson_unchecked(q, sigma, alpha as f64);
                let generic = poisson_amplified_generic(q, alpha, |l| l / (2.0 * sigma * sigma));
                assert!(generic >= exact * (1.0 - 1e-12), "{q} {sigma} {alpha}");
                assert!(
                    generic <= 3.0 * exact + 1e-3,
                    "{q} {sigma} {alpha}: {generic} {exact}"
                );
            }
        }
    }

    #[test]
    fn generic_amplification_is_below_unamplified_and_tends_to_it() {
        let eps = |x: f64| skellam_unchecked(50.0, 10.0, 3.0, x);
        for alpha in [2u64, 5, 20, 63] {
            let a = alpha as f64;
            let amp = poisson_amplified_generic(0.01, alpha, eps);
            assert!(amp > 0.0 && amp <= eps(a));
            assert_eq!(poisson_amplified_generic(1.0, alpha, eps), eps(a));
        }
    }
}
