//! Which CPU kernels run: the AVX2+FMA ones or the portable ones.
//!
//! The choice is made once per process from `FEDQUIC_KERNEL` (`auto`, the default:
//! AVX2+FMA when the CPU has both; `portable`; `avx2`, which falls back to portable
//! with a warning on a CPU without them), and can be overridden for the current
//! thread with [`with_kernel_path`], so tests run both paths in one `cargo test`
//! on any machine that has AVX2, and CI without AVX2 still runs the portable one.
//! Every kernel asks [`kernel_path`]; the AVX2 code only ever runs when the CPU
//! supports it, whatever was asked for.

use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that selects the kernels.
pub const KERNEL_VAR: &str = "FEDQUIC_KERNEL";

/// A family of CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// x86-64 kernels using AVX2 and FMA.
    Avx2Fma,
    /// Plain Rust (vectorised by the compiler for the baseline target).
    Portable,
}

impl KernelPath {
    /// Short name for logs and benchmark output: `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx2Fma => "avx2",
            KernelPath::Portable => "portable",
        }
    }

    /// The paths this CPU can run: always `Portable`, and `Avx2Fma` where supported.
    pub fn available() -> Vec<KernelPath> {
        let mut paths = vec![KernelPath::Portable];
        if cpu_has_avx2_fma() {
            paths.insert(0, KernelPath::Avx2Fma);
        }
        paths
    }
}

/// What `FEDQUIC_KERNEL` may say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    Auto,
    Portable,
    Avx2,
}

/// A `FEDQUIC_KERNEL` value that is none of `auto`, `portable`, `avx2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{KERNEL_VAR}={0:?} is not one of auto, portable, avx2")]
pub struct KernelChoiceError(pub String);

impl std::str::FromStr for KernelChoice {
    type Err = KernelChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(KernelChoice::Auto),
            "portable" => Ok(KernelChoice::Portable),
            "avx2" => Ok(KernelChoice::Avx2),
            _ => Err(KernelChoiceError(s.to_owned())),
        }
    }
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // `is_x86_feature_detected!` caches its answer; this is a load and a test.
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The path a choice leads to on this CPU.
pub fn resolve(choice: KernelChoice) -> KernelPath {
    match choice {
        KernelChoice::Portable => KernelPath::Portable,
        KernelChoice::Auto | KernelChoice::Avx2 if cpu_has_avx2_fma() => KernelPath::Avx2Fma,
        KernelChoice::Avx2 => {
            tracing::warn!(
                "{KERNEL_VAR}=avx2 but this CPU lacks AVX2/FMA: using the portable kernels"
            );
            KernelPath::Portable
        }
        KernelChoice::Auto => KernelPath::Portable,
    }
}

static PROCESS_PATH: OnceLock<KernelPath> = OnceLock::new();

thread_local! {
    static THREAD_PATH: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

/// The kernels in use on this thread: [`with_kernel_path`]'s, else the
/// process's (from `FEDQUIC_KERNEL`, read once).
pub fn kernel_path() -> KernelPath {
    THREAD_PATH.with(Cell::get).unwrap_or_else(|| {
        *PROCESS_PATH.get_or_init(|| {
            let value = std::env::var(KERNEL_VAR).unwrap_or_default();
            let choice = value.parse().unwrap_or_else(|e: KernelChoiceError| {
                tracing::warn!("{e}; using auto");
                KernelChoice::Auto
            });
            resolve(choice)
        })
    })
}

/// [`kernel_path`]'s name (`avx2` or `portable`), for logs.
pub fn kernel_path_name() -> &'static str {
    kernel_path().name()
}

/// Whether the AVX2+FMA kernels are to run (which implies the CPU has them).
pub(crate) fn avx2_fma() -> bool {
    kernel_path() == KernelPath::Avx2Fma
}

/// Runs `work` on this thread with the kernels of `path` (or the portable
/// ones, when `path` is `Avx2Fma` and the CPU lacks it), then restores the
/// previous choice, even if `work` panics.
pub fn with_kernel_path<R>(path: KernelPath, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_PATH.with(|p| p.set(self.0));
        }
    }
    let effective = match path {
        KernelPath::Avx2Fma if !cpu_has_avx2_fma() => KernelPath::Portable,
        other => other,
    };
    let _restore = Restore(THREAD_PATH.with(|p| p.replace(Some(effective))));
    work()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve() {
        assert_eq!("portable".parse(), Ok(KernelChoice::Portable));
        assert_eq!(" AVX2 ".parse(), Ok(KernelChoice::Avx2));
        assert_eq!("".parse(), Ok(KernelChoice::Auto));
        let err = "sse9".parse::<KernelChoice>().expect_err("unknown");
        assert!(err.to_string().contains("FEDQUIC_KERNEL"), "{err}");
        assert_eq!(resolve(KernelChoice::Portable), KernelPath::Portable);
        let best = KernelPath::available()[0];
        assert_eq!(resolve(KernelChoice::Auto), best);
        assert_eq!(resolve(KernelChoice::Avx2), best);
    }

    #[test]
    fn the_override_is_per_thread_and_restored() {
        let outer = kernel_path();
        with_kernel_path(KernelPath::Portable, || {
            assert_eq!(kernel_path(), KernelPath::Portable);
            assert_eq!(kernel_path_name(), "portable");
            // Another thread keeps the process's choice.
            let other = std::thread::spawn(kernel_path).join().expect("thread");
            assert_eq!(other, outer);
            with_kernel_path(KernelPath::Avx2Fma, || {
                assert_eq!(kernel_path(), KernelPath::available()[0]);
            });
            assert_eq!(kernel_path(), KernelPath::Portable);
        });
        assert_eq!(kernel_path(), outer);
        let caught = std::panic::catch_unwind(|| {
            with_kernel_path(KernelPath::Portable, || panic!("inside"));
        });
        assert!(caught.is_err());
        assert_eq!(kernel_path(), outer, "restored after a panic");
    }
}
