//! Plain-Rust reference implementations, on host slices, of the primitives that the
//! [`super::Backend`] trait implements by default through `download`/`upload` (sigmoid
//! and tanh, average pooling, per-channel affine maps and sums). Any backend gets
//! correct versions of them for free; a backend overrides one where speed matters.

use super::{Activation, PoolGeometry};

pub(crate) fn activation(kind: Activation, x: &[f32], y: &mut [f32]) {
    for (out, &value) in y.iter_mut().zip(x) {
        *out = match kind {
            Activation::Sigmoid => sigmoid(value),
            Activation::Tanh => value.tanh(),
        };
    }
}

/// `dx = dy * f'(x)`, from the activation's input.
pub(crate) fn activation_backward(kind: Activation, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((out, &value), &grad) in dx.iter_mut().zip(x).zip(dy) {
        let derivative = match kind {
            Activation::Sigmoid => {
                let s = sigmoid(value);
                s * (1.0 - s)
            }
            Activation::Tanh => {
                let t = value.tanh();
                1.0 - t * t
            }
        };
        *out = grad * derivative;
    }
}

/// The logistic function, without overflow for large `|x|`.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub(crate) fn avg_pool(geometry: &PoolGeometry, input: &[f32], output: &mut [f32]) {
    let (h, w) = (geometry.in_height, geometry.in_width);
    let (oh, ow) = (geometry.out_height, geometry.out_width);
    let scale = 1.0 / (geometry.size * geometry.size) as f32;
    for plane in 0..geometry.planes {
        let x = &input[plane * h * w..(plane + 1) * h * w];
        let y = &mut output[plane * oh * ow..(plane + 1) * oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = 0.0f32;
                for ky in 0..geometry.size {
                    let row = (oy * geometry.stride + ky) * w + ox * geometry.stride;
                    sum += x[row..row + geometry.size].iter().sum::<f32>();
                }
                y[oy * ow + ox] = sum * scale;
            }
        }
    }
}

/// Spreads each window's output gradient evenly over the window (summed where windows
/// overlap); `input_grad` is overwritten.
pub(crate) fn avg_pool_backward(
    geometry: &PoolGeometry,
    output_grad: &[f32],
    input_grad: &mut [f32],
) {
    let (h, w) = (geometry.in_height, geometry.in_width);
    let (oh, ow) = (geometry.out_height, geometry.out_width);
    let scale = 1.0 / (geometry.size * geometry.size) as f32;
    input_grad.fill(0.0);
    for plane in 0..geometry.planes {
        let dy = &output_grad[plane * oh * ow..(plane + 1) * oh * ow];
        let dx = &mut input_grad[plane * h * w..(plane + 1) * h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let share = dy[oy * ow + ox] * scale;
                for ky in 0..geometry.size {
                    let row = (oy * geometry.stride + ky) * w + ox * geometry.stride;
                    for value in &mut dx[row..row + geometry.size] {
                        *value += share;
                    }
                }
            }
        }
    }
}

/// `y[e, c, p] = scale[c] * x[e, c, p] + shift[c]` over `[batch, channels, plane]`.
pub(crate) fn channel_affine(plane: usize, scale: &[f32], shift: &[f32], x: &[f32], y: &mut [f32]) {
    let channels = scale.len();
    for (index, (out, chunk)) in y.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
        let channel = index % channels;
        let (a, b) = (scale[channel], shift[channel]);
        for (o, &v) in out.iter_mut().zip(chunk) {
            *o = a * v + b;
        }
    }
}

/// Per channel: `sum (x - center[c]) * dy` and `sum dy` over examples and pixels, in f64.
pub(crate) fn channel_grad_sums(
    plane: usize,
    center: &[f32],
    x: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let channels = center.len();
    let (mut weighted, mut plain) = (vec![0.0f64; channels], vec![0.0f64; channels]);
    for (index, (xs, grads)) in x.chunks(plane).zip(dy.chunks(plane)).enumerate() {
        let channel = index % channels;
        let c = center[channel];
        for (&v, &g) in xs.iter().zip(grads) {
            weighted[channel] += f64::from((v - c) * g);
            plain[channel] += f64::from(g);
        }
    }
    (weighted, plain)
}
