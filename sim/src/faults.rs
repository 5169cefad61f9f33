//! Fault injection: clients that vanish, straggle or attack, seeded and
//! deterministic, and a log of every fault injected (`faults.csv`).
//!
//! Each decision is a pure function of the run's seed, the round and the
//! client, so a run is replayable. The round of a fit task is recovered from
//! its training seed, which the aggregator derives as
//! `mix(fit_seed, round, task_id)` (see `fedquic_aggregator::engine::mix`).
//!
//! - `--dropout P`: a selected client trains, then vanishes: its connection is
//!   dropped (the client task is aborted, quinn closes the connection) before
//!   or, over a shaped `--link`, part-way through its upload. It reconnects
//!   for later rounds as a restarted app would.
//! - `--stragglers P:DIST`: a selected client waits a delay drawn from DIST
//!   after training and before uploading (outside the training slots, so it
//!   does not hold up the others); past the round deadline it is cut.
//! - `--byzantine FRACTION:KIND`: `round(FRACTION * clients)` fixed clients
//!   (chosen by the seed) send a poisoned update whenever selected.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fedquic_aggregator::engine::mix;
use fedquic_client::{EvalOutcome, FitOutcome, LocalTrainer, Trainer, TrainerError};
use fedquic_protocol::FitInstructions;
use fedquic_train::Dataset;
use fedquic_train::backend::Engine;
use fedquic_train::layout::ParamLayout;
use serde::Serialize;
use tokio::sync::mpsc;

/// Why a fault specification cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FaultSpecError {
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

fn invalid(what: &'static str, reason: impl Into<String>) -> FaultSpecError {
    FaultSpecError::Invalid {
        what,
        reason: reason.into(),
    }
}

fn number(what: &'static str, s: &str) -> Result<f64, FaultSpecError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| invalid(what, format!("'{s}' is not a number")))?;
    if !v.is_finite() {
        return Err(invalid(what, format!("'{s}' is not finite")));
    }
    Ok(v)
}

fn probability(what: &'static str, s: &str) -> Result<f64, FaultSpecError> {
    let p = number(what, s)?;
    if !(0.0..=1.0).contains(&p) {
        return Err(invalid(what, format!("{p} is not in [0, 1]")));
    }
    Ok(p)
}

/// Longest straggler delay: a bound on what a config can make the sim wait.
pub const MAX_DELAY_SECS: f64 = 3600.0;

/// A delay distribution, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum DelayDist {
    /// `exp(N(mu, sigma^2))`.
    LogNormal { mu: f64, sigma: f64 },
    /// Exponential with this mean.
    Exp { mean: f64 },
    /// Uniform in `[lo, hi]`.
    Uniform { lo: f64, hi: f64 },
    /// Always this long.
    Const { secs: f64 },
}

impl DelayDist {
    /// A draw, clamped to `[0, MAX_DELAY_SECS]`.
    pub fn sample(&self, rng: &mut SplitMix) -> f64 {
        let v = match *self {
            DelayDist::LogNormal { mu, sigma } => (mu + sigma * rng.normal()).exp(),
            DelayDist::Exp { mean } => -mean * (1.0 - rng.uniform()).ln(),
            DelayDist::Uniform { lo, hi } => lo + (hi - lo) * rng.uniform(),
            DelayDist::Const { secs } => secs,
        };
        v.clamp(0.0, MAX_DELAY_SECS)
    }
}

impl FromStr for DelayDist {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHAT: &str = "straggler delay distribution";
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let nums = |n: usize| -> Result<Vec<f64>, FaultSpecError> {
            let v: Vec<f64> = args
                .split(',')
                .filter(|a| !a.is_empty())
                .map(|a| number(WHAT, a))
                .collect::<Result<_, _>>()?;
            if v.len() != n {
                return Err(invalid(
                    WHAT,
                    format!("'{name}' takes {n} number(s), got '{args}'"),
                ));
            }
            Ok(v)
        };
        let nonneg = |v: f64, label: &str| {
            if v < 0.0 {
                Err(invalid(WHAT, format!("{label} must be >= 0, got {v}")))
            } else {
                Ok(v)
            }
        };
        Ok(match name {
            "lognormal" => {
                let v = nums(2)?;
                DelayDist::LogNormal {
                    mu: v[0],
                    sigma: nonneg(v[1], "sigma")?,
                }
            }
            "exp" => DelayDist::Exp {
                mean: nonneg(nums(1)?[0], "the mean")?,
            },
            "uniform" => {
                let v = nums(2)?;
                if v[0] < 0.0 || v[1] < v[0] {
                    return Err(invalid(WHAT, "uniform:LO,HI needs 0 <= LO <= HI"));
                }
                DelayDist::Uniform { lo: v[0], hi: v[1] }
            }
            "const" => DelayDist::Const {
                secs: nonneg(nums(1)?[0], "the delay")?,
            },
            other => {
                return Err(invalid(
                    WHAT,
                    format!(
                        "unknown '{other}': use lognormal:MU,SIGMA, exp:MEAN, uniform:LO,HI or const:SECS"
                    ),
                ));
            }
        })
    }
}

/// `--stragglers P:DIST`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StragglerSpec {
    pub probability: f64,
    pub delay: DelayDist,
}

impl FromStr for StragglerSpec {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (p, dist) = s.split_once(':').ok_or_else(|| {
            invalid(
                "--stragglers",
                format!("expected P:DIST (e.g. 0.3:lognormal:0,1), got '{s}'"),
            )
        })?;
        Ok(StragglerSpec {
            probability: probability("--stragglers probability", p)?,
            delay: dist.parse()?,
        })
    }
}

/// What a Byzantine client sends instead of its honest update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum AttackKind {
    /// The honest update negated.
    SignFlip,
    /// The honest update times X.
    Scale(f64),
    /// Gaussian noise N(0, sigma^2) per coordinate instead of the update.
    Gaussian(f64),
    /// Trains honestly on labels mapped `l -> classes - 1 - l`.
    LabelFlip,
    /// Every coordinate equal to this value.
    SameValue(f64),
    /// "A Little Is Enough" (Baruch et al. 2019): every colluder sends
    /// `mean - z * std` of the colluders' own honest updates, coordinate-wise;
    /// `None`: z from the paper's formula for the round's size.
    Alie(Option<f64>),
}

impl fmt::Display for AttackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttackKind::SignFlip => write!(f, "sign-flip"),
            AttackKind::Scale(x) => write!(f, "scale:{x}"),
            AttackKind::Gaussian(s) => write!(f, "gaussian:{s}"),
            AttackKind::LabelFlip => write!(f, "label-flip"),
            AttackKind::SameValue(v) => write!(f, "same-value:{v}"),
            AttackKind::Alie(Some(z)) => write!(f, "alie:{z}"),
            AttackKind::Alie(None) => write!(f, "alie"),
        }
    }
}

impl FromStr for AttackKind {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHAT: &str = "Byzantine attack";
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let arg_or = |default: Option<f64>| -> Result<f64, FaultSpecError> {
            match (arg, default) {
                (Some(a), _) => number(WHAT, a),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(invalid(WHAT, format!("'{name}' needs a value: {name}:X"))),
            }
        };
        let no_arg = |kind: AttackKind| match arg {
            Some(a) => Err(invalid(WHAT, format!("'{name}' takes no value, got '{a}'"))),
            None => Ok(kind),
        };
        match name {
            "sign-flip" => no_arg(AttackKind::SignFlip),
            "label-flip" => no_arg(AttackKind::LabelFlip),
            "scale" => Ok(AttackKind::Scale(arg_or(None)?)),
            "gaussian" => {
                let sigma = arg_or(None)?;
                if sigma < 0.0 {
                    return Err(invalid(WHAT, "gaussian:SIGMA needs SIGMA >= 0"));
                }
                Ok(AttackKind::Gaussian(sigma))
            }
            "same-value" => Ok(AttackKind::SameValue(arg_or(Some(1.0))?)),
            "alie" => Ok(AttackKind::Alie(match arg {
                Some(a) => Some(number(WHAT, a)?),
                None => None,
            })),
            other => Err(invalid(
                WHAT,
                format!(
                    "unknown '{other}': use sign-flip, scale:X, gaussian:SIGMA, label-flip, same-value[:V] or alie[:Z]"
                ),
            )),
        }
    }
}

/// `--byzantine FRACTION:KIND`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ByzantineSpec {
    pub fraction: f64,
    pub kind: AttackKind,
}

impl FromStr for ByzantineSpec {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (f, kind) = s.split_once(':').ok_or_else(|| {
            invalid(
                "--byzantine",
                format!("expected FRACTION:KIND (e.g. 0.2:sign-flip), got '{s}'"),
            )
        })?;
        Ok(ByzantineSpec {
            fraction: probability("--byzantine fraction", f)?,
            kind: kind.parse()?,
        })
    }
}

/// Every fault the simulator injects.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FaultConfig {
    /// Probability that a selected client vanishes in a round.
    pub dropout: f64,
    pub stragglers: Option<StragglerSpec>,
    pub byzantine: Option<ByzantineSpec>,
}

impl FaultConfig {
    pub fn validate(&self) -> Result<(), FaultSpecError> {
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(invalid(
                "--dropout",
                format!("{} is not in [0, 1]", self.dropout),
            ));
        }
        Ok(())
    }

    pub fn is_active(&self) -> bool {
        self.dropout > 0.0 || self.stragglers.is_some() || self.byzantine.is_some()
    }
}

/// A small deterministic generator (SplitMix64) for fault decisions and noise.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

// Salts keep the streams of the different decisions independent.
const SALT_DROPOUT: u64 = 0xD809;
const SALT_STRAGGLER: u64 = 0x5791;
const SALT_BYZANTINE: u64 = 0xB1A5;
const SALT_NOISE: u64 = 0x6A55;
const SALT_ALIE: u64 = 0xA11E;

fn rng(seed: u64, salt: u64, round: u64, client: usize) -> SplitMix {
    SplitMix::new(mix(
        seed ^ salt.wrapping_mul(0x2545_F491_4F6C_DD1D),
        round,
        client as u64,
    ))
}

/// The clients (0-based) that are Byzantine for the whole run:
/// `round(fraction * clients)` of them, picked by the seed.
pub fn byzantine_clients(fraction: f64, clients: usize, seed: u64) -> Vec<usize> {
    let count = ((fraction * clients as f64).round() as usize).min(clients);
    let mut ids: Vec<usize> = (0..clients).collect();
    let mut r = rng(seed, SALT_BYZANTINE, 0, 0);
    // Fisher-Yates over the first `count` places.
    for i in 0..count {
        let j = i + (r.next_u64() % (clients - i) as u64) as usize;
        ids.swap(i, j);
    }
    let mut chosen = ids[..count].to_vec();
    chosen.sort_unstable();
    chosen
}

/// What happens to one client's task in one round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TaskFaults {
    /// Vanish after training; the value in [0, 1) says how far into the
    /// upload (0: before it).
    pub dropout: Option<f64>,
    /// Wait this long before uploading.
    pub straggle: Option<Duration>,
}

/// The decisions for `client` in `round`: a pure function of the seed.
pub fn decide(config: &FaultConfig, seed: u64, round: u64, client: usize) -> TaskFaults {
    let mut out = TaskFaults::default();
    if config.dropout > 0.0 {
        let mut r = rng(seed, SALT_DROPOUT, round, client);
        if r.uniform() < config.dropout {
            out.dropout = Some(r.uniform());
        }
    }
    if let Some(s) = &config.stragglers {
        let mut r = rng(seed, SALT_STRAGGLER, round, client);
        if r.uniform() < s.probability {
            out.straggle = Some(Duration::from_secs_f64(s.delay.sample(&mut r)));
        }
    }
    out
}

/// The inverse of the standard normal CDF (Acklam's rational approximation,
/// relative error below 1.2e-9).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let low = 0.02425;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -inverse_normal_cdf(1.0 - p)
    }
}

/// ALIE's z for `n` updates per round of which `m` are Byzantine (Baruch et
/// al. 2019, Algorithm 3): `s = floor(n/2 + 1) - m`, `z = Phi^-1((n - s) / n)`,
/// at least 0.
pub fn alie_z(n: usize, m: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let s = (n / 2 + 1) as f64 - m as f64;
    inverse_normal_cdf(((n as f64 - s) / n as f64).clamp(0.0, 1.0)).max(0.0)
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultEvent {
    pub round: u64,
    /// 1-based, as the clients' certificate names (`client-001`...).
    pub client: usize,
    /// `dropout`, `straggler` or `byzantine`.
    pub fault: &'static str,
    pub detail: String,
}

/// Every fault injected in a run, in the order they happened.
#[derive(Clone, Debug, Default)]
pub struct FaultLog(Arc<Mutex<Vec<FaultEvent>>>);

impl FaultLog {
    pub fn push(&self, event: FaultEvent) {
        tracing::debug!(round = event.round, client = event.client, fault = event.fault, detail = %event.detail, "fault injected");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }

    /// The events sorted by round, client and kind (arrival order is not
    /// deterministic, the events are).
    pub fn events(&self) -> Vec<FaultEvent> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(|a, b| (a.round, a.client, a.fault).cmp(&(b.round, b.client, b.fault)));
        v
    }
}

/// Finds the round of a fit task from its training seed, which the
/// aggregator derives as `mix(fit_seed, round, task_id)`. Task ids grow by
/// one per task, so the search starts at the last hit.
#[derive(Debug)]
pub struct RoundFinder {
    fit_seed: u64,
    max_round: u64,
    /// A bound on task ids (fit and evaluate tasks, retries included).
    max_task: u64,
    hint: Mutex<(u64, u64)>,
}

impl RoundFinder {
    pub fn new(fit_seed: u64, max_round: u64, clients: usize) -> Self {
        RoundFinder {
            fit_seed,
            max_round,
            max_task: (max_round + 2).saturating_mul(8 * clients as u64 + 64),
            hint: Mutex::new((1, 0)),
        }
    }

    pub fn round_of(&self, task_seed: u64) -> Option<u64> {
        let (hint_round, hint_task) = *self.hint.lock().unwrap_or_else(|e| e.into_inner());
        let window = 1024u64;
        let near = hint_task.saturating_sub(window)..hint_task.saturating_add(4 * window);
        let rounds = (hint_round..=self.max_round.min(hint_round + 2))
            // FedBuff numbers tasks by model version, from 0.
            .chain((0..hint_round).rev())
            .chain(hint_round + 3..=self.max_round);
        for (pass, tasks) in [near, 0..self.max_task].into_iter().enumerate() {
            for round in rounds.clone() {
                for task in tasks.clone() {
                    if mix(self.fit_seed, round, task) == task_seed {
                        *self.hint.lock().unwrap_or_else(|e| e.into_inner()) = (round, task);
                        return Some(round);
                    }
                }
                if pass == 0 && round > hint_round + 2 {
                    break;
                }
            }
        }
        None
    }
}

/// A counting semaphore for blocking threads: the training slots, taken by
/// the trainer itself so that a straggler's wait does not hold one.
#[derive(Debug)]
pub struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Slots {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        })
    }

    pub fn acquire(self: &Arc<Self>) -> SlotGuard {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        SlotGuard(Arc::clone(self))
    }
}

pub struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// The colluders' shared knowledge for ALIE: their data, and per round the
/// attack vector computed from their honest updates.
pub struct Collusion {
    pub train: Arc<Dataset>,
    pub test: Arc<Dataset>,
    /// (client, its training indices) of every Byzantine client.
    pub members: Vec<(usize, Vec<usize>)>,
    pub engine: Engine,
    /// ALIE's z.
    pub z: f64,
    pub seed: u64,
    /// (round, attack update).
    cache: Mutex<Option<(u64, Arc<Vec<f32>>)>>,
}

impl Collusion {
    pub fn new(
        train: Arc<Dataset>,
        test: Arc<Dataset>,
        members: Vec<(usize, Vec<usize>)>,
        engine: Engine,
        z: f64,
        seed: u64,
    ) -> Self {
        Collusion {
            train,
            test,
            members,
            engine,
            z,
            seed,
            cache: Mutex::new(None),
        }
    }

    /// `mean - z * std` over the colluders' honest updates from `global` in
    /// `round`, computed once per round (the lock makes later colluders wait
    /// for the first, which holds no resource they need).
    fn attack(
        &self,
        round: u64,
        layout: &ParamLayout,
        global: &[f32],
        config: &FitInstructions,
    ) -> Result<Arc<Vec<f32>>, TrainerError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((r, v)) = cache.as_ref()
            && *r == round
        {
            return Ok(Arc::clone(v));
        }
        let p = global.len();
        let (mut mean, mut m2) = (vec![0f64; p], vec![0f64; p]);
        let mut n = 0f64;
        for (client, indices) in &self.members {
            let mut t = LocalTrainer::new(
                Arc::clone(&self.train),
                indices.clone(),
                Arc::clone(&self.test),
                Vec::new(),
            )
            .with_engine(self.engine.share());
            t.prepare(layout)?;
            t.set_parameters(global)?;
            let cfg = FitInstructions {
                seed: mix(self.seed ^ SALT_ALIE, round, *client as u64),
                ..config.clone()
            };
            t.fit(&cfg)?;
            n += 1.0;
            // Welford's running mean and sum of squared deviations.
            for (((m, s), w), g) in mean.iter_mut().zip(&mut m2).zip(t.parameters()).zip(global) {
                let d = (*w - *g) as f64;
                let delta = d - *m;
                *m += delta / n;
                *s += delta * (d - *m);
            }
        }
        let denom = (n - 1.0).max(1.0);
        let attack: Vec<f32> = mean
            .iter()
            .zip(&m2)
            .map(|(m, s)| (m - self.z * (s / denom).sqrt()) as f32)
            .collect();
        let attack = Arc::new(attack);
        *cache = Some((round, Arc::clone(&attack)));
        Ok(attack)
    }
}

/// What a dropped client tells its supervisor: abort me after this long.
pub type KillSender = mpsc::UnboundedSender<Duration>;

/// Everything the fault-injecting trainers share.
pub struct FaultContext {
    pub config: FaultConfig,
    pub seed: u64,
    pub rounds: RoundFinder,
    pub log: FaultLog,
    pub slots: Arc<Slots>,
    /// Byzantine clients (0-based), sorted.
    pub byzantine: Vec<usize>,
    pub collusion: Option<Collusion>,
    /// Expected upload time over the shaped link (zero on plain loopback):
    /// how far a mid-upload dropout waits before cutting the connection.
    pub upload_time: Duration,
}

/// A simulated client's trainer with faults injected around the real
/// [`LocalTrainer`]: training itself is honest (except label flipping), and
/// the update is changed by moving the local parameters, from which the
/// client computes its delta.
pub struct FaultyTrainer {
    inner: LocalTrainer,
    /// 0-based.
    client: usize,
    ctx: Arc<FaultContext>,
    kill: Option<KillSender>,
    layout: Option<ParamLayout>,
    global: Vec<f32>,
}

impl FaultyTrainer {
    pub fn new(
        inner: LocalTrainer,
        client: usize,
        ctx: Arc<FaultContext>,
        kill: Option<KillSender>,
    ) -> Self {
        FaultyTrainer {
            inner,
            client,
            ctx,
            kill,
            layout: None,
            global: Vec::new(),
        }
    }

    fn attack(&self) -> Option<AttackKind> {
        let spec = self.ctx.config.byzantine?;
        self.ctx
            .byzantine
            .binary_search(&self.client)
            .is_ok()
            .then_some(spec.kind)
    }

    fn event(&self, round: u64, fault: &'static str, detail: String) {
        self.ctx.log.push(FaultEvent {
            round,
            client: self.client + 1,
            fault,
            detail,
        });
    }

    /// Replaces the honest delta (local - global) by the attack's.
    fn poison(
        &mut self,
        kind: AttackKind,
        round: u64,
        config: &FitInstructions,
    ) -> Result<(), TrainerError> {
        let global = &self.global;
        let local = self.inner.parameters();
        let mut delta: Vec<f32> = local.iter().zip(global).map(|(l, g)| l - g).collect();
        match kind {
            AttackKind::SignFlip => delta.iter_mut().for_each(|d| *d = -*d),
            AttackKind::Scale(x) => delta.iter_mut().for_each(|d| *d = (*d as f64 * x) as f32),
            AttackKind::Gaussian(sigma) => {
                let mut r = rng(self.ctx.seed, SALT_NOISE, round, self.client);
                delta
                    .iter_mut()
                    .for_each(|d| *d = (sigma * r.normal()) as f32);
            }
            AttackKind::SameValue(v) => delta.fill(v as f32),
            // Already trained on flipped labels.
            AttackKind::LabelFlip => return Ok(()),
            AttackKind::Alie(_) => {
                let collusion = self
                    .ctx
                    .collusion
                    .as_ref()
                    .ok_or_else(|| TrainerError::Other("ALIE without colluders".into()))?;
                let layout = self.layout.as_ref().ok_or(TrainerError::NoModel)?;
                let attack = collusion.attack(round, layout, global, config)?;
                delta.copy_from_slice(&attack);
            }
        }
        let poisoned: Vec<f32> = global.iter().zip(&delta).map(|(g, d)| g + d).collect();
        self.inner.set_parameters(&poisoned)
    }
}

/// Flips every label `l -> classes - 1 - l`: the label-flipping attackers'
/// copy of the training data.
pub fn label_flipped(data: &Dataset) -> Dataset {
    let top = data.classes.saturating_sub(1) as u8;
    Dataset {
        features: data.features.clone(),
        labels: data.labels.iter().map(|l| top.saturating_sub(*l)).collect(),
        dim: data.dim,
        classes: data.classes,
    }
}

impl Trainer for FaultyTrainer {
    fn prepare(&mut self, layout: &ParamLayout) -> Result<(), TrainerError> {
        self.layout = Some(layout.clone());
        self.inner.prepare(layout)
    }

    fn parameters(&self) -> &[f32] {
        self.inner.parameters()
    }

    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        self.global.clear();
        self.global.extend_from_slice(params);
        self.inner.set_parameters(params)
    }

    fn fit(&mut self, config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        let round = self.ctx.rounds.round_of(config.seed).unwrap_or(0);
        let outcome = {
            let _slot = self.ctx.slots.acquire();
            let outcome = self.inner.fit(config)?;
            if let Some(kind) = self.attack() {
                self.poison(kind, round, config)?;
                self.event(round, "byzantine", kind.to_string());
            }
            outcome
        };
        let faults = decide(&self.ctx.config, self.ctx.seed, round, self.client);
        if let Some(delay) = faults.straggle {
            self.event(round, "straggler", format!("{:.3}s", delay.as_secs_f64()));
            std::thread::sleep(delay);
        }
        if let (Some(at), Some(kill)) = (faults.dropout, &self.kill) {
            let after = self.ctx.upload_time.mul_f64(at);
            let phase = if after.is_zero() {
                "before-upload".to_string()
            } else {
                format!("mid-upload after {:.0} ms", after.as_secs_f64() * 1e3)
            };
            self.event(round, "dropout", phase);
            if kill.send(after).is_ok() && after.is_zero() {
                // Hold the upload back until the supervisor has cut the connection.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(outcome)
    }

    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        let _slot = self.ctx.slots.acquire();
        self.inner.evaluate()
    }

    fn release(&mut self) {
        self.global = Vec::new();
        self.inner.release()
    }

    fn backend(&self) -> &str {
        self.inner.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_clear_errors() {
        assert_eq!(
            "0.3:lognormal:0,1".parse::<StragglerSpec>().unwrap(),
            StragglerSpec {
                probability: 0.3,
                delay: DelayDist::LogNormal {
                    mu: 0.0,
                    sigma: 1.0
                }
            }
        );
        assert_eq!(
            "0.2:exp:2".parse::<StragglerSpec>().unwrap().delay,
            DelayDist::Exp { mean: 2.0 }
        );
        for (s, kind) in [
            ("0.2:sign-flip", AttackKind::SignFlip),
            ("0.2:scale:10", AttackKind::Scale(10.0)),
            ("0.2:gaussian:1", AttackKind::Gaussian(1.0)),
            ("0.2:label-flip", AttackKind::LabelFlip),
            ("0.2:same-value", AttackKind::SameValue(1.0)),
            ("0.2:same-value:-3", AttackKind::SameValue(-3.0)),
            ("0.2:alie", AttackKind::Alie(None)),
            ("0.2:alie:1.5", AttackKind::Alie(Some(1.5))),
        ] {
            let spec: ByzantineSpec = s.parse().unwrap();
            assert_eq!(spec.kind, kind, "{s}");
            assert_eq!(spec.fraction, 0.2);
            // Display round-trips (same-value always shows its value).
            assert_eq!(spec.kind.to_string().parse::<AttackKind>().unwrap(), kind);
        }
        for (bad, needle) in [
            ("1.5:sign-flip", "not in [0, 1]"),
            ("0.2", "FRACTION:KIND"),
            ("0.2:scale", "needs a value"),
            ("0.2:sign-flip:3", "takes no value"),
            ("0.2:bogus", "unknown 'bogus'"),
            ("0.2:gaussian:-1", "SIGMA >= 0"),
            ("x:scale:2", "not a number"),
            ("0.2:scale:inf", "not finite"),
        ] {
            let err = bad.parse::<ByzantineSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        for (bad, needle) in [
            ("0.3", "P:DIST"),
            ("0.3:lognormal:0", "takes 2"),
            ("0.3:weibull:1", "unknown 'weibull'"),
            ("0.3:exp:-1", ">= 0"),
            ("-0.1:exp:1", "not in [0, 1]"),
            ("0.1:uniform:3,1", "LO <= HI"),
        ] {
            let err = bad.parse::<StragglerSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn decisions_are_deterministic_and_follow_the_probabilities() {
        let config = FaultConfig {
            dropout: 0.3,
            stragglers: Some("0.5:exp:2".parse().unwrap()),
            byzantine: None,
        };
        let mut dropped = 0;
        let mut straggled = 0;
        let mut total_delay = 0.0;
        for round in 1..=100 {
            for client in 0..100 {
                let a = decide(&config, 7, round, client);
                assert_eq!(a, decide(&config, 7, round, client));
                dropped += a.dropout.is_some() as usize;
                if let Some(d) = a.straggle {
                    straggled += 1;
                    total_delay += d.as_secs_f64();
                }
            }
        }
        assert!((2700..3300).contains(&dropped), "{dropped} of 10000");
        assert!((4700..5300).contains(&straggled), "{straggled} of 10000");
        let mean = total_delay / straggled as f64;
        assert!((1.8..2.2).contains(&mean), "mean delay {mean}");
        // Another seed gives other decisions.
        let differ = (0..100).any(|c| decide(&config, 8, 1, c) != decide(&config, 7, 1, c));
        assert!(differ);
    }

    #[test]
    fn byzantine_clients_are_a_seeded_fixed_set() {
        let a = byzantine_clients(0.2, 100, 3);
        assert_eq!(a.len(), 20);
        assert_eq!(a, byzantine_clients(0.2, 100, 3));
        assert_ne!(a, byzantine_clients(0.2, 100, 4));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|c| *c < 100));
        assert!(byzantine_clients(0.0, 10, 1).is_empty());
        assert_eq!(byzantine_clients(1.0, 10, 1), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn lognormal_delays_have_the_right_median() {
        let d = DelayDist::LogNormal {
            mu: 0.0,
            sigma: 1.0,
        };
        let mut r = SplitMix::new(1);
        let mut v: Vec<f64> = (0..20001).map(|_| d.sample(&mut r)).collect();
        v.sort_by(f64::total_cmp);
        let median = v[10000];
        assert!((0.95..1.05).contains(&median), "median {median}");
    }

    #[test]
    fn inverse_normal_cdf_and_alie_z_match_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959964),
            (0.6, 0.253347),
            (0.01, -2.326348),
        ] {
            assert!((inverse_normal_cdf(p) - z).abs() < 1e-5, "{p}");
        }
        // Baruch et al.: n = 50, m = 12 -> s = 14, z = Phi^-1(36/50) = 0.5828.
        assert!((alie_z(50, 12) - 0.582_842).abs() < 1e-4);
        // n = 10, m = 2: s = 4, z = Phi^-1(0.6).
        assert!((alie_z(10, 2) - 0.253_347).abs() < 1e-5);
    }

    #[test]
    fn rounds_are_found_from_task_seeds() {
        let finder = RoundFinder::new(42, 50, 100);
        let mut task = 0;
        for round in 1..=50u64 {
            for _ in 0..10 {
                assert_eq!(finder.round_of(mix(42, round, task)), Some(round));
                task += 1;
            }
            task += 10; // evaluate tasks in between
        }
        // Out of order is still found.
        assert_eq!(finder.round_of(mix(42, 3, 25)), Some(3));
        assert_eq!(finder.round_of(12345), None);
    }

    fn tiny() -> (Arc<Dataset>, ParamLayout, Vec<f32>, FitInstructions) {
        let data = Arc::new(Dataset {
            features: (0..60 * 4).map(|i| ((i * 7) % 11) as f32 / 11.0).collect(),
            labels: (0..60).map(|i| (i % 3) as u8).collect(),
            dim: 4,
            classes: 3,
        });
        let layout: ParamLayout = "mlp:4-64-3".parse().unwrap();
        let global = layout.initial_parameters(1).unwrap();
        let config = FitInstructions {
            epochs: 1,
            batch_size: 5,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            seed: mix(9, 1, 0),
            optimizer: Default::default(),
        };
        (data, layout, global, config)
    }

    fn honest_delta(
        data: &Arc<Dataset>,
        indices: Vec<usize>,
        layout: &ParamLayout,
        global: &[f32],
        config: &FitInstructions,
    ) -> Vec<f32> {
        let mut t = LocalTrainer::new(Arc::clone(data), indices, Arc::clone(data), Vec::new());
        t.prepare(layout).unwrap();
        t.set_parameters(global).unwrap();
        t.fit(config).unwrap();
        t.parameters()
            .iter()
            .zip(global)
            .map(|(l, g)| l - g)
            .collect()
    }

    fn attacked_delta(
        kind: AttackKind,
        collusion: Option<Collusion>,
    ) -> (Vec<f32>, Vec<FaultEvent>) {
        let (data, layout, global, config) = tiny();
        let log = FaultLog::default();
        let ctx = Arc::new(FaultContext {
            config: FaultConfig {
                byzantine: Some(ByzantineSpec {
                    fraction: 1.0,
                    kind,
                }),
                ..Default::default()
            },
            seed: 9,
            rounds: RoundFinder::new(9, 5, 2),
            log: log.clone(),
            slots: Slots::new(1),
            byzantine: vec![0, 1],
            collusion,
            upload_time: Duration::ZERO,
        });
        let inner = LocalTrainer::new(
            Arc::clone(&data),
            (0..30).collect(),
            Arc::clone(&data),
            Vec::new(),
        );
        let mut t = FaultyTrainer::new(inner, 0, ctx, None);
        t.prepare(&layout).unwrap();
        t.set_parameters(&global).unwrap();
        t.fit(&config).unwrap();
        let delta = t
            .parameters()
            .iter()
            .zip(&global)
            .map(|(l, g)| l - g)
            .collect();
        (delta, log.events())
    }

    #[test]
    fn attacks_replace_the_update_as_specified() {
        let (data, layout, global, config) = tiny();
        let honest = honest_delta(&data, (0..30).collect(), &layout, &global, &config);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        let (d, events) = attacked_delta(AttackKind::SignFlip, None);
        assert!(d.iter().zip(&honest).all(|(a, h)| close(*a, -h)));
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].round, events[0].client, events[0].fault),
            (1, 1, "byzantine")
        );
        assert_eq!(events[0].detail, "sign-flip");
        let (d, _) = attacked_delta(AttackKind::Scale(3.0), None);
        assert!(d.iter().zip(&honest).all(|(a, h)| close(*a, 3.0 * h)));
        let (d, _) = attacked_delta(AttackKind::SameValue(0.5), None);
        assert!(d.iter().all(|a| close(*a, 0.5)));
        let (d, _) = attacked_delta(AttackKind::Gaussian(2.0), None);
        let n = d.len() as f64;
        let mean = d.iter().map(|v| *v as f64).sum::<f64>() / n;
        let sd = (d.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 0.3 && (1.7..2.3).contains(&sd),
            "mean {mean} sd {sd}"
        );
        // ALIE: mean - z * std of the two colluders' honest updates.
        let members = vec![(0, (0..30).collect::<Vec<_>>()), (1, (30..60).collect())];
        let updates: Vec<Vec<f32>> = members
            .iter()
            .map(|(c, idx)| {
                let cfg = FitInstructions {
                    seed: mix(9 ^ SALT_ALIE, 1, *c as u64),
                    ..config.clone()
                };
                honest_delta(&data, idx.clone(), &layout, &global, &cfg)
            })
            .collect();
        let collusion = Collusion::new(
            Arc::clone(&data),
            Arc::clone(&data),
            members,
            Engine::Cpu(fedquic_train::backend::CpuBackend),
            1.5,
            9,
        );
        let (d, _) = attacked_delta(AttackKind::Alie(Some(1.5)), Some(collusion));
        for (j, v) in d.iter().enumerate() {
            let (a, b) = (updates[0][j] as f64, updates[1][j] as f64);
            let expected = (a + b) / 2.0 - 1.5 * (a - b).abs() / 2f64.sqrt();
            assert!(
                close(*v, expected as f32),
                "coordinate {j}: {v} vs {expected}"
            );
        }
    }

    #[test]
    fn label_flip_maps_each_class_to_its_mirror() {
        let d = Dataset {
            features: vec![0.0; 4],
            labels: vec![0, 3, 9, 5],
            dim: 1,
            classes: 10,
        };
        assert_eq!(label_flipped(&d).labels, vec![9, 6, 0, 4]);
    }
}
