//! Admission of incoming QUIC connection attempts, before any certificate
//! is seen: address validation (QUIC Retry), a cap on concurrent handshakes,
//! a short handshake timeout and rate-limited log lines.
//!
//! Without this, every Initial packet (1,200 bytes, no certificate needed)
//! made the aggregator build a connection, run the TLS handshake and keep
//! the half-open state for the idle timeout: 8,000 Initials cost ~300 MB.
//! Now an unvalidated address only gets a stateless Retry once the server
//! is busy (or always, by policy), at most [`AdmissionConfig::max_handshakes`]
//! handshakes hold state at once, and each lasts at most
//! [`AdmissionConfig::handshake_timeout`].
//!
//! The accept loop stays a few lines:
//!
//! ```ignore
//! while let Some(incoming) = endpoint.accept().await {
//!     let Some(handshake) = admission.screen(incoming) else { continue };
//!     tokio::spawn(async move {
//!         if let Some(conn) = handshake.complete().await { serve(conn).await }
//!     });
//! }
//! ```

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// When to answer an Initial from an unvalidated address with a Retry
/// (which costs an honest client one round trip and the server no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Every new connection proves its address first.
    Always,
    /// Only while at least this many handshakes are in progress: normal
    /// connects skip the extra round trip, a flood meets Retry.
    UnderLoad { handshakes: usize },
    /// Never (tests and trusted networks).
    Never,
}

/// Limits on connection attempts that have not completed their handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    pub retry: RetryPolicy,
    /// Handshakes holding server state at once; attempts beyond this are
    /// ignored (no answer, so no reflection either; an honest client's
    /// Initial is retransmitted and gets in once a slot frees).
    pub max_handshakes: usize,
    /// A handshake not complete by then is abandoned and its state freed.
    pub handshake_timeout: Duration,
    /// Refusal log lines allowed per [`AdmissionConfig::log_window`]; the
    /// rest are counted and summarised in the next line that is logged.
    pub log_lines_per_window: u32,
    pub log_window: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            retry: RetryPolicy::UnderLoad { handshakes: 16 },
            max_handshakes: 1024,
            handshake_timeout: Duration::from_secs(5),
            log_lines_per_window: 10,
            log_window: Duration::from_secs(10),
        }
    }
}

/// Largest accepted values of [`AdmissionConfig`]: a config file or flag
/// cannot turn the guard off by accident.
pub const MAX_HANDSHAKES_LIMIT: usize = 100_000;
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionConfigError {
    #[error("max_handshakes must be in 1..={MAX_HANDSHAKES_LIMIT}, got {0}")]
    MaxHandshakes(usize),
    #[error("handshake timeout must be between 1 ms and {MAX_HANDSHAKE_TIMEOUT:?}, got {0:?}")]
    Timeout(Duration),
    #[error("the log window must be between 1 ms and 1 hour, got {0:?}")]
    LogWindow(Duration),
}

impl AdmissionConfig {
    pub fn validate(&self) -> Result<(), AdmissionConfigError> {
        if self.max_handshakes == 0 || self.max_handshakes > MAX_HANDSHAKES_LIMIT {
            return Err(AdmissionConfigError::MaxHandshakes(self.max_handshakes));
        }
        if self.handshake_timeout < Duration::from_millis(1)
            || self.handshake_timeout > MAX_HANDSHAKE_TIMEOUT
        {
            return Err(AdmissionConfigError::Timeout(self.handshake_timeout));
        }
        if self.log_window < Duration::from_millis(1) || self.log_window > Duration::from_secs(3600)
        {
            return Err(AdmissionConfigError::LogWindow(self.log_window));
        }
        Ok(())
    }
}

/// Counters of what happened to connection attempts (monotonic, except
/// `in_progress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Connection attempts quinn handed to the server.
    pub incoming: u64,
    /// Answered with a stateless Retry.
    pub retries: u64,
    /// Ignored because `max_handshakes` were in progress.
    pub over_cap: u64,
    /// Handshakes started (state allocated).
    pub handshakes: u64,
    /// Handshakes that completed.
    pub admitted: u64,
    /// Handshakes that failed (bad or missing certificate, protocol error).
    pub failed: u64,
    /// Handshakes abandoned at the timeout.
    pub timed_out: u64,
    /// Handshakes in progress now.
    pub in_progress: usize,
    /// Most handshakes ever in progress at once.
    pub peak_in_progress: usize,
    /// Refusal log lines suppressed by the rate limit.
    pub log_lines_suppressed: u64,
}

#[derive(Default)]
struct Counters {
    incoming: AtomicU64,
    retries: AtomicU64,
    over_cap: AtomicU64,
    handshakes: AtomicU64,
    admitted: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    in_progress: AtomicUsize,
    peak_in_progress: AtomicUsize,
}

/// Lets `per_window` lines through per window; counts the others.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<LimiterState>,
    suppressed_total: AtomicU64,
}

struct LimiterState {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogLimiter {
            per_window,
            window,
            state: Mutex::new(LimiterState {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// suppressed since the last one; `None` when this one is suppressed.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let expired = state
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            state.window_start = Some(now);
            state.logged = 0;
        }
        if state.logged < self.per_window {
            state.logged += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// The admission policy and its counters; share one per endpoint.
pub struct Admission {
    config: AdmissionConfig,
    counters: Counters,
    log: LogLimiter,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(AdmissionConfig::default())
    }
}

impl Admission {
    /// An admission policy; call [`AdmissionConfig::validate`] on values
    /// that come from users first.
    pub fn new(config: AdmissionConfig) -> Self {
        let log = LogLimiter::new(config.log_lines_per_window, config.log_window);
        Admission {
            config,
            counters: Counters::default(),
            log,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    pub fn stats(&self) -> AdmissionStats {
        let c = &self.counters;
        AdmissionStats {
            incoming: c.incoming.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            over_cap: c.over_cap.load(Ordering::Relaxed),
            handshakes: c.handshakes.load(Ordering::Relaxed),
            admitted: c.admitted.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            in_progress: c.in_progress.load(Ordering::Relaxed),
            peak_in_progress: c.peak_in_progress.load(Ordering::Relaxed),
            log_lines_suppressed: self.log.suppressed_total(),
        }
    }

    fn wants_retry(&self, in_progress: usize) -> bool {
        match self.config.retry {
            RetryPolicy::Always => true,
            RetryPolicy::UnderLoad { handshakes } => in_progress >= handshakes,
            RetryPolicy::Never => false,
        }
    }

    /// Decides, without waiting, what to do with a connection attempt:
    /// answer it with a Retry, ignore it (over the cap), or start its
    /// handshake, returned for [`Handshake::complete`] on its own task.
    /// Call it from the accept loop itself, so that a flood spawns nothing.
    pub fn screen(self: &Arc<Self>, incoming: quinn::Incoming) -> Option<Handshake> {
        let c = &self.counters;
        c.incoming.fetch_add(1, Ordering::Relaxed);
        let remote = incoming.remote_address();
        let in_progress = c.in_progress.load(Ordering::Relaxed);
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && self.wants_retry(in_progress)
        {
            match incoming.retry() {
                Ok(()) => {
                    c.retries.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "address validation: sent Retry");
                }
                Err(e) => {
                    // Cannot happen after `may_retry`; drop it quietly.
                    e.into_incoming().ignore();
                    c.over_cap.fetch_add(1, Ordering::Relaxed);
                }
            }
            return None;
        }
        if in_progress >= self.config.max_handshakes {
            incoming.ignore();
            c.over_cap.fetch_add(1, Ordering::Relaxed);
            self.refusal(
                remote,
                "ignored connection attempt: too many handshakes in progress",
                None,
            );
            return None;
        }
        // Only the accept loop increments, so the check above cannot be raced past.
        let now_in_progress = c.in_progress.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak_in_progress
            .fetch_max(now_in_progress, Ordering::Relaxed);
        c.handshakes.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(Arc::clone(self));
        match incoming.accept() {
            Ok(connecting) => Some(Handshake {
                connecting,
                remote,
                slot,
            }),
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                self.refusal(remote, "refused connection", Some(&e.to_string()));
                None
            }
        }
    }

    fn refusal(&self, remote: std::net::SocketAddr, what: &str, error: Option<&str>) {
        match (self.log.allow(Instant::now()), error) {
            (Some(0), Some(error)) => warn!(%remote, error, "{what}"),
            (Some(0), None) => warn!(%remote, "{what}"),
            (Some(suppressed), Some(error)) => warn!(
                %remote,
                error,
                suppressed,
                "{what} ({suppressed} similar lines suppressed)"
            ),
            (Some(suppressed), None) => warn!(
                %remote,
                suppressed,
                "{what} ({suppressed} similar lines suppressed)"
            ),
            (None, _) => debug!(%remote, ?error, "{what}"),
        }
    }
}

/// Holds one of the `max_handshakes` slots until dropped.
struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.counters.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handshake admitted by [`Admission::screen`].
pub struct Handshake {
    connecting: quinn::Connecting,
    remote: std::net::SocketAddr,
    slot: Slot,
}

impl Handshake {
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.remote
    }

    /// Runs the handshake to its end, within the handshake timeout. `None`
    /// when it failed or timed out (logged, rate-limited); dropping the
    /// unfinished handshake frees its state at once.
    pub async fn complete(self) -> Option<quinn::Connection> {
        let Handshake {
            connecting,
            remote,
            slot,
        } = self;
        let admission = &slot.0;
        let c = &admission.counters;
        match tokio::time::timeout(admission.config.handshake_timeout, connecting).await {
            Ok(Ok(conn)) => {
                c.admitted.fetch_add(1, Ordering::Relaxed);
                Some(conn)
            }
            Ok(Err(e)) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                // With mutual TLS this is where clients without a valid
                // certificate from our CA end up.
                admission.refusal(
                    remote,
                    "refused connection: TLS handshake failed",
                    Some(&e.to_string()),
                );
                None
            }
            Err(_) => {
                c.timed_out.fetch_add(1, Ordering::Relaxed);
                admission.refusal(
                    remote,
                    "abandoned connection: handshake not complete within the timeout",
                    None,
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_a_few_lines_through_per_window_and_counts_the_rest() {
        let limiter = LogLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0));
        assert_eq!(limiter.allow(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limiter.suppressed_total(), 5);
        // A new window: the first line reports what was suppressed.
        assert_eq!(limiter.allow(t0 + Duration::from_secs(11)), Some(5));
        assert_eq!(limiter.allow(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(limiter.allow(t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn config_values_are_bounded() {
        assert_eq!(AdmissionConfig::default().validate(), Ok(()));
        let bad = AdmissionConfig {
            max_handshakes: 0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(AdmissionConfigError::MaxHandshakes(0))
        ));
        let bad = AdmissionConfig {
            handshake_timeout: Duration::from_secs(u64::MAX),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("timeout"));
        let bad = AdmissionConfig {
            log_window: Duration::ZERO,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn retry_policy_decides_by_load() {
        let under = Admission::new(AdmissionConfig {
            retry: RetryPolicy::UnderLoad { handshakes: 3 },
            ..Default::default()
        });
        assert!(!under.wants_retry(2));
        assert!(under.wants_retry(3));
        let always = Admission::new(AdmissionConfig {
            retry: RetryPolicy::Always,
            ..Default::default()
        });
        assert!(always.wants_retry(0));
        let never = Admission::new(AdmissionConfig {
            retry: RetryPolicy::Never,
            ..Default::default()
        });
        assert!(!never.wants_retry(1_000_000));
    }

    /// Over real QUIC on loopback: with `Always`, an honest client answers
    /// the Retry transparently and gets in; the counters show both steps.
    #[tokio::test]
    async fn an_honest_client_passes_address_validation() {
        use crate::endpoint::{client_endpoint_for, server_endpoint};
        use crate::pki::CertAuthority;
        use crate::tls::{Identity, TransportSettings, client_config, load_ca_pem, server_config};
        use std::net::{Ipv4Addr, SocketAddr};

        let ca = CertAuthority::generate("admission CA").expect("CA");
        let server = ca.issue_server(&["localhost".into()]).expect("server");
        let client = ca.issue_client("client-001").expect("client");
        let roots = || load_ca_pem(ca.cert_pem()).expect("roots");
        let config = server_config(
            roots(),
            Identity::from_pem(&server.cert_pem, &server.key_pem).expect("id"),
            &TransportSettings::default(),
        )
        .expect("config");
        let endpoint =
            server_endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let admission = Arc::new(Admission::new(AdmissionConfig {
            retry: RetryPolicy::Always,
            ..Default::default()
        }));
        let gate = Arc::clone(&admission);
        let accepting = endpoint.clone();
        let server_task = tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if let Some(handshake) = gate.screen(incoming) {
                    return handshake.complete().await.is_some();
                }
            }
            false
        });
        let tls = client_config(
            roots(),
            Some(Identity::from_pem(&client.cert_pem, &client.key_pem).expect("id")),
            &TransportSettings::default(),
        )
        .expect("client config");
        let client = client_endpoint_for(addr, tls).expect("client endpoint");
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.connect(addr, "localhost").expect("connect"),
        )
        .await
        .expect("in time")
        .expect("handshake");
        let admitted = tokio::time::timeout(Duration::from_secs(5), server_task)
            .await
            .expect("in time")
            .expect("server task");
        assert!(admitted);
        let stats = admission.stats();
        assert_eq!(
            (
                stats.incoming,
                stats.retries,
                stats.handshakes,
                stats.admitted
            ),
            (2, 1, 1, 1),
            "{stats:?}"
        );
        assert_eq!(stats.in_progress, 0);
        conn.close(0u32.into(), b"done");
        endpoint.close(0u32.into(), b"done");
    }
}
