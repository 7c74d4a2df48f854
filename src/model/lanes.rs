//! Vector primitives of the host kernels (dot, axpy, exp, SwiGLU's gate),
//! one implementation per instruction set: plain Rust, and AVX2+FMA
//! intrinsics chosen at run time where the CPU has them. Kernels are generic
//! over [`Lanes`] and inlined into a function compiled for that set, so one
//! source gives both copies.
//!
//! Invariant: both copies compute the same function (the AVX2 `exp` to ~1e-7
//! relative; `lanes_tests.rs` holds them together, edges included).

/// Vector primitives of the host kernels, one implementation per instruction
/// set. Kernels are generic over it and inlined into a function compiled for
/// that set, so one source gives a portable and an AVX2+FMA copy.
pub(crate) trait Lanes: Copy {
    /// `Σ a·b` over the common length.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `y += alpha · x` over the common length.
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]);
    /// `x ← exp(x - shift)` in place; returns the sum of the results.
    fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32;
    /// SwiGLU's gate: `out = silu(g) · u = g / (1 + exp(-g)) · u`.
    fn silu_mul(self, g: &[f32], u: &[f32], out: &mut [f32]);
}

/// Plain Rust; sixteen independent accumulators so the compiler vectorises.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        const W: usize = 16;
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0f32; W];
        let (mut ca, mut cb) = (a.chunks_exact(W), b.chunks_exact(W));
        for (x, y) in (&mut ca).zip(&mut cb) {
            for i in 0..W {
                acc[i] += x[i] * y[i];
            }
        }
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }

    #[inline(always)]
    fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }

    #[inline(always)]
    fn silu_mul(self, g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// AVX2 + FMA intrinsics; a value exists only where the CPU has both.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2Fma(());

#[cfg(target_arch = "x86_64")]
impl Avx2Fma {
    pub(crate) fn detect() -> Option<Self> {
        (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
            .then_some(Self(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2Fma {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `Avx2Fma` is only constructed after detecting the features.
        unsafe { avx2::dot(a, b) }
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { avx2::axpy(y, alpha, x) }
    }

    #[inline(always)]
    fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32 {
        // SAFETY: as above.
        unsafe { avx2::exp_shifted(x, shift) }
    }

    #[inline(always)]
    fn silu_mul(self, g: &[f32], u: &[f32], out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { avx2::silu_mul(g, u, out) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bounds both 8-wide loads of both slices.
            unsafe {
                let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
            }
            i += 16;
        }
        if i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
            }
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
        let mut total = _mm_cvtss_f32(q);
        for j in i..n {
            total += a[j] * b[j];
        }
        total
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds the load from x and the load/store of y.
            unsafe {
                let py = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    py,
                    _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(py)),
                );
            }
            i += 8;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }

    /// `exp` of 8 lanes (Cephes' `expf`: range reduction by ln 2, a degree-5
    /// polynomial; relative error ~1e-7 over the normal range). The input is
    /// clamped to [-104, 88.8], where f32's exp is 0 and +inf beyond, and
    /// 2^n is applied as two halves so every n in between stays
    /// representable (results below 2^-126 come out as denormals, as from
    /// `f32::exp`). NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let xc = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.8)),
            _mm256_set1_ps(-104.0),
        );
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // 2^n = 2^(n >> 1) · 2^(n - (n >> 1)), each factor within ±75.
        let n = _mm256_cvtps_epi32(fx);
        let half = _mm256_srai_epi32::<1>(n);
        let pow2 = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        let scaled = _mm256_mul_ps(
            _mm256_mul_ps(y, pow2(half)),
            pow2(_mm256_sub_epi32(n, half)),
        );
        _mm256_blendv_ps(scaled, x, nan)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let vs = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds the load and the store.
            unsafe {
                let p = x.as_mut_ptr().add(i);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), vs));
                _mm256_storeu_ps(p, e);
                acc = _mm256_add_ps(acc, e);
            }
            i += 8;
        }
        let q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
        let mut sum = _mm_cvtss_f32(q);
        for v in &mut x[i..] {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len().min(g.len()).min(u.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds every load and the store.
            unsafe {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let uv = _mm256_loadu_ps(u.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
            }
            i += 8;
        }
        for j in i..n {
            out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

/// SwiGLU's gate `out = silu(g) · u` on the fastest lanes the CPU has.
pub(crate) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(lanes) = Avx2Fma::detect() {
        return lanes.silu_mul(g, u, out);
    }
    Portable.silu_mul(g, u, out)
}

/// `Σ a·b` (portable lanes), for the per-row norms.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    Portable.dot(a, b)
}
