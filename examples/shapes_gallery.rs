//! Writes a 4x4 PNG grid of random shape scenes and prints their captions
//! with what the checker reads back from the pixels.
//!
//! cargo run --release --example shapes_gallery -- [OUT.png] [SEED]

use anyhow::{Context, Result};
use image::{imageops, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::SeedableRng;

use molora::train::data::checker::detect;
use molora::train::data::shapes::{Scene, IMAGE_SIZE};
use molora::train::data::Split;

const GRID: u32 = 4;
const SCALE: u32 = 2;
const GAP: u32 = 4;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "shapes_gallery.png".into());
    let seed: u64 = match args.next() {
        Some(s) => s
            .parse()
            .with_context(|| format!("seed {s:?} is not a number"))?,
        None => 0,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let cell = IMAGE_SIZE * SCALE;
    let side = GRID * cell + (GRID + 1) * GAP;
    let mut canvas = RgbImage::from_pixel(side, side, Rgb([90, 90, 90]));
    for i in 0..GRID * GRID {
        // The last row shows held-out colour-shape pairs.
        let split = if i >= GRID * (GRID - 1) {
            Split::HeldOutPairs
        } else {
            Split::Train
        };
        let scene = Scene::random(&mut rng, split);
        let image = scene.render();
        let big = imageops::resize(&image, cell, cell, imageops::FilterType::Nearest);
        let (row, col) = (i / GRID, i % GRID);
        imageops::replace(
            &mut canvas,
            &big,
            (GAP + col * (cell + GAP)) as i64,
            (GAP + row * (cell + GAP)) as i64,
        );
        let read: Vec<String> = detect(&image)?
            .shapes
            .iter()
            .map(|d| {
                format!(
                    "{} {} {} @{}",
                    d.size.name(),
                    d.colour.name(),
                    d.shape.name(),
                    d.position.name()
                )
            })
            .collect();
        println!(
            "[{row},{col}] {:<13} {}\n        checker reads: {}",
            format!("{split:?}"),
            scene.caption(),
            read.join("; ")
        );
    }
    canvas
        .save(&out)
        .with_context(|| format!("{out}: cannot write the gallery"))?;
    println!("wrote {out}");
    Ok(())
}
