//! Model specs, the flat parameter vector, and the SGD training / evaluation loops.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::layers::{self, GradientSink, Network, Purpose, Workspace};
use crate::rng::{SeededRng, seeded};
use rand::RngExt;

/// Largest total parameter count a spec may ask for: beyond this a flat `f32` vector
/// (8 GiB) is surely a typo, and counts stay well inside `u32`/`usize` arithmetic.
pub const MAX_PARAMS: usize = 1 << 31;

/// Examples per forward pass in [`Model::evaluate`]: large enough for efficient GEMMs,
/// small enough that scratch buffers stay in cache-friendly sizes.
const EVAL_BATCH: usize = 256;

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

/// Architecture of a classifier, written as a string like `logreg:784-10` or
/// `mlp:784-200-200-10` (see [`FromStr`](#impl-FromStr-for-ModelSpec)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// Multinomial logistic regression: one dense layer, `inputs -> classes`.
    LogReg { inputs: usize, classes: usize },
    /// Dense layers with ReLU between them: `layers = [in, h1, ..., out]`, at least 3 entries.
    Mlp { layers: Vec<usize> },
}

impl ModelSpec {
    /// All layer widths, input first, number of classes last.
    pub fn layer_sizes(&self) -> Vec<usize> {
        match self {
            ModelSpec::LogReg { inputs, classes } => vec![*inputs, *classes],
            ModelSpec::Mlp { layers } => layers.clone(),
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
            _ => Some(format!(
                "the model would have more than 2^31 ({MAX_PARAMS}) parameters"
            )),
        }
    }

    /// The tensors of the flat parameter vector, in order: for each dense layer `i`
    /// (counting from 0 at the input), `dense{i}.weight` with shape `[out, in]`
    /// (row-major, one row per output unit, like PyTorch's `nn.Linear`), then
    /// `dense{i}.bias` with shape `[out]`.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.layer_sizes()
            .windows(2)
            .enumerate()
            .flat_map(|(index, pair)| {
                [
                    TensorInfo {
                        name: format!("dense{index}.weight"),
                        shape: vec![pair[1], pair[0]],
                    },
                    TensorInfo {
                        name: format!("dense{index}.bias"),
                        shape: vec![pair[1]],
                    },
                ]
            })
            .collect()
    }

    /// Total number of parameters (saturates instead of overflowing for absurd hand-built specs).
    pub fn num_params(&self) -> usize {
        self.layer_sizes().windows(2).fold(0usize, |total, pair| {
            total.saturating_add(pair[0].saturating_mul(pair[1]).saturating_add(pair[1]))
        })
    }

    /// Number of input features.
    pub fn input_dim(&self) -> usize {
        match self {
            ModelSpec::LogReg { inputs, .. } => *inputs,
            ModelSpec::Mlp { layers } => layers.first().copied().unwrap_or(0),
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        match self {
            ModelSpec::LogReg { classes, .. } => *classes,
            ModelSpec::Mlp { layers } => layers.last().copied().unwrap_or(0),
        }
    }
}

/// Parses `logreg:IN-CLASSES` or `mlp:IN-H1-...-CLASSES` (at least one hidden layer).
/// Sizes must be at least 1, classes at least 2, and the total at most 2^31 parameters.
impl FromStr for ModelSpec {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<ModelSpec> {
        let invalid = |reason: String| TrainError::InvalidModelSpec {
            spec: text.to_string(),
            reason,
        };
        let (kind, sizes) = text.trim().split_once(':').ok_or_else(|| {
            invalid(
                "expected KIND:SIZES, e.g. \"logreg:784-10\" or \"mlp:784-200-200-10\"".to_string(),
            )
        })?;
        let sizes = sizes
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
        let spec = match kind.trim().to_ascii_lowercase().as_str() {
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
                    "unknown model kind {other:?}; expected \"logreg\" or \"mlp\""
                )));
            }
        };
        match spec.problem() {
            Some(reason) => Err(invalid(reason)),
            None => Ok(spec),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, sizes) = match self {
            ModelSpec::LogReg { inputs, classes } => ("logreg", vec![*inputs, *classes]),
            ModelSpec::Mlp { layers } => ("mlp", layers.clone()),
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

/// Hyper-parameters of one [`Model::fit`] call.
#[derive(Clone, Debug, PartialEq)]
pub struct FitConfig {
    /// Passes over the given examples; at least 1.
    pub epochs: u32,
    /// Examples per SGD step; at least 1. The last step of an epoch may be smaller.
    pub batch_size: usize,
    /// SGD step size; finite and not negative.
    pub learning_rate: f32,
    /// Seeds the per-epoch shuffles.
    pub seed: u64,
}

/// What one [`Model::fit`] call saw.
#[derive(Clone, Debug, PartialEq)]
pub struct FitStats {
    /// Examples per epoch.
    pub examples: usize,
    /// Mean training loss over the last epoch (each example's loss taken just before the
    /// step that used it).
    pub loss: f32,
    /// Training accuracy over the last epoch, measured the same way.
    pub accuracy: f32,
}

/// Loss and accuracy of a model on some examples.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalStats {
    pub examples: usize,
    /// Mean softmax cross-entropy (natural log).
    pub loss: f32,
    /// Fraction of examples whose highest logit is the label (first maximum wins ties).
    pub accuracy: f32,
}

/// A classifier: a spec plus one flat `f32` parameter vector (layout in the crate docs).
#[derive(Clone)]
pub struct Model {
    spec: ModelSpec,
    network: Network,
    params: Vec<f32>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("spec", &format_args!("{}", self.spec))
            .field("num_params", &self.params.len())
            .finish()
    }
}

impl Model {
    /// A freshly initialised model: weights of layers followed by ReLU are He/Kaiming
    /// uniform (`±sqrt(6 / fan_in)`), the output layer's Glorot uniform
    /// (`±sqrt(6 / (fan_in + fan_out))`), biases zero. Same spec and seed give the same bits.
    ///
    /// # Panics
    /// If the spec is invalid, which only a hand-built spec can be (parsed ones are
    /// checked); use [`Model::try_new`] to get an error instead.
    pub fn new(spec: ModelSpec, seed: u64) -> Model {
        match Model::try_new(spec, seed) {
            Ok(model) => model,
            Err(error) => panic!("Model::new: {error}"),
        }
    }

    /// Like [`Model::new`] but returns an error for an invalid spec.
    pub fn try_new(spec: ModelSpec, seed: u64) -> Result<Model> {
        spec.validate()?;
        let network = Network::new(&spec.layer_sizes());
        let mut params = vec![0.0f32; network.num_params];
        let mut rng = seeded(seed);
        for layer in &network.layers {
            let fan_in = layer.inputs as f32;
            let bound = if layer.relu {
                (6.0 / fan_in).sqrt()
            } else {
                (6.0 / (fan_in + layer.outputs as f32)).sqrt()
            };
            for weight in &mut params[layer.weight_offset..layer.bias_offset] {
                *weight = rng.random_range(-bound..bound);
            }
        }
        Ok(Model {
            spec,
            network,
            params,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// All parameters as one flat slice: tensors in [`ModelSpec::tensors`] order, each
    /// row-major, concatenated.
    pub fn parameters(&self) -> &[f32] {
        &self.params
    }

    /// Replaces all parameters (same layout as [`Model::parameters`]). Rejects a wrong
    /// length or any NaN/infinite value, leaving the model unchanged.
    pub fn set_parameters(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.params.len() {
            return Err(TrainError::ParameterCount {
                spec: self.spec.to_string(),
                expected: self.params.len(),
                actual: flat.len(),
            });
        }
        if let Some(index) = flat.iter().position(|value| !value.is_finite()) {
            return Err(TrainError::NonFiniteParameter {
                index,
                value: flat[index],
            });
        }
        self.params.copy_from_slice(flat);
        Ok(())
    }

    /// Minibatch SGD on the examples `indices` of `data`, reshuffled every epoch by an RNG
    /// seeded from `cfg.seed`. Repeated indices are trained on repeatedly.
    ///
    /// If the loss or a parameter becomes non-finite, the parameters are restored to what
    /// they were before the call and [`TrainError::Diverged`] is returned.
    pub fn fit(&mut self, data: &Dataset, indices: &[usize], cfg: &FitConfig) -> Result<FitStats> {
        check_fit_config(cfg)?;
        self.check_dataset(data)?;
        if indices.is_empty() {
            return Err(TrainError::NoExamples);
        }
        let classes = self.spec.num_classes();
        // Validate every index and label up front so a bad one cannot leave the model
        // half-trained.
        for &index in indices {
            let label = *data.labels.get(index).ok_or(TrainError::IndexOutOfRange {
                index,
                len: data.len(),
            })?;
            if usize::from(label) >= classes {
                return Err(TrainError::LabelOutOfRange {
                    index,
                    label,
                    classes,
                });
            }
        }

        let mut order = indices.to_vec();
        let mut rng: SeededRng = seeded(cfg.seed);
        let mut workspace = Workspace::new(
            &self.network,
            cfg.batch_size.min(order.len()),
            Purpose::Train,
        );
        let initial = self.params.clone();
        let mut last_epoch = layers::BatchOutcome::default();

        for epoch in 0..cfg.epochs {
            order.shuffle(&mut rng);
            let mut epoch_outcome = layers::BatchOutcome::default();
            for chunk in order.chunks(cfg.batch_size) {
                let batch = match workspace.load_batch(data, chunk, classes) {
                    Ok(batch) => batch,
                    Err(error) => {
                        self.params.copy_from_slice(&initial);
                        return Err(error);
                    }
                };
                layers::forward(&self.network, &self.params, &mut workspace, batch)?;
                let outcome = layers::softmax_cross_entropy(
                    &self.network,
                    &mut workspace,
                    batch,
                    Some(1.0 / batch as f32),
                );
                if !outcome.loss_sum.is_finite() {
                    self.params.copy_from_slice(&initial);
                    return Err(TrainError::Diverged { epoch: epoch + 1 });
                }
                let sink = GradientSink::Sgd {
                    params: &mut self.params,
                    learning_rate: cfg.learning_rate,
                };
                layers::backward(&self.network, &mut workspace, batch, sink)?;
                epoch_outcome.loss_sum += outcome.loss_sum;
                epoch_outcome.correct += outcome.correct;
            }
            last_epoch = epoch_outcome;
        }
        if self.params.iter().any(|value| !value.is_finite()) {
            self.params.copy_from_slice(&initial);
            return Err(TrainError::Diverged { epoch: cfg.epochs });
        }
        let examples = order.len();
        Ok(FitStats {
            examples,
            loss: (last_epoch.loss_sum / examples as f64) as f32,
            accuracy: (last_epoch.correct as f64 / examples as f64) as f32,
        })
    }

    /// Mean softmax cross-entropy and accuracy over the examples `indices` of `data`.
    pub fn evaluate(&self, data: &Dataset, indices: &[usize]) -> Result<EvalStats> {
        self.loss_pass(data, indices, false).map(|(stats, _)| stats)
    }

    /// [`Model::evaluate`] over every example of `data`.
    pub fn evaluate_all(&self, data: &Dataset) -> Result<EvalStats> {
        let indices: Vec<usize> = (0..data.len()).collect();
        self.evaluate(data, &indices)
    }

    /// Loss and accuracy over `indices` together with the gradient of the mean loss with
    /// respect to every parameter (flat, same layout as [`Model::parameters`]).
    pub fn gradient(&self, data: &Dataset, indices: &[usize]) -> Result<(EvalStats, Vec<f32>)> {
        self.loss_pass(data, indices, true)
    }

    /// Forward passes in batches of [`EVAL_BATCH`], optionally accumulating the gradient.
    fn loss_pass(
        &self,
        data: &Dataset,
        indices: &[usize],
        with_gradient: bool,
    ) -> Result<(EvalStats, Vec<f32>)> {
        self.check_dataset(data)?;
        if indices.is_empty() {
            return Err(TrainError::NoExamples);
        }
        let classes = self.spec.num_classes();
        let examples = indices.len();
        let purpose = if with_gradient {
            Purpose::Gradient
        } else {
            Purpose::Evaluate
        };
        let mut workspace = Workspace::new(&self.network, EVAL_BATCH.min(examples), purpose);
        let mut total = layers::BatchOutcome::default();
        let scale = with_gradient.then_some(1.0 / examples as f32);
        for (batch_number, chunk) in indices.chunks(EVAL_BATCH).enumerate() {
            let batch = workspace.load_batch(data, chunk, classes)?;
            layers::forward(&self.network, &self.params, &mut workspace, batch)?;
            let outcome =
                layers::softmax_cross_entropy(&self.network, &mut workspace, batch, scale);
            if with_gradient {
                let sink = GradientSink::Store {
                    params: &self.params,
                    accumulate: batch_number > 0,
                };
                layers::backward(&self.network, &mut workspace, batch, sink)?;
            }
            total.loss_sum += outcome.loss_sum;
            total.correct += outcome.correct;
        }
        let stats = EvalStats {
            examples,
            loss: (total.loss_sum / examples as f64) as f32,
            accuracy: (total.correct as f64 / examples as f64) as f32,
        };
        Ok((stats, workspace.gradients))
    }

    /// Checks the dataset's layout and width; labels are checked per used example (in
    /// `fit` up front, in `load_batch` otherwise) against the model's class count, which
    /// is what matters and avoids rescanning a large shared dataset on every call.
    fn check_dataset(&self, data: &Dataset) -> Result<()> {
        data.check_layout()?;
        if data.dim != self.spec.input_dim() {
            return Err(TrainError::DimensionMismatch {
                data: data.dim,
                model: self.spec.input_dim(),
            });
        }
        Ok(())
    }
}

fn check_fit_config(cfg: &FitConfig) -> Result<()> {
    if cfg.epochs == 0 {
        return Err(TrainError::InvalidConfig(
            "epochs must be at least 1".to_string(),
        ));
    }
    if cfg.batch_size == 0 {
        return Err(TrainError::InvalidConfig(
            "batch_size must be at least 1".to_string(),
        ));
    }
    if !cfg.learning_rate.is_finite() || cfg.learning_rate < 0.0 {
        return Err(TrainError::InvalidConfig(format!(
            "learning_rate must be finite and not negative, got {}",
            cfg.learning_rate
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
