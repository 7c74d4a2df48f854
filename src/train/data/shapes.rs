//! The shapes world: 64x64 RGB scenes of one or two flat shapes on a plain
//! background, rendered to pixels and to a caption from the same attributes.
//!
//! Invariants:
//! - A [`Scene`] determines its pixels exactly (no jitter, no anti-aliasing).
//! - Shape colours are far apart in RGB and never equal a background colour.
//! - Two-shape scenes use a pair of corner positions in one row or one
//!   column (never the centre), first shape left of or above the second, so
//!   the caption's relation is unambiguous and the shapes never touch.
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

/// Position pairs of two-shape scenes: (first, second), first left or above.
pub const PAIR_ARRANGEMENTS: [(Position, Position); 4] = [
    (Position::TopLeft, Position::TopRight),
    (Position::BottomLeft, Position::BottomRight),
    (Position::TopLeft, Position::BottomLeft),
    (Position::TopRight, Position::BottomRight),
];

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
    fn words(&self) -> String {
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

    /// "a small red circle at the top left on a white background", or
    /// "a large blue square left of a small green triangle on a gray background".
    /// Two-shape captions name the relation, not the row or column.
    pub fn caption(&self) -> String {
        let subject = match (self.shapes.as_slice(), self.relation()) {
            ([one], _) => format!("a {} at the {}", one.words(), one.position.name()),
            ([a, b], Some(rel)) => format!("a {} {} a {}", a.words(), rel.name(), b.words()),
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
        let cell = IMAGE_SIZE / grid;
        let mut classes = Vec::with_capacity((grid * grid) as usize);
        for gy in 0..grid {
            for gx in 0..grid {
                let mut covered = vec![0u32; Shape::ALL.len()];
                for y in gy * cell..(gy + 1) * cell {
                    for x in gx * cell..(gx + 1) * cell {
                        // Later shapes paint over earlier ones, as in `render`.
                        if let Some(spec) = self.shapes.iter().rev().find(|s| s.covers(x, y)) {
                            covered[spec.shape as usize] += 1;
                        }
                    }
                }
                let best = (0..covered.len()).max_by_key(|&i| (covered[i], std::cmp::Reverse(i)));
                classes.push(match best {
                    Some(i) if covered[i] > 0 => 1 + i,
                    _ => 0,
                });
            }
        }
        classes
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
            let (a, b) = pick(rng, &PAIR_ARRANGEMENTS);
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
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn scenes(seed: u64, split: Split, n: usize) -> Vec<Scene> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| Scene::random(&mut rng, split)).collect()
    }

    #[test]
    fn patch_shapes_name_the_shape_covering_each_cell() {
        let square = |position| ShapeSpec {
            shape: Shape::Square,
            colour: Colour::Red,
            size: Size::Large,
            position,
        };
        let scene = Scene {
            background: Background::White,
            shapes: vec![
                square(Position::TopLeft),
                ShapeSpec {
                    shape: Shape::Triangle,
                    ..square(Position::BottomRight)
                },
            ],
        };
        // 4x4 cells of 16 px. The top-left square spans pixels 3..29, so
        // it shows in cells (0, 0), (0, 1), (1, 0) and (1, 1) only; the
        // triangle centred on (48, 48) shows in the bottom-right four.
        let classes = scene.patch_shapes(4);
        let square_class = 1 + Shape::ALL.iter().position(|&s| s == Shape::Square).unwrap();
        let triangle_class = 1 + Shape::ALL
            .iter()
            .position(|&s| s == Shape::Triangle)
            .unwrap();
        #[rustfmt::skip]
        let want = [
            square_class, square_class, 0, 0,
            square_class, square_class, 0, 0,
            0, 0, triangle_class, triangle_class,
            0, 0, triangle_class, triangle_class,
        ];
        assert_eq!(classes, want);
    }

    #[test]
    fn scenes_are_deterministic_from_the_seed() {
        assert_eq!(scenes(7, Split::Train, 50), scenes(7, Split::Train, 50));
        assert_ne!(scenes(7, Split::Train, 50), scenes(8, Split::Train, 50));
        let a = scenes(7, Split::Train, 5);
        let b = scenes(7, Split::Train, 5);
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(a.render(), b.render());
        }
    }

    #[test]
    fn held_out_pairs_never_appear_in_training_scenes() {
        for scene in scenes(1, Split::Train, 5000)
            .iter()
            .chain(&scenes(2, Split::Test, 1000))
        {
            assert!(!scene.has_held_out_pair(), "{}", scene.caption());
        }
        for scene in scenes(3, Split::HeldOutPairs, 1000) {
            assert!(scene.has_held_out_pair(), "{}", scene.caption());
        }
        // Every allowed pair does occur in training.
        let train = scenes(4, Split::Train, 3000);
        for &colour in Colour::ALL {
            for &shape in Shape::ALL {
                let seen = train.iter().any(|s| {
                    s.shapes
                        .iter()
                        .any(|x| (x.colour, x.shape) == (colour, shape))
                });
                assert_eq!(
                    seen,
                    !is_held_out_pair(colour, shape),
                    "{colour:?} {shape:?}"
                );
            }
        }
    }

    #[test]
    fn train_and_test_scenes_are_disjoint() {
        let train: std::collections::HashSet<String> = scenes(5, Split::Train, 3000)
            .iter()
            .map(Scene::key)
            .collect();
        let test = scenes(6, Split::Test, 500);
        assert!(test.iter().all(|s| !train.contains(&s.key())));
    }

    #[test]
    fn captions_name_every_attribute() {
        let one = Scene {
            background: Background::White,
            shapes: vec![ShapeSpec {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Small,
                position: Position::TopLeft,
            }],
        };
        assert_eq!(
            one.caption(),
            "a small red circle at the top left on a white background"
        );
        let two = Scene {
            background: Background::Gray,
            shapes: vec![
                ShapeSpec {
                    shape: Shape::Square,
                    colour: Colour::Blue,
                    size: Size::Large,
                    position: Position::BottomLeft,
                },
                ShapeSpec {
                    shape: Shape::Triangle,
                    colour: Colour::Green,
                    size: Size::Small,
                    position: Position::BottomRight,
                },
            ],
        };
        assert_eq!(
            two.caption(),
            "a large blue square left of a small green triangle on a gray background"
        );
    }

    #[test]
    fn palettes_are_far_apart() {
        let dist = |a: [u8; 3], b: [u8; 3]| {
            a.iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f32 - y as f32).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                assert!(dist(a.rgb(), b.rgb()) > 100.0, "{a:?} {b:?}");
            }
            for bg in Background::ALL {
                assert!(dist(a.rgb(), bg.rgb()) > 100.0, "{a:?} on {bg:?}");
            }
        }
    }

    #[test]
    fn two_shape_scenes_never_touch() {
        for scene in scenes(9, Split::Train, 400) {
            let img = scene.render();
            let bg = Rgb(scene.background.rgb());
            if let [a, b] = scene.shapes.as_slice() {
                assert!(scene.relation().is_some());
                // No pixel of `a` has a 4-neighbour covered by `b`.
                for y in 0..IMAGE_SIZE {
                    for x in 0..IMAGE_SIZE {
                        if a.covers(x, y) {
                            for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                                assert!(!b.covers(nx, ny), "{}", scene.caption());
                            }
                        }
                    }
                }
            }
            assert!(img.pixels().any(|p| *p != bg));
        }
    }
}
