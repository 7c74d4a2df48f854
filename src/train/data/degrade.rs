//! Image degradations that imitate a VQ reconstruction (blur, noise), used to
//! measure how robust the checker is, and the median filter the checker
//! denoises with.

use image::{Rgb, RgbImage};
use rand::Rng;

/// 3x3 box blur with clamped edges.
pub fn box_blur3(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let mut sum = [0u32; 3];
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let nx = (x as i64 + dx).clamp(0, w as i64 - 1) as u32;
                let ny = (y as i64 + dy).clamp(0, h as i64 - 1) as u32;
                let p = img.get_pixel(nx, ny);
                for c in 0..3 {
                    sum[c] += p[c] as u32;
                }
            }
        }
        Rgb(sum.map(|s| ((s + 4) / 9) as u8))
    })
}

/// 3x3 per-channel median with clamped edges: removes noise, keeps edges.
pub fn median3(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let mut window = [[0u8; 9]; 3];
        let mut k = 0;
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let nx = (x as i64 + dx).clamp(0, w as i64 - 1) as u32;
                let ny = (y as i64 + dy).clamp(0, h as i64 - 1) as u32;
                let p = img.get_pixel(nx, ny);
                for c in 0..3 {
                    window[c][k] = p[c];
                }
                k += 1;
            }
        }
        Rgb(window.map(|mut v| {
            v.sort_unstable();
            v[4]
        }))
    })
}

/// Adds independent Gaussian noise of standard deviation `sigma` (in 0..255
/// units) to every channel, clamping to the valid range.
pub fn gaussian_noise<R: Rng + ?Sized>(img: &RgbImage, sigma: f32, rng: &mut R) -> RgbImage {
    let mut out = img.clone();
    for px in out.pixels_mut() {
        for c in 0..3 {
            let v = px[c] as f32 + sigma * standard_normal(rng);
            px[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// One N(0, 1) draw (Box-Muller).
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn blur_keeps_flat_images_and_softens_edges() {
        let flat = RgbImage::from_pixel(8, 8, Rgb([10, 20, 30]));
        assert_eq!(box_blur3(&flat), flat);
        let edge = RgbImage::from_fn(8, 8, |x, _| Rgb(if x < 4 { [0; 3] } else { [255; 3] }));
        let b = box_blur3(&edge);
        assert_eq!(b.get_pixel(3, 4)[0], 85);
        assert_eq!(b.get_pixel(4, 4)[0], 170);
    }

    #[test]
    fn median_removes_specks_and_keeps_edges() {
        let mut img = RgbImage::from_fn(8, 8, |x, _| Rgb(if x < 4 { [0; 3] } else { [255; 3] }));
        img.put_pixel(1, 1, Rgb([255; 3]));
        let m = median3(&img);
        assert_eq!(m.get_pixel(1, 1)[0], 0);
        assert_eq!(m.get_pixel(3, 4)[0], 0);
        assert_eq!(m.get_pixel(4, 4)[0], 255);
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let img = RgbImage::from_pixel(64, 64, Rgb([128; 3]));
        let noisy = gaussian_noise(&img, 20.0, &mut StdRng::seed_from_u64(1));
        let values: Vec<f32> = noisy.pixels().flat_map(|p| p.0).map(|v| v as f32).collect();
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32;
        assert!((mean - 128.0).abs() < 1.5, "mean {mean}");
        assert!((var.sqrt() - 20.0).abs() < 1.5, "std {}", var.sqrt());
    }
}
