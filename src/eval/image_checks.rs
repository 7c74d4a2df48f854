//! Checks of the image pipeline that do not depend on a routing mode: the
//! pixel checker on ground-truth renderings (it must read ≥ 99% there
//! before any generated picture is judged by it), the checker on VQ
//! reconstructions (the best a generated picture can do), and the VQ
//! reconstruction PSNR, all on held-out ([`Split::Test`]) scenes; and how
//! well a VQ's codes tell shapes apart.

use std::collections::HashMap;

use anyhow::Result;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::model::{at_checker_size, EvalModel};
use crate::model::vq::pixels::fit_square;
use crate::train::data::checker::{check, AttributeTally};
use crate::train::data::{Scene, Split};

/// `n` held-out scenes, deterministic from `seed`.
pub fn held_out_scenes(n: usize, seed: u64) -> Vec<Scene> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ce_0e5);
    (0..n)
        .map(|_| Scene::random(&mut rng, Split::Test))
        .collect()
}

/// The checker on the exact renderings of `scenes`.
pub fn checker_on_ground_truth(scenes: &[Scene]) -> AttributeTally {
    let mut tally = AttributeTally::default();
    for scene in scenes {
        tally.add(&check(&scene.render(), scene));
    }
    tally
}

/// The checker and PSNR on VQ reconstructions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VqCheck {
    pub checker: AttributeTally,
    /// Mean over images of the PSNR (dB, 8-bit peak) of the reconstruction
    /// against the rendering, at the VQ model's resolution.
    pub psnr_db: f64,
    pub images: usize,
    /// The first few (rendering, reconstruction) pairs, for `--save-images`.
    #[serde(skip)]
    pub samples: Vec<(RgbImage, RgbImage)>,
}

/// Reconstructions kept for `--save-images`.
pub const KEPT_SAMPLES: usize = 8;

/// Encodes and decodes each scene's rendering; reads the reconstructions
/// back and measures their PSNR.
pub fn checker_on_vq(model: &EvalModel, scenes: &[Scene]) -> Result<VqCheck> {
    let Some(vq) = &model.vq else {
        anyhow::bail!("the model has no VQ model");
    };
    let side = vq.config().resolution as u32;
    let renders: Vec<RgbImage> = scenes.iter().map(|s| s.render()).collect();
    let codes = model.encode_images(&renders)?;
    let recon = model.decode_images(&codes)?;
    let mut out = VqCheck {
        images: scenes.len(),
        ..VqCheck::default()
    };
    let mut psnr_sum = 0.0;
    for ((scene, render), img) in scenes.iter().zip(&renders).zip(recon) {
        psnr_sum += psnr(&fit_square(render, side), &img);
        let img = at_checker_size(img);
        out.checker.add(&check(&img, scene));
        if out.samples.len() < KEPT_SAMPLES {
            out.samples.push((render.clone(), img));
        }
    }
    out.psnr_db = psnr_sum / scenes.len().max(1) as f64;
    Ok(out)
}

/// Peak signal-to-noise ratio of `b` against `a` (same size), in dB with a
/// peak of 255; identical images are capped at 100 dB.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "PSNR of different sizes");
    let n = a.as_raw().len().max(1) as f64;
    let mse: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        100.0
    } else {
        (10.0 * (255.0f64 * 255.0 / mse).log10()).min(100.0)
    }
}

/// Of the cells a shape shows in, the share whose code alone tells their
/// class (which shape, or which colour, covers them): each code is read as
/// the class it most often stands for, and the reading is scored on the
/// same cells. `cells` holds a (code, `Scene::patch_shapes` or
/// `patch_colours` class) pair per latent cell; background cells (class 0)
/// are skipped. 1.0 when no code serves two classes.
pub fn class_named_by_code(cells: impl IntoIterator<Item = (u32, usize)>) -> f64 {
    let mut by_code: HashMap<u32, HashMap<usize, u64>> = HashMap::new();
    for (code, class) in cells {
        if class > 0 {
            *by_code.entry(code).or_default().entry(class).or_default() += 1;
        }
    }
    let (best, all) = by_code.values().fold((0u64, 0u64), |(best, all), classes| {
        (
            best + classes.values().max().copied().unwrap_or(0),
            all + classes.values().sum::<u64>(),
        )
    });
    best as f64 / all.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_a_known_error() {
        let a = RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let b = RgbImage::from_pixel(4, 4, image::Rgb([110, 100, 100]));
        // MSE = 100 / 3 over the channels.
        let want = 10.0 * (255.0f64.powi(2) / (100.0 / 3.0)).log10();
        assert!((psnr(&a, &b) - want).abs() < 1e-9);
        assert_eq!(psnr(&a, &a), 100.0);
    }

    #[test]
    fn a_code_is_read_as_the_shape_it_most_often_stands_for() {
        // Code 1 serves shape 1 twice and shape 2 once; code 3 only shape 2;
        // code 2 only background, which does not count.
        let cells = [(1, 1), (1, 1), (1, 2), (2, 0), (3, 2)];
        assert_eq!(class_named_by_code(cells), 3.0 / 4.0);
        assert_eq!(class_named_by_code([(2u32, 0usize)]), 0.0);
    }
}
