//! FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
//! Aggregation", AISTATS 2022): asynchronous federated learning with no
//! round barrier, as a second [`Coordinator`] behind the same server shell.
//!
//! - Up to `concurrency` clients train at once. A client that finishes gets
//!   fresh work at once (from the newest model), and so does any idle one.
//! - Every update carries the model version its task started from (the
//!   task's `round`). Its staleness `tau` is the number of server steps since;
//!   updates staler than `max_staleness` are refused with the reason, and the
//!   rest are folded into a buffer weighted by `s(tau)` x examples (see
//!   [`Staleness`]).
//! - Every `buffer_size` updates, the buffer's mean goes through the
//!   configured strategy's server step (FedAvg, FedAvgM, FedAdam, FedYogi,
//!   FedAdagrad, FedProx, norm-bounded FedAvg), checked before it is
//!   committed, and the model version moves on. Strategies that need a whole
//!   round at once (robust rules, q-FedAvg, SCAFFOLD) are refused.
//! - The update gate is the round engine's: example-count cap, share cap
//!   within a buffer, L2 bound (absolute and/or a multiple of the previous
//!   buffer's median norm), and a model check before each commit.
//! - Each server step is reported like a round ([`RoundOutcome`], with the
//!   staleness distribution of its updates); every `checkpoint_every` steps
//!   (and the last) is checkpointed. A restart resumes from the last
//!   checkpoint's version: tasks in flight then are lost, and their clients
//!   get new ones when they reconnect.
//!
//! Like the round engine it is a pure state machine (events and time in,
//! actions out).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use fedquic_protocol::{EvalResult, FitTask};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::coordinator::{Coordinator, ReceivedUpdate};
use crate::engine::{
    Action, ClientId, EngineConfig, EngineState, NormPolicy, RejectCause, RoundOutcome,
    StalenessSummary, Tally, Waiting, WeightAdjustment, client_metrics, gate_update, median, mix,
    not_committed, record_share_caps,
};
use crate::strategy::{FedAvgAccumulator, ModelCheckError, Strategy, UpdateInput};

/// How much an update of staleness `tau` counts (FedBuff, after Xie et al.
/// 2019, "Asynchronous Federated Optimization").
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Staleness {
    /// `s(tau) = 1`.
    Constant,
    /// `s(tau) = (1 + tau)^-a` (the FedBuff paper's choice, a = 0.5).
    Polynomial { a: f64 },
    /// `s(tau) = 1` for `tau <= b`, then `1 / (a (tau - b) + 1)`.
    Hinge { a: f64, b: f64 },
}

impl Staleness {
    /// The weight factor for an update `tau` versions old, in (0, 1].
    pub fn weight(&self, tau: u64) -> f64 {
        let tau = tau as f64;
        match *self {
            Staleness::Constant => 1.0,
            Staleness::Polynomial { a } => (1.0 + tau).powf(-a),
            Staleness::Hinge { b, .. } if tau <= b => 1.0,
            Staleness::Hinge { a, b } => 1.0 / (a * (tau - b) + 1.0),
        }
    }
}

impl FromStr for Staleness {
    type Err = String;

    /// `constant`, `polynomial:A` or `hinge:A,B` (A, B finite, 0 to 100).
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && (0.0..=100.0).contains(x))
                .ok_or_else(|| format!("staleness parameter '{v}' must be a number in [0, 100]"))
        };
        match s.trim().split_once(':') {
            None if s.trim() == "constant" => Ok(Staleness::Constant),
            Some(("polynomial", a)) => Ok(Staleness::Polynomial { a: number(a)? }),
            Some(("hinge", ab)) => match ab.split_once(',') {
                Some((a, b)) => Ok(Staleness::Hinge {
                    a: number(a)?,
                    b: number(b)?,
                }),
                None => Err("hinge staleness needs A,B (for example hinge:10,4)".into()),
            },
            _ => Err(format!(
                "unknown staleness '{s}' (expected constant, polynomial:A or hinge:A,B)"
            )),
        }
    }
}

impl std::fmt::Display for Staleness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Staleness::Constant => write!(f, "constant"),
            Staleness::Polynomial { a } => write!(f, "polynomial:{a}"),
            Staleness::Hinge { a, b } => write!(f, "hinge:{a},{b}"),
        }
    }
}

/// FedBuff's own settings; the rest (server steps = `rounds`, task
/// deadline = `round_deadline`, fit instructions, update gate, strategy,
/// seed) come from the [`EngineConfig`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FedBuffSettings {
    /// Clients training at once.
    pub concurrency: usize,
    /// Updates per server step (K).
    pub buffer_size: usize,
    /// Updates from a model more than this many versions old are refused.
    pub max_staleness: u64,
    pub staleness: Staleness,
    /// Checkpoint every this many server steps (and after the last).
    pub checkpoint_every: u64,
}

impl Default for FedBuffSettings {
    fn default() -> Self {
        FedBuffSettings {
            concurrency: 10,
            buffer_size: 5,
            max_staleness: 10,
            staleness: Staleness::Polynomial { a: 0.5 },
            checkpoint_every: 10,
        }
    }
}

impl FedBuffSettings {
    /// Checks the settings against bounds, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.concurrency) {
            return Err("fedbuff.concurrency must be in 1..=1000000".into());
        }
        if !(1..=100_000).contains(&self.buffer_size) {
            return Err("fedbuff.buffer_size must be in 1..=100000".into());
        }
        if self.max_staleness > 1_000_000 {
            return Err("fedbuff.max_staleness must be at most 1000000".into());
        }
        if !(1..=1_000_000).contains(&self.checkpoint_every) {
            return Err("fedbuff.checkpoint_every must be in 1..=1000000".into());
        }
        Ok(())
    }
}

/// A task out with a client.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    task_id: u64,
    version: u64,
    deadline: Instant,
}

/// What happened since the last server step.
#[derive(Debug)]
struct StepStats {
    started: Instant,
    dispatched: usize,
    answered: usize,
    dropped: usize,
    rejections: BTreeMap<RejectCause, usize>,
    staleness: Vec<u64>,
    norms: Vec<f64>,
    /// Arrival order: (client, claimed examples), for share-cap reports.
    arrivals: Vec<(ClientId, u64)>,
    weight_adjusted: Vec<WeightAdjustment>,
    /// Sum of the example weights (before staleness) and of the staleness-
    /// scaled fold weights.
    example_weight: f64,
    fold_weight: f64,
    clipped: usize,
    metrics_ignored: usize,
    tally: Tally,
}

impl StepStats {
    fn new(now: Instant) -> Self {
        StepStats {
            started: now,
            dispatched: 0,
            answered: 0,
            dropped: 0,
            rejections: BTreeMap::new(),
            staleness: Vec::new(),
            norms: Vec::new(),
            arrivals: Vec::new(),
            weight_adjusted: Vec::new(),
            example_weight: 0.0,
            fold_weight: 0.0,
            clipped: 0,
            metrics_ignored: 0,
            tally: Tally::default(),
        }
    }
}

/// The FedBuff coordinator (see the module docs).
pub struct FedBuff {
    config: EngineConfig,
    settings: FedBuffSettings,
    global: Arc<Vec<f32>>,
    strategy: Box<dyn Strategy>,
    accumulator: FedAvgAccumulator,
    /// Server steps committed: the model version.
    version: u64,
    next_task_id: u64,
    /// Tasks handed out, for the selection stream.
    dispatches: u64,
    median_update_norm: Option<f64>,
    connected: BTreeSet<ClientId>,
    in_flight: BTreeMap<ClientId, InFlight>,
    /// Clients whose task failed or timed out: no new task until the next
    /// server step, so a broken client cannot spin.
    resting: BTreeSet<ClientId>,
    step: StepStats,
    /// Server steps in a row whose result failed the model check.
    failed_steps: u32,
    started: bool,
    finished: bool,
    fit_epoch: u64,
}

impl FedBuff {
    /// A fresh run from `initial`. Fails on settings out of bounds or a
    /// strategy that cannot run asynchronously.
    pub fn new(
        config: EngineConfig,
        settings: FedBuffSettings,
        initial: Vec<f32>,
        now: Instant,
    ) -> Result<FedBuff, String> {
        settings.validate()?;
        let strategy = config.strategy.build(initial.len())?;
        if strategy.robust().is_some()
            || strategy.control_variate().is_some()
            || strategy.wants_initial_loss()
        {
            return Err(format!(
                "strategy '{}' needs a whole round of updates at once and cannot run with \
                 FedBuff; use fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad or normbounded",
                strategy.name()
            ));
        }
        if config.fraction_evaluate > 0.0 {
            return Err(
                "federated evaluation needs rounds; with FedBuff use central evaluation".into(),
            );
        }
        let len = initial.len();
        Ok(FedBuff {
            accumulator: FedAvgAccumulator::with_share_cap(len, config.updates.max_weight_share),
            config,
            settings,
            global: Arc::new(initial),
            strategy,
            version: 0,
            next_task_id: 1,
            dispatches: 0,
            median_update_norm: None,
            connected: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            resting: BTreeSet::new(),
            step: StepStats::new(now),
            failed_steps: 0,
            started: false,
            finished: false,
            fit_epoch: 0,
        })
    }

    /// Continues from a checkpoint: its model, engine state (version, task
    /// ids, median norm) and strategy state.
    pub fn resume(
        config: EngineConfig,
        settings: FedBuffSettings,
        model: Vec<f32>,
        state: &EngineState,
        strategy_state: &[u8],
        now: Instant,
    ) -> Result<FedBuff, String> {
        let len = model.len();
        let mut fedbuff = FedBuff::new(config, settings, model, now)?;
        fedbuff.strategy.restore(strategy_state, len)?;
        fedbuff.version = state.completed_rounds;
        fedbuff.next_task_id = state.next_task_id;
        fedbuff.median_update_norm = state.median_update_norm;
        fedbuff.finished = fedbuff.version >= fedbuff.config.rounds;
        Ok(fedbuff)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn state(&self) -> EngineState {
        EngineState {
            completed_rounds: self.version,
            next_task_id: self.next_task_id,
            selection_seed: self.config.seed,
            fit_seed: self.config.fit.seed,
            median_update_norm: self.median_update_norm,
        }
    }

    fn norm_bound(&self) -> Option<f64> {
        self.config.updates.norm_bound(self.median_update_norm)
    }

    /// Hands tasks to idle clients until `concurrency` are training.
    fn fill(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.finished {
            return;
        }
        if !self.started {
            let needed = self.config.min_available_clients.max(1);
            if self.connected.len() < needed {
                return;
            }
            self.started = true;
            self.step = StepStats::new(now);
        }
        while self.in_flight.len() < self.settings.concurrency {
            let idle: Vec<&ClientId> = self
                .connected
                .iter()
                .filter(|c| !self.in_flight.contains_key(*c) && !self.resting.contains(*c))
                .collect();
            if idle.is_empty() {
                return;
            }
            let mut rng = StdRng::seed_from_u64(mix(self.config.seed, self.dispatches, 0xfedb));
            let client = idle[rng.random_range(0..idle.len())].clone();
            self.dispatches += 1;
            let task_id = self.next_task_id;
            self.next_task_id += 1;
            let mut config = self.strategy.configure_fit(self.version, &self.config.fit);
            config.seed = mix(self.config.fit.seed, self.version, task_id);
            self.in_flight.insert(
                client.clone(),
                InFlight {
                    task_id,
                    version: self.version,
                    deadline: now.checked_add(self.config.round_deadline).unwrap_or(now),
                },
            );
            self.step.dispatched += 1;
            actions.push(Action::SendFit {
                client,
                task: FitTask {
                    round: self.version,
                    task_id,
                    config,
                    initial_loss: false,
                    scaffold: None,
                    secagg: None,
                },
            });
        }
    }

    /// Ends a client's task without an update: it rests until the next step.
    fn drop_task(&mut self, client: &str) {
        if self.in_flight.remove(client).is_some() {
            self.step.dropped += 1;
            self.resting.insert(client.to_string());
        }
    }

    /// Applies the buffer through the strategy's server step.
    fn server_step(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let report = self.accumulator.apply_share_cap();
        // The mean is over the example weights, not the staleness-scaled
        // ones, so stale updates count less (FedBuff divides by K, not by
        // the sum of s(tau)); the share cap's adjustments carry over.
        let staleness_mean = match self.step.example_weight > 0.0 {
            true => self.step.fold_weight / self.step.example_weight,
            false => 1.0,
        };
        let inv = match report.used > 0.0 {
            true => self.strategy.sum_scale(report.used) * staleness_mean,
            false => 0.0,
        };
        let checked = match report.used > 0.0 {
            true => self.strategy.check(
                &self.global,
                self.accumulator.sum(),
                inv,
                self.config.updates.max_parameter_abs,
            ),
            false => Err(ModelCheckError::Aggregation(
                "no update carried weight".into(),
            )),
        };
        let mut step = std::mem::replace(&mut self.step, StepStats::new(now));
        if let Err(e) = checked {
            // Bound the next buffer by this one's median, as a failed round does.
            if let Some(m) = median(&mut step.norms) {
                self.median_update_norm = Some(m);
            }
            self.accumulator.reset();
            let reason = not_committed(&e);
            actions.push(Action::RoundNotCommitted {
                round: self.version + 1,
                reason: reason.clone(),
            });
            self.failed_steps += 1;
            if self.failed_steps > self.config.max_round_retries {
                self.finished = true;
                self.fit_epoch += 1;
                actions.push(Action::Aborted {
                    reason: format!("{reason}, {} server steps in a row", self.failed_steps),
                });
            }
            return;
        }
        self.failed_steps = 0;
        let global = Arc::make_mut(&mut self.global);
        self.strategy.apply(global, self.accumulator.sum(), inv);
        self.accumulator.reset();
        self.version += 1;
        self.resting.clear();
        // Tasks too old to ever be accepted free their slots now: a slow
        // client is not a broken one, and gets new work at once.
        let hopeless: Vec<ClientId> = self
            .in_flight
            .iter()
            .filter(|(_, t)| self.version - t.version > self.settings.max_staleness)
            .map(|(c, _)| c.clone())
            .collect();
        for client in hopeless {
            self.in_flight.remove(&client);
            step.dropped += 1;
        }
        record_share_caps(&mut step.weight_adjusted, &step.arrivals, &report.capped);
        let median_norm = median(&mut step.norms);
        self.median_update_norm = median_norm.or(self.median_update_norm);
        let (train_loss, train_accuracy) = step.tally.means();
        let last = self.version >= self.config.rounds;
        let outcome = RoundOutcome {
            round: self.version,
            attempts: 1,
            clients_available: self.connected.len(),
            clients_selected: step.dispatched,
            clients_answered: step.answered,
            clients_dropped: step.dropped,
            updates_rejected: step.rejections.values().sum(),
            rejections: step
                .rejections
                .iter()
                .map(|(cause, n)| (cause.name().to_string(), *n))
                .collect(),
            examples: step.tally.examples,
            weight_claimed: report.claimed,
            weight_used: report.used,
            weight_adjusted: step.weight_adjusted,
            updates_clipped: step.clipped,
            norm_bound: self.norm_bound(),
            median_update_norm: median_norm,
            client_reported_train_loss: train_loss,
            client_reported_train_accuracy: train_accuracy,
            client_metrics_ignored: step.metrics_ignored,
            federated_eval: None,
            fit_seconds: now.duration_since(step.started).as_secs_f64(),
            evaluate_seconds: 0.0,
            staleness: StalenessSummary::of(&mut step.staleness),
            secagg: None,
            privacy: None,
            checkpoint: last || self.version.is_multiple_of(self.settings.checkpoint_every),
            state: self.state(),
        };
        actions.push(Action::RoundFinished(Box::new(outcome)));
        if last {
            self.finished = true;
            self.fit_epoch += 1;
            self.in_flight.clear();
            actions.push(Action::Finished);
        }
    }
}

impl Coordinator for FedBuff {
    fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.finished {
            actions.push(Action::Finished);
        } else {
            self.fill(now, &mut actions);
        }
        actions
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.in_flight.values().map(|t| t.deadline).min()
    }

    fn tick(&mut self, now: Instant) -> Vec<Action> {
        let expired: Vec<ClientId> = self
            .in_flight
            .iter()
            .filter(|(_, t)| now >= t.deadline)
            .map(|(c, _)| c.clone())
            .collect();
        for client in expired {
            self.drop_task(&client);
        }
        let mut actions = Vec::new();
        self.fill(now, &mut actions);
        actions
    }

    fn client_joined(&mut self, client: ClientId, now: Instant) -> Vec<Action> {
        self.connected.insert(client);
        let mut actions = Vec::new();
        self.fill(now, &mut actions);
        actions
    }

    fn client_left(&mut self, client: &str, now: Instant) -> Vec<Action> {
        self.connected.remove(client);
        if self.in_flight.remove(client).is_some() {
            self.step.dropped += 1;
        }
        self.resting.remove(client);
        let mut actions = Vec::new();
        self.fill(now, &mut actions);
        actions
    }

    fn check_upload(
        &self,
        client: &str,
        round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)> {
        if self.finished {
            return Err((RejectCause::NoRound, "the run is over".into()));
        }
        // Checked first: the task itself may already have been retired as
        // hopeless at a server step.
        let tau = self.version.saturating_sub(round);
        if round <= self.version && tau > self.settings.max_staleness {
            return Err((
                RejectCause::Stale,
                format!(
                    "update is {tau} versions stale (started from version {round}, \
                     the model is at {}); the limit is {}",
                    self.version, self.settings.max_staleness
                ),
            ));
        }
        match self.in_flight.get(client) {
            Some(t) if t.task_id == task_id && t.version == round => Ok(()),
            Some(_) => Err((
                RejectCause::WrongTask,
                format!("task {task_id} of version {round} is not this client's current task"),
            )),
            None => Err((RejectCause::NotSelected, "this client holds no task".into())),
        }
    }

    fn update_received(&mut self, u: ReceivedUpdate<'_>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let reject = |reason: String| Action::UpdateRejected {
            client: u.client.to_string(),
            task_id: u.task_id,
            reason,
        };
        let policy = self.config.updates.clone();
        let norm_bound = self.norm_bound();
        let size_error = (u.delta.len() != self.global.len()).then(|| {
            format!(
                "update has {} values, model has {}",
                u.delta.len(),
                self.global.len()
            )
        });
        let verdict = self
            .check_upload(u.client, u.round, u.task_id)
            .and_then(|()| {
                gate_update(
                    &policy,
                    norm_bound,
                    u.num_examples,
                    u.delta,
                    u.norm,
                    size_error,
                )
            });
        // Whatever the verdict, a task answered is a task done (a stale or
        // malformed answer to it frees the slot too).
        let task = match self.in_flight.get(u.client) {
            Some(t) if t.task_id == u.task_id => self.in_flight.remove(u.client),
            _ => None,
        };
        let (norm, gate_scale) = match verdict {
            Ok(v) => v,
            Err((cause, reason)) => {
                *self.step.rejections.entry(cause).or_default() += 1;
                if task.is_some() {
                    self.step.dropped += 1;
                }
                actions.push(reject(reason));
                self.fill(now, &mut actions);
                return actions;
            }
        };
        let Some(task) = task else {
            return actions; // unreachable: check_upload found it
        };
        let tau = self.version - task.version;
        let scale = match self.strategy.clip_norm() {
            Some(c) if norm * gate_scale > c => c / norm,
            _ => gate_scale,
        };
        let weight = u.num_examples.min(policy.max_examples_per_update.max(1)) as f64;
        let accepted = self.strategy.accept(&UpdateInput {
            weight,
            delta: u.delta,
            norm,
            scale,
            metrics: u.metrics,
            extra: &[],
            client_lr: self.config.fit.learning_rate as f64,
            max_update_norm: policy.max_update_norm,
            norm_median_multiple: policy.max_update_norm_median_multiple,
            reject_over_bound: policy.norm_policy == NormPolicy::Reject,
        });
        let example_weight = match accepted {
            Ok(w) => w,
            Err(refused) => {
                let cause = match refused.norm_bound {
                    true => RejectCause::NormBound,
                    false => RejectCause::Strategy,
                };
                *self.step.rejections.entry(cause).or_default() += 1;
                self.step.dropped += 1;
                actions.push(reject(refused.reason));
                self.fill(now, &mut actions);
                return actions;
            }
        };
        let fold_weight = example_weight * self.settings.staleness.weight(tau);
        let step = &mut self.step;
        step.answered += 1;
        step.staleness.push(tau);
        step.norms.push(norm);
        step.arrivals.push((u.client.to_string(), u.num_examples));
        step.example_weight += example_weight;
        step.fold_weight += fold_weight;
        if weight < u.num_examples as f64 {
            step.weight_adjusted.push(WeightAdjustment {
                client: u.client.to_string(),
                claimed: u.num_examples,
                used: weight,
            });
        }
        if scale < 1.0 {
            step.clipped += 1;
        }
        let (loss, accuracy, implausible) = client_metrics(u.metrics, policy.max_client_loss);
        step.metrics_ignored += usize::from(implausible);
        step.tally.add(u.num_examples, weight, loss, accuracy);
        self.accumulator.fold(u.delta, fold_weight, scale);
        actions.push(Action::UpdateAccepted {
            client: u.client.to_string(),
            task_id: u.task_id,
        });
        if self.accumulator.updates() >= self.settings.buffer_size {
            self.server_step(now, &mut actions);
        }
        // New tasks after the step: their model is the one just committed.
        self.fill(now, &mut actions);
        actions
    }

    fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        cause: RejectCause,
        now: Instant,
    ) -> Vec<Action> {
        *self.step.rejections.entry(cause).or_default() += 1;
        if task_id.is_some() && self.in_flight.get(client).map(|t| t.task_id) == task_id {
            self.drop_task(client);
        }
        let mut actions = Vec::new();
        self.fill(now, &mut actions);
        actions
    }

    fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action> {
        if self.in_flight.get(client).map(|t| t.task_id) == Some(task_id) {
            self.drop_task(client);
        }
        let mut actions = Vec::new();
        self.fill(now, &mut actions);
        actions
    }

    fn eval_received(&mut self, _client: &str, _result: &EvalResult, _now: Instant) -> Vec<Action> {
        // FedBuff sends no evaluation tasks (see `new`).
        Vec::new()
    }

    fn is_pending(&self, client: &str, task_id: u64) -> bool {
        self.in_flight.get(client).map(|t| t.task_id) == Some(task_id)
    }

    fn fit_epoch(&self) -> u64 {
        // Uploads stay useful across server steps (staleness is weighed,
        // not fatal); they end only with the run.
        self.fit_epoch
    }

    fn global_model(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.global)
    }

    fn completed_rounds(&self) -> u64 {
        self.version
    }

    fn waiting_for(&self) -> Option<Waiting> {
        (!self.started && !self.finished).then(|| Waiting {
            round: self.completed_rounds() + 1,
            attempt: 1,
            available: self.connected.len(),
            needed: self.config.min_available_clients.max(1),
        })
    }

    fn strategy_state(&self) -> Vec<u8> {
        self.strategy.state()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedquic_protocol::FitInstructions;

    use super::*;
    use crate::engine::UpdatePolicy;
    use crate::strategy::StrategyConfig;

    fn config(rounds: u64) -> EngineConfig {
        EngineConfig {
            rounds,
            fraction_fit: 1.0,
            min_fit_clients: 1,
            max_fit_clients: 1000,
            min_available_clients: 1,
            round_deadline: Duration::from_secs(10),
            fit: FitInstructions {
                epochs: 1,
                batch_size: 1,
                learning_rate: 0.1,
                proximal_mu: 0.0,
                seed: 5,
                optimizer: Default::default(),
            },
            fraction_evaluate: 0.0,
            min_evaluate_clients: 0,
            max_round_retries: 2,
            seed: 11,
            one_task_per_connection: false,
            updates: UpdatePolicy {
                max_weight_share: 1.0,
                max_update_norm_median_multiple: None,
                ..UpdatePolicy::default()
            },
            strategy: StrategyConfig::default(),
        }
    }

    fn settings(concurrency: usize, buffer: usize, staleness: Staleness) -> FedBuffSettings {
        FedBuffSettings {
            concurrency,
            buffer_size: buffer,
            max_staleness: 10,
            staleness,
            checkpoint_every: 1,
        }
    }

    /// The fit tasks in `actions`: (client, version, task id).
    fn fits(actions: &[Action]) -> Vec<(String, u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendFit { client, task } => {
                    Some((client.clone(), task.round, task.task_id))
                }
                _ => None,
            })
            .collect()
    }

    fn outcomes(actions: &[Action]) -> Vec<&RoundOutcome> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RoundFinished(o) => Some(o.as_ref()),
                _ => None,
            })
            .collect()
    }

    /// Sends `delta` for the client's current task (examples 1).
    fn answer(
        fb: &mut FedBuff,
        client: &str,
        task: (u64, u64),
        delta: &[f32],
        now: Instant,
    ) -> Vec<Action> {
        let metrics = Vec::new();
        fb.update_received(
            ReceivedUpdate {
                client,
                task_id: task.1,
                round: task.0,
                num_examples: 1,
                metrics: &metrics,
                delta,
                // As the shell passes it (the gate checks it in debug builds).
                norm: Some(crate::engine::l2_norm(delta)),
            },
            now,
        )
    }

    fn task_of(actions: &[Action], client: &str) -> (u64, u64) {
        fits(actions)
            .into_iter()
            .find(|(c, _, _)| c == client)
            .map(|(_, v, t)| (v, t))
            .expect("a task for the client")
    }

    #[test]
    fn staleness_weights_follow_their_formulas_and_parse() {
        assert_eq!(Staleness::Constant.weight(7), 1.0);
        assert_eq!(Staleness::Polynomial { a: 0.5 }.weight(3), 0.5);
        let hinge = Staleness::Hinge { a: 10.0, b: 4.0 };
        assert_eq!(hinge.weight(4), 1.0);
        assert!((hinge.weight(5) - 1.0 / 11.0).abs() < 1e-12);
        for s in ["constant", "polynomial:0.5", "hinge:10,4"] {
            assert_eq!(s.parse::<Staleness>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "poly:1",
            "polynomial:x",
            "polynomial:-1",
            "hinge:1",
            "hinge:1,nan",
        ] {
            assert!(bad.parse::<Staleness>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keeps_concurrency_clients_training_and_refills_at_once() {
        let now = Instant::now();
        let mut fb = FedBuff::new(
            config(100),
            settings(3, 10, Staleness::Constant),
            vec![0.0; 2],
            now,
        )
        .unwrap();
        let mut actions = Vec::new();
        for c in ["a", "b", "c", "d", "e"] {
            actions.extend(fb.client_joined(c.into(), now));
        }
        let first = fits(&actions);
        assert_eq!(first.len(), 3, "concurrency 3: {first:?}");
        let (client, version, task_id) = first[0].clone();
        let after = answer(&mut fb, &client, (version, task_id), &[1.0, 1.0], now);
        assert!(matches!(after[0], Action::UpdateAccepted { .. }));
        assert_eq!(fits(&after).len(), 1, "the freed slot is refilled at once");
        assert_eq!(fb.in_flight.len(), 3);
    }

    #[test]
    fn a_step_every_buffer_size_updates_weighs_stale_ones_less() {
        let now = Instant::now();
        // s(tau) = 1 / (1 + tau).
        let mut fb = FedBuff::new(
            config(100),
            settings(2, 2, Staleness::Polynomial { a: 1.0 }),
            vec![0.0; 2],
            now,
        )
        .unwrap();
        let mut actions = fb.client_joined("a".into(), now);
        actions.extend(fb.client_joined("b".into(), now));
        let (ta, tb) = (task_of(&actions, "a"), task_of(&actions, "b"));
        assert_eq!((ta.0, tb.0), (0, 0));
        // a answers first and gets a new task from version 0.
        let after_a = answer(&mut fb, "a", ta, &[1.0, 1.0], now);
        let ta2 = task_of(&after_a, "a");
        assert_eq!(ta2.0, 0);
        // b's update fills the buffer: mean of 1 and 3, version 1.
        let after_b = answer(&mut fb, "b", tb, &[3.0, 3.0], now);
        let step = outcomes(&after_b);
        assert_eq!(step.len(), 1);
        assert_eq!(step[0].round, 1);
        assert_eq!(fb.global_model().as_slice(), &[2.0, 2.0]);
        let tb2 = task_of(&after_b, "b");
        assert_eq!(tb2.0, 1, "new work starts from the new model");
        // a's second update is one version stale (weight 1/2), b's is fresh:
        // 2 + (0.5 x 2 + 1 x 4) / 2 = 4.5.
        answer(&mut fb, "a", ta2, &[2.0, 2.0], now);
        let after = answer(&mut fb, "b", tb2, &[4.0, 4.0], now);
        let step = outcomes(&after);
        assert_eq!(fb.global_model().as_slice(), &[4.5, 4.5]);
        let staleness = step[0].staleness.as_ref().unwrap();
        assert_eq!((staleness.min, staleness.max), (0, 1));
        assert_eq!(staleness.counts, vec![1, 1]);
        assert_eq!(step[0].clients_answered, 2);
    }

    #[test]
    fn tasks_beyond_the_staleness_limit_free_their_slot_and_their_updates_are_refused() {
        let now = Instant::now();
        let mut s = settings(2, 1, Staleness::Constant);
        s.max_staleness = 0;
        let mut fb = FedBuff::new(config(100), s, vec![0.0; 2], now).unwrap();
        let mut actions = fb.client_joined("a".into(), now);
        actions.extend(fb.client_joined("b".into(), now));
        let (ta, tb) = (task_of(&actions, "a"), task_of(&actions, "b"));
        // b's update makes version 1: a's version-0 task can never be
        // accepted now, so its slot is freed and a gets new work at once (a
        // slow client is not a broken one).
        let after_b = answer(&mut fb, "b", tb, &[1.0, 1.0], now);
        assert_eq!(outcomes(&after_b)[0].clients_dropped, 1);
        assert_eq!(task_of(&after_b, "a").0, 1);
        assert!(!fb.is_pending("a", ta.1));
        // Its old upload is refused before its body is read, with the reason.
        let err = fb.check_upload("a", ta.0, ta.1).unwrap_err();
        assert_eq!(err.0, RejectCause::Stale);
        assert!(err.1.contains("1 versions stale"), "{}", err.1);
        let after = answer(&mut fb, "a", ta, &[5.0, 5.0], now);
        assert!(
            matches!(&after[0], Action::UpdateRejected { reason, .. } if reason.contains("stale"))
        );
        assert_eq!(fb.global_model().as_slice(), &[1.0, 1.0]);
    }

    #[test]
    fn the_run_ends_after_its_steps_and_checkpoints_every_n() {
        let now = Instant::now();
        let mut s = settings(1, 1, Staleness::Constant);
        s.checkpoint_every = 2;
        let mut fb = FedBuff::new(config(3), s, vec![0.0], now).unwrap();
        let mut actions = fb.client_joined("a".into(), now);
        let mut flags = Vec::new();
        let mut finished = false;
        for _ in 0..3 {
            let task = task_of(&actions, "a");
            actions = answer(&mut fb, "a", task, &[1.0], now);
            flags.extend(outcomes(&actions).iter().map(|o| o.checkpoint));
            finished = actions.iter().any(|a| matches!(a, Action::Finished));
        }
        assert_eq!(
            flags,
            vec![false, true, true],
            "every 2nd step and the last"
        );
        assert!(finished);
        assert_eq!(fb.completed_rounds(), 3);
        assert!(fits(&actions).is_empty(), "no work after the last step");
        assert!(fb.check_upload("a", 3, 99).is_err());
    }

    #[test]
    fn timed_out_and_failed_tasks_free_their_slot_and_the_client_rests() {
        let now = Instant::now();
        let mut fb = FedBuff::new(
            config(100),
            settings(1, 1, Staleness::Constant),
            vec![0.0],
            now,
        )
        .unwrap();
        let mut actions = fb.client_joined("a".into(), now);
        actions.extend(fb.client_joined("b".into(), now));
        let (first, _, task) = fits(&actions)[0].clone();
        let other = if first == "a" { "b" } else { "a" };
        assert_eq!(fb.next_deadline(), Some(now + Duration::from_secs(10)));
        let later = now + Duration::from_secs(11);
        let after = fb.tick(later);
        assert_eq!(
            task_of(&after, other).0,
            0,
            "the other client gets the slot"
        );
        assert!(!fb.is_pending(&first, task));
        // The other one fails its task: nobody is left to ask until a step.
        let (_, _, task2) = fits(&after)[0].clone();
        assert!(fits(&fb.task_failed(other, task2, later)).is_empty());
        assert!(fb.in_flight.is_empty());
    }

    #[test]
    fn round_only_strategies_and_federated_evaluation_are_refused() {
        let now = Instant::now();
        for name in ["krum", "fedmedian", "qfedavg", "scaffold"] {
            let mut c = config(10);
            c.strategy.name = name.into();
            let err = FedBuff::new(c, FedBuffSettings::default(), vec![0.0; 4], now)
                .err()
                .unwrap();
            assert!(err.contains("cannot run with FedBuff"), "{name}: {err}");
        }
        let mut c = config(10);
        c.fraction_evaluate = 0.5;
        assert!(FedBuff::new(c, FedBuffSettings::default(), vec![0.0], now).is_err());
        let bad = FedBuffSettings {
            buffer_size: 0,
            ..FedBuffSettings::default()
        };
        assert!(FedBuff::new(config(10), bad, vec![0.0], now).is_err());
    }

    #[test]
    fn resume_continues_the_version_and_task_ids() {
        let now = Instant::now();
        let mut fb = FedBuff::new(
            config(10),
            settings(1, 1, Staleness::Constant),
            vec![0.0],
            now,
        )
        .unwrap();
        let actions = fb.client_joined("a".into(), now);
        let after = answer(&mut fb, "a", task_of(&actions, "a"), &[1.0], now);
        let state = outcomes(&after)[0].state.clone();
        let model = fb.global_model().to_vec();
        let mut resumed = FedBuff::resume(
            config(10),
            settings(1, 1, Staleness::Constant),
            model,
            &state,
            &fb.strategy_state(),
            now,
        )
        .unwrap();
        assert_eq!(resumed.completed_rounds(), 1);
        let actions = resumed.client_joined("a".into(), now);
        let (version, task) = task_of(&actions, "a");
        assert_eq!(version, 1);
        assert_eq!(task, state.next_task_id);
    }
}
