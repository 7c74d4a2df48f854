//! The generation rows of the evaluation: held-out prompts of every task
//! (drawing from captions, arithmetic, code, captioning, mixed requests),
//! generated in one routing mode and scored by the world's own scorer
//! ([`crate::train::data::scoring`]).
//!
//! Invariants:
//! - the suite is built once from the seed and shared by every mode, so the
//!   modes are compared on the very same prompts;
//! - every item is held out: [`Split::Test`] scenes and expressions, plus
//!   one row of drawings whose colour-shape pairs training never saw
//!   ([`Split::HeldOutPairs`]);
//! - `per_sequence` forces what a per-sequence server picks for the whole
//!   request: the adapters of the domain of the answer's first part (the
//!   image adapter for a picture; the text adapter plus that domain's
//!   semantic adapter for text). The other part of a mixed request goes
//!   without its adapter, which is the cost that mode shows.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::generation::{generate, produced, Decoding, GenRequest};
use super::model::EvalModel;
use crate::engine::{AdapterRequest, EngineHandle};
use crate::routing::mode::RoutingMode;
use crate::train::data::arith::Op;
use crate::train::data::checker::{detect, AttributeTally};
use crate::train::data::reading::CheckResult;
use crate::train::data::scoring::{score, Produced};
use crate::train::data::text_domains::{sample, sample_mixed_kind, MixedKind};
use crate::train::data::{Check, Domain, Scene, Segment, Split, Task, TextExample};
use image::RgbImage;

/// Tokens a text answer may run past its gold length.
const TEXT_SLACK: usize = 8;

pub fn mixed_kind_name(kind: MixedKind) -> &'static str {
    match kind {
        MixedKind::CodeAndResult => "code and result",
        MixedKind::DrawAndSides => "draw and sides",
        MixedKind::DrawAndCompute => "draw and compute",
        MixedKind::DescribeAndCompute => "describe and compute",
    }
}

/// One held-out prompt and what it needs.
#[derive(Debug, Clone)]
pub struct Item {
    pub example: TextExample,
    /// The mixed kind, for mixed requests.
    pub kind: Option<MixedKind>,
    /// [`Split::Test`], or [`Split::HeldOutPairs`] for the drawings of
    /// colour-shape pairs never seen in training.
    pub split: Split,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// The adapters `per_sequence` forces on this request.
    pub forced: Vec<String>,
}

/// The prompts every mode is run on.
pub struct Suite {
    pub items: Vec<Item>,
}

/// Which tasks can be posed to this model: picture tasks need a VQ model.
pub fn tasks_for(model: &EvalModel) -> Vec<Task> {
    Task::ALL
        .into_iter()
        .filter(|t| model.vq.is_some() || matches!(t, Task::Arithmetic | Task::Code))
        .collect()
}

/// The row key of an item's exact-match tally.
pub fn row_key(task: Task, split: Split) -> &'static str {
    match (task, split) {
        (Task::Draw, Split::HeldOutPairs) => UNSEEN_PAIRS,
        _ => task.name(),
    }
}

/// Drawings of held-out colour-shape pairs.
pub const UNSEEN_PAIRS: &str = "draw (unseen pairs)";

/// `n` held-out items per task (mixed kinds in turn), plus `n` drawings of
/// unseen colour-shape pairs; deterministic from `seed`.
pub fn build_suite(model: &EvalModel, n: usize, seed: u64) -> Result<Suite> {
    let enc = model.encoder();
    let mut rows: Vec<(Task, Split)> = tasks_for(model)
        .into_iter()
        .map(|t| (t, Split::Test))
        .collect();
    if rows.iter().any(|r| r.0 == Task::Draw) {
        rows.push((Task::Draw, Split::HeldOutPairs));
    }
    let tpi = model.tokens_per_image();
    let mut items = Vec::with_capacity(n * rows.len());
    for (task, split) in rows {
        let stream = task as u64 + 16 * (split == Split::HeldOutPairs) as u64;
        let mut rng = StdRng::seed_from_u64(seed ^ (0xe7a1_0000 + stream));
        for i in 0..n {
            let (example, kind) = match task {
                Task::Mixed => {
                    let kind = MixedKind::ALL[i % MixedKind::ALL.len()];
                    (sample_mixed_kind(&mut rng, kind, split), Some(kind))
                }
                _ => (sample(&mut rng, task, split), None),
            };
            let prompt = enc.encode_prompt(&example, &mut |s: &Scene| model.scene_codes(s))?;
            // Only the length of the gold answer matters here.
            let full = enc.encode_example(&example, &mut |_: &Scene| Ok(vec![0u32; tpi]))?;
            let answer_len = full.len() - prompt.len();
            let forced = per_sequence_adapters(model, &example);
            items.push(Item {
                example,
                kind,
                split,
                prompt: prompt.ids,
                max_tokens: answer_len + TEXT_SLACK,
                forced,
            });
        }
    }
    Ok(Suite { items })
}

/// The adapter set a per-sequence server would route the whole request to
/// (empty when the model has none for it).
pub fn per_sequence_adapters(model: &EvalModel, example: &TextExample) -> Vec<String> {
    let first = example
        .answer
        .first()
        .map(|p| p.segment.domain())
        .unwrap_or(Domain::Caption);
    let mut names = Vec::new();
    if first == Domain::Image {
        names.extend(model.modality_adapter("image").map(|a| a.name.clone()));
    } else {
        names.extend(model.modality_adapter("text").map(|a| a.name.clone()));
        names.extend(model.semantic_adapter(first).map(|a| a.name.clone()));
    }
    names
}

/// Scores of one mode over the suite.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskScores {
    /// Attributes read from the pixels of drawn pictures.
    pub draw: AttributeTally,
    /// The same for drawings of colour-shape pairs never seen in training.
    pub draw_unseen: AttributeTally,
    /// Drawings whose colours were read right, (hits, posed) by the number
    /// of shapes asked for (1 or 2).
    pub draw_colour_by_count: BTreeMap<usize, (usize, usize)>,
    /// Two-shape drawings whose colours were read right, by how the shapes
    /// sit ("left of": side by side, their codes interleaved row by row;
    /// "above": one drawn whole before the other).
    pub draw_colour_by_relation: BTreeMap<String, (usize, usize)>,
    /// One-shape drawings by the colour-shape pair asked for ("blue
    /// triangle"): where colour goes wrong, it goes wrong per pair.
    pub draw_pairs: BTreeMap<String, PairColours>,
    /// Attributes read from the words of produced captions.
    pub caption: AttributeTally,
    /// (exactly right, posed) per task.
    pub exact: BTreeMap<String, (usize, usize)>,
    /// (exactly right, posed) per mixed kind.
    pub mixed: BTreeMap<String, (usize, usize)>,
    /// (right, posed) per part of a mixed kind, keyed "kind: domain" (say
    /// "draw and compute: image"): which half of a request fails.
    pub mixed_parts: BTreeMap<String, (usize, usize)>,
    /// (exactly right, posed) arithmetic by operator count (1 or 2).
    pub arithmetic_by_ops: BTreeMap<usize, (usize, usize)>,
    /// Requests the engine refused or failed, and the first reason.
    pub failed: usize,
    pub first_failure: Option<String>,
    pub generated_tokens: usize,
    pub wall_s: f64,
    /// The first few drawings with the caption they were asked for (for
    /// `--save-images`).
    #[serde(skip)]
    pub drawings: Vec<(String, RgbImage)>,
    /// The first few items of every row as "row: prompt => output [verdict]"
    /// (for `--show`).
    #[serde(skip)]
    pub shown: Vec<String>,
}

/// One-shape drawings of one colour-shape pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairColours {
    pub asked: usize,
    /// The colours drawn instead, counted where one shape was drawn but in
    /// another colour.
    pub drawn_instead: BTreeMap<String, usize>,
}

/// Drawings kept per mode for `--save-images`.
pub const KEPT_DRAWINGS: usize = 8;

/// Generates every item of the suite in `mode` and scores it.
pub fn run_suite(
    model: &EvalModel,
    engine: &EngineHandle,
    suite: &Suite,
    mode: RoutingMode,
    decoding: Decoding,
    shown_per_row: usize,
) -> Result<TaskScores> {
    let start = Instant::now();
    if mode == RoutingMode::PerSequence {
        if let Some(item) = suite.items.iter().find(|i| i.forced.is_empty()) {
            bail!(
                "per_sequence needs an adapter for {} answers, but the model has none; \
                 leave per_sequence out of --modes",
                item.example
                    .answer
                    .first()
                    .map_or("empty", |p| p.segment.domain().name())
            );
        }
    }
    let requests: Vec<GenRequest> = suite
        .items
        .iter()
        .map(|item| GenRequest {
            prompt: item.prompt.clone(),
            adapters: match mode {
                RoutingMode::PerSequence => AdapterRequest {
                    forced: item.forced.clone(),
                    ..AdapterRequest::default()
                },
                _ => AdapterRequest::default(),
            },
            max_tokens: item.max_tokens,
        })
        .collect();
    let outputs = generate(engine, &requests, mode, decoding)?;
    let mut scores = TaskScores::default();
    for (item, output) in suite.items.iter().zip(outputs) {
        let ids = output.unwrap_or_else(|e| {
            scores.failed += 1;
            scores.first_failure.get_or_insert(e);
            Vec::new()
        });
        scores.generated_tokens += ids.len();
        let produced = produced(model, &ids)?;
        let s = score(&item.example, &produced);
        if item.example.task == Task::Draw && scores.drawings.len() < KEPT_DRAWINGS {
            if let (Some(Produced::Image(img)), Some(Check::Image(scene))) = (
                produced.first(),
                item.example.answer.first().map(|a| &a.check),
            ) {
                scores.drawings.push((scene.caption(), img.clone()));
            }
        }
        let task = item.example.task;
        let key = row_key(task, item.split);
        let tally = scores.exact.entry(key.into()).or_default();
        if tally.1 < shown_per_row {
            scores.shown.push(show(key, item, &produced, s.exact));
        }
        count(tally, s.exact);
        if task == Task::Arithmetic {
            let ops = operator_count(&item.example);
            count(scores.arithmetic_by_ops.entry(ops).or_default(), s.exact);
        }
        if let Some(kind) = item.kind {
            let name = mixed_kind_name(kind);
            count(scores.mixed.entry(name.into()).or_default(), s.exact);
            for part in &s.parts {
                let key = format!("{name}: {}", part.domain.name());
                count(scores.mixed_parts.entry(key).or_default(), part.ok);
            }
        }
        for (part, gold) in s.parts.iter().zip(&item.example.answer) {
            let Some(attributes) = &part.attributes else {
                continue;
            };
            match (task, &gold.segment) {
                (Task::Draw, Segment::Image(_)) if item.split == Split::HeldOutPairs => {
                    scores.draw_unseen.add(attributes)
                }
                (Task::Draw, Segment::Image(scene)) => {
                    scores.draw.add(attributes);
                    let drawn = match produced.first() {
                        Some(Produced::Image(img)) => Some(img),
                        _ => None,
                    };
                    tally_colours(&mut scores, scene, attributes, drawn);
                }
                (Task::Caption, Segment::Text { .. }) => scores.caption.add(attributes),
                _ => {}
            }
        }
    }
    scores.wall_s = start.elapsed().as_secs_f64();
    Ok(scores)
}

/// Counts a held-out drawing's colour by shapes asked for and, for one
/// shape, by the pair asked for and the colour drawn instead.
fn tally_colours(
    scores: &mut TaskScores,
    scene: &Scene,
    attributes: &CheckResult,
    drawn: Option<&RgbImage>,
) {
    let by_count = scores.draw_colour_by_count.entry(scene.shapes.len());
    count(by_count.or_default(), attributes.colour_ok);
    if let Some(relation) = scene.relation() {
        let by_relation = scores.draw_colour_by_relation.entry(relation.name().into());
        count(by_relation.or_default(), attributes.colour_ok);
    }
    let [asked] = scene.shapes.as_slice() else {
        return;
    };
    let pair = format!("{} {}", asked.colour.name(), asked.shape.name());
    let entry = scores.draw_pairs.entry(pair).or_default();
    entry.asked += 1;
    if attributes.colour_ok || !attributes.count_ok {
        return;
    }
    let read = drawn.and_then(|img| detect(img).ok());
    if let Some(colour) = read
        .as_ref()
        .and_then(|d| d.shapes.first())
        .map(|s| s.colour)
    {
        *entry.drawn_instead.entry(colour.name().into()).or_default() += 1;
    }
}

/// Adds one posed item to an (exactly right, posed) tally.
fn count(tally: &mut (usize, usize), exact: bool) {
    tally.0 += exact as usize;
    tally.1 += 1;
}

/// Operators in an example's prompt text ("what is (12+7)*3?" has 2).
pub fn operator_count(example: &TextExample) -> usize {
    let is_operator = |c: char| Op::ALL.iter().any(|op| op.symbol() == c);
    example
        .prompt
        .iter()
        .filter_map(|s| match s {
            Segment::Text { text, .. } => Some(text.chars().filter(|&c| is_operator(c)).count()),
            _ => None,
        })
        .sum()
}

/// One item as a line: the prompt's text, what was produced, the verdict.
fn show(row: &str, item: &Item, produced: &[Produced], exact: bool) -> String {
    let prompt: Vec<&str> = item
        .example
        .prompt
        .iter()
        .map(|s| match s {
            Segment::Text { text, .. } => text.as_str(),
            Segment::Image(_) => "<image>",
        })
        .collect();
    let output: Vec<String> = produced
        .iter()
        .map(|p| match p {
            Produced::Text(t) => format!("{t:?}"),
            Produced::Image(img) if img.width() == 0 => "<incomplete image>".into(),
            Produced::Image(img) => {
                let seen = crate::train::data::checker::detect(img)
                    .map(|d| {
                        let shapes: Vec<String> = d
                            .shapes
                            .iter()
                            .map(|s| {
                                format!(
                                    "{} {} {} at {}",
                                    s.size.name(),
                                    s.colour.name(),
                                    s.shape.name(),
                                    s.position.name()
                                )
                            })
                            .collect();
                        format!("{} background: {}", d.background.name(), shapes.join(", "))
                    })
                    .unwrap_or_else(|e| e.to_string());
                format!("<image: {seen}>")
            }
        })
        .collect();
    format!(
        "{row}: {:?} => {} [{}]",
        prompt.concat(),
        output.join(" | "),
        if exact { "right" } else { "wrong" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::checker::check;
    use crate::train::data::shapes::{Background, Colour, Position, Shape, ShapeSpec, Size};
    use crate::train::data::text_domains::sample_arithmetic;

    fn one_shape(colour: Colour) -> Scene {
        Scene {
            background: Background::White,
            shapes: vec![ShapeSpec {
                shape: Shape::Triangle,
                colour,
                size: Size::Large,
                position: Position::Center,
            }],
        }
    }

    /// A blue triangle asked for and a green one drawn counts against blue
    /// triangles as "green"; a right drawing counts only as asked.
    #[test]
    fn a_wrong_colour_is_counted_against_the_pair_asked_for() {
        let asked = one_shape(Colour::Blue);
        let mut scores = TaskScores::default();
        for drawn in [one_shape(Colour::Green), one_shape(Colour::Blue)] {
            let img = drawn.render();
            let verdict = check(&img, &asked);
            tally_colours(&mut scores, &asked, &verdict, Some(&img));
        }
        let pair = &scores.draw_pairs["blue triangle"];
        assert_eq!(pair.asked, 2);
        assert_eq!(pair.drawn_instead, BTreeMap::from([("green".into(), 1)]));
        assert_eq!(scores.draw_colour_by_count[&1], (1, 2));
    }

    /// Two shapes side by side whose right one took the left one's colour
    /// count as a miss under "left of" only.
    #[test]
    fn two_shape_colours_are_counted_by_how_the_shapes_sit() {
        let shape = |colour, position| ShapeSpec {
            shape: Shape::Square,
            colour,
            size: Size::Large,
            position,
        };
        let scene = |second: Colour| Scene {
            background: Background::White,
            shapes: vec![
                shape(Colour::Red, Position::TopLeft),
                shape(second, Position::TopRight),
            ],
        };
        let asked = scene(Colour::Blue);
        let mut scores = TaskScores::default();
        for drawn in [scene(Colour::Red), scene(Colour::Blue)] {
            let img = drawn.render();
            let verdict = check(&img, &asked);
            tally_colours(&mut scores, &asked, &verdict, Some(&img));
        }
        let by_relation = &scores.draw_colour_by_relation;
        assert_eq!(by_relation.len(), 1, "{by_relation:?}");
        assert_eq!(by_relation["left of"], (1, 2));
        assert_eq!(scores.draw_colour_by_count[&2], (1, 2));
        assert!(scores.draw_pairs.is_empty());
    }

    #[test]
    fn operator_count_reads_the_prompt() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = [0; 3];
        for _ in 0..200 {
            let ex = sample_arithmetic(&mut rng, Split::Test);
            let n = operator_count(&ex);
            assert!((1..=2).contains(&n), "{ex:?}");
            seen[n] += 1;
        }
        assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");
    }
}
