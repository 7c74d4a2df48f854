//! Base projections whose weights are stored in f16 and computed in f32.
//!
//! Why: batch-1 decode reads every weight once per token and does two FLOPs
//! per weight, so it is bound by memory bandwidth, not arithmetic (the
//! demo-size decoder reads 21.4 MB of f32 weights per token; one core here
//! streams 15–20 GB/s). Storing the weights in f16 halves the bytes and so
//! the floor; accumulation stays in f32, and activations, norms, the KV cache
//! and the LoRA slots stay f32.
//!
//! How, for `out[m, n] (+)= x[m, k] · w[n, k]ᵀ` with `w` in f16:
//! - up to [`GEMV_MAX_ROWS`] rows of x: a kernel that converts each weight
//!   once per pair of x rows (AVX2 + F16C + FMA when the CPU has them, checked
//!   at run time; a portable loop otherwise), four output columns at a time
//!   so four FMA chains run in parallel;
//! - more rows (prefill, large decode batches): `w` is converted to f32 one
//!   block of [`WIDEN_BLOCK_ELEMS`] weights (whole output columns) at a time
//!   into a per-thread scratch, and the f32 gemm runs on each block. The
//!   conversion is `n·k` work against the product's `m·n·k`; done in blocks
//!   the scratch stays in L2, instead of widening the whole matrix through
//!   memory (which, with zero-filling the scratch, took a fifth of a
//!   16-row decode step on the demo model).
//!
//! Invariant: both paths compute the product of the f16 weights widened to
//! f32 exactly (the conversion is exact); they differ from each other only
//! in summation order.

use std::cell::RefCell;

use half::f16;

/// Up to this many rows of x the direct kernel runs; above it the weights
/// are widened once and the f32 gemm takes over.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weights widened per block above [`GEMV_MAX_ROWS`] rows: 64K f32 = 256 KiB,
/// which stays in a core's L2 while the gemm reads it.
pub const WIDEN_BLOCK_ELEMS: usize = 1 << 16;

thread_local! {
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m, n] (+)= x[m, k] · w[n, k]ᵀ`; `out` is row-major `[m, n]`.
///
/// Above [`GEMV_MAX_ROWS`] rows, `f32_gemm(x, w_block, cols, out_block)`
/// must add `x · w_blockᵀ` (`w_block` is `[cols, k]` f32) into the `cols`
/// columns of `out` that start at `out_block[0]`, rows `n` apart.
///
/// # Panics
/// If a slice is shorter than its shape says.
#[allow(clippy::too_many_arguments)]
pub fn product(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    mut f32_gemm: impl FnMut(&[f32], &[f32], usize, &mut [f32]),
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if !accumulate {
        out[..m * n].fill(0.0);
    }
    if m > GEMV_MAX_ROWS {
        let cols = (WIDEN_BLOCK_ELEMS / k.max(1)).clamp(1, n.max(1));
        WIDENED.with(|scratch| {
            let mut wide = scratch.borrow_mut();
            if wide.len() < cols * k {
                wide.resize(cols * k, 0.0);
            }
            let mut j = 0;
            while j < n {
                let c = cols.min(n - j);
                let block = &mut wide[..c * k];
                widen(&w[j * k..(j + c) * k], block);
                f32_gemm(&x[..m * k], block, c, &mut out[j..m * n]);
                j += c;
            }
        });
        return;
    }
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(2);
        let xs = &x[i * k..(i + rows) * k];
        let os = &mut out[i * n..(i + rows) * n];
        if rows == 2 {
            gemv::<2>(xs, k, w, n, os);
        } else {
            gemv::<1>(xs, k, w, n, os);
        }
        i += rows;
    }
}

/// Widens f16 to f32 (exact). With F16C, 32 values per loop turn in
/// registers: `half`'s slice conversion goes through a call and two small
/// buffer copies per 8 values, which cost 4x the conversion itself here.
pub fn widen(src: &[f16], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c_fma() {
            // SAFETY: the CPU has AVX2 and F16C (checked above); both slices
            // hold `src.len()` values.
            unsafe { x86::widen(src, dst) };
            return;
        }
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// `out[M, n] += x[M, k] · w[n, k]ᵀ` for M = 1 or 2 rows.
fn gemv<const M: usize>(x: &[f32], k: usize, w: &[f16], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c_fma() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the
            // kernel reads x[..M·k], w[..n·k] and writes out[..M·n], which
            // `product` asserted.
            unsafe { x86::gemv::<M>(x, k, w, n, out) };
            return;
        }
    }
    portable_gemv::<M>(x, k, w, n, out);
}

fn portable_gemv<const M: usize>(x: &[f32], k: usize, w: &[f16], n: usize, out: &mut [f32]) {
    for (j, w_row) in w.chunks_exact(k).take(n).enumerate() {
        for r in 0..M {
            let x_row = &x[r * k..(r + 1) * k];
            let dot: f32 = x_row.iter().zip(w_row).map(|(&a, &b)| a * b.to_f32()).sum();
            out[r * n + j] += dot;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// 8 weights from `p`, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// `dst[i] = src[i]` widened, for `i < src.len()`; `dst` is as long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 32 <= n {
            for o in [0, 8, 16, 24] {
                _mm256_storeu_ps(dp.add(i + o), load8(sp.add(i + o)));
            }
            i += 32;
        }
        while i + 8 <= n {
            _mm256_storeu_ps(dp.add(i), load8(sp.add(i)));
            i += 8;
        }
        for t in i..n {
            dst[t] = src[t].to_f32();
        }
    }

    /// Four output columns per step (four independent FMA chains per x row,
    /// each weight widened once for all M rows); tails in scalar code.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemv<const M: usize>(x: &[f32], k: usize, w: &[f16], n: usize, out: &mut [f32]) {
        let k8 = k / 8 * 8;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [[_mm256_setzero_ps(); 4]; M];
            let mut kk = 0;
            while kk < k8 {
                let w0 = load8(wp.add(j * k + kk));
                let w1 = load8(wp.add((j + 1) * k + kk));
                let w2 = load8(wp.add((j + 2) * k + kk));
                let w3 = load8(wp.add((j + 3) * k + kk));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    a[2] = _mm256_fmadd_ps(xv, w2, a[2]);
                    a[3] = _mm256_fmadd_ps(xv, w3, a[3]);
                }
                kk += 8;
            }
            for (r, a) in acc.iter().enumerate() {
                for c in 0..4 {
                    let mut s = hsum(a[c]);
                    for t in k8..k {
                        s += x[r * k + t] * w[(j + c) * k + t].to_f32();
                    }
                    out[r * n + j + c] += s;
                }
            }
            j += 4;
        }
        for jj in j..n {
            for r in 0..M {
                let mut acc = _mm256_setzero_ps();
                let mut kk = 0;
                while kk < k8 {
                    let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                    acc = _mm256_fmadd_ps(xv, load8(wp.add(jj * k + kk)), acc);
                    kk += 8;
                }
                let mut s = hsum(acc);
                for t in k8..k {
                    s += x[r * k + t] * w[jj * k + t].to_f32();
                }
                out[r * n + jj] += s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], m: usize, k: usize, w: &[f16], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64())
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn naive_f32_gemm(
        m: usize,
        n: usize,
        k: usize,
    ) -> impl FnMut(&[f32], &[f32], usize, &mut [f32]) {
        move |x, w, cols, out| {
            for i in 0..m {
                for j in 0..cols {
                    out[i * n + j] += (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f32>();
                }
            }
        }
    }

    /// Every row count across the kernel/widen boundary, column counts with
    /// and without a tail of 4, inner sizes with and without a tail of 8,
    /// and accumulation.
    #[test]
    fn matches_the_widened_reference() {
        let mut rng = StdRng::seed_from_u64(5);
        for &(m, n, k) in &[
            (1, 4, 8),
            (1, 7, 13),
            (2, 33, 64),
            (3, 10, 256),
            (5, 9, 17),
            (8, 64, 40),
            (9, 12, 24),
            (16, 30, 64),
            // Several widened blocks, the last one partial.
            (12, 2 * (WIDEN_BLOCK_ELEMS / 96) + 5, 96),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f16> = (0..n * k)
                .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let want = reference(&x, m, k, &w, n);
            for accumulate in [false, true] {
                let mut out = vec![if accumulate { 1.0 } else { 7.0 }; m * n];
                product(
                    &x,
                    m,
                    k,
                    &w,
                    n,
                    &mut out,
                    accumulate,
                    naive_f32_gemm(m, n, k),
                );
                for (i, (&got, &w)) in out.iter().zip(&want).enumerate() {
                    let w = if accumulate { w + 1.0 } else { w };
                    assert!(
                        (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "m={m} n={n} k={k} accumulate={accumulate} [{i}]: {got} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn widen_is_exact_for_every_length() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 100] {
            let src: Vec<f16> = (0..len)
                .map(|_| f16::from_f32(rng.random_range(-70000.0..70000.0)))
                .chain([
                    f16::INFINITY,
                    f16::NEG_INFINITY,
                    f16::MIN_POSITIVE_SUBNORMAL,
                ])
                .collect();
            let mut dst = vec![0f32; src.len()];
            widen(&src, &mut dst);
            for (a, b) in src.iter().zip(&dst) {
                assert_eq!(a.to_f32().to_bits(), b.to_bits(), "len {len}");
            }
        }
    }

    #[test]
    fn portable_and_simd_kernels_agree() {
        let (m, n, k) = (2, 13, 100);
        let mut rng = StdRng::seed_from_u64(9);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f16> = (0..n * k)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let mut a = vec![0f32; m * n];
        let mut b = vec![0f32; m * n];
        gemv::<2>(&x, k, &w, n, &mut a);
        portable_gemv::<2>(&x, k, &w, n, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}
