//! [`Builder`]: how a [`SessionClient`] reaches SessionStore: endpoints,
//! timeouts, TLS, the bearer token, retries and when to connect.

use std::{fmt, time::Duration};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    client::SessionClient,
    error::{Error, Result},
    metadata::CallMetadata,
    retry::RetryPolicy,
};

/// HTTP/2 pings on an otherwise quiet connection, so a peer that vanished
/// without closing it (a killed node, a dropped NAT entry) is noticed within
/// interval + timeout rather than when the OS gives up on TCP, minutes later.
/// The tonic server does not police ping rates.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and connects a [`SessionClient`]; made by
/// [`SessionClient::builder`].
///
/// Every setting has a production default, named by the `DEFAULT_*`
/// constants below.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use session_client::SessionClient;
///
/// # async fn run() -> Result<(), session_client::Error> {
/// let ca = std::fs::read("/etc/sessionstore/ca.pem").expect("CA certificate");
/// let client = SessionClient::builder("https://sessionstore-0.internal:50051")
///     .endpoint("https://sessionstore-1.internal:50051")
///     .ca_certificate(ca)
///     .bearer_token("token-from-the-secret-store")
///     .timeout(Duration::from_millis(500))
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Builder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    timeout: Duration,
    lazy: bool,
    retry: RetryPolicy,
    bearer_token: Option<String>,
    tls: TlsSettings,
}

/// The TLS options as given, turned into tonic's config per endpoint.
#[derive(Clone, Default)]
struct TlsSettings {
    ca_certificate: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
}

impl TlsSettings {
    fn is_set(&self) -> bool {
        self.ca_certificate.is_some() || self.identity.is_some() || self.domain_name.is_some()
    }

    fn client_config(&self) -> ClientTlsConfig {
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
        if let Some(name) = &self.domain_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

impl Builder {
    /// Bound on opening one connection (TCP and TLS). 5 s: long enough for a
    /// cold TLS handshake across zones, short enough to fail over quickly.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Bound on each attempt of each call. 2 s: SessionStore answers in
    /// milliseconds and gives up on Redis after 1 s (REDIS_TIMEOUT_MS), so an
    /// attempt past 2 s is stuck, and an auth check must not hang a request.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Attempts a read gets when it meets UNAVAILABLE, the first included: 3
    /// rides out a Redis failover or a pod restart without tripling load
    /// during a real outage.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Pause before the first retry, doubled for each further one, with
    /// jitter. 50 ms: a reconnect usually succeeds within that.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(50);
    /// The longest pause between two attempts.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);

    pub(crate) fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            timeout: Self::DEFAULT_TIMEOUT,
            lazy: true,
            retry: RetryPolicy {
                max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
                initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
                max_backoff: Self::DEFAULT_MAX_BACKOFF,
            },
            bearer_token: None,
            tls: TlsSettings::default(),
        }
    }

    /// Adds another endpoint (`http://host:port` or `https://host:port`):
    /// with several, calls are balanced across them (power of two choices on
    /// load), and an endpoint that fails is reconnected in the background.
    #[must_use]
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Bound on opening one connection. Default
    /// [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each attempt of each call, also sent to the server as
    /// `grpc-timeout`; past it the call fails with
    /// [`Error::DeadlineExceeded`]. A retried read may take up to
    /// `max_attempts` times this, plus the pauses. Default
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether [`connect`](Self::connect) returns at once and connects on the
    /// first call (`true`, the default), so an application can start before
    /// SessionStore does; or connects first and fails if it cannot (`false`).
    #[must_use]
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Attempts a read (get, count, list) gets when the answer is
    /// UNAVAILABLE, the first included; `1` turns retries off and `0` counts
    /// as `1`. Writes (create, revoke, login attempts) are never retried: an
    /// UNAVAILABLE answer can come after the write took effect. Default
    /// [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts.max(1);
        self
    }

    /// Pause before the first retry; each further one doubles it, up to
    /// [`max_backoff`](Self::max_backoff), and waits between half and all of
    /// that at random. Default
    /// [`DEFAULT_INITIAL_BACKOFF`](Self::DEFAULT_INITIAL_BACKOFF).
    #[must_use]
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.retry.initial_backoff = backoff;
        self
    }

    /// The longest pause between two attempts. Default
    /// [`DEFAULT_MAX_BACKOFF`](Self::DEFAULT_MAX_BACKOFF).
    #[must_use]
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.retry.max_backoff = backoff;
        self
    }

    /// Sends `authorization: Bearer <token>` with every call, for a server
    /// that requires one. Never printed by `Debug`. Default: none.
    #[must_use]
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Trusts the CA certificate(s) in `pem` for `https://` endpoints,
    /// instead of the operating system's roots (the default).
    #[must_use]
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this client certificate chain and private key (both PEM) to
    /// `https://` endpoints, for servers that require mutual TLS.
    #[must_use]
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Expects the server's certificate to be for `name` rather than the
    /// endpoint's host: for endpoints given by IP address, or behind a
    /// load balancer with another name.
    #[must_use]
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        self.tls.domain_name = Some(name.into());
        self
    }

    /// Builds the client; with [`lazy`](Self::lazy) off, also connects.
    ///
    /// Must run inside a Tokio runtime: the channel spawns its connection
    /// task there.
    ///
    /// # Errors
    ///
    /// - [`Error::Config`] when an endpoint is not an `http://` or `https://`
    ///   URL, a TLS option is set for an `http://` endpoint, a PEM does not
    ///   parse, an `https://` endpoint has no CA and the system has no roots,
    ///   or the bearer token cannot be a header.
    /// - [`Error::Unavailable`] when not lazy and no endpoint can be reached.
    pub async fn connect(self) -> Result<SessionClient> {
        let metadata = CallMetadata::new(self.bearer_token.as_deref(), self.timeout)?;
        let endpoints = self
            .endpoints
            .iter()
            .map(|url| self.make_endpoint(url))
            .collect::<Result<Vec<_>>>()?;
        let channel = match endpoints.as_slice() {
            // `new` starts the list with one endpoint and nothing removes any.
            [] => return Err(Error::config("no endpoint given")),
            [only] if self.lazy => only.connect_lazy(),
            [only] => only.connect().await.map_err(connect_failed)?,
            several => {
                if !self.lazy {
                    connect_any(several).await?;
                }
                Channel::balance_list(several.iter().cloned())
            }
        };
        Ok(SessionClient::new(
            channel,
            metadata,
            self.retry,
            self.timeout,
        ))
    }

    fn make_endpoint(&self, url: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::config(format!("endpoint {url:?} is not a URL: {e}")))?;
        let https = match endpoint.uri().scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(Error::config(format!(
                    "endpoint {url:?} must start with http:// or https://"
                )));
            }
        };
        // `Endpoint::timeout` bounds a call once it has a connection; the
        // client bounds each attempt as a whole too (see `SessionClient`),
        // which also covers waiting for a balanced endpoint to be ready.
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if https {
            // tonic's `tls-ring` feature builds this config with the ring
            // provider whenever no process-wide rustls provider is installed,
            // so the first TLS connection cannot panic for want of one.
            endpoint.tls_config(self.tls.client_config()).map_err(|e| {
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

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token or the private key.
        f.debug_struct("Builder")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("lazy", &self.lazy)
            .field("retry", &self.retry)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("ca_certificate", &self.tls.ca_certificate.is_some())
            .field(
                "identity",
                &self.tls.identity.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_domain_name", &self.tls.domain_name)
            .finish()
    }
}

/// Connects to the endpoints in turn until one answers, so an eager client
/// with several endpoints fails only when none can be reached. The probe
/// connection is dropped; the balanced channel opens its own.
async fn connect_any(endpoints: &[Endpoint]) -> Result<()> {
    let mut last = None;
    for endpoint in endpoints {
        match endpoint.connect().await {
            Ok(_) => return Ok(()),
            Err(err) => last = Some(err),
        }
    }
    match last {
        Some(err) => Err(connect_failed(err)),
        None => Err(Error::config("no endpoint given")),
    }
}

/// A failed eager connect as [`Error::Unavailable`], the code gRPC gives a
/// server that cannot be reached, with tonic's cause chain in the message.
fn connect_failed(err: tonic::transport::Error) -> Error {
    let message = format!("cannot connect: {}", chain(&err));
    let mut status = tonic::Status::unavailable(message);
    status.set_source(std::sync::Arc::new(err));
    Error::Unavailable(status)
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn config_error(builder: Builder) -> String {
        match builder.connect().await {
            Err(Error::Config(err)) => err.to_string(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// Endpoints without an http(s) scheme, or not URLs, are config errors naming the endpoint.
    #[tokio::test]
    async fn endpoints_must_be_http_or_https_urls() {
        assert!(
            config_error(SessionClient::builder("127.0.0.1:50051"))
                .await
                .contains("http://")
        );
        assert!(
            config_error(SessionClient::builder("ftp://host:1"))
                .await
                .contains("http://")
        );
        assert!(
            config_error(SessionClient::builder("http://[bad"))
                .await
                .contains("not a URL")
        );
        let second_bad = SessionClient::builder("http://127.0.0.1:1").endpoint("nope nope");
        assert!(config_error(second_bad).await.contains("nope nope"));
    }

    /// TLS options with an http:// endpoint are refused instead of silently sending plaintext.
    #[tokio::test]
    async fn tls_options_need_https() {
        let builder = SessionClient::builder("http://127.0.0.1:50051").ca_certificate("pem");
        assert!(config_error(builder).await.contains("https://"));
    }

    /// A CA certificate that does not parse is a config error at connect.
    #[tokio::test]
    async fn unparsable_pem_is_a_config_error() {
        let builder = SessionClient::builder("https://127.0.0.1:50051").ca_certificate(
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        config_error(builder).await;
    }

    /// A bearer token with a line break is a config error at connect.
    #[tokio::test]
    async fn a_bad_bearer_token_is_a_config_error() {
        let builder = SessionClient::builder("http://127.0.0.1:50051").bearer_token("a\r\nb");
        assert!(config_error(builder).await.contains("bearer token"));
    }

    /// The default (lazy) client is built with nothing listening.
    #[tokio::test]
    async fn lazy_is_the_default_and_needs_no_server() {
        // Nothing listens on port 1; a lazy client is still built.
        let client = SessionClient::builder("http://127.0.0.1:1").connect().await;
        assert!(client.is_ok());
    }

    /// The defaults are the documented ones, and Debug prints neither token nor key.
    #[test]
    fn defaults_are_the_documented_ones_and_debug_hides_secrets() {
        let builder = SessionClient::builder("http://127.0.0.1:50051")
            .bearer_token("s3cret")
            .identity("CERT", "PRIVATE KEY BYTES")
            .max_attempts(0);
        assert_eq!(builder.connect_timeout, Duration::from_secs(5));
        assert_eq!(builder.timeout, Duration::from_secs(2));
        assert!(builder.lazy);
        assert_eq!(builder.retry.max_attempts, 1);
        assert_eq!(builder.retry.initial_backoff, Duration::from_millis(50));
        let debug = format!("{builder:?}");
        assert!(!debug.contains("s3cret") && !debug.contains("PRIVATE KEY BYTES"));
    }
}
