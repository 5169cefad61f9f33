//! Which CPU kernels run: AVX-512, AVX2+FMA, NEON or portable.
//!
//! The choice is made once per process from `FEDQUIC_KERNEL` (`auto`, the default: the
//! best level the CPU has; `avx512`, `avx2`, `neon` or `portable` force a level, and a process
//! asking for a level its CPU lacks stops with a clear error from [`process_path`]
//! instead of silently running another), and can be overridden for the current thread
//! with [`with_kernel_path`], so tests run every path the machine has in one
//! `cargo test`, and CI without AVX2 still runs the portable one. Every kernel asks
//! [`kernel_path`]; vector code only ever runs when the CPU supports it.
//!
//! The dense layers' products ([`super::simd_gemm`]) are written once against pulp's
//! portable SIMD trait and run with 16-lane AVX-512 vectors on the `avx512` level, 8-lane
//! AVX2 ones on `avx2` and 4-lane NEON ones on `neon` (aarch64). The convolutions have
//! AVX-512 instances on the `avx512` level (the direct forward's 16-lane tiles, the sparse
//! backward compiled for AVX-512), and so has the small-batch fused dense backward
//! (8-row blocks in AVX-512VL's 32 registers); pooling is AVX2+FMA, which the `avx512`
//! level also runs.
//! Other targets run the portable kernels.

use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that selects the kernels.
pub const KERNEL_VAR: &str = "FEDQUIC_KERNEL";

/// A family of CPU kernels.
// Ordered best first (`Avx512 < Avx2Fma < Portable`), which `with_kernel_path` uses to fall back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelPath {
    /// x86-64 with AVX-512F (and AVX2+FMA, which its kernels also use).
    Avx512,
    /// x86-64 kernels using AVX2 and FMA.
    Avx2Fma,
    /// aarch64 with NEON (Advanced SIMD): the dense products; the rest is portable.
    Neon,
    /// Plain Rust (vectorised by the compiler for the baseline target).
    Portable,
}

impl KernelPath {
    /// Short name for logs and benchmark output: `avx512`, `avx2`, `neon` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "avx512",
            KernelPath::Avx2Fma => "avx2",
            KernelPath::Neon => "neon",
            KernelPath::Portable => "portable",
        }
    }

    /// The paths this CPU can run, best first: `Avx512`, `Avx2Fma` and `Neon` where
    /// supported, always `Portable`.
    pub fn available() -> Vec<KernelPath> {
        [
            KernelPath::Avx512,
            KernelPath::Avx2Fma,
            KernelPath::Neon,
            KernelPath::Portable,
        ]
        .into_iter()
        .filter(|path| path.supported())
        .collect()
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Avx512 => cpu_has_avx512(),
            KernelPath::Avx2Fma => cpu_has_avx2_fma(),
            KernelPath::Neon => cpu_has_neon(),
            KernelPath::Portable => true,
        }
    }

    /// The best path this CPU has.
    pub fn best() -> KernelPath {
        KernelPath::available()
            .first()
            .copied()
            .unwrap_or(KernelPath::Portable)
    }
}

/// What `FEDQUIC_KERNEL` may say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    Auto,
    Portable,
    Avx2,
    Avx512,
    Neon,
}

/// A `FEDQUIC_KERNEL` value that is none of `auto`, `portable`, `avx2`, `avx512`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{KERNEL_VAR}={0:?} is not one of auto, portable, avx2, avx512, neon")]
pub struct KernelChoiceError(pub String);

/// `FEDQUIC_KERNEL` asked for a level this CPU lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{KERNEL_VAR}={asked} but this CPU lacks it (it has: {has}); \
     use auto or one of the levels it has"
)]
pub struct KernelUnsupported {
    pub asked: &'static str,
    pub has: String,
}

/// Why `FEDQUIC_KERNEL` cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Unknown(#[from] KernelChoiceError),
    #[error(transparent)]
    Unsupported(#[from] KernelUnsupported),
}

impl std::str::FromStr for KernelChoice {
    type Err = KernelChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(KernelChoice::Auto),
            "portable" => Ok(KernelChoice::Portable),
            "avx2" => Ok(KernelChoice::Avx2),
            "avx512" => Ok(KernelChoice::Avx512),
            "neon" => Ok(KernelChoice::Neon),
            _ => Err(KernelChoiceError(s.to_owned())),
        }
    }
}

fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_has_avx2_fma() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn cpu_has_neon() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("neon")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
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

/// The path a choice leads to on this CPU, or an error naming the levels it has when it
/// asks for one the CPU lacks.
pub fn resolve(choice: KernelChoice) -> Result<KernelPath, KernelUnsupported> {
    let asked = match choice {
        KernelChoice::Auto => return Ok(KernelPath::best()),
        KernelChoice::Portable => KernelPath::Portable,
        KernelChoice::Avx2 => KernelPath::Avx2Fma,
        KernelChoice::Avx512 => KernelPath::Avx512,
        KernelChoice::Neon => KernelPath::Neon,
    };
    if asked.supported() {
        Ok(asked)
    } else {
        let has: Vec<&str> = KernelPath::available().iter().map(|p| p.name()).collect();
        Err(KernelUnsupported {
            asked: asked.name(),
            has: has.join(", "),
        })
    }
}

/// The process's path from `FEDQUIC_KERNEL`, or why it cannot be honoured. Binaries
/// call this at startup to stop with the error; [`kernel_path`] itself never fails (it
/// logs the error and runs the best path).
pub fn process_path() -> Result<KernelPath, KernelError> {
    let value = std::env::var(KERNEL_VAR).unwrap_or_default();
    let choice: KernelChoice = value.parse()?;
    Ok(resolve(choice)?)
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
            process_path().unwrap_or_else(|e| {
                let best = KernelPath::best();
                tracing::error!("{e}; running {}", best.name());
                best
            })
        })
    })
}

/// What `--version` adds to a binary's version: the CPU kernel path this
/// process trains with (after `FEDQUIC_KERNEL`) and the best the CPU has.
pub fn version_details(version: &str) -> String {
    let choice = std::env::var(KERNEL_VAR).unwrap_or_else(|_| "auto".into());
    format!(
        "{version}\nCPU kernels: {} ({KERNEL_VAR}={choice}; best on this CPU: {})\ntarget: {}",
        kernel_path_name(),
        KernelPath::best().name(),
        std::env::consts::ARCH
    )
}

/// [`kernel_path`]'s name (`avx512`, `avx2`, `neon` or `portable`), for logs.
pub fn kernel_path_name() -> &'static str {
    kernel_path().name()
}

/// Whether the AVX2+FMA kernels are to run (which implies the CPU has them): on the
/// `avx2` path, and on the `avx512` one, which uses them where it has no kernel of its own.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) fn avx2_fma() -> bool {
    matches!(kernel_path(), KernelPath::Avx2Fma | KernelPath::Avx512)
}

/// Whether the AVX-512F kernels are to run: on the `avx512` path, which is never chosen
/// for a CPU without AVX-512F (checked again here, since callers rely on it to make
/// `unsafe` calls into `avx512f` functions).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512f() -> bool {
    kernel_path() == KernelPath::Avx512 && std::arch::is_x86_feature_detected!("avx512f")
}

/// Runs `work` on this thread with the kernels of `path` (or of the best level below it
/// that the CPU has), then restores the previous choice, even if `work` panics.
pub fn with_kernel_path<R>(path: KernelPath, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_PATH.with(|p| p.set(self.0));
        }
    }
    let effective = [
        path,
        KernelPath::Avx2Fma,
        KernelPath::Neon,
        KernelPath::Portable,
    ]
    .into_iter()
    .find(|p| p.supported() && *p >= path)
    .unwrap_or(KernelPath::Portable);
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
        assert_eq!("avx512".parse(), Ok(KernelChoice::Avx512));
        assert_eq!(resolve(KernelChoice::Portable), Ok(KernelPath::Portable));
        let best = KernelPath::available()[0];
        assert_eq!(resolve(KernelChoice::Auto), Ok(best));
        assert_eq!("neon".parse(), Ok(KernelChoice::Neon));
        for (choice, path) in [
            (KernelChoice::Avx2, KernelPath::Avx2Fma),
            (KernelChoice::Avx512, KernelPath::Avx512),
            (KernelChoice::Neon, KernelPath::Neon),
        ] {
            match resolve(choice) {
                Ok(resolved) => {
                    assert_eq!(resolved, path);
                    assert!(path.supported());
                }
                Err(e) => {
                    assert!(!path.supported());
                    let text = e.to_string();
                    assert!(
                        text.contains(path.name()) && text.contains("lacks"),
                        "{text}"
                    );
                }
            }
        }
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
                // Asking for a level the CPU lacks gets the best one below it.
                let expected = [KernelPath::Avx2Fma, KernelPath::Neon, KernelPath::Portable]
                    .into_iter()
                    .find(|path| path.supported());
                assert_eq!(Some(kernel_path()), expected);
            });
            with_kernel_path(KernelPath::Avx512, || {
                assert_eq!(kernel_path(), KernelPath::best());
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
