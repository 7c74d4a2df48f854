//! Measures what merging close codebook entries does to a trained VQ
//! (`train::vq_train::merge`, the pipeline's `vq_merge_distance`): for each
//! distance, the distinct code vectors left, how predictable a patch's code
//! is from its pixels, and what the checker reads back from
//! reconstructions of held-out scenes.
//!
//! H(code | patch) is the entropy of the code given the exact 8x8 pixels of
//! its patch, over 1,500 training scenes: 0 when equal patches always get
//! the same code. The base decoder has to predict codes, so every nat here
//! is loss it cannot learn away from the caption alone.
//!
//! cargo run --release --example vq_merge_probe -- CONFIG.json VQ.safetensors DISTANCE...
//! (VQ.safetensors unmerged, e.g. `checkpoints/vq/vq.safetensors` of a `molora train` run,
//! to compare distances; or a run's merged `vqgan.safetensors` with no DISTANCE, to
//! measure it as it is: row 0 then counts its distinct code vectors)

use std::collections::HashMap;

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use molora::eval::image_checks::{class_named_by_code, held_out_scenes, psnr};
use molora::eval::model::at_checker_size;
use molora::model::vq::pixels::fit_square;
use molora::model::vq::{VqConfig, VqModel};
use molora::train::data::checker::{check, AttributeTally};
use molora::train::data::{Scene, Split};
use molora::train::vq_train::merge::{merged, representatives, MergeReport};
use molora::train::vq_train::CODEBOOK;
use rand::rngs::StdRng;
use rand::SeedableRng;

use common::{conditional_entropy, patch_pixels};

fn main() -> Result<()> {
    let usage = "usage: vq_merge_probe CONFIG.json VQ.safetensors DISTANCE...";
    let args: Vec<String> = std::env::args().collect();
    let cfg: VqConfig = serde_json::from_str(
        &std::fs::read_to_string(args.get(1).context(usage)?).context("reading the config")?,
    )?;
    let device = Device::Cpu;
    let tensors = candle_core::safetensors::load(args.get(2).context(usage)?, &device)?;
    let distances: Vec<f32> = args[3..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let book = tensors
        .get(CODEBOOK)
        .with_context(|| format!("no {CODEBOOK} in the weights"))?;
    let (n, dim) = book.dims2()?;
    let book = book.flatten_all()?.to_vec1::<f32>()?;
    let side = cfg.resolution as u32;
    let scenes_from = |seed: u64, count: usize| -> Vec<Scene> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count)
            .map(|_| Scene::random(&mut rng, Split::Train))
            .collect()
    };
    let render = |scenes: &[Scene]| -> Vec<_> {
        scenes
            .iter()
            .map(|s| fit_square(&s.render(), side))
            .collect()
    };
    let sample = render(&scenes_from(1, 512));
    let patch_scenes = scenes_from(2, 1500);
    let patches = render(&patch_scenes);
    let held_out = held_out_scenes(200, 1);

    let build = |codebook: Vec<f32>| -> Result<VqModel> {
        let mut t = tensors.clone();
        t.insert(
            CODEBOOK.into(),
            Tensor::from_vec(codebook, (n, dim), &device)?,
        );
        VqModel::new(&cfg, VarBuilder::from_tensors(t, DType::F32, &device))
    };
    let unmerged = build(book.clone())?;
    let mut used = vec![0u64; n];
    for img in &sample {
        for c in unmerged.encode_rgb(img)? {
            used[c as usize] += 1;
        }
    }
    println!("| distance | code vectors | H(code \\| patch) nats | shape cells whose code names their shape | PSNR dB | colour | shape | size | position | all |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &d in std::iter::once(&0.0).chain(&distances) {
        let (vq, groups) = if d > 0.0 {
            let rep_of = representatives(&book, dim, &used, d);
            let groups = MergeReport::new(&used, &rep_of).live_after;
            (build(merged(&book, dim, &rep_of))?, groups)
        } else {
            // A VQ merged in training holds repeated rows: count distinct ones.
            (build(book.clone())?, distinct_rows(&book, dim))
        };
        let entropy = code_entropy_given_patch(&vq, &patches, cfg.grid_size())?;
        let named = shapes_named(&vq, &patch_scenes, &patches, cfg.grid_size())?;
        let mut tally = AttributeTally::default();
        let mut db = 0.0;
        for scene in &held_out {
            let render = fit_square(&scene.render(), side);
            let recon = vq.decode_to_rgb(&vq.encode_rgb(&render)?)?;
            db += psnr(&render, &recon);
            tally.add(&check(&at_checker_size(recon), scene));
        }
        let r = |k: usize| 100.0 * k as f64 / tally.checked.max(1) as f64;
        println!(
            "| {d} | {groups} | {entropy:.2} | {:.1}% | {:.1} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {:.0}% |",
            100.0 * named,
            db / held_out.len() as f64,
            r(tally.colour),
            r(tally.shape),
            r(tally.size),
            r(tally.position),
            r(tally.all)
        );
    }
    Ok(())
}

/// How many different vectors the `dim`-wide rows of `book` hold.
fn distinct_rows(book: &[f32], dim: usize) -> usize {
    let rows: std::collections::HashSet<Vec<u32>> = book
        .chunks(dim)
        .map(|row| row.iter().map(|x| x.to_bits()).collect())
        .collect();
    rows.len()
}

/// Mean entropy (nats) of a patch's code given its exact pixels.
fn code_entropy_given_patch(vq: &VqModel, images: &[image::RgbImage], grid: usize) -> Result<f64> {
    let mut by_patch: HashMap<Vec<u8>, HashMap<u32, u64>> = HashMap::new();
    for img in images {
        for (cell, code) in vq.encode_rgb(img)?.into_iter().enumerate() {
            let codes = by_patch.entry(patch_pixels(img, grid, cell)).or_default();
            *codes.entry(code).or_default() += 1;
        }
    }
    Ok(conditional_entropy(by_patch.values()))
}

/// [`class_named_by_code`] over every cell of `scenes`.
fn shapes_named(
    vq: &VqModel,
    scenes: &[Scene],
    images: &[image::RgbImage],
    grid: usize,
) -> Result<f64> {
    let mut cells = Vec::new();
    for (scene, img) in scenes.iter().zip(images) {
        cells.extend(
            vq.encode_rgb(img)?
                .into_iter()
                .zip(scene.patch_shapes(grid as u32)),
        );
    }
    Ok(class_named_by_code(cells))
}
