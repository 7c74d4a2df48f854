//! `molora convert-vqgan`: a taming-transformers VQGAN state dict exported
//! to safetensors -> the `vqgan.safetensors` a model directory holds.
//!
//! molora's VQ model asks for taming's own names (`encoder.down.0.block.0.
//! conv1.weight`, `quantize.embedding.weight`, ...), so converting is:
//! strip the prefix the export carries (`first_stage_model.` in taming's
//! transformer checkpoints, `model.vqmodel.` in transformers' Chameleon),
//! drop what the VQ model does not use (the GAN loss under `loss.*`),
//! convert to f32, and prove the result loads by building the model from it.
//!
//! Invariants: nothing is written unless the whole model builds from the
//! input with the chosen config; the output holds exactly the tensors the
//! model reads; when the output folder is a model directory, the codebook
//! must match its image-code range and its image grid.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::engine::images::VQ_WEIGHTS_FILE;
use crate::model::config::Config;
use crate::model::config_compat;
use crate::model::vq::checkpoint::CheckedTensors;
use crate::model::vq::{VqConfig, VqModel};

/// Config file written beside the weights when the output folder is not a
/// model directory (Chameleon's `vq_config` names).
pub const VQ_CONFIG_FILE: &str = "vq_config.json";
/// The tensor every taming VQGAN has; its prefix is the export's prefix.
const CODEBOOK: &str = "quantize.embedding.weight";
/// Top-level modules of taming's VQModel that inference reads.
const MODULES: [&str; 5] = [
    "encoder.",
    "decoder.",
    "quantize.",
    "quant_conv.",
    "post_quant_conv.",
];

/// What a conversion did, printed by the command.
#[derive(Debug, Clone)]
pub struct ConversionReport {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Prefix stripped from every kept name ("" when the names were taming's).
    pub prefix: String,
    pub kept: usize,
    pub parameters: usize,
    /// Source dtype -> number of kept tensors converted from it to f32.
    pub converted: BTreeMap<String, usize>,
    /// Group (first name component) -> tensors dropped as unused.
    pub dropped: BTreeMap<String, usize>,
    pub config_source: String,
    pub config: VqConfig,
    /// What was checked against the model directory, if the output is one.
    pub model_check: Option<String>,
    /// Config file written or updated.
    pub config_written: PathBuf,
}

impl fmt::Display for ConversionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "converted {} -> {}",
            self.input.display(),
            self.output.display()
        )?;
        match self.prefix.as_str() {
            "" => writeln!(f, "  names: taming's, kept as they are")?,
            p => writeln!(f, "  names: taming's after stripping the prefix {p:?}")?,
        }
        writeln!(
            f,
            "  kept {} tensors ({} parameters), all f32",
            self.kept, self.parameters
        )?;
        for (dtype, n) in &self.converted {
            writeln!(f, "  converted {n} tensors from {dtype} to f32")?;
        }
        if !self.dropped.is_empty() {
            let groups: Vec<String> = self
                .dropped
                .iter()
                .map(|(g, n)| format!("{g}* ({n})"))
                .collect();
            writeln!(
                f,
                "  dropped (unused by the VQ model): {}",
                groups.join(", ")
            )?;
        }
        writeln!(
            f,
            "  config ({}): codebook {} x {}, {}x{} codes per {}x{} image",
            self.config_source,
            c.num_embeddings,
            c.embed_dim,
            c.grid_size(),
            c.grid_size(),
            c.resolution,
            c.resolution
        )?;
        if let Some(check) = &self.model_check {
            writeln!(f, "  model: {check}")?;
        }
        write!(f, "  config written to {}", self.config_written.display())
    }
}

/// A VarBuilder backend that records which tensors the model asked for.
struct Recording {
    inner: CheckedTensors,
    asked: Arc<Mutex<Vec<String>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        if let Ok(mut asked) = self.asked.lock() {
            asked.push(name.to_string());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Reads a VQ config from JSON: Chameleon's `vq_config` object, a flat
/// taming config, or a taming YAML converted to JSON
/// (`model.params.{ddconfig, n_embed, embed_dim}`).
pub fn vq_config_from_json(value: &Value) -> Result<VqConfig> {
    let mut v = value.clone();
    for key in ["model", "params"] {
        if let Some(inner) = v.get(key).filter(|x| x.is_object()).cloned() {
            v = inner;
        }
    }
    if let Some(dd) = v.get("ddconfig").filter(|x| x.is_object()).cloned() {
        let mut flat = dd;
        for key in ["n_embed", "embed_dim"] {
            if let (Some(x), Some(obj)) = (v.get(key).cloned(), flat.as_object_mut()) {
                obj.insert(key.into(), x);
            }
        }
        v = flat;
    }
    VqConfig::from_value(&v)
}

/// The config to convert with: `--config` when given, else the `vq_config`
/// of the output model directory.
fn choose_config(config: Option<&Path>, out_cfg: Option<&Value>) -> Result<(VqConfig, String)> {
    let in_model = out_cfg
        .and_then(|c| c.get("vq_config"))
        .filter(|v| !v.is_null());
    match (config, in_model) {
        (Some(path), model) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the VQ config", path.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            let cfg = vq_config_from_json(&value)
                .with_context(|| format!("{}: not a VQ config", path.display()))?;
            if let Some(m) = model {
                let theirs =
                    VqConfig::from_value(m).context("vq_config of the model's config.json")?;
                if theirs != cfg {
                    bail!(
                        "{} describes another VQ model than the vq_config of the output's config.json; \
                         convert into another folder or fix one of them",
                        path.display()
                    );
                }
            }
            Ok((cfg, format!("--config {}", path.display())))
        }
        (None, Some(m)) => Ok((
            VqConfig::from_value(m).context("vq_config of the output's config.json")?,
            "vq_config of the output's config.json".into(),
        )),
        (None, None) => bail!(
            "no VQ config: give --config (Chameleon's vq_config, a taming config as JSON) or \
             convert into a model directory whose config.json has a vq_config"
        ),
    }
}

/// The prefix before `quantize.embedding.weight` (the one tensor every
/// taming VQGAN has).
fn find_prefix(names: &[&String], input: &Path) -> Result<String> {
    let mut prefixes: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(CODEBOOK))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    match prefixes.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!(
            "{}: no tensor named *{CODEBOOK}: not a taming VQGAN state dict (expected names like \
             encoder.conv_in.weight, {CODEBOOK}, decoder.conv_out.weight)",
            input.display()
        ),
        many => bail!(
            "{}: several VQ models in one file (prefixes {many:?}); export one",
            input.display()
        ),
    }
}

/// Converts `input` into `out_dir/vqgan.safetensors`; see the module doc.
pub fn convert_vqgan(
    input: &Path,
    out_dir: &Path,
    config: Option<&Path>,
) -> Result<ConversionReport> {
    let device = Device::Cpu;
    let tensors = candle_core::safetensors::load(input, &device)
        .with_context(|| format!("{}: not a readable safetensors file", input.display()))?;
    let names: Vec<&String> = tensors.keys().collect();
    let prefix = find_prefix(&names, input)?;

    let model_cfg_path = out_dir.join("config.json");
    let out_cfg: Option<Value> = if model_cfg_path.exists() {
        let text = std::fs::read_to_string(&model_cfg_path)
            .with_context(|| format!("{}: cannot read", model_cfg_path.display()))?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", model_cfg_path.display()))?,
        )
    } else {
        None
    };
    let (vq_cfg, config_source) = choose_config(config, out_cfg.as_ref())?;

    let mut kept = HashMap::new();
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut converted: BTreeMap<String, usize> = BTreeMap::new();
    for (name, t) in tensors {
        match name.strip_prefix(prefix.as_str()) {
            Some(rest) if MODULES.iter().any(|m| rest.starts_with(m)) => {
                if t.dtype() != DType::F32 {
                    *converted.entry(format!("{:?}", t.dtype())).or_default() += 1;
                }
                kept.insert(rest.to_string(), t.to_dtype(DType::F32)?);
            }
            _ => {
                let group = name.split('.').next().unwrap_or("").to_string() + ".";
                *dropped.entry(group).or_default() += 1;
            }
        }
    }
    if !kept.keys().any(|k| k.starts_with("decoder.")) {
        bail!(
            "{}: holds no decoder.* tensors (transformers' Chameleon checkpoints carry only the VQ \
             encoder): convert the original taming VQGAN checkpoint, which has both halves",
            input.display()
        );
    }

    // Build the model from the tensors: every missing or misshapen tensor is
    // named here, before anything is written.
    let asked = Arc::new(Mutex::new(Vec::new()));
    let backend = Recording {
        inner: CheckedTensors::from_tensors(kept.clone(), ""),
        asked: asked.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    VqModel::new(&vq_cfg, vb).with_context(|| {
        format!(
            "{}: does not fit the VQ config ({config_source})",
            input.display()
        )
    })?;
    let asked: Vec<String> = asked.lock().map_err(|_| anyhow!("lock poisoned"))?.clone();
    let used: HashMap<String, Tensor> = asked
        .iter()
        .filter_map(|n| kept.get(n).map(|t| (n.clone(), t.clone())))
        .collect();
    for name in kept.keys().filter(|k| !used.contains_key(*k)) {
        let group = name.split('.').take(2).collect::<Vec<_>>().join(".") + ".";
        *dropped.entry(format!("{prefix}{group}")).or_default() += 1;
    }

    let model_check = match &out_cfg {
        Some(_) => Some(check_model_dir(&model_cfg_path, &vq_cfg)?),
        None => None,
    };

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let output = out_dir.join(VQ_WEIGHTS_FILE);
    let tmp = output.with_extension("tmp");
    candle_core::safetensors::save(&used, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &output)
        .with_context(|| format!("{}: cannot write", output.display()))?;
    let config_written = write_config(out_dir, out_cfg, &vq_cfg)?;

    Ok(ConversionReport {
        input: input.to_path_buf(),
        output,
        prefix,
        kept: used.len(),
        parameters: used.values().map(|t| t.elem_count()).sum(),
        converted,
        dropped,
        config_source,
        config: vq_cfg,
        model_check,
        config_written,
    })
}

/// The converted VQ model against the model directory's vocabulary: one
/// code per image token id, and the same image grid.
fn check_model_dir(model_cfg_path: &Path, vq: &VqConfig) -> Result<String> {
    let text = std::fs::read_to_string(model_cfg_path)?;
    let mut value: Value = serde_json::from_str(&text)?;
    config_compat::normalize_hf_fields(&mut value)?;
    if let Some(obj) = value.as_object_mut() {
        // Checked with the converted VQ model's config in place.
        obj.insert("vq_config".into(), serde_json::to_value(vq)?);
    }
    let cfg: Config = serde_json::from_value(value)
        .with_context(|| format!("{}: not a valid model config", model_cfg_path.display()))?;
    let vocab = cfg.vocab().with_context(|| {
        format!(
            "{}: the converted VQ model does not fit this model",
            model_cfg_path.display()
        )
    })?;
    Ok(format!(
        "codebook of {} matches the image-code range {:?} of {}; {} codes per image",
        vq.num_embeddings,
        vocab.image_range(),
        model_cfg_path.display(),
        vocab.tokens_per_image
    ))
}

/// Records the VQ config: in the model directory's config.json (keys it
/// already has are kept as they are) or in `vq_config.json`.
fn write_config(out_dir: &Path, out_cfg: Option<Value>, vq: &VqConfig) -> Result<PathBuf> {
    match out_cfg {
        Some(mut cfg) => {
            let path = out_dir.join("config.json");
            let has = cfg.get("vq_config").is_some_and(|v| !v.is_null());
            if !has {
                if let Some(obj) = cfg.as_object_mut() {
                    obj.insert("vq_config".into(), serde_json::to_value(vq)?);
                }
                std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)
                    .with_context(|| format!("{}: cannot write", path.display()))?;
            }
            Ok(path)
        }
        None => {
            let path = out_dir.join(VQ_CONFIG_FILE);
            std::fs::write(&path, vq.to_json_pretty()?)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            Ok(path)
        }
    }
}
