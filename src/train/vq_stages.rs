//! The VQ stages of the pipeline: `vq` trains the whole VQ-VAE and merges
//! its close codes; `vq_decoder` then trains the decoder alone on the codes
//! the merged encoder gives, so the pictures sharpen while every image
//! keeps its codes (the base, trained on those codes, does not notice).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::batch::mix;
use super::data::shapes::Scene;
use super::data::Split;
use super::pipeline::{record, Run, StageLog};
use super::threads::MatmulThreads;
use super::vq_train::{
    StepStats, VqBatch, VqTrainConfig, VqTrainer, CHECKPOINT_STATE, COLOUR_CLASSES, SHAPE_CLASSES,
};
use crate::engine::images::VQ_WEIGHTS_FILE;
use crate::model::vq::pixels::fit_square;
use crate::model::vq::rgb_to_tensor;

/// `vq`: the VQ-VAE on shapes-world training scenes, then the merge of
/// close codes (`vq_merge_distance`).
pub fn vq(run: &Run, device: &Device) -> Result<()> {
    let cfg = &run.cfg;
    let seed = run.stage_seed("vq");
    let tcfg = VqTrainConfig {
        decay_steps: cfg.vq_steps,
        context_weight: cfg.vq_context_weight,
        shape_weight: cfg.vq_shape_weight,
        colour_weight: cfg.vq_colour_weight,
        ..train_config(run, seed)
    };
    let _one_thread = MatmulThreads::limit(1);
    let dir = run.checkpoint_dir("vq");
    let mut trainer = VqTrainer::resume_or_new(&dir, &cfg.vq, &tcfg, device)?;
    train(run, &mut trainer, "vq", seed, cfg.vq_steps, &dir, device)?;
    let merge_started = Instant::now();
    if cfg.vq_merge_distance > 0.0 {
        let side = cfg.vq.resolution as u32;
        let scenes = usage_sample(mix(seed, u64::MAX), side, device)?;
        let report = trainer.merge_close_codes(&scenes, cfg.vq_merge_distance)?;
        super::progress::println(&format!(
            "vq: codes within {} merged: {} live codes -> {}",
            cfg.vq_merge_distance, report.live_before, report.live_after
        ));
    }
    trainer.save_weights(&run.path(VQ_WEIGHTS_FILE))?;
    let merge_seconds = merge_started.elapsed().as_secs_f64();
    record_stage(run, "vq", &trainer, merge_seconds)
}

/// `vq_decoder`: `vq_decoder_steps` more steps for the decoder alone
/// ([`VqTrainConfig::decoder_only`]), starting from the `vq` stage's
/// weights. Encoder and codebook stay bit for bit as they were.
pub fn vq_decoder(run: &Run, device: &Device) -> Result<()> {
    let cfg = &run.cfg;
    if cfg.vq_decoder_steps == 0 {
        return Ok(());
    }
    let seed = run.stage_seed("vq_decoder");
    let tcfg = VqTrainConfig {
        decay_steps: cfg.vq_decoder_steps,
        restart_every: 0,
        decoder_only: true,
        ..train_config(run, seed)
    };
    let _one_thread = MatmulThreads::limit(1);
    let dir = run.checkpoint_dir("vq_decoder");
    let mut trainer = if dir.join(CHECKPOINT_STATE).exists() {
        VqTrainer::resume(&dir, &cfg.vq, &tcfg, device)?
    } else {
        VqTrainer::from_weights(&run.path(VQ_WEIGHTS_FILE), &cfg.vq, &tcfg, device)?
    };
    let steps = cfg.vq_decoder_steps;
    train(run, &mut trainer, "vq_decoder", seed, steps, &dir, device)?;
    trainer.save_weights(&run.path(VQ_WEIGHTS_FILE))?;
    record_stage(run, "vq_decoder", &trainer, 0.0)
}

/// The settings both VQ stages share.
fn train_config(run: &Run, seed: u64) -> VqTrainConfig {
    // Micro-batches spread over the cores, each matmul on one thread: ~3x
    // faster here than candle's own threading on these small convs.
    VqTrainConfig {
        learning_rate: run.cfg.vq_learning_rate,
        checkpoint_every: 50,
        warmup_steps: 20,
        threads: run.threads(),
        foreground_weight: run.cfg.vq_foreground_weight,
        ..VqTrainConfig::new(seed)
    }
}

/// Trains to `steps` on batches of training scenes drawn from (seed, step),
/// with a progress bar; returns the mean reconstruction loss per window.
fn train(
    run: &Run,
    trainer: &mut VqTrainer,
    stage: &str,
    seed: u64,
    steps: u64,
    dir: &Path,
    device: &Device,
) -> Result<()> {
    let side = run.cfg.vq.resolution as u32;
    let batch = run.cfg.vq_batch;
    let paired = trainer.train_config().context_weight > 0.0;
    let classes = CellClasses::for_losses(trainer.train_config(), run.cfg.vq.grid_size());
    let trained = TrainedLosses {
        context: paired,
        shape: classes.is_some_and(|c| c.shapes),
        colour: classes.is_some_and(|c| c.colours),
    };
    let bar = super::progress::bar(stage, steps, trainer.step_count());
    trainer.run(
        steps,
        |step| {
            let rng = &mut StdRng::seed_from_u64(mix(seed, step));
            let scenes = if paired {
                scene_pairs(rng, batch)?
            } else {
                random_scenes(rng, batch)
            };
            vq_batch(&scenes, side, classes, device)
        },
        Some(dir),
        |s| {
            bar.set_position(s.step);
            bar.set_message(format!(
                "{} codes {}",
                trained.line(s.reconstruction, s),
                s.codes_in_batch
            ));
            if let (Some(mean), true) = (s.window_mean, bar.is_hidden()) {
                eprintln!(
                    "{stage}: step {} {} codes in batch {}",
                    s.step,
                    trained.line(mean, s),
                    s.codes_in_batch
                );
            }
        },
    )?;
    bar.finish();
    Ok(())
}

/// Which of the optional VQ losses this stage trains, so the progress line
/// never shows a loss that is not trained.
struct TrainedLosses {
    context: bool,
    shape: bool,
    colour: bool,
}

impl TrainedLosses {
    /// `recon` is the logged window's mean or the step's own reconstruction.
    fn line(&self, recon: f32, s: &StepStats) -> String {
        let mut line = format!("recon {recon:.4}");
        if self.context {
            line += &format!(" context {:.4}", s.context);
        }
        if self.shape {
            line += &format!(" shape {:.3}", s.shape);
        }
        if self.colour {
            line += &format!(" colour {:.3}", s.colour);
        }
        line
    }
}

/// The stage's line in `train_log.json`: the whole run as its checkpoints
/// recorded it, plus `extra_seconds` of this invocation's work after
/// training (the merge).
fn record_stage(run: &Run, stage: &str, trainer: &VqTrainer, extra_seconds: f64) -> Result<()> {
    let log = trainer.run_log();
    record(
        &run.out,
        StageLog::new(
            stage,
            trainer.step_count(),
            log.seconds + extra_seconds,
            trainer.step_count() * run.cfg.vq_batch as u64,
            log.reconstruction.loss_log.clone(),
        ),
    )
}

/// 512 training scenes in chunks of 32: the sample whose code usage decides
/// which codes a merge keeps.
fn usage_sample(seed: u64, side: u32, device: &Device) -> Result<Vec<Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..16)
        .map(|_| scene_images(&random_scenes(&mut rng, 32), side, device))
        .collect()
}

/// `n` random training scenes drawn from `rng`.
fn random_scenes(rng: &mut StdRng, n: usize) -> Vec<Scene> {
    (0..n).map(|_| Scene::random(rng, Split::Train)).collect()
}

/// `n / 2` pairs for the context loss: a random two-shape training scene,
/// then the same scene with one of its shapes left out (also a training
/// scene).
fn scene_pairs(rng: &mut StdRng, n: usize) -> Result<Vec<Scene>> {
    anyhow::ensure!(
        n.is_multiple_of(2),
        "a batch of image pairs needs an even size, got {n}"
    );
    let mut scenes = Vec::with_capacity(n);
    while scenes.len() < n {
        let scene = Scene::random(rng, Split::Train);
        if scene.shapes.len() != 2 {
            continue;
        }
        let keep = rng.random_range(0..2);
        let mut partner = [keep, 1 - keep].into_iter().map(|k| Scene {
            background: scene.background,
            shapes: vec![scene.shapes[k]],
        });
        if let Some(alone) = partner.find(|s| s.in_split(Split::Train)) {
            scenes.push(scene);
            scenes.push(alone);
        }
    }
    Ok(scenes)
}

/// The scenes' pictures as (n, 3, side, side) in [-1, 1].
fn scene_images(scenes: &[Scene], side: u32, device: &Device) -> Result<Tensor> {
    let images: Vec<_> = scenes
        .iter()
        .map(|s| fit_square(&s.render(), side))
        .collect();
    rgb_to_tensor(&images, device)
}

/// Which per-cell classes a VQ batch carries: the targets of the shape
/// and colour losses, on the latent grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellClasses {
    pub grid: usize,
    pub shapes: bool,
    pub colours: bool,
}

impl CellClasses {
    /// The classes `tcfg`'s losses read, if any.
    pub fn for_losses(tcfg: &VqTrainConfig, grid: usize) -> Option<Self> {
        let (shapes, colours) = (tcfg.shape_weight > 0.0, tcfg.colour_weight > 0.0);
        (shapes || colours).then_some(CellClasses {
            grid,
            shapes,
            colours,
        })
    }
}

/// A VQ training batch of `scenes`; with `classes`, each latent cell's
/// one-hot classes too ([`cell_targets`]).
pub fn vq_batch(
    scenes: &[Scene],
    side: u32,
    classes: Option<CellClasses>,
    device: &Device,
) -> Result<VqBatch> {
    Ok(VqBatch {
        images: scene_images(scenes, side, device)?,
        cell_classes: match classes {
            Some(classes) => Some(cell_targets(scenes, classes, device)?),
            None => None,
        },
    })
}

/// A scene's class per cell of a grid ([`Scene::patch_shapes`]).
type ClassesOf = fn(&Scene, u32) -> Vec<usize>;

/// One-hot classes (n, K, grid, grid): the shape classes of
/// [`Scene::patch_shapes`], then the colour classes of
/// [`Scene::patch_colours`], each where `classes` asks for it.
pub fn cell_targets(scenes: &[Scene], classes: CellClasses, device: &Device) -> Result<Tensor> {
    let grid = classes.grid;
    let mut groups: Vec<(usize, ClassesOf)> = Vec::new();
    if classes.shapes {
        groups.push((SHAPE_CLASSES, Scene::patch_shapes));
    }
    if classes.colours {
        groups.push((COLOUR_CLASSES, Scene::patch_colours));
    }
    let k: usize = groups.iter().map(|g| g.0).sum();
    let cells = grid * grid;
    let mut one_hot = vec![0f32; scenes.len() * k * cells];
    for (i, scene) in scenes.iter().enumerate() {
        let mut first = 0;
        for (group_classes, classes_of) in &groups {
            for (cell, class) in classes_of(scene, grid as u32).into_iter().enumerate() {
                one_hot[(i * k + first + class) * cells + cell] = 1.0;
            }
            first += group_classes;
        }
    }
    Ok(Tensor::from_vec(
        one_hot,
        (scenes.len(), k, grid, grid),
        device,
    )?)
}
