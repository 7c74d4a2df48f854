//! Helpers of the VQ tests (tests/vq.rs, tests/vq_train.rs): tiny
//! configurations, drawn test images and tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use molora::model::vq::VqConfig;
use molora::train::vq_train::{VqTrainConfig, VqTrainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pins candle's thread count for this process, as `molora` does for its
/// subcommands: without `RAYON_NUM_THREADS` candle 0.11 parses
/// /proc/cpuinfo on every CPU matmul, which doubled this file's run time.
pub fn pin_threads() {
    static PIN: std::sync::Once = std::sync::Once::new();
    PIN.call_once(|| molora::dispatch::threading::pin_candle_threads(false));
}

/// 16x16 images, 4x4 = 16 codes, 8..16 channels.
pub fn tiny_config() -> VqConfig {
    serde_json::from_str(
        r#"{"embed_dim": 8, "num_embeddings": 32, "latent_channels": 8, "resolution": 16,
            "in_channels": 3, "base_channels": 8, "channel_multiplier": [1, 2, 2],
            "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
            "attn_type": "vanilla", "norm_num_groups": 4}"#,
    )
    .unwrap()
}

/// Channel counts that are multiples of 32 (taming's 32 groups, two or more
/// channels per group), so that every bias has a non-trivial gradient.
pub fn grad_config() -> VqConfig {
    VqConfig {
        resolution: 8,
        base_channels: 64,
        channel_multiplier: vec![1, 1],
        attn_resolutions: Some(vec![8, 4]),
        norm_num_groups: None,
        ..tiny_config()
    }
}

/// `n` images of `side` pixels: a background colour and one or two
/// axis-aligned rectangles of other colours, in [-1, 1].
pub fn rectangles(n: usize, side: usize, seed: u64) -> Tensor {
    drawn_rectangles(n, side, 1, seed)
}

/// Like [`rectangles`], with edges on multiples of `align` pixels.
pub fn drawn_rectangles(n: usize, side: usize, align: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let palette: [[f32; 3]; 6] = [
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
        [1.0, 1.0, -1.0],
        [1.0, 1.0, 1.0],
        [-1.0, -1.0, -1.0],
    ];
    let mut data = vec![0f32; n * 3 * side * side];
    for i in 0..n {
        let bg = palette[rng.random_range(0..palette.len())];
        let img = &mut data[i * 3 * side * side..(i + 1) * 3 * side * side];
        for c in 0..3 {
            img[c * side * side..(c + 1) * side * side].fill(bg[c]);
        }
        for _ in 0..rng.random_range(1..=2) {
            let colour = palette[rng.random_range(0..palette.len())];
            let cells = side / align;
            let (w, h) = (
                rng.random_range(1..=cells / 2),
                rng.random_range(1..=cells / 2),
            );
            let (x0, y0) = (
                rng.random_range(0..=cells - w),
                rng.random_range(0..=cells - h),
            );
            let (w, h, x0, y0) = (w * align, h * align, x0 * align, y0 * align);
            for c in 0..3 {
                for y in y0..y0 + h {
                    for x in x0..x0 + w {
                        img[c * side * side + y * side + x] = colour[c];
                    }
                }
            }
        }
    }
    Tensor::from_vec(data, (n, 3, side, side), &Device::Cpu).unwrap()
}

pub fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a == b
}

pub fn weights_of(varmap: &VarMap) -> HashMap<String, Vec<f32>> {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// `pairs` pairs of images (2k, 2k + 1): a drawn-rectangles image, then the
/// same image with one more rectangle on the `align` grid, so the two share
/// every cell the new rectangle misses.
pub fn paired_rectangles(pairs: usize, side: usize, align: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let plane = side * side;
    let mut data = Vec::with_capacity(pairs * 2 * 3 * plane);
    for k in 0..pairs {
        let first = drawn_rectangles(1, side, align, seed.wrapping_mul(1000) + k as u64);
        let first = first.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut second = first.clone();
        let cells = side / align;
        let (x0, y0) = (rng.random_range(0..cells), rng.random_range(0..cells));
        let colour = [
            rng.random_range(-1.0f32..1.0),
            rng.random_range(-1.0f32..1.0),
            0.3,
        ];
        for c in 0..3 {
            for y in y0 * align..(y0 + 1) * align {
                for x in x0 * align..(x0 + 1) * align {
                    second[c * plane + y * side + x] = colour[c];
                }
            }
        }
        data.extend(first);
        data.extend(second);
    }
    Tensor::from_vec(data, (pairs * 2, 3, side, side), &Device::Cpu).unwrap()
}

/// The distinct codes of `images` under the trainer's current codebook.
pub fn code_ids(trainer: &VqTrainer, images: &Tensor) -> Vec<u32> {
    let codes = trainer.model().encode(images).unwrap();
    let mut used = codes.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    used.sort();
    used.dedup();
    used
}

pub fn codes_used(trainer: &VqTrainer, images: &Tensor) -> usize {
    code_ids(trainer, images).len()
}

/// The tiny VQ after `steps` full training steps on drawn rectangles.
pub fn trained_on_rectangles(steps: u64) -> VqTrainer {
    let tcfg = VqTrainConfig {
        learning_rate: 3e-3,
        restart_every: 25,
        ..VqTrainConfig::new(11)
    };
    let mut trainer = VqTrainer::new(&tiny_config(), &tcfg, &Device::Cpu).unwrap();
    let batches = |step| Ok(drawn_rectangles(16, 16, 4, 100 + step));
    trainer.run(steps, batches, None, |_| {}).unwrap();
    trainer
}

pub fn codebook(trainer: &VqTrainer) -> Vec<Vec<f32>> {
    let book = trainer.model().quantizer().codebook();
    book.to_vec2::<f32>().unwrap()
}

pub fn distinct_vectors(trainer: &VqTrainer) -> usize {
    let mut rows: Vec<Vec<u32>> = codebook(trainer)
        .iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect();
    rows.sort();
    rows.dedup();
    rows.len()
}
