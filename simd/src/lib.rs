//! Run-time instruction-set dispatch for fedquic's small hot loops outside the
//! training kernels: the finiteness checks a receiver runs on every value, the
//! aggregator's fold, the client's delta, the norms of clipping.
//!
//! Those loops are plain Rust written so that the compiler vectorises them. A
//! binary built for the x86-64 baseline only gets SSE2 (two f64 or four f32
//! lanes); [`avx2_dispatch!`] compiles the same body a second time with AVX2
//! enabled and picks it at run time when the CPU has AVX2. No intrinsics, no
//! per-path source: both paths run the same Rust, and as Rust never fuses a
//! multiply and an add on its own, they give the same bits. The training kernels
//! (GEMM, convolutions) have their own dispatch with a user-facing switch in
//! `fedquic-train`.
#![forbid(unsafe_op_in_unsafe_fn)]

/// Whether this CPU has AVX2. `is_x86_feature_detected!` caches its answer, so
/// this is a load and a test. Always false off x86-64.
#[inline]
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function that runs `portable` (a function with the same
/// signature, marked `#[inline(always)]` so that its body is compiled into each
/// instance) compiled for AVX2 when the CPU has it, and as built otherwise.
///
/// ```
/// #[inline(always)]
/// fn sum_portable(values: &[f32]) -> f32 {
///     values.iter().sum()
/// }
///
/// fedquic_simd::avx2_dispatch! {
///     /// The sum of `values`, in 256-bit registers where the CPU has them.
///     fn sum(values: &[f32]) -> f32 => sum_portable
/// }
///
/// assert_eq!(sum(&[1.0, 2.0, 3.5]), sum_portable(&[1.0, 2.0, 3.5]));
/// ```
///
/// Tests compare the defined function (the AVX2 instance on a CPU with AVX2)
/// with `portable`, so both paths run wherever the tests run on x86-64.
#[macro_export]
macro_rules! avx2_dispatch {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $portable:path
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if $crate::avx2() {
                    // SAFETY: `avx2` only needs the AVX2 instructions, and the CPU
                    // has them (checked on the line above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    #[inline(always)]
    fn squares_portable(out: &mut [f64], values: &[f32]) {
        for (o, v) in out.iter_mut().zip(values) {
            *o += f64::from(*v) * f64::from(*v);
        }
    }

    crate::avx2_dispatch! {
        fn squares(out: &mut [f64], values: &[f32]) => squares_portable
    }

    #[inline(always)]
    fn count_non_finite_portable(values: &[f32]) -> usize {
        values.iter().filter(|v| !v.is_finite()).count()
    }

    crate::avx2_dispatch! {
        pub(crate) fn count_non_finite(values: &[f32]) -> usize => count_non_finite_portable
    }

    #[test]
    fn both_paths_give_the_same_bits() {
        for len in [0usize, 1, 5, 8, 13, 64, 777] {
            let values: Vec<f32> = (0..len).map(|i| (i as f32).sin() * 1e3).collect();
            let mut portable: Vec<f64> = (0..len).map(|i| 1.0 / (i as f64 + 1.0)).collect();
            let mut dispatched = portable.clone();
            squares_portable(&mut portable, &values);
            squares(&mut dispatched, &values);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dispatched), bits(&portable));
        }
    }

    #[test]
    fn results_are_returned() {
        let values = [1.0, f32::NAN, 2.0, f32::INFINITY, f32::NEG_INFINITY];
        assert_eq!(count_non_finite(&values), 3);
        assert_eq!(count_non_finite_portable(&values), 3);
    }

    #[test]
    fn detection_matches_the_standard_library() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(super::avx2(), std::arch::is_x86_feature_detected!("avx2"));
        #[cfg(not(target_arch = "x86_64"))]
        assert!(!super::avx2());
    }
}
