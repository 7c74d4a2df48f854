//! The losses of one VQ training batch: reconstruction (shape pixels
//! weighted), codebook and commitment, and optionally the context and shape
//! losses; or, when only the decoder trains, reconstruction alone on frozen
//! codes.
//!
//! The context loss exists because a base decoder learns codes best when a
//! patch's code depends on that patch alone. GroupNorm normalises with
//! image-wide statistics, so adding a shape elsewhere moved the codes of
//! more than half of the other shape's patches (`examples/vq_shape_probe`).
//! Paired images that differ in one shape teach the encoder to ignore that.
//!
//! The shape loss exists because reconstruction alone lets the edge cells
//! of different shapes share codes: a cell holding a circle's rim and one
//! holding a triangle's corner differ in a few pixels, so the codebook
//! spends its entries on colours and the decoder draws an average edge
//! (docs/VQ.md, "What limits the shapes"). Asking a few latent channels to name
//! the cell's shape makes such cells far apart, so they get distinct codes.
//!
//! The colour loss does the same for colours. Without it a code may stand
//! for a green shape's edge in one picture and a yellow one's in another,
//! the decoder telling them apart by the neighbouring codes; a base that
//! draws one such code beside the wrong neighbours recolours the shape
//! (`examples/vq_pair_colours`).

use anyhow::Result;
use candle_core::Tensor;

use super::{ReconLoss, VqTrainer};
use crate::train::data::shapes::{Colour, Shape};

/// The loss of one batch, as graph tensors (scalars).
pub struct Losses {
    pub total: Tensor,
    pub reconstruction: Tensor,
    pub codebook: Tensor,
    pub commitment: Tensor,
    /// Mean squared latent difference of equal patches in paired images
    /// (zero when `context_weight` is 0), unweighted.
    pub context: Tensor,
    /// Cross-entropy of the shape channels (zero when `shape_weight` is 0),
    /// unweighted.
    pub shape: Tensor,
    /// The same for the colour channels and `colour_weight`.
    pub colour: Tensor,
    /// Chosen codes (B, g*g) u32.
    pub codes: Tensor,
    /// Pre-quantization latents, one row per code, detached: (B*g*g, embed_dim).
    pub latents: Tensor,
}

impl VqTrainer {
    /// Forward pass and losses of one batch (B, 3, R, R) in [-1, 1].
    pub fn losses(&self, images: &Tensor) -> Result<Losses> {
        self.losses_of(images, None)
    }

    /// [`Self::losses`] with each latent cell's one-hot classes
    /// (B, K, g, g) ([`VqBatch::cell_classes`]), required when the shape or
    /// colour loss is on.
    pub fn losses_of(&self, images: &Tensor, cell_classes: Option<&Tensor>) -> Result<Losses> {
        if self.tcfg.decoder_only {
            return self.decoder_losses(images);
        }
        let out = self.model.forward_train(images)?;
        let reconstruction = self.reconstruction_loss(&out.reconstruction, images)?;
        let q = out.quantized;
        let vq = if self.tcfg.legacy_beta {
            (&q.commitment_loss + (&q.codebook_loss * self.tcfg.beta)?)?
        } else {
            (&q.codebook_loss + (&q.commitment_loss * self.tcfg.beta)?)?
        };
        let mut total = (&reconstruction + vq)?;
        let context = if self.tcfg.context_weight > 0.0 {
            let context = context_loss(&out.latents, images)?;
            total = (total + (&context * self.tcfg.context_weight)?)?;
            context
        } else {
            reconstruction.zeros_like()?
        };
        // Each class loss reads the next group of latent channels against
        // the same group of `cell_classes`.
        let mut first = 0;
        let mut class_term = |weight: f64, classes: usize| -> Result<Tensor> {
            if weight <= 0.0 {
                return Ok(reconstruction.zeros_like()?);
            }
            let targets = cell_classes.ok_or_else(|| {
                anyhow::anyhow!(
                    "the VQ shape and colour losses need batches with cell_classes (see vq_batch)"
                )
            })?;
            let loss = class_loss(&out.latents, first, &targets.narrow(1, first, classes)?)?;
            first += classes;
            total = (&total + (&loss * weight)?)?;
            Ok(loss)
        };
        let shape = class_term(self.tcfg.shape_weight, SHAPE_CLASSES)?;
        let colour = class_term(self.tcfg.colour_weight, COLOUR_CLASSES)?;
        Ok(Losses {
            total,
            reconstruction,
            codebook: q.codebook_loss,
            commitment: q.commitment_loss,
            context,
            shape,
            colour,
            codes: q.codes,
            latents: latent_rows(&out.latents)?,
        })
    }

    /// [`Self::losses`] with the encoder and codebook frozen: the decoder
    /// learns to draw the codes it is given.
    fn decoder_losses(&self, images: &Tensor) -> Result<Losses> {
        let quantizer = self.model.quantizer();
        let z = self.model.encode_latents(images)?.detach();
        let (_, _, h, w) = z.dims4()?;
        let codes = quantizer.encode(&z)?;
        let z_q = quantizer.decode(&codes, h, w)?.detach();
        let pixels = self.model.decode_latents(&z_q)?;
        let reconstruction = self.reconstruction_loss(&pixels, images)?;
        let zero = reconstruction.zeros_like()?;
        Ok(Losses {
            total: reconstruction.clone(),
            reconstruction,
            codebook: zero.clone(),
            commitment: zero.clone(),
            context: zero.clone(),
            shape: zero.clone(),
            colour: zero,
            codes,
            latents: latent_rows(&z)?,
        })
    }

    /// Mean per-pixel error (L1 or MSE), shape pixels weighted
    /// `1 + foreground_weight`.
    fn reconstruction_loss(&self, pixels: &Tensor, images: &Tensor) -> Result<Tensor> {
        let diff = (pixels - images)?;
        let per_pixel = match self.tcfg.recon_loss {
            ReconLoss::L1 => diff.abs()?,
            ReconLoss::Mse => diff.sqr()?,
        };
        Ok(if self.tcfg.foreground_weight > 0.0 {
            let weight = foreground_weights(images, self.tcfg.foreground_weight)?;
            (per_pixel.broadcast_mul(&weight)?.mean_all()? / weight.mean_all()?)?
        } else {
            per_pixel.mean_all()?
        })
    }
}

/// Mean over latent cells whose pixels are equal in both images of a pair
/// (images 2k and 2k + 1) of the squared latent difference, averaged over
/// channels; both sides get the gradient. Zero when no cell is equal.
pub(super) fn context_loss(latents: &Tensor, images: &Tensor) -> Result<Tensor> {
    let (b, c, grid, w) = latents.dims4()?;
    if b % 2 != 0 || grid != w {
        anyhow::bail!(
            "the context loss needs pairs of images on a square code grid, got latents {:?}",
            latents.dims()
        );
    }
    let (_, ch, side, _) = images.dims4()?;
    let patch = side / grid;
    let pairs = images.reshape((b / 2, 2, ch, side, side))?;
    let pixel_diff = (pairs.narrow(1, 0, 1)? - pairs.narrow(1, 1, 1)?)?
        .abs()?
        .reshape((b / 2, ch, grid, patch, grid, patch))?
        .sum(5)?
        .sum(3)?
        .sum(1)?;
    let equal = pixel_diff.le(1e-6)?.to_dtype(latents.dtype())?.detach();
    let cells = equal.sum_all()?.to_scalar::<f32>()?;
    let z = latents.reshape((b / 2, 2, c, grid, grid))?;
    let latent_diff = (z.narrow(1, 0, 1)? - z.narrow(1, 1, 1)?)?
        .sqr()?
        .reshape((b / 2, c, grid, grid))?
        .mean(1)?;
    Ok(((latent_diff * equal)?.sum_all()? / cells.max(1.0) as f64)?)
}

/// Shape classes of a cell: background and each shape kind.
pub const SHAPE_CLASSES: usize = 1 + Shape::ALL.len();
/// Colour classes of a cell: background and each colour.
pub const COLOUR_CLASSES: usize = 1 + Colour::ALL.len();

/// Mean cross-entropy over latent cells of the K channels of `latents`
/// (B, C, h, w) from `first` on, read as logits, against one-hot `targets`
/// (B, K, h, w). Built from ops that all have a backward.
pub(super) fn class_loss(latents: &Tensor, first: usize, targets: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    let (tb, k, th, tw) = targets.dims4()?;
    if (tb, th, tw) != (b, h, w) || first + k > c {
        anyhow::bail!(
            "class targets {:?} from channel {first} do not fit latents {:?}: want (B, K <= C - {first}, h, w)",
            targets.dims(),
            latents.dims()
        );
    }
    let logits = latents.narrow(1, first, k)?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let log_norm = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_p = shifted.broadcast_sub(&log_norm)?;
    Ok(((log_p * targets)?.sum_all()? / -((b * h * w) as f64))?)
}

/// Latents (B, C, h, w) -> detached rows (B*h*w, C), one per code.
fn latent_rows(latents: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = latents.dims4()?;
    Ok(latents.detach().permute((0, 2, 3, 1))?.reshape(((), c))?)
}

/// Per-pixel loss weights (B, 1, R, R): `1 + extra` where a pixel differs
/// from its image's top-left pixel, 1 elsewhere. Built from the inputs, so
/// no gradient flows through it.
pub(super) fn foreground_weights(images: &Tensor, extra: f64) -> Result<Tensor> {
    let corner = images.narrow(2, 0, 1)?.narrow(3, 0, 1)?;
    let distance = images.broadcast_sub(&corner)?.abs()?.sum_keepdim(1)?;
    let foreground = distance.gt(1e-3)?.to_dtype(images.dtype())?;
    Ok(((foreground * extra)? + 1.0)?)
}
