//! The checkpoint's tensors: the list a config implies (names and shapes as
//! Hugging Face's Chameleon writes them), opening and checking a model
//! directory's safetensors against that list, and random initialisation.
//!
//! The list in [`expected_tensors`] is the single source of truth: loading
//! checks every entry before building anything (so a bad file is reported
//! by tensor and file, not by a shape error deep inside a layer), and the
//! random-model writer produces exactly these entries.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::Config;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// What a tensor is, which decides its random initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Embedding,
    /// A projection weight `[out, in]`.
    Linear {
        fan_in: usize,
    },
    Bias,
    /// An RMSNorm scale.
    Norm,
    /// A query/key layer-norm weight `[heads, head_dim]`.
    HeadNormWeight,
    HeadNormBias,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

/// Every tensor the decoder reads, in checkpoint order.
pub fn expected_tensors(cfg: &Config) -> Vec<TensorSpec> {
    let (d, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut out = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, role| out.push(TensorSpec { name, shape, role });
    push(
        "model.embed_tokens.weight".into(),
        vec![v, d],
        TensorRole::Embedding,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        push(
            format!("{p}.input_layernorm.weight"),
            vec![d],
            TensorRole::Norm,
        );
        let attn = [
            ("q_proj", heads * hd, d),
            ("k_proj", kv_heads * hd, d),
            ("v_proj", kv_heads * hd, d),
            ("o_proj", d, heads * hd),
        ];
        for (name, o, inp) in attn {
            push(
                format!("{p}.self_attn.{name}.weight"),
                vec![o, inp],
                TensorRole::Linear { fan_in: inp },
            );
            if cfg.attention_bias {
                push(
                    format!("{p}.self_attn.{name}.bias"),
                    vec![o],
                    TensorRole::Bias,
                );
            }
        }
        if cfg.qk_layernorm {
            for (name, h) in [("q_norm", heads), ("k_norm", kv_heads)] {
                push(
                    format!("{p}.self_attn.{name}.weight"),
                    vec![h, hd],
                    TensorRole::HeadNormWeight,
                );
                push(
                    format!("{p}.self_attn.{name}.bias"),
                    vec![h, hd],
                    TensorRole::HeadNormBias,
                );
            }
        }
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            TensorRole::Norm,
        );
        for (name, o, inp) in [
            ("gate_proj", inter, d),
            ("up_proj", inter, d),
            ("down_proj", d, inter),
        ] {
            push(
                format!("{p}.mlp.{name}.weight"),
                vec![o, inp],
                TensorRole::Linear { fan_in: inp },
            );
            if cfg.mlp_bias {
                push(format!("{p}.mlp.{name}.bias"), vec![o], TensorRole::Bias);
            }
        }
    }
    push("model.norm.weight".into(), vec![d], TensorRole::Norm);
    if !cfg.tie_word_embeddings {
        push(
            "lm_head.weight".into(),
            vec![v, d],
            TensorRole::Linear { fan_in: d },
        );
    }
    out
}

/// Opens a model directory's weights (one `model.safetensors`, or the shards
/// a `model.safetensors.index.json` names), memory-mapped, and checks every
/// tensor the config needs: present, the right shape, a float dtype.
pub fn open_checked(dir: &Path, cfg: &Config) -> Result<MmapedSafetensors> {
    let index_path = dir.join(SHARD_INDEX);
    let single = dir.join(SINGLE_FILE);
    // name -> file holding it; None = the single file holds everything.
    let (files, routing): (Vec<PathBuf>, Option<HashMap<String, PathBuf>>) = if index_path.exists()
    {
        let routing = read_index(&index_path, dir)?;
        let mut files: Vec<PathBuf> = routing.values().cloned().collect();
        files.sort();
        files.dedup();
        (files, Some(routing))
    } else if single.exists() {
        (vec![single.clone()], None)
    } else {
        bail!("{}: no {SINGLE_FILE} and no {SHARD_INDEX}", dir.display());
    };
    for f in &files {
        // Opening each file alone names the one that is broken.
        // SAFETY: the file is mapped read-only; we do not modify it while mapped.
        unsafe { MmapedSafetensors::new(f) }
            .with_context(|| format!("{}: not a readable safetensors file", f.display()))?;
    }
    // SAFETY: as above.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .with_context(|| format!("{}: cannot map the weight files", dir.display()))?;
    for spec in expected_tensors(cfg) {
        let file = match &routing {
            None => &single,
            Some(r) => r.get(&spec.name).with_context(|| {
                format!(
                    "{}: names no file for tensor {}",
                    index_path.display(),
                    spec.name
                )
            })?,
        };
        let view = st
            .get(&spec.name)
            .map_err(|_| anyhow::anyhow!("{}: tensor {} is missing", file.display(), spec.name))?;
        if view.shape() != spec.shape.as_slice() {
            bail!(
                "{}: tensor {} has shape {:?}, expected {:?}",
                file.display(),
                spec.name,
                view.shape(),
                spec.shape
            );
        }
        use safetensors::Dtype;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            bail!(
                "{}: tensor {} has dtype {:?}; expected f32, f16 or bf16",
                file.display(),
                spec.name,
                view.dtype()
            );
        }
    }
    Ok(st)
}

/// The `weight_map` of a shard index, with file names resolved inside `dir`.
fn read_index(path: &Path, dir: &Path) -> Result<HashMap<String, PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a shard index", path.display()))?;
    let mut out = HashMap::with_capacity(index.weight_map.len());
    for (name, file) in index.weight_map {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            bail!(
                "{}: shard file {file:?} is not a plain file name",
                path.display()
            );
        }
        out.insert(name, dir.join(file));
    }
    Ok(out)
}

/// Deterministic random weights for `cfg`: projections `N(0, 1/√in)` so
/// activations stay O(1), norm scales near 1, small biases.
pub fn random_weights(cfg: &Config, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = cfg.hidden_size as f32;
    let embed_std = if cfg.tie_word_embeddings {
        1.0 / d.sqrt()
    } else {
        1.0
    };
    expected_tensors(cfg)
        .into_iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let (mean, std) = match spec.role {
                TensorRole::Embedding => (0.0, embed_std),
                TensorRole::Linear { fan_in } => (0.0, 1.0 / (fan_in as f32).sqrt()),
                TensorRole::Bias | TensorRole::HeadNormBias => (0.0, 0.02),
                TensorRole::Norm | TensorRole::HeadNormWeight => (1.0, 0.1),
            };
            let values: Vec<f32> = (0..n).map(|_| mean + std * normal(&mut rng)).collect();
            let t = Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?;
            Ok((spec.name, t))
        })
        .collect()
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Writes named tensors to one safetensors file.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("{}: cannot write safetensors", path.display()))
}

/// Writes a random-initialised model directory: `config.json` and
/// `model.safetensors`.
pub fn write_random_model(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    cfg.validate()
        .context("refusing to write a random model for an invalid config")?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    cfg.to_file(&dir.join("config.json"))?;
    save_safetensors(&dir.join(SINGLE_FILE), &random_weights(cfg, seed)?)
}
