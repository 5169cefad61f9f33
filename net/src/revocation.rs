//! Certificate revocation on the aggregator.
//!
//! - CRL files ([`load_crl_file`]), checked against the trusted CA before
//!   they are installed: each CRL must be issued and signed by the CA, carry
//!   a CRL number, and a reload may not go back to a lower number (an old
//!   copy would un-revoke certificates).
//! - A client-certificate verifier whose CRLs are replaced while the server
//!   runs (on SIGHUP): each handshake uses the lists current when it starts.
//! - The live connections ([`CrlReloader::watch`]): a reload checks their
//!   certificates again and closes those that no longer verify, and each is
//!   closed when its certificate expires. A revoked client is out at the
//!   reload, not when it next reconnects.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::warn;
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::files::MAX_CRL_BYTES;
use crate::tls::{TlsError, cert_name, cert_not_after};

/// The QUIC application close code of a connection closed because its
/// client certificate was revoked (at a CRL reload) or expired: final, a
/// client stops.
pub const CERTIFICATE_CLOSE_CODE: u32 = 4;
/// The close code of a connection whose certificate stopped verifying for
/// another reason at a reload (a client may try again).
pub const CERTIFICATE_UNVERIFIED_CLOSE_CODE: u32 = 5;

/// TLS alerts (RFC 8446) a server sends when it refuses a client's
/// certificate for good: `certificate_revoked` and `certificate_expired`.
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;

/// Whether `error` says the peer refused this side's certificate for good:
/// revoked or expired, by a TLS alert (a QUIC crypto error) or by
/// [`CERTIFICATE_CLOSE_CODE`]. Returns why (the peer's reason, made
/// printable and short). Another attempt with the same certificate cannot
/// succeed, so a client stops instead of reconnecting.
///
/// Only for errors of an established connection: before the handshake
/// completes, a close can come in Initial packets, whose keys anyone on the
/// path can derive, so a forged one would stop an honest client. With TLS
/// 1.3 the server judges the client's certificate after the client's
/// handshake is complete, so its genuine verdict arrives authenticated.
pub fn certificate_refused(error: &quinn::ConnectionError) -> Option<String> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == CERTIFICATE_CLOSE_CODE.into() =>
        {
            let reason: String = String::from_utf8_lossy(&close.reason)
                .chars()
                .filter(|c| !c.is_control())
                .take(80)
                .collect();
            Some(if reason.is_empty() {
                "certificate refused".to_owned()
            } else {
                reason
            })
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::crypto(ALERT_CERTIFICATE_REVOKED) =>
        {
            Some("certificate revoked".to_owned())
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::crypto(ALERT_CERTIFICATE_EXPIRED) =>
        {
            // rustls sends this alert for a certificate not valid yet too.
            Some("certificate expired or not yet valid".to_owned())
        }
        _ => None,
    }
}

/// Longest single wait of the expiry timer: tokio's timers do not reach
/// years ahead, and the wall clock may be set while a connection lives.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Reads every CRL in a PEM file (as written by [`crate::pki::revoke`]), at
/// most [`MAX_CRL_BYTES`]. A file without any CRL is an error: it can only be
/// a mistake (an empty or truncated write, a wrong file), and loading it
/// would silently un-revoke everyone. The CRLs are checked against the CA
/// when a server installs them.
pub fn load_crl_file(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = crate::files::read_bounded(path, MAX_CRL_BYTES).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: format!("certificate revocation list {}", path.display()),
            source,
        })?;
    if crls.is_empty() {
        return Err(TlsError::EmptyCrl(path.to_path_buf()));
    }
    Ok(crls)
}

/// Per issuing CA (the issuer's DER name), the CRL number in force and the
/// CRL itself.
type CrlNumbers = HashMap<Vec<u8>, (BigUint, Vec<u8>)>;

/// `contents` as a DER SEQUENCE: webpki keeps a trust anchor's subject and
/// key without their outer SEQUENCE, x509-parser wants them whole.
fn der_sequence(contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut der = vec![0x30];
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        der.push(0x80 | (bytes.len() - skip) as u8);
        der.extend_from_slice(&bytes[skip..]);
    }
    der.extend_from_slice(contents);
    der
}

/// Checks CRLs against the trusted CAs: each parses, is issued by one of
/// them, is signed by its key, carries a CRL number, and no CA has two.
/// Returns each issuer's CRL number.
fn check_crls(
    roots: &RootCertStore,
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<CrlNumbers, TlsError> {
    let mut numbers = CrlNumbers::new();
    for (i, der) in crls.iter().enumerate() {
        let refused =
            |why: String| TlsError::CrlRefused(format!("CRL {} of {}: {why}", i + 1, crls.len()));
        let (rest, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| refused(format!("cannot parse it: {e}")))?;
        if !rest.is_empty() {
            return Err(refused("trailing bytes after it".into()));
        }
        let issuer = crl.issuer().as_raw();
        let mut named = roots
            .roots
            .iter()
            .filter(|anchor| der_sequence(anchor.subject.as_ref()) == issuer);
        let anchor = named.next().ok_or_else(|| {
            refused(format!(
                "issued by \"{}\", which is not the trusted CA",
                crl.issuer()
            ))
        })?;
        // webpki takes the first CRL of a certificate's issuer name and checks
        // it with that issuer's key: with two trusted CAs of one name, one
        // CA's CRL would fail every certificate of the other.
        if named.next().is_some() {
            return Err(refused(format!(
                "several trusted CAs are named \"{}\": their CRLs cannot be told apart; \
                 trust one of them",
                crl.issuer()
            )));
        }
        let spki_der = der_sequence(anchor.subject_public_key_info.as_ref());
        let (_, spki) = SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| refused(format!("cannot read the CA's public key: {e}")))?;
        crl.verify_signature(&spki).map_err(|e| {
            refused(format!(
                "its signature does not verify with the CA's key ({e})"
            ))
        })?;
        let number = crl.crl_number().cloned().ok_or_else(|| {
            refused(
                "it has no CRL number, so an older list could replace a newer one unnoticed".into(),
            )
        })?;
        if numbers
            .insert(issuer.to_vec(), (number, der.as_ref().to_vec()))
            .is_some()
        {
            return Err(refused(
                "a second CRL from the same CA: keep exactly one, the newest".into(),
            ));
        }
    }
    // With any CRL, rustls refuses certificates whose revocation status is
    // unknown: a trusted CA without a CRL would lock all its clients out.
    if !crls.is_empty() {
        for anchor in &roots.roots {
            let subject = der_sequence(anchor.subject.as_ref());
            if !numbers.contains_key(&subject) {
                let name = x509_parser::x509::X509Name::from_der(&subject)
                    .map(|(_, name)| name.to_string())
                    .unwrap_or_default();
                return Err(TlsError::CrlRefused(format!(
                    "the trusted CA \"{name}\" has no CRL: with revocation checked, all its \
                     clients would be refused; give every trusted CA a CRL"
                )));
            }
        }
    }
    Ok(numbers)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection whose client certificate is checked again at each reload.
#[derive(Debug)]
struct Watched {
    conn: quinn::Connection,
    /// The certificate chain the client presented, end entity first.
    chain: Vec<CertificateDer<'static>>,
}

#[derive(Debug, Default)]
struct LiveConnections {
    next_id: u64,
    by_id: HashMap<u64, Watched>,
}

/// A client-certificate verifier whose revocation lists can be replaced
/// while the server runs. The trusted CA does not change.
#[derive(Debug)]
pub(crate) struct ReloadableClientVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    root_hints: Vec<DistinguishedName>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// The CRL numbers in force; reloads take turns on this lock.
    numbers: Mutex<CrlNumbers>,
    live: Mutex<LiveConnections>,
    /// Reloads so far: a connection whose handshake started before one may
    /// have passed it under the lists before it (see [`HandshakeStart`]).
    reloads: AtomicU64,
}

impl ReloadableClientVerifier {
    /// A verifier trusting `roots` and refusing what `crls` revoke (none
    /// when empty: a server without a CRL file).
    pub(crate) fn new(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<Self>, TlsError> {
        let numbers = check_crls(&roots, &crls)?;
        let roots = Arc::new(roots);
        let initial = Self::build(&roots, &provider, crls)?;
        Ok(Arc::new(Self {
            root_hints: initial.root_hint_subjects().to_vec(),
            roots,
            provider,
            current: RwLock::new(initial),
            numbers: Mutex::new(numbers),
            live: Mutex::default(),
            reloads: AtomicU64::new(0),
        }))
    }

    fn build(
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        Ok(
            WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider))
                .with_crls(crls)
                .build()?,
        )
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Checks every live connection's certificate with `verifier` and
    /// closes those that fail. Returns the names of the closed ones.
    fn recheck(&self, verifier: &Arc<dyn ClientCertVerifier>) -> Vec<String> {
        let watched: Vec<_> = lock(&self.live)
            .by_id
            .values()
            .map(|w| (w.conn.clone(), w.chain.clone()))
            .collect();
        let now = UnixTime::now();
        watched
            .iter()
            .filter_map(|(conn, chain)| close_unless_valid(verifier.as_ref(), conn, chain, now))
            .collect()
    }
}

/// Closes `conn` unless `verifier` accepts its client certificate `chain`
/// at `now`; returns the closed client's name.
fn close_unless_valid(
    verifier: &dyn ClientCertVerifier,
    conn: &quinn::Connection,
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Option<String> {
    let verdict = match chain.split_first() {
        Some((leaf, intermediates)) => verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ()),
        None => Err(rustls::Error::NoCertificatesPresented),
    };
    let error = verdict.err()?;
    let name = chain
        .first()
        .and_then(|leaf| cert_name(leaf).ok())
        .unwrap_or_else(|| "(unnamed)".to_owned());
    warn!(
        client = %name,
        remote = %conn.remote_address(),
        %error,
        "closing a connection: its client certificate no longer verifies"
    );
    // Only revocation and expiry are final for the client; anything else
    // (a CA without a CRL, say) may be the operator's to fix.
    let (code, reason): (u32, &[u8]) = match &error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
            (CERTIFICATE_CLOSE_CODE, b"certificate revoked")
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        ) => (CERTIFICATE_CLOSE_CODE, b"certificate expired"),
        _ => (
            CERTIFICATE_UNVERIFIED_CLOSE_CODE,
            b"certificate no longer verifies",
        ),
    };
    conn.close(code.into(), reason);
    Some(name)
}

impl ClientCertVerifier for ReloadableClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// CRLs now in force.
    pub crls: usize,
    /// Names of the connected clients closed because their certificate no
    /// longer verifies.
    pub closed: Vec<String>,
}

/// Replaces the revocation lists of a running server's client-certificate
/// verifier (see [`crate::tls::server_config_reloadable`]) and watches its
/// connections. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CrlReloader(pub(crate) Arc<ReloadableClientVerifier>);

impl CrlReloader {
    /// Installs `crls` after checking them against the CA (issuer,
    /// signature, a CRL number not lower than the one in force, one CRL per
    /// CA, none dropped); new handshakes use them, and every watched
    /// connection whose certificate they revoke is closed. On any error the
    /// lists in force stay.
    pub fn reload(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Reloaded, TlsError> {
        let inner = &self.0;
        if crls.is_empty() {
            return Err(TlsError::CrlRefused(
                "no CRL given: an empty list would un-revoke every certificate".into(),
            ));
        }
        let mut numbers = lock(&inner.numbers);
        let fresh = check_crls(&inner.roots, &crls)?;
        for (issuer, (in_force, in_force_der)) in numbers.iter() {
            match fresh.get(issuer) {
                None => {
                    return Err(TlsError::CrlRefused(
                        "no CRL from a CA that had one: its revocations would be lost".into(),
                    ));
                }
                Some((number, _)) if number < in_force => {
                    return Err(TlsError::CrlRefused(format!(
                        "CRL number {number} is lower than the {in_force} in force: an older \
                         list would un-revoke certificates"
                    )));
                }
                Some((number, der)) if number == in_force && der != in_force_der => {
                    return Err(TlsError::CrlRefused(format!(
                        "a different CRL with the number {number} in force: a new list must \
                         have a higher number"
                    )));
                }
                Some(_) => {}
            }
        }
        let count = crls.len();
        let verifier = ReloadableClientVerifier::build(&inner.roots, &inner.provider, crls)?;
        match inner.current.write() {
            Ok(mut guard) => *guard = Arc::clone(&verifier),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&verifier),
        }
        *numbers = fresh;
        drop(numbers);
        // Before the snapshot of the live connections: one registered after
        // the snapshot sees this count and checks itself (see `watch`).
        inner.reloads.fetch_add(1, Ordering::SeqCst);
        let closed = inner.recheck(&verifier);
        Ok(Reloaded {
            crls: count,
            closed,
        })
    }

    /// [`CrlReloader::reload`] from a CRL file ([`load_crl_file`]).
    pub fn reload_file(&self, path: &Path) -> Result<Reloaded, TlsError> {
        self.reload(load_crl_file(path)?)
    }

    /// Taken before a connection's handshake starts, for
    /// [`CrlReloader::watch`].
    pub fn handshake_start(&self) -> HandshakeStart {
        HandshakeStart(self.0.reloads.load(Ordering::SeqCst))
    }

    /// Watches a connection this server accepted, whose handshake began at
    /// `started`, until the returned guard is dropped: each reload checks its client certificate again and
    /// closes it when revoked, and it is closed when the certificate
    /// expires (that timer needs a tokio runtime; outside one there is
    /// none).
    pub fn watch(&self, conn: &quinn::Connection, started: HandshakeStart) -> ConnectionWatch {
        let chain = crate::tls::peer_certificates(conn).unwrap_or_default();
        let expiry = chain
            .first()
            .and_then(|leaf| cert_not_after(leaf).ok())
            .and_then(|not_after| {
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                Some(
                    runtime
                        .spawn(close_at_expiry(conn.clone(), not_after))
                        .abort_handle(),
                )
            });
        let watch = {
            let mut live = lock(&self.0.live);
            let id = live.next_id;
            live.next_id += 1;
            live.by_id.insert(
                id,
                Watched {
                    conn: conn.clone(),
                    chain: chain.clone(),
                },
            );
            ConnectionWatch {
                verifier: Arc::clone(&self.0),
                id,
                expiry,
            }
        };
        // A reload since the handshake began may have re-checked the live
        // connections before this one was among them, and the handshake may
        // have used the lists it replaced: check against the lists in force
        // now. (Registered first, so a reload that comes later re-checks
        // it.) Without a reload since, the handshake used the lists in force
        // (a reload installs them before counting itself), and the
        // signature check (~130 us) is skipped.
        if self.0.reloads.load(Ordering::SeqCst) != started.0 {
            close_unless_valid(self.0.current().as_ref(), conn, &chain, UnixTime::now());
        }
        watch
    }

    /// Connections being watched now.
    pub fn watched(&self) -> usize {
        lock(&self.0.live).by_id.len()
    }
}

/// How many reloads there had been when a handshake started (see
/// [`CrlReloader::handshake_start`]).
#[derive(Clone, Copy, Debug)]
pub struct HandshakeStart(u64);

/// Closes `conn` once its certificate's `not_after` has passed (or returns
/// when the connection closes first).
async fn close_at_expiry(conn: quinn::Connection, not_after: SystemTime) {
    loop {
        let left = match not_after.duration_since(SystemTime::now()) {
            Ok(left) if !left.is_zero() => left,
            _ => break,
        };
        tokio::select! {
            () = tokio::time::sleep(left.min(EXPIRY_CHECK_INTERVAL)) => {}
            _ = conn.closed() => return,
        }
    }
    warn!(
        remote = %conn.remote_address(),
        "closing a connection: its client certificate expired"
    );
    conn.close(CERTIFICATE_CLOSE_CODE.into(), b"certificate expired");
}

/// Keeps a connection watched (see [`CrlReloader::watch`]); dropping it
/// stops the watch.
#[derive(Debug)]
pub struct ConnectionWatch {
    verifier: Arc<ReloadableClientVerifier>,
    id: u64,
    expiry: Option<tokio::task::AbortHandle>,
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        lock(&self.verifier.live).by_id.remove(&self.id);
        if let Some(expiry) = &self.expiry {
            expiry.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::pki::{CertAuthority, Issued, cert_serial};
    use crate::tls::{Identity, TransportSettings, load_ca_pem, server_config_reloadable};

    fn crl(
        ca: &CertAuthority,
        revoked: &[&Issued],
        number: u64,
    ) -> CertificateRevocationListDer<'static> {
        let revoked: Vec<_> = revoked
            .iter()
            .map(|issued| {
                (
                    cert_serial(&issued.cert_pem).expect("serial"),
                    SystemTime::now(),
                )
            })
            .collect();
        let pem = ca.issue_crl(&revoked, number).expect("CRL");
        CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    fn reloader_for(ca: &CertAuthority) -> (quinn::ServerConfig, CrlReloader) {
        let server = ca.issue_server(&["localhost".into()]).expect("server");
        server_config_reloadable(
            load_ca_pem(ca.cert_pem()).expect("roots"),
            Identity::from_pem(&server.cert_pem, &server.key_pem).expect("identity"),
            Vec::new(),
            &TransportSettings::default(),
        )
        .expect("config")
    }

    #[test]
    fn a_crl_file_without_any_crl_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("crl.pem");
        for text in ["", "not a CRL at all\n"] {
            std::fs::write(&path, text).expect("write");
            let err = load_crl_file(&path).expect_err("no CRL");
            assert!(matches!(err, TlsError::EmptyCrl(_)), "{err}");
            assert!(err.to_string().contains("crl.pem"), "{err}");
        }
        // A truncated CRL (begin line, no end) is malformed PEM.
        std::fs::write(&path, "-----BEGIN X509 CRL-----\nMIIB\n").expect("write");
        assert!(load_crl_file(&path).is_err());
        // A directory is not read at all.
        let err = load_crl_file(tmp.path()).expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn only_the_cas_own_newest_crl_is_installed() {
        let ca = CertAuthority::generate("revocation CA").expect("CA");
        let alice = ca.issue_client("alice").expect("alice");
        let (_, reloader) = reloader_for(&ca);
        let refused = |crls: Vec<CertificateRevocationListDer<'static>>, why: &str| {
            let err = reloader.reload(crls).expect_err(why);
            assert!(matches!(err, TlsError::CrlRefused(_)), "{err}");
            assert!(err.to_string().contains(why), "{err}");
        };
        refused(Vec::new(), "un-revoke every certificate");
        // Another CA's list, and a forgery under the same name.
        let other = CertAuthority::generate("other CA").expect("CA");
        refused(vec![crl(&other, &[&alice], 5)], "not the trusted CA");
        let forger = CertAuthority::generate("revocation CA").expect("CA");
        refused(
            vec![crl(&forger, &[], 9)],
            "does not verify with the CA's key",
        );
        refused(
            vec![crl(&ca, &[&alice], 2), crl(&ca, &[], 3)],
            "a second CRL from the same CA",
        );
        // A tampered byte breaks the signature (or the parse).
        let mut tampered = crl(&ca, &[&alice], 2).as_ref().to_vec();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x01;
        let err = reloader
            .reload(vec![tampered.into()])
            .expect_err("tampered CRL");
        assert!(matches!(err, TlsError::CrlRefused(_)), "{err}");

        let installed = reloader
            .reload(vec![crl(&ca, &[&alice], 2)])
            .expect("CA's own");
        assert_eq!(
            installed,
            Reloaded {
                crls: 1,
                closed: Vec::new()
            }
        );
        // The same CRL again is fine (a second SIGHUP); another one with the
        // same number, or a lower number, is not.
        let newer = crl(&ca, &[&alice], 5);
        reloader.reload(vec![newer.clone()]).expect("newer");
        reloader.reload(vec![newer]).expect("the same CRL again");
        refused(vec![crl(&ca, &[], 5)], "a different CRL with the number 5");
        refused(vec![crl(&ca, &[], 1)], "lower than the 5 in force");

        // The same checks at start.
        let server = ca.issue_server(&["localhost".into()]).expect("server");
        let err = server_config_reloadable(
            load_ca_pem(ca.cert_pem()).expect("roots"),
            Identity::from_pem(&server.cert_pem, &server.key_pem).expect("identity"),
            vec![crl(&forger, &[], 1)],
            &TransportSettings::default(),
        )
        .expect_err("forged CRL at start");
        assert!(matches!(err, TlsError::CrlRefused(_)), "{err}");
    }

    #[test]
    fn a_crl_is_refused_when_two_trusted_cas_share_its_name() {
        // A re-keyed CA under the old name, both trusted.
        let old = CertAuthority::generate("rekeyed CA").expect("CA");
        let new = CertAuthority::generate("rekeyed CA").expect("CA");
        let roots = load_ca_pem(&format!("{}{}", old.cert_pem(), new.cert_pem())).expect("roots");
        let err = check_crls(&roots, &[crl(&new, &[], 1)]).expect_err("ambiguous issuer");
        assert!(err.to_string().contains("several trusted CAs"), "{err}");
        // Without a CRL both CAs work as before.
        check_crls(&roots, &[]).expect("no CRL");

        // Two CAs of different names: each needs its CRL.
        let other = CertAuthority::generate("second CA").expect("CA");
        let roots = load_ca_pem(&format!("{}{}", old.cert_pem(), other.cert_pem())).expect("roots");
        let err = check_crls(&roots, &[crl(&old, &[], 1)]).expect_err("second CA uncovered");
        assert!(
            err.to_string().contains("\"CN=second CA\" has no CRL"),
            "{err}"
        );
        check_crls(&roots, &[crl(&old, &[], 1), crl(&other, &[], 1)]).expect("both covered");
    }

    /// A client connection and the server's side of it.
    async fn connect(
        server: &quinn::Endpoint,
        ca: &CertAuthority,
        issued: &Issued,
    ) -> Result<(quinn::Endpoint, quinn::Connection, quinn::Connection), String> {
        let addr: SocketAddr = server.local_addr().map_err(|e| e.to_string())?;
        let config = crate::tls::client_config(
            load_ca_pem(ca.cert_pem()).map_err(|e| e.to_string())?,
            Some(Identity::from_pem(&issued.cert_pem, &issued.key_pem).map_err(|e| e.to_string())?),
            &TransportSettings::default(),
        )
        .map_err(|e| e.to_string())?;
        let endpoint =
            crate::endpoint::client_endpoint_for(addr, config).map_err(|e| e.to_string())?;
        let connecting = endpoint
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?;
        let both = async {
            let accepted = async {
                let incoming = server.accept().await.ok_or("server endpoint closed")?;
                incoming.await.map_err(|e| e.to_string())
            };
            let (client, accepted) = tokio::join!(connecting, accepted);
            let client = client.map_err(|e| e.to_string())?;
            // TLS 1.3 finishes on the client before the server has checked
            // its certificate: a refused client learns it on its first read.
            Ok::<_, String>((client, accepted?))
        };
        let (client, accepted) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .map_err(|_| "handshake timed out".to_owned())??;
        Ok((endpoint, client, accepted))
    }

    async fn closed_with(conn: &quinn::Connection) -> Option<Vec<u8>> {
        match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == CERTIFICATE_CLOSE_CODE.into() =>
            {
                Some(close.reason.to_vec())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_reload_closes_the_connections_it_revokes() {
        let ca = CertAuthority::generate("revocation CA").expect("CA");
        let (config, reloader) = reloader_for(&ca);
        let server =
            crate::endpoint::server_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), config)
                .expect("server endpoint");
        let alice = ca.issue_client("alice").expect("alice");
        let bob = ca.issue_client("bob").expect("bob");
        let started = reloader.handshake_start();
        let (_alice_endpoint, alice_client, alice_server) =
            connect(&server, &ca, &alice).await.expect("alice connects");
        let (_bob_endpoint, bob_client, bob_server) =
            connect(&server, &ca, &bob).await.expect("bob connects");
        let alice_watch = reloader.watch(&alice_server, started);
        let _bob_watch = reloader.watch(&bob_server, started);
        assert_eq!(reloader.watched(), 2);

        let reloaded = reloader
            .reload(vec![crl(&ca, &[&alice], 1)])
            .expect("reload");
        assert_eq!(reloaded.closed, vec!["alice".to_owned()]);
        assert_eq!(
            closed_with(&alice_client).await.as_deref(),
            Some(&b"certificate revoked"[..])
        );
        // Bob is untouched, and still talks.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(bob_client.close_reason().is_none());
        let mut send = bob_client.open_uni().await.expect("bob opens a stream");
        send.write_all(b"still here").await.expect("bob writes");
        send.finish().expect("finish");
        let mut recv = bob_server.accept_uni().await.expect("server accepts");
        assert_eq!(recv.read_to_end(64).await.expect("read"), b"still here");

        // A dropped watch is forgotten.
        drop(alice_watch);
        assert_eq!(reloader.watched(), 1);
        // A connection whose handshake passed before a reload but that is
        // watched only after it (the reload's re-check missed it) is closed
        // when it is watched.
        let carol = ca.issue_client("carol").expect("carol");
        let started = reloader.handshake_start();
        let (_carol_endpoint, carol_client, carol_server) =
            connect(&server, &ca, &carol).await.expect("carol connects");
        reloader
            .reload(vec![crl(&ca, &[&alice, &carol], 2)])
            .expect("reload");
        let _carol_watch = reloader.watch(&carol_server, started);
        assert_eq!(
            closed_with(&carol_client).await.as_deref(),
            Some(&b"certificate revoked"[..])
        );
        // Alice cannot come back: the new handshake is refused.
        match connect(&server, &ca, &alice).await {
            Err(_) => {}
            Ok((_endpoint, client, _)) => {
                assert!(
                    tokio::time::timeout(Duration::from_secs(5), client.closed())
                        .await
                        .is_ok(),
                    "the revoked client's new connection stayed open"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_connection_is_closed_when_its_certificate_expires() {
        let ca = CertAuthority::generate("expiry CA").expect("CA");
        let (config, reloader) = reloader_for(&ca);
        let server =
            crate::endpoint::server_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), config)
                .expect("server endpoint");
        let now = SystemTime::now();
        let short = ca
            .issue_client_with_validity(
                "short",
                now - Duration::from_secs(60),
                now + Duration::from_secs(2),
            )
            .expect("short-lived");
        let started = reloader.handshake_start();
        let (_endpoint, client, accepted) = connect(&server, &ca, &short).await.expect("connects");
        let _watch = reloader.watch(&accepted, started);
        assert!(client.close_reason().is_none());
        let closed = tokio::time::timeout(Duration::from_secs(10), client.closed())
            .await
            .expect("closed at expiry");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(close)
                if close.reason.as_ref() == b"certificate expired"),
            "{closed:?}"
        );
    }
}
