//! The unified-vocabulary decoder, Chameleon layout (as transformers'
//! `modeling_chameleon.py`): embedding -> L layers (RMSNorm, attention with
//! per-head q/k layer norm and RoPE, SwiGLU MLP; pre-norm, or "swin" post-norm
//! when `swin_norm`) -> final RMSNorm -> `lm_head`.
//!
//! One forward takes the new tokens of many sequences flattened into `[N, d]`
//! (prefill chunks and single decode tokens mixed). Projections run once
//! over all N rows through [`routed_linear`]; attention runs per sequence
//! against the sequence's own [`KvCache`], which the engine owns.
//!
//! Invariants:
//! - a sequence's rows sit at positions `cache.len()..cache.len() + rows`;
//! - the routing plan of a layer is computed once, from the layer's
//!   normalised input, and shared by all seven projections of the layer;
//! - with no [`LoraContext`] or an empty plan the forward is the plain model.

use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Error, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, SeqRun};
use super::config::Config;
use super::kv_cache::KvCache;
use super::mlp::Mlp;
use super::norms::{with_host_f32, KernelPath, RmsNorm, Rope};
use super::weights;
use crate::adapters::Projection;
use crate::dispatch::{routed_linear, LoraTarget, SlotWeights};
use crate::routing::plan::GroupedPlan;

/// One sequence's rows in a [`BatchInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index into the `caches` passed to [`Decoder::forward`].
    pub cache: usize,
    pub rows: Range<usize>,
}

/// The new tokens of many sequences flattened into N rows. The slices must
/// partition `0..tokens.len()`; each cache appears at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
}

impl BatchInput {
    /// Appends one sequence's new tokens, to be cached in `caches[cache]`.
    pub fn push(&mut self, cache: usize, tokens: &[u32]) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.seqs.push(SeqSlice {
            cache,
            rows: start..self.tokens.len(),
        });
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

/// Adapters for one forward; implemented by the router (crate::routing), by
/// tests, or absent.
pub trait LoraContext {
    /// Plan for this layer's projections, given the layer's normalised input
    /// `[N, d]` (the x that q/k/v read).
    fn layer_plan(&self, layer: usize, x: &Tensor) -> Result<Option<GroupedPlan>>;
    fn slot_weights(&self, layer: usize, proj: Projection) -> Option<&SlotWeights>;
}

/// The adapters of one layer in one forward: its plan, computed once.
pub(crate) struct LayerAdapters<'a> {
    lora: Option<&'a dyn LoraContext>,
    layer: usize,
    plan: Option<GroupedPlan>,
}

impl<'a> LayerAdapters<'a> {
    fn new(lora: Option<&'a dyn LoraContext>, layer: usize, x: &Tensor) -> Result<Self> {
        let plan = match lora {
            Some(l) => l.layer_plan(layer, x)?.filter(|p| !p.is_empty()),
            None => None,
        };
        Ok(Self { lora, layer, plan })
    }

    pub(crate) fn layer(&self) -> usize {
        self.layer
    }

    /// A (possibly fused) projection: `projs` names the HF projections inside
    /// `w` and where their output columns start.
    pub(crate) fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        projs: &[(Projection, usize)],
    ) -> Result<Tensor> {
        let targets: Vec<LoraTarget<'_>> = match (self.lora, &self.plan) {
            (Some(lora), Some(_)) => projs
                .iter()
                .filter_map(|&(p, out_offset)| {
                    lora.slot_weights(self.layer, p)
                        .map(|slots| LoraTarget { slots, out_offset })
                })
                .collect(),
            _ => Vec::new(),
        };
        let plan = self.plan.as_ref().filter(|_| !targets.is_empty());
        routed_linear(x, w, bias, &targets, plan)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
    swin_norm: bool,
}

/// What every layer of one forward shares.
pub(crate) struct ForwardCtx<'a> {
    pub(crate) runs: &'a [SeqRun],
    /// u32 `[N]`, used by the tensor-op path only.
    pub(crate) positions: &'a Tensor,
    pub(crate) rope: &'a Rope,
    pub(crate) lora: Option<&'a dyn LoraContext>,
    pub(crate) path: KernelPath,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let norm = |name: &str| {
            RmsNorm::new(
                vb.pp(name).get(cfg.hidden_size, "weight")?,
                cfg.rms_norm_eps,
            )
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_norm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            swin_norm: cfg.swin_norm,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [KvCache],
        ctx: &ForwardCtx<'_>,
    ) -> Result<Tensor> {
        let path = ctx.path;
        let attend = |xa: &Tensor, adapters: &LayerAdapters<'_>, caches: &mut [KvCache]| {
            self.attn.forward(xa, ctx, caches, adapters)
        };
        if self.swin_norm {
            // h = x + norm(attn(x)); out = h + norm(mlp(h))
            let adapters = LayerAdapters::new(ctx.lora, layer, x)?;
            let a = attend(x, &adapters, caches)?;
            let h = add(x, &self.input_norm.forward(&a, path)?, path)?;
            let m = self.mlp.forward(&h, &adapters, path)?;
            add(&h, &self.post_norm.forward(&m, path)?, path)
        } else {
            // h = x + attn(norm(x)); out = h + mlp(norm(h))
            let xn = self.input_norm.forward(x, path)?;
            let adapters = LayerAdapters::new(ctx.lora, layer, &xn)?;
            let h = add(x, &attend(&xn, &adapters, caches)?, path)?;
            let hn = self.post_norm.forward(&h, path)?;
            add(&h, &self.mlp.forward(&hn, &adapters, path)?, path)
        }
    }
}

/// Residual add.
fn add(a: &Tensor, b: &Tensor, path: KernelPath) -> Result<Tensor> {
    match path {
        KernelPath::TensorOps => a + b,
        KernelPath::HostSlices => {
            let mut out = with_host_f32(a, |a| Ok(a.to_vec()))?;
            with_host_f32(b, |b| {
                out.iter_mut().zip(b).for_each(|(o, &y)| *o += y);
                Ok(())
            })?;
            Tensor::from_vec(out, a.shape(), a.device())
        }
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: Config,
    device: Device,
    /// `[vocab, d]`
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, d]` (the embedding when tied).
    lm_head: Tensor,
    rope: Rope,
    path: KernelPath,
    weight_dtype: DType,
}

impl Decoder {
    /// Builds the decoder from checkpoint-named tensors (`model.*`, `lm_head.*`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| Error::Msg(format!("invalid model config: {e:#}")))?;
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let device = vb.device().clone();
        let vm = vb.pp("model");
        let embed = vm.pp("embed_tokens").get((v, d), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vm.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(vm.pp("norm").get(d, "weight")?, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.pp("lm_head").get((v, d), "weight")?
        };
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.max_position_embeddings,
            &device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            path: KernelPath::for_device(&device),
            device,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            weight_dtype: DType::F32,
        })
    }

    /// Loads a model directory: `config.json` plus `model.safetensors` or the
    /// shards of `model.safetensors.index.json`, memory-mapped, converted to f32.
    pub fn load(model_dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg = Config::from_file(&model_dir.join("config.json"))?;
        let tensors = weights::open_checked(model_dir, &cfg)?;
        let vb = VarBuilder::from_backend(Box::new(tensors), DType::F32, device.clone());
        Self::new(&cfg, vb)
            .with_context(|| format!("{}: cannot build the decoder", model_dir.display()))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn kernel_path(&self) -> KernelPath {
        self.path
    }

    /// Stores the projection weights (attention, MLP, lm_head) in `dtype`:
    /// `F16` halves the bytes every decode step reads (products still
    /// accumulate in f32, see `dispatch::half_weights`); `F32` is exact
    /// against the checkpoint. Embeddings, norms and adapters stay f32.
    pub fn set_weight_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(Error::Msg(format!(
                "weight dtype {dtype:?} is not supported; use f32 or f16"
            )));
        }
        for layer in &mut self.layers {
            layer.attn.set_weight_dtype(dtype)?;
            layer.mlp.set_weight_dtype(dtype)?;
        }
        self.lm_head = self.lm_head.to_dtype(dtype)?;
        self.weight_dtype = dtype;
        Ok(())
    }

    /// The dtype the projection weights are stored in.
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// Chooses the implementation of the non-projection ops (host slices
    /// need the CPU). Both compute the same function; tests compare them.
    pub fn set_kernel_path(&mut self, path: KernelPath) -> Result<()> {
        if path == KernelPath::HostSlices && !self.device.is_cpu() {
            return Err(Error::Msg("host-slice kernels need the CPU device".into()));
        }
        self.path = path;
        Ok(())
    }

    /// Runs the new tokens of a batch; returns the hidden states after the
    /// final norm, `[N, d]`, and appends each sequence's keys and values to
    /// its cache.
    pub fn forward(
        &self,
        batch: &BatchInput,
        caches: &mut [KvCache],
        lora: Option<&dyn LoraContext>,
    ) -> Result<Tensor> {
        let runs = self.resolve(batch, caches)?;
        let n = batch.tokens.len();
        if n == 0 {
            return Tensor::zeros((0, self.cfg.hidden_size), DType::F32, &self.device);
        }
        for run in &runs {
            caches[run.cache].reserve(run.rows.len())?;
        }
        let positions: Vec<u32> = runs
            .iter()
            .flat_map(|r| (r.start_pos..r.start_pos + r.rows.len()).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(positions, n, &self.device)?;
        let ctx = ForwardCtx {
            runs: &runs,
            positions: &positions,
            rope: &self.rope,
            lora,
            path: self.path,
        };
        let mut x = self.embed(&batch.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i, caches, &ctx)?;
        }
        for run in &runs {
            caches[run.cache].advance(run.rows.len());
        }
        self.norm.forward(&x, self.path)
    }

    /// `[M, d] -> [M, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        routed_linear(hidden, &self.lm_head, None, &[], None)
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        match self.path {
            KernelPath::TensorOps => {
                let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
                self.embed.index_select(&ids, 0)
            }
            KernelPath::HostSlices => {
                let mut out = Vec::with_capacity(tokens.len() * d);
                with_host_f32(&self.embed, |e| {
                    for &t in tokens {
                        out.extend_from_slice(&e[t as usize * d..(t as usize + 1) * d]);
                    }
                    Ok(())
                })?;
                Tensor::from_vec(out, (tokens.len(), d), &self.device)
            }
        }
    }

    /// Checks a batch against the caches and orders its sequences by row.
    fn resolve(&self, batch: &BatchInput, caches: &[KvCache]) -> Result<Vec<SeqRun>> {
        let bad = |msg: String| Err(Error::Msg(msg));
        let n = batch.tokens.len();
        if let Some((row, id)) = batch
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.cfg.vocab_size)
        {
            return bad(format!(
                "token id {id} at row {row} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            ));
        }
        let mut seen = vec![false; caches.len()];
        let mut runs = Vec::with_capacity(batch.seqs.len());
        for s in batch.seqs.iter().filter(|s| !s.rows.is_empty()) {
            let Some(cache) = caches.get(s.cache) else {
                return bad(format!(
                    "sequence rows {:?} name cache {} of {}",
                    s.rows,
                    s.cache,
                    caches.len()
                ));
            };
            if std::mem::replace(&mut seen[s.cache], true) {
                return bad(format!(
                    "cache {} is used by two sequences of one batch",
                    s.cache
                ));
            }
            if cache.num_layers() != self.layers.len() {
                return bad(format!(
                    "cache {} has {} layers, the model {}",
                    s.cache,
                    cache.num_layers(),
                    self.layers.len()
                ));
            }
            let end = cache.len() + s.rows.len();
            if end > self.rope.max_positions() {
                return bad(format!(
                    "sequence in cache {} would reach {end} tokens, beyond max_position_embeddings {}",
                    s.cache,
                    self.rope.max_positions()
                ));
            }
            runs.push(SeqRun {
                cache: s.cache,
                rows: s.rows.clone(),
                start_pos: cache.len(),
            });
        }
        runs.sort_by_key(|r| r.rows.start);
        let mut next = 0;
        for r in &runs {
            if r.rows.start != next {
                return bad(format!(
                    "sequence rows must partition 0..{n}; row {next} is not covered exactly once"
                ));
            }
            next = r.rows.end;
        }
        if next != n {
            return bad(format!(
                "sequence rows must partition 0..{n}; they end at {next}"
            ));
        }
        Ok(runs)
    }
}
