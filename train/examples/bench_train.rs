//! Training and inference throughput of the engine, in samples per second.
//!
//! ```text
//! cargo run --release -p fedquic-train --example bench_train -- --threads 1,2
//! ```
//!
//! Options (defaults in brackets):
//! - `--threads LIST` CPU threads per operation (the intra-op pool and matrixmultiply),
//!   e.g. `1` or `1,2` [1]. Several values run one child process each, since the count
//!   is fixed once per process.
//! - `--models LIST` [mlp:784-200-200-10,cnn:mnist]; specs or `onnx:FILE` (28x28 inputs)
//! - `--batches LIST` training batch sizes [10,64]
//! - `--eval-batch N` inference batch size [256]
//! - `--seconds S` minimum measured time per row [2]
//! - `--optimizer sgd|momentum|nesterov|adam` [sgd] (sgd: plain SGD, the fused path)
//! - `--backend cpu|wgpu|auto` [cpu]: wgpu takes any Vulkan adapter (lavapipe too), auto
//!   a GPU when there is one, else the CPU. The adapter is printed first.
//! - `--eval-batches LIST` inference batch sizes, replacing `--eval-batch` (`none`: no
//!   inference rows; `--batches none` likewise skips training)
//! - `--peak` only measure one core's FMA peak (GFLOP/s) and exit
//!
//! The header names the CPU, the kernel path (`FEDQUIC_KERNEL=auto|avx512|avx2|neon|portable`
//! forces one; a level the CPU lacks is refused) and one core's measured FMA peak. Each
//! row also gives GFLOP/s: the nominal floating-point operations of the dense
//! computation (2 per multiply-add of every convolution and dense layer; training counts
//! forward, weight gradient and input gradient except the first layer's), so the sparse
//! convolution backward, which skips zero gradients, shows as a higher rate than the
//! arithmetic it does; `% peak` relates it to the measured peak of the threads used.
//!
//! Training is `Model::fit` (shuffle, forward, backward, optimizer step) over synthetic
//! 28x28 digits, one epoch per call, timed after a warm-up call; each row reports the
//! best of three timed calls; on wgpu one call uploads the model once and downloads it
//! once, like a federated task. Inference is `Model::evaluate` (forward and loss) in
//! forward passes of the inference batch size.

use std::process::Command;
use std::time::Instant;

use fedquic_train::backend::{BackendKind, Engine};
use fedquic_train::{FitConfig, Model, ModelSpec, Optimizer, set_gemm_threads, synthetic};

const COMMAND: &str = "cargo run --release -p fedquic-train --example bench_train -- --threads 1,2";

struct Options {
    threads: Vec<usize>,
    models: Vec<ModelSpec>,
    batches: Vec<usize>,
    eval_batches: Vec<usize>,
    seconds: f64,
    optimizer: (String, Optimizer),
    backend: BackendKind,
    peak_only: bool,
}

fn list<T: std::str::FromStr>(text: &str, what: &str) -> Result<Vec<T>, String> {
    if text == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| format!("{what}: cannot parse {item:?}"))
        })
        .collect()
}

/// A spec string, or `onnx:FILE` (its imported `net:` spec; speed does not depend on the
/// file's weights).
fn model_arg(text: &str) -> Result<ModelSpec, String> {
    let source = fedquic_train::onnx::ModelSource::parse(text).map_err(|e| format!("{e}"))?;
    source
        .layout
        .model_spec()
        .cloned()
        .ok_or_else(|| format!("{text} is not a trainable model"))
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        threads: vec![1],
        models: vec![
            "mlp:784-200-200-10".parse().map_err(|e| format!("{e}"))?,
            ModelSpec::cnn_mnist(),
        ],
        batches: vec![10, 64],
        eval_batches: vec![256],
        seconds: 2.0,
        optimizer: ("sgd".to_string(), Optimizer::sgd()),
        backend: BackendKind::Cpu,
        peak_only: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("usage: {COMMAND}\n");
            println!("options: --threads LIST  --models LIST  --batches LIST  --eval-batch N");
            println!(
                "         --eval-batches LIST  --seconds S  --optimizer sgd|momentum|nesterov|adam"
            );
            println!("         --backend cpu|wgpu|auto  --peak");
            println!(
                "(a LIST is comma-separated; `none` for --batches or --eval-batches skips those rows)"
            );
            std::process::exit(0);
        }
        if flag == "--peak" {
            options.peak_only = true;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
        match flag.as_str() {
            "--threads" => options.threads = list(value, "--threads")?,
            "--models" => {
                options.models = value
                    .split(',')
                    .map(model_arg)
                    .collect::<Result<_, String>>()?;
            }
            "--batches" => options.batches = list(value, "--batches")?,
            "--eval-batch" => {
                options.eval_batches = vec![value.parse().map_err(|_| "bad --eval-batch")?];
            }
            "--eval-batches" => options.eval_batches = list(value, "--eval-batches")?,
            "--backend" => options.backend = value.parse().map_err(|e| format!("{e}"))?,
            "--seconds" => options.seconds = value.parse().map_err(|_| "bad --seconds")?,
            "--optimizer" => {
                let optimizer = match value.as_str() {
                    "sgd" => Optimizer::sgd(),
                    "momentum" | "nesterov" => Optimizer::Sgd {
                        momentum: 0.9,
                        nesterov: value == "nesterov",
                        weight_decay: 0.0,
                    },
                    "adam" => Optimizer::adam(),
                    other => return Err(format!("unknown optimizer {other:?}")),
                };
                options.optimizer = (value.clone(), optimizer);
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    if options.threads.is_empty()
        || options.batches.contains(&0)
        || options.eval_batches.contains(&0)
    {
        return Err("thread counts and batch sizes must be at least 1".to_string());
    }
    Ok(options)
}

/// CPU seconds used so far by all of this process's threads, from Linux's
/// `/proc/self/task/*/schedstat` (nanoseconds on CPU); `None` elsewhere. On a shared
/// machine this shows what the work costs when other processes take turns on the cores.
fn cpu_seconds() -> Option<f64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total as f64 / 1e9)
}

/// Wall and CPU seconds of the fastest (by wall time) of three timed calls of `run`,
/// after one warm-up call.
fn best_of_three(
    mut run: impl FnMut() -> Result<(), String>,
) -> Result<(f64, Option<f64>), String> {
    run()?;
    let mut best = (f64::INFINITY, None);
    for _ in 0..3 {
        let cpu = cpu_seconds();
        let started = Instant::now();
        run()?;
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu).map(|(end, start)| end - start);
        if wall < best.0 {
            best = (wall, cpu);
        }
    }
    Ok(best)
}

/// Nominal floating-point operations per example: (forward, training step), counting 2
/// per multiply-add of every convolution and dense layer; training is forward + weight
/// gradient + input gradient (none for the first layer). `None` for `net:` specs.
fn nominal_flops(spec: &ModelSpec) -> Option<(f64, f64)> {
    use fedquic_train::CnnLayer;
    let mut layers: Vec<f64> = Vec::new();
    match spec {
        ModelSpec::LogReg { inputs, classes } => layers.push(2.0 * (*inputs * *classes) as f64),
        ModelSpec::Mlp { layers: sizes } => {
            for pair in sizes.windows(2) {
                layers.push(2.0 * (pair[0] * pair[1]) as f64);
            }
        }
        ModelSpec::Cnn {
            input,
            layers: hidden,
            classes,
        } => {
            let [mut channels, mut height, mut width] = *input;
            for layer in hidden {
                match *layer {
                    CnnLayer::Conv {
                        channels: out,
                        kernel,
                        stride,
                        padding,
                    } => {
                        height = (height + 2 * padding).checked_sub(kernel)? / stride + 1;
                        width = (width + 2 * padding).checked_sub(kernel)? / stride + 1;
                        layers
                            .push(2.0 * (out * channels * kernel * kernel * height * width) as f64);
                        channels = out;
                    }
                    CnnLayer::MaxPool { size, stride } => {
                        height = height.checked_sub(size)? / stride + 1;
                        width = width.checked_sub(size)? / stride + 1;
                    }
                    CnnLayer::Dense { units } => {
                        layers.push(2.0 * (channels * height * width * units) as f64);
                        (channels, height, width) = (units, 1, 1);
                    }
                    CnnLayer::Dropout { .. } => {}
                }
            }
            layers.push(2.0 * (channels * height * width * classes) as f64);
        }
        ModelSpec::Net { .. } => return None,
    }
    let forward: f64 = layers.iter().sum();
    Some((
        forward,
        3.0 * forward - layers.first().copied().unwrap_or(0.0),
    ))
}

/// One core's peak f32 FMA rate in GFLOP/s, measured with independent FMA chains in the
/// vectors of the kernel path in use (AVX-512 on `avx512`, AVX2+FMA on `avx2`: a forced
/// `avx2` run on an AVX-512 CPU is measured against the AVX2 peak); `None` elsewhere.
fn measure_peak() -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        use fedquic_train::backend::KernelPath;
        const ROUNDS: u64 = 4_000_000;
        let path = fedquic_train::backend::dispatch::process_path().ok()?;
        if path == KernelPath::Avx512 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            let seconds = best_time(|| unsafe { fma_chains_avx512(ROUNDS) });
            return Some((ROUNDS as f64 * 12.0 * 16.0 * 2.0 / seconds / 1e9, "avx512"));
        }
        if path <= KernelPath::Avx2Fma
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            let seconds = best_time(|| unsafe { fma_chains_avx2(ROUNDS) });
            return Some((ROUNDS as f64 * 12.0 * 8.0 * 2.0 / seconds / 1e9, "avx2"));
        }
    }
    None
}

/// The best of 25 timed runs of `run`, in seconds (its result kept alive): many short
/// runs, so that on a shared machine some run undisturbed.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
fn best_time(mut run: impl FnMut() -> f32) -> f64 {
    (0..25)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(run());
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `rounds` x 12 independent vector FMAs (enough chains to cover the FMA latency on two
/// ports).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_chains_avx2(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..rounds {
        for value in acc.iter_mut() {
            *value = _mm256_fmadd_ps(*value, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
    // SAFETY: `out` holds 8 f32; the store is unaligned.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

/// [`fma_chains_avx2`] with 16-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_chains_avx512(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..rounds {
        for value in acc.iter_mut() {
            *value = _mm512_fmadd_ps(*value, a, b);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v));
    _mm512_reduce_add_ps(sum)
}

/// The CPU's model name (Linux), for the header.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// One result line.
fn report(
    spec: &ModelSpec,
    mode: &str,
    batch: usize,
    examples: usize,
    (wall, cpu): (f64, Option<f64>),
    peak: Option<f64>,
) {
    let rate = examples as f64 / wall;
    let cpu_rate = cpu.map_or("-".to_string(), |cpu| {
        format!("{:.0}", examples as f64 / cpu)
    });
    let flops =
        nominal_flops(spec).map(|(forward, train)| if mode == "train" { train } else { forward });
    let gflops = flops.map(|f| f * rate / 1e9);
    let (gflops_text, peak_text) = match (gflops, peak) {
        (Some(g), Some(p)) => (format!("{g:.1}"), format!("{:.0}%", 100.0 * g / p)),
        (Some(g), None) => (format!("{g:.1}"), "-".to_string()),
        _ => ("-".to_string(), "-".to_string()),
    };
    println!(
        "{:<22} {:>6} {:>6} {:>12.0} {:>10.3} {:>16} {:>9} {:>7}",
        spec.to_string(),
        mode,
        batch,
        rate,
        1000.0 * batch as f64 / rate,
        cpu_rate,
        gflops_text,
        peak_text
    );
}

/// Examples per call so that one call takes about `seconds / 3`, from a probe.
fn calibrate(seconds: f64, probe_examples: usize, probe_seconds: f64) -> usize {
    let rate = probe_examples as f64 / probe_seconds.max(1e-6);
    ((rate * seconds / 3.0) as usize).max(probe_examples)
}

fn bench(options: &Options, threads: usize) -> Result<(), String> {
    let fixed = set_gemm_threads(threads).map_err(|e| e.to_string())?;
    let path = fedquic_train::backend::dispatch::process_path().map_err(|e| e.to_string())?;
    let peak = measure_peak();
    println!("CPU: {}", cpu_model());
    println!(
        "CPU threads: {} (pool {})   kernel path: {} ({}={}; best on this CPU: {})   optimizer: {}   (best of 3 timed calls, after a warm-up)",
        fixed,
        fedquic_train::cpu_threads(),
        path.name(),
        fedquic_train::backend::dispatch::KERNEL_VAR,
        std::env::var(fedquic_train::backend::dispatch::KERNEL_VAR)
            .unwrap_or_else(|_| "auto".into()),
        fedquic_train::backend::dispatch::KernelPath::best().name(),
        options.optimizer.0
    );
    match peak {
        Some((gflops, isa)) => println!(
            "one core's FMA peak: {gflops:.1} GFLOP/s ({isa}); % peak below is of {threads} x that"
        ),
        None => println!("one core's FMA peak: not measured (no AVX2/AVX-512 on this CPU)"),
    }
    let peak = peak.map(|(gflops, _)| gflops * threads as f64);
    println!(
        "{:<22} {:>6} {:>6} {:>12} {:>10} {:>16} {:>9} {:>7}",
        "model", "mode", "batch", "samples/s", "ms/batch", "samples/cpu-s", "GFLOP/s", "% peak"
    );
    let engine = Engine::select(options.backend).map_err(|e| e.to_string())?;
    println!("backend: {}", engine.describe());
    let pool = synthetic::generate(4096, 11);
    for spec in &options.models {
        let mut model = Model::try_new(spec.clone(), 1).map_err(|e| e.to_string())?;
        let initial = model.parameters().to_vec();
        for &batch in &options.batches {
            let config = FitConfig {
                epochs: 1,
                batch_size: batch,
                learning_rate: 0.01,
                seed: 3,
                optimizer: options.optimizer.1,
                ..FitConfig::default()
            };
            let mut fit = |examples: usize| -> Result<(), String> {
                // Same starting point every call, so every call does the same work.
                model.set_parameters(&initial).map_err(|e| e.to_string())?;
                let indices: Vec<usize> = (0..examples).map(|i| i % pool.len()).collect();
                engine
                    .fit(&mut model, &pool, &indices, &config)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            let probe = batch * 4;
            let started = Instant::now();
            fit(probe)?;
            let examples = calibrate(options.seconds, probe, started.elapsed().as_secs_f64());
            let examples = examples.div_ceil(batch) * batch;
            let timing = best_of_three(|| fit(examples))?;
            report(spec, "train", batch, examples, timing, peak);
        }
        for &eval_batch in &options.eval_batches {
            let evaluate = |indices: &[usize]| {
                engine
                    .evaluate_batched(&model, &pool, indices, eval_batch)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            let probe: Vec<usize> = (0..eval_batch * 4).map(|i| i % pool.len()).collect();
            let started = Instant::now();
            evaluate(&probe)?;
            let examples = calibrate(
                options.seconds,
                probe.len(),
                started.elapsed().as_secs_f64(),
            );
            let indices: Vec<usize> = (0..examples).map(|i| i % pool.len()).collect();
            let timing = best_of_three(|| evaluate(&indices))?;
            report(spec, "infer", eval_batch, examples, timing, peak);
        }
    }
    Ok(())
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("bench_train: {error}");
            std::process::exit(2);
        }
    };
    if options.peak_only {
        println!("CPU: {}", cpu_model());
        match measure_peak() {
            Some((gflops, isa)) => println!("one core's FMA peak: {gflops:.1} GFLOP/s ({isa})"),
            None => println!("one core's FMA peak: not measured (no AVX2/AVX-512 on this CPU)"),
        }
        return;
    }
    let result = if let [threads] = options.threads[..] {
        println!("# {COMMAND}");
        bench(&options, threads)
    } else {
        // One child process per thread count: matrixmultiply reads its thread count once.
        let mut result = Ok(());
        for &threads in &options.threads {
            let status = std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| {
                    let mut args: Vec<String> = std::env::args().skip(1).collect();
                    if let Some(position) = args.iter().position(|a| a == "--threads") {
                        args.drain(position..(position + 2).min(args.len()));
                    }
                    Command::new(exe)
                        .args(&args)
                        .args(["--threads", &threads.to_string()])
                        .status()
                        .map_err(|e| e.to_string())
                });
            match status {
                Ok(status) if status.success() => {}
                Ok(status) => result = Err(format!("child for --threads {threads}: {status}")),
                Err(error) => result = Err(error),
            }
        }
        result
    };
    if let Err(error) = result {
        eprintln!("bench_train: {error}");
        std::process::exit(1);
    }
}
