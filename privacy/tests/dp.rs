//! Differential-privacy tests: the accountant against dp-accounting's numbers, the
//! accountant's shape, the samplers' statistics at fixed seeds, adaptive clipping and
//! config validation. No Python needed: the reference is a committed CSV.

use fedquic_privacy::dp::accountant::MAX_ORDER;
use fedquic_privacy::dp::*;

const REFERENCE: &str = include_str!("data/rdp_reference.csv");

struct Row {
    sampling: Sampling,
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    epsilon: f64,
}

fn reference_rows() -> Vec<Row> {
    let mut lines = REFERENCE.lines();
    let header = lines.next().unwrap();
    assert_eq!(
        header,
        "sampling,population,clients_per_round,q,noise_multiplier,steps,delta,epsilon,order"
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 9, "{l}");
            Row {
                sampling: match f[0] {
                    "poisson" => Sampling::Poisson,
                    "fixed_size_without_replacement" => Sampling::FixedSizeWithoutReplacement,
                    other => panic!("unknown sampling {other}"),
                },
                q: f[3].parse().unwrap(),
                sigma: f[4].parse().unwrap(),
                steps: f[5].parse().unwrap(),
                delta: f[6].parse().unwrap(),
                epsilon: f[7].parse().unwrap(),
            }
        })
        .collect()
}

#[test]
fn accountant_matches_dp_accounting_reference() {
    let rows = reference_rows();
    for s in [Sampling::Poisson, Sampling::FixedSizeWithoutReplacement] {
        assert!(rows.iter().filter(|r| r.sampling == s).count() >= 12);
    }
    let mut worst: f64 = 0.0;
    for r in &rows {
        let mut acc = RdpAccountant::new(None).unwrap();
        acc.step(r.q, r.sigma, r.steps, r.sampling).unwrap();
        let (eps, _) = acc.epsilon(r.delta).unwrap();
        let rel = (eps - r.epsilon).abs() / r.epsilon;
        worst = worst.max(rel);
        assert!(
            rel <= 1e-3,
            "{:?} q={} sigma={} steps={} delta={}: rust {eps} vs reference {} (rel {rel:e})",
            r.sampling,
            r.q,
            r.sigma,
            r.steps,
            r.delta,
            r.epsilon
        );
        let direct = epsilon_after(r.q, r.sigma, r.steps, r.delta, r.sampling).unwrap();
        assert_eq!(direct, eps);
    }
    eprintln!("worst relative error against dp-accounting: {worst:e}");
}

#[test]
fn epsilon_grows_with_steps_and_q_and_shrinks_with_sigma() {
    for s in [Sampling::Poisson, Sampling::FixedSizeWithoutReplacement] {
        let e = |q, sigma, steps| epsilon_after(q, sigma, steps, 1e-5, s).unwrap();
        let base = e(0.05, 1.2, 100);
        assert!(e(0.05, 1.2, 200) > base);
        assert!(e(0.1, 1.2, 100) > base);
        assert!(e(0.05, 0.9, 100) > base);
        assert!(e(0.05, 2.0, 100) < base);
        let mut last = 0.0;
        for steps in [1, 10, 100, 1000] {
            let now = e(0.01, 1.0, steps);
            assert!(now > last, "{s:?} {steps}");
            last = now;
        }
    }
}

#[test]
fn full_participation_is_the_plain_gaussian() {
    let sigma = 1.7;
    let mut acc = RdpAccountant::new(None).unwrap();
    acc.step(1.0, sigma, 3, Sampling::Poisson).unwrap();
    for (&a, &r) in acc.orders().iter().zip(acc.rdp()) {
        assert!((r - 3.0 * a / (2.0 * sigma * sigma)).abs() < 1e-12);
    }
    // Fixed-size with q = 1 is the Gaussian under replace-one: sensitivity 2C.
    let mut acc = RdpAccountant::new(None).unwrap();
    acc.step(1.0, sigma, 1, Sampling::FixedSizeWithoutReplacement)
        .unwrap();
    for (&a, &r) in acc.orders().iter().zip(acc.rdp()) {
        assert!((r - 4.0 * a / (2.0 * sigma * sigma)).abs() < 1e-12);
    }
}

#[test]
fn an_empty_accountant_spends_nothing_and_q_zero_is_free() {
    let acc = RdpAccountant::new(None).unwrap();
    assert_eq!(acc.epsilon(1e-5).unwrap().0, 0.0);
    assert_eq!(
        epsilon_after(0.0, 1.0, 1000, 1e-5, Sampling::Poisson).unwrap(),
        0.0
    );
}

#[test]
fn accountant_rejects_bad_parameters() {
    let mut acc = RdpAccountant::new(None).unwrap();
    for (q, sigma) in [
        (-0.1, 1.0),
        (1.1, 1.0),
        (f64::NAN, 1.0),
        (0.1, 0.0),
        (0.1, -1.0),
        (0.1, f64::INFINITY),
    ] {
        assert!(
            matches!(
                acc.step(q, sigma, 1, Sampling::Poisson),
                Err(DpError::InvalidParameter { .. })
            ),
            "{q} {sigma}"
        );
    }
    for delta in [0.0, 1.0, -1e-5, f64::NAN] {
        assert!(acc.epsilon(delta).is_err());
    }
    assert!(RdpAccountant::new(Some(vec![])).is_err());
    assert!(RdpAccountant::new(Some(vec![1.0])).is_err());
    assert!(RdpAccountant::new(Some(vec![2.0, f64::NAN])).is_err());
    assert!(RdpAccountant::new(Some(vec![MAX_ORDER * 2.0])).is_err());
    // Nothing was composed by the failed calls.
    assert_eq!(acc.steps(), 0);
    assert!(acc.rdp().iter().all(|&r| r == 0.0));
}

#[test]
fn accountant_refuses_to_mix_neighbouring_relations() {
    let mut acc = RdpAccountant::new(None).unwrap();
    acc.step(0.1, 1.0, 5, Sampling::Poisson).unwrap();
    let err = acc
        .step(0.1, 1.0, 5, Sampling::FixedSizeWithoutReplacement)
        .unwrap_err();
    assert!(matches!(err, DpError::MixedSampling { .. }));
    assert_eq!(acc.steps(), 5);
}

#[test]
fn composition_is_additive_and_state_round_trips() {
    let mut a = RdpAccountant::new(None).unwrap();
    a.step(0.02, 1.1, 40, Sampling::Poisson).unwrap();
    a.step(0.02, 1.1, 60, Sampling::Poisson).unwrap();
    let mut b = RdpAccountant::new(None).unwrap();
    b.step(0.02, 1.1, 100, Sampling::Poisson).unwrap();
    for (x, y) in a.rdp().iter().zip(b.rdp()) {
        assert!((x - y).abs() <= 1e-12 * y.abs());
    }
    assert_eq!(a.steps(), 100);

    let bytes = postcard::to_stdvec(&a.state()).unwrap();
    let state: AccountantState = postcard::from_bytes(&bytes).unwrap();
    let restored = RdpAccountant::restore(state).unwrap();
    assert_eq!(restored, a);
    assert_eq!(restored.epsilon(1e-5).unwrap(), a.epsilon(1e-5).unwrap());

    let mut bad = a.state();
    bad.rdp.pop();
    assert!(matches!(
        RdpAccountant::restore(bad),
        Err(DpError::InvalidState(_))
    ));
    let mut bad = a.state();
    bad.rdp[3] = -1.0;
    assert!(RdpAccountant::restore(bad).is_err());
}

#[test]
fn budget_says_whether_the_next_round_would_exceed_it() {
    let (q, sigma, s) = (0.01, 1.0, Sampling::Poisson);
    let eps_100 = epsilon_after(q, sigma, 100, 1e-5, s).unwrap();
    let budget = Budget::new(eps_100, 1e-5, OnBudget::Stop).unwrap();
    let mut acc = RdpAccountant::new(None).unwrap();
    acc.step(q, sigma, 99, s).unwrap();
    assert!(!budget.would_exceed(&acc, q, sigma, s).unwrap());
    acc.step(q, sigma, 1, s).unwrap();
    assert_eq!(budget.spent(&acc).unwrap(), eps_100);
    assert!(budget.would_exceed(&acc, q, sigma, s).unwrap());
    assert_eq!(acc.steps(), 100, "would_exceed must not compose");
    assert!(Budget::new(0.0, 1e-5, OnBudget::Warn).is_err());
    assert!(Budget::new(1.0, 1.0, OnBudget::Warn).is_err());
}

#[test]
fn skellam_accounting() {
    let (mu, l2) = (1e4, 10.0);
    let l1 = skellam_l1_bound(l2, 1000).unwrap();
    assert_eq!(l1, 100.0); // min(l2^2 = 100, sqrt(1000) * 10 = 316)
    let mut full = RdpAccountant::new(None).unwrap();
    full.step_skellam(1.0, mu, l1, l2, 10, Sampling::Poisson)
        .unwrap();
    for (&a, &r) in full.orders().iter().zip(full.rdp()) {
        let one = rdp_skellam(mu, l1, l2, a).unwrap();
        assert!((r - 10.0 * one).abs() <= 1e-12 * r);
    }
    // With mu >> l2^2 the Skellam is the Gaussian of the same variance 2 mu:
    // noise multiplier sqrt(2 mu) / l2.
    let mut gauss = RdpAccountant::new(None).unwrap();
    gauss
        .step(1.0, (2.0 * mu).sqrt() / l2, 10, Sampling::Poisson)
        .unwrap();
    let (es, eg) = (
        full.epsilon(1e-5).unwrap().0,
        gauss.epsilon(1e-5).unwrap().0,
    );
    assert!(es >= eg && es < 1.05 * eg, "skellam {es} gaussian {eg}");

    // Poisson subsampling amplifies; fixed-size claims no amplification.
    let mut sub = RdpAccountant::new(None).unwrap();
    sub.step_skellam(0.01, mu, l1, l2, 10, Sampling::Poisson)
        .unwrap();
    assert!(sub.epsilon(1e-5).unwrap().0 < 0.5 * es);
    let mut fixed = RdpAccountant::new(None).unwrap();
    fixed
        .step_skellam(0.01, mu, l1, l2, 10, Sampling::FixedSizeWithoutReplacement)
        .unwrap();
    assert!(fixed.epsilon(1e-5).unwrap().0 > es);
    assert!(
        full.step_skellam(1.0, 0.0, l1, l2, 1, Sampling::Poisson)
            .is_err()
    );
}

#[test]
fn clipping() {
    let mut v = vec![3.0f32, 4.0, 0.0, 12.0]; // norm 13
    let norm = clip_l2(&mut v, 6.5).unwrap();
    assert_eq!(norm, 13.0);
    assert_eq!(v, vec![1.5, 2.0, 0.0, 6.0]);

    // Awkward values: the clipped norm never exceeds the bound, even after f32 rounding.
    for seed in 0..50u32 {
        let mut v: Vec<f32> = (0..1000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 7.0 - 70.0)
            .collect();
        let bound = 1.0 + f64::from(seed) * 0.37;
        let before = clip_l2(&mut v, bound).unwrap();
        assert!(before > bound);
        let after: f64 = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!(
            after <= bound && after > bound * (1.0 - 1e-5),
            "{after} {bound}"
        );
    }

    let mut empty: Vec<f32> = vec![];
    assert_eq!(clip_l2(&mut empty, 1.0).unwrap(), 0.0);
    let mut bad = vec![1.0, f32::NAN];
    assert_eq!(clip_l2(&mut bad, 1.0), Err(DpError::NonFiniteInput));
    let mut inf = vec![f32::INFINITY];
    assert_eq!(clip_l2(&mut inf, 1.0), Err(DpError::NonFiniteInput));
    let mut ok = vec![1.0f32];
    for bound in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(clip_l2(&mut ok, bound).is_err());
    }
    assert_eq!(ok, vec![1.0]);
}

fn mean_var(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64, usize) {
    let n = xs.clone().count();
    let mean = xs.clone().sum::<f64>() / n as f64;
    let var = xs.map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var, n)
}

#[test]
fn gaussian_noise_statistics_and_determinism() {
    let std = 2.5;
    let n = 200_000;
    for seed in [1u64, 2, 3] {
        let mut v = vec![10.0f64; n];
        add_gaussian_noise(&mut v, std, seed).unwrap();
        let (mean, var, _) = mean_var(v.iter().map(|x| x - 10.0));
        // 6 standard errors: the mean's is std / sqrt(n); the variance's is
        // var * sqrt(2 / (n - 1)) for a Gaussian.
        assert!(
            mean.abs() < 6.0 * std / (n as f64).sqrt(),
            "seed {seed}: mean {mean}"
        );
        let var_se = std * std * (2.0 / (n - 1) as f64).sqrt();
        assert!(
            (var - std * std).abs() < 6.0 * var_se,
            "seed {seed}: var {var}"
        );
    }
    let (mut a, mut b, mut c) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
    add_gaussian_noise(&mut a, 1.0, 42).unwrap();
    add_gaussian_noise(&mut b, 1.0, 42).unwrap();
    add_gaussian_noise(&mut c, 1.0, 43).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut z = vec![1.0; 4];
    add_gaussian_noise(&mut z, 0.0, 1).unwrap();
    assert_eq!(z, vec![1.0; 4]);
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(add_gaussian_noise(&mut z, bad, 1).is_err());
    }
}

#[test]
fn skellam_sampler_has_mean_zero_and_variance_two_mu() {
    let n = 100_000;
    // Both samplers: multiplication (mu < 10) and PTRS (mu >= 10).
    for (i, mu) in [0.3, 4.0, 10.0, 75.0, 1e4, 1e7].into_iter().enumerate() {
        let mut v = vec![0i64; n];
        add_skellam_noise(&mut v, mu, 100 + i as u64).unwrap();
        let (mean, var, _) = mean_var(v.iter().map(|&x| x as f64));
        let var_true = 2.0 * mu;
        assert!(
            mean.abs() < 6.0 * (var_true / n as f64).sqrt(),
            "mu {mu}: mean {mean}"
        );
        // Skellam(mu, mu): fourth central moment 2 mu + 12 mu^2.
        let var_se = ((2.0 * mu + 8.0 * mu * mu) / n as f64).sqrt();
        assert!((var - var_true).abs() < 6.0 * var_se, "mu {mu}: var {var}");
    }
}

#[test]
fn skellam_shares_sum_to_the_total_noise() {
    // Ten clients each add Skellam(mu / 10); the sum carries Skellam(mu): variance 2 mu.
    let (mu, clients, dim) = (40.0, 10usize, 50_000);
    let share = skellam_mu_per_client(mu, clients).unwrap();
    let mut total = vec![0i64; dim];
    for c in 0..clients {
        let mut x = vec![0i64; dim];
        add_skellam_noise(&mut x, share, 1000 + c as u64).unwrap();
        for (t, v) in total.iter_mut().zip(&x) {
            *t += v;
        }
    }
    let (mean, var, _) = mean_var(total.iter().map(|&x| x as f64));
    assert!(mean.abs() < 6.0 * (2.0 * mu / dim as f64).sqrt());
    let var_se = ((2.0 * mu + 8.0 * mu * mu) / dim as f64).sqrt();
    assert!((var - 2.0 * mu).abs() < 6.0 * var_se, "{var}");
    assert!(skellam_mu_per_client(mu, 0).is_err());
}

#[test]
fn skellam_wraps_like_modular_arithmetic() {
    let mut a = vec![0i64; 1000];
    let mut b = vec![0u32; 1000];
    add_skellam_noise(&mut a, 20.0, 9).unwrap();
    add_skellam_noise_u32(&mut b, 20.0, 9).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(*x as u32, *y);
    }
    let mut edge = vec![i64::MAX; 100];
    add_skellam_noise(&mut edge, 5.0, 1).unwrap(); // wraps, never panics
    for bad in [-1.0, f64::NAN, 1e300] {
        assert!(add_skellam_noise(&mut a, bad, 1).is_err());
    }
}

#[test]
fn adaptive_clipping_updates() {
    let mut ac = AdaptiveClip::new(0.5, 0.2, 10.0, 1.0).unwrap();
    // 8 of 10 unclipped: b_bar = 0.8, C = exp(-0.2 * 0.3) = exp(-0.06)
    let c = ac.update(8.0, 10).unwrap();
    assert!((c - 0.941_764_533_584_248_7).abs() < 1e-15, "{c}");
    // 2 of 10: b_bar = 0.2, C *= exp(0.06) -> back to 1
    let c = ac.update(2.0, 10).unwrap();
    assert!((c - 1.0).abs() < 1e-15);
    // C = 2, gamma = 0.9, b_bar = 0.35: C = 2 exp(0.2 * 0.55)
    let mut ac = AdaptiveClip::new(0.9, 0.2, 1.0, 2.0).unwrap();
    assert!((ac.update(3.5, 10).unwrap() - 2.232_556_140_917_742_6).abs() < 1e-14);
    assert_eq!(ac.indicator(2.0), 1.0);
    assert_eq!(ac.indicator(2.5), 0.0);
    // Errors leave the clip unchanged.
    let before = ac.clip;
    assert!(ac.update(1.0, 0).is_err());
    assert!(ac.update(f64::NAN, 10).is_err());
    assert_eq!(ac.clip, before);
    assert!(AdaptiveClip::new(1.5, 0.2, 1.0, 1.0).is_err());
    assert!(AdaptiveClip::new(0.5, 0.0, 1.0, 1.0).is_err());
    assert!(AdaptiveClip::new(0.5, 0.2, 1.0, 0.0).is_err());
    let noisy = ac.noisy_count(7.0, 5).unwrap();
    assert_eq!(noisy, ac.noisy_count(7.0, 5).unwrap());
    assert_ne!(noisy, 7.0);
}

#[test]
fn noise_multiplier_adjustment_for_the_count_query() {
    // z = 1, sigma_b = 10: (1 - 1/400)^(-1/2)
    let s = noise_multiplier_after_count_noise(1.0, 10.0).unwrap();
    assert!((s - 1.001_252_348_643_517_6).abs() < 1e-15, "{s}");
    // The pair (update at s, count at 2 sigma_b) is as private as z alone.
    let total = (s.powi(-2) + 20f64.powi(-2)).powf(-0.5);
    assert!((total - 1.0).abs() < 1e-12);
    assert!(noise_multiplier_after_count_noise(1.0, 0.5).is_err());
    assert!(noise_multiplier_after_count_noise(1.0, 0.4).is_err());
    assert!(noise_multiplier_after_count_noise(0.0, 1.0).is_err());
}

const CONFIG: &str = r#"
mode = "distributed"
clip_norm = 1.0
noise_multiplier = 1.1
delta = 1e-5
epsilon_budget = 8.0
on_budget = "warn"
sampling = "poisson"

[adaptive_clipping]
target_quantile = 0.5
learning_rate = 0.2
count_noise_std = 10.0
"#;

#[test]
fn config_parses_and_validates() {
    let c: DpConfig = toml::from_str(CONFIG).unwrap();
    c.validate().unwrap();
    assert_eq!(c.mode, DpMode::Distributed);
    assert_eq!(c.sampling, Sampling::Poisson);
    assert_eq!(c.on_budget, OnBudget::Warn);
    let budget = c.budget().unwrap().unwrap();
    assert_eq!((budget.epsilon, budget.delta), (8.0, 1e-5));
    assert!(c.update_noise_multiplier().unwrap() > 1.1);
    assert_eq!(c.adaptive_clip().unwrap().unwrap().clip, 1.0);
    let back: DpConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);

    // Defaults: central, stop, fixed-size sampling (what fedquic's engine does).
    let minimal: DpConfig =
        toml::from_str("clip_norm = 0.5\nnoise_multiplier = 1.0\ndelta = 1e-6\n").unwrap();
    minimal.validate().unwrap();
    assert_eq!(minimal.mode, DpMode::Central);
    assert_eq!(minimal.on_budget, OnBudget::Stop);
    assert_eq!(minimal.sampling, Sampling::FixedSizeWithoutReplacement);
    assert_eq!(minimal.budget().unwrap(), None);
    assert_eq!(minimal.update_noise_multiplier().unwrap(), 1.0);

    assert!(
        toml::from_str::<DpConfig>(
            "clip_norm = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-6\nsurprise = 1\n"
        )
        .is_err()
    );
}

#[test]
fn config_validation_names_the_field() {
    let good: DpConfig = toml::from_str(CONFIG).unwrap();
    type Mutation = Box<dyn Fn(&mut DpConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("clip_norm", Box::new(|c| c.clip_norm = 0.0)),
        ("clip_norm", Box::new(|c| c.clip_norm = f64::NAN)),
        ("noise_multiplier", Box::new(|c| c.noise_multiplier = -1.0)),
        (
            "noise_multiplier",
            Box::new(|c| c.noise_multiplier = f64::INFINITY),
        ),
        ("delta", Box::new(|c| c.delta = 0.0)),
        ("delta", Box::new(|c| c.delta = 1.0)),
        ("epsilon_budget", Box::new(|c| c.epsilon_budget = Some(0.0))),
        (
            "epsilon_budget",
            Box::new(|c| c.epsilon_budget = Some(f64::NAN)),
        ),
        (
            "adaptive_clipping.target_quantile",
            Box::new(|c| c.adaptive_clipping.as_mut().unwrap().target_quantile = 1.01),
        ),
        (
            "adaptive_clipping.learning_rate",
            Box::new(|c| c.adaptive_clipping.as_mut().unwrap().learning_rate = 0.0),
        ),
        (
            "adaptive_clipping.count_noise_std",
            Box::new(|c| c.adaptive_clipping.as_mut().unwrap().count_noise_std = 0.5),
        ),
    ];
    for (field, mutate) in cases {
        let mut c = good;
        mutate(&mut c);
        let err = c.validate().unwrap_err();
        match &err {
            DpError::InvalidConfig { field: f, .. } => assert_eq!(*f, field),
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(field), "{msg}");
        assert!(c.budget().is_err() && c.adaptive_clip().is_err());
    }
}
