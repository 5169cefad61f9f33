//! Layer tests: forward passes against naive reference code, and for every layer a
//! central finite-difference check of the parameter and input gradients.
//!
//! The harness drives the real engine (`forward`, `loss`, `backward`) on a one- or
//! two-layer network whose output is used directly as logits, so every check also
//! exercises softmax cross-entropy.

use super::*;
use crate::backend::CpuBackend;
use crate::rng::seeded;
use crate::spec::{ModelSpec, Plan, Stage};

fn network(input_len: usize, stages: Vec<Stage>) -> Network {
    let plan = Plan {
        input_len,
        stages,
        tensors: Vec::new(),
    };
    let mut network = Network::new(&plan);
    network.input_grad = true;
    network
}

/// A network, its parameters and one batch: the loss is a function of both.
struct Problem {
    network: Network,
    params: Vec<f32>,
    input: Vec<f32>,
    labels: Vec<u8>,
    batch: usize,
    /// Seed of the dropout mask: reseeded for every pass, so the mask is fixed.
    dropout_seed: Option<u64>,
}

impl Problem {
    /// Random parameters in ±0.5, the given input, random labels.
    fn new(network: Network, input: Vec<f32>, batch: usize, seed: u64) -> Problem {
        let mut rng = seeded(seed);
        let params = (0..network.num_params)
            .map(|_| rng.random_range(-0.5..0.5f32))
            .collect();
        // Labels are u8: wider outputs (forward-only tests) use the first 256 as classes.
        let classes = network.classes.min(256);
        let labels = (0..batch)
            .map(|_| rng.random_range(0..classes) as u8)
            .collect();
        assert_eq!(input.len(), batch * network.input_len);
        Problem {
            network,
            params,
            input,
            labels,
            batch,
            dropout_seed: None,
        }
    }

    fn workspace(&self, params: &[f32], input: &[f32]) -> Workspace<CpuBackend> {
        let backend = CpuBackend;
        let mut workspace = Workspace::new(&backend, &self.network, self.batch, Purpose::Train);
        workspace.set_batch(&backend, input, &self.labels).unwrap();
        let mut rng = self.dropout_seed.map(seeded);
        forward(
            &backend,
            &self.network,
            &params.to_vec(),
            &mut workspace,
            self.batch,
            rng.as_mut(),
            None,
        )
        .unwrap();
        workspace
    }

    /// Mean loss over the batch.
    fn loss(&self, params: &[f32], input: &[f32]) -> f64 {
        // In f64 on the host from the logits: finite differences need more precision than
        // the backend's f32 per-batch loss sum.
        let workspace = self.workspace(params, input);
        let classes = self.network.classes;
        let last = self.network.layers.last().unwrap().output;
        let logits = &workspace.activation(last)[..self.batch * classes];
        let total: f64 = logits
            .chunks_exact(classes)
            .zip(&self.labels)
            .map(|(row, &label)| {
                let max = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
                sum.ln() + max - f64::from(row[usize::from(label)])
            })
            .sum();
        total / self.batch as f64
    }

    /// Analytic gradients of the mean loss: (parameters, input).
    fn gradients(&self) -> (Vec<f32>, Vec<f32>) {
        let backend = CpuBackend;
        let mut workspace = self.workspace(&self.params, &self.input);
        loss(
            &backend,
            &self.network,
            &mut workspace,
            self.batch,
            Some(1.0 / self.batch as f32),
            &mut [0.0; 2],
        )
        .unwrap();
        let mut grads = vec![f32::NAN; self.params.len()];
        let update = Update::Store {
            params: &self.params,
            grads: &mut grads,
            accumulate: false,
        };
        backward(&backend, &self.network, &mut workspace, self.batch, update).unwrap();
        let input_grad = workspace.input_gradient()[..self.input.len()].to_vec();
        (grads, input_grad)
    }
}

/// Up to `count` distinct indices below `len` (all of them when `len <= count`).
fn sample(len: usize, count: usize, seed: u64) -> Vec<usize> {
    if len <= count {
        return (0..len).collect();
    }
    let mut rng = seeded(seed);
    let mut all: Vec<usize> = (0..len).collect();
    rand::seq::SliceRandom::shuffle(all.as_mut_slice(), &mut rng);
    all.truncate(count);
    all
}

/// Central differences with step `step` against the analytic gradients, for (a sample
/// of) every parameter and input value. Returns the worst relative error seen.
fn check_gradients(problem: &Problem, step: f32, what: &str) -> f64 {
    let (param_grad, input_grad) = problem.gradients();
    let mut worst: f64 = 0.0;
    let mut largest: f64 = 0.0;
    let mut compare = |analytic: f32, numeric: f64, label: String| {
        let error = (f64::from(analytic) - numeric).abs();
        // Tolerance: f32 forward passes make differences noisy at ~1e-5; a real bug is
        // off by a sizeable fraction of the gradient.
        let allowed = 2e-3 + 2e-2 * numeric.abs();
        assert!(
            error <= allowed,
            "{what}: {label}: analytic {analytic} vs numeric {numeric}"
        );
        worst = worst.max(error / (1e-2 + numeric.abs()));
        largest = largest.max(numeric.abs());
    };
    for index in sample(problem.params.len(), 150, 1) {
        let mut params = problem.params.clone();
        params[index] += step;
        let plus = problem.loss(&params, &problem.input);
        params[index] = problem.params[index] - step;
        let minus = problem.loss(&params, &problem.input);
        let numeric = (plus - minus) / (2.0 * f64::from(step));
        compare(param_grad[index], numeric, format!("parameter {index}"));
    }
    for index in sample(problem.input.len(), 150, 2) {
        let mut input = problem.input.clone();
        input[index] += step;
        let plus = problem.loss(&problem.params, &input);
        input[index] = problem.input[index] - step;
        let minus = problem.loss(&problem.params, &input);
        let numeric = (plus - minus) / (2.0 * f64::from(step));
        compare(input_grad[index], numeric, format!("input {index}"));
    }
    assert!(largest > 1e-2, "{what}: the gradient is trivially small");
    worst
}

fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = seeded(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

/// Distinct values at least 0.1 apart (in random order), so pooling windows have a
/// clear maximum that a finite-difference step cannot change.
fn separated(len: usize, seed: u64) -> Vec<f32> {
    let mut values: Vec<f32> = (0..len)
        .map(|i| i as f32 * 0.1 - len as f32 * 0.05)
        .collect();
    rand::seq::SliceRandom::shuffle(values.as_mut_slice(), &mut seeded(seed));
    values
}

fn conv_stage(
    shape: (usize, usize, usize),
    out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Stage {
    Stage::Conv {
        geometry: ConvGeometry::new(shape, kernel, stride, padding).unwrap(),
        out_channels: out,
    }
}

#[test]
fn dense_gradient() {
    let net = network(
        5,
        vec![Stage::Dense {
            inputs: 5,
            outputs: 4,
        }],
    );
    let problem = Problem::new(net, uniform(3 * 5, 1), 3, 2);
    check_gradients(&problem, 1e-2, "dense");
}

#[test]
fn conv_gradients_for_strides_and_paddings() {
    for (kernel, stride, padding) in [
        (3, 1, 0),
        (3, 1, 2),
        (3, 2, 0),
        (3, 2, 2),
        (5, 1, 2),
        (1, 1, 0),
        (2, 2, 1),
    ] {
        let shape = (2, 6, 5);
        let net = network(60, vec![conv_stage(shape, 3, kernel, stride, padding)]);
        let outputs = net.classes;
        assert!(outputs > 0);
        let problem = Problem::new(net, uniform(2 * 60, 3), 2, 4);
        check_gradients(
            &problem,
            1e-2,
            &format!("conv k{kernel} s{stride} p{padding} ({outputs} outputs)"),
        );
    }
}

#[test]
fn max_pool_gradients() {
    // 2x2/2 (the fast path, odd sizes leave a row and column uncovered), and
    // overlapping 3x3/2 and 3x3/1 windows (the general path).
    for (size, stride, height, width) in [
        (2, 2, 4, 4),
        (2, 2, 5, 7),
        (3, 2, 7, 6),
        (3, 1, 4, 5),
        (2, 1, 3, 3),
    ] {
        let geometry = PoolGeometry::new(2, (height, width), size, stride).unwrap();
        let input_len = 2 * height * width;
        let net = network(input_len, vec![Stage::MaxPool { geometry }]);
        let problem = Problem::new(net, separated(3 * input_len, 5), 3, 6);
        check_gradients(
            &problem,
            1e-2,
            &format!("max pool {size}/{stride} on {height}x{width}"),
        );
    }
}

#[test]
fn relu_gradient() {
    // Inputs at least 0.1 away from the kink.
    let mut input = uniform(4 * 6, 7);
    for value in &mut input {
        *value = value.signum() * (0.1 + value.abs());
    }
    let net = network(6, vec![Stage::Relu { len: 6 }]);
    let problem = Problem::new(net, input, 4, 8);
    check_gradients(&problem, 1e-2, "relu");
    // Forward: negative inputs become zero.
    let workspace = problem.workspace(&problem.params, &problem.input);
    for (y, x) in workspace.activation(0).iter().zip(&problem.input) {
        assert_eq!(*y, x.max(0.0));
    }
}

#[test]
fn flatten_and_softmax_cross_entropy_gradient() {
    // The logits are the input itself: this checks softmax cross-entropy's gradient.
    let net = network(7, vec![Stage::Flatten { len: 7 }]);
    let problem = Problem::new(
        net,
        uniform(5 * 7, 9).iter().map(|v| 3.0 * v).collect(),
        5,
        10,
    );
    check_gradients(&problem, 1e-3, "flatten + softmax");
}

#[test]
fn dropout_gradient_with_fixed_mask() {
    let net = network(12, vec![Stage::Dropout { len: 12, rate: 0.5 }]);
    let mut problem = Problem::new(net, uniform(4 * 12, 11), 4, 12);
    problem.dropout_seed = Some(77);
    check_gradients(&problem, 1e-2, "dropout");

    // The mask drops some values and scales the others by 1 / (1 - rate).
    let workspace = problem.workspace(&problem.params, &problem.input);
    let output = &workspace.activation(0)[..problem.input.len()];
    let (mut dropped, mut kept) = (0, 0);
    for (y, x) in output.iter().zip(&problem.input) {
        if *y == 0.0 {
            dropped += 1;
        } else {
            assert_eq!(*y, 2.0 * x);
            kept += 1;
        }
    }
    assert!(dropped > 10 && kept > 10, "dropped {dropped}, kept {kept}");
    // Another seed gives another mask; evaluation (no RNG) is the identity.
    problem.dropout_seed = Some(78);
    let other = problem.workspace(&problem.params, &problem.input);
    assert_ne!(&other.activation(0)[..48], output);
    problem.dropout_seed = None;
    let eval = problem.workspace(&problem.params, &problem.input);
    assert_eq!(&eval.activation(0)[..48], problem.input.as_slice());
}

#[test]
fn small_cnn_stack_gradient() {
    // conv -> relu -> pool -> flatten -> dense -> relu -> dropout -> dense, through the
    // in-place buffers. Random data can sit near a ReLU/pool kink, so this uses a
    // small step; the per-layer tests above are the precise ones.
    let spec: ModelSpec = "cnn:1x6x6-c2k3p1-m2-d5-drop30-3".parse().unwrap();
    let plan = spec.plan().unwrap();
    let mut net = Network::new(&plan);
    net.input_grad = true;
    let mut problem = Problem::new(net, uniform(2 * 36, 13), 2, 14);
    problem.dropout_seed = Some(3);
    check_gradients(&problem, 1e-3, "small cnn");
}

/// Naive direct convolution of one `[C, H, W]` example in f64.
fn naive_conv(
    geometry: &ConvGeometry,
    out_channels: usize,
    weights: &[f32],
    bias: &[f32],
    input: &[f32],
) -> Vec<f64> {
    let g = geometry;
    let mut output = Vec::new();
    for o in 0..out_channels {
        for oy in 0..g.out_height {
            for ox in 0..g.out_width {
                let mut sum = f64::from(bias[o]);
                for c in 0..g.in_channels {
                    for ky in 0..g.kernel {
                        for kx in 0..g.kernel {
                            let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                            let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                            if iy < 0
                                || ix < 0
                                || iy >= g.in_height as isize
                                || ix >= g.in_width as isize
                            {
                                continue;
                            }
                            let w =
                                weights[((o * g.in_channels + c) * g.kernel + ky) * g.kernel + kx];
                            let x =
                                input[(c * g.in_height + iy as usize) * g.in_width + ix as usize];
                            sum += f64::from(w) * f64::from(x);
                        }
                    }
                }
                output.push(sum);
            }
        }
    }
    output
}

#[test]
fn conv_forward_matches_direct_convolution() {
    for (shape, kernel, stride, padding) in [
        ((1, 28, 28), 5, 1, 2),
        ((3, 7, 9), 3, 1, 0),
        ((2, 9, 8), 3, 2, 1),
        ((2, 5, 5), 5, 1, 2),
        ((2, 6, 6), 4, 3, 2),
        ((4, 3, 3), 1, 1, 0),
        ((2, 16, 3), 3, 1, 1),
    ] {
        let geometry = ConvGeometry::new(shape, kernel, stride, padding).unwrap();
        let out_channels = 3;
        let net = network(
            geometry.input_len(),
            vec![Stage::Conv {
                geometry,
                out_channels,
            }],
        );
        let batch = 2;
        let problem = Problem::new(net, uniform(batch * geometry.input_len(), 21), batch, 22);
        let workspace = problem.workspace(&problem.params, &problem.input);
        let weights_len = out_channels * geometry.col_rows();
        let (weights, bias) = problem.params.split_at(weights_len);
        let out_len = out_channels * geometry.col_cols();
        for example in 0..batch {
            let input = &problem.input[example * geometry.input_len()..][..geometry.input_len()];
            let expected = naive_conv(&geometry, out_channels, weights, bias, input);
            let actual = &workspace.activation(1)[example * out_len..][..out_len];
            for (a, e) in actual.iter().zip(&expected) {
                assert!((f64::from(*a) - e).abs() < 1e-4, "{geometry:?}: {a} vs {e}");
            }
        }
    }
}

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    // <im2col(x), c> == <x, col2im(c)> for all x, c: a wrong index in either breaks it.
    let backend = CpuBackend;
    for (shape, kernel, stride, padding) in [
        ((2, 5, 6), 3, 1, 1),
        ((3, 7, 7), 5, 1, 2),
        ((2, 8, 7), 3, 2, 2),
        ((1, 4, 4), 2, 2, 0),
    ] {
        let geometry = ConvGeometry::new(shape, kernel, stride, padding).unwrap();
        let x = uniform(geometry.input_len(), 31);
        let c = uniform(geometry.col_rows() * geometry.col_cols(), 32);
        let mut cols = vec![0.0; c.len()];
        backend.im2col(&geometry, &x, &mut cols).unwrap();
        let mut back = vec![f32::NAN; x.len()];
        backend.col2im(&geometry, &c, &mut back).unwrap();
        let left: f64 = cols
            .iter()
            .zip(&c)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let right: f64 = x
            .iter()
            .zip(&back)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        assert!(
            (left - right).abs() < 1e-4 * left.abs().max(1.0),
            "{geometry:?}: {left} vs {right}"
        );
    }
}

#[test]
fn max_pool_forward_matches_naive() {
    let backend = CpuBackend;
    for (size, stride, height, width) in [(2, 2, 6, 6), (2, 2, 5, 3), (3, 2, 7, 7), (3, 3, 9, 4)] {
        let geometry = PoolGeometry::new(3, (height, width), size, stride).unwrap();
        let input = uniform(geometry.input_len(), 41);
        let mut output = vec![0.0; geometry.output_len()];
        backend.max_pool(&geometry, &input, &mut output).unwrap();
        let mut expected = Vec::new();
        for plane in input.chunks(height * width) {
            for oy in 0..geometry.out_height {
                for ox in 0..geometry.out_width {
                    let mut best = f32::NEG_INFINITY;
                    for y in oy * stride..oy * stride + size {
                        for x in ox * stride..ox * stride + size {
                            best = best.max(plane[y * width + x]);
                        }
                    }
                    expected.push(best);
                }
            }
        }
        assert_eq!(output, expected, "{size}/{stride} on {height}x{width}");
    }
}

#[test]
fn dense_forward_matches_hand_computation() {
    // One layer, 2 inputs -> 2 outputs: W = [[1, 2], [3, 4]] (row = output), b = [0.5, -1].
    let net = network(
        2,
        vec![Stage::Dense {
            inputs: 2,
            outputs: 2,
        }],
    );
    let mut problem = Problem::new(net, vec![1.0, 1.0, 0.0, 2.0], 2, 0);
    problem.params = vec![1.0, 2.0, 3.0, 4.0, 0.5, -1.0];
    let workspace = problem.workspace(&problem.params, &problem.input);
    assert_eq!(workspace.activation(1), &vec![3.5, 6.0, 4.5, 7.0]);
}

#[test]
fn softmax_is_stable_for_huge_logits() {
    let backend = CpuBackend;
    let mut grad = vec![0.0; 2];
    let mut stats = [0.0; 2];
    backend
        .softmax_cross_entropy(
            &[1000.0, 0.0],
            &[1.0],
            2,
            Some((1.0, &mut grad)),
            &mut stats,
        )
        .unwrap();
    assert!((stats[0] - 1000.0).abs() < 1e-3, "{}", stats[0]);
    assert_eq!(stats[1], 0.0);
    assert!((grad[0] - 1.0).abs() < 1e-6 && (grad[1] + 1.0).abs() < 1e-6);
}

#[test]
fn mnist_cnn_layout_and_buffers() {
    let spec = ModelSpec::cnn_mnist();
    let net = Network::new(&spec.plan().unwrap());
    assert_eq!(net.num_params, 1_663_370);
    // Parameter offsets follow spec.tensors() order.
    let mut offset = 0;
    let tensors = spec.tensors();
    let mut names = tensors.iter();
    for layer in &net.layers {
        let (weight, bias) = match layer.op {
            Op::Dense { weight, bias, .. } | Op::Conv { weight, bias, .. } => (weight, bias),
            _ => continue,
        };
        let (w, b) = (names.next().unwrap(), names.next().unwrap());
        assert_eq!(weight, offset, "{}", w.name);
        assert_eq!(bias, offset + w.len(), "{}", b.name);
        offset = bias + b.len();
    }
    assert_eq!(offset, 1_663_370);
    // conv, relu (in place), pool, conv, relu, pool, flatten (in place), dense, relu, dense.
    let kinds: Vec<(usize, usize)> = net.layers.iter().map(|l| (l.input, l.output)).collect();
    assert_eq!(
        kinds,
        [
            (0, 1),
            (1, 1),
            (1, 2),
            (2, 3),
            (3, 3),
            (3, 4),
            (4, 4),
            (4, 5),
            (5, 5),
            (5, 6)
        ]
    );
    assert_eq!(net.classes, 10);
    assert_eq!(net.cols_len, 800 * 196);
}

/// The im2col-free forward path (taken for runs of at least 8 values and whole lanes of
/// output channels) against the naive convolution, over ragged tiles: pixel counts that
/// are not multiples of the tile, a half panel of output channels, stride 2.
#[test]
fn direct_conv_forward_matches_naive() {
    let backend = CpuBackend;
    for (shape, kernel, stride, padding, out_channels) in [
        ((32, 14, 14), 5, 1, 2, 16),
        ((4, 7, 6), 3, 1, 1, 8),
        ((8, 9, 9), 5, 1, 2, 24),
        ((3, 8, 7), 3, 2, 1, 40),
        // Whole 32-channel panels (AVX-512's two-vector tiles), as in the CNN.
        ((32, 14, 14), 5, 1, 2, 64),
        ((3, 8, 7), 3, 2, 1, 32),
    ] {
        let geometry = ConvGeometry::new(shape, kernel, stride, padding).unwrap();
        let batch = 3;
        let weights = uniform(out_channels * geometry.col_rows(), 31);
        let bias = uniform(out_channels, 32);
        let input = uniform(batch * geometry.input_len(), 33);
        let out_len = out_channels * geometry.col_cols();
        let forward = || {
            // Overwritten: whatever the output held is ignored.
            let mut output = vec![f32::NAN; batch * out_len];
            let ran = backend
                .conv_forward_direct(
                    &geometry,
                    out_channels,
                    batch,
                    &bias,
                    &weights,
                    &input,
                    &mut output,
                )
                .unwrap();
            ran.then_some(output)
        };
        let Some(output) = forward() else {
            // No AVX2/FMA here: nothing to check.
            return;
        };
        // Every vector path (AVX2's tiles, AVX-512's one- and two-vector tiles) runs
        // the same FMAs in the same order.
        for path in crate::KernelPath::available() {
            if let Some(other) = crate::with_kernel_path(path, forward) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&other),
                    bits(&output),
                    "{geometry:?} on {}",
                    path.name()
                );
            }
        }
        for example in 0..batch {
            let x = &input[example * geometry.input_len()..][..geometry.input_len()];
            let expected = naive_conv(&geometry, out_channels, &weights, &bias, x);
            let actual = &output[example * out_len..][..out_len];
            for (a, e) in actual.iter().zip(&expected) {
                assert!((f64::from(*a) - e).abs() < 1e-4, "{geometry:?}: {a} vs {e}");
            }
        }
    }
}

/// The sparse backward passes (taken when at most a third of the output gradient is
/// nonzero) against naive f64 sums, for both `beta == 0` (destination full of NaN,
/// which must be ignored) and `beta != 0`; a dense gradient is declined.
#[test]
fn sparse_conv_backward_matches_naive() {
    let backend = CpuBackend;
    for (shape, kernel, stride, padding, out_channels) in [
        ((4, 8, 8), 5, 1, 2, 5),
        ((8, 7, 9), 3, 2, 1, 3),
        ((32, 14, 14), 5, 1, 2, 8),
        // Kernel rows of 144 and 200 values: every block size of every vector path
        // (128, 64 and 32 values, and a shorter rest).
        ((48, 6, 6), 3, 1, 1, 4),
        ((40, 5, 5), 5, 1, 2, 3),
    ] {
        let g = ConvGeometry::new(shape, kernel, stride, padding).unwrap();
        let batch = 2;
        let weights = uniform(out_channels * g.col_rows(), 41);
        let input = uniform(batch * g.input_len(), 42);
        let out_len = out_channels * g.col_cols();
        // About a fifth nonzero, as after ReLU and 2x2 max pooling.
        let mut rng = seeded(43);
        let output_grad: Vec<f32> = (0..batch * out_len)
            .map(|_| {
                let keep = rng.random_range(0.0..1.0f32) < 0.2;
                if keep {
                    rng.random_range(-1.0..1.0f32)
                } else {
                    0.0
                }
            })
            .collect();
        // Naive sums over every (example, out, pixel, in, ky, kx) read.
        let mut input_grad_ref = vec![0.0f64; batch * g.input_len()];
        let mut weight_grad_ref = vec![0.0f64; out_channels * g.col_rows()];
        for e in 0..batch {
            for o in 0..out_channels {
                for oy in 0..g.out_height {
                    for ox in 0..g.out_width {
                        let dy = f64::from(
                            output_grad[e * out_len + o * g.col_cols() + oy * g.out_width + ox],
                        );
                        for c in 0..g.in_channels {
                            for ky in 0..g.kernel {
                                for kx in 0..g.kernel {
                                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= g.in_height as isize
                                        || ix >= g.in_width as isize
                                    {
                                        continue;
                                    }
                                    let x_index = e * g.input_len()
                                        + (c * g.in_height + iy as usize) * g.in_width
                                        + ix as usize;
                                    let w_index =
                                        ((o * g.in_channels + c) * g.kernel + ky) * g.kernel + kx;
                                    input_grad_ref[x_index] += dy * f64::from(weights[w_index]);
                                    weight_grad_ref[w_index] += dy * f64::from(input[x_index]);
                                }
                            }
                        }
                    }
                }
            }
        }
        for path in crate::KernelPath::available() {
            crate::with_kernel_path(path, || {
                let mut input_grad = vec![f32::NAN; batch * g.input_len()];
                let ran = backend
                    .conv_input_grad_sparse(
                        &g,
                        out_channels,
                        batch,
                        &weights,
                        &output_grad,
                        &mut input_grad,
                    )
                    .unwrap();
                assert!(ran, "{g:?}: sparse input gradient declined");
                for (a, e) in input_grad.iter().zip(&input_grad_ref) {
                    assert!(
                        (f64::from(*a) - e).abs() < 1e-4,
                        "{g:?} dx on {}: {a} vs {e}",
                        path.name()
                    );
                }
                for beta in [0.0f32, 0.75] {
                    let start = if beta == 0.0 {
                        vec![f32::NAN; weights.len()]
                    } else {
                        uniform(weights.len(), 44)
                    };
                    let mut weight_grad = start.clone();
                    let ran = backend
                        .conv_weight_grad_sparse(
                            &g,
                            out_channels,
                            batch,
                            &input,
                            &output_grad,
                            -0.5,
                            beta,
                            &mut weight_grad,
                        )
                        .unwrap();
                    assert!(ran, "{g:?}: sparse weight gradient declined");
                    for ((a, e), s) in weight_grad.iter().zip(&weight_grad_ref).zip(&start) {
                        let mut expected = -0.5 * e;
                        if beta != 0.0 {
                            expected += f64::from(beta) * f64::from(*s);
                        }
                        assert!(
                            (f64::from(*a) - expected).abs() < 1e-4,
                            "{g:?} dw (beta {beta}) on {}: {a} vs {expected}",
                            path.name()
                        );
                    }
                }
            });
        }
        // A dense gradient goes to im2col + GEMM, untouched here.
        let dense = uniform(batch * out_len, 45);
        let mut untouched = vec![1.0f32; batch * g.input_len()];
        let ran = backend
            .conv_input_grad_sparse(&g, out_channels, batch, &weights, &dense, &mut untouched)
            .unwrap();
        assert!(!ran && untouched.iter().all(|&v| v == 1.0));
    }
}

/// A conv -> ReLU -> pool stack whose convolution takes the direct forward and sparse
/// backward paths (8 input channels, 8 output channels), against finite differences.
/// Random data can sit near a ReLU/pool kink (the im2col + GEMM path shows the same), so
/// this uses a small step on data checked to be clear of them; the naive-sum tests above
/// are the precise ones.
#[test]
fn direct_and_sparse_conv_gradient() {
    let spec: ModelSpec = "cnn:8x6x6-c8k3p1-m2-3".parse().unwrap();
    let plan = spec.plan().unwrap();
    let mut net = Network::new(&plan);
    net.input_grad = true;
    let problem = Problem::new(net, uniform(2 * 288, 61), 2, 62);
    check_gradients(&problem, 3e-4, "direct/sparse conv stack");
}

/// The 2x2 backward routes each window's gradient to its first maximum (row-major),
/// ties included, and a NaN window's to its last cell; uncovered cells get zero.
#[test]
fn max_pool_2x2_backward_routes_ties_and_nan() {
    let backend = CpuBackend;
    // One 3x4 plane (the last row is not covered): windows [1,1;0,1], [2,0;3,3].
    let input = [1.0, 1.0, 2.0, 0.0, 0.0, 1.0, 3.0, 3.0, 9.0, 9.0, 9.0, 9.0];
    let geometry = PoolGeometry::new(1, (3, 4), 2, 2).unwrap();
    let mut grad = [f32::NAN; 12];
    backend
        .max_pool_backward(&geometry, &input, &[5.0, 7.0], &mut grad)
        .unwrap();
    assert_eq!(
        grad,
        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
    // A NaN anywhere in a window sends its gradient to the window's last cell.
    let input = [f32::NAN, 1.0, 0.0, 0.0];
    let geometry = PoolGeometry::new(1, (2, 2), 2, 2).unwrap();
    let mut grad = [f32::NAN; 4];
    backend
        .max_pool_backward(&geometry, &input, &[-2.0], &mut grad)
        .unwrap();
    assert_eq!(grad, [0.0, 0.0, 0.0, -2.0]);
}

/// The vectorized 2x2 backward (rows of 4+ windows, a ragged end as an overlapping last
/// block of 4) routes like the definition: each
/// window's gradient to its first maximum (row-major), a NaN window's to its last cell,
/// with many ties, NaNs and signed zeros, and ragged widths and heights.
#[test]
fn max_pool_2x2_backward_vectors_match_the_definition() {
    let backend = CpuBackend;
    let mut rng = crate::rng::seeded(77);
    let values = [-1.0, -0.0, 0.0, 1.0, 2.0, f32::NAN];
    for (height, width) in [(8, 8), (5, 11), (4, 28), (14, 14), (6, 17), (4, 6), (3, 26)] {
        let geometry = PoolGeometry::new(3, (height, width), 2, 2).unwrap();
        let input: Vec<f32> = (0..geometry.input_len())
            .map(|_| {
                // NaN about one cell in 24.
                let pick = rng.random_range(0..values.len() * 4);
                values[if pick < values.len() * 4 - 1 {
                    pick % (values.len() - 1)
                } else {
                    5
                }]
            })
            .collect();
        let grads: Vec<f32> = (0..geometry.output_len()).map(|i| i as f32 + 1.0).collect();
        let mut actual = vec![f32::NAN; geometry.input_len()];
        backend
            .max_pool_backward(&geometry, &input, &grads, &mut actual)
            .unwrap();
        let mut expected = vec![0.0f32; geometry.input_len()];
        let (out_h, out_w) = (geometry.out_height, geometry.out_width);
        for plane in 0..3 {
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let cells = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| {
                        plane * height * width + (2 * oy + dy) * width + 2 * ox + dx
                    });
                    let window = cells.map(|c| input[c]);
                    let target = if window.iter().any(|v| v.is_nan()) {
                        3
                    } else {
                        let max = window.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        window.iter().position(|&v| v == max).unwrap()
                    };
                    expected[cells[target]] = grads[(plane * out_h + oy) * out_w + ox];
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&actual), bits(&expected), "{height}x{width}");
    }
}

/// The vectorized 2x2 forward (rows of 4+ windows: blocks of 8, of 4, and an overlapping
/// last 4) picks like the definition: the first maximum in row-major order (so the sign
/// of a tied zero is the first one's), NaN if the window has one.
#[test]
fn max_pool_2x2_forward_vectors_match_the_definition() {
    let backend = CpuBackend;
    let mut rng = crate::rng::seeded(78);
    let values = [-1.0, -0.0, 0.0, 1.0, 2.0, f32::NAN];
    for (height, width) in [
        (4, 16),
        (5, 19),
        (28, 28),
        (6, 34),
        (14, 14),
        (4, 8),
        (6, 10),
        (3, 26),
        (2, 6),
    ] {
        let geometry = PoolGeometry::new(2, (height, width), 2, 2).unwrap();
        let input: Vec<f32> = (0..geometry.input_len())
            .map(|_| {
                let pick = rng.random_range(0..values.len() * 4);
                values[if pick < values.len() * 4 - 1 {
                    pick % (values.len() - 1)
                } else {
                    5
                }]
            })
            .collect();
        let mut actual = vec![f32::NAN; geometry.output_len()];
        backend.max_pool(&geometry, &input, &mut actual).unwrap();
        let mut expected = Vec::new();
        for plane in input.chunks(height * width) {
            for oy in 0..geometry.out_height {
                for ox in 0..geometry.out_width {
                    let mut best = f32::NEG_INFINITY;
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let value = plane[(2 * oy + dy) * width + 2 * ox + dx];
                        if value > best || value.is_nan() {
                            best = value;
                        }
                    }
                    expected.push(best);
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&actual), bits(&expected), "{height}x{width}");
    }
}

/// ReLU then max pool, as written, against the pool then ReLU that `forward` and
/// `backward` run (`Network::relu_moves_past_pool`): the same bits forward and backward
/// on finite values, for 2 x 2 and overlapping 3 x 3 windows, with ties, zeros and
/// all-negative windows.
#[test]
fn relu_after_the_pool_gives_the_written_order_bit_for_bit_on_finite_values() {
    let backend = CpuBackend;
    let mut rng = seeded(17);
    for (size, stride, height, width) in [(2, 2, 28, 28), (2, 2, 7, 9), (3, 2, 11, 10)] {
        let geometry = PoolGeometry::new(6, (height, width), size, stride).unwrap();
        // Values on a coarse grid (many ties), half of them negative or zero.
        let x: Vec<f32> = (0..geometry.input_len())
            .map(|_| rng.random_range(-4i32..4) as f32 * 0.5)
            .collect();
        let dy: Vec<f32> = (0..geometry.output_len())
            .map(|_| rng.random_range(-1.0..1.0f32))
            .collect();

        // As written: y = pool(relu(x)); dx = relu'(pool'(dy)).
        let mut relu_x = x.clone();
        backend.relu(&mut relu_x).unwrap();
        let mut written_y = vec![f32::NAN; geometry.output_len()];
        backend
            .max_pool(&geometry, &relu_x, &mut written_y)
            .unwrap();
        let mut written_dx = vec![f32::NAN; geometry.input_len()];
        backend
            .max_pool_backward(&geometry, &relu_x, &dy, &mut written_dx)
            .unwrap();
        backend.relu_backward(&relu_x, &mut written_dx).unwrap();

        // As run: y = relu(pool(x)); dx = pool'(relu'(dy)).
        let mut y = vec![f32::NAN; geometry.output_len()];
        backend.max_pool(&geometry, &x, &mut y).unwrap();
        backend.relu(&mut y).unwrap();
        let mut masked = dy.clone();
        backend.relu_backward(&y, &mut masked).unwrap();
        let mut dx = vec![f32::NAN; geometry.input_len()];
        backend
            .max_pool_backward(&geometry, &x, &masked, &mut dx)
            .unwrap();

        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&y),
            bits(&written_y),
            "forward, {size}x{size} / {stride}"
        );
        assert_eq!(
            bits(&dx),
            bits(&written_dx),
            "backward, {size}x{size} / {stride}"
        );
    }
}

/// The networks that qualify: an in-place ReLU directly before a max pool.
#[test]
fn only_a_relu_right_before_a_max_pool_moves() {
    let spec: ModelSpec = "cnn:mnist".parse().unwrap();
    let network = Network::new(&spec.plan().unwrap());
    let moved: Vec<usize> = (0..network.layers.len())
        .filter(|&i| network.relu_moves_past_pool(i))
        .collect();
    // conv, relu, pool, conv, relu, pool, flatten, dense, relu, dense
    assert_eq!(moved, vec![1, 4]);
    assert!(network.pool_applies_relu(2) && network.pool_applies_relu(5));
    assert!(!network.pool_applies_relu(0) && !network.pool_applies_relu(9));
}
