//! Reads the attributes a caption states, leniently: words in any order
//! around each shape word, extra words ignored. "right of" and "below" are
//! turned around so the reading always states "left of" / "above"; with a
//! line that agrees ("at the top", "on the left") the pair's positions are
//! read too.

use super::checker::{ReadShape, SceneReading};
use super::shapes::{Background, Colour, Line, Position, Relation, Shape, Size};

/// The attributes stated by a caption (or any text about a scene).
pub fn read_caption(text: &str) -> SceneReading {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut reading = SceneReading::default();
    let (mut colour, mut size) = (None, None);
    let (mut relation, mut line, mut reversed) = (None, None, false);
    let mut i = 0;
    while i < words.len() {
        let (word, next) = (words[i], words.get(i + 1).copied());
        let mut consumed = 1;
        if let Some(c) = Colour::from_name(word) {
            colour = Some(c);
        } else if let Some(s) = Size::from_name(word) {
            size = Some(s);
        } else if let Some(shape) = Shape::from_name(word) {
            reading.shapes.push(ReadShape {
                colour: colour.take(),
                shape: Some(shape),
                size: size.take(),
                position: None,
            });
        } else if let Some(bg) = background_word(word) {
            reading.background = Some(bg);
        } else if let Some(position) = position_at(&words, i) {
            if let Some(last) = reading.shapes.last_mut() {
                last.position = Some(position);
            }
            consumed = if position == Position::Center { 1 } else { 2 };
        } else if matches!((word, next), ("left", Some("of")) | ("right", Some("of"))) {
            relation = Some(Relation::LeftOf);
            reversed = word == "right";
            consumed = 2;
        } else if word == "above" || word == "below" {
            relation = Some(Relation::Above);
            reversed = word == "below";
        } else if let Some(l) = line_word(word) {
            line = Some(l);
        }
        i += consumed;
    }
    if let ([first, second], true) = (reading.shapes.as_mut_slice(), reversed) {
        std::mem::swap(first, second);
    }
    if let ([first, second], Some(line)) = (reading.shapes.as_mut_slice(), line) {
        if relation == Some(line.relation()) {
            let (a, b) = line.positions();
            (first.position, second.position) = (Some(a), Some(b));
        }
    }
    reading
}

/// "top", "bottom", "left" or "right" standing alone (position phrases
/// and "left of" are read before this).
fn line_word(word: &str) -> Option<Line> {
    match word {
        "top" => Some(Line::Top),
        "bottom" => Some(Line::Bottom),
        "left" => Some(Line::Left),
        "right" => Some(Line::Right),
        _ => None,
    }
}

fn background_word(word: &str) -> Option<Background> {
    match word {
        "grey" => Some(Background::Gray),
        _ => Background::from_name(word),
    }
}

/// A position phrase starting at `words[i]` ("top left", "center", ...).
fn position_at(words: &[&str], i: usize) -> Option<Position> {
    match words[i] {
        "center" | "centre" | "middle" => return Some(Position::Center),
        "top" | "bottom" => {}
        _ => return None,
    }
    let phrase = format!("{} {}", words[i], words.get(i + 1)?);
    Position::from_name(&phrase)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::checker::compare;
    use crate::train::data::shapes::Scene;
    use crate::train::data::Split;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn every_generated_caption_reads_back_exactly() {
        let mut rng = StdRng::seed_from_u64(11);
        for split in [Split::Train, Split::HeldOutPairs] {
            for _ in 0..500 {
                let scene = Scene::random(&mut rng, split);
                let result = compare(&read_caption(&scene.caption()), &scene);
                assert!(result.all_ok(), "{}: {result:?}", scene.caption());
            }
        }
    }

    #[test]
    fn wrong_words_fail_the_right_attribute() {
        let mut rng = StdRng::seed_from_u64(12);
        let scene = loop {
            let s = Scene::random(&mut rng, Split::Train);
            if s.shapes.len() == 2 && s.shapes[0].colour != s.shapes[1].colour {
                break s;
            }
        };
        let caption = scene.caption();
        let (a, b) = (scene.shapes[0].colour.name(), scene.shapes[1].colour.name());
        // Swapping the two colours keeps every word but breaks colour.
        let swapped = caption
            .replacen(a, "@", 1)
            .replacen(b, a, 1)
            .replacen('@', b, 1);
        let r = compare(&read_caption(&swapped), &scene);
        assert!(
            !r.colour_ok && r.shape_ok && r.size_ok && r.count_ok,
            "{swapped}: {r:?}"
        );
        // Stating the relation the other way round with the shapes swapped is
        // the same scene; without the line the positions are not stated.
        let relation = scene.relation().unwrap();
        let line = Line::of(relation, scene.shapes[0].position).name();
        let turned_relation = match relation {
            Relation::LeftOf => "right of",
            Relation::Above => "below",
        };
        let (first, second) = (scene.shapes[0].words(), scene.shapes[1].words());
        let bg = scene.background.name();
        let turned = format!("a {second} {turned_relation} a {first} {line} on a {bg} background");
        assert!(compare(&read_caption(&turned), &scene).all_ok(), "{turned}");
        let lineless = format!("a {second} {turned_relation} a {first} on a {bg} background");
        let r = compare(&read_caption(&lineless), &scene);
        assert!(
            !r.position_ok && r.colour_ok && r.count_ok,
            "{lineless}: {r:?}"
        );
        // A line that contradicts the relation states no positions.
        let wrong_line = match relation {
            Relation::LeftOf => "on the left",
            Relation::Above => "at the top",
        };
        let contradiction = format!("a {first} {} a {second} {wrong_line}", relation.name());
        assert!(!compare(&read_caption(&contradiction), &scene).position_ok);
        // Only one shape named: count fails.
        let one = format!("a {first} on a {bg} background");
        let r = compare(&read_caption(&one), &scene);
        assert!(!r.count_ok && !r.position_ok, "{one}: {r:?}");
        assert!(!compare(&read_caption(""), &scene).colour_ok);
    }
}
