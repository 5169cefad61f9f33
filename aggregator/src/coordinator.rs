//! The seam between the async server shell and whatever decides what happens
//! in a run.
//!
//! The shell (`server`) moves bytes, validates framing, enforces deadlines
//! per stream and persists what it is told to; a [`Coordinator`] decides
//! which client trains when, what to do with each update and when the global
//! model moves. [`RoundEngine`] (synchronous rounds, any [`Strategy`]) is one;
//! an asynchronous coordinator such as FedBuff is another that reuses the
//! whole shell. Like the engine, a coordinator is a pure state machine:
//! events in, [`Action`]s out, time passed in, so it is tested without
//! sockets or clocks.
//!
//! [`Strategy`]: crate::strategy::Strategy

use std::sync::Arc;
use std::time::Instant;

use fedquic_protocol::{EvalResult, Metrics, SecAggStep};

use crate::engine::{Action, ClientId, RejectCause, RoundEngine, Waiting};

/// One complete, framed update as the shell received it: its header's
/// claims (untrusted) and its decoded body.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedUpdate<'a> {
    pub client: &'a str,
    pub task_id: u64,
    pub round: u64,
    pub num_examples: u64,
    pub metrics: &'a Metrics,
    pub delta: &'a [f32],
    /// `delta`'s L2 norm ([`crate::engine::l2_norm`]) where the shell took
    /// it while decoding (computed by the shell, never claimed by the
    /// client); `None`: the coordinator computes it.
    pub norm: Option<f64>,
}

/// What the server shell drives. Every method returns the actions the shell
/// must carry out, in order.
pub trait Coordinator: Send {
    /// The run begins (or resumes).
    fn start(&mut self, now: Instant) -> Vec<Action>;
    /// When [`Coordinator::tick`] must be called next, if anything is timed.
    fn next_deadline(&self) -> Option<Instant>;
    /// Time passed (a deadline may have expired).
    fn tick(&mut self, now: Instant) -> Vec<Action>;
    /// An authenticated client completed its handshake.
    fn client_joined(&mut self, client: ClientId, now: Instant) -> Vec<Action>;
    /// A client's session ended; any task it held is forfeited.
    fn client_left(&mut self, client: &str, now: Instant) -> Vec<Action>;
    /// Whether an upload announced by this header may take a buffer, decided
    /// before any body bytes are read.
    fn check_upload(
        &self,
        client: &str,
        round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)>;
    /// A complete update arrived.
    fn update_received(&mut self, update: ReceivedUpdate<'_>, now: Instant) -> Vec<Action>;
    /// The shell could not use an upload (malformed, too slow, refused).
    fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        cause: RejectCause,
        now: Instant,
    ) -> Vec<Action>;
    /// The client reported it could not complete its task.
    fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action>;
    /// An evaluation result arrived.
    fn eval_received(&mut self, client: &str, result: &EvalResult, now: Instant) -> Vec<Action>;
    /// A secure-aggregation step arrived from a client (validated). A
    /// coordinator without secure aggregation ignores it.
    fn secagg_received(
        &mut self,
        _client: &str,
        _task_id: u64,
        _step: &SecAggStep,
        _now: Instant,
    ) -> Vec<Action> {
        Vec::new()
    }
    /// Whether this client still owes this task (messages about anything
    /// else are ignored).
    fn is_pending(&self, client: &str, task_id: u64) -> bool;
    /// Changes whenever the uploads in flight stop being useful; the shell
    /// cancels them.
    fn fit_epoch(&self) -> u64;
    /// The current global model.
    fn global_model(&self) -> Arc<Vec<f32>>;
    /// What a fit task's model stream carries: the global model, followed
    /// by any per-round server state clients need (SCAFFOLD's control
    /// variate), laid out as the update layout says.
    fn fit_payload(&self) -> Arc<Vec<f32>> {
        self.global_model()
    }
    /// While no work can start for want of clients: which round (and
    /// attempt) waits, how many clients are available and how many are
    /// needed (the shell's "waiting for" log line; a simulator's cue to
    /// bring in the next cohort).
    fn waiting_for(&self) -> Option<Waiting> {
        None
    }
    /// Model versions committed so far (rounds, for a round-based coordinator).
    fn completed_rounds(&self) -> u64;
    /// The strategy's state, for the checkpoint written after a commit.
    fn strategy_state(&self) -> Vec<u8>;
}

impl Coordinator for RoundEngine {
    fn start(&mut self, now: Instant) -> Vec<Action> {
        RoundEngine::start(self, now)
    }
    fn next_deadline(&self) -> Option<Instant> {
        RoundEngine::next_deadline(self)
    }
    fn tick(&mut self, now: Instant) -> Vec<Action> {
        RoundEngine::tick(self, now)
    }
    fn client_joined(&mut self, client: ClientId, now: Instant) -> Vec<Action> {
        RoundEngine::client_joined(self, client, now)
    }
    fn client_left(&mut self, client: &str, now: Instant) -> Vec<Action> {
        RoundEngine::client_left(self, client, now)
    }
    fn check_upload(
        &self,
        client: &str,
        round: u64,
        task_id: u64,
    ) -> Result<(), (RejectCause, String)> {
        RoundEngine::check_upload(self, client, round, task_id)
    }
    fn update_received(&mut self, u: ReceivedUpdate<'_>, now: Instant) -> Vec<Action> {
        RoundEngine::receive_update(self, u, now)
    }
    fn update_failed(
        &mut self,
        client: &str,
        task_id: Option<u64>,
        cause: RejectCause,
        now: Instant,
    ) -> Vec<Action> {
        RoundEngine::update_failed(self, client, task_id, cause, now)
    }
    fn task_failed(&mut self, client: &str, task_id: u64, now: Instant) -> Vec<Action> {
        RoundEngine::task_failed(self, client, task_id, now)
    }
    fn eval_received(&mut self, client: &str, result: &EvalResult, now: Instant) -> Vec<Action> {
        RoundEngine::eval_received(self, client, result, now)
    }
    fn is_pending(&self, client: &str, task_id: u64) -> bool {
        RoundEngine::is_pending(self, client, task_id)
    }
    fn fit_epoch(&self) -> u64 {
        RoundEngine::fit_epoch(self)
    }
    fn global_model(&self) -> Arc<Vec<f32>> {
        RoundEngine::global_model(self)
    }
    fn fit_payload(&self) -> Arc<Vec<f32>> {
        RoundEngine::fit_payload(self)
    }
    fn completed_rounds(&self) -> u64 {
        RoundEngine::completed_rounds(self)
    }
    fn waiting_for(&self) -> Option<Waiting> {
        RoundEngine::waiting_for(self)
    }
    fn strategy_state(&self) -> Vec<u8> {
        RoundEngine::strategy_state(self)
    }
}
