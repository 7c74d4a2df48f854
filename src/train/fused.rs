//! Fused CPU kernels, with their backward passes, for the element-wise
//! parts of a training step: RMSNorm, the per-head layer norm with RoPE,
//! the masked softmax of attention, and SiLU(gate)·up.
//!
//! Why: written with candle ops, each of these is 5 to 15 tensor ops
//! forward and about twice that backward, every one a pass over memory and
//! a hand-off to candle's element-wise thread pool; together they cost more
//! than the step's matmuls (`examples/train_step_profile`, BENCHMARKS.md).
//! Here each is one pass forward and one backward, rows split across
//! rayon's threads.
//!
//! Invariants:
//! - each op equals its composed counterpart in [`super::decoder`] (values
//!   and gradients) to float rounding; `tests` holds them to 1e-5;
//! - only f32 on the CPU: callers use the composed ops elsewhere
//!   ([`usable`]).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

/// Whether the fused ops can run on `x` (f32 on the CPU).
pub fn usable(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// The f32 data of a contiguous CPU tensor, borrowed (its storage stays
/// read-locked while the view lives).
struct F32View<G> {
    storage: G,
    range: (usize, usize),
}

impl<G: std::ops::Deref<Target = Storage>> F32View<G> {
    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.range.0..self.range.1],
            _ => unreachable!("checked in view()"),
        }
    }
}

/// Borrows the data of `t`, which must be contiguous: the ops make their
/// inputs so on entry, and gradients before use.
fn view(t: &Tensor) -> Result<F32View<impl std::ops::Deref<Target = Storage> + '_>> {
    let (storage, layout) = t.storage_and_layout();
    let range = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: not contiguous".into()))?;
    if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("fused op: f32 CPU tensors only")
    }
    Ok(F32View { storage, range })
}

/// The f32 slice of a contiguous CPU storage argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("fused op: f32 only")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: contiguous input only".into()))?;
    Ok(&data[a..b])
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

// ---------------------------------------------------------------- RMSNorm

/// `x · w / √(mean(x²) + eps)` over the last dimension of `x`, `w` `[d]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let r = self.inv_rms(x);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let (dx, dw) = {
            let grad = grad.contiguous()?;
            let (x_view, w_view, g_view) = (view(x)?, view(w)?, view(&grad)?);
            let (x, w, g) = (x_view.data(), w_view.data(), g_view.data());
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(d)
                .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                .for_each(|(dx, (x, g))| {
                    let r = self.inv_rms(x);
                    let c: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                    let k = c * r * r * r / d as f32;
                    for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                        *dx = r * g * w - x * k;
                    }
                });
            let mut dw = vec![0f32; d];
            for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                let r = self.inv_rms(x);
                for ((dw, x), g) in dw.iter_mut().zip(x).zip(g) {
                    *dw += g * x * r;
                }
            }
            (dx, dw)
        };
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

// ------------------------------------------------ per-head layer norm + RoPE

/// Per-head layer norm (weight and bias `[heads, head_dim]`) then
/// non-interleaved RoPE with per-row `cos`/`sin` `[N, head_dim / 2]`, on
/// `x` `[N, heads, head_dim]`.
pub fn head_norm_rope(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let op = HeadNormRope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op3(w, b, op)
}

struct HeadNormRope {
    /// `[N, half]`, contiguous.
    cos: Tensor,
    sin: Tensor,
    eps: f32,
}

impl HeadNormRope {
    /// `z = (x − mean) / σ` of one head's row, and `1/σ`.
    fn normalise(&self, x: &[f32], z: &mut [f32]) -> f32 {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for (z, x) in z.iter_mut().zip(x) {
            *z = (x - mean) * inv;
        }
        inv
    }
}

impl CustomOp3 for HeadNormRope {
    fn name(&self) -> &'static str {
        "fused-head-norm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, heads, hd) = l1.shape().dims3()?;
        let half = hd / 2;
        let (cos_view, sin_view) = (view(&self.cos)?, view(&self.sin)?);
        let (cos, sin) = (cos_view.data(), sin_view.data());
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(heads * hd)
            .zip(x.par_chunks(heads * hd))
            .enumerate()
            .for_each(|(n, (y, x))| {
                let (cos, sin) = (&cos[n * half..][..half], &sin[n * half..][..half]);
                let mut a = vec![0f32; hd];
                for h in 0..heads {
                    let (x, y) = (&x[h * hd..][..hd], &mut y[h * hd..][..hd]);
                    self.normalise(x, &mut a);
                    for ((a, w), b) in a.iter_mut().zip(&w[h * hd..][..hd]).zip(&b[h * hd..][..hd])
                    {
                        *a = *a * w + b;
                    }
                    for j in 0..half {
                        y[j] = a[j] * cos[j] - a[j + half] * sin[j];
                        y[j + half] = a[j + half] * cos[j] + a[j] * sin[j];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, heads, hd) = x.dims3()?;
        let half = hd / 2;
        let (cos_view, sin_view) = (view(&self.cos)?, view(&self.sin)?);
        let (cos, sin) = (cos_view.data(), sin_view.data());
        let row = heads * hd;
        let (dx, dw, db) = {
            let grad = grad.contiguous()?;
            let (x_view, w_view, g_view) = (view(x)?, view(w)?, view(&grad)?);
            let (x, w, g) = (x_view.data(), w_view.data(), g_view.data());
            let mut dx = vec![0f32; x.len()];
            // Per row: dx, and this row's terms of dw and db.
            let mut terms = vec![0f32; 2 * x.len()];
            dx.par_chunks_mut(row)
                .zip(terms.par_chunks_mut(2 * row))
                .enumerate()
                .for_each(|(n, (dx, terms))| {
                    let (cos, sin) = (&cos[n * half..][..half], &sin[n * half..][..half]);
                    let (tw, tb) = terms.split_at_mut(row);
                    let (mut z, mut gz) = (vec![0f32; hd], vec![0f32; hd]);
                    for h in 0..heads {
                        let at = n * row + h * hd;
                        let inv = self.normalise(&x[at..][..hd], &mut z);
                        let g = &g[at..][..hd];
                        // RoPE transposed: the gradient of a = z·w + b.
                        let ga = &mut tb[h * hd..][..hd];
                        for j in 0..half {
                            ga[j] = g[j] * cos[j] + g[j + half] * sin[j];
                            ga[j + half] = g[j + half] * cos[j] - g[j] * sin[j];
                        }
                        let w = &w[h * hd..][..hd];
                        for j in 0..hd {
                            tw[h * hd + j] = ga[j] * z[j];
                            gz[j] = ga[j] * w[j];
                        }
                        let mean_g = gz.iter().sum::<f32>() / hd as f32;
                        let mean_gz =
                            gz.iter().zip(&z).map(|(g, z)| g * z).sum::<f32>() / hd as f32;
                        let dx = &mut dx[h * hd..][..hd];
                        for j in 0..hd {
                            dx[j] = (gz[j] - mean_g - z[j] * mean_gz) * inv;
                        }
                    }
                });
            let (mut dw, mut db) = (vec![0f32; row], vec![0f32; row]);
            for terms in terms.chunks(2 * row) {
                let (tw, tb) = terms.split_at(row);
                for j in 0..row {
                    dw[j] += tw[j];
                    db[j] += tb[j];
                }
            }
            (dx, dw, db)
        };
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

// ------------------------------------------------------- masked softmax

/// `softmax(scores · scale + mask)` over the last dimension: `scores`
/// `[B, H, T, T]`, `mask` `[B, 1, T, T]` additive (0 or −∞, the diagonal 0).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let op = MaskedSoftmax {
        mask: mask.contiguous()?,
        heads: scores.dim(1)?,
        scale: scale as f32,
    };
    scores.contiguous()?.apply_op1(op)
}

struct MaskedSoftmax {
    /// `[B, 1, T, T]`, contiguous.
    mask: Tensor,
    heads: usize,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (_, _, t, _) = l.shape().dims4()?;
        let mask_view = view(&self.mask)?;
        let mask = mask_view.data();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .enumerate()
            .for_each(|(r, (y, x))| {
                // Row r is (b, h, i): its mask row is (b, i).
                let (b, i) = (r / (self.heads * t), r % t);
                let m = &mask[(b * t + i) * t..][..t];
                let mut max = f32::NEG_INFINITY;
                for ((y, x), m) in y.iter_mut().zip(x).zip(m) {
                    *y = x * self.scale + m;
                    max = max.max(*y);
                }
                let mut sum = 0.0;
                for y in y.iter_mut() {
                    *y = (*y - max).exp();
                    sum += *y;
                }
                for y in y.iter_mut() {
                    *y /= sum;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let t = probs.dim(3)?;
        let dx = {
            let grad = grad.contiguous()?;
            let (p_view, g_view) = (view(probs)?, view(&grad)?);
            let (p, g) = (p_view.data(), g_view.data());
            let mut dx = vec![0f32; p.len()];
            dx.par_chunks_mut(t)
                .zip(p.par_chunks(t).zip(g.par_chunks(t)))
                .for_each(|(dx, (p, g))| {
                    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                    for ((dx, p), g) in dx.iter_mut().zip(p).zip(g) {
                        *dx = self.scale * p * (g - dot);
                    }
                });
            dx
        };
        Ok(Some(tensor(dx, probs.shape())?))
    }
}

// ------------------------------------------------------------ SiLU · up

/// `silu(gate) · up`, element-wise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Rows of this many elements per rayon task.
const CHUNK: usize = 4096;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = {
            let grad = grad.contiguous()?;
            let (g_view, u_view, gy_view) = (view(gate)?, view(up)?, view(&grad)?);
            let (g, u, gy) = (g_view.data(), u_view.data(), gy_view.data());
            let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(
                    g.par_chunks(CHUNK)
                        .zip(u.par_chunks(CHUNK))
                        .zip(gy.par_chunks(CHUNK)),
                )
                .for_each(|((dg, du), ((g, u), gy))| {
                    for i in 0..g.len() {
                        let s = sigmoid(g[i]);
                        dg[i] = gy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        du[i] = gy[i] * g[i] * s;
                    }
                });
            (dg, du)
        };
        Ok((
            Some(tensor(dg, gate.shape())?),
            Some(tensor(du, up.shape())?),
        ))
    }
}

#[cfg(test)]
#[path = "fused_tests.rs"]
mod tests;
