//! Normalisations, rotary position embedding and the host-slice helpers the
//! CPU kernels share.
//!
//! Every operation has two implementations that compute the same function:
//! candle tensor ops (any device) and plain loops over f32 slices (CPU; no
//! per-op overhead, which dominates small-batch decode). [`KernelPath`]
//! picks one for a whole forward.
//!
//! Semantics follow transformers' `modeling_chameleon.py`:
//! - RMSNorm: `x · rsqrt(mean(x²) + eps) · w`;
//! - query/key norm: layer norm over each head's `head_dim` without affine
//!   (eps 1e-5), then `· weight[head] + bias[head]`;
//! - RoPE: non-interleaved ("rotate_half"), `inv_freq` and angles in f32 as
//!   transformers computes them.

use candle_core::{DType, Device, Error, Result, Storage, Tensor};

/// Which implementation of the non-projection ops a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Loops over raw f32 slices; CPU tensors only.
    HostSlices,
    /// candle tensor ops; any device.
    TensorOps,
}

impl KernelPath {
    /// The fast path for the device: slices on the CPU, tensor ops elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            KernelPath::HostSlices
        } else {
            KernelPath::TensorOps
        }
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() != DType::F32 {
        return Err(Error::Msg(format!(
            "host kernels need f32 tensors, got {:?}",
            t.dtype()
        )));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Msg("host kernels need a CPU tensor".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => f(&data[start..end]),
        None => {
            drop(storage);
            let c = t.contiguous()?;
            with_host_f32(&c, f)
        }
    }
}

/// Copies a tensor's values to a host vector (any device).
pub(crate) fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

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

/// Root-mean-square norm with a learned scale (`ChameleonRMSNorm`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    host_weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        let host_weight = host_vec(&weight)?;
        Ok(Self {
            weight,
            host_weight,
            eps: eps as f32,
        })
    }

    /// `[N, d] -> [N, d]`.
    pub fn forward(&self, x: &Tensor, path: KernelPath) -> Result<Tensor> {
        match path {
            KernelPath::TensorOps => {
                candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
            }
            KernelPath::HostSlices => {
                let (n, d) = x.dims2()?;
                let mut out = vec![0f32; n * d];
                with_host_f32(x, |xs| {
                    for (row, o) in xs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                        self.row(row, o);
                    }
                    Ok(())
                })?;
                Tensor::from_vec(out, (n, d), x.device())
            }
        }
    }

    /// One row on host slices.
    #[inline]
    pub(crate) fn row(&self, x: &[f32], out: &mut [f32]) {
        let inv = 1.0 / (dot(x, x) / x.len() as f32 + self.eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(&self.host_weight) {
            *o = v * inv * w;
        }
    }
}

/// Per-head layer norm of queries or keys (`ChameleonLayerNorm`): weight and
/// bias are `[heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct HeadNorm {
    weight: Tensor,
    bias: Tensor,
    host_weight: Vec<f32>,
    host_bias: Vec<f32>,
    /// Plain layer norm parameters for candle's fused op: ones and zeros.
    unit: (Tensor, Tensor),
    head_dim: usize,
}

/// transformers' `F.layer_norm` default inside `ChameleonLayerNorm`.
pub const HEAD_NORM_EPS: f32 = 1e-5;

impl HeadNorm {
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        let (_, head_dim) = weight.dims2()?;
        let dev = weight.device().clone();
        Ok(Self {
            host_weight: host_vec(&weight)?,
            host_bias: host_vec(&bias)?,
            unit: (
                Tensor::ones(head_dim, DType::F32, &dev)?,
                Tensor::zeros(head_dim, DType::F32, &dev)?,
            ),
            weight,
            bias,
            head_dim,
        })
    }

    /// `[N, heads, head_dim] -> [N, heads, head_dim]`.
    pub fn forward_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = &self.unit;
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, HEAD_NORM_EPS)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }

    /// One token's heads, `x` and `out` both `[heads · head_dim]`.
    #[inline]
    pub(crate) fn row(&self, x: &[f32], out: &mut [f32]) {
        let hd = self.head_dim;
        let params = self
            .host_weight
            .chunks_exact(hd)
            .zip(self.host_bias.chunks_exact(hd));
        for ((xh, oh), (w, b)) in x.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(params) {
            let mean = xh.iter().sum::<f32>() / hd as f32;
            let mut var = 0f32;
            for &v in xh {
                var += (v - mean) * (v - mean);
            }
            let inv = 1.0 / (var / hd as f32 + HEAD_NORM_EPS).sqrt();
            for i in 0..hd {
                oh[i] = (xh[i] - mean) * inv * w[i] + b[i];
            }
        }
    }
}

/// cos/sin tables of the rotary embedding for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
    host_cos: Vec<f32>,
    host_sin: Vec<f32>,
    half: usize,
    max_positions: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // As transformers: inv_freq = 1 / theta^(2i / dim) and angles in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut host_cos = Vec::with_capacity(max_positions * half);
        let mut host_sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                host_cos.push(angle.cos());
                host_sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&host_cos, (max_positions, half), device)?,
            sin: Tensor::from_slice(&host_sin, (max_positions, half), device)?,
            host_cos,
            host_sin,
            half,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `[N, heads, head_dim]` by each row's own position.
    pub fn forward_tensor(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let cos = self.cos.index_select(positions, 0)?; // [N, half]
        let sin = self.sin.index_select(positions, 0)?;
        // (N, H, D) -> (1, H, N, D): candle's rope wants (B, H, T, D).
        let xt = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
        candle_nn::rotary_emb::rope(&xt, &cos, &sin)?
            .squeeze(0)?
            .transpose(0, 1)?
            .contiguous()
    }

    /// Rotates one token's heads (`[heads · head_dim]`) in place.
    #[inline]
    pub(crate) fn row(&self, x: &mut [f32], position: usize) {
        let h = self.half;
        let cos = &self.host_cos[position * h..(position + 1) * h];
        let sin = &self.host_sin[position * h..(position + 1) * h];
        for head in x.chunks_exact_mut(2 * h) {
            let (x1, x2) = head.split_at_mut(h);
            for i in 0..h {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
