//! An unauthenticated flood of QUIC Initials (no certificate, never a
//! completed handshake) against a real aggregator over real UDP, while a
//! small federation runs: the federation completes, and the aggregator's
//! counters show the flood never held more handshake state than allowed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedquic::net::admission::{Admission, AdmissionConfig, RetryPolicy};
use fedquic::net::pki::CertAuthority;
use fedquic::sim::flood::{FloodConfig, flood};

const FLOOD: u64 = 3_000;

/// Starts the aggregator with `admission`, connects one honest client,
/// floods the aggregator, and then lets a second honest client join: the
/// rounds need both, so the whole flood hits a running federation.
async fn flood_during_a_federation(admission: Arc<Admission>) {
    let ca = CertAuthority::generate("flood CA").unwrap();
    let mut opts = Options::new(engine(2, 2, 2, Duration::from_secs(30)));
    opts.admission = Arc::clone(&admission);
    let agg = start(&ca, opts);
    let target = agg.addr;
    let a = honest(&ca, agg.addr, "client-a", 1.0, 10);
    let flooder = tokio::task::spawn_blocking(move || {
        let mut config = FloodConfig::new(target, FLOOD);
        config.rate = 10_000;
        flood(&config)
    });
    let report = within(30, flooder).await.unwrap().unwrap();
    assert_eq!(report.sent, FLOOD);
    let b = honest(&ca, agg.addr, "client-b", 1.0, 10);
    for client in [a, b] {
        let report = within(60, client).await.unwrap().unwrap();
        assert_eq!(report.fit_tasks, 2, "the honest clients finish every round");
    }
    let summary = within(30, agg.task).await.unwrap().unwrap();
    assert!(summary.finished);
    assert_eq!(summary.rounds_completed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_address_validation_a_flood_gets_no_handshake_state() {
    let admission = Arc::new(Admission::new(AdmissionConfig {
        retry: RetryPolicy::Always,
        ..AdmissionConfig::default()
    }));
    flood_during_a_federation(Arc::clone(&admission)).await;
    let stats = admission.stats();
    // Every attempt from an unproven address got a stateless Retry; only
    // the two honest clients (which answer it) ever reached a handshake.
    assert_eq!(stats.handshakes, 2, "{stats:?}");
    assert_eq!(stats.admitted, 2, "{stats:?}");
    assert_eq!(
        stats.retries + stats.handshakes,
        stats.incoming,
        "{stats:?}"
    );
    // Loopback with a 4 MiB receive buffer loses few, if any, of the
    // paced packets; a large share must have reached the server.
    assert!(stats.retries >= FLOOD / 2, "{stats:?}");
    assert_eq!(stats.in_progress, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retry_the_handshake_cap_and_timeout_bound_the_flood() {
    let cap = 8;
    let admission = Arc::new(Admission::new(AdmissionConfig {
        retry: RetryPolicy::Never,
        max_handshakes: cap,
        handshake_timeout: Duration::from_millis(500),
        ..AdmissionConfig::default()
    }));
    flood_during_a_federation(Arc::clone(&admission)).await;
    let stats = admission.stats();
    assert!(stats.peak_in_progress <= cap, "{stats:?}");
    assert!(stats.over_cap >= FLOOD / 2, "{stats:?}");
    assert_eq!(stats.retries, 0, "{stats:?}");
    assert_eq!(
        stats.over_cap + stats.handshakes,
        stats.incoming,
        "{stats:?}"
    );
    assert!(stats.admitted >= 2, "{stats:?}");
    // Flood handshakes held a slot until the timeout freed it.
    assert!(stats.timed_out >= 1, "{stats:?}");
    // Refusal lines are rate-limited: a few logged, the rest counted.
    assert!(stats.log_lines_suppressed >= FLOOD / 2, "{stats:?}");
    within(10, async {
        while admission.stats().in_progress > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stats = admission.stats();
    assert_eq!(
        stats.handshakes,
        stats.admitted + stats.failed + stats.timed_out,
        "every handshake ended one way or another: {stats:?}"
    );
}
