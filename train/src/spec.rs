//! Model specs: the strings that name an architecture, their validation, and the layer
//! plan (shapes and parameter tensors) that both the wire layout and the engine use.

use std::fmt;
use std::str::FromStr;

use crate::backend::{ConvGeometry, PoolGeometry};
use crate::error::{Result, TrainError};

#[path = "spec_net.rs"]
mod net;
pub use net::{MAX_NET_LAYERS, NetLayer, NetOutput, SpecFloat};

/// Largest total parameter count a spec may ask for: beyond this a flat `f32` vector
/// (8 GiB) is surely a typo, and counts stay well inside `u32`/`usize` arithmetic.
pub const MAX_PARAMS: usize = 1 << 31;

/// Largest per-example activation (or im2col matrix) a CNN spec may need, in values.
/// Specs arrive from the network, so an absurd one must be refused before the engine
/// sizes its buffers from it (this is 256 MiB of `f32` per example).
pub const MAX_ACTIVATION: usize = 1 << 26;

/// Name and shape of one tensor in a model's flat parameter vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (product of the shape).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One hidden layer of a [`ModelSpec::Cnn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CnnLayer {
    /// `channels` output channels, `kernel x kernel`, then ReLU. Spec token
    /// `c{channels}k{kernel}[s{stride}][p{padding}]` (stride 1 and padding 0 by default).
    Conv {
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Max pooling over `size x size` windows. Token `m{size}[s{stride}]` (stride = size
    /// by default).
    MaxPool { size: usize, stride: usize },
    /// A dense layer of `units` outputs, then ReLU (the first one flattens its input).
    /// Token `d{units}`.
    Dense { units: usize },
    /// Inverted dropout, dropping each value with probability `percent / 100` while
    /// training (identity in evaluation). Token `drop{percent}`, 1..=99.
    Dropout { percent: u8 },
}

/// Architecture of a classifier, written as a string (see
/// [`FromStr`](#impl-FromStr-for-ModelSpec)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// Multinomial logistic regression: one dense layer, `inputs -> classes`.
    LogReg { inputs: usize, classes: usize },
    /// Dense layers with ReLU between them: `layers = [in, h1, ..., out]`, at least 3 entries.
    Mlp { layers: Vec<usize> },
    /// A convolutional network over `input = [channels, height, width]` images (dataset
    /// rows are reshaped, row-major, to that shape), the hidden `layers` in order, then a
    /// dense layer to `classes` logits (flattening first if no dense layer did).
    Cnn {
        input: [usize; 3],
        layers: Vec<CnnLayer>,
        classes: usize,
    },
    /// An explicit layer list (`net:...`, see [`NetLayer`]): what an imported ONNX graph
    /// becomes. `input` is `[features]` or `[channels, height, width]`.
    Net {
        input: Vec<usize>,
        layers: Vec<NetLayer>,
        output: NetOutput,
    },
}

/// What one step of the engine's layer stack does (shapes per example).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Stage {
    Dense {
        inputs: usize,
        outputs: usize,
    },
    Conv {
        geometry: ConvGeometry,
        out_channels: usize,
    },
    /// `geometry.planes` is the channel count of one example.
    MaxPool {
        geometry: PoolGeometry,
    },
    Relu {
        len: usize,
    },
    Flatten {
        len: usize,
    },
    Dropout {
        len: usize,
        rate: f32,
    },
    Sigmoid {
        len: usize,
    },
    Tanh {
        len: usize,
    },
    /// `geometry.planes` is the channel count of one example.
    AvgPool {
        geometry: PoolGeometry,
    },
    GlobalAvgPool {
        channels: usize,
        plane: usize,
    },
    /// Per-channel normalisation with the running statistics (see [`NetLayer::BatchNorm`]).
    BatchNorm {
        channels: usize,
        plane: usize,
        epsilon: f32,
    },
}

impl Stage {
    /// Values per example this stage outputs.
    pub fn output_len(&self) -> usize {
        match *self {
            Stage::Dense { outputs, .. } => outputs,
            Stage::Conv {
                geometry,
                out_channels,
            } => out_channels * geometry.col_cols(),
            Stage::MaxPool { geometry } | Stage::AvgPool { geometry } => geometry.output_len(),
            Stage::Relu { len } | Stage::Flatten { len } | Stage::Dropout { len, .. } => len,
            Stage::Sigmoid { len } | Stage::Tanh { len } => len,
            Stage::GlobalAvgPool { channels, .. } => channels,
            Stage::BatchNorm {
                channels, plane, ..
            } => channels * plane,
        }
    }
}

/// The full layer plan of a valid spec.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    pub input_len: usize,
    pub stages: Vec<Stage>,
    pub tensors: Vec<TensorInfo>,
}

impl ModelSpec {
    /// The FedAvg paper's MNIST CNN (McMahan et al. 2017), `cnn:mnist`: 5x5 conv with 32
    /// channels (padding 2), ReLU, 2x2 max pool, 5x5 conv with 64 channels (padding 2),
    /// ReLU, 2x2 max pool, dense 512 with ReLU, dense 10. 1,663,370 parameters.
    pub fn cnn_mnist() -> ModelSpec {
        ModelSpec::Cnn {
            input: [1, 28, 28],
            layers: vec![
                CnnLayer::Conv {
                    channels: 32,
                    kernel: 5,
                    stride: 1,
                    padding: 2,
                },
                CnnLayer::MaxPool { size: 2, stride: 2 },
                CnnLayer::Conv {
                    channels: 64,
                    kernel: 5,
                    stride: 1,
                    padding: 2,
                },
                CnnLayer::MaxPool { size: 2, stride: 2 },
                CnnLayer::Dense { units: 512 },
            ],
            classes: 10,
        }
    }

    /// Per-example widths: the input first, the number of classes last. For logreg and
    /// mlp these are the dense layer widths; for a CNN, the flattened output size of each
    /// entry of `layers` (a conv's includes its ReLU) between input and classes.
    pub fn layer_sizes(&self) -> Vec<usize> {
        match self {
            ModelSpec::LogReg { inputs, classes } => vec![*inputs, *classes],
            ModelSpec::Mlp { layers } => layers.clone(),
            ModelSpec::Cnn {
                input,
                layers,
                classes,
            } => {
                let mut walk = CnnWalk::default();
                // An invalid hand-built spec lists the sizes before its first problem.
                let _ = walk.run(*input, layers, *classes);
                walk.sizes
            }
            ModelSpec::Net { input, layers, .. } => {
                let mut walk = CnnWalk::default();
                let _ = walk.run_net(input, layers);
                walk.sizes
            }
        }
    }

    /// Checks a spec built by hand (parsed specs are always valid).
    pub fn validate(&self) -> Result<()> {
        self.problem().map_or(Ok(()), |reason| {
            Err(TrainError::InvalidModelSpec {
                spec: self.to_string(),
                reason,
            })
        })
    }

    /// Why this spec is unusable, if it is.
    fn problem(&self) -> Option<String> {
        if let ModelSpec::Cnn {
            input,
            layers,
            classes,
        } = self
        {
            return cnn_problem(*input, layers, *classes);
        }
        if let ModelSpec::Net { input, layers, .. } = self {
            return CnnWalk::default().run_net(input, layers).err();
        }
        let sizes = self.layer_sizes();
        if let ModelSpec::Mlp { layers } = self
            && layers.len() < 3
        {
            return Some(format!(
                "an mlp needs input, at least one hidden and output sizes (e.g. mlp:784-200-10), got {} size(s); \
                 use logreg:IN-OUT for a model without hidden layers",
                layers.len()
            ));
        }
        if let Some(position) = sizes.iter().position(|&size| size == 0) {
            return Some(format!(
                "layer size {} is zero; every size must be at least 1",
                position + 1
            ));
        }
        if sizes.last().is_some_and(|&classes| classes < 2) {
            return Some("a classifier needs at least 2 output classes".to_string());
        }
        let total = sizes.windows(2).try_fold(0usize, |total, pair| {
            pair[0]
                .checked_mul(pair[1])
                .and_then(|weights| weights.checked_add(pair[1]))
                .and_then(|layer| layer.checked_add(total))
        });
        match total {
            Some(total) if total <= MAX_PARAMS => None,
            _ => Some(too_many_params()),
        }
    }

    /// The tensors of the flat parameter vector, in order.
    ///
    /// For logreg and mlp: for each dense layer `i` (counting from 0 at the input),
    /// `dense{i}.weight` with shape `[out, in]` (row-major, one row per output unit, like
    /// PyTorch's `nn.Linear`), then `dense{i}.bias` with shape `[out]`.
    ///
    /// For a CNN, in layer order: `conv{i}.weight` `[out_channels, in_channels, k, k]`
    /// (PyTorch's `nn.Conv2d` layout) and `conv{i}.bias` `[out_channels]` for the i-th
    /// convolution, then `dense{j}.weight` / `dense{j}.bias` for the j-th dense layer
    /// (the output layer last); the first dense layer reads the flattened `[C, H, W]`
    /// activations in row-major order. An invalid hand-built CNN lists the tensors
    /// before the first problem.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        match self {
            ModelSpec::Cnn {
                input,
                layers,
                classes,
            } => {
                let mut walk = CnnWalk::default();
                let _ = walk.run(*input, layers, *classes);
                tensors_of(&walk.stages)
            }
            ModelSpec::Net { input, layers, .. } => {
                let mut walk = CnnWalk::default();
                let _ = walk.run_net(input, layers);
                tensors_of(&walk.stages)
            }
            _ => self
                .layer_sizes()
                .windows(2)
                .enumerate()
                .flat_map(|(index, pair)| dense_tensors(index, pair[0], pair[1]))
                .collect(),
        }
    }

    /// Bytes of scratch memory the CPU engine takes to train this model on batches of
    /// `batch` examples: activations, their gradients, dropout masks and one im2col
    /// matrix, beyond the parameters and optimizer state (saturating). A model with few
    /// parameters can still have huge activations, so a device checks this, for the
    /// batch size it is asked for, before anything is allocated.
    pub fn training_scratch_bytes(&self, batch: usize) -> Result<u64> {
        let network = crate::layers::Network::new(&self.plan()?);
        Ok(network
            .workspace_values(batch, crate::layers::Purpose::Train)
            .saturating_mul(4))
    }

    /// Total number of parameters (saturates instead of overflowing for absurd hand-built specs).
    pub fn num_params(&self) -> usize {
        match self {
            ModelSpec::Cnn { .. } | ModelSpec::Net { .. } => {
                self.tensors().iter().fold(0usize, |total, tensor| {
                    let len = tensor
                        .shape
                        .iter()
                        .fold(1usize, |n, &d| n.saturating_mul(d));
                    total.saturating_add(len)
                })
            }
            _ => self.layer_sizes().windows(2).fold(0usize, |total, pair| {
                total.saturating_add(pair[0].saturating_mul(pair[1]).saturating_add(pair[1]))
            }),
        }
    }

    /// Number of input features (for a CNN, `channels * height * width`).
    pub fn input_dim(&self) -> usize {
        match self {
            ModelSpec::LogReg { inputs, .. } => *inputs,
            ModelSpec::Mlp { layers } => layers.first().copied().unwrap_or(0),
            ModelSpec::Cnn { input, .. } => input.iter().fold(1usize, |n, &d| n.saturating_mul(d)),
            ModelSpec::Net { input, .. } => input.iter().fold(1usize, |n, &d| n.saturating_mul(d)),
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        match self {
            ModelSpec::LogReg { classes, .. } | ModelSpec::Cnn { classes, .. } => *classes,
            ModelSpec::Mlp { layers } => layers.last().copied().unwrap_or(0),
            ModelSpec::Net { .. } => self.layer_sizes().last().copied().unwrap_or(0),
        }
    }

    /// The engine's layer plan; an error for an invalid spec.
    pub(crate) fn plan(&self) -> Result<Plan> {
        self.validate()?;
        let stages = match self {
            ModelSpec::Cnn {
                input,
                layers,
                classes,
            } => {
                let mut walk = CnnWalk::default();
                walk.run(*input, layers, *classes).map_err(|reason| {
                    TrainError::InvalidModelSpec {
                        spec: self.to_string(),
                        reason,
                    }
                })?;
                walk.stages
            }
            ModelSpec::Net { input, layers, .. } => {
                let mut walk = CnnWalk::default();
                walk.run_net(input, layers)
                    .map_err(|reason| TrainError::InvalidModelSpec {
                        spec: self.to_string(),
                        reason,
                    })?;
                walk.stages
            }
            _ => {
                let sizes = self.layer_sizes();
                let mut stages = Vec::new();
                for (index, pair) in sizes.windows(2).enumerate() {
                    stages.push(Stage::Dense {
                        inputs: pair[0],
                        outputs: pair[1],
                    });
                    if index + 2 < sizes.len() {
                        stages.push(Stage::Relu { len: pair[1] });
                    }
                }
                stages
            }
        };
        Ok(Plan {
            input_len: self.input_dim(),
            tensors: tensors_of(&stages),
            stages,
        })
    }
}

fn too_many_params() -> String {
    format!("the model would have more than 2^31 ({MAX_PARAMS}) parameters")
}

fn dense_tensors(index: usize, inputs: usize, outputs: usize) -> [TensorInfo; 2] {
    [
        TensorInfo {
            name: format!("dense{index}.weight"),
            shape: vec![outputs, inputs],
        },
        TensorInfo {
            name: format!("dense{index}.bias"),
            shape: vec![outputs],
        },
    ]
}

/// The parameter tensors of `stages`, in order.
fn tensors_of(stages: &[Stage]) -> Vec<TensorInfo> {
    let (mut convs, mut denses, mut norms) = (0, 0, 0);
    let mut tensors = Vec::new();
    for stage in stages {
        match *stage {
            Stage::Dense { inputs, outputs } => {
                tensors.extend(dense_tensors(denses, inputs, outputs));
                denses += 1;
            }
            Stage::Conv {
                geometry,
                out_channels,
            } => {
                tensors.push(TensorInfo {
                    name: format!("conv{convs}.weight"),
                    shape: vec![
                        out_channels,
                        geometry.in_channels,
                        geometry.kernel,
                        geometry.kernel,
                    ],
                });
                tensors.push(TensorInfo {
                    name: format!("conv{convs}.bias"),
                    shape: vec![out_channels],
                });
                convs += 1;
            }
            Stage::BatchNorm { channels, .. } => {
                for part in ["weight", "bias", "running_mean", "running_var"] {
                    tensors.push(TensorInfo {
                        name: format!("bn{norms}.{part}"),
                        shape: vec![channels],
                    });
                }
                norms += 1;
            }
            _ => {}
        }
    }
    tensors
}

/// Shape inference over a CNN spec: the engine stages and the per-layer output sizes
/// (input first, classes last), as far as the spec is valid.
#[derive(Default)]
struct CnnWalk {
    stages: Vec<Stage>,
    sizes: Vec<usize>,
    /// Parameters so far, to refuse more than [`MAX_PARAMS`] before multiplying further.
    params: usize,
}

impl CnnWalk {
    fn run(
        &mut self,
        input: [usize; 3],
        layers: &[CnnLayer],
        classes: usize,
    ) -> std::result::Result<(), String> {
        let [channels, height, width] = input;
        if channels == 0 || height == 0 || width == 0 {
            return Err("the input shape CxHxW must have non-zero sizes".to_string());
        }
        let mut flat = channels
            .checked_mul(height)
            .and_then(|n| n.checked_mul(width))
            .filter(|&n| n <= MAX_ACTIVATION)
            .ok_or_else(|| format!("the input has more than {MAX_ACTIVATION} values"))?;
        self.sizes.push(flat);
        // `Some(shape)` while the activations are still images, `None` once flattened.
        let mut image = Some((channels, height, width));
        for (position, layer) in layers.iter().enumerate() {
            let at = || format!("layer {} ({})", position + 1, LayerToken(layer));
            match *layer {
                CnnLayer::Conv {
                    channels: out_channels,
                    kernel,
                    stride,
                    padding,
                } => {
                    let shape = image
                        .ok_or_else(|| format!("{}: convolution after a dense layer", at()))?;
                    if out_channels == 0 || kernel == 0 || stride == 0 {
                        return Err(format!(
                            "{}: channels, kernel and stride must be at least 1",
                            at()
                        ));
                    }
                    let geometry =
                        ConvGeometry::new(shape, kernel, stride, padding).ok_or_else(|| {
                            format!(
                                "{}: the kernel does not fit the {}x{}x{} input",
                                at(),
                                shape.0,
                                shape.1,
                                shape.2
                            )
                        })?;
                    let output = out_channels.checked_mul(geometry.col_cols());
                    let cols = geometry.col_rows().checked_mul(geometry.col_cols());
                    if output.is_none_or(|n| n > MAX_ACTIVATION)
                        || cols.is_none_or(|n| n > MAX_ACTIVATION)
                    {
                        return Err(format!(
                            "{}: activations would exceed {MAX_ACTIVATION} values per example",
                            at()
                        ));
                    }
                    self.add_params(geometry.col_rows(), out_channels)?;
                    self.stages.push(Stage::Conv {
                        geometry,
                        out_channels,
                    });
                    image = Some((out_channels, geometry.out_height, geometry.out_width));
                    flat = out_channels * geometry.col_cols();
                    self.stages.push(Stage::Relu { len: flat });
                }
                CnnLayer::MaxPool { size, stride } => {
                    let (c, h, w) =
                        image.ok_or_else(|| format!("{}: pooling after a dense layer", at()))?;
                    let geometry = PoolGeometry::new(c, (h, w), size, stride).ok_or_else(|| {
                        format!(
                            "{}: the window does not fit the {c}x{h}x{w} input \
                             (size and stride must be at least 1)",
                            at()
                        )
                    })?;
                    self.stages.push(Stage::MaxPool { geometry });
                    image = Some((c, geometry.out_height, geometry.out_width));
                    flat = geometry.output_len();
                }
                CnnLayer::Dense { units } => {
                    if units == 0 || units > MAX_ACTIVATION {
                        return Err(format!(
                            "{}: a dense layer needs 1..={MAX_ACTIVATION} units",
                            at()
                        ));
                    }
                    self.dense(&mut image, flat, units)?;
                    flat = units;
                    self.stages.push(Stage::Relu { len: flat });
                }
                CnnLayer::Dropout { percent } => {
                    if !(1..=99).contains(&percent) {
                        return Err(format!("{}: the dropout percentage must be 1..=99", at()));
                    }
                    self.stages.push(Stage::Dropout {
                        len: flat,
                        rate: f32::from(percent) / 100.0,
                    });
                }
            }
            self.sizes.push(flat);
        }
        if classes < 2 {
            return Err("a classifier needs at least 2 output classes".to_string());
        }
        self.dense(&mut image, flat, classes)?;
        self.sizes.push(classes);
        Ok(())
    }

    /// A dense `inputs -> outputs` stage, flattening first if still on images.
    fn dense(
        &mut self,
        image: &mut Option<(usize, usize, usize)>,
        inputs: usize,
        outputs: usize,
    ) -> std::result::Result<(), String> {
        self.add_params(inputs, outputs)?;
        if image.take().is_some() {
            self.stages.push(Stage::Flatten { len: inputs });
        }
        self.stages.push(Stage::Dense { inputs, outputs });
        Ok(())
    }

    /// Counts a `[outputs, fan_in]` weight and `[outputs]` bias.
    fn add_params(&mut self, fan_in: usize, outputs: usize) -> std::result::Result<(), String> {
        self.params = fan_in
            .checked_mul(outputs)
            .and_then(|n| n.checked_add(outputs))
            .and_then(|n| n.checked_add(self.params))
            .filter(|&n| n <= MAX_PARAMS)
            .ok_or_else(too_many_params)?;
        Ok(())
    }
}

fn cnn_problem(input: [usize; 3], layers: &[CnnLayer], classes: usize) -> Option<String> {
    CnnWalk::default().run(input, layers, classes).err()
}

/// Formats one CNN layer as its spec token.
struct LayerToken<'a>(&'a CnnLayer);

impl fmt::Display for LayerToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            CnnLayer::Conv {
                channels,
                kernel,
                stride,
                padding,
            } => {
                write!(f, "c{channels}k{kernel}")?;
                if stride != 1 {
                    write!(f, "s{stride}")?;
                }
                if padding != 0 {
                    write!(f, "p{padding}")?;
                }
                Ok(())
            }
            CnnLayer::MaxPool { size, stride } => {
                write!(f, "m{size}")?;
                if stride != size {
                    write!(f, "s{stride}")?;
                }
                Ok(())
            }
            CnnLayer::Dense { units } => write!(f, "d{units}"),
            CnnLayer::Dropout { percent } => write!(f, "drop{percent}"),
        }
    }
}

/// Splits a token like `c32k5p2` into `[("c", 32), ("k", 5), ("p", 2)]`.
fn token_fields(token: &str) -> Option<Vec<(&str, usize)>> {
    let mut fields = Vec::new();
    let mut rest = token;
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (key, after) = rest.split_at(key_end);
        let value_end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        let (value, next) = after.split_at(value_end);
        fields.push((key, value.parse().ok()?));
        rest = next;
    }
    Some(fields)
}

/// Parses one hidden-layer token of a CNN spec.
fn parse_cnn_layer(token: &str) -> std::result::Result<CnnLayer, String> {
    let bad = || {
        format!(
            "bad layer {token:?}: expected c{{N}}k{{K}}[s{{S}}][p{{P}}] (conv), m{{K}}[s{{S}}] (max pool), \
             d{{N}} (dense), drop{{PERCENT}} (dropout) or the class count last"
        )
    };
    let fields = token_fields(token).ok_or_else(bad)?;
    let lookup = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|&(_, v)| v);
    let keys: Vec<&str> = fields.iter().map(|&(k, _)| k).collect();
    let only = |allowed: &[&str]| {
        keys.iter().all(|k| allowed.contains(k))
            && keys.iter().enumerate().all(|(i, k)| !keys[..i].contains(k))
    };
    match keys.first().copied() {
        Some("c") if only(&["c", "k", "s", "p"]) => Ok(CnnLayer::Conv {
            channels: lookup("c").ok_or_else(bad)?,
            kernel: lookup("k").ok_or_else(bad)?,
            stride: lookup("s").unwrap_or(1),
            padding: lookup("p").unwrap_or(0),
        }),
        Some("m") if only(&["m", "s"]) => {
            let size = lookup("m").ok_or_else(bad)?;
            Ok(CnnLayer::MaxPool {
                size,
                stride: lookup("s").unwrap_or(size),
            })
        }
        Some("d") if keys.len() == 1 => Ok(CnnLayer::Dense {
            units: lookup("d").ok_or_else(bad)?,
        }),
        Some("drop") if keys.len() == 1 => {
            let percent = lookup("drop").ok_or_else(bad)?;
            Ok(CnnLayer::Dropout {
                percent: u8::try_from(percent).unwrap_or(u8::MAX),
            })
        }
        _ => Err(bad()),
    }
}

/// Parses the body of `cnn:...` (after the colon).
fn parse_cnn(body: &str) -> std::result::Result<ModelSpec, String> {
    if body.eq_ignore_ascii_case("mnist") {
        return Ok(ModelSpec::cnn_mnist());
    }
    let tokens: Vec<String> = body
        .split('-')
        .map(|t| {
            t.chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_lowercase()
        })
        .collect();
    let (first, rest) = tokens
        .split_first()
        .ok_or_else(|| "expected cnn:mnist or cnn:CxHxW-LAYERS-CLASSES".to_string())?;
    let dims = first
        .split('x')
        .map(|d| d.parse::<usize>().ok())
        .collect::<Option<Vec<usize>>>();
    let input = match dims.as_deref() {
        Some(&[c, h, w]) => [c, h, w],
        _ => {
            return Err(format!(
                "expected cnn:mnist or cnn:CxHxW-LAYERS-CLASSES (e.g. cnn:1x28x28-c32k5p2-m2-d128-10); \
                 {first:?} is not an input shape CxHxW"
            ));
        }
    };
    let (last, hidden) = rest
        .split_last()
        .ok_or_else(|| "a cnn spec needs the class count last".to_string())?;
    let classes = last
        .parse::<usize>()
        .map_err(|_| format!("the last entry {last:?} must be the number of classes"))?;
    let layers = hidden
        .iter()
        .map(|token| parse_cnn_layer(token))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(ModelSpec::Cnn {
        input,
        layers,
        classes,
    })
}

/// Parses `logreg:IN-CLASSES`, `mlp:IN-H1-...-CLASSES` (at least one hidden layer),
/// `cnn:mnist` ([`ModelSpec::cnn_mnist`]) or `cnn:CxHxW-LAYER-...-CLASSES` with the
/// layer tokens of [`CnnLayer`] (e.g. `cnn:1x28x28-c32k5p2-m2-c64k5p2-m2-d512-10` is
/// `cnn:mnist`; add `drop50` after a layer for dropout). Sizes must be at least 1,
/// classes at least 2, and the total at most 2^31 parameters.
impl FromStr for ModelSpec {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<ModelSpec> {
        let invalid = |reason: String| TrainError::InvalidModelSpec {
            spec: text.to_string(),
            reason,
        };
        let (kind, body) = text.trim().split_once(':').ok_or_else(|| {
            invalid(
                "expected KIND:SIZES, e.g. \"logreg:784-10\", \"mlp:784-200-200-10\" or \"cnn:mnist\""
                    .to_string(),
            )
        })?;
        let kind = kind.trim().to_ascii_lowercase();
        let spec = if kind == "cnn" {
            parse_cnn(body.trim()).map_err(invalid)?
        } else if kind == "net" {
            net::parse_net(body.trim()).map_err(invalid)?
        } else {
            let sizes = body
                .split('-')
                .enumerate()
                .map(|(position, size)| {
                    size.trim().parse::<usize>().map_err(|_| {
                        invalid(format!(
                            "layer size {} ({size:?}) is not a non-negative integer",
                            position + 1
                        ))
                    })
                })
                .collect::<Result<Vec<usize>>>()?;
            match kind.as_str() {
                "logreg" => match sizes.as_slice() {
                    &[inputs, classes] => ModelSpec::LogReg { inputs, classes },
                    _ => {
                        return Err(invalid(format!(
                            "logreg takes exactly two sizes, IN-CLASSES (e.g. logreg:784-10), got {}",
                            sizes.len()
                        )));
                    }
                },
                "mlp" => ModelSpec::Mlp { layers: sizes },
                other => {
                    return Err(invalid(format!(
                        "unknown model kind {other:?}; expected \"logreg\", \"mlp\", \"cnn\" or \"net\""
                    )));
                }
            }
        };
        match spec.problem() {
            Some(reason) => Err(invalid(reason)),
            None => Ok(spec),
        }
    }
}

/// The canonical spec string: `cnn:mnist` for [`ModelSpec::cnn_mnist`], otherwise the
/// long form with default fields left out. Parsing it gives the same spec back.
impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, sizes) = match self {
            ModelSpec::LogReg { inputs, classes } => ("logreg", vec![*inputs, *classes]),
            ModelSpec::Mlp { layers } => ("mlp", layers.clone()),
            ModelSpec::Cnn {
                input,
                layers,
                classes,
            } => {
                if *self == ModelSpec::cnn_mnist() {
                    return f.write_str("cnn:mnist");
                }
                write!(f, "cnn:{}x{}x{}", input[0], input[1], input[2])?;
                for layer in layers {
                    write!(f, "-{}", LayerToken(layer))?;
                }
                return write!(f, "-{classes}");
            }
            ModelSpec::Net {
                input,
                layers,
                output,
            } => return net::write_net(f, input, layers, *output),
        };
        write!(f, "{kind}:")?;
        for (position, size) in sizes.iter().enumerate() {
            if position > 0 {
                f.write_str("-")?;
            }
            write!(f, "{size}")?;
        }
        Ok(())
    }
}
