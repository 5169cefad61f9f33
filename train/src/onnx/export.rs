//! Models to ONNX bytes.

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};

use super::import::{Source, decode, map_model};
use super::proto::{
    batched_value, float_attr, float_tensor, int_attr, ints_attr, node, set_floats,
};
use super::{OnnxError, Result};
use crate::error::TrainError;
use crate::model::Model;
use crate::spec::{ModelSpec, NetOutput, Stage};

/// The opset of freshly exported graphs.
const OPSET: i64 = 13;

/// [`export_spec`] for a model's spec and current parameters.
pub fn export_model(model: &Model) -> Result<Vec<u8>> {
    export_spec(model.spec(), model.parameters())
}

/// A fresh ONNX graph (opset 13) computing `spec` with `parameters`: input `input`
/// (`[batch, features]` or `[batch, C, H, W]`), output `output` (the logits, or their
/// softmax / log-softmax for a `net:` spec that ends with one). Tensors keep the names
/// of [`ModelSpec::tensors`].
pub fn export_spec(spec: &ModelSpec, parameters: &[f32]) -> Result<Vec<u8>> {
    let plan = spec.plan()?;
    if parameters.len() != spec.num_params() {
        return Err(TrainError::ParameterCount {
            spec: spec.to_string(),
            expected: spec.num_params(),
            actual: parameters.len(),
        }
        .into());
    }
    let input_dims = match spec {
        ModelSpec::Cnn { input, .. } => input.to_vec(),
        ModelSpec::Net { input, .. } => input.clone(),
        _ => vec![spec.input_dim()],
    };
    let output_kind = match spec {
        ModelSpec::Net { output, .. } => *output,
        _ => NetOutput::Logits,
    };
    let mut tensors = plan.tensors.iter();
    let mut offset = 0;
    let mut graph = GraphProto {
        name: "fedquic".to_string(),
        ..GraphProto::default()
    };
    // Adds the next parameter tensor as an initializer; returns its name.
    let mut next_tensor = |graph: &mut GraphProto| -> Result<String> {
        let info = tensors
            .next()
            .ok_or_else(|| OnnxError::Invalid("the plan has fewer tensors than layers".into()))?;
        let values = &parameters[offset..offset + info.len()];
        offset += info.len();
        graph
            .initializer
            .push(float_tensor(&info.name, &info.shape, values));
        Ok(info.name.clone())
    };
    let mut current = "input".to_string();
    let stages = plan.stages.len();
    for (index, stage) in plan.stages.iter().enumerate() {
        let last = index + 1 == stages && output_kind == NetOutput::Logits;
        let out = if last {
            "output".to_string()
        } else {
            format!("x{}", index + 1)
        };
        let name = format!("layer{index}");
        let new_node = match *stage {
            Stage::Dense { .. } => {
                let weight = next_tensor(&mut graph)?;
                let bias = next_tensor(&mut graph)?;
                node(
                    "Gemm",
                    &name,
                    &[&current, &weight, &bias],
                    &out,
                    vec![int_attr("transB", 1)],
                )
            }
            Stage::Conv { geometry, .. } => {
                let weight = next_tensor(&mut graph)?;
                let bias = next_tensor(&mut graph)?;
                let (k, s, p) = (geometry.kernel, geometry.stride, geometry.padding);
                node(
                    "Conv",
                    &name,
                    &[&current, &weight, &bias],
                    &out,
                    vec![
                        ints_attr("kernel_shape", &[k, k]),
                        ints_attr("strides", &[s, s]),
                        ints_attr("pads", &[p, p, p, p]),
                    ],
                )
            }
            Stage::MaxPool { geometry } | Stage::AvgPool { geometry } => {
                let op = if matches!(stage, Stage::MaxPool { .. }) {
                    "MaxPool"
                } else {
                    "AveragePool"
                };
                node(
                    op,
                    &name,
                    &[&current],
                    &out,
                    vec![
                        ints_attr("kernel_shape", &[geometry.size, geometry.size]),
                        ints_attr("strides", &[geometry.stride, geometry.stride]),
                    ],
                )
            }
            Stage::GlobalAvgPool { .. } => {
                node("GlobalAveragePool", &name, &[&current], &out, vec![])
            }
            Stage::Relu { .. } => node("Relu", &name, &[&current], &out, vec![]),
            Stage::Sigmoid { .. } => node("Sigmoid", &name, &[&current], &out, vec![]),
            Stage::Tanh { .. } => node("Tanh", &name, &[&current], &out, vec![]),
            Stage::Flatten { .. } => node(
                "Flatten",
                &name,
                &[&current],
                &out,
                vec![int_attr("axis", 1)],
            ),
            Stage::Dropout { rate, .. } => {
                let ratio = format!("{name}.ratio");
                graph.initializer.push(float_tensor(&ratio, &[], &[rate]));
                node("Dropout", &name, &[&current, &ratio], &out, vec![])
            }
            Stage::BatchNorm { epsilon, .. } => {
                let inputs = [
                    next_tensor(&mut graph)?,
                    next_tensor(&mut graph)?,
                    next_tensor(&mut graph)?,
                    next_tensor(&mut graph)?,
                ];
                node(
                    "BatchNormalization",
                    &name,
                    &[&current, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
                    &out,
                    vec![float_attr("epsilon", epsilon)],
                )
            }
        };
        graph.node.push(new_node);
        current = out;
    }
    if output_kind != NetOutput::Logits {
        let op = if output_kind == NetOutput::Softmax {
            "Softmax"
        } else {
            "LogSoftmax"
        };
        graph.node.push(node(
            op,
            "output_activation",
            &[&current],
            "output",
            vec![int_attr("axis", 1)],
        ));
    }
    if stages == 0 && output_kind == NetOutput::Logits {
        graph
            .node
            .push(node("Identity", "identity", &["input"], "output", vec![]));
    }
    graph.input.push(batched_value("input", &input_dims));
    graph
        .output
        .push(batched_value("output", &[spec.num_classes()]));
    let model = ModelProto {
        ir_version: 7,
        producer_name: "fedquic".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        graph: Some(graph),
        ..ModelProto::default()
    };
    Ok(model.encode_to_vec())
}

/// The `original` ONNX file with its weights replaced by `parameters` (the layout of the
/// model [`super::import_bytes`] makes of it): every node, input and output keeps its
/// name, so the user's serving code keeps working. A bias the original lacked (a Conv
/// or Gemm without one, or a MatMul without its Add) is added, and Dropout nodes are
/// written in inference mode (no `training_mode` input).
pub fn export_imported(original: &[u8], parameters: &[f32]) -> Result<Vec<u8>> {
    let mut model = decode(original)?;
    let mapped = map_model(&model)?;
    let spec = &mapped.imported.spec;
    if parameters.len() != spec.num_params() {
        return Err(TrainError::ParameterCount {
            spec: spec.to_string(),
            expected: spec.num_params(),
            actual: parameters.len(),
        }
        .into());
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| OnnxError::NotOnnx("no graph".into()))?;
    let mut offset = 0;
    let mut inserts = Vec::new();
    let mut written = std::collections::HashSet::new();
    let mut untied = Vec::new();
    for (source, &(rows, cols)) in mapped.sources.iter().zip(&mapped.stored) {
        let len = rows * cols;
        let values = &parameters[offset..offset + len];
        offset += len;
        match source {
            Source::Initializer {
                name,
                transposed,
                reader,
            } => {
                // fedquic keeps [out, in]; a transposed source is stored [in, out].
                let stored: Vec<f32> = if *transposed {
                    let (inputs, outputs) = (rows, cols);
                    let mut out = vec![0.0; len];
                    for o in 0..outputs {
                        for i in 0..inputs {
                            out[i * outputs + o] = values[o * inputs + i];
                        }
                    }
                    out
                } else {
                    values.to_vec()
                };
                let tensor = graph
                    .initializer
                    .iter_mut()
                    .find(|t| t.name == *name)
                    .ok_or_else(|| OnnxError::Invalid(format!("initializer {name:?} vanished")))?;
                if written.insert(name.as_str()) {
                    set_floats(tensor, &stored);
                } else {
                    // Shared with an earlier parameter (merged by value on export):
                    // this reader gets its own copy, as fedquic trained them apart.
                    let mut copy = tensor.clone();
                    copy.name = format!("{name}.fedquic_untied{}", untied.len());
                    set_floats(&mut copy, &stored);
                    let (node, input) = *reader;
                    let slot = graph
                        .node
                        .get_mut(node)
                        .and_then(|n| n.input.get_mut(input))
                        .ok_or_else(|| OnnxError::Invalid("node vanished".into()))?;
                    *slot = copy.name.clone();
                    untied.push(copy);
                }
            }
            Source::Constant { name } => {
                let node = graph
                    .node
                    .iter_mut()
                    .find(|n| n.op_type == "Constant" && n.output.first() == Some(name))
                    .ok_or_else(|| OnnxError::Invalid(format!("constant {name:?} vanished")))?;
                let attribute = node
                    .attribute
                    .iter_mut()
                    .find(|a| a.name == "value" && a.t.is_some())
                    .ok_or_else(|| {
                        OnnxError::UnsupportedGraph(format!(
                            "constant {name:?} is not a tensor value; cannot rewrite it"
                        ))
                    })?;
                if let Some(tensor) = attribute.t.as_mut() {
                    set_floats(tensor, values);
                }
            }
            Source::Missing { name, node, input } => {
                graph.initializer.push(float_tensor(name, &[len], values));
                let node = graph
                    .node
                    .get_mut(*node)
                    .ok_or_else(|| OnnxError::Invalid("node vanished".into()))?;
                if node.input.len() <= *input {
                    node.input.resize(*input + 1, String::new());
                }
                node.input[*input] = name.clone();
            }
            Source::MissingAdd { name, node } => {
                graph.initializer.push(float_tensor(name, &[len], values));
                let matmul = graph
                    .node
                    .get_mut(*node)
                    .ok_or_else(|| OnnxError::Invalid("node vanished".into()))?;
                let output = matmul
                    .output
                    .first()
                    .cloned()
                    .ok_or_else(|| OnnxError::Invalid("a MatMul without output".into()))?;
                let product = format!("{output}.fedquic_product");
                matmul.output[0] = product.clone();
                let add_name = format!("{}.fedquic_bias_add", matmul.name);
                let add = super::proto::node("Add", &add_name, &[&product, name], &output, vec![]);
                inserts.push((*node + 1, add));
            }
        }
    }
    graph.initializer.extend(untied);
    // A training-mode export (PyTorch's way to keep Dropout) would make serving runtimes
    // drop values at random or refuse to run: the exported model is for inference.
    for node in graph.node.iter_mut().filter(|n| n.op_type == "Dropout") {
        node.input.truncate(2);
    }
    // Insert after every index-based edit, last position first.
    inserts.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, add) in inserts {
        graph.node.insert(at, add);
    }
    Ok(model.encode_to_vec())
}
