//! The built-in dataset: procedurally drawn digit-like glyphs, 28x28 grey levels in
//! `[0, 1]`, ten balanced classes, fully determined by a seed.
//!
//! Each class has a few stroke templates (polylines and arcs resembling the digits 0-9,
//! e.g. a 7 with and without a crossbar). An image picks a template and then varies it:
//! smooth "elastic" warping and jitter of the control points, scale, aspect, rotation,
//! shear, a shift of up to ±3 px, stroke thickness and ink, then draws the strokes
//! anti-aliased, sometimes adds a distractor mark, and adds pixel noise. The variation is
//! tuned so that a linear model clearly trails a small MLP, as on MNIST.

use std::f32::consts::PI;
use std::sync::OnceLock;

use rand::RngExt;
use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::partition::PartitionScheme;
use crate::rng::{SeededRng, derive_seed, ln_gamma_sample, seeded, standard_normal};
use crate::{Result, TrainError};

/// Images are `IMAGE_SIDE x IMAGE_SIDE` pixels.
pub const IMAGE_SIDE: usize = 28;
/// Features per image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Number of glyph classes.
pub const CLASSES: usize = 10;

/// A point in glyph space: x right, y down, the glyph roughly within x ±0.7, y ±1.
type Point = [f32; 2];
/// A glyph: strokes, each a polyline.
type Glyph = Vec<Vec<Point>>;

/// `count` images with balanced labels (`count / 10` or one more per class) in a seeded
/// random order.
pub fn generate(count: usize, seed: u64) -> Dataset {
    let mut labels: Vec<u8> = (0..count).map(|i| (i % CLASSES) as u8).collect();
    labels.shuffle(&mut seeded(derive_seed(seed, u64::MAX)));
    draw_labelled(labels, seed)
}

/// One image per label (each below [`CLASSES`]), image `i` drawn from its own stream of
/// `seed`.
fn draw_labelled(labels: Vec<u8>, seed: u64) -> Dataset {
    let count = labels.len();
    let mut features = vec![0.0f32; count * IMAGE_PIXELS];
    for (index, (image, &label)) in features
        .chunks_exact_mut(IMAGE_PIXELS)
        .zip(&labels)
        .enumerate()
    {
        // One stream per image: an image does not depend on how many came before it.
        let mut rng = seeded(derive_seed(seed, index as u64));
        draw_image(image, usize::from(label), &mut rng);
    }
    Dataset {
        features,
        labels,
        dim: IMAGE_PIXELS,
        classes: CLASSES,
    }
}

/// Stream tags that separate the training and test images of one seed.
const TRAIN_STREAM: u64 = 1;
const TEST_STREAM: u64 = 2;

/// Most examples one client of [`PerClient`] data may hold.
pub const MAX_PER_CLIENT_EXAMPLES: usize = 100_000;

/// Data for a population too large for any shared dataset
/// (`synthetic-per-client:N`): each client's examples are drawn from its id
/// when it is needed, so an idle client costs nothing. The same seed and id
/// always give the same examples. The test set (for the aggregator's
/// central evaluation) comes from a stream no client draws from.
#[derive(Clone, Debug, PartialEq)]
pub struct PerClient {
    /// Examples per client (the mean, under quantity skew).
    pub examples: usize,
    /// Test-set size.
    pub test: usize,
    pub seed: u64,
}

impl PerClient {
    /// The shared test set.
    pub fn test_set(&self) -> Dataset {
        generate(self.test, derive_seed(self.seed, TEST_STREAM))
    }

    /// Client `id`'s training examples. `scheme` skews them across clients
    /// as it would split a shared dataset: `iid` gives every client
    /// `examples` balanced examples; `quantity:SIGMA` scales that by a
    /// lognormal draw of mean 1 (at least one example, at most
    /// [`MAX_PER_CLIENT_EXAMPLES`]); `dirichlet:ALPHA` draws the client's
    /// class proportions from Dirichlet(ALPHA). Shards need a shared dataset
    /// to cut, and are refused.
    pub fn client(&self, id: u64, scheme: &PartitionScheme) -> Result<Dataset> {
        let client_seed = derive_seed(derive_seed(self.seed, TRAIN_STREAM), id);
        let mut rng = seeded(derive_seed(client_seed, u64::MAX - 1));
        let size = match scheme {
            PartitionScheme::Quantity { sigma } => {
                let factor = (sigma * standard_normal(&mut rng) - sigma * sigma / 2.0).exp();
                ((self.examples as f64 * factor).round() as usize).clamp(1, MAX_PER_CLIENT_EXAMPLES)
            }
            _ => self.examples,
        };
        let labels = match scheme {
            PartitionScheme::Iid | PartitionScheme::Quantity { .. } => {
                // Balanced from a random class on, so that clients with fewer
                // examples than classes do not all start at class 0.
                let first = rng.random_range(0..CLASSES);
                let mut labels: Vec<u8> =
                    (0..size).map(|i| ((first + i) % CLASSES) as u8).collect();
                labels.shuffle(&mut rng);
                labels
            }
            PartitionScheme::Dirichlet { alpha } => {
                // Normalised Gamma(alpha) draws, in log space (tiny alphas underflow).
                let logs: Vec<f64> = (0..CLASSES)
                    .map(|_| ln_gamma_sample(&mut rng, *alpha))
                    .collect();
                let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                (0..size)
                    .map(|_| {
                        let mut u = rng.random::<f64>() * total;
                        let mut class = CLASSES - 1;
                        for (c, w) in weights.iter().enumerate() {
                            if u < *w {
                                class = c;
                                break;
                            }
                            u -= w;
                        }
                        class as u8
                    })
                    .collect()
            }
            PartitionScheme::Shards { .. } => {
                return Err(TrainError::Partition(
                    "shards cut a shared dataset; per-client data takes iid, quantity:SIGMA or \
                     dirichlet:ALPHA"
                        .into(),
                ));
            }
        };
        Ok(draw_labelled(labels, client_seed))
    }
}

/// The `(train, test)` pair for one seed, drawn from independent streams.
pub fn train_test(train: usize, test: usize, seed: u64) -> (Dataset, Dataset) {
    (
        generate(train, derive_seed(seed, TRAIN_STREAM)),
        generate(test, derive_seed(seed, TEST_STREAM)),
    )
}

/// Draws one glyph of class `label` into `image` (all zeros on entry).
fn draw_image(image: &mut [f32], label: usize, rng: &mut SeededRng) {
    let variants = &templates()[label];
    let glyph = &variants[rng.random_range(0..variants.len())];

    // Smooth warp of glyph space: each coordinate bends sinusoidally with the other.
    let warp_x = (
        rng.random_range(0.0..0.14f32),
        rng.random_range(1.5..3.5f32),
        rng.random_range(0.0..2.0 * PI),
    );
    let warp_y = (
        rng.random_range(0.0..0.14f32),
        rng.random_range(1.5..3.5f32),
        rng.random_range(0.0..2.0 * PI),
    );
    let jitter = rng.random_range(0.0..0.05f32);

    // Affine map from glyph space to pixels.
    let scale = 9.5 * rng.random_range(0.78..1.1f32);
    let aspect = rng.random_range(0.75..1.2f32);
    let angle = rng.random_range(-0.3..0.3f32);
    let shear = rng.random_range(-0.35..0.35f32);
    let shift = [
        rng.random_range(-3.0..3.0f32),
        rng.random_range(-3.0..3.0f32),
    ];
    let (sin, cos) = angle.sin_cos();
    let centre = IMAGE_SIDE as f32 / 2.0;

    let radius = rng.random_range(0.8..1.9f32);
    let ink = rng.random_range(0.7..1.0f32);

    let mut pixels_path = Vec::with_capacity(64);
    for stroke in glyph {
        pixels_path.clear();
        for &[x, y] in stroke {
            let x = x + warp_x.0 * (warp_x.1 * y + warp_x.2).sin() + jitter * symmetric(rng);
            let y = y + warp_y.0 * (warp_y.1 * x + warp_y.2).sin() + jitter * symmetric(rng);
            let (x, y) = ((x + shear * y) * aspect, y);
            let (x, y) = (cos * x - sin * y, sin * x + cos * y);
            pixels_path.push([centre + shift[0] + scale * x, centre + shift[1] + scale * y]);
        }
        draw_polyline(image, &pixels_path, radius, ink);
    }

    // A distractor: a short thin stroke somewhere, about one image in four.
    if rng.random_bool(0.25) {
        let start = [
            rng.random_range(2.0..26.0f32),
            rng.random_range(2.0..26.0f32),
        ];
        let length = rng.random_range(3.0..8.0f32);
        let direction = rng.random_range(0.0..2.0 * PI);
        let end = [
            start[0] + length * direction.cos(),
            start[1] + length * direction.sin(),
        ];
        let bend = [
            rng.random_range(-2.0..2.0f32),
            rng.random_range(-2.0..2.0f32),
        ];
        let middle = [
            (start[0] + end[0]) / 2.0 + bend[0],
            (start[1] + end[1]) / 2.0 + bend[1],
        ];
        draw_polyline(
            image,
            &[start, middle, end],
            rng.random_range(0.5..1.2),
            rng.random_range(0.3..0.9),
        );
    }

    // Pixel noise: uniform in ±level, clamped back into [0, 1].
    let level = rng.random_range(0.0..0.2f32);
    for pixel in image.iter_mut() {
        *pixel = (*pixel + level * symmetric(rng)).clamp(0.0, 1.0);
    }
}

/// Uniform in [-1, 1).
fn symmetric(rng: &mut SeededRng) -> f32 {
    rng.random_range(-1.0..1.0f32)
}

/// Draws `path` (pixel coordinates) as a stroke of half-width `radius`, anti-aliased by
/// one pixel of linear coverage falloff; overlapping strokes keep the darker value.
fn draw_polyline(image: &mut [f32], path: &[Point], radius: f32, ink: f32) {
    let reach = radius + 0.5;
    let last = IMAGE_SIDE as isize - 1;
    for segment in path.windows(2) {
        let ([ax, ay], [bx, by]) = (segment[0], segment[1]);
        let (dx, dy) = (bx - ax, by - ay);
        let length_squared = dx * dx + dy * dy;
        let inverse = if length_squared > 0.0 {
            1.0 / length_squared
        } else {
            0.0
        };
        // Only pixels within reach of the segment's bounding box can be touched.
        let col_range = (
            ((ax.min(bx) - reach).floor() as isize).max(0),
            ((ax.max(bx) + reach).ceil() as isize).min(last),
        );
        let row_range = (
            ((ay.min(by) - reach).floor() as isize).max(0),
            ((ay.max(by) + reach).ceil() as isize).min(last),
        );
        for row in row_range.0..=row_range.1 {
            let py = row as f32 + 0.5;
            let line = &mut image[row as usize * IMAGE_SIDE..(row as usize + 1) * IMAGE_SIDE];
            for col in col_range.0..=col_range.1 {
                let px = col as f32 + 0.5;
                let t = (((px - ax) * dx + (py - ay) * dy) * inverse).clamp(0.0, 1.0);
                let (ex, ey) = (px - (ax + t * dx), py - (ay + t * dy));
                let distance = (ex * ex + ey * ey).sqrt();
                let coverage = (reach - distance).clamp(0.0, 1.0) * ink;
                let pixel = &mut line[col as usize];
                *pixel = pixel.max(coverage);
            }
        }
    }
}

/// Points along an elliptical arc centred at `(cx, cy)` with radii `(rx, ry)`, from angle
/// `from` to `to` in degrees (0 = right, 90 = down, as y points down).
fn arc(cx: f32, cy: f32, rx: f32, ry: f32, from: f32, to: f32) -> Vec<Point> {
    let steps = ((to - from).abs() / 15.0).ceil().max(2.0) as usize;
    (0..=steps)
        .map(|step| {
            let angle = (from + (to - from) * step as f32 / steps as f32).to_radians();
            [cx + rx * angle.cos(), cy + ry * angle.sin()]
        })
        .collect()
}

/// Points along a quadratic Bézier curve from `a` to `b` pulled towards `control`.
fn curve(a: Point, control: Point, b: Point) -> Vec<Point> {
    const STEPS: usize = 8;
    (0..=STEPS)
        .map(|step| {
            let t = step as f32 / STEPS as f32;
            let (u, v, w) = ((1.0 - t) * (1.0 - t), 2.0 * (1.0 - t) * t, t * t);
            [
                u * a[0] + v * control[0] + w * b[0],
                u * a[1] + v * control[1] + w * b[1],
            ]
        })
        .collect()
}

/// Concatenates path pieces into one stroke.
fn join(pieces: &[Vec<Point>]) -> Vec<Point> {
    pieces.concat()
}

/// The stroke templates of every class, built once.
fn templates() -> &'static [Vec<Glyph>; CLASSES] {
    static TEMPLATES: OnceLock<[Vec<Glyph>; CLASSES]> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        [
            // 0: round and narrow ovals, one with an overlapping start.
            vec![
                vec![arc(0.0, 0.0, 0.55, 0.92, 0.0, 360.0)],
                vec![arc(0.0, 0.0, 0.38, 0.92, -80.0, 300.0)],
            ],
            // 1: bare stroke, with a flag, with flag and base.
            vec![
                vec![vec![[0.05, -0.95], [-0.05, 0.95]]],
                vec![vec![[-0.3, -0.6], [0.05, -0.95], [-0.05, 0.95]]],
                vec![
                    vec![[-0.3, -0.6], [0.05, -0.95], [-0.05, 0.95]],
                    vec![[-0.35, 0.95], [0.3, 0.95]],
                ],
            ],
            // 2: hook, straight or curved neck, flat base.
            vec![
                vec![join(&[
                    arc(0.0, -0.45, 0.5, 0.5, 200.0, 400.0),
                    vec![[-0.55, 0.95], [0.6, 0.95]],
                ])],
                vec![join(&[
                    arc(0.0, -0.45, 0.5, 0.5, 200.0, 380.0),
                    curve([0.5, -0.3], [0.2, 0.4], [-0.55, 0.95]),
                    vec![[0.6, 0.9]],
                ])],
            ],
            // 3: two right-facing bowls, or a flat top and one bowl.
            vec![
                vec![join(&[
                    arc(0.0, -0.5, 0.45, 0.45, 200.0, 450.0),
                    arc(0.0, 0.45, 0.5, 0.5, 270.0, 520.0),
                ])],
                vec![join(&[
                    vec![[-0.5, -0.95], [0.5, -0.95], [-0.05, -0.1]],
                    arc(0.0, 0.42, 0.52, 0.52, 260.0, 520.0),
                ])],
            ],
            // 4: closed and open forms.
            vec![
                vec![
                    vec![[0.25, -0.95], [-0.55, 0.35], [0.6, 0.35]],
                    vec![[0.25, -0.95], [0.25, 0.95]],
                ],
                vec![
                    vec![[-0.4, -0.95], [-0.45, 0.3], [0.6, 0.3]],
                    vec![[0.3, -0.8], [0.3, 0.95]],
                ],
            ],
            // 5: bar, down stroke, bowl.
            vec![
                vec![join(&[
                    vec![[0.55, -0.95], [-0.35, -0.95]],
                    arc(0.0, 0.38, 0.5, 0.52, 235.0, 495.0),
                ])],
                vec![
                    vec![[0.55, -0.95], [-0.3, -0.95]],
                    join(&[vec![[-0.35, -0.95]], arc(0.0, 0.4, 0.52, 0.5, 215.0, 500.0)]),
                ],
            ],
            // 6: sweep from the top into a bottom loop.
            vec![
                vec![join(&[
                    curve([0.4, -0.95], [-0.55, -0.6], [-0.5, 0.45]),
                    arc(0.0, 0.45, 0.5, 0.48, 180.0, 540.0),
                ])],
                vec![join(&[
                    vec![[0.3, -0.95], [-0.45, 0.3]],
                    arc(0.0, 0.5, 0.45, 0.45, 200.0, 560.0),
                ])],
            ],
            // 7: plain, crossed, with a hooked bar.
            vec![
                vec![vec![[-0.55, -0.95], [0.6, -0.95], [-0.15, 0.95]]],
                vec![
                    vec![[-0.55, -0.95], [0.6, -0.95], [-0.1, 0.95]],
                    vec![[-0.15, 0.0], [0.45, 0.0]],
                ],
                vec![vec![
                    [-0.55, -0.7],
                    [-0.55, -0.95],
                    [0.6, -0.95],
                    [0.0, 0.95],
                ]],
            ],
            // 8: two stacked loops of different proportions.
            vec![
                vec![
                    arc(0.0, -0.5, 0.4, 0.42, 0.0, 360.0),
                    arc(0.0, 0.45, 0.5, 0.5, 0.0, 360.0),
                ],
                vec![
                    arc(0.0, -0.45, 0.48, 0.48, 0.0, 360.0),
                    arc(0.0, 0.5, 0.42, 0.45, 0.0, 360.0),
                ],
            ],
            // 9: top loop with a straight or curved tail.
            vec![
                vec![
                    arc(0.0, -0.45, 0.48, 0.45, 0.0, 360.0),
                    vec![[0.48, -0.45], [0.4, 0.95]],
                ],
                vec![
                    arc(0.0, -0.45, 0.48, 0.45, 0.0, 360.0),
                    curve([0.48, -0.45], [0.5, 0.7], [-0.3, 0.92]),
                ],
            ],
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_balanced() {
        let a = generate(500, 3);
        let b = generate(500, 3);
        assert_eq!(a, b);
        assert_ne!(a.features, generate(500, 4).features);
        assert_eq!(a.class_counts(), vec![50; 10]);
        a.validate().unwrap();
        assert!(a.features.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn images_have_ink_and_background() {
        let data = generate(200, 9);
        for index in 0..data.len() {
            let image = data.example(index);
            let bright = image.iter().filter(|&&v| v > 0.5).count();
            // A glyph covers a real but minor part of the canvas.
            assert!(
                (20..400).contains(&bright),
                "image {index}: {bright} bright pixels"
            );
        }
    }

    #[test]
    fn per_client_data_is_a_function_of_the_client_id() {
        let recipe = PerClient {
            examples: 40,
            test: 30,
            seed: 5,
        };
        let a = recipe.client(17, &PartitionScheme::Iid).unwrap();
        assert_eq!(a, recipe.client(17, &PartitionScheme::Iid).unwrap());
        assert_ne!(
            a.features,
            recipe.client(18, &PartitionScheme::Iid).unwrap().features
        );
        assert_eq!(a.class_counts(), vec![4; 10]);
        a.validate().unwrap();
        // No client draws the test set's images.
        let test = recipe.test_set();
        assert_eq!(test.len(), 30);
        assert!(
            test.features
                .chunks(IMAGE_PIXELS)
                .all(|t| { a.features.chunks(IMAGE_PIXELS).all(|c| c != t) })
        );
        // Clients with fewer examples than classes still cover every class.
        let tiny = PerClient {
            examples: 1,
            test: 1,
            seed: 2,
        };
        let firsts: std::collections::BTreeSet<u8> = (0..200)
            .map(|id| tiny.client(id, &PartitionScheme::Iid).unwrap().labels[0])
            .collect();
        assert_eq!(firsts.len(), CLASSES);
        // A huge id is as cheap as a small one.
        assert_eq!(
            recipe
                .client(u64::MAX, &PartitionScheme::Iid)
                .unwrap()
                .len(),
            40
        );
    }

    #[test]
    fn per_client_skews_sizes_and_labels() {
        let recipe = PerClient {
            examples: 20,
            test: 1,
            seed: 1,
        };
        let sizes: Vec<usize> = (0..400)
            .map(|id| {
                recipe
                    .client(id, &PartitionScheme::Quantity { sigma: 1.0 })
                    .unwrap()
                    .len()
            })
            .collect();
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!((15.0..25.0).contains(&mean), "mean size {mean}");
        assert!(sizes.iter().all(|&n| n >= 1));
        assert!(sizes.iter().max().unwrap() > &(3 * 20), "{sizes:?}");
        // Small alpha: most of a client's examples share a class.
        let skewed = recipe
            .client(3, &PartitionScheme::Dirichlet { alpha: 0.05 })
            .unwrap();
        assert_eq!(skewed.len(), 20);
        assert!(*skewed.class_counts().iter().max().unwrap() >= 12);
        let err = recipe
            .client(3, &PartitionScheme::Shards { per_client: 2 })
            .unwrap_err();
        assert!(err.to_string().contains("shards"), "{err}");
    }

    #[test]
    fn train_and_test_differ() {
        let (train, test) = train_test(100, 100, 1);
        assert_ne!(train.features, test.features);
    }
}
