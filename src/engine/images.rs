//! Image codes -> PNG bytes: finished pictures and partial previews.
//!
//! Invariants:
//! - codes here are codebook indices (token id minus the image range's
//!   start), in row-major grid order;
//! - a preview decodes the codes so far with code 0 in the missing cells,
//!   then paints those cells a flat grey, so the picture fills in row by row;
//! - without a VQ model nothing is decoded: the caller gets an error naming
//!   the missing file, never a panic.

use std::io::Cursor;

use anyhow::{anyhow, bail, Context, Result};
use image::{ImageFormat, Rgb, RgbImage};

use crate::model::vq::VqModel;

/// The VQ model's weights inside a model directory (its configuration is the
/// `vq_config` object of `config.json`).
pub const VQ_WEIGHTS_FILE: &str = "vqgan.safetensors";

/// Grey of the cells a preview has no code for yet.
const BLANK: Rgb<u8> = Rgb([128, 128, 128]);

/// A PNG and its size.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

fn require(vq: Option<&VqModel>) -> Result<&VqModel> {
    vq.ok_or_else(|| {
        anyhow!(
            "the model has no VQ decoder ({VQ_WEIGHTS_FILE} with a vq_config in config.json is missing), \
             so image codes cannot be turned into a PNG"
        )
    })
}

/// Decodes one complete image: `grid[0] * grid[1]` codes.
pub fn render(vq: Option<&VqModel>, codes: &[u32], grid: [usize; 2]) -> Result<Picture> {
    let vq = require(vq)?;
    if codes.len() != grid[0] * grid[1] {
        bail!(
            "an image needs {} codes ({}x{}), got {}",
            grid[0] * grid[1],
            grid[0],
            grid[1],
            codes.len()
        );
    }
    let img = vq.decode_to_rgb(codes).context("VQ decoding failed")?;
    picture(&img)
}

/// Decodes the first `codes.len()` codes of an image; the cells without a
/// code yet are grey.
pub fn render_preview(vq: Option<&VqModel>, codes: &[u32], grid: [usize; 2]) -> Result<Picture> {
    let vq = require(vq)?;
    let cells = grid[0] * grid[1];
    if codes.len() > cells {
        bail!("a preview holds at most {cells} codes, got {}", codes.len());
    }
    let mut full = codes.to_vec();
    full.resize(cells, 0);
    let mut img = vq.decode_to_rgb(&full).context("VQ decoding failed")?;
    blank_cells(&mut img, codes.len(), grid);
    picture(&img)
}

/// Paints the grid cells from index `done` on (row-major) grey.
fn blank_cells(img: &mut RgbImage, done: usize, grid: [usize; 2]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let [rows, cols] = grid;
    for cell in done..rows * cols {
        let (r, c) = (cell / cols, cell % cols);
        for y in r * h / rows..(r + 1) * h / rows {
            for x in c * w / cols..(c + 1) * w / cols {
                img.put_pixel(x as u32, y as u32, BLANK);
            }
        }
    }
}

fn picture(img: &RgbImage) -> Result<Picture> {
    Ok(Picture {
        png: encode_png(img)?,
        width: img.width(),
        height: img.height(),
    })
}

pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .context("PNG encoding failed")?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_vq_is_an_error_naming_the_file() {
        let err = render(None, &[0; 4], [2, 2]).unwrap_err().to_string();
        assert!(err.contains(VQ_WEIGHTS_FILE), "{err}");
        assert!(render_preview(None, &[0; 1], [2, 2]).is_err());
    }

    #[test]
    fn blank_cells_grey_out_exactly_the_missing_codes() {
        let mut img = RgbImage::from_pixel(8, 8, Rgb([0, 0, 0]));
        blank_cells(&mut img, 3, [2, 2]);
        // Cells 0, 1, 2 are kept; cell 3 (bottom right, x and y in 4..8) is grey.
        for (x, y, p) in img.enumerate_pixels() {
            let grey = x >= 4 && y >= 4;
            assert_eq!(*p == BLANK, grey, "pixel ({x}, {y})");
        }
        let png = encode_png(&img).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
