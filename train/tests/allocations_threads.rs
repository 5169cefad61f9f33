//! With two intra-op threads (`set_gemm_threads(2)`, so this is its own test binary),
//! training still allocates nothing per step: the pool hands out work without
//! allocating, and its threads keep their scratch buffers between steps.

use fedquic_train::{
    KernelPath, cpu_threads, kernel_path_name, set_gemm_threads, with_kernel_path,
};

mod counting;
use counting::allocations_for;

/// Run without libtest (`harness = false` in Cargo.toml): see there.
fn main() {
    more_steps_do_not_allocate_more_with_two_threads();
    println!("more_steps_do_not_allocate_more_with_two_threads: ok");
}

fn more_steps_do_not_allocate_more_with_two_threads() {
    assert_eq!(set_gemm_threads(2).expect("first setting"), 2);
    assert_eq!(cpu_threads(), 2);
    for path in KernelPath::available() {
        with_kernel_path(path, || {
            // Batches and widths large enough that convolutions, pooling, ReLU and the
            // dense products are split across the two threads.
            for (spec, batch) in [
                ("mlp:784-256-256-10", 64),
                // Batch 10: the dense forward splits C's columns instead of its rows.
                ("mlp:784-256-256-10", 10),
                ("cnn:1x28x28-c16k5p2-m2-c32k5p2-m2-d64-10", 32),
                // A 512 x 512 weight: each thread copies the dense input gradient's
                // panels into its own panel buffer (`COPIED_PANEL_MIN_B`).
                ("mlp:784-32-512-512-10", 64),
            ] {
                let one = allocations_for(spec, batch, 1);
                let four = allocations_for(spec, batch, 4);
                assert_eq!(
                    one,
                    four,
                    "{spec} at batch {batch} on {} with 2 threads: {one} allocations for 1 epoch, {four} for 4",
                    kernel_path_name()
                );
            }
        });
    }
}
