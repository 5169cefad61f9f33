//! ONNX graph to `net:` spec and parameters.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, TensorProto,
    tensor_shape_proto::dimension::Value as DimValue, type_proto,
};

use super::proto::{attr_float, attr_int, attr_ints, attr_string, attribute, floats, ints};
use super::{Imported, MAX_ONNX_NODES, OnnxError, Result, read_limited};
use crate::spec::{MAX_NET_LAYERS, MAX_PARAMS, ModelSpec, NetLayer, NetOutput, SpecFloat};

/// Where one parameter tensor of the imported model lives in the file.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Source {
    /// A graph initializer of this name; `transposed` when it is stored `[in, out]`
    /// (MatMul, Gemm without transB) while fedquic keeps `[out, in]`. `reader` is the
    /// (node, input) that reads it: where export points a copy when several parameters
    /// share one initializer (PyTorch's exporter merges initializers of equal value,
    /// such as a fresh BatchNorm's weight and running variance).
    Initializer {
        name: String,
        transposed: bool,
        reader: (usize, usize),
    },
    /// The `value` of the Constant node that outputs this name.
    Constant { name: String },
    /// Absent (a Conv or Gemm without bias): export adds an initializer of this name as
    /// input `input` of node `node`.
    Missing {
        name: String,
        node: usize,
        input: usize,
    },
    /// Absent because MatMul node `node` has no Add after it (tf2onnx drops an all-zero
    /// bias): export inserts an Add of an initializer of this name.
    MissingAdd { name: String, node: usize },
}

/// The import's result plus where each parameter tensor came from (for export).
pub(crate) struct Mapped {
    pub imported: Imported,
    pub sources: Vec<Source>,
    /// `[rows, cols]` as stored in the file for each tensor (for transposition).
    pub stored: Vec<(usize, usize)>,
}

/// Imports an ONNX file (see the module docs).
pub fn import_file(path: impl AsRef<Path>) -> Result<Imported> {
    let bytes = read_limited(path.as_ref())?;
    import_bytes(&bytes)
}

/// Imports ONNX bytes (see the module docs).
pub fn import_bytes(bytes: &[u8]) -> Result<Imported> {
    map_model(&decode(bytes)?).map(|mapped| mapped.imported)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes)
        .map_err(|e| OnnxError::NotOnnx(format!("the protobuf does not decode: {e}")))?;
    match &model.graph {
        Some(graph) if !graph.node.is_empty() && !graph.input.is_empty() => Ok(model),
        _ => Err(OnnxError::NotOnnx(
            "no graph with nodes and inputs (is this an .onnx file?)".to_string(),
        )),
    }
}

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

struct Walk<'a> {
    graph: &'a GraphProto,
    initializers: HashMap<&'a str, &'a TensorProto>,
    constants: HashMap<&'a str, TensorProto>,
    opset: i64,
    layers: Vec<NetLayer>,
    params: Vec<f32>,
    sources: Vec<Source>,
    stored: Vec<(usize, usize)>,
    shape: Shape,
    current: String,
    output: NetOutput,
}

fn node_error(node: &NodeProto, reason: impl Into<String>) -> OnnxError {
    OnnxError::UnsupportedNode {
        op: node.op_type.clone(),
        node: node.name.clone(),
        reason: reason.into(),
    }
}

/// The tensor a Constant node holds (`value`, `value_float(s)`, `value_int(s)`).
fn constant_value(node: &NodeProto) -> Result<TensorProto> {
    let output = node.output.first().cloned().unwrap_or_default();
    if let Some(tensor) = attribute(node, "value").and_then(|a| a.t.clone()) {
        return Ok(TensorProto {
            name: output,
            ..tensor
        });
    }
    use tract_onnx::pb::tensor_proto::DataType;
    let make = |dims: Vec<i64>, data_type: DataType| TensorProto {
        name: output.clone(),
        dims,
        data_type: data_type as i32,
        ..TensorProto::default()
    };
    if let Some(a) = attribute(node, "value_float") {
        return Ok(TensorProto {
            float_data: vec![a.f],
            ..make(vec![], DataType::Float)
        });
    }
    if let Some(a) = attribute(node, "value_floats") {
        return Ok(TensorProto {
            float_data: a.floats.clone(),
            ..make(vec![a.floats.len() as i64], DataType::Float)
        });
    }
    if let Some(a) = attribute(node, "value_int") {
        return Ok(TensorProto {
            int64_data: vec![a.i],
            ..make(vec![], DataType::Int64)
        });
    }
    if let Some(a) = attribute(node, "value_ints") {
        return Ok(TensorProto {
            int64_data: a.ints.clone(),
            ..make(vec![a.ints.len() as i64], DataType::Int64)
        });
    }
    Err(node_error(
        node,
        "a Constant without a supported value attribute",
    ))
}

pub(crate) fn map_model(model: &ModelProto) -> Result<Mapped> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::NotOnnx("no graph".to_string()))?;
    if graph.node.len() > MAX_ONNX_NODES {
        return Err(OnnxError::UnsupportedGraph(format!(
            "{} nodes; fedquic imports at most {MAX_ONNX_NODES}",
            graph.node.len()
        )));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(13, |o| o.version);
    let initializers: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut constants = HashMap::new();
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let value = constant_value(node)?;
        if let Some(output) = node.output.first() {
            constants.insert(output.as_str(), value);
        }
    }
    // The one graph input that is not an initializer is the data.
    let data_inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains_key(i.name.as_str()))
        .collect();
    let [input] = data_inputs.as_slice() else {
        return Err(OnnxError::UnsupportedGraph(format!(
            "the graph has {} data inputs; fedquic models take exactly one",
            data_inputs.len()
        )));
    };
    let shape = input_shape(input)?;
    let [graph_output] = graph.output.as_slice() else {
        return Err(OnnxError::UnsupportedGraph(format!(
            "the graph has {} outputs; fedquic models have exactly one",
            graph.output.len()
        )));
    };
    let mut walk = Walk {
        graph,
        initializers,
        constants,
        opset,
        layers: Vec::new(),
        params: Vec::new(),
        sources: Vec::new(),
        stored: Vec::new(),
        shape,
        current: input.name.clone(),
        output: NetOutput::Logits,
    };
    let input_dims = match shape {
        Shape::Image(c, h, w) => vec![c, h, w],
        Shape::Flat(n) => vec![n],
    };
    walk.run()?;
    if walk.current != graph_output.name {
        return Err(OnnxError::UnsupportedGraph(format!(
            "the graph output {:?} is not the end of the layer chain ({:?})",
            graph_output.name, walk.current
        )));
    }
    let spec = ModelSpec::Net {
        input: input_dims,
        layers: walk.layers,
        output: walk.output,
    };
    spec.validate()?;
    let expected: usize = spec.tensors().iter().map(|t| t.len()).sum();
    if expected != walk.params.len() {
        return Err(OnnxError::Invalid(format!(
            "the initializers hold {} values but the layers need {expected}",
            walk.params.len()
        )));
    }
    Ok(Mapped {
        imported: Imported {
            spec,
            parameters: walk.params,
            input_name: input.name.clone(),
            output_name: graph_output.name.clone(),
        },
        sources: walk.sources,
        stored: walk.stored,
    })
}

/// `[batch, F]` or `[batch, C, H, W]`, every size but the batch fixed.
fn input_shape(input: &tract_onnx::pb::ValueInfoProto) -> Result<Shape> {
    let dims = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tensor)) => {
            if tensor.elem_type != tract_onnx::pb::tensor_proto::DataType::Float as i32 {
                return Err(OnnxError::UnsupportedGraph(format!(
                    "input {:?} is not float32",
                    input.name
                )));
            }
            tensor
                .shape
                .as_ref()
                .map(|s| s.dim.clone())
                .ok_or_else(|| {
                    OnnxError::DynamicShape(format!(
                        "input {:?} declares no shape; export it with a fixed shape \
                         (only the batch dimension may be symbolic)",
                        input.name
                    ))
                })?
        }
        _ => {
            return Err(OnnxError::UnsupportedGraph(format!(
                "input {:?} is not a tensor",
                input.name
            )));
        }
    };
    let mut sizes = Vec::new();
    for (axis, dim) in dims.iter().enumerate().skip(1) {
        match &dim.value {
            Some(DimValue::DimValue(v)) if *v > 0 => sizes.push(*v as usize),
            Some(DimValue::DimParam(name)) => {
                return Err(OnnxError::DynamicShape(format!(
                    "input {:?} has a symbolic size {name:?} on axis {axis}; only the batch \
                     axis (0) may be symbolic",
                    input.name
                )));
            }
            _ => {
                return Err(OnnxError::DynamicShape(format!(
                    "input {:?} has no fixed size on axis {axis}",
                    input.name
                )));
            }
        }
    }
    // Every later shape is computed from this one without overflow checks.
    let values = sizes.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if values.is_none_or(|n| n > crate::spec::MAX_ACTIVATION) {
        return Err(OnnxError::UnsupportedGraph(format!(
            "input {:?} has more than {} values per example",
            input.name,
            crate::spec::MAX_ACTIVATION
        )));
    }
    match *sizes.as_slice() {
        [n] => Ok(Shape::Flat(n)),
        [c, h, w] => Ok(Shape::Image(c, h, w)),
        _ => Err(OnnxError::UnsupportedGraph(format!(
            "input {:?} has rank {}; fedquic takes [batch, features] or [batch, C, H, W]",
            input.name,
            dims.len()
        ))),
    }
}

impl Walk<'_> {
    fn run(&mut self) -> Result<()> {
        let nodes = &self.graph.node;
        let mut index = 0;
        while index < nodes.len() {
            let node = &nodes[index];
            index += 1;
            if node.op_type == "Constant" {
                continue;
            }
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(OnnxError::UnsupportedOp {
                    op: format!("{}:{}", node.domain, node.op_type),
                    node: node.name.clone(),
                });
            }
            if self.output != NetOutput::Logits {
                return Err(node_error(
                    node,
                    "only the graph's last node may be a Softmax or LogSoftmax",
                ));
            }
            if node.input.first() != Some(&self.current) {
                return Err(node_error(
                    node,
                    format!(
                        "the graph is not a single chain of layers: this node reads {:?}, \
                         expected {:?}",
                        node.input.first().cloned().unwrap_or_default(),
                        self.current
                    ),
                ));
            }
            if self.layers.len() >= MAX_NET_LAYERS {
                return Err(OnnxError::UnsupportedGraph(format!(
                    "more than {MAX_NET_LAYERS} layers"
                )));
            }
            let extra_outputs = node.output.iter().skip(1).any(|o| !o.is_empty());
            let mut output = node
                .output
                .first()
                .cloned()
                .ok_or_else(|| node_error(node, "no output"))?;
            match node.op_type.as_str() {
                "Gemm" => self.gemm(node, index - 1)?,
                "MatMul" => {
                    // MatMul by an [in, out] weight, then Add of the bias (tf2onnx's Dense).
                    let add = nodes[index..]
                        .iter()
                        .position(|n| n.op_type != "Constant")
                        .map(|offset| index + offset);
                    let add = add
                        .map(|i| (i, &nodes[i]))
                        .filter(|(_, n)| n.op_type == "Add" && n.input.contains(&output));
                    match add {
                        Some((add_index, add)) => {
                            self.matmul(node, Some(add), index - 1)?;
                            output = add.output.first().cloned().unwrap_or_default();
                            index = add_index + 1;
                        }
                        None => self.matmul(node, None, index - 1)?,
                    }
                }
                "Conv" => self.conv(node, index - 1)?,
                "MaxPool" | "AveragePool" => {
                    if extra_outputs {
                        return Err(node_error(node, "the Indices output is not supported"));
                    }
                    self.pool(node)?
                }
                "GlobalAveragePool" => {
                    let (c, h, w) = self.image(node)?;
                    let _ = (h, w);
                    self.layers.push(NetLayer::GlobalAvgPool);
                    self.shape = Shape::Image(c, 1, 1);
                }
                "Relu" => self.layers.push(NetLayer::Relu),
                "Sigmoid" => self.layers.push(NetLayer::Sigmoid),
                "Tanh" => self.layers.push(NetLayer::Tanh),
                "Identity" => {}
                "Flatten" => {
                    let axis = attr_int(node, "axis", 1);
                    if axis != 1 {
                        return Err(node_error(
                            node,
                            format!("axis {axis}: only Flatten(axis=1) keeps the batch axis"),
                        ));
                    }
                    self.layers.push(NetLayer::Flatten);
                    self.shape = Shape::Flat(self.shape.len());
                }
                "Reshape" => self.reshape(node)?,
                "Dropout" => self.dropout(node)?,
                "BatchNormalization" => {
                    if extra_outputs || attr_int(node, "training_mode", 0) != 0 {
                        return Err(node_error(
                            node,
                            "training-mode batch normalisation (export the model in eval mode)",
                        ));
                    }
                    self.batch_norm(node)?
                }
                "Softmax" | "LogSoftmax" => {
                    let default_axis = if self.opset >= 13 { -1 } else { 1 };
                    let axis = attr_int(node, "axis", default_axis);
                    if !matches!(self.shape, Shape::Flat(_)) || !(axis == 1 || axis == -1) {
                        return Err(node_error(
                            node,
                            "softmax is supported over the classes of [batch, classes] only",
                        ));
                    }
                    self.output = if node.op_type == "Softmax" {
                        NetOutput::Softmax
                    } else {
                        NetOutput::LogSoftmax
                    };
                }
                other => {
                    return Err(OnnxError::UnsupportedOp {
                        op: other.to_string(),
                        node: node.name.clone(),
                    });
                }
            }
            if extra_outputs && node.op_type != "Dropout" {
                return Err(node_error(node, "extra outputs are not supported"));
            }
            self.current = output;
        }
        Ok(())
    }

    fn image(&self, node: &NodeProto) -> Result<(usize, usize, usize)> {
        match self.shape {
            Shape::Image(c, h, w) => Ok((c, h, w)),
            Shape::Flat(_) => Err(node_error(node, "needs a [batch, C, H, W] input")),
        }
    }

    /// A constant input: an initializer or a Constant node's value.
    fn constant(&self, name: &str) -> Option<(&TensorProto, Source)> {
        if let Some(tensor) = self.initializers.get(name) {
            return Some((
                tensor,
                Source::Initializer {
                    name: name.to_string(),
                    transposed: false,
                    reader: (0, 0),
                },
            ));
        }
        self.constants.get(name).map(|tensor| {
            (
                tensor,
                Source::Constant {
                    name: name.to_string(),
                },
            )
        })
    }

    fn weight(&self, node: &NodeProto, position: usize) -> Result<(&TensorProto, Source)> {
        let name = node
            .input
            .get(position)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| node_error(node, format!("input {position} is missing")))?;
        let node_index = self
            .graph
            .node
            .iter()
            .position(|n| std::ptr::eq(n, node))
            .unwrap_or(0);
        let mut found = self.constant(name);
        if let Some((_, Source::Initializer { reader, .. })) = &mut found {
            *reader = (node_index, position);
        }
        found.ok_or_else(|| {
            node_error(
                node,
                format!(
                    "input {name:?} is computed at run time; fedquic needs weights stored as \
                     initializers or Constant nodes"
                ),
            )
        })
    }

    /// Appends a layer's parameters. A stored tensor read by several parameters
    /// becomes one parameter each (export gives each its own copy); the running
    /// total is checked as it grows, since a shared tensor is decoded once per reader.
    /// A Constant node's value cannot be copied that way: sharing one is refused.
    fn push(&mut self, values: Vec<f32>, source: Source, stored: (usize, usize)) -> Result<()> {
        if let Source::Constant { name } = &source
            && self
                .sources
                .iter()
                .any(|used| matches!(used, Source::Constant { name: n } if n == name))
        {
            return Err(OnnxError::UnsupportedGraph(format!(
                "constant {name:?} is read by two layers; store shared weights as initializers"
            )));
        }
        if self.params.len().saturating_add(values.len()) > MAX_PARAMS {
            return Err(OnnxError::Invalid(format!(
                "the model has more than 2^31 ({MAX_PARAMS}) parameters"
            )));
        }
        self.params.extend(values);
        self.sources.push(source);
        self.stored.push(stored);
        Ok(())
    }

    /// An optional bias input (`position`) of `len` values, zero when absent.
    fn bias(
        &mut self,
        node: &NodeProto,
        node_index: usize,
        position: usize,
        len: usize,
    ) -> Result<()> {
        match node.input.get(position).filter(|n| !n.is_empty()) {
            Some(_) => {
                let (tensor, source) = self.weight(node, position)?;
                let values = floats(tensor)?;
                if values.len() != len {
                    return Err(node_error(
                        node,
                        format!("the bias has {} values, expected {len}", values.len()),
                    ));
                }
                self.push(values, source, (1, len))?;
            }
            None => {
                let name = format!(
                    "{}.fedquic_bias",
                    if node.name.is_empty() {
                        "node"
                    } else {
                        &node.name
                    }
                );
                self.push(
                    vec![0.0; len],
                    Source::Missing {
                        name,
                        node: node_index,
                        input: position,
                    },
                    (1, len),
                )?;
            }
        }
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto, node_index: usize) -> Result<()> {
        let Shape::Flat(inputs) = self.shape else {
            return Err(node_error(
                node,
                "needs a [batch, features] input (add a Flatten)",
            ));
        };
        if attr_int(node, "transA", 0) != 0
            || attr_float(node, "alpha", 1.0) != 1.0
            || attr_float(node, "beta", 1.0) != 1.0
        {
            return Err(node_error(
                node,
                "only Gemm with transA = 0, alpha = 1 and beta = 1 is supported",
            ));
        }
        let transposed = attr_int(node, "transB", 0) == 0;
        let (tensor, source) = self.weight(node, 1)?;
        let dims = &tensor.dims;
        let outputs = match (dims.as_slice(), transposed) {
            (&[rows, cols], false) if cols as usize == inputs && rows > 0 => rows as usize,
            (&[rows, cols], true) if rows as usize == inputs && cols > 0 => cols as usize,
            _ => {
                return Err(node_error(
                    node,
                    format!("weight shape {dims:?} does not fit {inputs} inputs"),
                ));
            }
        };
        let values = floats(tensor)?;
        self.dense(values, source, transposed, inputs, outputs)?;
        self.bias(node, node_index, 2, outputs)?;
        self.layers.push(NetLayer::Dense { units: outputs });
        self.shape = Shape::Flat(outputs);
        Ok(())
    }

    /// Stores a dense weight as fedquic's `[out, in]`.
    fn dense(
        &mut self,
        values: Vec<f32>,
        source: Source,
        transposed: bool,
        inputs: usize,
        outputs: usize,
    ) -> Result<()> {
        let (values, stored, source) = if transposed {
            let mut out = vec![0.0; values.len()];
            for i in 0..inputs {
                for o in 0..outputs {
                    out[o * inputs + i] = values[i * outputs + o];
                }
            }
            let source = match source {
                Source::Initializer { name, reader, .. } => Source::Initializer {
                    name,
                    transposed: true,
                    reader,
                },
                other => other,
            };
            (out, (inputs, outputs), source)
        } else {
            (values, (outputs, inputs), source)
        };
        if matches!(source, Source::Constant { .. }) && transposed {
            return Err(OnnxError::UnsupportedGraph(
                "a MatMul weight held by a Constant node; store it as an initializer".to_string(),
            ));
        }
        self.push(values, source, stored)?;
        Ok(())
    }

    fn matmul(
        &mut self,
        node: &NodeProto,
        add: Option<&NodeProto>,
        node_index: usize,
    ) -> Result<()> {
        let Shape::Flat(inputs) = self.shape else {
            return Err(node_error(
                node,
                "needs a [batch, features] input (add a Flatten)",
            ));
        };
        let (tensor, source) = self.weight(node, 1)?;
        let outputs = match tensor.dims.as_slice() {
            &[rows, cols] if rows as usize == inputs && cols > 0 => cols as usize,
            dims => {
                return Err(node_error(
                    node,
                    format!("weight shape {dims:?} does not fit {inputs} inputs"),
                ));
            }
        };
        let values = floats(tensor)?;
        self.dense(values, source, true, inputs, outputs)?;
        let Some(add) = add else {
            let name = format!(
                "{}.fedquic_bias",
                if node.name.is_empty() {
                    "matmul"
                } else {
                    &node.name
                }
            );
            self.push(
                vec![0.0; outputs],
                Source::MissingAdd {
                    name,
                    node: node_index,
                },
                (1, outputs),
            )?;
            self.layers.push(NetLayer::Dense { units: outputs });
            self.shape = Shape::Flat(outputs);
            return Ok(());
        };
        let matmul_output = node.output.first().cloned().unwrap_or_default();
        let bias_position = usize::from(add.input.first() == Some(&matmul_output));
        let (bias, source) = self.weight(add, bias_position)?;
        let values = floats(bias)?;
        if values.len() != outputs || bias.dims.iter().rev().skip(1).any(|&d| d != 1) {
            return Err(node_error(
                add,
                format!(
                    "the bias should be {outputs} values, has shape {:?}",
                    bias.dims
                ),
            ));
        }
        self.push(values, source, (1, outputs))?;
        self.layers.push(NetLayer::Dense { units: outputs });
        self.shape = Shape::Flat(outputs);
        Ok(())
    }

    fn conv(&mut self, node: &NodeProto, node_index: usize) -> Result<()> {
        let (c, h, w) = self.image(node)?;
        if attr_int(node, "group", 1) != 1 {
            return Err(node_error(node, "only group = 1 is supported"));
        }
        let (tensor, source) = self.weight(node, 1)?;
        let (out, kernel) = match tensor.dims.as_slice() {
            &[out, inp, kh, kw] if inp as usize == c && kh == kw && out > 0 && kh > 0 => {
                (out as usize, kh as usize)
            }
            dims => {
                return Err(node_error(
                    node,
                    format!("weight shape {dims:?}: expected [out, {c}, k, k] (square kernels)"),
                ));
            }
        };
        let (stride, padding) = self.window(node, kernel, true)?;
        let _ = (h, w);
        self.push(floats(tensor)?, source, (out, c * kernel * kernel))?;
        self.bias(node, node_index, 2, out)?;
        let layer = NetLayer::Conv {
            channels: out,
            kernel,
            stride,
            padding,
        };
        self.after_image_layer(node, layer)
    }

    /// Appends a layer that keeps an image, computing its output shape through the spec.
    fn after_image_layer(&mut self, node: &NodeProto, layer: NetLayer) -> Result<()> {
        let Shape::Image(c, h, w) = self.shape else {
            return Err(node_error(node, "needs a [batch, C, H, W] input"));
        };
        let probe = ModelSpec::Net {
            input: vec![c, h, w],
            layers: vec![layer, NetLayer::Flatten, NetLayer::Dense { units: 2 }],
            output: NetOutput::Logits,
        };
        let sizes = probe.layer_sizes();
        if let Err(e) = probe.validate() {
            return Err(node_error(node, e.to_string()));
        }
        let (channels, len) = match layer {
            NetLayer::Conv { channels, .. } => (channels, sizes[1]),
            _ => (c, sizes[1]),
        };
        // Square inputs stay square under square kernels and symmetric padding; derive
        // height and width from the layer's arithmetic.
        let (oh, ow) = match layer {
            NetLayer::Conv {
                kernel,
                stride,
                padding,
                ..
            } => (
                (h + 2 * padding - kernel) / stride + 1,
                (w + 2 * padding - kernel) / stride + 1,
            ),
            NetLayer::MaxPool { size, stride } | NetLayer::AvgPool { size, stride } => {
                ((h - size) / stride + 1, (w - size) / stride + 1)
            }
            _ => (h, w),
        };
        if channels * oh * ow != len {
            return Err(node_error(node, "internal shape mismatch"));
        }
        self.layers.push(layer);
        self.shape = Shape::Image(channels, oh, ow);
        Ok(())
    }

    /// Stride and symmetric padding of a square window; `padding_ok` for Conv.
    fn window(&self, node: &NodeProto, kernel: usize, padding_ok: bool) -> Result<(usize, usize)> {
        if let Some(shape) = attr_ints(node, "kernel_shape")
            && shape.iter().any(|&k| k as usize != kernel)
        {
            return Err(node_error(
                node,
                format!("kernel_shape {shape:?} is not square {kernel}"),
            ));
        }
        if attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
            return Err(node_error(node, "dilations other than 1 are not supported"));
        }
        match attr_string(node, "auto_pad").as_deref() {
            None | Some("NOTSET") | Some("VALID") => {}
            Some(other) => {
                return Err(node_error(
                    node,
                    format!("auto_pad {other}: use explicit pads (PyTorch's exporter does)"),
                ));
            }
        }
        let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
        let stride = match strides.as_slice() {
            &[a, b] if a == b && a > 0 => a as usize,
            other => {
                return Err(node_error(
                    node,
                    format!("strides {other:?} must be equal and positive"),
                ));
            }
        };
        let pads = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
        let padding = match pads.as_slice() {
            &[a, b, c, d] if a == b && b == c && c == d && a >= 0 => a as usize,
            other => {
                return Err(node_error(
                    node,
                    format!("pads {other:?} must be equal on all sides"),
                ));
            }
        };
        if padding != 0 && !padding_ok {
            return Err(node_error(node, "padded pooling is not supported"));
        }
        Ok((stride, padding))
    }

    fn pool(&mut self, node: &NodeProto) -> Result<()> {
        let (_, h, w) = self.image(node)?;
        let kernel = match attr_ints(node, "kernel_shape").as_deref() {
            Some(&[a, b]) if a == b && a > 0 => a as usize,
            other => {
                return Err(node_error(
                    node,
                    format!("kernel_shape {other:?} must be square"),
                ));
            }
        };
        let (stride, _) = self.window(node, kernel, false)?;
        if attr_int(node, "storage_order", 0) != 0 {
            return Err(node_error(node, "storage_order 1 is not supported"));
        }
        // Ceil mode only differs when a window would hang over the edge.
        if attr_int(node, "ceil_mode", 0) != 0
            && (h.saturating_sub(kernel) % stride != 0 || w.saturating_sub(kernel) % stride != 0)
        {
            return Err(node_error(
                node,
                "ceil_mode with partial windows is not supported",
            ));
        }
        let layer = if node.op_type == "MaxPool" {
            NetLayer::MaxPool {
                size: kernel,
                stride,
            }
        } else {
            NetLayer::AvgPool {
                size: kernel,
                stride,
            }
        };
        self.after_image_layer(node, layer)
    }

    fn reshape(&mut self, node: &NodeProto) -> Result<()> {
        let (tensor, _) = self.weight(node, 1).map_err(|_| {
            OnnxError::DynamicShape(format!(
                "Reshape node {:?} takes its shape from a computation; export with \
                 torch.flatten(x, 1) or a constant shape such as x.reshape(-1, N)",
                node.name
            ))
        })?;
        let shape = ints(tensor)?;
        let len = self.shape.len() as i64;
        let flattening = match shape.as_slice() {
            &[-1, n] | &[0, n] => n == len || n == -1,
            _ => false,
        };
        if !flattening || attr_int(node, "allowzero", 0) != 0 {
            return Err(node_error(
                node,
                format!(
                    "Reshape to {shape:?}: only flattening to [batch, {len}] ([-1, {len}] or \
                     [0, -1]) is supported"
                ),
            ));
        }
        self.layers.push(NetLayer::Flatten);
        self.shape = Shape::Flat(self.shape.len());
        Ok(())
    }

    fn dropout(&mut self, node: &NodeProto) -> Result<()> {
        let rate = if self.opset >= 12 {
            match node.input.get(1).filter(|n| !n.is_empty()) {
                Some(_) => {
                    let (tensor, _) = self.weight(node, 1)?;
                    match floats(tensor)?.as_slice() {
                        &[rate] => rate,
                        _ => return Err(node_error(node, "the ratio must be one value")),
                    }
                }
                None => 0.5,
            }
        } else {
            attr_float(node, "ratio", 0.5)
        };
        if !(0.0..1.0).contains(&rate) {
            return Err(node_error(node, format!("ratio {rate} is not in [0, 1)")));
        }
        self.layers.push(NetLayer::Dropout {
            rate: SpecFloat::new(rate),
        });
        Ok(())
    }

    fn batch_norm(&mut self, node: &NodeProto) -> Result<()> {
        let channels = match self.shape {
            Shape::Image(c, _, _) => c,
            Shape::Flat(n) => n,
        };
        for position in 1..=4 {
            let (tensor, source) = self.weight(node, position)?;
            let values = floats(tensor)?;
            if values.len() != channels {
                return Err(node_error(
                    node,
                    format!(
                        "input {position} has {} values, expected {channels}",
                        values.len()
                    ),
                ));
            }
            self.push(values, source, (1, channels))?;
        }
        let epsilon = attr_float(node, "epsilon", 1e-5);
        self.layers.push(NetLayer::BatchNorm {
            epsilon: SpecFloat::new(epsilon),
        });
        Ok(())
    }
}
