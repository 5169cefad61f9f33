//! Prometheus metrics for the daemon: one registry of typed handles that the
//! server shell updates as it runs, encoded in the OpenMetrics text format on
//! each scrape (see [`http`] for the endpoint that serves it).
//!
//! The per-round values (rounds, updates, rejections, accuracy, duration)
//! are taken from the same [`RoundRecord`] that becomes a line of
//! `metrics.jsonl`, so the two always agree; connection counts and bytes are
//! counted live, so a stuck round still shows traffic.

pub mod http;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use fedquic_net::admission::Admission;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::RejectCause;
use crate::server::RoundRecord;

pub use http::{MetricsEndpoint, MetricsError};

/// The `Content-Type` of what [`Metrics::encode`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set with one fixed label (`reason`, `version`): static strings,
/// so counting allocates nothing.
type OneLabel = [(&'static str, &'static str); 1];

/// Round durations: from a tenth of a second (tiny test models) to over an
/// hour (cross-device rounds with long deadlines).
const ROUND_SECONDS_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Checkpoint writes: a millisecond (small model, page cache) to a minute
/// (large model, slow disk).
const CHECKPOINT_SECONDS_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// Why the server refused a connection after its TLS handshake; each is
/// counted under its own `reason` label of `fedquic_handshakes_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The client certificate has no usable name.
    NoName,
    /// No protocol version in common.
    Version,
    /// The Hello failed its checks.
    BadHello,
    /// No update or model codec in common.
    Codec,
    /// Something other than a Hello (or nothing, or a broken stream) came first.
    NoHello,
    /// No Hello within the handshake timeout.
    HelloTimeout,
    /// The client is not on the allowlist.
    Allowlist,
    /// `limits.max_clients` clients are already connected.
    Full,
}

impl HandshakeRefusal {
    pub const ALL: [HandshakeRefusal; 8] = [
        HandshakeRefusal::NoName,
        HandshakeRefusal::Version,
        HandshakeRefusal::BadHello,
        HandshakeRefusal::Codec,
        HandshakeRefusal::NoHello,
        HandshakeRefusal::HelloTimeout,
        HandshakeRefusal::Allowlist,
        HandshakeRefusal::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeRefusal::NoName => "no_name",
            HandshakeRefusal::Version => "version",
            HandshakeRefusal::BadHello => "bad_hello",
            HandshakeRefusal::Codec => "codec",
            HandshakeRefusal::NoHello => "no_hello",
            HandshakeRefusal::HelloTimeout => "hello_timeout",
            HandshakeRefusal::Allowlist => "allowlist",
            HandshakeRefusal::Full => "full",
        }
    }
}

/// Refusals before the session starts: the shell's own (counted here) and
/// the QUIC admission's (read from its counters at scrape time, so the two
/// cannot drift apart), in one counter family.
#[derive(Default)]
struct HandshakeRefusals {
    shell: [AtomicU64; HandshakeRefusal::ALL.len()],
    admission: OnceLock<Arc<Admission>>,
}

impl fmt::Debug for HandshakeRefusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeRefusals").finish_non_exhaustive()
    }
}

impl HandshakeRefusals {
    fn values(&self) -> Vec<(&'static str, u64)> {
        let mut values: Vec<(&'static str, u64)> = HandshakeRefusal::ALL
            .iter()
            .zip(&self.shell)
            .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
            .collect();
        let stats = self.admission.get().map(|a| a.stats()).unwrap_or_default();
        values.extend([
            // More QUIC handshakes in progress than the cap: ignored.
            ("handshake_cap", stats.over_cap),
            // The TLS handshake failed (bad or revoked certificate, garbage).
            ("tls_failed", stats.failed),
            ("tls_timeout", stats.timed_out),
        ]);
        values
    }
}

impl Collector for HandshakeRefusals {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "fedquic_handshakes_refused",
            "Connections refused before their session started, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in self.values() {
            let labels: OneLabel = [("reason", reason)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The daemon's metrics. Cheap to clone: every clone updates and encodes the
/// same registry.
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    registry: Registry,
    connected_clients: Gauge,
    rounds_completed: Counter,
    round_duration: Histogram,
    updates_received: Counter,
    updates_rejected: Family<OneLabel, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    handshakes_refused: Arc<HandshakeRefusals>,
    test_accuracy: Gauge<f64, AtomicU64>,
    test_loss: Gauge<f64, AtomicU64>,
    checkpoint_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connected_clients = Gauge::default();
        registry.register(
            "fedquic_connected_clients",
            "Clients with a session (past the Hello and every admission check)",
            connected_clients.clone(),
        );
        let rounds_completed = Counter::default();
        registry.register(
            "fedquic_rounds_completed",
            "Rounds committed (FedBuff: server steps), as in metrics.jsonl",
            rounds_completed.clone(),
        );
        let round_duration = Histogram::new(ROUND_SECONDS_BUCKETS);
        registry.register(
            "fedquic_round_duration_seconds",
            "Wall time of each committed round: training, transfers, evaluation, checkpoint",
            round_duration.clone(),
        );
        let updates_received = Counter::default();
        registry.register(
            "fedquic_updates_received",
            "Updates accepted into a committed round (the rounds' clients_answered)",
            updates_received.clone(),
        );
        let updates_rejected = Family::<OneLabel, Counter>::default();
        for cause in RejectCause::ALL {
            // Every reason is present from the start, so rate() works from 0.
            let _ = updates_rejected.get_or_create(&[("reason", cause.name())]);
        }
        registry.register(
            "fedquic_updates_rejected",
            "Updates refused, by reason (counted when their round commits)",
            updates_rejected.clone(),
        );
        let bytes_in = Counter::default();
        registry.register(
            "fedquic_bytes_in",
            "Update body bytes received in full from clients",
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "fedquic_bytes_out",
            "Model body bytes sent to clients",
            bytes_out.clone(),
        );
        let handshakes_refused = Arc::new(HandshakeRefusals::default());
        registry.register_collector(Box::new(Arc::clone(&handshakes_refused)));
        let test_accuracy = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "fedquic_test_accuracy",
            "Accuracy of the global model on the central test set after the last round",
            test_accuracy.clone(),
        );
        let test_loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "fedquic_test_loss",
            "Loss of the global model on the central test set after the last round",
            test_loss.clone(),
        );
        let checkpoint_duration = Histogram::new(CHECKPOINT_SECONDS_BUCKETS);
        registry.register(
            "fedquic_checkpoint_write_seconds",
            "Time to write each checkpoint",
            checkpoint_duration.clone(),
        );
        let build_info = Family::<OneLabel, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            "fedquic_build_info",
            "The aggregator's version, as a label; the value is always 1",
            build_info,
        );
        Metrics(Arc::new(Inner {
            registry,
            connected_clients,
            rounds_completed,
            round_duration,
            updates_received,
            updates_rejected,
            bytes_in,
            bytes_out,
            handshakes_refused,
            test_accuracy,
            test_loss,
            checkpoint_duration,
        }))
    }

    /// The OpenMetrics text exposition of every metric (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)?;
        Ok(out)
    }

    /// Reports the QUIC admission's refusals (handshake cap, failed and
    /// timed-out TLS handshakes) with the shell's. The first one set stays.
    pub fn watch_admission(&self, admission: Arc<Admission>) {
        let _ = self.0.handshakes_refused.admission.set(admission);
    }

    pub(crate) fn set_connected_clients(&self, n: usize) {
        self.0
            .connected_clients
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn handshake_refused(&self, reason: HandshakeRefusal) {
        if let Some(i) = HandshakeRefusal::ALL.iter().position(|r| *r == reason) {
            self.0.handshakes_refused.shell[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_bytes_in(&self, n: u64) {
        self.0.bytes_in.inc_by(n);
    }

    pub(crate) fn add_bytes_out(&self, n: u64) {
        self.0.bytes_out.inc_by(n);
    }

    pub(crate) fn checkpoint_written(&self, seconds: f64) {
        self.0.checkpoint_duration.observe(seconds);
    }

    /// Counts a committed round from the record that goes to metrics.jsonl.
    pub(crate) fn round_committed(&self, record: &RoundRecord) {
        let m = &self.0;
        m.rounds_completed.inc();
        m.round_duration.observe(record.seconds);
        m.updates_received
            .inc_by(record.outcome.clients_answered as u64);
        for (name, n) in &record.outcome.rejections {
            let reason = RejectCause::ALL
                .iter()
                .map(|c| c.name())
                .find(|c| c == name)
                .unwrap_or("other");
            m.updates_rejected
                .get_or_create(&[("reason", reason)])
                .inc_by(*n as u64);
        }
        if let Some(accuracy) = record.test_accuracy {
            m.test_accuracy.set(accuracy);
        }
        if let Some(loss) = record.test_loss {
            m.test_loss.set(loss);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, name_and_labels: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
    }

    #[test]
    fn every_metric_is_exposed_with_its_labels_from_the_start() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for (name, value) in [
            ("fedquic_connected_clients", "0"),
            ("fedquic_rounds_completed_total", "0"),
            ("fedquic_round_duration_seconds_count", "0"),
            ("fedquic_updates_received_total", "0"),
            ("fedquic_updates_rejected_total{reason=\"stale\"}", "0"),
            ("fedquic_updates_rejected_total{reason=\"malformed\"}", "0"),
            ("fedquic_bytes_in_total", "0"),
            ("fedquic_bytes_out_total", "0"),
            (
                "fedquic_handshakes_refused_total{reason=\"allowlist\"}",
                "0",
            ),
            (
                "fedquic_handshakes_refused_total{reason=\"tls_failed\"}",
                "0",
            ),
            ("fedquic_test_accuracy", "0.0"),
            ("fedquic_test_loss", "0.0"),
            ("fedquic_checkpoint_write_seconds_count", "0"),
        ] {
            assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
        }
        let version = format!(
            "fedquic_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &version), Some("1"), "{text}");
    }

    #[test]
    fn updates_reach_the_encoding() {
        let metrics = Metrics::new();
        metrics.set_connected_clients(3);
        metrics.handshake_refused(HandshakeRefusal::Full);
        metrics.handshake_refused(HandshakeRefusal::Full);
        metrics.add_bytes_in(10);
        metrics.add_bytes_out(7);
        metrics.checkpoint_written(0.02);
        let admission = Arc::new(Admission::new(Default::default()));
        metrics.watch_admission(admission);
        let text = metrics.clone().encode().unwrap();
        for (name, value) in [
            ("fedquic_connected_clients", "3"),
            ("fedquic_handshakes_refused_total{reason=\"full\"}", "2"),
            (
                "fedquic_handshakes_refused_total{reason=\"handshake_cap\"}",
                "0",
            ),
            ("fedquic_bytes_in_total", "10"),
            ("fedquic_bytes_out_total", "7"),
            ("fedquic_checkpoint_write_seconds_count", "1"),
            ("fedquic_checkpoint_write_seconds_bucket{le=\"0.025\"}", "1"),
            ("fedquic_checkpoint_write_seconds_bucket{le=\"0.01\"}", "0"),
        ] {
            assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
        }
    }
}
