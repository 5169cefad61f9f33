//! A global allocator that counts allocations, and the count for one `fit`
//! call: shared by the allocation tests (each is its own binary, so each has
//! its own counter).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fedquic_train::{DataSpec, FitConfig, Model};

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

/// Allocations made by the second of two identical `fit` calls.
pub fn allocations_for(spec: &str, batch: usize, epochs: u32) -> usize {
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
