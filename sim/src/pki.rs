//! Certificates generated in memory for a simulation: a CA, the
//! aggregator's certificate for 127.0.0.1, and one per client.

use fedquic_net::pki::{CertAuthority, PkiError, client_name};
use fedquic_net::tls::{self, Identity, TlsError, TransportSettings};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SimPkiError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

pub const SERVER_NAME: &str = "localhost";

pub struct SimPki {
    pub server: quinn::ServerConfig,
    ca: CertAuthority,
    /// The CA as a trust store, parsed once (a check-in run makes a client
    /// configuration for every client it materialises).
    roots: tls::RootCertStore,
    transport: TransportSettings,
}

impl SimPki {
    pub fn new(
        server_transport: TransportSettings,
        transport: TransportSettings,
    ) -> Result<Self, SimPkiError> {
        let ca = CertAuthority::generate("fedquic-sim CA")?;
        let issued = ca.issue_server(&[SERVER_NAME.to_string(), "127.0.0.1".to_string()])?;
        let roots = tls::load_ca_pem(ca.cert_pem())?;
        let server = tls::server_config(
            roots.clone(),
            Identity::from_pem(&issued.cert_pem, &issued.key_pem)?,
            &server_transport,
        )?;
        Ok(SimPki {
            server,
            ca,
            roots,
            transport,
        })
    }

    /// The client config (with its own certificate) of client `index` (1-based).
    pub fn client(&self, index: usize) -> Result<(String, quinn::ClientConfig), SimPkiError> {
        let name = client_name(index);
        let issued = self.ca.issue_client(&name)?;
        let config = tls::client_config(
            self.roots.clone(),
            Some(Identity::from_pem(&issued.cert_pem, &issued.key_pem)?),
            &self.transport,
        )?;
        Ok((name, config))
    }
}
