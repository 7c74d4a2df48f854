//! Conversions between `image::RgbImage` and the VQ model's pixel tensors.
//!
//! The model sees (B, 3, H, W) f32 in [-1, 1]: `x = p / 127.5 - 1` for a byte
//! `p`; the way back clamps to [-1, 1] and rounds `(x + 1) * 127.5`.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Images of one size -> (B, 3, H, W) in [-1, 1].
pub fn rgb_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("no images to convert");
    };
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for (i, img) in images.iter().enumerate() {
        if img.dimensions() != (w, h) {
            bail!(
                "image {i} is {}x{}, but image 0 is {w}x{h}",
                img.width(),
                img.height()
            );
        }
        data.extend(img.as_raw().iter().map(|&p| p as f32 / 127.5 - 1.0));
    }
    let t = Tensor::from_vec(data, (images.len(), h as usize, w as usize, 3), device)?;
    Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
}

/// One image (3, H, W) in [-1, 1] -> RgbImage (clamped, rounded).
pub fn tensor_to_rgb(image: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        bail!("expected 3 channels to make an RGB image, got {c}");
    }
    let bytes = ((image.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    match RgbImage::from_raw(w as u32, h as u32, bytes) {
        Some(img) => Ok(img),
        None => bail!("pixel buffer does not match {w}x{h}"),
    }
}

/// Centre-crops to a square and resizes to `side` x `side` when needed.
pub fn fit_square(img: &RgbImage, side: u32) -> RgbImage {
    if img.dimensions() == (side, side) {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let s = w.min(h);
    let cropped = image::imageops::crop_imm(img, (w - s) / 2, (h - s) / 2, s, s).to_image();
    image::imageops::resize(&cropped, side, side, image::imageops::FilterType::Triangle)
}
