//! Reads back, per colour-shape pair, the VQ reconstructions of every
//! one-shape scene (each size, position and background): can the model's
//! codes hold that pair's colour and shape at all? A pair the VQ keeps but
//! the decoder draws in another colour (see `molora eval`'s colour-miss
//! line) is the decoder's miss, not the codes'. The last two columns ask
//! whether a code says its colour: the share of a pair's shape cells whose
//! code shapes of another colour also use, and whose code stands more often
//! for another colour than for this one (there the VQ decoder reads the
//! colour off the neighbouring codes).
//!
//! cargo run --release --example vq_pair_colours -- [MODEL_DIR]   # default models/demo

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use molora::eval::model::{at_checker_size, EvalModel};
use molora::train::data::checker::check;
use molora::train::data::shapes::{
    is_held_out_pair, Background, Colour, Position, Shape, ShapeSpec, Size,
};
use molora::train::data::Scene;

/// Scenes read back right (colour, shape), scenes, shape cells, and shape
/// cells whose code another colour also uses / uses more often.
#[derive(Default)]
struct Tally {
    colour: usize,
    shape: usize,
    scenes: usize,
    cells: usize,
    shared: usize,
    another: usize,
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or("models/demo".into()));
    let model = EvalModel::load(&dir)?;
    let mut scenes = Vec::new();
    for &colour in Colour::ALL {
        for &shape in Shape::ALL {
            for &size in Size::ALL {
                for &position in Position::ALL {
                    for &background in Background::ALL {
                        let spec = ShapeSpec {
                            shape,
                            colour,
                            size,
                            position,
                        };
                        scenes.push(Scene {
                            background,
                            shapes: vec![spec],
                        });
                    }
                }
            }
        }
    }
    let renders: Vec<_> = scenes.iter().map(Scene::render).collect();
    let codes = model.encode_images(&renders)?;
    let reconstructions = model.decode_images(&codes)?;
    let grid = (codes[0].len() as f64).sqrt() as u32;
    // The shape cells of each scene with their codes, and the colours each
    // code is used for.
    let shape_cells: Vec<Vec<u32>> = (scenes.iter().zip(&codes))
        .map(|(scene, codes)| {
            let classes = scene.patch_shapes(grid);
            (classes.iter().zip(codes))
                .filter(|(&class, _)| class > 0)
                .map(|(_, &code)| code)
                .collect()
        })
        .collect();
    let mut colours_of: BTreeMap<u32, BTreeMap<Colour, usize>> = BTreeMap::new();
    for (scene, cells) in scenes.iter().zip(&shape_cells) {
        for &code in cells {
            let uses = colours_of.entry(code).or_default();
            *uses.entry(scene.shapes[0].colour).or_default() += 1;
        }
    }
    let most_often = |code: &u32| {
        (colours_of[code].iter())
            .max_by_key(|&(colour, &n)| (n, std::cmp::Reverse(*colour)))
            .map(|(&colour, _)| colour)
    };
    let mut by_pair: BTreeMap<(Colour, Shape), Tally> = BTreeMap::new();
    for ((scene, img), cells) in scenes.iter().zip(reconstructions).zip(&shape_cells) {
        let verdict = check(&at_checker_size(img), scene);
        let s = &scene.shapes[0];
        let t = by_pair.entry((s.colour, s.shape)).or_default();
        t.colour += verdict.colour_ok as usize;
        t.shape += verdict.shape_ok as usize;
        t.scenes += 1;
        t.cells += cells.len();
        t.shared += cells.iter().filter(|c| colours_of[c].len() > 1).count();
        t.another += (cells.iter())
            .filter(|c| most_often(c) != Some(s.colour))
            .count();
    }
    println!(
        "VQ reconstructions of {} read back by colour-shape pair\n",
        dir.display()
    );
    println!(
        "| pair | colour read back | shape read back | scenes | in training \
         | shape cells on codes another colour uses | ... uses more often |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: |");
    for ((colour, shape), t) in by_pair {
        let percent = |k: usize, n: usize| 100.0 * k as f64 / n.max(1) as f64;
        let in_training = if is_held_out_pair(colour, shape) {
            "no (held out)"
        } else {
            "yes"
        };
        println!(
            "| {} {} | {:.0}% | {:.0}% | {} | {in_training} | {:.0}% of {} | {:.0}% |",
            colour.name(),
            shape.name(),
            percent(t.colour, t.scenes),
            percent(t.shape, t.scenes),
            t.scenes,
            percent(t.shared, t.cells),
            t.cells,
            percent(t.another, t.cells)
        );
    }
    Ok(())
}
