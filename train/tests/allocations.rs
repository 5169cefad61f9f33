//! Training allocates its buffers once per `fit` call, never per step: more
//! epochs (more steps) must not mean more allocations, on every kernel path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fedquic_train::{DataSpec, FitConfig, KernelPath, Model, kernel_path_name, with_kernel_path};

/// Counts allocations made by this test process.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which
// upholds GlobalAlloc's contract; the counter is a relaxed atomic increment.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_for(spec: &str, batch: usize, epochs: u32) -> usize {
    let (train, _) = "synthetic:256/16:1"
        .parse::<DataSpec>()
        .unwrap()
        .load()
        .unwrap();
    let mut model = Model::try_new(spec.parse().unwrap(), 1).unwrap();
    let indices: Vec<usize> = (0..train.len()).collect();
    let cfg = FitConfig {
        epochs,
        batch_size: batch,
        learning_rate: 0.01,
        ..FitConfig::default()
    };
    // Warm up once so one-time, process-wide set-up is not counted.
    model.fit(&train, &indices, &cfg).unwrap();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    model.fit(&train, &indices, &cfg).unwrap();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
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
