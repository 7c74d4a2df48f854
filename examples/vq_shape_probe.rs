//! How well a VQ's codes carry the shapes world, as the base decoder sees
//! them. Over every single-shape scene (and pairs built from them):
//!
//! - distinct code grids among the four shapes of one (colour, size,
//!   position, background): 4 when the codes tell every shape apart;
//! - context: the share of a shape's patches that keep their code when a
//!   second shape is added elsewhere, and when the shape moves to another
//!   position. A base decoder composes scenes from parts only when a part's
//!   codes do not depend on the rest of the picture;
//! - H(patch | code): how many different pixel patches one code stands for.
//!
//! cargo run --release --example vq_shape_probe -- CONFIG.json VQ.safetensors

use std::collections::{BTreeMap, HashMap, HashSet};

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use molora::model::vq::{VqConfig, VqModel};
use molora::train::data::shapes::{
    Background, Colour, Line, Position, Shape, ShapeSpec, Size, IMAGE_SIZE,
};
use molora::train::data::Scene;

use common::{conditional_entropy, patch_pixels};

fn main() -> Result<()> {
    let usage = "usage: vq_shape_probe CONFIG.json VQ.safetensors";
    let args: Vec<String> = std::env::args().collect();
    let cfg: VqConfig = serde_json::from_str(
        &std::fs::read_to_string(args.get(1).context(usage)?).context("reading the config")?,
    )?;
    anyhow::ensure!(
        cfg.resolution == IMAGE_SIZE as usize,
        "the probe reads codes of {IMAGE_SIZE}-pixel scenes; the VQ takes {}",
        cfg.resolution
    );
    let weights = args.get(2).context(usage)?;
    let device = Device::Cpu;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
    let vq = VqModel::new(&cfg, vb).context("loading the VQ")?;
    let grid = cfg.grid_size();
    let patch = IMAGE_SIZE as usize / grid;
    let codes_of =
        |background, shapes: Vec<ShapeSpec>| vq.encode_rgb(&Scene { background, shapes }.render());

    let mut distinct = BTreeMap::<&str, (usize, usize)>::new();
    let mut patches_of_code: HashMap<u32, HashMap<Vec<u8>, u64>> = HashMap::new();
    for &background in Background::ALL {
        for &colour in Colour::ALL {
            for &size in Size::ALL {
                for &position in Position::ALL {
                    let mut grids = HashSet::new();
                    for &shape in Shape::ALL {
                        let spec = ShapeSpec {
                            shape,
                            colour,
                            size,
                            position,
                        };
                        let img = Scene {
                            background,
                            shapes: vec![spec],
                        }
                        .render();
                        let codes = vq.encode_rgb(&img)?;
                        for (cell, &code) in codes.iter().enumerate() {
                            let counts = patches_of_code.entry(code).or_default();
                            *counts.entry(patch_pixels(&img, grid, cell)).or_default() += 1;
                        }
                        grids.insert(codes);
                    }
                    let d = distinct.entry(size.name()).or_default();
                    *d = (d.0 + 1, d.1 + grids.len());
                }
            }
        }
    }
    for (size, (groups, grids)) in &distinct {
        println!(
            "{size} shapes: {:.2} distinct code grids among the 4 shapes",
            *grids as f64 / *groups as f64
        );
    }

    let (mut kept_beside, mut kept_moved, mut cells) = (0usize, 0usize, 0usize);
    for &background in Background::ALL {
        for &colour in Colour::ALL {
            for &shape in Shape::ALL {
                for &size in Size::ALL {
                    for (at, other) in Line::ALL.iter().map(|l| l.positions()) {
                        let first = ShapeSpec {
                            shape,
                            colour,
                            size,
                            position: at,
                        };
                        let second = ShapeSpec {
                            shape: Shape::Square,
                            colour: if colour == Colour::Green {
                                Colour::Red
                            } else {
                                Colour::Green
                            },
                            size: Size::Large,
                            position: other,
                        };
                        let alone = codes_of(background, vec![first])?;
                        let beside = codes_of(background, vec![first, second])?;
                        let moved_spec = ShapeSpec {
                            position: other,
                            ..first
                        };
                        let moved = codes_of(background, vec![moved_spec])?;
                        // Positions lie on a 16-pixel grid, so a move shifts
                        // the shape by whole cells.
                        let ((c1, r1), (c2, r2)) = (at.grid(), other.grid());
                        let step = 16 / patch as i64;
                        let (dx, dy) = (
                            (c2 as i64 - c1 as i64) * step,
                            (r2 as i64 - r1 as i64) * step,
                        );
                        for cell in 0..grid * grid {
                            let (gy, gx) = ((cell / grid) as i64, (cell % grid) as i64);
                            let (my, mx) = (gy + dy, gx + dx);
                            let inside = |v: i64| (0..grid as i64).contains(&v);
                            let (x0, y0) = (gx as u32 * patch as u32, gy as u32 * patch as u32);
                            let covered = (y0..y0 + patch as u32)
                                .any(|y| (x0..x0 + patch as u32).any(|x| first.covers(x, y)));
                            if !covered || !inside(my) || !inside(mx) {
                                continue;
                            }
                            cells += 1;
                            kept_beside += usize::from(alone[cell] == beside[cell]);
                            kept_moved +=
                                usize::from(alone[cell] == moved[(my * grid as i64 + mx) as usize]);
                        }
                    }
                }
            }
        }
    }
    let share = |k: usize| 100.0 * k as f64 / cells.max(1) as f64;
    println!(
        "a shape's patches keeping their codes: {:.1}% when a second shape is added, {:.1}% when the shape moves ({cells} patches)",
        share(kept_beside),
        share(kept_moved)
    );

    println!(
        "{} codes used; H(patch | code) {:.2} nats",
        patches_of_code.len(),
        conditional_entropy(patches_of_code.values())
    );
    Ok(())
}
