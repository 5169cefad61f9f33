//! Time and peak memory of the robust aggregation rules at K updates of P
//! values (default K = 100, P = 1M, the size Flower's figures are for).
//!
//! `cargo run --release -p fedquic-aggregator --example bench_robust -- [K] [P] [F]`

use std::time::Instant;

use fedquic_aggregator::strategy::robust;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let k = args.first().copied().unwrap_or(100);
    let p = args.get(1).copied().unwrap_or(1_000_000);
    let f = args.get(2).copied().unwrap_or(20);
    // Deterministic pseudo-random updates (xorshift), generated in place.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let updates: Vec<Vec<f32>> = (0..k)
        .map(|_| {
            (0..p)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        })
        .collect();
    let views: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
    let mut out = vec![0f32; p];
    let held_mb = (k * p * 4) as f64 / 1e6;
    println!(
        "K = {k}, P = {p}, f = {f}, {} threads; held updates {held_mb:.0} MB; after setup: peak {:.0} MB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        peak_rss_mb()
    );
    let time = |name: &str, run: &mut dyn FnMut()| {
        run(); // warm-up
        let t = Instant::now();
        run();
        println!(
            "{name:<22} {:>8.3} s   peak RSS {:>6.0} MB",
            t.elapsed().as_secs_f64(),
            peak_rss_mb()
        );
    };
    time("median", &mut || {
        robust::coordinate_median(&views, &mut out).unwrap()
    });
    time("trimmed mean (0.2)", &mut || {
        robust::trimmed_mean(&views, 0.2, &mut out).unwrap()
    });
    time("krum (f)", &mut || {
        robust::multi_krum(&views, f, 1).unwrap();
    });
    if k >= 4 * f + 3 {
        time("bulyan (f)", &mut || {
            robust::bulyan(&views, f, &mut out).unwrap()
        });
    }
}
