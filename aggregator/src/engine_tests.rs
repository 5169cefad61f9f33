//! Unit tests for the pure round engine ([`crate::engine::RoundEngine`]).
//!
//! Time is simulated: every event carries an `Instant` derived from one
//! `t0`, so nothing here sleeps.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedquic_protocol::{EvalResult, EvaluateTask, FitInstructions, Metrics};

use crate::engine::{
    Action, EngineConfig, EngineState, FederatedEval, MAX_EXAMPLES_PER_UPDATE, NormPolicy,
    RoundEngine, RoundOutcome, UpdatePolicy,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn fit_instructions() -> FitInstructions {
    FitInstructions {
        epochs: 2,
        batch_size: 32,
        learning_rate: 0.05,
        proximal_mu: 0.0,
        seed: 7,
        optimizer: Default::default(),
    }
}

/// No weight caps and no norm bound: the arithmetic of plain FedAvg.
fn permissive() -> UpdatePolicy {
    UpdatePolicy {
        max_examples_per_update: MAX_EXAMPLES_PER_UPDATE,
        max_weight_share: 1.0,
        max_update_norm: None,
        max_update_norm_median_multiple: None,
        norm_policy: NormPolicy::Reject,
        max_parameter_abs: f64::MAX,
        max_client_loss: 1e6,
    }
}

/// One round, every connected client trains, no evaluation, no retries.
fn config() -> EngineConfig {
    EngineConfig {
        rounds: 1,
        fraction_fit: 1.0,
        min_fit_clients: 1,
        max_fit_clients: 10_000,
        min_available_clients: 1,
        round_deadline: DEADLINE,
        fit: fit_instructions(),
        fraction_evaluate: 0.0,
        min_evaluate_clients: 0,
        max_round_retries: 0,
        seed: 42,
        one_task_per_connection: false,
        updates: permissive(),
        strategy: Default::default(),
    }
}

fn id(i: usize) -> String {
    format!("client-{i:05}")
}

/// A `SendFit` action, flattened.
#[derive(Clone, Debug, PartialEq)]
struct Fit {
    client: String,
    round: u64,
    task_id: u64,
    seed: u64,
}

fn fits(actions: &[Action]) -> Vec<Fit> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendFit { client, task } => Some(Fit {
                client: client.clone(),
                round: task.round,
                task_id: task.task_id,
                seed: task.config.seed,
            }),
            _ => None,
        })
        .collect()
}

fn evals(actions: &[Action]) -> Vec<(String, EvaluateTask)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendEvaluate { client, task } => Some((client.clone(), task.clone())),
            _ => None,
        })
        .collect()
}

fn outcomes(actions: &[Action]) -> Vec<RoundOutcome> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RoundFinished(o) => Some((**o).clone()),
            _ => None,
        })
        .collect()
}

fn clients_of(fits: &[Fit]) -> BTreeSet<String> {
    fits.iter().map(|f| f.client.clone()).collect()
}

/// Joins clients `0..n` at `now`, returning every action produced.
fn join_all(e: &mut RoundEngine, n: usize, now: Instant) -> Vec<Action> {
    let mut actions = Vec::new();
    for i in 0..n {
        actions.extend(e.client_joined(id(i), now));
    }
    actions
}

/// The client answers its task as told.
fn answer(e: &mut RoundEngine, f: &Fit, examples: u64, delta: &[f32], now: Instant) -> Vec<Action> {
    e.update_received(
        &f.client,
        f.task_id,
        f.round,
        examples,
        &Metrics::new(),
        delta,
        now,
    )
}

fn metrics(loss: f64, accuracy: f64) -> Metrics {
    vec![
        ("loss".to_string(), loss),
        ("accuracy".to_string(), accuracy),
    ]
}

fn accepted(f: &Fit) -> Action {
    Action::UpdateAccepted {
        client: f.client.clone(),
        task_id: f.task_id,
    }
}

/// Asserts `actions` is exactly one rejection of (`client`, `task_id`) whose
/// reason contains `needle`.
fn assert_rejected(actions: &[Action], client: &str, task_id: u64, needle: &str) {
    match actions {
        [
            Action::UpdateRejected {
                client: c,
                task_id: t,
                reason,
            },
        ] => {
            assert_eq!(c, client);
            assert_eq!(*t, task_id);
            assert!(
                reason.contains(needle),
                "reason {reason:?} should mention {needle:?}"
            );
        }
        other => panic!("expected one UpdateRejected for {client}, got {other:?}"),
    }
}

/// The first selection of an engine that needs exactly `n` clients.
fn first_selection(mut cfg: EngineConfig, n: usize) -> Vec<Fit> {
    cfg.min_available_clients = n;
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    let t0 = Instant::now();
    let actions = join_all(&mut e, n, t0);
    let f = fits(&actions);
    assert_eq!(f.len(), actions.len(), "only SendFit expected: {actions:?}");
    f
}

// 1. Waiting for clients, then sampling.

#[test]
fn waits_for_min_available_clients_before_sending_fit() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 6;
    cfg.fraction_fit = 0.25;
    let mut e = RoundEngine::new(cfg.clone(), vec![0.0; 4], 0);
    assert!(e.start(t0).is_empty());
    assert_eq!(e.next_deadline(), None);
    for i in 0..5 {
        assert!(e.client_joined(id(i), t0 + secs(i as u64)).is_empty());
    }
    assert_eq!(e.connected_clients(), 5);
    assert_eq!(e.next_deadline(), None);
    assert!(e.start(t0 + secs(5)).is_empty());

    let t6 = t0 + secs(6);
    let actions = e.client_joined(id(5), t6);
    // ceil(0.25 * 6) = ceil(1.5) = 2.
    let f = fits(&actions);
    assert_eq!(f.len(), 2);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert_eq!(e.next_deadline(), Some(t6 + DEADLINE));
    assert_eq!(e.round(), 1);
    assert_eq!(e.completed_rounds(), 0);
    for a in &actions {
        let Action::SendFit { client, task } = a else {
            unreachable!()
        };
        assert!((0..6).map(id).any(|c| &c == client));
        assert_eq!(task.round, 1);
        // Everything but the seed comes from the configuration.
        let mut expected = cfg.fit.clone();
        expected.seed = task.config.seed;
        assert_eq!(task.config, expected);
        assert_ne!(task.config.seed, cfg.fit.seed);
    }
    assert_eq!(clients_of(&f).len(), 2, "a client selected twice: {f:?}");
    assert_ne!(f[0].task_id, f[1].task_id);
    assert_ne!(f[0].seed, f[1].seed);

    // Nothing restarts while the round runs.
    assert!(e.start(t6).is_empty());
    assert!(e.client_joined(id(6), t6).is_empty());
}

#[test]
fn min_fit_clients_also_gates_the_start() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 2;
    cfg.min_fit_clients = 4;
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    assert!(join_all(&mut e, 3, t0).is_empty());
    assert_eq!(fits(&e.client_joined(id(3), t0)).len(), 4);
}

#[test]
fn one_task_per_connection_draws_each_round_from_fresh_check_ins() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 3;
    cfg.min_available_clients = 3;
    cfg.one_task_per_connection = true;
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    // Round 1 takes the first three check-ins; two more wait.
    let first = fits(&join_all(&mut e, 3, t0));
    assert_eq!(clients_of(&first), (0..3).map(id).collect());
    assert_eq!(
        e.connected_clients(),
        0,
        "selected clients are not available"
    );
    assert!(e.client_joined(id(3), t0).is_empty());
    assert!(e.client_joined(id(4), t0).is_empty());
    // The round completes with its retired clients' updates.
    let mut actions = Vec::new();
    for f in &first {
        actions.extend(answer(&mut e, f, 10, &[1.0; 4], t0 + secs(1)));
    }
    let done = outcomes(&actions);
    assert_eq!(done.len(), 1, "{actions:?}");
    assert_eq!(done[0].clients_available, 3);
    assert_eq!(done[0].clients_answered, 3);
    // Round 2 does not pick round 1's clients, though they are still
    // connected: it waits for a third fresh check-in.
    assert!(fits(&actions).is_empty(), "{actions:?}");
    assert_eq!(e.connected_clients(), 2);
    // A round-1 client that reconnects is a fresh check-in.
    let second = fits(&e.client_joined(id(0), t0 + secs(2)));
    assert_eq!(clients_of(&second), [0, 3, 4].map(id).into_iter().collect());
    // One leaving after its task changes nothing for the others.
    assert!(e.client_left(&id(1), t0 + secs(2)).is_empty());
    assert_eq!(e.connected_clients(), 0);
}

#[test]
fn selection_size_is_ceil_of_fraction_clamped_to_min_and_max() {
    let mut cfg = config();
    // ceil(0.25 * 10) = 3.
    cfg.fraction_fit = 0.25;
    assert_eq!(first_selection(cfg.clone(), 10).len(), 3);
    // ceil(0.5 * 9) = 5.
    cfg.fraction_fit = 0.5;
    assert_eq!(first_selection(cfg.clone(), 9).len(), 5);
    // ceil(0.125 * 8) = 1, raised to min_fit_clients.
    cfg.fraction_fit = 0.125;
    cfg.min_fit_clients = 3;
    assert_eq!(first_selection(cfg.clone(), 8).len(), 3);
    // Everyone would be 20, capped at max_fit_clients.
    cfg.fraction_fit = 1.0;
    cfg.max_fit_clients = 7;
    assert_eq!(first_selection(cfg.clone(), 20).len(), 7);
    // A tiny fraction still asks one client.
    let mut cfg = config();
    cfg.fraction_fit = 0.001;
    assert_eq!(first_selection(cfg, 10).len(), 1);
}

#[test]
fn task_ids_and_seeds_are_unique_across_a_selection() {
    let mut cfg = config();
    cfg.fraction_fit = 0.5;
    let f = first_selection(cfg, 64);
    assert_eq!(f.len(), 32);
    assert_eq!(clients_of(&f).len(), 32);
    let ids: BTreeSet<u64> = f.iter().map(|f| f.task_id).collect();
    assert_eq!(ids.len(), 32);
    let seeds: BTreeSet<u64> = f.iter().map(|f| f.seed).collect();
    assert_eq!(seeds.len(), 32);
}

#[test]
fn selection_size_is_not_inflated_by_float_rounding() {
    let mut cfg = config();
    cfg.fraction_fit = 0.07;
    assert_eq!(first_selection(cfg.clone(), 100).len(), 7);
    cfg.fraction_fit = 0.14;
    assert_eq!(first_selection(cfg.clone(), 50).len(), 7);
    cfg.fraction_fit = 0.55;
    assert_eq!(first_selection(cfg, 100).len(), 55);
}

// 2. A full run.

#[test]
fn full_run_applies_the_weighted_mean_and_chains_rounds() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_available_clients = 3;
    let global = vec![1.0f32, -2.0, 0.5, 0.0];
    let mut e = RoundEngine::new(cfg, global.clone(), 0);
    let r1 = fits(&join_all(&mut e, 3, t0));
    assert_eq!(r1.len(), 3);
    assert!(r1.iter().all(|f| f.round == 1));

    // Weights 16, 48, 64 (total 128) keep the arithmetic exact in f32.
    let plan = |client: &str| -> (u64, Vec<f32>, Metrics) {
        match client {
            c if c == id(0) => (16, vec![2.0, 0.0, 8.0, -4.0], metrics(1.0, 0.5)),
            c if c == id(1) => (48, vec![2.0, 4.0, 0.0, 0.0], metrics(2.0, 0.25)),
            c if c == id(2) => (64, vec![-1.0, 1.0, 0.5, 2.0], metrics(0.5, 1.0)),
            c => panic!("unexpected client {c}"),
        }
    };
    for (i, f) in r1.iter().enumerate().take(2) {
        let (n, delta, m) = plan(&f.client);
        let actions = e.update_received(
            &f.client,
            f.task_id,
            1,
            n,
            &m,
            &delta,
            t0 + secs(i as u64 + 1),
        );
        assert_eq!(actions, vec![accepted(f)]);
        assert_eq!(
            *e.global_model(),
            global,
            "model moved before the round closed"
        );
    }
    let last = &r1[2];
    let (n, delta, m) = plan(&last.client);
    let actions = e.update_received(&last.client, last.task_id, 1, n, &m, &delta, t0 + secs(5));

    // Hand-computed: sums 4, 16, 10, 4 over 8 -> +0.5, +2, +1.25, +0.5.
    assert_eq!(*e.global_model(), vec![1.5, 0.0, 1.75, 0.5]);
    assert_eq!(actions.len(), 5, "{actions:?}");
    assert_eq!(actions[0], accepted(last));
    let Action::RoundFinished(o) = &actions[1] else {
        panic!("expected RoundFinished, got {:?}", actions[1]);
    };
    assert_eq!(
        (o.round, o.attempts, o.clients_available, o.clients_selected),
        (1, 1, 3, 3)
    );
    assert_eq!(
        (o.clients_answered, o.clients_dropped, o.updates_rejected),
        (3, 0, 0)
    );
    assert_eq!(
        (o.examples, o.weight_claimed, o.weight_used),
        (128, 128.0, 128.0)
    );
    assert!(o.rejections.is_empty() && o.weight_adjusted.is_empty());
    // (16*1 + 48*2 + 64*0.5) / 128 and (16*0.5 + 48*0.25 + 64*1) / 128.
    assert_eq!(o.client_reported_train_loss, Some(1.125));
    assert_eq!(o.client_reported_train_accuracy, Some(0.65625));
    assert_eq!(o.federated_eval, None);
    assert_eq!((o.fit_seconds, o.evaluate_seconds), (5.0, 0.0));
    assert_eq!(o.state.completed_rounds, 1);
    assert_eq!(o.state.next_task_id, 4, "three tasks handed out so far");
    let r2 = fits(&actions[2..]);
    assert_eq!(r2.len(), 3);
    assert!(r2.iter().all(|f| f.round == 2));
    assert!(r2.iter().all(|f| r1.iter().all(|g| g.task_id != f.task_id)));
    assert!(r2.iter().all(|f| r1.iter().all(|g| g.seed != f.seed)));
    assert_eq!(e.round(), 2);
    assert_eq!(e.completed_rounds(), 1);
    assert!(!e.is_finished());
    assert_eq!(e.next_deadline(), Some(t0 + secs(5) + DEADLINE));

    let mut last_actions = Vec::new();
    for f in &r2 {
        last_actions = answer(&mut e, f, 5, &[1.0; 4], t0 + secs(9));
    }
    assert_eq!(*e.global_model(), vec![2.5, 1.0, 2.75, 1.5]);
    assert_eq!(last_actions.len(), 3, "{last_actions:?}");
    let o = &outcomes(&last_actions)[0];
    assert_eq!((o.round, o.clients_answered, o.examples), (2, 3, 15));
    assert_eq!(
        (
            o.client_reported_train_loss,
            o.client_reported_train_accuracy
        ),
        (None, None)
    );
    assert_eq!(o.fit_seconds, 4.0);
    assert_eq!(last_actions[2], Action::Finished);
    assert!(e.is_finished());
    assert_eq!(e.completed_rounds(), 2);
    assert_eq!(e.next_deadline(), None);
    assert!(e.tick(t0 + secs(1000)).is_empty());
}

#[test]
fn train_metrics_skip_updates_without_finite_loss_and_accuracy() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 3;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&join_all(&mut e, 3, t0));
    let ms = [
        metrics(1.0, 0.5),
        metrics(f64::NAN, 0.9),
        vec![("loss".to_string(), 7.0)],
    ];
    let mut actions = Vec::new();
    for (f, m) in f.iter().zip(&ms) {
        actions = e.update_received(&f.client, f.task_id, 1, 10, m, &[0.0; 2], t0);
    }
    let o = &outcomes(&actions)[0];
    assert_eq!(o.examples, 30);
    assert_eq!(o.client_reported_train_loss, Some(1.0));
    assert_eq!(o.client_reported_train_accuracy, Some(0.5));
}

// 3. Determinism.

/// Drives a whole run: clients whose index is a multiple of 5 never answer
/// their fit task, the rest do at once, deadlines are ticked. Returns every
/// action in order and the final model.
fn scripted_run(seed: u64) -> (Vec<Action>, Vec<f32>) {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        rounds: 3,
        fraction_fit: 0.05,
        min_fit_clients: 2,
        max_fit_clients: 100,
        min_available_clients: 200,
        round_deadline: secs(30),
        fit: fit_instructions(),
        fraction_evaluate: 0.02,
        min_evaluate_clients: 1,
        max_round_retries: 3,
        seed,
        one_task_per_connection: false,
        updates: permissive(),
        strategy: Default::default(),
    };
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    let mut log = Vec::new();
    let mut now = t0;
    let mut queue = join_all(&mut e, 200, now);
    e.start(now);
    for _ in 0..1000 {
        if e.is_finished() {
            break;
        }
        let batch = std::mem::take(&mut queue);
        now += secs(1);
        for a in &batch {
            match a {
                Action::SendFit { client, task } => {
                    let index: usize = client["client-".len()..].parse().unwrap();
                    if !index.is_multiple_of(5) {
                        let v = (task.config.seed % 1000) as f32 / 1000.0;
                        queue.extend(e.update_received(
                            client,
                            task.task_id,
                            task.round,
                            index as u64 + 1,
                            &metrics(v as f64, 0.5),
                            &[v, -v, 0.5 * v, 1.0],
                            now,
                        ));
                    }
                }
                Action::SendEvaluate { client, task } => {
                    queue.extend(e.eval_received(
                        client,
                        &EvalResult {
                            round: task.round,
                            task_id: task.task_id,
                            examples: task.task_id,
                            loss: 0.5,
                            accuracy: 0.25,
                        },
                        now,
                    ));
                }
                _ => {}
            }
        }
        log.extend(batch);
        if queue.is_empty()
            && let Some(d) = e.next_deadline()
        {
            now = d;
            queue.extend(e.tick(now));
        }
    }
    log.extend(queue);
    assert!(e.is_finished(), "run did not finish");
    (log, e.global_model().to_vec())
}

#[test]
fn same_seed_and_events_give_identical_actions() {
    let (a, model_a) = scripted_run(1);
    let (b, model_b) = scripted_run(1);
    assert_eq!(outcomes(&a).len(), 3);
    assert_eq!(a.last(), Some(&Action::Finished));
    assert_eq!(a, b);
    assert_eq!(model_a, model_b);
    assert!(model_a.iter().any(|v| *v != 0.0));
}

#[test]
fn a_different_seed_changes_the_selection() {
    let (a, _) = scripted_run(1);
    let (b, _) = scripted_run(2);
    let first_round = |log: &[Action]| {
        let f: Vec<Fit> = fits(log).into_iter().filter(|f| f.round == 1).collect();
        clients_of(&f)
    };
    let (sa, sb) = (first_round(&a), first_round(&b));
    assert!(sa.len() >= 10 && sb.len() >= 10);
    assert_ne!(sa, sb);
}

// 4. Rejections.

#[test]
fn bad_updates_are_rejected_and_leave_the_model_alone() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 6;
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    // Round 1: everybody answers with a zero delta.
    let r1 = fits(&join_all(&mut e, 6, t0));
    assert_eq!(r1.len(), 6);
    let mut actions = Vec::new();
    for f in &r1 {
        actions = answer(&mut e, f, 1, &[0.0; 4], t0 + secs(1));
    }
    let r2 = fits(&actions);
    assert_eq!(r2.len(), 6);
    assert_eq!(e.round(), 2);
    let t = t0 + secs(2);
    // Joins after the selection: connected but not selected.
    assert!(e.client_joined("outsider".into(), t).is_empty());

    let zero = vec![0.0f32; 4];
    let poison = [1000.0f32; 4];
    let mut all = Vec::new();
    let mut check = |actions: Vec<Action>, e: &RoundEngine| {
        assert_eq!(*e.global_model(), zero);
        assert_eq!(e.round(), 2);
        all.extend(actions);
    };

    let honest = &r2[0];
    let a = answer(&mut e, honest, 8, &[1.0, 2.0, 3.0, 4.0], t);
    assert_eq!(a, vec![accepted(honest)]);
    check(a, &e);

    // Duplicate.
    let a = answer(&mut e, honest, 8, &poison, t);
    assert_rejected(&a, &honest.client, honest.task_id, "duplicate");
    check(a, &e);

    // Stale: the same client replays its round-1 update.
    let old = r1.iter().find(|f| f.client == honest.client).unwrap();
    let a = answer(&mut e, old, 8, &poison, t);
    assert_rejected(&a, &old.client, old.task_id, "stale");
    assert!(matches!(&a[0], Action::UpdateRejected { reason, .. } if reason.contains("round 1")));
    check(a, &e);

    // Wrong task id.
    let f = &r2[1];
    let wrong = f.task_id + 1000;
    let a = e.update_received(&f.client, wrong, 2, 8, &Metrics::new(), &poison, t);
    assert_rejected(
        &a,
        &f.client,
        wrong,
        &format!("expected task {}", f.task_id),
    );
    check(a, &e);

    // Not selected.
    let a = e.update_received("outsider", 9999, 2, 8, &Metrics::new(), &poison, t);
    assert_rejected(&a, "outsider", 9999, "not selected");
    check(a, &e);

    // Unknown client, never connected.
    let a = e.update_received("stranger", 1, 2, 8, &Metrics::new(), &poison, t);
    assert_rejected(&a, "stranger", 1, "not selected");
    check(a, &e);

    // Zero examples.
    let f = &r2[2];
    let a = answer(&mut e, f, 0, &poison, t);
    assert_rejected(&a, &f.client, f.task_id, "zero");
    check(a, &e);

    // Wrong length.
    let f = &r2[3];
    let a = answer(&mut e, f, 8, &[1000.0; 3], t);
    assert_rejected(&a, &f.client, f.task_id, "3 values, model has 4");
    check(a, &e);

    // Absurd example count.
    let f = &r2[4];
    let a = answer(&mut e, f, MAX_EXAMPLES_PER_UPDATE + 1, &poison, t);
    assert_rejected(&a, &f.client, f.task_id, "limit");
    check(a, &e);

    // The other honest client answers last.
    let honest2 = &r2[5];
    all.extend(answer(&mut e, honest2, 24, &[5.0, 6.0, 7.0, 8.0], t));
    // Whether the round closed on that answer or only at the deadline, it
    // closes exactly once, with the two honest clients.
    all.extend(e.tick(t + DEADLINE));
    let o = outcomes(&all);
    assert_eq!(o.len(), 1, "{all:?}");
    let o = &o[0];
    assert_eq!(o.round, 2);
    assert_eq!(o.clients_selected, 6);
    assert_eq!(o.clients_answered, 2);
    assert_eq!(o.clients_answered + o.clients_dropped, o.clients_selected);
    assert_eq!(o.updates_rejected, 8);
    assert_eq!(o.examples, 32);
    // (8 * [1, 2, 3, 4] + 24 * [5, 6, 7, 8]) / 32.
    assert_eq!(*e.global_model(), vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!(all.last(), Some(&Action::Finished));
    assert!(e.is_finished());
}

#[test]
fn updates_outside_a_fit_phase_are_rejected() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 2;
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    // Before any round started.
    let a = e.update_received(&id(0), 1, 1, 5, &Metrics::new(), &[1.0; 4], t0);
    assert_rejected(&a, &id(0), 1, "no round is collecting");
    assert_eq!(*e.global_model(), vec![0.0; 4]);
    // That rejection is reported with the round that follows.
    let f = fits(&join_all(&mut e, 2, t0));
    let mut actions = Vec::new();
    for f in &f {
        actions = answer(&mut e, f, 1, &[0.0; 4], t0);
    }
    assert_eq!(outcomes(&actions)[0].updates_rejected, 1);
    assert!(e.is_finished());
    // After the run.
    let a = answer(&mut e, &f[0], 5, &[1.0; 4], t0);
    assert_rejected(&a, &f[0].client, f[0].task_id, "no round is collecting");
    assert_eq!(*e.global_model(), vec![0.0; 4]);
}

// 5. Dropouts.

#[test]
fn selected_clients_that_leave_or_fail_are_counted_as_dropped() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 4;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let r1 = fits(&join_all(&mut e, 4, t0));
    assert_eq!(r1.len(), 4);

    assert_eq!(
        answer(&mut e, &r1[0], 10, &[1.0, 1.0], t0 + secs(1)),
        vec![accepted(&r1[0])]
    );
    assert!(e.client_left(&r1[1].client, t0 + secs(2)).is_empty());
    assert_eq!(e.connected_clients(), 3);
    // A failure for some other task id changes nothing ...
    assert!(
        e.task_failed(&r1[2].client, r1[2].task_id + 100, t0 + secs(3))
            .is_empty()
    );
    assert!(
        e.task_failed(&r1[3].client, r1[2].task_id, t0 + secs(3))
            .is_empty()
    );
    // ... its own does.
    assert!(
        e.task_failed(&r1[2].client, r1[2].task_id, t0 + secs(3))
            .is_empty()
    );
    let actions = answer(&mut e, &r1[3], 30, &[3.0, -1.0], t0 + secs(4));
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(
        (
            o[0].clients_available,
            o[0].clients_selected,
            o[0].clients_answered,
            o[0].clients_dropped,
            o[0].examples
        ),
        (4, 4, 2, 2, 40)
    );
    // (10 * [1, 1] + 30 * [3, -1]) / 40.
    assert_eq!(*e.global_model(), vec![2.5, -0.5]);

    // Only three are still connected: round 2 waits for a fourth.
    assert!(fits(&actions).is_empty(), "{actions:?}");
    assert_eq!(e.round(), 2);
    assert_eq!(e.next_deadline(), None);
    let t = t0 + secs(5);
    let r2 = fits(&e.client_joined("newcomer".into(), t));
    assert_eq!(r2.len(), 4);
    assert!(!clients_of(&r2).contains(&r1[1].client));
    answer(&mut e, &r2[0], 1, &[0.0; 2], t);
    // Leaving after answering is not a drop.
    assert!(e.client_left(&r2[0].client, t).is_empty());
    assert_eq!(
        answer(&mut e, &r2[1], 1, &[0.0; 2], t),
        vec![accepted(&r2[1])]
    );
    assert!(e.task_failed(&r2[2].client, r2[2].task_id, t).is_empty());
    // The last pending client fails: that closes the round at once.
    let actions = e.task_failed(&r2[3].client, r2[3].task_id, t);
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(
        (
            o[0].clients_available,
            o[0].clients_answered,
            o[0].clients_dropped
        ),
        (4, 2, 2)
    );
    assert_eq!(actions.last(), Some(&Action::Finished));
}

#[test]
fn last_pending_client_leaving_closes_the_round() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 3;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&join_all(&mut e, 3, t0));
    answer(&mut e, &f[0], 1, &[2.0, 2.0], t0);
    assert!(e.client_left(&f[1].client, t0).is_empty());
    let actions = e.client_left(&f[2].client, t0 + secs(1));
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!((o[0].clients_answered, o[0].clients_dropped), (1, 2));
    assert_eq!(*e.global_model(), vec![2.0, 2.0]);
    assert!(e.is_finished());
}

// 6. Deadlines.

#[test]
fn deadline_closes_the_round_and_counts_the_straggler() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 3;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&join_all(&mut e, 3, t0));
    assert_eq!(e.next_deadline(), Some(t0 + DEADLINE));
    answer(&mut e, &f[0], 1, &[1.0, 0.0], t0 + secs(1));
    answer(&mut e, &f[1], 3, &[0.0, 4.0], t0 + secs(2));
    assert!(e.tick(t0 + secs(30)).is_empty());
    assert!(e.tick(t0 + DEADLINE - Duration::from_millis(1)).is_empty());
    assert_eq!(*e.global_model(), vec![0.0, 0.0]);
    assert_eq!(e.next_deadline(), Some(t0 + DEADLINE));

    let actions = e.tick(t0 + DEADLINE);
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(
        (
            o[0].clients_selected,
            o[0].clients_answered,
            o[0].clients_dropped
        ),
        (3, 2, 1)
    );
    assert_eq!(o[0].fit_seconds, DEADLINE.as_secs_f64());
    assert_eq!(actions.last(), Some(&Action::Finished));
    assert_eq!(*e.global_model(), vec![0.25, 3.0]);

    // The straggler finally answers.
    let a = answer(&mut e, &f[2], 100, &[9.0, 9.0], t0 + DEADLINE + secs(1));
    assert_rejected(&a, &f[2].client, f[2].task_id, "no round is collecting");
    assert_eq!(*e.global_model(), vec![0.25, 3.0]);
}

#[test]
fn stragglers_late_update_is_stale_in_the_next_round() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 3;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&join_all(&mut e, 3, t0));
    answer(&mut e, &f[0], 1, &[1.0, 1.0], t0);
    answer(&mut e, &f[1], 1, &[1.0, 1.0], t0);
    // Late ticks still close it (the shell may wake up late).
    let actions = e.tick(t0 + DEADLINE + secs(5));
    assert_eq!(outcomes(&actions)[0].clients_dropped, 1);
    assert_eq!(outcomes(&actions)[0].fit_seconds, 65.0);
    assert_eq!(fits(&actions).len(), 3);
    assert_eq!(e.round(), 2);
    let a = answer(&mut e, &f[2], 100, &[9.0, 9.0], t0 + DEADLINE + secs(6));
    assert_rejected(&a, &f[2].client, f[2].task_id, "stale");
    assert_eq!(*e.global_model(), vec![1.0, 1.0]);
}

#[test]
fn straggler_late_update_does_not_cost_it_the_next_round() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 3;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let r1 = fits(&join_all(&mut e, 3, t0));
    answer(&mut e, &r1[0], 1, &[0.0; 2], t0);
    answer(&mut e, &r1[1], 1, &[0.0; 2], t0);
    let r2 = fits(&e.tick(t0 + DEADLINE));
    let slow = &r1[2];
    let now = r2.iter().find(|f| f.client == slow.client).unwrap().clone();
    // The client works through its tasks in order: the old update comes
    // first, rightly refused as stale ...
    let a = answer(&mut e, slow, 1, &[0.0; 2], t0 + DEADLINE + secs(1));
    assert_rejected(&a, &slow.client, slow.task_id, "stale");
    // ... then its answer to the task it was given for this round.
    let a = answer(&mut e, &now, 1, &[0.0; 2], t0 + DEADLINE + secs(2));
    assert_eq!(a, vec![accepted(&now)]);
}

#[test]
fn retry_survives_a_late_update_from_the_previous_attempt() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_fit_clients = 3;
    cfg.min_available_clients = 3;
    cfg.max_round_retries = 1;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let a1 = fits(&join_all(&mut e, 3, t0));
    answer(&mut e, &a1[0], 1, &[0.0; 2], t0);
    answer(&mut e, &a1[1], 1, &[0.0; 2], t0);
    let actions = e.tick(t0 + DEADLINE);
    assert!(matches!(actions[0], Action::RoundRetry { attempt: 2, .. }));
    let a2 = fits(&actions);
    assert_eq!(a2.len(), 3);
    let t = t0 + DEADLINE + secs(1);
    // The slow client's attempt-1 update arrives after the retry began.
    let old = &a1[2];
    let a = answer(&mut e, old, 1, &[0.0; 2], t);
    assert_rejected(&a, &old.client, old.task_id, "expected task");
    let mut all = Vec::new();
    for f in &a2 {
        all.extend(answer(&mut e, f, 1, &[1.0; 2], t));
    }
    all.extend(e.tick(t + DEADLINE));
    assert!(
        !all.iter().any(|a| matches!(a, Action::Aborted { .. })),
        "{all:?}"
    );
    assert_eq!(outcomes(&all).len(), 1, "{all:?}");
    assert_eq!(outcomes(&all)[0].clients_answered, 3);
}

// 7. Retries.

#[test]
fn too_few_answers_retry_with_a_fresh_selection() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.fraction_fit = 0.3;
    cfg.min_fit_clients = 3;
    cfg.min_available_clients = 10;
    cfg.max_round_retries = 2;
    let global = vec![1.0f32, 2.0];
    let mut e = RoundEngine::new(cfg, global.clone(), 0);
    let a1 = fits(&join_all(&mut e, 10, t0));
    assert_eq!(a1.len(), 3);
    answer(&mut e, &a1[0], 5, &[100.0, 100.0], t0 + secs(1));
    answer(&mut e, &a1[1], 5, &[100.0, 100.0], t0 + secs(1));
    let bad = e.update_received(&id(99), 1, 1, 1, &Metrics::new(), &[0.0; 2], t0);
    assert_eq!(bad.len(), 1);
    assert!(e.tick(t0 + secs(59)).is_empty());

    let t1 = t0 + DEADLINE;
    let actions = e.tick(t1);
    assert_eq!(
        actions[0],
        Action::RoundRetry {
            round: 1,
            attempt: 2,
            answered: 2,
            needed: 3
        }
    );
    assert!(outcomes(&actions).is_empty());
    let a2 = fits(&actions[1..]);
    assert_eq!(a2.len(), 3);
    assert_eq!(actions.len(), 4, "{actions:?}");
    assert!(a2.iter().all(|f| f.round == 1));
    let max_old = a1.iter().map(|f| f.task_id).max().unwrap();
    assert!(a2.iter().all(|f| f.task_id > max_old));
    assert_eq!(
        *e.global_model(),
        global,
        "a failed attempt changed the model"
    );
    assert_eq!(e.round(), 1);
    assert_eq!(e.completed_rounds(), 0);
    assert_eq!(e.next_deadline(), Some(t1 + DEADLINE));

    // The partial sum of attempt 1 is gone: only attempt 2 counts.
    let mut actions = Vec::new();
    for f in &a2 {
        actions = answer(&mut e, f, 2, &[-1.0, 1.0], t1 + secs(4));
    }
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(o[0].attempts, 2);
    assert_eq!(o[0].clients_answered, 3);
    assert_eq!(o[0].clients_dropped, 0);
    assert_eq!(o[0].examples, 6);
    // The stray rejection from attempt 1 is carried into the report.
    assert_eq!(o[0].updates_rejected, 1);
    assert_eq!(o[0].fit_seconds, 4.0);
    assert_eq!(*e.global_model(), vec![0.0, 3.0]);
    assert!(e.is_finished());
}

#[test]
fn retry_selection_differs_from_the_first_attempt() {
    let mut differs = 0;
    for seed in 0..8 {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.seed = seed;
        cfg.fraction_fit = 0.3;
        cfg.min_fit_clients = 3;
        cfg.min_available_clients = 10;
        cfg.max_round_retries = 1;
        let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
        let a1 = clients_of(&fits(&join_all(&mut e, 10, t0)));
        let a2 = clients_of(&fits(&e.tick(t0 + DEADLINE)));
        assert_eq!((a1.len(), a2.len()), (3, 3));
        if a1 != a2 {
            differs += 1;
        }
    }
    assert!(differs >= 4, "only {differs} of 8 retries drew new clients");
}

#[test]
fn retries_exhausted_abort_the_run() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 3;
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 2;
    cfg.max_round_retries = 2;
    let global = vec![0.5f32; 3];
    let mut e = RoundEngine::new(cfg, global.clone(), 0);
    let mut f = fits(&join_all(&mut e, 2, t0));
    let mut t = t0;
    for attempt in 2..=3u32 {
        answer(&mut e, &f[0], 1, &[1.0; 3], t);
        t += DEADLINE;
        let actions = e.tick(t);
        assert_eq!(
            actions[0],
            Action::RoundRetry {
                round: 1,
                attempt,
                answered: 1,
                needed: 2
            }
        );
        f = fits(&actions);
        assert_eq!(f.len(), 2);
        assert_eq!(*e.global_model(), global);
    }
    // Third attempt (two retries spent): too few again.
    answer(&mut e, &f[0], 1, &[1.0; 3], t);
    let actions = e.tick(t + DEADLINE);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::Aborted { reason } = &actions[0] else {
        panic!("expected Aborted, got {actions:?}")
    };
    assert!(reason.contains("round 1"), "{reason}");
    assert!(reason.contains("3 attempts"), "{reason}");
    assert!(e.is_finished());
    assert_eq!(e.completed_rounds(), 0);
    assert_eq!(e.next_deadline(), None);
    assert_eq!(*e.global_model(), global);
    // Nothing happens after an abort.
    assert!(e.tick(t + DEADLINE * 10).is_empty());
    assert!(e.client_joined(id(50), t).is_empty());
    assert!(e.start(t).is_empty());
    let a = answer(&mut e, &f[1], 1, &[1.0; 3], t);
    assert_rejected(&a, &f[1].client, f[1].task_id, "no round is collecting");
}

#[test]
fn zero_retries_abort_on_the_first_short_round() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 2;
    let mut e = RoundEngine::new(cfg, vec![0.0; 1], 0);
    let f = fits(&join_all(&mut e, 2, t0));
    assert!(e.client_left(&f[0].client, t0).is_empty());
    let actions = e.client_left(&f[1].client, t0);
    assert!(
        matches!(actions.as_slice(), [Action::Aborted { .. }]),
        "{actions:?}"
    );
    assert!(e.is_finished());
}

#[test]
fn retry_waits_when_too_few_clients_remain() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_fit_clients = 2;
    cfg.min_available_clients = 2;
    cfg.max_round_retries = 1;
    let mut e = RoundEngine::new(cfg, vec![0.0; 1], 0);
    let f = fits(&join_all(&mut e, 2, t0));
    answer(&mut e, &f[0], 1, &[1.0], t0);
    let actions = e.client_left(&f[1].client, t0 + secs(1));
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(actions[0], Action::RoundRetry { attempt: 2, .. }));
    assert_eq!(e.next_deadline(), None);
    assert!(!e.is_finished());
    let f2 = fits(&e.client_joined("newcomer".into(), t0 + secs(2)));
    assert_eq!(f2.len(), 2);
    let mut actions = Vec::new();
    for f in &f2 {
        actions = answer(&mut e, f, 1, &[2.0], t0 + secs(3));
    }
    assert_eq!(outcomes(&actions)[0].attempts, 2);
    assert_eq!(*e.global_model(), vec![2.0]);
}

// 8. Federated evaluation.

fn eval_result(task: &EvaluateTask, examples: u64, loss: f64, accuracy: f64) -> EvalResult {
    EvalResult {
        round: task.round,
        task_id: task.task_id,
        examples,
        loss,
        accuracy,
    }
}

#[test]
fn federated_evaluation_is_weighted_and_ignores_bad_results() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 2;
    cfg.min_available_clients = 4;
    cfg.fraction_evaluate = 0.5;
    cfg.min_evaluate_clients = 1;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let r1 = fits(&join_all(&mut e, 4, t0));
    assert_eq!(r1.len(), 4);
    let mut actions = Vec::new();
    for f in &r1 {
        actions = answer(&mut e, f, 1, &[4.0, -4.0], t0 + secs(2));
    }
    // Fit is over: the model moved, evaluation is asked for, the round is
    // not reported yet.
    assert_eq!(*e.global_model(), vec![4.0, -4.0]);
    assert!(outcomes(&actions).is_empty(), "{actions:?}");
    assert!(fits(&actions).is_empty());
    let ev = evals(&actions);
    assert_eq!(ev.len(), 2, "ceil(0.5 * 4) = 2: {actions:?}");
    assert_eq!(actions.len(), 3);
    assert_ne!(ev[0].0, ev[1].0);
    assert_ne!(ev[0].1.task_id, ev[1].1.task_id);
    assert!(ev.iter().all(|(_, t)| t.round == 1));
    assert!(
        ev.iter()
            .all(|(_, t)| r1.iter().all(|f| f.task_id != t.task_id))
    );
    let te = t0 + secs(2);
    assert_eq!(e.next_deadline(), Some(te + DEADLINE));
    assert_eq!(e.round(), 1);

    let (c0, t0e) = (&ev[0].0, &ev[0].1);
    let (c1, t1e) = (&ev[1].0, &ev[1].1);
    let t = te + secs(1);
    // Results for tasks the client does not hold are ignored.
    assert!(
        e.eval_received(c0, &eval_result(t1e, 50, 0.1, 0.5), t)
            .is_empty(),
        "another client's task"
    );
    let mut wrong_round = eval_result(t0e, 50, 0.1, 0.5);
    wrong_round.round = 2;
    assert!(e.eval_received(c0, &wrong_round, t).is_empty());
    let outsider = (0..4).map(id).find(|c| c != c0 && c != c1).unwrap();
    assert!(
        e.eval_received(&outsider, &eval_result(t0e, 50, 0.1, 0.5), t)
            .is_empty()
    );
    // Each kind of invalid result is answered, and ends that client's part
    // in the evaluation at once (checked on a copy of the engine each time).
    for bad in [
        eval_result(t0e, 50, 0.1, 1.5),
        eval_result(t0e, 50, 0.1, -0.1),
        eval_result(t0e, 50, f64::NAN, 0.5),
        eval_result(t0e, 50, f64::INFINITY, 0.5),
        eval_result(t0e, 50, -1.0, 0.5),
        eval_result(t0e, MAX_EXAMPLES_PER_UPDATE + 1, 0.1, 0.5),
        eval_result(t0e, 0, 0.1, 0.5),
    ] {
        let mut copy = e.clone();
        let actions = copy.eval_received(c0, &bad, t);
        assert!(
            matches!(&actions[..], [Action::EvalRejected { client, task_id, .. }] if client == c0 && *task_id == t0e.task_id),
            "{bad:?}: {actions:?}"
        );
        // c1's answer now closes the evaluation without waiting for c0.
        let actions = copy.eval_received(c1, &eval_result(t1e, 8, 1.0, 0.25), t);
        assert_eq!(outcomes(&actions).len(), 1, "{actions:?}");
    }

    // The real ones: 24 examples at loss 0.5 / acc 0.75, 8 at 1.0 / 0.25.
    assert!(
        e.eval_received(c0, &eval_result(t0e, 24, 0.5, 0.75), t)
            .is_empty()
    );
    // A repeat is not counted twice.
    assert!(
        e.eval_received(c0, &eval_result(t0e, 24, 9.0, 0.0), t)
            .is_empty()
    );
    let actions = e.eval_received(c1, &eval_result(t1e, 8, 1.0, 0.25), te + secs(3));
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(
        o[0].federated_eval,
        Some(FederatedEval {
            clients: 2,
            examples: 32,
            loss: 0.625,
            accuracy: 0.625,
        })
    );
    assert_eq!(o[0].evaluate_seconds, 3.0);
    assert_eq!(o[0].fit_seconds, 2.0);
    assert_eq!(o[0].clients_answered, 4);
    // Round 2 follows in the same list.
    let r2 = fits(&actions);
    assert_eq!(r2.len(), 4);
    assert!(r2.iter().all(|f| f.round == 2));
    assert_eq!(e.round(), 2);
}

#[test]
fn evaluation_deadline_closes_with_what_arrived() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 4;
    cfg.fraction_evaluate = 1.0;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let r1 = fits(&join_all(&mut e, 4, t0));
    let mut actions = Vec::new();
    for f in &r1 {
        actions = answer(&mut e, f, 1, &[1.0, 1.0], t0);
    }
    let ev = evals(&actions);
    assert_eq!(ev.len(), 4);
    // One answers, one fails, one sends nonsense (and is dropped from the
    // evaluation), one says nothing.
    assert!(
        e.eval_received(&ev[0].0, &eval_result(&ev[0].1, 10, 2.0, 0.5), t0)
            .is_empty()
    );
    assert!(e.task_failed(&ev[1].0, ev[1].1.task_id, t0).is_empty());
    let actions = e.eval_received(&ev[2].0, &eval_result(&ev[2].1, 10, 2.0, 7.0), t0);
    assert!(
        matches!(&actions[..], [Action::EvalRejected { .. }]),
        "{actions:?}"
    );
    assert!(e.tick(t0 + secs(59)).is_empty());
    let actions = e.tick(t0 + DEADLINE);
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(
        o[0].federated_eval,
        Some(FederatedEval {
            clients: 1,
            examples: 10,
            loss: 2.0,
            accuracy: 0.5,
        })
    );
    assert_eq!(o[0].evaluate_seconds, 60.0);
    assert_eq!(actions.last(), Some(&Action::Finished));
}

#[test]
fn evaluation_with_no_valid_results_reports_none() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.min_available_clients = 2;
    cfg.fraction_evaluate = 0.01;
    cfg.min_evaluate_clients = 2;
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let r1 = fits(&join_all(&mut e, 2, t0));
    let mut actions = Vec::new();
    for f in &r1 {
        actions = answer(&mut e, f, 1, &[1.0, 1.0], t0);
    }
    let ev = evals(&actions);
    assert_eq!(ev.len(), 2, "raised to min_evaluate_clients");
    assert!(e.client_left(&ev[0].0, t0).is_empty());
    let actions = e.client_left(&ev[1].0, t0);
    let o = outcomes(&actions);
    assert_eq!(o.len(), 1, "{actions:?}");
    assert_eq!(o[0].federated_eval, None);
    assert!(e.is_finished());
}

// 9. Scale.

#[test]
fn five_thousand_clients_twenty_rounds() {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        rounds: 20,
        fraction_fit: 0.01,
        min_fit_clients: 10,
        max_fit_clients: 1000,
        min_available_clients: 5000,
        round_deadline: DEADLINE,
        fit: fit_instructions(),
        fraction_evaluate: 0.0,
        min_evaluate_clients: 0,
        max_round_retries: 0,
        seed: 2024,
        one_task_per_connection: false,
        updates: permissive(),
        strategy: Default::default(),
    };
    let mut e = RoundEngine::new(cfg, vec![0.0; 4], 0);
    let mut pending = join_all(&mut e, 5000, t0);
    let mut finished = Vec::new();
    let mut task_ids = BTreeSet::new();
    let mut rounds_seen = 0;
    let mut now = t0;
    while !pending.is_empty() {
        let batch = fits(&pending);
        let round = rounds_seen + 1;
        assert_eq!(batch.len(), 50, "round {round}");
        assert_eq!(clients_of(&batch).len(), 50);
        assert!(batch.iter().all(|f| f.round == round));
        let mut next = Vec::new();
        now += secs(1);
        for (i, f) in batch.iter().enumerate() {
            assert!(task_ids.insert(f.task_id), "task id reused");
            let v = (i % 3) as f32;
            next = answer(&mut e, f, 2, &[v, -v, 1.0, 0.0], now);
        }
        let o = outcomes(&next);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].round, round);
        assert_eq!(o[0].clients_available, 5000);
        assert_eq!(o[0].clients_answered, 50);
        finished.extend(o);
        rounds_seen = round;
        if next.last() == Some(&Action::Finished) {
            break;
        }
        pending = next;
    }
    assert_eq!(finished.len(), 20);
    assert!(e.is_finished());
    assert_eq!(e.completed_rounds(), 20);
    assert_eq!(task_ids.len(), 1000);
    assert_eq!(e.global_model()[2], 20.0);
}

// 10. Resume.

#[test]
fn resume_starts_after_the_completed_rounds() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 5;
    cfg.min_available_clients = 2;
    let mut e = RoundEngine::new(cfg, vec![3.0, 3.0], 3);
    assert_eq!(e.round(), 4);
    assert_eq!(e.completed_rounds(), 3);
    assert!(!e.is_finished());
    assert!(e.start(t0).is_empty());
    let mut f = fits(&join_all(&mut e, 2, t0));
    assert!(f.iter().all(|f| f.round == 4));
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut actions = Vec::new();
        for x in &f {
            actions = answer(&mut e, x, 1, &[1.0, 0.0], t0);
        }
        seen.extend(outcomes(&actions).into_iter().map(|o| o.round));
        f = fits(&actions);
        if actions.last() == Some(&Action::Finished) {
            assert!(f.is_empty());
        }
    }
    assert_eq!(seen, vec![4, 5]);
    assert!(e.is_finished());
    assert_eq!(e.completed_rounds(), 5);
    assert_eq!(*e.global_model(), vec![5.0, 3.0]);
}

#[test]
fn resume_start_with_all_rounds_done_finishes_at_once() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 5;
    let mut e = RoundEngine::new(cfg, vec![1.0], 5);
    assert!(e.is_finished());
    assert_eq!(e.completed_rounds(), 5);
    assert_eq!(e.start(t0), vec![Action::Finished]);
    assert!(e.client_joined(id(0), t0).is_empty());
    assert_eq!(e.next_deadline(), None);
    assert_eq!(*e.global_model(), vec![1.0]);
}

#[test]
fn resume_after_the_last_round_via_start_then_joins() {
    // Resuming with one round left, started before any client joined.
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 5;
    let mut e = RoundEngine::new(cfg, vec![0.0], 4);
    assert!(e.start(t0).is_empty());
    let f = fits(&e.client_joined(id(0), t0));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].round, 5);
    let actions = answer(&mut e, &f[0], 1, &[1.0], t0);
    assert_eq!(outcomes(&actions)[0].round, 5);
    assert_eq!(actions.last(), Some(&Action::Finished));
    assert_eq!(e.completed_rounds(), 5);
}

#[test]
fn resume_from_the_checkpointed_state_continues_exactly_like_an_uninterrupted_run() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 3;
    cfg.min_available_clients = 4;
    cfg.fraction_fit = 0.5;
    cfg.fraction_evaluate = 0.5;
    cfg.updates = UpdatePolicy::default();
    let base = cfg.clone();
    // Runs rounds, answering every task with a client-specific delta; returns
    // the round-3 tasks and the final model.
    let drive = |e: &mut RoundEngine, mut actions: Vec<Action>, upto: u64| {
        let mut last = Vec::new();
        loop {
            let f = fits(&actions);
            let ev = evals(&actions);
            if let Some(o) = outcomes(&actions).last()
                && o.round == upto
            {
                return (last, o.state.clone(), e.global_model().to_vec());
            }
            if !f.is_empty() {
                last = f.clone();
            }
            let mut next = Vec::new();
            for fit in &f {
                let k = fit.client.len() as f32 + (fit.seed % 7) as f32;
                next.extend(answer(e, fit, 10 + fit.task_id, &[k, -k], t0));
            }
            for (client, task) in &ev {
                let r = eval_result(task, 5, 0.5, 0.5);
                next.extend(e.eval_received(client, &r, t0));
            }
            actions = next;
        }
    };
    for name in [
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedprox",
    ] {
        let mut cfg = base.clone();
        cfg.strategy.name = name.into();
        cfg.strategy.server_lr = 0.5;
        let mut whole = RoundEngine::new(cfg.clone(), vec![0.0; 2], 0);
        let start = join_all(&mut whole, 4, t0);
        let (tasks_whole, _, model_whole) = drive(&mut whole, start, 3);

        let mut first = RoundEngine::new(cfg.clone(), vec![0.0; 2], 0);
        let start = join_all(&mut first, 4, t0);
        let (_, state, model) = drive(&mut first, start, 2);
        // "Crash" after round 2's checkpoint; resume from what it holds.
        let saved = first.strategy_state();
        let mut resumed = RoundEngine::resume(cfg, model, state);
        resumed.restore_strategy(&saved).unwrap();
        let start = join_all(&mut resumed, 4, t0);
        let (tasks_resumed, _, model_resumed) = drive(&mut resumed, start, 3);
        assert_eq!(
            tasks_resumed, tasks_whole,
            "{name}: same clients, task ids and seeds"
        );
        assert_eq!(model_resumed, model_whole, "{name}: bit-identical model");
    }
}

#[test]
fn resume_with_scaffold_or_qfedavg_continues_exactly_like_an_uninterrupted_run() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.rounds = 3;
    cfg.min_available_clients = 4;
    cfg.fraction_fit = 0.5;
    cfg.updates = UpdatePolicy::default();
    let base = cfg.clone();
    // Answers every task with a client-specific delta (and, for SCAFFOLD, a
    // control variate change; for q-FedAvg, an initial loss); returns the
    // last round's tasks, the model and the control variate sent down.
    let drive = |e: &mut RoundEngine, mut actions: Vec<Action>, upto: u64| {
        let mut last = Vec::new();
        loop {
            let f = fits(&actions);
            if let Some(o) = outcomes(&actions).last()
                && o.round == upto
            {
                return (last, o.state.clone(), e.global_model().to_vec());
            }
            if !f.is_empty() {
                last = f.clone();
            }
            let mut next = Vec::new();
            for fit in &f {
                let k = fit.client.len() as f32 + (fit.seed % 7) as f32;
                let loss = vec![(
                    fedquic_protocol::INITIAL_LOSS_METRIC.to_string(),
                    0.5 + (fit.seed % 5) as f64,
                )];
                let delta = [k, -k, 0.25 * k, 1.0 + (fit.seed % 3) as f32];
                let values = 2 + e.extra_update_values();
                next.extend(e.update_received(
                    &fit.client,
                    fit.task_id,
                    fit.round,
                    10 + fit.task_id,
                    &loss,
                    &delta[..values],
                    t0,
                ));
            }
            actions = next;
        }
    };
    for name in ["scaffold", "qfedavg", "fedadam"] {
        let mut cfg = base.clone();
        cfg.strategy.name = name.into();
        cfg.strategy.server_lr = 0.5;
        cfg.strategy.q = 2.0;
        let mut whole = RoundEngine::new(cfg.clone(), vec![0.0; 2], 0);
        let start = join_all(&mut whole, 4, t0);
        if name == "scaffold" {
            let sent = start.iter().find_map(|a| match a {
                Action::SendFit { task, .. } => Some(task.clone()),
                _ => None,
            });
            let sent = sent.unwrap();
            assert_eq!(sent.scaffold.unwrap().run, "run");
            assert_eq!(whole.fit_payload().len(), 4, "model, then c");
        }
        let (tasks_whole, _, model_whole) = drive(&mut whole, start, 3);
        let payload_whole = whole.fit_payload().to_vec();

        let mut first = RoundEngine::new(cfg.clone(), vec![0.0; 2], 0);
        let start = join_all(&mut first, 4, t0);
        let (_, state, model) = drive(&mut first, start, 2);
        // "Crash" after round 2's checkpoint; resume from what it holds.
        let saved = first.strategy_state();
        let mut resumed = RoundEngine::resume(cfg, model, state);
        resumed.restore_strategy(&saved).unwrap();
        let start = join_all(&mut resumed, 4, t0);
        let (tasks_resumed, _, model_resumed) = drive(&mut resumed, start, 3);
        assert_eq!(tasks_resumed, tasks_whole, "{name}: same tasks");
        assert_eq!(model_resumed, model_whole, "{name}: bit-identical model");
        assert_eq!(
            resumed.fit_payload().to_vec(),
            payload_whole,
            "{name}: bit-identical control variate"
        );
        assert!(model_whole.iter().any(|v| *v != 0.0), "{name} moved");
        if name == "scaffold" {
            assert!(payload_whole[2..].iter().any(|v| *v != 0.0), "c moved");
        }
    }
}

#[test]
fn strategy_refusals_and_scaffold_sizes_are_enforced() {
    let t0 = Instant::now();
    // q-FedAvg refuses an update without a plausible initial loss.
    let mut cfg = config();
    cfg.strategy.name = "qfedavg".into();
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&e.client_joined(id(0), t0));
    assert!(matches!(&f[..], [_]), "one task: {f:?}");
    let actions = answer(&mut e, &f[0], 10, &[1.0, 1.0], t0);
    assert!(
        matches!(&actions[0], Action::UpdateRejected { reason, .. } if reason.contains("initial_loss")),
        "{actions:?}"
    );
    // SCAFFOLD: an update must carry Delta c after Delta y.
    let mut cfg = config();
    cfg.strategy.name = "scaffold".into();
    let mut e = RoundEngine::new(cfg, vec![0.0; 2], 0);
    let f = fits(&e.client_joined(id(0), t0));
    let actions = answer(&mut e, &f[0], 10, &[1.0, 1.0], t0);
    assert!(
        matches!(&actions[0], Action::UpdateRejected { reason, .. } if reason.contains("expected 2 (model) + 2")),
        "{actions:?}"
    );
}

#[test]
fn a_checkpointed_engine_state_must_be_sane_to_resume_from() {
    let good = EngineState {
        completed_rounds: 7,
        next_task_id: 71,
        selection_seed: 1,
        fit_seed: 2,
        median_update_norm: Some(0.5),
    };
    good.validate().unwrap();
    for (bad, says) in [
        (
            EngineState {
                median_update_norm: Some(-1.0),
                ..good.clone()
            },
            "median update norm -1",
        ),
        (
            EngineState {
                median_update_norm: Some(f64::NAN),
                ..good.clone()
            },
            "median update norm NaN",
        ),
        (
            EngineState {
                completed_rounds: u64::MAX,
                ..good.clone()
            },
            "completed rounds",
        ),
        (
            EngineState {
                next_task_id: u64::MAX,
                ..good.clone()
            },
            "next task id",
        ),
    ] {
        let err = bad.validate().unwrap_err();
        assert!(err.contains(says), "{err}");
    }
}
