//! Rounds with secure aggregation: the aggregator learns the sum of the
//! round's updates and nothing about any one of them.
//!
//! SecAgg+ (Bell et al., CCS 2020), the k-regular-graph refinement of
//! Bonawitz et al. (CCS 2017), runs inside each round as explicit phases of
//! this pure coordinator, each with its own deadline:
//!
//! 1. **Advertise keys.** Selected clients get their fit task (and the
//!    model) and answer at once with two fresh public keys, then train.
//! 2. **Share keys.** The aggregator sends each client its neighbours in a
//!    k-regular graph; each answers with Shamir shares of its self-mask seed
//!    and mask key, encrypted to each neighbour.
//! 3. **Masked input.** The aggregator relays the shares; each client,
//!    once trained, sends its clipped, weighted, quantised update masked
//!    with pairwise and self masks (codec `ring32`). The sum is folded as
//!    the inputs arrive (O(model) memory).
//! 4. **Unmask.** Survivors' neighbours return shares of their self-mask
//!    seeds, dropped clients' neighbours shares of their mask keys; the
//!    masks cancel and the sum is decoded.
//!
//! A phase that closes with fewer than `min_clients`, or an unmask that
//! cannot reconstruct every secret it needs, fails the round cleanly:
//! nothing is unmasked, and the round starts again with a new selection
//! (up to `max_round_retries` times). The cryptography itself lives in
//! [`fedquic_privacy::secagg`]; this module only drives it.
//!
//! What secure aggregation rules out: anything that needs one client's
//! update. Robust strategies, SCAFFOLD, q-FedAvg, per-update norm checks and
//! FedBuff are refused at setup; norm bounding moves to the client (it
//! clips before masking, and the aggregator learns only how many updates
//! were within the bound).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_privacy::secagg::{Phase as SecAggPhase, ServerParams, ServerRound, Threshold};
use fedquic_protocol::{ClientNoise, EvalResult, FitTask, SecAggStep, SecAggTask};
use serde::Serialize;

use crate::coordinator::{Coordinator, ReceivedUpdate};
use crate::engine::{
    Action, ClientId, EngineConfig, EngineState, RejectCause, RetryPolicy, RoundOutcome, Tally,
    Waiting, client_metrics, fraction_of, mix, not_committed, retire, sample_clients,
};
use crate::privacy::{Privacy, PrivacySummary, RoundNoise};
use crate::strategy::Strategy;

/// Largest graph degree: a [`SecAggStep::RelayedShares`] for this many
/// neighbours still fits one control frame.
pub const MAX_DEGREE: usize = 256;

/// How secure aggregation runs (the `[secure_aggregation]` config section).
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggSettings {
    /// Neighbours per client (k). 0 picks `2 ceil(log2 n)` for n clients;
    /// k >= n - 1 is the complete graph (Bonawitz et al.'s original).
    pub degree: usize,
    /// Shares needed to rebuild a secret, as a fraction of the degree; never
    /// below a majority of the neighbourhood (`floor(k/2) + 1`).
    pub threshold: f64,
    /// Deadline of each key-exchange phase (the masked-input phase has the
    /// round deadline, since clients train during it).
    pub phase_timeout: Duration,
    /// Clients clip their update to this L2 norm before masking.
    pub clip_norm: f64,
    /// Updates weigh `min(examples, weight_cap) / weight_cap`; 0 weighs
    /// every update 1 (differential privacy needs equal weights).
    pub weight_cap: u64,
    /// Fewest clients any phase may close with; fewer fails the round.
    pub min_clients: usize,
}

impl SecAggSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.degree > MAX_DEGREE {
            return Err(format!(
                "secure_aggregation.degree {} is above {MAX_DEGREE} (a relayed-shares message must fit one control frame)",
                self.degree
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(format!(
                "secure_aggregation.threshold {} must be a fraction of the degree in (0, 1]",
                self.threshold
            ));
        }
        if self.phase_timeout.is_zero() || self.phase_timeout > Duration::from_secs(3600) {
            return Err("secure_aggregation.phase_timeout_secs must be in (0, 3600]".into());
        }
        if !(self.clip_norm.is_finite()
            && self.clip_norm > 0.0
            && self.clip_norm <= SecAggTask::MAX_MAGNITUDE)
        {
            return Err(format!(
                "secure_aggregation.clip_norm {} must be in (0, {}]",
                self.clip_norm,
                SecAggTask::MAX_MAGNITUDE
            ));
        }
        if self.min_clients < 2 {
            return Err(
                "secure_aggregation.min_clients must be at least 2: one client's sum is its update"
                    .into(),
            );
        }
        Ok(())
    }

    /// The degree for a round of `n` clients.
    pub fn degree_for(&self, n: usize) -> usize {
        let k = match self.degree {
            0 => 2 * (n.max(2) as f64).log2().ceil() as usize,
            k => k,
        };
        k.min(n.saturating_sub(1)).min(MAX_DEGREE)
    }
}

/// What one round's secure aggregation saw, for the metrics.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SecAggSummary {
    /// Graph degree and Shamir threshold.
    pub degree: usize,
    pub threshold: usize,
    /// Clients at each phase: selected, advertised keys (U1), shared keys
    /// (U2), sent a masked input (U3), answered the unmask request (U4).
    pub selected: usize,
    pub advertised: usize,
    pub shared: usize,
    pub masked: usize,
    pub unmask_answers: usize,
    /// Contributors whose update was within the clip norm before clipping
    /// (a secure sum: no one's own bit is revealed).
    pub within_clip: f64,
    /// Seconds each phase took, in order.
    pub phase_seconds: Vec<f64>,
}

struct Round {
    /// What every selected client was told (fixed point, clip, noise).
    task: SecAggTask,
    attempt: u32,
    available: usize,
    server: ServerRound,
    /// Selected clients and their task ids; clients that left are removed.
    tasks: BTreeMap<ClientId, u64>,
    selected: usize,
    started: Instant,
    phase_started: Instant,
    phase_deadline: Instant,
    fit_deadline: Instant,
    phase_seconds: Vec<f64>,
    counts: [usize; 4],
    degree: usize,
    rejections: BTreeMap<RejectCause, usize>,
    metrics_ignored: usize,
    tally: Tally,
}

enum Stage {
    Waiting { attempt: u32 },
    Round(Box<Round>),
    Done,
    Aborted,
}

/// The secure-aggregation coordinator (see the module docs).
pub struct SecAggEngine {
    config: EngineConfig,
    settings: SecAggSettings,
    privacy: Option<Privacy>,
    global: Arc<Vec<f32>>,
    strategy: Box<dyn Strategy>,
    /// Rounds committed.
    completed: u64,
    next_task_id: u64,
    connected: BTreeSet<ClientId>,
    stage: Stage,
    fit_epoch: u64,
    /// Decoded sums (update, weight, within-clip), reused every round.
    decoded: Vec<f64>,
}

impl SecAggEngine {
    /// A fresh run from `initial`. Fails on settings out of bounds or a
    /// strategy or update policy that needs individual updates.
    pub fn new(
        config: EngineConfig,
        settings: SecAggSettings,
        privacy: Option<Privacy>,
        initial: Vec<f32>,
    ) -> Result<SecAggEngine, String> {
        settings.validate()?;
        let strategy = config.strategy.build(initial.len())?;
        if strategy.robust().is_some()
            || strategy.control_variate().is_some()
            || strategy.wants_initial_loss()
            || strategy.clip_norm().is_some()
        {
            return Err(format!(
                "strategy '{}' needs individual updates, which secure aggregation hides; \
                 use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad \
                 (norm bounding moves to the client: secure_aggregation.clip_norm)",
                strategy.name()
            ));
        }
        let updates = &config.updates;
        // (The median-multiple bound, on by default, has no median to work
        // from here and is not used.)
        if updates.max_update_norm.is_some() {
            return Err(
                "per-update norm checks need individual updates, which secure aggregation hides; \
                 remove updates.max_update_norm and set secure_aggregation.clip_norm \
                 (clients clip before masking)"
                    .into(),
            );
        }
        if config.fraction_evaluate > 0.0 {
            return Err(
                "federated evaluation is not run with secure aggregation yet; use central evaluation"
                    .into(),
            );
        }
        if config.max_fit_clients > fedquic_privacy::secagg::MAX_ROSTER as usize {
            return Err(format!(
                "max_fit_clients {} is above the {} clients a secure-aggregation round can hold",
                config.max_fit_clients,
                fedquic_privacy::secagg::MAX_ROSTER
            ));
        }
        if let Some(p) = &privacy
            && settings.weight_cap != 0
        {
            return Err(format!(
                "differential privacy ({}) needs equal weights: set secure_aggregation.weight_cap = 0",
                p.mode_name()
            ));
        }
        let decoded = vec![0.0; SecAggTask::vector_len(initial.len())];
        Ok(SecAggEngine {
            config,
            settings,
            privacy,
            global: Arc::new(initial),
            strategy,
            completed: 0,
            next_task_id: 1,
            connected: BTreeSet::new(),
            stage: Stage::Waiting { attempt: 1 },
            fit_epoch: 0,
            decoded,
        })
    }

    /// Continues from a checkpoint: its model, engine state and strategy
    /// state (which holds the privacy accountant's spent budget too).
    pub fn resume(
        config: EngineConfig,
        settings: SecAggSettings,
        privacy: Option<Privacy>,
        model: Vec<f32>,
        state: &EngineState,
        strategy_state: &[u8],
    ) -> Result<SecAggEngine, String> {
        let len = model.len();
        let mut engine = SecAggEngine::new(config, settings, privacy, model)?;
        let (strategy_state, privacy_state) = crate::privacy::split_state(strategy_state)?;
        engine.strategy.restore(strategy_state, len)?;
        crate::privacy::restore_privacy(engine.privacy.as_mut(), privacy_state)?;
        engine.completed = state.completed_rounds;
        engine.next_task_id = state.next_task_id;
        if engine.completed >= engine.config.rounds {
            engine.stage = Stage::Done;
        }
        Ok(engine)
    }

    fn state(&self) -> EngineState {
        EngineState {
            completed_rounds: self.completed,
            next_task_id: self.next_task_id,
            selection_seed: self.config.seed,
            fit_seed: self.config.fit.seed,
            median_update_norm: None,
        }
    }

    /// The round being run (rounds are numbered from 1).
    pub fn round(&self) -> u64 {
        self.completed + 1
    }

    /// The SecAgg phase the current round is in, if one is running.
    pub fn phase(&self) -> Option<SecAggPhase> {
        match &self.stage {
            Stage::Round(r) => Some(r.server.phase()),
            _ => None,
        }
    }

    /// What a client's fit task says about secure aggregation, for a round
    /// of `selected` clients.
    fn task_settings(&self, selected: usize) -> SecAggTask {
        let noise_std = self
            .privacy
            .as_ref()
            .map_or(0.0, |p| p.client_noise_std(selected));
        let mut task = SecAggTask {
            clip_norm: self.clip_norm(),
            weight_cap: self.settings.weight_cap,
            // Room for the noise (8 standard deviations) and for the weight
            // and indicator values, which are at most 1.
            bound: (self.clip_norm() + 8.0 * noise_std).max(1.0),
            max_contributors: selected as u32,
            noise: ClientNoise::None,
        };
        if noise_std > 0.0
            && let Ok(fixed_point) = task.fixed_point()
        {
            // Skellam(mu) has variance 2 mu, in integer units.
            let std = noise_std * fixed_point.scale();
            task.noise = ClientNoise::Skellam {
                mu: (std * std / 2.0).clamp(f64::MIN_POSITIVE, SecAggTask::MAX_SKELLAM_MU),
            };
        }
        task
    }

    /// The clip norm clients use this round: differential privacy's
    /// (possibly adaptive) one when it is on.
    fn clip_norm(&self) -> f64 {
        self.privacy
            .as_ref()
            .map_or(self.settings.clip_norm, |p| p.clip_norm())
    }

    fn try_start(&mut self, attempt: u32, now: Instant, actions: &mut Vec<Action>) {
        let needed = self
            .config
            .min_available_clients
            .max(self.config.min_fit_clients)
            .max(self.settings.min_clients);
        if self.connected.len() < needed {
            self.stage = Stage::Waiting { attempt };
            return;
        }
        let n = self.connected.len();
        let count = fraction_of(self.config.fraction_fit, n)
            .max(self.config.min_fit_clients)
            .max(self.settings.min_clients)
            .min(self.config.max_fit_clients.max(self.settings.min_clients))
            .min(n);
        // The privacy budget is checked before every round, the first too.
        if let Some(reason) = self.privacy.as_ref().and_then(|p| p.stop_reason(count)) {
            tracing::warn!("stopping: {reason}");
            self.stage = Stage::Done;
            actions.push(Action::Finished);
            return;
        }
        let selected = sample_clients(
            &self.connected,
            count,
            mix(self.config.seed, self.round(), attempt as u64),
        );
        if self.config.one_task_per_connection {
            retire(&mut self.connected, &selected);
        }
        let degree = self.settings.degree_for(selected.len());
        let round = self.round();
        let server = ServerRound::new(ServerParams {
            round,
            vector_len: SecAggTask::vector_len(self.global.len()),
            degree,
            threshold: Threshold::Fraction(self.settings.threshold),
            min_clients: self.settings.min_clients,
            graph_seed: mix(self.config.seed, round, 0x5eca66 + attempt as u64),
        });
        let secagg = self.task_settings(selected.len());
        if let Err(e) = secagg.validate() {
            self.stage = Stage::Aborted;
            actions.push(Action::Aborted {
                reason: format!("cannot set up secure aggregation: {e}"),
            });
            return;
        }
        let mut tasks = BTreeMap::new();
        for client in selected {
            let task_id = self.next_task_id;
            self.next_task_id += 1;
            let mut config = self.strategy.configure_fit(round, &self.config.fit);
            config.seed = mix(self.config.fit.seed, round, task_id);
            tasks.insert(client.clone(), task_id);
            actions.push(Action::SendFit {
                client,
                task: FitTask {
                    round,
                    task_id,
                    config,
                    initial_loss: false,
                    scaffold: None,
                    secagg: Some(secagg.clone()),
                },
            });
        }
        let phase_deadline = now.checked_add(self.settings.phase_timeout).unwrap_or(now);
        let fit_deadline = now.checked_add(self.config.round_deadline).unwrap_or(now);
        self.stage = Stage::Round(Box::new(Round {
            task: secagg,
            attempt,
            available: n,
            server,
            selected: tasks.len(),
            tasks,
            started: now,
            phase_started: now,
            phase_deadline,
            fit_deadline,
            phase_seconds: Vec::new(),
            counts: [0; 4],
            degree,
            rejections: BTreeMap::new(),
            metrics_ignored: 0,
            tally: Tally::default(),
        }));
    }

    /// Closes the current phase if everyone it waits for has answered.
    fn close_if_complete(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Stage::Round(r) = &self.stage else {
            return;
        };
        if r.tasks.keys().all(|c| !r.server.expects(c)) {
            self.close_phase(now, actions);
        }
    }

    /// Ends the current phase: sends the next phase's messages, or commits,
    /// or fails the round.
    fn close_phase(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Stage::Round(r) = &mut self.stage else {
            return;
        };
        r.phase_seconds
            .push(now.duration_since(r.phase_started).as_secs_f64());
        r.phase_started = now;
        let timeout = self.settings.phase_timeout;
        // Sends each client its message of the next phase; returns how many
        // clients the phase closed with.
        fn send<T>(
            r: &Round,
            out: Vec<(String, T)>,
            step: fn(T) -> SecAggStep,
            actions: &mut Vec<Action>,
        ) -> usize {
            let closed_with = out.len();
            for (client, message) in out {
                if let Some(&task_id) = r.tasks.get(&client) {
                    actions.push(Action::SendSecAgg {
                        client,
                        task_id,
                        step: step(message),
                    });
                }
            }
            closed_with
        }
        let result = match r.server.phase() {
            SecAggPhase::AdvertiseKeys => r.server.close_advertise().map(|out| {
                r.counts[0] = send(r, out, SecAggStep::Neighbours, actions);
                r.phase_deadline = now.checked_add(timeout).unwrap_or(now);
            }),
            SecAggPhase::ShareKeys => r.server.close_sharing().map(|out| {
                r.counts[1] = send(r, out, SecAggStep::RelayedShares, actions);
                // Clients train during key exchange: the masked input is due
                // at the round deadline, with at least one phase's grace.
                r.phase_deadline = r.fit_deadline.max(now.checked_add(timeout).unwrap_or(now));
            }),
            SecAggPhase::MaskedInput => r.server.close_masked_input().map(|out| {
                r.counts[2] = send(r, out, SecAggStep::UnmaskRequest, actions);
                r.phase_deadline = now.checked_add(timeout).unwrap_or(now);
            }),
            SecAggPhase::Unmask => {
                // Uploads still in flight are of no use any more.
                self.fit_epoch += 1;
                return self.finish_round(now, actions);
            }
            SecAggPhase::Done => Ok(()),
        };
        if let Err(e) = result {
            self.fail_round(format!("secure aggregation failed: {e}"), now, actions);
        } else if let Stage::Round(r) = &self.stage
            && r.server.phase() == SecAggPhase::Unmask
        {
            self.fit_epoch += 1;
        }
    }

    /// The unmask phase is over: rebuild the sum, take the server step.
    fn finish_round(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let stage = std::mem::replace(&mut self.stage, Stage::Done);
        let Stage::Round(mut r) = stage else {
            self.stage = stage;
            return;
        };
        r.counts[3] = r.tasks.len().min(r.counts[2]);
        let secagg = r.task.clone();
        let round = self.round();
        let threshold = r.server.threshold();
        let server = std::mem::replace(
            &mut r.server,
            ServerRound::new(ServerParams {
                round,
                vector_len: 0,
                degree: 0,
                threshold: Threshold::Fraction(1.0),
                min_clients: 2,
                graph_seed: 0,
            }),
        );
        let unmasked = match server.finish() {
            Ok(u) => u,
            Err(e) => {
                let reason = format!("secure aggregation failed: {e}");
                return self.fail_attempt(&r, r.counts[2], reason, now, actions);
            }
        };
        let contributors = unmasked.contributors.len();
        let fixed_point = match secagg.fixed_point() {
            Ok(fp) => fp,
            Err(e) => {
                return self.fail_attempt(
                    &r,
                    contributors,
                    format!("cannot decode the sum: {e}"),
                    now,
                    actions,
                );
            }
        };
        // From here the sum is unmasked: under distributed DP the aggregator has
        // seen it, so even an attempt that fails is charged (`fail_unmasked`).
        let noise = match secagg.noise {
            ClientNoise::Skellam { mu } => RoundNoise::Skellam {
                mu,
                contributors,
                scale: fixed_point.scale(),
                dim: self.decoded.len(),
            },
            ClientNoise::None => RoundNoise::Central,
        };
        if let Err(e) = fixed_point.decode_sum(&unmasked.sum, &mut self.decoded) {
            let reason = format!("cannot decode the sum: {e}");
            return self.fail_unmasked(&r, contributors, noise, reason, now, actions);
        }
        let values = self.global.len();
        let weight = self.decoded[values];
        let within_clip = self.decoded[values + 1];
        let (sum, _) = self.decoded.split_at_mut(values);
        let mu = match secagg.noise {
            ClientNoise::Skellam { mu } => mu,
            _ => 0.0,
        };
        if let Some(reason) = implausible_sum(
            sum,
            weight,
            within_clip,
            contributors,
            secagg.clip_norm,
            fixed_point.scale(),
            mu,
        ) {
            return self.fail_unmasked(&r, contributors, noise, reason, now, actions);
        }
        let mut privacy_summary: Option<PrivacySummary> = None;
        if let Some(p) = &self.privacy
            && let Err(e) = p.noise_sum(sum, mix(self.config.seed, round, 0xd9))
        {
            let reason = format!("cannot add the DP noise: {e}");
            return self.fail_unmasked(&r, contributors, noise, reason, now, actions);
        }
        // Equal weights under DP: the mean is over the contributors.
        let divisor = match self.privacy.is_some() {
            true => contributors as f64,
            false => weight,
        };
        if !(divisor.is_finite() && divisor > 0.5 / SecAggTask::MAX_MAGNITUDE) {
            let reason = format!("the unmasked weights sum to {weight}: nothing to average");
            return self.fail_unmasked(&r, contributors, noise, reason, now, actions);
        }
        let inv = self.strategy.sum_scale(divisor);
        if let Err(e) = self.strategy.check(
            &self.global,
            sum,
            inv,
            self.config.updates.max_parameter_abs,
        ) {
            let reason = not_committed(&e);
            return self.fail_unmasked(&r, contributors, noise, reason, now, actions);
        }
        let global = Arc::make_mut(&mut self.global);
        self.strategy.apply(global, sum, inv);
        if let Some(p) = &mut self.privacy {
            match p.account(
                r.selected,
                within_clip,
                noise,
                mix(self.config.seed, round, 0xc1),
            ) {
                Ok(summary) => privacy_summary = Some(summary),
                // The model moved: the round stands, but the run cannot go on
                // without knowing what it spent.
                Err(e) => {
                    actions.push(Action::Aborted {
                        reason: format!("privacy accounting failed: {e}"),
                    });
                    self.stage = Stage::Aborted;
                    return;
                }
            }
        }
        self.completed += 1;
        let (train_loss, train_accuracy) = r.tally.means();
        let outcome = RoundOutcome {
            round,
            attempts: r.attempt,
            clients_available: r.available,
            clients_selected: r.selected,
            clients_answered: contributors,
            clients_dropped: r.selected.saturating_sub(contributors),
            updates_rejected: r.rejections.values().sum(),
            rejections: r
                .rejections
                .iter()
                .map(|(cause, n)| (cause.name().to_string(), *n))
                .collect(),
            examples: r.tally.examples,
            weight_claimed: weight,
            weight_used: weight,
            weight_adjusted: Vec::new(),
            updates_clipped: (contributors as f64 - within_clip).round().max(0.0) as usize,
            norm_bound: Some(secagg.clip_norm),
            median_update_norm: None,
            client_reported_train_loss: train_loss,
            client_reported_train_accuracy: train_accuracy,
            client_metrics_ignored: r.metrics_ignored,
            federated_eval: None,
            fit_seconds: now.duration_since(r.started).as_secs_f64(),
            evaluate_seconds: 0.0,
            staleness: None,
            secagg: Some(Box::new(SecAggSummary {
                degree: r.degree,
                threshold,
                selected: r.selected,
                advertised: r.counts[0],
                shared: r.counts[1],
                masked: contributors,
                unmask_answers: r.counts[3],
                within_clip,
                phase_seconds: r.phase_seconds.clone(),
            })),
            privacy: privacy_summary.map(Box::new),
            checkpoint: true,
            state: self.state(),
        };
        actions.push(Action::RoundFinished(Box::new(outcome)));
        if self.completed >= self.config.rounds {
            self.stage = Stage::Done;
            actions.push(Action::Finished);
        } else {
            self.try_start(1, now, actions);
        }
    }

    fn fail_round(&mut self, reason: String, now: Instant, actions: &mut Vec<Action>) {
        let Stage::Round(r) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return;
        };
        let answered = r
            .counts
            .iter()
            .copied()
            .filter(|&c| c > 0)
            .min()
            .unwrap_or(0);
        self.fail_attempt(&r, answered, reason, now, actions);
    }

    /// Ends attempt `r` without a commit: its clients are told, and the
    /// round starts again with a new selection (or the run gives up).
    /// [`Self::fail_attempt`] for an attempt whose sum was unmasked: its release
    /// is charged to the accountant first (`Privacy::account_uncommitted`); a
    /// run that cannot account for it stops.
    fn fail_unmasked(
        &mut self,
        r: &Round,
        answered: usize,
        noise: RoundNoise,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let selected = r.selected;
        if let Some(p) = &mut self.privacy
            && let Err(e) = p.account_uncommitted(selected, noise)
        {
            actions.push(Action::Aborted {
                reason: format!("privacy accounting failed: {e}"),
            });
            self.stage = Stage::Aborted;
            return;
        }
        self.fail_attempt(r, answered, reason, now, actions)
    }

    fn fail_attempt(
        &mut self,
        r: &Round,
        answered: usize,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        self.fit_epoch += 1;
        for (client, &task_id) in &r.tasks {
            actions.push(Action::UpdateRejected {
                client: client.clone(),
                task_id,
                reason: reason.clone(),
            });
        }
        let round = self.round();
        actions.push(Action::RoundNotCommitted {
            round,
            reason: reason.clone(),
        });
        let retry = RetryPolicy {
            round,
            attempt: r.attempt,
            max_retries: self.config.max_round_retries,
            answered,
            needed: self.settings.min_clients,
        };
        match retry.next_attempt(&reason, actions) {
            Some(attempt) => self.try_start(attempt, now, actions),
            None => self.stage = Stage::Aborted,
        }
    }

    fn task_of(&self, client: &str) -> Option<u64> {
        match &self.stage {
            Stage::Round(r) => r.tasks.get(client).copied(),
            _ => None,
        }
    }

    /// A client is out of the current round (left, failed, misbehaved).
    fn drop_client(&mut self, client: &str, now: Instant, actions: &mut Vec<Action>) {
        if let Stage::Round(r) = &mut self.stage
            && r.tasks.remove(client).is_some()
        {
            self.close_if_complete(now, actions);
        }
    }

    fn reject(
        &mut self,
        client: &str,
        task_id: u64,
        cause: RejectCause,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        if let Stage::Round(r) = &mut self.stage {
            *r.rejections.entry(cause).or_default() += 1;
        }
        actions.push(Action::UpdateRejected {
            client: client.to_string(),
            task_id,
            reason,
        });
    }
}

impl Coordinator for SecAggEngine {
    fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Stage::Waiting { attempt } = self.stage {
            self.try_start(attempt, now, &mut actions);
        }
        actions
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.stage {
            Stage::Round(r) => Some(r.phase_deadline),
            _ => None,
        }
    }

    fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Stage::Round(r) = &self.stage
            && now >= r.phase_deadline
        {
            self.close_phase(now, &mut actions);
        }
        actions
    }

    fn client_joined(&mut self, client: ClientId, now: Instant) -> Vec<Action> {
        self.connected.insert(client);
        let mut actions = Vec::new();
        if let Stage::Waiting { attempt } = self.stage {
            self.try_start(attempt, now, &mut actions);
        }
        actions
    }

    fn client_left(&mut self, client: &str, now: Instant) -> Vec<Action> {
        self.connected.remove(client);
        let mut actions = Vec::new();
        self.drop_client(client, now, &mut actions);
        actions
    }

    fn check_upload(
        &self,
        client: &str,
        round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)> {
        let Stage::Round(r) = &self.stage else {
            return Err((RejectCause::NoRound, "no round is running".into()));
        };
        if r.tasks.get(client) != Some(&task_id) || round != self.round() {
            return Err((
                RejectCause::WrongTask,
                format!("no task {task_id} of round {round} is pending for this client"),
            ));
        }
        if r.server.phase() != SecAggPhase::MaskedInput || !r.server.expects(client) {
            return Err((
                RejectCause::Stale,
                format!(
                    "a masked input is not expected now (secure aggregation is in phase {:?})",
                    r.server.phase()
                ),
            ));
        }
        Ok(())
    }

    fn update_received(&mut self, u: ReceivedUpdate<'_>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Err((cause, reason)) = self.check_upload(u.client, u.round, u.task_id) {
            self.reject(u.client, u.task_id, cause, reason, &mut actions);
            return actions;
        }
        let max_loss = self.config.updates.max_client_loss;
        let Stage::Round(r) = &mut self.stage else {
            return actions;
        };
        let masked: &[u32] = bytemuck::cast_slice(u.delta);
        match r.server.on_masked_input(u.client, masked) {
            Ok(()) => {
                let (loss, accuracy, implausible) = client_metrics(u.metrics, max_loss);
                r.metrics_ignored += usize::from(implausible);
                r.tally.add(u.num_examples, 1.0, loss, accuracy);
                actions.push(Action::UpdateAccepted {
                    client: u.client.to_string(),
                    task_id: u.task_id,
                });
                self.close_if_complete(now, &mut actions);
            }
            Err(e) => {
                let reason = format!("masked input refused: {e}");
                self.reject(
                    u.client,
                    u.task_id,
                    RejectCause::Malformed,
                    reason,
                    &mut actions,
                );
            }
        }
        actions
    }

    fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        cause: RejectCause,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(task_id) = task_id
            && self.task_of(client) == Some(task_id)
        {
            if let Stage::Round(r) = &mut self.stage {
                *r.rejections.entry(cause).or_default() += 1;
            }
            self.drop_client(client, now, &mut actions);
        }
        actions
    }

    fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.task_of(client) == Some(task_id) {
            self.drop_client(client, now, &mut actions);
        }
        actions
    }

    fn eval_received(&mut self, client: &str, result: &EvalResult, _now: Instant) -> Vec<Action> {
        vec![Action::EvalRejected {
            client: client.to_string(),
            task_id: result.task_id,
            reason: "no evaluation was asked for".into(),
        }]
    }

    fn secagg_received(
        &mut self,
        client: &str,
        task_id: u64,
        step: &SecAggStep,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.task_of(client) != Some(task_id) {
            return actions;
        }
        let Stage::Round(r) = &mut self.stage else {
            return actions;
        };
        let secure = |e: fedquic_privacy::secagg::SecAggError| format!("secure aggregation: {e}");
        let result = match step {
            SecAggStep::AdvertiseKeys(m) => r.server.on_keys(client, m).map_err(secure),
            SecAggStep::ShareKeys(m) => r.server.on_shares(client, m).map_err(secure),
            SecAggStep::UnmaskResponse(m) => r.server.on_unmask(client, m).map_err(secure),
            other => Err(format!("a client cannot send '{}'", other.name())),
        };
        match result {
            Ok(()) => self.close_if_complete(now, &mut actions),
            Err(reason) => {
                // The client is out of this round; the protocol goes on
                // without it as if it had dropped.
                self.reject(
                    client,
                    task_id,
                    RejectCause::Malformed,
                    reason,
                    &mut actions,
                );
                self.drop_client(client, now, &mut actions);
            }
        }
        actions
    }

    fn is_pending(&self, client: &str, task_id: u64) -> bool {
        self.task_of(client) == Some(task_id)
    }

    fn fit_epoch(&self) -> u64 {
        self.fit_epoch
    }

    fn global_model(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.global)
    }

    fn completed_rounds(&self) -> u64 {
        self.completed
    }

    fn waiting_for(&self) -> Option<Waiting> {
        match self.stage {
            Stage::Waiting { attempt } => Some(Waiting {
                round: self.round(),
                attempt,
                available: self.connected.len(),
                needed: self
                    .config
                    .min_available_clients
                    .max(self.config.min_fit_clients)
                    .max(self.settings.min_clients),
            }),
            _ => None,
        }
    }

    fn strategy_state(&self) -> Vec<u8> {
        crate::privacy::join_state(
            self.strategy.state(),
            self.privacy.as_ref().map(|p| p.state()),
        )
    }
}

/// Why an unmasked sum cannot have come from `contributors` honest clients,
/// if it cannot. Secure aggregation hides each client's input, so only the sum
/// can be checked, against what honest inputs sum to: each client's weight `w`
/// is in [0, 1] and its within-clip indicator 0 or 1, and its values are its
/// update clipped to `clip_norm` and scaled by `w`, so the sum's norm is at most
/// the total weight times `clip_norm`. Slack covers stochastic rounding (under
/// one unit of `1 / scale` per value and client) and the clients' Skellam noise
/// (`mu` each, ten standard deviations). A client that adds to its masked
/// words can still move the mean anywhere within `clip_norm`; per-client range
/// proofs would be needed to stop that (README, "Security model").
fn implausible_sum(
    sum: &[f64],
    weight: f64,
    within_clip: f64,
    contributors: usize,
    clip_norm: f64,
    scale: f64,
    mu: f64,
) -> Option<String> {
    let n = contributors as f64;
    let rounding = n / scale;
    let noise = (2.0 * mu * n).sqrt() / scale;
    let slot_slack = rounding + 10.0 * noise;
    if !(-slot_slack..=n + slot_slack).contains(&within_clip) {
        return Some(format!(
            "the unmasked within-clip count is {within_clip}, impossible for {contributors} clients"
        ));
    }
    // NaN fails too.
    if !(..=n + slot_slack).contains(&weight) {
        return Some(format!(
            "the unmasked weights sum to {weight}, more than {contributors} clients can send"
        ));
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
    let per_value = rounding + noise;
    let allowed =
        weight.max(0.0) * clip_norm + per_value * (sum.len() as f64).sqrt() + 10.0 * noise;
    if !(..=allowed).contains(&norm) {
        return Some(format!(
            "the unmasked sum's norm {norm:.4e} exceeds what clients of total weight {weight:.4e} \
             clipped to {clip_norm} can send ({allowed:.4e}): a client altered its masked input"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    //! The phases driven without a network: clients are
    //! `fedquic_privacy::secagg::ClientRound`s fed the engine's actions;
    //! dropouts are clients that stay silent until a deadline passes.

    use std::collections::BTreeMap;

    use fedquic_privacy::secagg::ClientRound;
    use fedquic_protocol::{FitInstructions, SecAggStep};

    use super::*;
    use crate::engine::UpdatePolicy;

    const P: usize = 16;

    fn config(clients: usize) -> EngineConfig {
        EngineConfig {
            rounds: 3,
            fraction_fit: 1.0,
            min_fit_clients: 2,
            max_fit_clients: 100,
            min_available_clients: clients,
            round_deadline: Duration::from_secs(60),
            fit: FitInstructions {
                epochs: 1,
                batch_size: 1,
                learning_rate: 0.1,
                proximal_mu: 0.0,
                seed: 1,
                optimizer: Default::default(),
            },
            fraction_evaluate: 0.0,
            min_evaluate_clients: 0,
            max_round_retries: 2,
            seed: 7,
            one_task_per_connection: false,
            updates: UpdatePolicy {
                max_update_norm_median_multiple: None,
                ..UpdatePolicy::default()
            },
            strategy: Default::default(),
        }
    }

    fn settings() -> SecAggSettings {
        SecAggSettings {
            degree: 0,
            threshold: 0.5,
            phase_timeout: Duration::from_secs(10),
            clip_norm: 100.0,
            weight_cap: 0,
            min_clients: 3,
        }
    }

    /// Client `i`'s update: `0.1 (i + 1)` on every value.
    fn delta(i: usize) -> Vec<f32> {
        vec![0.1 * (i + 1) as f32; P]
    }

    struct Sim {
        engine: SecAggEngine,
        now: Instant,
        clients: BTreeMap<String, (u64, FitTask, ClientRound)>,
        /// Steps the engine sent, per client, not yet handled.
        inbox: BTreeMap<String, Vec<SecAggStep>>,
        outcomes: Vec<RoundOutcome>,
        retries: usize,
        not_committed: usize,
        /// c00 adds these (index, amount in update units) to its masked input:
        /// a malicious client, whose masks still cancel.
        tamper: Vec<(usize, f64)>,
    }

    impl Sim {
        fn new(n: usize) -> Sim {
            let engine = SecAggEngine::new(config(n), settings(), None, vec![0.0; P]).unwrap();
            let mut sim = Sim {
                engine,
                now: Instant::now(),
                clients: BTreeMap::new(),
                inbox: BTreeMap::new(),
                outcomes: Vec::new(),
                retries: 0,
                not_committed: 0,
                tamper: Vec::new(),
            };
            for i in 0..n {
                let actions = sim.engine.client_joined(format!("c{i:02}"), sim.now);
                sim.absorb(actions);
            }
            sim
        }

        fn absorb(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::SendFit { client, task } => {
                        let len = SecAggTask::vector_len(P);
                        let seed = [task.task_id as u8; 32];
                        let (round, keys) = ClientRound::new(task.round, len, seed);
                        // A new task supersedes whatever the last one left.
                        self.inbox
                            .insert(client.clone(), vec![SecAggStep::AdvertiseKeys(keys)]);
                        self.clients.insert(client, (task.task_id, task, round));
                    }
                    Action::SendSecAgg { client, step, .. } => {
                        self.inbox.entry(client).or_default().push(step)
                    }
                    Action::RoundFinished(o) => self.outcomes.push(*o),
                    Action::RoundRetry { .. } => self.retries += 1,
                    Action::RoundNotCommitted { .. } => self.not_committed += 1,
                    _ => {}
                }
            }
        }

        /// Every client not in `silent` handles what it was sent.
        fn step(&mut self, silent: &[&str]) {
            let names: Vec<String> = self.inbox.keys().cloned().collect();
            for name in names {
                if silent.contains(&name.as_str()) {
                    continue;
                }
                let steps = self.inbox.remove(&name).unwrap_or_default();
                for step in steps {
                    let Some((task_id, task, round)) = self.clients.get_mut(&name) else {
                        continue;
                    };
                    let task_id = *task_id;
                    let reply = match &step {
                        // Our own keys, queued at SendFit.
                        SecAggStep::AdvertiseKeys(_) => Some(step.clone()),
                        SecAggStep::Neighbours(m) => {
                            Some(SecAggStep::ShareKeys(round.on_neighbours(m).unwrap()))
                        }
                        SecAggStep::RelayedShares(m) => {
                            round.on_relayed_shares(m).unwrap();
                            // Trained and masked: send the input now.
                            let i: usize = name[1..].parse().unwrap();
                            let secagg = task.secagg.clone().unwrap();
                            let mut values = delta(i);
                            values.extend([1.0, 1.0]);
                            let mut input = vec![0u32; values.len()];
                            secagg
                                .fixed_point()
                                .unwrap()
                                .encode_into(&values, &mut input, i as u64)
                                .unwrap();
                            round.mask(&mut input).unwrap();
                            if name == "c00" {
                                let scale = secagg.fixed_point().unwrap().scale();
                                for &(index, amount) in &self.tamper {
                                    let units = (amount * scale).round() as i64 as u32;
                                    input[index] = input[index].wrapping_add(units);
                                }
                            }
                            let as_f32: &[f32] = bytemuck::cast_slice(&input);
                            let metrics = Vec::new();
                            let update = ReceivedUpdate {
                                client: &name,
                                task_id,
                                round: task.round,
                                num_examples: 5,
                                metrics: &metrics,
                                delta: as_f32,
                                norm: None,
                            };
                            let actions = self.engine.update_received(update, self.now);
                            self.absorb(actions);
                            None
                        }
                        SecAggStep::UnmaskRequest(m) => {
                            Some(SecAggStep::UnmaskResponse(round.on_unmask(m).unwrap()))
                        }
                        SecAggStep::ShareKeys(_) | SecAggStep::UnmaskResponse(_) => None,
                    };
                    if let Some(reply) = reply {
                        let actions = self
                            .engine
                            .secagg_received(&name, task_id, &reply, self.now);
                        self.absorb(actions);
                    }
                }
            }
        }

        /// Lets the current phase's deadline pass.
        fn expire(&mut self) {
            self.now = self.engine.next_deadline().unwrap() + Duration::from_millis(1);
            let actions = self.engine.tick(self.now);
            self.absorb(actions);
        }
    }

    #[test]
    fn dropouts_at_every_phase_still_give_the_exact_mean_of_the_contributors() {
        let mut sim = Sim::new(10);
        assert_eq!(sim.clients.len(), 10);
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::AdvertiseKeys));
        // Three never advertise (30%): the phase closes at its deadline.
        let silent_keys = ["c00", "c01", "c02"];
        sim.step(&silent_keys);
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::AdvertiseKeys));
        sim.expire();
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::ShareKeys));
        // Of the seven, one never shares.
        sim.step(&["c00", "c01", "c02", "c03"]);
        sim.expire();
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::MaskedInput));
        // One shared its keys and then never sends a masked input: its
        // pairwise masks are rebuilt from its neighbours' shares.
        sim.step(&["c00", "c01", "c02", "c03", "c04"]);
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::MaskedInput));
        sim.expire();
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::Unmask));
        sim.step(&["c00", "c01", "c02", "c03", "c04"]);
        assert_eq!(sim.outcomes.len(), 1, "the round committed");
        let o = &sim.outcomes[0];
        let s = o.secagg.as_ref().unwrap();
        assert_eq!(
            (s.selected, s.advertised, s.shared, s.masked),
            (10, 7, 6, 5),
            "{s:?}"
        );
        assert_eq!(s.phase_seconds.len(), 4);
        // Contributors c05..c09: mean of 0.6 .. 1.0.
        let expected = 0.8;
        for v in sim.engine.global_model().iter() {
            assert!((v - expected).abs() < 1e-5, "{v}");
        }
        // The next round started with a fresh selection.
        assert_eq!(sim.engine.round(), 2);
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::AdvertiseKeys));
    }

    #[test]
    fn too_few_unmask_answers_fail_the_round_cleanly_and_it_starts_again() {
        let mut sim = Sim::new(6);
        sim.step(&[]);
        sim.step(&[]);
        sim.step(&[]);
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::Unmask));
        // Only two of six answer the unmask request: no secret has enough
        // shares, nothing is reconstructed, the model does not move.
        sim.step(&["c00", "c01", "c02", "c03"]);
        sim.expire();
        assert_eq!(sim.outcomes.len(), 0);
        assert_eq!((sim.not_committed, sim.retries), (1, 1));
        assert!(sim.engine.global_model().iter().all(|v| *v == 0.0));
        assert_eq!(sim.engine.round(), 1, "round 1 again");
        assert_eq!(sim.engine.phase(), Some(SecAggPhase::AdvertiseKeys));
        // The retry completes with everyone.
        for _ in 0..4 {
            sim.step(&[]);
        }
        assert_eq!(sim.outcomes.len(), 1);
        let expected = 0.35;
        for v in sim.engine.global_model().iter() {
            assert!((v - expected).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn a_client_that_alters_its_masked_input_cannot_push_the_sum_past_honest_bounds() {
        // Clip norm 100, three clients. Each way of tampering fails the
        // attempt; the model does not move.
        let weight = P;
        let within = P + 1;
        for tamper in [
            // Every value +90: the sum's norm (360) exceeds 3 x 100.
            (0..P).map(|i| (i, 90.0)).collect::<Vec<_>>(),
            // The weights summed to almost nothing: a 1,000-fold step.
            vec![(weight, -2.999)],
            // More within-clip clients than there are clients.
            vec![(within, 5.0)],
            vec![(weight, 5.0)],
        ] {
            let mut sim = Sim::new(3);
            sim.tamper = tamper.clone();
            for _ in 0..4 {
                sim.step(&[]);
            }
            assert_eq!(
                (sim.outcomes.len(), sim.not_committed),
                (0, 1),
                "{tamper:?}"
            );
            assert!(sim.engine.global_model().iter().all(|v| *v == 0.0));
        }
        // Within the bounds it commits (and moves the mean, as it can: the
        // limit of checking only the sum).
        let mut sim = Sim::new(3);
        sim.tamper = (0..P).map(|i| (i, 3.0)).collect();
        for _ in 0..4 {
            sim.step(&[]);
        }
        assert_eq!(sim.outcomes.len(), 1);
        let expected = (0.1 + 0.2 + 0.3 + 3.0) / 3.0;
        for v in sim.engine.global_model().iter() {
            assert!((v - expected).abs() < 1e-4, "{v}");
        }
    }

    #[test]
    fn implausible_sums_are_told_apart_from_honest_ones_with_noise() {
        // 100 clients, 10k values, Skellam noise of mu = 1e6 units each at
        // scale 1e4: honest-looking sums pass, ones past the bounds fail.
        let (n, dim, clip, scale, mu) = (100, 10_000, 1.0, 1e4, 1e6);
        let noise = (2.0 * mu * n as f64).sqrt() / scale;
        let honest: Vec<f64> = (0..dim)
            .map(|i| if i % 2 == 0 { noise } else { -noise })
            .collect();
        assert_eq!(
            implausible_sum(&honest, 100.0, 100.0, n, clip, scale, mu),
            None
        );
        assert_eq!(
            implausible_sum(&honest, 100.0, 0.0, n, clip, scale, mu),
            None
        );
        assert!(implausible_sum(&honest, 100.0, 200.0, n, clip, scale, mu).is_some());
        assert!(implausible_sum(&honest, 150.0, 50.0, n, clip, scale, mu).is_some());
        let loud: Vec<f64> = honest.iter().map(|v| v * 20.0).collect();
        assert!(implausible_sum(&loud, 100.0, 50.0, n, clip, scale, mu).is_some());
        assert!(implausible_sum(&[f64::NAN], 1.0, 1.0, 1, clip, scale, 0.0).is_some());
    }

    #[test]
    fn strategies_and_policies_that_need_individual_updates_are_refused() {
        for name in ["fedmedian", "krum", "scaffold", "qfedavg", "normbounded"] {
            let mut c = config(4);
            c.strategy.name = name.into();
            let e = SecAggEngine::new(c, settings(), None, vec![0.0; P]).err();
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("individual updates")),
                "{name}: {e:?}"
            );
        }
        let mut c = config(4);
        c.updates.max_update_norm = Some(1.0);
        assert!(SecAggEngine::new(c, settings(), None, vec![0.0; P]).is_err());
        let bad = SecAggSettings {
            min_clients: 1,
            ..settings()
        };
        assert!(SecAggEngine::new(config(4), bad, None, vec![0.0; P]).is_err());
    }
}
