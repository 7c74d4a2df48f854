//! LoRA adapters in PEFT's on-disk format: a folder holding
//! `adapter_config.json` and `adapter_model.safetensors`, with keys like
//! `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`). molora's metadata (which modality or
//! semantic domain the adapter serves) sits under the `"molora"` key of the
//! config, which PEFT ignores.
//!
//! Invariants of a [`LoraAdapter`] built by [`LoraAdapter::load`] or
//! [`LoraAdapter::random`]:
//! - every targeted (layer, projection) has both A (`[r, in]`) and B
//!   (`[out, r]`), in f32, with shapes that match the model and finite values;
//! - there are no weights for modules or layers the config does not target.
//!
//! Loading never panics on bad files: each problem is an error naming the file
//! (and the tensor, where there is one) and what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use super::{AdapterRole, Projection};
use crate::model::config::Config;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT prefixes every key with the wrapper path of the base model.
const KEY_PREFIX: &str = "base_model.model.";

mod config;

use config::known_modules;
pub use config::AdapterConfig;

/// One module's low-rank pair: the update is `x·Aᵀ·Bᵀ·scale`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub name: String,
    pub config: AdapterConfig,
    pub weights: BTreeMap<(usize, Projection), LoraPair>,
}

/// Which half of a pair a safetensors key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Half {
    A,
    B,
}

/// The PEFT key of one half of a pair.
fn peft_key(layer: usize, proj: Projection, half: Half) -> String {
    let suffix = match half {
        Half::A => "lora_A",
        Half::B => "lora_B",
    };
    format!("{KEY_PREFIX}{}.{suffix}.weight", proj.module_path(layer))
}

/// `(layer, projection, half)` of a PEFT key; the message says what is wrong.
fn parse_key(key: &str) -> std::result::Result<(usize, Projection, Half), String> {
    let body = key.strip_prefix(KEY_PREFIX).and_then(|k| {
        k.strip_suffix(".lora_A.weight")
            .map(|m| (m, Half::A))
            .or_else(|| k.strip_suffix(".lora_B.weight").map(|m| (m, Half::B)))
    });
    let Some((module, half)) = body else {
        return Err(format!(
            "tensor {key:?} is not a LoRA weight (expected \
             {KEY_PREFIX}model.layers.<i>.<self_attn|mlp>.<module>.lora_A.weight or .lora_B.weight)"
        ));
    };
    let parts: Vec<&str> = module.split('.').collect();
    let (layer, name) = match parts.as_slice() {
        ["model", "layers", layer, _block, name] => (*layer, *name),
        _ => {
            return Err(format!(
                "tensor {key:?}: unknown target module {module:?} (known: {} inside \
                 model.layers.<i>)",
                known_modules()
            ))
        }
    };
    let proj = Projection::from_module_name(name).ok_or_else(|| {
        format!(
            "tensor {key:?}: unknown target module {name:?} (known: {})",
            known_modules()
        )
    })?;
    let layer: usize = layer
        .parse()
        .map_err(|_| format!("tensor {key:?}: layer index {layer:?} is not a number"))?;
    if proj.module_path(layer) != module {
        return Err(format!(
            "tensor {key:?}: module {name} lives at {}, not {module}",
            proj.module_path(layer)
        ));
    }
    Ok((layer, proj, half))
}

impl LoraAdapter {
    /// Scale applied to `x·Aᵀ·Bᵀ` (see [`AdapterConfig::scale`]).
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    pub fn rank(&self) -> usize {
        self.config.r
    }

    pub fn role(&self) -> &AdapterRole {
        &self.config.molora
    }

    /// Reads an adapter folder, validating it against the model; converts
    /// f16/bf16/f64 weights to f32. The adapter is named after the folder.
    pub fn load(dir: &Path, model_cfg: &Config, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let config = AdapterConfig::from_file(&cfg_path)?;
        let n_layers = model_cfg.num_hidden_layers;
        if let Some(&l) = config.layers(n_layers).iter().find(|&&l| l >= n_layers) {
            bail!(
                "{}: layers_to_transform lists layer {l}, beyond the model's {n_layers} layers \
                 (num_hidden_layers)",
                cfg_path.display()
            );
        }

        let st_path = dir.join(WEIGHTS_FILE);
        let file = st_path.display();
        let bytes = std::fs::read(&st_path)
            .map_err(|e| anyhow!("{file}: cannot read adapter weights: {e}"))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!("{file}: not a valid safetensors file (truncated or corrupt): {e}")
        })?;

        let layers = config.layers(n_layers);
        let mut halves: HashMap<(usize, Projection, Half), Tensor> = HashMap::new();
        for (key, view) in tensors.tensors() {
            let (layer, proj, half) = parse_key(&key).map_err(|e| anyhow!("{file}: {e}"))?;
            if !config.target_modules.contains(&proj) {
                bail!(
                    "{file}: tensor {key:?}: module {} is not in target_modules of {CONFIG_FILE}",
                    proj.module_name()
                );
            }
            if layer >= n_layers {
                bail!(
                    "{file}: tensor {key:?}: layer {layer} is beyond the model's {n_layers} \
                     layers (num_hidden_layers)"
                );
            }
            if !layers.contains(&layer) {
                bail!("{file}: tensor {key:?}: layer {layer} is not in layers_to_transform");
            }
            if !matches!(
                view.dtype(),
                StDtype::F16 | StDtype::BF16 | StDtype::F32 | StDtype::F64
            ) {
                bail!(
                    "{file}: tensor {key:?} has dtype {:?}; LoRA weights must be floats",
                    view.dtype()
                );
            }
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| anyhow!("{file}: tensor {key:?} cannot be read: {e}"))?;
            check_shape(&t, &key, proj, half, config.r, model_cfg)
                .map_err(|e| anyhow!("{file}: {e}"))?;
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                bail!("{file}: tensor {key:?} has non-finite values (e.g. {v})");
            }
            halves.insert((layer, proj, half), t);
        }

        let mut weights = BTreeMap::new();
        for &layer in &layers {
            for &proj in &config.target_modules {
                let mut take = |half| {
                    halves.remove(&(layer, proj, half)).ok_or_else(|| {
                        anyhow!(
                            "{file}: missing tensor {:?} for targeted module {} in layer {layer}",
                            peft_key(layer, proj, half),
                            proj.module_name()
                        )
                    })
                };
                let (a, b) = (take(Half::A)?, take(Half::B)?);
                let pair = LoraPair {
                    a: a.to_device(device)?,
                    b: b.to_device(device)?,
                };
                weights.insert((layer, proj), pair);
            }
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            name,
            config,
            weights,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32,
    /// PEFT keys, `{"format": "pt"}` metadata) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create adapter folder", dir.display()))?;
        let mut tensors = Vec::with_capacity(2 * self.weights.len());
        for (&(layer, proj), pair) in &self.weights {
            for (half, t) in [(Half::A, &pair.a), (Half::B, &pair.b)] {
                let t = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                tensors.push((peft_key(layer, proj, half), t));
            }
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let st_path = dir.join(WEIGHTS_FILE);
        let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| anyhow!("{}: cannot serialize: {e}", st_path.display()))?;
        write_atomic(&st_path, bytes.as_slice())?;
        write_atomic(&dir.join(CONFIG_FILE), self.config.to_json()?.as_bytes())
    }

    /// A random adapter, deterministic from `seed`: A ~ U(-1/√in, 1/√in) (PEFT's
    /// kaiming-uniform bound), B ~ N(0, 0.02²) or zero when `zero_b`.
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        name: &str,
        role: AdapterRole,
        model_cfg: &Config,
        r: usize,
        lora_alpha: f64,
        targets: &[Projection],
        seed: u64,
        zero_b: bool,
        device: &Device,
    ) -> Result<Self> {
        let config = AdapterConfig::new(role, r, lora_alpha, targets);
        config
            .validate()
            .with_context(|| format!("random adapter {name:?}"))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut weights = BTreeMap::new();
        for layer in 0..model_cfg.num_hidden_layers {
            for &proj in &config.target_modules {
                let (fan_in, fan_out) = proj.shape(model_cfg);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a: Vec<f32> = (0..r * fan_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let b: Vec<f32> = if zero_b {
                    vec![0.0; fan_out * r]
                } else {
                    (0..fan_out * r).map(|_| 0.02 * normal(&mut rng)).collect()
                };
                let pair = LoraPair {
                    a: Tensor::from_vec(a, (r, fan_in), device)?,
                    b: Tensor::from_vec(b, (fan_out, r), device)?,
                };
                weights.insert((layer, proj), pair);
            }
        }
        Ok(Self {
            name: name.to_string(),
            config,
            weights,
        })
    }
}

/// `[r, in]` for A, `[out, r]` for B; a rank that disagrees with the config
/// is reported as such.
fn check_shape(
    t: &Tensor,
    key: &str,
    proj: Projection,
    half: Half,
    r: usize,
    model_cfg: &Config,
) -> std::result::Result<(), String> {
    let (fan_in, fan_out) = proj.shape(model_cfg);
    let (expected, rank_dim, what) = match half {
        Half::A => ([r, fan_in], 0, "[r, in]"),
        Half::B => ([fan_out, r], 1, "[out, r]"),
    };
    let found = t.dims();
    if found == expected {
        return Ok(());
    }
    if found.len() == 2 && found[1 - rank_dim] == expected[1 - rank_dim] {
        return Err(format!(
            "tensor {key:?}: rank {} disagrees with r = {r} in {CONFIG_FILE} (shape {found:?})",
            found[rank_dim]
        ));
    }
    Err(format!(
        "tensor {key:?}: wrong shape: expected {what} = {expected:?} for this model's {}, \
         found {found:?}",
        proj.module_name()
    ))
}

/// A standard normal sample (Box-Muller; rand 0.9 has no normal distribution
/// without rand_distr).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln stays finite
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Writes through a temporary file so a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// The folder of adapter `name` inside `root`. Refuses names that could
/// reach outside `root` (empty, separators, `.`/`..`, absolute paths) and any
/// folder whose canonical path leaves `root` (e.g. through a symlink).
pub fn resolve_adapter_dir(root: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        bail!("adapter name is empty");
    }
    if Path::new(name).is_absolute() {
        bail!("adapter name {name:?} is an absolute path; give a folder name inside the adapter folder");
    }
    if name.contains(['/', '\\']) {
        bail!("adapter name {name:?} contains a path separator");
    }
    if name == "." || name == ".." {
        bail!("adapter name {name:?} is a relative path component");
    }
    if name.contains('\0') {
        bail!("adapter name {name:?} contains a NUL character");
    }
    let root_canon = root
        .canonicalize()
        .map_err(|e| anyhow!("{}: cannot open adapter folder: {e}", root.display()))?;
    let dir = root.join(name);
    let canon = dir
        .canonicalize()
        .map_err(|e| anyhow!("adapter {name:?} not found in {}: {e}", root.display()))?;
    if !canon.starts_with(&root_canon) {
        bail!(
            "adapter {name:?} resolves to {}, outside the adapter folder {}",
            canon.display(),
            root_canon.display()
        );
    }
    if !canon.is_dir() {
        bail!("adapter {name:?} in {} is not a folder", root.display());
    }
    Ok(canon)
}
