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

#[cfg(target_arch = "x86_64")]
pub(crate) use super::lanes::Avx2Fma;
pub(crate) use super::lanes::{dot, silu_mul, Lanes, Portable};

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
