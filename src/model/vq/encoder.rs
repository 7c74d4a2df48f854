//! taming's `Encoder`: `conv_in`, one `down.{i}` level per channel
//! multiplier (`num_res_blocks` residual blocks, an attention block after
//! each when the level's resolution is in `attn_resolutions`, and a
//! `downsample` on every level but the last), `mid.{block_1, attn_1,
//! block_2}`, `norm_out`, swish, `conv_out` to `latent_channels`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    conv3x3, normalize, swish, AttnBlock, Conv, Downsample, GroupNorm, ResnetBlock,
};
use super::config::VqConfig;

/// One resolution level of the encoder (`encoder.down.{i}`).
#[derive(Debug, Clone)]
struct DownLevel {
    blocks: Vec<ResnetBlock>,
    /// Empty, or one per residual block (taming's `down.{i}.attn.{j}`).
    attns: Vec<AttnBlock>,
    downsample: Option<Downsample>,
}

/// taming's middle section, shared in shape by encoder and decoder.
#[derive(Debug, Clone)]
pub struct MidBlock {
    block_1: ResnetBlock,
    attn_1: Option<AttnBlock>,
    block_2: ResnetBlock,
}

impl MidBlock {
    pub fn new(
        channels: usize,
        with_attention: bool,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn_1 = if with_attention {
            Some(AttnBlock::new(channels, groups, vb.pp("attn_1"))?)
        } else {
            None
        };
        Ok(Self {
            block_1: ResnetBlock::new(channels, channels, groups, vb.pp("block_1"))?,
            attn_1,
            block_2: ResnetBlock::new(channels, channels, groups, vb.pp("block_2"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.block_1.forward(x)?;
        if let Some(attn) = &self.attn_1 {
            h = attn.forward(&h)?;
        }
        self.block_2.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv,
    down: Vec<DownLevel>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    /// `vb` is the `encoder` prefix. The config must be validated.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.base_channels;
        let groups = cfg.norm_groups();
        let conv_in = conv3x3(cfg.in_channels, ch, vb.pp("conv_in"))?;
        let levels = cfg.num_resolutions();
        let mut curr_res = cfg.resolution;
        let mut block_in = ch;
        let mut down = Vec::with_capacity(levels);
        for (i, &mult) in cfg.channel_multiplier.iter().enumerate() {
            let vb_level = vb.pp("down").pp(i);
            let block_out = ch * mult;
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks);
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
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
            let downsample = if i + 1 != levels {
                curr_res /= 2;
                Some(Downsample::new(block_in, vb_level.pp("downsample"))?)
            } else {
                None
            };
            down.push(DownLevel {
                blocks,
                attns,
                downsample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(block_in, cfg.uses_attention(), groups, vb.pp("mid"))?,
            norm_out: normalize(block_in, groups, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    /// (B, in_channels, R, R) -> (B, latent_channels, R/f, R/f).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h)?;
                }
            }
            if let Some(downsample) = &level.downsample {
                h = downsample.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let h = swish(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}
