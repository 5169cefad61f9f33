//! How many threads each CPU operation uses: matrixmultiply's GEMMs and the CPU
//! backend's intra-op pool ([`crate::backend::pool`]), which splits convolutions,
//! small-batch dense products, pooling and activations across threads. Both are sized by
//! the same count, fixed once per process (1 by default).
//!
//! The crate enables ndarray's `matrixmultiply-threading`, so matrixmultiply reads
//! `MATMUL_NUM_THREADS` once, at the process's first GEMM; unset, it would use every
//! physical core. That is wrong for federated simulation, where several clients train in
//! parallel on a pool of worker threads, so this crate defaults it to **1**: before its
//! first GEMM, if `MATMUL_NUM_THREADS` is unset, it sets it to `1`.
//!
//! To use more threads per GEMM (one client training alone, the benchmark's
//! `--threads N`), either export `MATMUL_NUM_THREADS=N` or call [`set_gemm_threads`]
//! early in `main`. matrixmultiply uses at most 4 threads and falls back to 1 for a
//! value it cannot parse. The setting is per process and fixed at the first GEMM: a
//! GEMM run through ndarray by other code before this crate's first one would fix
//! matrixmultiply's own default instead.

use std::sync::OnceLock;

use crate::error::{Result, TrainError};

/// The environment variable matrixmultiply reads.
pub const GEMM_THREADS_VAR: &str = "MATMUL_NUM_THREADS";

/// matrixmultiply's own upper limit.
const MAX_GEMM_THREADS: usize = 4;

/// The thread count once fixed.
static GEMM_THREADS: OnceLock<usize> = OnceLock::new();

/// What matrixmultiply will make of the variable's value.
fn effective(value: &str) -> usize {
    value
        .trim()
        .parse::<usize>()
        .unwrap_or(1)
        .clamp(1, MAX_GEMM_THREADS)
}

/// Sets the variable. Only ever called inside the `OnceLock` initialiser, so at most once
/// per process and never concurrently with itself.
fn set_variable(threads: usize) {
    // SAFETY: `set_var` is unsafe because another thread could read the environment at
    // the same moment. Rust's own `std::env` readers are serialised with writers by std;
    // what remains is C code calling `getenv` concurrently. This runs once, before the
    // first GEMM, which callers are told to trigger early (see the module docs);
    // `Model::try_new`, the first thing a trainer does, already does it.
    unsafe { std::env::set_var(GEMM_THREADS_VAR, threads.to_string()) };
}

/// The number of threads every GEMM in this process uses, fixing the default (1, unless
/// `MATMUL_NUM_THREADS` is set) if nothing has yet. Called before this crate's first GEMM.
pub fn gemm_threads() -> usize {
    *GEMM_THREADS.get_or_init(|| match std::env::var(GEMM_THREADS_VAR) {
        Ok(value) if !value.trim().is_empty() => effective(&value),
        _ => {
            set_variable(1);
            1
        }
    })
}

/// Fixes the GEMM and intra-op thread count at `threads` (1..=4), overriding
/// `MATMUL_NUM_THREADS`.
/// Call it early in `main`, before other threads start and before any model trains.
/// Errors if the count was already fixed at a different value.
pub fn set_gemm_threads(threads: usize) -> Result<usize> {
    if !(1..=MAX_GEMM_THREADS).contains(&threads) {
        return Err(TrainError::InvalidConfig(format!(
            "GEMM threads must be 1..={MAX_GEMM_THREADS}, got {threads}"
        )));
    }
    let fixed = *GEMM_THREADS.get_or_init(|| {
        set_variable(threads);
        threads
    });
    if fixed == threads {
        Ok(fixed)
    } else {
        Err(TrainError::InvalidConfig(format!(
            "GEMM threads are already fixed at {fixed} for this process (the first GEMM, \
             set_gemm_threads or MATMUL_NUM_THREADS decided)"
        )))
    }
}
