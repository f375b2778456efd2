//! Endpoints and TLS dialing: the TLS options as given and their checks,
//! and the [`Dialer`] that turns an endpoint's URL into a tonic [`Endpoint`]
//! with the connection settings (connect timeout, keepalive, TLS,
//! `:authority`). Below both the builder and the balancer, which dial
//! through it; it knows neither.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::error::{Error, Result};

/// HTTP/2 pings on an otherwise quiet connection, so a peer that vanished
/// without closing it (a killed node, a dropped NAT entry) is noticed within
/// interval + timeout rather than when the OS gives up on TCP, minutes later.
/// The tonic server does not police ping rates.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS options as given, turned into tonic's config per endpoint.
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    /// The PEM of the CA to trust instead of the system's roots.
    pub(crate) ca_certificate: Option<Vec<u8>>,
    /// The client certificate and key (PEM), for mutual TLS.
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, when not the URL's host.
    pub(crate) domain_name: Option<String>,
}

impl TlsSettings {
    /// Whether any TLS option was given.
    pub(crate) fn is_set(&self) -> bool {
        self.ca_certificate.is_some() || self.identity.is_some() || self.domain_name.is_some()
    }

    /// Checks that the PEM given holds what it should: tonic would accept a
    /// path or any other text and build an empty root store (every handshake
    /// failing as UNAVAILABLE) or fail only on the first connection.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(pem) = &self.ca_certificate {
            certificates(pem, "ca_certificate")?;
        }
        if let Some((cert, key)) = &self.identity {
            certificates(cert, "identity certificate")?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                Error::config(format!(
                    "identity key holds no PEM private key ({e}); pass the key's contents, not its path"
                ))
            })?;
        }
        Ok(())
    }

    /// tonic's config for one endpoint; `name` is the certificate name to
    /// expect when none was set (the DNS name, for a discovered address).
    fn client_config(&self, name: Option<&str>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new();
        // A private CA replaces the system roots rather than adding to them:
        // only servers holding a certificate from that CA are trusted.
        let mut config = match &self.ca_certificate {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = self.domain_name.as_deref().or(name) {
            config = config.domain_name(name);
        }
        config
    }
}

/// Every certificate in `pem`: at least one, each well-formed.
fn certificates(pem: &[u8], what: &str) -> Result<()> {
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| Error::config(format!("{what}: malformed PEM: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::config(format!(
            "{what} holds no PEM certificate; pass the file's contents, not its path"
        )));
    }
    Ok(())
}

/// Turns URLs into tonic endpoints with the builder's connection settings.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) connect_timeout: Duration,
    tls: TlsSettings,
}

impl Dialer {
    /// A dialer with the builder's connect timeout and TLS options.
    pub(crate) fn new(connect_timeout: Duration, tls: TlsSettings) -> Self {
        Self {
            connect_timeout,
            tls,
        }
    }

    /// The endpoint for `url`; `tls_name` is the name its certificate should
    /// carry when the URL holds an address (DNS discovery).
    pub(crate) fn endpoint(&self, url: &str, tls_name: Option<&str>) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::config(format!("endpoint {url:?} is not a URL: {e}")))?;
        let https = is_https(endpoint.uri(), url)?;
        // No `Endpoint::timeout`: the client bounds each attempt itself (see
        // `SessionClient`), waiting for a connection included.
        let mut endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let (Some(name), Some(port)) = (tls_name, endpoint.uri().port_u16()) {
            // The service's name as the `:authority`, as for a named endpoint.
            let scheme = if https { "https" } else { "http" };
            if let Ok(origin) = format!("{scheme}://{}:{port}", bracketed(name)).parse::<Uri>() {
                endpoint = endpoint.origin(origin);
            }
        }
        if https {
            // tonic's `tls-ring` feature builds this config with the ring
            // provider whenever no process-wide rustls provider is installed,
            // so the first TLS connection cannot panic for want of one.
            endpoint
                .tls_config(self.tls.client_config(tls_name))
                .map_err(|e| {
                    Error::Config(format!("TLS settings for {url:?}: {}", chain(&e)).into())
                })
        } else if self.tls.is_set() {
            // tonic would silently speak plaintext to an http:// endpoint.
            Err(Error::config(format!(
                "TLS options are set but endpoint {url:?} is http://; use https://"
            )))
        } else {
            Ok(endpoint)
        }
    }
}

/// Whether `url` (parsed as `uri`) is `https://`; an error for a scheme
/// other than `http` and `https`.
pub(crate) fn is_https(uri: &Uri, url: &str) -> Result<bool> {
    match uri.scheme_str() {
        Some("https") => Ok(true),
        Some("http") => Ok(false),
        _ => Err(Error::config(format!(
            "endpoint {url:?} must start with http:// or https://"
        ))),
    }
}

/// A host for a URL: IPv6 addresses in brackets.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// A failed eager connect as [`Error::Unavailable`], the code gRPC gives a
/// server that cannot be reached, with tonic's cause chain in the message.
pub(crate) fn connect_failed(err: tonic::transport::Error) -> Error {
    let message = format!("cannot connect: {}", chain(&err));
    let mut status = tonic::Status::unavailable(message);
    status.set_source(Arc::new(err));
    Error::from(status)
}

/// An error and its sources as one line: tonic's transport errors say little
/// at the top ("transport error") and the cause below.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
