//! Comparing what was read back, from pixels or from words, with the scene
//! that was asked for; and tallying the verdicts.
//!
//! Read shapes are matched to expected ones by the assignment that agrees on
//! the most attributes (exhaustive up to [`EXHAUSTIVE_MATCH_LIMIT`] expected
//! shapes, greedy beyond); an attribute is right when every expected shape is
//! matched and agrees; positions too, shape by shape.

use serde::{Deserialize, Serialize};

use super::shapes::{Background, Colour, Position, Scene, Shape, Size};

/// Most expected shapes matched by trying every assignment (generated scenes
/// have at most two).
pub const EXHAUSTIVE_MATCH_LIMIT: usize = 3;
/// Read shapes beyond this many are ignored.
const MAX_READ_SHAPES: usize = 16;

/// Which attributes of a reading agree with the expected scene.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub colour_ok: bool,
    pub shape_ok: bool,
    pub size_ok: bool,
    /// Every shape at its position (a caption states a pair's positions
    /// by its relation and line: "left of ... at the top").
    pub position_ok: bool,
    pub count_ok: bool,
    pub background_ok: bool,
}

impl CheckResult {
    pub fn all_ok(&self) -> bool {
        self.colour_ok
            && self.shape_ok
            && self.size_ok
            && self.position_ok
            && self.count_ok
            && self.background_ok
    }
}

/// One shape as read back; `None` where the reading does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadShape {
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub size: Option<Size>,
    pub position: Option<Position>,
}

/// A scene as read back from pixels or from a caption.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneReading {
    pub background: Option<Background>,
    pub shapes: Vec<ReadShape>,
}

/// Compares a reading with the expected scene. Read shapes are matched to
/// expected ones by the assignment that agrees on the most attributes; an
/// attribute is right when every expected shape is matched and agrees.
pub fn compare(reading: &SceneReading, expected: &Scene) -> CheckResult {
    let want = &expected.shapes;
    let got = &reading.shapes[..reading.shapes.len().min(MAX_READ_SHAPES)];
    let assignment = if want.len() <= EXHAUSTIVE_MATCH_LIMIT {
        let mut best: Option<(usize, Vec<Option<usize>>)> = None;
        for assignment in assignments(want.len(), got.len()) {
            let score = score_assignment(reading, expected, &assignment);
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, assignment));
            }
        }
        best.map(|(_, a)| a).unwrap_or_default()
    } else {
        greedy_assignment(want, got)
    };
    let all = |ok: &dyn Fn(usize, &ReadShape) -> bool| {
        !want.is_empty()
            && assignment.len() == want.len()
            && assignment
                .iter()
                .enumerate()
                .all(|(i, a)| a.is_some_and(|j| ok(i, &got[j])))
    };
    CheckResult {
        colour_ok: all(&|i, r| r.colour == Some(want[i].colour)),
        shape_ok: all(&|i, r| r.shape == Some(want[i].shape)),
        size_ok: all(&|i, r| r.size == Some(want[i].size)),
        position_ok: position_agrees(reading, expected, &assignment),
        count_ok: reading.shapes.len() == want.len(),
        background_ok: reading.background == Some(expected.background),
    }
}

/// Every injective map from expected shapes to read shapes (`None` where
/// there are fewer read shapes than expected).
fn assignments(want: usize, got: usize) -> Vec<Vec<Option<usize>>> {
    let mut out = vec![vec![]];
    for _ in 0..want {
        let mut next = Vec::new();
        for partial in &out {
            let free: Vec<usize> = (0..got).filter(|j| !partial.contains(&Some(*j))).collect();
            if free.is_empty() {
                let mut p = partial.clone();
                p.push(None);
                next.push(p);
            }
            for j in free {
                let mut p = partial.clone();
                p.push(Some(j));
                next.push(p);
            }
        }
        out = next;
    }
    out
}

/// Each expected shape in turn takes the free read shape agreeing on most
/// attributes.
fn greedy_assignment(want: &[super::shapes::ShapeSpec], got: &[ReadShape]) -> Vec<Option<usize>> {
    let mut taken = vec![false; got.len()];
    want.iter()
        .map(|w| {
            let agree = |r: &ReadShape| {
                (r.colour == Some(w.colour)) as usize
                    + (r.shape == Some(w.shape)) as usize
                    + (r.size == Some(w.size)) as usize
                    + (r.position == Some(w.position)) as usize
            };
            let j = (0..got.len())
                .filter(|&j| !taken[j])
                .max_by_key(|&j| (agree(&got[j]), std::cmp::Reverse(j)))?;
            taken[j] = true;
            Some(j)
        })
        .collect()
}

fn score_assignment(
    reading: &SceneReading,
    expected: &Scene,
    assignment: &[Option<usize>],
) -> usize {
    let mut score = 0;
    for (i, a) in assignment.iter().enumerate() {
        if let Some(j) = *a {
            let (w, r) = (&expected.shapes[i], &reading.shapes[j]);
            score += (r.colour == Some(w.colour)) as usize
                + (r.shape == Some(w.shape)) as usize
                + (r.size == Some(w.size)) as usize;
        }
    }
    score + 2 * position_agrees(reading, expected, assignment) as usize
}

/// Every expected shape matched and read at its position.
fn position_agrees(reading: &SceneReading, expected: &Scene, assignment: &[Option<usize>]) -> bool {
    let want = &expected.shapes;
    if want.is_empty() || assignment.len() != want.len() {
        return false;
    }
    assignment
        .iter()
        .zip(want)
        .all(|(a, w)| a.is_some_and(|j| reading.shapes[j].position == Some(w.position)))
}

/// Per-attribute counts of correct verdicts over many checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributeTally {
    pub checked: usize,
    pub colour: usize,
    pub shape: usize,
    pub size: usize,
    pub position: usize,
    pub count: usize,
    pub background: usize,
    pub all: usize,
}

impl AttributeTally {
    pub fn add(&mut self, r: &CheckResult) {
        self.checked += 1;
        self.colour += r.colour_ok as usize;
        self.shape += r.shape_ok as usize;
        self.size += r.size_ok as usize;
        self.position += r.position_ok as usize;
        self.count += r.count_ok as usize;
        self.background += r.background_ok as usize;
        self.all += r.all_ok() as usize;
    }

    /// (name, fraction correct) per attribute, then "all".
    pub fn rates(&self) -> [(&'static str, f64); 7] {
        let rate = |n: usize| n as f64 / self.checked.max(1) as f64;
        [
            ("colour", rate(self.colour)),
            ("shape", rate(self.shape)),
            ("size", rate(self.size)),
            ("position", rate(self.position)),
            ("count", rate(self.count)),
            ("background", rate(self.background)),
            ("all", rate(self.all)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::shapes::ShapeSpec;

    fn reading_of(scene: &Scene) -> SceneReading {
        SceneReading {
            background: Some(scene.background),
            shapes: scene
                .shapes
                .iter()
                .rev()
                .map(|s| ReadShape {
                    colour: Some(s.colour),
                    shape: Some(s.shape),
                    size: Some(s.size),
                    position: Some(s.position),
                })
                .collect(),
        }
    }

    #[test]
    fn many_shapes_are_matched_greedily_in_any_order() {
        let shapes: Vec<ShapeSpec> = Position::ALL
            .iter()
            .zip(Colour::ALL)
            .map(|(&position, &colour)| ShapeSpec {
                shape: Shape::Circle,
                colour,
                size: Size::Small,
                position,
            })
            .collect();
        let scene = Scene {
            background: Background::White,
            shapes,
        };
        assert!(compare(&reading_of(&scene), &scene).all_ok());
        let mut wrong = reading_of(&scene);
        wrong.shapes[2].shape = Some(Shape::Square);
        let r = compare(&wrong, &scene);
        assert!(!r.shape_ok && r.colour_ok && r.count_ok);
        let empty = SceneReading::default();
        let r = compare(&empty, &scene);
        assert!(!r.colour_ok && !r.count_ok && !r.position_ok && !r.background_ok);
    }
}
