//! Intra-op threading for the CPU backend: a persistent pool of worker threads that
//! splits one operation (a batch's examples, a GEMM's row blocks) across cores.
//!
//! The pool is sized once per process by [`crate::set_gemm_threads`] (1 unless a caller
//! asks for more: the simulator trains one client per thread and keeps it at 1, the
//! client and `bench_train` take `--threads`). With one thread nothing is spawned and
//! every operation runs inline, exactly as before.
//!
//! Running a job allocates nothing: the caller publishes a reference to its closure under
//! a mutex, the workers claim task indices from an atomic counter, and the caller waits
//! until every worker that saw the job has left it. When the pool is already busy (two
//! models training on different threads at once, or a task asking for the pool again),
//! the asking thread runs all of its tasks itself, so there is no deadlock and no
//! oversubscription. Workers run each task with the caller's kernel path
//! ([`super::dispatch::with_kernel_path`]), so a per-thread override holds on them too.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::dispatch::{KernelPath, kernel_path, with_kernel_path};

/// Most parts one operation is split into (and most threads a pool has).
pub const MAX_THREADS: usize = 64;

/// A task body shared with the workers for the duration of one [`Pool::run`].
type Task<'a> = &'a (dyn Fn(usize) + Sync);

#[derive(Clone, Copy)]
struct Job {
    /// The caller's closure with its lifetime erased; see the SAFETY comment in `run`.
    task: Task<'static>,
    tasks: usize,
    path: KernelPath,
}

struct State {
    generation: u64,
    job: Option<Job>,
    /// Workers asleep on `wake` (a job start notifies only when there are some).
    sleepers: usize,
    /// Whether the caller is asleep on `done` (the last worker out notifies only then).
    caller_sleeping: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    /// Mirrors `State::generation` so idle workers can spin briefly without the lock.
    generation: AtomicU64,
    /// Workers inside the current job. Only incremented under the lock while
    /// `State::job` is set, so once the caller has cleared the job it only falls.
    active: AtomicUsize,
    next_task: AtomicUsize,
    panicked: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it; the state is
        // plain counters that every path leaves consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims and runs tasks of `job` until none are left.
    fn work_on(&self, job: &Job) {
        loop {
            let index = self.next_task.fetch_add(1, Ordering::AcqRel);
            if index >= job.tasks {
                return;
            }
            let task = job.task;
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                with_kernel_path(job.path, || task(index));
            }));
            if outcome.is_err() {
                self.panicked.store(true, Ordering::Release);
            }
        }
    }
}

/// A fixed set of worker threads; the thread calling [`Pool::run`] is one more.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    busy: AtomicBool,
}

/// How long an idle worker polls for the next job before sleeping, and the caller for
/// the workers still in its job: operations in a training step follow each other
/// within tens of microseconds, and waking a sleeping thread costs about as much again
/// on a virtual machine (measured: 2NN inference at batch 64 on two threads).
const SPIN: Duration = Duration::from_micros(200);

/// Polls `done` (cheap, lock-free) for up to [`SPIN`]; true if it became true.
fn spin_until(done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= SPIN {
            return done();
        }
    }
}

fn worker(shared: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        spin_until(|| shared.generation.load(Ordering::Acquire) != seen);
        let mut state = shared.lock();
        while state.generation == seen && !state.shutdown {
            state.sleepers += 1;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.sleepers -= 1;
        }
        if state.shutdown {
            return;
        }
        seen = state.generation;
        let Some(job) = state.job else {
            // The caller finished the job before this worker woke up.
            continue;
        };
        shared.active.fetch_add(1, Ordering::AcqRel);
        drop(state);
        shared.work_on(&job);
        if shared.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Under the lock, so a caller about to sleep either saw `active` at zero or
            // is already asleep and gets the notification.
            let state = shared.lock();
            if state.caller_sleeping {
                shared.done.notify_all();
            }
        }
    }
}

impl Pool {
    /// A pool running jobs on `threads` threads in all (the caller and `threads - 1`
    /// workers), clamped to `1..=MAX_THREADS`. Workers that cannot be spawned are
    /// left out (logged): the pool still works, with fewer threads.
    pub fn new(threads: usize) -> Pool {
        let threads = threads.clamp(1, MAX_THREADS);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                sleepers: 0,
                caller_sleeping: false,
                shutdown: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        let mut spawned = 1;
        for index in 1..threads {
            let shared = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("fedquic-cpu-{index}"))
                .spawn(move || worker(shared))
            {
                Ok(_) => spawned += 1,
                Err(error) => tracing::warn!("cannot start CPU worker thread {index}: {error}"),
            }
        }
        Pool {
            shared,
            threads: spawned,
            busy: AtomicBool::new(false),
        }
    }

    /// Threads a job runs on when the pool is free.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i)` for every `i` in `0..tasks`, on the pool's threads and the
    /// calling one, and returns when all have finished. Runs them all on the calling
    /// thread when the pool has one thread, `tasks < 2`, or the pool is busy.
    ///
    /// # Panics
    /// If a task panicked (after every task has finished).
    pub fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.threads < 2
            || tasks < 2
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..tasks).for_each(task);
            return;
        }
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _release = Release(&self.busy);
        // SAFETY: the reference is only lifetime-extended. Workers reach it only through
        // `State::job`, which this function clears (under the lock) before waiting for
        // `active == 0`, i.e. until every worker that copied the job has finished with it;
        // so no use outlives this call, in which `task` is borrowed. The wait below also
        // runs when a task on this thread panicked (its result is caught first).
        let erased: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(task) };
        let job = Job {
            task: erased,
            tasks,
            path: kernel_path(),
        };
        let shared = &*self.shared;
        shared.panicked.store(false, Ordering::Relaxed);
        {
            let mut state = shared.lock();
            shared.next_task.store(0, Ordering::Release);
            state.generation += 1;
            state.job = Some(job);
            shared.generation.store(state.generation, Ordering::Release);
            if state.sleepers > 0 {
                shared.wake.notify_all();
            }
        }
        shared.work_on(&job);
        // No worker can join once the job is cleared; then wait for those inside it,
        // spinning first (they finish about when this thread does).
        shared.lock().job = None;
        if !spin_until(|| shared.active.load(Ordering::Acquire) == 0) {
            let mut state = shared.lock();
            while shared.active.load(Ordering::Acquire) > 0 {
                state.caller_sleeping = true;
                state = shared.done.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.caller_sleeping = false;
        }
        if shared.panicked.load(Ordering::Acquire) {
            panic!("a CPU worker task panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.shutdown = true;
        self.shared.wake.notify_all();
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The process's pool, sized by [`crate::gemm_threads`] at first use.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(crate::gemm_threads()))
}

thread_local! {
    /// [`with_cpu_threads`]'s cap for operations started on this thread.
    static THREAD_CAP: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Threads the CPU operations started on this thread are split across: the process's
/// pool size, or less under [`with_cpu_threads`].
pub fn cpu_threads() -> usize {
    let threads = pool().threads();
    THREAD_CAP.with(|cap| cap.get().map_or(threads, |cap| cap.clamp(1, threads)))
}

/// Runs `work` with the CPU operations it starts on this thread split across at most
/// `threads` threads (1: none split), then restores the previous cap, even on a panic.
pub fn with_cpu_threads<R>(threads: usize, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_CAP.with(|cap| cap.set(self.0));
        }
    }
    let _restore = Restore(THREAD_CAP.with(|cap| cap.replace(Some(threads.max(1)))));
    work()
}

/// Splits `items` (at most [`MAX_THREADS`]; more are run by the last task) into one task
/// each and runs `work` on each in the process's pool. No allocation: the items wait in
/// a fixed array of slots, each taken by exactly one task.
pub(crate) fn for_each<T: Send>(items: impl IntoIterator<Item = T>, work: impl Fn(T) + Sync) {
    let slots: [Mutex<Option<T>>; MAX_THREADS] = std::array::from_fn(|_| Mutex::new(None));
    let mut count = 0;
    let mut items = items.into_iter();
    for (slot, item) in slots.iter().zip(&mut items) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(item);
        count += 1;
    }
    // Anything past the slots runs here, before the parallel part.
    items.for_each(&work);
    pool().run(count, &|index| {
        let item = slots
            .get(index)
            .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(item) = item {
            work(item);
        }
    });
}

/// `len` items cut into `parts` near-equal contiguous ranges' lengths, each a multiple of
/// `granule` except the last (for splitting a batch or a GEMM's row blocks).
pub(crate) fn part_len(len: usize, parts: usize, granule: usize) -> usize {
    let granule = granule.max(1);
    let granules = len.div_ceil(granule);
    granules.div_ceil(parts.max(1)).max(1) * granule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_with_the_callers_kernel_path() {
        let pool = Pool::new(3);
        assert_eq!(pool.threads(), 3);
        for tasks in [0, 1, 2, 3, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            with_kernel_path(KernelPath::Portable, || {
                pool.run(tasks, &|i| {
                    assert_eq!(kernel_path(), KernelPath::Portable);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_busy_pool_runs_nested_jobs_inline_and_panics_surface() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            // The pool is busy with the outer job: this one runs on the asking thread.
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(4, &|i| assert!(i != 2, "task 2 fails"));
        }));
        assert!(caught.is_err());
        // Still usable afterwards.
        let after = AtomicUsize::new(0);
        pool.run(5, &|_| {
            after.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(after.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn long_tasks_and_idle_gaps_take_the_sleeping_paths() {
        // A worker's task outlasting the caller's spin makes the caller sleep on `done`;
        // a gap longer than the workers' spin makes them sleep on `wake`. Every job must
        // still run each task once and return only after all have finished.
        let pool = Pool::new(2);
        for round in 0..20 {
            let finished = AtomicUsize::new(0);
            pool.run(2, &|_| {
                let on_worker = std::thread::current()
                    .name()
                    .is_some_and(|name| name.starts_with("fedquic-cpu"));
                // The caller's task takes long enough for a spinning worker to claim
                // the other one.
                std::thread::sleep(if on_worker { SPIN * 5 } else { SPIN / 4 });
                finished.fetch_add(1, Ordering::Release);
            });
            assert_eq!(finished.load(Ordering::Acquire), 2, "round {round}");
            if round % 2 == 0 {
                std::thread::sleep(SPIN * 3);
            }
        }
        let state = pool.shared.lock();
        assert!(!state.caller_sleeping);
        assert_eq!(pool.shared.active.load(Ordering::Acquire), 0);
    }

    #[test]
    fn parts_cover_the_range_in_granules() {
        assert_eq!(part_len(64, 2, 1), 32);
        assert_eq!(part_len(10, 3, 1), 4);
        assert_eq!(part_len(64, 2, 16), 32);
        assert_eq!(part_len(40, 2, 16), 32);
        assert_eq!(part_len(5, 8, 1), 1);
        assert_eq!(part_len(0, 2, 1), 1);
    }
}
