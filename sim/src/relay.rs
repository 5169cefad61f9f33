//! `--link LATENCY_MS:MBPS`: a real UDP relay between one virtual client and
//! the aggregator that delays every datagram by the latency (each way) and
//! paces it through a token bucket of the given rate (each way), so a slow
//! uplink really is slow: QUIC's congestion control and the round deadline
//! see it as they would on a real network.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::faults::FaultSpecError;

/// Bounds on what a link spec may ask for.
pub const MAX_LATENCY_MS: f64 = 10_000.0;
pub const MIN_MBPS: f64 = 0.01;
pub const MAX_MBPS: f64 = 100_000.0;

/// The largest UDP payload a shaped link carries: an Ethernet path (1,500
/// bytes less the IPv4 and UDP headers). Larger datagrams are dropped, as a
/// router that does not fragment drops them, so QUIC's MTU discovery
/// settles where it would on the internet instead of at the 16,000 bytes
/// loopback allows.
pub const LINK_MAX_DATAGRAM: usize = 1_472;

/// A link: one-way latency and rate, the same in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LinkSpec {
    pub latency_ms: f64,
    pub mbps: f64,
}

impl LinkSpec {
    /// How long `bytes` take to cross the link one way (latency plus
    /// serialisation at the rate).
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(self.latency_ms / 1e3 + bytes as f64 * 8.0 / (self.mbps * 1e6))
    }

    /// The most bytes queued before the relay drops (tail drop, as a router
    /// does): 200 ms of the rate, at least 64 KiB.
    fn queue_limit(&self) -> u64 {
        ((self.mbps * 1e6 / 8.0 * 0.2) as u64).max(64 * 1024)
    }
}

impl FromStr for LinkSpec {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| FaultSpecError::Invalid {
            what: "--link",
            reason,
        };
        let (l, r) = s
            .split_once(':')
            .ok_or_else(|| bad(format!("expected LATENCY_MS:MBPS (e.g. 50:10), got '{s}'")))?;
        let num = |v: &str| -> Result<f64, FaultSpecError> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("'{v}' is not a number")))
        };
        let (latency_ms, mbps) = (num(l)?, num(r)?);
        if !(0.0..=MAX_LATENCY_MS).contains(&latency_ms) {
            return Err(bad(format!(
                "latency {latency_ms} ms is not in [0, {MAX_LATENCY_MS}]"
            )));
        }
        if !(MIN_MBPS..=MAX_MBPS).contains(&mbps) {
            return Err(bad(format!(
                "rate {mbps} Mbit/s is not in [{MIN_MBPS}, {MAX_MBPS}]"
            )));
        }
        Ok(LinkSpec { latency_ms, mbps })
    }
}

/// Paces datagrams of one direction: each leaves when the token bucket
/// (rate, one datagram deep) lets it, and arrives a latency later.
struct Pacer {
    spec: LinkSpec,
    /// When the link finishes sending what is queued.
    busy_until: Instant,
    /// (departure, size) of the queued datagrams, to know the queue's bytes.
    queued: VecDeque<(Instant, u64)>,
    queued_bytes: u64,
}

impl Pacer {
    fn new(spec: LinkSpec) -> Self {
        Pacer {
            spec,
            busy_until: Instant::now(),
            queued: VecDeque::new(),
            queued_bytes: 0,
        }
    }

    /// The arrival time of a datagram of `len` bytes offered now, or None
    /// if the queue is full.
    fn admit(&mut self, len: usize, now: Instant) -> Option<Instant> {
        while let Some(&(departs, size)) = self.queued.front() {
            if departs > now {
                break;
            }
            self.queued.pop_front();
            self.queued_bytes -= size;
        }
        if self.queued_bytes + len as u64 > self.spec.queue_limit() {
            return None;
        }
        let start = self.busy_until.max(now);
        let departs = start + Duration::from_secs_f64(len as f64 * 8.0 / (self.spec.mbps * 1e6));
        self.busy_until = departs;
        self.queued.push_back((departs, len as u64));
        self.queued_bytes += len as u64;
        Some(departs + Duration::from_secs_f64(self.spec.latency_ms / 1e3))
    }
}

/// A running relay; dropping it stops it.
pub struct Relay {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Delivers the datagrams of one direction at their arrival times (FIFO:
/// arrival times only grow within a direction).
fn deliverer(
    socket: Arc<UdpSocket>,
    to: Arc<Mutex<Option<SocketAddr>>>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let dest = *to.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(dest) = dest {
                let _ = socket.send_to(&datagram, dest).await;
            }
        }
    })
}

/// Starts a relay to `server` shaped by `spec`; clients dial the returned
/// relay's `addr`. The first peer to send to it is the client.
pub async fn spawn(server: SocketAddr, spec: LinkSpec) -> std::io::Result<Relay> {
    let front = Arc::new(UdpSocket::bind(("127.0.0.1", 0)).await?);
    let back = Arc::new(UdpSocket::bind(("127.0.0.1", 0)).await?);
    let addr = front.local_addr()?;
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let server_addr = Arc::new(Mutex::new(Some(server)));
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let mut tasks = vec![
        deliverer(Arc::clone(&back), server_addr, up_rx),
        deliverer(Arc::clone(&front), Arc::clone(&client), down_rx),
    ];
    let (f, c) = (Arc::clone(&front), Arc::clone(&client));
    tasks.push(tokio::spawn(async move {
        let mut pacer = Pacer::new(spec);
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
            if n > LINK_MAX_DATAGRAM {
                continue;
            }
            if let Some(at) = pacer.admit(n, Instant::now())
                && up_tx.send((at, buf[..n].to_vec())).is_err()
            {
                break;
            }
        }
    }));
    tasks.push(tokio::spawn(async move {
        let mut pacer = Pacer::new(spec);
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = back.recv_from(&mut buf).await else {
                break;
            };
            // Only the aggregator's datagrams go down to the client.
            if from != server || n > LINK_MAX_DATAGRAM {
                continue;
            }
            if let Some(at) = pacer.admit(n, Instant::now())
                && down_tx.send((at, buf[..n].to_vec())).is_err()
            {
                break;
            }
        }
    }));
    Ok(Relay { addr, tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_and_bad_ones_are_clear_errors() {
        assert_eq!(
            "50:10".parse::<LinkSpec>().unwrap(),
            LinkSpec {
                latency_ms: 50.0,
                mbps: 10.0
            }
        );
        for (bad, needle) in [
            ("50", "LATENCY_MS:MBPS"),
            ("x:10", "not a number"),
            ("-1:10", "latency"),
            ("50:0", "rate"),
            ("50:1e9", "rate"),
        ] {
            let err = bad.parse::<LinkSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn pacer_spaces_datagrams_at_the_rate_and_adds_latency() {
        let spec = LinkSpec {
            latency_ms: 20.0,
            mbps: 8.0, // 1 byte per microsecond
        };
        let mut p = Pacer::new(spec);
        let now = Instant::now();
        let a = p.admit(1000, now).unwrap();
        let b = p.admit(1000, now).unwrap();
        assert_eq!(a - now, Duration::from_micros(21_000));
        assert_eq!(b - a, Duration::from_micros(1000));
        // A queue past its limit (200 ms at 1 MB/s = 200 kB) drops.
        let mut dropped = 0;
        for _ in 0..300 {
            dropped += p.admit(1000, now).is_none() as usize;
        }
        assert!(dropped >= 90, "{dropped}");
    }

    /// A server socket, a relay to it with `latency_ms` at 100 Mbit/s, and a
    /// client socket.
    async fn relayed(latency_ms: f64) -> (UdpSocket, Relay, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let spec = LinkSpec {
            latency_ms,
            mbps: 100.0,
        };
        let relay = spawn(server.local_addr().unwrap(), spec).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (server, relay, client)
    }

    #[tokio::test]
    async fn relay_forwards_both_ways_with_the_latency() {
        let (server, relay, client) = relayed(30.0).await;
        let t = std::time::Instant::now();
        client.send_to(b"ping", relay.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(60), "round trip {rtt:?}");
    }

    #[tokio::test]
    async fn relay_drops_datagrams_larger_than_an_ethernet_path_carries() {
        let (server, relay, client) = relayed(1.0).await;
        // Too large, then the largest allowed: only the second arrives.
        client
            .send_to(&[1u8; LINK_MAX_DATAGRAM + 1], relay.addr)
            .await
            .unwrap();
        client
            .send_to(&[2u8; LINK_MAX_DATAGRAM], relay.addr)
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n, buf[0]), (LINK_MAX_DATAGRAM, 2));
        // The same going down.
        server
            .send_to(&[3u8; LINK_MAX_DATAGRAM + 1], from)
            .await
            .unwrap();
        server.send_to(&[4u8; 100], from).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n, buf[0]), (100, 4));
    }
}
