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

    // The same cells by colour: the triangle is blue, the square stays red.
    let scene = Scene {
        shapes: vec![
            scene.shapes[0],
            ShapeSpec {
                colour: Colour::Blue,
                ..scene.shapes[1]
            },
        ],
        ..scene
    };
    let colour_class = |c: Colour| 1 + Colour::ALL.iter().position(|&x| x == c).unwrap();
    let (red, blue) = (colour_class(Colour::Red), colour_class(Colour::Blue));
    #[rustfmt::skip]
    let want = [
        red, red, 0, 0,
        red, red, 0, 0,
        0, 0, blue, blue,
        0, 0, blue, blue,
    ];
    assert_eq!(scene.patch_colours(4), want);
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
        "a large blue square left of a small green triangle at the bottom on a gray background"
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
            let relation = scene.relation().expect("a two-shape scene has a relation");
            let line = Line::of(relation, a.position);
            assert_eq!(line.positions(), (a.position, b.position));
            assert_eq!(line.relation(), relation);
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
