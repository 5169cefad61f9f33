//! The round engine: a deterministic state machine with no I/O.
//!
//! The server shell feeds it events (a client joined or left, an update or
//! evaluation arrived, time passed) together with the current time, and
//! carries out the [`Action`]s it returns, in order. Everything that decides
//! what happens in a round lives here, so it is tested without a network,
//! with thousands of simulated clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_protocol::{EvalResult, EvaluateTask, FitInstructions, FitTask, Metrics};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::strategy::FedAvgAccumulator;

/// A client's identity: the name in its certificate.
pub type ClientId = String;

/// The largest example count an update may claim; a bigger claim would let
/// one client outweigh everyone.
pub const MAX_EXAMPLES_PER_UPDATE: u64 = 1 << 32;

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
    /// Updates refused (stale, duplicate, malformed) during the round.
    pub updates_rejected: usize,
    pub examples: u64,
    /// Example-weighted mean of the clients' training loss and accuracy.
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub federated_eval: Option<FederatedEval>,
    pub fit_seconds: f64,
    pub evaluate_seconds: f64,
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
    /// The global model now includes this round. Persist it before acting
    /// on what follows.
    RoundFinished(RoundOutcome),
    /// The last round is done.
    Finished,
    /// The run cannot go on.
    Aborted {
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Tally {
    examples: u64,
    loss_sum: f64,
    accuracy_sum: f64,
    metric_weight: f64,
}

impl Tally {
    fn add(&mut self, examples: u64, loss: Option<f64>, accuracy: Option<f64>) {
        self.examples += examples;
        if let (Some(l), Some(a)) = (loss, accuracy) {
            self.loss_sum += l * examples as f64;
            self.accuracy_sum += a * examples as f64;
            self.metric_weight += examples as f64;
        }
    }

    fn means(&self) -> (Option<f64>, Option<f64>) {
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

#[derive(Debug)]
struct FitPhase {
    attempt: u32,
    started: Instant,
    deadline: Instant,
    available: usize,
    /// Selected clients that still owe an answer, with their task id.
    pending: BTreeMap<ClientId, u64>,
    selected: usize,
    answered: BTreeSet<ClientId>,
    dropped: usize,
    rejected: usize,
    tally: Tally,
}

#[derive(Debug)]
struct EvalPhase {
    started: Instant,
    deadline: Instant,
    pending: BTreeMap<ClientId, u64>,
    clients: usize,
    tally: Tally,
    outcome: RoundOutcome,
}

#[derive(Debug)]
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

#[derive(Debug)]
pub struct RoundEngine {
    config: EngineConfig,
    global: Arc<Vec<f32>>,
    accumulator: FedAvgAccumulator,
    /// The round in progress (or next to start).
    round: u64,
    connected: BTreeSet<ClientId>,
    phase: Phase,
    next_task_id: u64,
    /// Rejections seen outside a fit phase, reported with the next round.
    stray_rejections: usize,
}

impl RoundEngine {
    /// Starts after `completed_rounds` rounds (0 for a fresh run, the
    /// checkpoint's round on resume) with `global` as the model.
    pub fn new(config: EngineConfig, global: Vec<f32>, completed_rounds: u64) -> Self {
        let len = global.len();
        let phase = if completed_rounds >= config.rounds {
            Phase::Done
        } else {
            Phase::Waiting { attempt: 1 }
        };
        RoundEngine {
            config,
            global: Arc::new(global),
            accumulator: FedAvgAccumulator::new(len),
            round: completed_rounds + 1,
            connected: BTreeSet::new(),
            phase,
            next_task_id: 1,
            stray_rejections: 0,
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
    /// that every value is finite).
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
        let mut actions = Vec::new();
        let reject = |reason: String| Action::UpdateRejected {
            client: client.to_string(),
            task_id,
            reason,
        };
        let Phase::Fit(f) = &mut self.phase else {
            self.stray_rejections += 1;
            actions.push(reject(format!(
                "no round is collecting updates (update for round {round})"
            )));
            return actions;
        };
        let verdict = match f.pending.get(client) {
            _ if round != self.round => Err(format!(
                "stale update for round {round}, current round is {}",
                self.round
            )),
            Some(&expected) if expected == task_id => Ok(()),
            Some(&expected) => Err(format!(
                "update for task {task_id}, expected task {expected}"
            )),
            None if f.answered.contains(client) => {
                Err(format!("duplicate update for task {task_id}"))
            }
            None => Err(format!(
                "client was not selected for round {round} (task {task_id})"
            )),
        }
        .and_then(|()| match num_examples {
            0 => Err("update claims zero training examples".to_string()),
            n if n > MAX_EXAMPLES_PER_UPDATE => Err(format!(
                "update claims {n} examples, limit is {MAX_EXAMPLES_PER_UPDATE}"
            )),
            _ if delta.len() != self.global.len() => Err(format!(
                "update has {} values, model has {}",
                delta.len(),
                self.global.len()
            )),
            _ => Ok(()),
        });
        match verdict {
            Err(reason) => {
                // An unusable answer to the client's *current* task ends its
                // turn; a late answer to an older task must not cost it the
                // task it holds now.
                if round == self.round && f.pending.get(client) == Some(&task_id) {
                    f.pending.remove(client);
                    f.dropped += 1;
                }
                f.rejected += 1;
                actions.push(reject(reason));
            }
            Ok(()) => {
                f.pending.remove(client);
                f.answered.insert(client.to_string());
                self.accumulator.fold(delta, num_examples as f64);
                f.tally.add(
                    num_examples,
                    metric(metrics, "loss"),
                    metric(metrics, "accuracy"),
                );
                actions.push(Action::UpdateAccepted {
                    client: client.to_string(),
                    task_id,
                });
            }
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
            && result.loss.is_finite()
            && (0.0..=1.0).contains(&result.accuracy)
            && result.examples <= MAX_EXAMPLES_PER_UPDATE
        {
            e.pending.remove(client);
            e.clients += 1;
            e.tally
                .add(result.examples, Some(result.loss), Some(result.accuracy));
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
        let mut pool: Vec<&ClientId> = self.connected.iter().collect();
        let mut rng = StdRng::seed_from_u64(mix(self.config.seed, self.round, salt));
        let count = count.min(pool.len());
        for i in 0..count {
            let j = rng.random_range(i..pool.len());
            pool.swap(i, j);
        }
        pool.truncate(count);
        pool.into_iter().cloned().collect()
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
        let selected = self.sample(self.fit_count(), attempt as u64);
        let mut pending = BTreeMap::new();
        for client in selected {
            let task_id = self.task_id();
            let mut config = self.config.fit.clone();
            config.seed = mix(self.config.fit.seed, self.round, task_id);
            pending.insert(client.clone(), task_id);
            actions.push(Action::SendFit {
                client,
                task: FitTask {
                    round: self.round,
                    task_id,
                    config,
                },
            });
        }
        self.accumulator.reset();
        self.phase = Phase::Fit(FitPhase {
            attempt,
            started: now,
            deadline: now + self.config.round_deadline,
            available: self.connected.len(),
            selected: pending.len(),
            pending,
            answered: BTreeSet::new(),
            dropped: 0,
            rejected: std::mem::take(&mut self.stray_rejections),
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
        let Phase::Fit(f) = std::mem::replace(&mut self.phase, Phase::Waiting { attempt: 1 })
        else {
            return;
        };
        let answered = f.answered.len();
        let dropped = f.dropped + f.pending.len();
        if answered < self.config.min_fit_clients.max(1) {
            // Too few answers: drop the partial sum and try a fresh selection.
            self.accumulator.reset();
            if f.attempt > self.config.max_round_retries {
                self.phase = Phase::Aborted;
                actions.push(Action::Aborted {
                    reason: format!(
                        "round {} got {answered} of the {} updates it needs, after {} attempts",
                        self.round, self.config.min_fit_clients, f.attempt
                    ),
                });
                return;
            }
            let attempt = f.attempt + 1;
            actions.push(Action::RoundRetry {
                round: self.round,
                attempt,
                answered,
                needed: self.config.min_fit_clients,
            });
            self.stray_rejections += f.rejected;
            self.try_start_fit(attempt, now, actions);
            return;
        }
        self.accumulator
            .apply_mean(Arc::make_mut(&mut self.global).as_mut_slice());
        let (train_loss, train_accuracy) = f.tally.means();
        let outcome = RoundOutcome {
            round: self.round,
            attempts: f.attempt,
            clients_available: f.available,
            clients_selected: f.selected,
            clients_answered: answered,
            clients_dropped: dropped,
            updates_rejected: f.rejected,
            examples: f.tally.examples,
            train_loss,
            train_accuracy,
            federated_eval: None,
            fit_seconds: now.duration_since(f.started).as_secs_f64(),
            evaluate_seconds: 0.0,
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
                deadline: now + self.config.round_deadline,
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

    fn finish_round(&mut self, outcome: RoundOutcome, now: Instant, actions: &mut Vec<Action>) {
        actions.push(Action::RoundFinished(outcome));
        if self.round >= self.config.rounds {
            self.phase = Phase::Done;
            actions.push(Action::Finished);
        } else {
            self.round += 1;
            self.try_start_fit(1, now, actions);
        }
    }
}

/// ceil(fraction * n), immune to float error such as 0.07 * 100 = 7.000000000000001.
fn fraction_of(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64) - 1e-9).ceil().max(0.0) as usize
}

fn metric(metrics: &Metrics, name: &str) -> Option<f64> {
    metrics
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
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
