//! The scrape endpoint: a GET-only HTTP/1.x responder on plain tokio.
//!
//! The scraper is untrusted (the port may be reachable by more than
//! Prometheus), so every connection is bounded: the request head must fit in
//! [`MAX_REQUEST_HEAD`] bytes and arrive within [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] are served at once and at most
//! [`MAX_CONNECTIONS_PER_ADDRESS`] from one IPv4 address or IPv6 /64 (more are closed at
//! once, so one peer holding idle sockets cannot lock the scraper out), and
//! each connection answers one request and closes. Nothing a client sends can
//! reach the aggregator's state: the endpoint only reads the metrics.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{CONTENT_TYPE, Metrics};

/// Longest request line plus headers accepted (Prometheus sends ~300 bytes).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, and to read the answer
/// (a scraper sends its ~300 bytes at once).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes served at once; a scraper needs one.
pub const MAX_CONNECTIONS: usize = 16;
/// Scrapes served at once to one IPv4 address or IPv6 /64.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 2;

/// Connections open per peer address; a slot is given back when dropped.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

struct AddressSlot {
    counts: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// The peer a connection counts against: its IPv4 address, or its IPv6
    /// /64 (one host commonly holds a whole /64).
    fn peer_key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
            v4 => v4,
        }
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = Self::peer_key(ip);
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}
/// The only path served.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics scrapes on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound metrics listener; [`MetricsEndpoint::local_addr`] tells the port
/// when it was bound to port 0.
pub struct MetricsEndpoint {
    listener: TcpListener,
    metrics: Metrics,
}

impl MetricsEndpoint {
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsEndpoint { listener, metrics })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes until the task is dropped or aborted.
    pub async fn serve(self) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let per_address = Arc::new(PerAddress::default());
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: wait a little rather than spin.
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = per_address.take(peer.ip()) else {
                debug!(%peer, "metrics endpoint: too many connections from this address");
                continue;
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                debug!(%peer, "metrics endpoint busy: connection closed");
                continue;
            };
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                answer(stream, &metrics).await;
                drop((permit, slot));
            });
        }
    }

    /// Runs [`MetricsEndpoint::serve`] on its own task.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.serve())
    }
}

/// How reading a request head ended.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed (or broke) the connection first.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> Head {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(n) => n,
        };
        // The blank line can only newly appear at the end of what was read.
        let start = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        let end = (start..head.len())
            .find(|&i| head[i..].starts_with(b"\r\n\r\n") || head[i..].starts_with(b"\n\n"));
        match end {
            Some(end) if end <= MAX_REQUEST_HEAD => {
                head.truncate(end);
                return Head::Complete(head);
            }
            _ if head.len() > MAX_REQUEST_HEAD => return Head::TooLarge,
            _ => {}
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Head::Complete(head)) => respond(&head, metrics),
        Ok(Head::TooLarge) => status(431, "Request Header Fields Too Large"),
        Ok(Head::Closed) => return,
        Err(_) => status(408, "Request Timeout"),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
}

/// The full response to a request head (without its blank line).
fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return status(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return status(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return status(400, "Bad Request");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return status(405, "Method Not Allowed"),
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != METRICS_PATH {
        return status(404, "Not Found");
    }
    match metrics.encode() {
        Ok(body) => {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
                 Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if !head_only {
                response.extend_from_slice(body.as_bytes());
            }
            response
        }
        Err(e) => {
            warn!(error = %e, "cannot encode the metrics");
            status(500, "Internal Server Error")
        }
    }
}

/// A response with no body beyond its reason phrase.
fn status(code: u16, reason: &str) -> Vec<u8> {
    let allow = match code {
        405 => "Allow: GET, HEAD\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n{allow}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_line(response: &[u8]) -> String {
        String::from_utf8_lossy(response)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let m = Metrics::new();
        let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x", &m);
        assert_eq!(first_line(&ok), "HTTP/1.1 200 OK");
        let text = String::from_utf8(ok).unwrap();
        assert!(text.contains(CONTENT_TYPE) && text.ends_with("# EOF\n"));
        let head = respond(b"HEAD /metrics?x=1 HTTP/1.0", &m);
        assert!(String::from_utf8(head).unwrap().ends_with("\r\n\r\n"));
        for (request, want) in [
            (&b"GET / HTTP/1.1"[..], "HTTP/1.1 404 Not Found"),
            (b"GET /metricsx HTTP/1.1", "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1", "HTTP/1.1 405 Method Not Allowed"),
            (b"GET /metrics", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics SPDY/3", "HTTP/1.1 400 Bad Request"),
            (b"GET  /metrics HTTP/1.1", "HTTP/1.1 400 Bad Request"),
            (b"\xff\xfe", "HTTP/1.1 400 Bad Request"),
            (b"", "HTTP/1.1 400 Bad Request"),
        ] {
            assert_eq!(first_line(&respond(request, &m)), want, "{request:?}");
        }
    }

    async fn scrape(addr: SocketAddr) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The peer may close first (refused); that is an empty answer.
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        answer
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        let key = |ip: &str| PerAddress::peer_key(ip.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }

    #[tokio::test]
    async fn one_address_cannot_hold_every_slot() {
        let endpoint = MetricsEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), Metrics::new())
            .await
            .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let server = endpoint.spawn();
        // Two idle connections from this address take its two slots; the
        // server accepts in order, so a third is refused unanswered.
        let idle: Vec<_> = idle_connections(addr).await;
        assert!(
            scrape(addr).await.is_empty(),
            "a third connection is closed unanswered"
        );
        // The slots come back once the idle ones close.
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while first_line(&scrape(addr).await) != "HTTP/1.1 200 OK" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "slots not given back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
    }

    async fn idle_connections(addr: SocketAddr) -> Vec<TcpStream> {
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        idle
    }
}
