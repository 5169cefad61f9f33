//! Parity of the wgpu backend with the CPU backend, operation by operation and for whole
//! training runs, on random inputs with sizes that do not divide the kernels' tiles.
//!
//! Tolerance: an output passes when `|gpu - cpu| <= 1e-4 * max|cpu|` over the tensor
//! (relative to the tensor's scale, since single elements can cancel to near zero).
//!
//! These tests need a Vulkan adapter (a GPU, or Mesa's software lavapipe). Without one they
//! print one line and pass, except under `CI=true`, where a missing adapter fails them.

use std::sync::{Arc, OnceLock};

use rand::RngExt;

use super::{WgpuBackend, WgpuDevice};
use crate::backend::{AdamStep, Backend, ConvGeometry, CpuBackend, Gemm, PoolGeometry, SgdStep};
use crate::data::Dataset;
use crate::model::{FitConfig, Model};
use crate::optim::Optimizer;
use crate::rng::seeded;

/// One device for the whole test binary (pipeline compilation is the slow part); each
/// test records on its own backend, so parallel tests also exercise a shared queue.
fn gpu() -> Option<WgpuBackend> {
    static DEVICE: OnceLock<Result<Arc<WgpuDevice>, String>> = OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        let opened = WgpuDevice::open(true).map_err(|error| error.to_string());
        match &opened {
            Ok(device) => eprintln!("wgpu tests run on {}", device.adapter()),
            Err(error) => {
                eprintln!("skipping wgpu tests: {error} (set CI=true to make this a failure)")
            }
        }
        opened
    });
    match device {
        Ok(device) => Some(WgpuBackend::new(Arc::clone(device))),
        Err(error) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but no wgpu adapter: {error}"
            );
            None
        }
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = seeded(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

#[track_caller]
fn assert_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (index, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= 1e-4 * scale,
            "{what}: element {index}: gpu {g} vs cpu {c} (scale {scale})"
        );
    }
}

/// A GPU buffer holding `pad` junk values, then `values`, then `pad` junk values: every
/// operation is tested on a range that does not start at offset 0.
const PAD: usize = 3;

fn upload(gpu: &WgpuBackend, values: &[f32]) -> super::GpuBuffer {
    let len = values.len() + 2 * PAD;
    let mut buffer = gpu.zeros(len);
    let mut host = vec![f32::NAN; len];
    host[PAD..PAD + values.len()].copy_from_slice(values);
    gpu.upload(&host, gpu.dst(&mut buffer, 0..len).unwrap())
        .unwrap();
    buffer
}

fn range(values: usize) -> std::ops::Range<usize> {
    PAD..PAD + values
}

fn download(gpu: &WgpuBackend, buffer: &super::GpuBuffer, len: usize) -> Vec<f32> {
    let mut host = vec![0.0; len];
    gpu.download(gpu.src(buffer, range(len)).unwrap(), &mut host)
        .unwrap();
    host
}

#[test]
fn upload_download_round_trip_and_gather() {
    let Some(gpu) = gpu() else { return };
    let values = random(1000, 1);
    let buffer = upload(&gpu, &values);
    assert_eq!(download(&gpu, &buffer, 1000), values);
    let mut rows = gpu.zeros(3 * 7);
    gpu.gather_rows(&values, 7, &[4, 0, 9], gpu.dst(&mut rows, 0..21).unwrap())
        .unwrap();
    let mut host = vec![0.0; 21];
    gpu.download(gpu.src(&rows, 0..21).unwrap(), &mut host)
        .unwrap();
    assert_eq!(&host[..7], &values[28..35]);
    assert_eq!(&host[7..14], &values[..7]);
    assert_eq!(&host[14..], &values[63..70]);
    // A row past the end is an error, not a panic.
    assert!(
        gpu.gather_rows(&values, 7, &[200], gpu.dst(&mut rows, 0..7).unwrap())
            .is_err()
    );
}

#[test]
fn gemm_matches_cpu_for_every_transpose_and_awkward_sizes() {
    let Some(gpu) = gpu() else { return };
    // Odd sizes around the 32/64 tiles and the 16-deep K step; the last shapes take the
    // big-tile and split-K paths.
    let shapes = [
        (1, 1, 1),
        (7, 13, 5),
        (33, 65, 17),
        (10, 200, 784),
        (100, 70, 1500),
        (1030, 530, 20),
    ];
    for (index, &(m, n, k)) in shapes.iter().enumerate() {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let gemm = Gemm {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha: 0.75,
                    beta: if trans_a { 0.0 } else { -0.5 },
                };
                let seed = index as u64 * 10;
                let (a, b, c) = (
                    random(m * k, seed),
                    random(k * n, seed + 1),
                    random(m * n, seed + 2),
                );
                let mut expected = c.clone();
                CpuBackend.gemm(gemm, &a, &b, &mut expected).unwrap();
                let (ga, gb, mut gc) = (upload(&gpu, &a), upload(&gpu, &b), upload(&gpu, &c));
                gpu.gemm(
                    gemm,
                    gpu.src(&ga, range(m * k)).unwrap(),
                    gpu.src(&gb, range(k * n)).unwrap(),
                    gpu.dst(&mut gc, range(m * n)).unwrap(),
                )
                .unwrap();
                assert_close(
                    &download(&gpu, &gc, m * n),
                    &expected,
                    &format!("gemm {gemm:?}"),
                );
            }
        }
    }
}

#[test]
fn bias_broadcasts_and_reductions_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (37, 13);
    let bias = random(cols, 3);
    let gbias = upload(&gpu, &bias);
    let mut expected = vec![0.0; rows * cols];
    CpuBackend.fill_rows(&bias, rows, &mut expected).unwrap();
    let mut out = upload(&gpu, &vec![0.0; rows * cols]);
    gpu.fill_rows(
        gpu.src(&gbias, range(cols)).unwrap(),
        rows,
        gpu.dst(&mut out, range(rows * cols)).unwrap(),
    )
    .unwrap();
    assert_close(&download(&gpu, &out, rows * cols), &expected, "fill_rows");

    let (batch, plane) = (3, 11);
    let len = batch * cols * plane;
    let mut expected = vec![0.0; len];
    CpuBackend
        .fill_channels(&bias, batch, plane, &mut expected)
        .unwrap();
    let mut out = upload(&gpu, &vec![0.0; len]);
    gpu.fill_channels(
        gpu.src(&gbias, range(cols)).unwrap(),
        batch,
        plane,
        gpu.dst(&mut out, range(len)).unwrap(),
    )
    .unwrap();
    assert_close(&download(&gpu, &out, len), &expected, "fill_channels");

    // Narrow and wide: one workgroup of the reduction, and several.
    for (rows, cols, alpha, beta) in [(37, 13, 1.0, 0.0), (37, 13, -0.3, 0.9), (5, 40, 0.5, 0.5)] {
        let src = random(rows * cols, 4);
        let gsrc = upload(&gpu, &src);
        let mut expected = random(cols, 5);
        let mut out = upload(&gpu, &expected);
        CpuBackend
            .sum_rows(&src, rows, alpha, beta, &mut expected)
            .unwrap();
        gpu.sum_rows(
            gpu.src(&gsrc, range(rows * cols)).unwrap(),
            rows,
            alpha,
            beta,
            gpu.dst(&mut out, range(cols)).unwrap(),
        )
        .unwrap();
        assert_close(&download(&gpu, &out, cols), &expected, "sum_rows");
    }

    // One part per channel, and several (more than 4096 values per channel).
    let channels = 5;
    for (batch, plane, alpha, beta) in [(3, 301, 1.0, 0.0), (3, 301, 0.5, 2.0), (7, 1500, 0.5, 2.0)]
    {
        let src = random(batch * channels * plane, 6);
        let gsrc = upload(&gpu, &src);
        let mut expected = random(channels, 7);
        let mut out = upload(&gpu, &expected);
        CpuBackend
            .sum_channels(&src, batch, plane, alpha, beta, &mut expected)
            .unwrap();
        gpu.sum_channels(
            gpu.src(&gsrc, range(src.len())).unwrap(),
            batch,
            plane,
            alpha,
            beta,
            gpu.dst(&mut out, range(channels)).unwrap(),
        )
        .unwrap();
        assert_close(&download(&gpu, &out, channels), &expected, "sum_channels");
    }
}

#[test]
fn elementwise_ops_and_dropout_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let len = 1001;
    let x = random(len, 8);
    let other = random(len, 9);

    let mut expected = x.clone();
    CpuBackend.relu(&mut expected).unwrap();
    let mut gx = upload(&gpu, &x);
    gpu.relu(gpu.dst(&mut gx, range(len)).unwrap()).unwrap();
    assert_eq!(download(&gpu, &gx, len), expected, "relu");

    let mut expected = other.clone();
    CpuBackend.relu_backward(&x, &mut expected).unwrap();
    let (gy, mut gdy) = (upload(&gpu, &x), upload(&gpu, &other));
    gpu.relu_backward(
        gpu.src(&gy, range(len)).unwrap(),
        gpu.dst(&mut gdy, range(len)).unwrap(),
    )
    .unwrap();
    assert_eq!(download(&gpu, &gdy, len), expected, "relu_backward");

    let mut expected = x.clone();
    CpuBackend.mul(&mut expected, &other).unwrap();
    let (mut gx, gother) = (upload(&gpu, &x), upload(&gpu, &other));
    gpu.mul(
        gpu.dst(&mut gx, range(len)).unwrap(),
        gpu.src(&gother, range(len)).unwrap(),
    )
    .unwrap();
    assert_eq!(download(&gpu, &gx, len), expected, "mul");

    let mut out = upload(&gpu, &vec![0.0; len]);
    gpu.copy(
        gpu.src(&gother, range(len)).unwrap(),
        gpu.dst(&mut out, range(len)).unwrap(),
    )
    .unwrap();
    assert_eq!(download(&gpu, &out, len), other, "copy");

    for (seed, rate) in [(1u64, 0.5f32), (0xdead_beef_0123_4567, 0.1)] {
        let mut expected = vec![0.0; len];
        CpuBackend.dropout_mask(seed, rate, &mut expected).unwrap();
        let kept = expected.iter().filter(|&&v| v != 0.0).count() as f32 / len as f32;
        assert!(
            (kept - (1.0 - rate)).abs() < 0.06,
            "kept {kept} at rate {rate}"
        );
        let mut mask = upload(&gpu, &vec![0.0; len]);
        gpu.dropout_mask(seed, rate, gpu.dst(&mut mask, range(len)).unwrap())
            .unwrap();
        assert_eq!(
            download(&gpu, &mask, len),
            expected,
            "dropout mask, seed {seed}"
        );
    }
}

/// Geometries with padding, stride 2, several channels and a non-square input.
fn geometries() -> Vec<(ConvGeometry, usize)> {
    vec![
        (ConvGeometry::new((3, 9, 7), 3, 1, 1).unwrap(), 5),
        (ConvGeometry::new((2, 8, 11), 5, 2, 2).unwrap(), 3),
        (ConvGeometry::new((4, 6, 6), 1, 1, 0).unwrap(), 7),
        (ConvGeometry::new((1, 12, 12), 5, 1, 2).unwrap(), 32),
        // 144 im2col rows: the forward product splits K and reduces into the
        // convolution output layout.
        (ConvGeometry::new((16, 5, 5), 3, 1, 1).unwrap(), 4),
    ]
}

#[test]
fn im2col_and_col2im_match_cpu() {
    let Some(gpu) = gpu() else { return };
    for (index, (geometry, _)) in geometries().into_iter().enumerate() {
        let input = random(geometry.input_len(), 10 + index as u64);
        let cols_len = geometry.col_rows() * geometry.col_cols();
        let mut expected = vec![0.0; cols_len];
        CpuBackend.im2col(&geometry, &input, &mut expected).unwrap();
        let ginput = upload(&gpu, &input);
        let mut cols = upload(&gpu, &vec![0.0; cols_len]);
        gpu.im2col(
            &geometry,
            gpu.src(&ginput, range(input.len())).unwrap(),
            gpu.dst(&mut cols, range(cols_len)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            download(&gpu, &cols, cols_len),
            expected,
            "im2col {geometry:?}"
        );

        let cols_values = random(cols_len, 20 + index as u64);
        let mut expected = vec![0.0; geometry.input_len()];
        CpuBackend
            .col2im(&geometry, &cols_values, &mut expected)
            .unwrap();
        let gcols = upload(&gpu, &cols_values);
        let mut grad = upload(&gpu, &vec![0.0; geometry.input_len()]);
        gpu.col2im(
            &geometry,
            gpu.src(&gcols, range(cols_len)).unwrap(),
            gpu.dst(&mut grad, range(geometry.input_len())).unwrap(),
        )
        .unwrap();
        assert_close(
            &download(&gpu, &grad, geometry.input_len()),
            &expected,
            "col2im",
        );
    }
}

/// The convolution pass of one batch by the CPU's im2col + GEMM route, per example.
fn cpu_conv(
    geometry: &ConvGeometry,
    out_channels: usize,
    weight: &[f32],
    input: &[f32],
    output_grad: &[f32],
    batch: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (rows, plane) = (geometry.col_rows(), geometry.col_cols());
    let mut cols = vec![0.0; rows * plane];
    let mut output = vec![0.0; batch * out_channels * plane];
    let mut input_grad = vec![0.0; batch * geometry.input_len()];
    let mut weight_grad = vec![0.0; out_channels * rows];
    let cpu = CpuBackend;
    for e in 0..batch {
        let x = &input[e * geometry.input_len()..(e + 1) * geometry.input_len()];
        cpu.im2col(geometry, x, &mut cols).unwrap();
        let forward = Gemm {
            m: out_channels,
            n: plane,
            k: rows,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        };
        cpu.gemm(
            forward,
            weight,
            &cols,
            &mut output[e * out_channels * plane..(e + 1) * out_channels * plane],
        )
        .unwrap();
        let dy = &output_grad[e * out_channels * plane..(e + 1) * out_channels * plane];
        let weight_step = Gemm {
            m: out_channels,
            n: rows,
            k: plane,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            beta: 1.0,
        };
        cpu.gemm(weight_step, dy, &cols, &mut weight_grad).unwrap();
        let mut dcols = vec![0.0; rows * plane];
        let input_step = Gemm {
            m: rows,
            n: plane,
            k: out_channels,
            trans_a: true,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        };
        cpu.gemm(input_step, weight, dy, &mut dcols).unwrap();
        cpu.col2im(
            geometry,
            &dcols,
            &mut input_grad[e * geometry.input_len()..(e + 1) * geometry.input_len()],
        )
        .unwrap();
    }
    (output, input_grad, weight_grad)
}

#[test]
fn convolution_forward_and_gradients_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let batch = 3;
    let cases = geometries()
        .into_iter()
        .enumerate()
        .flat_map(|case| [(case, false), (case, true)]);
    for ((index, (geometry, out_channels)), one_example_per_pass) in cases {
        // The second time with room for one example's im2col matrix per pass.
        let gpu = if one_example_per_pass {
            WgpuBackend::new(Arc::clone(gpu.device()))
                .with_column_limit(geometry.col_rows() * geometry.col_cols())
        } else {
            WgpuBackend::new(Arc::clone(gpu.device()))
        };
        let seed = 30 + 3 * index as u64;
        let weight = random(out_channels * geometry.col_rows(), seed);
        let input = random(batch * geometry.input_len(), seed + 1);
        let out_len = batch * out_channels * geometry.col_cols();
        let output_grad = random(out_len, seed + 2);
        let (output, input_grad, weight_grad) = cpu_conv(
            &geometry,
            out_channels,
            &weight,
            &input,
            &output_grad,
            batch,
        );

        // The forward overwrites its output with the bias plus the convolution.
        let bias = random(out_channels, seed + 3);
        let plane = geometry.col_cols();
        let output: Vec<f32> = output
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i / plane % out_channels])
            .collect();

        let (gw, gx, gdy, gb) = (
            upload(&gpu, &weight),
            upload(&gpu, &input),
            upload(&gpu, &output_grad),
            upload(&gpu, &bias),
        );
        let w = gpu.src(&gw, range(weight.len())).unwrap();
        let x = gpu.src(&gx, range(input.len())).unwrap();
        let dy = gpu.src(&gdy, range(out_len)).unwrap();
        let b = gpu.src(&gb, range(out_channels)).unwrap();
        let mut out = upload(&gpu, &vec![f32::NAN; out_len]);
        assert!(
            gpu.conv_forward_direct(
                &geometry,
                out_channels,
                batch,
                b,
                w,
                x,
                gpu.dst(&mut out, range(out_len)).unwrap()
            )
            .unwrap()
        );
        assert_close(
            &download(&gpu, &out, out_len),
            &output,
            &format!("conv forward {geometry:?}"),
        );

        let mut dx = upload(&gpu, &vec![f32::NAN; input.len()]);
        assert!(
            gpu.conv_input_grad_sparse(
                &geometry,
                out_channels,
                batch,
                w,
                dy,
                gpu.dst(&mut dx, range(input.len())).unwrap()
            )
            .unwrap()
        );
        assert_close(
            &download(&gpu, &dx, input.len()),
            &input_grad,
            &format!("conv input grad {geometry:?}"),
        );

        // alpha/beta as an SGD update folded into the gradient GEMM uses them.
        let start = random(weight.len(), seed + 3);
        let expected: Vec<f32> = start
            .iter()
            .zip(&weight_grad)
            .map(|(s, g)| 0.9 * s - 0.1 * g)
            .collect();
        let mut dw = upload(&gpu, &start);
        assert!(
            gpu.conv_weight_grad_sparse(
                &geometry,
                out_channels,
                batch,
                x,
                dy,
                -0.1,
                0.9,
                gpu.dst(&mut dw, range(weight.len())).unwrap()
            )
            .unwrap()
        );
        assert_close(
            &download(&gpu, &dw, weight.len()),
            &expected,
            &format!("conv weight grad {geometry:?}"),
        );
    }
}

#[test]
fn max_pool_matches_cpu_with_ties_and_overlap() {
    let Some(gpu) = gpu() else { return };
    for (index, (size, stride)) in [(2, 2), (3, 2), (2, 1)].into_iter().enumerate() {
        let geometry = PoolGeometry::new(4, (7, 9), size, stride).unwrap();
        let mut input = random(geometry.input_len(), 40 + index as u64);
        // Ties: the first maximum must win on both backends.
        for value in input.iter_mut().step_by(5) {
            *value = 0.5;
        }
        let mut expected = vec![0.0; geometry.output_len()];
        CpuBackend
            .max_pool(&geometry, &input, &mut expected)
            .unwrap();
        let gx = upload(&gpu, &input);
        let mut out = upload(&gpu, &vec![0.0; geometry.output_len()]);
        gpu.max_pool(
            &geometry,
            gpu.src(&gx, range(input.len())).unwrap(),
            gpu.dst(&mut out, range(geometry.output_len())).unwrap(),
        )
        .unwrap();
        assert_eq!(
            download(&gpu, &out, geometry.output_len()),
            expected,
            "max_pool {size}/{stride}"
        );

        let dy = random(geometry.output_len(), 50 + index as u64);
        let mut expected = vec![0.0; input.len()];
        CpuBackend
            .max_pool_backward(&geometry, &input, &dy, &mut expected)
            .unwrap();
        let gdy = upload(&gpu, &dy);
        let mut dx = upload(&gpu, &vec![f32::NAN; input.len()]);
        gpu.max_pool_backward(
            &geometry,
            gpu.src(&gx, range(input.len())).unwrap(),
            gpu.src(&gdy, range(dy.len())).unwrap(),
            gpu.dst(&mut dx, range(input.len())).unwrap(),
        )
        .unwrap();
        assert_close(
            &download(&gpu, &dx, input.len()),
            &expected,
            "max_pool_backward",
        );
    }
}

#[test]
fn softmax_cross_entropy_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (300, 13);
    let logits: Vec<f32> = random(rows * classes, 60)
        .iter()
        .map(|v| v * 20.0)
        .collect();
    let mut rng = seeded(61);
    let labels: Vec<f32> = (0..rows)
        .map(|_| rng.random_range(0..classes) as f32)
        .collect();
    let mut expected_grad = vec![0.0; logits.len()];
    let mut expected_stats = [0.0; 2];
    CpuBackend
        .softmax_cross_entropy(
            &logits,
            &labels,
            classes,
            Some((0.25, &mut expected_grad)),
            &mut expected_stats,
        )
        .unwrap();
    let (gl, glabels) = (upload(&gpu, &logits), upload(&gpu, &labels));
    let mut grad = upload(&gpu, &vec![0.0; logits.len()]);
    let mut stats = upload(&gpu, &[0.0; 2]);
    gpu.softmax_cross_entropy(
        gpu.src(&gl, range(logits.len())).unwrap(),
        gpu.src(&glabels, range(rows)).unwrap(),
        classes,
        Some((0.25, gpu.dst(&mut grad, range(logits.len())).unwrap())),
        gpu.dst(&mut stats, range(2)).unwrap(),
    )
    .unwrap();
    assert_close(
        &download(&gpu, &grad, logits.len()),
        &expected_grad,
        "softmax gradient",
    );
    let stats = download(&gpu, &stats, 2);
    assert_close(&stats[..1], &expected_stats[..1], "loss sum");
    assert_eq!(stats[1], expected_stats[1], "correct count");
}

#[test]
fn optimizer_steps_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let len = 777;
    let (params, grads, anchor, state) = (
        random(len, 70),
        random(len, 71),
        random(len, 72),
        random(len, 73),
    );
    let (gg, ga) = (upload(&gpu, &grads), upload(&gpu, &anchor));
    for (momentum, nesterov, weight_decay, proximal_mu) in [
        (0.0, false, 0.0, 0.0),
        (0.0, false, 0.01, 0.1),
        (0.9, false, 0.0, 0.0),
        (0.9, true, 0.001, 0.01),
    ] {
        let step = SgdStep {
            learning_rate: 0.05,
            momentum,
            nesterov,
            weight_decay,
            proximal_mu,
        };
        let (mut expected, mut expected_velocity) = (params.clone(), state.clone());
        let with_anchor = (proximal_mu != 0.0).then_some(&anchor[..]);
        let velocity = (momentum != 0.0).then_some(&mut expected_velocity[..]);
        CpuBackend
            .sgd_step(&step, &mut expected, &grads, velocity, with_anchor)
            .unwrap();
        let (mut gp, mut gv) = (upload(&gpu, &params), upload(&gpu, &state));
        let velocity = (momentum != 0.0).then(|| gpu.dst(&mut gv, range(len)).unwrap());
        let with_anchor = (proximal_mu != 0.0).then(|| gpu.src(&ga, range(len)).unwrap());
        gpu.sgd_step(
            &step,
            gpu.dst(&mut gp, range(len)).unwrap(),
            gpu.src(&gg, range(len)).unwrap(),
            velocity,
            with_anchor,
        )
        .unwrap();
        assert_close(
            &download(&gpu, &gp, len),
            &expected,
            &format!("sgd {step:?}"),
        );
        assert_close(
            &download(&gpu, &gv, len),
            &expected_velocity,
            "sgd velocity",
        );
    }
    for proximal_mu in [0.0, 0.1] {
        let step = AdamStep {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
            proximal_mu,
            bias_correction1: 0.19,
            bias_correction2_sqrt: 0.0447,
        };
        let second: Vec<f32> = state.iter().map(|v| v * v).collect();
        let (mut expected, mut m, mut v) = (params.clone(), state.clone(), second.clone());
        let with_anchor = (proximal_mu != 0.0).then_some(&anchor[..]);
        CpuBackend
            .adam_step(&step, &mut expected, &grads, &mut m, &mut v, with_anchor)
            .unwrap();
        let (mut gp, mut gm, mut gv) = (
            upload(&gpu, &params),
            upload(&gpu, &state),
            upload(&gpu, &second),
        );
        let with_anchor = (proximal_mu != 0.0).then(|| gpu.src(&ga, range(len)).unwrap());
        gpu.adam_step(
            &step,
            gpu.dst(&mut gp, range(len)).unwrap(),
            gpu.src(&gg, range(len)).unwrap(),
            gpu.dst(&mut gm, range(len)).unwrap(),
            gpu.dst(&mut gv, range(len)).unwrap(),
            with_anchor,
        )
        .unwrap();
        assert_close(&download(&gpu, &gp, len), &expected, "adam params");
        assert_close(&download(&gpu, &gm, len), &m, "adam first moment");
        assert_close(&download(&gpu, &gv, len), &v, "adam second moment");
    }
}

fn random_dataset(count: usize, dim: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = seeded(seed);
    let features = (0..count * dim)
        .map(|_| rng.random_range(0.0..1.0f32))
        .collect();
    let labels = (0..count)
        .map(|_| rng.random_range(0..classes) as u8)
        .collect();
    Dataset::new(features, labels, dim, classes).unwrap()
}

/// Trains `spec` from the same seed on both backends; compares the reported losses
/// (within 1e-3 relative) and the final parameters (within `param_tolerance` of the
/// largest parameter).
fn train_on_both(spec: &str, cfg: &FitConfig, examples: usize, param_tolerance: f32) {
    let Some(gpu) = gpu() else { return };
    let spec: crate::ModelSpec = spec.parse().unwrap();
    let data = random_dataset(examples, spec.input_dim(), spec.num_classes(), 80);
    let indices: Vec<usize> = (0..examples).collect();
    let mut on_cpu = Model::new(spec.clone(), 81);
    let mut on_gpu = on_cpu.clone();
    let cpu_stats = on_cpu.fit(&data, &indices, cfg).unwrap();
    let gpu_stats = on_gpu.fit_on(&gpu, &data, &indices, cfg).unwrap();
    let relative = (cpu_stats.loss - gpu_stats.loss).abs() / cpu_stats.loss.abs().max(1e-6);
    assert!(
        relative < 1e-3,
        "{spec}: loss cpu {} vs gpu {}",
        cpu_stats.loss,
        gpu_stats.loss
    );
    assert!((cpu_stats.accuracy - gpu_stats.accuracy).abs() <= 1.0 / examples as f32 + 1e-6);
    let (cpu, gpu_params) = (on_cpu.parameters(), on_gpu.parameters());
    let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = cpu
        .iter()
        .zip(gpu_params)
        .map(|(c, g)| (c - g).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= param_tolerance * scale,
        "{spec}: parameters differ by {worst} (scale {scale})"
    );
    // Evaluation on the GPU agrees too.
    let cpu_eval = on_cpu.evaluate(&data, &indices).unwrap();
    let gpu_eval = on_cpu.evaluate_on(&gpu, &data, &indices).unwrap();
    assert!((cpu_eval.loss - gpu_eval.loss).abs() <= 1e-3 * cpu_eval.loss.abs().max(1e-6));
}

#[test]
fn two_layer_mlp_trains_the_same_on_both_backends() {
    // 2NN, plain SGD (the fused update) for two epochs with a ragged last batch.
    let cfg = FitConfig::new(2, 10, 0.05, 7);
    train_on_both("mlp:784-200-200-10", &cfg, 45, 1e-4);
}

#[test]
fn mlp_with_dropout_and_every_optimizer_trains_the_same() {
    let spec = "cnn:1x6x6-d31-drop50-d17-drop20-5";
    let optimizers = [
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
        },
        Optimizer::adam(),
    ];
    for optimizer in optimizers {
        let cfg = FitConfig {
            epochs: 2,
            batch_size: 7,
            learning_rate: 0.01,
            seed: 3,
            optimizer,
            proximal_mu: 0.1,
        };
        train_on_both(spec, &cfg, 30, 1e-4);
    }
}

#[test]
fn mnist_cnn_trains_the_same_on_both_backends() {
    // cnn:mnist for 3 steps of 8 (lavapipe runs it in about a second).
    let cfg = FitConfig::new(1, 8, 0.05, 11);
    train_on_both("cnn:mnist", &cfg, 24, 1e-3);
}
