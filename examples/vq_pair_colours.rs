//! Reads back, per colour-shape pair, the VQ reconstructions of every
//! one-shape scene (each size, position and background): can the model's
//! codes hold that pair's colour and shape at all? A pair the VQ keeps but
//! the decoder draws in another colour (see `molora eval`'s colour-miss
//! line) is the decoder's miss, not the codes'.
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

/// Scenes read back right: (colour, shape, scenes).
type Tally = (usize, usize, usize);

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
    let mut by_pair: BTreeMap<(Colour, Shape), Tally> = BTreeMap::new();
    for (scene, img) in scenes.iter().zip(reconstructions) {
        let verdict = check(&at_checker_size(img), scene);
        let s = &scene.shapes[0];
        let t = by_pair.entry((s.colour, s.shape)).or_default();
        *t = (
            t.0 + verdict.colour_ok as usize,
            t.1 + verdict.shape_ok as usize,
            t.2 + 1,
        );
    }
    println!(
        "VQ reconstructions of {} read back by colour-shape pair\n",
        dir.display()
    );
    println!("| pair | colour | shape | scenes | in training |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for ((colour, shape), (c, s, n)) in by_pair {
        let percent = |k: usize| 100.0 * k as f64 / n as f64;
        println!(
            "| {} {} | {:.0}% | {:.0}% | {n} | {} |",
            colour.name(),
            shape.name(),
            percent(c),
            percent(s),
            if is_held_out_pair(colour, shape) {
                "no (held out)"
            } else {
                "yes"
            }
        );
    }
    Ok(())
}
