//! `fedquic-sim flood`: an unauthenticated flood of QUIC Initial packets
//! against an aggregator on this machine, to measure what half-open
//! connection attempts cost it (see BENCHMARKS.md, "Handshake flood").
//!
//! Each packet is a genuine client Initial (a fresh connection ID and TLS
//! ClientHello, padded to 1,200 bytes) built by quinn-proto's state
//! machine; the flood never reads an answer, so it never completes a
//! handshake, follows a Retry, or presents a certificate. It sends only to
//! 127.0.0.1, and both the packet count and the duration are bounded.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedquic_net::pki::CertAuthority;
use fedquic_net::tls::{self, TransportSettings};

/// Most Initials one flood may send.
pub const MAX_INITIALS: u64 = 1_000_000;
/// Longest a flood may last.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Most packets per second (loopback only; keeps the flooder from
/// monopolising a shared machine).
pub const MAX_RATE: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The aggregator: must be 127.0.0.1.
    pub target: SocketAddr,
    /// Initial packets to send (each opens a new connection attempt).
    pub initials: u64,
    /// Packets per second.
    pub rate: u64,
    /// Stop after this long even if not all packets went out.
    pub max_duration: Duration,
    /// Seeds quinn-proto's random choices (connection IDs, TLS randoms).
    pub seed: u64,
}

impl FloodConfig {
    pub fn new(target: SocketAddr, initials: u64) -> Self {
        FloodConfig {
            target,
            initials,
            rate: 20_000,
            max_duration: Duration::from_secs(60),
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FloodError {
    #[error("the flood only targets 127.0.0.1, not {0}")]
    NotLoopback(SocketAddr),
    #[error("initials must be in 1..={MAX_INITIALS}, got {0}")]
    Count(u64),
    #[error("rate must be in 1..={MAX_RATE} packets per second, got {0}")]
    Rate(u64),
    #[error("duration must be between 1 ms and {MAX_DURATION:?}, got {0:?}")]
    Duration(Duration),
    #[error("cannot build the Initial packets: {0}")]
    Tls(String),
    #[error("UDP socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// What a flood did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodReport {
    pub sent: u64,
    /// Datagrams the kernel refused (full buffers); not counted in `sent`.
    pub send_errors: u64,
    pub elapsed: Duration,
}

impl FloodConfig {
    pub fn validate(&self) -> Result<(), FloodError> {
        if self.target.ip() != std::net::IpAddr::V4(Ipv4Addr::LOCALHOST) {
            return Err(FloodError::NotLoopback(self.target));
        }
        if self.initials == 0 || self.initials > MAX_INITIALS {
            return Err(FloodError::Count(self.initials));
        }
        if self.rate == 0 || self.rate > MAX_RATE {
            return Err(FloodError::Rate(self.rate));
        }
        if self.max_duration < Duration::from_millis(1) || self.max_duration > MAX_DURATION {
            return Err(FloodError::Duration(self.max_duration));
        }
        Ok(())
    }
}

/// Sends the flood (blocking; call it from a blocking thread in async code).
pub fn flood(config: &FloodConfig) -> Result<FloodReport, FloodError> {
    config.validate()?;
    // Trust a throwaway CA: the flood never gets far enough to check the
    // server, and presents no client certificate.
    let ca =
        CertAuthority::generate("fedquic flood").map_err(|e| FloodError::Tls(e.to_string()))?;
    let roots = tls::load_ca_pem(ca.cert_pem()).map_err(|e| FloodError::Tls(e.to_string()))?;
    let client = tls::client_config(roots, None, &TransportSettings::default())
        .map_err(|e| FloodError::Tls(e.to_string()))?;
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&config.seed.to_le_bytes());
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn::EndpointConfig::default()),
        None,
        false,
        Some(seed),
    );
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let start = Instant::now();
    let interval = Duration::from_secs(1).as_secs_f64() / config.rate as f64;
    let mut buf = Vec::with_capacity(1500);
    let mut report = FloodReport {
        sent: 0,
        send_errors: 0,
        elapsed: Duration::ZERO,
    };
    for i in 0..config.initials {
        let now = Instant::now();
        if now.duration_since(start) >= config.max_duration {
            break;
        }
        // Pace: packet i goes out no earlier than i * interval.
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        if due > now {
            std::thread::sleep(due - now);
        }
        let now = Instant::now();
        let (_, mut conn) = endpoint
            .connect(now, client.clone(), config.target, "localhost")
            .map_err(|e| FloodError::Tls(e.to_string()))?;
        buf.clear();
        if let Some(transmit) = conn.poll_transmit(now, 1, &mut buf) {
            match socket.send_to(&buf[..transmit.size], config.target) {
                Ok(_) => report.sent += 1,
                Err(_) => report.send_errors += 1,
            }
        }
        // The connection state is dropped at once: the flooder keeps no
        // state and never answers, which is what makes a flood cheap.
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Command-line arguments of `fedquic-sim flood`.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// The aggregator's UDP port on 127.0.0.1 (the only address flooded).
    #[arg(long)]
    pub port: u16,
    /// QUIC Initial packets to send (each a new connection attempt).
    #[arg(long, default_value_t = 10_000)]
    pub initials: u64,
    /// Packets per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Stop after this many seconds even if not all packets went out (at most 600).
    #[arg(long, default_value_t = 60.0)]
    pub max_secs: f64,
    /// Seed of the connection IDs and TLS randoms.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `fedquic-sim flood` and prints what was sent.
pub fn run_flood(args: FloodArgs) -> anyhow::Result<()> {
    if !(args.max_secs.is_finite() && args.max_secs > 0.0 && args.max_secs <= 600.0) {
        anyhow::bail!("--max-secs must be in (0, 600], got {}", args.max_secs);
    }
    let config = FloodConfig {
        target: SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)),
        initials: args.initials,
        rate: args.rate,
        max_duration: Duration::from_secs_f64(args.max_secs),
        seed: args.seed,
    };
    let report = flood(&config)?;
    println!(
        "flood: sent {} Initial packets to {} in {:.2} s ({} send errors)",
        report.sent,
        config.target,
        report.elapsed.as_secs_f64(),
        report.send_errors
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_bounded_values_are_accepted() {
        let ok = FloodConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 4433)), 10);
        ok.validate().expect("valid");
        let remote = FloodConfig::new(SocketAddr::from(([10, 0, 0, 1], 4433)), 10);
        assert!(matches!(remote.validate(), Err(FloodError::NotLoopback(_))));
        let v6 = FloodConfig::new("[::1]:4433".parse().expect("addr"), 10);
        assert!(matches!(v6.validate(), Err(FloodError::NotLoopback(_))));
        let too_many = FloodConfig::new(ok.target, MAX_INITIALS + 1);
        assert!(matches!(too_many.validate(), Err(FloodError::Count(_))));
        let forever = FloodConfig {
            max_duration: Duration::from_secs(3600),
            ..ok.clone()
        };
        assert!(matches!(forever.validate(), Err(FloodError::Duration(_))));
        let zero_rate = FloodConfig { rate: 0, ..ok };
        assert!(matches!(zero_rate.validate(), Err(FloodError::Rate(0))));
    }

    #[test]
    fn sends_real_initial_packets_each_with_a_new_connection_id() {
        let receiver = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let target = receiver.local_addr().expect("addr");
        let report = flood(&FloodConfig::new(target, 3)).expect("flood");
        assert_eq!(report.sent, 3);
        let mut dcids = Vec::new();
        for _ in 0..3 {
            let mut packet = [0u8; 2048];
            let len = receiver.recv(&mut packet).expect("an Initial arrives");
            // RFC 9000 §17.2: long header, type Initial, QUIC v1, padded.
            assert!(len >= 1200, "Initials are padded to 1200 bytes: {len}");
            assert_eq!(packet[0] & 0xf0, 0xc0, "long header, Initial");
            assert_eq!(&packet[1..5], &1u32.to_be_bytes());
            let dcid_len = packet[5] as usize;
            dcids.push(packet[6..6 + dcid_len].to_vec());
        }
        dcids.sort();
        dcids.dedup();
        assert_eq!(dcids.len(), 3, "every Initial opens a new connection");
    }
}
