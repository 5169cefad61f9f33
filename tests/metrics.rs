//! The Prometheus endpoint over a real run: what a scraper reads agrees with
//! metrics.jsonl, refusals are counted by reason, and hostile or broken
//! scrapes get an error status (or a closed connection) without touching the
//! run.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedquic::aggregator::metrics::http::{MAX_CONNECTIONS, MAX_REQUEST_HEAD};
use fedquic::aggregator::metrics::{CONTENT_TYPE, Metrics, MetricsEndpoint};
use fedquic::aggregator::server::{CentralEval, Server, ServerSetup};
use fedquic::client::{ClientError, run_client};
use fedquic::net::pki::CertAuthority;
use fedquic::net::tls::{self, Identity, TransportSettings};
use fedquic::train::layout::ParamLayout;
use fedquic::train::{DataSpec, Model};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` and reads until the server closes.
async fn http(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(response)
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Scrapes `/metrics`: every sample as `name{labels}` -> value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let response = within(10, http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await
        .unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn get(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_agrees_with_metrics_jsonl_and_counts_refusals() {
    let ca = CertAuthority::generate("fedquic test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics_path = dir.path().join("metrics.jsonl");

    // A small MLP, so that central evaluation gives an accuracy and a loss.
    let layout: ParamLayout = "mlp:784-2-10".parse().unwrap();
    let spec = layout.model_spec().unwrap().clone();
    let (_, test) = "synthetic:10/200:3"
        .parse::<DataSpec>()
        .unwrap()
        .load()
        .unwrap();
    let server_cert = ca.issue_server(&["localhost".to_string()]).unwrap();
    let server_tls = tls::server_config(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem).unwrap(),
        &TransportSettings::aggregator(),
    )
    .unwrap();
    let metrics = Metrics::new();
    let names = ["m-1", "m-2", "m-3"];
    let setup = ServerSetup {
        central_eval: Some(CentralEval {
            model: Model::try_new(spec, 0).unwrap(),
            test: Arc::new(test),
        }),
        metrics_path: Some(metrics_path.clone()),
        allowlist: Some(names.iter().map(|n| n.to_string()).collect()),
        metrics: metrics.clone(),
        ..ServerSetup::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            server_tls,
            engine(3, 3, 2, Duration::from_secs(30)),
            &layout,
            layout.initial_parameters(1).unwrap(),
        )
    };
    // Port 0: the endpoint says which port it got.
    let endpoint = MetricsEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), metrics)
        .await
        .unwrap();
    let scrape_addr = endpoint.local_addr().unwrap();
    assert_ne!(scrape_addr.port(), 0);
    endpoint.spawn();

    let before = scrape(scrape_addr).await;
    assert_eq!(get(&before, "fedquic_rounds_completed_total"), 0.0);
    assert_eq!(get(&before, "fedquic_connected_clients"), 0.0);

    let server = Server::bind(setup).unwrap();
    let addr = server.local_addr().unwrap();
    let run = tokio::spawn(server.run(std::future::pending()));

    // A client the allowlist refuses, before the others connect.
    let tls = client_tls(&ca, Some(identity(&ca, "stranger")));
    match within(
        20,
        run_client(options(addr, tls, 1), DeltaTrainer::new(0.0, 1)),
    )
    .await
    {
        Err(ClientError::Rejected(reason)) => assert!(reason.contains("allowlist"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let clients: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let trainer = DeltaTrainer {
                // Long enough for a scrape to see every client connected.
                delay: Duration::from_millis(300),
                ..DeltaTrainer::new(0.001 * (i + 1) as f32, 10 + i as u64)
            };
            slow(&ca, addr, name, trainer)
        })
        .collect();

    // Broken scrapes while the run goes on.
    let garbage = within(10, http(scrape_addr, b"\x16\x03\x01\x00garbage\r\n\r\n"))
        .await
        .unwrap();
    assert_eq!(status_line(&garbage), "HTTP/1.1 400 Bad Request");
    let wrong_path = within(10, http(scrape_addr, b"GET /admin HTTP/1.1\r\n\r\n"))
        .await
        .unwrap();
    assert_eq!(status_line(&wrong_path), "HTTP/1.1 404 Not Found");

    // Every client connected at once, seen from outside.
    within(20, async {
        loop {
            let now = scrape(scrape_addr).await;
            if get(&now, "fedquic_connected_clients") == 3.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let summary = within(60, run).await.unwrap().unwrap();
    for c in clients {
        within(10, c).await.unwrap().unwrap();
    }
    assert_eq!(summary.rounds_completed, 2);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sum = |key: &str| -> f64 { lines.iter().map(|l| l[key].as_f64().unwrap()).sum() };
    let last = lines.last().unwrap();

    let after = scrape(scrape_addr).await;
    assert_eq!(
        get(&after, "fedquic_rounds_completed_total"),
        lines.len() as f64
    );
    assert_eq!(
        get(&after, "fedquic_updates_received_total"),
        sum("clients_answered")
    );
    assert_eq!(get(&after, "fedquic_updates_received_total"), 6.0);
    assert_eq!(get(&after, "fedquic_bytes_in_total"), sum("bytes_up"));
    assert_eq!(get(&after, "fedquic_bytes_out_total"), sum("bytes_down"));
    assert!(get(&after, "fedquic_bytes_in_total") >= 6.0 * 4.0 * layout.num_params() as f64);
    let accuracy = last["test_accuracy"].as_f64().unwrap();
    let loss = last["test_loss"].as_f64().unwrap();
    assert!((get(&after, "fedquic_test_accuracy") - accuracy).abs() < 1e-9);
    assert!((get(&after, "fedquic_test_loss") - loss).abs() < 1e-9);
    assert!(loss > 0.0);
    assert_eq!(
        get(&after, "fedquic_round_duration_seconds_count"),
        lines.len() as f64
    );
    assert!((get(&after, "fedquic_round_duration_seconds_sum") - sum("seconds")).abs() < 1e-6);
    assert_eq!(
        get(&after, "fedquic_round_duration_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "fedquic_handshakes_refused_total{reason=\"allowlist\"}"
        ),
        1.0
    );
    assert_eq!(
        get(&after, "fedquic_handshakes_refused_total{reason=\"full\"}"),
        0.0
    );
    assert_eq!(
        get(&after, "fedquic_updates_rejected_total{reason=\"stale\"}"),
        0.0
    );
    // No checkpoint store in this setup: no checkpoint writes.
    assert_eq!(get(&after, "fedquic_checkpoint_write_seconds_count"), 0.0);
    let version = format!(
        "fedquic_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(get(&after, &version), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_scrapers_get_errors_or_a_closed_connection_and_scrapes_still_work() {
    let endpoint = MetricsEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), Metrics::new())
        .await
        .unwrap();
    let addr = endpoint.local_addr().unwrap();
    endpoint.spawn();

    for (request, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        (
            b"GET /metrics/../x HTTP/1.1\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            b"DELETE /metrics HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\x00\x01\x02\xff\n\n", "HTTP/1.1 400 Bad Request"),
    ] {
        let response = within(10, http(addr, request)).await.unwrap();
        assert_eq!(status_line(&response), want, "{request:?}");
    }

    // A head that never ends: refused once it passes the bound, whatever it
    // would have said.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() <= MAX_REQUEST_HEAD {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    match within(10, http(addr, &huge)).await {
        Ok(response) => assert_eq!(
            status_line(&response),
            "HTTP/1.1 431 Request Header Fields Too Large"
        ),
        // The server may close with our bytes unread: a reset, not an answer.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    // More idle connections than the endpoint serves at once: the extra ones
    // are closed straight away, the others wait for their request head.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the endpoint time to take a permit for each of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = within(5, extra.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "an extra connection is closed without an answer");
    drop(idle);

    // Once they are gone, scrapes work again.
    within(10, async {
        loop {
            let response = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
            if let Ok(r) = response
                && status_line(&r) == "HTTP/1.1 200 OK"
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let samples = scrape(addr).await;
    assert_eq!(get(&samples, "fedquic_rounds_completed_total"), 0.0);
}
