//! Self-attention of one decoder layer over a flattened batch: the fused
//! q/k/v projection runs once over all N rows, then each sequence's rows
//! attend to its own KV cache (causal within a prefill chunk).
//!
//! Per row: q/k projections -> per-head layer norm (`q_norm`/`k_norm`) ->
//! RoPE at the row's position -> keys and values appended to the cache ->
//! `softmax(q·Kᵀ / √head_dim) · V` with grouped KV heads -> `o_proj`.
//!
//! Two implementations of the part between the projections (see
//! [`KernelPath`]): candle ops, and a host kernel on the raw f32 slices that
//! streams each sequence's cache once for the scores and once for the
//! weighted sum, compiled for AVX2+FMA where the CPU has it, and split over
//! rayon's threads only when the batch has enough work to pay for it.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::config::Config;
use super::decoder::{ForwardCtx, LayerAdapters};
use super::kv_cache::KvCache;
#[cfg(target_arch = "x86_64")]
use super::norms::Avx2Fma;
use super::norms::{with_host_f32, HeadNorm, KernelPath, Lanes, Portable, Rope};
use crate::adapters::Projection;

/// Multiply-adds of attention in one forward above which the host kernel
/// splits its work over rayon's threads (below it the hand-off costs more).
/// 4M (~1 ms on one core): long prefills split, decode steps do not; a
/// 16-row decode step at 128 tokens of context (0.5M) was no faster on two
/// threads, and rayon's idle threads then spin beside the server's others.
const PARALLEL_MIN_WORK: usize = 1 << 22;
/// Rows of one sequence handled by one parallel task.
const ROWS_PER_TASK: usize = 8;

/// One sequence's rows in a flattened batch.
#[derive(Debug, Clone)]
pub(crate) struct SeqRun {
    /// Index into the caches of the forward.
    pub cache: usize,
    /// Rows of the batch (runs are sorted and partition `0..N`).
    pub rows: Range<usize>,
    /// Position of the first row (= tokens already cached).
    pub start_pos: usize,
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// `[q_out + 2·kv_out, d]`: q, k and v projections stacked.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    o_bias: Option<Tensor>,
    q_norm: Option<HeadNorm>,
    k_norm: Option<HeadNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Stores the projection weights in `dtype` (see `Decoder::set_weight_dtype`).
    pub(crate) fn set_weight_dtype(&mut self, dtype: DType) -> Result<()> {
        self.qkv = self.qkv.to_dtype(dtype)?;
        self.o = self.o.to_dtype(dtype)?;
        Ok(())
    }

    /// Loads `self_attn.*` (pass `vb.pp("self_attn")`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, heads, kv_heads, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let (q_out, kv_out) = (heads * hd, kv_heads * hd);
        let proj = |name: &str, out: usize, inp: usize| vb.pp(name).get((out, inp), "weight");
        let qkv = Tensor::cat(
            &[
                proj("q_proj", q_out, d)?,
                proj("k_proj", kv_out, d)?,
                proj("v_proj", kv_out, d)?,
            ],
            0,
        )?;
        let o = proj("o_proj", d, q_out)?;
        let (qkv_bias, o_bias) = if cfg.attention_bias {
            let b = |name: &str, out: usize| vb.pp(name).get(out, "bias");
            let qkv_b = Tensor::cat(
                &[
                    b("q_proj", q_out)?,
                    b("k_proj", kv_out)?,
                    b("v_proj", kv_out)?,
                ],
                0,
            )?;
            (Some(qkv_b), Some(b("o_proj", d)?))
        } else {
            (None, None)
        };
        let (q_norm, k_norm) = if cfg.qk_layernorm {
            let norm = |name: &str, h: usize| {
                let vb = vb.pp(name);
                HeadNorm::new(vb.get((h, hd), "weight")?, vb.get((h, hd), "bias")?)
            };
            (
                Some(norm("q_norm", heads)?),
                Some(norm("k_norm", kv_heads)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv,
            qkv_bias,
            o,
            o_bias,
            q_norm,
            k_norm,
            heads,
            kv_heads,
            head_dim: hd,
        })
    }

    fn q_out(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_out(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// `[N, d] -> [N, d]`; writes every run's keys and values into its cache
    /// at positions `start_pos..start_pos + rows`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx<'_>,
        caches: &mut [KvCache],
        adapters: &LayerAdapters<'_>,
    ) -> Result<Tensor> {
        let (runs, positions, rope) = (ctx.runs, ctx.positions, ctx.rope);
        let (q_out, kv_out) = (self.q_out(), self.kv_out());
        let qkv = adapters.linear(
            x,
            &self.qkv,
            self.qkv_bias.as_ref(),
            &[
                (Projection::QProj, 0),
                (Projection::KProj, q_out),
                (Projection::VProj, q_out + kv_out),
            ],
        )?;
        let layer = adapters.layer();
        let mixed = match ctx.path {
            KernelPath::HostSlices => self.attend_host(&qkv, layer, runs, caches, rope)?,
            KernelPath::TensorOps => {
                self.attend_tensor(&qkv, layer, runs, positions, caches, rope)?
            }
        };
        adapters.linear(
            &mixed,
            &self.o,
            self.o_bias.as_ref(),
            &[(Projection::OProj, 0)],
        )
    }

    /// Attention in candle ops, one sequence at a time.
    fn attend_tensor(
        &self,
        qkv: &Tensor,
        layer: usize,
        runs: &[SeqRun],
        positions: &Tensor,
        caches: &mut [KvCache],
        rope: &Rope,
    ) -> Result<Tensor> {
        let (n, _) = qkv.dims2()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q_out, kv_out) = (self.q_out(), self.kv_out());
        // (N, q_out + 2 kv_out) -> (N, heads, head_dim) each
        let mut q = qkv.narrow(1, 0, q_out)?.reshape((n, h, hd))?;
        let mut k = qkv.narrow(1, q_out, kv_out)?.reshape((n, kvh, hd))?;
        let v = qkv.narrow(1, q_out + kv_out, kv_out)?.contiguous()?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward_tensor(&q)?;
            k = kn.forward_tensor(&k)?;
        }
        let q = rope.forward_tensor(&q, positions)?;
        let k = rope.forward_tensor(&k, positions)?.reshape((n, kv_out))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(runs.len());
        for run in runs {
            let rows = run.rows.len();
            let cache = &mut caches[run.cache];
            cache.write_layer(
                layer,
                &k.narrow(0, run.rows.start, rows)?,
                &v.narrow(0, run.rows.start, rows)?,
            )?;
            let total = run.start_pos + rows;
            let (kc, vc) = cache.layer_prefix(layer, total)?;
            // (T, kvh, hd) -> (kvh, T, hd) -> repeat groups -> (h, T, hd)
            let expand = |t: Tensor| -> Result<Tensor> {
                t.reshape((total, kvh, hd))?
                    .transpose(0, 1)?
                    .unsqueeze(1)?
                    .expand((kvh, h / kvh, total, hd))?
                    .reshape((h, total, hd))
            };
            let (kc, vc) = (expand(kc)?, expand(vc)?);
            let qs = q
                .narrow(0, run.rows.start, rows)?
                .transpose(0, 1)?
                .contiguous()?; // (h, n, hd)
            let mut scores = (qs.matmul(&kc.t()?)? * scale)?; // (h, n, T)
            if rows > 1 {
                scores = scores.broadcast_add(&causal_mask(rows, run.start_pos, qkv.device())?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&vc.contiguous()?)?; // (h, n, hd)
            outs.push(o.transpose(0, 1)?.reshape((rows, h * hd))?);
        }
        Tensor::cat(&outs, 0)
    }

    /// Attention on host slices: q/k norm, RoPE and the cache write per row,
    /// then each row against its sequence's cache; parallel when large.
    fn attend_host(
        &self,
        qkv: &Tensor,
        layer: usize,
        runs: &[SeqRun],
        caches: &mut [KvCache],
        rope: &Rope,
    ) -> Result<Tensor> {
        let (n, width) = qkv.dims2()?;
        let (q_out, kv_out) = (self.q_out(), self.kv_out());
        let mut q = vec![0f32; n * q_out];
        let mut out = vec![0f32; n * q_out];
        with_host_f32(qkv, |qkv| {
            // 1. Normalise and rotate q and k, append k and v to the caches.
            let mut slots: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
            let mut kv: Vec<(&[f32], &[f32])> = Vec::with_capacity(runs.len());
            for run in runs {
                let cache = slots[run.cache]
                    .take()
                    .ok_or_else(|| candle_core::Error::Msg("a cache is used twice".into()))?;
                let (kc, vc) = cache.host_layer_mut(layer)?;
                for (t, row) in run.rows.clone().enumerate() {
                    let pos = run.start_pos + t;
                    let src = &qkv[row * width..(row + 1) * width];
                    let qr = &mut q[row * q_out..(row + 1) * q_out];
                    let kr = &mut kc[pos * kv_out..(pos + 1) * kv_out];
                    match (&self.q_norm, &self.k_norm) {
                        (Some(qn), Some(kn)) => {
                            qn.row(&src[..q_out], qr);
                            kn.row(&src[q_out..q_out + kv_out], kr);
                        }
                        _ => {
                            qr.copy_from_slice(&src[..q_out]);
                            kr.copy_from_slice(&src[q_out..q_out + kv_out]);
                        }
                    }
                    rope.row(qr, pos);
                    rope.row(kr, pos);
                    vc[pos * kv_out..(pos + 1) * kv_out].copy_from_slice(&src[q_out + kv_out..]);
                }
                kv.push((kc, vc));
            }
            // 2. Attention: tasks of a few rows each, over disjoint output rows.
            let mut tasks = Vec::new();
            let mut out_rest = out.as_mut_slice();
            let mut work = 0usize;
            for (run, &(kc, vc)) in runs.iter().zip(&kv) {
                let mut start = run.rows.start;
                while start < run.rows.end {
                    let end = (start + ROWS_PER_TASK).min(run.rows.end);
                    let (mine, rest) =
                        std::mem::take(&mut out_rest).split_at_mut((end - start) * q_out);
                    out_rest = rest;
                    let first_pos = run.start_pos + (start - run.rows.start);
                    work += (end - start) * (first_pos + end - start) * q_out;
                    tasks.push((&q[start * q_out..end * q_out], kc, vc, mine, first_pos));
                    start = end;
                }
            }
            let dims = HeadDims {
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            };
            let run_task =
                |(qs, kc, vc, outs, first_pos): (&[f32], &[f32], &[f32], &mut [f32], usize)| {
                    let mut scores = Vec::with_capacity(first_pos + ROWS_PER_TASK);
                    for (t, (qr, or)) in qs
                        .chunks_exact(q_out)
                        .zip(outs.chunks_exact_mut(q_out))
                        .enumerate()
                    {
                        attend_row(dims, qr, kc, vc, first_pos + t + 1, or, &mut scores);
                    }
                };
            if work >= PARALLEL_MIN_WORK && tasks.len() > 1 {
                tasks.into_par_iter().for_each(run_task);
            } else {
                tasks.into_iter().for_each(run_task);
            }
            Ok(())
        })?;
        Tensor::from_vec(out, (n, q_out), qkv.device())
    }
}

/// The head layout the host kernel needs.
#[derive(Debug, Clone, Copy)]
struct HeadDims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One query row (all heads, `[heads · head_dim]`) against the first `ctx`
/// cached positions; uses the copy compiled for AVX2+FMA when the CPU has it.
#[inline]
fn attend_row(
    dims: HeadDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ctx: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(lanes) = Avx2Fma::detect() {
        // SAFETY: `lanes` proves the CPU has the features the copy is compiled for.
        return unsafe { attend_row_avx2(lanes, dims, q, k, v, ctx, out, scores) };
    }
    attend_row_body(Portable, dims, q, k, v, ctx, out, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_row_avx2(
    lanes: Avx2Fma,
    dims: HeadDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ctx: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    attend_row_body(lanes, dims, q, k, v, ctx, out, scores)
}

/// Streams the cache once for scores (every head per key row) and once for
/// the weighted sum, so K and V are read contiguously.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_row_body<L: Lanes>(
    lanes: L,
    dims: HeadDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ctx: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (heads, hd) = (dims.heads, dims.head_dim);
    let kv_out = dims.kv_heads * hd;
    let group = heads / dims.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // scores[h · ctx + j] = q_h · k_j / √hd
    scores.clear();
    scores.resize(heads * ctx, 0.0);
    for (j, kj) in k[..ctx * kv_out].chunks_exact(kv_out).enumerate() {
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            let off = (h / group) * hd;
            scores[h * ctx + j] = lanes.dot(qh, &kj[off..off + hd]) * scale;
        }
    }
    for row in scores.chunks_exact_mut(ctx) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = lanes.exp_shifted(row, max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    out.fill(0.0);
    for (j, vj) in v[..ctx * kv_out].chunks_exact(kv_out).enumerate() {
        for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
            let off = (h / group) * hd;
            lanes.axpy(oh, scores[h * ctx + j], &vj[off..off + hd]);
        }
    }
}

/// `[rows, start + rows]` additive mask: row i sees positions `0..=start + i`.
fn causal_mask(rows: usize, start: usize, device: &candle_core::Device) -> Result<Tensor> {
    let total = start + rows;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (rows, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable copy and the AVX2 copy (where the CPU has it) compute the
    /// same attention row, and it matches a naive softmax-weighted sum.
    #[test]
    fn host_attention_row_matches_naive() {
        let dims = HeadDims {
            heads: 4,
            kv_heads: 2,
            head_dim: 20, // not a multiple of 8: exercises the tails
        };
        let (q_out, kv_out, ctx) = (80, 40, 13);
        let val = |i: usize| ((i * 7919 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..q_out).map(val).collect();
        let k: Vec<f32> = (0..ctx * kv_out).map(|i| val(i + 3)).collect();
        let v: Vec<f32> = (0..ctx * kv_out).map(|i| val(i + 11)).collect();
        let mut expect = vec![0f32; q_out];
        for h in 0..4 {
            let off = (h / 2) * 20;
            let s: Vec<f32> = (0..ctx)
                .map(|j| {
                    (0..20)
                        .map(|i| q[h * 20 + i] * k[j * kv_out + off + i])
                        .sum::<f32>()
                        / 20f32.sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for (j, x) in s.iter().enumerate() {
                for i in 0..20 {
                    expect[h * 20 + i] += (x - m).exp() / z * v[j * kv_out + off + i];
                }
            }
        }
        let mut scores = Vec::new();
        let mut portable = vec![0f32; q_out];
        attend_row_body(Portable, dims, &q, &k, &v, ctx, &mut portable, &mut scores);
        let mut dispatched = vec![0f32; q_out];
        attend_row(dims, &q, &k, &v, ctx, &mut dispatched, &mut scores);
        for ((a, b), e) in portable.iter().zip(&dispatched).zip(&expect) {
            assert!((a - e).abs() < 1e-5 && (b - e).abs() < 1e-5, "{a} {b} {e}");
        }
    }
}
