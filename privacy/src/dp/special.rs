//! Log-space helpers shared by the accountant and the samplers. They mirror the helpers
//! of Google's `dp_accounting.rdp.rdp_privacy_accountant` (`_log_add`, `_log_sub_sign`,
//! `_log_comb`, `_log_erfc`) so that the accountant reproduces its numbers.

/// `ln(e^x + e^y)` without overflow.
pub(crate) fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    // e^a + e^b = (e^(a-b) + 1) e^b
    (a - b).exp().ln_1p() + b
}

/// `(sign, ln|e^x - e^y|)`; sign `true` when `e^x >= e^y`.
pub(crate) fn log_sub_sign(x: f64, y: f64) -> (bool, f64) {
    if x > y {
        (true, x + (-(y - x).exp()).ln_1p())
    } else if x < y {
        (false, y + (-(x - y).exp()).ln_1p())
    } else {
        (true, f64::NEG_INFINITY)
    }
}

/// `ln |binom(n, k)|` for real `n`, `k` through `ln|Gamma|` (as scipy's `gammaln`).
pub(crate) fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `ln erfc(x)`, accurate in the far tail where `erfc` underflows.
///
/// Below `x = 25` it is `ln(erfc(x))` with musl's `erfc` (relative error about one ulp,
/// no underflow: `erfc(25)` is about `1e-274`). Above, the asymptotic expansion
/// `ln erfc(x) = -x^2 - ln(x sqrt(pi)) - 1/(2x^2) + 5/(8x^4) - 37/(24x^6) + 353/(64x^8) + O(x^-10)`
/// (the same series dp_accounting falls back to), whose error there is below `1e-14`.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        let x2 = x * x;
        let inv2 = 1.0 / x2;
        -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 * inv2 + 0.625 * inv2 * inv2
            - 37.0 / 24.0 * inv2.powi(3)
            + 353.0 / 64.0 * inv2.powi(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_and_sub() {
        let s = log_add(2f64.ln(), 3f64.ln());
        assert!((s - 5f64.ln()).abs() < 1e-15);
        assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
        let (sign, mag) = log_sub_sign(2f64.ln(), 5f64.ln());
        assert!(!sign);
        assert!((mag - 3f64.ln()).abs() < 1e-15);
        assert_eq!(log_sub_sign(1.0, 1.0), (true, f64::NEG_INFINITY));
    }

    #[test]
    fn log_comb_matches_integers() {
        assert!((log_comb(10.0, 3.0) - 120f64.ln()).abs() < 1e-12);
        assert!(log_comb(5.0, 0.0).abs() < 1e-12);
    }

    #[test]
    fn log_erfc_is_continuous_at_the_switch() {
        let below = libm::erfc(25.0).ln();
        let above = log_erfc(25.0);
        assert!(
            (below - above).abs() / above.abs() < 1e-8,
            "{below} {above}"
        );
        assert!((log_erfc(0.0)).abs() < 1e-15);
        assert!((log_erfc(-30.0) - 2f64.ln()).abs() < 1e-15);
        assert!(log_erfc(100.0).is_finite());
    }
}
