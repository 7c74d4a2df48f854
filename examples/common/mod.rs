//! Helpers the VQ probes share (`vq_merge_probe`, `vq_shape_probe`).

use std::collections::HashMap;
use std::hash::Hash;

use image::RgbImage;

/// The RGB bytes of cell `cell` (row-major) of a `grid` x `grid` split of
/// `img`.
pub fn patch_pixels(img: &RgbImage, grid: usize, cell: usize) -> Vec<u8> {
    let patch = img.width() as usize / grid;
    let (y0, x0) = (cell / grid * patch, cell % grid * patch);
    let mut pixels = Vec::with_capacity(patch * patch * 3);
    for y in y0..y0 + patch {
        for x in x0..x0 + patch {
            pixels.extend_from_slice(&img.get_pixel(x as u32, y as u32).0);
        }
    }
    pixels
}

/// H(outcome | group) in nats: the entropy of the outcome counts within
/// each group, weighted by the group's share of all counts.
pub fn conditional_entropy<'a, K: Eq + Hash + 'a>(
    groups: impl Iterator<Item = &'a HashMap<K, u64>>,
) -> f64 {
    let (mut nats, mut total) = (0.0, 0u64);
    for counts in groups {
        let n: u64 = counts.values().sum();
        for &c in counts.values() {
            nats -= c as f64 * (c as f64 / n as f64).ln();
        }
        total += n;
    }
    nats / total.max(1) as f64
}
