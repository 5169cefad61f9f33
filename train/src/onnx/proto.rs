//! Small helpers over tract's ONNX protobuf types: attributes, tensor data, builders.

use tract_onnx::pb::{
    AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::Dimension,
    tensor_shape_proto::dimension::Value as DimValue, type_proto,
};

use super::{OnnxError, Result};
use crate::spec::MAX_PARAMS;

pub(crate) fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).map_or(default, |a| a.i)
}

pub(crate) fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attribute(node, name).map_or(default, |a| a.f)
}

pub(crate) fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attribute(node, name).map(|a| a.ints.clone())
}

pub(crate) fn attr_string(node: &NodeProto, name: &str) -> Option<String> {
    attribute(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// Element count of `dims`, refusing negative or absurd sizes.
pub(crate) fn element_count(name: &str, dims: &[i64]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .filter(|&n| n <= MAX_PARAMS)
        .ok_or_else(|| OnnxError::Invalid(format!("tensor {name:?} has bad dimensions {dims:?}")))
}

fn check_location(tensor: &TensorProto) -> Result<()> {
    if tensor.data_location == Some(1) || !tensor.external_data.is_empty() {
        return Err(OnnxError::UnsupportedGraph(format!(
            "tensor {:?} keeps its data in an external file; save the model with the weights \
             inside (onnx.save(model, path, save_as_external_data=False))",
            tensor.name
        )));
    }
    Ok(())
}

/// The values of a float tensor (`raw_data` little-endian, or `float_data`).
pub(crate) fn floats(tensor: &TensorProto) -> Result<Vec<f32>> {
    check_location(tensor)?;
    if tensor.data_type != DataType::Float as i32 {
        return Err(OnnxError::UnsupportedGraph(format!(
            "tensor {:?} has data type {}; fedquic trains float32 weights",
            tensor.name, tensor.data_type
        )));
    }
    let count = element_count(&tensor.name, &tensor.dims)?;
    let values: Vec<f32> = if !tensor.raw_data.is_empty() {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        tensor.float_data.clone()
    };
    if values.len() != count || (!tensor.raw_data.is_empty() && tensor.raw_data.len() != 4 * count)
    {
        return Err(OnnxError::Invalid(format!(
            "tensor {:?} should hold {count} values, has {}",
            tensor.name,
            values.len()
        )));
    }
    Ok(values)
}

/// The values of an integer tensor (int64 or int32; `raw_data` or the typed field).
pub(crate) fn ints(tensor: &TensorProto) -> Result<Vec<i64>> {
    check_location(tensor)?;
    let count = element_count(&tensor.name, &tensor.dims)?;
    let values: Vec<i64> = match DataType::try_from(tensor.data_type) {
        Ok(DataType::Int64) if !tensor.raw_data.is_empty() => tensor
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        Ok(DataType::Int64) => tensor.int64_data.clone(),
        Ok(DataType::Int32) if !tensor.raw_data.is_empty() => tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Ok(DataType::Int32) => tensor.int32_data.iter().map(|&v| i64::from(v)).collect(),
        _ => {
            return Err(OnnxError::UnsupportedGraph(format!(
                "tensor {:?} should hold integers (data type {})",
                tensor.name, tensor.data_type
            )));
        }
    };
    if values.len() != count {
        return Err(OnnxError::Invalid(format!(
            "tensor {:?} should hold {count} values, has {}",
            tensor.name,
            values.len()
        )));
    }
    Ok(values)
}

/// Replaces a float tensor's values (same count), as little-endian `raw_data`.
pub(crate) fn set_floats(tensor: &mut TensorProto, values: &[f32]) {
    tensor.data_type = DataType::Float as i32;
    tensor.float_data.clear();
    tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

pub(crate) fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    let mut tensor = TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        ..TensorProto::default()
    };
    set_floats(&mut tensor, values);
    tensor
}

pub(crate) fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

pub(crate) fn float_attr(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..AttributeProto::default()
    }
}

pub(crate) fn ints_attr(name: &str, values: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.iter().map(|&v| v as i64).collect(),
        ..AttributeProto::default()
    }
}

pub(crate) fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attributes: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: attributes,
        ..NodeProto::default()
    }
}

/// A float tensor value with a symbolic batch dimension `batch` first.
pub(crate) fn batched_value(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension {
        value: Some(DimValue::DimParam("batch".to_string())),
        ..Dimension::default()
    }];
    dim.extend(dims.iter().map(|&d| Dimension {
        value: Some(DimValue::DimValue(d as i64)),
        ..Dimension::default()
    }));
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}
