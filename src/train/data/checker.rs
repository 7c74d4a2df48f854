//! Reads a scene back from pixels (GenEval-style) and checks it against the
//! scene that was asked for (the comparison itself is [`super::reading`]).
//!
//! Detection: denoise with a 3x3 median (keeps edges and corners); the
//! background is the median of the border; a pixel is foreground when a shape colour is nearer to it than
//! the background; 4-connected components of at least [`MIN_COMPONENT_AREA`]
//! pixels are shapes. Per shape: colour = palette entry nearest the mean of
//! its interior, size from the bounding box, position = anchor nearest the
//! bounding-box centre, shape = the template (each shape drawn as the
//! renderer draws it) with the best intersection-over-union, searched over
//! extents and centres near the bounding box, since blur trims tips and
//! corners.

use anyhow::{bail, Result};
use image::RgbImage;

use super::degrade::median3;
pub use super::reading::{compare, AttributeTally, CheckResult, ReadShape, SceneReading};
use super::shapes::{Background, Colour, Position, Scene, Shape, Size, IMAGE_SIZE};

/// Components smaller than this are noise (a small triangle covers ~100).
pub const MIN_COMPONENT_AREA: usize = 30;
/// Bounding boxes at least this wide or tall are large (14 vs 26 rendered).
const LARGE_MIN_EXTENT: u32 = 20;

/// A shape found in pixels, with the measurements behind its attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectedShape {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
    /// Inclusive bounding box (x0, y0, x1, y1).
    pub bbox: (u32, u32, u32, u32),
    pub area: usize,
    /// Intersection-over-union of the component with the chosen template.
    pub match_iou: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub background: Background,
    pub shapes: Vec<DetectedShape>,
}

impl Detection {
    pub fn reading(&self) -> SceneReading {
        SceneReading {
            background: Some(self.background),
            shapes: self
                .shapes
                .iter()
                .map(|d| ReadShape {
                    colour: Some(d.colour),
                    shape: Some(d.shape),
                    size: Some(d.size),
                    position: Some(d.position),
                })
                .collect(),
        }
    }
}

/// Reads the shapes in a 64x64 picture.
pub fn detect(image: &RgbImage) -> Result<Detection> {
    if image.dimensions() != (IMAGE_SIZE, IMAGE_SIZE) {
        bail!(
            "checker reads {IMAGE_SIZE}x{IMAGE_SIZE} images; this one is {}x{}",
            image.width(),
            image.height()
        );
    }
    let img = median3(image);
    let n = IMAGE_SIZE as usize;
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0.map(|v| v as f32);

    let bg_ref = border_median(&img);
    let background = *Background::ALL
        .iter()
        .min_by(|a, b| {
            dist2(a.rgb().map(f32::from), bg_ref).total_cmp(&dist2(b.rgb().map(f32::from), bg_ref))
        })
        .expect("non-empty palette");
    let foreground: Vec<bool> = (0..n * n)
        .map(|i| {
            let p = px(i % n, i / n);
            let to_bg = dist2(p, bg_ref);
            Colour::ALL
                .iter()
                .any(|c| dist2(p, c.rgb().map(f32::from)) < to_bg)
        })
        .collect();

    let mut shapes = Vec::new();
    for component in components(&foreground, n) {
        if component.len() < MIN_COMPONENT_AREA {
            continue;
        }
        shapes.push(measure(&component, &foreground, n, &px));
    }
    Ok(Detection { background, shapes })
}

/// Compares a picture with the scene it should show. An unreadable picture
/// (wrong size) fails every attribute.
pub fn check(image: &RgbImage, expected: &Scene) -> CheckResult {
    match detect(image) {
        Ok(detection) => compare(&detection.reading(), expected),
        Err(_) => CheckResult::default(),
    }
}

/// Measures one component and classifies it.
fn measure(
    component: &[usize],
    foreground: &[bool],
    n: usize,
    px: &dyn Fn(usize, usize) -> [f32; 3],
) -> DetectedShape {
    let (mut x0, mut y0, mut x1, mut y1) = (n, n, 0, 0);
    for &i in component {
        let (x, y) = (i % n, i / n);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    let (shape, match_iou) = best_template(component, n, (x0, y0, x1, y1));

    // Mean colour of the interior (edges are blends with the background).
    let inside = |i: usize| foreground.get(i).copied().unwrap_or(false);
    let interior: Vec<usize> = component
        .iter()
        .copied()
        .filter(|&i| {
            let (x, y) = (i % n, i / n);
            x > 0
                && y > 0
                && x + 1 < n
                && y + 1 < n
                && inside(i - 1)
                && inside(i + 1)
                && inside(i - n)
                && inside(i + n)
        })
        .collect();
    let pixels = if interior.is_empty() {
        component
    } else {
        &interior
    };
    let mut mean = [0f32; 3];
    for &i in pixels {
        let p = px(i % n, i / n);
        for c in 0..3 {
            mean[c] += p[c] / pixels.len() as f32;
        }
    }
    let colour = *Colour::ALL
        .iter()
        .min_by(|a, b| {
            dist2(a.rgb().map(f32::from), mean).total_cmp(&dist2(b.rgb().map(f32::from), mean))
        })
        .expect("non-empty palette");

    let size = if w.max(h) as u32 >= LARGE_MIN_EXTENT {
        Size::Large
    } else {
        Size::Small
    };
    let centre = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    let position = *Position::ALL
        .iter()
        .min_by(|a, b| {
            let d = |p: &Position| {
                let (cx, cy) = p.centre();
                (cx - centre.0).powi(2) + (cy - centre.1).powi(2)
            };
            d(a).total_cmp(&d(b))
        })
        .expect("non-empty positions");
    DetectedShape {
        shape,
        colour,
        size,
        position,
        bbox: (x0 as u32, y0 as u32, x1 as u32, y1 as u32),
        area: component.len(),
        match_iou,
    }
}

/// The shape whose template best overlaps the component, and that overlap.
fn best_template(
    component: &[usize],
    n: usize,
    bbox: (usize, usize, usize, usize),
) -> (Shape, f32) {
    const MARGIN: usize = 4;
    let (x0, y0, x1, y1) = bbox;
    let (wx0, wy0) = (x0.saturating_sub(MARGIN), y0.saturating_sub(MARGIN));
    let (wx1, wy1) = ((x1 + MARGIN).min(n - 1), (y1 + MARGIN).min(n - 1));
    let ww = wx1 - wx0 + 1;
    let mut window = vec![false; ww * (wy1 - wy0 + 1)];
    for &i in component {
        window[(i / n - wy0) * ww + (i % n - wx0)] = true;
    }
    let side = (x1 - x0).max(y1 - y0) as f32 + 1.0;
    let (cx, cy) = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    let iou = |shape: Shape, extent: f32, oy: f32| {
        let (mut inter, mut union) = (0usize, 0usize);
        for (k, &inside) in window.iter().enumerate() {
            let px = (wx0 + k % ww) as f32 + 0.5;
            let py = (wy0 + k / ww) as f32 + 0.5;
            let covered = shape.covers(cx, cy + oy, extent / 2.0, px, py);
            inter += (inside && covered) as usize;
            union += (inside || covered) as usize;
        }
        inter as f32 / union.max(1) as f32
    };
    let mut best = (Shape::Square, -1.0f32);
    for &shape in Shape::ALL {
        // Extent first, centred on the box; then the vertical centre (blur
        // trims a triangle's apex, not its base). Shapes are left-right
        // symmetric, so the horizontal centre is the box's.
        let (extent, mut score) = (-1..=4)
            .map(|d| side + d as f32)
            .map(|e| (e, iou(shape, e, 0.0)))
            .fold((side, -1.0), |a, b| if b.1 > a.1 { b } else { a });
        for oy in [-1.0, -0.5, 0.5, 1.0] {
            score = score.max(iou(shape, extent, oy));
        }
        if score > best.1 {
            best = (shape, score);
        }
    }
    best
}

/// 4-connected components of the mask, each a list of pixel indices.
fn components(mask: &[bool], n: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut component = Vec::new();
        while let Some(i) = stack.pop() {
            component.push(i);
            let (x, y) = (i % n, i / n);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < n).then(|| i + 1),
                (y > 0).then(|| i - n),
                (y + 1 < n).then(|| i + n),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        out.push(component);
    }
    out
}

/// Per-channel median of the outermost two rings of pixels.
fn border_median(img: &RgbImage) -> [f32; 3] {
    let (w, h) = img.dimensions();
    let mut channels: [Vec<u8>; 3] = Default::default();
    for (x, y, p) in img.enumerate_pixels() {
        if x < 2 || y < 2 || x + 2 >= w || y + 2 >= h {
            for c in 0..3 {
                channels[c].push(p[c]);
            }
        }
    }
    channels.map(|mut v| {
        v.sort_unstable();
        v[v.len() / 2] as f32
    })
}

fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::degrade::{box_blur3, gaussian_noise};
    use crate::train::data::shapes::Line;
    use crate::train::data::Split;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Checks `n` random scenes (a third from each split) after `degrade`.
    fn tally(
        seed: u64,
        n: usize,
        degrade: &dyn Fn(RgbImage, &mut StdRng) -> RgbImage,
    ) -> AttributeTally {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tally = AttributeTally::default();
        for i in 0..n {
            let split = [Split::Train, Split::Test, Split::HeldOutPairs][i % 3];
            let scene = Scene::random(&mut rng, split);
            let image = degrade(scene.render(), &mut rng);
            tally.add(&check(&image, &scene));
        }
        tally
    }

    fn assert_rates(name: &str, tally: &AttributeTally, minimum: f64) {
        let line: Vec<String> = tally
            .rates()
            .iter()
            .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v))
            .collect();
        println!("checker on {name}: {}", line.join(", "));
        for (attribute, rate) in tally.rates() {
            assert!(rate >= minimum, "{name}: {attribute} {rate:.3} < {minimum}");
        }
    }

    #[test]
    fn reads_ground_truth_renderings() {
        let t = tally(41, 1000, &|img, _| img);
        assert_rates("ground truth", &t, 0.99);
    }

    #[test]
    fn reads_blurred_and_noisy_renderings() {
        let blur = tally(42, 500, &|img, _| box_blur3(&img));
        assert_rates("3x3 blur", &blur, 0.97);
        let noise = tally(43, 500, &|img, rng| gaussian_noise(&img, 20.0, rng));
        assert_rates("noise sigma 20", &noise, 0.97);
        let both = tally(44, 500, &|img, rng| {
            gaussian_noise(&box_blur3(&img), 20.0, rng)
        });
        assert_rates("blur + noise sigma 20", &both, 0.95);
    }

    #[test]
    fn a_different_scene_fails_the_changed_attribute() {
        let mut rng = StdRng::seed_from_u64(45);
        for _ in 0..100 {
            let scene = Scene::random(&mut rng, Split::Train);
            let image = scene.render();
            let mut other = scene.clone();
            let s = &mut other.shapes[0];
            s.colour = Colour::ALL[(s.colour as usize + 1) % Colour::ALL.len()];
            let r = check(&image, &other);
            assert!(
                !r.colour_ok && r.shape_ok && r.count_ok,
                "{}: {r:?}",
                scene.caption()
            );
            let mut other = scene.clone();
            other.shapes.pop();
            assert!(!check(&image, &other).count_ok);
            let mut other = scene.clone();
            other.background = Background::ALL[(scene.background as usize + 1) % 4];
            assert!(!check(&image, &other).background_ok);
        }
        let small = RgbImage::new(32, 32);
        assert!(detect(&small).is_err());
        assert_eq!(
            check(&small, &Scene::random(&mut rng, Split::Train)),
            CheckResult::default()
        );
    }

    #[test]
    fn relation_is_judged_from_positions() {
        let mut rng = StdRng::seed_from_u64(46);
        let scene = loop {
            let s = Scene::random(&mut rng, Split::Train);
            if s.shapes.len() == 2 {
                break s;
            }
        };
        // The same two shapes with their places exchanged: the relation flips.
        let mut swapped = scene.clone();
        let (a, b) = (swapped.shapes[0].position, swapped.shapes[1].position);
        swapped.shapes[0].position = b;
        swapped.shapes[1].position = a;
        let r = check(&swapped.render(), &scene);
        let distinct = scene.shapes[0].colour != scene.shapes[1].colour
            || scene.shapes[0].shape != scene.shapes[1].shape
            || scene.shapes[0].size != scene.shapes[1].size;
        assert_eq!(r.position_ok, !distinct, "{}: {r:?}", scene.caption());
        // The pair in the same relation on the other row or column: the
        // caption names the line, so the positions are wrong.
        let relation = scene.relation().unwrap();
        let other_line = match Line::of(relation, scene.shapes[0].position) {
            Line::Top => Line::Bottom,
            Line::Bottom => Line::Top,
            Line::Left => Line::Right,
            Line::Right => Line::Left,
        };
        let mut moved = scene.clone();
        (moved.shapes[0].position, moved.shapes[1].position) = other_line.positions();
        assert_eq!(moved.relation(), scene.relation());
        let r = check(&moved.render(), &scene);
        assert!(!r.position_ok && r.count_ok, "{}: {r:?}", scene.caption());
    }
}
