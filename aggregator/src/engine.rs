//! The round engine: a deterministic state machine with no I/O.
//!
//! The server shell feeds it events (a client joined or left, an update or
//! evaluation arrived, time passed) together with the current time, and
//! carries out the [`Action`]s it returns, in order. Everything that decides
//! what happens in a round lives here, so it is tested without a network,
//! with thousands of simulated clients.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_protocol::{EvalResult, EvaluateTask, FitInstructions, FitTask, Metrics, ScaffoldTask};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// Shared with the clients' DP clipping, in the privacy crate.
pub use fedquic_privacy::dp::l2_norm;

use crate::coordinator::ReceivedUpdate;
use crate::strategy::{
    FedAvg, FedAvgAccumulator, ModelCheckError, Strategy, StrategyConfig, UpdateInput,
};

/// A client's identity: the name in its certificate.
pub type ClientId = String;

/// The largest example count an update or evaluation result may claim at
/// all; larger claims are refused outright. The weight actually used is
/// further capped by [`UpdatePolicy`].
pub const MAX_EXAMPLES_PER_UPDATE: u64 = 1 << 32;

/// What happens to an update whose L2 norm exceeds the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPolicy {
    /// The update is refused (the client is told why).
    Reject,
    /// The update is scaled down to the bound and kept.
    Clip,
}

/// The gate every update passes before it reaches the accumulator, and the
/// check on the new global model before a round commits. One client with a
/// valid certificate must not be able to take over or destroy the model.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdatePolicy {
    /// A client's weight is `min(num_examples, this)`.
    pub max_examples_per_update: u64,
    /// No client carries more than this share of a round's total weight
    /// (see [`FedAvgAccumulator`]); 1 turns the cap off.
    pub max_weight_share: f64,
    /// Absolute bound on an update's L2 norm.
    pub max_update_norm: Option<f64>,
    /// Bound on an update's L2 norm as a multiple of the median norm of the
    /// previous round's accepted updates (the current round's median is not
    /// known until it closes, and updates are folded as they arrive). When
    /// both bounds are set the smaller one applies.
    pub max_update_norm_median_multiple: Option<f64>,
    pub norm_policy: NormPolicy,
    /// Every parameter of a new global model must be finite and at most this
    /// in absolute value, or the round is not committed.
    pub max_parameter_abs: f64,
    /// Client-reported training losses above this (or negative, or not
    /// finite) are ignored; accuracies must lie in [0, 1].
    pub max_client_loss: f64,
}

impl UpdatePolicy {
    /// The L2 bound on updates given the previous round's (or buffer's)
    /// median norm: the smaller of the absolute bound and the multiple.
    pub fn norm_bound(&self, median_norm: Option<f64>) -> Option<f64> {
        let relative = self
            .max_update_norm_median_multiple
            .zip(median_norm)
            .map(|(m, median)| m * median);
        match (self.max_update_norm, relative) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_examples_per_update: 1_000_000,
            max_weight_share: 0.5,
            max_update_norm: None,
            max_update_norm_median_multiple: Some(10.0),
            norm_policy: NormPolicy::Clip,
            max_parameter_abs: 1e6,
            max_client_loss: 1e6,
        }
    }
}

/// Why an update was refused; each cause is counted under its own name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectCause {
    NoRound,
    Stale,
    WrongTask,
    Duplicate,
    NotSelected,
    ZeroExamples,
    TooManyExamples,
    WrongSize,
    NormBound,
    /// The upload itself was unusable (bad header, wrong layout, non-finite
    /// values, truncated body, too slow); reported by the shell.
    Malformed,
    UploadTimeout,
    UploadBusy,
    /// The strategy refused it (q-FedAvg: an implausible loss; SCAFFOLD: a
    /// bad control variate).
    Strategy,
}

impl RejectCause {
    /// Every cause, so that counters can list all of them from the start.
    pub const ALL: [RejectCause; 13] = [
        RejectCause::NoRound,
        RejectCause::Stale,
        RejectCause::WrongTask,
        RejectCause::Duplicate,
        RejectCause::NotSelected,
        RejectCause::ZeroExamples,
        RejectCause::TooManyExamples,
        RejectCause::WrongSize,
        RejectCause::NormBound,
        RejectCause::Malformed,
        RejectCause::UploadTimeout,
        RejectCause::UploadBusy,
        RejectCause::Strategy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RejectCause::NoRound => "no_round",
            RejectCause::Stale => "stale",
            RejectCause::WrongTask => "wrong_task",
            RejectCause::Duplicate => "duplicate",
            RejectCause::NotSelected => "not_selected",
            RejectCause::ZeroExamples => "zero_examples",
            RejectCause::TooManyExamples => "too_many_examples",
            RejectCause::WrongSize => "wrong_size",
            RejectCause::NormBound => "norm_bound",
            RejectCause::Malformed => "malformed",
            RejectCause::UploadTimeout => "upload_timeout",
            RejectCause::UploadBusy => "upload_busy",
            RejectCause::Strategy => "strategy",
        }
    }
}

impl fmt::Display for RejectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight the engine lowered: by the per-client cap or the share cap.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightAdjustment {
    pub client: ClientId,
    pub claimed: u64,
    pub used: f64,
}

/// Everything a round depends on besides the model and the config: goes into
/// every checkpoint so that `--resume` continues exactly where an
/// uninterrupted run would.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EngineState {
    pub completed_rounds: u64,
    pub next_task_id: u64,
    /// Seed of client selection.
    pub selection_seed: u64,
    /// Seed the per-task training seeds derive from.
    pub fit_seed: u64,
    /// Median norm of the last committed round's accepted updates.
    pub median_update_norm: Option<f64>,
}

impl EngineState {
    /// Checks a checkpointed state before a run resumes from it (its file's
    /// checksum says it is intact, not that it is sane): round and task
    /// counters that leave room to count on, and a median norm that can bound
    /// updates (a negative one would flip their sign, NaN would lift the bound).
    pub fn validate(&self) -> Result<(), String> {
        if self.completed_rounds > crate::config::MAX_ROUNDS {
            return Err(format!(
                "{} completed rounds, more than a run can have ({})",
                self.completed_rounds,
                crate::config::MAX_ROUNDS
            ));
        }
        if self.next_task_id > u64::MAX / 2 {
            return Err(format!("next task id {} leaves no room", self.next_task_id));
        }
        if let Some(median) = self.median_update_norm
            && !(median.is_finite() && median >= 0.0)
        {
            return Err(format!("median update norm {median} is not a norm"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Rounds to run; rounds are numbered from 1.
    pub rounds: u64,
    /// Fraction of connected clients asked to train each round.
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub max_fit_clients: usize,
    /// Connected clients needed before a round starts.
    pub min_available_clients: usize,
    pub round_deadline: Duration,
    /// Training settings sent with each task (its seed is varied per task).
    pub fit: FitInstructions,
    /// Fraction of connected clients asked to evaluate the new global model
    /// each round (federated evaluation); 0 disables it.
    pub fraction_evaluate: f64,
    pub min_evaluate_clients: usize,
    /// How many times a round that got fewer than `min_fit_clients` answers
    /// is retried with a fresh selection before the run gives up.
    pub max_round_retries: u32,
    pub seed: u64,
    /// A client gets at most one fit task per connection: once selected it
    /// is no longer available (see `RoundsConfig::one_task_per_connection`).
    pub one_task_per_connection: bool,
    pub updates: UpdatePolicy,
    /// The server step and per-round instructions (see [`crate::strategy`]).
    pub strategy: StrategyConfig,
}

/// A coordinator that cannot start work for want of clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// The round (model version) waiting to start, and its attempt (1 first).
    pub round: u64,
    pub attempt: u32,
    /// Clients available to it now, and how many it needs.
    pub available: usize,
    pub needed: usize,
}

/// Federated evaluation results of one round, weighted by example count.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FederatedEval {
    pub clients: usize,
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// What the engine knows about a finished round. The shell adds central
/// evaluation, bytes and timings before writing it out.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RoundOutcome {
    pub round: u64,
    /// Attempts it took (1 when no retry was needed).
    pub attempts: u32,
    pub clients_available: usize,
    pub clients_selected: usize,
    pub clients_answered: usize,
    /// Selected clients that disconnected, failed or missed the deadline.
    pub clients_dropped: usize,
    /// Updates refused during the round, all causes together...
    pub updates_rejected: usize,
    /// ...and per cause (`stale`, `duplicate`, `malformed`, `norm_bound`, ...).
    pub rejections: BTreeMap<String, usize>,
    /// Examples the accepted updates claimed.
    pub examples: u64,
    /// Sum of the weights earned (claims capped per client) and actually
    /// used (after the share cap), and every client whose weight was lowered.
    pub weight_claimed: f64,
    pub weight_used: f64,
    pub weight_adjusted: Vec<WeightAdjustment>,
    /// Updates scaled down to the norm bound, and the bound in force.
    pub updates_clipped: usize,
    pub norm_bound: Option<f64>,
    /// Median L2 norm of the accepted updates.
    pub median_update_norm: Option<f64>,
    /// Weighted mean of the training loss and accuracy the clients *say*
    /// they reached: unverifiable, bounded, and labelled as such.
    pub client_reported_train_loss: Option<f64>,
    pub client_reported_train_accuracy: Option<f64>,
    /// Client-reported metrics ignored as out of bounds.
    pub client_metrics_ignored: usize,
    pub federated_eval: Option<FederatedEval>,
    pub fit_seconds: f64,
    pub evaluate_seconds: f64,
    /// How many model versions old the folded updates were (asynchronous
    /// coordinators; `None` for synchronous rounds, where it is always 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness: Option<StalenessSummary>,
    /// Secure aggregation's phases (rounds run with it only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secagg: Option<Box<crate::secagg::SecAggSummary>>,
    /// Differential privacy: the noise, clip and the budget spent so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Box<crate::privacy::PrivacySummary>>,
    /// Whether the shell checkpoints this commit (FedBuff checkpoints every
    /// N server steps; rounds always).
    #[serde(skip)]
    pub checkpoint: bool,
    /// The engine's state as of this round's commit, for the checkpoint.
    #[serde(skip)]
    pub state: EngineState,
}

/// The staleness distribution of one server step's updates.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StalenessSummary {
    pub min: u64,
    pub median: f64,
    pub mean: f64,
    pub max: u64,
    /// `counts[tau]`: updates `tau` versions old.
    pub counts: Vec<usize>,
}

impl StalenessSummary {
    /// `None` for no updates.
    pub fn of(values: &mut [u64]) -> Option<StalenessSummary> {
        let (&min, &max) = (values.iter().min()?, values.iter().max()?);
        let mut as_f64: Vec<f64> = values.iter().map(|v| *v as f64).collect();
        let mut counts = vec![0; max as usize + 1];
        for v in values.iter() {
            counts[*v as usize] += 1;
        }
        Some(StalenessSummary {
            min,
            median: median(&mut as_f64)?,
            mean: as_f64.iter().sum::<f64>() / as_f64.len() as f64,
            max,
            counts,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this task and then the current global model to the client.
    SendFit {
        client: ClientId,
        task: FitTask,
    },
    /// Send this task and then the current global model to the client.
    SendEvaluate {
        client: ClientId,
        task: EvaluateTask,
    },
    UpdateAccepted {
        client: ClientId,
        task_id: u64,
    },
    UpdateRejected {
        client: ClientId,
        task_id: u64,
        reason: String,
    },
    /// A round got too few answers and starts again with a new selection.
    RoundRetry {
        round: u64,
        attempt: u32,
        answered: usize,
        needed: usize,
    },
    /// An evaluation result was unusable; the client is out of this
    /// evaluation.
    EvalRejected {
        client: ClientId,
        task_id: u64,
        reason: String,
    },
    /// The new global model failed its check: the round is not committed
    /// and starts again (a `RoundRetry` or `Aborted` follows).
    RoundNotCommitted {
        round: u64,
        reason: String,
    },
    /// Send this secure-aggregation step to the client, for its task.
    SendSecAgg {
        client: ClientId,
        task_id: u64,
        step: fedquic_protocol::SecAggStep,
    },
    /// The global model now includes this round. Persist it before acting
    /// on what follows.
    RoundFinished(Box<RoundOutcome>),
    /// The last round is done.
    Finished,
    /// The run cannot go on.
    Aborted {
        reason: String,
    },
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Tally {
    pub(crate) examples: u64,
    loss_sum: f64,
    accuracy_sum: f64,
    metric_weight: f64,
}

impl Tally {
    pub(crate) fn add(
        &mut self,
        examples: u64,
        weight: f64,
        loss: Option<f64>,
        accuracy: Option<f64>,
    ) {
        self.examples = self.examples.saturating_add(examples);
        if let (Some(l), Some(a)) = (loss, accuracy) {
            self.loss_sum += l * weight;
            self.accuracy_sum += a * weight;
            self.metric_weight += weight;
        }
    }

    pub(crate) fn means(&self) -> (Option<f64>, Option<f64>) {
        if self.metric_weight > 0.0 {
            (
                Some(self.loss_sum / self.metric_weight),
                Some(self.accuracy_sum / self.metric_weight),
            )
        } else {
            (None, None)
        }
    }
}

#[derive(Clone, Debug)]
struct FitPhase {
    attempt: u32,
    started: Instant,
    deadline: Instant,
    available: usize,
    /// Selected clients that still owe an answer, with their task id.
    pending: BTreeMap<ClientId, u64>,
    selected: usize,
    answered: BTreeSet<ClientId>,
    /// Accepted updates in arrival order (the accumulator's indices).
    arrivals: Vec<(ClientId, u64)>,
    norms: Vec<f64>,
    norm_bound: Option<f64>,
    clipped: usize,
    weight_adjusted: Vec<WeightAdjustment>,
    dropped: usize,
    rejections: BTreeMap<RejectCause, usize>,
    metrics_ignored: usize,
    tally: Tally,
}

#[derive(Clone, Debug)]
struct EvalPhase {
    started: Instant,
    deadline: Instant,
    pending: BTreeMap<ClientId, u64>,
    clients: usize,
    tally: Tally,
    outcome: RoundOutcome,
}

// One phase per engine: its size does not matter, boxing would only add
// indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Phase {
    /// Waiting for enough clients before starting `attempt` of the round.
    Waiting {
        attempt: u32,
    },
    Fit(FitPhase),
    Evaluate(EvalPhase),
    Done,
    Aborted,
}

#[derive(Clone, Debug)]
pub struct RoundEngine {
    config: EngineConfig,
    global: Arc<Vec<f32>>,
    accumulator: FedAvgAccumulator,
    strategy: Box<dyn Strategy>,
    /// The round's updates, for strategies that need them all (robust ones).
    held: Vec<Vec<f32>>,
    held_spare: Vec<Vec<f32>>,
    /// The round in progress (or next to start).
    round: u64,
    connected: BTreeSet<ClientId>,
    phase: Phase,
    next_task_id: u64,
    /// Rejections seen outside a fit phase, reported with the next round.
    stray_rejections: BTreeMap<RejectCause, usize>,
    /// Central differential privacy (see [`crate::privacy`]).
    privacy: Option<crate::privacy::Privacy>,
    median_update_norm: Option<f64>,
    /// Counts closed fit phases: uploads started under an older value are
    /// for a phase that no longer collects updates.
    fit_epoch: u64,
    /// The run's id, sent with SCAFFOLD tasks (clients key their control
    /// variate to it).
    run_id: String,
    /// The model followed by the strategy's control variate, for this fit
    /// phase's tasks (SCAFFOLD only).
    fit_payload: Option<Arc<Vec<f32>>>,
}

impl RoundEngine {
    /// Starts after `completed_rounds` rounds (0 for a fresh run, the
    /// checkpoint's round on resume) with `global` as the model.
    pub fn new(config: EngineConfig, global: Vec<f32>, completed_rounds: u64) -> Self {
        let state = EngineState {
            completed_rounds,
            next_task_id: 1,
            selection_seed: config.seed,
            fit_seed: config.fit.seed,
            median_update_norm: None,
        };
        Self::resume(config, global, state)
    }

    /// Continues from a checkpointed state (its seeds win over the config's).
    pub fn resume(mut config: EngineConfig, global: Vec<f32>, state: EngineState) -> Self {
        let len = global.len();
        let phase = if state.completed_rounds >= config.rounds {
            Phase::Done
        } else {
            Phase::Waiting { attempt: 1 }
        };
        config.seed = state.selection_seed;
        config.fit.seed = state.fit_seed;
        // Configs are validated before an engine is built (the config file's
        // `validate`, `Server::bind`); FedAvg is only a last resort.
        let strategy = config
            .strategy
            .build(len)
            .unwrap_or_else(|_| Box::new(FedAvg));
        let share = match strategy.uses_share_cap() {
            true => config.updates.max_weight_share,
            false => 1.0,
        };
        RoundEngine {
            accumulator: FedAvgAccumulator::with_share_cap(len, share),
            strategy,
            held: Vec::new(),
            held_spare: Vec::new(),
            config,
            global: Arc::new(global),
            round: state.completed_rounds + 1,
            connected: BTreeSet::new(),
            phase,
            next_task_id: state.next_task_id.max(1),
            stray_rejections: BTreeMap::new(),
            privacy: None,
            median_update_norm: state.median_update_norm,
            fit_epoch: 0,
            run_id: "run".into(),
            fit_payload: None,
        }
    }

    /// Names the run in SCAFFOLD tasks (at most 64 characters of
    /// `[A-Za-z0-9_.-]`; the server passes its run id).
    pub fn set_run_id(&mut self, run_id: &str) {
        self.run_id = run_id.to_string();
    }

    /// What a fit task's model stream carries: the global model, followed by
    /// the strategy's control variate when it has one (SCAFFOLD).
    pub fn fit_payload(&self) -> Arc<Vec<f32>> {
        match &self.fit_payload {
            Some(payload) => Arc::clone(payload),
            None => Arc::clone(&self.global),
        }
    }

    /// Values an update carries after the model's (SCAFFOLD: `Delta c`).
    pub fn extra_update_values(&self) -> usize {
        self.strategy.control_variate().map_or(0, <[f32]>::len)
    }

    /// The strategy's state (momentum, moments), and the privacy
    /// accountant's when DP is on, for the checkpoint.
    pub fn strategy_state(&self) -> Vec<u8> {
        crate::privacy::join_state(
            self.strategy.state(),
            self.privacy.as_ref().map(|p| p.state()),
        )
    }

    /// Restores the strategy's (and the accountant's) state from a checkpoint.
    pub fn restore_strategy(&mut self, state: &[u8]) -> Result<(), String> {
        let len = self.global.len();
        let (strategy, privacy) = crate::privacy::split_state(state)?;
        self.strategy
            .restore(strategy, len)
            .map_err(|e| format!("{} state: {e}", self.strategy.name()))?;
        crate::privacy::restore_privacy(self.privacy.as_mut(), privacy)?;
        if let Some(p) = &self.privacy {
            self.config.updates.max_update_norm = Some(p.clip_norm());
        }
        Ok(())
    }

    /// Central differential privacy: every update is clipped to the DP
    /// clip norm and weighs 1 (the config sets the update policy), the sum
    /// gets Gaussian noise before the server step, and the accountant
    /// composes each committed round.
    pub fn set_privacy(&mut self, privacy: crate::privacy::Privacy) {
        self.config.updates.max_update_norm = Some(privacy.clip_norm());
        self.config.updates.max_update_norm_median_multiple = None;
        self.config.updates.norm_policy = NormPolicy::Clip;
        self.config.updates.max_examples_per_update = 1;
        self.config.updates.max_weight_share = 1.0;
        self.accumulator = FedAvgAccumulator::with_share_cap(self.global.len(), 1.0);
        self.privacy = Some(privacy);
    }

    /// What a checkpoint must hold besides the model, as of the last
    /// committed round.
    pub fn state(&self) -> EngineState {
        EngineState {
            completed_rounds: self.completed_rounds(),
            next_task_id: self.next_task_id,
            selection_seed: self.config.seed,
            fit_seed: self.config.fit.seed,
            median_update_norm: self.median_update_norm,
        }
    }

    /// Changes whenever a fit phase closes (the shell cancels its uploads).
    pub fn fit_epoch(&self) -> u64 {
        self.fit_epoch
    }

    /// Why an upload for `(round, task_id)` from `client` cannot be used,
    /// decided from its header alone, before any buffer is spent on it.
    pub fn check_upload(
        &self,
        client: &str,
        round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)> {
        let Phase::Fit(f) = &self.phase else {
            return Err((
                RejectCause::NoRound,
                format!("no round is collecting updates (update for round {round})"),
            ));
        };
        if round != self.round {
            return Err((
                RejectCause::Stale,
                format!(
                    "stale update for round {round}, current round is {}",
                    self.round
                ),
            ));
        }
        match f.pending.get(client) {
            Some(&expected) if expected == task_id => Ok(()),
            Some(&expected) => Err((
                RejectCause::WrongTask,
                format!("update for task {task_id}, expected task {expected}"),
            )),
            None if f.answered.contains(client) => Err((
                RejectCause::Duplicate,
                format!("duplicate update for task {task_id}"),
            )),
            None => Err((
                RejectCause::NotSelected,
                format!("client was not selected for round {round} (task {task_id})"),
            )),
        }
    }

    /// The task a client currently owes in the fit phase, as (round, task id).
    pub fn pending_fit(&self, client: &str) -> Option<(u64, u64)> {
        match &self.phase {
            Phase::Fit(f) => f.pending.get(client).map(|t| (self.round, *t)),
            _ => None,
        }
    }

    /// Whether `(round, task_id)` is a task this client still owes, fit or
    /// evaluate (messages about anything else are ignored unlogged).
    pub fn is_pending(&self, client: &str, task_id: u64) -> bool {
        match &self.phase {
            Phase::Fit(f) => f.pending.get(client) == Some(&task_id),
            Phase::Evaluate(e) => e.pending.get(client) == Some(&task_id),
            _ => false,
        }
    }

    /// The global model as of the last finished round.
    pub fn global_model(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.global)
    }

    /// The round in progress, or the next one to run.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Rounds completed so far.
    pub fn completed_rounds(&self) -> u64 {
        match self.phase {
            Phase::Done => self.config.rounds.min(self.round),
            _ => self.round - 1,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Aborted)
    }

    /// The round waiting for clients, with available and needed counts.
    pub fn waiting_for(&self) -> Option<Waiting> {
        match self.phase {
            Phase::Waiting { attempt } => Some(Waiting {
                round: self.round,
                attempt,
                available: self.connected.len(),
                needed: self
                    .config
                    .min_available_clients
                    .max(self.config.min_fit_clients)
                    .max(1),
            }),
            _ => None,
        }
    }

    pub fn connected_clients(&self) -> usize {
        self.connected.len()
    }

    /// When the shell must call [`Self::tick`] next, if anything is timed.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Fit(f) => Some(f.deadline),
            Phase::Evaluate(e) => Some(e.deadline),
            _ => None,
        }
    }

    /// Kicks off the first round if enough clients are already connected
    /// (also reports `Finished` at once when resuming a completed run).
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.phase {
            Phase::Done => actions.push(Action::Finished),
            Phase::Waiting { attempt } => self.try_start_fit(attempt, now, &mut actions),
            _ => {}
        }
        actions
    }

    pub fn client_joined(&mut self, client: ClientId, now: Instant) -> Vec<Action> {
        self.connected.insert(client);
        let mut actions = Vec::new();
        if let Phase::Waiting { attempt } = self.phase {
            self.try_start_fit(attempt, now, &mut actions);
        }
        actions
    }

    pub fn client_left(&mut self, client: &str, now: Instant) -> Vec<Action> {
        self.connected.remove(client);
        let mut actions = Vec::new();
        match &mut self.phase {
            Phase::Fit(f) => f.dropped += usize::from(f.pending.remove(client).is_some()),
            Phase::Evaluate(e) => {
                e.pending.remove(client);
            }
            _ => {}
        }
        self.maybe_close(now, &mut actions);
        actions
    }

    // The arguments are the update header's fields; a struct for them would
    // only be unpacked again here.
    #[allow(clippy::too_many_arguments)]
    /// An update arrived whole and decoded (the shell checked its layout and
    /// that every value is finite). It passes the [`UpdatePolicy`] gate
    /// before it is folded.
    pub fn update_received(
        &mut self,
        client: &str,
        task_id: u64,
        round: u64,
        num_examples: u64,
        metrics: &Metrics,
        delta: &[f32],
        now: Instant,
    ) -> Vec<Action> {
        let update = ReceivedUpdate {
            client,
            task_id,
            round,
            num_examples,
            metrics,
            delta,
            norm: None,
        };
        self.receive_update(update, now)
    }

    /// [`Self::update_received`], with the norm the shell may have taken.
    pub fn receive_update(&mut self, update: ReceivedUpdate<'_>, now: Instant) -> Vec<Action> {
        let ReceivedUpdate {
            client,
            task_id,
            round,
            num_examples,
            metrics,
            delta,
            norm: decoded_norm,
        } = update;
        let mut actions = Vec::new();
        let reject = |reason: String| Action::UpdateRejected {
            client: client.to_string(),
            task_id,
            reason,
        };
        let norm_bound = match &self.phase {
            Phase::Fit(f) => f.norm_bound,
            _ => {
                *self
                    .stray_rejections
                    .entry(RejectCause::NoRound)
                    .or_default() += 1;
                actions.push(reject(format!(
                    "no round is collecting updates (update for round {round})"
                )));
                return actions;
            }
        };
        let policy = &self.config.updates;
        let extra_len = self.strategy.control_variate().map_or(0, <[f32]>::len);
        let values = delta.len();
        let (delta, extra) = delta.split_at(values.min(self.global.len()));
        let size_error = (values != self.global.len() + extra_len).then(|| match extra_len {
            0 => format!(
                "update has {values} values, model has {}",
                self.global.len()
            ),
            _ => format!(
                "update has {values} values, expected {} (model) + {extra_len} \
                 (the strategy's control variate)",
                self.global.len()
            ),
        });
        // The shell's norm covers every value: without a control variate,
        // just the model's.
        let decoded_norm = decoded_norm.filter(|_| extra.is_empty());
        let verdict = self.check_upload(client, round, task_id).and_then(|()| {
            gate_update(
                policy,
                norm_bound,
                num_examples,
                delta,
                decoded_norm,
                size_error,
            )
        });
        let Phase::Fit(f) = &mut self.phase else {
            return actions;
        };
        match verdict {
            Err((cause, reason)) => {
                // An unusable answer to the client's *current* task ends its
                // turn; a late answer to an older task must not cost it the
                // task it holds now.
                if round == self.round && f.pending.get(client) == Some(&task_id) {
                    f.pending.remove(client);
                    f.dropped += 1;
                }
                *f.rejections.entry(cause).or_default() += 1;
                actions.push(reject(reason));
            }
            Ok((norm, gate_scale)) => {
                // Norm-bounded FedAvg clips further, to its own bound.
                let scale = match self.strategy.clip_norm() {
                    Some(c) if norm * gate_scale > c => c / norm,
                    _ => gate_scale,
                };
                let weight = num_examples.min(policy.max_examples_per_update.max(1));
                let accepted = self.strategy.accept(&UpdateInput {
                    weight: weight as f64,
                    delta,
                    norm,
                    scale,
                    metrics,
                    extra,
                    client_lr: self.config.fit.learning_rate as f64,
                    max_update_norm: policy.max_update_norm,
                    norm_median_multiple: policy.max_update_norm_median_multiple,
                    reject_over_bound: policy.norm_policy == NormPolicy::Reject,
                });
                let fold_weight = match accepted {
                    Ok(w) => w,
                    Err(refused) => {
                        if f.pending.get(client) == Some(&task_id) {
                            f.pending.remove(client);
                            f.dropped += 1;
                        }
                        let cause = match refused.norm_bound {
                            true => RejectCause::NormBound,
                            false => RejectCause::Strategy,
                        };
                        *f.rejections.entry(cause).or_default() += 1;
                        actions.push(reject(refused.reason));
                        self.maybe_close(now, &mut actions);
                        return actions;
                    }
                };
                f.pending.remove(client);
                f.answered.insert(client.to_string());
                if weight < num_examples {
                    f.weight_adjusted.push(WeightAdjustment {
                        client: client.to_string(),
                        claimed: num_examples,
                        used: weight as f64,
                    });
                }
                if scale < 1.0 {
                    f.clipped += 1;
                }
                f.norms.push(norm);
                f.arrivals.push((client.to_string(), num_examples));
                self.accumulator.fold(delta, fold_weight, scale);
                if self.strategy.robust().is_some() {
                    let mut copy = self.held_spare.pop().unwrap_or_default();
                    copy.clear();
                    copy.extend(delta.iter().map(|d| (*d as f64 * scale) as f32));
                    self.held.push(copy);
                }
                let (loss, accuracy, implausible) = client_metrics(metrics, policy.max_client_loss);
                f.metrics_ignored += usize::from(implausible);
                f.tally.add(num_examples, weight as f64, loss, accuracy);
                actions.push(Action::UpdateAccepted {
                    client: client.to_string(),
                    task_id,
                });
            }
        }
        self.maybe_close(now, &mut actions);
        actions
    }

    /// The shell could not use an upload for this task (malformed, too slow,
    /// a second upload while one is in flight): counted under `cause`, and
    /// the client's turn ends if it was its current task.
    pub fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        cause: RejectCause,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        match &mut self.phase {
            Phase::Fit(f) => {
                *f.rejections.entry(cause).or_default() += 1;
                if task_id.is_some() && f.pending.get(client) == task_id.as_ref() {
                    f.pending.remove(client);
                    f.dropped += 1;
                }
            }
            _ => *self.stray_rejections.entry(cause).or_default() += 1,
        }
        self.maybe_close(now, &mut actions);
        actions
    }

    /// The client reported it could not complete its task, or its update
    /// stream broke (disconnect mid-upload, malformed body).
    pub fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match &mut self.phase {
            Phase::Fit(f) if f.pending.get(client) == Some(&task_id) => {
                f.pending.remove(client);
                f.dropped += 1;
            }
            Phase::Evaluate(e) if e.pending.get(client) == Some(&task_id) => {
                e.pending.remove(client);
            }
            _ => {}
        }
        self.maybe_close(now, &mut actions);
        actions
    }

    pub fn eval_received(
        &mut self,
        client: &str,
        result: &EvalResult,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Phase::Evaluate(e) = &mut self.phase
            && result.round == self.round
            && e.pending.get(client) == Some(&result.task_id)
        {
            e.pending.remove(client);
            let problem = if !(result.loss.is_finite()
                && (0.0..=self.config.updates.max_client_loss).contains(&result.loss))
            {
                Some(format!(
                    "evaluation loss {:e} is out of bounds",
                    result.loss
                ))
            } else if !(0.0..=1.0).contains(&result.accuracy) {
                Some(format!(
                    "evaluation accuracy {} is not in [0, 1]",
                    result.accuracy
                ))
            } else if result.examples == 0 || result.examples > MAX_EXAMPLES_PER_UPDATE {
                Some(format!("evaluation claims {} examples", result.examples))
            } else {
                None
            };
            match problem {
                Some(reason) => actions.push(Action::EvalRejected {
                    client: client.to_string(),
                    task_id: result.task_id,
                    reason,
                }),
                None => {
                    e.clients += 1;
                    let weight = result
                        .examples
                        .min(self.config.updates.max_examples_per_update.max(1));
                    e.tally.add(
                        result.examples,
                        weight as f64,
                        Some(result.loss),
                        Some(result.accuracy),
                    );
                }
            }
        }
        self.maybe_close(now, &mut actions);
        actions
    }

    /// Time passed: closes a phase whose deadline is over.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.maybe_close(now, &mut actions);
        actions
    }

    fn task_id(&mut self) -> u64 {
        let id = self.next_task_id;
        self.next_task_id += 1;
        id
    }

    /// Picks `count` clients from the connected ones, reproducibly for a
    /// given seed, round and attempt.
    fn sample(&self, count: usize, salt: u64) -> Vec<ClientId> {
        sample_clients(
            &self.connected,
            count,
            mix(self.config.seed, self.round, salt),
        )
    }

    fn fit_count(&self) -> usize {
        let n = self.connected.len();
        let wanted = fraction_of(self.config.fraction_fit, n);
        wanted
            .max(self.config.min_fit_clients)
            .min(self.config.max_fit_clients)
            .min(n)
    }

    fn try_start_fit(&mut self, attempt: u32, now: Instant, actions: &mut Vec<Action>) {
        let needed = self
            .config
            .min_available_clients
            .max(self.config.min_fit_clients)
            .max(1);
        if self.connected.len() < needed {
            self.phase = Phase::Waiting { attempt };
            return;
        }
        // The privacy budget is checked before every round, the first too.
        if let Some(reason) = self
            .privacy
            .as_ref()
            .and_then(|p| p.stop_reason(self.fit_count()))
        {
            tracing::warn!("stopping: {reason}");
            self.phase = Phase::Done;
            actions.push(Action::Finished);
            return;
        }
        let available = self.connected.len();
        let selected = self.sample(self.fit_count(), attempt as u64);
        if self.config.one_task_per_connection {
            retire(&mut self.connected, &selected);
        }
        let mut pending = BTreeMap::new();
        for client in selected {
            let task_id = self.task_id();
            let mut config = self.strategy.configure_fit(self.round, &self.config.fit);
            config.seed = mix(self.config.fit.seed, self.round, task_id);
            pending.insert(client.clone(), task_id);
            actions.push(Action::SendFit {
                client,
                task: FitTask {
                    round: self.round,
                    task_id,
                    config,
                    initial_loss: self.strategy.wants_initial_loss(),
                    scaffold: self.strategy.control_variate().map(|_| ScaffoldTask {
                        run: self.run_id.clone(),
                    }),
                    secagg: None,
                },
            });
        }
        self.accumulator.reset();
        self.strategy.begin_round(available);
        self.fit_payload = self.strategy.control_variate().map(|c| {
            let mut payload = Vec::with_capacity(self.global.len() + c.len());
            payload.extend_from_slice(&self.global);
            payload.extend_from_slice(c);
            Arc::new(payload)
        });
        self.held_spare.append(&mut self.held);
        let norm_bound = self.config.updates.norm_bound(self.median_update_norm);
        self.phase = Phase::Fit(FitPhase {
            attempt,
            started: now,
            deadline: now.checked_add(self.config.round_deadline).unwrap_or(now),
            available,
            selected: pending.len(),
            pending,
            answered: BTreeSet::new(),
            arrivals: Vec::new(),
            norms: Vec::new(),
            norm_bound,
            clipped: 0,
            weight_adjusted: Vec::new(),
            dropped: 0,
            rejections: std::mem::take(&mut self.stray_rejections),
            metrics_ignored: 0,
            tally: Tally::default(),
        });
    }

    fn maybe_close(&mut self, now: Instant, actions: &mut Vec<Action>) {
        match &self.phase {
            Phase::Fit(f) if f.pending.is_empty() || now >= f.deadline => {
                self.close_fit(now, actions)
            }
            Phase::Evaluate(e) if e.pending.is_empty() || now >= e.deadline => {
                self.close_evaluate(now, actions)
            }
            _ => {}
        }
    }

    fn close_fit(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Phase::Fit(mut f) = std::mem::replace(&mut self.phase, Phase::Waiting { attempt: 1 })
        else {
            return;
        };
        self.fit_epoch += 1;
        let answered = f.answered.len();
        let dropped = f.dropped + f.pending.len();
        let mut failure = None;
        let mut weights = None;
        if answered < self.config.min_fit_clients.max(1) {
            // Too few answers: drop the partial sum and try a fresh selection.
            self.accumulator.reset();
            failure = Some(format!(
                "round {} got {answered} of the {} updates it needs",
                self.round, self.config.min_fit_clients
            ));
        } else {
            let max_abs = self.config.updates.max_parameter_abs;
            let report = self.accumulator.apply_share_cap();
            let mut inv = if report.used > 0.0 {
                self.strategy.sum_scale(report.used)
            } else {
                0.0
            };
            let mut robust_failure = None;
            if let Some(robust) = self.strategy.robust() {
                // The rule's aggregate replaces the weighted mean.
                let updates: Vec<&[f32]> = self.held.iter().map(|u| u.as_slice()).collect();
                let mut aggregate = self.held_spare.pop().unwrap_or_default();
                aggregate.clear();
                aggregate.resize(self.global.len(), 0.0);
                match robust.aggregate(&updates, &mut aggregate) {
                    Ok(()) => {
                        self.accumulator.set_sum(&aggregate);
                        inv = 1.0;
                    }
                    Err(e) => robust_failure = Some(e.to_string()),
                }
                self.held_spare.push(aggregate);
            }
            if robust_failure.is_none()
                && report.used > 0.0
                && let Some(p) = &self.privacy
                && let Err(e) = p.noise_sum(
                    self.accumulator.sum_mut(),
                    mix(self.config.seed, self.round, 0xd900 + f.attempt as u64),
                )
            {
                robust_failure = Some(e);
            }
            // Check the server step's result before touching the model or the
            // strategy's state.
            let checked = if let Some(e) = robust_failure {
                Err(ModelCheckError::Aggregation(e))
            } else if report.used > 0.0 {
                self.strategy
                    .check(&self.global, self.accumulator.sum(), inv, max_abs)
            } else {
                Ok(())
            };
            match checked {
                Ok(()) => {
                    if report.used > 0.0 {
                        let global = Arc::make_mut(&mut self.global);
                        self.strategy.apply(global, self.accumulator.sum(), inv);
                    }
                    self.accumulator.reset();
                    weights = Some(report);
                }
                Err(e) => {
                    // The retry bounds update norms by this attempt's median:
                    // with an honest majority, the update that broke the model
                    // is clipped (or refused) next time.
                    if let Some(m) = median(&mut f.norms) {
                        self.median_update_norm = Some(m);
                    }
                    self.accumulator.reset();
                    let reason = not_committed(&e);
                    actions.push(Action::RoundNotCommitted {
                        round: self.round,
                        reason: reason.clone(),
                    });
                    failure = Some(reason);
                }
            }
        }
        let Some(weights) = weights else {
            let reason = failure.unwrap_or_default();
            let retry = RetryPolicy {
                round: self.round,
                attempt: f.attempt,
                max_retries: self.config.max_round_retries,
                answered,
                needed: self.config.min_fit_clients,
            };
            let Some(attempt) = retry.next_attempt(&reason, actions) else {
                self.phase = Phase::Aborted;
                return;
            };
            for (cause, n) in std::mem::take(&mut f.rejections) {
                *self.stray_rejections.entry(cause).or_default() += n;
            }
            self.try_start_fit(attempt, now, actions);
            return;
        };
        record_share_caps(&mut f.weight_adjusted, &f.arrivals, &weights.capped);
        let median = median(&mut f.norms);
        self.median_update_norm = median.or(self.median_update_norm);
        let (train_loss, train_accuracy) = f.tally.means();
        let privacy = match &mut self.privacy {
            None => None,
            Some(p) => {
                let within_clip = answered.saturating_sub(f.clipped) as f64;
                let seed = mix(self.config.seed, self.round, 0xc1);
                match p.account(
                    f.selected,
                    within_clip,
                    crate::privacy::RoundNoise::Central,
                    seed,
                ) {
                    Ok(summary) => {
                        self.config.updates.max_update_norm = Some(p.clip_norm());
                        Some(Box::new(summary))
                    }
                    Err(e) => {
                        self.phase = Phase::Aborted;
                        actions.push(Action::Aborted {
                            reason: format!("privacy accounting failed: {e}"),
                        });
                        return;
                    }
                }
            }
        };
        let outcome = RoundOutcome {
            round: self.round,
            attempts: f.attempt,
            clients_available: f.available,
            clients_selected: f.selected,
            clients_answered: answered,
            clients_dropped: dropped,
            updates_rejected: f.rejections.values().sum(),
            rejections: f
                .rejections
                .iter()
                .map(|(cause, n)| (cause.name().to_string(), *n))
                .collect(),
            examples: f.tally.examples,
            weight_claimed: weights.claimed,
            weight_used: weights.used,
            weight_adjusted: f.weight_adjusted,
            updates_clipped: f.clipped,
            norm_bound: f.norm_bound,
            median_update_norm: median,
            client_reported_train_loss: train_loss,
            client_reported_train_accuracy: train_accuracy,
            client_metrics_ignored: f.metrics_ignored,
            federated_eval: None,
            fit_seconds: now.duration_since(f.started).as_secs_f64(),
            evaluate_seconds: 0.0,
            staleness: None,
            secagg: None,
            privacy,
            checkpoint: true,
            state: EngineState {
                completed_rounds: self.round,
                next_task_id: self.next_task_id,
                selection_seed: self.config.seed,
                fit_seed: self.config.fit.seed,
                median_update_norm: self.median_update_norm,
            },
        };
        let eval_count = fraction_of(self.config.fraction_evaluate, self.connected.len())
            .max(self.config.min_evaluate_clients)
            .min(self.connected.len());
        if self.config.fraction_evaluate > 0.0 && eval_count > 0 {
            let mut pending = BTreeMap::new();
            for client in self.sample(eval_count, u64::MAX) {
                let task_id = self.task_id();
                pending.insert(client.clone(), task_id);
                actions.push(Action::SendEvaluate {
                    client,
                    task: EvaluateTask {
                        round: self.round,
                        task_id,
                    },
                });
            }
            self.phase = Phase::Evaluate(EvalPhase {
                started: now,
                deadline: now.checked_add(self.config.round_deadline).unwrap_or(now),
                pending,
                clients: 0,
                tally: Tally::default(),
                outcome,
            });
        } else {
            self.finish_round(outcome, now, actions);
        }
    }

    fn close_evaluate(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Phase::Evaluate(e) = std::mem::replace(&mut self.phase, Phase::Waiting { attempt: 1 })
        else {
            return;
        };
        let mut outcome = e.outcome;
        if let (Some(loss), Some(accuracy)) = e.tally.means() {
            outcome.federated_eval = Some(FederatedEval {
                clients: e.clients,
                examples: e.tally.examples,
                loss,
                accuracy,
            });
        }
        outcome.evaluate_seconds = now.duration_since(e.started).as_secs_f64();
        self.finish_round(outcome, now, actions);
    }

    fn finish_round(&mut self, mut outcome: RoundOutcome, now: Instant, actions: &mut Vec<Action>) {
        // Evaluation tasks took ids after the fit phase closed.
        outcome.state.next_task_id = self.next_task_id;
        actions.push(Action::RoundFinished(Box::new(outcome)));
        if self.round >= self.config.rounds {
            self.phase = Phase::Done;
            actions.push(Action::Finished);
        } else {
            self.round += 1;
            self.try_start_fit(1, now, actions);
        }
    }
}

/// Records the clients the share cap lowered (`capped`: arrival index,
/// before, after) in `adjusted`, updating a client already there (its
/// example count was capped too).
pub(crate) fn record_share_caps(
    adjusted: &mut Vec<WeightAdjustment>,
    arrivals: &[(ClientId, u64)],
    capped: &[(usize, f64, f64)],
) {
    for (index, _, used) in capped {
        if let Some((client, claimed)) = arrivals.get(*index) {
            match adjusted.iter_mut().find(|a| &a.client == client) {
                Some(a) => a.used = *used,
                None => adjusted.push(WeightAdjustment {
                    client: client.clone(),
                    claimed: *claimed,
                    used: *used,
                }),
            }
        }
    }
}

/// The update gate's checks of one update's claims and size, then its norm
/// against `bound`: the norm and the clipping factor, or why it is refused.
/// `decoded_norm` is `delta`'s norm if the shell took it while decoding.
pub(crate) fn gate_update(
    policy: &UpdatePolicy,
    bound: Option<f64>,
    num_examples: u64,
    delta: &[f32],
    decoded_norm: Option<f64>,
    size_error: Option<String>,
) -> Result<(f64, f64), (RejectCause, String)> {
    match num_examples {
        0 => {
            return Err((
                RejectCause::ZeroExamples,
                "update claims zero training examples".to_string(),
            ));
        }
        n if n > MAX_EXAMPLES_PER_UPDATE => {
            return Err((
                RejectCause::TooManyExamples,
                format!("update claims {n} examples, limit is {MAX_EXAMPLES_PER_UPDATE}"),
            ));
        }
        _ => {}
    }
    if let Some(reason) = size_error {
        return Err((RejectCause::WrongSize, reason));
    }
    debug_assert!(decoded_norm.is_none_or(|n| n.to_bits() == l2_norm(delta).to_bits()));
    let norm = decoded_norm.unwrap_or_else(|| l2_norm(delta));
    match bound {
        Some(bound) if norm > bound => match policy.norm_policy {
            NormPolicy::Reject => Err((
                RejectCause::NormBound,
                format!("update norm {norm:.4e} exceeds the bound {bound:.4e}"),
            )),
            NormPolicy::Clip => Ok((norm, bound / norm)),
        },
        _ => Ok((norm, 1.0)),
    }
}

/// ceil(fraction * n), immune to float error such as 0.07 * 100 = 7.000000000000001.
pub fn fraction_of(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64) - 1e-9).ceil().max(0.0) as usize
}

/// The client's claimed training loss and accuracy, both or neither, and only
/// when plausible: a finite loss in `[0, max_loss]`, an accuracy in `[0, 1]`.
/// The flag says a claim was made but was out of bounds.
pub(crate) fn client_metrics(metrics: &Metrics, max_loss: f64) -> (Option<f64>, Option<f64>, bool) {
    let get = |name: &str| metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let (loss, accuracy) = (get("loss"), get("accuracy"));
    let loss_ok = loss.is_none_or(|l| l.is_finite() && (0.0..=max_loss).contains(&l));
    let accuracy_ok = accuracy.is_none_or(|a| (0.0..=1.0).contains(&a));
    match (loss, accuracy) {
        (Some(l), Some(a)) if loss_ok && accuracy_ok => (Some(l), Some(a), false),
        _ => (None, None, !(loss_ok && accuracy_ok)),
    }
}

/// `count` of the `connected` clients, chosen reproducibly from `seed`
/// (a partial Fisher-Yates shuffle).
pub(crate) fn sample_clients(
    connected: &BTreeSet<ClientId>,
    count: usize,
    seed: u64,
) -> Vec<ClientId> {
    let mut pool: Vec<&ClientId> = connected.iter().collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let count = count.min(pool.len());
    for i in 0..count {
        let j = rng.random_range(i..pool.len());
        pool.swap(i, j);
    }
    pool.truncate(count);
    pool.into_iter().cloned().collect()
}

/// Check-in mode (`one_task_per_connection`): the selected clients are no
/// longer available; they stay known to the round through its task list
/// and come back only by reconnecting (a new `client_joined`).
pub(crate) fn retire(connected: &mut BTreeSet<ClientId>, selected: &[ClientId]) {
    for client in selected {
        connected.remove(client);
    }
}

/// What a round that did not commit does next: another attempt with a new
/// selection, or (past the retries allowed) the end of the run.
pub(crate) struct RetryPolicy {
    pub(crate) round: u64,
    pub(crate) attempt: u32,
    pub(crate) max_retries: u32,
    pub(crate) answered: usize,
    pub(crate) needed: usize,
}

impl RetryPolicy {
    /// Pushes `RoundRetry` and returns the next attempt, or pushes
    /// `Aborted` and returns `None`.
    pub(crate) fn next_attempt(&self, reason: &str, actions: &mut Vec<Action>) -> Option<u32> {
        if self.attempt > self.max_retries {
            actions.push(Action::Aborted {
                reason: format!("{reason}, after {} attempts", self.attempt),
            });
            return None;
        }
        let attempt = self.attempt + 1;
        actions.push(Action::RoundRetry {
            round: self.round,
            attempt,
            answered: self.answered,
            needed: self.needed,
        });
        Some(attempt)
    }
}

pub(crate) fn not_committed(e: &ModelCheckError) -> String {
    format!("round not committed: {e}")
}

/// The median (mean of the two middle values for an even count).
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// SplitMix64-style mixing of a seed with two counters, for independent
/// per-round and per-task random streams.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
