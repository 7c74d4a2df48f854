//! The shapes world: 64x64 RGB scenes of one or two flat shapes on a plain
//! background, rendered to pixels and to a caption from the same attributes.
//!
//! Invariants:
//! - A [`Scene`] determines its pixels exactly (no jitter, no anti-aliasing).
//! - Shape colours are far apart in RGB and never equal a background colour.
//! - Two-shape scenes use a pair of corner positions in one row or one
//!   column (never the centre), first shape left of or above the second, so
//!   the caption's relation and line ("left of ... at the top") name both
//!   positions and the shapes never touch.
//! - Training scenes never contain a pair from [`HELD_OUT_PAIRS`].

use image::{Rgb, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{in_test_bucket, Split};

/// Side of every scene in pixels.
pub const IMAGE_SIZE: u32 = 64;

/// Declares a closed set of attribute values, each with its caption word(s).
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The caption word(s) for this value.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            pub fn from_name(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == word)
            }
        }
    };
}

named_enum!(Shape {
    Circle => "circle",
    Square => "square",
    Triangle => "triangle",
    Diamond => "diamond",
});

named_enum!(Colour {
    Red => "red",
    Green => "green",
    Blue => "blue",
    Yellow => "yellow",
    Purple => "purple",
    Orange => "orange",
});

named_enum!(Size {
    Small => "small",
    Large => "large",
});

named_enum!(Position {
    TopLeft => "top left",
    TopRight => "top right",
    Center => "center",
    BottomLeft => "bottom left",
    BottomRight => "bottom right",
});

named_enum!(Background {
    White => "white",
    Black => "black",
    Gray => "gray",
    Beige => "beige",
});

named_enum!(
    /// How the first shape of a two-shape scene sits relative to the second.
    Relation {
        LeftOf => "left of",
        Above => "above",
    }
);

named_enum!(
    /// The row or column a two-shape scene's pair sits in.
    Line {
        Top => "at the top",
        Bottom => "at the bottom",
        Left => "on the left",
        Right => "on the right",
    }
);

impl Shape {
    /// Whether point (px, py) lies inside this shape drawn in the square of
    /// half-side `half` centred on (cx, cy).
    pub fn covers(self, cx: f32, cy: f32, half: f32, px: f32, py: f32) -> bool {
        let (dx, dy) = (px - cx, py - cy);
        match self {
            Shape::Circle => dx * dx + dy * dy <= half * half,
            Shape::Square => dx.abs() <= half && dy.abs() <= half,
            // Apex at the top centre, base along the bottom edge.
            Shape::Triangle => dy.abs() <= half && dx.abs() <= (dy + half) / 2.0,
            Shape::Diamond => dx.abs() + dy.abs() <= half,
        }
    }

    /// Number of straight sides (a circle has none).
    pub fn sides(self) -> u32 {
        match self {
            Shape::Circle => 0,
            Shape::Square | Shape::Diamond => 4,
            Shape::Triangle => 3,
        }
    }
}

impl Colour {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 20, 20],
            Colour::Green => [30, 170, 40],
            Colour::Blue => [30, 60, 230],
            Colour::Yellow => [235, 235, 30],
            Colour::Purple => [150, 40, 190],
            Colour::Orange => [250, 130, 0],
        }
    }
}

impl Background {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [255, 255, 255],
            Background::Black => [0, 0, 0],
            Background::Gray => [128, 128, 128],
            Background::Beige => [225, 210, 175],
        }
    }
}

impl Size {
    /// Width and height of the shape's bounding box in pixels.
    pub fn extent(self) -> u32 {
        match self {
            Size::Small => 14,
            Size::Large => 26,
        }
    }
}

impl Position {
    /// Centre of a shape at this position, in pixels.
    pub fn centre(self) -> (f32, f32) {
        let (col, row) = self.grid();
        (16.0 + 16.0 * col as f32, 16.0 + 16.0 * row as f32)
    }

    /// (column, row) on a 3x3 grid; the corners are 0 and 2, the centre 1.
    pub fn grid(self) -> (u32, u32) {
        match self {
            Position::TopLeft => (0, 0),
            Position::TopRight => (2, 0),
            Position::Center => (1, 1),
            Position::BottomLeft => (0, 2),
            Position::BottomRight => (2, 2),
        }
    }
}

impl Relation {
    /// The relation of a shape at `first` to one at `second`, if they share a
    /// row with `first` on the left, or a column with `first` on top.
    pub fn between(first: Position, second: Position) -> Option<Relation> {
        let ((c1, r1), (c2, r2)) = (first.grid(), second.grid());
        if r1 == r2 && c1 < c2 {
            Some(Relation::LeftOf)
        } else if c1 == c2 && r1 < r2 {
            Some(Relation::Above)
        } else {
            None
        }
    }
}

impl Line {
    /// The line of a pair whose first shape sits at `first`.
    pub fn of(relation: Relation, first: Position) -> Line {
        let (col, row) = first.grid();
        match relation {
            Relation::LeftOf if row == 0 => Line::Top,
            Relation::LeftOf => Line::Bottom,
            Relation::Above if col == 0 => Line::Left,
            Relation::Above => Line::Right,
        }
    }

    /// How a pair on this line sits: side by side in a row, or one above
    /// the other in a column.
    pub fn relation(self) -> Relation {
        match self {
            Line::Top | Line::Bottom => Relation::LeftOf,
            Line::Left | Line::Right => Relation::Above,
        }
    }

    /// The (first, second) positions of a pair on this line.
    pub fn positions(self) -> (Position, Position) {
        use Position::*;
        match self {
            Line::Top => (TopLeft, TopRight),
            Line::Bottom => (BottomLeft, BottomRight),
            Line::Left => (TopLeft, BottomLeft),
            Line::Right => (TopRight, BottomRight),
        }
    }
}

/// Colour-shape pairs that never appear in training scenes: each shape and
/// each of these colours still appears in training with other partners.
pub const HELD_OUT_PAIRS: [(Colour, Shape); 4] = [
    (Colour::Red, Shape::Triangle),
    (Colour::Blue, Shape::Circle),
    (Colour::Yellow, Shape::Diamond),
    (Colour::Purple, Shape::Square),
];

pub fn is_held_out_pair(colour: Colour, shape: Shape) -> bool {
    HELD_OUT_PAIRS.contains(&(colour, shape))
}

/// One shape of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeSpec {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
}

impl ShapeSpec {
    /// Whether pixel centre (x + 0.5, y + 0.5) lies inside the shape.
    pub fn covers(&self, x: u32, y: u32) -> bool {
        let (cx, cy) = self.position.centre();
        let half = self.size.extent() as f32 / 2.0;
        self.shape
            .covers(cx, cy, half, x as f32 + 0.5, y as f32 + 0.5)
    }

    /// "small red circle"
    pub fn words(&self) -> String {
        format!(
            "{} {} {}",
            self.size.name(),
            self.colour.name(),
            self.shape.name()
        )
    }
}

/// A picture of the shapes world.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub shapes: Vec<ShapeSpec>,
}

impl Scene {
    /// The scene "draw a red circle" means: large, centred, on white.
    pub fn default_for(colour: Colour, shape: Shape) -> Scene {
        Scene {
            background: Background::White,
            shapes: vec![ShapeSpec {
                shape,
                colour,
                size: Size::Large,
                position: Position::Center,
            }],
        }
    }

    /// The relation of the first shape to the second (two-shape scenes).
    pub fn relation(&self) -> Option<Relation> {
        match self.shapes.as_slice() {
            [a, b] => Relation::between(a.position, b.position),
            _ => None,
        }
    }

    pub fn has_held_out_pair(&self) -> bool {
        self.shapes
            .iter()
            .any(|s| is_held_out_pair(s.colour, s.shape))
    }

    /// A canonical text of every attribute (positions included), used as the
    /// content key of the test bucket.
    pub fn key(&self) -> String {
        let mut key = self.background.name().to_string();
        for s in &self.shapes {
            key.push_str(&format!("|{}@{}", s.words(), s.position.name()));
        }
        key
    }

    pub fn in_split(&self, split: Split) -> bool {
        match split {
            Split::Train => !self.has_held_out_pair() && !in_test_bucket(&self.key()),
            Split::Test => !self.has_held_out_pair() && in_test_bucket(&self.key()),
            Split::HeldOutPairs => self.has_held_out_pair(),
        }
    }

    /// "a small red circle at the top left on a white background", or "a
    /// large blue square left of a small green triangle at the bottom on a
    /// gray background". Two-shape captions name the row or column as well
    /// as the relation: with the relation alone ("left of", top row or
    /// bottom?) the model chose the row while drawing, and session 15's
    /// model lost every two-shape colour it missed that way, drawing one
    /// shape or the pair in a column with one shape's colour twice.
    pub fn caption(&self) -> String {
        let subject = match (self.shapes.as_slice(), self.relation()) {
            ([one], _) => format!("a {} at the {}", one.words(), one.position.name()),
            ([a, b], Some(rel)) => format!(
                "a {} {} a {} {}",
                a.words(),
                rel.name(),
                b.words(),
                Line::of(rel, a.position).name()
            ),
            // Not produced by the generators; described shape by shape.
            (shapes, _) => shapes
                .iter()
                .map(|s| format!("a {} at the {}", s.words(), s.position.name()))
                .collect::<Vec<_>>()
                .join(" and "),
        };
        format!("{subject} on a {} background", self.background.name())
    }

    /// The pixels. Later shapes paint over earlier ones (they never overlap in
    /// generated scenes).
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(IMAGE_SIZE, IMAGE_SIZE, Rgb(self.background.rgb()));
        for spec in &self.shapes {
            let colour = Rgb(spec.colour.rgb());
            for (x, y, px) in img.enumerate_pixels_mut() {
                if spec.covers(x, y) {
                    *px = colour;
                }
            }
        }
        img
    }

    /// The shape class of each cell of a `grid` x `grid` partition of the
    /// picture, row by row: 0 where no shape shows, `1 + i` where
    /// `Shape::ALL[i]` covers most of the cell's shape pixels. The VQ's
    /// shape loss learns from these (`train::vq_train::losses`).
    pub fn patch_shapes(&self, grid: u32) -> Vec<usize> {
        self.patch_classes(grid, Shape::ALL.len(), |s| s.shape as usize)
    }

    /// The same for colours: 0 where no shape shows, `1 + i` where shapes
    /// of `Colour::ALL[i]` cover most of the cell's shape pixels (the VQ's
    /// colour loss).
    pub fn patch_colours(&self, grid: u32) -> Vec<usize> {
        self.patch_classes(grid, Colour::ALL.len(), |s| s.colour as usize)
    }

    /// Per cell, 0 or `1 + ` the `class_of` (below `classes`) that covers
    /// most of the cell's shape pixels; ties go to the lower class.
    fn patch_classes(
        &self,
        grid: u32,
        classes: usize,
        class_of: impl Fn(&ShapeSpec) -> usize,
    ) -> Vec<usize> {
        let cell = IMAGE_SIZE / grid;
        let mut out = Vec::with_capacity((grid * grid) as usize);
        for gy in 0..grid {
            for gx in 0..grid {
                let mut covered = vec![0u32; classes];
                for y in gy * cell..(gy + 1) * cell {
                    for x in gx * cell..(gx + 1) * cell {
                        // Later shapes paint over earlier ones, as in `render`.
                        if let Some(spec) = self.shapes.iter().rev().find(|s| s.covers(x, y)) {
                            covered[class_of(spec)] += 1;
                        }
                    }
                }
                let best = (0..covered.len()).max_by_key(|&i| (covered[i], std::cmp::Reverse(i)));
                out.push(match best {
                    Some(i) if covered[i] > 0 => 1 + i,
                    _ => 0,
                });
            }
        }
        out
    }

    /// A random scene of `split` (one or two shapes, equally likely).
    pub fn random<R: Rng + ?Sized>(rng: &mut R, split: Split) -> Scene {
        loop {
            let scene = Self::draw_candidate(rng, split);
            if scene.in_split(split) {
                return scene;
            }
        }
    }

    fn draw_candidate<R: Rng + ?Sized>(rng: &mut R, split: Split) -> Scene {
        let background = pick(rng, Background::ALL);
        let positions: Vec<Position> = if rng.random_bool(0.5) {
            vec![pick(rng, Position::ALL)]
        } else {
            let (a, b) = pick(rng, Line::ALL).positions();
            vec![a, b]
        };
        // Held-out scenes: one chosen shape takes a held-out pair, the others
        // any pair. Other splits: only pairs that are not held out.
        let held_out_slot = rng.random_range(0..positions.len());
        let shapes = positions
            .iter()
            .enumerate()
            .map(|(i, &position)| {
                let (colour, shape) = if split == Split::HeldOutPairs && i == held_out_slot {
                    pick(rng, &HELD_OUT_PAIRS)
                } else {
                    random_pair(rng, split != Split::HeldOutPairs)
                };
                ShapeSpec {
                    shape,
                    colour,
                    size: pick(rng, Size::ALL),
                    position,
                }
            })
            .collect();
        Scene { background, shapes }
    }
}

/// A uniformly chosen colour-shape pair, optionally excluding held-out pairs.
pub fn random_pair<R: Rng + ?Sized>(rng: &mut R, exclude_held_out: bool) -> (Colour, Shape) {
    loop {
        let pair = (pick(rng, Colour::ALL), pick(rng, Shape::ALL));
        if !(exclude_held_out && is_held_out_pair(pair.0, pair.1)) {
            return pair;
        }
    }
}

/// A uniformly chosen element of a non-empty constant table.
pub(crate) fn pick<R: Rng + ?Sized, T: Copy>(rng: &mut R, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

#[cfg(test)]
mod tests;
