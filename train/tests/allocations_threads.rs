//! With two intra-op threads (`set_gemm_threads(2)`, so this is its own test binary),
//! training still allocates nothing per step: the pool hands out work without
//! allocating, and its threads keep their scratch buffers between steps.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fedquic_train::{
    DataSpec, FitConfig, KernelPath, Model, cpu_threads, kernel_path_name, set_gemm_threads,
    with_kernel_path,
};

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
fn more_steps_do_not_allocate_more_with_two_threads() {
    assert_eq!(set_gemm_threads(2).expect("first setting"), 2);
    assert_eq!(cpu_threads(), 2);
    for path in KernelPath::available() {
        with_kernel_path(path, || {
            // Batches and widths large enough that convolutions, pooling, ReLU and the
            // dense products are split across the two threads.
            for (spec, batch) in [
                ("mlp:784-256-256-10", 64),
                ("cnn:1x28x28-c16k5p2-m2-c32k5p2-m2-d64-10", 32),
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
