//! `fedquic-sim sweep`: hyper-parameter exploration in parallel.
//!
//! A sweep is a set of configurations (a grid, or a seeded random search,
//! over any simulator option), each run with several seeds. Every run is
//! the simulator itself in a child process (`fedquic-sim <base args> --KEY
//! VALUE ... --seed S --out DIR/CONFIG/seedS`), so a run is exactly what its
//! recorded command line reproduces. Up to `--parallel` runs go at once,
//! each with `--threads` training threads, inside a CPU budget. A run whose
//! `results.json` exists is skipped, so an interrupted sweep resumes where
//! it stopped. With `--halving`, successive halving (Jamieson and Talwalkar,
//! AISTATS 2016) runs every configuration for a fraction of the rounds,
//! keeps the better half, and so on until the survivors run in full.
//!
//! Outputs in `--out`: `sweep.csv` (one row per run), `sweep.md`
//! (configurations ranked by mean final accuracy over seeds, mean ± std, each
//! with its command line) and `best.txt`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Most configurations one sweep may run (a guard against typos in a grid).
pub const MAX_CONFIGS: usize = 10_000;

#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// A grid axis: `KEY=V1,V2,...`, KEY a simulator option without `--`
    /// (`lr`, `strategy`, `fraction`...). Repeat for more axes; the sweep
    /// runs their product. `on`/`off` turn a flag on or leave it out.
    #[arg(long = "grid", value_name = "KEY=VALUES")]
    grid: Vec<String>,
    /// A random-search axis: `KEY=LOW:HIGH` (uniform) or `KEY=log:LOW:HIGH`
    /// (log-uniform), sampled `--samples` times.
    #[arg(long = "random", value_name = "KEY=RANGE")]
    random: Vec<String>,
    /// Configurations drawn by random search.
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Seeds per configuration (0, 1, ...).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Seed of the random search itself.
    #[arg(long, default_value_t = 0)]
    sweep_seed: u64,
    /// Runs at once (0: the CPU budget divided by --threads).
    #[arg(long, default_value_t = 0)]
    parallel: usize,
    /// Training threads per run.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Cores the whole sweep may use (0: all of them).
    #[arg(long, default_value_t = 0)]
    cpus: usize,
    /// Successive halving: rungs of rounds/2^k, keeping the better half at each.
    #[arg(long)]
    halving: bool,
    /// Where the runs and the tables go.
    #[arg(long)]
    out: PathBuf,
    /// Simulator options every run shares (after `--`), for example
    /// `-- --data mnist:DIR --model mlp:784-200-200-10 --rounds 50`.
    #[arg(last = true)]
    base: Vec<String>,
}

/// One configuration: the options it sets, in axis order.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub settings: Vec<(String, String)>,
}

impl Config {
    /// A directory name: `lr=0.1,strategy=fedadam`, made safe.
    pub fn label(&self) -> String {
        let text = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let safe: String = text
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '=' | ',' | '.' | '-' | '_' => c,
                _ => '_',
            })
            .collect();
        if safe.is_empty() { "base".into() } else { safe }
    }

    /// The simulator arguments this configuration adds.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.settings {
            match v.as_str() {
                "on" => out.push(format!("--{k}")),
                "off" => {}
                _ => {
                    out.push(format!("--{k}"));
                    out.push(v.clone());
                }
            }
        }
        out
    }
}

fn key_ok(key: &str) -> anyhow::Result<()> {
    if key.is_empty()
        || key.starts_with('-')
        || !key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("sweep key {key:?} must be a simulator option name such as lr or batch-size");
    }
    if matches!(key, "seed" | "out" | "threads" | "quiet") {
        bail!("--{key} is set by the sweep itself");
    }
    Ok(())
}

/// The configurations of a sweep: the grid's product, then (when random
/// axes are given) `samples` random draws, each combined with every grid point.
pub fn configs(
    grid: &[String],
    random: &[String],
    samples: usize,
    seed: u64,
) -> anyhow::Result<Vec<Config>> {
    let mut axes: Vec<(String, Vec<String>)> = Vec::new();
    for g in grid {
        let (key, values) = g
            .split_once('=')
            .with_context(|| format!("--grid {g:?}: expected KEY=V1,V2,..."))?;
        key_ok(key)?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            bail!("--grid {g:?}: no values");
        }
        axes.push((key.to_string(), values));
    }
    let mut out = vec![Config {
        settings: Vec::new(),
    }];
    for (key, values) in &axes {
        let mut next = Vec::with_capacity(out.len() * values.len());
        for c in &out {
            for v in values {
                let mut settings = c.settings.clone();
                settings.push((key.clone(), v.clone()));
                next.push(Config { settings });
            }
        }
        out = next;
        if out.len() > MAX_CONFIGS {
            bail!("the grid has more than {MAX_CONFIGS} configurations");
        }
    }
    if random.is_empty() {
        return Ok(out);
    }
    let mut ranges = Vec::new();
    for r in random {
        let (key, range) = r.split_once('=').with_context(|| {
            format!("--random {r:?}: expected KEY=LOW:HIGH or KEY=log:LOW:HIGH")
        })?;
        key_ok(key)?;
        let (log, range) = match range.strip_prefix("log:") {
            Some(rest) => (true, rest),
            None => (false, range),
        };
        let (lo, hi) = range
            .split_once(':')
            .with_context(|| format!("--random {r:?}: expected LOW:HIGH"))?;
        let (lo, hi): (f64, f64) = (
            lo.parse()
                .with_context(|| format!("--random {r:?}: bad low"))?,
            hi.parse()
                .with_context(|| format!("--random {r:?}: bad high"))?,
        );
        if !(lo.is_finite() && hi.is_finite() && lo < hi && (!log || lo > 0.0)) {
            bail!("--random {r:?}: need finite LOW < HIGH (and LOW > 0 for log)");
        }
        ranges.push((key.to_string(), log, lo, hi));
    }
    if samples == 0 || samples.saturating_mul(out.len()) > MAX_CONFIGS {
        bail!("--samples must be in 1..={} here", MAX_CONFIGS / out.len());
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sampled = Vec::new();
    for _ in 0..samples {
        let draw: Vec<(String, String)> = ranges
            .iter()
            .map(|(key, log, lo, hi)| {
                let u: f64 = rng.random_range(0.0..1.0);
                let v = match log {
                    true => (lo.ln() + u * (hi.ln() - lo.ln())).exp(),
                    false => lo + u * (hi - lo),
                };
                (key.clone(), format!("{v:.4e}"))
            })
            .collect();
        for c in &out {
            let mut settings = c.settings.clone();
            settings.extend(draw.iter().cloned());
            sampled.push(Config { settings });
        }
    }
    Ok(sampled)
}

/// What one finished run reported.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub config: usize,
    pub seed: u64,
    pub rounds: u64,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub seconds: f64,
    pub command: String,
    pub dir: PathBuf,
}

/// Mean and sample standard deviation.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = match values.len() {
        1 => 0.0,
        _ => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    Some((mean, var.sqrt()))
}

fn read_result(dir: &Path) -> Option<(Option<f64>, Option<f64>, f64)> {
    let text = std::fs::read_to_string(dir.join("results.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let seconds = v["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .and_then(|r| r["elapsed_seconds"].as_f64())
        .unwrap_or(f64::NAN);
    Some((
        v["final_test_accuracy"].as_f64(),
        v["final_test_loss"].as_f64(),
        seconds,
    ))
}

/// A run's test accuracy by round, from its `results.json`.
fn accuracy_curve(dir: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join("results.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    v["rounds"]
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .filter_map(|r| Some((r["round"].as_u64()?, r["test_accuracy"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The `--rounds` the base arguments set (the simulator's default otherwise).
fn base_rounds(base: &[String]) -> anyhow::Result<u64> {
    let mut rounds = 5;
    for (i, a) in base.iter().enumerate() {
        let value = match a.strip_prefix("--rounds=") {
            Some(v) => Some(v.to_string()),
            None if a == "--rounds" => base.get(i + 1).cloned(),
            None => None,
        };
        if let Some(v) = value {
            rounds = v
                .parse()
                .with_context(|| format!("--rounds {v:?} in the base options"))?;
        }
    }
    Ok(rounds)
}

/// Runs a sweep (see the module docs).
pub fn run_sweep(args: SweepArgs) -> anyhow::Result<()> {
    let configs = configs(&args.grid, &args.random, args.samples, args.sweep_seed)?;
    if args.seeds == 0 || args.seeds > 1000 {
        bail!("--seeds must be in 1..=1000");
    }
    for a in &args.base {
        if a == "--seed" || a == "--out" || a.starts_with("--seed=") || a.starts_with("--out=") {
            bail!("{a} is set by the sweep for each run; leave it out of the base options");
        }
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let budget = match args.cpus {
        0 => cores,
        n => n,
    };
    let threads = args.threads.max(1);
    let parallel = match args.parallel {
        0 => (budget / threads).max(1),
        n => n,
    };
    let full_rounds = base_rounds(&args.base)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let exe = std::env::current_exe().context("locating this executable")?;

    // Rungs of successive halving: rounds/2^k ... rounds; without halving one rung.
    let mut rungs = vec![full_rounds];
    if args.halving {
        let mut r = full_rounds;
        while r / 2 >= 1 && rungs.len() < (configs.len().max(1) as f64).log2().ceil() as usize + 1 {
            r /= 2;
            rungs.insert(0, r);
        }
    }
    let mut alive: Vec<usize> = (0..configs.len()).collect();
    let mut results: Vec<RunResult> = Vec::new();
    println!(
        "sweep: {} configurations x {} seeds, {} at once, {} threads each{}",
        configs.len(),
        args.seeds,
        parallel,
        threads,
        match args.halving {
            true => format!(", successive halving over rounds {rungs:?}"),
            false => String::new(),
        }
    );
    for (rung, &rounds) in rungs.iter().enumerate() {
        let last = rung + 1 == rungs.len();
        let mut jobs = Vec::new();
        for &c in &alive {
            for seed in 0..args.seeds {
                jobs.push((c, seed));
            }
        }
        let bar = indicatif::ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} runs, {elapsed} elapsed, eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("rounds {rounds}"));
        let mut rung_results = Vec::new();
        let mut pending = jobs.into_iter();
        let mut running: Vec<(usize, u64, PathBuf, String, std::process::Child)> = Vec::new();
        loop {
            while running.len() < parallel {
                let Some((c, seed)) = pending.next() else {
                    break;
                };
                let dir = match last {
                    true => args
                        .out
                        .join(configs[c].label())
                        .join(format!("seed{seed}")),
                    false => args
                        .out
                        .join(format!("rung-{rounds}"))
                        .join(configs[c].label())
                        .join(format!("seed{seed}")),
                };
                let mut settings = configs[c].settings.clone();
                if !last {
                    settings.push(("rounds".into(), rounds.to_string()));
                }
                let mut cmd_args = without_keys(&args.base, &settings);
                cmd_args.extend(Config { settings }.args());
                cmd_args.extend([
                    "--seed".into(),
                    seed.to_string(),
                    "--threads".into(),
                    threads.to_string(),
                    "--quiet".into(),
                    "--out".into(),
                    dir.display().to_string(),
                ]);
                let command = format!("fedquic-sim {}", cmd_args.join(" "));
                if read_result(&dir).is_some() {
                    bar.inc(1);
                    rung_results.push(finished(c, seed, rounds, &dir, command));
                    continue;
                }
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(dir.join("command.txt"), format!("{command}\n"))?;
                let stdout = std::fs::File::create(dir.join("stdout.txt"))?;
                let stderr = std::fs::File::create(dir.join("stderr.txt"))?;
                let child = Command::new(&exe)
                    .args(&cmd_args)
                    .stdin(Stdio::null())
                    .stdout(stdout)
                    .stderr(stderr)
                    .spawn()
                    .context("starting a run")?;
                running.push((c, seed, dir, command, child));
            }
            if running.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut i = 0;
            while i < running.len() {
                if let Some(status) = running[i].4.try_wait()? {
                    let (c, seed, dir, command, _) = running.swap_remove(i);
                    if !status.success() {
                        bar.println(format!(
                            "run failed ({status}): {} seed {seed}; see {}",
                            configs[c].label(),
                            dir.join("stderr.txt").display()
                        ));
                    }
                    bar.inc(1);
                    rung_results.push(finished(c, seed, rounds, &dir, command));
                } else {
                    i += 1;
                }
            }
        }
        bar.finish_and_clear();
        if !last {
            // Keep the better half by mean accuracy (failed runs rank last).
            let mut scored: Vec<(usize, f64)> = alive
                .iter()
                .map(|&c| {
                    let accs: Vec<f64> = rung_results
                        .iter()
                        .filter(|r: &&RunResult| r.config == c)
                        .filter_map(|r| r.accuracy)
                        .collect();
                    (c, mean_std(&accs).map_or(f64::NEG_INFINITY, |m| m.0))
                })
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            let keep = alive.len().div_ceil(2).max(1);
            alive = scored.into_iter().take(keep).map(|(c, _)| c).collect();
            alive.sort_unstable();
            println!(
                "rung of {rounds} rounds: kept {} of {} configurations",
                alive.len(),
                rung_results.len() / args.seeds as usize
            );
        }
        results.extend(rung_results);
    }
    write_tables(&args.out, &configs, &results, full_rounds)
}

/// `base` without the options `settings` set (so a sweep axis or a rung's
/// rounds replace the base's value instead of repeating the option).
pub fn without_keys(base: &[String], settings: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::with_capacity(base.len());
    let mut skip_value = false;
    for a in base {
        if skip_value {
            skip_value = false;
            if !a.starts_with("--") {
                continue;
            }
        }
        let set = settings.iter().any(|(k, _)| {
            let flag = format!("--{k}");
            if *a == flag {
                skip_value = true;
                true
            } else {
                a.starts_with(&format!("{flag}="))
            }
        });
        if !set {
            out.push(a.clone());
        }
    }
    out
}

fn finished(config: usize, seed: u64, rounds: u64, dir: &Path, command: String) -> RunResult {
    let (accuracy, loss, seconds) = read_result(dir).unwrap_or((None, None, f64::NAN));
    RunResult {
        config,
        seed,
        rounds,
        accuracy,
        loss,
        seconds,
        command,
        dir: dir.to_path_buf(),
    }
}

/// `sweep.csv`, `sweep.md` and `best.txt` from the full-length runs.
pub fn write_tables(
    out: &Path,
    configs: &[Config],
    results: &[RunResult],
    full_rounds: u64,
) -> anyhow::Result<()> {
    let mut csv =
        String::from("config,seed,rounds,final_test_accuracy,final_test_loss,seconds,command\n");
    for r in results {
        let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{:.3},\"{}\"",
            configs[r.config].label(),
            r.seed,
            r.rounds,
            f(r.accuracy),
            f(r.loss),
            r.seconds,
            r.command.replace('"', "'")
        );
    }
    std::fs::write(out.join("sweep.csv"), csv)?;
    let mut by_config: BTreeMap<usize, Vec<&RunResult>> = BTreeMap::new();
    for r in results.iter().filter(|r| r.rounds == full_rounds) {
        by_config.entry(r.config).or_default().push(r);
    }
    // (config, accuracy mean and std, runs that finished, runs)
    type Row = (usize, Option<(f64, f64)>, usize, usize);
    let mut rows: Vec<Row> = by_config
        .iter()
        .map(|(&c, runs)| {
            let accs: Vec<f64> = runs.iter().filter_map(|r| r.accuracy).collect();
            (c, mean_std(&accs), accs.len(), runs.len())
        })
        .collect();
    let score = |r: &Row| r.1.map_or(f64::NEG_INFINITY, |m| m.0);
    rows.sort_by(|a, b| score(b).total_cmp(&score(a)));
    let mut md = String::from(
        "| rank | configuration | final test accuracy (%) | seeds ok | command (seed 0) |\n|---|---|---|---|---|\n",
    );
    for (rank, (c, stats, ok, all)) in rows.iter().enumerate() {
        let acc = stats.map_or("failed".into(), |(m, s)| {
            format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
        });
        let command = by_config[c]
            .iter()
            .min_by_key(|r| r.seed)
            .map(|r| r.command.clone())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {acc} | {ok}/{all} | `{command}` |",
            rank + 1,
            configs[*c].label()
        );
    }
    std::fs::write(out.join("sweep.md"), &md)?;
    print!("{md}");
    // One comparison plot: each configuration's accuracy by round, mean over seeds.
    let curves: Vec<(String, Vec<(u64, f64)>)> = rows
        .iter()
        .map(|(c, ..)| {
            let mut by_round: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for r in &by_config[c] {
                for (round, acc) in accuracy_curve(&r.dir) {
                    by_round.entry(round).or_default().push(acc);
                }
            }
            let mean = by_round
                .into_iter()
                .filter_map(|(round, v)| mean_std(&v).map(|(m, _)| (round, m)))
                .collect();
            (configs[*c].label(), mean)
        })
        .collect();
    let plot = out.join("sweep.png");
    match fedquic_aggregator::plot::write_comparison(&plot, &curves) {
        Ok(()) => println!("wrote {}", plot.display()),
        Err(e) => println!("no comparison plot: {e}"),
    }
    match rows.first() {
        Some((c, Some((m, s)), _, _)) => {
            let command = by_config[c]
                .iter()
                .min_by_key(|r| r.seed)
                .map(|r| r.command.clone())
                .unwrap_or_default();
            let best = format!(
                "best: {} with {:.2} ± {:.2}% final test accuracy\n{command}\n",
                configs[*c].label(),
                100.0 * m,
                100.0 * s
            );
            std::fs::write(out.join("best.txt"), &best)?;
            print!("{best}");
        }
        _ => println!("no configuration finished"),
    }
    println!("wrote {}/sweep.csv, sweep.md, best.txt", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_is_the_product_of_its_axes_in_order() {
        let c = configs(
            &[
                "lr=0.01,0.1".into(),
                "strategy=fedavg,fedadam,fedyogi".into(),
            ],
            &[],
            0,
            0,
        )
        .unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!(c[0].label(), "lr=0.01,strategy=fedavg");
        assert_eq!(c[5].args(), vec!["--lr", "0.1", "--strategy", "fedyogi"]);
        let flags = configs(&["secagg=on,off".into()], &[], 0, 0).unwrap();
        assert_eq!(flags[0].args(), vec!["--secagg"]);
        assert!(flags[1].args().is_empty());
    }

    #[test]
    fn random_search_is_seeded_and_stays_in_range() {
        let a = configs(&[], &["lr=log:0.001:0.1".into()], 20, 7).unwrap();
        let b = configs(&[], &["lr=log:0.001:0.1".into()], 20, 7).unwrap();
        assert_eq!(a, b);
        for c in &a {
            let v: f64 = c.settings[0].1.parse().unwrap();
            assert!((0.001..=0.1).contains(&v), "{v}");
        }
        assert_ne!(
            a,
            configs(&[], &["lr=log:0.001:0.1".into()], 20, 8).unwrap()
        );
    }

    #[test]
    fn bad_axes_are_clear_errors() {
        for (grid, random) in [
            (vec!["lr".to_string()], vec![]),
            (vec!["lr=".to_string()], vec![]),
            (vec!["seed=1,2".to_string()], vec![]),
            (vec!["--lr=1".to_string()], vec![]),
            (vec![], vec!["lr=0.1:0.01".to_string()]),
            (vec![], vec!["lr=log:0:1".to_string()]),
            (vec![], vec!["lr=x:1".to_string()]),
        ] {
            assert!(
                configs(&grid, &random, 4, 0).is_err(),
                "{grid:?} {random:?}"
            );
        }
    }

    #[test]
    fn an_axis_replaces_the_base_value_instead_of_repeating_it() {
        let base: Vec<String> = ["--rounds", "50", "--secagg", "--lr=0.1", "--clients", "9"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let settings = vec![
            ("rounds".to_string(), "12".to_string()),
            ("lr".to_string(), "0.3".to_string()),
            ("secagg".to_string(), "off".to_string()),
        ];
        assert_eq!(without_keys(&base, &settings), vec!["--clients", "9"]);
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[2.0]), Some((2.0, 0.0)));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]).unwrap();
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
    }
}
