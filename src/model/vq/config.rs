//! The VQ-VAE's configuration: Chameleon's `vq_config` object as
//! transformers' `ChameleonVQVAEConfig` writes it, plus taming's `out_ch`.
//!
//! Field names are Chameleon's (`latent_channels`, `base_channels`,
//! `channel_multiplier`); taming-transformers' `ddconfig` names (`z_channels`,
//! `ch`, `ch_mult`, `double_z`, `n_embed`) are accepted as aliases so that a
//! taming YAML converted to JSON reads as is. A config is validated once,
//! here; the model code relies on [`VqConfig::validate`] having passed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

fn default_attn_type() -> String {
    "vanilla".into()
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_in_channels() -> usize {
    3
}

/// `vq_config` of a Chameleon checkpoint (and molora's demo VQ-VAE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    /// Size of one codebook vector (taming's `embed_dim`).
    pub embed_dim: usize,
    /// Codebook size (taming's `n_embed`).
    #[serde(alias = "n_embed")]
    pub num_embeddings: usize,
    /// Taming's `double_z`: the encoder would emit mean and variance. A VQ
    /// model quantizes `latent_channels` channels, so this must be false.
    #[serde(default, alias = "double_z")]
    pub double_latent: bool,
    /// Channels of the encoder output / decoder input (taming's `z_channels`).
    #[serde(alias = "z_channels")]
    pub latent_channels: usize,
    /// Side of the square input image in pixels.
    pub resolution: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Channels of the first level (taming's `ch`).
    #[serde(alias = "ch")]
    pub base_channels: usize,
    /// Channel multiplier per resolution level (taming's `ch_mult`); every
    /// level but the last halves the resolution.
    #[serde(alias = "ch_mult")]
    pub channel_multiplier: Vec<usize>,
    pub num_res_blocks: usize,
    /// Resolutions (feature-map sides) at which the down/up levels carry an
    /// attention block after each residual block. `None` = none.
    #[serde(default)]
    pub attn_resolutions: Option<Vec<usize>>,
    /// Dropout inside residual blocks during training (inference ignores it).
    #[serde(default)]
    pub dropout: f64,
    /// "vanilla" (taming's AttnBlock) or "none" (no attention anywhere).
    #[serde(default = "default_attn_type")]
    pub attn_type: String,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Decoder output channels; taming's `out_ch`, absent from Chameleon's
    /// config, where it equals `in_channels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_ch: Option<usize>,
    /// molora extension: GroupNorm group count. Absent = taming's 32. Small
    /// models want fewer groups: with one channel per group (32 channels
    /// in 32 groups) the decoder's last norm erases each channel's mean
    /// and a plain background colour can no longer be produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_num_groups: Option<usize>,
    /// molora extension: the decoder's `base_channels` when it differs from
    /// the encoder's. transformers' Chameleon holds only the encoder (with
    /// taming's 32 groups, so channels in multiples of 32); a small model can
    /// keep that encoder and a cheaper decoder. Absent = `base_channels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_base_channels: Option<usize>,
    /// molora extension: the decoder's GroupNorm group count. Absent =
    /// `norm_num_groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_norm_num_groups: Option<usize>,
}

impl VqConfig {
    /// Chameleon-7B / Anole's VQGAN (512x512 images, 32x32 = 1024 codes).
    pub fn chameleon() -> Self {
        Self {
            embed_dim: 256,
            num_embeddings: 8192,
            double_latent: false,
            latent_channels: 256,
            resolution: 512,
            in_channels: 3,
            base_channels: 128,
            channel_multiplier: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: None,
            dropout: 0.0,
            attn_type: "vanilla".into(),
            initializer_range: 0.02,
            out_ch: None,
            norm_num_groups: None,
            decoder_base_channels: None,
            decoder_norm_num_groups: None,
        }
    }

    /// Reads and validates a JSON file holding a `vq_config` object.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading VQ config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing VQ config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid VQ config {}", path.display()))?;
        Ok(cfg)
    }

    /// Reads and validates the `vq_config` value of a model's config.json.
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let cfg: Self =
            serde_json::from_value(value.clone()).context("parsing vq_config of config.json")?;
        cfg.validate().context("invalid vq_config")?;
        Ok(cfg)
    }

    pub fn to_json_pretty(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Number of resolution levels (`len(channel_multiplier)`).
    pub fn num_resolutions(&self) -> usize {
        self.channel_multiplier.len()
    }

    /// Total down-sampling factor, `2^(levels - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.num_resolutions().saturating_sub(1)
    }

    /// Side of the code grid: `resolution / 2^(levels - 1)`.
    pub fn grid_size(&self) -> usize {
        self.resolution / self.downsample_factor()
    }

    /// Codes per image, `grid_size()^2`.
    pub fn tokens_per_image(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// GroupNorm groups (at most; see `blocks::norm_groups`).
    pub fn norm_groups(&self) -> usize {
        self.norm_num_groups
            .unwrap_or(crate::model::vq::blocks::NORM_GROUPS)
    }

    /// The decoder's `base_channels`.
    pub fn decoder_channels(&self) -> usize {
        self.decoder_base_channels.unwrap_or(self.base_channels)
    }

    /// The decoder's GroupNorm groups (at most; see `blocks::norm_groups`).
    pub fn decoder_norm_groups(&self) -> usize {
        self.decoder_norm_num_groups
            .unwrap_or_else(|| self.norm_groups())
    }

    pub fn out_channels(&self) -> usize {
        self.out_ch.unwrap_or(self.in_channels)
    }

    /// Whether the down/up level working at `resolution` carries attention.
    pub fn has_attention_at(&self, resolution: usize) -> bool {
        self.uses_attention()
            && self
                .attn_resolutions
                .as_ref()
                .is_some_and(|r| r.contains(&resolution))
    }

    /// Whether attention blocks exist at all (the middle blocks included).
    pub fn uses_attention(&self) -> bool {
        self.attn_type == "vanilla"
    }

    /// Checks every field the model code relies on; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("embed_dim", self.embed_dim),
            ("num_embeddings", self.num_embeddings),
            ("latent_channels", self.latent_channels),
            ("resolution", self.resolution),
            ("in_channels", self.in_channels),
            ("base_channels", self.base_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("out_ch", self.out_channels()),
            ("norm_num_groups", self.norm_groups()),
            ("decoder_base_channels", self.decoder_channels()),
            ("decoder_norm_num_groups", self.decoder_norm_groups()),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("VQ config field `{name}` must be > 0");
            }
        }
        if self.num_embeddings > u32::MAX as usize {
            bail!(
                "VQ config field `num_embeddings` = {} does not fit a u32 code",
                self.num_embeddings
            );
        }
        if self.channel_multiplier.is_empty() {
            bail!("VQ config field `channel_multiplier` must list at least one level");
        }
        if let Some(i) = self.channel_multiplier.iter().position(|&m| m == 0) {
            bail!("VQ config field `channel_multiplier`[{i}] must be > 0");
        }
        if self.channel_multiplier.len() > 16 {
            bail!(
                "VQ config field `channel_multiplier` has {} levels; at most 16 are supported",
                self.channel_multiplier.len()
            );
        }
        let factor = self.downsample_factor();
        if !self.resolution.is_multiple_of(factor) {
            bail!(
                "VQ config field `resolution` = {} must be divisible by 2^(len(channel_multiplier)-1) = {factor}",
                self.resolution
            );
        }
        if self.double_latent {
            bail!(
                "VQ config field `double_latent` must be false: the quantizer takes `latent_channels` channels"
            );
        }
        if self.attn_type != "vanilla" && self.attn_type != "none" {
            bail!(
                "VQ config field `attn_type` = {:?} is not supported (use \"vanilla\" or \"none\")",
                self.attn_type
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(
                "VQ config field `dropout` = {} must be in [0, 1)",
                self.dropout
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chameleon_grid_is_32() {
        let cfg = VqConfig::chameleon();
        cfg.validate().unwrap();
        assert_eq!(cfg.grid_size(), 32);
        assert_eq!(cfg.tokens_per_image(), 1024);
    }

    #[test]
    fn taming_aliases_read() {
        let json = r#"{"embed_dim": 8, "n_embed": 16, "z_channels": 8, "resolution": 16,
            "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "double_z": false, "out_ch": 3}"#;
        let cfg: VqConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.num_embeddings, 16);
        assert_eq!(cfg.grid_size(), 8);
    }

    #[test]
    fn errors_name_the_field() {
        let mut cfg = VqConfig::chameleon();
        cfg.resolution = 500;
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("resolution"), "{err}");
        let mut cfg = VqConfig::chameleon();
        cfg.num_embeddings = 0;
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("num_embeddings"), "{err}");
        let mut cfg = VqConfig::chameleon();
        cfg.attn_type = "linear".into();
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("attn_type"), "{err}");
    }

    #[test]
    fn a_narrower_decoder_builds_and_round_trips_shapes() {
        use candle_core::{DType, Device, Tensor};
        use candle_nn::{VarBuilder, VarMap};
        let json = r#"{"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8,
            "resolution": 16, "base_channels": 32, "channel_multiplier": [1, 2],
            "num_res_blocks": 1, "attn_type": "none",
            "decoder_base_channels": 8, "decoder_norm_num_groups": 4}"#;
        let cfg: VqConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!((cfg.decoder_channels(), cfg.decoder_norm_groups()), (8, 4));
        assert_eq!(cfg.norm_groups(), 32, "the encoder keeps taming's groups");
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = crate::model::vq::VqModel::new(&cfg, vb).unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data["encoder.conv_in.weight"].dims(), [32, 3, 3, 3]);
        assert_eq!(data["decoder.conv_out.weight"].dims(), [3, 8, 3, 3]);
        drop(data);
        let images = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let codes = model.encode(&images).unwrap();
        assert_eq!(codes.dims(), [2, 64]);
        assert_eq!(model.decode(&codes).unwrap().dims(), [2, 3, 16, 16]);
        // Written back, the config keeps the extension fields.
        let back: VqConfig = serde_json::from_str(&cfg.to_json_pretty().unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}
