//! Training the VQ-VAE: reconstruction loss (L1 or MSE) + codebook loss +
//! beta * commitment loss, straight-through gradients, AdamW, dead-code
//! restarts, checkpoints that resume exactly.
//!
//! Invariants:
//! - Deterministic from `seed`: weights are initialised from a seeded RNG
//!   (candle's CPU RNG cannot be seeded), batches come from a closure given
//!   the step index, and each dead-code restart draws from an RNG derived
//!   from (seed, step). Two runs with the same inputs give the same weights.
//! - A checkpoint holds everything the next step depends on (weights, AdamW
//!   moments and step, code-usage counts), so "train N, save, resume, train
//!   M" equals "train N + M".
//! - Only ops with a backward are used (see `model::vq::blocks`); a test
//!   checks that every variable receives a gradient, and another the whole
//!   model's backward against finite differences.
//!
//! Speed (demo config, 2-core machine): a batch is processed in
//! micro-batches of `micro_batch` images (2 is fastest here: activations
//! stay in cache) whose gradients are summed; `threads` > 1 spreads them
//! over threads, meant for processes run with `CANDLE_NUM_THREADS=1`.
//! candle's intra-op threading on small tensors costs more than it gains
//! on this machine.

mod checkpoint;
mod config;
mod init;
mod losses;
pub mod merge;
mod optim;
mod shards;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::vq::{VqConfig, VqModel};
use crate::train::looping::LossWindows;

pub use checkpoint::{CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS};
pub use config::{ReconLoss, VqTrainConfig};
pub use init::init_weights;
pub use losses::{Losses, COLOUR_CLASSES, SHAPE_CLASSES};
pub use merge::MergeReport;
pub use optim::AdamW;

/// Name of the codebook variable (taming's).
pub const CODEBOOK: &str = "quantize.embedding.weight";

/// What one training step reports.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Steps completed, this one included.
    pub step: u64,
    pub loss: f32,
    pub reconstruction: f32,
    pub codebook: f32,
    pub commitment: f32,
    /// Mean squared latent difference of equal patches in paired images.
    pub context: f32,
    /// Cross-entropy of the latents' shape channels (0 when off).
    pub shape: f32,
    /// The same for the colour channels.
    pub colour: f32,
    /// Distinct codes chosen in this batch.
    pub codes_in_batch: usize,
    /// Codebook entries re-initialised after this step.
    pub restarted: usize,
    /// The mean reconstruction loss of the window of
    /// [`crate::train::looping::LOG_WINDOW`] steps this step closed.
    pub window_mean: Option<f32>,
}

/// What a run has trained so far. It is kept in the run's checkpoints, so a
/// resumed run (or a finished one run again) reports the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunLog {
    /// Seconds spent in training steps, summed over resumed runs.
    pub seconds: f64,
    /// The reconstruction loss per window of steps.
    #[serde(flatten)]
    pub reconstruction: LossWindows,
}

/// One training batch.
#[derive(Debug, Clone)]
pub struct VqBatch {
    /// (B, 3, R, R) in [-1, 1].
    pub images: Tensor,
    /// One-hot classes of every latent cell (B, K, g, g) for the class
    /// losses: the shape classes when the shape loss is on
    /// ([`crate::train::data::Scene::patch_shapes`]), then the colour
    /// classes when the colour loss is on (`patch_colours`).
    pub cell_classes: Option<Tensor>,
}

impl From<Tensor> for VqBatch {
    fn from(images: Tensor) -> Self {
        Self {
            images,
            cell_classes: None,
        }
    }
}

impl From<&Tensor> for VqBatch {
    fn from(images: &Tensor) -> Self {
        images.clone().into()
    }
}

pub struct VqTrainer {
    cfg: VqConfig,
    tcfg: VqTrainConfig,
    varmap: VarMap,
    model: VqModel,
    opt: AdamW,
    step: u64,
    /// How often each code was chosen since the last restart check.
    usage: Vec<u64>,
    log: RunLog,
}

impl VqTrainer {
    /// A fresh run: weights drawn from `tcfg.seed`.
    pub fn new(cfg: &VqConfig, tcfg: &VqTrainConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if tcfg.decoder_only && tcfg.restart_every != 0 {
            bail!("decoder-only VQ training must not restart codes (set restart_every to 0)");
        }
        if tcfg.decoder_only && (tcfg.shape_weight > 0.0 || tcfg.colour_weight > 0.0) {
            bail!("decoder-only VQ training keeps the encoder frozen: the shape and colour losses (shape_weight, colour_weight) cannot apply");
        }
        if tcfg.context_weight > 0.0 && !tcfg.micro_batch.is_multiple_of(2) {
            bail!(
                "the VQ context loss pairs images within a micro-batch: micro_batch must be even, got {}",
                tcfg.micro_batch
            );
        }
        if cfg.dropout != 0.0 {
            bail!(
                "VQ training supports `dropout` = 0 only (runs must be deterministic), got {}",
                cfg.dropout
            );
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = VqModel::new(cfg, vb)?;
        init_weights(&varmap, tcfg.seed)?;
        let params = ParamsAdamW {
            lr: tcfg.learning_rate,
            weight_decay: tcfg.weight_decay,
            ..ParamsAdamW::default()
        };
        let opt = AdamW::new(named_vars(&varmap), params)?;
        Ok(Self {
            cfg: cfg.clone(),
            tcfg: tcfg.clone(),
            varmap,
            model,
            opt,
            step: 0,
            usage: vec![0; cfg.num_embeddings],
            log: RunLog::default(),
        })
    }

    /// Continues the run saved in `dir` (see [`VqTrainer::save_checkpoint`]).
    pub fn resume(
        dir: &Path,
        cfg: &VqConfig,
        tcfg: &VqTrainConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut trainer = Self::new(cfg, tcfg, device)?;
        checkpoint::restore(&mut trainer, dir)?;
        Ok(trainer)
    }

    /// A run that starts from trained weights (a `vqgan.safetensors`), with
    /// fresh optimizer moments: e.g. [`VqTrainConfig::decoder_only`] after
    /// the full model has trained.
    pub fn from_weights(
        weights: &Path,
        cfg: &VqConfig,
        tcfg: &VqTrainConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut trainer = Self::new(cfg, tcfg, device)?;
        trainer
            .varmap
            .load(weights)
            .with_context(|| format!("loading VQ weights {}", weights.display()))?;
        Ok(trainer)
    }

    /// Resumes from `dir` when it holds a checkpoint, else starts fresh.
    pub fn resume_or_new(
        dir: &Path,
        cfg: &VqConfig,
        tcfg: &VqTrainConfig,
        device: &Device,
    ) -> Result<Self> {
        if dir.join(CHECKPOINT_STATE).exists() {
            Self::resume(dir, cfg, tcfg, device)
        } else {
            Self::new(cfg, tcfg, device)
        }
    }

    pub fn model(&self) -> &VqModel {
        &self.model
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    pub fn train_config(&self) -> &VqTrainConfig {
        &self.tcfg
    }

    /// Steps completed so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Seconds and losses of every step so far, resumed runs included.
    pub fn run_log(&self) -> &RunLog {
        &self.log
    }

    /// Gradients of the total loss of one batch (for checks; no update).
    pub fn gradients(&self, batch: impl Into<VqBatch>) -> Result<(Losses, GradStore)> {
        let batch = batch.into();
        let losses = self.losses_of(&batch.images, batch.cell_classes.as_ref())?;
        let grads = losses.total.backward()?;
        Ok((losses, grads))
    }

    /// One optimisation step on a batch, then the dead-code check.
    pub fn train_step(&mut self, batch: impl Into<VqBatch>) -> Result<StepStats> {
        let started = Instant::now();
        let batch = batch.into();
        let images = &batch.images;
        self.opt
            .set_learning_rate(learning_rate_at(&self.tcfg, self.step));
        if self.step == 0 && self.tcfg.restart_every > 0 {
            // Data-dependent codebook init: taming's U(-1/n, 1/n) entries sit
            // far from the encoder's outputs, so start every code on one.
            let z = self.model.encode_latents(images)?.detach();
            let (_, c, _, _) = z.dims4()?;
            let flat = z.permute((0, 2, 3, 1))?.reshape(((), c))?;
            let all: Vec<usize> = (0..self.cfg.num_embeddings).collect();
            self.reinit_codes(&all, &flat)?;
        }
        let vars = self.varmap.all_vars();
        let (threads, micro) = (self.tcfg.threads, self.tcfg.micro_batch);
        let batch = shards::batch_gradients(self, &vars, &batch, threads, micro)?;
        self.opt
            .step_with(|var| batch.grads.get(&var.as_tensor().id()).cloned())?;
        self.step += 1;

        let codes = batch.codes.flatten_all()?.to_vec1::<u32>()?;
        let mut in_batch = vec![false; self.cfg.num_embeddings];
        for &c in &codes {
            self.usage[c as usize] += 1;
            in_batch[c as usize] = true;
        }
        let every = self.tcfg.restart_every;
        let restarted = if every > 0 && self.step.is_multiple_of(every) {
            self.restart_dead_codes(&batch.latents)?
        } else {
            0
        };
        self.log.seconds += started.elapsed().as_secs_f64();
        let window_mean = self.log.reconstruction.add(batch.reconstruction);
        Ok(StepStats {
            window_mean,
            step: self.step,
            loss: batch.loss,
            reconstruction: batch.reconstruction,
            codebook: batch.codebook,
            commitment: batch.commitment,
            context: batch.context,
            shape: batch.shape,
            colour: batch.colour,
            codes_in_batch: in_batch.iter().filter(|&&b| b).count(),
            restarted,
        })
    }

    /// Trains until `total_steps` steps are done. `next_batch(step)` gives
    /// the batch of step `step` (0-based), so a resumed run sees the same
    /// batches. Checkpoints go to `checkpoint_dir` every `checkpoint_every`
    /// steps and at the end.
    pub fn run<F, B, G>(
        &mut self,
        total_steps: u64,
        mut next_batch: F,
        checkpoint_dir: Option<&Path>,
        mut on_step: G,
    ) -> Result<()>
    where
        F: FnMut(u64) -> Result<B>,
        B: Into<VqBatch>,
        G: FnMut(&StepStats),
    {
        while self.step < total_steps {
            let batch = next_batch(self.step)?;
            let stats = self.train_step(batch)?;
            on_step(&stats);
            if let Some(dir) = checkpoint_dir {
                let every = self.tcfg.checkpoint_every;
                if self.step == total_steps || (every > 0 && self.step.is_multiple_of(every)) {
                    self.save_checkpoint(dir)?;
                }
            }
        }
        Ok(())
    }

    /// Writes weights (taming names, loadable by [`VqModel::load`]),
    /// optimizer moments and the JSON state into `dir`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        checkpoint::save(self, dir)
    }

    /// Writes only the model weights (the file `serve` loads).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        checkpoint::save_weights(&self.varmap, path)
    }

    /// Merges every code within `distance` of a more-used one ([`merge`]),
    /// usage counted by encoding `images` (chunks of (B, 3, R, R)). Meant
    /// for the end of a run: the checkpoint keeps the unmerged codebook.
    pub fn merge_close_codes(&mut self, images: &[Tensor], distance: f32) -> Result<MergeReport> {
        let (n, dim) = (self.cfg.num_embeddings, self.cfg.embed_dim);
        let mut usage = vec![0u64; n];
        for chunk in images {
            for c in self.model.encode(chunk)?.flatten_all()?.to_vec1::<u32>()? {
                usage[c as usize] += 1;
            }
        }
        let var = find_var(&self.varmap, CODEBOOK)?;
        let book = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let rep_of = merge::representatives(&book, dim, &usage, distance);
        let merged = merge::merged(&book, dim, &rep_of);
        var.set(&Tensor::from_vec(merged, (n, dim), var.device())?)?;
        Ok(MergeReport::new(&usage, &rep_of))
    }

    /// Moves every code unused since the last check onto a randomly chosen
    /// encoder output of this batch (plus a little noise so that several
    /// restarted codes do not coincide), and zeroes their optimizer moments.
    fn restart_dead_codes(&mut self, latents: &Tensor) -> Result<usize> {
        let dead: Vec<usize> = (0..self.usage.len())
            .filter(|&i| self.usage[i] == 0)
            .collect();
        self.usage.iter_mut().for_each(|u| *u = 0);
        self.reinit_codes(&dead, latents)?;
        Ok(dead.len())
    }

    /// Sets codes `dead` to random rows of `latents` (N, embed_dim) plus a
    /// little noise, and zeroes their optimizer moments.
    fn reinit_codes(&mut self, dead: &[usize], latents: &Tensor) -> Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let (rows, dim) = latents.dims2()?;
        let latents = latents.flatten_all()?.to_vec1::<f32>()?;
        let var = find_var(&self.varmap, CODEBOOK)?;
        let mut codebook = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let spread = std_dev(&latents).max(1e-6) * 0.01;
        let mut rng = StdRng::seed_from_u64(mix(self.tcfg.seed, self.step));
        for &code in dead {
            let row = rng.random_range(0..rows);
            for k in 0..dim {
                let noise = rng.random_range(-1.0f32..1.0) * spread;
                codebook[code * dim + k] = latents[row * dim + k] + noise;
            }
        }
        let n = self.cfg.num_embeddings;
        var.set(&Tensor::from_vec(codebook, (n, dim), var.device())?)?;
        self.opt.reset_rows(CODEBOOK, dead)
    }
}

/// Linear warm-up, then constant or a cosine decay to a tenth.
fn learning_rate_at(tcfg: &VqTrainConfig, step: u64) -> f64 {
    let (warm, decay, peak) = (tcfg.warmup_steps, tcfg.decay_steps, tcfg.learning_rate);
    if warm > 0 && step < warm {
        peak * (step + 1) as f64 / warm as f64
    } else if decay > warm {
        let t = ((step - warm) as f64 / (decay - warm) as f64).min(1.0);
        peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    } else {
        peak
    }
}

/// Every variable of `varmap` with its name.
fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn find_var(varmap: &VarMap, name: &str) -> Result<Var> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    match data.get(name) {
        Some(v) => Ok(v.clone()),
        None => bail!("model has no variable `{name}`"),
    }
}

/// Seeds per restart without a stored RNG state: a SplitMix64 step of
/// (seed, step).
fn mix(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn std_dev(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    var.sqrt() as f32
}
