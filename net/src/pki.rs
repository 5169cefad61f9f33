//! The federation's private PKI: one certificate authority that signs the
//! aggregator's server certificate and one client certificate per
//! participant (generated with rcgen, ECDSA P-256, PEM text).
//!
//! A client's identity is the common name of its certificate; the aggregator
//! trusts exactly the certificates signed by this CA (mutual TLS).
//!
//! On disk ([`PkiDirs`]) the CA is kept apart from everything deployable:
//!
//! ```text
//! certs-ca/                 the CA: ca.pem, ca.key, revoked.txt, crlnumber (keep offline)
//! certs/                    the aggregator's --certs: ca.pem, server.pem, server.key, crl.pem
//! certs/clients/NAME/       one device's bundle: ca.pem, NAME.pem, NAME.key
//! ```

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;

use crate::files;

/// File names inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key file.
pub const CA_KEY_FILE: &str = "ca.key";
/// The aggregator's certificate file.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The aggregator's private key file.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Validity of a freshly generated CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of issued server and client certificates.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates are back-dated by this much to tolerate small clock skew.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Longest accepted client name (the X.509 upper bound of a common name).
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// Errors of certificate generation and PKI directory handling.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid CA certificate: {0}")]
    InvalidCaCert(String),
    #[error("invalid CA private key: {0}")]
    InvalidCaKey(String),
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("invalid client name {name:?}: {reason}")]
    InvalidClientName { name: String, reason: String },
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName { name: String, reason: String },
    #[error("at least one server name (DNS name or IP address) is required")]
    NoServerNames,
    #[error("invalid validity period: {0}")]
    InvalidValidity(String),
    #[error("client {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("{} already exists; refusing to overwrite it (use --force to replace the whole PKI)", .0.display())]
    AlreadyExists(PathBuf),
    #[error("the CA directory {} must be apart from the deployable certs directory {}", ca.display(), certs.display())]
    CaNotApart { certs: PathBuf, ca: PathBuf },
    #[error("invalid serial number {0:?}: expected hexadecimal digits (e.g. 3f9a01...)")]
    InvalidSerial(String),
    #[error("certificate with serial {0} is already revoked")]
    SerialAlreadyRevoked(String),
    #[error("{}: line {line} is malformed", path.display())]
    MalformedRecord { path: PathBuf, line: usize },
    #[error(
        "cannot read the CRL {}: {reason}; it is not written over (move it away to rebuild it \
         from the CA's revoked.txt)", path.display()
    )]
    UnreadableCrl { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a PEM certificate or key file (at most [`files::MAX_PEM_BYTES`]).
fn read_pem(path: &Path) -> Result<String, PkiError> {
    files::read_text_bounded(path, files::MAX_PEM_BYTES).map_err(io_err(path))
}

/// A freshly issued certificate and its private key, both PEM text.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// A certificate authority able to issue server and client certificates.
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

fn to_datetime(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::InvalidValidity("time before 1970".into()))?
        .as_secs();
    let secs =
        i64::try_from(secs).map_err(|_| PkiError::InvalidValidity("time out of range".into()))?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| PkiError::InvalidValidity(format!("time out of range: {e}")))
}

/// `(now - BACKDATE, now + validity)`.
fn default_validity(validity: Duration) -> Result<(SystemTime, SystemTime), PkiError> {
    let now = SystemTime::now();
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| PkiError::InvalidValidity("validity overflows".into()))?;
    Ok((not_before, not_after))
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), PkiError> {
    if not_after <= not_before {
        return Err(PkiError::InvalidValidity(
            "not_after must be later than not_before".into(),
        ));
    }
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    Ok(())
}

fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Rebuilds an rcgen distinguished name from a parsed certificate subject,
/// keeping every attribute's string type so that issued certificates name
/// their issuer byte for byte as the CA names itself.
fn dn_from_x509(name: &X509Name<'_>) -> Result<DistinguishedName, PkiError> {
    let bad = |what: &str| PkiError::InvalidCaCert(format!("unsupported subject: {what}"));
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(bad("multi-valued or empty RDN"));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("attribute OID"))?
            .collect();
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|_| bad("attribute is not UTF-8"));
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text()?).map_err(|_| bad("PrintableString"))?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text()?).map_err(|_| bad("IA5String"))?)
            }
            Tag::T61String => DnValue::TeletexString(
                TeletexString::try_from(text()?).map_err(|_| bad("TeletexString"))?,
            ),
            Tag::BmpString => DnValue::BmpString(
                BmpString::from_utf16be(data.to_vec()).map_err(|_| bad("BMPString"))?,
            ),
            Tag::UniversalString => DnValue::UniversalString(
                UniversalString::from_utf32be(data.to_vec()).map_err(|_| bad("UniversalString"))?,
            ),
            _ => return Err(bad("attribute string type")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

impl CertAuthority {
    /// Generates a self-signed CA (ECDSA P-256, valid 10 years).
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        if common_name.is_empty() {
            return Err(PkiError::InvalidCaCert("empty common name".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = default_validity(CA_VALIDITY)?;
        set_validity(&mut params, not_before, not_after)?;
        let key = generate_key()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA (certificate and PKCS#8 private key, PEM) so that
    /// it can issue more certificates.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCaCert(format!("PEM: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::InvalidCaCert(format!("X.509: {e}")))?;
        if !x509.is_ca() {
            return Err(PkiError::InvalidCaCert(
                "the certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        if let Ok(Some(ku)) = x509.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(PkiError::InvalidCaCert(
                "the certificate may not sign certificates (keyCertSign missing)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidCaKey(e.to_string()))?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(PkiError::KeyMismatch);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject())?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        if let Some(ski) = subject_key_id(&x509) {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA stored in a PKI directory (`ca.pem`, `ca.key`).
    pub fn from_dir(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = read_pem(&cert_path)?;
        let key = read_pem(&key_path)?;
        Self::from_pem(&cert, &key)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn sign(&self, params: &CertificateParams) -> Result<Issued, PkiError> {
        let key = generate_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues the aggregator's certificate, valid [`LEAF_VALIDITY`].
    ///
    /// Each name becomes a subject alternative name: an IP address if it
    /// parses as one, else a DNS name. The common name is the first name.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, PkiError> {
        let (not_before, not_after) = default_validity(LEAF_VALIDITY)?;
        self.issue_server_with_validity(names, not_before, not_after)
    }

    /// [`issue_server`](Self::issue_server) with an explicit validity period.
    pub fn issue_server_with_validity(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        let first = names.first().ok_or(PkiError::NoServerNames)?;
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            let invalid = |reason: &str| PkiError::InvalidServerName {
                name: name.clone(),
                reason: reason.into(),
            };
            if let Ok(ip) = name.parse::<IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else {
                DnsName::try_from(name.as_str())
                    .map_err(|_| invalid("neither an IP address nor a valid DNS name"))?;
                let ia5 = Ia5String::try_from(name.as_str()).map_err(|_| invalid("not ASCII"))?;
                sans.push(SanType::DnsName(ia5));
            }
        }
        let mut params = leaf_params(first, ExtendedKeyUsagePurpose::ServerAuth);
        params.subject_alt_names = sans;
        set_validity(&mut params, not_before, not_after)?;
        self.sign(&params)
    }

    /// Issues a client certificate, valid [`LEAF_VALIDITY`]. The common
    /// name is `name` (the client's identity, see
    /// [`validate_client_name`]); it is also a DNS SAN when it is a valid
    /// DNS name.
    pub fn issue_client(&self, name: &str) -> Result<Issued, PkiError> {
        let (not_before, not_after) = default_validity(LEAF_VALIDITY)?;
        self.issue_client_with_validity(name, not_before, not_after)
    }

    /// [`issue_client`](Self::issue_client) with an explicit validity period
    /// (for instance an already expired one, for tests).
    pub fn issue_client_with_validity(
        &self,
        name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        validate_client_name(name)?;
        let mut params = leaf_params(name, ExtendedKeyUsagePurpose::ClientAuth);
        if DnsName::try_from(name).is_ok()
            && let Ok(ia5) = Ia5String::try_from(name)
        {
            params.subject_alt_names = vec![SanType::DnsName(ia5)];
        }
        set_validity(&mut params, not_before, not_after)?;
        self.sign(&params)
    }
}

fn leaf_params(cn: &str, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params
}

fn subject_key_id(x509: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x509.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// Names that would collide with the PKI's own files and directories.
pub const RESERVED_NAMES: &[&str] = &["ca", "server", "crl", "revoked", "clients"];

/// Checks a client name: 1 to 64 characters of `[A-Za-z0-9._-]`, not
/// starting with '.', and not one of [`RESERVED_NAMES`].
pub fn validate_client_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| {
        Err(PkiError::InvalidClientName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_CLIENT_NAME_LEN {
        return invalid("longer than 64 characters");
    }
    if name.starts_with('.') {
        return invalid("starts with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    if RESERVED_NAMES
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
    {
        return invalid("reserved for the PKI's own files (ca, server, crl, revoked, clients)");
    }
    Ok(())
}

/// Writes `contents` to `path`. Private files are created with mode 0600
/// (set at creation, never widened). Without `overwrite`, an existing file
/// is an [`PkiError::AlreadyExists`] error.
fn write_file(path: &Path, contents: &str, private: bool, overwrite: bool) -> Result<(), PkiError> {
    if overwrite && private {
        // The mode only applies when the file is created: replace it.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    let mut options = OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists(path.to_path_buf())
        } else {
            io_err(path)(e)
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(PkiError::AlreadyExists(path.to_path_buf()));
        }
    }
    Ok(())
}

/// The name of the `index`-th (1-based) client generated by [`init_dir`].
pub fn client_name(index: usize) -> String {
    format!("client-{index:03}")
}

/// Directory of per-client bundles inside the certs directory.
pub const CLIENTS_DIR: &str = "clients";

/// Where a PKI lives: the CA apart from the deployable files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiDirs {
    /// The aggregator's files (`ca.pem`, `server.pem`, `server.key`,
    /// `crl.pem`) and the client bundles under `clients/`.
    pub certs: PathBuf,
    /// The CA (`ca.pem`, `ca.key`, `revoked.txt`): never deployed.
    pub ca: PathBuf,
}

impl PkiDirs {
    /// `certs` with the CA in `ca`, or by default in the sibling directory
    /// `<certs>-ca` (`certs` -> `certs-ca`).
    pub fn new(certs: &Path, ca: Option<&Path>) -> Self {
        let ca = ca.map(Path::to_path_buf).unwrap_or_else(|| {
            let mut name = certs
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "certs".into());
            name.push("-ca");
            certs.with_file_name(name)
        });
        PkiDirs {
            certs: certs.to_path_buf(),
            ca,
        }
    }

    /// The bundle directory a device receives: `certs/clients/NAME`.
    pub fn client_dir(&self, name: &str) -> PathBuf {
        self.certs.join(CLIENTS_DIR).join(name)
    }

    /// `ca.pem`, `NAME.pem`, `NAME.key` of a client's bundle.
    pub fn client_files(&self, name: &str) -> [PathBuf; 3] {
        let dir = self.client_dir(name);
        [
            dir.join(CA_CERT_FILE),
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ]
    }

    pub fn crl_path(&self) -> PathBuf {
        self.certs.join(CRL_FILE)
    }

    fn check_apart(&self) -> Result<(), PkiError> {
        let same = |a: &Path, b: &Path| match (fs::canonicalize(a), fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if same(&self.certs, &self.ca) || self.ca.starts_with(&self.certs) {
            return Err(PkiError::CaNotApart {
                certs: self.certs.clone(),
                ca: self.ca.clone(),
            });
        }
        Ok(())
    }
}

/// The files of one client's bundle, CA certificate first.
fn bundle_files(
    dirs: &PkiDirs,
    ca: &CertAuthority,
    name: &str,
) -> Result<Vec<(PathBuf, bool, String)>, PkiError> {
    let issued = ca.issue_client(name)?;
    let [ca_path, cert_path, key_path] = dirs.client_files(name);
    Ok(vec![
        (ca_path, false, ca.cert_pem().to_owned()),
        (cert_path, false, issued.cert_pem),
        (key_path, true, issued.key_pem),
    ])
}

fn create_dirs(files: &[(PathBuf, bool, String)]) -> Result<(), PkiError> {
    for (path, _, _) in files {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
    }
    Ok(())
}

/// Writes a fresh PKI: the CA (`ca.pem`, `ca.key`) in `dirs.ca`; the
/// aggregator's `ca.pem`, `server.pem`, `server.key` in `dirs.certs`; and
/// for each of `clients` clients (client-001, ...) a bundle
/// `clients/NAME/{ca.pem,NAME.pem,NAME.key}`. Refuses to overwrite any of
/// these files unless `force`. Private keys are created with mode 0600.
/// Returns the paths written.
pub fn init_dir(
    dirs: &PkiDirs,
    server_names: &[String],
    clients: usize,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    if server_names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    dirs.check_apart()?;
    let mut files: Vec<(PathBuf, bool, String)> = Vec::with_capacity(5 + 3 * clients);
    let ca = CertAuthority::generate("fedquic CA")?;
    files.push((dirs.ca.join(CA_CERT_FILE), false, ca.cert_pem().to_owned()));
    files.push((dirs.ca.join(CA_KEY_FILE), true, ca.key_pem().to_owned()));
    files.push((
        dirs.certs.join(CA_CERT_FILE),
        false,
        ca.cert_pem().to_owned(),
    ));
    let server = ca.issue_server(server_names)?;
    files.push((dirs.certs.join(SERVER_CERT_FILE), false, server.cert_pem));
    files.push((dirs.certs.join(SERVER_KEY_FILE), true, server.key_pem));
    for index in 1..=clients {
        files.extend(bundle_files(dirs, &ca, &client_name(index))?);
    }
    if !force {
        let paths: Vec<&Path> = files.iter().map(|(p, _, _)| p.as_path()).collect();
        refuse_existing(&paths)?;
        // A CA key left in the certs directory by an older layout is refused too.
        refuse_existing(&[&dirs.certs.join(CA_KEY_FILE)])?;
    }
    create_dirs(&files)?;
    for (path, private, contents) in &files {
        write_file(path, contents, *private, force)?;
    }
    if force {
        // A new CA invalidates the old revocation record and CRL.
        for stale in [dirs.ca.join(REVOKED_FILE), dirs.crl_path()] {
            match fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&stale)(e)),
            }
        }
    }
    Ok(files.into_iter().map(|(p, _, _)| p).collect())
}

/// Issues one more client certificate, signed by the CA in `dirs.ca`, and
/// writes its bundle `clients/NAME/{ca.pem,NAME.pem,NAME.key}` (the key
/// with mode 0600). Refuses to overwrite existing files. Returns the paths
/// written.
pub fn add_client(dirs: &PkiDirs, name: &str) -> Result<Vec<PathBuf>, PkiError> {
    validate_client_name(name)?;
    let paths = dirs.client_files(name);
    refuse_existing(&[&paths[0], &paths[1], &paths[2]])?;
    let ca = CertAuthority::from_dir(&dirs.ca)?;
    let files = bundle_files(dirs, &ca, name)?;
    create_dirs(&files)?;
    let mut written = Vec::new();
    for (path, private, contents) in &files {
        if let Err(e) = write_file(path, contents, *private, false) {
            // Do not leave half a bundle behind.
            for path in &written {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    Ok(written)
}

/// File in the certs directory holding the certificate revocation list.
pub const CRL_FILE: &str = "crl.pem";
/// The record of revocations the CRL is rebuilt from: one line per
/// revoked certificate, `SERIAL_HEX NAME UNIX_TIME`.
pub const REVOKED_FILE: &str = "revoked.txt";
/// The highest CRL number issued, in the CA directory: CRL numbers only grow.
pub const CRL_NUMBER_FILE: &str = "crlnumber";
/// Lock file in the CA directory that makes revocations take turns.
const REVOKE_LOCK_FILE: &str = ".revoke.lock";
/// How long a CRL is valid; re-run `certs revoke` (or any revocation) before then.
pub const CRL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

impl CertAuthority {
    /// Signs a CRL listing `revoked` (certificate serial numbers and when
    /// they were revoked). `number` must grow with every CRL issued.
    pub fn issue_crl(
        &self,
        revoked: &[(Vec<u8>, SystemTime)],
        number: u64,
    ) -> Result<String, PkiError> {
        let now = SystemTime::now();
        let this_update = to_datetime(now.checked_sub(BACKDATE).unwrap_or(now))?;
        let next_update = to_datetime(now + CRL_VALIDITY)?;
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: to_datetime(*at)?,
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// The serial number of a PEM certificate, as raw big-endian bytes.
pub fn cert_serial(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| PkiError::InvalidCaCert(format!("not a PEM certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::InvalidCaCert(format!("cannot parse certificate: {e}")))?;
    Ok(cert.tbs_certificate.raw_serial().to_vec())
}

/// A serial number as lower-case hex without leading zero bytes (DER adds
/// one to positive numbers whose top bit is set; `openssl x509 -serial`
/// prints none), so both spellings name the same certificate.
pub fn serial_hex(serial: &[u8]) -> String {
    let start = serial
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    serial[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a serial number given in hex (`3F:9A:01`, `0x3f9a01` and
/// `3f9a01` are the same), as raw big-endian bytes.
pub fn parse_serial(text: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::InvalidSerial(text.to_owned());
    let trimmed = text.trim();
    let digits: String = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    // X.509 serials are at most 20 bytes.
    if digits.is_empty() || digits.len() > 42 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// Revokes client NAME's certificate (`clients/NAME/NAME.pem` in the certs
/// directory): see [`revoke_serial`].
pub fn revoke(dirs: &PkiDirs, name: &str) -> Result<PathBuf, PkiError> {
    validate_client_name(name)?;
    let [_, cert_path, _] = dirs.client_files(name);
    let cert_pem = read_pem(&cert_path)?;
    let serial = cert_serial(&cert_pem)?;
    match revoke_serial_as(dirs, &serial, name) {
        Err(PkiError::SerialAlreadyRevoked(_)) => Err(PkiError::AlreadyRevoked(name.to_string())),
        other => other,
    }
}

/// Revokes the certificate with this serial number (for instance an older
/// certificate of a name that was re-issued): records it in the CA's
/// `revoked.txt` and rewrites the certs directory's `crl.pem`, signed by
/// the CA. The aggregator loads `crl.pem` at start and again on SIGHUP,
/// refuses revoked certificates in the TLS handshake and closes connections
/// that present them. Revoking twice is an error, unless the first time
/// recorded the serial but failed to write the CRL: then this finishes it.
pub fn revoke_serial(dirs: &PkiDirs, serial: &[u8]) -> Result<PathBuf, PkiError> {
    revoke_serial_as(dirs, serial, "-")
}

fn revoke_serial_as(dirs: &PkiDirs, serial: &[u8], name: &str) -> Result<PathBuf, PkiError> {
    // One revocation at a time: each reads, extends and rewrites the
    // record, the CRL number and the CRL.
    let _lock = lock_ca_dir(&dirs.ca)?;
    let ca = CertAuthority::from_dir(&dirs.ca)?;
    let record_path = dirs.ca.join(REVOKED_FILE);
    let old_record = match files::read_text_bounded(&record_path, files::MAX_CRL_BYTES) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&record_path)(e)),
    };
    let mut revoked = parse_record(&old_record, &record_path)?;
    let mut record = old_record.clone();
    let crl_path = dirs.crl_path();
    let current = read_crl(&crl_path, &ca)?;
    let listed = |revoked: &[(Vec<u8>, SystemTime)], hex: &str| {
        revoked.iter().any(|(s, _)| serial_hex(s) == hex)
    };
    // Serials the published CRL has and the record lacks (a record write
    // that failed after its CRL went out) are kept, and recorded now: a new
    // CRL never drops a revocation.
    if let Some(crl) = &current {
        for (serial, at) in &crl.revoked {
            let hex = serial_hex(serial);
            if !listed(&revoked, &hex) {
                record.push_str(&record_line(&hex, "-", *at));
                revoked.push((serial.clone(), *at));
            }
        }
    }
    let wanted = serial_hex(serial);
    let in_crl = current
        .as_ref()
        .is_some_and(|crl| crl.revoked.iter().any(|(s, _)| serial_hex(s) == wanted));
    if in_crl {
        write_record_if_changed(&record_path, &old_record, &record)?;
        return Err(PkiError::SerialAlreadyRevoked(wanted));
    }
    // Recorded but not in the CRL: an earlier revocation whose CRL write
    // failed. It is finished now instead of refused.
    if !listed(&revoked, &wanted) {
        let now = SystemTime::now();
        record.push_str(&record_line(&wanted, name, now));
        revoked.push((serial.to_vec(), now));
    }
    // The record first: every serial a CRL ever lists is in it, so a CRL
    // rebuilt from it (after crl.pem was lost) drops nothing. If a later
    // step fails, the next run finds the serial recorded but not published
    // and finishes it.
    write_record_if_changed(&record_path, &old_record, &record)?;
    // The aggregator refuses a CRL whose number is lower than the one it
    // has: the number only grows, whatever happened to the files. It is
    // saved before the CRL goes out, so a CRL is never published with a
    // number a later one could repeat.
    let number_path = dirs.ca.join(CRL_NUMBER_FILE);
    let number = read_crl_number(&number_path)?
        .max(current.and_then(|crl| crl.number).unwrap_or(0))
        .checked_add(1)
        .ok_or_else(|| PkiError::MalformedRecord {
            path: number_path.clone(),
            line: 1,
        })?
        .max(revoked.len() as u64);
    files::replace_file(&number_path, format!("{number}\n").as_bytes())
        .map_err(io_err(&number_path))?;
    let crl = ca.issue_crl(&revoked, number)?;
    fs::create_dir_all(&dirs.certs).map_err(io_err(&dirs.certs))?;
    files::replace_file(&crl_path, crl.as_bytes()).map_err(io_err(&crl_path))?;
    Ok(crl_path)
}

/// Holds the CA directory's revocation lock until dropped (an advisory
/// lock on a file in it: `certs revoke` runs one at a time).
fn lock_ca_dir(ca_dir: &Path) -> Result<fs::File, PkiError> {
    let path = ca_dir.join(REVOKE_LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    file.lock().map_err(io_err(&path))?;
    Ok(file)
}

fn record_line(hex: &str, name: &str, at: SystemTime) -> String {
    let unix = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{hex} {name} {unix}\n")
}

fn write_record_if_changed(path: &Path, old: &str, new: &str) -> Result<(), PkiError> {
    if old == new {
        return Ok(());
    }
    files::replace_file(path, new.as_bytes()).map_err(io_err(path))
}

/// The highest CRL number issued so far (0 before the first).
fn read_crl_number(path: &Path) -> Result<u64, PkiError> {
    match files::read_text_bounded(path, 64) {
        Ok(text) => text.trim().parse().map_err(|_| PkiError::MalformedRecord {
            path: path.to_path_buf(),
            line: 1,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The revoked serials and times of `revoked.txt` (one line per
/// certificate: `SERIAL_HEX NAME UNIX_TIME`).
fn parse_record(record: &str, path: &Path) -> Result<Vec<(Vec<u8>, SystemTime)>, PkiError> {
    record
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let bad = || PkiError::MalformedRecord {
                path: path.to_path_buf(),
                line: i + 1,
            };
            let mut fields = line.split_whitespace();
            let hex = fields.next().ok_or_else(bad)?;
            let _name = fields.next().ok_or_else(bad)?;
            let at: u64 = fields.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let at = UNIX_EPOCH
                .checked_add(Duration::from_secs(at))
                .ok_or_else(bad)?;
            let bytes = parse_serial(hex).map_err(|_| bad())?;
            Ok((bytes, at))
        })
        .collect()
}

/// What the current CRL file says, as far as revoking goes.
struct CurrentCrl {
    /// Revoked serials (raw, as in certificates) and when.
    revoked: Vec<(Vec<u8>, SystemTime)>,
    number: Option<u64>,
}

/// Reads the CRL file, which must be this CA's: `None` when there is none.
/// A file that is there but cannot be read, or is not signed by `ca`, is an
/// error, not something to write over or take serials from.
fn read_crl(path: &Path, ca: &CertAuthority) -> Result<Option<CurrentCrl>, PkiError> {
    let unreadable = |reason: String| PkiError::UnreadableCrl {
        path: path.to_path_buf(),
        reason,
    };
    let pem = match files::read_bounded(path, files::MAX_CRL_BYTES) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    let ders = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(format!("malformed PEM: {e}")))?;
    let [der] = ders.as_slice() else {
        return Err(unreadable(format!(
            "{} CRLs where this CA writes exactly one",
            ders.len()
        )));
    };
    let (rest, crl) =
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| unreadable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(unreadable("trailing bytes after the CRL".into()));
    }
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .map_err(|e| PkiError::InvalidCaCert(format!("not a PEM certificate: {e}")))?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| PkiError::InvalidCaCert(format!("cannot parse certificate: {e}")))?;
    if crl.issuer().as_raw() != ca_cert.subject().as_raw() {
        return Err(unreadable(format!(
            "issued by \"{}\", not by this CA",
            crl.issuer()
        )));
    }
    crl.verify_signature(ca_cert.public_key())
        .map_err(|e| unreadable(format!("not signed by this CA's key ({e})")))?;
    let number = match crl.crl_number() {
        Some(n) => Some(u64::try_from(n).map_err(|_| unreadable("CRL number too large".into()))?),
        None => None,
    };
    Ok(Some(CurrentCrl {
        revoked: crl
            .iter_revoked_certificates()
            .map(|revoked| {
                let secs = revoked.revocation_date.timestamp().max(0) as u64;
                let at = UNIX_EPOCH
                    .checked_add(Duration::from_secs(secs))
                    .unwrap_or(UNIX_EPOCH);
                (revoked.raw_serial().to_vec(), at)
            })
            .collect(),
        number,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn parse(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    #[test]
    fn ca_and_leaf_certificates_have_the_expected_fields() {
        let ca = CertAuthority::generate("test CA").expect("CA");
        let ca_der = parse(ca.cert_pem());
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).expect("x509");
        assert!(ca_x509.is_ca());
        assert!(
            ca_x509
                .key_usage()
                .expect("ku")
                .expect("ku")
                .value
                .key_cert_sign()
        );

        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .expect("server");
        let der = parse(&server.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert!(!x.is_ca());
        assert_eq!(x.issuer(), ca_x509.subject());
        let cn = x.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("str"), "localhost");
        let eku = x.extended_key_usage().expect("eku").expect("eku").value;
        assert!(eku.server_auth && !eku.client_auth);
        let san = x
            .subject_alternative_name()
            .expect("san")
            .expect("san")
            .value;
        assert!(
            san.general_names
                .contains(&GeneralName::DNSName("localhost"))
        );
        assert!(
            san.general_names
                .contains(&GeneralName::IPAddress(&[127, 0, 0, 1]))
        );

        let client = ca.issue_client("client-007").expect("client");
        let der = parse(&client.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let eku = x.extended_key_usage().expect("eku").expect("eku").value;
        assert!(eku.client_auth && !eku.server_auth);
        let cn = x.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("str"), "client-007");
        verify_client(ca.cert_pem(), &client.cert_pem).expect("accepted by rustls");
        // A server certificate is not a client certificate.
        assert!(verify_client(ca.cert_pem(), &server.cert_pem).is_err());
    }

    /// Verifies `cert_pem` as a client certificate the way the aggregator does.
    fn verify_client(ca_pem: &str, cert_pem: &str) -> Result<(), rustls::Error> {
        use rustls::server::WebPkiClientVerifier;
        let roots = crate::tls::load_ca_pem(ca_pem).expect("roots");
        let verifier = WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        verifier
            .verify_client_cert(&parse(cert_pem), &[], rustls::pki_types::UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let ca = CertAuthority::generate("test CA").expect("CA");
        assert!(matches!(ca.issue_server(&[]), Err(PkiError::NoServerNames)));
        assert!(matches!(
            ca.issue_server(&["not a host".into()]),
            Err(PkiError::InvalidServerName { .. })
        ));
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue_client_with_validity("c", now, now - Duration::from_secs(1)),
            Err(PkiError::InvalidValidity(_))
        ));
        let other = CertAuthority::generate("other").expect("CA");
        assert!(matches!(
            CertAuthority::from_pem(ca.cert_pem(), other.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        let leaf = ca.issue_client("leaf").expect("leaf");
        assert!(matches!(
            CertAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::InvalidCaCert(_))
        ));
        assert!(matches!(
            CertAuthority::from_pem("garbage", ca.key_pem()),
            Err(PkiError::InvalidCaCert(_))
        ));
        assert!(matches!(
            CertAuthority::from_pem(ca.cert_pem(), "garbage"),
            Err(PkiError::InvalidCaKey(_))
        ));
    }

    #[test]
    fn reloaded_ca_issues_certificates_that_chain_to_it() {
        let ca = CertAuthority::generate("reload CA").expect("CA");
        let again = CertAuthority::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let ca_der = parse(ca.cert_pem());
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).expect("x509");
        let client = again.issue_client("late").expect("client");
        let der = parse(&client.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(x.issuer().as_raw(), ca_x509.subject().as_raw());
        verify_client(ca.cert_pem(), &client.cert_pem).expect("accepted by rustls");
        let other = CertAuthority::generate("reload CA").expect("CA");
        assert!(verify_client(other.cert_pem(), &client.cert_pem).is_err());
    }

    #[test]
    fn client_names_are_validated() {
        for ok in ["a", "client-001", "Alice_2.eu", &"x".repeat(64)] {
            validate_client_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            "é",
            "ca",
            "server",
            "crl",
            "Crl",
            "revoked",
            "clients",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(
                    validate_client_name(bad),
                    Err(PkiError::InvalidClientName { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn init_dir_keeps_the_ca_apart_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = PkiDirs::new(&tmp.path().join("certs"), None);
        assert_eq!(dirs.ca, tmp.path().join("certs-ca"));
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let written = init_dir(&dirs, &names, 2, false).expect("init");
        let certs = &dirs.certs;
        let expected: Vec<PathBuf> = vec![
            dirs.ca.join("ca.pem"),
            dirs.ca.join("ca.key"),
            certs.join("ca.pem"),
            certs.join("server.pem"),
            certs.join("server.key"),
            certs.join("clients/client-001/ca.pem"),
            certs.join("clients/client-001/client-001.pem"),
            certs.join("clients/client-001/client-001.key"),
            certs.join("clients/client-002/ca.pem"),
            certs.join("clients/client-002/client-002.pem"),
            certs.join("clients/client-002/client-002.key"),
        ];
        assert_eq!(written, expected);
        for path in &written {
            let text = fs::read_to_string(path).expect("read");
            let is_key = path.extension().is_some_and(|e| e == "key");
            let marker = if is_key {
                "-----BEGIN PRIVATE KEY-----"
            } else {
                "-----BEGIN CERTIFICATE-----"
            };
            assert!(text.starts_with(marker), "{}", path.display());
            #[cfg(unix)]
            if is_key {
                assert_eq!(mode(path), 0o600, "{}", path.display());
            }
        }
        // Nothing deployable holds the CA key: a bundle is exactly three files.
        assert!(!certs.join("ca.key").exists());
        let mut bundle: Vec<_> = fs::read_dir(dirs.client_dir("client-001"))
            .expect("bundle")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        bundle.sort();
        assert_eq!(bundle, ["ca.pem", "client-001.key", "client-001.pem"]);
        let ca_pem = fs::read_to_string(dirs.ca.join("ca.pem")).expect("read");
        verify_client(
            &ca_pem,
            &fs::read_to_string(certs.join("clients/client-002/client-002.pem")).expect("read"),
        )
        .expect("bundle certificate chains to the CA");

        let err = init_dir(&dirs, &names, 1, false).expect_err("must refuse");
        assert!(matches!(err, PkiError::AlreadyExists(ref p) if p == &dirs.ca.join("ca.pem")));
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            fs::read_to_string(dirs.ca.join("ca.pem")).expect("read"),
            ca_pem
        );

        // A CA key left in a certs directory (older layout) is enough to refuse.
        let other = PkiDirs::new(&tmp.path().join("other"), None);
        fs::create_dir_all(&other.certs).expect("mkdir");
        fs::write(other.certs.join("ca.key"), "x").expect("write");
        assert!(matches!(
            init_dir(&other, &names, 0, false),
            Err(PkiError::AlreadyExists(_))
        ));
        // The CA cannot live in (or under) the deployable directory.
        for inside in [dirs.certs.clone(), dirs.certs.join("ca")] {
            let same = PkiDirs::new(&dirs.certs, Some(&inside));
            assert!(matches!(
                init_dir(&same, &names, 0, true),
                Err(PkiError::CaNotApart { .. })
            ));
        }

        revoke(&dirs, "client-001").expect("revoke");
        let rewritten = init_dir(&dirs, &names, 1, true).expect("force");
        assert_eq!(rewritten.len(), 8);
        assert_ne!(
            fs::read_to_string(dirs.ca.join("ca.pem")).expect("read"),
            ca_pem
        );
        assert!(!dirs.crl_path().exists(), "the old CA's CRL is gone");
        #[cfg(unix)]
        assert_eq!(mode(&dirs.ca.join("ca.key")), 0o600);
    }

    #[test]
    fn add_client_issues_from_the_ca_dir_and_refuses_duplicates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = PkiDirs::new(&tmp.path().join("certs"), Some(&tmp.path().join("offline")));
        init_dir(&dirs, &["localhost".to_string()], 1, false).expect("init");
        let written = add_client(&dirs, "alice").expect("add");
        assert_eq!(written, dirs.client_files("alice").to_vec());
        #[cfg(unix)]
        assert_eq!(mode(&dirs.client_files("alice")[2]), 0o600);

        verify_client(
            &fs::read_to_string(dirs.certs.join("ca.pem")).expect("read"),
            &fs::read_to_string(&dirs.client_files("alice")[1]).expect("read"),
        )
        .expect("signed by the CA");

        let key_before = fs::read_to_string(&dirs.client_files("alice")[2]).expect("read");
        assert!(matches!(
            add_client(&dirs, "alice"),
            Err(PkiError::AlreadyExists(_))
        ));
        assert!(matches!(
            add_client(&dirs, "client-001"),
            Err(PkiError::AlreadyExists(_))
        ));
        assert_eq!(
            fs::read_to_string(&dirs.client_files("alice")[2]).expect("read"),
            key_before
        );
        for bad in [
            "", ".x", "../evil", "a/b", "ca", "server", "crl", "CRL", "revoked", "clients",
        ] {
            assert!(
                matches!(
                    add_client(&dirs, bad),
                    Err(PkiError::InvalidClientName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(!tmp.path().join("evil.pem").exists());
        assert!(
            !dirs.crl_path().exists(),
            "no client file can land on crl.pem"
        );

        // Without the CA the error names the missing file.
        let empty = tempfile::tempdir().expect("tempdir");
        let nowhere = PkiDirs::new(&empty.path().join("certs"), None);
        let err = add_client(&nowhere, "bob").expect_err("no CA");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(!nowhere.client_files("bob")[2].exists());
    }

    #[test]
    fn serials_parse_in_every_common_spelling() {
        assert_eq!(parse_serial("3f9a01").expect("hex"), vec![0x3f, 0x9a, 0x01]);
        assert_eq!(
            parse_serial("0x3F:9A:01").expect("hex"),
            vec![0x3f, 0x9a, 0x01]
        );
        assert_eq!(parse_serial("f").expect("odd length"), vec![0x0f]);
        assert_eq!(serial_hex(&[0x00, 0x9a, 0x01]), "9a01");
        assert_eq!(serial_hex(&[0x00]), "00");
        for bad in ["", "xyz", "12 34", &"a".repeat(50)] {
            assert!(
                matches!(parse_serial(bad), Err(PkiError::InvalidSerial(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn revocation_by_name_and_by_serial_fills_one_crl() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = PkiDirs::new(&tmp.path().join("certs"), None);
        init_dir(&dirs, &["localhost".to_string()], 2, false).expect("init");
        let ca = CertAuthority::from_dir(&dirs.ca).expect("CA");
        // An older certificate of client-002, re-issued since: only its serial names it.
        let old = ca.issue_client("client-002").expect("old certificate");
        let old_serial = cert_serial(&old.cert_pem).expect("serial");
        let crl_path = revoke_serial(&dirs, &old_serial).expect("revoke by serial");
        assert!(matches!(
            revoke_serial(&dirs, &old_serial),
            Err(PkiError::SerialAlreadyRevoked(_))
        ));
        revoke(&dirs, "client-001").expect("revoke by name");
        assert!(matches!(
            revoke(&dirs, "client-001"),
            Err(PkiError::AlreadyRevoked(_))
        ));
        let crls = crate::revocation::load_crl_file(&crl_path).expect("crl");
        let roots = crate::tls::load_ca_file(&dirs.certs.join("ca.pem")).expect("roots");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .with_crls(crls)
        .build()
        .expect("verifier");
        let check = |pem: &str| {
            verifier
                .verify_client_cert(&parse(pem), &[], rustls::pki_types::UnixTime::now())
                .map(|_| ())
        };
        assert!(check(&old.cert_pem).is_err(), "revoked by serial");
        let current = |name: &str| fs::read_to_string(&dirs.client_files(name)[1]).expect("read");
        assert!(check(&current("client-001")).is_err(), "revoked by name");
        check(&current("client-002")).expect("the current client-002 still gets in");
        let record = fs::read_to_string(dirs.ca.join(REVOKED_FILE)).expect("record");
        assert_eq!(record.lines().count(), 2);
        assert!(record.contains(&serial_hex(&old_serial)));
    }

    #[test]
    fn interrupted_revocations_are_finished_and_never_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = PkiDirs::new(&tmp.path().join("certs"), None);
        init_dir(&dirs, &["localhost".to_string()], 3, false).expect("init");
        let crl_path = dirs.crl_path();
        let ca = CertAuthority::from_dir(&dirs.ca).expect("CA");
        let crl = || read_crl(&crl_path, &ca).expect("readable").expect("a CRL");
        let number = || crl().number.expect("a CRL number");
        let serials =
            || -> Vec<String> { crl().revoked.iter().map(|(s, _)| serial_hex(s)).collect() };
        let serial_of = |name: &str| {
            serial_hex(
                &cert_serial(&fs::read_to_string(&dirs.client_files(name)[1]).expect("read"))
                    .expect("serial"),
            )
        };
        let record_path = dirs.ca.join(REVOKED_FILE);
        let record = || fs::read_to_string(&record_path).expect("record");

        revoke(&dirs, "client-001").expect("revoke");
        assert_eq!(number(), 1);

        // The CRL write of a revocation failed after its record was written
        // (older versions wrote the record first): the re-run finishes it.
        let with_002 = format!(
            "{}{} client-002 1700000000\n",
            record(),
            serial_of("client-002")
        );
        fs::write(&record_path, &with_002).expect("write");
        revoke(&dirs, "client-002").expect("finished, not refused");
        assert!(serials().contains(&serial_of("client-002")));
        assert_eq!(record(), with_002, "recorded once");
        assert!(matches!(
            revoke(&dirs, "client-002"),
            Err(PkiError::AlreadyRevoked(_))
        ));

        // The record write failed after the CRL went out: the record lacks
        // client-002. Revoking someone else keeps client-002 in the CRL and
        // records it.
        let without_002: String = record()
            .lines()
            .filter(|l| !l.starts_with(&serial_of("client-002")))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&record_path, &without_002).expect("write");
        let before = number();
        revoke(&dirs, "client-003").expect("revoke");
        let listed = serials();
        for name in ["client-001", "client-002", "client-003"] {
            assert!(
                listed.contains(&serial_of(name)),
                "{name} dropped from the CRL"
            );
            assert!(record().contains(&serial_of(name)), "{name} not recorded");
        }
        assert!(number() > before);

        // A lost CRL is rebuilt from the record, with a number above any
        // issued before (the aggregator may hold the last one).
        let before = number();
        fs::remove_file(&crl_path).expect("remove");
        let extra = ca.issue_client("extra").expect("issue");
        revoke_serial(&dirs, &cert_serial(&extra.cert_pem).expect("serial")).expect("revoke");
        assert!(number() > before);
        assert_eq!(serials().len(), 4);

        // A CRL file that is there but unreadable is not written over.
        fs::write(
            &crl_path,
            "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
        )
        .expect("write");
        let other = ca.issue_client("other").expect("issue");
        let err = revoke_serial(&dirs, &cert_serial(&other.cert_pem).expect("serial"))
            .expect_err("unreadable CRL");
        assert!(matches!(err, PkiError::UnreadableCrl { .. }), "{err}");
        assert!(err.to_string().contains("move it away"), "{err}");
        // So is a file of two CRLs (this CA writes one; the second would
        // be dropped), and another CA's CRL (its serials and number are not
        // taken).
        let own = ca.issue_crl(&[], 1).expect("CRL");
        fs::write(&crl_path, format!("{own}{own}")).expect("write");
        let err = revoke_serial(&dirs, &cert_serial(&other.cert_pem).expect("serial"))
            .expect_err("two CRLs");
        assert!(err.to_string().contains("2 CRLs"), "{err}");
        let stranger = CertAuthority::generate("fedquic CA").expect("CA");
        fs::write(
            &crl_path,
            stranger.issue_crl(&[], u64::MAX / 2).expect("CRL"),
        )
        .expect("write");
        let err = revoke_serial(&dirs, &cert_serial(&other.cert_pem).expect("serial"))
            .expect_err("foreign CRL");
        assert!(err.to_string().contains("not signed by this CA"), "{err}");

        // A record whose time overflows is malformed, not a panic.
        fs::remove_file(&crl_path).expect("remove");
        fs::write(
            &record_path,
            format!("{} x 18446744073709551615\n", serial_of("client-001")),
        )
        .expect("write");
        assert!(matches!(
            revoke(&dirs, "client-001"),
            Err(PkiError::MalformedRecord { line: 1, .. })
        ));
    }
}
