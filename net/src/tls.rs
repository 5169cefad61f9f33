//! Mutual TLS 1.3 configurations for quinn (rustls with the ring provider),
//! and helpers to read identities out of certificates.
//!
//! The aggregator requires a client certificate signed by the federation's
//! CA; a client verifies the aggregator against the same CA. The ALPN
//! protocol is [`ALPN`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::congestion::CubicConfig;
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
/// The trust store `load_ca_pem` returns and the config builders take.
pub use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::VerifierBuilderError;
use x509_parser::extensions::GeneralName;

use crate::revocation::{CrlReloader, ReloadableClientVerifier};

/// The application protocol negotiated with ALPN.
pub const ALPN: &[u8] = b"fedquic/1";

/// Errors of TLS material loading and configuration building.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PEM in {what}: {source}")]
    Pem {
        what: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("invalid CA certificate: {0}")]
    InvalidCa(#[source] rustls::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    #[error("invalid transport setting: {0}")]
    Transport(String),
    #[error("cannot parse certificate: {0}")]
    Certificate(String),
    #[error("certificate has neither a common name nor a DNS name")]
    NoName,
    #[error("certificate revocation list refused: {0}")]
    CrlRefused(String),
    #[error("{} holds no certificate revocation list (an empty or truncated file is refused: a CRL that revokes nothing would pass unnoticed)", .0.display())]
    EmptyCrl(PathBuf),
}

fn read(path: &Path) -> Result<String, TlsError> {
    crate::files::read_text_bounded(path, crate::files::MAX_PEM_BYTES).map_err(|source| {
        TlsError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_owned()));
    }
    Ok(certs)
}

/// A certificate chain (end entity first) and its private key.
pub struct Identity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name().ok())
            .field("chain_len", &self.cert_chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Identity {
    /// Parses a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1
    /// or SEC1).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let cert_chain = parse_certs(cert_pem, "certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem {
                what: "private key".to_owned(),
                source,
            })?;
        Ok(Self { cert_chain, key })
    }

    /// Reads a PEM certificate chain and private key from files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let cert_chain = parse_certs(&cert_pem, &cert.display().to_string())?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem {
                what: key.display().to_string(),
                source,
            })?;
        Ok(Self { cert_chain, key })
    }

    /// The name ([`cert_name`]) of the end-entity certificate.
    pub fn name(&self) -> Result<String, TlsError> {
        let leaf = self
            .cert_chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate("identity".into()))?;
        cert_name(leaf)
    }
}

/// Builds a root store from every certificate of a PEM text.
pub fn load_ca_pem(pem: &str) -> Result<RootCertStore, TlsError> {
    load_ca(pem, "CA certificate")
}

/// Builds a root store from a PEM file.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    load_ca(&read(path)?, &path.display().to_string())
}

fn load_ca(pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in parse_certs(pem, what)? {
        roots.add(der).map_err(TlsError::InvalidCa)?;
    }
    Ok(roots)
}

/// QUIC transport tuning shared by the aggregator and the clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// Interval of keep-alive packets (zero disables them).
    pub keep_alive: Duration,
    /// A connection silent for this long is closed (zero: never).
    pub idle_timeout: Duration,
    /// Unidirectional streams the peer may have open at once.
    pub max_concurrent_uni_streams: u32,
    /// Bidirectional streams the peer may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// Bytes a peer may send on one stream ahead of the reader.
    pub stream_receive_window: u64,
    /// Bytes a peer may send on the whole connection ahead of the reader.
    pub receive_window: u64,
    /// Bytes this side keeps in flight/buffered for sending on a connection.
    pub send_window: u64,
    /// The UDP payload size a connection starts with, before MTU discovery:
    /// QUIC's safe 1,200 ([`MIN_INITIAL_MTU`]) unless both ends are known to
    /// share this host with nothing in between (see
    /// [`TransportSettings::direct_loopback`]). A size the path cannot carry
    /// loses the handshake's packets, so this is never guessed.
    pub initial_mtu: u16,
}

/// QUIC's smallest datagram payload, which every path must carry: the size
/// a connection starts with unless it is known to be on loopback.
pub const MIN_INITIAL_MTU: u16 = 1_200;

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_uni_streams: 8,
            max_concurrent_bidi_streams: 2,
            // Multi-MB models: one stream can fill a fast link without
            // stalling on flow control, yet a connection is bounded.
            stream_receive_window: 16 << 20,
            receive_window: 32 << 20,
            send_window: 32 << 20,
            initial_mtu: MIN_INITIAL_MTU,
        }
    }
}

impl TransportSettings {
    /// The aggregator's settings: small per-stream receive windows, so that
    /// uploads waiting for an update buffer are held back by QUIC flow
    /// control at the clients instead of piling up in the aggregator's
    /// memory (1 MiB per stream is ample on low-latency links; raise it for
    /// links with a large bandwidth-delay product).
    pub fn aggregator() -> Self {
        TransportSettings {
            stream_receive_window: 1 << 20,
            receive_window: 2 << 20,
            ..Self::default()
        }
    }

    /// These settings for a connection whose two ends are on this host and
    /// talk over loopback directly (no relay, tunnel or shaped link between
    /// them): it starts at [`crate::endpoint::MAX_UDP_PAYLOAD`] instead of
    /// 1,200 bytes. Loopback's MTU (64 KiB) is known, as TCP knows it, so
    /// the first rounds do not wait for MTU discovery, which takes about 10
    /// probe round trips per connection and direction and only probes while
    /// the connection has nothing else to send. The simulator and the
    /// overhead benchmark use it; a daemon cannot know what lies behind a
    /// loopback address (a local UDP tunnel, say) and does not.
    pub fn direct_loopback(self) -> Self {
        TransportSettings {
            initial_mtu: crate::endpoint::MAX_UDP_PAYLOAD,
            ..self
        }
    }
}

/// The congestion window a connection starts with: room for an MTU probe and
/// two full datagrams of [`crate::endpoint::MAX_UDP_PAYLOAD`] (see
/// `transport_config`). On a path of Ethernet's MTU that is 32 datagrams in
/// the first round trip instead of 10, paced by quinn over the round trip.
pub const INITIAL_WINDOW: u64 = 3 * crate::endpoint::MAX_UDP_PAYLOAD as u64;

fn varint(value: u64, what: &str) -> Result<VarInt, TlsError> {
    VarInt::from_u64(value).map_err(|_| TlsError::Transport(format!("{what} {value} is too large")))
}

impl TransportSettings {
    /// The quinn transport configuration for these settings.
    pub fn transport_config(&self) -> Result<TransportConfig, TlsError> {
        let mut config = TransportConfig::default();
        // Keep-alives must come well within the idle timeout, or a quiet
        // connection (between rounds) would time out.
        let keep_alive = if self.idle_timeout.is_zero() {
            self.keep_alive
        } else {
            self.keep_alive.min(self.idle_timeout / 3)
        };
        config.keep_alive_interval((!keep_alive.is_zero()).then_some(keep_alive));
        let idle = if self.idle_timeout.is_zero() {
            None
        } else {
            Some(IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
                TlsError::Transport(format!("idle timeout {:?} is too large", self.idle_timeout))
            })?)
        };
        config.max_idle_timeout(idle);
        config.max_concurrent_uni_streams(self.max_concurrent_uni_streams.into());
        config.max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into());
        config.stream_receive_window(varint(self.stream_receive_window, "stream receive window")?);
        config.receive_window(varint(self.receive_window, "receive window")?);
        config.send_window(self.send_window);
        // Discovery only climbs as far as the peer's advertised maximum and
        // the path allow; see MAX_UDP_PAYLOAD for why this bound.
        let mut mtu_discovery = MtuDiscoveryConfig::default();
        mtu_discovery.upper_bound(crate::endpoint::MAX_UDP_PAYLOAD);
        config.mtu_discovery_config(Some(mtu_discovery));
        if !(MIN_INITIAL_MTU..=crate::endpoint::MAX_UDP_PAYLOAD).contains(&self.initial_mtu) {
            return Err(TlsError::Transport(format!(
                "initial MTU {} is outside {MIN_INITIAL_MTU}..={}",
                self.initial_mtu,
                crate::endpoint::MAX_UDP_PAYLOAD
            )));
        }
        config.initial_mtu(self.initial_mtu);
        // quinn 0.11 never sends CONNECTION_CLOSE while the congestion window
        // is full (quinn issue 2785, fixed after 0.11.19), and the peer then
        // waits out its idle timeout. Discovery's probes of up to
        // MAX_UDP_PAYLOAD bytes filled the default 14,720-byte initial window
        // at the start of one connection in about 25, right when a client that
        // refuses the model closes. The window holds an in-flight probe, one
        // more datagram of the largest size and the close.
        let mut cubic = CubicConfig::default();
        cubic.initial_window(INITIAL_WINDOW);
        config.congestion_controller_factory(Arc::new(cubic));
        Ok(config)
    }
}

/// ring's provider with TLS 1.3's AES-128-GCM first. ring lists AES-256-GCM first, and
/// a rustls server follows the client's order, so every connection paid AES-256's 14
/// rounds per block instead of 10 on the bulk of the traffic (the model and the
/// updates). AES-128 keeps a 128-bit security level and is what QUIC's initial packets
/// use anyway; ChaCha20-Poly1305 stays for CPUs without AES instructions.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The aggregator's configuration: TLS 1.3 only, a client certificate
/// signed by one of `roots` is required, ALPN [`ALPN`].
pub fn server_config(
    roots: RootCertStore,
    identity: Identity,
    transport: &TransportSettings,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with_crls(roots, identity, Vec::new(), transport)
}

/// [`server_config`] that also refuses client certificates listed in any of
/// `crls` (certificate revocation lists signed by the CA).
pub fn server_config_with_crls(
    roots: RootCertStore,
    identity: Identity,
    crls: Vec<CertificateRevocationListDer<'static>>,
    transport: &TransportSettings,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_reloadable(roots, identity, crls, transport).map(|(config, _)| config)
}

/// Most connection attempts quinn queues for the accept loop; beyond this
/// it refuses them itself (the accept loop screens each in microseconds,
/// see [`crate::admission`]).
pub const MAX_QUEUED_INCOMING: usize = 4096;

/// [`server_config_with_crls`] plus a handle that replaces the CRLs while
/// the server runs and closes connections whose certificates they revoke.
/// The CRLs are checked against the CA (see [`crate::revocation`]).
pub fn server_config_reloadable(
    roots: RootCertStore,
    identity: Identity,
    crls: Vec<CertificateRevocationListDer<'static>>,
    transport: &TransportSettings,
) -> Result<(quinn::ServerConfig, CrlReloader), TlsError> {
    let provider = provider();
    let verifier = ReloadableClientVerifier::new(roots, Arc::clone(&provider), crls)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(identity.cert_chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed session skips the client
    // certificate check, so a client revoked (and the CRL reloaded) after
    // it first connected could come back on its ticket. Full handshakes
    // cost ~2 ms and clients connect once per run.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.transport_config()?));
    // quinn's defaults (65,536 queued attempts, 100 MiB of their buffered
    // packets) are sized for busy web servers; a federation needs far less.
    config
        .max_incoming(MAX_QUEUED_INCOMING)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(8 << 20);
    Ok((config, CrlReloader(verifier)))
}

/// A client's configuration: TLS 1.3 only, the server must present a
/// certificate signed by one of `roots`, ALPN [`ALPN`]. `identity` is the
/// client certificate (`None` sends none, which the aggregator refuses).
pub fn client_config(
    roots: RootCertStore,
    identity: Option<Identity>,
    transport: &TransportSettings,
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.cert_chain, identity.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.transport_config()?));
    Ok(config)
}

/// The peer's identity as seen over `conn`: the [`cert_name`] of the
/// end-entity certificate it presented. `None` when it presented none (a
/// client connection whose server sent no certificate cannot exist) or the
/// certificate carries no usable name.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    cert_name(peer_certificates(conn)?.first()?).ok()
}

/// The certificate chain the peer presented over `conn`, end entity first.
pub(crate) fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|chain| *chain)
}

fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| TlsError::Certificate(e.to_string()))
}

/// The name of a certificate: its subject common name, else its first DNS
/// subject alternative name.
pub fn cert_name(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let cert = parse_x509(der)?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|attr| attr.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Ok(cn.to_owned());
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    san.and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some((*dns).to_owned()),
            _ => None,
        })
    })
    .ok_or(TlsError::NoName)
}

fn unix_to_system(secs: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// The end of a certificate's validity period.
pub fn cert_not_after(der: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let secs = parse_x509(der)?.validity().not_after.timestamp();
    unix_to_system(secs).ok_or_else(|| TlsError::Certificate("notAfter out of range".into()))
}

/// The start of a certificate's validity period.
pub fn cert_not_before(der: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let secs = parse_x509(der)?.validity().not_before.timestamp();
    unix_to_system(secs).ok_or_else(|| TlsError::Certificate("notBefore out of range".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertAuthority;

    #[test]
    fn names_and_dates_are_read_from_certificates() {
        let ca = CertAuthority::generate("names CA").expect("CA");
        let client = ca.issue_client("client-042").expect("client");
        let id = Identity::from_pem(&client.cert_pem, &client.key_pem).expect("identity");
        assert_eq!(cert_name(&id.cert_chain[0]).expect("name"), "client-042");
        assert_eq!(id.name().expect("name"), "client-042");
        assert_eq!(id.clone().name().expect("name"), "client-042");
        assert!(!format!("{id:?}").contains("PRIVATE"));

        let now = SystemTime::now();
        let start = now - Duration::from_secs(3 * 24 * 3600);
        let end = now - Duration::from_secs(24 * 3600);
        let expired = ca
            .issue_client_with_validity("old", start, end)
            .expect("expired");
        let der = &Identity::from_pem(&expired.cert_pem, &expired.key_pem)
            .expect("identity")
            .cert_chain[0];
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("epoch").as_secs();
        assert_eq!(secs(cert_not_after(der).expect("not after")), secs(end));
        assert_eq!(secs(cert_not_before(der).expect("not before")), secs(start));

        let server = ca.issue_server(&["10.0.0.1".into()]).expect("server");
        let der = &Identity::from_pem(&server.cert_pem, &server.key_pem)
            .expect("identity")
            .cert_chain[0];
        assert_eq!(cert_name(der).expect("name"), "10.0.0.1");
    }

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // Nothing dropped: AES-256 and ChaCha20 still follow.
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert!(suites.contains(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    }

    #[test]
    fn bad_pem_is_a_typed_error() {
        assert!(matches!(
            load_ca_pem("nothing here"),
            Err(TlsError::NoCertificate(_))
        ));
        let ca = CertAuthority::generate("x").expect("CA");
        assert!(Identity::from_pem(ca.cert_pem(), "no key").is_err());
        assert!(matches!(
            Identity::from_pem("", ca.key_pem()),
            Err(TlsError::NoCertificate(_))
        ));
        let err = Identity::from_files(Path::new("/nonexistent/c.pem"), Path::new("/x.key"))
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
        assert!(cert_name(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    #[test]
    fn configs_build_with_default_and_custom_transport() {
        let ca = CertAuthority::generate("cfg CA").expect("CA");
        let server = ca.issue_server(&["localhost".into()]).expect("server");
        let id = Identity::from_pem(&server.cert_pem, &server.key_pem).expect("id");
        let roots = || load_ca_pem(ca.cert_pem()).expect("roots");
        let settings = TransportSettings::default();
        server_config(roots(), id.clone(), &settings).expect("server config");
        client_config(roots(), Some(id.clone()), &settings).expect("client config");
        client_config(roots(), None, &settings).expect("client config");
        let zero = TransportSettings {
            keep_alive: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            ..settings.clone()
        };
        zero.transport_config().expect("zero timeouts");
        let huge = TransportSettings {
            stream_receive_window: u64::MAX,
            ..settings
        };
        assert!(matches!(
            huge.transport_config(),
            Err(TlsError::Transport(_))
        ));
        for initial_mtu in [1_199, crate::endpoint::MAX_UDP_PAYLOAD + 1] {
            let bad = TransportSettings {
                initial_mtu,
                ..TransportSettings::default()
            };
            assert!(
                matches!(bad.transport_config(), Err(TlsError::Transport(_))),
                "initial MTU {initial_mtu} accepted"
            );
        }
        TransportSettings::default()
            .direct_loopback()
            .transport_config()
            .expect("loopback settings");
        // A key that does not match the certificate is refused.
        let other = ca.issue_server(&["localhost".into()]).expect("server");
        let mismatched = Identity::from_pem(&server.cert_pem, &other.key_pem).expect("id");
        assert!(server_config(roots(), mismatched, &TransportSettings::default()).is_err());
    }
}
