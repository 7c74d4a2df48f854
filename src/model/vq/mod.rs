//! The VQ image tokenizer: taming-transformers' `VQModel` (the VQGAN of
//! Chameleon and Anole), turning an RGB image into a grid of codes and back.
//!
//! Invariants:
//! - The struct tree is the weight tree: every tensor is asked for by its
//!   taming name (`encoder.down.1.block.0.conv1.weight`,
//!   `quantize.embedding.weight`, ...), so a Chameleon/Anole VQGAN converted
//!   to safetensors loads as is and the demo model uses the same code.
//! - Pixels are (B, 3, R, R) f32 in [-1, 1] with R = `resolution`; codes are
//!   (B, g*g) u32 with g = [`VqConfig::grid_size`], in row-major grid order,
//!   each < `num_embeddings`. Both are checked at the entry points.
//! - The only deviations from taming are in the GroupNorm group count (an
//!   optional `norm_num_groups`, default 32, taming's; for channel counts it
//!   does not divide, its largest divisor below it, see
//!   [`blocks::norm_groups`]) and an optional decoder narrower than the
//!   encoder (`decoder_base_channels`, `decoder_norm_num_groups`). Real
//!   checkpoints use none of them.

pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod decoder;
pub mod encoder;
pub mod pixels;
pub mod quantizer;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

pub use config::VqConfig;
pub use pixels::{rgb_to_tensor, tensor_to_rgb};
pub use quantizer::{Quantized, VectorQuantizer};

use blocks::{conv1x1, Conv};
use checkpoint::CheckedTensors;
use decoder::Decoder;
use encoder::Encoder;

/// What a training forward produces: the reconstruction and the quantizer's
/// output (codes and the two VQ loss terms).
#[derive(Debug, Clone)]
pub struct VqForward {
    /// (B, out_ch, R, R), unclamped.
    pub reconstruction: Tensor,
    /// Pre-quantization latents (B, embed_dim, g, g).
    pub latents: Tensor,
    pub quantized: Quantized,
}

/// taming's `VQModel`: encoder, `quant_conv`, quantizer, `post_quant_conv`,
/// decoder.
#[derive(Debug, Clone)]
pub struct VqModel {
    cfg: VqConfig,
    encoder: Encoder,
    quant_conv: Conv,
    quantize: VectorQuantizer,
    post_quant_conv: Conv,
    decoder: Decoder,
    device: Device,
    dtype: DType,
}

impl VqModel {
    /// Builds the model from `vb`, whose root holds taming's names.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let build = || -> candle_core::Result<Self> {
            Ok(Self {
                cfg: cfg.clone(),
                encoder: Encoder::new(cfg, vb.pp("encoder"))?,
                quant_conv: conv1x1(cfg.latent_channels, cfg.embed_dim, vb.pp("quant_conv"))?,
                quantize: VectorQuantizer::new(
                    cfg.num_embeddings,
                    cfg.embed_dim,
                    vb.pp("quantize"),
                )?,
                post_quant_conv: conv1x1(
                    cfg.embed_dim,
                    cfg.latent_channels,
                    vb.pp("post_quant_conv"),
                )?,
                decoder: Decoder::new(cfg, vb.pp("decoder"))?,
                device,
                dtype,
            })
        };
        Ok(build()?)
    }

    /// Loads a safetensors file whose names are taming's, unprefixed.
    pub fn load(path: &Path, cfg: &VqConfig, device: &Device) -> Result<Self> {
        Self::load_prefixed(path, "", cfg, device)
    }

    /// Loads a safetensors file whose names carry `prefix` before taming's
    /// (a whole Chameleon checkpoint stores them under `model.vqmodel.`).
    pub fn load_prefixed(
        path: &Path,
        prefix: &str,
        cfg: &VqConfig,
        device: &Device,
    ) -> Result<Self> {
        let vb = CheckedTensors::read(path, prefix, device)?.into_var_builder(device);
        Self::new(cfg, vb).with_context(|| format!("loading VQ checkpoint {}", path.display()))
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }

    /// Pixels (B, in_channels, R, R) -> pre-quantization latents
    /// (B, embed_dim, g, g) (encoder, then `quant_conv`).
    pub fn encode_latents(&self, images: &Tensor) -> Result<Tensor> {
        self.check_images(images)?;
        let h = self.encoder.forward(images)?;
        Ok(self.quant_conv.forward(&h)?)
    }

    /// Pixels (B, 3, R, R) in [-1, 1] -> codes (B, g*g) u32.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let z = self.encode_latents(images)?;
        Ok(self.quantize.encode(&z)?)
    }

    /// Codebook latents (B, embed_dim, g, g) -> pixels (B, out_ch, R, R).
    pub fn decode_latents(&self, z_q: &Tensor) -> Result<Tensor> {
        let h = self.post_quant_conv.forward(z_q)?;
        Ok(self.decoder.forward(&h)?)
    }

    /// Codes (B, g*g) u32 -> pixels (B, out_ch, R, R), unclamped.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        self.check_codes(codes)?;
        let g = self.cfg.grid_size();
        let z_q = self.quantize.decode(codes, g, g)?;
        self.decode_latents(&z_q)
    }

    /// The codes of one image -> an RGB image of `resolution` pixels a side.
    pub fn decode_to_rgb(&self, codes: &[u32]) -> Result<RgbImage> {
        let t = Tensor::from_slice(codes, (1, codes.len()), &self.device)?;
        let pixels = self.decode(&t)?.to_dtype(DType::F32)?;
        tensor_to_rgb(&pixels.get(0)?)
    }

    /// One RGB image -> its g*g codes. An image of another size is
    /// centre-cropped to a square and resized to `resolution` first.
    pub fn encode_rgb(&self, image: &RgbImage) -> Result<Vec<u32>> {
        let side = u32::try_from(self.cfg.resolution).context("resolution exceeds u32")?;
        let fitted = pixels::fit_square(image, side);
        let t = rgb_to_tensor(std::slice::from_ref(&fitted), &self.device)?.to_dtype(self.dtype)?;
        Ok(self.encode(&t)?.get(0)?.to_vec1::<u32>()?)
    }

    /// Training forward: encode, quantize with the straight-through
    /// estimator, decode.
    pub fn forward_train(&self, images: &Tensor) -> Result<VqForward> {
        let z = self.encode_latents(images)?;
        let quantized = self.quantize.quantize(&z)?;
        let reconstruction = self.decode_latents(&quantized.z_q)?;
        Ok(VqForward {
            reconstruction,
            latents: z,
            quantized,
        })
    }

    fn check_images(&self, images: &Tensor) -> Result<()> {
        let r = self.cfg.resolution;
        let c = self.cfg.in_channels;
        match images.dims() {
            [_, ch, h, w] if *ch == c && *h == r && *w == r => {}
            dims => bail!("VQ encoder expects images of shape [B, {c}, {r}, {r}], got {dims:?}"),
        }
        if images.dtype() != self.dtype {
            bail!(
                "VQ encoder expects {:?} images, got {:?}",
                self.dtype,
                images.dtype()
            );
        }
        Ok(())
    }

    fn check_codes(&self, codes: &Tensor) -> Result<()> {
        let n = self.cfg.tokens_per_image();
        if codes.elem_count() == 0 {
            bail!("VQ decoder got no codes");
        }
        match codes.dims() {
            [_, len] if *len == n => {}
            dims => bail!("VQ decoder expects codes of shape [B, {n}], got {dims:?}"),
        }
        if codes.dtype() != DType::U32 {
            bail!("VQ decoder expects u32 codes, got {:?}", codes.dtype());
        }
        let max = codes.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.num_embeddings {
            bail!(
                "code {max} is outside the codebook of {} entries",
                self.cfg.num_embeddings
            );
        }
        Ok(())
    }
}
