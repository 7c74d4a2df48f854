//! Scores what a model produced for an example against its gold answer.
//!
//! A produced answer is a list of runs, text or image, as the caller cut the
//! generated tokens at begin/end-of-image. Gold answer parts group into the
//! same runs (consecutive text parts form one run); a produced text run is
//! split back into parts at [`PART_SEPARATOR`] (from the right, so a
//! malformed first part cannot shift the later ones). An example is exactly
//! right when it has exactly the gold runs and every part passes its check.

use image::RgbImage;
use serde::Serialize;

use super::caption_reader::read_caption;
use super::checker::{check, compare, CheckResult};
use super::code_lang::run;
use super::{AnswerPart, Check, Domain, Segment, Task, TextExample, PART_SEPARATOR};

/// One run of a produced answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Produced {
    Text(String),
    Image(RgbImage),
}

/// The verdict on one gold answer part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartScore {
    pub domain: Domain,
    pub ok: bool,
    /// Per-attribute verdicts of caption and image parts.
    pub attributes: Option<CheckResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExampleScore {
    pub task: Task,
    pub exact: bool,
    pub parts: Vec<PartScore>,
}

/// Scores `produced` against `example`'s gold answer.
pub fn score(example: &TextExample, produced: &[Produced]) -> ExampleScore {
    let runs = gold_runs(&example.answer);
    let mut parts = Vec::new();
    for (k, run) in runs.iter().enumerate() {
        match (run.as_slice(), produced.get(k)) {
            ([single], Some(Produced::Image(img))) if is_image(single) => {
                parts.push(check_image(single, img));
            }
            (_, Some(Produced::Text(text))) if !run.iter().any(|p| is_image(p)) => {
                for (part, piece) in run.iter().zip(split_parts(text, run.len())) {
                    parts.push(match piece {
                        Some(piece) => check_text(part, piece),
                        None => missing(part),
                    });
                }
            }
            // Missing run, or a run of the wrong kind.
            _ => parts.extend(run.iter().map(|p| missing(p))),
        }
    }
    ExampleScore {
        task: example.task,
        exact: produced.len() == runs.len() && parts.iter().all(|p| p.ok),
        parts,
    }
}

/// What a perfect model produces: images rendered, text runs joined.
pub fn gold_answer(example: &TextExample) -> Vec<Produced> {
    gold_runs(&example.answer)
        .into_iter()
        .map(|run| match run.as_slice() {
            [AnswerPart {
                segment: Segment::Image(scene),
                ..
            }] => Produced::Image(scene.render()),
            parts => Produced::Text(
                parts
                    .iter()
                    .filter_map(|p| match &p.segment {
                        Segment::Text { text, .. } => Some(text.as_str()),
                        Segment::Image(_) => None,
                    })
                    .collect(),
            ),
        })
        .collect()
}

/// Judges one produced text against one text check.
pub fn check_text(part: &AnswerPart, text: &str) -> PartScore {
    let domain = part.segment.domain();
    match &part.check {
        Check::Exact(want) => PartScore {
            domain,
            ok: text.trim() == want,
            attributes: None,
        },
        Check::FinalValue(want) => PartScore {
            domain,
            ok: final_number(text) == Some(*want),
            attributes: None,
        },
        Check::ProgramValue(want) => PartScore {
            domain,
            ok: run(text).ok() == Some(*want),
            attributes: None,
        },
        Check::Caption(scene) => {
            let attributes = compare(&read_caption(text), scene);
            PartScore {
                domain,
                ok: attributes.all_ok(),
                attributes: Some(attributes),
            }
        }
        Check::Image(_) => missing(part),
    }
}

/// The number a worked answer ends in: what follows its last '=' or space.
fn final_number(text: &str) -> Option<i64> {
    text.trim().rsplit(['=', ' ']).next()?.parse().ok()
}

fn check_image(part: &AnswerPart, img: &RgbImage) -> PartScore {
    match &part.check {
        Check::Image(scene) => {
            let attributes = check(img, scene);
            PartScore {
                domain: Domain::Image,
                ok: attributes.all_ok(),
                attributes: Some(attributes),
            }
        }
        _ => missing(part),
    }
}

/// A failed part (nothing, or the wrong kind, was produced for it).
fn missing(part: &AnswerPart) -> PartScore {
    let has_attributes = matches!(part.check, Check::Caption(_) | Check::Image(_));
    PartScore {
        domain: part.segment.domain(),
        ok: false,
        attributes: has_attributes.then(CheckResult::default),
    }
}

fn is_image(part: &AnswerPart) -> bool {
    matches!(part.segment, Segment::Image(_))
}

/// Gold parts grouped into runs: each image alone, consecutive texts together.
fn gold_runs(answer: &[AnswerPart]) -> Vec<Vec<&AnswerPart>> {
    let mut runs: Vec<Vec<&AnswerPart>> = Vec::new();
    for part in answer {
        let extend = !is_image(part)
            && runs
                .last()
                .is_some_and(|r| r.last().is_some_and(|p| !is_image(p)));
        match runs.last_mut() {
            Some(run) if extend => run.push(part),
            _ => runs.push(vec![part]),
        }
    }
    runs
}

/// Splits a produced text run into `n` parts at the last `n - 1` separators;
/// `None` for parts that are missing.
fn split_parts(text: &str, n: usize) -> Vec<Option<&str>> {
    let mut pieces: Vec<&str> = text.rsplitn(n.max(1), PART_SEPARATOR).collect();
    pieces.reverse();
    let mut out: Vec<Option<&str>> = pieces.into_iter().map(Some).collect();
    // Too few separators: the first pieces are there, the last ones missing.
    out.resize(n, None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::text_domains::{sample, sample_mixed_kind, MixedKind};
    use crate::train::data::Split;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn every_gold_answer_passes_its_own_checker() {
        let mut rng = StdRng::seed_from_u64(21);
        for split in [Split::Train, Split::Test, Split::HeldOutPairs] {
            for task in Task::ALL {
                for _ in 0..60 {
                    let ex = sample(&mut rng, task, split);
                    let s = score(&ex, &gold_answer(&ex));
                    assert!(s.exact, "{ex:?}: {s:?}");
                    assert_eq!(s.parts.len(), ex.answer.len());
                }
            }
        }
    }

    #[test]
    fn wrong_answers_fail() {
        let mut rng = StdRng::seed_from_u64(22);
        let ex = sample(&mut rng, Task::Arithmetic, Split::Train);
        assert!(!score(&ex, &[Produced::Text("-1".into())]).exact);
        assert!(!score(&ex, &[]).exact);

        let ex = sample_mixed_kind(&mut rng, MixedKind::CodeAndResult, Split::Train);
        let Produced::Text(gold) = &gold_answer(&ex)[0] else {
            panic!("code and result is one text run")
        };
        // The code alone, without the result part.
        let code_only = gold.split(PART_SEPARATOR).next().unwrap_or_default();
        let s = score(&ex, &[Produced::Text(code_only.into())]);
        assert!(!s.exact && s.parts[0].ok && !s.parts[1].ok, "{s:?}");
        // A different but correct program passes.
        let Check::ProgramValue(v) = ex.answer[0].check else {
            panic!("the code part is judged by its value")
        };
        let other = format!("print {v} + 0{PART_SEPARATOR}result {v}");
        assert!(score(&ex, &[Produced::Text(other)]).exact);
        let broken = format!("print {v} +{PART_SEPARATOR}result {v}");
        assert!(!score(&ex, &[Produced::Text(broken)]).exact);

        // An image answer given as text, and the wrong picture.
        let ex = sample_mixed_kind(&mut rng, MixedKind::DrawAndSides, Split::Train);
        let gold = gold_answer(&ex);
        let text_only = [gold[1].clone()];
        assert!(!score(&ex, &text_only).exact);
        let blank = RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]));
        let s = score(&ex, &[Produced::Image(blank), gold[1].clone()]);
        assert!(!s.exact && !s.parts[0].ok && s.parts[1].ok, "{s:?}");
        let extra = [gold[0].clone(), gold[1].clone(), gold[1].clone()];
        assert!(!score(&ex, &extra).exact);
    }
}
