//! quinn endpoints on UDP sockets with large kernel buffers.
//!
//! One UDP socket carries every connection of an endpoint: all K clients'
//! uploads at the aggregator, all of a simulator's clients. With the kernel's
//! default ~208 KiB receive buffer, bursts (hundreds of clients connecting at
//! once, a round's uploads arriving together) overflow the socket and packets
//! are dropped, which QUIC reads as congestion; [`UDP_BUFFER_BYTES`] avoids that.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quinn::{EndpointConfig, TokioRuntime};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cid::KeyedCidGenerator;

/// Requested size of the UDP receive and send buffers. Where TCP gives each
/// connection a buffer of its own (autotuned up to `tcp_rmem`, 6 MiB by
/// default), QUIC's connections share their endpoint's: at 4 MiB the
/// overhead benchmark's K = 100, P = 100k run dropped about 1,000 datagrams in
/// 5 rounds (each a loss, a retransmission and a smaller congestion window),
/// at 0.064-0.082 s a round; at 32 MiB it dropped none, at 0.047-0.057 s
/// (BENCHMARKS.md, "Larger UDP socket buffers"). The size is a cap: the kernel
/// only holds what is queued. Above `net.core.rmem_max` / `wmem_max` the
/// request is forced where the process may (`CAP_NET_ADMIN`), as quic-go and
/// wireguard-go do, and otherwise granted at the cap and reported.
pub const UDP_BUFFER_BYTES: usize = 32 << 20;

/// The largest UDP payload a fedquic endpoint sends or accepts, and the upper
/// bound of path-MTU discovery (quinn's default is 1,452, Ethernet's MTU).
///
/// Where the path allows more (loopback, whose MTU is 64 KiB; jumbo-frame
/// LANs between silos stop at their 9,000), MTU discovery finds it within a
/// few round trips after the handshake, and every datagram then carries up
/// to 13x the data for the same per-packet work (packet building, header
/// protection, ACKs, syscalls): rounds on loopback are 1.5-1.9x faster at
/// 6,500 bytes than at 1,452, and 3-15% faster again at 16,000
/// (BENCHMARKS.md, "A faster wire"). On other paths the probes are lost and
/// discovery settles at the path's MTU; the first packets always use quinn's
/// safe 1,200 bytes.
///
/// quinn 0.11 hands the kernel up to 10 datagrams per GSO send, the kernel
/// refuses a send over 64 KiB with `EMSGSIZE`, and quinn-udp drops such a
/// send silently: at 8,952 bytes every full batch vanished. fedquic's
/// sockets therefore cap a send at [`GSO_SEGMENTS`] datagrams, so that a
/// batch of the largest datagrams stays under the limit. Beyond 16,000 the
/// benchmark gains nothing measurable, while the initial congestion window,
/// which must hold a probe of this size (`fedquic_net::tls::INITIAL_WINDOW`),
/// grows with it.
pub const MAX_UDP_PAYLOAD: u16 = 16_000;

/// The most datagrams one GSO send of a fedquic socket carries: as many of
/// [`MAX_UDP_PAYLOAD`] as fit in one UDP datagram of the kernel's (65,535
/// bytes less the IPv4 and UDP headers), at most quinn's own 10.
pub const GSO_SEGMENTS: usize = {
    let fit = 65_507 / MAX_UDP_PAYLOAD as usize;
    if fit < 10 { fit } else { 10 }
};

const _: () = assert!(GSO_SEGMENTS >= 1 && MAX_UDP_PAYLOAD as usize * GSO_SEGMENTS <= 65_507);

/// Errors of endpoint creation.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("QUIC endpoints must be created inside a tokio runtime")]
    NoRuntime,
    #[error("cannot create a UDP socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("address {addr} is already in use (is another instance running?)")]
    AddrInUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Below this usable size a buffer is small enough that bursts of handshakes
/// drop packets: the size fedquic asked for before it asked for
/// [`UDP_BUFFER_BYTES`]. Between it and the request, bursts of a round's
/// traffic still fit, at some cost in drops at the largest fan-ins
/// (BENCHMARKS.md, "Larger UDP socket buffers").
const UDP_BUFFER_WARN_BELOW: usize = 4 << 20;

/// The bytes a socket may queue, from the size `SO_RCVBUF` / `SO_SNDBUF`
/// report: Linux sets and reports twice what was asked, the other half being
/// its bookkeeping allowance.
fn usable(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// Report a small buffer once per process (warning when it is small enough to
/// drop handshakes, info otherwise); later occurrences go to debug.
static REPORTED_SMALL_BUFFER: AtomicBool = AtomicBool::new(false);

fn report_small_buffer(addr: SocketAddr, which: &str, granted: usize) {
    let requested = UDP_BUFFER_BYTES;
    if REPORTED_SMALL_BUFFER.swap(true, Ordering::Relaxed) {
        tracing::debug!(%addr, which, granted, "UDP buffer smaller than requested");
    } else if granted < UDP_BUFFER_WARN_BELOW {
        tracing::warn!(
            %addr, which, requested, granted,
            "the OS granted a smaller UDP {which} buffer than requested; bursts of \
             connections may drop packets (raise net.core.rmem_max / wmem_max)"
        );
    } else {
        tracing::info!(
            %addr, which, requested, granted,
            "the OS granted a smaller UDP {which} buffer than requested; many clients \
             sending at once may drop packets (raise net.core.rmem_max / wmem_max to \
             {requested}, or run with CAP_NET_ADMIN)"
        );
    }
}

#[cfg(target_os = "linux")]
fn force_buffers_over_the_cap(socket: &Socket, addr: SocketAddr) {
    use rustix::net::sockopt;
    let capped = |reported: io::Result<usize>| reported.is_ok_and(|r| usable(r) < UDP_BUFFER_BYTES);
    if capped(socket.recv_buffer_size())
        && let Err(e) = sockopt::set_socket_recv_buffer_size_force(socket, UDP_BUFFER_BYTES)
    {
        tracing::debug!(%addr, %e, "cannot force SO_RCVBUF past net.core.rmem_max");
    }
    if capped(socket.send_buffer_size())
        && let Err(e) = sockopt::set_socket_send_buffer_size_force(socket, UDP_BUFFER_BYTES)
    {
        tracing::debug!(%addr, %e, "cannot force SO_SNDBUF past net.core.wmem_max");
    }
}

/// A non-blocking UDP socket bound to `addr` with enlarged buffers.
fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, EndpointError> {
    let socket_err = |source| EndpointError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(socket_err)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Best effort dual stack, as quinn does for its own sockets.
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(%addr, %e, "cannot make the socket dual-stack");
        }
    }
    // Failing to enlarge a buffer is not fatal: the sizes are checked below.
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(%addr, %e, "cannot set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(%addr, %e, "cannot set SO_SNDBUF");
    }
    #[cfg(target_os = "linux")]
    force_buffers_over_the_cap(&socket, addr);
    match socket.recv_buffer_size().map(usable) {
        Ok(granted) if granted < UDP_BUFFER_BYTES => report_small_buffer(addr, "receive", granted),
        Ok(_) => {}
        Err(e) => tracing::debug!(%addr, %e, "cannot read SO_RCVBUF"),
    }
    match socket.send_buffer_size().map(usable) {
        Ok(granted) if granted < UDP_BUFFER_BYTES => report_small_buffer(addr, "send", granted),
        Ok(_) => {}
        Err(e) => tracing::debug!(%addr, %e, "cannot read SO_SNDBUF"),
    }
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            EndpointError::AddrInUse { addr, source }
        } else {
            EndpointError::Bind { addr, source }
        }
    })?;
    socket.set_nonblocking(true).map_err(socket_err)?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, EndpointError> {
    let endpoint_config = match server {
        Some(_) => server_endpoint_config(),
        None => EndpointConfig::default(),
    };
    endpoint_with_config(addr, server, endpoint_config)
}

fn endpoint_with_config(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    endpoint_config: EndpointConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(EndpointError::NoRuntime);
    }
    let socket = udp_socket(addr)?;
    let mut endpoint_config = endpoint_config;
    endpoint_config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| EndpointError::Endpoint {
            addr,
            source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        })?;
    let runtime = Arc::new(TokioRuntime);
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)
        .map_err(|source| EndpointError::Endpoint { addr, source })?;
    let socket = Arc::new(GsoCapped(socket));
    quinn::Endpoint::new_with_abstract_socket(endpoint_config, server, socket, runtime)
        .map_err(|source| EndpointError::Endpoint { addr, source })
}

/// quinn's tokio socket with GSO sends capped at [`GSO_SEGMENTS`]
/// datagrams (quinn asks the socket how many it may batch); everything else
/// is passed through.
#[derive(Debug)]
struct GsoCapped(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for GsoCapped {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }
    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        self.0.try_send(transmit)
    }
    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments().min(GSO_SEGMENTS)
    }
    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }
    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// A server endpoint listening on `listen`. Must be called inside a tokio
/// runtime. Port 0 picks a free port: see `Endpoint::local_addr`.
pub fn server_endpoint(
    listen: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    endpoint(listen, Some(config))
}

/// [`server_endpoint`] whose stateless-reset tokens are derived from
/// `secret` (the aggregator passes its private key) instead of a random key,
/// so they stay valid across restarts: after a crash, a client's next packet
/// (at the latest its next keep-alive) draws a stateless reset from the
/// restarted aggregator, and the client reconnects at once instead of
/// waiting out the idle timeout.
pub fn server_endpoint_with_reset_secret(
    listen: SocketAddr,
    config: quinn::ServerConfig,
    secret: &[u8],
) -> Result<quinn::Endpoint, EndpointError> {
    endpoint_with_config(listen, Some(config), reset_secret_endpoint_config(secret))
}

/// The endpoint configuration of [`server_endpoint_with_reset_secret`]:
/// stateless-reset key and connection-ID generator derived from `secret`
/// (shared with the in-memory endpoints of [`crate::mem`]).
pub fn reset_secret_endpoint_config(secret: &[u8]) -> EndpointConfig {
    // An HMAC key per use, SHA-256(label || secret), so the two never coincide.
    let derived = |label: &[u8]| {
        let mut material = label.to_vec();
        material.extend_from_slice(secret);
        let digest = ring::digest::digest(&ring::digest::SHA256, &material);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref())
    };
    let mut endpoint_config =
        EndpointConfig::new(Arc::new(derived(b"fedquic/1 stateless reset key\0")));
    // The connection-ID generator's key must survive the restart too: the
    // endpoint only answers packets whose connection ID it could have
    // issued, and a random key would make the old IDs look forged.
    let cid_key = derived(b"fedquic/1 connection id key\0");
    endpoint_config.cid_generator(move || Box::new(KeyedCidGenerator::new(cid_key.clone())));
    endpoint_config
}

/// The endpoint configuration of a server without a reset secret: quinn's
/// defaults with [`KeyedCidGenerator`]'s connection IDs (random key), whose
/// Retry IDs cannot collide with live ones.
pub fn server_endpoint_config() -> EndpointConfig {
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config.cid_generator(|| Box::new(KeyedCidGenerator::random()));
    endpoint_config
}

/// A client endpoint on an ephemeral IPv4 port (`0.0.0.0:0`) whose default
/// client configuration is `config`. Must be called inside a tokio runtime.
pub fn client_endpoint(config: quinn::ClientConfig) -> Result<quinn::Endpoint, EndpointError> {
    client_endpoint_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), config)
}

/// A client endpoint on an ephemeral port of the same address family as
/// `server`, so that it can reach it.
pub fn client_endpoint_for(
    server: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    let bind = match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    client_endpoint_on(bind, config)
}

/// A client endpoint bound to `bind` whose default client configuration
/// is `config`.
pub fn client_endpoint_on(
    bind: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    let mut endpoint = endpoint(bind, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::{Duration, SystemTime};

    use tokio::sync::mpsc;

    use super::*;
    use crate::pki::{self, CertAuthority, Issued};
    use crate::tls::{
        self, Identity, TransportSettings, client_config, load_ca_pem, peer_name, server_config,
    };

    const STEP: Duration = Duration::from_secs(5);
    const PAYLOAD: &[u8] = b"weights: 0.25 0.5 0.125";

    /// The socket gets at least what a plain `SO_RCVBUF` / `SO_SNDBUF` request
    /// gets, and where this process may go past the system's cap (the force
    /// request succeeds on a probe socket), the full size.
    #[test]
    fn socket_buffers_reach_the_request_or_the_cap() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let ours = socket2::Socket::from(udp_socket(addr).expect("socket"));
        let plain = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("probe");
        plain
            .set_recv_buffer_size(UDP_BUFFER_BYTES)
            .expect("SO_RCVBUF");
        plain
            .set_send_buffer_size(UDP_BUFFER_BYTES)
            .expect("SO_SNDBUF");
        let recv = usable(ours.recv_buffer_size().unwrap());
        let send = usable(ours.send_buffer_size().unwrap());
        assert!(recv >= usable(plain.recv_buffer_size().unwrap()), "{recv}");
        assert!(send >= usable(plain.send_buffer_size().unwrap()), "{send}");
        #[cfg(target_os = "linux")]
        {
            use rustix::net::sockopt;
            let probe = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("probe");
            if sockopt::set_socket_recv_buffer_size_force(&probe, UDP_BUFFER_BYTES).is_ok() {
                assert!(recv >= UDP_BUFFER_BYTES, "forcing is allowed, yet {recv}");
            }
            if sockopt::set_socket_send_buffer_size_force(&probe, UDP_BUFFER_BYTES).is_ok() {
                assert!(send >= UDP_BUFFER_BYTES, "forcing is allowed, yet {send}");
            }
        }
    }

    /// Every await of the tests goes through this, so a bug cannot hang the suite.
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(STEP, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out: {what}"),
        }
    }

    /// What the echo server saw of one incoming connection.
    #[derive(Debug, PartialEq)]
    enum Seen {
        /// Handshake succeeded; the client's name.
        Admitted(Option<String>),
        /// The handshake failed on the server side.
        Refused(String),
    }

    struct Server {
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        seen: mpsc::UnboundedReceiver<Seen>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.endpoint.close(0u32.into(), b"test over");
            self.task.abort();
        }
    }

    /// An echo server: on each connection, echoes one bi stream back.
    fn start_server(ca: &CertAuthority, server: &Issued) -> Server {
        start_server_settings(ca, server, &TransportSettings::default())
    }

    fn start_server_settings(
        ca: &CertAuthority,
        server: &Issued,
        settings: &TransportSettings,
    ) -> Server {
        let roots = load_ca_pem(ca.cert_pem()).expect("roots");
        let id = Identity::from_pem(&server.cert_pem, &server.key_pem).expect("identity");
        let config = server_config(roots, id, settings).expect("config");
        start_server_with(config)
    }

    fn start_server_with(config: quinn::ServerConfig) -> Server {
        let endpoint =
            server_endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("endpoint");
        let addr = endpoint.local_addr().expect("local addr");
        let (tx, seen) = mpsc::unbounded_channel();
        let accepting = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => {
                            let _ = tx.send(Seen::Refused(e.to_string()));
                            return;
                        }
                    };
                    let _ = tx.send(Seen::Admitted(peer_name(&conn)));
                    let echo = async {
                        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
                        let data = recv.read_to_end(1 << 20).await.ok()?;
                        send.write_all(&data).await.ok()?;
                        send.finish().ok()?;
                        conn.closed().await;
                        Some(())
                    };
                    let _ = tokio::time::timeout(STEP, echo).await;
                });
            }
        });
        Server {
            endpoint,
            addr,
            seen,
            task,
        }
    }

    fn client(ca_pem: &str, identity: Option<&Issued>) -> quinn::Endpoint {
        client_settings(ca_pem, identity, &TransportSettings::default())
    }

    fn client_settings(
        ca_pem: &str,
        identity: Option<&Issued>,
        settings: &TransportSettings,
    ) -> quinn::Endpoint {
        let roots = load_ca_pem(ca_pem).expect("roots");
        let identity =
            identity.map(|i| Identity::from_pem(&i.cert_pem, &i.key_pem).expect("client identity"));
        let config = client_config(roots, identity, settings).expect("client config");
        client_endpoint_for(SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), config).expect("endpoint")
    }

    /// Echoes `payload` over a new bi stream of `conn` and checks it comes
    /// back whole and that the server admitted `client-001`.
    async fn echo_whole(conn: &quinn::Connection, server: &mut Server, payload: &[u8]) {
        let (mut send, mut recv) = within("open_bi", conn.open_bi()).await.expect("open_bi");
        within("write", send.write_all(payload))
            .await
            .expect("write");
        send.finish().expect("finish");
        let echoed = within("read", recv.read_to_end(1 << 20))
            .await
            .expect("read");
        assert!(echoed == payload, "echo differs");
        assert_eq!(
            next_seen(server).await,
            Seen::Admitted(Some("client-001".into()))
        );
    }

    /// Connects and does one echo round trip; the error says which step failed.
    async fn round_trip(endpoint: &quinn::Endpoint, server: SocketAddr) -> Result<Vec<u8>, String> {
        let connecting = endpoint
            .connect(server, "localhost")
            .map_err(|e| format!("connect: {e}"))?;
        let conn = within("handshake", connecting)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let result = async {
            let (mut send, mut recv) = within("open_bi", conn.open_bi())
                .await
                .map_err(|e| format!("open_bi: {e}"))?;
            within("write", send.write_all(PAYLOAD))
                .await
                .map_err(|e| format!("write: {e}"))?;
            send.finish().map_err(|e| format!("finish: {e}"))?;
            within("read", recv.read_to_end(1 << 20))
                .await
                .map_err(|e| format!("read: {e}"))
        }
        .await;
        conn.close(0u32.into(), b"done");
        result
    }

    async fn next_seen(server: &mut Server) -> Seen {
        within("server report", server.seen.recv())
            .await
            .expect("server task alive")
    }

    fn setup() -> (CertAuthority, Issued) {
        let ca = CertAuthority::generate("fedquic test CA").expect("CA");
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .expect("server cert");
        (ca, server)
    }

    /// A refused client: no application data may come back, the server
    /// reports a failed handshake, and an honest client still gets through.
    async fn assert_refused(server: &mut Server, ca: &CertAuthority, bad: quinn::Endpoint) {
        let result = round_trip(&bad, server.addr).await;
        assert!(result.is_err(), "refused client got data back: {result:?}");
        match next_seen(server).await {
            Seen::Refused(reason) => assert!(!reason.is_empty()),
            other => panic!("server admitted the client: {other:?}"),
        }
        let honest = ca.issue_client("honest").expect("client");
        let good = client(ca.cert_pem(), Some(&honest));
        let echoed = round_trip(&good, server.addr).await.expect("honest client");
        assert_eq!(echoed, PAYLOAD);
        assert_eq!(
            next_seen(server).await,
            Seen::Admitted(Some("honest".into()))
        );
    }

    /// On loopback (MTU 65,536) path-MTU discovery must climb to
    /// MAX_UDP_PAYLOAD, and a transfer with full GSO batches of that size
    /// must arrive whole (a batch over 64 KiB would be dropped silently).
    #[tokio::test]
    async fn loopback_discovers_large_datagrams() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let client_cert = ca.issue_client("client-001").expect("client");
        let endpoint = client(ca.cert_pem(), Some(&client_cert));
        let conn = within(
            "handshake",
            endpoint.connect(server.addr, "localhost").expect("connect"),
        )
        .await
        .expect("handshake");
        let mut mtu = conn.stats().path.current_mtu;
        for _ in 0..500 {
            if mtu >= MAX_UDP_PAYLOAD {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            mtu = conn.stats().path.current_mtu;
        }
        assert_eq!(mtu, MAX_UDP_PAYLOAD, "path MTU discovery stopped short");
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        echo_whole(&conn, &mut server, &payload).await;
        let stats = conn.stats();
        assert_eq!(stats.path.current_mtu, MAX_UDP_PAYLOAD);
        // 2 MB moved in datagrams of 16 kB (about 180 with the ACKs): at
        // 6.5 kB the data alone would take over 300, at 1.4 kB over 1,400.
        assert!(
            stats.udp_tx.datagrams + stats.udp_rx.datagrams < 300,
            "{} datagrams for 2 MB",
            stats.udp_tx.datagrams + stats.udp_rx.datagrams
        );
        conn.close(0u32.into(), b"done");
    }

    /// With `direct_loopback` on both ends a connection carries datagrams of
    /// MAX_UDP_PAYLOAD from its first packets after the handshake, with no
    /// discovery to wait for, and data crosses intact.
    #[tokio::test]
    async fn direct_loopback_starts_at_the_largest_datagram() {
        let (ca, server_cert) = setup();
        let loopback = TransportSettings::default().direct_loopback();
        let mut server = start_server_settings(&ca, &server_cert, &loopback);
        let client_cert = ca.issue_client("client-001").expect("client");
        let endpoint = client_settings(ca.cert_pem(), Some(&client_cert), &loopback);
        let conn = within(
            "handshake",
            endpoint.connect(server.addr, "localhost").expect("connect"),
        )
        .await
        .expect("handshake");
        assert_eq!(conn.stats().path.current_mtu, MAX_UDP_PAYLOAD);
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
        echo_whole(&conn, &mut server, &payload).await;
        assert_eq!(conn.stats().path.current_mtu, MAX_UDP_PAYLOAD);
        conn.close(0u32.into(), b"done");
    }

    #[tokio::test]
    async fn mutual_tls_round_trip_and_peer_name() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let client_cert = ca.issue_client("client-001").expect("client");
        let endpoint = client(ca.cert_pem(), Some(&client_cert));
        let echoed = round_trip(&endpoint, server.addr)
            .await
            .expect("round trip");
        assert_eq!(echoed, PAYLOAD);
        assert_eq!(
            next_seen(&mut server).await,
            Seen::Admitted(Some("client-001".into()))
        );
        // Several clients in a row on the same server.
        for i in 2..5 {
            let name = pki::client_name(i);
            let cert = ca.issue_client(&name).expect("client");
            let endpoint = client(ca.cert_pem(), Some(&cert));
            assert_eq!(
                round_trip(&endpoint, server.addr)
                    .await
                    .expect("round trip"),
                PAYLOAD
            );
            assert_eq!(next_seen(&mut server).await, Seen::Admitted(Some(name)));
        }
    }

    #[tokio::test]
    async fn files_written_by_init_dir_and_add_client_work_end_to_end() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = pki::PkiDirs::new(&tmp.path().join("certs"), None);
        let dir = dirs.certs.as_path();
        pki::init_dir(&dirs, &["localhost".into()], 1, false).expect("init");
        pki::add_client(&dirs, "late-joiner").expect("add");
        let roots = || tls::load_ca_file(&dir.join("ca.pem")).expect("roots");
        let server_id = Identity::from_files(&dir.join("server.pem"), &dir.join("server.key"))
            .expect("server identity");
        let config =
            server_config(roots(), server_id, &TransportSettings::default()).expect("config");
        let endpoint =
            server_endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let accept = endpoint.clone();
        let names = tokio::spawn(async move {
            let mut names = Vec::new();
            for _ in 0..2 {
                let Some(incoming) = accept.accept().await else {
                    break;
                };
                if let Ok(conn) = incoming.await {
                    names.push(peer_name(&conn));
                    if let Ok((mut send, mut recv)) = conn.accept_bi().await
                        && let Ok(data) = recv.read_to_end(1024).await
                    {
                        let _ = send.write_all(&data).await;
                        let _ = send.finish();
                        conn.closed().await;
                    }
                }
            }
            names
        });
        for name in ["client-001", "late-joiner"] {
            // Exactly what a device receives: its bundle.
            let [ca, cert, key] = dirs.client_files(name);
            let id = Identity::from_files(&cert, &key).expect("client identity");
            let roots = tls::load_ca_file(&ca).expect("bundle roots");
            let config =
                client_config(roots, Some(id), &TransportSettings::default()).expect("config");
            let client = client_endpoint(config).expect("client endpoint");
            assert_eq!(round_trip(&client, addr).await.expect(name), PAYLOAD);
        }
        let names = within("server", names).await.expect("server task");
        assert_eq!(
            names,
            vec![
                Some("client-001".to_string()),
                Some("late-joiner".to_string())
            ]
        );
        endpoint.close(0u32.into(), b"");
    }

    #[tokio::test]
    async fn revocations_reloaded_at_run_time_apply_to_new_connections() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = pki::PkiDirs::new(&tmp.path().join("certs"), None);
        pki::init_dir(&dirs, &["localhost".into()], 2, false).expect("init");
        let (config, reloader) = tls::server_config_reloadable(
            tls::load_ca_file(&dirs.certs.join("ca.pem")).expect("roots"),
            Identity::from_files(
                &dirs.certs.join("server.pem"),
                &dirs.certs.join("server.key"),
            )
            .expect("server identity"),
            Vec::new(),
            &TransportSettings::default(),
        )
        .expect("config");
        let mut server = start_server_with(config);
        let client_of = |name: &str| {
            let [ca, cert, key] = dirs.client_files(name);
            let id = Identity::from_files(&cert, &key).expect("identity");
            let config = client_config(
                tls::load_ca_file(&ca).expect("roots"),
                Some(id),
                &TransportSettings::default(),
            )
            .expect("config");
            client_endpoint(config).expect("endpoint")
        };
        let revoked = client_of("client-001");
        assert_eq!(
            round_trip(&revoked, server.addr).await.expect("before"),
            PAYLOAD
        );
        assert_eq!(
            next_seen(&mut server).await,
            Seen::Admitted(Some("client-001".into()))
        );

        let crl = pki::revoke(&dirs, "client-001").expect("revoke");
        assert_eq!(reloader.reload_file(&crl).expect("reload").crls, 1);
        // A new connection by the revoked client fails; a fresh endpoint
        // each time, so no TLS session state could carry it through.
        let result = round_trip(&client_of("client-001"), server.addr).await;
        assert!(result.is_err(), "revoked client got data back: {result:?}");
        assert!(matches!(next_seen(&mut server).await, Seen::Refused(_)));
        // The same endpoint that connected before is refused too (no resumption).
        assert!(round_trip(&revoked, server.addr).await.is_err());
        assert!(matches!(next_seen(&mut server).await, Seen::Refused(_)));
        let other = client_of("client-002");
        assert_eq!(
            round_trip(&other, server.addr).await.expect("others"),
            PAYLOAD
        );
        assert_eq!(
            next_seen(&mut server).await,
            Seen::Admitted(Some("client-002".into()))
        );

        // A broken CRL file is refused and the lists in force stay.
        std::fs::write(&crl, "").expect("truncate");
        assert!(reloader.reload_file(&crl).is_err());
        assert!(
            round_trip(&client_of("client-001"), server.addr)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let bad = client(ca.cert_pem(), None);
        assert_refused(&mut server, &ca, bad).await;
    }

    #[tokio::test]
    async fn client_with_certificate_from_another_ca_is_refused() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let rogue_ca = CertAuthority::generate("fedquic test CA").expect("rogue CA");
        let rogue = rogue_ca.issue_client("client-001").expect("rogue client");
        // The rogue client trusts the real server, so only its own
        // certificate can be the reason for the refusal.
        let bad = client(ca.cert_pem(), Some(&rogue));
        assert_refused(&mut server, &ca, bad).await;
    }

    #[tokio::test]
    async fn expired_client_certificate_is_refused() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let now = SystemTime::now();
        let expired = ca
            .issue_client_with_validity(
                "client-001",
                now - Duration::from_secs(10 * 24 * 3600),
                now - Duration::from_secs(24 * 3600),
            )
            .expect("expired client");
        let bad = client(ca.cert_pem(), Some(&expired));
        assert_refused(&mut server, &ca, bad).await;
    }

    #[tokio::test]
    async fn server_certificate_as_client_certificate_is_refused() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        // Signed by the right CA but without the clientAuth usage.
        let bad = client(ca.cert_pem(), Some(&server_cert));
        assert_refused(&mut server, &ca, bad).await;
    }

    #[tokio::test]
    async fn client_checking_against_the_wrong_ca_fails_to_connect() {
        let (ca, server_cert) = setup();
        let mut server = start_server(&ca, &server_cert);
        let client_cert = ca.issue_client("client-001").expect("client");
        let other_ca = CertAuthority::generate("fedquic test CA").expect("other CA");
        let endpoint = client(other_ca.cert_pem(), Some(&client_cert));
        let connecting = endpoint.connect(server.addr, "localhost").expect("connect");
        let result = within("handshake", connecting).await;
        let err = result.expect_err("client accepted a server from another CA");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "unexpected error: {err}"
        );
        // The server keeps serving honest clients.
        let good = client(ca.cert_pem(), Some(&client_cert));
        assert_eq!(
            round_trip(&good, server.addr).await.expect("honest"),
            PAYLOAD
        );
        loop {
            if next_seen(&mut server).await == Seen::Admitted(Some("client-001".into())) {
                break;
            }
        }
    }

    #[tokio::test]
    async fn wrong_server_name_fails_to_connect() {
        let (ca, server_cert) = setup();
        let server = start_server(&ca, &server_cert);
        let client_cert = ca.issue_client("client-001").expect("client");
        let endpoint = client(ca.cert_pem(), Some(&client_cert));
        let connecting = endpoint
            .connect(server.addr, "aggregator.example")
            .expect("connect");
        assert!(within("handshake", connecting).await.is_err());
    }

    #[tokio::test]
    async fn binding_a_used_address_names_it() {
        let (ca, server_cert) = setup();
        let server = start_server(&ca, &server_cert);
        let roots = load_ca_pem(ca.cert_pem()).expect("roots");
        let id = Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem).expect("id");
        let config = server_config(roots, id, &TransportSettings::default()).expect("config");
        let err = server_endpoint(server.addr, config).expect_err("address in use");
        assert!(matches!(err, EndpointError::AddrInUse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&server.addr.to_string()), "{text}");
        assert!(text.contains("already in use"), "{text}");
    }

    #[test]
    fn endpoints_need_a_runtime() {
        let (ca, _) = setup();
        let roots = load_ca_pem(ca.cert_pem()).expect("roots");
        let config = client_config(roots, None, &TransportSettings::default()).expect("config");
        assert!(matches!(
            client_endpoint(config),
            Err(EndpointError::NoRuntime)
        ));
    }
}
