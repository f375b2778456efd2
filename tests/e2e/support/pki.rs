//! PKI made fresh for each test: a CA and the server, client and Redis
//! certificates it signs, and TLS channels that trust one CA.

use session_server::Config;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{TempFiles, server::test_config};

/// A CA, a server certificate for [`Pki::SERVER_NAME`] and a client
/// certificate, all PEM, made fresh for each test.
pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) server_cert: String,
    pub(crate) server_key: String,
    pub(crate) client_cert: String,
    pub(crate) client_key: String,
    /// A certificate for a Redis listening on 127.0.0.1 (IP SAN).
    pub(crate) redis_cert: String,
    pub(crate) redis_key: String,
}

impl Pki {
    /// Not the address the client dials (127.0.0.1), so passing only when the
    /// client sets `tls_domain_name` proves that setting works.
    pub(crate) const SERVER_NAME: &'static str = "sessionstore.test";

    pub(crate) fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "SessionStore test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec![Self::SERVER_NAME.to_string()]);
        let (client_cert, client_key) = leaf(vec!["client.sessionstore.test".to_string()]);
        let (redis_cert, redis_key) = leaf(vec!["127.0.0.1".to_string()]);
        Self {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
            redis_cert,
            redis_key,
        }
    }

    /// A test configuration serving TLS with this PKI's server certificate,
    /// requiring client certificates from its CA when `mutual`.
    pub(crate) fn server_config(&self, files: &TempFiles, mutual: bool) -> Config {
        let mut config = test_config();
        config.tls_cert = Some(files.write("server.pem", &self.server_cert));
        config.tls_key = Some(files.write("server.key", &self.server_key));
        if mutual {
            config.tls_client_ca = Some(files.write("ca.pem", &self.ca));
        }
        config
    }
}

/// A TLS channel to `addr` (`host:port`), trusting only the CA `ca` (PEM) to
/// vouch for [`Pki::SERVER_NAME`], presenting the client certificate and key
/// `identity` when given; the error when the handshake fails.
pub(crate) async fn tls_channel(
    addr: impl std::fmt::Display,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(Pki::SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}
