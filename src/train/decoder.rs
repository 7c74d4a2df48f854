//! The differentiable Chameleon decoder the training stages use: the same
//! function and the same weight names as [`crate::model::decoder::Decoder`]
//! (so a trained `model.safetensors` loads there), written only with candle
//! ops that have a backward pass (hand-written RMSNorm, per-head layer norm
//! and RoPE, `ops::softmax`, a log-softmax cross-entropy).
//!
//! Input is a packed batch ([`super::batch::PackedBatch`]): `B` rows of `T`
//! tokens, several sequences per row, each attending only to itself
//! (block-diagonal causal mask) with positions restarting at 0.
//!
//! LoRA: a [`Routing`] gives, per layer and from that layer's normalised
//! input, the adapters to add and a per-token weight for each (0 = not
//! applied), so modality masks, oracle domain masks and soft gate weights are
//! one mechanism. Invariants:
//! - with no adapters the forward is the plain model, equal to the
//!   inference decoder's to 1e-4 (a test holds it);
//! - tensors built from a `VarMap` are trained, tensors built from loaded
//!   files are constants (frozen).

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::batch::PackedBatch;
use super::fused;
use super::lora::TrainLora;
use crate::adapters::Projection;
use crate::model::config::Config;

/// Chameleon's per-head layer-norm epsilon (transformers' default).
pub(super) const HEAD_NORM_EPS: f64 = 1e-5;

/// Adapters of one layer: each with a per-token weight `[N, 1]`.
pub type LayerAdapters<'a> = Vec<(&'a TrainLora, Tensor)>;

/// Chooses the adapters of each layer from its normalised input `[N, d]`.
pub trait Routing {
    fn layer_adapters(&self, layer: usize, xn: &Tensor) -> Result<LayerAdapters<'_>>;
}

/// No adapters: the base model.
pub struct NoAdapters;

impl Routing for NoAdapters {
    fn layer_adapters(&self, _: usize, _: &Tensor) -> Result<LayerAdapters<'_>> {
        Ok(Vec::new())
    }
}

struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// `[heads, head_dim]` weight and bias of the query/key layer norms.
    q_norm: (Tensor, Tensor),
    k_norm: (Tensor, Tensor),
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

pub struct TrainDecoder {
    cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[max_positions, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
    /// Element-wise parts through [`super::fused`] (where usable).
    fused: bool,
}

/// `x·Wᵀ` for `x` `[N, in]`, `w` `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Layer norm over each head's `head_dim` (no affine), then the per-head
/// weight and bias: `x` `[N, heads, head_dim]`.
pub(super) fn head_norm(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + HEAD_NORM_EPS)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Non-interleaved RoPE ("rotate_half") on `x` `[N, heads, head_dim]` with
/// per-row `cos`/`sin` `[N, half]`.
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(2)? / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, b], 2)
}

impl TrainDecoder {
    /// Builds from checkpoint-named tensors (a `VarMap` builder trains them).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("invalid model config: {e:#}")))?;
        if cfg.swin_norm || cfg.attention_bias || cfg.mlp_bias || !cfg.qk_layernorm {
            return Err(candle_core::Error::Msg(
                "training supports the demo layout only: pre-norm, no biases, q/k layer norm"
                    .into(),
            ));
        }
        let (v, d, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let vm = vb.pp("model");
        let embed = vm.pp("embed_tokens").get((v, d), "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lb = vm.pp("layers").pp(l);
            let a = lb.pp("self_attn");
            let m = lb.pp("mlp");
            let w =
                |vb: &VarBuilder, name: &str, o: usize, i: usize| vb.pp(name).get((o, i), "weight");
            let hn = |name: &str, heads: usize| -> Result<(Tensor, Tensor)> {
                let vb = a.pp(name);
                Ok((vb.get((heads, hd), "weight")?, vb.get((heads, hd), "bias")?))
            };
            layers.push(Layer {
                input_norm: lb.pp("input_layernorm").get(d, "weight")?,
                q: w(&a, "q_proj", h * hd, d)?,
                k: w(&a, "k_proj", kvh * hd, d)?,
                v: w(&a, "v_proj", kvh * hd, d)?,
                o: w(&a, "o_proj", d, h * hd)?,
                q_norm: hn("q_norm", h)?,
                k_norm: hn("k_norm", kvh)?,
                post_norm: lb.pp("post_attention_layernorm").get(d, "weight")?,
                gate: w(&m, "gate_proj", i, d)?,
                up: w(&m, "up_proj", i, d)?,
                down: w(&m, "down_proj", d, i)?,
            });
        }
        let norm = vm.pp("norm").get(d, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.pp("lm_head").get((v, d), "weight")?
        };
        let (cos, sin) = rope_tables(hd, cfg.rope_theta, cfg.max_position_embeddings, vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            fused: false,
        })
    }

    /// Runs the norms, RoPE, the attention softmax and SiLU·up as the fused
    /// kernels of [`super::fused`] on f32 CPU tensors: the same function,
    /// fewer passes over memory, different float rounding.
    pub fn with_fused_ops(mut self, on: bool) -> Self {
        self.fused = on;
        self
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Hidden states after the final norm, `[B·T, d]`.
    pub fn hidden(&self, batch: &PackedBatch, routing: &dyn Routing) -> Result<Tensor> {
        let (b, t) = (batch.rows, batch.len);
        let n = b * t;
        let cfg = &self.cfg;
        let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps;
        let cos = self.cos.index_select(&batch.positions, 0)?;
        let sin = self.sin.index_select(&batch.positions, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed.index_select(&batch.ids, 0)?; // [N, d]
        let fused = self.fused && fused::usable(&x);
        let norm = |x: &Tensor, w: &Tensor| match fused {
            true => fused::rms_norm(x, w, eps),
            false => rms_norm(x, w, eps),
        };
        let norm_rope = |x: &Tensor, wb: &(Tensor, Tensor)| match fused {
            true => fused::head_norm_rope(x, &wb.0, &wb.1, &cos, &sin, HEAD_NORM_EPS),
            false => rope(&head_norm(x, wb)?, &cos, &sin),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            // 1. attention: h = x + o(attn(norm(x)))
            let xn = norm(&x, &layer.input_norm)?;
            let adapters = routing.layer_adapters(li, &xn)?;
            let proj = |x: &Tensor, w: &Tensor, p: Projection| project(x, w, p, li, &adapters);
            let q = proj(&xn, &layer.q, Projection::QProj)?.reshape((n, h, hd))?;
            let k = proj(&xn, &layer.k, Projection::KProj)?.reshape((n, kvh, hd))?;
            let v = proj(&xn, &layer.v, Projection::VProj)?.reshape((n, kvh, hd))?;
            let q = norm_rope(&q, &layer.q_norm)?;
            let k = norm_rope(&k, &layer.k_norm)?;
            // (N, heads, hd) -> (B, heads, T, hd); KV heads repeated per group.
            let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
            let expand = |z: Tensor| -> Result<Tensor> {
                z.reshape((b, t, kvh, hd))?
                    .transpose(1, 2)?
                    .unsqueeze(2)?
                    .expand((b, kvh, h / kvh, t, hd))?
                    .reshape((b, h, t, hd))
            };
            let (k, v) = (expand(k)?, expand(v)?);
            let scores = q.matmul(&k.t()?.contiguous()?)?;
            let probs = match fused {
                true => fused::masked_softmax(&scores, &batch.mask, scale)?,
                false => {
                    let scores = (scores * scale)?.broadcast_add(&batch.mask)?;
                    candle_nn::ops::softmax(&scores, D::Minus1)?
                }
            };
            let mixed = probs
                .matmul(&v.contiguous()?)? // (B, h, T, hd)
                .transpose(1, 2)?
                .reshape((n, h * hd))?;
            x = (x + proj(&mixed, &layer.o, Projection::OProj)?)?;
            // 2. MLP: out = h + down(silu(gate(norm(h))) · up(norm(h)))
            let hn = norm(&x, &layer.post_norm)?;
            let g = proj(&hn, &layer.gate, Projection::GateProj)?;
            let u = proj(&hn, &layer.up, Projection::UpProj)?;
            let act = match fused {
                true => fused::silu_mul(&g, &u)?,
                false => (candle_nn::ops::silu(&g)? * u)?,
            };
            x = (x + proj(&act, &layer.down, Projection::DownProj)?)?;
        }
        norm(&x, &self.norm)
    }

    /// `[B·T, vocab]`.
    pub fn logits(&self, batch: &PackedBatch, routing: &dyn Routing) -> Result<Tensor> {
        linear(&self.hidden(batch, routing)?, &self.lm_head)
    }

    /// Weighted mean cross-entropy of the batch's targets.
    pub fn loss(&self, batch: &PackedBatch, routing: &dyn Routing) -> Result<Tensor> {
        cross_entropy(&self.logits(batch, routing)?, batch)
    }
}

/// `Σ wᵢ·(−log p(targetᵢ)) / Σ wᵢ` over the rows of `logits` `[N, V]`.
pub fn cross_entropy(logits: &Tensor, batch: &PackedBatch) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&batch.targets.unsqueeze(1)?, 1)?;
    let nll = (log_z - picked)?.squeeze(1)?;
    let total = batch.weights.sum_all()?.to_scalar::<f32>()?.max(1e-6);
    (nll * &batch.weights)?.sum_all()? / total as f64
}

/// The base projection plus every adapter's weighted low-rank update.
fn project(
    x: &Tensor,
    w: &Tensor,
    p: Projection,
    layer: usize,
    adapters: &LayerAdapters<'_>,
) -> Result<Tensor> {
    let mut y = linear(x, w)?;
    for (lora, rows) in adapters {
        if let Some(delta) = lora.delta(layer, p, x)? {
            y = (y + delta.broadcast_mul(rows)?)?;
        }
    }
    Ok(y)
}

/// cos/sin of the rotary angles, computed in f32 as transformers does.
fn rope_tables(head_dim: usize, theta: f64, max: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(max * half);
    let mut sin = Vec::with_capacity(max * half);
    for p in 0..max {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (max, half), dev)?,
        Tensor::from_vec(sin, (max, half), dev)?,
    ))
}

/// Initial weights for training (seeded): projections N(0, 1/in), the
/// residual outputs (`o_proj`, `down_proj`) scaled by 1/√(2L) so the
/// residual stream starts O(1), embeddings N(0, 1), `lm_head` N(0, 1/d),
/// norm scales 1, head-norm biases 0.
pub fn init_tensors(cfg: &Config, seed: u64) -> Result<Vec<(String, Tensor)>> {
    use crate::model::weights::{expected_tensors, TensorRole};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let residual = 1.0 / (2.0 * cfg.num_hidden_layers as f32).sqrt();
    expected_tensors(cfg)
        .into_iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let std = match spec.role {
                TensorRole::Embedding => 1.0,
                TensorRole::Linear { fan_in } => {
                    let base = 1.0 / (fan_in as f32).sqrt();
                    if spec.name.ends_with("o_proj.weight")
                        || spec.name.ends_with("down_proj.weight")
                    {
                        base * residual
                    } else {
                        base
                    }
                }
                _ => 0.0,
            };
            let mean = match spec.role {
                TensorRole::Norm | TensorRole::HeadNormWeight => 1.0,
                _ => 0.0,
            };
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    // Box-Muller
                    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                    let u2: f32 = rng.random();
                    mean + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect();
            Ok((
                spec.name,
                Tensor::from_vec(values, spec.shape, &Device::Cpu)?,
            ))
        })
        .collect()
}

/// Sets every variable of `varmap` named in `tensors` (e.g. after creating
/// the variables through [`TrainDecoder::new`]).
pub fn set_vars(varmap: &candle_nn::VarMap, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, t) in tensors {
        let var = data
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no variable {name}"))?;
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
    }
    Ok(())
}
