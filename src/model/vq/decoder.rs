//! taming's `Decoder`: `conv_in` from `latent_channels`, `mid`, then the
//! `up.{i}` levels from the deepest (`i = levels-1`) to the shallowest, each
//! with `num_res_blocks + 1` residual blocks, attention after each block when
//! the level's resolution is in `attn_resolutions`, and an `upsample` on
//! every level but level 0; finally `norm_out`, swish, `conv_out` to `out_ch`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{conv3x3, normalize, swish, AttnBlock, Conv, GroupNorm, ResnetBlock, Upsample};
use super::config::VqConfig;
use super::encoder::MidBlock;

/// One resolution level of the decoder (`decoder.up.{i}`).
#[derive(Debug, Clone)]
struct UpLevel {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    upsample: Option<Upsample>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    /// Indexed like taming's `up`: `up[0]` is the shallowest level and runs last.
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    /// `vb` is the `decoder` prefix. The config must be validated.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.decoder_channels();
        let groups = cfg.decoder_norm_groups();
        let levels = cfg.num_resolutions();
        let mut block_in = ch * cfg.channel_multiplier[levels - 1];
        let mut curr_res = cfg.grid_size();
        let conv_in = conv3x3(cfg.latent_channels, block_in, vb.pp("conv_in"))?;
        let mid = MidBlock::new(block_in, cfg.uses_attention(), groups, vb.pp("mid"))?;
        // Built deepest first (the order the channel counts chain in), then
        // reversed so that `up[i]` is taming's `up.{i}`.
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i);
            let block_out = ch * cfg.channel_multiplier[i];
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            let mut attns = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    groups,
                    vb_level.pp("block").pp(j),
                )?);
                block_in = block_out;
                if cfg.has_attention_at(curr_res) {
                    attns.push(AttnBlock::new(block_in, groups, vb_level.pp("attn").pp(j))?);
                }
            }
            let upsample = if i != 0 {
                curr_res *= 2;
                Some(Upsample::new(block_in, vb_level.pp("upsample"))?)
            } else {
                None
            };
            up.push(UpLevel {
                blocks,
                attns,
                upsample,
            });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: normalize(block_in, groups, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.out_channels(), vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    /// (B, latent_channels, g, g) -> (B, out_ch, g*f, g*f).
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h)?;
                }
            }
            if let Some(upsample) = &level.upsample {
                h = upsample.forward(&h)?;
            }
        }
        let h = swish(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}
