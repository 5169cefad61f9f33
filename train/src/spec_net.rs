//! `net:` specs: an explicit layer list, one token per layer and no implied activations,
//! so that any supported ONNX graph (see [`crate::onnx`]) has a spec string that travels
//! to clients in place of the file.
//!
//! Grammar: `net:INPUT-LAYER-...-LAYER[-OUTPUT]`, where `INPUT` is `F` (flat features) or
//! `CxHxW` (images), and each layer token is one of
//!
//! | token | layer |
//! |---|---|
//! | `conv{N}k{K}[s{S}][p{P}]` | 2-D convolution, `N` channels, `KxK` kernel, bias |
//! | `max{K}[s{S}]` / `avg{K}[s{S}]` | max / average pooling (stride = K by default) |
//! | `gap` | global average pooling (`CxHxW` to `Cx1x1`) |
//! | `fc{N}` | dense layer with bias (flattens an image input first) |
//! | `relu`, `sigmoid`, `tanh` | activations |
//! | `flat` | flatten |
//! | `drop{RATE}` | inverted dropout with probability `RATE` in `[0, 1)`, e.g. `drop0.5` |
//! | `bn{EPS}` | batch normalisation over channels with epsilon `EPS`, e.g. `bn0.00001` |
//!
//! and `OUTPUT` is an optional last `softmax` or `logsoftmax`: training always applies
//! softmax cross-entropy to the last layer's outputs (the logits), and the marker only
//! says what an exported graph puts at its output.
//!
//! The class count is the width of the last layer's output. Batch normalisation uses its
//! running statistics (carried in the parameter vector) both in training and in
//! evaluation: see the crate README's ONNX section.

use std::fmt;

use super::{CnnWalk, MAX_ACTIVATION, Stage};
use crate::backend::{ConvGeometry, PoolGeometry};

/// Most layers a `net:` spec may list (specs arrive from the network).
pub const MAX_NET_LAYERS: usize = 256;

/// An `f32` stored by its bits so that specs stay `Eq`; written with Rust's shortest
/// round-trip formatting, so parsing the text gives the same bits back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpecFloat(u32);

impl SpecFloat {
    pub fn new(value: f32) -> SpecFloat {
        SpecFloat(value.to_bits())
    }

    pub fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl fmt::Display for SpecFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// One layer of a [`super::ModelSpec::Net`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetLayer {
    Conv {
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    MaxPool {
        size: usize,
        stride: usize,
    },
    AvgPool {
        size: usize,
        stride: usize,
    },
    GlobalAvgPool,
    Dense {
        units: usize,
    },
    Relu,
    Sigmoid,
    Tanh,
    Flatten,
    Dropout {
        rate: SpecFloat,
    },
    BatchNorm {
        epsilon: SpecFloat,
    },
}

/// What an exported graph puts after the logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetOutput {
    #[default]
    Logits,
    Softmax,
    LogSoftmax,
}

impl fmt::Display for NetLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetLayer::Conv {
                channels,
                kernel,
                stride,
                padding,
            } => {
                write!(f, "conv{channels}k{kernel}")?;
                if stride != 1 {
                    write!(f, "s{stride}")?;
                }
                if padding != 0 {
                    write!(f, "p{padding}")?;
                }
                Ok(())
            }
            NetLayer::MaxPool { size, stride } | NetLayer::AvgPool { size, stride } => {
                let kind = if matches!(self, NetLayer::MaxPool { .. }) {
                    "max"
                } else {
                    "avg"
                };
                write!(f, "{kind}{size}")?;
                if stride != size {
                    write!(f, "s{stride}")?;
                }
                Ok(())
            }
            NetLayer::GlobalAvgPool => f.write_str("gap"),
            NetLayer::Dense { units } => write!(f, "fc{units}"),
            NetLayer::Relu => f.write_str("relu"),
            NetLayer::Sigmoid => f.write_str("sigmoid"),
            NetLayer::Tanh => f.write_str("tanh"),
            NetLayer::Flatten => f.write_str("flat"),
            NetLayer::Dropout { rate } => write!(f, "drop{rate}"),
            NetLayer::BatchNorm { epsilon } => write!(f, "bn{epsilon}"),
        }
    }
}

impl fmt::Display for NetOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetOutput::Logits => "",
            NetOutput::Softmax => "softmax",
            NetOutput::LogSoftmax => "logsoftmax",
        })
    }
}

/// Writes `net:...` for these parts.
pub(super) fn write_net(
    f: &mut fmt::Formatter<'_>,
    input: &[usize],
    layers: &[NetLayer],
    output: NetOutput,
) -> fmt::Result {
    f.write_str("net:")?;
    for (position, size) in input.iter().enumerate() {
        if position > 0 {
            f.write_str("x")?;
        }
        write!(f, "{size}")?;
    }
    for layer in layers {
        write!(f, "-{layer}")?;
    }
    if output != NetOutput::Logits {
        write!(f, "-{output}")?;
    }
    Ok(())
}

/// `"conv32k5p2"` with prefix `"conv"` into `[("conv", 32), ("k", 5), ("p", 2)]`.
fn int_fields<'a>(token: &'a str, prefix: &'a str) -> Option<Vec<(&'a str, usize)>> {
    let rest = token.strip_prefix(prefix)?;
    let fields = super::token_fields(rest)?;
    let mut out = vec![(prefix, 0)];
    // token_fields splits `32k5` into [("", 32), ("k", 5)]: the first key is empty.
    let mut iter = fields.into_iter();
    let (first_key, first_value) = iter.next()?;
    if !first_key.is_empty() {
        return None;
    }
    out[0].1 = first_value;
    out.extend(iter);
    let keys: Vec<&str> = out.iter().map(|&(k, _)| k).collect();
    let unique = keys.iter().enumerate().all(|(i, k)| !keys[..i].contains(k));
    unique.then_some(out)
}

fn parse_float(text: &str) -> Option<SpecFloat> {
    // Digits and one dot only: no signs (the separator is '-'), exponents, inf or NaN.
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    text.parse::<f32>().ok().map(SpecFloat::new)
}

fn parse_layer(token: &str) -> Result<NetLayer, String> {
    let bad = || {
        format!(
            "bad layer {token:?}: expected conv{{N}}k{{K}}[s{{S}}][p{{P}}], max{{K}}[s{{S}}], \
             avg{{K}}[s{{S}}], gap, fc{{N}}, relu, sigmoid, tanh, flat, drop{{RATE}}, bn{{EPS}} \
             (softmax or logsoftmax only last)"
        )
    };
    let simple = match token {
        "gap" => Some(NetLayer::GlobalAvgPool),
        "relu" => Some(NetLayer::Relu),
        "sigmoid" => Some(NetLayer::Sigmoid),
        "tanh" => Some(NetLayer::Tanh),
        "flat" => Some(NetLayer::Flatten),
        _ => None,
    };
    if let Some(layer) = simple {
        return Ok(layer);
    }
    if let Some(rate) = token.strip_prefix("drop") {
        return parse_float(rate)
            .map(|rate| NetLayer::Dropout { rate })
            .ok_or_else(bad);
    }
    if let Some(epsilon) = token.strip_prefix("bn") {
        return parse_float(epsilon)
            .map(|epsilon| NetLayer::BatchNorm { epsilon })
            .ok_or_else(bad);
    }
    let lookup = |fields: &[(&str, usize)], key: &str| {
        fields.iter().find(|(k, _)| *k == key).map(|&(_, v)| v)
    };
    let allowed =
        |fields: &[(&str, usize)], keys: &[&str]| fields.iter().all(|(k, _)| keys.contains(k));
    if let Some(fields) = int_fields(token, "conv") {
        if !allowed(&fields, &["conv", "k", "s", "p"]) {
            return Err(bad());
        }
        return Ok(NetLayer::Conv {
            channels: lookup(&fields, "conv").ok_or_else(bad)?,
            kernel: lookup(&fields, "k").ok_or_else(bad)?,
            stride: lookup(&fields, "s").unwrap_or(1),
            padding: lookup(&fields, "p").unwrap_or(0),
        });
    }
    for prefix in ["max", "avg"] {
        if let Some(fields) = int_fields(token, prefix) {
            if !allowed(&fields, &[prefix, "s"]) {
                return Err(bad());
            }
            let size = lookup(&fields, prefix).ok_or_else(bad)?;
            let stride = lookup(&fields, "s").unwrap_or(size);
            return Ok(if prefix == "max" {
                NetLayer::MaxPool { size, stride }
            } else {
                NetLayer::AvgPool { size, stride }
            });
        }
    }
    if let Some(fields) = int_fields(token, "fc")
        && fields.len() == 1
    {
        return Ok(NetLayer::Dense { units: fields[0].1 });
    }
    Err(bad())
}

/// Parses the body of `net:...` (after the colon).
pub(super) fn parse_net(body: &str) -> Result<super::ModelSpec, String> {
    let tokens: Vec<String> = body
        .split('-')
        .map(|t| {
            t.chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_lowercase()
        })
        .collect();
    if tokens.len() > MAX_NET_LAYERS + 2 {
        return Err(format!(
            "a net spec may have at most {MAX_NET_LAYERS} layers"
        ));
    }
    let (first, rest) = tokens
        .split_first()
        .ok_or_else(|| "expected net:INPUT-LAYER-...".to_string())?;
    let input = first
        .split('x')
        .map(|d| d.parse::<usize>().ok())
        .collect::<Option<Vec<usize>>>()
        .filter(|dims| dims.len() == 1 || dims.len() == 3)
        .ok_or_else(|| {
            format!(
                "{first:?} is not an input shape: expected F (features) or CxHxW \
                 (e.g. net:1x28x28-conv8k3-relu-flat-fc10)"
            )
        })?;
    let (output, hidden) = match rest.split_last() {
        Some((last, hidden)) if last == "softmax" => (NetOutput::Softmax, hidden),
        Some((last, hidden)) if last == "logsoftmax" => (NetOutput::LogSoftmax, hidden),
        _ => (NetOutput::Logits, rest),
    };
    let layers = hidden
        .iter()
        .map(|token| parse_layer(token))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(super::ModelSpec::Net {
        input,
        layers,
        output,
    })
}

/// Shape of the activations while walking a net.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Image(usize, usize, usize),
    Flat(usize),
}

impl Shape {
    fn len(self) -> usize {
        match self {
            Shape::Image(c, h, w) => c * h * w,
            Shape::Flat(n) => n,
        }
    }
}

impl CnnWalk {
    /// Shape inference over a `net:` spec: the engine stages and sizes (input first, the
    /// output width last), as far as the spec is valid.
    pub(super) fn run_net(&mut self, input: &[usize], layers: &[NetLayer]) -> Result<(), String> {
        if layers.len() > MAX_NET_LAYERS {
            return Err(format!(
                "a net spec may have at most {MAX_NET_LAYERS} layers"
            ));
        }
        let mut shape = match *input {
            [features] => Shape::Flat(features),
            [c, h, w] => Shape::Image(c, h, w),
            _ => return Err("the input must be F or CxHxW".to_string()),
        };
        let flat = match shape {
            Shape::Flat(n) => Some(n),
            Shape::Image(c, h, w) => c.checked_mul(h).and_then(|n| n.checked_mul(w)),
        };
        match flat {
            Some(n) if n > 0 && n <= MAX_ACTIVATION => self.sizes.push(n),
            _ => {
                return Err(format!(
                    "the input must have 1..={MAX_ACTIVATION} values per example"
                ));
            }
        }
        for (position, layer) in layers.iter().enumerate() {
            let at = || format!("layer {} ({layer})", position + 1);
            let image = |shape: Shape, what: &str| match shape {
                Shape::Image(c, h, w) => Ok((c, h, w)),
                Shape::Flat(_) => Err(format!("{}: {what} needs an image (CxHxW) input", at())),
            };
            match *layer {
                NetLayer::Conv {
                    channels,
                    kernel,
                    stride,
                    padding,
                } => {
                    let (c, h, w) = image(shape, "a convolution")?;
                    if channels == 0 || kernel == 0 || stride == 0 {
                        return Err(format!(
                            "{}: channels, kernel and stride must be at least 1",
                            at()
                        ));
                    }
                    let geometry = ConvGeometry::new((c, h, w), kernel, stride, padding)
                        .ok_or_else(|| {
                            format!("{}: the kernel does not fit the {c}x{h}x{w} input", at())
                        })?;
                    let output = channels.checked_mul(geometry.col_cols());
                    let cols = geometry.col_rows().checked_mul(geometry.col_cols());
                    if output.is_none_or(|n| n > MAX_ACTIVATION)
                        || cols.is_none_or(|n| n > MAX_ACTIVATION)
                    {
                        return Err(format!(
                            "{}: activations would exceed {MAX_ACTIVATION} values per example",
                            at()
                        ));
                    }
                    self.add_params(geometry.col_rows(), channels)?;
                    self.stages.push(Stage::Conv {
                        geometry,
                        out_channels: channels,
                    });
                    shape = Shape::Image(channels, geometry.out_height, geometry.out_width);
                }
                NetLayer::MaxPool { size, stride } | NetLayer::AvgPool { size, stride } => {
                    let (c, h, w) = image(shape, "pooling")?;
                    let geometry = PoolGeometry::new(c, (h, w), size, stride).ok_or_else(|| {
                        format!(
                            "{}: the window does not fit the {c}x{h}x{w} input \
                             (size and stride must be at least 1)",
                            at()
                        )
                    })?;
                    self.stages
                        .push(if matches!(layer, NetLayer::MaxPool { .. }) {
                            Stage::MaxPool { geometry }
                        } else {
                            Stage::AvgPool { geometry }
                        });
                    shape = Shape::Image(c, geometry.out_height, geometry.out_width);
                }
                NetLayer::GlobalAvgPool => {
                    let (c, h, w) = image(shape, "global average pooling")?;
                    self.stages.push(Stage::GlobalAvgPool {
                        channels: c,
                        plane: h * w,
                    });
                    shape = Shape::Image(c, 1, 1);
                }
                NetLayer::Dense { units } => {
                    if units == 0 || units > MAX_ACTIVATION {
                        return Err(format!(
                            "{}: a dense layer needs 1..={MAX_ACTIVATION} units",
                            at()
                        ));
                    }
                    let mut as_image = match shape {
                        Shape::Image(c, h, w) => Some((c, h, w)),
                        Shape::Flat(_) => None,
                    };
                    self.dense(&mut as_image, shape.len(), units)?;
                    shape = Shape::Flat(units);
                }
                NetLayer::Relu | NetLayer::Sigmoid | NetLayer::Tanh => {
                    let len = shape.len();
                    self.stages.push(match layer {
                        NetLayer::Relu => Stage::Relu { len },
                        NetLayer::Sigmoid => Stage::Sigmoid { len },
                        _ => Stage::Tanh { len },
                    });
                }
                NetLayer::Flatten => {
                    let len = shape.len();
                    self.stages.push(Stage::Flatten { len });
                    shape = Shape::Flat(len);
                }
                NetLayer::Dropout { rate } => {
                    let rate = rate.get();
                    if !(0.0..1.0).contains(&rate) {
                        return Err(format!("{}: the dropout rate must be in [0, 1)", at()));
                    }
                    self.stages.push(Stage::Dropout {
                        len: shape.len(),
                        rate,
                    });
                }
                NetLayer::BatchNorm { epsilon } => {
                    let epsilon = epsilon.get();
                    if !(epsilon > 0.0 && epsilon <= 1.0) {
                        return Err(format!("{}: epsilon must be in (0, 1]", at()));
                    }
                    let (channels, plane) = match shape {
                        Shape::Image(c, h, w) => (c, h * w),
                        Shape::Flat(n) => (n, 1),
                    };
                    // Four [channels] tensors: scale, bias, running mean and variance.
                    self.add_params(3, channels)?;
                    self.stages.push(Stage::BatchNorm {
                        channels,
                        plane,
                        epsilon,
                    });
                }
            }
            self.sizes.push(shape.len());
        }
        if shape.len() < 2 {
            return Err(format!(
                "a classifier needs at least 2 outputs; this net ends with {}",
                shape.len()
            ));
        }
        Ok(())
    }
}
