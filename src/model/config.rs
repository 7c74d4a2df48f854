//! The model directory's `config.json`: Hugging Face's `ChameleonConfig` fields
//! as they are, plus molora's own `molora` object beside them (standard readers
//! ignore unknown keys).
//!
//! Every id range the rest of the code uses (the vocabulary-range router, the
//! sampler's masks, the tokenizer) comes from [`Config::vocab`], which is
//! resolved and validated here once. No other module repeats an id literal.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::config_compat;

/// Prefix of image-code token names in a Chameleon `vocabulary_map`.
pub const IMAGE_TOKEN_PREFIX: &str = "IMGIMG";
/// Chameleon's names for the begin-of-image and end-of-image tokens.
pub const CHAMELEON_BOI_NAME: &str = "<racm3:break>";
pub const CHAMELEON_EOI_NAME: &str = "<eoss>";

fn default_model_type() -> String {
    "chameleon".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_true() -> bool {
    true
}

/// `config.json` of a model directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Chameleon-7B norms after attention/MLP instead of before ("swin" norm).
    #[serde(default)]
    pub swin_norm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Chameleon always has per-head query/key LayerNorm; molora keeps the
    /// switch so that plain Llama-style decoders load too.
    #[serde(default = "default_true")]
    pub qk_layernorm: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Token name -> id, as Chameleon checkpoints ship it. Image codes are the
    /// names starting with `IMGIMG`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocabulary_map: Option<BTreeMap<String, u32>>,
    /// The VQ model's config, as Chameleon stores it (opaque to the decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vq_config: Option<serde_json::Value>,
    /// molora's own fields.
    #[serde(default)]
    pub molora: MoloraConfig,
}

/// molora's fields inside `config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MoloraConfig {
    /// Modalities in routing order; each owns a contiguous id range. Ids that
    /// fall in no range (special tokens) belong to the first modality.
    /// A modality named "image" may leave `token_range` out when the
    /// `vocabulary_map` names the image codes.
    #[serde(default)]
    pub modalities: Vec<ModalitySpec>,
    #[serde(default)]
    pub boi_token_id: Option<u32>,
    #[serde(default)]
    pub eoi_token_id: Option<u32>,
    /// Image codes per picture (= image_grid[0] * image_grid[1]).
    #[serde(default)]
    pub tokens_per_image: Option<usize>,
    /// [rows, cols] of the code grid.
    #[serde(default)]
    pub image_grid: Option<[usize; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModalitySpec {
    pub name: String,
    /// Half-open `[start, end)` id range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_range: Option<[u32; 2]>,
}

/// One resolved modality: a name and its id range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modality {
    pub name: String,
    pub range: Range<u32>,
}

/// The resolved, validated vocabulary layout. Built once from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabLayout {
    pub vocab_size: usize,
    /// Index 0 is the default modality (text in every shipped model).
    pub modalities: Vec<Modality>,
    /// Index into `modalities` of the image modality, if there is one.
    pub image_modality: Option<usize>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub boi: Option<u32>,
    pub eoi: Option<u32>,
    pub tokens_per_image: usize,
    pub image_grid: [usize; 2],
}

impl VocabLayout {
    /// The modality index of a token id (ids outside every range -> 0).
    pub fn modality_of(&self, id: u32) -> usize {
        self.modalities
            .iter()
            .position(|m| m.range.contains(&id))
            .unwrap_or(0)
    }

    pub fn modality_index(&self, name: &str) -> Option<usize> {
        self.modalities.iter().position(|m| m.name == name)
    }

    /// The image-code id range (empty when the model has no image modality).
    pub fn image_range(&self) -> Range<u32> {
        match self.image_modality {
            Some(i) => self.modalities[i].range.clone(),
            None => 0..0,
        }
    }

    /// The text id range (modality 0).
    pub fn text_range(&self) -> Range<u32> {
        self.modalities[0].range.clone()
    }

    pub fn is_image_code(&self, id: u32) -> bool {
        self.image_range().contains(&id)
    }

    /// Codebook index of an image token id.
    pub fn image_code(&self, id: u32) -> Option<u32> {
        let r = self.image_range();
        r.contains(&id).then(|| id - r.start)
    }

    /// Token id of a codebook index.
    pub fn image_token(&self, code: u32) -> u32 {
        self.image_range().start + code
    }
}

impl Config {
    /// Reads and validates `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        config_compat::normalize_hf_fields(&mut value)
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        let cfg: Config = serde_json::from_value(value)
            .with_context(|| format!("{}: not a valid model config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        Ok(cfg)
    }

    pub fn to_file(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks sizes and resolves the vocabulary layout.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "chameleon" {
            bail!(
                "model_type is {:?}; molora loads \"chameleon\" checkpoints",
                self.model_type
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act {:?} is not supported (only \"silu\")",
                self.hidden_act
            );
        }
        self.vocab()?;
        Ok(())
    }

    /// Resolves the vocabulary layout: modality ranges from the molora fields or
    /// the `vocabulary_map`, special ids, image grid. Ranges must lie inside the
    /// embedding and must not overlap.
    pub fn vocab(&self) -> Result<VocabLayout> {
        let v = self.vocab_size as u64;
        let map = self.vocabulary_map.as_ref();
        let by_name = |name: &str| map.and_then(|m| m.get(name).copied());

        let specs: Vec<ModalitySpec> = if self.molora.modalities.is_empty() {
            // A plain Chameleon checkpoint: text is everything below the image codes.
            vec![
                ModalitySpec {
                    name: "text".into(),
                    token_range: None,
                },
                ModalitySpec {
                    name: "image".into(),
                    token_range: None,
                },
            ]
        } else {
            self.molora.modalities.clone()
        };

        let mut modalities = Vec::with_capacity(specs.len());
        for spec in &specs {
            let range = match (spec.token_range, spec.name.as_str()) {
                (Some([a, b]), _) => a..b,
                (None, "image") => image_range_from_map(map).context(
                    "the image-code range comes from molora.modalities[].token_range or from the \
                     IMGIMG* names of vocabulary_map, and neither gives it",
                )?,
                (None, "text") if self.molora.modalities.is_empty() => 0..0, // filled below
                (None, name) => bail!("modality {name:?} has no token_range"),
            };
            modalities.push(Modality {
                name: spec.name.clone(),
                range,
            });
        }
        if self.molora.modalities.is_empty() {
            // Text = ids below the image range (Chameleon puts image codes first after
            // a few specials; everything else is text). Use the larger side.
            let img = modalities[1].range.clone();
            modalities[0].range = if (img.start as u64) > v - img.end as u64 {
                0..img.start
            } else {
                img.end..self.vocab_size as u32
            };
        }
        for m in &modalities {
            if m.range.start >= m.range.end {
                bail!(
                    "modality {:?} has an empty token_range {:?}",
                    m.name,
                    m.range
                );
            }
            if m.range.end as u64 > v {
                bail!(
                    "modality {:?} token_range {:?} exceeds vocab_size {}",
                    m.name,
                    m.range,
                    self.vocab_size
                );
            }
        }
        for (i, a) in modalities.iter().enumerate() {
            for b in &modalities[i + 1..] {
                if a.range.start < b.range.end && b.range.start < a.range.end {
                    bail!(
                        "token ranges of modalities {:?} {:?} and {:?} {:?} overlap",
                        a.name,
                        a.range,
                        b.name,
                        b.range
                    );
                }
            }
            if modalities.iter().filter(|m| m.name == a.name).count() > 1 {
                bail!("modality {:?} is listed twice", a.name);
            }
        }
        let image_modality = modalities.iter().position(|m| m.name == "image");

        let boi = self
            .molora
            .boi_token_id
            .or_else(|| by_name(CHAMELEON_BOI_NAME));
        let eoi = self
            .molora
            .eoi_token_id
            .or_else(|| by_name(CHAMELEON_EOI_NAME));
        let image_range = image_modality.map(|i| modalities[i].range.clone());
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
            ("boi_token_id", boi),
            ("eoi_token_id", eoi),
        ] {
            if let Some(id) = id {
                if id as u64 >= v {
                    bail!(
                        "{name} {id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    );
                }
                if image_range.as_ref().is_some_and(|r| r.contains(&id)) {
                    bail!(
                        "{name} {id} lies inside the image-code range {:?}",
                        image_range.clone().unwrap()
                    );
                }
            }
        }

        let vq = config_compat::vq_config_of(self.vq_config.as_ref())?;
        if let (Some(vq), Some(range)) = (&vq, &image_range) {
            config_compat::check_codebook(vq, range)?;
        }
        let image_grid = config_compat::image_grid(
            self.molora.image_grid,
            self.molora.tokens_per_image,
            vq.as_ref(),
        )?;
        if image_modality.is_some() && (boi.is_none() || eoi.is_none()) {
            bail!("a model with an image modality needs boi_token_id and eoi_token_id");
        }
        Ok(VocabLayout {
            vocab_size: self.vocab_size,
            modalities,
            image_modality,
            bos: self.bos_token_id,
            eos: self.eos_token_id,
            pad: self.pad_token_id,
            boi,
            eoi,
            tokens_per_image: image_grid[0] * image_grid[1],
            image_grid,
        })
    }
}

/// The contiguous id range of the `IMGIMG*` names in a vocabulary map.
fn image_range_from_map(map: Option<&BTreeMap<String, u32>>) -> Result<Range<u32>> {
    let map = map.context("config.json has no vocabulary_map")?;
    let mut ids: Vec<u32> = map
        .iter()
        .filter(|(name, _)| name.starts_with(IMAGE_TOKEN_PREFIX))
        .map(|(_, &id)| id)
        .collect();
    if ids.is_empty() {
        bail!("vocabulary_map has no {IMAGE_TOKEN_PREFIX}* image-code tokens");
    }
    ids.sort_unstable();
    let (lo, hi) = (ids[0], *ids.last().unwrap());
    if (hi - lo + 1) as usize != ids.len() {
        bail!("the {IMAGE_TOKEN_PREFIX}* image-code ids are not one contiguous range");
    }
    Ok(lo..hi + 1)
}

/// Chameleon's name for image code `i`: digits spelled with letters A..J,
/// then "Z" (code 10 -> "IMGIMGBAZ").
pub fn image_token_name(code: u32) -> String {
    let digits: String = code
        .to_string()
        .chars()
        .map(|c| (b'A' + (c as u8 - b'0')) as char)
        .collect();
    format!("{IMAGE_TOKEN_PREFIX}{digits}Z")
}
