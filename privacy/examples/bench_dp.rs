//! Times the DP noise samplers on a 1M-parameter model:
//! `cargo run --release -p fedquic-privacy --example bench_dp`.

use std::time::Instant;

use fedquic_privacy::dp::{
    RdpAccountant, Sampling, add_gaussian_noise, add_skellam_noise, clip_l2,
};

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    const P: usize = 1_000_000;
    let mut sum = vec![0.0f64; P];
    let t = best_of(5, || add_gaussian_noise(&mut sum, 1.0, 7).unwrap());
    println!(
        "gaussian noise, P = 1M: {:.2} ms ({:.1} ns/coord)",
        t * 1e3,
        t * 1e9 / P as f64
    );

    let mut update: Vec<f32> = (0..P).map(|i| (i % 97) as f32 * 0.01).collect();
    let t = best_of(5, || {
        clip_l2(&mut update, 1.0).unwrap();
    });
    println!("clip_l2, P = 1M: {:.2} ms", t * 1e3);

    for mu in [1.0, 100.0, 1e6] {
        let mut ints = vec![0i64; P];
        let t = best_of(3, || add_skellam_noise(&mut ints, mu, 7).unwrap());
        println!(
            "skellam noise mu = {mu:e}, P = 1M: {:.2} ms ({:.1} ns/coord)",
            t * 1e3,
            t * 1e9 / P as f64
        );
    }

    let t = best_of(3, || {
        let mut acc = RdpAccountant::new(None).unwrap();
        acc.step(0.01, 1.1, 1000, Sampling::Poisson).unwrap();
        acc.epsilon(1e-5).unwrap();
    });
    println!(
        "accountant step + epsilon (151 orders, Poisson): {:.2} ms",
        t * 1e3
    );
    let t = best_of(3, || {
        let mut acc = RdpAccountant::new(None).unwrap();
        acc.step(0.01, 1.1, 1000, Sampling::FixedSizeWithoutReplacement)
            .unwrap();
        acc.epsilon(1e-5).unwrap();
    });
    println!(
        "accountant step + epsilon (151 orders, fixed size): {:.2} ms",
        t * 1e3
    );
}
