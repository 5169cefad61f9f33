//! What travels between aggregator and clients: the layout of a model's
//! parameters, named by a spec string.
//!
//! Besides the trainable models of [`ModelSpec`], `vector:N` names a bare
//! parameter vector of N values (one tensor `params`). The built-in engine
//! cannot train it; it serves custom [`Trainer`](../../fedquic_client)
//! engines and the overhead benchmark, where "training" is done elsewhere.

use std::fmt;
use std::str::FromStr;

use fedquic_protocol::TensorMeta;

use crate::error::{Result, TrainError};
use crate::model::{MAX_PARAMS, Model, ModelSpec, TensorInfo};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamLayout {
    Model(ModelSpec),
    Vector(usize),
}

impl FromStr for ParamLayout {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().strip_prefix("vector:") {
            Some(n) => {
                let n: usize = n.trim().parse().map_err(|_| TrainError::InvalidModelSpec {
                    spec: s.to_string(),
                    reason: "vector:N needs a whole number of parameters".into(),
                })?;
                if n == 0 || n as u64 > MAX_PARAMS as u64 {
                    return Err(TrainError::InvalidModelSpec {
                        spec: s.to_string(),
                        reason: format!("vector size must be 1..={MAX_PARAMS}"),
                    });
                }
                Ok(ParamLayout::Vector(n))
            }
            None => Ok(ParamLayout::Model(s.parse()?)),
        }
    }
}

impl fmt::Display for ParamLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamLayout::Model(spec) => spec.fmt(f),
            ParamLayout::Vector(n) => write!(f, "vector:{n}"),
        }
    }
}

impl ParamLayout {
    /// The trainable model, if this is one.
    pub fn model_spec(&self) -> Option<&ModelSpec> {
        match self {
            ParamLayout::Model(spec) => Some(spec),
            ParamLayout::Vector(_) => None,
        }
    }

    pub fn tensors(&self) -> Vec<TensorInfo> {
        match self {
            ParamLayout::Model(spec) => spec.tensors(),
            ParamLayout::Vector(n) => vec![TensorInfo {
                name: "params".into(),
                shape: vec![*n],
            }],
        }
    }

    /// The tensor list as it appears in stream headers.
    pub fn wire_layout(&self) -> Vec<TensorMeta> {
        self.tensors()
            .iter()
            .map(|t| TensorMeta::f32(t.name.clone(), &t.shape))
            .collect()
    }

    pub fn num_params(&self) -> usize {
        match self {
            ParamLayout::Model(spec) => spec.num_params(),
            ParamLayout::Vector(n) => *n,
        }
    }

    /// Seeded initial parameters (zeros for a bare vector).
    pub fn initial_parameters(&self, seed: u64) -> Result<Vec<f32>> {
        match self {
            ParamLayout::Model(spec) => {
                Ok(Model::try_new(spec.clone(), seed)?.parameters().to_vec())
            }
            ParamLayout::Vector(n) => Ok(vec![0.0; *n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_models_and_vectors() {
        let l: ParamLayout = "vector:1000".parse().unwrap();
        assert_eq!(l.num_params(), 1000);
        assert_eq!(l.to_string(), "vector:1000");
        assert!(l.model_spec().is_none());
        assert_eq!(l.wire_layout(), vec![TensorMeta::f32("params", &[1000])]);
        let m: ParamLayout = "mlp:784-200-200-10".parse().unwrap();
        assert_eq!(m.num_params(), 199_210);
        let total: u64 = m.wire_layout().iter().map(|t| t.elements().unwrap()).sum();
        assert_eq!(total, 199_210);
        assert_eq!(m.initial_parameters(1).unwrap().len(), 199_210);
        for bad in ["vector:0", "vector:x", "vector:", "nope:3"] {
            assert!(bad.parse::<ParamLayout>().is_err(), "{bad}");
        }
    }
}
