//! The server shell reused by a coordinator other than the round engine: a
//! sequential, round-less one that commits every update the moment it arrives
//! (the shape of an asynchronous coordinator), over real QUIC and mTLS.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fedquic::aggregator::engine::{Action, ClientId, RejectCause};
use fedquic::aggregator::{Coordinator, ReceivedUpdate};
use fedquic::net::pki::CertAuthority;
use fedquic::protocol::{EvalResult, FitTask};

/// Hands one fit task at a time to the longest-waiting client, adds each
/// accepted update to the model at once, and finishes after `target` commits.
#[derive(Debug)]
struct OneAtATime {
    model: Arc<Vec<f32>>,
    waiting: VecDeque<ClientId>,
    /// The client training now and its task.
    busy: Option<(ClientId, u64)>,
    next_task: u64,
    commits: u64,
    target: u64,
    instructions: fedquic::protocol::FitInstructions,
}

impl OneAtATime {
    fn dispatch(&mut self) -> Vec<Action> {
        if self.busy.is_some() || self.commits >= self.target {
            return Vec::new();
        }
        let Some(client) = self.waiting.pop_front() else {
            return Vec::new();
        };
        self.next_task += 1;
        self.busy = Some((client.clone(), self.next_task));
        vec![Action::SendFit {
            client,
            task: FitTask {
                round: self.commits + 1,
                task_id: self.next_task,
                config: self.instructions.clone(),
                initial_loss: false,
                scaffold: None,
                secagg: None,
            },
        }]
    }

    /// The busy client is done (either way) and queues up again.
    fn release(&mut self, requeue: bool) -> Vec<Action> {
        if let Some((client, _)) = self.busy.take()
            && requeue
        {
            self.waiting.push_back(client);
        }
        self.dispatch()
    }
}

impl Coordinator for OneAtATime {
    fn start(&mut self, _now: Instant) -> Vec<Action> {
        self.dispatch()
    }
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    fn tick(&mut self, _now: Instant) -> Vec<Action> {
        Vec::new()
    }
    fn client_joined(&mut self, client: ClientId, _now: Instant) -> Vec<Action> {
        self.waiting.push_back(client);
        self.dispatch()
    }
    fn client_left(&mut self, client: &str, _now: Instant) -> Vec<Action> {
        self.waiting.retain(|c| c != client);
        match &self.busy {
            Some((c, _)) if c == client => self.release(false),
            _ => Vec::new(),
        }
    }
    fn check_upload(
        &self,
        client: &str,
        _round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)> {
        match &self.busy {
            Some((c, t)) if c == client && *t == task_id => Ok(()),
            _ => Err((RejectCause::NotSelected, "not your turn".into())),
        }
    }
    fn update_received(&mut self, u: ReceivedUpdate<'_>, _now: Instant) -> Vec<Action> {
        if self.check_upload(u.client, u.round, u.task_id).is_err()
            || u.delta.len() != self.model.len()
        {
            return Vec::new();
        }
        let model = self.model.iter().zip(u.delta).map(|(m, d)| m + d).collect();
        self.model = Arc::new(model);
        self.commits += 1;
        let mut actions = vec![Action::UpdateAccepted {
            client: u.client.to_string(),
            task_id: u.task_id,
        }];
        actions.extend(self.release(true));
        if self.commits >= self.target {
            actions.push(Action::Finished);
        }
        actions
    }
    fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        _cause: RejectCause,
        _now: Instant,
    ) -> Vec<Action> {
        match (&self.busy, task_id) {
            (Some((c, t)), Some(id)) if c == client && *t == id => self.release(true),
            _ => Vec::new(),
        }
    }
    fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action> {
        self.update_failed(client, Some(task_id), RejectCause::NotSelected, now)
    }
    fn eval_received(&mut self, _c: &str, _r: &EvalResult, _now: Instant) -> Vec<Action> {
        Vec::new()
    }
    fn is_pending(&self, client: &str, task_id: u64) -> bool {
        self.busy
            .as_ref()
            .is_some_and(|(c, t)| c == client && *t == task_id)
    }
    fn fit_epoch(&self) -> u64 {
        self.commits
    }
    fn global_model(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.model)
    }
    fn completed_rounds(&self) -> u64 {
        self.commits
    }
    fn strategy_state(&self) -> Vec<u8> {
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_shell_runs_a_different_coordinator() {
    let ca = CertAuthority::generate("coordinator CA").unwrap();
    let opts = Options::new(engine(2, 2, 1, Duration::from_secs(30)));
    let instructions = opts.engine.fit.clone();
    let coordinator = OneAtATime {
        model: Arc::new(vec![0.0; PARAMS]),
        waiting: VecDeque::new(),
        busy: None,
        next_task: 0,
        commits: 0,
        target: 6,
        instructions,
    };
    let agg = start_with(&ca, opts, Box::new(coordinator));
    let a = honest(&ca, agg.addr, "client-a", 0.25, 10);
    let b = honest(&ca, agg.addr, "client-b", 0.25, 10);
    let summary = within(60, agg.task).await.unwrap().unwrap();
    assert!(summary.finished);
    assert_eq!(summary.rounds_completed, 6);
    // Six sequential commits of +0.25 each, every one applied to the model
    // the client was sent.
    assert!(
        summary.final_model.iter().all(|&v| v == 1.5),
        "{:?}",
        &summary.final_model[..4]
    );
    let (a, b) = (
        within(30, a).await.unwrap().unwrap(),
        within(30, b).await.unwrap().unwrap(),
    );
    assert_eq!(a.fit_tasks + b.fit_tasks, 6);
    assert!(
        a.fit_tasks >= 1 && b.fit_tasks >= 1,
        "both clients took turns"
    );
}

#[tokio::test]
async fn a_coordinator_whose_model_does_not_fit_the_layout_is_refused() {
    let ca = CertAuthority::generate("coordinator CA").unwrap();
    let opts = Options::new(engine(1, 1, 1, Duration::from_secs(30)));
    let instructions = opts.engine.fit.clone();
    let coordinator = OneAtATime {
        model: Arc::new(vec![0.0; PARAMS + 1]),
        waiting: VecDeque::new(),
        busy: None,
        next_task: 0,
        commits: 0,
        target: 1,
        instructions,
    };
    let agg = start_with(&ca, opts, Box::new(coordinator));
    let err = within(10, agg.task).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("coordinator"), "{err}");
}
