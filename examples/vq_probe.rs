//! Trains a VQ-VAE configuration for a while and reports, every few steps,
//! the step time, the reconstruction loss and what the image checker reads
//! back from reconstructions of held-out scenes. Used to choose the demo
//! model's VQ (see BENCHMARKS.md / EVAL.md); the pipeline itself trains the
//! VQ with `molora train vq`.
//!
//! cargo run --release --example vq_probe -- CONFIG.json STEPS BATCH LR EVAL_EVERY [micro] [OUT]
//!
//! With `ENCODER=vqgan.safetensors` the run keeps that VQ's encoder and
//! codebook, frozen, and trains a fresh decoder of CONFIG's size alone on
//! its codes: does a wider decoder read more back from the same codes?

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use molora::eval::image_checks::{held_out_scenes, psnr};
use molora::eval::model::at_checker_size;
use molora::model::vq::pixels::fit_square;
use molora::model::vq::VqConfig;
use molora::train::data::checker::{check, AttributeTally};
use molora::train::data::Scene;
use molora::train::data::Split;
use molora::train::vq_stages::{vq_batch, CellClasses};
use molora::train::vq_train::{VqTrainConfig, VqTrainer};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vq_probe CONFIG.json STEPS BATCH LR EVAL_EVERY [MICRO]";
    let cfg: VqConfig = serde_json::from_str(
        &std::fs::read_to_string(args.get(1).context(usage)?).context("reading the config")?,
    )?;
    let num = |i: usize| -> Result<f64> { Ok(args.get(i).context(usage)?.parse::<f64>()?) };
    let (steps, batch, lr, every) = (num(2)? as u64, num(3)? as usize, num(4)?, num(5)? as u64);
    let micro = args.get(6).map_or(Ok(2), |s| s.parse::<usize>())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = rayon::current_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let device = Device::Cpu;
    let tcfg = VqTrainConfig {
        learning_rate: lr,
        warmup_steps: 20,
        threads,
        micro_batch: micro,
        // FOREGROUND_WEIGHT=k weighs shape pixels 1+k (VqTrainConfig::foreground_weight).
        foreground_weight: std::env::var("FOREGROUND_WEIGHT").map_or(Ok(0.0), |v| v.parse())?,
        // SHAPE_WEIGHT=w adds the shape loss (VqTrainConfig::shape_weight).
        shape_weight: std::env::var("SHAPE_WEIGHT").map_or(Ok(0.0), |v| v.parse())?,
        // COLOUR_WEIGHT=w adds the colour loss (VqTrainConfig::colour_weight).
        colour_weight: std::env::var("COLOUR_WEIGHT").map_or(Ok(0.0), |v| v.parse())?,
        ..VqTrainConfig::new(7)
    };
    let encoder = std::env::var("ENCODER").ok();
    let tcfg = match encoder {
        Some(_) => VqTrainConfig {
            decoder_only: true,
            restart_every: 0,
            decay_steps: steps,
            ..tcfg
        },
        None => tcfg,
    };
    let mut trainer = VqTrainer::new(&cfg, &tcfg, &device)?;
    if let Some(path) = &encoder {
        load_encoder_side(&trainer, path, &device)?;
    }
    let side = cfg.resolution as u32;
    let classes = CellClasses::for_losses(&tcfg, cfg.grid_size());
    let scenes = held_out_scenes(100, 1);
    let started = Instant::now();
    println!("| step | s/step | recon | shape loss | codes/batch | PSNR dB | colour | shape | size | position | count | all |");
    let mut done = 0;
    while done < steps {
        let target = (done + every).min(steps);
        let t0 = Instant::now();
        let (mut recon, mut shape, mut codes) = (0f64, 0f64, 0usize);
        trainer.run(
            target,
            |step| {
                let mut rng = StdRng::seed_from_u64(step.wrapping_mul(0x9E37_79B9) ^ 11);
                let scenes: Vec<_> = (0..batch)
                    .map(|_| Scene::random(&mut rng, Split::Train))
                    .collect();
                vq_batch(&scenes, side, classes, &device)
            },
            None,
            |s| {
                recon += s.reconstruction as f64;
                shape += s.shape as f64;
                codes = s.codes_in_batch;
            },
        )?;
        let per_step = t0.elapsed().as_secs_f64() / (target - done) as f64;
        let recon = recon / (target - done) as f64;
        let shape = shape / (target - done) as f64;
        done = target;
        let (tally, db) = evaluate(&trainer, &scenes, side)?;
        let r = |n: usize| 100.0 * n as f64 / tally.checked.max(1) as f64;
        println!(
            "| {done} | {per_step:.2} | {recon:.4} | {shape:.3} | {codes} | {db:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r(tally.colour), r(tally.shape), r(tally.size), r(tally.position), r(tally.count), r(tally.all)
        );
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    if let Some(out) = args.get(7) {
        trainer.save_weights(std::path::Path::new(out))?;
    }
    Ok(())
}

fn evaluate(trainer: &VqTrainer, scenes: &[Scene], side: u32) -> Result<(AttributeTally, f64)> {
    let vq = trainer.model();
    let mut tally = AttributeTally::default();
    let mut db = 0.0;
    for scene in scenes {
        let render = fit_square(&scene.render(), side);
        let recon = vq.decode_to_rgb(&vq.encode_rgb(&render)?)?;
        db += psnr(&render, &recon);
        tally.add(&check(&at_checker_size(recon), scene));
    }
    Ok((tally, db / scenes.len() as f64))
}

/// Sets every weight outside the decoder (`decoder.*`, `post_quant_conv.*`)
/// from the VQ at `path`: the encoder, `quant_conv` and the codebook.
fn load_encoder_side(trainer: &VqTrainer, path: &str, device: &Device) -> Result<()> {
    let weights = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{path}: cannot read VQ weights"))?;
    let vars = trainer.varmap().data().lock().unwrap();
    for (name, var) in vars.iter() {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            continue;
        }
        let w = weights
            .get(name)
            .with_context(|| format!("{path}: no {name}"))?;
        var.set(w)
            .with_context(|| format!("{name}: the encoder side of {path} does not fit CONFIG"))?;
    }
    Ok(())
}
