//! The hyper-parameters of a VQ training run.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconLoss {
    L1,
    Mse,
}

fn default_beta() -> f64 {
    0.25
}

/// Hyper-parameters of a VQ training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqTrainConfig {
    pub seed: u64,
    pub learning_rate: f64,
    /// Linear warm-up of the learning rate over this many steps (0 = none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// After warm-up, a cosine decay of the learning rate to a tenth of it
    /// at this step (0 = constant).
    #[serde(default)]
    pub decay_steps: u64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Weight of the commitment term (taming's beta).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// taming's `legacy=True` weighting: `commitment + beta * codebook`
    /// instead of `codebook + beta * commitment`.
    #[serde(default)]
    pub legacy_beta: bool,
    pub recon_loss: ReconLoss,
    /// Extra weight of the reconstruction loss on foreground pixels (those
    /// unlike the image's top-left pixel, which is background in every
    /// shapes-world scene): a pixel of a shape weighs `1 + foreground_weight`.
    /// Shapes cover ~5-15% of a scene, so with a plain mean the background
    /// dominates the loss and the codes learn shape colours last.
    #[serde(default)]
    pub foreground_weight: f64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Every this many steps, codes unused since the last check are moved to
    /// encoder outputs of the current batch (0 = never). When > 0, every
    /// code also starts on an encoder output of the first batch (a
    /// data-dependent init: taming's U(-1/n, 1/n) codebook sits far from the
    /// encoder's outputs, and in our runs training barely moved without it).
    #[serde(default)]
    pub restart_every: u64,
    /// Threads that share a batch's micro-batches (1 = none). Pair with
    /// `CANDLE_NUM_THREADS=1` so that candle's ops stay on one thread.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Images per forward/backward; gradients of a batch's micro-batches
    /// are summed before the update (0 = the whole batch at once).
    #[serde(default)]
    pub micro_batch: usize,
    /// Train the decoder side only (`post_quant_conv`, `decoder`) on the
    /// reconstruction loss: the encoder and codebook are frozen, so every
    /// image keeps its codes and a base trained on them stays valid.
    /// Requires `restart_every` = 0.
    #[serde(default)]
    pub decoder_only: bool,
    /// Weight of the context loss ([`losses`]): every micro-batch holds
    /// pairs of images (2k, 2k + 1), and a latent cell whose 8x8 pixels are
    /// equal in both images of a pair is pulled to the same latent. Without
    /// it GroupNorm's image-wide statistics make a patch's code depend on
    /// the rest of the picture (0 = off; needs an even `micro_batch`).
    #[serde(default)]
    pub context_weight: f64,
    /// Weight of the shape loss ([`losses`]): the first K latent channels,
    /// read as logits, must name the shape that covers most of the cell
    /// (K = the batch's `patch_shapes` classes). Edge cells of different
    /// shapes look alike in pixels, so reconstruction alone lets them share
    /// codes and the decoder draws their average (0 = off; batches must
    /// then carry `patch_shapes`).
    #[serde(default)]
    pub shape_weight: f64,
    /// Weight of the colour loss: the next latent channels (after the shape
    /// channels when the shape loss is on) must name the colour that covers
    /// most of the cell. Without it a code may stand for several colours
    /// and the decoder reads the colour off its neighbours, so one wrong
    /// code drawn beside them recolours a shape (0 = off).
    #[serde(default)]
    pub colour_weight: f64,
}

fn default_threads() -> usize {
    1
}

impl VqTrainConfig {
    /// Settings that work for the small models here.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            learning_rate: 1e-3,
            warmup_steps: 0,
            decay_steps: 0,
            weight_decay: 0.0,
            beta: 0.25,
            legacy_beta: false,
            recon_loss: ReconLoss::Mse,
            foreground_weight: 0.0,
            checkpoint_every: 0,
            restart_every: 50,
            threads: 1,
            micro_batch: 2,
            decoder_only: false,
            context_weight: 0.0,
            shape_weight: 0.0,
            colour_weight: 0.0,
        }
    }
}
