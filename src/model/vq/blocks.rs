//! taming-transformers' building blocks (`diffusionmodules/model.py`):
//! `Normalize`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`.
//!
//! Field names follow taming's module names, so `vb.pp(...)` paths are the
//! checkpoint's keys. Every op used here has a backward in candle 0.11.1
//! (our im2col convolution, group norm built from plain tensor ops, silu,
//! `ops::softmax`, zero padding, nearest up-sampling by an integer factor),
//! so the same blocks serve inference and training.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

pub use super::conv::{conv1x1, conv3x3, Conv};

/// taming's `Normalize` uses 32 groups.
pub const NORM_GROUPS: usize = 32;
/// taming's `Normalize` epsilon.
pub const NORM_EPS: f64 = 1e-6;

/// Group count for a `Normalize` over `channels`, at most `max_groups`
/// (taming's 32 unless the config's `norm_num_groups` says otherwise).
///
/// taming needs `channels % 32 == 0` and then uses exactly 32 groups; so do
/// we. For other channel counts (tiny test models) we deviate: the largest
/// divisor of `channels` that is at most `max_groups` (`min(32, channels)`
/// when `channels < 32`).
pub fn norm_groups(channels: usize, max_groups: usize) -> usize {
    let max_groups = max_groups.max(1);
    if channels.is_multiple_of(max_groups) {
        return max_groups;
    }
    (1..=max_groups.min(channels))
        .rev()
        .find(|&g| channels.is_multiple_of(g))
        .unwrap_or(1)
}

/// taming's `Normalize`: affine GroupNorm, eps 1e-6, over (B, C, H, W).
///
/// candle_nn's GroupNorm computes the same; this one broadcasts the affine
/// weight and bias in two steps, (1, C, 1) -> (B, C, 1) -> (B, C, H*W), so
/// that their gradients are a sum over the contiguous last axis (candle's
/// fast path) and a small sum over the batch, instead of one element-wise
/// strided reduction over (B, H, W) that dominated the backward.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = (c / self.groups) * h * w;
        // Statistics per (batch, group), over the group's channels and pixels.
        let xg = x.reshape((b, self.groups, n))?;
        let mean = (xg.sum_keepdim(2)? / n as f64)?;
        let centred = xg.broadcast_sub(&mean)?;
        let var = (centred.sqr()?.sum_keepdim(2)? / n as f64)?;
        let normed = centred.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
        let normed = normed.reshape((b, c, h * w))?;
        let affine = |t: &Tensor| -> Result<Tensor> {
            t.reshape((1, c, 1))?
                .broadcast_as((b, c, 1))?
                .broadcast_as((b, c, h * w))
        };
        normed
            .mul(&affine(&self.weight)?)?
            .add(&affine(&self.bias)?)?
            .reshape((b, c, h, w))
    }
}

/// taming's `Normalize(channels)`: GroupNorm with [`norm_groups`] groups.
pub fn normalize(channels: usize, max_groups: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(channels, norm_groups(channels, max_groups), vb)
}

/// taming's `nonlinearity`: swish, `x * sigmoid(x)`.
pub fn swish(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// taming's `ResnetBlock` without the time embedding (`temb_channels = 0`)
/// and with the 1x1 `nin_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    /// `groups`: the model's GroupNorm group count (see [`norm_groups`]).
    pub fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let nin_shortcut = if in_c != out_c {
            Some(conv1x1(in_c, out_c, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: normalize(in_c, groups, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, vb.pp("conv1"))?,
            norm2: normalize(out_c, groups, vb.pp("norm2"))?,
            conv2: conv3x3(out_c, out_c, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = swish(&self.norm1.forward(x)?)?;
        let h = self.conv1.forward(&h)?;
        let h = swish(&self.norm2.forward(&h)?)?;
        // Dropout sits here in taming; it is an identity at inference and the
        // trainer refuses dropout > 0 (runs must be deterministic).
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// taming's `AttnBlock`: single-head self-attention over the pixels, with
/// 1x1 convolutions for q, k, v and the output projection, plus a residual.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: normalize(channels, groups, vb.pp("norm"))?,
            q: conv1x1(channels, channels, vb.pp("q"))?,
            k: conv1x1(channels, channels, vb.pp("k"))?,
            v: conv1x1(channels, channels, vb.pp("v"))?,
            proj_out: conv1x1(channels, channels, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // (B, C, H, W) -> (B, HW, C) for q, (B, C, HW) for k and v.
        let q = self.q.forward(&normed)?.reshape((b, c, h * w))?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = self.k.forward(&normed)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&normed)?.reshape((b, c, h * w))?;
        // (B, HW_q, HW_k), scaled by C^-1/2. `ops::softmax` (not the fused
        // `softmax_last_dim`) because it has a backward.
        let scores = (q.matmul(&k)? * (c as f64).powf(-0.5))?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        // out[b, c, i] = sum_j v[b, c, j] * weights[b, i, j]
        let out = v.matmul(&weights.transpose(1, 2)?)?;
        let out = self.proj_out.forward(&out.reshape((b, c, h, w))?)?;
        x + out
    }
}

/// taming's `Downsample(with_conv=True)`: zero-pad one pixel on the right
/// and bottom only (`pad = (0, 1, 0, 1)`), then a 3x3 conv with stride 2 and
/// no padding. Halves the spatial size.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv,
}

impl Downsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(channels, channels, 3, 2, 0, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padded = x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&padded)
    }
}

/// taming's `Upsample(with_conv=True)`: nearest-neighbour x2, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let up = x.upsample_nearest2d(2 * h, 2 * w)?;
        self.conv.forward(&up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same numbers as candle_nn's GroupNorm.
    #[test]
    fn group_norm_matches_candle() {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 8, 3, 5), &dev).unwrap();
        let weight = Tensor::randn(1f32, 0.5, 8, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 8, &dev).unwrap();
        let ours = GroupNorm {
            weight: weight.clone(),
            bias: bias.clone(),
            groups: 4,
        };
        let theirs = candle_nn::GroupNorm::new(weight, bias, 8, 4, NORM_EPS).unwrap();
        let d = (ours.forward(&x).unwrap() - theirs.forward(&x).unwrap()).unwrap();
        let max = d
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(max.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn group_counts() {
        assert_eq!(norm_groups(128, 32), 32);
        assert_eq!(norm_groups(64, 32), 32);
        assert_eq!(norm_groups(32, 32), 32);
        assert_eq!(norm_groups(16, 32), 16);
        assert_eq!(norm_groups(8, 32), 8);
        assert_eq!(norm_groups(48, 32), 24);
        assert_eq!(norm_groups(3, 32), 3);
        assert_eq!(norm_groups(16, 4), 4);
        assert_eq!(norm_groups(6, 4), 3);
    }
}
