//! Item generators of every task: arithmetic, code, captioning, drawing,
//! mixed requests, and interleaved text-image sequences. Each item carries
//! its gold answer and how an answer is checked ([`super::scoring`]).
//!
//! Splits: expressions are keyed by their compact text ("(12+7)*3"), scenes
//! by [`Scene::key`]; an item belongs to a split when all of its keys do.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::arith::{random_expr, Expr};
use super::code_lang::program_for;
use super::shapes::{pick, Colour, Scene, Shape};
use super::{
    key_in_split, AnswerPart, Check, Domain, Segment, Split, Task, TextExample, PART_SEPARATOR,
};

/// The instruction of a caption request.
pub const DESCRIBE_PROMPT: &str = "describe the image";

/// The kinds of mixed request (two domains in one answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MixedKind {
    /// "write code to compute 17*3 and give the result"
    /// -> "let a = 17; let b = 3; print a * b ; result 17*3=51"
    CodeAndResult,
    /// "draw a red circle and tell me how many sides a square has"
    /// -> image, "a square has 4 sides"
    DrawAndSides,
    /// "draw a red circle and compute 12+7" -> image, "12+7: 2+7=9, 1+0=1 so 19"
    DrawAndCompute,
    /// image + "describe the image and compute 12+7" -> "<caption> ; result 12+7: ... so 19"
    DescribeAndCompute,
}

impl MixedKind {
    pub const ALL: [MixedKind; 4] = [
        MixedKind::CodeAndResult,
        MixedKind::DrawAndSides,
        MixedKind::DrawAndCompute,
        MixedKind::DescribeAndCompute,
    ];
}

/// An item of `task` from `split`.
pub fn sample<R: Rng + ?Sized>(rng: &mut R, task: Task, split: Split) -> TextExample {
    match task {
        Task::Arithmetic => sample_arithmetic(rng, split),
        Task::Code => sample_code(rng, split),
        Task::Caption => sample_caption(rng, split),
        Task::Draw => sample_draw(rng, split),
        Task::Mixed => sample_mixed(rng, split),
    }
}

/// An item of a uniformly chosen task.
pub fn sample_any<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let task = pick(rng, &Task::ALL);
    sample(rng, task, split)
}

/// "what is (12+7)*3?" -> "12+7 then *3: 2+7=9, 1+0=1 so 19. 19*3: 9*3=27, 1*3+2=3+2=5 so 57"
pub fn sample_arithmetic<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let (expr, value) = expression(rng, split);
    TextExample {
        task: Task::Arithmetic,
        prompt: vec![Segment::text(
            Domain::Arithmetic,
            format!("what is {}?", expr.compact()),
        )],
        answer: vec![worked(&expr, value)],
    }
}

/// "write code that computes 17*3" -> "let a = 17; let b = 3; print a * b"
pub fn sample_code<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let (expr, value) = expression(rng, split);
    TextExample {
        task: Task::Code,
        prompt: vec![Segment::text(
            Domain::Code,
            format!("write code that computes {}", expr.compact()),
        )],
        answer: vec![program(&expr, value)],
    }
}

/// image + "describe the image" -> its caption
pub fn sample_caption<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let scene = Scene::random(rng, split);
    TextExample {
        task: Task::Caption,
        prompt: vec![
            Segment::Image(scene.clone()),
            Segment::text(Domain::Caption, DESCRIBE_PROMPT),
        ],
        answer: vec![caption(&scene)],
    }
}

/// "draw <caption>" -> the image
pub fn sample_draw<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let scene = Scene::random(rng, split);
    TextExample {
        task: Task::Draw,
        prompt: vec![Segment::text(
            Domain::Caption,
            format!("draw {}", scene.caption()),
        )],
        answer: vec![image(&scene)],
    }
}

/// A mixed request of a uniformly chosen kind.
pub fn sample_mixed<R: Rng + ?Sized>(rng: &mut R, split: Split) -> TextExample {
    let kind = pick(rng, &MixedKind::ALL);
    sample_mixed_kind(rng, kind, split)
}

pub fn sample_mixed_kind<R: Rng + ?Sized>(
    rng: &mut R,
    kind: MixedKind,
    split: Split,
) -> TextExample {
    let (prompt, answer) = match kind {
        MixedKind::CodeAndResult => {
            let (expr, value) = expression(rng, split);
            (
                vec![
                    Segment::text(
                        Domain::Code,
                        format!("write code to compute {}", expr.compact()),
                    ),
                    Segment::text(Domain::Arithmetic, " and give the result"),
                ],
                vec![program(&expr, value), result(&expr, value)],
            )
        }
        MixedKind::DrawAndSides => {
            let (request, scene) = drawing_request(rng, split);
            let asked = pick(rng, Shape::ALL);
            (
                vec![
                    Segment::text(Domain::Caption, request),
                    Segment::text(
                        Domain::Caption,
                        format!(" and tell me how many sides a {} has", asked.name()),
                    ),
                ],
                vec![image(&scene), shape_fact(asked)],
            )
        }
        MixedKind::DrawAndCompute => {
            let (request, scene) = drawing_request(rng, split);
            let (expr, value) = expression(rng, split);
            (
                vec![
                    Segment::text(Domain::Caption, request),
                    Segment::text(
                        Domain::Arithmetic,
                        format!(" and compute {}", expr.compact()),
                    ),
                ],
                vec![image(&scene), worked(&expr, value)],
            )
        }
        MixedKind::DescribeAndCompute => {
            let scene = Scene::random(rng, split);
            let (expr, value) = expression(rng, split);
            (
                vec![
                    Segment::Image(scene.clone()),
                    Segment::text(Domain::Caption, DESCRIBE_PROMPT),
                    Segment::text(
                        Domain::Arithmetic,
                        format!(" and compute {}", expr.compact()),
                    ),
                ],
                vec![caption(&scene), result(&expr, value)],
            )
        }
    };
    TextExample {
        task: Task::Mixed,
        prompt,
        answer,
    }
}

/// Text and images alternating: 2 or 3 scenes, each introduced before
/// ("here is <caption>", image) or named after ("this is <caption>").
pub fn sample_interleaved<R: Rng + ?Sized>(rng: &mut R, split: Split) -> Vec<Segment> {
    let count = rng.random_range(2..=3);
    let mut out: Vec<Segment> = Vec::new();
    for _ in 0..count {
        let scene = Scene::random(rng, split);
        // A space separates two text segments that follow each other.
        let lead = if matches!(out.last(), Some(Segment::Text { .. })) {
            " "
        } else {
            ""
        };
        if rng.random_bool(0.5) {
            out.push(Segment::text(
                Domain::Caption,
                format!("{lead}here is {}", scene.caption()),
            ));
            out.push(Segment::Image(scene));
        } else {
            out.push(Segment::Image(scene.clone()));
            out.push(Segment::text(
                Domain::Caption,
                format!("this is {}.", scene.caption()),
            ));
        }
    }
    out
}

/// Text of `n` training items of every task plus interleaved sequences, for
/// training a tokenizer. Deterministic from `seed`.
pub fn text_corpus(seed: u64, n: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let example = sample(&mut rng, Task::ALL[i % Task::ALL.len()], Split::Train);
        out.extend(example.texts().map(String::from));
        if i % 4 == 0 {
            for segment in sample_interleaved(&mut rng, Split::Train) {
                if let Segment::Text { text, .. } = segment {
                    out.push(text);
                }
            }
        }
    }
    out
}

/// A random expression of `split` and its value.
fn expression<R: Rng + ?Sized>(rng: &mut R, split: Split) -> (Expr, i64) {
    loop {
        let expr = random_expr(rng);
        if key_in_split(&expr.compact(), split) {
            if let Ok(value) = expr.value() {
                return (expr, value);
            }
        }
    }
}

/// "draw a red circle" (the default scene of a colour-shape pair) or
/// "draw <full caption>", equally likely; with the scene it asks for.
fn drawing_request<R: Rng + ?Sized>(rng: &mut R, split: Split) -> (String, Scene) {
    let short_form = rng.random_bool(0.5);
    // The pairs whose default scene belongs to the split (a few per split).
    let defaults: Vec<(Colour, Shape)> = Colour::ALL
        .iter()
        .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
        .filter(|&(c, s)| Scene::default_for(c, s).in_split(split))
        .collect();
    if short_form && !defaults.is_empty() {
        let (colour, shape) = pick(rng, &defaults);
        let request = format!("draw a {} {}", colour.name(), shape.name());
        return (request, Scene::default_for(colour, shape));
    }
    let scene = Scene::random(rng, split);
    (format!("draw {}", scene.caption()), scene)
}

/// "a square has 4 sides": the whole answer is the caption domain's skill
/// (`adapter_only_skills`).
fn shape_fact(shape: Shape) -> AnswerPart {
    let text = format!("a {} has {} sides", shape.name(), shape.sides());
    AnswerPart {
        check: Check::Exact(text.clone()),
        segment: Segment::text(Domain::Caption, text).all_skill(),
    }
}

/// The code part: the canonical program, judged by what it prints.
fn program(expr: &Expr, value: i64) -> AnswerPart {
    // Generated expressions have 2 or 3 literals, within program_for's limit.
    let text = program_for(expr).unwrap_or_else(|_| format!("print {value}"));
    AnswerPart {
        segment: Segment::text(Domain::Code, text),
        check: Check::ProgramValue(value),
    }
}

/// The worked answer in digit columns ("12+7 then *3: 2+7=9, 1+0=1 so 19. ..."), judged by its last number.
fn worked(expr: &Expr, value: i64) -> AnswerPart {
    AnswerPart {
        segment: worked_segment(expr, value, ""),
        check: Check::FinalValue(value),
    }
}

/// " ; result 17*3=51": the arithmetic part that follows a text part.
fn result(expr: &Expr, value: i64) -> AnswerPart {
    AnswerPart {
        segment: worked_segment(expr, value, &format!("{PART_SEPARATOR}result ")),
        check: Check::FinalValue(value),
    }
}

/// `lead` then the worked answer, its chaining ranges marked as the skill.
fn worked_segment(expr: &Expr, value: i64, lead: &str) -> Segment {
    // Generated expressions evaluate (`expression` checked), so this holds.
    let (worked, chaining) = expr
        .worked_with_chaining()
        .unwrap_or_else(|_| (value.to_string(), Vec::new()));
    let shift = |r: std::ops::Range<usize>| r.start + lead.len()..r.end + lead.len();
    Segment::text(Domain::Arithmetic, format!("{lead}{worked}"))
        .with_skill(chaining.into_iter().map(shift).collect())
}

fn caption(scene: &Scene) -> AnswerPart {
    AnswerPart {
        segment: Segment::text(Domain::Caption, scene.caption()),
        check: Check::Caption(scene.clone()),
    }
}

fn image(scene: &Scene) -> AnswerPart {
    AnswerPart {
        segment: Segment::Image(scene.clone()),
        check: Check::Image(scene.clone()),
    }
}
