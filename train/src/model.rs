//! The model (a spec plus its flat parameter vector) and the training / evaluation loops.

use std::fmt;

use rand::seq::SliceRandom;

use crate::backend::pool::{cpu_threads, for_each, part_len, with_cpu_threads};
use crate::backend::{Backend, CpuBackend, LossSum};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::layers::{self, Network, Purpose, Update, Workspace};
use crate::optim::{Optimizer, OptimizerState};
use crate::rng::{derive_seed, seeded};
use crate::threads::gemm_threads;

pub use crate::spec::{MAX_PARAMS, ModelSpec, TensorInfo};

/// Examples per forward pass in [`Model::evaluate`]: large enough for efficient GEMMs,
/// small enough that scratch buffers stay in cache-friendly sizes.
const EVAL_BATCH: usize = 256;

/// Most scratch memory an evaluation, gradient or prediction pass takes: its
/// batch shrinks below [`EVAL_BATCH`] for a model with huge activations
/// (cnn:mnist needs 0.2 MB an example, so 256 fit in 50 MB).
const EVAL_WORKSPACE_BYTES: u64 = 256 << 20;

/// Stream of [`derive_seed`] for dropout masks, so that adding dropout to a model does
/// not change its shuffles.
const DROPOUT_STREAM: u64 = 0x4452_4f50;

/// Hyper-parameters of one [`Model::fit`] call.
///
/// Build one with [`FitConfig::new`] or `FitConfig { epochs: 5, ..Default::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct FitConfig {
    /// Passes over the given examples; at least 1.
    pub epochs: u32,
    /// Examples per step; at least 1. The last step of an epoch may be smaller.
    pub batch_size: usize,
    /// Step size; finite and not negative.
    pub learning_rate: f32,
    /// Seeds the per-epoch shuffles and dropout masks.
    pub seed: u64,
    /// The update rule; its state (momentum, Adam moments) starts fresh in every call.
    pub optimizer: Optimizer,
    /// FedProx: adds `proximal_mu / 2 * ||w - w_start||^2` to the local objective, where
    /// `w_start` are the parameters when `fit` starts (the global model). 0 disables it;
    /// otherwise finite and not negative. Reported losses leave this term out.
    pub proximal_mu: f32,
}

/// One epoch, batches of 32, learning rate 0.01, seed 0, plain SGD, no proximal term.
impl Default for FitConfig {
    fn default() -> FitConfig {
        FitConfig {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.01,
            seed: 0,
            optimizer: Optimizer::default(),
            proximal_mu: 0.0,
        }
    }
}

impl FitConfig {
    /// Plain SGD without a proximal term.
    pub fn new(epochs: u32, batch_size: usize, learning_rate: f32, seed: u64) -> FitConfig {
        FitConfig {
            epochs,
            batch_size,
            learning_rate,
            seed,
            ..FitConfig::default()
        }
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(TrainError::InvalidConfig(
                "epochs must be at least 1".to_string(),
            ));
        }
        if self.batch_size == 0 {
            return Err(TrainError::InvalidConfig(
                "batch_size must be at least 1".to_string(),
            ));
        }
        if !self.learning_rate.is_finite() || self.learning_rate < 0.0 {
            return Err(TrainError::InvalidConfig(format!(
                "learning_rate must be finite and not negative, got {}",
                self.learning_rate
            )));
        }
        if !self.proximal_mu.is_finite() || self.proximal_mu < 0.0 {
            return Err(TrainError::InvalidConfig(format!(
                "proximal_mu must be finite and not negative, got {}",
                self.proximal_mu
            )));
        }
        self.optimizer.validate()
    }
}

/// What one [`Model::fit`] call saw.
#[derive(Clone, Debug, PartialEq)]
pub struct FitStats {
    /// Examples per epoch.
    pub examples: usize,
    /// Mean training loss over the last epoch (each example's loss taken just before the
    /// step that used it; cross-entropy only, without the proximal term).
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
    /// A freshly initialised model: weights of layers followed by ReLU (convolutions and
    /// hidden dense layers) are He/Kaiming uniform (`±sqrt(6 / fan_in)`), the output
    /// layer's Glorot uniform (`±sqrt(6 / (fan_in + fan_out))`), biases zero. Same spec
    /// and seed give the same bits.
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
        let plan = spec.plan()?;
        // Fix the GEMM thread default while the process is most likely still starting up.
        gemm_threads();
        let network = Network::new(&plan);
        let params = network.initial_parameters(&mut seeded(seed));
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

    /// Minibatch training on the examples `indices` of `data` with `cfg.optimizer`,
    /// reshuffled every epoch by an RNG seeded from `cfg.seed`. Repeated indices are
    /// trained on repeatedly.
    ///
    /// On any error, including a loss or parameter becoming non-finite
    /// ([`TrainError::Diverged`]), the parameters are restored to what they were before
    /// the call.
    pub fn fit(&mut self, data: &Dataset, indices: &[usize], cfg: &FitConfig) -> Result<FitStats> {
        self.fit_on(&CpuBackend, data, indices, cfg)
    }

    /// [`Model::fit`] on `backend`: the same loop (written once over [`Backend`]), with
    /// the parameters uploaded once, resident in backend memory for all epochs together
    /// with the optimizer state, and downloaded once at the end.
    pub fn fit_on<B: Backend>(
        &mut self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        cfg: &FitConfig,
    ) -> Result<FitStats> {
        self.fit_corrected_on(backend, data, indices, cfg, None)
    }

    /// [`Model::fit_on`] with every step's gradient `g` replaced by `g + correction`
    /// (`correction` has one value per parameter, all finite). SCAFFOLD (Karimireddy et
    /// al. 2020) trains with `correction = c - c_i`, the server's control variate minus
    /// the client's. Weight decay, momentum, Adam and the FedProx term all see the
    /// corrected gradient; with plain SGD the correction is one extra
    /// `w -= learning_rate * correction` per step. `None` is exactly [`Model::fit_on`].
    pub fn fit_corrected_on<B: Backend>(
        &mut self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        cfg: &FitConfig,
        correction: Option<&[f32]>,
    ) -> Result<FitStats> {
        cfg.validate()?;
        if let Some(correction) = correction {
            if correction.len() != self.params.len() {
                return Err(TrainError::InvalidConfig(format!(
                    "gradient correction has {} values, the model has {} parameters",
                    correction.len(),
                    self.params.len()
                )));
            }
            if correction.iter().any(|v| !v.is_finite()) {
                return Err(TrainError::InvalidConfig(
                    "gradient correction holds a non-finite value".to_string(),
                ));
            }
        }
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
        gemm_threads();
        // The restore point.
        let initial = self.params.clone();
        let result = self.train(backend, data, indices, cfg, correction);
        let result = match result {
            Ok(_) if self.params.iter().any(|value| !value.is_finite()) => {
                Err(TrainError::Diverged { epoch: cfg.epochs })
            }
            other => other,
        };
        if result.is_err() {
            self.params.copy_from_slice(&initial);
        }
        result
    }

    /// The training loop of [`Model::fit_on`] (inputs validated): uploads the parameters
    /// once, keeps them and the optimizer state in backend memory for every epoch, reads
    /// the loss back once per epoch and downloads the parameters once at the end.
    fn train<B: Backend>(
        &mut self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        cfg: &FitConfig,
        correction: Option<&[f32]>,
    ) -> Result<FitStats> {
        let classes = self.spec.num_classes();
        let num_params = self.params.len();
        let mut order = indices.to_vec();
        let mut shuffle_rng = seeded(cfg.seed);
        let mut dropout_rng = seeded(derive_seed(cfg.seed, DROPOUT_STREAM));
        let capacity = cfg.batch_size.min(order.len());
        let batches_per_epoch = order.len().div_ceil(cfg.batch_size);
        let mut workspace = Workspace::new(backend, &self.network, capacity, Purpose::Train);
        let mut params = backend.zeros(num_params);
        backend.upload(&self.params, backend.dst(&mut params, 0..num_params)?)?;
        // FedProx's anchor: the parameters as `fit` found them.
        let anchor = if cfg.proximal_mu != 0.0 {
            let mut anchor = backend.zeros(num_params);
            backend.copy(
                backend.src(&params, 0..num_params)?,
                backend.dst(&mut anchor, 0..num_params)?,
            )?;
            Some(anchor)
        } else {
            None
        };
        let mut optimizer = OptimizerState::new(
            backend,
            cfg.optimizer,
            cfg.learning_rate,
            cfg.proximal_mu,
            num_params,
        );
        let fused_decay = optimizer.fused_weight_decay();
        // SCAFFOLD's gradient correction, uploaded once.
        let correction = match correction {
            Some(host) => {
                let mut buffer = backend.zeros(num_params);
                backend.upload(host, backend.dst(&mut buffer, 0..num_params)?)?;
                Some(buffer)
            }
            None => None,
        };
        // Only the unfused rules need a gradient buffer.
        let mut grads = backend.zeros(match fused_decay {
            Some(_) => 0,
            None => num_params,
        });
        // [loss sum, correct] per batch of an epoch, read back once per epoch.
        let mut stats = backend.zeros(2 * batches_per_epoch);
        let mut stats_host = vec![0.0f32; 2 * batches_per_epoch];
        let mut last_epoch = LossSum::default();

        for epoch in 0..cfg.epochs {
            order.shuffle(&mut shuffle_rng);
            for (batch_number, chunk) in order.chunks(cfg.batch_size).enumerate() {
                let batch = workspace.load_batch(backend, data, chunk, classes)?;
                layers::forward(
                    backend,
                    &self.network,
                    &params,
                    &mut workspace,
                    batch,
                    Some(&mut dropout_rng),
                    None,
                )?;
                let slot = 2 * batch_number..2 * batch_number + 2;
                layers::loss(
                    backend,
                    &self.network,
                    &mut workspace,
                    batch,
                    Some(1.0 / batch as f32),
                    backend.dst(&mut stats, slot)?,
                )?;
                match fused_decay {
                    Some(weight_decay) => {
                        let update = Update::Sgd {
                            params: &mut params,
                            learning_rate: cfg.learning_rate,
                            weight_decay,
                        };
                        layers::backward(backend, &self.network, &mut workspace, batch, update)?;
                        if let Some(correction) = &correction {
                            // Plain SGD: w -= lr * (g + correction), the g part fused above.
                            backend.sum_rows(
                                backend.src(correction, 0..num_params)?,
                                1,
                                -cfg.learning_rate,
                                1.0,
                                backend.dst(&mut params, 0..num_params)?,
                            )?;
                        }
                    }
                    None => {
                        let update = Update::Store {
                            params: &params,
                            grads: &mut grads,
                            accumulate: false,
                        };
                        layers::backward(backend, &self.network, &mut workspace, batch, update)?;
                        if let Some(correction) = &correction {
                            backend.sum_rows(
                                backend.src(correction, 0..num_params)?,
                                1,
                                1.0,
                                1.0,
                                backend.dst(&mut grads, 0..num_params)?,
                            )?;
                        }
                        optimizer.step(
                            backend,
                            &mut params,
                            &grads,
                            anchor.as_ref(),
                            num_params,
                        )?;
                    }
                }
                layers::restore_frozen_on(backend, &self.network, &mut params, &self.params)?;
                backend.flush()?;
            }
            backend.download(backend.src(&stats, 0..stats_host.len())?, &mut stats_host)?;
            last_epoch = sum_stats(&stats_host);
            // A non-finite loss means the parameters have diverged (checked per epoch so
            // that a device backend never waits for a read-back inside an epoch).
            if !last_epoch.loss.is_finite() {
                return Err(TrainError::Diverged { epoch: epoch + 1 });
            }
            // Progress for whoever waits on a long task (the task's own
            // summary line covers a single epoch).
            if cfg.epochs > 1 {
                let seen = order.len().max(1) as f64;
                tracing::info!(
                    epoch = epoch + 1,
                    of = cfg.epochs,
                    loss = format!("{:.4}", last_epoch.loss / seen),
                    accuracy = format!("{:.4}", last_epoch.correct as f64 / seen),
                    "epoch done"
                );
            }
        }
        backend.download(backend.src(&params, 0..num_params)?, &mut self.params)?;
        let examples = order.len();
        Ok(FitStats {
            examples,
            loss: (last_epoch.loss / examples as f64) as f32,
            accuracy: (last_epoch.correct as f64 / examples as f64) as f32,
        })
    }

    /// Examples per pass of an evaluation, gradient or prediction: [`EVAL_BATCH`], or
    /// fewer where that many would take more than [`EVAL_WORKSPACE_BYTES`].
    pub(crate) fn eval_batch(&self, purpose: Purpose) -> usize {
        let per_example = self.network.workspace_values(1, purpose).saturating_mul(4);
        let fit = EVAL_WORKSPACE_BYTES / per_example.max(1);
        EVAL_BATCH.min(usize::try_from(fit.max(1)).unwrap_or(EVAL_BATCH))
    }

    /// Mean softmax cross-entropy and accuracy over the examples `indices` of `data`
    /// (dropout off), on the CPU.
    pub fn evaluate(&self, data: &Dataset, indices: &[usize]) -> Result<EvalStats> {
        self.evaluate_on(&CpuBackend, data, indices)
    }

    /// [`Model::evaluate`] on `backend`.
    pub fn evaluate_on<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
    ) -> Result<EvalStats> {
        self.evaluate_batched_on(backend, data, indices, self.eval_batch(Purpose::Evaluate))
    }

    /// [`Model::evaluate_on`] with forward passes of `batch_size` examples (at least 1)
    /// instead of 256: for measuring inference at a given batch size. On the CPU with
    /// several threads, each thread runs whole forward passes over its share of every
    /// batch (evaluation split by examples); otherwise one pass per batch, whose
    /// operations the backend may split itself.
    pub fn evaluate_batched_on<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<EvalStats> {
        if batch_size == 0 {
            return Err(TrainError::InvalidConfig(
                "batch_size must be at least 1".to_string(),
            ));
        }
        if let Some(cpu) = backend.as_cpu()
            && let Some(stats) = self.evaluate_in_parts(cpu, data, indices, batch_size)?
        {
            return Ok(stats);
        }
        self.loss_pass(backend, data, indices, false, batch_size)
            .map(|(stats, _)| stats)
    }

    /// An evaluation split by examples instead of by operations: every batch is cut
    /// into one contiguous share of rows per thread, and each thread runs the whole
    /// network (every layer, the loss) on its shares with nothing else split. One
    /// fork-join for the whole evaluation instead of one per operation, and no pass
    /// (a bias, a ReLU, the loss) left on one thread while the other waits: two
    /// one-thread processes at half the batch had evaluated the 2NN 16-25% faster than
    /// one process splitting each operation in two. Each row's outputs are computed as
    /// on one thread at that share's size; the batch's loss is summed per share, so the
    /// mean loss can differ from one thread's in the last bits (the same for a given
    /// thread count). `None` when the CPU has one thread for this caller or a batch has
    /// too few rows to share.
    fn evaluate_in_parts(
        &self,
        backend: &CpuBackend,
        data: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<Option<EvalStats>> {
        /// Fewest rows a share may have: one register block of the dense kernels.
        const MIN_SHARE: usize = 16;
        let batch = batch_size.min(indices.len());
        let threads = cpu_threads().min(batch / MIN_SHARE);
        if threads < 2 {
            return Ok(None);
        }
        self.check_dataset(data)?;
        gemm_threads();
        let share = part_len(batch, threads, MIN_SHARE);
        let parts = batch.div_ceil(share);
        let mut outcomes: Vec<Result<Vec<f32>>> = (0..parts).map(|_| Ok(Vec::new())).collect();
        for_each(outcomes.iter_mut().enumerate(), |(part, outcome)| {
            let rows = part * share..(part + 1) * share;
            *outcome = with_cpu_threads(1, || {
                self.evaluate_share(backend, data, indices, batch_size, rows)
            });
        });
        let shares = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
        // Shares in order: the same sum for a given thread count.
        Ok(Some(mean_stats(&shares.concat(), indices.len())))
    }

    /// One thread's part of [`Model::evaluate_in_parts`]: the rows `rows` of every batch
    /// of `batch_size` examples of `indices`, one `[loss sum, correct]` pair per batch
    /// (zeros for a batch too short to reach `rows`).
    fn evaluate_share(
        &self,
        backend: &CpuBackend,
        data: &Dataset,
        indices: &[usize],
        batch_size: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let batches = indices.len().div_ceil(batch_size);
        let mut stats = vec![0.0f32; 2 * batches];
        let mut workspace = Workspace::new(backend, &self.network, rows.len(), Purpose::Evaluate);
        let in_place = self.network.reads_input_in_place();
        backend.with_frozen_params(&self.params, || -> Result<()> {
            for (chunk, slot) in indices.chunks(batch_size).zip(stats.chunks_exact_mut(2)) {
                let Some(tail) = chunk.get(rows.start..).filter(|tail| !tail.is_empty()) else {
                    continue;
                };
                let share = &tail[..tail.len().min(rows.len())];
                let batch = self.forward_batch(
                    backend,
                    &self.params,
                    &mut workspace,
                    data,
                    share,
                    in_place,
                )?;
                layers::loss(backend, &self.network, &mut workspace, batch, None, slot)?;
            }
            Ok(())
        })?;
        Ok(stats)
    }

    /// Loads the examples `chunk` (read where they lie when `in_place` allows and they
    /// are consecutive) and runs the forward pass; returns the batch size.
    fn forward_batch<B: Backend>(
        &self,
        backend: &B,
        params: &B::Buffer,
        workspace: &mut Workspace<B>,
        data: &Dataset,
        chunk: &[usize],
        in_place: bool,
    ) -> Result<usize> {
        let classes = self.spec.num_classes();
        let input = match (in_place, consecutive_rows(chunk)) {
            (true, Some(rows)) => rows
                .start
                .checked_mul(data.dim)
                .zip(rows.end.checked_mul(data.dim))
                .and_then(|(start, end)| data.features.get(start..end))
                .and_then(|rows| backend.host_src(rows)),
            _ => None,
        };
        let batch = match input {
            Some(_) => workspace.load_labels(backend, data, chunk, classes)?,
            None => workspace.load_batch(backend, data, chunk, classes)?,
        };
        layers::forward(
            backend,
            &self.network,
            params,
            workspace,
            batch,
            None,
            input,
        )?;
        Ok(batch)
    }

    /// [`Model::evaluate`] over every example of `data`.
    pub fn evaluate_all(&self, data: &Dataset) -> Result<EvalStats> {
        let indices: Vec<usize> = (0..data.len()).collect();
        self.evaluate(data, &indices)
    }

    /// Loss and accuracy over `indices` together with the gradient of the mean loss with
    /// respect to every parameter (flat, same layout as [`Model::parameters`]; dropout off).
    pub fn gradient(&self, data: &Dataset, indices: &[usize]) -> Result<(EvalStats, Vec<f32>)> {
        self.loss_pass(
            &CpuBackend,
            data,
            indices,
            true,
            self.eval_batch(Purpose::Train),
        )
    }

    /// [`Model::gradient`] on `backend`.
    pub fn gradient_on<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
    ) -> Result<(EvalStats, Vec<f32>)> {
        self.loss_pass(
            backend,
            data,
            indices,
            true,
            self.eval_batch(Purpose::Train),
        )
    }

    /// Forward passes in batches of `batch_size`, optionally accumulating the gradient.
    fn loss_pass<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        indices: &[usize],
        with_gradient: bool,
        batch_size: usize,
    ) -> Result<(EvalStats, Vec<f32>)> {
        self.check_dataset(data)?;
        if indices.is_empty() {
            return Err(TrainError::NoExamples);
        }
        gemm_threads();
        let examples = indices.len();
        let num_params = self.params.len();
        let purpose = if with_gradient {
            Purpose::Train
        } else {
            Purpose::Evaluate
        };
        let mut workspace =
            Workspace::new(backend, &self.network, batch_size.min(examples), purpose);
        let mut params = backend.zeros(num_params);
        backend.upload(&self.params, backend.dst(&mut params, 0..num_params)?)?;
        let mut grads = backend.zeros(if with_gradient { num_params } else { 0 });
        let batches = examples.div_ceil(batch_size);
        let mut stats = backend.zeros(2 * batches);
        let scale = with_gradient.then_some(1.0 / examples as f32);
        // Without a gradient, a batch of consecutive examples is read where it lies (the
        // copy was 8% of the 2NN's inference) when the backend can and the network allows.
        let in_place = !with_gradient && self.network.reads_input_in_place();
        // The parameters stay as they are for the whole pass.
        backend.with_frozen_params(&params, || -> Result<()> {
            for (batch_number, chunk) in indices.chunks(batch_size).enumerate() {
                let batch =
                    self.forward_batch(backend, &params, &mut workspace, data, chunk, in_place)?;
                let slot = 2 * batch_number..2 * batch_number + 2;
                let slot = backend.dst(&mut stats, slot)?;
                layers::loss(backend, &self.network, &mut workspace, batch, scale, slot)?;
                if with_gradient {
                    let update = Update::Store {
                        params: &params,
                        grads: &mut grads,
                        accumulate: batch_number > 0,
                    };
                    layers::backward(backend, &self.network, &mut workspace, batch, update)?;
                }
                backend.flush()?;
            }
            Ok(())
        })?;
        let mut stats_host = vec![0.0f32; 2 * batches];
        backend.download(backend.src(&stats, 0..2 * batches)?, &mut stats_host)?;
        let stats = mean_stats(&stats_host, examples);
        let mut gradient = Vec::new();
        if with_gradient {
            gradient = vec![0.0f32; num_params];
            backend.download(backend.src(&grads, 0..num_params)?, &mut gradient)?;
        }
        Ok((stats, gradient))
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

/// The examples `chunk` as a range of rows when they are consecutive and non-empty
/// (`None` too for indices at the end of `usize`'s range: they are checked later).
fn consecutive_rows(chunk: &[usize]) -> Option<std::ops::Range<usize>> {
    let first = *chunk.first()?;
    let end = first.checked_add(chunk.len())?;
    let consecutive = chunk.iter().enumerate().all(|(i, &row)| first + i == row);
    consecutive.then_some(first..end)
}

/// Adds up per-batch `[loss sum, correct]` pairs (in f64: an epoch has many batches).
fn sum_stats(stats: &[f32]) -> LossSum {
    stats
        .chunks_exact(2)
        .fold(LossSum::default(), |total, pair| LossSum {
            loss: total.loss + f64::from(pair[0]),
            correct: total.correct + pair[1] as usize,
        })
}

/// Mean loss and accuracy over `examples` from per-batch `[loss sum, correct]` pairs.
fn mean_stats(stats: &[f32], examples: usize) -> EvalStats {
    let total = sum_stats(stats);
    EvalStats {
        examples,
        loss: (total.loss / examples as f64) as f32,
        accuracy: (total.correct as f64 / examples as f64) as f32,
    }
}

#[path = "model_predict.rs"]
mod predict;

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;

impl crate::backend::Engine {
    /// [`Model::fit_corrected_on`] on this engine (SCAFFOLD's corrected local steps).
    pub fn fit_corrected(
        &self,
        model: &mut Model,
        data: &Dataset,
        indices: &[usize],
        cfg: &FitConfig,
        correction: &[f32],
    ) -> Result<FitStats> {
        match self {
            crate::backend::Engine::Cpu(backend) => {
                model.fit_corrected_on(backend, data, indices, cfg, Some(correction))
            }
            #[cfg(feature = "wgpu")]
            crate::backend::Engine::Wgpu(backend) => {
                model.fit_corrected_on(backend.as_ref(), data, indices, cfg, Some(correction))
            }
        }
    }
}

/// Local steps one [`Model::fit`] call takes: `epochs * ceil(examples / batch_size)`
/// (SCAFFOLD's `K`).
pub fn local_steps(examples: usize, cfg: &FitConfig) -> u64 {
    let batches = examples.div_ceil(cfg.batch_size.max(1)) as u64;
    batches.saturating_mul(u64::from(cfg.epochs))
}

#[cfg(test)]
mod correction_tests {
    use super::*;
    use crate::data::Dataset;

    fn data() -> Dataset {
        let features: Vec<f32> = (0..40).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let labels: Vec<u8> = (0..10).map(|i| (i % 3) as u8).collect();
        Dataset::new(features, labels, 4, 3).unwrap()
    }

    /// One full-batch step with the correction is `w - lr * (g + correction)`, on the
    /// fused plain-SGD path and on the momentum path alike (the first momentum step's
    /// velocity is the corrected gradient itself).
    #[test]
    fn a_corrected_step_adds_the_correction_to_the_gradient() {
        let data = data();
        let indices: Vec<usize> = (0..10).collect();
        for optimizer in [
            Optimizer::sgd(),
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.0,
            },
        ] {
            let mut model = Model::new("logreg:4-3".parse().unwrap(), 3);
            let (_, gradient) = model.gradient(&data, &indices).unwrap();
            let correction: Vec<f32> = (0..gradient.len()).map(|i| i as f32 * 0.1 - 0.7).collect();
            let expected: Vec<f32> = model
                .parameters()
                .iter()
                .zip(gradient.iter().zip(&correction))
                .map(|(w, (g, c))| w - 0.5 * (g + c))
                .collect();
            let cfg = FitConfig {
                epochs: 1,
                batch_size: 10,
                learning_rate: 0.5,
                optimizer,
                ..FitConfig::default()
            };
            model
                .fit_corrected_on(&CpuBackend, &data, &indices, &cfg, Some(&correction))
                .unwrap();
            for (actual, expected) in model.parameters().iter().zip(&expected) {
                assert!(
                    (actual - expected).abs() < 1e-5,
                    "{optimizer:?}: {actual} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn a_bad_correction_is_refused_and_steps_are_counted() {
        let data = data();
        let mut model = Model::new("logreg:4-3".parse().unwrap(), 3);
        let before = model.parameters().to_vec();
        let cfg = FitConfig::new(1, 4, 0.1, 0);
        let short = vec![0.0; 3];
        assert!(
            model
                .fit_corrected_on(&CpuBackend, &data, &[0, 1], &cfg, Some(&short))
                .is_err()
        );
        let mut nan = vec![0.0; before.len()];
        nan[2] = f32::NAN;
        assert!(
            model
                .fit_corrected_on(&CpuBackend, &data, &[0, 1], &cfg, Some(&nan))
                .is_err()
        );
        assert_eq!(model.parameters(), &before[..]);
        // 10 examples in batches of 4: 3 steps an epoch.
        assert_eq!(local_steps(10, &FitConfig::new(2, 4, 0.1, 0)), 6);
    }
}
