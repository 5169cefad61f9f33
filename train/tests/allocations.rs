//! Training allocates its buffers once per `fit` call, never per step: more
//! epochs (more steps) must not mean more allocations, on every kernel path.

use fedquic_train::{KernelPath, kernel_path_name, with_kernel_path};

mod counting;
use counting::allocations_for;

/// Run without libtest (`harness = false` in Cargo.toml): see there.
fn main() {
    more_steps_do_not_allocate_more();
    println!("more_steps_do_not_allocate_more: ok");
}

fn more_steps_do_not_allocate_more() {
    // On each kernel path this CPU has: the portable kernels allocate no more
    // than the AVX2 ones (neither calls the general GEMM, which packs into a
    // fresh buffer per product, for training shapes).
    for path in KernelPath::available() {
        with_kernel_path(path, || {
            for (spec, batch) in [
                ("mlp:784-64-10", 10),
                ("mlp:784-64-10", 64),
                ("cnn:1x28x28-c4k5p2-m2-c8k5p2-m2-d16-10", 10),
                ("cnn:1x28x28-c4k5p2-m2-c8k5p2-m2-d16-10", 32),
                // A 512 x 512 weight: the dense input gradient copies its panels into
                // the thread's panel buffer (`COPIED_PANEL_MIN_B`).
                ("mlp:784-32-512-512-10", 64),
            ] {
                let one = allocations_for(spec, batch, 1);
                let four = allocations_for(spec, batch, 4);
                assert_eq!(
                    one,
                    four,
                    "{spec} at batch {batch} on {}: {one} allocations for 1 epoch, {four} for 4",
                    kernel_path_name()
                );
            }
        });
    }
}
